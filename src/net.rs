//! The network layer of the roles that serve: the authority and the prediction service.
//!
//! A [`Service`] says how to answer one authenticated request; this module does everything
//! else, the same way for both: the accept loop, the [protocol]'s framing, authentication by
//! a bearer token, deadlines, limits and a clean shutdown.
//!
//! Every request starts with a small header (at most [`protocol::MAX_HEADER`] bytes) carrying
//! the token, which is read and compared (in constant time) before the request's length is
//! even read, so an unauthenticated caller makes the server hold no more than a few KiB. A new
//! connection must complete the TLS handshake and send that header within
//! [`Settings::auth_timeout`] (default 5 s) or is told so and closed. A failed authentication
//! is answered with the service's refusal and closes the connection. A frame longer than its
//! limit, a frame that does not decode or a wrong protocol version is answered with the
//! service's error and closes the connection. Idle connections are closed after a timeout.
//! Failures before authentication are reported to [`Service::failure`] (the authority counts
//! and summarises them in its audit log), never answered at length.
//!
//! # Event-driven, with limits
//!
//! The server runs on its own [tokio] runtime (a few worker threads): a connection is a
//! task, not a thread, and a connection that has sent nothing holds no buffer, so thousands
//! of idle connections cost a few KiB each. The service's answers are CPU work
//! ([`Service::respond`]: key derivation spreads over every core) and run on the runtime's
//! blocking pool, never on the threads that serve the sockets. The limits:
//!
//! - **Waiting to authenticate**: at most [`Settings::max_pending`] connections (default
//!   10,000); a newer one closes the oldest waiting one, so idle connections cannot lock
//!   callers out.
//! - **Per address**: at most [`Settings::max_per_peer`] connections from one IP address
//!   (default 32). A new connection from an address at its cap closes that address's oldest
//!   connection still waiting to authenticate; if all of them are authenticated, it gets the
//!   busy answer.
//! - **Authenticated**: at most [`Settings::max_connections`]; beyond it callers get the
//!   service's busy answer.
//! - **Request rate**: each IP address has a token bucket of [`Settings::peer_burst`]
//!   requests refilled at [`Settings::peer_rate`] a second (default 50 a second, 100 at
//!   once). It counts authenticated requests (unauthenticated traffic is held by the caps
//!   and the deadline); a request beyond it is read, dropped and answered busy, and the
//!   connection stays open.
//! - **Memory in flight**: the bytes of requests being read or answered count against
//!   [`Settings::max_inflight_bytes`] (default 256 MiB) from the moment their length is read
//!   until their answer is sent. A request that finds no room waits for up to 2 s (less if
//!   the idle timeout is shorter), then is read, dropped and answered busy.
//!
//! What the caps bound: a connection that has sent nothing holds only its task (2,000 of
//! them grow a debug build by about 20 MiB, socket buffers aside); a clear-text one that has
//! sent a byte holds a 4 KiB read buffer and at most [`protocol::MAX_HEADER`] bytes of
//! header; under TLS the handshake's state and rustls's buffers are allocated only once a
//! TLS record starts. The requests themselves are bounded by the memory in flight.
//!
//! # Transport
//!
//! [`Settings::transport`] says how connections are carried: TLS ([`Transport::Tls`], with
//! the server's certificate and key, see [`crate::tls`]) or clear-text TCP
//! ([`Transport::Plaintext`], for tests and benchmarks). Under TLS the handshake counts
//! against the deadline to authenticate: a connection must complete it *and* send its token
//! within [`Settings::auth_timeout`]. A failed handshake is a [`Failure::Handshake`], counted
//! like the other failures before authentication. A caller that speaks clear text to a TLS
//! server (its first byte is not a TLS record's) is answered in clear text with the
//! service's error saying so; a TLS caller of a clear-text server is reported as a
//! [`Failure::Handshake`] and gets a clear-text error its TLS stack refuses, which the
//! [client](crate::protocol::Client) turns into a message naming the mismatch.

use crate::protocol::{self, ProtocolError, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify, Semaphore};

/// Default idle timeout of a connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on concurrent authenticated connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default deadline for a new connection to send its first request's header with the token.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on connections that have not authenticated yet.
pub const DEFAULT_MAX_PENDING: usize = 10_000;
/// Default cap on connections from one IP address.
pub const DEFAULT_MAX_PER_PEER: usize = 32;
/// Default sustained rate of authenticated requests from one IP address, per second.
pub const DEFAULT_PEER_RATE: f64 = 50.0;
/// Default burst of authenticated requests from one IP address.
pub const DEFAULT_PEER_BURST: u32 = 100;
/// Default bound on the request bytes being read or answered at once (256 MiB).
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// Longest accepted token, in bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// Length of the queue of connections not yet accepted.
const LISTEN_BACKLOG: i32 = 4096;
/// Most worker threads of a server's runtime (the blocking pool answers requests).
const MAX_WORKERS: usize = 4;
/// Most tasks answering connections turned away at once.
const MAX_TURNING_AWAY: usize = 64;
/// How long a turned-away connection may take to get its answer.
const TURN_AWAY_TIME: Duration = Duration::from_secs(3);
/// How often the accept loop calls [`Service::tick`] and looks at the shutdown flag.
const TICK: Duration = Duration::from_millis(10);
/// How often peers with nothing to remember are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for room under the bound on memory in flight.
const INFLIGHT_WAIT: Duration = Duration::from_secs(2);
/// How long answers that close a connection may take to be sent.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closing connection's late bytes are read and dropped, and how many at most.
const LINGER: Duration = Duration::from_millis(300);
const LINGER_BYTES: usize = 64 << 10;
/// How long in-flight answers may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Bytes buffered by a clear-text connection's reader (allocated at its first byte).
const READ_BUFFER: usize = 4 << 10;
/// A request's buffer grows by at most this much at a time, as its bytes arrive.
const FRAME_CHUNK: usize = 64 << 10;
/// The scratch buffer of a request read and dropped.
const DISCARD_CHUNK: usize = 16 << 10;
/// The message of the busy answer when every slot is taken.
const BUSY: &str = "too many connections; try again later";
/// The message of the busy answer when an address holds its share of connections.
const PEER_BUSY: &str = "too many connections from this address; try again later";

/// Errors of the network layer.
#[derive(Debug, Error)]
pub enum NetError {
    /// A setting is unusable.
    #[error("invalid server setting: {0}")]
    Setting(String),
    /// The token is empty, too long or not printable ASCII.
    #[error("invalid token: {0}")]
    Token(String),
    /// The listener failed.
    #[error("cannot serve on {addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The accept loop's thread panicked.
    #[error("the server thread panicked")]
    Panicked,
}

