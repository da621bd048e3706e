//! A real coordinator on a loopback port with a real redb file, a hand-moved clock, releases
//! signed for it, and appliances that sign their requests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use sitecast_coordinator::server::{Clock, Coordinator, ManualClock, ServerConfig};
use sitecast_manifest::api::{self, CheckinResponse};
use sitecast_manifest::*;

pub const OPERATOR: &str = "operator-secret";
pub const ENROLL: &str = "enroll-secret";
pub const PLATFORM: &str = "x86_64-appliance";

pub fn start_time() -> Timestamp {
    "2026-11-23T10:00:00Z".parse().expect("ts")
}

/// Keys, a root, and signed releases with their images on disk.
pub struct Releases {
    pub dir: PathBuf,
    pub root: TrustedRoot,
    pub release_key: SecretKey,
}

impl Releases {
    pub fn new(dir: &Path) -> Self {
        let root_key = SecretKey::generate().expect("rng");
        let release_key = SecretKey::generate().expect("rng");
        let root = Root {
            version: 1,
            expires: start_time() + (24 * 3650).hours(),
            root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
            release: RoleKeys { keys: vec![release_key.public()], threshold: 1 },
        };
        let root = TrustedRoot::pin(&root.sign(&[&root_key]).to_bytes()).expect("root");
        Self { dir: dir.to_owned(), root, release_key }
    }

    pub fn image(&self, version: u64, len: usize) -> (PathBuf, Vec<u8>) {
        let bytes: Vec<u8> =
            (0..len).map(|i| (i as u64 * 31 + version * 7 + (i as u64 >> 11)) as u8).collect();
        let path = self.dir.join(format!("image-v{version}.raw"));
        std::fs::write(&path, &bytes).expect("write image");
        (path, bytes)
    }

    /// A manifest for `image`, signed by `key` (the release key unless told otherwise).
    pub fn manifest(
        &self,
        version: u64,
        image: &[u8],
        key: Option<&SecretKey>,
        floor: Option<u64>,
    ) -> String {
        let digest = ImageDigest::of_reader(image).expect("hash");
        let release = Release {
            version,
            version_name: format!("2026.{version}"),
            image: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
            platforms: vec![PLATFORM.into()],
            notes: format!("release {version}"),
            created: start_time() - 1.hour(),
            expires: start_time() + (24 * 365).hours(),
            rollback_floor: floor,
        };
        String::from_utf8(release.sign(&[key.unwrap_or(&self.release_key)]).to_bytes())
            .expect("utf8")
    }
}

pub struct TestServer {
    pub url: String,
    pub coordinator: Coordinator,
    pub clock: Arc<ManualClock>,
    pub data_dir: PathBuf,
    pub root: TrustedRoot,
    pub http: reqwest::Client,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(data_dir: &Path, root: &TrustedRoot) -> Self {
        Self::start_with_clock(data_dir, root, Arc::new(ManualClock::new(start_time()))).await
    }

    async fn start_with_clock(
        data_dir: &Path,
        root: &TrustedRoot,
        clock: Arc<ManualClock>,
    ) -> Self {
        Self::try_start(data_dir, root, clock).await.expect("open coordinator")
    }

    async fn try_start(
        data_dir: &Path,
        root: &TrustedRoot,
        clock: Arc<ManualClock>,
    ) -> anyhow::Result<Self> {
        sitecast_coordinator::install_tls_provider();
        let mut config = ServerConfig::new(data_dir.to_owned());
        config.root = Some(root.clone());
        config.operator_token = Some(OPERATOR.into());
        config.enrollment_token = Some(ENROLL.into());
        // The tests run the engine themselves (`coordinator.tick()`), at times they choose.
        config.tick = Duration::from_secs(3600);
        let (coordinator, _) = Coordinator::open(config, clock.clone())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(coordinator.clone().serve(listener));
        let http = reqwest::Client::new();
        Ok(Self {
            url,
            coordinator,
            clock,
            data_dir: data_dir.to_owned(),
            root: root.clone(),
            http,
            task,
        })
    }

