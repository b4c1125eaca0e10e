//! `trainer`: the ML service. Trains on an encrypted dataset with keys from the authority;
//! also the experimenter's tools: `simulate` (the same training on plaintext with the same
//! integer products, for cheap curves) and `evaluate` (a saved model on a plaintext test set).
//! The input width and the classes come from the data (the encrypted file's header, or the
//! plaintext data's description); `--spec` gives the hidden widths, or image layers such as
//! `lenet5`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use cryptonn::authority::Policy;
use cryptonn::cli::{warn_clamped, AuthorityArgs, DataArgs, EvalArgs};
use cryptonn::secure::Timings;
use cryptonn::trainer::{self, SecureSetup, TrainConfig};
use nn::activation::Activation;
use nn::model::Model;
use nn::train::EpochMetrics;
use std::io::Write;
use std::path::{Path, PathBuf};

/// CryptoNN trainer: trains a network over functionally encrypted data.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  \
        trainer train --authority 127.0.0.1:7700 --token-file keys/token --data train.enc --spec 128-32\n  \
        trainer simulate --data patients.csv --encoding patients.enc.encoding.json --spec 16\n  \
        trainer evaluate --model model.bin --data test.csv --encoding patients.enc.encoding.json"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Model and training settings shared by `train` and `simulate`.
