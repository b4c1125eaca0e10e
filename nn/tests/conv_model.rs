//! Models whose first layer is a convolution: back-propagation against finite differences,
//! the seam's integer products against a direct convolution, and training.
#![allow(clippy::unwrap_used)]

mod common;

use ndarray::{Array2, ArrayView2};
use nn::first_layer::{IntegerProducts, PlainIntegers, Quantized, Quantizer};
use nn::loss::{cross_entropy_per_sample, one_hot};
use nn::train::{compute_gradients, FitConfig, TrainError};
use nn::{Activation, Dataset, Model, ModelSpec, Optimizer, PlainFloat};

fn conv_model(spec: &str, act: Activation, data: &Dataset, seed: u64) -> Model {
    let spec = ModelSpec::for_info(spec, act, &data.info).unwrap();
    assert!(spec.is_conv(), "{spec}");
    let mut model = Model::new(spec, seed).unwrap();
    // Non-zero biases keep ReLU pre-activations off the kink at 0.
    for p in model.params_mut() {
        for (j, b) in p.b.iter_mut().enumerate() {
            *b = 0.1 - 0.03 * j as f32;
        }
    }
    model
}

fn loss(model: &Model, data: &Dataset) -> f64 {
    let z = model.logits(data.normalized().view()).unwrap();
    let y = one_hot(&data.labels, model.spec().n_out());
    let ce = cross_entropy_per_sample(z.view(), y.view());
    ce.iter().map(|&v| v as f64).sum::<f64>() / data.len() as f64
}

/// Central differences of the loss in every parameter of every layer, against the gradients
/// of the training step (the first convolution's through the seam's patches).
fn check_gradients(spec: &str, act: Activation, seed: u64) {
    let data = common::synthetic(5, 6, 6, 3, seed);
    let model = conv_model(spec, act, &data, seed);
    let mut fl = PlainFloat::from_dataset(data.clone(), 5, false)
        .unwrap()
        .with_patches(model.first_geometry())
        .unwrap();
    let (grads, stats) = compute_gradients(&model, &mut fl, 0).unwrap();
    assert!((stats.loss_sum / 5.0 - loss(&model, &data)).abs() < 1e-4);
    let n_params = model.clone().params_mut().len();
    assert_eq!(grads.layers.len(), n_params, "{spec}");
    let h = 5e-3f32;
    let numeric = |k: usize, which: usize, idx: usize| {
        let bump = |m: &mut Model, by: f32| {
            let mut p = m.params_mut();
            if which == 0 {
                p[k].w.as_slice_mut().unwrap()[idx] += by;
            } else {
                p[k].b[idx] += by;
            }
        };
        let (mut up, mut down) = (model.clone(), model.clone());
        bump(&mut up, h);
        bump(&mut down, -h);
        (loss(&up, &data) - loss(&down, &data)) / (2.0 * h as f64)
    };
    for (k, g) in grads.layers.iter().enumerate() {
        let analytic = [g.dw.as_slice().unwrap(), g.db.as_slice().unwrap()];
        for (which, values) in analytic.iter().enumerate() {
            for (idx, &ana) in values.iter().enumerate() {
                let num = numeric(k, which, idx);
                assert!(
                    (num - ana as f64).abs() < 2e-3 + 2e-2 * num.abs(),
                    "{spec} {act}: layer {k} {} {idx}: numeric {num}, analytic {ana}",
                    ["weight", "bias"][which]
                );
            }
        }
    }
}

#[test]
fn conv_backprop_matches_finite_differences() {
    check_gradients("conv3x2p1-avgpool2-4", Activation::Tanh, 3);
    check_gradients("conv3x2-conv2x3s2-avgpool1-5", Activation::Sigmoid, 4);
    check_gradients("conv3x3s2p1-4", Activation::Relu, 5);
    // No dense hidden layer: the classes read the flattened features directly.
    check_gradients("conv2x2s2-avgpool3", Activation::Tanh, 6);
}

/// Max pooling has kinks wherever two values of a window swap, which central differences in
/// single weights step over on most seeds; along the gradient the kinks average out: the
/// directional derivative `(L(θ + εg) - L(θ - εg)) / 2ε` must be `|g|²`.
#[test]
fn max_pool_models_descend_along_their_gradient() {
    for (spec, seed) in [
        ("conv3x2p1-maxpool2-4", 10),
        ("conv3x3-maxpool2s1-conv2x2-5", 11),
    ] {
        let data = common::synthetic(5, 6, 6, 3, seed);
        let model = conv_model(spec, Activation::Tanh, &data, seed);
        let mut fl = PlainFloat::from_dataset(data.clone(), 5, false)
            .unwrap()
            .with_patches(model.first_geometry())
            .unwrap();
        let (grads, _) = compute_gradients(&model, &mut fl, 0).unwrap();
        let norm2: f64 = grads
            .layers
            .iter()
            .flat_map(|g| g.dw.iter().chain(g.db.iter()))
            .map(|&v| (v as f64).powi(2))
            .sum();
        let eps = 1e-2 / norm2.sqrt() as f32;
        let step = |by: f32| {
            let mut m = model.clone();
            for (p, g) in m.params_mut().into_iter().zip(&grads.layers) {
                p.w.scaled_add(by, &g.dw);
                p.b.scaled_add(by, &g.db);
            }
            loss(&m, &data)
        };
        let directional = (step(eps) - step(-eps)) / (2.0 * eps as f64);
        assert!(
            (directional - norm2).abs() < 0.05 * norm2,
            "{spec}: directional derivative {directional}, |g|^2 {norm2}"
        );
        assert!(step(-eps) < loss(&model, &data));
    }
}

