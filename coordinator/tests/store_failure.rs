//! Commit, then apply: when the store cannot commit, nothing changes in memory either; the
//! server says it is unhealthy and refuses writes until the store is back, and every answer it
//! gave agrees with what is stored, before and after a restart.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// What the operator can see, minus check-in bookkeeping (last seen), which is not a change.
async fn observable(server: &TestServer) -> Value {
    let (_, releases) = server.op_json(Method::GET, "/api/releases", None).await;
    let (_, rollouts) = server.op_json(Method::GET, "/api/rollouts", None).await;
    let (_, mut appliances) = server.op_json(Method::GET, "/api/appliances", None).await;
    for appliance in appliances.as_array_mut().expect("list") {
        appliance["last_checkin"] = Value::Null;
        appliance["online"] = Value::Null;
    }
    let (_, audit) = server.op_json(Method::GET, "/api/audit?limit=5000", None).await;
    json!({"releases": releases, "rollouts": rollouts, "appliances": appliances, "audit": audit})
}

async fn health(server: &TestServer) -> u16 {
    let response = server.http.get(format!("{}/healthz", server.url)).send().await.expect("get");
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_commit_changes_nothing_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let data = dir.path().join("data");
    let server = TestServer::start_faulty(&data, &releases.root).await;
    for version in [1, 2] {
        let (_, image) = releases.image(version, 100_000);
        let manifest = releases.manifest(version, &image, None, None);
        assert_eq!(server.publish(&manifest, image).await.status(), 201);
    }
    let known = Appliance::new("s", "known", 1);
    known.checkin(&server).await;
    let before = observable(&server).await;
    assert_eq!(health(&server).await, 200);

    let faulty = server.faulty.clone().expect("faulty store");
    faulty.fail(true);
    // A rollout that could not be stored does not exist and is offered to no one.
    let (status, body) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "immediate"})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (503, Some("store_unavailable")), "{body}");
    assert_eq!(health(&server).await, 503);
    assert!(!known.checkin(&server).await.update_available, "bookkeeping check-ins still answer");
    // An enrollment that could not be stored registers no one.
    let newcomer = Appliance::new("s", "newcomer", 1);
    assert_eq!(error_code(newcomer.checkin_raw(&server, true).await).await.0, 503);
    // Nor does a sign-in that could not be audited.
    let response = server
        .http
        .post(format!("{}/api/session", server.url))
        .json(&json!({"token": OPERATOR}))
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("set-cookie").is_none());
    let (status, _) = server.op_json(Method::POST, "/api/releases/1/deactivate", None).await;
    assert_eq!(status, 503);
    assert_eq!(observable(&server).await, before, "memory never got ahead of the store");
    assert!(faulty.commits_refused.load(std::sync::atomic::Ordering::SeqCst) >= 4);

    // Space is back: the next write reopens the store and goes through.
    faulty.fail(false);
    let (status, rollout) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "immediate"})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(health(&server).await, 200);
    assert_eq!(newcomer.checkin_raw(&server, false).await.status(), 403, "was never enrolled");
    assert_eq!(known.checkin(&server).await.version, Some(2));

    // A pause that could not be stored does not pause.
    let id = rollout["id"].as_u64().expect("id");
    faulty.fail(true);
    let (status, _) =
        server.op_json(Method::POST, &format!("/api/rollouts/{id}/pause"), None).await;
    assert_eq!(status, 503);
    assert_eq!(server.rollout(id).await["state"], "in_progress");
    faulty.fail(false);

    // After a restart, exactly what was answered as done is there, each change audited.
    let live = observable(&server).await;
    drop(faulty);
    let server = server.restart().await;
    assert_eq!(observable(&server).await, live);
    let actions = server.audit_actions().await;
    let count = |action: &str| actions.iter().filter(|a| *a == action).count();
    assert_eq!(count("release.publish"), 2);
    assert_eq!(count("appliance.register"), 1);
    assert_eq!(count("rollout.create"), 1);
    assert_eq!(count("rollout.pause"), 0);
    assert_eq!(count("session.open"), 0);
}

