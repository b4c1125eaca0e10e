//! `accuracy`: test accuracy and loss per epoch of three runs with the same seed and data:
//!
//! * (a) **float**: plain training, first layer in f32 ([`nn::first_layer::PlainFloat`]);
//! * (b) **quantized**: plain training with the first layer's products computed on quantized
//!   integers ([`PlainIntegers`] through the trainer's seam), i.e. the simulation;
//! * (c) **FE**: training over the FE-encrypted dataset through the real code path: an
//!   authority on 127.0.0.1, the client's encrypted file, the trainer's [`SecureProducts`]
//!   asking for keys over TCP. The encrypted run and a simulated run are stepped in lockstep
//!   and their weights compared bit for bit after every step; when the FE budget is spent the
//!   run continues in simulation only, which the lockstep has shown to give the same weights.

use crate::common::{
    full_batches, model_digest, progress, CommonArgs, Stopwatch, Summary, TrainArgs,
};
use crate::fe_env::{self, secure_secs, timings_delta, FeEnv, Remap, Shadow};
use crate::plot::{self, Line, LineChart, Marker, Panel, Series, COLORS};
use crate::table::{pct, secs, write_csv, Table};
use anyhow::{bail, Context, Result};
use clap::Args;
use cryptonn::protocol::AuthorityClient;
use cryptonn::secure::{KeyPolicyFilter, SecureProducts, Timings};
use cryptonn::trainer::{self, TrainConfig};
use nn::data::Dataset;
use nn::first_layer::{IntegerProducts, PlainFloat, PlainIntegers, Quantized};
use nn::model::Model;
use nn::optim::Optimizer;
use nn::train::{EpochState, Flow, Hooks, Progress, RunSettings, StepStats, StepView};

/// Options of `accuracy`.
#[derive(Args, Debug, Clone)]
pub struct AccuracyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Bits of the quantized first-layer weights and deltas (runs b and c).
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Most training steps of run (c) computed with real FE (in lockstep with the simulation);
    /// 0 skips FE. The client encrypts the batches these steps visit.
    #[arg(long, default_value_t = 80)]
    pub fe_steps: usize,
    /// Stop the FE part after this many seconds of encrypted steps (at least one step is
    /// always done); combines with --fe-steps, whichever comes first.
    #[arg(long, value_name = "SECONDS")]
    pub fe_budget_secs: Option<f64>,
    /// Let the client encrypt the whole training set, not only the batches the FE steps
    /// visit (about 5-12 ms per image on this 2-core machine).
    #[arg(long)]
    pub encrypt_all: bool,
    /// Prefix of the output files: NAME_epochs.csv, NAME_fe_steps.csv, NAME.png, ...
    #[arg(long, default_value = "accuracy", value_parser = crate::common::parse_name)]
    pub name: String,
}

/// Default epochs of `accuracy`.
const DEFAULT_EPOCHS: usize = 10;

/// One point of a per-epoch curve.
#[derive(Debug, Clone)]
struct Point {
    curve: &'static str,
    mode: &'static str,
    /// Epochs of training done (fractional inside an epoch).
    epoch: f64,
    steps: usize,
    train_loss: Option<f64>,
    train_accuracy: Option<f64>,
    test_loss: f64,
    test_accuracy: f64,
    encrypted_steps: usize,
    seconds: f64,
}

impl Point {
    fn csv(&self) -> Vec<String> {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
        vec![
            self.curve.into(),
            self.mode.into(),
            format!("{:.4}", self.epoch),
            self.steps.to_string(),
            opt(self.train_loss),
            opt(self.train_accuracy),
            format!("{:.6}", self.test_loss),
            format!("{:.6}", self.test_accuracy),
            self.encrypted_steps.to_string(),
            format!("{:.3}", self.seconds),
        ]
    }
}

/// Columns of `accuracy_epochs.csv`.
pub const EPOCH_COLUMNS: [&str; 10] = [
    "curve",
    "mode",
    "epoch",
    "steps",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "encrypted_steps",
    "seconds",
];

