//! Known values, shape arithmetic, errors and numerical gradient checks of the image layers.
//!
//! # Why the gradient checks can ask for (near) equality
//!
//! The loss is `L = sum(G .* layer(x))` (so `dL/dY = G`), accumulated in f64, and the
//! gradient is checked against central differences `(L(v + h) - L(v - h)) / 2h` for every
//! entry `v` of the input, the kernels and the bias. Convolution and average pooling are
//! linear in each of these (the convolution is bilinear in input and kernels), and max pooling
//! is linear as long as no window's maximum changes, so the central difference has no
//! truncation error at all; only float rounding remains. The checks use dyadic values
//! `k/16`, `|k| <= 16`, and `h = 1/4`: every product and sum of the forward and backward
//! passes is then a multiple of `2^-12` below `2^6`, which f32 holds exactly, so the analytic
//! and numerical gradients are equal and the tolerance is `1e-9`. Two cases cannot be exact:
//! average pooling with `r = 3` divides by 9 (one rounding of relative size `2^-24` per output,
//! at most 4 outputs touched by a pixel, `|G| <= 1`, so the error is below
//! `4 * 2 * 2^-24 * 2 / (2h) = 1e-6`, tolerance `1e-5`), and max pooling, whose inputs are
//! distinct multiples of `1/16` so that `h = 1/64` never changes a maximum.

use ndarray::{array, Array1, Array2};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::activation::Activation;
use crate::init::Init;
use crate::layer::Dense;

const H: f32 = 0.25;
const EXACT: f64 = 1e-9;

fn dyadic(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((rows, cols), |_| rng.gen_range(-16..=16) as f32 / 16.0)
}

fn shape(c: usize, h: usize, w: usize) -> ImageShape {
    ImageShape::new(c, h, w).unwrap()
}

