//! What every experiment shares: data selection, the output directory, progress bars and the
//! summary an experiment hands to `all` for the report.

use crate::table::Table;
use anyhow::{bail, Context, Result};
use clap::Args;
use nn::data::Dataset;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options shared by every subcommand: data, output, progress.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// The data, as for `client encrypt --data`: an IDX directory (MNIST-style names, any
    /// image size) or a CIFAR-10 directory, with a test part; values are used as they are
    /// (bound 255). Default: the embedded MNIST subset (6,000 training and 1,000 test
    /// images), so nothing needs downloading.
    #[arg(long, value_name = "PATH", conflicts_with = "full")]
    pub data: Option<PathBuf>,
    /// Use the full MNIST from the directory named by the CRYPTONN_MNIST_DIR environment
    /// variable (same as `--data "$CRYPTONN_MNIST_DIR"`).
    #[arg(long)]
    pub full: bool,
    /// Use only the first N training images.
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Use only the first N test images.
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,
    /// Directory for the CSV files and plots (created if missing).
    #[arg(long, default_value = "results", value_name = "DIR")]
    pub out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The data of an experiment and where it came from.
pub struct Data {
    /// Training images.
    pub train: Dataset,
    /// Test images.
    pub test: Dataset,
    /// Human-readable origin, for tables and the report.
    pub source: String,
}

impl CommonArgs {
    /// The MNIST directory chosen by `--data` or `--full`, if any.
    pub fn data_dir(&self) -> Result<Option<PathBuf>> {
        if let Some(d) = &self.data {
            return Ok(Some(d.clone()));
        }
        if self.full {
            let var = nn::mnist::MNIST_DIR_ENV;
            return match std::env::var_os(var).filter(|v| !v.is_empty()) {
                Some(d) => Ok(Some(PathBuf::from(d))),
                None => bail!(
                    "--full reads the MNIST directory from the environment variable {var}, \
                     which is not set; set it (for example `export {var}=/path/to/mnist`) or \
                     pass --data DIR"
                ),
            };
        }
        Ok(None)
    }

    /// Loads the data: the embedded subset unless `--data`/`--full`, cut to the limits.
    pub fn load(&self) -> Result<Data> {
        let (train, test, source) = match self.data_dir()? {
            Some(dir) => {
                let args = cryptonn::cli::DataArgs {
                    data: Some(dir.clone()),
                    ..Default::default()
                };
                let (train, test, source) = args
                    .read_raw()
                    .with_context(|| format!("loading {}", dir.display()))?;
                let test = test.with_context(|| {
                    format!(
                        "{} has no test part (the experiments need one)",
                        dir.display()
                    )
                })?;
                let (train, test) = nn::data::RawSet::identity_pair(train, test, 255)
                    .with_context(|| format!("reading {} as integers 0..=255", dir.display()))?;
                (train, test, source)
            }
            None => {
                let (train, test) =
                    nn::mnist::embedded().context("loading the embedded MNIST subset")?;
                (train, test, "embedded MNIST subset".to_string())
            }
        };
        let cut = |d: Dataset, limit: Option<usize>, what: &str| -> Result<Dataset> {
            match limit {
                Some(0) => bail!("--{what}-limit must be at least 1"),
                Some(n) if n < d.len() => Ok(d.take(n)),
                _ => Ok(d),
            }
        };
        let train = cut(train, self.train_limit, "train")?;
        let test = cut(test, self.test_limit, "test")?;
        let source = format!(
            "{source}: {} training and {} test images",
            train.len(),
            test.len()
        );
        Ok(Data {
            train,
            test,
            source,
        })
    }

    /// Creates the output directory and returns it.
    pub fn out_dir(&self) -> Result<&Path> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating the output directory {}", self.out.display()))?;
        Ok(&self.out)
    }
}

/// What an experiment produced, for the terminal and for `report.md`.
#[derive(Debug, Default)]
pub struct Summary {
    /// Name of the experiment (the subcommand).
    pub name: String,
    /// One paragraph saying what was run.
    pub description: String,
    /// Result tables.
    pub tables: Vec<Table>,
    /// Plot files (PNG and SVG), relative to the output directory.
    pub figures: Vec<String>,
    /// CSV files, relative to the output directory.
    pub csv: Vec<String>,
    /// Wall-clock seconds of the whole experiment.
    pub seconds: f64,
    /// The command line that reproduces it.
    pub command: String,
}

