//! Multi-scalar multiplication for small signed scalars, and fixed-base tables.
//!
//! All FE decryption time goes into sums `Σ y_i·P_i` where the `P_i` are ciphertext points and
//! the `y_i` are small signed integers (8 or 16 bits). `curv` offers only one scalar
//! multiplication at a time (about 250 group operations for a 256-bit scalar), so this module
//! builds the sums from point additions alone:
//!
//! * **Bucket method** ([`msm_signed`]): with signed digits `d ∈ [-2^(c-1), 2^(c-1))` of
//!   `c`-bit windows, every point is added to (or subtracted from) bucket `|d|` once per window,
//!   and the buckets are combined with the running-sum trick
//!   `Σ_k k·B_k = Σ_k Σ_{k' ≥ k} B_{k'}`, two additions per bucket. For 8-bit scalars this is
//!   one window: `n + 2·128` additions instead of `n` scalar multiplications.
//! * **Small multiples** ([`SmallMultiples`]): when many short vectors of scalars are applied to
//!   the same few points (the backward pass), tabulate `k·P` for `k ≤ M` once, and every
//!   product costs one addition per point.
//! * **Fixed-base tables** ([`FixedBase`]): for a base that does not change (the generator, the
//!   public key points, a ciphertext's `C_0` shared by many keys), store `d·2^(wk)·P` for the
//!   signed `w`-bit digits `d`; a 256-bit scalar multiplication is then `⌈257/w⌉` additions.
//! * **Bit planes over subset sums** ([`BitPlanes`], [`subset_sum_products`]): for `h` keys
//!   over the same `n` points, write every scalar in `b`-bit two's complement,
//!   `y = −2^(b−1)·y_(b−1) + Σ_(p<b−1) 2^p·y_p`, and cut the points into chunks of `t`.
//!   A chunk's table holds all `2^t` subset sums (`2^t − t − 1` additions, shared by all keys);
//!   bit plane `p` of a key selects one entry per chunk, so a key costs `b·⌈n/t⌉` additions
//!   plus `2(b−1)` to combine its planes by Horner's rule, instead of the bucket method's
//!   `n + 2^b`. With `h = 128`, `b = 8`, `t = 8` that is about 830 additions per key for
//!   `n = 785` (buckets: about 1,040) and 118 for `n = 64` plus a 256-bit scalar folded in as
//!   33 extra points (small multiples and a fixed-base table: about 190).
//!
//! The functions work on `curv`'s raw points ([`RawPoint`]) through the `ECPoint` trait, so they
//! run at the speed of the underlying library's point addition.

use crate::group::{FeCurve, RawPoint};
use curv::elliptic::curves::{ECPoint, Scalar};

/// Adds `p` to `acc` with the sign of `neg`.
#[inline(always)]
fn add_signed<E: FeCurve>(acc: &mut RawPoint<E>, p: &RawPoint<E>, neg: bool) {
    if neg {
        acc.sub_point_assign(p)
    } else {
        acc.add_point_assign(p)
    }
}

/// `2^k · p` by repeated doubling.
pub(crate) fn double_k<E: FeCurve>(p: &mut RawPoint<E>, k: usize) {
    for _ in 0..k {
        let q = p.clone();
        p.add_point_assign(&q);
    }
}

/// Signed windowed digits of `v` in base `2^c`: `v = Σ_k d_k 2^(ck)`, `d_k ∈ [-2^(c-1), 2^(c-1))`.
fn signed_window_digits(v: i64, c: usize, windows: usize, out: &mut [i32]) {
    let mut v = v as i128;
    let base = 1i128 << c;
    let half = base >> 1;
    for d in out.iter_mut().take(windows) {
        let mut r = v.rem_euclid(base);
        if r >= half {
            r -= base;
        }
        *d = r as i32;
        v = (v - r) >> c;
    }
    debug_assert_eq!(v, 0);
}

/// Windows of `c` bits needed for signed digits of values with `|v| ≤ max_abs`.
///
/// With digits in `[-2^(c-1), 2^(c-1))`, `w` windows reach at most
/// `(2^(c-1)-1)·(2^(cw)-1)/(2^c-1)` on the positive side, which decides.
pub(crate) fn windows_for(max_abs: u64, c: usize) -> usize {
    let c = c as u32;
    let mut w = 1u32;
    loop {
        let span = (1u128 << (c * w)) - 1;
        let max_pos = ((1u128 << (c - 1)) - 1) * span / ((1u128 << c) - 1);
        if max_pos >= u128::from(max_abs) || c * w >= 120 {
            return w as usize;
        }
        w += 1;
    }
}

