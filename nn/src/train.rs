//! The training loop, resumable between batches.
//!
//! One step on batch `i` of a model with `L` dense layers (`f` the hidden activation):
//!
//! ```text
//! Z_1 = first_layer.forward(i, W1)                       (B, n_1)   W1 = [W_1 | b_1]
//! A_k = f(Z_k),  Z_{k+1} = A_k W_{k+1}^T + b_{k+1}        k = 1..L-1
//! P   = softmax(Z_L)
//! E   = first_layer.output_error(i, P) = P - Y            (B, K)
//! D_L = E / B
//! grad W_k = D_k^T A_{k-1},  grad b_k = sum_b D_k,  D_{k-1} = (D_k W_k) * f'(Z_{k-1})
//! grad W1  = first_layer.backward(i, D_1)                 (n_1, n_0 + 1), bias column last
//! ```
//!
//! The loop learns the labels only through `E`: it recovers `Y = round(P - E)` to report the
//! loss `-(1/B) sum_b sum_k Y_bk log P_bk` and the training accuracy, as the secure trainer does.
//!
//! Batches are the first layer's fixed batches; each epoch visits them in an order drawn from
//! ChaCha8 seeded with `(seed, epoch)` (or in index order). All state needed to continue an
//! epoch (model, optimizer with its moments, [`EpochState`]) is serializable: [`Checkpoint`]
//! stores it, and [`train_epoch_from`] resumes at the next batch with bit-identical results.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, ArrayView2, Axis, Slice};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{DataError, Dataset};
pub use crate::eval::{evaluate, Evaluation};
use crate::first_layer::{rows_per_sample, FirstLayer, SeamError};
use crate::layer::DenseGrad;
use crate::layers::{
    backward_stack, channels_to_positions, forward_stack, positions_to_channels, Cache,
};
use crate::loss::{argmax_rows, log_softmax, softmax};
use crate::model::{decode_versioned, encode_versioned, read_file, Gradients, Model, ModelError};
use crate::optim::Optimizer;

/// File magic of a training checkpoint.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"CNNCKPT\0";
/// Current format version of a training checkpoint (2: the run's configuration; 3: models
/// with image layers).
pub const CHECKPOINT_VERSION: u32 = 3;

/// Errors of training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The first layer failed.
    #[error(transparent)]
    Seam(#[from] SeamError),
    /// A model or optimizer error.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A data error.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A result of the first layer does not fit the model.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        /// Which matrix.
        what: &'static str,
        /// Expected shape.
        expected: (usize, usize),
        /// Actual shape.
        got: (usize, usize),
    },
    /// The loss became NaN or infinite.
    #[error("training diverged (non-finite loss) in epoch {epoch}, batch {batch}")]
    Diverged {
        /// Epoch.
        epoch: usize,
        /// Batch index.
        batch: usize,
    },
    /// An epoch state that does not match the first layer's batches.
    #[error("invalid epoch state: {0}")]
    State(String),
    /// The caller's per-step callback failed (for example writing a checkpoint).
    #[error("step callback failed: {0}")]
    Callback(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A resumed checkpoint was made with another setting than the one asked for now.
    #[error(
        "the checkpoint was made with {flag} {saved}, but this run asks for {flag} {asked}; \
         use the checkpoint's setting or start a new checkpoint"
    )]
    ConfigMismatch {
        /// The setting (a command-line flag).
        flag: String,
        /// Its value in the checkpoint.
        saved: String,
        /// Its value now.
        asked: String,
    },
}

/// What the training loop does after a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on training.
    Continue,
    /// Stop here; everything done so far stays valid (a checkpoint can continue it).
    Stop,
}

/// The state of a training run between two steps: what a [`Checkpoint`] saves.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The model.
    pub model: Model,
    /// The optimizer, with its moments.
    pub optimizer: Optimizer,
    /// Position in the current epoch.
    pub state: EpochState,
    /// Metrics of the completed epochs.
    pub history: Vec<EpochMetrics>,
}

