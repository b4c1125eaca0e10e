//! End-to-end properties of FEIP and FEBO: correctness on random inputs, and rejection of
//! malformed, tampered, mismatched and out-of-range input.

use fe::dlog::DlogTable;
use fe::febo::{self, Op};
use fe::feip::{self, FeipCiphertext, FeipFunctionKey, FeipParams, FeipPublicKey};
use fe::{Encode, FeCurve, FeError, Ristretto, Secp256k1};
use proptest::prelude::*;
use std::sync::OnceLock;

fn dlog() -> &'static DlogTable<Ristretto> {
    static T: OnceLock<DlogTable<Ristretto>> = OnceLock::new();
    T.get_or_init(|| DlogTable::new(1 << 14).expect("table"))
}

fn dlog_secp() -> &'static DlogTable<Secp256k1> {
    static T: OnceLock<DlogTable<Secp256k1>> = OnceLock::new();
    T.get_or_init(|| DlogTable::new(1 << 10).expect("table"))
}

type Keys<E> = (FeipPublicKey<E>, feip::FeipMasterSecretKey<E>);
type KeyCache = std::sync::Mutex<Vec<(usize, u64, &'static Keys<Ristretto>)>>;

fn keys(n: usize, xb: u64) -> &'static Keys<Ristretto> {
    static K: OnceLock<KeyCache> = OnceLock::new();
    let m = K.get_or_init(Default::default);
    let mut v = m.lock().expect("lock");
    if let Some((_, _, k)) = v.iter().find(|(a, b, _)| *a == n && *b == xb) {
        return k;
    }
    let k: &'static Keys<Ristretto> = Box::leak(Box::new(feip::setup(
        FeipParams::new(n, xb).expect("params"),
    )));
    v.push((n, xb, k));
    k
}

