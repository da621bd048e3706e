//! The async shell around the [`Scheduler`]: it turns the scheduler's requests into fetches
//! from LAN peers or the origin, verifies every response into the slot writer, and feeds the
//! outcomes back. One task owns the scheduler; fetches run concurrently, bounded by the
//! scheduler's caps.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sitecast_iso::{
    BlobLayout, DecodedItem, Device, ResponseDecoder, ResponseError, SlotError, SlotWriter,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::coordinator::CoordinatorClient;
use crate::pieces::{PieceLayout, PieceSet};
use crate::scheduler::{Action, Config, Event, PeerId, RequestId, Scheduler, Source};

/// How `layout`'s blob is cut into pieces: the same on every appliance of the site.
pub fn piece_layout(layout: &BlobLayout) -> PieceLayout {
    PieceLayout::new(layout.groups())
}

/// Groups of piece `piece` in `layout`.
pub fn piece_groups(layout: &BlobLayout, piece: u64) -> std::ops::Range<u64> {
    piece_layout(layout).groups_of(piece)
}

pub fn piece_count(layout: &BlobLayout) -> u64 {
    piece_layout(layout).pieces()
}

/// Why a fetch did not deliver a piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The sender lied: bytes that did not verify, or less than it claimed to have.
    Corrupt(String),
    /// The transfer failed (connection, timeout, refused).
    Failed(String),
}

/// Fetches raw responses (`[size][bao encoding]`) for group ranges from LAN peers.
pub trait LanFetcher: Send + Sync + 'static {
    fn fetch(
        &self,
        peer: PeerId,
        groups: std::ops::Range<u64>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, FetchError>> + Send>>;
}

/// What discovery and gossip tell the swarm.
#[derive(Debug, Clone)]
pub enum PeerNews {
    Up(PeerId),
    Down(PeerId),
    Have(PeerId, PieceSet),
}

/// What the swarm did, for reports and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub bytes_from_origin: u64,
    pub bytes_from_lan: u64,
    pub pieces_from_origin: u64,
    pub pieces_from_lan: u64,
    pub corrupt: u64,
    pub failed: u64,
    /// Pieces held (verified and written), of `pieces_total`.
    pub pieces_done: u64,
    pub pieces_total: u64,
}

/// Several transfers' figures together (an agent release's files, one swarm each).
impl std::ops::AddAssign for TransferStats {
    fn add_assign(&mut self, other: Self) {
        self.bytes_from_origin += other.bytes_from_origin;
        self.bytes_from_lan += other.bytes_from_lan;
        self.pieces_from_origin += other.pieces_from_origin;
        self.pieces_from_lan += other.pieces_from_lan;
        self.corrupt += other.corrupt;
        self.failed += other.failed;
        self.pieces_done += other.pieces_done;
        self.pieces_total += other.pieces_total;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("the swarm stopped: {0}")]
    Stopped(String),
    #[error("the download was replaced by a newer one")]
    Replaced,
}

pub struct Swarm<D: Device + Send + 'static> {
    scheduler: Scheduler,
    layout: BlobLayout,
    writer: Arc<Mutex<SlotWriter<D>>>,
    origin: Option<(CoordinatorClient, String)>,
    lan: Option<Arc<dyn LanFetcher>>,
    news: mpsc::Receiver<PeerNews>,
    announce: mpsc::Sender<PieceSet>,
    stats: Arc<Mutex<TransferStats>>,
    started: Instant,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl<D: Device + Send + 'static> std::fmt::Debug for Swarm<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm").field("layout", &self.layout).finish_non_exhaustive()
    }
}

type FetchOutcome = (RequestId, Source, u64, Result<Vec<DecodedItem>, FetchError>);

