//! The blob layout of an image: a BLAKE3 bao tree with 16 KiB chunk groups, the layout
//! iroh-blobs uses, so LAN (iroh-blobs) and WAN (the origin's HTTP ranges) send the same bytes
//! and one decoder checks both.
//!
//! A response for a set of groups is `[size: u64 LE][bao encoding of those groups]`: exactly what
//! an iroh-blobs provider sends for a ranged get of one blob.

use std::cell::RefCell;
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::rc::Rc;

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{
    CreateOutboard, DecodeResponseIter, encode_ranges, encode_ranges_validated, valid_ranges,
};
use bao_tree::io::{BaoContentItem, DecodeError, EncodeError};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use sitecast_manifest::Blake3Hash;

use crate::device::{Device, ReadAtDevice, WriteAtDevice};

/// 16 KiB groups: `BlockSize::from_chunk_log(4)`, iroh-blobs' `IROH_BLOCK_SIZE`.
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);
/// Bytes in a chunk group; the unit of verification, transfer and progress.
pub const GROUP_BYTES: u64 = 16 * 1024;
const CHUNKS_PER_GROUP: u64 = GROUP_BYTES / 1024;

/// The shape of one image: its size and root hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLayout {
    pub root: Blake3Hash,
    pub size: u64,
}

impl BlobLayout {
    pub fn new(root: Blake3Hash, size: u64) -> Self {
        Self { root, size }
    }

    pub fn tree(&self) -> BaoTree {
        BaoTree::new(self.size, BLOCK_SIZE)
    }

    /// Number of 16 KiB groups (an empty image has one, empty).
    pub fn groups(&self) -> u64 {
        self.size.div_ceil(GROUP_BYTES).max(1)
    }

    /// Byte range of group `index`.
    pub fn group_bytes(&self, index: u64) -> Range<u64> {
        let start = index * GROUP_BYTES;
        start..(start + GROUP_BYTES).min(self.size)
    }

    /// Bytes of the outboard (parent hashes below the root): about 1/256 of the image.
    pub fn outboard_len(&self) -> u64 {
        self.tree().outboard_size()
    }

    /// Bytes of the response for `groups`: the size header, 64 per parent, the groups' data.
    pub fn encoded_len(&self, groups: Range<u64>) -> u64 {
        self.encoded_len_of(&[groups])
    }

    /// Bytes of the response for several ascending, disjoint group ranges in one encoding (a
    /// parent shared by two ranges is sent once).
    pub fn encoded_len_of(&self, groups: &[Range<u64>]) -> u64 {
        let ranges = self.chunk_ranges_of(groups);
        let ranges = bao_tree::io::sync::truncate_ranges(&ranges, self.size);
        let mut len = 8;
        for chunk in self.tree().ranges_pre_order_chunks_iter_ref(ranges, 0) {
            len += match chunk {
                bao_tree::iter::BaoChunk::Parent { .. } => 64,
                bao_tree::iter::BaoChunk::Leaf { size, .. } => size as u64,
            };
        }
        len
    }

    /// The chunk ranges covering groups `groups` (clamped to the image).
    pub fn chunk_ranges(&self, groups: Range<u64>) -> ChunkRanges {
        self.chunk_ranges_of(&[groups])
    }

    /// The chunk ranges covering every one of `groups` (each clamped to the image).
    pub fn chunk_ranges_of(&self, groups: &[Range<u64>]) -> ChunkRanges {
        let mut ranges = ChunkRanges::empty();
        for range in groups {
            let end = range.end.min(self.groups());
            if range.start < end {
                ranges |= ChunkRanges::from(
                    ChunkNum(range.start * CHUNKS_PER_GROUP)..ChunkNum(end * CHUNKS_PER_GROUP),
                );
            }
        }
        ranges
    }
}

/// Group ranges in one verified-range response at most: a run of pieces from the origin is
/// one request (`sitecast-scheduler` keeps its runs within this).
pub const MAX_RANGES_PER_RESPONSE: usize = 64;

/// Merges ascending group indices into ranges.
pub fn collect_ranges(groups: impl Iterator<Item = u64>) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for group in groups {
        match ranges.last_mut() {
            Some(last) if last.end == group => last.end += 1,
            _ => ranges.push(group..group + 1),
        }
    }
    ranges
}

/// Parent hashes of an image kept on a device (pre-order, no size prefix: the iroh-blobs
/// `.obao4` layout). Hashes may be missing (zeros) in a partial outboard; missing hashes only
/// make groups unverifiable, never wrongly verified.
pub struct OutboardStore<D> {
    layout: BlobLayout,
    device: D,
}

impl<D: Device> OutboardStore<D> {
    pub fn new(layout: BlobLayout, device: D) -> Self {
        Self { layout, device }
    }

