//! The image on disk: the blob layout (BLAKE3 bao tree, 16 KiB groups) of an image, the
//! standby-slot writer that writes only verified groups and resumes after a crash, the A/B slot
//! state in the GRUB environment block, and the health gate. Files and block devices only; no
//! network code.
//!
//! The install flow is typed: [`SlotWriter`] (fetching) → [`VerifiedSlot`] (read back, both
//! hashes checked) → [`ActivatedSlot`] (scheduled for trial boots). Nothing but
//! [`SlotWriter::finish`] makes a `VerifiedSlot`, and nothing but a `VerifiedSlot` activates.
//! A writer that has not been finished cannot be activated; this does not compile:
//!
//! ```compile_fail
//! # use sitecast_iso::*;
//! fn activate_unverified(writer: SlotWriter<FileDevice>, env: &mut EnvFile) {
//!     writer.activate(env, DEFAULT_TRIES);
//! }
//! ```
//!
//! The same with a finished writer does:
//!
//! ```
//! # use sitecast_iso::*;
//! fn activate_verified(writer: SlotWriter<FileDevice>, env: &mut EnvFile) -> anyhow::Result<()> {
//!     writer.finish()?.activate(env, DEFAULT_TRIES)?;
//!     Ok(())
//! }
//! ```

pub mod ab;
pub mod device;
pub mod generate;
mod group_hashes;
pub mod grubenv;
pub mod health;
pub mod layout;
mod progress;
pub mod writer;

pub use ab::{AbState, ActivatedSlot, BootOutcome, DEFAULT_TRIES, Slot};
pub use device::{CrashDevice, Device, DeviceReader, FileDevice, PowerSupply};
pub use group_hashes::{group_hash, write_group_hashes};
pub use grubenv::{CrashEnvStore, EnvFile, EnvStore, GrubEnv};
pub use layout::{
    BLOCK_SIZE, BlobLayout, DecodedItem, GROUP_BYTES, MAX_RANGES_PER_RESPONSE, OutboardStore,
    ResponseDecoder, ResponseError, VerifiedGroup, collect_ranges,
};
pub use writer::{SlotError, SlotPaths, SlotWriter, VerifiedSlot, WriterStats};
