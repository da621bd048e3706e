//! The origin over iroh-blobs as well as HTTP: every release's image is imported into an
//! iroh-blobs store by reference (no copy) and served with the stock `BlobsProtocol`, so any
//! iroh-blobs client, and every appliance's LAN client, can fetch verified ranges from the
//! coordinator too.

use std::net::SocketAddr;
use std::path::Path;

use iroh::protocol::Router;
use iroh::{Endpoint, RelayMode};
use iroh_blobs::api::blobs::{AddPathOptions, ImportMode};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobFormat, BlobsProtocol};

#[derive(Debug, thiserror::Error)]
pub enum IrohOriginError {
    #[error("iroh origin: {0}")]
    Start(String),
    #[error("importing {path} into the iroh-blobs store: {error}")]
    Import { path: String, error: String },
}

/// A running iroh-blobs provider over the coordinator's images.
#[derive(Debug)]
pub struct IrohOrigin {
    store: FsStore,
    router: Router,
}

impl IrohOrigin {
    /// Opens the store in `dir` and serves it on `listen` with the key in `dir/iroh.key`
    /// (created on first start): direct addresses only, no relay.
    pub async fn start(dir: &Path, listen: SocketAddr) -> Result<Self, IrohOriginError> {
        let fail = |e: &dyn std::fmt::Display| IrohOriginError::Start(e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let key_path = dir.join("iroh.key");
        let seed: [u8; 32] = match std::fs::read(&key_path) {
            Ok(bytes) => bytes.try_into().map_err(|_| fail(&"iroh.key is not 32 bytes"))?,
            Err(_) => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| fail(&e))?;
                write_private(&key_path, &seed).map_err(|e| fail(&e))?;
                seed
            }
        };
        let endpoint = Endpoint::builder(iroh::endpoint::presets::Minimal)
            .secret_key(iroh::SecretKey::from_bytes(&seed))
            .relay_mode(RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr(listen)
            .map_err(|e| fail(&e))?
            .bind()
            .await
            .map_err(|e| fail(&e))?;
        let store = FsStore::load(dir.join("store")).await.map_err(|e| fail(&e))?;
        let blobs = BlobsProtocol::new(&store, None);
        let router = Router::builder(endpoint).accept(iroh_blobs::ALPN, blobs).spawn();
        Ok(Self { store, router })
    }

    /// Adds an image (an absolute path to a regular file) by reference.
    pub async fn add(&self, path: &Path) -> Result<(), IrohOriginError> {
        let path = std::fs::canonicalize(path).map_err(|e| IrohOriginError::Import {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        let options = AddPathOptions {
            path: path.clone(),
            mode: ImportMode::TryReference,
            format: BlobFormat::Raw,
        };
        self.store.add_path_with_opts(options).await.map_err(|e| IrohOriginError::Import {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Ok(())
    }

    /// `<endpoint id hex>@<ip:port>` for each bound socket.
    pub fn addresses(&self) -> Vec<String> {
        let endpoint = self.router.endpoint();
        let id = hex::encode(endpoint.id().as_bytes());
        endpoint.bound_sockets().iter().map(|addr| format!("{id}@{addr}")).collect()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
