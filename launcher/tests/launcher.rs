//! The `sitecast-launcher` binary with real agent processes (shell scripts standing in for
//! agent versions: what the launcher sees of an agent is a process that exits or confirms).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::Value;
use sitecast_launcher::AgentStore;
use sitecast_manifest::{AgentBuild, AgentFile, ImageDigest};

/// Agent builds in these tests run on every OS release.
const ANY_OS: sitecast_manifest::OsReleases = sitecast_manifest::OsReleases { min: 0, max: None };

const BIN: &str = env!("CARGO_BIN_EXE_sitecast-launcher");

/// An agent that records each start in `starts`, confirms its version and keeps running.
fn healthy_agent(starts: &Path) -> String {
    format!(
        "#!/bin/sh\necho start >> {}\necho \"$SITECAST_AGENT_VERSION\" > \"$SITECAST_AGENT_STORE/confirmed.new\"\n\
         mv \"$SITECAST_AGENT_STORE/confirmed.new\" \"$SITECAST_AGENT_STORE/confirmed\"\nexec sleep 1000\n",
        starts.display()
    )
}

/// Installs `script` as agent `version` (its entry) in the store at `root`.
fn install(root: &Path, version: u64, script: &str) {
    install_for(root, version, script, ANY_OS);
}

/// As [`install`], for the OS releases `os`.
fn install_for(root: &Path, version: u64, script: &str, os: sitecast_manifest::OsReleases) {
    let digest = ImageDigest::of_reader(script.as_bytes()).expect("in memory");
    let build = AgentBuild {
        platform: "x86_64-appliance".into(),
        entry: "bin/agent".into(),
        files: vec![AgentFile {
            path: "bin/agent".into(),
            size: digest.size,
            blake3: digest.blake3,
            sha256: digest.sha256,
            executable: true,
        }],
    };
    let store = AgentStore::open(root).expect("store");
    let bytes = script.as_bytes().to_vec();
    store
        .stage(version, &build, os, |_| {
            Ok(Box::new(std::io::Cursor::new(bytes.clone())) as Box<dyn Read>)
        })
        .expect("stage");
}

/// The launcher in a process group of its own, killed with its agent when dropped.
struct Running(Child);

