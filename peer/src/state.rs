//! What the agent remembers across restarts and reboots, in one JSON file replaced atomically.
//!
//! Every field is defaulted and unknown fields are ignored, both ways: an agent reads the file
//! an older agent wrote, and an agent rolled back to an older release reads a newer one's.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sitecast_manifest::Blake3Hash;
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
    /// The image's outboard as the site shares it, served again after a restart.
    #[serde(default)]
    pub outboard_blob: Option<sitecast_manifest::api::BlobOffer>,
    /// The image's group hashes as the site shares them, served again after a restart.
    #[serde(default)]
    pub group_hashes_blob: Option<sitecast_manifest::api::BlobOffer>,
    /// The plan for updating from the active slot's image as the site shares it, served
    /// again after a restart.
    #[serde(default)]
    pub plan_blob: Option<sitecast_manifest::api::BlobOffer>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub bytes_from_origin: u64,
    #[serde(default)]
    pub bytes_from_lan: u64,
    #[serde(default)]
    pub bytes_from_mirror: u64,
    #[serde(default)]
    pub bytes_reused: u64,
    #[serde(default)]
    pub download_seconds: Option<f64>,
    /// Boots of `slot` on trial that reached the agent (counted as its health gate starts):
    /// none means GRUB's tries went to boots that failed before the agent (kernel, early
    /// boot).
    #[serde(default)]
    pub trial_boots: u32,
    /// The report of `state` has not reached the coordinator yet: it goes again after the
    /// next check-in. Only a `rolled_back` report is kept for that (nothing else would
    /// tell the coordinator why).
    #[serde(default)]
    pub unreported: bool,
}

impl UpdateRecord {
    /// Its byte figures, as transfer figures (the rest zero).
    pub fn figures(&self) -> crate::swarm::TransferStats {
        crate::swarm::TransferStats {
            bytes_from_origin: self.bytes_from_origin,
            bytes_from_lan: self.bytes_from_lan,
            bytes_from_mirror: self.bytes_from_mirror,
            bytes_reused: self.bytes_reused,
            ..Default::default()
        }
    }
}

/// An agent release being fetched, staged and switched to (or the last one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentUpdateRecord {
    pub version: u64,
    /// The signed `sitecast.agent` manifest as received.
    pub manifest: String,
    #[serde(default)]
    pub rollout: Option<u64>,
    pub intent: UpdateIntent,
    /// Where its files are fetched from (`{files}/{blake3}`).
    pub files: String,
    #[serde(default)]
    pub in_window: bool,
    /// `downloading` (fetching and staging), `ready` (staged), `rebooting` (switched; the
    /// launcher restarts into it), `succeeded`, `failed`, `rolled_back`.
    pub state: UpdateState,
    #[serde(default)]
    pub error: Option<String>,
    /// Fetches that failed; at [`AGENT_FETCH_ATTEMPTS`] the release is given up.
    #[serde(default)]
    pub attempts: u32,
    pub started: Timestamp,
    /// What the fetch took from Central Command and from site peers.
    #[serde(default)]
    pub bytes_from_origin: u64,
    #[serde(default)]
    pub bytes_from_lan: u64,
}

