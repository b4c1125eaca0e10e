//! Raw samples as a loader reads them, before the client's encoding, and the one trait that
//! every loader implements.
//!
//! Image formats read bytes ([`RawValues::Bytes`]); tables read real numbers
//! ([`RawValues::Reals`]). Labels are class indices into `class_names`; data read with
//! [`LoadOptions::allow_unlabelled`] may have none (a user's inputs to predict). A [`RawSet`]
//! becomes a [`Dataset`] (or, labels optional, [`Inputs`](super::Inputs)) through an
//! [`Encoding`](super::encoding::Encoding) fitted on the training part, or directly
//! ([`RawSet::identity_dataset`]) when its values already are integers within the bound.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Axis, Slice};

use crate::data::{DataError, Dataset, DatasetInfo, ImageShape};

/// The feature values of raw samples, shape (N, features).
#[derive(Debug, Clone, PartialEq)]
pub enum RawValues {
    /// Bytes, as image formats store them.
    Bytes(Array2<u8>),
    /// Real numbers, as tables hold them.
    Reals(Array2<f64>),
}

impl RawValues {
    /// Number of samples.
    pub fn nrows(&self) -> usize {
        match self {
            RawValues::Bytes(v) => v.nrows(),
            RawValues::Reals(v) => v.nrows(),
        }
    }

    /// Number of features.
    pub fn ncols(&self) -> usize {
        match self {
            RawValues::Bytes(v) => v.ncols(),
            RawValues::Reals(v) => v.ncols(),
        }
    }

    /// Value at sample `i`, feature `j`, as a real number.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        match self {
            RawValues::Bytes(v) => f64::from(v[[i, j]]),
            RawValues::Reals(v) => v[[i, j]],
        }
    }
}

/// Raw samples, with their labels when the data has them, as read from files.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSet {
    /// Feature values, shape (N, features).
    pub values: RawValues,
    /// Class index of every sample, into `class_names`; `None` for data without labels.
    pub labels: Option<Vec<u8>>,
    /// Class names in label order (empty for data without labels until they are given,
    /// by [`RawSet::align_classes`]).
    pub class_names: Vec<String>,
    /// The table column that held the labels (tables with labels only).
    pub label_column: Option<String>,
    /// One name per feature (a table's header, `pixelI` for images).
    pub feature_names: Vec<String>,
    /// The image shape, for image formats.
    pub image: Option<ImageShape>,
}

impl RawSet {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.values.nrows()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the samples have labels.
    pub fn is_labelled(&self) -> bool {
        self.labels.is_some()
    }

    /// Number of features per sample.
    pub fn features(&self) -> usize {
        self.values.ncols()
    }

    /// The first `n` samples (all if `n >= len`).
    pub fn take(mut self, n: usize) -> RawSet {
        if n >= self.len() {
            return self;
        }
        self.values = match self.values {
            RawValues::Bytes(v) => {
                RawValues::Bytes(v.slice_axis(Axis(0), Slice::from(..n)).to_owned())
            }
            RawValues::Reals(v) => {
                RawValues::Reals(v.slice_axis(Axis(0), Slice::from(..n)).to_owned())
            }
        };
        if let Some(l) = &mut self.labels {
            l.truncate(n);
        }
        self
    }

    /// Relabels the samples for the class list `names` (a training set's), by name: a test
    /// set whose classes are a subset of the training set's gets the training set's indices.
    /// A class that `names` lacks is an error naming it. Samples without labels simply take
    /// the class list `names`.
    pub fn align_classes(&mut self, names: &[String]) -> Result<(), DataError> {
        if self.class_names == names {
            return Ok(());
        }
        let Some(labels) = &mut self.labels else {
            self.class_names = names.to_vec();
            return Ok(());
        };
        let map: Vec<u8> = self
            .class_names
            .iter()
            .map(|n| {
                names
                    .iter()
                    .position(|m| m == n)
                    .and_then(|k| u8::try_from(k).ok())
                    .ok_or_else(|| DataError::Format {
                        what: "labels".into(),
                        reason: format!(
                            "class {n:?} is not one of the {} known classes {names:?}",
                            names.len()
                        ),
                    })
            })
            .collect::<Result<_, _>>()?;
        for l in labels.iter_mut() {
            *l = map[usize::from(*l)];
        }
        self.class_names = names.to_vec();
        Ok(())
    }

    /// The description of these samples once encoded with values in `0..=x_bound`. Samples
    /// without labels need their class list first ([`RawSet::align_classes`]).
    pub fn info(&self, x_bound: u32) -> Result<DatasetInfo, DataError> {
        if self.labels.is_none() && self.class_names.is_empty() {
            return Err(DataError::Unlabelled(
                "the samples have no labels and no class list was given".into(),
            ));
        }
        let mut info = DatasetInfo::new(self.features(), x_bound, self.class_names.len())?
            .with_class_names(self.class_names.clone())?;
        if let Some(shape) = self.image {
            info = info.with_image(shape)?;
        }
        Ok(info)
    }

    /// The dataset of these samples with their values unchanged: every value must already be
    /// an integer in `0..=x_bound` (image bytes with `x_bound >= 255`, for example).
    pub fn identity_dataset(&self, x_bound: u32) -> Result<Dataset, DataError> {
        let (n, f) = (self.len(), self.features());
        let mut out = Array2::<u16>::zeros((n, f));
        for ((i, j), o) in out.indexed_iter_mut() {
            let v = self.values.get(i, j);
            if v.fract() != 0.0 || !(0.0..=f64::from(x_bound)).contains(&v) {
                return Err(DataError::Format {
                    what: format!("sample {i}, feature {:?}", self.feature_names[j]),
                    reason: format!(
                        "value {v} is not an integer in 0..={x_bound}; encode the data \
                         (an encoding maps every column into 0..=X)"
                    ),
                });
            }
            *o = v as u16;
        }
        let labels = self
            .labels
            .clone()
            .ok_or_else(|| DataError::Unlabelled("the samples".into()))?;
        Dataset::new(out, labels, self.info(x_bound)?)
    }

