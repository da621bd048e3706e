//! Schedulers of a small site driven on a virtual clock: a toy network that delivers every
//! request after a fixed latency, to check the policy (not throughput: that is the simulator's).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};
use sitecast_scheduler::pieces::PieceSet;
use sitecast_scheduler::scheduler::*;

/// How long the site waits for a member that stopped making progress.
const TAKEOVER: Duration = Duration::from_secs(5);

fn peer(i: u8) -> PeerId {
    PeerId([i; 32])
}

#[derive(Debug)]
enum Delivery {
    /// The answer to a request arrives at `to`, from a peer (`None`: the origin) if that peer
    /// is still alive.
    Answer {
        to: usize,
        request: RequestId,
        piece: u64,
        from: Option<usize>,
    },
    Have {
        to: usize,
        from: usize,
        have: PieceSet,
        fetching: PieceSet,
    },
}

/// An origin request as a node issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OriginRequest {
    at: Duration,
    by: usize,
    piece: u64,
}

/// `by` banned `peer` at `at`, after `lan_requests_before` LAN requests of the whole site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ban {
    at: Duration,
    by: usize,
    peer: usize,
    lan_requests_before: usize,
}

struct Site {
    nodes: Vec<Scheduler>,
    alive: Vec<bool>,
    /// Nodes that answer with corrupt data.
    liars: Vec<usize>,
    queue: BTreeMap<(Duration, u64), Delivery>,
    seq: u64,
    now: Duration,
    /// Every origin request, in the order they were issued.
    origin_log: Vec<OriginRequest>,
    /// Origin requests not yet answered or cancelled: (node, request) → pieces.
    origin_in_flight: BTreeMap<(usize, RequestId), Vec<u64>>,
    /// Every LAN request, (by, to), in the order they were issued.
    lan_requests: Vec<(usize, usize)>,
    /// LAN requests not yet answered or cancelled: (node, request) → the peer asked.
    lan_in_flight: BTreeMap<(usize, RequestId), usize>,
    bans: Vec<Ban>,
    /// A node took a corrupt answer from a liar: (when, node, liar).
    fooled: Vec<(Duration, usize, usize)>,
    lan: Duration,
    origin: Duration,
}

impl Site {
    fn new(n: usize, pieces: u64) -> Self {
        Self::with(n, pieces, Scheduler::new)
    }

