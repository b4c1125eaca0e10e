//! The encrypted-dataset file: what the client writes once and the trainer streams.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! "CNNENC01" | header length u32 | header (bincode) | SHA-256 of header
//! record 0 | record 1 | ... | record B-1
//! index: B × (offset u64, length u64) | SHA-256 of index | index length u64 | "CNNIDX01"
//! ```
//!
//! A record is one fixed batch: `length u32 | bincode(EncryptedBatch) | SHA-256 of the bincode`.
//! Each record holds the batch's samples encrypted twice with FEIP (as rows of length 785 for
//! the forward pass, and as 785 columns of the batch length for the backward pass) and the
//! one-hot labels encrypted element by element with FEBO. The batch partition is fixed here:
//! the trainer may visit batches in any order, never regroup samples.
//!
//! The header names the curve, the fingerprint of the public parameters the data was
//! encrypted under ([`crate::protocol::PublicParams::fingerprint`]), the batch size and the
//! counts. Readers check every checksum and refuse data made under other parameters, so a
//! corrupted, truncated or foreign file is an error with a message, never a wrong gradient.

use crate::protocol::PublicParams;
use crate::Curve;
use fe::febo::FeboCiphertext;
use fe::feip::FeipCiphertext;
use nn::data::DatasetInfo;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"CNNENC01";
const INDEX_MAGIC: &[u8; 8] = b"CNNIDX01";
/// Version of the encrypted-dataset format (2: the header carries the dataset description;
/// 3: and whether the columns are bound to their batch, [`DatasetHeader::column_binding`]).
/// Version-2 files are still read, as unbound.
pub const FORMAT_VERSION: u32 = 3;
/// Largest record accepted when reading (a batch of 1024 samples is about 55 MiB).
pub const MAX_RECORD: u64 = 256 << 20;

/// Errors reading or writing an encrypted dataset.
#[derive(Debug, Error)]
pub enum DatasetError {
    /// A file operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed encrypted dataset.
    #[error("{path} is not a valid encrypted dataset: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data was encrypted under other public parameters than the ones in use.
    #[error(
        "{path} was encrypted under other public parameters (fingerprint {found}, the authority's is {expected}); \
         re-encrypt it with this authority's parameters"
    )]
    ForeignParams {
        /// The file.
        path: PathBuf,
        /// Fingerprint in the file.
        found: String,
        /// Fingerprint of the parameters in use.
        expected: String,
    },
}

/// The header of an encrypted dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetHeader {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Curve name (`ristretto`).
    pub curve: String,
    /// Fingerprint of the public parameters used.
    pub params_fingerprint: [u8; 32],
    /// Samples per batch.
    pub batch_size: u32,
    /// Number of batches.
    pub num_batches: u32,
    /// Number of samples (`batch_size · num_batches`).
    pub num_samples: u64,
    /// The description of the encrypted data (features, bound, classes with their names,
    /// image shape): rows have length `features + 1`, labels `classes` entries.
    pub dataset: DatasetInfo,
    /// The value a one-hot 1 is encrypted as.
    pub label_scale: i64,
    /// Free text: where the data came from.
    pub source: String,
    /// `Some(dataset)`: batch `k`'s columns are encrypted under the column key of batch `k`
    /// of `dataset`, from an authority that binds column keys to batches
    /// ([`crate::authority::Policy::bind_batches`]); `None`: under the parameters' shared
    /// column key. Last, so that a version-2 header is a version-3 header with `None` (one
    /// zero byte).
    pub column_binding: Option<crate::protocol::DatasetId>,
}

/// One batch, encrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct EncryptedBatch {
    /// Position of the batch in the file.
    pub index: u32,
    /// One FEIP ciphertext per sample (length `row_len`).
    pub rows: Vec<FeipCiphertext<Curve>>,
    /// One FEIP ciphertext per pixel position (length `batch_size`).
    pub cols: Vec<FeipCiphertext<Curve>>,
    /// FEBO ciphertexts of the one-hot labels, sample-major (`batch_size · classes`).
    pub labels: Vec<FeboCiphertext<Curve>>,
}

