//! `experiments`: reproduces CryptoNN's accuracy curves and cost breakdowns with plots.
//!
//! Every subcommand runs one experiment end to end on the embedded MNIST subset by default
//! (`--data DIR` or `--full` for the full set), prints a summary table, and writes CSV files
//! and plots (SVG and PNG) into `--out` (default `results/`). `all` runs accuracy, precision,
//! timing, leakage and primitives and writes `report.md`.

mod accuracy;
mod common;
mod fe_env;
mod leakage;
mod plot;
mod png;
mod precision;
mod primitives;
mod query_leakage;
mod report;
mod table;
mod timing;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

/// Reproduces CryptoNN (training neural networks on functionally encrypted MNIST):
/// accuracy curves, precision, timing breakdowns and FE primitive costs, as tables, CSV files
/// and plots (SVG and PNG).
///
/// Every experiment runs on the embedded MNIST subset by default and finishes within about
/// ten minutes on a 2-core machine; `--data DIR` (or `--full` with CRYPTONN_MNIST_DIR set)
/// selects the full MNIST.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Test accuracy and loss per epoch: plain float vs quantized plain vs FE-encrypted
    /// training (real authority, client and trainer code over TCP, checked bit for bit
    /// against the simulation after every encrypted step), and per step with --eval-every;
    /// `--model lenet5` reproduces CryptoNN's LeNet-5 curve with the authors' settings.
    Accuracy(accuracy::AccuracyArgs),
    /// Final accuracy vs bits (and decimal digits) of the first layer's weights and deltas,
    /// with the discrete-log bound each needs (simulation, which equals FE exactly).
    Precision(precision::PrecisionArgs),
    /// Cost breakdown of encrypted training steps and a fitted model predicting an epoch for
    /// any width, batch size and number of samples.
    Timing(timing::TimingArgs),
    /// Single-core FEIP and FEBO setup / encrypt / key derivation / decrypt times vs vector
    /// length and key size, on Ristretto255 and secp256k1.
    Primitives(primitives::PrimitivesArgs),
    /// What an honest-but-curious trainer reconstructs from what it decrypts (images from
    /// δᵀX and z = W1 x by least squares and linear programming, labels from a − y), against
    /// mitigations (larger batches, client-side input noise, column keys bound to batches,
    /// rank budgets) with their accuracy cost.
    Leakage(leakage::LeakageArgs),
    /// What a prediction service reconstructs from one encrypted query's z = W1 x (a
    /// box-constrained linear program per test image).
    QueryLeakage(query_leakage::QueryLeakageArgs),
    /// Runs accuracy (sigmoid and relu), precision, timing, leakage (fewer epochs and
    /// mitigations than its default) and primitives, and writes report.md linking the plots.
    All(AllArgs),
}

/// Options of `all`.
#[derive(Args, Debug, Clone)]
struct AllArgs {
    /// Directory for every experiment's files and report.md.
    #[arg(long, default_value = "results", value_name = "DIR")]
    out: PathBuf,
    /// MNIST directory for the experiments that train (default: the embedded subset).
    #[arg(long, value_name = "DIR", conflicts_with = "full")]
    data: Option<PathBuf>,
    /// Use the full MNIST from CRYPTONN_MNIST_DIR for the experiments that train.
    #[arg(long)]
    full: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Tiny sizes for every experiment (for tests: seconds, not minutes).
    #[arg(long, hide = true)]
    quick: bool,
}

/// Parses one experiment's options from an argument list, with clap's defaults.
#[derive(Parser)]
struct Wrap<T: Args> {
    #[command(flatten)]
    inner: T,
}