    /// A site whose schedulers `make` builds.
    fn with(n: usize, pieces: u64, make: impl Fn(PeerId, Config) -> Scheduler) -> Self {
        let nodes: Vec<Scheduler> = (0..n)
            .map(|i| {
                let mut config = Config::new(pieces, 1 << 20);
                config.origin_takeover = TAKEOVER;
                make(peer(i as u8), config)
            })
            .collect();
        let mut site = Self {
            nodes,
            alive: vec![true; n],
            liars: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            now: Duration::ZERO,
            origin_log: Vec::new(),
            origin_in_flight: BTreeMap::new(),
            lan_requests: Vec::new(),
            lan_in_flight: BTreeMap::new(),
            bans: Vec::new(),
            fooled: Vec::new(),
            lan: Duration::from_millis(20),
            origin: Duration::from_millis(200),
        };
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let up = Event::PeerUp {
                        peer: peer(j as u8),
                        assignment: site.nodes[j].assignment(),
                    };
                    site.nodes[i].handle_event(up, Duration::ZERO);
                }
            }
        }
        site
    }

    fn push(&mut self, at: Duration, delivery: Delivery) {
        self.seq += 1;
        self.queue.insert((at, self.seq), delivery);
    }

    fn drain(&mut self, i: usize) {
        while let Some(action) = self.nodes[i].poll_action() {
            match action {
                Action::Request { id, pieces, source: Source::Origin } => {
                    // The origin streams a run: one piece after another.
                    for (k, &piece) in pieces.iter().enumerate() {
                        self.origin_log.push(OriginRequest { at: self.now, by: i, piece });
                        let at = self.now + self.origin * (k as u32 + 1);
                        self.push(at, Delivery::Answer { to: i, request: id, piece, from: None });
                    }
                    self.origin_in_flight.insert((i, id), pieces);
                }
                Action::Request { id, pieces, source: Source::Peer(p) } => {
                    let from = p.0[0] as usize;
                    for piece in pieces {
                        self.lan_requests.push((i, from));
                        self.lan_in_flight.insert((i, id), from);
                        let answer =
                            Delivery::Answer { to: i, request: id, piece, from: Some(from) };
                        self.push(self.now + self.lan, answer);
                    }
                }
                Action::Announce { have, fetching } => {
                    for j in 0..self.nodes.len() {
                        if j != i {
                            let (have, fetching) = (have.clone(), fetching.clone());
                            self.push(
                                self.now + self.lan,
                                Delivery::Have { to: j, from: i, have, fetching },
                            );
                        }
                    }
                }
                Action::Cancel { id } => {
                    self.origin_in_flight.remove(&(i, id));
                    self.lan_in_flight.remove(&(i, id));
                }
                Action::Ban { peer, .. } => self.bans.push(Ban {
                    at: self.now,
                    by: i,
                    peer: peer.0[0] as usize,
                    lan_requests_before: self.lan_requests.len(),
                }),
                Action::Done => {}
            }
        }
    }

    /// Node `i` dies: it answers nothing more and the others see it leave.
    fn kill(&mut self, i: usize) {
        self.alive[i] = false;
        for j in 0..self.nodes.len() {
            if j != i && self.alive[j] {
                self.nodes[j].handle_event(Event::PeerDown { peer: peer(i as u8) }, self.now);
                self.drain(j);
            }
        }
    }

    /// Runs until every live node is done or `limit` passes.
    fn run(&mut self, limit: Duration) {
        self.start();
        self.run_on(limit);
    }

    /// Lets every live node act at the start.
    fn start(&mut self) {
        for i in 0..self.nodes.len() {
            if self.alive[i] {
                self.nodes[i].handle_timeout(self.now);
                self.drain(i);
            }
        }
    }

    /// Runs on from where [`Site::step`] left off until every live node is done or `limit`
    /// passes.
    fn run_on(&mut self, limit: Duration) {
        while self.now < limit && self.step() {}
    }

    /// Runs on while the next delivery or timer falls before `limit`, then sets the clock to
    /// `limit`: nothing later happens early.
    fn run_until(&mut self, limit: Duration) {
        loop {
            let next_timer = (0..self.nodes.len())
                .filter(|&i| self.alive[i])
                .filter_map(|i| self.nodes[i].poll_timeout())
                .min();
            let next_delivery = self.queue.keys().next().map(|k| k.0);
            match next_timer.into_iter().chain(next_delivery).min() {
                Some(next) if next < limit && self.step() => {}
                _ => break,
            }
        }
        self.now = self.now.max(limit);
    }

    /// Handles the next delivery or timer; false once every live node is done or nothing is
    /// left to happen.
    fn step(&mut self) -> bool {
        if (0..self.nodes.len()).all(|i| !self.alive[i] || self.nodes[i].is_done()) {
            return false;
        }
        let next_timer = (0..self.nodes.len())
            .filter(|&i| self.alive[i])
            .filter_map(|i| self.nodes[i].poll_timeout().map(|t| (t, i)))
            .min();
        let next_delivery = self.queue.keys().next().copied();
        let delivery_first = match (next_delivery, next_timer) {
            (Some((at, _)), Some((t, _))) => at <= t,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return false,
        };
        if delivery_first {
            let key = next_delivery.expect("checked");
            let delivery = self.queue.remove(&key).expect("present");
            self.now = key.0;
            match delivery {
                Delivery::Answer { to, request, piece, from } => {
                    if let Some(pieces) = self.origin_in_flight.get_mut(&(to, request)) {
                        pieces.retain(|&p| p != piece);
                        if pieces.is_empty() {
                            self.origin_in_flight.remove(&(to, request));
                        }
                    }
                    self.lan_in_flight.remove(&(to, request));
                    // A peer that died (or stalled) answers nothing: the request is cancelled
                    // when the asker sees it leave, or times out.
                    if self.alive[to] && from.is_none_or(|from| self.alive[from]) {
                        let liar = from.filter(|from| self.liars.contains(from));
                        let event = match liar {
                            Some(_) => Event::Corrupt { request },
                            None => Event::Completed { request, piece },
                        };
                        let corrupt = self.nodes[to].stats().corrupt;
                        self.nodes[to].handle_event(event, self.now);
                        if let Some(liar) = liar
                            && self.nodes[to].stats().corrupt > corrupt
                        {
                            self.fooled.push((self.now, to, liar));
                        }
                        self.drain(to);
                    }
                }
                Delivery::Have { to, from, have, fetching }
                    if self.alive[to] && self.alive[from] =>
                {
                    let event = Event::PeerHave { peer: peer(from as u8), have, fetching };
                    self.nodes[to].handle_event(event, self.now);
                    self.drain(to);
                }
                Delivery::Have { .. } => {}
            }
        } else {
            let (t, i) = next_timer.expect("checked");
            self.now = self.now.max(t);
            self.nodes[i].handle_timeout(self.now);
            self.drain(i);
        }
        true
    }

    /// Origin requests per piece.
    fn origin_requests(&self) -> BTreeMap<u64, u32> {
        let mut counts = BTreeMap::new();
        for request in &self.origin_log {
            *counts.entry(request.piece).or_default() += 1;
        }
        counts
    }

    /// Origin requests per node.
    fn origin_shares(&self) -> Vec<usize> {
        let mut shares = vec![0; self.nodes.len()];
        for request in &self.origin_log {
            shares[request.by] += 1;
        }
        shares
    }

    fn origin_total(&self) -> u32 {
        self.origin_log.len() as u32
    }
}

#[test]
fn a_site_pulls_each_piece_from_the_origin_once() {
    let mut site = Site::new(8, 64);
    site.run(Duration::from_secs(600));
    assert!(site.nodes.iter().all(Scheduler::is_done));
    assert_eq!(site.origin_total(), 64, "{:?}", site.origin_requests());
    let lan: u64 = site.nodes.iter().map(|n| n.stats().from_lan).sum();
    assert_eq!(lan, 7 * 64, "everything else came over the LAN");
}

#[test]
fn members_fetch_equal_shares_from_the_origin() {
    // The highest rendezvous score alone gives these three 23, 17 and 24 of 64 pieces: the
    // third would have half as much again as the second to relay over its uplink.
    let mut site = Site::new(3, 64);
    site.run(Duration::from_secs(600));
    assert!(site.nodes.iter().all(Scheduler::is_done));
    assert_eq!(site.origin_total(), 64, "{:?}", site.origin_requests());
    let shares = site.origin_shares();
    assert!(shares.iter().all(|&share| share <= 64usize.div_ceil(3)), "{shares:?}");
}

