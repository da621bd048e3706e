//! The discrete-event fleet simulator: the peer crate's own [`Scheduler`] on a virtual clock,
//! with flow-level bandwidth sharing (max-min fair) on each site's WAN link and on every
//! appliance's LAN uplink and downlink; announcements take their bytes on their senders'
//! uplinks.
//!
//! What the model ignores (see `docs/simulator.md`): packet-level effects (slow start, loss
//! recovery; loss is modelled only as a lower effective rate), CPU and disk time, request
//! round trips other than one fixed latency per transfer and per announcement, and the
//! origin's own upload limit across sites (each site has its own WAN link).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use sitecast_iso::GROUP_BYTES;
use sitecast_scheduler::pieces::{PieceLayout, PieceSet};
use sitecast_scheduler::scheduler::{
    ANNOUNCEMENT_WIRE_BYTES, Action, Config, Event, PeerId, Rendezvous, RequestId, Scheduler,
    Source,
};

/// One site's shape and what happens to it.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub appliances: usize,
    pub image_bytes: u64,
    /// Origin → site (bits per second).
    pub wan_bps: f64,
    pub wan_latency: Duration,
    /// Per appliance (bits per second): LAN upload and download.
    pub lan_up_bps: Vec<f64>,
    pub lan_down_bps: Vec<f64>,
    pub lan_latency: Duration,
    /// Appliances that serve corrupt data.
    pub corrupt: BTreeSet<usize>,
    /// Fault injection: the appliances take corrupt data as good (no verification), to show
    /// that `intact` catches it.
    pub skip_verification: bool,
    /// When each appliance joins (a staged rollout's wave, a late boot).
    pub join_at: Vec<Duration>,
    /// Crashes: appliance, down at, back at.
    pub crashes: Vec<(usize, Duration, Duration)>,
    /// Pieces each appliance holds before it fetches anything: copied from its active slot,
    /// which holds an older release (a delta transfer; see [`SiteSpec::on_older_releases`]).
    /// Empty sets: every appliance fetches the whole image.
    pub held: Vec<PieceSet>,
    pub seed: u64,
    /// Write the event trace to stderr as it happens (`sitecast-netsim sim --trace`).
    pub print_trace: bool,
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
            wan_bps: wan_mbit * 1e6,
            wan_latency: Duration::from_millis(20),
            lan_up_bps: vec![lan_mbit * 1e6; appliances],
            lan_down_bps: vec![lan_mbit * 1e6; appliances],
            lan_latency: Duration::from_millis(1),
            corrupt: BTreeSet::new(),
            skip_verification: false,
            join_at: vec![Duration::ZERO; appliances],
            crashes: Vec::new(),
            held: vec![
                PieceSet::empty(PieceLayout::new(image_bytes.div_ceil(GROUP_BYTES)).pieces());
                appliances
            ],
            seed,
            print_trace: false,
        }
    }

    /// A delta transfer: appliance `i` runs older release `i % releases`. Release 0, the
    /// newest of them, lacks the pieces the new release changed: about `changed` of the image
    /// (at least one piece), in seeded runs of 1 to 8 pieces (as changes come: a package's
    /// files, a region of a file system). Each older one lacks those and about `changed` more
    /// (what changed since it). The model works in pieces: a piece the active slot holds in
    /// part counts as lacked.
    pub fn on_older_releases(mut self, releases: usize, changed: f64) -> Self {
        let pieces = self.pieces();
        if pieces == 0 {
            return self;
        }
        let per_release = ((changed * pieces as f64).ceil() as u64).clamp(1, pieces);
        let mut draw = 0u64;
        let mut next = |seed: u64| {
            draw += 1;
            let hash = blake3::hash(format!("older releases of seed {seed}: {draw}").as_bytes());
            u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
        };
        let mut lacks = PieceSet::empty(pieces);
        let mut held_by_release = Vec::new();
        for release in 0..releases.max(1) as u64 {
            let target = (per_release * (release + 1)).min(pieces);
            while lacks.count() < target {
                let start = next(self.seed) % pieces;
                let len = 1 + next(self.seed) % 8;
                let end = (start + len).min(pieces);
                for piece in start..end {
                    if lacks.count() < target {
                        lacks.insert(piece);
                    }
                }
            }
            let mut held = PieceSet::full(pieces);
            for piece in lacks.iter() {
                held.remove(piece);
            }
            held_by_release.push(held);
        }
        self.held = (0..self.appliances)
            .map(|i| held_by_release[i % held_by_release.len()].clone())
            .collect();
        self
    }

    /// The bytes of the image appliance `i` lacks at the start, as ranges.
    pub fn lacked_ranges(&self, i: usize) -> Vec<std::ops::Range<u64>> {
        self.piece_ranges(|piece| !self.held[i].contains(piece))
    }

    /// The bytes no honest appliance holds at the start (the transfer), as ranges.
    pub fn transfer_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let honest = self.honest();
        self.piece_ranges(|piece| honest.iter().all(|&i| !self.held[i].contains(piece)))
    }

    /// The bytes of the pieces `which` picks, adjacent ones merged.
    fn piece_ranges(&self, which: impl Fn(u64) -> bool) -> Vec<std::ops::Range<u64>> {
        let layout = self.piece_layout();
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        for piece in (0..self.pieces()).filter(|&p| which(p)) {
            let groups = layout.groups_of(piece);
            let bytes =
                groups.start * GROUP_BYTES..(groups.end * GROUP_BYTES).min(self.image_bytes);
            match ranges.last_mut() {
                Some(last) if last.end == bytes.start => last.end = bytes.end,
                _ => ranges.push(bytes),
            }
        }
        ranges
    }

    /// Bytes of piece `piece`.
    fn piece_len(&self, piece: u64) -> u64 {
        let groups = self.piece_layout().groups_of(piece);
        (groups.end * GROUP_BYTES).min(self.image_bytes) - groups.start * GROUP_BYTES
    }

    /// Bytes appliance `i` lacks at the start.
    pub fn missing_bytes(&self, i: usize) -> u64 {
        let held = &self.held[i];
        (0..self.pieces()).filter(|&p| !held.contains(p)).map(|p| self.piece_len(p)).sum()
    }

    /// What the honest appliances need that none of them holds: what the origin must send at
    /// least once (the whole image unless some hold older releases).
    pub fn transfer_bytes(&self) -> u64 {
        let honest = self.honest();
        (0..self.pieces())
            .filter(|&p| honest.iter().all(|&i| !self.held[i].contains(p)))
            .map(|p| self.piece_len(p))
            .sum()
    }

    /// How the agents cut this image into pieces.
    pub fn piece_layout(&self) -> PieceLayout {
        PieceLayout::new(self.image_bytes.div_ceil(GROUP_BYTES))
    }

    pub fn pieces(&self) -> u64 {
        self.piece_layout().pieces()
    }

    pub fn piece_bytes(&self) -> u64 {
        self.piece_layout().groups_per_piece() * GROUP_BYTES
    }

    /// Bytes on the wire for one piece: data plus the size header and the 64-byte parents of
    /// the bao encoding: one per group but the first inside the piece, and the piece's
    /// ancestors up to the root (one per level of the tree above it). For small pieces the
    /// ancestors are what counts: 8 of them (512 bytes) on every 16 KiB group of a 4 MiB image.
    ///
    /// A piece that follows `after` in one origin run shares the ancestors above the two,
    /// sent once with the first: it carries only those below where their paths meet.
    fn piece_wire_bytes(&self, piece: u64, after: Option<u64>) -> f64 {
        let layout = self.piece_layout();
        let groups = layout.groups_of(piece);
        let start = groups.start * GROUP_BYTES;
        let len = (groups.end * GROUP_BYTES).min(self.image_bytes) - start;
        let inside = groups.end - groups.start - 1;
        let (header, ancestors) = match after {
            None => (8, u64::from(layout.pieces().next_power_of_two().trailing_zeros())),
            Some(before) => (0, u64::from(64 - (before ^ piece).leading_zeros()) - 1),
        };
        (header + len + 64 * (inside + ancestors)) as f64
    }

    /// The lower bound on the time for every honest appliance to hold the image that the
    /// sweep holds the swarm to: the largest of [`Self::kumar_ross_seconds`],
    /// [`Self::origin_goal_seconds`] and [`Self::latency_seconds`].
    pub fn bound_seconds(&self) -> f64 {
        self.kumar_ross_seconds().max(self.origin_goal_seconds()).max(self.latency_seconds())
    }

    /// Kumar–Ross with the WAN's one-way latency `L` (the bytes' flight time, which the
    /// fluid bound leaves out; it matters where the transfer takes tenths of a second):
    /// - The last of `U` leaves the origin no sooner than `U/u_s`, and lands `L` later.
    /// - Until `L` nothing has landed anywhere on a site that starts empty, so no appliance
    ///   has anything to relay, and the downlinks of the appliances there from the start carry
    ///   only the origin's bytes, `u_s·L` in all. Appliance `i` needs `F` at most `d_i`, so
    ///   by `T` it holds at most `x_i + d_i·(T − L)` of what it received by `L`. The site is
    ///   done at the smallest `T ≥ F/d_i` with `Σ max(0, F − d_i·(T − L)) ≤ u_s·L`: the
    ///   origin's first `u_s·L` shared out as well as can be.
    pub fn latency_seconds(&self) -> f64 {
        let latency = self.wan_latency.as_secs_f64();
        let wan = self.transfer_bytes() as f64 * 8.0 / self.wan_bps + latency;
        let honest = self.honest();
        if honest.iter().any(|&i| !self.held[i].is_empty()) {
            // Held pieces can be relayed from the start: the second part does not apply.
            return wan;
        }
        let present: Vec<(f64, f64)> = (honest.iter())
            .filter(|&&i| self.join_at[i].is_zero())
            .map(|&i| (self.missing_bytes(i) as f64 * 8.0, self.lan_down_bps[i]))
            .collect();
        let early = self.wan_bps * latency;
        let need = |t: f64| -> f64 {
            present.iter().map(|&(f, d)| (f - d * (t - latency)).max(0.0)).sum()
        };
        let mut low = present.iter().map(|&(f, d)| f / d).fold(0.0, f64::max);
        if need(low) <= early {
            return wan.max(low);
        }
        // `need` falls as `T` grows and is 0 by `low + L`: halve the interval between.
        let mut high = low + latency;
        for _ in 0..64 {
            let mid = (low + high) / 2.0;
            if need(mid) <= early { high = mid } else { low = mid }
        }
        wan.max(high)
    }

    /// Kumar–Ross lower bound `max(F/u_s, F/d_min, N·F/(u_s + Σu_i))` over the honest
    /// appliances (a corrupt one's uplink carries nothing useful), and no sooner than each
    /// appliance's join plus `F/d_i`. For a delta transfer, `F` is what appliance `i` lacks
    /// (`M_i`) where it is received, and what none holds (`U`) where the origin sends:
    /// `max(U/u_s, M_i/d_i, ΣM_i/(u_s + Σu_i))`.
    pub fn kumar_ross_seconds(&self) -> f64 {
        let honest = self.honest();
        let missing: Vec<f64> =
            honest.iter().map(|&i| self.missing_bytes(i) as f64 * 8.0).collect();
        let upload: f64 = honest.iter().map(|&i| self.lan_up_bps[i]).sum();
        let each = (honest.iter().zip(&missing))
            .map(|(&i, m)| self.join_at[i].as_secs_f64() + m / self.lan_down_bps[i])
            .fold(0.0, f64::max);
        let received: f64 = missing.iter().sum();
        let u = self.transfer_bytes() as f64 * 8.0;
        (u / self.wan_bps).max(each).max(received / (self.wan_bps + upload))
    }

    /// The bound for a site that keeps the origin goal: if the origin sends the honest
    /// appliances at most `MAX_ORIGIN_RATIO · U`, their uplinks carry the rest of the `ΣM_i`
    /// they receive (`N·F` for a whole image), so no schedule finishes before
    /// `(ΣM_i − MAX_ORIGIN_RATIO·U) / Σu_i`. Kumar–Ross reaches its `ΣM_i/(u_s + Σu_i)` only
    /// by sending more copies from the origin; where uplinks are slow (a tenth of the
    /// downlinks) this bound is the higher one.
    pub fn origin_goal_seconds(&self) -> f64 {
        let honest = self.honest();
        let received: f64 = honest.iter().map(|&i| self.missing_bytes(i) as f64 * 8.0).sum();
        let u = self.transfer_bytes() as f64 * 8.0;
        let from_peers = (received - crate::sweep::MAX_ORIGIN_RATIO * u).max(0.0);
        let upload: f64 = honest.iter().map(|&i| self.lan_up_bps[i]).sum();
        if upload > 0.0 { from_peers / upload } else { 0.0 }
    }

    /// The bound on a site with corrupt members: the WAN carries what the honest appliances
    /// lack (`U`) and whatever the corrupt ones fetch from the origin (`liar_bytes`, measured).
    /// A corrupt member looks like any other until it serves a group that fails to verify,
    /// and fetches what it likes; no schedule of the honest ones can keep its downloads off
    /// the site's WAN, so no schedule finishes before `(U + liar_bytes)/u_s`.
    pub fn shared_wan_seconds(&self, liar_bytes: f64) -> f64 {
        (self.transfer_bytes() as f64 + liar_bytes) * 8.0 / self.wan_bps
    }

    fn honest(&self) -> Vec<usize> {
        (0..self.appliances).filter(|i| !self.corrupt.contains(i)).collect()
    }
}

