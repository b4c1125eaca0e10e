//! Inference with the first layer's products computed elsewhere: the prediction service's
//! half of the seam.
//!
//! A service that answers encrypted queries holds a trained [`Model`] and quantizes its first
//! layer once, as training does ([`crate::first_layer`], nearest rounding):
//!
//! ```text
//! s_j = Q(bits) / max_i |W1[j,i]|,   w_q[j,i] = round(W1[j,i] s_j)       (the key vectors)
//! z_int[b,j] = (x_int w_q^T)[b,j]                                         (decrypted per query)
//! Z[b,j] = z_int[b,j] / (s_j X),     p = softmax(rest of the network on Z)
//! ```
//!
//! with `x_int` the encoded input and its bias feature `X`. [`QuantizedModel::probabilities`]
//! takes the integers however they were obtained; [`QuantizedModel::plain_integers`]
//! computes them from a clear input, so encrypted and plain inference with the same
//! quantization give bit-identical probabilities.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, DatasetInfo};
use crate::first_layer::{exact_int_matmul, QuantizedMatrix, Quantizer, SeamError};
use crate::loss::{argmax_rows, softmax};
use crate::model::{Model, ModelError};

/// Errors of quantized inference.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The model is inconsistent or the shapes do not match it.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Quantization or an integer product failed.
    #[error(transparent)]
    Seam(#[from] SeamError),
    /// The model file records no dataset description (saved by an old build).
    #[error("the model records no data description; retrain or re-save it with this build")]
    NoData,
    /// The data does not fit the model.
    #[error("the data does not fit the model: {0}")]
    Data(String),
    /// The model's first layer is a convolution, which inference over encrypted inputs does
    /// not compute yet.
    #[error(
        "the model's first layer is a convolution ({0}): inference over encrypted inputs \
         serves dense first layers only so far; score it in the clear with trainer evaluate"
    )]
    Convolution(String),
}

/// One prediction: the most probable class and every class's probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The predicted class (index into the dataset description's classes).
    pub class: usize,
    /// `softmax` of the logits, one per class.
    pub probabilities: Vec<f32>,
}

/// A model whose first layer is quantized for inference over encrypted inputs.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    model: Model,
    info: DatasetInfo,
    quantizer: Quantizer,
    weights: QuantizedMatrix,
}

