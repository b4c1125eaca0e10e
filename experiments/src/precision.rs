//! `precision`: final accuracy against the precision of the first layer's weights and deltas,
//! and the discrete-log bound each precision needs.
//!
//! Two ways to make integers, as the encrypted first layer needs:
//!
//! * **bits** (this project's trainer): per-row (weights) and per-neuron (deltas) scales so
//!   that the largest magnitude maps to `2^(bits-1) - 1`;
//! * **decimal digits** (the CryptoNN paper's fixed-point choice): one fixed scale `10^d` for
//!   every weight and every delta.
//!
//! Simulation only: the plain integer products are exactly the integers FE decrypts (the
//! `accuracy` experiment and the end-to-end tests check this bit for bit), so accuracy
//! figures are those of FE training with the same setting.

use crate::common::{full_batches, progress, CommonArgs, Stopwatch, Summary, TrainArgs};
use crate::plot::{self, Line, LineChart, Marker, Panel, Series, COLORS};
use crate::table::{pct, write_csv, Table};
use anyhow::{Context, Result};
use clap::Args;

use cryptonn::trainer;
use fe::dlog::{DEFAULT_HALF_WIDTH, DEFAULT_LIMIT};
use ndarray::{Array2, ArrayView2};
use nn::first_layer::{
    max_abs_backward, max_abs_forward, qmax, FirstLayer, IntegerProducts, PlainIntegers, Quantizer,
    SeamError,
};
use rayon::prelude::*;

/// Options of `precision`.
#[derive(Args, Debug, Clone)]
pub struct PrecisionArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Bit widths of the first-layer weights and deltas to try: a range `2-12` or a list `4,8`.
    #[arg(long, default_value = "2-12", value_parser = crate::common::parse_list_arg)]
    pub bits: crate::common::List,
    /// Seeds per setting (seed, seed+1, ...), run side by side on all cores: the table shows
    /// the accuracy's mean ± standard deviation and each setting minus the float run of the
    /// same seed (mean ± standard error).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Decimal digits `d` (fixed scale 10^d, as in the paper) to try; "none" to skip.
    #[arg(long, default_value = "1-5", value_parser = parse_digits)]
    pub digits: crate::common::List,
}

fn parse_digits(s: &str) -> Result<crate::common::List, String> {
    if s.trim() == "none" {
        return Ok(crate::common::List(Vec::new()));
    }
    let v = crate::common::parse_list(s)?;
    if let Some(d) = v.iter().find(|&&d| d > 9) {
        return Err(format!(
            "{d} decimal digits is more than this experiment supports (9)"
        ));
    }
    Ok(crate::common::List(v))
}

/// Default epochs of `precision`.
const DEFAULT_EPOCHS: usize = 3;

/// Columns of `precision.csv`.
pub const COLUMNS: [&str; 16] = [
    "scheme",
    "value",
    "test_accuracy",
    "test_loss",
    "float_test_accuracy",
    "max_weight_int",
    "max_delta_int",
    "forward_bound",
    "backward_bound",
    "observed_max_forward",
    "observed_max_backward",
    "log2_bound",
    "worst_giant_steps",
    "fits_default_dlog",
    "fits_key_policy",
    "seed",
];

/// Integer products that remember the largest magnitudes they saw.
#[derive(Debug, Clone)]
struct Tracking<P> {
    inner: P,
    max_w: u64,
    max_d: u64,
    max_z: u64,
    max_g: u64,
}

impl<P> Tracking<P> {
    fn new(inner: P) -> Self {
        Tracking {
            inner,
            max_w: 0,
            max_d: 0,
            max_z: 0,
            max_g: 0,
        }
    }
}

fn max_abs(m: ArrayView2<i64>) -> u64 {
    m.fold(0u64, |a, v| a.max(v.unsigned_abs()))
}

