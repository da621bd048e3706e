//! Agent releases on Central Command: published only when the manifest verifies and every
//! file matches it, survive a restart, the newest per platform answers the frozen path, and
//! files go to enrolled appliances only.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;
use sitecast_manifest::*;

#[tokio::test]
async fn an_agent_release_is_published_served_to_appliances_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;

    let (build4, manifest4) = agent_release(&releases, 4, None);
    let (status, record) = publish_agent(&server, &manifest4, &build4).await;
    assert_eq!(status, 201, "{record}");
    let (build5, manifest5) = agent_release(&releases, 5, None);
    assert_eq!(publish_agent(&server, &manifest5, &build5).await.0, 201);
    assert_eq!(publish_agent(&server, &manifest5, &build5).await.0, 409, "published twice");

    // The frozen path: the newest for the platform, the signed manifest byte for byte, and
    // it verifies against the root as the launcher will check it.
    let latest = server
        .http
        .get(format!("{}/api/agent-releases/latest?platform={PLATFORM}", server.url))
        .send()
        .await
        .expect("latest");
    assert_eq!(latest.status(), 200);
    let bytes = latest.bytes().await.expect("body");
    assert_eq!(&bytes[..], manifest5.as_bytes());
    let verified = releases.root.verify_agent_release(&bytes, start_time()).expect("verifies");
    let other = server
        .http
        .get(format!("{}/api/agent-releases/latest?platform=arm64-box", server.url))
        .send()
        .await
        .expect("other platform");
    assert_eq!(other.status(), 404);

    // Files: for enrolled appliances, by hash, exactly the published bytes.
    let file = &verified.release().builds[0].files[0];
    let path = format!("/api/agent-releases/files/{}", file.blake3.to_hex());
    let anonymous = server.http.get(format!("{}{path}", server.url)).send().await.expect("get");
    assert_eq!(anonymous.status(), 401);
    let appliance = Appliance::new("store-1", "a1", 1);
    appliance.checkin(&server).await;
    let response = appliance.signed(&server, Method::GET, &path, b"").send().await.expect("get");
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.expect("body");
    let info = ImageInfo { size: file.size, blake3: file.blake3, sha256: file.sha256 };
    ImageDigest::check(&body[..], &info).expect("the published file");
    // Verified ranges of it, as of an image (what the site swarm fetches): they decode
    // against the file's hash; to enrolled appliances, never to anyone else.
    let layout = sitecast_iso::BlobLayout::new(file.blake3, file.size);
    let ranges_path =
        format!("/api/blobs/{}/ranges?start=0&end={}", file.blake3.to_hex(), layout.groups());
    let response =
        appliance.signed(&server, Method::GET, &ranges_path, b"").send().await.expect("ranges");
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.expect("body");
    let chunks = layout.chunk_ranges(0..layout.groups());
    let mut groups = 0;
    for item in sitecast_iso::ResponseDecoder::new(layout, &chunks, &body[..]).expect("header") {
        if let sitecast_iso::DecodedItem::Group(_) = item.expect("every group verifies") {
            groups += 1;
        }
    }
    assert_eq!(groups, layout.groups());
    let anyone = server.http.get(format!("{}{ranges_path}", server.url)).send().await.expect("get");
    assert_eq!(anyone.status(), 401);
    let stranger = Appliance::new("store-1", "a2", 1);
    let response =
        stranger.signed(&server, Method::GET, &ranges_path, b"").send().await.expect("ranges");
    assert_eq!(response.status(), 403, "not enrolled");

    // An image's blob is not an agent file, even to an enrolled appliance.
    let (_, image) = releases.image(3, 70_000);
    let response = server.publish(&releases.manifest(3, &image, None, None), image.clone()).await;
    assert_eq!(response.status(), 201);
    let image_hash = ImageDigest::of_reader(&image[..]).expect("hash").blake3.to_hex();
    let image_path = format!("/api/agent-releases/files/{image_hash}");
    let response =
        appliance.signed(&server, Method::GET, &image_path, b"").send().await.expect("get");
    assert_eq!(response.status(), 404);

    // The frozen path asks for what fits: a newer version than it has, for its OS release.
    let ask = |query: &str| {
        let url = format!("{}/api/agent-releases/latest?platform={PLATFORM}&{query}", server.url);
        let http = server.http.clone();
        async move { http.get(url).send().await.expect("latest").status().as_u16() }
    };
    assert_eq!(ask("above=4").await, 200);
    assert_eq!(ask("above=5").await, 404, "nothing newer than 5");
    assert_eq!(ask("os_release=0").await, 404, "both need OS release 1 or later");

    let server = server.restart().await;
    let (status, list) = server.op_json(Method::GET, "/api/agent-releases", None).await;
    assert_eq!(status, 200);
    let versions: Vec<u64> =
        list.as_array().expect("list").iter().filter_map(|r| r["version"].as_u64()).collect();
    assert_eq!(versions, [4, 5], "kept across a restart");
    assert!(server.audit_actions().await.contains(&"agent_release.publish".to_owned()));
}

