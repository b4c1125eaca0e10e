//! CSV tables: a header row, one sample per line, one label column.
//!
//! Parsing (quoted fields, CRLF line ends, a byte-order mark) is the `csv` crate's. Every
//! cell of a feature column must be a finite number; the label column (by name, default the
//! last column) holds integers or strings. String labels become classes in sorted order,
//! integer labels in numeric order; the names are kept with the description. A missing or
//! non-numeric cell is an error that names the row (1-based, header = row 1) and the column;
//! an empty table, a table without feature columns and a table with a single class are errors.
//!
//! A table whose header lacks the named label column is an error, unless data without labels
//! is allowed (inputs to predict): every column is then a feature column, and the rows have
//! no labels.

use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::data::raw::{sort_class_names, Format, Loader, RawSet, RawValues};
use crate::data::DataError;

/// Largest CSV file read (the parsed values take about as much memory again).
pub const MAX_CSV_BYTES: u64 = 1 << 30;

/// A CSV file with a header row.
#[derive(Debug, Clone)]
pub struct CsvFile {
    /// The file.
    pub path: PathBuf,
    /// The label column's name (default: the last column).
    pub label_column: Option<String>,
    /// Whether a header without the named label column is read as rows without labels.
    pub allow_unlabelled: bool,
}

impl Loader for CsvFile {
    fn format(&self) -> Format {
        Format::Csv
    }
    fn read(&self) -> Result<(RawSet, Option<RawSet>), DataError> {
        let label = self.label_column.as_deref();
        Ok((read_csv(&self.path, label, self.allow_unlabelled)?, None))
    }
}