    pub fn layout(&self) -> BlobLayout {
        self.layout
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Computes the complete outboard of `data` (exactly `layout.size` bytes, streamed in
    /// bounded memory) and returns the root it hashes to.
    pub fn compute_from(&mut self, data: impl Read) -> io::Result<Blake3Hash> {
        let mut outboard = PreOrderOutboard {
            root: blake3::Hash::from_bytes([0; 32]),
            tree: self.layout.tree(),
            data: WriteAtDevice(&mut self.device),
        };
        outboard.init_from(io::BufReader::with_capacity(1 << 20, data))?;
        let root = outboard.root;
        self.device.sync()?;
        Ok(root.into())
    }

    fn reader(&self) -> PreOrderOutboard<ReadAtDevice<'_, D>> {
        PreOrderOutboard {
            root: self.layout.root.into(),
            tree: self.layout.tree(),
            data: ReadAtDevice(&self.device),
        }
    }

    pub(crate) fn writer(&mut self) -> PreOrderOutboard<WriteAtDevice<'_, D>> {
        PreOrderOutboard {
            root: self.layout.root.into(),
            tree: self.layout.tree(),
            data: WriteAtDevice(&mut self.device),
        }
    }

    /// Stores a parent pair the decoder verified.
    pub(crate) fn save(&mut self, parent: &bao_tree::io::Parent) -> io::Result<()> {
        use bao_tree::io::sync::OutboardMut;
        self.writer().save(parent.node, &parent.pair)
    }

