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
use sitecast_manifest::api;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::coordinator::{ClientError, CoordinatorClient};
use crate::mirror::Mirrors;
use crate::patch::Patches;
use crate::pieces::{PieceLayout, PieceSet};
use crate::scheduler::{Action, Assignment, Config, Event, PeerId, RequestId, Scheduler, Source};

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
    /// A LAN peer had no upload slot free: ask another, or it again shortly.
    Busy,
}

/// Fetches raw responses (`[size][bao encoding]`) for group ranges from LAN peers.
pub trait LanFetcher: Send + Sync + 'static {
    fn fetch(
        &self,
        peer: PeerId,
        groups: std::ops::Range<u64>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, FetchError>> + Send>>;
}

/// What an appliance tells its site about a release: the pieces it holds, and those it is
/// fetching from the origin (which the others leave to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub have: PieceSet,
    pub fetching: PieceSet,
}

/// What discovery and gossip tell the swarm.
#[derive(Debug, Clone)]
pub enum PeerNews {
    /// The peer is up and shares out origin pieces this way.
    Up(PeerId, Assignment),
    Down(PeerId),
    Have(PeerId, Holding),
    /// The peer copies what it already has before it fetches (it will soon hold most).
    Preparing(PeerId),
}

/// What the swarm did, for reports and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// From Central Command.
    pub bytes_from_origin: u64,
    pub bytes_from_lan: u64,
    /// From the release's mirrors (plain bytes; their pieces count as from the origin).
    pub bytes_from_mirror: u64,
    /// Mirrors given up (failed, or sent bytes that did not verify).
    pub mirrors_given_up: u64,
    /// Copied from the active slot (what the new image shares with the running one).
    pub bytes_reused: u64,
    pub pieces_from_origin: u64,
    pub pieces_from_lan: u64,
    pub corrupt: u64,
    pub failed: u64,
    /// LAN requests a peer refused for want of a free upload slot.
    pub busy: u64,
    /// Pieces held (verified and written), of `pieces_total`.
    pub pieces_done: u64,
    pub pieces_total: u64,
    /// When the swarm finished: live site peers that still missed pieces.
    pub peers_missing_pieces: u64,
}

/// Several transfers' figures together (an agent release's files, one swarm each).
impl std::ops::AddAssign for TransferStats {
    fn add_assign(&mut self, other: Self) {
        self.bytes_from_origin += other.bytes_from_origin;
        self.bytes_from_lan += other.bytes_from_lan;
        self.bytes_from_mirror += other.bytes_from_mirror;
        self.mirrors_given_up += other.mirrors_given_up;
        self.bytes_reused += other.bytes_reused;
        self.pieces_from_origin += other.pieces_from_origin;
        self.pieces_from_lan += other.pieces_from_lan;
        self.corrupt += other.corrupt;
        self.failed += other.failed;
        self.busy += other.busy;
        self.pieces_done += other.pieces_done;
        self.pieces_total += other.pieces_total;
        self.peers_missing_pieces += other.peers_missing_pieces;
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
    /// The groups to ask for of pieces partly in the slot when the swarm started.
    spans: Arc<BTreeMap<u64, std::ops::Range<u64>>>,
    origin: Option<(CoordinatorClient, String)>,
    mirrors: Option<Arc<Mirrors>>,
    patches: Option<Arc<Patches>>,
    lan: Option<Arc<dyn LanFetcher>>,
    news: mpsc::Receiver<PeerNews>,
    announce: mpsc::Sender<Holding>,
    stats: Arc<Mutex<TransferStats>>,
    started: Instant,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl<D: Device + Send + 'static> std::fmt::Debug for Swarm<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm").field("layout", &self.layout).finish_non_exhaustive()
    }
}

/// What a fetch hands back, a piece at a time: an origin run streams several.
#[derive(Debug)]
enum Fetched {
    /// A piece of the request, verified (not yet written), and the bytes it took on the
    /// wire; `mirror`: from one of the release's mirrors rather than Central Command.
    Piece { piece: u64, bytes: u64, items: Vec<DecodedItem>, mirror: bool },
    /// The request ended without its remaining pieces.
    Failed(FetchError),
}

