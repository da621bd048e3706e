//! One image download into the standby slot, as a task: the files it needs besides the
//! image's groups (the outboard and the content index, through the site swarm so that a site
//! fetches each about once), the groups the active slot already holds, then the swarm for the
//! rest, and the slot read back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sitecast_delta::plan::PlanReader;
use sitecast_iso::{
    BlobLayout, FileDevice, OutboardStore, Slot, SlotPaths, SlotWriter, VerifiedSlot,
};
use sitecast_manifest::api::{BlobOffer, InstalledImage};
use sitecast_manifest::{ContentIndex, ImageInfo};
use tokio::sync::{mpsc, oneshot};

use crate::agent::Lan;
use crate::agent_files::{self, FileCache, FileSources};
use crate::coordinator::CoordinatorClient;
use crate::mirror::Mirrors;
use crate::outboard;
use crate::patch::Patches;
use crate::reuse::{self, ActiveParts, slot_holds};
use crate::scheduler::{Config, PeerId};
use crate::swarm::{Swarm, SwarmError, TransferStats};

/// Everything a download task needs, gathered by the agent when it starts one.
pub(super) struct Download {
    pub image: ImageInfo,
    pub slot: Slot,
    pub paths: SlotPaths,
    pub client: CoordinatorClient,
    /// Central Command's verified ranges.
    pub ranges_url: Option<String>,
    /// Central Command's plain bytes of the image (`OriginUrls::bytes`): the rest of groups
    /// the active slot holds in part.
    pub bytes_url: Option<String>,
    /// Where the image's outboard is, for mirrors and for copying from the active slot.
    pub outboard_url: Option<String>,
    /// The same outboard as a blob the site shares, if Central Command offers it so.
    pub outboard_blob: Option<BlobOffer>,
    /// The image's group hashes as a blob the site shares (half the outboard), if Central
    /// Command offers them: the outboard is rebuilt from them.
    pub group_hashes_blob: Option<BlobOffer>,
    /// A plan for updating from the image Central Command says the active slot holds, as a
    /// blob the site shares: used instead of the index and group hashes when the slot holds
    /// that image.
    pub plan_blob: Option<BlobOffer>,
    pub mirrors: Vec<String>,
    pub reuse: Option<ReuseFrom>,
    pub state_dir: PathBuf,
    pub me: PeerId,
    pub site_members: Vec<PeerId>,
    pub lan: Option<Arc<dyn Lan>>,
    pub stats: Arc<Mutex<TransferStats>>,
    /// Set to the image Central Command names for the active slot once the slot's bytes
    /// confirm it, for the agent to record.
    pub active_confirmed: Arc<Mutex<Option<InstalledImage>>>,
}

/// The active slot and the release's content index, to copy what they share.
#[derive(Clone)]
pub(super) struct ReuseFrom {
    pub index: ContentIndex,
    /// Central Command's verified ranges of the index.
    pub index_url: String,
    pub active: PathBuf,
    /// The size of the image in the active slot, when the agent knows it.
    pub active_len: Option<u64>,
    /// The BLAKE3 (hex) of the image in the active slot, when the agent knows it.
    pub active_blake3: Option<String>,
    /// The image Central Command says the active slot holds: checked against the slot's
    /// bytes, and then known, when the agent did not record one itself.
    pub installed: Option<InstalledImage>,
}

impl ReuseFrom {
    /// How much of the active slot to read, and which image it holds, if known: as the agent
    /// recorded them, else as Central Command says once the slot's bytes confirm it.
    /// Blocking: may hash the image's bytes in the slot.
    fn active_image(&self, stop: &AtomicBool) -> (Option<u64>, Option<String>) {
        let recorded = (self.active_len, self.active_blake3.clone());
        let (None, Some(image)) = (&self.active_blake3, self.installed) else { return recorded };
        match slot_holds(&self.active, image, stop) {
            Ok(true) => {
                tracing::info!(blake3 = %image.blake3, size = image.size, "the active slot holds the image Central Command names");
                (Some(image.size), Some(image.blake3.to_hex()))
            }
            Ok(false) => {
                tracing::info!(blake3 = %image.blake3, "the active slot does not hold the image Central Command names; reading all of it");
                recorded
            }
            Err(error) => {
                tracing::warn!(%error, "reading the active slot");
                recorded
            }
        }
    }
}

