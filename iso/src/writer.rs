//! Writing an image into the standby slot, in typed states:
//! [`SlotWriter`] (fetching) → [`VerifiedSlot`] (read back and checked) → activation
//! (in [`crate::ab`]). Only a `VerifiedSlot` can be activated, and only `finish` makes one.

use std::collections::BTreeSet;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use sitecast_manifest::{ImageDigest, ImageError, ImageInfo};

use crate::ab::Slot;
use crate::device::{Device, DeviceReader, FileDevice};
use crate::layout::{
    BlobLayout, DecodedItem, OutboardStore, ResponseDecoder, ResponseError, VerifiedGroup,
    collect_ranges,
};
use crate::progress::Progress;

/// Groups written between durable checkpoints (4 MiB): after a power cut at most these are
/// fetched again; after a kill -9 local seeding recovers them too.
pub const CHECKPOINT_GROUPS: usize = 256;

/// Why a slot cannot be written or finished.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot {path} does not exist")]
    Missing { path: PathBuf },
    #[error("slot {path} is read-only")]
    ReadOnly { path: PathBuf },
    #[error("slot holds {have} bytes, the image needs {need}")]
    TooSmall { need: u64, have: u64 },
    #[error("group {group} was verified for image {group_root}, not for the image being written")]
    WrongImage { group: u64, group_root: String },
    #[error("slot I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Response(#[from] ResponseError),
    #[error("{missing} group(s) are not written yet")]
    Incomplete { missing: u64 },
    /// The slot read back does not match the manifest: the disk lost data after it was
    /// written. Progress is cleared so the next attempt re-verifies everything.
    #[error("slot read back does not match the manifest: {0}")]
    ReadBack(ImageError),
}

/// Counters for tests, metrics and the operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Groups recorded by an earlier run of the writer (resume).
    pub resumed: u64,
    /// Groups found correct in the slot by hashing (local seeding).
    pub seeded: u64,
    /// Groups written by this run.
    pub written: u64,
    /// Groups offered that were already recorded (duplicates, e.g. from end-game).
    pub duplicates: u64,
}

/// The standby slot while it is being filled ("Fetching").
#[derive(Debug)]
pub struct SlotWriter<D: Device> {
    slot_name: Slot,
    image: ImageInfo,
    layout: BlobLayout,
    slot: D,
    progress: Progress<D>,
    outboard: OutboardStore<D>,
    /// Written since the last checkpoint, not yet recorded.
    pending: BTreeSet<u64>,
    checkpoint_every: usize,
    stats: WriterStats,
}

/// Paths of the records kept beside a slot file or device.
#[derive(Debug, Clone)]
pub struct SlotPaths {
    pub slot: PathBuf,
    pub progress: PathBuf,
    pub outboard: PathBuf,
}

impl SlotPaths {
    /// `slot` plus `<state_dir>/<slot file name>.progress` and `.obao4`.
    pub fn beside(slot: &Path, state_dir: &Path) -> Self {
        let name = slot.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self {
            slot: slot.to_owned(),
            progress: state_dir.join(format!("{name}.progress")),
            outboard: state_dir.join(format!("{name}.obao4")),
        }
    }
}

impl SlotPaths {
    /// Whether the progress record says every group of `image` was verified and written.
    /// Reads the record only (the slot may be a running program's file, and its groups are
    /// checked again whenever they are served or installed); a missing or foreign record is
    /// not complete.
    pub fn recorded_complete(&self, image: &ImageInfo) -> bool {
        let layout = BlobLayout::new(image.blake3, image.size);
        self.recorded_groups(image) == layout.groups()
    }

    /// How many groups of `image` the progress record says were verified and written (0 for
    /// a missing or foreign record). Reads the record only.
    pub fn recorded_groups(&self, image: &ImageInfo) -> u64 {
        let layout = BlobLayout::new(image.blake3, image.size);
        FileDevice::open_read_only(&self.progress)
            .and_then(|record| Progress::open(record, layout))
            .map_or(0, |progress| progress.count())
    }
}

impl SlotWriter<FileDevice> {
    /// Opens the slot and its records by path; every problem with the slot is reported here,
    /// before any download starts.
    pub fn open_paths(
        slot_name: Slot,
        image: &ImageInfo,
        paths: &SlotPaths,
    ) -> Result<Self, SlotError> {
        let slot = FileDevice::open(&paths.slot).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => SlotError::Missing { path: paths.slot.clone() },
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                SlotError::ReadOnly { path: paths.slot.clone() }
            }
            _ => SlotError::Io(error),
        })?;
        let progress = FileDevice::open_or_create(&paths.progress)?;
        let outboard = FileDevice::open_or_create(&paths.outboard)?;
        Self::open(slot_name, image, slot, progress, outboard)
    }
}

impl<D: Device> SlotWriter<D> {
    /// Opens a writer for `image` on `slot`, resuming from `progress` and seeding from what the
    /// slot already holds (groups that verify through the outboard's hashes).
    pub fn open(
        slot_name: Slot,
        image: &ImageInfo,
        slot: D,
        progress: D,
        outboard: D,
    ) -> Result<Self, SlotError> {
        let have = slot.len()?;
        if have < image.size {
            return Err(SlotError::TooSmall { need: image.size, have });
        }
        let layout = BlobLayout::new(image.blake3, image.size);
        let progress = Progress::open(progress, layout)?;
        let mut outboard = OutboardStore::new(layout, outboard);
        outboard.allocate()?;
        let resumed = progress.count();
        let mut writer = Self {
            slot_name,
            image: image.clone(),
            layout,
            slot,
            progress,
            outboard,
            pending: BTreeSet::new(),
            checkpoint_every: CHECKPOINT_GROUPS,
            stats: WriterStats { resumed, ..WriterStats::default() },
        };
        writer.seed()?;
        Ok(writer)
    }