/// The window width minimising the additions of the bucket method for `n` points.
pub fn best_window(n: usize, max_abs: u64) -> usize {
    if max_abs == 0 {
        return 2;
    }
    (2..=16usize)
        .min_by_key(|&c| {
            let w = windows_for(max_abs, c);
            // per window: n bucket additions, 2 per bucket to combine; c doublings between windows
            w * (n + (1usize << c)) + (w - 1) * c
        })
        .unwrap_or(8)
}

/// `Σ_i scalars[i]·points[i]` for small signed scalars, by the bucket method.
///
/// Scalars may be any `i64` whose absolute value is below `2^62`; the cost is about
/// `⌈(b+1)/c⌉·(n + 2^c)` additions for `b`-bit scalars and the best window `c`.
///
/// # Panics
/// Never on valid input; the caller ensures `points.len() == scalars.len()`.
pub fn msm_signed<E: FeCurve>(points: &[RawPoint<E>], scalars: &[i64]) -> RawPoint<E> {
    debug_assert_eq!(points.len(), scalars.len());
    let max_abs = scalars.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
    let mut buckets = Vec::new();
    msm_signed_with::<E>(points, scalars, max_abs, &mut buckets)
}

/// [`msm_signed`] with a known bound on `|scalar|` and a reusable bucket buffer.
pub(crate) fn msm_signed_with<E: FeCurve>(
    points: &[RawPoint<E>],
    scalars: &[i64],
    max_abs: u64,
    buckets: &mut Vec<RawPoint<E>>,
) -> RawPoint<E> {
    let zero = E::Point::zero();
    if max_abs == 0 {
        return zero;
    }
    let c = best_window(points.len(), max_abs);
    let windows = windows_for(max_abs, c);
    let nb = 1usize << (c - 1);
    buckets.clear();
    buckets.resize(nb + 1, zero.clone());
    let mut acc = zero.clone();
    if windows == 1 {
        // The scalars are their own digits: no recoding needed.
        for (p, &s) in points.iter().zip(scalars) {
            if s != 0 {
                add_signed::<E>(&mut buckets[s.unsigned_abs() as usize], p, s < 0);
            }
        }
        combine_buckets::<E>(buckets, &mut acc);
        return acc;
    }
    let mut digits = vec![0i32; scalars.len() * windows];
    for (s, d) in scalars.iter().zip(digits.chunks_mut(windows)) {
        signed_window_digits(*s, c, windows, d);
    }
    for w in (0..windows).rev() {
        double_k::<E>(&mut acc, c);
        for b in buckets.iter_mut() {
            *b = zero.clone();
        }
        for (p, d) in points.iter().zip(digits.chunks(windows)) {
            let d = d[w];
            if d != 0 {
                add_signed::<E>(&mut buckets[d.unsigned_abs() as usize], p, d < 0);
            }
        }
        combine_buckets::<E>(buckets, &mut acc);
    }
    acc
}

/// `acc += Σ_k k·buckets[k]` with two additions per non-empty tail bucket.
fn combine_buckets<E: FeCurve>(buckets: &[RawPoint<E>], acc: &mut RawPoint<E>) {
    let top = match buckets.iter().rposition(|b| !b.is_zero()) {
        Some(t) => t,
        None => return,
    };
    let mut running = E::Point::zero();
    let mut sum = E::Point::zero();
    for b in buckets[1..=top].iter().rev() {
        running.add_point_assign(b);
        sum.add_point_assign(&running);
    }
    acc.add_point_assign(&sum);
}

/// The multiples `k·P` for `k = 1..=max`, for products of one point with many small scalars.
pub struct SmallMultiples<E: FeCurve> {
    table: Vec<RawPoint<E>>,
}

impl<E: FeCurve> SmallMultiples<E> {
    /// Tabulates `k·p` for `1 ≤ k ≤ max` with `max - 1` additions.
    pub fn new(p: &RawPoint<E>, max: usize) -> Self {
        let mut t = SmallMultiples {
            table: Vec::with_capacity(max),
        };
        t.refill(p, max);
        t
    }

    /// Re-tabulates for another point, reusing the allocation.
    pub fn refill(&mut self, p: &RawPoint<E>, max: usize) {
        self.table.clear();
        let mut cur = p.clone();
        for _ in 0..max {
            self.table.push(cur.clone());
            cur.add_point_assign(p);
        }
    }

    /// Largest tabulated multiple.
    pub fn max(&self) -> usize {
        self.table.len()
    }

