//! kill -9 in the middle of a download: the restarted agent resumes and fetches again no more
//! than the groups that were in flight.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Groups recorded in the slot's progress file (header 64 bytes, then one bit per group).
fn recorded_groups(path: &std::path::Path) -> u64 {
    let Ok(bytes) = std::fs::read(path) else { return 0 };
    bytes.get(64..).map_or(0, |bits| bits.iter().map(|b| u64::from(b.count_ones())).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_resumes_without_refetching_verified_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 96 * 1024 * 1024).await;
    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", image.size);
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;

    let progress = dir.path().join("a1/state/slot-b.img.progress");
    let groups = image.size.div_ceil(16 * 1024);
    let recorded = loop {
        let n = recorded_groups(&progress);
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "no progress:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    agent.kill();
    assert!(recorded < groups, "killed too late: the download had finished");
    let before_restart = origin.origin_bytes("store-1", 2).await;

    agent.start();
    loop {
        let list = appliances(&origin).await;
        if list[0]["update"]["state"] == "ready" {
            break;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refetched = origin.origin_bytes("store-1", 2).await - before_restart;
    let remaining = (groups - recorded) * 16 * 1024;
    // In flight at the kill: at most 4 origin requests of one 1 MiB piece each (plus parents).
    let allowance = 4 * (1 << 20) + image.size / 200;
    eprintln!(
        "recorded {recorded}/{groups} groups at the kill; refetched {refetched} bytes for {remaining} missing"
    );
    assert!(
        refetched <= remaining + allowance,
        "refetched {refetched} > {remaining} + {allowance}"
    );
    let slot = std::fs::read(dir.path().join("a1/slot-b.img")).expect("slot");
    assert!(slot == std::fs::read(&image_path).expect("image"), "slot B matches the image");
}
