//! Verify + write into a file slot, against plain `blake3` on the same bytes.
//!
//! `cargo bench -p sitecast-benches --bench slot_write` (size: `SITECAST_BENCH_MIB`, default
//! 1024). The response (the bao encoding of every group, as a peer or the origin sends it) is
//! made first and read from a file, so what is timed and measured is the appliance's side:
//! decode, verify every group, write it at its offset, checkpoint, read back.

use std::fs::File;
use std::io::{BufReader, Write};
use std::time::Instant;

use sitecast_benches::{bench_bytes, best_of, mib_per_s, peak_rss_bytes, write_test_image};
use sitecast_iso::{FileDevice, OutboardStore, ResponseDecoder, Slot, SlotPaths, SlotWriter};
use sitecast_manifest::{ImageDigest, ImageInfo};

fn main() {
    let len = bench_bytes(1024);
    let dir = tempfile::tempdir().expect("tempdir");
    let image_path = dir.path().join("image.raw");
    write_test_image(&image_path, len).expect("image");
    let digest = ImageDigest::of_reader(File::open(&image_path).expect("open")).expect("hash");
    let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
    let layout = sitecast_iso::BlobLayout::new(info.blake3, info.size);
    let mut origin_outboard = OutboardStore::new(
        layout,
        FileDevice::open_or_create(&dir.path().join("origin.obao4")).expect("ob"),
    );
    origin_outboard.compute_from(File::open(&image_path).expect("open")).expect("outboard");
    let origin_data = FileDevice::open(&image_path).expect("open");

    let slot_path = dir.path().join("slot-b.img");
    // A slot is a partition: its blocks exist before the update. Write it full of zeros so
    // the file behaves like one (no block allocation on each sync).
    {
        let mut slot = File::create(&slot_path).expect("slot");
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..len.div_ceil(1 << 20) {
            slot.write_all(&zeros).expect("zero");
        }
        slot.sync_all().expect("sync");
    }
    let paths = SlotPaths::beside(&slot_path, dir.path());

    // The response as it arrives from a peer or the origin, kept in a file so the writer's
    // memory is what an appliance would use.
    let response_path = dir.path().join("response.bao");
    let response = File::create(&response_path).expect("response");
    origin_outboard.encode_groups(&origin_data, 0..layout.groups(), response).expect("encode");
    let ranges = layout.chunk_ranges(0..layout.groups());

    let rss_before = peak_rss_bytes().unwrap_or(0);
    let started = Instant::now();
    let checkpoint_every =
        std::env::var("SITECAST_BENCH_CHECKPOINT").ok().and_then(|v| v.parse().ok());
    let mut writer = SlotWriter::open_paths(Slot::B, &info, &paths).expect("open slot");
    if let Some(groups) = checkpoint_every {
        writer = writer.with_checkpoint_every(groups);
    }
    let reader = BufReader::with_capacity(256 * 1024, File::open(&response_path).expect("open"));
    let decoder = ResponseDecoder::new(layout, &ranges, reader).expect("header");
    writer.ingest(decoder).expect("verified");
    writer.checkpoint().expect("durable");
    let ingest = started.elapsed();
    let verified = writer.finish().expect("read back");
    let total = started.elapsed();
    let rss = peak_rss_bytes().unwrap_or(0);
    drop(verified);

    let bytes = std::fs::read(&image_path).expect("read image");
    let (plain, _) = best_of(3, || blake3::Hasher::new().update(&bytes).finalize());
    // The disk's own speed for the same bytes: write them to a file and make them durable.
    let copy_path = dir.path().join("plain-copy.img");
    let (disk, _) = best_of(3, || {
        let mut file = File::create(&copy_path).expect("create");
        for block in bytes.chunks(1 << 20) {
            file.write_all(block).expect("write");
        }
        file.sync_data().expect("sync");
    });

    let mib = len / (1024 * 1024);
    println!("verify + write {mib} MiB into a file slot (response read from a file)");
    let row = |name: &str, time: std::time::Duration| {
        println!(
            "  {name:<54} {:>6.0} MiB/s  ÷ blake3 {:.2}  ÷ disk {:.2}",
            mib_per_s(len, time),
            plain.as_secs_f64() / time.as_secs_f64(),
            disk.as_secs_f64() / time.as_secs_f64()
        );
    };
    row("baseline: plain blake3, 1 thread, in memory", plain);
    row("plain write + fdatasync of the same bytes (the disk)", disk);
    row("ours: decode + verify + write + sync", ingest);
    row("ours: ... + read back (BLAKE3 + SHA-256)", total);
    println!(
        "  peak RSS while writing: {:.1} MiB (process before: {:.1} MiB)",
        rss as f64 / 1048576.0,
        rss_before as f64 / 1048576.0
    );
}
