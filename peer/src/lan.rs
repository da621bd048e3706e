//! The LAN data plane: iroh QUIC with direct addresses only (no relay, no internet).
//!
//! Data uses the iroh-blobs protocol as it is on the wire (ALPN `/iroh-bytes/4`, a
//! postcard `Request::Get` with the blob's chunk ranges, answered with `[size][bao encoding]`),
//! so any iroh-blobs client or provider interoperates. This node serves it from the slot
//! itself and its outboard rather than from an iroh-blobs store: the slot is where the
//! verified bytes already are (no second copy of a multi-GiB image), its progress record
//! survives a kill -9, and every group is re-verified as it is sent.
//!
//! Which peer holds what, and where its endpoint is, comes from the site control plane
//! ([`crate::site`]): peers' announcements add them to this node's address book.
//!
//! Only site members ([`crate::membership`]) are served: a non-member's connection is closed
//! as soon as its handshake names it, before it can ask for anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, RelayMode};
use iroh_blobs::protocol::{GetRequest, Request};
use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, SlotPaths};
use sitecast_manifest::api::{PeerAddresses, SitePeer};
use sitecast_manifest::{Blake3Hash, ImageInfo, SecretKey};
use tokio::sync::{Semaphore, mpsc};

use crate::agent::Joined;
use crate::membership::{Membership, Refusal};
use crate::pieces::{HaveMap, PieceSet};
use crate::scheduler::{Assignment, PeerId};
use crate::site::{Heard, SiteControl};
use crate::swarm::{FetchError, Holding, LanFetcher, PeerNews, piece_count, piece_layout};

/// A stalled peer must not stall the site.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// The QUIC close code for a peer that is not a member of this site.
const NOT_A_MEMBER: u32 = 403;
/// The stream error code of a request refused because every upload slot is taken. Agents
/// before it queued such requests; they take the refusal as a failed fetch.
const BUSY: iroh::endpoint::VarInt = iroh::endpoint::VarInt::from_u32(429);

#[derive(Debug, thiserror::Error)]
pub enum LanError {
    #[error("LAN endpoint: {0}")]
    Bind(String),
    #[error(transparent)]
    Site(#[from] crate::site::SiteError),
}

#[derive(Debug, Clone)]
struct Served {
    layout: BlobLayout,
    paths: SlotPaths,
    have: PieceSet,
}

/// How much this node uploads to its site peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Uploads (streams) served at once, over all peers.
    pub streams: usize,
    /// Bytes per second for all uploads together; 0: no limit.
    pub total_bytes_per_sec: u64,
    /// Bytes per second to any one peer; 0: no limit.
    pub per_peer_bytes_per_sec: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self { streams: 8, total_bytes_per_sec: 0, per_peer_bytes_per_sec: 0 }
    }
}

/// When a budget of `rate` bytes per second that is free again at `free_at` can send `len`
/// more bytes; reserves them.
fn reserve(free_at: &mut tokio::time::Instant, len: usize, rate: u64) -> tokio::time::Instant {
    let start = (*free_at).max(tokio::time::Instant::now());
    *free_at = start + Duration::from_secs_f64(len as f64 / rate as f64);
    start
}

#[derive(Debug)]
struct Shared {
    served: Mutex<BTreeMap<[u8; 32], Served>>,
    book: Mutex<BTreeMap<PeerId, EndpointAddr>>,
    connections: tokio::sync::Mutex<BTreeMap<PeerId, Connection>>,
    /// Uploads (streams) served at once, over all peers.
    upload_slots: Arc<Semaphore>,
    limits: UploadLimits,
    /// When the total upload budget is free again: every chunk of every stream reserves its
    /// share, so the limit holds for all uploads together.
    upload_free_at: Mutex<tokio::time::Instant>,
    /// The same per peer.
    peer_free_at: Mutex<BTreeMap<PeerId, tokio::time::Instant>>,
    uploaded: AtomicU64,
    membership: Membership,
}

