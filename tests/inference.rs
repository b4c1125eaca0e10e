//! Secure inference end to end, three processes on 127.0.0.1: the authority, `trainer
//! serve` and `client predict`. Predictions equal plain inference with the same quantized
//! first layer, for every input; bad queries are refused with a clear error while other
//! clients keep getting answers; a query under another authority's parameters is refused.

mod common;

use common::{fails, run, start_authority, start_service, stop_service, Served, CLIENT, TRAINER};
use cryptonn::inference::PredictionClient;
use cryptonn::protocol::{self, AuthorityClient, ProtocolError};
use fe::feip::{FeipEncryptor, FeipParams};
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

fn wdbc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nn/data/breast-cancer/wdbc.csv")
}

/// An authority for the breast-cancer table and a model simulated on it (bit-identical to
/// encrypted training), with the client's encoding.
struct Setup {
    dir: tempfile::TempDir,
    authority: Served,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let w = dir.path();
        let authority = start_authority(
            &w.join("auth"),
            &["--features", "30", "--classes", "2", "--batch-size", "16"],
        );
        run(Command::new(TRAINER)
            .args(["simulate", "--quiet", "--spec", "12", "--seed", "3"])
            .args(["--epochs", "2", "--batch-size", "16", "--data"])
            .arg(wdbc())
            .arg("--encoding")
            .arg(w.join("enc.json"))
            .arg("--out")
            .arg(w.join("model.bin")));
        Setup { dir, authority }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&self) -> Served {
        start_service(
            &self.path("model.bin"),
            &self.authority,
            self.dir.path(),
            &[],
        )
    }

    fn predict(&self, s: &Served, limit: usize, parallel: usize, out: &str) -> Command {
        self.predict_on(s, &wdbc(), limit, parallel, out)
    }

    /// `client predict` on the table `data`, encoded with the client's encoding.
    fn predict_on(
        &self,
        s: &Served,
        data: &Path,
        limit: usize,
        parallel: usize,
        out: &str,
    ) -> Command {
        let mut c = Command::new(CLIENT);
        c.args([
            "predict",
            "--quiet",
            "--server",
            &s.addr,
            "--server-token",
            &s.token,
        ])
        .args([
            "--authority",
            &self.authority.addr,
            "--token",
            &self.authority.token,
        ])
        .args(self.authority.tls_args())
        .args(s.tls_flags("--server-ca"))
        .arg("--data")
        .arg(data)
        .arg("--encoding")
        .arg(self.path("enc.json"))
        .args([
            "--limit",
            &limit.to_string(),
            "--parallel",
            &parallel.to_string(),
        ])
        .arg("--out")
        .arg(self.path(out));
        c
    }

    /// Plain quantized inference on the first `limit` rows, as class names and exact
    /// probabilities.
    fn plain(&self, limit: usize) -> Vec<Vec<String>> {
        let args = cryptonn::cli::DataArgs {
            data: Some(wdbc()),
            encoding: Some(self.path("enc.json")),
            limit: Some(limit),
            ..Default::default()
        };
        plain_predictions(&self.path("model.bin"), &args)
    }
}

/// Plain quantized inference (8 bits) of the model file `model` on `data`, as class names
/// and exact probabilities.
fn plain_predictions(model: &Path, data: &cryptonn::cli::DataArgs) -> Vec<Vec<String>> {
    let m = nn::Model::load(model).expect("model");
    let info = m.data().expect("description").clone();
    let set = data.load_eval(&info).expect("data");
    let q = nn::infer::QuantizedModel::new(m, 8).expect("quantize");
    q.predict_plain(&set)
        .expect("predict")
        .iter()
        .map(|p| {
            let mut row = vec![info.class_name(p.class).into_owned()];
            row.extend(p.probabilities.iter().map(|v| v.to_string()));
            row
        })
        .collect()
}

/// The predicted class and probabilities of every row of a `client predict` output.
fn read_predictions(path: &Path) -> Vec<Vec<String>> {
    let mut r = csv::Reader::from_path(path).expect("predictions");
    let header: Vec<String> = r
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    assert_eq!(header[0], "index");
    assert_eq!(header.last().map(String::as_str), Some("error"));
    r.records()
        .enumerate()
        .map(|(i, rec)| {
            let rec = rec.expect("record");
            assert_eq!(rec[0].parse::<usize>().ok(), Some(i));
            assert_eq!(&rec[rec.len() - 1], "", "row {i} was refused");
            rec.iter()
                .skip(1)
                .take(rec.len() - 2)
                .map(String::from)
                .collect()
        })
        .collect()
}

