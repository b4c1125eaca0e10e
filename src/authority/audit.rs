//! The audit log: one JSON object per line, hash-chained, bounded in size and rotated.
//!
//! # Lines
//!
//! Every line carries `seq` (its position in the whole log, counting from 0 across
//! rotations), `prev` (the SHA-256, in hex, of the previous line's bytes without its newline;
//! 64 zeros for the very first line) and `event`:
//!
//! - `start` and `stop`: the authority started or shut down;
//! - `request`: an authenticated request that issued keys, was refused by the key policy or
//!   could not be served; a line of issued keys looks like
//!
//!   ```json
//!   {"seq":7,"prev":"9c1e…","event":"request","ts":1732200000,"peer":"127.0.0.1:50312",
//!    "kind":"row","outcome":"issued","count":2,
//!    "keys":[{"digest":"3f1c…","nonzero":785},{"digest":"a07b…","nonzero":784}]}
//!   ```
//!
//!   (on one line); a refusal has `"outcome":"refused"` and a `reason`;
//! - `failures`: a summary of the failures *before authentication* of one peer address
//!   (oversized, malformed or wrong-version frames, wrong tokens, connections that did not
//!   authenticate in time or were evicted): `count`, a count per kind in `failures`, the
//!   `first_ts` of the period and the `last_reason`. Such failures are counted in memory and
//!   summarised every [`AuditLimits::summary_interval`], after
//!   [`AuditLimits::summary_every`] failures of one peer, and at shutdown, so that garbage
//!   from the network cannot grow the log by one line per frame;
//! - `rotate`: the first line of a file started by rotation.
//!
//! `digest` is the first 16 bytes, in hex, of SHA-256 over the key's input: for an
//! inner-product key, a domain tag (`row`/`col`) and the vector's entries as 32-bit
//! little-endian integers; for a basic-operation key, the tag `febo`, the operation, the
//! operand as a 64-bit little-endian integer and the commitment bytes. Whole vectors are not
//! logged; the digests let an auditor recognise a vector asked for twice or compare against
//! the trainer's records. Every line is written with one call and flushed before the keys are
//! sent.
//!
//! # Files
//!
//! When a line would take `audit.log` past [`AuditLimits::max_bytes`], the file is renamed
//! `audit.log.1` (older ones shift to `.2`, `.3`, …; the one past
//! [`AuditLimits::max_files`] is deleted) and a new `audit.log` starts with a `rotate` line
//! chained to the last line of the old file. After every line, `audit.log.head` (mode 0600)
//! records the last line's `seq` and hash, so lines cut from the end are detected too; an
//! authority that starts on a log that does not end at its head says so in its `start` line
//! (`head_mismatch`) and goes on numbering from the head, so the damage stays visible.
//!
//! The chain shows changes, not who made them: someone who can write the files can also rewrite
//! the whole chain and the head. Copy the head (or `authority audit` output) elsewhere to anchor
//! it. Only one authority may write a log at a time.
//!
//! [`verify`] reads the files back, checks the chain and summarises them ([`AuditReport`]);
//! an edited line, a deleted line, a truncated file, a missing file or a log that does not
//! end at its head is reported with the first broken line.

use crate::protocol::FeboKeyRequest;
use fe::febo::Op;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `prev` of the first line of a log: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Default size at which `audit.log` is rotated (16 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Default number of rotated files kept (`audit.log.1` to `audit.log.8`).
pub const DEFAULT_MAX_FILES: usize = 8;
/// Default period of the summaries of failures before authentication.
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Default number of one peer's failures that triggers a summary before the period ends.
pub const DEFAULT_SUMMARY_EVERY: u64 = 1000;
/// Longest line [`verify`] reads (64 MiB); longer lines are reported, not loaded.
pub const MAX_LINE: usize = 64 << 20;
/// Smallest accepted [`AuditLimits::max_bytes`].
pub const MIN_MAX_BYTES: u64 = 4096;
/// Most peers whose failures are counted apart; the others are summed under peer `*`.
const MAX_FAILURE_PEERS: usize = 1024;
/// Longest `last_reason` kept in a failure summary, in bytes.
const MAX_REASON: usize = 200;
/// Most distinct refusal reasons [`verify`] counts apart; the others go under `(other)`.
const MAX_REASONS: usize = 32;

/// What a request asked for, as named in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Inner-product keys for a prediction service's first-layer rows.
    Inference,
    /// A request that could not be read: the kind is unknown.
    Unknown,
}

impl KeyKind {
    /// The name used in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Params => "params",
            KeyKind::Row => "row",
            KeyKind::Col => "col",
            KeyKind::Febo => "febo",
            KeyKind::Inference => "inference",
            KeyKind::Unknown => "unknown",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Keys were derived and sent.
    Issued,
    /// Refused by authentication or by the key policy.
    Refused,
    /// Not understood (malformed or oversized frame, invalid commitment).
    Error,
}

