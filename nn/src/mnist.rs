//! MNIST in the IDX format: reader, writer, directory loading and the embedded subset.
//!
//! An IDX file is a big-endian header followed by the raw payload:
//!
//! ```text
//! images: 0x00000803 (u8 data, 3 dims) | N: u32 | rows: u32 | cols: u32 | N*rows*cols bytes
//! labels: 0x00000801 (u8 data, 1 dim)  | N: u32 |                         N bytes
//! ```
//!
//! Files may be gzip-compressed (recognized by the `1f 8b` magic, whatever their name) or raw.
//! Every header field and the exact payload length are checked, so a truncated, corrupted or
//! mismatched file gives a [`DataError`] that says what is wrong, never a panic.
//!
//! A real subset (the first 6,000 training and the first 1,000 test images of MNIST, by
//! Y. LeCun, C. Cortes and C. J. C. Burges, CC BY-SA 3.0) is compiled into the library and
//! returned by [`embedded`], so that everything runs on a fresh clone. The full set is read
//! with [`load_dir`] from a directory named by a flag or by the [`MNIST_DIR_ENV`] variable.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use ndarray::Array2;

use crate::data::{DataError, Dataset};

/// Environment variable naming a directory with the full MNIST files.
pub const MNIST_DIR_ENV: &str = "CRYPTONN_MNIST_DIR";
/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Number of MNIST classes (digits 0 to 9).
pub const CLASSES: usize = 10;
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
/// Largest accepted decompressed file size (the full MNIST training images are 47 MB).
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

const IMAGES_HEADER: usize = 16;
const LABELS_HEADER: usize = 8;

static EMBEDDED_TRAIN_IMAGES: &[u8] =
    include_bytes!("../data/mnist-subset/train-images-idx3-ubyte.gz");
static EMBEDDED_TRAIN_LABELS: &[u8] =
    include_bytes!("../data/mnist-subset/train-labels-idx1-ubyte.gz");
static EMBEDDED_TEST_IMAGES: &[u8] =
    include_bytes!("../data/mnist-subset/t10k-images-idx3-ubyte.gz");
static EMBEDDED_TEST_LABELS: &[u8] =
    include_bytes!("../data/mnist-subset/t10k-labels-idx1-ubyte.gz");

/// Whether `bytes` start with the gzip magic `1f 8b`.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// The decompressed contents of `bytes` if they are gzip, else `bytes` unchanged.
/// `what` names the data in error messages.
pub fn decompress<'a>(what: &str, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, DataError> {
    if !is_gzip(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4));
    MultiGzDecoder::new(bytes)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(|source| DataError::Gzip {
            what: what.to_string(),
            source,
        })?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(DataError::TooLarge {
            what: what.to_string(),
            limit: MAX_DECOMPRESSED,
        });
    }
    Ok(Cow::Owned(out))
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn check_header(
    what: &str,
    b: &[u8],
    header: usize,
    magic: u32,
    kind: &'static str,
) -> Result<(), DataError> {
    if b.len() < 4 {
        return Err(DataError::TruncatedHeader {
            what: what.to_string(),
            needed: header,
            found: b.len(),
        });
    }
    let found = be_u32(b, 0);
    if found != magic {
        return Err(DataError::BadMagic {
            what: what.to_string(),
            expected: magic,
            found,
            kind,
        });
    }
    if b.len() < header {
        return Err(DataError::TruncatedHeader {
            what: what.to_string(),
            needed: header,
            found: b.len(),
        });
    }
    Ok(())
}

fn check_payload(what: &str, payload: usize, expected: u64) -> Result<(), DataError> {
    if payload as u64 != expected {
        return Err(DataError::PayloadLength {
            what: what.to_string(),
            expected,
            found: payload as u64,
        });
    }
    Ok(())
}

