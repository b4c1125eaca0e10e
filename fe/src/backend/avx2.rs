//! Four independent Ristretto255 point additions at once, in AVX2 registers.
//!
//! Hand-written because no kept crate offers it: `curve25519-dalek` has an AVX2 backend, but it
//! is crate-private and serves only its own multi-scalar multiplication, and its public `+`
//! always runs the serial one. This is the only module of the workspace where `unsafe` is
//! allowed; every block says why it is sound.
//!
//! # Field elements
//!
//! An element of `GF(p)`, `p = 2^255 − 19`, is 10 limbs in radix `2^25.5`: limb `i` has weight
//! `2^⌈25.5·i⌉` (offsets 0, 26, 51, 77, …, 230), 26 bits for even `i`, 25 for odd. A vector
//! [`F4`] holds limb `i` of four elements in the four 64-bit lanes of one register, so that
//! `vpmuludq` (32×32→64 bits, four lanes) does four products at once.
//!
//! *Multiplication*: `c_k = Σ_(i+j=k) a_i·b_j·2^[i,j odd] + 19·Σ_(i+j=k+10) a_i·b_j·2^[i,j odd]`,
//! because `⌈25.5i⌉ + ⌈25.5j⌉ = ⌈25.5(i+j)⌉ + 1` exactly when `i` and `j` are both odd, and
//! `2^255 ≡ 19`. Then one carry chain (0→1, 4→5, 1→2, 5→6, 2→3, 6→7, 3→4, 7→8, 4→5, 8→9,
//! 9→0 times 19, 0→1) leaves every limb *reduced*: below `2^26` (even) or `2^25 + 2^15` (odd).
//!
//! *Limb bounds*: sums `a + b` and differences `a + 2p − b` of reduced elements have limbs
//! below `3·2^26`, so `19·b_j < 57·2^26 < 2^32` and `2·a_i < 2^32` fit `vpmuludq`'s 32-bit
//! inputs, every product is below `2^(28.6+31.9) = 2^60.5`, and a column of 10 products below
//! `2^63.8`: no lane overflows. A difference needs its subtrahend reduced (then every limb of
//! `2p` is at least the subtrahend's, and no lane goes negative). The point formulas below only
//! ever multiply sums or differences of reduced elements, and only subtract reduced ones.
//!
//! # Points
//!
//! Extended coordinates `(X:Y:Z:T)` of the Edwards curve `−x² + y² = 1 + d·x²y²` under the
//! Ristretto group, `x = X/Z`, `y = Y/Z`, `xy = T/Z`. An addend is kept as `(Y+X, Y−X, 2Z,
//! 2d·T)`, and (Hisil, Wong, Carter, Dawson 2008, the unified formula for `a = −1`):
//!
//! ```text
//! A = (Y1−X1)(Y2−X2)   B = (Y1+X1)(Y2+X2)   C = T1·2dT2   D = Z1·2Z2
//! E = B − A   F = D − C   G = D + C   H = B + A
//! X3 = E·F    Y3 = G·H    T3 = E·H    Z3 = F·G
//! ```
//!
//! eight multiplications, complete (it also doubles and adds the identity). Subtracting an
//! addend swaps `Y+X` with `Y−X` and negates `2dT`, lane by lane.
//!
//! # Decoding
//!
//! Ciphertexts arrive as 32-byte encodings, and decoding one (RFC 9496, section 4.3.1) costs
//! an inverse square root: `w³·(w⁷)^((p−5)/8)` for `w = v·u2²`, 252 squarings and about 20
//! multiplications. [`decompress_many`] runs it on four encodings at once, with a squaring of
//! its own (55 products instead of 100; each product's factor `2^[i≠j]·2^[i,j odd]·19^[i+j≥10]`
//! is split between its inputs so that both stay below `2^32`, which needs even limbs below
//! `2^27` and odd ones below `2^26`). The byte checks (`s < p`, `s` even), the comparisons
//! and the signs of the sign fix-ups are read lane by lane from canonical limbs: the inputs
//! are public ciphertexts, so nothing needs constant time. The decoded point is
//! `(x, y, 1, x·y)`, exactly dalek's.
//!
//! # Conversion from and to `curve25519-dalek`
//!
//! Between the algorithms' calls points are curv's (dalek's), and the backend reads the coordinates of dalek 3's `RistrettoPoint` directly (four elements of five
//! 64-bit limbs in radix `2^51`, its `u64_backend`). That layout is not a promise of dalek's,
//! so [`layout_holds`] checks it at run time on known points and on sums against dalek's own
//! `+`, and the backend is used only if every check passes; a different layout (another dalek
//! version, its 32-bit backend) makes it fall back to curv. Reading and writing the limbs is
//! sound whatever their meaning: both types are 160 bytes of plain `u64`s without padding
//! (the transmute checks the size at compile time).

#![allow(unsafe_code)]

use super::Op;
use core::arch::x86_64::*;
use curve25519_dalek::ristretto::RistrettoPoint;

/// Limbs per field element.
const L: usize = 10;
/// Limbs of `2p`, the bias of a subtraction.
const TWO_P: [u64; L] = [
    134217690, 67108862, 134217726, 67108862, 134217726, 67108862, 134217726, 67108862, 134217726,
    67108862,
];
/// Limbs of `2d`, `d = −121665/121666`.
const TWO_D: [u64; L] = [
    45281625, 27714825, 36363642, 13898781, 229458, 15978800, 54557047, 27058993, 29715967, 9444199,
];

