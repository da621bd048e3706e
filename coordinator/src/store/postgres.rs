//! The store in a PostgreSQL database, for fleets that run one already and back it up.
//!
//! The same records as the redb store, one table per kind, values as `json` (readable with
//! SQL, tolerant across versions like the API; not `jsonb`, which refuses a `\u0000` that an
//! appliance's error text may carry). A batch is one transaction; per-site bytes are
//! increments, so writers never overwrite each other's totals; audit entries are inserted,
//! never updated, and a sequence number taken twice fails the batch.
//!
//! The schema is versioned ([`MIGRATIONS`]), applied at start under an advisory lock, and
//! changes only by adding: a Central Command that knows fewer migrations than the database
//! has keeps working.
//!
//! Either one Central Command uses the database on its own ([`OWNER_LOCK`] held exclusively;
//! a standby waits for it), or several share it as replicas (the lock held shared by each).
//! Replicas also append every batch to a log (`changelog`, its head in `log_head`), on top of
//! the position the writer's view was at ([`Store::commit_at`]), so they never change the
//! fleet from a stale view and read each other's batches in commit order. Per-site
//! byte counters stay out of the log (they are increments, added by every replica; each
//! reads the totals). One replica at a time runs the rollout engine ([`ENGINE_LOCK`]).
//!
//! The `postgres` client runs its own small runtime, which must not run inside tokio's: every
//! call goes to one thread of its own that holds the connection, and a connection that failed
//! is opened again on the next call. Connections time out (10 s to connect, 30 s a statement,
//! TCP keepalives) unless the connection string says otherwise, so a database that stops
//! answering fails writes instead of holding them. The connection is plain (`NoTls`): use a
//! Unix socket or a trusted network; a connection string asking for TLS is refused.

use std::sync::mpsc;
use std::time::Duration;

use super::{AuditEntry, Batches, Change, SiteBytes, Snapshot, Store, StoreError, json, parse};

/// The schema, one step per migration, in order; a step is never changed once released.
const MIGRATIONS: &[&str] = &[
    // 1: the records of the redb store.
    "CREATE TABLE releases (version bigint PRIMARY KEY, record json NOT NULL);
     CREATE TABLE agent_releases (version bigint PRIMARY KEY, record json NOT NULL);
     CREATE TABLE rollouts (id bigint PRIMARY KEY, record json NOT NULL);
     CREATE TABLE appliances (key text PRIMARY KEY, record json NOT NULL);
     CREATE TABLE sites (id text PRIMARY KEY, record json NOT NULL);
     CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
     CREATE TABLE site_bytes (site text NOT NULL, version bigint NOT NULL,
                              bytes bigint NOT NULL, PRIMARY KEY (site, version));
     CREATE TABLE audit (seq bigint PRIMARY KEY, entry json NOT NULL);",
    // 2: replicas: the log of batches in commit order, and sign-ins every replica knows.
    "CREATE TABLE log_head (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                            position bigint NOT NULL);
     INSERT INTO log_head (position) VALUES (0);
     CREATE TABLE changelog (position bigint PRIMARY KEY, batch json NOT NULL,
                             at timestamptz NOT NULL DEFAULT now());
     CREATE TABLE sessions (id_hash text PRIMARY KEY, record json NOT NULL);",
];

/// Batches kept in the log behind its head, at most, and for at most [`LOG_KEPT_FOR`]
/// (replicas catch up once a second; one further behind loads everything again). Batches of
/// check-in bookkeeping hold whole appliance records, so age bounds the log's size too.
const LOG_KEPT: i64 = 4096;
const LOG_KEPT_FOR: &str = "5 minutes";