/// Columns of `accuracy_fe_steps.csv`.
pub const STEP_COLUMNS: [&str; 20] = [
    "step",
    "epoch",
    "batch",
    "mode",
    "batch_loss",
    "batch_accuracy",
    "test_loss",
    "test_accuracy",
    "weights_sha256",
    "step_seconds",
    "keys_seconds",
    "forward_seconds",
    "backward_seconds",
    "output_error_seconds",
    "io_seconds",
    "clear_seconds",
    "weights_identical",
    "float_batch_loss",
    "float_test_loss",
    "float_test_accuracy",
];

/// One lockstep FE step, for the per-step CSV.
struct LockstepRow {
    step: usize,
    epoch: usize,
    batch: usize,
    stats: StepStats,
    test_loss: f64,
    test_accuracy: f64,
    digest: String,
    enc_seconds: f64,
    sim_seconds: f64,
    timings: Timings,
    /// The float run (a) at the same step: batch loss, test loss, test accuracy.
    float: (f64, f64, f64),
}

fn stats_loss(s: &StepStats) -> f64 {
    s.loss_sum / s.samples.max(1) as f64
}

fn stats_acc(s: &StepStats) -> f64 {
    s.correct as f64 / s.samples.max(1) as f64
}

impl LockstepRow {
    fn csv(&self, encrypted: bool) -> Vec<String> {
        let t = &self.timings;
        let f = |d: std::time::Duration| format!("{:.6}", d.as_secs_f64());
        let mut row = vec![
            self.step.to_string(),
            self.epoch.to_string(),
            self.batch.to_string(),
            if encrypted { "encrypted" } else { "simulated" }.to_string(),
            format!("{:.9}", stats_loss(&self.stats)),
            format!("{:.6}", stats_acc(&self.stats)),
            format!("{:.9}", self.test_loss),
            format!("{:.6}", self.test_accuracy),
            self.digest.clone(),
        ];
        if encrypted {
            row.extend([
                format!("{:.6}", self.enc_seconds),
                f(t.keys),
                f(t.forward),
                f(t.backward),
                f(t.output_error),
                f(t.io),
                format!("{:.6}", (self.enc_seconds - secure_secs(t)).max(0.0)),
            ]);
        } else {
            row.push(format!("{:.6}", self.sim_seconds));
            row.extend(std::iter::repeat(String::new()).take(6));
        }
        row.push("true".into());
        row.push(format!("{:.9}", self.float.0));
        row.push(format!("{:.9}", self.float.1));
        row.push(format!("{:.6}", self.float.2));
        row
    }
}

type Layer<P> = Quantized<KeyPolicyFilter<P>>;

fn layer<P: IntegerProducts>(
    p: P,
    cfg: &TrainConfig,
    train: &Dataset,
    bs: usize,
) -> Result<Layer<P>> {
    Ok(Quantized::new(
        crate::common::policy_filter(p, &train.info, bs),
        cfg.quantizer(),
    )?)
}

fn eval(model: &Model, test: &Dataset) -> Result<(f64, f64)> {
    let e = nn::eval::evaluate(model, test)?;
    Ok((e.loss, e.accuracy))
}

/// The hooks of run (c) on the simulation's training loop: after every step, the float
/// shadow steps too, and while the FE budget lasts the encrypted shadow steps and must have
/// the simulation's weights bit for bit; curve points and per-step rows are recorded.
struct Lockstep<'a> {
    enc: Option<Shadow<Layer<Remap<SecureProducts<AuthorityClient>>>>>,
    flt: Shadow<PlainFloat>,
    test: &'a Dataset,
    nb: usize,
    fe_max: usize,
    fe_budget: Option<f64>,
    total_steps: usize,
    fe_done: usize,
    fe_clock: f64,
    step: usize,
    epoch_encrypted: usize,
    clock: Stopwatch,
    points: Vec<Point>,
    rows: Vec<LockstepRow>,
    pb: indicatif::ProgressBar,
    pb_sim: Option<indicatif::ProgressBar>,
    quiet: bool,
}

fn hook_err(e: anyhow::Error) -> nn::train::TrainError {
    nn::train::TrainError::Callback(e.into())
}

