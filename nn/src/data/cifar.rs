//! CIFAR-10's binary format: a directory with `data_batch_1.bin` ... `data_batch_5.bin`,
//! `test_batch.bin` and `batches.meta.txt` (the class names, one per line).
//!
//! Every record is 3,073 bytes: the label (0..=9), then the 3x32x32 image, channel-major
//! (1,024 red, 1,024 green, 1,024 blue values, each row by row). A file whose length is not a
//! whole number of records, or a label beyond the class names, is an error naming the file.

use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::data::idx::read;
use crate::data::raw::{Format, Loader, RawSet, RawValues};
use crate::data::{DataError, ImageShape};

/// The image shape of CIFAR-10.
pub const SHAPE: ImageShape = ImageShape {
    channels: 3,
    height: 32,
    width: 32,
};
/// Bytes of one record: a label and an image.
pub const RECORD: usize = 1 + 3 * 32 * 32;
/// The training batch files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";
/// The class-name file.
pub const META_FILE: &str = "batches.meta.txt";

/// Whether `dir` holds CIFAR-10's first training batch.
pub fn is_cifar_dir(dir: &Path) -> bool {
    dir.join(TRAIN_FILES[0]).is_file()
}

/// A CIFAR-10 binary directory.
#[derive(Debug, Clone)]
pub struct CifarDir(pub PathBuf);

impl Loader for CifarDir {
    fn format(&self) -> Format {
        Format::Cifar10
    }
    fn read(&self) -> Result<(RawSet, Option<RawSet>), DataError> {
        read_dir(&self.0)
    }
}

/// Reads the training batches present (at least the first) and the test batch if present.
pub fn read_dir(dir: &Path) -> Result<(RawSet, Option<RawSet>), DataError> {
    let names = class_names(dir)?;
    let mut train = Vec::new();
    for f in TRAIN_FILES {
        let p = dir.join(f);
        if p.is_file() {
            train.push(p);
        } else if train.is_empty() {
            return Err(DataError::MissingFile {
                dir: dir.to_path_buf(),
                name: TRAIN_FILES[0],
            });
        }
    }
    let train = parse_files(&train, &names)?;
    let test = dir.join(TEST_FILE);
    let test = if test.is_file() {
        Some(parse_files(&[test], &names)?)
    } else {
        None
    };
    Ok((train, test))
}

/// The class names of `batches.meta.txt`, or `"0".."9"` without it.
fn class_names(dir: &Path) -> Result<Vec<String>, DataError> {
    let p = dir.join(META_FILE);
    if !p.is_file() {
        return Ok((0..10).map(|k| k.to_string()).collect());
    }
    let text = String::from_utf8(read(&p)?).map_err(|_| DataError::Format {
        what: p.display().to_string(),
        reason: "not UTF-8 text".into(),
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() < 2 {
        return Err(DataError::Format {
            what: p.display().to_string(),
            reason: format!("{} class names; at least 2 are needed", names.len()),
        });
    }
    Ok(names)
}

/// Parses the records of `files` (in order) into one set.
pub fn parse_files(files: &[PathBuf], names: &[String]) -> Result<RawSet, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let b = read(f)?;
        parse_records(
            &f.display().to_string(),
            &b,
            names.len(),
            &mut pixels,
            &mut labels,
        )?;
    }
    let n = labels.len();
    let features = RECORD - 1;
    let values = Array2::from_shape_vec((n, features), pixels).map_err(|e| DataError::Format {
        what: "CIFAR-10 batches".into(),
        reason: e.to_string(),
    })?;
    Ok(RawSet {
        values: RawValues::Bytes(values),
        labels: Some(labels),
        class_names: names.to_vec(),
        label_column: None,
        feature_names: (0..features).map(|i| format!("pixel{i}")).collect(),
        image: Some(SHAPE),
    })
}

/// Appends the records of one file's bytes.
pub fn parse_records(
    what: &str,
    b: &[u8],
    classes: usize,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    if b.is_empty() || !b.len().is_multiple_of(RECORD) {
        return Err(DataError::Format {
            what: what.into(),
            reason: format!(
                "{} bytes is not a whole number of {RECORD}-byte records",
                b.len()
            ),
        });
    }
    for (i, rec) in b.chunks_exact(RECORD).enumerate() {
        if usize::from(rec[0]) >= classes {
            return Err(DataError::Format {
                what: format!("{what}, record {i}"),
                reason: format!("label {} but only {classes} classes", rec[0]),
            });
        }
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn records(labels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            b.push(l);
            b.extend((0..RECORD - 1).map(|j| ((i * 7 + j) % 256) as u8));
        }
        b
    }

    #[test]
    fn reads_a_directory_with_names_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TRAIN_FILES[0]), records(&[0, 3, 9])).unwrap();
        std::fs::write(dir.path().join(TRAIN_FILES[1]), records(&[1])).unwrap();
        std::fs::write(dir.path().join(TEST_FILE), records(&[2, 2])).unwrap();
        let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";
        std::fs::write(dir.path().join(META_FILE), names).unwrap();
        assert!(is_cifar_dir(dir.path()));
        assert_eq!(Format::detect(dir.path()).unwrap(), Format::Cifar10);
        let (train, test) = read_dir(dir.path()).unwrap();
        assert_eq!(train.labels, Some(vec![0, 3, 9, 1]));
        assert_eq!(train.class_names[9], "truck");
        assert_eq!(train.image, Some(SHAPE));
        assert_eq!(train.values.get(1, 0), 7.0);
        assert_eq!(test.unwrap().len(), 2);
        let ds = train.identity_dataset(255).unwrap();
        assert_eq!(ds.info.features, 3072);

        // truncated, empty and out-of-range records
        let mut b = records(&[1, 2]);
        b.pop();
        std::fs::write(dir.path().join(TRAIN_FILES[1]), &b).unwrap();
        let e = read_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(TRAIN_FILES[1]) && e.contains("whole number"),
            "{e}"
        );
        std::fs::write(dir.path().join(TRAIN_FILES[1]), records(&[12])).unwrap();
        let e = read_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("label 12"), "{e}");
        std::fs::write(dir.path().join(TRAIN_FILES[1]), []).unwrap();
        assert!(read_dir(dir.path()).is_err());
    }
}
