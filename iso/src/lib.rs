//! The image on disk: the blob layout (BLAKE3 bao tree, 16 KiB groups) of an image, the
//! standby-slot writer that writes only verified ranges and resumes after a crash, the A/B slot
//! state in the GRUB environment block, and the health gate. Files and block devices only; no
//! network code.
//!
//! Not built yet: see the iso issue. Nothing here claims to work.
