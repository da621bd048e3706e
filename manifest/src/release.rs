//! The release manifest: what an appliance may install, and the checks before it does.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::envelope::{SignedDocument, signed_object};
use crate::error::VerifyError;
use crate::hash::{Blake3Hash, Sha256Hash};
use crate::keys::SecretKey;

/// The `type` of a release manifest.
pub const RELEASE_TYPE: &str = "sitecast.release";
/// The major format this reader understands. Additive changes never bump it.
pub const RELEASE_FORMAT: u64 = 1;
/// Larger images are refused as implausible (an "endless data" guard on the declared size).
pub const MAX_IMAGE_BYTES: u64 = 1 << 40;

/// The image a release installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// Exact size in bytes.
    pub size: u64,
    pub blake3: Blake3Hash,
    pub sha256: Sha256Hash,
}

/// The fields of a release manifest this version of sitecast knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Release {
    /// Monotonic release number: what "newer" means.
    pub version: u64,
    /// For humans, e.g. `2026.11.1`; never compared.
    pub version_name: String,
    pub image: ImageInfo,
    /// Hardware/platform identifiers this image is built for; an appliance installs a release
    /// only if its own platform is listed.
    pub platforms: Vec<String>,
    pub notes: String,
    pub created: Timestamp,
    pub expires: Timestamp,
    /// Once this release is installed, no release below this version is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_floor: Option<u64>,
    /// The image's content index (`sitecast_delta::index`): what lets an appliance copy the
    /// bytes its active slot shares with the image instead of fetching them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<ContentIndex>,
}

/// The content index a release is signed with: Central Command serves it, and appliances
/// check it against this before they use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentIndex {
    pub size: u64,
    pub blake3: Blake3Hash,
    pub sha256: Sha256Hash,
    /// How the image was cut (FastCDC's minimum, average and maximum chunk bytes), so that
    /// Central Command can make the same index from the image.
    pub chunks: ChunkSizes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ContentIndex {
    /// Cuts `image` (streamed) as `chunking` says and writes its index to `out`; what a
    /// manifest signs of that index.
    pub fn make(
        image: impl std::io::Read,
        chunking: sitecast_delta::Chunking,
        out: impl std::io::Write,
    ) -> std::io::Result<Self> {
        let mut digest = crate::DigestWriter::new(out);
        sitecast_delta::index::write(image, chunking, &mut digest)?;
        let (_, crate::ImageDigest { size, blake3, sha256 }) = digest.finish();
        let sitecast_delta::Chunking { min, avg, max } = chunking;
        Ok(Self { size, blake3, sha256, chunks: ChunkSizes { min, avg, max } })
    }

    /// How the image was cut.
    pub fn chunking(&self) -> sitecast_delta::Chunking {
        let ChunkSizes { min, avg, max } = self.chunks;
        sitecast_delta::Chunking { min, avg, max }
    }

    /// The index as a file to fetch and check, as an image is.
    pub fn file(&self) -> ImageInfo {
        ImageInfo { size: self.size, blake3: self.blake3, sha256: self.sha256 }
    }
}

/// An index larger than this is not read (4 GiB images at 4 KiB chunks make 12 MiB).
pub const MAX_INDEX_BYTES: u64 = 1 << 30;

impl Release {
    /// The `signed` object for this release, with `type` and `format` set.
    pub fn to_signed(&self) -> Map<String, Value> {
        signed_object(self, RELEASE_TYPE, RELEASE_FORMAT)
    }

    /// Signs this release with `keys` (each release key adds one signature).
    pub fn sign(&self, keys: &[&SecretKey]) -> SignedDocument {
        SignedDocument::sign(self.to_signed(), keys)
    }

    /// Reads the known fields of a signed document's `signed` object, ignoring the others.
    pub(crate) fn from_signed(signed: &Map<String, Value>) -> Result<Self, VerifyError> {
        let raw: RawRelease = serde_json::from_value(Value::Object(signed.clone()))
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        raw.validate()
    }
}

