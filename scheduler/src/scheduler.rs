//! The swarm scheduler: which piece to fetch from whom, as a plain state machine.
//!
//! No sockets, no clock, no async: events go in with the time ([`Scheduler::handle_event`],
//! [`Scheduler::handle_timeout`]), actions come out ([`Scheduler::poll_action`]), and
//! [`Scheduler::poll_timeout`] says when to call back. The agent drives it from one task; the
//! simulator drives the same type on a virtual clock. It is deterministic: the same events at
//! the same times give the same actions.
//!
//! Policy:
//! - **Pieces sized to the transfer** ([`crate::pieces::PieceLayout`]): from four 16 KiB
//!   groups to 64, so that even a small transfer has pieces enough for a large site.
//! - **LAN first, rarest first.** While the download window (`max_lan_requests`) has room, the
//!   live peer with the fewest of our requests in flight (ties broken by a hash of the two
//!   peers, so the site spreads out) gets a request for the missing piece it has that the
//!   fewest live peers have. At most `max_requests_per_peer` requests per peer. A peer with
//!   every upload slot taken refuses at once ([`Event::Busy`]) and is left alone for
//!   `busy_backoff`, so requests go to the peers that can send now.
//! - **The origin once per site, in even shares.** A piece no live LAN peer has comes from
//!   the origin only if this appliance is the piece's assigned fetcher. Pieces are shared out
//!   by rendezvous hashes of (piece, member) with bounded loads ([`Assignment`]): each piece,
//!   in order, to the highest-scoring member present that has fewer than max(⌈pieces ÷
//!   members⌉, 2) so far, so that no member has much more to fetch and relay than another.
//!   If the assignee dies it leaves the membership and the pieces are shared out again at
//!   once; if it stalls (its have-map has not grown for `max(origin_takeover, 4 × this
//!   appliance's own time per origin piece)`, counting the one in flight) or we banned it, its
//!   pieces go to the highest-scoring member that is neither. Measuring against our own
//!   origin transfers keeps a slow but busy WAN from looking like a stall. Older agents give
//!   each piece to the highest score alone; a site with one of them present shares out that
//!   way, so that every member works out the same.
//! - **Runs from the origin.** An origin request names a run of this appliance's pieces
//!   (up to `origin_run_pieces`, about 1 MiB) that the origin streams in order; each piece is
//!   reported as it verifies and can be relayed at once. Small pieces thus cost no WAN round
//!   trip each.
//! - **A small origin window, shared by the work left.** The site keeps a few origin requests
//!   (runs) in flight, at most `origin_window_bytes` worth of pieces and 8: a WAN shares its
//!   rate among the streams on it, so the fewer there are the sooner each piece lands and can
//!   be relayed. Each member takes the part of the window that its assigned pieces are of
//!   those the site still lacks, so all finish their origin work together.
//! - **Discovery grace.** No origin requests until the site's members are known: for
//!   `discovery_grace`, or until every member Central Command named is up and has said what
//!   it holds. A member that says it is preparing (copying what its active slot shares with
//!   the release) is waited for, up to `preparing_grace`: it will soon hold most pieces, and
//!   until it says which, the rest of the site would fetch from the origin what it can send.
//!   After the grace, while a named member is still unheard (up to `unheard_members_wait`),
//!   origin requests are one piece each: members that started a little apart share out the
//!   pieces among different members until they hear each other, and a long run fetched on
//!   such a guess would cross the WAN twice.
//! - **End game.** When every missing piece is in flight, a second request for a piece goes to
//!   another peer that has it; the first copy to arrive cancels the other.
//! - **Liars are dropped.** A peer that sent a corrupt group is banned for this release and
//!   reported; its requests are reissued elsewhere. Stalled requests time out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pieces::{PieceSet, pieces_in};

/// The first 8 bytes (big-endian) of BLAKE3 over `a ‖ b`: enough to order pieces and members.
fn hash64(a: &[u8], b: &[u8]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(a).update(b);
    let bytes = hasher.finalize();
    u64::from_be_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Members' rendezvous scores for every piece, computed once per member. The scores depend
/// only on the member and the piece, so the schedulers of one site may share a table (the
/// simulator runs a whole site on one: it saves each appliance hashing every piece for every
/// member again).
#[derive(Debug)]
pub struct Rendezvous {
    pieces: u64,
    scores: Mutex<BTreeMap<PeerId, Arc<[u64]>>>,
}

impl Rendezvous {
    pub fn new(pieces: u64) -> Self {
        Self { pieces, scores: Mutex::new(BTreeMap::new()) }
    }

    /// `member`'s score for every piece.
    fn scores(&self, member: &PeerId) -> Arc<[u64]> {
        let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        let scores = scores.entry(*member).or_insert_with(|| {
            (0..self.pieces).map(|p| hash64(&p.to_le_bytes(), &member.0)).collect()
        });
        Arc::clone(scores)
    }
}

/// Pieces in one origin request at most, whatever their size: each is a range in the request.
pub const MAX_RUN_PIECES: u64 = 64;

/// How the members of a site share out the pieces to fetch from the origin.
///
/// Every member must work the shares out the same way: a piece that one member leaves to
/// another which does not count it as its own is fetched by no one. So a site uses the oldest
/// way any of its members present knows. Agents say theirs when they announce (older agents,
/// which do not say, use [`Assignment::Rendezvous`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Assignment {
    /// Each piece to the member with the highest rendezvous score. Shares are only about
    /// even: on a simulated site of three, 64 pieces went 31, 19 and 14, and the member with
    /// 31 had to relay them all over its uplink.
    #[default]
    Rendezvous,
    /// Each piece, in order, to the highest-scoring member with fewer than max(⌈pieces ÷
    /// members⌉, 2) so far (rendezvous with bounded loads): even shares.
    BoundedLoad,
}

impl Assignment {
    /// The newest way this scheduler knows.
    pub const NEWEST: Self = Self::BoundedLoad;

    /// Its number in announcements.
    pub fn code(self) -> u64 {
        match self {
            Self::Rendezvous => 0,
            Self::BoundedLoad => 1,
        }
    }

    /// A number from an announcement. A number this agent does not know is a newer agent's
    /// way; that agent falls back to the newest way this one knows, as a site uses the oldest.
    pub fn from_code(code: u64) -> Self {
        match code {
            0 => Self::Rendezvous,
            _ => Self::NEWEST,
        }
    }
}

