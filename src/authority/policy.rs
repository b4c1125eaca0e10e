//! The key policy: which function keys the authority agrees to derive.
//!
//! A key for `y` reveals `⟨x, y⟩` for every encrypted `x`; a key for a unit vector `e_i`
//! reveals pixel `i` itself. The policy refuses such requests by shape: vectors of the wrong
//! length, entries too large, too few non-zero entries, too many keys in one request, FEBO
//! operations that training does not need. The defaults never refuse normal training (8-bit
//! weights and deltas; the trainer zeroes the gradient of a neuron whose delta column has fewer
//! than two non-zero entries, and asks only for subtraction keys with quantized predictions).
//!
//! The row minimum scales with the row length `n + 1` of the dataset: by default a row key
//! needs `min(16, ceil((n + 1) / 2))` non-zero entries (16 for MNIST's 785, 16 for a table
//! of 30 columns, 3 for one of 4), so a table with few columns is still trainable and a key
//! never isolates fewer than half of a short row's values. Trained weight rows are dense
//! (8-bit quantization rounds only weights below 1/254 of the row's largest to zero).
//!
//! # Placed kernels
//!
//! A prediction service whose first layer is a convolution asks for its `O` kernels and their
//! window ([`crate::protocol::ConvKeyRequest`]); the authority places each kernel at each of
//! the `P` positions itself ([`nn::infer::place_kernels`]) and derives one key per placed
//! kernel, so a caller cannot slip an arbitrary vector in among them. A placed kernel covers
//! `c` pixels (fewer at the borders, where the window reaches into the padding: 9 of a 5x5
//! kernel's 25 at a corner with padding 2) and must have non-zero weights on at least
//! `min(row minimum, ceil(c / 2))` of them: a dense trained kernel passes everywhere, while a
//! kernel with one non-zero weight (a single-pixel probe at every position), or one whose
//! non-zero weights fall on a single pixel at some border position, is refused. Entries obey
//! `max_abs`, at most `max_feip_vectors` kernels, at most [`MAX_PLACED_KEYS`] placed keys
//! and [`MAX_PLACED_ENTRIES`] entries in all.
//!
//! Training a convolutional first layer asks for the same placed kernels every step, with the
//! current kernels ([`crate::protocol::Request::ConvRowKeys`], logged as row keys), and for one
//! column key per position and kernel ([`crate::protocol::Request::ConvColKeys`]): each the
//! deltas at one position over the batch, under the column rule (`min_nonzero_col`), at most
//! [`MAX_PLACED_KEYS`] of them (LeNet-5: 4,704 per step, more than `max_feip_vectors`). The
//! trainer zeroes, before either run sees them, the kernels and delta lanes these rules would
//! refuse ([`crate::secure::KeyPolicyFilter`]). Note what the column keys give: 4,704 vectors
//! of length 64 have full rank, so one step's keys decrypt every column of its batch, hence
//! every image in it (the backward attack of the threat model, with no delta rank to spare).
//!
//! The policy is published with the public parameters ([`crate::protocol::Published`]): the
//! trainer filters its requests by the rules the authority applies.
//!
//! The policy is a shape check, not a proof of privacy: a caller can still combine several
//! accepted keys (for example `y` and `y + e_i`) to isolate one pixel. The audit log records a
//! digest of every vector, so such patterns can be found afterwards.
//!
//! Policies are read from JSON files; every field is optional and takes its default when
//! absent. With every default spelled out:
//!
//! ```json
//! {
//!   "max_abs": 32767,
//!   "min_nonzero_row": null,
//!   "min_nonzero_col": 2,
//!   "max_feip_vectors": 4096,
//!   "max_febo_keys": 65536,
//!   "febo_ops": ["Sub"],
//!   "max_febo_operand": 4096,
//!   "bind_batches": true,
//!   "batch_rank_budget": null
//! }
//! ```
//!
//! # Batch binding
//!
//! Without binding (`bind_batches: false`, `authority serve --shared-column-key`), one column
//! master key serves every batch, so a key for the delta vector `d`
//! decrypts `dᵀX_k` of *every* batch `k`, not only the one it was asked for: with 128 units
//! and batches of 64, the first step's keys already have rank 64, hence decrypt every image of
//! every batch. With `bind_batches` the authority derives the column master key of batch `k`
//! of dataset `D` from its column key, `D` and `k`
//! ([`fe::feip::FeipMasterSecretKey::derive_child`]), hands the client the matching public
//! keys ([`Request::BatchColParams`]; the client draws `D` at random for each file it
//! encrypts), and issues column keys for one named batch ([`Request::BoundColKeys`]): under
//! any other batch's key, of this dataset or another, the decryption is a random group
//! element, which the bounded discrete log refuses.
//!
//! With `batch_rank_budget = R` (below the batch size `B`) the authority also counts, per
//! batch, the rank of every column vector it has issued for it ([`super::budget`]) and
//! refuses a request that would raise it past `R`: the batch's backward products then leave a
//! space of dimension at least `B − R` of its pixel columns free, whatever the trainer asks.
//! Linear algebra alone cannot close it; pixel bounds and sparsity can narrow it (the
//! leakage experiment's estimates stay legible). A visit spends `min(H, B − rank)` of it
//! (`H` the first layer's width), so with `H ≥ B` one visit spends it all and later deltas
//! count only in the span already issued. It bounds nothing about the forward products
//! `z = W₁x`.

