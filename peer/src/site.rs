//! The site's control plane on libp2p (TCP + noise + yamux): appliances of a site find each
//! other by mDNS with no configuration (or are dialled from static configuration and the
//! coordinator's site peer list where multicast cannot work), and each publishes, on a gossipsub
//! topic per site and release blob, an announcement: the pieces it holds (ranges or a bitmap) and
//! the addresses of its iroh endpoint, where the bytes are fetched.
//!
//! Announcements repeat every heartbeat, so a peer that stops announcing (or whose last
//! connection closes) is reported gone and its pieces are no longer counted on. The libp2p key
//! is the appliance's identity key, the same as its iroh endpoint id, and each announcement is
//! signed with it ([`crate::site_message`]), so an announcement names the iroh peer it
//! describes: nobody can announce pieces in another's name. That is also what lets
//! announcements of appliances that are not site members ([`crate::membership`]) be ignored:
//! the swarm never counts on them as sources.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, SwarmBuilder, gossipsub, identify, mdns, noise, tcp, yamux};
use serde::{Deserialize, Serialize};
use sitecast_manifest::SecretKey;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::membership::{Membership, Refusal};
use crate::pieces::HaveMap;
use crate::scheduler::Assignment;
use crate::site_message::{self, SiteMessage, SiteMessageError};

/// Announcements are coalesced to at most one per blob in this time while a download runs.
const COALESCE: Duration = Duration::from_millis(50);
/// Known peers that are not connected are dialled again every this many ticks (2 s).
const REDIAL_TICKS: u64 = 40;

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("libp2p: {0}")]
    Libp2p(String),
    #[error("libp2p listen address {0:?}: {1}")]
    Listen(String, String),
}

/// How this appliance takes part in its site's control plane.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub site: String,
    /// Where the control plane listens, e.g. `/ip4/0.0.0.0/tcp/4434`.
    pub listen: String,
    /// Find site peers by multicast DNS.
    pub mdns: bool,
    /// Announcements repeat this often; a peer silent for three of them is gone.
    pub heartbeat: Duration,
    /// Whose announcements are heard (shared with the data plane).
    pub membership: Membership,
}

/// One appliance's word on a release, as published on the release's topic.
///
/// Unknown fields are ignored, so newer agents can add some without breaking older ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The release blob (BLAKE3 hex) the pieces are of.
    pub blob: String,
    pub have: HaveMap,
    /// The pieces it fetches from the origin now, left to it by the rest of the site (absent
    /// from agents that predate origin runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetching: Option<HaveMap>,
    /// It is copying what it already has from its active slot before it fetches anything: it
    /// will soon hold most of the release, so the site waits for it before fetching from the
    /// origin (absent from agents that do not copy; older ones take it for holding nothing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preparing: bool,
    /// How it shares out the pieces to fetch from the origin
    /// ([`Assignment::code`]; absent from agents that predate
    /// bounded loads, which take the highest rendezvous score alone: 0).
    /// (A number, not a byte: a newer agent's larger number must not make the whole
    /// announcement unreadable.)
    #[serde(default)]
    pub origin_assignment: u64,
    /// The iroh endpoint's direct addresses.
    pub iroh_addrs: Vec<SocketAddr>,
}

/// What the control plane heard about one release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A peer (its 32-byte identity key) announced what it holds.
    Announced { peer: [u8; 32], announcement: Announcement },
    /// A peer stopped announcing or its last connection closed.
    Gone { peer: [u8; 32] },
}

/// How peers were found and how many are connected, for `status` and metrics.
#[derive(Debug, Default)]
pub struct DiscoveryCounts {
    mdns: AtomicU64,
    configured: AtomicU64,
    connected: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// Peers connected on the control plane now.
    pub connected: u64,
    /// Distinct peers found by mDNS.
    pub found_by_mdns: u64,
    /// Peers named by configuration or the coordinator.
    pub configured: u64,
}

impl DiscoveryCounts {
    pub fn snapshot(&self) -> Discovery {
        Discovery {
            connected: self.connected.load(Ordering::Relaxed),
            found_by_mdns: self.mdns.load(Ordering::Relaxed),
            configured: self.configured.load(Ordering::Relaxed),
        }
    }
}

enum Command {
    Dial(Multiaddr),
    Announce { blob: [u8; 32], announcement: Announcement },
    Listen { blob: [u8; 32], heard: mpsc::Sender<Heard> },
    Stop { blob: [u8; 32] },
}

