//! `Flatten` and the element-wise activation layer: the two layers that do not move pixels.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::shape::{check_grad, ImageShape, LayerError};
use super::Forward;
use crate::activation::Activation;

/// The identity on `(B, C*H*W)`: marks where the image shape ends and flat features begin.
///
/// Its output shape is `(C*H*W, 1, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flatten {
    input: ImageShape,
}

impl Flatten {
    /// Flattens images of shape `input`.
    pub fn new(input: ImageShape) -> Self {
        Flatten { input }
    }

    /// The input shape.
    pub fn input_shape(&self) -> ImageShape {
        self.input
    }

    /// `(C*H*W, 1, 1)`.
    pub fn output_shape(&self) -> ImageShape {
        ImageShape::flat(self.input.features()).unwrap_or(self.input)
    }

    /// A copy of `x`, after checking its width.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>, LayerError> {
        self.input.check_batch("flatten input", x)?;
        Ok(x.to_owned())
    }

    /// A copy of `dy`, after checking its width.
    pub fn backward(&self, dy: ArrayView2<f32>) -> Result<Array2<f32>, LayerError> {
        check_grad("flatten gradient", dy, dy.nrows(), self.input.features())?;
        Ok(dy.to_owned())
    }
}

/// An activation applied to every value of a batch of shape `shape` (after a convolution,
/// for example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elementwise {
    /// The function.
    pub activation: Activation,
    shape: ImageShape,
}

/// What [`Elementwise::backward`] needs: the input `z` and the output `a = f(z)`.
#[derive(Debug, Clone)]
pub struct ElementwiseCache {
    z: Array2<f32>,
    a: Array2<f32>,
}

impl Elementwise {
    /// `activation` over batches of shape `shape`.
    pub fn new(activation: Activation, shape: ImageShape) -> Self {
        Elementwise { activation, shape }
    }

    /// The input (and output) shape.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// `a = f(z)` element-wise.
    pub fn forward(&self, z: ArrayView2<f32>) -> Result<Forward<ElementwiseCache>, LayerError> {
        self.shape.check_batch("activation input", z)?;
        let a = self.activation.forward(z);
        let cache = ElementwiseCache {
            z: z.to_owned(),
            a: a.clone(),
        };
        Ok(Forward { output: a, cache })
    }

    /// `dL/dz = dL/da * f'(z)`.
    pub fn backward(
        &self,
        cache: &ElementwiseCache,
        da: ArrayView2<f32>,
    ) -> Result<Array2<f32>, LayerError> {
        let (b, n) = cache.z.dim();
        check_grad("activation gradient", da, b, n)?;
        Ok(self.activation.backward(cache.z.view(), cache.a.view(), da))
    }
}
