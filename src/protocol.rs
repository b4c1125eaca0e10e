//! The wire protocol between the trainer (or client) and the authority.
//!
//! One TCP connection carries a sequence of requests and responses. A *frame* is a 4-byte
//! big-endian length followed by that many bytes of a `bincode` (fixed-width integers,
//! little-endian) encoding. A request is two frames: a small header, a [`RequestHeader`]
//! (the protocol version, then the caller's bearer token) of at most [`MAX_HEADER`] bytes,
//! then the [`Request`] itself. The authority reads and checks the header before it reads
//! the request's length, so nothing larger than [`MAX_HEADER`] is read from a caller that
//! has not shown the token. A response is one frame holding a [`Response`]. Frames longer
//! than their limit ([`MAX_HEADER`], [`MAX_FRAME`] or the authority's smaller limit) are
//! refused before any allocation. The authority answers every request with exactly one
//! response, closes connections that do not authenticate within a few seconds or stay idle,
//! and answers [`Response::Busy`] when all its connection slots are taken (or the caller's
//! address exceeds its share of connections or requests, or too many request bytes are in
//! flight).
//!
//! Keys travel compactly: for inner-product keys the authority returns only the 32-byte
//! secret `sk_y`, since the caller already has `y`.

use crate::authority::Policy;
use crate::Curve;
use bincode::Options;
use fe::febo::{FeboFunctionKey, FeboPublicKey, Op};
use fe::feip::{FeipFunctionKey, FeipPublicKey};
use fe::Encode;
use nn::data::DatasetInfo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Version of the protocol; both ends must agree. Version 2 put the token in a header of its
/// own, read before the request, and publishes the dataset description and the key policy
/// with the parameters; version 3 added batch-bound column keys.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame accepted by either end (64 MiB).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest request header (version and token), in bytes.
pub const MAX_HEADER: usize = 4096;

/// The authority's public parameters: everything a client needs to encrypt and a trainer to
/// ask for keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicParams {
    /// The description of the data these parameters are for: the row key has length
    /// `features + 1`, every key bounds values by `x_bound`, labels have `classes` entries.
    pub dataset: DatasetInfo,
    /// FEIP key for the rows (one sample: its features and the bias, length `n + 1`).
    pub row: FeipPublicKey<Curve>,
    /// FEIP key for the columns (one pixel position over a batch: length = batch size).
    pub col: FeipPublicKey<Curve>,
    /// FEBO key for the labels.
    pub febo: FeboPublicKey<Curve>,
}

impl PublicParams {
    /// The batch size the column key was made for.
    pub fn batch_size(&self) -> usize {
        self.col.params().n
    }

    /// Checks that the keys fit the dataset description: row length `n + 1`, bound `X`.
    pub fn validate(&self) -> Result<(), String> {
        self.dataset.validate().map_err(|e| e.to_string())?;
        let (row, col) = (self.row.params(), self.col.params());
        if row.n != self.dataset.row_len() {
            return Err(format!(
                "the row key has length {}, the dataset description needs {} ({} features and the bias)",
                row.n,
                self.dataset.row_len(),
                self.dataset.features
            ));
        }
        let x = u64::from(self.dataset.x_bound);
        if row.x_bound != x || col.x_bound != x {
            return Err(format!(
                "the keys bound values by {} and {}, the dataset description by {x}",
                row.x_bound, col.x_bound
            ));
        }
        Ok(())
    }

    /// SHA-256 over the dataset description and the encodings of the three public keys:
    /// names this set of parameters in encrypted-dataset headers, so data and keys from
    /// different authorities never mix.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(codec().serialize(&self.dataset).unwrap_or_default());
        h.update(self.row.to_bytes());
        h.update(self.col.to_bytes());
        h.update(self.febo.to_bytes());
        h.finalize().into()
    }
}

/// What the authority publishes: its public parameters and the key policy it applies, so
/// that a trainer filters its requests by the same rules without a flag to keep in step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// The public parameters.
    pub params: PublicParams,
    /// The key policy in force (lengths set from the parameters).
    pub policy: Policy,
}

/// One request for a basic-operation key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeboKeyRequest {
    /// The compressed commitment of the ciphertext the key is for.
    pub commitment: Vec<u8>,
    /// The operation.
    pub op: Op,
    /// The operand.
    pub operand: i64,
}

