//! One image download into the standby slot, as a task: the files it needs besides the
//! image's groups (the outboard from Central Command; the content index through the site
//! swarm, so a site fetches it about once), the groups the active slot already holds, then
//! the swarm for the rest, and the slot read back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sitecast_iso::{
    BlobLayout, FileDevice, OutboardStore, Slot, SlotPaths, SlotWriter, VerifiedSlot,
};
use sitecast_manifest::{ContentIndex, ImageInfo};
use tokio::sync::{mpsc, oneshot};

use crate::agent::Lan;
use crate::agent_files::{self, FileCache, FileSources};
use crate::coordinator::CoordinatorClient;
use crate::mirror::Mirrors;
use crate::outboard;
use crate::reuse::{self, Reused};
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
    /// Where the image's outboard is, for mirrors and for copying from the active slot.
    pub outboard_url: Option<String>,
    pub mirrors: Vec<String>,
    pub reuse: Option<ReuseFrom>,
    pub state_dir: PathBuf,
    pub me: PeerId,
    pub site_members: Vec<PeerId>,
    pub lan: Option<Arc<dyn Lan>>,
    pub stats: Arc<Mutex<TransferStats>>,
}

/// The active slot and the release's content index, to copy what they share.
pub(super) struct ReuseFrom {
    pub index: ContentIndex,
    /// Central Command's verified ranges of the index.
    pub index_url: String,
    pub active: PathBuf,
    /// The size of the image in the active slot, when the agent knows it.
    pub active_len: Option<u64>,
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
        let outboard_path = state_dir.join(format!("outboard-{}.obao4", image.blake3));
        let index_cache = index_cache(&state_dir);
        // The outboard and the index come first; a newer offer may replace this download
        // meanwhile. Without them the download goes on, fetching everything.
        let wants_outboard = !self.mirrors.is_empty() || self.reuse.is_some();
        let outboard = match (&self.outboard_url, wants_outboard) {
            (Some(url), true) => tokio::select! {
                fetched = outboard::fetch(client, url, layout, &outboard_path) => match fetched {
                    Ok(outboard) => Some(outboard),
                    Err(error) => {
                        tracing::warn!(%error, "no outboard: no mirrors, nothing copied from the active slot");
                        None
                    }
                },
                _ = &mut stopped => return Err(SwarmError::Replaced.to_string()),
            },
            _ => None,
        };
        let reuse = match (&self.reuse, &outboard) {
            (Some(from), Some(_)) => tokio::select! {
                fetched = self.fetch_index(from, &index_cache) => match fetched {
                    Ok(path) => Some((path, from.active.clone(), from.active_len)),
                    Err(error) => {
                        tracing::warn!(%error, "no content index: nothing copied from the active slot");
                        None
                    }
                },
                _ = &mut stopped => return Err(SwarmError::Replaced.to_string()),
            },
            _ => None,
        };
        let mirrors = match (&outboard, self.mirrors.is_empty()) {
            (Some(_), false) => {
                let urls = self.mirrors.clone();
                let prepared = Mirrors::prepare(
                    client,
                    self.outboard_url.as_deref().unwrap_or_default(),
                    urls,
                    layout,
                    outboard_path.clone(),
                )
                .await;
                prepared
                    .map(Arc::new)
                    .map_err(|error| tracing::warn!(%error, "the release's mirrors are not used"))
                    .ok()
            }
            _ => None,
        };

        let (open_paths, open_image, open_slot) = (paths.clone(), image.clone(), slot);
        let (writer, reused) = tokio::task::spawn_blocking(move || {
            let mut writer = SlotWriter::open_paths(open_slot, &open_image, &open_paths)?;
            let reused = match (reuse, outboard) {
                (Some((index, active, active_len)), Some(outboard)) => {
                    copy_from_active(&mut writer, &outboard, &index, &active, active_len)
                }
                _ => Reused::default(),
            };
            Ok::<_, sitecast_iso::SlotError>((writer, reused))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).bytes_reused += reused.bytes;

        let Self { client, ranges_url, me, site_members, stats, .. } = self;
        let origin = ranges_url.map(|url| (client, url));
        let tune = |config: &mut Config| config.site_members = site_members;
        let mut swarm = Swarm::new(me, writer, origin, lan_fetcher, news, announce, stats, tune)
            .stop_on(stopped);
        if let Some(mirrors) = &mirrors {
            swarm = swarm.with_mirrors(Arc::clone(mirrors));
        }
        let ran = swarm.run().await;
        if ran.is_ok() {
            let _ = tokio::fs::remove_file(&outboard_path).await;
        }
        let writer = ran.map_err(|e| e.to_string())?;
        tracing::info!("every piece verified and written; reading the slot back");
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// Where the content index of the release being fetched or run is kept.
pub(super) fn index_cache(state_dir: &std::path::Path) -> FileCache {
    FileCache::at(state_dir.join("release-index"))
}

impl Download {
    /// The release's content index, through the site swarm (peers first, Central Command for
    /// what none has), every group verified against the signed hash; kept and served to the
    /// site's later stages until another release's index replaces it. Its path.
    async fn fetch_index(&self, from: &ReuseFrom, cache: &FileCache) -> Result<PathBuf, String> {
        let file = from.index.file();
        let keep = std::collections::BTreeSet::from([file.blake3]);
        let pruned = cache.clone();
        let removed = tokio::task::spawn_blocking(move || pruned.keep_only(&keep))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("index cache: {e}"))?;
        let sources = FileSources {
            client: self.client.clone(),
            ranges: String::new(),
            lan: self.lan.clone(),
            me: self.me,
            site_members: self.site_members.clone(),
        };
        if let Some(lan) = &self.lan {
            for blob in &removed {
                lan.unserve(blob);
            }
        }
        let cancel = tokio_util::sync::CancellationToken::new();
        let stats =
            agent_files::fetch_blob(&sources, cache, &file, from.index_url.clone(), &cancel)
                .await?;
        tracing::info!(
            bytes = file.size,
            from_origin = stats.bytes_from_origin,
            from_lan = stats.bytes_from_lan,
            "content index fetched"
        );
        let mut total = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        total.bytes_from_origin += stats.bytes_from_origin;
        total.bytes_from_lan += stats.bytes_from_lan;
        Ok(cache.paths(&file.blake3).slot)
    }
}

/// [`reuse::copy_from_active`], logged; a failure only means more to fetch.
fn copy_from_active(
    writer: &mut SlotWriter<FileDevice>,
    outboard: &OutboardStore<FileDevice>,
    index: &std::path::Path,
    active: &std::path::Path,
    active_len: Option<u64>,
) -> Reused {
    let started = std::time::Instant::now();
    match reuse::copy_from_active(writer, outboard, index, active, active_len) {
        Ok(reused) => {
            tracing::info!(
                groups = reused.groups,
                bytes = reused.bytes,
                refused = reused.refused,
                scanned = reused.scanned,
                seconds = started.elapsed().as_secs_f64(),
                "copied from the active slot what the new image shares with it"
            );
            reused
        }
        Err(error) => {
            tracing::warn!(%error, "nothing more copied from the active slot");
            Reused::default()
        }
    }
}