/// The stored form of a batch: every ciphertext as its `fe` envelope, so that encoding and
/// decoding (point compression and validation, about 3 µs per point) run on all cores.
#[derive(Serialize, Deserialize)]
pub struct WireBatch {
    index: u32,
    rows: Vec<serde_bytes::ByteBuf>,
    cols: Vec<serde_bytes::ByteBuf>,
    labels: Vec<serde_bytes::ByteBuf>,
}

impl WireBatch {
    /// A batch from the encodings of its ciphertexts (as `fe`'s encryptors write them).
    pub fn from_encoded(
        index: u32,
        rows: Vec<Vec<u8>>,
        cols: Vec<Vec<u8>>,
        labels: Vec<Vec<u8>>,
    ) -> Self {
        let b = |v: Vec<Vec<u8>>| v.into_iter().map(serde_bytes::ByteBuf::from).collect();
        WireBatch {
            index,
            rows: b(rows),
            cols: b(cols),
            labels: b(labels),
        }
    }
}

fn encode_all<T: fe::Encode<Curve> + Sync>(v: &[T]) -> Vec<serde_bytes::ByteBuf> {
    v.par_iter()
        .map(|c| serde_bytes::ByteBuf::from(c.to_bytes()))
        .collect()
}

fn decode_all<T: fe::Encode<Curve> + Send>(
    v: &[serde_bytes::ByteBuf],
) -> Result<Vec<T>, fe::FeError> {
    v.par_iter().map(|b| T::from_bytes(b)).collect()
}

impl EncryptedBatch {
    fn to_wire(&self) -> WireBatch {
        WireBatch {
            index: self.index,
            rows: encode_all(&self.rows),
            cols: encode_all(&self.cols),
            labels: encode_all(&self.labels),
        }
    }

    fn from_wire(w: WireBatch) -> Result<Self, fe::FeError> {
        Ok(EncryptedBatch {
            index: w.index,
            rows: decode_all(&w.rows)?,
            cols: decode_all(&w.cols)?,
            labels: decode_all(&w.labels)?,
        })
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> DatasetError {
    DatasetError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_RECORD)
}

/// Hex of a fingerprint, for messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes an encrypted dataset to a temporary file, renamed into place by [`Writer::finish`].
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    header: DatasetHeader,
    index: Vec<(u64, u64)>,
    pos: u64,
}

impl Writer {
    /// Starts a dataset at `path` (written to `path.tmp` until finished).
    pub fn create(path: &Path, header: DatasetHeader) -> Result<Self, DatasetError> {
        use bincode::Options;
        let tmp = path.with_extension("partial");
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        let h = codec()
            .serialize(&header)
            .map_err(|e| invalid(path, e.to_string()))?;
        out.write_all(MAGIC).map_err(io(&tmp))?;
        out.write_all(&(h.len() as u32).to_le_bytes())
            .map_err(io(&tmp))?;
        out.write_all(&h).map_err(io(&tmp))?;
        out.write_all(&Sha256::digest(&h)).map_err(io(&tmp))?;
        let pos = (8 + 4 + h.len() + 32) as u64;
        Ok(Writer {
            path: path.to_path_buf(),
            tmp,
            out,
            header,
            index: Vec::new(),
            pos,
        })
    }

    /// Appends the next batch (batches must come in index order).
    pub fn append(&mut self, batch: &EncryptedBatch) -> Result<(), DatasetError> {
        self.append_wire(&batch.to_wire())
    }

    /// Appends the next batch in its stored form.
    pub fn append_wire(&mut self, batch: &WireBatch) -> Result<(), DatasetError> {
        use bincode::Options;
        if batch.index as usize != self.index.len() {
            return Err(invalid(&self.path, "batches appended out of order"));
        }
        let body = codec()
            .serialize(batch)
            .map_err(|e| invalid(&self.path, e.to_string()))?;
        let len = 4 + body.len() as u64 + 32;
        self.out
            .write_all(&(body.len() as u32).to_le_bytes())
            .map_err(io(&self.tmp))?;
        self.out.write_all(&body).map_err(io(&self.tmp))?;
        self.out
            .write_all(&Sha256::digest(&body))
            .map_err(io(&self.tmp))?;
        self.index.push((self.pos, len));
        self.pos += len;
        Ok(())
    }