impl<P: IntegerProducts> IntegerProducts for Tracking<P> {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.max_w = self.max_w.max(max_abs(w_q));
        let z = self.inner.forward_int(batch, w_q)?;
        self.max_z = self.max_z.max(max_abs(z.view()));
        Ok(z)
    }
    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.max_d = self.max_d.max(max_abs(delta_q));
        let g = self.inner.backward_int(batch, delta_q)?;
        self.max_g = self.max_g.max(max_abs(g.view()));
        Ok(g)
    }
    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.inner.output_error_int(batch, a_q)
    }
    fn num_batches(&self) -> usize {
        self.inner.num_batches()
    }
    fn batch_len(&self, batch: usize) -> usize {
        self.inner.batch_len(batch)
    }
    fn input_bound(&self) -> u32 {
        self.inner.input_bound()
    }
    fn patches(&self) -> Option<&nn::layers::Geometry> {
        self.inner.patches()
    }
}

/// A first layer with one fixed decimal scale `10^d` for weights and deltas (the paper's
/// fixed-point encoding), over any integer products.
struct FixedScale<P> {
    inner: P,
    scale: f64,
    q: Quantizer,
}

impl<P: IntegerProducts> FixedScale<P> {
    fn round(&self, m: ArrayView2<f32>, what: &'static str) -> Result<Array2<i64>, SeamError> {
        let mut out = Array2::zeros(m.raw_dim());
        for (o, &v) in out.iter_mut().zip(m.iter()) {
            let x = v as f64 * self.scale;
            if !x.is_finite() || x.abs() >= (1u64 << 53) as f64 {
                return Err(SeamError::Quantization {
                    what,
                    reason: format!("{v} times {} does not fit", self.scale),
                });
            }
            *o = x.round() as i64;
        }
        Ok(out)
    }
}

impl<P: IntegerProducts> FirstLayer for FixedScale<P> {
    fn forward(&mut self, batch: usize, w1: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let wq = self.round(w1, "weights")?;
        let z = self.inner.forward_int(batch, wq.view())?;
        self.q.dequantize_forward(
            z.view(),
            &vec![self.scale; w1.nrows()],
            self.inner.input_bound(),
        )
    }
    fn backward(&mut self, batch: usize, delta: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let dq = self.round(delta, "deltas")?;
        let g = self.inner.backward_int(batch, dq.view())?;
        self.q.dequantize_backward(
            g.view(),
            &vec![self.scale; delta.ncols()],
            self.inner.input_bound(),
        )
    }
    fn output_error(&mut self, batch: usize, a: ArrayView2<f32>) -> Result<Array2<f32>, SeamError> {
        let a_q = self.q.quantize_outputs(a)?;
        let e = self.inner.output_error_int(batch, a_q.view())?;
        Ok(self.q.dequantize_output_error(e.view()))
    }
    fn num_batches(&self) -> usize {
        self.inner.num_batches()
    }
    fn batch_len(&self, batch: usize) -> usize {
        self.inner.batch_len(batch)
    }
    fn patches(&self) -> Option<&nn::layers::Geometry> {
        self.inner.patches()
    }
}

impl<P: IntegerProducts> trainer::Resumable for FixedScale<P> {
    fn rounding_stream(&self) -> u64 {
        0
    }
    fn set_rounding_stream(&mut self, _: u64) {}
}

/// One precision setting's result.
#[derive(Debug, Clone)]
struct Outcome {
    scheme: &'static str,
    value: u32,
    seed: u64,
    accuracy: f64,
    loss: f64,
    /// The float baseline's test accuracy for the same seed (same model and batches).
    float_accuracy: f64,
    max_w: u64,
    max_d: u64,
    fwd_bound: u64,
    bwd_bound: u64,
    seen_z: u64,
    seen_g: u64,
}

/// Giant steps of the default baby-step giant-step table to cover `bound`, worst case.
pub fn giant_steps(bound: u64) -> u64 {
    let h = DEFAULT_HALF_WIDTH;
    bound.saturating_add(h) / (2 * h + 1)
}

impl Outcome {
    fn bound(&self) -> u64 {
        self.fwd_bound.max(self.bwd_bound)
    }
    fn fits_dlog(&self) -> bool {
        self.bound() <= DEFAULT_LIMIT
    }
    fn fits_policy(&self) -> bool {
        // The authority's default policy: key entries up to 32767.
        self.max_w <= 32767 && self.max_d <= 32767
    }
    fn csv(&self) -> Vec<String> {
        vec![
            self.scheme.into(),
            self.value.to_string(),
            format!("{:.6}", self.accuracy),
            format!("{:.6}", self.loss),
            format!("{:.6}", self.float_accuracy),
            self.max_w.to_string(),
            self.max_d.to_string(),
            self.fwd_bound.to_string(),
            self.bwd_bound.to_string(),
            self.seen_z.to_string(),
            self.seen_g.to_string(),
            format!("{:.2}", (self.bound().max(1) as f64).log2()),
            giant_steps(self.bound()).to_string(),
            self.fits_dlog().to_string(),
            self.fits_policy().to_string(),
            self.seed.to_string(),
        ]
    }
}