impl Download {
    /// Runs to a verified slot; a newer offer (`stopped`) ends it with [`SwarmError::Replaced`].
    pub(super) async fn run(
        self,
        mut stopped: oneshot::Receiver<()>,
    ) -> Result<VerifiedSlot<FileDevice>, String> {
        let (image, slot, paths) = (self.image.clone(), self.slot, self.paths.clone());
        let (client, state_dir) = (&self.client, self.state_dir.clone());
        let layout = BlobLayout::new(image.blake3, image.size);
        // The site hears of this appliance at once. One that first copies from its active slot
        // says so: the others wait for it before fetching from the origin what it may soon
        // hold. News wait in the LAN's bounded queues meanwhile.
        let (lan_fetcher, news, announce) = match &self.lan {
            Some(lan) if self.reuse.is_some() => {
                let joined = lan.join_preparing(&image, paths.slot.clone(), state_dir.clone());
                (Some(joined.fetcher), joined.news, joined.announce)
            }
            Some(lan) => {
                let joined = lan.join(&image, paths.slot.clone(), state_dir.clone());
                (Some(joined.fetcher), joined.news, joined.announce)
            }
            None => {
                let (_tx, news) = mpsc::channel(1);
                let (announce, _rx) = mpsc::channel(1);
                (None, news, announce)
            }
        };
        let cache = release_files(&state_dir);
        self.keep_in_cache(&cache).await;
        // Reading the active slot (hashing it, copying from it) gives way to a newer offer.
        let stop = Arc::new(AtomicBool::new(false));
        // Which image the active slot holds, when the agent recorded it or Central Command
        // names one that the slot's bytes confirm.
        let active = match &self.reuse {
            Some(from) => {
                let (from, stop_hashing) = (from.clone(), Arc::clone(&stop));
                let mut hashing =
                    tokio::task::spawn_blocking(move || from.active_image(&stop_hashing));
                tokio::select! {
                    known = &mut hashing => known.unwrap_or_default(),
                    _ = &mut stopped => {
                        stop.store(true, Ordering::Relaxed);
                        let _ = hashing.await;
                        return Err(SwarmError::Replaced.to_string());
                    }
                }
            }
            None => (None, None),
        };
        if let (Some(from), (_, Some(_))) = (&self.reuse, &active)
            && from.active_blake3.is_none()
        {
            *self.active_confirmed.lock().unwrap_or_else(|p| p.into_inner()) = from.installed;
        }
        // With a plan for the pair, the outboard comes from the plan and the active slot;
        // else the outboard and the index come first. A newer offer may replace this
        // download meanwhile. Without them the download goes on, fetching everything.
        // The plan is from the image Central Command names; one the agent recorded otherwise
        // is not fetched.
        let names_active = |blake3: &str| {
            let installed = self.reuse.as_ref().and_then(|r| r.installed);
            installed.is_none_or(|image| image.blake3.to_hex() == blake3)
        };
        let planned = match (&self.plan_blob, &active) {
            (Some(blob), (Some(len), Some(blake3))) if names_active(blake3) => tokio::select! {
                planned = self.outboard_from_plan(blob, layout, &cache, (*len, blake3), &stop) => planned,
                _ = &mut stopped => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(SwarmError::Replaced.to_string());
                }
            },
            _ => None,
        };
        let wants_outboard = !self.mirrors.is_empty() || self.reuse.is_some();
        let (outboard, plan) = match planned {
            Some((outboard, path, plan)) => (Some((outboard, path)), Some(plan)),
            None if wants_outboard => tokio::select! {
                prepared = self.outboard(layout, &cache) => (prepared, None),
                _ = &mut stopped => return Err(SwarmError::Replaced.to_string()),
            },
            None => (None, None),
        };
        let outboard_path = outboard.as_ref().map(|(_, path)| path.clone());
        let outboard = outboard.map(|(outboard, _)| outboard);
        let reuse = match (&self.reuse, &outboard, plan) {
            (Some(from), Some(_), Some(plan)) => {
                Some((CopySource::Plan(plan), from.active.clone()))
            }
            (Some(from), Some(_), None) => tokio::select! {
                fetched = self.fetch_index(from, &cache) => match fetched {
                    Ok(path) => Some((CopySource::Index(path), from.active.clone())),
                    Err(error) => {
                        tracing::warn!(%error, "no content index: nothing copied from the active slot");
                        None
                    }
                },
                _ = &mut stopped => return Err(SwarmError::Replaced.to_string()),
            },
            _ => None,
        };
        let mirrors = match (&outboard_path, self.mirrors.is_empty()) {
            (Some(path), false) => {
                let urls = self.mirrors.clone();
                let prepared = Mirrors::prepare(
                    client,
                    self.outboard_url.as_deref().unwrap_or_default(),
                    urls,
                    layout,
                    path.clone(),
                )
                .await;
                prepared
                    .map(Arc::new)
                    .map_err(|error| tracing::warn!(%error, "the release's mirrors are not used"))
                    .ok()
            }
            _ => None,
        };

