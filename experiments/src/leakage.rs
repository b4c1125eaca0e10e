//! `leakage`: what an honest-but-curious trainer can reconstruct from what CryptoNN lets it
//! decrypt, and how much the mitigations take away.
//!
//! # What the trainer holds
//!
//! Training runs exactly as the trainer runs it: [`PlainIntegers`] behind
//! [`cryptonn::secure::KeyPolicyFilter`] and [`Quantized`] (the simulation, which equals the encrypted run bit
//! for bit). A [`Recorder`] sits at the integer seam, between the key policy and the products,
//! and keeps only what crosses it in an encrypted run: the vectors the trainer asks keys for
//! and the integers it decrypts with them. With `X_int` the batch's pixel integers plus the
//! bias input 255 (shape `B x (n+1)`, `n = 784`), `H` first-layer units and `K` classes, a
//! step on batch `k` gives the trainer
//!
//! ```text
//! forward     w_q (H x (n+1), its weight rows, the row keys)   z_int = X_int w_q^T   (B x H)
//! backward    d_q (B x H, its deltas, the column keys)         g_int = d_q^T X_int   (H x (n+1))
//! output      a_q (B x K)                                      e_int = a_q - 4096 Y  (B x K)
//! ```
//!
//! The batch partition is public (the client encrypted fixed batches), so the trainer knows
//! which equations belong to which batch; image indices are used only to score the attacks.
//!
//! # Real FE steps
//!
//! With `--fe-steps N` (default 2) the first `N` steps of the unmitigated run of the first
//! seed also run with the real encrypted backend, as `accuracy`'s lockstep steps do
//! ([`crate::fe_env::FeEnv`]): an authority on 127.0.0.1, the client's encryption of the
//! batches those steps visit, the trainer's [`SecureProducts`] asking for keys over TCP and
//! decrypting. The encrypted run is a [`crate::fe_env::Shadow`] stepped by the simulation's
//! hook inside the one training loop, with its own [`Recorder`] between the key policy and
//! the secure products. After every such step the integers it decrypted (`z_int`, `g_int`
//! with the deltas `d_q`, `e_int`) and its weights must equal the simulation's, or the
//! experiment stops with an error. A separate attacker, fed only the decrypted values, then
//! runs the one-step backward attack; its estimates must equal the simulation attacker's.
//! Each real step gives one row of `leakage.csv` with `source = fe` (the simulation's rows
//! have `source = simulation`), attack `backward_step`, mitigation `none`, scored on the
//! images of that step's batch only (`images` = the batch, `label_accuracy` over the batch,
//! `equations` = the step's delta rank); the summary has a table of these steps. The
//! plots and the other tables use the simulation's rows only.
//!
//! # Attacks
//!
//! * **labels**: `e_int[b, k] = a_q[b, k] - 4096 [k = y_b]`, and `0 <= a_q <= 4096`, so the
//!   label is the index of the smallest entry (exact unless the network is already certain,
//!   `a_q[b, y_b] = 4096`, where every entry is 0: then nothing is read, and the label read
//!   at an earlier visit stands).
//! * **backward_step**: one step's `g_int = d_q^T X_int` is `H` equations per pixel column in
//!   the `B` unknowns of that column, with the same matrix `d_q^T` for every column. The
//!   minimum-norm least-squares solution `X = (d_q^T)^+ g_int` (SVD, singular values below
//!   `1e-10 σ_max` dropped) is exact when `rank(d_q) = B`, which needs `H >= B`; the estimate
//!   is rounded and clamped to `0..=255`. Per image the trainer keeps the estimate of the
//!   step with the largest rank (the latest one among equals).
//! * **backward_stacked**: the batch partition is fixed, so every epoch gives `H` more
//!   equations on the same `X_int`. Stacking all steps on batch `k` gives the normal equations
//!   `(Σ_t d_t d_t^T) X = Σ_t d_t g_t` (`B x B`, accumulated exactly: every entry is an
//!   integer below 2^53), solved with the pseudo-inverse (singular values below `1e-11 σ_max`
//!   dropped). With `B > H` one step is not enough, but `ceil(B / H)` epochs are.
//! * **forward_ls**: every step on batch `k` gives `H` equations per image,
//!   `w_q[:, :n] x = z_int[b, :]^T - 255 w_q[:, n]` (the bias input is known), with the same
//!   matrix for the whole batch. After `e` epochs an image has `m = e H` equations (minus rows
//!   the key policy zeroed) in `n` unknowns, of rank `k <= min(m, n)` (below `m` when the
//!   weights stop changing); the minimum-norm least-squares solution `A^+ r` is computed from
//!   the SVD `A = U S V^T` reduced to the `k` singular values above `1e-10 σ_max` (see
//!   [`RowSpace`]), rounded and clamped. It is unique, hence exact up to rounding, once
//!   `k = n`: for 128 units after 7 epochs. The `equations` column reports `k`.
//! * **forward_lp** (Ioniță and Ioniță, RAID 2025): when `m < n`, the box `0 <= x <= 255`
//!   makes a linear program much stronger than least squares on sparse images like MNIST's:
//!   `minimize Σ_i x_i subject to A x = r, 0 <= x_i <= 255` (simplex, `microlp`, on the
//!   equivalent orthonormal rows `V_k^T x = S_k^{-1} U_k^T r` of the reduced SVD, see
//!   [`LpSystem`]), rounded. Solved for the first `--lp-images` images of the
//!   forward sample at the end of each of the first `--lp-epochs` epochs while `k < n`; when
//!   `k = n` the least-squares solution is unique and is used.
//!
//! # Scores
//!
//! Per attack, mitigation and scoring step: the share of the targeted training images whose
//! estimate equals the original in every pixel (`recovered_exact`), is within one grey level
//! in every pixel (`recovered_within_1`), the mean PSNR `10 log10(255^2 / MSE)` over the images
//! with an estimate (an exact image counts as [`PSNR_CAP`] dB), the share equal to what the
//! client encrypted (`exact_vs_encrypted`, which differs from the original only under input
//! noise), the label accuracy of the labels attack over all training images, and the model's
//! test accuracy at that step. The backward attacks target every training image, the forward
//! ones the images of `--forward-batches` evenly spaced batches.
//!
//! # Mitigations
//!
//! * `batch=N`: batches of `N` samples. With `N > H`, `rank(d_q) <= H < N`, so one step no
//!   longer determines a batch (the stacked attack still does after `ceil(N / H)` epochs).
//! * `noise=SIGMA`: the client adds Gaussian noise of standard deviation `SIGMA` grey levels
//!   to every training pixel before encryption, rounds and clamps to `0..=255`
//!   ([`add_input_noise`]). Each image is noised once, so the trainer's repeated views are
//!   post-processing. As a Gaussian mechanism on one image with L2 sensitivity `Δ` it is
//!   `μ`-GDP with `μ = Δ / σ`, hence `(ε, δ)`-DP for the `ε` of [`gaussian_epsilon`]
//!   (Balle and Wang's analytic bound): for the whole image `Δ = 255 sqrt(784)` (any image
//!   may be replaced by any other), for a single pixel `Δ = 255`. Both are printed; at useful
//!   noise levels they are far from a meaningful guarantee.

use crate::common::{progress, CommonArgs, Stopwatch, Summary, TrainArgs};
use crate::fe_env::{self, FeEnv, Remap, Shadow};
use crate::plot::{self, LineChart, Panel, Series, COLORS};
use crate::table::{pct, write_csv, Table};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use cryptonn::protocol::AuthorityClient;
use cryptonn::secure::{KeyPolicyFilter, SecureProducts};
use nalgebra::DMatrix;
use ndarray::{Array2, ArrayView1, ArrayView2, Axis, Slice};
use nn::data::Dataset;
use nn::first_layer::{IntegerProducts, PlainIntegers, Quantized, SeamError};
use nn::train::{EpochState, Flow, Progress, RunSettings, StepFn, TrainError};
use rand::SeedableRng;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

/// PSNR given to an exactly recovered image (whose mean squared error is 0), in dB.
pub const PSNR_CAP: f64 = 100.0;

/// Mixed into the run's seed for the input noise, so that noise and initialization differ.
const NOISE_SEED: u64 = 0x6e6f_6973;

/// A chart of the plots: file base, y label, value of a row.
type Chart = (&'static str, &'static str, fn(&Row) -> f64);

/// The attacks, in the order of the CSV rows.
pub const ATTACKS: [&str; 5] = [
    "backward_step",
    "backward_stacked",
    "backward_cross",
    "forward_ls",
    "forward_lp",
];

/// The `source` of a row computed on the simulation's integers.
pub const SOURCE_SIMULATION: &str = "simulation";

/// The `source` of a row computed on the integers decrypted in a real FE step.
pub const SOURCE_FE: &str = "fe";

/// Columns of `leakage.csv`.
pub const COLUMNS: [&str; 18] = [
    "attack",
    "mitigation",
    "seed",
    "step",
    "epoch",
    "batch_size",
    "images",
    "attacked",
    "recovered_exact",
    "recovered_within_1",
    "psnr_db",
    "exact_vs_encrypted",
    "label_accuracy",
    "test_accuracy",
    "test_accuracy_cost",
    "equations",
    "seconds",
    "source",
];

/// Options of `leakage`.
#[derive(Args, Debug, Clone)]
pub struct LeakageArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Layer widths; the first must be 784. Default: CryptoNN's network.
    #[arg(long, default_value = "784-128-32-10")]
    pub spec: String,
    /// Hidden activation: sigmoid (CryptoNN's), relu or tanh.
    #[arg(long, default_value = "sigmoid")]
    pub activation: nn::activation::Activation,
    /// Epochs of every run.
    #[arg(long, default_value_t = 8)]
    pub epochs: usize,
    /// Batch size of the unmitigated run (the README's default, 64).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Bits of the quantized first-layer weights and deltas.
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Adam learning rate (the trainer's default).
    #[arg(long, default_value_t = cryptonn::trainer::TrainConfig::default().lr)]
    pub lr: f32,
    /// Seed of initialization, batch order and input noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seeds per mitigation (seed, seed+1, ...); accuracy costs are paired with the
    /// unmitigated run of the same seed.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Further seeds (after the attacked ones) trained without the attacks, only for the
    /// accuracy cost of each mitigation paired with the unmitigated run of the same seed.
    #[arg(long, default_value_t = 0)]
    pub cost_seeds: u64,
    /// Mitigations to measure, comma-separated: `none`, or parts joined by `+`: `batch=N`
    /// (batches of N samples), `noise=SIGMA` (Gaussian noise of SIGMA grey levels on the
    /// client's inputs), `bound` (column keys bound to their batch), `budget=R` (bound, with
    /// a rank budget of R per batch), for example `batch=256+budget=192`.
    #[arg(long, default_value = "none,batch=256,noise=8,noise=32,budget=32", value_parser = parse_mitigations)]
    pub mitigations: MitigationList,
    /// Batches whose images the forward attacks target, evenly spaced (0: every batch).
    #[arg(long, default_value_t = 4)]
    pub forward_batches: usize,
    /// Images (the first of the forward sample) the linear-programming attack solves at every
    /// epoch end while the forward system is underdetermined.
    #[arg(long, default_value_t = 8)]
    pub lp_images: usize,
    /// Epochs (from the first) at whose end the linear programs are solved while the system
    /// is underdetermined (0: every such epoch). The programs near `m = n` take the longest
    /// and clean images are exact from the second epoch on.
    #[arg(long, default_value_t = 4)]
    pub lp_epochs: usize,
    /// Time limit of one linear program, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub lp_time_limit: f64,
    /// Steps at which the attacks are scored besides every epoch end.
    #[arg(long, default_value = "1,2,5,10,20,50", value_parser = crate::common::parse_list_arg)]
    pub score_steps: crate::common::List,
    /// Images in the picture of originals beside reconstructions.
    #[arg(long, default_value_t = 8)]
    pub grid: usize,
    /// Stop every run after this many steps (for quick checks).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
    /// The first N steps of the unmitigated run (first seed) also run with real FE: an
    /// authority on 127.0.0.1, the client's encrypted batches, key requests over TCP and
    /// decryption. Every decrypted integer must equal the simulation's (an error otherwise),
    /// and the one-step backward attack runs on the decrypted values (rows with source
    /// `fe`). 0: simulation only.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub fe_steps: usize,
}