/// This appliance on the LAN: serves what it holds, fetches from peers.
#[derive(Debug, Clone)]
pub struct LanNode {
    endpoint: Endpoint,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LanNode {
    /// Binds the endpoint (the iroh identity is the appliance's own key) and starts serving
    /// the peers `membership` admits.
    pub async fn bind(
        key: &SecretKey,
        listen: SocketAddr,
        limits: UploadLimits,
        membership: Membership,
    ) -> Result<Self, LanError> {
        let endpoint = Endpoint::builder(iroh::endpoint::presets::Minimal)
            .secret_key(iroh::SecretKey::from_bytes(&key.seed()))
            .alpns(vec![iroh_blobs::ALPN.to_vec()])
            .relay_mode(RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr(listen)
            .map_err(|e| LanError::Bind(e.to_string()))?
            .bind()
            .await
            .map_err(|e| LanError::Bind(e.to_string()))?;
        let shared = Arc::new(Shared {
            served: Mutex::new(BTreeMap::new()),
            book: Mutex::new(BTreeMap::new()),
            connections: tokio::sync::Mutex::new(BTreeMap::new()),
            upload_slots: Arc::new(Semaphore::new(limits.streams.max(1))),
            limits,
            upload_free_at: Mutex::new(tokio::time::Instant::now()),
            peer_free_at: Mutex::new(BTreeMap::new()),
            uploaded: AtomicU64::new(0),
            membership,
        });
        let node = Self { endpoint, shared };
        tokio::spawn(node.clone().accept_loop());
        Ok(node)
    }

    pub fn id(&self) -> PeerId {
        PeerId(*self.endpoint.id().as_bytes())
    }

    pub fn uploaded(&self) -> u64 {
        self.shared.uploaded.load(Ordering::Relaxed)
    }

    pub fn membership(&self) -> &Membership {
        &self.shared.membership
    }

    /// Whether `peer` may be served; counts the refusal (and so asks for an early check-in)
    /// if not.
    fn admit(&self, peer: PeerId) -> bool {
        let admitted = self.shared.membership.admits(&peer.0);
        if !admitted {
            tracing::debug!(peer = %hex::encode(peer.0), "LAN request of a non-member refused");
            self.shared.membership.refused(Refusal::Lan, &peer.0);
        }
        admitted
    }

    pub fn direct_addrs(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    /// Where peers reach this endpoint: the bound socket, or for a wildcard bind every
    /// interface's address with the bound port.
    pub fn advertised_addrs(&self) -> Vec<SocketAddr> {
        let bound = self.endpoint.bound_sockets();
        if bound.iter().all(|a| !a.ip().is_unspecified()) {
            return bound;
        }
        let interfaces: Vec<SocketAddr> = self.endpoint.addr().ip_addrs().copied().collect();
        if interfaces.is_empty() { bound } else { interfaces }
    }

    /// Adds a peer by id and socket addresses.
    pub fn add_peer(&self, id: [u8; 32], addrs: &[SocketAddr]) {
        let Ok(key) = iroh::PublicKey::from_bytes(&id) else { return };
        if PeerId(id) == self.id() {
            return;
        }
        let mut addr = EndpointAddr::new(key);
        for socket in addrs {
            addr = addr.with_ip_addr(*socket);
        }
        lock(&self.shared.book).insert(PeerId(id), addr);
    }

    /// Serves `image` from `paths`, restricted to the pieces in `have`; returns the blobs
    /// served from that slot until now (they are being overwritten).
    pub fn serve(&self, image: &ImageInfo, paths: SlotPaths, have: PieceSet) -> Vec<[u8; 32]> {
        let layout = BlobLayout::new(image.blake3, image.size);
        let hash = *image.blake3.as_bytes();
        let mut served = lock(&self.shared.served);
        let replaced: Vec<[u8; 32]> = served
            .iter()
            .filter(|(blob, s)| s.paths.slot == paths.slot && **blob != hash)
            .map(|(blob, _)| *blob)
            .collect();
        for blob in &replaced {
            served.remove(blob);
        }
        served.insert(hash, Served { layout, paths, have });
        replaced
    }

    /// Closes the cached connection to a peer that went away: a restarted peer gets a new
    /// one, rather than requests that hang on the old one until its idle timeout.
    async fn forget_connection(&self, peer: PeerId) {
        if let Some(connection) = self.shared.connections.lock().await.remove(&peer) {
            connection.close(0u32.into(), b"gone");
        }
    }

    /// Records what is held of `blake3`; false if it is not served any more (its slot was
    /// handed to another release).
    fn update_have(&self, blake3: [u8; 32], have: PieceSet) -> bool {
        match lock(&self.shared.served).get_mut(&blake3) {
            Some(served) => {
                served.have = have;
                true
            }
            None => false,
        }
    }

    async fn accept_loop(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let node = self.clone();
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else { return };
                if !node.admit(PeerId(*connection.remote_id().as_bytes())) {
                    connection.close(NOT_A_MEMBER.into(), b"not a member of this site");
                    return;
                }
                let alpn = connection.alpn().to_vec();
                let result = if alpn == iroh_blobs::ALPN {
                    node.serve_blobs(connection).await
                } else {
                    Ok(())
                };
                if let Err(error) = result {
                    tracing::debug!(%error, "LAN connection ended");
                }
            });
        }
    }