/// The same on a real filesystem that fills up: a tmpfs of a few MiB (needs root to mount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_that_was_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("small");
    std::fs::create_dir_all(&mount).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "\n*** SKIPPED a_full_disk_loses_nothing_that_was_answered: mounting a tmpfs needs root ***\n"
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let releases = Releases::new(dir.path());
    let data = mount.join("data");
    let server = TestServer::start(&data, &releases.root).await;
    let (_, image) = releases.image(1, 100_000);
    assert_eq!(
        server.publish(&releases.manifest(1, &image, None, None), image).await.status(),
        201
    );
    // Fill the filesystem, leaving a little room.
    let filler = mount.join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let block = vec![0xa5u8; 64 * 1024];
    loop {
        use std::io::Write;
        if file.write_all(&block).is_err() {
            break;
        }
    }
    drop(file);
    let free = std::fs::metadata(&filler).expect("stat").len();
    let keep = free.saturating_sub(256 * 1024);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .expect("open")
        .set_len(keep)
        .expect("trim");

    // Enroll until the disk refuses; every answer must match what is stored.
    let mut enrolled = Vec::new();
    let mut refused = Vec::new();
    for i in 0..2000 {
        let appliance = Appliance::new("s", &format!("a{i}"), 1);
        let response = appliance.checkin_raw(&server, true).await;
        match response.status().as_u16() {
            200 => enrolled.push(appliance),
            503 => {
                refused.push(appliance);
                if refused.len() >= 3 {
                    break;
                }
            }
            other => panic!("enrollment answered {other}: {:?}", response.text().await),
        }
    }
    assert!(!refused.is_empty(), "the disk never filled ({} enrolled)", enrolled.len());
    // A change now may or may not find room (the server reopens its store to try): either
    // way the answer must match what is stored.
    let (status, _) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 1, "strategy": "immediate"})),
        )
        .await;
    assert!(matches!(status, 201 | 503), "{status}");
    let rollout_answered = status == 201;

    // Space returns: the store is reopened by the server itself (its background loop polls),
    // and what it shows is what it stored.
    std::fs::remove_file(&filler).expect("free space");
    let mut healthy = false;
    for _ in 0..500 {
        if health(&server).await == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(healthy, "the server never reopened its store");
    agrees(&server, &enrolled, &refused).await;
    let rollouts = |body: Value| body.as_array().map_or(0, Vec::len);
    assert_eq!(
        rollouts(server.op_json(Method::GET, "/api/rollouts", None).await.1),
        usize::from(rollout_answered)
    );
    let server = server.restart().await;
    agrees(&server, &enrolled, &refused).await;
    assert_eq!(
        rollouts(server.op_json(Method::GET, "/api/rollouts", None).await.1),
        usize::from(rollout_answered)
    );
    assert_eq!(enrolled[0].checkin_raw(&server, false).await.status(), 200);
}

/// Every enrollment answered 200 is stored and audited; every one refused is not.
async fn agrees(server: &TestServer, enrolled: &[Appliance], refused: &[Appliance]) {
    let (_, list) = server.op_json(Method::GET, "/api/appliances", None).await;
    let keys: Vec<&str> =
        list.as_array().expect("list").iter().filter_map(|a| a["key"].as_str()).collect();
    for appliance in enrolled {
        assert!(keys.contains(&appliance.id().as_str()), "an answered enrollment was lost");
    }
    for appliance in refused {
        assert!(!keys.contains(&appliance.id().as_str()), "a refused enrollment exists");
    }
    let registered =
        server.audit_actions().await.iter().filter(|a| *a == "appliance.register").count();
    assert_eq!(registered, enrolled.len(), "every enrollment, and only those, audited");
}
