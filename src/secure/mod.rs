//! The secure first layer: the trainer's [`IntegerProducts`] over encrypted data.
//!
//! For batch `b` with quantized weights `W_q` (H × (n + 1)), quantized deltas `Δ_q` (B × H) and
//! quantized predictions `A_q` (B × C), the trainer asks the authority for
//!
//! * one inner-product key per weight row `w_j` and decrypts `z_bj = ⟨w_j, x_b⟩` from the
//!   batch's row ciphertexts (forward, [`IntegerProducts::forward_int`]);
//! * one basic-operation key per label element, operation `sub` with operand `a_bk`, and
//!   decrypts `LABEL_SCALE·y_bk − a_bk` (output error, negated to `A_q − LABEL_SCALE·Y`);
//! * one inner-product key per delta column `δ_j` (length B) and decrypts
//!   `g_ji = ⟨δ_j, x_col_i⟩` from the `n + 1` column ciphertexts (backward). With more units
//!   than samples the columns are dependent: keys are asked for a basis of them only, and
//!   the other columns' products are derived exactly ([`crate::basis`]).
//!
//! The results are exactly the integers the plain computation gives ([`nn::first_layer::PlainIntegers`]).
//! [`KeyPolicyFilter`] zeroes the rows and columns the authority's policy would refuse (too few
//! non-zero entries) *before* either implementation sees them, so simulated and encrypted runs
//! stay bit-identical and normal training is never refused.

mod conv;

