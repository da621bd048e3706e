//! The origin: plain ranged GETs (checked with real curl), verified ranges decoded exactly as
//! LAN data is, bytes counted per site, and metrics that pass `promtool check metrics`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use reqwest::Method;
use sitecast_iso::{BlobLayout, CrashDevice, PowerSupply, ResponseDecoder, Slot, SlotWriter};
use sitecast_manifest::{Blake3Hash, ImageDigest, ImageInfo, api};

const LEN: usize = 1024 * 1024 + 777;

/// A Central Command of its own in `dir`, with the releases' keys.
async fn started(dir: &std::path::Path) -> (Releases, TestServer) {
    let releases = Releases::new(dir);
    let server = TestServer::start(&dir.join("data"), &releases.root).await;
    (releases, server)
}

async fn published(server: &TestServer, releases: &Releases) -> (Vec<u8>, ImageInfo) {
    let (_, image) = releases.image(1, LEN);
    let response = server.publish(&releases.manifest(1, &image, None, None), image.clone()).await;
    assert_eq!(response.status(), 201);
    let digest = ImageDigest::of_reader(&image[..]).expect("hash");
    (image, ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 })
}

/// Appliance a1 of store-7, checked in.
async fn enrolled(server: &TestServer) -> Appliance {
    let appliance = Appliance::new("store-7", "a1", 0);
    appliance.checkin(server).await;
    appliance
}

/// Slot B for `info`, on devices that live in memory.
fn standby_slot(info: &ImageInfo) -> SlotWriter<CrashDevice> {
    let power = PowerSupply::new();
    SlotWriter::open(
        Slot::B,
        info,
        CrashDevice::new(LEN, power.clone()),
        CrashDevice::new(4096, power.clone()),
        CrashDevice::new(64 * 1024, power),
    )
    .expect("slot")
}

