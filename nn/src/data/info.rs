//! The dataset description: what every role must agree on about the data.
//!
//! A dataset is described once by [`DatasetInfo`]: `n` features per sample, a bound `X` on
//! the encoded feature values (every value is an integer in `0..=X`), `C` classes with their
//! names, and optionally an image shape (channels x height x width, `n = c·h·w`). The
//! description is public. It fixes the first layer's input: `n` features plus a bias input
//! encoded as `X` (float 1.0), so an inner-product row has length `n + 1` and the float value
//! of an encoded feature `v` is `v / X`. It travels in the authority's public parameters, the
//! encrypted-dataset header, checkpoints and model files, and every role checks the data it
//! is given against it ([`DatasetInfo::check_fits`]).

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Most classes a description may have (labels are stored as bytes).
pub const MAX_CLASSES: usize = 256;
/// Largest bound `X` on encoded values (values are stored as 16-bit integers).
pub const MAX_X_BOUND: u32 = u16::MAX as u32;
/// Most features a description may have: a first-layer row (the features and the bias)
/// is an inner-product vector, of length at most 2^24.
pub const MAX_FEATURES: usize = (1 << 24) - 1;

/// The shape of one image sample: `channels x height x width`, stored channel-major
/// (all of channel 0 row by row, then channel 1, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    /// Colour channels (1 for grey levels, 3 for RGB).
    pub channels: usize,
    /// Rows of pixels.
    pub height: usize,
    /// Columns of pixels.
    pub width: usize,
}

impl ImageShape {
    /// Number of values of one image, `channels · height · width` (`None` on overflow).
    pub fn len(&self) -> Option<usize> {
        self.channels
            .checked_mul(self.height)?
            .checked_mul(self.width)
    }

    /// Whether the shape holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// Why a description is invalid, or why data does not fit another description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// The description itself is inconsistent.
    #[error("invalid dataset description: {0}")]
    Invalid(String),
    /// Two descriptions disagree; the message gives both sides.
    #[error("the data does not fit: {0}")]
    Mismatch(String),
}

/// The public description of a dataset. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Features per sample `n` (pixels of an image, columns of a table).
    pub features: usize,
    /// Bound `X` on encoded values: every feature value is an integer in `0..=X`; the bias
    /// input is encoded as `X`.
    pub x_bound: u32,
    /// Number of classes `C`.
    pub classes: usize,
    /// Names of the classes in label order (empty when unnamed: label `k` is then `"k"`).
    pub class_names: Vec<String>,
    /// Image shape, when the samples are images.
    pub image: Option<ImageShape>,
}

impl DatasetInfo {
    /// A description of `features` features with values in `0..=x_bound` and `classes`
    /// unnamed classes, validated.
    pub fn new(features: usize, x_bound: u32, classes: usize) -> Result<Self, InfoError> {
        let info = DatasetInfo {
            features,
            x_bound,
            classes,
            class_names: Vec::new(),
            image: None,
        };
        info.validate()?;
        Ok(info)
    }

    /// The same description with class names (one per class).
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self, InfoError> {
        self.class_names = names;
        self.validate()?;
        Ok(self)
    }

    /// The same description with an image shape (whose size must be the feature count).
    pub fn with_image(mut self, shape: ImageShape) -> Result<Self, InfoError> {
        self.image = Some(shape);
        self.validate()?;
        Ok(self)
    }

