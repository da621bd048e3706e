//! Agent releases on the appliance: which agent release this process is, what to do about an
//! offered one, and fetching its files into the launcher's store.
//!
//! The switch itself is one rename in the store (`sitecast-launcher`): the launcher sees it,
//! stops this process and starts the new version on trial. The new version's first
//! successful check-in is its proof of life; a version that crash-loops or never checks in is
//! rolled back by the launcher, and the agent that runs afterwards reports the rollback (see
//! [`sitecast_launcher::RollbackRecord`]) and never fetches that version again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

use sitecast_launcher::AgentStore;
use sitecast_manifest::api::{AgentOffer, UpdateState};
use sitecast_manifest::{AgentBuild, OsReleases};

use crate::coordinator::CoordinatorClient;
use crate::state::{AGENT_FETCH_ATTEMPTS, AgentUpdateRecord};

/// The agent release the OS image's own agent is: set at build time with
/// `SITECAST_AGENT_RELEASE=N cargo build`, 0 if not (any agent release is newer).
pub fn image_agent_release() -> u64 {
    option_env!("SITECAST_AGENT_RELEASE").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// How this process was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// The launcher's store (`SITECAST_AGENT_STORE`); `None`: not run by the launcher, so no
    /// agent release can be installed.
    pub store: Option<PathBuf>,
    /// The agent release this process is: the launcher's `SITECAST_AGENT_VERSION` if it
    /// started a version of its store, else the image's.
    pub release: u64,
    /// Whether it runs as a version of the store (which must confirm after a check-in).
    pub from_store: bool,
}

impl Launched {
    pub fn from_env() -> Self {
        let store = std::env::var_os("SITECAST_AGENT_STORE").map(PathBuf::from);
        let version = std::env::var("SITECAST_AGENT_VERSION").ok().and_then(|v| v.parse().ok());
        let from_store = store.is_some() && version.is_some();
        Self { store, release: version.unwrap_or_else(image_agent_release), from_store }
    }
}

/// What to do now about an agent offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferStep {
    Nothing,
    /// Verify the offer, then fetch and stage its files.
    Fetch,
    /// It is staged: switch to it (inside the window if the offer says so).
    Switch,
}

/// Decides from the offer and what the agent remembers: `record` (the last agent update),
/// `refused` (versions the launcher rolled back from), the release running, and whether a
/// fetch of the record's version is under way.
pub fn next_step(
    offer: &AgentOffer,
    record: Option<&AgentUpdateRecord>,
    refused: &[u64],
    running: u64,
    fetching: bool,
) -> OfferStep {
    if running == offer.version || refused.contains(&offer.version) {
        return OfferStep::Nothing;
    }
    let Some(record) = record.filter(|r| r.version == offer.version) else {
        return OfferStep::Fetch;
    };
    match record.state {
        UpdateState::Downloading if fetching => OfferStep::Nothing,
        // A restart interrupted the fetch: staging starts again from scratch.
        UpdateState::Downloading => OfferStep::Fetch,
        UpdateState::Ready => OfferStep::Switch,
        UpdateState::Failed if record.attempts < AGENT_FETCH_ATTEMPTS => OfferStep::Fetch,
        _ => OfferStep::Nothing,
    }
}

/// Fetches every file of `build` from `files_url` and installs version `version` in the store
/// at `store_root` (each file checked against the manifest before the version appears). Each
/// file streams from the network into the store's staging: no second copy on the data
/// partition, and bounded memory.
pub async fn fetch_and_stage(
    client: CoordinatorClient,
    cancel: Arc<AtomicBool>,
    store_root: PathBuf,
    version: u64,
    build: AgentBuild,
    os_releases: OsReleases,
    files_url: String,
) -> Result<(), String> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        // As it is: opening it for writing would empty `staging/`, which is the launcher's to
        // clean when it starts (no agent runs then).
        let store = AgentStore::at(&store_root);
        store
            .stage(version, &build, os_releases, |file| {
                let url = format!("{}/{}", files_url.trim_end_matches('/'), file.blake3.to_hex());
                let response = handle
                    .block_on(client.open_download(&url))
                    .map_err(|e| std::io::Error::other(format!("fetching {}: {e}", file.path)))?;
                let body = StreamReader::new(Box::pin(
                    response.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other)),
                ));
                let body = SyncIoBridge::new_with_handle(body, handle.clone());
                Ok(Box::new(Cancellable { inner: body, cancel: Arc::clone(&cancel) })
                    as Box<dyn Read>)
            })
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A reader that fails once `cancel` is set, so a replaced fetch stops at its next read.
struct Cancellable<R> {
    inner: R,
    cancel: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("fetch replaced by another"));
        }
        self.inner.read(buf)
    }
}

/// Makes `version` current in the store (the launcher then restarts into it).
pub fn switch(store_root: &Path, version: u64) -> Result<(), String> {
    let store = AgentStore::at(store_root);
    store.switch(version, jiff::Timestamp::now()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sitecast_manifest::api::UpdateIntent;

    fn offer(version: u64) -> AgentOffer {
        AgentOffer {
            version,
            manifest: String::new(),
            rollout: Some(1),
            intent: UpdateIntent::Upgrade,
            files: "http://cc/api/agent-releases/files".into(),
            in_window: false,
        }
    }

    fn record(version: u64, state: UpdateState, attempts: u32) -> AgentUpdateRecord {
        AgentUpdateRecord {
            version,
            manifest: String::new(),
            rollout: Some(1),
            intent: UpdateIntent::Upgrade,
            files: String::new(),
            in_window: false,
            state,
            error: None,
            attempts,
            started: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_rolled_back_version_is_never_fetched_again() {
        assert_eq!(next_step(&offer(3), None, &[3], 2, false), OfferStep::Nothing);
        assert_eq!(next_step(&offer(3), None, &[], 2, false), OfferStep::Fetch);
        assert_eq!(next_step(&offer(3), None, &[], 3, false), OfferStep::Nothing, "running it");
    }

    #[test]
    fn a_fetch_resumes_after_a_restart_and_gives_up_after_its_attempts() {
        let downloading = record(3, UpdateState::Downloading, 0);
        assert_eq!(next_step(&offer(3), Some(&downloading), &[], 2, true), OfferStep::Nothing);
        assert_eq!(next_step(&offer(3), Some(&downloading), &[], 2, false), OfferStep::Fetch);
        let failed = record(3, UpdateState::Failed, AGENT_FETCH_ATTEMPTS - 1);
        assert_eq!(next_step(&offer(3), Some(&failed), &[], 2, false), OfferStep::Fetch);
        let given_up = record(3, UpdateState::Failed, AGENT_FETCH_ATTEMPTS);
        assert_eq!(next_step(&offer(3), Some(&given_up), &[], 2, false), OfferStep::Nothing);
        // Another version offered since: that one is fetched.
        assert_eq!(next_step(&offer(4), Some(&given_up), &[], 2, false), OfferStep::Fetch);
    }

    #[test]
    fn a_staged_version_is_switched_to_and_a_switched_one_waits_for_the_launcher() {
        let ready = record(3, UpdateState::Ready, 0);
        assert_eq!(next_step(&offer(3), Some(&ready), &[], 2, false), OfferStep::Switch);
        let switched = record(3, UpdateState::Rebooting, 0);
        assert_eq!(next_step(&offer(3), Some(&switched), &[], 2, false), OfferStep::Nothing);
    }
}
