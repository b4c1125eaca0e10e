//! The authority: holds the master secret keys, publishes the public parameters and derives
//! function keys for authenticated callers, under a [`Policy`], with an [audit log](audit).
//!
//! # Key directory
//!
//! [`init`] writes, into a directory it creates with mode 0700 if needed:
//!
//! | file | content | mode |
//! |---|---|---|
//! | `row.msk` | FEIP master secret key for rows (length `n + 1` of the dataset description) | 0600 |
//! | `col.msk` | FEIP master secret key for columns (length = batch size) | 0600 |
//! | `febo.msk` | FEBO master secret key | 0600 |
//! | `params.bin` | the [`PublicParams`] (bincode, as in the [protocol]) | 0644 |
//! | `token` | the callers' bearer token, 64 hex digits and a newline | 0600 |
//!
//! [`load`] reads them back, validates every key, checks that the public parameters match the
//! secret keys, and refuses secret files that group or others may read.
//!
//! # Serving
//!
//! [`spawn`] (or the blocking [`serve`]) answers the [protocol] on an
//! already-bound [`TcpListener`], one thread per connection. Every request starts with a
//! small header (at most [`protocol::MAX_HEADER`] bytes) carrying the token, which is read and
//! compared (in constant time) before the request's length is even read, so an
//! unauthenticated caller makes the authority hold no more than a few KiB. A new connection
//! must send that header within [`ServerConfig::auth_timeout`] (default 5 s); at most
//! [`ServerConfig::max_pending`] connections wait to authenticate, and a newer one closes the
//! oldest waiting one, so idle connections cannot lock callers out. Authenticated connections
//! are capped by [`ServerConfig::max_connections`]; beyond it callers get
//! [`Response::Busy`]. A failed authentication is answered with [`Response::Refused`] and
//! closes the connection. Key requests are checked by [`Policy::check`]; a refused request is
//! answered with [`Response::Refused`] and the connection stays open. A frame longer than
//! its limit, a frame that does not decode or a wrong protocol version is answered with
//! [`Response::Error`] and closes the connection. Idle connections are closed after a
//! timeout. Keys are derived in parallel, and every request that issues keys is logged
//! (digests, not vectors) before the keys are sent. Failures before authentication
//! (garbage, wrong tokens, timeouts, evictions) are counted per peer address and summarised
//! in the [audit log](audit), which is hash-chained and rotated.
//!
//! The master secret keys never leave this module except into their 0600 files.

pub mod audit;
pub mod policy;

pub use audit::{AuditEntry, AuditLimits, AuditLog, Failure, KeyKind, Outcome};
pub use policy::Policy;

use crate::protocol::{self, PublicParams, Request, Response, MAX_FRAME, PROTOCOL_VERSION};
use crate::Curve;
use bincode::Options;
use curv::elliptic::curves::Point;
use fe::febo::{FeboMasterSecretKey, Op};
use fe::feip::{FeipMasterSecretKey, FeipParams};
use fe::{Encode, FeCurve};
use nn::data::DatasetInfo;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, ErrorKind, Read};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

/// File of the row FEIP master secret key.
pub const ROW_MSK_FILE: &str = "row.msk";
/// File of the column FEIP master secret key.
pub const COL_MSK_FILE: &str = "col.msk";
/// File of the FEBO master secret key.
pub const FEBO_MSK_FILE: &str = "febo.msk";
/// File of the public parameters.
pub const PARAMS_FILE: &str = "params.bin";
/// File of the bearer token.
pub const TOKEN_FILE: &str = "token";
/// Default name of the audit log inside the key directory.
pub const AUDIT_FILE: &str = "audit.log";

