//! FEIP: inner-product functional encryption (Abdalla, Bourse, De Caro, Pointcheval, PKC 2015).
//!
//! In a group of prime order `q` with generator `G` (additive notation):
//!
//! * **Setup(n)**: `s_i ←$ Z_q`, `H_i = s_i·G`; `mpk = (H_1..H_n)`, `msk = (s_1..s_n)`.
//! * **Encrypt(mpk, x ∈ Zⁿ)**: `r ←$ Z_q`; `C_0 = r·G`, `C_i = r·H_i + x_i·G`.
//! * **KeyDerive(msk, y ∈ Zⁿ)**: `sk_y = Σ s_i·y_i mod q`.
//! * **Decrypt(C, y, sk_y)**: `D = Σ y_i·C_i − sk_y·C_0 = r·Σ y_i s_i G + ⟨x,y⟩·G − sk_y·r·G
//!   = ⟨x, y⟩·G`, then the bounded discrete log of `D` ([`crate::dlog`]).
//!
//! The key for `y` reveals `⟨x, y⟩` and (under DDH) nothing else about `x`. Negative values of
//! `x` and `y` are residues mod `q`. [`FeipParams::x_bound`] bounds `|x_i|`; decryption
//! searches `|⟨x, y⟩| ≤ x_bound·‖y‖₁` and fails with an error, never a wrong number, when the
//! point is not within that bound (tampered ciphertext, key for another vector, or a value
//! beyond the promise).
//!
//! Speed: encryption uses fixed-base tables for `G` and every `H_i`. Decryption of many
//! ciphertexts against many keys ([`decrypt_matrix`]) counts the point additions of three
//! strategies and takes the cheapest:
//!
//! * bit planes over subset sums ([`crate::msm::BitPlanes`]), with `−sk` written in signed
//!   base-`2^b` digits `e_j` so that `sk·C_0` becomes extra points `2^(bj)·C_0` with small
//!   coefficients: `D = Σ y_i C_i + Σ e_j (2^(bj) C_0)` is one small-scalar product over
//!   `n + ⌈(log₂q + 2)/b⌉` points (many keys: the forward and backward passes of training).
//!   Dense segments may use zero-free digits, which give `2·D`; the discrete log then solves
//!   `2·⟨x, y⟩` (within twice the bound) and halves it;
//! * the bucket method per key, with a fixed-base table for `C_0` (one or a few keys);
//! * small multiples per point, shared by all keys, with one addition per non-zero key entry
//!   (tiny entries on very short vectors, and many sparse keys such as a convolution's
//!   placed kernels: chosen when the bit planes' real count for the keys is higher);
//!
//! then batched discrete logs, on all cores.

use crate::backend::{same_curve, Backend, CurvLanes, Lanes, Op};
use crate::dlog::DlogTable;
use crate::encoding::bound_for_key;
use crate::error::{FeError, Result};
use crate::group::{double, generator, halve, scalar_from_i64, wrap, FeCurve, RawPoint};
use crate::msm::{
    best_window, double_k, msm_signed_with, recode_scalar, scalar_digits, subset_sum_products_on,
    windows_for, BitPlanes, FixedBase, FixedBases, SmallMultiples, MAX_CHUNK_BITS,
    MAX_ZERO_FREE_CHUNK_BITS,
};
use crate::serial::{put_i64s, put_point, put_points, put_scalar, serde_via_bytes, Encode, Reader};
use curv::arithmetic::{BigInt, Converter};
use curv::elliptic::curves::{ECPoint, Point, Scalar};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zeroize::{Zeroize, Zeroizing};

/// Window of the fixed-base tables of encryption (`⌈256/w⌉+1` = 38 additions per element;
/// 6 would take 44 with tables of 58 % the size).
const ENC_WINDOW: usize = 7;
/// From this many keys on, a ciphertext's `C_0` gets a fixed-base table.
const C0_TABLE_MIN_KEYS: usize = 6;
/// Small-multiple tables are used only up to this largest key entry.
const SMALL_MULTIPLES_MAX: u64 = 1 << 12;
/// Bit planes are used only up to this many bits per key entry.
const PLANES_MAX_BITS: usize = 24;

/// How [`decrypt_matrix`] computes `Σ y_i·C_i − sk·C_0` (chosen by counting additions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    /// Bucket method per key ([`msm_signed_with`]), fixed-base table for `C_0`.
    Buckets,
    /// Small multiples per point, shared by all keys, fixed-base table for `C_0`.
    Multiples,
    /// Bit planes over subset sums, `C_0` folded in ([`subset_sum_products`]).
    Planes,
}

/// Public parameters: the vector length and the bound on plaintext entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeipParams {
    /// Length of the vectors.
    pub n: usize,
    /// Bound on `|x_i|` for encrypted entries (255 for pixels).
    pub x_bound: u64,
}

impl FeipParams {
    /// Parameters for vectors of length `n` with `|x_i| ≤ x_bound`.
    pub fn new(n: usize, x_bound: u64) -> Result<Self> {
        if n == 0 || n > (1 << 24) {
            return Err(FeError::OutOfRange {
                what: "vector length",
                value: n as i128,
                bound: 1 << 24,
            });
        }
        if x_bound == 0 || x_bound > (1 << 40) {
            return Err(FeError::OutOfRange {
                what: "plaintext bound",
                value: x_bound as i128,
                bound: 1 << 40,
            });
        }
        Ok(FeipParams { n, x_bound })
    }

    pub(crate) fn check_len(&self, what: &'static str, got: usize) -> Result<()> {
        if got != self.n {
            return Err(FeError::LengthMismatch {
                what,
                got,
                expected: self.n,
            });
        }
        Ok(())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&self.x_bound.to_le_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let n = r.u64()?;
        let b = r.u64()?;
        Self::new(usize::try_from(n).unwrap_or(usize::MAX), b)
    }
}

/// The master public key `(H_1..H_n)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeipPublicKey<E: FeCurve> {
    params: FeipParams,
    h: Vec<Point<E>>,
}

/// The master secret key `(s_1..s_n)`. Never leaves the authority; the scalars are zeroized
/// when dropped (by `curv`), and [`crate::serial::write_atomic`] writes it with mode 0600.
pub struct FeipMasterSecretKey<E: FeCurve> {
    params: FeipParams,
    s: Vec<Scalar<E>>,
    /// The same scalars as little-endian 64-bit limbs, for fast key derivation.
    limbs: Zeroizing<Vec<[u64; 4]>>,
}

impl<E: FeCurve> std::fmt::Debug for FeipMasterSecretKey<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FeipMasterSecretKey {{ params: {:?}, s: <redacted> }}",
            self.params
        )
    }
}

/// A function key: the vector `y` and `sk_y = ⟨s, y⟩ mod q`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeipFunctionKey<E: FeCurve> {
    y: Vec<i64>,
    sk: Scalar<E>,
}

/// A ciphertext `(C_0, C_1..C_n)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeipCiphertext<E: FeCurve> {
    c0: Point<E>,
    c: Vec<Point<E>>,
}

