//! The trainer: trains a network whose first layer runs over data it never sees in the clear.
//!
//! [`run`] is one training loop for any [`IntegerProducts`]: [`crate::secure::SecureProducts`]
//! over an encrypted dataset with keys from the authority, or — for the experimenter's
//! simulation only — [`nn::first_layer::PlainIntegers`] over plaintext. Both are wrapped in the
//! same [`KeyPolicyFilter`] and [`Quantized`] seam, so with the same seed and data they produce
//! bit-identical weights. The loop checkpoints after every step (atomically), so a killed
//! trainer resumes exactly where it stopped.
//!
//! [`run_float`] is the unquantized baseline with the same model, optimizer and batches.
//!
//! The secure path ([`secure_products`], then [`run`]) opens only the encrypted-dataset
//! file: no plaintext training data is reachable from it.

use crate::authority::Policy;
use crate::dataset::Reader;
use crate::protocol::AuthorityClient;
use crate::secure::{KeyPolicyFilter, SecureProducts};
use crate::Curve;
use fe::dlog::DlogTable;
use nn::activation::Activation;
use nn::data::Dataset;
use nn::data::DatasetInfo;
use nn::first_layer::{FirstLayer, IntegerProducts, PlainFloat, Quantized, Quantizer, Rounding};
use nn::model::{Model, ModelSpec};
use nn::optim::{Optimizer, Schedule};
use nn::train::{
    Checkpoint, EpochMetrics, EpochState, Flow, Hooks, Progress, RunSettings, StepView, TrainError,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Errors of the trainer.
#[derive(Debug, Error)]
pub enum TrainerError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Training failed (including errors of the secure layer).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The model or checkpoint could not be read or written.
    #[error(transparent)]
    Model(#[from] nn::model::ModelError),
    /// The encrypted dataset is unusable.
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    /// Talking to the authority failed.
    #[error(transparent)]
    Protocol(#[from] crate::protocol::ProtocolError),
    /// A cryptographic setting is invalid.
    #[error(transparent)]
    Fe(#[from] fe::FeError),
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Network layout: hidden widths only (`128-32`), every width from input to output
    /// (`784-128-32-10`), or image layers first (`lenet5`), checked against the data
    /// ([`ModelSpec::for_info`]).
    pub spec: String,
    /// Hidden activation.
    pub activation: Activation,
    /// Epochs to train (in total, counting those of a resumed checkpoint).
    pub epochs: usize,
    /// Seed of initialization, batch order and stochastic rounding.
    pub seed: u64,
    /// Bits of the quantized first-layer weights and deltas.
    pub bits: u32,
    /// Stochastic rounding of weights and deltas (else nearest).
    pub stochastic_rounding: bool,
    /// Learning rate.
    pub lr: f32,
    /// The update rule (Adam unless a config says otherwise; configs written before the
    /// choice existed read as Adam).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// How the learning rate changes from epoch to epoch (constant unless a config says
    /// otherwise).
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Show progress bars.
    pub progress: bool,
}

/// The trainer's update rule: Adam (the default) or plain SGD (no momentum), both at the
/// configured learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with its usual moments (0.9, 0.999, 1e-8).
    #[default]
    Adam,
    /// Stochastic gradient descent without momentum (CryptoNN's setting).
    Sgd,
}

impl OptimizerKind {
    /// Both kinds, for help texts and tests.
    pub const ALL: [OptimizerKind; 2] = [OptimizerKind::Adam, OptimizerKind::Sgd];

    /// The name of the kind, as `--optimizer` takes it.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
        }
    }

    /// A fresh optimizer of this kind with learning rate `lr`.
    pub fn build(self, lr: f32) -> Optimizer {
        match self {
            OptimizerKind::Adam => Optimizer::adam(lr),
            OptimizerKind::Sgd => Optimizer::sgd(lr, 0.0),
        }
    }

    /// The kind of an existing optimizer (SGD with any momentum counts as SGD).
    pub fn of(optimizer: &Optimizer) -> Self {
        match optimizer.method {
            nn::optim::Method::Adam { .. } => OptimizerKind::Adam,
            nn::optim::Method::Sgd { .. } => OptimizerKind::Sgd,
        }
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        OptimizerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown optimizer {s:?} (expected adam or sgd)"))
    }
}

