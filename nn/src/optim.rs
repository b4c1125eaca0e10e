//! Optimizers with serializable state: SGD with momentum and Adam, L2 weight decay and a
//! per-epoch learning-rate schedule.
//!
//! With gradient `g` of a weight `w`, weight decay `lambda` (applied to weights, never to
//! biases) and learning rate `eta_e` of the current epoch `e`:
//!
//! ```text
//! g'  = g + lambda w
//! SGD:  v <- mu v + g';                 w <- w - eta_e v
//! Adam: m <- b1 m + (1 - b1) g';        s <- b2 s + (1 - b2) g'^2;    t <- t + 1
//!       w <- w - eta_e (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)
//! ```
//!
//! Schedules: constant `eta_e = eta`; step decay `eta_e = eta gamma^floor(e / every)`; cosine
//! `eta_e = min + (eta - min) (1 + cos(pi min(e, T) / T)) / 2` over `T` epochs.
//!
//! The whole optimizer, moments included, is `serde`-serializable so that training can be
//! checkpointed between two batches and resumed with bit-identical results.

use ndarray::{Array1, Array2, Dimension, Zip};
use serde::{Deserialize, Serialize};

use crate::model::{Gradients, Model, ModelError};

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// Stochastic gradient descent with (heavy-ball) momentum `mu` (0 for plain SGD).
    Sgd {
        /// Momentum coefficient in `[0, 1)`.
        momentum: f32,
    },
    /// Adam (Kingma and Ba, 2015).
    Adam {
        /// Decay of the first moment, usually 0.9.
        beta1: f32,
        /// Decay of the second moment, usually 0.999.
        beta2: f32,
        /// Denominator offset, usually 1e-8.
        eps: f32,
    },
}

/// Learning rate as a function of the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// The base rate at every epoch.
    Constant,
    /// Multiply the rate by `gamma` every `every` epochs.
    StepDecay {
        /// Epochs between two decays (0 behaves as constant).
        every: usize,
        /// Factor applied at each decay.
        gamma: f32,
    },
    /// Cosine annealing from the base rate to `min_lr` over `total_epochs`.
    Cosine {
        /// Length of the schedule in epochs.
        total_epochs: usize,
        /// Final learning rate.
        min_lr: f32,
    },
}

impl Schedule {
    /// The learning rate of epoch `epoch` (0-based) for base rate `lr`.
    pub fn lr_at(&self, lr: f32, epoch: usize) -> f32 {
        match *self {
            Schedule::Constant => lr,
            Schedule::StepDecay { every, gamma } => match epoch.checked_div(every) {
                // every == 0 behaves as constant
                None => lr,
                Some(k) => lr * gamma.powi(i32::try_from(k).unwrap_or(i32::MAX)),
            },
            Schedule::Cosine {
                total_epochs,
                min_lr,
            } => {
                if total_epochs == 0 {
                    return lr;
                }
                let p = epoch.min(total_epochs) as f64 / total_epochs as f64;
                let c = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
                (min_lr as f64 + (lr as f64 - min_lr as f64) * c) as f32
            }
        }
    }
}

/// First and second moments of one layer (SGD uses only the first one, as velocity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Moments {
    mw: Array2<f32>,
    sw: Array2<f32>,
    mb: Array1<f32>,
    sb: Array1<f32>,
}

/// An optimizer and its complete state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    /// The update rule.
    pub method: Method,
    /// Base learning rate.
    pub lr: f32,
    /// L2 weight decay on weights (not biases).
    pub weight_decay: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    epoch: usize,
    steps: u64,
    state: Vec<Moments>,
}

impl Optimizer {
    /// SGD with learning rate `lr` and momentum `momentum`.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        Self::new(Method::Sgd { momentum }, lr)
    }

    /// Adam with learning rate `lr` and the usual betas (0.9, 0.999) and eps 1e-8.
    pub fn adam(lr: f32) -> Self {
        Self::new(
            Method::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            lr,
        )
    }

    /// An optimizer with the given method and base rate, no weight decay, constant schedule.
    pub fn new(method: Method, lr: f32) -> Self {
        Optimizer {
            method,
            lr,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            epoch: 0,
            steps: 0,
            state: Vec::new(),
        }
    }

    /// Sets L2 weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Sets the learning-rate schedule.
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Selects the epoch whose learning rate the next steps use.
    pub fn set_epoch(&mut self, epoch: usize) {
        self.epoch = epoch;
    }

    /// The current epoch.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Number of update steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Learning rate in force for the current epoch.
    pub fn current_lr(&self) -> f32 {
        self.schedule.lr_at(self.lr, self.epoch)
    }

    /// Applies one update to `model` with `grads`; shapes must match the model's layers.
    pub fn step(&mut self, model: &mut Model, grads: &Gradients) -> Result<(), ModelError> {
        let mut layers = model.params_mut();
        if grads.layers.len() != layers.len() {
            return Err(ModelError::Shape {
                what: "gradient layers",
                expected: vec![layers.len()],
                got: vec![grads.layers.len()],
            });
        }
        for (l, g) in layers.iter().zip(&grads.layers) {
            if g.dw.dim() != l.w.dim() || g.db.len() != l.b.len() {
                return Err(ModelError::Shape {
                    what: "layer gradient",
                    expected: vec![l.w.nrows(), l.w.ncols(), l.b.len()],
                    got: vec![g.dw.nrows(), g.dw.ncols(), g.db.len()],
                });
            }
        }
        let shapes_ok = self.state.len() == layers.len()
            && self
                .state
                .iter()
                .zip(layers.iter())
                .all(|(m, l)| m.mw.dim() == l.w.dim() && m.mb.len() == l.b.len());
        if !shapes_ok {
            if self.state.is_empty() {
                self.state = layers
                    .iter()
                    .map(|l| Moments {
                        mw: Array2::zeros(l.w.dim()),
                        sw: Array2::zeros(l.w.dim()),
                        mb: Array1::zeros(l.b.len()),
                        sb: Array1::zeros(l.b.len()),
                    })
                    .collect();
            } else {
                return Err(ModelError::Inconsistent(
                    "optimizer state does not match the model".into(),
                ));
            }
        }

        let lr = self.current_lr();
        let wd = self.weight_decay;
        self.steps += 1;
        let t = self.steps;
        for ((layer, g), m) in layers.iter_mut().zip(&grads.layers).zip(&mut self.state) {
            update(self.method, lr, wd, t, layer.w, &g.dw, &mut m.mw, &mut m.sw);
            update(
                self.method,
                lr,
                0.0,
                t,
                layer.b,
                &g.db,
                &mut m.mb,
                &mut m.sb,
            );
        }
        Ok(())
    }
}

