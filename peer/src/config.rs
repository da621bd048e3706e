//! The agent's configuration: one TOML file with documented defaults; every option can also be
//! given as a flag (`main.rs`).
//!
//! Keys this agent does not know are never fatal: a file written for a newer agent is exactly
//! what an appliance holds after rolling back to an older release, and an agent that refused
//! it could not be managed at all. They are collected in [`AgentConfig::unknown_keys`], logged
//! at start and shown by `status`; `config check` ([`AgentConfig::check`]) is the strict
//! reading a person asks for to catch typos.

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
    /// Only from the strict [`AgentConfig::check`]: the agent itself ignores such keys.
    #[error("unknown key `{0}`")]
    UnknownKey(String),
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
#[serde(default)]
pub struct AgentConfig {
    /// Coordinator base URL: `https://…` in the field (`http://` for a lab or a TLS proxy on
    /// the appliance's own network).
    pub coordinator: String,
    /// For an `https://` coordinator, trust only the CA certificates in this PEM file instead
    /// of the system's roots: a fleet with its own CA pins it here. Unset: the system's roots
    /// (`/etc/ssl/certs`, package `ca-certificates`).
    pub coordinator_ca: Option<PathBuf>,
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
    /// Health-gate check timeout: each check, `health_command` included, gets this long.
    pub health_timeout_secs: u64,
    /// The release's own health check, run on a trial boot after the built-in checks (argv:
    /// program and arguments, no shell), e.g. `["/usr/libexec/sitecast/health-check"]`.
    /// Exit status 0 passes. Any other status, death by a signal, a program that cannot be
    /// started, or one still running after `health_timeout_secs` (it is killed, with the
    /// processes of its group) fails the gate; the reason names the command and holds its
    /// status and the end of its output (stdout and stderr together). Empty (the default):
    /// no such check.
    pub health_command: Vec<String>,
    /// An os-release style file of the running system whose `VERSION_ID=N` line names the
    /// release of the booted slot (e.g. `/etc/sitecast-release`; the value may be quoted), read
    /// at start (on a trial boot, once the health gate passed): a slot the agent knows no
    /// release of takes this one, so a fresh appliance reports what it was installed with
    /// instead of 0; where the agent's record differs, the file wins (it is what runs). A
    /// missing, unreadable or malformed file is logged and ignored. Unset (the default): the
    /// agent knows only the releases it installed.
    pub release_file: Option<PathBuf>,
    /// Keys of the file this agent does not know (dotted paths, in file order): ignored, not
    /// read from or written to a file.
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let state_dir = PathBuf::from("/var/lib/sitecast");
        Self {
            coordinator: "http://127.0.0.1:8080".into(),
            coordinator_ca: None,
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
            health_command: Vec::new(),
            release_file: None,
            unknown_keys: Vec::new(),
        }
    }
}

impl AgentConfig {
    /// Reads `path`; a missing file means all defaults. Unknown keys are kept in
    /// [`AgentConfig::unknown_keys`], not refused.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text)
                .map_err(|error| ConfigError::Parse { path: path.to_owned(), error }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(ConfigError::Read { path: path.to_owned(), error }),
        }
    }

    /// Reads a configuration text, collecting the keys it does not know at any depth.
    pub fn parse(text: &str) -> Result<Self, String> {
        let document = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
        let mut unknown = Vec::new();
        let mut config: Self =
            serde_ignored::deserialize(document, |path| unknown.push(path.to_string()))
                .map_err(|e| e.to_string())?;
        config.unknown_keys = unknown;
        Ok(config)
    }

    /// The strict reading for `config check`: every unknown key and what fails validation;
    /// empty when the file is fine. A missing file is a problem here (a mistyped path).
    pub fn check(path: &Path) -> Vec<ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) => return vec![ConfigError::Read { path: path.to_owned(), error }],
        };
        Self::check_text(&text)
            .into_iter()
            .map(|problem| match problem {
                ConfigError::Parse { error, .. } => {
                    ConfigError::Parse { path: path.to_owned(), error }
                }
                other => other,
            })
            .collect()
    }

    fn check_text(text: &str) -> Vec<ConfigError> {
        let config = match Self::parse(text) {
            Ok(config) => config,
            Err(error) => return vec![ConfigError::Parse { path: PathBuf::new(), error }],
        };
        let mut problems: Vec<ConfigError> =
            config.unknown_keys.iter().cloned().map(ConfigError::UnknownKey).collect();
        problems.extend(config.validate().err());
        problems
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
        if self.health_command.first().is_some_and(|program| program.trim().is_empty()) {
            return Err(ConfigError::Invalid("health_command names no program".into()));
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
        let config = AgentConfig::parse("site = \"store-9\"\nboot_slot = \"simulate-grub\"\n")
            .expect("toml");
        assert_eq!(config.site, "store-9");
        assert_eq!(config.boot_slot, BootSlotSource::SimulateGrub);
        assert_eq!(config.checkin_interval_secs, 60);
        assert!(config.unknown_keys.is_empty());
        assert!(AgentConfig::check_text("site = \"store-9\"\n").is_empty());
        let problems = AgentConfig::check_text("sight = \"typo\"");
        assert!(
            matches!(&problems[..], [ConfigError::UnknownKey(key)] if key == "sight"),
            "typos are caught by the strict check: {problems:?}"
        );
    }

    #[test]
    fn the_release_keys_are_optional() {
        let config = AgentConfig::parse(
            "health_command = [\"/usr/libexec/sitecast/health-check\", \"--quick\"]\n\
             release_file = \"/etc/sitecast-release\"\n",
        )
        .expect("toml");
        assert_eq!(config.health_command, ["/usr/libexec/sitecast/health-check", "--quick"]);
        assert_eq!(config.release_file.as_deref(), Some(Path::new("/etc/sitecast-release")));
        assert!(config.unknown_keys.is_empty() && config.validate().is_ok());
        let defaults = AgentConfig::default();
        assert!(defaults.health_command.is_empty() && defaults.release_file.is_none());
        let problems = AgentConfig::check_text("health_command = [\"\"]\n");
        assert!(matches!(&problems[..], [ConfigError::Invalid(_)]), "{problems:?}");
    }

    #[test]
    fn keys_of_a_newer_agent_are_collected_not_fatal() {
        let text =
            "future_option = 1\nsite = \"store-9\"\n\n[future_table]\ndeep = { deeper = true }\n";
        let config = AgentConfig::parse(text).expect("an older agent still reads the file");
        assert_eq!(config.site, "store-9");
        assert_eq!(config.unknown_keys, ["future_option", "future_table"]);
        let problems: Vec<String> =
            AgentConfig::check_text(text).iter().map(ToString::to_string).collect();
        assert_eq!(problems, ["unknown key `future_option`", "unknown key `future_table`"]);
    }

    #[test]
    fn the_strict_check_reports_validation_and_type_errors_too() {
        let problems = AgentConfig::check_text("boot_tries = 0\nfuture = 1\n");
        assert!(
            matches!(&problems[..], [ConfigError::UnknownKey(_), ConfigError::Invalid(_)]),
            "{problems:?}"
        );
        // A wrong type is not an unknown key: even the agent refuses it.
        assert!(AgentConfig::parse("checkin_interval_secs = \"soon\"").is_err());
        assert!(matches!(
            &AgentConfig::check_text("checkin_interval_secs = \"soon\"")[..],
            [ConfigError::Parse { .. }]
        ));
    }
}