fn parse<T: Args>(args: &[String]) -> Result<T> {
    let argv =
        std::iter::once(OsString::from("experiments")).chain(args.iter().map(OsString::from));
    Ok(Wrap::<T>::try_parse_from(argv)
        .context("building an experiment's options")?
        .inner)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn all(a: &AllArgs) -> Result<()> {
    let clock = common::Stopwatch::start();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating the output directory {}", a.out.display()))?;
    let out = a.out.display().to_string();
    let mut base = vec!["--out".to_string(), out.clone()];
    if a.quiet {
        base.push("--quiet".into());
    }
    let mut data = Vec::new();
    if let Some(d) = &a.data {
        data.extend(["--data".to_string(), d.display().to_string()]);
    }
    if a.full {
        data.push("--full".into());
    }
    let quick = |v: &[&str]| if a.quick { strings(v) } else { Vec::new() };
    let small_net = [
        "--train-limit",
        "256",
        "--test-limit",
        "200",
        "--epochs",
        "1",
        "--spec",
        "784-16-10",
        "--batch-size",
        "16",
    ];
    let runs: Vec<(&str, Vec<String>)> = vec![
        (
            "accuracy",
            [data.clone(), quick(&small_net), quick(&["--fe-steps", "3"])].concat(),
        ),
        (
            "accuracy",
            [
                data.clone(),
                strings(&["--activation", "relu", "--name", "accuracy_relu"]),
                if a.quick {
                    [quick(&small_net), quick(&["--fe-steps", "2"])].concat()
                } else {
                    strings(&["--fe-steps", "20"])
                },
            ]
            .concat(),
        ),
        (
            "precision",
            [
                data.clone(),
                quick(&small_net),
                quick(&["--bits", "4,8", "--digits", "2", "--seeds", "1"]),
            ]
            .concat(),
        ),
        (
            "timing",
            [
                data.clone(),
                quick(&[
                    "--hidden",
                    "8,16",
                    "--batches",
                    "8,16",
                    "--steps",
                    "1",
                    "--rest",
                    "10",
                ]),
            ]
            .concat(),
        ),
        (
            "leakage",
            [
                data,
                if a.quick {
                    strings(&[
                        "--train-limit",
                        "256",
                        "--test-limit",
                        "100",
                        "--spec",
                        "784-16-10",
                        "--batch-size",
                        "16",
                        "--epochs",
                        "1",
                        "--mitigations",
                        "none,batch=32",
                        "--forward-batches",
                        "1",
                        "--lp-images",
                        "1",
                        "--score-steps",
                        "1",
                        "--grid",
                        "2",
                        "--fe-steps",
                        "2",
                    ])
                } else {
                    // The README's network and batch, fewer epochs and mitigations (about
                    // 40 s): three epochs show batch=256 stopping the one-step attack and the
                    // stacked attack recovering everything, and input noise returning the
                    // noisy images; the linear programs of the first two epochs.
                    strings(&[
                        "--epochs",
                        "3",
                        "--mitigations",
                        "none,batch=256,noise=8",
                        "--lp-epochs",
                        "2",
                        "--fe-steps",
                        "2",
                    ])
                },
            ]
            .concat(),
        ),
        (
            "primitives",
            quick(&[
                "--lengths",
                "16,64",
                "--key-bits",
                "8",
                "--min-time",
                "0.01",
                "--dlog-half-width",
                "4096",
            ]),
        ),
    ];
    let mut summaries = Vec::new();
    for (name, extra) in runs {
        let args = [base.clone(), extra].concat();
        eprintln!("== {name} {}", args.join(" "));
        let mut s = match name {
            "accuracy" => accuracy::run(&parse(&args)?)?,
            "precision" => precision::run(&parse(&args)?)?,
            "timing" => timing::run(&parse(&args)?)?,
            "leakage" => leakage::run(&parse(&args)?)?,
            _ => primitives::run(&parse(&args)?)?,
        };
        s.command = format!(
            "cargo run --release -p experiments -- {name} {}",
            args.join(" ")
        );
        s.print();
        summaries.push(s);
    }
    let command = common::command_line();
    report::write(&a.out, &summaries, &command, &clock)?;
    println!(
        "\nwrote {} ({:.1} min in all)",
        a.out.join("report.md").display(),
        clock.secs() / 60.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let summary = match Cli::parse().command {
        Command::Accuracy(a) => accuracy::run(&a)?,
        Command::Precision(a) => precision::run(&a)?,
        Command::Timing(a) => timing::run(&a)?,
        Command::Primitives(a) => primitives::run(&a)?,
        Command::Leakage(a) => leakage::run(&a)?,
        Command::QueryLeakage(a) => query_leakage::run(&a)?,
        Command::All(a) => return all(&a),
    };
    summary.print();
    Ok(())
}
