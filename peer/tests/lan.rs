//! The LAN node on its own: serving a held release, refusing what it does not hold, the
//! upload caps (in total and per peer), and refusing at once when every upload slot is taken.

use std::time::{Duration, Instant};

use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, ResponseDecoder, SlotPaths};
use sitecast_manifest::{ImageDigest, ImageInfo, SecretKey};
use sitecast_peer::agent::Lan;
use sitecast_peer::lan::{LanNode, LanNodeForAgent, UploadLimits};
use sitecast_peer::swarm::{FetchError, LanFetcher, piece_count, piece_groups};

async fn serving(dir: &std::path::Path, len: u64, limits: UploadLimits) -> (LanNode, ImageInfo) {
    std::fs::create_dir_all(dir).expect("dir");
    let image = dir.join("image.raw");
    sitecast_iso::generate::write_image(&image, len, "lan test").expect("image");
    let digest = ImageDigest::of_reader(std::fs::File::open(&image).expect("open")).expect("hash");
    let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
    let paths = SlotPaths::beside(&image, dir);
    OutboardStore::new(
        BlobLayout::new(info.blake3, info.size),
        FileDevice::open_or_create(&paths.outboard).expect("ob"),
    )
    .compute_from(std::fs::File::open(&image).expect("open"))
    .expect("outboard");
    let agent = LanNodeForAgent::bind_loopback(&SecretKey::generate().expect("rng"), "s", limits)
        .await
        .expect("bind");
    agent.serve_installed(&info, image, dir.to_owned());
    (agent.node, info)
}

