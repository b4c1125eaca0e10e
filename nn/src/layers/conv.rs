//! The 2-D convolution layer, computed as im2col and one matrix product.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::patches::Geometry;
use super::shape::{check_grad, ImageShape, LayerError, Window};
use super::Forward;
use crate::init::Init;
use crate::layer::DenseGrad;

/// A convolution of `O` square kernels `r x r` over `C` input channels.
///
/// `w` has shape `(O, C*r*r)`: row `o` is kernel `o` in the patch order `(c, i, j)` of
/// [`crate::layers`]; `b` has length `O`. Its gradients are a [`DenseGrad`] of the same
/// shapes, so an optimizer can treat the layer as a dense one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    /// Kernels, shape `(out_channels, in_channels * r * r)`.
    pub w: Array2<f32>,
    /// Bias, one per output channel.
    pub b: Array1<f32>,
    geometry: Geometry,
    output: ImageShape,
}

/// What [`Conv2d::backward`] needs from the forward pass: the patch matrix.
#[derive(Debug, Clone)]
pub struct ConvCache {
    cols: Array2<f32>,
    table: Vec<usize>,
}

impl Conv2d {
    /// A layer over images `input` with `out_channels` kernels drawn from `init` (fan-in
    /// `C*r*r`) and a zero bias.
    pub fn new<R: Rng + ?Sized>(
        input: ImageShape,
        out_channels: usize,
        window: Window,
        init: Init,
        rng: &mut R,
    ) -> Result<Self, LayerError> {
        let geometry = Geometry::new("conv", input, window)?;
        if out_channels == 0 {
            return Err(LayerError::Geometry {
                layer: "conv",
                reason: "no output channels".into(),
            });
        }
        let w = init.weights(out_channels, geometry.patch_len(), rng);
        Self::from_parts(input, window, w, Array1::zeros(out_channels))
    }

    /// A layer with the given kernels `w` (O, C*r*r) and bias `b` (O).
    pub fn from_parts(
        input: ImageShape,
        window: Window,
        w: Array2<f32>,
        b: Array1<f32>,
    ) -> Result<Self, LayerError> {
        let geometry = Geometry::new("conv", input, window)?;
        let expected = vec![w.nrows().max(1), geometry.patch_len()];
        if w.nrows() == 0 || w.ncols() != geometry.patch_len() {
            let got = w.shape().to_vec();
            return Err(LayerError::Shape {
                what: "conv kernels",
                expected,
                got,
            });
        }
        if b.len() != w.nrows() {
            return Err(LayerError::Shape {
                what: "conv bias",
                expected: vec![w.nrows()],
                got: vec![b.len()],
            });
        }
        let (h, wd) = geometry.out_hw();
        let output = ImageShape::new(w.nrows(), h, wd)?;
        Ok(Conv2d {
            w,
            b,
            geometry,
            output,
        })
    }

    /// Checks that the public parameters still have the layer's shapes.
    fn check_params(&self) -> Result<(), LayerError> {
        let expected = [self.output.channels(), self.geometry.patch_len()];
        if self.w.shape() != expected || self.b.len() != expected[0] {
            return Err(LayerError::Shape {
                what: "conv kernels and bias",
                expected: expected.to_vec(),
                got: vec![self.w.nrows(), self.w.ncols(), self.b.len()],
            });
        }
        Ok(())
    }

    /// Where the kernels land on the input.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The input shape `(C, H, W)`.
    pub fn input_shape(&self) -> ImageShape {
        self.geometry.input()
    }

    /// The output shape `(O, H_out, W_out)`.
    pub fn output_shape(&self) -> ImageShape {
        self.output
    }

    /// `Y = im2col(X) W^T + b`, rearranged to `(B, O*H_out*W_out)` channel-major.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Forward<ConvCache>, LayerError> {
        self.check_params()?;
        let table = self.geometry.table();
        let cols = self.geometry.im2col(&table, x)?;
        let mut y = cols.dot(&self.w.t());
        y += &self.b;
        let output = positions_to_channels(y, x.nrows(), self.geometry.positions())?;
        Ok(Forward {
            output,
            cache: ConvCache { cols, table },
        })
    }

    /// Back-propagates `dy = dL/dY` (B, O*H_out*W_out): returns `dL/dX` (B, C*H*W) and the
    /// kernels' and bias' gradients.
    pub fn backward(
        &self,
        cache: &ConvCache,
        dy: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, DenseGrad), LayerError> {
        self.check_params()?;
        let (p, k) = (self.geometry.positions(), self.geometry.patch_len());
        if cache.cols.ncols() != k
            || !cache.cols.nrows().is_multiple_of(p)
            || cache.table.len() != p * k
        {
            return Err(LayerError::Shape {
                what: "conv cache patches",
                expected: vec![cache.cols.nrows() / p * p, k],
                got: cache.cols.shape().to_vec(),
            });
        }
        let batch = cache.cols.nrows() / p;
        check_grad(
            "conv output gradient",
            dy,
            batch,
            self.output_shape().features(),
        )?;
        let dyc = channels_to_positions(dy, self.w.nrows())?;
        let grad = DenseGrad {
            dw: dyc.t().dot(&cache.cols),
            db: dyc.sum_axis(Axis(0)),
        };
        let dcols = dyc.dot(&self.w);
        let dx = self.geometry.col2im(&cache.table, dcols.view())?;
        Ok((dx, grad))
    }
}

/// `(B*P, O)` with row `b*P + pos` to `(B, O*P)` with column `o*P + pos`.
pub(crate) fn positions_to_channels(
    y: Array2<f32>,
    batch: usize,
    p: usize,
) -> Result<Array2<f32>, LayerError> {
    let o = y.ncols();
    let y = y
        .into_shape_with_order((batch, p, o))?
        .permuted_axes([0, 2, 1]);
    Ok(y.as_standard_layout()
        .into_owned()
        .into_shape_with_order((batch, o * p))?)
}

/// The inverse of [`positions_to_channels`]: `(B, O*P)` to `(B*P, O)`.
pub(crate) fn channels_to_positions(
    dy: ArrayView2<f32>,
    o: usize,
) -> Result<Array2<f32>, LayerError> {
    let (batch, p) = (dy.nrows(), dy.ncols() / o);
    let d = dy.to_shape((batch, o, p))?;
    let d = d.view().permuted_axes([0, 2, 1]);
    Ok(d.as_standard_layout()
        .into_owned()
        .into_shape_with_order((batch * p, o))?)
}
