//! Sums of inner products decrypted in the group: one discrete log per sum.
//!
//! A convolution's kernel gradient is a sum over window positions of inner products, each
//! between one column ciphertext and the key of one position's deltas:
//! `g = Σ_t ⟨x_{c_t}, y_{k_t}⟩`. Decrypting every term and adding the integers would take one
//! discrete log per term; since FEIP decryption is linear in the group,
//!
//! ```text
//! Σ_t D_t = Σ_t (Σ_i y_{k_t,i} C_{c_t,i} − sk_{k_t}·C_{c_t,0}) = (Σ_t ⟨x_{c_t}, y_{k_t}⟩)·G
//! ```
//!
//! and one discrete log of the summed point gives `g` (within `Σ_t x_bound·‖y_{k_t}‖₁`).
//!
//! The products are computed as in [`crate::feip`]'s bit-plane decryption, with every term's
//! `−sk·C_0` written as signed base-`2^b` digits on the points `2^(bj)·C_0`: the ciphertexts
//! are cut into groups (about four per thread), and each group is one subset-sum product
//! ([`crate::msm::subset_sum_products`]) over its ciphertexts' points, with one coefficient row
//! per sum that touches it. The rows of a group share its tables, so a ciphertext used by many
//! sums costs its tables once; the groups' points are added per sum, then solved together.
//!
//! A sum may use a ciphertext several times (a convolution's bias gradient uses the bias
//! column at every position): each further use is another row of its group.

use crate::dlog::DlogTable;
use crate::encoding::bound_for_key;
use crate::error::{FeError, Result};
use crate::feip::{DecryptStats, FeipCiphertext, FeipFunctionKey, FeipParams};
use crate::group::{FeCurve, RawPoint};
use crate::msm::{double_k, recode_scalar, scalar_digits, subset_sum_products, BitPlanes};
use curv::elliptic::curves::ECPoint;
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// One term of a sum: ciphertext `ct` decrypted with key `key` (indices into the slices given
/// to [`decrypt_sums`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// Index of the ciphertext.
    pub ct: u32,
    /// Index of the key.
    pub key: u32,
}

/// Largest bits per key entry (as the bit-plane decryption of [`crate::feip`]).
const MAX_BITS: usize = 24;
/// Most coefficient entries (rows times points) of one group: 32 MiB of `i64`.
const GROUP_ENTRIES: usize = 1 << 22;