async fn client(server: &LanNode, info: &ImageInfo, dir: &std::path::Path) -> LanNodeForAgent {
    let agent = LanNodeForAgent::bind_loopback(
        &SecretKey::generate().expect("rng"),
        "s",
        UploadLimits::default(),
    )
    .await
    .expect("bind");
    agent.node.add_peer(server.id().0, &server.direct_addrs());
    let slot = dir.join(format!("slot-of-{}.img", hex::encode(&agent.node.id().0[..4])));
    std::fs::File::create(&slot).expect("slot").set_len(info.size).expect("size");
    let _ = agent.join(info, slot, dir.to_owned());
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_verified_pieces_and_caps_its_uploads() {
    sitecast_coordinator::install_tls_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let len = 4 * 1024 * 1024;
    let limit = 8 * 1024 * 1024; // bytes per second, for all uploads together
    // Every piece is asked for at once: slots for all of them, so that the byte cap, not
    // refusals, paces the uploads.
    let limits = UploadLimits { total_bytes_per_sec: limit, streams: 1024, ..Default::default() };
    let (server, info) = serving(dir.path(), len, limits).await;
    let agent = client(&server, &info, dir.path()).await;
    let fetcher = agent.fetcher_for(&info);
    let layout = BlobLayout::new(info.blake3, info.size);
    let pieces = piece_count(&layout);

    let started = Instant::now();
    let fetches: Vec<_> =
        (0..pieces).map(|p| fetcher.fetch(server.id(), piece_groups(&layout, p))).collect();
    let mut total = 0;
    for (p, fetch) in fetches.into_iter().enumerate() {
        let body = fetch.await.expect("served");
        let groups = piece_groups(&layout, p as u64);
        let ranges = layout.chunk_ranges(groups);
        for item in ResponseDecoder::new(layout, &ranges, &body[..]).expect("header") {
            item.expect("every group verifies");
        }
        total += body.len() as u64;
    }
    let elapsed = started.elapsed();
    // Four pieces fetched in parallel still share one budget: at least total / limit seconds.
    let floor = Duration::from_secs_f64(total as f64 / limit as f64 * 0.9);
    assert!(elapsed >= floor, "{total} bytes in {elapsed:?}: the cap of {limit} B/s was not kept");
    assert_eq!(server.uploaded(), total);

    // Groups beyond the image are refused, not invented.
    let beyond = fetcher.fetch(server.id(), layout.groups()..layout.groups() + 1).await;
    assert!(matches!(beyond, Err(FetchError::Failed(_))), "{beyond:?}");
}

/// Fetches every piece of the image from `server`; returns the time it took.
async fn fetch_all(agent: &LanNodeForAgent, server: &LanNode, info: &ImageInfo) -> Duration {
    let fetcher = agent.fetcher_for(info);
    let layout = BlobLayout::new(info.blake3, info.size);
    let started = Instant::now();
    let fetches: Vec<_> = (0..piece_count(&layout))
        .map(|p| fetcher.fetch(server.id(), piece_groups(&layout, p)))
        .collect();
    for fetch in fetches {
        fetch.await.expect("served");
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_peer_cap_holds_for_each_peer_not_for_all() {
    sitecast_coordinator::install_tls_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    // Rates far below what loopback carries, so that the caps and not the machine set them.
    let len = 1024 * 1024;
    let per_peer = 512 * 1024; // bytes per second to any one peer
    let limits =
        UploadLimits { per_peer_bytes_per_sec: per_peer, streams: 1024, ..Default::default() };
    let (server, info) = serving(&dir.path().join("per-peer"), len, limits).await;
    // Beside it, a server whose cap is the same for all peers together: what the per-peer cap
    // must not turn into.
    let for_all =
        UploadLimits { total_bytes_per_sec: per_peer, streams: 1024, ..Default::default() };
    let (reference, reference_info) = serving(&dir.path().join("for-all"), len, for_all).await;
    let (a, b) =
        (client(&server, &info, dir.path()).await, client(&server, &info, dir.path()).await);
    let (c, d) = (
        client(&reference, &reference_info, dir.path()).await,
        client(&reference, &reference_info, dir.path()).await,
    );
    // Two peers fetch from each server at once; when both are done with the per-peer server,
    // what each server has sent so far is compared.
    let per_peer_run = async {
        let took = tokio::join!(fetch_all(&a, &server, &info), fetch_all(&b, &server, &info));
        (took, server.uploaded(), reference.uploaded())
    };
    let reference_run = async {
        tokio::join!(
            fetch_all(&c, &reference, &reference_info),
            fetch_all(&d, &reference, &reference_info)
        )
    };
    let (((took_a, took_b), sent, reference_sent), _) = tokio::join!(per_peer_run, reference_run);
    // Each peer gets at most its cap: 1 MiB at 512 KiB/s is 2 s (less the first burst).
    let least = Duration::from_secs_f64(len as f64 / per_peer as f64 * 0.8);
    assert!(took_a >= least && took_b >= least, "a {took_a:?}, b {took_b:?}: the cap did not hold");
    // The two peers were served side by side, each at its own cap: twice what the cap allows
    // for all peers together, so the server capped for all had sent about half as much (all
    // of it, had the per-peer cap held for all, or had the peers been served one after the
    // other). Bytes, not time: a slow machine slows both servers alike.
    assert!(
        reference_sent * 4 < sent * 3,
        "{reference_sent} B sent under a cap for all while the per-peer cap sent {sent} B: \
         the per-peer cap held for all peers together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_every_upload_slot_taken_refuses_at_once() {
    sitecast_coordinator::install_tls_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    // One slot, and an upload slow enough (1 MiB at 256 KiB/s) that the first holds it while
    // the second asks.
    let limits = UploadLimits { streams: 1, total_bytes_per_sec: 256 * 1024, ..Default::default() };
    let (server, info) = serving(dir.path(), 4 * 1024 * 1024, limits).await;
    let agent = client(&server, &info, dir.path()).await;
    let fetcher = agent.fetcher_for(&info);
    let layout = BlobLayout::new(info.blake3, info.size);
    let first = tokio::spawn(fetcher.fetch(server.id(), 0..64));
    // Polling interval while the first upload starts (it takes its slot, then sends).
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.uploaded() == 0 {
        assert!(!first.is_finished(), "the first fetch ended before it sent a byte");
        assert!(Instant::now() < deadline, "the first upload never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = fetcher.fetch(server.id(), 64..65).await;
    assert!(matches!(second, Err(FetchError::Busy)), "{second:?}");
    first.await.expect("task").expect("the first upload is served");
    // Its slot is free again: the refused piece is served when asked again.
    let again = fetcher.fetch(server.id(), 64..65).await.expect("served");
    let ranges = layout.chunk_ranges(64..65);
    for item in ResponseDecoder::new(layout, &ranges, &again[..]).expect("header") {
        item.expect("every group verifies");
    }
}
