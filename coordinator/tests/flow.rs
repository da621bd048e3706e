//! The whole rollout flow over HTTP against a real server, on redb, on PostgreSQL, and on
//! PostgreSQL as a replica.

mod common;

use common::*;
use jiff::SignedDuration;
use reqwest::Method;
use serde_json::json;

on_every_backend!(
    staged_rollout_over_http_with_pause_resume_advance_and_rollback,
    a_restart_mid_rollout_loses_nothing,
    pins_hold_appliances_and_groups_on_a_version,
    maintenance_windows_come_from_the_site_unless_the_appliance_overrides_them,
);

/// Publishes v1 and v2 and enrolls `n` appliances on v1 at two sites.
async fn fleet(server: &TestServer, releases: &Releases, n: usize) -> Vec<Appliance> {
    for version in [1, 2] {
        let (_, image) = releases.image(version, 200_000 + version as usize);
        let response = server.publish(&releases.manifest(version, &image, None, None), image).await;
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
    }
    let mut appliances = Vec::new();
    for i in 0..n {
        let appliance =
            Appliance::new(if i % 2 == 0 { "store-1" } else { "store-2" }, &format!("a{i}"), 1);
        let response = appliance.checkin(server).await;
        assert!(!response.update_available);
        appliances.push(appliance);
    }
    appliances
}

async fn offered(server: &TestServer, appliances: &[Appliance]) -> Vec<usize> {
    let mut offered = Vec::new();
    for (i, appliance) in appliances.iter().enumerate() {
        let response = appliance.checkin(server).await;
        if response.update_available {
            assert_eq!(response.version, Some(2));
            let manifest = response.manifest.expect("manifest with the offer");
            server
                .root
                .verify_release(manifest.as_bytes(), start_time())
                .expect("the offer verifies");
            let origin = response.origin.expect("origin URLs");
            assert!(origin.image.starts_with(&server.url), "{}", origin.image);
            offered.push(i);
        }
    }
    offered
}

async fn staged_rollout_over_http_with_pause_resume_advance_and_rollback(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_on(backend, &dir.path().join("data"), &releases.root).await;
    let mut appliances = fleet(&server, &releases, 40).await;

    let (status, rollout) = server
        .op_json(Method::POST, "/api/rollouts", Some(json!({"version": 2, "strategy": "staged"})))
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_u64().expect("id");
    let stage0 = offered(&server, &appliances).await;
    assert_eq!(stage0.len(), 2, "5% of 40 in stage 0");

    for &i in &stage0 {
        for state in ["downloading", "ready", "rebooting", "succeeded"] {
            appliances[i].report(&server, state, 2).await;
        }
    }
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(id).await["current_stage"], 0, "the delay has not passed");
    server.clock.advance(SignedDuration::from_hours(24));
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(id).await["current_stage"], 1, "healthy stage advanced after 24 h");

    let stage1: Vec<usize> = offered(&server, &appliances).await;
    assert_eq!(stage1.len(), 8, "25% of 40 minus the two already on v2");
    for (n, &i) in stage1.iter().enumerate() {
        let outcome = if n < 2 { "failed" } else { "succeeded" };
        appliances[i].report(&server, "downloading", 2).await;
        appliances[i].report(&server, outcome, 2).await;
    }
    server.coordinator.tick().expect("tick");
    let paused = server.rollout(id).await;
    assert_eq!(paused["state"], "paused", "2 of 8 failed: {paused}");
    assert!(paused["paused_reason"].as_str().expect("reason").contains("25%"), "{paused}");
    assert!(offered(&server, &appliances).await.is_empty(), "a paused rollout offers nothing new");

    let (status, resumed) =
        server.op_json(Method::POST, &format!("/api/rollouts/{id}/resume"), None).await;
    assert_eq!((status, resumed["state"].as_str()), (200, Some("in_progress")));
    let (status, advanced) =
        server.op_json(Method::POST, &format!("/api/rollouts/{id}/advance"), None).await;
    assert_eq!((status, advanced["current_stage"].as_u64()), (200, Some(2)));
    assert_eq!(
        offered(&server, &appliances).await.len(),
        32,
        "all 40 but the 8 on v2: the 2 that failed get it again"
    );

    let (status, rolled) =
        server.op_json(Method::POST, &format!("/api/rollouts/{id}/rollback"), None).await;
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(
        (rolled["state"].as_str(), rolled["rolled_back"].as_bool()),
        (Some("failed"), Some(true))
    );
    let on_v2 = &appliances[stage0[0]];
    let response = on_v2.checkin(&server).await;
    assert!(response.update_available);
    assert_eq!(response.version, Some(1));
    assert_eq!(response.intent, Some(sitecast_manifest::api::UpdateIntent::Rollback));

    let actions = server.audit_actions().await;
    for action in [
        "release.publish",
        "appliance.register",
        "rollout.create",
        "appliance.report",
        "rollout.decide",
        "rollout.resume",
        "rollout.advance",
        "rollout.rollback",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} missing from the audit log: {actions:?}"
        );
    }

    // MACs arrived in two spellings and are stored one way.
    let (_, list) = server.op_json(Method::GET, "/api/appliances", None).await;
    let first = appliances.iter().find(|a| a.id() == list[0]["key"]).expect("listed");
    let b = *first.key.public().as_bytes();
    let stored = |n: u8| format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{n:02x}", b[0], b[1], b[2], b[3]);
    assert_eq!(list[0]["macs"], json!([stored(0x11), stored(0x22)]), "{:?}", first.macs);
}