/// Default idle timeout of a connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on concurrent authenticated connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default deadline for a new connection to send its first request's header with the token.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on connections that have not authenticated yet.
pub const DEFAULT_MAX_PENDING: usize = 64;
/// Longest accepted token, in bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// Largest key or parameter file read by [`load`].
const MAX_KEY_FILE: u64 = 64 << 20;
/// Most threads answering connections over the cap at once.
const MAX_TURNING_AWAY: usize = 16;
/// How often the accept loop looks at the shutdown flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Errors of the authority.
#[derive(Debug, Error)]
pub enum AuthorityError {
    /// Reading or writing a file or socket failed.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The file, directory or address.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `init` found existing keys and was not told to overwrite them.
    #[error(
        "{} already holds authority keys; use --force to overwrite them (every dataset \
         encrypted under the old keys becomes useless)",
        .0.display()
    )]
    AlreadyInitialized(PathBuf),
    /// A secret file may be read by group or others.
    #[error(
        "{} is readable by group or others (mode {mode:04o}); restrict it with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key or parameter file is invalid.
    #[error("{}: {source}", .path.display())]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: fe::FeError,
    },
    /// The key files do not belong together, or do not fit the system's parameters.
    #[error("inconsistent key directory {}: {reason}", .path.display())]
    Inconsistent {
        /// The directory.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// A scheme operation failed.
    #[error(transparent)]
    Fe(#[from] fe::FeError),
    /// A token is empty, too long or contains characters other than printable ASCII.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The key policy is unusable.
    #[error("invalid policy: {0}")]
    Policy(String),
    /// A parameter is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn io_err(path: &Path, source: std::io::Error) -> AuthorityError {
    AuthorityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The master secret keys and public parameters of one authority.
pub struct Authority {
    params: PublicParams,
    row: FeipMasterSecretKey<Curve>,
    col: FeipMasterSecretKey<Curve>,
    febo: FeboMasterSecretKey<Curve>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("batch_size", &self.batch_size())
            .field("master_keys", &"<redacted>")
            .finish()
    }
}

impl Authority {
    /// Generates fresh master keys for data described by `dataset` in batches of
    /// `batch_size` samples, in memory only (see [`init`] to write them to a directory).
    pub fn generate(dataset: DatasetInfo, batch_size: usize) -> Result<Self, AuthorityError> {
        if batch_size == 0 {
            return Err(AuthorityError::InvalidArgument(
                "the batch size must be at least 1".into(),
            ));
        }
        dataset
            .validate()
            .map_err(|e| AuthorityError::InvalidArgument(e.to_string()))?;
        let x = u64::from(dataset.x_bound);
        let (row_pk, row) = fe::feip::setup::<Curve>(FeipParams::new(dataset.row_len(), x)?);
        let (col_pk, col) = fe::feip::setup::<Curve>(FeipParams::new(batch_size, x)?);
        let (febo_pk, febo) = fe::febo::setup::<Curve>();
        Ok(Authority {
            params: PublicParams {
                dataset,
                row: row_pk,
                col: col_pk,
                febo: febo_pk,
            },
            row,
            col,
            febo,
        })
    }

    /// The public parameters.
    pub fn params(&self) -> &PublicParams {
        &self.params
    }

    /// The batch size the column key was made for.
    pub fn batch_size(&self) -> usize {
        self.params.batch_size()
    }

    /// Answers a request under `policy`, without authentication or audit (the server adds
    /// both): the parameters, the keys, [`Response::Refused`] with the policy's reason, or
    /// [`Response::Error`] for a request that cannot be served (an invalid commitment).
    pub fn answer(&self, policy: &Policy, request: &Request) -> Response {
        if let Err(reason) = policy.check(request) {
            return Response::Refused(reason);
        }
        self.derive(policy, request).unwrap_or_else(Response::Error)
    }

    /// Derives what `request` asks for, with no policy check.
    fn derive(&self, policy: &Policy, request: &Request) -> Result<Response, String> {
        let feip = |msk: &FeipMasterSecretKey<Curve>, ys: &[Vec<i32>]| {
            let ys: Vec<Vec<i64>> = ys
                .par_iter()
                .map(|y| y.iter().map(|&v| i64::from(v)).collect())
                .collect();
            msk.derive_keys(&ys)
                .map(|keys| {
                    Response::FeipSecrets(
                        keys.iter()
                            .map(|k| k.secret().to_bytes().to_vec())
                            .collect(),
                    )
                })
                .map_err(|e| e.to_string())
        };
        match request {
            Request::Params => Ok(Response::Params(Box::new(protocol::Published {
                params: self.params.clone(),
                policy: policy.clone(),
            }))),
            Request::RowKeys(ys) => feip(&self.row, ys),
            Request::ColKeys(ys) => feip(&self.col, ys),
            Request::FeboKeys(reqs) => {
                let parsed = reqs
                    .par_iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let bad = |what: &str| format!("basic-operation key {i}: {what}");
                        if r.commitment.len() != <Curve as FeCurve>::POINT_LEN {
                            return Err(bad("commitment has the wrong length"));
                        }
                        let p = Point::<Curve>::from_bytes(&r.commitment)
                            .map_err(|_| bad("commitment is not a valid group element"))?;
                        if p.is_zero() {
                            return Err(bad("commitment is the identity"));
                        }
                        Ok((p, r.op, r.operand))
                    })
                    .collect::<Result<Vec<(Point<Curve>, Op, i64)>, String>>()?;
                self.febo
                    .derive_keys(&parsed)
                    .map(Response::FeboKeys)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Options of [`init`].
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// The callers' token; a random one (32 bytes, hex) when `None`.
    pub token: Option<String>,
    /// Overwrite existing keys.
    pub force: bool,
}

/// What [`init`] made.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// The public parameters.
    pub params: PublicParams,
    /// The token callers must present.
    pub token: String,
}

/// Checks that a token is usable: 1 to [`MAX_TOKEN_LEN`] printable ASCII characters, no spaces.
pub fn validate_token(token: &str) -> Result<(), AuthorityError> {
    if token.is_empty() {
        return Err(AuthorityError::InvalidToken("the token is empty".into()));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthorityError::InvalidToken(format!(
            "the token is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthorityError::InvalidToken(
            "the token must be printable ASCII without spaces".into(),
        ));
    }
    Ok(())
}

/// A fresh random token: 32 bytes from the operating system, in hex.
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    audit::hex(&b)
}

