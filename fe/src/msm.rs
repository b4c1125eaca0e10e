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
fn double_k<E: FeCurve>(p: &mut RawPoint<E>, k: usize) {
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