#[test]
fn served_predictions_equal_plain_quantized_inference_and_clients_run_concurrently() {
    let s = Setup::new();
    let service = s.serve();
    // Two clients at once, each with several queries in flight.
    let mut first = s.predict(&service, 120, 3, "a.csv");
    let mut second = s.predict(&service, 60, 2, "b.csv");
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| run(&mut first));
        let b = sc.spawn(|| run(&mut second));
        (a.join().expect("a"), b.join().expect("b"))
    });
    let plain = s.plain(120);
    let served = read_predictions(&s.path("a.csv"));
    assert_eq!(served.len(), 120);
    assert_eq!(served, plain, "encrypted and plain inference differ");
    assert_eq!(read_predictions(&s.path("b.csv")), plain[..60].to_vec());
    let stdout = String::from_utf8_lossy(&a.stdout);
    assert!(stdout.contains("120 predictions"), "{stdout}");
    assert!(stdout.contains("accuracy"), "{stdout}");
    assert!(String::from_utf8_lossy(&b.stdout).contains("60 predictions"));
    let log = stop_service(service, s.dir.path());
    assert!(log.contains("after 180 predictions"), "{log}");
    // The authority logged the service's one key request as inference keys for 12 rows.
    let audit = std::fs::read_to_string(s.path("auth/audit.log")).expect("audit");
    let inference: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"kind\":\"inference\""))
        .collect();
    assert_eq!(inference.len(), 1, "{audit}");
    assert!(inference[0].contains("\"count\":12"), "{}", inference[0]);
}

/// Writes the first `rows` rows of the breast-cancer table to `out` without the columns
/// `drop`.
fn wdbc_without(out: &Path, drop: &[&str], rows: usize) {
    let mut r = csv::Reader::from_path(wdbc()).expect("wdbc");
    let header = r.headers().expect("header").clone();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&j| !drop.contains(&&header[j]))
        .collect();
    assert_eq!(keep.len(), header.len() - drop.len(), "{drop:?}");
    let mut w = csv::Writer::from_path(out).expect("create");
    w.write_record(keep.iter().map(|&j| &header[j]))
        .expect("write");
    for rec in r.records().take(rows) {
        let rec = rec.expect("record");
        w.write_record(keep.iter().map(|&j| &rec[j]))
            .expect("write");
    }
    w.flush().expect("flush");
}

#[test]
fn a_table_without_labels_gets_the_same_predictions_and_no_accuracy() {
    let s = Setup::new();
    let queries = s.path("queries.csv");
    wdbc_without(&queries, &["diagnosis"], 20);
    let service = s.serve();
    let labelled = run(&mut s.predict(&service, 8, 2, "labelled.csv"));
    let unlabelled = run(&mut s.predict_on(&service, &queries, 8, 2, "unlabelled.csv"));
    let want = read_predictions(&s.path("labelled.csv"));
    let got = read_predictions(&s.path("unlabelled.csv"));
    assert_eq!(got.len(), 8);
    let classes = |p: &[Vec<String>]| p.iter().map(|r| r[0].clone()).collect::<Vec<_>>();
    assert_eq!(classes(&got), classes(&want));
    assert_eq!(got, want, "the probabilities differ too");
    let accuracy = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("accuracy"))
    };
    assert!(accuracy(&labelled));
    assert!(!accuracy(&unlabelled));
    let stdout = String::from_utf8_lossy(&unlabelled.stdout);
    assert!(stdout.contains("the data has no labels"), "{stdout}");
    assert!(stdout.contains("8 predictions"), "{stdout}");

    // A missing feature column is still an error that names it, before any query.
    let broken = s.path("broken.csv");
    wdbc_without(&broken, &["diagnosis", "mean texture"], 20);
    let err = fails(&mut s.predict_on(&service, &broken, 8, 2, "broken-out.csv"));
    assert!(err.contains("mean texture"), "{err}");
    assert!(!s.path("broken-out.csv").exists());
    let log = stop_service(service, s.dir.path());
    assert!(log.contains("after 16 predictions"), "{log}");
}

