//! Property tests of the quantizer and of the exact integer products.
#![allow(clippy::unwrap_used)]

use ndarray::Array2;
use nn::first_layer::{exact_int_matmul, qmax, Quantizer};
use proptest::prelude::*;

fn matrix(rows: usize, cols: usize, range: f32) -> impl Strategy<Value = Array2<f32>> {
    prop::collection::vec(-range..range, rows * cols)
        .prop_map(move |v| Array2::from_shape_vec((rows, cols), v).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn weights_are_within_half_a_step(w in matrix(5, 9, 3.0), bits in 3u32..17) {
        let q = Quantizer::new(bits);
        let m = q.quantize_weights(w.view(), 0).unwrap();
        let qm = qmax(bits).unwrap();
        for (j, row) in w.rows().into_iter().enumerate() {
            let s = m.scales[j];
            let mut top = 0;
            for (i, &v) in row.iter().enumerate() {
                let x = m.values[[j, i]];
                prop_assert!(x.abs() <= qm);
                top = top.max(x.abs());
                prop_assert!((v as f64 - x as f64 / s).abs() <= 0.5 / s + 1e-9);
            }
            if row.iter().any(|v| *v != 0.0) {
                prop_assert_eq!(top, qm);
            }
        }
    }

    #[test]
    fn stochastic_deltas_are_within_one_step(d in matrix(6, 4, 0.1), seed in any::<u64>()) {
        let q = Quantizer::new(8).stochastic(seed);
        let m = q.quantize_deltas(d.view(), 3).unwrap();
        prop_assert_eq!(&m, &q.quantize_deltas(d.view(), 3).unwrap());
        for ((b, j), &v) in d.indexed_iter() {
            let t = m.scales[j];
            let x = m.values[[b, j]];
            prop_assert!(x.abs() <= 127);
            prop_assert!((v as f64 - x as f64 / t).abs() < 1.0 / t + 1e-9);
        }
    }

    #[test]
    fn exact_products_of_pixel_sized_operands_match_i128(
        x in prop::collection::vec(0i64..=255, 3 * 785),
        w in prop::collection::vec(-127i64..=127, 785 * 2),
        bits in 2u32..12,
    ) {
        // Different operand ranges exercise 1 to 4 f32 chunks and the f64 path.
        let lim = (1i64 << (bits - 1)) - 1;
        let x = Array2::from_shape_vec((3, 785), x).unwrap();
        let w = Array2::from_shape_vec((785, 2), w).unwrap().mapv(|v| v.clamp(-lim, lim));
        let r = exact_int_matmul(x.view(), w.view()).unwrap();
        for i in 0..3 {
            for j in 0..2 {
                let e: i128 = (0..785).map(|k| x[[i, k]] as i128 * w[[k, j]] as i128).sum();
                prop_assert_eq!(r[[i, j]] as i128, e);
            }
        }
    }

    #[test]
    fn exact_products_match_i128(
        a in prop::collection::vec(-(1i64 << 40)..(1i64 << 40), 12),
        b in prop::collection::vec(-(1i64 << 20)..(1i64 << 20), 8),
        small in any::<bool>(),
    ) {
        let shrink = |v: i64| if small { v >> 30 } else { v };
        let a = Array2::from_shape_vec((3, 4), a.into_iter().map(shrink).collect()).unwrap();
        let b = Array2::from_shape_vec((4, 2), b).unwrap();
        let r = exact_int_matmul(a.view(), b.view()).unwrap();
        for i in 0..3 {
            for j in 0..2 {
                let e: i128 = (0..4).map(|k| a[[i, k]] as i128 * b[[k, j]] as i128).sum();
                prop_assert_eq!(r[[i, j]] as i128, e);
            }
        }
    }
}