/// A mitigation measured against the attacks: any combination of its parts (all off: the
/// default settings).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Mitigation {
    /// Batches of this many samples.
    pub batch: Option<usize>,
    /// Gaussian noise of this standard deviation (grey levels) on the client's inputs.
    pub noise: Option<f64>,
    /// Column keys bound to their batch (the authority's default; `none` is CryptoNN's single
    /// column key, `authority serve --shared-column-key`).
    pub bound: bool,
    /// A rank budget per batch (`--batch-rank-budget`; implies `bound`).
    pub budget: Option<usize>,
}

impl Mitigation {
    /// The default settings.
    pub const NONE: Mitigation = Mitigation {
        batch: None,
        noise: None,
        bound: false,
        budget: None,
    };

    /// The name used in `leakage.csv` (`none`, `batch=256`, `noise=8`, `bound`,
    /// `batch=512+budget=511`).
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.batch {
            parts.push(format!("batch={n}"));
        }
        if let Some(x) = self.noise {
            parts.push(format!("noise={x}"));
        }
        match self.budget {
            Some(r) => parts.push(format!("budget={r}")),
            None if self.bound => parts.push("bound".into()),
            None => {}
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("+")
        }
    }

    /// The batch size of its runs: its own, or `default` (the unmitigated run's).
    pub fn batch_size(&self, default: usize) -> usize {
        self.batch.unwrap_or(default)
    }

    /// Whether a column key decrypts its own batch only.
    pub fn binds(&self) -> bool {
        self.bound || self.budget.is_some()
    }

    /// A file-name form of [`Mitigation::name`].
    fn file_name(&self) -> String {
        self.name().replace('=', "").replace(['.', '+'], "_")
    }
}

/// A list of mitigations (the value of `--mitigations`).
#[derive(Debug, Clone, PartialEq)]
pub struct MitigationList(pub Vec<Mitigation>);

/// Parses `none,batch=256,noise=8,bound,batch=512+budget=511`: mitigations separated by
/// commas, each `none` or parts joined by `+`.
pub fn parse_mitigations(s: &str) -> Result<MitigationList, String> {
    let mut v = Vec::new();
    for item in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut m = Mitigation::NONE;
        if item != "none" {
            for part in item.split('+').map(str::trim) {
                parse_part(&mut m, part, item)?;
            }
        }
        v.push(m);
    }
    if v.is_empty() {
        return Err("no mitigation given (use none for the default settings)".into());
    }
    Ok(MitigationList(v))
}

/// One `+`-separated part of a mitigation.
fn parse_part(m: &mut Mitigation, part: &str, item: &str) -> Result<(), String> {
    let count = |n: &str, what: &str| match n.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{item:?}: the {what} must be a positive integer")),
    };
    match part.split_once('=') {
        None if part == "bound" => m.bound = true,
        Some(("batch", n)) => m.batch = Some(count(n, "batch size")?),
        Some(("budget", n)) => m.budget = Some(count(n, "rank budget")?),
        Some(("noise", x)) => match x.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => m.noise = Some(x),
            _ => return Err(format!("{item:?}: the noise must be a positive number")),
        },
        _ => {
            return Err(format!(
                "{part:?} is not a mitigation (none, or parts joined by +: batch=N, \
                 noise=SIGMA, bound, budget=R)"
            ))
        }
    }
    Ok(())
}

/// [`Dataset::with_noise`] with draws seeded by `seed`: the client's `--input-noise`, made
/// reproducible for the experiment (the client draws from the operating system).
pub fn add_input_noise(data: &Dataset, sigma: f64, seed: u64) -> Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok(data.with_noise(sigma, &mut rng)?)
}

/// `ln erfc(x)` for `x >= 0`, with relative error below 1.2e-7 in `erfc` (the Chebyshev
/// fit of Numerical Recipes, `erfcc`), in log form so that it does not underflow.
fn ln_erfc(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t.ln() - x * x + poly
}

/// `ln Φ(x)`, Φ the standard normal distribution function.
fn ln_phi(x: f64) -> f64 {
    let r = -x / std::f64::consts::SQRT_2;
    if r >= 0.0 {
        ln_erfc(r) - std::f64::consts::LN_2
    } else {
        // Φ(x) = 1 - Φ(-x) with Φ(-x) <= 1/2.
        (1.0 - 0.5 * ln_erfc(-r).exp()).ln()
    }
}

/// The smallest `ε` for which the Gaussian mechanism with L2 sensitivity `sensitivity` and
/// noise `sigma` is `(ε, δ)`-DP, by the exact (analytic) bound of Balle and Wang (ICML 2018):
/// `δ(ε) = Φ(Δ/(2σ) - εσ/Δ) - e^ε Φ(-Δ/(2σ) - εσ/Δ)`, solved by bisection. Infinite for
/// `sigma = 0`.
pub fn gaussian_epsilon(sensitivity: f64, sigma: f64, delta: f64) -> f64 {
    if sigma <= 0.0 || sensitivity <= 0.0 {
        return if sensitivity <= 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
    }
    let mu = sensitivity / sigma;
    let delta_of = |eps: f64| {
        let a = mu / 2.0 - eps / mu;
        let b = -mu / 2.0 - eps / mu;
        let (la, lb) = (ln_phi(a), eps + ln_phi(b));
        if lb >= la {
            0.0
        } else {
            la.exp() * (1.0 - (lb - la).exp())
        }
    };
    if delta_of(0.0) <= delta {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, mu * mu / 2.0 + 40.0 * mu + 40.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if delta_of(mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// One step on the forward seam: the weight rows asked keys for, and the decrypted products.
#[derive(Debug, Clone)]
struct ForwardObservation {
    /// `w_q` as floats (exact integers), `H x (n+1)`.
    w: Array2<f64>,
    /// `z_int` as floats (exact integers), `B x H`.
    z: Array2<f64>,
}

/// The normal equations of every backward step on one batch so far.
#[derive(Debug, Clone)]
struct Stacked {
    /// `Σ_t d_t d_t^T`, `B x B`.
    gram: Array2<f64>,
    /// `Σ_t d_t g_t`, `B x (n+1)`.
    rhs: Array2<f64>,
    /// Steps stacked.
    steps: usize,
}

/// [`IntegerProducts`] that records what the trainer holds (the vectors it asks keys for and
/// the integers it decrypts) and passes everything through unchanged.
#[derive(Debug, Clone)]
pub struct Recorder<P> {
    inner: P,
    /// Image indices of every batch (the public batch partition, used for scoring).
    ranges: Vec<Range<usize>>,
    /// Whether the forward observations of a batch are kept.
    keep_forward: Vec<bool>,
    forward: BTreeMap<usize, Vec<ForwardObservation>>,
    stacked: BTreeMap<usize, Stacked>,
    /// `Σ d d^T` over the delta vectors of every backward step, whatever its batch (`B x B`;
    /// batches share their length): what unbound column keys give on any batch.
    cross_gram: Option<Array2<f64>>,
    /// The latest forward step: batch and `z_int` (B x H).
    last_forward: Option<(usize, Array2<i64>)>,
    /// The latest backward step: batch, `d_q` (B x H) and `g_int` (H x (n+1)).
    last_backward: Option<(usize, Array2<i64>, Array2<i64>)>,
    /// The latest output error: batch and `e_int` (B x K).
    last_error: Option<(usize, Array2<i64>)>,
    /// Label per training image read from `a - y` (latest), if seen.
    labels: Vec<Option<u8>>,
}

impl<P: IntegerProducts> Recorder<P> {
    /// Records around `inner`, whose batch `k` holds the images `ranges[k]`; forward
    /// observations are kept for the batches marked in `keep_forward`.
    pub fn new(inner: P, ranges: Vec<Range<usize>>, keep_forward: Vec<bool>) -> Self {
        let n = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        Recorder {
            inner,
            ranges,
            keep_forward,
            forward: BTreeMap::new(),
            stacked: BTreeMap::new(),
            cross_gram: None,
            last_forward: None,
            last_backward: None,
            last_error: None,
            labels: vec![None; n],
        }
    }

    /// The wrapped products.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Which of the integers decrypted at the latest step (`z_int`, `d_q` with `g_int`,
    /// `e_int`, each with its batch) differ from `other`'s, if any.
    pub fn latest_difference<Q>(&self, other: &Recorder<Q>) -> Option<&'static str> {
        if self.last_forward != other.last_forward {
            Some("the forward products z = X w_q^T")
        } else if self.last_backward != other.last_backward {
            Some("the backward products g = d_q^T X (or their deltas)")
        } else if self.last_error != other.last_error {
            Some("the output errors a - y")
        } else {
            None
        }
    }

    /// The labels read from the output errors so far, per training image.
    pub fn labels(&self) -> &[Option<u8>] {
        &self.labels
    }

    fn range(&self, batch: usize) -> Result<Range<usize>, SeamError> {
        self.ranges
            .get(batch)
            .cloned()
            .ok_or(SeamError::NoSuchBatch {
                batch,
                num_batches: self.ranges.len(),
            })
    }
}

fn to_f64(m: ArrayView2<i64>) -> Array2<f64> {
    m.mapv(|v| v as f64)
}

impl<P: IntegerProducts> IntegerProducts for Recorder<P> {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let z = self.inner.forward_int(batch, w_q)?;
        self.last_forward = Some((batch, z.clone()));
        if self.keep_forward.get(batch).copied().unwrap_or(false) {
            self.forward
                .entry(batch)
                .or_default()
                .push(ForwardObservation {
                    w: to_f64(w_q),
                    z: to_f64(z.view()),
                });
        }
        Ok(z)
    }

    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let g = self.inner.backward_int(batch, delta_q)?;
        let d = to_f64(delta_q);
        // Integers below 2^53 throughout, so these float products are exact.
        let dd = d.dot(&d.t());
        let dg = d.dot(&to_f64(g.view()));
        match self.cross_gram.as_mut() {
            Some(c) if c.dim() == dd.dim() => *c += &dd,
            Some(_) => {} // a batch of another length: its keys fit no other batch
            None => self.cross_gram = Some(dd.clone()),
        }
        match self.stacked.get_mut(&batch) {
            Some(st) => {
                st.gram += &dd;
                st.rhs += &dg;
                st.steps += 1;
            }
            None => {
                self.stacked.insert(
                    batch,
                    Stacked {
                        gram: dd,
                        rhs: dg,
                        steps: 1,
                    },
                );
            }
        }
        self.last_backward = Some((batch, delta_q.to_owned(), g.clone()));
        Ok(g)
    }

    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let e = self.inner.output_error_int(batch, a_q)?;
        self.last_error = Some((batch, e.clone()));
        let range = self.range(batch)?;
        for (row, img) in e.rows().into_iter().zip(range) {
            if let Some(slot) = self.labels.get_mut(img) {
                // A label once read stays read: a later certain prediction gives no label.
                if let Some(label) = label_from_error(row) {
                    *slot = Some(label);
                }
            }
        }
        Ok(e)
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

    fn prefetch(&mut self, batch: usize) {
        self.inner.prefetch(batch)
    }
}

