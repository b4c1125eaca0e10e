//! MNIST: its standard file names, the full set from a directory, and the embedded subset.
//!
//! The files are in the [IDX format](super::idx). A real subset (the first 6,000 training and
//! the first 1,000 test images of MNIST, by Y. LeCun, C. Cortes and C. J. C. Burges, CC BY-SA
//! 3.0) is compiled into the library and returned by [`embedded`], so that everything runs on
//! a fresh clone. The full set is read with [`load_dir`] from a directory named by a flag or
//! by the [`MNIST_DIR_ENV`] variable. This module is the only place that knows MNIST's shape
//! (784 features, 10 classes, values up to 255).

use std::path::{Path, PathBuf};

use crate::data::idx::{self, encode_images, encode_labels, gzip};
use crate::data::raw::RawSet;
use crate::data::{DataError, Dataset, DatasetInfo, ImageShape};

/// Environment variable naming a directory with the full MNIST files.
pub const MNIST_DIR_ENV: &str = "CRYPTONN_MNIST_DIR";
/// Pixels of an MNIST image (28 x 28).
pub const FEATURES: usize = 784;
/// Number of MNIST classes (digits 0 to 9).
pub const CLASSES: usize = 10;
/// Largest MNIST pixel value.
pub const X_BOUND: u32 = 255;
/// Standard file name of the training images.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
/// Standard file name of the training labels.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
/// Standard file name of the test images.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
/// Standard file name of the test labels.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";
/// Number of training samples in the embedded subset.
pub const EMBEDDED_TRAIN_LEN: usize = 6000;
/// Number of test samples in the embedded subset.
pub const EMBEDDED_TEST_LEN: usize = 1000;

static EMBEDDED_TRAIN_IMAGES: &[u8] =
    include_bytes!("../../data/mnist-subset/train-images-idx3-ubyte.gz");
static EMBEDDED_TRAIN_LABELS: &[u8] =
    include_bytes!("../../data/mnist-subset/train-labels-idx1-ubyte.gz");
static EMBEDDED_TEST_IMAGES: &[u8] =
    include_bytes!("../../data/mnist-subset/t10k-images-idx3-ubyte.gz");
static EMBEDDED_TEST_LABELS: &[u8] =
    include_bytes!("../../data/mnist-subset/t10k-labels-idx1-ubyte.gz");

/// The description of MNIST: 1x28x28 grey images with values up to 255, digits 0 to 9.
pub fn info() -> DatasetInfo {
    DatasetInfo {
        features: FEATURES,
        x_bound: X_BOUND,
        classes: CLASSES,
        class_names: (0..CLASSES).map(|k| k.to_string()).collect(),
        image: Some(ImageShape {
            channels: 1,
            height: 28,
            width: 28,
        }),
    }
}

/// Finds `name` (a `.gz` standard name) in `dir`, or its name without `.gz`.
fn find(dir: &Path, name: &'static str) -> Result<PathBuf, DataError> {
    let gz = dir.join(name);
    if gz.is_file() {
        return Ok(gz);
    }
    let raw = dir.join(name.trim_end_matches(".gz"));
    if raw.is_file() {
        return Ok(raw);
    }
    Err(DataError::MissingFile {
        dir: dir.to_path_buf(),
        name,
    })
}

/// Whether `dir` holds the training images of an MNIST-style directory (gzip or raw,
/// MNIST's name or any `...train-images-idx3-ubyte`).
pub fn is_idx_dir(dir: &Path) -> bool {
    find(dir, TRAIN_IMAGES).is_ok() || idx::train_images_in(dir).is_ok()
}

/// Reads `(train, test)` from a directory holding the four standard MNIST file names (any
/// IDX image size: Fashion-MNIST and KMNIST use the same names), each gzip-compressed
/// (`*.gz`) or raw (the same name without `.gz`), or other IDX names ([`idx::read_path`]).
/// The test files are optional: `test` is `None` when neither is there. A label file
/// missing beside its images is an error, or, with `allow_unlabelled`, images without labels.
pub fn read_dir(dir: &Path, allow_unlabelled: bool) -> Result<(RawSet, Option<RawSet>), DataError> {
    let Ok(train_images) = find(dir, TRAIN_IMAGES) else {
        return idx::read_path(dir, allow_unlabelled);
    };
    let labels = |name| match find(dir, name) {
        Err(_) if allow_unlabelled => Ok(None),
        l => l.map(Some),
    };
    let train = idx::load_images(&train_images, labels(TRAIN_LABELS)?.as_deref())?;
    let test = match find(dir, TEST_IMAGES) {
        Ok(i) => Some(idx::load_images(&i, labels(TEST_LABELS)?.as_deref())?),
        Err(e) => match find(dir, TEST_LABELS) {
            Ok(_) => return Err(e),
            Err(_) => None,
        },
    };
    Ok((train, test))
}

/// Loads `(train, test)` from an MNIST directory ([`read_dir`], both parts required), with
/// values kept as they are (bound 255) and the classes of both parts together.
pub fn load_dir(dir: impl AsRef<Path>) -> Result<(Dataset, Dataset), DataError> {
    let dir = dir.as_ref();
    let (train, test) = read_dir(dir, false)?;
    let test = test.ok_or(DataError::MissingFile {
        dir: dir.to_path_buf(),
        name: TEST_IMAGES,
    })?;
    RawSet::identity_pair(train, test, X_BOUND)
}