/// Limbs of `d`.
const D: [u64; L] = [
    56195235, 13857412, 51736253, 6949390, 114729, 24766616, 60832955, 30306712, 48412415, 21499315,
];
/// Limbs of `√−1 = 2^((p−1)/4)`.
const SQRT_M1: [u64; L] = [
    34513072, 25610706, 9377949, 3500415, 12389472, 33281959, 41962654, 31548777, 326685, 11406482,
];
/// Limbs of 1.
const ONE: [u64; L] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// 40 limbs of 32 bits: every limb the backend stores is below `2^28`, and 160 bytes per
/// point (as dalek's) keep the tables as small as curv's.
type Row = [u32; 4 * L];

/// A point in extended coordinates, point-major: limb `i` of coordinate `c` (X, Y, Z, T) at
/// `10c + i`, every limb reduced.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Ext(Row);

/// An addend `(Y+X, Y−X, 2Z, 2dT)`, laid out as [`Ext`].
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Niels(Row);

impl Ext {
    /// The identity `(0:1:1:0)`.
    pub(crate) const IDENTITY: Ext = {
        let mut a = [0u32; 4 * L];
        a[L] = 1;
        a[2 * L] = 1;
        Ext(a)
    };
}

type V = __m256i;

/// Limb `i` of four field elements, one per 64-bit lane.
type F4 = [V; L];

/// Four points, coordinate-major: `[X, Y, Z, T]`.
type P4 = [F4; 4];

#[inline]
#[target_feature(enable = "avx2")]
fn splat(v: u64) -> V {
    _mm256_set1_epi64x(v as i64)
}

#[inline]
#[target_feature(enable = "avx2")]
fn add(a: &F4, b: &F4) -> F4 {
    let mut c = *a;
    for i in 0..L {
        c[i] = _mm256_add_epi64(a[i], b[i]);
    }
    c
}

/// `a − b`, for a reduced `b`.
#[inline]
#[target_feature(enable = "avx2")]
fn sub(a: &F4, b: &F4) -> F4 {
    let mut c = *a;
    for i in 0..L {
        c[i] = _mm256_sub_epi64(_mm256_add_epi64(a[i], splat(TWO_P[i])), b[i]);
    }
    c
}

/// The carry chain of the module doc: every limb reduced.
#[inline]
#[target_feature(enable = "avx2")]
fn carry(c: F4) -> F4 {
    let m26 = splat((1 << 26) - 1);
    let m25 = splat((1 << 25) - 1);
    let [mut c0, mut c1, mut c2, mut c3, mut c4, mut c5, mut c6, mut c7, mut c8, mut c9] = c;
    let cy = _mm256_srli_epi64::<26>(c0);
    c0 = _mm256_and_si256(c0, m26);
    c1 = _mm256_add_epi64(c1, cy);
    let cy = _mm256_srli_epi64::<26>(c4);
    c4 = _mm256_and_si256(c4, m26);
    c5 = _mm256_add_epi64(c5, cy);
    let cy = _mm256_srli_epi64::<25>(c1);
    c1 = _mm256_and_si256(c1, m25);
    c2 = _mm256_add_epi64(c2, cy);
    let cy = _mm256_srli_epi64::<25>(c5);
    c5 = _mm256_and_si256(c5, m25);
    c6 = _mm256_add_epi64(c6, cy);
    let cy = _mm256_srli_epi64::<26>(c2);
    c2 = _mm256_and_si256(c2, m26);
    c3 = _mm256_add_epi64(c3, cy);
    let cy = _mm256_srli_epi64::<26>(c6);
    c6 = _mm256_and_si256(c6, m26);
    c7 = _mm256_add_epi64(c7, cy);
    let cy = _mm256_srli_epi64::<25>(c3);
    c3 = _mm256_and_si256(c3, m25);
    c4 = _mm256_add_epi64(c4, cy);
    let cy = _mm256_srli_epi64::<25>(c7);
    c7 = _mm256_and_si256(c7, m25);
    c8 = _mm256_add_epi64(c8, cy);
    let cy = _mm256_srli_epi64::<26>(c4);
    c4 = _mm256_and_si256(c4, m26);
    c5 = _mm256_add_epi64(c5, cy);
    let cy = _mm256_srli_epi64::<26>(c8);
    c8 = _mm256_and_si256(c8, m26);
    c9 = _mm256_add_epi64(c9, cy);
    let cy = _mm256_srli_epi64::<25>(c9);
    c9 = _mm256_and_si256(c9, m25);
    // 19·cy = 16cy + 2cy + cy (cy may exceed 32 bits).
    let cy19 = _mm256_add_epi64(_mm256_slli_epi64::<4>(cy), _mm256_slli_epi64::<1>(cy));
    c0 = _mm256_add_epi64(c0, _mm256_add_epi64(cy19, cy));
    let cy = _mm256_srli_epi64::<26>(c0);
    c0 = _mm256_and_si256(c0, m26);
    c1 = _mm256_add_epi64(c1, cy);
    [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9]
}

