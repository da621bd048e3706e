//! The coordinator under load: signed check-ins per second with many concurrent appliances
//! (against bare HTTP requests to `/healthz` on the same server), and origin throughput
//! against nginx serving the same file.
//!
//! `cargo bench -p sitecast-benches --bench coordinator`
//! (`SITECAST_BENCH_APPLIANCES`, default 2000; `SITECAST_BENCH_SECONDS`, default 5;
//! `SITECAST_BENCH_MIB` for the image, default 256; `SITECAST_BENCH_DATABASE`, a PostgreSQL
//! connection string, to keep the server's state there instead of redb). nginx is skipped,
//! loudly, if not installed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jiff::Timestamp;
use sitecast_benches::checkins::{CONCURRENCY, Server, checkin_body, load, row, signed};
use sitecast_benches::{bench_bytes, write_test_image};
use sitecast_coordinator::server::ServerConfig;
use sitecast_manifest::*;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    sitecast_coordinator::install_tls_provider();
    let appliances = env_number("SITECAST_BENCH_APPLIANCES", 2000) as usize;
    let seconds = env_number("SITECAST_BENCH_SECONDS", 5);
    let dir = tempfile::tempdir().expect("tempdir");

    let data_dir = dir.path().join("data");
    let root_key = SecretKey::generate().expect("rng");
    let release_key = SecretKey::generate().expect("rng");
    let root = Root {
        version: 1,
        expires: Timestamp::now() + jiff::SignedDuration::from_hours(24),
        root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
        release: RoleKeys { keys: vec![release_key.public()], threshold: 1 },
    };
    let root = TrustedRoot::pin(&root.sign(&[&root_key]).to_bytes()).expect("root");
    let mut config = ServerConfig::new(data_dir);
    config.root = Some(root.clone());
    config.database = std::env::var("SITECAST_BENCH_DATABASE").ok();
    let server = Server::start(config);
    let url = server.url.clone();

    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    client_runtime.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
        let keys: Arc<Vec<SecretKey>> = Arc::new((0..appliances).map(|_| SecretKey::generate().expect("rng")).collect());
        // One at a time: each enrollment is a durable, audited commit, so this is the store's
        // commit latency as a client sees it.
        let enrolling = Instant::now();
        for (i, key) in keys.iter().enumerate() {
            let response = signed(&client, &url, key, checkin_body(i % 100, 1, true)).send().await.expect("enroll");
            assert!(response.status().is_success());
        }
        let enrolled = enrolling.elapsed();

        let health = {
            let (client, url) = (client.clone(), url.clone());
            load(seconds, move |_| {
                let request = client.get(format!("{url}/healthz"));
                async move {
                    let response = request.send().await.expect("healthz");
                    assert!(response.status().is_success());
                    response.bytes().await.expect("body");
                }
            })
            .await
        };
        let checkins = {
            let (client, url, keys) = (client.clone(), url.clone(), Arc::clone(&keys));
            load(seconds, move |i| {
                let key = &keys[i % keys.len()];
                let request = signed(&client, &url, key, checkin_body(i % 100, 1, false));
                async move {
                    let response = request.send().await.expect("checkin");
                    assert!(response.status().is_success());
                    response.bytes().await.expect("body");
                }
            })
            .await
        };
        let store = if std::env::var("SITECAST_BENCH_DATABASE").is_ok() { "PostgreSQL" } else { "redb" };
        println!("coordinator check-ins ({store}): {appliances} appliances, {CONCURRENCY} concurrent, {seconds} s each, client and server on this 2-core machine");
        row("baseline: GET /healthz (bare HTTP)", health, health.0);
        row("signed check-in (verify, fleet, answer)", checkins, health.0);
        println!(
            "  {:<40} {:>8.0} /s     {:.2} ms each (one durable commit each, one at a time)",
            "enrollment",
            appliances as f64 / enrolled.as_secs_f64(),
            enrolled.as_secs_f64() * 1e3 / appliances as f64
        );

        let blake3 = origin(&client, &url, &root, &release_key, dir.path()).await;
        under_attack(&client, &url, &keys, &blake3, seconds, checkins).await;
    });
}

