//! The enrollment token is a fleet-wide secret: the agent sends it until a check-in has
//! succeeded, remembers that across restarts, and sends it again only when the coordinator
//! says it does not know the appliance (an operator removed it). What the agent sent is read by
//! a recording relay in front of a real coordinator.

mod common;

use std::time::{Duration, Instant};

use common::*;

const CHECKIN: &str = "/api/appliances/checkin";

/// Whether each check-in recorded from index `from` on carried the token.
fn tokens(relay: &RecordingRelay, from: usize) -> Vec<bool> {
    relay.requests(CHECKIN)[from..]
        .iter()
        .map(|checkin| match checkin.json()["enrollment_token"].as_str() {
            Some(token) => {
                assert_eq!(token, ENROLL);
                true
            }
            None => false,
        })
        .collect()
}

async fn wait_checkins(
    relay: &RecordingRelay,
    count: usize,
    agent: &AgentProcess,
    deadline: Instant,
) {
    while relay.requests(CHECKIN).len() < count {
        assert!(Instant::now() < deadline, "fewer than {count} check-ins:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_out_until_the_coordinator_knows_the_appliance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = Origin::start(&dir.path().join("fleet")).await;
    let relay = RecordingRelay::start(&fleet.url).await;
    let mut agent = AgentProcess::new(&dir.path().join("a1"), &fleet, "store-1", "a1", 4096);
    agent.set_coordinator(&relay.url);
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(60);

    // The first check-in enrolls the appliance; none after it carries the token.
    wait_checkins(&relay, 3, &agent, deadline).await;
    assert_eq!(appliances(&fleet).await.len(), 1);
    assert_eq!(tokens(&relay, 0)[..3], [true, false, false], "{:?}", relay.requests(CHECKIN));

    // Remembered across a restart.
    agent.kill();
    let before = relay.requests(CHECKIN).len();
    agent.start();
    wait_checkins(&relay, before + 2, &agent, deadline).await;
    assert!(tokens(&relay, before).iter().all(|sent| !sent), "the token went out after a restart");

    // The operator removes the appliance. Refused without the token, the agent asks again
    // with it at once, and stops sending it once enrolled again.
    let key = agent.status().await.expect("status")["appliance"].as_str().expect("key").to_owned();
    let before = relay.requests(CHECKIN).len();
    fleet.remove_appliance(&key).await;
    let enrolled_at = loop {
        let sent = tokens(&relay, before);
        if let Some(at) = sent.iter().position(|sent| *sent) {
            break before + at;
        }
        assert!(Instant::now() < deadline, "never sent the token again:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_checkins(&relay, enrolled_at + 3, &agent, deadline).await;
    let after_removal = tokens(&relay, before);
    // The check-in just before it went out without the token and was refused. (It may have
    // been recorded just before `before`: the relay records a request before it reaches the
    // coordinator, so one sent then can arrive after the removal.)
    assert!(
        !tokens(&relay, 0)[enrolled_at - 1],
        "the token went out before the coordinator asked for it: {after_removal:?}"
    );
    assert_eq!(
        tokens(&relay, enrolled_at)[..3],
        [true, false, false],
        "after the removal: {after_removal:?}"
    );
    assert!(
        appliances(&fleet).await.iter().any(|a| a["name"] == "a1"),
        "not enrolled again: {:?}",
        appliances(&fleet).await
    );
    assert!(agent.log().contains("enrolling again"), "{}", agent.log());
}