fn loss(y: &Array2<f32>, g: &Array2<f32>) -> f64 {
    y.iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Central differences of `eval` for every entry of `p`.
fn numeric(p: &Array2<f32>, h: f32, eval: impl Fn(&Array2<f32>) -> f64) -> Array2<f64> {
    let mut out = Array2::zeros(p.dim());
    for (idx, o) in out.indexed_iter_mut() {
        let (mut plus, mut minus) = (p.clone(), p.clone());
        plus[idx] += h;
        minus[idx] -= h;
        *o = (eval(&plus) - eval(&minus)) / (2.0 * h as f64);
    }
    out
}

fn assert_close(num: &Array2<f64>, ana: &Array2<f32>, tol: f64, what: &str) {
    assert_eq!(num.dim(), ana.dim(), "{what}");
    for ((idx, &n), &a) in num.indexed_iter().zip(ana) {
        assert!(
            (n - a as f64).abs() <= tol,
            "{what}{idx:?}: numeric {n}, analytic {a}"
        );
    }
}

fn row(v: &Array1<f32>) -> Array2<f32> {
    v.clone().insert_axis(ndarray::Axis(0))
}

fn check_conv(input: ImageShape, out: usize, window: Window, batch: usize, seed: u64) {
    let k = input.channels() * window.size * window.size;
    let w = dyadic(out, k, seed);
    let b = dyadic(1, out, seed + 1).row(0).to_owned();
    let conv = Conv2d::from_parts(input, window, w, b).unwrap();
    let x = dyadic(batch, input.features(), seed + 2);
    let g = dyadic(batch, conv.output_shape().features(), seed + 3);
    let fwd = conv.forward(x.view()).unwrap();
    let (dx, grad) = conv.backward(&fwd.cache, g.view()).unwrap();
    let with = |l: &Conv2d, x: &Array2<f32>| loss(&l.forward(x.view()).unwrap().output, &g);
    let num_x = numeric(&x, H, |xp| with(&conv, xp));
    assert_close(&num_x, &dx, EXACT, "conv dx");
    let num_w = numeric(&conv.w, H, |wp| {
        let mut l = conv.clone();
        l.w.assign(wp);
        with(&l, &x)
    });
    assert_close(&num_w, &grad.dw, EXACT, "conv dw");
    let num_b = numeric(&row(&conv.b), H, |bp| {
        let mut l = conv.clone();
        l.b.assign(&bp.row(0));
        with(&l, &x)
    });
    assert_close(&num_b, &row(&grad.db), EXACT, "conv db");
}

#[test]
fn conv_gradients_match_central_differences() {
    check_conv(shape(2, 7, 6), 3, Window::new(3, 2, 1), 2, 1);
    check_conv(shape(3, 5, 5), 2, Window::new(2, 3, 2), 3, 2);
    check_conv(shape(1, 6, 4), 4, Window::new(4, 1, 0), 2, 3);
    check_conv(shape(2, 4, 5), 2, Window::new(1, 2, 1), 1, 4);
}

fn check_avg(input: ImageShape, size: usize, stride: usize, tol: f64) {
    let pool = AvgPool2d::new(input, size, stride).unwrap();
    let x = dyadic(2, input.features(), 5);
    let g = dyadic(2, pool.output_shape().features(), 6);
    let fwd = pool.forward(x.view()).unwrap();
    let dx = pool.backward(&fwd.cache, g.view()).unwrap();
    let num = numeric(&x, H, |xp| {
        loss(&pool.forward(xp.view()).unwrap().output, &g)
    });
    assert_close(&num, &dx, tol, "average-pool dx");
}

#[test]
fn avg_pool_gradients_match_central_differences() {
    check_avg(shape(2, 4, 6), 2, 2, EXACT);
    check_avg(shape(3, 5, 5), 2, 1, EXACT);
    check_avg(shape(2, 7, 6), 3, 2, 1e-5);
}

fn distinct(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut v: Vec<f32> = (0..rows * cols).map(|k| k as f32 / 16.0 - 4.0).collect();
    v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Array2::from_shape_vec((rows, cols), v).unwrap()
}

fn check_max(input: ImageShape, size: usize, stride: usize) {
    let pool = MaxPool2d::new(input, size, stride).unwrap();
    let x = distinct(2, input.features(), 7);
    let g = dyadic(2, pool.output_shape().features(), 8);
    let fwd = pool.forward(x.view()).unwrap();
    let dx = pool.backward(&fwd.cache, g.view()).unwrap();
    let num = numeric(&x, 1.0 / 64.0, |xp| {
        loss(&pool.forward(xp.view()).unwrap().output, &g)
    });
    assert_close(&num, &dx, EXACT, "max-pool dx");
}

#[test]
fn max_pool_gradients_match_central_differences() {
    check_max(shape(2, 4, 6), 2, 2);
    check_max(shape(2, 5, 5), 3, 2);
    check_max(shape(1, 7, 5), 2, 3);
}

#[test]
fn conv_known_values_one_channel() {
    // 3x3 image 1..9, kernel [[1, 2], [3, 4]], bias 0.5, stride 1, no padding.
    let x = array![[1.0_f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]];
    let w = array![[1.0_f32, 2.0, 3.0, 4.0]];
    let conv = Conv2d::from_parts(shape(1, 3, 3), Window::new(2, 1, 0), w, array![0.5]).unwrap();
    let y = conv.forward(x.view()).unwrap().output;
    // 1+4+12+20 = 37, 2+6+15+24 = 47, 4+10+21+32 = 67, 5+12+24+36 = 77
    assert_eq!(y, array![[37.5_f32, 47.5, 67.5, 77.5]]);
    assert_eq!(conv.output_shape(), shape(1, 2, 2));
}

#[test]
fn conv_padding_and_stride_known_values() {
    let x = array![[1.0_f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]];
    let ones = Array2::ones((1, 9));
    let same = Conv2d::from_parts(
        shape(1, 3, 3),
        Window::new(3, 1, 1),
        ones.clone(),
        array![0.0],
    )
    .unwrap();
    // Sums of the 3x3 neighbourhoods with zeros outside the image.
    let expected = array![[12.0_f32, 21.0, 16.0, 27.0, 45.0, 33.0, 24.0, 39.0, 28.0]];
    assert_eq!(same.forward(x.view()).unwrap().output, expected);
    let strided =
        Conv2d::from_parts(shape(1, 3, 3), Window::new(3, 2, 1), ones, array![0.0]).unwrap();
    assert_eq!(strided.output_shape(), shape(1, 2, 2));
    let y = strided.forward(x.view()).unwrap().output;
    assert_eq!(y, array![[12.0_f32, 16.0, 24.0, 28.0]]);
}

#[test]
fn conv_channels_are_channel_major() {
    // Two 1x2 channels [1, 2] and [10, 20]; 1x1 kernels: pick channel 1, and the sum.
    let x = array![[1.0_f32, 2.0, 10.0, 20.0]];
    let w = array![[0.0_f32, 1.0], [1.0, 1.0]];
    let conv =
        Conv2d::from_parts(shape(2, 1, 2), Window::new(1, 1, 0), w, array![0.0, 0.0]).unwrap();
    let y = conv.forward(x.view()).unwrap().output;
    assert_eq!(y, array![[10.0_f32, 20.0, 11.0, 22.0]]);
}

#[test]
fn max_pool_picks_the_maximum_and_routes_the_gradient_to_it() {
    let x = array![[
        1.0_f32, 5.0, 2.0, 0.0, //
        3.0, 4.0, 8.0, 1.0, //
        0.0, 0.0, -1.0, -3.0, //
        9.0, 0.0, -2.0, -4.0
    ]];
    let pool = MaxPool2d::new(shape(1, 4, 4), 2, 2).unwrap();
    let fwd = pool.forward(x.view()).unwrap();
    assert_eq!(fwd.output, array![[5.0_f32, 8.0, 9.0, -1.0]]);
    let dx = pool
        .backward(&fwd.cache, array![[1.0_f32, 2.0, 3.0, 4.0]].view())
        .unwrap();
    let mut expected = Array2::zeros((1, 16));
    for (i, v) in [(1, 1.0), (6, 2.0), (12, 3.0), (10, 4.0)] {
        expected[[0, i]] = v;
    }
    assert_eq!(dx, expected);
}

#[test]
fn max_pool_overlapping_windows_add_up() {
    // A 3x3 image whose centre is the maximum of all four 2x2 windows (stride 1).
    let mut x = Array2::zeros((1, 9));
    x[[0, 4]] = 5.0;
    let pool = MaxPool2d::new(shape(1, 3, 3), 2, 1).unwrap();
    let fwd = pool.forward(x.view()).unwrap();
    assert_eq!(fwd.output, array![[5.0_f32, 5.0, 5.0, 5.0]]);
    let dx = pool
        .backward(&fwd.cache, array![[1.0_f32, 1.0, 1.0, 1.0]].view())
        .unwrap();
    assert_eq!(dx[[0, 4]], 4.0);
    assert_eq!(dx.sum(), 4.0);
}

#[test]
fn avg_pool_known_values() {
    let x = array![[
        1.0_f32, 3.0, 2.0, 2.0, //
        5.0, 7.0, 0.0, 4.0, //
        -1.0, 1.0, 8.0, 8.0, //
        1.0, 3.0, 8.0, 8.0
    ]];
    let pool = AvgPool2d::new(shape(1, 4, 4), 2, 2).unwrap();
    let fwd = pool.forward(x.view()).unwrap();
    assert_eq!(fwd.output, array![[4.0_f32, 2.0, 1.0, 8.0]]);
    let dx = pool
        .backward(&fwd.cache, array![[4.0_f32, 0.0, 0.0, 8.0]].view())
        .unwrap();
    let expected = array![[
        1.0_f32, 1.0, 0.0, 0.0, //
        1.0, 1.0, 0.0, 0.0, //
        0.0, 0.0, 2.0, 2.0, //
        0.0, 0.0, 2.0, 2.0
    ]];
    assert_eq!(dx, expected);
}

#[test]
fn flatten_is_the_identity() {
    let f = Flatten::new(shape(2, 2, 3));
    let x = dyadic(3, 12, 9);
    assert_eq!(f.forward(x.view()).unwrap(), x);
    assert_eq!(f.backward(x.view()).unwrap(), x);
    assert_eq!(f.output_shape(), shape(12, 1, 1));
    assert!(f.forward(dyadic(3, 11, 9).view()).is_err());
}

#[test]
fn lenet5_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let layers = lenet5_features(Activation::Relu, &mut rng).unwrap();
    let shapes: Vec<String> = layers
        .iter()
        .filter(|l| !matches!(l, Layer::Activation(_)))
        .map(|l| l.output_shape().unwrap().to_string())
        .collect();
    let expected = [
        "6x28x28", "6x14x14", "16x10x10", "16x5x5", "120x1x1", "120x1x1",
    ];
    assert_eq!(shapes, expected);
    let mut all = layers;
    for (n_in, n_out) in [(120, 84), (84, 10)] {
        all.push(Layer::Dense(Dense::new(
            Init::He.weights(n_out, n_in, &mut rng),
        )));
    }
    assert_eq!(
        check_stack(shape(1, 28, 28), &all).unwrap(),
        shape(10, 1, 1)
    );
    let params: usize = all.iter().map(Layer::num_params).sum();
    // 156 + 2,416 + 48,120 (convolutions) + 10,164 + 850 (dense): LeNet-5's 61,706.
    assert_eq!(params, 61_706);
    let x = dyadic(2, 784, 10);
    let (y, caches) = forward_stack(&all, x.view()).unwrap();
    assert_eq!(y.dim(), (2, 10));
    let (dx, grads) = backward_stack(&all, &caches, y.view()).unwrap();
    assert_eq!(dx.dim(), (2, 784));
    assert_eq!(grads.iter().filter(|g| g.is_some()).count(), 5);
}

