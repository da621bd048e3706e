//! The discrete-event fleet simulator: the peer crate's own [`Scheduler`] on a virtual clock,
//! with flow-level bandwidth sharing (max-min fair) on each site's WAN link and on every
//! appliance's LAN uplink and downlink.
//!
//! What the model ignores (see `docs/simulator.md`): packet-level effects (slow start, loss
//! recovery; loss is modelled only as a lower effective rate), CPU and disk time, request
//! round trips other than one fixed latency per transfer and per announcement, and the
//! origin's own upload limit across sites (each site has its own WAN link).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use sitecast_peer::scheduler::{Action, Config, Event, PeerId, RequestId, Scheduler, Source};

/// One site's shape and what happens to it.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub appliances: usize,
    pub image_bytes: u64,
    pub piece_bytes: u64,
    /// Origin → site (bits per second).
    pub wan_bps: f64,
    pub wan_latency: Duration,
    /// Per appliance (bits per second): LAN upload and download.
    pub lan_up_bps: Vec<f64>,
    pub lan_down_bps: Vec<f64>,
    pub lan_latency: Duration,
    /// Appliances that serve corrupt data.
    pub corrupt: BTreeSet<usize>,
    /// When each appliance joins (a staged rollout's wave, a late boot).
    pub join_at: Vec<Duration>,
    /// Crashes: appliance, down at, back at.
    pub crashes: Vec<(usize, Duration, Duration)>,
    pub seed: u64,
}

impl SiteSpec {
    pub fn uniform(
        appliances: usize,
        image_bytes: u64,
        wan_mbit: f64,
        lan_mbit: f64,
        seed: u64,
    ) -> Self {
        Self {
            appliances,
            image_bytes,
            piece_bytes: 1 << 20,
            wan_bps: wan_mbit * 1e6,
            wan_latency: Duration::from_millis(20),
            lan_up_bps: vec![lan_mbit * 1e6; appliances],
            lan_down_bps: vec![lan_mbit * 1e6; appliances],
            lan_latency: Duration::from_millis(1),
            corrupt: BTreeSet::new(),
            join_at: vec![Duration::ZERO; appliances],
            crashes: Vec::new(),
            seed,
        }
    }

    pub fn pieces(&self) -> u64 {
        self.image_bytes.div_ceil(self.piece_bytes)
    }

    /// Bytes on the wire for one piece: data plus the size header and 64-byte parents
    /// (about 1/256 of the data for 16 KiB groups).
    fn piece_wire_bytes(&self, piece: u64) -> f64 {
        let start = piece * self.piece_bytes;
        let len = self.piece_bytes.min(self.image_bytes - start) as f64;
        8.0 + len * (1.0 + 64.0 / 16384.0)
    }

    /// Kumar–Ross lower bound on the time for every appliance to hold the image:
    /// `max(F/u_s, F/d_min, N·F/(u_s + Σu_i))`.
    pub fn bound_seconds(&self) -> f64 {
        let f = self.image_bytes as f64 * 8.0;
        let d_min = self.lan_down_bps.iter().copied().fold(f64::INFINITY, f64::min);
        let upload: f64 = self.lan_up_bps.iter().sum();
        let n = self.appliances as f64;
        (f / self.wan_bps).max(f / d_min).max(n * f / (self.wan_bps + upload))
    }
}

/// What a site's simulation produced.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SiteResult {
    pub appliances: usize,
    pub image_bytes: u64,
    pub origin_bytes: u64,
    pub lan_bytes: u64,
    /// When the last honest appliance held every piece.
    pub seconds: f64,
    pub bound_seconds: f64,
    /// Every honest appliance ended with every piece and accepted nothing corrupt.
    pub intact: bool,
    pub events: u64,
    /// BLAKE3 of the event trace: equal traces, equal digests.
    pub trace_digest: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Link {
    Wan,
    Up(usize),
    Down(usize),
}

#[derive(Debug)]
struct Flow {
    to: usize,
    from: Source,
    request: RequestId,
    remaining: f64,
    rate: f64,
    wire: f64,
}

#[derive(Debug)]
enum Delivery {
    Event { to: usize, event: Event },
}

struct Sim<'a> {
    spec: &'a SiteSpec,
    ids: Vec<PeerId>,
    index: BTreeMap<PeerId, usize>,
    nodes: Vec<Scheduler>,
    alive: Vec<bool>,
    joined: Vec<bool>,
    flows: BTreeMap<u64, Flow>,
    /// The flow set changed since rates were last shared out.
    flows_changed: bool,
    next_flow: u64,
    deliveries: BTreeMap<(Duration, u64), Delivery>,
    seq: u64,
    now: Duration,
    origin_bytes: f64,
    lan_bytes: f64,
    accepted_corrupt: bool,
    trace: blake3::Hasher,
    events: u64,
}