    async fn serve_blobs(&self, connection: Connection) -> anyhow::Result<()> {
        // Each request on its own task, so one peer's parallel requests are not queued
        // behind each other; the semaphore bounds uploads over all peers.
        let peer = PeerId(*connection.remote_id().as_bytes());
        loop {
            let (mut send, recv) = connection.accept_bi().await?;
            // Membership can change while a connection lasts (the operator moved the peer).
            if !self.admit(peer) {
                send.reset(iroh_blobs::protocol::ERR_PERMISSION)?;
                connection.close(NOT_A_MEMBER.into(), b"not a member of this site");
                return Ok(());
            }
            // With every slot taken, the peer hears so at once and asks another peer that
            // holds the piece: queued here, its request would wait behind uploads while the
            // site's other uplinks idle, and pieces would spread more slowly.
            let Ok(permit) = Arc::clone(&self.shared.upload_slots).try_acquire_owned() else {
                send.reset(BUSY)?;
                let mut recv = recv;
                let _ = recv.stop(BUSY);
                continue;
            };
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(error) = node.serve_request(peer, send, recv).await {
                    tracing::debug!(%error, "upload ended");
                }
                drop(permit);
            });
        }
    }

    async fn serve_request(
        &self,
        peer: PeerId,
        mut send: iroh::endpoint::SendStream,
        mut recv: iroh::endpoint::RecvStream,
    ) -> anyhow::Result<()> {
        let bytes = recv.read_to_end(iroh_blobs::protocol::MAX_MESSAGE_SIZE).await?;
        let Ok(Request::Get(request)) = postcard::from_bytes::<Request>(&bytes) else {
            send.reset(iroh_blobs::protocol::ERR_PERMISSION)?;
            return Ok(());
        };
        let served = lock(&self.shared.served).get(request.hash.as_bytes()).cloned();
        let groups = served.as_ref().and_then(|s| requested_groups(&request, s));
        let (Some(served), Some(groups)) = (served, groups) else {
            // Not ours to give: end the stream without data, as an iroh-blobs provider
            // does for a blob it lacks.
            send.reset(iroh_blobs::protocol::ERR_PERMISSION)?;
            return Ok(());
        };
        let withdrawn = piece_layout(&served.layout).pieces_touching(groups.clone());
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        let encode = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let data = FileDevice::open_read_only(&served.paths.slot)?;
            let outboard = FileDevice::open_read_only(&served.paths.outboard)?;
            let outboard = OutboardStore::new(served.layout, outboard);
            let mut writer = ChannelWriter(tx);
            outboard.encode_groups(&data, groups, &mut writer)
        });
        while let Some(chunk) = rx.recv().await {
            let limits = self.shared.limits;
            let mut start = tokio::time::Instant::now();
            if limits.total_bytes_per_sec > 0 {
                let mut free_at = lock(&self.shared.upload_free_at);
                start = start.max(reserve(&mut free_at, chunk.len(), limits.total_bytes_per_sec));
            }
            if limits.per_peer_bytes_per_sec > 0 {
                let mut peers = lock(&self.shared.peer_free_at);
                let free_at = peers.entry(peer).or_insert_with(tokio::time::Instant::now);
                start = start.max(reserve(free_at, chunk.len(), limits.per_peer_bytes_per_sec));
            }
            tokio::time::sleep_until(start).await;
            send.write_all(&chunk).await?;
            self.shared.uploaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        match encode.await? {
            Ok(()) => send.finish()?,
            Err(error) => {
                // The slot no longer verifies there (rot, or it is being overwritten): stop
                // announcing those pieces so peers fetch them elsewhere or from the origin.
                tracing::error!(%error, "serving a range failed; its pieces are withdrawn");
                if let Some(served) = lock(&self.shared.served).get_mut(request.hash.as_bytes()) {
                    let mut have = PieceSet::empty(served.have.len());
                    for piece in served.have.iter().filter(|p| !withdrawn.contains(p)) {
                        have.insert(piece);
                    }
                    served.have = have;
                }
                send.reset(iroh_blobs::protocol::ERR_INTERNAL)?;
            }
        }
        Ok(())
    }

    async fn connection(&self, peer: PeerId) -> Result<Connection, FetchError> {
        let addr = lock(&self.shared.book)
            .get(&peer)
            .cloned()
            .ok_or_else(|| FetchError::Failed("unknown peer".into()))?;
        {
            let cache = self.shared.connections.lock().await;
            if let Some(connection) = cache.get(&peer)
                && connection.close_reason().is_none()
            {
                return Ok(connection.clone());
            }
        }
        // Connect without holding the cache: one unreachable peer must not hold up the
        // fetches from all the others.
        let connection = self
            .endpoint
            .connect(addr, iroh_blobs::ALPN)
            .await
            .map_err(|e| FetchError::Failed(e.to_string()))?;
        self.shared.connections.lock().await.insert(peer, connection.clone());
        Ok(connection)
    }

    async fn fetch_groups(
        &self,
        peer: PeerId,
        hash: [u8; 32],
        layout: BlobLayout,
        groups: std::ops::Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let failed = |e: &dyn std::fmt::Display| FetchError::Failed(e.to_string());
        let connection = self.connection(peer).await?;
        let ranges = layout.chunk_ranges(groups.clone());
        let request =
            Request::Get(GetRequest::blob_ranges(iroh_blobs::Hash::from_bytes(hash), ranges));
        let bytes = postcard::to_stdvec(&request).map_err(|e| failed(&e))?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| failed(&e))?;
        match send.write_all(&bytes).await {
            Err(iroh::endpoint::WriteError::Stopped(code)) if code == BUSY => {
                return Err(FetchError::Busy);
            }
            other => other.map_err(|e| failed(&e))?,
        }
        send.finish().map_err(|e| failed(&e))?;
        let limit = layout.encoded_len(groups) as usize + 1;
        match recv.read_to_end(limit).await {
            Ok(body) => Ok(Bytes::from(body)),
            Err(iroh::endpoint::ReadToEndError::Read(iroh::endpoint::ReadError::Reset(code)))
                if code == BUSY =>
            {
                Err(FetchError::Busy)
            }
            Err(e) => Err(failed(&e)),
        }
    }
}