/// The bincode options of the parameters file (those of the protocol's frames).
fn params_codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_KEY_FILE)
}

/// Generates master keys for batches of `batch_size` samples and writes them, the public
/// parameters and a token into `dir` (see the [module documentation](self)).
///
/// Refuses if `dir` already holds any of the files, unless `opts.force`.
pub fn init(
    dir: &Path,
    dataset: DatasetInfo,
    batch_size: usize,
    opts: &InitOptions,
) -> Result<Initialized, AuthorityError> {
    let token = match &opts.token {
        Some(t) => {
            validate_token(t)?;
            t.clone()
        }
        None => generate_token(),
    };
    let files = [
        ROW_MSK_FILE,
        COL_MSK_FILE,
        FEBO_MSK_FILE,
        PARAMS_FILE,
        TOKEN_FILE,
    ];
    if !opts.force && files.iter().any(|f| dir.join(f).exists()) {
        return Err(AuthorityError::AlreadyInitialized(dir.to_path_buf()));
    }
    if !dir.is_dir() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(dir).map_err(|e| io_err(dir, e))?;
    }
    let auth = Authority::generate(dataset, batch_size)?;
    let write = |name: &str, bytes: &[u8], secret: bool| {
        let path = dir.join(name);
        fe::serial::write_atomic(&path, bytes, secret)
            .map_err(|source| AuthorityError::BadKeyFile { path, source })
    };
    write(ROW_MSK_FILE, &zeroizing(auth.row.to_bytes()), true)?;
    write(COL_MSK_FILE, &zeroizing(auth.col.to_bytes()), true)?;
    write(FEBO_MSK_FILE, &zeroizing(auth.febo.to_bytes()), true)?;
    let params = params_codec().serialize(&auth.params).map_err(|e| {
        AuthorityError::InvalidArgument(format!("cannot encode the public parameters: {e}"))
    })?;
    write(PARAMS_FILE, &params, false)?;
    write(TOKEN_FILE, format!("{token}\n").as_bytes(), true)?;
    Ok(Initialized {
        params: auth.params,
        token,
    })
}

fn zeroizing(v: Vec<u8>) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(v)
}

/// Refuses a secret file that group or others may access (Unix only).
fn check_secret_mode(path: &Path) -> Result<(), AuthorityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthorityError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Reads a whole file of at most [`MAX_KEY_FILE`] bytes.
fn read_small(path: &Path) -> Result<Vec<u8>, AuthorityError> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut out)
        .map_err(|e| io_err(path, e))?;
    if out.len() as u64 > MAX_KEY_FILE {
        return Err(io_err(
            path,
            std::io::Error::new(ErrorKind::InvalidData, "file too large"),
        ));
    }
    Ok(out)
}

fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, AuthorityError> {
    check_secret_mode(path)?;
    Ok(zeroizing(read_small(path)?))
}

/// Reads the public parameters file written by [`init`] (in `dir`, or any copy of it).
pub fn read_params(path: &Path) -> Result<PublicParams, AuthorityError> {
    let bytes = read_small(path)?;
    params_codec()
        .deserialize(&bytes)
        .map_err(|e| AuthorityError::BadKeyFile {
            path: path.to_path_buf(),
            source: fe::FeError::Malformed(e.to_string()),
        })
}

/// Reads the token file of `dir`, refusing it if group or others may read it.
pub fn read_token(dir: &Path) -> Result<String, AuthorityError> {
    let path = dir.join(TOKEN_FILE);
    let bytes = read_secret(&path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| AuthorityError::InvalidToken(format!("{} is not UTF-8", path.display())))?;
    let token = text.trim_end_matches(['\n', '\r']).to_string();
    validate_token(&token)?;
    Ok(token)
}