/// Peers are named by their 32-byte identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub [u8; 32]);

/// Where a piece comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Peer(PeerId),
    Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone)]
pub struct Config {
    /// Pieces in the transfer.
    pub pieces: u64,
    /// Bytes in a whole piece: the origin's windows are counted in bytes, so that small
    /// pieces get more requests in flight.
    pub piece_bytes: u64,
    pub max_requests_per_peer: usize,
    /// Requests in flight to LAN peers, all together: this appliance's download window.
    pub max_lan_requests: usize,
    pub max_origin_requests: usize,
    /// Pieces in one origin request at most: the origin streams a run of pieces in one
    /// response, so that small pieces do not each wait a WAN round trip.
    pub origin_run_pieces: usize,
    /// The site's origin requests in flight, in pieces' worth of bytes (each request a run
    /// of up to `origin_run_pieces`), shared out among its live members. The site's WAN
    /// shares its rate among the streams on it, so the fewer there are the sooner each piece
    /// arrives and can be relayed on the LAN.
    pub origin_window_bytes: u64,
    /// The site's members as Central Command named them (may be empty). Once every one of them
    /// is up and has said what it holds there is nothing left to learn, and the discovery grace
    /// ends early; until then origin requests are one piece each (`unheard_members_wait`).
    pub site_members: Vec<PeerId>,
    /// A request with no answer for this long is given up.
    pub request_timeout: Duration,
    /// How long a piece missing from the LAN waits per rank before a non-assigned member
    /// fetches it from the origin.
    pub origin_takeover: Duration,
    /// No origin requests this long after start: the site's membership (and so who is assigned
    /// which piece) is still being learned.
    pub discovery_grace: Duration,
    /// How long origin requests wait for members that said they are preparing.
    pub preparing_grace: Duration,
    /// After the discovery grace, while a named member is still unheard, origin requests are
    /// one piece each for up to this long from start: who fetches which piece may change when
    /// it is heard, and a run fetched on a guess would be fetched twice.
    pub unheard_members_wait: Duration,
    /// Announcements are coalesced to at most one per this interval (and one when done).
    pub announce_interval: Duration,
    /// The share of the bytes this appliance receives that announcing its new pieces may
    /// take on its uplink: each announcement goes to every live peer, so on a slow LAN,
    /// announcing every piece to 15 peers took a seventh of the link. What it fetches from the
    /// origin, and being done, are announced at once all the same.
    pub announce_share: f64,
    /// New pieces wait at most this long to be announced, however few they are.
    pub announce_max_delay: Duration,
    /// How this appliance shares out origin pieces at best ([`Assignment::NEWEST`]; tests set
    /// an older way to stand for older agents).
    pub assignment: Assignment,
    /// After a failed request, a peer gets no new requests for this long.
    pub peer_backoff: Duration,
    /// After a peer said it is busy, it gets no new requests for this long.
    pub busy_backoff: Duration,
    /// First origin backoff after a failure; doubles up to `origin_backoff_max`.
    pub origin_backoff: Duration,
    pub origin_backoff_max: Duration,
}

/// Requests in flight to one LAN peer. A peer serves a few uploads at once (the agent's
/// `max_upload_peers`, 8) and refuses the rest ([`Event::Busy`]); half of them is as much of
/// its uplink as one of the site's members should count on.
const PEER_REQUESTS: usize = 4;
/// Announcements may take this share of what arrives ([`Config::announce_share`]).
const ANNOUNCE_SHARE: f64 = 0.02;
/// What one announcement costs on the wire to one peer: about 576 bytes in the lab (JSON
/// have-map, signed envelope, gossipsub, noise, yamux, TCP/IP and Ethernet headers).
pub const ANNOUNCEMENT_WIRE_BYTES: u64 = 600;
/// Requests in flight to LAN peers, all together, whatever the pieces' size. Every piece in
/// flight shares the links with the others, so more of them only makes each arrive (and be
/// passed on) later; fewer leave the downlink idle. In the reduced sweep (with one-group
/// pieces) 8 at once met the goals on more shapes than 16; with 4, a LAN-limited site of large
/// pieces left its downlinks idle (32 × 1 GiB at WAN 200 / LAN 100: 1.41 × the bound).
const LAN_REQUESTS: usize = 8;
/// Origin requests of this appliance at most, in pieces' worth of bytes (each request is a
/// run of pieces).
const ORIGIN_WINDOW_BYTES: u64 = 1 << 20;
/// Bytes in one origin request at most: a run long enough that the round trip before it is
/// small beside its transfer, short enough to be given to another member soon if this one
/// stalls.
const ORIGIN_RUN_BYTES: u64 = 1 << 20;
/// Origin requests in flight from one site: a site behind one NAT is one client to Central
/// Command, which encodes at most 16 verified ranges at once for a client
/// (`--max-range-streams-per-client`) and refuses the rest. Half that leaves room for the
/// rounding and for requests the server has not yet seen end. Each member with work left
/// rounds its share up to one request, so a site of more than 8 members has that many in
/// flight; above 16 behind one NAT the server refuses some (they back off and retry).
const ORIGIN_REQUESTS_PER_SITE: u64 = 8;

/// [`Assignment::BoundedLoad`] lets a member fetch this many origin pieces at least, even where
/// the pieces are fewer than the members. Every member with pieces to fetch opens an origin
/// stream, and the more streams share the WAN the later each piece arrives to be relayed:
/// one piece each for 64 of 128 members took 128 × 4 MiB at WAN 200 / LAN 100 from 1.64 to
/// 1.72 × the bound.
const MIN_SHARE_CAP: u64 = 2;