/// One setting (scheme and value) over all seeds: the first seed's outcome (its largest
/// integers raised to the maximum over the seeds), and per seed the accuracy, the loss and
/// the accuracy minus the float run's of that seed.
#[derive(Debug, Clone)]
struct Setting {
    first: Outcome,
    acc: Vec<f64>,
    loss: Vec<f64>,
    diff: Vec<f64>,
}

impl Setting {
    fn push(&mut self, r: &Outcome) {
        self.acc.push(r.accuracy);
        self.loss.push(r.loss);
        self.diff.push(r.accuracy - r.float_accuracy);
    }
}

/// Mean and sample standard deviation (0 for one value) of the finite values.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// Accuracy as `mean ± std` in percent (just the mean for one seed).
fn pct_pm(v: &[f64]) -> String {
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{:.2} ± {:.2}%", 100.0 * m, 100.0 * s)
    } else {
        pct(m)
    }
}

/// The whole `precision` experiment.
pub fn run(args: &PrecisionArgs) -> Result<Summary> {
    let clock = Stopwatch::start();
    let out = args.common.out_dir()?.to_path_buf();
    let data = args.common.load()?;
    let epochs = args.train.epochs.unwrap_or(DEFAULT_EPOCHS);
    let bs = args.train.batch_size();
    let nb = full_batches(data.train.len(), bs)?;
    for &b in &args.bits.0 {
        qmax(b).with_context(|| format!("--bits {b}"))?;
    }
    let shape = Shape::of(args, &data.train)?;
    let n_cols = shape.n_cols;
    if args.seeds == 0 {
        anyhow::bail!("--seeds must be at least 1");
    }
    let seeds: Vec<u64> = (0..args.seeds).map(|k| args.train.seed + k).collect();
    let total = (args.bits.0.len() + args.digits.0.len() + 1) * seeds.len();
    let pb = progress(args.common.quiet, total as u64, "precision runs");
    // Seeds are independent runs, each on one core: run them side by side.
    let per_seed = seeds
        .par_iter()
        .map(|&seed| run_seed(args, &data, seed, epochs, &shape, &pb))
        .collect::<Result<Vec<_>>>()?;
    let float_acc: Vec<f64> = per_seed.iter().map(|s| s.0).collect();
    let float_loss: Vec<f64> = per_seed.iter().map(|s| s.1).collect();
    let results: Vec<Outcome> = per_seed.into_iter().flat_map(|s| s.2).collect();
    pb.finish_and_clear();

    write_csv(
        &out.join("precision.csv"),
        &COLUMNS,
        &results.iter().map(Outcome::csv).collect::<Vec<_>>(),
    )?;
    // One row per setting: figures of every seed, largest integers over the seeds.
    let mut settings: Vec<Setting> = Vec::new();
    for r in &results {
        match settings
            .iter_mut()
            .find(|s| s.first.scheme == r.scheme && s.first.value == r.value)
        {
            Some(s) => {
                s.push(r);
                let o = &mut s.first;
                o.max_w = o.max_w.max(r.max_w);
                o.max_d = o.max_d.max(r.max_d);
                o.fwd_bound = o.fwd_bound.max(r.fwd_bound);
                o.bwd_bound = o.bwd_bound.max(r.bwd_bound);
                o.seen_z = o.seen_z.max(r.seen_z);
                o.seen_g = o.seen_g.max(r.seen_g);
            }
            None => {
                let mut s = Setting {
                    first: r.clone(),
                    acc: Vec::new(),
                    loss: Vec::new(),
                    diff: Vec::new(),
                };
                s.push(r);
                settings.push(s);
            }
        }
    }
    let net = args.train.layout(&data.train.info)?;
    let figures = plot_results(&out, &settings, &results, &float_acc, &net, bs, epochs)?;

    let mut t = Table::new(
        format!(
            "Final test accuracy vs first-layer precision ({net}, batch {bs}, {epochs} epoch{} of {nb} steps, {} seed{})",
            if epochs == 1 { "" } else { "s" },
            seeds.len(),
            if seeds.len() == 1 { "" } else { "s" }
        ),
        &[
            "precision",
            "test accuracy",
            "minus float, same seed",
            "test loss",
            "largest w_q",
            "largest δ_q",
            "dlog bound fwd",
            "dlog bound bwd",
            "largest seen fwd / bwd",
            "giant steps (worst)",
            "fits FE defaults",
        ],
    );
    t.row(vec![
        "float (no quantization)".into(),
        pct_pm(&float_acc),
        "-".into(),
        format!("{:.4}", mean_std(&float_loss).0),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
    ]);
    for Setting {
        first: r,
        acc,
        loss,
        diff,
    } in &settings
    {
        let name = match r.scheme {
            "bits" => format!("{} bits", r.value),
            _ => format!(
                "{} digit{} (×10^{})",
                r.value,
                if r.value == 1 { "" } else { "s" },
                r.value
            ),
        };
        let fits = match (r.fits_dlog(), r.fits_policy()) {
            (true, true) => "yes".to_string(),
            (false, _) => "no: bound > 2^36".to_string(),
            (true, false) => "no: key entries > 32767".to_string(),
        };
        t.row(vec![
            name,
            pct_pm(acc),
            paired(diff),
            format!("{:.4}", mean_std(loss).0),
            r.max_w.to_string(),
            r.max_d.to_string(),
            format!(
                "{} (2^{:.1})",
                r.fwd_bound,
                (r.fwd_bound.max(1) as f64).log2()
            ),
            format!(
                "{} (2^{:.1})",
                r.bwd_bound,
                (r.bwd_bound.max(1) as f64).log2()
            ),
            format!("{} / {}", r.seen_z, r.seen_g),
            giant_steps(r.bound()).to_string(),
            fits,
        ]);
    }
    t.note(format!(
        "Bounds: forward n·255·max|w_q| with n = {n_cols} (a row's inputs, or a kernel's \
         patch, and the bias input), backward B·255·max|δ_q| with B = {} (the batch, times \
         the positions for a convolution); for bits, max|w_q| = max|δ_q| = 2^(bits-1)-1 by \
         construction, for digits the largest integer seen in training. The trainer's \
         baby-step table holds ±2^19 points, so a value needs at most bound/(2^20+1) giant \
         steps (real values are far below the worst case and are found first); the solver \
         accepts bounds up to 2^36, the authority's policy key entries up to 32767.",
        shape.rows
    ));
    t.note(
        "Minus float: each seed's accuracy minus the float run's with the same seed (same \
         initial weights and batch order), in percentage points: mean ± standard error over \
         the seeds, and how many seeds are within 0.5 points of their float run. Runs that \
         differ in any rounding drift apart chaotically, so one seed's difference is mostly \
         noise; the mean over many seeds measures the cost of the quantization."
            .to_string(),
    );
    t.note(
        "Simulation only: the plain integer products are the integers FE decrypts, so each \
         row is what FE training with that setting gives (proven bit for bit by `accuracy` \
         and by the end-to-end tests)."
            .to_string(),
    );
    Ok(Summary {
        name: "precision".into(),
        description: format!(
            "Final test accuracy of {net} after {epochs} epoch{} (batch {bs}, {}) for \
             first-layer weights and deltas quantized to {} bits (per-row scales, the \
             trainer's scheme){}, against plain float training with the same seeds, on the {}.",
            if epochs == 1 { "" } else { "s" },
            match seeds.as_slice() {
                [s] => format!("seed {s}"),
                [first, .., last] => format!("seeds {first} to {last}"),
                [] => "no seeds".into(),
            },
            list(&args.bits.0),
            if args.digits.0.is_empty() {
                String::new()
            } else {
                format!(
                    " and to {} decimal digits (fixed scale 10^d, the paper's encoding)",
                    list(&args.digits.0)
                )
            },
            data.source
        ),
        tables: vec![t],
        figures,
        csv: vec!["precision.csv".into()],
        seconds: clock.secs(),
        command: crate::common::command_line(),
    })
}

