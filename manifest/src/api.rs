//! The HTTP API between appliances, operators and the coordinator: JSON bodies shared by the
//! `peer` and `coordinator` crates so they are written once.
//!
//! Versioned by tolerance: readers ignore fields they do not know (serde's default, never
//! switched off), new fields are optional or defaulted, and an unknown enum value reads as
//! `Unknown` rather than failing the whole body. Writers never change the meaning of an
//! existing field.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::Blake3Hash;
use crate::window::MaintenanceWindow;

/// Headers that carry an appliance's identity and its signature over the request.
pub const HEADER_APPLIANCE: &str = "x-sitecast-appliance";
pub const HEADER_TIMESTAMP: &str = "x-sitecast-timestamp";
pub const HEADER_SIGNATURE: &str = "x-sitecast-signature";
/// Requests older or newer than this (seconds) are refused as replays or clock trouble.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// The image's SHA-256 on `GET /api/releases/{version}/image`, for legacy agents.
pub const HEADER_IMAGE_SHA256: &str = "x-sitecast-sha256";

/// On `GET /api/blobs/{hash}/ranges`: the response carries every range of `ranges=`, not only
/// `start..end` (a Central Command that predates runs serves that alone, without it).
pub const HEADER_RUNS: &str = "x-sitecast-runs";

/// On `GET /api/blobs/{hash}/bytes`: the answer is zstd compressed against these bytes
/// (`A-B`) of the older image named by `from=`, the `reference=` asked for. Without it the
/// answer uses no reference (a Central Command that predates references, or one that could
/// not use it).
pub const HEADER_REFERENCE: &str = "x-sitecast-reference";

/// What an appliance signs for each request: method, path (with query), timestamp, body.
pub fn appliance_signing_bytes(method: &str, path: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("sitecast appliance request v1\n{method}\n{path}\n{timestamp}\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Normalizes a MAC address given as `aa:bb:cc:dd:ee:ff`, `AA-BB-CC-DD-EE-FF`,
/// `aabb.ccdd.eeff` or `aabbccddeeff` to `aa:bb:cc:dd:ee:ff`. Separators must be one of those
/// spellings throughout: `aa:bb-cc…` or `a:a:b:b:…` is not a MAC address.
pub fn normalize_mac(text: &str) -> Option<String> {
    let hex =
        |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
    let digits: String = if text.len() == 12 && hex(text, 12) {
        text.to_owned()
    } else if let Some(sep) = [':', '-'].into_iter().find(|s| text.contains(*s)) {
        let parts: Vec<&str> = text.split(sep).collect();
        if parts.len() != 6 || !parts.iter().all(|p| hex(p, 2)) {
            return None;
        }
        parts.concat()
    } else {
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() != 3 || !parts.iter().all(|p| hex(p, 4)) {
            return None;
        }
        parts.concat()
    };
    let digits = digits.to_ascii_lowercase();
    let pairs: Vec<&str> = (0..6).map(|i| &digits[2 * i..2 * i + 2]).collect();
    Some(pairs.join(":"))
}

/// Where an appliance is in an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Pending,
    Downloading,
    Ready,
    Rebooting,
    Succeeded,
    Failed,
    RolledBack,
    /// A state a newer agent reports that this reader does not know.
    #[serde(other)]
    Unknown,
}

impl UpdateState {
    pub const ALL: [UpdateState; 7] = [
        UpdateState::Pending,
        UpdateState::Downloading,
        UpdateState::Ready,
        UpdateState::Rebooting,
        UpdateState::Succeeded,
        UpdateState::Failed,
        UpdateState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Pending => "pending",
            UpdateState::Downloading => "downloading",
            UpdateState::Ready => "ready",
            UpdateState::Rebooting => "rebooting",
            UpdateState::Succeeded => "succeeded",
            UpdateState::Failed => "failed",
            UpdateState::RolledBack => "rolled_back",
            UpdateState::Unknown => "unknown",
        }
    }

    /// Counts against the rollout's failure threshold.
    pub fn is_failure(self) -> bool {
        matches!(self, UpdateState::Failed | UpdateState::RolledBack)
    }

    /// No further report is expected for this update.
    pub fn is_terminal(self) -> bool {
        matches!(self, UpdateState::Succeeded | UpdateState::Failed | UpdateState::RolledBack)
    }
}

/// How an appliance can be reached by its site peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddresses {
    /// libp2p multiaddresses of the control plane.
    #[serde(default)]
    pub libp2p: Vec<String>,
    /// iroh endpoint id (hex public key).
    #[serde(default)]
    pub iroh_id: Option<String>,
    /// iroh direct socket addresses.
    #[serde(default)]
    pub iroh_addrs: Vec<String>,
}