/// The learning rate from epoch to epoch, as `--lr-schedule` takes it: `constant`,
/// `step:EVERY:GAMMA` (multiplied by `GAMMA` every `EVERY` epochs, e.g. `step:1:0.3`) or
/// `cosine` / `cosine:MIN` (cosine annealing from the base rate towards `MIN`, default 0,
/// over the run's epochs; epoch `e` of `E` trains at `MIN + (lr - MIN)(1 + cos(pi e/E))/2`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The base rate at every epoch.
    #[default]
    Constant,
    /// The rate multiplied by `gamma` every `every` epochs.
    Step {
        /// Epochs between two decays (at least 1).
        every: usize,
        /// Factor of each decay, in `(0, 1]`.
        gamma: f32,
    },
    /// Cosine annealing over the run's epochs, from the base rate towards `min`.
    Cosine {
        /// The rate the annealing tends to (below the base rate).
        min: f32,
    },
}

impl LrSchedule {
    /// The optimizer's schedule for a run of `epochs` epochs.
    pub fn schedule(self, epochs: usize) -> Schedule {
        match self {
            LrSchedule::Constant => Schedule::Constant,
            LrSchedule::Step { every, gamma } => Schedule::StepDecay { every, gamma },
            LrSchedule::Cosine { min } => Schedule::Cosine {
                total_epochs: epochs,
                min_lr: min,
            },
        }
    }
}

impl std::fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LrSchedule::Constant => f.write_str("constant"),
            LrSchedule::Step { every, gamma } => write!(f, "step:{every}:{gamma}"),
            LrSchedule::Cosine { min } if *min == 0.0 => f.write_str("cosine"),
            LrSchedule::Cosine { min } => write!(f, "cosine:{min}"),
        }
    }
}

impl std::str::FromStr for LrSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = s.split(':').collect();
        let number = |what: &str, v: &str| -> Result<f32, String> {
            v.parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{what} {v:?} in --lr-schedule {s:?} is not a number"))
        };
        match parts.as_slice() {
            ["constant"] => Ok(LrSchedule::Constant),
            ["step", every, gamma] => {
                let every = every
                    .parse::<usize>()
                    .ok()
                    .filter(|&e| e >= 1)
                    .ok_or_else(|| format!("the epochs between decays in {s:?} must be a whole number of at least 1"))?;
                let gamma = number("the factor", gamma)?;
                if !(gamma > 0.0 && gamma <= 1.0) {
                    return Err(format!("the decay factor in {s:?} must be in (0, 1]"));
                }
                Ok(LrSchedule::Step { every, gamma })
            }
            ["cosine"] => Ok(LrSchedule::Cosine { min: 0.0 }),
            ["cosine", min] => {
                let min = number("the final rate", min)?;
                if min < 0.0 {
                    return Err(format!("the final rate in {s:?} must not be negative"));
                }
                Ok(LrSchedule::Cosine { min })
            }
            _ => Err(format!(
                "unknown learning-rate schedule {s:?} (expected constant, step:EVERY:GAMMA, cosine or cosine:MIN)"
            )),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            spec: "128-32".into(),
            activation: Activation::Sigmoid,
            epochs: 1,
            seed: 1,
            bits: 8,
            stochastic_rounding: false,
            lr: 0.01,
            optimizer: OptimizerKind::Adam,
            schedule: LrSchedule::Constant,
            progress: true,
        }
    }
}

