//! The runner's quick modes end to end: `all --quick` on a tiny slice of the embedded data
//! (a few hundred images, one epoch, a few real FE steps), then checks of the CSV columns,
//! of the encrypted and simulated rows agreeing exactly, and of the plot files.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_experiments");

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CRYPTONN_MNIST_DIR")
        .output()
        .expect("the experiments binary starts");
    assert!(
        out.status.success(),
        "experiments {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Header and rows (as maps) of a CSV file.
fn read_csv(path: &Path) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let mut r = csv::Reader::from_path(path).expect("csv opens");
    let headers: Vec<String> = r
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    let rows = r
        .records()
        .map(|rec| {
            let rec = rec.expect("record");
            headers
                .iter()
                .cloned()
                .zip(rec.iter().map(String::from))
                .collect()
        })
        .collect();
    (headers, rows)
}

fn check_png(path: &Path) {
    let bytes = std::fs::read(path).expect("png");
    assert!(
        bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]),
        "{} is not a PNG",
        path.display()
    );
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .expect("the PNG decodes");
    assert!(
        img.width() >= 800 && img.height() >= 400,
        "{}: {}x{}",
        path.display(),
        img.width(),
        img.height()
    );
    // Not blank: text and curves put dark pixels on the white background.
    let rgb = img.to_rgb8();
    let dark = rgb
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c < 100))
        .count();
    assert!(
        dark > 1000,
        "{} looks blank ({dark} dark pixels)",
        path.display()
    );
}

fn check_svg(path: &Path) {
    let text = std::fs::read_to_string(path).expect("svg");
    assert!(text.contains("<svg"), "{} has no <svg", path.display());
    assert!(
        text.trim_end().ends_with("</svg>"),
        "{} is cut",
        path.display()
    );
    assert!(text.contains("<text"), "{} has no text", path.display());
    assert!(text.contains("<polyline") || text.contains("<path") || text.contains("<rect"));
}

