//! Point-addition backends: the seam between the algorithms of [`crate::msm`] and the
//! arithmetic that runs them.
//!
//! The algorithms are written once against `Lanes`: load points, turn them into addends,
//! and apply a list of independent additions `acc[i] ±= entry[j]` (`Op`). A backend decides
//! how the list runs:
//!
//! * [`Backend::Curv`]: one `curv` addition after another, on every curve (the fallback).
//! * [`Backend::Avx2`]: Ristretto255 only, four additions at a time in AVX2 registers
//!   (`avx2.rs`, the workspace's only `unsafe` code).
//!
//! The AVX2 backend also decodes points from their encodings, four at a time
//! (`serial::Reader::points`, so every ciphertext a process reads).
//!
//! The backend is chosen once per process: the fastest one this CPU runs, unless the
//! environment variable `CRYPTONN_FE_BACKEND` names one (`curv` or `avx2`); a backend the CPU
//! cannot run is never chosen. [`Backend::available`] lists them for tests and benchmarks,
//! which pick one per call with the `_on` functions of [`crate::msm`].

use crate::group::{wrap, FeCurve, RawPoint};
use curv::elliptic::curves::{ECPoint, Point};
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The environment variable that forces a backend.
pub const BACKEND_VAR: &str = "CRYPTONN_FE_BACKEND";

/// A point-addition backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `curv`'s serial addition, one at a time (every curve, every CPU).
    Curv,
    /// Four Ristretto255 additions at once with AVX2 (x86-64 CPUs that have it).
    Avx2,
}

impl Backend {
    /// The name `CRYPTONN_FE_BACKEND` takes.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Curv => "curv",
            Backend::Avx2 => "avx2",
        }
    }

    /// Parses a backend name.
    pub fn parse(name: &str) -> Option<Backend> {
        match name.trim().to_ascii_lowercase().as_str() {
            "curv" | "serial" => Some(Backend::Curv),
            "avx2" => Some(Backend::Avx2),
            _ => None,
        }
    }

    /// The backends this CPU runs, fallback first.
    pub fn available() -> Vec<Backend> {
        let mut v = vec![Backend::Curv];
        if avx2_enabled() {
            v.push(Backend::Avx2);
        }
        v
    }

    /// The backend of this process: `CRYPTONN_FE_BACKEND` if it names one this CPU runs,
    /// else the fastest available.
    pub fn active() -> Backend {
        static ACTIVE: OnceLock<Backend> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let available = Backend::available();
            let forced = std::env::var(BACKEND_VAR)
                .ok()
                .and_then(|v| Backend::parse(&v));
            match forced {
                Some(b) if available.contains(&b) => b,
                _ => *available.last().unwrap_or(&Backend::Curv),
            }
        })
    }
}

/// Whether the AVX2 backend runs here: the CPU has AVX2 and dalek's points have the layout
/// the backend reads (checked once).
pub(crate) fn avx2_enabled() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx2::cpu_has_avx2() && avx2::layout_holds()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// One addition of a list: `accs[acc] += table[entry]`, or `−=` with `neg`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Op {
    pub(crate) acc: u32,
    pub(crate) entry: u32,
    pub(crate) neg: bool,
}

impl Op {
    pub(crate) fn new(acc: usize, entry: usize, neg: bool) -> Op {
        Op {
            acc: acc as u32,
            entry: entry as u32,
            neg,
        }
    }
}

/// Batched point arithmetic, the only thing the algorithms of [`crate::msm`] ask of a backend.
pub(crate) trait Lanes<E: FeCurve>: Sync {
    /// A point being summed into.
    type Acc: Clone + Send + Sync;
    /// A point in the form it is added in.
    type Entry: Clone + Send + Sync;
    /// Points into the backend's form.
    fn load(&self, points: &[RawPoint<E>]) -> Vec<Self::Acc>;
    /// Points back into curv's form.
    fn store(&self, points: &[Self::Acc]) -> Vec<RawPoint<E>>;
    /// The identity.
    fn identity(&self) -> Self::Acc;
    /// Every point as an addend.
    fn entries(&self, points: &[Self::Acc]) -> Vec<Self::Entry>;
    /// `accs[op.acc] ±= table[op.entry]` for every op, in order.
    fn add_many(&self, accs: &mut [Self::Acc], table: &[Self::Entry], ops: &[Op]);
}

