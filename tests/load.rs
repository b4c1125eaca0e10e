//! Load test of the authority binary on loopback: idle connections, slow senders and a flood
//! of random frames against it while legitimate callers keep asking for keys.
//!
//! `short_load_keeps_every_legitimate_request` is the short form run with the other tests
//! (a few seconds, fewer connections). `load_figures` is the full form, run by hand:
//!
//! ```text
//! cargo test --release -p cryptonn --test load -- --ignored --nocapture
//! ```
//!
//! and sized by `LOAD_IDLE` (1000), `LOAD_SLOW` (200), `LOAD_SECS` (20; the unloaded
//! figures are measured for half as long first) and `LOAD_REQUESTS` (fewest requests per
//! legitimate caller in each phase, 50).
//!
//! The attackers connect from other loopback addresses than the legitimate callers
//! (127.0.1.x, 127.0.2.x, 127.0.3.x, as many hosts would), spread so that none exceeds the
//! authority's cap on connections per address, so that the whole load reaches it. The
//! legitimate callers, all from 127.0.0.1, ask a thousand times a second together: the
//! authority runs with its rate per address lifted (`--peer-rate`), which touches only
//! authenticated requests, none of the attack's.
#![allow(clippy::unwrap_used)]

mod common;

use common::Served;
use cryptonn::authority::{self, InitOptions};
use cryptonn::protocol::{self, AuthorityClient, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A served authority and its key directory.
struct Authority {
    served: Served,
    dir: PathBuf,
}

impl std::ops::Deref for Authority {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.served
    }
}

fn start(name: &str) -> Authority {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("load-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    authority::init(&dir, nn::mnist::info(), 8, &InitOptions::default()).unwrap();
    Authority {
        served: common::serve(&dir, &["--peer-rate", "1000000", "--peer-burst", "1000000"]),
        dir,
    }
}

/// The peak resident memory of a process, in KiB (Linux).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sixteen dense 8-bit row vectors: a modest training step's forward keys.
fn rows(seed: i64) -> Vec<Vec<i64>> {
    (0..16)
        .map(|j| {
            (0..(nn::mnist::FEATURES + 1) as i64)
                .map(|i| ((i * 31 + j * 7 + seed) % 255) - 127)
                .collect()
        })
        .collect()
}

#[derive(Default)]
struct Calls {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    /// Connections opened beyond one per request (fresh) or one in all: the retries.
    reconnections: u64,
}

/// One legitimate caller: `n` requests of 16 row keys, each on a new connection when `fresh`
/// (as `client encrypt` connects) or all on one (as a trainer does); keeps going past `n`
/// until `until` is set.
fn caller(a: &Served, n: usize, fresh: bool, until: Option<&AtomicBool>) -> Calls {
    let (addr, token, config) = (a.addr.as_str(), a.token.as_str(), a.config());
    let mut out = Calls::default();
    let mut conn: Option<AuthorityClient> = None;
    let mut i = 0;
    while i < n || until.is_some_and(|u| !u.load(Ordering::SeqCst)) {
        let ys = rows(i as i64);
        let t = Instant::now();
        let r = (|| {
            if fresh || conn.is_none() {
                if let Some(old) = &conn {
                    out.reconnections += old.connections().saturating_sub(1);
                }
                conn = Some(AuthorityClient::connect_with(addr, token, config.clone())?);
            }
            let c = conn
                .as_mut()
                .ok_or_else(|| protocol::ProtocolError::Unexpected("no connection".into()))?;
            c.row_keys(&ys)
        })();
        match r {
            Ok(k) if k.len() == ys.len() => out.latencies.push(t.elapsed()),
            Ok(k) => out
                .failures
                .push(format!("{} keys for {}", k.len(), ys.len())),
            Err(e) => out.failures.push(e.to_string()),
        }
        i += 1;
    }
    if let Some(c) = &conn {
        out.reconnections += c.connections().saturating_sub(1);
    }
    out
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Addresses the idle connections come from: 1,000 of them are about 16 per address, half
/// the authority's default cap per address.
const IDLE_HOSTS: u8 = 64;
/// Addresses of the slow senders.
const SLOW_HOSTS: u8 = 16;
/// Addresses of the flood of random frames.
const FLOOD_HOSTS: u8 = 8;

/// A connection to `addr` from the loopback address `from`.
fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> Option<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::new(from.into(), 0).into()).ok()?;
    s.connect_timeout(&addr.into(), Duration::from_secs(1))
        .ok()?;
    Some(s.into())
}