#[test]
fn all_quick_writes_consistent_csv_plots_and_report() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("results");
    let o = out.to_str().expect("utf-8 path");
    let res = run(&["all", "--quick", "--quiet", "--out", o]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        stdout.contains("weights bit-identical after every"),
        "{stdout}"
    );
    assert!(stdout.contains("Predicted encrypted epoch"), "{stdout}");
    // leakage: its two real FE steps and the grids, which have no SVG, linked as PNG.
    let (_, rows) = read_csv(&out.join("leakage.csv"));
    assert_eq!(rows.iter().filter(|r| r["source"] == "fe").count(), 2);

    // accuracy: per-epoch curves.
    let (h, rows) = read_csv(&out.join("accuracy_epochs.csv"));
    assert_eq!(
        h,
        [
            "curve",
            "mode",
            "epoch",
            "steps",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "encrypted_steps",
            "seconds"
        ]
    );
    for r in &rows {
        let ok = match r["curve"].as_str() {
            "float" | "quantized" => r["mode"] == "plain",
            "fe" => r["mode"] == "encrypted" || r["mode"] == "simulated",
            other => panic!("unknown curve {other}"),
        };
        assert!(ok, "{r:?}");
    }
    let last = |curve: &str| {
        rows.iter()
            .rfind(|r| r["curve"] == curve)
            .cloned()
            .expect("curve present")
    };
    let (fe, q) = (last("fe"), last("quantized"));
    assert_eq!(fe["epoch"], "1.0000");
    assert_eq!(fe["mode"], "simulated");
    assert_eq!(fe["encrypted_steps"], "3");
    assert_eq!(fe["test_accuracy"], q["test_accuracy"]);
    assert_eq!(fe["test_loss"], q["test_loss"]);
    assert_eq!(
        rows.iter()
            .filter(|r| r["curve"] == "fe" && r["mode"] == "encrypted")
            .count(),
        4,
        "the start and three encrypted steps"
    );

    // accuracy: encrypted and simulated steps agree exactly.
    let (h, rows) = read_csv(&out.join("accuracy_fe_steps.csv"));
    for c in [
        "step",
        "mode",
        "batch_loss",
        "batch_accuracy",
        "test_loss",
        "test_accuracy",
        "weights_sha256",
        "forward_seconds",
        "backward_seconds",
        "weights_identical",
    ] {
        assert!(h.iter().any(|x| x == c), "missing column {c}");
    }
    assert_eq!(rows.len(), 6);
    for pair in rows.chunks(2) {
        let (e, s) = (&pair[0], &pair[1]);
        assert_eq!(
            (e["mode"].as_str(), s["mode"].as_str()),
            ("encrypted", "simulated")
        );
        for c in [
            "step",
            "batch",
            "batch_loss",
            "batch_accuracy",
            "test_loss",
            "test_accuracy",
            "weights_sha256",
        ] {
            assert_eq!(e[c], s[c], "column {c} differs at step {}", e["step"]);
        }
        assert_eq!(e["weights_sha256"].len(), 16);
        assert!(e["backward_seconds"].parse::<f64>().expect("number") > 0.0);
    }

    // precision.
    let (h, rows) = read_csv(&out.join("precision.csv"));
    assert_eq!(h[..4], ["scheme", "value", "test_accuracy", "test_loss"]);
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r["scheme"].clone(), r["value"].clone()))
        .collect();
    assert_eq!(
        got,
        [("bits", "4"), ("bits", "8"), ("digits", "2")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // One seed: every setting is paired with the same float run.
    let float: f64 = rows[0]["float_test_accuracy"].parse().expect("number");
    assert!((0.0..=1.0).contains(&float) && float > 0.1, "{float}");
    assert!(rows
        .iter()
        .all(|r| r["float_test_accuracy"] == rows[0]["float_test_accuracy"]));
    let bits8 = &rows[1];
    assert_eq!(bits8["forward_bound"], (785u64 * 255 * 127).to_string());
    assert_eq!(bits8["max_weight_int"], "127");
    assert_eq!(bits8["fits_default_dlog"], "true");

    // timing.
    let (h, rows) = read_csv(&out.join("timing_measured.csv"));
    assert_eq!(h[..3], ["hidden", "batch", "steps"]);
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert!(r["step_s"].parse::<f64>().expect("number") > 0.0);
    }
    let (_, rows) = read_csv(&out.join("timing_model.csv"));
    assert!(rows
        .iter()
        .any(|r| r["hidden"] == "128" && r["batch"] == "64" && r["samples"] == "60000"));

    // primitives.
    let (h, rows) = read_csv(&out.join("primitives.csv"));
    assert_eq!(
        h,
        [
            "scheme",
            "curve",
            "operation",
            "n",
            "key_bits",
            "median_seconds",
            "repetitions"
        ]
    );
    for curve in ["Ristretto255", "secp256k1"] {
        for op in ["setup", "encrypt", "derive key", "decrypt"] {
            assert!(
                rows.iter()
                    .any(|r| r["curve"] == curve && r["operation"] == op && r["scheme"] == "FEIP"),
                "{curve} {op}"
            );
        }
    }

    // Plots and the report.
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    for base in [
        "accuracy",
        "accuracy_fe_steps",
        "accuracy_relu",
        "accuracy_relu_fe_steps",
        "precision",
        "timing",
        "primitives",
        "leakage",
    ] {
        check_png(&out.join(format!("{base}.png")));
        check_svg(&out.join(format!("{base}.svg")));
        assert!(
            report.contains(&format!("({base}.png)")),
            "report links {base}.png"
        );
    }
    for section in [
        "## accuracy",
        "## accuracy_relu",
        "## precision",
        "## timing",
        "## primitives",
        "## leakage",
    ] {
        assert!(report.contains(section), "{section}");
    }
    assert!(report.contains("(leakage_grid_none.png)](leakage_grid_none.png)"));
}

/// `precision` trains a convolutional first layer through the same seam: every bit width and
/// decimal-digit run completes with an accuracy, and the backward bound counts the positions.
#[test]
fn precision_runs_a_convolutional_first_layer() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = dir.path().to_str().expect("utf-8 path");
    run(&[
        "precision",
        "--quiet",
        "--out",
        o,
        "--spec",
        "conv5x2s3-8",
        "--activation",
        "relu",
        "--train-limit",
        "64",
        "--test-limit",
        "50",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--bits",
        "8",
        "--digits",
        "2",
        "--seeds",
        "1",
    ]);
    let (_, rows) = read_csv(&dir.path().join("precision.csv"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        let acc: f64 = r["test_accuracy"].parse().expect("accuracy");
        assert!((0.0..=1.0).contains(&acc), "{r:?}");
    }
    let bits = rows
        .iter()
        .find(|r| r["scheme"] == "bits")
        .expect("bits row");
    // 16 samples times 8x8 positions of a stride-3 window on 28x28 images.
    let bound: u64 = bits["backward_bound"].parse().expect("bound");
    assert_eq!(bound, 16 * 64 * 255 * 127, "{bits:?}");
}

