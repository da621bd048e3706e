//! A configuration file written for a newer agent (keys this agent does not know, at the top
//! level and in a table of their own) is what an appliance holds after rolling back to an older
//! release: the agent runs, checks in, reports and obeys its local commands all the same, shows
//! the keys in `status`, and only the strict `config check` refuses the file.

mod common;

use std::time::{Duration, Instant};

use common::*;

const NEWER_KEYS: &str =
    "future_option = 1\n\n[future_table]\nmode = \"fast\"\nlimits = { deeper = true }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_newer_agent_leave_the_appliance_manageable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (_, image) = origin.publish(2, 2 * 1024 * 1024 + 77).await;
    let mut agent =
        AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", image.size + 8192);
    let socket = agent.dir.join("state/control.sock");
    agent.configure(&format!("control_socket = \"{}\"\n{NEWER_KEYS}", socket.display()));
    // As from the factory: release 1 in slot A, so there is a release to roll back to.
    std::fs::create_dir_all(agent.dir.join("state")).expect("state dir");
    std::fs::write(agent.dir.join("state/agent.json"), r#"{"slot_versions":{"A":1}}"#)
        .expect("state");

    // The strict check names each unknown key and fails.
    let (code, _, stderr) = agent.cli(&["config", "check"]);
    assert_ne!(code, 0, "{stderr}");
    for key in ["future_option", "future_table"] {
        assert!(stderr.contains(&format!("unknown key `{key}`")), "{key} not named:\n{stderr}");
    }

    agent.start();
    let deadline = Instant::now() + Duration::from_secs(90);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    assert!(
        agent.log().contains("configuration keys this agent does not know are ignored"),
        "no warning at start:\n{}",
        agent.log()
    );
    let (code, json, stderr) = agent.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&json).expect("status json");
    assert_eq!(status["config_unknown_keys"], serde_json::json!(["future_option", "future_table"]));
    let (code, text, stderr) = agent.cli(&["status"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("future_option, future_table"), "{text}");

    // It downloads and reports; told to skip the window, it reboots into the release.
    origin.rollout(2).await;
    wait_state(&origin, &["a1"], "ready", deadline).await;
    let (code, text, stderr) = agent.cli(&["skip-window"]);
    assert_eq!(code, 0, "{text}{stderr}");
    wait_reboot(&mut agent, deadline).await;
    agent.start();
    wait_state(&origin, &["a1"], "succeeded", deadline).await;

    // The operator rolls back by hand: the command reaches the agent, which reboots.
    let (code, text, stderr) = agent.cli(&["rollback"]);
    assert_eq!(code, 0, "{text}{stderr}\n{}", agent.log());
    assert!(text.contains("slot A (release 1) is active"), "{text}");
    wait_reboot(&mut agent, deadline).await;
}

#[test]
fn a_file_this_agent_fully_understands_checks_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "site = \"store-9\"\ncheckin_interval_secs = 30\n").expect("write");
    let output = std::process::Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .expect("sitecast-peer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");

    // A typo is caught, and so is a setting that does not validate.
    std::fs::write(&path, "sight = \"store-9\"\nboot_tries = 0\n").expect("write");
    let output = std::process::Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .expect("sitecast-peer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("unknown key `sight`") && stderr.contains("boot_tries"), "{stderr}");
}
