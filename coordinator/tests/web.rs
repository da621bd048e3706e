//! The Fleet Updates page: its sessions and CSRF rules over HTTP, and the page itself in a real
//! headless Chromium against a real coordinator with a staged rollout in progress.

mod common;
mod webdriver;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use jiff::SignedDuration;
use reqwest::Method;
use serde_json::{Value, json};
use webdriver::{Browser, require_browser, write_if_changed};

const V1_SIZE: usize = 400_000;
const V2_SIZE: usize = 1_600_000;
const GROUP: usize = 16 * 1024;

/// A fleet mid-rollout: v1 installed everywhere, a three-stage rollout of v2 with stage 1
/// finished and stage 2 under way, one failure, two appliances gone quiet.
struct Scene {
    rollout: u64,
    appliances: Vec<Appliance>,
    /// Index into `appliances` → stage.
    stage_of: BTreeMap<usize, usize>,
    /// The one appliance of the current stage still downloading (to finish from the test).
    downloading: usize,
    /// The one that failed.
    failed: usize,
    /// The agent rollout beside the image rollout, and its canary appliance that rolled back.
    agent_rollout: u64,
    agent_rolled_back: usize,
}

async fn report(server: &TestServer, appliance: &mut Appliance, body: Value) {
    let bytes = serde_json::to_vec(&body).expect("json");
    let response = appliance
        .signed(server, Method::POST, "/api/appliances/report", &bytes)
        .send()
        .await
        .expect("report");
    assert_eq!(response.status(), 204, "{:?}", response.text().await);
    if body["state"] == "succeeded" {
        appliance.installed_version = body["version"].as_u64().expect("version");
    }
}

/// The whole v2 image from the origin as this appliance (signed, so counted to its site).
async fn fetch_from_origin(server: &TestServer, appliance: &Appliance, blake3: &str) {
    let groups = V2_SIZE.div_ceil(GROUP);
    let path = format!("/api/blobs/{blake3}/ranges?start=0&end={groups}");
    let response = appliance.signed(server, Method::GET, &path, &[]).send().await.expect("ranges");
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.expect("ranges body");
    assert!(body.len() > V2_SIZE);
}