    /// Adds `k·P` to `acc` for `|k| ≤ max` (no-op for 0).
    #[inline]
    pub fn add_to(&self, acc: &mut RawPoint<E>, k: i64) {
        if k != 0 {
            add_signed::<E>(acc, &self.table[k.unsigned_abs() as usize - 1], k < 0);
        }
    }

    /// `k·P` for `|k| ≤ max`.
    pub fn get(&self, k: i64) -> RawPoint<E> {
        let mut acc = E::Point::zero();
        self.add_to(&mut acc, k);
        acc
    }
}

/// Signed digits of a scalar in base `2^w` (`⌈256/w⌉ + 1` digits, each in `[-2^(w-1), 2^(w-1))`).
pub fn recode_scalar<E: FeCurve>(s: &Scalar<E>, w: usize) -> Vec<i32> {
    let le = E::scalar_le_bytes(s);
    let windows = 256usize.div_ceil(w) + 1;
    let base = 1i32 << w;
    let half = base >> 1;
    let mut digits = Vec::with_capacity(windows);
    let mut carry = 0i32;
    for k in 0..windows {
        let mut raw = 0i32;
        for b in 0..w {
            let bit = k * w + b;
            if bit < 256 && (le[bit / 8] >> (bit % 8)) & 1 == 1 {
                raw |= 1 << b;
            }
        }
        raw += carry;
        if raw >= half {
            digits.push(raw - base);
            carry = 1;
        } else {
            digits.push(raw);
            carry = 0;
        }
    }
    debug_assert_eq!(carry, 0);
    digits
}

/// A precomputed table for multiplying one fixed point by arbitrary 256-bit scalars.
///
/// Holds `d·2^(wk)·P` for `d = 1..=2^(w-1)` and every window `k`; a multiplication by a
/// recoded scalar is one addition per non-zero digit.
pub struct FixedBase<E: FeCurve> {
    w: usize,
    half: usize,
    table: Vec<RawPoint<E>>,
}

impl<E: FeCurve> FixedBase<E> {
    /// Builds the table with window width `w` (2 to 8): `(⌈256/w⌉+1)·2^(w-1)` points.
    pub fn new(p: &RawPoint<E>, w: usize) -> Self {
        let w = w.clamp(2, 8);
        let half = 1usize << (w - 1);
        let windows = 256usize.div_ceil(w) + 1;
        let mut table = Vec::with_capacity(windows * half);
        let mut base = p.clone();
        for _ in 0..windows {
            let mut cur = base.clone();
            for _ in 0..half {
                table.push(cur.clone());
                cur.add_point_assign(&base);
            }
            // 2^w·base = 2·(half·base)
            base = table[table.len() - 1].clone();
            double_k::<E>(&mut base, 1);
        }
        FixedBase { w, half, table }
    }

    /// The window width of the table.
    pub fn window(&self) -> usize {
        self.w
    }

    /// `s·P` for a scalar recoded with [`recode_scalar`] at this table's window width.
    pub fn mul_digits(&self, digits: &[i32]) -> RawPoint<E> {
        let mut acc = E::Point::zero();
        for (k, &d) in digits.iter().enumerate() {
            if d != 0 {
                let idx = k * self.half + d.unsigned_abs() as usize - 1;
                add_signed::<E>(&mut acc, &self.table[idx], d < 0);
            }
        }
        acc
    }

    /// `s·P`.
    pub fn mul(&self, s: &Scalar<E>) -> RawPoint<E> {
        self.mul_digits(&recode_scalar(s, self.w))
    }
}

/// The largest chunk width of [`BitPlanes`] (a chunk's table has `2^t` points).
pub const MAX_CHUNK_BITS: usize = 10;

/// Keys prepared for [`subset_sum_products`]: the chunk masks of every bit plane.
///
/// For key `k`, chunk `c` and plane `p`, the mask has bit `j` set when bit `p` of the two's
/// complement of `rows[k][c·t + j]` is set.
#[derive(Debug, Clone)]
pub struct BitPlanes {
    n: usize,
    keys: usize,
    t: usize,
    bits: usize,
    chunks: usize,
    masks: Vec<u16>,
}

