//! `client`: the data owner's tool. Fetches the authority's public parameters, encodes its
//! data (images or a table) as integers and writes an encrypted dataset that a trainer can
//! use without ever seeing the samples or labels.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cryptonn::cli::{warn_clamped, AuthorityArgs, DataArgs};
use cryptonn::client::{encrypt_dataset, ColumnKeys};
use cryptonn::protocol::resolve_token;
use std::path::PathBuf;

mod predict;

/// CryptoNN client (data owner): encodes and encrypts a labelled dataset for training.
#[derive(Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  \
        client encrypt --authority 127.0.0.1:7700 --token-file keys/token --out train.enc\n  \
        client encrypt --data ~/fashion-mnist --out fashion.enc\n  \
        client encrypt --data patients.csv --label-column outcome --out patients.enc\n  \
        client predict --server 127.0.0.1:7800 --server-token-file serve.token --token-file keys/token\n\n\
        The encoding (per-column maps of real values into 0..=X) is written to --encoding \
        (default: OUT.encoding.json); keep it to encode test and query data the same way."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode and encrypt training samples and labels under the authority's parameters.
    ///
    /// Each batch is encrypted as rows (per sample, for the forward pass), as columns (per
    /// feature over the batch, for the backward pass) and as one-hot FEBO labels. Samples
    /// that do not fill a last batch are left out. Data whose shape does not fit the
    /// authority's parameters (features, classes, bound) is refused before any encryption.
    /// The file is written atomically.
    Encrypt {
        #[command(flatten)]
        authority: AuthorityArgs,
        #[command(flatten)]
        data: DataArgs,
        /// Add Gaussian noise of this standard deviation (in encoded units, grey levels for
        /// images) to every value before encrypting, with fresh randomness. A weak mitigation:
        /// the trainer still recovers the noisy samples exactly (see the README's threat
        /// model for the measured figures); default none.
        #[arg(long, value_name = "SIGMA")]
        input_noise: Option<f64>,
        /// Output file.
        #[arg(long, short, default_value = "train.enc")]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Get predictions for encrypted inputs from a prediction service (`trainer serve`).
    ///
    /// Fetches the authority's public parameters, checks that the service holds keys under
    /// them, encrypts every input as one row ciphertext (no labels, no columns), sends them
    /// with --parallel queries in flight and writes one line per input to --out: its index,
    /// the predicted class and every class's probability. The data may have no labels (a
    /// table without its label column, IDX images without a label file); when it has them
    /// they give the accuracy, and they are never sent.
    ///
    /// Both connections use TLS, pinned to the authority's certificate (--ca) and to the
    /// service's (--server-ca); --insecure-plaintext makes both clear-text TCP.
    Predict {
        /// Prediction service address.
        #[arg(long, default_value = "127.0.0.1:7800")]
        server: String,
        /// Token for the prediction service (or the file named by --server-token-file).
        #[arg(long, env = "CRYPTONN_SERVER_TOKEN", hide_env_values = true)]
        server_token: Option<String>,
        /// File holding the prediction service's token (`trainer serve --client-token-file`).
        #[arg(long, default_value = "serve.token")]
        server_token_file: PathBuf,
        /// The prediction service's TLS certificate, the only one trusted for it. Default:
        /// the --server-token-file with extension .pem (where `trainer serve` writes it).
        #[arg(long, value_name = "FILE")]
        server_ca: Option<PathBuf>,
        /// Trust the prediction service's certificate by its SHA-256 fingerprint (which
        /// `trainer serve` prints) instead of a copy of the file.
        #[arg(long, value_name = "HEX", conflicts_with = "server_ca")]
        server_ca_fingerprint: Option<String>,
        #[command(flatten)]
        authority: AuthorityArgs,
        #[command(flatten)]
        data: DataArgs,
        /// Queries in flight at once (one connection each).
        #[arg(long, value_name = "K", default_value_t = 4)]
        parallel: usize,
        /// The predictions (CSV).
        #[arg(long, short, default_value = "predictions.csv")]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Predict {
            server,
            server_token,
            server_token_file,
            server_ca,
            server_ca_fingerprint,
            authority,
            data,
            parallel,
            out,
            quiet,
        } => predict::run(&predict::Args {
            authority_transport: authority.tls.authority(authority.token_file.as_deref())?,
            server_transport: cryptonn::cli::client_transport(
                cryptonn::cli::Pin {
                    file: server_ca.as_deref(),
                    fingerprint: server_ca_fingerprint.as_deref(),
                    default_file: Some(&server_token_file.with_extension("pem")),
                },
                authority.tls.insecure_plaintext,
                "the prediction service",
                "--server-ca",
            )?,
            server,
            server_token: resolve_token(server_token, Some(&server_token_file))
                .context("the prediction service's token")?,
            token: authority.token()?,
            authority: authority.authority,
            data,
            parallel,
            out,
            progress: !quiet,
        }),
        Command::Encrypt {
            authority,
            data,
            input_noise,
            out,
            quiet,
        } => {
            let mut conn = authority.connect()?;
            let published = conn.published().context("fetching the public parameters")?;
            let params = published.params.clone();
            let default_encoding = PathBuf::from(format!("{}.encoding.json", out.display()));
            let loaded = data
                .load(
                    params.dataset.x_bound,
                    Some(&default_encoding),
                    Some(&params.dataset),
                )
                .context("loading the data")?;
            warn_clamped(&loaded.clamped);
            // `load` refused data that does not fit the parameters; `encrypt_dataset`
            // checks again for library callers.
            let mut train = loaded.train;
            if let Some(sigma) = input_noise {
                train = train
                    .with_noise(sigma, &mut rand::rngs::OsRng)
                    .context("--input-noise")?;
                eprintln!("added Gaussian noise of standard deviation {sigma} to every value");
            }
            eprintln!(
                "encrypting {} samples from {} ({}) in batches of {} ...",
                train.len(),
                loaded.source,
                train.info,
                params.batch_size()
            );
            let columns = ColumnKeys::fetch(&mut conn, &published, train.len())
                .context("fetching the batches' column keys")?;
            if let ColumnKeys::PerBatch { keys, .. } = &columns {
                eprintln!(
                    "the authority binds column keys to batches: {} batch keys fetched",
                    keys.len()
                );
            }
            let s = encrypt_dataset(&train, &params, &columns, &out, &loaded.source, !quiet)
                .context("encrypting the dataset")?;
            println!(
                "wrote {}: {} batches, {} samples ({} left out), {:.1} MiB, {:.1} s",
                out.display(),
                s.batches,
                s.samples,
                s.dropped,
                s.bytes as f64 / (1 << 20) as f64,
                s.seconds
            );
            Ok(())
        }
    }
}