/// A handle on the control plane task; cheap to clone.
#[derive(Debug, Clone)]
pub struct SiteControl {
    commands: mpsc::UnboundedSender<Command>,
    peer_id: PeerId,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    pub discovered: Arc<DiscoveryCounts>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dial(addr) => write!(f, "Dial({addr})"),
            Self::Announce { blob, .. } => write!(f, "Announce({})", hex::encode(blob)),
            Self::Listen { blob, .. } => write!(f, "Listen({})", hex::encode(blob)),
            Self::Stop { blob } => write!(f, "Stop({})", hex::encode(blob)),
        }
    }
}

#[derive(NetworkBehaviour)]
struct SiteBehaviour {
    gossipsub: gossipsub::Behaviour,
    mdns: libp2p::swarm::behaviour::toggle::Toggle<mdns::tokio::Behaviour>,
    identify: identify::Behaviour,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The 32-byte ed25519 key inside a libp2p peer id (ours are identity multihashes of it).
pub fn peer_key(peer: &PeerId) -> Option<[u8; 32]> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    Some(key.try_into_ed25519().ok()?.to_bytes())
}

/// Version 2: announcements in sitecast's envelope ([`crate::site_message`]), not gossipsub's.
/// Agents of version 1 and 2 on one site do not hear each other (each fetches what it lacks
/// from the origin) rather than each logging every message of the other as invalid.
fn topic(site: &str, blob: &[u8; 32]) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("sitecast/2/{site}/{}", hex::encode(blob)))
}

