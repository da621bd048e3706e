//! The PostgreSQL store against a real PostgreSQL: migrations once and tolerant of a newer
//! schema, counters that add up across two Central Commands, an audit number taken twice
//! failing its whole batch, a database that goes away losing nothing, and `migrate` carrying
//! a redb deployment over.

mod common;

use common::postgres::TestPostgres;
use common::serve::{ServeProcess, ServeSetup, until};
use common::*;
use reqwest::Method;
use serde_json::json;
use sitecast_coordinator::store::{
    AuditEntry, Change, PostgresStore, ReleaseRecord, Store, StoreError,
};

fn release(version: u64) -> ReleaseRecord {
    serde_json::from_value(json!({
        "version": version, "version_name": format!("v{version}"),
        "created": "2026-11-01T00:00:00Z", "published": "2026-11-02T00:00:00Z",
        "active": true, "blake3": "ab".repeat(32), "sha256": "cd".repeat(32), "size": 1000,
        "manifest": "{}",
    }))
    .expect("release record")
}

fn audit(seq: u64, action: &str) -> Change {
    Change::Audit(AuditEntry {
        seq,
        at: "2026-11-02T00:00:00Z".parse().expect("time"),
        actor: "operator".into(),
        action: action.into(),
        detail: json!({"seq": seq}),
    })
}

fn sql(database: &TestPostgres) -> ::postgres::Client {
    ::postgres::Client::connect(&database.url(), ::postgres::NoTls).expect("connect")
}

#[test]
fn the_schema_is_migrated_once_and_a_newer_one_is_tolerated() {
    let database = TestPostgres::start();
    let store = PostgresStore::open(&database.url()).expect("open");
    store
        .commit(&[Change::Release(Box::new(release(1))), audit(1, "release.publish")], true)
        .expect("commit");
    drop(store);
    drop(PostgresStore::open(&database.url()).expect("open again"));
    let mut client = sql(&database);
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .expect("query")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2], "each migration applied once");

    // A newer Central Command added a column and recorded its migration: this one, knowing
    // fewer, opens, writes and reads as before.
    client
        .batch_execute(
            "ALTER TABLE releases ADD COLUMN origin_region text;
             INSERT INTO schema_migrations (version) VALUES (3);",
        )
        .expect("newer migration");
    let store = PostgresStore::open(&database.url()).expect("open a newer schema");
    store
        .commit(&[Change::Release(Box::new(release(2))), audit(2, "release.publish")], true)
        .expect("commit");
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.releases.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(snapshot.releases[&2], release(2));
    assert_eq!(snapshot.audit_next, 3);
    // The records are there for SQL too.
    let name: String = client
        .query_one("SELECT record->>'version_name' FROM releases WHERE version = 2", &[])
        .expect("query")
        .get(0);
    assert_eq!(name, "v2");
}

#[test]
fn counters_add_up_and_a_taken_audit_number_fails_its_batch() {
    let database = TestPostgres::start();
    let bytes = |add| Change::SiteBytes { site: "store-1".into(), version: 7, add };
    let one = PostgresStore::open(&database.url()).expect("open");
    one.commit(&[bytes(100)], false).expect("commit");
    one.commit(&[bytes(50)], true).expect("commit");
    drop(one);
    // Another start adds to what is stored, whatever it holds in memory.
    let two = PostgresStore::open(&database.url()).expect("open");
    two.commit(&[bytes(1)], true).expect("commit");
    assert_eq!(two.load().expect("load").site_bytes[&("store-1".to_owned(), 7)], 151);

    two.commit(&[Change::Release(Box::new(release(1))), audit(1, "release.publish")], true)
        .expect("commit");
    let error = two
        .commit(&[Change::Release(Box::new(release(2))), audit(1, "release.publish")], true)
        .expect_err("audit number 1 is taken");
    assert!(error.to_string().contains("audit"), "{error}");
    let snapshot = two.load().expect("load");
    assert!(!snapshot.releases.contains_key(&2), "half a batch was stored");
    let entries = two.audit(0, 10).expect("audit");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].detail, json!({"seq": 1}));
}

