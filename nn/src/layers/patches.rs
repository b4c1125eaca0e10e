//! im2col and col2im: the gathers between a batch of images and its patch matrix.
//!
//! See the module doc of [`crate::layers`] for the index formulas. The gathers go through a
//! table computed once per call: entry `pos*K + col` is the column of the image row that
//! patch element `col` of position `pos` reads, or [`PAD`] for a padding zero.

use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use super::shape::{checked_product, ImageShape, LayerError, Window};

/// Table entry of a padding zero (no pixel is read).
pub(crate) const PAD: usize = usize::MAX;

/// Where a sliding window lands on an image of a given shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    input: ImageShape,
    window: Window,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    /// The geometry of `window` over images of shape `input`, for a layer of kind `layer`
    /// (named in errors). Fails if the window does not fit the padded image, the stride is
    /// zero, or the patch table would overflow.
    pub fn new(layer: &'static str, input: ImageShape, window: Window) -> Result<Self, LayerError> {
        let bad = |reason: String| LayerError::Geometry { layer, reason };
        let fit = |n: usize| {
            window.positions(n).ok_or_else(|| {
                bad(format!(
                    "window {}x{} stride {} padding {} does not fit input {input}",
                    window.size, window.size, window.stride, window.padding
                ))
            })
        };
        let (out_h, out_w) = (fit(input.height())?, fit(input.width())?);
        let g = Geometry {
            input,
            window,
            out_h,
            out_w,
        };
        checked_product(&[out_h, out_w, input.channels(), window.size, window.size])
            .ok_or_else(|| bad("the patch matrix overflows".into()))?;
        Ok(g)
    }

    /// The input shape.
    pub fn input(&self) -> ImageShape {
        self.input
    }

    /// The window.
    pub fn window(&self) -> Window {
        self.window
    }

    /// Output height and width `(H_out, W_out)`.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.out_h, self.out_w)
    }

    /// Window positions per image, `P = H_out * W_out`.
    pub fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Length of one patch, `K = C * r * r`.
    pub fn patch_len(&self) -> usize {
        self.input.channels() * self.window.size * self.window.size
    }

    /// The image column read by element `col` of the patch at position `pos`, `None` for a
    /// padding zero.
    pub fn source(&self, pos: usize, col: usize) -> Option<usize> {
        let (r, s, p) = (self.window.size, self.window.stride, self.window.padding);
        let (oh, ow) = (pos / self.out_w, pos % self.out_w);
        let (c, i, j) = (col / (r * r), col % (r * r) / r, col % r);
        let y = (oh * s + i).checked_sub(p)?;
        let x = (ow * s + j).checked_sub(p)?;
        if y >= self.input.height() || x >= self.input.width() {
            return None;
        }
        Some((c * self.input.height() + y) * self.input.width() + x)
    }

    /// The gather table, `P*K` entries in patch-matrix order (position-major).
    pub(crate) fn table(&self) -> Vec<usize> {
        let k = self.patch_len();
        (0..self.positions() * k)
            .map(|e| self.source(e / k, e % k).unwrap_or(PAD))
            .collect()
    }

    /// The patch matrix of a batch `x` (B, C*H*W): shape `(B*P, K)`, row `b*P + pos`.
    pub fn im2col(&self, table: &[usize], x: ArrayView2<f32>) -> Result<Array2<f32>, LayerError> {
        self.input.check_batch("im2col input", x)?;
        let b = x.nrows();
        let len = b
            .checked_mul(table.len())
            .ok_or_else(|| self.too_large(b))?;
        let mut out = Vec::with_capacity(len);
        for row in x.rows() {
            out.extend(
                table
                    .iter()
                    .map(|&src| if src == PAD { 0.0 } else { row[src] }),
            );
        }
        Ok(Array2::from_shape_vec(
            (b * self.positions(), self.patch_len()),
            out,
        )?)
    }

    /// The first layer's patch matrix of integer samples `x` (B, C*H*W + 1) whose last
    /// column is the bias feature: shape `(B*P, K + 1)`, row `b*P + pos` the patch followed
    /// by sample `b`'s bias feature (see [`crate::first_layer`]). `table` is
    /// [`Geometry::table`]; `x` must have `C*H*W + 1` columns.
    pub(crate) fn patches_with_bias(&self, table: &[usize], x: ArrayView2<i64>) -> Array2<i64> {
        let (p, k) = (self.positions(), self.patch_len());
        let n = self.input.features();
        let mut out = Array2::zeros((x.nrows() * p, k + 1));
        for (b, sample) in x.rows().into_iter().enumerate() {
            for pos in 0..p {
                let mut row = out.row_mut(b * p + pos);
                for (col, &src) in table[pos * k..(pos + 1) * k].iter().enumerate() {
                    if src != PAD {
                        row[col] = sample[src];
                    }
                }
                row[k] = sample[n];
            }
        }
        out
    }

    /// The adjoint of [`Geometry::im2col`]: adds every patch entry of `cols` (B*P, K) back
    /// onto the pixel it was read from; padding entries are dropped. Shape `(B, C*H*W)`.
    pub fn col2im(
        &self,
        table: &[usize],
        cols: ArrayView2<f32>,
    ) -> Result<Array2<f32>, LayerError> {
        let (p, k) = (self.positions(), self.patch_len());
        if cols.ncols() != k || !cols.nrows().is_multiple_of(p) {
            return Err(LayerError::Shape {
                what: "col2im patches",
                expected: vec![cols.nrows() / p * p, k],
                got: cols.shape().to_vec(),
            });
        }
        let mut x = Array2::zeros((cols.nrows() / p, self.input.features()));
        for (mut row, patches) in x
            .rows_mut()
            .into_iter()
            .zip(cols.axis_chunks_iter(Axis(0), p))
        {
            for (&src, &v) in table.iter().zip(patches.iter()) {
                if src != PAD {
                    row[src] += v;
                }
            }
        }
        Ok(x)
    }

    fn too_large(&self, batch: usize) -> LayerError {
        LayerError::Geometry {
            layer: "im2col",
            reason: format!("a batch of {batch} images of {} overflows", self.input),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn geom(c: usize, h: usize, w: usize, win: Window) -> Geometry {
        Geometry::new("test", ImageShape::new(c, h, w).unwrap(), win).unwrap()
    }

    #[test]
    fn output_size_formula() {
        let g = geom(3, 7, 5, Window::new(3, 2, 1));
        // (7 + 2 - 3) / 2 + 1 = 4, (5 + 2 - 3) / 2 + 1 = 3
        assert_eq!(g.out_hw(), (4, 3));
        assert_eq!((g.positions(), g.patch_len()), (12, 27));
        assert!(Geometry::new("t", g.input(), Window::new(10, 1, 1)).is_err());
        assert!(Geometry::new("t", g.input(), Window::new(3, 0, 1)).is_err());
        assert!(Geometry::new("t", g.input(), Window::new(0, 1, 0)).is_err());
        assert!(Geometry::new("t", g.input(), Window::new(3, 1, usize::MAX)).is_err());
    }

    #[test]
    fn patches_read_the_right_pixels() {
        // One 1x3x3 image 1..9, window 2 stride 1 padding 1: position (0,0) covers padded rows
        // -1..1 and columns -1..1, so only its last element reads a pixel, the value 1.
        let g = geom(1, 3, 3, Window::new(2, 1, 1));
        let x = Array2::from_shape_vec((1, 9), (1..=9).map(|v| v as f32).collect()).unwrap();
        let cols = g.im2col(&g.table(), x.view()).unwrap();
        assert_eq!(cols.dim(), (16, 4));
        assert_eq!(cols.row(0).to_vec(), vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!(cols.row(5).to_vec(), vec![1.0, 2.0, 4.0, 5.0]);
        assert_eq!(cols.row(15).to_vec(), vec![9.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), c> = <x, col2im(c)> for every x and c.
        let g = geom(2, 5, 4, Window::new(3, 2, 1));
        let t = g.table();
        let x = Array2::from_shape_fn((2, 40), |(b, i)| ((b * 40 + i) as f32 * 0.37).sin());
        let c = Array2::from_shape_fn((2 * g.positions(), g.patch_len()), |(i, j)| {
            ((i * 7 + j) as f32 * 0.11).cos()
        });
        let lhs = (&g.im2col(&t, x.view()).unwrap() * &c).sum();
        let rhs = (&x * &g.col2im(&t, c.view()).unwrap()).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0));
    }

    #[test]
    fn wrong_widths_are_errors() {
        let g = geom(1, 4, 4, Window::new(2, 2, 0));
        let t = g.table();
        assert!(g.im2col(&t, Array2::zeros((2, 15)).view()).is_err());
        assert!(g.col2im(&t, Array2::zeros((5, 4)).view()).is_err());
        assert!(g.col2im(&t, Array2::zeros((4, 3)).view()).is_err());
    }
}
