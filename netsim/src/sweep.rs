//! The swarm's promise over the space of sites: a matrix of shapes, each simulated and held to
//! both goals (origin bytes ≤ 1.05 × the transfer, time ≤ 1.2 × the lower bound).
//!
//! The space: 2 to 128 appliances; transfers of 4 MiB to 4 GiB; WAN-limited to LAN-limited
//! links (WAN/LAN 10/1000 to 1000/100); sites with slow appliances, asymmetric links, late
//! joiners and a corrupt peer. [`matrix`] gives the full sweep (`sitecast-netsim sweep`) or a
//! reduced one that a test runs on every change.

use std::time::Duration;

use crate::sim::{SiteResult, SiteSpec, in_parallel, simulate_site};

const MIB: u64 = 1 << 20;

/// The goals every shape must meet.
pub const MAX_ORIGIN_RATIO: f64 = 1.05;
pub const MAX_TIME_RATIO: f64 = 1.2;

/// One site shape of the sweep.
#[derive(Debug, Clone)]
pub struct Shape {
    /// What sets this shape apart from a uniform site ("uniform", "slow quarter", …).
    pub variant: &'static str,
    pub spec: SiteSpec,
}

/// A shape's outcome against the goals.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub shape: Shape,
    pub result: SiteResult,
}

impl Verdict {
    pub fn time_ratio(&self) -> f64 {
        self.result.seconds / self.result.bound_seconds
    }

    /// What the origin sent the honest appliances ÷ the transfer (see
    /// [`SiteResult::honest_origin_bytes`]).
    pub fn origin_ratio(&self) -> f64 {
        self.result.honest_origin_bytes as f64 / self.result.transfer_bytes as f64
    }

    pub fn meets_goals(&self) -> bool {
        self.result.intact
            && self.origin_ratio() <= MAX_ORIGIN_RATIO
            && self.time_ratio() <= MAX_TIME_RATIO
    }

    /// One line: the shape, then time ÷ bound, origin ÷ transfer, intact.
    pub fn line(&self) -> String {
        let spec = &self.shape.spec;
        let lan_down = spec.lan_down_bps.iter().copied().fold(0.0, f64::max) / 1e6;
        format!(
            "{:>4} appliances {:>6} WAN {:>5} / LAN {:>5} Mbit/s {:<16} time ÷ bound {:>5.2} ({:>8.2} s / {:>8.2} s)  origin ÷ transfer {:>5.3}  intact {:<5} {}",
            spec.appliances,
            size(spec.image_bytes),
            spec.wan_bps / 1e6,
            lan_down,
            self.shape.variant,
            self.time_ratio(),
            self.result.seconds,
            self.result.bound_seconds,
            self.origin_ratio(),
            self.result.intact,
            if self.meets_goals() { "ok" } else { "MISSED" },
        )
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 { format!("{} GiB", bytes >> 30) } else { format!("{} MiB", bytes >> 20) }
}

/// The shapes of the sweep; `full` for the whole space, otherwise a reduced matrix that still
/// has a shape of every kind (WAN- and LAN-limited, few pieces per appliance, heterogeneous,
/// late, corrupt).
pub fn matrix(full: bool, seed: u64) -> Vec<Shape> {
    let (appliances, transfers): (&[usize], &[u64]) = if full {
        (&[2, 8, 32, 128], &[4 * MIB, 64 * MIB, 1024 * MIB, 4096 * MIB])
    } else {
        (&[3, 24], &[4 * MIB, 32 * MIB])
    };
    let links: &[(f64, f64)] = &[(10.0, 1000.0), (50.0, 500.0), (200.0, 100.0), (1000.0, 100.0)];
    let mut shapes = Vec::new();
    for &n in appliances {
        for &bytes in transfers {
            for &(wan, lan) in links {
                let spec = SiteSpec::uniform(n, bytes, wan, lan, seed);
                shapes.push(Shape { variant: "uniform", spec });
            }
            // The special cases, on one WAN-limited and one LAN-limited link each.
            for &(wan, lan) in &[(50.0, 1000.0), (200.0, 100.0)] {
                let base = SiteSpec::uniform(n, bytes, wan, lan, seed);
                shapes.extend(variants(&base));
            }
        }
    }
    shapes
}

/// Heterogeneous, asymmetric, late and corrupt versions of a uniform site.
fn variants(base: &SiteSpec) -> Vec<Shape> {
    let n = base.appliances;
    let lan = base.lan_down_bps[0];
    let mut shapes = Vec::new();
    if n >= 4 {
        // A quarter of the appliances on 10 Mbit/s, a quarter on 100, the rest on 1 Gbit/s.
        let mut slow = base.clone();
        for i in 0..n {
            let rate = match i % 4 {
                0 => 10e6,
                1 => 100e6,
                _ => 1000e6,
            };
            slow.lan_up_bps[i] = rate;
            slow.lan_down_bps[i] = rate;
        }
        shapes.push(Shape { variant: "mixed 10/100/1000", spec: slow });
    }
    // Uplinks a tenth of the downlinks (ADSL-like site wiring, busy uplinks).
    let mut asymmetric = base.clone();
    asymmetric.lan_up_bps = vec![lan / 10.0; n];
    shapes.push(Shape { variant: "up = down / 10", spec: asymmetric });
    if n >= 3 {
        // A third join halfway through what the site would take without them.
        let mut late = base.clone();
        let halfway = Duration::from_secs_f64(base.bound_seconds() / 2.0);
        for i in (0..n).filter(|i| i % 3 == 2) {
            late.join_at[i] = halfway;
        }
        shapes.push(Shape { variant: "late third", spec: late });
        // One appliance serves corrupt data.
        let mut corrupt = base.clone();
        corrupt.corrupt.insert(1);
        shapes.push(Shape { variant: "one corrupt", spec: corrupt });
    }
    shapes
}

/// Simulates every shape on `threads` threads, handing each verdict to `done` as it comes
/// (in the order they finish); the verdicts in the order of `shapes`.
pub fn run(shapes: Vec<Shape>, threads: usize, done: impl Fn(&Verdict) + Sync) -> Vec<Verdict> {
    in_parallel(&shapes, threads, |shape| {
        let verdict = Verdict { shape: shape.clone(), result: simulate_site(&shape.spec) };
        done(&verdict);
        verdict
    })
}
