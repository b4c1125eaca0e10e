//! The sequential model: a stack of dense layers configured from a spec string.
//!
//! A spec `n_0-n_1-...-n_L` (for example `784-128-32-10`) describes `L` dense layers, layer `k`
//! mapping `n_{k-1}` to `n_k` features. Every layer but the last is followed by the hidden
//! activation; the last one produces logits `z_L` and the output is `softmax(z_L)`, trained with
//! cross-entropy:
//!
//! ```text
//! z_1 = x W_1^T + b_1,   a_k = f(z_k),   z_{k+1} = a_k W_{k+1}^T + b_{k+1},   p = softmax(z_L)
//! ```
//!
//! The first layer is also available as one matrix `W1 = [W_1 | b_1]` of shape
//! `(n_1, n_0 + 1)` whose last column is the bias; the seam ([`crate::first_layer`]) works on
//! that matrix with inputs carrying a constant extra feature 1.
//!
//! Models are saved as an 8-byte magic, a little-endian `u32` format version and the bincode
//! encoding of [`Model`].

use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::{concatenate, Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::data::DatasetInfo;
use crate::init::Init;
use crate::layer::{Dense, DenseGrad};
use crate::loss::softmax;

/// File magic of a saved model.
pub const MODEL_MAGIC: [u8; 8] = *b"CNNMODEL";
/// Current format version of a saved model.
pub const MODEL_VERSION: u32 = 2;

/// Errors of model construction, validation and (de)serialization.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The spec string is malformed.
    #[error("invalid model spec {spec:?}: {reason}")]
    Spec {
        /// The offending spec.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An array does not have the shape the model needs.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        /// Which array.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// Reading or writing a file failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bytes do not start with the expected magic.
    #[error("not a {kind} file (bad magic number)")]
    BadMagic {
        /// What kind of file was expected.
        kind: &'static str,
    },
    /// The file has an unsupported format version.
    #[error("unsupported {kind} format version {found} (this build reads version {expected})")]
    Version {
        /// What kind of file.
        kind: &'static str,
        /// Version in the file.
        found: u32,
        /// Version this build supports.
        expected: u32,
    },
    /// The payload could not be encoded or decoded.
    #[error("corrupted or truncated {kind} file: {source}")]
    Codec {
        /// What kind of file.
        kind: &'static str,
        /// The bincode error.
        source: bincode::Error,
    },
    /// The decoded model is internally inconsistent.
    #[error("inconsistent model: {0}")]
    Inconsistent(String),
}

/// Architecture of a model: layer sizes and hidden activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Layer widths from input to output, at least two entries, all positive.
    pub sizes: Vec<usize>,
    /// Activation of every hidden layer.
    pub activation: Activation,
}

impl ModelSpec {
    /// Parses `"784-128-32-10"` (widths separated by `-`) with the given hidden activation.
    pub fn parse(spec: &str, activation: Activation) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::Spec {
            spec: spec.to_string(),
            reason,
        };
        let mut sizes = Vec::new();
        for part in spec.trim().split('-') {
            let n: usize = part
                .trim()
                .parse()
                .map_err(|_| err(format!("{part:?} is not a positive integer")))?;
            if n == 0 {
                return Err(err("layer widths must be positive".into()));
            }
            sizes.push(n);
        }
        if sizes.len() < 2 {
            return Err(err("need at least an input and an output width".into()));
        }
        Ok(ModelSpec { sizes, activation })
    }

    /// The architecture for data with `features` inputs and `classes` outputs: `spec` lists
    /// either the hidden widths only (`"128-32"`, or `""` for none), or every width from
    /// input to output (`"784-128-32-10"`, recognised by its first width being `features`),
    /// which must then end with `classes`.
    pub fn for_data(
        spec: &str,
        activation: Activation,
        features: usize,
        classes: usize,
    ) -> Result<Self, ModelError> {
        if spec.trim().is_empty() {
            return Ok(ModelSpec {
                sizes: vec![features, classes],
                activation,
            });
        }
        let widths = ModelSpec::parse(&format!("{spec}-1"), activation)?.sizes;
        let widths = &widths[..widths.len() - 1];
        if widths.len() >= 2 && widths[0] == features {
            if widths[widths.len() - 1] != classes {
                return Err(ModelError::Spec {
                    spec: spec.to_string(),
                    reason: format!(
                        "a full spec must end with the data's {classes} classes, not {} \
                         (or give the hidden widths only, such as 128-32)",
                        widths[widths.len() - 1]
                    ),
                });
            }
            return Ok(ModelSpec {
                sizes: widths.to_vec(),
                activation,
            });
        }
        let mut sizes = vec![features];
        sizes.extend_from_slice(widths);
        sizes.push(classes);
        Ok(ModelSpec { sizes, activation })
    }

    /// Number of input features `n_0`.
    pub fn n_in(&self) -> usize {
        self.sizes.first().copied().unwrap_or(0)
    }

    /// Number of output classes `n_L`.
    pub fn n_out(&self) -> usize {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// Width `n_1` of the first layer (the rows of W1).
    pub fn first_width(&self) -> usize {
        self.sizes.get(1).copied().unwrap_or(0)
    }

    /// Number of dense layers `L`.
    pub fn num_layers(&self) -> usize {
        self.sizes.len().saturating_sub(1)
    }
}

