//! Bounded property-test fuzzing of the decoders of outside input: a request's header and
//! body frames, response frames, and the audit-log parser. Random and mutated inputs must
//! never panic, and decoding must never allocate past the bound its documentation states:
//! a header read holds at most `MAX_HEADER` bytes (twice, with the token's copy); a frame
//! read holds at most twice the bytes that arrived plus 65 KiB (never the announced length);
//! decoding holds at most 16 times its input plus 2 MiB; a line read holds at most twice its
//! bound. Allocation is measured with a counting global allocator, so this
//! file has a single test (other tests' threads would be counted too).
//!
//! Runs about 2,800 cases in a few seconds in a debug build; set `PROPTEST_CASES` to run
//! that many cases for each property instead.
#![allow(clippy::unwrap_used)]

use cryptonn::authority::audit::{self, AuditEntry, AuditLimits, AuditLog, KeyKind, Outcome};
use cryptonn::protocol::{self, FeboKeyRequest, ProtocolError, Request, Response, MAX_HEADER};
use fe::febo::Op;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::io::BufReader;
use std::path::{Path, PathBuf};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Runs `f` and returns its result with the bytes it allocated in all (an upper bound on
/// what it held at once).
fn allocated<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let out = f();
    (out, region.change().bytes_allocated)
}

fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn request() -> impl Strategy<Value = Request> {
    let vecs = prop::collection::vec(prop::collection::vec(any::<i32>(), 0..40), 0..6);
    let febo = prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..40),
            prop_oneof![Just(Op::Add), Just(Op::Sub), Just(Op::Mul), Just(Op::Div)],
            any::<i64>(),
        )
            .prop_map(|(commitment, op, operand)| FeboKeyRequest {
                commitment,
                op,
                operand,
            }),
        0..6,
    );
    prop_oneof![
        Just(Request::Params),
        vecs.clone().prop_map(Request::RowKeys),
        vecs.clone().prop_map(Request::ColKeys),
        vecs.clone().prop_map(Request::ConvColKeys),
        febo.prop_map(Request::FeboKeys),
        (any::<[u8; 16]>(), any::<u32>(), 0u32..2000).prop_map(|(dataset, first, count)| {
            Request::BatchColParams {
                dataset,
                first,
                count,
            }
        }),
        (any::<[u8; 16]>(), any::<u32>(), any::<bool>(), vecs).prop_map(
            |(dataset, batch, conv, vectors)| Request::BoundColKeys {
                batch: cryptonn::protocol::BatchId { dataset, batch },
                conv,
                vectors,
            }
        ),
    ]
}