/// A prediction service's request for the keys of a convolutional first layer: its kernels
/// and where they land, so that the authority places them itself and checks every placed key
/// (see the authority's policy). The keys come back in the order of the placed rows of
/// [`nn::infer`]: row `pos * kernels + o`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvKeyRequest {
    /// Input channels, height and width of the images (`C*H*W + 1` must be the row length).
    pub input: [u32; 3],
    /// Kernel side, stride and padding.
    pub window: [u32; 3],
    /// The quantized kernels, `C*r*r` weights in patch order followed by the bias weight.
    pub kernels: Vec<Vec<i32>>,
}

/// A key vector as sent: every entry must fit 32 bits.
fn wire_vector(y: &[i64]) -> Result<Vec<i32>, ProtocolError> {
    y.iter()
        .map(|&v| {
            i32::try_from(v).map_err(|_| {
                ProtocolError::Unexpected(format!("key entry {v} does not fit in 32 bits"))
            })
        })
        .collect()
}

impl ConvKeyRequest {
    /// The request for `kernels` (`O` rows of `K + 1`) in `geometry`.
    pub fn new(
        geometry: &nn::layers::Geometry,
        kernels: ndarray::ArrayView2<'_, i64>,
    ) -> Result<Self, ProtocolError> {
        let small = |v: usize| {
            u32::try_from(v)
                .map_err(|_| ProtocolError::Unexpected(format!("{v} does not fit 32 bits")))
        };
        let (input, w) = (geometry.input(), geometry.window());
        Ok(ConvKeyRequest {
            input: [
                small(input.channels())?,
                small(input.height())?,
                small(input.width())?,
            ],
            window: [small(w.size)?, small(w.stride)?, small(w.padding)?],
            kernels: kernels
                .rows()
                .into_iter()
                .map(|r| wire_vector(&r.to_vec()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The geometry the request describes, if it is a valid one.
    pub fn geometry(&self) -> Result<nn::layers::Geometry, String> {
        let [c, h, w] = self.input.map(|v| v as usize);
        let [r, s, p] = self.window.map(|v| v as usize);
        let shape = nn::layers::ImageShape::new(c, h, w).map_err(|e| e.to_string())?;
        nn::layers::Geometry::new("conv", shape, nn::layers::Window::new(r, s, p))
            .map_err(|e| e.to_string())
    }

    /// The kernels as a matrix `(O, K + 1)`, `None` if their lengths differ.
    pub fn kernel_matrix(&self) -> Option<ndarray::Array2<i64>> {
        let k = self.kernels.first()?.len();
        let flat: Vec<i64> = self
            .kernels
            .iter()
            .flatten()
            .map(|&v| i64::from(v))
            .collect();
        ndarray::Array2::from_shape_vec((self.kernels.len(), k), flat).ok()
    }
}

/// What a caller asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// The public parameters.
    Params,
    /// Inner-product keys for row vectors (first-layer weights, length `n + 1`).
    RowKeys(Vec<Vec<i32>>),
    /// Inner-product keys for column vectors (first-layer deltas, length = batch size).
    ColKeys(Vec<Vec<i32>>),
    /// Basic-operation keys.
    FeboKeys(Vec<FeboKeyRequest>),
    /// Inner-product keys for a prediction service's first-layer rows (length `n + 1`):
    /// row keys, asked once when the service starts and logged apart from training's.
    InferenceKeys(Vec<Vec<i32>>),
    /// Inner-product keys for a prediction service's convolutional first layer: one per
    /// kernel and position, placed by the authority (logged as inference keys).
    ConvInferenceKeys(ConvKeyRequest),
    /// Training's forward keys of a convolutional first layer: its current kernels, placed
    /// by the authority at every position (logged as row keys).
    ConvRowKeys(ConvKeyRequest),
    /// Training's backward keys of a convolutional first layer: one column vector (length =
    /// batch size) per position and kernel, the deltas there over the batch; bounded like
    /// placed kernels rather than by `max_feip_vectors` (logged as column keys).
    ConvColKeys(Vec<Vec<i32>>),
    /// The column public keys of batches `first..first + count` (at most
    /// [`MAX_BATCH_PARAMS`]), from an authority that binds column keys to batches
    /// ([`crate::authority::Policy::bind_batches`]): the client encrypts batch `k`'s columns
    /// under key `k`.
    BatchColParams {
        /// The dataset the batches belong to (chosen at random by the client).
        dataset: DatasetId,
        /// The first batch.
        first: u32,
        /// How many batches.
        count: u32,
    },
    /// Column keys bound to one batch of one dataset: they decrypt that batch's columns and
    /// nothing else. `conv` says whether they are a convolution's delta lanes (bounded as
    /// [`Request::ConvColKeys`]) or a dense layer's delta columns (as [`Request::ColKeys`]).
    BoundColKeys {
        /// The batch.
        batch: BatchId,
        /// A convolution's lanes rather than dense columns.
        conv: bool,
        /// The vectors (length = batch size).
        vectors: Vec<Vec<i32>>,
    },
}

/// Most batches in one [`Request::BatchColParams`] (2 KiB of points per batch of 64: 2 MiB).
pub const MAX_BATCH_PARAMS: u32 = 1024;
/// Most points (batches times batch size) in one [`Request::BatchColParams`]: 32 MiB of
/// encodings, half the frame limit.
pub const MAX_BATCH_PARAM_POINTS: u64 = 1 << 20;

/// The batches of one [`Request::BatchColParams`] for batches of `batch_size`.
pub fn batch_params_per_request(batch_size: usize) -> u32 {
    let by_points = MAX_BATCH_PARAM_POINTS / (batch_size.max(1) as u64);
    (by_points.min(u64::from(MAX_BATCH_PARAMS)) as u32).max(1)
}

/// Names the batch keys of one encrypted dataset: 16 random bytes the client draws, so that
/// batch `k` of one file and batch `k` of another have different keys and budgets.
pub type DatasetId = [u8; 16];

/// One batch of one dataset, as batch-bound column keys name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchId {
    /// The dataset ([`crate::dataset::DatasetHeader::column_binding`]).
    pub dataset: DatasetId,
    /// The batch's index in it.
    pub batch: u32,
}

/// The header frame of a request: read and checked before the request itself. Its first two
/// bytes are the version (little-endian), whatever the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHeader {
    /// [`PROTOCOL_VERSION`] of the caller.
    pub version: u16,
    /// The caller's bearer token.
    pub token: String,
}

/// What the authority answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The public parameters and the key policy.
    Params(Box<Published>),
    /// The secrets `sk_y` of inner-product keys (32 bytes each), in request order.
    FeipSecrets(Vec<Vec<u8>>),
    /// Basic-operation keys, in request order.
    FeboKeys(Vec<FeboFunctionKey<Curve>>),
    /// The column public keys of the batches asked for, in order, as their `fe` encodings.
    BatchColParams(Vec<Vec<u8>>),
    /// The request was understood and refused (authentication or key policy).
    Refused(String),
    /// The request could not be understood.
    Error(String),
    /// The authority is at one of its limits (connection slots, the caller's address's
    /// connections or request rate, memory in flight); the caller may try again later.
    Busy(String),
}

/// Errors of the protocol layer.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame is larger than its limit.
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    /// A request header names another protocol version.
    #[error("protocol version {0} is not supported (this end speaks version {PROTOCOL_VERSION})")]
    Version(u16),
    /// A frame did not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The server refused the request.
    #[error("the {role} refused the request: {message}")]
    Refused {
        /// Who refused.
        role: &'static str,
        /// Why.
        message: String,
    },
    /// The server reported an error.
    #[error("the {role} reported an error: {message}")]
    Server {
        /// Who reported it.
        role: &'static str,
        /// The error.
        message: String,
    },
    /// The server had no free connection slot.
    #[error("the {role} is busy: {message}")]
    Busy {
        /// Who is busy.
        role: &'static str,
        /// Its message.
        message: String,
    },
    /// The server could not be reached, or its connection kept failing, after retries.
    #[error("the {role} at {addr} did not answer after {attempts} attempts: {source}")]
    Unavailable {
        /// Who did not answer.
        role: &'static str,
        /// The server's address.
        addr: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        source: std::io::Error,
    },
    /// The answer does not match the question.
    #[error("unexpected response: {0}")]
    Unexpected(String),
    /// TLS could not be set up: the server's certificate is not the pinned one, or one side
    /// speaks TLS and the other clear text. Not retried.
    #[error("{0}")]
    Tls(String),
    /// A key or parameter failed validation.
    #[error(transparent)]
    Fe(#[from] fe::FeError),
}

/// The bincode configuration of every frame.
fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_FRAME as u64)
}

