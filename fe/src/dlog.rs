//! Bounded discrete logarithms by baby-step giant-step.
//!
//! Decryption ends with a point `D = v·G` and must recover the integer `v`, known to satisfy
//! `|v| ≤ bound`. The [`DlogTable`] stores the fingerprints (see [`FeCurve::fingerprints`]) of
//! the *baby steps* `j·G` for `j ∈ [-h, h]`. With the stride `S = (2h+1)·G`, every `v` is
//! `k(2h+1) + j` for one `k`, so the solver looks up `D - k·S` for the *giant steps*
//! `k = 0, 1, -1, 2, -2, …` up to `|k| ≤ (bound + h)/(2h+1)`: small values, the common case
//! in training, are found first. A lookup compares 96 bits of the fingerprint (64 as the key,
//! 32 as a check), so a false match has probability about `2^-75` per lookup.
//!
//! [`DlogTable::solve_batch`] advances many points in lock-step so that each round's
//! fingerprints share one batched inversion. A value outside the bound is an error
//! ([`FeError::DlogNotFound`]), never a wrong number.
//!
//! The table is built once (about `2h` additions plus batched encodings, in parallel) and can
//! be saved to and loaded from a file protected by a SHA-256 checksum.

use crate::error::{FeError, Result};
use crate::group::{generator, FeCurve, RawPoint};
use crate::msm::FixedBase;
use curv::elliptic::curves::{ECPoint, Point, Scalar};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Read;
use std::marker::PhantomData;
use std::path::Path;

/// Default half-width `h` of the baby-step table: `2^19`, about 1 M entries, 32 MiB.
pub const DEFAULT_HALF_WIDTH: u64 = 1 << 19;
/// Largest half-width accepted (the table stores offsets in 32 bits).
pub const MAX_HALF_WIDTH: u64 = 1 << 30;
/// Default limit on the bound of one solve: `2^36`, at most 65,536 giant steps each way.
pub const DEFAULT_LIMIT: u64 = 1 << 36;

const FILE_MAGIC: &[u8; 8] = b"FEDLOG01";

/// A hasher for fingerprints, which are already uniformly distributed.
#[derive(Default)]
struct FpHasher(u64);

impl Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        // Spread the low bits: encodings have fixed bits in places.
        self.0 = x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

type FpMap = HashMap<u64, u64, BuildHasherDefault<FpHasher>>;

fn split(fp: u128) -> (u64, u32) {
    (fp as u64, (fp >> 64) as u32)
}

/// A baby-step table for discrete logs with respect to the generator of `E`.
pub struct DlogTable<E: FeCurve> {
    half: u64,
    limit: u64,
    map: FpMap,
    stride: RawPoint<E>,
    _curve: PhantomData<E>,
}