/// Real curl, as the operator (images are for the fleet and its operators only).
fn curl(args: &[&str]) -> Vec<u8> {
    let output = Command::new("curl")
        .args(["-H", &format!("Authorization: Bearer {OPERATOR}")])
        .args(args)
        .output()
        .expect("curl is required for this test");
    assert!(output.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_ranged_downloads_give_exactly_those_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    let (image, info) = published(&server, &releases).await;
    let url = format!("{}/api/releases/1/image", server.url);

    assert_eq!(curl(&["-sf", "-r", "1000-1999", &url]), &image[1000..2000]);
    assert_eq!(curl(&["-sf", "-r", "-100", &url]), &image[LEN - 100..]);
    assert_eq!(curl(&["-sf", "-r", "1048000-", &url]), &image[1_048_000..]);
    assert_eq!(curl(&["-sf", &url]), image);

    let response = server
        .op(Method::GET, "/api/releases/1/image")
        .header("range", "bytes=10-19")
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 206);
    let headers = response.headers().clone();
    assert_eq!(headers["content-range"], format!("bytes 10-19/{LEN}").as_str());
    assert_eq!(headers["x-sitecast-sha256"], info.sha256.to_hex().as_str());
    let etag = headers["etag"].to_str().expect("etag").to_owned();
    assert_eq!(etag, format!("\"{}\"", info.blake3));
    assert_eq!(response.bytes().await.expect("body"), &image[10..20]);

    let response = server
        .op(Method::GET, "/api/releases/1/image")
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 304);
    let response = server
        .op(Method::GET, "/api/releases/1/image")
        .header("range", format!("bytes={LEN}-"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 416);
    assert_eq!(response.headers()["content-range"], format!("bytes */{LEN}").as_str());
    let response = server.op(Method::GET, "/api/releases/9/image").send().await.expect("get");
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_ranges_decode_like_lan_data_and_are_counted_per_site() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    let (image, info) = published(&server, &releases).await;
    let appliance = enrolled(&server).await;
    let layout = BlobLayout::new(info.blake3, info.size);
    let groups = layout.groups();

    let mut writer = standby_slot(&info);
    let mut served = 0;
    // One range at a time, and a run of several in one response (each parent sent once).
    let asked: [&[(u64, u64)]; 4] =
        [&[(0, 3), (5, 9), (10, 11)], &[(3, 5)], &[(9, 10)], &[(11, groups)]];
    for pairs in asked {
        let runs: Vec<std::ops::Range<u64>> =
            pairs.iter().map(|&(start, end)| start..end).collect();
        let runs = &runs[..];
        let list: Vec<String> = runs.iter().map(|r| format!("{}-{}", r.start, r.end)).collect();
        let query = match runs {
            [one] => format!("start={}&end={}", one.start, one.end),
            _ => format!("start={}&end={}&ranges={}", runs[0].start, runs[0].end, list.join(",")),
        };
        let path = format!("/api/blobs/{}/ranges?{query}", info.blake3);
        let response =
            appliance.signed(&server, Method::GET, &path, b"").send().await.expect("get");
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key(api::HEADER_RUNS), "says it serves runs");
        let length: u64 =
            response.headers()["content-length"].to_str().expect("len").parse().expect("number");
        let body = response.bytes().await.expect("body");
        assert_eq!(body.len() as u64, length);
        assert_eq!(length, layout.encoded_len_of(runs));
        let apart: u64 = runs.iter().map(|r| layout.encoded_len(r.clone())).sum();
        assert!(runs.len() == 1 || length < apart, "shared parents are sent once");
        served += length;
        let ranges = layout.chunk_ranges_of(runs);
        let decoder = ResponseDecoder::new(layout, &ranges, &body[..]).expect("header");
        let wanted: u64 = runs.iter().map(|r| r.end - r.start).sum();
        assert_eq!(writer.ingest(decoder).expect("every group verifies"), wanted);
    }
    let slot = writer.finish().expect("complete and read back");
    assert_eq!(slot.image(), &info);

    // The operator's requests are served too, but not attributed to a site; anyone else's not.
    let path = format!("/api/blobs/{}/ranges?start=0&end=1", info.blake3);
    assert_eq!(server.op(Method::GET, &path).send().await.expect("get").status(), 200);
    let anyone = server.http.get(format!("{}{path}", server.url)).send().await.expect("get");
    assert_eq!(anyone.status(), 401);
    let too_many: Vec<String> = (0..65).map(|g| format!("{g}-{}", g + 1)).collect();
    for bad in [
        "start=5&end=5".to_owned(),
        format!("start=0&end={}", groups + 1),
        "ranges=0-3,2-4".to_owned(),
        "ranges=4-6,0-2".to_owned(),
        "ranges=0-x".to_owned(),
        "ranges=".to_owned(),
        format!("ranges=0-{}", groups + 1),
        format!("ranges={}", too_many.join(",")),
        "end=3".to_owned(),
    ] {
        let path = format!("/api/blobs/{}/ranges?{bad}", info.blake3);
        assert_eq!(server.op(Method::GET, &path).send().await.expect("get").status(), 416, "{bad}");
    }
    let unknown = Blake3Hash([7; 32]);
    let path = format!("/api/blobs/{unknown}/ranges?start=0&end=1");
    assert_eq!(server.op(Method::GET, &path).send().await.expect("get").status(), 404);

    wait_counted(&server, "store-7", served).await;
    let metrics = server.http.get(format!("{}/metrics", server.url)).send().await;
    let metrics = metrics.expect("get").text().await.expect("text");
    assert!(metrics.contains("site=\"unattributed\""), "{metrics}");
    assert!(metrics.contains("sitecast_checkins_total 1"), "{metrics}");
    let _ = image;
}

