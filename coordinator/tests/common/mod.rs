//! A real coordinator on a loopback port with a real redb file (or a real PostgreSQL), a
//! hand-moved clock, releases signed for it, and appliances that sign their requests.
#![allow(dead_code, unreachable_pub)]

pub mod postgres;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use sitecast_coordinator::server::{Clock, Coordinator, ManualClock, ServerConfig};
use sitecast_coordinator::store::{AuditEntry, Change, RedbStore, Snapshot, Store, StoreError};
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
            index: None,
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
    /// Set when the server runs on a [`FaultyStore`].
    pub faulty: Option<Arc<FaultyStore>>,
    pub backend: Backend,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Where a test server keeps its state: redb in its data directory, or a PostgreSQL server of
/// the test's own (kept across restarts).
#[derive(Clone)]
pub enum Backend {
    Redb,
    Postgres(Arc<postgres::TestPostgres>),
    /// PostgreSQL shared as a replica (`serve --replica`), if alone.
    Replica(Arc<postgres::TestPostgres>),
}

impl Backend {
    pub fn postgres() -> Self {
        Self::Postgres(Arc::new(postgres::TestPostgres::start()))
    }

    pub fn replica() -> Self {
        Self::Replica(Arc::new(postgres::TestPostgres::start()))
    }

    fn configure(&self, config: &mut ServerConfig) {
        match self {
            Self::Redb => {}
            Self::Postgres(database) => config.database = Some(database.url()),
            Self::Replica(database) => {
                config.database = Some(database.url());
                config.replica = true;
            }
        }
    }
}

/// Runs each named test (an `async fn(Backend)`) on redb, on PostgreSQL, and on PostgreSQL as
/// a replica: `mod redb`, `mod postgres` and `mod replica` hold one `#[tokio::test]` each.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Redb).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::postgres()).await
                }
            )*
        }
        mod replica {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::replica()).await
                }
            )*
        }
    };
}

/// The real redb store, whose commits (and reopens) fail while `failing` is set, as a full
/// disk would make them: the failure comes before anything is written. Loads can also be held
/// after they have read the records (a slow repair, caught between its load and its swap).
#[derive(Debug)]
pub struct FaultyStore {
    inner: RedbStore,
    pub failing: std::sync::atomic::AtomicBool,
    pub commits_refused: std::sync::atomic::AtomicU64,
    /// While true, a load waits after reading the records.
    hold_loads: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
    /// Loads waiting under `hold_loads` now.
    pub loads_held: std::sync::atomic::AtomicU64,
}

impl FaultyStore {
    pub fn open(path: &Path) -> Self {
        Self {
            inner: RedbStore::open(path).expect("open store"),
            failing: false.into(),
            commits_refused: 0.into(),
            hold_loads: std::sync::Mutex::new(false),
            released: std::sync::Condvar::new(),
            loads_held: 0.into(),
        }
    }

    pub fn fail(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds loads that have read the records (as a slow disk would) until called again with
    /// `false`.
    pub fn hold_loads(&self, on: bool) {
        *self.hold_loads.lock().unwrap_or_else(|p| p.into_inner()) = on;
        self.released.notify_all();
    }

    /// Waits (on the thread that loads) while loads are held.
    fn held(&self) {
        let mut held = self.hold_loads.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            self.loads_held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while *held {
                held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
            }
            self.loads_held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            self.commits_refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(StoreError::Database(
                "injected: No space left on device (os error 28)".into(),
            ));
        }
        Ok(())
    }
}

impl Store for FaultyStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let snapshot = self.inner.load()?;
        self.held();
        Ok(snapshot)
    }

    fn commit(&self, changes: &[Change], durable: bool) -> Result<(), StoreError> {
        self.check()?;
        self.inner.commit(changes, durable)
    }

    fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit(after, limit)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.reopen()
    }
}

impl TestServer {
    pub async fn start(data_dir: &Path, root: &TrustedRoot) -> Self {
        Self::start_with_clock(data_dir, root, Arc::new(ManualClock::new(start_time()))).await
    }

    /// A server keeping its state in `backend`.
    pub async fn start_on(backend: Backend, data_dir: &Path, root: &TrustedRoot) -> Self {
        let clock = Arc::new(ManualClock::new(start_time()));
        Self::start_configured(data_dir, root, clock, false, backend, |_| {})
            .await
            .expect("open coordinator")
    }

    async fn start_with_clock(
        data_dir: &Path,
        root: &TrustedRoot,
        clock: Arc<ManualClock>,
    ) -> Self {
        Self::try_start(data_dir, root, clock).await.expect("open coordinator")
    }

