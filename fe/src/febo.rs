//! FEBO: CryptoNN's functional encryption for basic operations, one element at a time.
//!
//! In a group of prime order `q` with generator `G`:
//!
//! * **Setup**: `s ←$ Z_q`, `H = s·G`; `mpk = H`, `msk = s`.
//! * **Encrypt(x)**: `r ←$ Z_q`; commitment `cmt = r·G`, ciphertext `ct = r·H + x·G`.
//! * **KeyDerive(msk, cmt, op, y)** is bound to one ciphertext's commitment:
//!   add `sk = s·cmt − y·G`; sub `sk = s·cmt + y·G`; mul `sk = y·s·cmt`; div `sk = y⁻¹·s·cmt`.
//! * **Decrypt**: add/sub `ct − sk = (x ± y)·G`; mul `y·ct − sk = (x·y)·G`;
//!   div `y⁻¹·ct − sk = (x·y⁻¹ mod q)·G`, then the bounded discrete log.
//!
//! Division is exact only when `y` divides `x`: otherwise `x·y⁻¹ mod q` is a huge residue, the
//! discrete log is not within the bound, and decryption returns [`FeError::DlogNotFound`] (an
//! error, never a wrong number). Division by zero is refused at key derivation.

use crate::dlog::{DlogTable, GeneratorTable};
use crate::error::{FeError, Result};
use crate::group::{double, generator, halve, scalar_from_i64, wrap, FeCurve, RawPoint};
use crate::msm::{recode_scalar, FixedBase};
use crate::serial::{put_point, put_scalar, serde_via_bytes, Encode, Reader};
use curv::elliptic::curves::{ECPoint, Point, Scalar};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

const ENC_WINDOW: usize = 5;

/// The operation a FEBO key computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// `x + y`
    Add,
    /// `x − y`
    Sub,
    /// `x · y`
    Mul,
    /// `x / y`, exact division only
    Div,
}

impl Op {
    fn tag(self) -> u8 {
        match self {
            Op::Add => 0,
            Op::Sub => 1,
            Op::Mul => 2,
            Op::Div => 3,
        }
    }
    fn from_tag(t: u8) -> Result<Self> {
        Ok(match t {
            0 => Op::Add,
            1 => Op::Sub,
            2 => Op::Mul,
            3 => Op::Div,
            _ => return Err(FeError::Malformed(format!("unknown FEBO operation {t}"))),
        })
    }

    /// The bound on `|result|` when `|x| ≤ x_bound`.
    pub fn result_bound(self, x_bound: u64, y: i64) -> u128 {
        let (x, y) = (u128::from(x_bound), u128::from(y.unsigned_abs()));
        match self {
            Op::Add | Op::Sub => x + y,
            Op::Mul => x * y,
            Op::Div => x,
        }
    }
}

/// FEBO public key `H = s·G`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeboPublicKey<E: FeCurve> {
    h: Point<E>,
}

/// FEBO master secret `s`, zeroized when dropped (by `curv`).
pub struct FeboMasterSecretKey<E: FeCurve> {
    s: Scalar<E>,
    /// `y·G` for the operands of key derivation.
    g: GeneratorTable<E>,
}

impl<E: FeCurve> std::fmt::Debug for FeboMasterSecretKey<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FeboMasterSecretKey { s: <redacted> }")
    }
}

/// An encrypted element: commitment `r·G` and ciphertext `r·H + x·G`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeboCiphertext<E: FeCurve> {
    cmt: Point<E>,
    ct: Point<E>,
}

/// A key for one operation with one operand on one ciphertext (identified by its commitment).
#[derive(Debug, Clone, PartialEq)]
pub struct FeboFunctionKey<E: FeCurve> {
    op: Op,
    y: i64,
    sk: Point<E>,
}

/// Generates a fresh FEBO key pair.
pub fn setup<E: FeCurve>() -> (FeboPublicKey<E>, FeboMasterSecretKey<E>) {
    let s = Scalar::<E>::random();
    let h = Point::<E>::generator() * &s;
    (FeboPublicKey { h }, FeboMasterSecretKey::from_secret(s))
}

impl<E: FeCurve> FeboPublicKey<E> {
    /// The point `H`.
    pub fn point(&self) -> &Point<E> {
        &self.h
    }
}

