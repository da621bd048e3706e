//! The root of trust: which keys may sign releases, and which may replace the root itself.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::agent::{AGENT_FORMAT, AGENT_TYPE, AgentRelease, VerifiedAgentRelease};
use crate::envelope::{SignedDocument, signed_object};
use crate::error::{Role, VerifyError};
use crate::keys::{PublicKey, SecretKey};
use crate::release::{RELEASE_FORMAT, RELEASE_TYPE, Release, VerifiedRelease};

/// The `type` of a root document.
pub const ROOT_TYPE: &str = "sitecast.root";
/// The major root format this reader understands.
pub const ROOT_FORMAT: u64 = 1;

/// A set of keys of which `threshold` must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    pub keys: Vec<PublicKey>,
    pub threshold: u32,
}

impl RoleKeys {
    fn validate(&self, field: &'static str) -> Result<(), VerifyError> {
        let mut sorted = self.keys.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.keys.len() {
            return Err(VerifyError::invalid(field, "a key is listed twice"));
        }
        if self.threshold == 0 || self.threshold as usize > self.keys.len() {
            return Err(VerifyError::invalid(
                field,
                format!("threshold {} with {} key(s)", self.threshold, self.keys.len()),
            ));
        }
        Ok(())
    }
}

/// The fields of a root document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Each rotation adds exactly one.
    pub version: u64,
    pub expires: Timestamp,
    /// Keys that sign root documents.
    pub root: RoleKeys,
    /// Keys that sign release manifests.
    pub release: RoleKeys,
}

impl Root {
    pub fn to_signed(&self) -> Map<String, Value> {
        signed_object(self, ROOT_TYPE, ROOT_FORMAT)
    }

    pub fn sign(&self, keys: &[&SecretKey]) -> SignedDocument {
        SignedDocument::sign(self.to_signed(), keys)
    }

    fn from_document(document: &SignedDocument) -> Result<Self, VerifyError> {
        document.check_kind(ROOT_TYPE, ROOT_FORMAT)?;
        let root: Root = serde_json::from_value(Value::Object(document.signed.clone()))
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        root.root.validate("root")?;
        root.release.validate("release")?;
        Ok(root)
    }
}

/// A root this appliance (or coordinator) trusts: pinned at install time, replaced only by a
/// rotation the old root signed.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedRoot {
    root: Root,
    document: SignedDocument,
}

impl TrustedRoot {
    /// Loads the pinned root. It must carry a threshold of its own root keys' signatures.
    /// Expiry is not checked here: an appliance with an expired root must still be able to
    /// load it to accept the rotation that replaces it.
    pub fn pin(bytes: &[u8]) -> Result<Self, VerifyError> {
        let document = SignedDocument::parse(bytes)?;
        let root = Root::from_document(&document)?;
        document.check_threshold(Role::Root, &root.root.keys, root.root.threshold)?;
        Ok(Self { root, document })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.document.to_bytes()
    }

    /// Accepts the next root: version exactly one higher, signed by a threshold of this root's
    /// root keys and by a threshold of its own. Intermediate roots may have expired (an appliance
    /// offline for years walks the chain); the newest one's expiry is checked when it is used.
    pub fn rotate(&self, bytes: &[u8]) -> Result<Self, VerifyError> {
        let document = SignedDocument::parse(bytes)?;
        let root = Root::from_document(&document)?;
        let expected = self.root.version + 1;
        if root.version != expected {
            return Err(VerifyError::RootVersion { expected, found: root.version });
        }
        document.check_threshold(Role::Root, &self.root.root.keys, self.root.root.threshold)?;
        document.check_threshold(Role::Root, &root.root.keys, root.root.threshold)?;
        Ok(Self { root, document })
    }

    /// Verifies a release manifest: size, envelope, type and format, this root's expiry,
    /// release signatures, fields, then the release's expiry. Appliance-specific checks
    /// (platform, version, floor) follow in [`VerifiedRelease::check_install`].
    pub fn verify_release(
        &self,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<VerifiedRelease, VerifyError> {
        let document = self.release_signed(bytes, RELEASE_TYPE, RELEASE_FORMAT, now)?;
        let release = Release::from_signed(&document.signed)?;
        if release.expires <= now {
            return Err(VerifyError::Expired { expires: release.expires, now });
        }
        Ok(VerifiedRelease { release, document })
    }

    /// Verifies an agent release manifest, in the same order as [`TrustedRoot::verify_release`]
    /// and with the same release keys; the appliance's own checks follow in
    /// [`VerifiedAgentRelease::build_for`].
    pub fn verify_agent_release(
        &self,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<VerifiedAgentRelease, VerifyError> {
        let document = self.release_signed(bytes, AGENT_TYPE, AGENT_FORMAT, now)?;
        let release = AgentRelease::from_signed(&document.signed)?;
        if release.expires <= now {
            return Err(VerifyError::Expired { expires: release.expires, now });
        }
        Ok(VerifiedAgentRelease { release, document })
    }

    /// Steps 1 to 5 for a document the release keys sign: size, envelope, kind, this root's
    /// expiry, signatures.
    fn release_signed(
        &self,
        bytes: &[u8],
        kind: &'static str,
        format: u64,
        now: Timestamp,
    ) -> Result<SignedDocument, VerifyError> {
        let document = SignedDocument::parse(bytes)?;
        document.check_kind(kind, format)?;
        if self.root.expires <= now {
            return Err(VerifyError::RootExpired {
                version: self.root.version,
                expires: self.root.expires,
                now,
            });
        }
        let keys = &self.root.release;
        document.check_threshold(Role::Release, &keys.keys, keys.threshold)?;
        Ok(document)
    }
}
