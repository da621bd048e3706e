//! One agent fetching an image from another over the LAN plane (iroh on loopback, the
//! iroh-blobs protocol, every group verified and written to a slot file), against nginx +
//! curl moving the same bytes in the same run.
//!
//! `cargo bench -p sitecast-benches --bench lan_transfer` (`SITECAST_BENCH_MIB`, default 1024).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sitecast_benches::{bench_bytes, mib_per_s, peak_rss_bytes, write_test_image};
use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, Slot, SlotPaths, SlotWriter};
use sitecast_manifest::{ImageDigest, ImageInfo, SecretKey};
use sitecast_peer::agent::Lan;
use sitecast_peer::lan::LanNodeForAgent;
use sitecast_peer::scheduler::PeerId;
use sitecast_peer::swarm::{Swarm, TransferStats};

fn curl(url: &str, out: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new("curl").args(["-sf", "-o"]).arg(out).arg(url).status().expect("curl");
    assert!(status.success());
    started.elapsed()
}

fn main() {
    sitecast_coordinator::install_tls_provider();
    let len = bench_bytes(1024);
    let dir = tempfile::tempdir().expect("tempdir");
    let image_path = dir.path().join("image.raw");
    write_test_image(&image_path, len).expect("image");
    let digest =
        ImageDigest::of_reader(std::fs::File::open(&image_path).expect("open")).expect("hash");
    let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
    let layout = BlobLayout::new(info.blake3, info.size);

    // The serving agent holds the release complete, with its outboard beside the slot.
    let serving_dir = dir.path().join("serving");
    std::fs::create_dir_all(&serving_dir).expect("dir");
    let paths = SlotPaths::beside(&image_path, &serving_dir);
    OutboardStore::new(layout, FileDevice::open_or_create(&paths.outboard).expect("outboard"))
        .compute_from(std::fs::File::open(&image_path).expect("open"))
        .expect("outboard");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (ours, rss) = runtime.block_on(async {
        let serving = LanNodeForAgent::bind_loopback(
            &SecretKey::generate().expect("rng"),
            "s",
            Default::default(),
        )
        .await
        .expect("bind");
        serving.serve_installed(&info, image_path.clone(), serving_dir.clone());

        let key = SecretKey::generate().expect("rng");
        let fetching =
            LanNodeForAgent::bind_loopback(&key, "s", Default::default()).await.expect("bind");
        // The server's announcements (have-map, iroh address) come over the control plane.
        fetching.site.dial(&serving.site.addresses()[0]).expect("dial");
        let slot = dir.path().join("slot-b.img");
        // A slot is a partition whose blocks exist: fill the file with zeros first.
        write_zeros(&slot, len);
        let joined = fetching.join(&info, slot.clone(), dir.path().to_owned());
        let writer = SlotWriter::open_paths(Slot::B, &info, &SlotPaths::beside(&slot, dir.path()))
            .expect("writer");
        let stats = Arc::new(Mutex::new(TransferStats::default()));
        let swarm = Swarm::new(
            PeerId(*key.public().as_bytes()),
            writer,
            None,
            Some(joined.fetcher),
            joined.news,
            joined.announce,
            stats,
            |c| {
                c.discovery_grace = Duration::ZERO;
                c.max_requests_per_peer = 8;
            },
        );
        let rss_before = peak_rss_bytes().unwrap_or(0);
        let started = Instant::now();
        let writer = swarm.run().await.expect("transfer");
        let elapsed = started.elapsed();
        let rss = peak_rss_bytes().unwrap_or(0);
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .expect("join")
            .expect("slot verifies");
        (elapsed, (rss_before, rss))
    });

    let mib = len >> 20;
    println!("{mib} MiB from one agent to another over loopback");
    let Some(nginx) = sitecast_benches::nginx(dir.path(), &image_path) else {
        println!("  nginx not installed: no baseline (apt install nginx-light)");
        println!(
            "  ours: iroh, verified, written to the slot   {:>7.0} MiB/s",
            mib_per_s(len, ours)
        );
        return;
    };
    let url = format!("{}/image.raw", nginx.url);
    let to_null = (0..3).map(|_| curl(&url, Path::new("/dev/null"))).min().expect("runs");
    let to_file =
        (0..3).map(|_| curl(&url, &dir.path().join("curl-copy.img"))).min().expect("runs");
    let row = |name: &str, time: Duration| {
        println!(
            "  {name:<46} {:>7.0} MiB/s  ÷ nginx→curl→file {:.2}  ÷ nginx→curl→/dev/null {:.2}",
            mib_per_s(len, time),
            to_file.as_secs_f64() / time.as_secs_f64(),
            to_null.as_secs_f64() / time.as_secs_f64()
        );
    };
    row("baseline: nginx + curl to a file", to_file);
    row("baseline: nginx + curl to /dev/null", to_null);
    row("ours: iroh, every group verified, into the slot", ours);
    println!(
        "  peak RSS of this process (both agents): {:.1} MiB (before the transfer {:.1} MiB)",
        rss.1 as f64 / 1048576.0,
        rss.0 as f64 / 1048576.0
    );
}

fn write_zeros(path: &Path, len: u64) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("slot");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..len.div_ceil(1 << 20) {
        file.write_all(&zeros).expect("zero");
    }
    file.sync_all().expect("sync");
}