/// Taken while migrating, so two Central Commands starting at once migrate one after the
/// other ("sitecast" in ASCII).
const MIGRATION_LOCK: i64 = 0x7369_7465_6361_7374;
/// Held by each Central Command using the database, for as long as its connection lasts:
/// exclusively by one that has it to itself, shared by replicas. Central Commands older than
/// replicas take it exclusively, so they never write beside replicas that log their batches.
const OWNER_LOCK: i64 = MIGRATION_LOCK + 1;
/// Held by the replica that runs the rollout engine, for as long as its connection lasts.
const ENGINE_LOCK: i64 = MIGRATION_LOCK + 2;
/// Replicas' record format: each replica holds `FORMAT_LOCKS << 32 | REPLICA_FORMAT` shared,
/// and one of another format already there refuses to start beside it.
const FORMAT_LOCKS: i64 = 0x7363_7276;
/// Held exclusively by the replica whose turn it is to write, while it catches up, computes
/// and commits ([`Store::hold_writers`]); taken shared by every logged commit, for its
/// transaction, so even a commit outside the turns waits for the one in progress.
const WRITERS_LOCK: i64 = MIGRATION_LOCK + 3;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A PostgreSQL database as the store.
pub struct PostgresStore {
    /// Shares the database with other Central Commands.
    replica: bool,
    /// `None` only while being dropped.
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// Where it connects, without a password, for messages.
    shown: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("database", &self.shown).finish()
    }
}

