//! Image hashing as the signing tool does it, against plain `blake3` on the same bytes.
//!
//! `cargo bench -p sitecast-benches --bench hashing` (size: `SITECAST_BENCH_MIB`, default 1024).

use std::fs::File;

use sha2::{Digest, Sha256};
use sitecast_benches::{bench_bytes, best_of, mib_per_s, write_test_image};
use sitecast_manifest::{ImageDigest, blake3_of_reader};

const RUNS: usize = 3;

fn main() {
    let len = bench_bytes(1024);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("image.raw");
    write_test_image(&path, len).expect("write test image");
    let bytes = std::fs::read(&path).expect("read image (also warms the page cache)");

    let (plain, plain_hash) = best_of(RUNS, || blake3::Hasher::new().update(&bytes).finalize());
    let (rayon, rayon_hash) =
        best_of(RUNS, || blake3::Hasher::new().update_rayon(&bytes).finalize());
    let (sha, _) = best_of(RUNS, || Sha256::digest(&bytes));
    let (ours_b3, (_, ours_hash)) =
        best_of(RUNS, || blake3_of_reader(File::open(&path).expect("open")).expect("hash"));
    let (ours_sign, digest) =
        best_of(RUNS, || ImageDigest::of_reader(File::open(&path).expect("open")).expect("hash"));
    assert_eq!(plain_hash, rayon_hash);
    assert_eq!(ours_hash, plain_hash.into());
    assert_eq!(digest.blake3, plain_hash.into());

    let mib = len / (1024 * 1024);
    println!("hashing {mib} MiB, best of {RUNS} (page cache warm)");
    let row = |name: &str, time: std::time::Duration| {
        println!(
            "  {name:<46} {:>8.0} MiB/s  ratio {:.2}",
            mib_per_s(len, time),
            plain.as_secs_f64() / time.as_secs_f64()
        );
    };
    row("baseline: plain blake3, 1 thread, in memory", plain);
    row("plain blake3, all cores (rayon)", rayon);
    row("plain sha256, 1 thread, in memory", sha);
    row("ours: blob hash from the file (blake3)", ours_b3);
    row("ours: `sign` digest from the file (b3 + sha256)", ours_sign);
}
