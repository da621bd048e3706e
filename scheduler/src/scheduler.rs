//! The swarm scheduler: which piece to fetch from whom, as a plain state machine.
//!
//! No sockets, no clock, no async: events go in with the time ([`Scheduler::handle_event`],
//! [`Scheduler::handle_timeout`]), actions come out ([`Scheduler::poll_action`]), and
//! [`Scheduler::poll_timeout`] says when to call back. The agent drives it from one task; the
//! simulator drives the same type on a virtual clock. It is deterministic: the same events at
//! the same times give the same actions.
//!
//! Policy:
//! - **LAN first, rarest first.** A LAN peer with a free request slot gets the missing piece
//!   it has that the fewest live peers have (ties broken by a hash of this appliance and the
//!   piece, so peers spread out). At most `max_requests_per_peer` requests per peer.
//! - **The origin once per site.** A piece no live LAN peer has comes from the origin only if
//!   this appliance is the piece's assigned fetcher: the highest rendezvous hash of (piece,
//!   member) over the site's live members. If the assignee dies it leaves the membership and
//!   the next one takes over at once; if it stalls (its have-map has not grown for
//!   `max(origin_takeover, 4 × this appliance's own time per origin piece)`), the next member
//!   in the hash order that is not stalled takes over. Measuring against our own origin
//!   transfers keeps a slow but busy WAN from looking like a stall.
//! - **End game.** When every missing piece is in flight, a second request for a piece goes to
//!   another peer that has it; the first copy to arrive cancels the other.
//! - **Liars are dropped.** A peer that sent a corrupt group is banned for this release and
//!   reported; its requests are reissued elsewhere. Stalled requests time out.

use std::collections::{BTreeMap, VecDeque};
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
    /// Pieces in the release.
    pub pieces: u64,
    pub max_requests_per_peer: usize,
    pub max_origin_requests: usize,
    /// A request with no answer for this long is given up.
    pub request_timeout: Duration,
    /// How long a piece missing from the LAN waits per rank before a non-assigned member
    /// fetches it from the origin.
    pub origin_takeover: Duration,
    /// No origin requests this long after start: the site's membership (and so who is assigned
    /// which piece) is still being learned.
    pub discovery_grace: Duration,
    /// Announcements are coalesced to at most one per this interval (and one when done).
    pub announce_interval: Duration,
    /// After a failed request, a peer gets no new requests for this long.
    pub peer_backoff: Duration,
    /// First origin backoff after a failure; doubles up to `origin_backoff_max`.
    pub origin_backoff: Duration,
    pub origin_backoff_max: Duration,
}