/// What a line of the log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// The authority started.
    Start,
    /// An authenticated request.
    Request,
    /// A summary of one peer's failures before authentication.
    Failures,
    /// The first line of a file started by rotation.
    Rotate,
    /// The authority shut down.
    Stop,
}

pub use crate::net::Failure;

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

/// One authenticated request, as logged (a line with `"event":"request"`).
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
    /// The dataset (hex) of batch-bound column keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// The batch that batch-bound column keys were asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// Why it was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The keys issued (empty unless issued).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyRecord>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AuditEntry {
    /// An entry stamped with the current time.
    pub fn new(peer: &str, kind: KeyKind, outcome: Outcome, count: usize) -> Self {
        AuditEntry {
            ts: now_secs(),
            peer: peer.to_string(),
            kind,
            outcome,
            count,
            dataset: None,
            batch: None,
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

/// The chain hash of a line: SHA-256 of its bytes (without the newline), in hex.
pub fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

/// The record of an inner-product key for `y` (`kind` is [`KeyKind::Row`],
/// [`KeyKind::Inference`] or [`KeyKind::Col`]). Row and inference keys of the same vector
/// have the same digest: they are the same key.
pub fn feip_record(kind: KeyKind, y: &[i32]) -> KeyRecord {
    let mut h = Sha256::new();
    h.update(match kind {
        KeyKind::Row | KeyKind::Inference => b"row".as_slice(),
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

/// Size, rotation and summary limits of an [`AuditLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLimits {
    /// `audit.log` is rotated before a line would take it past this size (default
    /// [`DEFAULT_MAX_BYTES`], at least [`MIN_MAX_BYTES`]). A single longer line is still
    /// written whole, alone in its file.
    pub max_bytes: u64,
    /// Rotated files kept, `audit.log.1` (newest) to `audit.log.N` (default
    /// [`DEFAULT_MAX_FILES`]; 0 keeps none).
    pub max_files: usize,
    /// Failures before authentication are summarised at least this often (default
    /// [`DEFAULT_SUMMARY_INTERVAL`]).
    pub summary_interval: Duration,
    /// ... and as soon as one peer has this many since its last summary (default
    /// [`DEFAULT_SUMMARY_EVERY`]).
    pub summary_every: u64,
}

impl Default for AuditLimits {
    fn default() -> Self {
        AuditLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_files: DEFAULT_MAX_FILES,
            summary_interval: DEFAULT_SUMMARY_INTERVAL,
            summary_every: DEFAULT_SUMMARY_EVERY,
        }
    }
}

impl AuditLimits {
    /// Checks that the limits are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes < MIN_MAX_BYTES {
            return Err(format!(
                "the audit log's maximum size must be at least {MIN_MAX_BYTES} bytes"
            ));
        }
        if self.summary_every == 0 {
            return Err("failures must be summarised after at least 1 failure".into());
        }
        if self.summary_interval.is_zero() {
            return Err("the failure summary interval must be positive".into());
        }
        Ok(())
    }
}

/// The `i`-th rotated file of `path` (`audit.log.i`); 0 is `path` itself.
pub fn rotated_path(path: &Path, i: usize) -> PathBuf {
    if i == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// The head file of `path` (`audit.log.head`).
pub fn head_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".head");
    PathBuf::from(s)
}

/// The last line's position and hash, as kept in the head file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// One peer's failures since its last summary.
#[derive(Debug, Default)]
struct PeerFailures {
    counts: BTreeMap<&'static str, u64>,
    total: u64,
    first_ts: u64,
    last_reason: String,
}

/// A line as written: the chain fields, then the body's fields.
#[derive(Serialize)]
struct Chained<'a, T: Serialize> {
    seq: u64,
    prev: &'a str,
    event: Event,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct Marker {
    ts: u64,
    /// On a `start` line: the head the log should have ended at, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    head_mismatch: Option<Head>,
}

#[derive(Serialize)]
struct FailureSummary<'a> {
    ts: u64,
    peer: &'a str,
    count: u64,
    failures: &'a BTreeMap<&'static str, u64>,
    first_ts: u64,
    last_reason: &'a str,
}

struct State {
    file: File,
    size: u64,
    /// `seq` of the next line.
    seq: u64,
    /// Hash of the last line written.
    prev: String,
    failures: HashMap<String, PeerFailures>,
    last_summary: Instant,
}

