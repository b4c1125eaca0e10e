//! Element-wise activation functions of the hidden layers.
//!
//! - sigmoid: `s(z) = 1 / (1 + e^-z)`, `s'(z) = s(z) (1 - s(z))`;
//! - ReLU: `r(z) = max(z, 0)`, `r'(z) = 1 if z > 0 else 0`;
//! - tanh: `t(z) = tanh z`, `t'(z) = 1 - t(z)^2`.
//!
//! The derivative is computed from the pre-activation `z` and the activation `a = f(z)`
//! together, so that no function is evaluated twice during back-propagation.

use std::fmt;
use std::str::FromStr;

use ndarray::{Array2, ArrayView2, Zip};
use serde::{Deserialize, Serialize};

/// A hidden-layer activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Activation {
    /// Logistic sigmoid, the activation of the CryptoNN paper's experiments.
    Sigmoid,
    /// Rectified linear unit.
    Relu,
    /// Hyperbolic tangent.
    Tanh,
}

/// Numerically stable logistic function (never computes `exp` of a large positive number).
#[inline]
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Activation {
    /// Every activation, in a fixed order (for tests and help texts).
    pub const ALL: [Activation; 3] = [Activation::Sigmoid, Activation::Relu, Activation::Tanh];

    /// The activation's lower-case name, as accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            Activation::Sigmoid => "sigmoid",
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
        }
    }

    /// `f(z)` for one value.
    #[inline]
    pub fn apply(self, z: f32) -> f32 {
        match self {
            Activation::Sigmoid => sigmoid(z),
            Activation::Relu => z.max(0.0),
            Activation::Tanh => z.tanh(),
        }
    }

    /// `f'(z)` for one value, given `z` and `a = f(z)`.
    #[inline]
    pub fn derivative_at(self, z: f32, a: f32) -> f32 {
        match self {
            Activation::Sigmoid => a * (1.0 - a),
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => 1.0 - a * a,
        }
    }

    /// `f(z)` element-wise over a batch.
    pub fn forward(self, z: ArrayView2<f32>) -> Array2<f32> {
        z.mapv(|v| self.apply(v))
    }

    /// Back-propagates `upstream = dL/da` to `dL/dz = upstream * f'(z)`, element-wise.
    pub fn backward(
        self,
        z: ArrayView2<f32>,
        a: ArrayView2<f32>,
        upstream: ArrayView2<f32>,
    ) -> Array2<f32> {
        let mut out = upstream.to_owned();
        Zip::from(&mut out)
            .and(&z)
            .and(&a)
            .for_each(|o, &zv, &av| *o *= self.derivative_at(zv, av));
        out
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown activation name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown activation {0:?} (expected sigmoid, relu or tanh)")]
pub struct UnknownActivation(pub String);

impl FromStr for Activation {
    type Err = UnknownActivation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sigmoid" | "logistic" => Ok(Activation::Sigmoid),
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            _ => Err(UnknownActivation(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivatives_match_finite_differences() {
        let h = 1e-3_f32;
        for act in Activation::ALL {
            for &z in &[-4.0_f32, -1.3, -0.2, 0.05, 0.7, 2.5] {
                let numeric = (act.apply(z + h) - act.apply(z - h)) / (2.0 * h);
                let analytic = act.derivative_at(z, act.apply(z));
                assert!(
                    (numeric - analytic).abs() < 1e-3,
                    "{act} at {z}: numeric {numeric}, analytic {analytic}"
                );
            }
        }
    }

    #[test]
    fn sigmoid_is_stable_for_large_inputs() {
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn names_round_trip() {
        for act in Activation::ALL {
            assert_eq!(act.name().parse::<Activation>(), Ok(act));
        }
        assert!("swish".parse::<Activation>().is_err());
        assert_eq!("ReLU".parse::<Activation>(), Ok(Activation::Relu));
    }
}