/// The label in one row of `a_q - 4096 Y`: the index of the smallest entry, `None` when
/// the smallest is not unique (an all-zero row, from a certain prediction).
pub fn label_from_error(row: ArrayView1<i64>) -> Option<u8> {
    let min = row.iter().copied().min()?;
    let mut at = row
        .iter()
        .enumerate()
        .filter(|(_, &v)| v == min)
        .map(|(k, _)| k);
    match (at.next(), at.next()) {
        (Some(k), None) => u8::try_from(k).ok(),
        _ => None, // a tie (a certain prediction: every entry 0) says nothing
    }
}

fn to_dmatrix(m: ArrayView2<f64>) -> DMatrix<f64> {
    DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| m[[i, j]])
}

fn from_dmatrix(m: &DMatrix<f64>) -> Array2<f64> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)])
}

/// Minimum-norm least-squares solution of `a x = b` (all columns of `b` at once) by SVD,
/// dropping singular values below `rel_tol σ_max`; returns it with the numerical rank.
pub fn lstsq(a: ArrayView2<f64>, b: ArrayView2<f64>, rel_tol: f64) -> Result<(Array2<f64>, usize)> {
    if a.nrows() != b.nrows() {
        bail!(
            "least squares: {} equations but {} right-hand sides",
            a.nrows(),
            b.nrows()
        );
    }
    let svd = to_dmatrix(a).svd(true, true);
    let smax = svd.singular_values.iter().cloned().fold(0.0, f64::max);
    if smax == 0.0 {
        return Ok((Array2::zeros((a.ncols(), b.ncols())), 0));
    }
    let tol = smax * rel_tol;
    let rank = svd.rank(tol);
    let x = svd
        .solve(&to_dmatrix(b), tol)
        .map_err(|e| anyhow!("least squares failed: {e}"))?;
    Ok((from_dmatrix(&x), rank))
}

/// The first `n` entries of `v`.
fn head(v: ArrayView1<f64>, n: usize) -> ArrayView1<f64> {
    let n = n.min(v.len());
    v.slice_axis_move(Axis(0), Slice::from(0..n))
}