    /// Writes the index, syncs and renames the file into place; returns its size in bytes.
    pub fn finish(mut self) -> Result<u64, DatasetError> {
        if self.index.len() != self.header.num_batches as usize {
            return Err(invalid(
                &self.path,
                format!(
                    "{} batches written, header announces {}",
                    self.index.len(),
                    self.header.num_batches
                ),
            ));
        }
        let mut idx = Vec::with_capacity(self.index.len() * 16);
        for (o, l) in &self.index {
            idx.extend_from_slice(&o.to_le_bytes());
            idx.extend_from_slice(&l.to_le_bytes());
        }
        let t = &self.tmp;
        self.out.write_all(&idx).map_err(io(t))?;
        self.out.write_all(&Sha256::digest(&idx)).map_err(io(t))?;
        self.out
            .write_all(&(idx.len() as u64).to_le_bytes())
            .map_err(io(t))?;
        self.out.write_all(INDEX_MAGIC).map_err(io(t))?;
        let f = self.out.into_inner().map_err(|e| io(t)(e.into_error()))?;
        f.sync_all().map_err(io(t))?;
        let size = f.metadata().map_err(io(t))?.len();
        drop(f);
        std::fs::rename(t, &self.path).map_err(io(&self.path))?;
        Ok(size)
    }
}

/// Random access to the batches of an encrypted dataset, one batch in memory at a time.
pub struct Reader {
    path: PathBuf,
    file: File,
    header: DatasetHeader,
    index: Vec<(u64, u64)>,
}

impl Reader {
    /// Opens `path`, checking magic, header, index and their checksums.
    pub fn open(path: &Path) -> Result<Self, DatasetError> {
        use bincode::Options;
        let mut file = File::open(path).map_err(io(path))?;
        let size = file.metadata().map_err(io(path))?.len();
        let mut head = [0u8; 12];
        file.read_exact(&mut head)
            .map_err(|_| invalid(path, "too short for a header"))?;
        if &head[..8] != MAGIC {
            return Err(invalid(path, "bad magic (not an encrypted dataset)"));
        }
        let hlen = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64;
        if hlen > 1 << 20 || 12 + hlen + 32 > size {
            return Err(invalid(path, "header length out of range"));
        }
        let mut h = vec![0u8; hlen as usize + 32];
        file.read_exact(&mut h).map_err(io(path))?;
        let (hb, sum) = h.split_at(hlen as usize);
        if Sha256::digest(hb).as_slice() != sum {
            return Err(invalid(path, "header checksum mismatch"));
        }
        let mut hb = hb.to_vec();
        if hb.get(..4) == Some(&2u32.to_le_bytes()[..]) {
            hb.push(0); // version 2: unbound columns
        }
        let header: DatasetHeader = codec()
            .deserialize(&hb)
            .map_err(|e| invalid(path, format!("header: {e}")))?;
        if header.version != FORMAT_VERSION && header.version != 2 {
            return Err(invalid(
                path,
                format!(
                    "format version {}, expected {FORMAT_VERSION}",
                    header.version
                ),
            ));
        }
        if header.curve != <Curve as curv::elliptic::curves::Curve>::CURVE_NAME {
            return Err(invalid(path, format!("made for curve {}", header.curve)));
        }
        header
            .dataset
            .validate()
            .map_err(|e| invalid(path, format!("header: {e}")))?;
        if header.batch_size == 0
            || header.num_samples != u64::from(header.batch_size) * u64::from(header.num_batches)
        {
            return Err(invalid(path, "header: batch counts do not add up"));
        }
        // footer
        if size < 12 + hlen + 32 + 48 {
            return Err(invalid(path, "truncated (no index)"));
        }
        let mut tail = [0u8; 16];
        file.seek(SeekFrom::End(-16)).map_err(io(path))?;
        file.read_exact(&mut tail).map_err(io(path))?;
        if &tail[8..] != INDEX_MAGIC {
            return Err(invalid(
                path,
                "truncated or corrupted (index marker missing)",
            ));
        }
        let ilen = u64::from_le_bytes(tail[..8].try_into().unwrap_or([0; 8]));
        let nb = header.num_batches as u64;
        if ilen != nb * 16 || ilen + 48 > size {
            return Err(invalid(path, "index length does not match the header"));
        }
        let mut idx = vec![0u8; ilen as usize + 32];
        file.seek(SeekFrom::End(-(16 + 32 + ilen as i64)))
            .map_err(io(path))?;
        file.read_exact(&mut idx).map_err(io(path))?;
        let (ib, isum) = idx.split_at(ilen as usize);
        if Sha256::digest(ib).as_slice() != isum {
            return Err(invalid(path, "index checksum mismatch"));
        }
        let data_end = size - 16 - 32 - ilen;
        let mut index = Vec::with_capacity(nb as usize);
        let mut expect = 12 + hlen + 32;
        for c in ib.chunks_exact(16) {
            let o = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
            let l = u64::from_le_bytes(c[8..].try_into().unwrap_or([0; 8]));
            if o != expect || !(36..=MAX_RECORD).contains(&l) || o + l > data_end {
                return Err(invalid(path, "index entries out of range"));
            }
            expect = o + l;
            index.push((o, l));
        }
        if expect != data_end {
            return Err(invalid(path, "records do not fill the file"));
        }
        Ok(Reader {
            path: path.to_path_buf(),
            file,
            header,
            index,
        })
    }

