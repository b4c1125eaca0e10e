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
//! | `cert.pem` | the self-signed TLS certificate callers pin (names `localhost`, `127.0.0.1` and any asked for) | 0644 |
//! | `cert.key` | its private key (PKCS#8 PEM) | 0600 |
//!
//! [`load`] reads them back, validates every key, checks that the public parameters match the
//! secret keys, and refuses secret files that group or others may read.
//!
//! # Serving
//!
//! [`spawn`] (or the blocking [`serve`]) answers the [protocol] on an already-bound
//! [`TcpListener`] through the [network layer](crate::net), which authenticates callers by
//! the token before it reads a request, bounds what it holds for unauthenticated callers, caps
//! connections and closes idle ones. Key requests are checked by [`Policy::check`]; a refused
//! request is answered with [`Response::Refused`] and the connection stays open. Keys are
//! derived in parallel, and every request that issues keys is logged (digests, not vectors)
//! before the keys are sent. Failures before authentication (garbage, wrong tokens,
//! timeouts, evictions) are counted per peer address and summarised in the
//! [audit log](audit), which is hash-chained and rotated.
//!
//! The master secret keys never leave this module except into their 0600 files.

pub mod audit;
pub mod budget;
pub mod policy;

pub use audit::{AuditEntry, AuditLimits, AuditLog, Failure, KeyKind, Outcome};
pub use policy::Policy;

use crate::net::{self, Service};
use crate::protocol::{self, BatchId, PublicParams, Request, Response};
use crate::Curve;
use bincode::Options;
use curv::elliptic::curves::Point;
use fe::febo::{FeboMasterSecretKey, Op};
use fe::feip::{FeipMasterSecretKey, FeipParams};
use fe::{Encode, FeCurve};
use nn::data::DatasetInfo;
use rayon::prelude::*;
use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
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
/// Name of the rank budget's journal, beside the audit log.
pub const RANKS_FILE: &str = "ranks.log";

pub use crate::net::{
    generate_token, ServerHandle, DEFAULT_AUTH_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING, MAX_TOKEN_LEN,
};

/// Largest key or parameter file read by [`load`].
const MAX_KEY_FILE: u64 = 64 << 20;

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
    /// The network layer refused its settings or could not serve.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// The TLS certificate or key could not be made or read.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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

    /// The column master key of batch `batch` when keys are bound to batches: a child of the
    /// column key ([`fe::feip::FeipMasterSecretKey::derive_child`]), made anew on each use so
    /// that nothing but the column key is stored.
    fn batch_col(&self, batch: BatchId) -> FeipMasterSecretKey<Curve> {
        let mut label = b"batch ".to_vec();
        label.extend_from_slice(&batch.dataset);
        label.extend_from_slice(&batch.batch.to_le_bytes());
        self.col.derive_child(&label)
    }

    /// Answers a request under `policy`, without authentication or audit (the server adds
    /// both): the parameters, the keys, [`Response::Refused`] with the policy's reason, or
    /// [`Response::Error`] for a request that cannot be served (an invalid commitment).
    pub fn answer(&self, policy: &Policy, request: &Request) -> Response {
        // Placed kernels are placed once, by the check, and derived from there.
        let checked = match request {
            Request::ConvInferenceKeys(req) | Request::ConvRowKeys(req) => {
                policy.check_conv(req).map(Some)
            }
            other => policy.check(other).map(|()| None),
        };
        match checked {
            Ok(placed) => self
                .derive(policy, request, placed)
                .unwrap_or_else(Response::Error),
            Err(reason) => Response::Refused(reason),
        }
    }

    /// Derives what `request` asks for, with no policy check; `placed` are a convolution
    /// request's placed kernels.
    fn derive(
        &self,
        policy: &Policy,
        request: &Request,
        placed: Option<ndarray::Array2<i64>>,
    ) -> Result<Response, String> {
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
            Request::RowKeys(ys) | Request::InferenceKeys(ys) => feip(&self.row, ys),
            Request::ConvInferenceKeys(_) | Request::ConvRowKeys(_) => {
                let placed = placed.ok_or("the placed kernels are missing")?;
                let rows: Vec<Vec<i32>> = placed
                    .rows()
                    .into_iter()
                    .map(|r| r.iter().map(|&v| v as i32).collect())
                    .collect();
                feip(&self.row, &rows)
            }
            Request::ColKeys(ys) | Request::ConvColKeys(ys) => feip(&self.col, ys),
            Request::BoundColKeys { batch, vectors, .. } => feip(&self.batch_col(*batch), vectors),
            Request::BatchColParams {
                dataset,
                first,
                count,
            } => Ok(Response::BatchColParams(
                (*first..first.saturating_add(*count))
                    .into_par_iter()
                    .map(|batch| {
                        let id = BatchId {
                            dataset: *dataset,
                            batch,
                        };
                        self.batch_col(id).public_key().to_bytes()
                    })
                    .collect(),
            )),
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
    /// Names (host names, IP addresses) of the TLS certificate besides `localhost` and
    /// `127.0.0.1`.
    pub names: Vec<String>,
}

