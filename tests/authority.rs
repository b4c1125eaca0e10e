//! The authority as a network service: keys that decrypt, refusals, files, audit log, CLI.
#![allow(clippy::unwrap_used)]

use cryptonn::authority::{self, InitOptions, Policy, ServerConfig, ServerHandle};
use cryptonn::protocol::{
    self, AuthorityClient, FeboKeyRequest, ProtocolError, PublicParams, Request, Response,
    PROTOCOL_VERSION,
};
use fe::dlog::DlogTable;
use fe::febo::{FeboEncryptor, Op};
use fe::feip::FeipEncryptor;
use fe::Ristretto;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BATCH: usize = 8;

/// A fresh, empty directory under cargo's per-target temporary directory.
fn tmpdir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "authority-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `config` serving one column key for every batch: these tests ask unbound column keys and
/// decrypt under the parameters' column key (`tests/binding.rs` covers the default, bound one).
fn shared_key(mut config: ServerConfig) -> ServerConfig {
    config.policy.bind_batches = false;
    config
}

struct Server {
    handle: ServerHandle,
    addr: String,
    token: String,
    dir: PathBuf,
    params: PublicParams,
}

fn start_with(name: &str, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let dir = tmpdir(name);
    let made = authority::init(&dir, nn::mnist::info(), BATCH, &InitOptions::default()).unwrap();
    let auth = authority::load(&dir).unwrap();
    let token = authority::read_token(&dir).unwrap();
    assert_eq!(token, made.token);
    let mut config = shared_key(ServerConfig::new(
        token.clone(),
        dir.join(authority::AUDIT_FILE),
    ));
    tweak(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let handle = authority::spawn(listener, auth, config).unwrap();
    Server {
        addr: handle.local_addr().to_string(),
        handle,
        token,
        dir,
        params: made.params,
    }
}

fn start(name: &str) -> Server {
    start_with(name, |_| {})
}

/// A dense row vector with entries in -3..=3 (about 6/7 of them non-zero).
fn row_vector(seed: i64) -> Vec<i64> {
    (0..(nn::mnist::FEATURES + 1) as i64)
        .map(|i| (i * 5 + seed).rem_euclid(7) - 3)
        .collect()
}

fn unit(len: usize, at: usize) -> Vec<i64> {
    let mut v = vec![0; len];
    v[at] = 1;
    v
}

fn inner(x: &[i64], y: &[i64]) -> i64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// A new connection, the parameters and one row key: the server still serves.
fn assert_serves(s: &Server) {
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    assert_eq!(c.params().unwrap(), s.params);
    assert_eq!(c.row_keys(&[row_vector(1)]).unwrap().len(), 1);
}

fn refused(r: Result<impl std::fmt::Debug, ProtocolError>) -> String {
    match r {
        Err(ProtocolError::Refused { message: m, .. }) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn raw(s: &Server) -> TcpStream {
    let t = TcpStream::connect(&s.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t
}

/// Reads one response frame, then checks that the server closed the connection.
fn read_error_then_eof(t: &mut TcpStream) -> String {
    let r: Response = protocol::read_frame(t).unwrap();
    let mut rest = Vec::new();
    // EOF (Ok(0)) or a reset: either way nothing more comes.
    let _ = t.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection stayed open");
    match r {
        Response::Error(m) => m,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The server closed the connection (end of file or reset), rather than the read timing out.
fn assert_closed_by_server(mut t: impl Read) {
    let mut buf = [0u8; 1];
    match t.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection is still open: {other:?}"),
    }
}

fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(authority::AUDIT_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn issued_keys_decrypt() {
    let s = start("decrypt");
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    let params = c.params().unwrap();
    assert_eq!(params, s.params);
    assert_eq!(params.batch_size(), BATCH);
    let dlog = DlogTable::<Ristretto>::new(1 << 12).unwrap();

    // Rows: two keys on one encrypted sample, negative entries included.
    let x: Vec<i64> = (0..(nn::mnist::FEATURES + 1) as i64)
        .map(|i| (i * 37) % 256)
        .collect();
    let enc = FeipEncryptor::new(&params.row);
    let ct = enc.encrypt(&x).unwrap();
    let ys = vec![row_vector(0), row_vector(3)];
    let keys = c.row_keys(&ys).unwrap();
    for (y, k) in ys.iter().zip(&keys) {
        let got = fe::feip::decrypt(&params.row.params(), &ct, k, &dlog).unwrap();
        assert_eq!(got, inner(&x, y));
    }

    // Columns: length = batch size, two non-zero entries are enough.
    let xc: Vec<i64> = vec![255, 0, 17, 3, 99, 1, 200, 42];
    let ct = FeipEncryptor::new(&params.col).encrypt(&xc).unwrap();
    let yc = vec![
        vec![0, 0, 5, 0, -7, 0, 0, 0],
        vec![127, -127, 1, 2, 3, 4, 5, 6],
    ];
    let keys = c.col_keys(&yc).unwrap();
    for (y, k) in yc.iter().zip(&keys) {
        let got = fe::feip::decrypt(&params.col.params(), &ct, k, &dlog).unwrap();
        assert_eq!(got, inner(&xc, y));
    }

    // FEBO subtraction: the output error a - y on one-hot labels scaled by 4096.
    let fenc = FeboEncryptor::new(&params.febo);
    let labels = [4096i64, 0, 0, 4096];
    let preds = [1234i64, 0, 4096, 4096];
    let cts: Vec<_> = labels.iter().map(|&l| fenc.encrypt(l)).collect();
    let reqs = cts
        .iter()
        .zip(&preds)
        .map(|(ct, &a)| FeboKeyRequest {
            commitment: ct.commitment().to_bytes(true).to_vec(),
            op: Op::Sub,
            operand: a,
        })
        .collect();
    let keys = c.febo_keys(reqs).unwrap();
    for ((ct, k), (&l, &a)) in cts.iter().zip(&keys).zip(labels.iter().zip(&preds)) {
        assert_eq!(k.op(), Op::Sub);
        assert_eq!(fe::febo::decrypt(ct, k, 4096, &dlog).unwrap(), l - a);
    }
    s.handle.shutdown().unwrap();
}

#[test]
fn refuses_bad_tokens_and_closes() {
    let s = start("tokens");
    for bad in ["", "wrong", &format!("{}x", s.token), &s.token[1..]] {
        let mut c = AuthorityClient::connect(&s.addr, bad).unwrap();
        assert_eq!(refused(c.params()), "authentication failed");
        // The connection is closed after a failed authentication.
        assert!(c.params().is_err());
        assert_serves(&s);
    }
    // Keys are refused just the same.
    let mut c = AuthorityClient::connect(&s.addr, "nope").unwrap();
    assert_eq!(
        refused(c.row_keys(&[row_vector(0)])),
        "authentication failed"
    );
    assert_serves(&s);
}

#[test]
fn policy_refusals_keep_the_connection() {
    let s = start("policy");
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();

    let m = refused(c.row_keys(&[unit(nn::mnist::FEATURES + 1, 100)]));
    assert!(m.contains("non-zero"), "{m}");
    let m = refused(c.col_keys(&[unit(BATCH, 3)]));
    assert!(m.contains("non-zero"), "{m}");
    let m = refused(c.row_keys(&[vec![1; (nn::mnist::FEATURES + 1) - 1]]));
    assert!(m.contains("length"), "{m}");
    let m = refused(c.col_keys(&[vec![1; BATCH + 1]]));
    assert!(m.contains("length"), "{m}");
    let mut big = row_vector(0);
    big[9] = 40_000;
    let m = refused(c.row_keys(&[row_vector(1), big]));
    assert!(m.contains("max_abs"), "{m}");
    let fenc = FeboEncryptor::new(&s.params.febo);
    let cmt = fenc.encrypt(1).commitment().to_bytes(true).to_vec();
    for (op, operand) in [(Op::Add, 1), (Op::Mul, 2), (Op::Div, 2), (Op::Sub, 5000)] {
        let m = refused(c.febo_keys(vec![FeboKeyRequest {
            commitment: cmt.clone(),
            op,
            operand,
        }]));
        assert!(m.contains("not allowed") || m.contains("operand"), "{m}");
    }

    // Commitments that are not valid points are errors, not refusals; the connection stays.
    let identity = vec![0u8; 32];
    let not_a_point = vec![0xffu8; 32];
    for commitment in [identity, not_a_point, vec![1u8; 5]] {
        let r = c.febo_keys(vec![FeboKeyRequest {
            commitment,
            op: Op::Sub,
            operand: 1,
        }]);
        assert!(
            matches!(
                r,
                Err(ProtocolError::Server { .. } | ProtocolError::Refused { .. })
            ),
            "{r:?}"
        );
    }

    // Same connection, still good.
    assert_eq!(c.params().unwrap(), s.params);
    assert_eq!(c.row_keys(&[row_vector(2)]).unwrap().len(), 1);
    assert_serves(&s);
}

/// The header frame of a request, as raw bytes.
fn header_frame(version: u16, token: &str) -> Vec<u8> {
    let mut body = version.to_le_bytes().to_vec();
    body.extend_from_slice(&(token.len() as u64).to_le_bytes());
    body.extend_from_slice(token.as_bytes());
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.append(&mut body);
    out
}

#[test]
fn garbage_frames_get_an_error_and_a_closed_connection() {
    let s = start_with("garbage", |c| c.net.frame_limit = 1 << 20);
    // A caller that keeps its connection across the others' garbage.
    let mut steady = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    steady.params().unwrap();

    // The layout is what the protocol documents.
    let good = protocol::encode_request(&s.token, &Request::Params).unwrap();
    let header = header_frame(PROTOCOL_VERSION, &s.token);
    assert_eq!(&good[..header.len()], header.as_slice());

    // A header length above the small header bound, before any token: refused at once,
    // before anything else is read or allocated.
    for len in [u32::MAX, (1 << 20) + 1, protocol::MAX_HEADER as u32 + 1] {
        let mut t = raw(&s);
        t.write_all(&len.to_be_bytes()).unwrap();
        let m = read_error_then_eof(&mut t);
        assert!(m.contains("exceeds"), "{m}");
        assert_serves(&s);
    }
    // A body length above the frame limit after a good header.
    let mut t = raw(&s);
    t.write_all(&header).unwrap();
    t.write_all(&((1u32 << 20) + 1).to_be_bytes()).unwrap();
    let m = read_error_then_eof(&mut t);
    assert!(m.contains("exceeds"), "{m}");

    // A wrong token with a huge body length behind it: refused at the header.
    let mut t = raw(&s);
    t.write_all(&header_frame(PROTOCOL_VERSION, "wrong"))
        .unwrap();
    t.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let r: Response = protocol::read_frame(&mut t).unwrap();
    assert_eq!(r, Response::Refused("authentication failed".into()));

    // Random bytes behind the right version, as a header and as a request.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for len in [1usize, 7, 64, 4000] {
        let mut body: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        if len >= 2 {
            body[..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        }
        let mut t = raw(&s);
        t.write_all(&(len as u32).to_be_bytes()).unwrap();
        t.write_all(&body).unwrap();
        let m = read_error_then_eof(&mut t);
        assert!(m.contains("malformed"), "{m}");
        let mut t = raw(&s);
        t.write_all(&header).unwrap();
        t.write_all(&(len as u32).to_be_bytes()).unwrap();
        t.write_all(&body).unwrap();
        let m = read_error_then_eof(&mut t);
        assert!(m.contains("malformed"), "{m}");
        assert_serves(&s);
    }

    // A header with a trailing byte, a wrong version (also a version 1 caller), a truncated
    // request.
    let mut extra = header[4..].to_vec();
    extra.push(0);
    let mut t = raw(&s);
    t.write_all(&(extra.len() as u32).to_be_bytes()).unwrap();
    t.write_all(&extra).unwrap();
    let m = read_error_then_eof(&mut t);
    assert!(m.contains("malformed"), "{m}");

    for v in [PROTOCOL_VERSION + 1, 1] {
        let mut t = raw(&s);
        t.write_all(&header_frame(v, &s.token)).unwrap();
        let m = read_error_then_eof(&mut t);
        assert!(m.contains(&format!("version {v} is not supported")), "{m}");
    }

    let mut t = raw(&s);
    t.write_all(&good[..good.len() - 1]).unwrap();
    drop(t);
    assert_serves(&s);

    assert_eq!(steady.params().unwrap(), s.params);
    s.handle.shutdown().unwrap();
}

#[test]
fn idle_connections_are_closed() {
    let s = start_with("idle", |c| {
        c.net.auth_timeout = Duration::from_millis(300);
        c.net.idle_timeout = Duration::from_millis(600);
    });
    // Never authenticates: told so, then closed, after the authentication deadline.
    let mut t = raw(&s);
    let start = Instant::now();
    let m = read_error_then_eof(&mut t);
    assert!(m.contains("no authenticated request"), "{m}");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(9), "{waited:?}");
    // A slow sender (a few bytes of the header, then nothing) is held to the same deadline.
    let mut t = raw(&s);
    t.write_all(&header_frame(PROTOCOL_VERSION, &s.token)[..6])
        .unwrap();
    let m = read_error_then_eof(&mut t);
    assert!(m.contains("no authenticated request"), "{m}");
    // Authenticated, then idle: closed after the idle timeout.
    let mut t = raw(&s);
    protocol::write_request(&mut t, &s.token, &Request::Params).unwrap();
    let r: Response = protocol::read_frame(&mut t).unwrap();
    assert!(matches!(r, Response::Params(_)), "{r:?}");
    assert_closed_by_server(&mut t);
    assert_serves(&s);
    s.handle.shutdown().unwrap();
    let lines = audit_lines(&s.dir);
    let timeouts: u64 = lines
        .iter()
        .filter(|l| l["event"] == "failures")
        .map(|l| l["failures"]["timeout"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(timeouts, 2, "{lines:?}");
}

#[test]
fn idle_connections_do_not_lock_callers_out() {
    // Far more idle connections than slots, with a deadline longer than the test: the
    // oldest unauthenticated connection makes room for each newer one.
    let s = start_with("lockout", |c| {
        c.net.max_connections = 4;
        c.net.max_pending = 8;
        c.net.auth_timeout = Duration::from_secs(30);
    });
    let idle: Vec<TcpStream> = (0..80).map(|_| raw(&s)).collect();
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    assert_eq!(c.params().unwrap(), s.params);
    assert_eq!(c.row_keys(&[row_vector(4)]).unwrap().len(), 1);
    assert_serves(&s);
    // The first idle connections were closed by the authority, well before any deadline.
    assert_closed_by_server(&mut &idle[0]);
    // Authenticated connections are still capped.
    let held: Vec<AuthorityClient> = (0..3)
        .map(|_| {
            let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
            c.params().unwrap();
            c
        })
        .collect();
    let mut over = raw(&s);
    protocol::write_request(&mut over, &s.token, &Request::Params).unwrap();
    let r: Response = protocol::read_frame(&mut over).unwrap();
    assert!(
        matches!(r, Response::Busy(_)),
        "a fifth authenticated connection: {r:?}"
    );
    drop(held);
    drop(idle);
    s.handle.shutdown().unwrap();
    let report = authority::audit::verify(&s.dir.join(authority::AUDIT_FILE)).unwrap();
    assert!(report.intact(), "{report}");
    assert!(report.failures["evicted"] >= 72, "{report}");
    // Counted, not one line each.
    assert!(report.lines < 12, "{report}");
}

#[test]
fn connection_cap() {
    let s = start_with("cap", |c| c.net.max_connections = 2);
    let mut a = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    let mut b = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    a.params().unwrap();
    b.params().unwrap();
    let no_retry = protocol::ClientConfig {
        retries: 0,
        ..protocol::ClientConfig::default()
    };
    let mut c = AuthorityClient::connect_with(&s.addr, &s.token, no_retry).unwrap();
    match c.params() {
        Err(ProtocolError::Busy { message: m, .. }) => assert!(m.contains("too many"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    drop(a);
    // The slot frees once the server notices the close.
    let mut ok = false;
    for _ in 0..200 {
        if let Ok(mut c) = AuthorityClient::connect(&s.addr, &s.token) {
            if c.params().is_ok() {
                ok = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "no slot freed after a client left");
    b.params().unwrap();
}

/// Binds `addr` again after a server on it stopped: the port can stay taken for a moment
/// (the stopped server's connections closing), so this retries for up to 5 s.
fn bind_again(addr: &str) -> TcpListener {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("cannot bind {addr} again: {last:?}");
}

#[test]
fn client_survives_an_authority_restart() {
    let s = start("restart");
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    let before = c.row_keys(&[row_vector(0)]).unwrap();
    assert_eq!(c.connections(), 1);
    let (dir, addr, token) = (s.dir.clone(), s.addr.clone(), s.token.clone());
    let restart = move || {
        let listener = bind_again(&addr);
        let config = shared_key(ServerConfig::new(
            token.clone(),
            dir.join(authority::AUDIT_FILE),
        ));
        authority::spawn(listener, authority::load(&dir).unwrap(), config).unwrap()
    };

    // Restarted between two requests: the next request finds its connection closed,
    // reconnects and gets the same key (the same master keys).
    s.handle.shutdown().unwrap();
    let second = restart();
    let after = c.row_keys(&[row_vector(0)]).unwrap();
    assert_eq!(before[0].secret(), after[0].secret());
    assert_eq!(c.connections(), 2);

    // Down while the request is made: it waits, with backoff, for the authority to return
    // on the same port.
    second.shutdown().unwrap();
    let back = std::thread::spawn({
        let restart = restart.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            restart()
        }
    });
    assert_eq!(c.params().unwrap(), s.params);
    assert!(c.connections() >= 3);
    let third = back.join().unwrap();
    assert_eq!(
        c.col_keys(&[vec![1, 1, 0, 0, 0, 0, 0, 0]]).unwrap().len(),
        1
    );
    third.shutdown().unwrap();

    // With no authority at all, the retries end in a clear error.
    let mut quick = protocol::ClientConfig {
        retries: 2,
        initial_backoff: Duration::from_millis(10),
        ..protocol::ClientConfig::default()
    };
    match AuthorityClient::connect_with(&s.addr, &s.token, quick.clone()) {
        Err(e @ ProtocolError::Unavailable { attempts: 3, .. }) => {
            assert!(
                e.to_string().contains("did not answer after 3 attempts"),
                "{e}"
            )
        }
        other => panic!("expected the authority to be unavailable, got {other:?}"),
    }
    quick.retries = 0;
    assert!(matches!(
        AuthorityClient::connect_with(&s.addr, &s.token, quick),
        Err(ProtocolError::Io(_))
    ));
}

#[test]
fn client_times_out_on_a_stalled_authority() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..2 {
            conns.push(listener.accept().unwrap().0);
        }
        // Keep them open until the client gave up.
        let mut buf = [0u8; 64];
        for mut c in conns {
            while c.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        }
    });
    let config = protocol::ClientConfig {
        read_timeout: Duration::from_millis(200),
        retries: 1,
        initial_backoff: Duration::from_millis(10),
        ..protocol::ClientConfig::default()
    };
    let mut c = AuthorityClient::connect_with(&addr, "t", config).unwrap();
    let start = Instant::now();
    let e = c.params().unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(400), "{e}");
    assert!(
        matches!(e, ProtocolError::Unavailable { attempts: 2, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("no answer from the authority"),
        "{e}"
    );
    assert_eq!(c.connections(), 2);
    drop(c);
    held.join().unwrap();
}

#[test]
fn audit_log_records_issued_keys_and_refusals() {
    let s = start("audit");
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    c.params().unwrap();
    c.row_keys(&[row_vector(0), row_vector(1), row_vector(0)])
        .unwrap();
    c.col_keys(&[vec![1, 2, 0, 0, 0, 0, 0, 0]]).unwrap();
    let fenc = FeboEncryptor::new(&s.params.febo);
    let reqs: Vec<FeboKeyRequest> = (0..5)
        .map(|i| FeboKeyRequest {
            commitment: fenc.encrypt(0).commitment().to_bytes(true).to_vec(),
            op: Op::Sub,
            operand: i,
        })
        .collect();
    c.febo_keys(reqs).unwrap();
    refused(c.row_keys(&[unit(nn::mnist::FEATURES + 1, 0)]));
    let mut bad = AuthorityClient::connect(&s.addr, "intruder").unwrap();
    refused(bad.params());
    // Wait until the server has handled everything (responses come after the log lines).
    c.params().unwrap();

    let lines = audit_lines(&s.dir);
    let issued: Vec<_> = lines.iter().filter(|l| l["outcome"] == "issued").collect();
    assert_eq!(issued.len(), 3, "{lines:?}");
    let kinds: Vec<_> = issued.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["row", "col", "febo"]);
    let counts: Vec<_> = issued
        .iter()
        .map(|l| l["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [3, 1, 5]);
    for l in &issued {
        assert!(l["ts"].as_u64().unwrap() > 1_600_000_000);
        assert!(l["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        let keys = l["keys"].as_array().unwrap();
        assert_eq!(keys.len() as u64, l["count"].as_u64().unwrap());
        for k in keys {
            let d = k["digest"].as_str().unwrap();
            assert_eq!(d.len(), 32);
            assert!(d.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
    // The same vector twice has the same digest; the non-zero count is recorded.
    let rows = issued[0]["keys"].as_array().unwrap();
    assert_eq!(rows[0]["digest"], rows[2]["digest"]);
    assert_ne!(rows[0]["digest"], rows[1]["digest"]);
    assert!(rows[0]["nonzero"].as_u64().unwrap() > 600);
    assert_eq!(issued[1]["keys"][0]["nonzero"], 2);
    assert_eq!(issued[2]["keys"][0]["op"], "Sub");
    // No vector is written out.
    let text = std::fs::read_to_string(s.dir.join(authority::AUDIT_FILE)).unwrap();
    assert!(text.len() < 4096, "{} bytes", text.len());

    let refusals: Vec<_> = lines.iter().filter(|l| l["outcome"] == "refused").collect();
    assert_eq!(refusals.len(), 1, "{lines:?}");
    assert!(refusals[0]["reason"].as_str().unwrap().contains("non-zero"));
    // The wrong token is a failure before authentication: summarised at shutdown.
    assert!(lines.iter().all(|l| l["event"] != "failures"), "{lines:?}");
    s.handle.shutdown().unwrap();
    let lines = audit_lines(&s.dir);
    let summaries: Vec<_> = lines.iter().filter(|l| l["event"] == "failures").collect();
    assert_eq!(summaries.len(), 1, "{lines:?}");
    assert_eq!(summaries[0]["peer"], "127.0.0.1");
    assert_eq!(summaries[0]["failures"]["auth"], 1);
    assert_eq!(summaries[0]["last_reason"], "authentication failed");
    assert_eq!(lines.last().unwrap()["event"], "stop");
    let report = authority::audit::verify(&s.dir.join(authority::AUDIT_FILE)).unwrap();
    assert!(report.intact(), "{report}");
    assert_eq!(report.issued["row"].keys, 3);
    assert_eq!(report.by_caller["127.0.0.1"]["febo"], 5);
    assert_eq!(report.failures["auth"], 1);
}

#[test]
fn unauthenticated_garbage_is_summarised_not_logged_line_by_line() {
    let s = start_with("garbage-audit", |c| {
        c.net.frame_limit = 1 << 16;
        c.audit_limits.summary_every = 150;
    });
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let frames = 400;
    for i in 0..frames {
        let mut t = raw(&s);
        let len = (next() % 512) as usize + 1;
        let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 4 == 0 {
            // An oversized length prefix.
            body = u32::MAX.to_be_bytes().to_vec();
        } else {
            let mut framed = (len as u32).to_be_bytes().to_vec();
            framed.append(&mut body);
            body = framed;
        }
        t.write_all(&body).unwrap();
        // Wait for the answer, so the server has counted this one.
        let _ = protocol::read_frame::<Response, _>(&mut t);
    }
    let mut bad = AuthorityClient::connect(&s.addr, "not-the-token").unwrap();
    refused(bad.params());
    assert_serves(&s);
    s.handle.shutdown().unwrap();
    let lines = audit_lines(&s.dir);
    let summaries: Vec<_> = lines.iter().filter(|l| l["event"] == "failures").collect();
    // 401 failures of one peer: two summaries of 150 on the way, one at shutdown.
    assert_eq!(summaries.len(), 3, "{lines:?}");
    let total: u64 = summaries.iter().map(|l| l["count"].as_u64().unwrap()).sum();
    assert_eq!(total, frames + 1);
    assert!(lines.len() <= 7, "{} lines: {lines:?}", lines.len());
    let report = authority::audit::verify(&s.dir.join(authority::AUDIT_FILE)).unwrap();
    assert!(report.intact(), "{report}");
    assert_eq!(report.failures["oversized"], frames / 4);
    assert_eq!(report.failures["auth"], 1);
    assert_eq!(report.issued["row"].keys, 1);
}

#[test]
fn binary_audit_detects_a_tampered_log() {
    let s = start("audit-bin");
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    for i in 0..3 {
        c.row_keys(&[row_vector(i)]).unwrap();
    }
    drop(c);
    s.handle.shutdown().unwrap();
    let exe = env!("CARGO_BIN_EXE_authority");
    let run = || {
        std::process::Command::new(exe)
            .args(["audit", "--dir"])
            .arg(&s.dir)
            .output()
            .unwrap()
    };
    let out = run();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("row: 3 keys in 3 requests"), "{text}");
    assert!(text.contains("127.0.0.1: row 3"), "{text}");
    assert!(text.contains("chain: intact"), "{text}");

    let path = s.dir.join(authority::AUDIT_FILE);
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original.replacen("\"count\":1", "\"count\":0", 1);
    assert_ne!(edited, original);
    std::fs::write(&path, edited).unwrap();
    let out = run();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    // Line 1 is the start; line 2, the first request, was edited; line 3 names it.
    assert!(text.contains("chain: BROKEN at"), "{text}");
    assert!(text.contains("audit.log:3:"), "{text}");
    assert!(text.contains("line 2 was edited"), "{text}");
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn key_files_modes_overwrite_and_validation() {
    let dir = tmpdir("files");
    let made = authority::init(
        &dir,
        nn::mnist::info(),
        4,
        &InitOptions {
            token: Some("s3cret-token".into()),
            force: false,
            ..InitOptions::default()
        },
    )
    .unwrap();
    assert_eq!(made.token, "s3cret-token");
    assert_eq!(authority::read_token(&dir).unwrap(), "s3cret-token");
    assert_eq!(
        authority::read_params(&dir.join(authority::PARAMS_FILE)).unwrap(),
        made.params
    );
    #[cfg(unix)]
    {
        for f in [
            authority::ROW_MSK_FILE,
            authority::COL_MSK_FILE,
            authority::FEBO_MSK_FILE,
            authority::TOKEN_FILE,
            cryptonn::tls::KEY_FILE,
        ] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&dir.join(cryptonn::tls::CERT_FILE)), 0o644);
        assert_eq!(mode(&dir) & 0o077, 0);
    }
    let auth = authority::load(&dir).unwrap();
    assert_eq!(auth.params(), &made.params);
    assert_eq!(auth.batch_size(), 4);
    // The master keys never show in debug output.
    assert!(format!("{auth:?}").contains("redacted"));

    // No overwrite without force; with force, new keys.
    let e = authority::init(&dir, nn::mnist::info(), 4, &InitOptions::default()).unwrap_err();
    assert!(
        matches!(e, authority::AuthorityError::AlreadyInitialized(_)),
        "{e}"
    );
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(authority::load(&dir).unwrap().params(), &made.params);
    let again = authority::init(
        &dir,
        nn::mnist::info(),
        4,
        &InitOptions {
            token: None,
            force: true,
            ..InitOptions::default()
        },
    )
    .unwrap();
    assert_ne!(again.params.fingerprint(), made.params.fingerprint());
    assert_eq!(again.token.len(), 64);
    assert_eq!(authority::read_token(&dir).unwrap(), again.token);

    // Bad tokens are refused at init.
    for t in ["", "has space", "tab\t"] {
        let e = authority::init(
            &tmpdir("badtoken"),
            nn::mnist::info(),
            4,
            &InitOptions {
                token: Some(t.into()),
                force: false,
                ..InitOptions::default()
            },
        );
        assert!(e.is_err(), "{t:?}");
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let col = dir.join(authority::COL_MSK_FILE);
        std::fs::set_permissions(&col, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = authority::load(&dir).unwrap_err();
        assert!(
            matches!(e, authority::AuthorityError::InsecurePermissions { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&col, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tok = dir.join(authority::TOKEN_FILE);
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(authority::read_token(&dir).is_err());
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    authority::load(&dir).unwrap();

    // Parameters of another authority, a truncated key, a missing key: clear errors.
    let other = tmpdir("other");
    authority::init(&other, nn::mnist::info(), 4, &InitOptions::default()).unwrap();
    std::fs::copy(
        other.join(authority::PARAMS_FILE),
        dir.join(authority::PARAMS_FILE),
    )
    .unwrap();
    let e = authority::load(&dir).unwrap_err();
    assert!(e.to_string().contains("public keys"), "{e}");
    std::fs::copy(
        other.join(authority::COL_MSK_FILE),
        dir.join(authority::COL_MSK_FILE),
    )
    .unwrap();
    let row = dir.join(authority::ROW_MSK_FILE);
    let bytes = std::fs::read(&row).unwrap();
    fe::serial::write_atomic(&row, &bytes[..bytes.len() - 1], true).unwrap();
    assert!(authority::load(&dir).is_err());
    std::fs::remove_file(&row).unwrap();
    assert!(authority::load(&dir).is_err());
}

#[test]
fn server_refuses_an_unusable_configuration() {
    let dir = tmpdir("config");
    authority::init(&dir, nn::mnist::info(), 1, &InitOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // Batch size 1 cannot satisfy the default two non-zero column entries.
    let config = ServerConfig::new("t", dir.join("audit.log"));
    let e = authority::spawn(listener, authority::load(&dir).unwrap(), config);
    assert!(matches!(e, Err(authority::AuthorityError::Policy(_))));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = ServerConfig::new("", dir.join("audit.log"));
    config.policy = Policy {
        min_nonzero_col: 1,
        ..Policy::default()
    };
    let e = authority::spawn(listener, authority::load(&dir).unwrap(), config);
    assert!(matches!(e, Err(authority::AuthorityError::InvalidToken(_))));
}

#[test]
fn binary_init_and_serve() {
    let exe = env!("CARGO_BIN_EXE_authority");
    let dir = tmpdir("bin");
    let out = std::process::Command::new(exe)
        .args(["init", "--batch-size", "4", "--dir"])
        .arg(&dir)
        .env_remove("CRYPTONN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let again = std::process::Command::new(exe)
        .args(["init", "--batch-size", "4", "--dir"])
        .arg(&dir)
        .env_remove("CRYPTONN_TOKEN")
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let mut child = std::process::Command::new(exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--quiet",
            "--shared-column-key",
            "--dir",
        ])
        .arg(&dir)
        .env_remove("CRYPTONN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut addr = None;
    for _ in 0..20 {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(a) = line.trim().strip_prefix("listening on ") {
            addr = Some(a.to_string());
            break;
        }
    }
    let result = (|| {
        let addr = addr.ok_or("no `listening on` line")?;
        assert!(!addr.ends_with(":0"), "{addr}");
        let token = authority::read_token(&dir).map_err(|e| e.to_string())?;
        // TLS by default, pinned to the certificate `init` wrote.
        let tls = protocol::ClientConfig {
            transport: protocol::ClientTransport::pinned(&dir.join(cryptonn::tls::CERT_FILE))
                .map_err(|e| e.to_string())?,
            ..protocol::ClientConfig::default()
        };
        let mut c =
            AuthorityClient::connect_with(&addr, &token, tls.clone()).map_err(|e| e.to_string())?;
        let p = c.params().map_err(|e| e.to_string())?;
        assert_eq!(p.batch_size(), 4);
        let keys = c.col_keys(&[vec![1, 1, 0, 0]]).map_err(|e| e.to_string())?;
        assert_eq!(keys.len(), 1);
        let mut bad = AuthorityClient::connect_with(&addr, "wrong", tls.clone())
            .map_err(|e| e.to_string())?;
        assert!(matches!(bad.params(), Err(ProtocolError::Refused { .. })));
        // A clear-text caller is told the authority speaks TLS.
        let mut plain = AuthorityClient::connect(&addr, &token).map_err(|e| e.to_string())?;
        match plain.params() {
            Err(ProtocolError::Server { message, .. }) if message.contains("speaks TLS") => {}
            other => return Err(format!("a clear-text caller got {other:?}")),
        }
        Ok::<(), String>(())
    })();
    // SIGTERM: a clean stop (summaries and a stop line in the audit log), status 0.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = match term {
        Ok(t) if t.success() => child.wait().unwrap(),
        _ => {
            let _ = child.kill();
            child.wait().unwrap()
        }
    };
    result.unwrap();
    assert!(status.success(), "{status:?}");
    let audit = std::fs::read_to_string(dir.join(authority::AUDIT_FILE)).unwrap();
    let last = audit.lines().last().unwrap_or_default();
    assert!(last.contains("\"event\":\"stop\""), "{audit}");
    let requests = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"request\""))
        .count();
    assert_eq!(requests, 1, "{audit}");
    assert!(audit.starts_with("{\"seq\":0,"), "{audit}");
    // The wrong token and the clear-text caller, summarised in one line.
    assert!(
        audit.contains("\"failures\":{\"auth\":1,\"handshake\":1}"),
        "{audit}"
    );
}

/// Cost of issuing one training step's keys (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn timing_key_issuance() {
    let dir = tmpdir("timing");
    authority::init(&dir, nn::mnist::info(), 64, &InitOptions::default()).unwrap();
    let auth = authority::load(&dir).unwrap();
    let token = authority::read_token(&dir).unwrap();
    let config = shared_key(ServerConfig::new(
        token.clone(),
        dir.join(authority::AUDIT_FILE),
    ));
    let handle = authority::spawn(TcpListener::bind("127.0.0.1:0").unwrap(), auth, config).unwrap();
    let params = {
        let mut c = AuthorityClient::connect(&handle.local_addr().to_string(), &token).unwrap();
        c.params().unwrap()
    };
    let mut c = AuthorityClient::connect(&handle.local_addr().to_string(), &token).unwrap();
    let rows: Vec<Vec<i64>> = (0..128)
        .map(|j| {
            (0..785)
                .map(|i: i64| ((i * 31 + j * 7) % 255) - 127)
                .collect()
        })
        .collect();
    let cols: Vec<Vec<i64>> = (0..128)
        .map(|j| (0..64).map(|i: i64| ((i * 13 + j) % 255) - 127).collect())
        .collect();
    let fenc = FeboEncryptor::new(&params.febo);
    let cmts: Vec<Vec<u8>> = fenc
        .encrypt_many(&vec![4096; 640])
        .iter()
        .map(|ct| ct.commitment().to_bytes(true).to_vec())
        .collect();
    let febo = || {
        cmts.iter()
            .enumerate()
            .map(|(i, c)| FeboKeyRequest {
                commitment: c.clone(),
                op: Op::Sub,
                operand: (i as i64 * 97) % 4097,
            })
            .collect::<Vec<_>>()
    };
    let runs = 10;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (mut tr, mut tc, mut tf) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let t = Instant::now();
        assert_eq!(c.row_keys(&rows).unwrap().len(), 128);
        tr.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert_eq!(c.col_keys(&cols).unwrap().len(), 128);
        tc.push(t.elapsed().as_secs_f64() * 1e3);
        let reqs = febo();
        let t = Instant::now();
        assert_eq!(c.febo_keys(reqs).unwrap().len(), 640);
        tf.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The same derivations in process, without network, audit or framing.
    let local = authority::Authority::generate(nn::mnist::info(), 64).unwrap();
    let policy = Policy::default().with_lengths(785, 64);
    let wire = |ys: &[Vec<i64>]| -> Vec<Vec<i32>> {
        ys.iter()
            .map(|y| y.iter().map(|&v| v as i32).collect())
            .collect()
    };
    let (rq, cq) = (Request::RowKeys(wire(&rows)), Request::ColKeys(wire(&cols)));
    let fq = Request::FeboKeys(febo());
    let (mut lr, mut lc, mut lf) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        for (q, v) in [(&rq, &mut lr), (&cq, &mut lc), (&fq, &mut lf)] {
            let t = Instant::now();
            let r = local.answer(&policy, q);
            v.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(!matches!(r, Response::Refused(_) | Response::Error(_)));
        }
    }
    println!(
        "median of {runs} in-process derivations: 128 row keys {:.2} ms, 128 column keys {:.2} ms, 640 FEBO keys {:.2} ms",
        median(lr),
        median(lc),
        median(lf)
    );
    println!(
        "median of {runs} round trips over loopback: 128 row keys {:.2} ms, 128 column keys {:.2} ms, 640 FEBO keys {:.2} ms",
        median(tr),
        median(tc),
        median(tf)
    );
}