/// Each Central Command writes whole records from its own view of the fleet: a second one on
/// the same database would overwrite the first one's changes, so it is refused until
/// replicas are built.
#[test]
fn a_second_central_command_on_the_same_database_is_refused() {
    let database = TestPostgres::start();
    let first = PostgresStore::open(&database.url()).expect("open");
    let error = PostgresStore::open(&database.url()).expect_err("a second one");
    assert!(matches!(error, StoreError::InUse), "{error}");
    assert!(error.to_string().contains("another Central Command"), "{error}");
    first
        .commit(&[Change::Release(Box::new(release(1))), audit(1, "release.publish")], true)
        .expect("commit");
    // The first one lets go when it stops; the next one takes over what it stored.
    drop(first);
    let next = PostgresStore::open(&database.url()).expect("open after the first stopped");
    assert_eq!(next.load().expect("load").releases.len(), 1);
}

/// Replicas share a database; each batch goes on top of the position its writer's view was
/// at, or not at all; the others read the batches they lack in order. A Central Command that
/// takes the database for itself (as versions before replicas do) and replicas exclude each
/// other.
#[test]
fn replicas_commit_in_one_order_and_read_what_they_lack() {
    let database = TestPostgres::start();
    let one = PostgresStore::open_replica(&database.url()).expect("open");
    let two = PostgresStore::open_replica(&database.url()).expect("a second replica");
    let error = PostgresStore::open(&database.url()).expect_err("one on its own beside them");
    assert!(matches!(error, StoreError::InUse), "{error}");
    let start = one.load().expect("load").position;
    assert_eq!(two.load().expect("load").position, start);

    let first = [Change::Release(Box::new(release(1))), audit(1, "release.publish")];
    let at = one.commit_at(&first, true, start).expect("commit");
    assert_eq!(at, start + 1);
    // Computed on the view before that batch: refused, nothing stored.
    let stale = [Change::Release(Box::new(release(2))), audit(1, "release.publish")];
    let error = two.commit_at(&stale, true, start).expect_err("a stale view");
    assert!(matches!(error, StoreError::Moved(p) if p == at), "{error}");
    assert_eq!(two.load().expect("load").releases.len(), 1);
    let lacked = two.changes_since(start).expect("read").expect("in the log");
    assert_eq!(lacked.len(), 1);
    assert_eq!(lacked[0].0, at);
    assert!(matches!(&lacked[0].1[0], Change::Release(r) if r.version == 1));
    let second = [Change::Release(Box::new(release(2))), audit(2, "release.publish")];
    assert_eq!(two.commit_at(&second, true, at).expect("commit"), at + 1);
    let seen: Vec<u64> =
        one.changes_since(start).expect("read").expect("log").iter().map(|b| b.0).collect();
    assert_eq!(seen, vec![at, at + 1]);
    assert!(one.changes_since(at + 1).expect("read").expect("log").is_empty());

    // A batch this version cannot read (a newer one's kind of change): load everything.
    let mut client = sql(&database);
    let next = (at + 2) as i64;
    let unknown = r#"[{"Teleport": {}}]"#;
    client
        .execute(
            "INSERT INTO changelog (position, batch) VALUES ($1, $2::text::json)",
            &[&next, &unknown],
        )
        .expect("insert");
    client.execute("UPDATE log_head SET position = $1", &[&next]).expect("head");
    assert!(one.changes_since(at + 1).expect("read").is_none());
    assert_eq!(one.load().expect("load").position, at + 2);

    // A log behind a view (a database restored from a backup, or failed over to a standby
    // that lacked the last batches): that view must be loaded again.
    client.execute("UPDATE log_head SET position = $1", &[&(at as i64)]).expect("head back");
    client.execute("DELETE FROM changelog WHERE position > $1", &[&(at as i64)]).expect("lost");
    assert!(one.changes_since(at + 1).expect("read").is_none());
    assert!(one.changes_since(at).expect("read").is_some_and(|b| b.is_empty()));
}

