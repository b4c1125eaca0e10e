//! # fe: functional encryption for inner products and basic operations
//!
//! Two public-key functional-encryption schemes on prime-order elliptic-curve groups through
//! [`curv`](https://docs.rs/curv-kzen): a key derived for a function lets its holder learn that
//! function of an encrypted value and nothing else.
//!
//! * [`feip`]: inner products `⟨x, y⟩` of integer vectors (Abdalla, Bourse, De Caro,
//!   Pointcheval, PKC 2015).
//! * [`febo`]: one basic operation `x ± y`, `x·y`, `x/y` on one encrypted integer (CryptoNN,
//!   Xu, Joshi and Li, 2019).
//!
//! Both end with a bounded discrete logarithm ([`dlog`]), solved by baby-step giant-step with a
//! precomputed table; results outside the promised bound are errors, never wrong numbers.
//! [`msm`] holds the fast arithmetic (bit planes over subset sums and the bucket method for
//! small signed scalars, fixed-base tables), [`backend`] the point additions it runs on
//! (curv's, or four at once with AVX2 on Ristretto255, chosen at run time), [`encoding`] the fixed-point codes and bound checks, [`serial`]
//! the versioned, validated binary format. Everything is generic over the curve ([`FeCurve`]):
//! [`Ristretto`] (default, about 128-bit security) and [`Secp256k1`].
//!
//! ```
//! use fe::{feip, dlog::DlogTable, Ristretto};
//!
//! let params = feip::FeipParams::new(4, 255)?;          // vectors of length 4, |x_i| ≤ 255
//! let (pk, msk) = feip::setup::<Ristretto>(params);
//! let ct = feip::FeipEncryptor::new(&pk).encrypt(&[10, 0, 255, 7])?;
//! let key = msk.derive_key(&[3, -1, 2, -5])?;            // reveals ⟨x, y⟩ only
//! let dlog = DlogTable::<Ristretto>::new(1 << 12)?;
//! assert_eq!(feip::decrypt(&params, &ct, &key, &dlog)?, 30 + 510 - 35);
//! # Ok::<(), fe::FeError>(())
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod dlog;
pub mod encoding;
mod error;
pub mod febo;
pub mod feip;
pub mod group;
pub mod msm;
pub mod serial;
pub mod sums;

pub use error::{FeError, Result};
pub use group::{FeCurve, Ristretto, Secp256k1};
pub use serial::Encode;
