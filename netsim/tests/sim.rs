//! The simulator with the peer's own scheduler: offload, speed against the Kumar–Ross bound,
//! liars, determinism.

use std::time::Duration;

use sitecast_netsim::sim::{SiteSpec, simulate_site};
use sitecast_netsim::sweep;

const MIB: u64 = 1024 * 1024;

fn reference(seed: u64) -> SiteSpec {
    SiteSpec::uniform(8, 64 * MIB, 50.0, 500.0, seed)
}

fn check(spec: &SiteSpec) -> sitecast_netsim::sim::SiteResult {
    let result = simulate_site(spec);
    eprintln!("seed {}: {result:?}", spec.seed);
    result
}

#[test]
fn eight_appliances_pull_one_copy_near_the_bound() {
    let result = check(&reference(1));
    assert!(result.intact, "seed 1: {result:?}");
    let offload = result.origin_bytes as f64 / result.image_bytes as f64;
    assert!(offload <= 1.05, "seed 1: origin sent {offload:.3} copies");
    let slowdown = result.seconds / result.bound_seconds;
    assert!(
        slowdown <= 1.2,
        "seed 1: {:.1} s is {slowdown:.2} × the bound {:.1} s",
        result.seconds,
        result.bound_seconds
    );
}

#[test]
fn a_large_site_starts_as_soon_as_its_last_member_is_heard() {
    // 24 appliances, 4 MiB: the discovery grace ends when the last named member comes up,
    // for every appliance at once. (The simulator once let the others sleep until their next
    // timer, ten seconds of takeover later, and then fetched a quarter more from the origin.)
    let result = check(&SiteSpec::uniform(24, 4 * MIB, 50.0, 500.0, 1));
    assert!(result.intact, "{result:?}");
    let offload = result.origin_bytes as f64 / result.image_bytes as f64;
    assert!(offload <= 1.05, "origin sent {offload:.3} copies");
    let slowdown = result.seconds / result.bound_seconds;
    assert!(slowdown <= 1.2, "{:.2} s is {slowdown:.2} × the bound", result.seconds);
}

#[test]
fn a_corrupt_peer_does_not_stop_the_site() {
    let mut spec = reference(2);
    spec.corrupt.insert(3);
    let result = check(&spec);
    assert!(result.intact, "seed 2: {result:?}");
}

#[test]
fn a_site_that_took_corrupt_data_is_not_intact() {
    // The check behind `intact`, shown to fail: appliances that skip verification accept
    // the liar's pieces, and the simulator sees pieces whose true bytes never arrived.
    let mut spec = reference(2);
    spec.corrupt.insert(3);
    spec.skip_verification = true;
    let result = check(&spec);
    assert!(!result.intact, "{result:?}");
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let a = simulate_site(&reference(7));
    let b = simulate_site(&reference(7));
    assert_eq!(a, b);
    let c = simulate_site(&reference(8));
    assert_ne!(a.trace_digest, c.trace_digest, "another seed, another run");
}

#[test]
fn scenarios_finish_intact() {
    let mut lone = SiteSpec::uniform(1, 16 * MIB, 50.0, 500.0, 3);
    lone.corrupt.clear();
    let late = {
        let mut s = reference(4);
        s.join_at[5] = Duration::from_secs(8);
        s.join_at[6] = Duration::from_secs(20);
        s
    };
    let crashing = {
        let mut s = reference(5);
        s.crashes.push((2, Duration::from_secs(3), Duration::from_secs(9)));
        s
    };
    let asymmetric = {
        let mut s = reference(6);
        for (i, up) in s.lan_up_bps.iter_mut().enumerate() {
            *up = if i % 2 == 0 { 20e6 } else { 500e6 };
        }
        s
    };
    let saturated_wan = SiteSpec::uniform(8, 32 * MIB, 5.0, 500.0, 9);
    for (name, spec) in [
        ("lone", lone),
        ("late", late),
        ("crashing", crashing),
        ("asymmetric", asymmetric),
        ("saturated", saturated_wan),
    ] {
        let result = simulate_site(&spec);
        assert!(result.intact, "{name} (seed {}): {result:?}", spec.seed);
        let offload = result.origin_bytes as f64 / result.image_bytes as f64;
        assert!(offload <= 1.2, "{name} (seed {}): origin sent {offload:.3} copies", spec.seed);
    }
}