/// A replica of another record format on the database: this one refuses to start beside
/// it (it would drop fields the other writes). A writer that holds the log too long (a
/// stalled replica): the commit waits, then says the database is busy, and stores nothing;
/// the store works on once the log is free.
#[test]
fn replicas_refuse_another_format_and_wait_out_a_stalled_writer_boundedly() {
    let database = TestPostgres::start();
    drop(PostgresStore::open_replica(&database.url()).expect("migrate"));
    let mut other = sql(&database);
    let key = 0x7363_7276_i64 << 32 | 999;
    other.execute("SELECT pg_advisory_lock_shared($1)", &[&key]).expect("lock");
    let error = PostgresStore::open_replica(&database.url()).expect_err("another format");
    assert!(matches!(error, StoreError::OtherFormat { theirs: 999 }), "{error}");
    assert!(error.to_string().contains("same version"), "{error}");
    drop(other);

    let store = PostgresStore::open_replica(&database.url()).expect("open");
    let at = store.load().expect("load").position;
    let mut stalled = sql(&database);
    let mut held = stalled.transaction().expect("begin");
    held.execute("SELECT position FROM log_head FOR UPDATE", &[]).expect("hold the log");
    let batch = [Change::Release(Box::new(release(1))), audit(1, "release.publish")];
    let error = store.commit_at(&batch, true, at).expect_err("the log is held");
    assert!(matches!(error, StoreError::Busy(_)), "{error}");
    held.rollback().expect("let go");
    assert!(store.load().expect("load").releases.is_empty(), "stored while busy");
    assert_eq!(store.commit_at(&batch, true, at).expect("commit"), at + 1);

    // A replica overtaken holds the other writers back while it catches up: their commits
    // wait (here, out the lock timeout), and go through once it lets go.
    let overtaken = PostgresStore::open_replica(&database.url()).expect("another replica");
    overtaken.hold_writers().expect("hold the writers");
    let next = [Change::Release(Box::new(release(2))), audit(2, "release.publish")];
    let error = store.commit_at(&next, true, at + 1).expect_err("held back");
    assert!(matches!(error, StoreError::Busy(_)), "{error}");
    overtaken.release_writers();
    assert_eq!(store.commit_at(&next, true, at + 1).expect("commit"), at + 2);
}

#[test]
fn a_database_that_goes_away_fails_commits_and_loses_nothing() {
    let database = TestPostgres::start();
    let store = PostgresStore::open(&database.url()).expect("open");
    store
        .commit(&[Change::Release(Box::new(release(1))), audit(1, "release.publish")], true)
        .expect("commit");

    database.stop();
    let error = store
        .commit(&[Change::Release(Box::new(release(2))), audit(2, "release.publish")], true)
        .expect_err("no database");
    assert!(!error.to_string().is_empty());
    assert!(store.load().is_err(), "a load without a database answered");
    assert!(store.reopen().is_err(), "reopened without a database");

    database.resume();
    store.reopen().expect("reopen");
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.releases.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(snapshot.audit_next, 2, "the failed batch left no audit entry");
    store
        .commit(&[Change::Release(Box::new(release(2))), audit(2, "release.publish")], true)
        .expect("commit");
    assert_eq!(store.load().expect("load").releases.len(), 2);
}

