//! A convolutional first layer under FEIP: each image is one ciphertext, and one function key
//! per placed kernel (kernel `o` at position `pos`, [`nn::infer`]) decrypts that kernel's
//! output at that position. Decryption equals the plain quantized integers exactly; the
//! LeNet-5 size is an ignored benchmark (`cargo test --release --test conv_decryption --
//! --ignored --nocapture`).

use std::time::Instant;

use fe::dlog::DlogTable;
use fe::feip::{FeipDecryptor, FeipEncryptor, FeipParams};
use fe::Ristretto;
use nn::infer::QuantizedModel;
use nn::{Activation, Model, ModelSpec};

/// Decrypts `images` test images with the placed kernels of `spec`'s first convolution and
/// checks every value against the plain integers; returns the seconds per image and the
/// decryptor's additions per ciphertext (bit-plane method only).
fn decrypt_placed(spec: &str, images: usize, dlog_half: u64) -> (f64, Option<usize>, usize) {
    let (_, test) = nn::mnist::embedded().expect("embedded MNIST");
    let test = test.take(images);
    let spec = ModelSpec::for_info(spec, Activation::Relu, &test.info).expect("spec");
    let model = Model::new(spec, 3)
        .and_then(|m| m.with_data(test.info.clone()))
        .expect("model");
    let q = QuantizedModel::new(model, 8).expect("quantize");
    let rows: Vec<Vec<i64>> = q.rows().rows().into_iter().map(|r| r.to_vec()).collect();
    let n = test.info.row_len();
    let (pk, msk) = fe::feip::setup::<Ristretto>(FeipParams::new(n, 255).expect("params"));
    let keys = msk.derive_keys(&rows).expect("keys");
    let dlog = DlogTable::<Ristretto>::new(dlog_half).expect("dlog table");
    let decryptor = FeipDecryptor::new(&pk.params(), &keys, &dlog).expect("decryptor");
    let x = test.augmented(0..test.len());
    let xs: Vec<Vec<i64>> = x.rows().into_iter().map(|r| r.to_vec()).collect();
    let cts = FeipEncryptor::new(&pk).encrypt_many(&xs).expect("encrypt");
    let started = Instant::now();
    let z = decryptor.decrypt(&cts, &dlog).expect("decrypt");
    let secs = started.elapsed().as_secs_f64() / images as f64;
    let plain = q.plain_integers(x.view()).expect("plain");
    for (b, row) in z.iter().enumerate() {
        assert_eq!(
            row.as_slice(),
            plain.row(b).to_vec().as_slice(),
            "image {b}"
        );
    }
    // And the service's answer equals plain quantized inference.
    let decrypted = ndarray::Array2::from_shape_fn(plain.dim(), |(b, r)| z[b][r]);
    assert_eq!(
        q.predict(decrypted.view()).expect("predict"),
        q.predict_plain(&test).expect("plain predict")
    );
    (secs, decryptor.additions_per_ciphertext(), rows.len())
}

#[test]
fn placed_kernels_decrypt_the_plain_integers_exactly() {
    // 2 kernels 5x5, stride 3: 8x8 positions, 128 keys with at most 26 non-zero entries.
    let (_, _, keys) = decrypt_placed("conv5x2s3p1-10", 3, 1 << 12);
    assert_eq!(keys, 2 * 9 * 9);
}

#[test]
#[ignore = "benchmark: LeNet-5's first convolution, 4,704 keys per image"]
fn lenet5_first_convolution_decryption_cost() {
    let (secs, additions, keys) = decrypt_placed("lenet5", 8, fe::dlog::DEFAULT_HALF_WIDTH);
    println!(
        "LeNet-5 conv1 under FEIP: {keys} keys per image, {:.1} ms per image on all cores, \
         additions per ciphertext {additions:?}",
        secs * 1e3
    );
}
