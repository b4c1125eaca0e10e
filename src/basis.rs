//! Fewer backward decryptions: decrypt for a basis of the deltas, derive the rest exactly.
//!
//! The backward step needs `g_kj = ⟨δ_k, x_j⟩` for every delta column `δ_k` (one per hidden
//! unit, `H` of them) and every pixel column `x_j` of the batch (length `B`). The `δ_k` lie in
//! `Z^B`, so with `H > B` (128 units, batch 64) they are linearly dependent, and so are the
//! `g_kj`:
//!
//! Let `R` be the samples on which some delta is non-zero, less those whose delta row is a
//! rational multiple of an earlier sample's (an exact integer test), and `S` a set of `|R|`
//! columns whose restriction `δ_S|R` is an invertible matrix. Then every column is a rational
//! combination `δ_k = Σ_(s∈S) c_ks·δ_s` on `R`, hence on the rows left out (multiples of rows
//! of `R`) and off the live samples (all zero), and for every ciphertext
//! `g_kj = Σ_(s∈S) c_ks·g_sj`: keys for the `|R|` columns of `S` and their decryptions give
//! all `H` products.
//!
//! The arithmetic is modulo the prime `p = 2^61 − 1`. Gauss–Jordan elimination mod `p` picks
//! the pivot columns `S`; columns independent mod `p` are independent over `Q` (a rational
//! dependency with coprime integer coefficients stays a dependency mod `p`), so `|S| = |R|`
//! pivots *prove* that `δ_S|R` is invertible over `Q`. The `c_ks` have denominators dividing
//! `det δ_S|R`, a unit mod `p`, so their residues are the reduced-echelon entries, and
//! `g_kj ≡ Σ c_ks·g_sj (mod p)` with `|g_kj| < p/2` gives `g_kj` exactly. When elimination
//! finds fewer than `|R|` pivots (which includes every case of rank below `|R|` over `Q`),
//! no basis is claimed and the caller decrypts every column: the result is never a guess.
//!
//! The trainer learns nothing it would not learn otherwise: the derived `g_kj` are the very
//! products that decrypting every column would give (the README's threat model discusses what
//! `δᵀX` reveals).

use fe::encoding::bound_for_key;
use thiserror::Error;

/// The prime modulus, `2^61 − 1`.
const P: u64 = (1 << 61) - 1;

/// A derived product outside its bound: the decrypted values are not products of these
/// deltas with data in range (a tampered ciphertext), or the caller mixed up its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("derived product for column {column} is {value}, beyond its bound {bound}")]
pub struct OutOfBound {
    /// The column whose derived product is out of bound.
    pub column: usize,
    /// The derived value.
    pub value: i64,
    /// The bound `Σ_b |δ_kb| · x_bound`.
    pub bound: u64,
}

/// The pivot columns to decrypt and, for every other column, its coefficients over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basis {
    /// The pivot columns, increasing.
    pivots: Vec<usize>,
    /// The other columns, increasing, each with its coefficients over `pivots` (mod `p`).
    derived: Vec<(usize, Vec<u64>)>,
    /// Per column: `Σ_b |δ_kb| · x_bound`.
    bounds: Vec<u64>,
}