/// What a hook sees after a step.
pub struct StepView<'a, L: ?Sized> {
    /// The model after the step's update.
    pub model: &'a Model,
    /// The optimizer after the update.
    pub optimizer: &'a Optimizer,
    /// Position in the epoch, `next` already past this step's batch.
    pub state: &'a EpochState,
    /// Metrics of the completed epochs.
    pub history: &'a [EpochMetrics],
    /// The first layer.
    pub layer: &'a L,
    /// The batch of this step.
    pub batch: usize,
    /// Loss and accuracy counts of this step.
    pub stats: &'a StepStats,
}

impl<L: ?Sized> StepView<'_, L> {
    /// The run's state as a [`Progress`] (a copy, for a checkpoint).
    pub fn progress(&self) -> Progress {
        Progress {
            model: self.model.clone(),
            optimizer: self.optimizer.clone(),
            state: self.state.clone(),
            history: self.history.to_vec(),
        }
    }
}

/// Callbacks of [`run`]: what a caller adds to the one training loop (checkpoints, lockstep
/// checks, timings, stopping after N steps, metrics). Both default to continuing.
pub trait Hooks<L: ?Sized> {
    /// After every step.
    fn after_step(&mut self, _step: &StepView<'_, L>) -> Result<Flow, TrainError> {
        Ok(Flow::Continue)
    }

    /// After every epoch: `metrics` (test figures filled when a test set was given) is the
    /// last entry of `progress.history`, and `progress.state` is the start of the next epoch.
    fn after_epoch(
        &mut self,
        _progress: &Progress,
        _layer: &L,
        _metrics: &EpochMetrics,
    ) -> Result<Flow, TrainError> {
        Ok(Flow::Continue)
    }
}

/// Hooks from a closure called after every step. A [`Flow::Stop`] from the last step of an
/// epoch also stops the run before the next epoch.
pub struct StepFn<F> {
    f: F,
    stop: bool,
}

impl<F> StepFn<F> {
    /// Hooks calling `f` after every step.
    pub fn new(f: F) -> Self {
        StepFn { f, stop: false }
    }
}

