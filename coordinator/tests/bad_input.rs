//! Every kind of bad input gets a clear 4xx with a message, and changes nothing.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use sitecast_coordinator::server::Clock;

/// Everything an operator can see, to compare before and after a refused request.
async fn observable(server: &TestServer) -> Value {
    let (_, releases) = server.op_json(Method::GET, "/api/releases", None).await;
    let (_, rollouts) = server.op_json(Method::GET, "/api/rollouts", None).await;
    let (_, appliances) = server.op_json(Method::GET, "/api/appliances", None).await;
    let (_, audit) = server.op_json(Method::GET, "/api/audit", None).await;
    // Refused credentials are logged by design; everything else must stay as it was.
    let audit: Vec<Value> = audit
        .as_array()
        .expect("list")
        .iter()
        .filter(|e| e["action"] != "auth.refused")
        .cloned()
        .collect();
    json!({"releases": releases, "rollouts": rollouts, "appliances": appliances, "audit": audit})
}

async fn expect_error(response: reqwest::Response, status: u16, contains: &str) {
    let got = response.status().as_u16();
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert_eq!(got, status, "{body}");
    let message = body["error"].as_str().expect("an error message");
    assert!(message.contains(contains), "{message:?} should mention {contains:?}");
    assert!(body["code"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let server = TestServer::start(&dir.path().join("data"), &releases.root).await;
    let (_, image) = releases.image(1, 100_000);
    assert_eq!(
        server.publish(&releases.manifest(1, &image, None, None), image.clone()).await.status(),
        201
    );
    let known = Appliance::new("store-1", "known", 1);
    known.checkin(&server).await;
    let before = observable(&server).await;

    // A manifest signed by a key the root does not trust.
    let stranger = sitecast_manifest::SecretKey::generate().expect("rng");
    let (_, image2) = releases.image(2, 100_000);
    let forged = releases.manifest(2, &image2, Some(&stranger), None);
    expect_error(server.publish(&forged, image2.clone()).await, 400, "does not trust").await;

    // An image that does not match its manifest, one cut short, one too long.
    let manifest2 = releases.manifest(2, &image2, None, None);
    let mut flipped = image2.clone();
    flipped[5000] ^= 1;
    expect_error(server.publish(&manifest2, flipped).await, 400, "BLAKE3").await;
    expect_error(server.publish(&manifest2, image2[..60_000].to_vec()).await, 400, "60000 bytes")
        .await;
    let mut longer = image2.clone();
    longer.extend_from_slice(&[0; 10]);
    expect_error(server.publish(&manifest2, longer).await, 400, "larger than").await;
    // The same release twice.
    expect_error(
        server.publish(&releases.manifest(1, &image, None, None), image).await,
        409,
        "already",
    )
    .await;

    // Malformed JSON, an unknown strategy, an oversized body.
    let response = server
        .op(Method::POST, "/api/rollouts")
        .header("content-type", "application/json")
        .body("{\"version\": 1,")
        .send()
        .await
        .expect("send");
    expect_error(response, 400, "malformed JSON").await;
    let response = server
        .op(Method::POST, "/api/rollouts")
        .json(&json!({"version": 1, "strategy": "yolo"}))
        .send()
        .await
        .expect("send");
    expect_error(response, 400, "malformed JSON").await;
    let response = server
        .op(Method::POST, "/api/rollouts")
        .json(&json!({"version": 99, "strategy": "staged"}))
        .send()
        .await
        .expect("send");
    expect_error(response, 404, "release 99").await;
    let huge =
        format!("{{\"version\":1,\"strategy\":\"staged\",\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    assert_cut_off(
        server
            .op(Method::POST, "/api/rollouts")
            .header("content-type", "application/json")
            .body(huge),
    )
    .await;

    // Operator credentials missing or wrong.
    let response =
        server.http.get(format!("{}/api/releases", server.url)).send().await.expect("send");
    expect_error(response, 401, "operator token required").await;
    let response = server
        .http
        .post(format!("{}/api/rollouts", server.url))
        .bearer_auth("guess")
        .json(&json!({"version": 1, "strategy": "immediate"}))
        .send()
        .await
        .expect("send");
    expect_error(response, 403, "wrong operator token").await;

    // Appliances: unknown without enrollment, a bad signature, a stale timestamp, bad JSON.
    let stranger = Appliance::new("store-1", "stranger", 1);
    expect_error(stranger.checkin_raw(&server, false).await, 403, "unknown appliance").await;
    let body = br#"{"site":"store-1","platform":"x","installed_version":1}"#;
    let now = server.clock.now().as_second();
    let response = stranger
        .signed_as(&server, Method::POST, "/api/appliances/checkin", body, &known.id(), now)
        .send()
        .await
        .expect("send");
    expect_error(response, 401, "signature does not match").await;
    let response = known
        .signed_as(&server, Method::POST, "/api/appliances/checkin", body, &known.id(), now - 600)
        .send()
        .await
        .expect("send");
    expect_error(response, 401, "off the server's clock").await;
    let response = known
        .signed(&server, Method::POST, "/api/appliances/report", b"{\"state\":")
        .send()
        .await
        .expect("send");
    expect_error(response, 400, "malformed JSON").await;
    let response = known
        .signed(
            &server,
            Method::POST,
            "/api/appliances/checkin",
            br#"{"site":"s","platform":"p","installed_version":1,"macs":["zz"]}"#,
        )
        .send()
        .await
        .expect("send");
    expect_error(response, 400, "MAC").await;

    assert_eq!(observable(&server).await, before, "no refused request changed anything");
    let incoming = server.data_dir.join("blobs/incoming");
    let leftovers = std::fs::read_dir(&incoming).expect("dir").count();
    assert_eq!(leftovers, 0, "refused uploads leave no files behind");

    // What an upload killed with -9 leaves behind is removed at the next start.
    std::fs::write(incoming.join("upload-0123456789abcdef"), vec![1u8; 4096]).expect("partial");
    std::fs::write(server.data_dir.join("blobs/x.obao4.partial"), [2u8; 64]).expect("partial");
    let server = server.restart().await;
    assert_eq!(std::fs::read_dir(&incoming).expect("dir").count(), 0);
    assert!(!server.data_dir.join("blobs/x.obao4.partial").exists());
    assert_eq!(observable(&server).await, before, "and the restart changed nothing");
}