impl Config {
    pub fn new(pieces: u64) -> Self {
        Self {
            pieces,
            max_requests_per_peer: 4,
            max_origin_requests: 4,
            request_timeout: Duration::from_secs(30),
            origin_takeover: Duration::from_secs(10),
            // Site peers are connected before a release arrives and announce the moment they
            // join (gossip pushes), so a fifth of a second is enough to learn who takes part.
            discovery_grace: Duration::from_millis(200),
            announce_interval: Duration::from_millis(50),
            peer_backoff: Duration::from_secs(2),
            origin_backoff: Duration::from_secs(1),
            origin_backoff_max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A site member is alive; `have` may come later with [`Event::PeerHave`].
    PeerUp { peer: PeerId },
    /// A site member left (timed out, disconnected, crashed).
    PeerDown { peer: PeerId },
    /// A peer announced the pieces it holds (the whole set, not a delta).
    PeerHave { peer: PeerId, have: PieceSet },
    /// A request delivered its piece, verified and written.
    Completed { request: RequestId },
    /// A request failed without evidence of lying (connection lost, refused, truncated).
    Failed { request: RequestId },
    /// A request delivered a group that did not verify.
    Corrupt { request: RequestId },
    /// Pieces found intact locally (resume, seeding).
    HaveLocally { pieces: Vec<Range<u64>> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Request {
        id: RequestId,
        piece: u64,
        source: Source,
    },
    Cancel {
        id: RequestId,
    },
    /// Tell the site what we hold now.
    Announce {
        have: PieceSet,
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
    have: PieceSet,
    in_flight: usize,
    backoff_until: Duration,
    failures: u32,
    /// Its rendezvous score for every piece (the highest score fetches a piece from the origin).
    scores: Arc<[u64]>,
    /// The last look at its have-map found nothing to ask it for: no need to look again until
    /// it gains pieces or one of our requests fails (and its piece is wanted again).
    nothing_to_ask: bool,
    /// When its have-map last grew (or it came up): a peer silent for too long is stalled and
    /// loses its origin assignments. `None` once it went down.
    progress: Option<Duration>,
}

/// Where a request went: the origin or a peer, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Origin,
    Peer(usize),
}

#[derive(Debug, Clone)]
struct InFlight {
    piece: u64,
    from: Sender,
    started: Duration,
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
    /// Per-piece hashes, computed once: this appliance's tie-break order, and its rendezvous
    /// score (the highest score fetches the piece from the origin).
    tie_breaks: Vec<u64>,
    my_scores: Arc<[u64]>,
    rendezvous: Arc<Rendezvous>,
    /// The pieces this appliance fetches from the origin (no contender scores higher), and the
    /// contenders (live peers that are not stalled) that was worked out for.
    assigned: PieceSet,
    contenders: Option<Vec<usize>>,
    /// Smoothed time an origin request of ours takes.
    origin_piece_time: Option<Duration>,
    origin_in_flight: usize,
    origin_backoff_until: Duration,
    origin_backoff: Duration,
    next_request: u64,
    actions: VecDeque<Action>,
    announce_due: Option<Duration>,
    last_announce: Option<Duration>,
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
            tie_breaks: (0..pieces as u64).map(|p| hash64(&me.0, &p.to_le_bytes())).collect(),
            my_scores: rendezvous.scores(&me),
            rendezvous,
            assigned: PieceSet::empty(config.pieces),
            contenders: None,
            config,
            origin_piece_time: None,
            origin_in_flight: 0,
            origin_backoff_until: Duration::ZERO,
            origin_backoff,
            next_request: 0,
            actions: VecDeque::new(),
            announce_due: None,
            last_announce: None,
            done_sent: false,
            started: None,
            now: Duration::ZERO,
            stats: Stats::default(),
        }
    }

    pub fn have(&self) -> &PieceSet {
        &self.have
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

    pub fn handle_event(&mut self, event: Event, now: Duration) {
        self.now = self.now.max(now);
        self.started.get_or_insert(now);
        match event {
            Event::PeerUp { peer } => self.peer_up(peer, now),
            Event::PeerDown { peer } => {
                if let Some(&i) = self.index.get(&peer) {
                    self.forget_peer(i);
                    self.peers[i].progress = None;
                    self.fail_requests_to(i);
                }
            }
            Event::PeerHave { peer, have } => {
                let banned = self.index.get(&peer).is_some_and(|&i| self.peers[i].banned);
                if peer == self.me || banned || have.len() != self.config.pieces {
                    return;
                }
                // Scheduling once as for `PeerUp` (with the old have-map) and once more below
                // keeps the actions those two steps have always produced.
                self.peer_up(peer, now);
                self.schedule();
                let i = self.index[&peer];
                let state = &mut self.peers[i];
                if state.live {
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
                }
            }
            Event::Completed { request } => {
                let Some(done) = self.in_flight.remove(&request) else { return };
                self.finish(&done);
                match done.from {
                    Sender::Origin => {
                        self.stats.from_origin += 1;
                        self.origin_backoff = self.config.origin_backoff;
                        let took = now.saturating_sub(done.started);
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
                if self.have.insert(done.piece) {
                    self.schedule_announce();
                }
                // End game: the other copies of this piece are no longer needed.
                if self.copies[done.piece as usize] > 0 {
                    let duplicates: Vec<RequestId> = self
                        .in_flight
                        .iter()
                        .filter(|(_, r)| r.piece == done.piece)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in duplicates {
                        if let Some(cancelled) = self.in_flight.remove(&id) {
                            self.finish(&cancelled);
                            self.stats.cancelled += 1;
                            self.actions.push_back(Action::Cancel { id });
                        }
                    }
                }
            }
            Event::Failed { request } => self.fail(request, false),
            Event::Corrupt { request } => {
                let Some(bad) = self.in_flight.get(&request).cloned() else { return };
                self.stats.corrupt += 1;
                self.fail(request, true);
                if let Sender::Peer(i) = bad.from {
                    self.ban(i, format!("sent a corrupt group of piece {}", bad.piece));
                }
            }
            Event::HaveLocally { pieces } => {
                for range in pieces {
                    for piece in range {
                        self.have.insert(piece);
                    }
                }
                self.schedule_announce();
            }
        }
        self.schedule();
    }

    /// Requests that ran out of time fail; due announcements go out.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = self.now.max(now);
        self.started.get_or_insert(now);
        // Oldest first, so the expired requests are a prefix.
        let expired: Vec<RequestId> = self
            .in_flight
            .iter()
            .take_while(|(_, r)| now.saturating_sub(r.started) >= self.config.request_timeout)
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
        let oldest = self.in_flight.values().next();
        let requests = oldest.map(|r| r.started + self.config.request_timeout);
        let live = self.live.iter().map(|&i| &self.peers[i]);
        let backoffs = live.map(|p| p.backoff_until).filter(|&t| t > self.now);
        let origin = Some(self.origin_backoff_until).filter(|&t| t > self.now);
        let grace = self.started.map(|s| s + self.config.discovery_grace).filter(|&t| t > self.now);
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

    fn peer_up(&mut self, peer: PeerId, now: Duration) {
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
                    have: PieceSet::empty(self.config.pieces),
                    in_flight: 0,
                    backoff_until: Duration::ZERO,
                    failures: 0,
                    scores: self.rendezvous.scores(&peer),
                    nothing_to_ask: false,
                    progress: None,
                });
                self.peers.len() - 1
            }
        };
        let state = &mut self.peers[i];
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
        }
    }

    fn source(&self, from: Sender) -> Source {
        match from {
            Sender::Origin => Source::Origin,
            Sender::Peer(i) => Source::Peer(self.peers[i].id),
        }
    }

    /// A request is no longer in flight: its piece's copy and its sender's slot are free.
    fn finish(&mut self, request: &InFlight) {
        let copies = &mut self.copies[request.piece as usize];
        *copies -= 1;
        if *copies == 0 {
            self.requested.remove(request.piece);
        }
        match request.from {
            Sender::Origin => self.origin_in_flight -= 1,
            Sender::Peer(i) => {
                let state = &mut self.peers[i];
                if state.live {
                    state.in_flight = state.in_flight.saturating_sub(1);
                }
            }
        }
    }

    fn fail(&mut self, request: RequestId, corrupt: bool) {
        let Some(failed) = self.in_flight.remove(&request) else { return };
        self.finish(&failed);
        if !self.requested.contains(failed.piece) && !self.have.contains(failed.piece) {
            for peer in &mut self.peers {
                peer.nothing_to_ask = false;
            }
        }
        if !corrupt {
            self.stats.failed += 1;
        }
        match failed.from {
            Sender::Origin => {
                self.origin_backoff_until = self.now + self.origin_backoff;
                self.origin_backoff = (self.origin_backoff * 2).min(self.config.origin_backoff_max);
            }
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

    fn schedule_announce(&mut self) {
        let earliest =
            self.last_announce.map_or(self.now, |last| last + self.config.announce_interval);
        let due = if self.have.is_full() { self.now } else { earliest.max(self.now) };
        self.announce_due = Some(self.announce_due.map_or(due, |d| d.min(due)));
    }

    fn issue(&mut self, piece: u64, from: Sender) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        match from {
            Sender::Origin => self.origin_in_flight += 1,
            Sender::Peer(i) => self.peers[i].in_flight += 1,
        }
        self.in_flight.insert(id, InFlight { piece, from, started: self.now });
        self.copies[piece as usize] += 1;
        self.requested.insert(piece);
        self.actions.push_back(Action::Request { id, piece, source: self.source(from) });
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
            let old = std::mem::replace(&mut state.have, PieceSet::empty(self.config.pieces));
            count_holders(&mut self.holder_count, &mut self.held, &old, &self.peers[peer].have);
            self.live.retain(|&j| j != peer);
        }
    }

    /// How long a peer's have-map may stand still before its origin pieces are taken over.
    fn stall_after(&self) -> Duration {
        let busy = self.origin_piece_time.map_or(Duration::ZERO, |t| t * 4);
        self.config.origin_takeover.max(busy)
    }

    /// Works out again which pieces this appliance fetches from the origin if the contenders
    /// changed: it fetches a piece if it is the first member in the piece's rendezvous order
    /// that is not stalled. Anyone ranked above us who is still making progress will fetch it.
    fn update_assignment(&mut self) {
        let stall_after = self.stall_after();
        let now = self.now;
        let contenders: Vec<usize> = (self.live.iter().copied())
            .filter(|&i| {
                let last = self.peers[i].progress;
                last.is_some_and(|last| now.saturating_sub(last) < stall_after)
            })
            .collect();
        if self.contenders.as_ref() == Some(&contenders) {
            return;
        }
        self.assigned = PieceSet::empty(self.config.pieces);
        for piece in 0..self.config.pieces {
            let mine = self.my_scores[piece as usize];
            if contenders.iter().all(|&i| self.peers[i].scores[piece as usize] <= mine) {
                self.assigned.insert(piece);
            }
        }
        self.contenders = Some(contenders);
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
            self.actions.push_back(Action::Announce { have: self.have.clone() });
            if self.have.is_full() {
                self.actions.push_back(Action::Done);
            }
        }
        if self.have.is_full() {
            return;
        }
        let words = self.have.words().len();

        // LAN: fill every free slot with the rarest piece that peer has.
        for k in 0..self.live.len() {
            let peer = self.live[k];
            loop {
                let state = &self.peers[peer];
                if state.in_flight >= self.config.max_requests_per_peer
                    || state.backoff_until > now
                    || state.nothing_to_ask
                {
                    break;
                }
                match self.rarest_from(peer) {
                    Some(piece) => self.issue(piece, Sender::Peer(peer)),
                    None => {
                        self.peers[peer].nothing_to_ask = true;
                        break;
                    }
                }
            }
        }

        // Origin: pieces no live peer has, if this appliance is (or has become) their fetcher.
        let grace_over = self.started.is_some_and(|s| now >= s + self.config.discovery_grace);
        let origin_free = self.origin_in_flight < self.config.max_origin_requests
            && self.origin_backoff_until <= now;
        if grace_over && origin_free {
            self.update_assignment();
            'origin: for w in 0..words {
                let unheld = self.have.missing_word(w)
                    & !self.held.words()[w]
                    & !self.requested.words()[w]
                    & self.assigned.words()[w];
                for piece in pieces_in(w, unheld) {
                    if self.origin_in_flight >= self.config.max_origin_requests {
                        break 'origin;
                    }
                    self.issue(piece, Sender::Origin);
                }
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
                            .any(|r| r.piece == piece && r.from == Sender::Peer(i))
                });
                if let Some(peer) = second {
                    self.issue(piece, Sender::Peer(peer));
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