/// `sitecast-coordinator migrate`, as an operator runs it; its output, and whether it worked.
/// A stopped test server's redb file may stay locked a moment while its connections end.
fn migrate(data_dir: &std::path::Path, database: &TestPostgres) -> (bool, String) {
    for _ in 0..100 {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sitecast-coordinator"))
            .arg("migrate")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--database")
            .arg(database.url())
            .output()
            .expect("run migrate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !text.contains("already open") {
            return (output.status.success(), text);
        }
        // Polling the lock's release: the interval between tries, not a wait for it.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the stopped server never released its redb file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_carries_a_redb_deployment_over_to_postgres() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let data = dir.path().join("data");
    let server = TestServer::start(&data, &releases.root).await;
    server.publish_two(&releases, 100_000).await;
    let mut appliances = Vec::new();
    for i in 0..6 {
        let appliance = Appliance::new(["store-1", "store-2"][i % 2], &format!("a{i}"), 1);
        appliance.checkin(&server).await;
        appliances.push(appliance);
    }
    let (status, _) = server
        .op_json(
            Method::PUT,
            "/api/sites/store-1/window",
            Some(json!({
            "start": "01:00", "end": "04:00", "timezone": "UTC", "days": ["mon"]})),
        )
        .await;
    assert_eq!(status, 204);
    let id = server.roll_out_now(2).await;
    for appliance in &mut appliances[..3] {
        assert!(appliance.checkin(&server).await.update_available);
        appliance.report(&server, "succeeded", 2).await;
    }
    let before = server.observable().await;
    let (_, sites_before) = server.op_json(Method::GET, "/api/sites", None).await;
    let rollout_before = server.rollout(id).await;
    server.stop().await;

    let database = std::sync::Arc::new(TestPostgres::start());
    let (ok, output) = migrate(&data, &database);
    assert!(ok, "{output}");
    assert!(output.contains("copied 2 releases"), "{output}");
    assert!(output.contains("6 appliances"), "{output}");

    let server =
        TestServer::start_on(Backend::Postgres(database.clone()), &data, &releases.root).await;
    assert_eq!(server.observable().await, before, "releases, rollouts, appliances, audit");
    let (_, sites_after) = server.op_json(Method::GET, "/api/sites", None).await;
    assert_eq!(sites_after, sites_before, "sites, windows and byte counters");
    assert_eq!(server.rollout(id).await, rollout_before);
    // And it goes on from there: a report lands on PostgreSQL.
    appliances[3].checkin(&server).await;
    appliances[3].report(&server, "succeeded", 2).await;
    server.stop().await;

    // A second run would merge two fleets: refused, and nothing is written.
    let (ok, output) = migrate(&data, &database);
    assert!(!ok, "{output}");
    assert!(output.contains("already holds a fleet"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_database_goes_away_changes_nothing_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let database = std::sync::Arc::new(TestPostgres::start());
    let backend = Backend::Postgres(database.clone());
    let server = TestServer::start_on(backend, &dir.path().join("data"), &releases.root).await;
    server.publish_two(&releases, 100_000).await;
    let known = Appliance::new("s", "known", 1);
    known.checkin(&server).await;
    let before = server.observable().await;
    let health = || async {
        let response = server.http.get(format!("{}/healthz", server.url)).send().await;
        response.expect("healthz").status().as_u16()
    };

    database.stop();
    let rollout = Some(json!({"version": 2, "strategy": "immediate"}));
    let (status, body) = server.op_json(Method::POST, "/api/rollouts", rollout.clone()).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("store_unavailable")), "{body}");
    assert_eq!(health().await, 503);
    // The audit log is read from the database: unavailable, and saying so.
    let (status, body) = server.op_json(Method::GET, "/api/audit", None).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("store_unavailable")), "{body}");

    database.resume();
    assert_eq!(server.observable().await, before, "memory never got ahead of the database");
    let (status, body) = server.op_json(Method::POST, "/api/rollouts", rollout).await;
    assert_eq!(status, 201, "the next write reconnects: {body}");
    assert_eq!(health().await, 200);
    assert_eq!(known.checkin(&server).await.version, Some(2));
    let live = server.observable().await;
    let server = server.restart().await;
    assert_eq!(server.observable().await, live, "what was answered is what is stored");
}

/// `jsonb` refuses `\u0000`: an appliance whose error text carries one must not close the
/// store for the whole fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_text_with_a_nul_is_stored_like_any_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let backend = Backend::postgres();
    let server = TestServer::start_on(backend, &dir.path().join("data"), &releases.root).await;
    server.publish_two(&releases, 100_000).await;
    let mut appliance = Appliance::new("s", "nul", 1);
    appliance.checkin(&server).await;
    server.roll_out_now(2).await;
    assert!(appliance.checkin(&server).await.update_available);
    appliance.seq += 1;
    let body = serde_json::to_vec(&json!({
        "state": "failed", "version": 2, "error": "disk \u{0} full", "seq": appliance.seq,
    }))
    .expect("json");
    let response =
        appliance.signed(&server, Method::POST, "/api/appliances/report", &body).send().await;
    assert_eq!(response.expect("report").status(), 204);
    let health = server.http.get(format!("{}/healthz", server.url)).send().await;
    assert_eq!(health.expect("healthz").status(), 200, "the store closed");

    let server = server.restart().await;
    let (_, list) = server.op_json(Method::GET, "/api/appliances", None).await;
    let error = &list[0]["update"]["error"];
    assert!(error.as_str().is_some_and(|e| e.starts_with("disk ")), "{list}");
}

/// Two `serve` processes on one database of their own, the first serving and the second
/// waiting as its standby. The processes are stopped before the database (field order).
struct ActiveAndStandby {
    active: ServeProcess,
    standby: ServeProcess,
    setup: ServeSetup,
}