/// A failure before authentication, counted rather than logged line by line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// A frame longer than the limit.
    Oversized,
    /// A frame that does not decode.
    Malformed,
    /// A protocol version this server does not speak.
    Version,
    /// A wrong token.
    Auth,
    /// No authenticated request within the deadline.
    Timeout,
    /// Closed by the caller before it authenticated.
    Closed,
    /// Closed by the server to make room for a newer unauthenticated connection (from any
    /// address when too many wait, or from the same address when it holds its share).
    Evicted,
    /// Turned away because every connection slot, or every slot of its address, was taken.
    Busy,
    /// The TLS handshake failed, or the caller spoke clear text to a TLS server (or TLS to a
    /// clear-text one).
    Handshake,
}

impl Failure {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Oversized => "oversized",
            Failure::Malformed => "malformed",
            Failure::Version => "version",
            Failure::Auth => "auth",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::Evicted => "evicted",
            Failure::Busy => "busy",
            Failure::Handshake => "handshake",
        }
    }
}

/// What a server answers: one response per authenticated request.
pub trait Service: Send + Sync + 'static {
    /// The request frame.
    type Request: DeserializeOwned;
    /// The response frame.
    type Response: Serialize;
    /// The role's name in thread names and log lines.
    const ROLE: &'static str;

    /// Answers an authenticated request from `peer` (address and port).
    fn respond(&self, peer: &str, request: Self::Request) -> Self::Response;
    /// The answer to a request that was understood and refused (a wrong token).
    fn refused(message: String) -> Self::Response;
    /// The answer to a request that could not be understood.
    fn error(message: String) -> Self::Response;
    /// The answer when the server is at one of its limits (connections, an address's
    /// connections or requests, memory in flight); the caller may try again later.
    fn busy(message: String) -> Self::Response;
    /// A failure before authentication from `peer_ip` (default: nothing).
    fn failure(&self, _peer_ip: &str, _what: Failure, _reason: &str) {}
    /// A malformed or oversized request on an authenticated connection, which is closed
    /// (default: nothing).
    fn connection_error(&self, _peer: &str, _reason: &str) {}
    /// Called by the accept loop every few milliseconds (default: nothing).
    fn tick(&self) {}
    /// Called once when the server stops (default: nothing).
    fn close(&self) {}
}

/// How a server's connections are carried.
#[derive(Clone, Default)]
pub enum Transport {
    /// Clear-text TCP: tokens, keys and queries travel unprotected. For tests and benchmarks
    /// (`--insecure-plaintext`); the default of [`Settings::new`], which has no certificate.
    #[default]
    Plaintext,
    /// TLS with this configuration (the server's certificate and key; see
    /// [`crate::tls::server_config`]).
    Tls(Arc<rustls::ServerConfig>),
}

impl Transport {
    /// Whether connections are carried in TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Plaintext => "Plaintext",
            Transport::Tls(_) => "Tls",
        })
    }
}

/// How a server admits and keeps connections.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The token every request must carry.
    pub token: String,
    /// TLS or clear text (default [`Transport::Plaintext`]: the binaries choose TLS unless
    /// told `--insecure-plaintext`).
    pub transport: Transport,
    /// Largest accepted request frame, in bytes (at most [`protocol::MAX_FRAME`]).
    pub frame_limit: usize,
    /// A connection that sends nothing for this long is closed (default 60 s).
    pub idle_timeout: Duration,
    /// A new connection must send the header of its first request, with the right token,
    /// within this time (default [`DEFAULT_AUTH_TIMEOUT`]) or is closed.
    pub auth_timeout: Duration,
    /// Most authenticated connections served at once (default 64); more are answered busy.
    pub max_connections: usize,
    /// Most connections waiting to authenticate (default [`DEFAULT_MAX_PENDING`]); a new
    /// connection beyond it closes the oldest waiting one.
    pub max_pending: usize,
    /// Most connections from one IP address (default [`DEFAULT_MAX_PER_PEER`]); a new one
    /// beyond it closes that address's oldest connection waiting to authenticate, or gets
    /// the busy answer if there is none.
    pub max_per_peer: usize,
    /// Authenticated requests a second from one IP address, on average (default
    /// [`DEFAULT_PEER_RATE`]); beyond it and [`Settings::peer_burst`] requests are answered
    /// busy.
    pub peer_rate: f64,
    /// Authenticated requests from one IP address at once (default [`DEFAULT_PEER_BURST`]).
    pub peer_burst: u32,
    /// Most request bytes being read or answered at once (default
    /// [`DEFAULT_MAX_INFLIGHT_BYTES`], at least the frame limit); a request that finds no
    /// room for 2 s is answered busy.
    pub max_inflight_bytes: usize,
    /// Print one line per connection event on stderr.
    pub verbose: bool,
}

impl Settings {
    /// The default settings with the given token.
    pub fn new(token: impl Into<String>) -> Self {
        Settings {
            token: token.into(),
            transport: Transport::Plaintext,
            frame_limit: protocol::MAX_FRAME,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
            max_per_peer: DEFAULT_MAX_PER_PEER,
            peer_rate: DEFAULT_PEER_RATE,
            peer_burst: DEFAULT_PEER_BURST,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            verbose: false,
        }
    }

    /// Checks the token, that every cap, rate and timeout is positive, and that a frame of
    /// the frame limit fits the bound on memory in flight.
    pub fn validate(&self) -> Result<(), NetError> {
        validate_token(&self.token).map_err(NetError::Token)?;
        if self.max_connections == 0
            || self.max_pending == 0
            || self.max_per_peer == 0
            || self.peer_burst == 0
        {
            return Err(NetError::Setting(
                "the connection caps and the burst must be at least 1".into(),
            ));
        }
        if self.idle_timeout.is_zero() || self.auth_timeout.is_zero() {
            return Err(NetError::Setting(
                "the idle and authentication timeouts must be positive".into(),
            ));
        }
        if !(self.peer_rate.is_finite() && self.peer_rate > 0.0) {
            return Err(NetError::Setting(format!(
                "the request rate per address must be a positive number, not {}",
                self.peer_rate
            )));
        }
        let frame = self.frame_limit.clamp(1, protocol::MAX_FRAME);
        if self.max_inflight_bytes < frame {
            return Err(NetError::Setting(format!(
                "the bound on request bytes in flight ({}) must be at least the frame limit \
                 ({frame} bytes)",
                self.max_inflight_bytes
            )));
        }
        Ok(())
    }
}

