//! End to end over TCP on data that is not MNIST-shaped: a real table (Wisconsin breast
//! cancer, 30 real-valued columns, string labels) and a real image set of another shape and
//! bound (8x8 digits, values 0..=16). Encrypted training equals the simulation bit for bit;
//! mismatched data and conflicting resumes are refused with errors that say why.

mod common;

use common::{fails, run, serve_on, start_authority, train_with, Served, CLIENT, TRAINER};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn client(a: &Served) -> Command {
    let mut c = Command::new(CLIENT);
    c.args([
        "encrypt",
        "--quiet",
        "--authority",
        &a.addr,
        "--token",
        &a.token,
    ])
    .args(a.tls_args());
    c
}

const MODEL: [&str; 6] = ["--spec", "12", "--seed", "3", "--epochs", "2"];

/// Encrypts `data` (first `limit` samples), trains over TCP, simulates with the client's
/// encoding, and checks both model files are byte-identical; returns the work directory.
fn encrypted_equals_simulated(
    model: &[&str],
    init: &[&str],
    data: &Path,
    limit: usize,
    batch: usize,
    x: &str,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let mut args = init.to_vec();
    let b = batch.to_string();
    args.extend(["--batch-size", &b]);
    let a = start_authority(&w.join("auth"), &args);
    let enc = w.join("train.enc");
    let lim = limit.to_string();
    run(client(&a)
        .arg("--data")
        .arg(data)
        .args(["--limit", &lim, "--out"])
        .arg(&enc));
    let encoding = w.join("train.enc.encoding.json");
    assert!(
        encoding.exists(),
        "the client writes its encoding beside the output"
    );
    run(train_with(&a)
        .args(model)
        .arg("--data")
        .arg(&enc)
        .arg("--out")
        .arg(w.join("secure.bin"))
        .arg("--dlog-table")
        .arg(w.join("dlog.bin")));
    run(Command::new(TRAINER)
        .args(["simulate", "--quiet"])
        .args(model)
        .arg("--data")
        .arg(data)
        .arg("--encoding")
        .arg(&encoding)
        .args(["--limit", &lim, "--batch-size", &b, "--x-bound", x, "--out"])
        .arg(w.join("sim.bin")));
    assert_eq!(
        std::fs::read(w.join("secure.bin")).expect("model"),
        std::fs::read(w.join("sim.bin")).expect("model"),
        "encrypted and simulated training must give bit-identical weights"
    );
    dir
}

#[test]
fn a_real_table_trains_encrypted_as_simulated() {
    let csv = fixture("nn/data/breast-cancer/wdbc.csv");
    let init = ["--features", "30", "--classes", "2"];
    let dir = encrypted_equals_simulated(&MODEL, &init, &csv, 96, 16, "255");
    // the experimenter scores the model on the table with the client's encoding
    let out = run(Command::new(TRAINER)
        .args(["evaluate", "--model"])
        .arg(dir.path().join("secure.bin"))
        .arg("--data")
        .arg(&csv)
        .arg("--encoding")
        .arg(dir.path().join("train.enc.encoding.json")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("569 samples"));
    // without the encoding, real values are not silently re-encoded
    let e = fails(
        Command::new(TRAINER)
            .args(["evaluate", "--model"])
            .arg(dir.path().join("secure.bin"))
            .arg("--data")
            .arg(&csv),
    );
    assert!(e.contains("--encoding"), "{e}");
}

#[test]
fn an_image_set_of_another_shape_and_bound_trains_encrypted_as_simulated() {
    encrypted_equals_simulated(
        &MODEL,
        &["--features", "64", "--classes", "10", "--x-bound", "16"],
        &fixture("nn/data/digits-8x8"),
        64,
        16,
        "16",
    );
}

/// A convolutional first layer over the encrypted images: forward keys for its placed
/// kernels, backward keys per position and kernel, gradients summed in the group; eight
/// steps give the simulation's weights bit for bit.
#[test]
fn a_convolutional_first_layer_trains_encrypted_as_simulated() {
    let model = [
        "--spec",
        "conv3x4p1-maxpool2-16",
        "--activation",
        "relu",
        "--seed",
        "3",
        "--epochs",
        "2",
    ];
    encrypted_equals_simulated(
        &model,
        &["--features", "64", "--classes", "10", "--x-bound", "16"],
        &fixture("nn/data/digits-8x8"),
        64,
        16,
        "16",
    );
}

#[test]
fn mismatched_data_is_refused_before_encryption() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let a = start_authority(&w.join("auth"), &["--batch-size", "8"]);
    let out = w.join("never.enc");
    let e = fails(
        client(&a)
            .arg("--data")
            .arg(fixture("nn/data/breast-cancer/wdbc.csv"))
            .arg("--out")
            .arg(&out),
    );
    assert!(e.contains("30 features") && e.contains("784"), "{e}");
    assert!(e.contains("2 classes") && e.contains("10"), "{e}");
    assert!(!out.exists());
    assert!(
        !w.join("never.enc.encoding.json").exists(),
        "nothing is written for refused data"
    );
    // the digits' values fit 255, but are 64 features
    let e = fails(
        client(&a)
            .arg("--data")
            .arg(fixture("nn/data/digits-8x8"))
            .arg("--out")
            .arg(&out),
    );
    assert!(e.contains("64 features"), "{e}");
    // a bad label column is named
    let e = fails(
        client(&a)
            .arg("--data")
            .arg(fixture("nn/data/breast-cancer/wdbc.csv"))
            .args(["--label-column", "nope", "--out"])
            .arg(&out),
    );
    assert!(e.contains("\"nope\""), "{e}");
}

