//! The IDX format (MNIST and its relatives: Fashion-MNIST, KMNIST, EMNIST): reader and writer.
//!
//! An IDX file is a big-endian header followed by the raw payload:
//!
//! ```text
//! images: 0x00000803 (u8 data, 3 dims) | N: u32 | rows: u32 | cols: u32 | N*rows*cols bytes
//! labels: 0x00000801 (u8 data, 1 dim)  | N: u32 |                         N bytes
//! ```
//!
//! Images of any size are read (grey levels, one channel). Files may be gzip-compressed
//! (recognized by the `1f 8b` magic, whatever their name) or raw. Every header field and the
//! exact payload length are checked, so a truncated, corrupted or mismatched file gives a
//! [`DataError`] that says what is wrong, never a panic.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use ndarray::Array2;

use crate::data::raw::{RawSet, RawValues};
use crate::data::{DataError, Dataset, ImageShape};

/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Largest accepted decompressed file size (the full MNIST training images are 47 MB).
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

/// Size of an image file's header.
const IMAGES_HEADER: usize = 16;
/// Size of a label file's header.
const LABELS_HEADER: usize = 8;

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

/// Parses a matching pair of image and label files (their bytes) into raw samples with
/// classes `0..=max label`. `what` names the pair in error messages.
pub fn parse_pair(what: &str, images: &[u8], labels: &[u8]) -> Result<RawSet, DataError> {
    let (img, rows, cols) = parse_images(&format!("{what} images"), images)?;
    let lab = parse_labels(&format!("{what} labels"), labels)?;
    raw_set(img, Some(lab), rows, cols)
}

/// Raw samples of images and, when there are labels, classes `0..=max label`.
fn raw_set(
    img: Array2<u8>,
    labels: Option<Vec<u8>>,
    rows: usize,
    cols: usize,
) -> Result<RawSet, DataError> {
    let feature_names = (0..rows * cols).map(|i| format!("pixel{i}")).collect();
    let image = Some(ImageShape {
        channels: 1,
        height: rows,
        width: cols,
    });
    let Some(labels) = labels else {
        return Ok(RawSet {
            feature_names,
            values: RawValues::Bytes(img),
            labels: None,
            class_names: Vec::new(),
            label_column: None,
            image,
        });
    };
    if img.nrows() != labels.len() {
        return Err(DataError::CountMismatch {
            images: img.nrows(),
            labels: labels.len(),
        });
    }
    // The classes are the label values present, in numeric order (EMNIST letters count 1 to
    // 26, with no 0), so that no output unit stands for a class without samples.
    let mut present = [false; 256];
    for &l in &labels {
        present[usize::from(l)] = true;
    }
    let values: Vec<u8> = (0..=255u8).filter(|&v| present[usize::from(v)]).collect();
    let mut index = [0u8; 256];
    for (k, &v) in values.iter().enumerate() {
        index[usize::from(v)] = k as u8;
    }
    let labels = labels.iter().map(|&l| index[usize::from(l)]).collect();
    Ok(RawSet {
        feature_names,
        values: RawValues::Bytes(img),
        labels: Some(labels),
        class_names: values.iter().map(|v| v.to_string()).collect(),
        label_column: None,
        image,
    })
}

/// Reads and validates an image/label file pair.
pub fn load_pair(images: &Path, labels: &Path) -> Result<RawSet, DataError> {
    load_images(images, Some(labels))
}

/// Reads and validates an image file and, when given, its label file; without one the
/// images have no labels.
pub fn load_images(images: &Path, labels: Option<&Path>) -> Result<RawSet, DataError> {
    let (img, rows, cols) = parse_images(&images.display().to_string(), &read(images)?)?;
    let lab = match labels {
        Some(l) => Some(parse_labels(&l.display().to_string(), &read(l)?)?),
        None => None,
    };
    raw_set(img, lab, rows, cols)
}

