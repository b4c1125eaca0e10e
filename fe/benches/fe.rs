//! The cost figures of the README: FEIP decryption (forward and backward shapes), encryption,
//! key derivation, discrete-log table build and load, on one core, against the naive loop.
//!
//! Run with `cargo bench -p fe`; every group reports time per operation (criterion's
//! "thrpt" line gives operations per second).

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use curv::elliptic::curves::{Point, Scalar};
use fe::backend::Backend;
use fe::dlog::{DlogTable, DEFAULT_HALF_WIDTH};
use fe::feip::{self, FeipCiphertext, FeipFunctionKey, FeipParams};
use fe::group::scalar_from_i64;
use fe::{FeCurve, Ristretto, Secp256k1};
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;
use std::time::Duration;

fn one_core() -> &'static rayon::ThreadPool {
    static P: OnceLock<rayon::ThreadPool> = OnceLock::new();
    P.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
    })
}

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(7)
}

fn keys_of_bits(n: usize, count: usize, bits: u32) -> Vec<Vec<i64>> {
    let m = 1i64 << (bits - 1);
    let mut r = rng();
    (0..count)
        .map(|_| (0..n).map(|_| r.gen_range(-m..m)).collect())
        .collect()
}

/// Keys shaped like training's delta columns mid-epoch: about two thirds zeros, heavy-tailed
/// magnitudes, each column scaled so that its largest entry is ±127.
fn gradient_like_keys(n: usize, count: usize) -> Vec<Vec<i64>> {
    let mut r = rng();
    (0..count)
        .map(|_| {
            let mut y: Vec<i64> = (0..n)
                .map(|_| {
                    if r.gen_bool(0.67) {
                        return 0;
                    }
                    let m = (127.0 * r.gen::<f64>().powi(3)).round() as i64;
                    if r.gen_bool(0.5) {
                        -m
                    } else {
                        m
                    }
                })
                .collect();
            y[r.gen_range(0..n)] = if r.gen_bool(0.5) { -127 } else { 127 };
            y
        })
        .collect()
}

fn pixels(n: usize) -> Vec<i64> {
    let mut r = rng();
    (0..n).map(|_| r.gen_range(0..=255)).collect()
}

/// The textbook decryption: one curv scalar multiplication per element, then the same dlog.
fn naive_decrypt<E: FeCurve>(
    ct: &FeipCiphertext<E>,
    key: &FeipFunctionKey<E>,
    bound: u64,
    dlog: &DlogTable<E>,
) -> i64 {
    let mut d = Point::<E>::zero();
    for (c, &y) in ct.elements().iter().zip(key.vector()) {
        d = d + c * scalar_from_i64::<E>(y);
    }
    d = d - ct.c0() * key.secret();
    dlog.solve(&d, bound).expect("in bound")
}

struct Setup<E: FeCurve> {
    params: FeipParams,
    ct: FeipCiphertext<E>,
    keys: Vec<FeipFunctionKey<E>>,
    cts: Vec<FeipCiphertext<E>>,
    enc: feip::FeipEncryptor<E>,
    msk: feip::FeipMasterSecretKey<E>,
    ys: Vec<Vec<i64>>,
}

fn setup<E: FeCurve>(n: usize, nkeys: usize, ncts: usize, bits: u32) -> Setup<E> {
    let params = FeipParams::new(n, 255).expect("params");
    let (pk, msk) = feip::setup::<E>(params);
    let enc = feip::FeipEncryptor::new(&pk);
    let ys = keys_of_bits(n, nkeys, bits);
    let keys = msk.derive_keys(&ys).expect("keys");
    let cts = (0..ncts)
        .map(|_| enc.encrypt(&pixels(n)).expect("enc"))
        .collect::<Vec<_>>();
    Setup {
        params,
        ct: cts[0].clone(),
        keys,
        cts,
        enc,
        msk,
        ys,
    }
}