/// Sends `bytes` on a new TLS connection (pinned to `ca`) and reads one answer frame.
fn raw_exchange(
    addr: &str,
    ca: &Path,
    bytes: &[u8],
) -> Result<cryptonn::inference::PredictResponse, ProtocolError> {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let config = cryptonn::tls::pinned_client(ca).expect("certificate");
    let name = cryptonn::tls::server_name(addr).expect("name");
    let conn = rustls::ClientConnection::new(config, name).expect("tls");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(bytes).expect("write");
    s.flush().expect("flush");
    protocol::read_frame(&mut s)
}

/// Sets the flag when dropped, also while unwinding from a panic.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn bad_queries_are_refused_while_others_are_served() {
    let s = Setup::new();
    let service = s.serve();
    let params =
        AuthorityClient::connect_with(&s.authority.addr, &s.authority.token, s.authority.config())
            .and_then(|mut c| c.params())
            .expect("params");
    let fp = params.fingerprint();
    let enc = FeipEncryptor::new(&params.row);
    let good = enc.encrypt_to_bytes(&[100; 31]).expect("encrypt");
    let mut client =
        PredictionClient::connect_with(&service.addr, &service.token, service.config())
            .expect("connect");
    let want = client.predict(fp, good.clone()).expect("a good query");
    assert_eq!(want.probabilities.len(), 2);
    let server_error = |r: Result<nn::infer::Prediction, ProtocolError>| match r {
        Err(ProtocolError::Server { message, .. }) => message,
        other => panic!("expected the service's error, got {other:?}"),
    };

    // Meanwhile another client keeps getting the same answer.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        // A failed assertion below must stop the other client too, or the scope never ends.
        let _stop_on_exit = StopOnDrop(&stop);
        let other = sc.spawn(|| {
            let mut c =
                PredictionClient::connect_with(&service.addr, &service.token, service.config())
                    .expect("c");
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 3 {
                assert_eq!(c.predict(fp, good.clone()).expect("served"), want);
                n += 1;
            }
            n
        });
        // Another authority's parameters (named as such).
        let e = server_error(client.predict([7; 32], good.clone()));
        assert!(e.contains("other public parameters"), "{e}");
        // Bytes that are not a ciphertext.
        let e = server_error(client.predict(fp, vec![0xAB; 2000]));
        assert!(e.contains("does not decode"), "{e}");
        // A point that does not decode: the first element replaced by a non-canonical
        // encoding (every byte 0xFF is above the field's modulus), which no curve point has.
        // (Flipping bits instead gives another valid point about one time in eight.)
        let mut bad = good.clone();
        let at = bad.len() - 32 * 31;
        bad[at..at + 32].fill(0xFF);
        let e = server_error(client.predict(fp, bad));
        assert!(e.contains("does not decode"), "{e}");
        // The wrong length.
        let (short_pk, _) = fe::feip::setup::<fe::Ristretto>(FeipParams::new(20, 255).expect("p"));
        let short = FeipEncryptor::new(&short_pk)
            .encrypt_to_bytes(&[1; 20])
            .expect("enc");
        let e = server_error(client.predict(fp, short));
        assert!(e.contains("20 elements") && e.contains("31"), "{e}");
        // The right length under another key, claiming the right parameters.
        let (other_pk, _) = fe::feip::setup::<fe::Ristretto>(FeipParams::new(31, 255).expect("p"));
        let forged = FeipEncryptor::new(&other_pk)
            .encrypt_to_bytes(&[100; 31])
            .expect("enc");
        let e = server_error(client.predict(fp, forged));
        assert!(e.contains("does not decrypt"), "{e}");
        // The connection survived every refusal.
        assert_eq!(
            client.predict(fp, good.clone()).expect("still served"),
            want
        );

        // Frames: an oversized request and a malformed one, each closing its connection.
        let mut big = protocol::encode_request(&service.token, &()).expect("header");
        big.truncate(big.len() - 4);
        big.extend_from_slice(&(10u32 << 20).to_be_bytes());
        let ca = service.ca.clone().expect("a TLS service");
        match raw_exchange(&service.addr, &ca, &big) {
            Ok(cryptonn::inference::PredictResponse::Error(m)) => {
                assert!(m.contains("exceeds the limit"), "{m}")
            }
            other => panic!("oversized frame: {other:?}"),
        }
        let mut garbage = protocol::encode_request(&service.token, &()).expect("header");
        garbage.truncate(garbage.len() - 4);
        garbage.extend_from_slice(&5u32.to_be_bytes());
        garbage.extend_from_slice(&[9, 9, 9, 9, 9]);
        match raw_exchange(&service.addr, &ca, &garbage) {
            Ok(cryptonn::inference::PredictResponse::Error(m)) => {
                assert!(m.contains("malformed"), "{m}")
            }
            other => panic!("malformed frame: {other:?}"),
        }
        // A wrong token.
        let mut intruder =
            PredictionClient::connect_with(&service.addr, "not-the-token", service.config())
                .expect("c");
        assert!(matches!(
            intruder.predict(fp, good.clone()),
            Err(ProtocolError::Refused { .. })
        ));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(other.join().expect("other client") >= 3);
    });
    let log = stop_service(service, s.dir.path());
    // Five refused queries, none counted as a prediction.
    assert!(log.contains("(5 queries refused)"), "{log}");
}