use crate::authority::budget::{BatchRank, Prime};
use crate::authority::policy::Policy;
use crate::basis::Basis;
use crate::dataset::{DatasetError, EncryptedBatch, Reader};
use crate::protocol::{
    AuthorityClient, BatchId, ConvKeyRequest, DatasetId, FeboKeyRequest, ProtocolError,
    PublicParams,
};
use crate::Curve;
use fe::dlog::DlogTable;
use fe::febo::{self, FeboFunctionKey, Op};
use fe::feip::{self, FeipFunctionKey};
use ndarray::{Array2, ArrayView2, Axis};
use nn::first_layer::{IntegerProducts, SeamError, LABEL_SCALE};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where function keys come from: the authority over the network, or (in tests) in-process.
pub trait KeyService {
    /// Inner-product keys for weight rows.
    fn row_keys(&mut self, ys: &[Vec<i64>]) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError>;
    /// Inner-product keys for delta columns, bound to batch `batch` if given (an authority
    /// that binds column keys to batches).
    fn col_keys(
        &mut self,
        batch: Option<BatchId>,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError>;
    /// Keys for a convolution's kernels, placed by the authority at the rows `placed`.
    fn conv_row_keys(
        &mut self,
        req: ConvKeyRequest,
        placed: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError>;
    /// Keys for a convolution's delta lanes, one per position and kernel, bound to batch
    /// `batch` if given.
    fn conv_col_keys(
        &mut self,
        batch: Option<BatchId>,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError>;
    /// Basic-operation keys.
    fn febo_keys(
        &mut self,
        reqs: Vec<FeboKeyRequest>,
    ) -> Result<Vec<FeboFunctionKey<Curve>>, ProtocolError>;
}

impl KeyService for AuthorityClient {
    fn row_keys(&mut self, ys: &[Vec<i64>]) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        AuthorityClient::row_keys(self, ys)
    }
    fn col_keys(
        &mut self,
        batch: Option<BatchId>,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        match batch {
            Some(b) => self.bound_col_keys(b, false, ys),
            None => AuthorityClient::col_keys(self, ys),
        }
    }
    fn conv_row_keys(
        &mut self,
        req: ConvKeyRequest,
        placed: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        AuthorityClient::conv_row_keys(self, req, placed)
    }
    fn conv_col_keys(
        &mut self,
        batch: Option<BatchId>,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        match batch {
            Some(b) => self.bound_col_keys(b, true, ys),
            None => AuthorityClient::conv_col_keys(self, ys),
        }
    }
    fn febo_keys(
        &mut self,
        reqs: Vec<FeboKeyRequest>,
    ) -> Result<Vec<FeboFunctionKey<Curve>>, ProtocolError> {
        AuthorityClient::febo_keys(self, reqs)
    }
}

/// Where the time of the secure layer goes (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Reading and decoding encrypted batches (checksums, point decompression).
    pub io: Duration,
    /// Waiting for keys (request, derivation at the authority, transport).
    pub keys: Duration,
    /// Inner-product decryption of the forward pass, discrete logs included.
    pub forward: Duration,
    /// Inner-product decryption of the backward pass, discrete logs included.
    pub backward: Duration,
    /// Basic-operation decryption of the output error.
    pub output_error: Duration,
    /// Of `forward + backward`: time in discrete logs (summed over threads' sections, so it
    /// is a share of CPU time rather than of wall time).
    pub dlog_cpu: Duration,
    /// Of `forward + backward`: time in group arithmetic (same accounting as `dlog_cpu`).
    pub group_cpu: Duration,
    /// Keys received.
    pub keys_received: u64,
    /// Values decrypted.
    pub decryptions: u64,
    /// Batches read and decoded from the file: one per step when prefetching works.
    #[serde(default)]
    pub batches_read: u64,
    /// Backward products derived from a basis of the deltas instead of decrypted.
    #[serde(default)]
    pub derived: u64,
    /// Point additions (doublings included) of the bit-plane products, forward and backward.
    #[serde(default)]
    pub additions: u64,
    /// Values the forward pass decrypted (one per sample and unit, or per sample, position
    /// and kernel), for additions per value.
    #[serde(default)]
    pub forward_values: u64,
    /// Additions of the forward pass alone.
    #[serde(default)]
    pub forward_additions: u64,
}

/// Zeroes what the key policy would refuse, then delegates: wrap both the secure and the
/// simulated products in it. Dense first layer: weight rows and delta columns with too few
/// non-zero entries. Convolution: kernels that weigh too few pixels at some position
/// ([`Policy::placement_shortfall`]) and, per position and kernel, delta lanes over the batch
/// with too few non-zero entries (each is one column key).
///
/// Under a rank budget ([`Policy::batch_rank_budget`]) it also counts, per batch, the rank of
/// the delta lanes it has let through, as the authority does, and zeroes a lane that would
/// raise it past the budget (the lanes in the span already spent cost nothing). Once a
/// batch's budget is spent, the first layer learns from it only in the directions already
/// issued, and the other layers learn as before, so training goes on without a refusal.
/// This count is not in checkpoints, so the trainer refuses to resume a run under a budget
/// (a fresh count would ask for keys the authority refuses).
#[derive(Debug, Clone)]
pub struct KeyPolicyFilter<P> {
    inner: P,
    policy: Policy,
    spent: Option<SpentRank>,
}

/// The rank the column keys of each batch have spent, by the trainer's own count.
#[derive(Debug, Clone)]
struct SpentRank {
    prime: Prime,
    budget: usize,
    batches: HashMap<usize, BatchRank>,
}

impl SpentRank {
    /// Zeroes the lanes of batch `batch` past the budget, counting the rest.
    fn keep_within<'a>(
        &mut self,
        batch: usize,
        lanes: impl Iterator<Item = ndarray::ArrayViewMut1<'a, i64>>,
    ) {
        let rank = self.batches.entry(batch).or_default();
        for mut lane in lanes {
            let v = lane.to_vec();
            if v.iter().all(|x| *x == 0) {
                continue;
            }
            if rank.rank() < self.budget {
                rank.add(self.prime, &v);
            } else if rank.raises(self.prime, &v) {
                lane.fill(0);
            }
        }
    }
}

impl Timings {
    /// Adds a decryption's CPU split and additions from `stats` and its `values` decrypted,
    /// counted as the forward pass's when `forward`.
    fn note_decryption(&mut self, stats: &feip::DecryptStats, values: usize, forward: bool) {
        self.dlog_cpu += stats.dlog_time();
        self.group_cpu += stats.group_time();
        self.decryptions += values as u64;
        self.additions += stats.additions();
        if forward {
            self.forward_additions += stats.additions();
            self.forward_values += values as u64;
        }
    }

