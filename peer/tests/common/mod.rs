//! A real coordinator on loopback with a published release, for agent and swarm tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use sitecast_coordinator::server::{Coordinator, ServerConfig, SystemClock};
use sitecast_manifest::*;

pub mod nginx;

/// The content index of the image at `path` as `sitecast-manifest sign` signs it.
pub fn content_index_of(path: &Path) -> ContentIndex {
    let image = std::fs::File::open(path).expect("image");
    ContentIndex::make(image, sitecast_delta::Chunking::default(), std::io::sink()).expect("index")
}

pub const OPERATOR: &str = "operator-secret";
pub const ENROLL: &str = "enroll-secret";
pub const PLATFORM: &str = "x86_64-appliance";

pub struct Origin {
    pub url: String,
    pub root: TrustedRoot,
    pub root_path: PathBuf,
    pub release_key: SecretKey,
    pub http: reqwest::Client,
    pub dir: PathBuf,
    /// The coordinator's iroh-blobs provider, `<id>@<addr>`.
    pub iroh: Vec<String>,
    _server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// How a test's coordinator is reached.
#[derive(Debug, Default)]
pub struct OriginOptions {
    /// Serve HTTPS itself with this certificate, as `https://{host}:port`; the test's own
    /// client trusts `ca`.
    pub tls: Option<OriginTls>,
}

#[derive(Debug)]
pub struct OriginTls {
    pub certificate: sitecast_tls::CertificateFiles,
    pub ca: PathBuf,
    pub host: String,
}

impl Origin {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, OriginOptions::default()).await
    }

    pub async fn start_with(dir: &Path, options: OriginOptions) -> Self {
        sitecast_coordinator::install_tls_provider();
        let root_key = SecretKey::generate().expect("rng");
        let release_key = SecretKey::generate().expect("rng");
        let root = Root {
            version: 1,
            expires: Timestamp::now() + (24 * 365).hours(),
            root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
            release: RoleKeys { keys: vec![release_key.public()], threshold: 1 },
        };
        let root = TrustedRoot::pin(&root.sign(&[&root_key]).to_bytes()).expect("root");
        std::fs::create_dir_all(dir).expect("dir");
        let root_path = dir.join("root.json");
        std::fs::write(&root_path, root.to_bytes()).expect("write root");
        let mut config = ServerConfig::new(dir.join("coordinator"));
        config.root = Some(root.clone());
        config.operator_token = Some(OPERATOR.into());
        config.enrollment_token = Some(ENROLL.into());
        config.tick = Duration::from_millis(200);
        // A window that never opens: the fleet default (02:00–05:00 UTC) would let agents
        // activate and reboot mid-test when tests run at that hour. Tests that want an
        // activation ask for it (`skip-window`).
        config.fleet.default_window =
            sitecast_manifest::window::MaintenanceWindow { days: Vec::new(), ..Default::default() };
        config.tls = options.tls.as_ref().map(|tls| tls.certificate.clone());
        let (coordinator, _) =
            Coordinator::open(config, Arc::new(SystemClock)).expect("coordinator");
        let iroh = coordinator
            .enable_iroh("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("iroh origin");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (url, http) = match &options.tls {
            None => (format!("http://127.0.0.1:{port}"), reqwest::Client::new()),
            Some(tls) => {
                let trust = sitecast_tls::Trust::CaFile(tls.ca.clone());
                let config = sitecast_tls::client_config(&trust).expect("client TLS");
                let http = reqwest::Client::builder().tls_backend_preconfigured(config);
                (format!("https://{}:{port}", tls.host), http.build().expect("client"))
            }
        };
        let server = tokio::spawn(coordinator.serve(listener));
        Self { url, root, root_path, release_key, http, dir: dir.to_owned(), iroh, _server: server }
    }

    /// Generates, signs and publishes release `version` of `len` bytes; returns the image.
    pub async fn publish(&self, version: u64, len: u64) -> (PathBuf, ImageInfo) {
        let path = self.dir.join(format!("image-v{version}.raw"));
        sitecast_iso::generate::write_image(&path, len, &format!("test image {version}"))
            .expect("image");
        let image = self.publish_image(version, &path, None).await;
        (path, image)
    }

    /// Signs and publishes the image at `path` as release `version`, with `index` signed as
    /// its content index.
    pub async fn publish_image(
        &self,
        version: u64,
        path: &Path,
        index: Option<ContentIndex>,
    ) -> ImageInfo {
        let (status, body) = self.try_publish_image(version, path, index).await;
        assert_eq!(status, 201, "{body}");
        let digest =
            ImageDigest::of_reader(std::fs::File::open(path).expect("open")).expect("hash");
        ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 }
    }

    /// [`Self::publish_image`]'s answer, whatever it is.
    pub async fn try_publish_image(
        &self,
        version: u64,
        path: &Path,
        index: Option<ContentIndex>,
    ) -> (u16, String) {
        let digest =
            ImageDigest::of_reader(std::fs::File::open(path).expect("open")).expect("hash");
        let image = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
        let now = Timestamp::now();
        let release = Release {
            version,
            version_name: format!("test.{version}"),
            image: image.clone(),
            platforms: vec![PLATFORM.into()],
            notes: String::new(),
            created: now - 1.hour(),
            expires: now + (24 * 30).hours(),
            rollback_floor: None,
            index,
        };
        let manifest =
            String::from_utf8(release.sign(&[&self.release_key]).to_bytes()).expect("utf8");
        let response = self
            .http
            .post(format!("{}/api/releases", self.url))
            .bearer_auth(OPERATOR)
            .json(&serde_json::json!({"manifest": manifest, "image_path": path}))
            .send()
            .await
            .expect("publish");
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    }

    /// Signs and publishes agent release `version` for this platform: `files` as (path,
    /// bytes, executable), the first one the entry. Returns the signed manifest.
    pub async fn publish_agent(&self, version: u64, files: &[(&str, &[u8], bool)]) -> String {
        let build_dir = self.dir.join(format!("agent-{version}"));
        let mut listed = Vec::new();
        for (path, bytes, executable) in files {
            let target = build_dir.join(path);
            std::fs::create_dir_all(target.parent().expect("parent")).expect("dir");
            std::fs::write(&target, bytes).expect("write");
            let digest = ImageDigest::of_reader(*bytes).expect("hash");
            listed.push(AgentFile {
                path: (*path).into(),
                size: digest.size,
                blake3: digest.blake3,
                sha256: digest.sha256,
                executable: *executable,
            });
        }
        let now = Timestamp::now();
        let release = AgentRelease {
            version,
            version_name: format!("agent.{version}"),
            builds: vec![AgentBuild {
                platform: PLATFORM.into(),
                entry: files[0].0.into(),
                files: listed,
            }],
            os_releases: OsReleases { min: 0, max: None },
            notes: String::new(),
            created: now - 1.hour(),
            expires: now + (24 * 30).hours(),
        };
        let manifest =
            String::from_utf8(release.sign(&[&self.release_key]).to_bytes()).expect("utf8");
        let body = serde_json::json!({"manifest": manifest, "builds": {PLATFORM: build_dir}});
        let response = self
            .http
            .post(format!("{}/api/agent-releases", self.url))
            .bearer_auth(OPERATOR)
            .json(&body)
            .send()
            .await
            .expect("publish agent release");
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        manifest
    }

    /// Starts a rollout of agent release `version` to everyone at once; returns its id.
    pub async fn agent_rollout(&self, version: u64) -> u64 {
        self.agent_rollout_with(serde_json::json!({"version": version})).await
    }

    /// Starts an immediate agent rollout with `body`'s fields (`version`, `in_window`, …).
    pub async fn agent_rollout_with(&self, mut body: serde_json::Value) -> u64 {
        body["kind"] = "agent".into();
        body["strategy"] = "immediate".into();
        self.create_rollout(body).await["id"].as_u64().expect("id")
    }

    /// `POST /api/rollouts` with `body`; the new rollout's view.
    pub async fn create_rollout(&self, body: serde_json::Value) -> serde_json::Value {
        let response = self
            .http
            .post(format!("{}/api/rollouts", self.url))
            .bearer_auth(OPERATOR)
            .json(&body)
            .send()
            .await
            .expect("rollout");
        assert_eq!(response.status(), 201, "{body}");
        response.json().await.expect("rollout")
    }

    /// Polls until rollout `id` is completed; past `deadline` fails with `what` and `log()`.
    pub async fn wait_completed(
        &self,
        id: u64,
        what: &str,
        deadline: std::time::Instant,
        log: impl Fn() -> String,
    ) {
        while self.rollout_view(id).await["state"] != "completed" {
            assert!(std::time::Instant::now() < deadline, "{what}:\n{}", log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn rollout_view(&self, id: u64) -> serde_json::Value {
        self.http
            .get(format!("{}/api/rollouts/{id}", self.url))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .expect("rollout")
            .json()
            .await
            .expect("json")
    }

    pub async fn rollout(&self, version: u64) {
        let response = self
            .http
            .post(format!("{}/api/rollouts", self.url))
            .bearer_auth(OPERATOR)
            .json(&serde_json::json!({"version": version, "strategy": "immediate"}))
            .send()
            .await
            .expect("rollout");
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
    }

    /// What the operator API answers at `path` (e.g. `/api/sites`).
    pub async fn operator_get(&self, path: &str) -> serde_json::Value {
        let response = self.http.get(format!("{}{path}", self.url)).bearer_auth(OPERATOR).send();
        response.await.expect(path).json().await.expect("json")
    }

    /// Origin bytes served to `site` for `version`, from the metrics.
    pub async fn origin_bytes(&self, site: &str, version: u64) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let prefix =
            format!("sitecast_origin_bytes_served_total{{site=\"{site}\",version=\"{version}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |n| n.parse().expect("number"))
    }
}

/// The check-in of an appliance a test drives by hand (no agent process), on release 1.
pub fn lone_checkin(site: &str, name: &str) -> sitecast_manifest::api::CheckinRequest {
    sitecast_manifest::api::CheckinRequest {
        site: site.into(),
        name: name.into(),
        group: None,
        macs: vec![],
        platform: PLATFORM.into(),
        installed_version: 1,
        active_slot: Some("A".into()),
        agent_version: "test".into(),
        agent_release: None,
        agent_previous: None,
        enrollment_token: Some(ENROLL.into()),
        peer: Default::default(),
    }
}

/// `PUT /api/releases/{version}/mirrors` as the operator; the status and body.
pub async fn set_mirrors(origin: &Origin, version: u64, mirrors: &[String]) -> (u16, String) {
    let response = origin
        .http
        .put(format!("{}/api/releases/{version}/mirrors", origin.url))
        .bearer_auth(OPERATOR)
        .json(&serde_json::json!({ "mirrors": mirrors }))
        .send()
        .await
        .expect("mirrors");
    (response.status().as_u16(), response.text().await.expect("body"))
}

/// Reads an HTTP request's head (up to the blank line) from `socket`, for stand-in servers;
/// `None` if the connection ends first.
pub async fn read_request_head(socket: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

pub const BIN: &str = env!("CARGO_BIN_EXE_sitecast-peer");

/// A locally administered MAC address of its own for the agent in `dir`.
fn mac_of(dir: &Path) -> String {
    let hash = blake3::hash(dir.as_os_str().as_encoded_bytes());
    let bytes = &hash.as_bytes()[..5];
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]
    )
}

pub struct AgentProcess {
    pub name: String,
    pub dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// `child` leads a process group (a launcher and its agent).
    group: bool,
    /// Set in the environment of what is started.
    pub env: Vec<(String, String)>,
}

impl AgentProcess {
    pub fn new(dir: &Path, origin: &Origin, site: &str, name: &str, slot_len: u64) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        for slot in ["slot-a.img", "slot-b.img"] {
            std::fs::File::create(dir.join(slot)).expect("slot").set_len(slot_len).expect("size");
        }
        let p = |name: &str| dir.join(name).display().to_string();
        let args = vec![
            "--config".into(),
            p("agent.toml"),
            "run".into(),
            "--coordinator".into(),
            origin.url.clone(),
            "--site".into(),
            site.into(),
            "--name".into(),
            name.into(),
            "--platform".into(),
            PLATFORM.into(),
            "--enrollment-token".into(),
            ENROLL.into(),
            "--root".into(),
            origin.root_path.display().to_string(),
            "--state-dir".into(),
            p("state"),
            "--slot-a".into(),
            p("slot-a.img"),
            "--slot-b".into(),
            p("slot-b.img"),
            "--grubenv".into(),
            p("grubenv"),
            "--boot-slot".into(),
            "simulate-grub".into(),
            "--reboot-command".into(),
            "".into(),
            "--checkin-interval-secs".into(),
            "1".into(),
            "--control-socket".into(),
            p("state/control.sock"),
            "--lan-listen".into(),
            "127.0.0.1:0".into(),
            "--libp2p-listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            // mDNS cannot work on loopback; the coordinator's site list stands in.
            "--mdns".into(),
            "false".into(),
            // Agents on one host would all report its MACs; appliances each have their own.
            "--mac".into(),
            mac_of(dir),
        ];
        Self {
            name: name.into(),
            dir: dir.to_owned(),
            args,
            child: None,
            group: false,
            env: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log");
        let child = Command::new(BIN)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sitecast-peer");
        self.child = Some(child);
    }

    /// The exit status if the agent exited ("rebooted").
    pub fn exited(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        match child.try_wait().expect("wait") {
            Some(status) => {
                self.child = None;
                Some(status.code().unwrap_or(-1))
            }
            None => None,
        }
    }

    pub fn control(&self, command: &str) -> String {
        let output = Command::new(BIN)
            .args(["--config", &self.dir.join("agent.toml").display().to_string(), command])
            .env("SITECAST_AGENT_CONFIG", self.dir.join("agent.toml"))
            .output()
            .expect("control");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent as `sitecast-launcher` does on an appliance: the launcher (in a
    /// process group of its own, so dropping this kills both) runs the current version of
    /// the agent store `store`, this agent's arguments passed through.
    pub fn start_under_launcher(&mut self, store: &Path, launcher_args: &[&str]) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log");
        let child = Command::new(launcher_bin())
            .arg("--store")
            .arg(store)
            .arg("--image-agent")
            .arg(BIN)
            .args(launcher_args)
            .arg("--")
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start sitecast-launcher");
        self.child = Some(child);
        self.group = true;
    }
}

impl AgentProcess {
    /// kill -9 of the agent a launcher runs (not of the launcher), as a crash would end it.
    pub fn kill_agent_under_launcher(&self) {
        let launcher = self.child.as_ref().expect("started").id();
        let children =
            std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
                .expect("the launcher's children");
        for pid in children.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

/// `sitecast-launcher` of this build, beside the test binaries (`target/<profile>/`).
pub fn launcher_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    exe.parent().and_then(Path::parent).expect("target/<profile>").join("sitecast-launcher")
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.group {
                let group = format!("-{}", child.id());
                let _ = Command::new("kill").args(["-9", "--", &group]).status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Origin {
    /// The operator removes the appliance of identity `key` (hex) from the fleet.
    pub async fn remove_appliance(&self, key: &str) {
        let response = self
            .http
            .delete(format!("{}/api/appliances/{key}", self.url))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .expect("remove");
        assert!(response.status().is_success(), "{:?}", response.text().await);
    }

    /// The operator opens `site`'s maintenance window all day, every day.
    pub async fn open_window(&self, site: &str) {
        let window = serde_json::json!({"start": "00:00", "end": "23:59", "timezone": "UTC",
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]});
        let response = self
            .http
            .put(format!("{}/api/sites/{site}/window", self.url))
            .bearer_auth(OPERATOR)
            .json(&window)
            .send()
            .await
            .expect("window");
        assert!(response.status().is_success(), "{:?}", response.text().await);
    }

    /// The operator pins the appliance of identity `key` (hex) to release `version`.
    pub async fn pin(&self, key: &str, version: u64) {
        let response = self
            .http
            .post(format!("{}/api/appliances/{key}/pin", self.url))
            .bearer_auth(OPERATOR)
            .json(&serde_json::json!({"version": version}))
            .send()
            .await
            .expect("pin");
        assert!(response.status().is_success(), "{:?}", response.text().await);
    }
}

pub async fn appliances(origin: &Origin) -> Vec<serde_json::Value> {
    let response = origin
        .http
        .get(format!("{}/api/appliances", origin.url))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("list");
    response.json().await.expect("json")
}

/// Starts `n` agents named `a0`, `a1`, … at site `store-1`, each with slots of `slot_len` bytes.
pub fn start_agents(origin: &Origin, dir: &Path, n: usize, slot_len: u64) -> Vec<AgentProcess> {
    (0..n)
        .map(|i| {
            let name = format!("a{i}");
            let mut agent = AgentProcess::new(&dir.join(&name), origin, "store-1", &name, slot_len);
            agent.start();
            agent
        })
        .collect()
}

/// Waits until `count` appliances are enrolled; on timeout shows `watched`'s log.
pub async fn wait_enrolled(
    origin: &Origin,
    count: usize,
    deadline: std::time::Instant,
    watched: &AgentProcess,
) {
    while appliances(origin).await.len() < count {
        assert!(std::time::Instant::now() < deadline, "not all enrolled:\n{}", watched.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits until every agent in `agents` shows in its status that the coordinator named
/// `members` members of its site: each has checked in since all of them enrolled, and they
/// agree on who takes part (an agent serves and hears members only). That is what can be
/// known before a rollout: the coordinator sends the site peers' addresses only with an
/// offer, so no agent is connected to another before.
pub async fn wait_members_known(
    agents: &mut [AgentProcess],
    members: usize,
    deadline: std::time::Instant,
) {
    loop {
        let mut waiting = Vec::new();
        for agent in agents.iter_mut() {
            assert!(agent.exited().is_none(), "{} stopped:\n{}", agent.name, agent.log());
            let status = agent.status().await.unwrap_or_default();
            if status["membership"]["members"].as_u64() != Some(members as u64) {
                waiting.push(format!("{}: {}", agent.name, status["membership"]));
            }
        }
        if waiting.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every agent knows the site's {members} members: {waiting:?}\n{}",
            agents[0].log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Starts `agent` until the coordinator lists it, then stops it: an appliance that was off
/// when a rollout began. (A rollout's appliances are fixed when it is created: one enrolled
/// later is not offered its release.)
pub async fn enroll_then_stop(
    origin: &Origin,
    agent: &mut AgentProcess,
    deadline: std::time::Instant,
) {
    agent.start();
    while !appliances(origin).await.iter().any(|a| a["name"] == agent.name.as_str()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never enrolled:\n{}",
            agent.name,
            agent.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    agent.kill();
}

/// A TCP relay in front of the coordinator that a test can cut (every connection dropped,
/// new ones refused) and restore: the origin going away and coming back, over real sockets.
/// Answers are paced to `rate` bytes per second per connection, so a download takes long
/// enough to be cut in the middle.
pub struct CuttableRelay {
    pub url: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttableRelay {
    pub async fn start(upstream: &str, rate: u64) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if *watch.borrow() {
                    continue; // dropped: the origin is away
                }
                let mut watch = watch.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = relay(inbound, outbound, rate) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { url, cut }
    }

    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

async fn relay(inbound: tokio::net::TcpStream, outbound: tokio::net::TcpStream, rate: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
        let _ = out_write.shutdown().await;
    };
    let answers = async {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n) = out_read.read(&mut buffer).await {
            if n == 0 || in_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        let _ = in_write.shutdown().await;
    };
    tokio::join!(requests, answers);
}

impl AgentProcess {
    /// Talks to the coordinator at `url` instead (e.g. through a [`CuttableRelay`]).
    pub fn set_coordinator(&mut self, url: &str) {
        let at = self.args.iter().position(|a| a == "--coordinator").expect("--coordinator") + 1;
        self.args[at] = url.to_owned();
    }

    /// Writes `agent.toml` (settings the flags do not cover).
    pub fn configure(&self, toml: &str) {
        std::fs::write(self.dir.join("agent.toml"), toml).expect("agent.toml");
    }

    /// The agent's own status (control socket).
    pub async fn status(&self) -> Option<serde_json::Value> {
        sitecast_peer::control::request(&self.dir.join("state/control.sock"), "status")
            .await
            .ok()
            .and_then(|r| r.status)
    }
}

/// Waits until `agent` reports at least `fraction` of its download done.
pub async fn wait_progress(agent: &AgentProcess, fraction: f64, deadline: std::time::Instant) {
    loop {
        let progress = agent.status().await.and_then(|s| s["progress"].as_f64()).unwrap_or(0.0);
        if progress >= fraction {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} made no progress:\n{}",
            agent.name,
            agent.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits until every appliance named in `names` reports `state`.
pub async fn wait_state(
    origin: &Origin,
    names: &[&str],
    state: &str,
    deadline: std::time::Instant,
) {
    loop {
        let list = appliances(origin).await;
        let done = names
            .iter()
            .all(|name| list.iter().any(|a| a["name"] == *name && a["update"]["state"] == state));
        if done {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "not {state}: {list:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// One request as the agent sent it.
#[derive(Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.method, self.path, String::from_utf8_lossy(&self.body))
    }
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// An HTTP/1.1 relay in front of a coordinator that records every request (method, path, body)
/// before passing it on: what the agent really sent, seen from outside the agent. It can
/// hold back the requests to one path (recorded, never delivered: the agent waits for an
/// answer).
pub struct RecordingRelay {
    pub url: String,
    recorded: Arc<std::sync::Mutex<Vec<Recorded>>>,
    held: Arc<std::sync::Mutex<Option<String>>>,
}

impl RecordingRelay {
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = Arc::new(std::sync::Mutex::new(None));
        let (log, hold) = (Arc::clone(&recorded), Arc::clone(&held));
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                let (log, hold) = (Arc::clone(&log), Arc::clone(&hold));
                tokio::spawn(relay_recording(inbound, upstream.clone(), log, hold));
            }
        });
        Self { url, recorded, held }
    }

    /// Requests to `path` are recorded but not delivered, until [`RecordingRelay::release`].
    pub fn hold(&self, path: &str) {
        *self.held.lock().expect("lock") = Some(path.to_owned());
    }

    pub fn release(&self) {
        *self.held.lock().expect("lock") = None;
    }

    /// Requests to `path` so far, in the order they were sent.
    pub fn requests(&self, path: &str) -> Vec<Recorded> {
        self.recorded.lock().expect("lock").iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Every request so far, in the order they were sent.
    pub fn all(&self) -> Vec<Recorded> {
        self.recorded.lock().expect("lock").clone()
    }
}

async fn relay_recording(
    inbound: tokio::net::TcpStream,
    upstream: String,
    log: Arc<std::sync::Mutex<Vec<Recorded>>>,
    hold: Arc<std::sync::Mutex<Option<String>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
    let (in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let answers = async {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
        let _ = in_write.shutdown().await;
    };
    let requests = async {
        let mut reader = tokio::io::BufReader::new(in_read);
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    let _ = out_write.shutdown().await;
                    return;
                }
                head.extend_from_slice(&line);
                if line == b"\r\n" {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            assert!(
                !text.to_ascii_lowercase().contains("transfer-encoding"),
                "the relay reads bodies by content-length only:\n{text}"
            );
            let mut words = text.split_whitespace();
            let method = words.next().unwrap_or_default().to_owned();
            let target = words.next().unwrap_or_default();
            let path = target.split('?').next().unwrap_or_default().to_owned();
            let length = text
                .lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, value)| value.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).await.is_err() {
                return;
            }
            let held = hold.lock().expect("lock").as_deref() == Some(path.as_str());
            log.lock().expect("lock").push(Recorded { method, path, body: body.clone() });
            if held {
                // Never delivered: the agent waits for an answer that does not come.
                std::future::pending::<()>().await;
            }
            if out_write.write_all(&head).await.is_err()
                || out_write.write_all(&body).await.is_err()
            {
                return;
            }
        }
    };
    tokio::join!(requests, answers);
}

impl AgentProcess {
    /// Sets flag `flag` of `run` to `value` (replacing it if given; repeatable flags such as
    /// `--static-peer` are added once more).
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(at) if flag != "--static-peer" => self.args[at + 1] = value.to_owned(),
            _ => self.args.extend([flag.to_owned(), value.to_owned()]),
        }
    }

    /// Runs `sitecast-peer --config <agent.toml> <args>`: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(BIN)
            .arg("--config")
            .arg(self.dir.join("agent.toml"))
            .args(args)
            .output()
            .expect("sitecast-peer");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The agent's state file, if it has saved one.
    pub fn state_file_if_saved(&self) -> Option<serde_json::Value> {
        let text = std::fs::read(self.dir.join("state/agent.json")).ok()?;
        Some(serde_json::from_slice(&text).expect("json"))
    }

    /// The agent's state file.
    pub fn state_file(&self) -> serde_json::Value {
        let text = std::fs::read(self.dir.join("state/agent.json")).expect("agent.json");
        serde_json::from_slice(&text).expect("json")
    }

    /// Rewrites the agent's state file (while it is stopped).
    pub fn edit_state(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut state = self.state_file();
        edit(&mut state);
        std::fs::write(self.dir.join("state/agent.json"), state.to_string()).expect("agent.json");
    }
}

/// Waits until `agent` exits asking to be started again, as after a reboot.
pub async fn wait_reboot(agent: &mut AgentProcess, deadline: std::time::Instant) {
    loop {
        if let Some(code) = agent.exited() {
            assert_eq!(code, sitecast_peer::agent::EXIT_REBOOT, "{}", agent.log());
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never rebooted:\n{}",
            agent.name,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state the agent itself shows (it does not need the coordinator for that).
pub async fn local_state(agent: &AgentProcess) -> String {
    let status = agent.status().await.unwrap_or_default();
    status["update"]["state"].as_str().unwrap_or("").to_owned()
}
