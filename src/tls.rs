//! TLS for the roles that serve (the authority, the prediction service) and their callers.
//!
//! Servers present a self-signed certificate ([`generate_pair`], written by `authority init`
//! or at a prediction service's first start); callers trust exactly that certificate: they
//! *pin* it ([`pinned_client`]), comparing the end-entity certificate the server presents
//! with the pinned one byte for byte, and still check the handshake's signatures with it, so
//! only the holder of the matching private key can complete the handshake. No certificate
//! authority, host name or expiry is involved: the certificate file is the trust anchor, and
//! it is handed to callers beside the token.
//!
//! The cryptography is rustls's with its `ring` provider: TLS 1.3 and 1.2, their safe
//! default cipher suites.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use zeroize::Zeroizing;

/// File of a server's certificate (PEM), in the authority's key directory.
pub const CERT_FILE: &str = "cert.pem";
/// File of the certificate's private key (PEM, PKCS#8), mode 0600.
pub const KEY_FILE: &str = "cert.key";
/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Errors of the TLS set-up.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A private key file may be read by group or others.
    #[error(
        "{} is readable by group or others (mode {mode:04o}); restrict it with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate or key file does not hold what it should.
    #[error("{}: {reason}", .path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The certificate could not be generated.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration (a key that does not match the certificate, ...).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn io_err(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The crypto provider of every TLS configuration of this crate (rustls with `ring`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The names a generated certificate is made for when none are given.
pub fn default_names() -> Vec<String> {
    vec!["localhost".to_string(), "127.0.0.1".to_string()]
}

/// A new self-signed certificate for `names` (host names or IP addresses, which become its
/// subject alternative names) and its private key, both in PEM.
pub fn generate_pair(names: &[String]) -> Result<(String, Zeroizing<String>), TlsError> {
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((
        made.cert.pem(),
        Zeroizing::new(made.key_pair.serialize_pem()),
    ))
}

/// Generates a certificate for `names` and writes it to `cert` (mode 0644) and its key to
/// `key` (mode 0600), each atomically. Returns the certificate's [`fingerprint`].
pub fn write_pair(cert: &Path, key: &Path, names: &[String]) -> Result<String, TlsError> {
    let (cert_pem, key_pem) = generate_pair(names)?;
    let bad = |path: &Path| {
        let path = path.to_path_buf();
        move |e: fe::FeError| TlsError::BadFile {
            path,
            reason: e.to_string(),
        }
    };
    fe::serial::write_atomic(key, key_pem.as_bytes(), true).map_err(bad(key))?;
    fe::serial::write_atomic(cert, cert_pem.as_bytes(), false).map_err(bad(cert))?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
        TlsError::Generate(format!("the generated certificate does not parse: {e}"))
    })?;
    Ok(fingerprint(&der))
}

/// The SHA-256 of a certificate's DER encoding, in hex: what callers can compare by eye.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads a small file whole.
fn read_small(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    f.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut out)
        .map_err(|e| io_err(path, e))?;
    if out.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::BadFile {
            path: path.to_path_buf(),
            reason: "file too large".into(),
        });
    }
    Ok(out)
}

/// Refuses a private key file that group or others may access (Unix only).
pub fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    match crate::loose_permissions(path).map_err(|e| io_err(path, e))? {
        Some(mode) => Err(TlsError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        }),
        None => Ok(()),
    }
}

/// Reads the first certificate of a PEM file.
pub fn read_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let bytes = read_small(path)?;
    CertificateDer::pem_slice_iter(&bytes)
        .next()
        .ok_or_else(|| TlsError::BadFile {
            path: path.to_path_buf(),
            reason: "no certificate (a PEM block \"CERTIFICATE\") in the file".into(),
        })?
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate: {e}"),
        })
}

/// The server configuration for the certificate file `cert` and the private key file `key`
/// (refused if group or others may read it).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = vec![read_cert(cert)?];
    check_key_mode(key)?;
    let bytes = Zeroizing::new(read_small(key)?);
    let key_der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::BadFile {
        path: key.to_path_buf(),
        reason: format!("not a PEM private key: {e}"),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts exactly the certificate in the PEM file `cert`.
pub fn pinned_client(cert: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    pinned_client_der(read_cert(cert)?)
}

/// A client configuration that trusts exactly the certificate `cert` (DER).
pub fn pinned_client_der(
    cert: CertificateDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    pinned_client_sha256(Sha256::digest(cert.as_ref()).into())
}

/// A client configuration that trusts exactly the certificate whose [`fingerprint`] is
/// `hex` (64 hexadecimal digits, colons and a `sha256:` prefix allowed): what `authority
/// init` and `trainer serve` print, for callers that have no copy of the certificate file.
pub fn pinned_client_fingerprint(hex: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let digits: String = hex
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bad = || {
        TlsError::Generate(format!(
            "{hex:?} is not a SHA-256 certificate fingerprint (64 hexadecimal digits)"
        ))
    };
    if digits.len() != 64 || !digits.is_ascii() {
        return Err(bad());
    }
    let mut sha = [0u8; 32];
    for (i, b) in sha.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    pinned_client_sha256(sha)
}

/// A client configuration that trusts exactly the certificate with this SHA-256.
fn pinned_client_sha256(sha256: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = PinnedCert {
        sha256,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name a client gives the server in its handshake: the host part of `addr` (a host
/// name, or an IP address, which is not sent), `localhost` when it is neither. The pinned
/// certificate decides whom to trust, so the name only matters to servers that choose a
/// certificate by it.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("localhost"))
        .map_err(|e| TlsError::Generate(format!("no server name for {addr}: {e}")))
}

/// Accepts exactly one end-entity certificate, and checks the handshake's signatures with
/// it (so the server proves it holds the certificate's private key).
#[derive(Debug)]
struct PinnedCert {
    /// SHA-256 of the one certificate's DER encoding.
    sha256: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether the first bytes a peer sent look like a TLS record (a handshake or an alert,
/// versions 1.0 to 1.3): how a server or client tells a TLS peer from a clear-text one.
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x15 | 0x16, 0x03, ..] | [0x15 | 0x16])
}
