//! Image layers: convolution, max and average pooling, flatten, and the [`Layer`] enum.
//!
//! # Conventions
//!
//! Batches stay rows, as everywhere in this crate: a batch of `B` images of shape
//! `(C, H, W)` ([`ImageShape`]) is an array `(B, C*H*W)` whose row holds its image
//! channel-major, pixel `(c, h, w)` at column `(c*H + h)*W + w`. Every layer knows the shape
//! of its input and computes the shape of its output, so image layers plug into the
//! `(B, features)` world of [`crate::layer::Dense`] unchanged; a flat vector of `n` features
//! is the shape `(n, 1, 1)`.
//!
//! # Output size
//!
//! A square window of side `r`, stride `s` and padding `p` (zeros on every border) over a
//! side of length `n` has
//!
//! ```text
//! n_out = floor((n + 2p - r) / s) + 1,        defined when r >= 1, s >= 1, n + 2p >= r
//! ```
//!
//! positions ([`Window::positions`]); rows and columns that no window reaches (when
//! `s` does not divide `n + 2p - r`) are ignored and get a zero gradient. The layer has
//! `P = H_out * W_out` positions per image. Shapes that do not fit are a [`LayerError`],
//! never a panic.
//!
//! # im2col
//!
//! A convolution with `O` kernels over `C` channels reads patches of `K = C*r*r` values. The
//! patch matrix of a batch has shape `(B*P, K)`:
//!
//! ```text
//! row = b*P + pos,      pos = oh*W_out + ow
//! col = c*r*r + i*r + j                       (channel, kernel row, kernel column)
//! y   = oh*s + i - p,   x = ow*s + j - p       (pixel read, in unpadded coordinates)
//! cols[row, col] = X[b, (c*H + y)*W + x]   if 0 <= y < H and 0 <= x < W, else 0 (padding)
//! ```
//!
//! The map `(pos, col) -> (c*H + y)*W + x` (or "padding") does not depend on `b`; it is
//! computed once per call as a table and both gathers go through it ([`Geometry`]):
//! `im2col` reads `X` through it, `col2im` is its adjoint and adds each patch entry back onto
//! the pixel it came from (a pixel in `t` patches receives `t` contributions; padding entries
//! are dropped).
//!
//! # Convolution
//!
//! With kernels `W` of shape `(O, K)` (row `o` in the patch order above) and bias `b` (O):
//!
//! ```text
//! Yc    = cols W^T + 1 b^T          (B*P, O),  row b*P + pos
//! Y     = Yc rearranged to (B, O*P), column o*P + pos   (channel-major again)
//! dYc   = dL/dY rearranged back to (B*P, O)
//! dL/dW = dYc^T cols                (O, K)
//! dL/db = sum over rows of dYc      (O)
//! dL/dX = col2im(dYc W)             (B, C*H*W)
//! ```
//!
//! Three matrix products (ndarray's `dot`) and the two gathers; no loop over pixels outside
//! the gathers.
//!
//! # Pooling
//!
//! Pooling works channel by channel, without padding: the batch `(B, C*H*W)` is the same
//! memory as `B*C` planes `(B*C, H*W)`, each pooled with the one-channel table of
//! [`Geometry`], giving `(B*C, P)`, which is `(B, C*P)` channel-major.
//!
//! ```text
//! max:      y = max over the window of x;   dL/dx_m += dL/dy for the maximum m (the first on
//!           ties), 0 for the other pixels; overlapping windows (s < r) add up
//! average:  y = (1/r^2) sum over the window of x;   dL/dx += (1/r^2) dL/dy on every pixel of
//!           the window (col2im of the broadcast gradient)
//! ```
//!
//! [`Flatten`] is the identity on `(B, C*H*W)`: it only marks that the image shape ends.
//! [`Elementwise`] applies an [`crate::Activation`] to every value (after a convolution).
//!
//! # In a model
//!
//! [`crate::Model`] runs a stack of these layers before its dense layers, as described by a
//! spec string ([`crate::spec`]); when the first layer is a convolution, its two products go
//! through the first-layer seam over the patch matrix ([`crate::first_layer`]).
//!
//! [`lenet5_features`] builds the convolutional part of LeNet-5 (shapes in its tests:
//! `1x28x28 -> 6x28x28 -> 6x14x14 -> 16x10x10 -> 16x5x5 -> 120x1x1`).

mod conv;
mod flatten;
mod patches;
mod pool;
mod shape;
mod stack;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use ndarray::Array2;

pub(crate) use conv::{channels_to_positions, positions_to_channels};
pub use conv::{Conv2d, ConvCache};
pub use flatten::{Elementwise, ElementwiseCache, Flatten};
pub use patches::Geometry;
pub(crate) use patches::PAD;
pub use pool::{AvgPool2d, AvgPoolCache, MaxPool2d, MaxPoolCache};
pub use shape::{ImageShape, LayerError, Window};
pub use stack::{backward_stack, check_stack, forward_stack, lenet5_features, Cache, Layer};

/// The result of a forward pass: the output `(B, output features)` and what the backward
/// pass needs.
#[derive(Debug, Clone)]
pub struct Forward<C> {
    /// The layer's output.
    pub output: Array2<f32>,
    /// What [`Layer::backward`] (or the layer's own `backward`) needs.
    pub cache: C,
}

impl<C> Forward<C> {
    /// The output and the cache converted by `f`.
    pub fn map<D>(self, f: impl FnOnce(C) -> D) -> (Array2<f32>, D) {
        (self.output, f(self.cache))
    }
}
