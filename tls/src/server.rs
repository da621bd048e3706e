//! The server side: a certificate that follows its files.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::{TlsError, provider, read, read_certificates};

/// A certificate chain (leaf first) and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A server config for HTTP/1.1 over TLS with the certificate in `files`. Fails if the files
/// are unusable now; afterwards, each handshake checks whether they changed and loads them
/// again if so. A change that cannot be loaded (a renewal written half-way, a key that does
/// not match) keeps the previous certificate in service and is logged once.
pub fn server_config(files: CertificateFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Reloading::new(files)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct Reloading {
    files: CertificateFiles,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The files' bytes when `key` was loaded, or when loading them last failed. Compared
    /// byte for byte: modification times are too coarse to see a quick rewrite, and the files
    /// are a few KiB.
    files: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
}

impl Reloading {
    fn new(files: CertificateFiles) -> Result<Self, TlsError> {
        let contents = (read(&files.certificate)?, read(&files.key)?);
        let key = Arc::new(load(&files, &contents)?);
        Ok(Self { files, loaded: Mutex::new(Loaded { files: contents, key }) })
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Two small files from the page cache, read outside the lock so handshakes do not
        // queue behind each other's reads; negligible beside the handshake's signature.
        let contents = (read(&self.files.certificate), read(&self.files.key));
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Unreadable for a moment (being replaced): the loaded certificate is still good.
        let (Ok(certificate), Ok(key)) = contents else {
            return Some(Arc::clone(&loaded.key));
        };
        let contents = (certificate, key);
        if contents != loaded.files {
            match load(&self.files, &contents) {
                Ok(key) => {
                    tracing::info!(certificate = %self.files.certificate.display(), "TLS certificate reloaded");
                    loaded.key = Arc::new(key);
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS certificate changed but cannot be loaded; still serving the previous one")
                }
            }
            // Either way this version of the files is dealt with: a failure is logged once,
            // not at every handshake until the files change again.
            loaded.files = contents;
        }
        Some(Arc::clone(&loaded.key))
    }
}

fn load(
    files: &CertificateFiles,
    (certificate, key): &(Vec<u8>, Vec<u8>),
) -> Result<CertifiedKey, TlsError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain = read_certificates(&files.certificate, certificate)?;
    let bad_key = |error| TlsError::BadKey { path: files.key.clone(), error };
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| bad_key(rustls::Error::General(e.to_string())))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(bad_key)
}