#[test]
fn a_lone_appliance_fetches_everything_from_the_origin() {
    let mut site = Site::new(1, 10);
    site.run(Duration::from_secs(60));
    assert!(site.nodes[0].is_done());
    assert_eq!(site.origin_total(), 10);
}

#[test]
fn a_lying_peer_is_banned_and_everyone_still_finishes() {
    let liar = 2;
    let mut site = Site::new(5, 40);
    site.liars = vec![liar];
    let limit = Duration::from_secs(600);
    site.run(limit);
    assert!(site.now < limit, "the run ended");
    for (i, node) in site.nodes.iter().enumerate() {
        if i != liar {
            assert!(node.is_done(), "node {i}");
            assert!(node.stats().corrupt <= 1, "each honest node is fooled at most once");
        }
    }
    assert!(!site.fooled.is_empty(), "nobody asked the liar for anything");
    // Whoever took corrupt data from the liar banned it there and then, and asked it for
    // nothing more.
    for &(at, node, from) in &site.fooled {
        let ban = site.bans.iter().find(|b| b.by == node && b.peer == from);
        let ban = ban.unwrap_or_else(|| {
            panic!(
                "node {node} took corrupt data from {from} at {at:?} and never banned it: {:?}",
                site.bans
            )
        });
        assert_eq!(ban.at, at, "node {node} banned {from} later than its first corrupt answer");
        let later = &site.lan_requests[ban.lan_requests_before..];
        assert!(!later.contains(&(node, from)), "node {node} asked {from} again after the ban");
    }
    // Nobody banned an honest peer, or anyone without evidence, or anyone twice.
    for ban in &site.bans {
        assert_eq!(ban.peer, liar, "{ban:?}: an honest peer was banned");
    }
    let banned: Vec<(usize, usize)> = site.bans.iter().map(|b| (b.by, b.peer)).collect();
    let fooled: Vec<(usize, usize)> = site.fooled.iter().map(|&(_, by, from)| (by, from)).collect();
    assert_eq!(banned, fooled, "one ban for each node that took corrupt data, none otherwise");
}

#[test]
fn when_the_assigned_fetcher_dies_the_next_takes_over() {
    let pieces = 32;
    let mut site = Site::new(4, pieces);
    site.start();
    // Node 0 dies mid-run: it has origin requests in flight, and holds a piece from the origin
    // that the others have heard of and do not hold yet.
    let in_flight_at_0 = |site: &Site| -> BTreeSet<u64> {
        let in_flight = site.origin_in_flight.iter();
        in_flight
            .filter(|((node, _), _)| *node == 0)
            .flat_map(|(_, pieces)| pieces.clone())
            .collect()
    };
    // The pieces node 0 holds and no other node does; `None` while some are held by some of
    // the others only (a survivor that has not heard yet that another holds such a piece may
    // fetch it from the origin once more, so which pieces die with node 0 would be unclear).
    let held_by_0_alone = |site: &Site| -> Option<BTreeSet<u64>> {
        let mut alone = BTreeSet::new();
        for piece in site.nodes[0].have().iter() {
            match (1..4).filter(|&j| site.nodes[j].have().contains(piece)).count() {
                0 => alone.insert(piece),
                3 => continue,
                _ => return None,
            };
        }
        Some(alone)
    };
    loop {
        // Everything node 0 announced has reached the others, and they are asking it for
        // pieces: they know what it holds, and must forget it and their requests to it.
        let heard = !site.queue.values().any(|d| matches!(d, Delivery::Have { from: 0, .. }));
        let asked = site.lan_in_flight.values().any(|&peer| peer == 0);
        let alone = held_by_0_alone(&site);
        if heard
            && asked
            && !in_flight_at_0(&site).is_empty()
            && alone.is_some_and(|a| !a.is_empty())
        {
            break;
        }
        assert!(site.step(), "node 0 never had origin pieces to share and more in flight");
    }
    let death = site.now;
    let in_flight = in_flight_at_0(&site);
    let alone = held_by_0_alone(&site).expect("checked");
    site.kill(0);
    let limit = Duration::from_secs(600);
    site.run_on(limit);

    assert!(site.now < limit, "the run ended");
    assert!((1..4).all(|i| site.nodes[i].is_done()), "the others finished");
    // Each piece came from the origin once, but for those that died with node 0: those it had
    // in flight from the origin and those nobody else held yet. Each of them came once more,
    // so the origin served `pieces + lost.len()` pieces.
    let lost: BTreeSet<u64> = in_flight.union(&alone).copied().collect();
    let expected: BTreeMap<u64, u32> =
        (0..pieces).map(|piece| (piece, 1 + u32::from(lost.contains(&piece)))).collect();
    assert_eq!(
        site.origin_requests(),
        expected,
        "died at {death:?} with {in_flight:?} in flight from the origin and {alone:?} alone"
    );
    // The others took over as node 0 left, not after waiting for it as for a stalled fetcher.
    for &piece in &lost {
        let again = site.origin_log.iter().find(|r| r.piece == piece && r.by != 0);
        let again = again.expect("fetched again");
        assert!(again.at < death + TAKEOVER / 2, "{again:?}: taken over late (died {death:?})");
    }
}

