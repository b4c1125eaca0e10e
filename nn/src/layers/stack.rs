//! [`Layer`]: one enum over every layer kind, and stacks of them.

use ndarray::{Array2, ArrayView2};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::conv::{Conv2d, ConvCache};
use super::flatten::{Elementwise, ElementwiseCache, Flatten};
use super::pool::{AvgPool2d, AvgPoolCache, MaxPool2d, MaxPoolCache};
use super::shape::{check_grad, ImageShape, LayerError, Window};
use crate::activation::Activation;
use crate::init::Init;
use crate::layer::{Dense, DenseGrad};

/// Any layer of a sequential image model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// A convolution.
    Conv(Conv2d),
    /// Max pooling.
    MaxPool(MaxPool2d),
    /// Average pooling.
    AvgPool(AvgPool2d),
    /// The end of the image shape.
    Flatten(Flatten),
    /// A dense layer on flat features `(n, 1, 1)`.
    Dense(Dense),
    /// An element-wise activation.
    Activation(Elementwise),
}

/// What a layer's forward pass keeps for its backward pass.
#[derive(Debug, Clone)]
pub enum Cache {
    /// Of a convolution.
    Conv(ConvCache),
    /// Of max pooling.
    MaxPool(MaxPoolCache),
    /// Of average pooling.
    AvgPool(AvgPoolCache),
    /// Of `Flatten`: nothing.
    Flatten,
    /// Of a dense layer: its input.
    Dense(Array2<f32>),
    /// Of an activation.
    Activation(ElementwiseCache),
}

impl Cache {
    fn kind(&self) -> &'static str {
        match self {
            Cache::Conv(_) => "conv",
            Cache::MaxPool(_) => "max-pool",
            Cache::AvgPool(_) => "average-pool",
            Cache::Flatten => "flatten",
            Cache::Dense(_) => "dense",
            Cache::Activation(_) => "activation",
        }
    }
}

impl Layer {
    /// The layer's kind, as named in errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Conv(_) => "conv",
            Layer::MaxPool(_) => "max-pool",
            Layer::AvgPool(_) => "average-pool",
            Layer::Flatten(_) => "flatten",
            Layer::Dense(_) => "dense",
            Layer::Activation(_) => "activation",
        }
    }

    /// The shape of one input; a dense layer's is `(inputs, 1, 1)`.
    pub fn input_shape(&self) -> Result<ImageShape, LayerError> {
        match self {
            Layer::Conv(l) => Ok(l.input_shape()),
            Layer::MaxPool(l) => Ok(l.input_shape()),
            Layer::AvgPool(l) => Ok(l.input_shape()),
            Layer::Flatten(l) => Ok(l.input_shape()),
            Layer::Dense(l) => ImageShape::flat(l.inputs()),
            Layer::Activation(l) => Ok(l.shape()),
        }
    }

    /// The shape of one output; a dense layer's is `(outputs, 1, 1)`.
    pub fn output_shape(&self) -> Result<ImageShape, LayerError> {
        match self {
            Layer::Conv(l) => Ok(l.output_shape()),
            Layer::MaxPool(l) => Ok(l.output_shape()),
            Layer::AvgPool(l) => Ok(l.output_shape()),
            Layer::Flatten(l) => Ok(l.output_shape()),
            Layer::Dense(l) => ImageShape::flat(l.outputs()),
            Layer::Activation(l) => Ok(l.shape()),
        }
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        match self {
            Layer::Conv(l) => l.w.len() + l.b.len(),
            Layer::Dense(l) => l.w.len() + l.b.len(),
            _ => 0,
        }
    }

    /// The output for a batch `x` (B, input features) and what the backward pass needs.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<(Array2<f32>, Cache), LayerError> {
        Ok(match self {
            Layer::Conv(l) => l.forward(x)?.map(Cache::Conv),
            Layer::MaxPool(l) => l.forward(x)?.map(Cache::MaxPool),
            Layer::AvgPool(l) => l.forward(x)?.map(Cache::AvgPool),
            Layer::Flatten(l) => (l.forward(x)?, Cache::Flatten),
            Layer::Dense(l) => (dense_forward(l, x)?, Cache::Dense(x.to_owned())),
            Layer::Activation(l) => l.forward(x)?.map(Cache::Activation),
        })
    }

    /// `dL/dX` for the output gradient `dy`, and the parameters' gradients for the layers
    /// that have parameters (convolutions and dense layers).
    pub fn backward(
        &self,
        cache: &Cache,
        dy: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, Option<DenseGrad>), LayerError> {
        match (self, cache) {
            (Layer::Conv(l), Cache::Conv(c)) => l.backward(c, dy).map(|(dx, g)| (dx, Some(g))),
            (Layer::MaxPool(l), Cache::MaxPool(c)) => Ok((l.backward(c, dy)?, None)),
            (Layer::AvgPool(l), Cache::AvgPool(c)) => Ok((l.backward(c, dy)?, None)),
            (Layer::Flatten(l), Cache::Flatten) => Ok((l.backward(dy)?, None)),
            (Layer::Dense(l), Cache::Dense(x)) => dense_backward(l, x.view(), dy),
            (Layer::Activation(l), Cache::Activation(c)) => Ok((l.backward(c, dy)?, None)),
            _ => Err(LayerError::Cache {
                expected: self.kind(),
                got: cache.kind(),
            }),
        }
    }
}