    /// Records groups the slot already holds correctly but the progress record lacks (written
    /// before a crash, or the record was lost).
    fn seed(&mut self) -> Result<(), SlotError> {
        let mut found = Vec::new();
        for range in self.outboard.valid_groups(&self.slot)? {
            found.extend(range.filter(|&g| !self.progress.has(g)));
        }
        if !found.is_empty() {
            // What we read may still be only in the page cache: make it durable first.
            self.slot.sync()?;
            self.outboard.sync()?;
            self.progress.record(&found)?;
            self.stats.seeded = found.len() as u64;
        }
        Ok(())
    }

    pub fn slot(&self) -> Slot {
        self.slot_name
    }

    /// Checkpoints after every `groups` written groups instead of [`CHECKPOINT_GROUPS`]
    /// (fewer: less to fetch again after a power cut, more syncs).
    pub fn with_checkpoint_every(mut self, groups: usize) -> Self {
        self.checkpoint_every = groups.max(1);
        self
    }

    pub fn layout(&self) -> BlobLayout {
        self.layout
    }

    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Groups still to fetch, as ranges of group indices.
    pub fn missing(&self) -> Vec<Range<u64>> {
        collect_ranges((0..self.layout.groups()).filter(|&g| !self.has(g)))
    }

    pub fn has(&self, group: u64) -> bool {
        self.progress.has(group) || self.pending.contains(&group)
    }

    /// Groups verified and written (durably or pending the next checkpoint).
    pub fn written_groups(&self) -> u64 {
        self.progress.count() + self.pending.len() as u64
    }

    pub fn is_complete(&self) -> bool {
        self.written_groups() == self.layout.groups()
    }

    /// Writes one verified group at its offset.
    pub fn write_group(&mut self, group: &VerifiedGroup) -> Result<(), SlotError> {
        if group.root() != self.layout.root {
            return Err(SlotError::WrongImage {
                group: group.index(),
                group_root: group.root().to_hex(),
            });
        }
        if self.has(group.index()) {
            self.stats.duplicates += 1;
            return Ok(());
        }
        self.slot.write_all_at(group.offset(), group.data())?;
        self.pending.insert(group.index());
        self.stats.written += 1;
        if self.pending.len() >= self.checkpoint_every {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Keeps a verified parent pair, so groups can later be verified locally.
    pub fn save_parent(&mut self, parent: &bao_tree::io::Parent) -> Result<(), SlotError> {
        Ok(self.outboard.save(parent)?)
    }

    /// Decodes a whole response into the slot. Groups verified before an error stay written;
    /// the error says what was wrong with the rest.
    pub fn ingest<R: io::Read>(
        &mut self,
        decoder: ResponseDecoder<'_, R>,
    ) -> Result<u64, SlotError> {
        let mut groups = 0;
        for item in decoder {
            match item? {
                DecodedItem::Parent(parent) => self.save_parent(&parent)?,
                DecodedItem::Group(group) => {
                    self.write_group(&group)?;
                    groups += 1;
                }
            }
        }
        Ok(groups)
    }

    /// Makes written groups durable, then records them: data before record, always.
    pub fn checkpoint(&mut self) -> Result<(), SlotError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.slot.sync()?;
        self.outboard.sync()?;
        let pending: Vec<u64> = self.pending.iter().copied().collect();
        self.progress.record(&pending)?;
        self.pending.clear();
        Ok(())
    }

    /// Reads the whole slot back and checks size, BLAKE3 and SHA-256 against the manifest.
    pub fn finish(mut self) -> Result<VerifiedSlot<D>, SlotError> {
        self.checkpoint()?;
        let missing = self.layout.groups() - self.progress.count();
        if missing > 0 {
            return Err(SlotError::Incomplete { missing });
        }
        let reader = DeviceReader::new(&self.slot, self.image.size);
        if let Err(error) = ImageDigest::check(reader, &self.image) {
            self.progress.clear()?;
            return Err(SlotError::ReadBack(error));
        }
        Ok(VerifiedSlot { slot_name: self.slot_name, image: self.image, device: self.slot })
    }
}

/// A slot whose every byte was read back and matched the manifest ("Verified").
#[derive(Debug)]
pub struct VerifiedSlot<D> {
    pub(crate) slot_name: Slot,
    pub(crate) image: ImageInfo,
    pub(crate) device: D,
}

impl<D: Device> VerifiedSlot<D> {
    pub fn slot(&self) -> Slot {
        self.slot_name
    }

    pub fn image(&self) -> &ImageInfo {
        &self.image
    }

    /// Re-checks a slot that was verified before (after a reboot, to keep serving it to
    /// peers): reads it back in full.
    pub fn check_existing(
        slot_name: Slot,
        image: &ImageInfo,
        device: D,
    ) -> Result<Self, SlotError> {
        let reader = DeviceReader::new(&device, image.size);
        ImageDigest::check(reader, image).map_err(SlotError::ReadBack)?;
        Ok(Self { slot_name, image: image.clone(), device })
    }

    pub fn device(&self) -> &D {
        &self.device
    }
}
