//! Updates that copy from the active slot, on a real pair of root file systems (issue 15):
//! what crosses the WAN against a binary patch for the exact pair (`xdelta3 -9`,
//! `zstd --patch-from`), casync's missing chunks and the whole image; and the copy from the
//! active slot against plain BLAKE3 of the new image, with its memory.
//!
//! `cargo bench -p sitecast-benches --bench delta`. The pair is Debian bookworm minbase and
//! the same plus curl and less, as squashfs with zstd, gzip and no compression, built by
//! `benches/debian-pair` (cached in `target/debian-pair`; needs root and deb.debian.org) or
//! taken from `SITECAST_DEBIAN_PAIR`. The tools compared with are Debian's `xdelta3`, `zstd`
//! and `casync`; a missing one is skipped.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use sitecast_benches::{best_of, mib_per_s, peak_rss_bytes};
use sitecast_delta::{Chunking, GROUP_BYTES};
use sitecast_iso::{BlobLayout, Device, FileDevice, OutboardStore, Slot, SlotPaths, SlotWriter};
use sitecast_manifest::{ImageDigest, ImageInfo};

const KINDS: [&str; 3] = ["zstd", "gzip", "none"];
/// What Central Command compresses compressible ranges with (`zstd` level 3).
const WIRE_LEVEL: i32 = 3;

fn main() {
    let pair = pair_dir();
    let scratch = tempfile::tempdir().expect("tempdir");
    println!("delta updates on Debian bookworm minbase → + curl, less ({})", pair.display());
    for kind in KINDS {
        let (old, new) = (pair.join(format!("a-{kind}.sqfs")), pair.join(format!("b-{kind}.sqfs")));
        if !new.exists() {
            println!("squashfs {kind}: not built, skipped");
            continue;
        }
        let dir = scratch.path().join(kind);
        std::fs::create_dir_all(&dir).expect("scratch");
        compare(kind, &old, &new, &dir);
    }
    active_slot_map();
}

/// The map an appliance keeps of its active slot's chunks, for a slot of
/// `SITECAST_BENCH_MIB` (default 4096) MiB of incompressible bytes, streamed: its peak
/// memory against the 64 MiB an agent may use in all.
fn active_slot_map() {
    let len = sitecast_benches::bench_bytes(4096);
    reset_peak_rss();
    let before = peak_rss_bytes().unwrap_or(0);
    let started = Instant::now();
    let slot = blake3::Hasher::new_derive_key("active slot").finalize_xof().take(len);
    let older = sitecast_delta::reuse::OlderImage::read(
        BufReader::with_capacity(1 << 20, slot),
        Chunking::default(),
    )
    .expect("read");
    let took = started.elapsed();
    let peak = peak_rss_bytes().unwrap_or(0);
    println!(
        "map of a {} MiB active slot: {} MiB/s; peak RSS {:.1} MiB (before {:.1} MiB)",
        len >> 20,
        mib_per_s(older.bytes(), took) as u64,
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0
    );
}

fn pair_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SITECAST_DEBIAN_PAIR") {
        return dir.into();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = repo.join("target/debian-pair");
    let status = Command::new(repo.join("benches/debian-pair")).arg(&dir).status();
    assert!(status.is_ok_and(|s| s.success()), "benches/debian-pair failed");
    dir
}

