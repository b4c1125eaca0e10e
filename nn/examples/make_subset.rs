//! Rebuilds the embedded MNIST subset `nn/data/mnist-subset/` from the full MNIST files:
//! the first 6,000 training and the first 1,000 test images and labels, written as gzip IDX
//! files with the standard names, and prints the class balance.
//!
//! ```text
//! cargo run -p nn --release --example make_subset -- --src ../shared/datasets/mnist
//! ```

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use nn::mnist;

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(about = "Rebuild the embedded MNIST subset from the full MNIST files")]
struct Args {
    /// Directory with the four full MNIST files.
    #[arg(long, env = mnist::MNIST_DIR_ENV,
          default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/datasets/mnist"))]
    src: PathBuf,
    /// Output directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist-subset"))]
    out: PathBuf,
    /// Number of training samples (taken from the start of the training set).
    #[arg(long, default_value_t = mnist::EMBEDDED_TRAIN_LEN)]
    train: usize,
    /// Number of test samples (taken from the start of the test set).
    #[arg(long, default_value_t = mnist::EMBEDDED_TEST_LEN)]
    test: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (train, test) = mnist::load_dir(&args.src)
        .with_context(|| format!("loading full MNIST from {}", args.src.display()))?;
    ensure!(
        args.train <= train.len() && args.test <= test.len(),
        "asked for {}/{} samples, the source has {}/{}",
        args.train,
        args.test,
        train.len(),
        test.len()
    );
    let (train, test) = (train.take(args.train), test.take(args.test));
    mnist::write_dir(&args.out, &train, &test)
        .with_context(|| format!("writing {}", args.out.display()))?;

    for (name, d) in [("train", &train), ("test", &test)] {
        let counts = d.class_counts(mnist::CLASSES);
        let (min, max) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        println!(
            "{name}: {} samples, per class {:?} (min {min}, max {max}, max/min {:.2})",
            d.len(),
            counts,
            max as f64 / min.max(1) as f64
        );
    }
    // Read back what was written, as the library will.
    let (tr, te) = mnist::load_dir(&args.out)?;
    ensure!(tr == train && te == test, "read-back mismatch");
    println!("wrote {}", args.out.display());
    Ok(())
}