/// `a·b`, reduced, for inputs within the bounds of the module doc.
#[inline]
#[target_feature(enable = "avx2")]
fn mul(a: &F4, b: &F4) -> F4 {
    // The 100 products written out (generated from the formula of the module doc), summed
    // as balanced trees.
    let nineteen = splat(19);
    let b19_1 = _mm256_mul_epu32(b[1], nineteen);
    let b19_2 = _mm256_mul_epu32(b[2], nineteen);
    let b19_3 = _mm256_mul_epu32(b[3], nineteen);
    let b19_4 = _mm256_mul_epu32(b[4], nineteen);
    let b19_5 = _mm256_mul_epu32(b[5], nineteen);
    let b19_6 = _mm256_mul_epu32(b[6], nineteen);
    let b19_7 = _mm256_mul_epu32(b[7], nineteen);
    let b19_8 = _mm256_mul_epu32(b[8], nineteen);
    let b19_9 = _mm256_mul_epu32(b[9], nineteen);
    let a2_1 = _mm256_add_epi64(a[1], a[1]);
    let a2_3 = _mm256_add_epi64(a[3], a[3]);
    let a2_5 = _mm256_add_epi64(a[5], a[5]);
    let a2_7 = _mm256_add_epi64(a[7], a[7]);
    let a2_9 = _mm256_add_epi64(a[9], a[9]);
    let c0 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[0]), _mm256_mul_epu32(a2_1, b19_9)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b19_8),
                _mm256_add_epi64(_mm256_mul_epu32(a2_3, b19_7), _mm256_mul_epu32(a[4], b19_6)),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, b19_5), _mm256_mul_epu32(a[6], b19_4)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a2_7, b19_3),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_2), _mm256_mul_epu32(a2_9, b19_1)),
            ),
        ),
    );
    let c1 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[1]), _mm256_mul_epu32(a[1], b[0])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b19_9),
                _mm256_add_epi64(_mm256_mul_epu32(a[3], b19_8), _mm256_mul_epu32(a[4], b19_7)),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[5], b19_6), _mm256_mul_epu32(a[6], b19_5)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[7], b19_4),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_3), _mm256_mul_epu32(a[9], b19_2)),
            ),
        ),
    );
    let c2 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[2]), _mm256_mul_epu32(a2_1, b[1])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[0]),
                _mm256_add_epi64(_mm256_mul_epu32(a2_3, b19_9), _mm256_mul_epu32(a[4], b19_8)),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, b19_7), _mm256_mul_epu32(a[6], b19_6)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a2_7, b19_5),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_4), _mm256_mul_epu32(a2_9, b19_3)),
            ),
        ),
    );
    let c3 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[3]), _mm256_mul_epu32(a[1], b[2])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[1]),
                _mm256_add_epi64(_mm256_mul_epu32(a[3], b[0]), _mm256_mul_epu32(a[4], b19_9)),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[5], b19_8), _mm256_mul_epu32(a[6], b19_7)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[7], b19_6),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_5), _mm256_mul_epu32(a[9], b19_4)),
            ),
        ),
    );
    let c4 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[4]), _mm256_mul_epu32(a2_1, b[3])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[2]),
                _mm256_add_epi64(_mm256_mul_epu32(a2_3, b[1]), _mm256_mul_epu32(a[4], b[0])),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, b19_9), _mm256_mul_epu32(a[6], b19_8)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a2_7, b19_7),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_6), _mm256_mul_epu32(a2_9, b19_5)),
            ),
        ),
    );
    let c5 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[5]), _mm256_mul_epu32(a[1], b[4])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[3]),
                _mm256_add_epi64(_mm256_mul_epu32(a[3], b[2]), _mm256_mul_epu32(a[4], b[1])),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[5], b[0]), _mm256_mul_epu32(a[6], b19_9)),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[7], b19_8),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_7), _mm256_mul_epu32(a[9], b19_6)),
            ),
        ),
    );
    let c6 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[6]), _mm256_mul_epu32(a2_1, b[5])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[4]),
                _mm256_add_epi64(_mm256_mul_epu32(a2_3, b[3]), _mm256_mul_epu32(a[4], b[2])),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, b[1]), _mm256_mul_epu32(a[6], b[0])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a2_7, b19_9),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_8), _mm256_mul_epu32(a2_9, b19_7)),
            ),
        ),
    );
    let c7 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[7]), _mm256_mul_epu32(a[1], b[6])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[5]),
                _mm256_add_epi64(_mm256_mul_epu32(a[3], b[4]), _mm256_mul_epu32(a[4], b[3])),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[5], b[2]), _mm256_mul_epu32(a[6], b[1])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[7], b[0]),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b19_9), _mm256_mul_epu32(a[9], b19_8)),
            ),
        ),
    );
    let c8 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[8]), _mm256_mul_epu32(a2_1, b[7])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[6]),
                _mm256_add_epi64(_mm256_mul_epu32(a2_3, b[5]), _mm256_mul_epu32(a[4], b[4])),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, b[3]), _mm256_mul_epu32(a[6], b[2])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a2_7, b[1]),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b[0]), _mm256_mul_epu32(a2_9, b19_9)),
            ),
        ),
    );
    let c9 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[0], b[9]), _mm256_mul_epu32(a[1], b[8])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[2], b[7]),
                _mm256_add_epi64(_mm256_mul_epu32(a[3], b[6]), _mm256_mul_epu32(a[4], b[5])),
            ),
        ),
        _mm256_add_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(a[5], b[4]), _mm256_mul_epu32(a[6], b[3])),
            _mm256_add_epi64(
                _mm256_mul_epu32(a[7], b[2]),
                _mm256_add_epi64(_mm256_mul_epu32(a[8], b[1]), _mm256_mul_epu32(a[9], b[0])),
            ),
        ),
    );
    carry([c0, c1, c2, c3, c4, c5, c6, c7, c8, c9])
}