use crate::protocol::{batch_params_per_request, ConvKeyRequest, FeboKeyRequest, Request};
use crate::Curve;
use fe::febo::Op;
use fe::FeCurve;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What the authority agrees to derive keys for. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Largest `|entry|` of an inner-product key vector (default 32767: 16-bit keys; training
    /// uses 8-bit ones).
    pub max_abs: u32,
    /// Fewest non-zero entries of a row key vector (default, `null`: `min(16, ceil((n + 1) /
    /// 2))` for rows of length `n + 1`; see [`Policy::min_row`]).
    pub min_nonzero_row: Option<usize>,
    /// Fewest non-zero entries of a column key vector (default 2).
    pub min_nonzero_col: usize,
    /// Most vectors in one row or column request (default 4096).
    pub max_feip_vectors: usize,
    /// Most keys in one FEBO request (default 65536).
    pub max_febo_keys: usize,
    /// FEBO operations allowed (default: only `Sub`, the output error `a - y`).
    pub febo_ops: Vec<Op>,
    /// Largest `|operand|` of a FEBO key (default 4096, the trainer's label scale).
    pub max_febo_operand: u64,
    /// Bind column keys to batches (default true): batch `k`'s columns are encrypted under
    /// their own master key, derived from the column key and `k`, and a column key is asked
    /// for one batch ([`Request::BoundColKeys`]) and decrypts nothing in range on another.
    /// Unbound column requests are refused. See [Batch binding](self#batch-binding).
    pub bind_batches: bool,
    /// With `bind_batches`: the most rank the column vectors issued for one batch may reach
    /// over the authority's life (default, `null`: no budget). A request that would raise a
    /// batch's rank past it is refused whole. Below the batch size it keeps the batch's
    /// images undetermined by its backward products (module doc).
    pub batch_rank_budget: Option<usize>,
    /// Length of row vectors; not configurable, set from the public parameters
    /// ([`Policy::with_lengths`]); 0 until then.
    #[serde(skip)]
    pub row_len: usize,
    /// Length of column vectors (the batch size); not configurable, set from the public
    /// parameters ([`Policy::with_lengths`]); 0 until then.
    #[serde(skip)]
    pub col_len: usize,
}

/// Where a placed kernel weighs too few of the pixels it covers
/// ([`Policy::placement_shortfall`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// The window position.
    pub position: usize,
    /// Non-zero weights on covered pixels.
    pub nonzero: usize,
    /// Pixels the window covers there (the rest is padding).
    pub covered: usize,
    /// Non-zero weights the rule requires there.
    pub needed: usize,
}

/// Most keys one request for placed kernels may yield (kernels times positions; LeNet-5's
/// first convolution on 28x28 images needs 4,704).
pub const MAX_PLACED_KEYS: usize = 1 << 16;

/// Most entries of the placed kernels of one request (keys times the row length), which the
/// authority holds in memory while it derives them: 2^25 (256 MiB as 64-bit integers;
/// LeNet-5's first convolution has 3.7 million).
pub const MAX_PLACED_ENTRIES: usize = 1 << 25;