impl SiteControl {
    /// Starts the control plane with the appliance's identity key; returns once it listens.
    pub async fn start(key: &SecretKey, config: SiteConfig) -> Result<Self, SiteError> {
        let libp2p_error = |e: &dyn std::fmt::Display| SiteError::Libp2p(e.to_string());
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.seed())
            .map_err(|e| libp2p_error(&e))?;
        let listen: Multiaddr = config.listen.parse().map_err(|e: libp2p::multiaddr::Error| {
            SiteError::Listen(config.listen.clone(), e.to_string())
        })?;
        let heartbeat = config.heartbeat;
        let mdns_on = config.mdns;
        let membership = config.membership.clone();
        let mut swarm = SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .map_err(|e| libp2p_error(&e))?
            .with_behaviour(
                |key| -> Result<SiteBehaviour, Box<dyn std::error::Error + Send + Sync>> {
                    // Every site peer hears each announcement from its author (flood
                    // publishing to every connected subscriber), and announcements repeat: so
                    // no mesh forwards copies and nothing is gossiped for repair (IHAVE lists
                    // of every recent message, to six peers each second). Every copy is LAN
                    // bandwidth, and a peer the site cannot connect to directly could not
                    // fetch from it either (the data plane is direct too).
                    let gossip = gossipsub::ConfigBuilder::default()
                        .mesh_n_low(0)
                        .mesh_n(0)
                        .mesh_n_high(0)
                        .mesh_outbound_min(0)
                        .gossip_lazy(0)
                        .gossip_factor(0.0)
                        .heartbeat_interval(Duration::from_secs(1))
                        .max_transmit_size(1 << 20)
                        // sitecast signs announcements (crate::site_message) and takes each
                        // from its author's connection only; gossipsub checked every copy.
                        .validation_mode(gossipsub::ValidationMode::Anonymous)
                        .message_id_fn(|message| {
                            gossipsub::MessageId::from(
                                &blake3::hash(&message.data).as_bytes()[..20],
                            )
                        })
                        // Nothing is forwarded that Task::message did not accept (should a
                        // mesh come back).
                        .validate_messages()
                        .build()?;
                    let mdns = if mdns_on {
                        let config = mdns::Config {
                            query_interval: Duration::from_secs(10),
                            ..Default::default()
                        };
                        Some(mdns::tokio::Behaviour::new(config, key.public().to_peer_id())?)
                    } else {
                        None
                    };
                    Ok(SiteBehaviour {
                        gossipsub: gossipsub::Behaviour::new(
                            gossipsub::MessageAuthenticity::Anonymous,
                            gossip,
                        )?,
                        mdns: mdns.into(),
                        identify: identify::Behaviour::new(
                            identify::Config::new("/sitecast/1.0.0".into(), key.public())
                                .with_agent_version(format!(
                                    "sitecast/{}",
                                    env!("CARGO_PKG_VERSION")
                                )),
                        ),
                    })
                },
            )
            .map_err(|e| libp2p_error(&e))?
            // With no mesh, nothing in gossipsub asks to keep a connection open, and mDNS and
            // identify never do. Site peers stay connected for the whole rollout.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        swarm
            .listen_on(listen.clone())
            .map_err(|e| SiteError::Listen(config.listen.clone(), e.to_string()))?;
        let peer_id = *swarm.local_peer_id();
        // The first listen address, so the caller can publish where it listens.
        let first = loop {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => break address,
                Ok(SwarmEvent::ListenerError { error, .. }) => {
                    return Err(SiteError::Listen(config.listen, error.to_string()));
                }
                Ok(SwarmEvent::ListenerClosed { reason, .. }) => {
                    return Err(SiteError::Listen(config.listen, format!("{reason:?}")));
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(SiteError::Listen(config.listen, "no address in 10 s".into()));
                }
            }
        };
        let listen_addrs = Arc::new(Mutex::new(vec![first]));
        let discovered = Arc::new(DiscoveryCounts::default());
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = Task {
            swarm,
            site: config.site,
            heartbeat,
            listen_addrs: Arc::clone(&listen_addrs),
            discovered: Arc::clone(&discovered),
            announcing: BTreeMap::new(),
            listening: BTreeMap::new(),
            wanted: BTreeMap::new(),
            configured: BTreeSet::new(),
            found_by_mdns: BTreeSet::new(),
            ticks: 0,
            membership,
            key: key.clone(),
            // As gossipsub numbers its messages: from the clock, so that what an agent says
            // after a restart is not taken for a copy of what it said before.
            sequence: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX / 2)),
        };
        tokio::spawn(task.run(receiver));
        Ok(Self { commands, peer_id, listen_addrs, discovered })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Where site peers can dial this appliance (each ends in `/p2p/<peer id>`): loopback
    /// only when there is nothing else (tests on one host).
    pub fn addresses(&self) -> Vec<String> {
        let addrs = lock(&self.listen_addrs);
        let is_loopback = |a: &Multiaddr| {
            a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_loopback()))
                || a.iter().any(|p| matches!(p, Protocol::Ip6(ip) if ip.is_loopback()))
        };
        let reachable: Vec<&Multiaddr> = addrs.iter().filter(|a| !is_loopback(a)).collect();
        let chosen = if reachable.is_empty() { addrs.iter().collect() } else { reachable };
        chosen
            .into_iter()
            .map(|a| a.clone().with_p2p(self.peer_id).unwrap_or_else(|a| a).to_string())
            .collect()
    }

    /// Connects to a site peer by address (`/ip4/…/tcp/…/p2p/<peer id>`); the static
    /// configuration and the coordinator's site peer list come in here.
    pub fn dial(&self, addr: &str) -> Result<(), SiteError> {
        let addr: Multiaddr = addr
            .parse()
            .map_err(|e: libp2p::multiaddr::Error| SiteError::Listen(addr.into(), e.to_string()))?;
        if !addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
            return Err(SiteError::Listen(
                addr.to_string(),
                "expected a /p2p/<peer id> suffix".into(),
            ));
        }
        let _ = self.commands.send(Command::Dial(addr));
        Ok(())
    }

    /// Publishes what this appliance holds of `blob` now and at every heartbeat until
    /// [`SiteControl::stop`].
    pub fn announce(&self, blob: [u8; 32], have: HaveMap, iroh_addrs: Vec<SocketAddr>) {
        self.announce_fetching(blob, have, None, iroh_addrs);
    }

    /// Says this appliance takes part in `blob` and is copying what it already has first
    /// ([`Announcement::preparing`]).
    pub fn announce_preparing(&self, blob: [u8; 32], have: HaveMap, iroh_addrs: Vec<SocketAddr>) {
        let announcement = Announcement {
            blob: hex::encode(blob),
            have,
            fetching: None,
            preparing: true,
            origin_assignment: Assignment::NEWEST.code(),
            iroh_addrs,
        };
        let _ = self.commands.send(Command::Announce { blob, announcement });
    }

    /// [`Self::announce`], with the pieces this appliance fetches from the origin.
    pub fn announce_fetching(
        &self,
        blob: [u8; 32],
        have: HaveMap,
        fetching: Option<HaveMap>,
        iroh_addrs: Vec<SocketAddr>,
    ) {
        let announcement = Announcement {
            blob: hex::encode(blob),
            have,
            fetching,
            preparing: false,
            origin_assignment: Assignment::NEWEST.code(),
            iroh_addrs,
        };
        let _ = self.commands.send(Command::Announce { blob, announcement });
    }

    /// What site peers announce about `blob`, until the receiver is dropped.
    pub fn listen(&self, blob: [u8; 32]) -> mpsc::Receiver<Heard> {
        let (heard, receiver) = mpsc::channel(256);
        let _ = self.commands.send(Command::Listen { blob, heard });
        receiver
    }

    /// Stops announcing `blob` (its slot is being overwritten).
    pub fn stop(&self, blob: [u8; 32]) {
        let _ = self.commands.send(Command::Stop { blob });
    }
}

