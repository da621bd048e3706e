//! The agent release manifest: a version of the appliance agent shipped apart from any OS
//! image, and the checks before an appliance switches to it.
//!
//! Signed by the same release keys under the same root as image releases; its own `type`, so
//! neither can be passed off as the other.

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::envelope::{SignedDocument, signed_object};
use crate::error::VerifyError;
use crate::hash::{Blake3Hash, Sha256Hash};
use crate::keys::SecretKey;
use crate::release::Intent;

/// The `type` of an agent release manifest.
pub const AGENT_TYPE: &str = "sitecast.agent";
/// The major format this reader understands. Additive changes never bump it.
pub const AGENT_FORMAT: u64 = 1;
/// Larger files are refused as implausible for an agent.
pub const MAX_AGENT_FILE_BYTES: u64 = 1 << 30;
/// More files per platform are refused as implausible.
pub const MAX_AGENT_FILES: usize = 256;

/// One file of an agent build, installed at `path` inside the version's own directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentFile {
    /// Relative, `/`-separated, plain components only (no `.`, `..` or empty ones).
    pub path: String,
    pub size: u64,
    pub blake3: Blake3Hash,
    pub sha256: Sha256Hash,
    /// Installed with mode 0755 if true, 0644 if not.
    pub executable: bool,
}

/// The agent for one platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentBuild {
    pub platform: String,
    /// The file the launcher starts; one of `files`, executable.
    pub entry: String,
    pub files: Vec<AgentFile>,
}

/// The OS releases (image versions) an agent runs on: `min` to `max`, both included; no `max`
/// means every later one too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsReleases {
    pub min: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

impl OsReleases {
    pub fn contains(&self, os_release: u64) -> bool {
        os_release >= self.min && self.max.is_none_or(|max| os_release <= max)
    }
}

/// The fields of an agent release manifest this version of sitecast knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRelease {
    /// Monotonic agent version: what "newer" means.
    pub version: u64,
    /// For humans, e.g. `1.4.2`; never compared.
    pub version_name: String,
    pub builds: Vec<AgentBuild>,
    pub os_releases: OsReleases,
    pub notes: String,
    pub created: Timestamp,
    pub expires: Timestamp,
}

impl AgentRelease {
    /// The `signed` object, with `type` and `format` set.
    pub fn to_signed(&self) -> Map<String, Value> {
        signed_object(self, AGENT_TYPE, AGENT_FORMAT)
    }

    /// Signs with `keys` (release keys; each adds one signature).
    pub fn sign(&self, keys: &[&SecretKey]) -> SignedDocument {
        SignedDocument::sign(self.to_signed(), keys)
    }

    /// The field checks a reader makes (paths, entry, platforms, OS range, expiry after
    /// creation), without signatures: for a signer, before anything is written.
    pub fn check(&self) -> Result<(), VerifyError> {
        Self::from_signed(&self.to_signed()).map(drop)
    }

    pub(crate) fn from_signed(signed: &Map<String, Value>) -> Result<Self, VerifyError> {
        let raw: RawAgentRelease = serde_json::from_value(Value::Object(signed.clone()))
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        raw.validate()
    }
}

/// What an appliance knows about itself when it decides whether an agent release is for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPolicy {
    pub platform: String,
    /// The OS release the appliance runs (its booted slot's).
    pub os_release: u64,
    /// The agent version it runs.
    pub installed_version: u64,
    pub intent: Intent,
}

/// An agent release whose signatures, fields and expiry have been checked against a trusted
/// root. Only [`crate::TrustedRoot::verify_agent_release`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedAgentRelease {
    pub(crate) release: AgentRelease,
    pub(crate) document: SignedDocument,
}

impl VerifiedAgentRelease {
    pub fn release(&self) -> &AgentRelease {
        &self.release
    }

    /// The manifest as signed, byte for byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.document.to_bytes()
    }

    /// The build this appliance may switch to: its platform, then its OS release, then newer
    /// than what runs (unless an operator ordered a rollback).
    pub fn build_for(&self, policy: &AgentPolicy) -> Result<&AgentBuild, VerifyError> {
        let release = &self.release;
        let Some(build) = release.builds.iter().find(|b| b.platform == policy.platform) else {
            return Err(VerifyError::WrongPlatform {
                platform: policy.platform.clone(),
                supported: release.builds.iter().map(|b| b.platform.clone()).collect(),
            });
        };
        if !release.os_releases.contains(policy.os_release) {
            return Err(VerifyError::OsReleaseNotSupported {
                os_release: policy.os_release,
                min: release.os_releases.min,
                max: release.os_releases.max,
            });
        }
        if policy.intent == Intent::Upgrade && release.version <= policy.installed_version {
            return Err(VerifyError::NotNewer {
                version: release.version,
                installed: policy.installed_version,
            });
        }
        Ok(build)
    }
}