/// Shapes of the reduced sweep that still miss the time goal (issue 14 is open on them): 4 MiB
/// transfers, whose bounds are a few tenths of a second, on LAN-limited sites, with late
/// joiners and with a corrupt peer (3 × 4 MiB at 1.20: seeds 2 to 5 give 1.13–1.18), and
/// 24 × 4 MiB with uplinks a tenth of the downlinks (1.20–1.21 over seeds 1 to 6, since
/// announcements take uplink bytes in the simulator as they do on the wire; 1.19–1.21 before).
/// They must still be intact and spare the origin.
const STILL_SLOW: &[(usize, u64, f64, f64, &str)] = &[
    (3, 4, 200.0, 100.0, "one corrupt"),
    (3, 4, 50.0, 1000.0, "late third"),
    (24, 4, 200.0, 100.0, "uniform"),
    (24, 4, 50.0, 1000.0, "up = down / 10"),
    (24, 4, 50.0, 1000.0, "late third"),
    (24, 4, 200.0, 100.0, "late third"),
    (24, 4, 200.0, 100.0, "one corrupt"),
];

/// The reduced sweep (`sitecast-netsim sweep --reduced`): every shape is intact and within the
/// origin goal, and every shape but those listed in [`STILL_SLOW`] within the time goal too.
#[test]
fn the_reduced_sweep_meets_the_goals_but_where_known_slow() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let verdicts = sweep::run(sweep::matrix(false, 1), threads, |_| {});
    let mut missed = Vec::new();
    for verdict in &verdicts {
        let spec = &verdict.shape.spec;
        let lan = spec.lan_down_bps.iter().copied().fold(0.0, f64::max);
        let key = (spec.appliances, spec.image_bytes >> 20, spec.wan_bps / 1e6, lan / 1e6);
        let known_slow = STILL_SLOW.iter().any(|&(n, mib, wan, lan, variant)| {
            (n, mib, wan, lan) == key && variant == verdict.shape.variant
        });
        let origin_ok = verdict.origin_ratio() <= sweep::MAX_ORIGIN_RATIO;
        let time_ok = verdict.time_ratio() <= sweep::MAX_TIME_RATIO;
        if !verdict.result.intact || !origin_ok || !(time_ok || known_slow) {
            missed.push(verdict.line());
        }
    }
    assert!(missed.is_empty(), "shapes that miss a goal:\n{}", missed.join("\n"));
}

#[test]
fn a_site_on_older_releases_fetches_what_none_holds_once_and_the_rest_over_the_lan() {
    for (releases, changed) in [(1, 0.05), (2, 0.05), (3, 0.02)] {
        let spec = reference(1).on_older_releases(releases, changed);
        let result = check(&spec);
        let what = format!("{releases} older release(s), {changed} changed");
        assert!(result.intact, "{what}: {result:?}");
        let transfer = result.transfer_bytes;
        assert!(transfer > 0 && transfer < result.image_bytes / 10, "{what}: {transfer} bytes");
        // The origin sends what no appliance holds, about once.
        let offload = result.origin_bytes as f64 / transfer as f64;
        assert!((1.0..=1.05).contains(&offload), "{what}: origin sent {offload:.3} × the transfer");
        // An appliance receives what it lacks, not what it copied (parents on top).
        let lacked: u64 = (0..spec.appliances).map(|i| spec.missing_bytes(i)).sum();
        let received = result.origin_bytes + result.lan_bytes;
        assert!(received >= lacked, "{what}: {received} bytes received, {lacked} lacked");
        assert!(
            received as f64 <= 1.05 * lacked as f64,
            "{what}: {received} bytes received for {lacked} lacked"
        );
        let slowdown = result.seconds / result.bound_seconds;
        assert!(slowdown <= 1.2, "{what}: {slowdown:.2} × the bound");
    }
}

#[test]
fn older_releases_lack_more_the_older_they_are() {
    let spec = SiteSpec::uniform(6, 64 * MIB, 50.0, 500.0, 3).on_older_releases(3, 0.04);
    let lacked: Vec<u64> = (0..3).map(|i| spec.missing_bytes(i)).collect();
    assert!(lacked[0] < lacked[1] && lacked[1] < lacked[2], "{lacked:?}");
    // Appliances 3 to 5 run the same releases as 0 to 2.
    assert_eq!((3..6).map(|i| spec.missing_bytes(i)).collect::<Vec<_>>(), lacked);
    // What every one lacks is what the newest lacks: the new release's own changes.
    assert_eq!(spec.transfer_bytes(), lacked[0]);
    let whole = SiteSpec::uniform(6, 64 * MIB, 50.0, 500.0, 3);
    assert_eq!(whole.transfer_bytes(), 64 * MIB);
}
