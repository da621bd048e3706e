//! Where the bytes of a new image's groups can be copied from in an older image.
//!
//! [`OlderImage`] is the older image cut into chunks the same way as the new one, as a map
//! from chunk key to where the chunk sits. [`GroupPlanner`] takes the new image's chunks in
//! order (from its [index](crate::index)) and yields a [`GroupCopy`] for each 16 KiB group
//! with bytes in chunks the older image has: `whole` when every byte of it is there (the
//! group can be copied outright), else the parts there are (the rest to fetch, then the
//! group assembled from both). Nothing here is trusted: a copied
//! group is written only once it verifies against the new image's root, so a key clash or a
//! damaged older image costs a fetch, never a wrong byte.

use std::io::{self, Read};

use crate::index::{IndexEntry, IndexError};
use crate::{Chunk, ChunkKey, Chunking, GROUP_BYTES, for_each_chunk};

/// The chunks of an older image (an appliance's active slot), by hash: a sorted list of
/// (key, offset), 16 bytes a chunk (13 MiB for 4 GiB at 4 KiB chunks; a hash map took twice
/// that and more while it grew).
#[derive(Debug, Default)]
pub struct OlderImage {
    chunks: Vec<(u64, u64)>,
    bytes: u64,
}

impl OlderImage {
    /// Cuts what `reader` yields (streamed) the way the new image was cut.
    pub fn read(reader: impl Read, chunking: Chunking) -> io::Result<Self> {
        let mut older = Self::default();
        for_each_chunk(reader, chunking, |chunk| {
            older.insert(&chunk);
            Ok(())
        })?;
        older.sort();
        Ok(older)
    }

    /// The older image's chunks as its content index lists them (Central Command, which
    /// holds both releases' indexes, plans updates between them this way).
    pub fn from_index(
        entries: impl Iterator<Item = Result<IndexEntry, IndexError>>,
    ) -> Result<Self, IndexError> {
        let mut older = Self::default();
        for entry in entries {
            let entry = entry?;
            older.chunks.push((entry.key.0, entry.offset));
            older.bytes = older.bytes.max(entry.offset + u64::from(entry.len));
        }
        older.sort();
        Ok(older)
    }

    fn insert(&mut self, chunk: &Chunk) {
        self.chunks.push((chunk.key().0, chunk.offset));
        self.bytes = self.bytes.max(chunk.bytes().end);
    }

    /// By key, and of chunks with the same key the first in the image (sorting in place:
    /// no second copy of the list).
    fn sort(&mut self) {
        self.chunks.sort_unstable();
        self.chunks.dedup_by_key(|(key, _)| *key);
        self.chunks.shrink_to_fit();
    }

    /// Where a chunk with this key starts in the older image, if it has one.
    pub fn find(&self, key: ChunkKey) -> Option<u64> {
        let at = self.chunks.binary_search_by_key(&key.0, |&(key, _)| key).ok()?;
        Some(self.chunks[at].1)
    }

    /// Bytes read from the older image.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Bytes to copy from the older image: `len` bytes from `from`, to `at` in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub at: u32,
    pub from: u64,
    pub len: u32,
}

/// What the older image holds of a group of the new image: its spans, in order; `whole`
/// when they cover the group exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCopy {
    pub group: u64,
    pub spans: Vec<Span>,
    pub whole: bool,
}

impl GroupCopy {
    pub fn len(&self) -> u64 {
        self.spans.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The bytes of the group (`group_len` long) that no span covers, in order.
    pub fn missing(&self, group_len: u32) -> Vec<std::ops::Range<u32>> {
        missing(&self.spans, group_len)
    }
}

/// The bytes of a group (`group_len` long) that none of `spans` (in order) covers, in order.
pub fn missing(spans: &[Span], group_len: u32) -> Vec<std::ops::Range<u32>> {
    let mut missing = Vec::new();
    let mut at = 0;
    for span in spans {
        if span.at > at {
            missing.push(at..span.at);
        }
        at = span.at + span.len;
    }
    if at < group_len {
        missing.push(at..group_len);
    }
    missing
}

/// Walks the new image's chunks in order and says which groups the older image can fill.
#[derive(Debug)]
pub struct GroupPlanner<'o> {
    older: &'o OlderImage,
    size: u64,
    /// The group being assembled, the bytes of it placed so far, and whether all came from
    /// the older image.
    group: u64,
    placed: u64,
    spans: Vec<Span>,
    whole: bool,
}

impl<'o> GroupPlanner<'o> {
    /// A planner for a new image of `size` bytes.
    pub fn new(older: &'o OlderImage, size: u64) -> Self {
        Self { older, size, group: 0, placed: 0, spans: Vec::new(), whole: true }
    }

    fn group_len(&self) -> u64 {
        GROUP_BYTES.min(self.size - self.group * GROUP_BYTES)
    }