impl<E: FeCurve> std::fmt::Debug for DlogTable<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlogTable")
            .field("curve", &E::CURVE_NAME)
            .field("half_width", &self.half)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<E: FeCurve> DlogTable<E> {
    /// Builds the table of `j·G` for `j ∈ [-half_width, half_width]`, using all cores.
    pub fn new(half_width: u64) -> Result<Self> {
        if half_width == 0 || half_width > MAX_HALF_WIDTH {
            return Err(FeError::OutOfRange {
                what: "discrete-log table half-width",
                value: half_width as i128,
                bound: MAX_HALF_WIDTH as i128,
            });
        }
        let h = half_width as i64;
        let total = 2 * half_width + 1;
        const CHUNK: u64 = 8192;
        let g = generator::<E>();
        let chunks: Vec<Vec<(u64, u64)>> = (0..total.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let start = c * CHUNK;
                let len = CHUNK.min(total - start) as usize;
                // j runs from -h + start upwards
                let j0 = start as i64 - h;
                let mut cur = scalar_mul_i64::<E>(&g, j0);
                let mut pts = Vec::with_capacity(len);
                for _ in 0..len {
                    pts.push(cur.clone());
                    cur.add_point_assign(&g);
                }
                E::fingerprints(&pts)
                    .into_iter()
                    .enumerate()
                    .map(|(i, fp)| {
                        let (key, check) = split(fp);
                        (key, (u64::from(check) << 32) | (start + i as u64))
                    })
                    .collect()
            })
            .collect();
        let mut map = FpMap::with_capacity_and_hasher(total as usize, Default::default());
        for (key, val) in chunks.into_iter().flatten() {
            if map.insert(key, val).is_some() {
                return Err(FeError::Malformed(
                    "fingerprint collision while building the discrete-log table; choose another half-width".into(),
                ));
            }
        }
        Ok(Self::from_map(half_width, map))
    }

    fn from_map(half: u64, map: FpMap) -> Self {
        let stride = scalar_mul_i64::<E>(&generator::<E>(), (2 * half + 1) as i64);
        DlogTable {
            half,
            limit: DEFAULT_LIMIT,
            map,
            stride,
            _curve: PhantomData,
        }
    }

    /// The half-width `h`: values in `[-h, h]` are found without a giant step.
    pub fn half_width(&self) -> u64 {
        self.half
    }

    /// The largest bound a solve accepts.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Sets the largest bound a solve accepts (the worst-case cost is `limit/(2h+1)` giant
    /// steps in each direction).
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// Fails early, with a clear message, if results up to `needed` cannot be solved.
    pub fn check_bound(&self, needed: u128) -> Result<()> {
        if needed > u128::from(self.limit) {
            Err(FeError::BoundTooLarge {
                needed,
                limit: self.limit,
            })
        } else {
            Ok(())
        }
    }

    fn lookup(&self, fp: u128) -> Option<i64> {
        let (key, check) = split(fp);
        let v = *self.map.get(&key)?;
        if (v >> 32) as u32 != check {
            return None;
        }
        Some((v & 0xFFFF_FFFF) as i64 - self.half as i64)
    }

    /// Finds `v` with `v·G = p` and `|v| ≤ bound`.
    pub fn solve(&self, p: &Point<E>, bound: u64) -> Result<i64> {
        self.solve_batch(std::slice::from_ref(p.as_raw()), &[bound])
            .pop()
            .unwrap_or(Err(FeError::DlogNotFound { bound }))
    }

    /// Solves many points at once; `bounds[i]` bounds `|v_i|` (one bound for all if of length 1).
    ///
    /// Each round advances every unsolved point by one giant step and fingerprints them all
    /// together, sharing one field inversion on Ristretto.
    pub fn solve_batch(&self, points: &[RawPoint<E>], bounds: &[u64]) -> Vec<Result<i64>> {
        let bound_of = |i: usize| -> u64 {
            if bounds.len() == 1 {
                bounds[0]
            } else {
                bounds.get(i).copied().unwrap_or(0)
            }
        };
        let mut out: Vec<Result<i64>> = (0..points.len())
            .map(|i| {
                let b = bound_of(i);
                Err(if b > self.limit {
                    FeError::BoundTooLarge {
                        needed: b.into(),
                        limit: self.limit,
                    }
                } else {
                    FeError::DlogNotFound { bound: b }
                })
            })
            .collect();
        let stride = 2 * self.half + 1;
        // (index, max giant step, point - k·S, point + k·S)
        let mut live: Vec<(usize, u64, RawPoint<E>, RawPoint<E>)> = (0..points.len())
            .filter(|&i| bound_of(i) <= self.limit)
            .map(|i| {
                let kmax = (bound_of(i) + self.half) / stride;
                (i, kmax, points[i].clone(), points[i].clone())
            })
            .collect();
        let finish = |out: &mut Vec<Result<i64>>, i: usize, v: i64| {
            if v.unsigned_abs() <= bound_of(i) {
                out[i] = Ok(v);
            }
        };
        // k = 0
        let fps = E::fingerprints(&live.iter().map(|l| l.2.clone()).collect::<Vec<_>>());
        let mut next = Vec::with_capacity(live.len());
        for (l, fp) in live.into_iter().zip(fps) {
            match self.lookup(fp) {
                Some(j) => finish(&mut out, l.0, j),
                None if l.1 > 0 => next.push(l),
                None => {}
            }
        }
        live = next;
        let mut k: u64 = 0;
        let mut cand = Vec::new();
        while !live.is_empty() {
            k += 1;
            cand.clear();
            for l in live.iter_mut() {
                l.2.sub_point_assign(&self.stride);
                l.3.add_point_assign(&self.stride);
                cand.push(l.2.clone());
                cand.push(l.3.clone());
            }
            let fps = E::fingerprints(&cand);
            let mut next = Vec::with_capacity(live.len());
            for (idx, l) in live.into_iter().enumerate() {
                let base = (k * stride) as i64;
                if let Some(j) = self.lookup(fps[2 * idx]) {
                    finish(&mut out, l.0, base + j);
                } else if let Some(j) = self.lookup(fps[2 * idx + 1]) {
                    finish(&mut out, l.0, -base + j);
                } else if k < l.1 {
                    next.push(l);
                }
            }
            live = next;
        }
        out
    }

    /// Writes the table to `path` (atomically: a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut entries: Vec<(u64, u64)> = self.map.iter().map(|(k, v)| (*k, *v)).collect();
        entries.sort_unstable();
        let mut buf = Vec::with_capacity(32 + entries.len() * 16);
        buf.extend_from_slice(FILE_MAGIC);
        let name = E::CURVE_NAME.as_bytes();
        buf.push(name.len() as u8);
        buf.extend_from_slice(name);
        buf.extend_from_slice(&self.half.to_le_bytes());
        buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (k, v) in &entries {
            buf.extend_from_slice(&k.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let sum = Sha256::digest(&buf);
        buf.extend_from_slice(&sum);
        crate::serial::write_atomic(path, &buf, false)
    }

    /// Loads a table written by [`DlogTable::save`], checking magic, curve, size and checksum,
    /// and spot-checking entries against the generator.
    pub fn load(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| FeError::io(path, e))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| FeError::io(path, e))?;
        Self::from_file_bytes(&buf)
    }

    fn from_file_bytes(buf: &[u8]) -> Result<Self> {
        let bad = |m: &str| FeError::Malformed(format!("discrete-log table file: {m}"));
        if buf.len() < FILE_MAGIC.len() + 32 || &buf[..8] != FILE_MAGIC {
            return Err(bad("not a table file (bad magic or too short)"));
        }
        let (body, sum) = buf.split_at(buf.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(FeError::Checksum("discrete-log table file"));
        }
        let mut r = crate::serial::Reader::new(&body[8..]);
        let nlen = r.u8()? as usize;
        let name = r.take(nlen)?;
        if name != E::CURVE_NAME.as_bytes() {
            return Err(bad(&format!(
                "made for curve {:?}, expected {}",
                String::from_utf8_lossy(name),
                E::CURVE_NAME
            )));
        }
        let half = r.u64()?;
        let count = r.u64()?;
        if half == 0 || half > MAX_HALF_WIDTH || count != 2 * half + 1 {
            return Err(bad("inconsistent size"));
        }
        if r.remaining() as u64 != count * 16 {
            return Err(bad("wrong length"));
        }
        let mut map = FpMap::with_capacity_and_hasher(count as usize, Default::default());
        for _ in 0..count {
            let k = r.u64()?;
            let v = r.u64()?;
            if (v & 0xFFFF_FFFF) >= count || map.insert(k, v).is_some() {
                return Err(bad("invalid entry"));
            }
        }
        let t = Self::from_map(half, map);
        // Spot-check: a table built for another generator fails here.
        let h = half as i64;
        let probes: Vec<i64> = [-h, -1, 0, 1, 2, h / 3, h].to_vec();
        let pts: Vec<RawPoint<E>> = probes
            .iter()
            .map(|&j| scalar_mul_i64::<E>(&generator::<E>(), j))
            .collect();
        for (j, fp) in probes.iter().zip(E::fingerprints(&pts)) {
            if t.lookup(fp) != Some(*j) {
                return Err(bad("entries do not match this curve's generator"));
            }
        }
        Ok(t)
    }
}