impl<E: FeCurve> FeboCiphertext<E> {
    /// The commitment `r·G`, which a key request names.
    pub fn commitment(&self) -> &Point<E> {
        &self.cmt
    }
    /// The ciphertext point `r·H + x·G`.
    pub fn ciphertext(&self) -> &Point<E> {
        &self.ct
    }
    /// Assembles from parts.
    pub fn from_parts(cmt: Point<E>, ct: Point<E>) -> Self {
        FeboCiphertext { cmt, ct }
    }
}

impl<E: FeCurve> FeboFunctionKey<E> {
    /// The operation.
    pub fn op(&self) -> Op {
        self.op
    }
    /// The operand.
    pub fn operand(&self) -> i64 {
        self.y
    }
}

impl<E: FeCurve> FeboMasterSecretKey<E> {
    fn from_secret(s: Scalar<E>) -> Self {
        FeboMasterSecretKey {
            s,
            g: GeneratorTable::for_base(&generator::<E>(), 1 << 12, ENC_WINDOW),
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> FeboPublicKey<E> {
        FeboPublicKey {
            h: Point::<E>::generator() * &self.s,
        }
    }

    /// Derives the key for `op` with operand `y` on the ciphertext with commitment `cmt`.
    pub fn derive_key(&self, cmt: &Point<E>, op: Op, y: i64) -> Result<FeboFunctionKey<E>> {
        if cmt.is_zero() {
            return Err(FeError::InvalidEncoding("commitment (identity)"));
        }
        let scmt = cmt * &self.s;
        let yg = || wrap(self.g.mul_i64(y));
        let sk = match op {
            Op::Add => scmt - yg(),
            Op::Sub => scmt + yg(),
            Op::Mul => scmt * scalar_from_i64::<E>(y),
            Op::Div => {
                let inv = scalar_from_i64::<E>(y)
                    .invert()
                    .ok_or_else(|| FeError::InvalidOperation("division by zero".into()))?;
                scmt * inv
            }
        };
        Ok(FeboFunctionKey { op, y, sk })
    }

    /// Derives many keys in parallel.
    pub fn derive_keys(&self, reqs: &[(Point<E>, Op, i64)]) -> Result<Vec<FeboFunctionKey<E>>> {
        reqs.par_iter()
            .map(|(c, op, y)| self.derive_key(c, *op, *y))
            .collect()
    }
}

/// Encrypts under a FEBO public key with precomputed fixed-base tables.
pub struct FeboEncryptor<E: FeCurve> {
    pk: FeboPublicKey<E>,
    g: GeneratorTable<E>,
    h: FixedBase<E>,
}

impl<E: FeCurve> FeboEncryptor<E> {
    /// Precomputes the tables for `pk`.
    pub fn new(pk: &FeboPublicKey<E>) -> Self {
        FeboEncryptor {
            g: GeneratorTable::for_base(&halve::<E>(&generator::<E>()), 1 << 12, ENC_WINDOW),
            h: FixedBase::new(&halve::<E>(pk.h.as_raw()), ENC_WINDOW),
            pk: pk.clone(),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &FeboPublicKey<E> {
        &self.pk
    }

    /// `(cmt/2, ct/2)` of a fresh encryption of `x` (the tables hold halved bases).
    fn encrypt_halves(&self, x: i64) -> [RawPoint<E>; 2] {
        let r = Scalar::<E>::random();
        let d = recode_scalar(&r, ENC_WINDOW);
        let mut ct = self.h.mul_digits(&d);
        ct.add_point_assign(&self.g.mul_i64(x));
        [self.g.mul(&r), ct]
    }

    /// Encrypts one integer.
    pub fn encrypt(&self, x: i64) -> FeboCiphertext<E> {
        let [c, t] = self.encrypt_halves(x);
        FeboCiphertext {
            cmt: wrap(double::<E>(&c)),
            ct: wrap(double::<E>(&t)),
        }
    }

    /// Encrypts many integers in parallel.
    pub fn encrypt_many(&self, xs: &[i64]) -> Vec<FeboCiphertext<E>> {
        xs.par_iter().map(|&x| self.encrypt(x)).collect()
    }

    /// Encrypts many integers straight to the bytes of each `encrypt(x).to_bytes()`, with
    /// batched point encoding.
    pub fn encrypt_many_to_bytes(&self, xs: &[i64]) -> Vec<Vec<u8>> {
        let kind = <FeboCiphertext<E> as Encode<E>>::KIND;
        xs.par_chunks(256)
            .flat_map_iter(|chunk| {
                let halves: Vec<RawPoint<E>> =
                    chunk.iter().flat_map(|&x| self.encrypt_halves(x)).collect();
                let enc = E::encode_doubled(&halves);
                enc.chunks(2 * E::POINT_LEN)
                    .map(|pair| {
                        let mut out = Vec::with_capacity(20 + pair.len());
                        crate::serial::put_header::<E>(&mut out, kind);
                        out.extend_from_slice(pair);
                        out
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn result_point<E: FeCurve>(
    ct: &FeboCiphertext<E>,
    key: &FeboFunctionKey<E>,
) -> Result<RawPoint<E>> {
    let mut p = match key.op {
        Op::Add | Op::Sub => ct.ct.as_raw().clone(),
        Op::Mul => ct
            .ct
            .as_raw()
            .scalar_mul(scalar_from_i64::<E>(key.y).as_raw()),
        Op::Div => {
            let inv = scalar_from_i64::<E>(key.y)
                .invert()
                .ok_or_else(|| FeError::InvalidOperation("division by zero".into()))?;
            ct.ct.as_raw().scalar_mul(inv.as_raw())
        }
    };
    p.sub_point_assign(key.sk.as_raw());
    Ok(p)
}

/// Decrypts `x op y` where `|x| ≤ x_bound`.
pub fn decrypt<E: FeCurve>(
    ct: &FeboCiphertext<E>,
    key: &FeboFunctionKey<E>,
    x_bound: u64,
    dlog: &DlogTable<E>,
) -> Result<i64> {
    decrypt_many(&[(ct, key)], x_bound, dlog)?
        .pop()
        .ok_or(FeError::InvalidOperation("empty result".into()))
}

/// Decrypts many (ciphertext, key) pairs with batched discrete logs, in parallel.
pub fn decrypt_many<E: FeCurve>(
    pairs: &[(&FeboCiphertext<E>, &FeboFunctionKey<E>)],
    x_bound: u64,
    dlog: &DlogTable<E>,
) -> Result<Vec<i64>> {
    let mut bounds = Vec::with_capacity(pairs.len());
    for (_, k) in pairs {
        let b = k.op.result_bound(x_bound, k.y);
        dlog.check_bound(b)?;
        bounds.push(b as u64);
    }
    let pts = pairs
        .par_iter()
        .map(|(c, k)| result_point(c, k))
        .collect::<Result<Vec<_>>>()?;
    const CHUNK: usize = 256;
    let out: Vec<Vec<Result<i64>>> = pts
        .par_chunks(CHUNK)
        .zip(bounds.par_chunks(CHUNK))
        .map(|(p, b)| dlog.solve_batch(p, b))
        .collect();
    out.into_iter().flatten().collect()
}

impl<E: FeCurve> Encode<E> for FeboPublicKey<E> {
    const KIND: u8 = 16;
    const NAME: &'static str = "FEBO public key";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        put_point(out, &self.h);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let h = r.point::<E>()?;
        if h.is_zero() {
            return Err(FeError::InvalidEncoding("public key point (identity)"));
        }
        Ok(FeboPublicKey { h })
    }
}

impl<E: FeCurve> Encode<E> for FeboMasterSecretKey<E> {
    const KIND: u8 = 17;
    const NAME: &'static str = "FEBO master secret key";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        put_scalar(out, &self.s);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        Ok(FeboMasterSecretKey::from_secret(r.scalar::<E>()?))
    }
}

impl<E: FeCurve> Encode<E> for FeboCiphertext<E> {
    const KIND: u8 = 18;
    const NAME: &'static str = "FEBO ciphertext";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        put_point(out, &self.cmt);
        put_point(out, &self.ct);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let cmt = r.point::<E>()?;
        let ct = r.point::<E>()?;
        Ok(FeboCiphertext { cmt, ct })
    }
}

impl<E: FeCurve> Encode<E> for FeboFunctionKey<E> {
    const KIND: u8 = 19;
    const NAME: &'static str = "FEBO function key";
    fn encode_payload(&self, out: &mut Vec<u8>) {
        out.push(self.op.tag());
        out.extend_from_slice(&self.y.to_le_bytes());
        put_point(out, &self.sk);
    }
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self> {
        let op = Op::from_tag(r.u8()?)?;
        let y = r.i64()?;
        let sk = r.point::<E>()?;
        Ok(FeboFunctionKey { op, y, sk })
    }
}

serde_via_bytes!(FeboPublicKey);
serde_via_bytes!(FeboCiphertext);
serde_via_bytes!(FeboFunctionKey);