/// A raw connection from `source` (a loopback address of its own, so the per-client limit
/// applies to the attackers and not to the fleet) that sends `head` and `body` and then
/// neither reads nor writes.
async fn stall(
    source: std::net::Ipv4Addr,
    server: std::net::SocketAddr,
    head: String,
    body: usize,
) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind((source, 0).into()).ok()?;
    let mut stream = socket.connect(server).await.ok()?;
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(&vec![b' '; body]).await.ok()?;
    Some(stream)
}

/// Check-ins while 500 clients hold verified-range streams they never read and 400 send all
/// but the last byte of a body: the attacks of issue 12, against the same check-in load.
async fn under_attack(
    client: &reqwest::Client,
    url: &str,
    keys: &Arc<Vec<SecretKey>>,
    blake3: &str,
    seconds: u64,
    first_calm: (f64, Duration, Duration),
) {
    let server: std::net::SocketAddr = url.trim_start_matches("http://").parse().expect("addr");
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("VmRSS:")
                        .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                })
            })
            .flatten()
            .map_or(0, |kb| kb / 1024)
    };
    let before = rss();
    let key = &keys[0];
    let signed_head = |method: &str, path: &str, extra: &str| {
        let timestamp = Timestamp::now().as_second();
        let message = api::appliance_signing_bytes(method, path, timestamp, b"");
        format!(
            "{method} {path} HTTP/1.1\r\nhost: {server}\r\n{}: {}\r\n{}: {timestamp}\r\n{}: {}\r\n{extra}\r\n",
            api::HEADER_APPLIANCE,
            key.public().to_hex(),
            api::HEADER_TIMESTAMP,
            api::HEADER_SIGNATURE,
            key.sign(&message).to_hex()
        )
    };
    // The same check-ins as the measurement, so the fleet is settled first: publishing the
    // image made each appliance's claimed version a real one, a durable change each
    // appliance's next check-in commits once. Then the calm baseline again, in this state.
    let checkin = {
        let (client, url, keys) = (client.clone(), url.to_owned(), Arc::clone(keys));
        move |i: usize| {
            // Key 0 is the attackers'. Each appliance keeps the site it enrolled in (index
            // % 100): a check-in that moved it would be a durable, audited change.
            let index = 1 + i % (keys.len() - 1);
            let request = signed(&client, &url, &keys[index], checkin_body(index % 100, 1, false));
            async move {
                let response = request.send().await.expect("checkin");
                assert!(response.status().is_success(), "{}", response.status());
                response.bytes().await.expect("body");
            }
        }
    };
    {
        use futures_util::StreamExt;
        futures_util::stream::iter(0..keys.len() - 1)
            .map(&checkin)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }
    let calm = load(seconds, checkin.clone()).await;
    let mut held = Vec::new();
    let range_path = format!("/api/blobs/{blake3}/ranges?start=0&end=1024");
    // Eight readers per address, under the per-client share of the range pool (16), so the
    // readers together can take the whole pool, as many clients would.
    for i in 0..500u32 {
        let source = std::net::Ipv4Addr::new(127, 1, (i / 8) as u8, 1);
        held.extend(stall(source, server, signed_head("GET", &range_path, ""), 0).await);
    }
    for i in 0..400u32 {
        let source = std::net::Ipv4Addr::new(127, 2, (i / 200) as u8, 1);
        let head = signed_head(
            "POST",
            "/api/appliances/report",
            "content-type: application/json\r\ncontent-length: 61440\r\n",
        );
        held.extend(stall(source, server, head, 61439).await);
    }
    let attackers = held.len();
    // Let the attack settle: the encoders fill their readers' socket buffers and the range
    // requests beyond the pool are turned away after their 10 s wait. Then measure the
    // steady state the attack can hold.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let attacked = load(seconds, checkin).await;
    let during = rss();
    drop(held);
    println!(
        "check-ins under attack: {attackers} attacking connections (500 stalled range readers, 400 unfinished bodies) from other addresses"
    );
    let row = |name: &str, (rate, p50, p99): (f64, Duration, Duration)| {
        println!(
            "  {name:<40} {rate:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99 ratio {:.2}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            p99.as_secs_f64() / calm.2.as_secs_f64()
        );
    };
    row("baseline: signed check-in, no attack", calm);
    row("(the first baseline, before publishing)", first_calm);
    row("signed check-in during the attack", attacked);
    println!("  process RSS (server and clients): {before} MiB before, {during} MiB during");
}

