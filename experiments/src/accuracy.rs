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
//!
//! Dense and convolutional first layers alike (`--spec lenet5`: every run computes the first
//! layer's convolution, encrypted in run c). With `--eval-every N` every run is also scored
//! on a seeded random sample of the test set every N steps (`NAME_steps.csv`, columns in
//! [`CURVE_COLUMNS`], and `NAME_steps.png`); `--compare-optimizer` adds the float and
//! quantized runs with another optimizer from the same initial weights. `--model lenet5` is
//! CryptoNN's LeNet-5 experiment ([`Preset::Lenet5`]): plain SGD at 0.01, batches of 480, two
//! epochs, test accuracy on 200 random test images after every batch, beside Adam.

use crate::common::{
    full_batches, model_digest, progress, CommonArgs, Stopwatch, Summary, TrainArgs,
};
use crate::fe_env::{self, secure_secs, FeEnv, Remap, Shadow};
use crate::plot::{self, Line, LineChart, Marker, Panel, Series, COLORS};
use crate::table::{pct, secs, write_csv, Table};
use anyhow::{bail, Context, Result};
use clap::Args;
use cryptonn::protocol::AuthorityClient;
use cryptonn::secure::{KeyPolicyFilter, SecureProducts, Timings};
use cryptonn::trainer::{self, OptimizerKind, TrainConfig};
use nn::data::Dataset;
use nn::first_layer::{IntegerProducts, PlainFloat, PlainIntegers, Quantized};
use nn::layers::Geometry;
use nn::model::Model;
use nn::train::{EpochState, Flow, Hooks, Progress, RunSettings, StepStats, StepView};

/// Options of `accuracy`.
#[derive(Args, Debug, Clone)]
pub struct AccuracyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// A preset of a paper's settings; explicit flags override it. lenet5: CryptoNN's LeNet-5
    /// experiment (--spec lenet5, --activation relu, --optimizer sgd, --lr 0.01, --batch-size
    /// 480, --epochs 2, --eval-every 1, --eval-sample 200, --fe-steps 2,
    /// --compare-optimizer adam, --name accuracy_lenet5).
    #[arg(long, value_name = "PRESET")]
    pub model: Option<Preset>,
    /// Bits of the quantized first-layer weights and deltas (runs b and c).
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Most training steps of run (c) computed with real FE (in lockstep with the simulation);
    /// 0 skips FE. The client encrypts the batches these steps visit [default: 80].
    #[arg(long)]
    pub fe_steps: Option<usize>,
    /// Stop the FE part after this many seconds of encrypted steps (at least one step is
    /// always done); combines with --fe-steps, whichever comes first.
    #[arg(long, value_name = "SECONDS")]
    pub fe_budget_secs: Option<f64>,
    /// Let the client encrypt the whole training set, not only the batches the FE steps
    /// visit (about 5-12 ms per image on this 2-core machine).
    #[arg(long)]
    pub encrypt_all: bool,
    /// Score every curve on --eval-sample test images after every N training steps (and
    /// before the first), written to NAME_steps.csv and plotted in NAME_steps.png [default:
    /// off].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Test images of the per-step evaluations: a seeded random sample of the test set, the
    /// same for every curve and step [default: 200].
    #[arg(long, value_name = "M")]
    pub eval_sample: Option<usize>,
    /// Also train with this optimizer (adam or sgd; none for no comparison), float and
    /// quantized, from the same initial weights and batches: its per-step curves go beside
    /// the main ones and its final test accuracy into a table [default: none].
    #[arg(long, value_name = "KIND", value_parser = parse_compare)]
    pub compare_optimizer: Option<Compare>,
    /// Prefix of the output files: NAME_epochs.csv, NAME_fe_steps.csv, NAME_steps.csv,
    /// NAME.png, ... [default: accuracy]
    #[arg(long, value_parser = crate::common::parse_name)]
    pub name: Option<String>,
}

/// A preset of `accuracy --model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// CryptoNN's LeNet-5 curve: SGD at 0.01, batches of 480, 2 epochs, test accuracy on
    /// 200 random test images after every batch.
    Lenet5,
}

/// The optimizer of `--compare-optimizer`, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compare(pub Option<OptimizerKind>);

