//! `sitecast-coordinator serve` as a process of its own on a test's PostgreSQL, as an
//! operator runs it (to kill it with `kill -9`), and polling for what it should come to.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::postgres::TestPostgres;
use super::{ENROLL, OPERATOR, Releases};

/// What a test of `serve` processes needs: a directory with the root of trust (and the
/// processes' logs and data directory), releases signed for it, a PostgreSQL of its own, an
/// HTTP client, and a deadline for what it waits for. Keep the processes in variables made
/// after it, so they stop before its database does.
pub struct ServeSetup {
    pub releases: Releases,
    pub http: reqwest::Client,
    pub deadline: Instant,
    pub database: TestPostgres,
    pub dir: tempfile::TempDir,
}

impl ServeSetup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let releases = Releases::new(dir.path());
        std::fs::write(dir.path().join("root.json"), releases.root.to_bytes()).expect("root");
        let database = TestPostgres::start();
        sitecast_coordinator::install_tls_provider();
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        Self { releases, http, deadline, database, dir }
    }

    /// `serve` with `flags`, on this setup's database and data directory.
    pub fn start(&self, name: &str, flags: &[&str]) -> ServeProcess {
        ServeProcess::start(name, self.dir.path(), &self.database, flags)
    }
}

/// `sitecast-coordinator serve` on `database`, as an operator runs it; killed when dropped.
pub struct ServeProcess {
    pub child: std::process::Child,
    log: PathBuf,
}

impl ServeProcess {
    /// Listens on a port of its own choosing, which it prints once it serves.
    pub fn start(name: &str, dir: &Path, database: &TestPostgres, flags: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sitecast-coordinator"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--root")
            .arg(dir.join("root.json"))
            .args(["--database", &database.url()])
            .args(["--operator-token", OPERATOR, "--enrollment-token", ENROLL, "--tick-secs", "1"])
            .args(flags)
            // Tests read what it logs at `info`, whatever the environment says.
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        let child = command.spawn().expect("sitecast-coordinator serve");
        Self { child, log }
    }

    /// Its address, once it serves.
    pub fn url(&self) -> Option<String> {
        let log = self.log();
        let at = log.find("listening on ")? + "listening on ".len();
        log[at..].split_whitespace().next().map(str::to_owned)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it answers `/healthz` with 200.
    pub async fn healthy(&self, http: &reqwest::Client) -> bool {
        let Some(url) = self.url() else { return false };
        let response = http.get(format!("{url}/healthz")).send().await;
        response.is_ok_and(|r| r.status() == 200)
    }

    /// Releases, rollouts and the audit log, as the operator sees them.
    pub async fn fleet(&self, http: &reqwest::Client) -> serde_json::Value {
        let mut fleet = json!({});
        for (name, path) in [
            ("releases", "/api/releases"),
            ("rollouts", "/api/rollouts"),
            ("audit", "/api/audit?limit=1000"),
        ] {
            let url = self.url().expect("serving");
            let response = http.get(format!("{url}{path}")).bearer_auth(OPERATOR).send().await;
            fleet[name] = response.expect("get").json().await.expect("json");
        }
        fleet
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` every 50 ms until it holds; past `deadline` fails with `what`.
pub async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    deadline: std::time::Instant,
    mut condition: impl FnMut() -> F,
) {
    while !condition().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        // The polling interval; the condition is what is waited for.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
