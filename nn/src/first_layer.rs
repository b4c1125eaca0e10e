//! The first-layer seam: where the secure system replaces the first layer's products.
//!
//! # Conventions
//!
//! The first layer's weights are one matrix `W1` of shape `(H, n + 1)` whose last column is the
//! bias. Inputs are encoded integers `0..=X` (the dataset's bound,
//! [`crate::data::DatasetInfo::x_bound`]) plus a constant bias feature encoded as `X`, giving
//! `X_int` of shape `(B, n + 1)`; their float value is `X_int / X`, so the bias feature is
//! 1.0. For a batch:
//!
//! ```text
//! forward      Z       = X W1^T                  (B, H)
//! backward     grad W1 = delta^T X               (H, n + 1),  delta = dLoss/dZ (already / B)
//! output error E       = A - Y                   (B, K),      A = softmax outputs, Y one-hot
//! ```
//!
//! The training loop sees only these three results ([`FirstLayer`]), never `X` or `Y`.
//!
//! # A convolution as the first layer
//!
//! When the first layer is a convolution of `H` kernels over patches of `K` values at `P`
//! positions ([`crate::layers::Geometry`]), its products are the same two matrix products over
//! the batch's patch matrix instead of `X`: `X_p` of shape `(B*P, K + 1)`, row `b*P + pos`
//! the patch of sample `b` at position `pos` (im2col, padding zeros included) followed by the
//! sample's bias feature. `W1 = [kernels | bias]` has shape `(H, K + 1)` and
//!
//! ```text
//! forward      Z       = X_p W1^T                (B*P, H),    row b*P + pos
//! backward     grad W1 = delta^T X_p             (H, K + 1),  delta of shape (B*P, H)
//! ```
//!
//! Every entry of `Z` is an inner product of one sample with the kernel placed at one
//! position, so a secure implementation can decrypt it from the sample's ciphertext; the
//! gradient sums over positions and samples. A dense first layer is the case `P = 1`,
//! `X_p = X`. An implementation says which case it computes with `patches()`, and the training
//! loop checks it against the model.
//!
//! # Quantization
//!
//! The secure scheme computes exact integer products ([`IntegerProducts`]), so [`Quantized`]
//! maps floats to integers and back. With `Q(bits) = 2^(bits-1) - 1` and `round` either
//! round-half-away-from-zero or stochastic rounding (`floor(x + u)`, `u ~ U[0, 1)`, seeded):
//!
//! ```text
//! weights, per row j:       s_j = Q(bits_w) / max_i |W1[j,i]|      w_q[j,i] = round(W1[j,i] s_j)
//! deltas, per column j:     t_j = Q(bits_d) / max_b |delta[b,j]|    d_q[b,j] = round(delta[b,j] t_j)
//! outputs:                  a_q[b,k] = round(A[b,k] * LABEL_SCALE) in 0..=LABEL_SCALE
//!
//! Z[b,j]       = (X_int w_q^T)[b,j] / (s_j * X)
//! grad W1[j,i] = (d_q^T X_int)[j,i] / (t_j * X)
//! E[b,k]       = (a_q - LABEL_SCALE Y)[b,k] / LABEL_SCALE
//! ```
//!
//! A row or column that is all zero gets scale 1 and quantizes to zeros. Hence `|w_q| <= Q`,
//! and the exact integer results are bounded by
//!
//! ```text
//! |X_int w_q^T| <= (n + 1) * X * Q(bits_w)       (see max_abs_forward)
//! |d_q^T X_int| <= B * X * Q(bits_d)             (see max_abs_backward)
//! |a_q - LABEL_SCALE Y| <= LABEL_SCALE
//! ```
//!
//! which is what a bounded discrete logarithm must cover. For 8 bits, n = 784 and X = 255
//! (MNIST) the forward bound is 785 * 255 * 127 = 25,422,225 < 2^25.
//!
//! Dequantization depends only on the integers returned and on the quantizer (bits, rounding,
//! seed and the rounding stream counter), so two [`IntegerProducts`] implementations that
//! return the same integers give bit-identical floats, hence bit-identical training.

use std::ops::Range;

use ndarray::{Array2, ArrayView2, Axis, Slice, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Batches, DataError, Dataset};
use crate::layers::Geometry;

/// Scale of encrypted one-hot labels: a label entry is encrypted as 0 or `LABEL_SCALE`.
pub const LABEL_SCALE: i64 = 4096;
/// Smallest supported quantization width in bits.
pub const MIN_BITS: u32 = 2;
/// Largest supported quantization width in bits.
pub const MAX_BITS: u32 = 32;

/// Errors raised at the seam.
#[derive(Debug, thiserror::Error)]
pub enum SeamError {
    /// The implementation behind the seam failed (for example a decryption error).
    #[error("first-layer backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An argument or a result has the wrong shape.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        /// Which matrix.
        what: &'static str,
        /// Expected (rows, columns).
        expected: (usize, usize),
        /// Actual (rows, columns).
        got: (usize, usize),
    },
    /// The batch index does not exist.
    #[error("batch {batch} does not exist ({num_batches} batches)")]
    NoSuchBatch {
        /// Requested batch.
        batch: usize,
        /// Number of batches.
        num_batches: usize,
    },
    /// A value cannot be quantized (non-finite input, unsupported bit width).
    #[error("cannot quantize {what}: {reason}")]
    Quantization {
        /// Which matrix or setting.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// An integer is outside the range the seam allows.
    #[error("integer {value} out of range [{min}, {max}] for {what}")]
    OutOfRange {
        /// Which quantity.
        what: &'static str,
        /// The value.
        value: i128,
        /// Smallest allowed value.
        min: i128,
        /// Largest allowed value.
        max: i128,
    },
}