impl Config {
    /// Settings for a transfer of `pieces` pieces of `piece_bytes` each.
    pub fn new(pieces: u64, piece_bytes: u64) -> Self {
        let piece_bytes = piece_bytes.max(1);
        let in_pieces = |bytes: u64, most: u64| (bytes / piece_bytes).clamp(4, most) as usize;
        let transfer = pieces * piece_bytes;
        Self {
            pieces,
            piece_bytes,
            max_requests_per_peer: PEER_REQUESTS,
            max_lan_requests: LAN_REQUESTS,
            max_origin_requests: in_pieces(ORIGIN_WINDOW_BYTES, ORIGIN_REQUESTS_PER_SITE),
            origin_run_pieces: (ORIGIN_RUN_BYTES / piece_bytes).clamp(1, MAX_RUN_PIECES) as usize,
            origin_window_bytes: (transfer / 16).clamp(512 << 10, 16 << 20),
            site_members: Vec::new(),
            request_timeout: Duration::from_secs(30),
            origin_takeover: Duration::from_secs(10),
            // Site peers are connected before a release arrives and announce the moment they
            // join (gossip pushes), so a fifth of a second is enough to learn who takes part.
            discovery_grace: Duration::from_millis(200),
            preparing_grace: Duration::from_secs(60),
            // Agents of a site start within a few tenths of a second of each other (their
            // check-ins are not in step); a member in a later rollout stage is named but never
            // heard, and costs the site short runs for this long.
            unheard_members_wait: Duration::from_secs(2),
            announce_interval: Duration::from_millis(10),
            announce_share: ANNOUNCE_SHARE,
            announce_max_delay: Duration::from_millis(500),
            assignment: Assignment::NEWEST,
            peer_backoff: Duration::from_secs(2),
            busy_backoff: Duration::from_millis(5),
            origin_backoff: Duration::from_secs(1),
            origin_backoff_max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A site member is alive, and shares out origin pieces as `assignment` says; `have` may
    /// come later with [`Event::PeerHave`]. Again for a live member: its way changed.
    PeerUp { peer: PeerId, assignment: Assignment },
    /// A site member left (timed out, disconnected, crashed).
    PeerDown { peer: PeerId },
    /// A site member is copying what it already holds (from its active slot) and will say
    /// what that is with [`Event::PeerHave`]. Like `PeerHave`, ignored from a member that is
    /// not up.
    PeerPreparing { peer: PeerId },
    /// A peer announced the pieces it holds (the whole set, not a delta).
    /// `fetching`: the pieces it is fetching from the origin (empty from agents that do not
    /// say), left to it while it makes progress. Ignored from a member that is not up (no
    /// [`Event::PeerUp`] since it came or went down): it is news from before the member left,
    /// or from one whose way of sharing out origin pieces is not known, and taking it would
    /// make this appliance share out among other members than the rest of the site does.
    PeerHave { peer: PeerId, have: PieceSet, fetching: PieceSet },
    /// A request delivered one of its pieces, verified and written. The request ends with
    /// its last piece.
    Completed { request: RequestId, piece: u64 },
    /// A request failed without evidence of lying (connection lost, refused, truncated): its
    /// pieces not yet completed are wanted again.
    Failed { request: RequestId },
    /// A LAN peer refused a request because every one of its upload slots is taken: its
    /// pieces are wanted again, from another peer or from it a little later.
    Busy { request: RequestId },
    /// A request delivered a group that did not verify.
    Corrupt { request: RequestId },
    /// Pieces found intact locally (resume, seeding).
    HaveLocally { pieces: Vec<Range<u64>> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch `pieces` (ascending) from `source`: one piece from a LAN peer, a run of them from
    /// the origin, which streams them in order; each is reported with [`Event::Completed`].
    Request {
        id: RequestId,
        pieces: Vec<u64>,
        source: Source,
    },
    Cancel {
        id: RequestId,
    },
    /// Tell the site what we hold now.
    Announce {
        have: PieceSet,
        /// The pieces in our origin requests: the site leaves them to us (a member that joins
        /// late would otherwise fetch what it is now assigned a second time).
        fetching: PieceSet,
    },
    /// Drop this peer for the release and report it.
    Ban {
        peer: PeerId,
        reason: String,
    },
    /// Every piece is here.
    Done,
}

/// A peer this appliance has heard of. Peers get dense indices on first sight and keep them
/// (through crashes and bans), so per-peer state is found without comparing 32-byte keys.
#[derive(Debug, Clone)]
struct Peer {
    id: PeerId,
    /// Up and not banned: a member that can be asked for pieces.
    live: bool,
    banned: bool,
    /// Up, banned or not: it counts in the shares of origin pieces until it goes down, as it
    /// does for the members that have not banned it.
    present: bool,
    have: PieceSet,
    in_flight: usize,
    /// Orders peers with as many of our requests in flight: a hash of us and them.
    spread: u64,
    /// Central Command named it a member of the site.
    named: bool,
    /// Live and its have-map heard since it came up: what it holds is known.
    heard: bool,
    /// It said it is copying what it already holds; its have-map is still to come.
    preparing: bool,
    backoff_until: Duration,
    failures: u32,
    /// Its rendezvous score for every piece (the origin pieces are shared out by them).
    scores: Arc<[u64]>,
    /// How it shares out origin pieces (until it says, as the oldest agents do).
    assignment: Assignment,
    /// The last look at its have-map found nothing to ask it for: no need to look again until
    /// it gains pieces or one of our requests fails (and its piece is wanted again).
    nothing_to_ask: bool,
    /// When its have-map last grew (or it came up): a peer silent for too long is stalled and
    /// loses its origin assignments. `None` once it went down.
    progress: Option<Duration>,
    /// The pieces it said it fetches from the origin, and whether they count in
    /// `fetched_elsewhere` (while it is a contender: live and not stalled).
    fetching: PieceSet,
    fetching_counted: bool,
}

/// What the origin pieces were shared out from: the contenders (live peers that are not
/// stalled), the peers present (banned or stalled too, by index) and the oldest way of sharing
/// out any of them knows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shares {
    contenders: Vec<usize>,
    present: Vec<usize>,
    assignment: Assignment,
}

/// Where a request went: the origin or a peer, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Origin,
    Peer(usize),
}

#[derive(Debug, Clone)]
struct InFlight {
    /// The pieces not yet delivered, ascending (the order the sender streams them in).
    pieces: Vec<u64>,
    from: Sender,
    /// When it was issued or last delivered a piece: a request that has not moved for
    /// `request_timeout` is given up, however long it is.
    moved: Duration,
}

/// Counters the agent reports and the simulator checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub from_lan: u64,
    pub from_origin: u64,
    pub failed: u64,
    pub corrupt: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    /// LAN requests a peer refused for want of an upload slot.
    pub busy: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    me: PeerId,
    config: Config,
    have: PieceSet,
    index: BTreeMap<PeerId, usize>,
    peers: Vec<Peer>,
    /// Indices of the live peers in identity order: the order free slots are filled in.
    live: Vec<usize>,
    /// Request ids grow with the time they were issued, so the oldest request comes first.
    in_flight: BTreeMap<RequestId, InFlight>,
    /// Requests in flight per piece, and live peers holding each piece, with the pieces where
    /// each is non-zero as sets: kept up to date so that scheduling combines sets a word at a
    /// time instead of rescanning every request and peer for every piece.
    copies: Vec<u16>,
    requested: PieceSet,
    holder_count: Vec<u32>,
    held: PieceSet,
    /// Contenders fetching each piece from the origin, and the pieces where that is non-zero:
    /// this appliance leaves those to them.
    fetching_count: Vec<u32>,
    fetched_elsewhere: PieceSet,
    /// Per-piece hashes, computed once: this appliance's tie-break order, and its rendezvous
    /// score (the origin pieces are shared out by them).
    tie_breaks: Vec<u64>,
    my_scores: Arc<[u64]>,
    rendezvous: Arc<Rendezvous>,
    /// The pieces this appliance fetches from the origin, and what that was worked out from.
    assigned: PieceSet,
    contenders: Option<Shares>,
    /// Smoothed time an origin request of ours takes.
    origin_piece_time: Option<Duration>,
    origin_in_flight: usize,
    /// Requests in flight to LAN peers, all together.
    lan_in_flight: usize,
    /// The named members other than this appliance, and how many of them are live with their
    /// have-maps heard.
    named_others: usize,
    named_heard: usize,
    origin_backoff_until: Duration,
    origin_backoff: Duration,
    next_request: u64,
    actions: VecDeque<Action>,
    announce_due: Option<Duration>,
    last_announce: Option<Duration>,
    /// Bytes of pieces gained since the last announcement: what pays for the next one.
    gained_since_announce: u64,
    done_sent: bool,
    /// The time of the first event: the discovery grace counts from here.
    started: Option<Duration>,
    now: Duration,
    stats: Stats,
}