impl fmt::Display for ModelSpec {
    /// Formats as `784-128-32-10/relu`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sizes: Vec<String> = self.sizes.iter().map(|s| s.to_string()).collect();
        write!(f, "{}/{}", sizes.join("-"), self.activation)
    }
}

/// Gradients for every layer of a model, in layer order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gradients {
    /// One entry per dense layer.
    pub layers: Vec<DenseGrad>,
}

/// A sequential network: dense layers, hidden activation, softmax output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    spec: ModelSpec,
    layers: Vec<Dense>,
    /// The description of the data the model was made for (inputs, bound, classes).
    data: Option<DatasetInfo>,
}

impl Model {
    /// A freshly initialized model: He init for ReLU hidden layers, Xavier otherwise and for
    /// the output layer; zero biases; weights drawn from ChaCha8 seeded with `seed`.
    pub fn new(spec: ModelSpec, seed: u64) -> Self {
        let init = Init::for_activation(spec.activation);
        Self::with_init(spec, init, seed)
    }

    /// Like [`Model::new`] with an explicit scheme for the hidden layers (the output layer
    /// always uses Xavier).
    pub fn with_init(spec: ModelSpec, hidden_init: Init, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let l = spec.num_layers();
        let layers = (0..l)
            .map(|k| {
                let init = if k + 1 == l {
                    Init::Xavier
                } else {
                    hidden_init
                };
                Dense::new(init.weights(spec.sizes[k + 1], spec.sizes[k], &mut rng))
            })
            .collect();
        Model {
            spec,
            layers,
            data: None,
        }
    }

    /// Builds a model from explicit layers, checking them against the spec.
    pub fn from_layers(spec: ModelSpec, layers: Vec<Dense>) -> Result<Self, ModelError> {
        let m = Model {
            spec,
            layers,
            data: None,
        };
        m.validate()?;
        Ok(m)
    }

    /// The same model, recorded as made for data described by `info` (whose features and
    /// classes must be the model's inputs and outputs).
    pub fn with_data(mut self, info: DatasetInfo) -> Result<Self, ModelError> {
        self.data = Some(info);
        self.validate()?;
        Ok(self)
    }

    /// The description of the data the model was made for, if recorded.
    pub fn data(&self) -> Option<&DatasetInfo> {
        self.data.as_ref()
    }

    /// The architecture.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The dense layers, first to last.
    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    /// Mutable access to the layers (shapes must be kept).
    pub fn layers_mut(&mut self) -> &mut [Dense] {
        &mut self.layers
    }

