//! Copying from the active slot: the groups of a new image that the running image already
//! holds, found through the release's content index, are read from the active slot,
//! verified against the new image's root like any fetched group, and written to the standby
//! slot before the swarm starts; the swarm then fetches only the rest.
//!
//! The active slot is only a source of candidate bytes: a group is written once all of it
//! verifies, so a damaged active slot (or a hash that collides in the index map) costs that
//! group a fetch, never a wrong byte. Reused groups are recorded in the writer's progress
//! like fetched ones, so a restart resumes after them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use sitecast_delta::index::{IndexError, IndexReader};
use sitecast_delta::plan::{GroupCopies, PlanError, PlanReader};
use sitecast_delta::reference::SharedRuns;
use sitecast_delta::reuse::{GroupCopy, GroupPlanner, OlderImage, Span};
use sitecast_iso::{
    BlobLayout, DecodedItem, Device, DeviceReader, FileDevice, GROUP_BYTES, OutboardStore,
    SlotError, SlotWriter, group_hash,
};
use sitecast_manifest::api::InstalledImage;

/// The most groups checked in one go (1 MiB of bytes in memory).
const BATCH_GROUPS: u64 = 64;

/// What was copied from the active slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reused {
    pub groups: u64,
    pub bytes: u64,
    /// Groups the index placed in the active slot whose bytes did not verify there (a
    /// damaged active slot): left to the swarm.
    pub refused: u64,
    /// Bytes of the active slot read to find them.
    pub scanned: u64,
}

/// Groups the active slot holds only part of, and where those parts are: the swarm fetches
/// just the rest of such a group from the origin, assembles it with the parts, and checks
/// the whole group before it is written ([`crate::patch`]). Kept for at most
/// [`MAX_PARTIAL_GROUPS`] groups (they lie where the new image's changes begin and end);
/// parts under [`MIN_PART`] bytes are not worth the bookkeeping.
#[derive(Debug, Default)]
pub struct PartialGroups {
    groups: BTreeMap<u64, Vec<Span>>,
}

pub const MAX_PARTIAL_GROUPS: usize = 65_536;
pub const MIN_PART: u64 = 1024;

impl PartialGroups {
    fn add(&mut self, copy: GroupCopy) {
        if copy.len() >= MIN_PART && self.groups.len() < MAX_PARTIAL_GROUPS {
            self.groups.insert(copy.group, copy.spans);
        }
    }

    /// Where the active slot holds parts of `group`, if it does.
    pub fn get(&self, group: u64) -> Option<&[Span]> {
        self.groups.get(&group).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The groups, in order, with where the active slot holds parts of each.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[Span])> {
        self.groups.iter().map(|(&group, spans)| (group, spans.as_slice()))
    }

    /// Bytes the active slot holds of these groups.
    pub fn bytes(&self) -> u64 {
        self.groups.values().flatten().map(|s| u64::from(s.len)).sum()
    }
}

/// What the active slot holds of the groups left to fetch: parts of some
/// ([`PartialGroups`]), and where the new image's shared bytes sit in it ([`SharedRuns`]), so
/// that the missing bytes can be compressed against the active slot's bytes near them.
#[derive(Debug, Default)]
pub struct ActiveParts {
    pub partial: PartialGroups,
    pub runs: SharedRuns,
}

/// Indexes cut finer than this are not used: the map of the active slot's chunks grows as
/// the chunks shrink (the signing tool cuts 4 KiB).
pub const MIN_AVERAGE_CHUNK: u32 = 1024;

/// Reads on until `stop` is set, then reads as the end: the scan of a large slot gives way
/// to a newer download.
struct StopReader<'s, R> {
    inner: R,
    stop: &'s AtomicBool,
}