#[test]
fn a_fetcher_that_stalls_is_replaced_after_the_takeover_delay() {
    // The pieces node 0 fetches from the origin when it works.
    let mut healthy = Site::new(3, 16);
    healthy.run(Duration::from_secs(600));
    let of_node_0: BTreeSet<u64> =
        healthy.origin_log.iter().filter(|r| r.by == 0).map(|r| r.piece).collect();
    assert!(!of_node_0.is_empty(), "node 0 fetches nothing: {:?}", healthy.origin_log);

    // Node 0 stays in everyone's membership but never answers anything and never fetches.
    let mut site = Site::new(3, 16);
    site.alive[0] = false;
    let limit = Duration::from_secs(600);
    site.run(limit);
    assert!(site.now < limit, "the run ended");
    assert!(site.nodes[1].is_done() && site.nodes[2].is_done(), "the others finished");
    // Every piece came from the origin once, node 0's from the others.
    let once: BTreeMap<u64, u32> = (0..16).map(|piece| (piece, 1)).collect();
    assert_eq!(site.origin_requests(), once, "node 0's pieces: {of_node_0:?}");
    let taken_over: Vec<&OriginRequest> =
        site.origin_log.iter().filter(|r| of_node_0.contains(&r.piece)).collect();
    for request in &taken_over {
        assert_ne!(request.by, 0, "the stalled node fetched");
        // Node 0 came up at 0 and never made progress since.
        assert!(request.at >= TAKEOVER, "{request:?}: taken over before the takeover delay");
    }
    let first = taken_over.iter().map(|r| r.at).min().expect("taken over");
    assert!(first < TAKEOVER + Duration::from_secs(1), "taken over only at {first:?}");
}

#[test]
fn schedulers_sharing_a_rendezvous_table_act_as_with_their_own() {
    let mut own = Site::new(6, 48);
    own.kill(2);
    own.run(Duration::from_secs(600));
    let table = Arc::new(Rendezvous::new(48));
    let mut shared =
        Site::with(6, 48, |me, config| Scheduler::with_rendezvous(me, config, Arc::clone(&table)));
    shared.kill(2);
    shared.run(Duration::from_secs(600));
    assert_eq!(own.now, shared.now);
    assert_eq!(own.origin_log, shared.origin_log);
    let stats = |site: &Site| site.nodes.iter().map(Scheduler::stats).collect::<Vec<_>>();
    assert_eq!(stats(&own), stats(&shared));
}

proptest! {
    /// Any site size and release size: everyone finishes and the origin serves each piece
    /// about once (at most one extra copy per piece from takeovers).
    #[test]
    fn sites_finish_with_about_one_origin_copy(n in 1usize..10, pieces in 1u64..80, seed in any::<u8>()) {
        let mut site = Site::new(n, pieces);
        site.lan = Duration::from_millis(5 + u64::from(seed % 30));
        site.run(Duration::from_secs(3600));
        prop_assert!(site.nodes.iter().all(Scheduler::is_done));
        prop_assert_eq!(site.origin_total() as u64, pieces);
    }

    /// Sites where some members are older agents (each piece to the highest score alone):
    /// the site shares out as they do, so every piece comes from the origin once and none
    /// waits for its fetcher to be taken for stalled (which would take ten minutes here).
    #[test]
    fn sites_with_older_agents_fetch_each_piece_once(n in 2usize..10, pieces in 1u64..80, older in any::<u16>()) {
        let takeover = Duration::from_secs(600);
        let mut site = Site::with(n, pieces, |me, config| {
            let assignment = match older & (1 << me.0[0]) {
                0 => Assignment::NEWEST,
                _ => Assignment::Rendezvous,
            };
            Scheduler::new(me, Config { assignment, origin_takeover: takeover, ..config })
        });
        site.run(Duration::from_secs(3600));
        prop_assert!(site.nodes.iter().all(Scheduler::is_done));
        prop_assert_eq!(site.origin_total() as u64, pieces);
        prop_assert!(site.now < takeover, "a piece waited for a takeover: done at {:?}", site.now);
    }
}

/// The origin requests a lone appliance issues when `now` comes.
fn origin_requests_at(node: &mut Scheduler, now: Duration) -> Vec<RequestId> {
    node.handle_timeout(now);
    std::iter::from_fn(|| node.poll_action())
        .filter_map(|action| match action {
            Action::Request { id, source: Source::Origin, .. } => Some(id),
            _ => None,
        })
        .collect()
}

#[test]
fn requests_that_fail_together_back_off_once() {
    let mut node = Scheduler::new(peer(0), Config::new(64, 1 << 20));
    node.handle_timeout(Duration::ZERO);
    // After the discovery grace.
    let start = Duration::from_secs(1);
    let cut = start + Duration::from_secs(1);
    let first = origin_requests_at(&mut node, start);
    assert!(first.len() >= 2, "several origin requests in flight: {first:?}");
    // The link is cut: every request in flight fails at once.
    for request in first {
        node.handle_event(Event::Failed { request }, cut);
    }
    let backoff = Config::new(64, 1 << 20).origin_backoff;
    // The site hears soon that these pieces are no longer being fetched.
    let announced = node.poll_timeout().expect("an announcement is due");
    assert!(announced < cut + backoff, "announced only at {announced:?}");
    node.handle_timeout(announced);
    let actions: Vec<Action> = std::iter::from_fn(|| node.poll_action()).collect();
    let told = actions
        .iter()
        .any(|a| matches!(a, Action::Announce { fetching, .. } if fetching.count() == 0));
    assert!(told, "{actions:?}");
    assert_eq!(
        node.poll_timeout(),
        Some(cut + backoff),
        "one step of backoff, not one per request"
    );
    assert!(origin_requests_at(&mut node, cut + backoff / 2).is_empty(), "still backing off");
    assert!(!origin_requests_at(&mut node, cut + backoff).is_empty(), "and then it tries again");
}