impl<L: ?Sized, F> Hooks<L> for StepFn<F>
where
    F: FnMut(&StepView<'_, L>) -> Result<Flow, TrainError>,
{
    fn after_step(&mut self, step: &StepView<'_, L>) -> Result<Flow, TrainError> {
        let flow = (self.f)(step)?;
        self.stop = flow == Flow::Stop;
        Ok(flow)
    }

    fn after_epoch(&mut self, _: &Progress, _: &L, _: &EpochMetrics) -> Result<Flow, TrainError> {
        Ok(if self.stop {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

/// Hooks that do nothing.
pub struct NoHooks;

impl<L: ?Sized> Hooks<L> for NoHooks {}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Every epoch is done.
    Completed,
    /// A hook stopped the run.
    Stopped,
}

/// Settings of [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSettings {
    /// Train until this many epochs are done (counting those of `progress.history`).
    pub epochs: usize,
    /// Seed of the per-epoch batch orders.
    pub seed: u64,
    /// Shuffle the order of the batches every epoch.
    pub shuffle: bool,
    /// Show a progress bar.
    pub progress_bar: bool,
}

/// The training loop: continues `progress` epoch by epoch until `settings.epochs` are done or
/// a hook stops it, scoring each epoch on `test` when given. The trainer, the float baseline
/// and the experiments all train through here; what differs between them are the first layer
/// and the hooks.
pub fn run<L, H>(
    layer: &mut L,
    progress: &mut Progress,
    settings: &RunSettings,
    test: Option<&Dataset>,
    hooks: &mut H,
) -> Result<Finished, TrainError>
where
    L: FirstLayer + ?Sized,
    H: Hooks<L> + ?Sized,
{
    let nb = layer.num_batches();
    while progress.state.epoch < settings.epochs {
        let Progress {
            model,
            optimizer,
            state,
            history,
        } = progress;
        let mut stopped = false;
        let mut m = train_epoch_from(
            model,
            layer,
            optimizer,
            state,
            settings.progress_bar,
            |model, optimizer, layer, state, batch, stats| {
                let view = StepView {
                    model,
                    optimizer,
                    state,
                    history,
                    layer,
                    batch,
                    stats,
                };
                stopped = hooks.after_step(&view)? == Flow::Stop && !state.is_done();
                Ok(if stopped { Flow::Stop } else { Flow::Continue })
            },
        )?;
        if stopped {
            return Ok(Finished::Stopped);
        }
        if let Some(t) = test {
            let ev = evaluate(&progress.model, t)?;
            m.test_accuracy = Some(ev.accuracy);
            m.test_loss = Some(ev.loss);
        }
        progress.history.push(m.clone());
        progress.state = EpochState::new(
            progress.state.epoch + 1,
            nb,
            settings.seed,
            settings.shuffle,
        );
        if hooks.after_epoch(progress, layer, &m)? == Flow::Stop
            && progress.state.epoch < settings.epochs
        {
            return Ok(Finished::Stopped);
        }
    }
    Ok(Finished::Completed)
}

/// Per-epoch results, as data for CSV files and plots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, 0-based.
    pub epoch: usize,
    /// Mean training cross-entropy over the epoch's samples (with the weights of each step).
    pub train_loss: f64,
    /// Fraction of training samples classified correctly during the epoch.
    pub train_accuracy: f64,
    /// Test accuracy after the epoch, if a test set was given.
    pub test_accuracy: Option<f64>,
    /// Test cross-entropy after the epoch, if a test set was given.
    pub test_loss: Option<f64>,
    /// Training time of the epoch in seconds (evaluation excluded).
    pub seconds: f64,
}

/// Loss and accuracy counts of one or more steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Sum of per-sample cross-entropies.
    pub loss_sum: f64,
    /// Correctly classified samples.
    pub correct: u64,
    /// Samples seen.
    pub samples: u64,
}

/// Progress through one epoch: everything needed to resume it at the next batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochState {
    /// Epoch number, 0-based.
    pub epoch: usize,
    /// Batch indices in the order of this epoch.
    pub order: Vec<usize>,
    /// Position in `order` of the next batch to train on.
    pub next: usize,
    /// Accumulated statistics of the batches done so far.
    pub stats: StepStats,
    /// Training seconds spent so far in this epoch.
    pub seconds: f64,
}

impl EpochMetrics {
    /// Header line matching [`EpochMetrics::csv_row`].
    pub const CSV_HEADER: &'static str =
        "epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds";

    /// The metrics as one CSV line (no newline); missing test figures are empty fields.
    pub fn csv_row(&self) -> String {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
        format!(
            "{},{:.6},{:.6},{},{},{:.3}",
            self.epoch,
            self.train_loss,
            self.train_accuracy,
            opt(self.test_loss),
            opt(self.test_accuracy),
            self.seconds
        )
    }
}

impl EpochState {
    /// Start of epoch `epoch` over `num_batches` batches, in the order of [`batch_order`].
    pub fn new(epoch: usize, num_batches: usize, seed: u64, shuffle: bool) -> Self {
        EpochState {
            epoch,
            order: batch_order(num_batches, seed, epoch, shuffle),
            next: 0,
            stats: StepStats::default(),
            seconds: 0.0,
        }
    }

    /// Whether every batch of the epoch is done.
    pub fn is_done(&self) -> bool {
        self.next >= self.order.len()
    }

    /// Training metrics of the batches done so far (no test figures).
    pub fn metrics(&self) -> EpochMetrics {
        let n = self.stats.samples.max(1) as f64;
        EpochMetrics {
            epoch: self.epoch,
            train_loss: self.stats.loss_sum / n,
            train_accuracy: self.stats.correct as f64 / n,
            test_accuracy: None,
            test_loss: None,
            seconds: self.seconds,
        }
    }
}