/// The audit file shared by all connections (see the [module documentation](self)).
pub struct AuditLog {
    path: PathBuf,
    limits: AuditLimits,
    state: Mutex<State>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish()
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// The last line of a file (without its newline) and whether the file ends with a newline;
/// `None` for a missing or empty file. Reads backwards, at most [`MAX_LINE`] bytes.
fn last_line(path: &Path) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut f = match File::open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        r => r?,
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    let terminated = last[0] == b'\n';
    let mut pos = if terminated { len - 1 } else { len };
    let mut tail: Vec<u8> = Vec::new();
    while pos > 0 {
        let n = pos.min(64 << 10);
        pos -= n;
        let mut chunk = vec![0u8; n as usize];
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut chunk)?;
        let found = chunk.iter().rposition(|&c| c == b'\n');
        if let Some(i) = found {
            chunk.drain(..=i);
        }
        chunk.extend_from_slice(&tail);
        tail = chunk;
        if tail.len() > MAX_LINE {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "the last line of the audit log is too long",
            ));
        }
        if found.is_some() {
            break;
        }
    }
    Ok(Some((tail, terminated)))
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

impl AuditLog {
    /// Opens the log at `path` with the default [`AuditLimits`] (see [`AuditLog::open_with`]).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with(path, AuditLimits::default())
    }

    /// Opens (creating it with mode 0600 if needed) the log at `path` in append mode, chains
    /// on to its last line (or that of `audit.log.1` when `audit.log` is empty) and writes a
    /// `start` line.
    pub fn open_with(path: &Path, limits: AuditLimits) -> std::io::Result<Self> {
        limits
            .validate()
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))?;
        let mut file = open_append(path)?;
        let head: Option<Head> = std::fs::read(head_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut found = last_line(path)?;
        if found.is_none() {
            found = last_line(&rotated_path(path, 1))?.map(|(l, _)| (l, true));
        }
        let (mut seq, prev, last_seq) = match &found {
            None => (0, GENESIS.to_string(), None),
            Some((line, terminated)) => {
                if !terminated {
                    // A line cut short (a crash mid-write): end it, so that it stands alone
                    // and the verifier names it.
                    file.write_all(b"\n")?;
                }
                let last = serde_json::from_slice::<SeqOnly>(line).map(|s| s.seq).ok();
                let seq = last.or(head.as_ref().map(|h| h.seq)).map_or(0, |s| s + 1);
                (seq, line_hash(line), last)
            }
        };
        // A log that does not end at its head was cut or edited while no authority ran: the
        // start line says so (the head is about to be overwritten), and seq goes on from the
        // head so that removed lines leave a gap.
        let mismatch = head.filter(|h| {
            let same = found
                .as_ref()
                .is_some_and(|(l, _)| line_hash(l) == h.hash && last_seq == Some(h.seq));
            !same
        });
        if let Some(h) = &mismatch {
            seq = seq.max(h.seq + 1);
        }
        let size = file.metadata()?.len();
        let log = AuditLog {
            path: path.to_path_buf(),
            limits,
            state: Mutex::new(State {
                file,
                size,
                seq,
                prev,
                failures: HashMap::new(),
                last_summary: Instant::now(),
            }),
        };
        log.marker(Event::Start, mismatch)?;
        Ok(log)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits the log was opened with.
    pub fn limits(&self) -> &AuditLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked; every line is written with a
        // single call, so the state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one authenticated request as a `request` line and flushes it.
    pub fn record(&self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut st = self.lock();
        self.append(&mut st, Event::Request, entry)
    }

    fn marker(&self, event: Event, head_mismatch: Option<Head>) -> std::io::Result<()> {
        let mut st = self.lock();
        self.append(
            &mut st,
            event,
            &Marker {
                ts: now_secs(),
                head_mismatch,
            },
        )
    }

    fn serialize<T: Serialize>(st: &State, event: Event, body: &T) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec(&Chained {
            seq: st.seq,
            prev: &st.prev,
            event,
            body,
        })
        .map_err(std::io::Error::other)
    }

    fn append<T: Serialize>(&self, st: &mut State, event: Event, body: &T) -> std::io::Result<()> {
        let mut line = Self::serialize(st, event, body)?;
        if st.size > 0 && st.size + line.len() as u64 + 1 > self.limits.max_bytes {
            self.rotate(st)?;
            line = Self::serialize(st, event, body)?;
        }
        self.write_line(st, line)
    }

    fn write_line(&self, st: &mut State, mut line: Vec<u8>) -> std::io::Result<()> {
        let hash = line_hash(&line);
        line.push(b'\n');
        st.file.write_all(&line)?;
        st.file.flush()?;
        st.size += line.len() as u64;
        st.prev = hash;
        let head = Head {
            seq: st.seq,
            hash: st.prev.clone(),
        };
        st.seq += 1;
        self.write_head(&head)
    }

    fn write_head(&self, head: &Head) -> std::io::Result<()> {
        let path = head_path(&self.path);
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(&serde_json::to_vec(head).map_err(std::io::Error::other)?)?;
        drop(f);
        std::fs::rename(&tmp, &path)
    }

    /// Shifts `audit.log.i` to `audit.log.i+1` (dropping the oldest), `audit.log` to
    /// `audit.log.1`, and starts a new file with a `rotate` line.
    fn rotate(&self, st: &mut State) -> std::io::Result<()> {
        st.file.flush()?;
        let n = self.limits.max_files;
        if n == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for i in (1..n).rev() {
                let from = rotated_path(&self.path, i);
                if from.exists() {
                    std::fs::rename(&from, rotated_path(&self.path, i + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated_path(&self.path, 1))?;
        }
        st.file = open_append(&self.path)?;
        st.size = 0;
        let line = Self::serialize(
            st,
            Event::Rotate,
            &Marker {
                ts: now_secs(),
                head_mismatch: None,
            },
        )?;
        self.write_line(st, line)
    }

    /// Counts one failure before authentication of `peer` (an address without port, so that
    /// one host's connections are counted together); writes its summary once it has
    /// [`AuditLimits::summary_every`] of them. Best effort: a failed write is not reported.
    pub fn failure(&self, peer: &str, what: Failure, reason: &str) {
        let mut st = self.lock();
        let key = if st.failures.len() >= MAX_FAILURE_PEERS && !st.failures.contains_key(peer) {
            "*".to_string()
        } else {
            peer.to_string()
        };
        let f = st.failures.entry(key.clone()).or_default();
        if f.total == 0 {
            f.first_ts = now_secs();
        }
        f.total += 1;
        *f.counts.entry(what.as_str()).or_insert(0) += 1;
        f.last_reason.clear();
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        f.last_reason.push_str(&reason[..end]);
        if f.total >= self.limits.summary_every {
            if let Some(f) = st.failures.remove(&key) {
                let _ = self.summarise(&mut st, &key, &f);
            }
        }
    }

    fn summarise(&self, st: &mut State, peer: &str, f: &PeerFailures) -> std::io::Result<()> {
        let body = FailureSummary {
            ts: now_secs(),
            peer,
            count: f.total,
            failures: &f.counts,
            first_ts: f.first_ts,
            last_reason: &f.last_reason,
        };
        self.append(st, Event::Failures, &body)
    }

    fn flush_failures(&self, st: &mut State) -> std::io::Result<()> {
        let mut all: Vec<(String, PeerFailures)> = st.failures.drain().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        st.last_summary = Instant::now();
        for (peer, f) in &all {
            self.summarise(st, peer, f)?;
        }
        Ok(())
    }

    /// Writes the failure summaries if [`AuditLimits::summary_interval`] has passed since
    /// the last ones (called regularly by the server; cheap otherwise).
    pub fn tick(&self) {
        let mut st = self.lock();
        if st.last_summary.elapsed() >= self.limits.summary_interval {
            let _ = self.flush_failures(&mut st);
        }
    }

    /// Writes the pending failure summaries and a `stop` line (at shutdown).
    pub fn close(&self) -> std::io::Result<()> {
        let mut st = self.lock();
        self.flush_failures(&mut st)?;
        self.append(
            &mut st,
            Event::Stop,
            &Marker {
                ts: now_secs(),
                head_mismatch: None,
            },
        )
    }
}

/// The first place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The file.
    pub file: PathBuf,
    /// The line, counting from 1 (0 when the break is about the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
        }
    }
}