impl BitPlanes {
    /// Prepares `rows` (all of one length `n`, entries in `[−2^(bits−1), 2^(bits−1))`) for chunks
    /// of `t` points (`1 ≤ t ≤ MAX_CHUNK_BITS`, `2 ≤ bits ≤ 62`).
    ///
    /// # Panics
    /// If the rows differ in length or an entry does not fit `bits`: the callers (this crate's
    /// decryption) size `bits` from the entries themselves.
    pub fn new(rows: &[Vec<i64>], t: usize, bits: usize) -> Self {
        assert!((1..=MAX_CHUNK_BITS).contains(&t) && (2..=62).contains(&bits));
        let n = rows.first().map_or(0, Vec::len);
        let chunks = n.div_ceil(t);
        let lo = -(1i64 << (bits - 1));
        let mut masks = vec![0u16; rows.len() * chunks * bits];
        for (k, row) in rows.iter().enumerate() {
            assert_eq!(row.len(), n, "rows of one length");
            assert!(
                row.iter().all(|&v| v >= lo && v < -lo),
                "an entry does not fit {bits} bits"
            );
            for (c, part) in row.chunks(t).enumerate() {
                let base = (k * chunks + c) * bits;
                for (p, m) in masks[base..base + bits].iter_mut().enumerate() {
                    *m = part
                        .iter()
                        .enumerate()
                        .fold(0u16, |acc, (j, &v)| acc | ((((v >> p) & 1) as u16) << j));
                }
            }
        }
        BitPlanes {
            n,
            keys: rows.len(),
            t,
            bits,
            chunks,
            masks,
        }
    }

    /// Number of prepared keys.
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// Bits per scalar: the smallest `b ≥ 2` with `−2^(b−1) ≤ v < 2^(b−1)` for `lo ≤ v ≤ hi`.
    pub fn bits_for(lo: i64, hi: i64) -> usize {
        (2..=62)
            .find(|&b| lo >= -(1i64 << (b - 1)) && hi < (1i64 << (b - 1)))
            .unwrap_or(62)
    }

    /// The chunk width minimising the estimated additions for `keys` keys of `bits` bits over
    /// `n` points, and that estimate.
    pub fn best_chunk(n: usize, keys: usize, bits: usize) -> (usize, usize) {
        (1..=MAX_CHUNK_BITS)
            .map(|t| {
                let chunks = n.div_ceil(t);
                let per_key = bits * chunks + 2 * (bits - 1);
                (t, chunks * ((1usize << t) - t - 1) + keys * per_key)
            })
            .min_by_key(|&(_, cost)| cost)
            .unwrap_or((1, usize::MAX))
    }
}