impl Running {
    fn start(root: &Path, image_agent: &Path, extra: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let child = Command::new(BIN)
            .arg("--store")
            .arg(root)
            .arg("--image-agent")
            .arg(image_agent)
            .args(["--restart-delay-ms", "50"])
            .args(extra)
            .process_group(0)
            .spawn()
            .expect("launcher");
        Self(child)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-9", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, deadline: Instant, mut condition: impl FnMut() -> bool) {
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn starts(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

fn record(root: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(root.join("rollback.json")).ok()?).ok()
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("agent");
    let starts = dir.path().join("v1-starts");
    install(&root, 1, &healthy_agent(&starts));
    AgentStore::open(&root).expect("store").switch(1, Timestamp::now()).expect("switch");
    (dir, root, starts)
}

#[test]
fn a_new_version_that_crashes_at_start_is_rolled_back_and_the_reason_kept() {
    let (dir, root, v1_starts) = setup();
    let _launcher = Running::start(&root, Path::new("/bin/false"), &["--crash-limit", "3"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = AgentStore::open(&root).expect("store");
    wait_for("v1 to confirm", deadline, || store.confirmed() == Some(1));

    // What the running agent does with a new version: stage it, switch; the launcher
    // restarts into it.
    let broken = "#!/bin/sh\necho 'v2: cannot read the new field in agent.toml' >&2\nexit 3\n";
    install(&root, 2, broken);
    store.switch(2, Timestamp::now()).expect("switch to 2");
    wait_for("the rollback record", deadline, || record(&root).is_some());
    let record = record(&root).expect("record");
    assert_eq!((record["from"].as_u64(), record["to"].as_u64()), (Some(2), Some(1)), "{record}");
    assert_eq!(record["reason"], "crash loop");
    let exits = record["exits"].as_array().expect("exits");
    assert_eq!(exits.len(), 3, "{record}");
    assert!(exits.iter().all(|e| e["code"] == 3), "{record}");
    assert!(exits[0]["log_tail"].as_str().unwrap_or("").contains("new field"), "{record}");

    assert_eq!(store.current().expect("current"), Some(1));
    assert_eq!(store.previous().expect("previous"), Some(2));
    wait_for("v1 to run again", deadline, || starts(&v1_starts) >= 2);
    drop(dir);
}

#[test]
fn a_new_version_that_never_checks_in_is_rolled_back_at_the_trial_timeout() {
    let (_dir, root, v1_starts) = setup();
    let _launcher = Running::start(&root, Path::new("/bin/false"), &["--trial-timeout-secs", "2"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = AgentStore::open(&root).expect("store");
    wait_for("v1 to confirm", deadline, || store.confirmed() == Some(1));
    install(&root, 2, "#!/bin/sh\nexec sleep 1000\n");
    store.switch(2, Timestamp::now()).expect("switch to 2");
    wait_for("the rollback record", deadline, || record(&root).is_some());
    assert_eq!(record(&root).expect("record")["reason"], "never checked in");
    assert_eq!(store.current().expect("current"), Some(1));
    wait_for("v1 to run again", deadline, || starts(&v1_starts) >= 2);
}

#[test]
fn without_a_version_of_its_own_the_images_agent_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("agent");
    let marker = dir.path().join("image-agent-ran");
    let image_agent = dir.path().join("sitecast-peer");
    std::fs::write(
        &image_agent,
        format!("#!/bin/sh\ntouch {}\nexec sleep 1000\n", marker.display()),
    )
    .expect("script");
    std::fs::set_permissions(&image_agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let _launcher = Running::start(&root, &image_agent, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_for("the image's agent", deadline, || marker.exists());
}

/// An image agent that says it is agent release `release` and records each start in `starts`.
fn image_agent(dir: &Path, release: u64, starts: &Path) -> PathBuf {
    let path = dir.join("image-agent");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = agent-release ]; then echo {release}; exit 0; fi\necho start >> {}\nexec sleep 1000\n",
        starts.display()
    );
    std::fs::write(&path, script).expect("image agent");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("mode");
    path
}

#[test]
fn after_an_os_update_the_newer_compatible_agent_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deadline = Instant::now() + Duration::from_secs(60);
    let os_file = dir.path().join("sitecast-release");
    let image_starts = dir.path().join("image-starts");
    let v3_starts = dir.path().join("v3-starts");
    let root = dir.path().join("agent");
    // Agent 3 runs on OS releases 10 and later.
    let os = sitecast_manifest::OsReleases { min: 10, max: None };
    install_for(&root, 3, &healthy_agent(&v3_starts), os);
    let store = AgentStore::open(&root).expect("store");
    store.switch(3, Timestamp::now()).expect("switch");

    // Cases: (image agent release, booted OS release) → which runs.
    let cases = [(1, 12, "agent 3"), (1, 9, "the image's"), (5, 12, "the image's")];
    for (image_release, booted, expected) in cases {
        std::fs::write(&os_file, format!("VERSION_ID={booted}\n")).expect("os release");
        let _ = std::fs::remove_file(&image_starts);
        let _ = std::fs::remove_file(&v3_starts);
        let image = image_agent(dir.path(), image_release, &image_starts);
        let os_arg = os_file.display().to_string();
        let launcher = Running::start(&root, &image, &["--os-release-file", &os_arg]);
        let which = || match (starts(&image_starts), starts(&v3_starts)) {
            (0, 0) => None,
            (_, 0) => Some("the image's"),
            (0, _) => Some("agent 3"),
            _ => Some("both"),
        };
        wait_for("an agent to start", deadline, || which().is_some());
        assert_eq!(which(), Some(expected), "image agent {image_release}, OS release {booted}");
        drop(launcher);
        assert_eq!(store.current().expect("current"), Some(3), "the store is left as it is");
    }
}
