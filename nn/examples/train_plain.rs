//! Trains a network on MNIST in the clear, with a plain f32 first layer or with 8-bit (or
//! other) quantized first-layer products, and prints per-epoch metrics.
//!
//! ```text
//! # embedded subset (default): 6,000 training / 1,000 test images
//! cargo run -p nn --release --example train_plain -- --epochs 10
//! # full MNIST, quantized first layer
//! cargo run -p nn --release --example train_plain -- --data ../shared/datasets/mnist \
//!     --spec 784-128-32-10 --act relu --epochs 10 --quantize 8
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use nn::first_layer::{FirstLayer, PlainFloat, PlainIntegers, Quantized, Quantizer};
use nn::train::{evaluate, fit_with, EpochMetrics, FitConfig};
use nn::{mnist, Activation, Model, ModelSpec, Optimizer, Schedule};

/// Optimizer choice.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Opt {
    /// Adam.
    Adam,
    /// SGD with momentum.
    Sgd,
}

/// Learning-rate schedule choice.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sched {
    /// Constant rate.
    Constant,
    /// Halve the rate every 3 epochs.
    Step,
    /// Cosine annealing to 0 over the run.
    Cosine,
}

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(about = "Train a plain (or quantized-first-layer) MNIST network")]
struct Args {
    /// Directory with the four MNIST files (default: the embedded subset).
    #[arg(long, env = mnist::MNIST_DIR_ENV)]
    data: Option<PathBuf>,
    /// Layer widths.
    #[arg(long, default_value = "784-128-32-10")]
    spec: String,
    /// Hidden activation: sigmoid, relu or tanh.
    #[arg(long, default_value = "relu")]
    act: Activation,
    /// Number of epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Drop the last, shorter batch.
    #[arg(long)]
    drop_last: bool,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: Opt,
    /// Base learning rate (default for Adam: 1e-3 with ReLU, 3e-3 with sigmoid or tanh;
    /// 0.05 for SGD).
    #[arg(long)]
    lr: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// L2 weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Sched,
    /// Quantize the first layer's weights and deltas to this many bits (0: plain f32).
    #[arg(long, default_value_t = 0)]
    quantize: u32,
    /// Use stochastic rounding when quantizing.
    #[arg(long)]
    stochastic: bool,
    /// Seed of initialization, batch order and stochastic rounding.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shuffle the training samples once with this seed before cutting batches.
    #[arg(long)]
    shuffle_seed: Option<u64>,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Save the trained model here.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Write the per-epoch metrics as JSON here.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Print the final confusion matrix.
    #[arg(long)]
    confusion: bool,
}

fn run<F: FirstLayer>(args: &Args, fl: &mut F, test: &nn::Dataset, spec: ModelSpec) -> Result<()> {
    let mut model = Model::new(spec, args.seed)?;
    let lr = args.lr.unwrap_or(match (args.optimizer, args.act) {
        (Opt::Adam, Activation::Relu) => 1e-3,
        (Opt::Adam, _) => 3e-3,
        (Opt::Sgd, _) => 0.05,
    });
    let schedule = match args.schedule {
        Sched::Constant => Schedule::Constant,
        Sched::Step => Schedule::StepDecay {
            every: 3,
            gamma: 0.5,
        },
        Sched::Cosine => Schedule::Cosine {
            total_epochs: args.epochs,
            min_lr: 0.0,
        },
    };
    let mut opt = match args.optimizer {
        Opt::Adam => Optimizer::adam(lr),
        Opt::Sgd => Optimizer::sgd(lr, args.momentum),
    }
    .with_weight_decay(args.weight_decay)
    .with_schedule(schedule);
    let cfg = FitConfig {
        epochs: args.epochs,
        seed: args.seed,
        shuffle_batches: true,
        progress: !args.no_progress,
    };
    println!("{}", EpochMetrics::CSV_HEADER);
    let started = Instant::now();
    let history = fit_with(&mut model, fl, &mut opt, Some(test), &cfg, |_, m| {
        println!("{}", m.csv_row());
        Ok(())
    })?;
    let ev = evaluate(&model, test)?;
    let train_secs: f64 = history.iter().map(|m| m.seconds).sum();
    println!(
        "final test accuracy {:.2}% (loss {:.4}); training {:.1} s ({:.2} s/epoch), total {:.1} s",
        100.0 * ev.accuracy,
        ev.loss,
        train_secs,
        train_secs / history.len().max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    if args.confusion {
        print!("{}", ev.confusion_table());
    }
    if let Some(p) = &args.save {
        model
            .save(p)
            .with_context(|| format!("saving {}", p.display()))?;
    }
    if let Some(p) = &args.metrics {
        std::fs::write(p, serde_json::to_string_pretty(&history)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (train, test, source) = mnist::load(args.data.as_deref())?;
    let train = match args.shuffle_seed {
        Some(s) => train.shuffled(s),
        None => train,
    };
    let spec = ModelSpec::parse(&args.spec, args.act)?;
    if spec.n_in() != train.features() || spec.n_out() != mnist::CLASSES {
        bail!(
            "spec {} does not fit the data ({} features, {} classes)",
            spec,
            train.features(),
            mnist::CLASSES
        );
    }
    eprintln!(
        "data {:?}: {} train / {} test; model {} ({} parameters); first layer {}",
        source,
        train.len(),
        test.len(),
        spec,
        Model::new(spec.clone(), 0)?.num_params(),
        if args.quantize == 0 {
            "plain f32".to_string()
        } else {
            format!(
                "quantized {} bits{}",
                args.quantize,
                if args.stochastic {
                    ", stochastic rounding"
                } else {
                    ""
                }
            )
        }
    );
    if args.quantize == 0 {
        let mut fl = PlainFloat::from_dataset(train, args.batch, args.drop_last)?;
        run(&args, &mut fl, &test, spec)
    } else {
        let mut q = Quantizer::new(args.quantize);
        if args.stochastic {
            q = q.stochastic(args.seed);
        }
        let inner = PlainIntegers::from_dataset(train, args.batch, args.drop_last)?;
        let mut fl = Quantized::new(inner, q)?;
        run(&args, &mut fl, &test, spec)
    }
}
