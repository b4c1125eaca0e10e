//! `timing`: where the time of encrypted training goes, and a cost model to predict an epoch.
//!
//! For every batch size `B` to measure, an authority is started and the client encrypts
//! `steps` batches; for every first-layer width `H`, the trainer then runs those `steps`
//! encrypted steps of `n-H-<rest>` (n the data's features) through the real code path, and the secure layer's
//! [`Timings`] split each step into key requests, forward decryption, backward decryption,
//! output error (FEBO), I/O and the clear part (everything else: the other layers, softmax,
//! quantization, the optimizer).
//!
//! The model: per step, forward decryption is `B·H` inner products of length 785, backward
//! decryption `785·min(H, B)` inner products of length `B` (keys for a basis of the deltas;
//! the other `H − B` columns' products are derived), the output error `10·B` FEBO
//! decryptions, I/O reads `≈ 1571·B + 785` points, keys are `H + min(H, B) + 10B` per step;
//! an epoch is `⌊N/B⌋` steps. Each part's coefficients are fitted (non-negative least squares) on the
//! measured settings.

use crate::common::{progress, CommonArgs, Stopwatch, Summary};
use crate::fe_env::secure_secs;
use crate::fe_env::{self, FeEnv};
use crate::plot::{self, Line, LineChart, Marker, Panel, Series, StackedBars, COLORS};
use crate::table::{pct, secs, write_csv, Table};
use anyhow::{bail, Context, Result};
use clap::Args;
use cryptonn::protocol::AuthorityClient;
use cryptonn::secure::{KeyPolicyFilter, SecureProducts, Timings};
use cryptonn::trainer::TrainConfig;
use nn::first_layer::{FirstLayer, Quantized};

use nn::train::{EpochState, Flow, Hooks, Progress, RunSettings, StepView, TrainError};

/// Options of `timing`.
#[derive(Args, Debug, Clone)]
pub struct TimingArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// First-layer widths H to measure (networks `n-H-<rest>`).
    #[arg(long, default_value = "32,64,128", value_parser = crate::common::parse_list_arg)]
    pub hidden: crate::common::List,
    /// Batch sizes B to measure.
    #[arg(long, default_value = "16,32,64", value_parser = crate::common::parse_list_arg)]
    pub batches: crate::common::List,
    /// Encrypted training steps measured per setting.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Layers after the first, e.g. 32-10.
    #[arg(long, default_value = "32-10")]
    pub rest: String,
    /// Hidden activation.
    #[arg(long, default_value = "sigmoid")]
    pub activation: nn::activation::Activation,
    /// Bits of the first-layer weights and deltas.
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Predict an epoch for this first-layer width.
    #[arg(long, default_value_t = 128)]
    pub predict_hidden: usize,
    /// Predict an epoch for this batch size.
    #[arg(long, default_value_t = 64)]
    pub predict_batch: usize,
    /// Predict an epoch over this many training images.
    #[arg(long, default_value_t = 60_000)]
    pub predict_samples: usize,
}

/// Columns of `timing_measured.csv`.
pub const MEASURED_COLUMNS: [&str; 15] = [
    "hidden",
    "batch",
    "steps",
    "keys_s",
    "forward_s",
    "backward_s",
    "output_error_s",
    "io_s",
    "clear_s",
    "step_s",
    "dlog_cpu_share",
    "keys_per_step",
    "decryptions_per_step",
    "client_encrypted_samples",
    "client_encrypt_s",
];

/// The parts of a step, in table and plot order.
const PARTS: [&str; 6] = [
    "keys",
    "forward decryption",
    "backward decryption",
    "output error (FEBO)",
    "I/O",
    "clear layers",
];

/// Per-step means of one measured setting.
#[derive(Debug, Clone)]
struct Measured {
    hidden: usize,
    batch: usize,
    steps: usize,
    /// Seconds per step of each of [`PARTS`].
    parts: [f64; 6],
    dlog_share: Option<f64>,
    keys: f64,
    decryptions: f64,
    /// Samples the client encrypted for this batch size, and its seconds.
    enc_samples: usize,
    enc_seconds: f64,
}