/// `a²`, reduced, for inputs with even limbs below `2^27` and odd ones below `2^26` (reduced
/// elements and `a + 2p − b` of reduced ones).
///
/// The 55 products `a_i·a_j`, `i ≤ j`, of the multiplication's formula, each with its factor
/// `2^[i≠j]·2^[i,j odd]·19^[i+j≥10]` split between its two inputs so that both stay below
/// `2^32` (`2a_i < 2^28`, `38a_j < 2^32` for odd `j`, `19a_j < 2^32`).
#[inline]
#[target_feature(enable = "avx2")]
fn sq(a: &F4) -> F4 {
    // Generated from the formula above, summed as balanced trees.
    let (n19, n38) = (splat(19), splat(38));
    let a2_0 = _mm256_add_epi64(a[0], a[0]);
    let a2_1 = _mm256_add_epi64(a[1], a[1]);
    let a2_2 = _mm256_add_epi64(a[2], a[2]);
    let a2_3 = _mm256_add_epi64(a[3], a[3]);
    let a2_4 = _mm256_add_epi64(a[4], a[4]);
    let a2_5 = _mm256_add_epi64(a[5], a[5]);
    let a2_6 = _mm256_add_epi64(a[6], a[6]);
    let a2_7 = _mm256_add_epi64(a[7], a[7]);
    let a2_8 = _mm256_add_epi64(a[8], a[8]);
    let a19_6 = _mm256_mul_epu32(a[6], n19);
    let a19_7 = _mm256_mul_epu32(a[7], n19);
    let a19_8 = _mm256_mul_epu32(a[8], n19);
    let a19_9 = _mm256_mul_epu32(a[9], n19);
    let a38_5 = _mm256_mul_epu32(a[5], n38);
    let a38_7 = _mm256_mul_epu32(a[7], n38);
    let a38_9 = _mm256_mul_epu32(a[9], n38);
    let c0 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_mul_epu32(a[0], a[0]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_1, a38_9), _mm256_mul_epu32(a2_2, a19_8)),
        ),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_3, a38_7),
            _mm256_add_epi64(_mm256_mul_epu32(a2_4, a19_6), _mm256_mul_epu32(a[5], a38_5)),
        ),
    );
    let c1 = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(a2_0, a[1]), _mm256_mul_epu32(a2_2, a19_9)),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_3, a19_8),
            _mm256_add_epi64(_mm256_mul_epu32(a2_4, a19_7), _mm256_mul_epu32(a2_5, a19_6)),
        ),
    );
    let c2 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_0, a[2]),
            _mm256_add_epi64(_mm256_mul_epu32(a[1], a2_1), _mm256_mul_epu32(a2_3, a38_9)),
        ),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_4, a19_8),
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, a38_7), _mm256_mul_epu32(a[6], a19_6)),
        ),
    );
    let c3 = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(a2_0, a[3]), _mm256_mul_epu32(a2_1, a[2])),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_4, a19_9),
            _mm256_add_epi64(_mm256_mul_epu32(a2_5, a19_8), _mm256_mul_epu32(a2_6, a19_7)),
        ),
    );
    let c4 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_0, a[4]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_1, a2_3), _mm256_mul_epu32(a[2], a[2])),
        ),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_5, a38_9),
            _mm256_add_epi64(_mm256_mul_epu32(a2_6, a19_8), _mm256_mul_epu32(a[7], a38_7)),
        ),
    );
    let c5 = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(a2_0, a[5]), _mm256_mul_epu32(a2_1, a[4])),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_2, a[3]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_6, a19_9), _mm256_mul_epu32(a2_7, a19_8)),
        ),
    );
    let c6 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_0, a[6]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_1, a2_5), _mm256_mul_epu32(a2_2, a[4])),
        ),
        _mm256_add_epi64(
            _mm256_mul_epu32(a[3], a2_3),
            _mm256_add_epi64(_mm256_mul_epu32(a2_7, a38_9), _mm256_mul_epu32(a[8], a19_8)),
        ),
    );
    let c7 = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(a2_0, a[7]), _mm256_mul_epu32(a2_1, a[6])),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_2, a[5]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_3, a[4]), _mm256_mul_epu32(a2_8, a19_9)),
        ),
    );
    let c8 = _mm256_add_epi64(
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_0, a[8]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_1, a2_7), _mm256_mul_epu32(a2_2, a[6])),
        ),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_3, a2_5),
            _mm256_add_epi64(_mm256_mul_epu32(a[4], a[4]), _mm256_mul_epu32(a[9], a38_9)),
        ),
    );
    let c9 = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(a2_0, a[9]), _mm256_mul_epu32(a2_1, a[8])),
        _mm256_add_epi64(
            _mm256_mul_epu32(a2_2, a[7]),
            _mm256_add_epi64(_mm256_mul_epu32(a2_3, a[6]), _mm256_mul_epu32(a2_4, a[5])),
        ),
    );
    carry([c0, c1, c2, c3, c4, c5, c6, c7, c8, c9])
}

/// `a^(2^k)` for `k ≥ 1`.
#[target_feature(enable = "avx2")]
fn sq_times(a: &F4, k: u32) -> F4 {
    let mut x = sq(a);
    for _ in 1..k {
        x = sq(&x);
    }
    x
}

