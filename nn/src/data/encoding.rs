//! The client's encoding of real values as integers in `0..=X`.
//!
//! Functional encryption works on integers, so the data owner maps every feature column to
//! `0..=X` with an affine map fitted on its own training data, and keeps the map (an encoding
//! file, JSON) to encode its test and prediction data the same way. For a column with
//! training minimum `m` and maximum `M`:
//!
//! ```text
//! keep:    v -> v                                   (the column's values are integers in 0..=X)
//! affine:  v -> round((clamp(v, m, M) - m) / (M - m) · X)    (M > m; a constant column -> 0)
//! ```
//!
//! Values outside `[m, M]` (only possible in data the map was not fitted on) are clamped and
//! counted, so that the caller can warn. The trainer never needs this file: the float value of
//! an encoded feature is `v / X` whatever the map was.

use std::path::Path;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::data::raw::RawSet;
use crate::data::{DataError, Dataset, ImageShape, Inputs};

/// Format tag written into every encoding file.
pub const ENCODING_FORMAT: &str = "cryptonn-encoding-1";

/// How one column is mapped to integers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "map", rename_all = "lowercase")]
pub enum ColumnMap {
    /// Integer values already in `0..=X`: kept as they are.
    Keep,
    /// `round((clamp(v, min, max) - min) / (max - min) · X)`; 0 when `max == min`.
    Affine {
        /// The training data's minimum.
        min: f64,
        /// The training data's maximum.
        max: f64,
    },
}

/// A fitted encoding: per-column maps, the bound and the classes. See the
/// [module documentation](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    /// [`ENCODING_FORMAT`].
    pub format: String,
    /// The bound `X`.
    pub x_bound: u32,
    /// The feature columns' names, in order.
    pub feature_names: Vec<String>,
    /// One map per feature column.
    pub columns: Vec<ColumnMap>,
    /// The classes, in label order.
    pub class_names: Vec<String>,
    /// The image shape, for image data.
    pub image: Option<ImageShape>,
    /// The table column that held the labels of the training data (absent for images and
    /// in older files): data of the same table without this column has no labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
}

/// What [`Encoding::apply`] did besides encoding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeReport {
    /// Values outside their column's fitted range, clamped.
    pub clamped: usize,
    /// The column with the most clamped values, and how many.
    pub worst_column: Option<(String, usize)>,
}

impl Encoding {
    /// Fits an encoding with bound `x_bound` on the training samples `train`.
    pub fn fit(train: &RawSet, x_bound: u32) -> Result<Encoding, DataError> {
        // Validates the bound and the classes before any work.
        train.info(x_bound)?;
        if train.is_empty() {
            return Err(DataError::Invalid(
                "no samples to fit an encoding on".into(),
            ));
        }
        let x = f64::from(x_bound);
        let columns = (0..train.features())
            .map(|j| {
                let (mut min, mut max, mut integral) = (f64::INFINITY, f64::NEG_INFINITY, true);
                for i in 0..train.len() {
                    let v = train.values.get(i, j);
                    min = min.min(v);
                    max = max.max(v);
                    integral &= v.fract() == 0.0;
                }
                if integral && min >= 0.0 && max <= x {
                    ColumnMap::Keep
                } else {
                    ColumnMap::Affine { min, max }
                }
            })
            .collect();
        Ok(Encoding {
            format: ENCODING_FORMAT.into(),
            x_bound,
            feature_names: train.feature_names.clone(),
            columns,
            class_names: train.class_names.clone(),
            image: train.image,
            label_column: train.label_column.clone(),
        })
    }

    /// Encodes `raw` (the training data or other data of the same table): its columns must
    /// be the fitted ones, its classes among the fitted ones. The samples must have labels
    /// ([`Encoding::encode`] takes samples without).
    pub fn apply(&self, raw: &RawSet) -> Result<(Dataset, EncodeReport), DataError> {
        let (inputs, report) = self.encode(raw)?;
        Ok((inputs.into_dataset()?, report))
    }