/// The label file of an image file, by its name: `...images-idx3-ubyte[.gz]` goes with
/// `...labels-idx1-ubyte[.gz]` (gzip or raw) in the same directory.
pub fn labels_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let base = name.replace("images-idx3-ubyte", "labels-idx1-ubyte");
    if base == name {
        return None;
    }
    let stem = base.trim_end_matches(".gz");
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|n| images.with_file_name(n))
        .find(|p| p.is_file())
}

/// The test images that go with training images, by name: `train` becomes `t10k` or `test`
/// (MNIST's and EMNIST's conventions).
pub fn test_images_for(train_images: &Path) -> Option<PathBuf> {
    let name = train_images.file_name()?.to_str()?;
    if !name.contains("train") {
        return None;
    }
    let stem = name.trim_end_matches(".gz");
    ["t10k", "test"]
        .iter()
        .flat_map(|t| {
            let s = stem.replacen("train", t, 1);
            [format!("{s}.gz"), s]
        })
        .map(|n| train_images.with_file_name(n))
        .find(|p| p.is_file())
}

/// Whether the file name looks like an IDX image file (`...images-idx3-ubyte[.gz]`).
pub fn is_images_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("images-idx3-ubyte"))
}

/// The training image file of a directory: `train-images-idx3-ubyte[.gz]`, or the one file
/// whose name ends so (`emnist-letters-train-images-idx3-ubyte.gz`).
pub fn train_images_in(dir: &Path) -> Result<PathBuf, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("train-images-idx3-ubyte"))
        })
        .collect();
    found.sort();
    // the gzip and the raw form of one file count once
    found.dedup_by(|a, b| {
        a.to_string_lossy().trim_end_matches(".gz") == b.to_string_lossy().trim_end_matches(".gz")
    });
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(DataError::MissingFile {
            dir: dir.to_path_buf(),
            name: "train-images-idx3-ubyte[.gz]",
        }),
        _ => Err(DataError::Format {
            what: dir.display().to_string(),
            reason: format!(
                "several training image files ({}); name one of them with --data",
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Reads an IDX source: a directory ([`train_images_in`]) or an image file, with its label
/// file and, when present, the test pair ([`labels_for`], [`test_images_for`]). Images
/// without a label file are an error, or, with `allow_unlabelled`, images without labels.
pub fn read_path(
    path: &Path,
    allow_unlabelled: bool,
) -> Result<(RawSet, Option<RawSet>), DataError> {
    let images = if path.is_dir() {
        train_images_in(path)?
    } else {
        path.to_path_buf()
    };
    let load = |images: &Path| match labels_for(images) {
        Some(l) => load_pair(images, &l),
        None if allow_unlabelled => load_images(images, None),
        None => Err(DataError::Format {
            what: images.display().to_string(),
            reason: "no label file beside it (...labels-idx1-ubyte[.gz])".into(),
        }),
    };
    let train = load(&images)?;
    let test = match test_images_for(&images) {
        Some(ti) => Some(load(&ti)?),
        None => None,
    };
    Ok((train, test))
}

/// The bytes of the file at `path`.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn u32_dim(v: usize, name: &'static str) -> Result<[u8; 4], DataError> {
    u32::try_from(v)
        .map(u32::to_be_bytes)
        .map_err(|_| DataError::Invalid(format!("{name} {v} does not fit in an IDX header")))
}

/// Raw IDX encoding of a dataset's images: one channel, values at most 255.
pub fn encode_images(d: &Dataset) -> Result<Vec<u8>, DataError> {
    let shape = match d.info.image {
        Some(s) if s.channels == 1 => s,
        _ => {
            return Err(DataError::Invalid(
                "IDX holds one-channel images only".into(),
            ))
        }
    };
    let mut out = Vec::with_capacity(IMAGES_HEADER + d.values.len());
    out.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    out.extend_from_slice(&u32_dim(d.len(), "image count")?);
    out.extend_from_slice(&u32_dim(shape.height, "image rows")?);
    out.extend_from_slice(&u32_dim(shape.width, "image columns")?);
    for &v in &d.values {
        out.push(
            u8::try_from(v)
                .map_err(|_| DataError::Invalid(format!("value {v} does not fit an IDX byte")))?,
        );
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::DatasetInfo;

    fn small() -> Dataset {
        let values = Array2::from_shape_fn((3, 6), |(i, j)| (i * 40 + j) as u16);
        let info = DatasetInfo::new(6, 255, 10)
            .unwrap()
            .with_image(ImageShape {
                channels: 1,
                height: 2,
                width: 3,
            })
            .unwrap();
        Dataset::new(values, vec![3, 9, 0], info).unwrap()
    }

    #[test]
    fn other_image_sizes_round_trip() {
        let d = small();
        let img = encode_images(&d).unwrap();
        let lab = encode_labels(&d.labels).unwrap();
        for (i, l) in [(img.clone(), lab.clone()), (gzip(&img), gzip(&lab))] {
            let raw = parse_pair("t", &i, &l).unwrap();
            assert_eq!(raw.image.map(|s| (s.height, s.width)), Some((2, 3)));
            // the classes present (0, 3, 9), in order
            assert_eq!(raw.class_names, vec!["0", "3", "9"]);
            let back = raw.identity_dataset(255).unwrap();
            assert_eq!(back.values, d.values);
            assert_eq!(back.labels, vec![1, 2, 0]);
        }
    }

    #[test]
    fn named_pairs_and_present_classes() {
        let dir = tempfile::tempdir().unwrap();
        let d = small();
        let img = gzip(&encode_images(&d).unwrap());
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("emnist-letters-train-images-idx3-ubyte.gz"), &img).unwrap();
        std::fs::write(
            p("emnist-letters-train-labels-idx1-ubyte"),
            encode_labels(&[26, 1, 26]).unwrap(),
        )
        .unwrap();
        std::fs::write(p("emnist-letters-test-images-idx3-ubyte.gz"), &img).unwrap();
        std::fs::write(
            p("emnist-letters-test-labels-idx1-ubyte.gz"),
            gzip(&encode_labels(&[1, 1, 5]).unwrap()),
        )
        .unwrap();
        let (train, test) = read_path(dir.path(), false).unwrap();
        // labels 1 and 26 only: two classes, numbered in order
        assert_eq!(train.class_names, vec!["1", "26"]);
        assert_eq!(train.labels, Some(vec![1, 0, 1]));
        let test = test.unwrap();
        assert_eq!(test.class_names, vec!["1", "5"]);
        // naming the image file works too
        let (t2, _) = read_path(&p("emnist-letters-train-images-idx3-ubyte.gz"), false).unwrap();
        assert_eq!(t2, train);
        // a second training set makes the directory ambiguous
        std::fs::write(p("other-train-images-idx3-ubyte.gz"), &img).unwrap();
        let e = read_path(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("several"), "{e}");
        // an image file without labels
        let e = read_path(&p("other-train-images-idx3-ubyte.gz"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no label file"), "{e}");
        // ... read without labels when that is allowed
        let (u, none) = read_path(&p("other-train-images-idx3-ubyte.gz"), true).unwrap();
        assert!(none.is_none());
        assert_eq!((u.labels, u.class_names.len()), (None, 0));
        assert_eq!(u.values, train.values);
        assert_eq!(u.image, train.image);
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
        let mut bad = img.clone();
        bad[2] = 0x09;
        assert!(matches!(
            parse_images("x", &bad),
            Err(DataError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_images("x", &img[..10]),
            Err(DataError::TruncatedHeader { .. })
        ));
        assert!(matches!(
            parse_labels("x", &lab[..2]),
            Err(DataError::TruncatedHeader { .. })
        ));
        assert!(parse_images("x", &[]).is_err());
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
        let mut zero = img.clone();
        zero[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            parse_images("x", &zero),
            Err(DataError::BadDims { .. })
        ));
        // huge declared count against a short payload: refused before allocating
        let mut huge = img.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_images("x", &huge),
            Err(DataError::PayloadLength { .. })
        ));
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
        let lab2 = encode_labels(&[1, 2]).unwrap();
        assert!(matches!(
            parse_pair("x", &img, &lab2),
            Err(DataError::CountMismatch {
                images: 3,
                labels: 2
            })
        ));
    }
}
