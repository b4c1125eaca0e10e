//! Datasets of encoded samples with class labels, their description, the loaders of every
//! supported format, and the fixed batch partition.
//!
//! A [`Dataset`] holds samples already encoded as integers `0..=X`, one sample per row, with
//! the [`DatasetInfo`] that describes them ([`info`]); the float value of an encoded value
//! `v` is `v / X`. Loaders ([`mnist`], [`idx`], ...) read files into datasets. [`Inputs`] are
//! the same samples with optional labels: what a prediction service's user has to predict.
//!
//! A dataset of `N` samples is cut into `ceil(N / B)` consecutive batches of `B` samples, the
//! last one possibly shorter (or dropped). This partition is fixed: an encrypted dataset is
//! encrypted batch by batch, so training may reorder batches between epochs but never change
//! their contents. [`Dataset::shuffled`] offers a one-time seeded shuffle of the samples before
//! partitioning.

use std::ops::Range;
use std::path::PathBuf;

use ndarray::{Array2, ArrayView2, Axis, Slice};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub mod cifar;
pub mod csv;
pub mod encoding;
pub mod idx;
pub mod info;
pub mod mnist;
pub mod raw;

pub use encoding::{EncodeReport, Encoding};
pub use info::{DatasetInfo, ImageShape, InfoError};
pub use raw::{Format, LoadOptions, Loader, RawSet, RawValues};

/// Errors of data loading, validation and partitioning.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A required file is missing from a data directory.
    #[error("no {name} (or its uncompressed form) in {dir}")]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// The standard file name looked for.
        name: &'static str,
    },
    /// The gzip stream is corrupted or truncated.
    #[error("corrupted or truncated gzip data in {what}: {source}")]
    Gzip {
        /// Which file or buffer.
        what: String,
        /// The decoder's error.
        source: std::io::Error,
    },
    /// Decompressed data exceeds the size limit.
    #[error("{what} decompresses to more than {limit} bytes")]
    TooLarge {
        /// Which file or buffer.
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The IDX header is shorter than its fixed size.
    #[error("{what} is truncated: the IDX header needs {needed} bytes, found {found}")]
    TruncatedHeader {
        /// Which file or buffer.
        what: String,
        /// Header size.
        needed: usize,
        /// Bytes available.
        found: usize,
    },
    /// The IDX magic number is not the expected one.
    #[error("{what} has magic number {found:#010x}, expected {expected:#010x} ({kind})")]
    BadMagic {
        /// Which file or buffer.
        what: String,
        /// The expected magic.
        expected: u32,
        /// The magic found.
        found: u32,
        /// What the expected magic means.
        kind: &'static str,
    },
    /// The header declares dimensions that are zero or absurdly large.
    #[error("{what} declares invalid dimensions {dims:?}: {reason}")]
    BadDims {
        /// Which file or buffer.
        what: String,
        /// The declared dimensions.
        dims: Vec<u32>,
        /// What is wrong.
        reason: &'static str,
    },
    /// The payload length does not match the header.
    #[error("{what}: the header announces {expected} payload bytes but {found} are present ({})",
        if found < expected { "truncated" } else { "trailing garbage" })]
    PayloadLength {
        /// Which file or buffer.
        what: String,
        /// Bytes required by the header.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// Samples and labels do not have the same number of items.
    #[error("{images} samples but {labels} labels")]
    CountMismatch {
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A label is not a valid class.
    #[error("label {label} of item {index} is not below the number of classes {classes}")]
    LabelOutOfRange {
        /// Item index.
        index: usize,
        /// The label.
        label: u8,
        /// Number of classes.
        classes: usize,
    },
    /// The description's feature count does not match the data.
    #[error("the samples have {found} features, the description says {expected}")]
    FeatureCount {
        /// Features per row of the value matrix.
        found: usize,
        /// Features of the description.
        expected: usize,
    },
    /// An invalid argument to a split or batching helper.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The dataset description is invalid or does not fit.
    #[error(transparent)]
    Info(#[from] InfoError),
    /// An encoded value exceeds the description's bound.
    #[error("value {value} of sample {index}, feature {feature} exceeds the bound {bound}")]
    ValueOutOfRange {
        /// Sample index.
        index: usize,
        /// Feature index.
        feature: usize,
        /// The value.
        value: u16,
        /// The description's bound `X`.
        bound: u32,
    },
    /// Labels are needed but the data has none.
    #[error("{0} has no labels")]
    Unlabelled(String),
    /// A file's content is not what its format requires.
    #[error("{what}: {reason}")]
    Format {
        /// Which file, row or field.
        what: String,
        /// What is wrong.
        reason: String,
    },
}

/// Encoded samples (rows of integers `0..=X`) with labels and their description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// Encoded values, shape (N, features).
    pub values: Array2<u16>,
    /// One class label per sample, below `info.classes`.
    pub labels: Vec<u8>,
    /// The description: features, bound, classes, image shape.
    pub info: DatasetInfo,
}

/// Encoded samples to predict, with labels only when the data has them (an experimenter's
/// test set has them, a prediction service's user has none): a [`Dataset`] whose labels are
/// optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// Encoded values, shape (N, features).
    pub values: Array2<u16>,
    /// One class label per sample, below `info.classes`, or `None`.
    pub labels: Option<Vec<u8>>,
    /// The description: features, bound, classes, image shape.
    pub info: DatasetInfo,
}

