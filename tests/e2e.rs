//! End-to-end: the three roles as separate processes on 127.0.0.1, and the trainer's
//! guarantees: encrypted training equals the simulated run bit for bit, a killed trainer
//! resumes to the same weights, and bad encrypted datasets are refused with clear errors.

mod common;

use common::{run, start_authority as start, Served as Authority, CLIENT, TRAINER};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start_authority(dir: &Path, batch: usize) -> Authority {
    start(dir, &["--batch-size", &batch.to_string()])
}

fn encrypt(a: &Authority, limit: usize, out: &Path) {
    run(Command::new(CLIENT)
        .args([
            "encrypt",
            "--quiet",
            "--authority",
            &a.addr,
            "--token",
            &a.token,
        ])
        .args(a.tls_args())
        .args(["--limit", &limit.to_string(), "--out"])
        .arg(out)
        .env_remove("CRYPTONN_MNIST_DIR"));
}

/// More hidden units (24) than samples per batch (16): the backward asks keys for a basis of
/// the deltas and derives the other products, which the equality with the simulation checks.
const MODEL: [&str; 8] = [
    "--spec",
    "784-24-10",
    "--epochs",
    "1",
    "--seed",
    "5",
    "--activation",
    "relu",
];

fn train_cmd(a: &Authority, data: &Path, model: &Path, work: &Path) -> Command {
    let mut c = common::train_with(a);
    c.args(MODEL)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(model)
        .arg("--dlog-table")
        .arg(work.join("dlog.bin"));
    c
}

fn simulate(limit: usize, batch: usize, model: &Path) {
    simulate_with(limit, batch, model, &[]);
}

/// `trainer simulate` of [`MODEL`] with `extra` flags (a `--policy`, say).
fn simulate_with(limit: usize, batch: usize, model: &Path, extra: &[&str]) {
    run(Command::new(TRAINER)
        .args(["simulate", "--quiet"])
        .args(MODEL)
        .args([
            "--limit",
            &limit.to_string(),
            "--batch-size",
            &batch.to_string(),
        ])
        .args(extra)
        .arg("--out")
        .arg(model)
        .env_remove("CRYPTONN_MNIST_DIR"));
}

struct Setup {
    dir: tempfile::TempDir,
    authority: Authority,
    data: PathBuf,
}

fn setup(batch: usize, limit: usize) -> Setup {
    let dir = tempfile::tempdir().expect("tmp");
    let authority = start_authority(&dir.path().join("auth"), batch);
    let data = dir.path().join("train.enc");
    encrypt(&authority, limit, &data);
    Setup {
        dir,
        authority,
        data,
    }
}

