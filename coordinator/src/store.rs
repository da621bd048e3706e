//! Durable state behind one narrow interface: load everything at start, commit batches of
//! changes atomically, page through the audit log. [`RedbStore`] keeps it in one redb file; a
//! PostgreSQL backend would implement the same three methods for fleets beyond one server.
//!
//! Values are JSON, so records stay readable across versions by the same tolerance rules as
//! the HTTP API (unknown fields ignored, new fields defaulted).

use std::collections::BTreeMap;
use std::path::Path;

use jiff::Timestamp;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::{PeerAddresses, ReportRequest};
use sitecast_manifest::window::MaintenanceWindow;

use crate::engine::Rollout;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(String),
    #[error("stored record {table}/{key} is unreadable: {error}")]
    Corrupt { table: &'static str, key: String, error: String },
}

fn db_error<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::Database(error.to_string())
}

/// A published release.
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub id: String,
    pub window: MaintenanceWindow,
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

/// One change in a batch.
#[derive(Debug, Clone)]
pub enum Change {
    Release(ReleaseRecord),
    Rollout(Rollout),
    Appliance(Box<ApplianceRecord>),
    Site(SiteRecord),
    Meta {
        key: String,
        value: String,
    },
    /// Total origin bytes served to a site for a release.
    SiteBytes {
        site: String,
        version: u64,
        total: u64,
    },
    /// Appended; entries are never rewritten or removed.
    Audit(AuditEntry),
}

/// Everything but the audit log, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub releases: BTreeMap<u64, ReleaseRecord>,
    pub rollouts: BTreeMap<u64, Rollout>,
    pub appliances: BTreeMap<String, ApplianceRecord>,
    pub sites: BTreeMap<String, SiteRecord>,
    pub meta: BTreeMap<String, String>,
    pub site_bytes: BTreeMap<(String, u64), u64>,
    /// The next audit sequence number.
    pub audit_next: u64,
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `changes` atomically. `durable: false` is for bookkeeping that may be lost in a
    /// crash (last check-in times); it becomes durable with the next durable commit.
    fn commit(&self, changes: &[Change], durable: bool) -> Result<(), StoreError>;
    /// Audit entries with `seq > after`, oldest first, at most `limit`.
    fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
}

const RELEASES: TableDefinition<u64, &str> = TableDefinition::new("releases");
const ROLLOUTS: TableDefinition<u64, &str> = TableDefinition::new("rollouts");
const APPLIANCES: TableDefinition<&str, &str> = TableDefinition::new("appliances");
const SITES: TableDefinition<&str, &str> = TableDefinition::new("sites");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const SITE_BYTES: TableDefinition<(&str, u64), u64> = TableDefinition::new("site_bytes");
const AUDIT: TableDefinition<u64, &str> = TableDefinition::new("audit");

/// The embedded store: one redb file.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(db_error)?;
        let txn = db.begin_write().map_err(db_error)?;
        {
            txn.open_table(RELEASES).map_err(db_error)?;
            txn.open_table(ROLLOUTS).map_err(db_error)?;
            txn.open_table(APPLIANCES).map_err(db_error)?;
            txn.open_table(SITES).map_err(db_error)?;
            txn.open_table(META).map_err(db_error)?;
            txn.open_table(SITE_BYTES).map_err(db_error)?;
            txn.open_table(AUDIT).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(Self { db })
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

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let mut snapshot = Snapshot::default();
        for row in txn.open_table(RELEASES).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            snapshot
                .releases
                .insert(k.value(), parse("releases", k.value().to_string(), v.value())?);
        }
        for row in txn.open_table(ROLLOUTS).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            snapshot
                .rollouts
                .insert(k.value(), parse("rollouts", k.value().to_string(), v.value())?);
        }
        for row in txn.open_table(APPLIANCES).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            let key = k.value().to_owned();
            snapshot.appliances.insert(key.clone(), parse("appliances", key, v.value())?);
        }
        for row in txn.open_table(SITES).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            let key = k.value().to_owned();
            snapshot.sites.insert(key.clone(), parse("sites", key, v.value())?);
        }
        for row in txn.open_table(META).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            snapshot.meta.insert(k.value().to_owned(), v.value().to_owned());
        }
        for row in txn.open_table(SITE_BYTES).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            let (site, version) = k.value();
            snapshot.site_bytes.insert((site.to_owned(), version), v.value());
        }
        let audit = txn.open_table(AUDIT).map_err(db_error)?;
        snapshot.audit_next = audit.last().map_err(db_error)?.map_or(1, |(k, _)| k.value() + 1);
        Ok(snapshot)
    }

    fn commit(&self, changes: &[Change], durable: bool) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db_error)?;
        if !durable {
            txn.set_durability(Durability::None).map_err(db_error)?;
        }
        {
            let mut releases = txn.open_table(RELEASES).map_err(db_error)?;
            let mut rollouts = txn.open_table(ROLLOUTS).map_err(db_error)?;
            let mut appliances = txn.open_table(APPLIANCES).map_err(db_error)?;
            let mut sites = txn.open_table(SITES).map_err(db_error)?;
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let mut site_bytes = txn.open_table(SITE_BYTES).map_err(db_error)?;
            let mut audit = txn.open_table(AUDIT).map_err(db_error)?;
            for change in changes {
                match change {
                    Change::Release(r) => releases.insert(r.version, json(r).as_str()).map(drop),
                    Change::Rollout(r) => rollouts.insert(r.id, json(r).as_str()).map(drop),
                    Change::Appliance(a) => {
                        appliances.insert(a.key.as_str(), json(a).as_str()).map(drop)
                    }
                    Change::Site(s) => sites.insert(s.id.as_str(), json(s).as_str()).map(drop),
                    Change::Meta { key, value } => {
                        meta.insert(key.as_str(), value.as_str()).map(drop)
                    }
                    Change::SiteBytes { site, version, total } => {
                        site_bytes.insert((site.as_str(), *version), *total).map(drop)
                    }
                    Change::Audit(entry) => {
                        if audit.get(entry.seq).map_err(db_error)?.is_some() {
                            return Err(StoreError::Database(format!(
                                "audit entry {} exists; the log is append-only",
                                entry.seq
                            )));
                        }
                        audit.insert(entry.seq, json(entry).as_str()).map(drop)
                    }
                }
                .map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(AUDIT).map_err(db_error)?;
        let mut entries = Vec::new();
        for row in table.range(after.saturating_add(1)..).map_err(db_error)?.take(limit) {
            let (k, v) = row.map_err(db_error)?;
            entries.push(parse("audit", k.value().to_string(), v.value())?);
        }
        Ok(entries)
    }
}