/// The wire shape, with the fields that need checks beyond their JSON type kept loose so that
/// each bad value gets an [`VerifyError::InvalidField`] naming it.
#[derive(Deserialize)]
struct RawRelease {
    version: u64,
    version_name: String,
    image: RawImage,
    platforms: Vec<String>,
    #[serde(default)]
    notes: String,
    created: Timestamp,
    expires: Timestamp,
    #[serde(default)]
    rollback_floor: Option<u64>,
    /// Read apart from the rest: a later format of this field is ignored, not fatal (the
    /// index only saves bytes; the release installs without it).
    #[serde(default)]
    index: Option<Value>,
}

#[derive(Deserialize)]
struct RawImage {
    size: Value,
    blake3: String,
    sha256: String,
}

impl RawRelease {
    fn validate(self) -> Result<Release, VerifyError> {
        let size = match self.image.size.as_u64() {
            Some(0) => return Err(VerifyError::invalid("image.size", "must not be zero")),
            Some(size) if size > MAX_IMAGE_BYTES => {
                return Err(VerifyError::invalid(
                    "image.size",
                    format!("{size} is larger than the {MAX_IMAGE_BYTES}-byte limit"),
                ));
            }
            Some(size) => size,
            None => {
                return Err(VerifyError::invalid(
                    "image.size",
                    format!("{} is not a byte count", self.image.size),
                ));
            }
        };
        let blake3 = Blake3Hash::from_hex(&self.image.blake3)
            .map_err(|e| VerifyError::invalid("image.blake3", e.to_string()))?;
        let sha256 = Sha256Hash::from_hex(&self.image.sha256)
            .map_err(|e| VerifyError::invalid("image.sha256", e.to_string()))?;
        if self.platforms.is_empty() {
            return Err(VerifyError::invalid("platforms", "must name at least one platform"));
        }
        if self.expires <= self.created {
            return Err(VerifyError::invalid("expires", "must be after `created`"));
        }
        if let Some(floor) = self.rollback_floor
            && floor > self.version
        {
            return Err(VerifyError::invalid(
                "rollback_floor",
                format!("{floor} is above the release's own version {}", self.version),
            ));
        }
        Ok(Release {
            version: self.version,
            version_name: self.version_name,
            image: ImageInfo { size, blake3, sha256 },
            platforms: self.platforms,
            notes: self.notes,
            created: self.created,
            expires: self.expires,
            rollback_floor: self.rollback_floor,
            index: self
                .index
                .and_then(|index| serde_json::from_value::<ContentIndex>(index).ok())
                .filter(|index| index.size > 0 && index.size <= MAX_INDEX_BYTES),
        })
    }
}

/// Whether an appliance is moving forward or was told to go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// A normal update: the release must be newer than the installed one.
    Upgrade,
    /// An operator-ordered fleet rollback: an older release is allowed, never below the floor.
    Rollback,
}

/// What an appliance knows about itself when it decides whether a release is for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPolicy {
    pub platform: String,
    pub installed_version: u64,
    /// The highest `rollback_floor` of any release this appliance has installed.
    pub rollback_floor: u64,
    pub intent: Intent,
}

/// A release whose signatures, fields and expiry have been checked against a trusted root.
///
/// Only [`crate::TrustedRoot::verify_release`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRelease {
    pub(crate) release: Release,
    pub(crate) document: SignedDocument,
}

impl VerifiedRelease {
    pub fn release(&self) -> &Release {
        &self.release
    }

    pub fn document(&self) -> &SignedDocument {
        &self.document
    }

    /// The manifest as signed, byte for byte what the signer produced (canonical form).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.document.to_bytes()
    }

    /// Checks that this appliance may install the release: platform, then version, then floor.
    pub fn check_install(&self, policy: &InstallPolicy) -> Result<(), VerifyError> {
        let release = &self.release;
        if !release.platforms.contains(&policy.platform) {
            return Err(VerifyError::WrongPlatform {
                platform: policy.platform.clone(),
                supported: release.platforms.clone(),
            });
        }
        if policy.intent == Intent::Upgrade && release.version <= policy.installed_version {
            return Err(VerifyError::NotNewer {
                version: release.version,
                installed: policy.installed_version,
            });
        }
        if release.version < policy.rollback_floor {
            return Err(VerifyError::BelowRollbackFloor {
                version: release.version,
                floor: policy.rollback_floor,
            });
        }
        Ok(())
    }
}