    /// A training and a test set, values unchanged ([`RawSet::identity_dataset`]), the test
    /// set relabelled for the union of both sets' classes in the training set's order.
    pub fn identity_pair(
        mut train: RawSet,
        mut test: RawSet,
        x_bound: u32,
    ) -> Result<(Dataset, Dataset), DataError> {
        let names = union_classes(&train.class_names, &test.class_names);
        train.align_classes(&names)?;
        test.align_classes(&names)?;
        Ok((
            train.identity_dataset(x_bound)?,
            test.identity_dataset(x_bound)?,
        ))
    }
}

/// `a` followed by the names of `b` that `a` lacks, ordered like numbers when all are
/// numbers and by name otherwise (so `"0".."9"` stay in digit order).
pub fn union_classes(a: &[String], b: &[String]) -> Vec<String> {
    let mut out = a.to_vec();
    for n in b {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    sort_class_names(&mut out);
    out
}

/// Sorts class names numerically when every name is an integer, else by name.
pub fn sort_class_names(names: &mut [String]) {
    let numbers: Option<Vec<i64>> = names.iter().map(|n| n.trim().parse().ok()).collect();
    if numbers.is_some() {
        names.sort_by_key(|n| n.trim().parse::<i64>().unwrap_or(i64::MAX));
    } else {
        names.sort();
    }
}

/// The file formats the loaders read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A directory with the four MNIST-style IDX files (any image size).
    Idx,
    /// A CIFAR-10 binary directory (`data_batch_1.bin` ... `test_batch.bin`).
    Cifar10,
    /// A CSV table with a header row.
    Csv,
}

/// Options that some formats take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The CSV column holding the labels (default: the last).
    pub label_column: Option<String>,
    /// Read data without labels as samples without labels (inputs to predict) instead of
    /// refusing it: a CSV table whose header lacks the named `label_column`, IDX images
    /// without a label file beside them.
    pub allow_unlabelled: bool,
}

/// A source of raw samples: one training part and, when the source has one, a test part.
pub trait Loader {
    /// The format's name, for messages.
    fn format(&self) -> Format;
    /// Reads the samples: `(train, test)`.
    fn read(&self) -> Result<(RawSet, Option<RawSet>), DataError>;
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "idx" | "mnist" => Ok(Format::Idx),
            "cifar10" | "cifar-10" | "cifar" => Ok(Format::Cifar10),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("unknown format {s:?}: idx, cifar10 or csv")),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Idx => "idx",
            Format::Cifar10 => "cifar10",
            Format::Csv => "csv",
        })
    }
}

impl Format {
    /// Guesses the format of `path`: a `.csv` file, a directory with CIFAR-10's batches, or
    /// a directory with MNIST's IDX file names.
    pub fn detect(path: &Path) -> Result<Format, DataError> {
        if path.is_file() {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if super::idx::is_images_name(path) {
                return Ok(Format::Idx);
            }
            return match ext.as_deref() {
                Some("csv") => Ok(Format::Csv),
                _ => Err(DataError::Format {
                    what: path.display().to_string(),
                    reason: "a data file must be a .csv table or an IDX image file \
                             (...images-idx3-ubyte[.gz]); or give --format"
                        .into(),
                }),
            };
        }
        if !path.is_dir() {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        if super::cifar::is_cifar_dir(path) {
            return Ok(Format::Cifar10);
        }
        if super::mnist::is_idx_dir(path) {
            return Ok(Format::Idx);
        }
        Err(DataError::Format {
            what: path.display().to_string(),
            reason: "neither MNIST-style IDX files (train-images-idx3-ubyte[.gz], ...) nor \
                     CIFAR-10 batches (data_batch_1.bin, ...) are in this directory"
                .into(),
        })
    }

    /// The loader of this format for `path`.
    pub fn loader(self, path: &Path, opts: &LoadOptions) -> Box<dyn Loader> {
        let path = path.to_path_buf();
        match self {
            Format::Idx => Box::new(IdxDir {
                path,
                allow_unlabelled: opts.allow_unlabelled,
            }),
            Format::Cifar10 => Box::new(super::cifar::CifarDir(path)),
            Format::Csv => Box::new(super::csv::CsvFile {
                path,
                label_column: opts.label_column.clone(),
                allow_unlabelled: opts.allow_unlabelled,
            }),
        }
    }
}

/// An IDX source: a directory (MNIST-style names) or an image file.
#[derive(Debug, Clone)]
pub struct IdxDir {
    /// The directory or image file.
    pub path: PathBuf,
    /// Whether images without a label file are read (without labels) instead of refused.
    pub allow_unlabelled: bool,
}

impl Loader for IdxDir {
    fn format(&self) -> Format {
        Format::Idx
    }
    fn read(&self) -> Result<(RawSet, Option<RawSet>), DataError> {
        if self.path.is_dir() {
            super::mnist::read_dir(&self.path, self.allow_unlabelled)
        } else {
            super::idx::read_path(&self.path, self.allow_unlabelled)
        }
    }
}

/// Opens `path` with `format`, or with the detected format.
pub fn open(
    path: &Path,
    format: Option<Format>,
    opts: &LoadOptions,
) -> Result<Box<dyn Loader>, DataError> {
    let f = match format {
        Some(f) => f,
        None => Format::detect(path)?,
    };
    Ok(f.loader(path, opts))
}