impl Scheduler {
    pub fn new(me: PeerId, config: Config) -> Self {
        let rendezvous = Arc::new(Rendezvous::new(config.pieces));
        Self::with_rendezvous(me, config, rendezvous)
    }

    /// A scheduler that takes members' rendezvous scores from a shared table.
    pub fn with_rendezvous(me: PeerId, config: Config, rendezvous: Arc<Rendezvous>) -> Self {
        assert_eq!(rendezvous.pieces, config.pieces, "a table for this release");
        let have = PieceSet::empty(config.pieces);
        let pieces = config.pieces as usize;
        let origin_backoff = config.origin_backoff;
        let my_scores = rendezvous.scores(&me);
        let named_others = (config.site_members.iter())
            .filter(|&&member| member != me)
            .collect::<BTreeSet<_>>()
            .len();
        Self {
            me,
            have,
            index: BTreeMap::new(),
            peers: Vec::new(),
            live: Vec::new(),
            in_flight: BTreeMap::new(),
            copies: vec![0; pieces],
            requested: PieceSet::empty(config.pieces),
            holder_count: vec![0; pieces],
            held: PieceSet::empty(config.pieces),
            fetching_count: vec![0; pieces],
            fetched_elsewhere: PieceSet::empty(config.pieces),
            tie_breaks: (0..pieces as u64).map(|p| hash64(&me.0, &p.to_le_bytes())).collect(),
            my_scores,
            rendezvous,
            assigned: PieceSet::empty(config.pieces),
            contenders: None,
            config,
            origin_piece_time: None,
            origin_in_flight: 0,
            lan_in_flight: 0,
            named_others,
            named_heard: 0,
            origin_backoff_until: Duration::ZERO,
            origin_backoff,
            next_request: 0,
            actions: VecDeque::new(),
            announce_due: None,
            last_announce: None,
            gained_since_announce: 0,
            done_sent: false,
            started: None,
            now: Duration::ZERO,
            stats: Stats::default(),
        }
    }

    pub fn have(&self) -> &PieceSet {
        &self.have
    }

    /// How this appliance shares out origin pieces at best (what it announces).
    pub fn assignment(&self) -> Assignment {
        self.config.assignment
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn is_done(&self) -> bool {
        self.have.is_full()
    }

    pub fn live_peers(&self) -> usize {
        self.live.len()
    }

    /// Live peers whose have-map (or lack of one) says they still miss pieces: who would
    /// lose a source if this appliance went away now.
    pub fn peers_missing_pieces(&self) -> usize {
        self.peers.iter().filter(|p| p.live && !p.banned && !p.have.is_full()).count()
    }

    pub fn handle_event(&mut self, event: Event, now: Duration) {
        self.now = self.now.max(now);
        self.started.get_or_insert(now);
        match event {
            Event::PeerUp { peer, assignment } => self.peer_up(peer, assignment, now),
            Event::PeerDown { peer } => {
                if let Some(&i) = self.index.get(&peer) {
                    self.forget_peer(i);
                    self.peers[i].present = false;
                    self.peers[i].progress = None;
                    self.fail_requests_to(i);
                }
            }
            Event::PeerPreparing { peer } => {
                if let Some(&i) = self.index.get(&peer)
                    && self.peers[i].live
                {
                    self.peers[i].preparing = true;
                }
            }
            Event::PeerHave { peer, have, fetching } => {
                let banned = self.index.get(&peer).is_some_and(|&i| self.peers[i].banned);
                let ignored = banned || !self.present(&peer) || have.len() != self.config.pieces;
                if peer == self.me || ignored {
                    return;
                }
                let fetching = if fetching.len() == self.config.pieces {
                    fetching
                } else {
                    PieceSet::empty(self.config.pieces)
                };
                // Scheduling once with the old have-map and once more below keeps the actions
                // those two steps have always produced.
                self.schedule();
                let i = self.index[&peer];
                let state = &mut self.peers[i];
                if state.live {
                    // A member that was preparing has been busy, not stalled: it fetches its
                    // share from now on.
                    if std::mem::take(&mut state.preparing) {
                        state.progress = Some(now);
                    }
                    if !std::mem::replace(&mut state.heard, true) {
                        self.named_heard += usize::from(state.named);
                    }
                    if have.count() > state.have.count() {
                        state.progress = Some(now);
                    }
                    state.nothing_to_ask = false;
                    let old = std::mem::replace(&mut state.have, have);
                    count_holders(
                        &mut self.holder_count,
                        &mut self.held,
                        &old,
                        &self.peers[i].have,
                    );
                    let counted = self.peers[i].fetching_counted;
                    self.count_fetching(i, false);
                    self.peers[i].fetching = fetching;
                    self.count_fetching(i, counted);
                }
            }
            Event::Completed { request, piece } => self.complete(request, piece, now),
            Event::Failed { request } => self.fail(request, false),
            Event::Busy { request } => self.busy(request),
            Event::Corrupt { request } => {
                let Some(bad) = self.in_flight.get(&request).cloned() else { return };
                self.stats.corrupt += 1;
                self.fail(request, true);
                if let Sender::Peer(i) = bad.from {
                    let piece = bad.pieces.first().copied().unwrap_or_default();
                    self.ban(i, format!("sent a corrupt group of piece {piece}"));
                }
            }
            Event::HaveLocally { pieces } => {
                for range in pieces {
                    for piece in range {
                        self.have.insert(piece);
                    }
                }
                self.schedule_announce(true);
            }
        }
        self.schedule();
    }

    /// Requests that ran out of time fail; due announcements go out.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = self.now.max(now);
        self.started.get_or_insert(now);
        let expired: Vec<RequestId> = (self.in_flight.iter())
            .filter(|(_, r)| now.saturating_sub(r.moved) >= self.config.request_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.stats.timed_out += 1;
            self.actions.push_back(Action::Cancel { id });
            self.fail(id, false);
        }
        self.schedule();
    }

