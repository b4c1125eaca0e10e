//! # nn: a small ndarray neural-network library for CryptoNN
//!
//! This crate trains the part of a CryptoNN network that runs in the clear and is the plain
//! baseline that every encrypted run is compared against. It knows nothing about cryptography.
//!
//! Batches are rows: every activation has shape `(B, features)`. A network is a stack of
//! [`layer::Dense`] layers `z = a W^T + b` with one hidden [`activation::Activation`] and a
//! softmax output trained with cross-entropy.
//!
//! The first layer is special: its two matrix products (forward `Z = X W1^T`, backward
//! `grad W1 = delta^T X`) go through the [`first_layer::FirstLayer`] trait, the seam where the
//! secure system plugs in. The training loop in [`train`] never touches the first layer's inputs
//! or the labels itself: it learns labels only through the output error `e = a - y`.
//!
//! Modules:
//! - [`activation`], [`loss`], [`init`], [`layer`]: building blocks;
//! - [`layers`]: image layers (convolution, max and average pooling, flatten) over batches
//!   `(B, C*H*W)` and the [`layers::Layer`] enum;
//! - [`spec`]: architectures as strings (`784-128-32-10`, `128-32`, `lenet5`,
//!   `conv5x6p2-maxpool2-...`);
//! - [`model`]: the sequential model configured from a spec;
//! - [`optim`]: SGD (momentum, weight decay, schedules) and Adam, with serializable state;
//! - [`data`]: the dataset description, datasets, fixed batch partitions, the loaders (IDX,
//!   CIFAR-10, CSV) and the client's encoding of real values;
//! - [`first_layer`]: the seam, quantization and the plain implementations;
//! - [`train`], [`eval`]: training loop, checkpoints and evaluation;
//! - [`infer`]: inference with the first layer's integers computed elsewhere (the
//!   prediction service's half of the seam).
#![deny(missing_docs)]

pub mod activation;
pub mod data;
pub mod eval;
pub mod first_layer;
pub mod infer;
pub mod init;
pub mod layer;
pub mod layers;
pub mod loss;
pub mod model;
pub mod optim;
pub mod spec;
pub mod train;

pub use activation::Activation;
pub use data::mnist;
pub use data::{Batches, DataError, Dataset, DatasetInfo};
pub use eval::{evaluate, Evaluation};
pub use first_layer::{
    FirstLayer, IntegerProducts, PlainFloat, PlainIntegers, Quantized, Quantizer, Rounding,
    SeamError,
};
pub use model::{Model, ModelError, ModelSpec};
pub use optim::{Optimizer, Schedule};
pub use train::{fit, train_epoch, EpochMetrics, FitConfig, TrainError};
