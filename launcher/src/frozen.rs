//! The frozen path: when the agent keeps crashing (and so cannot take an update the normal
//! way), the launcher asks Central Command itself for the newest agent release that fits,
//! verifies it against the pinned root, stages it and switches to it.
//!
//! What the launcher needs to reach Central Command is what the agent last used successfully,
//! recorded in `frozen.json` in the store after its check-ins ([`FrozenPath`]): a
//! configuration that breaks the agent later does not break the way to its fix. The endpoint
//! (`GET /api/agent-releases/latest`) answers with the signed manifest alone, whose format
//! never changes with the server, and the files come by their BLAKE3, so this code can stay
//! as it is for the life of the image.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::{
    HEADER_APPLIANCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, appliance_signing_bytes,
};
use sitecast_manifest::{AgentPolicy, Intent, SecretKey, TrustedRoot, VerifyError};

use crate::store::{AgentStore, StoreError, write_synced};

const FILE: &str = "frozen.json";
/// The manifest is small: a server that does not send it in this long is not waited for.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A file of a large agent over a slow link may take long; not forever.
const FILE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How to reach Central Command, as the agent last did successfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenPath {
    /// Central Command's base URL.
    pub coordinator: String,
    /// The CA its certificate must chain to; `None`: the system's roots.
    #[serde(default)]
    pub coordinator_ca: Option<PathBuf>,
    /// The root of trust agent releases are verified against.
    pub root: PathBuf,
    /// The appliance's identity key (files are served to enrolled appliances only).
    pub identity_key: PathBuf,
    pub platform: String,
    /// The OS release the appliance runs.
    pub os_release: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FrozenError {
    #[error("no frozen.json: the agent never checked in from this store")]
    NotRecorded,
    #[error("{0}")]
    Unusable(String),
    #[error("Central Command: {0}")]
    Http(String),
    #[error("Central Command has no newer agent release for this appliance")]
    NoneNewer,
    #[error("the agent release is refused: {0}")]
    Refused(#[from] VerifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FrozenPath {
    /// The recorded path, if the agent wrote one (an unreadable file counts as none).
    pub fn read(store: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(store.join(FILE)).ok()?).ok()
    }

    /// Records the path unless the same one is recorded already (no write per check-in).
    pub fn record(&self, store: &Path) -> Result<(), StoreError> {
        if Self::read(store).as_ref() == Some(self) {
            return Ok(());
        }
        write_synced(&store.join(FILE), &serde_json::to_vec_pretty(self).expect("plain data"))
    }
}

/// Fetches the newest agent release above `above` that has a build for this appliance,
/// verifies it, installs it in `store` and makes it current. Returns its version.
/// `booted_os`: the OS release the launcher read itself, if it could (else the agent's);
/// `root`: the root of trust the launcher was given, if any (else the agent's).
pub fn fetch_latest(
    store: &AgentStore,
    above: u64,
    booted_os: Option<u64>,
    root: Option<&Path>,
    now: Timestamp,
) -> Result<u64, FrozenError> {
    let mut path = FrozenPath::read(store.root()).ok_or(FrozenError::NotRecorded)?;
    path.os_release = booted_os.unwrap_or(path.os_release);
    if let Some(root) = root {
        path.root = root.to_owned();
    }
    let unusable = |what: &Path, e: &dyn std::fmt::Display| {
        FrozenError::Unusable(format!("{}: {e}", what.display()))
    };
    let root_bytes = std::fs::read(&path.root).map_err(|e| unusable(&path.root, &e))?;
    let root = TrustedRoot::pin(&root_bytes)?;
    let key_text = std::fs::read_to_string(&path.identity_key)
        .map_err(|e| unusable(&path.identity_key, &e))?;
    let key = SecretKey::from_file_text(&key_text).map_err(|e| unusable(&path.identity_key, &e))?;
    let client = Client::new(&path, key)?;

    let base = path.coordinator.trim_end_matches('/');
    let query = [
        ("platform", path.platform.clone()),
        ("os_release", path.os_release.to_string()),
        ("above", above.to_string()),
    ];
    let url = reqwest::Url::parse_with_params(&format!("{base}/api/agent-releases/latest"), &query)
        .map_err(|e| FrozenError::Unusable(format!("{base}: {e}")))?
        .to_string();
    let mut response = client.get(&url, false, MANIFEST_TIMEOUT)?;
    match response.status() {
        reqwest::StatusCode::NOT_FOUND => return Err(FrozenError::NoneNewer),
        status if !status.is_success() => {
            return Err(FrozenError::Http(format!("{url}: {status}")));
        }
        _ => {}
    }
    let mut manifest = Vec::new();
    response
        .by_ref()
        .take(sitecast_manifest::MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_end(&mut manifest)
        .map_err(|e| FrozenError::Http(e.to_string()))?;
    // The server is not trusted for any of it: the root, the platform, the OS release and
    // "newer" are checked here.
    let verified = root.verify_agent_release(&manifest, now)?;
    let policy = AgentPolicy {
        platform: path.platform.clone(),
        os_release: path.os_release,
        installed_version: above,
        intent: Intent::Upgrade,
    };
    let build = verified.build_for(&policy)?;
    let version = verified.release().version;
    store.stage(version, build, verified.release().os_releases, |file| {
        let url = format!("{base}/api/agent-releases/files/{}", file.blake3.to_hex());
        let response = client.get(&url, true, FILE_TIMEOUT).map_err(std::io::Error::other)?;
        if !response.status().is_success() {
            return Err(std::io::Error::other(format!("{url}: {}", response.status())));
        }
        Ok(Box::new(response) as Box<dyn Read>)
    })?;
    store.switch(version, now)?;
    Ok(version)
}

/// A blocking HTTPS client with the agent's trust settings, signing with its identity key.
struct Client {
    http: reqwest::blocking::Client,
    key: SecretKey,
}

impl Client {
    fn new(path: &FrozenPath, key: SecretKey) -> Result<Self, FrozenError> {
        let trust = match &path.coordinator_ca {
            Some(ca) => sitecast_tls::Trust::CaFile(ca.clone()),
            None => sitecast_tls::Trust::SystemRoots,
        };
        let builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(FILE_TIMEOUT);
        let builder = match sitecast_tls::client_config(&trust) {
            Ok(tls) => builder.tls_backend_preconfigured(tls),
            Err(error) if path.coordinator.starts_with("https://") => {
                return Err(FrozenError::Unusable(format!("TLS: {error}")));
            }
            Err(_) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                builder
            }
        };
        let http = builder.build().map_err(|e| FrozenError::Http(e.to_string()))?;
        Ok(Self { http, key })
    }

    /// `GET url`, signed as the appliance if `sign`; the caller looks at the status.
    fn get(
        &self,
        url: &str,
        sign: bool,
        timeout: Duration,
    ) -> Result<reqwest::blocking::Response, FrozenError> {
        let mut request = self.http.get(url).timeout(timeout);
        if sign {
            let parsed = reqwest::Url::parse(url).map_err(|e| FrozenError::Http(e.to_string()))?;
            let timestamp = Timestamp::now().as_second();
            let message = appliance_signing_bytes("GET", parsed.path(), timestamp, b"");
            request = request
                .header(HEADER_APPLIANCE, self.key.public().to_hex())
                .header(HEADER_TIMESTAMP, timestamp.to_string())
                .header(HEADER_SIGNATURE, self.key.sign(&message).to_hex());
        }
        request.send().map_err(|e| FrozenError::Http(chain(&e)))
    }
}

/// `error` and what caused it (reqwest's own message alone does not say what went wrong).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(error) = next {
        text = format!("{text}: {error}");
        next = error.source();
    }
    text
}