/// Rounds and clamps an estimate to pixel integers.
fn to_pixels(x: ArrayView1<f64>) -> Vec<u8> {
    x.iter()
        .map(|v| {
            if v.is_finite() {
                v.round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        })
        .collect()
}

/// The stacked forward system of one batch: `A` (m x n) over the pixels and `R` (m x B),
/// rows the key policy zeroed left out.
fn forward_system(obs: &[ForwardObservation], n: usize) -> (Array2<f64>, Array2<f64>) {
    // The bias input: the byte images this experiment handles have the bound 255.
    let bias = f64::from(u8::MAX);
    let mut rows = Vec::new();
    for o in obs {
        for j in 0..o.w.nrows() {
            if o.w.row(j).iter().any(|v| *v != 0.0) {
                rows.push((o, j));
            }
        }
    }
    let b = obs.first().map(|o| o.z.nrows()).unwrap_or(0);
    let mut a = Array2::zeros((rows.len(), n));
    let mut r = Array2::zeros((rows.len(), b));
    for (i, (o, j)) in rows.iter().enumerate() {
        a.row_mut(i).assign(&head(o.w.row(*j), n));
        let wb = o.w[[*j, n]];
        for s in 0..b {
            r[[i, s]] = o.z[[s, *j]] - bias * wb;
        }
    }
    (a, r)
}

/// A forward system `A x = r` (`m x n`) reduced to its row space by the SVD
/// `A = U S V^T`: the orthonormal rows `V_k^T` (`k x n`, `k = rank A`, singular values below
/// `1e-10 σ_max` dropped) and the map `S_k^{-1} U_k^T` (`k x m`) of right-hand sides, so that
/// `A x = r` (consistent) is `V_k^T x = S_k^{-1} U_k^T r`. Repeated or dependent equations
/// (weights that stopped changing) do not count: what decides uniqueness is `k`, not `m`.
struct RowSpace {
    vt: Array2<f64>,
    map: Array2<f64>,
}

impl RowSpace {
    fn of(a: ArrayView2<f64>) -> Result<Self> {
        let (m, n) = a.dim();
        if m == 0 {
            return Ok(RowSpace {
                vt: Array2::zeros((0, n)),
                map: Array2::zeros((0, 0)),
            });
        }
        let svd = to_dmatrix(a).svd(true, true);
        let (u, vt) = match (&svd.u, &svd.v_t) {
            (Some(u), Some(vt)) => (u, vt),
            _ => bail!("the SVD of a {m} x {n} forward system failed"),
        };
        let sv = &svd.singular_values;
        let smax = sv.iter().cloned().fold(0.0, f64::max);
        let keep: Vec<usize> = (0..sv.len()).filter(|&i| sv[i] > 1e-10 * smax).collect();
        Ok(RowSpace {
            vt: Array2::from_shape_fn((keep.len(), n), |(k, j)| vt[(keep[k], j)]),
            map: Array2::from_shape_fn((keep.len(), m), |(k, i)| u[(i, keep[k])] / sv[keep[k]]),
        })
    }

    /// The rank of the system.
    fn rank(&self) -> usize {
        self.vt.nrows()
    }

    /// The minimum-norm least-squares solutions for the right-hand sides `r` (`m x B`),
    /// one row per column of `r`.
    fn min_norm(&self, r: ArrayView2<f64>) -> Array2<f64> {
        self.vt.t().dot(&self.map.dot(&r)).reversed_axes()
    }
}

/// The constraints of the box-constrained linear program of the forward attack,
/// `min Σ x subject to A x = r, 0 <= x <= 255`, on one batch's forward system, made well
/// conditioned once for all its images: with the QR factorization `A^T = Q R`, `A x = r`
/// is `Q^T x = R^{-T} r`, whose rows are orthonormal, and the pixels are scaled to
/// `u = x / 255` in `[0, 1]`. (The raw rows, up to 768 dense ones of 8-bit integers, make the
/// simplex declare consistent systems infeasible.) When `R` is singular the raw rows, each
/// scaled by its largest entry, are used instead.
#[derive(Debug, Clone)]
pub struct LpSystem {
    /// Constraint rows, `m x n`.
    rows: Array2<f64>,
    /// `R` of the factorization (`m x m`), or `None` for raw rows.
    r: Option<DMatrix<f64>>,
    /// Per-row scales of the raw rows.
    scales: Vec<f64>,
    /// The map of right-hand sides of a system reduced to its row space
    /// ([`LpSystem::from_row_space`]).
    map: Option<Array2<f64>>,
}

impl LpSystem {
    /// The constraints of a system reduced to its row space: `V_k^T x = S_k^{-1} U_k^T r`
    /// (any number of equations, dependent ones included).
    fn from_row_space(rs: &RowSpace) -> Self {
        LpSystem {
            rows: rs.vt.clone(),
            r: None,
            scales: vec![1.0; rs.rank()],
            map: Some(rs.map.clone()),
        }
    }

    /// Prepares the constraints of `a x = r` (`a` is `m x n`).
    pub fn new(a: ArrayView2<f64>) -> Self {
        let (m, n) = a.dim();
        if m > 0 && m <= n {
            let qr = to_dmatrix(a.t()).qr();
            let r = qr.r();
            let dmax = (0..m).map(|i| r[(i, i)].abs()).fold(0.0, f64::max);
            if (0..m).all(|i| r[(i, i)].abs() > 1e-9 * dmax) {
                let q = qr.q();
                return LpSystem {
                    rows: from_dmatrix(&q.transpose()),
                    r: Some(r),
                    scales: vec![1.0; m],
                    map: None,
                };
            }
        }
        let scales = a
            .rows()
            .into_iter()
            .map(|row| row.iter().fold(0.0f64, |m, v| m.max(v.abs())))
            .collect();
        LpSystem {
            rows: a.to_owned(),
            r: None,
            scales,
            map: None,
        }
    }

    /// Solves the program for the right-hand side `r` (length `m`); the pixels (in
    /// `0..=255`, as floats) or `None` when the solver finds no solution within
    /// `time_limit` seconds. An equality system the solver calls infeasible is retried with
    /// every equation relaxed to `±1e-6` (in units of `u`, far below a grey level).
    pub fn solve(&self, r: ArrayView1<f64>, time_limit: f64) -> Option<Vec<f64>> {
        let rhs: Vec<f64> = match (&self.r, &self.map) {
            (_, Some(map)) => map.dot(&r).iter().map(|v| v / 255.0).collect(),
            (Some(rm), None) => {
                let b = DMatrix::from_fn(r.len(), 1, |i, _| r[i] / 255.0);
                let c = rm.transpose().solve_lower_triangular(&b)?;
                c.iter().cloned().collect()
            }
            (None, None) => r
                .iter()
                .zip(&self.scales)
                .map(|(v, s)| if *s > 0.0 { v / (255.0 * s) } else { 0.0 })
                .collect(),
        };
        match self.program(&rhs, 0.0, time_limit) {
            Ok(x) => x,
            Err(microlp::Error::Infeasible) => self.program(&rhs, 1e-6, time_limit).ok().flatten(),
            Err(_) => None,
        }
    }

    /// One program with the equations relaxed to `±band`: the pixels, `None` if the time
    /// limit came first.
    fn program(
        &self,
        rhs: &[f64],
        band: f64,
        time_limit: f64,
    ) -> Result<Option<Vec<f64>>, microlp::Error> {
        use microlp::{ComparisonOp, OptimizationDirection, Problem};
        let mut p = Problem::new(OptimizationDirection::Minimize);
        if time_limit.is_finite() && time_limit > 0.0 {
            p.set_time_limit(Duration::from_secs_f64(time_limit));
        }
        let vars: Vec<_> = (0..self.rows.ncols())
            .map(|_| p.add_var(1.0, (0.0, 1.0)))
            .collect();
        for ((row, &b), &scale) in self.rows.rows().into_iter().zip(rhs).zip(&self.scales) {
            if scale == 0.0 {
                continue;
            }
            let expr = || -> Vec<(microlp::Variable, f64)> {
                vars.iter()
                    .zip(row.iter())
                    .filter(|(_, c)| **c != 0.0)
                    .map(|(v, c)| (*v, c / scale))
                    .collect()
            };
            if band == 0.0 {
                p.add_constraint(expr(), ComparisonOp::Eq, b);
            } else {
                p.add_constraint(expr(), ComparisonOp::Le, b + band);
                p.add_constraint(expr(), ComparisonOp::Ge, b - band);
            }
        }
        let outcome = p.solve()?;
        Ok(outcome
            .solution()
            .map(|sol| vars.iter().map(|v| 255.0 * sol.var_value_raw(*v)).collect()))
    }
}

/// Scores of one attack at one step.
#[derive(Debug, Clone, Default)]
pub(crate) struct Score {
    pub(crate) images: usize,
    pub(crate) attacked: usize,
    pub(crate) exact: f64,
    pub(crate) within_1: f64,
    pub(crate) psnr: f64,
    pub(crate) exact_encrypted: f64,
    pub(crate) equations: f64,
}

/// Compares estimates with the originals (and with what the client encrypted).
pub(crate) fn score(
    targets: &[usize],
    estimate: &dyn Fn(usize) -> Option<Vec<u8>>,
    original: &Dataset,
    encrypted: &Dataset,
) -> Score {
    let (mut attacked, mut exact, mut within, mut psnr, mut exact_enc) = (0, 0, 0, 0.0, 0);
    for &i in targets {
        let Some(est) = estimate(i) else { continue };
        attacked += 1;
        let orig = original.values.row(i);
        let enc = encrypted.values.row(i);
        let mut sq = 0.0;
        let mut max_diff = 0u16;
        for (&e, &o) in est.iter().zip(orig.iter()) {
            let d = u16::from(e).abs_diff(o);
            max_diff = max_diff.max(d);
            sq += (d as f64).powi(2);
        }
        exact += usize::from(max_diff == 0);
        within += usize::from(max_diff <= 1);
        exact_enc += usize::from(est.iter().zip(enc.iter()).all(|(&a, &b)| u16::from(a) == b));
        let mse = sq / est.len().max(1) as f64;
        psnr += if mse == 0.0 {
            PSNR_CAP
        } else {
            (10.0 * (255.0f64.powi(2) / mse).log10()).min(PSNR_CAP)
        };
    }
    let n = targets.len().max(1) as f64;
    Score {
        images: targets.len(),
        attacked,
        exact: exact as f64 / n,
        within_1: within as f64 / n,
        psnr: if attacked > 0 {
            psnr / attacked as f64
        } else {
            f64::NAN
        },
        exact_encrypted: exact_enc as f64 / n,
        equations: f64::NAN,
    }
}

/// One row of `leakage.csv`.
#[derive(Debug, Clone)]
struct Row {
    attack: &'static str,
    mitigation: Mitigation,
    seed: u64,
    step: usize,
    epoch: f64,
    batch_size: usize,
    score: Score,
    label_accuracy: f64,
    test_accuracy: f64,
    cost: f64,
    seconds: f64,
    /// Whose integers the attack ran on: [`SOURCE_SIMULATION`] or [`SOURCE_FE`].
    source: &'static str,
}

impl Row {
    fn csv(&self) -> Vec<String> {
        let f = |v: f64| {
            if v.is_finite() {
                format!("{v:.6}")
            } else {
                String::new()
            }
        };
        vec![
            self.attack.into(),
            self.mitigation.name(),
            self.seed.to_string(),
            self.step.to_string(),
            format!("{:.4}", self.epoch),
            self.batch_size.to_string(),
            self.score.images.to_string(),
            self.score.attacked.to_string(),
            f(self.score.exact),
            f(self.score.within_1),
            if self.score.psnr.is_finite() {
                format!("{:.3}", self.score.psnr)
            } else {
                String::new()
            },
            f(self.score.exact_encrypted),
            f(self.label_accuracy),
            f(self.test_accuracy),
            f(self.cost),
            if self.score.equations.is_finite() {
                format!("{:.1}", self.score.equations)
            } else {
                String::new()
            },
            format!("{:.2}", self.seconds),
            self.source.into(),
        ]
    }
}

/// Estimates of the grid images after one epoch and at the end, per attack.
type Snapshots = BTreeMap<&'static str, Vec<(usize, Vec<Option<Vec<u8>>>)>>;

/// What one run (one mitigation, one seed) produced.
struct RunOutput {
    rows: Vec<Row>,
    final_accuracy: f64,
    grid_images: Vec<usize>,
    snapshots: Snapshots,
    encrypted: Dataset,
    steps_per_epoch: usize,
    /// Digest of the final model's weights ([`crate::common::model_digest`]).
    model_digest: String,
    /// The real FE steps, when the run had any.
    fe: Option<FeReport>,
}

/// The attacker's running state between scoring points.
struct Attacker {
    /// Per training image: the rank of the system its best single-step estimate came from,
    /// and the estimate.
    step_best: Vec<Option<(usize, Vec<u8>)>>,
    /// Ranks of the single-step systems seen (for the `equations` column).
    step_ranks: Vec<usize>,
}

impl Attacker {
    /// The single-step backward attack on the latest backward step.
    fn after_step<P>(&mut self, rec: &Recorder<P>) -> Result<()> {
        let Some((batch, d, g)) = &rec.last_backward else {
            return Ok(());
        };
        let range = rec
            .ranges
            .get(*batch)
            .cloned()
            .ok_or_else(|| anyhow!("batch {batch} has no image range"))?;
        let n = g.ncols() - 1;
        let dt = to_f64(d.t());
        let (x, rank) = lstsq(dt.view(), to_f64(g.view()).view(), 1e-10)?;
        self.step_ranks.push(rank);
        for (b, img) in range.enumerate() {
            let slot = &mut self.step_best[img];
            if slot.as_ref().is_none_or(|(r, _)| rank >= *r) {
                *slot = Some((rank, to_pixels(head(x.row(b), n))));
            }
        }
        Ok(())
    }
}

/// The trainer's first layer over the real encrypted batches, recorded the same way.
type FeLayer = Quantized<KeyPolicyFilter<Recorder<Remap<SecureProducts<AuthorityClient>>>>>;

/// One real FE step of the unmitigated run, for the summary table.
#[derive(Debug, Clone)]
struct FeStep {
    step: usize,
    batch: usize,
    /// Rank of the step's delta matrix.
    rank: usize,
    /// Images of the batch recovered exactly from the decrypted values.
    exact: usize,
    images: usize,
    /// Labels of the batch read correctly from the decrypted `a - y`.
    labels: usize,
    seconds: f64,
    keys: u64,
    decryptions: u64,
}

/// What the real FE steps produced: CSV rows (source [`SOURCE_FE`]) and per-step facts.
#[derive(Debug, Clone, Default)]
struct FeReport {
    rows: Vec<Row>,
    steps: Vec<FeStep>,
    /// Batches (and images) the client encrypted.
    batches: usize,
    images: usize,
    encryption_seconds: f64,
    /// Requests that issued keys, from the authority's audit log.
    key_requests: usize,
}

/// The first steps of a run repeated with real FE beside the simulation: the encrypted run
/// is a [`Shadow`] stepped by the simulation's hook, its [`Recorder`] keeps what the trainer
/// decrypts, and its own [`Attacker`] sees only those decrypted values.
struct FeSteps {
    env: FeEnv,
    /// The encrypted steps' own threads: on the global pool, a thread waiting inside a
    /// step would steal whole training runs of other mitigations and time them as the step.
    pool: rayon::ThreadPool,
    shadow: Shadow<FeLayer>,
    attacker: Attacker,
    max: usize,
    report: FeReport,
}

impl FeSteps {
    /// Starts an authority, lets the client encrypt the batches the first `max` steps visit
    /// and opens the trainer's secure layer over them.
    #[allow(clippy::too_many_arguments)]
    fn start(
        encrypted: &Dataset,
        source: &str,
        bs: usize,
        ranges: &[Range<usize>],
        cfg: &cryptonn::trainer::TrainConfig,
        epochs: usize,
        initial: &nn::model::Model,
        max: usize,
    ) -> Result<Self> {
        let nb = ranges.len();
        let batches = fe_env::visited_batches(nb, cfg.seed, epochs, max);
        let subset = fe_env::batches_subset(encrypted, bs, &batches)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("fe-step-{i}"))
            .build()
            .context("starting the threads of the real FE steps")?;
        let env = pool.install(|| FeEnv::start(bs, &subset, source, false))?;
        let dlog = pool.install(fe_env::dlog_table)?;
        let products = Remap::new(env.products(dlog)?, nb, bs, &batches);
        let recorder = Recorder::new(products, ranges.to_vec(), vec![false; nb]);
        let layer = Quantized::new(
            crate::common::policy_filter(recorder, &encrypted.info, bs),
            cfg.quantizer(),
        )?;
        let report = FeReport {
            batches: batches.len(),
            images: subset.len(),
            encryption_seconds: env.encryption.seconds,
            ..FeReport::default()
        };
        Ok(FeSteps {
            env,
            pool,
            shadow: Shadow::new(layer, initial, cfg.optimizer()),
            attacker: Attacker {
                step_best: vec![None; encrypted.len()],
                step_ranks: Vec::new(),
            },
            max,
            report,
        })
    }

    /// Repeats the simulation's step `step` (just done, seen in `view`) with real FE, checks
    /// that every decrypted integer and the weights equal the simulation's, attacks the
    /// decrypted values and scores the step's batch. `sim_best` is the simulation attacker's
    /// estimates after the same step, which must equal this one's.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        view: &nn::train::StepView<'_, AttackedLayer>,
        step: usize,
        sim_best: &[Option<(usize, Vec<u8>)>],
        original: &Dataset,
        encrypted: &Dataset,
        test: &Dataset,
        mitigation: Mitigation,
        seed: u64,
        clock: &Stopwatch,
    ) -> Result<()> {
        let (epoch, batch) = (view.state.epoch, view.batch);
        let secure = |s: &Self| s.shadow.layer.inner().inner().inner().inner().timings();
        let before = secure(self);
        let t = Stopwatch::start();
        let (pool, shadow) = (&self.pool, &mut self.shadow);
        let stats = pool
            .install(|| shadow.step(epoch, batch))
            .with_context(|| format!("real FE step {step} (epoch {epoch}, batch {batch})"))?;
        let seconds = t.secs();
        let timings = secure(self).since(&before);
        let sim = view.layer.inner().inner();
        let rec = self.shadow.layer.inner().inner();
        if let Some(what) = rec.latest_difference(sim) {
            bail!(
                "real FE step {step} (epoch {epoch}, batch {batch}): {what} decrypted with FE \
                 differ from the simulation's; they must be equal integer for integer, so this \
                 is a bug"
            );
        }
        if &stats != view.stats || self.shadow.model.to_bytes()? != view.model.to_bytes()? {
            bail!(
                "real FE step {step} (epoch {epoch}, batch {batch}): the weights after the \
                 encrypted step differ from the simulation's although every decrypted integer \
                 was equal; this is a bug"
            );
        }
        self.attacker.after_step(rec)?;
        let range = rec
            .ranges
            .get(batch)
            .cloned()
            .ok_or_else(|| anyhow!("batch {batch} has no image range"))?;
        if range
            .clone()
            .any(|i| self.attacker.step_best[i] != sim_best[i])
        {
            bail!(
                "real FE step {step}: the backward attack on the decrypted values gives other \
                 images than on the simulation's, from equal integers; this is a bug"
            );
        }
        let targets: Vec<usize> = range.collect();
        let best = |i: usize| self.attacker.step_best[i].as_ref().map(|(_, e)| e.clone());
        let mut sc = score(&targets, &best, original, encrypted);
        let rank = self.attacker.step_ranks.last().copied().unwrap_or(0);
        sc.equations = rank as f64;
        let labels = targets
            .iter()
            .filter(|&&i| rec.labels()[i] == Some(encrypted.labels[i]))
            .count();
        let nb = rec.ranges.len().max(1);
        self.report.rows.push(Row {
            attack: "backward_step",
            mitigation,
            seed,
            step,
            epoch: step as f64 / nb as f64,
            batch_size: targets.len(),
            score: sc.clone(),
            label_accuracy: labels as f64 / targets.len().max(1) as f64,
            test_accuracy: nn::eval::evaluate(&self.shadow.model, test)?.accuracy,
            cost: f64::NAN,
            seconds: clock.secs(),
            source: SOURCE_FE,
        });
        self.report.steps.push(FeStep {
            step,
            batch,
            rank,
            exact: (sc.exact * targets.len() as f64).round() as usize,
            images: targets.len(),
            labels,
            seconds,
            keys: timings.keys_received,
            decryptions: timings.decryptions,
        });
        Ok(())
    }

    /// The report, with the authority's count of key requests.
    fn finish(mut self) -> FeReport {
        self.report.key_requests = self.env.audit_lines();
        self.report
    }
}