    /// The next chunk of the new image (chunks must come in order, without gaps); the groups
    /// it completes that the older image holds bytes of, in order.
    pub fn push(&mut self, chunk: &IndexEntry) -> Vec<GroupCopy> {
        debug_assert_eq!(chunk.offset, self.group * GROUP_BYTES + self.placed, "chunks in order");
        let source = self.older.find(chunk.key);
        let mut done = Vec::new();
        let mut left = u64::from(chunk.len);
        let mut from = source;
        while left > 0 && self.group * GROUP_BYTES < self.size {
            let take = left.min(self.group_len() - self.placed);
            match from {
                Some(source) => {
                    let span = Span { at: self.placed as u32, from: source, len: take as u32 };
                    // Adjacent bytes in both images make one span.
                    match self.spans.last_mut() {
                        Some(last)
                            if last.from + u64::from(last.len) == source
                                && last.at + last.len == span.at =>
                        {
                            last.len += span.len
                        }
                        _ => self.spans.push(span),
                    }
                    from = Some(source + take);
                }
                None => self.whole = false,
            }
            self.placed += take;
            left -= take;
            if self.placed == self.group_len() {
                let spans = std::mem::take(&mut self.spans);
                if !spans.is_empty() {
                    done.push(GroupCopy { group: self.group, spans, whole: self.whole });
                }
                self.group += 1;
                self.placed = 0;
                self.whole = true;
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, len: u32, id: u8) -> Chunk {
        Chunk { offset, len, hash: [id; 32] }
    }

    fn entry(offset: u64, len: u32, id: u8) -> IndexEntry {
        IndexEntry::from(&chunk(offset, len, id))
    }

    #[test]
    fn the_first_of_chunks_with_the_same_key_is_found() {
        let mut older = OlderImage::default();
        older.insert(&chunk(50_000, 100, 7));
        older.insert(&chunk(10, 100, 3));
        older.insert(&chunk(200, 100, 7));
        older.sort();
        assert_eq!(older.find(ChunkKey(u64::from_le_bytes([7; 8]))), Some(200));
        assert_eq!(older.find(ChunkKey(u64::from_le_bytes([3; 8]))), Some(10));
        assert_eq!(older.find(ChunkKey(u64::from_le_bytes([9; 8]))), None);
        assert_eq!(older.bytes(), 50_100);
    }

    #[test]
    fn a_chunk_across_a_group_boundary_fills_both_groups_with_their_part() {
        let mut older = OlderImage::default();
        older.insert(&chunk(100_000, 20_000, 1));
        older.insert(&chunk(120_000, 12_768, 2));
        older.sort();
        // New image: 32 KiB = two groups; chunk 1 (20,000 B) then chunk 2 (12,768 B).
        let mut planner = GroupPlanner::new(&older, 32_768);
        let first = planner.push(&entry(0, 20_000, 1));
        assert_eq!(
            first,
            vec![GroupCopy {
                group: 0,
                spans: vec![Span { at: 0, from: 100_000, len: 16_384 }],
                whole: true
            }]
        );
        let second = planner.push(&entry(20_000, 12_768, 2));
        // Group 1: the rest of chunk 1 and all of chunk 2, adjacent in the older image.
        assert_eq!(
            second,
            vec![GroupCopy {
                group: 1,
                spans: vec![Span { at: 0, from: 116_384, len: 16_384 }],
                whole: true
            }]
        );
    }

    #[test]
    fn a_group_with_one_missing_byte_is_not_copied() {
        let mut older = OlderImage::default();
        older.insert(&chunk(0, 16_000, 1));
        older.sort();
        let mut planner = GroupPlanner::new(&older, 16_384 + 10);
        assert!(planner.push(&entry(0, 16_000, 1)).is_empty(), "group 0 is not complete yet");
        // 384 bytes the older image lacks end group 0; 10 it has make the short last group.
        let partly = planner.push(&entry(16_000, 384, 9));
        let expected =
            GroupCopy { group: 0, spans: vec![Span { at: 0, from: 0, len: 16_000 }], whole: false };
        assert_eq!(partly, vec![expected.clone()], "group 0 lacks 384 bytes");
        assert_eq!(expected.missing(16_384), vec![16_000..16_384]);
        let last = planner.push(&entry(16_384, 10, 1));
        let whole =
            GroupCopy { group: 1, spans: vec![Span { at: 0, from: 0, len: 10 }], whole: true };
        assert_eq!(last, vec![whole]);
    }

    #[test]
    fn what_a_group_lacks_lies_between_and_around_its_spans() {
        let copy = GroupCopy {
            group: 3,
            spans: vec![Span { at: 100, from: 9, len: 50 }, Span { at: 200, from: 999, len: 20 }],
            whole: false,
        };
        assert_eq!(copy.missing(1000), vec![0..100, 150..200, 220..1000]);
        assert_eq!(copy.len(), 70);
    }
}