/// The group range of a request, if it asks for whole groups this node holds.
fn requested_groups(request: &GetRequest, served: &Served) -> Option<std::ops::Range<u64>> {
    let (0, ranges) = request.ranges.as_single()? else { return None };
    let boundaries = ranges.boundaries();
    let (start, end) = match boundaries {
        [start] => (start.0, served.layout.tree().chunks().0),
        [start, end] => (start.0, end.0.min(served.layout.tree().chunks().0)),
        _ => return None,
    };
    let chunks_per_group = sitecast_iso::GROUP_BYTES / 1024;
    if start % chunks_per_group != 0 {
        return None;
    }
    let groups =
        start / chunks_per_group..end.div_ceil(chunks_per_group).min(served.layout.groups());
    let pieces = piece_layout(&served.layout).pieces_touching(groups.clone());
    (groups.start < groups.end && pieces.clone().all(|p| served.have.contains(p))).then_some(groups)
}

struct ChannelWriter(mpsc::Sender<Bytes>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "peer went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The swarm's view of the LAN for one blob (an image, or a file of an agent release).
#[derive(Debug, Clone)]
pub struct ReleaseFetcher {
    node: LanNode,
    hash: [u8; 32],
    layout: BlobLayout,
}

impl LanFetcher for ReleaseFetcher {
    fn fetch(
        &self,
        peer: PeerId,
        groups: std::ops::Range<u64>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, FetchError>> + Send>>
    {
        let node = self.node.clone();
        let (hash, layout) = (self.hash, self.layout);
        Box::pin(async move {
            // Announcements of non-members never reach the swarm, but one that was a member
            // when it announced may not be any more.
            if !node.shared.membership.admits(&peer.0) {
                return Err(FetchError::Failed("not a site member".into()));
            }
            match tokio::time::timeout(FETCH_TIMEOUT, node.fetch_groups(peer, hash, layout, groups))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(FetchError::Failed("peer stalled".into())),
            }
        })
    }
}

impl LanNodeForAgent {
    /// Joins `image`'s swarm; `preparing`: says so ([`crate::site::Announcement::preparing`])
    /// instead of holding nothing.
    fn join_announcing(
        &self,
        image: &ImageInfo,
        slot: PathBuf,
        state_dir: PathBuf,
        preparing: bool,
    ) -> Joined {
        let layout = BlobLayout::new(image.blake3, image.size);
        let hash = *image.blake3.as_bytes();
        let fetcher = Arc::new(self.fetcher_for(image));
        let pieces = piece_count(&layout);
        let paths = SlotPaths::beside(&slot, &state_dir);
        for replaced in self.node.serve(image, paths, PieceSet::empty(pieces)) {
            self.site.stop(replaced);
        }
        let addrs = self.node.advertised_addrs();
        // Announce at once, holding nothing yet: the site counts us as a member (origin
        // pieces are assigned over members) from the start.
        let nothing = HaveMap::from(&PieceSet::empty(pieces));
        match preparing {
            true => self.site.announce_preparing(hash, nothing, addrs.clone()),
            false => self.site.announce(hash, nothing, addrs.clone()),
        }
        let (news_tx, news) = mpsc::channel(256);
        let (announce, mut announced) = mpsc::channel::<Holding>(16);
        let (node, site) = (self.node.clone(), self.site.clone());
        tokio::spawn(async move {
            while let Some(Holding { have, fetching }) = announced.recv().await {
                let map = HaveMap::from(&have);
                let fetching = Some(HaveMap::from(&fetching));
                // A replaced release is not announced again.
                if node.update_have(hash, have) {
                    site.announce_fetching(hash, map, fetching, addrs.clone());
                }
            }
        });
        let mut heard = self.site.listen(hash);
        let node = self.node.clone();
        tokio::spawn(async move {
            // The members up, and how each shares out origin pieces (news again if that
            // changes: a member restarted with another agent).
            let mut up = std::collections::BTreeMap::new();
            loop {
                let item = tokio::select! {
                    item = heard.recv() => item,
                    // The swarm is gone (download finished or restarted): stop listening.
                    () = news_tx.closed() => return,
                };
                let news = match item {
                    None => return,
                    Some(Heard::Announced { peer, announcement }) => {
                        node.add_peer(peer, &announcement.iroh_addrs);
                        let assignment = Assignment::from_code(announcement.origin_assignment);
                        let up_news = (up.insert(peer, assignment) != Some(assignment))
                            .then_some(PeerNews::Up(PeerId(peer), assignment));
                        if announcement.preparing {
                            let preparing = PeerNews::Preparing(PeerId(peer));
                            up_news.into_iter().chain([preparing]).collect()
                        } else {
                            let holding = Holding {
                                have: announcement.have.to_set(pieces),
                                fetching: (announcement.fetching.as_ref())
                                    .map_or_else(|| PieceSet::empty(pieces), |f| f.to_set(pieces)),
                            };
                            let have = PeerNews::Have(PeerId(peer), holding);
                            up_news.into_iter().chain([have]).collect()
                        }
                    }
                    Some(Heard::Gone { peer }) => {
                        node.forget_connection(PeerId(peer)).await;
                        match up.remove(&peer) {
                            Some(_) => vec![PeerNews::Down(PeerId(peer))],
                            None => vec![],
                        }
                    }
                };
                for item in news {
                    if news_tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
        });
        Joined { news, announce, fetcher }
    }
}

impl crate::agent::Lan for LanNodeForAgent {
    fn join(&self, image: &ImageInfo, slot: PathBuf, state_dir: PathBuf) -> Joined {
        self.join_announcing(image, slot, state_dir, false)
    }

    fn join_preparing(&self, image: &ImageInfo, slot: PathBuf, state_dir: PathBuf) -> Joined {
        self.join_announcing(image, slot, state_dir, true)
    }

    fn serve_installed(&self, image: &ImageInfo, slot: PathBuf, state_dir: PathBuf) {
        let layout = BlobLayout::new(image.blake3, image.size);
        let paths = SlotPaths::beside(&slot, &state_dir);
        let full = PieceSet::full(piece_count(&layout));
        for replaced in self.node.serve(image, paths, full.clone()) {
            self.site.stop(replaced);
        }
        self.site.announce(
            *image.blake3.as_bytes(),
            HaveMap::from(&full),
            self.node.advertised_addrs(),
        );
    }

    fn unserve(&self, blob: &Blake3Hash) {
        let hash = *blob.as_bytes();
        lock(&self.node.shared.served).remove(&hash);
        self.site.stop(hash);
    }

    fn addresses(&self) -> PeerAddresses {
        PeerAddresses {
            libp2p: self.site.addresses(),
            iroh_id: Some(hex::encode(self.node.id().0)),
            iroh_addrs: self.node.advertised_addrs().iter().map(ToString::to_string).collect(),
        }
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // close() waits for the peers' acknowledgements; a reboot does not wait long.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.node.endpoint.close()).await;
        })
    }

    fn discovery(&self) -> crate::site::Discovery {
        self.site.discovered.snapshot()
    }

    fn membership(&self) -> Membership {
        self.node.membership().clone()
    }

    fn site_peers(&self, peers: &[SitePeer]) {
        if !self.coordinator_peers {
            return;
        }
        for addr in peers.iter().flat_map(|p| &p.addresses.libp2p) {
            if let Err(error) = self.site.dial(addr) {
                tracing::debug!(%error, "a site peer address from the coordinator");
            }
        }
    }
}

/// What the agent holds: the data plane and the control plane.
#[derive(Debug, Clone)]
pub struct LanNodeForAgent {
    pub node: LanNode,
    pub site: SiteControl,
    /// Dial the peers the coordinator lists.
    coordinator_peers: bool,
}

impl LanNodeForAgent {
    pub fn new(node: LanNode, site: SiteControl, coordinator_peers: bool) -> Self {
        Self { node, site, coordinator_peers }
    }

    /// Fetches groups of `blob` from site peers.
    pub fn fetcher_for(&self, blob: &ImageInfo) -> ReleaseFetcher {
        let layout = BlobLayout::new(blob.blake3, blob.size);
        ReleaseFetcher { node: self.node.clone(), hash: *blob.blake3.as_bytes(), layout }
    }

    /// Both planes on 127.0.0.1 with ports chosen by the OS and no mDNS (which cannot work
    /// on loopback), sharing one membership that admits everyone until it is set: for tests
    /// and benchmarks.
    pub async fn bind_loopback(
        key: &SecretKey,
        site: &str,
        limits: UploadLimits,
    ) -> Result<Self, LanError> {
        let membership = Membership::default();
        let node =
            LanNode::bind(key, ([127, 0, 0, 1], 0).into(), limits, membership.clone()).await?;
        let config = crate::site::SiteConfig {
            site: site.into(),
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            mdns: false,
            heartbeat: Duration::from_secs(1),
            membership,
        };
        let site = SiteControl::start(key, config).await?;
        Ok(Self::new(node, site, true))
    }
}