/// Evenly spaced batches for the forward attacks (`count` = 0: all).
fn forward_sample(nb: usize, count: usize) -> Vec<usize> {
    if count == 0 || count >= nb {
        return (0..nb).collect();
    }
    (0..count).map(|i| i * nb / count).collect()
}

/// Trains one run as the trainer does and plays the curious trainer at the scoring steps;
/// when attacked, its first `fe_steps` steps are also run with real FE ([`FeSteps`]).
fn run_one(
    args: &LeakageArgs,
    data: &crate::common::Data,
    mitigation: Mitigation,
    seed: u64,
    attack: bool,
    fe_steps: usize,
    pb: &indicatif::ProgressBar,
) -> Result<RunOutput> {
    let bs = mitigation.batch_size(args.batch_size);
    let encrypted = match mitigation.noise {
        Some(sigma) => add_input_noise(&data.train, sigma, seed ^ NOISE_SEED)?,
        None => data.train.clone(),
    };
    let targs = TrainArgs {
        spec: Some(args.spec.clone()),
        activation: Some(args.activation),
        epochs: Some(args.epochs),
        batch_size: Some(bs),
        lr: Some(args.lr),
        optimizer: None,
        lr_schedule: None,
        seed,
    };
    let cfg = targs.config(args.bits, args.epochs)?;
    let products = PlainIntegers::from_dataset(encrypted.clone(), bs, true)
        .with_context(|| format!("cutting {} images into batches of {bs}", encrypted.len()))?;
    let nb = products.batches().len();
    let ranges: Vec<Range<usize>> = (0..nb)
        .map(|b| products.batches().range(b).unwrap_or(0..0))
        .collect();
    let fwd_batches = forward_sample(nb, args.forward_batches);
    let mut keep = vec![false; nb];
    for &b in &fwd_batches {
        keep[b] = attack;
    }
    let fwd_images: Vec<usize> = fwd_batches
        .iter()
        .flat_map(|&b| ranges[b].clone())
        .collect();
    let lp_images: Vec<usize> = fwd_images.iter().take(args.lp_images).cloned().collect();
    let grid_images: Vec<usize> = fwd_images.iter().take(args.grid).cloned().collect();
    let all_images: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
    let n = encrypted.features();

    let recorder = Recorder::new(products, ranges.clone(), keep);
    // The authority's policy under this mitigation: the trainer filters by it as it does
    // in an encrypted run (a rank budget zeroes the delta lanes past it).
    let policy = cryptonn::authority::Policy {
        // `none` is CryptoNN as published: one column key for every batch.
        bind_batches: mitigation.binds(),
        batch_rank_budget: mitigation.budget,
        ..cryptonn::authority::Policy::default()
    }
    .with_lengths(encrypted.info.row_len(), bs);
    policy
        .validate()
        .map_err(|e| anyhow!("{}: {e}", mitigation.name()))?;
    let mut layer = Quantized::new(KeyPolicyFilter::new(recorder, &policy), cfg.quantizer())?;
    let mut progress = Progress {
        model: targs.model(&encrypted.info)?,
        optimizer: cfg.optimizer(),
        state: EpochState::new(0, nb, cfg.seed, true),
        history: Vec::new(),
    };
    let total = nb * args.epochs;
    let last = args.max_steps.map_or(total, |m| m.min(total));
    let mut score_at: Vec<usize> = args
        .score_steps
        .0
        .iter()
        .map(|&s| s as usize)
        .chain((1..=args.epochs).map(|e| e * nb))
        .filter(|&s| attack && s >= 1 && s <= last)
        .chain(std::iter::once(last))
        .collect();
    score_at.sort_unstable();
    score_at.dedup();
    let fe_max = if attack { fe_steps.min(last) } else { 0 };
    let mut fe = if fe_max > 0 {
        Some(
            FeSteps::start(
                &encrypted,
                &data.source,
                bs,
                &ranges,
                &cfg,
                args.epochs,
                &progress.model,
                fe_max,
            )
            .context("starting the real FE steps")?,
        )
    } else {
        None
    };

    let mut attacker = Attacker {
        step_best: vec![None; encrypted.len()],
        step_ranks: Vec::new(),
    };
    let mut rows = Vec::new();
    let mut snapshots: Snapshots = BTreeMap::new();
    let mut lp_est: Vec<Option<Vec<u8>>> = vec![None; lp_images.len()];
    let mut step = 0usize;
    let mut failure: Option<anyhow::Error> = None;
    let mut final_accuracy = f64::NAN;
    let clock = Stopwatch::start();
    let settings = RunSettings {
        epochs: args.epochs,
        seed: cfg.seed,
        shuffle: true,
        progress_bar: false,
    };
    {
        let mut hook = StepFn::new(|view: &nn::train::StepView<'_, AttackedLayer>| {
            let (model, layer) = (view.model, view.layer);
            step += 1;
            pb.inc(1);
            let rec = layer.inner().inner();
            let mut go = || -> Result<()> {
                if attack {
                    attacker.after_step(rec)?;
                }
                if let Some(fe) = fe.as_mut().filter(|f| step <= f.max) {
                    fe.step(
                        view,
                        step,
                        &attacker.step_best,
                        &data.train,
                        &encrypted,
                        &data.test,
                        mitigation,
                        seed,
                        &clock,
                    )?;
                }
                if score_at.binary_search(&step).is_err() {
                    return Ok(());
                }
                let test_accuracy = nn::eval::evaluate(model, &data.test)?.accuracy;
                final_accuracy = test_accuracy;
                if !attack {
                    return Ok(());
                }
                let labels = rec.labels();
                let label_accuracy = all_images
                    .iter()
                    .filter(|&&i| labels[i] == Some(encrypted.labels[i]))
                    .count() as f64
                    / all_images.len().max(1) as f64;
                let epoch_end = step.is_multiple_of(nb);
                let lp_epoch = args.lp_epochs == 0 || step / nb <= args.lp_epochs;
                let mut push = |attack: &'static str, score: Score| {
                    rows.push(Row {
                        attack,
                        mitigation,
                        seed,
                        step,
                        epoch: step as f64 / nb as f64,
                        batch_size: bs,
                        score,
                        label_accuracy,
                        test_accuracy,
                        cost: f64::NAN,
                        seconds: clock.secs(),
                        source: SOURCE_SIMULATION,
                    })
                };
                // backward_step
                let best = |i: usize| attacker.step_best[i].as_ref().map(|(_, e)| e.clone());
                let mut sc = score(&all_images, &best, &data.train, &encrypted);
                sc.equations = attacker.step_ranks.iter().sum::<usize>() as f64
                    / attacker.step_ranks.len().max(1) as f64;
                push("backward_step", sc);
                // backward_stacked
                let mut stacked_est: Vec<Option<Vec<u8>>> = vec![None; encrypted.len()];
                let mut ranks = Vec::new();
                for (&b, st) in &rec.stacked {
                    let (x, rank) = lstsq(st.gram.view(), st.rhs.view(), 1e-11)?;
                    ranks.push(rank);
                    for (k, img) in ranges[b].clone().enumerate() {
                        stacked_est[img] = Some(to_pixels(head(x.row(k), n)));
                    }
                }
                let mut sc = score(
                    &all_images,
                    &|i| stacked_est[i].clone(),
                    &data.train,
                    &encrypted,
                );
                sc.equations = ranks.iter().sum::<usize>() as f64 / ranks.len().max(1) as f64;
                push("backward_stacked", sc);
                // backward_cross: unbound keys applied to every batch
                let cross_est = if mitigation.binds() {
                    None
                } else {
                    let est = cross_batch_estimates(rec, &encrypted, &ranges)?;
                    let mut sc = score(&all_images, &|i| est.0[i].clone(), &data.train, &encrypted);
                    sc.equations = est.1 as f64;
                    push("backward_cross", sc);
                    Some(est.0)
                };
                // forward_ls and forward_lp
                let mut fwd_est: Vec<Option<Vec<u8>>> = vec![None; encrypted.len()];
                let mut eqs = Vec::new();
                let mut fwd_rank: BTreeMap<usize, usize> = BTreeMap::new();
                for (&b, obs) in &rec.forward {
                    let (a, r) = forward_system(obs, n);
                    let rs = RowSpace::of(a.view())?;
                    eqs.push(rs.rank());
                    fwd_rank.insert(b, rs.rank());
                    let x = rs.min_norm(r.view());
                    for (k, img) in ranges[b].clone().enumerate() {
                        fwd_est[img] = Some(to_pixels(x.row(k)));
                    }
                    if !epoch_end || rs.rank() >= n || !lp_epoch {
                        continue;
                    }
                    let mut system = None;
                    for (slot, &img) in lp_est.iter_mut().zip(&lp_images) {
                        if !ranges[b].contains(&img) {
                            continue;
                        }
                        let k = img - ranges[b].start;
                        let sys = system.get_or_insert_with(|| LpSystem::from_row_space(&rs));
                        *slot = sys
                            .solve(r.column(k), args.lp_time_limit)
                            .map(|v| to_pixels(ArrayView1::from(&v)));
                    }
                }
                let eq_mean = eqs.iter().sum::<usize>() as f64 / eqs.len().max(1) as f64;
                let mut sc = score(
                    &fwd_images,
                    &|i| fwd_est[i].clone(),
                    &data.train,
                    &encrypted,
                );
                sc.equations = eq_mean;
                push("forward_ls", sc);
                if epoch_end {
                    // Where the system is no longer underdetermined, the (unique) least
                    // squares solution stands in for the linear program.
                    let lp_of = |i: usize| -> Option<Vec<u8>> {
                        let pos = lp_images.iter().position(|&j| j == i)?;
                        let b = ranges.iter().position(|r| r.contains(&i))?;
                        if fwd_rank.get(&b).is_some_and(|&k| k >= n) {
                            fwd_est[i].clone()
                        } else {
                            lp_est[pos].clone()
                        }
                    };
                    // Past --lp-epochs no program was solved: no row while the system is
                    // underdetermined, rather than the estimates of an earlier epoch.
                    let lp_scored = lp_epoch || eqs.iter().all(|&m| m >= n);
                    if lp_scored {
                        let mut sc = score(&lp_images, &lp_of, &data.train, &encrypted);
                        sc.equations = eq_mean;
                        push("forward_lp", sc);
                    }
                    let grid_of = |f: &dyn Fn(usize) -> Option<Vec<u8>>| -> Vec<Option<Vec<u8>>> {
                        grid_images.iter().map(|&i| f(i)).collect()
                    };
                    let ep = step / nb;
                    snapshots
                        .entry("backward_step")
                        .or_default()
                        .push((ep, grid_of(&best)));
                    snapshots
                        .entry("backward_stacked")
                        .or_default()
                        .push((ep, grid_of(&|i| stacked_est[i].clone())));
                    if let Some(est) = &cross_est {
                        snapshots
                            .entry("backward_cross")
                            .or_default()
                            .push((ep, grid_of(&|i| est[i].clone())));
                    }
                    snapshots
                        .entry("forward_ls")
                        .or_default()
                        .push((ep, grid_of(&|i| fwd_est[i].clone())));
                    if lp_scored {
                        snapshots
                            .entry("forward_lp")
                            .or_default()
                            .push((ep, grid_of(&lp_of)));
                    }
                }
                Ok(())
            };
            if let Err(e) = go() {
                failure = Some(e);
                return Err(TrainError::State("the attack failed".into()));
            }
            Ok(if step >= last {
                Flow::Stop
            } else {
                Flow::Continue
            })
        });
        let r = nn::train::run(&mut layer, &mut progress, &settings, None, &mut hook);
        if let Some(e) = failure.take() {
            return Err(e.context(format!("attacking step {step} ({})", mitigation.name())));
        }
        r.map_err(|e| {
            anyhow::Error::from(e).context(format!("training ({}, seed {seed})", mitigation.name()))
        })?;
    }
    Ok(RunOutput {
        rows,
        final_accuracy,
        grid_images,
        snapshots,
        encrypted,
        steps_per_epoch: nb,
        model_digest: crate::common::model_digest(&progress.model)?,
        fe: fe.map(FeSteps::finish),
    })
}

