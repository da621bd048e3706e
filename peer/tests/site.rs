//! A site of real agents sharing a release over the LAN (iroh on loopback), with a real
//! coordinator as origin: every slot ends byte for byte equal to the image, and the origin
//! serves the site about one copy.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_share_one_origin_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 12 * 1024 * 1024 + 777).await;
    let mut agents = start_agents(&origin, dir.path(), 3, image.size);
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 3, deadline, &agents[0]).await;
    wait_members_known(&mut agents, 3, deadline).await;
    origin.rollout(2).await;

    loop {
        let list = appliances(&origin).await;
        if list.iter().all(|a| a["update"]["state"] == "ready") {
            break;
        }
        for (agent, entry) in agents.iter_mut().zip(&list) {
            assert!(agent.exited().is_none(), "{} stopped:\n{}", agent.name, agent.log());
            assert_ne!(entry["update"]["state"], "failed", "{}", agent.log());
        }
        assert!(Instant::now() < deadline, "not all ready: {list:?}\n{}", agents[0].log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let expected = std::fs::read(&image_path).expect("image");
    for agent in &agents {
        let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
        assert!(slot == expected, "{}: slot B differs from the image", agent.name);
    }
    let origin_bytes = origin.origin_bytes("store-1", 2).await;
    let ratio = origin_bytes as f64 / image.size as f64;
    let lan: u64 = appliances(&origin)
        .await
        .iter()
        .map(|a| a["update"]["bytes_from_lan"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("origin bytes ÷ image size = {ratio:.3}, LAN bytes = {lan}");
    assert!(ratio <= 1.1, "the origin served {ratio:.2} copies to the site");
    assert!(lan >= image.size, "the other copies came over the LAN: {lan}");
}