#[derive(Default)]
struct Attack {
    connections: AtomicU64,
    flood_frames: AtomicU64,
    slow_bytes: AtomicU64,
}

/// Starts the attackers; they run until `stop` is set.
fn attack(
    addr: SocketAddr,
    idle: usize,
    slow: usize,
    stop: &Arc<AtomicBool>,
    stats: &Arc<Attack>,
) -> Vec<std::thread::JoinHandle<()>> {
    // From `hosts` addresses 127.0.`net`.1, 127.0.`net`.2, ..., in turn.
    let open = move |net: u8, hosts: u8, k: &mut u64| {
        *k += 1;
        let host = 1 + (*k % u64::from(hosts)) as u8;
        connect_from(std::net::Ipv4Addr::new(127, 0, net, host), addr)
    };
    let mut threads = Vec::new();
    // Idle connections that never send a byte: `idle` held at once, the oldest replaced by
    // a new one every millisecond (the authority closes them; an attacker reconnects).
    let (s, st) = (stop.clone(), stats.clone());
    threads.push(std::thread::spawn(move || {
        let mut held = std::collections::VecDeque::new();
        let mut k = 0;
        while !s.load(Ordering::SeqCst) {
            if let Some(c) = open(1, IDLE_HOSTS, &mut k) {
                st.connections.fetch_add(1, Ordering::Relaxed);
                held.push_back(c);
            }
            if held.len() > idle {
                held.pop_front();
            }
            if held.len() >= idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }));
    // Slow senders: one byte of a real header every 2 s on each, reopened when closed.
    let (s, st) = (stop.clone(), stats.clone());
    threads.push(std::thread::spawn(move || {
        let mut header = (10u32).to_be_bytes().to_vec();
        header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header.extend_from_slice(&100u64.to_le_bytes());
        let mut conns: Vec<(Option<TcpStream>, usize)> = (0..slow).map(|_| (None, 0)).collect();
        let mut k = 0;
        while !s.load(Ordering::SeqCst) {
            for (c, sent) in conns.iter_mut() {
                if c.is_none() {
                    *c = open(2, SLOW_HOSTS, &mut k);
                    *sent = 0;
                    st.connections.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(t) = c {
                    let b = header[*sent % header.len()];
                    if t.write_all(&[b]).is_ok() {
                        *sent += 1;
                        st.slow_bytes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        *c = None;
                    }
                }
            }
            for _ in 0..20 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }));
    // A flood of random frames, each on a new connection, as fast as answers come.
    for k in 0..2u64 {
        let (s, st) = (stop.clone(), stats.clone());
        threads.push(std::thread::spawn(move || {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (k + 1);
            let mut n = k;
            while !s.load(Ordering::SeqCst) {
                let Some(mut t) = open(3, FLOOD_HOSTS, &mut n) else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::Relaxed);
                let _ = t.set_read_timeout(Some(Duration::from_secs(1)));
                let len = (xorshift(&mut seed) % 2048) as usize;
                let mut frame = if xorshift(&mut seed).is_multiple_of(4) {
                    // An enormous announced length.
                    (xorshift(&mut seed) as u32 | 1 << 31)
                        .to_be_bytes()
                        .to_vec()
                } else {
                    (len as u32).to_be_bytes().to_vec()
                };
                frame.extend((0..len).map(|_| xorshift(&mut seed) as u8));
                if t.write_all(&frame).is_ok() {
                    let mut buf = [0u8; 512];
                    let _ = t.read(&mut buf);
                    st.flood_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    threads
}

struct Figures {
    unloaded: (f64, f64),
    loaded: (f64, f64),
    requests: usize,
    loaded_requests: usize,
    reconnections: u64,
    failures: Vec<String>,
    peak_rss_mib: f64,
    load_secs: f64,
    connections: u64,
    flood_frames: u64,
    slow_bytes: u64,
    audit_lines: u64,
    audit_intact: bool,
}

fn run(name: &str, idle: usize, slow: usize, secs: f64, requests: usize) -> Figures {
    let a = start(name);
    let addr: SocketAddr = a.addr.parse().unwrap();
    // Unloaded: 4 callers, two on fresh connections, two on one connection each, for half
    // as long as the load.
    let callers = |secs: f64| -> Vec<Calls> {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let (served, done) = (&a.served, &done);
                    s.spawn(move || caller(served, requests, i % 2 == 0, Some(done)))
                })
                .collect();
            std::thread::sleep(Duration::from_secs_f64(secs));
            done.store(true, Ordering::SeqCst);
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let unloaded = callers(secs / 2.0);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Attack::default());
    let threads = attack(addr, idle, slow, &stop, &stats);
    let started = Instant::now();
    // Let the attack build up before measuring.
    let warmup = (secs / 4.0).min(2.0);
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let loaded = callers(secs - warmup);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let load_secs = started.elapsed().as_secs_f64();
    let peak = peak_rss_kib(a.child.id()).unwrap_or(0);
    let mut failures = Vec::new();
    let mut lat_u: Vec<Duration> = Vec::new();
    for c in unloaded {
        lat_u.extend(c.latencies);
        failures.extend(c.failures);
    }
    let mut lat_l: Vec<Duration> = Vec::new();
    let mut reconnections = 0;
    for c in loaded {
        lat_l.extend(c.latencies);
        failures.extend(c.failures);
        reconnections += c.reconnections;
    }
    let requests = lat_u.len() + lat_l.len() + failures.len();
    let audit_path = a.dir.join(authority::AUDIT_FILE);
    drop(a);
    let report = authority::audit::verify(&audit_path).unwrap();
    Figures {
        unloaded: (percentile(&mut lat_u, 0.5), percentile(&mut lat_u, 0.99)),
        loaded: (percentile(&mut lat_l, 0.5), percentile(&mut lat_l, 0.99)),
        loaded_requests: lat_l.len(),
        reconnections,
        requests,
        failures,
        peak_rss_mib: peak as f64 / 1024.0,
        load_secs,
        connections: stats.connections.load(Ordering::Relaxed),
        flood_frames: stats.flood_frames.load(Ordering::Relaxed),
        slow_bytes: stats.slow_bytes.load(Ordering::Relaxed),
        audit_lines: report.lines,
        audit_intact: report.intact(),
    }
}

fn print(f: &Figures, idle: usize, slow: usize) {
    println!(
        "load {:.1} s: {idle} idle (replaced every ms), {slow} slow senders ({} bytes), {} \
         random frames, {} attacking connections; {} legitimate requests of 16 row keys ({} \
         under load, {} retried on a new connection), {} failed; latency p50 / p99 unloaded \
         {:.1} / {:.1} ms, under load {:.1} / {:.1} ms; authority peak RSS {:.1} MiB; audit \
         log {} lines, chain {}",
        f.load_secs,
        f.slow_bytes,
        f.flood_frames,
        f.connections,
        f.requests,
        f.loaded_requests,
        f.reconnections,
        f.failures.len(),
        f.unloaded.0,
        f.unloaded.1,
        f.loaded.0,
        f.loaded.1,
        f.peak_rss_mib,
        f.audit_lines,
        if f.audit_intact { "intact" } else { "BROKEN" },
    );
}

#[test]
fn short_load_keeps_every_legitimate_request() {
    let (idle, slow) = (150, 30);
    let f = run("short", idle, slow, 3.0, 5);
    print(&f, idle, slow);
    assert!(f.failures.is_empty(), "{:?}", f.failures);
    assert!(f.requests >= 40);
    assert!(f.flood_frames > 0 && f.slow_bytes > 0);
    assert!(
        f.peak_rss_mib > 0.0 && f.peak_rss_mib < 256.0,
        "{}",
        f.peak_rss_mib
    );
    assert!(f.audit_intact);
    // Thousands of failed connections, summarised: one line per issued request, and only a
    // few more for all the failures (a summary per 1,000 failures of an address, and the
    // periodic ones).
    assert!(f.connections > 200, "{}", f.connections);
    assert!(
        f.audit_lines
            <= f.requests as u64
                + 10
                + u64::from(IDLE_HOSTS + SLOW_HOSTS + FLOOD_HOSTS)
                + f.connections / 500,
        "{} lines for {} requests",
        f.audit_lines,
        f.requests
    );
}

#[test]
#[ignore]
fn load_figures() {
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (idle, slow) = (
        env("LOAD_IDLE", 1000.0) as usize,
        env("LOAD_SLOW", 200.0) as usize,
    );
    let f = run(
        "figures",
        idle,
        slow,
        env("LOAD_SECS", 20.0),
        env("LOAD_REQUESTS", 50.0) as usize,
    );
    print(&f, idle, slow);
    assert!(f.failures.is_empty(), "{:?}", f.failures);
}
