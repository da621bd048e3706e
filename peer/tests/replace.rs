//! A newer offer replaces a running download: the agent stops the old one cleanly (no write
//! of the old release after the new one starts), downloads the new release into the same
//! standby slot, and ends ready with it, byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_release_replaces_a_running_download() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    // Slow answers, so release 2 is still downloading when release 3 is offered.
    let relay = CuttableRelay::start(&origin.url, MIB).await;
    let (_, v2) = origin.publish(2, 16 * MIB + 5).await;
    let (v3_path, v3) = origin.publish(3, 16 * MIB + 5).await;
    let mut agent = AgentProcess::new(&dir.path().join("a0"), &origin, "store-1", "a0", v2.size);
    agent.set_coordinator(&relay.url);
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;
    wait_progress(&agent, 0.2, deadline).await;
    let status = agent.status().await.expect("status");
    assert_eq!(status["update"]["version"], 2, "{status}");
    assert_eq!(status["update"]["state"], "downloading", "{status}");

    // The operator pins this appliance to release 3 (a rollout of 3 would wait for the
    // rollout of 2 to end).
    let key = agent.status().await.expect("status")["appliance"].as_str().expect("key").to_owned();
    let response = origin
        .http
        .post(format!("{}/api/appliances/{key}/pin", origin.url))
        .bearer_auth(OPERATOR)
        .json(&serde_json::json!({"version": 3}))
        .send()
        .await
        .expect("pin");
    assert!(response.status().is_success(), "{:?}", response.text().await);
    loop {
        let status = agent.status().await.unwrap_or_default();
        if status["update"]["version"] == 3 && status["update"]["state"] == "ready" {
            break;
        }
        assert!(agent.exited().is_none(), "the agent stopped:\n{}", agent.log());
        assert_ne!(status["update"]["state"], "failed", "{status}\n{}", agent.log());
        assert!(Instant::now() < deadline, "release 3 never ready: {status}\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
    assert!(slot == std::fs::read(&v3_path).expect("image"), "slot B holds release 3");
    // Release 3's figures are its own: release 2's bytes before it are not in them (they
    // share nothing, so it came whole from the origin).
    let status = agent.status().await.expect("status");
    let from_origin = status["update"]["bytes_from_origin"].as_u64().unwrap_or(0);
    assert!(from_origin >= v3.size && from_origin < v3.size + v3.size / 10, "{status}");
    assert!(agent.log().contains("a newer offer replaces the running download"), "{}", agent.log());
    assert_ne!(v2.blake3, v3.blake3);
}