/// The first layer's product shape: columns of a product row and rows per batch.
struct Shape {
    /// `n + 1` for a dense first layer, `K + 1` for a convolution.
    n_cols: usize,
    /// Product rows per batch: `B`, or `B·P` for a convolution.
    rows: usize,
    geometry: Option<nn::layers::Geometry>,
}

impl Shape {
    fn of(args: &PrecisionArgs, train: &nn::data::Dataset) -> Result<Self> {
        let geometry = args
            .train
            .config(8, 1)?
            .model_spec(&train.info)?
            .first_geometry();
        let bs = args.train.batch_size();
        Ok(Shape {
            n_cols: geometry.map_or(train.features() + 1, |g| g.patch_len() + 1),
            rows: geometry.map_or(bs, |g| bs * g.positions()),
            geometry,
        })
    }

    /// Plain integer products over `train`, over its patches for a convolution.
    fn products(&self, train: &nn::data::Dataset, bs: usize) -> Result<PlainIntegers> {
        Ok(PlainIntegers::from_dataset(train.clone(), bs, true)?
            .with_patches(self.geometry.as_ref())?)
    }
}

/// One seed's runs: the float baseline (its test accuracy and loss), then every bit width and
/// every number of decimal digits, each outcome carrying the baseline's accuracy.
fn run_seed(
    args: &PrecisionArgs,
    data: &crate::common::Data,
    seed: u64,
    epochs: usize,
    shape: &Shape,
    pb: &indicatif::ProgressBar,
) -> Result<(f64, f64, Vec<Outcome>)> {
    let n_cols = shape.n_cols;
    let bs = args.train.batch_size();
    let mut targs = args.train.clone();
    targs.seed = seed;
    let mut results = Vec::new();

    // Plain float baseline: the trainer's own float loop, same model and batches.
    let cfg = targs.config(8, epochs)?;
    let mut h = Vec::new();
    trainer::run_float(data.train.clone(), bs, &cfg, Some(&data.test), |_, m, _| {
        h.push(m.clone());
        Ok(())
    })
    .with_context(|| format!("plain float training, seed {seed}"))?;
    let float_acc = h.last().and_then(|m| m.test_accuracy).unwrap_or(f64::NAN);
    let float_loss = h.last().and_then(|m| m.test_loss).unwrap_or(f64::NAN);
    pb.inc(1);

    for &bits in &args.bits.0 {
        let cfg = targs.config(bits, epochs)?;
        let p = Tracking::new(shape.products(&data.train, bs)?);
        let mut seen = (0, 0, 0, 0);
        let r = trainer::run(
            p,
            &crate::common::run_data(&data.train, bs),
            &cfg,
            Some(&data.test),
            None,
            None,
            |_, _, t| {
                seen = (t.max_w, t.max_d, t.max_z, t.max_g);
                Ok(())
            },
        )
        .with_context(|| format!("training with {bits}-bit products, seed {seed}"))?;
        let last = r.history.last();
        results.push(Outcome {
            scheme: "bits",
            value: bits,
            seed,
            accuracy: last.and_then(|m| m.test_accuracy).unwrap_or(f64::NAN),
            loss: last.and_then(|m| m.test_loss).unwrap_or(f64::NAN),
            float_accuracy: float_acc,
            max_w: seen.0,
            max_d: seen.1,
            fwd_bound: max_abs_forward(n_cols, bits, data.train.info.x_bound),
            bwd_bound: max_abs_backward(shape.rows, bits, data.train.info.x_bound),
            seen_z: seen.2,
            seen_g: seen.3,
        });
        pb.inc(1);
    }
    for &d in &args.digits.0 {
        let inner = crate::common::policy_filter(
            Tracking::new(shape.products(&data.train, bs)?),
            &data.train.info,
            bs,
        );
        let layer = FixedScale {
            inner,
            scale: 10f64.powi(d as i32),
            q: Quantizer::new(8),
        };
        let cfg = targs.config(8, epochs)?;
        let mut seen = (0, 0, 0, 0);
        let mut last = None;
        let r = trainer::run_layer(
            layer,
            &crate::common::run_data(&data.train, bs),
            &cfg,
            Some(&data.test),
            None,
            None,
            |_, m, l| {
                let t = l.inner.inner();
                seen = (t.max_w, t.max_d, t.max_z, t.max_g);
                last = Some(m.clone());
                Ok(())
            },
        );
        if let Err(e) = r {
            pb.suspend(|| eprintln!("{d} decimal digits, seed {seed}: training failed: {e}"));
        }
        results.push(Outcome {
            scheme: "digits",
            value: d,
            seed,
            accuracy: last
                .as_ref()
                .and_then(|m| m.test_accuracy)
                .unwrap_or(f64::NAN),
            loss: last.as_ref().and_then(|m| m.test_loss).unwrap_or(f64::NAN),
            float_accuracy: float_acc,
            max_w: seen.0,
            max_d: seen.1,
            fwd_bound: (n_cols as u64).saturating_mul(255).saturating_mul(seen.0),
            bwd_bound: (shape.rows as u64)
                .saturating_mul(255)
                .saturating_mul(seen.1),
            seen_z: seen.2,
            seen_g: seen.3,
        });
        pb.inc(1);
    }
    Ok((float_acc, float_loss, results))
}