impl Measured {
    fn total(&self) -> f64 {
        self.parts.iter().sum()
    }
}

/// Features of each part for a setting `(H, B)`, per step (see the module documentation).
fn features(part: usize, h: f64, b: f64) -> Vec<f64> {
    match part {
        0 => vec![1.0, h, b], // keys: request + H + min(H, B) FEIP + 10B FEBO keys
        1 => vec![b * h, b],  // forward: B·H inner products of length 785
        2 => vec![h.min(b) * b, h, 1.0], // backward: 785·min(H, B) of length B, H − B derived
        3 => vec![b, 1.0],    // output error: 10·B FEBO decryptions
        4 => vec![b, 1.0],    // I/O: ≈ 1571·B + 785 points
        _ => vec![b * h, b, 1.0], // clear layers
    }
}

/// Names of the features, for the model table.
fn feature_names(part: usize) -> &'static [&'static str] {
    match part {
        0 => &["1", "H", "B"],
        1 => &["B·H", "B"],
        2 => &["B·min(H,B)", "H", "1"],
        3 | 4 => &["B", "1"],
        _ => &["B·H", "B", "1"],
    }
}

/// Non-negative least squares by an active set on the normal equations: fits `y ≈ X c`
/// with `c ≥ 0`, dropping features whose coefficient would be negative or that the data
/// cannot determine.
pub fn nnls(x: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    let k = x.first().map(Vec::len).unwrap_or(0);
    let mut active: Vec<usize> = (0..k).collect();
    let scale: Vec<f64> = (0..k)
        .map(|j| x.iter().map(|r| r[j].abs()).fold(0.0, f64::max).max(1e-300))
        .collect();
    loop {
        let m = active.len();
        let mut coef = vec![0.0; k];
        if m == 0 {
            return coef;
        }
        // Normal equations on scaled columns.
        let mut a = vec![vec![0.0; m + 1]; m];
        for (r, yr) in x.iter().zip(y) {
            for (p, &i) in active.iter().enumerate() {
                let xi = r[i] / scale[i];
                for (q, &j) in active.iter().enumerate() {
                    a[p][q] += xi * r[j] / scale[j];
                }
                a[p][m] += xi * yr;
            }
        }
        match solve(a) {
            Some(sol) => {
                let worst = sol
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v < 0.0)
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(p, _)| p);
                match worst {
                    Some(p) => {
                        active.remove(p);
                    }
                    None => {
                        for (p, &i) in active.iter().enumerate() {
                            coef[i] = sol[p] / scale[i];
                        }
                        return coef;
                    }
                }
            }
            None => {
                active.pop();
            }
        }
    }
}

/// Gauss-Jordan elimination with partial pivoting of an augmented `m × (m+1)` system;
/// `None` if singular.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let m = a.len();
    let norm = a
        .iter()
        .flat_map(|r| r.iter().take(m))
        .fold(0.0f64, |s, v| s.max(v.abs()))
        .max(1e-300);
    for c in 0..m {
        let p = (c..m).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-10 * norm {
            return None;
        }
        a.swap(c, p);
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, pv) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * pv;
                }
            }
        }
    }
    Some((0..m).map(|i| a[i][m] / a[i][i]).collect())
}

/// The fitted cost model.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// Coefficients of each part (see `features`).
    coef: Vec<Vec<f64>>,
    /// Client encryption: fixed seconds (the encryptor's tables), per sample, per batch.
    enc: [f64; 3],
}

impl CostModel {
    /// Predicted seconds of each part of one step.
    pub fn step_parts(&self, h: usize, b: usize) -> [f64; 6] {
        let mut out = [0.0; 6];
        for (p, o) in out.iter_mut().enumerate() {
            *o = features(p, h as f64, b as f64)
                .iter()
                .zip(&self.coef[p])
                .map(|(f, c)| f * c)
                .sum();
        }
        out
    }

    /// Predicted seconds of one step.
    pub fn step(&self, h: usize, b: usize) -> f64 {
        self.step_parts(h, b).iter().sum()
    }

