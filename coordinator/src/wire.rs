//! Compression on the wire. Verified ranges of a blob whose bytes compress (an uncompressed
//! or ext4 image, not a compressed squashfs) are sent as one zstd stream to a client that
//! says it takes one (`Accept-Encoding: zstd`); the client decompresses and then verifies
//! every group as before, so compression changes what crosses the WAN, never what is
//! trusted. A client that does not ask (an older agent, `curl`) gets the bytes as they are.
//!
//! Whether a blob compresses is measured once, on samples spread over it: compressing
//! bytes that are already compressed costs Central Command's CPU for nothing.

use std::io;

use sitecast_iso::{Device, FileDevice};

/// zstd's default level: about 1 % less than level 19 on uncompressed file systems'
/// changed groups, at hundreds of MiB/s a core instead of a few.
pub const LEVEL: i32 = 3;

/// Samples taken, and their size.
const SAMPLES: u64 = 16;
const SAMPLE_BYTES: u64 = 64 * 1024;
/// Compressed samples at most this share of their size: worth compressing.
const PAYS_BELOW: f64 = 0.9;

/// Whether an `Accept-Encoding` value (RFC 9110 §12.5.3) accepts `zstd`: named, or `*`, with
/// a weight above 0.
pub fn accepts_zstd(accept_encoding: Option<&str>) -> bool {
    let Some(value) = accept_encoding else { return false };
    let mut zstd = None;
    let mut any = None;
    for item in value.split(',') {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("").to_ascii_lowercase();
        let weight = parts
            .find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .map_or(Some(1.0), |q| q.trim().parse::<f64>().ok());
        let acceptable = weight.is_some_and(|q| q > 0.0);
        match coding.as_str() {
            "zstd" => zstd = Some(acceptable),
            "*" => any = Some(acceptable),
            _ => {}
        }
    }
    // A coding named outright wins over `*`.
    zstd.or(any).unwrap_or(false)
}

/// Whether the blob in `data` (`size` bytes) compresses enough to send compressed: zstd on
/// samples spread over it. Blocking: file reads and compression.
pub fn compresses(data: &FileDevice, size: u64) -> io::Result<bool> {
    let mut sample = vec![0; SAMPLE_BYTES.min(size) as usize];
    let (mut plain, mut compressed) = (0u64, 0u64);
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    // The first sample at the start, the last at the end.
    let stride = size.saturating_sub(sample.len() as u64) / (SAMPLES - 1);
    for i in 0..SAMPLES {
        let at = i * stride;
        data.read_exact_at(at, &mut sample)?;
        plain += sample.len() as u64;
        compressed += compressor.compress(&sample)?.len() as u64;
        if stride == 0 {
            break;
        }
    }
    Ok(plain > 0 && (compressed as f64) < PAYS_BELOW * plain as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_is_read_as_rfc_9110_has_it() {
        assert!(accepts_zstd(Some("zstd")));
        assert!(accepts_zstd(Some("gzip, ZSTD;q=0.5")));
        assert!(accepts_zstd(Some("*")));
        assert!(!accepts_zstd(None));
        assert!(!accepts_zstd(Some("gzip, br")));
        assert!(!accepts_zstd(Some("zstd;q=0")));
        assert!(!accepts_zstd(Some("*, zstd;q=0")));
        assert!(!accepts_zstd(Some("zstd;q=zero")));
        assert!(accepts_zstd(Some("identity;q=0, zstd")));
    }

    #[test]
    fn compressed_bytes_do_not_compress_and_plain_ones_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let noise = dir.path().join("noise");
        sitecast_iso::generate::write_image(&noise, 3 << 20, "wire test").expect("noise");
        let text = dir.path().join("text");
        let lines: String =
            (0..200_000).map(|i| format!("line {i} of a file system that compresses\n")).collect();
        std::fs::write(&text, lines).expect("text");
        let small = dir.path().join("small");
        std::fs::write(&small, vec![7u8; 1000]).expect("small");
        let compresses_at = |path: &std::path::Path| {
            let size = std::fs::metadata(path).expect("size").len();
            compresses(&FileDevice::open_read_only(path).expect("open"), size).expect("sample")
        };
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").expect("empty");
        let just_over = dir.path().join("just-over");
        std::fs::write(&just_over, vec![1u8; 64 * 1024 + 15]).expect("just over a sample");
        assert!(!compresses_at(&empty));
        assert!(compresses_at(&just_over));
        assert!(!compresses_at(&noise));
        assert!(compresses_at(&text));
        assert!(compresses_at(&small));
    }
}
