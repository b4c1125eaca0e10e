//! A convolutional first layer over encrypted images.
//!
//! With `O` kernels `w_o` (`K` weights and a bias weight) at `P` positions, and
//! `src(pos, k)` the pixel that patch entry `k` reads at `pos` (none in the padding; the bias
//! entry reads the bias feature `n`):
//!
//! * **forward**: the authority places every live kernel at every position
//!   ([`crate::protocol::Request::ConvRowKeys`]); one key per placed kernel decrypts
//!   `z[b·P + pos, o] = ⟨placed(w_o, pos), x_b⟩` from sample `b`'s row ciphertext;
//! * **backward**: one column key per position and kernel, for the lane
//!   `v_{pos,o} = (δ[b·P + pos, o])_b` over the batch
//!   ([`crate::protocol::Request::ConvColKeys`]), and
//!
//!   ```text
//!   grad[o, k] = Σ_b Σ_pos δ[b·P + pos, o] · x_b[src(pos, k)] = Σ_pos ⟨v_{pos,o}, col_{src(pos,k)}⟩
//!   ```
//!
//!   summed in the group before one discrete log per kernel weight ([`fe::sums`]).
//!
//! Both give exactly the integers of the plain patch-matrix products
//! ([`nn::first_layer::PlainIntegers::with_patches`]).

use super::{backend, live_vectors, KeyService, SecureProducts};
use crate::protocol::ConvKeyRequest;
use fe::feip;
use fe::sums::{self, Term};
use ndarray::{Array2, ArrayView2, Axis, Slice};
use nn::first_layer::SeamError;
use nn::layers::Geometry;
use std::time::Instant;

impl<K: KeyService> SecureProducts<K> {
    /// The forward products of a convolution: `(B·P, O)`, row `b·P + pos`.
    pub(super) fn conv_forward(
        &mut self,
        g: &Geometry,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let (p, o) = (g.positions(), w_q.nrows());
        if w_q.ncols() != g.patch_len() + 1 {
            return Err(SeamError::Shape {
                what: "quantized kernels",
                expected: (o, g.patch_len() + 1),
                got: w_q.dim(),
            });
        }
        let (idx, live) = live_vectors(w_q.rows().into_iter());
        let kernels = w_q.select(Axis(0), &idx);
        let placed = nn::infer::place_kernels(g, kernels.view())
            .ok_or_else(|| backend(std::io::Error::other("kernels do not fit the window")))?;
        let rows: Vec<Vec<i64>> = placed.rows().into_iter().map(|r| r.to_vec()).collect();
        let request = ConvKeyRequest::new(g, kernels.view()).map_err(backend)?;
        let keys = self.fetch_keys(!live.is_empty(), |k| k.conv_row_keys(request, &rows))?;
        let rp = self.params.row.params();
        let dlog = self.dlog.clone();
        let b = self.load(batch)?;
        let samples = b.rows.len();
        let t = Instant::now();
        let mut out = Array2::<i64>::zeros((samples * p, o));
        let stats = feip::DecryptStats::default();
        if !keys.is_empty() {
            let m = feip::decrypt_matrix_with_stats(&rp, &b.rows, &keys, &dlog, &stats)
                .map_err(backend)?;
            // Key `pos·O' + i` is live kernel `i` placed at `pos`.
            for (s, values) in m.iter().enumerate() {
                for (r, &v) in values.iter().enumerate() {
                    out[[s * p + r / idx.len(), idx[r % idx.len()]]] = v;
                }
            }
        }
        self.timings
            .note_decryption(&stats, samples * keys.len(), true);
        self.timings.forward += t.elapsed();
        Ok(out)
    }

    /// The kernel gradients of a convolution: `(O, K + 1)` from deltas `(B·P, O)`.
    pub(super) fn conv_backward(
        &mut self,
        g: &Geometry,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let cp = self.params.col.params();
        let (p, o, k) = (g.positions(), delta_q.ncols(), g.patch_len());
        if delta_q.nrows() != cp.n * p {
            return Err(SeamError::Shape {
                what: "quantized deltas",
                expected: (cp.n * p, o),
                got: delta_q.dim(),
            });
        }
        let t = Instant::now();
        // Lane (pos, o): every P-th entry of column o from row pos.
        let lanes = (0..p).flat_map(|pos| {
            (0..o).map(move |j| {
                delta_q
                    .index_axis_move(Axis(1), j)
                    .slice_axis_move(Axis(0), Slice::new(pos as isize, None, p as isize))
            })
        });
        let (live, ys) = live_vectors(lanes);
        let mut key_of = vec![None; p * o];
        for (i, &lane) in live.iter().enumerate() {
            key_of[lane] = Some(i as u32);
        }
        let n = g.input().features();
        let sums: Vec<Vec<Term>> = (0..o)
            .flat_map(|j| (0..=k).map(move |col| (j, col)))
            .map(|(j, col)| {
                (0..p)
                    .filter_map(|pos| {
                        let key = key_of[pos * o + j]?;
                        let src = if col == k {
                            Some(n)
                        } else {
                            g.source(pos, col)
                        }?;
                        Some(Term {
                            ct: src as u32,
                            key,
                        })
                    })
                    .collect()
            })
            .collect();
        self.timings.backward += t.elapsed();
        let bound = self.key_batch(batch);
        let keys = self.fetch_keys(!ys.is_empty(), |k| k.conv_col_keys(bound, &ys))?;
        let dlog = self.dlog.clone();
        let b = self.load(batch)?;
        let t = Instant::now();
        let stats = feip::DecryptStats::default();
        let values =
            sums::decrypt_sums(&cp, &b.cols, &keys, &sums, &dlog, &stats).map_err(backend)?;
        self.timings.note_decryption(&stats, values.len(), false);
        self.timings.backward += t.elapsed();
        Array2::from_shape_vec((o, k + 1), values).map_err(backend)
    }
}
