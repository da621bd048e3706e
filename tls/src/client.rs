//! The client side: whom to trust, and why a server was refused.

use std::error::Error;
use std::path::PathBuf;

use rustls::RootCertStore;

use crate::{TlsError, provider, read, read_certificates};

/// Which certificate authorities a client accepts a server's certificate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's store (Debian: `/etc/ssl/certs`, from `ca-certificates`; `SSL_CERT_FILE`
    /// and `SSL_CERT_DIR` override it, as for OpenSSL).
    SystemRoots,
    /// Only the certificates in this PEM file: a fleet with its own CA pins it, and a
    /// certificate any public CA issued for the same name is refused.
    CaFile(PathBuf),
}

/// A client config for HTTP/1.1 over TLS that verifies servers against `trust`.
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::SystemRoots => {
            let found = rustls_native_certs::load_native_certs();
            // A store with a few unreadable entries is still a store; only an empty one is
            // an error (it would refuse every server, and say nothing about why).
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.iter().map(|e| format!(": {e}")).collect::<String>();
                return Err(TlsError::NoSystemRoots(why));
            }
        }
        Trust::CaFile(path) => {
            for certificate in read_certificates(path, &read(path)?)? {
                roots
                    .add(certificate)
                    .map_err(|error| TlsError::BadCertificate { path: path.clone(), error })?;
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The TLS error behind `error` if a handshake failed on the server's certificate (expired,
/// another CA's, another host's), looked for through every layer an HTTP client wraps it in.
pub fn certificate_refusal(error: &(dyn Error + 'static)) -> Option<rustls::Error> {
    if let Some(tls @ rustls::Error::InvalidCertificate(_)) = error.downcast_ref::<rustls::Error>()
    {
        return Some(tls.clone());
    }
    // `io::Error::source` skips the error it wraps (hyper wraps rustls's io::Error in another
    // one), so look inside it.
    if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
        && let Some(found) = certificate_refusal(inner)
    {
        return Some(found);
    }
    certificate_refusal(error.source()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_found_inside_io_errors_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
        let outer = std::io::Error::other(inner);
        assert_eq!(certificate_refusal(&outer), Some(tls));
        let unrelated = std::io::Error::other(std::io::Error::other("connection reset"));
        assert_eq!(certificate_refusal(&unrelated), None);
    }
}