/// Appends one frame (length and encoding of `msg`, at most `max` bytes) to `out`.
fn push_frame<T: Serialize>(out: &mut Vec<u8>, msg: &T, max: usize) -> Result<(), ProtocolError> {
    let body = codec()
        .serialize(msg)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if body.len() > max {
        return Err(ProtocolError::FrameTooLarge(body.len()));
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Writes one frame.
pub fn write_frame<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let mut out = Vec::new();
    push_frame(&mut out, msg, MAX_FRAME)?;
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

/// The bytes of one request: its header frame (version and token) and its request frame.
pub fn encode_request<T: Serialize>(token: &str, request: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    let header = RequestHeader {
        version: PROTOCOL_VERSION,
        token: token.to_string(),
    };
    push_frame(&mut out, &header, MAX_HEADER)?;
    push_frame(&mut out, request, MAX_FRAME)?;
    Ok(out)
}

/// Writes one request (see [`encode_request`]).
pub fn write_request<T: Serialize, W: Write>(
    w: &mut W,
    token: &str,
    request: &T,
) -> Result<(), ProtocolError> {
    w.write_all(&encode_request(token, request)?)?;
    w.flush()?;
    Ok(())
}

/// Reads a request's header frame, holding at most [`MAX_HEADER`] bytes: a longer length is
/// refused before anything else is read, another version is [`ProtocolError::Version`].
pub fn read_request_header<R: Read>(r: &mut R) -> Result<RequestHeader, ProtocolError> {
    let body = read_frame_bytes(r, MAX_HEADER)?;
    decode_request_header(&body)
}

/// Decodes a header frame's body (see [`read_request_header`]).
pub fn decode_request_header(body: &[u8]) -> Result<RequestHeader, ProtocolError> {
    match body {
        [a, b, ..] => {
            let version = u16::from_le_bytes([*a, *b]);
            if version != PROTOCOL_VERSION {
                return Err(ProtocolError::Version(version));
            }
        }
        _ => {
            return Err(ProtocolError::Malformed(format!(
                "request header of {} bytes",
                body.len()
            )))
        }
    }
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_HEADER as u64)
        .deserialize(body)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// First allocation for a frame's bytes; the buffer grows as they arrive.
const FRAME_CHUNK: usize = 64 << 10;

/// Reads one frame's bytes, refusing lengths over `max` before allocating. The buffer starts
/// at 64 KiB at most and grows with the bytes received (to at most twice the frame's length),
/// not with the announced length.
pub fn read_frame_bytes<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    // Grow with the bytes that actually arrive rather than trust the length: a caller that
    // announces a large frame and sends little makes the authority hold little.
    let mut body = Vec::with_capacity(len.min(FRAME_CHUNK));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(ProtocolError::Io(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("frame cut short after {} of {len} bytes", body.len()),
        )));
    }
    Ok(body)
}

