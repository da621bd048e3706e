//! A lab fleet of twenty real agents, each under its own real launcher, on loopback: agent
//! release 2 rolled out in stages reaches every appliance and leaves its state alone; a broken
//! release 3 is given up by the launcher on every canary appliance, reported with the reason,
//! and pauses the rollout before any other appliance is offered it. Prints the time from
//! publishing to each appliance running the release and the copies of it each site fetched
//! from Central Command (docs/performance.md).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const AGENTS: usize = 20;
const SITES: usize = 4;

/// What must survive an agent switch: the identity, and what the agent knows of its slots.
fn lasting_state(agent: &AgentProcess) -> (Vec<u8>, Value) {
    let key = std::fs::read(agent.dir.join("state/identity.key")).expect("identity key");
    let state = agent.state_file();
    let kept = json!({"enrolled": state["enrolled"], "slot_versions": state["slot_versions"],
        "rollback_floor": state["rollback_floor"], "update": state["update"]});
    (key, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_take_agent_2_in_stages_and_a_canary_stops_a_broken_agent_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let name = format!("a{i:02}");
        let site = format!("store-{}", i % SITES);
        let mut agent = AgentProcess::new(&dir.path().join(&name), &origin, &site, &name, 1 << 20);
        let store = agent.dir.join("agents");
        agent.start_under_launcher(&store, &["--restart-delay-ms", "200", "--crash-limit", "2"]);
        agents.push(agent);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    wait_enrolled(&origin, AGENTS, deadline, &agents[0]).await;
    let mut before = Vec::new();
    for agent in &agents {
        // An agent saves its state on the answer to its first check-in: a moment after
        // Central Command has recorded it.
        while agent.state_file_if_saved().is_none_or(|s| s["enrolled"] != true) {
            assert!(Instant::now() < deadline, "{} never saved its enrollment", agent.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        before.push(lasting_state(agent));
    }

    // Agent 2 in three stages that advance as soon as each is healthy.
    let published = Instant::now();
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    origin.publish_agent(2, &[("bin/sitecast-peer", &binary, true)]).await;
    let stages = json!([{"percent": 10, "delay_hours": 0}, {"percent": 50, "delay_hours": 0},
        {"percent": 100, "delay_hours": 0}]);
    let rollout = origin
        .create_rollout(
            json!({"kind": "agent", "version": 2, "strategy": "staged", "stages": stages}),
        )
        .await;
    let id = rollout["id"].as_u64().expect("id");
    let mut running_2: BTreeMap<String, Duration> = BTreeMap::new();
    while running_2.len() < AGENTS || origin.rollout_view(id).await["state"] != "completed" {
        for row in appliances(&origin).await {
            if row["agent_release"] == 2 && row["agent_update"]["state"] == "succeeded" {
                let name = row["name"].as_str().expect("name").to_owned();
                running_2.entry(name).or_insert_with(|| published.elapsed());
            }
        }
        let view = origin.rollout_view(id).await;
        assert_ne!(view["state"], "paused", "{view}");
        assert!(Instant::now() < deadline, "{} of {AGENTS} on agent 2: {view}", running_2.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let times: Vec<f64> = running_2.values().map(Duration::as_secs_f64).collect();
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let worst = times.iter().copied().fold(0.0, f64::max);
    println!(
        "agent 2 on {}/{AGENTS} appliances (100 %): from publishing, mean {mean:.1} s, last {worst:.1} s",
        running_2.len()
    );
    let view = origin.rollout_view(id).await;
    assert_eq!(view["success_rate"], 1.0, "{view}");

    // Its files crossed each site's WAN about once: the appliances of a site fetched them from
    // each other (and from the earlier stages' appliances, which keep serving them).
    let size = binary.len() as f64;
    let mut per_site: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for row in appliances(&origin).await {
        let site = per_site.entry(row["site"].as_str().expect("site").to_owned()).or_default();
        site.0 += row["agent_update"]["bytes_from_origin"].as_u64().expect("reported");
        site.1 += row["agent_update"]["bytes_from_lan"].as_u64().expect("reported");
    }
    for (site, (wan, lan)) in &per_site {
        let (wan, lan) = (*wan as f64 / size, *lan as f64 / size);
        println!(
            "{site}: {wan:.2} copies of agent 2 from Central Command, {lan:.2} from site peers"
        );
        // At most one copy, its verified-range framing (0.4 %) and a few pieces fetched twice
        // where a member joined while they were in flight; counted as it crossed the wire,
        // compressed (a binary compresses), so less than that.
        assert!(wan <= 1.15, "{site} fetched {wan:.2} copies from Central Command");
        // Every appliance's copy is counted, from one side or the other: as plain bytes from
        // site peers, all but about the one copy that came from Central Command.
        let others = (AGENTS / SITES) as f64 - 1.15;
        assert!(lan >= others, "{site}: {wan:.2} + {lan:.2} copies");
    }
    for (agent, before) in agents.iter().zip(&before) {
        assert_eq!(&lasting_state(agent), before, "{}: state changed by the switch", agent.name);
    }

    // Agent 3 exits at start. A canary stage of two appliances takes it; the launchers roll
    // both back, they report why, and the rollout pauses before the others are offered it.
    let broken = b"#!/bin/sh\necho 'agent 3: missing library' >&2\nexit 127\n";
    origin.publish_agent(3, &[("bin/agent", broken, true)]).await;
    let stages = json!([{"percent": 10, "delay_hours": 0}, {"percent": 100, "delay_hours": 0}]);
    let rollout = origin
        .create_rollout(
            json!({"kind": "agent", "version": 3, "strategy": "canary", "stages": stages}),
        )
        .await;
    let id = rollout["id"].as_u64().expect("id");
    let members = rollout["members"].as_object().expect("members").clone();
    let canary: Vec<&String> = members.iter().filter(|(_, s)| **s == 0).map(|(k, _)| k).collect();
    assert_eq!(canary.len(), 2, "{rollout}");
    loop {
        let rows = appliances(&origin).await;
        let back = rows
            .iter()
            .filter(|r| canary.contains(&&r["key"].as_str().unwrap_or("").to_owned()))
            .all(|r| r["agent_update"]["state"] == "rolled_back" && r["agent_release"] == 2);
        if back && origin.rollout_view(id).await["state"] == "paused" {
            for row in &rows {
                let in_canary = canary.iter().any(|k| row["key"] == k.as_str());
                if in_canary {
                    let error = row["agent_update"]["error"].as_str().unwrap_or_default();
                    assert!(
                        error.contains("missing library") && error.contains("crash loop"),
                        "{row}"
                    );
                } else {
                    assert_ne!(
                        row["agent_offer"]["version"], 3,
                        "offered beyond the canary: {row}"
                    );
                    assert_eq!(row["agent_release"], 2, "{row}");
                }
            }
            break;
        }
        assert!(Instant::now() < deadline, "the canary never came back: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