#[tokio::test]
async fn forged_manifests_and_mismatched_files_publish_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;

    let attacker = SecretKey::generate().expect("rng");
    let (build, forged) = agent_release(&releases, 4, Some(&attacker));
    let (status, body) = publish_agent(&server, &forged, &build).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("manifest_rejected")), "{body}");

    // An image release is not an agent release.
    let (_, image) = releases.image(3, 5000);
    let image_manifest = releases.manifest(3, &image, None, None);
    let (status, body) = publish_agent(&server, &image_manifest, &build).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("manifest_rejected")), "{body}");

    let (build, manifest) = agent_release(&releases, 4, None);
    std::fs::write(build.join("defaults.toml"), "version = 666\n").expect("tamper");
    let (status, body) = publish_agent(&server, &manifest, &build).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("file_mismatch")), "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("defaults.toml"), "{body}");

    let (status, body) = server
        .op_json(
            Method::POST,
            "/api/agent-releases",
            Some(json!({"manifest": manifest, "builds": {}})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("missing_build")), "{body}");

    let (_, list) = server.op_json(Method::GET, "/api/agent-releases", None).await;
    assert_eq!(list, json!([]), "nothing was published");
    let latest = server
        .http
        .get(format!("{}/api/agent-releases/latest?platform={PLATFORM}", server.url))
        .send()
        .await
        .expect("latest");
    assert_eq!(latest.status(), 404);
}

/// Offers of the agent release in check-in answers, by appliance id.
async fn agent_offers(
    server: &TestServer,
    appliances: &[Appliance],
) -> std::collections::BTreeMap<String, u64> {
    let mut offers = std::collections::BTreeMap::new();
    for appliance in appliances {
        if let Some(offer) = appliance.checkin(server).await.agent_offer {
            offers.insert(appliance.id(), offer.version);
        }
    }
    offers
}

