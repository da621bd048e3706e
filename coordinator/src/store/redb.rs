//! The embedded store: one redb file.
//!
//! A failed commit leaves nothing half-written (redb transactions are atomic); redb refuses
//! every later write after an I/O error ("previous I/O error occurred"), so
//! [`Store::reopen`] starts from what is on disk.

use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{AuditEntry, Change, Snapshot, Store, StoreError, db_error, json, parse};

const RELEASES: TableDefinition<u64, &str> = TableDefinition::new("releases");
const AGENT_RELEASES: TableDefinition<u64, &str> = TableDefinition::new("agent_releases");
const ROLLOUTS: TableDefinition<u64, &str> = TableDefinition::new("rollouts");
const APPLIANCES: TableDefinition<&str, &str> = TableDefinition::new("appliances");
const SITES: TableDefinition<&str, &str> = TableDefinition::new("sites");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const SITE_BYTES: TableDefinition<(&str, u64), u64> = TableDefinition::new("site_bytes");
const AUDIT: TableDefinition<u64, &str> = TableDefinition::new("audit");
const SESSIONS: TableDefinition<&str, &str> = TableDefinition::new("sessions");

/// The embedded store: one redb file.
#[derive(Debug)]
pub struct RedbStore {
    path: std::path::PathBuf,
    /// `None` only while being reopened, or after a reopen failed.
    db: RwLock<Option<Database>>,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Self::open_db(path)?;
        Ok(Self { path: path.to_owned(), db: RwLock::new(Some(db)) })
    }

    fn open_db(path: &Path) -> Result<Database, StoreError> {
        let db = Database::create(path).map_err(db_error)?;
        let txn = db.begin_write().map_err(db_error)?;
        {
            txn.open_table(RELEASES).map_err(db_error)?;
            txn.open_table(AGENT_RELEASES).map_err(db_error)?;
            txn.open_table(ROLLOUTS).map_err(db_error)?;
            txn.open_table(APPLIANCES).map_err(db_error)?;
            txn.open_table(SITES).map_err(db_error)?;
            txn.open_table(META).map_err(db_error)?;
            txn.open_table(SITE_BYTES).map_err(db_error)?;
            txn.open_table(AUDIT).map_err(db_error)?;
            txn.open_table(SESSIONS).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(db)
    }

    /// One batch in one write transaction.
    fn write(&self, changes: &[Change], durable: bool) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(db_error)?;
        if !durable {
            txn.set_durability(Durability::None).map_err(db_error)?;
        }
        {
            let mut releases = txn.open_table(RELEASES).map_err(db_error)?;
            let mut agent_releases = txn.open_table(AGENT_RELEASES).map_err(db_error)?;
            let mut rollouts = txn.open_table(ROLLOUTS).map_err(db_error)?;
            let mut appliances = txn.open_table(APPLIANCES).map_err(db_error)?;
            let mut sites = txn.open_table(SITES).map_err(db_error)?;
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let mut site_bytes = txn.open_table(SITE_BYTES).map_err(db_error)?;
            let mut audit = txn.open_table(AUDIT).map_err(db_error)?;
            let mut sessions = txn.open_table(SESSIONS).map_err(db_error)?;
            for change in changes {
                match change {
                    Change::Release(r) => releases.insert(r.version, json(r).as_str()).map(drop),
                    Change::AgentRelease(r) => {
                        agent_releases.insert(r.version, json(r).as_str()).map(drop)
                    }
                    Change::Rollout(r) => rollouts.insert(r.id, json(r).as_str()).map(drop),
                    Change::Appliance(a) => {
                        appliances.insert(a.key.as_str(), json(a).as_str()).map(drop)
                    }
                    Change::Site(s) => sites.insert(s.id.as_str(), json(s).as_str()).map(drop),
                    Change::Meta { key, value } => {
                        meta.insert(key.as_str(), value.as_str()).map(drop)
                    }
                    Change::ApplianceRemoved { key } => appliances.remove(key.as_str()).map(drop),
                    Change::SiteBytes { site, version, add } => {
                        let key = (site.as_str(), *version);
                        let total = site_bytes.get(key).map_err(db_error)?.map_or(0, |v| v.value());
                        site_bytes.insert(key, total + add).map(drop)
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
                    Change::Session { id_hash, session: Some(session) } => {
                        sessions.insert(id_hash.as_str(), json(session).as_str()).map(drop)
                    }
                    Change::Session { id_hash, session: None } => {
                        sessions.remove(id_hash.as_str()).map(drop)
                    }
                }
                .map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    /// Whether the batch `changes` is in the database: its audit entry (every durable batch
    /// of an operation has one, numbered uniquely) reads back as written. A batch without one,
    /// or a database that cannot be read, counts as not stored.
    fn landed(&self, changes: &[Change]) -> bool {
        let Some(entry) = changes.iter().find_map(|c| match c {
            Change::Audit(entry) => Some(entry),
            _ => None,
        }) else {
            return false;
        };
        let read = || -> Result<bool, StoreError> {
            let txn = self.db()?.begin_read().map_err(db_error)?;
            let audit = txn.open_table(AUDIT).map_err(db_error)?;
            let stored = audit.get(entry.seq).map_err(db_error)?;
            Ok(stored.is_some_and(|v| v.value() == json(entry)))
        };
        read().unwrap_or(false)
    }

    fn db(&self) -> Result<DbGuard<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed(self.path.display().to_string()));
        }
        Ok(DbGuard(guard))
    }
}

struct DbGuard<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        self.0.as_ref().expect("checked when taken")
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let mut snapshot = Snapshot::default();
        for row in txn.open_table(RELEASES).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            snapshot
                .releases
                .insert(k.value(), parse("releases", k.value().to_string(), v.value())?);
        }
        for row in txn.open_table(AGENT_RELEASES).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            let record = parse("agent_releases", k.value().to_string(), v.value())?;
            snapshot.agent_releases.insert(k.value(), record);
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
        for row in txn.open_table(SESSIONS).map_err(db_error)?.iter().map_err(db_error)? {
            let (k, v) = row.map_err(db_error)?;
            let key = k.value().to_owned();
            snapshot.sessions.insert(key.clone(), parse("sessions", key, v.value())?);
        }
        let audit = txn.open_table(AUDIT).map_err(db_error)?;
        snapshot.audit_next = audit.last().map_err(db_error)?.map_or(1, |(k, _)| k.value() + 1);
        Ok(snapshot)
    }

    fn commit(&self, changes: &[Change], durable: bool) -> Result<(), StoreError> {
        let Err(error) = self.write(changes, durable) else { return Ok(()) };
        // redb can fail in work it does after a commit is already durable (freeing pages on
        // a full disk, depending on which readers are open). Answering such a change as
        // failed would be a lie the next load exposes, so look: reopened from the file, is
        // the batch's audit entry there? Then it is stored, and answered as stored.
        if durable && self.reopen().is_ok() && self.landed(changes) {
            tracing::warn!(%error, "commit reported an error after it was stored");
            return Ok(());
        }
        Err(error)
    }

    fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_error)?;
        let table = txn.open_table(AUDIT).map_err(db_error)?;
        let mut entries = Vec::new();
        for row in table.range(after.saturating_add(1)..).map_err(db_error)?.take(limit) {
            let (k, v) = row.map_err(db_error)?;
            entries.push(parse("audit", k.value().to_string(), v.value())?);
        }
        Ok(entries)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The file lock must be released before the file is opened again.
        drop(slot.take());
        *slot = Some(Self::open_db(&self.path)?);
        Ok(())
    }
}