/// Parses `--compare-optimizer`: an optimizer name or `none`.
pub fn parse_compare(s: &str) -> Result<Compare, String> {
    match s.trim() {
        "none" => Ok(Compare(None)),
        other => other.parse().map(|k| Compare(Some(k))),
    }
}

/// Default epochs of `accuracy`.
const DEFAULT_EPOCHS: usize = 10;
/// Default FE steps of `accuracy`.
const DEFAULT_FE_STEPS: usize = 80;
/// Default test images of a per-step evaluation.
const DEFAULT_EVAL_SAMPLE: usize = 200;
/// Mixed into the seed for drawing the per-step evaluation's test images.
const EVAL_SAMPLE_SEED: u64 = 0x7e57_5a31;

/// The settings of one `accuracy` run: the flags given, else the preset's, else the defaults.
#[derive(Debug, Clone)]
struct Settings {
    train: TrainArgs,
    epochs: usize,
    fe_steps: usize,
    eval_every: Option<usize>,
    eval_sample: usize,
    compare: Option<OptimizerKind>,
    name: String,
}

/// What a preset sets (flags left out take these values).
#[derive(Default)]
struct PresetValues {
    train: TrainArgs,
    fe_steps: Option<usize>,
    eval_every: Option<usize>,
    eval_sample: Option<usize>,
    compare: Option<Compare>,
    name: Option<String>,
}

impl Preset {
    fn values(self) -> PresetValues {
        match self {
            Preset::Lenet5 => PresetValues {
                train: TrainArgs {
                    spec: Some("lenet5".into()),
                    activation: Some(nn::activation::Activation::Relu),
                    epochs: Some(2),
                    batch_size: Some(480),
                    lr: Some(0.01),
                    optimizer: Some(OptimizerKind::Sgd),
                    lr_schedule: None,
                    seed: 1,
                },
                // One LeNet-5 step at batch 480 decrypts 480 x 4704 forward values: a few FE
                // steps show the lockstep, the simulation continues.
                fe_steps: Some(2),
                eval_every: Some(1),
                eval_sample: Some(DEFAULT_EVAL_SAMPLE),
                compare: Some(Compare(Some(OptimizerKind::Adam))),
                name: Some("accuracy_lenet5".into()),
            },
        }
    }
}

impl AccuracyArgs {
    fn settings(&self) -> Result<Settings> {
        let p = self.model.map(Preset::values).unwrap_or_default();
        let train = self.train.or(&p.train);
        let eval_every = self.eval_every.or(p.eval_every);
        if eval_every == Some(0) {
            bail!("--eval-every must be at least 1");
        }
        let eval_sample = self
            .eval_sample
            .or(p.eval_sample)
            .unwrap_or(DEFAULT_EVAL_SAMPLE);
        if eval_sample == 0 {
            bail!("--eval-sample must be at least 1");
        }
        Ok(Settings {
            epochs: train.epochs.unwrap_or(DEFAULT_EPOCHS),
            train,
            fe_steps: self.fe_steps.or(p.fe_steps).unwrap_or(DEFAULT_FE_STEPS),
            eval_every,
            eval_sample,
            compare: self.compare_optimizer.or(p.compare).and_then(|c| c.0),
            name: self
                .name
                .clone()
                .or(p.name)
                .unwrap_or_else(|| "accuracy".into()),
        })
    }
}

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
            row.extend(std::iter::repeat_n(String::new(), 6));
        }
        row.push("true".into());
        row.push(format!("{:.9}", self.float.0));
        row.push(format!("{:.9}", self.float.1));
        row.push(format!("{:.6}", self.float.2));
        row
    }
}

/// Columns of `NAME_steps.csv`: one row per curve and evaluation. `optimizer` names the run's
/// update rule; `curve` is float (a), quantized (b) or fe (c); `mode` is plain, or for fe
/// encrypted (the model of the encrypted run itself) or simulated (after the FE budget);
/// `step` counts training steps done (0: the initial weights) and `epoch` the epochs done,
/// fractional; test loss and accuracy are over `test_images` seeded random test images;
/// `weights_identical` is true where the encrypted run's weights were compared bit for bit
/// with the simulation's after that step (empty where nothing was compared).
pub const CURVE_COLUMNS: [&str; 9] = [
    "optimizer",
    "curve",
    "mode",
    "step",
    "epoch",
    "test_images",
    "test_loss",
    "test_accuracy",
    "weights_identical",
];