/// One optimizer update of a parameter tensor `p` with gradient `g` and moments `m`, `s`.
#[allow(clippy::too_many_arguments)]
fn update<D: Dimension>(
    method: Method,
    lr: f32,
    wd: f32,
    t: u64,
    p: &mut ndarray::Array<f32, D>,
    g: &ndarray::Array<f32, D>,
    m: &mut ndarray::Array<f32, D>,
    s: &mut ndarray::Array<f32, D>,
) {
    match method {
        Method::Sgd { momentum } => {
            Zip::from(p).and(g).and(m).for_each(|p, &g, v| {
                let g = g + wd * *p;
                *v = momentum * *v + g;
                *p -= lr * *v;
            });
        }
        Method::Adam { beta1, beta2, eps } => {
            let tf = t as f64;
            let bc1 = (1.0 - (beta1 as f64).powf(tf)) as f32;
            let bc2 = (1.0 - (beta2 as f64).powf(tf)) as f32;
            Zip::from(p).and(g).and(m).and(s).for_each(|p, &g, m, s| {
                let g = g + wd * *p;
                *m = beta1 * *m + (1.0 - beta1) * g;
                *s = beta2 * *s + (1.0 - beta2) * g * g;
                let mhat = *m / bc1;
                let shat = *s / bc2;
                *p -= lr * mhat / (shat.sqrt() + eps);
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::layer::DenseGrad;
    use crate::model::ModelSpec;
    use ndarray::array;

    fn tiny() -> Model {
        let spec = ModelSpec::parse("2-1", Activation::Relu).unwrap();
        let mut m = Model::new(spec, 0).unwrap();
        m.layers_mut()[0].w = array![[1.0, -2.0]];
        m.layers_mut()[0].b = array![0.5];
        m
    }

    fn grads() -> Gradients {
        Gradients {
            layers: vec![DenseGrad {
                dw: array![[0.5, 1.0]],
                db: array![2.0],
            }],
        }
    }

    #[test]
    fn sgd_momentum_and_decay_by_hand() {
        let mut m = tiny();
        let mut o = Optimizer::sgd(0.1, 0.9).with_weight_decay(0.1);
        o.step(&mut m, &grads()).unwrap();
        // g' = g + 0.1 w = [0.6, 0.8]; v = g'; w -= 0.1 v
        let w = &m.layers()[0].w;
        assert!((w[[0, 0]] - 0.94).abs() < 1e-6 && (w[[0, 1]] + 2.08).abs() < 1e-6);
        assert!((m.layers()[0].b[0] - 0.3).abs() < 1e-6);
        o.step(&mut m, &grads()).unwrap();
        // g' = [0.5 + 0.094, 1 - 0.208]; v = 0.9 [0.6, 0.8] + g'
        let v0 = 0.9 * 0.6 + 0.594;
        assert!((m.layers()[0].w[[0, 0]] - (0.94 - 0.1 * v0)).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        let mut m = tiny();
        let mut o = Optimizer::adam(0.01);
        o.step(&mut m, &grads()).unwrap();
        let w = &m.layers()[0].w;
        assert!((w[[0, 0]] - 0.99).abs() < 1e-5 && (w[[0, 1]] + 2.01).abs() < 1e-5);
        assert!((m.layers()[0].b[0] - 0.49).abs() < 1e-5);
    }

    #[test]
    fn schedules() {
        let s = Schedule::StepDecay {
            every: 3,
            gamma: 0.5,
        };
        assert_eq!(s.lr_at(1.0, 2), 1.0);
        assert_eq!(s.lr_at(1.0, 3), 0.5);
        assert_eq!(s.lr_at(1.0, 7), 0.25);
        let c = Schedule::Cosine {
            total_epochs: 10,
            min_lr: 0.0,
        };
        assert!((c.lr_at(1.0, 0) - 1.0).abs() < 1e-6);
        assert!((c.lr_at(1.0, 5) - 0.5).abs() < 1e-6);
        assert!(c.lr_at(1.0, 10).abs() < 1e-6);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut m = tiny();
        let mut o = Optimizer::adam(0.01);
        let bad = Gradients {
            layers: vec![DenseGrad::zeros(2, 2)],
        };
        assert!(o.step(&mut m, &bad).is_err());
    }
}