/// Parses an IDX image file (raw or gzip) into `(images (N, rows*cols), rows, cols)`.
pub fn parse_images(what: &str, bytes: &[u8]) -> Result<(Array2<u8>, usize, usize), DataError> {
    let b = decompress(what, bytes)?;
    check_header(
        what,
        &b,
        IMAGES_HEADER,
        IMAGES_MAGIC,
        "IDX images: unsigned bytes, 3 dimensions",
    )?;
    let (n, rows, cols) = (be_u32(&b, 4), be_u32(&b, 8), be_u32(&b, 12));
    let dims = vec![n, rows, cols];
    if rows == 0 || cols == 0 {
        return Err(DataError::BadDims {
            what: what.to_string(),
            dims,
            reason: "images must have at least one row and one column",
        });
    }
    let pixels = rows as u64 * cols as u64;
    if pixels > 1 << 24 {
        return Err(DataError::BadDims {
            what: what.to_string(),
            dims,
            reason: "images larger than 2^24 pixels are not supported",
        });
    }
    let expected = n as u64 * pixels;
    check_payload(what, b.len() - IMAGES_HEADER, expected)?;
    let (n, rows, cols) = (n as usize, rows as usize, cols as usize);
    let images =
        Array2::from_shape_vec((n, rows * cols), b[IMAGES_HEADER..].to_vec()).map_err(|_| {
            DataError::BadDims {
                what: what.to_string(),
                dims,
                reason: "dimensions do not fit in memory",
            }
        })?;
    Ok((images, rows, cols))
}

/// Parses an IDX label file (raw or gzip).
pub fn parse_labels(what: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let b = decompress(what, bytes)?;
    check_header(
        what,
        &b,
        LABELS_HEADER,
        LABELS_MAGIC,
        "IDX labels: unsigned bytes, 1 dimension",
    )?;
    let n = be_u32(&b, 4);
    check_payload(what, b.len() - LABELS_HEADER, n as u64)?;
    Ok(b[LABELS_HEADER..].to_vec())
}