/// `POST /api/appliances/checkin`, signed by the appliance's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckinRequest {
    pub site: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    /// As the appliance found them; the coordinator normalizes.
    #[serde(default)]
    pub macs: Vec<String>,
    pub platform: String,
    pub installed_version: u64,
    #[serde(default)]
    pub active_slot: Option<String>,
    #[serde(default)]
    pub agent_version: String,
    /// The agent release (`sitecast.agent` version) running: the launcher's version, or the
    /// one built into the image's agent. `None` from agents older than agent releases.
    #[serde(default)]
    pub agent_release: Option<u64>,
    /// The agent release kept for a rollback (the launcher's `previous`), if any.
    #[serde(default)]
    pub agent_previous: Option<u64>,
    /// Needed only the first time: proves the appliance may join the fleet.
    #[serde(default)]
    pub enrollment_token: Option<String>,
    #[serde(default)]
    pub peer: PeerAddresses,
}

/// Whether the offered release moves forward or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateIntent {
    Upgrade,
    Rollback,
    #[serde(other)]
    Unknown,
}

/// Where an appliance fetches a release from when no LAN peer has a piece.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginUrls {
    /// `GET {ranges}?start=&end=` (group indices) returns verified ranges.
    pub ranges: String,
    /// The plain image, `Range` supported.
    pub image: String,
    /// The coordinator's iroh-blobs provider, `<endpoint id hex>@<ip:port>`, if it runs one.
    #[serde(default)]
    pub iroh: Vec<String>,
    /// The image's outboard (its BLAKE3 tree's parent hashes, pre-order, as stored by
    /// iroh-blobs): what an appliance verifies a mirror's plain bytes against.
    #[serde(default)]
    pub outboard: Option<String>,
    /// Other HTTP origins of the same image (a CDN, an object store, nginx), tried in order
    /// before `ranges`, which stays the fallback. Plain `Range` requests; untrusted: every
    /// group is verified against the outboard and the signed root before it is written.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// The image's outboard as a blob of its own, which site peers share (each appliance
    /// fetching `outboard` from Central Command instead costs a site that many copies); its
    /// hash is Central Command's word, and what it holds is checked against the signed root
    /// as it is used.
    #[serde(default)]
    pub outboard_blob: Option<BlobOffer>,
    /// The image's group hashes as a blob the site shares: each 16 KiB group's BLAKE3
    /// chaining value, in order, half the outboard's bytes. An agent that knows them fetches
    /// these instead of `outboard_blob`, rebuilds the outboard from them and uses it only if
    /// it hashes to the signed root.
    #[serde(default)]
    pub group_hashes_blob: Option<BlobOffer>,
    /// Verified ranges of the image's content index (a blob like the image), when its
    /// release signs one: what lets an appliance copy what its active slot shares with the
    /// image instead of fetching it.
    #[serde(default)]
    pub index: Option<String>,
    /// Plain bytes of the image: `GET {bytes}?ranges=A-B,C-D,…` (byte offsets, `B`
    /// exclusive) returns those bytes, concatenated. What an appliance that copied part of a
    /// group from its active slot fetches of the rest, verifying the group against the
    /// outboard once it is whole.
    #[serde(default)]
    pub bytes: Option<String>,
    /// The image of the release this appliance says it runs (`installed_version`), when
    /// Central Command holds it. An agent that did not write its active slot itself (the
    /// installer did) checks that the slot's first `size` bytes hash to `blake3`; if they do,
    /// it copies from those bytes only and names that image in `bytes` requests, so what it
    /// lacks is compressed against its slot. Central Command's word, used only once the
    /// slot's own bytes confirm it.
    #[serde(default)]
    pub installed: Option<InstalledImage>,
    /// A plan for updating from `installed` to this image, as a blob the site shares
    /// (`sitecast_delta::plan`): where the image's shared bytes sit in `installed`, and the
    /// group hashes of the groups they do not cover whole. An agent whose active slot holds
    /// `installed` fetches it instead of the index and the group hashes, and uses it only if
    /// the tree it makes hashes to the signed root.
    #[serde(default)]
    pub plan: Option<BlobOffer>,
}

/// An image an appliance may hold in its active slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledImage {
    pub blake3: Blake3Hash,
    pub size: u64,
}

/// A file served as a blob: where its verified ranges are, and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobOffer {
    /// `GET {ranges}?start=&end=` (group indices) returns verified ranges, as for the image.
    pub ranges: String,
    pub size: u64,
    pub blake3: Blake3Hash,
    pub sha256: crate::Sha256Hash,
}

impl BlobOffer {
    /// The file offered: its size and hashes.
    pub fn file(&self) -> crate::ImageInfo {
        crate::ImageInfo { size: self.size, blake3: self.blake3, sha256: self.sha256 }
    }
}

/// `PUT /api/releases/{version}/mirrors`: the release's other HTTP origins, in the order
/// appliances try them (empty: Central Command alone). Each is checked before it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseMirrors {
    pub mirrors: Vec<String>,
}

/// A site peer that holds or fetches the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePeer {
    pub appliance: String,
    #[serde(default)]
    pub addresses: PeerAddresses,
    #[serde(default)]
    pub installed_version: u64,
    #[serde(default)]
    pub state: Option<UpdateState>,
}