/// The origin requests in `actions`: (id, pieces).
fn origin_runs(node: &mut Scheduler) -> Vec<(RequestId, Vec<u64>)> {
    std::iter::from_fn(|| node.poll_action())
        .filter_map(|action| match action {
            Action::Request { id, pieces, source: Source::Origin } => Some((id, pieces)),
            _ => None,
        })
        .collect()
}

#[test]
fn small_pieces_come_from_the_origin_in_runs_reported_piece_by_piece() {
    let pieces = 256;
    let mut node = Scheduler::new(peer(0), Config::new(pieces, 16 << 10));
    node.handle_timeout(Duration::ZERO);
    let after_grace = Duration::from_secs(1);
    node.handle_timeout(after_grace);
    let mut now = after_grace;
    let mut runs = origin_runs(&mut node);
    let mut longest = 0;
    while let Some((id, run)) = runs.pop() {
        longest = longest.max(run.len());
        assert!(run.len() as u64 <= MAX_RUN_PIECES, "{} pieces in one request", run.len());
        assert!(run.is_sorted(), "a run is streamed in order: {run:?}");
        for piece in run {
            now += Duration::from_millis(1);
            node.handle_event(Event::Completed { request: id, piece }, now);
            assert!(node.have().contains(piece));
        }
        runs.extend(origin_runs(&mut node));
    }
    assert!(node.is_done(), "every piece came");
    assert!(longest > 1, "16 KiB pieces each in a request of their own");
}

#[test]
fn a_member_that_joins_late_leaves_what_others_fetch_to_them() {
    let pieces = 256;
    let config = || Config::new(pieces, 16 << 10);
    // One run at a time: the early member leaves pieces unfetched for the other.
    let mut early = Scheduler::new(peer(0), Config { max_origin_requests: 1, ..config() });
    early.handle_timeout(Duration::ZERO);
    early.handle_timeout(Duration::from_secs(1));
    let runs = origin_runs(&mut early);
    let fetching = early.fetching();
    assert!(!runs.is_empty() && fetching.count() > 0, "the early member fetches from the origin");

    // Another member comes up while those runs stream: bounded loads give it half the
    // pieces, some of them in the early member's runs.
    let joined = Duration::from_secs(2);
    let mut late = Scheduler::new(peer(1), config());
    late.handle_event(Event::PeerUp { peer: peer(0), assignment: Assignment::NEWEST }, joined);
    let have = early.have().clone();
    late.handle_event(Event::PeerHave { peer: peer(0), have, fetching: fetching.clone() }, joined);
    late.handle_timeout(joined + Duration::from_secs(1));
    let taken: Vec<u64> = origin_runs(&mut late).into_iter().flat_map(|(_, run)| run).collect();
    assert!(!taken.is_empty(), "the late member fetches what nobody else does");
    let twice: Vec<u64> = taken.iter().copied().filter(|&p| fetching.contains(p)).collect();
    assert!(twice.is_empty(), "fetched a second time from the origin: {twice:?}");
}

#[test]
fn a_member_that_banned_a_liar_leaves_no_piece_to_no_one() {
    let pieces = 64;
    let empty = PieceSet::empty(pieces);
    let mut liars = empty.clone();
    liars.insert(0);
    // Three members, each up for the others; member 2 says it holds piece 0.
    let view = |me: u8| {
        let mut node = Scheduler::new(peer(me), Config::new(pieces, 16 << 10));
        for other in (0..3).filter(|&other| other != me) {
            let up = Event::PeerUp { peer: peer(other), assignment: Assignment::NEWEST };
            node.handle_event(up, Duration::ZERO);
            let have = if other == 2 { liars.clone() } else { empty.clone() };
            let fetching = empty.clone();
            node.handle_event(
                Event::PeerHave { peer: peer(other), have, fetching },
                Duration::ZERO,
            );
        }
        node
    };
    // Member 0 asks member 2 for piece 0 and bans it for its corrupt answer; member 1 has
    // not met its lies yet, and counts it among the members that fetch.
    let mut banned = view(0);
    let asked = std::iter::from_fn(|| banned.poll_action()).find_map(|action| match action {
        Action::Request { id, source: Source::Peer(p), .. } if p == peer(2) => Some(id),
        _ => None,
    });
    banned.handle_event(Event::Corrupt { request: asked.expect("asks member 2") }, Duration::ZERO);
    let mut fetched = BTreeSet::new();
    for mut node in [banned, view(1), view(2)] {
        node.handle_timeout(Duration::from_secs(1));
        fetched.extend(origin_runs(&mut node).into_iter().flat_map(|(_, run)| run));
    }
    let nobodys: Vec<u64> = (1..pieces).filter(|p| !fetched.contains(p)).collect();
    assert!(nobodys.is_empty(), "pieces each member leaves to another: {nobodys:?}");
}