/// Reads the table at `path` (see the [module documentation](self)).
pub fn read_csv(
    path: &Path,
    label_column: Option<&str>,
    allow_unlabelled: bool,
) -> Result<RawSet, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_CSV_BYTES {
        return Err(DataError::TooLarge {
            what: path.display().to_string(),
            limit: MAX_CSV_BYTES,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse_csv(
        &path.display().to_string(),
        &bytes,
        label_column,
        allow_unlabelled,
    )
}

fn format_err(what: impl Into<String>, reason: impl Into<String>) -> DataError {
    DataError::Format {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Parses CSV bytes; `what` names the table in errors. With `allow_unlabelled`, a header
/// without the column named `label_column` gives rows without labels.
pub fn parse_csv(
    what: &str,
    bytes: &[u8],
    label_column: Option<&str>,
    allow_unlabelled: bool,
) -> Result<RawSet, DataError> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut rdr = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| format_err(what, format!("unreadable header row: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.is_empty() || header.iter().all(|h| h.is_empty()) {
        return Err(format_err(what, "the table is empty (no header row)"));
    }
    let label = match label_column {
        Some(name) => match header.iter().position(|h| h == name) {
            Some(j) => Some(j),
            None if allow_unlabelled => None,
            None => {
                return Err(format_err(
                    what,
                    format!("no column named {name:?}; the columns are {header:?}"),
                ))
            }
        },
        None => Some(header.len() - 1),
    };
    if label.is_some() && header.len() < 2 {
        return Err(format_err(
            what,
            "the table needs at least one feature column besides the labels",
        ));
    }
    let mut values: Vec<f64> = Vec::new();
    let mut label_text: Vec<String> = Vec::new();
    let mut n = 0;
    for (i, rec) in rdr.records().enumerate() {
        let row = i + 2;
        let rec = rec.map_err(|e| format_err(format!("{what}, row {row}"), e.to_string()))?;
        if rec.len() == 1 && rec.get(0).is_some_and(|c| c.trim().is_empty()) {
            continue; // a blank line
        }
        if rec.len() != header.len() {
            return Err(format_err(
                format!("{what}, row {row}"),
                format!(
                    "{} cells, the header has {} columns",
                    rec.len(),
                    header.len()
                ),
            ));
        }
        n += 1;
        for (j, cell) in rec.iter().enumerate() {
            let cell = cell.trim();
            if Some(j) == label {
                if cell.is_empty() {
                    return Err(cell_err(what, row, &header[j], "the label is missing"));
                }
                label_text.push(cell.to_string());
                continue;
            }
            if cell.is_empty() {
                return Err(cell_err(what, row, &header[j], "the cell is empty"));
            }
            match cell.parse::<f64>() {
                Ok(v) if v.is_finite() => values.push(v),
                _ => {
                    return Err(cell_err(
                        what,
                        row,
                        &header[j],
                        &format!("{cell:?} is not a finite number"),
                    ))
                }
            }
        }
    }
    if n == 0 {
        return Err(format_err(what, "the table has a header but no data rows"));
    }
    let feature_names: Vec<String> = header
        .iter()
        .enumerate()
        .filter(|&(j, _)| Some(j) != label)
        .map(|(_, h)| h.clone())
        .collect();
    let values = Array2::from_shape_vec((n, feature_names.len()), values)
        .map_err(|e| format_err(what, e.to_string()))?;
    let Some(label) = label else {
        return Ok(RawSet {
            values: RawValues::Reals(values),
            labels: None,
            class_names: Vec::new(),
            label_column: None,
            feature_names,
            image: None,
        });
    };
    let mut classes: Vec<String> = label_text.clone();
    classes.sort();
    classes.dedup();
    if classes.len() < 2 {
        return Err(format_err(
            what,
            format!(
                "every row has the label {:?}: a classifier needs at least two classes",
                classes[0]
            ),
        ));
    }
    if classes.len() > crate::data::info::MAX_CLASSES {
        return Err(format_err(
            what,
            format!(
                "{} distinct labels in column {:?}; at most {} classes are supported",
                classes.len(),
                header[label],
                crate::data::info::MAX_CLASSES
            ),
        ));
    }
    sort_class_names(&mut classes);
    let labels: Vec<u8> = label_text
        .iter()
        .map(|t| classes.iter().position(|c| c == t).unwrap_or(0) as u8)
        .collect();
    Ok(RawSet {
        values: RawValues::Reals(values),
        labels: Some(labels),
        class_names: classes,
        label_column: Some(header[label].clone()),
        feature_names,
        image: None,
    })
}

fn cell_err(what: &str, row: usize, column: &str, reason: &str) -> DataError {
    format_err(format!("{what}, row {row}, column {column:?}"), reason)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str, label: Option<&str>) -> Result<RawSet, DataError> {
        parse_csv("t.csv", text.as_bytes(), label, false)
    }

    #[test]
    fn quoted_fields_crlf_and_string_labels() {
        let t = "\u{feff}\"a, first\",b,kind\r\n1.5,\"2\",yes\r\n-3,4e2,no\r\n\r\n0,0,yes\r\n";
        let r = parse(t, None).unwrap();
        assert_eq!(r.feature_names, vec!["a, first", "b"]);
        assert_eq!(r.class_names, vec!["no", "yes"]);
        assert_eq!(r.labels, Some(vec![1, 0, 1]));
        assert_eq!(r.label_column.as_deref(), Some("kind"));
        assert_eq!(
            r.values,
            RawValues::Reals(ndarray::array![[1.5, 2.0], [-3.0, 400.0], [0.0, 0.0]])
        );
        // the label column by name, not last
        let r = parse("y,x\n2,0.5\n10,1\n", Some("y")).unwrap();
        assert_eq!(r.class_names, vec!["2", "10"]); // numeric order
        assert_eq!(r.labels, Some(vec![0, 1]));
        assert_eq!(r.feature_names, vec!["x"]);
    }

    #[test]
    fn bad_tables_name_row_and_column() {
        let e = parse("a,b,y\n1,2,p\n1,,q\n", None).unwrap_err().to_string();
        assert!(
            e.contains("row 3") && e.contains("\"b\"") && e.contains("empty"),
            "{e}"
        );
        let e = parse("a,b,y\n1,2,p\n1,x7,q\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row 3") && e.contains("\"b\"") && e.contains("x7"),
            "{e}"
        );
        let e = parse("a,b,y\n1,2,p\n1,nan,q\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nan"), "{e}");
        let e = parse("a,b,y\n1,2,p\n1,2\n", None).unwrap_err().to_string();
        assert!(e.contains("row 3") && e.contains("2 cells"), "{e}");
        let e = parse("a,b,y\n1,2,p\n3,4,p\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("two classes"), "{e}");
        assert!(parse("", None).unwrap_err().to_string().contains("empty"));
        assert!(parse("a,y\n", None)
            .unwrap_err()
            .to_string()
            .contains("no data rows"));
        let e = parse("a,y\n1,p\n2,q\n", Some("z")).unwrap_err().to_string();
        assert!(e.contains("\"z\""), "{e}");
        let e = parse("a,y\n1,\n2,q\n", None).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("label"), "{e}");
        assert!(parse("y\np\nq\n", None).is_err());
    }

    fn cell() -> impl Strategy<Value = f64> {
        prop_oneof![(-1e6f64..1e6), (0u32..300).prop_map(f64::from)]
    }

    proptest! {
        /// Any table written with the csv crate's quoting (labels with commas, quotes and
        /// spaces) and CRLF or LF line ends reads back exactly.
        #[test]
        fn written_tables_read_back(
            rows in prop::collection::vec((prop::collection::vec(cell(), 3), 0usize..3), 1..40),
            crlf in any::<bool>(),
        ) {
            let names = ["plain", "with, comma", "say \"hi\""];
            let mut w = ::csv::WriterBuilder::new()
                .terminator(if crlf { ::csv::Terminator::CRLF } else { ::csv::Terminator::Any(b'\n') })
                .from_writer(Vec::new());
            w.write_record(["x 1", "x,2", "x3", "label"]).unwrap();
            for (vals, l) in &rows {
                let mut rec: Vec<String> = vals.iter().map(|v| format!("{v:?}")).collect();
                rec.push(names[*l].to_string());
                w.write_record(&rec).unwrap();
            }
            let bytes = w.into_inner().unwrap();
            let distinct: std::collections::BTreeSet<usize> = rows.iter().map(|r| r.1).collect();
            let r = parse_csv("p.csv", &bytes, None, false);
            if distinct.len() < 2 {
                prop_assert!(r.is_err());
                return Ok(());
            }
            let r = r.unwrap();
            prop_assert_eq!(&r.feature_names, &vec!["x 1".to_string(), "x,2".into(), "x3".into()]);
            let mut sorted: Vec<String> = distinct.iter().map(|&l| names[l].to_string()).collect();
            sorted.sort();
            prop_assert_eq!(&r.class_names, &sorted);
            let labels = r.labels.clone().unwrap();
            for (i, (vals, l)) in rows.iter().enumerate() {
                prop_assert_eq!(&r.class_names[labels[i] as usize], names[*l]);
                for (j, &v) in vals.iter().enumerate() {
                    prop_assert_eq!(r.values.get(i, j), v);
                }
            }
        }
    }
}
