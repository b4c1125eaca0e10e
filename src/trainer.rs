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
//! The secure path ([`train_secure`]) opens only the encrypted-dataset file: no plaintext
//! training data is reachable from it.

use crate::dataset::Reader;
use crate::protocol::{AuthorityClient, PublicParams};
use crate::secure::{KeyPolicyFilter, SecureProducts, Timings};
use crate::Curve;
use fe::dlog::DlogTable;
use nn::activation::Activation;
use nn::data::Dataset;
use nn::first_layer::{FirstLayer, IntegerProducts, PlainFloat, Quantized, Quantizer, Rounding};
use nn::model::{Model, ModelSpec};
use nn::optim::Optimizer;
use nn::train::{train_epoch_from, Checkpoint, EpochMetrics, EpochState, TrainError};
use serde::{Deserialize, Serialize};
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
    /// Network layout, for example `784-128-32-10`.
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
    /// Learning rate (Adam).
    pub lr: f32,
    /// Fewest non-zero entries of a weight row key (the authority's policy).
    pub min_row_nonzero: usize,
    /// Fewest non-zero entries of a delta column key (the authority's policy).
    pub min_col_nonzero: usize,
    /// Show progress bars.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            spec: "784-128-32-10".into(),
            activation: Activation::Sigmoid,
            epochs: 1,
            seed: 1,
            bits: 8,
            stochastic_rounding: false,
            lr: 0.01,
            min_row_nonzero: 16,
            min_col_nonzero: 2,
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

    fn model(&self) -> Result<Model, TrainerError> {
        let spec = ModelSpec::parse(&self.spec, self.activation)?;
        if spec.n_in() + 1 != crate::ROW_LEN {
            return Err(TrainerError::Config(format!(
                "the network must take {} inputs (MNIST pixels), got {}",
                crate::ROW_LEN - 1,
                spec.n_in()
            )));
        }
        Ok(Model::new(spec, self.seed))
    }
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

/// Trains with any integer products, wrapped in the key-policy filter and the quantized seam:
/// the encrypted run ([`SecureProducts`]) and its simulation ([`nn::first_layer::PlainIntegers`]) both go
/// through here. See [`run_layer`] for the arguments.
pub fn run<P, F>(
    products: P,
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
    let layer = Quantized::new(
        KeyPolicyFilter::new(products, cfg.min_row_nonzero, cfg.min_col_nonzero),
        cfg.quantizer(),
    )
    .map_err(TrainError::from)?;
    run_layer(layer, cfg, test, checkpoint, stop_after, |m, e, l| {
        on_epoch(m, e, l.inner().inner())
    })
}

/// The unquantized baseline: the same model, optimizer, partition and batch order as [`run`],
/// with a plain float first layer.
pub fn run_float(
    data: Dataset,
    batch_size: usize,
    cfg: &TrainConfig,
    test: Option<&Dataset>,
    on_epoch: impl FnMut(&Model, &EpochMetrics, &PlainFloat) -> Result<(), TrainerError>,
) -> Result<RunResult, TrainerError> {
    let layer = PlainFloat::from_dataset(data, batch_size, true, 10)
        .map_err(|e| TrainerError::Config(e.to_string()))?;
    run_layer(layer, cfg, test, None, None, on_epoch)
}

/// The training loop: checkpoints to `checkpoint` after every step and resumes from it if it
/// exists; `on_epoch` sees each finished epoch (test figures filled from `test` when given)
/// and the layer; `stop_after` ends the run after that many steps of this invocation (the
/// checkpoint allows continuing later).
pub fn run_layer<L, F>(
    mut layer: L,
    cfg: &TrainConfig,
    test: Option<&Dataset>,
    checkpoint: Option<&Path>,
    stop_after: Option<usize>,
    mut on_epoch: F,
) -> Result<RunResult, TrainerError>
where
    L: Resumable,
    F: FnMut(&Model, &EpochMetrics, &L) -> Result<(), TrainerError>,
{
    let nb = layer.num_batches();
    let resumed = match checkpoint {
        Some(p) if p.exists() => Some(Checkpoint::load(p)?),
        _ => None,
    };
    let (mut model, mut opt, mut state, mut history) = match resumed {
        Some(c) => {
            layer.set_rounding_stream(c.rounding_stream);
            (c.model, c.optimizer, c.state, c.history)
        }
        None => (
            cfg.model()?,
            Optimizer::adam(cfg.lr),
            EpochState::new(0, nb, cfg.seed, true),
            Vec::new(),
        ),
    };
    let save =
        |model: &Model, opt: &Optimizer, state: &EpochState, hist: &[EpochMetrics], stream: u64| {
            match checkpoint {
                Some(p) => Checkpoint {
                    model: model.clone(),
                    optimizer: opt.clone(),
                    state: state.clone(),
                    history: hist.to_vec(),
                    rounding_stream: stream,
                }
                .save(p)
                .map_err(TrainError::from),
                None => Ok(()),
            }
        };
    let mut steps = 0usize;
    while state.epoch < cfg.epochs {
        let hist = history.clone();
        let mut stopped = false;
        let result = train_epoch_from(
            &mut model,
            &mut layer,
            &mut opt,
            &mut state,
            cfg.progress,
            |model, opt, layer, state| {
                steps += 1;
                save(model, opt, state, &hist, layer.rounding_stream())?;
                if stop_after.is_some_and(|s| steps >= s) && !state.is_done() {
                    stopped = true;
                    return Err(TrainError::State("stopped".into()));
                }
                Ok(())
            },
        );
        if stopped {
            return Ok(RunResult { model, history });
        }
        let mut m = result?;
        if let Some(t) = test {
            let ev = nn::eval::evaluate(&model, t)?;
            m.test_accuracy = Some(ev.accuracy);
            m.test_loss = Some(ev.loss);
        }
        on_epoch(&model, &m, &layer)?;
        history.push(m);
        state = EpochState::new(state.epoch + 1, nb, cfg.seed, true);
        save(&model, &opt, &state, &history, layer.rounding_stream())?;
        if stop_after.is_some_and(|s| steps >= s) && state.epoch < cfg.epochs {
            return Ok(RunResult { model, history });
        }
    }
    Ok(RunResult { model, history })
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

/// Opens the encrypted dataset, connects to the authority and checks that the data was made
/// under its parameters: the secure products ready for [`run`].
pub fn secure_products(
    setup: &SecureSetup,
) -> Result<(SecureProducts<AuthorityClient>, PublicParams), TrainerError> {
    let mut client = AuthorityClient::connect(&setup.authority, &setup.token)?;
    let params = client.params()?;
    let reader = Reader::open_for(&setup.data, &params)?;
    let dlog = dlog_table(setup.dlog_table.as_deref())?;
    Ok((
        SecureProducts::new(reader, client, params.clone(), dlog),
        params,
    ))
}

/// Trains over the encrypted dataset: the product of this crate.
pub fn train_secure<F>(
    setup: &SecureSetup,
    cfg: &TrainConfig,
    test: Option<&Dataset>,
    checkpoint: Option<&Path>,
    stop_after: Option<usize>,
    on_epoch: F,
) -> Result<(RunResult, Timings), TrainerError>
where
    F: FnMut(&Model, &EpochMetrics, &SecureProducts<AuthorityClient>) -> Result<(), TrainerError>,
{
    let (products, _) = secure_products(setup)?;
    let mut timings = Timings::default();
    let mut on_epoch = on_epoch;
    let r = run(products, cfg, test, checkpoint, stop_after, |m, e, p| {
        timings = p.timings();
        on_epoch(m, e, p)
    })?;
    Ok((r, timings))
}
