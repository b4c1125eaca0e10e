//! Fully connected (dense) layer with bias.
//!
//! For a batch `X` of shape (B, n) and weights `W` of shape (m, n), bias `b` of length m:
//!
//! ```text
//! Z      = X W^T + 1 b^T                 (B, m)
//! dL/dW  = (dL/dZ)^T X                   (m, n)
//! dL/db  = sum over rows of dL/dZ        (m)
//! dL/dX  = (dL/dZ) W                     (B, n)
//! ```

use ndarray::{Array1, Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

/// A dense layer `z = x W^T + b`; `w` has shape (outputs, inputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dense {
    /// Weights, shape (outputs, inputs).
    pub w: Array2<f32>,
    /// Bias, length outputs.
    pub b: Array1<f32>,
}

/// Gradients of a loss with respect to one dense layer's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseGrad {
    /// dL/dW, same shape as `w`.
    pub dw: Array2<f32>,
    /// dL/db, same length as `b`.
    pub db: Array1<f32>,
}

impl Dense {
    /// A layer with the given weights and a zero bias.
    pub fn new(w: Array2<f32>) -> Self {
        let b = Array1::zeros(w.nrows());
        Dense { w, b }
    }

    /// Number of inputs.
    pub fn inputs(&self) -> usize {
        self.w.ncols()
    }

    /// Number of outputs.
    pub fn outputs(&self) -> usize {
        self.w.nrows()
    }

    /// `Z = X W^T + b` for a batch `x` of shape (B, inputs).
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut z = x.dot(&self.w.t());
        z += &self.b;
        z
    }

    /// Parameter gradients for input `x` and upstream gradient `dz = dL/dZ` (B, outputs).
    pub fn param_grad(&self, x: ArrayView2<f32>, dz: ArrayView2<f32>) -> DenseGrad {
        DenseGrad {
            dw: dz.t().dot(&x),
            db: dz.sum_axis(Axis(0)),
        }
    }

    /// Gradient with respect to the input, `dL/dX = dz W` (B, inputs).
    pub fn input_grad(&self, dz: ArrayView2<f32>) -> Array2<f32> {
        dz.dot(&self.w)
    }
}

impl DenseGrad {
    /// All-zero gradients for a layer of the given shape.
    pub fn zeros(outputs: usize, inputs: usize) -> Self {
        DenseGrad {
            dw: Array2::zeros((outputs, inputs)),
            db: Array1::zeros(outputs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// L = sum(G .* forward(X)) has dL/dZ = G, which makes the check linear and exact up to
    /// float rounding.
    fn loss(layer: &Dense, x: &Array2<f32>, g: &Array2<f32>) -> f32 {
        (&layer.forward(x.view()) * g).sum()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let layer = Dense {
            w: array![[0.2_f32, -0.5, 0.1], [0.7, 0.3, -0.9]],
            b: array![0.05_f32, -0.1],
        };
        let x = array![
            [1.0_f32, 2.0, -1.0],
            [0.5, -0.3, 0.8],
            [0.0, 1.5, 0.2],
            [-1.0, 0.0, 0.4]
        ];
        let g = array![[0.1_f32, -0.2], [0.3, 0.05], [-0.4, 0.6], [0.2, 0.2]];
        let grad = layer.param_grad(x.view(), g.view());
        let dx = layer.input_grad(g.view());
        let h = 1e-2_f32;
        for i in 0..2 {
            for j in 0..3 {
                let mut p = layer.clone();
                p.w[[i, j]] += h;
                let mut m = layer.clone();
                m.w[[i, j]] -= h;
                let num = (loss(&p, &x, &g) - loss(&m, &x, &g)) / (2.0 * h);
                assert!((num - grad.dw[[i, j]]).abs() < 1e-3);
            }
            let mut p = layer.clone();
            p.b[i] += h;
            let mut m = layer.clone();
            m.b[i] -= h;
            let num = (loss(&p, &x, &g) - loss(&m, &x, &g)) / (2.0 * h);
            assert!((num - grad.db[i]).abs() < 1e-3);
        }
        for b in 0..4 {
            for j in 0..3 {
                let mut xp = x.clone();
                xp[[b, j]] += h;
                let mut xm = x.clone();
                xm[[b, j]] -= h;
                let num = (loss(&layer, &xp, &g) - loss(&layer, &xm, &g)) / (2.0 * h);
                assert!((num - dx[[b, j]]).abs() < 1e-3);
            }
        }
    }
}