/// `v·P` for a signed machine integer on raw points.
pub(crate) fn scalar_mul_i64<E: FeCurve>(p: &RawPoint<E>, v: i64) -> RawPoint<E> {
    let s = crate::group::scalar_from_i64::<E>(v);
    p.scalar_mul(s.as_raw())
}

/// A table of `x·B` for small `|x|`, and a fixed-base table beyond: the `r·G` and `x_i·G`
/// of encryption (with `B = G/2` there, see [`FeCurve::encode_doubled`]).
pub(crate) struct GeneratorTable<E: FeCurve> {
    small: crate::msm::SmallMultiples<E>,
    fixed: FixedBase<E>,
}

impl<E: FeCurve> GeneratorTable<E> {
    pub(crate) fn for_base(base: &RawPoint<E>, small_max: usize, window: usize) -> Self {
        GeneratorTable {
            small: crate::msm::SmallMultiples::new(base, small_max.max(1)),
            fixed: FixedBase::new(base, window),
        }
    }

    /// `x·G`.
    pub(crate) fn mul_i64(&self, x: i64) -> RawPoint<E> {
        if (x.unsigned_abs() as usize) <= self.small.max() {
            self.small.get(x)
        } else {
            self.fixed.mul(&crate::group::scalar_from_i64::<E>(x))
        }
    }