impl SeamError {
    /// Wraps an implementation's error as [`SeamError::Backend`].
    pub fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        SeamError::Backend(Box::new(e))
    }
}

/// Float-level first layer, called by the training loop.
pub trait FirstLayer {
    /// `Z = X W1^T` for batch `batch` (shape (B, H)), `X` being the batch's inputs with the
    /// bias column and `w1` of shape (H, n + 1).
    fn forward(&mut self, batch: usize, w1: ArrayView2<f32>) -> Result<Array2<f32>, SeamError>;
    /// `grad W1 = delta^T X` (shape (H, n + 1)) for the batch, `delta` of shape (B, H)
    /// (dLoss/dZ, already divided by B).
    fn backward(&mut self, batch: usize, delta: ArrayView2<f32>) -> Result<Array2<f32>, SeamError>;
    /// Output error `E = A - Y` (shape (B, K)) for the softmax outputs `a` of the batch; `Y`
    /// are the batch's one-hot labels, which the caller never sees directly.
    fn output_error(&mut self, batch: usize, a: ArrayView2<f32>) -> Result<Array2<f32>, SeamError>;
    /// Number of fixed batches.
    fn num_batches(&self) -> usize;
    /// Number of samples in batch `batch` (0 if it does not exist).
    fn batch_len(&self, batch: usize) -> usize;
    /// A hint that the training loop will use batch `batch` after the current one, so that an
    /// implementation reading batches from storage can start loading it. Default: nothing.
    fn prefetch(&mut self, _batch: usize) {}
    /// The convolution whose patches the products run over, `None` for a dense first layer
    /// (see the module doc). Default: dense.
    fn patches(&self) -> Option<&Geometry> {
        None
    }
}

/// Product rows per sample: the positions of `patches`, 1 for a dense layer.
pub fn rows_per_sample(patches: Option<&Geometry>) -> usize {
    patches.map_or(1, Geometry::positions)
}

/// Integer-level first layer: exact integer products, where the secure implementation plugs in.
pub trait IntegerProducts {
    /// `X_int w_q^T`, shape (B, H): exact integer products; `X_int` are the encoded inputs
    /// with the bias column `X`, `w_q` has shape (H, n + 1).
    fn forward_int(&mut self, batch: usize, w_q: ArrayView2<i64>)
        -> Result<Array2<i64>, SeamError>;
    /// `delta_q^T X_int`, shape (H, n + 1), `delta_q` of shape (B, H).
    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError>;
    /// `a_q - LABEL_SCALE * Y`, shape (B, K), `a_q` of shape (B, K) with integers in
    /// `0..=LABEL_SCALE`.
    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError>;
    /// Number of fixed batches.
    fn num_batches(&self) -> usize;
    /// Number of samples in batch `batch` (0 if it does not exist).
    fn batch_len(&self, batch: usize) -> usize;
    /// The bound `X` of the encoded inputs (the float value of an input `v` is `v / X`).
    fn input_bound(&self) -> u32;
    /// A hint that the training loop will use batch `batch` after the current one, so that an
    /// implementation reading batches from storage can start loading it. Default: nothing.
    fn prefetch(&mut self, _batch: usize) {}
    /// As [`FirstLayer::patches`]: the convolution computed, `None` for a dense layer.
    fn patches(&self) -> Option<&Geometry> {
        None
    }
}

/// How a scaled float becomes an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rounding {
    /// Round to nearest, halves away from zero.
    Nearest,
    /// Stochastic rounding `floor(x + u)`, `u ~ U[0, 1)` from a seeded ChaCha8 stream:
    /// unbiased in expectation.
    Stochastic,
}

/// Quantization settings of the seam (the trainer's own choice, not secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Quantizer {
    /// Bits of the quantized weights, sign included (default 8).
    pub bits_weights: u32,
    /// Bits of the quantized deltas, sign included (default 8).
    pub bits_deltas: u32,
    /// Rounding mode for weights and deltas (outputs always round to nearest).
    pub rounding: Rounding,
    /// Seed of the stochastic-rounding streams.
    pub seed: u64,
}

impl Default for Quantizer {
    fn default() -> Self {
        Quantizer {
            bits_weights: 8,
            bits_deltas: 8,
            rounding: Rounding::Nearest,
            seed: 0,
        }
    }
}

/// A quantized matrix and the scale of each of its rows (weights) or columns (deltas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedMatrix {
    /// The integers.
    pub values: Array2<i64>,
    /// Scale factors: `values ~= float * scale`.
    pub scales: Vec<f64>,
}

/// `2^(bits-1) - 1`, the largest magnitude of a signed `bits`-bit quantized value.
pub fn qmax(bits: u32) -> Result<i64, SeamError> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(SeamError::Quantization {
            what: "bit width",
            reason: format!("{bits} bits is outside {MIN_BITS}..={MAX_BITS}"),
        });
    }
    Ok((1i64 << (bits - 1)) - 1)
}

