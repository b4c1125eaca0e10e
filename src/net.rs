//! The network layer of the roles that serve: the authority and the prediction service.
//!
//! A [`Service`] says how to answer one authenticated request; this module does everything
//! else, the same way for both: the accept loop, the [protocol]'s framing, authentication by
//! a bearer token, deadlines, limits and a clean shutdown.
//!
//! Every request starts with a small header (at most [`protocol::MAX_HEADER`] bytes) carrying
//! the token, which is read and compared (in constant time) before the request's length is
//! even read, so an unauthenticated caller makes the server hold no more than a few KiB. A new
//! connection must send that header within [`Settings::auth_timeout`] (default 5 s); at most
//! [`Settings::max_pending`] connections wait to authenticate, and a newer one closes the
//! oldest waiting one, so idle connections cannot lock callers out. Authenticated connections
//! are capped by [`Settings::max_connections`]; beyond it callers get the service's busy
//! answer. A failed authentication is answered with the service's refusal and closes the
//! connection. A frame longer than its limit, a frame that does not decode or a wrong protocol
//! version is answered with the service's error and closes the connection. Idle connections
//! are closed after a timeout. Failures before authentication are reported to
//! [`Service::failure`] (the authority counts and summarises them in its audit log), never
//! answered at length.
//!
//! One thread serves each admitted connection (blocking I/O with timeouts); the caps above
//! bound their number.
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
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use thiserror::Error;

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