/// One point of a per-step curve.
#[derive(Debug, Clone)]
struct CurveRow {
    optimizer: OptimizerKind,
    curve: &'static str,
    mode: &'static str,
    step: usize,
    epoch: f64,
    images: usize,
    loss: f64,
    accuracy: f64,
    identical: Option<bool>,
}

impl CurveRow {
    fn csv(&self) -> Vec<String> {
        vec![
            self.optimizer.to_string(),
            self.curve.into(),
            self.mode.into(),
            self.step.to_string(),
            format!("{:.4}", self.epoch),
            self.images.to_string(),
            format!("{:.6}", self.loss),
            format!("{:.6}", self.accuracy),
            self.identical.map(|b| b.to_string()).unwrap_or_default(),
        ]
    }
}

/// The per-step evaluation of one run: every `every` steps, each curve's model on `sample`.
struct StepCurves<'a> {
    every: usize,
    sample: &'a Dataset,
    optimizer: OptimizerKind,
    /// Whether the run has an FE curve (the comparison run has none).
    fe: bool,
    rows: Vec<CurveRow>,
}

impl StepCurves<'_> {
    /// Records `models` (curve, mode, model, compared bit for bit) at `step`.
    fn record(
        &mut self,
        step: usize,
        epoch: f64,
        models: &[(&'static str, &'static str, &Model, Option<bool>)],
    ) -> Result<()> {
        for &(curve, mode, model, identical) in models {
            if curve == "fe" && !self.fe {
                continue;
            }
            let (loss, accuracy) = eval(model, self.sample)?;
            self.rows.push(CurveRow {
                optimizer: self.optimizer,
                curve,
                mode,
                step,
                epoch,
                images: self.sample.len(),
                loss,
                accuracy,
                identical,
            });
        }
        Ok(())
    }

    /// Records the initial weights of every curve.
    fn start(&mut self, initial: &Model) -> Result<()> {
        self.record(
            0,
            0.0,
            &[
                ("float", "plain", initial, None),
                ("quantized", "plain", initial, None),
                ("fe", "encrypted", initial, None),
            ],
        )
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
    /// The message of the progress bar of the steps past the FE part.
    label: &'static str,
    quiet: bool,
    curves: Option<StepCurves<'a>>,
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
        let timings = enc.layer.inner().inner().inner().timings().since(&before);
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
        let label = self.label;
        self.pb_sim
            .get_or_insert_with(|| progress(quiet, left, label))
            .inc(1);
    }

    /// The per-step curves after step `self.step` (every `every` steps and after the last).
    fn record_curves(
        &mut self,
        s: &StepView<'_, Layer<PlainIntegers>>,
        encrypted: bool,
    ) -> Result<()> {
        let Some(c) = self.curves.as_mut() else {
            return Ok(());
        };
        if !self.step.is_multiple_of(c.every) && self.step != self.total_steps {
            return Ok(());
        }
        let epoch = self.step as f64 / self.nb as f64;
        let fe = match (&self.enc, encrypted) {
            (Some(enc), true) => ("fe", "encrypted", &enc.model, Some(true)),
            _ => ("fe", "simulated", s.model, None),
        };
        c.record(
            self.step,
            epoch,
            &[
                ("float", "plain", &self.flt.model, None),
                ("quantized", "plain", s.model, None),
                fe,
            ],
        )
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
        let encrypted = self.lockstep();
        if encrypted {
            self.encrypted_step(s, &fs, sim_seconds).map_err(hook_err)?;
        } else {
            self.simulated_step();
        }
        self.record_curves(s, encrypted).map_err(hook_err)?;
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

/// What the runs of one experiment share.
struct Ctx<'a> {
    train: &'a Dataset,
    test: &'a Dataset,
    /// The test images of the per-step evaluations.
    sample: Dataset,
    bs: usize,
    nb: usize,
    epochs: usize,
    /// The convolution of the first layer, `None` for a dense one.
    geometry: Option<Geometry>,
    initial: Model,
    quiet: bool,
    fe_budget: Option<f64>,
    eval_every: Option<usize>,
}