/// Checks that a token is usable: 1 to [`MAX_TOKEN_LEN`] printable ASCII characters, no spaces.
pub fn validate_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("the token is longer than {MAX_TOKEN_LEN} bytes"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// A fresh random token: 32 bytes from the operating system, in hex.
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
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

/// The connections' books: who is waiting to authenticate, who is served, and each peer's
/// connections and request budget. Every update is one short call under one lock, never
/// held across an `await`.
struct Books {
    next_id: u64,
    /// Every open connection task, by id.
    conns: HashMap<u64, Entry>,
    /// Connections waiting to authenticate, oldest (smallest id) first.
    pending: BTreeMap<u64, Arc<Notify>>,
    /// Authenticated connections.
    active: usize,
    /// Per IP address: its connections, its waiting ones and its request budget.
    peers: HashMap<IpAddr, Peer>,
}

/// One connection in the books.
struct Entry {
    ip: IpAddr,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to authenticate (in `pending`).
    Pending,
    /// Authenticated (counted in `active`).
    Active,
    /// Authenticated its token but found no free slot; closing.
    Closing,
    /// Closed to make room; no longer counted anywhere.
    Evicted,
}

/// One IP address's share.
struct Peer {
    /// Its connections counted against [`Settings::max_per_peer`].
    connections: usize,
    /// Its connections waiting to authenticate, oldest first.
    pending: BTreeSet<u64>,
    bucket: Bucket,
}

/// A token bucket: `rate` requests a second on average, `burst` at once.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: u32) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(f64::from(burst));
        self.at = now;
    }

    fn take(&mut self, now: Instant, rate: f64, burst: u32) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What [`Books::admit`] decided for a new connection.
enum Admission {
    /// Served: its id and the signal that evicts it.
    Admitted(u64, Arc<Notify>),
    /// Answered busy with this message and closed.
    TurnAway(&'static str),
}

/// A connection closed to make room: its address, its signal and why.
struct Eviction {
    ip: IpAddr,
    signal: Arc<Notify>,
    reason: &'static str,
}

/// What [`Books::promote`] found.
enum Promotion {
    /// The connection now holds an authenticated slot.
    Admitted,
    /// Every authenticated slot is taken.
    Busy,
    /// The connection was evicted meanwhile.
    Evicted,
}

impl Books {
    fn new() -> Self {
        Books {
            next_id: 0,
            conns: HashMap::new(),
            pending: BTreeMap::new(),
            active: 0,
            peers: HashMap::new(),
        }
    }

    /// Takes the waiting connection `id` out of the queues (its peer's count included).
    fn evict(&mut self, id: u64, reason: &'static str) -> Option<Eviction> {
        let signal = self.pending.remove(&id)?;
        let e = self.conns.get_mut(&id)?;
        e.state = State::Evicted;
        let ip = e.ip;
        if let Some(p) = self.peers.get_mut(&ip) {
            p.pending.remove(&id);
            p.connections = p.connections.saturating_sub(1);
        }
        Some(Eviction { ip, signal, reason })
    }

    /// Admits a new connection from `ip`, closing waiting ones to make room: the peer's own
    /// oldest when the peer is at its cap, the oldest of all when the queue is full.
    fn admit(&mut self, ip: IpAddr, st: &Settings, now: Instant) -> (Admission, Vec<Eviction>) {
        let mut evicted = Vec::new();
        if self.active >= st.max_connections {
            return (Admission::TurnAway(BUSY), evicted);
        }
        let peer = self.peers.entry(ip).or_insert_with(|| Peer {
            connections: 0,
            pending: BTreeSet::new(),
            bucket: Bucket::full(st.peer_burst, now),
        });
        if peer.connections >= st.max_per_peer {
            let Some(&oldest) = peer.pending.first() else {
                return (Admission::TurnAway(PEER_BUSY), evicted);
            };
            evicted.extend(self.evict(
                oldest,
                "closed to make room for a newer connection from the same address before \
                 authenticating",
            ));
        }
        if self.pending.len() >= st.max_pending {
            if let Some((&oldest, _)) = self.pending.first_key_value() {
                evicted.extend(self.evict(
                    oldest,
                    "closed to make room for a newer connection before authenticating",
                ));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let signal = Arc::new(Notify::new());
        self.pending.insert(id, signal.clone());
        self.conns.insert(
            id,
            Entry {
                ip,
                state: State::Pending,
            },
        );
        if let Some(p) = self.peers.get_mut(&ip) {
            p.connections += 1;
            p.pending.insert(id);
        }
        (Admission::Admitted(id, signal), evicted)
    }

    /// Moves connection `id` from the waiting queue to an authenticated slot.
    fn promote(&mut self, id: u64, max_connections: usize) -> Promotion {
        let Some(e) = self.conns.get_mut(&id) else {
            return Promotion::Evicted;
        };
        if e.state != State::Pending {
            return Promotion::Evicted;
        }
        let ip = e.ip;
        self.pending.remove(&id);
        if let Some(p) = self.peers.get_mut(&ip) {
            p.pending.remove(&id);
        }
        if self.active >= max_connections {
            e.state = State::Closing;
            return Promotion::Busy;
        }
        e.state = State::Active;
        self.active += 1;
        Promotion::Admitted
    }

    /// Takes one request from `ip`'s budget; `false` when it is spent.
    fn take_request(&mut self, ip: IpAddr, st: &Settings, now: Instant) -> bool {
        match self.peers.get_mut(&ip) {
            Some(p) => p.bucket.take(now, st.peer_rate, st.peer_burst),
            None => true,
        }
    }

    /// Forgets connection `id` (its task ended).
    fn release(&mut self, id: u64) {
        let Some(e) = self.conns.remove(&id) else {
            return;
        };
        match e.state {
            State::Evicted => return,
            State::Pending => {
                self.pending.remove(&id);
            }
            State::Active => self.active = self.active.saturating_sub(1),
            State::Closing => {}
        }
        if let Some(p) = self.peers.get_mut(&e.ip) {
            p.pending.remove(&id);
            p.connections = p.connections.saturating_sub(1);
        }
    }

    /// Forgets the peers with no connection and a full budget (they lose nothing).
    fn prune(&mut self, st: &Settings, now: Instant) {
        self.peers.retain(|_, p| {
            p.bucket.refill(now, st.peer_rate, st.peer_burst);
            p.connections > 0 || p.bucket.tokens < f64::from(st.peer_burst)
        });
    }
}

/// State shared by the accept loop and the connection tasks.
struct Shared<S: Service> {
    service: S,
    token: TokenCheck,
    settings: Settings,
    books: Mutex<Books>,
    /// Request bytes being read or held, in permits of one byte.
    inflight: Arc<Semaphore>,
    /// Tasks answering connections turned away.
    turning_away: Arc<Semaphore>,
    /// Set at shutdown: every connection task ends at its next step.
    stop: watch::Sender<bool>,
}

impl<S: Service> Shared<S> {
    fn verbose(&self) -> bool {
        self.settings.verbose
    }
}

/// Locks a mutex, ignoring poisoning (the server's books and the prediction service's queue
/// stay consistent: every update is one call).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running server (see [`spawn`]). Dropping it shuts the server down.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes open connections and waits for the server to end.
    pub fn shutdown(mut self) -> Result<(), NetError> {
        self.stop()
    }

    /// Waits for the server to stop (it runs until [`ServerHandle::shutdown`] is called from
    /// elsewhere, so in practice: forever).
    pub fn wait(mut self) -> Result<(), NetError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| NetError::Panicked),
            None => Ok(()),
        }
    }

    fn stop(&mut self) -> Result<(), NetError> {
        self.shutdown.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| NetError::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn listen_err(addr: &str, source: std::io::Error) -> NetError {
    NetError::Io {
        addr: addr.to_string(),
        source,
    }
}

/// A server ready to run: its runtime, its listener and its shared state.
struct Prepared<S: Service> {
    runtime: Runtime,
    listener: tokio::net::TcpListener,
    shared: Arc<Shared<S>>,
    addr: SocketAddr,
}

fn prepare<S: Service>(
    listener: TcpListener,
    service: S,
    settings: Settings,
) -> Result<Prepared<S>, NetError> {
    settings.validate()?;
    let addr = listener
        .local_addr()
        .map_err(|e| listen_err("the listener", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| listen_err(&addr.to_string(), e))?;
    // A longer queue of connections not yet accepted than the standard library's: bursts of
    // new connections wait there rather than have their first packet dropped (and resent a
    // second later). Listening again on a listening socket only changes the queue's length;
    // where that fails, the queue stays as it was.
    let _ = socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG);
    let settings = Settings {
        frame_limit: settings.frame_limit.clamp(1, protocol::MAX_FRAME),
        ..settings
    };
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, MAX_WORKERS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(format!("{}-net", S::ROLE))
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| listen_err(&addr.to_string(), e))?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|e| listen_err(&addr.to_string(), e))?
    };
    let inflight = settings.max_inflight_bytes.min(Semaphore::MAX_PERMITS);
    let (stop, _) = watch::channel(false);
    Ok(Prepared {
        runtime,
        listener,
        shared: Arc::new(Shared {
            service,
            token: TokenCheck::new(&settings.token),
            settings,
            books: Mutex::new(Books::new()),
            inflight: Arc::new(Semaphore::new(inflight)),
            turning_away: Arc::new(Semaphore::new(MAX_TURNING_AWAY)),
            stop,
        }),
        addr,
    })
}

