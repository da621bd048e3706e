//! Hashing images in bounded memory: BLAKE3 and SHA-256 side by side.
//!
//! SHA-256 is several times slower than BLAKE3, so the two run on separate threads over the
//! same buffers: the wall time is that of the slower hash, not of both. Memory stays at
//! `BUFFERS × BUFFER_BYTES` whatever the image size.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use sha2::{Digest, Sha256};

use crate::error::ImageError;
use crate::hash::{Blake3Hash, Sha256Hash};
use crate::release::ImageInfo;

/// Large enough for BLAKE3's SIMD lanes, small enough to stay in cache.
const BUFFER_BYTES: usize = 256 * 1024;
/// Buffers in flight between the reader (which hashes BLAKE3) and the SHA-256 thread.
const BUFFERS: usize = 8;

/// Size and both digests of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDigest {
    pub size: u64,
    pub blake3: Blake3Hash,
    pub sha256: Sha256Hash,
}

impl ImageDigest {
    /// Reads `reader` to its end and hashes it.
    pub fn of_reader(reader: impl Read) -> io::Result<Self> {
        let mut reader = reader;
        let mut blake3 = blake3::Hasher::new();
        let mut size = 0u64;
        let (to_sha, from_reader) = sync_channel::<(Arc<Vec<u8>>, usize)>(BUFFERS);
        let (return_buffer, returned) = sync_channel::<Arc<Vec<u8>>>(BUFFERS);
        std::thread::scope(|scope| {
            let sha_thread = scope.spawn(move || {
                let mut sha = Sha256::new();
                for (buffer, len) in from_reader {
                    sha.update(&buffer[..len]);
                    // The reader may already be gone after an error; then the buffer just drops.
                    let _ = return_buffer.send(buffer);
                }
                Sha256Hash(sha.finalize().into())
            });
            let mut allocated = 0;
            let read_result = loop {
                let mut buffer = if allocated < BUFFERS {
                    allocated += 1;
                    Arc::new(vec![0u8; BUFFER_BYTES])
                } else {
                    returned.recv().expect("the SHA-256 thread returns every buffer")
                };
                let data = Arc::get_mut(&mut buffer).expect("a returned buffer has one owner");
                let len = match read_full(&mut reader, data) {
                    Ok(len) => len,
                    Err(error) => break Err(error),
                };
                if len == 0 {
                    break Ok(());
                }
                size += len as u64;
                blake3.update(&data[..len]);
                if to_sha.send((buffer, len)).is_err() {
                    unreachable!("the SHA-256 thread only stops when the channel closes");
                }
            };
            drop(to_sha);
            let sha256 = sha_thread.join().expect("SHA-256 thread does not panic");
            read_result.map(|()| Self { size, blake3: blake3.finalize().into(), sha256 })
        })
    }

    /// Hashes `reader` and checks it against `image`, reading at most one byte past the
    /// declared size: an endless or oversized image is refused without reading it all.
    pub fn check(reader: impl Read, image: &ImageInfo) -> Result<Self, ImageError> {
        let digest = Self::of_reader(reader.take(image.size.saturating_add(1)))?;
        digest.matches(image)?;
        Ok(digest)
    }

    /// Compares this digest with what a manifest declares.
    pub fn matches(&self, image: &ImageInfo) -> Result<(), ImageError> {
        if self.size > image.size {
            return Err(ImageError::TooLarge { declared: image.size });
        }
        if self.size < image.size {
            return Err(ImageError::TooShort { declared: image.size, actual: self.size });
        }
        if self.blake3 != image.blake3 {
            return Err(ImageError::Blake3Mismatch {
                expected: image.blake3.to_hex(),
                actual: self.blake3.to_hex(),
            });
        }
        if self.sha256 != image.sha256 {
            return Err(ImageError::Sha256Mismatch {
                expected: image.sha256.to_hex(),
                actual: self.sha256.to_hex(),
            });
        }
        Ok(())
    }
}

/// A writer that digests what goes through it: for a file made and hashed in one pass (a
/// content index), where the data is small and one thread does.
#[derive(Debug)]
pub struct DigestWriter<W> {
    out: W,
    blake3: blake3::Hasher,
    sha256: Sha256,
    size: u64,
}

impl<W: io::Write> DigestWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, blake3: blake3::Hasher::new(), sha256: Sha256::new(), size: 0 }
    }

    /// The writer and the digest of everything written.
    pub fn finish(self) -> (W, ImageDigest) {
        let digest = ImageDigest {
            size: self.size,
            blake3: self.blake3.finalize().into(),
            sha256: Sha256Hash(self.sha256.finalize().into()),
        };
        (self.out, digest)
    }
}

impl<W: io::Write> io::Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.blake3.update(&buf[..n]);
        self.sha256.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// BLAKE3 alone, streamed the same way: for callers that need only the blob hash.
pub fn blake3_of_reader(mut reader: impl Read) -> io::Result<(u64, Blake3Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let mut size = 0u64;
    loop {
        let len = read_full(&mut reader, &mut buffer)?;
        if len == 0 {
            return Ok((size, hasher.finalize().into()));
        }
        size += len as u64;
        hasher.update(&buffer[..len]);
    }
}

/// Fills `buffer` unless the reader ends first; returns how much was read.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8).collect()
    }

    #[test]
    fn matches_one_shot_hashes_at_buffer_boundaries() {
        for len in [0, 1, BUFFER_BYTES - 1, BUFFER_BYTES, BUFFER_BYTES * BUFFERS * 2 + 17] {
            let data = sample(len);
            let digest = ImageDigest::of_reader(&data[..]).expect("in-memory read");
            assert_eq!(digest.size, len as u64);
            assert_eq!(digest.blake3, blake3::hash(&data).into());
            assert_eq!(digest.sha256.0, <[u8; 32]>::from(Sha256::digest(&data)));
            assert_eq!(blake3_of_reader(&data[..]).expect("read").1, digest.blake3);
            let mut writer = DigestWriter::new(Vec::new());
            io::Write::write_all(&mut writer, &data).expect("in memory");
            let (written, written_digest) = writer.finish();
            assert_eq!((written, written_digest), (data, digest));
        }
    }

    #[test]
    fn a_read_error_is_reported_not_hashed_over() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk gone"));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
        }
        let error = ImageDigest::of_reader(Failing(3 * BUFFER_BYTES + 5)).expect_err("fails");
        assert_eq!(error.to_string(), "disk gone");
    }
}