impl<R: Read> Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.stop.load(Ordering::Relaxed) {
            true => Ok(0),
            false => self.inner.read(buf),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReuseError {
    #[error(
        "the content index is cut into chunks of {avg} bytes on average, finer than this agent uses"
    )]
    TooFine { avg: u32 },
    #[error("content index: {0}")]
    Index(#[from] IndexError),
    #[error("plan: {0}")]
    Plan(#[from] PlanError),
    #[error("reading the active slot: {0}")]
    Active(#[from] io::Error),
    #[error(transparent)]
    Slot(#[from] SlotError),
}

/// Copies into `writer` every group of its image that the active slot at `active` (its first
/// `active_len` bytes, or all of it) holds according to the content index at `index`,
/// checking each against `outboard` (the new image's, complete) before it is written; says
/// what the slot holds of the groups it could not copy whole.
/// Blocking: file reads and hashing. Stops, with what was copied so far recorded, once
/// `stop` is set. `written` hears the bytes of each batch as it is written, so a caller can
/// count them before the copy ends (or is killed).
pub fn copy_from_active<D: Device>(
    writer: &mut SlotWriter<D>,
    outboard: &OutboardStore<FileDevice>,
    index: &Path,
    active: &Path,
    active_len: Option<u64>,
    stop: &AtomicBool,
    written: &mut dyn FnMut(u64),
) -> Result<(Reused, ActiveParts), ReuseError> {
    let layout = writer.layout();
    let chunks = IndexReader::new(File::open(index)?, layout.size)?;
    if chunks.chunking().avg < MIN_AVERAGE_CHUNK {
        return Err(ReuseError::TooFine { avg: chunks.chunking().avg });
    }
    let source = FileDevice::open_read_only(active)?;
    let len = source.len()?;
    let len = active_len.map_or(len, |known| known.min(len));
    let reader = StopReader { inner: DeviceReader::new(&source, len), stop };
    let older = OlderImage::read(BufReader::with_capacity(1 << 20, reader), chunks.chunking())?;
    let mut copier = Copier::new(writer, outboard, &source, written, older.bytes());
    copier.reused.scanned = older.bytes();
    let mut planner = GroupPlanner::new(&older, layout.size);
    for chunk in chunks {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let chunk = chunk?;
        if let Some(old) = older.find(chunk.key) {
            copier.parts.runs.push(chunk.offset, old, u64::from(chunk.len));
        }
        for copy in planner.push(&chunk) {
            copier.group(copy)?;
        }
    }
    copier.finish()
}

/// [`copy_from_active`] with a plan for the pair (at `plan`) instead of the content index:
/// the plan's runs say where each group's bytes sit in the active slot, which is not cut.
/// The caller has checked that the active slot holds the image the plan is from.
pub fn copy_with_plan<D: Device>(
    writer: &mut SlotWriter<D>,
    outboard: &OutboardStore<FileDevice>,
    plan: &Path,
    active: &Path,
    stop: &AtomicBool,
    written: &mut dyn FnMut(u64),
) -> Result<(Reused, ActiveParts), ReuseError> {
    let plan = PlanReader::new(File::open(plan)?, writer.layout().size)?;
    let source = FileDevice::open_read_only(active)?;
    let mut copier = Copier::new(writer, outboard, &source, written, plan.header.from_size);
    for run in &plan.runs {
        copier.parts.runs.push(run.new, run.old, run.len);
    }
    for copy in plan.group_copies().filter(|copy| !copy.is_empty()) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        copier.group(copy)?;
    }
    copier.finish()
}

/// Writes to `out` the group hashes of the new image (of `layout`) that a plan for the pair
/// (at `plan`) and the active slot make: each group the plan's runs cover whole hashed from
/// the slot's bytes, the others' hashes as the plan has them. Trusted only once the tree they
/// make hashes to the signed root. Blocking; stopped, an `Interrupted` error.
pub fn group_hashes_from_plan(
    plan: &Path,
    active: &Path,
    layout: BlobLayout,
    out: &Path,
    stop: &AtomicBool,
) -> Result<(), ReuseError> {
    let mut plan = PlanReader::new(File::open(plan)?, layout.size)?;
    let source = FileDevice::open_read_only(active)?;
    if source.len()? < plan.header.from_size {
        return Err(ReuseError::Active(io::Error::other(
            "the active slot is shorter than the image the plan is from",
        )));
    }
    let runs = std::mem::take(&mut plan.runs);
    let mut out = io::BufWriter::new(File::create(out)?);
    let mut bytes = vec![0u8; GROUP_BYTES as usize];
    for copy in GroupCopies::new(&runs, layout.size) {
        if stop.load(Ordering::Relaxed) {
            return Err(ReuseError::Active(io::ErrorKind::Interrupted.into()));
        }
        let hash = match copy.whole {
            true => {
                let mut at = 0;
                for span in &copy.spans {
                    let part = &mut bytes[at..at + span.len as usize];
                    source.read_exact_at(span.from, part)?;
                    at += span.len as usize;
                }
                group_hash(copy.group, &bytes[..at])
            }
            false => plan.next_hash()?,
        };
        out.write_all(&hash)?;
    }
    plan.finish()?;
    out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
    Ok(())
}

/// Copies the groups it is handed from the active slot, in batches checked against the
/// outboard, and keeps what the slot holds of the groups it cannot copy whole.
struct Copier<'a, D: Device> {
    writer: &'a mut SlotWriter<D>,
    outboard: &'a OutboardStore<FileDevice>,
    source: &'a FileDevice,
    written: &'a mut dyn FnMut(u64),
    batch: Batch,
    reused: Reused,
    parts: ActiveParts,
}

impl<'a, D: Device> Copier<'a, D> {
    fn new(
        writer: &'a mut SlotWriter<D>,
        outboard: &'a OutboardStore<FileDevice>,
        source: &'a FileDevice,
        written: &'a mut dyn FnMut(u64),
        older_len: u64,
    ) -> Self {
        let parts = ActiveParts { runs: SharedRuns::new(older_len), ..Default::default() };
        Self {
            writer,
            outboard,
            source,
            written,
            batch: Batch::default(),
            reused: Reused::default(),
            parts,
        }
    }

    /// The next group (in order) the active slot holds bytes of.
    fn group(&mut self, copy: GroupCopy) -> Result<(), ReuseError> {
        if self.writer.has(copy.group) {
            return Ok(());
        }
        if !copy.whole {
            self.parts.partial.add(copy);
            return Ok(());
        }
        if !self.batch.extends(&copy) {
            self.batch.write(self.writer, self.outboard, &mut self.reused, self.written)?;
        }
        self.batch.add(&copy, self.source)?;
        Ok(())
    }

    fn finish(mut self) -> Result<(Reused, ActiveParts), ReuseError> {
        self.batch.write(self.writer, self.outboard, &mut self.reused, self.written)?;
        self.writer.checkpoint()?;
        Ok((self.reused, self.parts))
    }
}

/// Whether the first `image.size` bytes of the slot at `active` hash to `image.blake3`: how
/// an agent that did not install its active slot itself (the installer did) confirms which
/// image it holds before naming it to Central Command. Streamed; stopped, an `Interrupted`
/// error. Blocking.
pub fn slot_holds(
    active: &Path,
    image: InstalledImage,
    stop: &AtomicBool,
) -> Result<bool, io::Error> {
    let source = FileDevice::open_read_only(active)?;
    if source.len()? < image.size {
        return Ok(false);
    }
    let mut reader = StopReader { inner: DeviceReader::new(&source, image.size), stop };
    let mut hasher = blake3::Hasher::new();
    let read = io::copy(&mut BufReader::with_capacity(1 << 20, &mut reader), &mut hasher)?;
    if stop.load(Ordering::Relaxed) {
        return Err(io::ErrorKind::Interrupted.into());
    }
    Ok(read == image.size && hasher.finalize() == blake3::Hash::from(image.blake3))
}

/// Adjacent groups assembled from the active slot, not yet checked.
#[derive(Default)]
struct Batch {
    groups: Range<u64>,
    bytes: Vec<u8>,
}

impl Batch {
    fn extends(&self, copy: &GroupCopy) -> bool {
        self.groups.is_empty()
            || (self.groups.end == copy.group && self.groups.end - self.groups.start < BATCH_GROUPS)
    }

    fn add(&mut self, copy: &GroupCopy, source: &FileDevice) -> io::Result<()> {
        if self.groups.is_empty() {
            self.groups = copy.group..copy.group;
        }
        for span in &copy.spans {
            let at = self.bytes.len();
            self.bytes.resize(at + span.len as usize, 0);
            source.read_exact_at(span.from, &mut self.bytes[at..])?;
        }
        self.groups.end += 1;
        Ok(())
    }

    /// [`Batch::write_checked`], telling `written` the bytes it wrote.
    fn write<D: Device>(
        &mut self,
        writer: &mut SlotWriter<D>,
        outboard: &OutboardStore<FileDevice>,
        reused: &mut Reused,
        written: &mut dyn FnMut(u64),
    ) -> Result<(), SlotError> {
        let before = reused.bytes;
        let result = self.write_checked(writer, outboard, reused);
        written(reused.bytes - before);
        result
    }

    /// Checks the batch and writes what verifies: all of it, or, when something does not,
    /// each group that does on its own.
    fn write_checked<D: Device>(
        &mut self,
        writer: &mut SlotWriter<D>,
        outboard: &OutboardStore<FileDevice>,
        reused: &mut Reused,
    ) -> Result<(), SlotError> {
        let groups = std::mem::take(&mut self.groups);
        let bytes = std::mem::take(&mut self.bytes);
        if groups.is_empty() {
            return Ok(());
        }
        if let Ok(items) = outboard.verify_plain(groups.clone(), &bytes) {
            return write_items(
                writer,
                &items,
                bytes.len() as u64,
                groups.end - groups.start,
                reused,
            );
        }
        let mut at = 0;
        for group in groups {
            let len = (GROUP_BYTES.min(writer.layout().size - group * GROUP_BYTES)) as usize;
            match outboard.verify_plain(group..group + 1, &bytes[at..at + len]) {
                Ok(items) => write_items(writer, &items, len as u64, 1, reused)?,
                Err(error) => {
                    tracing::warn!(group, %error, "the active slot's copy of a group does not verify; it is fetched");
                    reused.refused += 1;
                }
            }
            at += len;
        }
        Ok(())
    }
}

fn write_items<D: Device>(
    writer: &mut SlotWriter<D>,
    items: &[DecodedItem],
    bytes: u64,
    groups: u64,
    reused: &mut Reused,
) -> Result<(), SlotError> {
    for item in items {
        match item {
            DecodedItem::Parent(parent) => writer.save_parent(parent)?,
            DecodedItem::Group(group) => writer.write_group(group)?,
        }
    }
    reused.groups += groups;
    reused.bytes += bytes;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot holds an image when its first `size` bytes hash to it: longer slots do, a
    /// shorter one or one with a byte changed does not, and a stop is an error, not a "no".
    #[test]
    fn a_slot_holds_an_image_only_if_its_bytes_hash_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = vec![7u8; 100_000];
        let named = InstalledImage { blake3: blake3::hash(&image).into(), size: 100_000 };
        let slot = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("slot");
            path
        };
        let go = AtomicBool::new(false);
        let longer = slot("longer", &[&image[..], &[0u8; 5000]].concat());
        assert!(slot_holds(&longer, named, &go).expect("read"));
        assert!(!slot_holds(&slot("shorter", &image[..99_999]), named, &go).expect("read"));
        let mut changed = image.clone();
        changed[50_000] ^= 1;
        assert!(!slot_holds(&slot("changed", &changed), named, &go).expect("read"));
        let stopped = slot_holds(&longer, named, &AtomicBool::new(true));
        assert_eq!(stopped.expect_err("stopped").kind(), io::ErrorKind::Interrupted);
    }
}
