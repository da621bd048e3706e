use std::fmt;

use jiff::Timestamp;

use crate::keys::PublicKey;

/// The two signing roles a root names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Signs root documents (the trust anchor and its rotations).
    Root,
    /// Signs release manifests.
    Release,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Release => "release",
        })
    }
}

/// Why a signed document (root or release manifest) was refused.
///
/// Verification stops at the first failure, in the order given in the crate docs, so each
/// document gets exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Refused before parsing: no verifier reads an endless document.
    #[error("document is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// Not JSON, or JSON without the envelope's or the document's required shape.
    #[error("malformed document: {0}")]
    Malformed(String),
    /// A root presented as a release, or the other way round.
    #[error("expected a {expected:?} document, found {found:?}")]
    WrongDocumentType { expected: &'static str, found: String },
    /// A newer major format that changed the meaning of existing fields.
    #[error("document format {found} is newer than this reader understands (up to {supported})")]
    UnsupportedFormat { found: u64, supported: u64 },
    /// A key this root trusts signed something else: the document was changed or corrupted.
    #[error("the signature by trusted {role} key {key} does not match the document")]
    BadSignature { role: Role, key: PublicKey },
    /// Signed, but only by keys this root does not name for the role.
    #[error("signed only by key {key}, which this root does not trust as a {role} key")]
    UnknownKey { role: Role, key: PublicKey },
    /// Fewer distinct trusted keys signed than the root requires.
    #[error("{valid} valid {role} signature(s), {threshold} required")]
    ThresholdNotMet { role: Role, valid: usize, threshold: u32 },
    /// The release's own expiry has passed (freeze attack or a stale mirror).
    #[error("release expired at {expires} (now {now})")]
    Expired { expires: Timestamp, now: Timestamp },
    /// The pinned root has expired: install a rotated root before trusting new releases.
    #[error("root of trust version {version} expired at {expires} (now {now}); rotate the root")]
    RootExpired { version: u64, expires: Timestamp, now: Timestamp },
    /// Replay or rollback: the release is not newer than what runs.
    #[error("release version {version} is not newer than the installed version {installed}")]
    NotNewer { version: u64, installed: u64 },
    /// A release older than a floor an installed release set.
    #[error("release version {version} is below the rollback floor {floor}")]
    BelowRollbackFloor { version: u64, floor: u64 },
    /// Signed for other hardware.
    #[error("release is for platforms {supported:?}, not for {platform:?}")]
    WrongPlatform { platform: String, supported: Vec<String> },
    /// An agent release that does not run on the OS release the appliance booted.
    #[error("agent runs on OS releases {min} to {}, not on {os_release}", max.map_or("any later".to_owned(), |m| m.to_string()))]
    OsReleaseNotSupported { os_release: u64, min: u64, max: Option<u64> },
    /// A field that parsed but cannot be right (zero size, bad hash, threshold above key count).
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// A root rotation must go one version at a time.
    #[error("new root has version {found}, expected {expected}")]
    RootVersion { expected: u64, found: u64 },
}

impl VerifyError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField { field, reason: reason.into() }
    }
}

/// Why an image does not match its manifest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    /// More bytes than declared: refused after reading one byte past the declared size.
    #[error("image is larger than the {declared} bytes the manifest declares")]
    TooLarge { declared: u64 },
    #[error("image has {actual} bytes, the manifest declares {declared}")]
    TooShort { declared: u64, actual: u64 },
    #[error("image BLAKE3 is {actual}, the manifest says {expected}")]
    Blake3Mismatch { expected: String, actual: String },
    #[error("image SHA-256 is {actual}, the manifest says {expected}")]
    Sha256Mismatch { expected: String, actual: String },
}