    /// When [`Self::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let stillest = self.in_flight.values().map(|r| r.moved).min();
        let requests = stillest.map(|moved| moved + self.config.request_timeout);
        let live = self.live.iter().map(|&i| &self.peers[i]);
        let backoffs = live.map(|p| p.backoff_until).filter(|&t| t > self.now);
        let origin = Some(self.origin_backoff_until).filter(|&t| t > self.now);
        let grace = (self.started)
            .filter(|_| !self.all_members_up() || self.any_preparing())
            .map(|s| match self.any_preparing() {
                true => s + self.config.preparing_grace,
                false => s + self.config.discovery_grace,
            })
            .filter(|&t| t > self.now);
        let stall_after = self.stall_after();
        let takeovers = self.peers.iter().filter_map(|p| p.progress).map(|last| last + stall_after);
        requests
            .into_iter()
            .chain(backoffs)
            .chain(origin)
            .chain(grace)
            .chain(takeovers.filter(|&t| t > self.now))
            .chain(self.announce_due)
            .min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// `peer` came up ([`Event::PeerUp`]) and has not gone down since.
    fn present(&self, peer: &PeerId) -> bool {
        self.index.get(peer).is_some_and(|&i| self.peers[i].present)
    }

    /// `peer` is up and shares out origin pieces as `assignment` says.
    fn peer_up(&mut self, peer: PeerId, assignment: Assignment, now: Duration) {
        if peer == self.me {
            return;
        }
        let i = match self.index.get(&peer) {
            Some(&i) => i,
            None => {
                self.index.insert(peer, self.peers.len());
                self.peers.push(Peer {
                    id: peer,
                    live: false,
                    banned: false,
                    present: false,
                    have: PieceSet::empty(self.config.pieces),
                    in_flight: 0,
                    spread: hash64(&self.me.0, &peer.0),
                    named: self.config.site_members.contains(&peer),
                    heard: false,
                    preparing: false,
                    backoff_until: Duration::ZERO,
                    failures: 0,
                    scores: self.rendezvous.scores(&peer),
                    assignment: Assignment::default(),
                    nothing_to_ask: false,
                    progress: None,
                    fetching: PieceSet::empty(self.config.pieces),
                    fetching_counted: false,
                });
                self.peers.len() - 1
            }
        };
        let state = &mut self.peers[i];
        state.present = true;
        state.assignment = assignment;
        if state.banned {
            return;
        }
        state.progress.get_or_insert(now);
        if !state.live {
            // A peer that went down comes back with a clean slate (its have-map was dropped
            // when it left).
            state.live = true;
            state.in_flight = 0;
            state.backoff_until = Duration::ZERO;
            state.failures = 0;
            state.nothing_to_ask = false;
            let peers = &self.peers;
            let at = self.live.partition_point(|&j| peers[j].id < peer);
            self.live.insert(at, i);
            self.contenders = None;
        }
    }

    fn source(&self, from: Sender) -> Source {
        match from {
            Sender::Origin => Source::Origin,
            Sender::Peer(i) => Source::Peer(self.peers[i].id),
        }
    }

    /// One of `request`'s pieces arrived.
    fn complete(&mut self, request: RequestId, piece: u64, now: Duration) {
        let Some(delivering) = self.in_flight.get_mut(&request) else { return };
        let Some(at) = delivering.pieces.iter().position(|&p| p == piece) else { return };
        delivering.pieces.remove(at);
        let (from, moved) = (delivering.from, std::mem::replace(&mut delivering.moved, now));
        if delivering.pieces.is_empty() {
            self.in_flight.remove(&request);
            self.end_request(from);
        }
        self.piece_ended(piece);
        match from {
            Sender::Origin => {
                self.stats.from_origin += 1;
                self.origin_backoff = self.config.origin_backoff;
                let took = now.saturating_sub(moved);
                self.origin_piece_time = Some(match self.origin_piece_time {
                    Some(avg) => (avg * 3 + took) / 4,
                    None => took,
                });
            }
            Sender::Peer(i) => {
                self.stats.from_lan += 1;
                if self.peers[i].live {
                    self.peers[i].failures = 0;
                }
            }
        }
        if self.have.insert(piece) {
            self.gained_since_announce += self.config.piece_bytes;
            // A piece from the origin is on no other member yet: the site waits for it.
            self.schedule_announce(from == Sender::Origin);
        }
        // End game: other requests are no longer needed once all their pieces are here (a
        // run with pieces still missing carries on).
        if self.copies[piece as usize] > 0 {
            let have = &self.have;
            let duplicates: Vec<RequestId> = (self.in_flight.iter())
                .filter(|(_, r)| r.pieces.iter().all(|&p| have.contains(p)))
                .map(|(id, _)| *id)
                .collect();
            for id in duplicates {
                if let Some(cancelled) = self.in_flight.remove(&id) {
                    self.end(&cancelled);
                    self.stats.cancelled += 1;
                    self.actions.push_back(Action::Cancel { id });
                }
            }
        }
    }