    /// Encodes `raw` as [`Encoding::apply`] does, labels optional: samples without labels
    /// take the fitted classes.
    pub fn encode(&self, raw: &RawSet) -> Result<(Inputs, EncodeReport), DataError> {
        if raw.feature_names != self.feature_names {
            let first = raw
                .feature_names
                .iter()
                .zip(&self.feature_names)
                .position(|(a, b)| a != b)
                .unwrap_or(raw.features().min(self.feature_names.len()));
            return Err(DataError::Format {
                what: "the data's columns".into(),
                reason: format!(
                    "{} feature columns, the encoding was fitted on {}; the first difference is \
                     at column {first} ({:?} against {:?})",
                    raw.features(),
                    self.feature_names.len(),
                    raw.feature_names.get(first),
                    self.feature_names.get(first)
                ),
            });
        }
        let mut raw = raw.clone();
        raw.align_classes(&self.class_names)?;
        let x = f64::from(self.x_bound);
        let mut out = Array2::<u16>::zeros((raw.len(), raw.features()));
        let mut clamped = vec![0usize; raw.features()];
        for (j, map) in self.columns.iter().enumerate() {
            for i in 0..raw.len() {
                let v = raw.values.get(i, j);
                let (e, c) = encode_value(*map, v, x);
                out[[i, j]] = e;
                clamped[j] += usize::from(c);
            }
        }
        let mut info = raw.info(self.x_bound)?;
        info.image = self.image;
        info.validate()?;
        let worst = clamped
            .iter()
            .enumerate()
            .max_by_key(|(_, &c)| c)
            .filter(|(_, &c)| c > 0)
            .map(|(j, &c)| (self.feature_names[j].clone(), c));
        let report = EncodeReport {
            clamped: clamped.iter().sum(),
            worst_column: worst,
        };
        Ok((Inputs::new(out, raw.labels, info)?, report))
    }

    /// Back from an encoded value of column `j` to the middle of the real interval it stands
    /// for (exact for kept columns).
    pub fn decode(&self, j: usize, e: u16) -> Option<f64> {
        let x = f64::from(self.x_bound);
        Some(match self.columns.get(j)? {
            ColumnMap::Keep => f64::from(e),
            ColumnMap::Affine { min, max } => min + (max - min) * f64::from(e) / x,
        })
    }

    /// The encoding as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses and validates an encoding file's JSON.
    pub fn from_json(what: &str, text: &str) -> Result<Encoding, DataError> {
        let bad = |reason: String| DataError::Format {
            what: what.into(),
            reason,
        };
        let e: Encoding = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if e.format != ENCODING_FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {ENCODING_FORMAT:?}",
                e.format
            )));
        }
        if e.columns.len() != e.feature_names.len() {
            return Err(bad(format!(
                "{} column maps for {} columns",
                e.columns.len(),
                e.feature_names.len()
            )));
        }
        for (j, c) in e.columns.iter().enumerate() {
            if let ColumnMap::Affine { min, max } = c {
                if !(min.is_finite() && max.is_finite() && min <= max) {
                    return Err(bad(format!("column {j}: invalid range {min}..{max}")));
                }
            }
        }
        crate::data::DatasetInfo::new(e.columns.len().max(1), e.x_bound, e.class_names.len())
            .and_then(|i| i.with_class_names(e.class_names.clone()))
            .map_err(|err| bad(err.to_string()))?;
        Ok(e)
    }

    /// Writes the encoding to `path` as JSON.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        std::fs::write(path, self.to_json() + "\n").map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads an encoding file.
    pub fn load(path: &Path) -> Result<Encoding, DataError> {
        let bytes = crate::data::idx::read(path)?;
        let text = String::from_utf8(bytes).map_err(|_| DataError::Format {
            what: path.display().to_string(),
            reason: "not UTF-8 text".into(),
        })?;
        Self::from_json(&path.display().to_string(), &text)
    }
}