/// What a site's simulation produced.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SiteResult {
    pub appliances: usize,
    pub image_bytes: u64,
    /// What none of the honest appliances held at the start: the image, unless some copied
    /// from an older release ([`SiteSpec::transfer_bytes`]).
    pub transfer_bytes: u64,
    pub origin_bytes: u64,
    /// What of `origin_bytes` went to honest appliances: a corrupt appliance may fetch what
    /// it likes from the origin, and no scheduler of the others can stop it.
    pub honest_origin_bytes: u64,
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

/// Uploads an appliance serves at once, as the agent does (`max_upload_peers`): it refuses
/// further requests at once ([`Event::Busy`]).
const UPLOAD_SLOTS: usize = 8;

/// A flow's links are numbered: the site's WAN link is 0, appliance `j`'s LAN uplink `1 + j`
/// and its downlink `1 + n + j`; `1 + 2n` stands for no link (an announcement's other end,
/// with no limit). Ascending numbers are the order the rate sharing visits links in (ties
/// between equally loaded links go to the lower number).
const WAN: usize = 0;

#[derive(Debug)]
struct Flow {
    id: u64,
    to: usize,
    from: Source,
    /// The links it crosses: the WAN or the sender's uplink, and the receiver's downlink.
    links: [usize; 2],
    request: RequestId,
    piece: u64,
    /// The pieces of the request after this one: the sender streams them next.
    rest: Vec<u64>,
    wire: f64,
    /// An announcement, not a piece: the sender's one copy to each of the others, all on its
    /// uplink (each receiver's downlink takes one copy, which is not counted), heard when the
    /// last byte is sent.
    news: Option<Box<News>>,
}