/// Generates a fresh key pair for `params`.
pub fn setup<E: FeCurve>(params: FeipParams) -> (FeipPublicKey<E>, FeipMasterSecretKey<E>) {
    let s: Vec<Scalar<E>> = (0..params.n).map(|_| Scalar::random()).collect();
    let g = Point::<E>::generator();
    let h = s.par_iter().map(|si| g * si).collect();
    (
        FeipPublicKey { params, h },
        FeipMasterSecretKey::from_scalars(params, s),
    )
}

/// Little-endian limbs of a scalar.
fn limbs_of<E: FeCurve>(s: &Scalar<E>) -> [u64; 4] {
    let b = Zeroizing::new(E::scalar_le_bytes(s));
    let mut l = [0u64; 4];
    for (i, limb) in l.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8 * i..8 * i + 8]);
        *limb = u64::from_le_bytes(w);
    }
    l
}

/// `acc += s·m` on 384-bit little-endian integers (no overflow for the sizes used here:
/// `n < 2^24` terms below `2^256·2^64`).
#[inline]
fn mul_add(acc: &mut [u64; 6], s: &[u64; 4], m: u64) {
    let mut carry: u128 = 0;
    for i in 0..4 {
        let t = u128::from(acc[i]) + u128::from(s[i]) * u128::from(m) + carry;
        acc[i] = t as u64;
        carry = t >> 64;
    }
    for a in acc.iter_mut().skip(4) {
        let t = u128::from(*a) + carry;
        *a = t as u64;
        carry = t >> 64;
    }
}

/// The integer in `acc` reduced mod `q`.
fn reduce<E: FeCurve>(acc: &[u64; 6]) -> Scalar<E> {
    let mut be = Zeroizing::new([0u8; 48]);
    for (i, limb) in acc.iter().enumerate() {
        be[40 - 8 * i..48 - 8 * i].copy_from_slice(&limb.to_be_bytes());
    }
    let mut n = BigInt::from_bytes(&be[..]);
    let s = Scalar::from_bigint(&n);
    n.zeroize();
    s
}

impl<E: FeCurve> FeipPublicKey<E> {
    /// The parameters.
    pub fn params(&self) -> FeipParams {
        self.params
    }
    /// The points `H_i`.
    pub fn points(&self) -> &[Point<E>] {
        &self.h
    }
}

impl<E: FeCurve> FeipMasterSecretKey<E> {
    /// The parameters.
    pub fn params(&self) -> FeipParams {
        self.params
    }

    /// The matching public key.
    pub fn public_key(&self) -> FeipPublicKey<E> {
        let g = Point::<E>::generator();
        FeipPublicKey {
            params: self.params,
            h: self.s.par_iter().map(|si| g * si).collect(),
        }
    }

    fn from_scalars(params: FeipParams, s: Vec<Scalar<E>>) -> Self {
        let limbs = Zeroizing::new(s.iter().map(limbs_of).collect());
        FeipMasterSecretKey { params, s, limbs }
    }

    /// Derives the key of `y` (length `n`): `sk_y = Σ s_i·y_i mod q`.
    ///
    /// The sum is taken over the integers (positive and negative terms apart, in 384-bit
    /// accumulators that are zeroized afterwards) and reduced once.
    pub fn derive_key(&self, y: &[i64]) -> Result<FeipFunctionKey<E>> {
        self.params.check_len("key vector", y.len())?;
        let mut pos = Zeroizing::new([0u64; 6]);
        let mut neg = Zeroizing::new([0u64; 6]);
        for (si, &yi) in self.limbs.iter().zip(y) {
            if yi > 0 {
                mul_add(&mut pos, si, yi.unsigned_abs());
            } else if yi < 0 {
                mul_add(&mut neg, si, yi.unsigned_abs());
            }
        }
        let sk = reduce::<E>(&pos) - reduce::<E>(&neg);
        Ok(FeipFunctionKey { y: y.to_vec(), sk })
    }

    /// Derives many keys in parallel.
    pub fn derive_keys(&self, ys: &[Vec<i64>]) -> Result<Vec<FeipFunctionKey<E>>> {
        ys.par_iter().map(|y| self.derive_key(y)).collect()
    }

    /// A child master key named by `label`, with the same parameters:
    /// `s'_i = SHA-512("cryptonn feip child" ‖ s_1 ‖ … ‖ s_n ‖ len(label) ‖ label ‖ i) mod q`.
    ///
    /// Children of one key with different labels are independent keys as far as anyone
    /// without `s` can tell (SHA-512 keyed by the parent's secret acts as a PRF), so a function
    /// key of one child decrypts nothing in range under another child or the parent. The same
    /// label always gives the same child, so the holder of `s` need store nothing else.
    pub fn derive_child(&self, label: &[u8]) -> Self {
        use sha2::{Digest, Sha512};
        let mut seed = Sha512::new();
        seed.update(b"cryptonn feip child");
        for s in &self.s {
            seed.update(Zeroizing::new(E::scalar_le_bytes(s)).as_slice());
        }
        seed.update((label.len() as u64).to_le_bytes());
        seed.update(label);
        let s: Vec<Scalar<E>> = (0..self.params.n as u64)
            .into_par_iter()
            .map(|i| {
                let mut h = seed.clone();
                h.update(i.to_le_bytes());
                let mut wide = Zeroizing::new([0u8; 64]);
                wide.copy_from_slice(&h.finalize());
                let mut n = BigInt::from_bytes(&wide[..]);
                let si = Scalar::from_bigint(&n);
                n.zeroize();
                si
            })
            .collect();
        Self::from_scalars(self.params, s)
    }
}

impl<E: FeCurve> FeipFunctionKey<E> {
    /// The vector this key decrypts the inner product with.
    pub fn vector(&self) -> &[i64] {
        &self.y
    }
    /// The secret part `sk_y`.
    pub fn secret(&self) -> &Scalar<E> {
        &self.sk
    }
    /// Assembles a key from its vector and secret part (for example received over a network:
    /// the authority need not echo the vector back).
    pub fn from_parts(y: Vec<i64>, sk: Scalar<E>) -> Self {
        FeipFunctionKey { y, sk }
    }
}

impl<E: FeCurve> FeipCiphertext<E> {
    /// `C_0 = r·G`.
    pub fn c0(&self) -> &Point<E> {
        &self.c0
    }
    /// `C_i = r·H_i + x_i·G`.
    pub fn elements(&self) -> &[Point<E>] {
        &self.c
    }
    /// Assembles a ciphertext from its points (for example read from a file).
    pub fn from_parts(c0: Point<E>, c: Vec<Point<E>>) -> Self {
        FeipCiphertext { c0, c }
    }
}

/// Encrypts under a public key with precomputed fixed-base tables (build once, reuse).
///
/// The tables hold multiples of the *halved* bases `G/2` and `H_i/2`, so encryption computes
/// `C/2`; one more addition gives `C`, or a batched double-and-encode gives the bytes of `C`
/// without one field inversion per point ([`FeipEncryptor::encrypt_to_bytes`]).
pub struct FeipEncryptor<E: FeCurve> {
    pk: FeipPublicKey<E>,
    tables: EncryptionTables<E>,
}