    /// What accrued since `before` (an earlier reading of the same counters).
    pub fn since(&self, before: &Timings) -> Timings {
        Timings {
            io: self.io.saturating_sub(before.io),
            keys: self.keys.saturating_sub(before.keys),
            forward: self.forward.saturating_sub(before.forward),
            backward: self.backward.saturating_sub(before.backward),
            output_error: self.output_error.saturating_sub(before.output_error),
            dlog_cpu: self.dlog_cpu.saturating_sub(before.dlog_cpu),
            group_cpu: self.group_cpu.saturating_sub(before.group_cpu),
            keys_received: self.keys_received.saturating_sub(before.keys_received),
            decryptions: self.decryptions.saturating_sub(before.decryptions),
            batches_read: self.batches_read.saturating_sub(before.batches_read),
            derived: self.derived.saturating_sub(before.derived),
            additions: self.additions.saturating_sub(before.additions),
            forward_values: self.forward_values.saturating_sub(before.forward_values),
            forward_additions: self
                .forward_additions
                .saturating_sub(before.forward_additions),
        }
    }

    /// Wall time of the secure layer (I/O, keys, decryptions).
    pub fn secure_total(&self) -> Duration {
        self.io + self.keys + self.forward + self.backward + self.output_error
    }
}

impl<P> KeyPolicyFilter<P> {
    /// Filters by `policy` (its lengths set: [`Policy::with_lengths`]).
    pub fn new(inner: P, policy: &Policy) -> Self {
        KeyPolicyFilter {
            inner,
            policy: policy.clone(),
            spent: policy.batch_rank_budget.map(|budget| SpentRank {
                prime: Prime::random(),
                budget,
                batches: HashMap::new(),
            }),
        }
    }
    /// The wrapped products.
    pub fn inner(&self) -> &P {
        &self.inner
    }
    /// The wrapped products, mutably.
    pub fn inner_mut(&mut self) -> &mut P {
        &mut self.inner
    }
}

/// Calls `f` on every delta lane of a convolution's deltas `d` (rows `b·P + pos`): the lane
/// of position `pos` and kernel `o` is every `P`-th entry of column `o`, from row `pos`.
fn for_each_conv_lane(
    d: &mut Array2<i64>,
    p: usize,
    mut f: impl FnMut(ndarray::ArrayViewMut1<'_, i64>),
) {
    for mut column in d.columns_mut() {
        for pos in 0..p.min(column.len()) {
            let step = ndarray::Slice::new(pos as isize, None, p as isize);
            f(column.slice_axis_mut(Axis(0), step));
        }
    }
}

/// Zeroes every lane (row or column) of `m` with fewer than `min` non-zero entries.
fn zero_sparse_lanes<'a>(lanes: impl Iterator<Item = ndarray::ArrayViewMut1<'a, i64>>, min: usize) {
    for mut lane in lanes {
        if lane.iter().filter(|x| **x != 0).count() < min {
            lane.fill(0);
        }
    }
}

impl<P: IntegerProducts> IntegerProducts for KeyPolicyFilter<P> {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let mut w = w_q.to_owned();
        match self.inner.patches().copied() {
            Some(g) => {
                for mut kernel in w.rows_mut() {
                    if self.policy.placement_shortfall(&g, kernel.view()).is_some() {
                        kernel.fill(0);
                    }
                }
            }
            None => zero_sparse_lanes(w.rows_mut().into_iter(), self.policy.min_row()),
        }
        self.inner.forward_int(batch, w.view())
    }
    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let mut d = delta_q.to_owned();
        let min_col = self.policy.min_nonzero_col;
        match self.inner.patches().map(|g| g.positions()) {
            // Rows b*P + pos: the lane of (pos, o) is every P-th entry of column o.
            Some(p) => {
                for_each_conv_lane(&mut d, p, |lane| {
                    zero_sparse_lanes(std::iter::once(lane), min_col)
                });
                if let Some(spent) = self.spent.as_mut() {
                    for_each_conv_lane(&mut d, p, |lane| {
                        spent.keep_within(batch, std::iter::once(lane))
                    });
                }
            }
            None => {
                zero_sparse_lanes(d.columns_mut().into_iter(), min_col);
                if let Some(spent) = self.spent.as_mut() {
                    spent.keep_within(batch, d.columns_mut().into_iter());
                }
            }
        }
        self.inner.backward_int(batch, d.view())
    }
    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.inner.output_error_int(batch, a_q)
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
    fn input_bound(&self) -> u32 {
        self.inner.input_bound()
    }
    fn patches(&self) -> Option<&nn::layers::Geometry> {
        self.inner.patches()
    }
}