/// The row minimum of the default policy for rows of length `row_len`:
/// `min(16, ceil(row_len / 2))`.
pub fn default_min_row(row_len: usize) -> usize {
    row_len.div_ceil(2).min(16)
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_abs: 32767,
            min_nonzero_row: None,
            min_nonzero_col: 2,
            max_feip_vectors: 4096,
            max_febo_keys: 65536,
            febo_ops: vec![Op::Sub],
            max_febo_operand: 4096,
            bind_batches: true,
            batch_rank_budget: None,
            row_len: 0,
            col_len: 0,
        }
    }
}

impl Policy {
    /// The same policy for rows of length `row_len` and columns of length `col_len`.
    pub fn with_lengths(mut self, row_len: usize, col_len: usize) -> Self {
        self.row_len = row_len;
        self.col_len = col_len;
        self
    }

    /// Fewest non-zero entries of a row key: the configured value, else
    /// [`default_min_row`] of the row length.
    pub fn min_row(&self) -> usize {
        self.min_nonzero_row
            .unwrap_or_else(|| default_min_row(self.row_len))
    }

    /// Parses a JSON policy; absent fields take their defaults, unknown fields are errors.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid policy: {e}"))
    }

    /// Reads a JSON policy file (see [`Policy::from_json`]).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The policy as pretty JSON (its configurable fields).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks that the policy is usable: its non-zero minimums fit in the vector lengths (a
    /// policy that refuses every key of a kind is almost certainly a mistake).
    pub fn validate(&self) -> Result<(), String> {
        if self.min_row() > self.row_len {
            return Err(format!(
                "min_nonzero_row = {} exceeds the row length {}: every row key would be refused",
                self.min_row(),
                self.row_len
            ));
        }
        if self.min_nonzero_col > self.col_len {
            return Err(format!(
                "min_nonzero_col = {} exceeds the batch size {}: every column key would be refused",
                self.min_nonzero_col, self.col_len
            ));
        }
        match self.batch_rank_budget {
            Some(_) if !self.bind_batches => Err(
                "batch_rank_budget needs bind_batches: without binding, every column key \
                 decrypts every batch and a per-batch budget bounds nothing"
                    .into(),
            ),
            Some(0) => Err("batch_rank_budget = 0 would refuse every column key".into()),
            Some(r) if r >= self.col_len => Err(format!(
                "batch_rank_budget = {r} is not below the batch size {}: every batch's column \
                 keys could reach full rank, and the budget would protect nothing",
                self.col_len
            )),
            _ => Ok(()),
        }
    }

    /// Checks a request against the policy: `Ok` if every key it asks for may be issued,
    /// otherwise the reason of the first violation. Pure: no I/O, no keys involved.
    pub fn check(&self, request: &Request) -> Result<(), String> {
        match request {
            Request::Params => Ok(()),
            Request::RowKeys(ys) => self.check_feip("row", ys, self.row_len, self.min_row()),
            // A prediction service's rows are row keys under the same rules: a unit vector
            // would read one feature of every query.
            Request::InferenceKeys(ys) => {
                self.check_feip("inference row", ys, self.row_len, self.min_row())
            }
            Request::ColKeys(_) | Request::ConvColKeys(_) if self.bind_batches => Err(
                "this authority binds column keys to batches: ask for them with the batch \
                 (BoundColKeys; the dataset must be encrypted under the batches' keys)"
                    .into(),
            ),
            Request::ColKeys(ys) => {
                self.check_feip("column", ys, self.col_len, self.min_nonzero_col)
            }
            Request::FeboKeys(reqs) => self.check_febo(reqs),
            Request::ConvInferenceKeys(req) | Request::ConvRowKeys(req) => {
                self.check_conv(req).map(|_| ())
            }
            Request::ConvColKeys(ys) => self.check_conv_cols(ys),
            Request::BatchColParams { .. } | Request::BoundColKeys { .. } if !self.bind_batches => {
                Err("this authority does not bind column keys to batches \
                     (bind_batches is false): use the shared column key"
                    .into())
            }
            Request::BatchColParams { first, count, .. } => {
                let most = batch_params_per_request(self.col_len);
                if *count > most || first.checked_add(*count).is_none() {
                    return Err(format!(
                        "batch keys {first}..{first}+{count}: at most {most} per request for \
                         batches of {}, below 2^32",
                        self.col_len
                    ));
                }
                Ok(())
            }
            Request::BoundColKeys {
                conv: false,
                vectors,
                ..
            } => self.check_feip("column", vectors, self.col_len, self.min_nonzero_col),
            Request::BoundColKeys {
                conv: true,
                vectors,
                ..
            } => self.check_conv_cols(vectors),
        }
    }

    /// Checks a convolution's column keys: one per position and kernel, so bounded by
    /// [`MAX_PLACED_KEYS`] and [`MAX_PLACED_ENTRIES`], each under the column rule.
    fn check_conv_cols(&self, ys: &[Vec<i32>]) -> Result<(), String> {
        if ys.len() > MAX_PLACED_KEYS || ys.len().saturating_mul(self.col_len) > MAX_PLACED_ENTRIES
        {
            return Err(format!(
                "{} convolution column vectors in one request; at most {MAX_PLACED_KEYS}",
                ys.len()
            ));
        }
        self.check_vectors("convolution column", ys, self.col_len, self.min_nonzero_col)
    }

    /// Where the placed kernel `kernel` (`K + 1` entries, bias last) first weighs too few of
    /// the pixels it covers (module doc), `None` if it passes at every position.
    pub fn placement_shortfall(
        &self,
        g: &nn::layers::Geometry,
        kernel: ndarray::ArrayView1<'_, i64>,
    ) -> Option<Shortfall> {
        let min_row = self.min_row();
        (0..g.positions()).find_map(|pos| {
            let (mut covered, mut nonzero) = (0usize, 0usize);
            for (col, &w) in kernel.iter().take(g.patch_len()).enumerate() {
                if g.source(pos, col).is_some() {
                    covered += 1;
                    nonzero += usize::from(w != 0);
                }
            }
            let needed = min_row.min(covered.div_ceil(2));
            (nonzero < needed).then_some(Shortfall {
                position: pos,
                nonzero,
                covered,
                needed,
            })
        })
    }

    /// Checks a request for placed kernels (module doc); returns the placed rows.
    pub fn check_conv(&self, req: &ConvKeyRequest) -> Result<ndarray::Array2<i64>, String> {
        let g = req.geometry().map_err(|e| format!("convolution: {e}"))?;
        if g.input().features() + 1 != self.row_len {
            return Err(format!(
                "convolution over {} inputs; the parameters' rows have {} entries (inputs and \
                 bias)",
                g.input().features(),
                self.row_len
            ));
        }
        let k = g.patch_len() + 1;
        let kernels = req
            .kernel_matrix()
            .filter(|m| m.ncols() == k)
            .ok_or_else(|| format!("every kernel must have {k} entries (weights and bias)"))?;
        if kernels.nrows() > self.max_feip_vectors {
            return Err(format!(
                "{} kernels in one request; the policy allows at most {}",
                kernels.nrows(),
                self.max_feip_vectors
            ));
        }
        let placed_keys = kernels.nrows().saturating_mul(g.positions());
        if placed_keys > MAX_PLACED_KEYS
            || placed_keys.saturating_mul(self.row_len) > MAX_PLACED_ENTRIES
        {
            return Err(format!(
                "{placed_keys} placed kernels of {} entries in one request; at most \
                 {MAX_PLACED_KEYS} and {MAX_PLACED_ENTRIES} entries in all",
                self.row_len
            ));
        }
        if let Some(v) = kernels
            .iter()
            .find(|v| v.unsigned_abs() > u64::from(self.max_abs))
        {
            return Err(format!(
                "kernel entry {v} exceeds the policy's max_abs {}",
                self.max_abs
            ));
        }
        for (o, kernel) in kernels.rows().into_iter().enumerate() {
            if let Some(f) = self.placement_shortfall(&g, kernel) {
                return Err(format!(
                    "kernel {o} at position {} weighs {} of the {} pixels it covers; the \
                     policy requires at least {} (a key with few non-zero entries reveals \
                     single pixels)",
                    f.position, f.nonzero, f.covered, f.needed
                ));
            }
        }
        nn::infer::place_kernels(&g, kernels.view()).ok_or_else(|| "placement".into())
    }

    fn check_feip(
        &self,
        kind: &str,
        ys: &[Vec<i32>],
        len: usize,
        min_nonzero: usize,
    ) -> Result<(), String> {
        if ys.len() > self.max_feip_vectors {
            return Err(format!(
                "{} {kind} vectors in one request; the policy allows at most {}",
                ys.len(),
                self.max_feip_vectors
            ));
        }
        self.check_vectors(kind, ys, len, min_nonzero)
    }

    /// Lengths, entries and non-zero counts of key vectors.
    fn check_vectors(
        &self,
        kind: &str,
        ys: &[Vec<i32>],
        len: usize,
        min_nonzero: usize,
    ) -> Result<(), String> {
        for (k, y) in ys.iter().enumerate() {
            if y.len() != len {
                return Err(format!(
                    "{kind} vector {k} has length {}, expected {len}",
                    y.len()
                ));
            }
            let mut nonzero = 0usize;
            for (i, &v) in y.iter().enumerate() {
                if v.unsigned_abs() > self.max_abs {
                    return Err(format!(
                        "{kind} vector {k}: entry {v} at position {i} exceeds the policy's \
                         max_abs {}",
                        self.max_abs
                    ));
                }
                nonzero += usize::from(v != 0);
            }
            if nonzero < min_nonzero {
                return Err(format!(
                    "{kind} vector {k} has {nonzero} non-zero entries; the policy requires at \
                     least {min_nonzero} (a key with few non-zero entries reveals single values)"
                ));
            }
        }
        Ok(())
    }

    fn check_febo(&self, reqs: &[FeboKeyRequest]) -> Result<(), String> {
        if reqs.len() > self.max_febo_keys {
            return Err(format!(
                "{} basic-operation keys in one request; the policy allows at most {}",
                reqs.len(),
                self.max_febo_keys
            ));
        }
        for (k, r) in reqs.iter().enumerate() {
            if !self.febo_ops.contains(&r.op) {
                return Err(format!(
                    "basic-operation key {k}: operation {:?} is not allowed (allowed: {:?})",
                    r.op, self.febo_ops
                ));
            }
            if r.operand.unsigned_abs() > self.max_febo_operand {
                return Err(format!(
                    "basic-operation key {k}: operand {} exceeds the policy's max_febo_operand {}",
                    r.operand, self.max_febo_operand
                ));
            }
            if r.commitment.len() != <Curve as FeCurve>::POINT_LEN {
                return Err(format!(
                    "basic-operation key {k}: commitment has {} bytes, expected {}",
                    r.commitment.len(),
                    <Curve as FeCurve>::POINT_LEN
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The default policy with one column key for every batch: the shape rules of unbound
    /// column requests (bound ones obey the same rules, `batch_binding_rules`).
    fn shared() -> Policy {
        Policy {
            bind_batches: false,
            ..Policy::default()
        }
    }

    fn dense(len: usize, nonzero: usize, v: i32) -> Vec<i32> {
        (0..len).map(|i| if i < nonzero { v } else { 0 }).collect()
    }

    /// LeNet's first convolution over 28x28 images: 5x5, stride 1, padding 2.
    fn lenet_conv(kernels: Vec<Vec<i32>>) -> Request {
        Request::ConvInferenceKeys(ConvKeyRequest {
            input: [1, 28, 28],
            window: [5, 1, 2],
            kernels,
        })
    }

    #[test]
    fn placed_kernels_pass_when_dense_and_are_refused_as_probes() {
        let p = shared().with_lengths(785, 64);
        // Six dense 8-bit kernels: every position passes, the corners covering 9 pixels.
        let dense: Vec<Vec<i32>> = (0..6)
            .map(|o| (0..26).map(|i| ((i * 7 + o * 3) % 200 - 100) | 1).collect())
            .collect();
        assert_eq!(p.check(&lenet_conv(dense.clone())), Ok(()));
        if let Request::ConvInferenceKeys(req) = lenet_conv(dense.clone()) {
            assert_eq!(p.check_conv(&req).expect("placed").dim(), (6 * 784, 785));
        }
        // One non-zero weight: a single-pixel probe at every position.
        let mut probe = vec![0; 26];
        probe[12] = 100;
        let e = p.check(&lenet_conv(vec![probe])).unwrap_err();
        assert!(e.contains("reveals single pixels"), "{e}");
        // Dense in its top-left rows, with one weight on the bottom-right pixel: at the top-left
        // corner, where the window covers only its bottom-right 3x3, it reads one pixel.
        let mut corner = vec![0; 26];
        for v in corner.iter_mut().take(15) {
            *v = 50;
        }
        corner[24] = 50;
        let e = p.check(&lenet_conv(vec![corner])).unwrap_err();
        assert!(
            e.contains("position 0") && e.contains("of the 9 pixels"),
            "{e}"
        );
        // Shapes: another image size, kernels of the wrong length, entries too large.
        let e = p
            .check(&Request::ConvInferenceKeys(ConvKeyRequest {
                input: [1, 20, 20],
                window: [5, 1, 2],
                kernels: dense.clone(),
            }))
            .unwrap_err();
        assert!(e.contains("401 inputs") || e.contains("400 inputs"), "{e}");
        // 64 kernels at 784 positions: 50,176 keys of 785 entries, past the memory bound.
        let many = vec![dense[0].clone(); 64];
        let e = p.check(&lenet_conv(many)).unwrap_err();
        assert!(e.contains("entries in all"), "{e}");
        let e = p.check(&lenet_conv(vec![vec![1; 25]])).unwrap_err();
        assert!(e.contains("26 entries"), "{e}");
        let mut big = dense[0].clone();
        big[3] = 40_000;
        assert!(p
            .check(&lenet_conv(vec![big]))
            .unwrap_err()
            .contains("max_abs"));
        let e = p
            .check(&Request::ConvInferenceKeys(ConvKeyRequest {
                input: [1, 28, 28],
                window: [29, 1, 0],
                kernels: dense,
            }))
            .unwrap_err();
        assert!(e.contains("convolution"), "{e}");
    }

    /// Training's requests for a convolution follow the same rules: its forward kernels as
    /// a prediction service's, its backward lanes as column keys but bounded like placed
    /// kernels (LeNet-5 needs 4,704 per step, past `max_feip_vectors`).
    #[test]
    fn convolution_training_keys_pass_when_normal_and_are_refused_as_probes() {
        let p = shared().with_lengths(785, 64);
        let dense: Vec<Vec<i32>> = (0..6)
            .map(|o| (0..26).map(|i| ((i * 7 + o * 3) % 200 - 100) | 1).collect())
            .collect();
        let as_row = |kernels| match lenet_conv(kernels) {
            Request::ConvInferenceKeys(r) => Request::ConvRowKeys(r),
            other => other,
        };
        assert_eq!(p.check(&as_row(dense)), Ok(()));
        let mut probe = vec![0; 26];
        probe[12] = 100;
        assert!(p.check(&as_row(vec![probe])).is_err());
        let lane =
            |nonzero: usize| -> Vec<i32> { (0..64).map(|b| i32::from(b < nonzero)).collect() };
        assert_eq!(p.check(&Request::ConvColKeys(vec![lane(2); 4704])), Ok(()));
        assert!(p.check(&Request::ColKeys(vec![lane(2); 4704])).is_err());
        let e = p.check(&Request::ConvColKeys(vec![lane(1)])).unwrap_err();
        assert!(e.contains("non-zero"), "{e}");
        let e = p
            .check(&Request::ConvColKeys(vec![lane(2); MAX_PLACED_KEYS + 1]))
            .unwrap_err();
        assert!(e.contains("at most"), "{e}");
        assert!(p.check(&Request::ConvColKeys(vec![vec![1; 63]])).is_err());
    }

    /// The rule the trainer's filter applies is the one the check applies.
    #[test]
    fn placement_shortfall_names_the_first_failing_position() {
        let p = shared().with_lengths(785, 64);
        let g = nn::layers::Geometry::new(
            "conv",
            nn::layers::ImageShape::new(1, 28, 28).expect("shape"),
            nn::layers::Window::new(5, 1, 2),
        )
        .expect("geometry");
        let dense = ndarray::Array1::from_elem(26, 3i64);
        assert_eq!(p.placement_shortfall(&g, dense.view()), None);
        let mut sparse = ndarray::Array1::zeros(26);
        sparse[0] = 1;
        let f = p.placement_shortfall(&g, sparse.view()).expect("refused");
        assert_eq!((f.position, f.covered, f.needed), (0, 9, 5));
    }

    fn febo(op: Op, operand: i64) -> FeboKeyRequest {
        FeboKeyRequest {
            commitment: vec![0u8; 32],
            op,
            operand,
        }
    }

    #[test]
    fn defaults_accept_training_shaped_requests() {
        let p = shared().with_lengths(785, 64);
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(p.check(&Request::Params), Ok(()));
        let rows = vec![dense(785, 785, -127); 128];
        assert_eq!(p.check(&Request::RowKeys(rows)), Ok(()));
        assert_eq!(p.check(&Request::RowKeys(vec![dense(785, 16, 1)])), Ok(()));
        let cols = vec![dense(64, 2, 127); 128];
        assert_eq!(p.check(&Request::ColKeys(cols)), Ok(()));
        let fb = vec![febo(Op::Sub, 4096), febo(Op::Sub, -4096), febo(Op::Sub, 0)];
        assert_eq!(p.check(&Request::FeboKeys(fb)), Ok(()));
        assert_eq!(p.check(&Request::RowKeys(vec![])), Ok(()));
    }

    #[test]
    fn refuses_unit_and_sparse_vectors() {
        let p = shared().with_lengths(785, 64);
        let mut unit = vec![0; 785];
        unit[100] = 1;
        let e = p.check(&Request::RowKeys(vec![unit])).unwrap_err();
        assert!(e.contains("1 non-zero"), "{e}");
        let e = p
            .check(&Request::RowKeys(vec![dense(785, 15, 3)]))
            .unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        let mut unit = vec![0; 64];
        unit[5] = -1;
        assert!(p.check(&Request::ColKeys(vec![unit])).is_err());
        assert!(p.check(&Request::ColKeys(vec![vec![0; 64]])).is_err());
        // One bad vector among good ones refuses the whole request, naming it.
        let mut ys = vec![dense(64, 10, 1); 5];
        ys[3] = dense(64, 1, 1);
        let e = p.check(&Request::ColKeys(ys)).unwrap_err();
        assert!(e.contains("vector 3"), "{e}");
    }

    #[test]
    fn refuses_wrong_length_and_large_entries() {
        let p = shared().with_lengths(785, 64);
        let e = p
            .check(&Request::RowKeys(vec![dense(784, 784, 1)]))
            .unwrap_err();
        assert!(e.contains("length 784"), "{e}");
        assert!(p.check(&Request::ColKeys(vec![dense(65, 65, 1)])).is_err());
        let mut y = dense(785, 785, 1);
        y[7] = 32768;
        let e = p.check(&Request::RowKeys(vec![y.clone()])).unwrap_err();
        assert!(e.contains("32768"), "{e}");
        y[7] = i32::MIN;
        assert!(p.check(&Request::RowKeys(vec![y])).is_err());
        assert_eq!(
            p.check(&Request::RowKeys(vec![dense(785, 785, -32767)])),
            Ok(())
        );
    }

    #[test]
    fn refuses_too_many_vectors() {
        let p = Policy {
            max_feip_vectors: 3,
            max_febo_keys: 2,
            ..shared()
        }
        .with_lengths(785, 4);
        assert!(p.check(&Request::ColKeys(vec![dense(4, 4, 1); 3])).is_ok());
        assert!(p.check(&Request::ColKeys(vec![dense(4, 4, 1); 4])).is_err());
        assert!(p
            .check(&Request::FeboKeys(vec![febo(Op::Sub, 1); 3]))
            .is_err());
    }

    #[test]
    fn febo_ops_operands_and_commitment_length() {
        let p = Policy::default();
        for op in [Op::Add, Op::Mul, Op::Div] {
            let e = p.check(&Request::FeboKeys(vec![febo(op, 2)])).unwrap_err();
            assert!(e.contains("not allowed"), "{e}");
        }
        assert!(p
            .check(&Request::FeboKeys(vec![febo(Op::Sub, 4097)]))
            .is_err());
        assert!(p
            .check(&Request::FeboKeys(vec![febo(Op::Sub, i64::MIN)]))
            .is_err());
        let short = FeboKeyRequest {
            commitment: vec![1u8; 31],
            op: Op::Sub,
            operand: 0,
        };
        assert!(p.check(&Request::FeboKeys(vec![short])).is_err());
        let p = Policy {
            febo_ops: vec![Op::Sub, Op::Mul],
            ..Policy::default()
        };
        assert!(p.check(&Request::FeboKeys(vec![febo(Op::Mul, 3)])).is_ok());
    }

    #[test]
    fn json_round_trip_defaults_and_unknown_fields() {
        let p =
            Policy::from_json(r#"{"min_nonzero_row": 32, "febo_ops": ["Sub", "Add"]}"#).unwrap();
        assert_eq!(p.min_nonzero_row, Some(32));
        assert_eq!(p.febo_ops, vec![Op::Sub, Op::Add]);
        assert_eq!(p.max_abs, 32767);
        assert_eq!(Policy::from_json("{}").unwrap(), Policy::default());
        assert_eq!(
            Policy::from_json(&Policy::default().to_json()).unwrap(),
            Policy::default()
        );
        assert!(Policy::from_json(r#"{"min_nonzero_rows": 3}"#).is_err());
        assert!(Policy::from_json("not json").is_err());
    }

    #[test]
    fn batch_binding_rules() {
        let bound = Policy {
            bind_batches: true,
            ..Policy::default()
        }
        .with_lengths(785, 4);
        let budget_alone = Policy {
            bind_batches: false,
            batch_rank_budget: Some(3),
            ..Policy::default()
        }
        .with_lengths(785, 4);
        assert!(budget_alone
            .validate()
            .unwrap_err()
            .contains("bind_batches"));
        let zero = Policy {
            batch_rank_budget: Some(0),
            ..bound.clone()
        };
        assert!(zero.validate().is_err());
        assert_eq!(bound.validate(), Ok(()));
        let cols = vec![vec![1, 1, 0, 0]];
        let bound_req = Request::BoundColKeys {
            batch: crate::protocol::BatchId {
                dataset: [1; 16],
                batch: 3,
            },
            conv: false,
            vectors: cols.clone(),
        };
        assert_eq!(bound.check(&bound_req), Ok(()));
        assert!(bound.check(&Request::ColKeys(cols.clone())).is_err());
        assert!(bound.check(&Request::ConvColKeys(cols.clone())).is_err());
        let plain = Policy {
            bind_batches: false,
            ..Policy::default()
        }
        .with_lengths(785, 4);
        assert!(plain.check(&bound_req).is_err());
        assert!(plain
            .check(&Request::BatchColParams {
                dataset: [0; 16],
                first: 0,
                count: 1,
            })
            .is_err());
        assert_eq!(plain.check(&Request::ColKeys(cols)), Ok(()));
        let params = |first, count| {
            bound.check(&Request::BatchColParams {
                dataset: [0; 16],
                first,
                count,
            })
        };
        let most = crate::protocol::MAX_BATCH_PARAMS;
        assert_eq!(params(0, most), Ok(()));
        assert!(params(0, most + 1).is_err());
        // Large batches: fewer per request, so that the answer fits a frame.
        assert_eq!(batch_params_per_request(4096), 256);
        assert_eq!(batch_params_per_request(1 << 30), 1);
        assert!(params(u32::MAX, 2).is_err());
        // The JSON form names both fields, and files without them load with binding on.
        let json = plain.to_json();
        assert!(json.contains("\"bind_batches\": false"), "{json}");
        let old: Policy = serde_json::from_str(r#"{"max_abs": 127}"#).unwrap();
        assert!(old.bind_batches && old.batch_rank_budget.is_none());
    }

    #[test]
    fn validate_catches_impossible_minimums() {
        let p = shared().with_lengths(785, 1);
        assert!(p.validate().is_err());
        let p = Policy {
            min_nonzero_row: Some(786),
            ..Policy::default()
        }
        .with_lengths(785, 64);
        assert!(p.validate().is_err());
        // the default minimum scales with short rows and never exceeds them
        for (len, min) in [(785, 16), (31, 16), (5, 3), (2, 1)] {
            let p = shared().with_lengths(len, 8);
            assert_eq!(p.min_row(), min);
            assert!(p.validate().is_ok());
        }
    }
}