impl Summary {
    /// Prints the summary tables to stdout.
    pub fn print(&self) {
        println!("\n== {} ==\n{}\n", self.name, self.description);
        for t in &self.tables {
            println!("{}", t.to_markdown());
        }
        println!(
            "files: {}",
            self.csv
                .iter()
                .chain(self.figures.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("{} took {:.2} s", self.name, self.seconds);
    }
}

/// A progress bar on stderr (hidden when `quiet` or stderr is not a terminal).
pub fn progress(quiet: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:32} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    pb
}

/// Measures wall time from creation.
pub struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts now.
    pub fn start() -> Self {
        Stopwatch(Instant::now())
    }
    /// Seconds since start.
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// The command line of this process, for reproducibility notes.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo run --release -p experiments -- {}", args.join(" "))
}

/// Checks a file-name prefix: letters, digits, `-` and `_` only.
pub fn parse_name(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a plain file-name prefix (letters, digits, - and _)"
        ))
    }
}

/// A list of small integers given as a range or a comma-separated list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List(pub Vec<u32>);

/// Parses an integer range or list (`2-12`, `2..=12`, `8,16` or `4`) as a [`List`].
pub fn parse_list_arg(s: &str) -> Result<List, String> {
    parse_list(s).map(List)
}

/// Parses an integer range or list: `2-12`, `2..=12`, `8,16` or `4`.
pub fn parse_list(s: &str) -> Result<Vec<u32>, String> {
    let s = s.trim();
    let range = s
        .split_once("..=")
        .or_else(|| s.split_once('-'))
        .map(|(a, b)| (a.trim().parse::<u32>(), b.trim().parse::<u32>()));
    match range {
        Some((Ok(a), Ok(b))) if a <= b => Ok((a..=b).collect()),
        Some(_) => Err(format!("{s:?} is not a range like 2-12")),
        None => s
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("{p:?} is not a non-negative integer"))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse() {
        assert_eq!(parse_list("2-4"), Ok(vec![2, 3, 4]));
        assert_eq!(parse_list("2..=4"), Ok(vec![2, 3, 4]));
        assert_eq!(parse_list("8, 16"), Ok(vec![8, 16]));
        assert_eq!(parse_list("5"), Ok(vec![5]));
        assert!(parse_list("4-2").is_err());
        assert!(parse_list("a").is_err());
    }
}

/// Network and training settings shared by `accuracy` and `precision`. A setting left out
/// takes the value of a preset ([`TrainArgs::or`], `accuracy --model`), else the default
/// named in its help.
#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Layer widths (the first must be the data's features), or image layers first such as
    /// lenet5 [default: 128-32, CryptoNN's network].
    #[arg(long)]
    pub spec: Option<String>,
    /// Hidden activation: sigmoid (CryptoNN's), relu or tanh [default: sigmoid].
    #[arg(long)]
    pub activation: Option<nn::activation::Activation>,
    /// Epochs of every run (default: 10 for `accuracy`, 2 with its `--model lenet5`, 3 for
    /// `precision`).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size (the client encrypts fixed batches of this size; the last partial one is
    /// left out, as the client does) [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate [default: 0.01, the trainer's].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Update rule: adam (the trainer's default) or sgd (plain SGD, CryptoNN's), as
    /// `trainer --optimizer` [default: adam].
    #[arg(long)]
    pub optimizer: Option<cryptonn::trainer::OptimizerKind>,
    /// Learning rate from epoch to epoch, as `trainer --lr-schedule`: constant,
    /// step:EVERY:GAMMA or cosine or cosine:MIN [default: constant].
    #[arg(long)]
    pub lr_schedule: Option<cryptonn::trainer::LrSchedule>,
    /// Seed of initialization, batch order and rounding (the same for every run).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Default hidden widths of the experiments (CryptoNN's network).
pub const DEFAULT_SPEC: &str = "128-32";
/// Default batch size of the experiments.
pub const DEFAULT_BATCH_SIZE: usize = 32;