impl<S: Service> Prepared<S> {
    /// Serves until `shutdown` is set, then closes the connections and calls
    /// [`Service::close`].
    fn run(self, shutdown: Arc<AtomicBool>) {
        let Prepared {
            runtime,
            listener,
            shared,
            ..
        } = self;
        runtime.block_on(accept_loop(listener, shared.clone(), shutdown));
        // Key derivations still running finish (their connections are closed already).
        runtime.shutdown_timeout(SHUTDOWN_GRACE);
        shared.service.close();
    }
}

/// Serves on `listener` until `shutdown` is set (checked every 10 ms), then closes the open
/// connections, calls [`Service::close`] and returns. Fails only at start (bad settings).
pub fn serve<S: Service>(
    listener: TcpListener,
    service: S,
    settings: Settings,
    shutdown: Arc<AtomicBool>,
) -> Result<(), NetError> {
    prepare(listener, service, settings)?.run(shutdown);
    Ok(())
}

/// Starts serving on `listener` in a background thread (bind `127.0.0.1:0` for an ephemeral
/// port and read it back with [`ServerHandle::local_addr`]).
pub fn spawn<S: Service>(
    listener: TcpListener,
    service: S,
    settings: Settings,
) -> Result<ServerHandle, NetError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let prepared = prepare(listener, service, settings)?;
    let addr = prepared.addr;
    let flag = shutdown.clone();
    let thread = std::thread::Builder::new()
        .name(format!("{}-accept", S::ROLE))
        .spawn(move || prepared.run(flag))
        .map_err(|e| listen_err(&addr.to_string(), e))?;
    Ok(ServerHandle {
        addr,
        shutdown,
        thread: Some(thread),
    })
}

async fn accept_loop<S: Service>(
    listener: tokio::net::TcpListener,
    sh: Arc<Shared<S>>,
    shutdown: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => admit(&sh, tcp, peer),
                Err(e) => {
                    // Out of file descriptors and the like: wait and retry rather than die.
                    if sh.verbose() {
                        eprintln!("{}: accept failed: {e}", S::ROLE);
                    }
                    if e.kind() != ErrorKind::Interrupted {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            _ = tick.tick() => {
                sh.service.tick();
                if pruned.elapsed() >= PRUNE_EVERY {
                    pruned = Instant::now();
                    lock(&sh.books).prune(&sh.settings, pruned);
                }
            }
        }
    }
    drop(listener);
    sh.stop.send_replace(true);
    // Every connection task ends at its next step; wait (briefly) until they have.
    let end = Instant::now() + SHUTDOWN_GRACE;
    while !lock(&sh.books).conns.is_empty() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn admit<S: Service>(sh: &Arc<Shared<S>>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    let (admission, evicted) = lock(&sh.books).admit(ip, &sh.settings, Instant::now());
    for e in evicted {
        // The oldest waiting connection makes room: idle connections cannot hold every
        // slot, and a caller that sends its token at once is never the oldest for long.
        e.signal.notify_one();
        sh.service
            .failure(&e.ip.to_string(), Failure::Evicted, e.reason);
    }
    match admission {
        Admission::Admitted(id, evict) => {
            tokio::spawn(connection(sh.clone(), id, evict, tcp, peer));
        }
        Admission::TurnAway(message) => {
            if sh.verbose() {
                eprintln!("{}: {peer}: refused: {message}", S::ROLE);
            }
            sh.service.failure(&ip.to_string(), Failure::Busy, message);
            turn_away(sh, tcp, message);
        }
    }
}

/// Answers a connection turned away with the busy answer (under TLS after the handshake),
/// from a short task: at most [`MAX_TURNING_AWAY`] at once, beyond that the connection is
/// just closed.
fn turn_away<S: Service>(sh: &Arc<Shared<S>>, tcp: TcpStream, message: &'static str) {
    let Ok(permit) = sh.turning_away.clone().try_acquire_owned() else {
        return;
    };
    let sh = sh.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut stop = sh.stop.subscribe();
        let bytes = encode(&S::busy(message.into()));
        let answer = async {
            match &sh.settings.transport {
                Transport::Plaintext => {
                    let mut tcp = tcp;
                    if write_all(&mut tcp, &bytes, ANSWER_TIMEOUT).await {
                        linger(&mut tcp).await;
                    }
                }
                Transport::Tls(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        if write_all(&mut tls, &bytes, ANSWER_TIMEOUT).await {
                            linger(&mut tls).await;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = tokio::time::timeout(TURN_AWAY_TIME, answer) => {}
        }
    });
}

/// Takes a connection out of the books when its task ends, however it ends.
struct Guard<'a> {
    books: &'a Mutex<Books>,
    id: u64,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        lock(self.books).release(self.id);
    }
}

