//! A release's image from another HTTP origin (a real nginx standing in for a CDN): appliances
//! fetch plain byte ranges from it and verify every group against the outboard from Central
//! Command, so a changed byte is refused at its group and fetched elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::*;
use sitecast_iso::{BlobLayout, GROUP_BYTES, Slot, SlotPaths, SlotWriter};
use sitecast_manifest::SecretKey;
use sitecast_peer::coordinator::CoordinatorClient;
use sitecast_peer::mirror::{MIRROR_IDLE, Mirrors};
use sitecast_peer::scheduler::PeerId;
use sitecast_peer::swarm::{Swarm, TransferStats};

/// A copy of `image` in `dir/mirror`, served by nginx; its URL.
fn mirror_of(dir: &Path, image: &Path, change: Option<u64>) -> (Nginx, String) {
    let root = dir.join("mirror");
    std::fs::create_dir_all(&root).expect("dir");
    let mut bytes = std::fs::read(image).expect("image");
    if let Some(at) = change {
        bytes[at as usize] ^= 0x20;
    }
    std::fs::write(root.join("image.raw"), bytes).expect("copy");
    let nginx = Nginx::serve_files(&dir.join("nginx"), &root);
    let url = format!("{}/image.raw", nginx.url());
    (nginx, url)
}

/// Bytes nginx sent in answers to `Range` requests (206), from its access log.
fn ranged_bytes_sent(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| {
            let mut fields = line.split('"').nth(2)?.split_whitespace();
            (fields.next()? == "206").then_some(())?;
            fields.next()?.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_fills_its_slots_from_an_nginx_mirror_and_its_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 12 * 1024 * 1024 + 777).await;
    let (nginx, url) = mirror_of(dir.path(), &image_path, None);
    let (status, body) = set_mirrors(&origin, 2, std::slice::from_ref(&url)).await;
    assert_eq!(status, 204, "{body}");

    let mut agents = start_agents(&origin, dir.path(), 3, image.size);
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 3, deadline, &agents[0]).await;
    wait_members_known(&mut agents, 3, deadline).await;
    origin.rollout(2).await;
    wait_state(&origin, &["a0", "a1", "a2"], "ready", deadline).await;

    let expected = std::fs::read(&image_path).expect("image");
    for agent in &agents {
        let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
        assert!(slot == expected, "{}: slot B differs from the image", agent.name);
    }
    // Central Command sent each appliance the outboard and no image bytes.
    let outboard = BlobLayout::new(image.blake3, image.size).outboard_len();
    let served = origin.origin_bytes("store-1", 2).await;
    assert!(served > 0 && served <= 3 * outboard, "Central Command served {served} bytes");
    // The mirror sent about one copy, which the appliances report; the rest came over the LAN.
    let list = appliances(&origin).await;
    let sum = |field: &str| list.iter().map(|a| a["update"][field].as_u64().unwrap_or(0)).sum();
    let (reported, lan): (u64, u64) = (sum("bytes_from_mirror"), sum("bytes_from_lan"));
    let sent = ranged_bytes_sent(&nginx.access_log());
    eprintln!("mirror sent {sent}, appliances report {reported} from it and {lan} from the LAN");
    assert!(reported >= image.size, "{reported} bytes from the mirror, less than the image");
    assert!(sent >= reported, "nginx sent {sent}, less than the {reported} reported");
    assert!(sent as f64 <= 1.1 * image.size as f64, "the mirror sent {sent} bytes");
    assert!(lan >= image.size, "the other copies came over the LAN: {lan}");
    // The Fleet Updates page counts the mirror's bytes as the site's origin bytes.
    let site = &origin.operator_get("/api/sites").await["sites"][0];
    assert_eq!(site["mirror_bytes"], reported, "{site}");
    let copies = site["origin_copies"].as_f64().expect("copies");
    assert!((1.0..1.1).contains(&copies), "{site}");
}