/// The cross-batch attack on unbound column keys: every delta vector the trainer was ever
/// issued a key for decrypts its combination of *every* batch's columns, so for each batch
/// the normal equations are `C X = C X_k` with `C = Σ d d^T` over all steps (the right side
/// is what those keys decrypt), solved by the projection `C^+ C` onto their span. Returns
/// the estimate per training image and the rank of `C`.
fn cross_batch_estimates<P>(
    rec: &Recorder<P>,
    encrypted: &Dataset,
    ranges: &[Range<usize>],
) -> Result<(Vec<Option<Vec<u8>>>, usize)> {
    let mut est = vec![None; encrypted.len()];
    let Some(c) = &rec.cross_gram else {
        return Ok((est, 0));
    };
    let (proj, rank) = lstsq(c.view(), c.view(), 1e-11)?;
    let n = encrypted.features();
    for range in ranges.iter().filter(|r| r.len() == c.nrows()) {
        let x = Array2::from_shape_fn((range.len(), n), |(k, j)| {
            f64::from(encrypted.values[[range.start + k, j]])
        });
        let xhat = proj.dot(&x);
        for (k, img) in range.clone().enumerate() {
            est[img] = Some(to_pixels(xhat.row(k)));
        }
    }
    Ok((est, rank))
}

/// The trainer's first layer over the recording products.
type AttackedLayer = Quantized<KeyPolicyFilter<Recorder<PlainIntegers>>>;

/// Runs the experiment: every mitigation and seed, the CSV, the pictures and the summary.
pub fn run(args: &LeakageArgs) -> Result<Summary> {
    let clock = Stopwatch::start();
    if args.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let data = args.common.load()?;
    let info = &data.train.info;
    if info.x_bound != u32::from(u8::MAX) || info.image.is_none_or(|s| s.channels != 1) {
        bail!(
            "the leakage experiment reconstructs grey images of bytes (values 0..=255), but \
             the data is {info}"
        );
    }
    let out = args.common.out_dir()?;
    let mitigations = &args.mitigations.0;
    let all_seeds: Vec<u64> = (0..args.seeds + args.cost_seeds)
        .map(|i| args.seed + i)
        .collect();
    let steps_of = |m: &Mitigation| {
        let bs = m.batch_size(args.batch_size);
        let total = (data.train.len() / bs.max(1)) * args.epochs;
        args.max_steps.map_or(total, |s| s.min(total)) as u64
    };
    let pb = progress(
        args.common.quiet,
        mitigations.iter().map(steps_of).sum::<u64>() * all_seeds.len() as u64,
        "leakage",
    );
    let mut rows = Vec::new();
    let mut finals: BTreeMap<(String, u64), f64> = BTreeMap::new();
    let mut first_runs: Vec<(Mitigation, RunOutput)> = Vec::new();
    // The real FE steps belong to the (first) unmitigated run of the first seed.
    let fe_run = mitigations.iter().position(|m| *m == Mitigation::NONE);
    if args.fe_steps > 0 && fe_run.is_none() {
        eprintln!(
            "leakage: no unmitigated run (mitigation none), so no real FE steps (--fe-steps {})",
            args.fe_steps
        );
    }
    // Every (seed, mitigation) run is independent: run them side by side on all cores.
    let jobs: Vec<(u64, Mitigation, bool, usize)> = all_seeds
        .iter()
        .flat_map(|&seed| {
            mitigations.iter().enumerate().map(move |(k, &m)| {
                let fe = if seed == args.seed && Some(k) == fe_run {
                    args.fe_steps
                } else {
                    0
                };
                (seed, m, seed < args.seed + args.seeds, fe)
            })
        })
        .collect();
    let outputs: Vec<(u64, Mitigation, RunOutput)> = jobs
        .par_iter()
        .map(|&(seed, m, attack, fe)| {
            run_one(args, &data, m, seed, attack, fe, &pb).map(|o| (seed, m, o))
        })
        .collect::<Result<_>>()?;
    pb.finish_and_clear();
    let mut fe_report: Option<FeReport> = None;
    for (seed, m, mut o) in outputs {
        finals.insert((m.name(), seed), o.final_accuracy);
        if seed >= args.seed + args.seeds {
            continue;
        }
        rows.extend(o.rows.iter().cloned());
        if let Some(fe) = o.fe.take() {
            rows.extend(fe.rows.iter().cloned());
            fe_report = Some(fe);
        }
        if seed == args.seed {
            first_runs.push((m, o));
        }
    }
    // Accuracy cost: each run's final test accuracy minus the unmitigated run's, same seed.
    let cost_of = |m: &Mitigation, seed: u64| -> f64 {
        match (
            finals.get(&(m.name(), seed)),
            finals.get(&(Mitigation::NONE.name(), seed)),
        ) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        }
    };
    for r in rows.iter_mut() {
        r.cost = cost_of(&r.mitigation, r.seed);
    }
    let csv_rows: Vec<Vec<String>> = rows.iter().map(Row::csv).collect();
    write_csv(&out.join("leakage.csv"), &COLUMNS, &csv_rows)?;
    let cost_rows: Vec<Vec<String>> = all_seeds
        .iter()
        .flat_map(|&seed| mitigations.iter().map(move |m| (seed, m)))
        .map(|(seed, m)| {
            let acc = finals.get(&(m.name(), seed)).copied().unwrap_or(f64::NAN);
            let base = finals
                .get(&(Mitigation::NONE.name(), seed))
                .copied()
                .unwrap_or(f64::NAN);
            vec![
                m.name(),
                seed.to_string(),
                (seed < args.seed + args.seeds).to_string(),
                format!("{acc:.6}"),
                format!("{base:.6}"),
                format!("{:.6}", base - acc),
            ]
        })
        .collect();
    write_csv(
        &out.join("leakage_cost.csv"),
        &[
            "mitigation",
            "seed",
            "attacked",
            "test_accuracy",
            "unmitigated_test_accuracy",
            "test_accuracy_cost",
        ],
        &cost_rows,
    )?;

    let mut figures = plot_results(out, &rows, args.seed, mitigations)?;
    for (m, o) in &first_runs {
        let name = format!("leakage_grid_{}.png", m.file_name());
        write_grid(&out.join(&name), &data.train, o)?;
        figures.push(name);
    }

    // Tables.
    let mut t = Table::new(
        "What the trainer recovers at the end of each run (seed ".to_string()
            + &args.seed.to_string()
            + ")",
        &[
            "mitigation",
            "attack",
            "step",
            "images",
            "exact",
            "within 1",
            "PSNR (dB)",
            "= encrypted",
            "labels",
            "test accuracy",
            "accuracy cost",
        ],
    );
    for (m, o) in &first_runs {
        for attack in ATTACKS {
            let Some(r) = o.rows.iter().rev().find(|r| r.attack == attack) else {
                continue;
            };
            let costs: Vec<f64> = all_seeds.iter().map(|&s| cost_of(m, s)).collect();
            t.row(vec![
                m.name(),
                attack.into(),
                format!("{} ({:.2} epochs)", r.step, r.epoch),
                r.score.images.to_string(),
                pct(r.score.exact),
                pct(r.score.within_1),
                db(r.score.psnr),
                pct(r.score.exact_encrypted),
                pct(r.label_accuracy),
                pct(r.test_accuracy),
                if *m == Mitigation::NONE {
                    "(baseline)".into()
                } else {
                    paired_cost(&costs)
                },
            ]);
        }
    }
    t.note(format!(
        "exact / within 1: share of the targeted training images whose every pixel equals the \
         original (is within one grey level); the backward attacks target all training images, \
         the forward ones the {} images of {} evenly spaced batches (the LP the first {} of \
         them). PSNR: mean over images with an estimate, exact = {PSNR_CAP} dB. = encrypted: \
         share equal to what the client encrypted (differs from exact only under input noise). \
         labels: share of training images whose label the trainer read from a - y. Accuracy cost: final test \
         accuracy of the unmitigated run minus the mitigated one's, same seed{}.",
        first_runs
            .first()
            .and_then(|(_, o)| o.rows.iter().find(|r| r.attack == "forward_ls"))
            .map_or(0, |r| r.score.images),
        args.forward_batches,
        args.lp_images,
        if all_seeds.len() > 1 {
            format!(
                " (mean ± standard error over seeds {} to {})",
                args.seed,
                args.seed + all_seeds.len() as u64 - 1
            )
        } else {
            String::new()
        }
    ));
    t.note(format!(
        "Final model digests (SHA-256 of the weights, seed {}): {}.",
        args.seed,
        first_runs
            .iter()
            .map(|(m, o)| format!("{} {}", m.name(), o.model_digest))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for m in mitigations {
        if let Some(sigma) = &m.noise {
            t.note(format!(
                "{}: Gaussian mechanism with σ = {sigma} grey levels; at δ = 1e-5 it is ε = {:.1} \
                 per image (L2 sensitivity 255·28 = 7140) and ε = {:.2} per pixel (sensitivity \
                 255), by the analytic bound of Balle and Wang (2018).",
                m.name(),
                gaussian_epsilon(255.0 * 28.0, *sigma, 1e-5),
                gaussian_epsilon(255.0, *sigma, 1e-5)
            ));
        }
    }
    let mut progress_t = Table::new(
        format!("Unmitigated run over training (seed {})", args.seed),
        &[
            "step",
            "epochs",
            "attack",
            "exact",
            "within 1",
            "PSNR (dB)",
            "equations",
            "test accuracy",
        ],
    );
    if let Some((_, o)) = first_runs.iter().find(|(m, _)| *m == Mitigation::NONE) {
        for r in &o.rows {
            progress_t.row(vec![
                r.step.to_string(),
                format!("{:.2}", r.epoch),
                r.attack.into(),
                pct(r.score.exact),
                pct(r.score.within_1),
                db(r.score.psnr),
                if r.score.equations.is_finite() {
                    format!("{:.0}", r.score.equations)
                } else {
                    "-".into()
                },
                pct(r.test_accuracy),
            ]);
        }
        progress_t.note(format!(
            "equations: for backward_step the mean rank of the single-step delta matrices so far, \
             for backward_stacked the mean rank of the stacked systems, for backward_cross the \
             rank of all delta vectors issued so far, for the forward attacks the rank of the \
             forward system per image (independent equations; unknowns: {} pixels); {} steps \
             per epoch.",
            data.train.features(),
            o.steps_per_epoch
        ));
    }
    let mut tables = vec![t, progress_t];
    if let Some(fe) = &fe_report {
        tables.push(fe_table(fe, args.seed));
    }
    let fe_done = fe_report.as_ref().map_or(0, |f| f.steps.len());
    Ok(Summary {
        name: "leakage".into(),
        description: format!(
            "An honest-but-curious trainer's reconstruction of the training images and labels \
             from what it decrypts (z = W1 x, δᵀX, a − y) while training {} ({}, batch {}, \
             {}-bit, {} epochs, simulation = FE bit for bit) on the {}; mitigations: {}. {}",
            args.spec,
            args.activation,
            args.batch_size,
            args.bits,
            args.epochs,
            data.source,
            mitigations
                .iter()
                .map(Mitigation::name)
                .collect::<Vec<_>>()
                .join(", "),
            if fe_done > 0 {
                format!(
                    "The first {fe_done} steps of the unmitigated run also ran with real FE \
                     (authority, encrypted batches, key requests, decryption): every decrypted \
                     integer equal to the simulation's."
                )
            } else {
                "No real FE steps (--fe-steps 0 or no unmitigated run).".into()
            }
        ),
        tables,
        figures,
        csv: vec!["leakage.csv".into(), "leakage_cost.csv".into()],
        seconds: clock.secs(),
        command: crate::common::command_line(),
    })
}

/// The table of the real FE steps.
fn fe_table(fe: &FeReport, seed: u64) -> Table {
    let mut t = Table::new(
        format!("The backward attack on really decrypted values: the first steps of the unmitigated run with FE (seed {seed})"),
        &[
            "step",
            "batch",
            "decrypted = simulation",
            "delta rank",
            "images recovered exactly",
            "labels read",
            "keys",
            "decryptions",
            "encrypted step",
        ],
    );
    for s in &fe.steps {
        t.row(vec![
            s.step.to_string(),
            s.batch.to_string(),
            "yes".into(),
            s.rank.to_string(),
            format!("{} / {}", s.exact, s.images),
            format!("{} / {}", s.labels, s.images),
            s.keys.to_string(),
            s.decryptions.to_string(),
            format!("{:.2} s", s.seconds),
        ]);
    }
    let (exact, images) = fe
        .steps
        .iter()
        .fold((0, 0), |(e, n), s| (e + s.exact, n + s.images));
    t.note(format!(
        "An authority on 127.0.0.1 (key requests over TCP; {} in its audit log), the \
         client's encryption of the {} batches these steps visit ({} images, {:.1} s), the \
         trainer's secure first layer decrypting z = X w_qᵀ, δᵀX and a − y. decrypted = \
         simulation: every decrypted integer and the weights after the step equal the \
         simulation's (the run stops with an error otherwise). The one-step backward attack on \
         the decrypted δᵀX alone recovered {exact} of the {images} images of these batches \
         exactly (rows with source fe in leakage.csv).",
        fe.key_requests, fe.batches, fe.images, fe.encryption_seconds
    ));
    t
}

/// A PSNR for the tables ("-" when no image had an estimate).
fn db(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "-".into()
    }
}