        let active_image = active;
        let (open_paths, open_image, open_slot) = (paths.clone(), image.clone(), slot);
        // Copying reads the whole active slot: a newer offer stops it between batches.
        let stop_copy = Arc::clone(&stop);
        let copy_stats = Arc::clone(&self.stats);
        let mut copying = tokio::task::spawn_blocking(move || {
            let mut writer = SlotWriter::open_paths(open_slot, &open_image, &open_paths)?;
            let patch = match (reuse, outboard) {
                (Some((source, active)), Some(outboard)) => {
                    let (active_len, active_blake3) = active_image;
                    // Counted as written: check-ins record it, so a restart goes on from there.
                    let mut written = |bytes| {
                        copy_stats.lock().unwrap_or_else(|p| p.into_inner()).bytes_reused += bytes;
                    };
                    let parts = copy_from_active(
                        &mut writer,
                        &outboard,
                        &source,
                        &active,
                        active_len,
                        &stop_copy,
                        &mut written,
                    );
                    // What the slot holds of the groups it could not copy whole: the swarm
                    // fetches only the rest of those from Central Command, compressed
                    // against the slot's bytes nearby when it knows the slot's release.
                    let reference = active_blake3
                        .filter(|_| !parts.runs.is_empty())
                        .map(|from| (from, parts.runs));
                    (!parts.partial.is_empty() || reference.is_some())
                        .then(|| FileDevice::open_read_only(&active).ok())
                        .flatten()
                        .map(|active| (parts.partial, reference, active, outboard))
                }
                _ => None,
            };
            Ok::<_, sitecast_iso::SlotError>((writer, patch))
        });
        let copied = tokio::select! {
            copied = &mut copying => copied,
            _ = &mut stopped => {
                stop.store(true, Ordering::Relaxed);
                let _ = copying.await;
                let _ = tokio::fs::remove_file(own_outboard(&state_dir, &image)).await;
                return Err(SwarmError::Replaced.to_string());
            }
        };
        let (writer, patch) = copied.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;