    /// A server on a store whose commits fail on demand.
    pub async fn start_faulty(data_dir: &Path, root: &TrustedRoot) -> Self {
        Self::start_configured(
            data_dir,
            root,
            Arc::new(ManualClock::new(start_time())),
            true,
            Backend::Redb,
            |_| {},
        )
        .await
        .expect("open coordinator")
    }

    /// A server with the test configuration changed by `adjust`.
    pub async fn start_with(
        data_dir: &Path,
        root: &TrustedRoot,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start_configured(
            data_dir,
            root,
            Arc::new(ManualClock::new(start_time())),
            false,
            Backend::Redb,
            adjust,
        )
        .await
        .expect("open coordinator")
    }

    async fn try_start(
        data_dir: &Path,
        root: &TrustedRoot,
        clock: Arc<ManualClock>,
    ) -> anyhow::Result<Self> {
        Self::start_configured(data_dir, root, clock, false, Backend::Redb, |_| {}).await
    }

    async fn start_configured(
        data_dir: &Path,
        root: &TrustedRoot,
        clock: Arc<ManualClock>,
        faulty: bool,
        backend: Backend,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Self> {
        sitecast_coordinator::install_tls_provider();
        let mut config = ServerConfig::new(data_dir.to_owned());
        config.root = Some(root.clone());
        config.operator_token = Some(OPERATOR.into());
        config.enrollment_token = Some(ENROLL.into());
        // The tests run the engine themselves (`coordinator.tick()`), at times they choose.
        config.tick = Duration::from_secs(3600);
        backend.configure(&mut config);
        adjust(&mut config);
        let faulty = faulty.then(|| {
            std::fs::create_dir_all(data_dir).expect("data dir");
            Arc::new(FaultyStore::open(&data_dir.join("state.redb")))
        });
        let (coordinator, _) = match &faulty {
            Some(store) => Coordinator::open_with_store(config, clock.clone(), store.clone())?,
            None => Coordinator::open(config, clock.clone())?,
        };
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
            faulty,
            backend,
            task,
        })
    }

    /// Stops the server (as a crash would: no shutdown step) and starts it again on the same
    /// data directory, keeping the clock.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// As [`TestServer::restart`], with the configuration changed by `adjust` (on the same
    /// backend; a faulty store's server restarts on the plain redb store).
    pub async fn restart_with(self, adjust: impl Fn(&mut ServerConfig)) -> Self {
        let (clock, data_dir, root, backend) =
            (self.clock.clone(), self.data_dir.clone(), self.root.clone(), self.backend.clone());
        self.stop().await;
        for _ in 0..100 {
            if let Ok(server) = Self::start_configured(
                &data_dir,
                &root,
                clock.clone(),
                false,
                backend.clone(),
                &adjust,
            )
            .await
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the old server never released its database");
    }

    /// Publishes releases 1 and 2 (images of `len` and `len + 1` bytes, signed for it).
    pub async fn publish_two(&self, releases: &Releases, len: usize) {
        for version in [1, 2] {
            let (_, image) = releases.image(version, len + version as usize - 1);
            let manifest = releases.manifest(version, &image, None, None);
            let response = self.publish(&manifest, image).await;
            assert_eq!(response.status(), 201, "{:?}", response.text().await);
        }
    }

    /// Stops the server as a crash would (no shutdown step). Its redb file may stay locked a
    /// moment longer, while connection tasks end.
    pub async fn stop(self) {
        let Self { task, coordinator, http, faulty, .. } = self;
        task.abort();
        let _ = task.await;
        // Closing the client's connections ends the connection tasks that still hold state.
        drop(http);
        drop(coordinator);
        drop(faulty);
    }

    /// What the operator can see, minus check-in bookkeeping (last seen), which is not a
    /// change.
    pub async fn observable(&self) -> Value {
        let (_, releases) = self.op_json(Method::GET, "/api/releases", None).await;
        let (_, rollouts) = self.op_json(Method::GET, "/api/rollouts", None).await;
        let (_, mut appliances) = self.op_json(Method::GET, "/api/appliances", None).await;
        for appliance in appliances.as_array_mut().expect("list") {
            appliance["last_checkin"] = Value::Null;
            appliance["online"] = Value::Null;
        }
        let (_, audit) = self.op_json(Method::GET, "/api/audit?limit=5000", None).await;
        json!({"releases": releases, "rollouts": rollouts, "appliances": appliances, "audit": audit})
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

    /// Creates an immediate rollout of `version`, which must succeed; returns its id.
    pub async fn roll_out_now(&self, version: u64) -> u64 {
        let (status, rollout) = self
            .op_json(
                Method::POST,
                "/api/rollouts",
                Some(json!({"version": version, "strategy": "immediate"})),
            )
            .await;
        assert_eq!(status, 201, "{rollout}");
        rollout["id"].as_u64().expect("id")
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
    /// The last report sequence number sent.
    pub seq: u64,
    /// MAC addresses it reports (distinct per appliance: a MAC belongs to one appliance).
    pub macs: Vec<String>,
    pub platform: String,
    /// The agent release it says it runs (`None`: an agent from before agent releases).
    pub agent_release: Option<u64>,
    /// The agent release its launcher keeps for a rollback.
    pub agent_previous: Option<u64>,
}

impl Appliance {
    pub fn new(site: &str, name: &str, installed_version: u64) -> Self {
        Self::with_key(site, name, installed_version, SecretKey::generate().expect("rng"))
    }

    /// An appliance whose key comes from its name: the same in every run, so which rollout
    /// stage it falls in (a hash of the key) is too.
    pub fn named(site: &str, name: &str, installed_version: u64) -> Self {
        let seed = *blake3::hash(format!("appliance {name}").as_bytes()).as_bytes();
        Self::with_key(site, name, installed_version, SecretKey::from_seed(seed))
    }

    fn with_key(site: &str, name: &str, installed_version: u64, key: SecretKey) -> Self {
        // Locally administered unicast addresses from the key, in two of the spellings.
        let b = *key.public().as_bytes();
        let dashed = format!("02-{:02X}-{:02X}-{:02X}-{:02X}-11", b[0], b[1], b[2], b[3]);
        let dotted = format!("02{:02x}.{:02x}{:02x}.{:02x}22", b[0], b[1], b[2], b[3]);
        Self {
            key,
            site: site.into(),
            name: name.into(),
            installed_version,
            seq: 0,
            macs: vec![dashed, dotted],
            platform: PLATFORM.into(),
            agent_release: None,
            agent_previous: None,
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
        self.signed_via(&server.http, server, method, path, body)
    }

    /// As [`Appliance::signed`], sent with `http` (e.g. a client bound to another local
    /// address).
    pub fn signed_via(
        &self,
        http: &reqwest::Client,
        server: &TestServer,
        method: Method,
        path: &str,
        body: &[u8],
    ) -> RequestBuilder {
        let timestamp = server.clock.now().as_second();
        let request = http.request(method.clone(), format!("{}{path}", server.url));
        self.sign(request, &method, path, body, &self.id(), timestamp)
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
        let request = server.http.request(method.clone(), format!("{}{path}", server.url));
        self.sign(request, &method, path, body, claimed, timestamp)
    }

    fn sign(
        &self,
        request: RequestBuilder,
        method: &Method,
        path: &str,
        body: &[u8],
        claimed: &str,
        timestamp: i64,
    ) -> RequestBuilder {
        let message = api::appliance_signing_bytes(method.as_str(), path, timestamp, body);
        request
            .header(api::HEADER_APPLIANCE, claimed)
            .header(api::HEADER_TIMESTAMP, timestamp.to_string())
            .header(api::HEADER_SIGNATURE, self.key.sign(&message).to_hex())
            .header("content-type", "application/json")
            .body(body.to_vec())
    }

    pub async fn checkin_raw(&self, server: &TestServer, enroll: bool) -> Response {
        self.checkin_request(server, enroll).send().await.expect("checkin")
    }

    /// A check-in, ready to send (e.g. from a spawned task).
    pub fn checkin_request(&self, server: &TestServer, enroll: bool) -> RequestBuilder {
        let body = json!({
            "site": self.site,
            "name": self.name,
            "macs": self.macs,
            "platform": self.platform,
            "installed_version": self.installed_version,
            "agent_version": "test",
            "agent_release": self.agent_release,
            "agent_previous": self.agent_previous,
            "enrollment_token": if enroll { Some(ENROLL) } else { None },
            "peer": {"libp2p": [format!("/ip4/10.0.0.1/tcp/4001/p2p/{}", self.name)]},
            "from_the_future": {"ignored": true},
        });
        let body = serde_json::to_vec(&body).expect("json");
        self.signed(server, Method::POST, "/api/appliances/checkin", &body)
    }

    pub async fn checkin(&self, server: &TestServer) -> CheckinResponse {
        let response = self.checkin_raw(server, true).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        response.json().await.expect("check-in response")
    }

    /// Sends a report with the next sequence number and returns the answer as it is.
    pub async fn report_raw(&mut self, server: &TestServer, state: &str, version: u64) -> Response {
        self.seq += 1;
        let body = serde_json::to_vec(&json!({
            "state": state,
            "version": version,
            "previous_version": self.installed_version,
            "bytes_from_origin": 10,
            "bytes_from_lan": 90,
            "slot": "B",
            "seq": self.seq,
        }))
        .expect("json");
        self.signed(server, Method::POST, "/api/appliances/report", &body)
            .send()
            .await
            .expect("report")
    }

    /// Sends a report about agent release `version` with the next sequence number.
    pub async fn agent_report_raw(
        &mut self,
        server: &TestServer,
        state: &str,
        version: u64,
        error: Option<&str>,
    ) -> Response {
        self.seq += 1;
        let body = serde_json::to_vec(&json!({
            "state": state, "version": version, "error": error, "seq": self.seq,
        }))
        .expect("json");
        self.signed(server, Method::POST, "/api/appliances/agent-report", &body)
            .send()
            .await
            .expect("agent report")
    }

    pub async fn report(&mut self, server: &TestServer, state: &str, version: u64) {
        let response = self.report_raw(server, state, version).await;
        assert_eq!(response.status(), 204, "{:?}", response.text().await);
        if state == "succeeded" {
            self.installed_version = version;
        }
    }
}

/// An error answer's status and stable `code`.
pub async fn error_code(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["code"].as_str().unwrap_or("").to_owned())
}

/// Sends a request whose body is over a limit and checks it was cut off. Central Command
/// answers 413 and closes the connection without reading the rest, so the client either reads
/// that answer or, when the close reaches it while it is still writing, fails writing the body
/// (a broken pipe or a reset). Either shows the body was not read whole.
pub async fn assert_cut_off(request: RequestBuilder) {
    match request.send().await {
        Ok(response) => assert_eq!(error_code(response).await, (413, "too_large".to_owned())),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut closed = false;
            while let Some(error) = source {
                if let Some(io) = error.downcast_ref::<std::io::Error>() {
                    closed |= matches!(
                        io.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    );
                }
                source = error.source();
            }
            assert!(closed, "neither a 413 nor a connection closed while writing: {e:?}");
        }
    }
}

/// A hawkBit DDI request as a device with target token `token` sends it; `path` starts with
/// its controller id.
pub fn ddi(server: &TestServer, method: Method, path: &str, token: &str) -> RequestBuilder {
    server
        .http
        .request(method, format!("{}/DEFAULT/controller/v1/{path}", server.url))
        .header("authorization", format!("TargetToken {token}"))
}

/// A poll as DDI device `id`, which must be let in; its answer.
pub async fn ddi_poll(server: &TestServer, id: &str, token: &str) -> Value {
    let response = ddi(server, Method::GET, id, token).send().await.expect("poll");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// Polls as DDI device `id` and returns the `deploymentBase` link it is offered.
pub async fn deployment_offered(server: &TestServer, id: &str, token: &str) -> String {
    let poll = ddi_poll(server, id, token).await;
    poll["_links"]["deploymentBase"]["href"].as_str().expect("offered").to_owned()
}

/// Sends a DDI device's feedback on the action at `href`; it must be taken.
pub async fn send_feedback(server: &TestServer, href: &str, token: &str, body: &Value) {
    let response = server
        .http
        .post(format!("{href}/feedback"))
        .header("authorization", format!("TargetToken {token}"))
        .json(body)
        .send()
        .await
        .expect("feedback");
    assert_eq!(response.status(), 200);
}

/// A build directory with an agent binary and a data file; returns it and the manifest.
pub fn agent_release(
    releases: &Releases,
    version: u64,
    key: Option<&SecretKey>,
) -> (std::path::PathBuf, String) {
    let dir = releases.dir.join(format!("agent-{version}"));
    std::fs::create_dir_all(dir.join("bin")).expect("dir");
    let files = [
        ("bin/sitecast-peer", format!("agent {version} ").repeat(3000).into_bytes(), true),
        ("defaults.toml", format!("version = {version}\n").into_bytes(), false),
    ];
    let mut listed = Vec::new();
    for (path, bytes, executable) in files {
        std::fs::write(dir.join(path), &bytes).expect("write");
        let digest = ImageDigest::of_reader(&bytes[..]).expect("hash");
        listed.push(AgentFile {
            path: path.into(),
            size: digest.size,
            blake3: digest.blake3,
            sha256: digest.sha256,
            executable,
        });
    }
    let release = AgentRelease {
        version,
        version_name: format!("1.{version}"),
        builds: vec![AgentBuild {
            platform: PLATFORM.into(),
            entry: "bin/sitecast-peer".into(),
            files: listed,
        }],
        os_releases: OsReleases { min: 1, max: None },
        notes: String::new(),
        created: start_time() - 1.hour(),
        expires: start_time() + (24 * 365).hours(),
    };
    let manifest = release.sign(&[key.unwrap_or(&releases.release_key)]).to_bytes();
    (dir, String::from_utf8(manifest).expect("utf8"))
}

pub async fn publish_agent(
    server: &TestServer,
    manifest: &str,
    dir: &std::path::Path,
) -> (u16, serde_json::Value) {
    let body = json!({"manifest": manifest, "builds": {PLATFORM: dir}});
    server.op_json(Method::POST, "/api/agent-releases", Some(body)).await
}
