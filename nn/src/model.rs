//! The sequential model, configured from a spec string ([`crate::spec`]): optional image
//! layers ([`crate::layers`]), then dense layers.
//!
//! A dense spec `n_0-n_1-...-n_L` (for example `784-128-32-10`) describes `L` dense layers,
//! layer `k` mapping `n_{k-1}` to `n_k` features. Every layer but the last is followed by the
//! hidden activation; the last one produces logits `z_L` and the output is `softmax(z_L)`,
//! trained with cross-entropy:
//!
//! ```text
//! z_1 = x W_1^T + b_1,   a_k = f(z_k),   z_{k+1} = a_k W_{k+1}^T + b_{k+1},   p = softmax(z_L)
//! ```
//!
//! With image layers, `x` first runs through them (every convolution followed by the hidden
//! activation, a flatten at the end) and the dense layers read the flattened result.
//!
//! The first layer (the first dense layer, or the first convolution) is also available as one
//! matrix `W1 = [W | b]` of shape `(rows, inputs + 1)` whose last column is the bias: the
//! units' weights, or the kernels in patch order. The seam ([`crate::first_layer`]) works on
//! that matrix with inputs (or patches) carrying a constant extra feature 1.
//!
//! Models are saved as an 8-byte magic, a little-endian `u32` format version and the bincode
//! encoding of [`Model`].

use std::path::{Path, PathBuf};

use ndarray::{concatenate, Array1, Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::data::DatasetInfo;
use crate::init::Init;
use crate::layer::{Dense, DenseGrad};
use crate::layers::{
    self, check_stack, forward_stack, Conv2d, Elementwise, Flatten, Geometry, Layer, LayerError,
};
use crate::loss::softmax;
pub use crate::spec::{FeatureSpec, ModelSpec};

/// File magic of a saved model.
pub const MODEL_MAGIC: [u8; 8] = *b"CNNMODEL";
/// Current format version of a saved model (3: image layers). Version 2 files (dense
/// models) are still read.
pub const MODEL_VERSION: u32 = 3;

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
    /// An image layer rejected its input or parameters.
    #[error(transparent)]
    Layer(#[from] LayerError),
}

/// Gradients for every layer with parameters, in layer order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gradients {
    /// One entry per layer with parameters: the convolutions in order, then the dense
    /// layers (a convolution's kernels have the dense shape `(O, C*r*r)`).
    pub layers: Vec<DenseGrad>,
}

/// The weights and bias of one layer with parameters, for an optimizer.
pub struct ParamsMut<'a> {
    /// Weights, `(outputs, inputs)` (kernels `(O, C*r*r)` for a convolution).
    pub w: &'a mut Array2<f32>,
    /// Bias.
    pub b: &'a mut Array1<f32>,
}

/// A sequential network: optional image layers, dense layers, hidden activation, softmax
/// output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    spec: ModelSpec,
    /// The image layers of `spec.features`, each convolution followed by its activation, and
    /// a flatten at the end; empty for a dense network.
    features: Vec<Layer>,
    layers: Vec<Dense>,
    /// The description of the data the model was made for (inputs, bound, classes).
    data: Option<DatasetInfo>,
}

/// A version-2 model file: dense layers only.
#[derive(Deserialize)]
struct ModelV2 {
    spec: SpecV2,
    layers: Vec<Dense>,
    data: Option<DatasetInfo>,
}

#[derive(Deserialize)]
struct SpecV2 {
    sizes: Vec<usize>,
    activation: Activation,
}

impl Model {
    /// A freshly initialized model: He init for ReLU hidden layers, Xavier otherwise and for
    /// the output layer; zero biases; weights drawn from ChaCha8 seeded with `seed` (image
    /// layers first). Fails if the spec's image layers do not fit its input.
    pub fn new(spec: ModelSpec, seed: u64) -> Result<Self, ModelError> {
        let init = Init::for_activation(spec.activation);
        Self::with_init(spec, init, seed)
    }

