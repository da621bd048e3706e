//! Clients that stop reading cannot freeze Central Command: verified ranges are encoded in a
//! bounded pool, so while every encoder is held by a reader that reads nothing, check-ins,
//! operator changes, the engine and plain downloads go on, and the pool is given back when the
//! readers go. One client address holds at most its share of that pool.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;
use sitecast_coordinator::server::Clock;

const STREAMS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_hold_only_the_range_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_with(&dir.path().join("data"), &releases.root, |config| {
        config.max_range_streams = STREAMS;
        // Every reader here comes from 127.0.0.1: let that one client fill the pool.
        config.max_range_streams_per_client = STREAMS;
    })
    .await;
    let (_, image) = releases.image(1, 16 << 20);
    let manifest = releases.manifest(1, &image, None, None);
    assert_eq!(server.publish(&manifest, image.clone()).await.status(), 201);
    let (_, small) = releases.image(2, 100_000);
    assert_eq!(
        server.publish(&releases.manifest(2, &small, None, None), small).await.status(),
        201
    );
    let appliance = Appliance::new("s", "a", 1);
    appliance.checkin(&server).await;
    let hash = sitecast_manifest::ImageDigest::of_reader(&image[..]).expect("hash").blake3;
    let groups = sitecast_iso::BlobLayout::new(hash, image.len() as u64).groups();
    let path = format!("/api/blobs/{hash}/ranges?start=0&end={groups}");

    // Readers that take the headers and then read nothing, each on its own connection.
    let mut stalled = Vec::new();
    let mut busy = false;
    for _ in 0..STREAMS * 4 {
        let response =
            appliance.signed(&server, Method::GET, &path, &[]).send().await.expect("get");
        match response.status().as_u16() {
            200 => stalled.push(response),
            503 => {
                assert_eq!(response.headers()["retry-after"], "1");
                busy = true;
                break;
            }
            other => panic!("range request answered {other}"),
        }
    }
    assert!(busy, "the pool never filled: {} streams held", stalled.len());
    assert_eq!(stalled.len(), STREAMS);

    // While they hold it, everything else is served.
    assert!(!appliance.checkin(&server).await.update_available);
    server.roll_out_now(2).await;
    let coordinator = server.coordinator.clone();
    tokio::task::spawn_blocking(move || coordinator.tick()).await.expect("join").expect("tick");
    let plain = server.op(Method::GET, "/api/releases/1/image").header("range", "bytes=0-99");
    let plain = plain.send().await.expect("get");
    assert_eq!(plain.status(), 206);
    assert_eq!(plain.bytes().await.expect("body").as_ref(), &image[..100]);
    assert_eq!(appliance.checkin(&server).await.version, Some(2));

    // When the readers go, so do their encoders.
    drop(stalled);
    let mut served = false;
    for _ in 0..500 {
        let response =
            appliance.signed(&server, Method::GET, &path, &[]).send().await.expect("get");
        if response.status() == 200 {
            let body = response.bytes().await.expect("body");
            assert_eq!(
                body.len() as u64,
                sitecast_iso::BlobLayout::new(hash, image.len() as u64).encoded_len(0..groups)
            );
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(served, "the pool was never given back");
}

/// One client address that holds its share of the range pool with readers that read nothing
/// is refused more at once (503 `busy`, `Retry-After`), while the pool still has room for
/// another address; its share comes back when its readers go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_the_range_pool() {
    const POOL: usize = 8;
    const SHARE: usize = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_with(&dir.path().join("data"), &releases.root, |config| {
        config.max_range_streams = POOL;
        config.max_range_streams_per_client = SHARE;
    })
    .await;
    // Large enough that an encoder cannot finish into the socket buffers of a reader that
    // reads nothing.
    let (_, image) = releases.image(1, 16 << 20);
    let manifest = releases.manifest(1, &image, None, None);
    assert_eq!(server.publish(&manifest, image.clone()).await.status(), 201);
    let appliance = Appliance::new("s", "a", 0);
    appliance.checkin(&server).await;
    let hash = sitecast_manifest::ImageDigest::of_reader(&image[..]).expect("hash").blake3;
    let layout = sitecast_iso::BlobLayout::new(hash, image.len() as u64);
    let path = format!("/api/blobs/{hash}/ranges?start=0&end={}", layout.groups());
    // The same appliance from a second loopback address: another client to the server.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client on 127.0.0.2");
    let get = |http: &reqwest::Client| appliance.signed_via(http, &server, Method::GET, &path, &[]);

    let mut held = Vec::new();
    for _ in 0..SHARE {
        let response = get(&server.http).send().await.expect("get");
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    // Over its share, with POOL - SHARE encoders free: refused, told when to come back.
    let refused = get(&server.http).send().await.expect("get");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(error_code(refused).await, (503, "busy".to_owned()));
    // Another address is served in full meanwhile, and gets a share of its own.
    let mut other_held = Vec::new();
    for _ in 0..SHARE {
        let response = get(&other).send().await.expect("get from 127.0.0.2");
        assert_eq!(response.status(), 200);
        other_held.push(response);
    }
    let body = other_held.pop().expect("one").bytes().await.expect("body");
    assert_eq!(body.len() as u64, layout.encoded_len(0..layout.groups()));
    assert_eq!(error_code(get(&server.http).send().await.expect("get")).await.0, 503);

    // When its readers go, the first address has its share again.
    drop(held);
    let mut served = false;
    for _ in 0..500 {
        let response = get(&server.http).send().await.expect("get");
        if response.status() == 200 {
            served = true;
            break;
        }
        assert_eq!(error_code(response).await, (503, "busy".to_owned()));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(served, "the share was never given back");
}

/// Clients that send all but the last bytes of a body hold nothing for long: each is cut at
/// the body deadline, and while they wait check-ins and operator changes are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_never_finish_are_cut_and_hold_up_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CLIENTS: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_with(&dir.path().join("data"), &releases.root, |config| {
        config.limits.body_read_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let (_, image) = releases.image(1, 100_000);
    assert_eq!(
        server.publish(&releases.manifest(1, &image, None, None), image).await.status(),
        201
    );
    let appliance = Appliance::new("s", "a", 0);
    appliance.checkin(&server).await;

    // An enrolled key and a fresh timestamp (the signature can only be checked against the
    // whole body), declared 60 KiB (under the appliance limit), one byte short.
    let timestamp = server.clock.now().as_second();
    let declared = 60 * 1024;
    let address = server.url.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
        let head = format!(
            "POST /api/appliances/report HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\nx-sitecast-appliance: {}\r\nx-sitecast-timestamp: {timestamp}\r\nx-sitecast-signature: {}\r\n\r\n",
            appliance.id(),
            "00".repeat(64)
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&vec![b' '; declared - 1]).await.expect("body");
        slow.push(stream);
    }
    // While they wait, the fleet is served.
    assert!(!appliance.checkin(&server).await.update_available);
    let (status, body) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 1, "strategy": "immediate"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Each is cut at the deadline, and the server says so.
    for stream in &mut slow {
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    let metrics = server.http.get(format!("{}/metrics", server.url)).send().await.expect("get");
    let metrics = metrics.text().await.expect("text");
    let cut: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sitecast_connections_total{outcome=\"body_timeout\"} "))
        .and_then(|n| n.parse().ok())
        .expect("the body timeouts are counted");
    assert!(cut >= CLIENTS as u64, "{cut} of {CLIENTS} cut:\n{metrics}");
}