/// Worst-case `|X_int w_q^T|` for inputs with `n_cols = n + 1` columns (bias included) in
/// `0..=x_bound` and `bits`-bit weights: `n_cols * X * (2^(bits-1) - 1)` (saturating). Size
/// the forward discrete-log bound with it.
pub fn max_abs_forward(n_cols: usize, bits: u32, x_bound: u32) -> u64 {
    max_abs_product(n_cols, bits, x_bound)
}

/// Worst-case `|delta_q^T X_int|` for a batch of `batch_len` samples in `0..=x_bound` and
/// `bits`-bit deltas: `batch_len * X * (2^(bits-1) - 1)` (saturating). Size the backward
/// discrete-log bound with it.
pub fn max_abs_backward(batch_len: usize, bits: u32, x_bound: u32) -> u64 {
    max_abs_product(batch_len, bits, x_bound)
}

fn max_abs_product(len: usize, bits: u32, x_bound: u32) -> u64 {
    let q = qmax(bits.clamp(MIN_BITS, MAX_BITS)).unwrap_or(0) as u64;
    (len as u64)
        .saturating_mul(u64::from(x_bound))
        .saturating_mul(q)
}

impl Quantizer {
    /// `bits`-bit weights and deltas with nearest rounding.
    pub fn new(bits: u32) -> Self {
        Quantizer {
            bits_weights: bits,
            bits_deltas: bits,
            ..Quantizer::default()
        }
    }

    /// Switches to seeded stochastic rounding.
    pub fn stochastic(mut self, seed: u64) -> Self {
        self.rounding = Rounding::Stochastic;
        self.seed = seed;
        self
    }

    /// Checks the bit widths.
    pub fn validate(&self) -> Result<(), SeamError> {
        qmax(self.bits_weights)?;
        qmax(self.bits_deltas)?;
        Ok(())
    }

    /// Forward bound [`max_abs_forward`] for this quantizer, `n_cols` input columns and
    /// inputs in `0..=x_bound`.
    pub fn forward_bound(&self, n_cols: usize, x_bound: u32) -> u64 {
        max_abs_forward(n_cols, self.bits_weights, x_bound)
    }

    /// Backward bound [`max_abs_backward`] for this quantizer, a batch of `batch_len` and
    /// inputs in `0..=x_bound`.
    pub fn backward_bound(&self, batch_len: usize, x_bound: u32) -> u64 {
        max_abs_backward(batch_len, self.bits_deltas, x_bound)
    }

    /// Bound of the output-error integers: `LABEL_SCALE`.
    pub fn output_error_bound(&self) -> u64 {
        LABEL_SCALE as u64
    }

    /// Quantizes `w1` (H, n + 1) row by row; `stream` selects the stochastic-rounding stream.
    pub fn quantize_weights(
        &self,
        w1: ArrayView2<f32>,
        stream: u64,
    ) -> Result<QuantizedMatrix, SeamError> {
        self.quantize(w1, Axis(0), qmax(self.bits_weights)?, stream, "weights")
    }

    /// Quantizes `delta` (B, H) column by column (one scale per neuron over the batch).
    pub fn quantize_deltas(
        &self,
        delta: ArrayView2<f32>,
        stream: u64,
    ) -> Result<QuantizedMatrix, SeamError> {
        self.quantize(delta, Axis(1), qmax(self.bits_deltas)?, stream, "deltas")
    }

    /// Quantizes softmax outputs: `round(a * LABEL_SCALE)`, which must lie in `0..=LABEL_SCALE`.
    pub fn quantize_outputs(&self, a: ArrayView2<f32>) -> Result<Array2<i64>, SeamError> {
        let mut out = Array2::zeros(a.raw_dim());
        for (o, &v) in out.iter_mut().zip(a.iter()) {
            if !v.is_finite() || !(-1e-3..=1.001).contains(&v) {
                return Err(SeamError::Quantization {
                    what: "softmax outputs",
                    reason: format!("{v} is not a probability"),
                });
            }
            *o = ((v as f64) * LABEL_SCALE as f64)
                .round()
                .clamp(0.0, LABEL_SCALE as f64) as i64;
        }
        Ok(out)
    }

    /// `Z[b,j] = z_int[b,j] / (s_j * X)`, `scales` being the weight row scales and `X` the
    /// inputs' bound.
    pub fn dequantize_forward(
        &self,
        z_int: ArrayView2<i64>,
        scales: &[f64],
        x_bound: u32,
    ) -> Result<Array2<f32>, SeamError> {
        if z_int.ncols() != scales.len() {
            return Err(SeamError::Shape {
                what: "forward integers",
                expected: (z_int.nrows(), scales.len()),
                got: z_int.dim(),
            });
        }
        Ok(Array2::from_shape_fn(z_int.raw_dim(), |(b, j)| {
            (z_int[[b, j]] as f64 / (scales[j] * f64::from(x_bound))) as f32
        }))
    }

    /// `grad[j,i] = g_int[j,i] / (t_j * X)`, `scales` being the delta column scales and `X`
    /// the inputs' bound.
    pub fn dequantize_backward(
        &self,
        g_int: ArrayView2<i64>,
        scales: &[f64],
        x_bound: u32,
    ) -> Result<Array2<f32>, SeamError> {
        if g_int.nrows() != scales.len() {
            return Err(SeamError::Shape {
                what: "backward integers",
                expected: (scales.len(), g_int.ncols()),
                got: g_int.dim(),
            });
        }
        Ok(Array2::from_shape_fn(g_int.raw_dim(), |(j, i)| {
            (g_int[[j, i]] as f64 / (scales[j] * f64::from(x_bound))) as f32
        }))
    }