/// Accuracy costs (fractions) as points: one value, or mean ± standard error.
fn paired_cost(costs: &[f64]) -> String {
    let v: Vec<f64> = costs.iter().cloned().filter(|c| c.is_finite()).collect();
    match v.len() {
        0 => "-".into(),
        1 => format!("{:+.2} pt", 100.0 * v[0]),
        k => {
            let mean = v.iter().sum::<f64>() / k as f64;
            let var = v.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
            format!(
                "{:+.2} ± {:.2} pt",
                100.0 * mean,
                100.0 * (var / k as f64).sqrt()
            )
        }
    }
}

fn plot_results(
    out: &Path,
    rows: &[Row],
    seed: u64,
    mitigations: &[Mitigation],
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let charts: [Chart; 2] = [
        ("leakage", "share recovered exactly", |r| r.score.exact),
        ("leakage_psnr", "mean PSNR (dB)", |r| r.score.psnr),
    ];
    for (base, what, y) in charts {
        let panels: Vec<Panel> = ATTACKS
            .iter()
            .map(|&attack| {
                let series = mitigations
                    .iter()
                    .enumerate()
                    .map(|(k, m)| {
                        let pts = rows
                            .iter()
                            .filter(|r| {
                                r.attack == attack
                                    && r.mitigation == *m
                                    && r.seed == seed
                                    && r.source == SOURCE_SIMULATION
                            })
                            .map(|r| (r.epoch, y(r)))
                            .filter(|p| p.1.is_finite())
                            .collect();
                        Series::new(m.name(), pts, COLORS[k % COLORS.len()])
                    })
                    .collect();
                let mut c = LineChart::new(attack, "epochs of training", what, series);
                if base == "leakage" {
                    c.y_range = Some((0.0, 1.02));
                }
                Panel::Lines(c)
            })
            .collect();
        files.extend(plot::save(
            out,
            base,
            &format!("What the trainer reconstructs from what it decrypts: {what} (seed {seed})"),
            &panels,
        )?);
    }
    Ok(files)
}

