//! Generated images for the demo, the lab, tests and benchmarks: incompressible (so no layer
//! can cheat by compressing) and reproducible from a name (so two runs compare).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// Writes `len` bytes derived from `name` to `path` and syncs them.
pub fn write_image(path: &Path, len: u64, name: &str) -> io::Result<()> {
    let mut file = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut stream = blake3::Hasher::new_derive_key(name).finalize_xof();
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        stream.fill(&mut block);
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.into_inner()?.sync_all()
}
