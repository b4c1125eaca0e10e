//! Fixed-point encoding of reals as the integers the schemes encrypt, and bound arithmetic.
//!
//! A real `a` is encoded as the integer `round(a·scale)`; the schemes compute exactly on these
//! integers, and an inner product of two encodings decodes with the product of the two scales.
//! Decryption needs a bound on the result (the discrete log is searched within it), and
//! `|⟨x, y⟩| ≤ Σ|x_i|·|y_i| ≤ max|x|·‖y‖₁ ≤ n·max|x|·max|y|`: [`inner_product_bound`] and
//! [`check_fits`] let callers fail early, with a clear message, when a setting cannot work.

use crate::error::{FeError, Result};
use serde::{Deserialize, Serialize};

/// How a scaled real is turned into an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Rounding {
    /// To the nearest integer, ties away from zero.
    #[default]
    Nearest,
    /// Towards negative infinity.
    Floor,
    /// Towards positive infinity.
    Ceil,
    /// Towards zero (truncation).
    TowardZero,
}

impl Rounding {
    /// Applies the rounding mode.
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Rounding::Nearest => v.round(),
            Rounding::Floor => v.floor(),
            Rounding::Ceil => v.ceil(),
            Rounding::TowardZero => v.trunc(),
        }
    }
}

/// A fixed-point code: `encode(a) = rounding(a·scale)`, checked against `|v| ≤ max_abs`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FixedPoint {
    scale: f64,
    max_abs: i64,
    rounding: Rounding,
}

impl FixedPoint {
    /// A code with a positive finite scale and a bound on the encoded integers.
    pub fn new(scale: f64, max_abs: i64, rounding: Rounding) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(FeError::InvalidOperation(format!(
                "fixed-point scale must be positive and finite, got {scale}"
            )));
        }
        if max_abs < 0 {
            return Err(FeError::InvalidOperation("negative bound".into()));
        }
        Ok(FixedPoint {
            scale,
            max_abs,
            rounding,
        })
    }

    /// A code for `bits`-bit signed integers whose largest value `2^(bits-1)-1` encodes
    /// `max_real`: the usual symmetric quantization.
    pub fn for_bits(bits: u32, max_real: f64, rounding: Rounding) -> Result<Self> {
        if !(2..=62).contains(&bits) {
            return Err(FeError::InvalidOperation(format!(
                "bits must be 2..=62, got {bits}"
            )));
        }
        let m = (1i64 << (bits - 1)) - 1;
        let scale = if max_real > 0.0 && max_real.is_finite() {
            m as f64 / max_real
        } else {
            1.0
        };
        Self::new(scale, m, rounding)
    }

    /// The scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The bound on encoded integers.
    pub fn max_abs(&self) -> i64 {
        self.max_abs
    }

    /// Encodes one real; NaN, infinities and values beyond the bound are errors.
    pub fn encode(&self, a: f64) -> Result<i64> {
        let v = self.rounding.apply(a * self.scale);
        if !v.is_finite() || v.abs() > self.max_abs as f64 {
            return Err(FeError::OutOfRange {
                what: "fixed-point value",
                value: if v.is_finite() { v as i128 } else { i128::MAX },
                bound: self.max_abs as i128,
            });
        }
        Ok(v as i64)
    }

    /// Encodes a slice.
    pub fn encode_slice(&self, a: &[f64]) -> Result<Vec<i64>> {
        a.iter().map(|&x| self.encode(x)).collect()
    }

    /// Decodes one integer.
    pub fn decode(&self, v: i64) -> f64 {
        v as f64 / self.scale
    }

    /// Decodes an inner product of an encoding under `self` with one under `other`.
    pub fn decode_product(&self, other: &FixedPoint, v: i64) -> f64 {
        v as f64 / (self.scale * other.scale)
    }
}

/// The worst case `n·max|x|·max|y|` of an inner product, exactly.
pub fn inner_product_bound(n: usize, x_bound: u64, y_bound: u64) -> u128 {
    n as u128 * u128::from(x_bound) * u128::from(y_bound)
}

/// The bound of `⟨x, y⟩` for this `y` when `|x_i| ≤ x_bound`: `x_bound·‖y‖₁`.
pub fn bound_for_key(y: &[i64], x_bound: u64) -> u128 {
    let l1: u128 = y.iter().map(|v| u128::from(v.unsigned_abs())).sum();
    l1 * u128::from(x_bound)
}

/// Fails with [`FeError::BoundTooLarge`] unless every inner product of length `n` with
/// `|x_i| ≤ x_bound` and `|y_i| ≤ y_bound` fits the discrete-log limit; returns the bound.
pub fn check_fits(n: usize, x_bound: u64, y_bound: u64, dlog_limit: u64) -> Result<u128> {
    let needed = inner_product_bound(n, x_bound, y_bound);
    if needed > u128::from(dlog_limit) {
        Err(FeError::BoundTooLarge {
            needed,
            limit: dlog_limit,
        })
    } else {
        Ok(needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip_within_half_step(a in -1000.0f64..1000.0, scale in 1.0f64..1e6) {
            let c = FixedPoint::new(scale, i64::MAX / 2, Rounding::Nearest).expect("code");
            let v = c.encode(a).expect("fits");
            prop_assert!((c.decode(v) - a).abs() <= 0.5 / scale + 1e-9);
        }
    }

    #[test]
    fn rounding_modes_and_range() {
        let mk = |r| FixedPoint::new(10.0, 100, r).expect("code");
        assert_eq!(mk(Rounding::Nearest).encode(-0.25).ok(), Some(-3));
        assert_eq!(mk(Rounding::Floor).encode(-0.21).ok(), Some(-3));
        assert_eq!(mk(Rounding::Ceil).encode(0.21).ok(), Some(3));
        assert_eq!(mk(Rounding::TowardZero).encode(-0.29).ok(), Some(-2));
        assert_eq!(mk(Rounding::Nearest).encode(10.0).ok(), Some(100));
        assert!(mk(Rounding::Nearest).encode(10.06).is_err());
        assert!(mk(Rounding::Nearest).encode(f64::NAN).is_err());
        assert!(mk(Rounding::Nearest).encode(f64::INFINITY).is_err());
        assert!(FixedPoint::new(0.0, 1, Rounding::Nearest).is_err());
        assert!(FixedPoint::new(f64::NAN, 1, Rounding::Nearest).is_err());
        let q = FixedPoint::for_bits(8, 0.5, Rounding::Nearest).expect("code");
        assert_eq!(q.encode(0.5).ok(), Some(127));
        assert_eq!(q.encode(-0.5).ok(), Some(-127));
        assert!(FixedPoint::for_bits(1, 1.0, Rounding::Nearest).is_err());
    }

    #[test]
    fn bounds() {
        assert_eq!(inner_product_bound(785, 255, 127), 785 * 255 * 127);
        assert_eq!(bound_for_key(&[-3, 4, 0], 10), 70);
        assert!(check_fits(785, 255, 127, 1 << 25).is_ok());
        assert!(matches!(
            check_fits(785, 255, 32767, 1 << 25),
            Err(FeError::BoundTooLarge { .. })
        ));
    }
}