/// Requests and keys of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindTotals {
    /// Requests that issued keys.
    pub requests: u64,
    /// Keys issued.
    pub keys: u64,
}

/// What [`verify`] found in a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
    /// Lines read.
    pub lines: u64,
    /// `seq` of the first and last readable lines.
    pub seq_range: Option<(u64, u64)>,
    /// The oldest file starts with a rotation: earlier lines were rotated away.
    pub rotated_away: bool,
    /// Starts and stops of the authority.
    pub starts: u64,
    /// Clean shutdowns.
    pub stops: u64,
    /// Issued requests and keys by kind (`row`, `col`, `febo`).
    pub issued: BTreeMap<String, KindTotals>,
    /// Keys issued by caller (address without port) and kind.
    pub by_caller: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests refused by the key policy, by reason.
    pub refusals: BTreeMap<String, u64>,
    /// Authenticated requests that could not be served.
    pub errors: u64,
    /// Failures before authentication, by kind (`auth`, `malformed`, …).
    pub failures: BTreeMap<String, u64>,
    /// Peers with failures before authentication.
    pub failure_peers: BTreeSet<String>,
    /// The first break of the chain, if any.
    pub broken: Option<ChainBreak>,
}

impl AuditReport {
    /// The chain holds from the first line read to the head.
    pub fn intact(&self) -> bool {
        self.broken.is_none()
    }
}

