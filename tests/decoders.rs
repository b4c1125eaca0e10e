//! Bounded property-test fuzzing of the decoders of the files and messages that come from
//! outside a role (frames and the audit log are fuzzed in `tests/fuzz.rs`):
//!
//! * `fe` envelopes (`fe::Encode::from_bytes`): FEIP parameters, public key, master secret
//!   key, function key and ciphertext, the four FEBO types, and two Secp256k1 types;
//! * public parameters: `protocol::decode` of [`PublicParams`], [`Published`] and a
//!   [`Response`] carrying them, and `authority::read_params` on a file;
//! * a key directory with one tampered file (`authority::load`), and the token file
//!   (`authority::read_token`);
//! * the encrypted-dataset file (`dataset::Reader`: header, index and every record);
//! * the discrete-log table file (`DlogTable::load`);
//! * model files and checkpoints (`Model`, `Checkpoint`: `from_bytes` and `load`);
//! * the prediction service's frames: a client's request (a query is decoded as the service
//!   does, down to its ciphertext) and the service's answers, as a client decodes them.
//!
//! Every target starts from valid encodings made by the real encoders (small sizes, so that
//! a debug build is fast) and decodes them mutated (bytes set, flipped, inserted, deleted,
//! spliced in or appended, the input cut at any point, 4 or 8 bytes overwritten with a large
//! length), valid prefixes followed by random bytes, and random bytes. Where a checksum
//! protects the structure (dataset header, records and index; the discrete-log table) the
//! fuzzer also recomputes it after mutating, so that the parser behind it is reached. A case
//! fails when a decoder panics, takes longer than [`SLOW`], allocates past its bound, or
//! accepts an input without the result validating (and, for the canonical encodings,
//! re-encoding to the same bytes).
//!
//! Allocation is measured with the counting global allocator of `stats_alloc` (the workspace
//! forbids `unsafe`, so the test cannot install an allocator of its own): the bytes allocated
//! in all during one decode, on every thread, an upper bound on the peak. Hence this file has
//! a single test (other tests' threads would be counted too). The bounds, for an input of
//! `len` bytes (a file: its size):
//!
//! * `fe` envelopes: `16·len + 64 KiB` (a 32-byte point is about 190 bytes in memory, and a
//!   vector may double while it is collected); the FEBO master secret key also builds a
//!   fixed table of multiples of the generator when decoded, which does not depend on the
//!   input: its size is measured on the valid key and added (it must stay under 16 MiB);
//! * bincode messages and files (public parameters, models, checkpoints):
//!   `16·len + 4 MiB` (serde preallocates at most 1 MiB for each sequence it starts);
//! * a key directory: `16·(sum of the file sizes) + 4 MiB` and the FEBO table; the token
//!   file `16·len + 64 KiB`;
//! * the dataset: opening `32·size + 4 MiB`, reading one record `32·size + 4 MiB`;
//! * the discrete-log table: `8·size + 1 MiB` (a hash map of the entries and the file).
//!
//! Runs about 11,400 cases in about 10 s in a debug build (the number of cases of each
//! property is fixed in the code, so CI's run is bounded); set `PROPTEST_CASES` to run that
//! many cases for each property instead, as in `tests/fuzz.rs`, for example
//! `PROPTEST_CASES=20000 cargo test -p cryptonn --test decoders -- --nocapture` (about five
//! minutes in debug). A debug build also checks arithmetic overflow, which a release build
//! lets wrap. With `--nocapture` the test prints, for each decoder, the decodes run, the
//! inputs accepted and the largest share of its allocation bound one decode used.
#![allow(clippy::unwrap_used)]

