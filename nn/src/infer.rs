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
//! with `x_int` the encoded input and its bias feature `X`.
//!
//! When the first layer is a convolution of `O` kernels at `P` positions, the key vectors
//! are the quantized kernels *placed* on the input: row `r = pos*O + o` has kernel `o`'s
//! entries at the pixels its window covers at position `pos` (none for padding), its bias
//! weight at the bias feature and zeros elsewhere, so that `z_int[b, r]` is the kernel's
//! output at that position. `P*O` rows of `n + 1` entries with at most `K + 1` non-zero
//! each; the scale of row `r` is kernel `o`'s. The plain path computes the same integers over
//! the patches instead ([`crate::first_layer`]).
//!
//! [`QuantizedModel::probabilities`]
//! takes the integers however they were obtained; [`QuantizedModel::plain_integers`]
//! computes them from a clear input, so encrypted and plain inference with the same
//! quantization give bit-identical probabilities.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, DatasetInfo};
use crate::first_layer::{exact_int_matmul, QuantizedMatrix, Quantizer, SeamError};
use crate::layers::{positions_to_channels, Geometry, LayerError, PAD};
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
    /// For a convolutional first layer: its geometry, gather table and the placed kernels.
    conv: Option<Placed>,
}

/// The quantized kernels of a first convolution placed at every position (module doc).
#[derive(Debug, Clone)]
struct Placed {
    geometry: Geometry,
    table: Vec<usize>,
    rows: Array2<i64>,
}

impl Placed {
    fn new(geometry: Geometry, kernels: ArrayView2<i64>) -> Self {
        let table = geometry.table();
        let rows = place(&geometry, &table, kernels);
        Placed {
            geometry,
            table,
            rows,
        }
    }
}

/// The kernels `(O, K + 1)` (bias weight last) placed at every position of `geometry`:
/// `(P*O, n + 1)`, row `pos*O + o` (see the module doc). `None` if a kernel does not have
/// `K + 1` entries. The prediction service and the authority place them the same way.
pub fn place_kernels(geometry: &Geometry, kernels: ArrayView2<i64>) -> Option<Array2<i64>> {
    (kernels.ncols() == geometry.patch_len() + 1)
        .then(|| place(geometry, &geometry.table(), kernels))
}

fn place(geometry: &Geometry, table: &[usize], kernels: ArrayView2<i64>) -> Array2<i64> {
    let (p, k, o) = (geometry.positions(), geometry.patch_len(), kernels.nrows());
    let n = geometry.input().features();
    let mut rows = Array2::zeros((p * o, n + 1));
    for pos in 0..p {
        let window = &table[pos * k..(pos + 1) * k];
        for (kernel, w) in kernels.rows().into_iter().enumerate() {
            let mut row = rows.row_mut(pos * o + kernel);
            for (col, &src) in window.iter().enumerate() {
                if src != PAD {
                    row[src] = w[col];
                }
            }
            row[n] = w[k];
        }
    }
    rows
}

