//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong in `fe`: bad input, values out of range, failed decryption.
///
/// No operation of this crate panics on input from outside; it returns one of these instead.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FeError {
    /// Two things that must have the same length do not.
    #[error("length mismatch: {what} has length {got}, expected {expected}")]
    LengthMismatch {
        /// What was measured.
        what: &'static str,
        /// The length that was given.
        got: usize,
        /// The length that was required.
        expected: usize,
    },
    /// An input value lies outside the range the parameters allow.
    #[error("{what} = {value} is outside the allowed range [-{bound}, {bound}]")]
    OutOfRange {
        /// What was checked.
        what: &'static str,
        /// The offending value.
        value: i128,
        /// The allowed bound on the absolute value.
        bound: i128,
    },
    /// The result of a decryption is not a discrete log within the bound: the ciphertext was
    /// tampered with, the key belongs to another vector or ciphertext, or the value is too large.
    #[error("decrypted value is not within the discrete-log bound ±{bound}")]
    DlogNotFound {
        /// The bound that was searched.
        bound: u64,
    },
    /// The bound a decryption needs exceeds what the discrete-log solver is configured for.
    #[error(
        "the result may need a discrete log up to ±{needed}, but the solver is limited to ±{limit}; \
         use smaller values or a larger table/limit"
    )]
    BoundTooLarge {
        /// The worst-case absolute value of the result.
        needed: u128,
        /// The solver's limit.
        limit: u64,
    },
    /// A function key was asked for an operation it cannot do (for example division by zero).
    #[error("invalid operation: {0}")]
    InvalidOperation(String),
    /// Bytes that should encode a group element or scalar do not.
    #[error("invalid encoding of {0}")]
    InvalidEncoding(&'static str),
    /// A serialized object is malformed, truncated, of another version or another curve.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// A checksum did not match: the file is corrupted.
    #[error("checksum mismatch in {0}")]
    Checksum(&'static str),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The OS error message.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, FeError>;

impl FeError {
    pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        FeError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