/// Loads and validates the keys in `dir` written by [`init`].
///
/// Fails if a secret file may be read by group or others, if any file is malformed, if the
/// keys do not fit the system's parameters, or if the public parameters are not those of the
/// secret keys.
pub fn load(dir: &Path) -> Result<Authority, AuthorityError> {
    let decode_secret = |name: &str| -> Result<(PathBuf, Zeroizing<Vec<u8>>), AuthorityError> {
        let path = dir.join(name);
        let bytes = read_secret(&path)?;
        Ok((path, bytes))
    };
    let bad =
        |path: PathBuf| move |source: fe::FeError| AuthorityError::BadKeyFile { path, source };
    let (p, b) = decode_secret(ROW_MSK_FILE)?;
    let row = FeipMasterSecretKey::<Curve>::from_bytes(&b).map_err(bad(p))?;
    let (p, b) = decode_secret(COL_MSK_FILE)?;
    let col = FeipMasterSecretKey::<Curve>::from_bytes(&b).map_err(bad(p))?;
    let (p, b) = decode_secret(FEBO_MSK_FILE)?;
    let febo = FeboMasterSecretKey::<Curve>::from_bytes(&b).map_err(bad(p))?;
    let params = read_params(&dir.join(PARAMS_FILE))?;
    let inconsistent = |reason: String| AuthorityError::Inconsistent {
        path: dir.to_path_buf(),
        reason,
    };
    params.validate().map_err(&inconsistent)?;
    if row.params() != params.row.params() || col.params() != params.col.params() {
        return Err(inconsistent(format!(
            "the master keys are for {:?} and {:?}, the public parameters for {:?} and {:?}",
            row.params(),
            col.params(),
            params.row.params(),
            params.col.params()
        )));
    }
    let (row_pk, col_pk) = rayon::join(|| row.public_key(), || col.public_key());
    if params.row != row_pk || params.col != col_pk || params.febo != febo.public_key() {
        return Err(inconsistent(format!(
            "{PARAMS_FILE} does not hold the public keys of the master secret keys"
        )));
    }
    Ok(Authority {
        params,
        row,
        col,
        febo,
    })
}

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The token every request must carry.
    pub token: String,
    /// The key policy (its lengths are set from the authority's parameters).
    pub policy: Policy,
    /// The audit log file (appended to; created with mode 0600).
    pub audit: PathBuf,
    /// Rotation and failure-summary limits of the audit log.
    pub audit_limits: AuditLimits,
    /// Largest accepted request frame, in bytes (default and at most [`MAX_FRAME`]).
    pub frame_limit: usize,
    /// A connection that sends nothing for this long is closed (default 60 s).
    pub idle_timeout: Duration,
    /// A new connection must send the header of its first request, with the right token,
    /// within this time (default [`DEFAULT_AUTH_TIMEOUT`]) or is closed.
    pub auth_timeout: Duration,
    /// Most authenticated connections served at once (default 64); more are answered with
    /// [`Response::Busy`].
    pub max_connections: usize,
    /// Most connections waiting to authenticate (default [`DEFAULT_MAX_PENDING`]); a new
    /// connection beyond it closes the oldest waiting one.
    pub max_pending: usize,
    /// Print one line per request on stderr.
    pub verbose: bool,
}

impl ServerConfig {
    /// The default configuration with the given token and audit file.
    pub fn new(token: impl Into<String>, audit: impl Into<PathBuf>) -> Self {
        ServerConfig {
            token: token.into(),
            policy: Policy::default(),
            audit: audit.into(),
            audit_limits: AuditLimits::default(),
            frame_limit: MAX_FRAME,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
            verbose: false,
        }
    }
}

/// The expected token, kept as its SHA-256 so comparisons take the same time whatever the
/// presented token's length and content.
struct TokenCheck([u8; 32]);

impl TokenCheck {
    fn new(token: &str) -> Self {
        TokenCheck(Sha256::digest(token.as_bytes()).into())
    }

    fn matches(&self, presented: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let eq: bool = h.ct_eq(&self.0).into();
        eq && !presented.is_empty()
    }
}

/// State shared by the accept loop and the connection threads.
struct Shared {
    authority: Authority,
    token: TokenCheck,
    policy: Policy,
    audit: AuditLog,
    frame_limit: usize,
    idle_timeout: Duration,
    auth_timeout: Duration,
    max_connections: usize,
    max_pending: usize,
    verbose: bool,
    shutdown: Arc<AtomicBool>,
    /// Authenticated connections.
    active: AtomicUsize,
    /// Connections that have not authenticated yet, oldest first (id and peer address).
    pending: Mutex<VecDeque<(u64, IpAddr)>>,
    /// Threads answering connections over the cap.
    turning_away: AtomicUsize,
    next_id: AtomicU64,
    /// Open connections, to close them at shutdown.
    live: Mutex<HashMap<u64, TcpStream>>,
}