/// Waits until Central Command's metrics count `expected` origin bytes for `site`, release 1.
async fn wait_counted(server: &TestServer, site: &str, expected: u64) {
    let line =
        format!("sitecast_origin_bytes_served_total{{site=\"{site}\",version=\"1\"}} {expected}");
    let mut metrics = String::new();
    for _ in 0..100 {
        let response = server.http.get(format!("{}/metrics", server.url)).send().await;
        metrics = response.expect("get").text().await.expect("text");
        if metrics.contains(&line) {
            return;
        }
        // Counting happens after the body is sent, on a blocking thread.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{line} not in\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_of_an_image_that_compresses_cross_compressed_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    // The test image is a repeating pattern: it compresses.
    let (image, info) = published(&server, &releases).await;
    let appliance = enrolled(&server).await;
    let layout = BlobLayout::new(info.blake3, info.size);
    let path = format!("/api/blobs/{}/ranges?start=0&end={}", info.blake3, layout.groups());
    let get = |accept: Option<&'static str>| {
        let mut request = appliance.signed(&server, Method::GET, &path, b"");
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        request.send()
    };

    // Not asked: as it is.
    let plain = get(None).await.expect("get");
    assert_eq!(plain.headers().get("content-encoding"), None);
    let plain = plain.bytes().await.expect("body");
    assert_eq!(plain.len() as u64, layout.encoded_len(0..layout.groups()));
    // Refused by weight: as it is.
    let refused = get(Some("zstd;q=0")).await.expect("get");
    assert_eq!(refused.headers().get("content-encoding"), None);
    let refused = refused.bytes().await.expect("body");
    // Asked: one zstd stream of the same bytes, far smaller, and counted as sent.
    let compressed = get(Some("gzip, zstd")).await.expect("get");
    assert_eq!(compressed.status(), 200);
    assert_eq!(compressed.headers()["content-encoding"], "zstd");
    assert_eq!(compressed.headers()["vary"], "accept-encoding");
    let compressed = compressed.bytes().await.expect("body");
    assert!(compressed.len() * 4 < plain.len(), "{} of {}", compressed.len(), plain.len());
    let decompressed = zstd::stream::decode_all(&compressed[..]).expect("a zstd stream");
    assert!(decompressed == plain, "the same bytes once decompressed");
    let ranges = layout.chunk_ranges(0..layout.groups());
    let mut writer = standby_slot(&info);
    let decoder = ResponseDecoder::new(layout, &ranges, &decompressed[..]).expect("header");
    assert_eq!(writer.ingest(decoder).expect("every group verifies"), layout.groups());
    assert_eq!(writer.finish().expect("complete").image(), &info);
    wait_counted(&server, "store-7", (plain.len() + refused.len() + compressed.len()) as u64).await;
    let _ = image;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_of_an_image_that_does_not_compress_cross_as_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    // Noise, as a compressed file system looks.
    let mut image = vec![0; LEN];
    blake3::Hasher::new_derive_key("noise").finalize_xof().fill(&mut image);
    let response = server.publish(&releases.manifest(1, &image, None, None), image.clone()).await;
    assert_eq!(response.status(), 201);
    let info = ImageDigest::of_reader(&image[..]).expect("hash");
    let appliance = enrolled(&server).await;
    let layout = BlobLayout::new(info.blake3, info.size);
    let path = format!("/api/blobs/{}/ranges?start=0&end={}", info.blake3, layout.groups());
    let request =
        appliance.signed(&server, Method::GET, &path, b"").header("accept-encoding", "zstd");
    let response = request.send().await.expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("content-encoding"), None);
    let length = layout.encoded_len(0..layout.groups());
    assert_eq!(response.headers()["content-length"], length.to_string().as_str());
    assert_eq!(response.bytes().await.expect("body").len() as u64, length);
    wait_counted(&server, "store-7", length).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_bytes_are_the_ranges_asked_for_one_after_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    let (image, info) = published(&server, &releases).await;
    let appliance = enrolled(&server).await;
    let get = |query: String, accept: Option<&'static str>| {
        let path = format!("/api/blobs/{}/bytes?{query}", info.blake3);
        let mut request = appliance.signed(&server, Method::GET, &path, b"");
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        request.send()
    };
    let ranges = [(0u64, 10u64), (16_384, 20_000), (LEN as u64 - 5, LEN as u64)];
    let query = |ranges: &[(u64, u64)]| {
        let list: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        format!("ranges={}", list.join(","))
    };
    let expected: Vec<u8> =
        ranges.iter().flat_map(|&(a, b)| image[a as usize..b as usize].to_vec()).collect();
    let plain = get(query(&ranges), None).await.expect("get");
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers()["content-length"], expected.len().to_string().as_str());
    let plain = plain.bytes().await.expect("body");
    assert!(plain[..] == expected[..], "the bytes asked for, in order");
    // The test image compresses: asked, it comes as zstd, the same bytes once decompressed.
    let compressed = get(query(&[(0, LEN as u64)]), Some("zstd")).await.expect("get");
    assert_eq!(compressed.headers()["content-encoding"], "zstd");
    let compressed = compressed.bytes().await.expect("body");
    assert!(compressed.len() * 4 < LEN, "{} bytes for {LEN}", compressed.len());
    assert!(zstd::stream::decode_all(&compressed[..]).expect("zstd") == image);

    let too_many: Vec<(u64, u64)> = (0..257).map(|i| (i * 2, i * 2 + 1)).collect();
    for bad in [
        "".to_owned(),
        "ranges=".to_owned(),
        "ranges=5-5".to_owned(),
        "ranges=9-3".to_owned(),
        "ranges=0-10,5-20".to_owned(),
        "ranges=20-30,0-10".to_owned(),
        format!("ranges=0-{}", LEN + 1),
        "ranges=0-x".to_owned(),
        query(&too_many),
    ] {
        let response = get(bad.clone(), None).await.expect("get");
        assert_eq!(response.status(), 416, "{bad}");
    }
    let path = format!("/api/blobs/{}/bytes?ranges=0-10", info.blake3);
    let anyone = server.http.get(format!("{}{path}", server.url)).send().await.expect("get");
    assert_eq!(anyone.status(), 401);
    // Counted for the site as sent: the plain answer and the compressed one.
    wait_counted(&server, "store-7", (plain.len() + compressed.len()) as u64).await;
}