impl Basis {
    /// Finds a basis of `columns` (each of the batch length) for data with `|x| ≤ x_bound`.
    ///
    /// `None` when it would not save a decryption (no column is derived), when elimination
    /// mod `p` finds fewer pivots than there are samples with non-zero deltas that are not
    /// multiples of another sample's, or when a product could reach `p/2`.
    pub fn find(columns: &[Vec<i64>], x_bound: u64) -> Option<Basis> {
        let len = columns.first().map_or(0, Vec::len);
        if columns.iter().any(|c| c.len() != len) {
            return None;
        }
        let bounds = columns
            .iter()
            .map(|c| {
                u64::try_from(bound_for_key(c, x_bound))
                    .ok()
                    .filter(|&b| b < P / 2)
            })
            .collect::<Option<Vec<u64>>>()?;
        // The samples with some non-zero delta, less those whose deltas are a multiple of an
        // earlier sample's (sparse deltas make such pairs common): the rows to reduce.
        let mut seen = std::collections::HashSet::new();
        let mut a: Vec<Vec<u64>> = (0..len)
            .map(|b| columns.iter().map(|c| c[b]).collect::<Vec<i64>>())
            .filter(|row| primitive(row).is_some_and(|p| seen.insert(p)))
            .map(|row| row.into_iter().map(residue).collect())
            .collect();
        let rows = a.len();
        let pivots = reduce_rows(&mut a);
        if pivots.len() < rows || pivots.len() == columns.len() {
            return None;
        }
        // In reduced echelon form, row i of column k is k's coefficient on pivot i.
        let derived = (0..columns.len())
            .filter(|k| pivots.binary_search(k).is_err())
            .map(|k| (k, a.iter().map(|row| row[k]).collect()))
            .collect();
        Some(Basis {
            pivots,
            derived,
            bounds,
        })
    }

    /// The columns to decrypt, in increasing order.
    pub fn pivots(&self) -> &[usize] {
        &self.pivots
    }

    /// Number of columns.
    pub fn columns(&self) -> usize {
        self.bounds.len()
    }

    /// Every column's product from the pivots' products (`at_pivots[i]` for `pivots()[i]`).
    ///
    /// # Panics
    /// If `at_pivots` does not have one value per pivot.
    pub fn expand(&self, at_pivots: &[i64]) -> Result<Vec<i64>, OutOfBound> {
        assert_eq!(at_pivots.len(), self.pivots.len(), "one value per pivot");
        let mut out = vec![0i64; self.columns()];
        for (&k, &v) in self.pivots.iter().zip(at_pivots) {
            out[k] = v;
        }
        let residues: Vec<u64> = at_pivots.iter().map(|&v| residue(v)).collect();
        for (k, coeffs) in &self.derived {
            let value = lift(dot_mod(coeffs, &residues));
            let bound = self.bounds[*k];
            if value.unsigned_abs() > bound {
                return Err(OutOfBound {
                    column: *k,
                    value,
                    bound,
                });
            }
            out[*k] = value;
        }
        Ok(out)
    }
}

/// Gauss–Jordan elimination mod `p` in place; returns the pivot columns (at most one per row).
/// Afterwards row `i` has a 1 in pivot column `i` and every pivot column is zero elsewhere.
fn reduce_rows(a: &mut [Vec<u64>]) -> Vec<usize> {
    let rows = a.len();
    let cols = a.first().map_or(0, Vec::len);
    let mut pivots = Vec::new();
    for col in 0..cols {
        let r = pivots.len();
        if r == rows {
            break;
        }
        let Some(found) = (r..rows).find(|&i| a[i][col] != 0) else {
            continue;
        };
        a.swap(r, found);
        let inv = inverse(a[r][col]);
        for v in a[r][col..].iter_mut() {
            *v = mul_mod(*v, inv);
        }
        let pivot_row = a[r].clone();
        for (i, row) in a.iter_mut().enumerate() {
            let f = row[col];
            if i == r || f == 0 {
                continue;
            }
            for (v, &p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v = sub_mod(*v, mul_mod(f, p));
            }
        }
        pivots.push(col);
    }
    pivots
}

/// The primitive integer vector on the line of `v` (divided by the gcd of its entries, first
/// non-zero entry positive); `None` for the zero vector. Two vectors are rational multiples of
/// each other exactly when their primitive vectors are equal.
fn primitive(v: &[i64]) -> Option<Vec<i128>> {
    let g = i128::from(v.iter().fold(0u64, |g, x| gcd(g, x.unsigned_abs())));
    let sign: i128 = if *v.iter().find(|x| **x != 0)? < 0 {
        -1
    } else {
        1
    };
    Some(v.iter().map(|&x| sign * i128::from(x) / g).collect())
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `v mod p` in `0..p`.
fn residue(v: i64) -> u64 {
    v.rem_euclid(P as i64) as u64
}

/// The representative of `r` in `(−p/2, p/2)`.
fn lift(r: u64) -> i64 {
    if r > P / 2 {
        r as i64 - P as i64
    } else {
        r as i64
    }
}

/// `x mod p` for any `x < 2^128`, using `2^61 ≡ 1`.
fn fold(x: u128) -> u64 {
    let s = (x as u64 & P) + ((x >> 61) as u64 & P) + (x >> 122) as u64;
    let t = (s & P) + (s >> 61);
    if t >= P {
        t - P
    } else {
        t
    }
}

fn mul_mod(a: u64, b: u64) -> u64 {
    fold(u128::from(a) * u128::from(b))
}

fn sub_mod(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + P - b
    }
}

