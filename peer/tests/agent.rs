//! The real `sitecast-peer` binary against a real coordinator on loopback, with file-backed
//! slots and simulated boots (the agent applies GRUB's rules itself at start).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sitecast_iso::ab::load_state;
use sitecast_iso::{EnvFile, Slot};

const BIN: &str = env!("CARGO_BIN_EXE_sitecast-peer");

struct AgentProcess {
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl AgentProcess {
    fn new(dir: &Path, origin: &Origin, site: &str, name: &str, slot_len: u64) -> Self {
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
        ];
        Self { dir: dir.to_owned(), args, child: None }
    }

    fn start(&mut self) {
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
    fn exited(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        match child.try_wait().expect("wait") {
            Some(status) => {
                self.child = None;
                Some(status.code().unwrap_or(-1))
            }
            None => None,
        }
    }

    fn control(&self, command: &str) -> String {
        let output = Command::new(BIN)
            .args(["--config", &self.dir.join("agent.toml").display().to_string(), command])
            .env("SITECAST_AGENT_CONFIG", self.dir.join("agent.toml"))
            .output()
            .expect("control");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn appliances(origin: &Origin) -> Vec<Value> {
    let response = origin
        .http
        .get(format!("{}/api/appliances", origin.url))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("list");
    response.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_updates_reboots_and_passes_its_health_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, image) = origin.publish(2, 3 * 1024 * 1024 + 999).await;
    let mut agent =
        AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", image.size + 8192);
    // The control socket path is given by flag; write a config so the local commands find it.
    std::fs::write(
        dir.path().join("a1/agent.toml"),
        format!("control_socket = \"{}\"\n", dir.path().join("a1/state/control.sock").display()),
    )
    .expect("config");
    agent.start();

    let deadline = Instant::now() + Duration::from_secs(60);
    while appliances(&origin).await.is_empty() {
        assert!(Instant::now() < deadline, "never enrolled:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    origin.rollout(2).await;

    // It downloads, verifies, and waits for the window (02:00–05:00 by default) unless told.
    let mut skipped = false;
    let code = loop {
        assert!(Instant::now() < deadline, "no reboot:\n{}", agent.log());
        if let Some(code) = agent.exited() {
            break code;
        }
        let list = appliances(&origin).await;
        if !skipped && list[0]["update"]["state"] == "ready" {
            assert!(agent.control("skip-window").contains("will not wait"), "{}", agent.log());
            skipped = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        code,
        75,
        "the agent asks its supervisor to restart it as after a reboot:\n{}",
        agent.log()
    );
    let (state, _) = load_state(&EnvFile::new(dir.path().join("a1/grubenv"))).expect("env");
    assert_eq!((state.active, state.next), (Slot::A, Some(Slot::B)), "B activated for trial boots");

    agent.start();
    loop {
        assert!(Instant::now() < deadline, "never succeeded:\n{}", agent.log());
        let list = appliances(&origin).await;
        if list[0]["update"]["state"] == "succeeded" {
            assert_eq!(list[0]["installed_version"], 2);
            assert_eq!(list[0]["active_slot"], "B");
            break;
        }
        assert!(agent.exited().is_none(), "the agent stopped:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (state, _) = load_state(&EnvFile::new(dir.path().join("a1/grubenv"))).expect("env");
    assert_eq!((state.active, state.next, state.good), (Slot::B, None, true), "marked good");
    let slot = std::fs::read(dir.path().join("a1/slot-b.img")).expect("slot");
    assert_eq!(&slot[..image.size as usize], &std::fs::read(&image_path).expect("image")[..]);
    let status = agent.control("status");
    assert!(status.contains("running slot B"), "{status}");
}