/// `Σ_i rows[k][i]·points[i]` for every prepared key `k`, by bit planes over subset sums.
///
/// The loop runs chunk-major: one chunk's table (`2^t` points) is built, used by every key
/// while it is in cache, and dropped. `keys` selects a range of the prepared keys (all of them
/// for `0..planes.keys()`), so that callers can split the keys across threads.
///
/// # Panics
/// If `points.len()` differs from the rows' length or `keys` is out of range.
pub fn subset_sum_products<E: FeCurve>(
    points: &[RawPoint<E>],
    planes: &BitPlanes,
    keys: std::ops::Range<usize>,
) -> Vec<RawPoint<E>> {
    assert_eq!(points.len(), planes.n, "one point per scalar");
    assert!(keys.end <= planes.keys);
    let (t, bits, chunks) = (planes.t, planes.bits, planes.chunks);
    let zero = E::Point::zero();
    let mut accs = vec![zero.clone(); keys.len() * bits];
    let mut table: Vec<RawPoint<E>> = Vec::with_capacity(1 << t);
    for (c, chunk) in points.chunks(t).enumerate() {
        table.clear();
        table.push(zero.clone());
        for mask in 1usize..(1 << chunk.len()) {
            let low = mask.trailing_zeros() as usize;
            let rest = mask & (mask - 1);
            let mut p = chunk[low].clone();
            if rest != 0 {
                p.add_point_assign(&table[rest]);
            }
            table.push(p);
        }
        for (acc, k) in accs.chunks_mut(bits).zip(keys.clone()) {
            let base = (k * chunks + c) * bits;
            for (a, &m) in acc.iter_mut().zip(&planes.masks[base..base + bits]) {
                if m != 0 {
                    a.add_point_assign(&table[m as usize]);
                }
            }
        }
    }
    accs.chunks(bits)
        .map(|acc| {
            // −2^(b−1)·acc[b−1] + Σ 2^p·acc[p], by Horner's rule from the top plane.
            let mut r = zero.sub_point(&acc[bits - 1]);
            for a in acc[..bits - 1].iter().rev() {
                double_k::<E>(&mut r, 1);
                r.add_point_assign(a);
            }
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{generator, mul_i64, wrap, Ristretto, Secp256k1};
    use curv::elliptic::curves::Point;
    use proptest::prelude::*;

    fn naive<E: FeCurve>(points: &[RawPoint<E>], s: &[i64]) -> Point<E> {
        points.iter().zip(s).fold(Point::zero(), |acc, (p, &k)| {
            acc + mul_i64(&wrap::<E>(p.clone()), k)
        })
    }

    fn random_points<E: FeCurve>(n: usize) -> Vec<RawPoint<E>> {
        (0..n)
            .map(|_| (Point::<E>::generator() * Scalar::<E>::random()).into_raw())
            .collect()
    }

    fn check_msm<E: FeCurve>(s: &[i64]) {
        let pts = random_points::<E>(s.len());
        assert_eq!(wrap::<E>(msm_signed::<E>(&pts, s)), naive::<E>(&pts, s));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn msm_matches_naive_8bit(s in proptest::collection::vec(-128i64..=127, 0..40)) {
            check_msm::<Ristretto>(&s);
        }
        #[test]
        fn msm_matches_naive_wide(s in proptest::collection::vec(-(1i64 << 40)..(1i64 << 40), 1..12)) {
            check_msm::<Ristretto>(&s);
        }
        #[test]
        fn fixed_base_matches_curv(w in 2usize..=8) {
            let p = random_points::<Ristretto>(1).remove(0);
            let t = FixedBase::<Ristretto>::new(&p, w);
            let s = Scalar::<Ristretto>::random();
            prop_assert_eq!(wrap::<Ristretto>(t.mul(&s)), wrap::<Ristretto>(p) * &s);
        }
    }

    #[test]
    fn extremes_and_secp() {
        check_msm::<Ristretto>(&[i64::MAX >> 2, -(i64::MAX >> 2), 0, 1, -1]);
        check_msm::<Secp256k1>(&[-128, 127, 0, 5, -3, 1 << 20]);
        check_msm::<Ristretto>(&[0, 0, 0]);
        let p = random_points::<Secp256k1>(1).remove(0);
        let t = FixedBase::<Secp256k1>::new(&p, 5);
        for s in [
            Scalar::<Secp256k1>::random(),
            -Scalar::<Secp256k1>::from(1u64),
            Scalar::zero(),
        ] {
            assert_eq!(wrap::<Secp256k1>(t.mul(&s)), wrap::<Secp256k1>(p) * &s);
        }
    }

    fn check_planes<E: FeCurve>(rows: &[Vec<i64>], t: usize) {
        let n = rows[0].len();
        let pts = random_points::<E>(n);
        let lo = rows.iter().flatten().copied().min().unwrap_or(0);
        let hi = rows.iter().flatten().copied().max().unwrap_or(0);
        let planes = BitPlanes::new(rows, t, BitPlanes::bits_for(lo, hi));
        let got = subset_sum_products::<E>(&pts, &planes, 0..rows.len());
        for (g, row) in got.into_iter().zip(rows) {
            assert_eq!(wrap::<E>(g), naive::<E>(&pts, row));
        }
        // A sub-range of keys gives the same products.
        if rows.len() > 1 {
            let tail = subset_sum_products::<E>(&pts, &planes, 1..rows.len());
            assert_eq!(wrap::<E>(tail[0].clone()), naive::<E>(&pts, &rows[1]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn bit_planes_match_naive(
            rows in (1usize..30).prop_flat_map(|n| proptest::collection::vec(
                proptest::collection::vec(-128i64..=127, n), 1..5)),
            t in 1usize..=MAX_CHUNK_BITS,
        ) {
            check_planes::<Ristretto>(&rows, t);
        }
    }

    #[test]
    fn bit_planes_extremes() {
        // Bounds of the two's complement range, zeros, wide entries, and secp256k1.
        check_planes::<Ristretto>(&[vec![-128, 127, 0, -1, 1], vec![0; 5], vec![-128; 5]], 2);
        check_planes::<Ristretto>(&[vec![1 << 40, -(1 << 40) - 3, 7]], 3);
        check_planes::<Secp256k1>(&[vec![-5, 6, 127, -128, 0, 3, 9]], 4);
        assert_eq!(BitPlanes::bits_for(-128, 127), 8);
        assert_eq!(BitPlanes::bits_for(-128, 128), 9);
        assert_eq!(BitPlanes::bits_for(0, 0), 2);
        assert_eq!(BitPlanes::best_chunk(97, 128, 8).0, 7);
    }

    #[test]
    fn small_multiples() {
        let g = generator::<Ristretto>();
        let t = SmallMultiples::<Ristretto>::new(&g, 10);
        for k in -10..=10i64 {
            assert_eq!(
                wrap::<Ristretto>(t.get(k)),
                mul_i64(&wrap::<Ristretto>(g), k)
            );
        }
    }
}