#[derive(Debug)]
struct News {
    have: PieceSet,
    fetching: PieceSet,
    /// The sender's number for it: a sender's announcements share its uplink and may end out
    /// of order, and an older one must not overwrite a newer one.
    number: u64,
    /// The peers alive when it was sent.
    to: Vec<usize>,
}

/// The flows in flight in the order they started (ids ascending), with their progress and
/// rates in arrays of their own: every step of the clock moves all of them forward. A flow
/// that ends leaves a hole (no rate, infinitely much left, so it never ends again) until
/// holes are half the arrays, so that ending one does not shift all the others.
#[derive(Debug)]
struct Flows {
    ids: Vec<u64>,
    flows: Vec<Option<Flow>>,
    remaining: Vec<f64>,
    rate: Vec<f64>,
    live: usize,
    /// Flows on each link.
    on_link: Vec<usize>,
    /// A flow with less than this left could end within a nanosecond at the fastest link's
    /// rate; no other flow can.
    close: f64,
    /// The flows (by id, in the order they started) with less than `close` left; `None` when
    /// they must be looked up again (the clock moved).
    closing: Option<Vec<u64>>,
}

impl Flows {
    /// No flow for links of at most `fastest` bytes per second.
    fn new(fastest: f64) -> Self {
        Self {
            ids: Vec::new(),
            flows: Vec::new(),
            remaining: Vec::new(),
            rate: Vec::new(),
            live: 0,
            on_link: Vec::new(),
            close: fastest * 2e-9,
            closing: None,
        }
    }

