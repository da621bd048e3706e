//! An agent release's files as blobs of the site swarm, like an image: each file is fetched
//! group by group from site peers that hold it and, for what none of them has, as verified
//! ranges from the origin, every 16 KiB group checked against the file's BLAKE3 before it is
//! written. So a site fetches about one copy of an agent release from Central Command, not
//! one per appliance.
//!
//! The files live in a cache on the data partition (`<state_dir>/agent-files/<blake3>`, each
//! with its progress record and outboard, as a slot has), which survives a restart of the
//! agent: an interrupted fetch resumes, and the files stay served to the site's later rollout
//! stages after the switch. The cache holds one release's files: starting the fetch of
//! another removes the rest. The store's copy of a file is a hard link to the cache's (same
//! data partition), so a release takes its size there once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sitecast_iso::{SlotPaths, SlotWriter};
use sitecast_manifest::{Blake3Hash, ImageInfo};
use tokio_util::sync::CancellationToken;

use crate::agent::Lan;
use crate::coordinator::CoordinatorClient;
use crate::scheduler::PeerId;
use crate::swarm::{Swarm, TransferStats};

/// How long a file's swarm learns who holds it before it asks the origin. Longer than an
/// image's: an agent rollout usually reaches a site in stages, so most of its peers never
/// join (the grace does not end early), and the ones that hold the files from an earlier
/// stage may only now be dialled, from this offer's site peers; they announce every second
/// (heartbeat). Two heartbeats cost an agent update nothing a user sees, and a WAN copy is
/// worth far more.
const DISCOVERY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The cache of agent release files on the data partition.
#[derive(Debug, Clone)]
pub struct FileCache {
    dir: PathBuf,
}

impl FileCache {
    pub fn new(state_dir: &Path) -> Self {
        Self::at(state_dir.join("agent-files"))
    }

    /// A cache of other blobs fetched through the site swarm (a release's content index).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `blob` and its records (progress, outboard), named by its hash.
    pub fn paths(&self, blob: &Blake3Hash) -> SlotPaths {
        SlotPaths::beside(&self.dir.join(blob.to_hex().as_str()), &self.dir)
    }

    /// Whether `file` is held whole, every group verified (its progress record says so).
    /// The file itself is only read: it may be the agent that runs (linked into the store).
    /// Blocking.
    pub fn holds(&self, file: &ImageInfo) -> bool {
        let paths = self.paths(&file.blake3);
        if file.size == 0 {
            return paths.slot.exists();
        }
        paths.slot.metadata().is_ok_and(|m| m.len() >= file.size) && paths.recorded_complete(file)
    }

    /// Removes every file (and its records) whose hash is not in `keep`; returns the hashes
    /// removed. Blocking.
    pub fn keep_only(&self, keep: &BTreeSet<Blake3Hash>) -> std::io::Result<Vec<Blake3Hash>> {
        let mut removed = BTreeSet::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let stem = name.as_deref().and_then(|n| n.split('.').next()).unwrap_or_default();
            match Blake3Hash::from_hex(stem) {
                Ok(hash) if keep.contains(&hash) => {}
                Ok(hash) => {
                    std::fs::remove_file(&path)?;
                    removed.insert(hash);
                }
                // Not ours (nothing else is written here): left alone.
                Err(_) => {}
            }
        }
        Ok(removed.into_iter().collect())
    }
}

/// Where and how an agent release's files are fetched.
#[derive(Clone)]
pub struct FileSources {
    pub client: CoordinatorClient,
    /// `{ranges}/{blake3 hex}/ranges?start=&end=`: the origin's verified ranges.
    pub ranges: String,
    pub lan: Option<Arc<dyn Lan>>,
    pub me: PeerId,
    /// The site's members as Central Command named them.
    pub site_members: Vec<PeerId>,
}

impl std::fmt::Debug for FileSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSources")
            .field("ranges", &self.ranges)
            .field("lan", &self.lan.is_some())
            .finish_non_exhaustive()
    }
}

/// Fetches `file` into `cache` through the site swarm (nothing if it is held already) and
/// keeps serving it to site peers; returns what crossed the WAN and the LAN for it.
pub async fn fetch_file(
    sources: &FileSources,
    cache: &FileCache,
    file: &ImageInfo,
    cancel: &CancellationToken,
) -> Result<TransferStats, String> {
    let origin = format!("{}/{}/ranges", sources.ranges.trim_end_matches('/'), file.blake3);
    fetch_blob(sources, cache, file, origin, cancel).await
}

/// [`fetch_file`] for any blob whose verified ranges are at `origin`.
pub async fn fetch_blob(
    sources: &FileSources,
    cache: &FileCache,
    file: &ImageInfo,
    origin: String,
    cancel: &CancellationToken,
) -> Result<TransferStats, String> {
    let paths = cache.paths(&file.blake3);
    if file.size == 0 {
        // No group to fetch or verify: the empty file is the file.
        std::fs::create_dir_all(&cache.dir).map_err(|e| format!("agent file cache: {e}"))?;
        std::fs::write(&paths.slot, b"").map_err(|e| format!("agent file cache: {e}"))?;
        return Ok(TransferStats::default());
    }
    let (held, holder) = (cache.clone(), file.clone());
    if tokio::task::spawn_blocking(move || held.holds(&holder)).await.unwrap_or(false) {
        // Held whole already (a file the release shares with the one before): never opened
        // for writing, which a running program's file refuses.
        if let Some(lan) = &sources.lan {
            lan.serve_installed(file, paths.slot, cache.dir.clone());
        }
        return Ok(TransferStats::default());
    }
    let (dir, open_file, open_paths) = (cache.dir.clone(), file.clone(), paths.clone());
    let writer = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let data = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&open_paths.slot)?;
        // The writer needs room for the whole file, as a partition has.
        if data.metadata()?.len() < open_file.size {
            data.set_len(open_file.size)?;
        }
        // The slot name means nothing for a file: it only names what a slot writer checks.
        SlotWriter::open_paths(sitecast_iso::Slot::A, &open_file, &open_paths)
            .map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("agent file cache: {e}"))?;
    let stats = Arc::new(Mutex::new(TransferStats::default()));
    if !writer.is_complete() {
        let (fetcher, news, announce) = match &sources.lan {
            Some(lan) => {
                let joined = lan.join(file, paths.slot.clone(), cache.dir.clone());
                (Some(joined.fetcher), joined.news, joined.announce)
            }
            None => {
                let (_tx, news) = tokio::sync::mpsc::channel(1);
                let (announce, _rx) = tokio::sync::mpsc::channel(1);
                (None, news, announce)
            }
        };
        let members = sources.site_members.clone();
        let swarm = Swarm::new(
            sources.me,
            writer,
            Some((sources.client.clone(), origin)),
            fetcher,
            news,
            announce,
            Arc::clone(&stats),
            |config| {
                config.site_members = members;
                config.discovery_grace = DISCOVERY_GRACE;
            },
        );
        let writer = tokio::select! {
            result = swarm.run() => result.map_err(|e| e.to_string())?,
            // Dropping the swarm loses nothing but groups written since its last checkpoint:
            // the progress record only ever names groups that verified.
            () = cancel.cancelled() => return Err("fetch replaced by another".into()),
        };
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", file.blake3))?;
    }
    if let Some(lan) = &sources.lan {
        lan.serve_installed(file, paths.slot, cache.dir.clone());
    }
    let stats = *stats.lock().unwrap_or_else(|p| p.into_inner());
    Ok(stats)
}