#[test]
fn a_member_that_comes_back_as_a_newer_agent_is_shared_out_with_the_newer_way() {
    let pieces = 64;
    // What member 0 fetches from the origin after member 1 came up as each of `ups` in turn.
    let fetched = |ups: &[Assignment]| {
        let mut node = Scheduler::new(peer(0), Config::new(pieces, 16 << 10));
        for &assignment in ups {
            node.handle_event(Event::PeerUp { peer: peer(1), assignment }, Duration::ZERO);
        }
        node.handle_timeout(Duration::from_secs(1));
        let runs = origin_runs(&mut node).into_iter().flat_map(|(_, run)| run);
        runs.collect::<BTreeSet<u64>>()
    };
    let newer = fetched(&[Assignment::BoundedLoad]);
    assert_ne!(fetched(&[Assignment::Rendezvous]), newer, "the two ways differ on this site");
    assert_eq!(fetched(&[Assignment::Rendezvous, Assignment::BoundedLoad]), newer);
}

#[test]
fn news_from_a_member_that_went_down_does_not_bring_it_back() {
    let pieces = 64;
    let empty = PieceSet::empty(pieces);
    // What member 0 fetches from the origin once member 2 went down, with or without an
    // announcement of member 2's that arrives after that.
    let fetched = |late_news: bool| {
        let mut node = Scheduler::new(peer(0), Config::new(pieces, 16 << 10));
        for other in [1, 2] {
            let up = Event::PeerUp { peer: peer(other), assignment: Assignment::NEWEST };
            node.handle_event(up, Duration::ZERO);
        }
        node.handle_event(Event::PeerDown { peer: peer(2) }, Duration::ZERO);
        if late_news {
            let (have, fetching) = (empty.clone(), empty.clone());
            node.handle_event(Event::PeerHave { peer: peer(2), have, fetching }, Duration::ZERO);
        }
        node.handle_timeout(Duration::from_secs(1));
        let runs = origin_runs(&mut node).into_iter().flat_map(|(_, run)| run);
        runs.collect::<BTreeSet<u64>>()
    };
    assert_eq!(fetched(true), fetched(false), "shared out as if member 2 were back");
}

#[test]
fn a_member_that_is_preparing_is_waited_for_before_the_origin() {
    let pieces = 20;
    let mut site = Site::new(3, pieces);
    // Node 2 copies what its active slot holds (pieces 0..18) before it takes part; it says
    // so as it joins, and says nothing more for a second.
    for i in 0..2 {
        site.nodes[i].handle_event(Event::PeerPreparing { peer: peer(2) }, Duration::ZERO);
    }
    site.alive[2] = false;
    site.start();
    site.run_until(Duration::from_secs(1));
    assert!(
        site.origin_log.is_empty(),
        "fetched before node 2 said what it holds: {:?}",
        site.origin_log
    );

    site.alive[2] = true;
    site.nodes[2]
        .handle_event(Event::HaveLocally { pieces: std::iter::once(0..18).collect() }, site.now);
    site.drain(2);
    site.run_on(Duration::from_secs(600));
    assert!(site.nodes.iter().all(Scheduler::is_done));
    // Only what node 2 could not copy came from the origin, once.
    let expected: BTreeMap<u64, u32> = [(18, 1), (19, 1)].into();
    assert_eq!(site.origin_requests(), expected, "{:?}", site.origin_log);
}

#[test]
fn a_member_preparing_for_too_long_is_not_waited_for() {
    let mut site = Site::new(2, 8);
    site.nodes[0].handle_event(Event::PeerPreparing { peer: peer(1) }, Duration::ZERO);
    site.alive[1] = false;
    site.run(Duration::from_secs(600));
    assert!(site.nodes[0].is_done(), "node 0 finished from the origin alone");
    let waited = site.origin_log.first().expect("origin requests").at;
    assert!(waited >= Config::new(8, 1 << 20).preparing_grace, "asked the origin at {waited:?}");
}

#[test]
fn peers_still_missing_pieces_are_counted_until_they_hold_all_or_go() {
    let pieces = 8;
    let mut node = Scheduler::new(peer(0), Config::new(pieces, 1 << 20));
    let now = Duration::ZERO;
    let all = std::iter::once(0..pieces).collect();
    node.handle_event(Event::HaveLocally { pieces: all }, now);
    assert_eq!(node.peers_missing_pieces(), 0, "no peers yet");
    for i in [1, 2, 3] {
        node.handle_event(Event::PeerUp { peer: peer(i), assignment: Assignment::NEWEST }, now);
    }
    // Heard of but silent: it may lack everything.
    assert_eq!(node.peers_missing_pieces(), 3);
    let have = |n: u64| {
        let mut have = PieceSet::empty(pieces);
        have.insert_range(0..n);
        have
    };
    let fetching = PieceSet::empty(pieces);
    node.handle_event(
        Event::PeerHave { peer: peer(1), have: have(8), fetching: fetching.clone() },
        now,
    );
    node.handle_event(
        Event::PeerHave { peer: peer(2), have: have(5), fetching: fetching.clone() },
        now,
    );
    assert_eq!(node.peers_missing_pieces(), 2, "peers 2 and 3");
    node.handle_event(Event::PeerDown { peer: peer(3) }, now);
    assert_eq!(node.peers_missing_pieces(), 1, "peer 2");
    node.handle_event(Event::PeerHave { peer: peer(2), have: have(8), fetching }, now);
    assert_eq!(node.peers_missing_pieces(), 0);
}