impl Inputs {
    /// Builds inputs, checking that shapes, values and the labels if any fit `info`.
    pub fn new(
        values: Array2<u16>,
        labels: Option<Vec<u8>>,
        info: DatasetInfo,
    ) -> Result<Self, DataError> {
        info.validate()?;
        if values.ncols() != info.features {
            return Err(DataError::FeatureCount {
                found: values.ncols(),
                expected: info.features,
            });
        }
        if let Some(labels) = &labels {
            if values.nrows() != labels.len() {
                return Err(DataError::CountMismatch {
                    images: values.nrows(),
                    labels: labels.len(),
                });
            }
        }
        if let Some(((index, feature), &value)) = values
            .indexed_iter()
            .find(|(_, &v)| u32::from(v) > info.x_bound)
        {
            return Err(DataError::ValueOutOfRange {
                index,
                feature,
                value,
                bound: info.x_bound,
            });
        }
        if let Some(labels) = &labels {
            check_labels(labels, info.classes)?;
        }
        Ok(Inputs {
            values,
            labels,
            info,
        })
    }

    /// Number of samples N.
    pub fn len(&self) -> usize {
        self.values.nrows()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` samples (all of them if `n >= len`).
    pub fn take(mut self, n: usize) -> Inputs {
        if n < self.len() {
            self.values = self.values.slice_axis(Axis(0), Slice::from(..n)).to_owned();
            if let Some(l) = &mut self.labels {
                l.truncate(n);
            }
        }
        self
    }

    /// The integer input row of sample `i`: its values and the bias input `X`.
    pub fn row(&self, i: usize) -> Vec<i64> {
        input_row(self.values.view(), i, self.info.x_bound)
    }

    /// The labelled dataset, or [`DataError::Unlabelled`] if the inputs have no labels.
    pub fn into_dataset(self) -> Result<Dataset, DataError> {
        match self.labels {
            Some(labels) => Ok(Dataset {
                values: self.values,
                labels,
                info: self.info,
            }),
            None => Err(DataError::Unlabelled("the data".into())),
        }
    }
}

impl From<Dataset> for Inputs {
    fn from(d: Dataset) -> Inputs {
        Inputs {
            values: d.values,
            labels: Some(d.labels),
            info: d.info,
        }
    }
}

/// Checks that every label is below `classes`.
fn check_labels(labels: &[u8], classes: usize) -> Result<(), DataError> {
    match labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        Some((index, &label)) => Err(DataError::LabelOutOfRange {
            index,
            label,
            classes,
        }),
        None => Ok(()),
    }
}

/// Row `i` of `values` as integers, with the bias input `x_bound` appended.
fn input_row(values: ArrayView2<u16>, i: usize, x_bound: u32) -> Vec<i64> {
    let mut r: Vec<i64> = values.row(i).iter().map(|&v| i64::from(v)).collect();
    r.push(i64::from(x_bound));
    r
}

impl Dataset {
    /// Builds a dataset, checking that shapes, counts, values and labels fit `info`.
    pub fn new(values: Array2<u16>, labels: Vec<u8>, info: DatasetInfo) -> Result<Self, DataError> {
        Inputs::new(values, Some(labels), info)?.into_dataset()
    }

    /// A set of one-channel `height x width` images of bytes (bound 255) with labels in
    /// `0..classes`, the classes unnamed.
    pub fn grey_images(
        pixels: Array2<u8>,
        labels: Vec<u8>,
        height: usize,
        width: usize,
        classes: usize,
    ) -> Result<Self, DataError> {
        let info = DatasetInfo::new(pixels.ncols(), 255, classes)?.with_image(ImageShape {
            channels: 1,
            height,
            width,
        })?;
        Dataset::new(pixels.mapv(u16::from), labels, info)
    }

    /// Number of samples N.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset has no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of input features per sample.
    pub fn features(&self) -> usize {
        self.values.ncols()
    }

    /// Checks that every label is below `classes`.
    pub fn check_labels(&self, classes: usize) -> Result<(), DataError> {
        check_labels(&self.labels, classes)
    }

    /// Number of samples of each class `0..classes` (labels beyond are not counted).
    pub fn class_counts(&self, classes: usize) -> Vec<usize> {
        let mut c = vec![0; classes];
        for &l in &self.labels {
            if let Some(x) = c.get_mut(l as usize) {
                *x += 1;
            }
        }
        c
    }

    /// All samples as floats `v / X`, shape (N, features).
    pub fn normalized(&self) -> Array2<f32> {
        normalize(self.values.view(), self.info.x_bound)
    }

    /// Samples `range` as a new dataset (the range is clamped to the dataset).
    pub fn slice(&self, range: Range<usize>) -> Dataset {
        let end = range.end.min(self.len());
        let start = range.start.min(end);
        Dataset {
            values: self
                .values
                .slice_axis(Axis(0), Slice::from(start..end))
                .to_owned(),
            labels: self.labels[start..end].to_vec(),
            info: self.info.clone(),
        }
    }

    /// The first `n` samples (all of them if `n >= len`).
    pub fn take(&self, n: usize) -> Dataset {
        self.slice(0..n)
    }

    /// Splits into the first `n` samples and the rest.
    pub fn split_at(&self, n: usize) -> Result<(Dataset, Dataset), DataError> {
        if n > self.len() {
            return Err(DataError::Invalid(format!(
                "cannot split {} samples at {n}",
                self.len()
            )));
        }
        Ok((self.slice(0..n), self.slice(n..self.len())))
    }

    /// Splits into a first part holding `fraction` of the samples (rounded down) and the
    /// rest, e.g. `split_fraction(0.9)` for a 90/10 train/validation split.
    pub fn split_fraction(&self, fraction: f64) -> Result<(Dataset, Dataset), DataError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(DataError::Invalid(format!(
                "split fraction {fraction} outside [0, 1]"
            )));
        }
        self.split_at((self.len() as f64 * fraction).floor() as usize)
    }

    /// A copy with the samples permuted by a seeded shuffle (ChaCha8 seeded with `seed`).
    pub fn shuffled(&self, seed: u64) -> Dataset {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        Dataset {
            values: self.values.select(Axis(0), &idx),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            info: self.info.clone(),
        }
    }

    /// The fixed partition into batches of `batch_size` (see [`Batches::new`]).
    pub fn batches(&self, batch_size: usize, drop_last: bool) -> Result<Batches, DataError> {
        Batches::new(self.len(), batch_size, drop_last)
    }

    /// Encoded values of samples `range` with the bias input `X` appended, shape
    /// (B, features + 1): the integer inputs `X_int` of the first layer.
    pub fn augmented(&self, range: Range<usize>) -> Array2<i64> {
        let end = range.end.min(self.len());
        let start = range.start.min(end);
        let n = self.features();
        let mut out = Array2::from_elem((end - start, n + 1), i64::from(self.info.x_bound));
        out.slice_axis_mut(Axis(1), Slice::from(..n)).assign(
            &self
                .values
                .slice_axis(Axis(0), Slice::from(start..end))
                .mapv(i64::from),
        );
        out
    }

    /// A copy with Gaussian noise of standard deviation `sigma` (in encoded units) added to
    /// every value, rounded and clamped to `0..=X`, labels unchanged: client-side input noise
    /// before encryption (a Gaussian mechanism; see the README's threat model for what it
    /// does and does not protect). The draws come from `rng`.
    pub fn with_noise<R: rand::Rng>(&self, sigma: f64, rng: &mut R) -> Result<Dataset, DataError> {
        if !sigma.is_finite() || sigma < 0.0 {
            return Err(DataError::Invalid(format!(
                "the noise standard deviation must be a finite non-negative number, got {sigma}"
            )));
        }
        let mut out = self.clone();
        if sigma == 0.0 {
            return Ok(out);
        }
        let x = f64::from(out.info.x_bound);
        for p in out.values.iter_mut() {
            // Box-Muller: one standard normal from two uniforms in (0, 1].
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            *p = (f64::from(*p) + sigma * g).round().clamp(0.0, x) as u16;
        }
        Ok(out)
    }

    /// The integer input row of sample `i`: its values and the bias input `X`.
    pub fn row(&self, i: usize) -> Vec<i64> {
        input_row(self.values.view(), i, self.info.x_bound)
    }
}

/// `v / x_bound` element-wise: the float values of encoded integers.
pub fn normalize(values: ArrayView2<u16>, x_bound: u32) -> Array2<f32> {
    let x = x_bound as f32;
    values.mapv(|v| v as f32 / x)
}

/// A fixed partition of `0..n` into consecutive batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batches {
    n: usize,
    batch_size: usize,
    count: usize,
}

impl Batches {
    /// Batches `[0, B), [B, 2B), ...` of `n` samples; the last one is shorter when `B` does
    /// not divide `n`, unless `drop_last`, which drops it. `batch_size` must be positive.
    pub fn new(n: usize, batch_size: usize, drop_last: bool) -> Result<Self, DataError> {
        if batch_size == 0 {
            return Err(DataError::Invalid("batch size must be positive".into()));
        }
        let count = if drop_last {
            n / batch_size
        } else {
            n.div_ceil(batch_size)
        };
        Ok(Batches {
            n,
            batch_size,
            count,
        })
    }

    /// Number of batches.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is no batch.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of samples of the partitioned set (covered or not).
    pub fn samples(&self) -> usize {
        self.n
    }

    /// The nominal batch size B.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of samples covered by the batches.
    pub fn covered(&self) -> usize {
        (self.count * self.batch_size).min(self.n)
    }

    /// Sample indices of batch `i`, or `None` if there is no such batch.
    pub fn range(&self, i: usize) -> Option<Range<usize>> {
        if i >= self.count {
            return None;
        }
        let start = i * self.batch_size;
        Some(start..(start + self.batch_size).min(self.n))
    }

    /// Length of batch `i` (0 if there is no such batch).
    pub fn batch_len(&self, i: usize) -> usize {
        self.range(i).map_or(0, |r| r.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ndarray::array;

    fn toy() -> Dataset {
        let values = Array2::from_shape_fn((10, 4), |(i, j)| (i * 4 + j) as u16);
        let info = DatasetInfo::new(4, 255, 3).unwrap();
        Dataset::new(values, (0..10).map(|i| (i % 3) as u8).collect(), info).unwrap()
    }

    #[test]
    fn batches_partition() {
        let b = Batches::new(10, 4, false).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b.range(2), Some(8..10));
        assert_eq!(b.range(3), None);
        let d = Batches::new(10, 4, true).unwrap();
        assert_eq!((d.len(), d.covered()), (2, 8));
        assert!(Batches::new(10, 0, false).is_err());
    }

    #[test]
    fn shuffle_is_seeded_permutation() {
        let d = toy();
        let a = d.shuffled(1);
        assert_eq!(a, d.shuffled(1));
        assert_ne!(a.labels, d.labels);
        for (i, row) in a.values.rows().into_iter().enumerate() {
            let orig = row[0] as usize / 4;
            assert_eq!(a.labels[i], d.labels[orig]);
        }
    }

    #[test]
    fn splits_and_validation() {
        let d = toy();
        let (a, b) = d.split_fraction(0.7).unwrap();
        assert_eq!((a.len(), b.len()), (7, 3));
        assert_eq!(b.labels, vec![1, 2, 0]);
        assert!(d.split_at(11).is_err());
        assert!(d.check_labels(3).is_ok());
        assert!(matches!(
            d.check_labels(2),
            Err(DataError::LabelOutOfRange { index: 2, .. })
        ));
        assert_eq!(d.class_counts(3), vec![4, 3, 3]);
        let info = DatasetInfo::new(4, 9, 3).unwrap();
        assert!(Dataset::new(Array2::zeros((2, 4)), vec![0], info.clone()).is_err());
        assert!(Dataset::new(Array2::zeros((1, 3)), vec![0], info.clone()).is_err());
        assert!(Dataset::new(Array2::zeros((1, 4)), vec![3], info.clone()).is_err());
        let mut big = Array2::zeros((1, 4));
        big[[0, 2]] = 10;
        assert!(matches!(
            Dataset::new(big, vec![0], info),
            Err(DataError::ValueOutOfRange {
                feature: 2,
                value: 10,
                ..
            })
        ));
    }

    #[test]
    fn augmented_pixels_have_bias_column() {
        let d = toy();
        let x = d.augmented(1..3);
        assert_eq!(x, array![[4, 5, 6, 7, 255], [8, 9, 10, 11, 255]]);
        assert_eq!(d.row(2), vec![8, 9, 10, 11, 255]);
    }
}
