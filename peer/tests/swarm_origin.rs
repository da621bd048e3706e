//! The swarm on its own against a real origin: every piece fetched over HTTP, verified, written.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use sitecast_iso::{Slot, SlotPaths, SlotWriter};
use sitecast_manifest::SecretKey;
use sitecast_manifest::api::CheckinRequest;
use sitecast_peer::coordinator::CoordinatorClient;
use sitecast_peer::scheduler::PeerId;
use sitecast_peer::swarm::{Swarm, TransferStats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_appliance_fills_its_slot_from_the_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 5 * 1024 * 1024 + 4321).await;

    let key = SecretKey::generate().expect("rng");
    let client = CoordinatorClient::new(&origin.url, None, key.clone()).expect("client");
    let request = CheckinRequest {
        site: "lab".into(),
        name: "solo".into(),
        group: None,
        macs: vec![],
        platform: PLATFORM.into(),
        installed_version: 1,
        active_slot: Some("A".into()),
        agent_version: "test".into(),
        agent_release: None,
        agent_previous: None,
        enrollment_token: Some(ENROLL.into()),
        peer: Default::default(),
    };
    client.checkin(&request).await.expect("enrolled");
    origin.rollout(2).await;
    let offer = client.checkin(&request).await.expect("checkin");
    assert!(offer.update_available);
    let ranges = offer.origin.expect("origin").ranges;

    let slot = dir.path().join("slot-b.img");
    std::fs::File::create(&slot).expect("slot").set_len(image.size + 4096).expect("size");
    let writer = SlotWriter::open_paths(Slot::B, &image, &SlotPaths::beside(&slot, dir.path()))
        .expect("writer");
    let (_news_tx, news) = tokio::sync::mpsc::channel(8);
    let (announce, _announced) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(Mutex::new(TransferStats::default()));
    let swarm = Swarm::new(
        PeerId(*key.public().as_bytes()),
        writer,
        Some((client, ranges)),
        None,
        news,
        announce,
        stats.clone(),
        |config| config.discovery_grace = std::time::Duration::ZERO,
    );
    let writer = swarm.run().await.expect("swarm completes");
    writer.finish().expect("read back matches the manifest");
    let written = std::fs::read(&slot).expect("slot");
    assert_eq!(&written[..image.size as usize], &std::fs::read(&image_path).expect("image")[..]);
    let stats = *stats.lock().expect("stats");
    assert_eq!(stats.pieces_from_lan, 0);
    assert_eq!(origin.origin_bytes("lab", 2).await, stats.bytes_from_origin);
    assert!(stats.bytes_from_origin >= image.size, "{stats:?}");
}