    /// Checks the invariants: `1..=MAX_FEATURES` features, `1 <= X <= 65535`, `2..=256`
    /// classes, as many names as classes (or none), distinct non-empty names, an image shape
    /// whose size is the feature count.
    pub fn validate(&self) -> Result<(), InfoError> {
        let bad = |m: String| Err(InfoError::Invalid(m));
        if self.features == 0 {
            return bad("a sample needs at least one feature".into());
        }
        if self.features > MAX_FEATURES {
            return bad(format!(
                "{} features; a description may have at most {MAX_FEATURES}",
                self.features
            ));
        }
        if !(1..=MAX_X_BOUND).contains(&self.x_bound) {
            return bad(format!(
                "the value bound X = {} is outside 1..={MAX_X_BOUND}",
                self.x_bound
            ));
        }
        if !(2..=MAX_CLASSES).contains(&self.classes) {
            return bad(format!(
                "{} classes; a classifier needs 2..={MAX_CLASSES}",
                self.classes
            ));
        }
        if !self.class_names.is_empty() {
            if self.class_names.len() != self.classes {
                return bad(format!(
                    "{} class names for {} classes",
                    self.class_names.len(),
                    self.classes
                ));
            }
            let mut sorted: Vec<&String> = self.class_names.iter().collect();
            sorted.sort();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return bad(format!("class name {:?} appears twice", w[0]));
            }
            if self.class_names.iter().any(|n| n.is_empty()) {
                return bad("a class name is empty".into());
            }
        }
        if let Some(shape) = self.image {
            if shape.len() != Some(self.features) {
                return bad(format!(
                    "an image of {shape} has {} values, not the {} features",
                    shape
                        .len()
                        .map_or_else(|| "too many".to_string(), |l| l.to_string()),
                    self.features
                ));
            }
        }
        Ok(())
    }

    /// Length of a first-layer input row: the features and the bias input, `n + 1`.
    pub fn row_len(&self) -> usize {
        self.features + 1
    }

    /// The name of class `k` (its number when the classes are unnamed).
    pub fn class_name(&self, k: usize) -> Cow<'_, str> {
        match self.class_names.get(k) {
            Some(n) => Cow::Borrowed(n),
            None => Cow::Owned(k.to_string()),
        }
    }

    /// Checks that data described by `self` fits parameters made for `expected` (an
    /// authority's public parameters, a model): same features, bound and number of classes,
    /// and the same class names and image shape where both sides state them. The error gives
    /// both sides.
    pub fn check_fits(&self, expected: &DatasetInfo) -> Result<(), InfoError> {
        let mut diffs = Vec::new();
        if self.features != expected.features {
            diffs.push(format!(
                "the data has {} features, the parameters expect {}",
                self.features, expected.features
            ));
        }
        if self.x_bound > expected.x_bound {
            diffs.push(format!(
                "the data's values go up to {}, the parameters' bound is {}",
                self.x_bound, expected.x_bound
            ));
        } else if self.x_bound != expected.x_bound {
            diffs.push(format!(
                "the data is encoded for the bound {}, the parameters use {} \
                 (re-encode with --x-bound {})",
                self.x_bound, expected.x_bound, expected.x_bound
            ));
        }
        if self.classes != expected.classes {
            diffs.push(format!(
                "the data has {} classes, the parameters expect {}",
                self.classes, expected.classes
            ));
        } else if !self.class_names.is_empty()
            && !expected.class_names.is_empty()
            && self.class_names != expected.class_names
        {
            diffs.push(format!(
                "the data's classes are {:?}, the parameters' are {:?}",
                self.class_names, expected.class_names
            ));
        }
        if let (Some(a), Some(b)) = (self.image, expected.image) {
            if a != b {
                diffs.push(format!(
                    "the data's images are {a}, the parameters' are {b}"
                ));
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(InfoError::Mismatch(diffs.join("; ")))
        }
    }
}

impl fmt::Display for DatasetInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} features", self.features)?;
        if let Some(s) = self.image {
            write!(f, " ({s} images)")?;
        }
        write!(f, ", values 0..={}, {} classes", self.x_bound, self.classes)?;
        if !self.class_names.is_empty() {
            let shown: Vec<&str> = self
                .class_names
                .iter()
                .take(12)
                .map(|s| s.as_str())
                .collect();
            let more = if self.classes > 12 { ", ..." } else { "" };
            write!(f, " ({}{more})", shown.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn img(c: usize, h: usize, w: usize) -> ImageShape {
        ImageShape {
            channels: c,
            height: h,
            width: w,
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert!(DatasetInfo::new(784, 255, 10).is_ok());
        assert_eq!(
            DatasetInfo::new(MAX_FEATURES, 255, 2).unwrap().row_len(),
            1 << 24
        );
        for (f, x, c) in [
            (0, 255, 10),
            (4, 0, 10),
            (4, 70_000, 10),
            (4, 255, 1),
            (4, 255, 257),
            (MAX_FEATURES + 1, 255, 2),
            // Found by tests/decoders.rs in an encrypted-dataset header: `row_len` (n + 1)
            // overflowed in every reader that trusted a validated description.
            (usize::MAX, 255, 2),
        ] {
            assert!(DatasetInfo::new(f, x, c).is_err(), "{f} {x} {c}");
        }
        let d = DatasetInfo::new(12, 255, 2).unwrap();
        assert!(d.clone().with_image(img(3, 2, 2)).is_ok());
        let e = d.clone().with_image(img(1, 3, 3)).unwrap_err().to_string();
        assert!(e.contains("9") && e.contains("12"), "{e}");
        assert!(d.clone().with_class_names(vec!["a".into()]).is_err());
        assert!(d
            .clone()
            .with_class_names(vec!["a".into(), "a".into()])
            .is_err());
        let named = d.with_class_names(vec!["no".into(), "yes".into()]).unwrap();
        assert_eq!(named.class_name(1), "yes");
        assert_eq!(DatasetInfo::new(3, 9, 4).unwrap().class_name(3), "3");
    }

    #[test]
    fn fits_reports_both_sides() {
        let params = DatasetInfo::new(784, 255, 10).unwrap();
        let data = DatasetInfo::new(30, 15, 2).unwrap();
        let e = data.check_fits(&params).unwrap_err().to_string();
        for s in ["30", "784", "15", "255", "2 classes", "expect 10"] {
            assert!(e.contains(s), "{s} missing in {e}");
        }
        let named = params
            .clone()
            .with_class_names((0..10).map(|k| format!("c{k}")).collect())
            .unwrap()
            .with_image(img(1, 28, 28))
            .unwrap();
        // unnamed parameters accept named data, and the other way round
        assert!(named.check_fits(&params).is_ok());
        assert!(params.check_fits(&named).is_ok());
        let mut other = named.clone();
        other.class_names[3] = "x".into();
        assert!(other.check_fits(&named).is_err());
        let mut flat = named.clone();
        flat.image = Some(img(1, 14, 56));
        assert!(flat
            .check_fits(&named)
            .unwrap_err()
            .to_string()
            .contains("14"));
    }
}
