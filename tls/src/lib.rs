//! TLS for sitecast's HTTP between appliances, operators and Central Command.
//!
//! - [`client_config`]: whom a client trusts: the system's roots, or only a fleet's own CA
//!   from a file (pinning).
//! - [`server_config`]: Central Command's certificate and key from PEM files, read again when
//!   the files change, so a renewed certificate needs no restart and a half-written renewal
//!   never takes the server down.
//! - [`certificate_refusal`]: why a client refused a server, found in whatever error an HTTP
//!   client wrapped it in, so an appliance can say so in its status.
//!
//! rustls with ring, as everywhere in sitecast; no OpenSSL.

mod client;
mod server;

use std::path::{Path, PathBuf};

pub use client::{Trust, certificate_refusal, client_config};
pub use rustls;
pub use server::{CertificateFiles, server_config};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: not PEM: {error}")]
    Pem { path: PathBuf, error: rustls::pki_types::pem::Error },
    #[error("{path}: no certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {error}")]
    BadCertificate { path: PathBuf, error: rustls::Error },
    #[error("{path}: no usable private key in it ({error})")]
    BadKey { path: PathBuf, error: rustls::Error },
    #[error("the system has no trusted root certificates{0}")]
    NoSystemRoots(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider of every config made here.
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error })
}

/// Every certificate in `bytes`, PEM read from `path`, in order; at least one.
fn read_certificates(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { path: path.to_owned(), error })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certificates)
}

#[cfg(feature = "test-ca")]
pub mod test_ca;