/// Decodes a frame body.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtocolError> {
    codec()
        .deserialize(body)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Reads and decodes one frame.
pub fn read_frame<T: for<'de> Deserialize<'de>, R: Read>(r: &mut R) -> Result<T, ProtocolError> {
    decode(&read_frame_bytes(r, MAX_FRAME)?)
}

/// Default time to wait for a TCP connection to the authority.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time to wait for the authority's answer to one request.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time to wait for a request to be sent.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of retries of a request after the first attempt.
pub const DEFAULT_RETRIES: u32 = 6;

/// Timeouts and retries of an [`AuthorityClient`].
///
/// Every request of the protocol is idempotent (the parameters, and keys: deriving the same
/// key twice is harmless), so a request whose connection failed, timed out or found the
/// authority busy is sent again on a new connection, after a pause that starts at
/// `initial_backoff` and doubles up to `max_backoff` (each pause drawn between half and all of
/// it, so that callers that failed together do not come back together). Refusals and errors
/// reported by the authority are not retried. With the defaults, a request waits about
/// 11 s in all for an authority that is restarting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Time to wait for a TCP connection (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Time to wait for each read of an answer (default [`DEFAULT_READ_TIMEOUT`]).
    pub read_timeout: Duration,
    /// Time to wait for each write of a request (default [`DEFAULT_WRITE_TIMEOUT`]).
    pub write_timeout: Duration,
    /// Retries after the first attempt (default [`DEFAULT_RETRIES`]; 0: never retry).
    pub retries: u32,
    /// First pause between attempts (default 200 ms).
    pub initial_backoff: Duration,
    /// Longest pause between attempts (default 5 s).
    pub max_backoff: Duration,
    /// TLS pinned to the server's certificate, or clear text (the default, since the
    /// library has no certificate to pin; the binaries use TLS unless told
    /// `--insecure-plaintext`).
    pub transport: ClientTransport,
}