/// Constant limbs as a vector element.
#[inline]
#[target_feature(enable = "avx2")]
fn constant(limbs: &[u64; L]) -> F4 {
    let mut c = [_mm256_setzero_si256(); L];
    for i in 0..L {
        c[i] = splat(limbs[i]);
    }
    c
}

/// Lanes where `mask` is all ones take `b`, the others `a`.
#[inline]
#[target_feature(enable = "avx2")]
fn select(a: &F4, b: &F4, mask: V) -> F4 {
    let mut c = *a;
    for i in 0..L {
        c[i] = _mm256_blendv_epi8(a[i], b[i], mask);
    }
    c
}

/// `p + q` (or `p − q` in the lanes where `neg` is all ones), by the formula of the module doc.
#[inline]
#[target_feature(enable = "avx2")]
fn add_niels(p: &P4, q: &P4, neg: V) -> P4 {
    let [x1, y1, z1, t1] = p;
    let ypx = select(&q[0], &q[1], neg);
    let ymx = select(&q[1], &q[0], neg);
    let zero = [_mm256_setzero_si256(); L];
    let t2d = select(&q[3], &sub(&zero, &q[3]), neg);
    let a = mul(&sub(y1, x1), &ymx);
    let b = mul(&add(y1, x1), &ypx);
    let c = mul(t1, &t2d);
    let d = mul(z1, &q[2]);
    let (e, f, g, h) = (sub(&b, &a), sub(&d, &c), add(&d, &c), add(&b, &a));
    [mul(&e, &f), mul(&g, &h), mul(&f, &g), mul(&e, &h)]
}

/// The addend form of four points.
#[inline]
#[target_feature(enable = "avx2")]
fn niels(p: &P4) -> P4 {
    let [x, y, z, t] = p;
    [add(y, x), sub(y, x), add(z, z), mul(t, &constant(&TWO_D))]
}

/// Transposes a 4×4 block of 64-bit words.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose(r: [V; 4]) -> [V; 4] {
    let t0 = _mm256_unpacklo_epi64(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi64(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi64(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi64(r[2], r[3]);
    [
        _mm256_permute2x128_si256::<0x20>(t0, t2),
        _mm256_permute2x128_si256::<0x20>(t1, t3),
        _mm256_permute2x128_si256::<0x31>(t0, t2),
        _mm256_permute2x128_si256::<0x31>(t1, t3),
    ]
}

/// Four point-major rows of 40 words into lane form.
#[inline]
#[target_feature(enable = "avx2")]
fn gather(rows: [&Row; 4]) -> P4 {
    let mut out = [[_mm256_setzero_si256(); L]; 4];
    for g in 0..L {
        let mut r = [_mm256_setzero_si256(); 4];
        for (v, row) in r.iter_mut().zip(rows) {
            // SAFETY: limbs 4g..4g+4 of a 40-limb array are in bounds (g < 10); the load is
            // unaligned and reads plain integers.
            let four = unsafe { _mm_loadu_si128(row.as_ptr().add(4 * g).cast()) };
            *v = _mm256_cvtepu32_epi64(four);
        }
        for (l, v) in transpose(r).into_iter().enumerate() {
            let k = 4 * g + l;
            out[k / L][k % L] = v;
        }
    }
    out
}

/// Lane form back into four point-major rows.
#[inline]
#[target_feature(enable = "avx2")]
fn scatter(p: &P4, rows: [&mut Row; 4]) {
    let mut rows = rows;
    // The low 32 bits of each 64-bit lane, into the low 128 bits.
    let low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for g in 0..L {
        let mut r = [_mm256_setzero_si256(); 4];
        for (l, v) in r.iter_mut().enumerate() {
            let k = 4 * g + l;
            *v = p[k / L][k % L];
        }
        for (v, row) in transpose(r).into_iter().zip(rows.iter_mut()) {
            let four = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, low_halves));
            // SAFETY: as in `gather`, limbs 4g..4g+4 are in bounds; the store is unaligned.
            unsafe { _mm_storeu_si128(row.as_mut_ptr().add(4 * g).cast(), four) };
        }
    }
}

/// All ones in the lanes whose flag is set.
#[inline]
#[target_feature(enable = "avx2")]
fn lane_mask(flags: [bool; 4]) -> V {
    let m = |b: bool| if b { -1i64 } else { 0 };
    _mm256_set_epi64x(m(flags[3]), m(flags[2]), m(flags[1]), m(flags[0]))
}

/// One group of up to four additions with distinct accumulators.
#[target_feature(enable = "avx2")]
fn add_group(accs: &mut [Ext], table: &[Niels], group: &[Op]) {
    const ID: Niels = identity_niels();
    let mut p_rows = [&Ext::IDENTITY.0; 4];
    let mut q_rows = [&ID.0; 4];
    let mut negs = [false; 4];
    for (l, op) in group.iter().enumerate() {
        p_rows[l] = &accs[op.acc as usize].0;
        q_rows[l] = &table[op.entry as usize].0;
        negs[l] = op.neg;
    }
    let r = add_niels(&gather(p_rows), &gather(q_rows), lane_mask(negs));
    let mut out = [[0u32; 4 * L]; 4];
    let [o0, o1, o2, o3] = &mut out;
    scatter(&r, [o0, o1, o2, o3]);
    for (l, op) in group.iter().enumerate() {
        accs[op.acc as usize].0 = out[l];
    }
}