impl Lockstep<'_> {
    fn lockstep(&self) -> bool {
        let within_budget = match self.fe_budget {
            Some(b) => self.fe_done == 0 || self.fe_clock < b,
            None => true,
        };
        self.enc.is_some() && self.fe_done < self.fe_max && within_budget
    }

    /// The encrypted step of the simulation's step `s`, checked and recorded.
    fn encrypted_step(
        &mut self,
        s: &StepView<'_, Layer<PlainIntegers>>,
        fs: &StepStats,
        sim_seconds: f64,
    ) -> Result<()> {
        let (step, epoch, batch) = (self.step, s.state.epoch, s.batch);
        let Some(enc) = self.enc.as_mut() else {
            return Ok(());
        };
        let before = enc.layer.inner().inner().inner().timings();
        let t = Stopwatch::start();
        let es = enc
            .step(epoch, batch)
            .with_context(|| format!("encrypted step {step}"))?;
        let enc_seconds = t.secs();
        let timings = timings_delta(&enc.layer.inner().inner().inner().timings(), &before);
        self.fe_clock += enc_seconds;
        self.fe_done += 1;
        self.epoch_encrypted += 1;
        let (de, ds) = (model_digest(&enc.model)?, model_digest(s.model)?);
        if enc.model.to_bytes()? != s.model.to_bytes()? || &es != s.stats {
            bail!(
                "step {step} (epoch {epoch}, batch {batch}): the encrypted run's weights ({de}) \
                 differ from the simulated run's ({ds}); FE and simulation must agree bit for \
                 bit, so this is a bug"
            );
        }
        let (test_loss, test_accuracy) = eval(&enc.model, self.test)?;
        let (float_loss, float_accuracy) = eval(&self.flt.model, self.test)?;
        let at = epoch as f64 + (step - epoch * self.nb) as f64 / self.nb as f64;
        for (curve, l, a) in [
            ("float", float_loss, float_accuracy),
            ("quantized", test_loss, test_accuracy),
        ] {
            self.points.push(Point {
                curve,
                mode: "plain",
                epoch: at,
                steps: step,
                train_loss: None,
                train_accuracy: None,
                test_loss: l,
                test_accuracy: a,
                encrypted_steps: 0,
                seconds: 0.0,
            });
        }
        self.rows.push(LockstepRow {
            step,
            epoch,
            batch,
            stats: es,
            test_loss,
            test_accuracy,
            digest: de,
            enc_seconds,
            sim_seconds,
            timings,
            float: (stats_loss(fs), float_loss, float_accuracy),
        });
        self.points.push(Point {
            curve: "fe",
            mode: "encrypted",
            epoch: at,
            steps: step,
            train_loss: Some(stats_loss(&s.state.stats)),
            train_accuracy: Some(stats_acc(&s.state.stats)),
            test_loss,
            test_accuracy,
            encrypted_steps: self.fe_done,
            seconds: self.fe_clock,
        });
        self.pb.inc(1);
        Ok(())
    }

    /// A step past the FE budget: the encrypted shadow is dropped once, with a message.
    fn simulated_step(&mut self) {
        if self.enc.take().is_some() {
            self.pb.finish_and_clear();
            eprintln!(
                "    {} encrypted steps in {:.1} s, weights identical after every step; \
                 continuing in simulation",
                self.fe_done, self.fe_clock
            );
        }
        let (quiet, left) = (self.quiet, (self.total_steps - self.step + 1) as u64);
        self.pb_sim
            .get_or_insert_with(|| progress(quiet, left, "(c) simulated continuation"))
            .inc(1);
    }
}