    fn push(&mut self, flow: Flow) {
        if flow.wire < self.close {
            self.closing = None;
        }
        self.ids.push(flow.id);
        self.remaining.push(flow.wire);
        self.rate.push(0.0);
        for link in flow.links {
            if self.on_link.len() <= link {
                self.on_link.resize(link + 1, 0);
            }
            self.on_link[link] += 1;
        }
        self.flows.push(Some(flow));
        self.live += 1;
    }

    /// The flows in flight with their positions in the arrays.
    fn iter(&self) -> impl Iterator<Item = (usize, &Flow)> {
        self.flows.iter().enumerate().filter_map(|(k, flow)| Some((k, flow.as_ref()?)))
    }

    fn position(&self, id: u64) -> Option<usize> {
        let k = self.ids.binary_search(&id).ok()?;
        self.flows[k].is_some().then_some(k)
    }

    /// Ends the flow with this id; returns it with what it had left to send.
    fn remove(&mut self, id: u64) -> Option<(Flow, f64)> {
        let k = self.position(id)?;
        let flow = self.flows[k].take()?;
        let remaining = std::mem::replace(&mut self.remaining[k], f64::INFINITY);
        self.rate[k] = 0.0;
        self.live -= 1;
        for link in flow.links {
            self.on_link[link] -= 1;
        }
        if let Some(closing) = &mut self.closing {
            closing.retain(|&other| other != id);
        }
        if self.live * 2 < self.flows.len() {
            let keep: Vec<bool> = self.flows.iter().map(Option::is_some).collect();
            retain_by(&mut self.ids, &keep);
            retain_by(&mut self.remaining, &keep);
            retain_by(&mut self.rate, &keep);
            self.flows.retain(Option::is_some);
        }
        Some((flow, remaining))
    }

    fn advance(&mut self, dt: f64) {
        for (remaining, rate) in self.remaining.iter_mut().zip(&self.rate) {
            *remaining = (*remaining - rate * dt).max(0.0);
        }
        self.closing = None;
    }

    /// The flows that could end within a nanosecond, in the order they started.
    fn closing(&mut self) -> &[u64] {
        let Self { ids, remaining, close, .. } = self;
        self.closing.get_or_insert_with(|| {
            let close_ones = remaining.iter().zip(ids.iter()).filter(|&(left, _)| left < close);
            close_ones.map(|(_, &id)| id).collect()
        })
    }

    /// A flow that ends now whatever rates are shared out, if there is one and it comes first,
    /// with `capacity` the links' rates (bytes per second).
    ///
    /// When several flows end at one instant, each one that ends changes the others' rates,
    /// but not whether they end now: sharing the rates out again for each is wasted. A flow
    /// ends now if its time left rounds to zero nanoseconds. Only the closing flows can, and
    /// of those the first started comes first; it surely ends now if it does at half the
    /// rate max-min fairness guarantees it (at least its links' capacity divided by the flows
    /// on them).
    fn ending_now(&mut self, capacity: impl Fn(usize) -> f64) -> Option<u64> {
        let &id = self.closing().first()?;
        let k = self.position(id).expect("closing flows are in flight");
        let flow = self.flows[k].as_ref().expect("in flight");
        let guaranteed = flow
            .links
            .iter()
            .map(|&l| capacity(l) / self.on_link[l] as f64)
            .fold(f64::INFINITY, f64::min);
        let left = Duration::from_secs_f64(self.remaining[k] / (guaranteed / 2.0));
        (left == Duration::ZERO).then_some(flow.id)
    }

    /// The first flow to finish, `after` from now: the shortest time to finish over the flows
    /// that move, ties (to the nanosecond) going to the flow that started first.
    fn next_done(&self) -> Option<(Duration, u64)> {
        let left = |k: usize| self.remaining[k] / self.rate[k];
        let moving = || (0..self.flows.len()).filter(|&k| self.rate[k] > 0.0);
        let soonest = moving().map(left).min_by(f64::total_cmp)?;
        let after = Duration::from_secs_f64(soonest);
        // Rounding to nanoseconds is monotonic, so only flows within a hair of the soonest
        // can round to the same time.
        let first = moving()
            .find(|&k| left(k) <= soonest + 1e-6 && Duration::from_secs_f64(left(k)) == after)
            .expect("the soonest flow rounds to its own time");
        Some((after, self.ids[first]))
    }
}

/// Keeps the items whose flag is set (`retain` visits items once, in order).
fn retain_by<T>(items: &mut Vec<T>, keep: &[bool]) {
    let mut keep = keep.iter();
    items.retain(|_| *keep.next().expect("a flag per item"));
}

#[derive(Debug)]
enum Delivery {
    Event { to: usize, event: Event },
}