fn compare(kind: &str, old: &Path, new: &Path, dir: &Path) {
    let whole = std::fs::metadata(new).expect("new").len();
    let chunking = Chunking::default();
    let (old_chunks, new_chunks) = (chunks_of(old, chunking), chunks_of(new, chunking));
    let estimate = sitecast_delta::estimate(&old_chunks, &new_chunks);

    // What the agent needs besides the bytes, once per site: the index, and the group hashes
    // it rebuilds the outboard from.
    let index = dir.join("index");
    sitecast_delta::index::write(File::open(new).expect("open"), chunking, {
        File::create(&index).expect("index")
    })
    .expect("index");
    let index_bytes = std::fs::metadata(&index).expect("index").len();
    let digest = ImageDigest::of_reader(File::open(new).expect("open")).expect("hash");
    let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
    let layout = BlobLayout::new(info.blake3, info.size);
    let outboard_path = dir.join("new.obao4");
    let mut outboard =
        OutboardStore::new(layout, FileDevice::open_or_create(&outboard_path).expect("outboard"));
    outboard.compute_from(File::open(new).expect("open")).expect("outboard");
    let side = index_bytes + layout.group_hashes_len();

    // What is missing as it would cross the WAN: compressed only if Central Command would
    // compress this image (one stream here; one a request on the wire).
    let compresses = sitecast_coordinator::wire::compresses(
        &FileDevice::open_read_only(new).expect("open"),
        whole,
    )
    .expect("sample");
    let as_sent = |path: PathBuf| match compresses {
        true => zstd_size(&path),
        false => std::fs::metadata(&path).expect("missing").len(),
    };
    let lacking = chunks_lacking(&old_chunks, &new_chunks);
    let groups = bytes_of(&groups_touched(&lacking, whole), new, dir, "missing-groups");
    let groups_plain = std::fs::metadata(&groups).expect("groups").len();
    let groups_wire = as_sent(groups);
    let chunks_wire = as_sent(bytes_of(&lacking, new, dir, "missing-chunks"));

    let xdelta3 = tool_output(dir, "xdelta3", |out| {
        Command::new("xdelta3").args(["-9", "-e", "-f", "-s"]).arg(old).arg(new).arg(out).status()
    });
    let zstd_patch = tool_output(dir, "zstd", |out| {
        Command::new("zstd")
            .args(["-q", "-f", "-19", "--long=27"])
            .arg(format!("--patch-from={}", old.display()))
            .arg(new)
            .arg("-o")
            .arg(out)
            .stderr(Stdio::null())
            .status()
    });
    let casync = casync_missing(old, new, dir);

    println!("squashfs {kind}: {whole} bytes (was {})", std::fs::metadata(old).expect("old").len());
    let baseline = xdelta3.unwrap_or(whole);
    let row = |name: &str, bytes: Option<u64>| match bytes {
        Some(bytes) => println!(
            "  {name:<58} {:>11} bytes  {:>5.1} % of the image  ÷ xdelta3 {:.2}",
            bytes,
            100.0 * bytes as f64 / whole as f64,
            bytes as f64 / baseline as f64
        ),
        None => println!("  {name:<58} (tool not installed)"),
    };
    row("whole image", Some(whole));
    row("xdelta3 -9 patch for this exact pair", xdelta3);
    row("zstd -19 --patch-from patch for this exact pair", zstd_patch);
    row("casync, default chunks missing from the old image (compressed)", casync);
    let sent = match compresses {
        true => format!("as sent (zstd -{WIRE_LEVEL})"),
        false => "as sent (does not compress)".to_owned(),
    };
    row("ours: missing 4 KiB chunks, raw", Some(estimate.missing_bytes));
    row(&format!("ours: missing 4 KiB chunks, {sent}"), Some(chunks_wire));
    row(
        &format!("ours: ... + index and group hashes (once per site: {side} bytes)"),
        Some(chunks_wire + side),
    );
    let referenced = with_reference(old, new, &old_chunks, &new_chunks);
    row("ours: missing chunks, zstd -9 against the old image nearby", Some(referenced));
    row("  ... + index and group hashes", Some(referenced + side));
    row("ours: whole 16 KiB groups touched, raw", Some(groups_plain));
    row(&format!("ours: whole 16 KiB groups touched, {sent}"), Some(groups_wire));

    // The chunk size: what is left to fetch against the index it takes (12 bytes a chunk),
    // with missing chunks as they are and compressed against the old image nearby.
    println!(
        "  chunk size (average): missing chunks + index, missing 16 KiB groups + index, \
         missing chunks against the old image nearby + index"
    );
    for kib in [1, 2, 4, 8, 16, 32] {
        let chunking = Chunking::around(kib * 1024);
        let (old_chunks, new_chunks) = (chunks_of(old, chunking), chunks_of(new, chunking));
        let estimate = sitecast_delta::estimate(&old_chunks, &new_chunks);
        let referenced = with_reference(old, new, &old_chunks, &new_chunks);
        let index = 24 + 12 * new_chunks.len() as u64;
        println!(
            "    {kib:>2} KiB: {:>9} + {index:>7} = {:>9} bytes   {:>9} + {index:>7} = {:>9} bytes   \
             {referenced:>9} + {index:>7} = {:>9} bytes",
            estimate.missing_bytes,
            estimate.missing_bytes + index,
            estimate.missing_group_bytes,
            estimate.missing_group_bytes + index,
            referenced + index,
        );
    }

    // The copy from the active slot into the standby slot, verified, against BLAKE3.
    let slot = dir.join("slot-b.img");
    File::create(&slot).expect("slot").set_len(whole).expect("size");
    let mut writer =
        SlotWriter::open_paths(Slot::B, &info, &SlotPaths::beside(&slot, dir)).expect("writer");
    reset_peak_rss();
    let rss_before = peak_rss_bytes().unwrap_or(0);
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let (reused, _) = sitecast_peer::reuse::copy_from_active(
        &mut writer,
        &outboard,
        &index,
        old,
        None,
        &stop,
        &mut |_| {},
    )
    .expect("copy");
    let copy = started.elapsed();
    let rss = peak_rss_bytes().unwrap_or(0);
    let (plain, _) = best_of(3, || {
        blake3::Hasher::new()
            .update_reader(File::open(new).expect("open"))
            .expect("read")
            .finalize()
    });
    println!(
        "  copy from the active slot: {} of {} groups ({:.1} %), {:.0} MiB/s of the new image, \
         ÷ blake3 {:.2}; peak RSS {:.1} MiB (before {:.1} MiB)",
        reused.groups,
        layout.groups(),
        100.0 * reused.groups as f64 / layout.groups() as f64,
        mib_per_s(whole, copy),
        plain.as_secs_f64() / copy.as_secs_f64(),
        rss as f64 / 1048576.0,
        rss_before as f64 / 1048576.0,
    );
}

