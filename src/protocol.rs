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
//! and answers [`Response::Busy`] when all its connection slots are taken.
//!
//! Keys travel compactly: for inner-product keys the authority returns only the 32-byte
//! secret `sk_y`, since the caller already has `y`.

use crate::Curve;
use bincode::Options;
use fe::febo::{FeboFunctionKey, FeboPublicKey, Op};
use fe::feip::{FeipFunctionKey, FeipPublicKey};
use fe::Encode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;
use thiserror::Error;

/// Version of the protocol; both ends must agree. Version 2 put the token in a header of its
/// own, read before the request.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame accepted by either end (64 MiB).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest request header (version and token), in bytes.
pub const MAX_HEADER: usize = 4096;

/// The authority's public parameters: everything a client needs to encrypt and a trainer to
/// ask for keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicParams {
    /// FEIP key for the rows (one sample, 784 pixels and the bias: length 785).
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

    /// SHA-256 over the encodings of the three public keys: names this set of parameters in
    /// encrypted-dataset headers, so data and keys from different authorities never mix.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.row.to_bytes());
        h.update(self.col.to_bytes());
        h.update(self.febo.to_bytes());
        h.finalize().into()
    }
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

/// What a caller asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// The public parameters.
    Params,
    /// Inner-product keys for row vectors (first-layer weights, length 785).
    RowKeys(Vec<Vec<i32>>),
    /// Inner-product keys for column vectors (first-layer deltas, length = batch size).
    ColKeys(Vec<Vec<i32>>),
    /// Basic-operation keys.
    FeboKeys(Vec<FeboKeyRequest>),
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
    /// The public parameters.
    Params(Box<PublicParams>),
    /// The secrets `sk_y` of inner-product keys (32 bytes each), in request order.
    FeipSecrets(Vec<Vec<u8>>),
    /// Basic-operation keys, in request order.
    FeboKeys(Vec<FeboFunctionKey<Curve>>),
    /// The request was understood and refused (authentication or key policy).
    Refused(String),
    /// The request could not be understood.
    Error(String),
    /// Every connection slot is taken; the caller may try again later.
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
    /// The authority refused the request.
    #[error("the authority refused the request: {0}")]
    Refused(String),
    /// The authority reported an error.
    #[error("the authority reported an error: {0}")]
    Server(String),
    /// The authority had no free connection slot.
    #[error("the authority is busy: {0}")]
    Busy(String),
    /// The answer does not match the question.
    #[error("unexpected response: {0}")]
    Unexpected(String),
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
pub fn encode_request(token: &str, request: &Request) -> Result<Vec<u8>, ProtocolError> {
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
pub fn write_request<W: Write>(
    w: &mut W,
    token: &str,
    request: &Request,
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

/// Reads one frame's bytes, refusing lengths over `max` before allocating.
pub fn read_frame_bytes<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
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

/// A connection to the authority, used by the client and the trainer.
pub struct AuthorityClient {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    token: String,
}

impl AuthorityClient {
    /// Connects to `addr` (for example `127.0.0.1:7700`) with the caller's token.
    pub fn connect(addr: &str, token: &str) -> Result<Self, ProtocolError> {
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ProtocolError::Unexpected(format!("cannot resolve {addr}")))?;
        let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(10))?;
        stream.set_nodelay(true)?;
        Ok(AuthorityClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
            token: token.to_string(),
        })
    }

    /// Sends one request and reads its response, turning refusals and errors into `Err`.
    pub fn call(&mut self, request: Request) -> Result<Response, ProtocolError> {
        write_request(&mut self.writer, &self.token, &request)?;
        match read_frame::<Response, _>(&mut self.reader)? {
            Response::Refused(m) => Err(ProtocolError::Refused(m)),
            Response::Error(m) => Err(ProtocolError::Server(m)),
            Response::Busy(m) => Err(ProtocolError::Busy(m)),
            r => Ok(r),
        }
    }

    /// The authority's public parameters.
    pub fn params(&mut self) -> Result<PublicParams, ProtocolError> {
        match self.call(Request::Params)? {
            Response::Params(p) => Ok(*p),
            other => Err(unexpected(&other)),
        }
    }

    fn feip_keys(
        &mut self,
        ys: &[Vec<i64>],
        row: bool,
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        let wire = ys
            .iter()
            .map(|y| {
                y.iter()
                    .map(|&v| {
                        i32::try_from(v).map_err(|_| {
                            ProtocolError::Unexpected(format!(
                                "key entry {v} does not fit in 32 bits"
                            ))
                        })
                    })
                    .collect::<Result<Vec<i32>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let req = if row {
            Request::RowKeys(wire)
        } else {
            Request::ColKeys(wire)
        };
        match self.call(req)? {
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

    /// Inner-product keys for first-layer weight rows (length 785).
    pub fn row_keys(
        &mut self,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        self.feip_keys(ys, true)
    }

    /// Inner-product keys for first-layer delta columns (length = batch size).
    pub fn col_keys(
        &mut self,
        ys: &[Vec<i64>],
    ) -> Result<Vec<FeipFunctionKey<Curve>>, ProtocolError> {
        self.feip_keys(ys, false)
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

fn unexpected(r: &Response) -> ProtocolError {
    let what = match r {
        Response::Params(_) => "parameters".to_string(),
        Response::FeipSecrets(v) => format!("{} inner-product keys", v.len()),
        Response::FeboKeys(v) => format!("{} basic-operation keys", v.len()),
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