impl std::fmt::Display for AuditReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|p| {
                p.file_name()
                    .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
            })
            .collect();
        writeln!(f, "files: {} ({})", files.len(), files.join(", "))?;
        match self.seq_range {
            Some((a, b)) => writeln!(f, "lines: {} (seq {a} to {b})", self.lines)?,
            None => writeln!(f, "lines: {}", self.lines)?,
        }
        if self.rotated_away {
            writeln!(
                f,
                "older lines: rotated away (the oldest file starts with a rotation)"
            )?;
        }
        writeln!(f, "starts: {}, clean stops: {}", self.starts, self.stops)?;
        writeln!(f, "keys issued by kind:")?;
        if self.issued.is_empty() {
            writeln!(f, "  none")?;
        }
        for (kind, t) in &self.issued {
            writeln!(f, "  {kind}: {} keys in {} requests", t.keys, t.requests)?;
        }
        writeln!(f, "keys issued by caller:")?;
        if self.by_caller.is_empty() {
            writeln!(f, "  none")?;
        }
        for (caller, kinds) in &self.by_caller {
            let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(f, "  {caller}: {}", parts.join(", "))?;
        }
        let refused: u64 = self.refusals.values().sum();
        writeln!(f, "refused by the key policy: {refused}")?;
        for (reason, n) in &self.refusals {
            writeln!(f, "  {n} x {reason}")?;
        }
        writeln!(f, "errors after authentication: {}", self.errors)?;
        let failed: u64 = self.failures.values().sum();
        let parts: Vec<String> = self
            .failures
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if failed == 0 {
            writeln!(f, "failures before authentication: 0")?;
        } else {
            writeln!(
                f,
                "failures before authentication: {failed} from {} peers ({})",
                self.failure_peers.len(),
                parts.join(", ")
            )?;
        }
        match &self.broken {
            None => write!(f, "chain: intact"),
            Some(b) => write!(f, "chain: BROKEN at {b}"),
        }
    }
}

/// A line as read back (fields of every event, all optional but the chain's).
#[derive(Deserialize)]
struct LogLine {
    seq: u64,
    prev: String,
    event: Event,
    #[serde(default)]
    peer: Option<String>,
    #[serde(default)]
    kind: Option<KeyKind>,
    #[serde(default)]
    outcome: Option<Outcome>,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    failures: BTreeMap<String, u64>,
    #[serde(default)]
    head_mismatch: Option<Head>,
}

/// The outcome of reading one line with [`read_line_bounded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// No more bytes.
    Eof,
    /// A line; `true` if it ended with a newline (`false`: the file ends inside it).
    Line(bool),
    /// A line longer than the bound; it was skipped and `buf` holds its first bytes.
    TooLong,
}

/// Reads one line into `buf` (cleared first, newline removed), holding at most `max` bytes
/// of it in memory: a longer line is skipped to its end and reported as
/// [`LineRead::TooLong`].
pub fn read_line_bounded<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => LineRead::Eof,
                (true, true) => LineRead::TooLong,
                (true, false) => LineRead::Line(false),
            });
        }
        any = true;
        let (part, done) = match chunk.iter().position(|&c| c == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !too_long {
            let room = max - buf.len();
            if part.len() > room {
                buf.extend_from_slice(&part[..room]);
                too_long = true;
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = done.unwrap_or(chunk.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line(true)
            });
        }
    }
}

/// The files of the log at `path`, oldest first, or the first missing one in the sequence.
fn log_files(path: &Path) -> std::io::Result<(Vec<PathBuf>, Option<ChainBreak>)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!("{name}.");
    let mut numbers = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(rest) = n.strip_prefix(&prefix) {
                    if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                        if let Ok(i) = rest.parse::<usize>() {
                            numbers.push(i);
                        }
                    }
                }
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    numbers.sort_unstable();
    let mut gap = None;
    for (want, &have) in (1..).zip(&numbers) {
        if want != have {
            gap = Some(ChainBreak {
                file: rotated_path(path, want),
                line: 0,
                reason: "this rotated file is missing (older ones are present)".into(),
            });
            break;
        }
    }
    let mut files: Vec<PathBuf> = numbers
        .iter()
        .rev()
        .map(|&i| rotated_path(path, i))
        .collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok((files, gap))
}

fn caller_of(peer: &str) -> String {
    peer.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| peer.to_string())
}