/// The order of the batches in epoch `epoch`: `0..num_batches` shuffled by ChaCha8 seeded
/// from `seed` and `epoch` if `shuffle`, else in index order.
pub fn batch_order(num_batches: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..num_batches).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch as u64);
        order.shuffle(&mut rng);
    }
    order
}

/// Forward and backward pass on batch `batch`: the gradients of the mean cross-entropy
/// with respect to every layer, and the batch's loss/accuracy counts. Does not update.
pub fn compute_gradients<F: FirstLayer + ?Sized>(
    model: &Model,
    first_layer: &mut F,
    batch: usize,
) -> Result<(Gradients, StepStats), TrainError> {
    let bsz = first_layer.batch_len(batch);
    if bsz == 0 {
        return Err(TrainError::State(format!(
            "batch {batch} is empty or missing"
        )));
    }
    if first_layer.patches() != model.first_geometry() {
        return Err(TrainError::State(
            "the first layer's products do not fit the model's first layer (a convolution \
             needs a first layer over its patches, a dense layer one over the samples)"
                .into(),
        ));
    }
    let rows = bsz * rows_per_sample(model.first_geometry());
    let w1 = model.first_layer_matrix();
    let z1 = first_layer.forward(batch, w1.view())?;
    check("first-layer output", (rows, w1.nrows()), z1.dim())?;
    let pass = Pass::forward(model, z1, bsz)?;
    let logits = pass.logits();
    let p = softmax(logits.view());
    let e = first_layer.output_error(batch, p.view())?;
    check("output error", p.dim(), e.dim())?;
    let stats = step_stats(logits.view(), p.view(), e.view());

    let (g1, mut grads) = pass.backward(model, e.mapv(|v| v / bsz as f32))?;
    let g1 = first_layer.backward(batch, g1.view())?;
    let k = w1.ncols() - 1;
    check("first-layer gradient", w1.dim(), g1.dim())?;
    grads.insert(
        0,
        DenseGrad {
            dw: g1.slice_axis(Axis(1), Slice::from(..k)).to_owned(),
            db: g1.index_axis(Axis(1), k).to_owned(),
        },
    );
    Ok((Gradients { layers: grads }, stats))
}

/// Loss and accuracy counts of a batch from `Y = round(P - E)`.
fn step_stats(logits: ArrayView2<f32>, p: ArrayView2<f32>, e: ArrayView2<f32>) -> StepStats {
    let logp = log_softmax(logits);
    let preds = argmax_rows(p);
    let mut stats = StepStats {
        samples: p.nrows() as u64,
        ..StepStats::default()
    };
    for b in 0..p.nrows() {
        let mut label = None;
        let mut ones = 0;
        for k in 0..p.ncols() {
            let y = (p[[b, k]] - e[[b, k]]).round();
            if y != 0.0 {
                stats.loss_sum -= (y * logp[[b, k]]) as f64;
            }
            if y == 1.0 {
                ones += 1;
                label = Some(k);
            }
        }
        if ones == 1 && label == Some(preds[b]) {
            stats.correct += 1;
        }
    }
    stats
}

/// The clear part of a forward pass from the first layer's output, kept for the backward
/// pass: the image layers' caches (after the first convolution) and every dense layer's
/// input and output.
struct Pass {
    /// The first layer's output `z_1` (B, first outputs), channel-major for a convolution.
    z1: Array2<f32>,
    /// Caches of the image layers after the first convolution.
    caches: Vec<Cache>,
    /// Index of the first dense layer computed here (1 for a dense network, whose first
    /// layer is the seam's, else 0).
    start: usize,
    /// Input of every dense layer from `start` on.
    inputs: Vec<Array2<f32>>,
    /// Output (pre-activation) of every dense layer from `start` on.
    outputs: Vec<Array2<f32>>,
}