type FetchOutcome = (RequestId, Source, Fetched);

/// What to ask for of one piece: all its groups, or the span of them not in the slot when the
/// swarm started.
#[derive(Debug, Clone)]
struct Wanted {
    piece: u64,
    groups: std::ops::Range<u64>,
}

/// Verified pieces waiting to be written: a run's reader waits when this many are queued, so
/// memory stays bounded by a few pieces whatever the run's length.
const PIECES_QUEUED: usize = 8;

impl<D: Device + Send + 'static> Swarm<D> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: PeerId,
        writer: SlotWriter<D>,
        origin: Option<(CoordinatorClient, String)>,
        lan: Option<Arc<dyn LanFetcher>>,
        news: mpsc::Receiver<PeerNews>,
        announce: mpsc::Sender<Holding>,
        stats: Arc<Mutex<TransferStats>>,
        tune: impl FnOnce(&mut Config),
    ) -> Self {
        let layout = writer.layout();
        let pieces = piece_layout(&layout);
        let piece_bytes = pieces.groups_per_piece() * sitecast_iso::GROUP_BYTES;
        let mut config = Config::new(pieces.pieces(), piece_bytes);
        tune(&mut config);
        let mut scheduler = Scheduler::new(me, config);
        // Pieces already in the slot (resume, seeding, copied from the active slot) need not
        // be fetched; of a piece partly there, only the span from its first missing group to
        // its last is (groups held in between are asked again: one span per piece keeps every
        // request a range). Pieces are written whole from here on, so this is worked out once.
        let mut have = Vec::new();
        let mut spans = BTreeMap::new();
        for piece in 0..piece_count(&layout) {
            let groups = piece_groups(&layout, piece);
            let first = groups.clone().find(|&g| !writer.has(g));
            let last = groups.clone().rev().find(|&g| !writer.has(g));
            match (first, last) {
                (None, _) | (_, None) => have.push(piece..piece + 1),
                (Some(first), Some(last)) if (first..last + 1) != groups => {
                    spans.insert(piece, first..last + 1);
                }
                _ => {}
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
            spans: Arc::new(spans),
            origin,
            mirrors: None,
            patches: None,
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

    /// Asks `mirrors` for origin pieces before Central Command, which stays the fallback.
    pub fn with_mirrors(mut self, mirrors: Arc<Mirrors>) -> Self {
        self.mirrors = Some(mirrors);
        self
    }

    /// Fetches of the origin only the rest of groups the active slot holds in part.
    pub fn with_patches(mut self, patches: Arc<Patches>) -> Self {
        self.patches = Some(patches);
        self
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs until every piece is verified and written; returns the writer for `finish`.
    pub async fn run(mut self) -> Result<SlotWriter<D>, SwarmError> {
        let mut fetches: JoinSet<RequestId> = JoinSet::new();
        let mut handles: BTreeMap<RequestId, tokio::task::AbortHandle> = BTreeMap::new();
        let (fetched, mut outcomes) = mpsc::channel::<FetchOutcome>(PIECES_QUEUED);
        let mut news_open = true;
        let mut stop = self.stop.take();
        loop {
            while let Some(action) = self.scheduler.poll_action() {
                match action {
                    Action::Request { id, pieces, source } => {
                        tracing::debug!(?pieces, ?source, "request");
                        let handle = fetches.spawn(self.fetch(id, pieces, source, fetched.clone()));
                        handles.insert(id, handle);
                    }
                    Action::Cancel { id } => {
                        if let Some(handle) = handles.remove(&id) {
                            handle.abort();
                        }
                    }
                    Action::Announce { have, fetching } => {
                        let _ = self.announce.try_send(Holding { have, fetching });
                    }
                    Action::Ban { peer, reason } => {
                        tracing::warn!(peer = %hex::encode(peer.0), %reason, "peer dropped for this release");
                    }
                    Action::Done => {
                        fetches.abort_all();
                        let missing = self.scheduler.peers_missing_pieces() as u64;
                        self.stats.lock().unwrap_or_else(|p| p.into_inner()).peers_missing_pieces =
                            missing;
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
                    if let Ok(id) = joined {
                        handles.remove(&id);
                    }
                }
                Some((id, source, result)) = outcomes.recv() => {
                    let event = self.apply(id, source, result).await?;
                    let now = self.now();
                    self.scheduler.handle_event(event, now);
                    let done = self.scheduler.have().count();
                    self.stats.lock().unwrap_or_else(|p| p.into_inner()).pieces_done = done;
                }
                news = self.news.recv(), if news_open => {
                    let now = self.now();
                    match news {
                        Some(PeerNews::Up(peer, assignment)) => {
                            self.scheduler.handle_event(Event::PeerUp { peer, assignment }, now)
                        }
                        Some(PeerNews::Down(peer)) => self.scheduler.handle_event(Event::PeerDown { peer }, now),
                        Some(PeerNews::Preparing(peer)) => {
                            self.scheduler.handle_event(Event::PeerPreparing { peer }, now)
                        }
                        Some(PeerNews::Have(peer, Holding { have, fetching })) => {
                            self.scheduler.handle_event(Event::PeerHave { peer, have, fetching }, now)
                        }
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

    /// Fetches and verifies `pieces` from `source` (verification happens off the executor),
    /// handing each to the run loop as it verifies; the writer is not touched until every
    /// group of a piece has verified.
    fn fetch(
        &self,
        id: RequestId,
        pieces: Vec<u64>,
        source: Source,
        out: mpsc::Sender<FetchOutcome>,
    ) -> impl std::future::Future<Output = RequestId> + Send + 'static {
        let mut wanted: Vec<Wanted> = (pieces.into_iter())
            .map(|piece| Wanted {
                piece,
                groups: self
                    .spans
                    .get(&piece)
                    .cloned()
                    .unwrap_or_else(|| piece_groups(&self.layout, piece)),
            })
            .collect();
        // In piece order, as answers come.
        wanted.sort_unstable_by_key(|w| w.piece);
        let layout = self.layout;
        let origin = self.origin.clone();
        let mirrors = self.mirrors.clone();
        let patches = self.patches.clone();
        let stats = Arc::clone(&self.stats);
        let lan = self.lan.clone();
        async move {
            let result = match source {
                Source::Origin => match &origin {
                    Some((client, url)) => {
                        let out = out.clone();
                        let deliver = move |piece| out.blocking_send((id, source, piece)).is_ok();
                        async {
                            let mut left = wanted;
                            if let Some(patches) = &patches {
                                left =
                                    patch_pieces(client, patches, layout, left, &deliver).await?;
                            }
                            if let Some(mirrors) = mirrors {
                                left = fetch_from_mirrors(&mirrors, layout, left, &deliver, &stats)
                                    .await;
                            }
                            match left.is_empty() {
                                true => Ok(()),
                                false => fetch_run(client, url, layout, &left, deliver).await,
                            }
                        }
                        .await
                    }
                    None => Err(FetchError::Failed("no origin known".into())),
                },
                Source::Peer(peer) => match &lan {
                    Some(lan) => {
                        fetch_from_peer(lan.as_ref(), peer, layout, &wanted, &out, id).await
                    }
                    None => Err(FetchError::Failed("no LAN transport".into())),
                },
            };
            if let Err(error) = result {
                let _ = out.send((id, source, Fetched::Failed(error))).await;
            }
            id
        }
    }

    async fn apply(
        &self,
        request: RequestId,
        source: Source,
        fetched: Fetched,
    ) -> Result<Event, SwarmError> {
        let count = |f: &dyn Fn(&mut TransferStats)| {
            f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()))
        };
        match fetched {
            Fetched::Piece { piece, bytes, items, mirror } => {
                count(&|stats| match source {
                    Source::Origin if mirror => {
                        stats.bytes_from_mirror += bytes;
                        stats.pieces_from_origin += 1;
                    }
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
                Ok(Event::Completed { request, piece })
            }
            Fetched::Failed(FetchError::Corrupt(reason)) => {
                count(&|stats| stats.corrupt += 1);
                tracing::warn!(?source, %reason, "corrupt response");
                Ok(Event::Corrupt { request })
            }
            Fetched::Failed(FetchError::Failed(reason)) => {
                count(&|stats| stats.failed += 1);
                tracing::debug!(?source, %reason, "fetch failed");
                Ok(Event::Failed { request })
            }
            Fetched::Failed(FetchError::Busy) => {
                count(&|stats| stats.busy += 1);
                Ok(Event::Busy { request })
            }
        }
    }
}

/// Fetches, of the pieces in `wanted` with groups the active slot holds in part, only the
/// rest from Central Command ([`Patches`]), handing each to `deliver` once it verifies;
/// returns the pieces left to fetch the usual way (none if nobody wants more), which
/// include those whose patching failed.
async fn patch_pieces(
    client: &CoordinatorClient,
    patches: &Arc<Patches>,
    layout: BlobLayout,
    wanted: Vec<Wanted>,
    deliver: &(impl Fn(Fetched) -> bool + Clone + Send + 'static),
) -> Result<Vec<Wanted>, FetchError> {
    let mut left = Vec::new();
    for wanted in wanted {
        let Some(bytes) = patches.missing(&layout, wanted.groups.clone()) else {
            left.push(wanted);
            continue;
        };
        // Whatever goes wrong here (a refusal, the active slot unreadable, groups that do not
        // verify), the piece is fetched whole below, in this same request.
        let patched = match patches.fetch(client, layout, wanted.groups.clone(), bytes).await {
            Ok(Some(patched)) => patched,
            Ok(None) => {
                left.push(wanted);
                continue;
            }
            Err(error) => {
                tracing::debug!(?error, piece = wanted.piece, "patching failed; fetched whole");
                // A passing failure (a timeout, a busy Central Command) may go away; bytes that
                // are not what was asked for will not.
                if matches!(error, FetchError::Corrupt(_)) {
                    patches.give_up(wanted.groups.start);
                }
                left.push(wanted);
                continue;
            }
        };
        let (deliver, piece) = (deliver.clone(), wanted.piece);
        let fetched =
            Fetched::Piece { piece, bytes: patched.fetched, items: patched.items, mirror: false };
        let more = tokio::task::spawn_blocking(move || deliver(fetched))
            .await
            .map_err(|e| FetchError::Failed(e.to_string()))?;
        if !more {
            return Ok(Vec::new());
        }
    }
    Ok(left)
}

/// Fetches what is wanted of each piece from a LAN peer, one request each.
async fn fetch_from_peer(
    lan: &dyn LanFetcher,
    peer: PeerId,
    layout: BlobLayout,
    wanted: &[Wanted],
    out: &mpsc::Sender<FetchOutcome>,
    id: RequestId,
) -> Result<(), FetchError> {
    let source = Source::Peer(peer);
    for Wanted { piece, groups } in wanted.iter().cloned() {
        let body = lan.fetch(peer, groups.clone()).await?;
        let bytes = body.len() as u64;
        let items = tokio::task::spawn_blocking(move || decode(layout, groups, &body, source))
            .await
            .unwrap_or_else(|e| Err(FetchError::Failed(e.to_string())))?;
        let piece = Fetched::Piece { piece, bytes, items, mirror: false };
        if out.send((id, source, piece)).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Fetches a run of pieces from the origin in one streamed response, verifying as it reads
/// and handing each piece to `deliver` (from a blocking thread) as soon as its last group
/// verified; `deliver` returns false when nobody wants more. A Central Command that serves
/// only the first range of a request gets the rest asked for again, range by range.
async fn fetch_run(
    client: &CoordinatorClient,
    url: &str,
    layout: BlobLayout,
    wanted: &[Wanted],
    deliver: impl Fn(Fetched) -> bool + Clone + Send + 'static,
) -> Result<(), FetchError> {
    let groups = wanted.iter().flat_map(|w| w.groups.clone());
    let mut ranges: std::collections::VecDeque<_> = sitecast_iso::collect_ranges(groups).into();
    // A Central Command that refuses runs gets one range per request, as before runs.
    let mut one_at_a_time = false;
    while !ranges.is_empty() {
        let most = if one_at_a_time { 1 } else { sitecast_iso::MAX_RANGES_PER_RESPONSE };
        let asked: Vec<_> = ranges.iter().take(most).cloned().collect();
        let response = match client.open_ranges(url, &asked).await {
            Ok(response) => response,
            Err(ClientError::Refused { status: 400..=499, .. }) if asked.len() > 1 => {
                one_at_a_time = true;
                continue;
            }
            Err(error) => return Err(FetchError::Failed(error.to_string())),
        };
        let served: Vec<_> = if asked.len() > 1 && response.headers().contains_key(api::HEADER_RUNS)
        {
            ranges.drain(..asked.len()).collect()
        } else {
            ranges.pop_front().into_iter().collect()
        };
        let compressed = is_zstd(&response)?;
        // The body is read here and handed to the decoder through a small channel: when
        // this task is aborted (the request cancelled), the body is dropped with it, the
        // connection closes, and the decoder sees the end of its input.
        let (chunks, input) = mpsc::channel::<std::io::Result<Bytes>>(4);
        let deliver = deliver.clone();
        let decoding = tokio::task::spawn_blocking(move || {
            // Counted as it crosses the wire (compressed or not), as Central Command counts it.
            let (input, read) = CountingReader::new(ChannelReader { input, chunk: Bytes::new() });
            match compressed {
                true => decode_run(layout, &served, zstd_reader(input)?, &read, deliver),
                false => decode_run(layout, &served, input, &read, deliver),
            }
        });
        let mut response = response;
        loop {
            let next = match tokio::time::timeout(RUN_IDLE, response.chunk()).await {
                Ok(Ok(Some(chunk))) => Ok(chunk),
                Ok(Ok(None)) => break,
                Ok(Err(error)) => Err(std::io::Error::other(error)),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no bytes from the origin for {RUN_IDLE:?}"),
                )),
            };
            let failed = next.is_err();
            // The decoder stopped (it has all it wants, or found a fault): stop reading.
            if chunks.send(next).await.is_err() || failed {
                break;
            }
        }
        drop(chunks);
        let more = decoding.await.unwrap_or_else(|e| Err(FetchError::Failed(e.to_string())))?;
        if !more {
            break;
        }
    }
    Ok(())
}

/// Fetches what it can of `pieces` (an origin run) from the mirrors, in order, handing each
/// piece to `deliver` as it verifies; returns the pieces left for Central Command. A mirror
/// that fails or lies is given up, and the next one (or Central Command) takes over where it
/// stopped. Nothing left means done, or that nobody wants more.
async fn fetch_from_mirrors(
    mirrors: &Arc<Mirrors>,
    layout: BlobLayout,
    mut left: Vec<Wanted>,
    deliver: &(impl Fn(Fetched) -> bool + Clone + Send + 'static),
    stats: &Mutex<TransferStats>,
) -> Vec<Wanted> {
    while let Some(index) = mirrors.current() {
        match fetch_from_mirror(mirrors, index, layout, &mut left, deliver).await {
            Ok(()) => return Vec::new(),
            Err(error) => {
                if mirrors.give_up(index, &error) {
                    stats.lock().unwrap_or_else(|p| p.into_inner()).mirrors_given_up += 1;
                }
            }
        }
    }
    left
}

/// Fetches what is wanted of `pieces` from mirror `index`, a `Range` request per stretch of
/// adjacent groups, read and verified a piece at a time (so the run shows progress as it
/// goes, and a mirror that stalls is given up before the run is); a delivered piece leaves
/// `pieces`.
async fn fetch_from_mirror(
    mirrors: &Arc<Mirrors>,
    index: usize,
    layout: BlobLayout,
    pieces: &mut Vec<Wanted>,
    deliver: &(impl Fn(Fetched) -> bool + Clone + Send + 'static),
) -> Result<(), FetchError> {
    let groups = pieces.iter().flat_map(|w| w.groups.clone());
    for stretch in sitecast_iso::collect_ranges(groups) {
        let mut body = mirrors.open(index, layout, stretch.clone()).await?;
        // Pieces come sorted (`wanted`), so these are in the answer's order.
        let within = pieces
            .iter()
            .filter(|w| w.groups.start >= stretch.start && w.groups.end <= stretch.end);
        for Wanted { piece, groups } in within.cloned().collect::<Vec<_>>() {
            let plain = (groups.end * sitecast_iso::GROUP_BYTES).min(layout.size)
                - groups.start * sitecast_iso::GROUP_BYTES;
            let bytes = body.take(plain as usize).await?;
            let (mirrors, deliver) = (Arc::clone(mirrors), deliver.clone());
            let more = tokio::task::spawn_blocking(move || {
                let encoded = mirrors.encode(groups.clone(), &bytes)?;
                // What crossed the wire is the plain bytes, not the parents added here.
                let (encoded, read) = CountingReader::new(&encoded[..]);
                decode_run(layout, &[groups], encoded, &read, |fetched| match fetched {
                    Fetched::Piece { piece, items, .. } => {
                        deliver(Fetched::Piece { piece, bytes: plain, items, mirror: true })
                    }
                    other => deliver(other),
                })
            })
            .await
            .unwrap_or_else(|e| Err(FetchError::Failed(e.to_string())))?;
            pieces.retain(|w| w.piece != piece);
            if !more {
                pieces.clear();
                return Ok(());
            }
        }
    }
    Ok(())
}

/// An origin run that sends nothing for this long is given up (its pieces are asked again).
const RUN_IDLE: Duration = Duration::from_secs(30);

/// The largest zstd window an origin's stream may use: Central Command's level uses 2 MiB at
/// most (8 MiB against a reference), and a hostile stream naming a larger one is refused
/// instead of allocated.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decompresses a zstd stream from the origin (compression on the wire); what comes out is
/// decoded and verified like any response.
pub(crate) fn zstd_reader<R: std::io::Read>(
    input: R,
) -> Result<zstd::stream::read::Decoder<'static, std::io::BufReader<R>>, FetchError> {
    let failed = |error: std::io::Error| FetchError::Failed(format!("zstd: {error}"));
    let mut decoder = zstd::stream::read::Decoder::new(input).map_err(failed)?;
    decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(failed)?;
    Ok(decoder)
}

/// [`zstd_reader`] for a stream compressed against `prefix` (bytes the agent holds).
pub(crate) fn zstd_reader_against<'p, R: std::io::BufRead>(
    input: R,
    prefix: &'p [u8],
) -> Result<zstd::stream::read::Decoder<'p, R>, FetchError> {
    let failed = |error: std::io::Error| FetchError::Failed(format!("zstd: {error}"));
    let mut decoder =
        zstd::stream::read::Decoder::with_ref_prefix(input, prefix).map_err(failed)?;
    decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(failed)?;
    Ok(decoder)
}

/// Whether an origin's answer is compressed; an encoding not asked for is an error.
pub(crate) fn is_zstd(response: &reqwest::Response) -> Result<bool, FetchError> {
    match response.headers().get(reqwest::header::CONTENT_ENCODING) {
        None => Ok(false),
        Some(coding) if coding.as_bytes().eq_ignore_ascii_case(b"identity") => Ok(false),
        Some(coding) if coding.as_bytes().eq_ignore_ascii_case(b"zstd") => Ok(true),
        Some(coding) => Err(FetchError::Failed(format!(
            "the origin answered in content encoding {coding:?}, which was not asked for"
        ))),
    }
}

/// A blocking reader over chunks sent from an async task; the end of the channel is the end
/// of the input.
struct ChannelReader {
    input: mpsc::Receiver<std::io::Result<Bytes>>,
    chunk: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.input.blocking_recv() {
                Some(next) => self.chunk = next?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Reads one response for `groups` (the wanted groups of whole pieces), handing each piece to
/// `deliver` once all its wanted groups verified, with the bytes `read` counted meanwhile.
/// Returns whether `deliver` still wants more.
fn decode_run(
    layout: BlobLayout,
    groups: &[std::ops::Range<u64>],
    reader: impl std::io::Read,
    read: &std::cell::Cell<u64>,
    deliver: impl Fn(Fetched) -> bool,
) -> Result<bool, FetchError> {
    let pieces_of = piece_layout(&layout);
    // Groups asked for in each piece.
    let mut asked: BTreeMap<u64, u64> = BTreeMap::new();
    for group in groups.iter().flat_map(|r| r.clone()) {
        *asked.entry(group / pieces_of.groups_per_piece()).or_default() += 1;
    }
    let ranges = layout.chunk_ranges_of(groups);
    let decoder =
        ResponseDecoder::new(layout, &ranges, reader).map_err(|e| classify(e, Source::Origin))?;
    let expected = asked.len() as u64;
    let (mut items, mut groups_left, mut counted) = (Vec::new(), 0, 0);
    let mut delivered = 0;
    for item in decoder {
        let item = item.map_err(|e| classify(e, Source::Origin))?;
        let piece = match &item {
            DecodedItem::Group(group) => Some(group.index() / pieces_of.groups_per_piece()),
            DecodedItem::Parent(_) => None,
        };
        items.push(item);
        if let Some(piece) = piece {
            if groups_left == 0 {
                groups_left = asked.get(&piece).copied().unwrap_or(1);
            }
            groups_left -= 1;
            if groups_left == 0 {
                let bytes = read.get() - counted;
                counted = read.get();
                delivered += 1;
                let items = std::mem::take(&mut items);
                if !deliver(Fetched::Piece { piece, bytes, items, mirror: false }) {
                    return Ok(false);
                }
                // Every piece is here; what may follow is not ours to judge, and the request
                // is over as far as the scheduler knows.
                if delivered == expected {
                    return Ok(true);
                }
            }
        }
    }
    if delivered != expected {
        return Err(classify(ResponseError::Truncated, Source::Origin));
    }
    Ok(true)
}

/// Counts the bytes read through it, to attribute a run's bytes to its pieces.
struct CountingReader<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R> CountingReader<R> {
    /// `inner`, counted, and the count to read from elsewhere.
    fn new(inner: R) -> (Self, std::rc::Rc<std::cell::Cell<u64>>) {
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        (Self { inner, read: std::rc::Rc::clone(&read) }, read)
    }
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn compressed(bytes: &[u8], window_log: u32) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
        encoder.window_log(window_log).expect("window");
        encoder.long_distance_matching(true).expect("long");
        std::io::Write::write_all(&mut encoder, bytes).expect("compress");
        encoder.finish().expect("finish")
    }

    #[test]
    fn a_zstd_stream_is_read_only_with_a_bounded_window() {
        let bytes: Vec<u8> = (0..1_000_000u32).flat_map(|i| (i % 1000).to_le_bytes()).collect();
        let mut out = Vec::new();
        let small = compressed(&bytes, 21);
        let mut reader = zstd_reader(&small[..]).expect("reader");
        reader.read_to_end(&mut out).expect("within the window");
        assert!(out == bytes);
        // A stream that names a 128 MiB window is refused, not allocated.
        let large = compressed(&bytes, 27);
        let mut reader = zstd_reader(&large[..]).expect("reader");
        let error = reader.read_to_end(&mut Vec::new()).expect_err("too large a window");
        assert!(
            error.to_string().contains("memory") || error.to_string().contains("window"),
            "{error}"
        );
        // Cut short: an error, not a shorter stream of bytes.
        let mut reader = zstd_reader(&small[..small.len() - 10]).expect("reader");
        assert!(reader.read_to_end(&mut Vec::new()).is_err());
        // Not zstd at all: an error, not bytes.
        let mut reader = zstd_reader(&b"not a zstd stream, only text"[..]).expect("reader");
        assert!(reader.read_to_end(&mut Vec::new()).is_err());
    }
}