#[test]
fn lenet5_preset_records_every_step_of_every_curve() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = dir.path().to_str().expect("utf-8 path");
    let res = run(&[
        "accuracy",
        "--model",
        "lenet5",
        "--quiet",
        "--out",
        o,
        "--train-limit",
        "32",
        "--test-limit",
        "50",
        "--eval-sample",
        "20",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--fe-steps",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("conv5x6p2"), "{stdout}");
    assert!(stdout.contains("sgd at learning rate 0.01"), "{stdout}");
    assert!(stdout.contains("| adam "), "{stdout}");
    let (h, rows) = read_csv(&dir.path().join("accuracy_lenet5_steps.csv"));
    assert_eq!(
        h,
        [
            "optimizer",
            "curve",
            "mode",
            "step",
            "epoch",
            "test_images",
            "test_loss",
            "test_accuracy",
            "weights_identical",
        ]
    );
    // 4 steps of batch 8, scored before the first and after every one.
    let steps = |opt: &str, curve: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r["optimizer"] == opt && r["curve"] == curve)
            .map(|r| r["step"].clone())
            .collect()
    };
    for (opt, curve) in [
        ("sgd", "float"),
        ("sgd", "quantized"),
        ("sgd", "fe"),
        ("adam", "float"),
        ("adam", "quantized"),
    ] {
        assert_eq!(
            steps(opt, curve),
            ["0", "1", "2", "3", "4"],
            "{opt} {curve}"
        );
    }
    assert!(steps("adam", "fe").is_empty());
    assert!(rows.iter().all(|r| r["test_images"] == "20"));
    // The one FE step was compared bit for bit and scores as the simulation; the rest is
    // simulated.
    let at = |curve: &str, step: &str| {
        rows.iter()
            .find(|r| r["optimizer"] == "sgd" && r["curve"] == curve && r["step"] == step)
            .expect("row")
    };
    let fe1 = at("fe", "1");
    assert_eq!(
        (fe1["mode"].as_str(), fe1["weights_identical"].as_str()),
        ("encrypted", "true")
    );
    assert_eq!(fe1["test_loss"], at("quantized", "1")["test_loss"]);
    for step in ["2", "3", "4"] {
        assert_eq!(at("fe", step)["mode"], "simulated");
        assert_eq!(
            at("fe", step)["test_loss"],
            at("quantized", step)["test_loss"]
        );
    }
    let (_, fe_rows) = read_csv(&dir.path().join("accuracy_lenet5_fe_steps.csv"));
    assert_eq!(fe_rows.len(), 2);
    assert_eq!(fe_rows[0]["weights_sha256"], fe_rows[1]["weights_sha256"]);
    assert!(fe_rows.iter().all(|r| r["weights_identical"] == "true"));
    check_png(&dir.path().join("accuracy_lenet5_steps.png"));
    check_svg(&dir.path().join("accuracy_lenet5_steps.svg"));
}

#[test]
fn relu_network_and_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = dir.path().to_str().expect("utf-8 path");
    let res = run(&[
        "accuracy",
        "--quiet",
        "--out",
        o,
        "--activation",
        "relu",
        "--spec",
        "784-16-10",
        "--train-limit",
        "128",
        "--test-limit",
        "100",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--fe-steps",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&res.stdout).contains("784-16-10 relu"));
    let (_, rows) = read_csv(&dir.path().join("accuracy_fe_steps.csv"));
    assert_eq!(rows.len(), 4);

    // --full without the environment variable says what to do.
    let out = Command::new(BIN)
        .args(["precision", "--full", "--out", o])
        .env_remove("CRYPTONN_MNIST_DIR")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CRYPTONN_MNIST_DIR"), "{err}");

    // A full layout that does not end with the data's classes is refused.
    let out = Command::new(BIN)
        .args(["accuracy", "--spec", "784-100-7", "--out", o])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("10 classes"));

    // Every subcommand documents itself.
    for sub in ["accuracy", "precision", "timing", "primitives", "all"] {
        let out = Command::new(BIN)
            .args([sub, "--help"])
            .output()
            .expect("runs");
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("--out"));
    }
}