impl QuantizedModel {
    /// Quantizes the first layer of `model` (with its dataset description) to `bits`-bit
    /// rows with nearest rounding.
    pub fn new(model: Model, bits: u32) -> Result<Self, InferError> {
        model.validate()?;
        let info = model.data().cloned().ok_or(InferError::NoData)?;
        let quantizer = Quantizer::new(bits);
        quantizer.validate()?;
        let weights = quantizer.quantize_weights(model.first_layer_matrix().view(), 0)?;
        let conv = model
            .first_geometry()
            .map(|g| Placed::new(*g, weights.values.view()));
        Ok(QuantizedModel {
            model,
            info,
            quantizer,
            weights,
            conv,
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

    /// The quantized rows (R, n + 1): the vectors whose inner-product keys the service needs,
    /// `w_q` for a dense first layer, the placed kernels for a convolution (module doc).
    pub fn rows(&self) -> ArrayView2<'_, i64> {
        match &self.conv {
            Some(c) => c.rows.view(),
            None => self.weights.values.view(),
        }
    }

    /// For a convolutional first layer: its geometry and quantized kernels `(O, K + 1)`,
    /// which [`QuantizedModel::rows`] places at every position.
    pub fn kernels(&self) -> Option<(&Geometry, ArrayView2<'_, i64>)> {
        self.conv
            .as_ref()
            .map(|c| (&c.geometry, self.weights.values.view()))
    }

    /// The largest `|z_int|` any input in `0..=X` can give: what the discrete log must cover.
    pub fn forward_bound(&self) -> u64 {
        let len = self.weights.values.ncols();
        self.quantizer.forward_bound(len, self.info.x_bound)
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
        let Some(c) = &self.conv else {
            return Ok(exact_int_matmul(x_int, self.weights.values.t())?);
        };
        // The same integers as x_int times the placed kernels, over the patches.
        let patches = c.geometry.patches_with_bias(&c.table, x_int);
        let z = exact_int_matmul(patches.view(), self.weights.values.t())?;
        let b = x_int.nrows();
        Ok(z.into_shape_with_order((b, self.rows().nrows()))
            .map_err(|e| ModelError::from(LayerError::from(e)))?)
    }

    /// Class probabilities (B, K) from the first layer's integers `z_int` (B, R), R the rows
    /// of [`QuantizedModel::rows`].
    pub fn probabilities(&self, z_int: ArrayView2<i64>) -> Result<Array2<f32>, InferError> {
        let rows = self.rows().nrows();
        if z_int.ncols() != rows {
            return Err(InferError::Data(format!(
                "{} first-layer integers per input, the model's first layer has {rows} rows",
                z_int.ncols()
            )));
        }
        let (b, x) = (z_int.nrows(), self.info.x_bound);
        let scales = &self.weights.scales;
        let z = match &self.conv {
            None => self.quantizer.dequantize_forward(z_int, scales, x)?,
            Some(c) => {
                // (B, P*O) position-major is (B*P, O): dequantize per kernel, then the
                // channel-major layout the next layers read.
                let o = self.weights.values.nrows();
                let per_position = z_int
                    .to_shape((b * c.geometry.positions(), o))
                    .map_err(|e| ModelError::from(LayerError::from(e)))?;
                let z = self
                    .quantizer
                    .dequantize_forward(per_position.view(), scales, x)?;
                positions_to_channels(z, b, c.geometry.positions()).map_err(ModelError::from)?
            }
        };
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
    fn a_convolution_is_served_by_its_placed_kernels() {
        use crate::data::ImageShape as Shape;
        let info = DatasetInfo::new(49, 255, 3)
            .expect("info")
            .with_image(Shape {
                channels: 1,
                height: 7,
                width: 7,
            })
            .expect("image");
        let spec =
            ModelSpec::for_info("conv3x4s2p1-maxpool2-5", Activation::Relu, &info).expect("spec");
        let m = Model::new(spec, 8)
            .and_then(|m| m.with_data(info.clone()))
            .expect("model");
        let q = QuantizedModel::new(m.clone(), 8).expect("quantize");
        // 4 kernels at 4x4 positions, rows of the image's length plus the bias.
        assert_eq!(q.rows().dim(), (64, 50));
        // A corner position with padding 1 covers 4 pixels: 4 entries and the bias at most.
        assert!(q.rows().row(0).iter().filter(|v| **v != 0).count() <= 5);
        let values = Array2::from_shape_fn((6, 49), |(b, i)| ((b * 31 + i * 17) % 256) as u16);
        let data = Dataset::new(values, vec![0, 1, 2, 0, 1, 2], info).expect("data");
        let x = data.augmented(0..6);
        // What an encrypted query decrypts, one inner product per row, equals the patches'.
        let direct = exact_int_matmul(x.view(), q.rows().t()).expect("direct");
        assert_eq!(q.plain_integers(x.view()).expect("plain"), direct);
        // And the probabilities follow the float model.
        let p = q.probabilities(direct.view()).expect("p");
        let f = m.predict_proba(data.normalized().view()).expect("float");
        let worst = (&p - &f).iter().fold(0f32, |w, v| w.max(v.abs()));
        assert!(worst < 0.05, "worst difference {worst}");
        let short = direct.slice_axis(ndarray::Axis(1), ndarray::Slice::from(..63));
        assert!(q.probabilities(short).is_err());
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
            Err(InferError::Data(_))
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
