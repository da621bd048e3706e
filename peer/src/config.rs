//! The agent's configuration: one TOML file with documented defaults; every option can also be
//! given as a flag (`main.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How the agent learns which slot it booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootSlotSource {
    /// `ab.partition=A|B` on the kernel command line (`/proc/cmdline`): real appliances.
    Cmdline,
    /// The agent applies the GRUB script's rules to the env block itself at start, as GRUB
    /// would have: for file-backed slots (demo, lab, tests) where no bootloader runs.
    SimulateGrub,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Coordinator base URL.
    pub coordinator: String,
    /// Site id: appliances of a site share releases over the LAN.
    pub site: String,
    pub name: String,
    pub group: Option<String>,
    pub platform: String,
    /// Needed on the first check-in only.
    pub enrollment_token: Option<String>,
    /// The pinned root of trust (`root.json`).
    pub root: PathBuf,
    /// Identity key, state, progress records.
    pub state_dir: PathBuf,
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    /// The GRUB environment block.
    pub grubenv: PathBuf,
    pub boot_slot: BootSlotSource,
    /// Run to reboot; empty: exit with status 75 and let the supervisor start the agent again.
    pub reboot_command: Vec<String>,
    /// MAC addresses to report; empty: read from /sys/class/net.
    pub macs: Vec<String>,
    pub checkin_interval_secs: u64,
    /// Where the agent's LAN data plane listens (iroh, QUIC/UDP).
    pub lan_listen: String,
    /// Where the site control plane listens (libp2p TCP multiaddress): discovery and have-maps.
    pub libp2p_listen: String,
    /// Find site peers by multicast DNS (off where multicast is blocked, and on loopback, where
    /// it cannot work).
    pub mdns: bool,
    /// Dial the site peers the coordinator lists in its check-in answers.
    pub coordinator_peers: bool,
    /// Static site peers (`/ip4/<ip>/tcp/<port>/p2p/<peer id>`), for networks where discovery
    /// cannot work.
    pub static_peers: Vec<String>,
    /// Upload cap for serving peers, bytes per second in total (0: none).
    pub upload_limit_bytes_per_sec: u64,
    /// Upload cap to any one peer, bytes per second (0: none).
    pub upload_limit_per_peer_bytes_per_sec: u64,
    /// Concurrent peers served at most.
    pub max_upload_peers: usize,
    /// Local control socket (`check`, `status`, `rollback`, `skip-window`).
    pub control_socket: PathBuf,
    /// Prometheus metrics listener (empty: off).
    pub metrics_listen: String,
    /// Trial boots for a new slot.
    pub boot_tries: u8,
    /// Health-gate check timeout.
    pub health_timeout_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let state_dir = PathBuf::from("/var/lib/sitecast");
        Self {
            coordinator: "http://127.0.0.1:8080".into(),
            site: "default".into(),
            name: String::new(),
            group: None,
            platform: "x86_64-appliance".into(),
            enrollment_token: None,
            root: PathBuf::from("/etc/sitecast/root.json"),
            control_socket: state_dir.join("control.sock"),
            state_dir,
            slot_a: PathBuf::from("/dev/disk/by-partlabel/system-a"),
            slot_b: PathBuf::from("/dev/disk/by-partlabel/system-b"),
            grubenv: PathBuf::from("/boot/grub/grubenv"),
            boot_slot: BootSlotSource::Cmdline,
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            macs: Vec::new(),
            checkin_interval_secs: 60,
            lan_listen: "0.0.0.0:4433".into(),
            libp2p_listen: "/ip4/0.0.0.0/tcp/4434".into(),
            mdns: true,
            coordinator_peers: true,
            static_peers: Vec::new(),
            upload_limit_bytes_per_sec: 0,
            upload_limit_per_peer_bytes_per_sec: 0,
            max_upload_peers: 8,
            metrics_listen: String::new(),
            boot_tries: sitecast_iso::DEFAULT_TRIES,
            health_timeout_secs: 30,
        }
    }
}

impl AgentConfig {
    /// Reads `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(error) => return Err(ConfigError::Read { path: path.to_owned(), error }),
        };
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), error: e.to_string() })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.site.trim().is_empty() {
            return Err(ConfigError::Invalid("site must not be empty".into()));
        }
        if !(1..=sitecast_iso::ab::MAX_TRIES).contains(&self.boot_tries) {
            return Err(ConfigError::Invalid(format!(
                "boot_tries must be 1..={}",
                sitecast_iso::ab::MAX_TRIES
            )));
        }
        if self.libp2p_listen.parse::<libp2p::Multiaddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "libp2p_listen {:?} is not a multiaddress",
                self.libp2p_listen
            )));
        }
        if self.slot_a == self.slot_b {
            return Err(ConfigError::Invalid("slot_a and slot_b are the same path".into()));
        }
        Ok(())
    }

    pub fn checkin_interval(&self) -> Duration {
        Duration::from_secs(self.checkin_interval_secs.max(1))
    }

    pub fn slot_path(&self, slot: sitecast_iso::Slot) -> &Path {
        match slot {
            sitecast_iso::Slot::A => &self.slot_a,
            sitecast_iso::Slot::B => &self.slot_b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let config: AgentConfig =
            toml::from_str("site = \"store-9\"\nboot_slot = \"simulate-grub\"\n").expect("toml");
        assert_eq!(config.site, "store-9");
        assert_eq!(config.boot_slot, BootSlotSource::SimulateGrub);
        assert_eq!(config.checkin_interval_secs, 60);
        assert!(toml::from_str::<AgentConfig>("sight = \"typo\"").is_err(), "typos are caught");
    }
}