/// Decrypts `out[s] = Σ_{t ∈ sums[s]} ⟨x_{t.ct}, y_{t.key}⟩` with one discrete log per sum.
///
/// Fails if a ciphertext or key has another length than `params.n`, an index is out of
/// range, a sum's bound exceeds the solver's limit (all
/// checked before any group work), or a sum's point is not within its bound (a tampered
/// ciphertext or a key for another vector). Time and point additions go to `stats`.
pub fn decrypt_sums<E: FeCurve>(
    params: &FeipParams,
    cts: &[FeipCiphertext<E>],
    keys: &[FeipFunctionKey<E>],
    sums: &[Vec<Term>],
    dlog: &DlogTable<E>,
    stats: &DecryptStats,
) -> Result<Vec<i64>> {
    let bounds = check(params, cts, keys, sums, dlog)?;
    let (lo, hi) = keys
        .iter()
        .flat_map(|k| k.vector().iter().copied())
        .fold((0i64, 0i64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let bits = BitPlanes::bits_for(lo, hi);
    if bits > MAX_BITS {
        return Err(FeError::OutOfRange {
            what: "key entry",
            value: i128::from(lo.min(-hi)),
            bound: 1 << (MAX_BITS - 1),
        });
    }
    let started = Instant::now();
    // Per ciphertext, the (sum, key) pairs that use it.
    let mut uses: Vec<Vec<(u32, u32)>> = vec![Vec::new(); cts.len()];
    for (s, terms) in sums.iter().enumerate() {
        for t in terms {
            uses[t.ct as usize].push((s as u32, t.key));
        }
    }
    let groups = (rayon::current_num_threads() * 4).clamp(1, cts.len().max(1));
    let per = cts.len().div_ceil(groups).max(1);
    let points_per_ct = params.n + scalar_digits::<E>(bits);
    let partials: Vec<(Vec<u32>, Vec<RawPoint<E>>, usize)> = cut_groups(&uses, points_per_ct, per)
        .into_par_iter()
        .map(|range| group_products(params.n, &cts[range.clone()], &uses[range], keys, bits))
        .collect();
    let mut totals = vec![E::Point::zero(); sums.len()];
    let mut additions = 0;
    for (touched, points, adds) in partials {
        additions += adds;
        for (s, p) in touched.iter().zip(&points) {
            totals[*s as usize].add_point_assign(p);
        }
    }
    stats.add_group(started, additions as u64);
    let started = Instant::now();
    let out = dlog
        .solve_batch(&totals, &bounds)
        .into_iter()
        .collect::<Result<Vec<i64>>>();
    stats.add_dlog(started);
    out
}

/// Checks lengths, indices and bounds; returns each sum's bound.
fn check<E: FeCurve>(
    params: &FeipParams,
    cts: &[FeipCiphertext<E>],
    keys: &[FeipFunctionKey<E>],
    sums: &[Vec<Term>],
    dlog: &DlogTable<E>,
) -> Result<Vec<u64>> {
    for ct in cts {
        params.check_len("ciphertext", ct.elements().len())?;
    }
    for k in keys {
        params.check_len("key vector", k.vector().len())?;
    }
    let key_bounds: Vec<u128> = keys
        .iter()
        .map(|k| bound_for_key(k.vector(), params.x_bound))
        .collect();
    sums.iter()
        .map(|terms| {
            let mut bound = 0u128;
            for t in terms {
                let (c, k) = (t.ct as usize, t.key as usize);
                if c >= cts.len() {
                    return Err(out_of_range("ciphertext index", c, cts.len()));
                }
                if k >= keys.len() {
                    return Err(out_of_range("key index", k, keys.len()));
                }
                bound += key_bounds[k];
            }
            dlog.check_bound(bound)?;
            Ok(bound as u64)
        })
        .collect()
}

fn out_of_range(what: &'static str, value: usize, len: usize) -> FeError {
    FeError::OutOfRange {
        what,
        value: value as i128,
        bound: len as i128 - 1,
    }
}

/// One group of ciphertexts: for every row, the sum it belongs to and its partial point,
/// and the additions.
///
/// Points: every ciphertext's elements, then every ciphertext's `2^(bj)·C_0`. A row holds, at
/// the ciphertexts it uses, a key's entries and the digits of that key's `−sk`; a sum has one
/// row per use of its most used ciphertext in the group (usually one row).
fn group_products<E: FeCurve>(
    n: usize,
    cts: &[FeipCiphertext<E>],
    uses: &[Vec<(u32, u32)>],
    keys: &[FeipFunctionKey<E>],
    bits: usize,
) -> (Vec<u32>, Vec<RawPoint<E>>, usize) {
    let digits = scalar_digits::<E>(bits);
    let y_len = cts.len() * n;
    let width = y_len + cts.len() * digits;
    // Row `rows_of[s][i]` takes the i-th use by sum `s` of each ciphertext.
    let mut rows_of: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut row_sum: Vec<u32> = Vec::new();
    let mut rows: Vec<Vec<i64>> = Vec::new();
    for (c, pairs) in uses.iter().enumerate() {
        let mut used: HashMap<u32, usize> = HashMap::new();
        for &(s, k) in pairs {
            let i = used.entry(s).or_insert(0);
            let list = rows_of.entry(s).or_default();
            if *i == list.len() {
                list.push(rows.len());
                rows.push(vec![0i64; width]);
                row_sum.push(s);
            }
            let row = &mut rows[list[*i]];
            *i += 1;
            let key = &keys[k as usize];
            row[c * n..(c + 1) * n].copy_from_slice(key.vector());
            let d = recode_scalar(&-key.secret().clone(), bits);
            for (slot, v) in row[y_len + c * digits..].iter_mut().zip(d) {
                *slot = i64::from(v);
            }
        }
    }
    if rows.is_empty() {
        return (row_sum, Vec::new(), 0);
    }
    let mut points: Vec<RawPoint<E>> = cts
        .iter()
        .flat_map(|ct| ct.elements().iter().map(|p| p.as_raw().clone()))
        .collect();
    for ct in cts {
        let mut q = ct.c0().as_raw().clone();
        for _ in 0..digits {
            points.push(q.clone());
            double_k::<E>(&mut q, bits);
        }
    }
    let planes = BitPlanes::new(&rows, bits, &[y_len], false);
    let additions = planes.additions() + cts.len() * digits * bits;
    let out = subset_sum_products::<E>(&points, &planes, 0..rows.len());
    (row_sum, out, additions)
}

/// Cuts the ciphertexts into consecutive groups: at most `per` each, and at most
/// [`GROUP_ENTRIES`] coefficient entries (rows times points), estimating a group's rows by
/// its most used ciphertext.
fn cut_groups(uses: &[Vec<(u32, u32)>], points_per_ct: usize, per: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut from, mut rows) = (0, 0);
    for (c, u) in uses.iter().enumerate() {
        let new_rows = rows.max(u.len());
        let count = c - from + 1;
        if count > 1 && (count > per || new_rows * count * points_per_ct > GROUP_ENTRIES) {
            out.push(from..c);
            from = c;
            rows = u.len();
        } else {
            rows = new_rows;
        }
    }
    if from < uses.len() {
        out.push(from..uses.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feip::{self, FeipEncryptor};
    use crate::Ristretto;
    use proptest::prelude::*;

    type E = Ristretto;

    fn setup(
        n: usize,
        xs: &[Vec<i64>],
        ys: &[Vec<i64>],
    ) -> (FeipParams, Vec<FeipCiphertext<E>>, Vec<FeipFunctionKey<E>>) {
        let params = FeipParams::new(n, 255).expect("valid test input");
        let (pk, msk) = feip::setup::<E>(params);
        let cts = FeipEncryptor::new(&pk)
            .encrypt_many(xs)
            .expect("valid test input");
        let keys = msk.derive_keys(ys).expect("valid test input");
        (params, cts, keys)
    }

    fn dot(x: &[i64], y: &[i64]) -> i64 {
        x.iter().zip(y).map(|(a, b)| a * b).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Every sum equals the sum of the plain inner products of its terms.
        #[test]
        fn sums_equal_plain_sums(
            n in 1usize..6,
            xs in prop::collection::vec(prop::collection::vec(0i64..=255, 6), 1..7),
            ys in prop::collection::vec(prop::collection::vec(-128i64..128, 6), 1..5),
            picks in prop::collection::vec(prop::collection::vec((0u32..7, 0u32..5), 0..6), 0..5),
        ) {
            let xs: Vec<Vec<i64>> = xs.into_iter().map(|x| x[..n].to_vec()).collect();
            let ys: Vec<Vec<i64>> = ys.into_iter().map(|y| y[..n].to_vec()).collect();
            let (params, cts, keys) = setup(n, &xs, &ys);
            let dlog = DlogTable::<E>::new(1 << 10).expect("valid test input");
            // Sums may use a ciphertext several times.
            let sums: Vec<Vec<Term>> = picks
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|&(c, k)| Term { ct: c % xs.len() as u32, key: k % ys.len() as u32 })
                        .collect()
                })
                .collect();
            let stats = DecryptStats::default();
            let got = decrypt_sums(&params, &cts, &keys, &sums, &dlog, &stats).expect("valid test input");
            let want: Vec<i64> = sums
                .iter()
                .map(|s| s.iter().map(|t| dot(&xs[t.ct as usize], &ys[t.key as usize])).sum())
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_heavily_used_ciphertext_gets_a_small_group() {
        let mut uses = vec![vec![(0u32, 0u32); 150]; 20];
        uses[12] = vec![(0, 0); 1 << 15];
        let groups = cut_groups(&uses, 96, 8);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 20);
        assert!(groups.iter().all(|g| g.len() <= 8));
        let heavy = groups
            .iter()
            .find(|g| g.contains(&12))
            .expect("valid test input");
        assert!(heavy.len() * 96 * (1 << 15) <= GROUP_ENTRIES || heavy.len() == 1);
        assert!(cut_groups(&[], 96, 8).is_empty());
    }

    #[test]
    fn bad_input_is_refused_before_any_work() {
        let xs = vec![vec![1, 2, 3], vec![4, 5, 6]];
        let ys = vec![vec![1, -1, 2]];
        let (params, cts, keys) = setup(3, &xs, &ys);
        let dlog = DlogTable::<E>::new(1 << 8).expect("valid test input");
        let stats = DecryptStats::default();
        let run = |sums: &[Vec<Term>]| decrypt_sums(&params, &cts, &keys, sums, &dlog, &stats);
        let t = |ct, key| Term { ct, key };
        assert!(matches!(
            run(&[vec![t(2, 0)]]),
            Err(FeError::OutOfRange { .. })
        ));
        assert!(matches!(
            run(&[vec![t(0, 1)]]),
            Err(FeError::OutOfRange { .. })
        ));
        assert_eq!(
            run(&[vec![t(0, 0), t(0, 0), t(1, 0)]]).expect("valid test input"),
            vec![5 + 5 + 11]
        );
        assert_eq!(
            run(&[vec![t(0, 0), t(1, 0)], vec![]]).expect("valid test input"),
            vec![5 + 11, 0]
        );
        let small = DlogTable::<E>::new(1 << 4)
            .expect("valid test input")
            .with_limit(100);
        assert!(matches!(
            decrypt_sums(&params, &cts, &keys, &[vec![t(0, 0)]], &small, &stats),
            Err(FeError::BoundTooLarge { .. })
        ));
        let short = FeipParams::new(2, 255).expect("valid test input");
        assert!(decrypt_sums(&short, &cts, &keys, &[vec![]], &dlog, &stats).is_err());
    }

    #[test]
    fn a_tampered_ciphertext_fails_its_sums_only_as_an_error() {
        let xs = vec![vec![1, 2, 3], vec![4, 5, 6]];
        let ys = vec![vec![1, -1, 2]];
        let (params, mut cts, keys) = setup(3, &xs, &ys);
        let dlog = DlogTable::<E>::new(1 << 8).expect("valid test input");
        let mut elements = cts[1].elements().to_vec();
        elements[0] = elements[0].clone()
            + curv::elliptic::curves::Point::<E>::generator()
                * curv::elliptic::curves::Scalar::<E>::from(1_000_003u64);
        cts[1] = FeipCiphertext::from_parts(cts[1].c0().clone(), elements);
        let stats = DecryptStats::default();
        let t = |ct, key| Term { ct, key };
        assert!(matches!(
            decrypt_sums(
                &params,
                &cts,
                &keys,
                &[vec![t(0, 0), t(1, 0)]],
                &dlog,
                &stats
            ),
            Err(FeError::DlogNotFound { .. })
        ));
        assert!(stats.additions() > 0);
    }
}