impl Ctx<'_> {
    /// The simulation's integer products over the plaintext training set.
    fn sim_products(&self) -> Result<PlainIntegers> {
        Ok(
            PlainIntegers::from_dataset(self.train.clone(), self.bs, true)?
                .with_patches(self.geometry.as_ref())?,
        )
    }

    /// The float first layer over the plaintext training set.
    fn float_layer(&self) -> Result<PlainFloat> {
        Ok(PlainFloat::from_dataset(self.train.clone(), self.bs, true)?
            .with_patches(self.geometry.as_ref())?)
    }

    fn start_point(&self, curve: &'static str, mode: &'static str) -> Result<Point> {
        let (test_loss, test_accuracy) = eval(&self.initial, self.test)?;
        Ok(Point {
            curve,
            mode,
            epoch: 0.0,
            steps: 0,
            train_loss: None,
            train_accuracy: None,
            test_loss,
            test_accuracy,
            encrypted_steps: 0,
            seconds: 0.0,
        })
    }

    fn epoch_point(&self, curve: &'static str, m: &nn::train::EpochMetrics) -> Point {
        Point {
            curve,
            mode: "plain",
            epoch: (m.epoch + 1) as f64,
            steps: (m.epoch + 1) * self.nb,
            train_loss: Some(m.train_loss),
            train_accuracy: Some(m.train_accuracy),
            test_loss: m.test_loss.unwrap_or(f64::NAN),
            test_accuracy: m.test_accuracy.unwrap_or(f64::NAN),
            encrypted_steps: 0,
            seconds: m.seconds,
        }
    }
}

/// Which lockstep run: the main one (with the FE curve), or the optimizer comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Main,
    Comparison,
}

/// What a lockstep run produced.
struct Outcome {
    points: Vec<Point>,
    rows: Vec<LockstepRow>,
    curves: Vec<CurveRow>,
    fe_done: usize,
    sim_model: Model,
    flt_model: Model,
}

type EncLayer = Layer<Remap<SecureProducts<AuthorityClient>>>;

/// The simulation of `cfg` driven by the training loop, with the float run stepped beside it
/// and, while `fe_max` steps and the FE budget last, the encrypted run `enc` in lockstep.
fn lockstep_run(
    ctx: &Ctx<'_>,
    cfg: &TrainConfig,
    enc: Option<EncLayer>,
    fe_max: usize,
    role: Role,
) -> Result<Outcome> {
    let mut sim_layer = layer(ctx.sim_products()?, cfg, ctx.train, ctx.bs)?;
    let mut sim = Progress {
        model: ctx.initial.clone(),
        optimizer: cfg.optimizer(),
        state: EpochState::new(0, ctx.nb, cfg.seed, true),
        history: Vec::new(),
    };
    let (label, fe_curve) = match role {
        Role::Main => ("(c) simulated continuation", true),
        Role::Comparison => ("(d) comparison", false),
    };
    let mut curves = ctx.eval_every.map(|every| StepCurves {
        every,
        sample: &ctx.sample,
        optimizer: cfg.optimizer,
        fe: fe_curve,
        rows: Vec::new(),
    });
    if let Some(c) = curves.as_mut() {
        c.start(&ctx.initial)?;
    }
    let mut hook = Lockstep {
        enc: enc.map(|l| Shadow::new(l, &ctx.initial, cfg.optimizer())),
        flt: Shadow::new(ctx.float_layer()?, &ctx.initial, cfg.optimizer()),
        test: ctx.test,
        nb: ctx.nb,
        fe_max,
        fe_budget: ctx.fe_budget,
        total_steps: ctx.epochs * ctx.nb,
        fe_done: 0,
        fe_clock: 0.0,
        step: 0,
        epoch_encrypted: 0,
        clock: Stopwatch::start(),
        points: Vec::new(),
        rows: Vec::new(),
        pb: progress(ctx.quiet, fe_max as u64, "(c) encrypted steps"),
        pb_sim: None,
        label,
        quiet: ctx.quiet,
        curves,
    };
    let settings = RunSettings {
        epochs: ctx.epochs,
        seed: cfg.seed,
        shuffle: true,
        progress_bar: false,
    };
    nn::train::run(
        &mut sim_layer,
        &mut sim,
        &settings,
        Some(ctx.test),
        &mut hook,
    )
    .with_context(|| format!("the lockstep run ({label})"))?;
    hook.pb.finish_and_clear();
    if let Some(b) = &hook.pb_sim {
        b.finish_and_clear();
    }
    Ok(Outcome {
        points: hook.points,
        rows: hook.rows,
        curves: hook.curves.map(|c| c.rows).unwrap_or_default(),
        fe_done: hook.fe_done,
        sim_model: sim.model,
        flt_model: hook.flt.model,
    })
}