#[test]
fn a_linear_stack_back_propagates_exactly() {
    // conv -> avgpool -> flatten -> dense: linear, dyadic, so exact like the layers alone.
    let input = shape(2, 6, 6);
    let conv = Conv2d::from_parts(
        input,
        Window::new(3, 1, 1),
        dyadic(3, 18, 11),
        Array1::zeros(3),
    )
    .unwrap();
    let pool = AvgPool2d::new(conv.output_shape(), 2, 2).unwrap();
    let flat = Flatten::new(pool.output_shape());
    let dense = Dense::new(dyadic(4, 27, 12));
    let layers = vec![
        Layer::Conv(conv),
        Layer::AvgPool(pool),
        Layer::Flatten(flat),
        Layer::Dense(dense),
    ];
    assert_eq!(check_stack(input, &layers).unwrap(), shape(4, 1, 1));
    let x = dyadic(2, 72, 13);
    let g = dyadic(2, 4, 14);
    let (_, caches) = forward_stack(&layers, x.view()).unwrap();
    let (dx, grads) = backward_stack(&layers, &caches, g.view()).unwrap();
    let num = numeric(&x, H, |xp| {
        loss(&forward_stack(&layers, xp.view()).unwrap().0, &g)
    });
    assert_close(&num, &dx, EXACT, "stack dx");
    assert!(grads[0].is_some() && grads[1].is_none() && grads[3].is_some());
}