    /// Total number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.layers.iter().map(|l| l.w.len() + l.b.len()).sum()
    }

    /// The first layer as one matrix `[W_1 | b_1]` of shape `(n_1, n_0 + 1)`, bias last.
    pub fn first_layer_matrix(&self) -> Array2<f32> {
        match self.layers.first() {
            Some(l) => {
                let b = l.b.view().insert_axis(Axis(1));
                concatenate(Axis(1), &[l.w.view(), b]).unwrap_or_else(|_| l.w.clone())
            }
            None => Array2::zeros((0, 1)),
        }
    }

    /// Logits `z_L` for normalized inputs `x` of shape (B, n_0), computed in the clear.
    pub fn logits(&self, x: ArrayView2<f32>) -> Result<Array2<f32>, ModelError> {
        if x.ncols() != self.spec.n_in() {
            return Err(ModelError::Shape {
                what: "model input",
                expected: vec![x.nrows(), self.spec.n_in()],
                got: x.shape().to_vec(),
            });
        }
        match self.layers.first() {
            Some(first) => self.logits_after_first(first.forward(x).view()),
            None => Ok(x.to_owned()),
        }
    }

    /// Logits `z_L` from the first layer's pre-activations `z_1 = x W_1^T + b_1` of shape
    /// (B, n_1): the rest of the network, in the clear. Inference over encrypted inputs
    /// decrypts `z_1` and calls this.
    pub fn logits_after_first(&self, z1: ArrayView2<f32>) -> Result<Array2<f32>, ModelError> {
        if z1.ncols() != self.spec.first_width() {
            return Err(ModelError::Shape {
                what: "first-layer pre-activations",
                expected: vec![z1.nrows(), self.spec.first_width()],
                got: z1.shape().to_vec(),
            });
        }
        let act = self.spec.activation;
        let mut h = z1.to_owned();
        for layer in self.layers.iter().skip(1) {
            h = layer.forward(act.forward(h.view()).view());
        }
        Ok(h)
    }

    /// Class probabilities `softmax(z_L)` for normalized inputs `x` (B, n_0).
    pub fn predict_proba(&self, x: ArrayView2<f32>) -> Result<Array2<f32>, ModelError> {
        Ok(softmax(self.logits(x)?.view()))
    }

    /// Checks that layers match the spec and that every parameter is finite.
    pub fn validate(&self) -> Result<(), ModelError> {
        let s = &self.spec.sizes;
        if s.len() < 2 || s.contains(&0) {
            return Err(ModelError::Inconsistent(format!("bad layer sizes {s:?}")));
        }
        if self.layers.len() != s.len() - 1 {
            return Err(ModelError::Inconsistent(format!(
                "{} layers for spec {}",
                self.layers.len(),
                self.spec
            )));
        }
        if let Some(d) = &self.data {
            if d.features != self.spec.n_in() || d.classes != self.spec.n_out() {
                return Err(ModelError::Inconsistent(format!(
                    "the model {} does not fit its data ({} features, {} classes)",
                    self.spec, d.features, d.classes
                )));
            }
            d.validate()
                .map_err(|e| ModelError::Inconsistent(e.to_string()))?;
        }
        for (k, l) in self.layers.iter().enumerate() {
            if l.w.dim() != (s[k + 1], s[k]) || l.b.len() != s[k + 1] {
                return Err(ModelError::Inconsistent(format!(
                    "layer {k} has weights {:?} and bias {}, spec {} needs ({}, {})",
                    l.w.dim(),
                    l.b.len(),
                    self.spec,
                    s[k + 1],
                    s[k]
                )));
            }
            if !l.w.iter().chain(l.b.iter()).all(|v| v.is_finite()) {
                return Err(ModelError::Inconsistent(format!(
                    "layer {k} has non-finite parameters"
                )));
            }
        }
        Ok(())
    }

    /// Encodes the model as magic + version + bincode.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        encode_versioned(&MODEL_MAGIC, MODEL_VERSION, "model", self)
    }

    /// Decodes and validates a model written by [`Model::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let m: Model = decode_versioned(&MODEL_MAGIC, MODEL_VERSION, "model", bytes)?;
        m.validate()?;
        Ok(m)
    }

    /// Writes the model to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        write_file(path.as_ref(), &self.to_bytes()?)
    }

    /// Reads a model from `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_bytes(&read_file(path.as_ref())?)
    }
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    std::fs::write(path, bytes).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `magic`, `version` (u32 LE) and the bincode encoding of `value`.
pub(crate) fn encode_versioned<T: Serialize>(
    magic: &[u8; 8],
    version: u32,
    kind: &'static str,
    value: &T,
) -> Result<Vec<u8>, ModelError> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    bincode::serialize_into(&mut out, value)
        .map_err(|source| ModelError::Codec { kind, source })?;
    Ok(out)
}