use cryptonn::authority::{self, Authority, InitOptions, Policy};
use cryptonn::dataset::Reader;
use cryptonn::protocol::{self, PublicParams, Published, Response};
use curv::elliptic::curves::{Point, Scalar};
use fe::dlog::DlogTable;
use fe::febo::{self, FeboEncryptor, Op};
use fe::feip::{self, FeipEncryptor, FeipParams};
use fe::{Encode, FeCurve, Ristretto, Secp256k1};
use nn::data::DatasetInfo;
use nn::layer::DenseGrad;
use nn::model::Gradients;
use nn::train::{Checkpoint, EpochState};
use nn::{Activation, Dataset, EpochMetrics, Model, ModelSpec, Optimizer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sha2::{Digest, Sha256};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Longest one decode may take: far above the milliseconds they need in a debug build on a
/// loaded machine, far below a hang.
const SLOW: Duration = Duration::from_secs(10);

/// For each decoder: decodes run, inputs accepted, and the largest share of its bound one
/// decode allocated (in thousandths); printed and reset after each target.
static TALLY: Mutex<BTreeMap<&'static str, [u64; 3]>> = Mutex::new(BTreeMap::new());

fn tally(what: &'static str, i: usize, v: u64) {
    let mut t = TALLY.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(what).or_default();
    e[i] = if i == 2 { e[i].max(v) } else { e[i] + v };
}

/// Counts an input that the decoder `what` accepted.
fn accepted(what: &'static str) {
    tally(what, 1, 1);
}

/// Runs one decode of `len` bytes of input: its result, or a failed case if it allocated
/// more than `bound` bytes in all or took longer than [`SLOW`].
fn decode_within<T>(
    what: &'static str,
    len: usize,
    bound: usize,
    f: impl FnOnce() -> T,
) -> Result<T, TestCaseError> {
    let started = Instant::now();
    let region = Region::new(GLOBAL);
    let out = f();
    let n = region.change().bytes_allocated;
    let took = started.elapsed();
    tally(what, 0, 1);
    tally(what, 2, (n as u64 * 1000) / bound.max(1) as u64);
    prop_assert!(
        n <= bound,
        "{what}: decoding {len} bytes allocated {n} bytes (bound {bound})"
    );
    prop_assert!(took <= SLOW, "{what}: decoding {len} bytes took {took:?}");
    Ok(out)
}

fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// A mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    /// Overwrite from a position with other bytes (extending the input if needed).
    Splice(usize, Vec<u8>),
    Extend(Vec<u8>),
    /// Overwrite 4 bytes with a little-endian number (the length of an `fe` vector, of a
    /// record, of the dataset header).
    Len32(usize, u32),
    /// Overwrite 8 bytes with a little-endian number (bincode's lengths and sizes).
    Len64(usize, u64),
}

/// Lengths a fuzzer should try: small, at the edges of the integer types, and anything.
fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..300,
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 31),
        Just(1 << 24),
        Just(1 << 40),
        Just(u64::MAX / 16),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = prop::collection::vec(any::<u8>(), 1..40);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), bytes.clone()).prop_map(|(i, b)| Mutation::Splice(i, b)),
        bytes.prop_map(Mutation::Extend),
        (any::<usize>(), length()).prop_map(|(i, n)| Mutation::Len32(i, n as u32)),
        (any::<usize>(), length()).prop_map(|(i, n)| Mutation::Len64(i, n)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..4)
}

/// Where to overwrite an `N`-byte number: every other time any position, otherwise one that
/// holds a little-endian number from 1 to 65,536 now (most likely a length, a count or a
/// size), so that the fields worth corrupting are hit in a few cases rather than thousands.
fn field_at<const N: usize>(bytes: &[u8], i: usize) -> usize {
    let any = i % (bytes.len() + 1 - N);
    if i.is_multiple_of(2) {
        return any;
    }
    let fields: Vec<usize> = bytes
        .windows(N)
        .enumerate()
        .filter(|(_, w)| {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(w);
            (1..=1 << 16).contains(&u64::from_le_bytes(b))
        })
        .map(|(at, _)| at)
        .collect();
    if fields.is_empty() {
        any
    } else {
        fields[(i / 2) % fields.len()]
    }
}