/// Parses a matching pair of image and label files into a dataset with labels below
/// [`CLASSES`]. `what` names the pair in error messages.
pub fn parse_dataset(what: &str, images: &[u8], labels: &[u8]) -> Result<Dataset, DataError> {
    let (img, rows, cols) = parse_images(&format!("{what} images"), images)?;
    let lab = parse_labels(&format!("{what} labels"), labels)?;
    let d = Dataset::new(img, lab, rows, cols)?;
    d.check_labels(CLASSES)?;
    Ok(d)
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and validates an image/label file pair.
pub fn load_pair(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let (img, rows, cols) = parse_images(&images.display().to_string(), &read(images)?)?;
    let lab = parse_labels(&labels.display().to_string(), &read(labels)?)?;
    let d = Dataset::new(img, lab, rows, cols)?;
    d.check_labels(CLASSES)?;
    Ok(d)
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

/// Loads `(train, test)` from a directory holding the four standard MNIST files, each
/// gzip-compressed (`*.gz`) or raw (the same name without `.gz`).
pub fn load_dir(dir: impl AsRef<Path>) -> Result<(Dataset, Dataset), DataError> {
    let dir = dir.as_ref();
    let train = load_pair(&find(dir, TRAIN_IMAGES)?, &find(dir, TRAIN_LABELS)?)?;
    let test = load_pair(&find(dir, TEST_IMAGES)?, &find(dir, TEST_LABELS)?)?;
    Ok((train, test))
}

/// The embedded subset: `(train, test)` with 6,000 and 1,000 samples.
pub fn embedded() -> Result<(Dataset, Dataset), DataError> {
    let train = parse_dataset(
        "embedded MNIST train",
        EMBEDDED_TRAIN_IMAGES,
        EMBEDDED_TRAIN_LABELS,
    )?;
    let test = parse_dataset(
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

fn u32_dim(v: usize, name: &'static str) -> Result<[u8; 4], DataError> {
    u32::try_from(v)
        .map(u32::to_be_bytes)
        .map_err(|_| DataError::Invalid(format!("{name} {v} does not fit in an IDX header")))
}

/// Raw IDX encoding of a dataset's images.
pub fn encode_images(d: &Dataset) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(IMAGES_HEADER + d.images.len());
    out.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    out.extend_from_slice(&u32_dim(d.len(), "image count")?);
    out.extend_from_slice(&u32_dim(d.rows, "image rows")?);
    out.extend_from_slice(&u32_dim(d.cols, "image columns")?);
    out.extend(d.images.iter().copied());
    Ok(out)
}

/// Raw IDX encoding of labels.
pub fn encode_labels(labels: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(LABELS_HEADER + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&u32_dim(labels.len(), "label count")?);
    out.extend_from_slice(labels);
    Ok(out)
}

/// Gzip-compresses `bytes` at the best level (header without time stamp, so reproducible).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
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
        let images = Array2::from_shape_fn((3, 6), |(i, j)| (i * 6 + j) as u8);
        Dataset::new(images, vec![3, 9, 0], 2, 3).unwrap()
    }

    #[test]
    fn round_trip_raw_and_gzip() {
        let d = small();
        let img = encode_images(&d).unwrap();
        let lab = encode_labels(&d.labels).unwrap();
        assert_eq!(parse_dataset("t", &img, &lab).unwrap(), d);
        assert_eq!(parse_dataset("t", &gzip(&img), &gzip(&lab)).unwrap(), d);
    }

    #[test]
    fn wrong_files_are_rejected() {
        let d = small();
        let img = encode_images(&d).unwrap();
        let lab = encode_labels(&d.labels).unwrap();

        // labels given as images and vice versa: wrong magic
        assert!(matches!(
            parse_images("x", &lab),
            Err(DataError::BadMagic { found: 0x801, .. })
        ));
        assert!(matches!(
            parse_labels("x", &img),
            Err(DataError::BadMagic { found: 0x803, .. })
        ));
        // corrupted magic
        let mut bad = img.clone();
        bad[2] = 0x09;
        assert!(matches!(
            parse_images("x", &bad),
            Err(DataError::BadMagic { .. })
        ));
        // truncated header
        assert!(matches!(
            parse_images("x", &img[..10]),
            Err(DataError::TruncatedHeader { .. })
        ));
        assert!(matches!(
            parse_labels("x", &lab[..2]),
            Err(DataError::TruncatedHeader { .. })
        ));
        assert!(parse_images("x", &[]).is_err());
        // truncated payload and trailing bytes
        assert!(matches!(
            parse_images("x", &img[..img.len() - 1]),
            Err(DataError::PayloadLength {
                expected: 18,
                found: 17,
                ..
            })
        ));
        let mut long = lab.clone();
        long.push(1);
        assert!(matches!(
            parse_labels("x", &long),
            Err(DataError::PayloadLength { .. })
        ));
        // zero dimensions
        let mut zero = img.clone();
        zero[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            parse_images("x", &zero),
            Err(DataError::BadDims { .. })
        ));
        // huge declared count against a short payload
        let mut huge = img.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_images("x", &huge),
            Err(DataError::PayloadLength { .. })
        ));
        // truncated and corrupted gzip
        let gz = gzip(&img);
        assert!(matches!(
            parse_images("x", &gz[..gz.len() / 2]),
            Err(DataError::Gzip { .. })
        ));
        assert!(matches!(
            parse_images("x", &gz[..gz.len() - 4]),
            Err(DataError::Gzip { .. })
        ));
        let mut flipped = gz.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(parse_images("x", &flipped).is_err());
        // count mismatch and invalid label
        let lab2 = encode_labels(&[1, 2]).unwrap();
        assert!(matches!(
            parse_dataset("x", &img, &lab2),
            Err(DataError::CountMismatch {
                images: 3,
                labels: 2
            })
        ));
        let lab10 = encode_labels(&[1, 10, 2]).unwrap();
        assert!(matches!(
            parse_dataset("x", &img, &lab10),
            Err(DataError::LabelOutOfRange {
                index: 1,
                label: 10,
                ..
            })
        ));
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
    fn embedded_subset_loads() {
        let (train, test) = embedded().unwrap();
        assert_eq!(
            (train.len(), test.len()),
            (EMBEDDED_TRAIN_LEN, EMBEDDED_TEST_LEN)
        );
        assert_eq!((train.rows, train.cols, train.features()), (28, 28, 784));
        // every class is well represented
        assert!(train.class_counts(CLASSES).iter().all(|&c| c >= 450));
        assert!(test.class_counts(CLASSES).iter().all(|&c| c >= 70));
    }
}