    /// Stops the server (as a crash would: no shutdown step) and starts it again on the same
    /// data directory, keeping the clock.
    pub async fn restart(self) -> Self {
        let Self { task, clock, data_dir, root, coordinator, http, .. } = self;
        task.abort();
        let _ = task.await;
        // Closing the client's connections ends the connection tasks that still hold state.
        drop(http);
        drop(coordinator);
        for _ in 0..100 {
            if let Ok(server) = Self::try_start(&data_dir, &root, clock.clone()).await {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the old server never released its database");
    }

    pub fn op(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(OPERATOR)
    }

    pub async fn op_json(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.op(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn publish(&self, manifest: &str, image: Vec<u8>) -> Response {
        let form = reqwest::multipart::Form::new()
            .text("manifest", manifest.to_owned())
            .part("image", reqwest::multipart::Part::bytes(image).file_name("image"));
        self.op(Method::POST, "/api/releases").multipart(form).send().await.expect("publish")
    }

    pub async fn rollout(&self, id: u64) -> Value {
        let (status, body) = self.op_json(Method::GET, &format!("/api/rollouts/{id}"), None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn audit_actions(&self) -> Vec<String> {
        let (_, entries) = self.op_json(Method::GET, "/api/audit?limit=5000", None).await;
        entries
            .as_array()
            .expect("list")
            .iter()
            .map(|e| e["action"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

/// An appliance: its identity key and what it says about itself.
pub struct Appliance {
    pub key: SecretKey,
    pub site: String,
    pub name: String,
    pub installed_version: u64,
}

impl Appliance {
    pub fn new(site: &str, name: &str, installed_version: u64) -> Self {
        Self {
            key: SecretKey::generate().expect("rng"),
            site: site.into(),
            name: name.into(),
            installed_version,
        }
    }

    pub fn id(&self) -> String {
        self.key.public().to_hex()
    }

    pub fn signed(
        &self,
        server: &TestServer,
        method: Method,
        path: &str,
        body: &[u8],
    ) -> RequestBuilder {
        let timestamp = server.clock.now().as_second();
        self.signed_as(server, method, path, body, &self.id(), timestamp)
    }

    /// A request signed by this appliance's key but claiming identity `claimed` and time
    /// `timestamp` (to forge requests in tests).
    pub fn signed_as(
        &self,
        server: &TestServer,
        method: Method,
        path: &str,
        body: &[u8],
        claimed: &str,
        timestamp: i64,
    ) -> RequestBuilder {
        let message = api::appliance_signing_bytes(method.as_str(), path, timestamp, body);
        server
            .http
            .request(method, format!("{}{path}", server.url))
            .header(api::HEADER_APPLIANCE, claimed)
            .header(api::HEADER_TIMESTAMP, timestamp.to_string())
            .header(api::HEADER_SIGNATURE, self.key.sign(&message).to_hex())
            .header("content-type", "application/json")
            .body(body.to_vec())
    }

    pub async fn checkin_raw(&self, server: &TestServer, enroll: bool) -> Response {
        let body = json!({
            "site": self.site,
            "name": self.name,
            "macs": ["AA-BB-CC-00-11-22", "aabb.cc00.1133"],
            "platform": PLATFORM,
            "installed_version": self.installed_version,
            "agent_version": "test",
            "enrollment_token": if enroll { Some(ENROLL) } else { None },
            "peer": {"libp2p": [format!("/ip4/10.0.0.1/tcp/4001/p2p/{}", self.name)]},
            "from_the_future": {"ignored": true},
        });
        let body = serde_json::to_vec(&body).expect("json");
        self.signed(server, Method::POST, "/api/appliances/checkin", &body)
            .send()
            .await
            .expect("checkin")
    }

    pub async fn checkin(&self, server: &TestServer) -> CheckinResponse {
        let response = self.checkin_raw(server, true).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        response.json().await.expect("check-in response")
    }

    pub async fn report(&mut self, server: &TestServer, state: &str, version: u64) {
        let body = serde_json::to_vec(&json!({
            "state": state,
            "version": version,
            "previous_version": self.installed_version,
            "bytes_from_origin": 10,
            "bytes_from_lan": 90,
            "slot": "B",
        }))
        .expect("json");
        let response = self
            .signed(server, Method::POST, "/api/appliances/report", &body)
            .send()
            .await
            .expect("report");
        assert_eq!(response.status(), 204, "{:?}", response.text().await);
        if state == "succeeded" {
            self.installed_version = version;
        }
    }
}