/// How a [`Client`] carries its connections.
#[derive(Clone, Default)]
pub enum ClientTransport {
    /// Clear-text TCP: for tests and benchmarks, against a server that also runs in clear
    /// text (`--insecure-plaintext`).
    #[default]
    Plaintext,
    /// TLS with this configuration, normally one that pins the server's certificate (see
    /// [`ClientTransport::pinned`]).
    Tls(Arc<rustls::ClientConfig>),
}

impl ClientTransport {
    /// TLS trusting exactly the certificate in the PEM file `cert` (the server's `cert.pem`).
    pub fn pinned(cert: &std::path::Path) -> Result<Self, crate::tls::TlsError> {
        Ok(ClientTransport::Tls(crate::tls::pinned_client(cert)?))
    }
}

impl std::fmt::Debug for ClientTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientTransport::Plaintext => "Plaintext",
            ClientTransport::Tls(_) => "Tls",
        })
    }
}

impl PartialEq for ClientTransport {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ClientTransport::Plaintext, ClientTransport::Plaintext) => true,
            (ClientTransport::Tls(a), ClientTransport::Tls(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for ClientTransport {}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            retries: DEFAULT_RETRIES,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            transport: ClientTransport::Plaintext,
        }
    }
}

/// A client's connection in clear text or under TLS.
enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(t) => t.flush(),
        }
    }
}

struct Connection {
    /// Reads through a buffer; writes go to the stream itself (one whole request at once).
    reader: BufReader<ClientStream>,
    /// When it was opened, and whether it has carried a request.
    opened: std::time::Instant,
    used: bool,
}

/// A connection opened but not used for this long is replaced before its first request:
/// servers close connections that do not authenticate within a few seconds.
const FRESH: Duration = Duration::from_millis(1000);

/// The answers of a served protocol: which of them are refusals, errors or "busy".
pub trait Reply: for<'de> Deserialize<'de> {
    /// Who answers, in messages ("authority", "prediction service").
    const ROLE: &'static str;
    /// The answer, or the refusal, error or busy message it carries as an error.
    fn check(self) -> Result<Self, ProtocolError>;
}

impl Reply for Response {
    const ROLE: &'static str = "authority";
    fn check(self) -> Result<Self, ProtocolError> {
        let role = Self::ROLE;
        match self {
            Response::Refused(message) => Err(ProtocolError::Refused { role, message }),
            Response::Error(message) => Err(ProtocolError::Server { role, message }),
            Response::Busy(message) => Err(ProtocolError::Busy { role, message }),
            r => Ok(r),
        }
    }
}

/// A connection to a server of this project (the authority, the prediction service) for
/// requests `Q` and answers `R`. It reconnects and retries as its [`ClientConfig`] says.
pub struct Client<Q, R> {
    addr: String,
    token: String,
    config: ClientConfig,
    conn: Option<Connection>,
    connections: u64,
    _protocol: std::marker::PhantomData<fn(Q) -> R>,
}

/// A connection to the authority, used by the client and the trainer.
pub type AuthorityClient = Client<Request, Response>;

impl<Q, R: Reply> std::fmt::Debug for Client<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("role", &R::ROLE)
            .field("addr", &self.addr)
            .field("config", &self.config)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

/// Whether another attempt may succeed.
fn retryable(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(_) | ProtocolError::Busy { .. })
}

/// An I/O error with the cause spelled out (a read timeout shows as `WouldBlock` on Unix).
fn io_context(e: std::io::Error, what: &str, timeout: Duration, role: &str) -> std::io::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => std::io::Error::new(
            ErrorKind::TimedOut,
            format!("no {what} within {:.1} s", timeout.as_secs_f64()),
        ),
        ErrorKind::UnexpectedEof => std::io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("the {role} closed the connection"),
        ),
        _ => e,
    }
}

impl<Q: Serialize, R: Reply> Client<Q, R> {
    /// Connects to `addr` (for example `127.0.0.1:7700`) with the caller's token and the
    /// default [`ClientConfig`].
    pub fn connect(addr: &str, token: &str) -> Result<Self, ProtocolError> {
        Self::connect_with(addr, token, ClientConfig::default())
    }

