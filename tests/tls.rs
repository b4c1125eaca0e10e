//! TLS between callers and the authority: the pinned certificate is trusted and no other,
//! a clear-text caller of a TLS server and a TLS caller of a clear-text server fail at once
//! with errors that say so, a connection that stalls in the handshake is closed within the
//! deadline to authenticate, and the key file is private.
#![allow(clippy::unwrap_used)]

use cryptonn::authority::{self, InitOptions, ServerConfig, ServerHandle};
use cryptonn::net::Transport;
use cryptonn::protocol::{AuthorityClient, ClientConfig, ClientTransport, ProtocolError};
use cryptonn::tls;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small key directory (3 features, batches of 4); returns the token.
fn init(dir: &Path) -> String {
    let info = nn::data::DatasetInfo::new(3, 255, 2).unwrap();
    authority::init(dir, info, 4, &InitOptions::default())
        .unwrap()
        .token
}

struct Server {
    handle: Option<ServerHandle>,
    addr: String,
    token: String,
    dir: PathBuf,
}

impl Server {
    /// Stops the server and returns its audit log.
    fn stop(mut self) -> String {
        if let Some(h) = self.handle.take() {
            h.shutdown().unwrap();
        }
        std::fs::read_to_string(self.dir.join(authority::AUDIT_FILE)).unwrap()
    }
}

/// Serves a fresh key directory, over TLS with its certificate or in clear text.
fn serve(name: &str, tls: bool, auth_timeout: Duration) -> Server {
    let dir = tmpdir(name);
    let token = init(&dir);
    let mut config = ServerConfig::new(token.clone(), dir.join(authority::AUDIT_FILE));
    // One column key for every batch: the test asks an unbound column key.
    config.policy.bind_batches = false;
    config.net.auth_timeout = auth_timeout;
    if tls {
        config.net.transport = Transport::Tls(authority::load_tls(&dir).unwrap());
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let handle = authority::spawn(listener, authority::load(&dir).unwrap(), config).unwrap();
    Server {
        addr: handle.local_addr().to_string(),
        handle: Some(handle),
        token,
        dir,
    }
}

fn pinned(cert: &Path) -> ClientConfig {
    ClientConfig {
        transport: ClientTransport::pinned(cert).unwrap(),
        ..ClientConfig::default()
    }
}

#[test]
fn a_client_pinning_the_certificate_is_served() {
    let s = serve("pinned", true, Duration::from_secs(5));
    let config = pinned(&s.dir.join(tls::CERT_FILE));
    let mut c = AuthorityClient::connect_with(&s.addr, &s.token, config).unwrap();
    assert_eq!(c.params().unwrap().batch_size(), 4);
    assert_eq!(c.col_keys(&[vec![1, 1, 0, 0]]).unwrap().len(), 1);
    assert_eq!(c.row_keys(&[vec![1, 2, 3, 4]]).unwrap().len(), 1);
    // Every request went over the one TLS connection.
    assert_eq!(c.connections(), 1);
    // A wrong token is still refused, inside TLS.
    let config = pinned(&s.dir.join(tls::CERT_FILE));
    let mut bad = AuthorityClient::connect_with(&s.addr, "intruder", config).unwrap();
    assert!(matches!(bad.params(), Err(ProtocolError::Refused { .. })));
    s.stop();
}

#[test]
fn a_client_pinning_another_certificate_is_refused() {
    let s = serve("wrongpin", true, Duration::from_secs(5));
    let other = tmpdir("wrongpin-other");
    init(&other);
    let start = Instant::now();
    let e = AuthorityClient::connect_with(&s.addr, &s.token, pinned(&other.join(tls::CERT_FILE)))
        .unwrap_err();
    match &e {
        ProtocolError::Tls(m) => assert!(m.contains("other than the pinned one"), "{m}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // Not retried: another attempt cannot change the certificate.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // The server reads the client's alert a moment later.
    std::thread::sleep(Duration::from_millis(300));
    let audit = s.stop();
    // Counted as a failed handshake before authentication, in a summary line.
    assert!(audit.contains("\"handshake\":1"), "{audit}");
}

#[test]
fn a_clear_text_client_of_a_tls_server_is_told_so() {
    let s = serve("plain-to-tls", true, Duration::from_secs(5));
    let start = Instant::now();
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    match c.params() {
        Err(ProtocolError::Server { message, .. }) => {
            assert!(message.contains("speaks TLS"), "{message}");
            assert!(message.contains("--insecure-plaintext"), "{message}");
        }
        other => panic!("expected the authority's error, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let audit = s.stop();
    assert!(audit.contains("\"handshake\":1"), "{audit}");
}

#[test]
fn a_tls_client_of_a_clear_text_server_is_told_so() {
    let s = serve("tls-to-plain", false, Duration::from_secs(5));
    let start = Instant::now();
    let e = AuthorityClient::connect_with(&s.addr, &s.token, pinned(&s.dir.join(tls::CERT_FILE)))
        .unwrap_err();
    match &e {
        ProtocolError::Tls(m) => assert!(m.contains("--insecure-plaintext"), "{m}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // The clear-text path is as before.
    let mut c = AuthorityClient::connect(&s.addr, &s.token).unwrap();
    assert_eq!(c.params().unwrap().batch_size(), 4);
    let audit = s.stop();
    assert!(audit.contains("\"handshake\":1"), "{audit}");
}

/// Waits for the server to close `t`; the time it took.
fn closed_after(t: &mut TcpStream, start: Instant) -> Duration {
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match t.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("still open after {:?}", start.elapsed())
            }
            Err(_) => return start.elapsed(),
        }
    }
}

#[test]
fn a_connection_stalled_in_the_handshake_is_closed_within_the_deadline() {
    let deadline = Duration::from_millis(800);
    let s = serve("stall", true, deadline);
    let cert = s.dir.join(tls::CERT_FILE);
    // The first bytes of a ClientHello, then nothing.
    let start = Instant::now();
    let mut partial = TcpStream::connect(&s.addr).unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x00]).unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(&s.addr).unwrap();
    // A full handshake, then no token.
    let tcp = TcpStream::connect(&s.addr).unwrap();
    let conn = rustls::ClientConnection::new(
        tls::pinned_client(&cert).unwrap(),
        tls::server_name(&s.addr).unwrap(),
    )
    .unwrap();
    let mut quiet = rustls::StreamOwned::new(conn, tcp);
    while quiet.conn.is_handshaking() {
        quiet.conn.complete_io(&mut quiet.sock).unwrap();
    }
    // Meanwhile a caller that sends its token at once is served.
    let mut c = AuthorityClient::connect_with(&s.addr, &s.token, pinned(&cert)).unwrap();
    assert_eq!(c.params().unwrap().batch_size(), 4);
    let limit = deadline + Duration::from_millis(1500);
    for (what, t) in [
        ("partial handshake", &mut partial),
        ("silent", &mut silent),
        ("handshake without a token", &mut quiet.sock),
    ] {
        let after = closed_after(t, start);
        assert!(after < limit, "{what}: closed after {after:?}");
    }
    assert!(start.elapsed() >= deadline - Duration::from_millis(100));
    let audit = s.stop();
    assert!(audit.contains("\"timeout\":3"), "{audit}");
}

#[cfg(unix)]
#[test]
fn the_private_key_is_written_0600_and_refused_when_others_can_read_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("keymode");
    init(&dir);
    let key = dir.join(tls::KEY_FILE);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.join(tls::CERT_FILE)), 0o644);
    assert!(authority::load_tls(&dir).is_ok());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = authority::load_tls(&dir).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
}