async fn a_restart_mid_rollout_loses_nothing(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_on(backend, &dir.path().join("data"), &releases.root).await;
    let mut appliances = fleet(&server, &releases, 20).await;
    let (_, rollout) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "staged", "stages": [
            {"percent": 10, "delay_hours": 1}, {"percent": 100, "delay_hours": 0}]})),
        )
        .await;
    let id = rollout["id"].as_u64().expect("id");
    let stage0 = offered(&server, &appliances).await;
    assert_eq!(stage0.len(), 2);
    appliances[stage0[0]].report(&server, "succeeded", 2).await;
    appliances[stage0[1]].report(&server, "downloading", 2).await;
    let before = server.rollout(id).await;
    let audit_before = server.audit_actions().await;

    let server = server.restart().await;
    let after = server.rollout(id).await;
    assert_eq!(after, before, "rollout and its counts survive the restart");
    assert_eq!(server.audit_actions().await, audit_before);
    assert_eq!(offered(&server, &appliances).await, vec![stage0[1]], "the same stage members");

    appliances[stage0[1]].report(&server, "succeeded", 2).await;
    server.clock.advance(SignedDuration::from_hours(1));
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(id).await["current_stage"], 1, "and it continues");
}

async fn pins_hold_appliances_and_groups_on_a_version(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_on(backend, &dir.path().join("data"), &releases.root).await;
    let appliances = fleet(&server, &releases, 3).await;
    // An appliance pinned to 2 gets it without any rollout; unpinned ones do not.
    let (status, _) = server
        .op_json(
            Method::POST,
            &format!("/api/appliances/{}/pin", appliances[0].id()),
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(offered(&server, &appliances).await, vec![0]);
    // A group pin applies to the appliances of the group.
    let grouped = Appliance::new("store-1", "grouped", 1);
    let body =
        serde_json::to_vec(&json!({"site": "store-1", "group": "kiosks", "platform": PLATFORM,
        "installed_version": 1, "enrollment_token": ENROLL}))
        .expect("json");
    let response = grouped
        .signed(&server, Method::POST, "/api/appliances/checkin", &body)
        .send()
        .await
        .expect("send");
    let answer: serde_json::Value = response.json().await.expect("json");
    assert_eq!(answer["update_available"], false);
    let (status, _) =
        server.op_json(Method::POST, "/api/groups/kiosks/pin", Some(json!({"version": 2}))).await;
    assert_eq!(status, 204);
    let response = grouped
        .signed(&server, Method::POST, "/api/appliances/checkin", &body)
        .send()
        .await
        .expect("send");
    let answer: serde_json::Value = response.json().await.expect("json");
    assert_eq!(
        (answer["update_available"].as_bool(), answer["version"].as_u64()),
        (Some(true), Some(2))
    );
    let (status, _) =
        server.op_json(Method::POST, "/api/groups/kiosks/pin", Some(json!({"version": 9}))).await;
    assert_eq!(status, 404);
    assert!(server.audit_actions().await.iter().any(|a| a == "group.pin"));
}

async fn maintenance_windows_come_from_the_site_unless_the_appliance_overrides_them(
    backend: Backend,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_on(backend, &dir.path().join("data"), &releases.root).await;
    let appliances = fleet(&server, &releases, 2).await;
    let default = appliances[0].checkin(&server).await.window.expect("a window");
    assert_eq!(
        (default.start.as_str(), default.end.as_str()),
        ("02:00", "05:00"),
        "the default window"
    );
    let site =
        json!({"start": "01:00", "end": "03:00", "timezone": "Europe/Berlin", "days": ["sun"]});
    let (status, _) = server.op_json(Method::PUT, "/api/sites/store-1/window", Some(site)).await;
    assert_eq!(status, 204);
    assert_eq!(
        appliances[0].checkin(&server).await.window.expect("window").timezone,
        "Europe/Berlin"
    );
    let own =
        json!({"start": "22:00", "end": "23:00", "timezone": "America/New_York", "days": ["mon"]});
    let path = format!("/api/appliances/{}/window", appliances[0].id());
    let (status, _) = server.op_json(Method::PUT, &path, Some(own)).await;
    assert_eq!(status, 204);
    assert_eq!(appliances[0].checkin(&server).await.window.expect("window").start, "22:00");
    let bad = json!({"start": "25:00", "end": "23:00", "timezone": "UTC", "days": []});
    let (status, _) = server.op_json(Method::PUT, &path, Some(bad)).await;
    assert_eq!(status, 400);
    let (status, _) = server.op_json(Method::PUT, &path, Some(serde_json::Value::Null)).await;
    assert_eq!(status, 204);
    assert_eq!(
        appliances[0].checkin(&server).await.window.expect("window").timezone,
        "Europe/Berlin",
        "back to the site's"
    );
}
