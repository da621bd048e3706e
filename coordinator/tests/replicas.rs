//! Several Central Commands (replicas) on one real PostgreSQL: check-ins, reports and
//! operators spread over all of them, one fleet; a staged rollout advancing once per stage
//! however many replicas tick; concurrent operator actions ending in one state; sessions
//! valid on every replica; a gapless audit log; the engine handed on when the replica running
//! it is killed; the same state after a restart of everything.

mod common;

use common::postgres::TestPostgres;
use common::serve::{ServeProcess, ServeSetup, until};
use common::*;
use futures_util::future::join_all;
use jiff::SignedDuration;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::Arc;

/// `n` replicas on `database`, sharing one data directory (the images), each with a clock
/// of its own that the test moves for all of them.
async fn replicas(
    n: usize,
    data_dir: &std::path::Path,
    releases: &Releases,
    database: &Arc<TestPostgres>,
) -> Vec<TestServer> {
    let mut servers = Vec::new();
    for _ in 0..n {
        let backend = Backend::Replica(Arc::clone(database));
        servers.push(TestServer::start_on(backend, data_dir, &releases.root).await);
    }
    servers
}

/// Polls every replica's answer to `path` until `done` holds for all.
async fn until_all(replicas: &[TestServer], what: &str, path: &str, done: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    until(what, deadline, || async {
        for replica in replicas {
            let (status, body) = replica.op_json(Method::GET, path, None).await;
            if status != 200 || !done(&body) {
                return false;
            }
        }
        true
    })
    .await;
}

/// The audit log as stored: every sequence number from 1 on, once, in order.
async fn gapless_audit(replica: &TestServer) -> Vec<Value> {
    let (_, entries) = replica.op_json(Method::GET, "/api/audit?limit=5000", None).await;
    let entries = entries.as_array().expect("audit").clone();
    assert_gapless(&entries);
    entries
}

fn assert_gapless(entries: &[Value]) {
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs, (1..=entries.len() as u64).collect::<Vec<_>>(), "the audit log has gaps");
}

fn advanced_to(entries: &[Value], stage: u64) -> usize {
    let decision = format!("AdvanceStage {{ to: {stage} }}");
    entries
        .iter()
        .filter(|e| e["action"] == "rollout.decide" && e["detail"]["decision"] == decision)
        .count()
}

async fn sign_in(replica: &TestServer) -> (String, String) {
    let response = replica
        .http
        .post(format!("{}/api/session", replica.url))
        .json(&json!({"token": OPERATOR}))
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"].to_str().expect("ascii");
    let cookie = cookie.split(';').next().expect("name=value").to_owned();
    let body: Value = response.json().await.expect("json");
    (cookie, body["csrf_token"].as_str().expect("csrf").to_owned())
}