/// Most threads answering connections over the cap at once.
const MAX_TURNING_AWAY: usize = 16;
/// How often the accept loop looks at the shutdown flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Bytes buffered by a connection's reader.
const READ_BUFFER: usize = 8 << 10;
/// The message of the busy answer.
const BUSY: &str = "too many connections; try again later";

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
    /// Closed by the server to make room for a newer unauthenticated connection.
    Evicted,
    /// Turned away because every connection slot was taken.
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
    /// The answer when every connection slot is taken.
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
            verbose: false,
        }
    }

    /// Checks the token and that every cap and timeout is positive.
    pub fn validate(&self) -> Result<(), NetError> {
        validate_token(&self.token).map_err(NetError::Token)?;
        if self.max_connections == 0 || self.max_pending == 0 {
            return Err(NetError::Setting(
                "the connection caps must be at least 1".into(),
            ));
        }
        if self.idle_timeout.is_zero() || self.auth_timeout.is_zero() {
            return Err(NetError::Setting(
                "the idle and authentication timeouts must be positive".into(),
            ));
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

/// State shared by the accept loop and the connection threads.
struct Shared<S: Service> {
    service: S,
    token: TokenCheck,
    settings: Settings,
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
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes open connections and waits for the accept loop to end.
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

fn prepare<S: Service>(
    listener: &TcpListener,
    service: S,
    settings: Settings,
    shutdown: Arc<AtomicBool>,
) -> Result<Arc<Shared<S>>, NetError> {
    settings.validate()?;
    let addr = listener
        .local_addr()
        .map_err(|e| listen_err("the listener", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| listen_err(&addr.to_string(), e))?;
    let settings = Settings {
        frame_limit: settings.frame_limit.clamp(1, protocol::MAX_FRAME),
        ..settings
    };
    Ok(Arc::new(Shared {
        service,
        token: TokenCheck::new(&settings.token),
        settings,
        shutdown,
        active: AtomicUsize::new(0),
        pending: Mutex::new(VecDeque::new()),
        turning_away: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        live: Mutex::new(HashMap::new()),
    }))
}

/// Serves on `listener` until `shutdown` is set (checked every 10 ms), then closes the open
/// connections, calls [`Service::close`] and returns. Fails only at start (bad settings).
pub fn serve<S: Service>(
    listener: TcpListener,
    service: S,
    settings: Settings,
    shutdown: Arc<AtomicBool>,
) -> Result<(), NetError> {
    let shared = prepare(&listener, service, settings, shutdown)?;
    accept_loop(&listener, &shared);
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
    let shared = prepare(&listener, service, settings, shutdown.clone())?;
    let addr = listener
        .local_addr()
        .map_err(|e| listen_err("the listener", e))?;
    let thread = std::thread::Builder::new()
        .name(format!("{}-accept", S::ROLE))
        .spawn(move || accept_loop(&listener, &shared))
        .map_err(|e| listen_err(&addr.to_string(), e))?;
    Ok(ServerHandle {
        addr,
        shutdown,
        thread: Some(thread),
    })
}

fn accept_loop<S: Service>(listener: &TcpListener, shared: &Arc<Shared<S>>) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        shared.service.tick();
        match listener.accept() {
            Ok((stream, peer)) => admit(shared, stream, peer),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of file descriptors and the like: wait and retry rather than die.
                if shared.settings.verbose {
                    eprintln!("{}: accept failed: {e}", S::ROLE);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let live = std::mem::take(&mut *lock(&shared.live));
    for s in live.values() {
        let _ = s.shutdown(Shutdown::Both);
    }
    shared.service.close();
}

/// Keeps a connection's books (open connections, unauthenticated queue, authenticated count)
/// and undoes them when its thread ends, however it ends.
struct ConnectionGuard<S: Service> {
    shared: Arc<Shared<S>>,
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

impl<S: Service> ConnectionGuard<S> {
    /// Moves the connection from the unauthenticated queue to an authenticated slot.
    fn promote(&self) -> Promotion {
        {
            let mut pending = lock(&self.shared.pending);
            let Some(i) = pending.iter().position(|p| p.0 == self.id) else {
                return Promotion::Evicted;
            };
            pending.remove(i);
        }
        let max = self.shared.settings.max_connections;
        if self.shared.active.fetch_add(1, Ordering::SeqCst) >= max {
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

impl<S: Service> Drop for ConnectionGuard<S> {
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

fn admit<S: Service>(shared: &Arc<Shared<S>>, stream: TcpStream, peer: SocketAddr) {
    let st = &shared.settings;
    let setup = || -> std::io::Result<TcpStream> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(st.idle_timeout.min(st.auth_timeout)))?;
        stream.set_write_timeout(Some(st.idle_timeout))?;
        stream.try_clone()
    };
    let Ok(control) = setup() else {
        return;
    };
    if shared.active.load(Ordering::SeqCst) >= st.max_connections {
        if st.verbose {
            eprintln!("{}: {peer}: refused, too many connections", S::ROLE);
        }
        shared
            .service
            .failure(&peer.ip().to_string(), Failure::Busy, BUSY);
        turn_away(shared, stream);
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let evicted = {
        let mut pending = lock(&shared.pending);
        let old = if pending.len() >= st.max_pending {
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
        shared.service.failure(
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
        .name(format!("{}-conn-{id}", S::ROLE))
        .spawn(move || {
            let g = guard;
            connection(&g, stream, peer);
        });
    // If the thread could not start, the closure (and the guard in it) is dropped here,
    // which undoes the bookkeeping and closes the stream.
    if let Err(e) = spawned {
        if st.verbose {
            eprintln!("{}: {peer}: cannot start a thread: {e}", S::ROLE);
        }
    }
}

/// Answers a connection over the cap with the busy answer, from a short-lived thread (at most
/// [`MAX_TURNING_AWAY`] at once; beyond that the connection is just closed). The thread
/// half-closes and drains what the caller sends for a moment, so the caller reads the answer
/// rather than a reset.
fn turn_away<S: Service>(shared: &Arc<Shared<S>>, stream: TcpStream) {
    if shared.turning_away.fetch_add(1, Ordering::SeqCst) >= MAX_TURNING_AWAY {
        shared.turning_away.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let sh = shared.clone();
    let work = move || {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let mut w = BufWriter::new(&stream);
        let _ = protocol::write_frame(&mut w, &S::busy(BUSY.into()));
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
        .name(format!("{}-busy", S::ROLE))
        .spawn(work)
        .is_err()
    {
        shared.turning_away.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket whose reads fail with [`ErrorKind::TimedOut`] once a deadline has passed (the
/// deadline to authenticate), and otherwise wait at most the idle timeout each.
struct DeadlineStream {
    stream: TcpStream,
    deadline: Option<Instant>,
    idle: Duration,
    /// The socket's read timeout as last set.
    current: Option<Duration>,
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// A connection in clear text or under TLS.
enum Stream {
    Plain(DeadlineStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, DeadlineStream>>),
}

impl Stream {
    fn socket(&mut self) -> &mut DeadlineStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// Reads and drops what the caller still sends, for a moment, after half-closing: the caller
/// then reads the answer written before rather than a reset.
fn linger(socket: &TcpStream) {
    let _ = socket.shutdown(Shutdown::Write);
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut buf = [0u8; 4096];
    let mut left = 64usize << 10;
    let mut r = socket;
    while Instant::now() < deadline && left > 0 {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

impl Read for DeadlineStream {
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

fn is_timeout(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(e)
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

/// What ended the wait for a request's header.
enum HeaderOutcome {
    /// The header arrived with the right token.
    Authenticated,
    /// The connection ends here (anything to say was said).
    Close,
}

/// One connection's stream and peer, with the helpers that report failures.
struct Conn<'a, S: Service> {
    guard: &'a ConnectionGuard<S>,
    /// Reads through a buffer; writes go to the stream itself (one whole frame at a time).
    reader: BufReader<Stream>,
    peer: String,
    peer_ip: String,
}

impl<S: Service> Conn<'_, S> {
    fn shared(&self) -> &Shared<S> {
        &self.guard.shared
    }

    fn send(&mut self, response: &S::Response) -> Result<(), ProtocolError> {
        protocol::write_frame(self.reader.get_mut(), response)
    }

    /// Reports a failure and answers it with the service's error. Before authentication,
    /// failures are counted and summarised (the network may send any amount of garbage);
    /// after it, each is reported on its own.
    fn fail(&mut self, what: Failure, reason: String) {
        let sh = self.shared();
        if self.guard.authenticated.get() {
            sh.service.connection_error(&self.peer, &reason);
        } else {
            sh.service.failure(&self.peer_ip, what, &reason);
        }
        if sh.settings.verbose {
            eprintln!("{}: {}: error: {reason}", S::ROLE, self.peer);
        }
        let _ = self.send(&S::error(reason));
    }

    /// Waits for a request's header and checks its token.
    fn header(&mut self) -> HeaderOutcome {
        let header = match protocol::read_request_header(&mut self.reader) {
            Ok(h) => h,
            Err(e) => {
                self.header_error(e);
                return HeaderOutcome::Close;
            }
        };
        let sh = self.shared();
        if !sh.token.matches(&header.token) {
            let msg = "authentication failed";
            // A wrong token is a failure before authentication even on a connection that
            // authenticated before: it proves nothing about the sender.
            sh.service.failure(&self.peer_ip, Failure::Auth, msg);
            if sh.settings.verbose {
                eprintln!("{}: {}: refused: {msg}", S::ROLE, self.peer);
            }
            let _ = self.send(&S::refused(msg.into()));
            return HeaderOutcome::Close;
        }
        if self.guard.authenticated.get() {
            return HeaderOutcome::Authenticated;
        }
        match self.guard.promote() {
            Promotion::Admitted => {
                self.reader.get_mut().socket().deadline = None;
                HeaderOutcome::Authenticated
            }
            Promotion::Busy => {
                if self.shared().settings.verbose {
                    eprintln!("{}: {}: refused, too many connections", S::ROLE, self.peer);
                }
                let _ = self.send(&S::busy(BUSY.into()));
                HeaderOutcome::Close
            }
            Promotion::Evicted => HeaderOutcome::Close,
        }
    }

    /// Handles a header that could not be read: a timeout, a closed connection or garbage.
    fn header_error(&mut self, e: ProtocolError) {
        let sh = self.shared();
        let shutting_down = sh.shutdown.load(Ordering::SeqCst);
        let authenticated = self.guard.authenticated.get();
        if is_timeout(&e) {
            if authenticated {
                if sh.settings.verbose {
                    eprintln!("{}: {}: idle, closing the connection", S::ROLE, self.peer);
                }
            } else if !self.guard.evicted() && !shutting_down {
                let msg = format!(
                    "no authenticated request within {:.1} s; closing the connection",
                    sh.settings.auth_timeout.as_secs_f64()
                );
                self.fail(Failure::Timeout, msg);
            }
            return;
        }
        if let ProtocolError::Io(_) = e {
            // The caller closed the connection (or it broke): nothing to answer.
            if !authenticated && !self.guard.evicted() && !shutting_down {
                sh.service.failure(
                    &self.peer_ip,
                    Failure::Closed,
                    "closed before authenticating",
                );
            }
            return;
        }
        let (what, msg) = match e {
            ProtocolError::FrameTooLarge(n)
                if crate::tls::looks_like_tls(&u32::try_from(n).unwrap_or(0).to_be_bytes()) =>
            {
                let msg = format!(
                    "this {} speaks clear-text TCP (--insecure-plaintext) and got a TLS \
                     handshake: connect with --insecure-plaintext too, or serve with TLS",
                    S::ROLE
                );
                self.fail(Failure::Handshake, msg);
                // Let the caller read that rather than a reset.
                linger(&self.reader.get_mut().socket().stream);
                return;
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
        self.fail(what, msg);
    }

    /// Reads and decodes an authenticated request, or answers why it cannot.
    fn request(&mut self) -> Option<S::Request> {
        let limit = self.shared().settings.frame_limit;
        let body = match protocol::read_frame_bytes(&mut self.reader, limit) {
            Ok(b) => b,
            Err(ProtocolError::FrameTooLarge(n)) => {
                let msg = format!("frame of {n} bytes exceeds the limit of {limit} bytes");
                self.fail(Failure::Oversized, msg);
                return None;
            }
            Err(e) => {
                if is_timeout(&e) && self.shared().settings.verbose {
                    eprintln!(
                        "{}: {}: stalled inside a request, closing",
                        S::ROLE,
                        self.peer
                    );
                }
                return None;
            }
        };
        match protocol::decode(&body) {
            Ok(r) => Some(r),
            Err(e) => {
                self.fail(Failure::Malformed, e.to_string());
                None
            }
        }
    }
}

/// Reports a failure before authentication, unless the connection was evicted (counted by
/// whoever evicted it) or the server is stopping.
fn report<S: Service>(guard: &ConnectionGuard<S>, peer: &SocketAddr, what: Failure, reason: &str) {
    let sh = &guard.shared;
    if guard.evicted() || sh.shutdown.load(Ordering::SeqCst) {
        return;
    }
    sh.service.failure(&peer.ip().to_string(), what, reason);
    if sh.settings.verbose {
        eprintln!("{}: {peer}: {}: {reason}", S::ROLE, what.as_str());
    }
}

/// Starts TLS on a new connection: tells a clear-text caller what is wrong, then completes
/// the handshake within the deadline to authenticate. `None` when the connection ends here
/// (the failure reported).
fn start_tls<S: Service>(
    guard: &ConnectionGuard<S>,
    mut sock: DeadlineStream,
    config: &Arc<rustls::ServerConfig>,
    peer: &SocketAddr,
) -> Option<Stream> {
    let timeout_msg = || {
        format!(
            "no TLS handshake within {:.1} s; closing the connection",
            guard.shared.settings.auth_timeout.as_secs_f64()
        )
    };
    // The first byte tells a TLS caller from a clear-text one (the read timeout is at most
    // the deadline to authenticate, set when the connection was admitted).
    let mut first = [0u8; 2];
    match sock.stream.peek(&mut first) {
        Ok(0) => {
            report(guard, peer, Failure::Closed, "closed before authenticating");
            return None;
        }
        Ok(n) if !crate::tls::looks_like_tls(&first[..n]) => {
            let msg = format!(
                "this {} speaks TLS and got clear text: connect with TLS (give its \
                 certificate with --ca), or run both sides with --insecure-plaintext",
                S::ROLE
            );
            report(guard, peer, Failure::Handshake, &msg);
            let _ = protocol::write_frame(&mut sock.stream, &S::error(msg));
            linger(&sock.stream);
            return None;
        }
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            report(guard, peer, Failure::Timeout, &timeout_msg());
            return None;
        }
        Err(_) => {
            report(guard, peer, Failure::Closed, "closed before authenticating");
            return None;
        }
    }
    let conn = match rustls::ServerConnection::new(config.clone()) {
        Ok(c) => c,
        Err(e) => {
            report(guard, peer, Failure::Handshake, &e.to_string());
            return None;
        }
    };
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                    report(guard, peer, Failure::Timeout, &timeout_msg())
                }
                ErrorKind::InvalidData => report(
                    guard,
                    peer,
                    Failure::Handshake,
                    &format!("TLS handshake failed: {e}"),
                ),
                _ => report(
                    guard,
                    peer,
                    Failure::Closed,
                    "closed during the TLS handshake",
                ),
            }
            return None;
        }
    }
    Some(Stream::Tls(Box::new(tls)))
}

fn connection<S: Service>(guard: &ConnectionGuard<S>, stream: TcpStream, peer: SocketAddr) {
    let shared: &Shared<S> = &guard.shared;
    let sock = DeadlineStream {
        stream,
        deadline: Some(Instant::now() + shared.settings.auth_timeout),
        idle: shared.settings.idle_timeout,
        current: None,
    };
    let stream = match &shared.settings.transport {
        Transport::Plaintext => Stream::Plain(sock),
        Transport::Tls(config) => match start_tls(guard, sock, config, &peer) {
            Some(s) => s,
            None => return,
        },
    };
    let mut conn = Conn {
        guard,
        reader: BufReader::with_capacity(READ_BUFFER, stream),
        peer: peer.to_string(),
        peer_ip: peer.ip().to_string(),
    };
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // The header: at most MAX_HEADER bytes, checked before anything else is read.
        if let HeaderOutcome::Close = conn.header() {
            return;
        }
        // Authenticated: the request itself, up to the frame limit.
        let Some(request) = conn.request() else {
            return;
        };
        let response = shared.service.respond(&conn.peer, request);
        match conn.send(&response) {
            Ok(()) => {}
            Err(ProtocolError::FrameTooLarge(n)) => {
                let msg =
                    format!("the answer ({n} bytes) exceeds the frame limit; ask for less at once");
                if conn.send(&S::error(msg)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
