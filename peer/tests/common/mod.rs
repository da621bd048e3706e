//! A real coordinator on loopback with a published release, for agent and swarm tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use sitecast_coordinator::server::{Coordinator, ServerConfig, SystemClock};
use sitecast_manifest::*;

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
    _server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Origin {
    pub async fn start(dir: &Path) -> Self {
        let root_key = SecretKey::generate().expect("rng");
        let release_key = SecretKey::generate().expect("rng");
        let root = Root {
            version: 1,
            expires: Timestamp::now() + (24 * 365).hours(),
            root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
            release: RoleKeys { keys: vec![release_key.public()], threshold: 1 },
        };
        let root = TrustedRoot::pin(&root.sign(&[&root_key]).to_bytes()).expect("root");
        let root_path = dir.join("root.json");
        std::fs::write(&root_path, root.to_bytes()).expect("write root");
        let mut config = ServerConfig::new(dir.join("coordinator"));
        config.root = Some(root.clone());
        config.operator_token = Some(OPERATOR.into());
        config.enrollment_token = Some(ENROLL.into());
        config.tick = Duration::from_millis(200);
        let (coordinator, _) =
            Coordinator::open(config, Arc::new(SystemClock)).expect("coordinator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(coordinator.serve(listener));
        Self {
            url,
            root,
            root_path,
            release_key,
            http: reqwest::Client::new(),
            dir: dir.to_owned(),
            _server: server,
        }
    }

    /// Generates, signs and publishes release `version` of `len` bytes; returns the image.
    pub async fn publish(&self, version: u64, len: u64) -> (PathBuf, ImageInfo) {
        let path = self.dir.join(format!("image-v{version}.raw"));
        sitecast_iso::generate::write_image(&path, len, &format!("test image {version}"))
            .expect("image");
        let digest =
            ImageDigest::of_reader(std::fs::File::open(&path).expect("open")).expect("hash");
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
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        (path, image)
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