fn bench_curve<E: FeCurve>(c: &mut Criterion, dlog: &DlogTable<E>, configs: &[(usize, u32)]) {
    let name = E::CURVE_NAME;
    for &(n, bits) in configs {
        let s = setup::<E>(n, 128, 4, bits);
        let mut g = c.benchmark_group(format!("feip/{name}/n={n}/{bits}-bit keys"));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        // forward shape: one ciphertext, 128 keys
        g.throughput(Throughput::Elements(128));
        g.bench_function(BenchmarkId::new("decrypt, 1 ct x 128 keys", "fast"), |b| {
            b.iter(|| {
                one_core().install(|| feip::decrypt_many_keys(&s.params, &s.ct, &s.keys, dlog))
            })
        });
        // backward shape: many ciphertexts, 128 keys
        g.throughput(Throughput::Elements(128 * s.cts.len() as u64));
        g.bench_function(BenchmarkId::new("decrypt, 4 cts x 128 keys", "fast"), |b| {
            b.iter(|| one_core().install(|| feip::decrypt_matrix(&s.params, &s.cts, &s.keys, dlog)))
        });
        g.throughput(Throughput::Elements(1));
        if n >= 700 || name == "ristretto" {
            let bound = 255 * s.ys[0].iter().map(|v| v.unsigned_abs()).sum::<u64>();
            g.bench_function(BenchmarkId::new("decrypt, 1 ct x 1 key", "naive"), |b| {
                b.iter(|| naive_decrypt(&s.ct, &s.keys[0], bound, dlog))
            });
        }
        let x = pixels(n);
        g.bench_function("encrypt one vector", |b| {
            b.iter(|| one_core().install(|| s.enc.encrypt_to_bytes(&x).expect("enc")))
        });
        let xs: Vec<Vec<i64>> = (0..64).map(|_| pixels(n)).collect();
        g.throughput(Throughput::Elements(64));
        g.bench_function("encrypt 64 vectors to bytes", |b| {
            b.iter(|| one_core().install(|| s.enc.encrypt_many_to_bytes(&xs).expect("enc")))
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function("derive one key", |b| {
            b.iter(|| s.msk.derive_key(&s.ys[1]).expect("key"))
        });
        g.finish();
    }
}

fn feip_benches(c: &mut Criterion) {
    let dlog = one_core().install(|| DlogTable::<Ristretto>::new(DEFAULT_HALF_WIDTH).expect("t"));
    bench_curve::<Ristretto>(c, &dlog, &[(785, 8), (785, 16), (64, 8)]);
    // The backward shape with training-like sparse keys (NAF bit planes).
    let mut s = setup::<Ristretto>(64, 128, 4, 8);
    s.keys = s
        .msk
        .derive_keys(&gradient_like_keys(64, 128))
        .expect("keys");
    let mut g = c.benchmark_group("feip/ristretto/n=64/gradient-like keys");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(128 * s.cts.len() as u64));
    g.bench_function(BenchmarkId::new("decrypt, 4 cts x 128 keys", "fast"), |b| {
        b.iter(|| one_core().install(|| feip::decrypt_matrix(&s.params, &s.cts, &s.keys, &dlog)))
    });
    g.finish();
    let dlog_s = DlogTable::<Secp256k1>::new(1 << 16).expect("t");
    bench_curve::<Secp256k1>(c, &dlog_s, &[(785, 8), (64, 8)]);
}

fn dlog_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("dlog/ristretto");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    g.bench_function("build default table (2^20 entries), 1 core", |b| {
        b.iter(|| {
            one_core().install(|| DlogTable::<Ristretto>::new(DEFAULT_HALF_WIDTH).expect("t"))
        })
    });
    g.bench_function("build default table, all cores", |b| {
        b.iter(|| DlogTable::<Ristretto>::new(DEFAULT_HALF_WIDTH).expect("t"))
    });
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("dlog.bin");
    DlogTable::<Ristretto>::new(DEFAULT_HALF_WIDTH)
        .expect("t")
        .save(&path)
        .expect("save");
    g.bench_function("load default table from file", |b| {
        b.iter(|| DlogTable::<Ristretto>::load(&path).expect("load"))
    });
    let t = DlogTable::<Ristretto>::new(DEFAULT_HALF_WIDTH).expect("t");
    let mut r = rng();
    let vals: Vec<i64> = (0..1024)
        .map(|_| r.gen_range(-(1 << 24)..(1 << 24)))
        .collect();
    let pts: Vec<_> = vals
        .iter()
        .map(|&v| (Point::<Ristretto>::generator() * Scalar::from(v.unsigned_abs())).into_raw())
        .collect();
    g.throughput(Throughput::Elements(1024));
    g.bench_function("solve 1024 values |v| < 2^24, batched, 1 core", |b| {
        b.iter(|| one_core().install(|| t.solve_batch(&pts, &[1 << 24])))
    });
    g.finish();
}

/// Every point-addition backend of this CPU side by side: the dense forward decryption (one
/// ciphertext of n = 785 against 128 keys, dlog included), whose additions per ciphertext the
/// decryptor counts, so that the reported time per key also gives additions per second.
fn backend_benches(c: &mut Criterion) {
    let dlog = one_core().install(|| DlogTable::<Ristretto>::new(DEFAULT_HALF_WIDTH).expect("t"));
    for bits in [8, 4] {
        let s = setup::<Ristretto>(785, 128, 1, bits);
        let mut g = c.benchmark_group(format!("backend/n=785/{bits}-bit keys/128 keys"));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4))
            .throughput(Throughput::Elements(128));
        for backend in Backend::available() {
            let dec = feip::FeipDecryptor::new(&s.params, &s.keys, &dlog)
                .expect("decryptor")
                .with_backend(backend);
            let adds = dec.additions_per_ciphertext().unwrap_or(0);
            g.bench_function(
                BenchmarkId::new(format!("decrypt ({adds} additions)"), backend.name()),
                |b| {
                    b.iter(|| {
                        one_core().install(|| dec.decrypt(std::slice::from_ref(&s.ct), &dlog))
                    })
                },
            );
        }
        g.finish();
    }
    let s = setup::<Ristretto>(785, 1, 1, 8);
    let pk = s.msk.public_key();
    let xs: Vec<Vec<i64>> = (0..64).map(|_| pixels(785)).collect();
    let mut g = c.benchmark_group("backend/n=785/encrypt 64 vectors to bytes");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Elements(64));
    for backend in Backend::available() {
        let enc = feip::FeipEncryptor::new_on(&pk, backend);
        g.bench_function(backend.name(), |b| {
            b.iter(|| one_core().install(|| enc.encrypt_many_to_bytes(&xs).expect("enc")))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("backend/n=785/build the encryption tables");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for backend in Backend::available() {
        g.bench_function(backend.name(), |b| {
            b.iter(|| one_core().install(|| feip::FeipEncryptor::new_on(&pk, backend)))
        });
    }
    g.finish();
    let bytes = feip::FeipEncryptor::new(&pk)
        .encrypt_many_to_bytes(&xs[..1])
        .expect("enc")
        .remove(0);
    let mut g = c.benchmark_group("backend/n=785/decode one ciphertext's elements");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(785));
    // The ciphertext's 785 element points, after the envelope, `C_0` and the length.
    let points = &bytes[bytes.len() - 785 * 32..];
    for backend in Backend::available() {
        g.bench_function(backend.name(), |b| {
            b.iter(|| fe::serial::decode_points_on::<Ristretto>(backend, points).expect("decode"))
        });
    }
    g.finish();
}

criterion_group!(benches, backend_benches, feip_benches, dlog_benches);
criterion_main!(benches);