/// Writes a PNG of the grid images: originals (and the noisy inputs when they differ) beside
/// every attack's reconstruction after the first epoch and at the end.
fn write_grid(path: &Path, original: &Dataset, o: &RunOutput) -> Result<()> {
    use plotters::prelude::*;
    let zoom = 3i32;
    let shape = original
        .info
        .image
        .ok_or_else(|| anyhow!("the data has no image shape to draw"))?;
    let (h, w) = (shape.height as i32, shape.width as i32);
    let cell = (w * zoom + 6, h * zoom + 6);
    let noisy = o
        .grid_images
        .iter()
        .any(|&i| original.values.row(i) != o.encrypted.values.row(i));
    let mut columns: Vec<(String, Vec<Option<Vec<u8>>>)> = Vec::new();
    let take = |i: usize, d: &Dataset| Some(d.values.row(i).iter().map(|&v| v as u8).collect());
    columns.push((
        "original".into(),
        o.grid_images.iter().map(|&i| take(i, original)).collect(),
    ));
    if noisy {
        columns.push((
            "encrypted".into(),
            o.grid_images
                .iter()
                .map(|&i| take(i, &o.encrypted))
                .collect(),
        ));
    }
    for attack in ATTACKS {
        let Some(snaps) = o.snapshots.get(attack) else {
            continue;
        };
        let mut picks = Vec::new();
        if let Some(first) = snaps.first() {
            picks.push(first);
        }
        if let Some(last) = snaps.last() {
            if snaps.len() > 1 {
                picks.push(last);
            }
        }
        for (ep, imgs) in picks {
            columns.push((format!("{attack} e{ep}"), imgs.clone()));
        }
    }
    let label_h = 40;
    let size = (
        (columns.len() as i32 * (cell.0 + 40)).max(400) as u32,
        (label_h + o.grid_images.len().max(1) as i32 * cell.1 + 10) as u32,
    );
    let backend = crate::png::PngBackend::new(path, size)?;
    let root = backend.into_drawing_area();
    let err = |e: &dyn std::fmt::Debug| anyhow!("drawing {} failed: {e:?}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let font = ("sans-serif", 11).into_font();
    for (c, (name, imgs)) in columns.iter().enumerate() {
        let x0 = 10 + c as i32 * (cell.0 + 40);
        let (line1, line2) = match name.split_once(' ') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (name.clone(), String::new()),
        };
        root.draw_text(&line1, &font.color(&BLACK), (x0, 4))
            .map_err(|e| err(&e))?;
        root.draw_text(&line2, &font.color(&BLACK), (x0, 18))
            .map_err(|e| err(&e))?;
        for (r, img) in imgs.iter().enumerate() {
            let y0 = label_h + r as i32 * cell.1;
            match img {
                Some(px) => {
                    for (k, &p) in px.iter().enumerate() {
                        let (py, px_) = ((k as i32) / w, (k as i32) % w);
                        let v = 255 - p;
                        root.draw(&Rectangle::new(
                            [
                                (x0 + px_ * zoom, y0 + py * zoom),
                                (x0 + (px_ + 1) * zoom, y0 + (py + 1) * zoom),
                            ],
                            RGBColor(v, v, v).filled(),
                        ))
                        .map_err(|e| err(&e))?;
                    }
                }
                None => {
                    root.draw(&Rectangle::new(
                        [(x0, y0), (x0 + w * zoom, y0 + h * zoom)],
                        RGBColor(200, 200, 200).filled(),
                    ))
                    .map_err(|e| err(&e))?;
                }
            }
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand::Rng;

    #[test]
    fn labels_come_from_the_smallest_output_error() {
        assert_eq!(label_from_error(array![100, -3000, 2900].view()), Some(1));
        assert_eq!(label_from_error(array![-4096, 0, 0].view()), Some(0));
        assert_eq!(label_from_error(array![5, 7, 2].view()), Some(2));
        assert_eq!(label_from_error(array![0, 0, 0].view()), None);
        assert_eq!(label_from_error(array![3, -1, -1].view()), None);
    }

    #[test]
    fn mitigations_parse() {
        assert_eq!(
            parse_mitigations("none, batch=256,noise=8").unwrap().0,
            vec![
                Mitigation::NONE,
                Mitigation {
                    batch: Some(256),
                    ..Mitigation::NONE
                },
                Mitigation {
                    noise: Some(8.0),
                    ..Mitigation::NONE
                }
            ]
        );
        let combined = parse_mitigations("bound, batch=512+budget=511").unwrap().0;
        assert_eq!(
            combined,
            vec![
                Mitigation {
                    bound: true,
                    ..Mitigation::NONE
                },
                Mitigation {
                    batch: Some(512),
                    budget: Some(511),
                    ..Mitigation::NONE
                }
            ]
        );
        assert_eq!(combined[1].name(), "batch=512+budget=511");
        assert!(combined[1].binds() && combined[0].binds() && !Mitigation::NONE.binds());
        assert_eq!(combined[1].file_name(), "batch512_budget511");
        assert!(parse_mitigations("budget=0").is_err());
        assert!(parse_mitigations("batch=64+dp").is_err());
        assert!(parse_mitigations("batch=0").is_err());
        assert!(parse_mitigations("noise=-1").is_err());
        assert!(parse_mitigations("dp").is_err());
        assert!(parse_mitigations("").is_err());
    }

    #[test]
    fn gaussian_epsilon_matches_known_values() {
        // mu = 1 (sensitivity = sigma): the 1-GDP curve gives eps ~ 4.4 at delta 1e-5.
        let e = gaussian_epsilon(1.0, 1.0, 1e-5);
        assert!((4.0..4.8).contains(&e), "{e}");
        // More noise, smaller epsilon; delta decreasing in epsilon is respected.
        assert!(gaussian_epsilon(1.0, 2.0, 1e-5) < e);
        assert!(gaussian_epsilon(1.0, 0.5, 1e-5) > e);
        assert_eq!(gaussian_epsilon(1.0, 0.0, 1e-5), f64::INFINITY);
        // Huge sensitivity: finite and about mu^2 / 2.
        let big = gaussian_epsilon(7140.0, 8.0, 1e-5);
        let mu: f64 = 7140.0 / 8.0;
        assert!(
            big.is_finite() && big > mu * mu / 2.0 && big < mu * mu,
            "{big}"
        );
    }

    #[test]
    fn input_noise_is_seeded_clamped_and_has_the_asked_spread() {
        let images = Array2::from_shape_fn((50, 784), |(i, j)| ((i * 7 + j * 13) % 256) as u8);
        let d = Dataset::grey_images(images, vec![0; 50], 28, 28, 2).unwrap();
        let a = add_input_noise(&d, 10.0, 3).unwrap();
        assert_eq!(a.values, add_input_noise(&d, 10.0, 3).unwrap().values);
        assert_ne!(a.values, add_input_noise(&d, 10.0, 4).unwrap().values);
        assert_eq!(a.labels, d.labels);
        // Pixels far from the bounds: the differences have standard deviation ~10.
        let mut diffs = Vec::new();
        for (x, y) in d.values.iter().zip(a.values.iter()) {
            if (40..=215).contains(x) {
                diffs.push(*y as f64 - *x as f64);
            }
        }
        let m = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let sd = (diffs.iter().map(|v| (v - m).powi(2)).sum::<f64>() / diffs.len() as f64).sqrt();
        assert!(
            m.abs() < 0.5 && (9.5..10.5).contains(&sd),
            "mean {m}, sd {sd}"
        );
        assert_eq!(add_input_noise(&d, 0.0, 1).unwrap().values, d.values);
        assert!(add_input_noise(&d, f64::NAN, 1).is_err());
    }

    /// A random integer batch (B x (n+1), bias 255) and deltas (B x H) with entries in
    /// -127..=127.
    fn batch_and_deltas(b: usize, h: usize, n: usize, seed: u64) -> (Array2<f64>, Array2<f64>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x = Array2::from_shape_fn((b, n + 1), |(_, j)| {
            if j == n {
                255.0
            } else {
                rng.gen_range(0..=255) as f64
            }
        });
        let d = Array2::from_shape_fn((b, h), |_| rng.gen_range(-127..=127) as f64);
        (x, d)
    }

    #[test]
    fn backward_solve_is_exact_with_full_rank_deltas_and_not_below() {
        // H = 24 units, B = 16 samples: rank(d) = 16 = B, every pixel comes back.
        let (x, d) = batch_and_deltas(16, 24, 30, 1);
        let g = d.t().dot(&x);
        let (est, rank) = lstsq(d.t(), g.view(), 1e-10).unwrap();
        assert_eq!(rank, 16);
        let px = est.mapv(|v| v.round());
        assert_eq!(px, x);
        // H = 12 < B = 16: rank 12, the system has a 4-dimensional null space and the
        // minimum-norm solution misses most images.
        let (x, d) = batch_and_deltas(16, 12, 30, 2);
        let g = d.t().dot(&x);
        let (est, rank) = lstsq(d.t(), g.view(), 1e-10).unwrap();
        assert_eq!(rank, 12);
        let exact_rows = (0..16)
            .filter(|&b| (0..30).all(|j| est[[b, j]].round() == x[[b, j]]))
            .count();
        assert!(
            exact_rows < 4,
            "{exact_rows} of 16 rows exact below full rank"
        );
        // Stacking a second step's equations restores full rank (backward_stacked).
        let (_, d2) = batch_and_deltas(16, 12, 30, 3);
        let gram = d.dot(&d.t()) + d2.dot(&d2.t());
        let rhs = d.dot(&g) + d2.dot(&d2.t().dot(&x));
        let (est, rank) = lstsq(gram.view(), rhs.view(), 1e-11).unwrap();
        assert_eq!(rank, 16);
        assert_eq!(est.mapv(|v| v.round()), x);
    }

    /// Unbound keys from one step on batch 0, of full rank, give batch 1 exactly through
    /// the cross-batch attack; with one rank fewer they do not.
    #[test]
    fn cross_batch_attack_is_exact_once_the_keys_span_the_batch() {
        let (b, n) = (8usize, 30usize);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let images = Array2::from_shape_fn((2 * b, n), |_| rng.gen_range(0..=255u8));
        let data = Dataset::grey_images(images, vec![0; 2 * b], 5, 6, 2).unwrap();
        let ranges = vec![0..b, b..2 * b];
        let exact_in_batch_1 = |h: usize, seed: u64| {
            let products = PlainIntegers::from_dataset(data.clone(), b, false).unwrap();
            let mut rec = Recorder::new(products, ranges.clone(), vec![false, false]);
            let (_, d) = batch_and_deltas(b, h, n, seed);
            rec.backward_int(0, d.mapv(|v| v as i64).view()).unwrap();
            let (est, rank) = cross_batch_estimates(&rec, &data, &ranges).unwrap();
            let exact = (b..2 * b)
                .filter(|&i| {
                    let want: Vec<u8> = (0..n).map(|j| data.values[[i, j]] as u8).collect();
                    est[i].as_ref() == Some(&want)
                })
                .count();
            (rank, exact)
        };
        assert_eq!(exact_in_batch_1(12, 5), (8, 8));
        let (rank, exact) = exact_in_batch_1(7, 6);
        assert_eq!(rank, 7);
        assert!(exact < 2, "{exact} of 8 images exact with rank 7");
    }

    #[test]
    fn forward_solve_is_exact_once_overdetermined_and_lp_uses_the_box() {
        let n = 40;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Sparse non-negative images, as MNIST's are.
        let x = Array2::from_shape_fn((3, n), |_| {
            if rng.gen_bool(0.2) {
                rng.gen_range(1..=255) as f64
            } else {
                0.0
            }
        });
        let mut obs = Vec::new();
        for _ in 0..3 {
            let w = Array2::from_shape_fn((16, n + 1), |_| rng.gen_range(-127..=127) as f64);
            let mut xa = Array2::from_elem((3, n + 1), 255.0);
            xa.slice_axis_mut(Axis(1), Slice::from(0..n)).assign(&x);
            let z = xa.dot(&w.t());
            obs.push(ForwardObservation { w, z });
        }
        // One step: 16 equations in 40 unknowns, least squares is not exact.
        let (a, r) = forward_system(&obs[..1], n);
        assert_eq!(a.dim(), (16, n));
        let est = RowSpace::of(a.view()).unwrap().min_norm(r.view());
        assert_ne!(est.mapv(|v| v.round().clamp(0.0, 255.0)), x);
        // The box-constrained LP on the same 16 equations satisfies them, stays in the box
        // and, the image being sparse, comes much closer than least squares.
        let lp = LpSystem::new(a.view()).solve(r.column(0), 10.0).unwrap();
        let resid = a.dot(&ArrayView1::from(&lp)) - r.column(0);
        assert!(resid.iter().all(|v| v.abs() < 1e-3), "{resid:?}");
        assert!(lp.iter().all(|v| (-1e-6..=255.0 + 1e-6).contains(v)));
        let sq = |e: ArrayView1<f64>| -> f64 {
            e.iter().zip(x.row(0)).map(|(a, b)| (a - b).powi(2)).sum()
        };
        let (lp_err, ls_err) = (sq(ArrayView1::from(&lp)), sq(est.row(0)));
        assert!(
            lp_err < 0.5 * ls_err,
            "LP {lp_err} vs least squares {ls_err}"
        );
        // Three steps: 48 >= 40 equations, exact.
        let (a, r) = forward_system(&obs, n);
        let est = RowSpace::of(a.view()).unwrap().min_norm(r.view());
        assert_eq!(est.mapv(|v| v.round()), x);
        // The first step seen three times (weights that stopped changing): 48 equations of
        // rank 16, still underdetermined; the LP on the row space gives the one-step LP's
        // solution.
        let frozen = vec![obs[0].clone(), obs[0].clone(), obs[0].clone()];
        let (a3, r3) = forward_system(&frozen, n);
        assert_eq!(a3.nrows(), 48);
        let rs = RowSpace::of(a3.view()).unwrap();
        assert_eq!(rs.rank(), 16);
        let lp3 = LpSystem::from_row_space(&rs)
            .solve(r3.column(0), 10.0)
            .unwrap();
        let resid = a3.dot(&ArrayView1::from(&lp3)) - r3.column(0);
        assert!(resid.iter().all(|v| v.abs() < 1e-3), "{resid:?}");
        let to_px = |v: &[f64]| v.iter().map(|p| p.round()).collect::<Vec<_>>();
        assert_eq!(to_px(&lp3), to_px(&lp));
    }

    #[test]
    fn a_decrypted_integer_that_differs_is_caught() {
        // Two recorders over the same products agree; one grey level changed in one image of
        // the batch shows in every kind of product, and each kind alone is reported.
        let images = Array2::from_shape_fn((32, 784), |(i, j)| ((i * 5 + j * 3) % 256) as u8);
        let d = Dataset::grey_images(images.clone(), vec![1; 32], 28, 28, 10).unwrap();
        let mut changed = images;
        changed[[20, 300]] ^= 1;
        let d2 = Dataset::grey_images(changed, vec![1; 32], 28, 28, 10).unwrap();
        let rec = |d: Dataset| {
            let p = PlainIntegers::from_dataset(d, 16, true).unwrap();
            Recorder::new(p, vec![0..16, 16..32], vec![false, false])
        };
        let (mut a, mut b, mut c) = (rec(d.clone()), rec(d), rec(d2));
        let w = Array2::from_shape_fn((8, 785), |(i, j)| ((i * 7 + j) % 11) as i64 - 5);
        let delta = Array2::from_shape_fn((16, 8), |(i, j)| ((i + 3 * j) % 9) as i64 - 4);
        let out = Array2::from_elem((16, 10), 100i64);
        for r in [&mut a, &mut b, &mut c] {
            r.forward_int(1, w.view()).unwrap();
        }
        assert_eq!(a.latest_difference(&b), None);
        assert!(a.latest_difference(&c).unwrap().contains("forward"));
        c.last_forward = a.last_forward.clone();
        for r in [&mut a, &mut b, &mut c] {
            r.backward_int(1, delta.view()).unwrap();
        }
        assert_eq!(a.latest_difference(&b), None);
        assert!(a.latest_difference(&c).unwrap().contains("backward"));
        c.last_backward = a.last_backward.clone();
        b.output_error_int(1, out.view()).unwrap();
        assert!(a.latest_difference(&b).unwrap().contains("output"));
        a.output_error_int(1, out.view()).unwrap();
        assert_eq!(a.latest_difference(&b), None);
    }

    #[test]
    fn the_recorded_training_equals_the_trainers_bit_for_bit() {
        let (train, _) = nn::mnist::embedded().unwrap();
        let train = train.take(96);
        let args = LeakageArgs {
            common: CommonArgs {
                data: None,
                full: false,
                train_limit: Some(96),
                test_limit: Some(50),
                out: std::env::temp_dir(),
                quiet: true,
            },
            spec: "784-16-10".into(),
            activation: nn::activation::Activation::Sigmoid,
            epochs: 2,
            batch_size: 16,
            bits: 8,
            lr: 0.01,
            seed: 5,
            seeds: 1,
            cost_seeds: 0,
            mitigations: MitigationList(vec![Mitigation::NONE]),
            forward_batches: 2,
            lp_images: 1,
            lp_epochs: 0,
            lp_time_limit: 5.0,
            score_steps: crate::common::List(vec![1]),
            grid: 2,
            max_steps: None,
            fe_steps: 0,
        };
        let data = args.common.load().unwrap();
        let o = run_one(
            &args,
            &data,
            Mitigation::NONE,
            5,
            true,
            0,
            &indicatif::ProgressBar::hidden(),
        )
        .unwrap();
        // The trainer's own loop with the same settings.
        let targs = TrainArgs {
            spec: Some(args.spec.clone()),
            activation: Some(args.activation),
            epochs: Some(2),
            batch_size: Some(16),
            lr: Some(0.01),
            optimizer: None,
            lr_schedule: None,
            seed: 5,
        };
        let cfg = targs.config(8, 2).unwrap();
        let run_data = crate::common::run_data(&train, 16);
        let p = PlainIntegers::from_dataset(train, 16, true).unwrap();
        let r = cryptonn::trainer::run(
            p,
            &run_data,
            &cfg,
            Some(&data.test),
            None,
            None,
            |_, _, _| Ok(()),
        )
        .unwrap();
        let trainer_acc = r.history.last().and_then(|m| m.test_accuracy).unwrap();
        assert_eq!(o.final_accuracy, trainer_acc);
        assert_eq!(
            o.model_digest,
            crate::common::model_digest(&r.model).unwrap()
        );
        // Batch 16 < 16 units: every step's deltas can have full rank, so the single-step
        // backward attack recovers images; labels are read for every image seen.
        let last = o
            .rows
            .iter()
            .rev()
            .find(|r| r.attack == "backward_step")
            .unwrap();
        assert_eq!(last.score.images, 96);
        assert!(last.label_accuracy > 0.9, "{}", last.label_accuracy);
    }
}