fn mutate(bytes: &mut Vec<u8>, ms: &[Mutation]) {
    for m in ms {
        let n = bytes.len();
        match m {
            Mutation::Set(i, b) if n > 0 => bytes[i % n] = *b,
            Mutation::Flip(i, b) if n > 0 => bytes[i % n] ^= 1 << b,
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), *b),
            Mutation::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            Mutation::Splice(i, b) => {
                let at = i % (n + 1);
                let end = (at + b.len()).min(n);
                bytes.splice(at..end, b.iter().copied());
            }
            Mutation::Extend(b) => bytes.extend_from_slice(b),
            Mutation::Len32(i, v) if n >= 4 => {
                let at = field_at::<4>(bytes, *i);
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Len64(i, v) if n >= 8 => {
                let at = field_at::<8>(bytes, *i);
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// Inputs derived from a corpus of valid encodings: one of them mutated, a prefix of one
/// followed by random bytes, or random bytes.
#[derive(Debug, Clone)]
enum Input {
    Mutated(usize, Vec<Mutation>),
    Prefix(usize, usize, Vec<u8>),
    Random(Vec<u8>),
}

fn input(corpus: usize, max_len: usize) -> impl Strategy<Value = Input> {
    let rand = prop::collection::vec(any::<u8>(), 0..max_len);
    prop_oneof![
        6 => (0..corpus, mutations()).prop_map(|(k, ms)| Input::Mutated(k, ms)),
        2 => (0..corpus, any::<usize>(), rand.clone())
            .prop_map(|(k, at, tail)| Input::Prefix(k, at, tail)),
        1 => rand.prop_map(Input::Random),
    ]
}

impl Input {
    fn bytes(&self, corpus: &[Vec<u8>]) -> Vec<u8> {
        match self {
            Input::Mutated(k, ms) => {
                let mut b = corpus[*k].clone();
                mutate(&mut b, ms);
                b
            }
            Input::Prefix(k, at, tail) => {
                let v = &corpus[*k];
                let mut b = v[..at % (v.len() + 1)].to_vec();
                b.extend_from_slice(tail);
                b
            }
            Input::Random(b) => b.clone(),
        }
    }
}

/// Runs `check` on `cases` inputs derived from `corpus` (see [`Input`]).
fn fuzz(cases: u32, corpus: &[Vec<u8>], check: impl Fn(&[u8]) -> Result<(), TestCaseError>) {
    let max_len = 2 * corpus.iter().map(Vec::len).max().unwrap_or(0) + 64;
    runner(cases)
        .run(&input(corpus.len(), max_len), |inp| {
            check(&inp.bytes(corpus))
        })
        .unwrap();
}

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("decoders-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small dataset description: 3 features of 0..=255, two named classes.
fn info() -> DatasetInfo {
    DatasetInfo::new(3, 255, 2)
        .unwrap()
        .with_class_names(vec!["no".into(), "yes".into()])
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// fe envelopes

/// Fuzzes `T::from_bytes` over the whole corpus (every kind of envelope, so that one kind is
/// also offered as another). An accepted input must re-encode to the same bytes.
fn envelope<E: FeCurve, T: Encode<E>>(cases: u32, corpus: &[Vec<u8>], fixed: usize) {
    let what: &'static str = Box::leak(format!("{} ({})", T::NAME, E::CURVE_NAME).into());
    fuzz(cases, corpus, |b| {
        let bound = 16 * b.len() + 64 * KIB + fixed;
        if let Ok(v) = decode_within(what, b.len(), bound, || T::from_bytes(b))? {
            accepted(what);
            prop_assert_eq!(
                v.to_bytes(),
                b,
                "{} accepted a non-canonical input",
                T::NAME
            );
        }
        Ok(())
    });
}

fn fe_envelopes() {
    let params = FeipParams::new(3, 255).unwrap();
    let (pk, msk) = feip::setup::<Ristretto>(params);
    let fk = msk.derive_key(&[1, -2, 3]).unwrap();
    let ct = FeipEncryptor::new(&pk).encrypt(&[1, 2, 3]).unwrap();
    let (bpk, bmsk) = febo::setup::<Ristretto>();
    let bct = FeboEncryptor::new(&bpk).encrypt(5);
    let bfk = bmsk.derive_key(bct.commitment(), Op::Sub, 7).unwrap();
    let (kpk, _) = feip::setup::<Secp256k1>(params);
    let kct = FeipEncryptor::new(&kpk).encrypt(&[0, 255, 7]).unwrap();
    let corpus = vec![
        Encode::<Ristretto>::to_bytes(&params),
        pk.to_bytes(),
        msk.to_bytes(),
        fk.to_bytes(),
        ct.to_bytes(),
        bpk.to_bytes(),
        bmsk.to_bytes(),
        bct.to_bytes(),
        bfk.to_bytes(),
        kpk.to_bytes(),
        kct.to_bytes(),
    ];
    // The valid encodings decode to themselves.
    assert_eq!(
        <FeipParams as Encode<Ristretto>>::from_bytes(&corpus[0]).unwrap(),
        params
    );
    assert_eq!(feip::FeipPublicKey::from_bytes(&corpus[1]).unwrap(), pk);
    assert_eq!(feip::FeipFunctionKey::from_bytes(&corpus[3]).unwrap(), fk);
    assert_eq!(feip::FeipCiphertext::from_bytes(&corpus[4]).unwrap(), ct);
    assert_eq!(febo::FeboCiphertext::from_bytes(&corpus[7]).unwrap(), bct);
    assert_eq!(febo::FeboFunctionKey::from_bytes(&corpus[8]).unwrap(), bfk);
    // The FEBO master key's fixed table of multiples of G, built whatever the input.
    let (k, table) = {
        let region = Region::new(GLOBAL);
        let k = febo::FeboMasterSecretKey::<Ristretto>::from_bytes(&corpus[6]);
        (k, region.change().bytes_allocated)
    };
    assert_eq!(k.unwrap().public_key(), bpk);
    assert!(
        table < 16 * MIB,
        "the FEBO master key table takes {table} bytes"
    );

    envelope::<Ristretto, FeipParams>(300, &corpus, 0);
    envelope::<Ristretto, feip::FeipPublicKey<Ristretto>>(600, &corpus, 0);
    envelope::<Ristretto, feip::FeipMasterSecretKey<Ristretto>>(600, &corpus, 0);
    envelope::<Ristretto, feip::FeipFunctionKey<Ristretto>>(600, &corpus, 0);
    envelope::<Ristretto, feip::FeipCiphertext<Ristretto>>(600, &corpus, 0);
    envelope::<Ristretto, febo::FeboPublicKey<Ristretto>>(300, &corpus, 0);
    envelope::<Ristretto, febo::FeboMasterSecretKey<Ristretto>>(300, &corpus, table);
    envelope::<Ristretto, febo::FeboCiphertext<Ristretto>>(300, &corpus, 0);
    envelope::<Ristretto, febo::FeboFunctionKey<Ristretto>>(300, &corpus, 0);
    envelope::<Secp256k1, feip::FeipPublicKey<Secp256k1>>(300, &corpus, 0);
    envelope::<Secp256k1, feip::FeipCiphertext<Secp256k1>>(300, &corpus, 0);
}

// ---------------------------------------------------------------------------------------
// public parameters and key files

/// The body of the frame `write_frame` makes of `msg`.
fn frame_body<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::write_frame(&mut out, msg).unwrap();
    out.split_off(4)
}

fn bincode_bound(len: usize) -> usize {
    16 * len + 4 * MIB
}

fn public_params() {
    let auth = Authority::generate(info(), 2).unwrap();
    let params = auth.params().clone();
    let published = Published {
        params: params.clone(),
        policy: Policy::default().with_lengths(4, 2),
    };
    let dir = tmpdir("params");
    authority::init(&dir, info(), 2, &InitOptions::default()).unwrap();
    let file = std::fs::read(dir.join(authority::PARAMS_FILE)).unwrap();
    let corpus = vec![
        frame_body(&params),
        frame_body(&published),
        frame_body(&Response::Params(Box::new(published.clone()))),
        file,
    ];
    assert_eq!(
        protocol::decode::<PublicParams>(&corpus[0]).unwrap(),
        params
    );
    // The lengths in a policy are not sent: a trainer sets them from the parameters.
    let got = protocol::decode::<Published>(&corpus[1]).unwrap();
    assert_eq!(got.params, params);
    assert_eq!(got.policy.with_lengths(4, 2), published.policy);

    // Accepted parameters validate without panicking and re-encode to the bytes they were
    // read from (bincode's default options, those of the frames and of the parameters file,
    // ignore trailing bytes).
    fn params_ok(what: &'static str, p: &PublicParams, b: &[u8]) -> Result<(), TestCaseError> {
        accepted(what);
        let _ = p.validate();
        let _ = p.fingerprint();
        prop_assert!(b.starts_with(&frame_body(p)));
        Ok(())
    }
    fuzz(1000, &corpus, |b| {
        let bound = bincode_bound(b.len());
        let got = decode_within("PublicParams", b.len(), bound, || {
            let p = protocol::decode::<PublicParams>(b);
            // What a client does with them first.
            if let Ok(p) = &p {
                let _ = p.validate();
            }
            p
        })?;
        if let Ok(p) = got {
            params_ok("PublicParams", &p, b)?;
        }
        Ok(())
    });
    fuzz(600, &corpus, |b| {
        let got = decode_within("Published", b.len(), bincode_bound(b.len()), || {
            protocol::decode::<Published>(b)
        })?;
        if let Ok(p) = got {
            accepted("Published");
            let _ = p.params.validate();
            prop_assert!(b.starts_with(&frame_body(&p)));
        }
        Ok(())
    });
    fuzz(400, &corpus, |b| {
        let got = decode_within("Response", b.len(), bincode_bound(b.len()), || {
            protocol::decode::<Response>(b)
        })?;
        if let Ok(Response::Params(p)) = got {
            accepted("Response");
            let _ = p.params.validate();
        }
        Ok(())
    });
    let path = dir.join("fuzzed-params.bin");
    fuzz(400, &corpus, |b| {
        std::fs::write(&path, b).unwrap();
        let got = decode_within("read_params", b.len(), bincode_bound(b.len()), || {
            authority::read_params(&path).map(|p| (p.validate(), p))
        })?;
        if let Ok((_, p)) = got {
            params_ok("read_params", &p, b)?;
        }
        Ok(())
    });
}

fn key_dir() {
    let dir = tmpdir("keys");
    authority::init(&dir, info(), 2, &InitOptions::default()).unwrap();
    let names = [
        authority::ROW_MSK_FILE,
        authority::COL_MSK_FILE,
        authority::FEBO_MSK_FILE,
        authority::PARAMS_FILE,
    ];
    let files: Vec<(PathBuf, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let p = dir.join(n);
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let total: usize = files.iter().map(|f| f.1.len()).sum();
    let (a, table) = {
        let region = Region::new(GLOBAL);
        let a = authority::load(&dir);
        (a, region.change().bytes_allocated)
    };
    let a = a.unwrap();
    let bound_of = |extra: usize| 16 * (total + extra) + 4 * MIB + table;
    assert!(table <= bound_of(0) && table < 32 * MIB);
    let valid = a.params().clone();
    let corpus: Vec<Vec<u8>> = files.iter().map(|f| f.1.clone()).collect();
    let max_len = 2 * corpus.iter().map(Vec::len).max().unwrap_or(0) + 64;
    runner(600)
        .run(
            &(0..files.len(), input(corpus.len(), max_len)),
            |(which, inp)| {
                let (path, original) = &files[which];
                let bytes = inp.bytes(&corpus);
                // Writing an existing file keeps its mode (0600 for the secret keys).
                std::fs::write(path, &bytes).unwrap();
                let got = decode_within("authority::load", total, bound_of(bytes.len()), || {
                    authority::load(&dir)
                });
                std::fs::write(path, original).unwrap();
                match got? {
                    Ok(a) => {
                        accepted("authority::load");
                        // Only the public parameters can change and still load (a field the
                        // keys do not depend on, such as the number of classes).
                        prop_assert!(
                            bytes == *original || which == 3,
                            "a tampered {} was accepted",
                            path.display()
                        );
                        prop_assert!(a.params().validate().is_ok());
                        prop_assert_eq!(&a.params().row, &valid.row);
                    }
                    Err(_) => prop_assert!(bytes != *original),
                }
                Ok(())
            },
        )
        .unwrap();
    assert!(authority::load(&dir).is_ok());

    // The token file (read by `authority serve` and by callers given `--token-file`).
    let token_path = dir.join(authority::TOKEN_FILE);
    let token = std::fs::read(&token_path).unwrap();
    fuzz(300, std::slice::from_ref(&token), |b| {
        std::fs::write(&token_path, b).unwrap();
        let bound = 16 * b.len() + 64 * KIB;
        let got = decode_within("authority::read_token", b.len(), bound, || {
            authority::read_token(&dir)
        })?;
        if let Ok(t) = got {
            accepted("authority::read_token");
            prop_assert!(authority::validate_token(&t).is_ok());
            prop_assert!(b.starts_with(t.as_bytes()));
        }
        Ok(())
    });
    std::fs::write(&token_path, &token).unwrap();
    assert!(authority::read_token(&dir).is_ok());
}

// ---------------------------------------------------------------------------------------
// the encrypted dataset

/// The parts of an encrypted-dataset file (see `cryptonn::dataset`'s layout).
#[derive(Debug, Clone)]
struct DatasetParts {
    header: Vec<u8>,
    records: Vec<Vec<u8>>,
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

impl DatasetParts {
    fn parse(file: &[u8]) -> Self {
        let hlen = u32::from_le_bytes(file[8..12].try_into().unwrap()) as usize;
        let header = file[12..12 + hlen].to_vec();
        let n = file.len();
        let ilen = le_u64(&file[n - 16..]) as usize;
        let idx = &file[n - 16 - 32 - ilen..n - 48];
        let records = idx
            .chunks_exact(16)
            .map(|c| {
                let (o, l) = (le_u64(c) as usize, le_u64(&c[8..]) as usize);
                file[o + 4..o + l - 32].to_vec()
            })
            .collect();
        DatasetParts { header, records }
    }

    /// The index of the records as they are.
    fn index(&self) -> Vec<u8> {
        let mut pos = (12 + self.header.len() + 32) as u64;
        let mut idx = Vec::new();
        for r in &self.records {
            let l = (4 + r.len() + 32) as u64;
            idx.extend_from_slice(&pos.to_le_bytes());
            idx.extend_from_slice(&l.to_le_bytes());
            pos += l;
        }
        idx
    }

    /// The file, with every length and checksum computed (the index given, or the right one).
    fn assemble(&self, index: Option<&[u8]>) -> Vec<u8> {
        let mut f = b"CNNENC01".to_vec();
        f.extend_from_slice(&(self.header.len() as u32).to_le_bytes());
        f.extend_from_slice(&self.header);
        f.extend_from_slice(&Sha256::digest(&self.header));
        for r in &self.records {
            f.extend_from_slice(&(r.len() as u32).to_le_bytes());
            f.extend_from_slice(r);
            f.extend_from_slice(&Sha256::digest(r));
        }
        let idx = index.map_or_else(|| self.index(), <[u8]>::to_vec);
        f.extend_from_slice(&idx);
        f.extend_from_slice(&Sha256::digest(&idx));
        f.extend_from_slice(&(idx.len() as u64).to_le_bytes());
        f.extend_from_slice(b"CNNIDX01");
        f
    }
}

/// Where a dataset case mutates: inside the checksummed header, a record or the index (the
/// checksums recomputed), or the file's raw bytes.
#[derive(Debug, Clone)]
enum Part {
    Header,
    Record(usize),
    Index,
    Raw,
}

fn dataset() {
    let dir = tmpdir("dataset");
    let auth = Authority::generate(info(), 2).unwrap();
    let params = auth.params().clone();
    let values = ndarray::Array2::from_shape_fn((4, 3), |(i, j)| (i * 70 + j * 11) as u16);
    let data = Dataset::new(values, vec![0, 1, 1, 0], info()).unwrap();
    let valid_path = dir.join("valid.enc");
    cryptonn::client::encrypt_dataset(
        &data,
        &params,
        &cryptonn::client::ColumnKeys::Shared,
        &valid_path,
        "fuzz",
        false,
    )
    .unwrap();
    let valid = std::fs::read(&valid_path).unwrap();
    let parts = DatasetParts::parse(&valid);
    assert_eq!(
        parts.assemble(None),
        valid,
        "the layout in this test is stale"
    );
    let mut r = Reader::open_for(&valid_path, &params).unwrap();
    assert_eq!(r.num_batches(), 2);
    assert!(r.batch(0).is_ok() && r.batch(1).is_ok());

    let path = dir.join("fuzzed.enc");
    let nrec = parts.records.len();
    let part = prop_oneof![
        2 => Just(Part::Header),
        3 => (0..nrec).prop_map(Part::Record),
        1 => Just(Part::Index),
        2 => Just(Part::Raw),
    ];
    let bound = |size: usize| 32 * size + 4 * MIB;
    runner(1000)
        .run(&(part, mutations()), |(part, ms)| {
            let mut p = parts.clone();
            let bytes = match part {
                Part::Header => {
                    mutate(&mut p.header, &ms);
                    p.assemble(None)
                }
                Part::Record(k) => {
                    mutate(&mut p.records[k], &ms);
                    p.assemble(None)
                }
                Part::Index => {
                    let mut idx = p.index();
                    mutate(&mut idx, &ms);
                    p.assemble(Some(&idx))
                }
                Part::Raw => {
                    let mut b = valid.clone();
                    mutate(&mut b, &ms);
                    b
                }
            };
            std::fs::write(&path, &bytes).unwrap();
            let size = bytes.len();
            let reader = decode_within("dataset::Reader::open", size, bound(size), || {
                Reader::open(&path)
            })?;
            if let Ok(mut r) = reader {
                accepted("dataset::Reader::open");
                let h = r.header().clone();
                prop_assert!(h.dataset.validate().is_ok());
                prop_assert_eq!(r.num_batches(), h.num_batches as usize);
                for i in 0..=r.num_batches() {
                    let b =
                        decode_within("dataset::Reader::batch", size, bound(size), || r.batch(i))?;
                    if let Ok(b) = b {
                        accepted("dataset::Reader::batch");
                        prop_assert_eq!(b.index as usize, i);
                        prop_assert_eq!(b.rows.len(), h.batch_size as usize);
                    }
                }
            }
            let _ = decode_within("dataset::Reader::open_for", size, bound(size), || {
                Reader::open_for(&path, &params)
            })?;
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// the discrete-log table

fn dlog_table() {
    let dir = tmpdir("dlog");
    let valid_path = dir.join("valid.dlog");
    DlogTable::<Ristretto>::new(40)
        .unwrap()
        .save(&valid_path)
        .unwrap();
    let valid = std::fs::read(&valid_path).unwrap();
    let t = DlogTable::<Ristretto>::load(&valid_path).unwrap();
    assert_eq!(t.half_width(), 40);
    let path = dir.join("fuzzed.dlog");
    let bound = |size: usize| 8 * size + MIB;
    let corpus = vec![valid];
    let check = |bytes: &[u8]| -> Result<(), TestCaseError> {
        std::fs::write(&path, bytes).unwrap();
        let got = decode_within("DlogTable::load", bytes.len(), bound(bytes.len()), || {
            DlogTable::<Ristretto>::load(&path)
        })?;
        if let Ok(t) = got {
            accepted("DlogTable::load");
            prop_assert!(t.half_width() >= 1 && t.half_width() <= fe::dlog::MAX_HALF_WIDTH);
            // What `load` checks: the entries of -h, -1, 0, 1, 2, h/3 and h. It does not check
            // the others, so a table whose entries were changed and its checksum recomputed
            // loads and may solve some points wrongly (the checksum guards against
            // corruption, not against someone who can write the file).
            let h = t.half_width() as i64;
            for j in [-h, -1, 0, 1, 2, h / 3, h] {
                let p =
                    Point::<Ristretto>::generator() * Scalar::<Ristretto>::from(j.unsigned_abs());
                let p = if j < 0 { -p } else { p };
                let got = t.solve(&p, h.unsigned_abs());
                prop_assert_eq!(got, Ok(j), "solve({}) on a loaded table", j);
            }
        }
        Ok(())
    };
    fuzz(500, &corpus, check);
    // Mutated with the checksum recomputed, so that the entries are parsed.
    runner(500)
        .run(&mutations(), |ms| {
            let mut body = corpus[0][..corpus[0].len() - 32].to_vec();
            mutate(&mut body, &ms);
            let sum = Sha256::digest(&body);
            body.extend_from_slice(&sum);
            check(&body)
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// models and checkpoints

fn model_and_checkpoint() {
    let spec = ModelSpec::parse("3-4-2", Activation::Relu).unwrap();
    let model = Model::new(spec, 7).unwrap().with_data(info()).unwrap();
    let mut optimizer = Optimizer::adam(0.01);
    let mut trained = model.clone();
    let grads = Gradients {
        layers: vec![DenseGrad::zeros(4, 3), DenseGrad::zeros(2, 4)],
    };
    optimizer.step(&mut trained, &grads).unwrap();
    let checkpoint = Checkpoint {
        model: trained,
        optimizer,
        state: EpochState::new(1, 3, 5, true),
        history: vec![EpochMetrics {
            epoch: 0,
            train_loss: 0.5,
            train_accuracy: 0.75,
            test_accuracy: Some(0.7),
            test_loss: None,
            seconds: 1.5,
        }],
        rounding_stream: 9,
        config: vec![
            ("--spec".into(), "4".into()),
            ("--lr".into(), "0.01".into()),
        ],
    };
    let corpus = vec![model.to_bytes().unwrap(), checkpoint.to_bytes().unwrap()];
    assert_eq!(Model::from_bytes(&corpus[0]).unwrap(), model);
    assert_eq!(Checkpoint::from_bytes(&corpus[1]).unwrap(), checkpoint);
    let dir = tmpdir("model");
    let path = dir.join("fuzzed.bin");
    fuzz(800, &corpus, |b| {
        std::fs::write(&path, b).unwrap();
        let bound = bincode_bound(b.len());
        let got = decode_within("Model::from_bytes", b.len(), bound, || Model::from_bytes(b))?;
        let loaded = decode_within("Model::load", b.len(), bound, || Model::load(&path))?;
        prop_assert_eq!(got.is_ok(), loaded.is_ok());
        if let Ok(m) = got {
            accepted("Model::from_bytes");
            accepted("Model::load");
            prop_assert!(m.validate().is_ok());
            prop_assert_eq!(m.to_bytes().unwrap(), b);
        }
        Ok(())
    });
    fuzz(800, &corpus, |b| {
        std::fs::write(&path, b).unwrap();
        let bound = bincode_bound(b.len());
        let got = decode_within("Checkpoint::from_bytes", b.len(), bound, || {
            Checkpoint::from_bytes(b)
        })?;
        let loaded = decode_within("Checkpoint::load", b.len(), bound, || {
            Checkpoint::load(&path)
        })?;
        prop_assert_eq!(got.is_ok(), loaded.is_ok());
        if let Ok(c) = got {
            accepted("Checkpoint::from_bytes");
            accepted("Checkpoint::load");
            prop_assert!(c.model.validate().is_ok());
            prop_assert_eq!(c.to_bytes().unwrap(), b);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// the prediction service's frames

/// What the prediction service decodes from its clients (a query: the parameters'
/// fingerprint and a ciphertext's bytes, decoded as the service does) and what a client
/// decodes from the service.
fn prediction_frames() {
    use cryptonn::inference::{PredictRequest, PredictResponse, ServiceInfo};
    let auth = Authority::generate(info(), 2).unwrap();
    let params = auth.params().clone();
    let ct = feip::FeipEncryptor::new(&params.row)
        .encrypt_to_bytes(&vec![1; params.dataset.row_len()])
        .unwrap();
    let request = PredictRequest::Predict {
        params: params.fingerprint(),
        query: ct,
    };
    let answer = PredictResponse::Prediction(nn::infer::Prediction {
        class: 1,
        probabilities: vec![0.25, 0.75, 0.0],
    });
    let described = PredictResponse::Info(Box::new(ServiceInfo {
        dataset: info(),
        params: params.fingerprint(),
        model: "4-3-3/sigmoid".into(),
        bits: 8,
    }));
    let corpus = vec![
        frame_body(&request),
        frame_body(&PredictRequest::Info),
        frame_body(&answer),
        frame_body(&described),
    ];
    fuzz(800, &corpus, |b| {
        let got = decode_within("PredictRequest", b.len(), bincode_bound(b.len()), || {
            match protocol::decode::<PredictRequest>(b) {
                Ok(PredictRequest::Predict { query, .. }) => {
                    Ok(feip::FeipCiphertext::<fe::Ristretto>::from_bytes(&query).is_ok())
                }
                Ok(PredictRequest::Info) => Ok(false),
                Err(e) => Err(e),
            }
        })?;
        if got.is_ok() {
            accepted("PredictRequest");
        }
        Ok(())
    });
    fuzz(600, &corpus, |b| {
        let got = decode_within("PredictResponse", b.len(), bincode_bound(b.len()), || {
            protocol::decode::<PredictResponse>(b)
        })?;
        if let Ok(r) = got {
            accepted("PredictResponse");
            if let PredictResponse::Info(i) = r {
                let _ = i.dataset.validate();
            }
        }
        Ok(())
    });
}

#[test]
fn outside_input_decoders_never_panic_hang_nor_allocate_past_their_bounds() {
    let step = |name: &str, f: fn()| {
        let t = Instant::now();
        f();
        eprintln!("{name}: {:.1} s", t.elapsed().as_secs_f64());
        let tally = std::mem::take(&mut *TALLY.lock().unwrap());
        for (what, [decodes, ok, worst]) in tally {
            eprintln!(
                "  {what}: {decodes} decodes, {ok} accepted, at most {:.1} % of the allocation bound",
                worst as f64 / 10.0
            );
        }
    };
    step("fe envelopes", fe_envelopes);
    step("public parameters", public_params);
    step("key directory", key_dir);
    step("encrypted dataset", dataset);
    step("discrete-log table", dlog_table);
    step("model and checkpoint", model_and_checkpoint);
    step("prediction service frames", prediction_frames);
    let _ = std::fs::remove_dir_all(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("decoders-{}", std::process::id())),
    );
}