/// What Central Command sends against the older release (docs/delta.md): the new image in
/// blocks of 1 MiB (as a request for a large piece's missing span would be), each block's
/// missing chunks compressed (zstd -9, one frame a block) against the stretch of the old
/// image that the agent names ([`SharedRuns::reference`]), which both ends hold, so that
/// short strings inside a changed chunk are found as a binary patch finds them.
fn with_reference(
    old: &Path,
    new: &Path,
    old_chunks: &[sitecast_delta::Chunk],
    new_chunks: &[sitecast_delta::Chunk],
) -> u64 {
    use sitecast_delta::reference::{MAX_REFERENCE, SharedRuns};
    const BLOCK: u64 = 1 << 20;
    // The agent decodes with a window of at most 8 MiB (`peer/src/swarm.rs`).
    const WINDOW_LOG: u32 = 23;
    const _: () = assert!(MAX_REFERENCE + BLOCK <= 1 << WINDOW_LOG);
    let (old, new) = (std::fs::read(old).expect("old"), std::fs::read(new).expect("new"));
    // A chunk the old image holds more than once (zeros, padding) is taken where it first is.
    let mut at_in_old = std::collections::HashMap::new();
    for chunk in old_chunks {
        at_in_old.entry(chunk.hash).or_insert(chunk.offset);
    }
    let mut runs = SharedRuns::new(old.len() as u64);
    for chunk in new_chunks {
        if let Some(&at) = at_in_old.get(&chunk.hash) {
            runs.push(chunk.offset, at, u64::from(chunk.len));
        }
    }
    let mut sent = 0;
    for block in (0..new.len() as u64).step_by(BLOCK as usize) {
        let bytes = block..(block + BLOCK).min(new.len() as u64);
        let first = new_chunks.partition_point(|c| c.bytes().end <= bytes.start);
        let mut missing = Vec::new();
        for chunk in new_chunks[first..].iter().take_while(|c| c.offset < bytes.end) {
            if !at_in_old.contains_key(&chunk.hash) {
                let range = chunk.offset.max(bytes.start)..chunk.bytes().end.min(bytes.end);
                missing.extend_from_slice(&new[range.start as usize..range.end as usize]);
            }
        }
        if missing.is_empty() {
            continue;
        }
        let reference = runs.reference(bytes).unwrap_or(0..0);
        let reference = &old[reference.start as usize..reference.end as usize];
        let mut encoder =
            zstd::stream::write::Encoder::with_ref_prefix(CountingSink(0), 9, reference)
                .expect("zstd");
        encoder.set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG)).expect("window");
        encoder.write_all(&missing).expect("compress");
        sent += encoder.finish().expect("finish").0;
    }
    sent
}

