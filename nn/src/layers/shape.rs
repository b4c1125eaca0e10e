//! Image shapes, sliding windows and the errors of the image layers.

use std::fmt;

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

/// Errors of the image layers: shapes that do not fit, never a panic.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LayerError {
    /// The layer cannot be built for this input (window larger than the padded image, stride
    /// 0, an empty dimension, sizes that overflow).
    #[error("invalid {layer} layer: {reason}")]
    Geometry {
        /// Which kind of layer.
        layer: &'static str,
        /// What does not fit.
        reason: String,
    },
    /// An array does not have the shape the layer needs.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        /// Which array.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// `backward` was given the cache of another kind of layer.
    #[error("backward of a {expected} layer was given the cache of a {got} layer")]
    Cache {
        /// The layer's kind.
        expected: &'static str,
        /// The cache's kind.
        got: &'static str,
    },
    /// Two consecutive layers of a stack do not fit together.
    #[error(
        "layer {index} ({layer}) expects input {expected}, but the previous layer gives {got}"
    )]
    Stack {
        /// Position of the layer in the stack.
        index: usize,
        /// Its kind.
        layer: &'static str,
        /// The input shape it was built for.
        expected: ImageShape,
        /// The previous layer's output shape.
        got: ImageShape,
    },
    /// A reshape between the `(B, C*H*W)` and the patch layouts failed (sizes are checked
    /// before, so this signals an internal inconsistency).
    #[error("reshape failed: {0}")]
    Reshape(#[from] ndarray::ShapeError),
}

/// The shape `(C, H, W)` of one image; a flat vector of `n` features is `(n, 1, 1)`.
///
/// A batch of such images is an array `(B, C*H*W)` whose row holds the image in channel-major
/// order: pixel `(c, h, w)` is at column `(c*H + h)*W + w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    channels: usize,
    height: usize,
    width: usize,
}

impl ImageShape {
    /// The shape `(channels, height, width)`; every dimension positive and `C*H*W` fitting
    /// in `usize`.
    pub fn new(channels: usize, height: usize, width: usize) -> Result<Self, LayerError> {
        let bad = |reason: String| LayerError::Geometry {
            layer: "image",
            reason,
        };
        if channels == 0 || height == 0 || width == 0 {
            return Err(bad(format!("empty shape {channels}x{height}x{width}")));
        }
        checked_product(&[channels, height, width]).ok_or_else(|| bad("C*H*W overflows".into()))?;
        Ok(ImageShape {
            channels,
            height,
            width,
        })
    }

    /// A flat vector of `n` features, `(n, 1, 1)`.
    pub fn flat(n: usize) -> Result<Self, LayerError> {
        ImageShape::new(n, 1, 1)
    }

    /// Number of channels `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Height `H`.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Width `W`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Pixels per channel, `H*W`.
    pub fn plane(&self) -> usize {
        self.height * self.width
    }

    /// Features of one image, `C*H*W` (the columns of a batch).
    pub fn features(&self) -> usize {
        self.channels * self.plane()
    }

    /// Checks that a batch has this shape's number of columns.
    pub fn check_batch(&self, what: &'static str, x: ArrayView2<f32>) -> Result<(), LayerError> {
        if x.ncols() == self.features() {
            return Ok(());
        }
        Err(LayerError::Shape {
            what,
            expected: vec![x.nrows(), self.features()],
            got: x.shape().to_vec(),
        })
    }
}

impl fmt::Display for ImageShape {
    /// Formats as `CxHxW`, for example `6x28x28`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// A square sliding window: side `size`, step `stride`, `padding` zeros on every border.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    /// Side `r` of the square window (the kernel size).
    pub size: usize,
    /// Step `s` between two window positions, in both directions.
    pub stride: usize,
    /// Zero rows and columns `p` added on each of the four borders.
    pub padding: usize,
}

impl Window {
    /// A window of side `size`, step `stride` and `padding`.
    pub fn new(size: usize, stride: usize, padding: usize) -> Self {
        Window {
            size,
            stride,
            padding,
        }
    }

    /// Number of window positions along a side of length `n`: `(n + 2p - r) / s + 1`
    /// (rounded down), `None` if the window does not fit or the stride is zero.
    pub fn positions(&self, n: usize) -> Option<usize> {
        let padded = n.checked_add(self.padding.checked_mul(2)?)?;
        if self.size == 0 || self.stride == 0 || padded < self.size {
            return None;
        }
        Some((padded - self.size) / self.stride + 1)
    }
}

/// The product of `dims`, `None` on overflow.
pub(crate) fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1_usize, |acc, &d| acc.checked_mul(d))
}

/// Checks that `dy` has shape `(batch, features)`.
pub(crate) fn check_grad(
    what: &'static str,
    dy: ArrayView2<f32>,
    batch: usize,
    features: usize,
) -> Result<(), LayerError> {
    if dy.nrows() == batch && dy.ncols() == features {
        return Ok(());
    }
    Err(LayerError::Shape {
        what,
        expected: vec![batch, features],
        got: dy.shape().to_vec(),
    })
}