/// Scratch space for sharing link rates, kept between calls to save allocations.
#[derive(Debug, Default)]
struct Sharing {
    capacity: Vec<f64>,
    /// Flows (by position) on each link, and how many of them have no rate yet.
    users: Vec<Vec<usize>>,
    unfixed: Vec<usize>,
    /// Links with flows, ascending.
    used: Vec<usize>,
    fixed: Vec<bool>,
}

/// The event trace, hashed line by line as it is written: equal traces, equal digests.
#[derive(Default)]
struct Trace {
    /// Also write each line to stderr.
    print: bool,
    hasher: blake3::Hasher,
    line: String,
    events: u64,
}

impl Trace {
    fn record(&mut self, now: Duration, what: std::fmt::Arguments<'_>) {
        use std::fmt::Write;
        self.events += 1;
        self.line.clear();
        writeln!(self.line, "{now:?} {what}").expect("writing to a String");
        self.hasher.update(self.line.as_bytes());
        if self.print {
            eprint!("{}", self.line);
        }
    }
}

struct Sim<'a> {
    spec: &'a SiteSpec,
    ids: Vec<PeerId>,
    index: BTreeMap<PeerId, usize>,
    nodes: Vec<Scheduler>,
    /// The site's rendezvous scores, worked out once for all its appliances.
    rendezvous: Arc<Rendezvous>,
    /// Each appliance's `poll_timeout`, asked again only after the appliance handled something.
    timers: Vec<Option<Duration>>,
    alive: Vec<bool>,
    joined: Vec<bool>,
    honest: Vec<bool>,
    flows: Flows,
    /// The flow set changed since rates were last shared out.
    flows_changed: bool,
    /// The next flow to finish, while neither the flows nor the clock moved.
    next_done: Option<Option<(Duration, u64)>>,
    sharing: Sharing,
    next_flow: u64,
    deliveries: BTreeMap<(Duration, u64), Delivery>,
    seq: u64,
    now: Duration,
    origin_bytes: f64,
    honest_origin_bytes: f64,
    lan_bytes: f64,
    /// Announcements being sent on each appliance's uplink (they take no upload slot).
    announcing: Vec<usize>,
    /// Announcements each appliance has sent, and the newest of `i`'s that `j` heard
    /// (`heard[j][i]`; a join's exchange counts as all of them).
    announced: Vec<u64>,
    heard: Vec<Vec<u64>>,
    /// The pieces whose true bytes reached each appliance: anything else it claims to hold
    /// it accepted from a liar.
    delivered: Vec<PieceSet>,
    trace: Trace,
}

/// Appliance identities derive from the seed, so the seed decides the rendezvous order (who
/// fetches which piece from the origin) and with it the whole run.
fn peer_id(seed: u64, index: usize) -> PeerId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&seed.to_le_bytes());
    id[8..].copy_from_slice(&(index as u64).to_le_bytes());
    PeerId(*blake3::hash(&id).as_bytes())
}

fn config(spec: &SiteSpec, members: &[PeerId]) -> Config {
    // The agent's own settings, but for the request timeout: a simulated flow on a
    // saturated link may take long without being stalled. Central Command names every
    // appliance of the site as a member.
    let mut config = Config::new(spec.pieces(), spec.piece_bytes());
    config.request_timeout = Duration::from_secs(600);
    config.site_members = members.to_vec();
    config
}

impl<'a> Sim<'a> {
    fn new(spec: &'a SiteSpec) -> Self {
        let ids: Vec<PeerId> = (0..spec.appliances).map(|i| peer_id(spec.seed, i)).collect();
        let rendezvous = Arc::new(Rendezvous::new(spec.pieces()));
        let nodes: Vec<Scheduler> = (ids.iter())
            .map(|&id| Scheduler::with_rendezvous(id, config(spec, &ids), Arc::clone(&rendezvous)))
            .collect();
        let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        // No flow moves faster than the fastest link (bytes per second).
        let fastest_link = [spec.wan_bps]
            .iter()
            .chain(&spec.lan_up_bps)
            .chain(&spec.lan_down_bps)
            .fold(0.0, |a, &b| f64::max(a, b / 8.0));
        Self {
            spec,
            timers: nodes.iter().map(Scheduler::poll_timeout).collect(),
            ids,
            index,
            nodes,
            rendezvous,
            alive: vec![false; spec.appliances],
            joined: vec![false; spec.appliances],
            honest: (0..spec.appliances).map(|i| !spec.corrupt.contains(&i)).collect(),
            flows: Flows::new(fastest_link),
            flows_changed: false,
            next_done: None,
            sharing: Sharing::default(),
            next_flow: 0,
            deliveries: BTreeMap::new(),
            seq: 0,
            now: Duration::ZERO,
            origin_bytes: 0.0,
            honest_origin_bytes: 0.0,
            lan_bytes: 0.0,
            announcing: vec![0; spec.appliances],
            announced: vec![0; spec.appliances],
            heard: vec![vec![0; spec.appliances]; spec.appliances],
            // What an appliance copied from its active slot was verified there.
            delivered: spec.held.clone(),
            trace: Trace { print: spec.print_trace, ..Trace::default() },
        }
    }

    fn index_of(&self, peer: PeerId) -> Option<usize> {
        self.index.get(&peer).copied()
    }

    fn deliver(&mut self, at: Duration, to: usize, event: Event) {
        self.seq += 1;
        self.deliveries.insert((at, self.seq), Delivery::Event { to, event });
    }

