//! Site peers that lie: one serves flipped bits, one claims pieces it does not have and stops
//! early. Both are detected at the first bad group and dropped; the honest agents finish with
//! slots equal to the image, and nothing unverified is written. The same for a file of an
//! agent release, fetched through the same swarm.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bao_tree::io::outboard::PreOrderMemOutboard;
use common::*;
use iroh_blobs::protocol::Request;
use sitecast_iso::{BLOCK_SIZE, BlobLayout};
use sitecast_manifest::api::{CheckinRequest, PeerAddresses};
use sitecast_manifest::{ImageInfo, SecretKey};
use sitecast_peer::coordinator::CoordinatorClient;
use sitecast_peer::pieces::{HaveMap, PieceSet};
use sitecast_peer::site::{SiteConfig, SiteControl};
use sitecast_peer::swarm::piece_count;

#[derive(Clone, Copy)]
enum Lie {
    /// Every group with one bit flipped.
    FlippedBits,
    /// Claims everything, sends the first half of what is asked and stops.
    Truncates,
}

/// A fake appliance of the site that checks in like the others, announces on the site's
/// control plane that it holds the whole release, and serves lies over the iroh-blobs
/// protocol (with `encode_ranges`, which does not check what it sends).
async fn liar(
    origin: &Origin,
    image: &[u8],
    info: &ImageInfo,
    lie: Lie,
) -> tokio::task::JoinHandle<()> {
    let key = SecretKey::generate().expect("rng");
    let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .secret_key(iroh::SecretKey::from_bytes(&key.seed()))
        .alpns(vec![iroh_blobs::ALPN.to_vec()])
        .relay_mode(iroh::RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0".parse::<SocketAddr>().expect("addr"))
        .expect("bind addr")
        .bind()
        .await
        .expect("bind");
    let sockets = endpoint.bound_sockets();
    let addrs: Vec<String> = sockets.iter().map(ToString::to_string).collect();
    let site = SiteControl::start(
        &key,
        SiteConfig {
            site: "store-1".into(),
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            mdns: false,
            heartbeat: Duration::from_secs(1),
            membership: Default::default(),
        },
    )
    .await
    .expect("control plane");
    let layout = BlobLayout::new(info.blake3, info.size);
    let everything = HaveMap::from(&PieceSet::full(piece_count(&layout)));
    site.announce(*info.blake3.as_bytes(), everything, sockets);
    let client = CoordinatorClient::new(&origin.url, None, key.clone()).expect("client");
    let request = CheckinRequest {
        site: "store-1".into(),
        name: "liar".into(),
        group: None,
        macs: vec![],
        platform: PLATFORM.into(),
        installed_version: 2,
        active_slot: Some("B".into()),
        agent_version: "liar".into(),
        agent_release: None,
        agent_previous: None,
        enrollment_token: Some(ENROLL.into()),
        peer: PeerAddresses {
            libp2p: site.addresses(),
            iroh_id: Some(key.public().to_hex()),
            iroh_addrs: addrs,
        },
    };
    client.checkin(&request).await.expect("the liar enrolls");
    let mut data = image.to_vec();
    if matches!(lie, Lie::FlippedBits) {
        for byte in data.iter_mut().step_by(16 * 1024) {
            *byte ^= 1;
        }
    }
    let outboard = PreOrderMemOutboard::create(image, BLOCK_SIZE);
    tokio::spawn(async move {
        let _keep_announcing = site;
        let _keep_checking_in = tokio::spawn(async move {
            loop {
                let _ = client.checkin(&request).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        while let Some(incoming) = endpoint.accept().await {
            let Ok(connection) = incoming.await else { continue };
            let (data, outboard) = (data.clone(), outboard.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let Ok(request) = recv.read_to_end(1 << 20).await else { return };
                    let Ok(Request::Get(get)) = postcard::from_bytes::<Request>(&request) else {
                        return;
                    };
                    let Some((_, ranges)) = get.ranges.as_single() else { return };
                    let mut body = info_size_header(&layout);
                    bao_tree::io::sync::encode_ranges(&data[..], &outboard, ranges, &mut body)
                        .expect("encode");
                    if matches!(lie, Lie::Truncates) {
                        body.truncate(body.len() / 2);
                    }
                    let _ = send.write_all(&body).await;
                    let _ = send.finish();
                }
            });
        }
    })
}

fn info_size_header(layout: &BlobLayout) -> Vec<u8> {
    layout.size.to_le_bytes().to_vec()
}

async fn honest_site_finishes_despite(lie: Lie) {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, info) = origin.publish(2, 6 * 1024 * 1024 + 333).await;
    let image = std::fs::read(&image_path).expect("image");
    let _liar = liar(&origin, &image, &info, lie).await;
    let mut agents = start_agents(&origin, dir.path(), 2, info.size);
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 3, deadline, &agents[0]).await;
    // The honest agents know all three members, the liar among them, before the rollout.
    wait_members_known(&mut agents, 3, deadline).await;
    origin.rollout(2).await;
    loop {
        let list = appliances(&origin).await;
        let honest: Vec<_> = list.iter().filter(|a| a["name"] != "liar").collect();
        if honest.iter().all(|a| a["update"]["state"] == "ready") {
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {honest:?}\n{}", agents[0].log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for agent in &agents {
        let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
        assert!(slot == image, "{}: slot B differs from the image", agent.name);
    }
    let dropped =
        agents.iter().filter(|a| a.log().contains("peer dropped for this release")).count();
    assert!(dropped >= 1, "the liar was never dropped:\n{}", agents[0].log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_flipped_bits_is_dropped() {
    honest_site_finishes_despite(Lie::FlippedBits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_what_it_lacks_is_dropped() {
    honest_site_finishes_despite(Lie::Truncates).await;
}

/// A liar announcing a file of an agent release and sending it with flipped bits: the honest
/// agents (under their launchers) drop it, run the release, and hold the published bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lying_about_an_agent_release_file_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let data: Vec<u8> = (0..6 * 1024 * 1024 + 333u32).map(|i| (i % 251) as u8).collect();
    let info = {
        let digest = sitecast_manifest::ImageDigest::of_reader(&data[..]).expect("hash");
        ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 }
    };
    let binary = std::fs::read(BIN).expect("sitecast-peer");
    origin
        .publish_agent(2, &[("bin/sitecast-peer", &binary, true), ("share/data", &data, false)])
        .await;
    let _liar = liar(&origin, &data, &info, Lie::FlippedBits).await;
    let mut agents: Vec<AgentProcess> = (0..2)
        .map(|i| {
            let name = format!("a{i}");
            let mut agent =
                AgentProcess::new(&dir.path().join(&name), &origin, "store-1", &name, 1 << 20);
            let store = agent.dir.join("agents");
            agent.start_under_launcher(&store, &["--restart-delay-ms", "200"]);
            agent
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    wait_enrolled(&origin, 3, deadline, &agents[0]).await;
    wait_members_known(&mut agents, 3, deadline).await;
    origin.agent_rollout(2).await;
    loop {
        let list = appliances(&origin).await;
        let honest: Vec<_> = list.iter().filter(|a| a["name"] != "liar").collect();
        if honest.iter().all(|a| a["agent_release"] == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "not on agent 2: {honest:?}\n{}", agents[0].log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for agent in &agents {
        let staged = std::fs::read(agent.dir.join("agents/versions/2/share/data")).expect("file");
        assert!(staged == data, "{}: the staged file differs from the published one", agent.name);
    }
    let dropped =
        agents.iter().filter(|a| a.log().contains("peer dropped for this release")).count();
    assert!(dropped >= 1, "the liar was never dropped:\n{}", agents[0].log());
}