/// The coordinator's answer to a check-in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckinResponse {
    pub appliance: String,
    pub update_available: bool,
    #[serde(default)]
    pub intent: Option<UpdateIntent>,
    /// The signed manifest document, byte for byte as signed.
    #[serde(default)]
    pub manifest: Option<String>,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub rollout: Option<u64>,
    #[serde(default)]
    pub origin: Option<OriginUrls>,
    #[serde(default)]
    pub window: Option<MaintenanceWindow>,
    #[serde(default)]
    pub site_peers: Vec<SitePeer>,
    #[serde(default)]
    pub checkin_interval_secs: Option<u64>,
    pub server_time: Timestamp,
    /// Identity keys (hex) of every appliance Central Command lists as a member of this
    /// appliance's site, this one included. The LAN data plane and the site's gossip admit only
    /// these. `None` from a coordinator that does not say: the agent then admits any peer, as
    /// before membership existed (integrity never depended on it: every group is verified).
    #[serde(default)]
    pub site_members: Option<Vec<String>>,
    /// The highest report sequence number the coordinator has accepted from this appliance,
    /// so an agent that lost its own count continues above it.
    #[serde(default)]
    pub report_seq: Option<u64>,
    /// An agent release to switch to, beside (and independent of) any image offer. Agents
    /// from before agent releases ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_offer: Option<AgentOffer>,
}

/// An agent release offered to an appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOffer {
    pub version: u64,
    /// The signed `sitecast.agent` document, byte for byte as signed.
    pub manifest: String,
    #[serde(default)]
    pub rollout: Option<u64>,
    #[serde(default = "upgrade")]
    pub intent: UpdateIntent,
    /// `GET {files}/{blake3 hex}` returns a file of the release (signed request).
    pub files: String,
    /// `GET {ranges}/{blake3 hex}/ranges?start=&end=` (group indices) returns verified ranges
    /// of a file, as for an image, so the files are fetched through the site swarm. Servers
    /// that do not say it serve whole files only.
    #[serde(default)]
    pub ranges: Option<String>,
    /// Switch only inside the maintenance window (fetching and staging may happen at once).
    #[serde(default)]
    pub in_window: bool,
}

fn upgrade() -> UpdateIntent {
    UpdateIntent::Upgrade
}

/// `POST /api/appliances/report`: a state change of an update, signed by the appliance.
/// `POST /api/appliances/agent-report` takes the same body about an agent release
/// (`version` is the agent release; `downloading`, `ready` once staged, `rebooting` while the
/// launcher restarts into it, `failed`, `rolled_back` when the launcher gave it up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRequest {
    pub state: UpdateState,
    /// The release the report is about.
    pub version: u64,
    #[serde(default)]
    pub previous_version: Option<u64>,
    #[serde(default)]
    pub rollout: Option<u64>,
    /// 0.0–1.0 while downloading.
    #[serde(default)]
    pub progress: Option<f64>,
    #[serde(default)]
    pub bytes_from_origin: u64,
    #[serde(default)]
    pub bytes_from_lan: u64,
    /// Bytes from the release's mirrors (not counted in `bytes_from_origin`, which Central
    /// Command served itself).
    #[serde(default)]
    pub bytes_from_mirror: u64,
    /// Bytes copied from the active slot (what the new image shares with the running one):
    /// neither fetched nor sent.
    #[serde(default)]
    pub bytes_reused: u64,
    #[serde(default)]
    pub slot: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Increases with every report this appliance sends (persisted by the agent); the
    /// coordinator refuses a report whose number is not above the last one it accepted, so a
    /// captured report cannot be replayed or reordered.
    #[serde(default)]
    pub seq: Option<u64>,
}

/// Every error body: a message for humans and a stable code for programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_normalized_from_every_spelling() {
        for spelling in ["aa:bb:cc:0d:ee:ff", "AA-BB-CC-0D-EE-FF", "aabb.cc0d.eeff", "AABBCC0DEEFF"]
        {
            assert_eq!(normalize_mac(spelling).as_deref(), Some("aa:bb:cc:0d:ee:ff"), "{spelling}");
        }
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "gg:bb:cc:dd:ee:ff",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb-cc:dd:ee:ff",
            "a:a:b:b:c:c:d:d:e:e:f:f",
            "aabb.ccdd.eeff.",
            "aa::bbccddeeff",
            "+abbccddeeff",
        ] {
            assert_eq!(normalize_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_old_reader_accepts_a_newer_check_in_response() {
        let body = r#"{"appliance":"k","update_available":true,"intent":"sideways",
            "server_time":"2026-11-23T00:00:00Z","delta":{"from":3},"site_peers":[
            {"appliance":"p","state":"verifying","quic":true}]}"#;
        let response: CheckinResponse = serde_json::from_str(body).expect("tolerant");
        assert_eq!(response.intent, Some(UpdateIntent::Unknown));
        assert_eq!(response.site_peers[0].state, Some(UpdateState::Unknown));
    }
}