impl<D: Device + Send + 'static> Swarm<D> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: PeerId,
        writer: SlotWriter<D>,
        origin: Option<(CoordinatorClient, String)>,
        lan: Option<Arc<dyn LanFetcher>>,
        news: mpsc::Receiver<PeerNews>,
        announce: mpsc::Sender<PieceSet>,
        stats: Arc<Mutex<TransferStats>>,
        tune: impl FnOnce(&mut Config),
    ) -> Self {
        let layout = writer.layout();
        let pieces = piece_layout(&layout);
        let piece_bytes = pieces.groups_per_piece() * sitecast_iso::GROUP_BYTES;
        let mut config = Config::new(pieces.pieces(), piece_bytes);
        tune(&mut config);
        let mut scheduler = Scheduler::new(me, config);
        // Pieces already in the slot (resume, seeding) need not be fetched.
        let mut have = Vec::new();
        for piece in 0..piece_count(&layout) {
            if piece_groups(&layout, piece).all(|g| writer.has(g)) {
                have.push(piece..piece + 1);
            }
        }
        scheduler.handle_event(Event::HaveLocally { pieces: have }, Duration::ZERO);
        {
            let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.pieces_total = piece_count(&layout);
            stats.pieces_done = scheduler.have().count();
        }
        Self {
            scheduler,
            layout,
            writer: Arc::new(Mutex::new(writer)),
            origin,
            lan,
            news,
            announce,
            stats,
            started: Instant::now(),
            stop: None,
        }
    }

    /// Stops the swarm when `stop` fires (or its sender is dropped): a newer offer replaces
    /// this download. `run` then returns [`SwarmError::Replaced`] once no write is under way,
    /// with what was written checkpointed, so the slot can be handed to another writer.
    pub fn stop_on(mut self, stop: tokio::sync::oneshot::Receiver<()>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs until every piece is verified and written; returns the writer for `finish`.
    pub async fn run(mut self) -> Result<SlotWriter<D>, SwarmError> {
        let mut fetches: JoinSet<FetchOutcome> = JoinSet::new();
        let mut handles: BTreeMap<RequestId, tokio::task::AbortHandle> = BTreeMap::new();
        let mut news_open = true;
        let mut stop = self.stop.take();
        loop {
            while let Some(action) = self.scheduler.poll_action() {
                match action {
                    Action::Request { id, piece, source } => {
                        let handle = fetches.spawn(self.fetch(id, piece, source));
                        handles.insert(id, handle);
                    }
                    Action::Cancel { id } => {
                        if let Some(handle) = handles.remove(&id) {
                            handle.abort();
                        }
                    }
                    Action::Announce { have } => {
                        let _ = self.announce.try_send(have);
                    }
                    Action::Ban { peer, reason } => {
                        tracing::warn!(peer = %hex::encode(peer.0), %reason, "peer dropped for this release");
                    }
                    Action::Done => {
                        fetches.abort_all();
                        let writer = Arc::try_unwrap(self.writer)
                            .map_err(|_| {
                                SwarmError::Stopped("a fetch still holds the writer".into())
                            })?
                            .into_inner()
                            .unwrap_or_else(|p| p.into_inner());
                        return Ok(writer);
                    }
                }
            }
            let timeout = self.scheduler.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(at) => tokio::time::sleep_until(self.started + at).await,
                    None => std::future::pending().await,
                }
            };
            let stopped = async {
                match stop.as_mut() {
                    Some(stop) => {
                        let _ = stop.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Writes happen in `apply`, awaited in the other arms: none is under way here.
                () = stopped => {
                    fetches.abort_all();
                    while fetches.join_next().await.is_some() {}
                    let writer = Arc::clone(&self.writer);
                    tokio::task::spawn_blocking(move || {
                        writer.lock().unwrap_or_else(|p| p.into_inner()).checkpoint()
                    })
                    .await
                    .map_err(|e| SwarmError::Stopped(e.to_string()))??;
                    return Err(SwarmError::Replaced);
                }
                Some(joined) = fetches.join_next(), if !fetches.is_empty() => {
                    let Ok((id, source, bytes, result)) = joined else { continue };
                    handles.remove(&id);
                    let event = self.apply(id, source, bytes, result).await?;
                    let now = self.now();
                    self.scheduler.handle_event(event, now);
                    let done = self.scheduler.have().count();
                    self.stats.lock().unwrap_or_else(|p| p.into_inner()).pieces_done = done;
                }
                news = self.news.recv(), if news_open => {
                    let now = self.now();
                    match news {
                        Some(PeerNews::Up(peer)) => self.scheduler.handle_event(Event::PeerUp { peer }, now),
                        Some(PeerNews::Down(peer)) => self.scheduler.handle_event(Event::PeerDown { peer }, now),
                        Some(PeerNews::Have(peer, have)) => self.scheduler.handle_event(Event::PeerHave { peer, have }, now),
                        // Discovery ended: carry on with what we have (the origin at least).
                        None => news_open = false,
                    }
                }
                () = sleep => {
                    let now = self.now();
                    self.scheduler.handle_timeout(now);
                }
            }
        }
    }

    /// Fetches and verifies one piece (verification happens off the executor); the writer is
    /// not touched until every group of the piece has verified.
    fn fetch(
        &self,
        id: RequestId,
        piece: u64,
        source: Source,
    ) -> impl std::future::Future<Output = FetchOutcome> + Send + 'static {
        let groups = piece_groups(&self.layout, piece);
        let layout = self.layout;
        let origin = self.origin.clone();
        let lan = self.lan.clone();
        async move {
            let response = match source {
                Source::Origin => match &origin {
                    Some((client, url)) => client
                        .fetch_ranges(url, groups.start, groups.end)
                        .await
                        .map_err(|e| FetchError::Failed(e.to_string())),
                    None => Err(FetchError::Failed("no origin known".into())),
                },
                Source::Peer(peer) => match &lan {
                    Some(lan) => lan.fetch(peer, groups.clone()).await,
                    None => Err(FetchError::Failed("no LAN transport".into())),
                },
            };
            let bytes = response.as_ref().map_or(0, |b| b.len() as u64);
            let verified = match response {
                Ok(body) => {
                    tokio::task::spawn_blocking(move || decode(layout, groups, &body, source))
                        .await
                        .unwrap_or_else(|e| Err(FetchError::Failed(e.to_string())))
                }
                Err(error) => Err(error),
            };
            (id, source, bytes, verified)
        }
    }

    async fn apply(
        &self,
        request: RequestId,
        source: Source,
        bytes: u64,
        result: Result<Vec<DecodedItem>, FetchError>,
    ) -> Result<Event, SwarmError> {
        let count = |f: &dyn Fn(&mut TransferStats)| {
            f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()))
        };
        match result {
            Ok(items) => {
                count(&|stats| match source {
                    Source::Origin => {
                        stats.bytes_from_origin += bytes;
                        stats.pieces_from_origin += 1;
                    }
                    Source::Peer(_) => {
                        stats.bytes_from_lan += bytes;
                        stats.pieces_from_lan += 1;
                    }
                });
                let writer = Arc::clone(&self.writer);
                tokio::task::spawn_blocking(move || {
                    let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
                    for item in &items {
                        match item {
                            DecodedItem::Parent(parent) => writer.save_parent(parent)?,
                            DecodedItem::Group(group) => writer.write_group(group)?,
                        }
                    }
                    Ok::<_, SlotError>(())
                })
                .await
                .map_err(|e| SwarmError::Stopped(e.to_string()))??;
                Ok(Event::Completed { request })
            }
            Err(FetchError::Corrupt(reason)) => {
                count(&|stats| stats.corrupt += 1);
                tracing::warn!(?source, %reason, "corrupt response");
                Ok(Event::Corrupt { request })
            }
            Err(FetchError::Failed(reason)) => {
                count(&|stats| stats.failed += 1);
                tracing::debug!(?source, %reason, "fetch failed");
                Ok(Event::Failed { request })
            }
        }
    }
}

/// Verifies a whole response for `groups`; nothing is kept unless everything verifies.
fn decode(
    layout: BlobLayout,
    groups: std::ops::Range<u64>,
    body: &[u8],
    source: Source,
) -> Result<Vec<DecodedItem>, FetchError> {
    let ranges = layout.chunk_ranges(groups.clone());
    let decoder = ResponseDecoder::new(layout, &ranges, body).map_err(|e| classify(e, source))?;
    let mut items = Vec::new();
    let mut delivered = 0;
    for item in decoder {
        let item = item.map_err(|e| classify(e, source))?;
        if matches!(item, DecodedItem::Group(_)) {
            delivered += 1;
        }
        items.push(item);
    }
    if delivered != groups.end - groups.start {
        return Err(classify(ResponseError::Truncated, source));
    }
    Ok(items)
}

/// A peer that answers with less than it announced lies as much as one sending bad bytes; the
/// origin's connection, though, may just have been cut.
fn classify(error: ResponseError, source: Source) -> FetchError {
    match (&error, source) {
        (ResponseError::Io(_), _) | (ResponseError::Truncated, Source::Origin) => {
            FetchError::Failed(error.to_string())
        }
        _ => FetchError::Corrupt(error.to_string()),
    }
}