impl Hooks<Layer<PlainIntegers>> for Lockstep<'_> {
    fn after_step(
        &mut self,
        s: &StepView<'_, Layer<PlainIntegers>>,
    ) -> Result<Flow, nn::train::TrainError> {
        let sim_seconds = self.clock.secs();
        self.step += 1;
        let fs = self.flt.step(s.state.epoch, s.batch)?;
        if self.lockstep() {
            self.encrypted_step(s, &fs, sim_seconds).map_err(hook_err)?;
        } else {
            self.simulated_step();
        }
        self.clock = Stopwatch::start();
        Ok(Flow::Continue)
    }

    fn after_epoch(
        &mut self,
        _: &Progress,
        _: &Layer<PlainIntegers>,
        m: &nn::train::EpochMetrics,
    ) -> Result<Flow, nn::train::TrainError> {
        let fully = self.epoch_encrypted == self.nb;
        self.epoch_encrypted = 0;
        self.points.push(Point {
            curve: "fe",
            mode: if fully { "encrypted" } else { "simulated" },
            epoch: (m.epoch + 1) as f64,
            steps: (m.epoch + 1) * self.nb,
            train_loss: Some(m.train_loss),
            train_accuracy: Some(m.train_accuracy),
            test_loss: m.test_loss.unwrap_or(f64::NAN),
            test_accuracy: m.test_accuracy.unwrap_or(f64::NAN),
            encrypted_steps: self.fe_done,
            seconds: m.seconds,
        });
        self.clock = Stopwatch::start();
        Ok(Flow::Continue)
    }
}