/// The server's own words where it gave any ("duplicate key value violates unique constraint
/// \"audit_pkey\""), else the client's error and its causes: `postgres::Error` alone says
/// only "db error". A lock timeout (another writer held the log, or had its turn, longer than
/// that) is [`StoreError::Busy`]: nothing was stored, and nothing is wrong with the store.
fn db_error(error: impl Into<PgError>) -> StoreError {
    let error = error.into();
    let busy = matches!(&error, PgError::Postgres(e)
        if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    let text = match error {
        PgError::Postgres(error) => match error.as_db_error() {
            Some(db) => match db.detail() {
                Some(detail) => format!("{}: {detail}", db.message()),
                None => db.message().to_owned(),
            },
            None => crate::error_chain(&error),
        },
        PgError::Other(text) => text,
    };
    match busy {
        true => StoreError::Busy(text),
        false => StoreError::Database(text),
    }
}

/// What [`db_error`] describes.
enum PgError {
    Postgres(postgres::Error),
    Other(String),
}

impl From<postgres::Error> for PgError {
    fn from(error: postgres::Error) -> Self {
        Self::Postgres(error)
    }
}

impl From<std::io::Error> for PgError {
    fn from(error: std::io::Error) -> Self {
        Self::Other(error.to_string())
    }
}

/// Why a call failed: its work's error, or no connection (or no thread) to run it on.
enum CallError<E> {
    Work(E),
    Store(StoreError),
}

/// The connection, owned by the store's thread.
struct Connection {
    config: postgres::Config,
    client: Option<postgres::Client>,
    /// Takes [`OWNER_LOCK`] shared.
    replica: bool,
    /// This connection holds [`ENGINE_LOCK`] (lost with it).
    leading: bool,
}

impl Connection {
    /// The connection, opened (and the database taken, [`OWNER_LOCK`]) if there is none.
    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.client.is_none() {
            let mut client = self.config.connect(postgres::NoTls).map_err(db_error)?;
            let take = match self.replica {
                true => "SELECT pg_try_advisory_lock_shared($1)",
                false => "SELECT pg_try_advisory_lock($1)",
            };
            let row = client.query_one(take, &[&OWNER_LOCK]).map_err(db_error)?;
            if !row.get::<_, bool>(0) {
                return Err(StoreError::InUse);
            }
            // Compiling a plan costs tens of milliseconds, for queries that take microseconds
            // (and its cost estimates count rows of a one-row table by the thousand).
            client.batch_execute("SET jit = off").map_err(db_error)?;
            if self.replica {
                // Whatever the connection string says: a replica waits boundedly on the
                // others, and one that stalls (or is paused) holding the log or the writers is
                // cut off.
                client
                    .batch_execute(
                        "SET lock_timeout = '5s'; SET idle_in_transaction_session_timeout = '30s';
                         SET idle_session_timeout = '60s'",
                    )
                    .map_err(db_error)?;
                same_format_as_the_others(&mut client)?;
            }
            self.client = Some(client);
            self.leading = false;
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Lets go of the database now rather than when the server notices the closed socket, so
    /// a Central Command started next (or another replica's engine) can take it at once.
    fn release(&mut self) {
        if let Some(mut client) = self.client.take() {
            let _ = client.execute("SELECT pg_advisory_unlock_all()", &[]);
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(jobs) = self.jobs.take() {
            let _ = jobs.send(Box::new(Connection::release));
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host/db`, or `host=/run/postgresql dbname=…`) and
    /// brings its schema up to date; the database is this Central Command's alone.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_as(url, false)
    }

    /// As [`PostgresStore::open`], sharing the database with other replicas.
    pub fn open_replica(url: &str) -> Result<Self, StoreError> {
        Self::open_as(url, true)
    }

    fn open_as(url: &str, replica: bool) -> Result<Self, StoreError> {
        let mut config: postgres::Config = url.parse().map_err(db_error)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_options().is_none() {
            // The server's side of keepalives too: a Central Command cut off by the network
            // must not hold the database (its lock) for the kernel's two hours.
            config.options(
                "-c statement_timeout=30s -c lock_timeout=5s \
                 -c idle_in_transaction_session_timeout=30s -c tcp_keepalives_idle=30 \
                 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
            );
        }
        config.keepalives_idle(Duration::from_secs(30));
        let shown = describe(&config);
        let (jobs, incoming) = mpsc::channel::<Job>();
        let mut connection = Connection { config, client: None, replica, leading: false };
        let worker = std::thread::Builder::new()
            .name("sitecast-postgres".into())
            .spawn(move || {
                for job in incoming {
                    // A job that panics (a bug) loses its connection and its answer, not the
                    // thread every later call needs.
                    let run = std::panic::AssertUnwindSafe(|| job(&mut connection));
                    if std::panic::catch_unwind(run).is_err() {
                        connection.client = None;
                    }
                }
            })
            .map_err(db_error)?;
        let store = Self { replica, jobs: Some(jobs), worker: Some(worker), shown };
        store.call_store(migrate)?;
        Ok(store)
    }

    /// Runs `work` on the connection's thread; a connection that failed is dropped, so the
    /// next call starts on a new one (and must take the database again). One the server
    /// merely refused something on stays, and keeps the database.
    fn call<T: Send + 'static, E: Send + 'static>(
        &self,
        work: impl FnOnce(&mut postgres::Client) -> Result<T, E> + Send + 'static,
    ) -> Result<T, CallError<E>> {
        self.run(move |connection| {
            let result = match connection.client() {
                Ok(client) => work(client).map_err(CallError::Work),
                Err(error) => Err(CallError::Store(error)),
            };
            if connection.client.as_ref().is_some_and(postgres::Client::is_closed) {
                connection.client = None;
            }
            result
        })
        .map_err(CallError::Store)?
    }

    /// Whether transaction `txid` committed, asked on a new connection that does not take
    /// the database.
    fn status_of(&self, txid: i64) -> Result<bool, StoreError> {
        self.run(move |connection| {
            let mut client = connection.config.connect(postgres::NoTls).map_err(db_error)?;
            committed(&mut client, txid)
        })?
    }

    /// Runs `job` on the connection's thread and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |connection| {
            let _ = reply.send(job(connection));
        });
        let closed = || StoreError::Closed(self.shown.clone());
        self.jobs.as_ref().ok_or_else(closed)?.send(job).map_err(|_| closed())?;
        answer.recv().map_err(|_| closed())
    }

    fn call_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(work).map_err(|error| match error {
            CallError::Work(error) | CallError::Store(error) => error,
        })
    }
}

impl PostgresStore {
    /// Commits a batch, logged on top of `at` if given; the log position it got (0 unlogged).
    fn write_batch(
        &self,
        changes: &[Change],
        durable: bool,
        at: Option<u64>,
    ) -> Result<u64, StoreError> {
        if let Some(n) = too_large(changes) {
            return Err(StoreError::Database(format!(
                "{n} does not fit in a PostgreSQL bigint; nothing was stored"
            )));
        }
        // Replicas read counters as totals; logged, an increment would be added twice.
        if at.is_some() && changes.iter().any(|c| matches!(c, Change::SiteBytes { .. })) {
            return Err(StoreError::Database("byte counters are never logged".into()));
        }
        let batch = changes.to_vec();
        let written = self.call(move |client| {
            let mut txid = None;
            write(client, &batch, durable, at, &mut txid).map_err(|error| {
                // A refusal by the server (a constraint, a full disk) rolled the batch back;
                // a failed connection leaves it unknown whether the commit landed.
                let unknown = error.as_db_error().is_none();
                (txid.filter(|_| unknown), db_error(error))
            })
        });
        let (txid, error) = match written {
            Ok(Written::Logged(position)) => return Ok(position),
            Ok(Written::Unlogged) => return Ok(0),
            Ok(Written::Moved(position)) => return Err(StoreError::Moved(position)),
            Err(CallError::Work((None, error)) | CallError::Store(error)) => return Err(error),
            Err(CallError::Work((Some(txid), error))) => (txid, error),
        };
        // Look before answering that nothing was stored, on a connection of its own: the lost
        // one may still hold the database while its session ends.
        if self.status_of(txid).unwrap_or(false) {
            tracing::warn!(%error, "commit reported an error after it was stored");
            // Logged on top of `at`, so at the next position.
            return Ok(at.map_or(0, |at| at + 1));
        }
        Err(error)
    }
}

/// Takes this replica's format lock, then looks for replicas of another format: a record one
/// of them wrote may hold fields this one would drop when it writes the record again.
fn same_format_as_the_others(client: &mut postgres::Client) -> Result<(), StoreError> {
    let mine = FORMAT_LOCKS << 32 | i64::from(super::REPLICA_FORMAT);
    client.execute("SELECT pg_advisory_lock_shared($1)", &[&mine]).map_err(db_error)?;
    // A bigint advisory key shows in `pg_locks` as its high and low 32 bits.
    let row = client
        .query_one(
            "SELECT min(objid::text::bigint) FROM pg_locks
             WHERE locktype = 'advisory' AND objsubid = 1 AND granted
               AND classid::text::bigint = $1 AND objid::text::bigint <> $2
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&FORMAT_LOCKS, &i64::from(super::REPLICA_FORMAT)],
        )
        .map_err(db_error)?;
    match row.get::<_, Option<i64>>(0) {
        Some(theirs) => Err(StoreError::OtherFormat { theirs: theirs as u32 }),
        None => Ok(()),
    }
}

/// Lets go of [`WRITERS_LOCK`] however often this session holds it (a connection lost
/// meanwhile took it with it).
fn unlock_writers(client: &mut postgres::Client) -> Result<(), StoreError> {
    for _ in 0..8 {
        let row = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&WRITERS_LOCK])
            .map_err(db_error)?;
        if !row.get::<_, bool>(0) {
            break;
        }
    }
    Ok(())
}

/// `user@host:port/dbname` of `config`, never its password.
fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        Some(postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or("");
    format!("postgres {user}@{host}:{port}/{db}")
}

/// Applies the migrations the database lacks, all in one transaction.
fn migrate(client: &mut postgres::Client) -> Result<(), StoreError> {
    let mut txn = client.transaction().map_err(db_error)?;
    // Another Central Command's migration is waited for, however long it takes.
    txn.batch_execute("SET LOCAL lock_timeout = 0").map_err(db_error)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(db_error)?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())",
    )
    .map_err(db_error)?;
    let row = txn
        .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
        .map_err(db_error)?;
    let applied: i32 = row.get(0);
    let known = MIGRATIONS.len() as i32;
    if applied > known {
        // Migrations only add: what this version knows is all still there.
        tracing::info!(applied, known, "the database was migrated by a newer Central Command");
    }
    for (version, step) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        let version = version as i32 + 1;
        txn.batch_execute(step).map_err(db_error)?;
        txn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version])
            .map_err(db_error)?;
        tracing::info!(version, "database migrated");
    }
    txn.commit().map_err(db_error)
}

/// PostgreSQL's `bigint` is signed. Writes refuse a number above its largest first
/// ([`too_large`]), so nothing is ever clamped onto another record's key; a query bound
/// (`audit` after) may be clamped.
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The first number of `changes` that does not fit a `bigint`, if any.
fn too_large(changes: &[Change]) -> Option<u64> {
    changes
        .iter()
        .flat_map(|change| match change {
            Change::Release(r) => vec![r.version],
            Change::AgentRelease(r) => vec![r.version],
            Change::Rollout(r) => vec![r.id],
            Change::SiteBytes { version, add, .. } => vec![*version, *add],
            Change::Audit(entry) => vec![entry.seq],
            Change::Appliance(_)
            | Change::Session { .. }
            | Change::ApplianceRemoved { .. }
            | Change::Site(_)
            | Change::Meta { .. } => vec![],
        })
        .find(|&n| i64::try_from(n).is_err())
}

/// Where a written batch went.
enum Written {
    /// Into the log at this position.
    Logged(u64),
    /// Nowhere: the log's head had moved on to this position.
    Moved(u64),
    /// Into the tables only (counters, a copy into an empty database).
    Unlogged,
}

/// Commits `changes` in one transaction, appended to the log on top of `at` if given, setting
/// `txid` to its transaction id once known (to ask afterwards whether a commit whose answer
/// was lost landed).
fn write(
    client: &mut postgres::Client,
    changes: &[Change],
    durable: bool,
    at: Option<u64>,
    txid: &mut Option<i64>,
) -> Result<Written, postgres::Error> {
    let mut txn = client.transaction()?;
    *txid = Some(txn.query_one("SELECT txid_current()", &[])?.get(0));
    // Logged batches are always durable: a log that lost its last batches in a crash would
    // hand their positions out again, to other batches, and replicas that saw the lost ones
    // would skip those.
    if !durable && at.is_none() {
        txn.batch_execute("SET LOCAL synchronous_commit = off")?;
    }
    let mut written = Written::Unlogged;
    if let Some(at) = at {
        // Waits while another replica has its turn to write.
        txn.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&WRITERS_LOCK])?;
        // The head's row lock orders writers: one that waited sees the head moved and stops.
        let head = txn.query_opt(
            "UPDATE log_head SET position = position + 1 WHERE position = $1 RETURNING position",
            &[&signed(at)],
        )?;
        let Some(head) = head else {
            let now: i64 = txn.query_one("SELECT position FROM log_head", &[])?.get(0);
            return Ok(Written::Moved(now as u64));
        };
        let position: i64 = head.get(0);
        let batch = serde_json::to_string(changes).expect("changes are plain data");
        txn.execute(
            "INSERT INTO changelog (position, batch) VALUES ($1, $2::text::json)",
            &[&position, &batch],
        )?;
        if position % 64 == 0 {
            txn.execute(
                &format!(
                    "DELETE FROM changelog
                     WHERE position <= $1 OR at < now() - interval '{LOG_KEPT_FOR}'"
                ),
                &[&(position - LOG_KEPT)],
            )?;
        }
        written = Written::Logged(position as u64);
    }
    let upsert = |table: &str, key: &str| {
        format!(
            "INSERT INTO {table} ({key}, record) VALUES ($1, $2::text::json)
             ON CONFLICT ({key}) DO UPDATE SET record = EXCLUDED.record"
        )
    };
    for change in changes {
        match change {
            Change::Release(r) => {
                txn.execute(&upsert("releases", "version"), &[&signed(r.version), &json(r)])
            }
            Change::AgentRelease(r) => {
                txn.execute(&upsert("agent_releases", "version"), &[&signed(r.version), &json(r)])
            }
            Change::Rollout(r) => txn.execute(&upsert("rollouts", "id"), &[&signed(r.id), &json(r)]),
            Change::Appliance(a) => txn.execute(&upsert("appliances", "key"), &[&a.key, &json(a)]),
            Change::ApplianceRemoved { key } => {
                txn.execute("DELETE FROM appliances WHERE key = $1", &[key])
            }
            Change::Site(s) => txn.execute(&upsert("sites", "id"), &[&s.id, &json(s)]),
            Change::Meta { key, value } => txn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[key, value],
            ),
            Change::SiteBytes { site, version, add } => txn.execute(
                "INSERT INTO site_bytes (site, version, bytes) VALUES ($1, $2, $3)
                 ON CONFLICT (site, version) DO UPDATE SET bytes = site_bytes.bytes + EXCLUDED.bytes",
                &[site, &signed(*version), &signed(*add)],
            ),
            // No `ON CONFLICT`: a sequence number taken twice fails the whole batch.
            Change::Audit(entry) => txn.execute(
                "INSERT INTO audit (seq, entry) VALUES ($1, $2::text::json)",
                &[&signed(entry.seq), &json(entry)],
            ),
            Change::Session { id_hash, session: Some(session) } => txn.execute(
                "INSERT INTO sessions (id_hash, record) VALUES ($1, $2::text::json)
                 ON CONFLICT (id_hash) DO UPDATE SET record = EXCLUDED.record",
                &[id_hash, &json(session)],
            ),
            Change::Session { id_hash, session: None } => {
                txn.execute("DELETE FROM sessions WHERE id_hash = $1", &[id_hash])
            }
        }?;
    }
    txn.commit()?;
    Ok(written)
}

/// Whether transaction `txid` committed, asked on a new connection after the answer to its
/// commit was lost. One still in progress (its commit arriving as the connection dropped) is
/// asked about again until it ends.
fn committed(client: &mut postgres::Client, txid: i64) -> Result<bool, StoreError> {
    for _ in 0..50 {
        let row = client.query_one("SELECT txid_status($1)::text", &[&txid]).map_err(db_error)?;
        match row.get::<_, Option<String>>(0).as_deref() {
            Some("in progress") => std::thread::sleep(Duration::from_millis(100)),
            status => return Ok(status == Some("committed")),
        }
    }
    Ok(false)
}

fn load(client: &mut postgres::Client) -> Result<Snapshot, StoreError> {
    // One snapshot of every table.
    let mut txn = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(db_error)?;
    let mut snapshot = Snapshot::default();
    let mut rows = |query: &str| txn.query(query, &[]).map_err(db_error);
    for row in rows("SELECT version, record::text FROM releases")? {
        let version: i64 = row.get(0);
        let record = parse("releases", version.to_string(), row.get(1))?;
        snapshot.releases.insert(version as u64, record);
    }
    for row in rows("SELECT version, record::text FROM agent_releases")? {
        let version: i64 = row.get(0);
        let record = parse("agent_releases", version.to_string(), row.get(1))?;
        snapshot.agent_releases.insert(version as u64, record);
    }
    for row in rows("SELECT id, record::text FROM rollouts")? {
        let id: i64 = row.get(0);
        snapshot.rollouts.insert(id as u64, parse("rollouts", id.to_string(), row.get(1))?);
    }
    for row in rows("SELECT key, record::text FROM appliances")? {
        let key: String = row.get(0);
        snapshot.appliances.insert(key.clone(), parse("appliances", key, row.get(1))?);
    }
    for row in rows("SELECT id, record::text FROM sites")? {
        let id: String = row.get(0);
        snapshot.sites.insert(id.clone(), parse("sites", id, row.get(1))?);
    }
    for row in rows("SELECT key, value FROM meta")? {
        snapshot.meta.insert(row.get(0), row.get(1));
    }
    for row in rows("SELECT site, version, bytes FROM site_bytes")? {
        let (version, bytes): (i64, i64) = (row.get(1), row.get(2));
        snapshot.site_bytes.insert((row.get(0), version as u64), bytes as u64);
    }
    for row in rows("SELECT id_hash, record::text FROM sessions")? {
        let id_hash: String = row.get(0);
        snapshot.sessions.insert(id_hash.clone(), parse("sessions", id_hash, row.get(1))?);
    }
    let row = txn.query_one("SELECT coalesce(max(seq), 0) FROM audit", &[]).map_err(db_error)?;
    snapshot.audit_next = row.get::<_, i64>(0) as u64 + 1;
    let row = txn.query_one("SELECT position FROM log_head", &[]).map_err(db_error)?;
    snapshot.position = row.get::<_, i64>(0) as u64;
    txn.commit().map_err(db_error)?;
    Ok(snapshot)
}

impl Store for PostgresStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.call_store(load)
    }

    fn commit(&self, changes: &[Change], durable: bool) -> Result<(), StoreError> {
        self.write_batch(changes, durable, None).map(drop)
    }

    fn shared(&self) -> bool {
        self.replica
    }

    fn commit_at(
        &self,
        changes: &[Change],
        durable: bool,
        position: u64,
    ) -> Result<u64, StoreError> {
        // Alone on the database, there is no one to read a log: it is written only by replicas.
        if !self.replica {
            return self.write_batch(changes, durable, None).map(|_| position);
        }
        self.write_batch(changes, durable, Some(position))
    }

    fn changes_since(&self, position: u64) -> Result<Option<Batches>, StoreError> {
        let after = signed(position);
        self.call_store(move |client| {
            // Read in this order, a batch committed between the two reads is seen (the head
            // moves only with a batch).
            let head: i64 =
                client.query_one("SELECT position FROM log_head", &[]).map_err(db_error)?.get(0);
            // A log behind this view (restored, or failed over to a standby that lacked its
            // last batches): the view holds batches the log does not.
            if head < after {
                return Ok(None);
            }
            let rows = client
                .query(
                    "SELECT position, batch::text FROM changelog WHERE position > $1
                     ORDER BY position",
                    &[&after],
                )
                .map_err(db_error)?;
            let mut batches = Vec::with_capacity(rows.len());
            for (expected, row) in (after + 1..).zip(&rows) {
                let at: i64 = row.get(0);
                // Pruned past `position`, or written by a version whose changes this one cannot
                // read: the tables say it all.
                let text: &str = row.get(1);
                let Ok(changes) = serde_json::from_str::<Vec<Change>>(text) else {
                    return Ok(None);
                };
                if at != expected {
                    return Ok(None);
                }
                batches.push((at as u64, changes));
            }
            Ok(Some(batches))
        })
    }

    fn counters(&self) -> Result<Option<SiteBytes>, StoreError> {
        if !self.replica {
            return Ok(None);
        }
        self.call_store(|client| {
            let rows = client
                .query("SELECT site, version, bytes FROM site_bytes", &[])
                .map_err(db_error)?;
            let counters = rows.iter().map(|row| {
                let (version, bytes): (i64, i64) = (row.get(1), row.get(2));
                ((row.get(0), version as u64), bytes as u64)
            });
            Ok(Some(counters.collect()))
        })
    }

    fn hold_writers(&self) -> Result<(), StoreError> {
        if !self.replica {
            return Ok(());
        }
        self.call_store(|client| {
            let held = client.execute("SELECT pg_advisory_lock($1)", &[&WRITERS_LOCK]);
            if held.is_err() {
                // PostgreSQL may grant the lock as the timeout strikes, and still report the
                // timeout: never keep it past this call.
                unlock_writers(client)?;
            }
            held.map(drop).map_err(db_error)
        })
    }

    fn resign(&self) {
        if !self.replica {
            return;
        }
        let _ = self.run(|connection| {
            if let Some(client) = connection.client.as_mut().filter(|_| connection.leading) {
                let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&ENGINE_LOCK]);
            }
            connection.leading = false;
        });
    }

    fn release_writers(&self) {
        if !self.replica {
            return;
        }
        let _ = self.call_store(unlock_writers);
    }

    fn lead(&self) -> Result<bool, StoreError> {
        if !self.replica {
            return Ok(true);
        }
        self.run(|connection| {
            connection.client()?;
            // Read after connecting: a new connection holds nothing yet.
            let leading = connection.leading;
            let client = connection.client.as_mut().expect("connected above");
            // Held for as long as this connection lasts: a round trip shows it still does.
            let result = match leading {
                true => client.query_one("SELECT true", &[]),
                false => client.query_one("SELECT pg_try_advisory_lock($1)", &[&ENGINE_LOCK]),
            }
            .map(|row| row.get::<_, bool>(0));
            if client.is_closed() {
                connection.client = None;
            }
            let leading = result.map_err(db_error)?;
            connection.leading = leading;
            Ok(leading)
        })?
    }

    fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let (after, limit) = (signed(after), signed(limit as u64));
        self.call_store(move |client| {
            let rows = client
                .query(
                    "SELECT seq, entry::text FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &limit],
                )
                .map_err(db_error)?;
            rows.iter()
                .map(|row| parse("audit", row.get::<_, i64>(0).to_string(), row.get(1)))
                .collect()
        })
    }

    fn reopen(&self) -> Result<(), StoreError> {
        // A new connection, checked now rather than at the next commit.
        self.check()
    }

    /// A round trip on the connection, which is opened again (and the database taken again)
    /// if it dropped: [`StoreError::InUse`] once another Central Command has it.
    fn check(&self) -> Result<(), StoreError> {
        self.call_store(|client| client.simple_query("SELECT 1").map(drop).map_err(db_error))
    }
}
