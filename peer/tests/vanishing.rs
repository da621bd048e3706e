//! Parts of the site going away mid-download: peers that vanish (the agent finishes from the
//! origin), and the origin that goes away (the site finishes from its peers when they hold
//! every piece; otherwise the agent waits, retries with backoff, and finishes when the origin
//! is back). Real agent processes, a real coordinator behind a relay the test can cut.

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;

/// The state an agent itself reports (it does not need the coordinator for that).
async fn local_state(agent: &AgentProcess) -> String {
    let status = agent.status().await.unwrap_or_default();
    status["update"]["state"].as_str().unwrap_or("").to_owned()
}

async fn wait_local_state(agent: &mut AgentProcess, state: &str, deadline: Instant) {
    while local_state(agent).await != state {
        assert!(agent.exited().is_none(), "{} stopped:\n{}", agent.name, agent.log());
        assert!(Instant::now() < deadline, "{} never {state}:\n{}", agent.name, agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent runs and is downloading (waiting for a source, not failed).
async fn assert_downloading(agent: &mut AgentProcess) {
    assert!(agent.exited().is_none(), "the agent keeps running:\n{}", agent.log());
    assert_eq!(local_state(agent).await, "downloading", "waiting, not failed:\n{}", agent.log());
}

fn assert_slot_is(agent: &AgentProcess, image: &[u8]) {
    let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
    assert!(slot == image, "{}: slot B differs from the image", agent.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_peers_vanish_finishes_from_the_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, info) = origin.publish(2, 16 * MIB + 5).await;
    let image = std::fs::read(&image_path).expect("image");
    let mut servers: Vec<AgentProcess> = ["a0", "a1"]
        .iter()
        .map(|name| {
            let agent =
                AgentProcess::new(&dir.path().join(name), &origin, "store-1", name, info.size);
            // Slow uploads, so the late agent is mid-download when they vanish.
            agent.configure("upload_limit_bytes_per_sec = 1048576\n");
            agent
        })
        .collect();
    for server in &mut servers {
        server.start();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    // Off when the rollout begins, so it comes late.
    let mut late =
        AgentProcess::new(&dir.path().join("late"), &origin, "store-1", "late", info.size);
    enroll_then_stop(&origin, &mut late, deadline).await;
    wait_enrolled(&origin, 3, deadline, &servers[0]).await;
    wait_members_known(&mut servers, 3, deadline).await;
    origin.rollout(2).await;
    wait_state(&origin, &["a0", "a1"], "ready", deadline).await;

    late.start();
    wait_progress(&late, 0.1, deadline).await;
    for server in &mut servers {
        server.kill();
    }
    wait_local_state(&mut late, "ready", deadline).await;
    assert_slot_is(&late, &image);
    let status = late.status().await.expect("status");
    let (from_origin, from_lan) = (
        status["update"]["bytes_from_origin"].as_u64().unwrap_or(0),
        status["update"]["bytes_from_lan"].as_u64().unwrap_or(0),
    );
    assert!(from_lan > 0, "the peers served before they vanished: {status}");
    assert!(from_origin > 0, "the rest came from the origin: {status}");
    assert!(from_origin < info.size + info.size / 64, "not everything from the origin: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_origin_goes_away_the_site_finishes_from_its_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let relay = CuttableRelay::start(&origin.url, 4 * MIB).await;
    let (image_path, info) = origin.publish(2, 16 * MIB + 5).await;
    let image = std::fs::read(&image_path).expect("image");
    let mut agents: Vec<AgentProcess> = ["a0", "a1", "a2"]
        .iter()
        .map(|name| {
            let mut agent =
                AgentProcess::new(&dir.path().join(name), &origin, "store-1", name, info.size);
            agent.set_coordinator(&relay.url);
            agent.configure("upload_limit_bytes_per_sec = 2097152\n");
            agent
        })
        .collect();
    agents[0].start();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Off when the rollout begins.
    for agent in &mut agents[1..] {
        enroll_then_stop(&origin, agent, deadline).await;
    }
    wait_enrolled(&origin, 3, deadline, &agents[0]).await;
    origin.rollout(2).await;
    wait_state(&origin, &["a0"], "ready", deadline).await;

    agents[1].start();
    agents[2].start();
    // Both have their offer (they download) before the origin goes away.
    for agent in &mut agents[1..] {
        wait_local_state(agent, "downloading", deadline).await;
    }
    wait_progress(&agents[1], 0.05, deadline).await;
    relay.cut();
    for agent in &mut agents[1..] {
        wait_local_state(agent, "ready", deadline).await;
        assert_slot_is(agent, &image);
    }
    relay.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_origin_goes_away_alone_an_agent_waits_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    // 1 MiB/s per connection: a 16 MiB download takes seconds.
    let relay = CuttableRelay::start(&origin.url, MIB).await;
    let (image_path, info) = origin.publish(2, 16 * MIB + 5).await;
    let image = std::fs::read(&image_path).expect("image");
    let mut agent = AgentProcess::new(&dir.path().join("a0"), &origin, "store-1", "a0", info.size);
    agent.set_coordinator(&relay.url);
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;
    wait_progress(&agent, 0.2, deadline).await;

    let error_before = agent.status().await.expect("status")["last_error"].clone();
    relay.cut();
    // The agent notices: a check-in fails (its error shows in the status).
    loop {
        let status = agent.status().await.unwrap_or_default();
        if !status["last_error"].is_null() && status["last_error"] != error_before {
            break;
        }
        assert_downloading(&mut agent).await;
        assert!(Instant::now() < deadline, "no check-in failed:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It must not give up. Nothing shows that it decided not to, so it is watched for a
    // fixed while: long enough for more check-ins to fail (one a second) and for the origin
    // requests cut in flight to be retried and fail again (origin backoff 1 s, then 2 s).
    // A download that failed would show in the state at once.
    let watched_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watched_until {
        assert_downloading(&mut agent).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = agent.status().await.and_then(|s| s["progress"].as_f64()).unwrap_or(0.0);
    assert!(held < 1.0, "the download was cut before it finished");

    relay.restore();
    wait_local_state(&mut agent, "ready", deadline).await;
    assert_slot_is(&agent, &image);
    // Verified groups were kept across the cut: about one copy from the origin in all
    // (plus what was in flight when the connections were cut).
    let served = origin.origin_bytes("store-1", 2).await as f64 / info.size as f64;
    assert!(served <= 1.3, "the origin served {served:.2} copies");
}