async fn with_cookie(
    replica: &TestServer,
    method: Method,
    path: &str,
    (cookie, csrf): &(String, String),
) -> (u16, String) {
    let request = replica.http.request(method, format!("{}{path}", replica.url));
    let response =
        request.header("cookie", cookie).header("x-csrf-token", csrf).send().await.expect("send");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["code"].as_str().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_one_fleet_and_a_staged_rollout_advances_once_per_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = Arc::new(TestPostgres::start());
    let releases = Releases::new(dir.path());
    let data = dir.path().join("data");
    let replicas = replicas(3, &data, &releases, &database).await;
    replicas[0].publish_two(&releases, 100_000).await;

    // Forty appliances enroll at once, spread over the replicas: every audit number and
    // every registration is taken once, whichever replica computed it first.
    let mut appliances: Vec<Appliance> =
        (0..40).map(|i| Appliance::named("store-1", &format!("a{i}"), 1)).collect();
    let enrolled =
        join_all(appliances.iter().enumerate().map(|(i, a)| a.checkin_raw(&replicas[i % 3], true)))
            .await;
    for response in enrolled {
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    until_all(&replicas, "not every replica lists the 40", "/api/appliances", |list| {
        list.as_array().is_some_and(|l| l.len() == 40)
    })
    .await;

    let (status, rollout) = replicas[1]
        .op_json(Method::POST, "/api/rollouts", Some(json!({"version": 2, "strategy": "staged"})))
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_u64().expect("id");
    let path = format!("/api/rollouts/{id}");
    until_all(&replicas, "a replica never saw the rollout", &path, |_| true).await;

    // Check-ins and reports each at another replica than the last.
    let mut stage0 = Vec::new();
    for (i, appliance) in appliances.iter().enumerate() {
        if appliance.checkin(&replicas[(i + 1) % 3]).await.update_available {
            stage0.push(i);
        }
    }
    assert_eq!(stage0.len(), 2, "5 % of 40 in stage 0");
    for &i in &stage0 {
        for (n, state) in ["downloading", "ready", "rebooting", "succeeded"].iter().enumerate() {
            appliances[i].report(&replicas[(i + n) % 3], state, 2).await;
        }
    }

    // Every replica's engine is asked to run, at once, past the stage's delay: one runs it
    // (the one with the lease), and the stage advances once.
    for replica in &replicas {
        replica.clock.advance(SignedDuration::from_hours(24));
    }
    for _ in 0..3 {
        let ticks = replicas.iter().map(|r| {
            let coordinator = r.coordinator.clone();
            tokio::task::spawn_blocking(move || coordinator.tick())
        });
        for tick in join_all(ticks).await {
            tick.expect("tick task").expect("tick");
        }
    }
    until_all(&replicas, "the stage never advanced everywhere", &path, |r| r["current_stage"] == 1)
        .await;
    assert_eq!(advanced_to(&gapless_audit(&replicas[2]).await, 1), 1, "advanced once");

    // Pause on one replica and advance on another at the same moment: both are stored, one
    // after the other, and every replica ends up with the same rollout.
    let (pause, advance, resume) =
        (format!("{path}/pause"), format!("{path}/advance"), format!("{path}/resume"));
    let pause_now = replicas[0].op_json(Method::POST, &pause, None);
    let advance_now = replicas[1].op_json(Method::POST, &advance, None);
    let ((paused, _), (advanced, _)) = tokio::join!(pause_now, advance_now);
    assert_eq!((paused, advanced), (200, 200));
    let entries = gapless_audit(&replicas[0]).await;
    let operator: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| ["rollout.pause", "rollout.advance"].contains(a))
        .collect();
    assert_eq!(operator.len(), 2, "each action recorded once: {operator:?}");
    // The later one decides: an advance also resumes.
    let state = match operator[1] {
        "rollout.pause" => "paused",
        _ => "in_progress",
    };
    until_all(&replicas, "the replicas disagree on the rollout", &path, |r| {
        r["state"] == state && r["current_stage"] == 2
    })
    .await;

    // A session opened on one replica works on another at once, and once ended on a third,
    // is refused for changes everywhere.
    let session = sign_in(&replicas[0]).await;
    let resumed = with_cookie(&replicas[1], Method::POST, &resume, &session).await;
    assert_eq!(resumed, (200, String::new()));
    let out = with_cookie(&replicas[2], Method::DELETE, "/api/session", &session).await;
    assert_eq!(out.0, 200);
    let refused = with_cookie(&replicas[0], Method::POST, &pause, &session).await;
    assert_eq!(refused, (401, "session_expired".to_owned()));

    // Everything stopped and one replica started again: the same fleet, the same log. (What
    // a replica shows is caught up once a second: wait until all three show the same.)
    let entries = gapless_audit(&replicas[2]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut views = join_all(replicas.iter().map(TestServer::observable)).await;
    while views.windows(2).any(|pair| pair[0] != pair[1]) {
        assert!(std::time::Instant::now() < deadline, "the replicas never agreed");
        // The polling interval; agreement is what is waited for.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        views = join_all(replicas.iter().map(TestServer::observable)).await;
    }
    let before = views.swap_remove(0);
    for replica in replicas {
        replica.stop().await;
    }
    let again = self::replicas(1, &data, &releases, &database).await;
    assert_eq!(again[0].observable().await, before);
    assert_eq!(gapless_audit(&again[0]).await, entries);
}

/// Two `serve --replica` processes: kill -9 the one running the rollout engine, and the other
/// takes the engine over (its lease ends with the dead one's connection), with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_moves_to_another_replica_when_its_replica_is_killed() {
    let setup = ServeSetup::new();
    let (releases, http, deadline) = (&setup.releases, &setup.http, setup.deadline);
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let replica = setup.start(name, &["--replica"]);
        until("a replica never served", deadline, || replica.healthy(http)).await;
        replicas.push(replica);
    }
    let post = |url: String, body: Value| http.post(url).bearer_auth(OPERATOR).json(&body).send();
    for version in [1, 2] {
        let (path, image) = releases.image(version, 50_000);
        let manifest = releases.manifest(version, &image, None, None);
        let url = format!("{}/api/releases", replicas[0].url().expect("serving"));
        let response = post(url, json!({"manifest": manifest, "image_path": path})).await;
        assert_eq!(response.expect("publish").status(), 201);
    }
    // A rollout with no appliance completes at the engine's next run, wherever it runs.
    let roll_out = |replica: &ServeProcess, version: u64| {
        let url = format!("{}/api/rollouts", replica.url().expect("serving"));
        post(url, json!({"version": version, "strategy": "immediate"}))
    };
    let completed = |replica: &ServeProcess, id: u64| {
        let url = format!("{}/api/rollouts/{id}", replica.url().expect("serving"));
        let request = http.get(url).bearer_auth(OPERATOR).send();
        async move {
            let rollout: Value = request.await.expect("get").json().await.expect("json");
            rollout["state"] == "completed"
        }
    };
    let response = roll_out(&replicas[1], 1).await.expect("rollout");
    assert_eq!(response.status(), 201);
    let first: Value = response.json().await.expect("json");
    let first = first["id"].as_u64().expect("id");
    until("the engine never ran", deadline, || completed(&replicas[1], first)).await;
    let leads = |replica: &ServeProcess| replica.log().contains("runs the rollout engine now");
    let leader = replicas.iter().position(leads).expect("one replica says it runs the engine");
    assert_eq!(replicas.iter().filter(|r| leads(r)).count(), 1, "two engines");
    let before = replicas[1 - leader].fleet(http).await;

    replicas[leader].child.kill().expect("kill -9");
    let killed = std::time::Instant::now();
    let survivor = &replicas[1 - leader];
    let response = roll_out(survivor, 2).await.expect("rollout");
    assert_eq!(response.status(), 201, "{}", survivor.log());
    let second: Value = response.json().await.expect("json");
    let second = second["id"].as_u64().expect("id");
    until("the survivor never ran the engine", deadline, || completed(survivor, second)).await;
    eprintln!("the engine ran on the survivor {:?} after the kill", killed.elapsed());
    assert!(leads(survivor), "{}", survivor.log());

    let after = survivor.fleet(http).await;
    assert_eq!(after["releases"], before["releases"]);
    let entries = |state: &Value| state["audit"].as_array().expect("audit").clone();
    assert!(entries(&after).starts_with(&entries(&before)), "audit lost or rewritten:\n{after}");
    assert_gapless(&entries(&after));
}