    /// `s·G` for a full scalar.
    pub(crate) fn mul(&self, s: &Scalar<E>) -> RawPoint<E> {
        self.fixed.mul(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{Ristretto, Secp256k1};
    use proptest::prelude::*;

    fn pt<E: FeCurve>(v: i64) -> RawPoint<E> {
        scalar_mul_i64::<E>(&generator::<E>(), v)
    }

    fn table() -> &'static DlogTable<Ristretto> {
        use std::sync::OnceLock;
        static T: OnceLock<DlogTable<Ristretto>> = OnceLock::new();
        T.get_or_init(|| DlogTable::new(1000).expect("table"))
    }

    proptest! {
        #[test]
        fn solves_within_bound(v in -100_000i64..=100_000) {
            prop_assert_eq!(table().solve_batch(&[pt::<Ristretto>(v)], &[100_000]).remove(0), Ok(v));
        }
    }

    #[test]
    fn edges_and_out_of_bound() {
        let t = table();
        let vals = [
            0i64, 1, -1, 1000, -1000, 1001, -1001, 2001, -2001, 50_000, -50_000,
        ];
        let pts: Vec<_> = vals.iter().map(|&v| pt::<Ristretto>(v)).collect();
        let got = t.solve_batch(&pts, &[50_000]);
        for (v, g) in vals.iter().zip(got) {
            assert_eq!(g, Ok(*v));
        }
        // one unit over the bound is an error, on both sides
        for v in [50_001i64, -50_001] {
            assert_eq!(
                t.solve_batch(&[pt::<Ristretto>(v)], &[50_000]).remove(0),
                Err(FeError::DlogNotFound { bound: 50_000 })
            );
        }
        // a random point has no small discrete log
        let r = (Point::<Ristretto>::generator() * Scalar::random()).into_raw();
        assert!(t.solve_batch(&[r], &[10_000]).remove(0).is_err());
        // bounds over the limit are refused before any work
        let t2 = DlogTable::<Ristretto>::new(10).expect("t").with_limit(100);
        assert!(matches!(
            t2.solve_batch(&[pt::<Ristretto>(1)], &[101]).remove(0),
            Err(FeError::BoundTooLarge { .. })
        ));
        assert!(t2.check_bound(101).is_err() && t2.check_bound(100).is_ok());
        assert!(DlogTable::<Ristretto>::new(0).is_err());
    }

    #[test]
    fn secp256k1_works() {
        let t = DlogTable::<Secp256k1>::new(64).expect("table");
        for v in [0i64, 5, -64, 64, 65, -200, 1000] {
            assert_eq!(
                t.solve(&crate::group::wrap::<Secp256k1>(pt::<Secp256k1>(v)), 1000),
                Ok(v)
            );
        }
    }

    #[test]
    fn save_load_roundtrip_and_corruption() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.bin");
        let t = DlogTable::<Ristretto>::new(300).expect("t");
        t.save(&path).expect("save");
        let l = DlogTable::<Ristretto>::load(&path).expect("load");
        assert_eq!(
            l.solve(
                &crate::group::wrap::<Ristretto>(pt::<Ristretto>(-777)),
                1000
            ),
            Ok(-777)
        );
        let bytes = std::fs::read(&path).expect("read");
        // flipped byte: checksum
        let mut b = bytes.clone();
        b[40] ^= 1;
        assert_eq!(
            DlogTable::<Ristretto>::from_file_bytes(&b).err(),
            Some(FeError::Checksum("discrete-log table file"))
        );
        // truncated
        assert!(DlogTable::<Ristretto>::from_file_bytes(&bytes[..bytes.len() / 2]).is_err());
        assert!(DlogTable::<Ristretto>::from_file_bytes(&bytes[..10]).is_err());
        // another curve
        assert!(DlogTable::<Secp256k1>::from_file_bytes(&bytes).is_err());
        assert!(DlogTable::<Ristretto>::load(&dir.path().join("missing")).is_err());
    }
}