/// The embedded subset: `(train, test)` with 6,000 and 1,000 samples.
pub fn embedded() -> Result<(Dataset, Dataset), DataError> {
    let (train, test) = embedded_raw()?;
    RawSet::identity_pair(train, test, X_BOUND)
}

/// The embedded subset as raw samples, before encoding.
pub fn embedded_raw() -> Result<(RawSet, RawSet), DataError> {
    let train = idx::parse_pair(
        "embedded MNIST train",
        EMBEDDED_TRAIN_IMAGES,
        EMBEDDED_TRAIN_LABELS,
    )?;
    let test = idx::parse_pair(
        "embedded MNIST test",
        EMBEDDED_TEST_IMAGES,
        EMBEDDED_TEST_LABELS,
    )?;
    Ok((train, test))
}

/// Where a dataset came from, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory of IDX files.
    Dir(PathBuf),
    /// The embedded subset.
    Embedded,
}

/// Loads `dir` if given, else the directory in [`MNIST_DIR_ENV`] if set and non-empty, else
/// the embedded subset. Returns `(train, test, source)`.
pub fn load(dir: Option<&Path>) -> Result<(Dataset, Dataset, Source), DataError> {
    let from_env = std::env::var_os(MNIST_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    match dir.map(Path::to_path_buf).or(from_env) {
        Some(d) => {
            let (train, test) = load_dir(&d)?;
            Ok((train, test, Source::Dir(d)))
        }
        None => {
            let (train, test) = embedded()?;
            Ok((train, test, Source::Embedded))
        }
    }
}

/// Writes `train` and `test` as the four standard gzip IDX files into `dir` (created if
/// missing).
pub fn write_dir(dir: impl AsRef<Path>, train: &Dataset, test: &Dataset) -> Result<(), DataError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = [
        (TRAIN_IMAGES, encode_images(train)?),
        (TRAIN_LABELS, encode_labels(&train.labels)?),
        (TEST_IMAGES, encode_images(test)?),
        (TEST_LABELS, encode_labels(&test.labels)?),
    ];
    for (name, raw) in files {
        let path = dir.join(name);
        std::fs::write(&path, gzip(&raw)).map_err(|source| DataError::Io { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn small() -> Dataset {
        let values = ndarray::Array2::from_shape_fn((10, 6), |(i, j)| (i * 6 + j) as u16);
        let info = DatasetInfo::new(6, X_BOUND, CLASSES)
            .unwrap()
            .with_class_names((0..CLASSES).map(|k| k.to_string()).collect())
            .unwrap()
            .with_image(ImageShape {
                channels: 1,
                height: 2,
                width: 3,
            })
            .unwrap();
        Dataset::new(values, vec![3, 9, 0, 1, 2, 4, 5, 6, 7, 8], info).unwrap()
    }

    #[test]
    fn load_dir_reads_gz_and_raw_and_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = small();
        write_dir(dir.path(), &d, &d).unwrap();
        let (a, b) = load_dir(dir.path()).unwrap();
        assert_eq!((a, b), (d.clone(), d.clone()));

        // Replace one file by its raw form.
        std::fs::remove_file(dir.path().join(TEST_LABELS)).unwrap();
        assert!(matches!(
            load_dir(dir.path()),
            Err(DataError::MissingFile {
                name: TEST_LABELS,
                ..
            })
        ));
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            encode_labels(&d.labels).unwrap(),
        )
        .unwrap();
        assert_eq!(load_dir(dir.path()).unwrap().1, d);

        // A truncated file on disk names the file in its error.
        std::fs::write(
            dir.path().join(TRAIN_IMAGES),
            &gzip(&encode_images(&d).unwrap())[..20],
        )
        .unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(TRAIN_IMAGES), "{err}");
    }

    #[test]
    fn a_directory_of_images_without_label_files_reads_without_labels() {
        let dir = tempfile::tempdir().unwrap();
        let d = small();
        write_dir(dir.path(), &d, &d).unwrap();
        std::fs::remove_file(dir.path().join(TRAIN_LABELS)).unwrap();
        std::fs::remove_file(dir.path().join(TEST_LABELS)).unwrap();
        assert!(matches!(
            read_dir(dir.path(), false),
            Err(DataError::MissingFile {
                name: TRAIN_LABELS,
                ..
            })
        ));
        let (train, test) = read_dir(dir.path(), true).unwrap();
        let test = test.unwrap();
        for part in [&train, &test] {
            assert_eq!(part.labels, None);
            assert_eq!(part.len(), d.len());
            assert_eq!(part.image, d.info.image);
        }
        // given the classes (a model's), the images encode to the labelled set's values
        let mut t = test;
        t.align_classes(&d.info.class_names).unwrap();
        let e = crate::data::Encoding::fit(&t, X_BOUND).unwrap();
        let (inputs, _) = e.encode(&t).unwrap();
        assert_eq!(inputs.values, d.values);
        assert_eq!(inputs.info, d.info);
    }

    #[test]
    fn embedded_subset_loads() {
        let (train, test) = embedded().unwrap();
        assert_eq!(
            (train.len(), test.len()),
            (EMBEDDED_TRAIN_LEN, EMBEDDED_TEST_LEN)
        );
        assert_eq!(train.info, info());
        assert_eq!(test.info, info());
        // every class is well represented
        assert!(train.class_counts(CLASSES).iter().all(|&c| c >= 450));
        assert!(test.class_counts(CLASSES).iter().all(|&c| c >= 70));
    }
}
