//! Signed release manifests and the root of trust for sitecast.
//!
//! This crate says which OS image an appliance may install and proves who said so. It does no
//! I/O of its own: callers hand it bytes and readers. The `sitecast-manifest` binary is the
//! offline operator tool built on it (keys, roots, signing, verification).
//!
//! # Goals
//! - An appliance installs only an image a threshold of release keys signed, for its platform,
//!   newer than what it runs (or an operator-ordered rollback not below the rollback floor),
//!   before the manifest expires.
//! - The coordinator holds no signing key: a compromised server cannot ship an image.
//! - **Forward compatibility.** A reader built today accepts a manifest written by a future
//!   writer with fields it does not know; those fields are still covered by the signatures.
//!
//! # Non-goals
//! - Delegations, snapshot and timestamp roles of full TUF: there is one signed document per
//!   release and the coordinator serves it; freshness comes from `expires`.
//! - Encryption of images.
//!
//! # Documents
//! Every document type shares one envelope:
//!
//! ```json
//! {"signatures":[{"key":"<ed25519 public key, hex>","sig":"<ed25519 signature, hex>"}],
//!  "signed":{"type":"sitecast.release","format":1, ...}}
//! ```
//!
//! A **release manifest** (`type` `sitecast.release`, `format` 1) has these fields:
//!
//! | field | meaning |
//! |---|---|
//! | `version` | monotonic integer; what "newer" means |
//! | `version_name` | display string, never compared |
//! | `image.size` | exact byte count (1 byte to 1 TiB) |
//! | `image.blake3` | BLAKE3 of the image: the bao-tree root iroh-blobs and `b3sum` give |
//! | `image.sha256` | SHA-256 of the image |
//! | `platforms` | hardware/platform identifiers the image is built for (at least one) |
//! | `notes` | release notes (optional) |
//! | `created`, `expires` | RFC 3339 UTC timestamps |
//! | `rollback_floor` | optional: once installed, no release below this version is accepted |
//! | `index` | optional: the image's content index, `{size, blake3, sha256, chunks: {min, avg, max}}`, what lets an appliance copy what its active slot shares with the image; an unreadable one is ignored |
//!
//! An **agent release** (`type` `sitecast.agent`, `format` 1) ships the appliance agent apart
//! from any image, signed by the same release keys:
//!
//! | field | meaning |
//! |---|---|
//! | `version` | monotonic integer; what "newer" means for agents |
//! | `version_name` | display string, never compared |
//! | `builds` | per platform (each once): `platform`, `entry` (the executable the launcher starts) and `files`: `path` (relative, plain components), `size`, `blake3`, `sha256`, `executable` |
//! | `os_releases` | `{"min": n, "max": m}` (`max` optional): the OS releases it runs on |
//! | `notes`, `created`, `expires` | as for a release |
//!
//! A **root** (`type` `sitecast.root`, `format` 1) has `version`, `expires`, and two key sets,
//! `root` and `release`, each `{"keys":[hex...],"threshold":n}`. Appliances pin a root at
//! install time; a new root replaces it only when its version is one higher and it is signed
//! by a threshold of the old root keys and a threshold of its own.
//!
//! Unknown fields anywhere are ignored by readers and kept in the signed bytes. `format` is a
//! major version: writers bump it only for a change old readers must not misread; everything
//! additive keeps `format` 1.
//!
//! # Encoding
//! Signatures cover the bytes `"sitecast signed document v1\n"` followed by the
//! [canonical JSON](canonical) of the `signed` object: keys sorted by UTF-8 bytes, no
//! whitespace, minimal string escapes. JSON because operators read manifests and every language
//! parses it; canonical because the signed bytes must be rebuilt from the parsed value, which is
//! what lets unknown fields survive a round trip through an old reader. Keys and hashes are
//! lowercase hex and parsed strictly, so each document has one spelling.
//!
//! # Verification order
//! 1. size: more than [`MAX_DOCUMENT_BYTES`] is refused unread ([`VerifyError::TooLarge`]);
//! 2. envelope JSON ([`VerifyError::Malformed`]);
//! 3. `type` and `format` ([`VerifyError::WrongDocumentType`], [`VerifyError::UnsupportedFormat`]);
//! 4. the root's own expiry ([`VerifyError::RootExpired`]);
//! 5. signatures: a changed document fails [`VerifyError::BadSignature`]; only untrusted signers,
//!    [`VerifyError::UnknownKey`]; too few, [`VerifyError::ThresholdNotMet`];
//! 6. fields ([`VerifyError::Malformed`], [`VerifyError::InvalidField`]);
//! 7. the release's expiry ([`VerifyError::Expired`]);
//! 8. for one appliance ([`VerifiedRelease::check_install`]): platform
//!    ([`VerifyError::WrongPlatform`]), newer than installed ([`VerifyError::NotNewer`]), not below
//!    the floor ([`VerifyError::BelowRollbackFloor`]);
//! 9. the image itself, streamed, against size and both hashes ([`ImageDigest::check`]), reading
//!    at most one byte past the declared size.
//!
//! # Example
//! ```
//! use jiff::{Timestamp, ToSpan};
//! use sitecast_manifest::*;
//!
//! let root_key = SecretKey::generate()?;
//! let release_key = SecretKey::generate()?;
//! let now = Timestamp::now();
//! let root = Root {
//!     version: 1,
//!     expires: now + 24.hours(),
//!     root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
//!     release: RoleKeys { keys: vec![release_key.public()], threshold: 1 },
//! };
//! let trusted = TrustedRoot::pin(&root.sign(&[&root_key]).to_bytes())?;
//!
//! let image = b"an appliance image".repeat(1000);
//! let digest = ImageDigest::of_reader(&image[..])?;
//! let release = Release {
//!     version: 7,
//!     version_name: "2026.11.1".into(),
//!     image: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
//!     platforms: vec!["x86_64-appliance".into()],
//!     notes: String::new(),
//!     created: now,
//!     expires: now + 1.hour(),
//!     rollback_floor: None,
//!     index: None,
//! };
//! let manifest = release.sign(&[&release_key]).to_bytes();
//!
//! let verified = trusted.verify_release(&manifest, now)?;
//! let appliance = InstallPolicy {
//!     platform: "x86_64-appliance".into(),
//!     installed_version: 6,
//!     rollback_floor: 0,
//!     intent: Intent::Upgrade,
//! };
//! verified.check_install(&appliance)?;
//! ImageDigest::check(&image[..], &verified.release().image)?;
//!
//! // The same manifest is a replay for an appliance already on version 7.
//! let updated = InstallPolicy { installed_version: 7, ..appliance };
//! assert_eq!(
//!     verified.check_install(&updated),
//!     Err(VerifyError::NotNewer { version: 7, installed: 7 })
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod agent;
pub mod api;
pub mod canonical;
mod digest;
mod envelope;
mod error;
mod hash;
mod keys;
mod release;
pub mod release_file;
mod root;
pub mod window;

pub use agent::{
    AGENT_FORMAT, AGENT_TYPE, AgentBuild, AgentFile, AgentPolicy, AgentRelease,
    MAX_AGENT_FILE_BYTES, MAX_AGENT_FILES, OsReleases, VerifiedAgentRelease,
};
pub use digest::{DigestWriter, ImageDigest, blake3_of_reader};
pub use envelope::{MAX_DOCUMENT_BYTES, SignatureEntry, SignedDocument};
pub use error::{ImageError, Role, VerifyError};
pub use hash::{Blake3Hash, Sha256Hash};
pub use keys::{KeyError, PublicKey, SecretKey, Signature, decode_hex};
pub use release::{
    ChunkSizes, ContentIndex, ImageInfo, InstallPolicy, Intent, MAX_IMAGE_BYTES, MAX_INDEX_BYTES,
    RELEASE_FORMAT, RELEASE_TYPE, Release, VerifiedRelease,
};
pub use root::{ROOT_FORMAT, ROOT_TYPE, RoleKeys, Root, TrustedRoot};