/// Reads the log at `path` (and its rotated files and head), checks the hash chain and
/// summarises what it records. Fails only when a file cannot be read; a broken chain is
/// reported in [`AuditReport::broken`].
pub fn verify(path: &Path) -> std::io::Result<AuditReport> {
    let (files, gap) = log_files(path)?;
    let mut report = AuditReport {
        files: files.clone(),
        ..AuditReport::default()
    };
    if let Some(g) = gap {
        report.broken = Some(g);
    }
    // Hash and seq of the previous line, once one has been read.
    let mut prev: Option<(String, Option<u64>)> = None;
    let mut last_place: Option<(PathBuf, usize)> = None;
    let mut buf = Vec::new();
    for file in &files {
        let mut r = BufReader::new(File::open(file)?);
        let mut n = 0usize;
        loop {
            let read = read_line_bounded(&mut r, &mut buf, MAX_LINE)?;
            if read == LineRead::Eof {
                break;
            }
            n += 1;
            report.lines += 1;
            last_place = Some((file.clone(), n));
            let hash = line_hash(&buf);
            if read == LineRead::TooLong {
                brk(
                    &mut report,
                    file,
                    n,
                    format!("longer than {MAX_LINE} bytes"),
                );
                prev = Some((hash, None));
                continue;
            }
            let parsed: Result<LogLine, _> = serde_json::from_slice(&buf);
            let line = match parsed {
                Ok(l) => l,
                Err(e) => {
                    let why = if read == LineRead::Line(false) {
                        format!("an incomplete line at the end of the file (truncated?): {e}")
                    } else {
                        format!("not an audit entry: {e}")
                    };
                    brk(&mut report, file, n, why);
                    prev = Some((hash, None));
                    continue;
                }
            };
            if read == LineRead::Line(false) {
                // Every entry is written with its newline: a last line without one is what
                // truncating the file by its final byte leaves.
                brk(
                    &mut report,
                    file,
                    n,
                    "the file ends without a newline after this entry (truncated?)".into(),
                );
            }
            if let (Event::Start, Some(h)) = (line.event, &line.head_mismatch) {
                brk(
                    &mut report,
                    file,
                    n,
                    format!(
                        "the authority restarted on a log that did not end at its head (seq \
                         {}): lines were removed or edited while it was down",
                        h.seq
                    ),
                );
            }
            match &prev {
                None => {
                    let genesis =
                        line.event == Event::Start && line.seq == 0 && line.prev == GENESIS;
                    if line.event == Event::Rotate {
                        report.rotated_away = true;
                    } else if !genesis {
                        brk(
                            &mut report,
                            file,
                            n,
                            format!(
                                "the log starts at seq {} with neither the first entry nor a \
                                 rotation: earlier lines were removed",
                                line.seq
                            ),
                        );
                    }
                }
                Some((ph, pseq)) => {
                    if let Some(ps) = pseq {
                        if line.seq != ps + 1 {
                            brk(
                                &mut report,
                                file,
                                n,
                                format!(
                                    "seq jumps from {ps} to {}: lines were removed before this one",
                                    line.seq
                                ),
                            );
                        }
                    }
                    if &line.prev != ph {
                        let before = if n > 1 {
                            format!("line {}", n - 1)
                        } else {
                            "the last line of the previous file".to_string()
                        };
                        brk(
                            &mut report,
                            file,
                            n,
                            format!(
                                "its prev hash does not match the line before: {before} was \
                                 edited (or this line's prev, or lines were removed)"
                            ),
                        );
                    }
                }
            }
            report.seq_range = Some(match report.seq_range {
                None => (line.seq, line.seq),
                Some((a, _)) => (a, line.seq),
            });
            tally(&mut report, &line);
            prev = Some((hash, Some(line.seq)));
        }
        if n == 0 && file.as_path() != path {
            // Rotation renames a file full of entries: an empty one was emptied, and would
            // otherwise pass for one rotated away (found by `tests/fuzz.rs`).
            brk(
                &mut report,
                file,
                0,
                "a rotated file with no entries: its lines were removed".into(),
            );
        }
    }
    // The end of the log must be the head.
    let head_file = head_path(path);
    let head: Option<Head> = match std::fs::read(&head_file) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(h) => Some(h),
            Err(e) => {
                brk(
                    &mut report,
                    &head_file,
                    0,
                    format!("unreadable head file: {e}"),
                );
                None
            }
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if report.lines > 0 {
                brk(
                    &mut report,
                    &head_file,
                    0,
                    "missing: the end of the log cannot be checked".into(),
                );
            }
            None
        }
        Err(e) => return Err(e),
    };
    if let (Some(h), Some((hash, seq))) = (&head, &prev) {
        let (file, line) = last_place.unwrap_or_else(|| (path.to_path_buf(), 0));
        if Some(h.seq) != *seq {
            let got = seq.map_or_else(|| "an unreadable line".into(), |s| format!("seq {s}"));
            brk(
                &mut report,
                &file,
                line,
                format!(
                    "the log ends at {got} but its head records seq {}: lines were removed \
                     from the end",
                    h.seq
                ),
            );
        } else if &h.hash != hash {
            brk(
                &mut report,
                &file,
                line,
                "the last line does not match the hash in the head file: it was edited".into(),
            );
        }
    } else if head.is_some() && prev.is_none() {
        brk(
            &mut report,
            path,
            0,
            "the log is empty or missing but its head records entries".into(),
        );
    }
    Ok(report)
}

/// Records the first break only.
fn brk(report: &mut AuditReport, file: &Path, line: usize, reason: String) {
    if report.broken.is_none() {
        report.broken = Some(ChainBreak {
            file: file.to_path_buf(),
            line,
            reason,
        });
    }
}

