//! Model specs: a network's architecture as a short string.
//!
//! # Dense networks
//!
//! `n_0-n_1-...-n_L` (for example `784-128-32-10`) describes `L` dense layers, layer `k`
//! mapping `n_{k-1}` to `n_k` features. For given data, the hidden widths alone are enough
//! (`128-32`): the data's features and classes are added at both ends
//! ([`ModelSpec::for_data`]).
//!
//! # Image networks
//!
//! A spec may begin with image layers, read left to right from the data's image shape, each
//! token one layer whose input is the previous one's output:
//!
//! ```text
//! conv<r>x<O>[s<stride>][p<pad>]   O kernels r x r (stride 1, padding 0 by default),
//!                                  followed by the hidden activation
//! maxpool<r>[s<stride>]            max pooling over r x r windows (stride r by default)
//! avgpool<r>[s<stride>]            average pooling, same form
//! flatten                          optional: the end of the image layers
//! ```
//!
//! then the hidden dense widths; the output layer of the data's classes is added (a last
//! width equal to the number of classes is taken as that layer). The first image layer must be
//! a convolution: it is the first layer, whose products go through the seam
//! ([`crate::first_layer`]). `lenet5` names LeNet-5 on 28x28 images:
//!
//! ```text
//! lenet5 = conv5x6p2-maxpool2-conv5x16-maxpool2-conv5x120-84
//!          1x28x28 -> 6x28x28 -> 6x14x14 -> 16x10x10 -> 16x5x5 -> 120x1x1 -> 84 -> classes
//! ```
//!
//! [`ModelSpec`]'s `Display` prints the expanded form with the input shape, for example
//! `1x28x28-conv5x6p2-maxpool2-conv5x16-maxpool2-conv5x120-120-84-10/relu`, where `120` is the
//! flattened output of the image layers (the input of the dense layers).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::data::DatasetInfo;
use crate::layers::{Geometry, ImageShape, Window};
use crate::model::ModelError;

/// The image layers of LeNet-5 and its hidden dense width (see the module doc).
pub const LENET5: &str = "conv5x6p2-maxpool2-conv5x16-maxpool2-conv5x120-84";

/// One image layer of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureSpec {
    /// A convolution of `kernels` kernels over `window`, then the hidden activation.
    Conv {
        /// Number of kernels (output channels).
        kernels: usize,
        /// Kernel side, stride and padding.
        window: Window,
    },
    /// Max pooling over `window` (no padding).
    MaxPool {
        /// Pool side and stride.
        window: Window,
    },
    /// Average pooling over `window` (no padding).
    AvgPool {
        /// Pool side and stride.
        window: Window,
    },
}

impl FeatureSpec {
    /// The output shape of this layer on inputs of shape `input`.
    pub fn output_shape(&self, input: ImageShape) -> Result<ImageShape, ModelError> {
        let bad = |e: crate::layers::LayerError| ModelError::Inconsistent(e.to_string());
        let (kind, window, channels) = match *self {
            FeatureSpec::Conv { kernels, window } => ("conv", window, kernels),
            FeatureSpec::MaxPool { window } => ("max-pool", window, input.channels()),
            FeatureSpec::AvgPool { window } => ("average-pool", window, input.channels()),
        };
        let g = Geometry::new(kind, input, window).map_err(bad)?;
        let (h, w) = g.out_hw();
        ImageShape::new(channels, h, w).map_err(bad)
    }

    /// Parses one token (`conv5x6p2`, `maxpool2`, `avgpool2s1`), `None` if it is not an
    /// image-layer token, `Some(Err)` if it is one but malformed.
    fn parse(token: &str) -> Option<Result<Self, String>> {
        let (rest, kind) = if let Some(r) = token.strip_prefix("conv") {
            (r, 0)
        } else if let Some(r) = token.strip_prefix("maxpool") {
            (r, 1)
        } else if let Some(r) = token.strip_prefix("avgpool") {
            (r, 2)
        } else {
            return None;
        };
        Some(Self::parse_args(token, rest, kind))
    }