    /// Predicted seconds of one epoch over `n` samples.
    pub fn epoch(&self, h: usize, b: usize, n: usize) -> f64 {
        (n / b.max(1)) as f64 * self.step(h, b)
    }

    /// Predicted seconds for the client to encrypt `n` samples in batches of `b`.
    pub fn encryption(&self, b: usize, n: usize) -> f64 {
        let batches = (n / b.max(1)) as f64;
        self.enc[0] + self.enc[1] * batches * b as f64 + self.enc[2] * batches
    }
}

/// The secure first layer as the trainer wraps it.
type SecureLayer = Quantized<KeyPolicyFilter<SecureProducts<AuthorityClient>>>;

/// Times every step of the training loop: wall time and the secure layer's parts.
struct StepTimer {
    clock: Stopwatch,
    before: Timings,
    steps: Vec<[f64; 6]>,
}

impl Hooks<SecureLayer> for StepTimer {
    fn after_step(&mut self, s: &StepView<'_, SecureLayer>) -> Result<Flow, TrainError> {
        let wall = self.clock.secs();
        let now = s.layer.inner().inner().timings();
        let d = now.since(&self.before);
        self.before = now;
        self.steps.push([
            d.keys.as_secs_f64(),
            d.forward.as_secs_f64(),
            d.backward.as_secs_f64(),
            d.output_error.as_secs_f64(),
            d.io.as_secs_f64(),
            (wall - secure_secs(&d)).max(0.0),
        ]);
        self.clock = Stopwatch::start();
        Ok(Flow::Continue)
    }
}

fn fit(measured: &[Measured]) -> CostModel {
    let coef = (0..PARTS.len())
        .map(|p| {
            let x: Vec<Vec<f64>> = measured
                .iter()
                .map(|m| features(p, m.hidden as f64, m.batch as f64))
                .collect();
            let y: Vec<f64> = measured.iter().map(|m| m.parts[p]).collect();
            nnls(&x, &y)
        })
        .collect();
    // One encryption per batch size: seconds = fixed + per sample + per batch.
    let mut runs: Vec<(usize, usize, f64)> = measured
        .iter()
        .map(|m| (m.batch, m.enc_samples, m.enc_seconds))
        .collect();
    runs.sort_by_key(|r| r.0);
    runs.dedup_by_key(|r| r.0);
    let x: Vec<Vec<f64>> = runs
        .iter()
        .map(|&(b, n, _)| vec![1.0, n as f64, (n / b.max(1)) as f64])
        .collect();
    let y: Vec<f64> = runs.iter().map(|r| r.2).collect();
    let e = nnls(&x, &y);
    CostModel {
        coef,
        enc: [e[0], e[1], e[2]],
    }
}

/// Duration-valued fields of [`Timings`] by name, via its serde form (so that fields added
/// later, such as a discrete-log share, show up without code changes here).
fn timing_field(t: &Timings, name: &str) -> Option<f64> {
    let v = serde_json::to_value(t).ok()?;
    let d = v.get(name)?;
    let s = d.get("secs")?.as_f64()?;
    let n = d.get("nanos")?.as_f64()?;
    Some(s + n * 1e-9)
}

/// Human-readable duration for predictions.
pub fn human(s: f64) -> String {
    if s >= 7200.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        secs(s)
    }
}

