//! Durable state behind one narrow interface: load everything at start, commit batches of
//! changes atomically, page through the audit log, reopen after a failure. [`RedbStore`] keeps
//! it in one redb file (the default); [`PostgresStore`] in a PostgreSQL database, which
//! several Central Commands (replicas) may share.
//!
//! **Replicas.** A shared store orders every batch in a log ([`Store::commit_at`]): a batch is
//! committed only on top of the position the writer's view was computed at, so no change is
//! ever made from a stale view, and the others read the batches they have not seen
//! ([`Store::changes_since`]) and apply them in the same order. A store only one server
//! writes (redb) needs none of that, and keeps the defaults.
//!
//! A failed commit leaves nothing half-written (both commit a batch as one transaction) and
//! the server applies nothing it did not commit.
//!
//! Values are JSON, so records stay readable across versions by the same tolerance rules as
//! the HTTP API (unknown fields ignored, new fields defaulted).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::{PeerAddresses, ReportRequest, UpdateIntent};
use sitecast_manifest::window::MaintenanceWindow;

use crate::engine::Rollout;

mod copy;
mod postgres;
mod redb;

pub use copy::{Copied, CopyError, copy};
pub use postgres::PostgresStore;
pub use redb::RedbStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(String),
    #[error("stored record {table}/{key} is unreadable: {error}")]
    Corrupt { table: &'static str, key: String, error: String },
    #[error("the store is closed after a failure and could not be reopened: {0}")]
    Closed(String),
    /// A PostgreSQL database another Central Command is using.
    #[error(
        "another Central Command is using this database, alone or as replicas of each other \
         (Central Commands share a database only all started with `--replica`; `serve \
         --standby` waits until it is free)"
    )]
    InUse,
    /// A replica of another record format runs on the database ([`REPLICA_FORMAT`]).
    #[error(
        "Central Command replicas of another version (record format {theirs}, this one's is \
         {REPLICA_FORMAT}) use this database: every replica must run the same version; stop \
         them first (or start this one with --standby to wait until they stop)"
    )]
    OtherFormat { theirs: u32 },
    /// Another writer held the log longer than the lock timeout: nothing was stored, and
    /// nothing is wrong with the store.
    #[error("the database is busy with another Central Command's change ({0}); nothing was stored")]
    Busy(String),
    /// Another replica committed since the position a batch was computed at: nothing was
    /// stored; catch up and compute it again.
    #[error("another Central Command changed the fleet first (at {0}); nothing was stored")]
    Moved(u64),
}

/// The shape of the records and changes replicas exchange. Raised whenever a record or a
/// change gains a field or a kind: a replica drops what it does not know when it writes a
/// record again, so replicas of two formats never share a database.
pub const REPLICA_FORMAT: u32 = 3;

fn db_error<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::Database(error.to_string())
}

/// A published release: a signed sitecast image, a SWUpdate artifact for DDI devices, or both.
/// One published with only a `.swu` has no image: empty `blake3`, `sha256` and `manifest`,
/// size 0 ([`ReleaseRecord::has_image`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub version: u64,
    pub version_name: String,
    #[serde(default)]
    pub notes: String,
    /// When it was signed (from the manifest).
    pub created: Timestamp,
    pub published: Timestamp,
    pub active: bool,
    pub blake3: String,
    pub sha256: String,
    pub size: u64,
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub rollback_floor: Option<u64>,
    /// The signed manifest, byte for byte.
    pub manifest: String,
    /// A SWUpdate artifact published with it, for devices that speak hawkBit DDI.
    #[serde(default)]
    pub swu: Option<Box<SwuArtifact>>,
    /// Other HTTP origins of its image (CDN, object store, nginx), offered to appliances
    /// before Central Command's own.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// BLAKE3 of its image's content index (hex), served as a blob beside the image, when
    /// the manifest signs one.
    #[serde(default)]
    pub index: Option<String>,
    /// Its image's outboard stored as a blob of its own, for appliances to share (absent for
    /// releases published before, and for an empty image).
    #[serde(default)]
    pub outboard: Option<StoredFile>,
    /// Its image's group hashes (`sitecast_iso::write_group_hashes`) stored as a blob: half
    /// the outboard, from which appliances rebuild it (absent for releases published before,
    /// and for an image of one group).
    #[serde(default)]
    pub group_hashes: Option<StoredFile>,
    /// Plans for updating to its image from older releases' images
    /// (`sitecast_delta::plan`), made at publish from the two releases' content indexes;
    /// offered to appliances whose installed release is the older one, in place of the index
    /// and group hashes.
    #[serde(default)]
    pub plans: Vec<PlanFile>,
}