/// Paired differences (fractions) as `mean ± standard error` in points and the count within
/// half a point; just the value for one seed.
fn paired(diffs: &[f64]) -> String {
    let (m, sd) = mean_std(diffs);
    let finite = diffs.iter().filter(|d| d.is_finite()).count();
    if !m.is_finite() {
        return "-".into();
    }
    if finite < 2 {
        return format!("{:+.2} pt", 100.0 * m);
    }
    // The tolerance absorbs the rounding of accuracies like 0.9530 - 0.9480.
    let within = diffs.iter().filter(|d| d.abs() <= 0.005 + 1e-9).count();
    format!(
        "{:+.2} ± {:.2} pt ({within}/{finite} within 0.5)",
        100.0 * m,
        100.0 * sd / (finite as f64).sqrt()
    )
}

fn list(v: &[u32]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn plot_results(
    out: &std::path::Path,
    settings: &[Setting],
    results: &[Outcome],
    float_acc: &[f64],
    net: &str,
    bs: usize,
    epochs: usize,
) -> Result<Vec<String>> {
    let of = |scheme: &str, y: &dyn Fn(&Outcome) -> f64| -> Vec<(f64, f64)> {
        settings
            .iter()
            .map(|s| &s.first)
            .filter(|r| r.scheme == scheme && y(r).is_finite())
            .map(|r| (r.value as f64, y(r)))
            .collect()
    };
    let mean = |scheme: &str| -> Vec<(f64, f64)> {
        settings
            .iter()
            .filter(|s| s.first.scheme == scheme)
            .map(|s| (s.first.value as f64, mean_std(&s.acc).0))
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let each = |scheme: &str| -> Vec<(f64, f64)> {
        results
            .iter()
            .filter(|r| r.scheme == scheme && r.accuracy.is_finite())
            .map(|r| (r.value as f64, r.accuracy))
            .collect()
    };
    let float_mean = mean_std(float_acc).0;
    let several = float_acc.len() > 1;
    let baseline = |pts: &[(f64, f64)]| {
        let lo = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        Series::new(
            if several {
                "plain float (mean)"
            } else {
                "plain float"
            },
            vec![(lo - 0.3, float_mean), (hi + 0.3, float_mean)],
            COLORS[0],
        )
        .styled(Line::Dashed, Marker::None)
    };
    let accuracy_panel = |scheme: &str, title: &str, x: &str, label: &str, color| {
        let m = mean(scheme);
        let mut series = vec![
            baseline(&m),
            Series::new(
                if several {
                    format!("{label}, mean")
                } else {
                    label.to_string()
                },
                m,
                color,
            ),
        ];
        if several {
            series.push(
                Series::new("single seeds", each(scheme), color).styled(Line::None, Marker::Hollow),
            );
        }
        let mut c = LineChart::new(title, x, "test accuracy", series);
        c.integer_x = true;
        Panel::Lines(c)
    };
    let mut panels = Vec::new();
    if !mean("bits").is_empty() {
        panels.push(accuracy_panel(
            "bits",
            "Accuracy vs bits (per-row scales)",
            "bits of first-layer weights and deltas",
            "quantized (= FE)",
            COLORS[3],
        ));
    }
    if !mean("digits").is_empty() {
        panels.push(accuracy_panel(
            "digits",
            "Accuracy vs decimal digits (fixed scale 10^d)",
            "decimal digits d",
            "fixed-point (= FE)",
            COLORS[4],
        ));
    }
    // Each seed minus its own float run: the cost of quantization without seed noise.
    let bits = || settings.iter().filter(|s| s.first.scheme == "bits");
    let diffs: Vec<(f64, f64)> = bits()
        .flat_map(|s| s.diff.iter().map(|&d| (s.first.value as f64, 100.0 * d)))
        .filter(|p| p.1.is_finite())
        .collect();
    if several && !diffs.is_empty() {
        let lo = diffs.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) - 0.3;
        let hi = diffs.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max) + 0.3;
        let mean_diff: Vec<(f64, f64)> = bits()
            .map(|s| (s.first.value as f64, 100.0 * mean_std(&s.diff).0))
            .collect();
        let mut c = LineChart::new(
            "Minus the float run of the same seed",
            "bits of first-layer weights and deltas",
            "accuracy difference (points)",
            vec![
                Series::new("±0.5 points", vec![(lo, 0.5), (hi, 0.5)], COLORS[7])
                    .styled(Line::Dashed, Marker::None),
                Series::new("", vec![(lo, -0.5), (hi, -0.5)], COLORS[7])
                    .styled(Line::Dashed, Marker::None),
                Series::new("mean", mean_diff, COLORS[3]),
                Series::new("single seeds", diffs, COLORS[3]).styled(Line::None, Marker::Hollow),
            ],
        );
        c.integer_x = true;
        panels.push(Panel::Lines(c));
    }
    let fwd = of("bits", &|r| r.fwd_bound as f64);
    if !fwd.is_empty() {
        let lo = fwd.first().map(|p| p.0).unwrap_or(2.0);
        let hi = fwd.last().map(|p| p.0).unwrap_or(12.0);
        let mut c = LineChart::new(
            "Discrete-log bound vs bits",
            "bits of first-layer weights and deltas",
            "largest |value| to solve",
            vec![
                Series::new("forward n·255·(2^(b-1)-1)", fwd, COLORS[1]),
                Series::new(
                    format!("backward B·255·(2^(b-1)-1), B={bs}"),
                    of("bits", &|r| r.bwd_bound as f64),
                    COLORS[2],
                )
                .styled(Line::Solid, Marker::Triangle),
                Series::new(
                    "table half-width 2^19 (no giant step)",
                    vec![
                        (lo, DEFAULT_HALF_WIDTH as f64),
                        (hi, DEFAULT_HALF_WIDTH as f64),
                    ],
                    COLORS[7],
                )
                .styled(Line::Dashed, Marker::None),
            ],
        );
        c.log_y = true;
        c.integer_x = true;
        c.legend = plot::LegendPos::UpperLeft;
        panels.push(Panel::Lines(c));
    }
    if panels.is_empty() {
        return Ok(Vec::new());
    }
    plot::save(
        out,
        "precision",
        &format!(
            "{net}, batch {bs}, {epochs} epoch{}: accuracy and discrete-log bound vs precision",
            if epochs == 1 { "" } else { "s" }
        ),
        &panels,
    )
}

#[cfg(test)]
mod tests {
    use super::paired;

    #[test]
    fn paired_differences_report_mean_standard_error_and_count_within_half_a_point() {
        // -0.58, +0.23, +0.35, +0.33 points: mean +0.0825, sd 0.4462, s.e. 0.2231.
        let d = [-0.0058, 0.0023, 0.0035, 0.0033];
        assert_eq!(paired(&d), "+0.08 ± 0.22 pt (3/4 within 0.5)");
        // Exactly half a point counts as within, despite the rounding of 0.9530 - 0.9480.
        assert_eq!(
            paired(&[0.9530 - 0.9480, -0.005]),
            "+0.00 ± 0.50 pt (2/2 within 0.5)"
        );
        assert_eq!(paired(&[-0.0058]), "-0.58 pt");
        assert_eq!(paired(&[f64::NAN]), "-");
    }
}