/// `Σ a_i·b_i mod p`, 32 products (each below `2^122`) summed before each reduction.
fn dot_mod(a: &[u64], b: &[u64]) -> u64 {
    a.chunks(32).zip(b.chunks(32)).fold(0, |acc, (x, y)| {
        let s: u128 = x
            .iter()
            .zip(y)
            .map(|(&u, &v)| u128::from(u) * u128::from(v))
            .sum();
        let t = acc + fold(s);
        if t >= P {
            t - P
        } else {
            t
        }
    })
}

/// `a^(p−2) = a^(−1) mod p` for `a ≠ 0`.
fn inverse(a: u64) -> u64 {
    let (mut base, mut e, mut r) = (a, P - 2, 1u64);
    while e > 0 {
        if e & 1 == 1 {
            r = mul_mod(r, base);
        }
        base = mul_mod(base, base);
        e >>= 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `⟨δ_k, x⟩` for every column.
    fn products(columns: &[Vec<i64>], x: &[i64]) -> Vec<i64> {
        columns
            .iter()
            .map(|c| c.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn check_expansion(columns: &[Vec<i64>], xs: &[Vec<i64>], x_bound: u64) -> Option<Basis> {
        let basis = Basis::find(columns, x_bound)?;
        for x in xs {
            let all = products(columns, x);
            let at: Vec<i64> = basis.pivots().iter().map(|&k| all[k]).collect();
            assert_eq!(basis.expand(&at), Ok(all));
        }
        Some(basis)
    }

    /// Deltas of `b` samples and `h` columns with entries in `-m..=m`, about `density` non-zero.
    fn deltas(b: usize, h: usize, m: i64) -> impl Strategy<Value = Vec<Vec<i64>>> {
        let entry = prop_oneof![2 => Just(0i64), 1 => -m..=m];
        prop::collection::vec(prop::collection::vec(entry, b), h)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// With more columns than samples, a random delta matrix has a basis and the derived
        /// products equal the direct ones for any data, negative values and zeros included.
        #[test]
        fn derived_products_equal_direct_ones(
            cols in deltas(12, 30, 127),
            xs in prop::collection::vec(prop::collection::vec(-255i64..=255, 12), 1..4),
        ) {
            if let Some(basis) = check_expansion(&cols, &xs, 255) {
                prop_assert!(basis.pivots().len() <= 12);
                prop_assert!(basis.pivots().len() < cols.len());
            }
        }

        /// Large entries: bounds up to 2^40 still expand exactly.
        #[test]
        fn extreme_entries_expand_exactly(
            cols in deltas(6, 10, 32767),
            xs in prop::collection::vec(prop::collection::vec(-(1i64 << 24)..=(1 << 24), 6), 1..3),
        ) {
            check_expansion(&cols, &xs, 1 << 24);
        }
    }

    #[test]
    fn training_shape_decrypts_half_the_columns() {
        // batch 64, 128 units, dense 8-bit deltas: 64 pivots, 64 derived columns
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 255) as i64 - 127
        };
        let cols: Vec<Vec<i64>> = (0..128)
            .map(|_| (0..64).map(|_| next()).collect())
            .collect();
        let xs: Vec<Vec<i64>> = (0..3)
            .map(|_| (0..64).map(|_| next().abs() * 2).collect())
            .collect();
        let basis = check_expansion(&cols, &xs, 255).expect("a basis");
        assert_eq!(basis.pivots().len(), 64);
        assert_eq!(basis.columns(), 128);
    }

    #[test]
    fn samples_without_deltas_need_no_pivot() {
        // sample 1 has no delta at all: two pivots serve three live columns
        let cols = vec![vec![1, 0, 2], vec![3, 0, -1], vec![-5, 0, 7], vec![0, 0, 0]];
        let basis =
            check_expansion(&cols, &[vec![9, 200, -4], vec![0, 0, 0]], 255).expect("a basis");
        assert_eq!(basis.pivots(), &[0, 1]);
    }

    #[test]
    fn proportional_samples_count_once() {
        // sample 1 is −2 × sample 0, sample 2 a single entry: two pivots for three samples
        let cols = vec![
            vec![1, -2, 0],
            vec![3, -6, 4],
            vec![-2, 4, 0],
            vec![5, -10, 8],
        ];
        let basis =
            check_expansion(&cols, &[vec![7, -3, 250], vec![-255, 255, 1]], 255).expect("a basis");
        assert_eq!(basis.pivots(), &[0, 1]);
    }

    #[test]
    fn rank_below_the_live_samples_claims_no_basis() {
        // sample 2 is the sum of samples 0 and 1 (not a multiple of either): rank 2 < 3
        let cols = vec![vec![1, 0, 1], vec![0, 1, 1], vec![2, 1, 3], vec![1, 3, 4]];
        assert_eq!(Basis::find(&cols, 255), None);
        assert_eq!(primitive(&[0, -4, 6]), Some(vec![0, 2, -3]));
        assert_eq!(primitive(&[i64::MIN, 0]), Some(vec![1, 0]));
        assert_eq!(primitive(&[0, 0]), None);
    }

    #[test]
    fn a_column_vanishing_modulo_p_is_not_taken_for_a_basis() {
        // (0, p) is independent of (1, 0) over Q but zero mod p: one pivot for two live
        // samples, so no basis (x_bound 0 keeps the bounds out of the way)
        let p = P as i64;
        assert_eq!(Basis::find(&[vec![1, 0], vec![0, p], vec![2, 0]], 0), None);
        let basis = Basis::find(&[vec![1, 0], vec![0, 1], vec![2, 0]], 0).expect("a basis");
        assert_eq!(basis.pivots(), &[0, 1]);
    }

    #[test]
    fn nothing_to_save_or_too_large_gives_none() {
        assert_eq!(Basis::find(&[vec![1, 0], vec![0, 1]], 255), None);
        assert_eq!(Basis::find(&[], 255), None);
        assert_eq!(Basis::find(&[vec![1, 2], vec![3]], 255), None);
        let big = vec![vec![1 << 40, 0], vec![0, 1], vec![1, 1]];
        assert_eq!(Basis::find(&big, 1 << 20), None);
        assert_eq!(Basis::find(&[vec![i64::MIN, 0]], 2), None);
    }

    #[test]
    fn inconsistent_values_are_caught_by_the_bounds() {
        let cols = vec![vec![1, 0], vec![0, 1], vec![1, 1]];
        let basis = Basis::find(&cols, 10).expect("a basis");
        assert_eq!(basis.expand(&[3, 4]), Ok(vec![3, 4, 7]));
        // 15 + 10 = 25 > 2·10: not products of these deltas with data in range
        assert_eq!(
            basis.expand(&[15, 10]),
            Err(OutOfBound {
                column: 2,
                value: 25,
                bound: 20
            })
        );
    }

    #[test]
    fn field_arithmetic() {
        for a in [1u64, 2, 12345, P - 1, P / 2] {
            assert_eq!(mul_mod(a, inverse(a)), 1);
        }
        assert_eq!(fold(u128::MAX), (u128::MAX % u128::from(P)) as u64);
        assert_eq!(fold(u128::from(P)), 0);
        assert_eq!(lift(residue(-5)), -5);
        assert_eq!(lift(residue(P as i64 / 2)), P as i64 / 2);
        let a = vec![P - 1; 100];
        let b = vec![P - 2; 100];
        assert_eq!(dot_mod(&a, &b), (100 * 2) % P);
    }
}