/// One connection's task: ends when the connection does, when it is evicted (before it
/// authenticated) or when the server stops, closing the socket in every case.
async fn connection<S: Service>(
    sh: Arc<Shared<S>>,
    id: u64,
    evict: Arc<Notify>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let _guard = Guard {
        books: &sh.books,
        id,
    };
    let mut stop = sh.stop.subscribe();
    let mut conn = Conn {
        sh: sh.clone(),
        id,
        peer: peer.to_string(),
        ip: peer.ip().to_canonical(),
        authenticated: false,
        deadline: tokio::time::Instant::now() + sh.settings.auth_timeout,
    };
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => {}
        // Counted by whoever evicted it.
        _ = evict.notified() => {}
        _ = conn.run(tcp) => {}
    }
}

/// Encodes a frame, or nothing if it cannot be (an answer over the frame limit is turned
/// into an error by [`respond_bytes`] before it gets here).
fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    match protocol::write_frame(&mut out, msg) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// Writes `bytes` within `limit`; `false` if that failed.
async fn write_all<T: AsyncWrite + Unpin>(io: &mut T, bytes: &[u8], limit: Duration) -> bool {
    if bytes.is_empty() {
        return false;
    }
    let write = async {
        io.write_all(bytes).await?;
        io.flush().await
    };
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

/// Half-closes, then reads and drops what the caller still sends, for a moment: the caller
/// then reads the answer written before rather than a reset.
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T) {
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, io.shutdown()).await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Why bytes expected from the caller did not come.
enum ReadError {
    /// The deadline or the idle timeout passed.
    Timeout,
    /// The connection was closed or broke.
    Closed,
}

/// Fills `buf`, each read waiting at most `idle` and none going past `deadline`.
async fn fill<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut [u8],
    deadline: Option<tokio::time::Instant>,
    idle: Duration,
) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        let mut until = tokio::time::Instant::now() + idle;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        match tokio::time::timeout_at(until, io.read(&mut buf[filled..])).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadError::Closed),
            Ok(Ok(n)) => filled += n,
        }
    }
    Ok(())
}

/// Reads a frame body of `len` bytes into a buffer that grows with the bytes received.
async fn read_body<T: AsyncRead + Unpin>(
    io: &mut T,
    len: usize,
    idle: Duration,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::with_capacity(len.min(FRAME_CHUNK));
    while body.len() < len {
        let want = (len - body.len()).min(FRAME_CHUNK);
        let start = body.len();
        body.resize(start + want, 0);
        fill(io, &mut body[start..], None, idle).await?;
    }
    Ok(body)
}

/// Reads and drops `len` bytes (a request answered busy without being held).
async fn discard<T: AsyncRead + Unpin>(
    io: &mut T,
    len: usize,
    idle: Duration,
) -> Result<(), ReadError> {
    let mut buf = vec![0u8; len.min(DISCARD_CHUNK)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        fill(io, &mut buf[..n], None, idle).await?;
        left -= n;
    }
    Ok(())
}

/// What the blocking pool made of a request.
enum Answer {
    /// The encoded response frame.
    Frame(Vec<u8>),
    /// The request did not decode.
    Malformed(String),
}

/// Decodes a request, answers it and encodes the answer: CPU work, run on the blocking pool
/// (key derivation itself spreads over every core).
fn respond_bytes<S: Service>(sh: &Shared<S>, peer: &str, body: Vec<u8>) -> Answer {
    let request: S::Request = match protocol::decode(&body) {
        Ok(r) => r,
        Err(e) => return Answer::Malformed(e.to_string()),
    };
    drop(body);
    let response = sh.service.respond(peer, request);
    let mut out = Vec::new();
    match protocol::write_frame(&mut out, &response) {
        Ok(()) => Answer::Frame(out),
        Err(ProtocolError::FrameTooLarge(n)) => Answer::Frame(encode(&S::error(format!(
            "the answer ({n} bytes) exceeds the frame limit; ask for less at once"
        )))),
        Err(_) => Answer::Frame(Vec::new()),
    }
}

/// Why a request's header was not read.
enum HeaderError {
    Read(ReadError),
    Protocol(ProtocolError),
}

/// One connection: its peer, whether it authenticated, and the deadline to do so.
struct Conn<S: Service> {
    sh: Arc<Shared<S>>,
    id: u64,
    peer: String,
    ip: IpAddr,
    authenticated: bool,
    deadline: tokio::time::Instant,
}

impl<S: Service> Conn<S> {
    fn idle(&self) -> Duration {
        self.sh.settings.idle_timeout
    }

    /// Reports a failure before authentication.
    fn report(&self, what: Failure, reason: &str) {
        self.sh.service.failure(&self.ip.to_string(), what, reason);
        if self.sh.verbose() {
            eprintln!("{}: {}: {}: {reason}", S::ROLE, self.peer, what.as_str());
        }
    }

    /// Sends one answer frame; `false` if the connection failed.
    async fn send<T: AsyncWrite + Unpin>(&self, io: &mut T, frame: Vec<u8>) -> bool {
        write_all(io, &frame, self.idle()).await
    }