    /// `E = e_int / LABEL_SCALE`.
    pub fn dequantize_output_error(&self, e_int: ArrayView2<i64>) -> Array2<f32> {
        e_int.mapv(|v| (v as f64 / LABEL_SCALE as f64) as f32)
    }

    /// Quantizes `m` with one scale per lane: rows for `Axis(0)`, columns for `Axis(1)`.
    fn quantize(
        &self,
        m: ArrayView2<f32>,
        axis: Axis,
        q: i64,
        stream: u64,
        what: &'static str,
    ) -> Result<QuantizedMatrix, SeamError> {
        if let Some(v) = m.iter().find(|v| !v.is_finite()) {
            return Err(SeamError::Quantization {
                what,
                reason: format!("non-finite value {v}"),
            });
        }
        let qf = q as f64;
        // max |v| per lane; abs and max are exact, so f32 here equals f64.
        let lane_max = match axis {
            Axis(0) => m.map_axis(Axis(1), |row| row.fold(0f32, |a, &v| a.max(v.abs()))),
            _ => m.fold_axis(Axis(0), 0f32, |&a, &v| a.max(v.abs())),
        };
        let scales: Vec<f64> = lane_max
            .iter()
            .map(|&max| if max > 0.0 { qf / max as f64 } else { 1.0 })
            .collect();
        let mut rng = match self.rounding {
            Rounding::Nearest => None,
            Rounding::Stochastic => {
                let mut r = ChaCha8Rng::seed_from_u64(self.seed);
                r.set_stream(stream);
                Some(r)
            }
        };
        let mut values = Array2::<i64>::zeros(m.raw_dim());
        // Row-major traversal: the order of random draws is fixed.
        for (r, (mut out_row, in_row)) in values.rows_mut().into_iter().zip(m.rows()).enumerate() {
            for (c, (out, &v)) in out_row.iter_mut().zip(in_row.iter()).enumerate() {
                let scale = if axis == Axis(0) {
                    scales[r]
                } else {
                    scales[c]
                };
                let x = (v as f64 * scale).clamp(-qf, qf);
                *out = match rng.as_mut() {
                    None => round_half_away(x),
                    Some(rng) => floor_to_int(x + rng.gen::<f64>()).min(q),
                };
            }
        }
        Ok(QuantizedMatrix { values, scales })
    }
}