/// [`Dense::forward`] after checking the shapes (which would otherwise panic in `dot`).
fn dense_forward(l: &Dense, x: ArrayView2<f32>) -> Result<Array2<f32>, LayerError> {
    check_grad("dense input", x, x.nrows(), l.inputs())?;
    if l.b.len() != l.outputs() {
        return Err(LayerError::Shape {
            what: "dense bias",
            expected: vec![l.outputs()],
            got: vec![l.b.len()],
        });
    }
    Ok(l.forward(x))
}

fn dense_backward(
    l: &Dense,
    x: ArrayView2<f32>,
    dy: ArrayView2<f32>,
) -> Result<(Array2<f32>, Option<DenseGrad>), LayerError> {
    check_grad("dense output gradient", dy, x.nrows(), l.outputs())?;
    check_grad("dense cached input", x, x.nrows(), l.inputs())?;
    Ok((l.input_grad(dy), Some(l.param_grad(x, dy))))
}

/// Checks that every layer's input shape is the previous layer's output shape; returns the
/// last output shape (or `input` for an empty stack).
pub fn check_stack(input: ImageShape, layers: &[Layer]) -> Result<ImageShape, LayerError> {
    let mut shape = input;
    for (index, layer) in layers.iter().enumerate() {
        let expected = layer.input_shape()?;
        if expected.features() != shape.features() || !fits(expected, shape) {
            return Err(LayerError::Stack {
                index,
                layer: layer.kind(),
                expected,
                got: shape,
            });
        }
        shape = layer.output_shape()?;
    }
    Ok(shape)
}

/// A dense layer takes any shape of the right size (`120x1x1` from a convolution); image
/// layers need the exact shape.
fn fits(expected: ImageShape, got: ImageShape) -> bool {
    expected == got || (expected.height() == 1 && expected.width() == 1)
}

/// Runs a stack forward, keeping every layer's cache.
pub fn forward_stack(
    layers: &[Layer],
    x: ArrayView2<f32>,
) -> Result<(Array2<f32>, Vec<Cache>), LayerError> {
    let mut caches = Vec::with_capacity(layers.len());
    let mut a = x.to_owned();
    for layer in layers {
        let (out, cache) = layer.forward(a.view())?;
        caches.push(cache);
        a = out;
    }
    Ok((a, caches))
}

/// Runs a stack backward from the output gradient `dy`: the input gradient and, per layer,
/// its parameters' gradients.
pub fn backward_stack(
    layers: &[Layer],
    caches: &[Cache],
    dy: ArrayView2<f32>,
) -> Result<(Array2<f32>, Vec<Option<DenseGrad>>), LayerError> {
    if caches.len() != layers.len() {
        return Err(LayerError::Shape {
            what: "stack caches",
            expected: vec![layers.len()],
            got: vec![caches.len()],
        });
    }
    let mut grads = vec![None; layers.len()];
    let mut d = dy.to_owned();
    for (i, (layer, cache)) in layers.iter().zip(caches).enumerate().rev() {
        let (dx, g) = layer.backward(cache, d.view())?;
        grads[i] = g;
        d = dx;
    }
    Ok((d, grads))
}

/// The convolutional part of LeNet-5 on `1x28x28` images, ending in `120x1x1`:
/// `conv5x6p2-f-maxpool2-conv5x16-f-maxpool2-conv5x120-f-flatten` with `f = activation`,
/// kernels drawn from the activation's usual init. The dense `120-84-10` part follows.
pub fn lenet5_features<R: Rng + ?Sized>(
    activation: Activation,
    rng: &mut R,
) -> Result<Vec<Layer>, LayerError> {
    let init = Init::for_activation(activation);
    let mut layers = Vec::new();
    let mut shape = ImageShape::new(1, 28, 28)?;
    for (i, (out, pad)) in [(6, 2), (16, 0), (120, 0)].into_iter().enumerate() {
        let conv = Conv2d::new(shape, out, Window::new(5, 1, pad), init, rng)?;
        shape = conv.output_shape();
        layers.push(Layer::Conv(conv));
        layers.push(Layer::Activation(Elementwise::new(activation, shape)));
        if i < 2 {
            let pool = MaxPool2d::new(shape, 2, 2)?;
            shape = pool.output_shape();
            layers.push(Layer::MaxPool(pool));
        }
    }
    layers.push(Layer::Flatten(Flatten::new(shape)));
    Ok(layers)
}