    /// Reports a failure, answers it with the service's error and closes. Before
    /// authentication, failures are counted and summarised (the network may send any amount
    /// of garbage); after it, each is reported on its own.
    async fn fail<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut T,
        what: Failure,
        reason: String,
    ) {
        if self.authenticated {
            self.sh.service.connection_error(&self.peer, &reason);
        } else {
            self.sh.service.failure(&self.ip.to_string(), what, &reason);
        }
        if self.sh.verbose() {
            eprintln!("{}: {}: error: {reason}", S::ROLE, self.peer);
        }
        let frame = encode(&S::error(reason));
        if write_all(io, &frame, ANSWER_TIMEOUT).await {
            linger(io).await;
        }
    }

    async fn run(&mut self, tcp: TcpStream) {
        match self.sh.settings.transport.clone() {
            Transport::Plaintext => {
                // Nothing is allocated for a connection until its first byte arrives (a
                // timeout or a close is found by the header's read just after).
                let mut first = [0u8; 1];
                let _ = tokio::time::timeout_at(self.deadline, tcp.peek(&mut first)).await;
                self.serve(BufReader::with_capacity(READ_BUFFER, tcp)).await;
            }
            Transport::Tls(config) => {
                if let Some(tls) = self.start_tls(tcp, config).await {
                    self.serve(tls).await;
                }
            }
        }
    }

    /// Starts TLS: tells a clear-text caller what is wrong, then completes the handshake
    /// within the deadline to authenticate. `None` when the connection ends here (the
    /// failure reported).
    async fn start_tls(
        &self,
        mut tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let timeout_msg = || {
            format!(
                "no TLS handshake within {:.1} s; closing the connection",
                self.sh.settings.auth_timeout.as_secs_f64()
            )
        };
        // The first byte tells a TLS caller from a clear-text one.
        let mut first = [0u8; 2];
        match tokio::time::timeout_at(self.deadline, tcp.peek(&mut first)).await {
            Err(_) => {
                self.report(Failure::Timeout, &timeout_msg());
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.report(Failure::Closed, "closed before authenticating");
                return None;
            }
            Ok(Ok(n)) if !crate::tls::looks_like_tls(&first[..n]) => {
                let msg = format!(
                    "this {} speaks TLS and got clear text: connect with TLS (give its \
                     certificate with --ca), or run both sides with --insecure-plaintext",
                    S::ROLE
                );
                self.report(Failure::Handshake, &msg);
                let frame = encode(&S::error(msg));
                if write_all(&mut tcp, &frame, ANSWER_TIMEOUT).await {
                    linger(&mut tcp).await;
                }
                return None;
            }
            Ok(Ok(_)) => {}
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match tokio::time::timeout_at(self.deadline, acceptor.accept(tcp)).await {
            Err(_) => {
                self.report(Failure::Timeout, &timeout_msg());
                None
            }
            Ok(Err(e)) if e.kind() == ErrorKind::InvalidData => {
                self.report(Failure::Handshake, &format!("TLS handshake failed: {e}"));
                None
            }
            Ok(Err(_)) => {
                self.report(Failure::Closed, "closed during the TLS handshake");
                None
            }
            Ok(Ok(tls)) => Some(tls),
        }
    }

    /// Reads a request's header (at most [`protocol::MAX_HEADER`] bytes, before anything
    /// else), within the deadline to authenticate if the connection has not yet.
    async fn header<T: AsyncRead + Unpin>(
        &self,
        io: &mut T,
    ) -> Result<protocol::RequestHeader, HeaderError> {
        let deadline = (!self.authenticated).then_some(self.deadline);
        let mut len = [0u8; 4];
        fill(io, &mut len, deadline, self.idle())
            .await
            .map_err(HeaderError::Read)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > protocol::MAX_HEADER {
            return Err(HeaderError::Protocol(ProtocolError::FrameTooLarge(len)));
        }
        let mut body = vec![0u8; len];
        fill(io, &mut body, deadline, self.idle())
            .await
            .map_err(HeaderError::Read)?;
        protocol::decode_request_header(&body).map_err(HeaderError::Protocol)
    }

    /// Handles a header that could not be read: a timeout, a closed connection or garbage.
    async fn header_error<T: AsyncRead + AsyncWrite + Unpin>(&self, io: &mut T, e: HeaderError) {
        let e = match e {
            HeaderError::Read(ReadError::Timeout) => {
                if self.authenticated {
                    if self.sh.verbose() {
                        eprintln!("{}: {}: idle, closing the connection", S::ROLE, self.peer);
                    }
                } else {
                    let msg = format!(
                        "no authenticated request within {:.1} s; closing the connection",
                        self.sh.settings.auth_timeout.as_secs_f64()
                    );
                    self.fail(io, Failure::Timeout, msg).await;
                }
                return;
            }
            HeaderError::Read(ReadError::Closed) => {
                // The caller closed the connection (or it broke): nothing to answer.
                if !self.authenticated {
                    self.sh.service.failure(
                        &self.ip.to_string(),
                        Failure::Closed,
                        "closed before authenticating",
                    );
                }
                return;
            }
            HeaderError::Protocol(e) => e,
        };
        let (what, msg) = match e {
            ProtocolError::FrameTooLarge(n)
                if crate::tls::looks_like_tls(&u32::try_from(n).unwrap_or(0).to_be_bytes()) =>
            {
                (
                    Failure::Handshake,
                    format!(
                        "this {} speaks clear-text TCP (--insecure-plaintext) and got a TLS \
                         handshake: connect with --insecure-plaintext too, or serve with TLS",
                        S::ROLE
                    ),
                )
            }
            ProtocolError::FrameTooLarge(n) => (
                Failure::Oversized,
                format!(
                    "request header of {n} bytes exceeds the limit of {} bytes \
                     (protocol version {PROTOCOL_VERSION} sends a small header first)",
                    protocol::MAX_HEADER
                ),
            ),
            ProtocolError::Version(v) => (
                Failure::Version,
                format!(
                    "protocol version {v} is not supported (this {} speaks version \
                     {PROTOCOL_VERSION})",
                    S::ROLE
                ),
            ),
            other => (Failure::Malformed, other.to_string()),
        };
        self.fail(io, what, msg).await;
    }

    /// Checks a header's token and, on the first request, takes an authenticated slot.
    /// `false` when the connection ends here (anything to say was said).
    async fn authenticate<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut T,
        header: &protocol::RequestHeader,
    ) -> bool {
        if !self.sh.token.matches(&header.token) {
            let msg = "authentication failed";
            // A wrong token is a failure before authentication even on a connection that
            // authenticated before: it proves nothing about the sender.
            self.sh
                .service
                .failure(&self.ip.to_string(), Failure::Auth, msg);
            if self.sh.verbose() {
                eprintln!("{}: {}: refused: {msg}", S::ROLE, self.peer);
            }
            let frame = encode(&S::refused(msg.into()));
            if self.send(io, frame).await {
                linger(io).await;
            }
            return false;
        }
        if self.authenticated {
            return true;
        }
        let promotion = lock(&self.sh.books).promote(self.id, self.sh.settings.max_connections);
        match promotion {
            Promotion::Admitted => {
                self.authenticated = true;
                true
            }
            Promotion::Busy => {
                if self.sh.verbose() {
                    eprintln!("{}: {}: refused, too many connections", S::ROLE, self.peer);
                }
                let frame = encode(&S::busy(BUSY.into()));
                if self.send(io, frame).await {
                    linger(io).await;
                }
                false
            }
            Promotion::Evicted => false,
        }
    }

    /// Answers a request busy without holding it: its bytes are read and dropped, the
    /// connection stays open. `false` if the connection failed.
    async fn busy<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut T,
        len: usize,
        message: String,
    ) -> bool {
        if self.sh.verbose() {
            eprintln!("{}: {}: busy: {message}", S::ROLE, self.peer);
        }
        let frame = encode(&S::busy(message));
        discard(io, len, self.idle()).await.is_ok() && self.send(io, frame).await
    }

    /// Serves requests until the connection ends.
    /// Notes (when verbose) a caller that stopped sending inside a request; the connection
    /// is then closed.
    fn stalled(&self) {
        if self.sh.verbose() {
            eprintln!(
                "{}: {}: stalled inside a request, closing",
                S::ROLE,
                self.peer
            );
        }
    }

    async fn serve<T: AsyncRead + AsyncWrite + Unpin>(&mut self, mut io: T) {
        let limit = self.sh.settings.frame_limit;
        loop {
            // The header: at most MAX_HEADER bytes, checked before anything else is read.
            let header = match self.header(&mut io).await {
                Ok(h) => h,
                Err(e) => return self.header_error(&mut io, e).await,
            };
            if !self.authenticate(&mut io, &header).await {
                return;
            }
            // Authenticated: the request's length, up to the frame limit.
            let mut len = [0u8; 4];
            if fill(&mut io, &mut len, None, self.idle()).await.is_err() {
                return self.stalled();
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > limit {
                let msg = format!("frame of {len} bytes exceeds the limit of {limit} bytes");
                return self.fail(&mut io, Failure::Oversized, msg).await;
            }
            let st = &self.sh.settings;
            if !lock(&self.sh.books).take_request(self.ip, st, Instant::now()) {
                let msg = format!(
                    "too many requests from this address (more than {} a second, {} at \
                     once); try again later",
                    st.peer_rate, st.peer_burst
                );
                if self.busy(&mut io, len, msg).await {
                    continue;
                }
                return;
            }
            // The request's bytes count against the bound on memory in flight until its
            // answer is sent; a request that finds no room within a moment is answered busy.
            let permits = u32::try_from(len.max(1)).unwrap_or(u32::MAX);
            let wait = self.idle().min(INFLIGHT_WAIT);
            let acquire = self.sh.inflight.clone().acquire_many_owned(permits);
            let permit = match tokio::time::timeout(wait, acquire).await {
                Ok(Ok(p)) => p,
                _ => {
                    let msg = format!(
                        "too many request bytes in progress (at most {} bytes at once); try \
                         again later",
                        st.max_inflight_bytes
                    );
                    if self.busy(&mut io, len, msg).await {
                        continue;
                    }
                    return;
                }
            };
            let body = match read_body(&mut io, len, self.idle()).await {
                Ok(b) => b,
                Err(_) => return self.stalled(),
            };
            let (sh, peer) = (self.sh.clone(), self.peer.clone());
            let answer = tokio::task::spawn_blocking(move || respond_bytes(&sh, &peer, body)).await;
            match answer {
                Ok(Answer::Frame(bytes)) => {
                    if !write_all(&mut io, &bytes, self.idle()).await {
                        return;
                    }
                }
                Ok(Answer::Malformed(msg)) => {
                    return self.fail(&mut io, Failure::Malformed, msg).await;
                }
                // The service panicked: close the connection.
                Err(_) => return,
            }
            drop(permit);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::{Read, Write};
    use std::sync::Condvar;

    const TOKEN: &str = "net-test-token";

    /// What the test service answers.
    #[derive(Debug, Serialize, Deserialize)]
    enum Reply {
        Len(usize),
        Refused(String),
        Error(String),
        Busy(String),
    }

    /// Counts the requests answered at once; holds them while the gate is closed.
    #[derive(Default)]
    struct Stats {
        now: AtomicUsize,
        most: AtomicUsize,
        gate: Mutex<bool>,
        opened: Condvar,
    }

    impl Stats {
        fn open(&self) {
            *lock(&self.gate) = true;
            self.opened.notify_all();
        }
    }

    use std::sync::atomic::AtomicUsize;

    struct Echo(Arc<Stats>);

    impl Service for Echo {
        type Request = Vec<u8>;
        type Response = Reply;
        const ROLE: &'static str = "test service";

        fn respond(&self, _peer: &str, request: Vec<u8>) -> Reply {
            let st = &self.0;
            let n = st.now.fetch_add(1, Ordering::SeqCst) + 1;
            st.most.fetch_max(n, Ordering::SeqCst);
            let open = lock(&st.gate);
            let _open = st
                .opened
                .wait_timeout_while(open, Duration::from_secs(20), |o| !*o)
                .unwrap_or_else(|e| e.into_inner());
            st.now.fetch_sub(1, Ordering::SeqCst);
            Reply::Len(request.len())
        }
        fn refused(m: String) -> Reply {
            Reply::Refused(m)
        }
        fn error(m: String) -> Reply {
            Reply::Error(m)
        }
        fn busy(m: String) -> Reply {
            Reply::Busy(m)
        }
    }

    /// A server of [`Echo`] with `tweak`ed settings, its gate open.
    fn start(tweak: impl FnOnce(&mut Settings)) -> (ServerHandle, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        stats.open();
        let mut settings = Settings::new(TOKEN);
        tweak(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let h = spawn(listener, Echo(stats.clone()), settings).unwrap();
        (h, stats)
    }

    fn connect(h: &ServerHandle) -> std::net::TcpStream {
        let t = std::net::TcpStream::connect(h.local_addr()).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        t
    }

    fn ask(t: &mut std::net::TcpStream, len: usize) -> Reply {
        protocol::write_request(t, TOKEN, &vec![7u8; len]).unwrap();
        protocol::read_frame(t).unwrap()
    }

    /// Whether the server closed `t` (end of file or reset) within its read timeout.
    fn closed(t: &mut std::net::TcpStream) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match t.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == ErrorKind::ConnectionReset,
            }
        }
    }

    #[test]
    fn settings_are_checked() {
        let ok = Settings::new(TOKEN);
        ok.validate().unwrap();
        for bad in [
            Settings {
                max_per_peer: 0,
                ..ok.clone()
            },
            Settings {
                peer_burst: 0,
                ..ok.clone()
            },
            Settings {
                peer_rate: 0.0,
                ..ok.clone()
            },
            Settings {
                peer_rate: f64::NAN,
                ..ok.clone()
            },
            Settings {
                max_inflight_bytes: (1 << 20) - 1,
                frame_limit: 1 << 20,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn connections_per_address_are_capped() {
        let (h, _) = start(|s| s.max_per_peer = 3);
        // Three waiting connections from this address, then a fourth that authenticates:
        // the address's oldest waiting connection makes room.
        let mut idle: Vec<_> = (0..3).map(|_| connect(&h)).collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut a = connect(&h);
        assert!(matches!(ask(&mut a, 1), Reply::Len(1)));
        assert!(
            closed(&mut idle[0]),
            "the oldest waiting connection stays open"
        );
        // Three authenticated connections hold the address's share: a fourth is told so.
        drop(idle);
        let mut b = connect(&h);
        let mut c = connect(&h);
        assert!(matches!(ask(&mut b, 2), Reply::Len(2)));
        assert!(matches!(ask(&mut c, 3), Reply::Len(3)));
        let mut d = connect(&h);
        match ask(&mut d, 4) {
            Reply::Busy(m) => assert!(m.contains("from this address"), "{m}"),
            other => panic!("expected busy, got {other:?}"),
        }
        // The served connections go on; a slot frees when one leaves.
        assert!(matches!(ask(&mut a, 5), Reply::Len(5)));
        drop(a);
        let mut served = false;
        for _ in 0..100 {
            let mut e = connect(&h);
            if let Reply::Len(6) = ask(&mut e, 6) {
                served = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(served, "no slot freed after a connection left");
        h.shutdown().unwrap();
    }

    #[test]
    fn request_rate_is_answered_busy_and_recovers() {
        let (h, _) = start(|s| {
            s.peer_rate = 5.0;
            s.peer_burst = 2;
        });
        let mut t = connect(&h);
        assert!(matches!(ask(&mut t, 1), Reply::Len(1)));
        assert!(matches!(ask(&mut t, 2), Reply::Len(2)));
        match ask(&mut t, 3) {
            Reply::Busy(m) => assert!(m.contains("too many requests"), "{m}"),
            other => panic!("expected busy, got {other:?}"),
        }
        // The budget is the address's, not the connection's.
        let mut u = connect(&h);
        assert!(matches!(ask(&mut u, 4), Reply::Busy(_)));
        // The connection stays open and is served again once the bucket refills.
        std::thread::sleep(Duration::from_millis(300));
        assert!(matches!(ask(&mut t, 5), Reply::Len(5)));
        h.shutdown().unwrap();
    }

    #[test]
    fn memory_in_flight_is_bounded() {
        let stats = Arc::new(Stats::default());
        let settings = Settings {
            max_inflight_bytes: 1 << 20,
            frame_limit: 1 << 20,
            ..Settings::new(TOKEN)
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let h = spawn(listener, Echo(stats.clone()), settings).unwrap();
        // Four requests of 400 KiB at once with room for two: two are held (their answers
        // wait behind the closed gate), two are answered busy without being held.
        let len = 400 << 10;
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let mut t = connect(&h);
                std::thread::spawn(move || {
                    let r = ask(&mut t, len);
                    (r, t)
                })
            })
            .collect();
        let start = Instant::now();
        while stats.now.load(Ordering::SeqCst) < 2 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Past the wait for room, the two others are answered; then the gate opens.
        std::thread::sleep(INFLIGHT_WAIT + Duration::from_millis(500));
        assert_eq!(stats.now.load(Ordering::SeqCst), 2);
        stats.open();
        let replies: Vec<Reply> = callers.into_iter().map(|c| c.join().unwrap().0).collect();
        let served = replies
            .iter()
            .filter(|r| matches!(r, Reply::Len(n) if *n == len))
            .count();
        let busy = replies
            .iter()
            .filter(|r| matches!(r, Reply::Busy(m) if m.contains("in progress")))
            .count();
        assert_eq!((served, busy), (2, 2), "{replies:?}");
        assert_eq!(stats.most.load(Ordering::SeqCst), 2);
        // Room again for the next ones.
        let mut t = connect(&h);
        assert!(matches!(ask(&mut t, len), Reply::Len(n) if n == len));
        h.shutdown().unwrap();
    }

    /// The resident memory of this process, in KiB (Linux).
    fn rss_kib() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn thousands_of_idle_connections_cost_little() {
        let (h, _) = start(|s| {
            s.max_per_peer = 10_000;
            s.auth_timeout = Duration::from_secs(60);
        });
        let before = rss_kib().unwrap_or(0);
        let mut idle = Vec::new();
        for _ in 0..2000 {
            idle.push(connect(&h));
        }
        // A legitimate caller is served at once while they are held.
        let start = Instant::now();
        let mut t = connect(&h);
        assert!(matches!(ask(&mut t, 10), Reply::Len(10)));
        let took = start.elapsed();
        let grown = rss_kib().unwrap_or(0).saturating_sub(before);
        eprintln!(
            "2000 idle connections: a request answered in {:.1} ms; resident memory grew by \
             {:.1} MiB",
            took.as_secs_f64() * 1e3,
            grown as f64 / 1024.0
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(grown < 128 << 10, "{grown} KiB for 2000 idle connections");
        // They are all still open (none was evicted).
        idle[0].set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(
            idle[0].read(&mut buf),
            Err(e) if e.kind() == ErrorKind::WouldBlock
        ));
        drop(idle);
        h.shutdown().unwrap();
    }

    #[test]
    fn shutdown_closes_open_connections() {
        let (h, _) = start(|_| {});
        let mut a = connect(&h);
        assert!(matches!(ask(&mut a, 1), Reply::Len(1)));
        let mut idle = connect(&h);
        idle.write_all(&[0]).unwrap();
        h.shutdown().unwrap();
        assert!(closed(&mut a));
        assert!(closed(&mut idle));
    }
}