/// The encryption tables, laid out for the backend they run on.
enum EncryptionTables<E: FeCurve> {
    Curv(TablesOn<E, CurvLanes>),
    #[cfg(target_arch = "x86_64")]
    Avx2(TablesOn<crate::Ristretto, crate::backend::Avx2Lanes>),
}

/// `B = G/2`'s small multiples and fixed-base table, and every `H_i/2`'s.
struct TablesOn<E: FeCurve, L: Lanes<E> + Copy> {
    /// `k·B` for `k = 0..=max`.
    small: Vec<L::Entry>,
    g: FixedBases<E, L>,
    h: FixedBases<E, L>,
}

impl<E: FeCurve, L: Lanes<E> + Copy> TablesOn<E, L> {
    fn new(lanes: L, b: &RawPoint<E>, hs: &[RawPoint<E>], small: usize) -> Self {
        let small = SmallMultiples::<E>::new(b, small.max(1));
        let mut multiples = vec![lanes.identity()];
        multiples.extend(lanes.load(small.multiples()));
        TablesOn {
            small: lanes.entries(&multiples),
            g: FixedBases::new(lanes, std::slice::from_ref(b), ENC_WINDOW),
            h: FixedBases::new(lanes, hs, ENC_WINDOW),
        }
    }

    /// `[C_0/2, C_1/2, …]` for every vector `xs[v]` with the recoded randomness `digits[v]`.
    ///
    /// The elements run in parallel chunks, element-major within a chunk, so that each
    /// element's table (about 380 KiB) is used by all vectors while it is in cache.
    fn halves(&self, xs: &[Vec<i64>], digits: &[Vec<i32>]) -> Vec<Vec<RawPoint<E>>> {
        let lanes = *self.h.lanes();
        let (nv, n) = (xs.len(), xs.first().map_or(0, Vec::len));
        let per = 32usize.div_ceil(nv.max(1)).min(n.max(1));
        let starts: Vec<usize> = (0..n).step_by(per).collect();
        let chunks: Vec<Vec<RawPoint<E>>> = starts
            .par_iter()
            .map(|&start| {
                let elems = start..(start + per).min(n);
                let mut accs = vec![lanes.identity(); elems.len() * nv];
                let mut products = Vec::with_capacity(accs.len());
                let (mut small, mut large) = (Vec::new(), Vec::new());
                for (j, i) in elems.enumerate() {
                    for (v, (x, d)) in xs.iter().zip(digits).enumerate() {
                        let a = j * nv + v;
                        products.push((a, i, d.as_slice()));
                        match x[i] {
                            0 => {}
                            x if x.unsigned_abs() < self.small.len() as u64 => {
                                small.push(Op::new(a, x.unsigned_abs() as usize, x < 0))
                            }
                            x => {
                                large.push((a, recode_scalar(&scalar_from_i64::<E>(x), ENC_WINDOW)))
                            }
                        }
                    }
                }
                self.h.add_products(&mut accs, &products);
                lanes.add_many(&mut accs, &self.small, &small);
                let large: Vec<(usize, usize, &[i32])> =
                    large.iter().map(|(a, d)| (*a, 0, d.as_slice())).collect();
                self.g.add_products(&mut accs, &large);
                lanes.store(&accs)
            })
            .collect();
        let mut c0 = vec![lanes.identity(); nv];
        let products: Vec<(usize, usize, &[i32])> = digits
            .iter()
            .enumerate()
            .map(|(v, d)| (v, 0, d.as_slice()))
            .collect();
        self.g.add_products(&mut c0, &products);
        let mut out: Vec<Vec<RawPoint<E>>> = lanes
            .store(&c0)
            .into_iter()
            .map(|c| {
                let mut v = Vec::with_capacity(n + 1);
                v.push(c);
                v
            })
            .collect();
        for chunk in chunks {
            for (k, p) in chunk.into_iter().enumerate() {
                out[k % nv].push(p);
            }
        }
        out
    }
}

impl<E: FeCurve> EncryptionTables<E> {
    fn new(backend: Backend, b: RawPoint<E>, hs: Vec<RawPoint<E>>, small: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if backend == Backend::Avx2 && crate::backend::avx2_enabled() {
            if let (Ok(b), Ok(hs)) = (
                same_curve::<E, crate::Ristretto>(vec![b.clone()]),
                same_curve::<E, crate::Ristretto>(hs.clone()),
            ) {
                let lanes = crate::backend::Avx2Lanes;
                return EncryptionTables::Avx2(TablesOn::new(lanes, &b[0], &hs, small));
            }
        }
        let _ = backend;
        EncryptionTables::Curv(TablesOn::new(CurvLanes, &b, &hs, small))
    }

    fn halves(&self, xs: &[Vec<i64>], digits: &[Vec<i32>]) -> Vec<Vec<RawPoint<E>>> {
        match self {
            EncryptionTables::Curv(t) => t.halves(xs, digits),
            #[cfg(target_arch = "x86_64")]
            EncryptionTables::Avx2(t) => t
                .halves(xs, digits)
                .into_iter()
                .map(|v| same_curve::<crate::Ristretto, E>(v).expect("built for this curve"))
                .collect(),
        }
    }
}

impl<E: FeCurve> FeipEncryptor<E> {
    /// Precomputes the tables for `pk` (`n·38·64` points, about 380 KiB per element on
    /// Ristretto, in parallel) for the process's backend ([`Backend::active`]).
    pub fn new(pk: &FeipPublicKey<E>) -> Self {
        Self::new_on(pk, Backend::active())
    }