/// The chunks of the image at `path`.
fn chunks_of(path: &Path, chunking: Chunking) -> Vec<sitecast_delta::Chunk> {
    let reader = BufReader::new(File::open(path).expect("open"));
    sitecast_delta::chunks(reader, chunking).expect("chunks")
}

/// The byte ranges of the new image's chunks that the old one lacks, ascending.
fn chunks_lacking(old: &[sitecast_delta::Chunk], new: &[sitecast_delta::Chunk]) -> Vec<Range<u64>> {
    let have: std::collections::HashSet<_> = old.iter().map(|c| c.hash).collect();
    new.iter().filter(|c| !have.contains(&c.hash)).map(|c| c.bytes()).collect()
}

/// The 16 KiB groups of an image of `len` bytes that `ranges` touch, as byte ranges.
fn groups_touched(ranges: &[Range<u64>], len: u64) -> Vec<Range<u64>> {
    let mut groups: Vec<u64> = ranges
        .iter()
        .flat_map(|bytes| bytes.start / GROUP_BYTES..bytes.end.div_ceil(GROUP_BYTES))
        .collect();
    groups.dedup();
    groups.iter().map(|g| g * GROUP_BYTES..((g + 1) * GROUP_BYTES).min(len)).collect()
}

/// Writes `ranges` of `image`, in order, to the file `name` in `dir`; its path.
fn bytes_of(ranges: &[Range<u64>], image: &Path, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut out = std::io::BufWriter::new(File::create(&path).expect("missing"));
    let source = FileDevice::open_read_only(image).expect("open");
    for range in ranges {
        let mut buf = vec![0; (range.end - range.start) as usize];
        source.read_exact_at(range.start, &mut buf).expect("read");
        out.write_all(&buf).expect("write");
    }
    out.flush().expect("flush");
    path
}

fn zstd_size(path: &Path) -> u64 {
    let mut encoder = zstd::stream::Encoder::new(CountingSink(0), WIRE_LEVEL).expect("zstd");
    std::io::copy(&mut File::open(path).expect("open"), &mut encoder).expect("compress");
    encoder.finish().expect("finish").0
}

struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of what `run` writes to a file, if the tool is there and succeeds.
fn tool_output(
    dir: &Path,
    tool: &str,
    run: impl FnOnce(&Path) -> std::io::Result<std::process::ExitStatus>,
) -> Option<u64> {
    let out = dir.join(format!("{tool}.patch"));
    match run(&out) {
        Ok(status) if status.success() => Some(std::fs::metadata(&out).ok()?.len()),
        _ => None,
    }
}

/// casync's chunks of the new image missing from a store of the old one's, as stored
/// (compressed): what a casync client would download.
fn casync_missing(old: &Path, new: &Path, dir: &Path) -> Option<u64> {
    let make = |image: &Path, store: &str| {
        Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", dir.join(store).display()))
            .arg(dir.join(format!("{store}.caibx")))
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
    };
    make(old, "store-old")?;
    make(new, "store-new")?;
    let chunks = |store: &str| -> std::collections::HashMap<std::ffi::OsString, u64> {
        walk(&dir.join(store)).into_iter().collect()
    };
    let have = chunks("store-old");
    Some(
        chunks("store-new")
            .into_iter()
            .filter(|(n, _)| !have.contains_key(n))
            .map(|(_, l)| l)
            .sum(),
    )
}

/// Every file under `dir` (name and length).
fn walk(dir: &Path) -> Vec<(std::ffi::OsString, u64)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push((entry.file_name(), meta.len()));
        }
    }
    files
}

/// Resets this process's peak RSS (`VmHWM`), so each pair's copy is measured alone.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