#[test]
fn generated_certificates_differ_and_pin_only_themselves() {
    let (a, _) = tls::generate_pair(&tls::default_names()).unwrap();
    let (b, _) = tls::generate_pair(&tls::default_names()).unwrap();
    assert_ne!(a, b);
    let dir = tmpdir("gen");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("s.pem"), dir.join("s.key"));
    let fp = tls::write_pair(&cert, &key, &["example.test".to_string()]).unwrap();
    assert_eq!(fp, tls::fingerprint(&tls::read_cert(&cert).unwrap()));
    assert_eq!(fp.len(), 64);
    // Not a certificate.
    std::fs::write(dir.join("junk.pem"), "hello").unwrap();
    assert!(tls::read_cert(&dir.join("junk.pem")).is_err());
    assert!(tls::pinned_client(&dir.join("missing.pem")).is_err());
}

/// The certificate's fingerprint pins it as well as a copy of the file; another
/// certificate's fingerprint is refused, and a malformed one is an error before connecting.
#[test]
fn a_client_pinning_the_fingerprint_is_served_and_another_refused() {
    let s = serve("fingerprint", true, Duration::from_secs(5));
    let hex = tls::fingerprint(&tls::read_cert(&s.dir.join(tls::CERT_FILE)).unwrap());
    let by_print = |hex: &str| ClientConfig {
        transport: ClientTransport::Tls(tls::pinned_client_fingerprint(hex).unwrap()),
        ..ClientConfig::default()
    };
    // As printed, upper-case with colons, or with a prefix.
    let colons: Vec<String> = hex
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect();
    for form in [hex.clone(), colons.join(":"), format!("sha256:{hex}")] {
        let mut c = AuthorityClient::connect_with(&s.addr, &s.token, by_print(&form)).unwrap();
        assert_eq!(c.params().unwrap().batch_size(), 4, "{form}");
    }
    let mut other = hex.clone().into_bytes();
    other[10] = if other[10] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).unwrap();
    match AuthorityClient::connect_with(&s.addr, &s.token, by_print(&other)) {
        Err(ProtocolError::Tls(m)) => assert!(m.contains("other than the pinned one"), "{m}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    for bad in ["", "abc", &hex[..62], &format!("{}zz", &hex[..62])] {
        assert!(tls::pinned_client_fingerprint(bad).is_err(), "{bad:?}");
    }
    s.stop();
}
