//! Seeded weight initialization.
//!
//! For a layer with `fan_in` inputs and `fan_out` outputs:
//! - Xavier (Glorot) uniform: `W ~ U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`, which keeps
//!   the variance of activations roughly constant for sigmoid and tanh;
//! - He (Kaiming) normal: `W ~ N(0, sigma^2)`, `sigma = sqrt(2 / fan_in)`, the same for ReLU.
//!
//! Biases start at zero. All randomness comes from a caller-supplied generator, so the same
//! seed gives the same weights.

use ndarray::Array2;
use ndarray_rand::rand_distr::{Normal, Uniform};
use ndarray_rand::RandomExt;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::activation::Activation;

/// A weight-initialization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Init {
    /// Glorot uniform, for sigmoid and tanh layers and the softmax output.
    Xavier,
    /// He normal, for ReLU layers.
    He,
}

impl Init {
    /// The usual scheme for a layer followed by `act`: He for ReLU, Xavier otherwise.
    pub fn for_activation(act: Activation) -> Init {
        match act {
            Activation::Relu => Init::He,
            Activation::Sigmoid | Activation::Tanh => Init::Xavier,
        }
    }

    /// A `(fan_out, fan_in)` weight matrix drawn from this scheme with `rng`.
    pub fn weights<R: Rng + ?Sized>(
        self,
        fan_out: usize,
        fan_in: usize,
        rng: &mut R,
    ) -> Array2<f32> {
        let shape = (fan_out, fan_in);
        match self {
            Init::Xavier => {
                let a = (6.0 / (fan_in + fan_out).max(1) as f32).sqrt();
                Array2::random_using(shape, Uniform::new_inclusive(-a, a), rng)
            }
            Init::He => {
                let sigma = (2.0 / fan_in.max(1) as f32).sqrt();
                match Normal::new(0.0_f32, sigma) {
                    Ok(dist) => Array2::random_using(shape, dist, rng),
                    // sigma is finite and positive for every fan_in >= 1, so this is unreachable;
                    // fall back to zeros rather than panicking.
                    Err(_) => Array2::zeros(shape),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn seeded_and_scaled() {
        let mut r1 = ChaCha8Rng::seed_from_u64(7);
        let mut r2 = ChaCha8Rng::seed_from_u64(7);
        let a = Init::Xavier.weights(50, 200, &mut r1);
        let b = Init::Xavier.weights(50, 200, &mut r2);
        assert_eq!(a, b);
        let bound = (6.0_f32 / 250.0).sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));

        let h = Init::He.weights(100, 400, &mut r1);
        let var = h.iter().map(|v| v * v).sum::<f32>() / h.len() as f32;
        assert!(
            (var - 2.0 / 400.0).abs() < 0.1 * 2.0 / 400.0,
            "variance {var}"
        );
    }
}