    /// [`FeipEncryptor::new`] for a chosen backend (the fallback where this curve or CPU
    /// lacks it): for comparisons; the ciphertexts are distributed the same on every backend.
    pub fn new_on(pk: &FeipPublicKey<E>, backend: Backend) -> Self {
        let small = pk.params.x_bound.min(1 << 16) as usize;
        let b = halve::<E>(&generator::<E>());
        let hs: Vec<RawPoint<E>> = pk.h.par_iter().map(|p| halve::<E>(p.as_raw())).collect();
        FeipEncryptor {
            tables: EncryptionTables::new(backend, b, hs, small),
            pk: pk.clone(),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &FeipPublicKey<E> {
        &self.pk
    }

    fn check_plaintext(&self, x: &[i64]) -> Result<()> {
        let p = self.pk.params;
        p.check_len("plaintext vector", x.len())?;
        if let Some(&v) = x.iter().find(|v| v.unsigned_abs() > p.x_bound) {
            return Err(FeError::OutOfRange {
                what: "plaintext entry",
                value: v.into(),
                bound: p.x_bound.into(),
            });
        }
        Ok(())
    }

    /// `C/2` for fresh encryptions of every `x`: one `[C_0/2, C_1/2, …]` per vector.
    ///
    /// The loop runs element-major: all vectors' `r·H_i/2` are computed while the table of
    /// `H_i` (about 380 KiB) is in cache, instead of streaming all `n` tables (about 300 MiB
    /// for `n = 785`) through the cache once per vector.
    fn encrypt_halves(&self, xs: &[Vec<i64>]) -> Result<Vec<Vec<RawPoint<E>>>> {
        for x in xs {
            self.check_plaintext(x)?;
        }
        let digits: Vec<Vec<i32>> = (0..xs.len())
            .map(|_| recode_scalar(&Scalar::<E>::random(), ENC_WINDOW))
            .collect();
        Ok(self.tables.halves(xs, &digits))
    }

    /// Encrypts `x` (length `n`, `|x_i| ≤ x_bound`).
    pub fn encrypt(&self, x: &[i64]) -> Result<FeipCiphertext<E>> {
        let mut v = self.encrypt_many(std::slice::from_ref(&x.to_vec()))?;
        v.pop()
            .ok_or(FeError::InvalidOperation("empty result".into()))
    }

    /// Encrypts many vectors, on all cores.
    pub fn encrypt_many(&self, xs: &[Vec<i64>]) -> Result<Vec<FeipCiphertext<E>>> {
        Ok(self
            .encrypt_halves(xs)?
            .into_par_iter()
            .map(|halves| {
                let mut pts = halves.iter().map(|h| wrap(double::<E>(h)));
                let c0 = pts.next().unwrap_or_else(Point::zero);
                FeipCiphertext {
                    c0,
                    c: pts.collect(),
                }
            })
            .collect())
    }

    /// Encrypts `x` straight to the bytes of `encrypt(x).to_bytes()`, encoding all points
    /// with one shared inversion (about 8 times faster than encoding them one by one).
    pub fn encrypt_to_bytes(&self, x: &[i64]) -> Result<Vec<u8>> {
        let mut v = self.encrypt_many_to_bytes(std::slice::from_ref(&x.to_vec()))?;
        v.pop()
            .ok_or(FeError::InvalidOperation("empty result".into()))
    }

    /// [`FeipEncryptor::encrypt_to_bytes`] for many vectors, on all cores: the fast path for
    /// encrypting a dataset.
    pub fn encrypt_many_to_bytes(&self, xs: &[Vec<i64>]) -> Result<Vec<Vec<u8>>> {
        let kind = <FeipCiphertext<E> as Encode<E>>::KIND;
        Ok(self
            .encrypt_halves(xs)?
            .par_iter()
            .map(|halves| {
                let enc = E::encode_doubled(halves);
                let mut out = Vec::with_capacity(enc.len() + 32);
                crate::serial::put_header::<E>(&mut out, kind);
                out.extend_from_slice(&enc[..E::POINT_LEN]);
                out.extend_from_slice(&((halves.len() - 1) as u32).to_le_bytes());
                out.extend_from_slice(&enc[E::POINT_LEN..]);
                out
            })
            .collect())
    }
}

/// Decrypts one inner product.
pub fn decrypt<E: FeCurve>(
    params: &FeipParams,
    ct: &FeipCiphertext<E>,
    key: &FeipFunctionKey<E>,
    dlog: &DlogTable<E>,
) -> Result<i64> {
    let m = decrypt_matrix(
        params,
        std::slice::from_ref(ct),
        std::slice::from_ref(key),
        dlog,
    )?;
    m.into_iter()
        .next()
        .and_then(|row| row.into_iter().next())
        .ok_or(FeError::InvalidOperation("empty result".into()))
}

/// Decrypts one ciphertext against many keys (the forward pass: one sample, H neuron rows).
pub fn decrypt_many_keys<E: FeCurve>(
    params: &FeipParams,
    ct: &FeipCiphertext<E>,
    keys: &[FeipFunctionKey<E>],
    dlog: &DlogTable<E>,
) -> Result<Vec<i64>> {
    let mut m = decrypt_matrix(params, std::slice::from_ref(ct), keys, dlog)?;
    Ok(m.pop().unwrap_or_default())
}

/// Decrypts many ciphertexts against one key (the backward pass: one neuron, every pixel).
pub fn decrypt_many_ciphertexts<E: FeCurve>(
    params: &FeipParams,
    cts: &[FeipCiphertext<E>],
    key: &FeipFunctionKey<E>,
    dlog: &DlogTable<E>,
) -> Result<Vec<i64>> {
    let m = decrypt_matrix(params, cts, std::slice::from_ref(key), dlog)?;
    Ok(m.into_iter().map(|r| r[0]).collect())
}

/// Per-key data prepared once for every ciphertext.
struct PreparedKey {
    max_abs: u64,
    sk_digits: Vec<i32>,
}

/// Additions of [`Strategy::Multiples`] per ciphertext for these very keys: the multiples
/// each point needs, one per non-zero key entry, the `C_0` table and one term per key.
fn sparse_multiples_cost<E: FeCurve>(
    keys: &[FeipFunctionKey<E>],
    column_max: &[u64],
    c0w: usize,
) -> usize {
    let windows = scalar_digits::<E>(c0w);
    let tables: usize = column_max.iter().map(|&m| m as usize).sum();
    let nonzero: usize = keys
        .iter()
        .map(|k| k.y.iter().filter(|v| **v != 0).count())
        .sum();
    tables + nonzero + windows * (1 << (c0w - 1)) + keys.len() * (windows + 1)
}

/// Into how many groups each ciphertext's keys are cut when `cts` ciphertexts are
/// decrypted on `threads` threads: 1 when the ciphertexts share out evenly, else enough
/// that ciphertexts times groups is a multiple of the threads (so a batch of 3 on 2 cores
/// takes 1.5 rounds, not 2), never groups of fewer than 16 keys.
fn key_groups(cts: usize, threads: usize, keys: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let threads = threads.max(1);
    (threads / gcd(cts.max(1), threads))
        .min(keys.div_ceil(16))
        .max(1)
}

/// Where decryption time goes: group arithmetic (`Σ y_i C_i − sk·C_0`) and discrete logs.
///
/// Times are summed over the sections of all threads (close to CPU time).
#[derive(Debug, Default)]
pub struct DecryptStats {
    group_nanos: AtomicU64,
    dlog_nanos: AtomicU64,
    additions: AtomicU64,
}

impl DecryptStats {
    /// Time spent in group arithmetic.
    pub fn group_time(&self) -> Duration {
        Duration::from_nanos(self.group_nanos.load(Ordering::Relaxed))
    }
    /// Time spent solving discrete logs.
    pub fn dlog_time(&self) -> Duration {
        Duration::from_nanos(self.dlog_nanos.load(Ordering::Relaxed))
    }
    /// Point additions (doublings included) counted by the bit-plane products, 0 for the
    /// other strategies.
    pub fn additions(&self) -> u64 {
        self.additions.load(Ordering::Relaxed)
    }
    fn add(counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    /// Adds group time since `since` and `additions` point additions.
    pub(crate) fn add_group(&self, since: Instant, additions: u64) {
        Self::add(&self.group_nanos, since);
        self.additions.fetch_add(additions, Ordering::Relaxed);
    }
    /// Adds discrete-log time since `since`.
    pub(crate) fn add_dlog(&self, since: Instant) {
        Self::add(&self.dlog_nanos, since);
    }
}

/// Decrypts every ciphertext against every key: `out[c][k] = ⟨x_c, y_k⟩`.
///
/// Fails if any length differs from `params.n`, if some key's bound `x_bound·‖y‖₁` exceeds the
/// solver's limit (checked before any work), or if any result is not within its bound.
pub fn decrypt_matrix<E: FeCurve>(
    params: &FeipParams,
    cts: &[FeipCiphertext<E>],
    keys: &[FeipFunctionKey<E>],
    dlog: &DlogTable<E>,
) -> Result<Vec<Vec<i64>>> {
    decrypt_matrix_with_stats(params, cts, keys, dlog, &DecryptStats::default())
}

/// The `C_0` table window minimising table size plus additions for `keys` keys.
fn c0_window<E: FeCurve>(keys: usize) -> usize {
    (3..=8usize)
        .min_by_key(|&w| {
            let windows = scalar_digits::<E>(w);
            windows * (1 << (w - 1)) + keys * windows
        })
        .unwrap_or(5)
}

/// The strategy of [`decrypt_matrix`] and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    strategy: Strategy,
    /// Bits per entry for [`Strategy::Planes`].
    bits: usize,
    /// Digits of `sk` in base `2^bits` for [`Strategy::Planes`].
    sk_digits: usize,
}

/// Picks the strategy with the fewest additions per ciphertext (the `C_0` term included) for
/// `h` keys of length `n` with entries in `lo..=hi` (`m` the largest absolute value).
///
/// Bit planes are costed as if every lookup were needed (dense keys); the layout built for
/// the actual keys ([`BitPlanes::new`]) can only need fewer.
fn plan<E: FeCurve>(n: usize, h: usize, (lo, hi): (i64, i64), c0w: usize) -> Plan {
    let m = lo.unsigned_abs().max(hi.unsigned_abs());
    let c0_windows = scalar_digits::<E>(c0w);
    let cost_c0 = if h >= C0_TABLE_MIN_KEYS {
        c0_windows * (1 << (c0w - 1)) + h * c0_windows
    } else {
        h * 300
    };
    let c = best_window(n, m.max(1));
    let windows = windows_for(m.max(1), c);
    let cost_buckets = h * windows * (n + (1usize << c)) + cost_c0;
    let cost_multiples = n * m as usize + h * n + cost_c0;
    let bits = BitPlanes::bits_for(lo, hi);
    let sk_digits = scalar_digits::<E>(bits);
    let points = n + sk_digits;
    // Two's complement with tables of 2^t, or zero-free digits with tables of 2^(t−1) (and
    // one more addition per key).
    let two_complement = (1..=MAX_CHUNK_BITS).map(|t| {
        let chunks = points.div_ceil(t);
        chunks * ((1usize << t) - t - 1) + h * (bits * chunks + 2 * (bits - 1))
    });
    let zero_free = (1..=MAX_ZERO_FREE_CHUNK_BITS).map(|t| {
        let chunks = points.div_ceil(t);
        chunks * ((1usize << (t - 1)) + 2 * t) + h * (bits * chunks + 2 * bits - 1)
    });
    let cost_planes = two_complement
        .chain(zero_free)
        .min()
        .unwrap_or(usize::MAX)
        .saturating_add(sk_digits * bits);
    let strategy =
        if bits <= PLANES_MAX_BITS && m > 0 && cost_planes < cost_buckets.min(cost_multiples) {
            Strategy::Planes
        } else if m <= SMALL_MULTIPLES_MAX && cost_multiples < cost_buckets {
            Strategy::Multiples
        } else {
            Strategy::Buckets
        };
    Plan {
        strategy,
        bits,
        sk_digits,
    }
}

/// `v/2` for the discrete log `v` of a doubled product `2·D`.
///
/// `2·D = v·G` with `|v| ≤ 2·bound < q` means `D = (v/2)·G` for even `v`; an odd `v` means
/// that `D` is not within the bound (a tampered ciphertext or a key for another vector).
fn halve_solution(v: i64, bound: u64) -> Result<i64> {
    if v % 2 == 0 {
        Ok(v / 2)
    } else {
        Err(FeError::DlogNotFound { bound })
    }
}

/// [`decrypt_matrix`], adding its time split to `stats`.
pub fn decrypt_matrix_with_stats<E: FeCurve>(
    params: &FeipParams,
    cts: &[FeipCiphertext<E>],
    keys: &[FeipFunctionKey<E>],
    dlog: &DlogTable<E>,
    stats: &DecryptStats,
) -> Result<Vec<Vec<i64>>> {
    for ct in cts {
        params.check_len("ciphertext", ct.c.len())?;
    }
    FeipDecryptor::new(params, keys, dlog)?
        .decrypt_each(cts, dlog, stats)
        .into_iter()
        .collect()
}

/// Keys prepared once for decrypting many ciphertexts.
///
/// The strategy, the bit-plane layout, the recoded secrets and the bounds depend on the keys
/// only, so a caller that holds the same keys for a long time (a prediction service and its
/// first-layer rows) prepares them once and decrypts batch after batch; [`decrypt_matrix`]
/// prepares and decrypts in one call. The secrets' digits are zeroized on drop.
pub struct FeipDecryptor<E: FeCurve> {
    params: FeipParams,
    keys: Vec<FeipFunctionKey<E>>,
    prepared: Vec<PreparedKey>,
    strategy: Strategy,
    bits: usize,
    sk_digits: usize,
    c0w: usize,
    /// Each key's bound `x_bound·‖y‖₁`.
    bounds: Vec<u64>,
    /// The bounds searched by the discrete log (doubled for doubled products).
    solve_bounds: Vec<u64>,
    /// Per position, the keys with a non-zero entry there and the entry, in key order, for
    /// [`Strategy::Multiples`].
    by_point: Vec<Vec<(u32, i64)>>,
    /// Additions per ciphertext of [`Strategy::Multiples`] for these keys.
    multiples: usize,
    planes: Option<BitPlanes>,
    /// Where the bit-plane additions run.
    backend: Backend,
}

impl<E: FeCurve> Drop for FeipDecryptor<E> {
    fn drop(&mut self) {
        for k in &mut self.prepared {
            k.sk_digits.zeroize();
        }
    }
}

impl<E: FeCurve> std::fmt::Debug for FeipDecryptor<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeipDecryptor")
            .field("params", &self.params)
            .field("keys", &self.keys.len())
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

impl<E: FeCurve> FeipDecryptor<E> {
    /// Prepares `keys` (each of length `params.n`) for decryption with `dlog`.
    ///
    /// Fails if a key has another length or if some key's bound `x_bound·‖y‖₁` exceeds the
    /// solver's limit.
    pub fn new(
        params: &FeipParams,
        keys: &[FeipFunctionKey<E>],
        dlog: &DlogTable<E>,
    ) -> Result<Self> {
        let c0w = c0_window::<E>(keys.len());
        for k in keys {
            params.check_len("key vector", k.y.len())?;
        }
        let n = params.n;
        let all = || keys.iter().flat_map(|k| k.y.iter()).copied();
        let (lo, hi) = (all().min().unwrap_or(0), all().max().unwrap_or(0));
        let Plan {
            mut strategy,
            bits,
            sk_digits,
        } = plan::<E>(n, keys.len(), (lo, hi), c0w);
        for k in keys {
            dlog.check_bound(bound_for_key(&k.y, params.x_bound))?;
        }
        let bounds: Vec<u64> = keys
            .iter()
            .map(|k| bound_for_key(&k.y, params.x_bound) as u64)
            .collect();
        // Bit planes: every key is `y` followed by the signed base-2^bits digits of `−sk`,
        // the coefficients of the points `2^(bits·j)·C_0`, so that `Σ y_i C_i − sk·C_0` is
        // one product over `n + sk_digits` points. The two parts get their own digit form and
        // chunk width: `y` may be sparse (gradients), the digits of `−sk` are uniform.
        // Doubled products (zero-free digits) are allowed when twice every bound is still
        // solvable.
        let may_double = bounds
            .iter()
            .all(|&b| u128::from(b) * 2 <= u128::from(dlog.limit()));
        // Sparse keys (a convolution's placed kernels): the plan costs both methods as if
        // dense; small multiples over the non-zero entries win when the bit planes' estimate
        // for these very rows is higher, and then the codes are never prepared.
        let column_max: Vec<u64> = (0..n)
            .map(|i| {
                keys.iter()
                    .map(|k| k.y[i].unsigned_abs())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let multiples = sparse_multiples_cost::<E>(keys, &column_max, c0w);
        let planes = if strategy == Strategy::Planes {
            let rows: Vec<Vec<i64>> = keys
                .par_iter()
                .map(|k| {
                    let mut row = k.y.clone();
                    row.extend(
                        recode_scalar(&-k.sk.clone(), bits)
                            .into_iter()
                            .map(i64::from),
                    );
                    row
                })
                .collect();
            let (layout, estimate) = BitPlanes::plan(&rows, bits, &[n], may_double);
            if column_max.iter().all(|&m| m <= SMALL_MULTIPLES_MAX)
                && (multiples as f64) < estimate + (sk_digits * bits) as f64
            {
                strategy = Strategy::Multiples;
                None
            } else {
                Some(BitPlanes::with_layout(&rows, bits, &layout))
            }
        } else {
            None
        };
        let prepared: Vec<PreparedKey> = keys
            .iter()
            .map(|k| PreparedKey {
                max_abs: k.y.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0),
                sk_digits: if strategy == Strategy::Planes {
                    Vec::new()
                } else {
                    recode_scalar(&k.sk, c0w)
                },
            })
            .collect();
        let mut by_point = Vec::new();
        if strategy == Strategy::Multiples {
            by_point = vec![Vec::new(); n];
            for (j, k) in keys.iter().enumerate() {
                for (i, &v) in k.y.iter().enumerate().filter(|(_, v)| **v != 0) {
                    by_point[i].push((j as u32, v));
                }
            }
        }
        let doubled = planes.as_ref().is_some_and(BitPlanes::doubled);
        let solve_bounds = if doubled {
            bounds.iter().map(|&b| 2 * b).collect()
        } else {
            bounds.clone()
        };
        Ok(FeipDecryptor {
            params: *params,
            keys: keys.to_vec(),
            prepared,
            strategy,
            bits,
            sk_digits,
            c0w,
            bounds,
            solve_bounds,
            by_point,
            multiples,
            planes,
            backend: Backend::active(),
        })
    }

    /// The same decryptor on another point-addition backend (the fallback where this curve or
    /// CPU lacks it): for comparisons; the results are the same on every backend.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The number of keys.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Point additions per ciphertext when the bit-plane method (tables, lookups and
    /// Horner's rule for all keys, `C_0`'s doublings included) or small multiples (the
    /// multiples, one per non-zero key entry, the `C_0` table and terms) was chosen, else
    /// `None`.
    pub fn additions_per_ciphertext(&self) -> Option<usize> {
        match (&self.planes, self.strategy) {
            (Some(p), _) => Some(p.additions() + self.sk_digits * self.bits),
            (None, Strategy::Multiples) => Some(self.multiples),
            _ => None,
        }
    }

    /// Decrypts every ciphertext against every key: `out[c][k] = ⟨x_c, y_k⟩`; fails as a
    /// whole if any ciphertext fails.
    pub fn decrypt(&self, cts: &[FeipCiphertext<E>], dlog: &DlogTable<E>) -> Result<Vec<Vec<i64>>> {
        self.decrypt_each(cts, dlog, &DecryptStats::default())
            .into_iter()
            .collect()
    }

    /// Decrypts every ciphertext against every key, with one result per ciphertext: a
    /// ciphertext of the wrong length, or one whose products are not within their bounds
    /// (tampered, or made under another public key), fails alone. Time goes to `stats`.
    pub fn decrypt_each(
        &self,
        cts: &[FeipCiphertext<E>],
        dlog: &DlogTable<E>,
        stats: &DecryptStats,
    ) -> Vec<Result<Vec<i64>>> {
        if let Some(&b) = self.solve_bounds.iter().max() {
            if let Err(e) = dlog.check_bound(u128::from(b)) {
                return cts.iter().map(|_| Err(e.clone())).collect();
            }
        }
        let key_groups = key_groups(cts.len(), rayon::current_num_threads(), self.keys.len());
        cts.par_iter()
            .map(|ct| {
                self.params.check_len("ciphertext", ct.c.len())?;
                let started = Instant::now();
                let d = self.group_sums(ct, key_groups);
                let additions = self.additions_per_ciphertext().unwrap_or(0);
                stats.add_group(started, additions as u64);
                let started = Instant::now();
                let out = self.solve(dlog, &d);
                DecryptStats::add(&stats.dlog_nanos, started);
                out
            })
            .collect()
    }

    /// `Σ y_i C_i − sk·C_0` for every key, by the planned strategy.
    fn group_sums(&self, ct: &FeipCiphertext<E>, key_groups: usize) -> Vec<RawPoint<E>> {
        let h = self.keys.len();
        let pts: Vec<RawPoint<E>> = ct.c.iter().map(|p| p.as_raw().clone()).collect();
        let c0 = ct.c0.as_raw();
        if let Some(planes) = &self.planes {
            let mut all = pts;
            let mut q = c0.clone();
            for _ in 0..self.sk_digits {
                all.push(q.clone());
                double_k::<E>(&mut q, self.bits);
            }
            let per = h.div_ceil(key_groups);
            return (0..key_groups)
                .into_par_iter()
                .flat_map_iter(|g| {
                    let keys = g * per..((g + 1) * per).min(h);
                    subset_sum_products_on::<E>(self.backend, &all, planes, keys)
                })
                .collect();
        }
        let c0_table = (h >= C0_TABLE_MIN_KEYS).then(|| FixedBase::<E>::new(c0, self.c0w));
        let c0_term = |k: &PreparedKey, sk: &Scalar<E>| match &c0_table {
            Some(t) => t.mul_digits(&k.sk_digits),
            None => c0.scalar_mul(sk.as_raw()),
        };
        if self.strategy == Strategy::Multiples {
            let per = h.div_ceil(key_groups);
            return (0..key_groups)
                .into_par_iter()
                .flat_map_iter(|g| {
                    let keys = g * per..((g + 1) * per).min(h);
                    let mut accs = self.multiples_sums(&pts, keys.clone());
                    for (acc, j) in accs.iter_mut().zip(keys) {
                        acc.sub_point_assign(&c0_term(&self.prepared[j], &self.keys[j].sk));
                    }
                    accs
                })
                .collect();
        }
        self.prepared
            .par_iter()
            .zip(&self.keys)
            .map_init(Vec::new, |buckets, (k, key)| {
                let mut acc = msm_signed_with::<E>(&pts, &key.y, k.max_abs, buckets);
                acc.sub_point_assign(&c0_term(k, &key.sk));
                acc
            })
            .collect()
    }

    /// `Σ y_i C_i` for the keys in `keys`, point-major: one point's multiples are built
    /// (only as far as these keys need) and applied to every key while they are in cache.
    /// `by_point` lists each point's keys in key order, so a range of keys is a slice.
    fn multiples_sums(&self, pts: &[RawPoint<E>], keys: Range<usize>) -> Vec<RawPoint<E>> {
        let mut accs = vec![E::Point::zero(); keys.len()];
        let Some(first) = pts.first() else {
            return accs;
        };
        let mut table = SmallMultiples::<E>::new(first, 0);
        for (p, entries) in pts.iter().zip(&self.by_point) {
            let lo = entries.partition_point(|&(k, _)| (k as usize) < keys.start);
            let hi = entries.partition_point(|&(k, _)| (k as usize) < keys.end);
            let used = &entries[lo..hi];
            let Some(max) = used.iter().map(|&(_, v)| v.unsigned_abs()).max() else {
                continue;
            };
            table.refill(p, max as usize);
            for &(k, v) in used {
                table.add_to(&mut accs[k as usize - keys.start], v);
            }
        }
        accs
    }

    /// The discrete logs of one ciphertext's sums, halved for doubled products.
    fn solve(&self, dlog: &DlogTable<E>, d: &[RawPoint<E>]) -> Result<Vec<i64>> {
        let doubled = self.planes.as_ref().is_some_and(BitPlanes::doubled);
        dlog.solve_batch(d, &self.solve_bounds)
            .into_iter()
            .zip(&self.bounds)
            .map(|(v, &bound)| match v {
                Ok(v) if doubled => halve_solution(v, bound),
                // Report the caller's bound, not the doubled one searched.
                Err(FeError::DlogNotFound { .. }) if doubled => {
                    Err(FeError::DlogNotFound { bound })
                }
                other => other,
            })
            .collect()
    }
}

impl<E: FeCurve> Encode<E> for FeipParams {
    const KIND: u8 = 1;
    const NAME: &'static str = "FEIP parameters";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        self.encode(out)
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        Self::decode(r)
    }
}

impl<E: FeCurve> Encode<E> for FeipPublicKey<E> {
    const KIND: u8 = 2;
    const NAME: &'static str = "FEIP public key";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        self.params.encode(out);
        put_points(out, &self.h);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let params = FeipParams::decode(r)?;
        let h = r.points::<E>()?;
        params.check_len("public key", h.len())?;
        if h.iter().any(|p| p.is_zero()) {
            return Err(FeError::InvalidEncoding("public key point (identity)"));
        }
        Ok(FeipPublicKey { params, h })
    }
}

impl<E: FeCurve> Encode<E> for FeipMasterSecretKey<E> {
    const KIND: u8 = 3;
    const NAME: &'static str = "FEIP master secret key";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        self.params.encode(out);
        out.extend_from_slice(&(self.s.len() as u32).to_le_bytes());
        for s in &self.s {
            put_scalar(out, s);
        }
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let params = FeipParams::decode(r)?;
        let n = r.len(32)?;
        params.check_len("master secret key", n)?;
        let s = (0..n)
            .map(|_| r.scalar::<E>())
            .collect::<Result<Vec<_>>>()?;
        Ok(FeipMasterSecretKey::from_scalars(params, s))
    }
}