/// `Σ_{c,i,j} w[o, (c,i,j)] x[c, oh*s+i-p, ow*s+j-p]` (zero outside) plus the bias weight
/// times the bias feature, by loops over the image.
fn direct_conv(
    x: ArrayView2<i64>,
    w: ArrayView2<i64>,
    (c, h, wd): (usize, usize, usize),
    (r, s, p): (usize, usize, usize),
    bias_input: i64,
) -> Array2<i64> {
    let (oh, ow) = ((h + 2 * p - r) / s + 1, (wd + 2 * p - r) / s + 1);
    let mut out = Array2::zeros((x.nrows() * oh * ow, w.nrows()));
    for b in 0..x.nrows() {
        for y0 in 0..oh {
            for x0 in 0..ow {
                for o in 0..w.nrows() {
                    let mut acc = w[[o, c * r * r]] * bias_input;
                    for ch in 0..c {
                        for i in 0..r {
                            for j in 0..r {
                                let (yy, xx) = (
                                    (y0 * s + i) as i64 - p as i64,
                                    (x0 * s + j) as i64 - p as i64,
                                );
                                if yy < 0 || xx < 0 || yy >= h as i64 || xx >= wd as i64 {
                                    continue;
                                }
                                let pix = x[[b, (ch * h + yy as usize) * wd + xx as usize]];
                                acc += w[[o, (ch * r + i) * r + j]] * pix;
                            }
                        }
                    }
                    out[[(b * oh + y0) * ow + x0, o]] = acc;
                }
            }
        }
    }
    out
}

#[test]
fn patch_products_equal_a_direct_convolution() {
    let data = common::synthetic(4, 7, 7, 3, 9);
    let model = conv_model("conv3x5s2p1-6", Activation::Relu, &data, 1);
    let g = *model.first_geometry().unwrap();
    let mut p = PlainIntegers::from_dataset(data.clone(), 4, false)
        .unwrap()
        .with_patches(Some(&g))
        .unwrap();
    let k = g.patch_len();
    let w = Array2::from_shape_fn((5, k + 1), |(o, i)| (o as i64 * 7 + i as i64 * 3) % 11 - 5);
    let z = p.forward_int(0, w.view()).unwrap();
    let x = data.values.mapv(i64::from);
    let want = direct_conv(x.view(), w.view(), (1, 7, 7), (3, 2, 1), 255);
    assert_eq!(z, want);
    // The backward product is the adjoint: <delta, X_p W^T> = <delta^T X_p, W>.
    let delta = Array2::from_shape_fn(z.dim(), |(r, o)| (r as i64 * 5 + o as i64) % 7 - 3);
    let g_int = p.backward_int(0, delta.view()).unwrap();
    let lhs: i64 = (&delta * &z).sum();
    let rhs: i64 = (&g_int * &w).sum();
    assert_eq!(lhs, rhs);
    assert_eq!(g_int.dim(), (5, k + 1));
}

#[test]
fn a_dense_first_layer_cannot_train_a_conv_model() {
    let data = common::synthetic(4, 6, 6, 3, 2);
    let model = conv_model("conv3x2-4", Activation::Relu, &data, 1);
    let mut dense = PlainFloat::from_dataset(data.clone(), 4, false).unwrap();
    let e = compute_gradients(&model, &mut dense, 0).unwrap_err();
    assert!(matches!(e, TrainError::State(_)), "{e}");
    // And the other way round.
    let mlp = Model::new(
        ModelSpec::for_info("8", Activation::Relu, &data.info).unwrap(),
        1,
    )
    .unwrap();
    let mut patches = PlainFloat::from_dataset(data, 4, false)
        .unwrap()
        .with_patches(model.first_geometry())
        .unwrap();
    assert!(compute_gradients(&mlp, &mut patches, 0).is_err());
}

#[test]
fn quantized_conv_model_learns() {
    let train = common::synthetic(240, 8, 8, 3, 21);
    let test = common::synthetic(120, 8, 8, 3, 22);
    let mut model = conv_model("conv3x4p1-maxpool2-16", Activation::Relu, &train, 2);
    let inner = PlainIntegers::from_dataset(train, 16, true)
        .unwrap()
        .with_patches(model.first_geometry())
        .unwrap();
    let mut fl = Quantized::new(inner, Quantizer::new(8)).unwrap();
    let mut opt = Optimizer::adam(0.01);
    let cfg = FitConfig {
        epochs: 6,
        ..FitConfig::default()
    };
    let hist = nn::fit(&mut model, &mut fl, &mut opt, Some(&test), &cfg).unwrap();
    let (first, last) = (&hist[0], &hist[hist.len() - 1]);
    assert!(last.train_loss < first.train_loss * 0.7, "{hist:?}");
    assert!(last.test_accuracy.unwrap() > 0.8, "{hist:?}");
    // The file keeps the image layers.
    let back = Model::from_bytes(&model.to_bytes().unwrap()).unwrap();
    assert_eq!(back, model);
    assert_eq!(
        back.logits(test.normalized().view()).unwrap(),
        model.logits(test.normalized().view()).unwrap()
    );
}
