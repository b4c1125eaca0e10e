//! # cryptonn: training neural networks on functionally encrypted data
//!
//! The three roles of CryptoNN (Xu, Joshi and Li, 2019) as library modules:
//!
//! * [`authority`]: holds the master secret keys, publishes the public parameters and derives
//!   function keys on request, under a key policy, with an audit log.
//! * [`client`]: encodes and encrypts a dataset into an encrypted-dataset file ([`dataset`]).
//! * [`trainer`]: trains a network whose first layer is computed over the encrypted data
//!   ([`secure`]), asking the authority for keys at every step; and, as the model owner,
//!   serves predictions on encrypted queries ([`inference`]).
//!
//! They talk through [`protocol`]; the servers share one network layer, [`net`]. The group is Ristretto255 ([`Curve`]).
#![deny(missing_docs)]

pub mod authority;
pub mod basis;
pub mod cli;
pub mod client;
pub mod dataset;
pub mod inference;
pub mod net;
pub mod protocol;
pub mod secure;
pub mod tls;
pub mod trainer;

/// A progress bar on stderr, hidden when `show` is false or stderr is not a terminal.
pub fn progress_bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    pb
}

/// The permission bits of `path` when group or others may access it (Unix; elsewhere always
/// `None`): the one rule for every secret file (master keys, tokens, TLS keys).
pub(crate) fn loose_permissions(path: &std::path::Path) -> std::io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
        Ok((mode & 0o077 != 0).then_some(mode))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path)?;
        Ok(None)
    }
}

/// The group every role uses.
pub type Curve = fe::Ristretto;
