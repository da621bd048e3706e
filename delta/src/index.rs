//! The content index of an image: how it was cut ([`Chunking`]) and each chunk's length and
//! BLAKE3 hash, in order. The signing tool makes it, the manifest signs its hash, Central
//! Command makes the same bytes again from the image it stores (and refuses a release whose
//! index differs), and appliances read it to find what their active slot already holds.
//!
//! Format (little-endian): the 8-byte magic `SCINDEX1`, then `min`, `avg`, `max` (u32 each)
//! and a reserved u32 (zero); then one entry per chunk, its length (u32) and [key](ChunkKey)
//! (the first 8 bytes of its BLAKE3). Offsets are the running sum of lengths; the lengths
//! add up to the image's size. 12 bytes a chunk, 0.3 % of the image at 4 KiB chunks.
//!
//! Eight bytes of hash are enough for what the index is for: it only proposes where bytes
//! may be found, and every group is verified against the signed root before it is written.
//! An accidental clash among a million chunks has odds of about 1 in 30 million, and costs
//! the group a fetch.

use std::io::{self, Read, Write};

use crate::{ChunkKey, Chunking, for_each_chunk};

const MAGIC: &[u8; 8] = b"SCINDEX1";
const HEADER_BYTES: usize = 24;
const ENTRY_BYTES: usize = 12;

/// Why an index cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("reading the index: {0}")]
    Io(#[from] io::Error),
    #[error("not a sitecast content index (no SCINDEX1 header)")]
    NotAnIndex,
    #[error("the index's chunking ({min}/{avg}/{max} bytes) is not one FastCDC accepts")]
    Chunking { min: u32, avg: u32, max: u32 },
    #[error("chunk {chunk} is {len} bytes, outside 1..={max}")]
    ChunkLength { chunk: u64, len: u32, max: u32 },
    #[error("the index covers {covered} bytes, the image is {size}")]
    Coverage { covered: u64, size: u64 },
}

impl Chunking {
    /// Whether FastCDC takes these sizes (it panics on others): `min` 64 B..1 MiB, `avg`
    /// 256 B..4 MiB, `max` 1 KiB..16 MiB, in that order.
    pub fn is_valid(&self) -> bool {
        use fastcdc::v2020::*;
        (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max
    }
}

/// Cuts what `image` yields into chunks and writes its index to `out`, streamed (memory: one
/// chunk); returns the number of chunks.
pub fn write(image: impl Read, chunking: Chunking, out: impl Write) -> io::Result<u64> {
    if !chunking.is_valid() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "chunk sizes FastCDC refuses"));
    }
    let mut out = io::BufWriter::new(out);
    out.write_all(MAGIC)?;
    for field in [chunking.min, chunking.avg, chunking.max, 0] {
        out.write_all(&field.to_le_bytes())?;
    }
    let mut count = 0;
    for_each_chunk(image, chunking, |chunk| {
        count += 1;
        out.write_all(&chunk.len.to_le_bytes())?;
        out.write_all(&chunk.key().0.to_le_bytes())
    })?;
    out.flush()?;
    Ok(count)
}

/// One chunk as the index has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub len: u32,
    pub key: ChunkKey,
}

impl From<&crate::Chunk> for IndexEntry {
    fn from(chunk: &crate::Chunk) -> Self {
        Self { offset: chunk.offset, len: chunk.len, key: chunk.key() }
    }
}

/// An index being read: its chunking, then its chunks one at a time, checked to tile an
/// image of `size` bytes exactly.
#[derive(Debug)]
pub struct IndexReader<R> {
    reader: io::BufReader<R>,
    chunking: Chunking,
    size: u64,
    offset: u64,
    read: u64,
    done: bool,
}

impl<R: Read> IndexReader<R> {
    /// Reads the header of the index of an image of `size` bytes.
    pub fn new(reader: R, size: u64) -> Result<Self, IndexError> {
        let mut reader = io::BufReader::with_capacity(64 * 1024, reader);
        let mut header = [0u8; HEADER_BYTES];
        match reader.read_exact(&mut header) {
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(IndexError::NotAnIndex);
            }
            other => other?,
        }
        if &header[..8] != MAGIC {
            return Err(IndexError::NotAnIndex);
        }
        let field = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        let chunking = Chunking { min: field(8), avg: field(12), max: field(16) };
        if !chunking.is_valid() {
            let Chunking { min, avg, max } = chunking;
            return Err(IndexError::Chunking { min, avg, max });
        }
        Ok(Self { reader, chunking, size, offset: 0, read: 0, done: false })
    }

    pub fn chunking(&self) -> Chunking {
        self.chunking
    }

    fn next_chunk(&mut self) -> Result<Option<IndexEntry>, IndexError> {
        let mut entry = [0u8; ENTRY_BYTES];
        let mut got = 0;
        while got < ENTRY_BYTES {
            match self.reader.read(&mut entry[got..])? {
                0 => break,
                n => got += n,
            }
        }
        if got < ENTRY_BYTES {
            // The end: it must fall on an entry's boundary and the image's.
            if got != 0 || self.offset != self.size {
                return Err(IndexError::Coverage { covered: self.offset, size: self.size });
            }
            return Ok(None);
        }
        let len = u32::from_le_bytes(entry[..4].try_into().expect("4"));
        if len == 0 || len > self.chunking.max {
            return Err(IndexError::ChunkLength { chunk: self.read, len, max: self.chunking.max });
        }
        let offset = self.offset;
        self.offset += u64::from(len);
        if self.offset > self.size {
            return Err(IndexError::Coverage { covered: self.offset, size: self.size });
        }
        self.read += 1;
        let key = ChunkKey(u64::from_le_bytes(entry[4..].try_into().expect("8")));
        Ok(Some(IndexEntry { offset, len, key }))
    }
}

impl<R: Read> Iterator for IndexReader<R> {
    type Item = Result<IndexEntry, IndexError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_chunk().transpose();
        if !matches!(next, Some(Ok(_))) {
            self.done = true;
        }
        next
    }
}