        let Self { client, ranges_url, bytes_url, me, site_members, stats, .. } = self;
        let origin = ranges_url.map(|url| (client, url));
        let tune = |config: &mut Config| config.site_members = site_members;
        let mut swarm = Swarm::new(me, writer, origin, lan_fetcher, news, announce, stats, tune)
            .stop_on(stopped);
        if let Some(mirrors) = &mirrors {
            swarm = swarm.with_mirrors(Arc::clone(mirrors));
        }
        if let (Some((partial, reference, active, outboard)), Some(url)) = (patch, bytes_url) {
            tracing::info!(
                groups = partial.len(),
                bytes = partial.bytes(),
                reference = reference.is_some(),
                "the active slot holds parts of groups: only the rest is fetched of those"
            );
            let patches = Patches::new(partial, active, outboard, url).with_reference(reference);
            swarm = swarm.with_patches(Arc::new(patches));
        }
        let ran = swarm.run().await;
        // An outboard of its own is not needed any more (a retry fetches it again); one
        // shared with the site stays in the cache, served to later stages.
        let _ = tokio::fs::remove_file(own_outboard(&state_dir, &image)).await;
        let writer = ran.map_err(|e| e.to_string())?;
        tracing::info!("every piece verified and written; reading the slot back");
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// Where the files a release's download shares with the site besides its image (its content
/// index, its outboard) are kept, and served from while the release is fetched or run.
pub(super) fn release_files(state_dir: &std::path::Path) -> FileCache {
    FileCache::at(state_dir.join("release-files"))
}

/// How long a release's index, group hashes or outboard may take through the site swarm before the download
/// goes on without it: this, plus its size at [`SIDE_FILE_RATE`] bytes a second.
const SIDE_FILE_TIME: Duration = Duration::from_secs(60);
const SIDE_FILE_RATE: u64 = 128 * 1024;

/// The outboard of `layout`'s image rebuilt from the group hashes at `hashes`, if they hash
/// to its root, and moved to `path` only then: a file there is always a complete outboard
/// (`outboard::fetch` takes one of the right length as left by an earlier start).
async fn rebuild_outboard(
    layout: BlobLayout,
    hashes: PathBuf,
    path: PathBuf,
) -> Result<OutboardStore<FileDevice>, String> {
    let rebuilt = tokio::task::spawn_blocking(move || rebuild_outboard_at(layout, &hashes, &path));
    match rebuilt.await.map_err(|e| e.to_string())? {
        Ok(Some(outboard)) => Ok(outboard),
        Ok(None) => Err("they do not hash to the signed root".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// [`rebuild_outboard`], blocking; `None` when the group hashes do not hash to the root.
fn rebuild_outboard_at(
    layout: BlobLayout,
    hashes: &std::path::Path,
    path: &std::path::Path,
) -> std::io::Result<Option<OutboardStore<FileDevice>>> {
    let partial = path.with_extension("rebuilding");
    let rebuild = || {
        // What an earlier start left of a rebuild is rebuilt again.
        let mut device = FileDevice::open_or_create(&partial)?;
        device.set_len(0)?;
        let mut outboard = OutboardStore::new(layout, device);
        let matches = outboard.rebuild_from_group_hashes(std::fs::File::open(hashes)?)?;
        drop(outboard);
        if !matches {
            return Ok(None);
        }
        std::fs::rename(&partial, path)?;
        Ok(Some(OutboardStore::new(layout, FileDevice::open_read_only(path)?)))
    };
    let rebuilt = rebuild();
    let _ = std::fs::remove_file(&partial);
    rebuilt
}

/// Where an outboard fetched from Central Command alone, or rebuilt, is kept during a
/// download.
fn own_outboard(state_dir: &std::path::Path, image: &ImageInfo) -> PathBuf {
    state_dir.join(format!("outboard-{}.obao4", image.blake3))
}

impl Download {
    /// Removes from the cache what another release left there (and stops serving it).
    async fn keep_in_cache(&self, cache: &FileCache) {
        let keep: std::collections::BTreeSet<_> = (self.reuse.iter().map(|r| r.index.blake3))
            .chain(self.outboard_blob.iter().map(|b| b.blake3))
            .chain(self.group_hashes_blob.iter().map(|b| b.blake3))
            .chain(self.plan_blob.iter().map(|b| b.blake3))
            .collect();
        let pruned = cache.clone();
        let removed = tokio::task::spawn_blocking(move || pruned.keep_only(&keep)).await;
        match removed {
            Ok(Ok(removed)) => {
                if let Some(lan) = &self.lan {
                    removed.iter().for_each(|blob| lan.unserve(blob));
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "release file cache"),
            Err(error) => tracing::warn!(%error, "release file cache"),
        }
    }

    /// The image's outboard and where it is: rebuilt from the group hashes the site shares,
    /// else shared through the site swarm as it is, else fetched from Central Command alone.
    /// Rebuilt, all of it must hash to the signed root; fetched, its top pair must chain to it
    /// (the rest is checked as it is used).
    async fn outboard(
        &self,
        layout: BlobLayout,
        cache: &FileCache,
    ) -> Option<(OutboardStore<FileDevice>, PathBuf)> {
        let path = own_outboard(&self.state_dir, &self.image);
        if let Some(blob) =
            self.group_hashes_blob.as_ref().filter(|b| b.size == layout.group_hashes_len())
        {
            let file = blob.file();
            let shared = self.fetch_shared(&file, blob.ranges.clone(), cache, "group hashes").await;
            let rebuilt = match shared {
                Ok(hashes) => rebuild_outboard(layout, hashes, path.clone()).await,
                Err(error) => Err(error),
            };
            match rebuilt {
                Ok(outboard) => return Some((outboard, path)),
                Err(error) => {
                    tracing::warn!(%error, "the site's group hashes are not used; fetching the outboard")
                }
            }
        }
        if let Some(blob) = self.outboard_blob.as_ref().filter(|b| b.size == layout.outboard_len())
        {
            let file = blob.file();
            let shared = self.fetch_shared(&file, blob.ranges.clone(), cache, "outboard").await;
            let opened = shared.and_then(|path| {
                let device = FileDevice::open_read_only(&path).map_err(|e| e.to_string())?;
                let outboard = OutboardStore::new(layout, device);
                match outboard.root_matches() {
                    Ok(true) => Ok((outboard, path)),
                    Ok(false) => Err("it does not chain to the signed root".to_owned()),
                    Err(error) => Err(error.to_string()),
                }
            });
            match opened {
                Ok(opened) => return Some(opened),
                Err(error) => {
                    tracing::warn!(%error, "the site's outboard is not used; asking Central Command")
                }
            }
        }
        let url = self.outboard_url.as_ref()?;
        match outboard::fetch(&self.client, url, layout, &path).await {
            Ok(outboard) => Some((outboard, path)),
            Err(error) => {
                tracing::warn!(%error, "no outboard: no mirrors, nothing copied from the active slot");
                None
            }
        }
    }

    /// The image's outboard, rebuilt from a plan for the pair (fetched through the site
    /// swarm like the group hashes) and the active slot, which holds the image `active`
    /// (size, BLAKE3 hex) the plan must be from; with where it is and the plan's path. `None`,
    /// logged, when the plan is not fetched or is not for this slot or its tree does not hash
    /// to the signed root: the caller then fetches the index and the group hashes.
    async fn outboard_from_plan(
        &self,
        blob: &BlobOffer,
        layout: BlobLayout,
        cache: &FileCache,
        active: (u64, &str),
        stop: &Arc<AtomicBool>,
    ) -> Option<(OutboardStore<FileDevice>, PathBuf, PathBuf)> {
        let path = own_outboard(&self.state_dir, &self.image);
        let made = async {
            let plan = self.fetch_shared(&blob.file(), blob.ranges.clone(), cache, "plan").await?;
            let slot = self.reuse.as_ref().map(|r| r.active.clone()).ok_or("no active slot")?;
            let (size, blake3, stop) = (active.0, active.1.to_owned(), Arc::clone(stop));
            let (plan_path, outboard_path) = (plan.clone(), path.clone());
            let made = tokio::task::spawn_blocking(move || {
                let hashes = outboard_path.with_extension("plan-hashes");
                let made = (|| {
                    let file = std::fs::File::open(&plan_path).map_err(|e| e.to_string())?;
                    let plan = PlanReader::new(file, layout.size).map_err(|e| e.to_string())?;
                    let header = plan.header;
                    if header.from_size != size || hex::encode(header.from_blake3) != blake3 {
                        return Err("it is for another image than the active slot holds".to_owned());
                    }
                    reuse::group_hashes_from_plan(&plan_path, &slot, layout, &hashes, &stop)
                        .map_err(|e| e.to_string())?;
                    rebuild_outboard_at(layout, &hashes, &outboard_path)
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| "its tree does not hash to the signed root".to_owned())
                })();
                // A blocking task runs to its end even when a newer offer replaced the
                // download meanwhile: it leaves nothing behind then.
                let _ = std::fs::remove_file(&hashes);
                if stop.load(Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&outboard_path);
                    return Err(SwarmError::Replaced.to_string());
                }
                made
            });
            let outboard = made.await.map_err(|e| e.to_string())??;
            Ok::<_, String>((outboard, path, plan))
        };
        match made.await {
            Ok(made) => {
                tracing::info!("the outboard is rebuilt from the plan and the active slot");
                Some(made)
            }
            Err(error) => {
                tracing::warn!(%error, "the plan is not used; fetching the index and group hashes");
                None
            }
        }
    }

    /// The release's content index through the site swarm. Its path.
    async fn fetch_index(&self, from: &ReuseFrom, cache: &FileCache) -> Result<PathBuf, String> {
        self.fetch_shared(&from.index.file(), from.index_url.clone(), cache, "content index").await
    }

    /// `file` through the site swarm (peers first, Central Command's verified ranges at
    /// `ranges` for what none has), every group verified against its hash; kept and served to
    /// the site's later stages until another release's files replace it. Its path.
    async fn fetch_shared(
        &self,
        file: &ImageInfo,
        ranges: String,
        cache: &FileCache,
        what: &str,
    ) -> Result<PathBuf, String> {
        let sources = FileSources {
            client: self.client.clone(),
            ranges: String::new(),
            lan: self.lan.clone(),
            me: self.me,
            site_members: self.site_members.clone(),
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        // The site swarm asks Central Command again and again for what no peer has: bounded,
        // since the download goes on without this file.
        let bound = SIDE_FILE_TIME + Duration::from_secs(file.size / SIDE_FILE_RATE);
        let fetched = agent_files::fetch_blob(&sources, cache, file, ranges, &cancel);
        let stats = tokio::time::timeout(bound, fetched)
            .await
            .map_err(|_| format!("not fetched within {bound:?}"))??;
        tracing::info!(
            bytes = file.size,
            from_origin = stats.bytes_from_origin,
            from_lan = stats.bytes_from_lan,
            "{what} fetched"
        );
        let mut total = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        total.bytes_from_origin += stats.bytes_from_origin;
        total.bytes_from_lan += stats.bytes_from_lan;
        Ok(cache.paths(&file.blake3).slot)
    }
}

/// Where the copy from the active slot learns what the slot holds of the new image.
enum CopySource {
    /// The release's content index (at this path): the slot is cut to find its chunks.
    Index(PathBuf),
    /// A plan for the pair (at this path), checked to be from the image the slot holds.
    Plan(PathBuf),
}

/// [`reuse::copy_from_active`] or [`reuse::copy_with_plan`], logged: what the active slot
/// holds of the groups left; a failure only means more to fetch.
fn copy_from_active(
    writer: &mut SlotWriter<FileDevice>,
    outboard: &OutboardStore<FileDevice>,
    source: &CopySource,
    active: &std::path::Path,
    active_len: Option<u64>,
    stop: &AtomicBool,
    written: &mut dyn FnMut(u64),
) -> ActiveParts {
    let started = std::time::Instant::now();
    let copied = match source {
        CopySource::Index(index) => {
            reuse::copy_from_active(writer, outboard, index, active, active_len, stop, written)
        }
        CopySource::Plan(plan) => {
            reuse::copy_with_plan(writer, outboard, plan, active, stop, written)
        }
    };
    match copied {
        Ok((reused, parts)) => {
            tracing::info!(
                groups = reused.groups,
                bytes = reused.bytes,
                refused = reused.refused,
                scanned = reused.scanned,
                seconds = started.elapsed().as_secs_f64(),
                plan = matches!(source, CopySource::Plan(_)),
                "copied from the active slot what the new image shares with it"
            );
            parts
        }
        Err(error) => {
            tracing::warn!(%error, "nothing more copied from the active slot");
            ActiveParts::default()
        }
    }
}