/// The LAN requests in `actions`: (id, peer).
fn lan_requests(node: &mut Scheduler) -> Vec<(RequestId, PeerId)> {
    std::iter::from_fn(|| node.poll_action())
        .filter_map(|action| match action {
            Action::Request { id, source: Source::Peer(peer), .. } => Some((id, peer)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_busy_peer_is_left_alone_briefly_not_backed_off_as_failed() {
    let pieces = 64;
    let config = Config::new(pieces, 16 << 10);
    let mut node = Scheduler::new(peer(0), config.clone());
    let now = Duration::ZERO;
    for i in [1, 2] {
        node.handle_event(Event::PeerUp { peer: peer(i), assignment: Assignment::NEWEST }, now);
        let (have, fetching) = (PieceSet::full(pieces), PieceSet::empty(pieces));
        node.handle_event(Event::PeerHave { peer: peer(i), have, fetching }, now);
    }
    let first = lan_requests(&mut node);
    let to_one: Vec<RequestId> =
        first.iter().filter(|(_, p)| *p == peer(1)).map(|(id, _)| *id).collect();
    assert_eq!(to_one.len(), config.max_requests_per_peer, "{first:?}");

    // Peer 1 has no upload slot free: it refuses every request.
    let refused = Duration::from_millis(2);
    for &request in &to_one {
        node.handle_event(Event::Busy { request }, refused);
    }
    let meanwhile = lan_requests(&mut node);
    assert!(meanwhile.iter().all(|(_, p)| *p != peer(1)), "asked again at once: {meanwhile:?}");
    assert_eq!(node.stats().busy, to_one.len() as u64);
    assert_eq!(node.stats().failed, 0, "a refusal is not a failure");

    // Shortly after (not the two seconds a failed peer waits), it is asked again.
    let again = node.poll_timeout().expect("a timer for the busy peer");
    assert_eq!(again, refused + config.busy_backoff);
    assert!(config.busy_backoff < config.peer_backoff);
    node.handle_timeout(again);
    let after = lan_requests(&mut node);
    assert!(after.iter().any(|(_, p)| *p == peer(1)), "peer 1 never asked again: {after:?}");
}

/// Completes every origin run of `node` at `now` and returns the runs it asks for next.
fn complete_runs(
    node: &mut Scheduler,
    runs: Vec<(RequestId, Vec<u64>)>,
    now: Duration,
) -> Vec<(RequestId, Vec<u64>)> {
    for (id, run) in runs {
        for piece in run {
            node.handle_event(Event::Completed { request: id, piece }, now);
        }
    }
    origin_runs(node)
}

#[test]
fn origin_runs_are_one_piece_while_a_named_member_is_unheard() {
    let pieces = 256;
    let empty = PieceSet::empty(pieces);
    let config =
        Config { site_members: vec![peer(0), peer(1), peer(2)], ..Config::new(pieces, 16 << 10) };
    let wait = config.unheard_members_wait;
    let hear = |node: &mut Scheduler, member: u8, at: Duration| {
        let up = Event::PeerUp { peer: peer(member), assignment: Assignment::NEWEST };
        node.handle_event(up, at);
        let (have, fetching) = (empty.clone(), empty.clone());
        node.handle_event(Event::PeerHave { peer: peer(member), have, fetching }, at);
    };
    let longest = |runs: &[(RequestId, Vec<u64>)]| runs.iter().map(|(_, r)| r.len()).max();

    // Member 2 starts later than the others: until it is heard, a piece at a time.
    let mut node = Scheduler::new(peer(0), config.clone());
    node.handle_timeout(Duration::ZERO);
    hear(&mut node, 1, Duration::ZERO);
    let after_grace = Duration::from_millis(500);
    node.handle_timeout(after_grace);
    let runs = origin_runs(&mut node);
    assert_eq!(longest(&runs), Some(1), "runs on a guess of who takes part: {runs:?}");
    hear(&mut node, 2, after_grace);
    let runs = complete_runs(&mut node, runs, after_grace + Duration::from_millis(10));
    assert!(longest(&runs) > Some(1), "every member heard, runs are long again: {runs:?}");

    // Member 2 is never heard (a later rollout stage): long runs once it was waited for.
    let mut node = Scheduler::new(peer(0), config);
    node.handle_timeout(Duration::ZERO);
    hear(&mut node, 1, Duration::ZERO);
    node.handle_timeout(after_grace);
    let mut runs = origin_runs(&mut node);
    let mut now = after_grace;
    while now < wait {
        assert_eq!(longest(&runs), Some(1), "at {now:?}: {runs:?}");
        now += Duration::from_millis(100);
        runs = complete_runs(&mut node, runs, now);
    }
    assert!(longest(&runs) > Some(1), "after waiting {wait:?}: {runs:?}");
}

/// One appliance of a 16-member site on a slow LAN (a piece every 50 ms), every other member
/// holding the whole release: what it announces, and when.
#[test]
fn pieces_from_peers_are_announced_in_batches_that_pay_for_them() {
    let (pieces, piece_bytes) = (256, 64 << 10);
    let others: Vec<PeerId> = (1..16).map(peer).collect();
    let mut config = Config::new(pieces, piece_bytes);
    config.site_members = std::iter::once(peer(0)).chain(others.iter().copied()).collect();
    let (share, max_delay) = (config.announce_share, config.announce_max_delay);
    let mut node = Scheduler::new(peer(0), config);
    for &other in &others {
        node.handle_event(
            Event::PeerUp { peer: other, assignment: Assignment::NEWEST },
            Duration::ZERO,
        );
        let (have, fetching) = (PieceSet::full(pieces), PieceSet::empty(pieces));
        node.handle_event(Event::PeerHave { peer: other, have, fetching }, Duration::ZERO);
    }
    let cost = others.len() as u64 * ANNOUNCEMENT_WIRE_BYTES;
    let step = Duration::from_millis(50);
    let mut now = Duration::ZERO;
    let mut waiting: Vec<(RequestId, Vec<u64>)> = Vec::new();
    // (when, pieces held) of each announcement; when each piece arrived.
    let mut announced: Vec<(Duration, u64)> = Vec::new();
    let mut arrived: Vec<Duration> = Vec::new();
    while !node.is_done() {
        let mut due = node.poll_timeout().filter(|&t| t <= now);
        while let Some(at) = due {
            node.handle_timeout(at);
            due = node.poll_timeout().filter(|&t| t <= now && t > at);
        }
        for action in std::iter::from_fn(|| node.poll_action()) {
            match action {
                Action::Request { id, pieces, source } => {
                    assert_ne!(source, Source::Origin, "every piece is on the LAN");
                    waiting.push((id, pieces));
                }
                Action::Announce { have, .. } => announced.push((now, have.count())),
                _ => {}
            }
        }
        now += step;
        assert!(now < Duration::from_secs(3600), "stuck with {} pieces", node.have().count());
        if waiting.is_empty() {
            continue;
        }
        let (request, run) = waiting.remove(0);
        for piece in run {
            node.handle_event(Event::Completed { request, piece }, now);
            arrived.push(now);
        }
    }
    node.handle_timeout(now);
    for action in std::iter::from_fn(|| node.poll_action()) {
        if let Action::Announce { have, .. } = action {
            announced.push((now, have.count()));
        }
    }
    let last = announced.last().copied().expect("announced");
    assert_eq!(last.1, pieces, "being done is announced: {last:?}");
    // The first piece is announced at once; later ones once paid for or waited long.
    let mut before = announced[0];
    let mut paid_early = 0;
    for &(at, held) in &announced[1..announced.len() - 1] {
        let gained = (held - before.1) * piece_bytes;
        let paid = gained as f64 * share >= cost as f64;
        paid_early += usize::from(paid && at < before.0 + max_delay);
        assert!(
            paid || at >= before.0 + max_delay,
            "{} pieces announced at {at:?}, {:?} after the last announcement",
            held - before.1,
            at - before.0,
        );
        before = (at, held);
    }
    // At a piece every 50 ms, seven pieces pay before the longest delay is up.
    assert!(paid_early > 0, "no announcement was paid for: {announced:?}");
    // Every piece is announced within the longest delay (and the step of this clock).
    for (piece, &at) in arrived.iter().enumerate() {
        let told = announced.iter().find(|&&(_, held)| held > piece as u64).expect("told");
        assert!(told.0 <= at + max_delay + step, "piece {piece} came at {at:?}, told {told:?}");
    }
    // One announcement a piece would cost 15 × 600 bytes per 64 KiB: a seventh of the link.
    assert!(announced.len() <= pieces as usize / 4, "{} announcements", announced.len());
}

#[test]
fn a_piece_from_the_origin_is_announced_at_once() {
    // Small pieces on a large site: one piece alone would not pay for an announcement.
    let pieces = 256;
    let mut config = Config::new(pieces, 64 << 10);
    config.site_members = (0..16).map(peer).collect();
    let interval = config.announce_interval;
    let mut node = Scheduler::new(peer(0), config);
    for other in (1..16).map(peer) {
        let up = Event::PeerUp { peer: other, assignment: Assignment::NEWEST };
        node.handle_event(up, Duration::ZERO);
        let (have, fetching) = (PieceSet::empty(pieces), PieceSet::empty(pieces));
        node.handle_event(Event::PeerHave { peer: other, have, fetching }, Duration::ZERO);
    }
    let start = Duration::from_secs(3);
    node.handle_timeout(start);
    let runs = origin_runs(&mut node);
    let (id, run) = runs.first().cloned().expect("an origin request");
    // What it fetches is announced first, so that it cannot carry the first piece with it.
    node.handle_timeout(start);
    while node.poll_action().is_some() {}
    for (k, &piece) in run.iter().enumerate().take(3) {
        // Far apart enough for each to be announced alone, not for announcing to wait.
        let at = start + interval * 3 * (k as u32 + 1);
        node.handle_event(Event::Completed { request: id, piece }, at);
        let mut told = false;
        for _ in 0..100 {
            told |= std::iter::from_fn(|| node.poll_action())
                .any(|a| matches!(a, Action::Announce { have, .. } if have.contains(piece)));
            let next = node.poll_timeout().filter(|&t| t <= at + interval);
            match next {
                Some(due) if !told => node.handle_timeout(due),
                _ => break,
            }
        }
        assert!(told, "piece {piece} from the origin is not announced within {interval:?}");
    }
}
