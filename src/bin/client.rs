//! `client`: the data owner's tool. Fetches the authority's public parameters and writes an
//! encrypted dataset that a trainer can use without ever seeing the images or labels.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cryptonn::client::encrypt_dataset;
use cryptonn::protocol::{resolve_token, AuthorityClient};
use std::path::PathBuf;

/// CryptoNN client (data owner): encrypts a labelled image dataset for training.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encrypt MNIST training images and labels under the authority's public parameters.
    ///
    /// Each batch is encrypted as rows (per sample, for the forward pass), as columns (per pixel
    /// over the batch, for the backward pass) and as one-hot FEBO labels. Samples that do not
    /// fill a last batch are left out. The file is written atomically.
    Encrypt {
        /// Authority address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        authority: String,
        /// Bearer token for the authority (or the file named by --token-file).
        #[arg(long, env = "CRYPTONN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// File holding the bearer token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Directory with the MNIST IDX files (gzip or raw); default: the embedded subset of
        /// 6,000 training images.
        #[arg(long, env = "CRYPTONN_MNIST_DIR")]
        data: Option<PathBuf>,
        /// Encrypt only the first N training samples.
        #[arg(long)]
        limit: Option<usize>,
        /// Output file.
        #[arg(long, short, default_value = "train.enc")]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Encrypt {
            authority,
            token: t,
            token_file,
            data,
            limit,
            out,
            quiet,
        } => {
            let token = resolve_token(t, token_file.as_deref())?;
            let (train, _, source) = nn::mnist::load(data.as_deref()).context("loading MNIST")?;
            let train = match limit {
                Some(n) => train.take(n.min(train.len())),
                None => train,
            };
            let mut conn = AuthorityClient::connect(&authority, &token)
                .with_context(|| format!("connecting to the authority at {authority}"))?;
            let params = conn.params().context("fetching the public parameters")?;
            eprintln!(
                "encrypting {} samples from {source:?} in batches of {} ...",
                train.len(),
                params.batch_size()
            );
            let s = encrypt_dataset(&train, &params, &out, &format!("{source:?}"), !quiet)
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