impl TrainConfig {
    /// The quantizer of the first-layer seam.
    pub fn quantizer(&self) -> Quantizer {
        Quantizer {
            bits_weights: self.bits,
            bits_deltas: self.bits,
            rounding: if self.stochastic_rounding {
                Rounding::Stochastic
            } else {
                Rounding::Nearest
            },
            seed: self.seed,
        }
    }

    /// A fresh optimizer of the configured kind and learning rate.
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
            .build(self.lr)
            .with_schedule(self.schedule.schedule(self.epochs))
    }

    /// The architecture for data described by `info`.
    pub fn model_spec(&self, info: &DatasetInfo) -> Result<ModelSpec, TrainerError> {
        Ok(ModelSpec::for_info(&self.spec, self.activation, info)?)
    }

    /// A fresh model for data described by `info`.
    pub fn model(&self, info: &DatasetInfo) -> Result<Model, TrainerError> {
        Ok(Model::new(self.model_spec(info)?, self.seed)?.with_data(info.clone())?)
    }

    /// The settings a checkpoint records, as (flag, value) pairs; `data` names the training
    /// data (see [`data_identity`]).
    pub fn identity(
        &self,
        info: &DatasetInfo,
        data: &str,
    ) -> Result<Vec<(String, String)>, TrainerError> {
        let spec = self.model_spec(info)?;
        let sizes: Vec<String> = spec.sizes.iter().map(|s| s.to_string()).collect();
        Ok(vec![
            ("--data".into(), data.to_string()),
            ("--spec".into(), sizes.join("-")),
            ("--activation".into(), self.activation.to_string()),
            ("--seed".into(), self.seed.to_string()),
            ("--bits".into(), self.bits.to_string()),
            (
                "--stochastic-rounding".into(),
                self.stochastic_rounding.to_string(),
            ),
            ("--lr".into(), self.lr.to_string()),
            ("--optimizer".into(), self.optimizer.to_string()),
            ("--lr-schedule".into(), self.schedule.to_string()),
        ])
    }
}

/// A short name of a plaintext dataset's content: its description and a SHA-256 over its
/// values and labels (the first 16 hex digits), so that a checkpoint is not resumed on other
/// data.
pub fn data_identity(data: &Dataset) -> String {
    let mut h = Sha256::new();
    h.update(format!("{}", data.info).as_bytes());
    for v in data.values.iter() {
        h.update(v.to_le_bytes());
    }
    h.update(&data.labels);
    let d = h.finalize();
    format!(
        "{} samples, sha256 {}",
        data.len(),
        crate::dataset::hex(&d[..8])
    )
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The trained model.
    pub model: Model,
    /// Metrics of every epoch.
    pub history: Vec<EpochMetrics>,
}

/// A first layer whose rounding randomness can be saved in a checkpoint and restored.
pub trait Resumable: FirstLayer {
    /// The rounding state to checkpoint.
    fn rounding_stream(&self) -> u64;
    /// Restores the rounding state.
    fn set_rounding_stream(&mut self, stream: u64);
}

impl<P: IntegerProducts> Resumable for Quantized<P> {
    fn rounding_stream(&self) -> u64 {
        Quantized::rounding_stream(self)
    }
    fn set_rounding_stream(&mut self, stream: u64) {
        Quantized::set_rounding_stream(self, stream)
    }
}

impl Resumable for PlainFloat {
    fn rounding_stream(&self) -> u64 {
        0
    }
    fn set_rounding_stream(&mut self, _: u64) {}
}

/// What a run trains on besides its settings: the data's description, a name of the data
/// for checkpoints, and the key policy whose refusals the trainer avoids.
#[derive(Debug, Clone)]
pub struct RunData {
    /// The description of the training data.
    pub info: DatasetInfo,
    /// The data's name in checkpoints ([`data_identity`], or the encrypted file's).
    pub identity: String,
    /// The authority's key policy, lengths set (the trainer zeroes what it would refuse).
    pub policy: Policy,
}