/// `points` as curve `F`'s when `E` is `F` (each vector backend serves one curve), else back.
pub(crate) fn same_curve<E: FeCurve, F: FeCurve>(
    points: Vec<RawPoint<E>>,
) -> std::result::Result<Vec<RawPoint<F>>, Vec<RawPoint<E>>> {
    let any: Box<dyn std::any::Any> = Box::new(points);
    match any.downcast::<Vec<RawPoint<F>>>() {
        Ok(v) => Ok(*v),
        Err(any) => Err(*any
            .downcast::<Vec<RawPoint<E>>>()
            .expect("the box holds what was put in")),
    }
}

/// Decodes canonical point encodings (`E::POINT_LEN` bytes each, concatenated) on `backend`
/// (the fallback where this curve or CPU lacks it): the points, or the index of the first
/// encoding that is not a point (a trailing partial encoding included).
pub(crate) fn decode_points<E: FeCurve>(
    backend: Backend,
    bytes: &[u8],
) -> std::result::Result<Vec<Point<E>>, usize> {
    if !bytes.len().is_multiple_of(E::POINT_LEN) {
        return Err(bytes.len() / E::POINT_LEN);
    }
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Avx2
        && avx2_enabled()
        && std::any::TypeId::of::<E>() == std::any::TypeId::of::<crate::Ristretto>()
    {
        let encodings: Vec<[u8; 32]> = bytes
            .chunks_exact(32)
            .map(|c| std::array::from_fn(|i| c[i]))
            .collect();
        let mut raw = Vec::with_capacity(encodings.len());
        for (i, d) in avx2::decompress_many(&encodings).into_iter().enumerate() {
            raw.push(RawPoint::<crate::Ristretto>::from_underlying(d.ok_or(i)?));
        }
        if let Ok(raw) = same_curve::<crate::Ristretto, E>(raw) {
            return Ok(raw.into_iter().map(wrap).collect());
        }
    }
    let _ = backend;
    bytes
        .chunks(E::POINT_LEN)
        .enumerate()
        .map(|(i, b)| Point::from_bytes(b).map_err(|_| i))
        .collect()
}

/// The fallback: curv's addition, one at a time.
#[derive(Clone, Copy)]
pub(crate) struct CurvLanes;

impl<E: FeCurve> Lanes<E> for CurvLanes {
    type Acc = RawPoint<E>;
    type Entry = RawPoint<E>;

    fn load(&self, points: &[RawPoint<E>]) -> Vec<Self::Acc> {
        points.to_vec()
    }

    fn store(&self, points: &[Self::Acc]) -> Vec<RawPoint<E>> {
        points.to_vec()
    }

    fn identity(&self) -> Self::Acc {
        E::Point::zero()
    }

    fn entries(&self, points: &[Self::Acc]) -> Vec<Self::Entry> {
        points.to_vec()
    }

    fn add_many(&self, accs: &mut [Self::Acc], table: &[Self::Entry], ops: &[Op]) {
        for op in ops {
            let (acc, q) = (&mut accs[op.acc as usize], &table[op.entry as usize]);
            if op.neg {
                acc.sub_point_assign(q)
            } else {
                acc.add_point_assign(q)
            }
        }
    }
}

/// The AVX2 backend on Ristretto255 (only where [`avx2_enabled`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2Lanes;

#[cfg(target_arch = "x86_64")]
impl Lanes<crate::Ristretto> for Avx2Lanes {
    type Acc = avx2::Ext;
    type Entry = avx2::Niels;

    fn load(&self, points: &[RawPoint<crate::Ristretto>]) -> Vec<Self::Acc> {
        points
            .iter()
            .map(|p| avx2::from_dalek(p.underlying_ref()))
            .collect()
    }

    fn store(&self, points: &[Self::Acc]) -> Vec<RawPoint<crate::Ristretto>> {
        points
            .iter()
            .map(|p| ECPoint::from_underlying(avx2::to_dalek(p)))
            .collect()
    }

    fn identity(&self) -> Self::Acc {
        avx2::Ext::IDENTITY
    }

    fn entries(&self, points: &[Self::Acc]) -> Vec<Self::Entry> {
        avx2::niels_many(points)
    }