#[tokio::test]
async fn agent_releases_roll_out_on_the_rollout_engine_beside_an_image_rollout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let (build, manifest) = agent_release(&releases, 2, None);
    assert_eq!(publish_agent(&server, &manifest, &build).await.0, 201);
    let (_, image) = releases.image(3, 70_000);
    let image_manifest = releases.manifest(3, &image, None, None);
    assert_eq!(server.publish(&image_manifest, image).await.status(), 201);

    let mut appliances: Vec<Appliance> = (0..10)
        .map(|i| {
            let mut appliance = Appliance::new("store-1", &format!("a{i}"), 1);
            appliance.agent_release = Some(1);
            appliance
        })
        .collect();
    // An agent from before agent releases, and one on a platform the release has no build for.
    appliances[8].agent_release = None;
    appliances[9].platform = "arm64-box".into();
    for appliance in &appliances {
        appliance.checkin(&server).await;
    }

    let body = json!({"kind": "agent", "version": 2, "strategy": "canary",
        "stages": [{"percent": 30, "delay_hours": 0}, {"percent": 100, "delay_hours": 0}]});
    let (status, rollout) = server.op_json(Method::POST, "/api/rollouts", Some(body)).await;
    assert_eq!(status, 201, "{rollout}");
    let agent_rollout = rollout["id"].as_u64().expect("id");
    // Not applicable: the appliance on another platform, and the old agent (it would never be
    // offered the release, so the rollout must not wait for it).
    assert_eq!(
        (rollout["kind"].as_str(), rollout["not_applicable"].as_u64()),
        (Some("agent"), Some(2))
    );
    assert!(rollout["members"].get(appliances[8].id()).is_none(), "{rollout}");
    // An image rollout runs beside it; a second agent rollout does not.
    let image_rollout = server.roll_out_now(3).await;
    let again = json!({"kind": "agent", "version": 2, "strategy": "immediate"});
    assert_eq!(server.op_json(Method::POST, "/api/rollouts", Some(again)).await.0, 409);

    // The canary stage (30 % of the eight) is offered the agent release, with the
    // image offer in the same answer.
    let canary: Vec<usize> = {
        let members = &rollout["members"];
        (0..8).filter(|&i| members[appliances[i].id()].as_u64() == Some(0)).collect()
    };
    assert_eq!(canary.len(), 3, "{rollout}");
    let offers = agent_offers(&server, &appliances).await;
    let expected: std::collections::BTreeMap<String, u64> =
        canary.iter().map(|&i| (appliances[i].id(), 2)).collect();
    assert_eq!(offers, expected, "only canary members");
    let answer = appliances[canary[0]].checkin(&server).await;
    let offer = answer.agent_offer.expect("agent offer");
    assert_eq!((answer.version, answer.rollout), (Some(3), Some(image_rollout)), "image offer too");
    assert_eq!((offer.rollout, offer.manifest.as_str()), (Some(agent_rollout), manifest.as_str()));
    assert!(offer.files.ends_with("/api/agent-releases/files"), "{}", offer.files);

    // A report about an agent release it was not offered is refused.
    let outsider = (0..8).find(|i| !canary.contains(i)).expect("an outsider");
    let refused = appliances[outsider].agent_report_raw(&server, "downloading", 2, None).await;
    assert_eq!(error_code(refused).await, (409, "not_offered".to_owned()));

    // The new agent checking in is the proof that the switch worked; a rollback by the
    // launcher, reported, fails the member and pauses the rollout.
    let [first, second, ..] = canary[..] else { panic!("canary") };
    let response = appliances[first].agent_report_raw(&server, "downloading", 2, None).await;
    assert_eq!(response.status(), 204);
    appliances[first].agent_release = Some(2);
    appliances[first].checkin(&server).await;
    let reason = "the launcher rolled agent 2 back to the image's agent: crash loop";
    let response =
        appliances[second].agent_report_raw(&server, "rolled_back", 2, Some(reason)).await;
    assert_eq!(response.status(), 204);
    server.coordinator.tick().expect("tick");
    let view = server.rollout(agent_rollout).await;
    assert_eq!(view["state"], "paused", "{view}");
    assert_eq!(view["stage_counts"][0]["by_state"]["succeeded"], 1, "{view}");
    assert_eq!(view["stage_counts"][0]["by_state"]["rolled_back"], 1, "{view}");
    assert_eq!(view["success_rate"], 0.5, "one of the two finished succeeded: {view}");
    assert_eq!(
        server.rollout(image_rollout).await["state"],
        "in_progress",
        "the image rollout goes on"
    );
    assert!(agent_offers(&server, &appliances).await.is_empty(), "a paused rollout offers nothing");
    let (_, listed) = server.op_json(Method::GET, "/api/appliances", None).await;
    let row = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["key"] == appliances[second].id())
        .expect("listed")
        .clone();
    assert_eq!(
        (row["agent_update"]["state"].as_str(), row["agent_update"]["error"].as_str()),
        (Some("rolled_back"), Some(reason))
    );
    assert_eq!(row["agent_release"], 1);

    // A pin reaches an appliance outside the rollout, and survives a restart.
    let pinned = appliances[outsider].id();
    let (status, _) = server
        .op_json(
            Method::POST,
            &format!("/api/appliances/{pinned}/agent-pin"),
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(status, 204);
    let server = server.restart().await;
    let offers = agent_offers(&server, &appliances).await;
    assert_eq!(offers.into_iter().collect::<Vec<_>>(), [(pinned.clone(), 2)]);
    let audit = server.audit_actions().await;
    for action in
        ["rollout.create", "appliance.agent_offer", "appliance.agent_report", "appliance.agent_pin"]
    {
        assert!(audit.contains(&action.to_owned()), "{action} in {audit:?}");
    }

    // Resumed, the advance offers it to the rest; a fleet rollback completes nothing more.
    let (status, _) =
        server.op_json(Method::POST, &format!("/api/rollouts/{agent_rollout}/resume"), None).await;
    assert_eq!(status, 200);
    let (status, view) =
        server.op_json(Method::POST, &format!("/api/rollouts/{agent_rollout}/advance"), None).await;
    assert_eq!((status, view["current_stage"].as_u64()), (200, Some(1)));
    let offers = agent_offers(&server, &appliances).await;
    assert_eq!(
        offers.len(),
        7,
        "all with a build and an agent release but the one on 2: {offers:?}"
    );
    assert!(!offers.contains_key(&appliances[first].id()), "already runs it");
}