    /// Opens `path` and checks it was made under `params`.
    pub fn open_for(path: &Path, params: &PublicParams) -> Result<Self, DatasetError> {
        let r = Self::open(path)?;
        let fp = params.fingerprint();
        if r.header.params_fingerprint != fp {
            return Err(DatasetError::ForeignParams {
                path: path.to_path_buf(),
                found: hex(&r.header.params_fingerprint),
                expected: hex(&fp),
            });
        }
        if r.header.batch_size as usize != params.batch_size() {
            return Err(invalid(
                path,
                format!(
                    "batches of {} samples, the public parameters' are {}",
                    r.header.batch_size,
                    params.batch_size()
                ),
            ));
        }
        r.header
            .dataset
            .check_fits(&params.dataset)
            .map_err(|e| invalid(path, e.to_string()))?;
        Ok(r)
    }

    /// The header.
    pub fn header(&self) -> &DatasetHeader {
        &self.header
    }

    /// Number of batches.
    pub fn num_batches(&self) -> usize {
        self.index.len()
    }

    /// Reads, checks and decodes batch `i` (points are validated while decoding).
    pub fn batch(&mut self, i: usize) -> Result<EncryptedBatch, DatasetError> {
        use bincode::Options;
        let path = self.path.clone();
        let (o, l) = *self
            .index
            .get(i)
            .ok_or_else(|| invalid(&path, format!("no batch {i}")))?;
        let mut buf = vec![0u8; l as usize];
        self.file.seek(SeekFrom::Start(o)).map_err(io(&path))?;
        self.file.read_exact(&mut buf).map_err(io(&path))?;
        let blen = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
        if blen + 36 != l {
            return Err(invalid(&path, format!("record {i} length mismatch")));
        }
        let (body, sum) = buf[4..].split_at(blen as usize);
        if Sha256::digest(body).as_slice() != sum {
            return Err(invalid(&path, format!("record {i} checksum mismatch")));
        }
        let w: WireBatch = codec()
            .deserialize(body)
            .map_err(|e| invalid(&path, format!("record {i}: {e}")))?;
        let b =
            EncryptedBatch::from_wire(w).map_err(|e| invalid(&path, format!("record {i}: {e}")))?;
        let h = &self.header;
        let bs = h.batch_size as usize;
        let rl = h.dataset.row_len();
        let ok = b.index as usize == i
            && b.rows.len() == bs
            && b.rows.iter().all(|c| c.elements().len() == rl)
            && b.cols.len() == rl
            && b.cols.iter().all(|c| c.elements().len() == bs)
            && b.labels.len() == bs * h.dataset.classes;
        if !ok {
            return Err(invalid(&path, format!("record {i} has the wrong shape")));
        }
        Ok(b)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The header of a file of one batch of one sample described by `dataset`.
    fn one_sample_header(dataset: DatasetInfo) -> DatasetHeader {
        DatasetHeader {
            version: FORMAT_VERSION,
            curve: <Curve as curv::elliptic::curves::Curve>::CURVE_NAME.to_string(),
            params_fingerprint: [0; 32],
            batch_size: 1,
            num_batches: 1,
            num_samples: 1,
            dataset,
            label_scale: 1,
            source: String::new(),
            column_binding: None,
        }
    }

    /// Found by `tests/decoders.rs`: a header (with its checksum) announcing `usize::MAX`
    /// features passed validation, and reading a record then overflowed computing the row
    /// length `features + 1` (a panic in debug builds). The header is now refused.
    #[test]
    fn header_with_too_many_features_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.enc");
        let mut dataset = DatasetInfo::new(3, 255, 2).unwrap();
        dataset.features = usize::MAX;
        let header = one_sample_header(dataset);
        let mut w = Writer::create(&path, header).unwrap();
        w.append_wire(&WireBatch::from_encoded(0, vec![], vec![], vec![]))
            .unwrap();
        w.finish().unwrap();
        let e = Reader::open(&path).err().unwrap().to_string();
        assert!(e.contains("features"), "{e}");
    }