#[derive(Args, Clone)]
struct ModelArgs {
    /// The network: hidden layer widths, such as 128-32 (the input width and the classes
    /// come from the data; a full layout such as 784-128-32-10 is checked against it), or
    /// image layers first for image data: lenet5, or tokens such as
    /// conv5x6p2-maxpool2-conv5x16-maxpool2-conv5x120-84 (convRxK for K kernels of side R,
    /// with optional sS for the stride and pP for the padding; maxpoolR and avgpoolR, with
    /// optional sS; then the hidden widths). A convolutional first layer runs over the
    /// encrypted images in `train` and `serve` as a dense one does.
    #[arg(long, default_value = "128-32")]
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
    /// Learning rate of the optimizer.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Update rule: adam (the default) or sgd (plain SGD without momentum, CryptoNN's
    /// setting). A checkpoint resumes only with the optimizer it was made with.
    #[arg(long, default_value_t = trainer::OptimizerKind::Adam)]
    optimizer: trainer::OptimizerKind,
    /// Learning rate from epoch to epoch: constant, step:EVERY:GAMMA (times GAMMA every
    /// EVERY epochs, e.g. step:1:0.3) or cosine or cosine:MIN (annealed over the run's epochs). A
    /// checkpoint resumes only with the schedule it was made with.
    #[arg(long, default_value_t = trainer::LrSchedule::Constant)]
    lr_schedule: trainer::LrSchedule,
    /// Checkpoint file: written after every step, resumed from if present (with the same
    /// settings and data; a conflicting flag is an error that names it).
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
            optimizer: self.optimizer,
            schedule: self.lr_schedule,
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
        #[command(flatten)]
        authority: AuthorityArgs,
        /// Cache file for the discrete-log table (built once, about 1 s, 32 MiB).
        #[arg(long)]
        dlog_table: Option<PathBuf>,
        #[command(flatten)]
        eval: EvalArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Experimenter's tool: the same training on PLAINTEXT data with the same quantized
    /// integer products (bit-identical weights to `train` on the same data and seed).
    Simulate {
        #[command(flatten)]
        data: DataArgs,
        /// Bound X of the encoded values (the authority's --x-bound).
        #[arg(long, value_name = "X", default_value_t = nn::mnist::X_BOUND)]
        x_bound: u32,
        /// Batch size (the authority's column length).
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// The authority's key policy file, if it serves one (`authority serve --policy`):
        /// the simulation avoids the same refusals as the encrypted run.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        eval: EvalArgs,
        /// Plain float first layer without quantization (the unquantized baseline).
        #[arg(long)]
        float: bool,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Serve predictions on encrypted queries (the model owner's prediction service).
    ///
    /// Quantizes the model's first layer, asks the authority once for the inference keys of
    /// its rows (kept in memory only), and answers `client predict`: each query is one row
    /// ciphertext; the service decrypts the first layer's outputs, runs the other layers in
    /// the clear and returns the class and the probabilities. Concurrent queries are
    /// decrypted together in batches. Stops cleanly on SIGTERM or Ctrl-C.
    ///
    /// Serves TLS with its own certificate (see --cert), which clients pin; connects to the
    /// authority over TLS (see --ca). --insecure-plaintext makes both clear-text TCP.
    Serve {
        /// The model file (from `trainer train` or `simulate`).
        #[arg(long, default_value = "model.bin")]
        model: PathBuf,
        #[command(flatten)]
        authority: AuthorityArgs,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:7800")]
        listen: String,
        /// The token the service's clients must present: read from this file, or generated
        /// and written there (mode 0600) if it does not exist.
        #[arg(long, value_name = "FILE", default_value = "serve.token")]
        client_token_file: PathBuf,
        /// The service's TLS certificate [default: the client token file with extension
        /// .pem, generated with its key at the first start if missing].
        #[arg(long, value_name = "FILE", requires = "key")]
        cert: Option<PathBuf>,
        /// The private key of --cert, refused if group or others can read it [default: the
        /// client token file with extension .key, mode 0600].
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
        // --ca: the authority's certificate; --insecure-plaintext: clear-text TCP both to the
        // authority and for the service's own clients.
        /// Bits of the quantized first-layer rows (the training's --bits).
        #[arg(long, default_value_t = 8)]
        bits: u32,
        /// Largest batch of queries decrypted together.
        #[arg(long, value_name = "N", default_value_t = cryptonn::inference::DEFAULT_MAX_BATCH)]
        max_batch: usize,
        /// Longest wait for a batch to fill after its first query, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 2.0)]
        batch_wait_ms: f64,
        /// Cache file for the discrete-log table (built once, about 1 s, 32 MiB).
        #[arg(long)]
        dlog_table: Option<PathBuf>,
        #[command(flatten)]
        net: cryptonn::cli::NetArgs,
        /// Print a line per batch and per refused query on stderr.
        #[arg(long)]
        verbose: bool,
    },
    /// Score a saved model on a plaintext test set: the test part of --data (an IDX or
    /// CIFAR-10 directory), or all of a CSV table, encoded with --encoding.
    Evaluate {
        /// The model file.
        #[arg(long, default_value = "model.bin")]
        model: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Also score the model with its first layer quantized to this many bits, as the
        /// prediction service computes it (`trainer serve --bits`).
        #[arg(long)]
        bits: Option<u32>,
    },
}

/// Prints an epoch's metrics and, for an encrypted run, its timings `(cumulative, this
/// epoch's)`: the clear-layer time is the epoch's time minus its secure part.
fn report(m: &EpochMetrics, timings: Option<(&Timings, &Timings)>) {
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
    if let Some((t, epoch)) = timings {
        let cpu = (t.dlog_cpu + t.group_cpu).as_secs_f64().max(1e-9);
        println!(
            "  time (cumulative): forward decryption {:.1} s, backward decryption {:.1} s \
             (discrete logs {:.1}% of their CPU time), output error {:.1} s, keys {:.1} s, \
             I/O {:.1} s, clear layers and quantization {:.1} s this epoch; {} keys, {} decryptions, {} backward products derived \
             from a basis of the deltas, {} batches read",
            t.forward.as_secs_f64(),
            t.backward.as_secs_f64(),
            100.0 * t.dlog_cpu.as_secs_f64() / cpu,
            t.output_error.as_secs_f64(),
            t.keys.as_secs_f64(),
            t.io.as_secs_f64(),
            (m.seconds - epoch.secure_total().as_secs_f64()).max(0.0),
            t.keys_received,
            t.decryptions,
            t.derived,
            t.batches_read
        );
        if t.additions > 0 {
            println!(
                "  point additions (bit-plane products): {:.0} per forward value ({} values), \
                 {:.3e} in the backward pass",
                t.forward_additions as f64 / t.forward_values.max(1) as f64,
                t.forward_values,
                (t.additions - t.forward_additions) as f64
            );
        }
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

/// The plaintext evaluation set of `data` for a model trained on `info`.
fn test_set(data: &DataArgs, info: &nn::data::DatasetInfo) -> Result<nn::data::Dataset> {
    data.load_eval(info)
}

/// The token of the service's clients: the file's content, or a new token written there.
fn client_token(path: &Path) -> Result<String> {
    if path.exists() {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string();
        cryptonn::net::validate_token(&t)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok(t);
    }
    let t = cryptonn::net::generate_token();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{t}")?;
    Ok(t)
}

/// The transports of `trainer serve`: to the authority, and for its own clients.
struct ServeTls {
    client: cryptonn::protocol::ClientConfig,
    server: cryptonn::net::Transport,
}

/// The service's certificate and key: `--cert`/`--key`, or the pair beside the client token
/// file, generated at the first start (key mode 0600).
fn service_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_token_file: &Path,
    plaintext: bool,
) -> Result<cryptonn::net::Transport> {
    if plaintext {
        if cert.is_some() {
            anyhow::bail!("--cert and --insecure-plaintext contradict each other");
        }
        eprintln!("prediction service: WARNING: serving clear-text TCP (--insecure-plaintext)");
        return Ok(cryptonn::net::Transport::Plaintext);
    }
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        _ => {
            let (c, k) = (
                client_token_file.with_extension("pem"),
                client_token_file.with_extension("key"),
            );
            if !c.exists() && !k.exists() {
                let fp = cryptonn::tls::write_pair(&c, &k, &cryptonn::tls::default_names())
                    .context("generating the service's TLS certificate")?;
                eprintln!(
                    "prediction service: wrote a new TLS certificate {} (SHA-256 {fp}) and its \
                     key {}; clients pin the certificate (client predict --server-ca)",
                    c.display(),
                    k.display()
                );
            }
            (c, k)
        }
    };
    cryptonn::cli::server_transport(&cert, &key, false)
}

/// `trainer serve`: starts the prediction service and runs it until SIGTERM or SIGINT.
#[allow(clippy::too_many_arguments)]
fn serve(
    model: &Path,
    authority: &str,
    token: &str,
    listen: &str,
    client_token_file: &Path,
    opts: cryptonn::inference::ServiceOptions,
    dlog_table: Option<&Path>,
    net: &cryptonn::cli::NetArgs,
    tls: &ServeTls,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = Model::load(model).with_context(|| format!("loading {}", model.display()))?;
    let verbose = opts.verbose;
    // The flags are checked here, before the authority is asked; the frame limit, known
    // once the service has started, is checked against --max-inflight-bytes when it serves.
    let settings = net.settings(
        client_token(client_token_file)?,
        1,
        cryptonn::inference::DEFAULT_PEER_RATE,
    )?;
    let mut auth =
        cryptonn::protocol::AuthorityClient::connect_with(authority, token, tls.client.clone())
            .with_context(|| format!("connecting to the authority at {authority}"))?;
    let dlog = trainer::dlog_table(dlog_table)?;
    let service = cryptonn::inference::PredictionService::start(m, &mut auth, dlog, opts)
        .context("starting the prediction service")?;
    drop(auth);
    let info = service.info();
    eprintln!(
        "prediction service: {} ({}-bit first layer{}, on the {} backend) for {}; keys for its \
         rows from the authority at {authority}",
        info.model,
        info.bits,
        service
            .additions_per_query()
            .map(|a| format!(", {a} point additions per query"))
            .unwrap_or_default(),
        fe::backend::Backend::active().name(),
        info.dataset
    );
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let settings = cryptonn::net::Settings {
        frame_limit: service.frame_limit(),
        verbose,
        transport: tls.server.clone(),
        ..settings
    };
    let server = service.spawn(listener, settings)?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .context("cannot install the signal handlers")?;
    }
    eprintln!(
        "clients authenticate with the token in {}",
        client_token_file.display()
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    drop(out);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.shutdown()?;
    let s = service.stats();
    eprintln!(
        "prediction service: shutting down after {} predictions in {} batches ({} queries refused)",
        s.predictions, s.batches, s.failed
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train {
            data,
            authority,
            dlog_table,
            eval,
            model,
        } => {
            let setup = SecureSetup {
                data: data.clone(),
                transport: authority.tls.authority(authority.token_file.as_deref())?,
                token: authority.token()?,
                authority: authority.authority,
                dlog_table,
            };
            // One opening of the encrypted file: its header describes the data.
            let (products, run_data) = trainer::secure_products(&setup)
                .with_context(|| format!("preparing to train on {}", data.display()))?;
            let test = eval
                .data_args()
                .map(|a| test_set(&a, &run_data.info))
                .transpose()?;
            let cfg = model.config();
            let spec = cfg.model_spec(&run_data.info)?;
            let products = products
                .with_patches(spec.first_geometry().as_ref())
                .context("the model's first convolution does not fit the encrypted images")?;
            println!("training {spec} on {} ({})", data.display(), run_data.info);
            let metrics = model.metrics.clone();
            let mut last = Timings::default();
            let r = trainer::run(
                products,
                &run_data,
                &cfg,
                test.as_ref(),
                model.checkpoint.as_deref(),
                model.stop_after,
                |_, m, p| {
                    let t = p.timings();
                    report(m, Some((&t, &t.since(&last))));
                    last = t;
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
            x_bound,
            batch_size,
            policy,
            eval,
            float,
            model,
        } => {
            let loaded = data.load(x_bound, None, None).context("loading the data")?;
            warn_clamped(&loaded.clamped);
            let train = loaded.train;
            let test = match eval.data_args() {
                Some(a) => Some(test_set(&a, &train.info)?),
                None => loaded.test,
            };
            let cfg = model.config();
            println!(
                "simulating {} on {} ({})",
                cfg.model_spec(&train.info)?,
                loaded.source,
                train.info
            );
            let metrics = model.metrics.clone();
            let on_epoch = |m: &EpochMetrics| {
                report(m, None);
                append_metrics(metrics.as_deref(), m, None)
                    .map_err(|e| trainer::TrainerError::Config(e.to_string()))
            };
            let r = if float {
                trainer::run_float(train, batch_size, &cfg, test.as_ref(), |_, m, _| {
                    on_epoch(m)
                })
            } else {
                let geometry = cfg.model_spec(&train.info)?.first_geometry();
                let row_len = train.info.row_len();
                let policy = match &policy {
                    Some(p) => Policy::from_file(p).map_err(anyhow::Error::msg)?,
                    None => Policy::default(),
                }
                .with_lengths(row_len, batch_size);
                let run_data = trainer::RunData {
                    info: train.info.clone(),
                    identity: trainer::data_identity(&train),
                    policy,
                };
                let products =
                    nn::first_layer::PlainIntegers::from_dataset(train, batch_size, true)
                        .and_then(|p| p.with_patches(geometry.as_ref()))
                        .context("partitioning the data")?;
                trainer::run(
                    products,
                    &run_data,
                    &cfg,
                    test.as_ref(),
                    model.checkpoint.as_deref(),
                    model.stop_after,
                    |_, m, _| on_epoch(m),
                )
            }
            .context("simulated training")?;
            r.model.save(&model.out).context("saving the model")?;
            println!("saved the model to {}", model.out.display());
        }
        Command::Serve {
            model,
            authority,
            listen,
            client_token_file,
            bits,
            max_batch,
            batch_wait_ms,
            dlog_table,
            net,
            cert,
            key,
            verbose,
        } => {
            let batch_wait = std::time::Duration::try_from_secs_f64(batch_wait_ms / 1e3)
                .ok()
                .context("--batch-wait-ms must be a number of milliseconds, 0 or more")?;
            let opts = cryptonn::inference::ServiceOptions {
                bits,
                max_batch,
                batch_wait,
                verbose,
            };
            let serve_tls = ServeTls {
                client: authority.client_config()?,
                server: service_tls(
                    cert,
                    key,
                    &client_token_file,
                    authority.tls.insecure_plaintext,
                )?,
            };
            let token = authority.token()?;
            serve(
                &model,
                &authority.authority,
                &token,
                &listen,
                &client_token_file,
                opts,
                dlog_table.as_deref(),
                &net,
                &serve_tls,
            )?;
        }
        Command::Evaluate { model, data, bits } => {
            let m = Model::load(&model).with_context(|| format!("loading {}", model.display()))?;
            let info = m
                .data()
                .cloned()
                .context("the model file records no data description")?;
            let test = test_set(&data, &info)?;
            let ev = nn::eval::evaluate(&m, &test)?;
            println!(
                "test accuracy {:.2}% ({} samples), loss {:.4}",
                100.0 * ev.accuracy,
                test.len(),
                ev.loss
            );
            if let Some(bits) = bits {
                let q = nn::infer::QuantizedModel::new(m, bits)?;
                let preds = q.predict_plain(&test)?;
                let correct = preds
                    .iter()
                    .zip(&test.labels)
                    .filter(|(p, &l)| p.class == usize::from(l))
                    .count();
                println!(
                    "test accuracy with the first layer quantized to {bits} bits (what the \
                     prediction service answers): {:.2}%",
                    100.0 * correct as f64 / test.len().max(1) as f64
                );
            }
        }
    }
    Ok(())
}