/// `len` bytes that do not compress on their own.
fn noise(len: usize, seed: &str) -> Vec<u8> {
    let mut bytes = vec![0; len];
    blake3::Hasher::new().update(seed.as_bytes()).finalize_xof().fill(&mut bytes);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_bytes_can_be_compressed_against_an_older_image_the_appliance_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    // Release 2 is release 1 with a byte changed every 3000: nothing repeats within it, all of
    // it is near what release 1 holds at the same place.
    let old = noise(LEN, "release 1");
    let mut new = old.clone();
    for at in (0..LEN).step_by(3000) {
        new[at] ^= 0x5a;
    }
    for (version, image) in [(1, &old), (2, &new)] {
        let manifest = releases.manifest(version, image, None, None);
        assert_eq!(server.publish(&manifest, image.clone()).await.status(), 201);
    }
    let (from, to) = (blake3::hash(&old).to_hex(), blake3::hash(&new).to_hex());
    let appliance = enrolled(&server).await;
    let get = |query: String, accept: Option<&'static str>| {
        let path = format!("/api/blobs/{to}/bytes?ranges=0-{LEN}&{query}");
        let mut request = appliance.signed(&server, Method::GET, &path, b"");
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        request.send()
    };
    let whole = format!("from={from}&reference=0-{LEN}");
    let answer = get(whole.clone(), Some("zstd")).await.expect("get");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-encoding"], "zstd");
    assert_eq!(answer.headers()[api::HEADER_REFERENCE], format!("0-{LEN}").as_str());
    let sent = answer.bytes().await.expect("body");
    assert!(sent.len() * 20 < LEN, "{} bytes sent for {LEN} against the reference", sent.len());
    let mut decoded = Vec::new();
    let mut decoder =
        zstd::stream::read::Decoder::with_ref_prefix(&sent[..], &old[..]).expect("decoder");
    std::io::Read::read_to_end(&mut decoder, &mut decoded).expect("decompress");
    assert!(decoded == new, "decompressed against release 1, the bytes are release 2's");
    // Against the wrong bytes the same answer does not decompress to release 2.
    let mut wrong = Vec::new();
    // (zstd measures a match back from the reference's end: one byte short moves them all.)
    let shifted = &old[..LEN - 1];
    let decoder = zstd::stream::read::Decoder::with_ref_prefix(&sent[..], shifted);
    let _ = std::io::Read::read_to_end(&mut decoder.expect("decoder"), &mut wrong);
    assert!(wrong != new);

    // No reference where it cannot be used: an answer not compressed, an older image this
    // server does not know. Such answers are what the bytes are without one.
    let plain = get(whole.clone(), None).await.expect("get");
    assert_eq!(plain.headers().get(api::HEADER_REFERENCE), None);
    assert!(plain.bytes().await.expect("body")[..] == new[..]);
    let unknown = format!("from={}&reference=0-{LEN}", blake3::hash(b"never published").to_hex());
    let answer = get(unknown, Some("zstd")).await.expect("get");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers().get(api::HEADER_REFERENCE), None);
    // A reference that is not a range of the older image is refused.
    for bad in
        ["0-x", "5-5", "9-3", "-"].map(str::to_owned).into_iter().chain([format!("0-{}", LEN + 1)])
    {
        let answer = get(format!("from={from}&reference={bad}"), Some("zstd")).await.expect("get");
        assert_eq!(answer.status(), 416, "{bad}");
    }
}

