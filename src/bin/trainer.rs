//! `trainer`: the ML service. Trains on an encrypted dataset with keys from the authority;
//! also the experimenter's tools: `simulate` (the same training on plaintext with the same
//! integer products, for cheap curves) and `evaluate` (a saved model on a plaintext test set).

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use cryptonn::protocol::resolve_token;
use cryptonn::secure::Timings;
use cryptonn::trainer::{self, SecureSetup, TrainConfig};
use nn::activation::Activation;
use nn::model::Model;
use nn::train::EpochMetrics;
use std::io::Write;
use std::path::{Path, PathBuf};

/// CryptoNN trainer: trains a network over functionally encrypted MNIST.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Model and training settings shared by `train` and `simulate`.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Layer widths; the first must be 784.
    #[arg(long, default_value = "784-128-32-10")]
    spec: String,
    /// Hidden activation: sigmoid, relu or tanh.
    #[arg(long, default_value = "sigmoid")]
    activation: Activation,
    /// Epochs in total (a resumed run continues up to this many).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Seed of initialization, batch order and rounding.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bits of the quantized first-layer weights and deltas (the key entries).
    #[arg(long, default_value_t = 8)]
    bits: u32,
    /// Stochastic rounding of weights and deltas instead of nearest.
    #[arg(long)]
    stochastic_rounding: bool,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Fewest non-zero entries of a weight-row key (match the authority's policy).
    #[arg(long, default_value_t = 16)]
    min_nonzero_row: usize,
    /// Fewest non-zero entries of a delta-column key (match the authority's policy); columns
    /// with fewer get a zero gradient instead of a key request.
    #[arg(long, default_value_t = 2)]
    min_nonzero_col: usize,
    /// Checkpoint file: written after every step, resumed from if present.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Stop after this many steps (resume later from the checkpoint).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Where to save the trained model.
    #[arg(long, short, default_value = "model.bin")]
    out: PathBuf,
    /// Append per-epoch metrics as JSON lines to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl ModelArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            spec: self.spec.clone(),
            activation: self.activation,
            epochs: self.epochs,
            seed: self.seed,
            bits: self.bits,
            stochastic_rounding: self.stochastic_rounding,
            lr: self.lr,
            min_row_nonzero: self.min_nonzero_row,
            min_col_nonzero: self.min_nonzero_col,
            progress: !self.quiet,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train over an encrypted dataset (made by `client encrypt`) with keys from the authority.
    Train {
        /// The encrypted dataset.
        #[arg(long, default_value = "train.enc")]
        data: PathBuf,
        /// Authority address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        authority: String,
        /// Bearer token for the authority.
        #[arg(long, env = "CRYPTONN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// File holding the bearer token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Cache file for the discrete-log table (built once, about 1 s, 32 MiB).
        #[arg(long)]
        dlog_table: Option<PathBuf>,
        /// Experimenter's view: also score each epoch on a plaintext MNIST test set from this
        /// directory ("embedded" for the embedded subset). The training data stays encrypted.
        #[arg(long)]
        eval_data: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Experimenter's tool: the same training on PLAINTEXT data with the same quantized
    /// integer products (bit-identical weights to `train` on the same data and seed).
    Simulate {
        /// MNIST directory (default: the embedded subset).
        #[arg(long, env = "CRYPTONN_MNIST_DIR")]
        data: Option<PathBuf>,
        /// Use only the first N training samples (as `client encrypt --limit`).
        #[arg(long)]
        limit: Option<usize>,
        /// Batch size (the authority's column length).
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Plain float first layer without quantization (the unquantized baseline).
        #[arg(long)]
        float: bool,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Score a saved model on a plaintext test set.
    Evaluate {
        /// The model file.
        #[arg(long, default_value = "model.bin")]
        model: PathBuf,
        /// MNIST directory (default: the embedded subset's 1,000 test images).
        #[arg(long, env = "CRYPTONN_MNIST_DIR")]
        data: Option<PathBuf>,
    },
}

fn report(m: &EpochMetrics, timings: Option<&Timings>) {
    let test = m
        .test_accuracy
        .map(|a| format!(", test accuracy {:.2}%", 100.0 * a))
        .unwrap_or_default();
    println!(
        "epoch {}: train loss {:.4}, train accuracy {:.2}%{test}, {:.1} s",
        m.epoch + 1,
        m.train_loss,
        100.0 * m.train_accuracy,
        m.seconds
    );
    if let Some(t) = timings {
        let cpu = (t.dlog_cpu + t.group_cpu).as_secs_f64().max(1e-9);
        println!(
            "  time (cumulative): forward decryption {:.1} s, backward decryption {:.1} s \
             (discrete logs {:.1}% of their CPU time), output error {:.1} s, keys {:.1} s, \
             I/O {:.1} s, clear layers and quantization {:.1} s; {} keys, {} decryptions, {} backward products derived \
             from a basis of the deltas, {} batches read",
            t.forward.as_secs_f64(),
            t.backward.as_secs_f64(),
            100.0 * t.dlog_cpu.as_secs_f64() / cpu,
            t.output_error.as_secs_f64(),
            t.keys.as_secs_f64(),
            t.io.as_secs_f64(),
            (m.seconds - t.secure_total().as_secs_f64()).max(0.0),
            t.keys_received,
            t.decryptions,
            t.derived,
            t.batches_read
        );
    }
}

fn append_metrics(path: Option<&Path>, m: &EpochMetrics, timings: Option<&Timings>) -> Result<()> {
    if let Some(p) = path {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?;
        let line = serde_json::json!({ "metrics": m, "timings": timings });
        writeln!(f, "{line}")?;
    }
    Ok(())
}

fn load_test(spec: &str) -> Result<nn::data::Dataset> {
    let dir = (spec != "embedded").then(|| PathBuf::from(spec));
    Ok(nn::mnist::load(dir.as_deref())
        .context("loading the test set")?
        .1)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train {
            data,
            authority,
            token,
            token_file,
            dlog_table,
            eval_data,
            model,
        } => {
            let setup = SecureSetup {
                data,
                authority,
                token: resolve_token(token, token_file.as_deref())?,
                dlog_table,
            };
            let test = eval_data.as_deref().map(load_test).transpose()?;
            let cfg = model.config();
            let metrics = model.metrics.clone();
            let (r, _) = trainer::train_secure(
                &setup,
                &cfg,
                test.as_ref(),
                model.checkpoint.as_deref(),
                model.stop_after,
                |_, m, p| {
                    let t = p.timings();
                    report(m, Some(&t));
                    append_metrics(metrics.as_deref(), m, Some(&t))
                        .map_err(|e| trainer::TrainerError::Config(e.to_string()))
                },
            )
            .context("secure training")?;
            r.model.save(&model.out).context("saving the model")?;
            println!("saved the model to {}", model.out.display());
        }
        Command::Simulate {
            data,
            limit,
            batch_size,
            float,
            model,
        } => {
            let (train, test, _) = nn::mnist::load(data.as_deref()).context("loading MNIST")?;
            let train = match limit {
                Some(n) => train.take(n.min(train.len())),
                None => train,
            };
            let cfg = model.config();
            let metrics = model.metrics.clone();
            let on_epoch = |m: &EpochMetrics| {
                report(m, None);
                append_metrics(metrics.as_deref(), m, None)
                    .map_err(|e| trainer::TrainerError::Config(e.to_string()))
            };
            let r = if float {
                trainer::run_float(train, batch_size, &cfg, Some(&test), |_, m, _| on_epoch(m))
            } else {
                let products =
                    nn::first_layer::PlainIntegers::from_dataset(train, batch_size, true, 10)
                        .context("partitioning the data")?;
                trainer::run(
                    products,
                    &cfg,
                    Some(&test),
                    model.checkpoint.as_deref(),
                    model.stop_after,
                    |_, m, _| on_epoch(m),
                )
            }
            .context("simulated training")?;
            r.model.save(&model.out).context("saving the model")?;
            println!("saved the model to {}", model.out.display());
        }
        Command::Evaluate { model, data } => {
            let m = Model::load(&model).with_context(|| format!("loading {}", model.display()))?;
            let (_, test, _) = nn::mnist::load(data.as_deref()).context("loading MNIST")?;
            let ev = nn::eval::evaluate(&m, &test)?;
            println!(
                "test accuracy {:.2}% ({} images), loss {:.4}",
                100.0 * ev.accuracy,
                test.len(),
                ev.loss
            );
        }
    }
    Ok(())
}
