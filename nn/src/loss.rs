//! Output functions and losses, averaged over the batch (rows).
//!
//! Softmax with cross-entropy, for logits `z` (B, K) and targets `y` (B, K) whose rows sum to 1:
//!
//! ```text
//! a_bk   = exp(z_bk - m_b) / sum_k' exp(z_bk' - m_b),      m_b = max_k z_bk
//! log a_bk = z_bk - m_b - ln sum_k' exp(z_bk' - m_b)        (log-sum-exp, never overflows)
//! L      = -(1/B) sum_b sum_k y_bk log a_bk
//! dL/dz  = (a - y) / B
//! ```
//!
//! Mean squared error over all `N = B * K` entries: `L = (1/N) sum (p - t)^2`,
//! `dL/dp = 2 (p - t) / N`.

use ndarray::{Array1, Array2, ArrayView2, Axis, Zip};

/// Row-wise softmax, stable for any finite logits (the row maximum is subtracted first).
pub fn softmax(z: ArrayView2<f32>) -> Array2<f32> {
    let mut out = z.to_owned();
    for mut row in out.rows_mut() {
        let m = row.fold(f32::NEG_INFINITY, |acc, &v| acc.max(v));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    out
}

/// Row-wise log-softmax `z - logsumexp(z)`, stable for any finite logits.
pub fn log_softmax(z: ArrayView2<f32>) -> Array2<f32> {
    let mut out = z.to_owned();
    for mut row in out.rows_mut() {
        let m = row.fold(f32::NEG_INFINITY, |acc, &v| acc.max(v));
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
        row.mapv_inplace(|v| v - lse);
    }
    out
}

/// Per-sample cross-entropy `-sum_k y_bk log softmax(z)_bk`, computed from logits (stable).
pub fn cross_entropy_per_sample(logits: ArrayView2<f32>, targets: ArrayView2<f32>) -> Array1<f32> {
    let logp = log_softmax(logits);
    (&logp * &targets).sum_axis(Axis(1)).mapv(|v| -v)
}

/// Softmax cross-entropy averaged over the batch, and its gradient `(softmax(z) - y) / B`
/// with respect to the logits.
pub fn softmax_cross_entropy(
    logits: ArrayView2<f32>,
    targets: ArrayView2<f32>,
) -> (f32, Array2<f32>) {
    let b = logits.nrows().max(1) as f32;
    let loss = cross_entropy_per_sample(logits, targets).sum() / b;
    let mut grad = softmax(logits);
    Zip::from(&mut grad)
        .and(&targets)
        .for_each(|g, &y| *g = (*g - y) / b);
    (loss, grad)
}

/// Mean squared error over all entries, and its gradient `2 (p - t) / N` with respect to `p`.
pub fn mse(pred: ArrayView2<f32>, target: ArrayView2<f32>) -> (f32, Array2<f32>) {
    let n = pred.len().max(1) as f32;
    let diff = &pred - &target;
    let loss = diff.iter().map(|d| d * d).sum::<f32>() / n;
    let grad = diff.mapv(|d| 2.0 * d / n);
    (loss, grad)
}

/// One-hot encoding of class labels: row `b` has a 1 in column `labels[b]`.
/// Labels `>= classes` give an all-zero row (callers validate labels beforehand).
pub fn one_hot(labels: &[u8], classes: usize) -> Array2<f32> {
    let mut y = Array2::zeros((labels.len(), classes));
    for (b, &l) in labels.iter().enumerate() {
        if (l as usize) < classes {
            y[[b, l as usize]] = 1.0;
        }
    }
    y
}

/// Index of the largest entry of each row (the first one on ties); 0 for an empty row.
pub fn argmax_rows(m: ArrayView2<f32>) -> Vec<usize> {
    m.rows()
        .into_iter()
        .map(|row| {
            let mut best = 0;
            let mut best_v = f32::NEG_INFINITY;
            for (i, &v) in row.iter().enumerate() {
                if v > best_v {
                    best_v = v;
                    best = i;
                }
            }
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn softmax_rows_sum_to_one_and_are_stable() {
        let z = array![[1000.0_f32, 1000.0, -1000.0], [0.0, 1.0, 2.0]];
        let a = softmax(z.view());
        for row in a.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-6);
            assert!(row.iter().all(|v| v.is_finite()));
        }
        assert!((a[[0, 0]] - 0.5).abs() < 1e-6);
        let ce = cross_entropy_per_sample(z.view(), one_hot(&[2, 2], 3).view());
        assert!(ce.iter().all(|v| v.is_finite()));
        assert!((ce[0] - (2000.0 + 2f32.ln())).abs() < 1e-2);
    }

    #[test]
    fn softmax_cross_entropy_gradient_matches_finite_differences() {
        let z = array![
            [0.3_f32, -1.2, 0.8, 0.1],
            [2.0, 0.5, -0.4, -2.2],
            [0.0, 0.0, 0.1, 0.2]
        ];
        let y = one_hot(&[2, 0, 3], 4);
        let (_, grad) = softmax_cross_entropy(z.view(), y.view());
        let h = 1e-2_f32;
        for idx in [[0usize, 0usize], [0, 2], [1, 1], [2, 3], [2, 0]] {
            let mut zp = z.clone();
            zp[idx] += h;
            let mut zm = z.clone();
            zm[idx] -= h;
            let lp = softmax_cross_entropy(zp.view(), y.view()).0;
            let lm = softmax_cross_entropy(zm.view(), y.view()).0;
            let numeric = (lp - lm) / (2.0 * h);
            assert!(
                (numeric - grad[idx]).abs() < 1e-3,
                "{idx:?}: numeric {numeric} analytic {}",
                grad[idx]
            );
        }
    }

    #[test]
    fn mse_gradient_matches_finite_differences() {
        let p = array![[0.3_f32, -1.2], [2.0, 0.5], [0.0, 0.1]];
        let t = array![[0.0_f32, 1.0], [1.0, 0.0], [0.5, 0.5]];
        let (loss, grad) = mse(p.view(), t.view());
        assert!((loss - (0.09 + 4.84 + 1.0 + 0.25 + 0.25 + 0.16) / 6.0).abs() < 1e-5);
        let h = 1e-2_f32;
        for idx in [[0usize, 0usize], [0, 1], [1, 0], [2, 1]] {
            let mut pp = p.clone();
            pp[idx] += h;
            let mut pm = p.clone();
            pm[idx] -= h;
            let numeric = (mse(pp.view(), t.view()).0 - mse(pm.view(), t.view()).0) / (2.0 * h);
            assert!((numeric - grad[idx]).abs() < 1e-3);
        }
    }

    #[test]
    fn argmax_picks_first_maximum() {
        let m = array![[0.1_f32, 0.7, 0.7], [3.0, 1.0, 2.0]];
        assert_eq!(argmax_rows(m.view()), vec![1, 0]);
    }
}