#[test]
fn leakage_on_a_few_steps_recovers_what_the_rank_allows() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = dir.path().to_str().expect("utf-8 path");
    // 32 units: batches of 16 give full-rank deltas (one step reveals its batch), batches
    // of 64 do not, but two epochs of them stacked do. The first three steps of the
    // unmitigated run also run with real FE (authority, encryption, keys, decryption).
    let res = run(&[
        "leakage",
        "--quiet",
        "--out",
        o,
        "--spec",
        "784-32-10",
        "--train-limit",
        "256",
        "--test-limit",
        "100",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--mitigations",
        "none,batch=64,noise=8",
        "--forward-batches",
        "1",
        "--lp-images",
        "1",
        "--score-steps",
        "1",
        "--grid",
        "2",
        "--fe-steps",
        "3",
    ]);
    let (headers, rows) = read_csv(&dir.path().join("leakage.csv"));
    // The rows of the real FE steps: one per step, the step's batch of 16 recovered exactly
    // from what was really decrypted (the run stops with an error if any decrypted integer
    // differs from the simulation's).
    let fe: Vec<_> = rows.iter().filter(|r| r["source"] == "fe").collect();
    assert_eq!(
        fe.iter().map(|r| r["step"].as_str()).collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    for r in &fe {
        assert_eq!(
            (r["attack"].as_str(), r["mitigation"].as_str()),
            ("backward_step", "none")
        );
        assert_eq!((r["images"].as_str(), r["attacked"].as_str()), ("16", "16"));
        assert_eq!(r["recovered_exact"], "1.000000", "{r:?}");
        assert_eq!(r["exact_vs_encrypted"], "1.000000", "{r:?}");
        assert_eq!(r["equations"], "16.0", "the step's delta rank: {r:?}");
    }
    assert!(rows
        .iter()
        .all(|r| r["source"] == "fe" || r["source"] == "simulation"));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        stdout.contains("recovered 48 of the 48 images of these batches exactly"),
        "{stdout}"
    );
    for col in [
        "attack",
        "mitigation",
        "step",
        "recovered_exact",
        "recovered_within_1",
        "psnr_db",
        "test_accuracy",
        "label_accuracy",
    ] {
        assert!(headers.iter().any(|h| h == col), "column {col} missing");
    }
    let last = |attack: &str, mitigation: &str| -> BTreeMap<String, String> {
        rows.iter()
            .rfind(|r| r["attack"] == attack && r["mitigation"] == mitigation)
            .unwrap_or_else(|| panic!("no {attack} row for {mitigation}"))
            .clone()
    };
    let num = |r: &BTreeMap<String, String>, c: &str| -> f64 {
        r[c].parse()
            .unwrap_or_else(|_| panic!("{c} = {:?} is not a number", r[c]))
    };
    let step = rows
        .iter()
        .rfind(|r| {
            r["attack"] == "backward_step"
                && r["mitigation"] == "none"
                && r["source"] == "simulation"
        })
        .expect("a simulation row")
        .clone();
    assert_eq!(step["step"], "32");
    assert!(num(&step, "recovered_exact") > 0.9, "{step:?}");
    assert!(num(&step, "label_accuracy") > 0.9, "{step:?}");
    let big = last("backward_step", "batch=64");
    assert!(num(&big, "recovered_exact") < 0.05, "{big:?}");
    let stacked = last("backward_stacked", "batch=64");
    assert!(num(&stacked, "recovered_exact") > 0.9, "{stacked:?}");
    // Noise: the attack returns the noisy inputs, not the originals.
    let noisy = last("backward_step", "noise=8");
    assert!(num(&noisy, "recovered_exact") < 0.05, "{noisy:?}");
    assert!(num(&noisy, "exact_vs_encrypted") > 0.9, "{noisy:?}");
    // The first scoring step saw one batch of 16 of the 256 images.
    let first = rows
        .iter()
        .find(|r| r["attack"] == "backward_step" && r["mitigation"] == "none")
        .expect("a first row");
    assert_eq!(first["step"], "1");
    assert!(
        (num(first, "recovered_exact") - 16.0 / 256.0).abs() < 1e-9,
        "{first:?}"
    );
    check_png(&dir.path().join("leakage.png"));
    check_svg(&dir.path().join("leakage.svg"));
    for grid in [
        "leakage_grid_none.png",
        "leakage_grid_batch64.png",
        "leakage_grid_noise8.png",
    ] {
        let bytes = std::fs::read(dir.path().join(grid)).expect("grid written");
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .expect("the grid decodes");
        assert!(img.width() >= 400 && img.height() >= 100, "{grid}");
    }
}

/// The prediction service's attack solves every attacked query's program, and the CSV's
/// exact, within-one and PSNR columns agree with each other.
#[test]
fn query_leakage_solves_each_query_and_writes_its_csv() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = run(&[
        "query-leakage",
        "--quiet",
        "--train-limit",
        "640",
        "--test-limit",
        "6",
        "--images",
        "6",
        "--out",
        dir.path().to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("128 equations, 784 unknowns"), "{stdout}");
    let (headers, rows) = read_csv(&dir.path().join("query_leakage.csv"));
    assert_eq!(headers[0], "image");
    assert_eq!(rows.len(), 6);
    for r in &rows {
        assert_eq!(r["solved"], "1");
        let exact: f64 = r["recovered_exact"].parse().expect("number");
        let within: f64 = r["recovered_within_1"].parse().expect("number");
        assert!(exact <= within);
        if exact == 1.0 {
            assert_eq!(r["psnr_db"], "100.00");
        } else {
            assert!(r["psnr_db"].parse::<f64>().expect("number") < 100.0);
        }
    }
}