impl Pass {
    /// Runs the network from the seam's `z1` (B*P, H) on a batch of `bsz` samples.
    fn forward(model: &Model, z1: Array2<f32>, bsz: usize) -> Result<Self, TrainError> {
        let act = model.spec().activation;
        let (z1, caches, mut a, start) = if let Some(g) = model.first_geometry() {
            let z1 = positions_to_channels(z1, bsz, g.positions()).map_err(ModelError::from)?;
            let (flat, caches) =
                forward_stack(&model.features()[1..], z1.view()).map_err(ModelError::from)?;
            (z1, caches, flat, 0)
        } else {
            let a = act.forward(z1.view());
            (z1, Vec::new(), a, 1)
        };
        let layers = model.layers();
        let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
        for (k, layer) in layers.iter().enumerate().skip(start) {
            let z = layer.forward(a.view());
            let next = if k + 1 < layers.len() {
                act.forward(z.view())
            } else {
                Array2::zeros((0, 0))
            };
            inputs.push(std::mem::replace(&mut a, next));
            outputs.push(z);
        }
        Ok(Pass {
            z1,
            caches,
            start,
            inputs,
            outputs,
        })
    }

    /// The logits `z_L`.
    fn logits(&self) -> &Array2<f32> {
        self.outputs.last().unwrap_or(&self.z1)
    }

    /// Back-propagates `d = dL/dz_L`: the gradient with respect to the seam's output
    /// (B*P, H), and the gradients of every layer with parameters after the first.
    fn backward(
        self,
        model: &Model,
        mut d: Array2<f32>,
    ) -> Result<(Array2<f32>, Vec<DenseGrad>), TrainError> {
        let act = model.spec().activation;
        let layers = model.layers();
        let mut dense = Vec::with_capacity(self.outputs.len());
        for (i, input) in self.inputs.iter().enumerate().rev() {
            let layer = &layers[self.start + i];
            dense.push(layer.param_grad(input.view(), d.view()));
            let up = layer.input_grad(d.view());
            d = match i.checked_sub(1) {
                Some(prev) => act.backward(self.outputs[prev].view(), input.view(), up.view()),
                None => up,
            };
        }
        dense.reverse();
        if model.first_geometry().is_none() {
            // d is the gradient of a_1 = f(z_1) (or of z_L = z_1 without dense layers).
            if let Some(a1) = self.inputs.first() {
                d = act.backward(self.z1.view(), a1.view(), d.view());
            }
            return Ok((d, dense));
        }
        let (dz1, grads) = backward_stack(&model.features()[1..], &self.caches, d.view())
            .map_err(ModelError::from)?;
        let mut out: Vec<DenseGrad> = grads.into_iter().flatten().collect();
        out.extend(dense);
        let kernels = model.spec().first_width();
        let dz1 = channels_to_positions(dz1.view(), kernels).map_err(ModelError::from)?;
        Ok((dz1, out))
    }
}