/// `accs[op.acc] ±= table[op.entry]` for every op, four at a time.
#[target_feature(enable = "avx2")]
fn add_many_avx2(accs: &mut [Ext], table: &[Niels], ops: &[Op]) {
    let mut group: [Op; 4] = [Op::default(); 4];
    let mut len = 0;
    for &op in ops {
        if group[..len].iter().any(|g| g.acc == op.acc) {
            add_group(accs, table, &group[..len]);
            len = 0;
        }
        group[len] = op;
        len += 1;
        if len == 4 {
            add_group(accs, table, &group);
            len = 0;
        }
    }
    if len > 0 {
        add_group(accs, table, &group[..len]);
    }
}

/// The addend form of every point, four at a time.
#[target_feature(enable = "avx2")]
fn niels_many_avx2(points: &[Ext]) -> Vec<Niels> {
    let mut out = vec![Niels([0; 4 * L]); points.len()];
    for (src, dst) in points.chunks(4).zip(out.chunks_mut(4)) {
        let mut rows = [&Ext::IDENTITY.0; 4];
        for (r, p) in rows.iter_mut().zip(src) {
            *r = &p.0;
        }
        let q = niels(&gather(rows));
        let mut tmp = [[0u32; 4 * L]; 4];
        let [o0, o1, o2, o3] = &mut tmp;
        scatter(&q, [o0, o1, o2, o3]);
        for (d, t) in dst.iter_mut().zip(tmp) {
            d.0 = t;
        }
    }
    out
}

const fn identity_niels() -> Niels {
    // (Y+X, Y−X, 2Z, 2dT) of (0:1:1:0).
    let mut a = [0u32; 4 * L];
    a[0] = 1;
    a[L] = 1;
    a[2 * L] = 2;
    Niels(a)
}

/// Whether this CPU runs the backend (checked once by the caller).
pub(crate) fn cpu_has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
}

/// `accs[op.acc] ±= table[op.entry]` for every op.
///
/// # Panics
/// If an index is out of range.
pub(crate) fn add_many(accs: &mut [Ext], table: &[Niels], ops: &[Op]) {
    assert!(
        super::avx2_enabled(),
        "the AVX2 backend runs only where it was detected"
    );
    for op in ops {
        assert!((op.acc as usize) < accs.len() && (op.entry as usize) < table.len());
    }
    // SAFETY: `avx2_enabled` is true only after `cpu_has_avx2` found the feature on this CPU.
    unsafe { add_many_avx2(accs, table, ops) }
}

/// The addend form of every point.
pub(crate) fn niels_many(points: &[Ext]) -> Vec<Niels> {
    assert!(
        super::avx2_enabled(),
        "the AVX2 backend runs only where it was detected"
    );
    // SAFETY: as in `add_many`.
    unsafe { niels_many_avx2(points) }
}

// ---- Decoding Ristretto255 encodings, four at once ----

/// `x^((p−5)/8) = x^(2^252 − 3)`: the exponentiation of a square root, by the usual chain
/// (252 squarings, 11 multiplications).
#[target_feature(enable = "avx2")]
fn pow_p58(x: &F4) -> F4 {
    let x2 = sq(x);
    let x9 = mul(x, &sq_times(&x2, 2));
    let x11 = mul(&x2, &x9);
    let e5 = mul(&x9, &sq(&x11)); // x^(2^5 − 1)
    let e10 = mul(&sq_times(&e5, 5), &e5);
    let e20 = mul(&sq_times(&e10, 10), &e10);
    let e40 = mul(&sq_times(&e20, 20), &e20);
    let e50 = mul(&sq_times(&e40, 10), &e10);
    let e100 = mul(&sq_times(&e50, 50), &e50);
    let e200 = mul(&sq_times(&e100, 100), &e100);
    let e250 = mul(&sq_times(&e200, 50), &e50);
    mul(&sq_times(&e250, 2), x) // x^(2^252 − 4 + 1)
}

/// Every lane's limbs.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(a: &F4) -> [[u64; L]; 4] {
    let mut out = [[0u64; L]; 4];
    for (i, v) in a.iter().enumerate() {
        let mut w = [0u64; 4];
        // SAFETY: an unaligned store of one vector into four u64s.
        unsafe { _mm256_storeu_si256(w.as_mut_ptr().cast(), *v) };
        for l in 0..4 {
            out[l][i] = w[l];
        }
    }
    out
}

/// `−a` in the lanes whose element is negative (odd canonical value), for a reduced `a`.
#[inline]
#[target_feature(enable = "avx2")]
fn abs(a: &F4) -> F4 {
    let neg = lanes(a).map(|l| canonical(l)[0] & 1 == 1);
    select(a, &sub(&[_mm256_setzero_si256(); L], a), lane_mask(neg))
}