/// Fetches of one agent release before it is given up (each at a check-in).
pub const AGENT_FETCH_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// Release version in each slot, as far as the agent knows ("A"/"B").
    #[serde(default)]
    pub slot_versions: BTreeMap<String, u64>,
    /// Bytes of the image in each slot the agent installed ("A"/"B"), or found there (the
    /// image Central Command named, once the slot's bytes hashed to it): how much of the
    /// active slot to read when copying what a new image shares with it.
    #[serde(default)]
    pub slot_image_sizes: BTreeMap<String, u64>,
    /// The BLAKE3 (hex) of the image in each slot the agent installed or found: Central Command
    /// compresses what a new image lacks against the active slot's bytes when it knows which
    /// release they are.
    #[serde(default)]
    pub slot_image_blake3: BTreeMap<String, String>,
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
    /// A check-in has succeeded: the coordinator knows this appliance, so the enrollment token
    /// (a fleet-wide secret) is not sent again until it says it does not.
    #[serde(default)]
    pub enrolled: bool,
    /// The highest report sequence number used. Saved before the report carrying it is sent,
    /// so a crash never reuses a number.
    #[serde(default)]
    pub report_seq: u64,
    /// The site's members (hex identity keys) from the last check-in answer that named them,
    /// so a restart without the coordinator still knows whom the LAN serves.
    #[serde(default)]
    pub site_members: Option<Vec<String>>,
    /// The maintenance window from the last check-in answer that gave one. Stored, so an
    /// agent restarted without the coordinator still waits for the operator's window instead
    /// of rebooting into a ready update at once.
    #[serde(default)]
    pub window: Option<sitecast_manifest::window::MaintenanceWindow>,
    #[serde(default)]
    pub agent_update: Option<AgentUpdateRecord>,
    /// Agent releases the launcher rolled back from: never fetched again.
    #[serde(default)]
    pub agent_refused: Vec<u64>,
    /// When the last rollback the launcher recorded was taken in (so it is reported once).
    #[serde(default)]
    pub agent_rollback_seen: Option<Timestamp>,
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

    /// Records the image `slot` holds, its size and BLAKE3 together: the copy from the active
    /// slot reads that many bytes, and answers are compressed against them by that hash.
    pub fn record_slot_image(&mut self, slot: sitecast_iso::Slot, size: u64, blake3: &Blake3Hash) {
        self.slot_image_sizes.insert(slot.to_string(), size);
        self.slot_image_blake3.insert(slot.to_string(), blake3.to_hex());
    }

    /// Forgets the image recorded for `slot`: it is about to be overwritten, or holds another
    /// release than recorded.
    pub fn forget_slot_image(&mut self, slot: sitecast_iso::Slot) {
        self.slot_image_sizes.remove(&slot.to_string());
        self.slot_image_blake3.remove(&slot.to_string());
    }

    pub fn version_of(&self, slot: sitecast_iso::Slot) -> u64 {
        self.slot_versions.get(&slot.to_string()).copied().unwrap_or(0)
    }

    /// Takes the next report sequence number; save the state before sending the report.
    pub fn next_report_seq(&mut self) -> u64 {
        self.report_seq += 1;
        self.report_seq
    }

    /// The coordinator has accepted reports up to `accepted`: continue above it (an agent
    /// whose state was lost or restored from an old copy would otherwise be refused).
    /// Returns whether the count moved.
    pub fn raise_report_seq(&mut self, accepted: u64) -> bool {
        let raised = accepted > self.report_seq;
        self.report_seq = self.report_seq.max(accepted);
        raised
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_state_file_reads_with_the_new_fields_defaulted() {
        let old = r#"{"slot_versions":{"A":1},"rollback_floor":0,"update":null,
            "last_contact":null,"booted_at":null,"skip_window":false,"rollbacks":0}"#;
        let state: AgentState = serde_json::from_str(old).expect("old file");
        assert!(!state.enrolled, "the token goes out once more, then never");
        assert_eq!((state.report_seq, state.site_members.as_ref()), (0, None));
        let newer = r#"{"report_seq":7,"enrolled":true,"quorum":{"epoch":3}}"#;
        let state: AgentState = serde_json::from_str(newer).expect("newer file");
        assert_eq!((state.report_seq, state.enrolled), (7, true));
    }

    #[test]
    fn report_numbers_only_go_up_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.json");
        let mut state = AgentState::default();
        assert_eq!(state.next_report_seq(), 1);
        state.save(&path).expect("save");
        let mut state = AgentState::load(&path).expect("load");
        assert_eq!(state.next_report_seq(), 2, "a restart continues the count");
        // The coordinator accepted more than this copy remembers (state restored from an old
        // backup, or lost): continue above the coordinator's number.
        assert!(state.raise_report_seq(40));
        assert_eq!(state.next_report_seq(), 41);
        // A lower or equal number never lowers the count.
        assert!(!state.raise_report_seq(12));
        assert!(!state.raise_report_seq(41));
        assert_eq!(state.next_report_seq(), 42);
    }
}