/// Encodes one value: the integer and whether it was clamped.
fn encode_value(map: ColumnMap, v: f64, x: f64) -> (u16, bool) {
    match map {
        ColumnMap::Keep => {
            let c = v.round().clamp(0.0, x);
            (c as u16, c != v)
        }
        ColumnMap::Affine { min, max } => {
            let c = v.clamp(min, max);
            let e = if max > min {
                ((c - min) / (max - min) * x).round()
            } else {
                0.0
            };
            (e.clamp(0.0, x) as u16, c != v)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::raw::RawValues;
    use proptest::prelude::*;

    fn raw(values: Array2<f64>, labels: Vec<u8>) -> RawSet {
        let f = values.ncols();
        RawSet {
            values: RawValues::Reals(values),
            labels: Some(labels),
            class_names: vec!["a".into(), "b".into()],
            label_column: Some("y".into()),
            feature_names: (0..f).map(|j| format!("c{j}")).collect(),
            image: None,
        }
    }

    #[test]
    fn integer_columns_kept_real_columns_mapped() {
        let r = raw(
            ndarray::array![[3.0, -1.0, 5.0], [7.0, 1.0, 5.0], [0.0, 0.5, 5.0]],
            vec![0, 1, 0],
        );
        let e = Encoding::fit(&r, 255).unwrap();
        assert_eq!(e.columns[0], ColumnMap::Keep);
        assert_eq!(
            e.columns[1],
            ColumnMap::Affine {
                min: -1.0,
                max: 1.0
            }
        );
        assert_eq!(e.columns[2], ColumnMap::Keep);
        let (d, rep) = e.apply(&r).unwrap();
        assert_eq!(d.values.column(0).to_vec(), vec![3, 7, 0]);
        assert_eq!(d.values.column(1).to_vec(), vec![0, 255, 191]);
        assert_eq!(rep.clamped, 0);
        // a bound below the integers turns them into an affine map
        let e = Encoding::fit(&r, 5).unwrap();
        assert_eq!(e.columns[0], ColumnMap::Affine { min: 0.0, max: 7.0 });
        assert_eq!(e.columns[2], ColumnMap::Keep);
        // JSON round trip, and a bad file refused
        let back = Encoding::from_json("e", &e.to_json()).unwrap();
        assert_eq!(back, e);
        assert!(Encoding::from_json("e", "{}").is_err());
        let broken = e.to_json().replace("\"max\": 7.0", "\"max\": -7.0");
        assert!(Encoding::from_json("e", &broken).is_err());
    }

    #[test]
    fn other_columns_or_classes_are_refused() {
        let r = raw(ndarray::array![[0.5, 1.0], [0.25, 2.0]], vec![0, 1]);
        let e = Encoding::fit(&r, 255).unwrap();
        let mut other = r.clone();
        other.feature_names[1] = "zz".into();
        assert!(e.apply(&other).unwrap_err().to_string().contains("zz"));
        let mut unknown = r.clone();
        unknown.class_names = vec!["a".into(), "c".into()];
        assert!(e.apply(&unknown).unwrap_err().to_string().contains("\"c\""));
        // a test set with a subset of the classes keeps the training indices
        let mut sub = r.clone();
        sub.class_names = vec!["b".into()];
        sub.labels = Some(vec![0, 0]);
        assert_eq!(e.apply(&sub).unwrap().0.labels, vec![1, 1]);
    }

    /// The table `text` without its column `drop`, as CSV bytes.
    fn without_column(text: &str, drop: &str) -> Vec<u8> {
        let mut r = ::csv::Reader::from_reader(text.as_bytes());
        let header = r.headers().unwrap().clone();
        let k = header.iter().position(|h| h == drop).unwrap();
        let keep = |rec: &::csv::StringRecord| -> Vec<String> {
            rec.iter()
                .enumerate()
                .filter(|&(j, _)| j != k)
                .map(|(_, c)| c.to_string())
                .collect()
        };
        let mut w = ::csv::Writer::from_writer(Vec::new());
        w.write_record(keep(&header)).unwrap();
        for rec in r.records() {
            w.write_record(keep(&rec.unwrap())).unwrap();
        }
        w.into_inner().unwrap()
    }

    fn wdbc() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/breast-cancer/wdbc.csv");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn a_table_without_its_label_column_encodes_like_the_labelled_table() {
        use crate::data::csv::parse_csv;
        // the shipped table (labels last) and a small one with the labels in the middle
        let small = "a,kind,b\n1.5,yes,2\n-3,no,400\n0,yes,7\n";
        for (text, label) in [(wdbc(), "diagnosis"), (small.to_string(), "kind")] {
            let labelled = parse_csv("t.csv", text.as_bytes(), Some(label), false).unwrap();
            let e = Encoding::fit(&labelled, 255).unwrap();
            assert_eq!(e.label_column.as_deref(), Some(label));
            let (d, _) = e.apply(&labelled).unwrap();
            let bytes = without_column(&text, label);
            // the label column named by the encoding is missing: rows without labels
            let raw = parse_csv("u.csv", &bytes, e.label_column.as_deref(), true).unwrap();
            assert_eq!((raw.labels.as_ref(), raw.len()), (None, labelled.len()));
            assert_eq!(raw.feature_names, labelled.feature_names);
            let (u, _) = e.encode(&raw).unwrap();
            assert_eq!(u.labels, None);
            assert_eq!(u.values, d.values);
            assert_eq!(u.info, d.info);
            assert_eq!(u.row(1), d.row(1));
            assert!(matches!(e.apply(&raw), Err(DataError::Unlabelled(_))));
            assert!(u.into_dataset().is_err());
            // without permission, the missing label column is an error naming it
            let err = parse_csv("u.csv", &bytes, Some(label), false)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("{label:?}")), "{err}");
        }
    }

    #[test]
    fn a_table_without_labels_missing_a_feature_column_is_refused() {
        use crate::data::csv::parse_csv;
        let text = wdbc();
        let labelled = parse_csv("t.csv", text.as_bytes(), None, false).unwrap();
        let e = Encoding::fit(&labelled, 255).unwrap();
        let no_labels = String::from_utf8(without_column(&text, "diagnosis")).unwrap();
        let bytes = without_column(&no_labels, "mean texture");
        let raw = parse_csv("u.csv", &bytes, Some("diagnosis"), true).unwrap();
        let err = e.encode(&raw).unwrap_err().to_string();
        assert!(
            err.contains("29 feature columns")
                && err.contains("fitted on 30")
                && err.contains("mean texture"),
            "{err}"
        );
        // fitting needs classes: data without labels has none to give
        let err = Encoding::fit(&raw, 255).unwrap_err().to_string();
        assert!(err.contains("no labels"), "{err}");
    }

    proptest! {
        /// Fitted on a column, the encoding round-trips every training value to within half a
        /// step, clamps nothing on the training data, and clamps (and counts) exactly the
        /// new values outside the fitted range.
        #[test]
        fn round_trip_and_clamping(
            col in prop::collection::vec(-1e4f64..1e4, 2..50),
            extra in prop::collection::vec(-2e4f64..2e4, 0..20),
            x in 1u32..=65535,
        ) {
            let n = col.len();
            let r = raw(Array2::from_shape_vec((n, 1), col.clone()).unwrap(), (0..n).map(|i| (i % 2) as u8).collect());
            let e = Encoding::fit(&r, x).unwrap();
            let (d, rep) = e.apply(&r).unwrap();
            prop_assert_eq!(rep.clamped, 0);
            let (min, max) = col.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            let step = (max - min) / f64::from(x);
            for (i, &v) in col.iter().enumerate() {
                let back = e.decode(0, d.values[[i, 0]]).unwrap();
                prop_assert!((back - v).abs() <= step / 2.0 + 1e-9 * (1.0 + v.abs()), "{} -> {}", v, back);
                prop_assert!(u32::from(d.values[[i, 0]]) <= x);
            }
            let m = extra.len();
            if m > 0 {
                let t = raw(Array2::from_shape_vec((m, 1), extra.clone()).unwrap(), vec![0; m]);
                let (_, rep) = e.apply(&t).unwrap();
                let outside = extra.iter().filter(|&&v| v < min || v > max).count();
                prop_assert_eq!(rep.clamped, outside);
            }
        }

        /// Integer columns inside 0..=X keep their values exactly.
        #[test]
        fn integer_columns_are_kept(col in prop::collection::vec(0u16..=300, 2..50), x in 300u32..=1000) {
            let n = col.len();
            let vals = Array2::from_shape_vec((n, 1), col.iter().map(|&v| f64::from(v)).collect()).unwrap();
            let r = raw(vals, (0..n).map(|i| (i % 2) as u8).collect());
            let e = Encoding::fit(&r, x).unwrap();
            prop_assert_eq!(e.columns[0], ColumnMap::Keep);
            let (d, _) = e.apply(&r).unwrap();
            prop_assert_eq!(d.values.column(0).to_vec(), col);
        }
    }
}
