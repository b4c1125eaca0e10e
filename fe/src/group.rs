//! The prime-order groups the schemes run on, through `curv-kzen`.
//!
//! Everything in this crate is generic over [`FeCurve`], a `curv` [`Curve`] plus the few
//! curve-specific fast paths the schemes need:
//!
//! * a 128-bit *fingerprint* of many points at once, the key of the discrete-log table. On
//!   Ristretto255 the canonical encoding needs one field inversion per point (about 3 µs), so
//!   the fingerprint of `P` is taken from the encoding of `2P`, which dalek computes for a whole
//!   batch with one shared inversion (Montgomery's trick). Doubling is a bijection in a group of
//!   odd prime order, so fingerprints of distinct points collide only by accident of the
//!   truncation to 128 bits (probability about 2^-128 per pair).
//! * scalars as little-endian bytes, for windowed recoding.
//!
//! [`Ristretto`] (the default: fast, prime order, about 128-bit security) and [`Secp256k1`]
//! are implemented.

use curv::elliptic::curves::{Curve, ECPoint, ECScalar, Point, Scalar};
pub use curv::elliptic::curves::{Ristretto, Secp256k1};

/// The raw point type of a curve, on which the hot loops work directly.
pub type RawPoint<E> = <E as Curve>::Point;

/// A `curv` curve usable by the schemes of this crate.
pub trait FeCurve: Curve + 'static {
    /// Length in bytes of a compressed point encoding.
    const POINT_LEN: usize;

    /// Bits of the group order: every canonical scalar is below `2^SCALAR_BITS`.
    const SCALAR_BITS: usize;

    /// Fingerprints of points for the discrete-log table: equal points give equal
    /// fingerprints, the identity gives 0, distinct points differ except with probability
    /// about 2^-128.
    fn fingerprints(points: &[RawPoint<Self>]) -> Vec<u128>;

    /// The scalar's canonical value as 32 little-endian bytes.
    fn scalar_le_bytes(s: &Scalar<Self>) -> [u8; 32];

    /// The canonical encodings of `2P` for every `P`, concatenated (`POINT_LEN` bytes each).
    ///
    /// Encryption computes its points for halved bases, so that their doubles are the
    /// ciphertext and this batched encoding (one shared inversion on Ristretto) serializes it.
    fn encode_doubled(points: &[RawPoint<Self>]) -> Vec<u8>;
}

impl FeCurve for Ristretto {
    const POINT_LEN: usize = 32;
    // q = 2^252 + 27742317777372353535851937790883648493
    const SCALAR_BITS: usize = 253;

    fn fingerprints(points: &[RawPoint<Self>]) -> Vec<u128> {
        let mut out = vec![0u128; points.len()];
        for (i, e) in ristretto_doubled_encodings(points) {
            out[i] = fingerprint_bytes(&e);
        }
        out
    }

    fn scalar_le_bytes(s: &Scalar<Self>) -> [u8; 32] {
        s.as_raw().underlying_ref().to_bytes()
    }

    fn encode_doubled(points: &[RawPoint<Self>]) -> Vec<u8> {
        // The identity encodes as 32 zero bytes, which the buffer already holds.
        let mut out = vec![0u8; points.len() * 32];
        for (i, e) in ristretto_doubled_encodings(points) {
            out[32 * i..32 * i + 32].copy_from_slice(&e);
        }
        out
    }
}

/// `(i, enc(2·P_i))` for the non-identity points, with one shared inversion.
///
/// dalek's batched encoding panics on the identity (a zero field element cannot be inverted),
/// so identities are left out for the caller to answer directly.
fn ristretto_doubled_encodings(points: &[RawPoint<Ristretto>]) -> Vec<(usize, [u8; 32])> {
    use curve25519_dalek::ristretto::RistrettoPoint;
    let (idx, raw): (Vec<usize>, Vec<RistrettoPoint>) = points
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.is_zero())
        .map(|(i, p)| (i, *p.underlying_ref()))
        .unzip();
    idx.into_iter()
        .zip(RistrettoPoint::double_and_compress_batch(&raw))
        .map(|(i, e)| (i, e.to_bytes()))
        .collect()
}

impl FeCurve for Secp256k1 {
    const POINT_LEN: usize = 33;
    // n = 2^256 − 432420386565659656852420866394968145599
    const SCALAR_BITS: usize = 256;

    fn fingerprints(points: &[RawPoint<Self>]) -> Vec<u128> {
        // curv keeps secp256k1 points affine, so the encoding is cheap and needs no batching.
        // The first byte (02 or 03) carries the sign of y: P and -P differ there.
        points
            .iter()
            .map(|p| {
                if p.is_zero() {
                    0
                } else {
                    fingerprint_bytes(&p.serialize_compressed())
                }
            })
            .collect()
    }

    fn scalar_le_bytes(s: &Scalar<Self>) -> [u8; 32] {
        let be = s.as_raw().serialize();
        let mut le = [0u8; 32];
        for (d, b) in le.iter_mut().zip(be.iter().rev()) {
            *d = *b;
        }
        le
    }

    fn encode_doubled(points: &[RawPoint<Self>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(points.len() * 33);
        for p in points {
            let mut d = *p;
            d.add_point_assign(p);
            out.extend_from_slice(&d.serialize_compressed());
        }
        out
    }
}

fn fingerprint_bytes(b: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    // Never 0 for a non-identity point: 0 is reserved for the identity.
    u128::from_le_bytes(a).max(1)
}

/// The generator of the group as a raw point.
pub(crate) fn generator<E: FeCurve>() -> RawPoint<E> {
    E::Point::generator().clone()
}

/// `P/2`: the point whose double is `P` (the group order is odd).
pub(crate) fn halve<E: FeCurve>(p: &RawPoint<E>) -> RawPoint<E> {
    let two = Scalar::<E>::from(2u64);
    match two.invert() {
        Some(inv) => p.scalar_mul(inv.as_raw()),
        None => p.clone(), // unreachable: 2 is invertible modulo an odd prime
    }
}

/// `2P`.
pub(crate) fn double<E: FeCurve>(p: &RawPoint<E>) -> RawPoint<E> {
    let mut d = p.clone();
    d.add_point_assign(p);
    d
}

/// Wraps a raw point computed from valid points back into curv's checked type.
pub(crate) fn wrap<E: FeCurve>(p: RawPoint<E>) -> Point<E> {
    // Sums and multiples of valid points of a prime-order group are valid, so this cannot
    // fail; the checked constructor is still used, and a failure would surface as identity.
    Point::from_raw(p).unwrap_or_else(|_| Point::zero())
}

/// A scalar from a signed machine integer (negative values map to q - |v|).
pub fn scalar_from_i64<E: FeCurve>(v: i64) -> Scalar<E> {
    let s = Scalar::<E>::from(v.unsigned_abs());
    if v < 0 {
        -s
    } else {
        s
    }
}

/// `v * P` for a signed machine integer, by curv's scalar multiplication.
pub fn mul_i64<E: FeCurve>(p: &Point<E>, v: i64) -> Point<E> {
    p * scalar_from_i64::<E>(v)
}