    /// A version-2 file (the header without `column_binding`) is read as unbound: made here by
    /// cutting the flag's byte out of a version-3 file and mending lengths, offsets and sums.
    #[test]
    fn version_2_files_are_read_as_unbound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.enc");
        let header = DatasetHeader {
            params_fingerprint: [7; 32],
            source: "old".into(),
            ..one_sample_header(DatasetInfo::new(3, 255, 2).unwrap())
        };
        let mut w = Writer::create(&path, header.clone()).unwrap();
        w.append_wire(&WireBatch::from_encoded(0, vec![], vec![], vec![]))
            .unwrap();
        w.finish().unwrap();
        let v3 = std::fs::read(&path).unwrap();
        let hlen = u32::from_le_bytes(v3[8..12].try_into().unwrap()) as usize;
        let mut hb = v3[12..12 + hlen - 1].to_vec();
        hb[..4].copy_from_slice(&2u32.to_le_bytes());
        let mut v2 = v3[..8].to_vec();
        v2.extend_from_slice(&((hlen - 1) as u32).to_le_bytes());
        v2.extend_from_slice(&hb);
        v2.extend_from_slice(&Sha256::digest(&hb));
        let body_end = v3.len() - 16 - 32 - 16;
        v2.extend_from_slice(&v3[12 + hlen + 32..body_end]);
        let (offset, length) = (
            u64::from_le_bytes(v3[body_end..body_end + 8].try_into().unwrap()) - 1,
            &v3[body_end + 8..body_end + 16],
        );
        let mut index = offset.to_le_bytes().to_vec();
        index.extend_from_slice(length);
        v2.extend_from_slice(&index);
        v2.extend_from_slice(&Sha256::digest(&index));
        v2.extend_from_slice(&v3[v3.len() - 16..]);
        let old = dir.path().join("v2.enc");
        std::fs::write(&old, &v2).unwrap();
        let r = Reader::open(&old).unwrap();
        assert_eq!(r.header().version, 2);
        assert_eq!(r.header().column_binding, None);
        assert_eq!(r.header().source, "old");
        assert_eq!(r.header().params_fingerprint, [7; 32]);
        // A version-3 file with the same cut is refused, not misread.
        let mut bad = v2.clone();
        bad[12..16].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let sum = Sha256::digest(&bad[12..12 + hlen - 1]);
        bad[12 + hlen - 1..12 + hlen - 1 + 32].copy_from_slice(&sum);
        std::fs::write(&old, &bad).unwrap();
        assert!(Reader::open(&old).is_err());
    }
}