    fn parse_args(token: &str, rest: &str, kind: u8) -> Result<Self, String> {
        let bad = || {
            format!(
                "{token:?} is not an image layer (conv<r>x<kernels>[s<stride>][p<padding>], \
                 maxpool<r>[s<stride>] or avgpool<r>[s<stride>], every number positive)"
            )
        };
        // Split "5x6s2p1" into its numbers by the letters before them.
        let mut fields: Vec<(char, usize)> = Vec::new();
        let mut letter = ' ';
        let mut digits = String::new();
        for ch in rest.chars().chain(std::iter::once('$')) {
            if ch.is_ascii_digit() {
                digits.push(ch);
                continue;
            }
            if digits.is_empty() {
                return Err(bad());
            }
            let n: usize = digits.parse().map_err(|_| bad())?;
            fields.push((letter, n));
            digits.clear();
            letter = ch;
        }
        let get = |c: char| fields.iter().find(|f| f.0 == c).map(|f| f.1);
        let allowed: &[char] = if kind == 0 {
            &[' ', 'x', 's', 'p']
        } else {
            &[' ', 's']
        };
        let mut seen = Vec::new();
        for (c, _) in &fields {
            if !allowed.contains(c) || seen.contains(c) {
                return Err(bad());
            }
            seen.push(*c);
        }
        let size = get(' ').ok_or_else(bad)?;
        if kind == 0 {
            let kernels = get('x').ok_or_else(bad)?;
            let (stride, padding) = (get('s').unwrap_or(1), get('p').unwrap_or(0));
            if size == 0 || kernels == 0 || stride == 0 {
                return Err(bad());
            }
            return Ok(FeatureSpec::Conv {
                kernels,
                window: Window::new(size, stride, padding),
            });
        }
        let stride = get('s').unwrap_or(size);
        if size == 0 || stride == 0 {
            return Err(bad());
        }
        let window = Window::new(size, stride, 0);
        Ok(if kind == 1 {
            FeatureSpec::MaxPool { window }
        } else {
            FeatureSpec::AvgPool { window }
        })
    }
}

impl fmt::Display for FeatureSpec {
    /// Formats as the token it was parsed from, defaults left out (`conv5x6p2`, `maxpool2`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pool = |f: &mut fmt::Formatter<'_>, name: &str, w: &Window| {
            write!(f, "{name}{}", w.size)?;
            if w.stride != w.size {
                write!(f, "s{}", w.stride)?;
            }
            Ok(())
        };
        match self {
            FeatureSpec::Conv { kernels, window } => {
                write!(f, "conv{}x{kernels}", window.size)?;
                if window.stride != 1 {
                    write!(f, "s{}", window.stride)?;
                }
                if window.padding != 0 {
                    write!(f, "p{}", window.padding)?;
                }
                Ok(())
            }
            FeatureSpec::MaxPool { window } => pool(f, "maxpool", window),
            FeatureSpec::AvgPool { window } => pool(f, "avgpool", window),
        }
    }
}

/// Architecture of a model: optional image layers, dense layer sizes and hidden activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Dense layer widths from their input to the output, at least two entries, all
    /// positive. With image layers, `sizes[0]` is their flattened output.
    pub sizes: Vec<usize>,
    /// Activation of every hidden layer (after every convolution too).
    pub activation: Activation,
    /// The image layers before the dense ones; empty for a dense network.
    pub features: Vec<FeatureSpec>,
    /// The input image shape the image layers read (`Some` exactly when there are image
    /// layers).
    pub input: Option<ImageShape>,
}