    /// Hands `event` to appliance `i`.
    fn handle(&mut self, i: usize, event: Event) {
        self.nodes[i].handle_event(event, self.now);
        self.timers[i] = self.nodes[i].poll_timeout();
    }

    fn handle_timeout(&mut self, i: usize) {
        self.nodes[i].handle_timeout(self.now);
        self.timers[i] = self.nodes[i].poll_timeout();
    }

    fn record(&mut self, what: std::fmt::Arguments<'_>) {
        self.trace.record(self.now, what);
    }

    /// Flows changed: rates must be shared out again.
    fn flows_touched(&mut self) {
        self.flows_changed = true;
        self.next_done = None;
    }

    fn join(&mut self, i: usize) {
        self.alive[i] = true;
        self.joined[i] = true;
        self.record(format_args!("join {i}"));
        for j in 0..self.spec.appliances {
            if j != i && self.alive[j] {
                let (have_i, have_j) = (self.nodes[i].have().clone(), self.nodes[j].have().clone());
                let (fetching_i, fetching_j) = (self.nodes[i].fetching(), self.nodes[j].fetching());
                let assignment = self.nodes[j].assignment();
                self.handle(i, Event::PeerUp { peer: self.ids[j], assignment });
                let peer = self.ids[j];
                self.handle(i, Event::PeerHave { peer, have: have_j, fetching: fetching_j });
                let assignment = self.nodes[i].assignment();
                self.handle(j, Event::PeerUp { peer: self.ids[i], assignment });
                let peer = self.ids[i];
                self.handle(j, Event::PeerHave { peer, have: have_i, fetching: fetching_i });
                (self.heard[i][j], self.heard[j][i]) = (self.announced[j], self.announced[i]);
            }
        }
        self.handle_timeout(i);
    }