async fn scene(server: &TestServer, releases: &Releases) -> Scene {
    for (version, size) in [(1, V1_SIZE), (2, V2_SIZE)] {
        let (_, image) = releases.image(version, size);
        let response = server.publish(&releases.manifest(version, &image, None, None), image).await;
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
    }
    let (_, list) = server.op_json(Method::GET, "/api/releases", None).await;
    let blake3 = list[1]["blake3"].as_str().expect("v2 hash").to_owned();
    for (site, window) in [
        (
            "store-berlin",
            json!({"start": "02:00", "end": "05:00", "timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"]}),
        ),
        (
            "store-nyc",
            json!({"start": "04:00", "end": "06:00", "timezone": "America/New_York", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}),
        ),
    ] {
        let (status, body) =
            server.op_json(Method::PUT, &format!("/api/sites/{site}/window"), Some(window)).await;
        assert_eq!(status, 204, "{body}");
    }
    let mut appliances = Vec::new();
    for i in 0..20 {
        let (site, short) = match i % 3 {
            0 => ("store-berlin", "ber"),
            1 => ("store-nyc", "nyc"),
            _ => ("warehouse-lab", "lab"),
        };
        // Keys from names: the stages, and so who is quiet and who is in the agent canary,
        // are the same in every run.
        let mut appliance = Appliance::named(site, &format!("{short}-{:02}", i + 1), 1);
        appliance.agent_release = Some(1);
        appliance.checkin(server).await;
        appliances.push(appliance);
    }
    let (status, rollout) = server
        .op_json(
            Method::POST,
            "/api/rollouts",
            Some(json!({"version": 2, "strategy": "staged", "failure_threshold": 0.3, "stages": [
                {"percent": 20, "delay_hours": 24},
                {"percent": 70, "delay_hours": 24},
                {"percent": 100, "delay_hours": 0}]})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_u64().expect("id");
    let stage_of: BTreeMap<usize, usize> = appliances
        .iter()
        .enumerate()
        .map(|(i, a)| (i, rollout["members"][a.id()].as_u64().expect("member") as usize))
        .collect();
    let in_stage = |stage: usize| -> Vec<usize> {
        stage_of.iter().filter(|(_, s)| **s == stage).map(|(i, _)| *i).collect()
    };
    let (stage0, stage1, stage2) = (in_stage(0), in_stage(1), in_stage(2));
    assert_eq!((stage0.len(), stage1.len(), stage2.len()), (4, 10, 6));

    // The first appliance of a site to update takes the image from the origin; the others
    // get it from their LAN peers.
    let mut fetched: Vec<String> = Vec::new();
    let mut first_at_site = |site: &str| {
        let first = !fetched.iter().any(|s| s == site);
        if first {
            fetched.push(site.to_owned());
        }
        first
    };
    for &i in &stage0 {
        assert!(appliances[i].checkin(server).await.update_available);
        let from_origin = first_at_site(&appliances[i].site);
        if from_origin {
            fetch_from_origin(server, &appliances[i], &blake3).await;
        }
        let (origin, lan) = if from_origin { (V2_SIZE, 0) } else { (0, V2_SIZE) };
        for state in ["downloading", "ready", "rebooting", "succeeded"] {
            let body = json!({"state": state, "version": 2, "previous_version": 1, "rollout": id,
                "bytes_from_origin": origin, "bytes_from_lan": lan, "slot": "B", "progress": 1.0});
            report(server, &mut appliances[i], body).await;
        }
    }
    // (Early, so the audit log's newest entries are the appliances' reports.)
    let ddi_token = ddi_device_downloading(server).await;
    server.clock.advance(SignedDuration::from_hours(24));
    // Two appliances of the last stage stop checking in (offline after 3 minutes).
    let quiet = [stage2[0], stage2[1]];
    for (i, appliance) in appliances.iter().enumerate() {
        if !quiet.contains(&i) {
            appliance.checkin(server).await;
        }
    }
    ddi_poll(server, DDI_DEVICE, &ddi_token).await;
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(id).await["current_stage"], 1, "stage 1 was healthy");

    let plan: [(&str, f64); 10] = [
        ("succeeded", 1.0),
        ("succeeded", 1.0),
        ("succeeded", 1.0),
        ("succeeded", 1.0),
        ("failed", 1.0),
        ("rebooting", 1.0),
        ("ready", 1.0),
        ("downloading", 0.62),
        ("downloading", 0.18),
        ("pending", 0.0),
    ];
    let mut downloading = None;
    let mut failed = None;
    for (&i, &(state, progress)) in stage1.iter().zip(plan.iter()) {
        assert!(appliances[i].checkin(server).await.update_available);
        let from_origin = progress > 0.0 && first_at_site(&appliances[i].site);
        if from_origin {
            fetch_from_origin(server, &appliances[i], &blake3).await;
        }
        let got = (V2_SIZE as f64 * progress) as usize;
        let (origin, lan) = if from_origin { (got, 0) } else { (0, got) };
        let mut body = json!({"state": state, "version": 2, "previous_version": 1, "rollout": id,
            "bytes_from_origin": origin, "bytes_from_lan": lan, "progress": progress});
        if state == "failed" {
            failed = Some(i);
            body["error"] = json!("health check `app-ready` failed 3 times after boot");
            body["slot"] = json!("A");
        } else if matches!(state, "succeeded" | "rebooting") {
            body["slot"] = json!("B");
        }
        if state == "downloading" && downloading.is_none() {
            downloading = Some(i);
        }
        report(server, &mut appliances[i], body).await;
    }
    // Origin byte counts land after the response body is sent.
    for _ in 0..100 {
        let (_, sites) = server.op_json(Method::GET, "/api/sites", None).await;
        let counted = sites["sites"].as_array().expect("sites").iter().all(|s| {
            s["origin_bytes"].as_u64() != Some(0)
                || !fetched.contains(&s["site"].as_str().unwrap_or("").to_owned())
        });
        if counted {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Agent release 2 beside the image rollout: of its canary of three, two run it and one
    // was given up by its launcher.
    let (build, manifest) = agent_release(releases, 2, None);
    assert_eq!(publish_agent(server, &manifest, &build).await.0, 201);
    let body = json!({"kind": "agent", "version": 2, "strategy": "canary",
        "stages": [{"percent": 15, "delay_hours": 0}, {"percent": 100, "delay_hours": 0}]});
    let (status, agent_rollout) = server.op_json(Method::POST, "/api/rollouts", Some(body)).await;
    assert_eq!(status, 201, "{agent_rollout}");
    let canary: Vec<usize> = (0..appliances.len())
        .filter(|&i| agent_rollout["members"][appliances[i].id()] == 0)
        .collect();
    assert_eq!(canary.len(), 3, "{agent_rollout}");
    // Its check-ins would bring a quiet appliance back online.
    assert!(canary.iter().all(|i| !quiet.contains(i)), "a quiet appliance in the agent canary");
    for &i in &canary {
        assert!(appliances[i].checkin(server).await.agent_offer.is_some());
    }
    for &i in &canary[..2] {
        appliances[i].agent_release = Some(2);
        appliances[i].agent_previous = Some(1);
        appliances[i].checkin(server).await;
    }
    let reason = "the launcher rolled agent 2 back to agent 1: crash loop; its last output: missing libfoo.so";
    let response =
        appliances[canary[2]].agent_report_raw(server, "rolled_back", 2, Some(reason)).await;
    assert_eq!(response.status(), 204);
    Scene {
        rollout: id,
        appliances,
        stage_of,
        downloading: downloading.expect("one downloading"),
        failed: failed.expect("one failed"),
        agent_rollout: agent_rollout["id"].as_u64().expect("id"),
        agent_rolled_back: canary[2],
    }
}

/// A device whose own client speaks hawkBit DDI, pinned to release 1 (which has a `.swu`)
/// and downloading it, as SWUpdate reports.
async fn ddi_device_downloading(server: &TestServer) -> String {
    let body = json!({"controller_id": DDI_DEVICE, "site": "warehouse-lab"});
    let (status, target) = server.op_json(Method::POST, "/api/ddi/targets", Some(body)).await;
    assert_eq!(status, 201, "{target}");
    let token = target["target_token"].as_str().expect("token").to_owned();
    let swu = server.op(Method::PUT, "/api/releases/1/swu/gateway-1.swu").body(vec![7u8; 4096]);
    assert_eq!(swu.send().await.expect("upload").status(), 201);
    let key = format!("ddi:{DDI_DEVICE}");
    let every_day = json!({"start": "00:00", "end": "23:59", "timezone": "UTC",
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]});
    let (status, body) = server
        .op_json(Method::PUT, &format!("/api/appliances/{key}/window"), Some(every_day))
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = server
        .op_json(Method::POST, &format!("/api/appliances/{key}/pin"), Some(json!({"version": 1})))
        .await;
    assert_eq!(status, 204, "{body}");
    let href = deployment_offered(server, DDI_DEVICE, &token).await;
    let feedback = json!({"id": 1, "time": "20261123T100000", "status": {"execution": "proceeding",
        "result": {"finished": "none", "progress": {"cnt": 0, "of": 1}},
        "details": ["Installing Update Chunk Artifacts."]}});
    send_feedback(server, &href, &token, &feedback).await;
    token
}

const DDI_DEVICE: &str = "gw-ddi-1";

fn cookie_of(response: &reqwest::Response) -> (String, String) {
    let set = response
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .expect("ascii")
        .to_owned();
    let pair = set.split(';').next().expect("name=value").to_owned();
    (pair, set)
}

async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON error body");
    (
        status,
        body["code"].as_str().unwrap_or("").to_owned(),
        body["error"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_csrf_for_changes_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let scene = scene(&server, &releases).await;
    let url = |path: &str| format!("{}{path}", server.url);
    let pause = url(&format!("/api/rollouts/{}/pause", scene.rollout));
    let http = &server.http;

    // The page and its files, with a strict policy.
    for (path, kind) in [
        ("/fleet-updates", "text/html"),
        ("/fleet-updates/app.js", "text/javascript"),
        ("/fleet-updates/app.css", "text/css"),
    ] {
        let response = http.get(url(path)).send().await.expect("page");
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}: {}", header("content-type"));
        assert!(header("content-security-policy").contains("script-src 'self'"));
        assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("x-content-type-options"), "nosniff");
    }

    // Not signed in: the page's question is answered plainly; the API is closed.
    let status: Value =
        http.get(url("/api/session")).send().await.expect("session").json().await.expect("json");
    assert_eq!(status, json!({"signed_in": false}));
    let (code, _, message) =
        error_of(http.get(url("/api/rollouts")).send().await.expect("get")).await;
    assert_eq!(code, 401);
    assert!(message.contains("sign in at /fleet-updates"), "{message}");
    let wrong = http.post(url("/api/session")).json(&json!({"token": "guess"})).send().await;
    let (code, _, message) = error_of(wrong.expect("sign in")).await;
    assert_eq!((code, message.as_str()), (403, "wrong operator token"));

    // Signing in: an HttpOnly, SameSite=Strict cookie and a CSRF token in the body.
    let response =
        http.post(url("/api/session")).json(&json!({"token": OPERATOR})).send().await.expect("in");
    assert_eq!(response.status(), 200);
    let (cookie, set_cookie) = cookie_of(&response);
    assert!(cookie.starts_with("sitecast_session=") && cookie.len() > 40, "{set_cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set_cookie.contains(attribute), "{attribute} missing: {set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain http here, so no Secure: {set_cookie}");
    let body: Value = response.json().await.expect("json");
    let csrf = body["csrf_token"].as_str().expect("csrf token").to_owned();
    assert_eq!(body["signed_in"], true);
    assert_eq!(body["expires"], "2026-11-24T22:00:00Z", "12 h after the sign-in");

    // The page learns its CSRF token back after a reload.
    let status: Value = http
        .get(url("/api/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("session")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (status["signed_in"].as_bool(), status["csrf_token"].as_str()),
        (Some(true), Some(csrf.as_str()))
    );

    // Reads need only the cookie; changes also need the CSRF token.
    let read = http.get(url("/api/rollouts")).header("cookie", &cookie).send().await.expect("get");
    assert_eq!(read.status(), 200);
    let (code, kind, message) =
        error_of(http.post(&pause).header("cookie", &cookie).send().await.expect("post")).await;
    assert_eq!((code, kind.as_str()), (403, "csrf"), "{message}");
    assert!(message.contains("x-csrf-token"), "{message}");
    let forged = http
        .post(&pause)
        .header("cookie", &cookie)
        .header("x-csrf-token", "0".repeat(64))
        .send()
        .await
        .expect("post");
    assert_eq!(error_of(forged).await.0, 403);
    let window = json!({"start": "01:00", "end": "02:00", "timezone": "UTC", "days": ["mon"]});
    let put = http
        .put(url("/api/sites/store-nyc/window"))
        .header("cookie", &cookie)
        .json(&window)
        .send()
        .await
        .expect("put");
    assert_eq!(error_of(put).await.1, "csrf", "PUT is a change too");
    assert_eq!(server.rollout(scene.rollout).await["state"], "in_progress", "nothing changed");
    let paused = http
        .post(&pause)
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("post");
    assert_eq!(paused.status(), 200);
    assert_eq!(server.rollout(scene.rollout).await["state"], "paused");

    // A bearer token needs no CSRF token; with an Authorization header the cookie is ignored.
    let resume = url(&format!("/api/rollouts/{}/resume", scene.rollout));
    let bearer = http.post(&resume).bearer_auth(OPERATOR).send().await.expect("post");
    assert_eq!(bearer.status(), 200);
    let mixed = http
        .post(&pause)
        .bearer_auth("guess")
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("post");
    assert_eq!(error_of(mixed).await.0, 403);
    let made_up = http.get(url("/api/rollouts")).header("cookie", "sitecast_session=abc").send();
    assert_eq!(error_of(made_up.await.expect("get")).await.1, "session_expired");

    // The newest audit entries, as the page asks for them. The wrong tokens above are in the
    // log too: refusals are audited in the background, so wait for one; their places among
    // the others are not fixed, and the second is logged only when the two came over a
    // second apart (refusals are rate limited), so look past two of them.
    let actions = loop {
        let (_, tail) = server.op_json(Method::GET, "/api/audit?tail=6", None).await;
        let actions: Vec<String> = tail
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|e| e["action"].as_str().map(str::to_owned))
            .collect();
        if actions.iter().any(|a| a == "auth.refused") {
            break actions;
        }
        // The interval between polls of the audit log, not a wait for the condition.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let others: Vec<&str> =
        actions.iter().map(String::as_str).filter(|a| *a != "auth.refused").collect();
    assert_eq!(
        others[others.len().saturating_sub(3)..],
        ["session.open", "rollout.pause", "rollout.resume"]
    );

    // Signing out needs the CSRF token too, and ends the session.
    let out = http.delete(url("/api/session")).header("cookie", &cookie).send().await;
    assert_eq!(error_of(out.expect("delete")).await.1, "csrf");
    let out = http
        .delete(url("/api/session"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("delete");
    assert_eq!(out.status(), 200);
    assert!(cookie_of(&out).1.contains("Max-Age=0"), "the browser is told to forget it");
    let after = http.get(url("/api/rollouts")).header("cookie", &cookie).send().await;
    assert_eq!(error_of(after.expect("get")).await.0, 401);
    // The sign-out refused without the token is audited in the background, so it may land
    // after the sign-out itself.
    let actions = server.audit_actions().await;
    let last = actions.iter().rev().find(|a| *a != "auth.refused").map(String::as_str);
    assert_eq!(last, Some("session.close"), "{actions:?}");

    // Sessions end after 12 hours on the coordinator's clock.
    let response =
        http.post(url("/api/session")).json(&json!({"token": OPERATOR})).send().await.expect("in");
    let (cookie, _) = cookie_of(&response);
    server.clock.advance(SignedDuration::from_mins(12 * 60 - 1));
    let read = http.get(url("/api/rollouts")).header("cookie", &cookie).send().await.expect("get");
    assert_eq!(read.status(), 200);
    server.clock.advance(SignedDuration::from_mins(1));
    let late = http.get(url("/api/rollouts")).header("cookie", &cookie).send().await;
    assert_eq!(error_of(late.expect("get")).await.1, "session_expired");

    // Sessions are stored (as the hash of their cookie): a restart keeps them, with their
    // CSRF token, and their expiry.
    let response =
        http.post(url("/api/session")).json(&json!({"token": OPERATOR})).send().await.expect("in");
    let (cookie, _) = cookie_of(&response);
    let server = server.restart().await;
    let url = |path: &str| format!("{}{path}", server.url);
    let after_restart =
        server.http.get(url("/api/rollouts")).header("cookie", &cookie).send().await.expect("get");
    assert_eq!(after_restart.status(), 200);
    let unguarded = server.http.post(url("/api/rollouts/1/pause")).header("cookie", &cookie);
    assert_eq!(error_of(unguarded.send().await.expect("post")).await.1, "csrf");
    server.clock.advance(SignedDuration::from_hours(12));
    let late = server.http.get(url("/api/rollouts")).header("cookie", &cookie).send().await;
    assert_eq!(error_of(late.expect("get")).await.1, "session_expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_show_offload_and_windows_in_local_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let scene = scene(&server, &releases).await;
    let (status, overview) = server.op_json(Method::GET, "/api/sites", None).await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["server_time"], "2026-11-24T10:00:00Z");
    assert_eq!(
        overview["release"],
        json!({"version": 2, "version_name": "2026.2", "size": V2_SIZE})
    );
    let sites: BTreeMap<&str, &Value> = overview["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .map(|s| (s["site"].as_str().expect("name"), s))
        .collect();
    assert_eq!(
        sites.keys().copied().collect::<Vec<_>>(),
        ["store-berlin", "store-nyc", "warehouse-lab"]
    );

    // Tuesday 10:00 UTC: Berlin's weekday window is next at 02:00 CET on Wednesday; New York's
    // daily 04:00–06:00 is open (05:00 EST); the lab has the fleet default.
    let berlin = sites["store-berlin"];
    assert_eq!(berlin["next_window"]["local"], "Wed 25 Nov 02:00–05:00 CET");
    assert_eq!(berlin["next_window"]["start"], "2026-11-25T01:00:00Z");
    assert_eq!(berlin["next_window"]["open"], false);
    assert_eq!(berlin["window_is_default"], false);
    let nyc = sites["store-nyc"];
    assert_eq!(nyc["next_window"]["local"], "Tue 24 Nov 04:00–06:00 EST");
    assert_eq!(nyc["next_window"]["open"], true);
    let lab = sites["warehouse-lab"];
    assert_eq!(lab["window_is_default"], true);
    assert_eq!(lab["next_window"]["local"], "Wed 25 Nov 02:00–05:00 UTC");

    // Offload: per site, origin bytes over the image size and the LAN bytes appliances report.
    let (_, appliances) = server.op_json(Method::GET, "/api/appliances", None).await;
    for (name, site) in &sites {
        let members: Vec<&Value> =
            appliances.as_array().expect("list").iter().filter(|a| a["site"] == *name).collect();
        let lan: u64 = members
            .iter()
            .filter(|a| a["update"]["version"] == 2)
            .map(|a| a["update"]["bytes_from_lan"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(site["lan_bytes"].as_u64(), Some(lan), "{name}");
        let online = members.iter().filter(|a| a["online"] == true).count();
        assert_eq!(site["online"].as_u64(), Some(online as u64), "{name}");
        assert_eq!(site["appliances"].as_u64(), Some(members.len() as u64), "{name}");
        let origin = site["origin_bytes"].as_u64().expect("origin bytes");
        let copies = site["origin_copies"].as_f64().expect("copies");
        assert!((copies - origin as f64 / V2_SIZE as f64).abs() < 1e-9, "{name}: {site}");
        if origin > 0 {
            // One full image: the verified-range encoding adds its hash tree, a few percent.
            assert!((1.0..1.05).contains(&copies), "{name}: {copies}");
        }
    }
    let offline: u64 = sites.values().map(|s| s["offline"].as_u64().unwrap_or(0)).sum();
    assert_eq!(offline, 2, "the two quiet appliances");
    let updated: u64 = sites.values().map(|s| s["on_release"].as_u64().unwrap_or(0)).sum();
    assert_eq!(updated, 8, "all 4 of the first stage and 4 of the second succeeded");
    assert_eq!(scene.stage_of.len(), 20);
}

/// What the page shows of a rollout's stages: per stage, the segments of its bar.
async fn page_stages(browser: &Browser, rollout: u64) -> Value {
    browser
        .execute(
            "return [...document.querySelectorAll(`[data-rollout=\"${arguments[0]}\"] .stage`)].map(s => ({
                 current: s.classList.contains('current'),
                 label: s.querySelector('.stage-label').textContent,
                 segments: Object.fromEntries([...s.querySelectorAll('.seg')]
                     .map(g => [g.dataset.state, Number(g.dataset.count)])),
                 widths: Object.fromEntries([...s.querySelectorAll('.seg')]
                     .map(g => [g.dataset.state, g.getBoundingClientRect().width
                         / s.querySelector('.bar').getBoundingClientRect().width])),
             }))",
            json!([rollout]),
        )
        .await
}

fn docs() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_updates_page_in_chromium() {
    let binaries = require_browser();
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let mut scene = scene(&server, &releases).await;
    let id = scene.rollout;
    let card = format!("[data-rollout=\"{id}\"]");

    let browser = Browser::start(&binaries).await;
    browser.viewport(1280, 900, 1.0, false).await;
    browser.goto(&format!("{}/fleet-updates", server.url)).await;

    // Sign in with the operator token.
    let token = browser.wait_for("#token").await;
    browser.type_text(&token, OPERATOR).await;
    browser.click(&browser.find("#sign-in-form button[type=submit]").await.expect("button")).await;
    browser.wait_for(&format!("{card} .stage[data-stage=\"2\"] .bar")).await;
    assert_eq!(
        browser.execute("return document.cookie", json!([])).await,
        "",
        "the session cookie is HttpOnly: page scripts cannot read it"
    );

    // The stage progress is the API's, state by state, and drawn to scale.
    let api = server.rollout(id).await;
    let stages = page_stages(&browser, id).await;
    for (i, counts) in api["stage_counts"].as_array().expect("counts").iter().enumerate() {
        assert_eq!(stages[i]["segments"], counts["by_state"], "stage {i}: {stages}");
    }
    assert_eq!(stages[0]["segments"], json!({"succeeded": 4}));
    assert_eq!(
        stages[1]["segments"],
        json!({"succeeded": 4, "failed": 1, "rebooting": 1, "ready": 1, "downloading": 2, "pending": 1})
    );
    assert_eq!(stages[2]["segments"], json!({"not_started": 6}), "{stages}");
    assert_eq!(stages[1]["current"], true);
    let label = stages[1]["label"].as_str().expect("label");
    assert!(label.contains("Stage 2") && label.contains("up to 70%"), "{label}");
    assert!(label.contains("10 appliances") && label.contains("4/10 succeeded"), "{label}");
    let width = stages[1]["widths"]["succeeded"].as_f64().expect("width");
    assert!((width - 0.4).abs() < 0.02, "4 of 10 is 40% of the bar, not {width}");
    let facts = browser.text(&browser.find(&format!("{card} .facts")).await.expect("facts")).await;
    for expected in ["2 of 3", "20%", "auto-pause above 30%", "Next stage not before", "in 24 h"] {
        assert!(facts.contains(expected), "{expected:?} missing from {facts:?}");
    }

    // Sites: offload and the maintenance window in the site's own time zone.
    let berlin = browser.wait_for("[data-site=\"store-berlin\"]").await;
    let text = browser.text(&berlin).await;
    assert!(text.contains("02:00–05:00 Europe/Berlin, Mon Tue Wed Thu Fri"), "{text}");
    assert!(text.contains("next: Wed 25 Nov 02:00–05:00 CET"), "{text}");
    let nyc = browser.text(&browser.find("[data-site=\"store-nyc\"]").await.expect("nyc")).await;
    assert!(nyc.contains("open now: Tue 24 Nov 04:00–06:00 EST"), "{nyc}");
    assert!(
        browser
            .execute(
                "return [...document.querySelectorAll('.origin-copies strong')].some(e => /^1\\.0\\d×$/.test(e.textContent))",
                json!([])
            )
            .await
            == true,
        "a site that took one copy from the origin shows about 1.0×"
    );

    // Agent updates: the agent rollout's card, each appliance's agent release with its update
    // and what it can roll back to, and the fleet's agent update success rate.
    let agent_card = format!("[data-rollout=\"{}\"]", scene.agent_rollout);
    let text = browser.text(&browser.wait_for(&agent_card).await).await;
    assert!(
        text.contains("agent release 2") && text.contains("67% of finished succeeded"),
        "{text}"
    );
    let summary = browser.text(&browser.find("#summary").await.expect("summary")).await;
    assert!(
        summary.contains("2 of 3 succeeded") && summary.contains("2 can roll back"),
        "{summary}"
    );
    let rolled_back = &scene.appliances[scene.agent_rolled_back];
    let row = format!("#appliance-table tr[data-key=\"{}\"]", rolled_back.id());
    let text = browser.text(&browser.find(&row).await.expect("row")).await;
    assert!(text.contains("agent 1") && text.contains("rolled back"), "{text}");
    assert!(text.contains("agent 2: the launcher rolled agent 2 back"), "{text}");
    let ran = scene.appliances.iter().find(|a| a.agent_release == Some(2)).expect("one on 2");
    let row = format!("#appliance-table tr[data-key=\"{}\"]", ran.id());
    let text = browser.text(&browser.find(&row).await.expect("row")).await;
    assert!(text.contains("agent 2") && text.contains("rollback to 1 available"), "{text}");

    // A hawkBit DDI device beside them: its client and its last feedback.
    let row = format!("#appliance-table tr[data-key=\"ddi:{DDI_DEVICE}\"]");
    let text = browser.text(&browser.find(&row).await.expect("DDI row")).await;
    assert!(text.contains("hawkBit DDI"), "{text}");
    assert!(text.contains("Installing Update Chunk Artifacts.") && text.contains("v0"), "{text}");

    // The appliance table filters as you type and choose.
    let rows = "return document.querySelectorAll('#appliance-table tbody tr[data-key]').length";
    assert_eq!(browser.execute(rows, json!([])).await, 21);
    let filter = browser.find("#filter-text").await.expect("filter");
    browser.type_text(&filter, "app-ready").await;
    browser.wait_until("the filter leaves the failed appliance", &format!("{rows} === 1")).await;
    let row = browser.text(&browser.find("#appliance-table tbody tr").await.expect("row")).await;
    assert!(row.contains("failed") && row.contains("health check `app-ready` failed"), "{row}");
    browser.execute("const f = document.getElementById('filter-text'); f.value = ''; f.dispatchEvent(new Event('input'));", json!([])).await;
    browser
        .execute(
            "const s = document.getElementById('filter-state'); s.value = 'downloading'; s.dispatchEvent(new Event('input'));",
            json!([]),
        )
        .await;
    // Two appliances of the rollout, and the DDI device.
    browser.wait_until("the state filter", &format!("{rows} === 3")).await;
    browser
        .execute(
            "const s = document.getElementById('filter-state'); s.value = ''; s.dispatchEvent(new Event('input'));",
            json!([]),
        )
        .await;

    // Releases and the audit log are there.
    let release_rows =
        "return document.querySelectorAll('#release-table tbody tr[data-version]').length";
    assert_eq!(browser.execute(release_rows, json!([])).await, 2);
    let v1 = browser
        .text(&browser.find("#release-table tr[data-version=\"1\"]").await.expect("v1"))
        .await;
    assert!(v1.contains("SWUpdate gateway-1.swu"), "{v1}");
    browser.wait_for("#audit-table tr[data-action=\"session.open\"]").await;
    let audit_rows = "return document.querySelectorAll('#audit-table tbody tr[data-seq]').length";
    assert_eq!(browser.execute(audit_rows, json!([])).await, 20, "the newest 20 at first");
    let (_, all) = server.op_json(Method::GET, "/api/audit?limit=5000", None).await;
    let total = all.as_array().expect("audit").len() as u64;
    assert!(total > 20, "{total}");
    let failed_key = &scene.appliances[scene.failed].id();
    let failed_name = &scene.appliances[scene.failed].name;
    let named = browser
        .execute(
            "return [...document.querySelectorAll('#audit-table td[title=\"appliance:' + arguments[0] + '\"]')].map(e => e.textContent)",
            json!([failed_key]),
        )
        .await;
    assert!(
        named
            .as_array()
            .expect("cells")
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t.starts_with(failed_name.as_str()))),
        "appliances are named in the audit log: {named}"
    );

    write_if_changed(&docs().join("fleet-updates-desktop.png"), &browser.page_png(3600.0).await);
    browser.click(&browser.find("#audit-more").await.expect("more")).await;
    browser.wait_until("older audit entries", &format!("{audit_rows} === {}", total.min(60))).await;

    // Live: a report through the API shows up without a reload.
    browser.execute("window.notReloaded = true", json!([])).await;
    let i = scene.downloading;
    let body = json!({"state": "ready", "version": 2, "previous_version": 1, "rollout": id,
        "bytes_from_lan": V2_SIZE, "progress": 1.0});
    report(&server, &mut scene.appliances[i], body).await;
    browser
        .wait_until(
            "the new report is drawn",
            &format!(
                "return document.querySelector('{} .stage[data-stage=\"1\"] .seg[data-state=\"ready\"]')?.dataset.count === '2'",
                card.replace('\'', "\\'")
            ),
        )
        .await;
    assert_eq!(browser.execute("return window.notReloaded", json!([])).await, true);

    // Pause from the page: the page and the API agree.
    let pause =
        browser.find(&format!("{card} button[data-action=\"pause\"]")).await.expect("pause");
    browser.click(&pause).await;
    browser
        .wait_until(
            "the card says paused",
            &format!(
                "const c = document.querySelector('{}'); return c.dataset.state === 'paused' && c.querySelector('.badge').textContent === 'Paused'",
                card.replace('\'', "\\'")
            ),
        )
        .await;
    let rollout = server.rollout(id).await;
    assert_eq!(rollout["state"], "paused", "{rollout}");
    assert_eq!(rollout["paused_reason"], "paused by operator");
    let reason =
        browser.text(&browser.find(&format!("{card} .reason")).await.expect("reason")).await;
    assert_eq!(reason, "paused by operator");
    let notice = browser.text(&browser.find("#notice").await.expect("notice")).await;
    assert!(notice.contains(&format!("Rollout #{id} paused.")), "{notice}");
    browser.wait_for("#audit-table tr[data-action=\"rollout.pause\"]").await;
    let buttons = browser
        .execute(
            "return Object.fromEntries([...document.querySelectorAll(arguments[0] + ' button[data-action]')].map(b => [b.dataset.action, !b.disabled]))",
            json!([card]),
        )
        .await;
    assert_eq!(buttons, json!({"pause": false, "resume": true, "advance": true, "rollback": true}));

    // Roll back asks first; saying no changes nothing.
    let rollback =
        browser.find(&format!("{card} button[data-action=\"rollback\"]")).await.expect("rollback");
    browser.click(&rollback).await;
    let question = browser.alert_text().await.expect("a confirmation before rolling back");
    assert!(question.contains(&format!("Roll back rollout #{id}")), "{question}");
    assert!(question.contains("back to release 1"), "{question}");
    browser.dismiss_alert().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let rollout = server.rollout(id).await;
    assert_eq!(
        (rollout["state"].as_str(), rollout["rolled_back"].as_bool()),
        (Some("paused"), Some(false))
    );

    // The browser's own cookie, outside the page: without the CSRF token it changes nothing,
    // and without any credential the API does not answer at all.
    let cookie = browser.cookie("sitecast_session").await;
    assert_eq!(
        (cookie["httpOnly"].as_bool(), cookie["sameSite"].as_str()),
        (Some(true), Some("Strict"))
    );
    let cookie = format!("sitecast_session={}", cookie["value"].as_str().expect("value"));
    let resume = format!("{}/api/rollouts/{id}/resume", server.url);
    let refused = server.http.post(&resume).header("cookie", &cookie).send().await.expect("post");
    let (status, code, message) = error_of(refused).await;
    assert_eq!((status, code.as_str()), (403, "csrf"), "{message}");
    let (status, _, _) = error_of(server.http.post(&resume).send().await.expect("post")).await;
    assert_eq!(status, 401);
    assert_eq!(server.rollout(id).await["state"], "paused", "neither request resumed it");

    // Phone width: no sideways scrolling, and the layout is stacked.
    browser.viewport(390, 844, 2.0, true).await;
    browser
        .wait_until(
            "the page fits 390 px",
            "return window.innerWidth === 390 && document.documentElement.scrollWidth <= 390",
        )
        .await;
    assert_eq!(
        browser
            .execute(
                "return getComputedStyle(document.querySelector('#appliance-table thead')).display",
                json!([])
            )
            .await,
        "none",
        "tables become one card per row"
    );
    // Four screens' worth: the rollout and the sites; the tables below are checked above.
    write_if_changed(&docs().join("fleet-updates-phone.png"), &browser.page_png(4.0 * 844.0).await);

    // Nothing went wrong in the console the whole time. (The probe shows the log is read.)
    let logs = browser.console_logs().await;
    let problems: Vec<&Value> =
        logs.iter().filter(|e| matches!(e["level"].as_str(), Some("SEVERE" | "WARNING"))).collect();
    assert!(problems.is_empty(), "console errors or warnings: {problems:#?}");
    browser.execute("console.error('sitecast probe')", json!([])).await;
    let probe = browser.console_logs().await;
    assert!(
        probe.iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("sitecast probe"))),
        "the console log is not being read: {probe:?}"
    );
    browser.quit().await;
}