impl ActiveAndStandby {
    async fn start() -> Self {
        let setup = ServeSetup::new();
        let (http, deadline) = (&setup.http, setup.deadline);
        let active = setup.start("active", &[]);
        until("the active one never served", deadline, || active.healthy(http)).await;
        let standby = setup.start("standby", &["--standby"]);
        until("the standby never waited", deadline, || async { standby.log().contains("waiting") })
            .await;
        assert!(!standby.healthy(http).await, "a standby answers before it took over");
        Self { active, standby, setup }
    }
}

/// Active and standby on one database: kill -9 the active one mid-rollout and the standby,
/// waiting on the database, takes over with every release, rollout and audit entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_central_command_is_killed() {
    let ActiveAndStandby { mut active, standby, setup } = ActiveAndStandby::start().await;
    let ServeSetup { releases, http, deadline, .. } = &setup;
    let deadline = *deadline;

    for version in [1, 2] {
        let (path, image) = releases.image(version, 50_000);
        let manifest = releases.manifest(version, &image, None, None);
        let response = http
            .post(format!("{}/api/releases", active.url().expect("serving")))
            .bearer_auth(OPERATOR)
            .json(&json!({"manifest": manifest, "image_path": path}))
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), 201, "{}", active.log());
    }
    let response = http
        .post(format!("{}/api/rollouts", active.url().expect("serving")))
        .bearer_auth(OPERATOR)
        .json(&json!({"version": 2, "strategy": "staged"}))
        .send()
        .await
        .expect("rollout");
    assert_eq!(response.status(), 201, "{}", active.log());
    let before = active.fleet(http).await;

    active.child.kill().expect("kill -9");
    let killed = std::time::Instant::now();
    until("the standby never took over", deadline, || standby.healthy(http)).await;
    eprintln!("the standby took over {:?} after the kill", killed.elapsed());
    assert!(standby.log().contains("taking over"), "{}", standby.log());
    let after = standby.fleet(http).await;
    assert_eq!(after["releases"], before["releases"]);
    assert_eq!(after["rollouts"], before["rollouts"]);
    let entries = |state: &serde_json::Value| state["audit"].as_array().expect("audit").clone();
    assert!(entries(&after).starts_with(&entries(&before)), "audit lost or rewritten:\n{after}");
}

/// The active Central Command's connection drops (here: its backend is terminated) and the
/// standby takes the database: the old one must not go on looking healthy with a stale view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_command_that_lost_the_database_says_so() {
    let ActiveAndStandby { active, standby, setup } = ActiveAndStandby::start().await;
    let database_url = setup.database.url();
    let (http, deadline) = (&setup.http, setup.deadline);

    // Cut the session that holds the database (the owner lock, held exclusively), then give
    // the standby a while to take it and load before cutting again: the old active one
    // reconnects once a second, the standby asks every half second, and either may win. Only
    // the holder is cut, and not at once again: a standby whose own session were cut while
    // it takes over could lose every race on a loaded machine.
    'cut: while !standby.healthy(http).await {
        assert!(std::time::Instant::now() < deadline, "the standby never took over");
        // The synchronous client runs a runtime of its own: not on this test's.
        let url = database_url.clone();
        std::thread::spawn(move || {
            let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
            // `OWNER_LOCK` (coordinator/src/store/postgres.rs), a bigint key, shows in
            // `pg_locks` as its high and low 32 bits.
            admin
                .batch_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks
                     WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted
                       AND objsubid = 1 AND classid::text::bigint = x'73697465'::bigint
                       AND objid::text::bigint = x'63617375'::bigint
                       AND database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database())",
                )
                .expect("terminate");
        })
        .join()
        .expect("terminate sessions");
        // Polled every 100 ms for up to 3 s; the standby's health is what is waited for.
        for _ in 0..30 {
            if standby.healthy(http).await {
                break 'cut;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    // It notices within its next check (once a second) and says why.
    let url = active.url().expect("serving");
    until("the deposed one never said why", deadline, || async {
        let health = http.get(format!("{url}/healthz")).send().await.expect("healthz");
        let status = health.status();
        status == 503
            && health.text().await.is_ok_and(|why| why.contains("another Central Command"))
    })
    .await;
    // Writes are refused there; the standby has them.
    let rollout = json!({"version": 1, "strategy": "immediate"});
    let response = http
        .post(format!("{url}/api/rollouts"))
        .bearer_auth(OPERATOR)
        .json(&rollout)
        .send()
        .await
        .expect("rollout");
    assert_eq!(response.status(), 503);
}