/// `trainer simulate` on the 8x8 digits in batches of 32.
fn simulate_digits() -> Command {
    let mut c = Command::new(TRAINER);
    c.args([
        "simulate",
        "--quiet",
        "--batch-size",
        "32",
        "--x-bound",
        "16",
    ])
    .arg("--data")
    .arg(fixture("nn/data/digits-8x8"));
    c
}

#[test]
fn resuming_with_a_conflicting_flag_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let ck = w.join("ckpt.bin");
    // the base flags, each replaceable by an override
    let sim = |over: &[(&str, &str)]| {
        let mut c = simulate_digits();
        c.arg("--checkpoint")
            .arg(&ck)
            .arg("--out")
            .arg(w.join("m.bin"));
        let base = [
            ("--spec", "8"),
            ("--limit", "128"),
            ("--lr", "0.01"),
            ("--bits", "8"),
        ];
        for (flag, value) in base {
            let v = over
                .iter()
                .find(|(f, _)| *f == flag)
                .map_or(value, |(_, v)| *v);
            c.args([flag, v]);
        }
        for (flag, value) in over
            .iter()
            .filter(|(f, _)| !base.iter().any(|(b, _)| b == f))
        {
            c.args([*flag, *value]);
        }
        c
    };
    run(&mut sim(&[("--stop-after", "1")]));
    assert!(ck.exists());
    for (flag, value) in [
        ("--lr", "0.02"),
        ("--spec", "9"),
        ("--bits", "7"),
        ("--limit", "96"),
        ("--optimizer", "sgd"),
    ] {
        let e = fails(&mut sim(&[(flag, value)]));
        let named = if flag == "--limit" { "--data" } else { flag };
        assert!(
            e.contains(&format!("checkpoint was made with {named}")),
            "{flag}: {e}"
        );
    }
    run(&mut sim(&[]));
    assert!(w.join("m.bin").exists());
}

#[test]
fn client_input_noise_is_validated_and_encrypts() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let a = start_authority(
        &w.join("auth"),
        &[
            "--features",
            "64",
            "--classes",
            "10",
            "--x-bound",
            "16",
            "--batch-size",
            "16",
        ],
    );
    let digits = fixture("nn/data/digits-8x8");
    let out = w.join("noisy.enc");
    let e = fails(
        client(&a)
            .arg("--data")
            .arg(&digits)
            .args(["--input-noise=-1", "--out"])
            .arg(&out),
    );
    assert!(e.contains("--input-noise") && e.contains("-1"), "{e}");
    assert!(!out.exists());
    run(client(&a)
        .arg("--data")
        .arg(&digits)
        .args(["--input-noise", "2", "--limit", "32", "--out"])
        .arg(&out));
    let h = cryptonn::dataset::Reader::open(&out).expect("a valid file");
    assert_eq!(h.header().num_samples, 32);
}