/// Replicas check the same tokens: one configured with another refuses to start, instead of
/// changing the token every other replica checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_other_tokens_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = Arc::new(TestPostgres::start());
    let releases = Releases::new(dir.path());
    let data = dir.path().join("data");
    let first = replicas(1, &data, &releases, &database).await;
    let mut config = sitecast_coordinator::server::ServerConfig::new(data.clone());
    config.database = Some(database.url());
    config.replica = true;
    config.enrollment_token = Some(ENROLL.into());
    config.operator_token = Some("another-operator-secret".into());
    let clock = std::sync::Arc::new(sitecast_coordinator::server::ManualClock::new(start_time()));
    let error = sitecast_coordinator::server::Coordinator::open(config.clone(), clock.clone())
        .expect_err("another operator token");
    assert!(error.to_string().contains("--operator-token differs"), "{error}");
    config.operator_token = Some(OPERATOR.into());
    config.ddi_gateway_token = Some("gateway".into());
    sitecast_coordinator::server::Coordinator::open(config.clone(), clock.clone())
        .expect("a gateway token where there was none: set");
    config.ddi_gateway_token = None;
    let error = sitecast_coordinator::server::Coordinator::open(config, clock)
        .expect_err("a gateway token the others have");
    assert!(error.to_string().contains("--ddi-gateway-token differs"), "{error}");
    // Nothing of the refused ones was stored: the tokens are the first replica's.
    let (status, _) = first[0].op_json(Method::GET, "/api/rollouts", None).await;
    assert_eq!(status, 200);
    let url = database.url();
    // The synchronous client runs a runtime of its own: not on this test's.
    let reasons: Vec<String> = std::thread::spawn(move || {
        let mut sql = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("sql");
        let query = "SELECT entry->'detail'->>'reason' FROM audit
                     WHERE entry->>'action' = 'token.set'";
        sql.query(query, &[]).expect("audit").iter().map(|row| row.get(0)).collect()
    })
    .join()
    .expect("audit");
    assert!(!reasons.iter().any(|r| r.starts_with("replaced")), "{reasons:?}");
}

/// Replicas that do not share a data directory: an image published on one is not on the
/// other's disk, which says so (503, a code of its own) instead of failing obscurely, so a
/// client tries again (another replica may have it) and the operator sees the mistake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_image_says_where_the_mistake_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = Arc::new(TestPostgres::start());
    let releases = Releases::new(dir.path());
    let one = replicas(1, &dir.path().join("one"), &releases, &database).await;
    let other = replicas(1, &dir.path().join("other"), &releases, &database).await;
    one[0].publish_two(&releases, 20_000).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let image = |server: &TestServer| {
        let request = server.op(Method::GET, "/api/releases/2/image").send();
        async move {
            let response = request.await.expect("get");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["code"].as_str().unwrap_or("").to_owned())
        }
    };
    until("the other replica never learned of release 2", deadline, || async {
        image(&other[0]).await.0 != 404
    })
    .await;
    assert_eq!(image(&other[0]).await, (503, "file_not_here".to_owned()));
    assert_eq!(image(&one[0]).await.0, 200);
}