impl ModelSpec {
    /// Parses `"784-128-32-10"` (widths separated by `-`) with the given hidden activation.
    pub fn parse(spec: &str, activation: Activation) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::Spec {
            spec: spec.to_string(),
            reason,
        };
        let sizes = parse_widths(spec.trim().split('-')).map_err(err)?;
        if sizes.len() < 2 {
            return Err(err("need at least an input and an output width".into()));
        }
        Ok(ModelSpec::dense(sizes, activation))
    }

    /// A dense network of the given widths.
    pub fn dense(sizes: Vec<usize>, activation: Activation) -> Self {
        ModelSpec {
            sizes,
            activation,
            features: Vec::new(),
            input: None,
        }
    }

    /// The architecture for data described by `info`: a dense spec as in
    /// [`ModelSpec::for_data`], or one with image layers (or `lenet5`, see the module doc),
    /// which needs image data.
    pub fn for_info(
        spec: &str,
        activation: Activation,
        info: &DatasetInfo,
    ) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::Spec {
            spec: spec.to_string(),
            reason,
        };
        let expanded = spec.trim().replace("lenet5", LENET5);
        let tokens: Vec<&str> = expanded.split('-').map(str::trim).collect();
        let mut features = Vec::new();
        let mut rest = tokens.as_slice();
        while let Some((first, tail)) = rest.split_first() {
            match FeatureSpec::parse(first) {
                Some(f) => features.push(f.map_err(err)?),
                None => break,
            }
            rest = tail;
        }
        if let Some((&"flatten", tail)) = rest.split_first() {
            if features.is_empty() {
                return Err(err("flatten must follow image layers".into()));
            }
            rest = tail;
        }
        if features.is_empty() {
            return ModelSpec::for_data(spec, activation, info.features, info.classes);
        }
        let image = info.image.ok_or_else(|| {
            err("image layers need image data (the data has no image shape)".into())
        })?;
        let input = ImageShape::new(image.channels, image.height, image.width)
            .map_err(|e| err(e.to_string()))?;
        if !matches!(features[0], FeatureSpec::Conv { .. }) {
            return Err(err(
                "the first image layer must be a convolution (the layer computed over the \
                 encrypted inputs)"
                    .into(),
            ));
        }
        let mut shape = input;
        for f in &features {
            shape = f
                .output_shape(shape)
                .map_err(|e| err(format!("{f} on {shape}: {e}")))?;
        }
        let mut sizes = vec![shape.features()];
        if !rest.is_empty() && rest != [""] {
            sizes.extend(parse_widths(rest.iter().copied()).map_err(err)?);
        }
        if sizes.len() < 2 || sizes[sizes.len() - 1] != info.classes {
            sizes.push(info.classes);
        }
        Ok(ModelSpec {
            sizes,
            activation,
            features,
            input: Some(input),
        })
    }

    /// The dense architecture for data with `features` inputs and `classes` outputs: `spec`
    /// lists either the hidden widths only (`"128-32"`, or `""` for none), or every width from
    /// input to output (`"784-128-32-10"`, recognised by its first width being `features`),
    /// which must then end with `classes`.
    pub fn for_data(
        spec: &str,
        activation: Activation,
        features: usize,
        classes: usize,
    ) -> Result<Self, ModelError> {
        if spec.trim().is_empty() {
            return Ok(ModelSpec::dense(vec![features, classes], activation));
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
            return Ok(ModelSpec::dense(widths.to_vec(), activation));
        }
        let mut sizes = vec![features];
        sizes.extend_from_slice(widths);
        sizes.push(classes);
        Ok(ModelSpec::dense(sizes, activation))
    }

    /// Number of input features `n_0` (of the image, with image layers).
    pub fn n_in(&self) -> usize {
        match self.input {
            Some(shape) if !self.features.is_empty() => shape.features(),
            _ => self.sizes.first().copied().unwrap_or(0),
        }
    }

    /// Number of output classes `n_L`.
    pub fn n_out(&self) -> usize {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// The rows of the first layer's matrix `W1`: the first layer's units, or the first
    /// convolution's kernels.
    pub fn first_width(&self) -> usize {
        match self.features.first() {
            Some(FeatureSpec::Conv { kernels, .. }) => *kernels,
            _ => self.sizes.get(1).copied().unwrap_or(0),
        }
    }

    /// Where the first convolution's kernels land on the input, when the first layer is one
    /// (what a first layer over patches needs, [`crate::first_layer`]).
    pub fn first_geometry(&self) -> Option<Geometry> {
        match (self.features.first(), self.input) {
            (Some(FeatureSpec::Conv { window, .. }), Some(input)) => {
                Geometry::new("conv", input, *window).ok()
            }
            _ => None,
        }
    }

    /// Whether the first layer is a convolution.
    pub fn is_conv(&self) -> bool {
        !self.features.is_empty()
    }

    /// Number of dense layers `L`.
    pub fn num_layers(&self) -> usize {
        self.sizes.len().saturating_sub(1)
    }
}

