//! Report sequence numbers, read from the reports a real agent sends through a recording relay
//! to a real coordinator: every report is numbered, numbers only go up across restarts, a
//! number is never reused after a crash (it is saved before the report leaves), and an agent
//! whose count fell behind the coordinator's continues above it.

mod common;

use std::time::{Duration, Instant};

use common::*;

const REPORT: &str = "/api/appliances/report";
const CHECKIN: &str = "/api/appliances/checkin";

fn seqs(reports: &[Recorded]) -> Vec<u64> {
    reports
        .iter()
        .map(|r| r.json()["seq"].as_u64().unwrap_or_else(|| panic!("a report without seq: {r:?}")))
        .collect()
}

async fn wait_reports(
    relay: &RecordingRelay,
    count: usize,
    agent: &AgentProcess,
    deadline: Instant,
) {
    while relay.requests(REPORT).len() < count {
        assert!(Instant::now() < deadline, "fewer than {count} reports:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent through `relay`, enrolled, with release 2 rolled out to it.
async fn agent_with_an_update(
    dir: &std::path::Path,
    origin: &Origin,
    relay: &RecordingRelay,
) -> AgentProcess {
    let (_, image) = origin.publish(2, 2 * 1024 * 1024 + 5).await;
    let mut agent = AgentProcess::new(&dir.join("a1"), origin, "store-1", "a1", image.size);
    agent.set_coordinator(&relay.url);
    agent.configure(&format!(
        "control_socket = \"{}\"\n",
        agent.dir.join("state/control.sock").display()
    ));
    agent.start();
    wait_enrolled(origin, 1, Instant::now() + Duration::from_secs(60), &agent).await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_numbers_go_up_and_a_crash_never_reuses_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let relay = RecordingRelay::start(&origin.url).await;
    let mut agent = agent_with_an_update(dir.path(), &origin, &relay).await;
    let deadline = Instant::now() + Duration::from_secs(90);

    // The first report ("downloading") never reaches the coordinator, and the agent is killed
    // while it waits for the answer.
    relay.hold(REPORT);
    origin.rollout(2).await;
    wait_reports(&relay, 1, &agent, deadline).await;
    agent.kill();
    relay.release();
    let lost = seqs(&relay.requests(REPORT))[0];

    // Restarted, it resumes the download and reports under a new number.
    agent.start();
    wait_state(&origin, &["a1"], "ready", deadline).await;
    let (code, text, stderr) = agent.cli(&["skip-window"]);
    assert_eq!(code, 0, "{text}{stderr}");
    wait_reboot(&mut agent, deadline).await;
    agent.start();
    wait_state(&origin, &["a1"], "succeeded", deadline).await;

    let reports = relay.requests(REPORT);
    let numbers = seqs(&reports);
    assert!(numbers[1] > lost, "number {lost} used again after the crash: {numbers:?}");
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "not increasing: {numbers:?}");
    let states: Vec<String> =
        reports.iter().map(|r| r.json()["state"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(
        states,
        ["downloading", "downloading", "ready", "rebooting", "succeeded"],
        "{numbers:?}"
    );
    assert_eq!(agent.state_file()["report_seq"], *numbers.last().expect("reports"));
}

/// Relies on the coordinator refusing stale numbers (409 `stale_report`) and saying the last
/// number it accepted (`report_seq`) in check-in answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_count_fell_behind_continues_above_the_coordinators() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let relay = RecordingRelay::start(&origin.url).await;
    let mut agent = agent_with_an_update(dir.path(), &origin, &relay).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    origin.rollout(2).await;
    wait_state(&origin, &["a1"], "ready", deadline).await;
    let (code, text, stderr) = agent.cli(&["skip-window"]);
    assert_eq!(code, 0, "{text}{stderr}");
    wait_reboot(&mut agent, deadline).await;
    let accepted = *seqs(&relay.requests(REPORT)).last().expect("reports");

    // The state comes back from an old copy: its count starts again at zero. After the reboot
    // the agent reports success before it checks in: that number is refused as stale, the
    // agent learns the coordinator's from a check-in and sends the report again above it.
    agent.edit_state(|state| state["report_seq"] = 0.into());
    let before = relay.all().len();
    agent.start();
    wait_state(&origin, &["a1"], "succeeded", deadline).await;
    let after: Vec<Recorded> = relay.all()[before..].to_vec();
    let first_report = after.iter().position(|r| r.path == REPORT).expect("a report");
    let retried = first_report
        + 1
        + after[first_report + 1..].iter().position(|r| r.path == REPORT).expect("a retry");
    assert_eq!(seqs(&after[first_report..=first_report]), [1], "the stale number");
    assert!(
        after[first_report + 1..retried].iter().any(|r| r.path == CHECKIN),
        "no check-in between the refused report and its retry: {after:?}"
    );
    assert_eq!(seqs(&after[retried..=retried]), [accepted + 1], "the retry's number");

    // Lost again: a check-in alone brings the count up, before any report.
    agent.kill();
    agent.edit_state(|state| state["report_seq"] = 0.into());
    agent.start();
    loop {
        let status = agent.status().await.unwrap_or_default();
        if status["report_seq"].as_u64().unwrap_or(0) > accepted {
            break;
        }
        assert!(Instant::now() < deadline, "the count never came back:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