/// A release is offered with its group hashes, which the site shares instead of the
/// outboard: half its bytes, and the whole outboard rebuilds from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_offered_with_group_hashes_that_rebuild_its_outboard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    let (_, info) = published(&server, &releases).await;
    let appliance = enrolled(&server).await;
    server.roll_out_now(1).await;
    let origin = appliance.checkin(&server).await.origin.expect("release 1 offered");
    let hashes = origin.group_hashes_blob.expect("group hashes offered");
    let outboard = origin.outboard_blob.expect("outboard offered");
    assert!(hashes.size * 2 <= outboard.size + 64, "{} and {} bytes", hashes.size, outboard.size);

    // Fetched as the site fetches side files, verified against the hash offered.
    let path = format!("/api/blobs/{}/bytes?ranges=0-{}", hashes.blake3, hashes.size);
    let answer = appliance.signed(&server, Method::GET, &path, b"").send().await.expect("get");
    assert_eq!(answer.status(), 200);
    let bytes = answer.bytes().await.expect("body");
    assert_eq!(Blake3Hash::from(blake3::hash(&bytes)), hashes.blake3);
    let path = format!("/api/blobs/{}/bytes?ranges=0-{}", outboard.blake3, outboard.size);
    let answer = appliance.signed(&server, Method::GET, &path, b"").send().await.expect("get");
    let served = answer.bytes().await.expect("body");

    let layout = BlobLayout::new(info.blake3, info.size);
    let device = CrashDevice::new(layout.outboard_len() as usize, PowerSupply::new());
    let mut rebuilt = sitecast_iso::OutboardStore::new(layout, device);
    assert!(rebuilt.rebuild_from_group_hashes(&bytes[..]).expect("rebuild"), "hash to the root");
    assert!(rebuilt.device_mut().live() == served[..], "the outboard Central Command serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (releases, server) = started(dir.path()).await;
    published(&server, &releases).await;
    let mut appliance = Appliance::new("store \"quoted\"", "a1", 0);
    appliance.checkin(&server).await;
    let (status, _) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(serde_json::json!({"version": 1, "strategy": "immediate"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(appliance.checkin(&server).await.version, Some(1));
    appliance.report(&server, "failed", 1).await;
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    for name in [
        "update_success_rate{",
        "sitecast_rollout_stage{",
        "sitecast_rollout_state{",
        "sitecast_appliances{state=\"failed\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (apt install prometheus)");
    promtool.stdin.take().expect("stdin").write_all(metrics.as_bytes()).expect("write");
    let output = promtool.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool: {}{}\n{metrics}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
