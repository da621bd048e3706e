//! Agent releases on the appliance: which agent release this process is, what to do about an
//! offered one, and fetching its files into the launcher's store.
//!
//! The switch itself is one rename in the store (`sitecast-launcher`): the launcher sees it,
//! stops this process and starts the new version on trial. The new version's first
//! successful check-in is its proof of life; a version that crash-loops or never checks in is
//! rolled back by the launcher, and the agent that runs afterwards reports the rollback (see
//! [`sitecast_launcher::RollbackRecord`]) and never fetches that version again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;

use sitecast_launcher::AgentStore;
use sitecast_manifest::api::{AgentOffer, UpdateState};
use sitecast_manifest::{AgentBuild, Blake3Hash, ImageInfo, OsReleases};

use crate::agent_files::{self, FileCache, FileSources};
use crate::coordinator::CoordinatorClient;
use crate::state::{AGENT_FETCH_ATTEMPTS, AgentUpdateRecord};
use crate::swarm::TransferStats;

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
        // Given up after its attempts, or refused: a new rollout of the same release (the
        // operator's answer to a failure) tries again from the start.
        UpdateState::Failed
            if record.attempts < AGENT_FETCH_ATTEMPTS || record.rollout != offer.rollout =>
        {
            OfferStep::Fetch
        }
        _ => OfferStep::Nothing,
    }
}

/// An agent release to fetch and stage.
#[derive(Debug)]
pub struct AgentFetch {
    pub client: CoordinatorClient,
    /// Stops the fetch (another offer replaces it).
    pub cancel: CancellationToken,
    /// The launcher's store.
    pub store_root: PathBuf,
    pub version: u64,
    pub build: AgentBuild,
    pub os_releases: OsReleases,
    /// `{files}/{blake3}`: whole files, from servers that offer no verified ranges.
    pub files_url: String,
    /// Through the site swarm into the file cache, where the server offers verified ranges.
    pub swarm: Option<(FileSources, FileCache)>,
}

/// Fetches every file of the release and installs it in the store (each file checked against
/// the manifest before the version appears); returns what crossed the WAN and the LAN.
pub async fn fetch_and_stage(fetch: AgentFetch) -> Result<TransferStats, String> {
    match fetch.swarm.clone() {
        Some((sources, cache)) => fetch_through_swarm(fetch, sources, cache).await,
        None => fetch_whole_files(fetch).await,
    }
}

/// Each distinct file through the site swarm into the cache, then staged from there.
async fn fetch_through_swarm(
    fetch: AgentFetch,
    sources: FileSources,
    cache: FileCache,
) -> Result<TransferStats, String> {
    let files: BTreeMap<Blake3Hash, ImageInfo> = (fetch.build.files.iter())
        .map(|f| (f.blake3, ImageInfo { size: f.size, blake3: f.blake3, sha256: f.sha256 }))
        .collect();
    let keep = files.keys().copied().collect();
    let pruned = cache.clone();
    let removed = tokio::task::spawn_blocking(move || pruned.keep_only(&keep))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("agent file cache: {e}"))?;
    if let Some(lan) = &sources.lan {
        for blob in &removed {
            lan.unserve(blob);
        }
    }
    let mut total = TransferStats::default();
    for file in files.values() {
        total += agent_files::fetch_file(&sources, &cache, file, &fetch.cancel).await?;
    }
    tokio::task::spawn_blocking(move || {
        // The store as it is (opening it for writing would empty `staging/`, which is the
        // launcher's to clean when it starts, when no agent runs). Files are linked from the
        // cache, not copied: the release takes its size once on the data partition, and the
        // cache goes on serving the same bytes to site peers.
        let store = AgentStore::at(&fetch.store_root);
        store
            .stage_linked(fetch.version, &fetch.build, fetch.os_releases, |file| {
                cache.paths(&file.blake3).slot
            })
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(total)
}

/// Each file streamed whole from Central Command into the store's staging: no second copy
/// on the data partition, and bounded memory.
async fn fetch_whole_files(fetch: AgentFetch) -> Result<TransferStats, String> {
    let handle = tokio::runtime::Handle::current();
    let AgentFetch { client, cancel, store_root, version, build, os_releases, files_url, .. } =
        fetch;
    let size: u64 = build.files.iter().map(|f| f.size).sum();
    tokio::task::spawn_blocking(move || {
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
                Ok(Box::new(Cancellable { inner: body, cancel: cancel.clone() }) as Box<dyn Read>)
            })
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(TransferStats { bytes_from_origin: size, ..TransferStats::default() })
}

/// A reader that fails once `cancel` is set, so a replaced fetch stops at its next read.
struct Cancellable<R> {
    inner: R,
    cancel: CancellationToken,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
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
            ranges: Some("http://cc/api/blobs".into()),
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
            bytes_from_origin: 0,
            bytes_from_lan: 0,
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
        // The same version in a new rollout: tried again.
        let again = AgentOffer { rollout: Some(2), ..offer(3) };
        assert_eq!(next_step(&again, Some(&given_up), &[], 2, false), OfferStep::Fetch);
    }

    #[test]
    fn a_staged_version_is_switched_to_and_a_switched_one_waits_for_the_launcher() {
        let ready = record(3, UpdateState::Ready, 0);
        assert_eq!(next_step(&offer(3), Some(&ready), &[], 2, false), OfferStep::Switch);
        let switched = record(3, UpdateState::Rebooting, 0);
        assert_eq!(next_step(&offer(3), Some(&switched), &[], 2, false), OfferStep::Nothing);
    }
}
