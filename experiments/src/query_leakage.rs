//! What a prediction service reconstructs from one encrypted query.
//!
//! The service (`trainer serve`) decrypts `z = w_q x` for every query: `H` integers, the
//! quantized first-layer rows `w_q` (H × (n + 1), bias last) applied to the encoded input and
//! its bias feature `X`. Playing the curious service, this experiment solves, per test image,
//! the box-constrained linear program
//!
//! ```text
//! min Σ x_i   subject to   w_q[:, ..n] x = z − X·w_q[:, n],   0 ≤ x_i ≤ X
//! ```
//!
//! (the conditioning of [`crate::leakage::LpSystem`]), which favours sparse solutions: digits
//! are mostly background. With `H < n` the equations alone leave an `(n − H)`-dimensional
//! set of images; the pixel bounds and the sparsity pick one, and the experiment measures how
//! often it is the query, as a function of the image's non-zero pixels.
//!
//! The model is the one the service would hold: `--model FILE`, or trained here in the
//! clear for `--epochs` on the training data (the service's `W1` is what matters, and a
//! float run's `W1` is like an encrypted run's).

use crate::common::{CommonArgs, Summary};
use crate::leakage::{score, LpSystem};
use crate::table::{pct, write_csv, Table};
use anyhow::{Context, Result};
use clap::Args;
use ndarray::{Array1, Axis};
use nn::infer::QuantizedModel;
use nn::model::Model;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `experiments query-leakage`.
#[derive(Args, Debug, Clone)]
pub struct QueryLeakageArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The service's model (from `trainer train` or `simulate`); default: train
    /// 784-128-32-10 here, in the clear.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Epochs of the model trained here.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Bits of the service's first-layer keys (`trainer serve --bits`).
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Test images attacked (the first ones).
    #[arg(long, default_value_t = 40)]
    pub images: usize,
    /// Time limit of one linear program, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub lp_time_limit: f64,
}

/// The model the service holds.
fn model(args: &QueryLeakageArgs, train: nn::Dataset) -> Result<Model> {
    if let Some(p) = &args.model {
        return Model::load(p).with_context(|| format!("loading {}", p.display()));
    }
    let cfg = cryptonn::trainer::TrainConfig {
        epochs: args.epochs,
        progress: !args.common.quiet,
        ..Default::default()
    };
    let r = cryptonn::trainer::run_float(train, 64, &cfg, None, |_, _, _| Ok(()))?;
    Ok(r.model)
}

/// Runs the experiment and writes `query_leakage.csv`.
pub fn run(args: &QueryLeakageArgs) -> Result<Summary> {
    let started = Instant::now();
    let data = args.common.load()?;
    let out = args.common.out_dir()?.to_path_buf();
    let q = QuantizedModel::new(model(args, data.train.clone())?, args.bits)?;
    let n = q.info().features;
    let x_bound = f64::from(q.info().x_bound);
    let rows = q.rows();
    let a = rows
        .slice_axis(Axis(1), ndarray::Slice::from(0..n))
        .mapv(|v| v as f64);
    let bias: Array1<f64> = rows.column(n).mapv(|v| v as f64 * x_bound);
    let lp = LpSystem::new(a.view());
    let count = args.images.min(data.test.len());
    let pb = crate::common::progress(args.common.quiet, count as u64, "query linear programs");
    let mut csv = Vec::new();
    let mut estimates = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        // Exactly the integers the service decrypts from the query's ciphertext.
        let z = q.plain_integers(data.test.augmented(i..i + 1).view())?;
        let rhs = z.row(0).mapv(|v| v as f64) - &bias;
        let est: Option<Vec<u8>> = lp.solve(rhs.view(), args.lp_time_limit).map(|x| {
            x.iter()
                .map(|v| v.round().clamp(0.0, x_bound) as u8)
                .collect()
        });
        let s = score(&[i], &|_| est.clone(), &data.test, &data.test);
        let nonzero = data.test.values.row(i).iter().filter(|&&v| v != 0).count();
        csv.push(vec![
            i.to_string(),
            nonzero.to_string(),
            usize::from(s.attacked == 1).to_string(),
            format!("{}", s.exact),
            format!("{}", s.within_1),
            if s.psnr.is_finite() {
                format!("{:.2}", s.psnr)
            } else {
                String::new()
            },
            format!("{:.2}", t.elapsed().as_secs_f64()),
        ]);
        estimates.push(est);
        pb.inc(1);
    }
    pb.finish_and_clear();
    write_csv(
        &out.join("query_leakage.csv"),
        &[
            "image",
            "nonzero_pixels",
            "solved",
            "recovered_exact",
            "recovered_within_1",
            "psnr_db",
            "seconds",
        ],
        &csv,
    )?;
    let targets: Vec<usize> = (0..count).collect();
    let all = score(&targets, &|i| estimates[i].clone(), &data.test, &data.test);
    let mut t = Table::new(
        format!(
            "One query's z = W1 x ({} equations, {n} unknowns), {}-bit keys: box-constrained LP",
            rows.nrows(),
            args.bits
        ),
        &[
            "images",
            "solved",
            "recovered exactly",
            "within one grey level",
            "mean PSNR (dB)",
        ],
    );
    t.row(vec![
        count.to_string(),
        all.attacked.to_string(),
        pct(all.exact),
        pct(all.within_1),
        format!("{:.1}", all.psnr),
    ]);
    let by_size = by_nonzero_pixels(&data.test, &estimates)?;
    Ok(Summary {
        name: "query-leakage".into(),
        description: format!(
            "The prediction service's view of one query ({}), on {}.",
            q.model().spec(),
            data.source
        ),
        tables: vec![t, by_size],
        figures: Vec::new(),
        csv: vec!["query_leakage.csv".into()],
        seconds: started.elapsed().as_secs_f64(),
        command: "cargo run --release -p experiments -- query-leakage".into(),
    })
}

/// Upper ends of the non-zero-pixel classes of [`by_nonzero_pixels`].
const SIZE_CLASSES: [usize; 5] = [100, 130, 160, 200, usize::MAX];

/// The attack's results by the images' number of non-zero pixels: sparse digits need fewer
/// equations.
fn by_nonzero_pixels(test: &nn::Dataset, estimates: &[Option<Vec<u8>>]) -> Result<Table> {
    let mut t = Table::new(
        "By the image's non-zero pixels",
        &[
            "non-zero pixels",
            "images",
            "recovered exactly",
            "median PSNR (dB)",
        ],
    );
    let mut lo = 0;
    for hi in SIZE_CLASSES {
        let members: Vec<usize> = (0..estimates.len())
            .filter(|&i| {
                let nz = test.values.row(i).iter().filter(|&&v| v != 0).count();
                (lo..hi).contains(&nz)
            })
            .collect();
        if !members.is_empty() {
            let mut psnr: Vec<f64> = members
                .iter()
                .map(|&i| score(&[i], &|_| estimates[i].clone(), test, test).psnr)
                .filter(|v| v.is_finite())
                .collect();
            psnr.sort_by(f64::total_cmp);
            let s = score(&members, &|i| estimates[i].clone(), test, test);
            let range = if hi == usize::MAX {
                format!("{lo} or more")
            } else {
                format!("{lo}-{}", hi - 1)
            };
            t.row(vec![
                range,
                members.len().to_string(),
                pct(s.exact),
                psnr.get(psnr.len() / 2)
                    .map_or(String::new(), |v| format!("{v:.1}")),
            ]);
        }
        lo = hi;
    }
    t.note("An exactly recovered image counts as 100 dB.");
    Ok(t)
}