impl TrainArgs {
    /// These settings, with those left out taken from `preset`.
    pub fn or(&self, preset: &TrainArgs) -> TrainArgs {
        TrainArgs {
            spec: self.spec.clone().or_else(|| preset.spec.clone()),
            activation: self.activation.or(preset.activation),
            epochs: self.epochs.or(preset.epochs),
            batch_size: self.batch_size.or(preset.batch_size),
            lr: self.lr.or(preset.lr),
            optimizer: self.optimizer.or(preset.optimizer),
            lr_schedule: self.lr_schedule.or(preset.lr_schedule),
            seed: self.seed,
        }
    }

    /// The network layout given or the default.
    pub fn spec(&self) -> &str {
        self.spec.as_deref().unwrap_or(DEFAULT_SPEC)
    }

    /// The hidden activation given or the default (sigmoid).
    pub fn activation(&self) -> nn::activation::Activation {
        self.activation
            .unwrap_or(nn::activation::Activation::Sigmoid)
    }

    /// The batch size given or the default.
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)
    }

    /// The optimizer given or the trainer's default.
    pub fn optimizer(&self) -> cryptonn::trainer::OptimizerKind {
        self.optimizer.unwrap_or_default()
    }

    /// The trainer's configuration with `bits`-bit first-layer products and `epochs` epochs.
    pub fn config(&self, bits: u32, epochs: usize) -> Result<cryptonn::trainer::TrainConfig> {
        if self.batch_size() == 0 {
            bail!("--batch-size must be at least 1");
        }
        if epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        let defaults = cryptonn::trainer::TrainConfig::default();
        Ok(cryptonn::trainer::TrainConfig {
            spec: self.spec().to_string(),
            activation: self.activation(),
            epochs,
            seed: self.seed,
            bits,
            stochastic_rounding: false,
            lr: self.lr.unwrap_or(defaults.lr),
            optimizer: self.optimizer(),
            schedule: self.lr_schedule.unwrap_or_default(),
            progress: false,
        })
    }

    /// The network's layout for data described by `info`, as `784-128-32-10 sigmoid` (image
    /// layers first for a convolutional network).
    pub fn layout(&self, info: &nn::data::DatasetInfo) -> Result<String> {
        let spec = self.config(8, 1)?.model_spec(info)?;
        Ok(spec.to_string().replace('/', " "))
    }

    /// A fresh model as the trainer makes it (same spec and seed) for data described by
    /// `info`.
    pub fn model(&self, info: &nn::data::DatasetInfo) -> Result<nn::model::Model> {
        Ok(self.config(8, 1)?.model(info)?)
    }
}

/// What the trainer's run needs to know of plaintext training data: its description, its
/// name for checkpoints and the authority's default policy for its shape and `batch_size`.
pub fn run_data(train: &Dataset, batch_size: usize) -> cryptonn::trainer::RunData {
    cryptonn::trainer::RunData {
        info: train.info.clone(),
        identity: cryptonn::trainer::data_identity(train),
        policy: cryptonn::authority::Policy::default()
            .with_lengths(train.info.row_len(), batch_size),
    }
}

/// `products` behind the key-policy filter of the default policy for data described by
/// `info` in batches of `batch_size`, as the trainer wraps them.
pub fn policy_filter<P>(
    products: P,
    info: &nn::data::DatasetInfo,
    batch_size: usize,
) -> cryptonn::secure::KeyPolicyFilter<P> {
    let p = cryptonn::authority::Policy::default().with_lengths(info.row_len(), batch_size);
    cryptonn::secure::KeyPolicyFilter::new(products, &p)
}

/// The number of full batches of `batch_size` in `n` samples, or an error if there is none.
pub fn full_batches(n: usize, batch_size: usize) -> Result<usize> {
    let nb = n / batch_size.max(1);
    if nb == 0 {
        bail!("{n} training images do not fill one batch of {batch_size}");
    }
    Ok(nb)
}

/// The first 16 hex digits of the SHA-256 of a model's bytes: equal digests, equal weights.
pub fn model_digest(model: &nn::model::Model) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = model.to_bytes()?;
    let d = Sha256::digest(&bytes);
    Ok(d.iter().take(8).map(|b| format!("{b:02x}")).collect())
}