impl QuantizedModel {
    /// Quantizes the first layer of `model` (with its dataset description) to `bits`-bit
    /// rows with nearest rounding.
    pub fn new(model: Model, bits: u32) -> Result<Self, InferError> {
        model.validate()?;
        if model.spec().is_conv() {
            return Err(InferError::Convolution(model.spec().to_string()));
        }
        let info = model.data().cloned().ok_or(InferError::NoData)?;
        let quantizer = Quantizer::new(bits);
        quantizer.validate()?;
        let weights = quantizer.quantize_weights(model.first_layer_matrix().view(), 0)?;
        Ok(QuantizedModel {
            model,
            info,
            quantizer,
            weights,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The dataset description the model was trained on.
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Bits of the quantized rows.
    pub fn bits(&self) -> u32 {
        self.quantizer.bits_weights
    }

    /// The quantized rows `w_q` (H, n + 1): the vectors whose inner-product keys the service
    /// needs.
    pub fn rows(&self) -> ArrayView2<'_, i64> {
        self.weights.values.view()
    }

    /// The largest `|z_int|` any input in `0..=X` can give: what the discrete log must cover.
    pub fn forward_bound(&self) -> u64 {
        self.quantizer
            .forward_bound(self.info.row_len(), self.info.x_bound)
    }

    /// `z_int = x_int w_q^T` for clear encoded inputs `x_int` (B, n + 1), bias included.
    pub fn plain_integers(&self, x_int: ArrayView2<i64>) -> Result<Array2<i64>, InferError> {
        if x_int.ncols() != self.info.row_len() {
            return Err(InferError::Data(format!(
                "inputs have {} columns, the model's first layer takes {} (features and bias)",
                x_int.ncols(),
                self.info.row_len()
            )));
        }
        Ok(exact_int_matmul(x_int, self.weights.values.t())?)
    }

    /// Class probabilities (B, K) from the first layer's integers `z_int` (B, H).
    pub fn probabilities(&self, z_int: ArrayView2<i64>) -> Result<Array2<f32>, InferError> {
        let z =
            self.quantizer
                .dequantize_forward(z_int, &self.weights.scales, self.info.x_bound)?;
        Ok(softmax(self.model.logits_after_first(z.view())?.view()))
    }

    /// Predictions from the first layer's integers `z_int` (B, H), one per row.
    pub fn predict(&self, z_int: ArrayView2<i64>) -> Result<Vec<Prediction>, InferError> {
        let p = self.probabilities(z_int)?;
        Ok(argmax_rows(p.view())
            .into_iter()
            .zip(p.rows())
            .map(|(class, row)| Prediction {
                class,
                probabilities: row.to_vec(),
            })
            .collect())
    }

    /// Plain quantized inference on a dataset: what the service answers for each of its
    /// samples when they are encrypted.
    pub fn predict_plain(&self, data: &Dataset) -> Result<Vec<Prediction>, InferError> {
        data.info
            .check_fits(&self.info)
            .map_err(|e| InferError::Data(e.to_string()))?;
        let mut out = Vec::with_capacity(data.len());
        for start in (0..data.len()).step_by(PLAIN_CHUNK) {
            let end = (start + PLAIN_CHUNK).min(data.len());
            let z = self.plain_integers(data.augmented(start..end).view())?;
            out.extend(self.predict(z.view())?);
        }
        Ok(out)
    }
}

/// Samples per plain inference pass.
const PLAIN_CHUNK: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::model::ModelSpec;

    fn model() -> (Model, Dataset) {
        let info = DatasetInfo::new(6, 15, 3).expect("info");
        let spec = ModelSpec::parse("6-5-4-3", Activation::Relu).expect("spec");
        let m = Model::new(spec, 3)
            .and_then(|m| m.with_data(info.clone()))
            .expect("data");
        let values = Array2::from_shape_fn((7, 6), |(b, i)| ((b * 7 + i * 3) % 16) as u16);
        let d = Dataset::new(values, vec![0, 1, 2, 0, 1, 2, 0], info).expect("dataset");
        (m, d)
    }

    /// With 16-bit rows the quantized network follows the float one closely, and its
    /// predictions are the argmax of its probabilities.
    #[test]
    fn quantized_inference_tracks_the_float_model() {
        let (m, d) = model();
        let q = QuantizedModel::new(m.clone(), 16).expect("quantize");
        let preds = q.predict_plain(&d).expect("predict");
        let float = m.predict_proba(d.normalized().view()).expect("float");
        for (p, f) in preds.iter().zip(float.rows()) {
            for (a, b) in p.probabilities.iter().zip(f) {
                assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            }
            let best = p
                .probabilities
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| k);
            assert_eq!(Some(p.class), best);
        }
        assert_eq!(q.rows().dim(), (5, 7));
        assert!(q.rows().iter().all(|v| v.unsigned_abs() < (1 << 15)));
    }

    #[test]
    fn wrong_widths_and_missing_descriptions_are_errors() {
        let (m, _) = model();
        let q = QuantizedModel::new(m.clone(), 8).expect("quantize");
        assert!(matches!(
            q.plain_integers(Array2::zeros((1, 6)).view()),
            Err(InferError::Data(_))
        ));
        assert!(matches!(
            q.probabilities(Array2::zeros((1, 4)).view()),
            Err(InferError::Seam(_))
        ));
        let other = Dataset::new(
            Array2::zeros((1, 5)),
            vec![0],
            DatasetInfo::new(5, 15, 3).expect("info"),
        )
        .expect("dataset");
        assert!(matches!(q.predict_plain(&other), Err(InferError::Data(_))));
        let bare = Model::new(m.spec().clone(), 1).expect("model");
        assert!(matches!(
            QuantizedModel::new(bare, 8),
            Err(InferError::NoData)
        ));
        assert!(QuantizedModel::new(m, 1).is_err());
    }
}