fn check(
    what: &'static str,
    expected: (usize, usize),
    got: (usize, usize),
) -> Result<(), TrainError> {
    if expected != got {
        return Err(TrainError::Shape {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// One training step on batch `batch`: gradients, then an optimizer update.
pub fn train_step<F: FirstLayer + ?Sized>(
    model: &mut Model,
    first_layer: &mut F,
    optimizer: &mut Optimizer,
    batch: usize,
) -> Result<StepStats, TrainError> {
    let (grads, stats) = compute_gradients(model, first_layer, batch)?;
    optimizer.step(model, &grads)?;
    Ok(stats)
}

fn progress_bar(show: bool, len: usize, done: usize, epoch: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} batches {msg} [{elapsed_precise}<{eta_precise}]",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(format!("epoch {epoch}"));
    pb.set_position(done as u64);
    pb
}

/// Trains one full epoch: the first layer's batches in the order of [`batch_order`]
/// (`shuffle` = true), with the learning rate of epoch `epoch`, optionally showing a progress
/// bar. Returns the epoch's training metrics (test fields `None`).
pub fn train_epoch<F: FirstLayer + ?Sized>(
    model: &mut Model,
    first_layer: &mut F,
    optimizer: &mut Optimizer,
    epoch: usize,
    seed: u64,
    progress: bool,
) -> Result<EpochMetrics, TrainError> {
    let mut state = EpochState::new(epoch, first_layer.num_batches(), seed, true);
    train_epoch_from(
        model,
        first_layer,
        optimizer,
        &mut state,
        progress,
        |_, _, _, _, _, _| Ok(Flow::Continue),
    )
}

/// Continues the epoch described by `state` from batch position `state.next` to the end.
///
/// After every step `after_step(model, optimizer, first_layer, state, batch, stats)` is
/// called with `state.next` already advanced: a caller can write a [`Checkpoint`] there and
/// later resume from it, which gives the same weights, bit for bit, as an uninterrupted run,
/// or return [`Flow::Stop`] to end the epoch there. A [`crate::first_layer::Quantized`] first
/// layer's rounding stream must be saved and restored too ([`Checkpoint::rounding_stream`]),
/// which is why the callback sees the first layer. Most callers want [`run`].
pub fn train_epoch_from<F, C>(
    model: &mut Model,
    first_layer: &mut F,
    optimizer: &mut Optimizer,
    state: &mut EpochState,
    progress: bool,
    mut after_step: C,
) -> Result<EpochMetrics, TrainError>
where
    F: FirstLayer + ?Sized,
    C: FnMut(&Model, &Optimizer, &F, &EpochState, usize, &StepStats) -> Result<Flow, TrainError>,
{
    let nb = first_layer.num_batches();
    let mut sorted = state.order.clone();
    sorted.sort_unstable();
    if sorted != (0..nb).collect::<Vec<_>>() {
        return Err(TrainError::State(format!(
            "the batch order is not a permutation of the first layer's {nb} batches"
        )));
    }
    if state.next > state.order.len() {
        return Err(TrainError::State(format!(
            "next batch position {} past the end of {}",
            state.next,
            state.order.len()
        )));
    }
    optimizer.set_epoch(state.epoch);
    let pb = progress_bar(progress, state.order.len(), state.next, state.epoch);
    while state.next < state.order.len() {
        let started = Instant::now();
        let batch = state.order[state.next];
        if let Some(&after) = state.order.get(state.next + 1) {
            first_layer.prefetch(after);
        }
        let st = train_step(model, first_layer, optimizer, batch)?;
        if !st.loss_sum.is_finite() {
            return Err(TrainError::Diverged {
                epoch: state.epoch,
                batch,
            });
        }
        state.stats.loss_sum += st.loss_sum;
        state.stats.correct += st.correct;
        state.stats.samples += st.samples;
        state.next += 1;
        state.seconds += started.elapsed().as_secs_f64();
        if !pb.is_hidden() {
            let m = state.metrics();
            pb.set_message(format!(
                "loss {:.4} acc {:.2}%",
                m.train_loss,
                100.0 * m.train_accuracy
            ));
            pb.inc(1);
        }
        if after_step(model, optimizer, first_layer, state, batch, &st)? == Flow::Stop {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(state.metrics())
}

/// Settings of [`fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    /// Number of epochs.
    pub epochs: usize,
    /// Seed of the per-epoch batch orders.
    pub seed: u64,
    /// Shuffle the order of the batches every epoch (their contents never change).
    pub shuffle_batches: bool,
    /// Show a progress bar on the terminal.
    pub progress: bool,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            epochs: 10,
            seed: 0,
            shuffle_batches: true,
            progress: true,
        }
    }
}

/// Trains `cfg.epochs` epochs, evaluating on `test` after each one if given.
pub fn fit<F: FirstLayer + ?Sized>(
    model: &mut Model,
    first_layer: &mut F,
    optimizer: &mut Optimizer,
    test: Option<&Dataset>,
    cfg: &FitConfig,
) -> Result<Vec<EpochMetrics>, TrainError> {
    fit_with(model, first_layer, optimizer, test, cfg, |_, _| Ok(()))
}

/// Like [`fit`], calling `on_epoch(model, metrics)` after each epoch (to print or save).
pub fn fit_with<F, C>(
    model: &mut Model,
    first_layer: &mut F,
    optimizer: &mut Optimizer,
    test: Option<&Dataset>,
    cfg: &FitConfig,
    mut on_epoch: C,
) -> Result<Vec<EpochMetrics>, TrainError>
where
    F: FirstLayer + ?Sized,
    C: FnMut(&Model, &EpochMetrics) -> Result<(), TrainError>,
{
    struct OnEpoch<C>(C);
    impl<F: FirstLayer + ?Sized, C: FnMut(&Model, &EpochMetrics) -> Result<(), TrainError>> Hooks<F>
        for OnEpoch<C>
    {
        fn after_epoch(
            &mut self,
            p: &Progress,
            _: &F,
            m: &EpochMetrics,
        ) -> Result<Flow, TrainError> {
            (self.0)(&p.model, m)?;
            Ok(Flow::Continue)
        }
    }
    let mut progress = Progress {
        model: model.clone(),
        optimizer: optimizer.clone(),
        state: EpochState::new(0, first_layer.num_batches(), cfg.seed, cfg.shuffle_batches),
        history: Vec::new(),
    };
    let settings = RunSettings {
        epochs: cfg.epochs,
        seed: cfg.seed,
        shuffle: cfg.shuffle_batches,
        progress_bar: cfg.progress,
    };
    run(
        first_layer,
        &mut progress,
        &settings,
        test,
        &mut OnEpoch(&mut on_epoch),
    )?;
    *model = progress.model;
    *optimizer = progress.optimizer;
    Ok(progress.history)
}

/// Everything needed to resume training between two batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The model after the last completed step.
    pub model: Model,
    /// The optimizer, moments and step count included.
    pub optimizer: Optimizer,
    /// Position in the current epoch.
    pub state: EpochState,
    /// Metrics of the completed epochs.
    pub history: Vec<EpochMetrics>,
    /// State of the first layer's rounding randomness
    /// ([`crate::first_layer::Quantized::rounding_stream`]; 0 if unused).
    pub rounding_stream: u64,
    /// The run's configuration as (flag, value) pairs: a resumed run must ask for the same
    /// ([`Checkpoint::check_config`]).
    pub config: Vec<(String, String)>,
}

impl Checkpoint {
    /// Checks that `asked` (flag, value) pairs equal the checkpoint's: the first flag whose
    /// value differs, or that one side lacks, is an error naming it.
    pub fn check_config(&self, asked: &[(String, String)]) -> Result<(), TrainError> {
        for (flag, value) in asked {
            let saved = self.config.iter().find(|(f, _)| f == flag).map(|(_, v)| v);
            if saved != Some(value) {
                return Err(TrainError::ConfigMismatch {
                    flag: flag.clone(),
                    saved: saved.cloned().unwrap_or_else(|| "(not recorded)".into()),
                    asked: value.clone(),
                });
            }
        }
        Ok(())
    }

    /// Encodes as magic + version + bincode.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        encode_versioned(&CHECKPOINT_MAGIC, CHECKPOINT_VERSION, "checkpoint", self)
    }

    /// Decodes and validates a checkpoint written by [`Checkpoint::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let c: Checkpoint =
            decode_versioned(&CHECKPOINT_MAGIC, CHECKPOINT_VERSION, "checkpoint", bytes)?;
        c.model.validate()?;
        Ok(c)
    }

    /// Writes atomically: to `path` + `.tmp`, then renamed over `path`, so that a process
    /// killed while saving leaves the previous checkpoint intact.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        crate::model::write_file(&tmp, &self.to_bytes()?)?;
        std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a checkpoint from `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_bytes(&read_file(path.as_ref())?)
    }
}
