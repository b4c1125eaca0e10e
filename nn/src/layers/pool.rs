//! Max and average pooling, channel by channel, without padding.
//!
//! Both view a batch `(B, C*H*W)` as `B*C` one-channel planes `(B*C, H*W)` (the same memory,
//! channel-major), slide the window over every plane with the gather table of a one-channel
//! [`Geometry`], and give `(B*C, P)`, which is `(B, C*P)` channel-major again.

use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use super::patches::Geometry;
use super::shape::{check_grad, ImageShape, LayerError, Window};
use super::Forward;

/// The shared shape bookkeeping of both pooling layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Pooling {
    input: ImageShape,
    output: ImageShape,
    /// The window over one plane `(1, H, W)`.
    plane: Geometry,
}

impl Pooling {
    fn new(
        layer: &'static str,
        input: ImageShape,
        size: usize,
        stride: usize,
    ) -> Result<Self, LayerError> {
        let one = ImageShape::new(1, input.height(), input.width())?;
        let plane = Geometry::new(layer, one, Window::new(size, stride, 0))?;
        let (h, w) = plane.out_hw();
        let output = ImageShape::new(input.channels(), h, w)?;
        Ok(Pooling {
            input,
            output,
            plane,
        })
    }

    /// The batch as planes `(B*C, H*W)`.
    fn planes(&self, x: ArrayView2<f32>) -> Result<Array2<f32>, LayerError> {
        self.input.check_batch("pooling input", x)?;
        let rows = x.nrows() * self.input.channels();
        Ok(x.to_shape((rows, self.input.plane()))?.into_owned())
    }

    /// Planes `(B*C, n)` back to a batch `(B, C*n)` of shape `(batch, features)`.
    fn unplanes(
        planes: Array2<f32>,
        batch: usize,
        features: usize,
    ) -> Result<Array2<f32>, LayerError> {
        Ok(planes.into_shape_with_order((batch, features))?)
    }
}

/// Max pooling: each output is the largest value of its window (the first one on ties).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxPool2d {
    pool: Pooling,
}

/// What [`MaxPool2d::backward`] needs: for each output, the input column it copied.
#[derive(Debug, Clone)]
pub struct MaxPoolCache {
    /// Row-major over the output `(B, C*P)`: the flat index `b*C*H*W + column` of the argmax.
    argmax: Vec<usize>,
    batch: usize,
}

impl MaxPool2d {
    /// The pooling window (side and stride, no padding).
    pub fn window(&self) -> Window {
        self.pool.plane.window()
    }

    /// Max pooling over images `input` with square windows of side `size` and step `stride`.
    pub fn new(input: ImageShape, size: usize, stride: usize) -> Result<Self, LayerError> {
        Ok(MaxPool2d {
            pool: Pooling::new("max-pool", input, size, stride)?,
        })
    }

    /// The input shape `(C, H, W)`.
    pub fn input_shape(&self) -> ImageShape {
        self.pool.input
    }

    /// The output shape `(C, H_out, W_out)`.
    pub fn output_shape(&self) -> ImageShape {
        self.pool.output
    }

