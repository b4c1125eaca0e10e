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
//!   signed `w`-bit digits `d`; a scalar multiplication is then one addition per digit,
//!   `⌈255/w⌉` on Ristretto255.
//! * **Bit planes over subset sums** ([`BitPlanes`], [`subset_sum_products`]): for `h` keys
//!   over the same `n` points, write every scalar as `y = Σ_(p<b) 2^p·d_p` with digits
//!   `d_p ∈ {−1, 0, 1}`, and cut the points into chunks of `t`. Plane `p` of a key selects, in
//!   every chunk, the signed sum of the points whose digit is non-zero; a chunk's table holds
//!   all these sums once for all keys, so a key costs one addition per (plane, chunk) with a
//!   non-zero digit, plus `2(b−1)` to combine its planes by Horner's rule, instead of the
//!   bucket method's `n + 2^b`. Two digit forms ([`Digits`]):
//!   - *two's complement* (`d_p` = bit `p`, the top plane negative): a table of all `2^t`
//!     subsets (`2^t − t − 1` additions); best for dense, uniform entries;
//!   - *non-adjacent form* (NAF): a third of the digits of a uniform entry and most digits of a
//!     small one are zero, and the table holds the `(3^t − 1)/2` signed patterns with top digit
//!     +1 (the others are their negatives); best for sparse or small entries;
//!   - *zero-free* digits `e_p ∈ {−1, 1}` of `2y + 1` (odd, so always representable in `b`
//!     planes): the `2^t` patterns of a chunk are `2^(t−1)` entries and their negatives, so a
//!     table of the same size covers one more point and a dense key needs fewer lookups. The
//!     sum comes out as `2·Σ y_i P_i + Σ P_i`; the known `Σ P_i` is subtracted, and the caller
//!     gets the doubled product (a discrete log of an even value, halved).
//!
//!   The layout (form and `t`, per segment of the points) is chosen by counting the additions
//!   for the actual keys. With `h = 128`, `b = 8`, and a 253-bit scalar folded in as 32 extra
//!   points: about 940 additions per key for `n = 785` uniform entries (1,027 with two's
//!   complement only; buckets: about 1,040), and for `n = 64` about 124 with uniform entries
//!   and 75-87 with the gradients of training (two thirds zeros).
//!
//! The functions take and return `curv`'s raw points ([`RawPoint`]). The bit-plane products and
//! encryption's fixed-base products run their additions through a backend
//! ([`crate::backend`]): lists of independent additions, which the AVX2 backend does four at a
//! time; the other functions use curv's addition directly.