#[test]
fn encrypted_training_equals_simulation_and_survives_a_kill() {
    let (batch, limit) = (16, 96);
    let s = setup(batch, limit);
    let w = s.dir.path();
    // the plain simulation with the same seed and partition
    simulate(limit, batch, &w.join("sim.bin"));
    // uninterrupted encrypted training, as separate processes over TCP
    let metrics = w.join("metrics.jsonl");
    run(train_cmd(&s.authority, &s.data, &w.join("secure.bin"), w)
        .arg("--metrics")
        .arg(&metrics));
    // every batch is read and decoded once (the next one while the current step computes)
    let line = std::fs::read_to_string(&metrics).expect("metrics");
    let m: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(m["timings"]["batches_read"], (limit / batch) as u64, "{m}");
    assert!(m["timings"]["derived"].as_u64() > Some(0), "{m}");
    let secure = std::fs::read(w.join("secure.bin")).expect("model");
    assert_eq!(
        secure,
        std::fs::read(w.join("sim.bin")).expect("model"),
        "encrypted and simulated training must give bit-identical weights"
    );

    // kill -9 the trainer once it has checkpointed, then resume
    let ckpt = w.join("ckpt.bin");
    let mut c = train_cmd(&s.authority, &s.data, &w.join("resumed.bin"), w);
    c.arg("--checkpoint")
        .arg(&ckpt)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("trainer starts");
    let started = Instant::now();
    while !ckpt.exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        ckpt.exists(),
        "the trainer checkpoints after its first step"
    );
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(!w.join("resumed.bin").exists(), "killed before finishing");
    let mut c = train_cmd(&s.authority, &s.data, &w.join("resumed.bin"), w);
    run(c.arg("--checkpoint").arg(&ckpt));
    assert_eq!(
        std::fs::read(w.join("resumed.bin")).expect("model"),
        secure,
        "a killed and resumed run must give the weights of an uninterrupted one"
    );
    // the trained model scores on the plaintext test set
    let out = run(Command::new(TRAINER)
        .args(["evaluate", "--model"])
        .arg(w.join("secure.bin"))
        .env_remove("CRYPTONN_MNIST_DIR"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test accuracy"));
}

fn train_error(s: &Setup, data: &Path) -> String {
    let w = s.dir.path();
    let out = train_cmd(&s.authority, data, &w.join("never.bin"), w)
        .output()
        .expect("runs");
    assert!(!out.status.success(), "training on a bad dataset must fail");
    assert!(!w.join("never.bin").exists());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn trainer_rejects_bad_encrypted_datasets() {
    let s = setup(8, 16);
    let w = s.dir.path();
    let good = std::fs::read(&s.data).expect("data");

    // truncated
    let t = w.join("truncated.enc");
    std::fs::write(&t, &good[..good.len() * 2 / 3]).expect("write");
    let e = train_error(&s, &t);
    assert!(e.contains("not a valid encrypted dataset"), "{e}");

    // a flipped byte inside a record: found by the record checksum when the batch is read
    let c = w.join("corrupted.enc");
    let mut bad = good.clone();
    let mid = good.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&c, &bad).expect("write");
    let e = train_error(&s, &c);
    assert!(e.contains("checksum mismatch"), "{e}");

    // not a dataset at all
    let g = w.join("garbage.enc");
    std::fs::write(&g, b"hello").expect("write");
    let e = train_error(&s, &g);
    assert!(e.contains("not a valid encrypted dataset"), "{e}");

    // made under another authority's parameters
    let other = start_authority(&w.join("auth2"), 8);
    let o = w.join("other.enc");
    encrypt(&other, 16, &o);
    let e = train_error(&s, &o);
    assert!(e.contains("other public parameters"), "{e}");

    // the good file still trains
    run(&mut train_cmd(&s.authority, &s.data, &w.join("ok.bin"), w));
    assert!(w.join("ok.bin").exists());
}

/// An authority that binds column keys to batches (the default): the client encrypts each batch's columns
/// under the batch's own key, training over TCP still equals the simulation bit for bit,
/// data encrypted the other way is refused with a clear error by either authority, and under a
/// rank budget below what a step needs the trainer asks for no more than the budget, as its
/// simulation does.
#[test]
fn batch_bound_keys_train_as_the_simulation_and_mismatched_data_is_refused() {
    let (batch, limit) = (16, 64);
    let dir = tempfile::tempdir().expect("tmp");
    let w = dir.path();
    let keys = w.join("auth");
    let bound = start_authority(&keys, batch);
    // Two more processes on the same keys, each with its own audit log.
    let audit = |name: &str| w.join(name).to_string_lossy().into_owned();
    let shared = common::serve(
        &keys,
        &["--shared-column-key", "--audit", &audit("shared.log")],
    );
    let (shared_data, bound_data) = (w.join("shared.enc"), w.join("bound.enc"));
    encrypt(&shared, limit, &shared_data);
    encrypt(&bound, limit, &bound_data);

    simulate(limit, batch, &w.join("sim.bin"));
    run(&mut train_cmd(&bound, &bound_data, &w.join("bound.bin"), w));
    assert_eq!(
        std::fs::read(w.join("bound.bin")).expect("model"),
        std::fs::read(w.join("sim.bin")).expect("model"),
        "training with batch-bound keys must give the simulation's weights"
    );

    for (a, data) in [(&bound, &shared_data), (&shared, &bound_data)] {
        let e = common::fails(&mut train_cmd(a, data, &w.join("never.bin"), w));
        assert!(e.contains("re-encrypt"), "{e}");
        assert!(!w.join("never.bin").exists());
    }

    // 24 units over batches of 16: a step would spend rank 16 of its batch. Under a budget of
    // 15 the trainer zeroes the lane past it (the authority would refuse it), and the
    // simulation told the same policy does the same.
    let policy = w.join("budget.json");
    std::fs::write(
        &policy,
        r#"{"bind_batches": true, "batch_rank_budget": 15}"#,
    )
    .expect("write");
    let policy_arg = policy.to_string_lossy().into_owned();
    let tight = common::serve(
        &keys,
        &["--policy", &policy_arg, "--audit", &audit("tight.log")],
    );
    run(&mut train_cmd(&tight, &bound_data, &w.join("tight.bin"), w));
    simulate_with(
        limit,
        batch,
        &w.join("tight-sim.bin"),
        &["--policy", &policy_arg],
    );
    let tight_model = std::fs::read(w.join("tight.bin")).expect("model");
    assert_eq!(
        tight_model,
        std::fs::read(w.join("tight-sim.bin")).expect("model"),
        "training under a rank budget must give the simulation's weights"
    );
    assert_ne!(
        tight_model,
        std::fs::read(w.join("sim.bin")).expect("model"),
        "the budget must have zeroed some lane"
    );
    // A resumed run would not know the rank it spent: refused before any key is asked.
    let e = common::fails(
        train_cmd(&tight, &bound_data, &w.join("never.bin"), w)
            .arg("--checkpoint")
            .arg(w.join("tight.bin")),
    );
    assert!(e.contains("rank budget"), "{e}");
    drop(tight);
    let log = std::fs::read_to_string(w.join("tight.log")).expect("audit log");
    assert!(!log.contains("\"outcome\":\"refused\""), "{log}");
}
