//! The real agent under the real `sitecast-launcher`: installed as a version of the agent
//! store, it is started by the launcher and confirms its version after its first successful
//! check-in, which ends its trial.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use sitecast_launcher::AgentStore;
use sitecast_manifest::{AgentBuild, AgentFile, ImageDigest};

/// Agent builds in these tests run on every OS release.
const ANY_OS: sitecast_manifest::OsReleases = sitecast_manifest::OsReleases { min: 0, max: None };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_started_by_the_launcher_confirms_its_version_after_checking_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    let digest = ImageDigest::of_reader(&binary[..]).expect("hash");
    let build = AgentBuild {
        platform: PLATFORM.into(),
        entry: "bin/sitecast-peer".into(),
        files: vec![AgentFile {
            path: "bin/sitecast-peer".into(),
            size: digest.size,
            blake3: digest.blake3,
            sha256: digest.sha256,
            executable: true,
        }],
    };
    let root = dir.path().join("agent-store");
    let store = AgentStore::open(&root).expect("store");
    store
        .stage(7, &build, ANY_OS, |_| {
            Ok(Box::new(std::io::Cursor::new(binary.clone())) as Box<dyn Read>)
        })
        .expect("stage");
    store.switch(7, jiff::Timestamp::now()).expect("switch");

    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", 1 << 20);
    agent.start_under_launcher(&root, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    while store.confirmed() != Some(7) {
        assert!(Instant::now() < deadline, "never confirmed:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = agent.log();
    assert!(log.contains("agent version confirmed to the launcher"), "{log}");
    // The launcher's memory says the trial is over.
    let state_path = root.join("launcher.json");
    while std::fs::read_to_string(&state_path).map_or(true, |s| !s.contains("\"confirmed\":7")) {
        assert!(Instant::now() < deadline, "launcher never recorded it:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The appliance listing's row for `name`.
async fn row(origin: &Origin, name: &str) -> serde_json::Value {
    appliances(origin).await.into_iter().find(|a| a["name"] == name).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_release_reaches_agents_under_the_launcher_and_a_crashing_one_is_rolled_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let names = ["a1", "a2"];
    let mut agents = Vec::new();
    for name in names {
        let mut agent =
            AgentProcess::new(&dir.path().join(name), &origin, "store-1", name, 1 << 20);
        let store = agent.dir.join("agents");
        agent.start_under_launcher(&store, &["--restart-delay-ms", "200", "--crash-limit", "2"]);
        agents.push(agent);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 2, deadline, &agents[0]).await;
    let identity =
        |agent: &AgentProcess| std::fs::read(agent.dir.join("state/identity.key")).expect("key");
    let keys_before: Vec<Vec<u8>> = agents.iter().map(identity).collect();
    let logs = |agents: &[AgentProcess]| {
        agents.iter().map(AgentProcess::log).collect::<Vec<_>>().join("\n----\n")
    };

    // Agent release 2: this build's agent (under the launcher it is agent 2) and a data file.
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    origin
        .publish_agent(
            2,
            &[("bin/sitecast-peer", &binary, true), ("share/notes.txt", b"agent 2\n", false)],
        )
        .await;
    let rollout = origin.agent_rollout(2).await;
    origin.wait_completed(rollout, "agent 2 never rolled out", deadline, || logs(&agents)).await;
    for (agent, key_before) in agents.iter().zip(&keys_before) {
        let row = row(&origin, &agent.name).await;
        assert_eq!(
            (row["agent_release"].as_u64(), row["agent_update"]["state"].as_str()),
            (Some(2), Some("succeeded")),
            "{row}"
        );
        let store = agent.dir.join("agents");
        let current = std::fs::read_link(store.join("current")).expect("current link");
        assert!(current.ends_with("versions/2"), "{}", current.display());
        assert_eq!(
            std::fs::read(store.join("versions/2/share/notes.txt")).expect("data file"),
            b"agent 2\n"
        );
        // The switch never touched the agent's own state: same identity, still enrolled.
        assert_eq!(&identity(agent), key_before, "identity kept");
        assert_eq!(agent.state_file()["enrolled"], true);
        assert!(agent.log().contains("switching to agent release"), "{}", agent.log());
    }

    // Agent release 3 crashes at once: the launcher gives it up after two exits, agent 2 runs
    // again and reports why; the rollout pauses on the failures.
    let crash = b"#!/bin/sh\necho 'agent 3: cannot read its configuration' >&2\nexit 1\n";
    origin.publish_agent(3, &[("bin/agent", crash, true)]).await;
    let rollout = origin.agent_rollout(3).await;
    loop {
        let rows = [row(&origin, "a1").await, row(&origin, "a2").await];
        let rolled_back = rows.iter().all(|r| {
            r["agent_update"]["state"] == "rolled_back" && r["agent_release"].as_u64() == Some(2)
        });
        if rolled_back && origin.rollout_view(rollout).await["state"] == "paused" {
            let error = rows[0]["agent_update"]["error"].as_str().unwrap_or_default().to_owned();
            assert!(
                error.contains("crash loop") && error.contains("cannot read its configuration"),
                "{error}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "agent 3 never rolled back:\n{}", logs(&agents));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for agent in &agents {
        let current = std::fs::read_link(agent.dir.join("agents/current")).expect("current link");
        assert!(current.ends_with("versions/2"), "{}", current.display());
        assert_eq!(agent.state_file()["agent_refused"], serde_json::json!([3]));
    }

    // Pinned to 3, an appliance is offered it at every check-in and never takes it again.
    let a1 = row(&origin, "a1").await;
    let key = a1["key"].as_str().expect("key").to_owned();
    let response = origin
        .http
        .post(format!("{}/api/appliances/{key}/agent-pin", origin.url))
        .bearer_auth(OPERATOR)
        .json(&serde_json::json!({"version": 3}))
        .send()
        .await
        .expect("pin");
    assert_eq!(response.status(), 204);
    let seen = a1["last_checkin"].clone();
    let mut checkins = 0;
    while checkins < 3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = row(&origin, "a1").await;
        if now["last_checkin"] != seen {
            checkins += 1;
        }
        assert_eq!(now["agent_update"]["state"], "rolled_back", "{now}");
        assert!(Instant::now() < deadline, "a1 stopped checking in:\n{}", agents[0].log());
    }
    // Agent 2 once, agent 3 once.
    let fetches = agents[0].log().matches("fetching agent release").count();
    assert_eq!(fetches, 2, "{}", agents[0].log());
}

/// Agent `a1` under a launcher that gives up after two quick exits and takes the frozen path
/// at once (no interval between tries), with `env` set and `launcher_args` added, enrolled;
/// and its store.
async fn frozen_path_agent(
    dir: &std::path::Path,
    origin: &Origin,
    env: &[(&str, &str)],
    launcher_args: &[&str],
) -> (AgentProcess, std::path::PathBuf) {
    let mut agent = AgentProcess::new(&dir.join("a1"), origin, "store-1", "a1", 1 << 20);
    agent.env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let store = agent.dir.join("agents");
    let mut args = vec!["--restart-delay-ms", "200", "--crash-limit", "2"];
    args.extend(["--fetch-interval-secs", "0"]);
    args.extend(launcher_args);
    agent.start_under_launcher(&store, &args);
    wait_enrolled(origin, 1, Instant::now() + Duration::from_secs(120), &agent).await;
    (agent, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_crashes_on_its_configuration_is_fixed_through_the_frozen_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    // The launcher is given the root of trust itself, as the appliance image does.
    let root = origin.root_path.to_str().expect("utf-8 path");
    let (agent, store) = frozen_path_agent(dir.path(), &origin, &[], &["--root", root]).await;
    let deadline = Instant::now() + Duration::from_secs(120);

    // Agent 2 runs, confirms, and records how it reached Central Command.
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    origin.publish_agent(2, &[("bin/sitecast-peer", &binary, true)]).await;
    let rollout = origin.agent_rollout(2).await;
    while origin.rollout_view(rollout).await["state"] != "completed"
        || !store.join("frozen.json").exists()
    {
        assert!(Instant::now() < deadline, "agent 2 never rolled out:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The fix is published but not rolled out: a crashing agent could not take it anyway.
    let fixed = b"#!/bin/sh\necho 'agent 3 running' >&2\necho 3 > \"$SITECAST_AGENT_STORE/confirmed\"\nexec sleep 600\n";
    origin.publish_agent(3, &[("bin/agent", fixed, true)]).await;

    // A configuration agent 2 cannot read: it exits at every start, a crash loop of a
    // confirmed version, so the launcher fetches the newest release itself.
    std::fs::write(agent.dir.join("agent.toml"), "checkin_interval_secs = \"soon\"\n")
        .expect("config");
    agent.kill_agent_under_launcher();
    // What the broken agent recorded names no usable root: the launcher's own is what counts.
    let frozen = store.join("frozen.json");
    let mut recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&frozen).expect("frozen.json")).expect("json");
    recorded["root"] = "/nonexistent/root.json".into();
    std::fs::write(&frozen, serde_json::to_vec(&recorded).expect("json")).expect("write");
    let store_view = AgentStore::at(&store);
    while store_view.current().ok().flatten() != Some(3) || store_view.confirmed() != Some(3) {
        assert!(Instant::now() < deadline, "never fixed:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = agent.log();
    assert!(log.contains("agent 3 fetched from Central Command (frozen path)"), "{log}");
    assert!(log.contains("agent 3 running"), "{log}");
    assert_eq!(store_view.previous().ok().flatten(), Some(2), "agent 2 kept for a rollback");
}

/// The chicken-and-egg: agent 2 crashes whenever a check-in answer carries an agent offer, so
/// the rollout of its fix can never reach it the normal way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_crashes_on_every_answer_gets_its_fix_through_the_frozen_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let fault = ("SITECAST_FAULT_CRASH_ON_ANSWER_FIELD", "agent_offer@2");
    let (agent, store) = frozen_path_agent(dir.path(), &origin, &[fault], &[]).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    origin.publish_agent(2, &[("bin/sitecast-peer", &binary, true)]).await;
    let rollout = origin.agent_rollout(2).await;
    origin.wait_completed(rollout, "agent 2 never rolled out", deadline, || agent.log()).await;

    // Central Command starts sending the field agent 2 crashes on: the offer of agent 3.
    origin.publish_agent(3, &[("bin/sitecast-peer", &binary, true)]).await;
    let rollout = origin.agent_rollout(3).await;
    origin.wait_completed(rollout, "agent 3 never arrived", deadline, || agent.log()).await;
    let row = appliances(&origin).await.into_iter().find(|a| a["name"] == "a1").expect("a1");
    assert_eq!(row["agent_release"], 3, "{row}");
    let log = agent.log();
    assert!(log.contains("crashing as asked"), "agent 2 did crash on the offer:\n{log}");
    assert!(log.contains("agent 3 fetched from Central Command (frozen path)"), "{log}");
    assert_eq!(AgentStore::at(&store).previous().ok().flatten(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_rollout_in_the_window_stages_at_once_and_switches_when_the_window_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await; // its default window never opens
    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", 1 << 20);
    let store = agent.dir.join("agents");
    agent.start_under_launcher(&store, &["--restart-delay-ms", "200"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    origin.publish_agent(2, &[("bin/sitecast-peer", &binary, true)]).await;
    let rollout =
        origin.agent_rollout_with(serde_json::json!({"version": 2, "in_window": true})).await;

    // Staged at once, then held: several check-ins later it still runs the image's agent.
    let mut seen = None;
    let mut checkins = 0;
    while checkins < 3 {
        let a1 = row(&origin, "a1").await;
        if a1["agent_update"]["state"] == "ready" && seen.as_ref() != Some(&a1["last_checkin"]) {
            checkins += usize::from(seen.is_some());
            seen = Some(a1["last_checkin"].clone());
        }
        assert_ne!(a1["agent_release"], 2, "switched outside the window: {a1}");
        assert!(Instant::now() < deadline, "never staged:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(AgentStore::at(&store).installed(2), "staged");
    assert_eq!(AgentStore::at(&store).current().ok().flatten(), None, "not switched");

    origin.open_window("store-1").await;
    origin.wait_completed(rollout, "never switched in the window", deadline, || agent.log()).await;
    assert_eq!(row(&origin, "a1").await["agent_release"], 2);
}