/// Appliance identities derive from the seed, so the seed decides the rendezvous order (who
/// fetches which piece from the origin) and with it the whole run.
fn peer_id(seed: u64, index: usize) -> PeerId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&seed.to_le_bytes());
    id[8..].copy_from_slice(&(index as u64).to_le_bytes());
    PeerId(*blake3::hash(&id).as_bytes())
}

impl<'a> Sim<'a> {
    fn new(spec: &'a SiteSpec) -> Self {
        let nodes = (0..spec.appliances)
            .map(|i| {
                let mut config = Config::new(spec.pieces());
                config.discovery_grace = Duration::from_millis(500);
                config.request_timeout = Duration::from_secs(600);
                config.announce_interval = Duration::from_millis(100);
                Scheduler::new(peer_id(spec.seed, i), config)
            })
            .collect();
        let ids: Vec<PeerId> = (0..spec.appliances).map(|i| peer_id(spec.seed, i)).collect();
        let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        Self {
            spec,
            ids,
            index,
            nodes,
            alive: vec![false; spec.appliances],
            joined: vec![false; spec.appliances],
            flows: BTreeMap::new(),
            flows_changed: false,
            next_flow: 0,
            deliveries: BTreeMap::new(),
            seq: 0,
            now: Duration::ZERO,
            origin_bytes: 0.0,
            lan_bytes: 0.0,
            accepted_corrupt: false,
            trace: blake3::Hasher::new(),
            events: 0,
        }
    }

    fn index_of(&self, peer: PeerId) -> Option<usize> {
        self.index.get(&peer).copied()
    }

    fn deliver(&mut self, at: Duration, to: usize, event: Event) {
        self.seq += 1;
        self.deliveries.insert((at, self.seq), Delivery::Event { to, event });
    }

    fn record(&mut self, what: std::fmt::Arguments<'_>) {
        self.events += 1;
        self.trace.update(format!("{:?} {what}\n", self.now).as_bytes());
    }

    fn join(&mut self, i: usize) {
        self.alive[i] = true;
        self.joined[i] = true;
        self.record(format_args!("join {i}"));
        for j in 0..self.spec.appliances {
            if j != i && self.alive[j] {
                let now = self.now;
                let (have_i, have_j) = (self.nodes[i].have().clone(), self.nodes[j].have().clone());
                self.nodes[i].handle_event(Event::PeerUp { peer: self.ids[j] }, now);
                self.nodes[i]
                    .handle_event(Event::PeerHave { peer: self.ids[j], have: have_j }, now);
                self.nodes[j].handle_event(Event::PeerUp { peer: self.ids[i] }, now);
                self.nodes[j]
                    .handle_event(Event::PeerHave { peer: self.ids[i], have: have_i }, now);
            }
        }
        self.nodes[i].handle_timeout(self.now);
    }