    /// Connects to `addr` with the caller's token, retrying as `config` says.
    pub fn connect_with(
        addr: &str,
        token: &str,
        config: ClientConfig,
    ) -> Result<Self, ProtocolError> {
        let mut c = Client {
            addr: addr.to_string(),
            token: token.to_string(),
            config,
            conn: None,
            connections: 0,
            _protocol: std::marker::PhantomData,
        };
        c.retrying(|c| c.ensure_connected().map(|_| ()))?;
        Ok(c)
    }

    /// The client's configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// TCP connections opened so far (more than 1 after a reconnection).
    pub fn connections(&self) -> u64 {
        self.connections
    }

    fn open(&self) -> Result<Connection, ProtocolError> {
        let mut last = None;
        for sock in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&sock, self.config.connect_timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_write_timeout(Some(self.config.write_timeout))?;
                    let stream = match &self.config.transport {
                        ClientTransport::Plaintext => ClientStream::Plain(stream),
                        ClientTransport::Tls(config) => self.handshake(stream, config)?,
                    };
                    if let ClientStream::Plain(s) = &stream {
                        s.set_read_timeout(Some(self.config.read_timeout))?;
                    }
                    return Ok(Connection {
                        reader: BufReader::new(stream),
                        opened: std::time::Instant::now(),
                        used: false,
                    });
                }
                Err(e) => {
                    last = Some(io_context(
                        e,
                        "connection",
                        self.config.connect_timeout,
                        R::ROLE,
                    ))
                }
            }
        }
        Err(match last {
            Some(e) => ProtocolError::Io(e),
            None => ProtocolError::Unexpected(format!("cannot resolve {}", self.addr)),
        })
    }

    /// Completes a TLS handshake on `stream` within the connection timeout. A certificate
    /// other than the pinned one, or a server that does not speak TLS, is a
    /// [`ProtocolError::Tls`] saying so (not retried).
    fn handshake(
        &self,
        stream: TcpStream,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<ClientStream, ProtocolError> {
        let role = R::ROLE;
        let addr = &self.addr;
        let name = crate::tls::server_name(addr).map_err(|e| ProtocolError::Tls(e.to_string()))?;
        let conn = rustls::ClientConnection::new(config.clone(), name)
            .map_err(|e| ProtocolError::Tls(format!("cannot start TLS: {e}")))?;
        stream.set_read_timeout(Some(self.config.connect_timeout))?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                let tls_error = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .cloned();
                return Err(match tls_error {
                    Some(rustls::Error::InvalidCertificate(c)) => ProtocolError::Tls(format!(
                        "the {role} at {addr} presented a TLS certificate other than the \
                         pinned one ({c:?}): give its certificate with --ca (or \
                         --server-ca)"
                    )),
                    Some(rustls::Error::InvalidMessage(m)) => ProtocolError::Tls(format!(
                        "the {role} at {addr} did not answer in TLS ({m:?}): it may run with \
                         --insecure-plaintext, which this side then needs too"
                    )),
                    Some(other) => ProtocolError::Tls(format!(
                        "the TLS handshake with the {role} at {addr} failed: {other}"
                    )),
                    None => ProtocolError::Io(match e.kind() {
                        ErrorKind::UnexpectedEof
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted => std::io::Error::new(
                            e.kind(),
                            format!(
                                "the {role} closed the connection during the TLS handshake \
                                 (is it serving TLS? a clear-text server needs \
                                 --insecure-plaintext on both sides)"
                            ),
                        ),
                        _ => io_context(e, "TLS handshake", self.config.connect_timeout, role),
                    }),
                });
            }
        }
        tls.sock.set_read_timeout(Some(self.config.read_timeout))?;
        Ok(ClientStream::Tls(Box::new(tls)))
    }

    fn ensure_connected(&mut self) -> Result<&mut Connection, ProtocolError> {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| !c.used && c.opened.elapsed() > FRESH)
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
            self.connections += 1;
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ProtocolError::Unexpected("no connection".into()))
    }

    /// Runs `op` until it succeeds, fails in a way another attempt cannot fix, or the
    /// retries are spent; drops the connection after every retryable failure.
    fn retrying<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, ProtocolError>,
    ) -> Result<T, ProtocolError> {
        let mut backoff = self.config.initial_backoff;
        let mut attempt = 0u32;
        loop {
            match op(self) {
                Ok(v) => return Ok(v),
                Err(e) if retryable(&e) => {
                    self.conn = None;
                    if attempt >= self.config.retries {
                        return Err(match e {
                            ProtocolError::Io(source) if attempt > 0 => {
                                ProtocolError::Unavailable {
                                    role: R::ROLE,
                                    addr: self.addr.clone(),
                                    attempts: attempt + 1,
                                    source,
                                }
                            }
                            other => other,
                        });
                    }
                    attempt += 1;
                    use rand::Rng;
                    let pause = backoff.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
                    std::thread::sleep(pause);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn round_trip(&mut self, bytes: &[u8]) -> Result<R, ProtocolError> {
        let (read_timeout, write_timeout) = (self.config.read_timeout, self.config.write_timeout);
        let conn = self.ensure_connected()?;
        conn.used = true;
        let writer = conn.reader.get_mut();
        let sent = writer
            .write_all(bytes)
            .and_then(|()| writer.flush())
            .map_err(|e| io_context(e, "progress sending the request", write_timeout, R::ROLE));
        sent?;
        match read_frame::<R, _>(&mut conn.reader) {
            Ok(r) => r.check(),
            Err(ProtocolError::FrameTooLarge(n))
                if crate::tls::looks_like_tls(&u32::try_from(n).unwrap_or(0).to_be_bytes()) =>
            {
                self.conn = None;
                Err(ProtocolError::Tls(format!(
                    "the {} at {} answered in TLS: connect with TLS (give its certificate \
                     with --ca), or run both sides with --insecure-plaintext",
                    R::ROLE,
                    self.addr
                )))
            }
            Err(ProtocolError::Io(e)) => Err(ProtocolError::Io(io_context(
                e,
                &format!("answer from the {}", R::ROLE),
                read_timeout,
                R::ROLE,
            ))),
            Err(e) => {
                // The stream is out of step: never reuse it.
                self.conn = None;
                Err(e)
            }
        }
    }

    /// Sends one request and reads its answer, turning refusals and errors into `Err`. A
    /// broken connection, a timeout or a busy server is retried on a new connection (see
    /// [`ClientConfig`]); every request of this project's protocols is idempotent.
    pub fn call(&mut self, request: Q) -> Result<R, ProtocolError> {
        let bytes = encode_request(&self.token, &request)?;
        drop(request);
        self.retrying(|c| c.round_trip(&bytes))
    }
}

impl AuthorityClient {
    /// The authority's public parameters.
    pub fn params(&mut self) -> Result<PublicParams, ProtocolError> {
        Ok(self.published()?.params)
    }

    /// The authority's public parameters and key policy, validated.
    pub fn published(&mut self) -> Result<Published, ProtocolError> {
        match self.call(Request::Params)? {
            Response::Params(p) => {
                p.params.validate().map_err(ProtocolError::Unexpected)?;
                let policy = p
                    .policy
                    .clone()
                    .with_lengths(p.params.dataset.row_len(), p.params.batch_size());
                Ok(Published {
                    params: p.params,
                    policy,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    fn feip_keys(
        &mut self,
        ys: &[Vec<i64>],
        kind: fn(Vec<Vec<i32>>) -> Request,
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        let wire = ys
            .iter()
            .map(|y| wire_vector(y))
            .collect::<Result<_, _>>()?;
        let response = self.call(kind(wire))?;
        keys_from(response, ys)
    }

    /// Inner-product keys for a prediction service's convolutional first layer: the
    /// authority places `request`'s kernels; `placed` are the same placed rows computed here
    /// ([`nn::infer::place_kernels`]), which the keys are for.
    pub fn conv_inference_keys(
        &mut self,
        request: ConvKeyRequest,
        placed: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        let response = self.call(Request::ConvInferenceKeys(request))?;
        keys_from(response, placed)
    }

    /// Training's forward keys of a convolutional first layer, placed by the authority;
    /// `placed` are the rows it places them at (row `pos * kernels + o`).
    pub fn conv_row_keys(
        &mut self,
        request: ConvKeyRequest,
        placed: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        let response = self.call(Request::ConvRowKeys(request))?;
        keys_from(response, placed)
    }

    /// Training's backward keys of a convolutional first layer: one per position and kernel.
    pub fn conv_col_keys(
        &mut self,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        self.feip_keys(ys, Request::ConvColKeys)
    }

    /// Inner-product keys for first-layer weight rows (length `n + 1`).
    pub fn row_keys(
        &mut self,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        self.feip_keys(ys, Request::RowKeys)
    }

    /// Inner-product keys for first-layer delta columns (length = batch size).
    pub fn col_keys(
        &mut self,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        self.feip_keys(ys, Request::ColKeys)
    }

    /// Column keys bound to batch `batch` (from an authority that binds them): a
    /// convolution's delta lanes if `conv`, a dense layer's delta columns otherwise.
    pub fn bound_col_keys(
        &mut self,
        batch: BatchId,
        conv: bool,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        let vectors = ys
            .iter()
            .map(|y| wire_vector(y))
            .collect::<Result<_, _>>()?;
        let response = self.call(Request::BoundColKeys {
            batch,
            conv,
            vectors,
        })?;
        keys_from(response, ys)
    }

    /// The column public keys of batches `0..count` of dataset `dataset` from an authority
    /// that binds column keys to batches, asked [`batch_params_per_request`] at a time; each
    /// is checked against `params` (the batch length and the value bound).
    pub fn batch_col_params(
        &mut self,
        params: &PublicParams,
        dataset: DatasetId,
        count: u32,
    ) -> Result<Vec<FeipPublicKey<Curve>>, ProtocolError> {
        let mut keys = Vec::with_capacity(count as usize);
        let per_request = batch_params_per_request(params.batch_size());
        let mut first = 0u32;
        while first < count {
            let n = (count - first).min(per_request);
            let request = Request::BatchColParams {
                dataset,
                first,
                count: n,
            };
            let encoded = match self.call(request)? {
                Response::BatchColParams(v) if v.len() == n as usize => v,
                other => return Err(unexpected(&other)),
            };
            for (i, bytes) in encoded.iter().enumerate() {
                let key = FeipPublicKey::<Curve>::from_bytes(bytes)?;
                if key.params() != params.col.params() {
                    return Err(ProtocolError::Unexpected(format!(
                        "the column key of batch {} has parameters {:?}, the public \
                         parameters' column key {:?}",
                        first as usize + i,
                        key.params(),
                        params.col.params()
                    )));
                }
                keys.push(key);
            }
            first += n;
        }
        Ok(keys)
    }

    /// Inner-product keys for a prediction service's first-layer rows (length `n + 1`).
    pub fn inference_keys(
        &mut self,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        self.feip_keys(ys, Request::InferenceKeys)
    }

    /// Basic-operation keys.
    pub fn febo_keys(
        &mut self,
        reqs: Vec<FeboKeyRequest>,
    ) -> Result<Vec<FeboFunctionKey<Curve>>, ProtocolError> {
        let n = reqs.len();
        match self.call(Request::FeboKeys(reqs))? {
            Response::FeboKeys(k) if k.len() == n => Ok(k),
            other => Err(unexpected(&other)),
        }
    }
}

/// The keys of `ys` from an answer of secrets in request order.
fn keys_from(
    response: Response,
    ys: &[Vec<i64>],
) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
    match response {
        Response::FeipSecrets(s) if s.len() == ys.len() => s
            .iter()
            .zip(ys)
            .map(|(b, y)| {
                let sk = curv::elliptic::curves::Scalar::<Curve>::from_bytes(b)
                    .map_err(|_| fe::FeError::InvalidEncoding("key secret"))?;
                Ok(FeipFunctionKey::from_parts(y.clone(), sk))
            })
            .collect(),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(r: &Response) -> ProtocolError {
    let what = match r {
        Response::Params(_) => "parameters".to_string(),
        Response::FeipSecrets(v) => format!("{} inner-product keys", v.len()),
        Response::FeboKeys(v) => format!("{} basic-operation keys", v.len()),
        Response::BatchColParams(v) => format!("{} batch column keys", v.len()),
        Response::Refused(m) | Response::Error(m) | Response::Busy(m) => m.clone(),
    };
    ProtocolError::Unexpected(what)
}

/// The bearer token from a flag value, else from a file (trimmed): the roles' shared rule.
pub fn resolve_token(
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<String, ProtocolError> {
    match (token, file) {
        (Some(t), _) if !t.is_empty() => Ok(t),
        (_, Some(f)) => Ok(std::fs::read_to_string(f)?.trim().to_string()),
        _ => Err(ProtocolError::Unexpected(
            "no token: give the authority's token with --token, --token-file or CRYPTONN_TOKEN"
                .into(),
        )),
    }
}