    /// A request is no longer in flight: its pieces' copies and its sender's slot are free.
    fn end(&mut self, request: &InFlight) {
        for &piece in &request.pieces {
            self.piece_ended(piece);
        }
        self.end_request(request.from);
    }

    /// One copy of `piece` is no longer in flight.
    fn piece_ended(&mut self, piece: u64) {
        let copies = &mut self.copies[piece as usize];
        *copies -= 1;
        if *copies == 0 {
            self.requested.remove(piece);
        }
    }

    /// A request to `from` ended: its slot is free.
    fn end_request(&mut self, from: Sender) {
        match from {
            Sender::Origin => self.origin_in_flight -= 1,
            Sender::Peer(i) => {
                self.lan_in_flight -= 1;
                let state = &mut self.peers[i];
                if state.live {
                    state.in_flight = state.in_flight.saturating_sub(1);
                }
            }
        }
    }

    fn fail(&mut self, request: RequestId, corrupt: bool) {
        let Some(failed) = self.in_flight.remove(&request) else { return };
        self.end(&failed);
        let wanted_again = |p: &u64| !self.requested.contains(*p) && !self.have.contains(*p);
        if failed.pieces.iter().any(wanted_again) {
            for peer in &mut self.peers {
                peer.nothing_to_ask = false;
            }
        }
        if !corrupt {
            self.stats.failed += 1;
        }
        if failed.from == Sender::Origin {
            // The site must learn we no longer fetch these, or it leaves them to us.
            self.schedule_announce(true);
        }
        match failed.from {
            // Requests in flight together fail together (a cut link): one step of backoff for
            // them all, or eight at once would wait 2⁸ times as long as one.
            Sender::Origin if self.origin_backoff_until <= self.now => {
                self.origin_backoff_until = self.now + self.origin_backoff;
                self.origin_backoff = (self.origin_backoff * 2).min(self.config.origin_backoff_max);
            }
            Sender::Origin => {}
            Sender::Peer(i) => {
                let state = &mut self.peers[i];
                if state.live {
                    state.failures += 1;
                    state.backoff_until =
                        self.now + self.config.peer_backoff * state.failures.min(8);
                }
            }
        }
    }

    /// A peer had no upload slot free: no failure, just not this peer for a moment.
    fn busy(&mut self, request: RequestId) {
        let Some(refused) = self.in_flight.remove(&request) else { return };
        self.end(&refused);
        self.stats.busy += 1;
        for peer in &mut self.peers {
            peer.nothing_to_ask = false;
        }
        if let Sender::Peer(i) = refused.from
            && self.peers[i].live
        {
            // A failed peer's longer backoff stands.
            let until = self.now + self.config.busy_backoff;
            self.peers[i].backoff_until = self.peers[i].backoff_until.max(until);
        }
    }

    fn fail_requests_to(&mut self, peer: usize) {
        let requests: Vec<RequestId> = self
            .in_flight
            .iter()
            .filter(|(_, r)| r.from == Sender::Peer(peer))
            .map(|(id, _)| *id)
            .collect();
        for id in requests {
            self.actions.push_back(Action::Cancel { id });
            self.fail(id, false);
        }
    }

    fn ban(&mut self, peer: usize, reason: String) {
        if !self.peers[peer].banned {
            self.peers[peer].banned = true;
            self.forget_peer(peer);
            self.fail_requests_to(peer);
            self.actions.push_back(Action::Ban { peer: self.peers[peer].id, reason });
        }
    }

    /// Plans the next announcement: `urgent` ones (a piece from the origin, pieces found
    /// locally, or what we fetch from the origin changed) within `announce_interval`; pieces
    /// from peers once they have paid for the announcement ([`Config::announce_share`]) or
    /// have waited `announce_max_delay`.
    fn schedule_announce(&mut self, urgent: bool) {
        let after = |gap: Duration| self.last_announce.map_or(self.now, |last| last + gap);
        let cost = self.live.len() as u64 * ANNOUNCEMENT_WIRE_BYTES;
        let paid = self.gained_since_announce as f64 * self.config.announce_share >= cost as f64;
        let due = if self.have.is_full() {
            self.now
        } else if urgent || paid {
            after(self.config.announce_interval).max(self.now)
        } else {
            after(self.config.announce_max_delay.max(self.config.announce_interval)).max(self.now)
        };
        self.announce_due = Some(self.announce_due.map_or(due, |d| d.min(due)));
    }