    /// Which groups of `data` verify against the root through this outboard's hashes.
    pub fn valid_groups(&self, data: &impl Device) -> io::Result<Vec<Range<u64>>> {
        let all = self.layout.chunk_ranges(0..self.layout.groups());
        let mut groups: Vec<Range<u64>> = Vec::new();
        for range in valid_ranges(self.reader(), ReadAtDevice(data), &all) {
            let range = range?;
            let start = range.start.0.div_ceil(CHUNKS_PER_GROUP);
            // The last group may be partial: its end chunk is the image's last chunk.
            let end = if range.end >= self.layout.tree().chunks() {
                self.layout.groups()
            } else {
                range.end.0 / CHUNKS_PER_GROUP
            };
            match groups.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ if start < end => groups.push(start..end),
                _ => {}
            }
        }
        Ok(groups)
    }

    /// Checks that `bytes` of `data` (any byte range, widened to whole groups) match the root.
    pub fn verify_bytes(&self, data: &impl Device, bytes: Range<u64>) -> Result<(), ResponseError> {
        if bytes.end > self.layout.size || bytes.start >= bytes.end {
            return Err(ResponseError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("byte range {bytes:?} is not inside the {}-byte image", self.layout.size),
            )));
        }
        let groups = bytes.start / GROUP_BYTES..bytes.end.div_ceil(GROUP_BYTES);
        let ranges = self.layout.chunk_ranges(groups);
        match encode_ranges_validated(ReadAtDevice(data), self.reader(), &ranges, io::sink()) {
            Ok(()) => Ok(()),
            Err(EncodeError::LeafHashMismatch(chunk)) => {
                Err(ResponseError::GroupMismatch { group: chunk.0 / CHUNKS_PER_GROUP })
            }
            Err(EncodeError::ParentHashMismatch(_)) => Err(ResponseError::ParentMismatch),
            Err(other) => Err(ResponseError::Io(other.into())),
        }
    }

    /// Writes the response for `groups` of `data`: the size header and the bao encoding, with
    /// every parent and group checked against the root before it is sent (a corrupted source
    /// fails rather than serving bad bytes).
    pub fn encode_groups(
        &self,
        data: &impl Device,
        groups: Range<u64>,
        out: impl Write,
    ) -> io::Result<()> {
        self.encode_runs(data, &[groups], out)
    }

    /// Writes one response for several group ranges (a run of pieces), checked like
    /// [`Self::encode_groups`]: the groups in order, each parent once.
    pub fn encode_runs(
        &self,
        data: &impl Device,
        groups: &[Range<u64>],
        out: impl Write,
    ) -> io::Result<()> {
        self.respond(groups, out, |ranges, out| {
            encode_ranges_validated(ReadAtDevice(data), self.reader(), ranges, out)
        })
    }

    /// Writes the response for `groups` (ranges in ascending order) with the bytes of the
    /// image from `offset` in `bytes` and this outboard's parents, **not checked**: for
    /// plain bytes from an untrusted source (an HTTP mirror), which then go through
    /// [`ResponseDecoder`] like any other response. `bytes` must cover every group asked.
    pub fn encode_plain(
        &self,
        offset: u64,
        bytes: &[u8],
        groups: &[Range<u64>],
        out: impl Write,
    ) -> io::Result<()> {
        let data = PlainBytes { offset, bytes, image_size: self.layout.size };
        self.respond(groups, out, |ranges, out| encode_ranges(data, self.reader(), ranges, out))
    }

    /// Checks `bytes`, the plain bytes of `groups` (adjacent groups of the image) from an
    /// untrusted source, against this outboard and the root: what to write, parents and
    /// groups, or the first fault. Nothing is returned unless every group verified.
    pub fn verify_plain(
        &self,
        groups: Range<u64>,
        bytes: &[u8],
    ) -> Result<Vec<DecodedItem>, ResponseError> {
        let mut encoded = Vec::with_capacity(self.layout.encoded_len(groups.clone()) as usize);
        let ranges = [groups.clone()];
        self.encode_plain(groups.start * GROUP_BYTES, bytes, &ranges, &mut encoded)?;
        let chunks = self.layout.chunk_ranges(groups.clone());
        let items = ResponseDecoder::new(self.layout, &chunks, &encoded[..])?
            .collect::<Result<Vec<_>, _>>()?;
        let verified = items.iter().filter(|item| matches!(item, DecodedItem::Group(_))).count();
        if verified as u64 != groups.end - groups.start {
            return Err(ResponseError::Truncated);
        }
        Ok(items)
    }

    /// A response for `groups`: the size header, then what `encode` writes for their chunks.
    fn respond(
        &self,
        groups: &[Range<u64>],
        out: impl Write,
        encode: impl FnOnce(&ChunkRanges, &mut BufWriter<&mut dyn Write>) -> Result<(), EncodeError>,
    ) -> io::Result<()> {
        let mut out = out;
        let ranges = self.layout.chunk_ranges_of(groups);
        let mut out = BufWriter::with_capacity(64 * 1024, &mut out as &mut dyn Write);
        out.write_all(&self.layout.size.to_le_bytes())?;
        encode(&ranges, &mut out)?;
        out.flush()
    }

    /// Whether these hashes chain to the root: the check a fetched outboard passes before it
    /// is trusted for seeding. Pre-order puts the root's pair first.
    pub fn root_matches(&self) -> io::Result<bool> {
        if self.layout.groups() <= 1 {
            return Ok(true);
        }
        let mut pair = [0u8; 64];
        if self.device.len()? < 64 {
            return Ok(false);
        }
        self.device.read_exact_at(0, &mut pair)?;
        let (left, right) = pair.split_at(32);
        let root = blake3::hazmat::merge_subtrees_root(
            left.try_into().expect("32 bytes"),
            right.try_into().expect("32 bytes"),
            blake3::hazmat::Mode::Hash,
        );
        Ok(Blake3Hash::from(root) == self.layout.root)
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.device.sync()
    }

    /// Gives the device its full length up front, with zeros (missing hashes) where nothing
    /// is known: parent hashes then land in place without the file growing, and a sync need
    /// not commit block allocations.
    pub fn allocate(&mut self) -> io::Result<()> {
        let need = self.layout.outboard_len();
        let mut have = self.device.len()?;
        if have >= need {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        while have < need {
            let n = (need - have).min(zeros.len() as u64) as usize;
            self.device.write_all_at(have, &zeros[..n])?;
            have += n as u64;
        }
        self.device.sync()
    }
}

impl<D> std::fmt::Debug for OutboardStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboardStore").field("layout", &self.layout).finish_non_exhaustive()
    }
}

/// Bytes of an image from `offset`, read by position (for [`OutboardStore::encode_plain`]).
struct PlainBytes<'a> {
    offset: u64,
    bytes: &'a [u8],
    image_size: u64,
}

impl bao_tree::io::sync::ReadAt for PlainBytes<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.offset + self.bytes.len() as u64;
        if pos < self.offset || (pos >= end && pos < self.image_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("byte {pos} is outside the bytes at hand ({}..{end})", self.offset),
            ));
        }
        let from = &self.bytes[(pos.min(end) - self.offset) as usize..];
        let n = buf.len().min(from.len());
        buf[..n].copy_from_slice(&from[..n]);
        Ok(n)
    }
}

impl bao_tree::io::sync::Size for PlainBytes<'_> {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.image_size))
    }
}

/// A group's bytes, verified against the image's root hash. Only the decoder and local seeding
/// make one, so a writer that takes `VerifiedGroup`s cannot be handed unverified bytes.
#[derive(Debug, Clone)]
pub struct VerifiedGroup {
    root: Blake3Hash,
    index: u64,
    data: bytes::Bytes,
}

impl VerifiedGroup {
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The image this group was verified for.
    pub fn root(&self) -> Blake3Hash {
        self.root
    }