/// A mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    /// Overwrite 4 bytes (a length prefix, say) with a big-endian number.
    Length(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u32>()).prop_map(|(i, n)| Mutation::Length(i, n)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, ms: &[Mutation]) {
    for m in ms {
        let n = bytes.len();
        match *m {
            Mutation::Set(i, b) if n > 0 => bytes[i % n] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Mutation::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            Mutation::Length(i, v) if n >= 4 => {
                let at = i % (n - 3);
                bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
    }
}

/// What the authority does with a connection's bytes, without the network: read a header
/// (bounded by `MAX_HEADER`), then the body up to `limit`, then decode it.
fn serve_bytes(bytes: &[u8], limit: usize) -> Result<Option<Request>, TestCaseError> {
    let mut r = bytes;
    let (header, n) = allocated(|| protocol::read_request_header(&mut r));
    prop_assert!(
        n <= 2 * MAX_HEADER + 1024,
        "reading a header allocated {n} bytes"
    );
    if header.is_err() {
        return Ok(None);
    }
    let before = r.len();
    let (body, n) = allocated(|| protocol::read_frame_bytes(&mut r, limit));
    let arrived = before - r.len();
    prop_assert!(
        n <= 2 * arrived + (65 << 10),
        "reading a frame of which {arrived} bytes arrived allocated {n} bytes"
    );
    let Ok(body) = body else { return Ok(None) };
    prop_assert!(body.len() <= limit);
    // serde preallocates at most 1 MiB for each sequence it starts; the rest is backed by
    // input bytes.
    let (req, n) = allocated(|| protocol::decode::<Request>(&body));
    prop_assert!(
        n <= 16 * body.len() + (2 << 20),
        "decoding {} bytes allocated {n} bytes",
        body.len()
    );
    Ok(req.ok())
}

fn frames() {
    // Random bytes.
    runner(600)
        .run(&prop::collection::vec(any::<u8>(), 0..6000), |bytes| {
            serve_bytes(&bytes, 1 << 20)?;
            Ok(())
        })
        .unwrap();
    // Random bytes behind a plausible header length and the right version.
    runner(400)
        .run(
            &(0u32..5000, prop::collection::vec(any::<u8>(), 0..6000)),
            |(len, rest)| {
                let mut bytes = len.to_be_bytes().to_vec();
                bytes.extend_from_slice(&protocol::PROTOCOL_VERSION.to_le_bytes());
                bytes.extend_from_slice(&rest);
                serve_bytes(&bytes, 1 << 20)?;
                Ok(())
            },
        )
        .unwrap();
    // Valid requests, mutated: decode as something or fail, never panic; unmutated ones
    // decode to themselves.
    runner(600)
        .run(
            &(
                "[!-~]{0,80}",
                request(),
                prop::collection::vec(mutation(), 0..4),
            ),
            |(token, req, ms)| {
                let mut bytes = protocol::encode_request(&token, &req).unwrap();
                if ms.is_empty() {
                    prop_assert_eq!(serve_bytes(&bytes, 1 << 20)?, Some(req));
                    let mut r = bytes.as_slice();
                    prop_assert_eq!(protocol::read_request_header(&mut r).unwrap().token, token);
                } else {
                    mutate(&mut bytes, &ms);
                    serve_bytes(&bytes, 1 << 20)?;
                }
                Ok(())
            },
        )
        .unwrap();
    // Responses as the client reads them (any length up to MAX_FRAME may be announced).
    runner(400)
        .run(
            &(
                prop_oneof![
                    "[ -~]{0,60}".prop_map(Response::Refused),
                    "[ -~]{0,60}".prop_map(Response::Busy),
                    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..5)
                        .prop_map(Response::FeipSecrets),
                ],
                prop::collection::vec(mutation(), 0..4),
            ),
            |(resp, ms)| {
                let mut bytes = Vec::new();
                protocol::write_frame(&mut bytes, &resp).unwrap();
                let pristine = ms.is_empty();
                mutate(&mut bytes, &ms);
                let mut r = bytes.as_slice();
                let (got, n) = allocated(|| protocol::read_frame::<Response, _>(&mut r));
                prop_assert!(
                    n <= 16 * bytes.len() + (2 << 20),
                    "reading a {}-byte response allocated {n} bytes",
                    bytes.len()
                );
                if pristine {
                    prop_assert_eq!(got.unwrap(), resp);
                } else if let Err(e) = got {
                    let unavailable = matches!(e, ProtocolError::Unavailable { .. });
                    prop_assert!(!unavailable, "{}", e);
                }
                Ok(())
            },
        )
        .unwrap();
}

fn tmpdir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small valid log (start, requests, a rotation, summaries, stop) and its files' bytes.
fn valid_log(dir: &Path) -> PathBuf {
    let path = dir.join("audit.log");
    let log = AuditLog::open_with(
        &path,
        AuditLimits {
            max_bytes: audit::MIN_MAX_BYTES,
            max_files: 2,
            ..AuditLimits::default()
        },
    )
    .unwrap();
    for i in 0..16 {
        let mut e = AuditEntry::new("10.1.2.3:4000", KeyKind::Row, Outcome::Issued, 2);
        e.keys = vec![
            audit::feip_record(KeyKind::Row, &[i, 1]),
            audit::feip_record(KeyKind::Row, &[i, 2]),
        ];
        log.record(&e).unwrap();
        if i % 7 == 0 {
            let mut e = AuditEntry::new("10.1.2.3:4001", KeyKind::Col, Outcome::Refused, 1);
            e.reason = Some(format!("refusal {i}"));
            log.record(&e).unwrap();
            log.failure("10.9.9.9", audit::Failure::Malformed, "garbage");
        }
    }
    log.close().unwrap();
    path
}

fn audit_log() {
    let dir = tmpdir();
    let path = valid_log(&dir);
    assert!(audit::verify(&path).unwrap().intact());
    let files: Vec<(PathBuf, Vec<u8>)> = audit::verify(&path)
        .unwrap()
        .files
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).unwrap();
            (f, b)
        })
        .collect();
    assert!(files.len() >= 2, "the log did not rotate");
    // The case the property test once found: a file cut by its final newline only.
    for (f, original) in &files {
        std::fs::write(f, &original[..original.len() - 1]).unwrap();
        let report = audit::verify(&path).unwrap();
        std::fs::write(f, original).unwrap();
        assert!(!report.intact(), "{} without its last newline", f.display());
    }
    // Another it found: a rotated file emptied passed for one rotated away.
    for (f, original) in files.iter().filter(|(f, _)| *f != path) {
        std::fs::write(f, b"").unwrap();
        let report = audit::verify(&path).unwrap();
        std::fs::write(f, original).unwrap();
        assert!(!report.intact(), "{} emptied", f.display());
    }
    // Any change to any file of a valid log is detected, and nothing panics.
    runner(120)
        .run(
            &(0..files.len(), prop::collection::vec(mutation(), 1..4)),
            |(which, ms)| {
                let (f, original) = &files[which];
                let mut bytes = original.clone();
                mutate(&mut bytes, &ms);
                std::fs::write(f, &bytes).unwrap();
                let report = audit::verify(&path);
                std::fs::write(f, original).unwrap();
                let report = report.unwrap();
                if &bytes != original {
                    prop_assert!(!report.intact(), "undetected change to {}", f.display());
                }
                Ok(())
            },
        )
        .unwrap();
    assert!(audit::verify(&path).unwrap().intact());
    // Random files: a report, never a panic.
    runner(120)
        .run(&prop::collection::vec(any::<u8>(), 0..3000), |mut bytes| {
            // Many short lines that look a little like JSON.
            for b in bytes.iter_mut() {
                *b = match *b % 16 {
                    0 => b'\n',
                    1 => b'{',
                    2 => b'"',
                    _ => *b,
                };
            }
            std::fs::write(&path, &bytes).unwrap();
            let report = audit::verify(&path).unwrap();
            prop_assert!(report.lines <= bytes.len() as u64 + 1000);
            Ok(())
        })
        .unwrap();
    // Line reading holds at most its bound (plus the reader's buffer, made outside).
    runner(500)
        .run(
            &(1usize..300, prop::collection::vec(any::<u8>(), 0..5000)),
            |(max, bytes)| {
                let mut r = BufReader::with_capacity(512, bytes.as_slice());
                let mut buf = Vec::new();
                loop {
                    let (read, n) =
                        allocated(|| audit::read_line_bounded(&mut r, &mut buf, max).unwrap());
                    prop_assert!(buf.len() <= max);
                    prop_assert!(n <= 2 * max + 64, "a line of at most {max} allocated {n}");
                    if read == audit::LineRead::Eof {
                        break;
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn decoders_never_panic_nor_allocate_past_their_bounds() {
    frames();
    audit_log();
}
