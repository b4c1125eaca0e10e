//! Time of one forward and backward pass of LeNet-5 in the clear, and the epoch it implies.
//!
//! Run in release: `cargo test --release -p nn --test lenet5_timing -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, Axis};
use ndarray_rand::rand_distr::Uniform;
use ndarray_rand::RandomExt;
use nn::init::Init;
use nn::layers::{backward_stack, forward_stack, lenet5_features, Layer};
use nn::loss::softmax;
use nn::Activation;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 480;
const EPOCH_IMAGES: usize = 60_000;

/// The dense part `120-84-10` with ReLU, in plain ndarray: forward, softmax cross-entropy
/// error against `labels`, backward. Returns the gradient at its input (B, 120).
fn dense_head(
    w1: &Array2<f32>,
    w2: &Array2<f32>,
    x: &Array2<f32>,
    labels: &[usize],
) -> Array2<f32> {
    let z1 = x.dot(&w1.t());
    let a1 = z1.mapv(|v| v.max(0.0));
    let mut e = softmax(a1.dot(&w2.t()).view());
    for (mut row, &y) in e.rows_mut().into_iter().zip(labels) {
        row[y] -= 1.0;
    }
    let d2 = e / x.nrows() as f32;
    let _gw2: Array2<f32> = d2.t().dot(&a1);
    let _gb2: Array1<f32> = d2.sum_axis(Axis(0));
    let d1 = d2.dot(w2) * &z1.mapv(|v| if v > 0.0 { 1.0 } else { 0.0 });
    let _gw1: Array2<f32> = d1.t().dot(x);
    d1.dot(w1)
}

fn one_pass(
    layers: &[Layer],
    w1: &Array2<f32>,
    w2: &Array2<f32>,
    x: &Array2<f32>,
    labels: &[usize],
) -> Duration {
    let start = Instant::now();
    let (features, caches) = forward_stack(layers, x.view()).unwrap();
    let d = dense_head(w1, w2, &features, labels);
    let (dx, grads) = backward_stack(layers, &caches, d.view()).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(dx.dim(), (BATCH, 784));
    assert_eq!(grads.iter().flatten().count(), 3);
    elapsed
}

/// Forward and backward time of every layer, one run.
fn breakdown(layers: &[Layer], x: &Array2<f32>) {
    let mut a = x.clone();
    let mut caches = Vec::new();
    let mut forward = Vec::new();
    for layer in layers {
        let start = Instant::now();
        let (out, cache) = layer.forward(a.view()).unwrap();
        forward.push(start.elapsed());
        caches.push(cache);
        a = out;
    }
    let mut d = a;
    for (i, layer) in layers.iter().enumerate().rev() {
        let start = Instant::now();
        let (dx, _) = layer.backward(&caches[i], d.view()).unwrap();
        let back = start.elapsed();
        println!(
            "  {:>12} -> {:>8}: forward {:6.1} ms, backward {:6.1} ms",
            layer.kind(),
            layer.output_shape().unwrap().to_string(),
            forward[i].as_secs_f64() * 1e3,
            back.as_secs_f64() * 1e3
        );
        d = dx;
    }
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn lenet5_forward_backward_time() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let layers = lenet5_features(Activation::Relu, &mut rng).unwrap();
    let w1 = Init::He.weights(84, 120, &mut rng);
    let w2 = Init::Xavier.weights(10, 84, &mut rng);
    let x = Array2::random_using((BATCH, 784), Uniform::new(0.0_f32, 1.0), &mut rng);
    let labels: Vec<usize> = (0..BATCH).map(|i| i % 10).collect();
    one_pass(&layers, &w1, &w2, &x, &labels); // warm-up
    let mut times: Vec<Duration> = (0..5)
        .map(|_| one_pass(&layers, &w1, &w2, &x, &labels))
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    let batches = EPOCH_IMAGES / BATCH;
    println!(
        "LeNet-5 forward+backward, batch {BATCH}: median {:.1} ms (min {:.1} ms) over 5 runs; \
         estimated plain epoch on {EPOCH_IMAGES} images ({batches} batches): {:.1} s",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        median.as_secs_f64() * batches as f64
    );
    println!("per layer (last to first):");
    breakdown(&layers, &x);
}