    fn crash(&mut self, i: usize) {
        self.alive[i] = false;
        self.record(format_args!("crash {i}"));
        let lost: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| f.to == i || f.from == Source::Peer(self.ids[i]))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let flow = self.flows.remove(&id).expect("present");
            self.flows_changed = true;
            if flow.to != i {
                let at = self.now + self.spec.lan_latency;
                self.deliver(at, flow.to, Event::Failed { request: flow.request });
            }
        }
        for j in 0..self.spec.appliances {
            if j != i && self.alive[j] {
                self.nodes[j].handle_event(Event::PeerDown { peer: self.ids[i] }, self.now);
            }
        }
    }

    /// Restarts a crashed appliance: its verified pieces survived (resume), its requests not.
    fn recover(&mut self, i: usize) {
        let have = self.nodes[i].have().clone();
        let mut config = Config::new(self.spec.pieces());
        config.discovery_grace = Duration::from_millis(500);
        config.request_timeout = Duration::from_secs(600);
        config.announce_interval = Duration::from_millis(100);
        self.nodes[i] = Scheduler::new(self.ids[i], config);
        let pieces: Vec<std::ops::Range<u64>> = have.to_ranges();
        self.nodes[i].handle_event(Event::HaveLocally { pieces }, self.now);
        self.join(i);
    }

    fn drain(&mut self, i: usize) {
        while let Some(action) = self.nodes[i].poll_action() {
            match action {
                Action::Request { id, piece, source } => {
                    let wire = self.spec.piece_wire_bytes(piece);
                    self.record(format_args!("request {i} {piece} {source:?}"));
                    let sender_alive = match source {
                        Source::Origin => true,
                        Source::Peer(peer) => self.index_of(peer).is_some_and(|j| self.alive[j]),
                    };
                    if !sender_alive {
                        let at = self.now + self.spec.lan_latency;
                        self.deliver(at, i, Event::Failed { request: id });
                        continue;
                    }
                    self.next_flow += 1;
                    self.flows_changed = true;
                    self.flows.insert(
                        self.next_flow,
                        Flow { to: i, from: source, request: id, remaining: wire, rate: 0.0, wire },
                    );
                }
                Action::Cancel { id } => {
                    let flow = self
                        .flows
                        .iter()
                        .find(|(_, f)| f.to == i && f.request == id)
                        .map(|(k, _)| *k);
                    if let Some(flow) = flow {
                        let flow = self.flows.remove(&flow).expect("present");
                        self.flows_changed = true;
                        // What was sent before the cancel still crossed the links.
                        let sent = flow.wire - flow.remaining;
                        match flow.from {
                            Source::Origin => self.origin_bytes += sent,
                            Source::Peer(_) => self.lan_bytes += sent,
                        }
                    }
                }
                Action::Announce { have } => {
                    self.record(format_args!("announce {i} {}", have.count()));
                    for j in 0..self.spec.appliances {
                        if j != i && self.alive[j] {
                            let at = self.now + self.spec.lan_latency;
                            self.deliver(
                                at,
                                j,
                                Event::PeerHave { peer: self.ids[i], have: have.clone() },
                            );
                        }
                    }
                }
                Action::Ban { peer, .. } => {
                    self.record(format_args!("ban {i} {:?}", self.index_of(peer)));
                }
                Action::Done => self.record(format_args!("done {i}")),
            }
        }
    }

    /// Max-min fair rates by progressive filling over the links each flow crosses.
    fn allocate(&mut self) {
        let links = |flow: &Flow| -> [Link; 2] {
            match flow.from {
                Source::Origin => [Link::Wan, Link::Down(flow.to)],
                Source::Peer(peer) => {
                    let j = self.index.get(&peer).copied().unwrap_or(0);
                    [Link::Up(j), Link::Down(flow.to)]
                }
            }
        };
        let mut capacity: BTreeMap<Link, f64> = BTreeMap::new();
        let mut users: BTreeMap<Link, Vec<u64>> = BTreeMap::new();
        for (id, flow) in &self.flows {
            for link in links(flow) {
                let cap = match link {
                    Link::Wan => self.spec.wan_bps / 8.0,
                    Link::Up(j) => self.spec.lan_up_bps[j] / 8.0,
                    Link::Down(j) => self.spec.lan_down_bps[j] / 8.0,
                };
                capacity.entry(link).or_insert(cap);
                users.entry(link).or_default().push(*id);
            }
        }
        // Unfixed flows per link, kept as counts so each round is one pass over the links.
        let mut unfixed: BTreeMap<Link, usize> = users.iter().map(|(l, f)| (*l, f.len())).collect();
        let mut fixed: BTreeMap<u64, f64> = BTreeMap::new();
        while fixed.len() < self.flows.len() {
            // The link with the smallest fair share sets the rate of all its unfixed flows.
            let mut best: Option<(f64, Link)> = None;
            for (link, &count) in &unfixed {
                if count == 0 {
                    continue;
                }
                let share = capacity[link] / count as f64;
                if best.is_none_or(|(s, _)| share < s) {
                    best = Some((share, *link));
                }
            }
            let Some((share, link)) = best else { break };
            for id in users[&link].clone() {
                if fixed.contains_key(&id) {
                    continue;
                }
                fixed.insert(id, share);
                for other in links(&self.flows[&id]) {
                    if let Some(cap) = capacity.get_mut(&other) {
                        *cap = (*cap - share).max(0.0);
                    }
                    if let Some(count) = unfixed.get_mut(&other) {
                        *count -= 1;
                    }
                }
            }
        }
        for (id, flow) in &mut self.flows {
            flow.rate = fixed.get(id).copied().unwrap_or(0.0);
        }
    }

    fn honest_done(&self) -> bool {
        (0..self.spec.appliances)
            .filter(|i| !self.spec.corrupt.contains(i))
            .all(|i| self.nodes[i].is_done())
    }

    fn run(mut self) -> SiteResult {
        let mut joins: Vec<(Duration, usize)> =
            self.spec.join_at.iter().copied().zip(0..).collect();
        joins.sort();
        let mut crashes: Vec<(Duration, usize, bool)> = Vec::new();
        for &(i, down, up) in &self.spec.crashes {
            crashes.push((down, i, false));
            crashes.push((up, i, true));
        }
        crashes.sort();
        let mut finished_at = None;
        let limit = Duration::from_secs(7 * 24 * 3600);
        loop {
            if finished_at.is_none() && self.honest_done() && joins.is_empty() {
                finished_at = Some(self.now);
                break;
            }
            if self.now > limit {
                break;
            }
            if self.flows_changed {
                self.allocate();
                self.flows_changed = false;
            }
            let flow_done = self
                .flows
                .iter()
                .filter(|(_, f)| f.rate > 0.0)
                .map(|(id, f)| (self.now + Duration::from_secs_f64(f.remaining / f.rate), *id))
                .min();
            let timer = (0..self.spec.appliances)
                .filter(|&i| self.alive[i])
                .filter_map(|i| self.nodes[i].poll_timeout().map(|t| (t.max(self.now), i)))
                .min();
            let delivery = self.deliveries.keys().next().copied();
            let join = joins.first().copied();
            let crash = crashes.first().copied();
            let next = [
                flow_done.map(|(t, _)| t),
                timer.map(|(t, _)| t),
                delivery.map(|(t, _)| t),
                join.map(|(t, _)| t),
                crash.map(|(t, _, _)| t),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next else { break };
            // Move every flow forward to `next`.
            let dt = next.saturating_sub(self.now).as_secs_f64();
            for flow in self.flows.values_mut() {
                flow.remaining = (flow.remaining - flow.rate * dt).max(0.0);
            }
            self.now = next;
            if let Some((t, i)) = join
                && t == next
            {
                joins.remove(0);
                self.join(i);
                self.drain(i);
                continue;
            }
            if let Some((t, i, up)) = crash
                && t == next
            {
                crashes.remove(0);
                if up {
                    self.recover(i)
                } else {
                    self.crash(i)
                }
                self.drain_all();
                continue;
            }
            if let Some((t, id)) = flow_done
                && t == next
            {
                let flow = self.flows.remove(&id).expect("present");
                self.flows_changed = true;
                let corrupt = matches!(flow.from, Source::Peer(p) if self.index_of(p).is_some_and(|j| self.spec.corrupt.contains(&j)));
                match flow.from {
                    Source::Origin => self.origin_bytes += flow.wire,
                    Source::Peer(_) => self.lan_bytes += flow.wire,
                }
                let latency = if flow.from == Source::Origin {
                    self.spec.wan_latency
                } else {
                    self.spec.lan_latency
                };
                let event = if corrupt {
                    Event::Corrupt { request: flow.request }
                } else {
                    Event::Completed { request: flow.request }
                };
                let at = self.now + latency;
                self.deliver(at, flow.to, event);
                continue;
            }
            if let Some((t, seq)) = delivery
                && t == next
            {
                let Some(Delivery::Event { to, event }) = self.deliveries.remove(&(t, seq)) else {
                    continue;
                };
                if self.alive[to] {
                    if let Event::Completed { .. } = event {
                        self.record(format_args!("completed {to}"));
                    }
                    self.nodes[to].handle_event(event, self.now);
                    self.drain(to);
                }
                continue;
            }
            if let Some((_, i)) = timer {
                self.nodes[i].handle_timeout(self.now);
                self.drain(i);
            }
        }
        let honest: Vec<usize> =
            (0..self.spec.appliances).filter(|i| !self.spec.corrupt.contains(i)).collect();
        let intact = !self.accepted_corrupt && honest.iter().all(|&i| self.nodes[i].is_done());
        SiteResult {
            appliances: self.spec.appliances,
            image_bytes: self.spec.image_bytes,
            origin_bytes: self.origin_bytes.round() as u64,
            lan_bytes: self.lan_bytes.round() as u64,
            seconds: finished_at.unwrap_or(self.now).as_secs_f64(),
            bound_seconds: self.spec.bound_seconds(),
            intact,
            events: self.events,
            trace_digest: self.trace.finalize().to_hex().to_string(),
        }
    }

    fn drain_all(&mut self) {
        for i in 0..self.spec.appliances {
            if self.alive[i] {
                self.drain(i);
            }
        }
    }
}

/// Simulates one site to completion.
pub fn simulate_site(spec: &SiteSpec) -> SiteResult {
    let mut sim = Sim::new(spec);
    // Appliances that join at time zero know each other from the start (the coordinator's
    // site list); later ones join when their time comes.
    sim.drain_all();
    sim.run()
}

/// Several sites (seeds `seed`, `seed + 1`, …), simulated on `threads` threads; results in
/// site order, so the output does not depend on the thread count.
pub fn simulate_sites(template: &SiteSpec, sites: usize, threads: usize) -> Vec<SiteResult> {
    let specs: Vec<SiteSpec> = (0..sites)
        .map(|k| SiteSpec { seed: template.seed.wrapping_add(k as u64), ..template.clone() })
        .collect();
    let mut results: Vec<Option<SiteResult>> = vec![None; sites];
    let chunk = sites.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (specs, slots) in specs.chunks(chunk).zip(results.chunks_mut(chunk)) {
            scope.spawn(move || {
                for (spec, slot) in specs.iter().zip(slots.iter_mut()) {
                    *slot = Some(simulate_site(spec));
                }
            });
        }
    });
    results.into_iter().map(|r| r.expect("every site simulated")).collect()
}