/// The secure first layer: encrypted batches from a [`Reader`], keys from a [`KeyService`].
pub struct SecureProducts<K: KeyService> {
    reader: Arc<Mutex<Reader>>,
    num_batches: usize,
    batch_size: usize,
    pending: Option<Pending>,
    keys: K,
    params: PublicParams,
    dlog: Arc<DlogTable<Curve>>,
    current: Option<EncryptedBatch>,
    timings: Timings,
    /// The convolution of the first layer, `None` for a dense one.
    geometry: Option<nn::layers::Geometry>,
    /// The dataset whose batch keys the file's columns are under: column keys are asked for
    /// one batch of it.
    bound: Option<DatasetId>,
}

/// A batch being read and decoded on another thread.
struct Pending {
    batch: usize,
    handle: std::thread::JoinHandle<Result<EncryptedBatch, DatasetError>>,
}

/// The reader, also after a panic on the prefetch thread (every read seeks first, so a read
/// cut short leaves nothing behind).
fn lock(reader: &Mutex<Reader>) -> std::sync::MutexGuard<'_, Reader> {
    reader.lock().unwrap_or_else(|e| e.into_inner())
}

fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> SeamError {
    SeamError::backend(e)
}

impl<K: KeyService> SecureProducts<K> {
    /// The secure layer over `reader` (already checked against `params`).
    pub fn new(reader: Reader, keys: K, params: PublicParams, dlog: Arc<DlogTable<Curve>>) -> Self {
        SecureProducts {
            num_batches: reader.num_batches(),
            batch_size: reader.header().batch_size as usize,
            bound: reader.header().column_binding,
            reader: Arc::new(Mutex::new(reader)),
            pending: None,
            keys,
            params,
            dlog,
            current: None,
            timings: Timings::default(),
            geometry: None,
        }
    }

    /// The same products for a convolutional first layer of `geometry` (`None`: dense);
    /// fails unless the geometry's images are the encrypted rows (with their bias feature).
    pub fn with_patches(
        mut self,
        geometry: Option<&nn::layers::Geometry>,
    ) -> Result<Self, SeamError> {
        let n = self.params.row.params().n;
        if let Some(g) = geometry {
            if g.input().features() + 1 != n {
                return Err(SeamError::Shape {
                    what: "convolution input (features and bias)",
                    expected: (1, n),
                    got: (1, g.input().features() + 1),
                });
            }
        }
        self.geometry = geometry.copied();
        Ok(self)
    }

    /// The batch to bind column keys to: `batch` of the file's dataset if its columns are
    /// bound.
    fn key_batch(&self, batch: usize) -> Option<BatchId> {
        self.bound.map(|dataset| BatchId {
            dataset,
            batch: batch as u32,
        })
    }

    /// Cumulative timings.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The key service.
    pub fn key_service(&mut self) -> &mut K {
        &mut self.keys
    }

    /// Keys from the key service (none when `any` is false), timed and counted.
    fn fetch_keys(
        &mut self,
        any: bool,
        ask: impl FnOnce(&mut K) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError>,
    ) -> Result<Vec<FeipFunctionKey<Curve>>, SeamError> {
        let t = Instant::now();
        let keys = if any {
            ask(&mut self.keys).map_err(backend)?
        } else {
            Vec::new()
        };
        self.timings.keys += t.elapsed();
        self.timings.keys_received += keys.len() as u64;
        Ok(keys)
    }

    /// The decoded batch `batch`: the current one, the prefetched one, or read now. Time spent
    /// waiting here counts as I/O (a prefetch that finished in time costs nothing).
    fn load(&mut self, batch: usize) -> Result<&EncryptedBatch, SeamError> {
        if self.current.as_ref().map(|b| b.index as usize) != Some(batch) {
            let t = Instant::now();
            self.current = None;
            let loaded = match self.pending.take() {
                Some(p) if p.batch == batch => p.handle.join().map_err(|_| {
                    backend(std::io::Error::other("the batch reader thread panicked"))
                })?,
                other => {
                    // A prefetch of another batch stays queued: it is for a later step.
                    self.pending = other;
                    self.timings.batches_read += 1;
                    lock(&self.reader).batch(batch)
                }
            };
            self.current = Some(loaded.map_err(backend)?);
            self.timings.io += t.elapsed();
        }
        self.current.as_ref().ok_or(SeamError::NoSuchBatch {
            batch,
            num_batches: self.num_batches,
        })
    }
}