    /// Like [`Model::new`] with an explicit scheme for the hidden layers and kernels (the
    /// output layer always uses Xavier).
    pub fn with_init(spec: ModelSpec, hidden_init: Init, seed: u64) -> Result<Self, ModelError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let features = build_features(&spec, hidden_init, &mut rng)?;
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
        let m = Model {
            spec,
            features,
            layers,
            data: None,
        };
        m.validate()?;
        Ok(m)
    }

    /// Builds a dense model from explicit layers, checking them against the spec.
    pub fn from_layers(spec: ModelSpec, layers: Vec<Dense>) -> Result<Self, ModelError> {
        let m = Model {
            spec,
            features: Vec::new(),
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

    /// The image layers (empty for a dense network).
    pub fn features(&self) -> &[Layer] {
        &self.features
    }

    /// The dense layers, first to last.
    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    /// Mutable access to the dense layers (shapes must be kept).
    pub fn layers_mut(&mut self) -> &mut [Dense] {
        &mut self.layers
    }

    /// The weights and bias of every layer with parameters, in the order of [`Gradients`].
    pub fn params_mut(&mut self) -> Vec<ParamsMut<'_>> {
        let convs = self.features.iter_mut().filter_map(|l| match l {
            Layer::Conv(c) => Some(ParamsMut {
                w: &mut c.w,
                b: &mut c.b,
            }),
            _ => None,
        });
        let dense = self.layers.iter_mut().map(|l| ParamsMut {
            w: &mut l.w,
            b: &mut l.b,
        });
        convs.chain(dense).collect()
    }

    /// Total number of trainable parameters.
    pub fn num_params(&self) -> usize {
        let features: usize = self.features.iter().map(Layer::num_params).sum();
        features
            + self
                .layers
                .iter()
                .map(|l| l.w.len() + l.b.len())
                .sum::<usize>()
    }

    /// The first convolution, when the first layer is one.
    fn first_conv(&self) -> Option<&Conv2d> {
        match self.features.first() {
            Some(Layer::Conv(c)) => Some(c),
            _ => None,
        }
    }

    /// Where the first layer's kernels land on the input, when it is a convolution: the
    /// seam then computes one product per (sample, position) ([`crate::first_layer`]).
    pub fn first_geometry(&self) -> Option<&Geometry> {
        self.first_conv().map(Conv2d::geometry)
    }

    /// Values of the first layer's output per sample: its units, or kernels times positions.
    pub fn first_outputs(&self) -> usize {
        match self.first_conv() {
            Some(c) => c.output_shape().features(),
            None => self.spec.first_width(),
        }
    }

    /// The first layer as one matrix `[W | b]` of shape `(rows, inputs + 1)`, bias last: the
    /// first dense layer's units, or the first convolution's kernels.
    pub fn first_layer_matrix(&self) -> Array2<f32> {
        let (w, b) = match (self.first_conv(), self.layers.first()) {
            (Some(c), _) => (&c.w, &c.b),
            (None, Some(l)) => (&l.w, &l.b),
            (None, None) => return Array2::zeros((0, 1)),
        };
        concatenate(Axis(1), &[w.view(), b.view().insert_axis(Axis(1))])
            .unwrap_or_else(|_| w.clone())
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
        if !self.features.is_empty() {
            let (flat, _) = forward_stack(&self.features, x)?;
            return Ok(self.dense_from(0, flat));
        }
        match self.layers.first() {
            Some(first) => self.logits_after_first(first.forward(x).view()),
            None => Ok(x.to_owned()),
        }
    }

    /// Logits `z_L` from the first layer's pre-activations `z_1` of shape
    /// (B, [`Model::first_outputs`]) (a convolution's channel-major): the rest of the network,
    /// in the clear. Inference over encrypted inputs decrypts `z_1` and calls this.
    pub fn logits_after_first(&self, z1: ArrayView2<f32>) -> Result<Array2<f32>, ModelError> {
        if z1.ncols() != self.first_outputs() {
            return Err(ModelError::Shape {
                what: "first-layer pre-activations",
                expected: vec![z1.nrows(), self.first_outputs()],
                got: z1.shape().to_vec(),
            });
        }
        if !self.features.is_empty() {
            let (flat, _) = forward_stack(&self.features[1..], z1)?;
            return Ok(self.dense_from(0, flat));
        }
        if self.layers.len() < 2 {
            return Ok(z1.to_owned());
        }
        Ok(self.dense_from(1, self.spec.activation.forward(z1)))
    }

    /// The dense layers from `from` on, applied to their input `a`.
    fn dense_from(&self, from: usize, mut a: Array2<f32>) -> Array2<f32> {
        let act = self.spec.activation;
        let last = self.layers.len().saturating_sub(1);
        for (k, layer) in self.layers.iter().enumerate().skip(from) {
            let z = layer.forward(a.view());
            a = if k < last { act.forward(z.view()) } else { z };
        }
        a
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
        self.validate_features()?;
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

    /// The image layers are those the spec describes, fit the input and end in `sizes[0]`
    /// flat features, with finite kernels.
    fn validate_features(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Inconsistent(what));
        let Some(input) = self.spec.input.filter(|_| self.spec.is_conv()) else {
            if !self.features.is_empty() || !self.spec.features.is_empty() {
                return bad("image layers without an input shape".into());
            }
            return Ok(());
        };
        let expected = expected_kinds(&self.spec);
        let kinds: Vec<String> = self.features.iter().map(describe).collect();
        if kinds != expected {
            return bad(format!(
                "image layers {kinds:?} do not match the spec {} ({expected:?})",
                self.spec
            ));
        }
        let out = check_stack(input, &self.features)?;
        if out.features() != self.spec.sizes[0] {
            return bad(format!(
                "the image layers end in {} features, the dense layers read {}",
                out.features(),
                self.spec.sizes[0]
            ));
        }
        for (i, l) in self.features.iter().enumerate() {
            if let Layer::Conv(c) = l {
                if !c.w.iter().chain(c.b.iter()).all(|v| v.is_finite()) {
                    return bad(format!("image layer {i} has non-finite parameters"));
                }
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
        let m: Model = if bytes.get(8..12) == Some(&2u32.to_le_bytes()[..]) {
            let old: ModelV2 = decode_versioned(&MODEL_MAGIC, 2, "model", bytes)?;
            Model {
                spec: ModelSpec::dense(old.spec.sizes, old.spec.activation),
                features: Vec::new(),
                layers: old.layers,
                data: old.data,
            }
        } else {
            decode_versioned(&MODEL_MAGIC, MODEL_VERSION, "model", bytes)?
        };
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

/// The image layers of `spec`, initialized from `init` (every convolution followed by the
/// activation, a flatten at the end).
fn build_features(
    spec: &ModelSpec,
    init: Init,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Layer>, ModelError> {
    let Some(mut shape) = spec.input.filter(|_| spec.is_conv()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for f in &spec.features {
        match *f {
            FeatureSpec::Conv { kernels, window } => {
                let conv = Conv2d::new(shape, kernels, window, init, rng)?;
                shape = conv.output_shape();
                out.push(Layer::Conv(conv));
                out.push(Layer::Activation(Elementwise::new(spec.activation, shape)));
            }
            FeatureSpec::MaxPool { window } => {
                let pool = layers::MaxPool2d::new(shape, window.size, window.stride)?;
                shape = pool.output_shape();
                out.push(Layer::MaxPool(pool));
            }
            FeatureSpec::AvgPool { window } => {
                let pool = layers::AvgPool2d::new(shape, window.size, window.stride)?;
                shape = pool.output_shape();
                out.push(Layer::AvgPool(pool));
            }
        }
    }
    out.push(Layer::Flatten(Flatten::new(shape)));
    Ok(out)
}

/// What [`describe`] gives for the layers [`build_features`] makes from `spec`.
fn expected_kinds(spec: &ModelSpec) -> Vec<String> {
    let mut out = Vec::new();
    for f in &spec.features {
        out.push(f.to_string());
        if matches!(f, FeatureSpec::Conv { .. }) {
            out.push(spec.activation.to_string());
        }
    }
    out.push("flatten".into());
    out
}

/// A layer as its spec token (`conv5x6p2`, `maxpool2`, `relu`, `flatten`, `dense`).
fn describe(layer: &Layer) -> String {
    match layer {
        Layer::Conv(c) => FeatureSpec::Conv {
            kernels: c.output_shape().channels(),
            window: c.geometry().window(),
        }
        .to_string(),
        Layer::MaxPool(p) => FeatureSpec::MaxPool { window: p.window() }.to_string(),
        Layer::AvgPool(p) => FeatureSpec::AvgPool { window: p.window() }.to_string(),
        Layer::Activation(a) => a.activation.to_string(),
        Layer::Flatten(_) => "flatten".into(),
        Layer::Dense(_) => "dense".into(),
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
    fn first_layer_matrix_has_bias_last() {
        let spec = ModelSpec::parse("2-2-2", Activation::Tanh).unwrap();
        let mut m = Model::new(spec, 1).unwrap();
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
        let m = Model::new(spec, 3).unwrap();
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
    fn version_2_files_still_load() {
        #[derive(Serialize)]
        struct OldSpec {
            sizes: Vec<usize>,
            activation: Activation,
        }
        #[derive(Serialize)]
        struct Old {
            spec: OldSpec,
            layers: Vec<Dense>,
            data: Option<DatasetInfo>,
        }
        let m = Model::new(ModelSpec::parse("6-5-3", Activation::Tanh).unwrap(), 4).unwrap();
        let old = Old {
            spec: OldSpec {
                sizes: m.spec().sizes.clone(),
                activation: m.spec().activation,
            },
            layers: m.layers().to_vec(),
            data: None,
        };
        let bytes = encode_versioned(&MODEL_MAGIC, 2, "model", &old).unwrap();
        assert_eq!(Model::from_bytes(&bytes).unwrap(), m);
        // A version-3 payload labelled version 2 does not decode as one.
        let mut relabelled = m.to_bytes().unwrap();
        relabelled[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(Model::from_bytes(&relabelled).is_err());
    }

    #[test]
    fn image_layers_must_match_their_spec() {
        let info = DatasetInfo::new(36, 255, 3)
            .unwrap()
            .with_image(crate::data::ImageShape {
                channels: 1,
                height: 6,
                width: 6,
            })
            .unwrap();
        let spec = ModelSpec::for_info("conv3x2p1-maxpool2-4", Activation::Relu, &info).unwrap();
        let m = Model::new(spec, 1).unwrap().with_data(info).unwrap();
        assert_eq!(m.first_outputs(), 2 * 36);
        assert_eq!(m.first_layer_matrix().dim(), (2, 10));
        assert_eq!(m.num_params(), 2 * 10 + (18 * 4 + 4) + (4 * 3 + 3));
        // A file whose spec claims other image layers than it holds is refused.
        let mut other = m.clone();
        other.spec.features[1] = FeatureSpec::AvgPool {
            window: layers::Window::new(2, 2, 0),
        };
        assert!(matches!(
            Model::from_bytes(&other.to_bytes().unwrap()),
            Err(ModelError::Inconsistent(_))
        ));
        let mut dropped = m.clone();
        dropped.features.pop();
        assert!(dropped.validate().is_err());
        let mut nan = m;
        if let Some(Layer::Conv(c)) = nan.features.first_mut() {
            c.w[[0, 0]] = f32::NAN;
        }
        assert!(nan.validate().is_err());
    }

    #[test]
    fn same_seed_same_weights() {
        let spec = ModelSpec::parse("10-8-4", Activation::Sigmoid).unwrap();
        assert_eq!(
            Model::new(spec.clone(), 5).unwrap(),
            Model::new(spec.clone(), 5).unwrap()
        );
        assert_ne!(
            Model::new(spec.clone(), 5).unwrap(),
            Model::new(spec, 6).unwrap()
        );
    }
}