    fn add_many(&self, accs: &mut [Self::Acc], table: &[Self::Entry], ops: &[Op]) {
        avx2::add_many(accs, table, ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{generator, Ristretto};
    use curv::elliptic::curves::{Point, Scalar};
    use rand::{Rng, SeedableRng};

    type P = RawPoint<Ristretto>;

    fn random_point() -> P {
        (Point::<Ristretto>::generator() * Scalar::<Ristretto>::random()).into_raw()
    }

    /// Random points, the identity, a point and its negation, and repeated points.
    fn awkward_points(n: usize) -> Vec<P> {
        let mut v: Vec<P> = (0..n).map(|_| random_point()).collect();
        let g = generator::<Ristretto>();
        let mut neg = P::zero();
        neg.sub_point_assign(&v[0]);
        v.extend([P::zero(), g, g, neg, v[1]]);
        v
    }

    /// `ops` applied by curv one at a time: the reference.
    fn reference(accs: &[P], table: &[P], ops: &[Op]) -> Vec<P> {
        let mut accs = accs.to_vec();
        Lanes::<Ristretto>::add_many(&CurvLanes, &mut accs, table, ops);
        accs
    }

    fn check_lanes<L: Lanes<Ristretto>>(lanes: &L, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pts = awkward_points(12);
        let n = pts.len();
        // The round trip, and the identity.
        assert!(
            lanes.store(&lanes.load(&pts)) == pts,
            "load then store changes a point"
        );
        assert!(lanes.store(&[lanes.identity()])[0].is_zero());
        // Random lists of ops, accumulators repeated within a list (chains), doublings
        // (an entry equal to its accumulator), subtractions of a point from itself.
        for _ in 0..20 {
            let len = rng.gen_range(0..64);
            let ops: Vec<Op> = (0..len)
                .map(|_| Op::new(rng.gen_range(0..n), rng.gen_range(0..n), rng.gen_bool(0.5)))
                .collect();
            let want = reference(&pts, &pts, &ops);
            let mut accs = lanes.load(&pts);
            lanes.add_many(&mut accs, &lanes.entries(&lanes.load(&pts)), &ops);
            assert!(
                lanes.store(&accs) == want,
                "a batch of additions differs from curv"
            );
        }
        // A long chain on one accumulator with entries rebuilt from it: doublings and sums.
        let mut acc = lanes.load(&pts[..1]);
        let mut want = pts[0];
        for i in 0..300 {
            let q = if i % 3 == 0 {
                acc.clone()
            } else {
                lanes.load(&pts[i % n..i % n + 1])
            };
            let qc = lanes.store(&q)[0];
            let neg = i % 5 == 0;
            lanes.add_many(&mut acc, &lanes.entries(&q), &[Op::new(0, 0, neg)]);
            if neg {
                want.sub_point_assign(&qc)
            } else {
                want.add_point_assign(&qc)
            }
        }
        assert!(
            lanes.store(&acc)[0] == want,
            "a chain of 300 additions differs from curv"
        );
    }

    #[test]
    fn every_available_backend_adds_as_curv_does() {
        for b in Backend::available() {
            match b {
                Backend::Curv => check_lanes(&CurvLanes, 1),
                #[cfg(target_arch = "x86_64")]
                Backend::Avx2 => {
                    for seed in 0..4 {
                        check_lanes(&Avx2Lanes, seed)
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                Backend::Avx2 => unreachable!("AVX2 is only detected on x86-64"),
            }
        }
    }

    /// Encodings that decode, that do not, and that sit on the edges of the byte checks.
    fn awkward_encodings(rng: &mut rand::rngs::StdRng) -> Vec<[u8; 32]> {
        let enc = |p: &P| -> [u8; 32] { p.underlying_ref().compress().to_bytes() };
        let mut v: Vec<[u8; 32]> = awkward_points(20).iter().map(enc).collect();
        let mut flipped = v[0];
        flipped[0] ^= 1; // negative s
        let mut high = v[1];
        high[31] |= 0x80; // bit 255 set
        v.extend([flipped, high]);
        let p_minus = |k: u8| {
            let mut b = [0xffu8; 32];
            b[0] = 0xed - k;
            b[31] = 0x7f;
            b
        };
        // p − 2 (canonical), p − 1 (odd), p and p + 1 (not canonical), 2^255 − 2, all ones.
        v.extend([p_minus(2), p_minus(1), p_minus(0), {
            let mut b = p_minus(0);
            b[0] = 0xee;
            b
        }]);
        v.extend([[0xff; 32], {
            let mut b = [0xff; 32];
            b[31] = 0x7f;
            b[0] = 0xfe;
            b
        }]);
        // Random strings, and random even ones below 2^255 (about half of those are points).
        for i in 0..60 {
            let mut b: [u8; 32] = rng.gen();
            if i % 2 == 0 {
                b[0] &= 0xfe;
                b[31] &= 0x7f;
            }
            v.push(b);
        }
        v
    }

    /// dalek's decoding of one encoding: the reference.
    fn dalek_decode(e: &[u8; 32]) -> Option<curve25519_dalek::ristretto::RistrettoPoint> {
        curve25519_dalek::ristretto::CompressedRistretto(*e).decompress()
    }

    #[test]
    fn every_available_backend_decodes_as_dalek_does() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let encodings = awkward_encodings(&mut rng);
        let valid: Vec<[u8; 32]> = encodings
            .iter()
            .filter(|e| dalek_decode(e).is_some())
            .copied()
            .collect();
        assert!(valid.len() > 30 && valid.len() < encodings.len() - 30);
        for b in Backend::available() {
            // One at a time: the same verdict, the same point, the same encoding back.
            for e in &encodings {
                match (decode_points::<Ristretto>(b, e), dalek_decode(e)) {
                    (Ok(p), Some(d)) => {
                        assert!(p.len() == 1 && *p[0].as_raw().underlying_ref() == d);
                        assert_eq!(p[0].to_bytes(true).to_vec(), e.to_vec());
                    }
                    (Err(i), None) => assert_eq!(i, 0),
                    (got, want) => panic!(
                        "{b:?} decodes {e:?} as {:?}, dalek as {:?}",
                        got.is_ok(),
                        want.is_some()
                    ),
                }
            }
            // Together (groups of four, a partial last one): the points in order, and the
            // index of the first refused encoding.
            for len in [valid.len(), valid.len() - 1, 5, 3] {
                let bytes = valid[..len].concat();
                let got = decode_points::<Ristretto>(b, &bytes).expect("valid encodings");
                let want: Vec<_> = valid[..len].iter().map(dalek_decode).collect();
                assert!(got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| Some(*g.as_raw().underlying_ref()) == *w));
                assert_eq!(got.len(), len);
            }
            let first_bad = encodings
                .iter()
                .position(|e| dalek_decode(e).is_none())
                .expect("some are refused");
            assert_eq!(
                decode_points::<Ristretto>(b, &encodings.concat()).err(),
                Some(first_bad)
            );
            // A trailing partial encoding is refused, and other curves take the fallback.
            assert_eq!(
                decode_points::<Ristretto>(b, &valid[0][..31]).err(),
                Some(0)
            );
            let bytes = [valid[0].as_slice(), &valid[1][..5]].concat();
            assert_eq!(decode_points::<Ristretto>(b, &bytes).err(), Some(1));
            let k = Point::<crate::Secp256k1>::generator() * Scalar::<crate::Secp256k1>::random();
            let kb = k.to_bytes(true).to_vec();
            assert!(decode_points::<crate::Secp256k1>(b, &kb).expect("secp256k1") == vec![k]);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any bytes: every backend agrees with dalek on which decode and to what.
        #[test]
        fn any_bytes_decode_as_dalek_decodes(
            raw in proptest::collection::vec(proptest::prelude::any::<[u8; 32]>(), 1..9),
            even in proptest::prelude::any::<bool>(),
        ) {
            let encodings: Vec<[u8; 32]> = raw
                .into_iter()
                .map(|mut e| {
                    if even {
                        e[0] &= 0xfe;
                        e[31] &= 0x7f;
                    }
                    e
                })
                .collect();
            for b in Backend::available() {
                for e in &encodings {
                    let got = decode_points::<Ristretto>(b, e).ok();
                    let want = dalek_decode(e);
                    proptest::prop_assert_eq!(
                        got.map(|p| *p[0].as_raw().underlying_ref()),
                        want
                    );
                }
            }
        }
    }

    #[test]
    fn the_forced_backend_names_parse() {
        assert_eq!(Backend::parse("AVX2"), Some(Backend::Avx2));
        assert_eq!(Backend::parse(" curv "), Some(Backend::Curv));
        assert_eq!(Backend::parse("avx512"), None);
        assert!(Backend::available().contains(&Backend::active()));
        eprintln!(
            "backends here: {:?}, active {:?}",
            Backend::available(),
            Backend::active()
        );
    }
}