/// Checks magic and version, then decodes the rest, rejecting trailing bytes.
pub(crate) fn decode_versioned<T: DeserializeOwned>(
    magic: &[u8; 8],
    version: u32,
    kind: &'static str,
    bytes: &[u8],
) -> Result<T, ModelError> {
    use bincode::Options;
    if bytes.len() < 12 || &bytes[..8] != magic {
        return Err(ModelError::BadMagic { kind });
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    let found = u32::from_le_bytes(v);
    if found != version {
        return Err(ModelError::Version {
            kind,
            found,
            expected: version,
        });
    }
    let payload = &bytes[12..];
    // Same encoding as `bincode::serialize`, with a size limit so that a corrupted length
    // prefix cannot make the decoder allocate more than the file holds.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(payload.len() as u64)
        .deserialize(payload)
        .map_err(|source| ModelError::Codec { kind, source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn parse_specs() {
        let s = ModelSpec::parse("784-128-32-10", Activation::Sigmoid).unwrap();
        assert_eq!(s.sizes, vec![784, 128, 32, 10]);
        assert_eq!(
            (s.n_in(), s.first_width(), s.n_out(), s.num_layers()),
            (784, 128, 10, 3)
        );
        assert_eq!(s.to_string(), "784-128-32-10/sigmoid");
        let f = |t: &str| ModelSpec::for_data(t, Activation::Sigmoid, 30, 2).map(|s| s.sizes);
        assert_eq!(f("128-32").unwrap(), vec![30, 128, 32, 2]);
        assert_eq!(f("30-16-2").unwrap(), vec![30, 16, 2]);
        assert_eq!(f("").unwrap(), vec![30, 2]);
        assert_eq!(f("64").unwrap(), vec![30, 64, 2]);
        assert!(f("30-16-3").unwrap_err().to_string().contains("2 classes"));
        assert!(f("16-x").is_err());
        for bad in ["", "784", "784-0-10", "784-x-10", "784--10", "-784-10"] {
            assert!(ModelSpec::parse(bad, Activation::Relu).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn first_layer_matrix_has_bias_last() {
        let spec = ModelSpec::parse("2-2-2", Activation::Tanh).unwrap();
        let mut m = Model::new(spec, 1);
        m.layers_mut()[0].w = array![[1.0, 2.0], [3.0, 4.0]];
        m.layers_mut()[0].b = array![5.0, 6.0];
        assert_eq!(
            m.first_layer_matrix(),
            array![[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]]
        );
    }

    #[test]
    fn save_load_round_trip_and_errors() {
        let spec = ModelSpec::parse("6-5-3", Activation::Relu).unwrap();
        let m = Model::new(spec, 3);
        let bytes = m.to_bytes().unwrap();
        assert_eq!(Model::from_bytes(&bytes).unwrap(), m);

        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(matches!(
            Model::from_bytes(&bad),
            Err(ModelError::BadMagic { .. })
        ));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert!(matches!(
            Model::from_bytes(&bad),
            Err(ModelError::Version { found: 9, .. })
        ));
        assert!(matches!(
            Model::from_bytes(&bytes[..bytes.len() - 3]),
            Err(ModelError::Codec { .. })
        ));
        assert!(Model::from_bytes(&bytes[..5]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.bin");
        m.save(&p).unwrap();
        assert_eq!(Model::load(&p).unwrap(), m);
        assert!(matches!(
            Model::load(dir.path().join("missing")),
            Err(ModelError::Io { .. })
        ));
    }

    #[test]
    fn same_seed_same_weights() {
        let spec = ModelSpec::parse("10-8-4", Activation::Sigmoid).unwrap();
        assert_eq!(Model::new(spec.clone(), 5), Model::new(spec.clone(), 5));
        assert_ne!(Model::new(spec.clone(), 5), Model::new(spec, 6));
    }
}
