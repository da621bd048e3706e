//! The real `sitecast-peer` binary against a real coordinator on loopback, with file-backed
//! slots and simulated boots (the agent applies GRUB's rules itself at start).

mod common;

use std::time::{Duration, Instant};

use common::*;
use sitecast_iso::ab::load_state;
use sitecast_iso::{EnvFile, Slot};

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
    wait_enrolled(&origin, 1, deadline, &agent).await;
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

/// The release the system says it runs (`release_file`) is what the first check-in reports:
/// on a fresh appliance, and over a different record of the agent's; without a readable file
/// the agent carries on with what it knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_checkin_reports_the_release_the_system_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    origin.publish(3, 64 * 1024).await;
    let relay = RecordingRelay::start(&origin.url).await;
    let agent = |name: &str, release: &str| {
        let mut agent =
            AgentProcess::new(&dir.path().join(name), &origin, &format!("site-{name}"), name, 8192);
        agent.set_coordinator(&relay.url);
        let file = agent.dir.join("sitecast-release");
        agent.configure(&format!("release_file = \"{}\"\n", file.display()));
        if !release.is_empty() {
            std::fs::write(&file, release).expect("release file");
        }
        agent
    };
    let mut fresh = agent("fresh", "VERSION_ID=2\n");
    let mut recorded = agent("recorded", "PRETTY_NAME=\"Till 3\"\nVERSION_ID=\"3\"\nKERNEL=6.1\n");
    std::fs::create_dir_all(recorded.dir.join("state")).expect("state dir");
    std::fs::write(recorded.dir.join("state/agent.json"), r#"{"slot_versions":{"A":1}}"#)
        .expect("state");
    let mut missing = agent("missing", "");
    for agent in [&mut fresh, &mut recorded, &mut missing] {
        agent.start();
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let first_checkin = |name: &str| {
        let checkins = relay.requests("/api/appliances/checkin");
        checkins.iter().map(|c| c.json()).find(|c| c["name"] == name)
    };
    for (agent, version) in [(&fresh, 2), (&recorded, 3), (&missing, 0)] {
        let checkin = loop {
            if let Some(checkin) = first_checkin(&agent.name) {
                break checkin;
            }
            assert!(Instant::now() < deadline, "no check-in:\n{}", agent.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(checkin["installed_version"], version, "{}:\n{}", agent.name, agent.log());
        if version != 0 {
            // Recorded before the check-in went out.
            assert_eq!(agent.state_file()["slot_versions"]["A"], version, "{}", agent.name);
        }
    }
    wait_enrolled(&origin, 3, deadline, &missing).await;
    let list = appliances(&origin).await;
    for (name, version) in [("fresh", 2), ("recorded", 3), ("missing", 0)] {
        let appliance = list.iter().find(|a| a["name"] == name).expect("listed");
        assert_eq!(appliance["installed_version"], version, "{appliance}");
    }
    assert!(missing.exited().is_none(), "{}", missing.log());
    assert!(missing.log().contains("the running release is not known"), "{}", missing.log());
    assert!(recorded.log().contains("trusting the system"), "{}", recorded.log());
}

/// An agent restarted while its coordinator is unreachable (a power cut during an outage)
/// still waits for the operator's maintenance window: it must not reboot into the ready
/// update at once because nobody has told it the window since it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_coordinator_still_waits_for_the_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The test coordinator's window never opens.
    let origin = Origin::start(dir.path()).await;
    let (_, image) = origin.publish(2, 1024 * 1024 + 5).await;
    let mut agent =
        AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", image.size + 8192);
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;
    while local_state(&agent).await != "ready" {
        assert!(Instant::now() < deadline, "never ready:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    agent.kill();
    // Nothing listens on port 1.
    agent.set_coordinator("http://127.0.0.1:1");
    agent.start();
    let failed = |log: &str| log.matches("check-in failed").count();
    let before = failed(&agent.log());
    // Three failed check-ins: the agent has been round its loop, window check included, since.
    while failed(&agent.log()) < before + 3 {
        assert!(agent.exited().is_none(), "rebooted outside the window:\n{}", agent.log());
        assert!(Instant::now() < deadline, "no check-ins:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.exited().is_none(), "rebooted outside the window:\n{}", agent.log());
    assert_eq!(local_state(&agent).await, "ready");
}