/// Indices of the non-zero vectors, and the vectors.
fn live_vectors<'a>(
    vs: impl Iterator<Item = ndarray::ArrayView1<'a, i64>>,
) -> (Vec<usize>, Vec<Vec<i64>>) {
    vs.enumerate()
        .filter(|(_, v)| v.iter().any(|x| *x != 0))
        .map(|(i, v)| (i, v.to_vec()))
        .unzip()
}

impl<K: KeyService> IntegerProducts for SecureProducts<K> {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        if let Some(g) = self.geometry {
            return self.conv_forward(&g, batch, w_q);
        }
        let rp = self.params.row.params();
        if w_q.ncols() != rp.n {
            return Err(SeamError::Shape {
                what: "quantized weights",
                expected: (w_q.nrows(), rp.n),
                got: w_q.dim(),
            });
        }
        let (idx, ys) = live_vectors(w_q.rows().into_iter());
        let keys = self.fetch_keys(!ys.is_empty(), |k| k.row_keys(&ys))?;
        let dlog = self.dlog.clone();
        let b = self.load(batch)?;
        let t = Instant::now();
        let stats = feip::DecryptStats::default();
        let m =
            feip::decrypt_matrix_with_stats(&rp, &b.rows, &keys, &dlog, &stats).map_err(backend)?;
        let mut out = Array2::<i64>::zeros((b.rows.len(), w_q.nrows()));
        for (s, row) in m.iter().enumerate() {
            for (k, &j) in idx.iter().enumerate() {
                out[[s, j]] = row[k];
            }
        }
        self.timings
            .note_decryption(&stats, m.len() * idx.len(), true);
        self.timings.forward += t.elapsed();
        Ok(out)
    }

    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        if let Some(g) = self.geometry {
            return self.conv_backward(&g, batch, delta_q);
        }
        let cp = self.params.col.params();
        let rows = self.params.row.params().n;
        if delta_q.nrows() != cp.n {
            return Err(SeamError::Shape {
                what: "quantized deltas",
                expected: (cp.n, delta_q.ncols()),
                got: delta_q.dim(),
            });
        }
        let (idx, ys) = live_vectors(delta_q.axis_iter(Axis(1)));
        // Keys only for a basis of the deltas when they are dependent (more units than
        // samples); the other columns' products follow exactly (see `crate::basis`).
        let t = Instant::now();
        let basis = Basis::find(&ys, cp.x_bound);
        let asked: Cow<'_, [Vec<i64>]> = match &basis {
            Some(basis) => Cow::Owned(basis.pivots().iter().map(|&k| ys[k].clone()).collect()),
            None => Cow::Borrowed(&ys),
        };
        self.timings.backward += t.elapsed();
        let bound = self.key_batch(batch);
        let keys = self.fetch_keys(!asked.is_empty(), |k| k.col_keys(bound, &asked))?;
        let dlog = self.dlog.clone();
        let b = self.load(batch)?;
        let t = Instant::now();
        let stats = feip::DecryptStats::default();
        let m =
            feip::decrypt_matrix_with_stats(&cp, &b.cols, &keys, &dlog, &stats).map_err(backend)?;
        self.timings
            .note_decryption(&stats, m.len() * asked.len(), false);
        let m = match &basis {
            Some(basis) => {
                self.timings.derived += (m.len() * (ys.len() - asked.len())) as u64;
                m.par_iter()
                    .map(|col| basis.expand(col))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?
            }
            None => m,
        };
        let mut out = Array2::<i64>::zeros((delta_q.ncols(), rows));
        for (i, col) in m.iter().enumerate() {
            for (k, &j) in idx.iter().enumerate() {
                out[[j, i]] = col[k];
            }
        }
        self.timings.backward += t.elapsed();
        Ok(out)
    }

    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let b = self.load(batch)?;
        let classes = b.labels.len() / b.rows.len().max(1);
        if a_q.dim() != (b.rows.len(), classes) {
            return Err(SeamError::Shape {
                what: "quantized predictions",
                expected: (b.rows.len(), classes),
                got: a_q.dim(),
            });
        }
        let reqs: Vec<FeboKeyRequest> = b
            .labels
            .iter()
            .zip(a_q.iter())
            .map(|(c, &a)| FeboKeyRequest {
                commitment: c.commitment().to_bytes(true).to_vec(),
                op: Op::Sub,
                operand: a,
            })
            .collect();
        let t = Instant::now();
        let keys = self.keys.febo_keys(reqs).map_err(backend)?;
        self.timings.keys += t.elapsed();
        self.timings.keys_received += keys.len() as u64;
        let dlog = self.dlog.clone();
        let b = self.load(batch)?;
        let t = Instant::now();
        let pairs: Vec<_> = b.labels.iter().zip(keys.iter()).collect();
        let v = febo::decrypt_many(&pairs, LABEL_SCALE as u64, &dlog).map_err(backend)?;
        let out = Array2::from_shape_vec(a_q.dim(), v.into_iter().map(|x| -x).collect())
            .map_err(backend)?;
        self.timings.output_error += t.elapsed();
        self.timings.decryptions += out.len() as u64;
        Ok(out)
    }

    fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// Reads and decodes `batch` on another thread (its point decoding joins the rayon pool),
    /// so that it is ready when the step after the current one starts.
    ///
    /// The training loop calls this at the start of a step, before it loads the step's own
    /// batch: a batch still queued from the previous call is that one, so it is kept (waiting
    /// for it here is waiting the step would do anyway), never dropped and read again.
    fn prefetch(&mut self, batch: usize) {
        let loaded = self.current.as_ref().map(|b| b.index as usize) == Some(batch);
        let queued = self.pending.as_ref().map(|p| p.batch) == Some(batch);
        if batch >= self.num_batches || loaded || queued {
            return;
        }
        if let Some(p) = self.pending.take() {
            let t = Instant::now();
            // A failed read is dropped here and read again (and reported) by `load`.
            if let Ok(Ok(b)) = p.handle.join() {
                self.current = Some(b);
            }
            self.timings.io += t.elapsed();
        }
        let reader = Arc::clone(&self.reader);
        self.timings.batches_read += 1;
        self.pending = Some(Pending {
            batch,
            handle: std::thread::spawn(move || lock(&reader).batch(batch)),
        });
    }

    fn batch_len(&self, batch: usize) -> usize {
        if batch < self.num_batches {
            self.batch_size
        } else {
            0
        }
    }

    fn input_bound(&self) -> u32 {
        self.params.dataset.x_bound
    }

    fn patches(&self) -> Option<&nn::layers::Geometry> {
        self.geometry.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// Records what it is asked and answers zeros.
    #[derive(Default)]
    struct Recorder {
        w: Option<Array2<i64>>,
        d: Option<Array2<i64>>,
        geometry: Option<nn::layers::Geometry>,
    }

    impl IntegerProducts for Recorder {
        fn forward_int(&mut self, _: usize, w: ArrayView2<i64>) -> Result<Array2<i64>, SeamError> {
            self.w = Some(w.to_owned());
            Ok(Array2::zeros((1, w.nrows())))
        }
        fn backward_int(&mut self, _: usize, d: ArrayView2<i64>) -> Result<Array2<i64>, SeamError> {
            self.d = Some(d.to_owned());
            Ok(Array2::zeros((d.ncols(), 1)))
        }
        fn output_error_int(
            &mut self,
            _: usize,
            a: ArrayView2<i64>,
        ) -> Result<Array2<i64>, SeamError> {
            Ok(a.to_owned())
        }
        fn num_batches(&self) -> usize {
            1
        }
        fn batch_len(&self, _: usize) -> usize {
            3
        }
        fn input_bound(&self) -> u32 {
            255
        }
        fn patches(&self) -> Option<&nn::layers::Geometry> {
            self.geometry.as_ref()
        }
    }

    #[test]
    fn timings_since_subtract_every_counter() {
        let before = Timings {
            forward: Duration::from_secs(2),
            additions: 10,
            forward_values: 3,
            ..Timings::default()
        };
        let now = Timings {
            forward: Duration::from_secs(5),
            backward: Duration::from_secs(1),
            additions: 25,
            forward_values: 4,
            ..Timings::default()
        };
        let d = now.since(&before);
        assert_eq!(d.forward, Duration::from_secs(3));
        assert_eq!(d.backward, Duration::from_secs(1));
        assert_eq!((d.additions, d.forward_values), (15, 1));
        assert_eq!(before.since(&now).forward, Duration::ZERO);
    }

    /// A convolution: kernels that weigh too few pixels somewhere are zeroed whole, and each
    /// (position, kernel) lane of the deltas over the batch is judged alone.
    #[test]
    fn policy_filter_judges_kernels_by_placement_and_deltas_by_lane() {
        // 1x2x2 images, a 1x1 window: 4 positions, one weight and the bias per kernel.
        let g = nn::layers::Geometry::new(
            "conv",
            nn::layers::ImageShape::new(1, 2, 2).expect("shape"),
            nn::layers::Window::new(1, 1, 0),
        )
        .expect("geometry");
        let policy = Policy {
            min_nonzero_row: Some(1),
            min_nonzero_col: 2,
            ..Policy::default()
        };
        let recorder = Recorder {
            geometry: Some(g),
            ..Recorder::default()
        };
        let mut f = KeyPolicyFilter::new(recorder, &policy);
        f.forward_int(0, array![[0, 5], [3, 0]].view())
            .expect("forward");
        assert_eq!(f.inner().w, Some(array![[0, 0], [3, 0]]));
        // 4 positions; rows b*4 + pos for 3 samples, 1 kernel: lane pos 1 has 3 non-zeros,
        // lane 2 has 1, lane 0 has 2, lane 3 none.
        let d = array![[1], [1], [0], [0], [1], [1], [7], [0], [0], [1], [0], [0]];
        f.backward_int(0, d.view()).expect("backward");
        assert_eq!(
            f.inner().d,
            Some(array![
                [1],
                [1],
                [0],
                [0],
                [1],
                [1],
                [0],
                [0],
                [0],
                [1],
                [0],
                [0]
            ])
        );
    }

    /// Under a rank budget the filter lets lanes through until the batch's rank reaches it,
    /// then only lanes in the span already spent; batches are counted apart.
    #[test]
    fn policy_filter_keeps_each_batch_within_its_rank_budget() {
        let policy = Policy {
            bind_batches: true,
            batch_rank_budget: Some(2),
            ..Policy::default()
        }
        .with_lengths(4, 3);
        let mut f = KeyPolicyFilter::new(Recorder::default(), &policy);
        // Columns: e0+e1, e1+e2, their sum (in their span), e0+e2 (outside it) and zeros.
        let d = array![[1, 0, 1, 1, 0], [1, 1, 2, 0, 0], [0, 1, 1, 1, 0]];
        f.backward_int(0, d.view()).expect("filtered");
        let seen = f.inner().d.clone().expect("deltas seen");
        assert_eq!(seen.column(0), d.column(0));
        assert_eq!(seen.column(1), d.column(1));
        assert_eq!(seen.column(2), d.column(2), "in the span: kept");
        assert!(
            seen.column(3).iter().all(|v| *v == 0),
            "past the budget: zeroed"
        );
        // Later steps of batch 0: still only the span; batch 1 starts afresh.
        f.backward_int(0, d.view()).expect("filtered");
        assert_eq!(f.inner().d.clone().expect("deltas seen"), seen);
        let tail = d.slice_axis(Axis(1), ndarray::Slice::from(3..)).to_owned();
        f.backward_int(1, tail.view()).expect("filtered");
        let other = f.inner().d.clone().expect("deltas seen");
        assert_eq!(other.column(0), d.column(3));
    }

    #[test]
    fn policy_filter_zeroes_exactly_the_sparse_lanes() {
        let policy = Policy {
            min_nonzero_row: Some(2),
            min_nonzero_col: 2,
            ..Policy::default()
        };
        let mut f = KeyPolicyFilter::new(Recorder::default(), &policy);
        f.forward_int(0, array![[1, 0, 0], [1, 2, 0], [0, 0, 0]].view())
            .expect("forward");
        assert_eq!(f.inner().w, Some(array![[0, 0, 0], [1, 2, 0], [0, 0, 0]]));
        // deltas (B x H): column 0 has one non-zero, column 1 two, column 2 three
        f.backward_int(0, array![[5, 1, 1], [0, -1, 1], [0, 0, 1]].view())
            .expect("backward");
        assert_eq!(f.inner().d, Some(array![[0, 1, 1], [0, -1, 1], [0, 0, 1]]));
    }
}