/// The whole `accuracy` experiment.
pub fn run(args: &AccuracyArgs) -> Result<Summary> {
    let clock = Stopwatch::start();
    let out = args.common.out_dir()?.to_path_buf();
    let data = args.common.load()?;
    let epochs = args.train.epochs.unwrap_or(DEFAULT_EPOCHS);
    let mut cfg = args.train.config(args.bits, epochs)?;
    let quiet = args.common.quiet;
    cfg.progress = !quiet;
    let bs = args.train.batch_size;
    let nb = full_batches(data.train.len(), bs)?;
    let (train, test) = (&data.train, &data.test);
    let initial = args.train.model(&train.info)?;
    let (l0, a0) = eval(&initial, test)?;
    let mut points: Vec<Point> = Vec::new();
    let start_point = |curve, mode| Point {
        curve,
        mode,
        epoch: 0.0,
        steps: 0,
        train_loss: None,
        train_accuracy: None,
        test_loss: l0,
        test_accuracy: a0,
        encrypted_steps: 0,
        seconds: 0.0,
    };
    let epoch_point = |curve, mode, m: &nn::train::EpochMetrics, enc: usize| Point {
        curve,
        mode,
        epoch: (m.epoch + 1) as f64,
        steps: (m.epoch + 1) * nb,
        train_loss: Some(m.train_loss),
        train_accuracy: Some(m.train_accuracy),
        test_loss: m.test_loss.unwrap_or(f64::NAN),
        test_accuracy: m.test_accuracy.unwrap_or(f64::NAN),
        encrypted_steps: enc,
        seconds: m.seconds,
    };

    // (a) plain float training.
    eprintln!("(a) plain float training: {epochs} epochs of {nb} batches");
    let mut hist_a = Vec::new();
    let run_a = trainer::run_float(train.clone(), bs, &cfg, Some(test), |_, m, _| {
        hist_a.push(m.clone());
        Ok(())
    })
    .context("plain float training")?;
    points.push(start_point("float", "plain"));
    points.extend(hist_a.iter().map(|m| epoch_point("float", "plain", m, 0)));

    // (b) the simulation: the trainer's own loop over plain integer products.
    eprintln!(
        "(b) plain training with {}-bit quantized first-layer products",
        args.bits
    );
    let sim = PlainIntegers::from_dataset(train.clone(), bs, true)?;
    let mut hist_b = Vec::new();
    let run_b = trainer::run(
        sim,
        &crate::common::run_data(train, bs),
        &cfg,
        Some(test),
        None,
        None,
        |_, m, _| {
            hist_b.push(m.clone());
            Ok(())
        },
    )
    .context("quantized plain training")?;
    points.push(start_point("quantized", "plain"));
    points.extend(
        hist_b
            .iter()
            .map(|m| epoch_point("quantized", "plain", m, 0)),
    );

    // (c) FE in lockstep with the simulation, then simulation.
    let total_steps = epochs * nb;
    let fe_max = args.fe_steps.min(total_steps);
    let mut env = None;
    let mut enc_layer: Option<Layer<Remap<SecureProducts<AuthorityClient>>>> = None;
    if fe_max > 0 {
        // The batches the FE part visits, in the order of the trainer's epochs.
        let encrypted: Vec<usize> = if args.encrypt_all {
            (0..nb).collect()
        } else {
            fe_env::visited_batches(nb, cfg.seed, epochs, fe_max)
        };
        eprintln!(
            "(c) FE: authority on 127.0.0.1; the client encrypts {} of the {nb} batches of {bs} \
             ({} images)",
            encrypted.len(),
            encrypted.len() * bs
        );
        let subset = fe_env::batches_subset(train, bs, &encrypted)?;
        let e = FeEnv::start(bs, &subset, &data.source, !quiet)?;
        eprintln!(
            "    encrypted {} samples in {:.1} s ({:.1} MiB); building the discrete-log table",
            e.encryption.samples,
            e.encryption.seconds,
            e.encryption.bytes as f64 / (1 << 20) as f64
        );
        let dlog = fe_env::dlog_table()?;
        let products = Remap::new(e.products(dlog)?, nb, bs, &encrypted);
        enc_layer = Some(layer(products, &cfg, train, bs)?);
        env = Some(e);
    }
    let mut sim_layer = layer(
        PlainIntegers::from_dataset(train.clone(), bs, true)?,
        &cfg,
        train,
        bs,
    )?;
    let initial = args.train.model(&train.info)?;
    let mut sim = Progress {
        model: initial.clone(),
        optimizer: Optimizer::adam(cfg.lr),
        state: EpochState::new(0, nb, cfg.seed, true),
        history: Vec::new(),
    };
    points.push(start_point("fe", "encrypted"));
    // Run (a) again step by step beside the simulation, to compare with (b) and (c) inside
    // the FE part; (c) steps in lockstep with the simulation while the FE budget lasts.
    let mut hook = Lockstep {
        enc: enc_layer.map(|l| Shadow::new(l, &initial, cfg.lr)),
        flt: Shadow::new(
            PlainFloat::from_dataset(train.clone(), bs, true)?,
            &initial,
            cfg.lr,
        ),
        test,
        nb,
        fe_max,
        fe_budget: args.fe_budget_secs,
        total_steps,
        fe_done: 0,
        fe_clock: 0.0,
        step: 0,
        epoch_encrypted: 0,
        clock: Stopwatch::start(),
        points: Vec::new(),
        rows: Vec::new(),
        pb: progress(quiet, fe_max as u64, "(c) encrypted steps"),
        pb_sim: None,
        quiet,
    };
    let settings = RunSettings {
        epochs,
        seed: cfg.seed,
        shuffle: true,
        progress_bar: false,
    };
    nn::train::run(&mut sim_layer, &mut sim, &settings, Some(test), &mut hook)
        .context("the lockstep run (c)")?;
    hook.pb.finish_and_clear();
    if let Some(b) = &hook.pb_sim {
        b.finish_and_clear();
    }
    let Lockstep {
        points: fe_points,
        rows,
        fe_done,
        flt,
        ..
    } = hook;
    points.extend(fe_points);
    let (sim_model, flt_model) = (sim.model, flt.model);
    // The lockstep run must reproduce the trainer's own runs (a and b) exactly.
    if sim_model.to_bytes()? != run_b.model.to_bytes()? {
        bail!(
            "the lockstep run's final weights differ from the trainer's simulated run; the \
             lockstep hooks change the trainer's training"
        );
    }
    if flt_model.to_bytes()? != run_a.model.to_bytes()? {
        bail!(
            "the step-by-step float run's final weights differ from the trainer's float run; \
             the step-by-step float run does not reproduce trainer::run_float"
        );
    }
    let order = |c: &str| ["float", "quantized", "fe"].iter().position(|x| *x == c);
    points.sort_by(|a, b| {
        order(a.curve)
            .cmp(&order(b.curve))
            .then(a.epoch.total_cmp(&b.epoch))
    });

    // Files.
    write_csv(
        &out.join(format!("{}_epochs.csv", args.name)),
        &EPOCH_COLUMNS,
        &points.iter().map(Point::csv).collect::<Vec<_>>(),
    )?;
    let step_rows: Vec<Vec<String>> = rows
        .iter()
        .flat_map(|r| [r.csv(true), r.csv(false)])
        .collect();
    write_csv(
        &out.join(format!("{}_fe_steps.csv", args.name)),
        &STEP_COLUMNS,
        &step_rows,
    )?;
    let net = args.train.layout(&train.info)?;
    let mut figures = plot_epochs(&out, &args.name, &points, &net, args.bits, bs)?;
    if !rows.is_empty() {
        figures.extend(plot_steps(&out, &args.name, &rows, &net, args.bits)?);
    }

    // Tables.
    let mut t = Table::new(
        format!(
            "Test accuracy (loss) per epoch, {net}, batch {bs}, {}",
            data.source
        ),
        &["epoch", "(a) float", "(b) quantized", "(c) FE", "(c) mode"],
    );
    for e in 0..=epochs {
        let at = |curve: &str| {
            points
                .iter()
                .rev()
                .find(|p| p.curve == curve && p.epoch == e as f64)
        };
        let cell = |p: Option<&Point>| {
            p.map(|p| format!("{} ({:.4})", pct(p.test_accuracy), p.test_loss))
                .unwrap_or_default()
        };
        t.row(vec![
            e.to_string(),
            cell(at("float")),
            cell(at("quantized")),
            cell(at("fe")),
            at("fe").map(|p| p.mode.to_string()).unwrap_or_default(),
        ]);
    }
    t.note(format!(
        "(b) and (c) use {}-bit first-layer weights and deltas. (c) ran {fe_done} of its {total_steps} \
         steps with real FE, in lockstep with the simulation: weights bit-identical after every \
         encrypted step; the rest is simulation, and its final weights equal run (b)'s exactly.",
        args.bits
    ));
    let mut tables = vec![t];
    if let Some(env) = &env {
        let n = rows.len().max(1) as f64;
        let sum = |f: &dyn Fn(&LockstepRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
        let mut f = Table::new(
            "The FE part of run (c): mean cost of one encrypted step",
            &["part", "seconds per step", "share"],
        );
        let total = sum(&|r| r.enc_seconds).max(1e-12);
        let parts: [(&str, f64); 7] = [
            (
                "keys (request, derivation, transport)",
                sum(&|r| r.timings.keys.as_secs_f64()),
            ),
            (
                "forward decryption (incl. discrete logs)",
                sum(&|r| r.timings.forward.as_secs_f64()),
            ),
            (
                "backward decryption (incl. discrete logs)",
                sum(&|r| r.timings.backward.as_secs_f64()),
            ),
            (
                "output error (FEBO)",
                sum(&|r| r.timings.output_error.as_secs_f64()),
            ),
            (
                "I/O (read, decode batch)",
                sum(&|r| r.timings.io.as_secs_f64()),
            ),
            (
                "clear layers and quantization",
                sum(&|r| (r.enc_seconds - secure_secs(&r.timings)).max(0.0)),
            ),
            ("total encrypted step", total),
        ];
        for (name, v) in parts {
            f.row(vec![name.into(), secs(v), pct(v / total)]);
        }
        f.row(vec![
            "simulated step (same work on plaintext)".into(),
            secs(sum(&|r| r.sim_seconds)),
            String::new(),
        ]);
        f.note(format!(
            "Client encryption of {} training images: {} ({:.1} MiB file); authority key \
             generation {}; {} key requests logged by the authority's audit log.",
            env.encryption.samples,
            secs(env.encryption.seconds),
            env.encryption.bytes as f64 / (1 << 20) as f64,
            secs(env.setup_seconds),
            env.audit_lines()
        ));
        tables.push(f);
    }
    let mut csv = vec![format!("{}_epochs.csv", args.name)];
    if !rows.is_empty() {
        csv.push(format!("{}_fe_steps.csv", args.name));
    }
    Ok(Summary {
        name: args.name.clone(),
        description: format!(
            "Runs (a) plain float, (b) {}-bit quantized plain (simulation) and (c) FE-encrypted \
             training of {net} with batch {bs}, {epochs} epochs, seed {}, on the {}.",
            args.bits, args.train.seed, data.source
        ),
        tables,
        figures,
        csv,
        seconds: clock.secs(),
        command: crate::common::command_line(),
    })
}

fn plot_epochs(
    out: &std::path::Path,
    name: &str,
    points: &[Point],
    net: &str,
    bits: u32,
    bs: usize,
) -> Result<Vec<String>> {
    let pick = |curve: &str, modes: &[&str], y: &dyn Fn(&Point) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|p| p.curve == curve && modes.contains(&p.mode))
            .map(|p| (p.epoch, y(p)))
            .collect()
    };
    let panel = |title: &str, ylabel: &str, y: &dyn Fn(&Point) -> f64, legend| {
        let enc = pick("fe", &["encrypted"], y);
        // The simulated continuation starts where the encrypted part ends.
        let mut simulated: Vec<(f64, f64)> = enc.last().copied().into_iter().collect();
        simulated.extend(pick("fe", &["simulated"], y));
        let mut c = LineChart::new(
            title,
            "epochs of training",
            ylabel,
            vec![
                Series::new("(a) plain float", pick("float", &["plain"], y), COLORS[0]).wide(6),
                Series::new(
                    format!("(b) plain, {bits}-bit quantized"),
                    pick("quantized", &["plain"], y),
                    COLORS[2],
                )
                .styled(Line::Solid, Marker::Triangle),
                Series::new("(c) FE, encrypted steps", enc, COLORS[3]),
                Series::new("(c) FE, simulated (proven equal)", simulated, COLORS[3])
                    .styled(Line::Dashed, Marker::Hollow),
            ],
        );
        c.legend = legend;
        Panel::Lines(c)
    };
    plot::save(
        out,
        name,
        &format!("{net}, batch {bs}: plain vs quantized vs FE-encrypted training"),
        &[
            panel(
                "Test accuracy",
                "test accuracy",
                &|p| p.test_accuracy,
                plot::LegendPos::LowerRight,
            ),
            panel(
                "Test loss",
                "test cross-entropy",
                &|p| p.test_loss,
                plot::LegendPos::UpperRight,
            ),
        ],
    )
}