/// The whole `timing` experiment.
pub fn run(args: &TimingArgs) -> Result<Summary> {
    let clock = Stopwatch::start();
    let out = args.common.out_dir()?.to_path_buf();
    let data = args.common.load()?;
    if args.steps == 0 || args.hidden.0.is_empty() || args.batches.0.is_empty() {
        bail!("--steps, --hidden and --batches must not be empty or zero");
    }
    let dlog = fe_env::dlog_table()?;
    let total = args.hidden.0.len() * args.batches.0.len();
    let pb = progress(args.common.quiet, total as u64, "timing settings");
    let nf = data.train.features();
    let mut measured = Vec::new();
    for &b in &args.batches.0 {
        let b = b as usize;
        let need = b * args.steps;
        if b == 0 || data.train.len() < need {
            bail!(
                "{} training images cannot fill {} batches of {b}",
                data.train.len(),
                args.steps
            );
        }
        let subset = data.train.take(need);
        pb.set_message(format!("encrypting {need} images (B={b})"));
        let env = FeEnv::start(b, &subset, &data.source, false)?;
        let (enc_samples, enc_seconds) = (env.encryption.samples, env.encryption.seconds);
        for &h in &args.hidden.0 {
            let h = h as usize;
            pb.set_message(format!("H={h}, B={b}: {} steps", args.steps));
            let cfg = TrainConfig {
                spec: format!("{h}-{}", args.rest),
                activation: args.activation,
                epochs: 1,
                seed: args.seed,
                bits: args.bits,
                progress: false,
                ..TrainConfig::default()
            };
            // The trainer's loop over the encrypted batches, timing each step in a hook.
            let products = env.products(dlog.clone())?;
            let mut layer = Quantized::new(
                crate::common::policy_filter(products, &subset.info, b),
                cfg.quantizer(),
            )?;
            let mut progress = Progress {
                model: cfg.model(&subset.info)?,
                optimizer: cfg.optimizer(),
                state: EpochState::new(0, layer.num_batches(), cfg.seed, true),
                history: Vec::new(),
            };
            let mut timer = StepTimer {
                clock: Stopwatch::start(),
                before: layer.inner().inner().timings(),
                steps: Vec::new(),
            };
            let settings = RunSettings {
                epochs: 1,
                seed: cfg.seed,
                shuffle: true,
                progress_bar: false,
            };
            nn::train::run(&mut layer, &mut progress, &settings, None, &mut timer).with_context(
                || {
                    format!(
                        "encrypted training of {nf}-{h}-{} with batch {b}",
                        args.rest
                    )
                },
            )?;
            let StepTimer { before, steps, .. } = timer;
            // Medians per part: robust to a step slowed down by other load on the machine.
            let mut parts = [0.0; 6];
            for (p, v) in parts.iter_mut().enumerate() {
                let mut xs: Vec<f64> = steps.iter().map(|s| s[p]).collect();
                xs.sort_by(f64::total_cmp);
                *v = xs[xs.len() / 2];
            }
            let t = before;
            let n = args.steps as f64;
            let dlog_share = match (timing_field(&t, "dlog_cpu"), timing_field(&t, "group_cpu")) {
                (Some(d), Some(g)) if d + g > 0.0 => Some(d / (d + g)),
                _ => None,
            };
            measured.push(Measured {
                hidden: h,
                batch: b,
                steps: args.steps,
                parts,
                dlog_share,
                keys: t.keys_received as f64 / n,
                decryptions: t.decryptions as f64 / n,
                enc_samples,
                enc_seconds,
            });
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let model = fit(&measured);

    // CSV files.
    let rows: Vec<Vec<String>> = measured
        .iter()
        .map(|m| {
            let mut r = vec![
                m.hidden.to_string(),
                m.batch.to_string(),
                m.steps.to_string(),
            ];
            r.extend(m.parts.iter().map(|v| format!("{v:.6}")));
            r.push(format!("{:.6}", m.total()));
            r.push(m.dlog_share.map(|v| format!("{v:.4}")).unwrap_or_default());
            r.push(format!("{:.0}", m.keys));
            r.push(format!("{:.0}", m.decryptions));
            r.push(m.enc_samples.to_string());
            r.push(format!("{:.3}", m.enc_seconds));
            r
        })
        .collect();
    write_csv(&out.join("timing_measured.csv"), &MEASURED_COLUMNS, &rows)?;
    let hs = [16usize, 32, 64, 128, 256, 512];
    let bs = [16usize, 32, 64, 128, 256];
    let n = args.predict_samples;
    let mut pred_rows = Vec::new();
    for &h in &hs {
        for &b in &bs {
            let p = model.step_parts(h, b);
            let mut r = vec![h.to_string(), b.to_string(), n.to_string()];
            r.extend(p.iter().map(|v| format!("{v:.6}")));
            r.push(format!("{:.6}", model.step(h, b)));
            r.push(format!("{:.1}", model.epoch(h, b, n)));
            r.push(format!("{:.1}", model.encryption(b, n)));
            pred_rows.push(r);
        }
    }
    write_csv(
        &out.join("timing_model.csv"),
        &[
            "hidden",
            "batch",
            "samples",
            "keys_s",
            "forward_s",
            "backward_s",
            "output_error_s",
            "io_s",
            "clear_s",
            "step_s",
            "epoch_s",
            "client_encrypt_s",
        ],
        &pred_rows,
    )?;

    // Plots.
    let categories: Vec<String> = measured
        .iter()
        .map(|m| format!("H={} B={}", m.hidden, m.batch))
        .collect();
    let bars = StackedBars {
        title: "Measured cost of one encrypted step".into(),
        y_label: "seconds per step".into(),
        categories,
        components: PARTS
            .iter()
            .enumerate()
            .map(|(p, name)| {
                (
                    name.to_string(),
                    measured.iter().map(|m| m.parts[p]).collect(),
                )
            })
            .collect(),
    };
    let per_b: Vec<Series> = [16usize, 32, 64, 128]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            Series::new(
                format!("B={b}"),
                hs.iter()
                    .map(|&h| (h as f64, model.epoch(h, b, n) / 3600.0))
                    .collect(),
                COLORS[i],
            )
        })
        .collect();
    let mut c1 = LineChart::new(
        &format!("Predicted epoch over {n} images vs width"),
        "first-layer width H",
        "hours per epoch",
        per_b,
    );
    c1.log_x = true;
    c1.log_y = true;
    c1.legend = plot::LegendPos::UpperLeft;
    let per_h: Vec<Series> = [32usize, 64, 128, 256]
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            Series::new(
                format!("H={h}"),
                bs.iter()
                    .map(|&b| (b as f64, model.epoch(h, b, n) / 3600.0))
                    .collect(),
                COLORS[i + 4],
            )
            .styled(Line::Solid, Marker::Triangle)
        })
        .collect();
    let mut c2 = LineChart::new(
        &format!("Predicted epoch over {n} images vs batch"),
        "batch size B",
        "hours per epoch",
        per_h,
    );
    c2.log_x = true;
    c2.log_y = true;
    c2.legend = plot::LegendPos::UpperRight;
    let figures = plot::save(
        &out,
        "timing",
        "Encrypted training: measured step breakdown and predicted epoch time",
        &[Panel::Bars(bars), Panel::Lines(c1), Panel::Lines(c2)],
    )?;

    // Tables.
    let mut t1 = Table::new(
        format!(
            "Measured cost of one encrypted step ({nf}-H-{}, {}-bit, median of {} steps, all cores)",
            args.rest, args.bits, args.steps
        ),
        &[
            "H",
            "B",
            "keys",
            "forward",
            "backward",
            "output error",
            "I/O",
            "clear",
            "step",
            "model",
            "dlog share",
            "keys/step",
            "decryptions/step",
        ],
    );
    for m in &measured {
        let mut r = vec![m.hidden.to_string(), m.batch.to_string()];
        r.extend(m.parts.iter().map(|v| secs(*v)));
        r.push(secs(m.total()));
        r.push(secs(model.step(m.hidden, m.batch)));
        r.push(m.dlog_share.map(pct).unwrap_or_else(|| "-".into()));
        r.push(format!("{:.0}", m.keys));
        r.push(format!("{:.0}", m.decryptions));
        t1.row(r);
    }
    t1.note(
        "forward/backward: inner-product decryption including the discrete logs (\"dlog \
         share\": the discrete logs' share of their CPU time, where the trainer reports it); \
         keys: request, derivation at the authority and transport; I/O: reading and decoding the \
         encrypted batch; clear: everything else (other layers, softmax, quantization, \
         optimizer). \"model\": the fitted model's prediction for the same setting.",
    );
    let mut t2 = Table::new(
        "Fitted cost model (seconds per step; H = first-layer width, B = batch size)",
        &["part", "formula"],
    );
    for (p, name) in PARTS.iter().enumerate() {
        let terms: Vec<String> = feature_names(p)
            .iter()
            .zip(&model.coef[p])
            .filter(|(_, c)| **c > 0.0)
            .map(|(f, c)| {
                if *f == "1" {
                    format!("{c:.3e}")
                } else {
                    format!("{c:.3e}·{f}")
                }
            })
            .collect();
        t2.row(vec![
            name.to_string(),
            if terms.is_empty() {
                "0".into()
            } else {
                terms.join(" + ")
            },
        ]);
    }
    t2.row(vec![
        "client encryption of N samples (once)".into(),
        format!(
            "{:.3e} + {:.3e}·N + {:.3e}·⌊N/B⌋",
            model.enc[0], model.enc[1], model.enc[2]
        ),
    ]);
    t2.note(format!(
        "An epoch over N images is ⌊N/B⌋ steps, so it grows linearly with N. Fitted on {} \
         measured settings; predictions far outside the measured widths and batch sizes are \
         extrapolations. The machine is shared by several people: figures of separate runs differ by up to 2-3x, and heavier load only makes them slower, so they are upper bounds.",
        measured.len()
    ));
    let mut t3 = Table::new(
        format!("Predicted encrypted epoch over N = {n} images"),
        &["setting", "step", "epoch", "client encryption of N images"],
    );
    let mut settings = vec![(args.predict_hidden, args.predict_batch, n)];
    if (args.predict_hidden, args.predict_batch, n) != (128, 64, 60_000) {
        settings.push((128, 64, 60_000));
    }
    for (h, b, n) in settings {
        if b == 0 || h == 0 {
            continue;
        }
        t3.row(vec![
            format!("{nf}-{h}-{}, batch {b}, {n} images", args.rest),
            secs(model.step(h, b)),
            human(model.epoch(h, b, n)),
            human(model.encryption(b, n)),
        ]);
    }
    for &(h, b) in &[
        (32usize, 64usize),
        (64, 64),
        (128, 32),
        (128, 128),
        (256, 64),
    ] {
        t3.row(vec![
            format!("{nf}-{h}-{}, batch {b}, {n} images", args.rest),
            secs(model.step(h, b)),
            human(model.epoch(h, b, n)),
            human(model.encryption(b, n)),
        ]);
    }
    let mut csv = vec!["timing_measured.csv".to_string(), "timing_model.csv".into()];
    csv.dedup();
    Ok(Summary {
        name: "timing".into(),
        description: format!(
            "Real encrypted training steps (in-process authority over TCP, client-encrypted \
             file, secure first layer) of {nf}-H-{} for H in {{{}}} and batch B in {{{}}}, {} \
             steps each, on the {}; a cost model fitted to them predicts an epoch.",
            args.rest,
            join(&args.hidden.0),
            join(&args.batches.0),
            args.steps,
            data.source
        ),
        tables: vec![t1, t2, t3],
        figures,
        csv,
        seconds: clock.secs(),
        command: crate::common::command_line(),
    })
}

fn join(v: &[u32]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnls_recovers_coefficients_and_stays_non_negative() {
        let x: Vec<Vec<f64>> = (1..6).map(|i| vec![1.0, i as f64]).collect();
        let y: Vec<f64> = (1..6).map(|i| 2.0 + 3.0 * i as f64).collect();
        let c = nnls(&x, &y);
        assert!(
            (c[0] - 2.0).abs() < 1e-9 && (c[1] - 3.0).abs() < 1e-9,
            "{c:?}"
        );
        // A negative intercept is dropped: y = 3i - 1 is fitted with the slope only.
        let y: Vec<f64> = (1..6).map(|i| 3.0 * i as f64 - 1.0).collect();
        let c = nnls(&x, &y);
        assert_eq!(c[0], 0.0);
        assert!(c[1] > 2.5 && c[1] < 3.0, "{c:?}");
        // More features than points: still a non-negative answer.
        let c = nnls(&[vec![1.0, 2.0, 3.0]], &[6.0]);
        assert!(c.iter().all(|v| *v >= 0.0));
    }
}