#[test]
fn elementwise_back_propagates_the_derivative() {
    let act = Elementwise::new(Activation::Tanh, shape(1, 2, 2));
    let z = array![[0.3_f32, -1.2, 2.0, 0.0]];
    let fwd = act.forward(z.view()).unwrap();
    let d = act
        .backward(&fwd.cache, Array2::ones((1, 4)).view())
        .unwrap();
    for (dv, zv) in d.iter().zip(&z) {
        assert!((dv - (1.0 - zv.tanh().powi(2))).abs() < 1e-6);
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let input = shape(2, 5, 5);
    let mut conv = Conv2d::new(input, 3, Window::new(3, 2, 1), Init::He, &mut rng).unwrap();
    assert!(conv.forward(Array2::zeros((2, 49)).view()).is_err());
    let fwd = conv.forward(Array2::zeros((2, 50)).view()).unwrap();
    assert!(conv
        .backward(&fwd.cache, Array2::zeros((2, 26)).view())
        .is_err());
    assert!(conv
        .backward(&fwd.cache, Array2::zeros((3, 27)).view())
        .is_err());
    let window = |r, s, p| Window::new(r, s, p);
    assert!(Conv2d::new(input, 3, window(8, 1, 1), Init::He, &mut rng).is_err());
    assert!(Conv2d::new(input, 3, window(3, 0, 1), Init::He, &mut rng).is_err());
    assert!(Conv2d::new(input, 0, window(3, 1, 1), Init::He, &mut rng).is_err());
    assert!(Conv2d::from_parts(
        input,
        window(3, 1, 0),
        Array2::zeros((3, 17)),
        Array1::zeros(3)
    )
    .is_err());
    assert!(Conv2d::from_parts(
        input,
        window(3, 1, 0),
        Array2::zeros((3, 18)),
        Array1::zeros(2)
    )
    .is_err());
    conv.w = Array2::zeros((3, 5));
    assert!(conv.forward(Array2::zeros((2, 50)).view()).is_err());
    assert!(MaxPool2d::new(input, 6, 1).is_err());
    assert!(AvgPool2d::new(input, 2, 0).is_err());
    assert!(ImageShape::new(0, 3, 3).is_err());
    assert!(ImageShape::new(usize::MAX, 2, 2).is_err());
    let pool = MaxPool2d::new(input, 2, 2).unwrap();
    let fwd = pool.forward(Array2::zeros((1, 50)).view()).unwrap();
    assert!(pool
        .backward(&fwd.cache, Array2::zeros((1, 9)).view())
        .is_err());
    assert!(pool.forward(Array2::zeros((1, 25)).view()).is_err());
    // A cache of the wrong kind, and a stack that does not fit.
    let layers = [Layer::MaxPool(pool), Layer::Flatten(Flatten::new(input))];
    let (_, caches) = forward_stack(&layers[..1], Array2::zeros((1, 50)).view()).unwrap();
    assert!(layers[1]
        .backward(&caches[0], Array2::zeros((1, 50)).view())
        .is_err());
    assert!(check_stack(input, &layers).is_err());
    let dense = Layer::Dense(Dense::new(Array2::zeros((2, 3))));
    assert!(dense.forward(Array2::zeros((1, 4)).view()).is_err());
}