/// Parses positive widths.
fn parse_widths<'a>(parts: impl Iterator<Item = &'a str>) -> Result<Vec<usize>, String> {
    let mut sizes = Vec::new();
    for part in parts {
        let n: usize = part.trim().parse().map_err(|_| {
            format!("{part:?} is not a positive integer (nor an image layer before the widths)")
        })?;
        if n == 0 {
            return Err("layer widths must be positive".into());
        }
        sizes.push(n);
    }
    Ok(sizes)
}

impl fmt::Display for ModelSpec {
    /// Formats as `784-128-32-10/relu`, with the input shape and image layers first when
    /// there are some.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(input) = self.input.filter(|_| !self.features.is_empty()) {
            write!(f, "{input}-")?;
            for feature in &self.features {
                write!(f, "{feature}-")?;
            }
        }
        let sizes: Vec<String> = self.sizes.iter().map(|s| s.to_string()).collect();
        write!(f, "{}/{}", sizes.join("-"), self.activation)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mnist_like() -> DatasetInfo {
        DatasetInfo::new(784, 255, 10)
            .unwrap()
            .with_image(crate::data::info::ImageShape {
                channels: 1,
                height: 28,
                width: 28,
            })
            .unwrap()
    }

    #[test]
    fn parse_dense_specs() {
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
    fn lenet5_expands_to_its_layers() {
        let s = ModelSpec::for_info("lenet5", Activation::Relu, &mnist_like()).unwrap();
        assert_eq!(s.sizes, vec![120, 84, 10]);
        assert_eq!((s.n_in(), s.first_width(), s.features.len()), (784, 6, 5));
        assert_eq!(
            s.to_string(),
            "1x28x28-conv5x6p2-maxpool2-conv5x16-maxpool2-conv5x120-120-84-10/relu"
        );
        // The expanded form, with flatten and the classes, names the same network.
        let t = ModelSpec::for_info(
            "conv5x6p2-maxpool2-conv5x16-maxpool2-conv5x120-flatten-84-10",
            Activation::Relu,
            &mnist_like(),
        )
        .unwrap();
        assert_eq!(s, t);
        // Dense specs still mean what they meant.
        let d = ModelSpec::for_info("128-32", Activation::Relu, &mnist_like()).unwrap();
        assert_eq!(
            d,
            ModelSpec::parse("784-128-32-10", Activation::Relu).unwrap()
        );
    }

    #[test]
    fn image_tokens_parse_and_print() {
        for (token, shown) in [
            ("conv3x32s2p1", "conv3x32s2p1"),
            ("conv5x6s1p0", "conv5x6"),
            ("maxpool3s2", "maxpool3s2"),
            ("avgpool2s2", "avgpool2"),
        ] {
            let f = FeatureSpec::parse(token).unwrap().unwrap();
            assert_eq!(f.to_string(), shown);
        }
        for bad in [
            "conv5",
            "conv5x",
            "convx6",
            "conv0x6",
            "conv5x0",
            "conv5x6s0",
            "conv5x6q1",
            "conv5x6p1p1",
            "maxpool",
            "maxpool2p1",
            "maxpool0",
            "avgpool2x3",
        ] {
            assert!(FeatureSpec::parse(bad).unwrap().is_err(), "{bad:?}");
        }
        assert!(FeatureSpec::parse("128").is_none());
    }

    #[test]
    fn image_specs_are_checked_against_the_data() {
        let info = mnist_like();
        let e = |s: &str| {
            ModelSpec::for_info(s, Activation::Relu, &info)
                .unwrap_err()
                .to_string()
        };
        assert!(e("maxpool2-conv5x6").contains("must be a convolution"));
        assert!(e("conv29x6").contains("does not fit"), "{}", e("conv29x6"));
        assert!(e("flatten-10").contains("must follow"));
        assert!(e("conv5x6-12-x").contains("not a positive integer"));
        let tabular = DatasetInfo::new(30, 255, 2).unwrap();
        assert!(ModelSpec::for_info("lenet5", Activation::Relu, &tabular)
            .unwrap_err()
            .to_string()
            .contains("image data"));
        // Only convolutions and pools: the classes follow the flattened features.
        let s = ModelSpec::for_info("conv3x4s2-avgpool13", Activation::Tanh, &info).unwrap();
        assert_eq!(s.sizes, vec![4, 10]);
    }
}
