//! Central Command against appliances that lie and clients that are not the fleet's: each test
//! is an attack that once worked, and shows it refused with nothing stored.

mod common;

use common::*;
use jiff::SignedDuration;
use reqwest::Method;
use serde_json::{Value, json};
use sitecast_coordinator::server::Clock;

async fn publish(server: &TestServer, releases: &Releases, versions: &[u64]) -> Vec<Vec<u8>> {
    let mut images = Vec::new();
    for &version in versions {
        let (_, image) = releases.image(version, 150_000 + version as usize);
        let response =
            server.publish(&releases.manifest(version, &image, None, None), image.clone()).await;
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        images.push(image);
    }
    images
}

async fn listing(server: &TestServer, appliance: &Appliance) -> Value {
    let (_, list) = server.op_json(Method::GET, "/api/appliances", None).await;
    list.as_array()
        .expect("list")
        .iter()
        .find(|a| a["key"] == appliance.id())
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliances_never_offered_a_release_cannot_dilute_its_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    publish(&server, &releases, &[1, 2]).await;
    let mut real = vec![Appliance::new("s", "real-0", 1), Appliance::new("s", "real-1", 1)];
    for appliance in &real {
        appliance.checkin(&server).await;
    }
    let id = server.roll_out_now(2).await;

    // 19 keys enrolled with the token after the rollout began: never offered, never members.
    let mut fakes: Vec<Appliance> =
        (0..19).map(|i| Appliance::new("s", &format!("fake-{i}"), 1)).collect();
    for fake in &mut fakes {
        let answer = fake.checkin(&server).await;
        assert!(!answer.update_available, "an appliance enrolled later is not in the rollout");
        let (status, code) = error_code(fake.report_raw(&server, "succeeded", 2).await).await;
        assert_eq!((status, code.as_str()), (409, "not_offered"));
    }
    // One claims a version no release explains: shown as a claim, not believed.
    let liar = Appliance::new("s", "liar", 999_999);
    liar.checkin(&server).await;
    let shown = listing(&server, &liar).await;
    assert_eq!(shown["claimed_version"], 999_999, "{shown}");
    assert_ne!(shown["installed_version"], 999_999, "{shown}");

    for appliance in &mut real {
        assert_eq!(appliance.checkin(&server).await.version, Some(2));
        appliance.report(&server, "downloading", 2).await;
        appliance.report(&server, "failed", 2).await;
    }
    server.coordinator.tick().expect("tick");
    let view = server.rollout(id).await;
    assert_eq!(view["state"], "paused", "{view}");
    assert_eq!(view["failure_rate"], 1.0, "{view}");
    let members: usize = view["stage_counts"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["members"].as_u64().expect("n") as usize)
        .sum();
    assert_eq!(members, 2, "only the two appliances targeted at creation count: {view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_report_cannot_be_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    publish(&server, &releases, &[1, 2]).await;
    let mut appliance = Appliance::new("s", "a", 1);
    appliance.checkin(&server).await;
    let (status, _) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "immediate"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(appliance.checkin(&server).await.version, Some(2));

    // Captured on the wire: the exact bytes and headers of a `rebooting` report.
    let body =
        serde_json::to_vec(&json!({"state": "rebooting", "version": 2, "seq": 1})).expect("json");
    let original = appliance.signed(&server, Method::POST, "/api/appliances/report", &body);
    let captured = original.try_clone().expect("clone");
    assert_eq!(original.send().await.expect("send").status(), 204);
    appliance.seq = 1;
    appliance.report(&server, "succeeded", 2).await;
    server.clock.advance(SignedDuration::from_secs(28));
    let replay = captured.send().await.expect("send");
    assert_eq!(error_code(replay).await, (409, "stale_report".to_owned()));
    assert_eq!(listing(&server, &appliance).await["update"]["state"], "succeeded");

    // An agent that sends no sequence number is held to its signed timestamps instead.
    let legacy = serde_json::to_vec(&json!({"state": "succeeded", "version": 2})).expect("json");
    let request = appliance.signed(&server, Method::POST, "/api/appliances/report", &legacy);
    let again = request.try_clone().expect("clone");
    assert_eq!(request.send().await.expect("send").status(), 204);
    assert_eq!(
        error_code(again.send().await.expect("send")).await,
        (409, "stale_report".to_owned())
    );
    // And the check-in answer tells an agent that lost its count where to continue.
    assert_eq!(appliance.checkin(&server).await.report_seq, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_is_bounded_and_identities_are_not_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start_with(&dir.path().join("data"), &releases.root, |config| {
        config.enroll_burst = 5;
        config.enroll_per_sec = 0.000_1;
    })
    .await;
    let mut enrolled = Vec::new();
    for i in 0..5 {
        let appliance = Appliance::new("s", &format!("a{i}"), 0);
        appliance.checkin(&server).await;
        enrolled.push(appliance);
    }
    let late = Appliance::new("s", "late", 0);
    let response = late.checkin_raw(&server, true).await;
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap_or("")), Some("10"));
    assert_eq!(error_code(response).await, (429, "enrollment_busy".to_owned()));
    // Appliances already enrolled are not held up by it.
    enrolled[0].checkin(&server).await;

    // A huge first check-in is cut off before it is read whole; an enrolled one may not list
    // more MACs than an appliance has.
    let mut flood = Appliance::new("s", "flood", 0);
    flood.macs = (0..62_000)
        .map(|i| format!("02:00:00:{:02x}:{:02x}:{:02x}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    assert_cut_off(flood.checkin_request(&server, true)).await;
    let mut many = Appliance::new("s", "a0", 0);
    many.key = enrolled[0].key.clone();
    many.macs = flood.macs[..17].to_vec();
    assert_eq!(
        error_code(many.checkin_raw(&server, true).await).await,
        (400, "invalid".to_owned())
    );

    // A new key may not take an enrolled appliance's name or MACs…
    let mut impostor = Appliance::new("s", "a1", 0);
    impostor.key = sitecast_manifest::SecretKey::generate().expect("rng");
    let response = impostor.checkin_raw(&server, true).await;
    assert_eq!(error_code(response).await, (409, "identity_taken".to_owned()));
    let mut mac_thief = Appliance::new("s", "other-name", 0);
    mac_thief.macs = vec![enrolled[2].macs[0].to_lowercase().replace('-', ":")];
    assert_eq!(error_code(mac_thief.checkin_raw(&server, true).await).await.1, "identity_taken");
    // …until an operator removes it; then the old key is unknown and the name is free.
    let (status, _) = server
        .op_json(Method::DELETE, &format!("/api/appliances/{}", enrolled[1].id()), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        error_code(enrolled[1].checkin_raw(&server, false).await).await.1,
        "unknown_appliance"
    );
    // (The enrollment limit still holds: a bigger one lets the replacement in.)
    let server = server.restart_with(|config| config.enroll_burst = 10).await;
    assert_eq!(impostor.checkin_raw(&server, true).await.status(), 200);
    let actions = server.audit_actions().await;
    assert!(actions.contains(&"appliance.remove".to_owned()), "{actions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_appliance_changes_about_itself_and_failed_sign_ins_are_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let mut appliance = Appliance::new("store-1", "a", 0);
    appliance.checkin(&server).await;
    appliance.site = "store-2".into();
    appliance.checkin(&server).await;
    let response = server
        .http
        .post(format!("{}/api/session", server.url))
        .json(&json!({"token": "guess"}))
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 403);
    let (_, entries) = server.op_json(Method::GET, "/api/audit?limit=5000", None).await;
    let entries = entries.as_array().expect("list").clone();
    let moved =
        entries.iter().find(|e| e["action"] == "appliance.update").expect("site change audited");
    assert_eq!(moved["detail"]["site"], json!(["store-1", "store-2"]));
    // The refusal is written in the background: poll for it.
    let mut refused = false;
    for _ in 0..200 {
        refused = server.audit_actions().await.contains(&"auth.refused".to_owned());
        if refused {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "a failed sign-in is in the audit log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_for_the_fleet_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let images = publish(&server, &releases, &[1, 2]).await;
    let member = Appliance::new("s", "member", 1);
    member.checkin(&server).await;
    let (status, _) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "immediate"})),
        )
        .await;
    assert_eq!(status, 201);
    let offer = member.checkin(&server).await;
    let origin = offer.origin.expect("origin");
    let image_path = "/api/releases/2/image";
    let get = |url: String| server.http.get(url);

    // Anyone: refused, for the image and for verified ranges.
    assert_eq!(get(format!("{}{image_path}", server.url)).send().await.expect("get").status(), 401);
    assert_eq!(
        get(format!("{}?start=0&end=1", origin.ranges)).send().await.expect("get").status(),
        401
    );
    // A key the fleet does not know, even with a valid signature.
    let stranger = Appliance::new("s", "stranger", 1);
    let response =
        stranger.signed(&server, Method::GET, image_path, &[]).send().await.expect("get");
    assert_eq!(error_code(response).await, (403, "unknown_appliance".to_owned()));
    // The member, signed; and the URL from its offer, with no credentials at all.
    let response = member.signed(&server, Method::GET, image_path, &[]).send().await.expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").as_ref(), images[1].as_slice());
    assert!(origin.image.contains("sig="), "{}", origin.image);
    let response = get(origin.image.clone()).send().await.expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").as_ref(), images[1].as_slice());
    // A signature for another release, a changed one, or an expired one: refused.
    let other = origin.image.replace("/releases/2/", "/releases/1/");
    assert_eq!(get(other).send().await.expect("get").status(), 403);
    let last = origin.image.pop_last_hex();
    assert_eq!(get(last).send().await.expect("get").status(), 403);
    server.clock.advance(SignedDuration::from_hours(25));
    assert_eq!(get(origin.image.clone()).send().await.expect("get").status(), 403);
    // A deactivated release: gone for appliances, still there for the operator.
    let (status, _) = server.op_json(Method::POST, "/api/releases/1/deactivate", None).await;
    assert_eq!(status, 204);
    let old = "/api/releases/1/image";
    let response = member.signed(&server, Method::GET, old, &[]).send().await.expect("get");
    assert_eq!(response.status(), 404);
    let response = server.op(Method::GET, old).send().await.expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").as_ref(), images[0].as_slice());
    let _ = server.clock.now();
}