/// `trainer simulate` on a convolutional network: trained through the first-layer seam over
/// the images' patches, written to a model file that `trainer evaluate` scores, resumed from
/// a checkpoint bit for bit; a convolution on data without an image shape is refused.
#[test]
fn a_convolutional_network_trains_in_simulation_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let sim = |out: &Path, extra: &[&str]| {
        let mut c = simulate_digits();
        c.args(["--spec", "conv3x4p1-maxpool2-16", "--activation", "relu"])
            .args(["--limit", "320", "--epochs", "2", "--seed", "5"])
            .arg("--out")
            .arg(out)
            .args(extra);
        c
    };
    let whole = w.join("whole.bin");
    let printed = String::from_utf8_lossy(&run(&mut sim(&whole, &[])).stdout).into_owned();
    assert!(
        printed.contains("1x8x8-conv3x4p1-maxpool2-64-16-10"),
        "{printed}"
    );
    let ck = w.join("ckpt.bin");
    let ck_arg = ck.to_str().expect("path");
    let resumed = w.join("resumed.bin");
    run(&mut sim(
        &resumed,
        &["--checkpoint", ck_arg, "--stop-after", "7"],
    ));
    run(&mut sim(&resumed, &["--checkpoint", ck_arg]));
    assert_eq!(
        std::fs::read(&whole).expect("whole"),
        std::fs::read(&resumed).expect("resumed"),
        "a resumed run equals the uninterrupted one"
    );
    let score = run(Command::new(TRAINER)
        .args(["evaluate", "--model"])
        .arg(&whole)
        .arg("--data")
        .arg(fixture("nn/data/digits-8x8")));
    let score = String::from_utf8_lossy(&score.stdout);
    let acc: f64 = score
        .split("test accuracy ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {score}"));
    assert!(acc > 40.0, "{score}");
    // The first convolution quantized as a prediction service would compute it.
    let quantized = run(Command::new(TRAINER)
        .args(["evaluate", "--bits", "8", "--model"])
        .arg(&whole)
        .arg("--data")
        .arg(fixture("nn/data/digits-8x8")));
    let quantized = String::from_utf8_lossy(&quantized.stdout);
    assert!(quantized.contains("quantized to 8 bits"), "{quantized}");
    // A table has no image shape for a convolution to read.
    let e = fails(
        Command::new(TRAINER)
            .args(["simulate", "--quiet", "--spec", "lenet5", "--data"])
            .arg(fixture("nn/data/breast-cancer/wdbc.csv"))
            .arg("--out")
            .arg(w.join("never.bin")),
    );
    assert!(e.contains("image data"), "{e}");
}

/// The authority stops in the middle of a trainer's run and comes back on the same address:
/// the trainer's key requests wait for it (retries with backoff), the run completes, and its
/// weights are still the simulation's bit for bit.
#[test]
fn a_trainer_survives_an_authority_restart_mid_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let keys = w.join("auth");
    let init = ["--features", "64", "--classes", "10", "--x-bound", "16"];
    let a = start_authority(&keys, &[&init[..], &["--batch-size", "8"]].concat());
    let data = fixture("nn/data/digits-8x8");
    let enc = w.join("train.enc");
    run(client(&a)
        .arg("--data")
        .arg(&data)
        .args(["--limit", "480", "--out"])
        .arg(&enc));
    let model = ["--spec", "12", "--seed", "3", "--epochs", "4"];
    let ck = w.join("ckpt.bin");
    let mut trainer = train_with(&a)
        .args(model)
        .arg("--data")
        .arg(&enc)
        .arg("--checkpoint")
        .arg(&ck)
        .arg("--out")
        .arg(w.join("secure.bin"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("trainer starts");
    // The checkpoint is written after every step: the run is under way.
    let started = std::time::Instant::now();
    while !ck.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no step"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let addr = a.addr.clone();
    drop(a);
    assert!(
        trainer.try_wait().expect("trainer status").is_none(),
        "the run ended before the authority stopped: make it longer"
    );
    std::thread::sleep(std::time::Duration::from_millis(700));
    let back = serve_on(&keys, &addr, &[]);
    let out = trainer.wait_with_output().expect("trainer ends");
    assert!(
        out.status.success(),
        "the trainer failed across the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(back);
    run(Command::new(TRAINER)
        .args(["simulate", "--quiet"])
        .args(model)
        .arg("--data")
        .arg(&data)
        .arg("--encoding")
        .arg(w.join("train.enc.encoding.json"))
        .args([
            "--limit",
            "480",
            "--batch-size",
            "8",
            "--x-bound",
            "16",
            "--out",
        ])
        .arg(w.join("sim.bin")));
    assert_eq!(
        std::fs::read(w.join("secure.bin")).expect("model"),
        std::fs::read(w.join("sim.bin")).expect("model"),
        "the restart changed the weights"
    );
}
