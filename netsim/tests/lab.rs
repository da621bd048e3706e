//! The namespace lab (root): a site of real processes in network namespaces with shaped links
//! and mDNS discovery updates intact with about one origin copy, and the lab removes what it
//! created, also when interrupted.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sitecast-netsim");

/// Not root: say so loudly (the lab runs in CI, where it is root).
fn root_or_loud_skip(test: &str) -> bool {
    if sitecast_netsim::lab::is_root() {
        return true;
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !! SKIPPED {test}: the namespace lab needs root (ip netns, tc).\n\
         !! Run the tests as root to exercise it; CI does.\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    false
}

fn lab_namespaces(pid: u32) -> Vec<String> {
    let output = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let prefix = format!("{}{pid}-", sitecast_netsim::lab::PREFIX);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Runs the lab with `args` in `dir`: its JSON summary, what it printed (for failures) and
/// its process id.
fn run_lab(args: &[&str], dir: &std::path::Path) -> (serde_json::Value, String, u32) {
    let child = Command::new(BIN)
        .arg("lab")
        .args(args)
        .args(["--time-limit-secs", "240", "--work-dir"])
        .arg(dir.join("lab"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the lab");
    let pid = child.id();
    let output = child.wait_with_output().expect("lab");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!("stdout:\n{stdout}\nstderr (tail):\n{}", tail(&stderr));
    assert!(output.status.success(), "the lab failed\n{context}");
    let last = stdout.lines().last().unwrap_or("");
    let summary: serde_json::Value = serde_json::from_str(last).expect("a JSON last line");
    (summary, context, pid)
}

#[test]
fn four_appliances_in_namespaces_update_with_one_origin_copy() {
    if !root_or_loud_skip("four_appliances_in_namespaces_update_with_one_origin_copy") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--appliances", "4", "--image-mib", "16", "--wan-mbit", "50", "--lan-mbit", "500"];
    let (summary, context, pid) = run_lab(&[&args[..], &["--seed", "3"]].concat(), dir.path());
    assert_eq!(summary["appliances"], 4, "{context}");
    assert_eq!(summary["intact"], true, "{context}");
    let ratio = summary["origin_bytes"].as_f64().expect("origin_bytes")
        / summary["image_bytes"].as_f64().expect("image_bytes");
    assert!(ratio <= 1.1, "the origin sent {ratio:.3} copies\n{context}");
    // Coordinator peers are off in the lab: every connection came from mDNS.
    assert_eq!(summary["connected_min"], 3, "every appliance connected to its 3 peers\n{context}");
    assert!(summary["found_by_mdns"].as_u64() >= Some(3), "mDNS found too few\n{context}");
    assert!(
        summary["seconds"].as_f64().expect("seconds")
            >= summary["bound_seconds"].as_f64().expect("bound")
    );
    assert!(lab_namespaces(pid).is_empty(), "namespaces left behind: {:?}", lab_namespaces(pid));
}

#[test]
fn a_site_on_older_releases_in_namespaces_fetches_what_none_holds_about_once() {
    if !root_or_loud_skip(
        "a_site_on_older_releases_in_namespaces_fetches_what_none_holds_about_once",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--appliances", "4", "--image-mib", "16", "--wan-mbit", "50", "--lan-mbit", "500"];
    let delta = ["--seed", "5", "--older-releases", "2", "--changed-percent", "5"];
    let (summary, context, _) = run_lab(&[&args[..], &delta].concat(), dir.path());
    let number = |key: &str| summary[key].as_f64().unwrap_or_else(|| panic!("{key}\n{context}"));
    assert_eq!(summary["intact"], true, "{context}");
    // Each appliance copied most of the image from its slot (two older releases, each lacking
    // 5 % more): the origin sent what none held, and the index and group hashes, about once.
    let (transfer, side) = (number("transfer_bytes"), number("side_bytes"));
    assert!(transfer > 0.0 && transfer < 0.1 * number("image_bytes"), "{context}");
    assert!(side > 0.0, "the release signs an index\n{context}");
    let ratio = number("origin_bytes") / (transfer + side);
    assert!((1.0..=1.1).contains(&ratio), "origin sent {ratio:.3} × what none held\n{context}");
}

#[test]
fn an_interrupted_lab_removes_its_namespaces_and_processes() {
    if !root_or_loud_skip("an_interrupted_lab_removes_its_namespaces_and_processes") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Slow enough that it is still running when interrupted.
    let mut child = Command::new(BIN)
        .args(["lab", "--appliances", "2", "--image-mib", "64", "--wan-mbit", "5"])
        .args(["--time-limit-secs", "240", "--work-dir"])
        .arg(dir.path().join("lab"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the lab");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab_namespaces(pid).len() < 4 {
        assert!(Instant::now() < deadline, "the lab never built its namespaces");
        assert!(child.try_wait().expect("wait").is_none(), "the lab ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Wait for the coordinator and an agent to run inside the lab.
    let processes_in = |ns: &str| -> Vec<String> {
        let output = Command::new("ip").args(["netns", "pids", ns]).output().expect("pids");
        String::from_utf8_lossy(&output.stdout).split_whitespace().map(str::to_owned).collect()
    };
    let (origin, appliance) = (
        format!("{}{pid}-o", sitecast_netsim::lab::PREFIX),
        format!("{}{pid}-a1", sitecast_netsim::lab::PREFIX),
    );
    let running = loop {
        let running: Vec<String> =
            processes_in(&origin).into_iter().chain(processes_in(&appliance)).collect();
        if !processes_in(&origin).is_empty() && !processes_in(&appliance).is_empty() {
            break running;
        }
        assert!(Instant::now() < deadline, "no coordinator and agent in the lab");
        std::thread::sleep(Duration::from_millis(100));
    };
    Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("kill -INT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "interrupted");
    assert!(lab_namespaces(pid).is_empty(), "namespaces left behind: {:?}", lab_namespaces(pid));
    // Nothing of the lab runs any more (a killed process may linger as a zombie until its
    // new parent reaps it: that is not running).
    let running_now = |pid: &String| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
            status.lines().any(|l| l.starts_with("State:") && !l.contains("Z (zombie)"))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let alive: Vec<&String> = running.iter().filter(|p| running_now(p)).collect();
    assert!(alive.is_empty(), "processes of the lab still running: {alive:?}");
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