/// The decoding of RFC 9496 (section 4.3.1) of four field elements `s` that the caller
/// checked canonical and non-negative: each lane's point as dalek's limbs `(x, y, 1, x·y)`,
/// or `None` where `s` encodes no point.
#[target_feature(enable = "avx2")]
fn decode4(s: &F4) -> [Option<[[u64; 5]; 4]>; 4] {
    let (one, zero) = (constant(&ONE), [_mm256_setzero_si256(); L]);
    let ss = sq(s);
    let u1 = sub(&one, &ss);
    let u2 = add(&one, &ss);
    let u2_sqr = sq(&u2);
    // v = −(d·u1²) − u2², carried before its negation (a subtrahend must be reduced).
    let v = sub(&zero, &carry(add(&mul(&constant(&D), &sq(&u1)), &u2_sqr)));
    // (was_square, r) = SQRT_RATIO_M1(1, w): r = w³·(w⁷)^((p−5)/8), then the sign fix-ups.
    let w = mul(&v, &u2_sqr);
    let w3 = mul(&sq(&w), &w);
    let w7 = mul(&sq(&w3), &w);
    let r = mul(&w3, &pow_p58(&w7));
    let check = lanes(&mul(&w, &sq(&r))).map(canonical);
    let correct = check.map(|c| c == [1, 0, 0, 0, 0]);
    let flipped = check.map(|c| c == MINUS_ONE);
    let flipped_i = check.map(|c| c == MINUS_SQRT_M1);
    let rotate = std::array::from_fn(|l| flipped[l] || flipped_i[l]);
    let r = abs(&select(
        &r,
        &mul(&r, &constant(&SQRT_M1)),
        lane_mask(rotate),
    ));
    let den_x = mul(&r, &u2);
    let den_y = mul(&mul(&r, &den_x), &v);
    let x = abs(&mul(&add(s, s), &den_x));
    let y = mul(&u1, &den_y);
    let t = mul(&x, &y);
    let (x, y, t) = (
        lanes(&x).map(canonical),
        lanes(&y).map(canonical),
        lanes(&t).map(canonical),
    );
    std::array::from_fn(|l| {
        let ok = (correct[l] || flipped[l]) && t[l][0] & 1 == 0 && y[l] != [0; 5];
        ok.then_some([x[l], y[l], [1, 0, 0, 0, 0], t[l]])
    })
}

/// Four lanes' limbs as one vector element.
#[inline]
#[target_feature(enable = "avx2")]
fn from_lanes(l: [[u64; L]; 4]) -> F4 {
    std::array::from_fn(|i| {
        _mm256_set_epi64x(
            l[3][i] as i64,
            l[2][i] as i64,
            l[1][i] as i64,
            l[0][i] as i64,
        )
    })
}

/// Decodes encodings four at a time.
#[target_feature(enable = "avx2")]
fn decompress_many_avx2(encodings: &[[u8; 32]]) -> Vec<Option<RistrettoPoint>> {
    let mut out = Vec::with_capacity(encodings.len());
    for group in encodings.chunks(4) {
        let parsed: [Option<[u64; L]>; 4] =
            std::array::from_fn(|l| group.get(l).and_then(encoding_limbs));
        // A lane that fails the byte checks decodes 0 (the identity) and is then refused.
        let decoded = decode4(&from_lanes(parsed.map(|p| p.unwrap_or([0; L]))));
        for (p, d) in parsed.iter().zip(decoded).take(group.len()) {
            out.push(p.and(d).map(dalek_point));
        }
    }
    out
}

/// Ristretto255 decodings (RFC 9496, section 4.3.1) of `encodings`, four at once: `None`
/// for each that encodes no point (non-canonical, negative, or not a valid `s`).
pub(crate) fn decompress_many(encodings: &[[u8; 32]]) -> Vec<Option<RistrettoPoint>> {
    assert!(
        super::avx2_enabled(),
        "the AVX2 backend runs only where it was detected"
    );
    // SAFETY: as in `add_many`.
    unsafe { decompress_many_avx2(encodings) }
}

// ---- Conversion from and to dalek's coordinates (scalar code) ----

/// dalek 3's `RistrettoPoint` as its four coordinates' radix-`2^51` limbs.
fn dalek_limbs(p: &RistrettoPoint) -> [[u64; 5]; 4] {
    // SAFETY: both types are 160 bytes (checked by `transmute` at compile time) of plain
    // integers, so every bit pattern of the source is a valid `[[u64; 5]; 4]`. What the limbs
    // mean is checked by `layout_holds` before the backend is used.
    unsafe { core::mem::transmute::<RistrettoPoint, [[u64; 5]; 4]>(*p) }
}

/// The point with these radix-`2^51` limbs, each below `2^51`.
fn dalek_point(limbs: [[u64; 5]; 4]) -> RistrettoPoint {
    // SAFETY: as in `dalek_limbs`: 160 bytes of plain integers either way. The limbs are those
    // of a point computed from valid points and reduced below 2^51, which is what dalek's
    // serial arithmetic takes.
    unsafe { core::mem::transmute::<[[u64; 5]; 4], RistrettoPoint>(limbs) }
}

/// Radix-`2^51` limbs carried below `2^51` each (`2^255 ≡ 19` for the top carry; the last
/// carry into limb 1 leaves it below `2^51 + 2^13`, which the split below still fits).
fn carry51(mut l: [u64; 5]) -> [u64; 5] {
    const M: u64 = (1 << 51) - 1;
    for i in 0..4 {
        l[i + 1] += l[i] >> 51;
        l[i] &= M;
    }
    l[0] += 19 * (l[4] >> 51);
    l[4] &= M;
    l[1] += l[0] >> 51;
    l[0] &= M;
    l
}