/// A plan stored as a blob, and the image (BLAKE3, hex) it updates from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanFile {
    pub from: String,
    pub file: StoredFile,
}

/// A file Central Command stores and serves as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
}

impl StoredFile {
    /// The stored file `digest` describes, unless it is empty (nothing to serve).
    pub fn unless_empty(digest: &sitecast_manifest::ImageDigest) -> Option<Self> {
        (digest.size > 0).then(|| Self {
            size: digest.size,
            blake3: digest.blake3.to_hex(),
            sha256: digest.sha256.to_hex(),
        })
    }
}

impl ReleaseRecord {
    /// Whether it has a signed sitecast image (not only a `.swu`).
    pub fn has_image(&self) -> bool {
        !self.blake3.is_empty()
    }
}

/// A SWUpdate image (`.swu`) published beside a release. Signed with the operator's own
/// SWUpdate key, which the device checks; Central Command only stores and serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwuArtifact {
    pub filename: String,
    pub size: u64,
    /// Where it is stored (the blob store is content-addressed by BLAKE3).
    pub blake3: String,
    /// The hashes DDI clients are given: SWUpdate requires `sha1`.
    pub sha256: String,
    pub sha1: String,
    pub md5: String,
}

/// A published agent release (`sitecast.agent`): the agent apart from any image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReleaseRecord {
    pub version: u64,
    pub version_name: String,
    pub published: Timestamp,
    /// The platforms it has a build for.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// BLAKE3 (hex) of every file of every build: what may be downloaded for it.
    #[serde(default)]
    pub files: Vec<String>,
    /// The OS releases it runs on, `os_min` to `os_max` (none: every later one).
    #[serde(default)]
    pub os_min: u64,
    #[serde(default)]
    pub os_max: Option<u64>,
    /// When its manifest expires: past it, appliances refuse it.
    pub expires: Timestamp,
    /// The signed manifest, byte for byte.
    pub manifest: String,
}

impl AgentReleaseRecord {
    /// Whether it runs on OS release (image version) `os_release`.
    pub fn runs_on_os(&self, os_release: u64) -> bool {
        os_release >= self.os_min && self.os_max.is_none_or(|max| os_release <= max)
    }
}