/// Trains with any integer products, wrapped in the key-policy filter and the quantized seam:
/// the encrypted run ([`SecureProducts`]) and its simulation ([`nn::first_layer::PlainIntegers`]) both go
/// through here. See [`run_layer`] for the arguments.
pub fn run<P, F>(
    products: P,
    data: &RunData,
    cfg: &TrainConfig,
    test: Option<&Dataset>,
    checkpoint: Option<&Path>,
    stop_after: Option<usize>,
    mut on_epoch: F,
) -> Result<RunResult, TrainerError>
where
    P: IntegerProducts,
    F: FnMut(&Model, &EpochMetrics, &P) -> Result<(), TrainerError>,
{
    let policy = &data.policy;
    if let (Some(r), Some(p)) = (policy.batch_rank_budget, checkpoint.filter(|p| p.exists())) {
        return Err(TrainerError::Config(format!(
            "{} is a checkpoint, and the authority keeps a rank budget of {r} per batch: the \
             rank this run has spent is not in the checkpoint, so a resumed run would ask for \
             keys past the budget; start the run anew (with newly encrypted data, whose \
             batches have their own budgets) or remove --checkpoint",
            p.display()
        )));
    }
    let layer = Quantized::new(KeyPolicyFilter::new(products, policy), cfg.quantizer())
        .map_err(TrainError::from)?;
    run_layer(layer, data, cfg, test, checkpoint, stop_after, |m, e, l| {
        on_epoch(m, e, l.inner().inner())
    })
}

/// The unquantized baseline: the same model, optimizer, partition and batch order as [`run`],
/// with a plain float first layer.
pub fn run_float(
    train: Dataset,
    batch_size: usize,
    cfg: &TrainConfig,
    test: Option<&Dataset>,
    on_epoch: impl FnMut(&Model, &EpochMetrics, &PlainFloat) -> Result<(), TrainerError>,
) -> Result<RunResult, TrainerError> {
    let data = RunData {
        info: train.info.clone(),
        identity: data_identity(&train),
        policy: Policy::default(),
    };
    let geometry = cfg.model_spec(&train.info)?.first_geometry();
    let layer = PlainFloat::from_dataset(train, batch_size, true)
        .and_then(|l| l.with_patches(geometry.as_ref()))
        .map_err(|e| TrainerError::Config(e.to_string()))?;
    run_layer(layer, &data, cfg, test, None, None, on_epoch)
}

/// The trainer's hooks on the training loop: a checkpoint after every step and epoch, the
/// caller's per-epoch callback, and a stop after `stop_after` steps of this invocation.
struct TrainerHooks<'a, F> {
    checkpoint: Option<&'a Path>,
    config: Vec<(String, String)>,
    stop_after: Option<usize>,
    steps: usize,
    on_epoch: F,
}