/// `p − 1` and `−√−1` as canonical radix-`2^51` limbs.
const MINUS_ONE: [u64; 5] = [
    2251799813685228,
    2251799813685247,
    2251799813685247,
    2251799813685247,
    2251799813685247,
];
const MINUS_SQRT_M1: [u64; 5] = [
    533094393274173,
    2016890930128738,
    18285341111199,
    134597186663265,
    1486323764102114,
];

/// The canonical radix-`2^51` limbs (the value below `p`, each limb below `2^51`) of one
/// lane's element, whose limbs are below `2^32`.
fn canonical(m: [u64; L]) -> [u64; 5] {
    const M: u64 = (1 << 51) - 1;
    let mut l = carry51(std::array::from_fn(|k| m[2 * k] + (m[2 * k + 1] << 26)));
    // Now h < 2^255 + 2^64 < 2p, so h ≥ p exactly when h + 19 carries out of bit 255.
    let mut q = (l[0] + 19) >> 51;
    for limb in &l[1..] {
        q = (limb + q) >> 51;
    }
    // h − q·p: add 19q, carry, and drop bit 255.
    l[0] += 19 * q;
    for k in 0..4 {
        l[k + 1] += l[k] >> 51;
        l[k] &= M;
    }
    l[4] &= M;
    l
}

/// Bit offsets of this module's limbs, `⌈25.5·i⌉`.
const OFFSETS: [usize; L] = [0, 26, 51, 77, 102, 128, 153, 179, 204, 230];

/// The field element of an encoding that passes RFC 9496's byte checks (`s < p` and even),
/// as exact-width limbs.
fn encoding_limbs(b: &[u8; 32]) -> Option<[u64; L]> {
    let at_least_p = b[31] == 0x7f && b[1..31].iter().all(|&x| x == 0xff) && b[0] >= 0xed;
    if b[31] & 0x80 != 0 || at_least_p || b[0] & 1 == 1 {
        return None;
    }
    let w: [u64; 4] =
        std::array::from_fn(|i| u64::from_le_bytes(std::array::from_fn(|j| b[8 * i + j])));
    Some(std::array::from_fn(|i| {
        let (q, r, width) = (OFFSETS[i] / 64, OFFSETS[i] % 64, 26 - i % 2);
        let mut v = w[q] >> r;
        if r + width > 64 {
            v |= w[q + 1] << (64 - r);
        }
        v & ((1 << width) - 1)
    }))
}

/// A curv point in the backend's form: dalek's limb `k` (offset `51k`) is this module's limbs
/// `2k` (26 bits at the same offset) and `2k + 1` (the next 25 bits).
pub(crate) fn from_dalek(p: &RistrettoPoint) -> Ext {
    let mut out = [0u32; 4 * L];
    for (c, limbs) in dalek_limbs(p).into_iter().enumerate() {
        // dalek keeps its limbs below 2^54, so the carries cannot overflow.
        let l = carry51(limbs);
        for k in 0..5 {
            out[c * L + 2 * k] = (l[k] & ((1 << 26) - 1)) as u32;
            out[c * L + 2 * k + 1] = (l[k] >> 26) as u32;
        }
        // Limb 1 may hold 2^25 + 2^13 − 1 at most: within the reduced bound (2^25 + 2^15).
    }
    Ext(out)
}

/// The backend's point as dalek's, every limb below `2^51 + 2^13` (dalek's multiplication
/// takes limbs below `2^54`).
pub(crate) fn to_dalek(p: &Ext) -> RistrettoPoint {
    let mut limbs = [[0u64; 5]; 4];
    for (c, out) in limbs.iter_mut().enumerate() {
        let m = &p.0[c * L..(c + 1) * L];
        let l: [u64; 5] =
            std::array::from_fn(|k| u64::from(m[2 * k]) + (u64::from(m[2 * k + 1]) << 26));
        *out = carry51(l);
    }
    dalek_point(limbs)
}

/// Whether dalek's points have the layout this module reads: known coordinates of the
/// generator, and sums and differences of random points equal to dalek's own. Call only
/// where [`cpu_has_avx2`] holds.
pub(crate) fn layout_holds() -> bool {
    if !cpu_has_avx2() {
        return false;
    }
    use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT as G;
    use curve25519_dalek::scalar::Scalar;
    let g = dalek_limbs(&G);
    // dalek's basepoint has Z = 1.
    if g[2] != [1, 0, 0, 0, 0] {
        return false;
    }
    let mut s = Scalar::from(0x9e37_79b9_7f4a_7c15u64);
    let mut a = G * s;
    for _ in 0..8 {
        s = s * s + Scalar::from(7u64);
        let b = G * s;
        let (ea, eb) = (from_dalek(&a), from_dalek(&b));
        let mut accs = [ea, ea, Ext::IDENTITY];
        let ops = [
            Op {
                acc: 0,
                entry: 0,
                neg: false,
            },
            Op {
                acc: 1,
                entry: 0,
                neg: true,
            },
            Op {
                acc: 2,
                entry: 0,
                neg: false,
            },
        ];
        // SAFETY: the caller checked the CPU with `cpu_has_avx2` first.
        let table = unsafe { niels_many_avx2(&[eb]) };
        unsafe { add_many_avx2(&mut accs, &table, &ops) };
        if to_dalek(&accs[0]) != a + b || to_dalek(&accs[1]) != a - b || to_dalek(&accs[2]) != b {
            return false;
        }
        if to_dalek(&ea) != a {
            return false;
        }
        a += b;
    }
    true
}