/// Agent releases 2 and 3, and OS release 1 (so Central Command believes appliances that say
/// they run it, and the agent releases, for OS release 1 on, fit them).
async fn publish_agents_2_and_3_on_os_1(server: &TestServer, releases: &Releases) {
    for version in [2, 3] {
        let (build, manifest) = agent_release(releases, version, None);
        assert_eq!(publish_agent(server, &manifest, &build).await.0, 201);
    }
    let (_, image) = releases.image(1, 5000);
    let response = server.publish(&releases.manifest(1, &image, None, None), image).await;
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn a_fleet_rollback_of_an_agent_rollout_offers_the_previous_agent_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    publish_agents_2_and_3_on_os_1(&server, &releases).await;
    let mut appliances: Vec<Appliance> = (0..4)
        .map(|i| {
            let mut appliance = Appliance::new("store-1", &format!("a{i}"), 1);
            appliance.agent_release = Some(2);
            appliance
        })
        .collect();
    for appliance in &appliances {
        appliance.checkin(&server).await;
    }
    let body = json!({"kind": "agent", "version": 3, "strategy": "immediate"});
    let (status, rollout) = server.op_json(Method::POST, "/api/rollouts", Some(body)).await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_u64().expect("id");
    assert_eq!(rollout["previous_version"], 2);
    for appliance in &mut appliances[..2] {
        assert_eq!(appliance.checkin(&server).await.agent_offer.map(|o| o.version), Some(3));
        appliance.agent_release = Some(3);
        appliance.checkin(&server).await;
    }

    let (status, view) =
        server.op_json(Method::POST, &format!("/api/rollouts/{id}/rollback"), None).await;
    assert_eq!((status, view["state"].as_str()), (200, Some("failed")), "{view}");
    for (i, appliance) in appliances.iter().enumerate() {
        let offer = appliance.checkin(&server).await.agent_offer;
        if i < 2 {
            let offer = offer.expect("those on 3 are offered 2 back");
            assert_eq!(
                (offer.version, offer.intent, offer.rollout),
                (2, api::UpdateIntent::Rollback, Some(id))
            );
        } else {
            assert_eq!(offer, None, "those still on 2 are offered nothing");
        }
    }
}

#[tokio::test]
async fn a_new_rollout_of_a_rolled_back_agent_release_supersedes_the_rollback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    publish_agents_2_and_3_on_os_1(&server, &releases).await;
    let mut appliance = Appliance::new("store-1", "a0", 1);
    appliance.agent_release = Some(2);
    appliance.checkin(&server).await;
    let body = json!({"kind": "agent", "version": 3, "strategy": "immediate"});
    let (_, first) = server.op_json(Method::POST, "/api/rollouts", Some(body.clone())).await;
    appliance.agent_release = Some(3);
    appliance.checkin(&server).await;
    let rollback = format!("/api/rollouts/{}/rollback", first["id"]);
    assert_eq!(server.op_json(Method::POST, &rollback, None).await.0, 200);
    assert_eq!(appliance.checkin(&server).await.agent_offer.map(|o| o.version), Some(2));

    // The fix was elsewhere after all: agent 3 is rolled out again, and an appliance on 3 is
    // left on it instead of being sent back and forth between the two rollouts.
    let (status, second) = server.op_json(Method::POST, "/api/rollouts", Some(body)).await;
    assert_eq!(status, 201, "{second}");
    for _ in 0..3 {
        assert_eq!(appliance.checkin(&server).await.agent_offer, None);
    }
}
