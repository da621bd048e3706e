//! What the agent remembers across restarts and reboots, in one JSON file replaced atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::{UpdateIntent, UpdateState};

/// The update in progress (or the last one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub version: u64,
    /// The signed manifest as received; re-verified after every restart.
    pub manifest: String,
    pub state: UpdateState,
    /// The slot the update is written to.
    pub slot: String,
    pub previous_version: u64,
    #[serde(default)]
    pub rollout: Option<u64>,
    pub intent: UpdateIntent,
    pub started: Timestamp,
    #[serde(default)]
    pub ranges_url: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub bytes_from_origin: u64,
    #[serde(default)]
    pub bytes_from_lan: u64,
    #[serde(default)]
    pub download_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// Release version in each slot, as far as the agent knows ("A"/"B").
    #[serde(default)]
    pub slot_versions: BTreeMap<String, u64>,
    /// Highest rollback floor of any release installed.
    #[serde(default)]
    pub rollback_floor: u64,
    #[serde(default)]
    pub update: Option<UpdateRecord>,
    #[serde(default)]
    pub last_contact: Option<Timestamp>,
    /// When the slot now running first booted after an update (the connectivity rule).
    #[serde(default)]
    pub booted_at: Option<Timestamp>,
    /// Reboot without waiting for the maintenance window, once.
    #[serde(default)]
    pub skip_window: bool,
    #[serde(default)]
    pub rollbacks: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("agent state {path}: {error}")]
pub struct StateError {
    path: PathBuf,
    error: String,
}

impl AgentState {
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StateError { path: path.to_owned(), error: e.to_string() }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(StateError { path: path.to_owned(), error: error.to_string() }),
        }
    }

    /// Writes a temporary file, syncs it and renames it over the old one.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let fail =
            |error: std::io::Error| StateError { path: path.to_owned(), error: error.to_string() };
        let temp = path.with_extension("json.new");
        let mut file = std::fs::File::create(&temp).map_err(fail)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("plain data")).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&temp, path).map_err(fail)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
        }
        Ok(())
    }

    pub fn version_of(&self, slot: sitecast_iso::Slot) -> u64 {
        self.slot_versions.get(&slot.to_string()).copied().unwrap_or(0)
    }
}
