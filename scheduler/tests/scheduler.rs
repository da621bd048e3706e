//! Schedulers of a small site driven on a virtual clock: a toy network that delivers every
//! request after a fixed latency, to check the policy (not throughput: that is the simulator's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};
use sitecast_scheduler::pieces::PieceSet;
use sitecast_scheduler::scheduler::*;

fn peer(i: u8) -> PeerId {
    PeerId([i; 32])
}

#[derive(Debug)]
enum Delivery {
    /// The answer to a request arrives at `to`.
    Answer {
        to: usize,
        request: RequestId,
        corrupt: bool,
    },
    Have {
        to: usize,
        from: usize,
        have: PieceSet,
    },
}

struct Site {
    nodes: Vec<Scheduler>,
    alive: Vec<bool>,
    /// Nodes that answer with corrupt data.
    liars: Vec<usize>,
    queue: BTreeMap<(Duration, u64), Delivery>,
    seq: u64,
    now: Duration,
    origin_requests: BTreeMap<u64, u32>,
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
                config.origin_takeover = Duration::from_secs(5);
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
            origin_requests: BTreeMap::new(),
            lan: Duration::from_millis(20),
            origin: Duration::from_millis(200),
        };
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    site.nodes[i]
                        .handle_event(Event::PeerUp { peer: peer(j as u8) }, Duration::ZERO);
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
                Action::Request { id, piece, source: Source::Origin } => {
                    *self.origin_requests.entry(piece).or_default() += 1;
                    self.push(
                        self.now + self.origin,
                        Delivery::Answer { to: i, request: id, corrupt: false },
                    );
                }
                Action::Request { id, source: Source::Peer(p), .. } => {
                    let from = p.0[0] as usize;
                    let corrupt = self.liars.contains(&from);
                    let at = if self.alive[from] {
                        self.now + self.lan
                    } else {
                        self.now + Duration::from_secs(3600)
                    };
                    self.push(at, Delivery::Answer { to: i, request: id, corrupt });
                }
                Action::Announce { have } => {
                    for j in 0..self.nodes.len() {
                        if j != i {
                            self.push(
                                self.now + self.lan,
                                Delivery::Have { to: j, from: i, have: have.clone() },
                            );
                        }
                    }
                }
                Action::Cancel { .. } | Action::Ban { .. } | Action::Done => {}
            }
        }
    }

    fn kill(&mut self, i: usize) {
        self.alive[i] = false;
        for j in 0..self.nodes.len() {
            if j != i {
                self.nodes[j].handle_event(Event::PeerDown { peer: peer(i as u8) }, self.now);
            }
        }
    }

    /// Runs until every live node is done or `limit` passes.
    fn run(&mut self, limit: Duration) {
        for i in 0..self.nodes.len() {
            self.nodes[i].handle_timeout(self.now);
            self.drain(i);
        }
        while self.now < limit {
            if (0..self.nodes.len()).all(|i| !self.alive[i] || self.nodes[i].is_done()) {
                return;
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
                (None, None) => return,
            };
            if delivery_first {
                let key = next_delivery.expect("checked");
                let delivery = self.queue.remove(&key).expect("present");
                self.now = key.0;
                match delivery {
                    Delivery::Answer { to, request, corrupt } if self.alive[to] => {
                        let event = if corrupt {
                            Event::Corrupt { request }
                        } else {
                            Event::Completed { request }
                        };
                        self.nodes[to].handle_event(event, self.now);
                        self.drain(to);
                    }
                    Delivery::Have { to, from, have } if self.alive[to] && self.alive[from] => {
                        self.nodes[to].handle_event(
                            Event::PeerHave { peer: peer(from as u8), have },
                            self.now,
                        );
                        self.drain(to);
                    }
                    _ => {}
                }
            } else {
                let (t, i) = next_timer.expect("checked");
                self.now = self.now.max(t);
                self.nodes[i].handle_timeout(self.now);
                self.drain(i);
            }
        }
    }

    fn origin_total(&self) -> u32 {
        self.origin_requests.values().sum()
    }
}

#[test]
fn a_site_pulls_each_piece_from_the_origin_once() {
    let mut site = Site::new(8, 64);
    site.run(Duration::from_secs(600));
    assert!(site.nodes.iter().all(Scheduler::is_done));
    assert_eq!(site.origin_total(), 64, "{:?}", site.origin_requests);
    let lan: u64 = site.nodes.iter().map(|n| n.stats().from_lan).sum();
    assert_eq!(lan, 7 * 64, "everything else came over the LAN");
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
    let mut site = Site::new(5, 40);
    site.liars = vec![2];
    site.run(Duration::from_secs(600));
    for (i, node) in site.nodes.iter().enumerate() {
        if i != 2 {
            assert!(node.is_done(), "node {i}");
            assert!(node.stats().corrupt <= 1, "each honest node is fooled at most once");
        }
    }
}

#[test]
fn when_the_assigned_fetcher_dies_the_next_takes_over() {
    let mut site = Site::new(4, 32);
    site.kill(0);
    site.run(Duration::from_secs(600));
    assert!((1..4).all(|i| site.nodes[i].is_done()));
    assert!(site.origin_total() <= 32 + 4, "{:?}", site.origin_requests);
}

#[test]
fn a_fetcher_that_stalls_is_replaced_after_the_takeover_delay() {
    // Node 0 stays in everyone's membership but never answers anything and never fetches.
    let mut site = Site::new(3, 16);
    site.alive[0] = false;
    site.run(Duration::from_secs(600));
    assert!(site.nodes[1].is_done() && site.nodes[2].is_done());
    assert!(site.now >= Duration::from_secs(5), "the takeover waited for the assignee");
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
    assert_eq!(own.origin_requests, shared.origin_requests);
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
    assert_eq!(
        node.poll_timeout(),
        Some(cut + backoff),
        "one step of backoff, not one per request"
    );
    assert!(origin_requests_at(&mut node, cut + backoff / 2).is_empty(), "still backing off");
    assert!(!origin_requests_at(&mut node, cut + backoff).is_empty(), "and then it tries again");
}