#[test]
fn a_service_under_another_authority_is_refused_by_the_client() {
    let s = Setup::new();
    let service = s.serve();
    let other = start_authority(
        &s.path("other"),
        &["--features", "30", "--classes", "2", "--batch-size", "16"],
    );
    let e = fails(
        Command::new(CLIENT)
            .args([
                "predict",
                "--quiet",
                "--server",
                &service.addr,
                "--server-token",
                &service.token,
            ])
            .args(["--authority", &other.addr, "--token", &other.token])
            .args(other.tls_args())
            .args(service.tls_flags("--server-ca"))
            .arg("--data")
            .arg(wdbc())
            .arg("--encoding")
            .arg(s.path("enc.json"))
            .arg("--out")
            .arg(s.path("x.csv")),
    );
    assert!(e.contains("other public parameters"), "{e}");
    assert!(!s.path("x.csv").exists());
    drop(stop_service(service, s.dir.path()));
}

/// A convolutional first layer served over encrypted queries: the authority places the
/// service's kernels itself and issues one key per kernel and position; the answers equal
/// plain quantized inference for every image.
#[test]
fn a_convolutional_model_is_served_as_plain_quantized_inference() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("nn/data/digits-8x8");
    let init = ["--features", "64", "--classes", "10", "--x-bound", "16"];
    let authority = start_authority(
        &w.join("auth"),
        &[&init[..], &["--batch-size", "32"]].concat(),
    );
    let model = w.join("model.bin");
    run(Command::new(TRAINER)
        .args(["simulate", "--quiet", "--spec", "conv3x4p1-maxpool2-16"])
        .args([
            "--activation",
            "relu",
            "--epochs",
            "3",
            "--batch-size",
            "32",
        ])
        .args(["--x-bound", "16", "--limit", "640", "--data"])
        .arg(&digits)
        .arg("--out")
        .arg(&model));
    let service = start_service(&model, &authority, w, &[]);
    let out = w.join("predictions.csv");
    // Both certificates pinned by their fingerprints instead of copies of the files.
    let print = |s: &Served| {
        let cert = s.ca.as_deref().expect("a TLS server");
        cryptonn::tls::fingerprint(&cryptonn::tls::read_cert(cert).expect("certificate"))
    };
    let printed = run(Command::new(CLIENT)
        .args(["predict", "--quiet", "--server", &service.addr])
        .args(["--server-token", &service.token])
        .args(["--authority", &authority.addr, "--token", &authority.token])
        .args(["--ca-fingerprint", &print(&authority)])
        .args(["--server-ca-fingerprint", &print(&service)])
        .arg("--data")
        .arg(&digits)
        .args(["--limit", "24", "--parallel", "3", "--out"])
        .arg(&out));
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("accuracy"), "{printed}");
    let want = plain_predictions(
        &model,
        &cryptonn::cli::DataArgs {
            data: Some(digits),
            limit: Some(24),
            ..Default::default()
        },
    );
    assert_eq!(read_predictions(&out), want);
    let log = stop_service(service, w);
    assert!(
        log.contains("24 predictions") || log.contains("24 quer"),
        "{log}"
    );
}