use crate::backend::{same_curve, Backend, CurvLanes, Lanes, Op};
use crate::group::{FeCurve, RawPoint};
use curv::elliptic::curves::{ECPoint, Scalar};
use rayon::prelude::*;

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

    /// `k·P` for `k = 1..=max`, in order.
    pub(crate) fn multiples(&self) -> &[RawPoint<E>] {
        &self.table
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

/// Number of signed base-`2^w` digits of a scalar: `⌈(SCALAR_BITS + 2)/w⌉`.
///
/// A scalar is below `2^SCALAR_BITS`, so once the digits span `SCALAR_BITS + 2` bits the top
/// window's bits plus the incoming carry stay below `2^(w−1)` and no carry is left over
/// (32 digits of 8 bits on Ristretto255, 33 on secp256k1).
pub fn scalar_digits<E: FeCurve>(w: usize) -> usize {
    (E::SCALAR_BITS + 2).div_ceil(w)
}

/// Signed digits of a scalar in base `2^w` ([`scalar_digits`] of them, each in
/// `[-2^(w-1), 2^(w-1))`).
pub fn recode_scalar<E: FeCurve>(s: &Scalar<E>, w: usize) -> Vec<i32> {
    let le = E::scalar_le_bytes(s);
    let windows = scalar_digits::<E>(w);
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
    /// Builds the table with window width `w` (2 to 8): [`scalar_digits`]`·2^(w-1)` points.
    pub fn new(p: &RawPoint<E>, w: usize) -> Self {
        let w = w.clamp(2, 8);
        let half = 1usize << (w - 1);
        let windows = scalar_digits::<E>(w);
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

/// Fixed-base tables of many points in a backend's addend form, applied to many scalars in
/// one list of independent additions: encryption's `r·H_i` for every element `i` and vector.
///
/// Entry `k·half + d − 1` of base `b` (at `b·stride` in one flat table) is `d·2^(wk)·P_b`, as
/// in [`FixedBase`]; a product is one addition per non-zero digit of the recoded scalar.
pub(crate) struct FixedBases<E: FeCurve, L: Lanes<E>> {
    lanes: L,
    half: usize,
    stride: usize,
    table: Vec<L::Entry>,
}

impl<E: FeCurve, L: Lanes<E>> FixedBases<E, L> {
    /// The tables of `bases` at window width `w` (2 to 8), built on all cores.
    ///
    /// Built by curv one base at a time, then converted. Building them level by level across
    /// bases on the backend was tried and was not faster (`client encrypt` of the embedded
    /// subset, alternating: 51.6 and 53.5 s against 48.3 and 43.6 s): about a third of the
    /// time is memory (page faults, copies of the 380 KiB per base), which vector additions
    /// do not shorten.
    pub(crate) fn new(lanes: L, bases: &[RawPoint<E>], w: usize) -> Self {
        let per_base: Vec<(usize, Vec<L::Entry>)> = bases
            .par_iter()
            .map(|p| {
                let t = FixedBase::<E>::new(p, w);
                (t.half, lanes.entries(&lanes.load(&t.table)))
            })
            .collect();
        let half = per_base.first().map_or(1, |(h, _)| *h);
        let stride = per_base.first().map_or(0, |(_, t)| t.len());
        FixedBases {
            lanes,
            half,
            stride,
            table: per_base.into_iter().flat_map(|(_, t)| t).collect(),
        }
    }

    /// The backend the tables are laid out for.
    pub(crate) fn lanes(&self) -> &L {
        &self.lanes
    }

    /// `accs[a] += s·P_b` for every `(a, b, digits of s)`, the digits recoded at the tables'
    /// window width.
    pub(crate) fn add_products(&self, accs: &mut [L::Acc], products: &[(usize, usize, &[i32])]) {
        let windows = products.iter().map(|p| p.2.len()).max().unwrap_or(0);
        let mut ops = Vec::with_capacity(products.len() * windows);
        // Digit-major, so that neighbouring additions have different accumulators and run in
        // one batch.
        for k in 0..windows {
            for &(a, b, digits) in products {
                if let Some(&d) = digits.get(k).filter(|&&d| d != 0) {
                    let entry = b * self.stride + k * self.half + d.unsigned_abs() as usize - 1;
                    ops.push(Op::new(a, entry, d < 0));
                }
            }
        }
        self.lanes.add_many(accs, &self.table, &ops);
    }
}

/// The largest chunk width of [`BitPlanes`] in two's complement (a table of `2^t` points).
pub const MAX_CHUNK_BITS: usize = 10;
/// The largest chunk width of [`BitPlanes`] in NAF digits (a table of `(3^t + 1)/2` points).
pub const MAX_NAF_CHUNK_BITS: usize = 6;
/// The largest chunk width of [`BitPlanes`] in zero-free digits (a table of `2^(t−1)` points).
pub const MAX_ZERO_FREE_CHUNK_BITS: usize = 12;
/// Flag of a lookup code: subtract the table entry instead of adding it.
const NEG: u16 = 1 << 15;

/// How the entries of a segment of [`BitPlanes`] are cut into planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digits {
    /// `b`-bit two's complement: plane `p` holds bit `p`, the top plane counts negatively.
    /// Dense entries (uniform weights) cost least this way.
    TwosComplement,
    /// Non-adjacent form, digits in `{−1, 0, 1}` with no two adjacent non-zero: a third of
    /// the digits of a uniform entry are non-zero, and small entries leave the high planes
    /// empty (sparse, heavy-tailed gradients cost least this way).
    Naf,
    /// Zero-free signed binary of `2v + 1`, digits in `{−1, 1}`: `2v + 1 = Σ_p 2^p·e_p` with
    /// `e_p = +1` where bit `p` of `v + 2^(b−1)` is set. A chunk's patterns come in ± pairs, so
    /// its table holds half of them (`2^(t−1)`), and a wider chunk costs the same as two's
    /// complement: fewer lookups for dense entries. Every digit is non-zero, and the products
    /// come out doubled (see [`BitPlanes::doubled`]).
    ZeroFree,
}

impl Digits {
    /// The largest chunk width of the form.
    fn max_width(self) -> usize {
        match self {
            Digits::TwosComplement => MAX_CHUNK_BITS,
            Digits::Naf => MAX_NAF_CHUNK_BITS,
            Digits::ZeroFree => MAX_ZERO_FREE_CHUNK_BITS,
        }
    }
}

/// One chunk of points: `len` points from `start`, all in one digit form.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    start: usize,
    len: usize,
    digits: Digits,
}

/// Additions to build the table of a chunk of `len` points in the form `digits`.
fn table_cost(digits: Digits, len: usize) -> usize {
    match digits {
        Digits::TwosComplement => (1usize << len) - len - 1,
        Digits::Naf => (3usize.pow(len as u32) - 1) / 2 - len,
        // The first entry (len − 1 additions), the doubled points (len − 1), one per other entry.
        Digits::ZeroFree => (1usize << (len - 1)) - 1 + 2 * (len - 1),
    }
}

/// The NAF digits of `v` as two masks (digit +1, digit −1): `v = Σ 2^p (pos_p − neg_p)`.
fn naf_masks(v: i64) -> (u64, u64) {
    let (mut v, mut pos, mut neg) = (i128::from(v), 0u64, 0u64);
    let mut p = 0;
    while v != 0 {
        if v & 1 == 1 {
            // The digit that makes the rest divisible by 4: ±1.
            if v.rem_euclid(4) == 1 {
                pos |= 1 << p;
                v -= 1;
            } else {
                neg |= 1 << p;
                v += 1;
            }
        }
        v >>= 1;
        p += 1;
    }
    (pos, neg)
}

/// The plane masks of one entry in a digit form: (positive digits, negative digits).
fn entry_masks(v: i64, digits: Digits, bits: usize) -> (u64, u64) {
    match digits {
        Digits::TwosComplement => {
            let m = (v as u64) & ((1u64 << bits) - 1);
            let top = 1u64 << (bits - 1);
            (m & !top, m & top)
        }
        Digits::Naf => naf_masks(v),
        Digits::ZeroFree => {
            let all = (1u64 << bits) - 1;
            let u = (v.wrapping_add(1i64 << (bits - 1)) as u64) & all;
            (u, !u & all)
        }
    }
}

/// Keys prepared for [`subset_sum_products`]: every key's lookup code per chunk and bit plane.
///
/// The points are cut into segments, and each segment into chunks of one [`Digits`] form. A
/// code names the chunk's table entry that bit plane `p` of the key selects (the subset sum
/// of the points whose digit is non-zero, signed), or 0 for nothing to add.
///
/// With a [`Digits::ZeroFree`] segment the products are doubled: those segments give
/// `Σ (2y_i + 1)·P_i` in `b` planes, the others give `Σ 2y_i·P_i` in planes `1..=b` (their
/// planes shifted up by one, `b + 1` planes in all), and `Σ P_i` over the zero-free points is
/// subtracted once per key.
#[derive(Debug, Clone)]
pub struct BitPlanes {
    n: usize,
    keys: usize,
    /// Planes per key: `bits`, or `bits + 1` when zero-free and other segments are mixed.
    planes: usize,
    chunks: Vec<Chunk>,
    codes: Vec<u16>,
    lookups: usize,
}

/// The cheapest way found for one segment: (form, chunk width, additions).
type SegmentChoice = (Digits, usize, f64);

impl BitPlanes {
    /// Prepares `rows` (all of one length `n`, entries in `[−2^(bits−1), 2^(bits−1))`,
    /// `2 ≤ bits ≤ 62`), cut into segments at the positions `splits`. Every segment gets the
    /// digit form and chunk width with the fewest additions for these very rows (counted, not
    /// estimated: sparse keys make many lookups vanish).
    ///
    /// With `may_double`, [`Digits::ZeroFree`] segments are allowed when they save additions,
    /// and then [`subset_sum_products`] returns `2·Σ y_i·P_i` ([`BitPlanes::doubled`]): for
    /// callers that can use the doubled point (a discrete log of an even value), not for those
    /// that need the sum itself.
    ///
    /// # Panics
    /// If the rows differ in length or an entry does not fit `bits`: the callers (this crate's
    /// decryption) size `bits` from the entries themselves.
    pub fn new(rows: &[Vec<i64>], bits: usize, splits: &[usize], may_double: bool) -> Self {
        let (layout, _) = Self::plan(rows, bits, splits, may_double);
        Self::with_layout(rows, bits, &layout)
    }

    /// The layout [`BitPlanes::new`] would choose for `rows`, and its estimated additions
    /// (lookups counted on a sample of the rows), without preparing the codes: for callers
    /// that compare the bit planes with another method first.
    pub fn plan(
        rows: &[Vec<i64>],
        bits: usize,
        splits: &[usize],
        may_double: bool,
    ) -> (Vec<(usize, Digits, usize)>, f64) {
        let n = rows.first().map_or(0, Vec::len);
        let mut bounds: Vec<usize> = splits.iter().copied().filter(|&s| s < n).collect();
        bounds.push(n);
        bounds.sort_unstable();
        bounds.dedup();
        // Per segment: its length, the best exact form, and the best zero-free width.
        let mut segments: Vec<(usize, SegmentChoice, SegmentChoice)> = Vec::new();
        let mut from = 0;
        for &to in &bounds {
            if to > from {
                let (exact, zero_free) = best_layout(rows, bits, from..to);
                segments.push((to - from, exact, zero_free));
            }
            from = to;
        }
        let keys = rows.len() as f64;
        let horner = |planes: usize| keys * 2.0 * (planes - 1) as f64;
        let exact_cost = segments.iter().map(|s| s.1 .2).sum::<f64>() + horner(bits);
        let mut layout: Vec<(usize, Digits, usize)> =
            segments.iter().map(|s| (s.0, s.1 .0, s.1 .1)).collect();
        let mut estimate = exact_cost;
        if may_double {
            let picks: Vec<(usize, SegmentChoice)> = segments
                .iter()
                .map(|&(len, exact, zf)| (len, if zf.2 < exact.2 { zf } else { exact }))
                .collect();
            let zero_free = picks.iter().filter(|p| p.1 .0 == Digits::ZeroFree).count();
            if zero_free > 0 {
                let planes = bits + usize::from(zero_free < picks.len());
                // Horner over the planes, and Σ P_i subtracted once per key.
                let cost = picks.iter().map(|p| p.1 .2).sum::<f64>() + horner(planes) + keys;
                if cost < exact_cost * ZERO_FREE_MARGIN {
                    layout = picks.iter().map(|p| (p.0, p.1 .0, p.1 .1)).collect();
                    estimate = cost;
                }
            }
        }
        (layout, estimate)
    }

    /// Prepares `rows` with a given layout: consecutive segments `(length, digit form, chunk
    /// width)` covering the rows' length.
    ///
    /// # Panics
    /// As [`BitPlanes::new`], and if the layout does not cover the rows or a chunk width is
    /// outside `1..=MAX_CHUNK_BITS` (`MAX_NAF_CHUNK_BITS` for NAF, `MAX_ZERO_FREE_CHUNK_BITS`
    /// for zero-free digits).
    pub fn with_layout(rows: &[Vec<i64>], bits: usize, layout: &[(usize, Digits, usize)]) -> Self {
        assert!((2..=62).contains(&bits));
        let n = rows.first().map_or(0, Vec::len);
        assert_eq!(
            layout.iter().map(|s| s.0).sum::<usize>(),
            n,
            "layout covers the rows"
        );
        let mut chunks = Vec::new();
        let mut start = 0;
        for &(len, digits, t) in layout {
            assert!(
                (1..=digits.max_width()).contains(&t),
                "chunk width {t} for {digits:?}"
            );
            for c in (0..len).step_by(t) {
                chunks.push(Chunk {
                    start: start + c,
                    len: t.min(len - c),
                    digits,
                });
            }
            start += len;
        }
        let zero_free = chunks
            .iter()
            .filter(|c| c.digits == Digits::ZeroFree)
            .count();
        let planes = bits + usize::from(zero_free > 0 && zero_free < chunks.len());
        let lo = -(1i64 << (bits - 1));
        let per_key = chunks.len() * planes;
        let mut codes = vec![0u16; rows.len() * per_key];
        rows.par_iter()
            .zip(codes.par_chunks_mut(per_key.max(1)))
            .for_each(|(row, out)| {
                assert_eq!(row.len(), n, "rows of one length");
                assert!(
                    row.iter().all(|&v| v >= lo && v < -lo),
                    "an entry does not fit {bits} bits"
                );
                for (chunk, out) in chunks.iter().zip(out.chunks_mut(planes)) {
                    let mut masks = [(0u64, 0u64); MAX_ZERO_FREE_CHUNK_BITS];
                    let masks = &mut masks[..chunk.len];
                    for (m, &v) in masks.iter_mut().zip(&row[chunk.start..]) {
                        *m = entry_masks(v, chunk.digits, bits);
                    }
                    // Exact forms sit one plane up when mixed with zero-free ones (2y).
                    let out = match chunk.digits {
                        Digits::ZeroFree => &mut out[..bits],
                        _ => &mut out[planes - bits..],
                    };
                    chunk_codes(masks, chunk.digits, out);
                }
            });
        let lookups = codes.iter().filter(|&&c| c != 0).count();
        BitPlanes {
            n,
            keys: rows.len(),
            planes,
            chunks,
            codes,
            lookups,
        }
    }

    /// Number of prepared keys.
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// Whether [`subset_sum_products`] gives `2·Σ y_i·P_i` (some segment is zero-free).
    pub fn doubled(&self) -> bool {
        self.chunks.iter().any(|c| c.digits == Digits::ZeroFree)
    }

    /// Point additions (doublings included) of one [`subset_sum_products`] over all keys:
    /// the chunk tables, one per non-zero code, Horner's rule over the planes, and for doubled
    /// products the subtraction of the zero-free points' sum.
    pub fn additions(&self) -> usize {
        let zero_free = self
            .chunks
            .iter()
            .filter(|c| c.digits == Digits::ZeroFree)
            .count();
        // Σ P_i over the zero-free chunks, then one subtraction per key.
        let correction = if zero_free > 0 {
            zero_free + self.keys
        } else {
            0
        };
        self.chunks
            .iter()
            .map(|c| table_cost(c.digits, c.len))
            .sum::<usize>()
            + self.lookups
            + self.keys * 2 * (self.planes - 1)
            + correction
    }

    /// Bits per scalar: the smallest `b ≥ 2` with `−2^(b−1) ≤ v < 2^(b−1)` for `lo ≤ v ≤ hi`.
    pub fn bits_for(lo: i64, hi: i64) -> usize {
        (2..=62)
            .find(|&b| lo >= -(1i64 << (b - 1)) && hi < (1i64 << (b - 1)))
            .unwrap_or(62)
    }
}

/// The codes of all planes of one chunk whose entries have the plane masks `masks`, into
/// `out` (one per plane), in one pass over the non-zero digits.
///
/// Two's complement: the bit mask of the chunk, negated on the top plane. NAF: the balanced
/// ternary number `u = Σ_j d_j 3^j` of the chunk's digits, as `|u|` and a sign (the table
/// holds the patterns whose top digit is +1; the others are their negatives). Zero-free: the
/// mask of the +1 digits below the top one, plus one (entry 0 is the identity), negated
/// with the mask of the −1 digits when the top digit is −1.
fn chunk_codes(masks: &[(u64, u64)], digits: Digits, out: &mut [u16]) {
    let mut u = [0i32; 64];
    let u = &mut u[..out.len()];
    if digits == Digits::ZeroFree {
        // u[p] = the +1 digits of plane p, as a mask over the chunk.
        for (j, &(pos, _)) in masks.iter().enumerate() {
            let mut m = pos;
            while m != 0 {
                u[m.trailing_zeros() as usize] |= 1 << j;
                m &= m - 1;
            }
        }
        let top = masks.len() - 1;
        let low = (1i32 << top) - 1;
        for (code, &plus) in out.iter_mut().zip(u.iter()) {
            *code = if (plus >> top) & 1 == 1 {
                (plus & low) as u16 + 1
            } else {
                ((!plus & low) as u16 + 1) | NEG
            };
        }
        return;
    }
    let mut pow = 1i32;
    for (j, &(pos, neg)) in masks.iter().enumerate() {
        let weight = match digits {
            Digits::Naf => pow,
            _ => 1 << j,
        };
        for (m, sign) in [(pos, 1), (neg, -1)] {
            let mut m = m;
            while m != 0 {
                u[m.trailing_zeros() as usize] += sign * weight;
                m &= m - 1;
            }
        }
        pow *= 3;
    }
    for (code, &v) in out.iter_mut().zip(u.iter()) {
        *code = if v < 0 {
            v.unsigned_abs() as u16 | NEG
        } else {
            v as u16
        };
    }
}

/// Zero-free layouts are taken only when they need fewer than this fraction of the exact
/// layout's additions: half of their lookups subtract (an unpredictable branch) and a doubled
/// product needs a discrete-log search twice as wide, about 3 % more time per addition as
/// measured on the training shapes.
const ZERO_FREE_MARGIN: f64 = 0.97;

/// Keys sampled (evenly) by [`best_layout`]: counting every key's lookups for every option
/// would cost as much as decrypting one ciphertext; a sample of 8 keys picks the same layout.
const LAYOUT_SAMPLE: usize = 8;

/// For the columns `cols` of `rows`: the exact digit form and chunk width with the fewest
/// additions (tables plus non-zero lookups, the lookups counted on a sample of the rows), and
/// the cheapest zero-free width (every lookup is needed, so nothing to count).
fn best_layout(
    rows: &[Vec<i64>],
    bits: usize,
    cols: std::ops::Range<usize>,
) -> (SegmentChoice, SegmentChoice) {
    let len = cols.len();
    let tables = |digits: Digits, t: usize| -> usize {
        (0..len)
            .step_by(t)
            .map(|c| table_cost(digits, t.min(len - c)))
            .sum()
    };
    let zero_free = (1..=MAX_ZERO_FREE_CHUNK_BITS.min(len.max(1)))
        .map(|t| {
            let lookups = rows.len() * bits * len.div_ceil(t);
            (
                Digits::ZeroFree,
                t,
                (tables(Digits::ZeroFree, t) + lookups) as f64,
            )
        })
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .unwrap_or((Digits::ZeroFree, 1, f64::INFINITY));
    let options: Vec<(Digits, usize)> = (1..=MAX_CHUNK_BITS)
        .map(|t| (Digits::TwosComplement, t))
        .chain((1..=MAX_NAF_CHUNK_BITS).map(|t| (Digits::Naf, t)))
        .filter(|&(_, t)| t <= len.max(1))
        .collect();
    // Per sampled key and option: the non-zero (plane, chunk) pairs, from per-plane bit sets,
    // scaled to all keys.
    let step = rows.len().div_ceil(LAYOUT_SAMPLE).max(1);
    let sample: Vec<&Vec<i64>> = rows.iter().step_by(step).collect();
    let scale = rows.len() as f64 / sample.len().max(1) as f64;
    let lookups = sample
        .par_iter()
        .map(|row| {
            let part = &row[cols.clone()];
            let sets = |digits: Digits| -> Vec<Vec<u64>> {
                let mut sets = vec![vec![0u64; len.div_ceil(64)]; bits];
                for (i, &v) in part.iter().enumerate() {
                    let (pos, neg) = entry_masks(v, digits, bits);
                    let mut m = pos | neg;
                    while m != 0 {
                        let p = m.trailing_zeros() as usize;
                        sets[p][i / 64] |= 1 << (i % 64);
                        m &= m - 1;
                    }
                }
                sets
            };
            let (tc, naf) = (sets(Digits::TwosComplement), sets(Digits::Naf));
            options
                .iter()
                .map(|&(digits, t)| {
                    let sets = if digits == Digits::Naf { &naf } else { &tc };
                    sets.iter()
                        .map(|set| {
                            (0..len)
                                .step_by(t)
                                .filter(|&c| any_bit(set, c, t.min(len - c)))
                                .count()
                        })
                        .sum::<usize>()
                })
                .collect::<Vec<usize>>()
        })
        .reduce(
            || vec![0usize; options.len()],
            |mut acc, v| {
                acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
                acc
            },
        );
    let exact = options
        .iter()
        .zip(lookups)
        .map(|(&(digits, t), l)| (digits, t, tables(digits, t) as f64 + scale * l as f64))
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .unwrap_or((Digits::TwosComplement, 1, 0.0));
    (exact, zero_free)
}

/// Whether any of the `len ≤ 64` bits from `start` is set in the bit set `set`.
fn any_bit(set: &[u64], start: usize, len: usize) -> bool {
    let (w, off) = (start / 64, start % 64);
    let mut v = set[w] >> off;
    if off + len > 64 {
        v |= set[w + 1] << (64 - off);
    }
    v & (u64::MAX >> (64 - len)) != 0
}

/// Builds the table of a chunk: every subset sum (two's complement), every signed pattern
/// with top digit +1 (NAF), or every ±1 pattern with top digit +1 (zero-free), one addition per
/// entry that is not a single point.
///
/// The entries are built level by level, so that the additions of a level are independent and
/// run as one batch: level `j` adds point `j` to every entry of the levels below it.
/// `ext` holds the entries as points, `table` the same entries as addends.
fn build_table<E: FeCurve, L: Lanes<E>>(
    lanes: &L,
    chunk: &[L::Acc],
    digits: Digits,
    ext: &mut Vec<L::Acc>,
    table: &mut Vec<L::Entry>,
) {
    ext.clear();
    ext.push(lanes.identity());
    table.clear();
    let mut ops = Vec::new();
    // Appends `count` copies of `p` to `ext`, adds `ops` to them, and their addends to `table`.
    let level =
        |ext: &mut Vec<L::Acc>, table: &mut Vec<L::Entry>, p: &L::Acc, count, ops: &[Op]| {
            let from = ext.len();
            ext.extend(std::iter::repeat_n(p.clone(), count));
            lanes.add_many(ext, table, ops);
            table.extend(lanes.entries(&ext[from..]));
        };
    match digits {
        Digits::TwosComplement => {
            table.extend(lanes.entries(ext));
            for (j, p) in chunk.iter().enumerate() {
                // Entry 2^j + i = P_j + entry i.
                let lo = 1usize << j;
                ops.clear();
                ops.extend((1..lo).map(|i| Op::new(lo + i, i, false)));
                level(ext, table, p, lo, &ops);
            }
        }
        Digits::Naf => {
            // Entry u > 0 has top digit +1 at position j (3^j < 2u ≤ 3^(j+1)), and the
            // rest u − 3^j has fewer digits: entry = P_j ± entry |u − 3^j|.
            table.extend(lanes.entries(ext));
            let mut pow = 1usize;
            for p in chunk {
                let (lo, hi) = (pow.div_ceil(2), (3 * pow - 1) / 2);
                ops.clear();
                for u in lo..=hi {
                    let rest = u as i64 - pow as i64;
                    if rest != 0 {
                        ops.push(Op::new(u, rest.unsigned_abs() as usize, rest < 0));
                    }
                }
                level(ext, table, p, hi - lo + 1, &ops);
                pow *= 3;
            }
        }
        Digits::ZeroFree => {
            // Entry 1 + m: P_top + Σ_(j<top) ±P_j, + where bit j of m is set. Entry 1 has
            // every lower digit −1; setting bit j adds 2·P_j.
            let (top, lower) = chunk.split_last().expect("chunks are not empty");
            let lower_entries = lanes.entries(lower);
            ext.push(top.clone());
            ops.clear();
            ops.extend((0..lower.len()).map(|i| Op::new(1, i, true)));
            lanes.add_many(ext, &lower_entries, &ops);
            let mut doubled = lower.to_vec();
            ops.clear();
            ops.extend((0..lower.len()).map(|i| Op::new(i, i, false)));
            lanes.add_many(&mut doubled, &lower_entries, &ops);
            table.extend(lanes.entries(ext));
            for (j, d) in doubled.iter().enumerate() {
                let lo = 1usize << j;
                ops.clear();
                ops.extend((lo..2 * lo).map(|m| Op::new(1 + m, 1 + m - lo, false)));
                level(ext, table, d, lo, &ops);
            }
        }
    }
}

/// `Σ_i rows[k][i]·points[i]` for every prepared key `k` (twice that if
/// [`BitPlanes::doubled`]), by bit planes over subset sums, on the process's backend
/// ([`Backend::active`]).
///
/// The loop runs chunk-major: one chunk's table is built, used by every key while it is in
/// cache, and dropped; each key then combines its planes by Horner's rule. `keys` selects a
/// range of the prepared keys (all of them for `0..planes.keys()`), so that callers can split
/// the keys across threads.
///
/// # Panics
/// If `points.len()` differs from the rows' length or `keys` is out of range.
pub fn subset_sum_products<E: FeCurve>(
    points: &[RawPoint<E>],
    planes: &BitPlanes,
    keys: std::ops::Range<usize>,
) -> Vec<RawPoint<E>> {
    subset_sum_products_on::<E>(Backend::active(), points, planes, keys)
}

/// [`subset_sum_products`] on a chosen backend (the fallback where this curve or CPU lacks
/// it): for tests and comparisons.
pub fn subset_sum_products_on<E: FeCurve>(
    backend: Backend,
    points: &[RawPoint<E>],
    planes: &BitPlanes,
    keys: std::ops::Range<usize>,
) -> Vec<RawPoint<E>> {
    assert_eq!(points.len(), planes.n, "one point per scalar");
    assert!(keys.end <= planes.keys);
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Avx2 && crate::backend::avx2_enabled() {
        if let Ok(points) = same_curve::<E, crate::Ristretto>(points.to_vec()) {
            let out = products_with(&crate::backend::Avx2Lanes, &points, planes, keys);
            return same_curve::<crate::Ristretto, E>(out).expect("E is Ristretto here");
        }
    }
    let _ = backend;
    products_with::<E, _>(&CurvLanes, points, planes, keys)
}

/// [`subset_sum_products`] with the arithmetic of `lanes`.
pub(crate) fn products_with<E: FeCurve, L: Lanes<E>>(
    lanes: &L,
    points: &[RawPoint<E>],
    planes: &BitPlanes,
    keys: std::ops::Range<usize>,
) -> Vec<RawPoint<E>> {
    let np = planes.planes;
    let per_key = planes.chunks.len() * np;
    let nk = keys.len();
    let points = lanes.load(points);
    let mut accs = vec![lanes.identity(); nk * np];
    let (mut ext, mut table, mut ops) = (Vec::new(), Vec::new(), Vec::new());
    // Σ P_i over the zero-free chunks: their all-plus entries.
    let mut zero_free_sum = vec![lanes.identity()];
    for (c, chunk) in planes.chunks.iter().enumerate() {
        let range = chunk.start..chunk.start + chunk.len;
        build_table::<E, L>(lanes, &points[range], chunk.digits, &mut ext, &mut table);
        if chunk.digits == Digits::ZeroFree {
            let all_plus = [Op::new(0, 1 << (chunk.len - 1), false)];
            lanes.add_many(&mut zero_free_sum, &table, &all_plus);
        }
        ops.clear();
        for (i, k) in keys.clone().enumerate() {
            let base = k * per_key + c * np;
            for (p, &code) in planes.codes[base..base + np].iter().enumerate() {
                if code != 0 {
                    let entry = (code & !NEG) as usize;
                    ops.push(Op::new(i * np + p, entry, code & NEG != 0));
                }
            }
        }
        lanes.add_many(&mut accs, &table, &ops);
    }
    // Σ 2^p·acc[p] (signs are in the codes), by Horner's rule from the top plane, all keys
    // in one batch per step.
    let plane = |p: usize| -> Vec<L::Acc> { (0..nk).map(|i| accs[i * np + p].clone()).collect() };
    let same: Vec<Op> = (0..nk).map(|i| Op::new(i, i, false)).collect();
    let mut r = plane(np - 1);
    for p in (0..np - 1).rev() {
        let twice = lanes.entries(&r);
        lanes.add_many(&mut r, &twice, &same);
        lanes.add_many(&mut r, &lanes.entries(&plane(p)), &same);
    }
    if planes.doubled() {
        let minus: Vec<Op> = (0..nk).map(|i| Op::new(i, 0, true)).collect();
        lanes.add_many(&mut r, &lanes.entries(&zero_free_sum), &minus);
    }
    lanes.store(&r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{generator, mul_i64, wrap, Ristretto, Secp256k1};
    use curv::arithmetic::{BigInt, One};
    use curv::elliptic::curves::Point;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

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

    /// The batched tables of `bases` hold exactly the entries of one [`FixedBase`] each.
    fn check_fixed_bases<E: FeCurve, L: Lanes<E>>(lanes: L, bases: &[RawPoint<E>], w: usize) {
        let t = FixedBases::new(lanes, bases, w);
        for (b, p) in bases.iter().enumerate() {
            let one = FixedBase::<E>::new(p, w);
            assert_eq!(t.stride, one.table.len());
            let mine = &t.table[b * t.stride..(b + 1) * t.stride];
            let acc = t.lanes.identity();
            // Each entry, added to the identity, gives the point back.
            for (k, want) in one.table.iter().enumerate() {
                let mut accs = vec![acc.clone()];
                t.lanes.add_many(&mut accs, mine, &[Op::new(0, k, false)]);
                assert!(t.lanes.store(&accs)[0] == *want, "base {b}, entry {k}");
            }
        }
    }

    #[test]
    fn batched_fixed_base_tables_equal_one_table_per_base_on_every_backend() {
        let bases = random_points::<Ristretto>(21);
        for backend in Backend::available() {
            match backend {
                Backend::Curv => check_fixed_bases::<Ristretto, _>(CurvLanes, &bases, 4),
                #[cfg(target_arch = "x86_64")]
                Backend::Avx2 => {
                    check_fixed_bases(crate::backend::Avx2Lanes, &bases, 4);
                    check_fixed_bases(crate::backend::Avx2Lanes, &bases[..3], 2);
                }
                #[cfg(not(target_arch = "x86_64"))]
                Backend::Avx2 => unreachable!("AVX2 is only detected on x86-64"),
            }
        }
        check_fixed_bases::<Secp256k1, _>(CurvLanes, &random_points::<Secp256k1>(3), 3);
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

    /// Every digit form and chunk width, mixed forms, and the chosen layouts give the naive
    /// products (doubled exactly when a zero-free segment is used).
    fn check_planes<E: FeCurve>(rows: &[Vec<i64>], splits: &[usize]) {
        let n = rows[0].len();
        let pts = random_points::<E>(n);
        let lo = rows.iter().flatten().copied().min().unwrap_or(0);
        let hi = rows.iter().flatten().copied().max().unwrap_or(0);
        let bits = BitPlanes::bits_for(lo, hi);
        let want: Vec<Point<E>> = rows.iter().map(|r| naive::<E>(&pts, r)).collect();
        let forms = [Digits::TwosComplement, Digits::Naf, Digits::ZeroFree];
        let forced = forms
            .iter()
            .flat_map(|&d| (1..=d.max_width()).map(move |t| (d, t)))
            .map(|(d, t)| BitPlanes::with_layout(rows, bits, &[(n, d, t)]));
        // Zero-free next to each exact form, cut at the middle.
        let mixed = [Digits::TwosComplement, Digits::Naf].map(|d| {
            let half = n / 2;
            BitPlanes::with_layout(rows, bits, &[(half, Digits::ZeroFree, 3), (n - half, d, 2)])
        });
        let chosen = [
            BitPlanes::new(rows, bits, splits, false),
            BitPlanes::new(rows, bits, splits, true),
        ];
        assert!(!chosen[0].doubled());
        for planes in forced.chain(mixed).chain(chosen) {
            let scale = Scalar::<E>::from(if planes.doubled() { 2 } else { 1 });
            let want: Vec<Point<E>> = want.iter().map(|w| w * &scale).collect();
            // On every backend this CPU runs (each falls back on curves it lacks).
            for backend in Backend::available() {
                let got = subset_sum_products_on::<E>(backend, &pts, &planes, 0..rows.len());
                let got: Vec<Point<E>> = got.into_iter().map(wrap::<E>).collect();
                assert_eq!(got, want, "{backend:?}");
                // A sub-range of keys gives the same products.
                if rows.len() > 1 {
                    let tail = subset_sum_products_on::<E>(backend, &pts, &planes, 1..rows.len());
                    assert_eq!(wrap::<E>(tail[0].clone()), want[1]);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn bit_planes_match_naive(
            rows in (1usize..30).prop_flat_map(|n| proptest::collection::vec(
                proptest::collection::vec(-128i64..=127, n), 1..5)),
            split in 0usize..30,
        ) {
            check_planes::<Ristretto>(&rows, &[split]);
        }

        #[test]
        fn sparse_bit_planes_match_naive(
            rows in (1usize..40).prop_flat_map(|n| proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![6 => Just(0i64), 2 => -8i64..=8, 1 => -128i64..=127], n),
                1..6)),
        ) {
            check_planes::<Ristretto>(&rows, &[]);
        }

        #[test]
        fn zero_free_codes_reconstruct(
            (bits, v) in (2usize..=16).prop_flat_map(|b| {
                (Just(b), proptest::collection::vec(-(1i64 << (b - 1))..(1i64 << (b - 1)), 1..=12))
            }),
        ) {
            // Σ_p 2^p·(signed pattern of plane p) = 2v + 1 for every entry of the chunk.
            let masks: Vec<(u64, u64)> =
                v.iter().map(|&x| entry_masks(x, Digits::ZeroFree, bits)).collect();
            let mut codes = vec![0u16; bits];
            chunk_codes(&masks, Digits::ZeroFree, &mut codes);
            let top = v.len() - 1;
            let mut sum = vec![0i64; v.len()];
            for (p, &code) in codes.iter().enumerate() {
                prop_assert!(code != 0, "every plane has a lookup");
                let sign = if code & NEG != 0 { -1 } else { 1 };
                let m = usize::from(code & !NEG) - 1;
                for (j, s) in sum.iter_mut().enumerate() {
                    let digit = if j == top || (m >> j) & 1 == 1 { 1 } else { -1 };
                    *s += (sign * digit) << p;
                }
            }
            let want: Vec<i64> = v.iter().map(|&x| 2 * x + 1).collect();
            prop_assert_eq!(sum, want);
        }

        #[test]
        fn naf_masks_reconstruct(v in proptest::num::i64::ANY.prop_map(|v| v >> 2)) {
            let (pos, neg) = naf_masks(v);
            prop_assert_eq!(pos & neg, 0);
            let nonzero = pos | neg;
            prop_assert_eq!(nonzero & (nonzero << 1), 0, "adjacent non-zero digits");
            prop_assert_eq!(pos as i128 - neg as i128, i128::from(v));
        }
    }

    #[test]
    fn bit_planes_extremes() {
        // Bounds of the two's complement range, zeros, wide entries, and secp256k1.
        check_planes::<Ristretto>(
            &[vec![-128, 127, 0, -1, 1], vec![0; 5], vec![-128; 5]],
            &[2],
        );
        check_planes::<Ristretto>(&[vec![1 << 40, -(1 << 40) - 3, 7]], &[1]);
        check_planes::<Secp256k1>(&[vec![-5, 6, 127, -128, 0, 3, 9]], &[4]);
        assert_eq!(BitPlanes::bits_for(-128, 127), 8);
        assert_eq!(BitPlanes::bits_for(-128, 128), 9);
        assert_eq!(BitPlanes::bits_for(0, 0), 2);
    }

    /// `keys` rows of `n` uniform 8-bit entries.
    fn uniform_rows(rng: &mut impl Rng, keys: usize, n: usize) -> Vec<Vec<i64>> {
        (0..keys)
            .map(|_| (0..n).map(|_| rng.gen_range(-128..=127)).collect())
            .collect()
    }

    #[test]
    fn layout_follows_sparsity() {
        // Dense uniform entries: two's complement; mostly zeros and small values: NAF.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dense = uniform_rows(&mut rng, 128, 64);
        let sparse: Vec<Vec<i64>> = (0..128)
            .map(|_| {
                (0..64)
                    .map(|_| {
                        if rng.gen_bool(0.7) {
                            0
                        } else {
                            rng.gen_range(-6..=6)
                        }
                    })
                    .collect()
            })
            .collect();
        let planes = BitPlanes::new(&dense, 8, &[], false);
        assert_eq!(planes.chunks[0].digits, Digits::TwosComplement);
        let sparse_planes = BitPlanes::new(&sparse, 8, &[], true);
        assert!(!sparse_planes.doubled(), "sparse keys keep their zeros");
        assert_eq!(sparse_planes.chunks[0].digits, Digits::Naf);
        assert!(sparse_planes.additions() < planes.additions() / 2);
        // The layout chosen on a sample of the keys is within 5 % of every fixed one.
        for t in 1..=MAX_CHUNK_BITS {
            let fixed = BitPlanes::with_layout(&sparse, 8, &[(64, Digits::TwosComplement, t)]);
            assert!(sparse_planes.additions() * 20 <= fixed.additions() * 21);
        }
        for t in 1..=MAX_NAF_CHUNK_BITS {
            let fixed = BitPlanes::with_layout(&sparse, 8, &[(64, Digits::Naf, t)]);
            assert!(sparse_planes.additions() * 20 <= fixed.additions() * 21);
        }
        // Dense keys, allowed to double: zero-free digits, cheaper than any exact layout.
        let doubled = BitPlanes::new(&dense, 8, &[], true);
        assert!(doubled.doubled());
        assert!(doubled.chunks.iter().all(|c| c.digits == Digits::ZeroFree));
        assert!(doubled.additions() < planes.additions());
        for t in 1..=MAX_ZERO_FREE_CHUNK_BITS {
            let fixed = BitPlanes::with_layout(&dense, 8, &[(64, Digits::ZeroFree, t)]);
            assert!(doubled.additions() <= fixed.additions());
        }
    }

    #[test]
    fn zero_free_pays_for_dense_training_shapes() {
        // 128 uniform 8-bit keys over 785 points plus 32 digits of a scalar (the forward
        // pass): zero-free tables of 2^(t−1) allow wider chunks, about 8 % fewer additions
        // (1,027 → 940 per key).
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let rows = uniform_rows(&mut rng, 128, 817);
        let exact = BitPlanes::new(&rows, 8, &[785], false);
        let doubled = BitPlanes::new(&rows, 8, &[785], true);
        assert!(doubled.doubled() && !exact.doubled());
        assert!(doubled.additions() * 20 < exact.additions() * 19);
    }

    #[test]
    fn recoding_reaches_the_group_order() {
        // The largest scalars (q − 1, and 2^k − 1 below q) recode without a leftover carry
        // into scalar_digits digits, and the digits give the scalar back.
        fn check<E: FeCurve>() {
            let minus_one = -Scalar::<E>::from(1);
            let big = Scalar::<E>::from_bigint(
                &((BigInt::one() << (E::SCALAR_BITS - 1)) - BigInt::one()),
            );
            for s in [minus_one, big, Scalar::<E>::random(), Scalar::<E>::zero()] {
                for w in 2..=24 {
                    let d = recode_scalar::<E>(&s, w);
                    assert_eq!(d.len(), scalar_digits::<E>(w));
                    let back = d.iter().rev().fold(Scalar::<E>::zero(), |acc, &x| {
                        acc * Scalar::<E>::from(1u64 << w) + Scalar::<E>::from(x)
                    });
                    assert_eq!(back, s, "w = {w}");
                    assert!(d
                        .iter()
                        .all(|&x| (-(1 << (w - 1))..(1 << (w - 1))).contains(&x)));
                }
            }
        }
        check::<Ristretto>();
        check::<Secp256k1>();
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
