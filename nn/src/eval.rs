//! Plaintext evaluation: accuracy, mean cross-entropy and confusion matrix.
//!
//! `accuracy = (1/N) #{b : argmax_k p_bk = y_b}`, `loss = -(1/N) sum_b log p_{b, y_b}`, and
//! `confusion[t][p]` counts the samples of true class `t` predicted as class `p`.

use ndarray::{Array2, Axis, Slice};
use serde::{Deserialize, Serialize};

use crate::data::{normalize, Dataset};
use crate::loss::{argmax_rows, log_softmax};
use crate::model::Model;
use crate::train::TrainError;

/// Samples evaluated per forward pass.
const EVAL_CHUNK: usize = 1000;

/// Result of evaluating a model on a labelled dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of correctly classified samples, in `[0, 1]`.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// `confusion[[t, p]]`: samples of true class `t` predicted as `p`, shape (K, K).
    pub confusion: Array2<u32>,
    /// Number of samples evaluated.
    pub samples: usize,
}

impl Evaluation {
    /// Recall of each class: correct predictions over the class's samples (0 if absent).
    pub fn per_class_accuracy(&self) -> Vec<f64> {
        self.confusion
            .rows()
            .into_iter()
            .enumerate()
            .map(|(t, row)| {
                let total: u64 = row.iter().map(|&v| v as u64).sum();
                if total == 0 {
                    0.0
                } else {
                    row[t] as f64 / total as f64
                }
            })
            .collect()
    }

    /// The confusion matrix as an aligned text table (rows: true class, columns: predicted).
    pub fn confusion_table(&self) -> String {
        let k = self.confusion.ncols();
        let mut out = String::from("true\\pred");
        for p in 0..k {
            out.push_str(&format!("{p:>6}"));
        }
        out.push('\n');
        for (t, row) in self.confusion.rows().into_iter().enumerate() {
            out.push_str(&format!("{t:>9}"));
            for v in row {
                out.push_str(&format!("{v:>6}"));
            }
            out.push('\n');
        }
        out
    }
}

/// Evaluates `model` on `data` in the clear (inputs normalized to `pixel / 255`).
pub fn evaluate(model: &Model, data: &Dataset) -> Result<Evaluation, TrainError> {
    let k = model.spec().n_out();
    data.check_labels(k)?;
    let mut confusion = Array2::<u32>::zeros((k, k));
    let mut correct = 0u64;
    let mut loss = 0f64;
    let mut start = 0;
    while start < data.len() {
        let end = (start + EVAL_CHUNK).min(data.len());
        let x = normalize(
            data.values.slice_axis(Axis(0), Slice::from(start..end)),
            data.info.x_bound,
        );
        let z = model.logits(x.view())?;
        let logp = log_softmax(z.view());
        for (b, pred) in argmax_rows(z.view()).into_iter().enumerate() {
            let t = data.labels[start + b] as usize;
            confusion[[t, pred]] += 1;
            if t == pred {
                correct += 1;
            }
            loss -= logp.index_axis(Axis(0), b)[t] as f64;
        }
        start = end;
    }
    let n = data.len().max(1) as f64;
    Ok(Evaluation {
        accuracy: correct as f64 / n,
        loss: loss / n,
        confusion,
        samples: data.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::model::ModelSpec;
    use ndarray::array;

    #[test]
    fn confusion_by_hand() {
        // One-layer model 2-2: logits = x W^T with W = I, so the brighter pixel wins.
        let spec = ModelSpec::parse("2-2", Activation::Relu).unwrap();
        let mut m = Model::new(spec, 0).unwrap();
        m.layers_mut()[0].w = array![[1.0, 0.0], [0.0, 1.0]];
        m.layers_mut()[0].b = array![0.0, 0.0];
        let images = array![[200u8, 10], [5, 100], [90, 30], [0, 255]];
        let d = Dataset::grey_images(images, vec![0, 1, 1, 1], 1, 2, 2).unwrap();
        let e = evaluate(&m, &d).unwrap();
        assert_eq!(e.confusion, array![[1, 0], [1, 2]]);
        assert_eq!(e.accuracy, 0.75);
        assert_eq!(e.per_class_accuracy(), vec![1.0, 2.0 / 3.0]);
        assert!(e.loss > 0.0);
        assert!(e.confusion_table().contains("true\\pred"));
        let bad = Dataset::grey_images(array![[1u8, 2]], vec![5], 1, 2, 6).unwrap();
        assert!(evaluate(&m, &bad).is_err());
    }
}