/// An appliance's current update: its last report, and when the update and its state began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRow {
    /// Flattened, so the stored JSON keeps the report's fields at the top level.
    #[serde(flatten)]
    pub report: ReportRequest,
    pub started: Timestamp,
    /// When `state` was entered (deadlines count from here).
    pub since: Timestamp,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplianceRecord {
    /// The appliance's ed25519 public key (hex): its identity.
    pub key: String,
    pub site: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    /// Normalized `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub macs: Vec<String>,
    pub platform: String,
    pub installed_version: u64,
    #[serde(default)]
    pub active_slot: Option<String>,
    #[serde(default)]
    pub agent_version: String,
    #[serde(default)]
    pub peer: PeerAddresses,
    pub registered: Timestamp,
    pub last_checkin: Timestamp,
    #[serde(default)]
    pub pin_version: Option<u64>,
    #[serde(default)]
    pub window: Option<MaintenanceWindow>,
    #[serde(default)]
    pub update: Option<UpdateRow>,
    /// The last release offered to it; reports about any other are refused.
    #[serde(default)]
    pub offer: Option<OfferRecord>,
    /// The highest report sequence number accepted (replays and reordering are refused).
    #[serde(default)]
    pub report_seq: u64,
    /// For agents that send no sequence number: the last accepted report's signed timestamp
    /// and a digest of its signature.
    #[serde(default)]
    pub last_report_at: Option<i64>,
    #[serde(default)]
    pub last_report_signature: Option<String>,
    /// An installed version the appliance claims that no published release explains; it is
    /// shown, not believed (`installed_version` keeps the last believable one).
    #[serde(default)]
    pub claimed_version: Option<u64>,
    /// The agent release it runs (from its check-ins); `None` from agents older than agent
    /// releases.
    #[serde(default)]
    pub agent_release: Option<u64>,
    /// The agent release kept on it for a rollback (the launcher's `previous`).
    #[serde(default)]
    pub agent_previous: Option<u64>,
    /// The agent release it is pinned to.
    #[serde(default)]
    pub agent_pin: Option<u64>,
    /// The last agent release offered to it; agent reports about any other are refused.
    #[serde(default)]
    pub agent_offer: Option<OfferRecord>,
    /// Its current agent update: the last agent report.
    #[serde(default)]
    pub agent_update: Option<UpdateRow>,
    /// Set for a device that runs a hawkBit DDI client (SWUpdate) instead of the sitecast
    /// agent.
    #[serde(default)]
    pub ddi: Option<DdiRecord>,
}

/// What Central Command keeps of a device that speaks hawkBit DDI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DdiRecord {
    pub controller_id: String,
    /// BLAKE3 (hex) of its target token; `None` for a device that came with the gateway token.
    #[serde(default)]
    pub token_hash: Option<String>,
    /// The attributes it sent as `configData`.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Whether it has sent `configData` at all (it may have no attributes to send).
    #[serde(default)]
    pub attributes_received: bool,
    /// The action for its current offer.
    #[serde(default)]
    pub action: Option<DdiAction>,
    /// Actions numbered so far (DDI action ids are numbers; SWUpdate reads them as 32-bit).
    #[serde(default)]
    pub actions_issued: u32,
    /// The details of its last feedback, as it sent them (clipped).
    #[serde(default)]
    pub last_feedback: Option<String>,
}

/// A DDI deployment action: one offer of one release to one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdiAction {
    pub id: u32,
    pub version: u64,
    /// The rollout that offered it (`None`: a pin); rolling that rollout back cancels it.
    #[serde(default)]
    pub rollout: Option<u64>,
    /// Whether the device has begun it (sent feedback): from then on it stays offered, even
    /// outside the window, until the device closes it.
    #[serde(default)]
    pub begun: bool,
    #[serde(default)]
    pub closed: bool,
    /// Closed as failed: not offered again for the same rollout (or pin).
    #[serde(default)]
    pub failed: bool,
    /// The device answered a cancellation with `rejected`: it goes on, and is not asked again.
    #[serde(default)]
    pub cancel_rejected: bool,
}

/// A release offered to an appliance in a check-in answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferRecord {
    /// The rollout that offered it; `None` for a pin.
    pub rollout: Option<u64>,
    pub version: u64,
    pub intent: UpdateIntent,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub id: String,
    pub window: MaintenanceWindow,
}

/// A browser's sign-in to the Fleet Updates page, keyed by the BLAKE3 of its cookie (the
/// cookie itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Kept as is so a reloaded page can ask for it again: worthless without the cookie.
    pub csrf_token: String,
    pub expires: Timestamp,
    /// The non-secret name the audit log knows it by.
    pub tag: String,
}