fn dot(x: &[i64], y: &[i64]) -> i64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Encrypts `xs`, derives keys for `ys`, decrypts every pair with [`feip::decrypt_matrix`] and
/// compares with the plain inner products.
fn assert_matrix_matches_plain(n: usize, xs: &[Vec<i64>], ys: &[Vec<i64>]) {
    let (pk, msk) = keys(n, 255);
    let cts = feip::FeipEncryptor::new(pk)
        .encrypt_many(xs)
        .expect("encrypt");
    let ks = msk.derive_keys(ys).expect("keys");
    let m = feip::decrypt_matrix(&pk.params(), &cts, &ks, dlog()).expect("decrypt");
    for (x, row) in xs.iter().zip(&m) {
        for (y, v) in ys.iter().zip(row) {
            assert_eq!(*v, dot(x, y), "x = {x:?}, y = {y:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn feip_roundtrip(
        xy in (1usize..24).prop_flat_map(|n| (
            proptest::collection::vec(-255i64..=255, n),
            proptest::collection::vec(-128i64..=127, n),
        ))
    ) {
        let (x, y) = xy;
        let (pk, msk) = keys(x.len(), 255);
        let ct = feip::FeipEncryptor::new(pk).encrypt(&x).expect("encrypt");
        let key = msk.derive_key(&y).expect("key");
        prop_assert_eq!(feip::decrypt(&pk.params(), &ct, &key, dlog()), Ok(dot(&x, &y)));
    }

    /// Many keys take the bit-plane path (`C_0` folded in as extra points): training's shapes,
    /// with negative, zero and extreme entries in keys and plaintexts.
    #[test]
    fn feip_matrix_bit_planes_match_plain(
        xs in proptest::collection::vec(proptest::collection::vec(-255i64..=255, 64), 1..3),
        ys in proptest::collection::vec(
            proptest::collection::vec(prop_oneof![Just(-128i64), Just(127), Just(0), -128i64..=127], 64),
            100..140),
    ) {
        assert_matrix_matches_plain(64, &xs, &ys);
    }

    /// Short vectors with 1 to 80 keys: whichever strategy the addition count picks (buckets
    /// for one key, bit planes or small multiples for more).
    #[test]
    fn feip_matrix_matches_plain(
        xs in proptest::collection::vec(proptest::collection::vec(0i64..=255, 4), 1..5),
        ys in proptest::collection::vec(proptest::collection::vec(-128i64..=127, 4), 1..80),
    ) {
        assert_matrix_matches_plain(4, &xs, &ys);
    }

    #[test]
    fn febo_ops(x in -1000i64..=1000, y in -1000i64..=1000) {
        let (pk, msk) = febo::setup::<Ristretto>();
        let enc = febo::FeboEncryptor::new(&pk);
        let c = enc.encrypt(x);
        for (op, want) in [(Op::Add, x + y), (Op::Sub, x - y), (Op::Mul, x * y)] {
            let k = msk.derive_key(c.commitment(), op, y).expect("key");
            prop_assert_eq!(febo::decrypt(&c, &k, 1000, dlog()), Ok(want));
        }
        if y != 0 {
            let k = msk.derive_key(c.commitment(), Op::Div, y).expect("key");
            let got = febo::decrypt(&c, &k, 1000, dlog());
            if x % y == 0 {
                prop_assert_eq!(got, Ok(x / y));
            } else {
                let not_found = matches!(got, Err(FeError::DlogNotFound { .. }));
                prop_assert!(not_found);
            }
        }
    }
}

#[test]
fn feip_zeros_and_extremes() {
    let n = 8;
    let (pk, msk) = keys(n, 255);
    let enc = feip::FeipEncryptor::new(pk);
    let cases: Vec<(Vec<i64>, Vec<i64>)> = vec![
        (vec![0; n], vec![127; n]),
        (vec![255; n], vec![0; n]),
        (vec![255; n], vec![-128; n]),
        (vec![-255; n], vec![-128; n]),
        (
            vec![255, -255, 0, 1, -1, 255, 255, 255],
            vec![32767, -32768, 5, 0, 0, 1, -1, 2],
        ),
    ];
    for (x, y) in cases {
        let ct = enc.encrypt(&x).expect("encrypt");
        let key = msk.derive_key(&y).expect("key");
        assert_eq!(
            feip::decrypt(&pk.params(), &ct, &key, dlog()),
            Ok(dot(&x, &y)),
            "{x:?} {y:?}"
        );
    }
}

#[test]
fn feip_rejects_bad_input() {
    let (pk, msk) = keys(4, 255);
    let p = pk.params();
    let enc = feip::FeipEncryptor::new(pk);
    // one unit over the plaintext bound, on both sides
    assert!(matches!(
        enc.encrypt(&[256, 0, 0, 0]),
        Err(FeError::OutOfRange { .. })
    ));
    assert!(matches!(
        enc.encrypt(&[0, -256, 0, 0]),
        Err(FeError::OutOfRange { .. })
    ));
    // mismatched lengths
    assert!(matches!(
        enc.encrypt(&[1, 2, 3]),
        Err(FeError::LengthMismatch { .. })
    ));
    assert!(matches!(
        msk.derive_key(&[1, 2, 3, 4, 5]),
        Err(FeError::LengthMismatch { .. })
    ));
    let ct = enc.encrypt(&[1, 2, 3, 4]).expect("encrypt");
    let ct5 = keys(5, 255).0.clone();
    let ct_other = feip::FeipEncryptor::new(&ct5)
        .encrypt(&[1, 2, 3, 4, 5])
        .expect("enc");
    let key = msk.derive_key(&[1, 1, 1, 1]).expect("key");
    assert!(matches!(
        feip::decrypt(&p, &ct_other, &key, dlog()),
        Err(FeError::LengthMismatch { .. })
    ));
    // a key for another vector: same secret, different claimed vector
    let other = msk.derive_key(&[1, 1, 1, 2]).expect("key");
    let forged = FeipFunctionKey::<Ristretto>::from_bytes(&{
        let mut b = key.to_bytes();
        let good = other.to_bytes();
        // swap the vector part, keep key's secret: vector is before the 32-byte scalar
        let cut = b.len() - 32;
        b[..cut].copy_from_slice(&good[..cut]);
        b
    })
    .expect("parses");
    assert!(matches!(
        feip::decrypt(&p, &ct, &forged, dlog()),
        Err(FeError::DlogNotFound { .. })
    ));
    // a key from another master key
    let (_, msk2) = feip::setup::<Ristretto>(p);
    let k2 = msk2.derive_key(&[1, 1, 1, 1]).expect("key");
    assert!(matches!(
        feip::decrypt(&p, &ct, &k2, dlog()),
        Err(FeError::DlogNotFound { .. })
    ));
    // a bound the solver cannot reach is refused up front
    let small = DlogTable::<Ristretto>::new(16)
        .expect("t")
        .with_limit(255 * 4 * 10 - 1);
    let k10 = msk.derive_key(&[10, 10, 10, -10]).expect("key");
    assert!(matches!(
        feip::decrypt(&p, &ct, &k10, &small),
        Err(FeError::BoundTooLarge { .. })
    ));
    let exact = DlogTable::<Ristretto>::new(16)
        .expect("t")
        .with_limit(255 * 4 * 10);
    assert_eq!(feip::decrypt(&p, &ct, &k10, &exact), Ok(20));
}

/// The forward pass's shape (n = 785, 128 keys) on the bit-plane path, all values at their
/// bounds, and a tampered ciphertext rejected on that path too.
#[test]
fn feip_forward_shape_bit_planes() {
    let (pk, msk) = keys(785, 255);
    let enc = feip::FeipEncryptor::new(pk);
    let xs = vec![
        vec![255i64; 785],
        (0..785).map(|i| (i % 256) as i64).collect(),
    ];
    let mut ys: Vec<Vec<i64>> = (0..128)
        .map(|k| {
            (0..785)
                .map(|i| ((i * 31 + k * 17) % 256) as i64 - 128)
                .collect()
        })
        .collect();
    ys[0] = vec![-128; 785];
    ys[1] = vec![127; 785];
    assert_matrix_matches_plain(785, &xs, &ys);
    let mut cts = enc.encrypt_many(&xs).expect("encrypt");
    let ks = msk.derive_keys(&ys).expect("keys");
    // A solver that reaches exactly the bound (255·785·128) but not twice it: the products are
    // not doubled (no zero-free digits), and the results are the same.
    let tight = DlogTable::<Ristretto>::new(1 << 14)
        .expect("table")
        .with_limit(255 * 785 * 128);
    let want = feip::decrypt_matrix(&pk.params(), &cts, &ks, dlog()).expect("decrypt");
    assert_eq!(
        feip::decrypt_matrix(&pk.params(), &cts, &ks, &tight).expect("decrypt"),
        want
    );
    // Swap two elements: every key whose entries differ there now sees another point.
    let mut c = cts[0].elements().to_vec();
    c.swap(0, 1);
    cts[0] = FeipCiphertext::from_parts(cts[0].c0().clone(), c);
    assert!(feip::decrypt_matrix(&pk.params(), &cts, &ks, dlog()).is_err());
}

#[test]
fn feip_tampered_ciphertext_is_an_error_not_a_number() {
    let (pk, msk) = keys(4, 255);
    let enc = feip::FeipEncryptor::new(pk);
    let ct = enc.encrypt(&[5, 6, 7, 8]).expect("encrypt");
    let key = msk.derive_key(&[1, 2, 3, 4]).expect("key");
    let bytes = ct.to_bytes();
    let mut errors = 0;
    let mut ok_same = 0;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        match FeipCiphertext::<Ristretto>::from_bytes(&b) {
            Err(_) => errors += 1,
            Ok(t) => match feip::decrypt(&pk.params(), &t, &key, dlog()) {
                Err(_) => errors += 1,
                Ok(v) => {
                    // only a change that does not alter the point may decrypt, and then correctly
                    assert_eq!(v, 70, "tampered byte {i} decrypted to a wrong number");
                    ok_same += 1;
                }
            },
        }
    }
    assert_eq!(errors + ok_same, bytes.len());
    assert!(errors > bytes.len() / 2);
}

#[test]
fn serialization_roundtrips_and_rejects_malformed() {
    let (pk, msk) = keys(3, 255);
    let ct = feip::FeipEncryptor::new(pk)
        .encrypt(&[1, 2, 3])
        .expect("encrypt");
    let key = msk.derive_key(&[4, -5, 6]).expect("key");
    assert_eq!(
        FeipPublicKey::<Ristretto>::from_bytes(&pk.to_bytes()).as_ref(),
        Ok(pk)
    );
    assert_eq!(
        FeipCiphertext::<Ristretto>::from_bytes(&ct.to_bytes()).as_ref(),
        Ok(&ct)
    );
    let key2 = FeipFunctionKey::<Ristretto>::from_bytes(&key.to_bytes()).expect("key");
    assert_eq!(
        feip::decrypt(&pk.params(), &ct, &key2, dlog()),
        Ok(4 - 10 + 18)
    );
    let msk_b = msk.to_bytes();
    let msk2 = feip::FeipMasterSecretKey::<Ristretto>::from_bytes(&msk_b).expect("msk");
    assert_eq!(msk2.public_key(), *pk);
    // serde through bincode
    let wire = bincode::serialize(&ct).expect("ser");
    let back: FeipCiphertext<Ristretto> = bincode::deserialize(&wire).expect("de");
    assert_eq!(back, ct);

    let b = ct.to_bytes();
    for cut in [0, 1, 3, 10, b.len() - 1] {
        assert!(
            FeipCiphertext::<Ristretto>::from_bytes(&b[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    let mut long = b.clone();
    long.push(0);
    assert!(
        FeipCiphertext::<Ristretto>::from_bytes(&long).is_err(),
        "trailing byte"
    );
    // a huge claimed length must not allocate or panic
    let mut huge = b.clone();
    let off = 2 + 1 + 1 + "ristretto".len() + 1 + 32;
    huge[off..off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(FeipCiphertext::<Ristretto>::from_bytes(&huge).is_err());
    // wrong version, wrong kind
    let mut v = b.clone();
    v[2] = 9;
    assert!(FeipCiphertext::<Ristretto>::from_bytes(&v).is_err());
    assert!(FeipFunctionKey::<Ristretto>::from_bytes(&b).is_err());
    // made on another curve
    let (spk, _) = feip::setup::<Secp256k1>(FeipParams::new(3, 255).expect("p"));
    let sct = feip::FeipEncryptor::new(&spk)
        .encrypt(&[1, 2, 3])
        .expect("enc");
    let err = FeipCiphertext::<Ristretto>::from_bytes(&sct.to_bytes()).expect_err("curve");
    assert!(err.to_string().contains("secp256k1"), "{err}");
    // a secp256k1 point's bytes spliced into a Ristretto envelope are rejected
    let mut spliced = b[..2 + 1 + 1 + 9 + 1].to_vec();
    let sb = sct.to_bytes();
    spliced.extend_from_slice(&sb[2 + 1 + 1 + 9 + 1..2 + 1 + 1 + 9 + 1 + 32]);
    spliced.extend_from_slice(&b[2 + 1 + 1 + 9 + 1 + 32..]);
    let _ = FeipCiphertext::<Ristretto>::from_bytes(&spliced); // must not panic
                                                               // garbage
    for len in [0usize, 7, 64, 300] {
        let g: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
        assert!(FeipCiphertext::<Ristretto>::from_bytes(&g).is_err());
        assert!(FeipPublicKey::<Secp256k1>::from_bytes(&g).is_err());
    }
}

#[test]
fn secp256k1_schemes() {
    let p = FeipParams::new(5, 255).expect("params");
    let (pk, msk) = feip::setup::<Secp256k1>(p);
    let x = [255, -3, 0, 17, 200];
    let y = [-128, 127, 5, 0, 1];
    let ct = feip::FeipEncryptor::new(&pk).encrypt(&x).expect("encrypt");
    let key = msk.derive_key(&y).expect("key");
    assert_eq!(feip::decrypt(&p, &ct, &key, dlog_secp()), Ok(dot(&x, &y)));
    let back = FeipCiphertext::<Secp256k1>::from_bytes(&ct.to_bytes()).expect("roundtrip");
    assert_eq!(back, ct);
    let (bpk, bmsk) = febo::setup::<Secp256k1>();
    let c = febo::FeboEncryptor::new(&bpk).encrypt(-42);
    let k = bmsk.derive_key(c.commitment(), Op::Mul, -3).expect("key");
    assert_eq!(febo::decrypt(&c, &k, 100, dlog_secp()), Ok(126));
}

#[test]
fn febo_rejects_bad_input() {
    let (pk, msk) = febo::setup::<Ristretto>();
    let enc = febo::FeboEncryptor::new(&pk);
    let c = enc.encrypt(12);
    assert!(matches!(
        msk.derive_key(c.commitment(), Op::Div, 0),
        Err(FeError::InvalidOperation(_))
    ));
    // a key bound to another ciphertext's commitment
    let other = enc.encrypt(12);
    let k = msk.derive_key(other.commitment(), Op::Sub, 2).expect("key");
    assert!(febo::decrypt(&c, &k, 1000, dlog()).is_err());
    // result beyond the bound is an error
    let k = msk.derive_key(c.commitment(), Op::Add, 5).expect("key");
    assert_eq!(febo::decrypt(&c, &k, 1000, dlog()), Ok(17));
    let big = enc.encrypt(5000);
    let kb = msk.derive_key(big.commitment(), Op::Add, 5).expect("key");
    assert!(matches!(
        febo::decrypt(&big, &kb, 1000, dlog()),
        Err(FeError::DlogNotFound { .. })
    ));
    // batch with a mix
    let cs: Vec<_> = (0..40).map(|i| enc.encrypt(i * 100 - 2000)).collect();
    let ks: Vec<_> = cs
        .iter()
        .map(|c| msk.derive_key(c.commitment(), Op::Sub, 4096).expect("key"))
        .collect();
    let pairs: Vec<_> = cs.iter().zip(&ks).collect();
    let out = febo::decrypt_many(&pairs, 2000, dlog()).expect("decrypt");
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, i as i64 * 100 - 2000 - 4096);
    }
    // serialization
    let kb = k.to_bytes();
    assert_eq!(
        febo::FeboFunctionKey::<Ristretto>::from_bytes(&kb).as_ref(),
        Ok(&k)
    );
    let mut bad_op = kb.clone();
    bad_op[2 + 1 + 1 + 9 + 1] = 7;
    assert!(febo::FeboFunctionKey::<Ristretto>::from_bytes(&bad_op).is_err());
    assert!(febo::FeboCiphertext::<Ristretto>::from_bytes(&c.to_bytes()[..20]).is_err());
    let _ = <Ristretto as FeCurve>::POINT_LEN;
}

#[cfg(unix)]
#[test]
fn secret_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("msk.bin");
    let (_, msk) = keys(2, 255);
    fe::serial::write_atomic(&path, &msk.to_bytes(), true).expect("write");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn encrypting_straight_to_bytes_matches_the_envelope() {
    fn check<E: FeCurve>(dl: &DlogTable<E>) {
        let p = FeipParams::new(7, 255).expect("params");
        let (pk, msk) = feip::setup::<E>(p);
        let enc = feip::FeipEncryptor::new(&pk);
        let x = vec![0, 255, -255, 1, 2, 3, 0];
        let y = vec![5, -6, 7, 8, -9, 10, 11];
        let bytes = enc
            .encrypt_many_to_bytes(&[x.clone(), vec![0; 7]])
            .expect("enc");
        let ct = FeipCiphertext::<E>::from_bytes(&bytes[0]).expect("valid envelope");
        assert_eq!(ct.to_bytes(), bytes[0]);
        let key = msk.derive_key(&y).expect("key");
        assert_eq!(feip::decrypt(&p, &ct, &key, dl), Ok(dot(&x, &y)));
        let zero = FeipCiphertext::<E>::from_bytes(&bytes[1]).expect("valid");
        assert_eq!(feip::decrypt(&p, &zero, &key, dl), Ok(0));
        let (bpk, bmsk) = febo::setup::<E>();
        let benc = febo::FeboEncryptor::new(&bpk);
        let xs: Vec<i64> = (-300..300).step_by(7).collect();
        for (x, b) in xs.iter().zip(benc.encrypt_many_to_bytes(&xs)) {
            let c = febo::FeboCiphertext::<E>::from_bytes(&b).expect("valid");
            let k = bmsk.derive_key(c.commitment(), Op::Sub, 4).expect("key");
            assert_eq!(febo::decrypt(&c, &k, 300, dl), Ok(x - 4));
        }
    }
    check::<Ristretto>(dlog());
    check::<Secp256k1>(dlog_secp());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// A decryptor prepared once gives, batch after batch, what [`feip::decrypt_matrix`] gives;
    /// a ciphertext under another public key, or of another length, fails alone while the
    /// others in its batch decrypt.
    #[test]
    fn prepared_decryptor_reuses_its_keys_and_isolates_bad_ciphertexts(
        xs in proptest::collection::vec(proptest::collection::vec(0i64..=255, 40), 2..5),
        ys in proptest::collection::vec(proptest::collection::vec(-128i64..=127, 40), 8..20),
        bad in 0usize..5,
    ) {
        let (pk, msk) = keys(40, 255);
        let enc = feip::FeipEncryptor::new(pk);
        let ks = msk.derive_keys(&ys).expect("keys");
        let dec = feip::FeipDecryptor::new(&pk.params(), &ks, dlog()).expect("prepare");
        prop_assert_eq!(dec.keys(), ys.len());
        for _ in 0..2 {
            let cts = enc.encrypt_many(&xs).expect("encrypt");
            prop_assert_eq!(
                dec.decrypt(&cts, dlog()).expect("decrypt"),
                feip::decrypt_matrix(&pk.params(), &cts, &ks, dlog()).expect("decrypt")
            );
        }
        // Replace one ciphertext by one under another key, and cut another short.
        let (other_pk, _) = feip::setup::<Ristretto>(FeipParams::new(40, 255).expect("params"));
        let mut cts = enc.encrypt_many(&xs).expect("encrypt");
        let bad = bad % cts.len();
        cts[bad] = feip::FeipEncryptor::new(&other_pk).encrypt(&xs[bad]).expect("encrypt");
        let short = (bad + 1) % cts.len();
        let cut = cts[short].elements()[..39].to_vec();
        cts[short] = FeipCiphertext::from_parts(cts[short].c0().clone(), cut);
        let out = dec.decrypt_each(&cts, dlog(), &feip::DecryptStats::default());
        for (i, (r, x)) in out.iter().zip(&xs).enumerate() {
            if i == bad {
                prop_assert!(matches!(r, Err(FeError::DlogNotFound { .. })), "{:?}", r);
            } else if i == short {
                prop_assert!(matches!(r, Err(FeError::LengthMismatch { .. })), "{:?}", r);
            } else {
                let want: Vec<i64> = ys.iter().map(|y| dot(x, y)).collect();
                prop_assert_eq!(r.as_ref().expect("decrypts"), &want);
            }
        }
    }
}