/// What [`init`] made.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// The public parameters.
    pub params: PublicParams,
    /// The token callers must present.
    pub token: String,
    /// The SHA-256 fingerprint of the TLS certificate written to [`crate::tls::CERT_FILE`].
    pub cert_fingerprint: String,
}

/// Checks that a token is usable: 1 to [`MAX_TOKEN_LEN`] printable ASCII characters, no spaces.
pub fn validate_token(token: &str) -> Result<(), AuthorityError> {
    net::validate_token(token).map_err(AuthorityError::InvalidToken)
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
        crate::tls::CERT_FILE,
        crate::tls::KEY_FILE,
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
    let mut names = crate::tls::default_names();
    for n in &opts.names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let cert_fingerprint = crate::tls::write_pair(
        &dir.join(crate::tls::CERT_FILE),
        &dir.join(crate::tls::KEY_FILE),
        &names,
    )?;
    Ok(Initialized {
        params: auth.params,
        token,
        cert_fingerprint,
    })
}

fn zeroizing(v: Vec<u8>) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(v)
}

/// Refuses a secret file that group or others may access (Unix only).
fn check_secret_mode(path: &Path) -> Result<(), AuthorityError> {
    match crate::loose_permissions(path).map_err(|e| io_err(path, e))? {
        Some(mode) => Err(AuthorityError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        }),
        None => Ok(()),
    }
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

/// The TLS configuration of the certificate and key in `dir` written by [`init`], refusing
/// a key file that group or others may read.
pub fn load_tls(dir: &Path) -> Result<Arc<rustls::ServerConfig>, AuthorityError> {
    Ok(crate::tls::server_config(
        &dir.join(crate::tls::CERT_FILE),
        &dir.join(crate::tls::KEY_FILE),
    )?)
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

/// How a server runs: the network layer's settings and the authority's own.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The token, transport, limits and timeouts of the [network layer](net::Settings)
    /// (TLS or clear text: clear text by default, as in [`net::Settings::new`]; `authority
    /// serve` uses TLS unless told `--insecure-plaintext`).
    pub net: net::Settings,
    /// The key policy (its lengths are set from the authority's parameters).
    pub policy: Policy,
    /// The audit log file (appended to; created with mode 0600).
    pub audit: PathBuf,
    /// Rotation and failure-summary limits of the audit log.
    pub audit_limits: AuditLimits,
    /// The journal of the rank budget ([`budget`]), used when the policy sets one: by
    /// default [`RANKS_FILE`] beside the audit log (`authority serve` keeps it in the key
    /// directory).
    pub ranks: PathBuf,
}

impl ServerConfig {
    /// The default configuration with the given token and audit file.
    pub fn new(token: impl Into<String>, audit: impl Into<PathBuf>) -> Self {
        let audit: PathBuf = audit.into();
        ServerConfig {
            net: net::Settings::new(token),
            policy: Policy::default(),
            ranks: audit.with_file_name(RANKS_FILE),
            audit,
            audit_limits: AuditLimits::default(),
        }
    }
}

/// The authority as a [`Service`] of the network layer.
struct AuthorityService {
    authority: Authority,
    policy: Policy,
    /// The rank budget of batch-bound column keys, if the policy sets one.
    ranks: Option<budget::RankLedger>,
    audit: AuditLog,
    verbose: bool,
}

impl Service for AuthorityService {
    type Request = Request;
    type Response = Response;
    const ROLE: &'static str = "authority";