    fn issue(&mut self, pieces: Vec<u64>, from: Sender) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        match from {
            Sender::Origin => self.origin_in_flight += 1,
            Sender::Peer(i) => {
                self.lan_in_flight += 1;
                self.peers[i].in_flight += 1;
            }
        }
        for &piece in &pieces {
            self.copies[piece as usize] += 1;
            self.requested.insert(piece);
        }
        let source = self.source(from);
        self.actions.push_back(Action::Request { id, pieces: pieces.clone(), source });
        self.in_flight.insert(id, InFlight { pieces, from, moved: self.now });
    }

    fn copies_in_flight(&self, piece: u64) -> usize {
        usize::from(self.copies[piece as usize])
    }

    /// Live peers that hold `piece`.
    fn holders(&self, piece: u64) -> usize {
        self.holder_count[piece as usize] as usize
    }

    /// Removes a peer and what it held from the counts.
    fn forget_peer(&mut self, peer: usize) {
        let state = &mut self.peers[peer];
        if state.live {
            state.live = false;
            state.preparing = false;
            if std::mem::take(&mut state.heard) {
                self.named_heard -= usize::from(state.named);
            }
            let old = std::mem::replace(&mut state.have, PieceSet::empty(self.config.pieces));
            count_holders(&mut self.holder_count, &mut self.held, &old, &self.peers[peer].have);
            self.count_fetching(peer, false);
            self.peers[peer].fetching = PieceSet::empty(self.config.pieces);
            self.live.retain(|&j| j != peer);
            self.contenders = None;
        }
    }

    /// How long a peer's have-map may stand still before its origin pieces are taken over.
    ///
    /// The site's WAN is shared: when our own origin requests are slow, so are everyone's, and
    /// a peer whose have-map stands still is waiting on the same link, not stalled. So the
    /// delay grows with how long our origin pieces take, including the one still in flight.
    fn stall_after(&self) -> Duration {
        let origin = self.in_flight.values().filter(|r| r.from == Sender::Origin);
        let stillest = origin.map(|r| r.moved).min();
        let waiting = stillest.map_or(Duration::ZERO, |moved| self.now.saturating_sub(moved));
        let per_piece = self.origin_piece_time.unwrap_or(Duration::ZERO).max(waiting);
        self.config.origin_takeover.max(per_piece * 4)
    }

    /// Works out again which pieces this appliance fetches from the origin if the contenders
    /// (the members that are not stalled), the members present or their oldest way of sharing
    /// out changed.
    fn update_assignment(&mut self) {
        let stall_after = self.stall_after();
        let now = self.now;
        let contenders: Vec<usize> = (self.live.iter().copied())
            .filter(|&i| {
                let last = self.peers[i].progress;
                last.is_some_and(|last| now.saturating_sub(last) < stall_after)
            })
            .collect();
        let present: Vec<usize> =
            (0..self.peers.len()).filter(|&i| self.peers[i].present).collect();
        let assignment = (present.iter().map(|&i| self.peers[i].assignment))
            .fold(self.config.assignment, Assignment::min);
        let shares = Shares { contenders, present, assignment };
        if self.contenders.as_ref() == Some(&shares) {
            return;
        }
        // A stalled peer's origin pieces are everyone's again.
        for i in 0..self.peers.len() {
            self.count_fetching(i, shares.contenders.contains(&i));
        }
        self.assigned = match assignment {
            Assignment::Rendezvous => self.highest_scores(&shares.contenders),
            Assignment::BoundedLoad => self.bounded_loads(&shares),
        };
        self.contenders = Some(shares);
    }

    /// [`Assignment::Rendezvous`]: the pieces for which no contender scores higher than us.
    fn highest_scores(&self, contenders: &[usize]) -> PieceSet {
        let mut mine = PieceSet::empty(self.config.pieces);
        for piece in 0..self.config.pieces {
            let score = self.my_scores[piece as usize];
            if contenders.iter().all(|&i| self.peers[i].scores[piece as usize] <= score) {
                mine.insert(piece);
            }
        }
        mine
    }

    /// [`Assignment::BoundedLoad`]: each piece in order goes to the highest-scoring member
    /// present (identities break ties) with fewer than max(⌈pieces ÷ members⌉, 2) so far. A
    /// piece whose member is stalled or banned goes to the highest-scoring contender instead.
    ///
    /// The shares count every member present, not only the contenders: members may disagree
    /// for a while on who is stalled or banned (each bans a liar when it meets its lies), and
    /// shares counted among different members differ everywhere, so each could leave a piece
    /// to the other. This way a disagreement only moves the pieces of the member in question,
    /// as with the highest score alone.
    fn bounded_loads(&self, shares: &Shares) -> PieceSet {
        // (scores, identity, whether it fetches now); we are last.
        let members: Vec<(&[u64], &PeerId, bool)> = (shares.present.iter())
            .map(|&i| {
                let state = &self.peers[i];
                (&*state.scores, &state.id, shares.contenders.contains(&i))
            })
            .chain([(&*self.my_scores, &self.me, true)])
            .collect();
        let me = members.len() - 1;
        // A stalled or banned member's pieces go where the highest score alone sends them.
        let instead = (shares.present.len() > shares.contenders.len())
            .then(|| self.highest_scores(&shares.contenders));
        let most = self.config.pieces.div_ceil(members.len() as u64).max(MIN_SHARE_CAP);
        let mut loads = vec![0u64; members.len()];
        let mut mine = PieceSet::empty(self.config.pieces);
        for piece in 0..self.config.pieces {
            let p = piece as usize;
            let owner = (0..members.len())
                .filter(|&m| loads[m] < most)
                .max_by_key(|&m| (members[m].0[p], members[m].1))
                .expect("members × ⌈pieces ÷ members⌉ has room for every piece");
            loads[owner] += 1;
            let ours = match (owner == me, members[owner].2) {
                (true, _) => true,
                (false, true) => false,
                (false, false) => instead.as_ref().is_some_and(|set| set.contains(piece)),
            };
            if ours {
                mine.insert(piece);
            }
        }
        mine
    }

    /// Counts peer `i`'s origin pieces as fetched elsewhere, or stops counting them.
    fn count_fetching(&mut self, i: usize, counted: bool) {
        let state = &mut self.peers[i];
        if state.fetching_counted == counted {
            return;
        }
        state.fetching_counted = counted;
        let (empty, fetching) = (PieceSet::empty(self.config.pieces), &self.peers[i].fetching);
        let (old, new) = if counted { (&empty, fetching) } else { (fetching, &empty) };
        count_holders(&mut self.fetching_count, &mut self.fetched_elsewhere, old, new);
    }

    /// The pieces in our origin requests.
    pub fn fetching(&self) -> PieceSet {
        let mut fetching = PieceSet::empty(self.config.pieces);
        let origin = self.in_flight.values().filter(|r| r.from == Sender::Origin);
        for piece in origin.flat_map(|r| &r.pieces) {
            fetching.insert(*piece);
        }
        fetching
    }

    /// Every member Central Command named is up and has said what it holds: there is nothing
    /// left to learn, and the discovery grace is over.
    fn all_members_up(&self) -> bool {
        !self.config.site_members.is_empty() && self.named_heard == self.named_others
    }

    /// Who takes part is known well enough for long origin runs: Central Command named no
    /// members, every named member was heard, or those not heard were waited for long enough.
    fn membership_settled(&self) -> bool {
        self.config.site_members.is_empty()
            || self.all_members_up()
            || self.started.is_some_and(|s| self.now >= s + self.config.unheard_members_wait)
    }

    /// Whether the discovery grace is over: its time has passed, or every named member is up;
    /// while a member is preparing, once the preparing grace has passed.
    fn grace_over(&self) -> bool {
        let since = |grace| self.started.is_some_and(|s| self.now >= s + grace);
        if self.any_preparing() {
            return since(self.config.preparing_grace);
        }
        self.all_members_up() || since(self.config.discovery_grace)
    }

    /// A live member said it is preparing and has not said what it holds yet.
    fn any_preparing(&self) -> bool {
        self.live.iter().any(|&i| self.peers[i].preparing)
    }

    /// Origin requests this appliance may have in flight: of the site's window, the part its
    /// own origin pieces are of those the site still has to fetch. Every member works the
    /// same out from the same have-maps, so members with more pieces assigned (shares are
    /// only about even, and uneven where older agents take part) fetch more at once, and all
    /// finish together instead of the last few fetching their remainder one piece after
    /// another.
    fn origin_cap(&self, mine_left: u64, site_left: u64) -> usize {
        let window = (self.config.origin_window_bytes.div_ceil(self.config.piece_bytes.max(1)))
            .min(ORIGIN_REQUESTS_PER_SITE);
        let share = (window * mine_left).div_ceil(site_left.max(1));
        (share as usize).min(self.config.max_origin_requests).max(1)
    }

    fn tie_break(&self, piece: u64) -> u64 {
        self.tie_breaks[piece as usize]
    }

    /// The rarest piece `peer` has that we lack and have not asked anyone for (ties go to the
    /// lowest tie-break, then the lowest piece).
    fn rarest_from(&self, peer: usize) -> Option<u64> {
        let theirs = self.peers[peer].have.words();
        let mut best: Option<((usize, u64), u64)> = None;
        for (w, &word) in theirs.iter().enumerate() {
            let wanted = word & self.have.missing_word(w) & !self.requested.words()[w];
            for piece in pieces_in(w, wanted) {
                let key = (self.holders(piece), self.tie_break(piece));
                if best.is_none_or(|(k, _)| key < k) {
                    best = Some((key, piece));
                }
            }
        }
        best.map(|(_, piece)| piece)
    }

    fn schedule(&mut self) {
        let now = self.now;
        if self.have.is_full() && !self.done_sent {
            self.done_sent = true;
            self.announce_due = Some(now);
        }
        if self.announce_due.is_some_and(|due| due <= now) {
            self.announce_due = None;
            self.last_announce = Some(now);
            self.gained_since_announce = 0;
            let fetching = self.fetching();
            self.actions.push_back(Action::Announce { have: self.have.clone(), fetching });
            if self.have.is_full() {
                self.actions.push_back(Action::Done);
            }
        }
        if self.have.is_full() {
            return;
        }
        let words = self.have.words().len();

        // LAN: while the download window has room, the least busy peer with something to give
        // gets a request for the rarest piece it has (a per-peer hash breaks ties, so the
        // appliances of a site do not all start with the same peer).
        while self.lan_in_flight < self.config.max_lan_requests {
            let max_per_peer = self.config.max_requests_per_peer;
            let candidate = (self.live.iter().copied())
                .filter(|&i| {
                    let state = &self.peers[i];
                    state.in_flight < max_per_peer
                        && state.backoff_until <= now
                        && !state.nothing_to_ask
                })
                .min_by_key(|&i| (self.peers[i].in_flight, self.peers[i].spread));
            let Some(peer) = candidate else { break };
            match self.rarest_from(peer) {
                Some(piece) => self.issue(vec![piece], Sender::Peer(peer)),
                None => self.peers[peer].nothing_to_ask = true,
            }
        }

        // Origin: pieces no live peer has, if this appliance is (or has become) their fetcher.
        if self.origin_backoff_until <= now && self.grace_over() {
            self.update_assignment();
            let ours = &self.assigned;
            let (mut site_left, mut mine_left) = (0, 0);
            for w in 0..words {
                let unheld = self.have.missing_word(w) & !self.held.words()[w];
                site_left += u64::from(unheld.count_ones());
                mine_left += u64::from((unheld & ours.words()[w]).count_ones());
            }
            let origin_cap = self.origin_cap(mine_left, site_left);
            let free = origin_cap.saturating_sub(self.origin_in_flight);
            let run_pieces = match self.membership_settled() {
                true => self.config.origin_run_pieces.max(1),
                false => 1,
            };
            let most = free * run_pieces;
            let mut wanted = Vec::new();
            for w in 0..words {
                if wanted.len() >= most {
                    break;
                }
                let unheld = self.have.missing_word(w)
                    & !self.held.words()[w]
                    & !self.requested.words()[w]
                    & !self.fetched_elsewhere.words()[w]
                    & ours.words()[w];
                wanted.extend(pieces_in(w, unheld).take(most - wanted.len()));
            }
            // Every request this member's share allows, of about equal length: the WAN shares
            // its rate among the site's streams, so a member with more pieces to fetch needs
            // more streams to finish with the others.
            let runs = wanted.len().div_ceil(run_pieces).max(free.min(wanted.len()));
            if runs > 0 {
                let per_run = wanted.len().div_ceil(runs);
                for run in wanted.chunks(per_run) {
                    self.issue(run.to_vec(), Sender::Origin);
                }
                // The site learns what we fetch, so that nobody fetches it again.
                self.schedule_announce(true);
            }
        }

        // End game: everything missing is in flight; ask a second holder for each piece.
        let all_in_flight =
            (0..words).all(|w| self.have.missing_word(w) & !self.requested.words()[w] == 0);
        if all_in_flight {
            let missing: Vec<u64> =
                (0..words).flat_map(|w| pieces_in(w, self.have.missing_word(w))).collect();
            for piece in missing {
                if self.copies_in_flight(piece) >= 2 {
                    continue;
                }
                let second = self.live.iter().copied().find(|&i| {
                    let state = &self.peers[i];
                    state.have.contains(piece)
                        && state.in_flight < self.config.max_requests_per_peer
                        && state.backoff_until <= now
                        && !self
                            .in_flight
                            .values()
                            .any(|r| r.from == Sender::Peer(i) && r.pieces.contains(&piece))
                });
                if let Some(peer) = second {
                    self.issue(vec![piece], Sender::Peer(peer));
                }
            }
        }
    }
}

/// Moves a peer's have-map from `old` to `new` in the per-piece holder counts.
fn count_holders(counts: &mut [u32], held: &mut PieceSet, old: &PieceSet, new: &PieceSet) {
    for (w, (&was, &is)) in old.words().iter().zip(new.words()).enumerate() {
        for piece in pieces_in(w, is & !was) {
            counts[piece as usize] += 1;
            if counts[piece as usize] == 1 {
                held.insert(piece);
            }
        }
        for piece in pieces_in(w, was & !is) {
            counts[piece as usize] -= 1;
            if counts[piece as usize] == 0 {
                held.remove(piece);
            }
        }
    }
}
