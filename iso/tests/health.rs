//! The health gate against real sockets and files, and its decisions.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, SystemTime};

use sitecast_iso::AbState;
use sitecast_iso::Slot;
use sitecast_iso::health::*;

struct Hangs;

impl HealthCheck for Hangs {
    fn name(&self) -> &str {
        "hangs"
    }
    fn run(&self) -> Result<(), String> {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(())
    }
}

fn serve_once(status: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut request = [0u8; 256];
            let _ = stream.read(&mut request);
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    addr
}

#[test]
fn checks_pass_fail_and_time_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("agent.pid");
    std::fs::write(&pid_file, std::process::id().to_string()).expect("pid");
    let timeout = Duration::from_millis(500);
    let healthy = HealthGate::new(timeout)
        .with(ApiReachable { addr: serve_once("200 OK"), timeout })
        .with(DiskWritable { dir: dir.path().to_owned() })
        .with(ProcessRunning { label: "agent running".into(), pid_file: pid_file.clone() })
        .with(TimeSynchronized { not_before: SystemTime::UNIX_EPOCH, now: SystemTime::now });
    assert_eq!(healthy.run(), vec![]);

    std::fs::write(&pid_file, "999999999").expect("pid");
    let sick = HealthGate::new(timeout)
        .with(ApiReachable { addr: serve_once("503 Service Unavailable"), timeout })
        .with(DiskWritable { dir: dir.path().join("missing") })
        .with(ProcessRunning { label: "agent running".into(), pid_file })
        .with(TimeSynchronized {
            not_before: SystemTime::now() + Duration::from_secs(86_400),
            now: SystemTime::now,
        })
        .with(Hangs);
    let failures: Vec<String> =
        sick.run().into_iter().map(|f| format!("{}: {}", f.check, f.reason)).collect();
    assert_eq!(failures.len(), 5, "{failures:#?}");
    assert_eq!(failures[0], "coordinator API reachable: /healthz answered 503");
    assert!(failures[1].starts_with("disk writable:"), "{}", failures[1]);
    assert_eq!(failures[2], "agent running: process 999999999 is not running");
    assert_eq!(failures[3], "time synchronized: system clock is before the release was created");
    assert_eq!(failures[4], "hangs: no answer within 500ms");
}

#[test]
fn decisions_follow_the_boot_outcome() {
    let failure = || vec![CheckFailure { check: "disk".into(), reason: "full".into() }];
    let trial =
        AbState { active: Slot::A, next: Some(Slot::B), tries: 1, good: false, fallback: None };

    let mut state = trial;
    assert_eq!(decide(&mut state, Slot::B, vec![]), GateDecision::MarkedGood { slot: Slot::B });
    assert_eq!((state.active, state.next, state.good), (Slot::B, None, true));

    let mut state = trial;
    assert_eq!(
        decide(&mut state, Slot::B, failure()),
        GateDecision::RetryBoot { tries_left: 1, failures: failure() }
    );
    assert_eq!(state, trial, "a failed gate writes nothing: GRUB counts");

    let mut state = AbState { tries: 0, ..trial };
    assert_eq!(
        decide(&mut state, Slot::B, failure()),
        GateDecision::FallBack { failures: failure() }
    );

    let mut state = AbState { next: None, fallback: Some(Slot::B), ..trial };
    assert_eq!(decide(&mut state, Slot::A, vec![]), GateDecision::RolledBack { failed: Slot::B });
    assert_eq!(state.fallback, None);

    let mut state = AbState::default();
    assert_eq!(decide(&mut state, Slot::A, failure()), GateDecision::NotOnTrial);
}

#[test]
fn an_update_that_lost_the_coordinator_for_an_hour_reverts() {
    let booted = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let later = |s| booted + Duration::from_secs(s);
    assert!(!should_revert_for_connectivity(booted, None, later(3600)));
    assert!(should_revert_for_connectivity(booted, None, later(3601)));
    assert!(should_revert_for_connectivity(
        booted,
        Some(booted - Duration::from_secs(5)),
        later(7200)
    ));
    assert!(!should_revert_for_connectivity(booted, Some(later(10)), later(7200)));

    let mut state = AbState { active: Slot::B, ..AbState::default() };
    state.revert();
    assert_eq!((state.active, state.fallback), (Slot::A, Some(Slot::B)));
}