impl<F> TrainerHooks<'_, F> {
    fn save(&self, p: Progress, stream: u64) -> Result<(), TrainError> {
        match self.checkpoint {
            Some(path) => Checkpoint {
                model: p.model,
                optimizer: p.optimizer,
                state: p.state,
                history: p.history,
                rounding_stream: stream,
                config: self.config.clone(),
            }
            .save(path)
            .map_err(TrainError::from),
            None => Ok(()),
        }
    }

    fn flow(&self) -> Flow {
        if self.stop_after.is_some_and(|s| self.steps >= s) {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

impl<L, F> Hooks<L> for TrainerHooks<'_, F>
where
    L: Resumable,
    F: FnMut(&Model, &EpochMetrics, &L) -> Result<(), TrainerError>,
{
    fn after_step(&mut self, s: &StepView<'_, L>) -> Result<Flow, TrainError> {
        self.steps += 1;
        if self.checkpoint.is_some() {
            self.save(s.progress(), s.layer.rounding_stream())?;
        }
        Ok(self.flow())
    }

    fn after_epoch(
        &mut self,
        p: &Progress,
        layer: &L,
        m: &EpochMetrics,
    ) -> Result<Flow, TrainError> {
        (self.on_epoch)(&p.model, m, layer).map_err(|e| TrainError::Callback(Box::new(e)))?;
        if self.checkpoint.is_some() {
            self.save(p.clone(), layer.rounding_stream())?;
        }
        Ok(self.flow())
    }
}

/// The training run: checkpoints to `checkpoint` after every step and resumes from it if it
/// exists (refusing a checkpoint made with other settings or data); `on_epoch` sees each
/// finished epoch (test figures filled from `test` when given) and the layer; `stop_after`
/// ends the run after that many steps of this invocation (the checkpoint allows continuing
/// later).
pub fn run_layer<L, F>(
    mut layer: L,
    data: &RunData,
    cfg: &TrainConfig,
    test: Option<&Dataset>,
    checkpoint: Option<&Path>,
    stop_after: Option<usize>,
    on_epoch: F,
) -> Result<RunResult, TrainerError>
where
    L: Resumable,
    F: FnMut(&Model, &EpochMetrics, &L) -> Result<(), TrainerError>,
{
    let nb = layer.num_batches();
    let config = cfg.identity(&data.info, &data.identity)?;
    let resumed = match checkpoint {
        Some(p) if p.exists() => Some(Checkpoint::load(p)?),
        _ => None,
    };
    let mut progress = match resumed {
        Some(mut c) => {
            record_optimizer(&mut c);
            c.check_config(&config)?;
            layer.set_rounding_stream(c.rounding_stream);
            Progress {
                model: c.model,
                optimizer: c.optimizer,
                state: c.state,
                history: c.history,
            }
        }
        None => Progress {
            model: cfg.model(&data.info)?,
            optimizer: cfg.optimizer(),
            state: EpochState::new(0, nb, cfg.seed, true),
            history: Vec::new(),
        },
    };
    let settings = RunSettings {
        epochs: cfg.epochs,
        seed: cfg.seed,
        shuffle: true,
        progress_bar: cfg.progress,
    };
    let mut hooks = TrainerHooks {
        checkpoint,
        config,
        stop_after,
        steps: 0,
        on_epoch,
    };
    nn::train::run(&mut layer, &mut progress, &settings, test, &mut hooks)?;
    Ok(RunResult {
        model: progress.model,
        history: progress.history,
    })
}

/// Fills in the `--optimizer` and `--lr-schedule` of a checkpoint written before those
/// flags existed (from the optimizer it saved; schedules were constant then), so that such a
/// checkpoint resumes with the same settings only.
fn record_optimizer(c: &mut Checkpoint) {
    if !c.config.iter().any(|(f, _)| f == "--optimizer") {
        let kind = OptimizerKind::of(&c.optimizer);
        c.config.push(("--optimizer".into(), kind.to_string()));
    }
    if !c.config.iter().any(|(f, _)| f == "--lr-schedule") {
        let constant = LrSchedule::Constant.to_string();
        c.config.push(("--lr-schedule".into(), constant));
    }
}

/// Everything the secure trainer needs besides the model settings.
#[derive(Debug, Clone)]
pub struct SecureSetup {
    /// The encrypted dataset.
    pub data: PathBuf,
    /// Address of the authority.
    pub authority: String,
    /// Bearer token for the authority.
    pub token: String,
    /// Optional cache file of the discrete-log table (built and saved if missing).
    pub dlog_table: Option<PathBuf>,
    /// How to reach the authority: TLS pinned to its certificate, or clear text.
    pub transport: crate::protocol::ClientTransport,
}

/// Loads the discrete-log table from `path`, or builds it (and saves it there if given).
pub fn dlog_table(path: Option<&Path>) -> Result<Arc<DlogTable<Curve>>, TrainerError> {
    let half = fe::dlog::DEFAULT_HALF_WIDTH;
    if let Some(p) = path {
        if p.exists() {
            return Ok(Arc::new(DlogTable::load(p)?));
        }
    }
    let t = DlogTable::new(half)?;
    if let Some(p) = path {
        t.save(p)?;
    }
    Ok(Arc::new(t))
}

/// Refuses data whose column binding differs from the authority's: its column keys would
/// decrypt nothing in range (or be refused).
fn check_binding(data: &Path, file_bound: bool, authority_binds: bool) -> Result<(), TrainerError> {
    let says = |b: bool| if b { "binds" } else { "does not bind" };
    if file_bound != authority_binds {
        return Err(TrainerError::Config(format!(
            "{} was encrypted with columns {} its batches, but the authority {} column keys to \
             batches (`authority serve --shared-column-key` turns binding off); re-encrypt the \
             data with `client encrypt` against this authority, or serve it the way it was \
             encrypted",
            data.display(),
            if file_bound { "bound to" } else { "shared by" },
            says(authority_binds)
        )));
    }
    Ok(())
}

/// Opens the encrypted dataset, connects to the authority and checks that the data was made
/// under its parameters: the secure products and what the run needs to know of the data.
pub fn secure_products(
    setup: &SecureSetup,
) -> Result<(SecureProducts<AuthorityClient>, RunData), TrainerError> {
    let config = crate::protocol::ClientConfig {
        transport: setup.transport.clone(),
        ..crate::protocol::ClientConfig::default()
    };
    let mut client = AuthorityClient::connect_with(&setup.authority, &setup.token, config)?;
    let published = client.published()?;
    let params = published.params;
    let reader = Reader::open_for(&setup.data, &params)?;
    let h = reader.header();
    check_binding(
        &setup.data,
        h.column_binding.is_some(),
        published.policy.bind_batches,
    )?;
    let data = RunData {
        info: h.dataset.clone(),
        identity: format!(
            "encrypted {} samples, parameters {}",
            h.num_samples,
            crate::dataset::hex(&h.params_fingerprint[..8])
        ),
        policy: published.policy,
    };
    let dlog = dlog_table(setup.dlog_table.as_deref())?;
    Ok((SecureProducts::new(reader, client, params, dlog), data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nn::first_layer::PlainIntegers;

    fn tiny() -> Dataset {
        let info = DatasetInfo::new(4, 15, 2).expect("info");
        let values =
            ndarray::Array2::from_shape_fn((16, 4), |(i, j)| ((i * 3 + j * 5) % 16) as u16);
        let labels = (0..16).map(|i| (i % 2) as u8).collect();
        Dataset::new(values, labels, info).expect("dataset")
    }

    /// Resumes (or starts) the checkpointed run of `tiny` with `optimizer`, one step.
    fn step(ck: &Path, optimizer: OptimizerKind) -> Result<RunResult, TrainerError> {
        step_with(ck, LrSchedule::Constant, optimizer)
    }

    /// [`step`] with a learning-rate schedule.
    fn step_with(
        ck: &Path,
        schedule: LrSchedule,
        optimizer: OptimizerKind,
    ) -> Result<RunResult, TrainerError> {
        let train = tiny();
        let cfg = TrainConfig {
            spec: "3".into(),
            epochs: 2,
            optimizer,
            schedule,
            progress: false,
            ..TrainConfig::default()
        };
        let data = RunData {
            info: train.info.clone(),
            identity: data_identity(&train),
            policy: Policy::default().with_lengths(train.info.row_len(), 4),
        };
        let products = PlainIntegers::from_dataset(train, 4, true).expect("batches");
        run(products, &data, &cfg, None, Some(ck), Some(1), |_, _, _| {
            Ok(())
        })
    }

    /// Rewrites the checkpoint at `ck` as one made before `flag` existed.
    fn forget_flag(ck: &Path, flag: &str) {
        let mut c = Checkpoint::load(ck).expect("load");
        c.config.retain(|(f, _)| f != flag);
        c.save(ck).expect("save");
    }

    fn refused_flag(r: Result<RunResult, TrainerError>) -> String {
        match r {
            Err(TrainerError::Train(TrainError::ConfigMismatch { flag, .. })) => flag,
            other => panic!("expected a refused flag, got {other:?}"),
        }
    }

    #[test]
    fn resuming_with_another_optimizer_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("ck.bin");
        step(&ck, OptimizerKind::Sgd).expect("first step");
        assert_eq!(refused_flag(step(&ck, OptimizerKind::Adam)), "--optimizer");
        step(&ck, OptimizerKind::Sgd).expect("same optimizer resumes");
    }

    #[test]
    fn a_checkpoint_without_the_optimizer_flag_resumes_as_adam() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("ck.bin");
        step(&ck, OptimizerKind::Adam).expect("first step");
        // A checkpoint written before --optimizer existed records no such flag.
        forget_flag(&ck, "--optimizer");
        assert_eq!(refused_flag(step(&ck, OptimizerKind::Sgd)), "--optimizer");
        step(&ck, OptimizerKind::Adam).expect("adam resumes");
    }

    #[test]
    fn optimizer_names_round_trip_and_old_configs_read_as_adam() {
        for k in OptimizerKind::ALL {
            assert_eq!(k.name().parse::<OptimizerKind>(), Ok(k));
            assert_eq!(OptimizerKind::of(&k.build(0.1)), k);
        }
        assert!("rmsprop".parse::<OptimizerKind>().is_err());
        let mut v = serde_json::to_value(TrainConfig::default()).expect("json");
        v.as_object_mut().expect("object").remove("optimizer");
        let c: TrainConfig = serde_json::from_value(v).expect("old config");
        assert_eq!(c.optimizer, OptimizerKind::Adam);
    }

    #[test]
    fn schedules_parse_print_and_set_the_rate_of_each_epoch() {
        for text in ["constant", "step:1:0.3", "cosine", "cosine:0.0001"] {
            let s: LrSchedule = text.parse().expect(text);
            assert_eq!(s.to_string(), text);
        }
        for bad in [
            "",
            "step",
            "step:0:0.5",
            "step:1:0",
            "step:1:1.5",
            "cosine:-1",
            "linear",
        ] {
            assert!(bad.parse::<LrSchedule>().is_err(), "{bad:?} accepted");
        }
        let cfg = |schedule| TrainConfig {
            epochs: 4,
            lr: 0.01,
            schedule,
            ..TrainConfig::default()
        };
        let rates = |c: &TrainConfig| -> Vec<f32> {
            let mut o = c.optimizer();
            (0..4)
                .map(|e| {
                    o.set_epoch(e);
                    o.current_lr()
                })
                .collect()
        };
        let step = cfg(LrSchedule::Step {
            every: 1,
            gamma: 0.5,
        });
        assert_eq!(rates(&step), vec![0.01, 0.005, 0.0025, 0.00125]);
        let cos = rates(&cfg(LrSchedule::Cosine { min: 0.0 }));
        assert_eq!(cos[0], 0.01);
        assert!((cos[2] - 0.005).abs() < 1e-6, "{cos:?}");
        assert!(cos.windows(2).all(|w| w[1] < w[0]), "{cos:?}");
        assert_eq!(rates(&cfg(LrSchedule::Constant)), vec![0.01; 4]);
    }

    #[test]
    fn resuming_with_another_schedule_is_refused_and_old_checkpoints_are_constant() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("ck.bin");
        step(&ck, OptimizerKind::Adam).expect("first step");
        forget_flag(&ck, "--lr-schedule");
        let halving = LrSchedule::Step {
            every: 1,
            gamma: 0.5,
        };
        let r = step_with(&ck, halving, OptimizerKind::Adam);
        assert_eq!(refused_flag(r), "--lr-schedule");
        step(&ck, OptimizerKind::Adam).expect("the constant schedule resumes");
    }
}