fn plot_steps(
    out: &std::path::Path,
    name: &str,
    rows: &[LockstepRow],
    net: &str,
    bits: u32,
) -> Result<Vec<String>> {
    // The simulated run's values equal the encrypted run's: the lockstep checked the weights
    // and the step statistics bit for bit, so one set of numbers serves both series.
    let panel = |title: &str,
                 ylabel: &str,
                 y: &dyn Fn(&LockstepRow) -> f64,
                 float: &dyn Fn(&LockstepRow) -> f64,
                 legend| {
        let pts = |f: &dyn Fn(&LockstepRow) -> f64| -> Vec<(f64, f64)> {
            rows.iter().map(|r| (r.step as f64, f(r))).collect()
        };
        let mut c = LineChart::new(
            title,
            "training step",
            ylabel,
            vec![
                Series::new("(a) plain float", pts(float), COLORS[0])
                    .styled(Line::Solid, Marker::None)
                    .wide(6),
                Series::new(
                    format!("(b) simulated, {bits}-bit quantized"),
                    pts(y),
                    COLORS[7],
                )
                .styled(Line::Solid, Marker::None),
                Series::new("(c) encrypted (FE over TCP)", pts(y), COLORS[3])
                    .styled(Line::None, Marker::Filled),
            ],
        );
        c.legend = legend;
        c.integer_x = true;
        Panel::Lines(c)
    };
    plot::save(
        out,
        &format!("{name}_fe_steps"),
        &format!("{net}: the encrypted steps, in lockstep with the simulation (identical weights)"),
        &[
            panel(
                "Training loss of the step's batch",
                "batch cross-entropy",
                &|r| stats_loss(&r.stats),
                &|r| r.float.0,
                plot::LegendPos::UpperRight,
            ),
            panel(
                "Test accuracy after the step",
                "test accuracy",
                &|r| r.test_accuracy,
                &|r| r.float.2,
                plot::LegendPos::LowerRight,
            ),
        ],
    )
}