    fn crash(&mut self, i: usize) {
        self.alive[i] = false;
        self.record(format_args!("crash {i}"));
        let from_i = Source::Peer(self.ids[i]);
        let lost: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| f.to == i || f.from == from_i)
            .map(|(_, f)| f.id)
            .collect();
        for id in lost {
            let (flow, remaining) = self.flows.remove(id).expect("present");
            self.flows_touched();
            if flow.news.is_some() {
                self.announcing[i] -= 1;
                continue;
            }
            self.count_sent(&flow, flow.wire - remaining);
            if flow.to != i {
                let at = self.now + self.spec.lan_latency;
                self.deliver(at, flow.to, Event::Failed { request: flow.request });
            }
        }
        for j in 0..self.spec.appliances {
            if j != i && self.alive[j] {
                self.handle(j, Event::PeerDown { peer: self.ids[i] });
            }
        }
    }

    /// Restarts a crashed appliance: its verified pieces survived (resume), its requests not.
    fn recover(&mut self, i: usize) {
        let have = self.nodes[i].have().clone();
        let rendezvous = Arc::clone(&self.rendezvous);
        let config = config(self.spec, &self.ids);
        self.nodes[i] = Scheduler::with_rendezvous(self.ids[i], config, rendezvous);
        let pieces: Vec<std::ops::Range<u64>> = have.to_ranges();
        self.handle(i, Event::HaveLocally { pieces });
        self.join(i);
    }

    fn drain(&mut self, i: usize) {
        while let Some(action) = self.nodes[i].poll_action() {
            match action {
                Action::Request { id, pieces, source } => {
                    let Some((&piece, rest)) = pieces.split_first() else { continue };
                    let wire = self.spec.piece_wire_bytes(piece, None);
                    // The trace names appliances by index.
                    match source {
                        Source::Origin => {
                            self.record(format_args!("request {i} {pieces:?} origin"))
                        }
                        Source::Peer(peer) => {
                            let from = self.index_of(peer).expect("a site appliance");
                            self.record(format_args!("request {i} {piece} {from}"))
                        }
                    }
                    let sender = match source {
                        Source::Origin => Some(WAN),
                        Source::Peer(peer) => {
                            self.index_of(peer).filter(|&j| self.alive[j]).map(|j| 1 + j)
                        }
                    };
                    let Some(sender) = sender else {
                        let at = self.now + self.spec.lan_latency;
                        self.deliver(at, i, Event::Failed { request: id });
                        continue;
                    };
                    self.next_flow += 1;
                    let down = 1 + self.spec.appliances + i;
                    self.start(Flow {
                        id: self.next_flow,
                        to: i,
                        from: source,
                        links: [sender, down],
                        request: id,
                        piece,
                        rest: rest.to_vec(),
                        wire,
                        news: None,
                    });
                }
                Action::Cancel { id } => {
                    let ours = |f: &Flow| f.to == i && f.request == id && f.news.is_none();
                    let flow = self.flows.iter().find(|(_, f)| ours(f)).map(|(_, f)| f.id);
                    if let Some(flow) = flow {
                        let (flow, remaining) = self.flows.remove(flow).expect("present");
                        self.flows_touched();
                        // What was sent before the cancel still crossed the links.
                        self.count_sent(&flow, flow.wire - remaining);
                    }
                }
                Action::Announce { have, fetching } => {
                    self.record(format_args!("announce {i} {}", have.count()));
                    let to: Vec<usize> =
                        (0..self.spec.appliances).filter(|&j| j != i && self.alive[j]).collect();
                    if to.is_empty() {
                        continue;
                    }
                    let copies = to.len() as f64;
                    self.announced[i] += 1;
                    let number = self.announced[i];
                    self.next_flow += 1;
                    self.announcing[i] += 1;
                    self.flows_touched();
                    // `to` is the sender itself, so that its crash drops the announcement;
                    // the request and piece fields of a piece's flow mean nothing here.
                    self.flows.push(Flow {
                        id: self.next_flow,
                        to: i,
                        from: Source::Peer(self.ids[i]),
                        links: [1 + i, 1 + 2 * self.spec.appliances],
                        request: RequestId(u64::MAX),
                        piece: 0,
                        rest: Vec::new(),
                        wire: copies * ANNOUNCEMENT_WIRE_BYTES as f64,
                        news: Some(Box::new(News { have, fetching, number, to })),
                    });
                }
                Action::Ban { peer, .. } => {
                    self.record(format_args!("ban {i} {:?}", self.index_of(peer)));
                }
                Action::Done => self.record(format_args!("done {i}")),
            }
        }
    }

    /// Starts `flow`, unless its sender is a LAN peer with every upload slot taken: then the
    /// refusal reaches the requester a LAN round trip later.
    fn start(&mut self, flow: Flow) {
        let uplink = flow.links[0];
        let on_uplink = |j: usize| self.flows.on_link.get(1 + j).copied().unwrap_or(0);
        let uploads = |j: usize| on_uplink(j).saturating_sub(self.announcing[j]);
        if uplink != WAN && uploads(uplink - 1) >= UPLOAD_SLOTS {
            let at = self.now + self.spec.lan_latency * 2;
            self.deliver(at, flow.to, Event::Busy { request: flow.request });
            return;
        }
        self.flows_touched();
        self.flows.push(flow);
    }

    /// Counts `bytes` of `flow` as crossed.
    fn count_sent(&mut self, flow: &Flow, bytes: f64) {
        match flow.from {
            Source::Origin => {
                self.origin_bytes += bytes;
                if self.honest[flow.to] {
                    self.honest_origin_bytes += bytes;
                }
            }
            Source::Peer(_) => self.lan_bytes += bytes,
        }
    }

    /// A link's rate in bytes per second.
    fn capacity(spec: &SiteSpec, link: usize) -> f64 {
        let n = spec.appliances;
        match link {
            WAN => spec.wan_bps / 8.0,
            nowhere if nowhere == 1 + 2 * n => f64::INFINITY,
            up if up <= n => spec.lan_up_bps[up - 1] / 8.0,
            down => spec.lan_down_bps[down - 1 - n] / 8.0,
        }
    }

    /// Max-min fair rates by progressive filling over the links each flow crosses: the link
    /// with the smallest fair share sets the rate of all its flows that have none yet, which
    /// leaves less for the other links those flows cross.
    fn allocate(&mut self) {
        let n = self.spec.appliances;
        let Flows { flows, rate: rates, live, .. } = &mut self.flows;
        let Sharing { capacity, users, unfixed, used, fixed } = &mut self.sharing;
        if capacity.is_empty() {
            capacity.resize(2 + 2 * n, 0.0);
            users.resize(2 + 2 * n, Vec::new());
            unfixed.resize(2 + 2 * n, 0);
        }
        for &link in used.iter() {
            users[link].clear();
        }
        used.clear();
        for (k, flow) in flows.iter().enumerate() {
            let Some(flow) = flow else { continue };
            for link in flow.links {
                if users[link].is_empty() {
                    used.push(link);
                    capacity[link] = Self::capacity(self.spec, link);
                }
                users[link].push(k);
            }
        }
        used.sort_unstable();
        for &link in used.iter() {
            unfixed[link] = users[link].len();
        }
        fixed.clear();
        fixed.resize(flows.len(), false);
        rates.iter_mut().for_each(|r| *r = 0.0);
        let mut left = *live;
        while left > 0 {
            let mut best: Option<(f64, usize)> = None;
            for &link in used.iter() {
                if unfixed[link] == 0 {
                    continue;
                }
                let share = capacity[link] / unfixed[link] as f64;
                if best.is_none_or(|(s, _)| share < s) {
                    best = Some((share, link));
                }
            }
            let Some((share, link)) = best else { break };
            for &k in &users[link] {
                if fixed[k] {
                    continue;
                }
                fixed[k] = true;
                left -= 1;
                rates[k] = share;
                for other in flows[k].as_ref().expect("in flight").links {
                    capacity[other] = (capacity[other] - share).max(0.0);
                    unfixed[other] -= 1;
                }
            }
        }
    }

    fn honest_done(&self) -> bool {
        (0..self.spec.appliances).filter(|&i| self.honest[i]).all(|i| self.nodes[i].is_done())
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
            let now = self.now;
            let timer = (0..self.spec.appliances)
                .filter(|&i| self.alive[i])
                .filter_map(|i| self.timers[i].map(|t| (t.max(now), i)))
                .min();
            let delivery = self.deliveries.keys().next().copied();
            let join = joins.first().copied();
            let crash = crashes.first().copied();
            let other = [
                timer.map(|(t, _)| t),
                delivery.map(|(t, _)| t),
                join.map(|(t, _)| t),
                crash.map(|(t, _, _)| t),
            ]
            .into_iter()
            .flatten()
            .min();
            // Events come in bursts at one instant, and each flow that starts or ends in a burst
            // changes the rates. Sharing them out once the burst is over is enough while what
            // happens next does not depend on them: a flow ends now at any rate, or the next
            // event is now anyway and no flow can be within a nanosecond of its end.
            let spec = self.spec;
            let flow_done = if self.flows_changed
                && let Some(id) = self.flows.ending_now(|link| Self::capacity(spec, link))
            {
                Some((now, id))
            } else if self.flows_changed && other == Some(now) && self.flows.closing().is_empty() {
                None
            } else {
                if self.flows_changed {
                    self.allocate();
                    self.flows_changed = false;
                }
                match self.next_done {
                    Some(done) => done,
                    None => {
                        let done = self.flows.next_done().map(|(after, id)| (now + after, id));
                        self.next_done = Some(done);
                        done
                    }
                }
            };
            let next = [flow_done.map(|(t, _)| t), other].into_iter().flatten().min();
            let Some(next) = next else { break };
            // Move every flow forward to `next`.
            if next > self.now {
                self.flows.advance((next - self.now).as_secs_f64());
                self.next_done = None;
            }
            self.now = next;
            if let Some((t, i)) = join
                && t == next
            {
                joins.remove(0);
                self.join(i);
                // Meeting the newcomer may have set the others going too (the last named
                // member to come up ends everyone's discovery grace).
                self.drain_all();
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
                let (mut flow, _) = self.flows.remove(id).expect("present");
                self.flows_touched();
                if let Some(news) = flow.news.take() {
                    let i = flow.to;
                    self.announcing[i] -= 1;
                    let at = self.now + self.spec.lan_latency;
                    for &j in &news.to {
                        if !self.alive[j] || self.heard[j][i] >= news.number {
                            continue;
                        }
                        self.heard[j][i] = news.number;
                        let (have, fetching) = (news.have.clone(), news.fetching.clone());
                        self.deliver(at, j, Event::PeerHave { peer: self.ids[i], have, fetching });
                    }
                    continue;
                }
                let corrupt = matches!(flow.from, Source::Peer(p) if self.index_of(p).is_some_and(|j| self.spec.corrupt.contains(&j)));
                self.count_sent(&flow, flow.wire);
                let latency = if flow.from == Source::Origin {
                    self.spec.wan_latency
                } else {
                    self.spec.lan_latency
                };
                let event = if corrupt && !self.spec.skip_verification {
                    Event::Corrupt { request: flow.request }
                } else {
                    if !corrupt {
                        self.delivered[flow.to].insert(flow.piece);
                    }
                    Event::Completed { request: flow.request, piece: flow.piece }
                };
                let at = self.now + latency;
                self.deliver(at, flow.to, event);
                // A run goes on at once: the sender streams its next piece.
                if let Some((&next, rest)) = flow.rest.split_first() {
                    self.next_flow += 1;
                    self.flows.push(Flow {
                        id: self.next_flow,
                        piece: next,
                        rest: rest.to_vec(),
                        wire: self.spec.piece_wire_bytes(next, Some(flow.piece)),
                        ..flow
                    });
                }
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
                    self.handle(to, event);
                    self.drain(to);
                }
                continue;
            }
            if let Some((_, i)) = timer {
                self.handle_timeout(i);
                self.drain(i);
            }
        }
        let honest: Vec<usize> = (0..self.spec.appliances).filter(|&i| self.honest[i]).collect();
        let accepted_corrupt = honest.iter().any(|&i| {
            let held = self.nodes[i].have();
            held.iter().any(|piece| !self.delivered[i].contains(piece))
        });
        let intact = !accepted_corrupt && honest.iter().all(|&i| self.nodes[i].is_done());
        SiteResult {
            appliances: self.spec.appliances,
            image_bytes: self.spec.image_bytes,
            transfer_bytes: self.spec.transfer_bytes(),
            origin_bytes: self.origin_bytes.round() as u64,
            honest_origin_bytes: self.honest_origin_bytes.round() as u64,
            lan_bytes: self.lan_bytes.round() as u64,
            seconds: finished_at.unwrap_or(self.now).as_secs_f64(),
            bound_seconds: self.spec.bound_seconds().max(
                self.spec
                    .shared_wan_seconds((self.origin_bytes - self.honest_origin_bytes).max(0.0)),
            ),
            intact,
            events: self.trace.events,
            trace_digest: self.trace.hasher.finalize().to_hex().to_string(),
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
    for (i, held) in spec.held.iter().enumerate() {
        let pieces = held.to_ranges();
        if !pieces.is_empty() {
            sim.handle(i, Event::HaveLocally { pieces });
        }
    }
    sim.drain_all();
    sim.run()
}

/// Several sites (seeds `seed`, `seed + 1`, …), simulated on `threads` threads; results in
/// site order, so the output does not depend on the thread count.
pub fn simulate_sites(template: &SiteSpec, sites: usize, threads: usize) -> Vec<SiteResult> {
    let specs: Vec<SiteSpec> = (0..sites)
        .map(|k| SiteSpec { seed: template.seed.wrapping_add(k as u64), ..template.clone() })
        .collect();
    in_parallel(&specs, threads, simulate_site)
}

/// `work` over every item on `threads` threads; results in the items' order. Each thread
/// takes the next item when it is free, so a thread on a busy core does not hold the others
/// up with a fixed share of the items.
pub fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let next_item = || next.fetch_add(1, Ordering::Relaxed);
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.clamp(1, items.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let k = next_item();
                        let Some(item) = items.get(k) else { return done };
                        done.push((k, work(item)));
                    }
                })
            })
            .collect();
        for worker in workers {
            for (k, result) in worker.join().expect("a simulation panicked") {
                results[k] = Some(result);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every item done")).collect()
}
