//! What a new image shares with an older one, and so what an update from the older one costs.
//!
//! An image is cut into content-defined chunks (FastCDC 2020, [`Chunking`]): cut points
//! depend on the bytes around them, not on offsets, so data inserted, removed or moved in one
//! place leaves the chunks elsewhere as they were, wherever they now sit. Each chunk is named
//! by its BLAKE3 hash. A chunk of the new image whose hash the old image also has can be
//! copied from the appliance's active slot instead of fetched; [`estimate`] adds up what is
//! left, in chunks and in the 16 KiB groups that are the unit of verification (a group is
//! written only once all of it verifies, reused bytes and fetched ones alike).
//!
//! A release carries its image's chunk list as a [content index](index) (its hash signed in
//! the manifest); an appliance cuts its active slot the same way, and [`reuse`] says, group by
//! group, where in the active slot each byte of a group can be copied from.
//! What is left, mostly changed versions of nearby old bytes, is compressed against a
//! stretch of the older image that [`reference`] picks.
//!
//! Plain data in, plain data out: no files, no network. Memory is bounded by the chunks
//! (a map of the older image's, 16 bytes a chunk: 4 MiB for 1 GiB at 4 KiB chunks), never by
//! the image.

use std::collections::HashSet;
use std::io::{self, Read};
use std::ops::Range;

pub mod index;
pub mod plan;
pub mod reference;
pub mod reuse;

/// Bytes in a group, the unit of verification (`sitecast_iso::GROUP_BYTES`).
pub const GROUP_BYTES: u64 = 16 * 1024;

/// FastCDC's sizes: no cut before `min`, cuts likelier past `avg`, a forced cut at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Chunking {
    /// Chunks of about `avg` bytes, between a quarter and four times that (casync's ratios).
    pub fn around(avg: u32) -> Self {
        Self { min: avg / 4, avg, max: avg * 4 }
    }
}

/// 4 KiB chunks: on the squashfs pairs measured for this (issue 15), they leave about as
/// little to fetch as a binary patch for the exact pair, where casync's 64 KiB leave twice as
/// much; the chunk list stays under 1 % of the image.
impl Default for Chunking {
    fn default() -> Self {
        Self::around(4096)
    }
}

/// One chunk of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

/// A chunk's name in a content index: the first 8 bytes of its BLAKE3 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey(pub u64);

impl Chunk {
    pub fn key(&self) -> ChunkKey {
        ChunkKey(u64::from_le_bytes(self.hash[..8].try_into().expect("8 bytes")))
    }

    pub fn bytes(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }
}

/// The chunks of everything `reader` yields, in order (streamed: memory holds one chunk's
/// bytes at a time besides the list).
pub fn chunks(reader: impl Read, chunking: Chunking) -> io::Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    for_each_chunk(reader, chunking, |chunk| {
        chunks.push(chunk);
        Ok(())
    })?;
    Ok(chunks)
}

/// Hands each chunk of what `reader` yields to `each`, in order, keeping none.
pub fn for_each_chunk(
    reader: impl Read,
    chunking: Chunking,
    mut each: impl FnMut(Chunk) -> io::Result<()>,
) -> io::Result<()> {
    let cdc = fastcdc::v2020::StreamCDC::new(reader, chunking.min, chunking.avg, chunking.max);
    for chunk in cdc {
        let chunk = chunk.map_err(|error| match error {
            fastcdc::v2020::Error::IoError(error) => error,
            other => io::Error::other(other.to_string()),
        })?;
        let len = u32::try_from(chunk.length).map_err(io::Error::other)?;
        let hash = *blake3::hash(&chunk.data).as_bytes();
        each(Chunk { offset: chunk.offset, len, hash })?;
    }
    Ok(())
}

/// What an update from one image to another takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The new image's size.
    pub image_bytes: u64,
    pub chunks: u64,
    /// Bytes of the new image in chunks the old one also has.
    pub reused_bytes: u64,
    /// Bytes of the new image in chunks the old one lacks: what crosses the network when
    /// missing chunk ranges are fetched on their own.
    pub missing_bytes: u64,
    /// Groups of the new image, and those with at least one missing byte with their bytes:
    /// fetching whole groups, these cross the network.
    pub groups: u64,
    pub groups_missing: u64,
    pub missing_group_bytes: u64,
}

/// What updating from the image chunked as `old` to the one chunked as `new` costs.
pub fn estimate(old: &[Chunk], new: &[Chunk]) -> Estimate {
    let have: HashSet<&[u8; 32]> = old.iter().map(|c| &c.hash).collect();
    let image_bytes = new.last().map_or(0, |c| c.bytes().end);
    let groups = image_bytes.div_ceil(GROUP_BYTES);
    let (mut reused_bytes, mut missing_bytes) = (0, 0);
    let (mut groups_missing, mut missing_group_bytes) = (0, 0);
    // Chunks come in order, so the groups they touch do too: count each group once.
    let mut counted_up_to = 0;
    for chunk in new {
        if have.contains(&chunk.hash) {
            reused_bytes += u64::from(chunk.len);
            continue;
        }
        missing_bytes += u64::from(chunk.len);
        let bytes = chunk.bytes();
        let touched =
            (bytes.start / GROUP_BYTES).max(counted_up_to)..bytes.end.div_ceil(GROUP_BYTES);
        for group in touched.clone() {
            groups_missing += 1;
            missing_group_bytes += GROUP_BYTES.min(image_bytes - group * GROUP_BYTES);
        }
        counted_up_to = counted_up_to.max(touched.end);
    }
    Estimate {
        image_bytes,
        chunks: new.len() as u64,
        reused_bytes,
        missing_bytes,
        groups,
        groups_missing,
        missing_group_bytes,
    }
}
