//! Finite-difference checks of the whole back-propagation, through the first-layer seam.
#![allow(clippy::unwrap_used)]

mod common;

use ndarray::Array2;
use nn::loss::{cross_entropy_per_sample, one_hot};
use nn::train::compute_gradients;
use nn::{Activation, Dataset, Model, ModelSpec, PlainFloat};

/// Mean cross-entropy of `model` on `data`, computed in the clear in f64-accumulated f32.
fn loss(model: &Model, data: &Dataset) -> f64 {
    let z = model.logits(data.normalized().view()).unwrap();
    let y = one_hot(&data.labels, model.spec().n_out());
    let ce = cross_entropy_per_sample(z.view(), y.view());
    ce.iter().map(|&v| v as f64).sum::<f64>() / data.len() as f64
}

fn check_model(spec: &str, act: Activation, seed: u64) {
    let data = common::synthetic(7, 2, 3, 3, seed);
    let spec = ModelSpec::parse(spec, act).unwrap();
    let mut model = Model::new(spec, seed).unwrap();
    // Non-zero biases keep ReLU pre-activations away from the kink at exactly 0 (a sample
    // whose hidden units are all off would otherwise sit on it with a zero bias).
    for layer in model.layers_mut() {
        for (j, b) in layer.b.iter_mut().enumerate() {
            *b = 0.1 - 0.03 * j as f32;
        }
    }
    let mut fl = PlainFloat::from_dataset(data.clone(), 7, false).unwrap();
    let (grads, stats) = compute_gradients(&model, &mut fl, 0).unwrap();
    assert!((stats.loss_sum / 7.0 - loss(&model, &data)).abs() < 1e-4);

    let h = 5e-3f32;
    let mut worst = 0f64;
    for (k, g) in grads.layers.iter().enumerate() {
        let layer = &model.layers()[k];
        let mut numeric_w = Array2::<f64>::zeros(layer.w.dim());
        for ((r, c), out) in numeric_w.indexed_iter_mut() {
            let mut p = model.clone();
            p.layers_mut()[k].w[[r, c]] += h;
            let mut m = model.clone();
            m.layers_mut()[k].w[[r, c]] -= h;
            *out = (loss(&p, &data) - loss(&m, &data)) / (2.0 * h as f64);
        }
        for (&num, &ana) in numeric_w.iter().zip(g.dw.iter()) {
            let err = (num - ana as f64).abs();
            worst = worst.max(err);
            assert!(
                err < 2e-3 + 2e-2 * num.abs(),
                "{act} layer {k} weight: numeric {num}, analytic {ana}"
            );
        }
        for j in 0..layer.b.len() {
            let mut p = model.clone();
            p.layers_mut()[k].b[j] += h;
            let mut m = model.clone();
            m.layers_mut()[k].b[j] -= h;
            let num = (loss(&p, &data) - loss(&m, &data)) / (2.0 * h as f64);
            let ana = g.db[j] as f64;
            assert!(
                (num - ana).abs() < 2e-3 + 2e-2 * num.abs(),
                "{act} layer {k} bias {j}: numeric {num}, analytic {ana}"
            );
        }
    }
    assert!(worst < 2e-3, "{act}: worst error {worst}");
}

#[test]
fn backprop_matches_finite_differences_for_every_activation() {
    for act in Activation::ALL {
        check_model("6-5-4-3", act, 11);
        check_model("6-4-3", act, 12);
    }
}

#[test]
fn single_layer_model_matches_finite_differences() {
    check_model("6-3", Activation::Relu, 13);
}