/// Returns the published image's BLAKE3 (hex).
async fn origin(
    client: &reqwest::Client,
    url: &str,
    root: &TrustedRoot,
    release_key: &SecretKey,
    dir: &Path,
) -> String {
    let len = bench_bytes(256);
    let image = dir.join("image.raw");
    write_test_image(&image, len).expect("image");
    let digest = ImageDigest::of_reader(std::fs::File::open(&image).expect("open")).expect("hash");
    let now = Timestamp::now();
    let release = Release {
        version: 1,
        version_name: "bench".into(),
        image: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
        platforms: vec!["x86_64-appliance".into()],
        notes: String::new(),
        created: now,
        expires: now + jiff::SignedDuration::from_hours(1),
        rollback_floor: None,
        index: None,
    };
    let manifest = String::from_utf8(release.sign(&[release_key]).to_bytes()).expect("utf8");
    root.verify_release(manifest.as_bytes(), now).expect("verifies");
    let response = client
        .post(format!("{url}/api/releases"))
        .bearer_auth("bench-operator")
        .json(&serde_json::json!({"manifest": manifest, "image_path": image}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), 201, "{:?}", response.text().await);

    let fetch = |target: String| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            // Images are for the fleet: ours are fetched as the operator (nginx ignores it).
            let response =
                client.get(&target).bearer_auth("bench-operator").send().await.expect("get");
            assert!(response.status().is_success(), "{target}: {}", response.status());
            let mut stream = response.bytes_stream();
            let mut bytes = 0u64;
            while let Some(chunk) = stream.next().await {
                bytes += chunk.expect("chunk").len() as u64;
            }
            (bytes, started.elapsed())
        }
    };
    let best = |runs: Vec<(u64, Duration)>| runs.into_iter().min_by_key(|r| r.1).expect("runs");
    let groups = len.div_ceil(16 * 1024);
    let mut plain = Vec::new();
    let mut verified = Vec::new();
    for _ in 0..3 {
        plain.push(fetch(format!("{url}/api/releases/1/image")).await);
        verified.push(
            fetch(format!("{url}/api/blobs/{}/ranges?start=0&end={groups}", digest.blake3)).await,
        );
    }
    let (plain, verified) = (best(plain), best(verified));
    let mib_s = |(bytes, time): (u64, Duration)| bytes as f64 / 1048576.0 / time.as_secs_f64();

    println!("origin: {} MiB image, best of 3, one client", len >> 20);
    let Some(nginx) = sitecast_benches::nginx(dir, &image) else {
        println!("  nginx not installed: no baseline (apt install nginx-light)");
        println!("  ours: plain image                      {:>8.0} MiB/s", mib_s(plain));
        println!("  ours: verified ranges (all groups)     {:>8.0} MiB/s", mib_s(verified));
        return digest.blake3.to_hex();
    };
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(fetch(format!("{}/image.raw", nginx.url)).await);
    }
    let baseline = best(runs);
    drop(nginx);
    let row = |name: &str, run: (u64, Duration)| {
        println!(
            "  {name:<40} {:>8.0} MiB/s  ratio {:.2}",
            mib_s(run),
            mib_s(run) / mib_s(baseline)
        );
    };
    row("baseline: nginx, the same file", baseline);
    row("ours: plain image (Range-capable)", plain);
    row("ours: verified ranges (all groups)", verified);
    digest.blake3.to_hex()
}