/// A running server (see [`spawn`]). Dropping it shuts the server down.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), AuthorityError>>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes open connections and waits for the accept loop to end.
    pub fn shutdown(mut self) -> Result<(), AuthorityError> {
        self.stop()
    }

    /// Waits for the server to stop (it runs until [`ServerHandle::shutdown`] is called from
    /// elsewhere, so in practice: forever).
    pub fn wait(mut self) -> Result<(), AuthorityError> {
        match self.thread.take() {
            Some(t) => join(t),
            None => Ok(()),
        }
    }

    fn stop(&mut self) -> Result<(), AuthorityError> {
        self.shutdown.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => join(t),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn join(t: JoinHandle<Result<(), AuthorityError>>) -> Result<(), AuthorityError> {
    t.join().unwrap_or_else(|_| {
        Err(AuthorityError::InvalidArgument(
            "the server thread panicked".into(),
        ))
    })
}

fn prepare(
    listener: &TcpListener,
    authority: Authority,
    config: ServerConfig,
    shutdown: Arc<AtomicBool>,
) -> Result<Arc<Shared>, AuthorityError> {
    validate_token(&config.token)?;
    let row_len = authority.params.dataset.row_len();
    let col_len = authority.batch_size();
    let policy = config.policy.with_lengths(row_len, col_len);
    policy.validate().map_err(AuthorityError::Policy)?;
    if config.max_connections == 0 {
        return Err(AuthorityError::InvalidArgument(
            "max_connections must be at least 1".into(),
        ));
    }
    if config.idle_timeout.is_zero() || config.auth_timeout.is_zero() {
        return Err(AuthorityError::InvalidArgument(
            "the idle and authentication timeouts must be positive".into(),
        ));
    }
    if config.max_pending == 0 {
        return Err(AuthorityError::InvalidArgument(
            "max_pending must be at least 1".into(),
        ));
    }
    config
        .audit_limits
        .validate()
        .map_err(AuthorityError::InvalidArgument)?;
    let audit = AuditLog::open_with(&config.audit, config.audit_limits.clone())
        .map_err(|e| io_err(&config.audit, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| io_err(Path::new("listener"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(Path::new(&addr.to_string()), e))?;
    Ok(Arc::new(Shared {
        authority,
        token: TokenCheck::new(&config.token),
        policy,
        audit,
        frame_limit: config.frame_limit.clamp(1, MAX_FRAME),
        idle_timeout: config.idle_timeout,
        auth_timeout: config.auth_timeout,
        max_connections: config.max_connections,
        max_pending: config.max_pending,
        verbose: config.verbose,
        shutdown,
        active: AtomicUsize::new(0),
        pending: Mutex::new(VecDeque::new()),
        turning_away: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        live: Mutex::new(HashMap::new()),
    }))
}

/// Serves on `listener` until `shutdown` is set (checked every 10 ms), then closes the open
/// connections and returns. Fails only at start (bad token, policy or audit file).
pub fn serve(
    listener: TcpListener,
    authority: Authority,
    config: ServerConfig,
    shutdown: Arc<AtomicBool>,
) -> Result<(), AuthorityError> {
    let shared = prepare(&listener, authority, config, shutdown)?;
    accept_loop(&listener, &shared);
    Ok(())
}

/// Starts serving on `listener` in a background thread (bind `127.0.0.1:0` for an ephemeral
/// port and read it back with [`ServerHandle::local_addr`]).
pub fn spawn(
    listener: TcpListener,
    authority: Authority,
    config: ServerConfig,
) -> Result<ServerHandle, AuthorityError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let shared = prepare(&listener, authority, config, shutdown.clone())?;
    let addr = listener
        .local_addr()
        .map_err(|e| io_err(Path::new("listener"), e))?;
    let thread = std::thread::Builder::new()
        .name("authority-accept".into())
        .spawn(move || {
            accept_loop(&listener, &shared);
            Ok(())
        })
        .map_err(|e| io_err(Path::new(&addr.to_string()), e))?;
    Ok(ServerHandle {
        addr,
        shutdown,
        thread: Some(thread),
    })
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        shared.audit.tick();
        match listener.accept() {
            Ok((stream, peer)) => admit(shared, stream, peer),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of file descriptors and the like: wait and retry rather than die.
                if shared.verbose {
                    eprintln!("authority: accept failed: {e}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let live = std::mem::take(&mut *shared.live.lock().unwrap_or_else(|e| e.into_inner()));
    for s in live.values() {
        let _ = s.shutdown(Shutdown::Both);
    }
    if let Err(e) = shared.audit.close() {
        if shared.verbose {
            eprintln!("authority: cannot write the audit log at shutdown: {e}");
        }
    }
}

/// Keeps a connection's books (open connections, unauthenticated queue, authenticated count)
/// and undoes them when its thread ends, however it ends.
struct ConnectionGuard {
    shared: Arc<Shared>,
    id: u64,
    authenticated: std::cell::Cell<bool>,
}

/// What [`ConnectionGuard::promote`] found.
enum Promotion {
    /// The connection now holds an authenticated slot.
    Admitted,
    /// Every authenticated slot is taken.
    Busy,
    /// The connection was evicted from the unauthenticated queue meanwhile.
    Evicted,
}

impl ConnectionGuard {
    /// Moves the connection from the unauthenticated queue to an authenticated slot.
    fn promote(&self) -> Promotion {
        {
            let mut pending = lock(&self.shared.pending);
            let Some(i) = pending.iter().position(|p| p.0 == self.id) else {
                return Promotion::Evicted;
            };
            pending.remove(i);
        }
        if self.shared.active.fetch_add(1, Ordering::SeqCst) >= self.shared.max_connections {
            self.shared.active.fetch_sub(1, Ordering::SeqCst);
            return Promotion::Busy;
        }
        self.authenticated.set(true);
        Promotion::Admitted
    }

    /// Whether the connection left the unauthenticated queue without authenticating (the
    /// eviction was counted by whoever evicted it).
    fn evicted(&self) -> bool {
        !self.authenticated.get() && !lock(&self.shared.pending).iter().any(|p| p.0 == self.id)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.live).remove(&self.id);
        lock(&self.shared.pending).retain(|p| p.0 != self.id);
        if self.authenticated.get() {
            self.shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Locks a mutex, ignoring poisoning (the books stay consistent: every update is one call).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let setup = || -> std::io::Result<TcpStream> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(shared.idle_timeout.min(shared.auth_timeout)))?;
        stream.set_write_timeout(Some(shared.idle_timeout))?;
        stream.try_clone()
    };
    let Ok(control) = setup() else {
        return;
    };
    if shared.active.load(Ordering::SeqCst) >= shared.max_connections {
        if shared.verbose {
            eprintln!("authority: {peer}: refused, too many connections");
        }
        shared.audit.failure(
            &peer.ip().to_string(),
            Failure::Busy,
            "too many connections",
        );
        turn_away(shared, stream);
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let evicted = {
        let mut pending = lock(&shared.pending);
        let old = if pending.len() >= shared.max_pending {
            pending.pop_front()
        } else {
            None
        };
        pending.push_back((id, peer.ip()));
        old
    };
    let mut live = lock(&shared.live);
    if let Some((old, ip)) = evicted {
        // The oldest connection that has not authenticated makes room: idle connections
        // cannot hold every slot, and a caller that sends its token at once is never the
        // oldest for long.
        if let Some(s) = live.get(&old) {
            let _ = s.shutdown(Shutdown::Both);
        }
        shared.audit.failure(
            &ip.to_string(),
            Failure::Evicted,
            "closed to make room for a newer connection before authenticating",
        );
    }
    live.insert(id, control);
    drop(live);
    let guard = ConnectionGuard {
        shared: shared.clone(),
        id,
        authenticated: std::cell::Cell::new(false),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("authority-conn-{id}"))
        .spawn(move || {
            let g = guard;
            connection(&g, stream, peer);
        });
    // If the thread could not start, the closure (and the guard in it) is dropped here,
    // which undoes the bookkeeping and closes the stream.
    if let Err(e) = spawned {
        if shared.verbose {
            eprintln!("authority: {peer}: cannot start a thread: {e}");
        }
    }
}

/// Answers a connection over the cap with [`Response::Busy`], from a short-lived thread (at
/// most [`MAX_TURNING_AWAY`] at once; beyond that the connection is just closed). The thread
/// half-closes and drains what the caller sends for a moment, so the caller reads the answer
/// rather than a reset.
fn turn_away(shared: &Arc<Shared>, stream: TcpStream) {
    if shared.turning_away.fetch_add(1, Ordering::SeqCst) >= MAX_TURNING_AWAY {
        shared.turning_away.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let sh = shared.clone();
    let work = move || {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let mut w = BufWriter::new(&stream);
        let _ = protocol::write_frame(&mut w, &Response::Busy(BUSY.into()));
        drop(w);
        let _ = stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut buf = [0u8; 4096];
        let mut r = &stream;
        while Instant::now() < deadline {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        sh.turning_away.fetch_sub(1, Ordering::SeqCst);
    };
    if std::thread::Builder::new()
        .name("authority-busy".into())
        .spawn(work)
        .is_err()
    {
        shared.turning_away.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The message of [`Response::Busy`].
const BUSY: &str = "too many connections; try again later";

fn kind_of(request: &Request) -> (KeyKind, usize) {
    match request {
        Request::Params => (KeyKind::Params, 0),
        Request::RowKeys(ys) => (KeyKind::Row, ys.len()),
        Request::ColKeys(ys) => (KeyKind::Col, ys.len()),
        Request::FeboKeys(r) => (KeyKind::Febo, r.len()),
    }
}

/// A socket reader that fails with [`ErrorKind::TimedOut`] once a deadline has passed (the
/// deadline to authenticate), and otherwise waits at most the idle timeout for each read.
struct DeadlineReader {
    stream: TcpStream,
    deadline: Option<Instant>,
    idle: Duration,
    /// The socket's read timeout as last set.
    current: Option<Duration>,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timeout = match self.deadline {
            None => self.idle,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(
                        ErrorKind::TimedOut,
                        "the deadline to authenticate has passed",
                    ));
                }
                left.min(self.idle)
            }
        };
        if self.current != Some(timeout) {
            self.stream.set_read_timeout(Some(timeout))?;
            self.current = Some(timeout);
        }
        self.stream.read(buf)
    }
}

fn is_timeout(e: &protocol::ProtocolError) -> bool {
    matches!(e, protocol::ProtocolError::Io(e)
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

/// Bytes buffered by a connection's reader.
const READ_BUFFER: usize = 8 << 10;

fn connection(guard: &ConnectionGuard, stream: TcpStream, peer: SocketAddr) {
    let shared: &Shared = &guard.shared;
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(
        READ_BUFFER,
        DeadlineReader {
            stream: read_half,
            deadline: Some(Instant::now() + shared.auth_timeout),
            idle: shared.idle_timeout,
            current: None,
        },
    );
    let mut writer = BufWriter::new(stream);
    let peer_s = peer.to_string();
    let peer_ip = peer.ip().to_string();
    // Before authentication, failures are counted and summarised (the network may send any
    // amount of garbage); after it, each is a line of its own.
    let log_error = |what: Failure, outcome: Outcome, reason: &str| {
        if guard.authenticated.get() {
            let mut e = AuditEntry::new(&peer_s, KeyKind::Unknown, outcome, 0);
            e.reason = Some(reason.to_string());
            // Best effort: nothing is issued on this path, so a failed write loses no key record.
            let _ = shared.audit.record(&e);
        } else {
            shared.audit.failure(&peer_ip, what, reason);
        }
        if shared.verbose {
            eprintln!("authority: {peer_s}: {outcome:?}: {reason}");
        }
    };
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // The header: at most MAX_HEADER bytes, checked before anything else is read.
        let header = match protocol::read_request_header(&mut reader) {
            Ok(h) => h,
            Err(e) if is_timeout(&e) => {
                if guard.authenticated.get() {
                    if shared.verbose {
                        eprintln!("authority: {peer_s}: idle, closing the connection");
                    }
                } else if !guard.evicted() && !shared.shutdown.load(Ordering::SeqCst) {
                    let msg = format!(
                        "no authenticated request within {:.1} s; closing the connection",
                        shared.auth_timeout.as_secs_f64()
                    );
                    log_error(Failure::Timeout, Outcome::Error, &msg);
                    let _ = protocol::write_frame(&mut writer, &Response::Error(msg));
                }
                return;
            }
            Err(protocol::ProtocolError::Io(_)) => {
                // The caller closed the connection (or it broke): nothing to answer.
                if !guard.authenticated.get()
                    && !guard.evicted()
                    && !shared.shutdown.load(Ordering::SeqCst)
                {
                    shared
                        .audit
                        .failure(&peer_ip, Failure::Closed, "closed before authenticating");
                }
                return;
            }
            Err(e) => {
                let (what, msg) = match e {
                    protocol::ProtocolError::FrameTooLarge(n) => (
                        Failure::Oversized,
                        format!(
                            "request header of {n} bytes exceeds the limit of {} bytes \
                             (protocol version {PROTOCOL_VERSION} sends a small header first)",
                            protocol::MAX_HEADER
                        ),
                    ),
                    protocol::ProtocolError::Version(v) => (
                        Failure::Version,
                        format!(
                            "protocol version {v} is not supported (this authority speaks \
                             version {PROTOCOL_VERSION})"
                        ),
                    ),
                    other => (Failure::Malformed, other.to_string()),
                };
                log_error(what, Outcome::Error, &msg);
                let _ = protocol::write_frame(&mut writer, &Response::Error(msg));
                return;
            }
        };
        if !shared.token.matches(&header.token) {
            let msg = "authentication failed";
            // A wrong token is a failure before authentication even on a connection that
            // authenticated before: it proves nothing about the sender.
            shared.audit.failure(&peer_ip, Failure::Auth, msg);
            if shared.verbose {
                eprintln!("authority: {peer_s}: refused: {msg}");
            }
            let _ = protocol::write_frame(&mut writer, &Response::Refused(msg.into()));
            return;
        }
        drop(header);
        if !guard.authenticated.get() {
            match guard.promote() {
                Promotion::Admitted => reader.get_mut().deadline = None,
                Promotion::Busy => {
                    if shared.verbose {
                        eprintln!("authority: {peer_s}: refused, too many connections");
                    }
                    let _ = protocol::write_frame(&mut writer, &Response::Busy(BUSY.into()));
                    return;
                }
                Promotion::Evicted => return,
            }
        }
        // Authenticated: the request itself, up to the frame limit.
        let body = match protocol::read_frame_bytes(&mut reader, shared.frame_limit) {
            Ok(b) => b,
            Err(protocol::ProtocolError::FrameTooLarge(n)) => {
                let msg = format!(
                    "frame of {n} bytes exceeds the limit of {} bytes",
                    shared.frame_limit
                );
                log_error(Failure::Oversized, Outcome::Error, &msg);
                let _ = protocol::write_frame(&mut writer, &Response::Error(msg));
                return;
            }
            Err(e) if is_timeout(&e) => {
                if shared.verbose {
                    eprintln!("authority: {peer_s}: stalled inside a request, closing");
                }
                return;
            }
            Err(_) => return,
        };
        let request: Request = match protocol::decode(&body) {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                log_error(Failure::Malformed, Outcome::Error, &msg);
                let _ = protocol::write_frame(&mut writer, &Response::Error(msg));
                return;
            }
        };
        drop(body);
        let (kind, count) = kind_of(&request);
        let start = Instant::now();
        let response = respond(shared, &peer_s, &request);
        if shared.verbose && kind != KeyKind::Params {
            let what = match &response {
                Response::Refused(r) => format!("refused: {r}"),
                Response::Error(r) | Response::Busy(r) => format!("error: {r}"),
                _ => "issued".to_string(),
            };
            eprintln!(
                "authority: {peer_s}: {count} {kind:?} keys {what} in {:.1} ms",
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        match protocol::write_frame(&mut writer, &response) {
            Ok(()) => {}
            Err(protocol::ProtocolError::FrameTooLarge(n)) => {
                let msg = format!(
                    "the answer ({n} bytes) exceeds the frame limit; ask for fewer keys at once"
                );
                if protocol::write_frame(&mut writer, &Response::Error(msg)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Answers an authenticated request: policy, derivation, audit (before anything is sent).
fn respond(shared: &Shared, peer: &str, request: &Request) -> Response {
    let (kind, count) = kind_of(request);
    let response = shared.authority.answer(&shared.policy, request);
    if kind == KeyKind::Params {
        return response;
    }
    let mut entry = match &response {
        Response::Refused(reason) | Response::Error(reason) => {
            let outcome = if matches!(response, Response::Refused(_)) {
                Outcome::Refused
            } else {
                Outcome::Error
            };
            let mut e = AuditEntry::new(peer, kind, outcome, count);
            e.reason = Some(reason.clone());
            e
        }
        _ => {
            let mut e = AuditEntry::new(peer, kind, Outcome::Issued, count);
            e.keys = match request {
                Request::RowKeys(ys) | Request::ColKeys(ys) => {
                    ys.par_iter().map(|y| audit::feip_record(kind, y)).collect()
                }
                Request::FeboKeys(reqs) => reqs.par_iter().map(audit::febo_record).collect(),
                Request::Params => Vec::new(),
            };
            e
        }
    };
    match shared.audit.record(&entry) {
        Ok(()) => response,
        Err(e) => {
            entry.keys.clear();
            if shared.verbose {
                eprintln!("authority: cannot write the audit log: {e}");
            }
            if matches!(entry.outcome, Outcome::Issued) {
                Response::Error("the authority cannot write its audit log; no keys issued".into())
            } else {
                response
            }
        }
    }
}
