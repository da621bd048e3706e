//! Prometheus text exposition of the fleet (checked by `promtool check metrics` in the tests).

use std::collections::BTreeMap;
use std::fmt::Write;

use jiff::Timestamp;
use sitecast_manifest::api::{ReportRequest, UpdateState};

use crate::engine::RolloutState;
use crate::fleet::Fleet;

/// A figure appliances report, read from a report.
type ReportedBytes = fn(&ReportRequest) -> u64;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(fleet: &Fleet, now: Timestamp, checkins: u64) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "sitecast_checkins_total",
        "counter",
        "Appliance check-ins (and hawkBit DDI polls) received since the coordinator started.",
    );
    let _ = writeln!(out, "sitecast_checkins_total {checkins}");

    family(
        &mut out,
        "sitecast_appliances",
        "gauge",
        "Registered appliances by the state of their current update.",
    );
    let mut by_state: BTreeMap<&str, u64> =
        UpdateState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    by_state.insert("none", 0);
    for appliance in fleet.appliances.values() {
        let state = appliance.update.as_ref().map_or("none", |u| u.report.state.as_str());
        *by_state.entry(state).or_default() += 1;
    }
    for (state, count) in &by_state {
        let _ = writeln!(out, "sitecast_appliances{{state=\"{state}\"}} {count}");
    }
    family(&mut out, "sitecast_appliances_online", "gauge", "Appliances that checked in recently.");
    let online = fleet.appliances.values().filter(|a| fleet.is_online(a, now)).count();
    let _ = writeln!(out, "sitecast_appliances_online {online}");

    family(
        &mut out,
        "update_success_rate",
        "gauge",
        "Succeeded over finished updates of each rollout's release.",
    );
    family_rollouts(&mut out, fleet, now);

    family(
        &mut out,
        "sitecast_origin_bytes_served_total",
        "counter",
        "Image bytes the origin served, per site and release.",
    );
    for ((site, version), bytes) in &fleet.site_bytes {
        let _ = writeln!(
            out,
            "sitecast_origin_bytes_served_total{{site=\"{}\",version=\"{version}\"}} {bytes}",
            label(site)
        );
    }
    let reported: [(&str, &str, ReportedBytes); 2] = [
        (
            "sitecast_mirror_bytes_reported",
            "Image bytes appliances report having fetched from a release's mirrors, per site and release.",
            |r| r.bytes_from_mirror,
        ),
        (
            "sitecast_reused_bytes_reported",
            "Image bytes appliances report having copied from their active slots, per site and release.",
            |r| r.bytes_reused,
        ),
    ];
    for (name, help, bytes_of) in reported {
        family(&mut out, name, "gauge", help);
        let mut sums: BTreeMap<(&str, u64), u64> = BTreeMap::new();
        for appliance in fleet.appliances.values() {
            if let Some(update) = &appliance.update {
                let sum = sums.entry((&appliance.site, update.report.version)).or_default();
                *sum = sum.saturating_add(bytes_of(&update.report));
            }
        }
        for ((site, version), bytes) in sums {
            let _ =
                writeln!(out, "{name}{{site=\"{}\",version=\"{version}\"}} {bytes}", label(site));
        }
    }
    out
}

/// The server's own health: its connections and what it cut off, whether the store is
/// closed, enrollments turned away.
pub fn render_server(
    out: &mut String,
    listener: &crate::listener::StatsSnapshot,
    store_closed: bool,
    enrollments_refused: u64,
) {
    family(out, "sitecast_connections_open", "gauge", "HTTP connections being served.");
    let _ = writeln!(out, "sitecast_connections_open {}", listener.open);
    family(
        out,
        "sitecast_connections_total",
        "counter",
        "HTTP connections by outcome: admitted, refused over the total or per-client limit, cut for a slow head, body or reader, closed idle, failed TLS handshakes.",
    );
    for (outcome, n) in [
        ("accepted", listener.accepted),
        ("refused_total_limit", listener.refused_over_total),
        ("refused_client_limit", listener.refused_over_per_ip),
        ("header_timeout", listener.header_timeouts),
        ("body_timeout", listener.body_timeouts),
        ("write_stall", listener.write_stalls),
        ("idle", listener.idle_closes),
        ("accept_error", listener.accept_errors),
        ("tls_handshake_failed", listener.tls_failures),
    ] {
        let _ = writeln!(out, "sitecast_connections_total{{outcome=\"{outcome}\"}} {n}");
    }
    family(
        out,
        "sitecast_store_closed",
        "gauge",
        "1 while the store is closed after a failed commit (writes are refused).",
    );
    let _ = writeln!(out, "sitecast_store_closed {}", u8::from(store_closed));
    family(
        out,
        "sitecast_enrollments_refused_total",
        "counter",
        "Enrollments turned away by the rate limit.",
    );
    let _ = writeln!(out, "sitecast_enrollments_refused_total {enrollments_refused}");
}

fn family_rollouts(out: &mut String, fleet: &Fleet, now: Timestamp) {
    let mut stage = String::new();
    let mut state = String::new();
    for rollout in fleet.rollouts.values() {
        let rate = fleet.rollout_view(rollout, now).success_rate;
        let id = rollout.id;
        let _ = writeln!(
            out,
            "update_success_rate{{rollout=\"{id}\",kind=\"{}\",version=\"{}\"}} {rate}",
            rollout.kind.as_str(),
            rollout.version
        );
        let _ =
            writeln!(stage, "sitecast_rollout_stage{{rollout=\"{id}\"}} {}", rollout.current_stage);
        for candidate in [
            RolloutState::InProgress,
            RolloutState::Paused,
            RolloutState::Completed,
            RolloutState::Failed,
        ] {
            let on = u8::from(candidate == rollout.state);
            let _ = writeln!(
                state,
                "sitecast_rollout_state{{rollout=\"{id}\",state=\"{}\"}} {on}",
                candidate.as_str()
            );
        }
    }
    family(out, "sitecast_rollout_stage", "gauge", "Current stage of each rollout (0-based).");
    out.push_str(&stage);
    family(
        out,
        "sitecast_rollout_state",
        "gauge",
        "State of each rollout (1 for the current state).",
    );
    out.push_str(&state);
}