#[derive(Deserialize)]
struct RawAgentRelease {
    version: u64,
    version_name: String,
    builds: Vec<RawBuild>,
    os_releases: OsReleases,
    #[serde(default)]
    notes: String,
    created: Timestamp,
    expires: Timestamp,
}

#[derive(Deserialize)]
struct RawBuild {
    platform: String,
    entry: String,
    files: Vec<RawFile>,
}

#[derive(Deserialize)]
struct RawFile {
    path: String,
    size: u64,
    blake3: String,
    sha256: String,
    #[serde(default)]
    executable: bool,
}

impl RawAgentRelease {
    fn validate(self) -> Result<AgentRelease, VerifyError> {
        if self.builds.is_empty() {
            return Err(VerifyError::invalid(
                "builds",
                "must hold a build for at least one platform",
            ));
        }
        let mut platforms = BTreeSet::new();
        let builds = self
            .builds
            .into_iter()
            .map(|build| {
                if !platforms.insert(build.platform.clone()) {
                    let why = format!("platform {:?} has two builds", build.platform);
                    return Err(VerifyError::invalid("builds.platform", why));
                }
                build.validate()
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(max) = self.os_releases.max
            && max < self.os_releases.min
        {
            let why = format!("max {max} is below min {}", self.os_releases.min);
            return Err(VerifyError::invalid("os_releases", why));
        }
        if self.expires <= self.created {
            return Err(VerifyError::invalid("expires", "must be after `created`"));
        }
        Ok(AgentRelease {
            version: self.version,
            version_name: self.version_name,
            builds,
            os_releases: self.os_releases,
            notes: self.notes,
            created: self.created,
            expires: self.expires,
        })
    }
}

impl RawBuild {
    fn validate(self) -> Result<AgentBuild, VerifyError> {
        if self.files.is_empty() || self.files.len() > MAX_AGENT_FILES {
            let why = format!("{} files; 1 to {MAX_AGENT_FILES} allowed", self.files.len());
            return Err(VerifyError::invalid("builds.files", why));
        }
        let mut paths = BTreeSet::new();
        let mut files = Vec::with_capacity(self.files.len());
        for file in self.files {
            check_path(&file.path).map_err(|why| VerifyError::invalid("builds.files.path", why))?;
            // A file and a directory of the same name cannot both be installed.
            let clash = paths.iter().any(|p: &String| {
                p.strip_prefix(&file.path).is_some_and(|rest| rest.starts_with('/'))
                    || file.path.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/'))
            });
            if clash || !paths.insert(file.path.clone()) {
                let why = format!("{:?} is listed twice or inside another file", file.path);
                return Err(VerifyError::invalid("builds.files.path", why));
            }
            if file.size > MAX_AGENT_FILE_BYTES {
                let why = format!("{} bytes; at most {MAX_AGENT_FILE_BYTES}", file.size);
                return Err(VerifyError::invalid("builds.files.size", why));
            }
            files.push(AgentFile {
                blake3: Blake3Hash::from_hex(&file.blake3)
                    .map_err(|e| VerifyError::invalid("builds.files.blake3", e.to_string()))?,
                sha256: Sha256Hash::from_hex(&file.sha256)
                    .map_err(|e| VerifyError::invalid("builds.files.sha256", e.to_string()))?,
                path: file.path,
                size: file.size,
                executable: file.executable,
            });
        }
        if !files.iter().any(|f| f.path == self.entry && f.executable) {
            let why = format!("{:?} is not one of the build's executable files", self.entry);
            return Err(VerifyError::invalid("builds.entry", why));
        }
        Ok(AgentBuild { platform: self.platform, entry: self.entry, files })
    }
}

/// A path that stays inside the directory it is installed into, on any file system.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 255 {
        return Err(format!("{path:?}: 1 to 255 bytes"));
    }
    if path.contains(['\0', '\\']) {
        return Err(format!("{path:?}: no NUL or backslash"));
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("{path:?}: relative, plain components only"));
    }
    Ok(())
}
