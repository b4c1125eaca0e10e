//! The append-only audit log: one JSON object per line for every request that issued keys,
//! was refused, or could not be understood.
//!
//! A line of issued keys looks like
//!
//! ```json
//! {"ts":1732200000,"peer":"127.0.0.1:50312","kind":"row","outcome":"issued","count":2,
//!  "keys":[{"digest":"3f1c…","nonzero":785},{"digest":"a07b…","nonzero":784}]}
//! ```
//!
//! (on one line). `digest` is the first 16 bytes, in hex, of SHA-256 over the key's input:
//! for an inner-product key, a domain tag (`row`/`col`) and the vector's entries as 32-bit
//! little-endian integers; for a basic-operation key, the tag `febo`, the operation, the
//! operand as a 64-bit little-endian integer and the commitment bytes. Whole vectors are not
//! logged; the digests let an auditor recognise a vector asked for twice or compare against
//! the trainer's records. A refusal has `"outcome":"refused"` and a `reason`. The file is
//! opened in append mode and every line is flushed before the keys are sent.

use crate::protocol::FeboKeyRequest;
use fe::febo::Op;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a request asked for, as named in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Public parameters (no keys).
    Params,
    /// Inner-product keys for rows.
    Row,
    /// Inner-product keys for columns.
    Col,
    /// Basic-operation keys.
    Febo,
    /// A request that could not be read or authenticated: the kind is unknown or untrusted.
    Unknown,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Keys were derived and sent.
    Issued,
    /// Refused by authentication or by the key policy.
    Refused,
    /// Not understood (malformed or oversized frame, wrong version, invalid commitment).
    Error,
}

/// The record of one issued key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    /// First 16 bytes of the SHA-256 of the key's input, in hex.
    pub digest: String,
    /// Non-zero entries of the vector (inner-product keys only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonzero: Option<usize>,
    /// The operation (basic-operation keys only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<Op>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Unix time in seconds.
    pub ts: u64,
    /// The caller's address.
    pub peer: String,
    /// What was asked for.
    pub kind: KeyKind,
    /// How it ended.
    pub outcome: Outcome,
    /// Number of keys asked for.
    pub count: usize,
    /// Why it was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The keys issued (empty unless issued).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyRecord>,
}

impl AuditEntry {
    /// An entry stamped with the current time.
    pub fn new(peer: &str, kind: KeyKind, outcome: Outcome, count: usize) -> Self {
        AuditEntry {
            ts: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            peer: peer.to_string(),
            kind,
            outcome,
            count,
            reason: None,
            keys: Vec::new(),
        }
    }
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn short_digest(h: Sha256) -> String {
    hex(&h.finalize()[..16])
}

/// The record of an inner-product key for `y` (`kind` is [`KeyKind::Row`] or [`KeyKind::Col`]).
pub fn feip_record(kind: KeyKind, y: &[i32]) -> KeyRecord {
    let mut h = Sha256::new();
    h.update(match kind {
        KeyKind::Row => b"row".as_slice(),
        _ => b"col".as_slice(),
    });
    let mut nonzero = 0;
    for &v in y {
        h.update(v.to_le_bytes());
        nonzero += usize::from(v != 0);
    }
    KeyRecord {
        digest: short_digest(h),
        nonzero: Some(nonzero),
        op: None,
    }
}

/// The record of a basic-operation key.
pub fn febo_record(r: &FeboKeyRequest) -> KeyRecord {
    let mut h = Sha256::new();
    h.update(b"febo");
    h.update([match r.op {
        Op::Add => 0u8,
        Op::Sub => 1,
        Op::Mul => 2,
        Op::Div => 3,
    }]);
    h.update(r.operand.to_le_bytes());
    h.update(&r.commitment);
    KeyRecord {
        digest: short_digest(h),
        nonzero: None,
        op: Some(r.op),
    }
}

/// An append-only audit file shared by all connections.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating it with mode 0600 if needed) the log at `path` in append mode.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry as a JSON line and flushes it to the operating system.
    pub fn record(&self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // A poisoned lock only means another thread panicked mid-write; the file is still
        // usable (each line is written with a single call).
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(&line)?;
        f.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_short_stable_and_distinct() {
        let a = feip_record(KeyKind::Row, &[1, 0, -2]);
        assert_eq!(a.digest.len(), 32);
        assert_eq!(a.nonzero, Some(2));
        assert_eq!(a, feip_record(KeyKind::Row, &[1, 0, -2]));
        assert_ne!(a.digest, feip_record(KeyKind::Col, &[1, 0, -2]).digest);
        assert_ne!(a.digest, feip_record(KeyKind::Row, &[1, 0, 2]).digest);
        let r = FeboKeyRequest {
            commitment: vec![7; 32],
            op: Op::Sub,
            operand: 5,
        };
        let b = febo_record(&r);
        assert_eq!(b.op, Some(Op::Sub));
        assert_ne!(
            b.digest,
            febo_record(&FeboKeyRequest { operand: 6, ..r }).digest
        );
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn entries_serialize_as_one_json_line() {
        let mut e = AuditEntry::new("127.0.0.1:1", KeyKind::Col, Outcome::Refused, 3);
        e.reason = Some("too \"sparse\"\nsecond line".into());
        let s = serde_json::to_string(&e).unwrap();
        assert!(!s.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["kind"], "col");
        assert_eq!(v["outcome"], "refused");
        assert!(v.get("keys").is_none());
    }
}