    fn respond(&self, peer: &str, request: Request) -> Response {
        let (kind, count) = kind_of(&request);
        let start = Instant::now();
        let response = respond(self, peer, &request);
        if self.verbose && kind != KeyKind::Params {
            let what = match &response {
                Response::Refused(r) => format!("refused: {r}"),
                Response::Error(r) | Response::Busy(r) => format!("error: {r}"),
                _ => "issued".to_string(),
            };
            eprintln!(
                "authority: {peer}: {count} {kind:?} keys {what} in {:.1} ms",
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        response
    }

    fn refused(message: String) -> Response {
        Response::Refused(message)
    }

    fn error(message: String) -> Response {
        Response::Error(message)
    }

    fn busy(message: String) -> Response {
        Response::Busy(message)
    }

    fn failure(&self, peer_ip: &str, what: Failure, reason: &str) {
        self.audit.failure(peer_ip, what, reason);
    }

    fn connection_error(&self, peer: &str, reason: &str) {
        let mut e = AuditEntry::new(peer, KeyKind::Unknown, Outcome::Error, 0);
        e.reason = Some(reason.to_string());
        // Best effort: nothing is issued on this path, so a failed write loses no key record.
        let _ = self.audit.record(&e);
    }

    fn tick(&self) {
        self.audit.tick();
    }

    fn close(&self) {
        if let Err(e) = self.audit.close() {
            if self.verbose {
                eprintln!("authority: cannot write the audit log at shutdown: {e}");
            }
        }
    }
}

/// The service and network settings of `config`, checked.
fn prepare(
    authority: Authority,
    config: ServerConfig,
) -> Result<(AuthorityService, net::Settings), AuthorityError> {
    validate_token(&config.net.token)?;
    let row_len = authority.params.dataset.row_len();
    let col_len = authority.batch_size();
    let policy = config.policy.with_lengths(row_len, col_len);
    policy.validate().map_err(AuthorityError::Policy)?;
    config
        .audit_limits
        .validate()
        .map_err(AuthorityError::InvalidArgument)?;
    config.net.validate()?;
    let audit = AuditLog::open_with(&config.audit, config.audit_limits.clone())
        .map_err(|e| io_err(&config.audit, e))?;
    let ranks = policy
        .batch_rank_budget
        .map(|budget| budget::RankLedger::open(budget, &config.ranks))
        .transpose()
        .map_err(|e| AuthorityError::InvalidArgument(e.to_string()))?;
    Ok((
        AuthorityService {
            authority,
            ranks,
            policy,
            audit,
            verbose: config.net.verbose,
        },
        config.net,
    ))
}

/// Serves on `listener` until `shutdown` is set (checked every 10 ms), then closes the open
/// connections and returns. Fails only at start (bad token, policy or audit file).
pub fn serve(
    listener: TcpListener,
    authority: Authority,
    config: ServerConfig,
    shutdown: Arc<AtomicBool>,
) -> Result<(), AuthorityError> {
    let (service, settings) = prepare(authority, config)?;
    Ok(net::serve(listener, service, settings, shutdown)?)
}

/// Starts serving on `listener` in a background thread (bind `127.0.0.1:0` for an ephemeral
/// port and read it back with [`ServerHandle::local_addr`]).
pub fn spawn(
    listener: TcpListener,
    authority: Authority,
    config: ServerConfig,
) -> Result<ServerHandle, AuthorityError> {
    let (service, settings) = prepare(authority, config)?;
    Ok(net::spawn(listener, service, settings)?)
}

fn kind_of(request: &Request) -> (KeyKind, usize) {
    match request {
        Request::Params => (KeyKind::Params, 0),
        Request::RowKeys(ys) => (KeyKind::Row, ys.len()),
        Request::InferenceKeys(ys) => (KeyKind::Inference, ys.len()),
        Request::ConvInferenceKeys(req) => (
            KeyKind::Inference,
            req.geometry()
                .map_or(0, |g| g.positions().saturating_mul(req.kernels.len())),
        ),
        Request::ConvRowKeys(req) => (
            KeyKind::Row,
            req.geometry()
                .map_or(0, |g| g.positions().saturating_mul(req.kernels.len())),
        ),
        Request::ColKeys(ys) | Request::ConvColKeys(ys) => (KeyKind::Col, ys.len()),
        Request::BoundColKeys { vectors, .. } => (KeyKind::Col, vectors.len()),
        Request::FeboKeys(r) => (KeyKind::Febo, r.len()),
        // Public keys, derived from the secret one but revealing nothing of it: not logged.
        Request::BatchColParams { .. } => (KeyKind::Params, 0),
    }
}

/// Answers an authenticated request for batch-bound column keys under the rank budget: the
/// batch's rank stays locked from the check until the keys are logged, so two requests for
/// one batch cannot both spend its last rank.
fn respond_bound(
    shared: &AuthorityService,
    ledger: &budget::RankLedger,
    peer: &str,
    request: &Request,
    batch: BatchId,
    vectors: &[Vec<i32>],
) -> Response {
    // The shape rules first: a refused request leaves no trace in the ledger.
    if let Err(reason) = shared.policy.check(request) {
        return log_response(shared, peer, request, Response::Refused(reason));
    }
    let lock = ledger.batch(batch);
    let mut rank = net::lock(&lock);
    let admission = ledger.admit(batch, &rank, vectors);
    let batch = batch.batch;
    match admission {
        budget::Admission::Exceeds {
            would_reach,
            before,
        } => {
            let reason = format!(
                "batch {batch}: these {} column keys would raise the rank of the vectors \
                 issued for it from {before} to {would_reach}, past the budget of {} \
                 (batch_rank_budget)",
                vectors.len(),
                ledger.budget()
            );
            log_response(shared, peer, request, Response::Refused(reason))
        }
        budget::Admission::Within(next) => {
            // The rank is journaled before the audit log and the keys: a failure after it
            // over-counts the batch's rank, never under-counts it. The policy was checked
            // above; derive without checking again (up to 65,536 lanes).
            let mut response = shared
                .authority
                .derive(&shared.policy, request, None)
                .unwrap_or_else(Response::Error);
            if matches!(response, Response::FeipSecrets(_)) {
                if let Err(e) = ledger.commit(&mut rank, next) {
                    if shared.verbose {
                        eprintln!("authority: cannot write the rank journal: {e}");
                    }
                    response = Response::Error(
                        "the authority cannot write its rank journal; no keys issued".into(),
                    );
                }
            }
            log_response(shared, peer, request, response)
        }
    }
}

/// Answers an authenticated request: policy, derivation, audit (before anything is sent).
fn respond(shared: &AuthorityService, peer: &str, request: &Request) -> Response {
    if let (Some(ledger), Request::BoundColKeys { batch, vectors, .. }) = (&shared.ranks, request) {
        return respond_bound(shared, ledger, peer, request, *batch, vectors);
    }
    let response = shared.authority.answer(&shared.policy, request);
    log_response(shared, peer, request, response)
}

/// Logs the answer to a key request (before anything is sent) and returns it, or an error
/// in its place if the log cannot be written; parameters are not logged.
fn log_response(
    shared: &AuthorityService,
    peer: &str,
    request: &Request,
    response: Response,
) -> Response {
    let (kind, count) = kind_of(request);
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
            note_batch(&mut e, request);
            e
        }
        _ => {
            let mut e = AuditEntry::new(peer, kind, Outcome::Issued, count);
            note_batch(&mut e, request);
            e.keys = match request {
                Request::RowKeys(ys)
                | Request::ColKeys(ys)
                | Request::InferenceKeys(ys)
                | Request::ConvColKeys(ys)
                | Request::BoundColKeys { vectors: ys, .. } => {
                    ys.par_iter().map(|y| audit::feip_record(kind, y)).collect()
                }
                Request::FeboKeys(reqs) => reqs.par_iter().map(audit::febo_record).collect(),
                // The kernels the authority placed (the placed keys follow from them).
                Request::ConvInferenceKeys(req) | Request::ConvRowKeys(req) => req
                    .kernels
                    .par_iter()
                    .map(|y| audit::feip_record(kind, y))
                    .collect(),
                Request::Params | Request::BatchColParams { .. } => Vec::new(),
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

/// Notes the dataset and batch of a request for batch-bound column keys in its entry.
fn note_batch(entry: &mut AuditEntry, request: &Request) {
    if let Request::BoundColKeys { batch, .. } = request {
        entry.dataset = Some(audit::hex(&batch.dataset));
        entry.batch = Some(batch.batch);
    }
}