    pub fn offset(&self) -> u64 {
        self.index * GROUP_BYTES
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// What a response decodes into, item by item.
#[derive(Debug)]
pub enum DecodedItem {
    /// A verified pair of parent hashes (keep it to verify groups locally later).
    Parent(bao_tree::io::Parent),
    Group(VerifiedGroup),
}

/// Why a response was refused. Everything yielded before the error was verified and may be
/// kept; nothing after it was trusted.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("reading the response: {0}")]
    Io(#[from] io::Error),
    #[error("response claims a {claimed}-byte blob, the manifest says {expected}")]
    SizeMismatch { claimed: u64, expected: u64 },
    #[error("parent hashes do not match the root (corrupt or lying sender)")]
    ParentMismatch,
    #[error("group {group} does not match its hash (corrupt or lying sender)")]
    GroupMismatch { group: u64 },
    #[error("response ended early (truncated)")]
    Truncated,
    #[error("response carries a partial group at offset {offset}; groups are sent whole")]
    PartialGroup { offset: u64 },
    #[error("response has bytes after its last group")]
    TrailingBytes,
}

/// Decodes a response for `groups`, verifying every parent and group before yielding it.
pub struct ResponseDecoder<'r, R: Read> {
    layout: BlobLayout,
    inner: DecodeResponseIter<'r, SharedReader<R>>,
    /// The same reader, kept to check that nothing follows the last item.
    reader: SharedReader<R>,
    done: bool,
}

impl<R: Read> std::fmt::Debug for ResponseDecoder<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseDecoder").field("layout", &self.layout).finish_non_exhaustive()
    }
}

/// One reader used by the bao decoder and, after it, by the trailing-bytes check.
struct SharedReader<R>(Rc<RefCell<R>>);

impl<R: Read> Read for SharedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<'r, R: Read> ResponseDecoder<'r, R> {
    /// Reads the size header and checks it against the manifest's size (the header alone is
    /// not authenticated).
    pub fn new(
        layout: BlobLayout,
        ranges: &'r ChunkRanges,
        mut reader: R,
    ) -> Result<Self, ResponseError> {
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).map_err(eof_is_truncation)?;
        let claimed = u64::from_le_bytes(header);
        if claimed != layout.size {
            return Err(ResponseError::SizeMismatch { claimed, expected: layout.size });
        }
        let reader = Rc::new(RefCell::new(reader));
        let inner = DecodeResponseIter::new(
            layout.root.into(),
            layout.tree(),
            SharedReader(Rc::clone(&reader)),
            ranges,
        );
        Ok(Self { layout, inner, reader: SharedReader(reader), done: false })
    }

    fn convert(
        &self,
        item: Result<BaoContentItem, DecodeError>,
    ) -> Result<DecodedItem, ResponseError> {
        match item {
            Ok(BaoContentItem::Parent(parent)) => Ok(DecodedItem::Parent(parent)),
            Ok(BaoContentItem::Leaf(leaf)) => {
                let index = leaf.offset / GROUP_BYTES;
                let expected = self.layout.group_bytes(index);
                if leaf.offset % GROUP_BYTES != 0
                    || leaf.data.len() as u64 != expected.end - expected.start
                {
                    return Err(ResponseError::PartialGroup { offset: leaf.offset });
                }
                Ok(DecodedItem::Group(VerifiedGroup {
                    root: self.layout.root,
                    index,
                    data: leaf.data,
                }))
            }
            Err(DecodeError::ParentHashMismatch(_)) => Err(ResponseError::ParentMismatch),
            Err(DecodeError::LeafHashMismatch(chunk)) => {
                Err(ResponseError::GroupMismatch { group: chunk.0 / CHUNKS_PER_GROUP })
            }
            Err(DecodeError::ParentNotFound(_) | DecodeError::LeafNotFound(_)) => {
                Err(ResponseError::Truncated)
            }
            Err(DecodeError::Io(error)) => Err(eof_is_truncation(error)),
        }
    }
}

impl<R: Read> Iterator for ResponseDecoder<'_, R> {
    type Item = Result<DecodedItem, ResponseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.inner.next() {
            Some(item) => {
                let converted = self.convert(item);
                if converted.is_err() {
                    self.done = true;
                }
                Some(converted)
            }
            None => {
                self.done = true;
                // The decoder stops at the last expected item; anything after it is not ours.
                match self.reader.read(&mut [0u8; 1]) {
                    Ok(0) => None,
                    Ok(_) => Some(Err(ResponseError::TrailingBytes)),
                    Err(error) => Some(Err(ResponseError::Io(error))),
                }
            }
        }
    }
}

fn eof_is_truncation(error: io::Error) -> ResponseError {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        ResponseError::Truncated
    } else {
        ResponseError::Io(error)
    }
}
