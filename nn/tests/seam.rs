//! The quantized seam: independent integer backends give bit-identical training.
#![allow(clippy::unwrap_used)]

mod common;

use common::NaiveIntegers;
use nn::first_layer::{FirstLayer, PlainIntegers, Quantized, Quantizer};
use nn::train::{compute_gradients, train_epoch};
use nn::{Activation, Model, ModelSpec, Optimizer, PlainFloat};

fn train_some<F: FirstLayer>(fl: &mut F, seed: u64) -> Model {
    let spec = ModelSpec::parse("12-6-5-4", Activation::Sigmoid).unwrap();
    let mut model = Model::new(spec, seed).unwrap();
    let mut opt = Optimizer::adam(0.01);
    for epoch in 0..3 {
        train_epoch(&mut model, fl, &mut opt, epoch, seed, false).unwrap();
    }
    model
}

#[test]
fn plain_and_naive_integers_give_bit_identical_weights() {
    let data = common::synthetic(45, 3, 4, 4, 3);
    for q in [Quantizer::new(8), Quantizer::new(6).stochastic(9)] {
        let mut a = Quantized::new(
            PlainIntegers::from_dataset(data.clone(), 8, false).unwrap(),
            q,
        )
        .unwrap();
        let mut b = Quantized::new(NaiveIntegers::new(data.clone(), 8, 4), q).unwrap();
        let ma = train_some(&mut a, 5);
        let mb = train_some(&mut b, 5);
        assert_eq!(
            b.inner().calls,
            3 * 6 * 3,
            "every step goes through the backend"
        );
        assert_eq!(ma, mb, "{q:?}");
        assert_eq!(a.rounding_stream(), b.rounding_stream());

        // And quantization does change something, compared with the float baseline.
        let mut f = PlainFloat::from_dataset(data.clone(), 8, false).unwrap();
        assert_ne!(train_some(&mut f, 5), ma);
    }
}

#[test]
fn fine_quantization_approaches_the_float_gradients() {
    let data = common::synthetic(16, 3, 4, 4, 8);
    let spec = ModelSpec::parse("12-6-4", Activation::Tanh).unwrap();
    let model = Model::new(spec, 2).unwrap();
    let mut f = PlainFloat::from_dataset(data.clone(), 16, false).unwrap();
    let (gf, sf) = compute_gradients(&model, &mut f, 0).unwrap();
    let mut q = Quantized::new(
        PlainIntegers::from_dataset(data, 16, false).unwrap(),
        Quantizer::new(24),
    )
    .unwrap();
    let (gq, sq) = compute_gradients(&model, &mut q, 0).unwrap();
    assert_eq!(sf.correct, sq.correct);
    assert!((sf.loss_sum - sq.loss_sum).abs() < 1e-3);
    for (a, b) in gf.layers.iter().zip(&gq.layers) {
        let scale = a.dw.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.dw.iter().zip(b.dw.iter()) {
            // Output errors are quantized to 1/4096, which bounds the agreement.
            assert!((x - y).abs() <= 2e-3 * scale.max(1e-3) + 1e-4, "{x} vs {y}");
        }
    }
}

#[test]
fn backend_errors_surface_as_seam_errors() {
    struct Failing;
    impl FirstLayer for Failing {
        fn forward(
            &mut self,
            _: usize,
            _: ndarray::ArrayView2<f32>,
        ) -> Result<ndarray::Array2<f32>, nn::SeamError> {
            Err(nn::SeamError::backend(std::io::Error::other(
                "authority unreachable",
            )))
        }
        fn backward(
            &mut self,
            _: usize,
            _: ndarray::ArrayView2<f32>,
        ) -> Result<ndarray::Array2<f32>, nn::SeamError> {
            unreachable!()
        }
        fn output_error(
            &mut self,
            _: usize,
            _: ndarray::ArrayView2<f32>,
        ) -> Result<ndarray::Array2<f32>, nn::SeamError> {
            unreachable!()
        }
        fn num_batches(&self) -> usize {
            1
        }
        fn batch_len(&self, _: usize) -> usize {
            2
        }
    }
    let spec = ModelSpec::parse("4-3-2", Activation::Relu).unwrap();
    let mut model = Model::new(spec, 0).unwrap();
    let err = train_epoch(
        &mut model,
        &mut Failing,
        &mut Optimizer::adam(0.1),
        0,
        0,
        false,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        nn::TrainError::Seam(nn::SeamError::Backend(_))
    ));
    assert!(err.to_string().contains("authority unreachable"));
}