trait PopLastHex {
    fn pop_last_hex(&self) -> String;
}

impl PopLastHex for String {
    /// The URL with the last hex digit of its signature changed.
    fn pop_last_hex(&self) -> String {
        let mut text = self.clone();
        let last = text.pop().expect("non-empty");
        text.push(if last == '0' { '1' } else { '0' });
        text
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_over_mixed_hardware_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    publish(&server, &releases, &[1, 2]).await;
    let mut x86 = vec![Appliance::new("s", "x0", 1), Appliance::new("s", "x1", 1)];
    let mut arm = Appliance::new("s", "arm", 1);
    arm.platform = "aarch64-appliance".into();
    for appliance in x86.iter().chain([&arm]) {
        appliance.checkin(&server).await;
    }
    let (status, rollout) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "immediate"})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(rollout["not_applicable"], 1, "{rollout}");
    let id = rollout["id"].as_u64().expect("id");
    assert!(!arm.checkin(&server).await.update_available);
    for appliance in &mut x86 {
        assert_eq!(appliance.checkin(&server).await.version, Some(2));
        appliance.report(&server, "succeeded", 2).await;
    }
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(id).await["state"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_offered_again_by_a_pin_still_reports_as_it_began() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    publish(&server, &releases, &[1, 2]).await;
    let appliance = Appliance::new("s", "a", 1);
    appliance.checkin(&server).await;
    let (_, rollout) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "immediate"})),
        )
        .await;
    let id = rollout["id"].as_u64().expect("id");
    assert_eq!(appliance.checkin(&server).await.rollout, Some(id));
    let report = |seq: u64, state: &str| {
        let body = json!({"state": state, "version": 2, "rollout": id, "seq": seq});
        appliance.signed(
            &server,
            Method::POST,
            "/api/appliances/report",
            &serde_json::to_vec(&body).expect("json"),
        )
    };
    assert_eq!(report(1, "ready").send().await.expect("send").status(), 204);
    // The operator pins it to the same release: the offer is now the pin's.
    let path = format!("/api/appliances/{}/pin", appliance.id());
    assert_eq!(server.op_json(Method::POST, &path, Some(json!({"version": 2}))).await.0, 204);
    assert_eq!(appliance.checkin(&server).await.rollout, None);
    // The agent still names the rollout it began with; its reports count.
    assert_eq!(report(2, "rebooting").send().await.expect("send").status(), 204);
    assert_eq!(report(3, "succeeded").send().await.expect("send").status(), 204);
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(id).await["state"], "completed");
}