/// The FE environment of run (c) and its encrypted first layer, when `fe_max > 0`: an
/// authority, the client's encryption of the batches the FE steps visit (or of all).
fn fe_setup(
    ctx: &Ctx<'_>,
    cfg: &TrainConfig,
    data: &crate::common::Data,
    fe_max: usize,
    encrypt_all: bool,
) -> Result<Option<(FeEnv, EncLayer)>> {
    if fe_max == 0 {
        return Ok(None);
    }
    let (nb, bs) = (ctx.nb, ctx.bs);
    // The batches the FE part visits, in the order of the trainer's epochs.
    let encrypted: Vec<usize> = if encrypt_all {
        (0..nb).collect()
    } else {
        fe_env::visited_batches(nb, cfg.seed, ctx.epochs, fe_max)
    };
    eprintln!(
        "(c) FE: authority on 127.0.0.1; the client encrypts {} of the {nb} batches of {bs} \
         ({} images)",
        encrypted.len(),
        encrypted.len() * bs
    );
    let subset = fe_env::batches_subset(ctx.train, bs, &encrypted)?;
    let e = FeEnv::start(bs, &subset, &data.source, !ctx.quiet)?;
    eprintln!(
        "    encrypted {} samples in {:.1} s ({:.1} MiB); building the discrete-log table",
        e.encryption.samples,
        e.encryption.seconds,
        e.encryption.bytes as f64 / (1 << 20) as f64
    );
    let dlog = fe_env::dlog_table()?;
    let secure = e
        .products(dlog)?
        .with_patches(ctx.geometry.as_ref())
        .context("the model's first convolution does not fit the encrypted images")?;
    let products = Remap::new(secure, nb, bs, &encrypted);
    let l = layer(products, cfg, ctx.train, bs)?;
    Ok(Some((e, l)))
}

/// The comparison run: the same simulation and float run with optimizer `kind`, no FE.
fn comparison(ctx: &Ctx<'_>, cfg: &TrainConfig, kind: OptimizerKind) -> Result<(Outcome, Table)> {
    let cfg = TrainConfig {
        optimizer: kind,
        ..cfg.clone()
    };
    eprintln!("(d) the same float and quantized runs with {kind}");
    let o = lockstep_run(ctx, &cfg, None, 0, Role::Comparison)?;
    let mut t = Table::new(
        format!(
            "Final test accuracy (loss) by optimizer, {} epochs",
            ctx.epochs
        ),
        &["optimizer", "(a) float", "(b) quantized"],
    );
    t.row(vec![
        kind.to_string(),
        accuracy_cell(&o.flt_model, ctx.test)?,
        accuracy_cell(&o.sim_model, ctx.test)?,
    ]);
    Ok((o, t))
}

fn accuracy_cell(model: &Model, test: &Dataset) -> Result<String> {
    let (l, a) = eval(model, test)?;
    Ok(format!("{} ({l:.4})", pct(a)))
}

