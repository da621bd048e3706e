//! GRUB gives a new slot up, and the agent's report says why: the release's own health
//! command failed (its output in the reason), or no boot of the slot ever reached the agent.
//! The report survives a restart of the agent before the coordinator got it. Real agents
//! against a real coordinator, with file-backed slots and simulated boots; the reports are
//! read from a recording relay in front of the coordinator.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sitecast_iso::ab::{load_state, save_state};
use sitecast_iso::{EnvFile, Slot};

const REPORT: &str = "/api/appliances/report";
const CHECKIN: &str = "/api/appliances/checkin";

/// The reports of `state` the coordinator received, with their error.
fn reports(relay: &RecordingRelay, state: &str) -> Vec<String> {
    relay
        .requests(REPORT)
        .iter()
        .map(Recorded::json)
        .filter(|report| report["state"] == state)
        .map(|report| report["error"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Release 2, downloaded and activated for `boot_tries` trial boots in slot B: the agent
/// has just asked to be rebooted into it. The appliance is pinned to it: unlike a rollout,
/// which pauses when the appliance fails, a pin keeps offering it.
async fn activated(agent: &mut AgentProcess, origin: &Origin, deadline: Instant) {
    agent.start();
    wait_enrolled(origin, 1, deadline, agent).await;
    let status = agent.status().await.expect("status");
    origin.pin(status["appliance"].as_str().expect("key"), 2).await;
    wait_state(origin, &[agent.name.as_str()], "ready", deadline).await;
    let (code, text, stderr) = agent.cli(&["skip-window"]);
    assert_eq!(code, 0, "{text}{stderr}");
    wait_reboot(agent, deadline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_health_command_fails_is_rolled_back_with_the_commands_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (_, image) = origin.publish(2, 2 * 1024 * 1024 + 3).await;
    let relay = RecordingRelay::start(&origin.url).await;
    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", image.size);
    agent.set_coordinator(&relay.url);
    let check = agent.dir.join("health-check");
    std::fs::write(
        &check,
        "#!/bin/sh\necho checking the till service\necho >&2 till service: connection refused\nexit 1\n",
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    agent.configure(&format!(
        "control_socket = \"{}\"\nboot_tries = 2\nhealth_command = [\"{}\"]\n",
        agent.dir.join("state/control.sock").display(),
        check.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(90);
    activated(&mut agent, &origin, deadline).await;

    // Two trial boots of B, each failing the gate, each reported; then GRUB falls back to A.
    for _ in 0..2 {
        agent.start();
        wait_reboot(&mut agent, deadline).await;
    }
    let gate = format!(
        "health gate failed on slot B: health command: `{}` failed (exit status: 1): checking \
         the till service\ntill service: connection refused",
        check.display()
    );
    assert_eq!(reports(&relay, "rebooting"), ["", &gate, &gate], "{}", agent.log());
    agent.start();
    while reports(&relay, "rolled_back").is_empty() {
        assert!(agent.exited().is_none(), "the agent stopped:\n{}", agent.log());
        assert!(Instant::now() < deadline, "no rolled_back report:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reports(&relay, "rolled_back"),
        [format!("slot B used up its tries (last health gate: {gate}); back on A")]
    );
    let (state, _) = load_state(&EnvFile::new(agent.dir.join("grubenv"))).expect("env");
    assert_eq!((state.active, state.next, state.fallback), (Slot::A, None, None));

    // Still offered, the release that failed here is not taken again.
    let checkins = relay.requests(CHECKIN).len();
    while relay.requests(CHECKIN).len() < checkins + 3 {
        assert!(Instant::now() < deadline, "no more check-ins:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = relay.requests(REPORT).last().map(Recorded::json).expect("reports");
    assert_eq!(last["state"], "rolled_back", "{}", agent.log());
    assert_eq!(local_state(&agent).await, "rolled_back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_never_reached_the_agent_is_reported_so_even_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (_, image) = origin.publish(2, 2 * 1024 * 1024 + 3).await;
    let relay = RecordingRelay::start(&origin.url).await;
    let cuttable = CuttableRelay::start(&relay.url, 1 << 30).await;
    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", image.size);
    agent.set_coordinator(&cuttable.url);
    agent.configure(&format!(
        "control_socket = \"{}\"\nboot_tries = 1\n",
        agent.dir.join("state/control.sock").display()
    ));
    let deadline = Instant::now() + Duration::from_secs(90);
    activated(&mut agent, &origin, deadline).await;

    // GRUB boots B, whose kernel never reaches the agent; at the next boot GRUB falls back.
    let mut env = EnvFile::new(agent.dir.join("grubenv"));
    let (mut state, vars) = load_state(&env).expect("env");
    assert_eq!(state.grub_model_boot(), Slot::B);
    save_state(&mut env, &state, vars).expect("env");

    // Back on A, the agent cannot reach the coordinator, and is stopped before it could.
    cuttable.cut();
    let log_before = agent.log().len();
    agent.start();
    while !agent.log()[log_before..].contains("report not delivered") {
        assert!(agent.exited().is_none(), "the agent stopped:\n{}", agent.log());
        assert!(Instant::now() < deadline, "no report tried:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.kill();
    assert!(reports(&relay, "rolled_back").is_empty());

    // Started again with the coordinator back, it reports the rollback and why.
    cuttable.restore();
    agent.start();
    while reports(&relay, "rolled_back").is_empty() {
        assert!(agent.exited().is_none(), "the agent stopped:\n{}", agent.log());
        assert!(Instant::now() < deadline, "no rolled_back report:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reports(&relay, "rolled_back"),
        ["slot B used up its tries without the agent starting on it (kernel or early boot \
          failed); back on A"]
    );
}