struct Announcing {
    topic: gossipsub::IdentTopic,
    /// The announcement's JSON, sealed with a new sequence number each time it is published.
    payload: Vec<u8>,
    published: Option<Instant>,
    dirty: bool,
}

struct Listening {
    heard: mpsc::Sender<Heard>,
    /// When each peer (its identity key) last announced.
    seen: BTreeMap<[u8; 32], Instant>,
}

struct Task {
    swarm: libp2p::Swarm<SiteBehaviour>,
    site: String,
    heartbeat: Duration,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    discovered: Arc<DiscoveryCounts>,
    announcing: BTreeMap<[u8; 32], Announcing>,
    listening: BTreeMap<[u8; 32], Listening>,
    /// Peers from configuration, the coordinator and mDNS, kept connected.
    wanted: BTreeMap<PeerId, BTreeSet<Multiaddr>>,
    /// Peers named by configuration or the coordinator.
    configured: BTreeSet<PeerId>,
    found_by_mdns: BTreeSet<PeerId>,
    ticks: u64,
    membership: Membership,
    key: SecretKey,
    /// The number of the next message this appliance publishes.
    sequence: u64,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut tick = tokio::time::interval(COALESCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    // Every handle is gone: the agent is shutting down.
                    None => return,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = tick.tick() => self.tick(),
            }
        }
    }

    /// Subscribes to `blob`'s topic (gossipsub ignores a second subscription).
    fn subscribe(&mut self, blob: &[u8; 32]) {
        if let Err(error) = self.swarm.behaviour_mut().gossipsub.subscribe(&topic(&self.site, blob))
        {
            tracing::warn!(%error, "gossipsub subscribe");
        }
    }

    /// Leaves `blob`'s topic once nothing announces or listens there.
    fn unsubscribe_if_unused(&mut self, blob: &[u8; 32]) {
        if !self.announcing.contains_key(blob) && !self.listening.contains_key(blob) {
            let _ = self.swarm.behaviour_mut().gossipsub.unsubscribe(&topic(&self.site, blob));
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Dial(addr) => {
                let Some(Protocol::P2p(peer)) = addr.iter().last() else { return };
                if peer == *self.swarm.local_peer_id() {
                    return;
                }
                if self.configured.insert(peer) {
                    self.discovered.configured.fetch_add(1, Ordering::Relaxed);
                }
                self.wanted.entry(peer).or_default().insert(addr);
                self.dial_wanted(peer);
            }
            Command::Announce { blob, announcement } => {
                let payload = serde_json::to_vec(&announcement).expect("an announcement encodes");
                self.subscribe(&blob);
                let entry = self.announcing.entry(blob).or_insert_with(|| Announcing {
                    topic: topic(&self.site, &blob),
                    payload: Vec::new(),
                    published: None,
                    dirty: true,
                });
                entry.payload = payload;
                entry.dirty = true;
                self.flush(false);
            }
            Command::Listen { blob, heard } => {
                self.subscribe(&blob);
                self.listening.insert(blob, Listening { heard, seen: BTreeMap::new() });
            }
            Command::Stop { blob } => {
                self.announcing.remove(&blob);
                self.unsubscribe_if_unused(&blob);
            }
        }
    }

    /// Known peers are dialled again while they are not connected: they may start later than
    /// we do, restart, or a dial may have failed.
    fn dial_wanted(&mut self, peer: PeerId) {
        let Some(addrs) = self.wanted.get(&peer) else { return };
        if addrs.is_empty() || self.swarm.is_connected(&peer) {
            return;
        }
        let options = DialOpts::peer_id(peer)
            .addresses(addrs.iter().cloned().collect())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(error) = self.swarm.dial(options) {
            tracing::debug!(%error, "dial");
        }
    }

    /// Publishes what changed (coalesced), and everything once a heartbeat.
    fn flush(&mut self, heartbeat_only: bool) {
        let now = Instant::now();
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        for entry in self.announcing.values_mut() {
            let due = match entry.published {
                None => true,
                Some(at) => {
                    let since = now.duration_since(at);
                    (!heartbeat_only && entry.dirty && since >= COALESCE) || since >= self.heartbeat
                }
            };
            if !due {
                continue;
            }
            let message = site_message::seal(
                &self.key,
                &entry.topic.to_string(),
                self.sequence,
                &entry.payload,
            );
            self.sequence += 1;
            match gossipsub.publish(entry.topic.clone(), message) {
                Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                Err(error) => tracing::debug!(%error, "gossipsub publish"),
            }
            entry.published = Some(now);
            entry.dirty = false;
        }
    }

    fn tick(&mut self) {
        self.flush(false);
        self.ticks += 1;
        if self.ticks.is_multiple_of(REDIAL_TICKS) {
            let peers: Vec<PeerId> = self.wanted.keys().copied().collect();
            for peer in peers {
                self.dial_wanted(peer);
            }
        }
        // Peers silent for three heartbeats are gone, and so are those that stopped being
        // members (their announcements are ignored from now on).
        let now = Instant::now();
        let silence = self.heartbeat * 3;
        let membership = &self.membership;
        for listening in self.listening.values_mut() {
            let gone: Vec<[u8; 32]> = listening
                .seen
                .iter()
                .filter(|(key, at)| now.duration_since(**at) > silence || !membership.admits(key))
                .map(|(key, _)| *key)
                .collect();
            for key in gone {
                // A full channel gets the news at the next tick: a lost "gone" would leave
                // a dead peer counted on for good.
                if listening.heard.try_send(Heard::Gone { peer: key }).is_ok() {
                    listening.seen.remove(&key);
                }
            }
        }
        let closed: Vec<[u8; 32]> =
            self.listening.iter().filter(|(_, l)| l.heard.is_closed()).map(|(b, _)| *b).collect();
        for blob in closed {
            self.listening.remove(&blob);
            self.unsubscribe_if_unused(&blob);
        }
    }

    fn event(&mut self, event: SwarmEvent<SiteBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = lock(&self.listen_addrs);
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.listen_addrs).retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, num_established, .. }
                if num_established.get() == 1 =>
            {
                self.discovered.connected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer_id, "site peer connected");
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                tracing::debug!(%peer_id, "site peer disconnected");
                self.discovered.connected.fetch_sub(1, Ordering::Relaxed);
                // Gone now: the next tick tells the listeners (and retries while their
                // channel is full).
                let long_ago = Instant::now().checked_sub(self.heartbeat * 4);
                let key = peer_key(&peer_id);
                for listening in self.listening.values_mut() {
                    if let (Some(seen), Some(long_ago)) =
                        (key.and_then(|key| listening.seen.get_mut(&key)), long_ago)
                    {
                        *seen = long_ago;
                    }
                }
                self.tick();
            }
            SwarmEvent::Behaviour(SiteBehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if self.found_by_mdns.insert(peer) {
                        self.discovered.mdns.fetch_add(1, Ordering::Relaxed);
                    }
                    // Both sides find each other at once; two simultaneous dials can both
                    // fail, so only the lower id dials now. The other one's redial (every
                    // two seconds while not connected) covers a dial that failed.
                    self.wanted.entry(peer).or_default().insert(addr);
                    if *self.swarm.local_peer_id() < peer {
                        self.dial_wanted(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(SiteBehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                // Gone from the LAN (or silent past the record's lifetime): stop redialling
                // unless configuration or the coordinator named it.
                for (peer, addr) in list {
                    if self.configured.contains(&peer) {
                        continue;
                    }
                    if let Some(addrs) = self.wanted.get_mut(&peer) {
                        addrs.remove(&addr);
                        if addrs.is_empty() {
                            self.wanted.remove(&peer);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(SiteBehaviourEvent::Gossipsub(
                gossipsub::Event::Subscribed { topic, .. },
            )) => {
                // A peer joined a release we announce: tell it now rather than at the next
                // heartbeat.
                for entry in self.announcing.values_mut() {
                    if entry.topic.hash() == topic {
                        entry.published = None;
                    }
                }
                self.flush(true);
            }
            SwarmEvent::Behaviour(SiteBehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let acceptance = self.message(&message, &propagation_source);
                // gossipsub holds each message until told, and would forward only what is
                // accepted (there is no mesh to forward to now).
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            _ => {}
        }
    }

    /// Reads an announcement, passes it on to whoever listens for its release, and says
    /// whether gossipsub should forward it.
    fn message(
        &mut self,
        message: &gossipsub::Message,
        forwarded_by: &PeerId,
    ) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        let topic_name = message.topic.as_str();
        let sealed = match SiteMessage::parse(&message.data) {
            Ok(sealed) => sealed,
            Err(error @ SiteMessageError::UnknownFormat(_)) => {
                tracing::debug!(%error, peer = %forwarded_by, "an announcement not understood");
                return Ignore;
            }
            Err(error) => {
                tracing::debug!(%error, peer = %forwarded_by, "a malformed announcement");
                return Reject;
            }
        };
        let key = sealed.author;
        // Every peer gets the author's own copy (flood publishing, no mesh), on a connection
        // whose Noise handshake proved who sent it. A copy another peer passes on adds
        // nothing, and could be that peer replaying what the author said before.
        if peer_key(forwarded_by) != Some(key) {
            let forged = sealed.verify(topic_name).is_err();
            tracing::debug!(peer = %forwarded_by, forged, "an announcement passed on by another peer");
            return if forged { Reject } else { Ignore };
        }
        if !self.membership.admits(&key) {
            tracing::debug!(peer = hex::encode(key), "an announcement of a non-member ignored");
            self.membership.refused(Refusal::Announcement, &key);
            return Ignore;
        }
        let announcement: Announcement = match serde_json::from_slice(sealed.payload) {
            Ok(announcement) => announcement,
            Err(error) => {
                tracing::debug!(%error, peer = hex::encode(key), "an announcement that does not parse");
                return Ignore;
            }
        };
        let Ok(blob) = sitecast_manifest::decode_hex::<32>(&announcement.blob) else {
            return Reject;
        };
        // An announcement belongs to the topic it came on.
        if topic(&self.site, &blob).hash() != message.topic {
            return Reject;
        }
        let Some(listening) = self.listening.get_mut(&blob) else { return Accept };
        listening.seen.insert(key, Instant::now());
        let _ = listening.heard.try_send(Heard::Announced { peer: key, announcement });
        Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_from_newer_agents_are_understood() {
        let json = r#"{"blob":"ab","have":{"pieces":4,"ranges":[[0,2]]},"iroh_addrs":["10.0.0.2:4433"],"relay":"x","load":0.5}"#;
        let announcement: Announcement =
            serde_json::from_str(json).expect("unknown fields are ignored");
        assert_eq!(announcement.have.to_set(4).count(), 2);
    }

    use crate::pieces::PieceSet;

    #[test]
    fn each_agent_is_taken_to_share_out_origin_pieces_as_it_can() {
        let said = |extra: &str| {
            let json = format!(
                r#"{{"blob":"ab","have":{{"pieces":4,"ranges":[]}},"iroh_addrs":[]{extra}}}"#
            );
            let announcement: Announcement = serde_json::from_str(&json).expect("parses");
            Assignment::from_code(announcement.origin_assignment)
        };
        assert_eq!(said(""), Assignment::Rendezvous, "an older agent says nothing");
        assert_eq!(said(r#","origin_assignment":1"#), Assignment::BoundedLoad);
        // A newer way than this agent knows: the newer agent falls back to ours.
        assert_eq!(said(r#","origin_assignment":7"#), Assignment::NEWEST);
        let ours = Announcement {
            blob: "ab".into(),
            have: HaveMap::from(&PieceSet::empty(4)),
            fetching: None,
            preparing: false,
            origin_assignment: Assignment::NEWEST.code(),
            iroh_addrs: Vec::new(),
        };
        let json = serde_json::to_string(&ours).expect("serializes");
        let heard: Announcement = serde_json::from_str(&json).expect("parses");
        assert_eq!(Assignment::from_code(heard.origin_assignment), Assignment::NEWEST);
    }

    #[test]
    fn a_peer_id_names_the_identity_key() {
        let key = SecretKey::from_seed([9; 32]);
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.seed()).expect("key");
        assert_eq!(peer_key(&keypair.public().to_peer_id()), Some(*key.public().as_bytes()));
    }
}