    /// The maximum of every window, `(B, C*P)`, remembering where it was.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Forward<MaxPoolCache>, LayerError> {
        let planes = self.pool.planes(x)?;
        let table = self.pool.plane.table();
        let k = self.pool.plane.patch_len();
        let n = self.pool.input.plane();
        let mut values = Vec::with_capacity(planes.nrows() * self.pool.plane.positions());
        let mut argmax = Vec::with_capacity(values.capacity());
        for (r, plane) in planes.rows().into_iter().enumerate() {
            for window in table.chunks_exact(k) {
                let (src, v) = window_max(plane, window);
                values.push(v);
                argmax.push(r * n + src);
            }
        }
        let rows = Array2::from_shape_vec((planes.nrows(), self.pool.plane.positions()), values)?;
        let output = Pooling::unplanes(rows, x.nrows(), self.pool.output.features())?;
        let cache = MaxPoolCache {
            argmax,
            batch: x.nrows(),
        };
        Ok(Forward { output, cache })
    }

    /// Routes every output gradient to the input that was the maximum (summing where
    /// overlapping windows share it); the other inputs get zero. No parameters.
    pub fn backward(
        &self,
        cache: &MaxPoolCache,
        dy: ArrayView2<f32>,
    ) -> Result<Array2<f32>, LayerError> {
        let features = self.pool.output.features();
        check_grad("max-pool output gradient", dy, cache.batch, features)?;
        if cache.argmax.len() != dy.len() {
            return Err(LayerError::Shape {
                what: "max-pool cache",
                expected: vec![dy.len()],
                got: vec![cache.argmax.len()],
            });
        }
        let mut dx = vec![0.0_f32; cache.batch * self.pool.input.features()];
        for (&src, &g) in cache.argmax.iter().zip(dy.iter()) {
            if let Some(d) = dx.get_mut(src) {
                *d += g;
            }
        }
        Ok(Array2::from_shape_vec(
            (cache.batch, self.pool.input.features()),
            dx,
        )?)
    }
}

/// The position in `plane` and the value of the first maximum over the window's pixels.
fn window_max(plane: ndarray::ArrayView1<f32>, window: &[usize]) -> (usize, f32) {
    let mut best = (window[0], plane[window[0]]);
    for &src in &window[1..] {
        if plane[src] > best.1 {
            best = (src, plane[src]);
        }
    }
    best
}

/// Average pooling: each output is the mean of its `size * size` window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvgPool2d {
    pool: Pooling,
}

/// What [`AvgPool2d::backward`] needs: only the batch size (the layer is linear).
#[derive(Debug, Clone, Copy)]
pub struct AvgPoolCache {
    batch: usize,
}

impl AvgPool2d {
    /// The pooling window (side and stride, no padding).
    pub fn window(&self) -> Window {
        self.pool.plane.window()
    }

    /// Average pooling over images `input` with square windows of side `size`, step `stride`.
    pub fn new(input: ImageShape, size: usize, stride: usize) -> Result<Self, LayerError> {
        Ok(AvgPool2d {
            pool: Pooling::new("average-pool", input, size, stride)?,
        })
    }

    /// The input shape `(C, H, W)`.
    pub fn input_shape(&self) -> ImageShape {
        self.pool.input
    }

    /// The output shape `(C, H_out, W_out)`.
    pub fn output_shape(&self) -> ImageShape {
        self.pool.output
    }

    /// The mean of every window: `im2col` of the planes times `1/(r*r)`, summed per row.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Forward<AvgPoolCache>, LayerError> {
        let planes = self.pool.planes(x)?;
        let table = self.pool.plane.table();
        let cols = self.pool.plane.im2col(&table, planes.view())?;
        let means = cols.sum_axis(Axis(1)) / self.pool.plane.patch_len() as f32;
        let rows = means.into_shape_with_order((planes.nrows(), self.pool.plane.positions()))?;
        let output = Pooling::unplanes(rows, x.nrows(), self.pool.output.features())?;
        let cache = AvgPoolCache { batch: x.nrows() };
        Ok(Forward { output, cache })
    }

    /// Spreads every output gradient evenly, `1/(r*r)` to each pixel of its window (col2im
    /// of the broadcast gradient). No parameters.
    pub fn backward(
        &self,
        cache: &AvgPoolCache,
        dy: ArrayView2<f32>,
    ) -> Result<Array2<f32>, LayerError> {
        check_grad(
            "average-pool output gradient",
            dy,
            cache.batch,
            self.pool.output.features(),
        )?;
        let k = self.pool.plane.patch_len();
        let g = dy.to_shape((dy.len(), 1))?.mapv(|v| v / k as f32);
        let spread = g.broadcast((g.nrows(), k)).ok_or(LayerError::Shape {
            what: "average-pool spread",
            expected: vec![g.nrows(), k],
            got: g.shape().to_vec(),
        })?;
        let table = self.pool.plane.table();
        let planes = self.pool.plane.col2im(&table, spread)?;
        Pooling::unplanes(planes, cache.batch, self.pool.input.features())
    }
}