/// The whole `accuracy` experiment.
pub fn run(args: &AccuracyArgs) -> Result<Summary> {
    let clock = Stopwatch::start();
    let st = args.settings()?;
    let out = args.common.out_dir()?.to_path_buf();
    let data = args.common.load()?;
    let epochs = st.epochs;
    let mut cfg = st.train.config(args.bits, epochs)?;
    let quiet = args.common.quiet;
    cfg.progress = !quiet;
    let bs = st.train.batch_size();
    let (train, test) = (&data.train, &data.test);
    let ctx = Ctx {
        train,
        test,
        sample: test
            .shuffled(cfg.seed ^ EVAL_SAMPLE_SEED)
            .take(st.eval_sample),
        bs,
        nb: full_batches(train.len(), bs)?,
        epochs,
        geometry: cfg.model_spec(&train.info)?.first_geometry(),
        initial: st.train.model(&train.info)?,
        quiet,
        fe_budget: args.fe_budget_secs,
        eval_every: st.eval_every,
    };
    let nb = ctx.nb;
    let mut points: Vec<Point> = Vec::new();

    // (a) plain float training.
    eprintln!(
        "(a) plain float training: {epochs} epochs of {nb} batches, {}",
        cfg.optimizer
    );
    let mut hist_a = Vec::new();
    let run_a = trainer::run_float(train.clone(), bs, &cfg, Some(test), |_, m, _| {
        hist_a.push(m.clone());
        Ok(())
    })
    .context("plain float training")?;
    points.push(ctx.start_point("float", "plain")?);
    points.extend(hist_a.iter().map(|m| ctx.epoch_point("float", m)));

    // (b) the simulation: the trainer's own loop over plain integer products.
    eprintln!(
        "(b) plain training with {}-bit quantized first-layer products",
        args.bits
    );
    let mut hist_b = Vec::new();
    let run_b = trainer::run(
        ctx.sim_products()?,
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
    points.push(ctx.start_point("quantized", "plain")?);
    points.extend(hist_b.iter().map(|m| ctx.epoch_point("quantized", m)));

    // (c) FE in lockstep with the simulation, then simulation; run (a) again step by step
    // beside it, to compare with (b) and (c) inside the FE part.
    let total_steps = epochs * nb;
    let fe_max = st.fe_steps.min(total_steps);
    let (env, enc_layer) = match fe_setup(&ctx, &cfg, &data, fe_max, args.encrypt_all)? {
        Some((e, l)) => (Some(e), Some(l)),
        None => (None, None),
    };
    points.push(ctx.start_point("fe", "encrypted")?);
    let main = lockstep_run(&ctx, &cfg, enc_layer, fe_max, Role::Main)?;
    points.extend(main.points.iter().cloned());
    // The lockstep run must reproduce the trainer's own runs (a and b) exactly.
    if main.sim_model.to_bytes()? != run_b.model.to_bytes()? {
        bail!(
            "the lockstep run's final weights differ from the trainer's simulated run; the \
             lockstep hooks change the trainer's training"
        );
    }
    if main.flt_model.to_bytes()? != run_a.model.to_bytes()? {
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
    // (d) the other optimizer, when asked.
    let compared = match st.compare {
        Some(kind) if kind != cfg.optimizer => Some(comparison(&ctx, &cfg, kind)?),
        _ => None,
    };
    let mut curves = main.curves.clone();
    if let Some((o, _)) = &compared {
        curves.extend(o.curves.iter().cloned());
    }

    let net = st.train.layout(&train.info)?;
    let name = &st.name;
    let o = Out {
        dir: &out,
        name,
        net: &net,
        bits: args.bits,
        bs,
    };
    let (csv, figures) = write_files(&o, &points, &main.rows, &curves)?;
    let fe_note = (main.fe_done, total_steps);
    let mut tables = vec![epoch_table(&o, &points, &data.source, epochs, fe_note)];
    if let Some(env) = &env {
        tables.push(fe_cost_table(env, &main.rows));
    }
    if let Some((_, mut t)) = compared {
        t.row(vec![
            format!("{} (runs a, b)", cfg.optimizer),
            accuracy_cell(&run_a.model, test)?,
            accuracy_cell(&run_b.model, test)?,
        ]);
        t.note(format!(
            "Every optimizer trains from the same initial weights on the same batches, learning \
             rate {}; the per-step curves are in {name}_steps.csv.",
            cfg.lr
        ));
        tables.push(t);
    }
    Ok(Summary {
        name: name.clone(),
        description: format!(
            "Runs (a) plain float, (b) {}-bit quantized plain (simulation) and (c) FE-encrypted \
             training of {net} with batch {bs}, {epochs} epochs, {} at learning rate {}, seed \
             {}, on the {}.",
            args.bits, cfg.optimizer, cfg.lr, cfg.seed, data.source
        ),
        tables,
        figures,
        csv,
        seconds: clock.secs(),
        command: crate::common::command_line(),
    })
}

/// Where and under which names the files go, and what the plots say of the network.
struct Out<'a> {
    dir: &'a std::path::Path,
    name: &'a str,
    net: &'a str,
    bits: u32,
    bs: usize,
}

/// Writes the CSV files and plots; returns their names.
fn write_files(
    o: &Out<'_>,
    points: &[Point],
    rows: &[LockstepRow],
    curves: &[CurveRow],
) -> Result<(Vec<String>, Vec<String>)> {
    let mut csv = vec![format!("{}_epochs.csv", o.name)];
    write_csv(
        &o.dir.join(&csv[0]),
        &EPOCH_COLUMNS,
        &points.iter().map(Point::csv).collect::<Vec<_>>(),
    )?;
    let step_rows: Vec<Vec<String>> = rows
        .iter()
        .flat_map(|r| [r.csv(true), r.csv(false)])
        .collect();
    let fe_steps = format!("{}_fe_steps.csv", o.name);
    write_csv(&o.dir.join(&fe_steps), &STEP_COLUMNS, &step_rows)?;
    let mut figures = plot_epochs(o.dir, o.name, points, o.net, o.bits, o.bs)?;
    if !rows.is_empty() {
        csv.push(fe_steps);
        figures.extend(plot_steps(o.dir, o.name, rows, o.net, o.bits)?);
    }
    if !curves.is_empty() {
        let steps = format!("{}_steps.csv", o.name);
        write_csv(
            &o.dir.join(&steps),
            &CURVE_COLUMNS,
            &curves.iter().map(CurveRow::csv).collect::<Vec<_>>(),
        )?;
        csv.push(steps);
        figures.extend(plot_curves(o, curves)?);
    }
    Ok((csv, figures))
}

/// Test accuracy (loss) of every curve after every epoch; `fe` is (encrypted steps, steps).
fn epoch_table(
    o: &Out<'_>,
    points: &[Point],
    source: &str,
    epochs: usize,
    fe: (usize, usize),
) -> Table {
    let mut t = Table::new(
        format!(
            "Test accuracy (loss) per epoch, {}, batch {}, {source}",
            o.net, o.bs
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
        "(b) and (c) use {}-bit first-layer weights and deltas. (c) ran {} of its {} steps \
         with real FE, in lockstep with the simulation: weights bit-identical after every \
         encrypted step; the rest is simulation, and its final weights equal run (b)'s exactly.",
        o.bits, fe.0, fe.1
    ));
    t
}

/// The mean cost of one encrypted step, by part.
fn fe_cost_table(env: &FeEnv, rows: &[LockstepRow]) -> Table {
    let n = rows.len().max(1) as f64;
    let sum = |f: &dyn Fn(&LockstepRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let mut f = Table::new(
        "The FE part of run (c): mean cost of one encrypted step",
        &["part", "seconds per step", "share"],
    );
    let total = sum(&|r| r.enc_seconds).max(1e-12);
    let secs_of = |d: std::time::Duration| d.as_secs_f64();
    let parts: [(&str, f64); 7] = [
        (
            "keys (request, derivation, transport)",
            sum(&|r| secs_of(r.timings.keys)),
        ),
        (
            "forward decryption (incl. discrete logs)",
            sum(&|r| secs_of(r.timings.forward)),
        ),
        (
            "backward decryption (incl. discrete logs)",
            sum(&|r| secs_of(r.timings.backward)),
        ),
        (
            "output error (FEBO)",
            sum(&|r| secs_of(r.timings.output_error)),
        ),
        ("I/O (read, decode batch)", sum(&|r| secs_of(r.timings.io))),
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
    f
}

/// The per-step curves (`NAME_steps.png`): test accuracy and loss on the evaluation sample
/// after every evaluated step, for every optimizer, curve and mode.
fn plot_curves(o: &Out<'_>, curves: &[CurveRow]) -> Result<Vec<String>> {
    let mut kinds: Vec<OptimizerKind> = Vec::new();
    for r in curves {
        if !kinds.contains(&r.optimizer) {
            kinds.push(r.optimizer);
        }
    }
    let images = curves.first().map_or(0, |r| r.images);
    let panel = |title: &str, ylabel: &str, y: &dyn Fn(&CurveRow) -> f64, legend| {
        let mut series = Vec::new();
        for (k, &kind) in kinds.iter().enumerate() {
            series.extend(curve_series(curves, kind, k, o.bits, y));
        }
        let mut c = LineChart::new(title, "training step", ylabel, series);
        c.legend = legend;
        c.integer_x = true;
        Panel::Lines(c)
    };
    plot::save(
        o.dir,
        &format!("{}_steps", o.name),
        &format!(
            "{}, batch {}: test accuracy after every step ({images} random test images)",
            o.net, o.bs
        ),
        &[
            panel(
                "Test accuracy",
                "test accuracy",
                &|r| r.accuracy,
                plot::LegendPos::LowerRight,
            ),
            panel(
                "Test loss",
                "test cross-entropy",
                &|r| r.loss,
                plot::LegendPos::UpperRight,
            ),
        ],
    )
}

/// The series of one optimizer's curves; the `k`-th optimizer gets its own colours.
fn curve_series(
    curves: &[CurveRow],
    kind: OptimizerKind,
    k: usize,
    bits: u32,
    y: &dyn Fn(&CurveRow) -> f64,
) -> Vec<Series> {
    let pick = |curve: &str, mode: &str| -> Vec<(f64, f64)> {
        curves
            .iter()
            .filter(|r| r.optimizer == kind && r.curve == curve && r.mode == mode)
            .map(|r| (r.step as f64, y(r)))
            .collect()
    };
    let color = |i: usize| COLORS[(i + 5 * k) % COLORS.len()];
    let mut out = vec![
        Series::new(
            format!("(a) float, {kind}"),
            pick("float", "plain"),
            color(0),
        )
        .styled(Line::Solid, Marker::None)
        .wide(4),
        Series::new(
            format!("(b) {bits}-bit quantized, {kind}"),
            pick("quantized", "plain"),
            color(2),
        )
        .styled(Line::Solid, Marker::None),
    ];
    let enc = pick("fe", "encrypted");
    if !enc.is_empty() || !pick("fe", "simulated").is_empty() {
        // The simulated continuation starts where the encrypted part ends.
        let mut simulated: Vec<(f64, f64)> = enc.last().copied().into_iter().collect();
        simulated.extend(pick("fe", "simulated"));
        out.push(
            Series::new(format!("(c) FE, encrypted steps, {kind}"), enc, color(3))
                .styled(Line::None, Marker::Filled),
        );
        out.push(
            Series::new(
                format!("(c) FE, simulated (proven equal), {kind}"),
                simulated,
                color(3),
            )
            .styled(Line::Dashed, Marker::None),
        );
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        inner: AccuracyArgs,
    }

    fn settings(args: &[&str]) -> Settings {
        let argv = std::iter::once("accuracy").chain(args.iter().copied());
        Wrap::try_parse_from(argv)
            .expect("options parse")
            .inner
            .settings()
            .expect("settings")
    }

    #[test]
    fn the_lenet5_preset_sets_the_authors_settings() {
        let s = settings(&["--model", "lenet5"]);
        assert_eq!(s.train.spec(), "lenet5");
        assert_eq!(s.train.activation(), nn::activation::Activation::Relu);
        assert_eq!(s.train.optimizer(), OptimizerKind::Sgd);
        assert_eq!((s.train.batch_size(), s.epochs), (480, 2));
        assert_eq!(s.train.lr, Some(0.01));
        assert_eq!((s.eval_every, s.eval_sample), (Some(1), 200));
        assert_eq!(s.compare, Some(OptimizerKind::Adam));
        assert_eq!((s.fe_steps, s.name.as_str()), (2, "accuracy_lenet5"));
    }

    #[test]
    fn explicit_flags_override_the_preset() {
        let s = settings(&[
            "--model",
            "lenet5",
            "--batch-size",
            "64",
            "--optimizer",
            "adam",
            "--epochs",
            "1",
            "--fe-steps",
            "0",
            "--compare-optimizer",
            "none",
            "--name",
            "mine",
        ]);
        assert_eq!(s.train.spec(), "lenet5");
        assert_eq!((s.train.batch_size(), s.epochs), (64, 1));
        assert_eq!(s.train.optimizer(), OptimizerKind::Adam);
        assert_eq!((s.fe_steps, s.compare), (0, None));
        assert_eq!(s.name, "mine");
    }

    #[test]
    fn without_a_preset_the_defaults_hold() {
        let s = settings(&[]);
        assert_eq!(s.train.spec(), crate::common::DEFAULT_SPEC);
        assert_eq!(s.train.optimizer(), OptimizerKind::Adam);
        assert_eq!((s.epochs, s.fe_steps), (DEFAULT_EPOCHS, DEFAULT_FE_STEPS));
        assert_eq!((s.eval_every, s.compare), (None, None));
        let a = Wrap::try_parse_from(["accuracy", "--eval-every", "0"]).expect("parses");
        assert!(a.inner.settings().is_err());
    }
}