impl<E: FeCurve> Encode<E> for FeipFunctionKey<E> {
    const KIND: u8 = 4;
    const NAME: &'static str = "FEIP function key";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        put_i64s(out, &self.y);
        put_scalar(out, &self.sk);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let y = r.i64s()?;
        let sk = r.scalar::<E>()?;
        Ok(FeipFunctionKey { y, sk })
    }
}

impl<E: FeCurve> Encode<E> for FeipCiphertext<E> {
    const KIND: u8 = 5;
    const NAME: &'static str = "FEIP ciphertext";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        put_point(out, &self.c0);
        put_points(out, &self.c);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let c0 = r.point::<E>()?;
        let c = r.points::<E>()?;
        Ok(FeipCiphertext { c0, c })
    }
}

serde_via_bytes!(FeipPublicKey);
serde_via_bytes!(FeipFunctionKey);
serde_via_bytes!(FeipCiphertext);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{Ristretto, Secp256k1};
    use proptest::prelude::{prop_assert_eq, proptest, ProptestConfig};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]
        /// Ciphertexts made on every backend decrypt on every backend to the inner products:
        /// plaintext entries past the small multiples of `G` (2^16) and negative, several
        /// vectors at once and one alone, points and bytes.
        #[test]
        fn every_backend_encrypts_and_decrypts_the_same_products(
            xs in proptest::collection::vec(proptest::collection::vec(-70_000i64..=70_000, 13), 1..6),
            ys in proptest::collection::vec(proptest::collection::vec(-7i64..=7, 13), 1..9),
        ) {
            let params = FeipParams::new(13, 70_000).expect("params");
            let (pk, msk) = setup::<Ristretto>(params);
            let keys = msk.derive_keys(&ys).expect("keys");
            let dlog = dlog_table();
            let want: Vec<Vec<i64>> = xs
                .iter()
                .map(|x| ys.iter().map(|y| x.iter().zip(y).map(|(a, b)| a * b).sum()).collect())
                .collect();
            for enc in Backend::available() {
                let encryptor = FeipEncryptor::new_on(&pk, enc);
                let cts = encryptor.encrypt_many(&xs).expect("encrypt");
                let from_bytes: Vec<FeipCiphertext<Ristretto>> = encryptor
                    .encrypt_many_to_bytes(&xs)
                    .expect("encrypt")
                    .iter()
                    .map(|b| FeipCiphertext::from_bytes(b).expect("decode"))
                    .collect();
                let one = encryptor.encrypt(&xs[0]).expect("encrypt");
                for dec in Backend::available() {
                    let d = FeipDecryptor::new(&params, &keys, dlog).expect("dec").with_backend(dec);
                    prop_assert_eq!(&d.decrypt(&cts, dlog).expect("decrypt"), &want);
                    prop_assert_eq!(&d.decrypt(&from_bytes, dlog).expect("decrypt"), &want);
                    let got = d.decrypt(std::slice::from_ref(&one), dlog).expect("decrypt");
                    prop_assert_eq!(&got[0], &want[0]);
                }
            }
        }
    }

    fn dlog_table() -> &'static DlogTable<Ristretto> {
        static T: std::sync::OnceLock<DlogTable<Ristretto>> = std::sync::OnceLock::new();
        T.get_or_init(|| DlogTable::new(1 << 14).expect("dlog"))
    }

    /// A child key is a function of the parent and the label only, fits its own public key,
    /// and its function keys decrypt nothing in range under another child or the parent.
    #[test]
    fn child_keys_are_deterministic_and_bound_to_their_label() {
        let params = FeipParams::new(8, 255).expect("params");
        let (pk, msk) = setup::<Ristretto>(params);
        let (a, a2, b) = (
            msk.derive_child(b"batch 0"),
            msk.derive_child(b"batch 0"),
            msk.derive_child(b"batch 1"),
        );
        let (pka, pkb) = (a.public_key(), b.public_key());
        assert_eq!(pka, a2.public_key());
        assert_ne!(pka, pkb);
        assert_ne!(pka, pk);
        assert_eq!(a.params(), params);
        let x: Vec<i64> = (0..8).map(|i| 30 * i).collect();
        let y: Vec<i64> = vec![3, -1, 0, 2, 7, -5, 1, 1];
        let want: i64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        let dlog = DlogTable::<Ristretto>::new(1 << 16).expect("dlog");
        let ct_a = FeipEncryptor::new(&pka).encrypt(&x).expect("encrypt");
        let ct_b = FeipEncryptor::new(&pkb).encrypt(&x).expect("encrypt");
        let ct_parent = FeipEncryptor::new(&pk).encrypt(&x).expect("encrypt");
        let key_a = a.derive_key(&y).expect("key");
        assert_eq!(decrypt(&params, &ct_a, &key_a, &dlog), Ok(want));
        assert!(decrypt(&params, &ct_b, &key_a, &dlog).is_err());
        assert!(decrypt(&params, &ct_parent, &key_a, &dlog).is_err());
        let key_parent = msk.derive_key(&y).expect("key");
        assert!(decrypt(&params, &ct_a, &key_parent, &dlog).is_err());
    }

    /// Many sparse keys (a convolution's placed kernels): small multiples per point beat the
    /// bit planes' real count, and decrypt exactly.
    #[test]
    fn sparse_keys_use_small_multiples_and_decrypt_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let params = FeipParams::new(101, 255).expect("params");
        let (pk, msk) = setup::<Ristretto>(params);
        let ys: Vec<Vec<i64>> = (0..2000)
            .map(|_| {
                let mut y = vec![0i64; 101];
                for _ in 0..5 {
                    y[rng.gen_range(0..101)] = rng.gen_range(-100..=100);
                }
                y
            })
            .collect();
        let keys = msk.derive_keys(&ys).expect("keys");
        let dlog = DlogTable::<Ristretto>::new(1 << 12).expect("dlog");
        let d = FeipDecryptor::new(&params, &keys, &dlog).expect("decryptor");
        assert!(format!("{d:?}").contains("Multiples"), "{d:?}");
        let xs: Vec<Vec<i64>> = (0..3)
            .map(|_| (0..101).map(|_| rng.gen_range(0..=255)).collect())
            .collect();
        let cts = FeipEncryptor::new(&pk).encrypt_many(&xs).expect("encrypt");
        let got = d.decrypt(&cts, &dlog).expect("decrypt");
        for (x, row) in xs.iter().zip(&got) {
            let want: Vec<i64> = ys
                .iter()
                .map(|y| x.iter().zip(y).map(|(a, b)| a * b).sum())
                .collect();
            assert_eq!(row, &want);
        }
        assert!(d.additions_per_ciphertext().is_some());
        // Keys cut into groups (as for a lone or an odd query on several cores) give the
        // same sums as one group.
        let whole = d.group_sums(&cts[0], 1);
        for groups in [2, 3, 7] {
            assert!(d.group_sums(&cts[0], groups) == whole, "{groups} groups");
        }
    }

    #[test]
    fn keys_are_cut_so_that_every_thread_has_work() {
        // (ciphertexts, threads, keys) -> groups
        for (cts, threads, keys, want) in [
            (1, 2, 4704, 2),
            (2, 2, 4704, 1),
            (3, 2, 4704, 2),
            (4, 2, 4704, 1),
            (3, 4, 4704, 4),
            (6, 4, 4704, 2),
            (64, 2, 128, 1),
            (1, 8, 20, 2),
            (0, 2, 10, 1),
            (5, 1, 10, 1),
        ] {
            let g = key_groups(cts, threads, keys);
            assert_eq!(g, want, "{cts} ciphertexts, {threads} threads, {keys} keys");
            assert!(threads < 2 || (cts * g).is_multiple_of(threads) || g == keys.div_ceil(16));
        }
    }

    /// The shapes of training pick the strategies the cost model was designed for.
    #[test]
    fn plans_for_training_shapes() {
        // Forward (one sample, 128 neuron rows of length 785) and backward (one pixel column
        // of a batch of 64, 128 delta rows): bit planes with 8 bits and C_0 folded in.
        for n in [785, 64] {
            let p = plan::<Ristretto>(n, 128, (-128, 127), c0_window::<Ristretto>(128));
            assert_eq!((p.strategy, p.bits, p.sk_digits), (Strategy::Planes, 8, 32));
            let p = plan::<Secp256k1>(n, 128, (-128, 127), c0_window::<Secp256k1>(128));
            assert_eq!((p.strategy, p.bits, p.sk_digits), (Strategy::Planes, 8, 33));
        }
        // One key: buckets; tiny entries on a single point: small multiples; wide keys: buckets.
        assert_eq!(
            plan::<Ristretto>(785, 1, (-127, 127), c0_window::<Ristretto>(1)).strategy,
            Strategy::Buckets
        );
        assert_eq!(
            plan::<Ristretto>(1, 16, (-3, 3), c0_window::<Ristretto>(16)).strategy,
            Strategy::Multiples
        );
        // Entries of -128..=127 take 8 bits, one more on either side takes 9.
        assert_eq!(
            plan::<Ristretto>(64, 128, (-128, 128), c0_window::<Ristretto>(128)).bits,
            9
        );
        assert_eq!(
            plan::<Ristretto>(64, 128, (-129, 127), c0_window::<Ristretto>(128)).bits,
            9
        );
        assert_eq!(
            plan::<Ristretto>(785, 128, (-(1 << 30), 1 << 30), c0_window::<Ristretto>(128))
                .strategy,
            Strategy::Buckets
        );
    }

    #[test]
    fn doubled_solutions_halve_or_fail() {
        assert_eq!(halve_solution(-8, 4), Ok(-4));
        assert_eq!(halve_solution(0, 4), Ok(0));
        // An odd logarithm of 2·D: D itself is (v + q)/2·G, outside any small bound.
        assert_eq!(
            halve_solution(7, 4),
            Err(FeError::DlogNotFound { bound: 4 })
        );
    }
}