/// One line of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: Timestamp,
    /// `operator`, `appliance:<key>` or `system`.
    pub actor: String,
    pub action: String,
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// One change in a batch. Serialized into a shared store's log for the other replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Change {
    Release(Box<ReleaseRecord>),
    AgentRelease(AgentReleaseRecord),
    Rollout(Rollout),
    Appliance(Box<ApplianceRecord>),
    /// Removed by an operator.
    ApplianceRemoved {
        key: String,
    },
    Site(SiteRecord),
    Meta {
        key: String,
        value: String,
    },
    /// Origin bytes served to a site for a release, added to its total.
    SiteBytes {
        site: String,
        version: u64,
        add: u64,
    },
    /// Appended; entries are never rewritten or removed.
    Audit(AuditEntry),
    /// A session begun (`Some`) or ended.
    Session {
        id_hash: String,
        session: Option<SessionRecord>,
    },
}

/// Everything but the audit log, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub releases: BTreeMap<u64, ReleaseRecord>,
    pub agent_releases: BTreeMap<u64, AgentReleaseRecord>,
    pub rollouts: BTreeMap<u64, Rollout>,
    pub appliances: BTreeMap<String, ApplianceRecord>,
    pub sites: BTreeMap<String, SiteRecord>,
    pub meta: BTreeMap<String, String>,
    pub site_bytes: SiteBytes,
    pub sessions: BTreeMap<String, SessionRecord>,
    /// The next audit sequence number.
    pub audit_next: u64,
    /// The log position it was loaded at (0 for a store only one server writes).
    pub position: u64,
}

/// Batches committed to a shared store after some position, in order, each with its position.
pub type Batches = Vec<(u64, Vec<Change>)>;

/// Origin bytes served, by site and release.
pub type SiteBytes = BTreeMap<(String, u64), u64>;

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `changes` atomically. `durable: false` is for bookkeeping that may be lost in a
    /// crash (last check-in times); it becomes durable with the next durable commit.
    fn commit(&self, changes: &[Change], durable: bool) -> Result<(), StoreError>;
    /// Audit entries with `seq > after`, oldest first, at most `limit`.
    fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// Closes and opens the store again after a failed commit, from what is durable.
    fn reopen(&self) -> Result<(), StoreError>;
    /// Whether the store is still this server's to write, asked when nothing is written: a
    /// PostgreSQL database another Central Command took over (after this one's connection
    /// dropped) is not.
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether other servers write to it too (then views are caught up before every change).
    fn shared(&self) -> bool {
        false
    }

    /// Commits `changes` only on top of `position`, the log position the caller's view is at,
    /// and returns the new position; [`StoreError::Moved`] (nothing stored) if another server
    /// committed since. A store one server writes has no log and commits as [`Store::commit`].
    fn commit_at(
        &self,
        changes: &[Change],
        durable: bool,
        position: u64,
    ) -> Result<u64, StoreError> {
        self.commit(changes, durable).map(|()| position)
    }

    /// Takes this server's turn to write to a shared store: every other writer waits (its
    /// turn, or its commit) until [`Store::release_writers`]. Turns are granted in the order
    /// they were asked for, so under contention every replica makes progress.
    fn hold_writers(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn release_writers(&self) {}

    /// Lets go of the engine's lease (a replica whose engine fails lets another run it).
    fn resign(&self) {}

    /// The batches committed after `position`, oldest first; `None` when the log no longer
    /// reaches back that far (or holds a batch this version cannot read): load everything.
    fn changes_since(&self, _position: u64) -> Result<Option<Batches>, StoreError> {
        Ok(Some(Vec::new()))
    }

    /// The per-site byte counters as stored, which every server adds to without the log;
    /// `None` when only this server writes them (its own are then the totals).
    fn counters(&self) -> Result<Option<SiteBytes>, StoreError> {
        Ok(None)
    }

    /// Whether this server runs the rollout engine now: on a shared store, the one holding
    /// its lease, until that one's connection ends.
    fn lead(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records are plain data")
}

fn parse<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: String,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt { table, key, error: e.to_string() })
}