fn tally(report: &mut AuditReport, line: &LogLine) {
    match line.event {
        Event::Start => report.starts += 1,
        Event::Stop => report.stops += 1,
        Event::Rotate => {}
        Event::Failures => {
            for (k, n) in &line.failures {
                let e = report.failures.entry(k.clone()).or_insert(0);
                *e = e.saturating_add(*n);
            }
            if let Some(p) = &line.peer {
                if report.failure_peers.len() < MAX_FAILURE_PEERS {
                    report.failure_peers.insert(p.clone());
                }
            }
        }
        Event::Request => {
            let kind = line.kind.unwrap_or(KeyKind::Unknown).as_str().to_string();
            match line.outcome {
                Some(Outcome::Issued) => {
                    let t = report.issued.entry(kind.clone()).or_default();
                    t.requests += 1;
                    t.keys = t.keys.saturating_add(line.count);
                    let caller = caller_of(line.peer.as_deref().unwrap_or("?"));
                    let c = report
                        .by_caller
                        .entry(caller)
                        .or_default()
                        .entry(kind)
                        .or_insert(0);
                    *c = c.saturating_add(line.count);
                }
                Some(Outcome::Refused) => {
                    let mut reason = line.reason.clone().unwrap_or_default();
                    if report.refusals.len() >= MAX_REASONS
                        && !report.refusals.contains_key(&reason)
                    {
                        reason = "(other)".into();
                    }
                    *report.refusals.entry(reason).or_insert(0) += 1;
                }
                Some(Outcome::Error) | None => report.errors += 1,
            }
        }
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

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cryptonn-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("audit.log")
    }

    fn issued(log: &AuditLog, peer: &str, kind: KeyKind, n: usize) {
        let mut e = AuditEntry::new(peer, kind, Outcome::Issued, n);
        e.keys = (0..n).map(|i| feip_record(kind, &[i as i32, 1])).collect();
        log.record(&e).unwrap();
    }

    /// A log of 10 lines: start, 8 requests, stop.
    fn small_log(name: &str) -> PathBuf {
        let p = tmp(name);
        let log = AuditLog::open(&p).unwrap();
        for i in 0..4 {
            issued(&log, "10.0.0.1:5000", KeyKind::Row, i + 1);
            issued(&log, "10.0.0.2:6000", KeyKind::Col, 2);
        }
        log.close().unwrap();
        p
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(p: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn an_intact_log_is_summarised() {
        let p = small_log("intact");
        let r = verify(&p).unwrap();
        assert!(r.intact(), "{r}");
        assert_eq!(r.lines, 10);
        assert_eq!(r.seq_range, Some((0, 9)));
        assert_eq!((r.starts, r.stops), (1, 1));
        assert_eq!(
            r.issued["row"],
            KindTotals {
                requests: 4,
                keys: 10
            }
        );
        assert_eq!(
            r.issued["col"],
            KindTotals {
                requests: 4,
                keys: 8
            }
        );
        assert_eq!(r.by_caller["10.0.0.1"]["row"], 10);
        assert_eq!(r.by_caller["10.0.0.2"]["col"], 8);
        // Reopening chains on.
        let log = AuditLog::open(&p).unwrap();
        issued(&log, "10.0.0.1:1", KeyKind::Febo, 3);
        drop(log);
        let r = verify(&p).unwrap();
        assert!(r.intact(), "{r}");
        assert_eq!(r.lines, 12);
        assert_eq!(r.starts, 2);
        assert!(r.to_string().contains("chain: intact"));
    }

    #[test]
    fn an_edited_line_is_detected() {
        let p = small_log("edited");
        let mut l = lines(&p);
        l[3] = l[3].replace("\"count\":2", "\"count\":1");
        assert_ne!(l[3], lines(&p)[3]);
        write_lines(&p, &l);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 5, "{b}");
        assert!(b.reason.contains("line 4 was edited"), "{b}");
        // The last line edited: only the head can tell.
        let p = small_log("edited-last");
        let mut l = lines(&p);
        let last = l.len() - 1;
        l[last] = l[last].replace("\"ts\":", "\"ts\":1");
        write_lines(&p, &l);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 10, "{b}");
        assert!(b.reason.contains("head"), "{b}");
    }

    #[test]
    fn a_deleted_line_is_detected() {
        let p = small_log("deleted");
        let mut l = lines(&p);
        l.remove(4);
        write_lines(&p, &l);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 5, "{b}");
        assert!(b.reason.contains("seq jumps from 3 to 5"), "{b}");
        // The first line deleted.
        let p = small_log("deleted-first");
        let l = lines(&p);
        write_lines(&p, &l[1..]);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 1, "{b}");
        assert!(b.reason.contains("earlier lines were removed"), "{b}");
    }

    #[test]
    fn a_truncated_file_is_detected() {
        // Cut inside a line.
        let p = small_log("truncated");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 10, "{b}");
        assert!(b.reason.contains("incomplete"), "{b}");
        // Cut at a line boundary: the head records more.
        let p = small_log("truncated-lines");
        let l = lines(&p);
        write_lines(&p, &l[..7]);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 7, "{b}");
        assert!(b.reason.contains("removed from the end"), "{b}");
        // ... and stays detected once the authority has written on.
        let log = AuditLog::open(&p).unwrap();
        issued(&log, "10.0.0.1:1", KeyKind::Row, 1);
        drop(log);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 8, "{b}");
        assert!(b.reason.contains("did not end at its head"), "{b}");
        // Emptied, also before a restart.
        std::fs::write(&p, b"").unwrap();
        assert!(!verify(&p).unwrap().intact());
        drop(AuditLog::open(&p).unwrap());
        let b = verify(&p).unwrap().broken.unwrap();
        assert!(b.reason.contains("did not end at its head"), "{b}");
        // The last line edited, then a restart.
        let p = small_log("edited-restarted");
        let mut l = lines(&p);
        let last = l.len() - 1;
        l[last] = l[last].replace("\"ts\":", "\"ts\":1");
        write_lines(&p, &l);
        drop(AuditLog::open(&p).unwrap());
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 11, "{b}");
        assert!(b.reason.contains("did not end at its head"), "{b}");
        // A log reopened after a cut inside a line keeps naming that line.
        let p = small_log("truncated-reopened");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let log = AuditLog::open(&p).unwrap();
        issued(&log, "10.0.0.1:1", KeyKind::Row, 1);
        drop(log);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.line, 10, "{b}");
    }

    #[test]
    fn rotation_bounds_the_files_and_keeps_the_chain() {
        let p = tmp("rotate");
        let limits = AuditLimits {
            max_bytes: MIN_MAX_BYTES,
            max_files: 3,
            ..AuditLimits::default()
        };
        let log = AuditLog::open_with(&p, limits).unwrap();
        for i in 0..200 {
            issued(&log, "10.0.0.3:1", KeyKind::Row, 1 + i % 3);
        }
        log.close().unwrap();
        for i in 0..=3 {
            let f = rotated_path(&p, i);
            let len = std::fs::metadata(&f).unwrap().len();
            assert!(len <= MIN_MAX_BYTES, "{} has {len} bytes", f.display());
            if i > 0 {
                assert!(lines(&f)[0].contains("\"event\":\"rotate\""));
            }
        }
        assert!(!rotated_path(&p, 4).exists());
        let r = verify(&p).unwrap();
        assert!(r.intact(), "{r}");
        assert!(r.rotated_away);
        assert_eq!(r.files.len(), 4);
        let (first, last) = r.seq_range.unwrap();
        assert_eq!(last - first + 1, r.lines);
        assert!(first > 0);
        // A rotated file edited or removed.
        let mid = rotated_path(&p, 2);
        let mut l = lines(&mid);
        l[2] = l[2].replace("10.0.0.3", "10.0.0.4");
        write_lines(&mid, &l);
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!((b.file.clone(), b.line), (mid.clone(), 4), "{b}");
        std::fs::remove_file(&mid).unwrap();
        let b = verify(&p).unwrap().broken.unwrap();
        assert_eq!(b.file, mid, "{b}");
        // Reopening does not hide the gap.
        let log = AuditLog::open_with(&p, AuditLimits::default()).unwrap();
        drop(log);
        assert!(!verify(&p).unwrap().intact());
    }

    #[test]
    fn failures_are_summarised_not_logged_one_by_one() {
        let p = tmp("failures");
        let limits = AuditLimits {
            summary_every: 100,
            ..AuditLimits::default()
        };
        let log = AuditLog::open_with(&p, limits).unwrap();
        for i in 0..250 {
            let what = if i % 2 == 0 {
                Failure::Malformed
            } else {
                Failure::Auth
            };
            log.failure("10.9.9.9", what, "malformed frame: \u{e9}\u{e9}");
        }
        log.failure("10.9.9.8", Failure::Timeout, &"x".repeat(1000));
        log.tick();
        assert_eq!(lines(&p).len(), 3, "start and two summaries of 100");
        log.close().unwrap();
        let l = lines(&p);
        assert_eq!(l.len(), 6, "{l:?}");
        assert!(l.iter().all(|s| s.len() < 600));
        let r = verify(&p).unwrap();
        assert!(r.intact(), "{r}");
        assert_eq!(r.failures["malformed"], 125);
        assert_eq!(r.failures["auth"], 125);
        assert_eq!(r.failures["timeout"], 1);
        assert_eq!(r.failure_peers.len(), 2);
    }

    #[test]
    fn bounded_lines() {
        let mut r = std::io::Cursor::new(b"abc\ndefghij\nxy".to_vec());
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 4).unwrap(),
            LineRead::Line(true)
        );
        assert_eq!(buf, b"abc");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 4).unwrap(),
            LineRead::TooLong
        );
        assert_eq!(buf, b"defg");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 4).unwrap(),
            LineRead::Line(false)
        );
        assert_eq!(buf, b"xy");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 4).unwrap(),
            LineRead::Eof
        );
    }
}