/// A lone appliance's swarm with the release's mirrors (given up after `idle` without a
/// byte); the slot and what the swarm did.
async fn fill_with_mirrors(
    origin: &Origin,
    dir: &Path,
    image: &sitecast_manifest::ImageInfo,
    idle: Duration,
) -> (PathBuf, TransferStats) {
    let key = SecretKey::generate().expect("rng");
    let client = CoordinatorClient::new(&origin.url, None, key.clone()).expect("client");
    let request = lone_checkin("lab", "solo");
    client.checkin(&request).await.expect("enrolled");
    origin.rollout(2).await;
    let offer = client.checkin(&request).await.expect("checkin").origin.expect("origin");
    assert!(!offer.mirrors.is_empty(), "the offer names no mirror");

    let slot = dir.join("slot-b.img");
    std::fs::File::create(&slot).expect("slot").set_len(image.size).expect("size");
    let writer =
        SlotWriter::open_paths(Slot::B, image, &SlotPaths::beside(&slot, dir)).expect("writer");
    let layout = writer.layout();
    let outboard = offer.outboard.expect("outboard");
    let mirrors = Mirrors::prepare(&client, &outboard, offer.mirrors, layout, dir.join("m.obao4"))
        .await
        .expect("the outboard chains to the root")
        .with_idle_timeout(idle);
    let (_news_tx, news) = tokio::sync::mpsc::channel(8);
    let (announce, _announced) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(Mutex::new(TransferStats::default()));
    let swarm = Swarm::new(
        PeerId(*key.public().as_bytes()),
        writer,
        Some((client, offer.ranges)),
        None,
        news,
        announce,
        stats.clone(),
        |config| config.discovery_grace = Duration::ZERO,
    )
    .with_mirrors(Arc::new(mirrors));
    let writer = swarm.run().await.expect("swarm completes");
    writer.finish().expect("read back matches the manifest");
    let stats = *stats.lock().expect("stats");
    (slot, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_changed_on_the_mirror_is_refused_and_fetched_from_central_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 5 * 1024 * 1024 + 4321).await;
    // Central Command checks a mirror's first and last groups: a change in the middle passes
    // that check, and only the appliances' verification stands between it and a slot.
    let bad_group = 150;
    let (_nginx, url) = mirror_of(dir.path(), &image_path, Some(bad_group * GROUP_BYTES + 99));
    let (status, body) = set_mirrors(&origin, 2, &[url]).await;
    assert_eq!(status, 204, "{body}");

    let (slot, stats) = fill_with_mirrors(&origin, dir.path(), &image, MIRROR_IDLE).await;
    let written = std::fs::read(&slot).expect("slot");
    assert!(written == std::fs::read(&image_path).expect("image"), "the slot is not the image");
    assert_eq!(stats.mirrors_given_up, 1, "{stats:?}");
    assert!(stats.bytes_from_mirror > 0, "nothing came from the mirror: {stats:?}");
    assert!(stats.bytes_from_origin > 0, "nothing came from Central Command: {stats:?}");
    assert_eq!(stats.pieces_from_origin, stats.pieces_total, "{stats:?}");
    // What the mirror delivered stops short of the changed group.
    assert!(stats.bytes_from_mirror < image.size, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_is_checked_before_it_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, _) = origin.publish(2, 300 * 1024 + 5).await;
    let (other_path, _) = origin.publish(3, 300 * 1024 + 5).await;
    let (nginx, right) = mirror_of(dir.path(), &image_path, None);
    std::fs::copy(&other_path, dir.path().join("mirror/other.raw")).expect("copy");
    let wrong = format!("{}/other.raw", nginx.url());
    let missing = format!("{}/missing.raw", nginx.url());

    for (mirrors, code) in [
        (vec!["/srv/images/image.raw".to_owned()], "invalid"),
        (vec!["ftp://mirror.example/image.raw".to_owned()], "invalid"),
        (vec![right.clone(), right.clone()], "invalid"),
        (vec![wrong], "mirror_check_failed"),
        (vec![right.clone(), missing], "mirror_check_failed"),
    ] {
        let (status, body) = set_mirrors(&origin, 2, &mirrors).await;
        assert!(status == 400 || status == 422, "{mirrors:?}: {status} {body}");
        assert!(body.contains(code), "{mirrors:?}: {body}");
    }
    let release = |releases: serde_json::Value| {
        releases.as_array().expect("list").iter().find(|r| r["version"] == 2).cloned()
    };
    let list = || async {
        let response =
            origin.http.get(format!("{}/api/releases", origin.url)).bearer_auth(OPERATOR);
        release(response.send().await.expect("list").json().await.expect("json"))
            .expect("release 2")
    };
    assert_eq!(list().await["mirrors"], serde_json::json!([]), "a refused list was stored");

    let (status, body) = set_mirrors(&origin, 2, std::slice::from_ref(&right)).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(list().await["mirrors"], serde_json::json!([right]));
    let (status, body) = set_mirrors(&origin, 99, std::slice::from_ref(&right)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = set_mirrors(&origin, 2, &[]).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(list().await["mirrors"], serde_json::json!([]));
}

/// A mirror that answers a `Range` request properly, sends half the bytes, then nothing (a
/// CDN edge that hangs): it is given up at its idle timeout, well before the scheduler would
/// give up the run, and the rest comes from Central Command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_stalls_is_given_up_and_the_run_goes_on_from_central_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 3 * 1024 * 1024 + 99).await;
    let bytes = std::fs::read(&image_path).expect("image");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/image.raw", listener.local_addr().expect("addr"));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&answered);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (bytes, counter) = (bytes.clone(), Arc::clone(&counter));
            tokio::spawn(async move { answer_half_then_stall(socket, &bytes, &counter).await });
        }
    });
    // Central Command's check reads the first and last groups only: those are sent whole.
    let (status, body) = set_mirrors(&origin, 2, &[url]).await;
    assert_eq!(status, 204, "{body}");

    let idle = Duration::from_millis(500);
    let (slot, stats) = fill_with_mirrors(&origin, dir.path(), &image, idle).await;
    let written = std::fs::read(&slot).expect("slot");
    assert!(written == std::fs::read(&image_path).expect("image"), "the slot is not the image");
    assert!(answered.load(std::sync::atomic::Ordering::SeqCst) > 2, "the mirror was not asked");
    assert_eq!(stats.mirrors_given_up, 1, "{stats:?}");
    assert!(stats.bytes_from_origin > 0, "nothing came from Central Command: {stats:?}");
    assert_eq!(stats.failed, 0, "the scheduler saw the stall: {stats:?}");
}

/// Answers one HTTP request on `socket` with the asked range of `image` as a 206, but sends
/// only the first half of a range longer than one group, then holds the connection open.
async fn answer_half_then_stall(
    mut socket: tokio::net::TcpStream,
    image: &[u8],
    answered: &std::sync::atomic::AtomicUsize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(head) = read_request_head(&mut socket).await else { return };
    let head = head.to_lowercase();
    let Some(range) = head.lines().find_map(|l| l.strip_prefix("range: bytes=")) else { return };
    let Some((start, end)) = range.trim().split_once('-') else { return };
    let (Ok(start), Ok(end)) = (start.parse::<usize>(), end.parse::<usize>()) else { return };
    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let whole = &image[start..=end];
    let sent = if whole.len() > GROUP_BYTES as usize { &whole[..whole.len() / 2] } else { whole };
    let answer = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{}\r\n\
         Content-Length: {}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\n\r\n",
        image.len(),
        whole.len()
    );
    if socket.write_all(answer.as_bytes()).await.is_err() || socket.write_all(sent).await.is_err() {
        return;
    }
    // Hold the connection until the client closes it.
    let _ = socket.read(&mut [0u8; 64]).await;
}