/// `x.round() as i64` (halves away from zero) for finite `|x| < 2^52`, without the libm call
/// that `f64::round` costs on baseline x86-64.
#[inline]
fn round_half_away(x: f64) -> i64 {
    let t = x as i64; // truncation toward zero
    let frac = x - t as f64; // exact for |x| < 2^52
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// `x.floor() as i64` for finite `|x| < 2^52`.
#[inline]
fn floor_to_int(x: f64) -> i64 {
    let t = x as i64;
    if (t as f64) > x {
        t - 1
    } else {
        t
    }
}

/// A [`FirstLayer`] that quantizes, asks an [`IntegerProducts`] for exact integer products and
/// dequantizes.
///
/// Stochastic rounding draws from ChaCha8 seeded with the quantizer's seed, on a stream
/// number that starts at 0 and grows by one at every `forward` and `backward` call. Save
/// [`Quantized::rounding_stream`] with a checkpoint and restore it with
/// [`Quantized::set_rounding_stream`] to resume bit-identically.
#[derive(Debug, Clone)]
pub struct Quantized<P: IntegerProducts> {
    inner: P,
    q: Quantizer,
    stream: u64,
}

impl<P: IntegerProducts> Quantized<P> {
    /// Wraps `inner` with the quantizer `q` (validated).
    pub fn new(inner: P, q: Quantizer) -> Result<Self, SeamError> {
        q.validate()?;
        Ok(Quantized {
            inner,
            q,
            stream: 0,
        })
    }

    /// The integer backend.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The integer backend, mutably.
    pub fn inner_mut(&mut self) -> &mut P {
        &mut self.inner
    }

    /// Unwraps the integer backend.
    pub fn into_inner(self) -> P {
        self.inner
    }

    /// The quantization settings.
    pub fn quantizer(&self) -> &Quantizer {
        &self.q
    }

    /// The next stochastic-rounding stream number (the rounding state to checkpoint).
    pub fn rounding_stream(&self) -> u64 {
        self.stream
    }

    /// Restores the stochastic-rounding state saved with [`Quantized::rounding_stream`].
    pub fn set_rounding_stream(&mut self, stream: u64) {
        self.stream = stream;
    }

    fn next_stream(&mut self) -> u64 {
        let s = self.stream;
        self.stream = self.stream.wrapping_add(1);
        s
    }

    fn existing_batch(&self, batch: usize) -> Result<usize, SeamError> {
        let n = self.inner.num_batches();
        if batch >= n {
            return Err(SeamError::NoSuchBatch {
                batch,
                num_batches: n,
            });
        }
        Ok(self.inner.batch_len(batch))
    }

    /// Product rows of batch `batch` (samples times positions).
    fn existing_rows(&self, batch: usize) -> Result<usize, SeamError> {
        Ok(self.existing_batch(batch)? * rows_per_sample(self.inner.patches()))
    }
}

fn check_shape(
    what: &'static str,
    expected: (usize, usize),
    got: (usize, usize),
) -> Result<(), SeamError> {
    if expected != got {
        return Err(SeamError::Shape {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

impl<P: IntegerProducts> FirstLayer for Quantized<P> {
    fn forward(&mut self, batch: usize, w1: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let b = self.existing_rows(batch)?;
        let stream = self.next_stream();
        let wq = self.q.quantize_weights(w1, stream)?;
        let z_int = self.inner.forward_int(batch, wq.values.view())?;
        check_shape("forward integers", (b, w1.nrows()), z_int.dim())?;
        self.q
            .dequantize_forward(z_int.view(), &wq.scales, self.inner.input_bound())
    }

    fn backward(&mut self, batch: usize, delta: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let b = self.existing_rows(batch)?;
        check_shape("delta", (b, delta.ncols()), delta.dim())?;
        let stream = self.next_stream();
        let dq = self.q.quantize_deltas(delta, stream)?;
        let g_int = self.inner.backward_int(batch, dq.values.view())?;
        if g_int.nrows() != delta.ncols() {
            return Err(SeamError::Shape {
                what: "backward integers",
                expected: (delta.ncols(), g_int.ncols()),
                got: g_int.dim(),
            });
        }
        self.q
            .dequantize_backward(g_int.view(), &dq.scales, self.inner.input_bound())
    }

    fn output_error(&mut self, batch: usize, a: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let b = self.existing_batch(batch)?;
        check_shape("softmax outputs", (b, a.ncols()), a.dim())?;
        let a_q = self.q.quantize_outputs(a)?;
        let e_int = self.inner.output_error_int(batch, a_q.view())?;
        check_shape("output-error integers", a.dim(), e_int.dim())?;
        Ok(self.q.dequantize_output_error(e_int.view()))
    }

    fn num_batches(&self) -> usize {
        self.inner.num_batches()
    }

    fn prefetch(&mut self, batch: usize) {
        self.inner.prefetch(batch)
    }

    fn batch_len(&self, batch: usize) -> usize {
        self.inner.batch_len(batch)
    }

    fn patches(&self) -> Option<&Geometry> {
        self.inner.patches()
    }
}

/// Exact integer matrix product `a b`.
///
/// Floating-point sums of integers are exact while every partial sum stays below the
/// mantissa limit (2^24 for f32, 2^53 for f64), whatever the summation order. With
/// `p = max|a| max|b|` and `k` the inner dimension:
/// - if `k` splits into at most four chunks of `c` terms with `c p < 2^24`, each chunk is an
///   f32 matrix product, exact, and the chunks are added in i64 (the fast path for 8-bit
///   operands and pixels);
/// - else if `k p < 2^53`, one f64 matrix product;
/// - else a checked i128 loop, which reports overflow of i64 as [`SeamError::OutOfRange`].
pub fn exact_int_matmul(a: ArrayView2<i64>, b: ArrayView2<i64>) -> Result<Array2<i64>, SeamError> {
    if a.ncols() != b.nrows() {
        return Err(SeamError::Shape {
            what: "integer product operands",
            expected: (a.ncols(), b.ncols()),
            got: b.dim(),
        });
    }
    let k = a.ncols();
    let max_a = a.fold(0u64, |m, v| m.max(v.unsigned_abs())) as u128;
    let max_b = b.fold(0u64, |m, v| m.max(v.unsigned_abs())) as u128;
    let per_term = max_a * max_b;
    if per_term == 0 || k == 0 {
        return Ok(Array2::zeros((a.nrows(), b.ncols())));
    }
    let chunk = (((1u128 << 24) - 1) / per_term) as usize;
    if chunk > 0 && k.div_ceil(chunk) <= 4 {
        let af = a.mapv(|v| v as f32);
        let bf = b.mapv(|v| v as f32);
        let mut out = Array2::<i64>::zeros((a.nrows(), b.ncols()));
        let mut start = 0;
        while start < k {
            let end = (start + chunk).min(k);
            let part = af
                .slice_axis(Axis(1), Slice::from(start..end))
                .dot(&bf.slice_axis(Axis(0), Slice::from(start..end)));
            Zip::from(&mut out)
                .and(&part)
                .for_each(|o, &v| *o += v as i64);
            start = end;
        }
        return Ok(out);
    }
    if per_term * (k as u128) < (1u128 << 53) {
        let af = a.mapv(|v| v as f64);
        let bf = b.mapv(|v| v as f64);
        return Ok(af.dot(&bf).mapv(|v| v as i64));
    }
    let mut out = Array2::<i64>::zeros((a.nrows(), b.ncols()));
    for ((r, c), o) in out.indexed_iter_mut() {
        let mut acc: i128 = 0;
        for i in 0..k {
            acc += a[[r, i]] as i128 * b[[i, c]] as i128;
        }
        *o = i64::try_from(acc).map_err(|_| SeamError::OutOfRange {
            what: "integer product",
            value: acc,
            min: i64::MIN as i128,
            max: i64::MAX as i128,
        })?;
    }
    Ok(out)
}

/// Plain data cut into fixed batches, shared by [`PlainIntegers`] and [`PlainFloat`].
#[derive(Debug, Clone)]
struct PlainBatches {
    data: Dataset,
    batches: Batches,
    classes: usize,
    /// The first convolution and its gather table, when the products run over patches.
    patches: Option<(Geometry, Vec<usize>)>,
}

impl PlainBatches {
    fn new(data: Dataset, batches: Batches) -> Result<Self, DataError> {
        let classes = data.info.classes;
        if batches.samples() != data.len() {
            return Err(DataError::Invalid(format!(
                "batch partition of {} samples for a dataset of {}",
                batches.samples(),
                data.len()
            )));
        }
        data.check_labels(classes)?;
        Ok(PlainBatches {
            data,
            batches,
            classes,
            patches: None,
        })
    }

    fn set_patches(&mut self, geometry: Geometry) -> Result<(), DataError> {
        if geometry.input().features() != self.data.features() {
            return Err(DataError::Invalid(format!(
                "a convolution over {} inputs for data of {} features",
                geometry.input().features(),
                self.data.features()
            )));
        }
        self.patches = Some((geometry, geometry.table()));
        Ok(())
    }

    /// The product rows of a batch: `X_int` with the bias column, or its patch matrix `X_p`
    /// (see the module doc).
    fn rows_int(&self, range: Range<usize>) -> Array2<i64> {
        let x = self.x_int(range);
        match &self.patches {
            Some((g, table)) => g.patches_with_bias(table, x.view()),
            None => x,
        }
    }

    /// The convolution, if the products run over patches.
    fn geometry(&self) -> Option<&Geometry> {
        self.patches.as_ref().map(|(g, _)| g)
    }

    /// Columns of a product row: `K + 1` for patches, `n + 1` for samples.
    fn row_len(&self) -> usize {
        match &self.patches {
            Some((g, _)) => g.patch_len() + 1,
            None => self.data.features() + 1,
        }
    }

    /// [`PlainBatches::rows_int`] as floats `/ X`.
    fn rows_float(&self, range: Range<usize>) -> Array2<f32> {
        let x = self.data.info.x_bound as f32;
        self.rows_int(range).mapv(|p| p as f32 / x)
    }

    fn range(&self, batch: usize) -> Result<Range<usize>, SeamError> {
        self.batches.range(batch).ok_or(SeamError::NoSuchBatch {
            batch,
            num_batches: self.batches.len(),
        })
    }

    /// `X_int` of the batch as i64 with the bias column.
    fn x_int(&self, range: Range<usize>) -> Array2<i64> {
        self.data.augmented(range)
    }
}

/// Plain [`IntegerProducts`] over clear data: the "quantized plain" (simulation) mode, which
/// computes exactly the integers that the secure implementation decrypts.
#[derive(Debug, Clone)]
pub struct PlainIntegers {
    src: PlainBatches,
}

/// The constructors and accessors shared by the plain first layers over a [`PlainBatches`].
macro_rules! plain_source_impl {
    ($name:ident, $what:literal) => {
        impl $name {
            #[doc = concat!($what, " over `data` partitioned by `batches`.")]
            pub fn new(data: Dataset, batches: Batches) -> Result<Self, DataError> {
                Ok($name {
                    src: PlainBatches::new(data, batches)?,
                })
            }

            /// Same as `new` with the partition `data.batches(batch_size, drop_last)`.
            pub fn from_dataset(
                data: Dataset,
                batch_size: usize,
                drop_last: bool,
            ) -> Result<Self, DataError> {
                let batches = data.batches(batch_size, drop_last)?;
                Self::new(data, batches)
            }

            /// The data.
            pub fn dataset(&self) -> &Dataset {
                &self.src.data
            }

            /// The batch partition.
            pub fn batches(&self) -> &Batches {
                &self.src.batches
            }

            /// The same first layer computing a convolution of `geometry` (from
            /// [`crate::Model::first_geometry`]) over the samples' patches; fails if the
            /// convolution does not read the data's features.
            pub fn with_patches(mut self, geometry: Option<&Geometry>) -> Result<Self, DataError> {
                if let Some(g) = geometry {
                    self.src.set_patches(*g)?;
                }
                Ok(self)
            }
        }
    };
}

plain_source_impl!(PlainIntegers, "Plain integer products");

impl IntegerProducts for PlainIntegers {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let range = self.src.range(batch)?;
        let n = self.src.row_len();
        check_shape("quantized weights", (w_q.nrows(), n), w_q.dim())?;
        let x = self.src.rows_int(range);
        exact_int_matmul(x.view(), w_q.t())
    }

    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let range = self.src.range(batch)?;
        let x = self.src.rows_int(range);
        check_shape(
            "quantized deltas",
            (x.nrows(), delta_q.ncols()),
            delta_q.dim(),
        )?;
        exact_int_matmul(delta_q.t(), x.view())
    }

    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let range = self.src.range(batch)?;
        check_shape(
            "quantized outputs",
            (range.len(), self.src.classes),
            a_q.dim(),
        )?;
        let mut e = a_q.to_owned();
        for (b, mut row) in e.rows_mut().into_iter().enumerate() {
            for v in row.iter_mut() {
                if !(0..=LABEL_SCALE).contains(v) {
                    return Err(SeamError::OutOfRange {
                        what: "quantized output",
                        value: *v as i128,
                        min: 0,
                        max: LABEL_SCALE as i128,
                    });
                }
            }
            let label = self.src.data.labels[range.start + b] as usize;
            row[label] -= LABEL_SCALE;
        }
        Ok(e)
    }

    fn num_batches(&self) -> usize {
        self.src.batches.len()
    }

    fn batch_len(&self, batch: usize) -> usize {
        self.src.batches.batch_len(batch)
    }

    fn input_bound(&self) -> u32 {
        self.src.data.info.x_bound
    }

    fn patches(&self) -> Option<&Geometry> {
        self.src.geometry()
    }
}

/// Plain [`FirstLayer`] in f32 without quantization: the unquantized baseline.
#[derive(Debug, Clone)]
pub struct PlainFloat {
    src: PlainBatches,
}

plain_source_impl!(PlainFloat, "Plain float first layer");

impl FirstLayer for PlainFloat {
    fn forward(&mut self, batch: usize, w1: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let range = self.src.range(batch)?;
        let n = self.src.row_len();
        check_shape("first-layer weights", (w1.nrows(), n), w1.dim())?;
        Ok(self.src.rows_float(range).dot(&w1.t()))
    }

    fn backward(&mut self, batch: usize, delta: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let range = self.src.range(batch)?;
        let x = self.src.rows_float(range);
        check_shape("delta", (x.nrows(), delta.ncols()), delta.dim())?;
        Ok(delta.t().dot(&x))
    }

    fn output_error(&mut self, batch: usize, a: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let range = self.src.range(batch)?;
        check_shape("softmax outputs", (range.len(), self.src.classes), a.dim())?;
        let mut e = a.to_owned();
        for (b, mut row) in e.rows_mut().into_iter().enumerate() {
            let label = self.src.data.labels[range.start + b] as usize;
            row[label] -= 1.0;
        }
        Ok(e)
    }

    fn num_batches(&self) -> usize {
        self.src.batches.len()
    }

    fn batch_len(&self, batch: usize) -> usize {
        self.src.batches.batch_len(batch)
    }

    fn patches(&self) -> Option<&Geometry> {
        self.src.geometry()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ndarray::array;

    /// Two samples with two pixels each, labels 1 and 0, one batch.
    fn hand_data() -> Dataset {
        Dataset::grey_images(array![[10u8, 200], [0, 255]], vec![1, 0], 1, 2, 2).unwrap()
    }

    #[test]
    fn hand_made_example_gives_the_expected_integers() {
        let q = Quantizer::new(8);
        let w1 = array![[0.5f32, -0.25, 1.0], [0.0, 0.0, 0.0], [-0.08, 0.2, 0.05]];
        let wq = q.quantize_weights(w1.view(), 0).unwrap();
        // Row 0: s = 127 / 1.0; 63.5 -> 64 (half away from zero), -31.75 -> -32, 127.
        // Row 1: all zero, scale 1. Row 2: s = 127 / 0.2 = 635; -50.8 -> -51, 127, 31.75 -> 32.
        assert_eq!(wq.values, array![[64, -32, 127], [0, 0, 0], [-51, 127, 32]]);
        assert_eq!(wq.scales[0], 127.0);
        assert_eq!(wq.scales[1], 1.0);
        assert!((wq.scales[2] - 635.0).abs() < 1e-4);

        let mut p = PlainIntegers::from_dataset(hand_data(), 2, false).unwrap();
        let z_int = p.forward_int(0, wq.values.view()).unwrap();
        // X_int = [[10, 200, 255], [0, 255, 255]]
        // sample 0: 10*64 - 200*32 + 255*127 = 640 - 6400 + 32385 = 26625
        //           -510 + 25400 + 8160 = 33050
        // sample 1: -255*32 + 255*127 = 24225;  255*127 + 255*32 = 40545
        assert_eq!(z_int, array![[26625, 0, 33050], [24225, 0, 40545]]);

        let z = q.dequantize_forward(z_int.view(), &wq.scales, 255).unwrap();
        assert_eq!(z[[0, 0]], (26625.0f64 / (127.0 * 255.0)) as f32);
        assert_eq!(z[[1, 2]], (40545.0f64 / (wq.scales[2] * 255.0)) as f32);
        assert!((z[[0, 0]] - (10.0 / 255.0 * 0.5 - 200.0 / 255.0 * 0.25 + 1.0)).abs() < 0.01);

        // Deltas (B = 2, H = 3), per column: col 0 max 0.02 -> t = 6350, 0.012 * 6350 = 76.2;
        // col 1 zero; col 2 max 0.5 -> t = 254, 0.25 * 254 = 63.5 -> 64.
        let delta = array![[0.012f32, 0.0, -0.5], [-0.02, 0.0, 0.25]];
        let dq = q.quantize_deltas(delta.view(), 0).unwrap();
        assert_eq!(dq.values, array![[76, 0, -127], [-127, 0, 64]]);
        assert_eq!(dq.scales[1], 1.0);
        assert_eq!(dq.scales[2], 254.0);
        let g_int = p.backward_int(0, dq.values.view()).unwrap();
        // row 0: [76*10, 76*200 - 127*255, (76 - 127)*255] = [760, -17185, -13005]
        // row 2: [-127*10, -127*200 + 64*255, (-127 + 64)*255] = [-1270, -9080, -16065]
        assert_eq!(
            g_int,
            array![[760, -17185, -13005], [0, 0, 0], [-1270, -9080, -16065]]
        );
        let g = q
            .dequantize_backward(g_int.view(), &dq.scales, 255)
            .unwrap();
        assert_eq!(g[[2, 2]], (-16065.0f64 / (254.0 * 255.0)) as f32);

        let a = array![[0.25f32, 0.75], [0.5001, 0.4999]];
        let a_q = q.quantize_outputs(a.view()).unwrap();
        assert_eq!(a_q, array![[1024, 3072], [2048, 2048]]);
        let e_int = p.output_error_int(0, a_q.view()).unwrap();
        assert_eq!(e_int, array![[1024, -1024], [-2048, 2048]]);
        assert_eq!(
            q.dequantize_output_error(e_int.view()),
            array![[0.25, -0.25], [-0.5, 0.5]]
        );

        assert_eq!(max_abs_forward(785, 8, 255), 25_422_225);
        assert_eq!(q.backward_bound(64, 16), 64 * 16 * 127);
    }

    #[test]
    fn quantized_forward_matches_manual_dequantization() {
        let mut ql = Quantized::new(
            PlainIntegers::from_dataset(hand_data(), 2, false).unwrap(),
            Quantizer::new(8),
        )
        .unwrap();
        let w1 = array![[0.5f32, -0.25, 1.0]];
        let z = ql.forward(0, w1.view()).unwrap();
        assert_eq!(
            z,
            array![
                [(26625.0f64 / 32385.0) as f32],
                [(24225.0f64 / 32385.0) as f32]
            ]
        );
        let g = ql.backward(0, array![[1.0f32], [0.0]].view()).unwrap();
        // delta_q = [127, 0]; g_int = 127 * [10, 200, 255]; / (127 * 255)
        assert_eq!(
            g,
            array![[(10.0f64 / 255.0) as f32, (200.0f64 / 255.0) as f32, 1.0]]
        );
        assert_eq!(ql.rounding_stream(), 2);
        assert!(matches!(
            ql.forward(1, w1.view()),
            Err(SeamError::NoSuchBatch { .. })
        ));
        assert!(matches!(
            ql.forward(0, array![[1.0f32, 2.0]].view()),
            Err(SeamError::Shape { .. })
        ));
        assert!(matches!(
            ql.forward(0, array![[f32::NAN, 0.0, 0.0]].view()),
            Err(SeamError::Quantization { .. })
        ));
    }

    #[test]
    fn stochastic_rounding_is_seeded_and_unbiased() {
        let q = Quantizer::new(8).stochastic(42);
        let w = Array2::from_elem((1, 2000), 0.3f32);
        let mut w = w;
        w[[0, 0]] = 1.0; // scale 127: 0.3 * 127 = 38.1
        let a = q.quantize_weights(w.view(), 5).unwrap();
        assert_eq!(a, q.quantize_weights(w.view(), 5).unwrap());
        assert_ne!(a.values, q.quantize_weights(w.view(), 6).unwrap().values);
        let rest = a.values.iter().skip(1);
        assert!(a.values.iter().skip(1).all(|&v| v == 38 || v == 39));
        let mean = rest.map(|&v| v as f64).sum::<f64>() / 1999.0;
        assert!((mean - 38.1).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn plain_float_matches_definitions() {
        let mut p = PlainFloat::from_dataset(hand_data(), 2, false).unwrap();
        let w1 = array![[0.5f32, -0.25, 1.0]];
        let z = p.forward(0, w1.view()).unwrap();
        assert!((z[[0, 0]] - (10.0 / 255.0 * 0.5 - 200.0 / 255.0 * 0.25 + 1.0)).abs() < 1e-6);
        let e = p
            .output_error(0, array![[0.25f32, 0.75], [0.5, 0.5]].view())
            .unwrap();
        assert_eq!(e, array![[0.25, -0.25], [-0.5, 0.5]]);
        assert!(p.output_error(0, array![[0.25f32, 0.75]].view()).is_err());
    }

    #[test]
    fn exact_matmul_fallback_is_exact() {
        let big = 1i64 << 40;
        let a = array![[big, 3], [-big, 1]];
        let b = array![[big - 1], [7]];
        let r = exact_int_matmul(a.view(), b.view());
        // big * (big - 1) overflows i64 -> error
        assert!(matches!(r, Err(SeamError::OutOfRange { .. })));
        let a = array![[1i64 << 30, 3]];
        let b = array![[(1i64 << 30) + 1], [7]];
        let r = exact_int_matmul(a.view(), b.view()).unwrap();
        assert_eq!(r[[0, 0]], (1i64 << 60) + (1 << 30) + 21);
    }

    #[test]
    fn fast_rounding_matches_std() {
        let mut xs = vec![
            0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, 63.5, -63.5, 127.0, -127.0,
        ];
        xs.extend([
            0.49999999999999994,
            -0.49999999999999994,
            1e9 + 0.5,
            -4503599627370495.5,
        ]);
        for i in 0..20000 {
            let v = (i as f64 - 10000.0) * 0.0137 + 1e-9 * i as f64;
            xs.push(v);
            xs.push(v.trunc() + 0.5);
            xs.push(-(v.trunc() + 0.5));
        }
        for x in xs {
            assert_eq!(round_half_away(x), x.round() as i64, "round {x}");
            assert_eq!(floor_to_int(x), x.floor() as i64, "floor {x}");
        }
    }

    #[test]
    fn bits_are_validated() {
        assert!(Quantizer::new(1).validate().is_err());
        assert!(Quantizer::new(33).validate().is_err());
        assert!(Quantizer::new(16).validate().is_ok());
        assert_eq!(qmax(8).unwrap(), 127);
    }
}
