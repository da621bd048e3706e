//! The health gate: after a trial boot, checks decide whether the new slot is kept.
//!
//! On success the slot is marked good (and the counter no longer matters); on failure nothing
//! is written, so the next boot uses up another try and GRUB falls back when they run out. A
//! second rule reverts an update that lost the coordinator for over an hour.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use crate::ab::{AbState, BootOutcome, Slot};

/// One check of the gate. Checks run on their own thread with a timeout, so a hung check
/// fails the gate instead of hanging it.
pub trait HealthCheck: Send + Sync {
    fn name(&self) -> &str;
    fn run(&self) -> Result<(), String>;
}

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    pub check: String,
    pub reason: String,
}

/// The checks and their time limit.
pub struct HealthGate {
    checks: Vec<std::sync::Arc<dyn HealthCheck>>,
    timeout: Duration,
}

impl std::fmt::Debug for HealthGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.checks.iter().map(|c| c.name()).collect();
        f.debug_struct("HealthGate")
            .field("checks", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HealthGate {
    pub fn new(timeout: Duration) -> Self {
        Self { checks: Vec::new(), timeout }
    }

    pub fn with(mut self, check: impl HealthCheck + 'static) -> Self {
        self.checks.push(std::sync::Arc::new(check));
        self
    }

    /// Runs every check; returns all failures (empty: healthy).
    pub fn run(&self) -> Vec<CheckFailure> {
        let mut failures = Vec::new();
        for check in &self.checks {
            let (done, result) = mpsc::sync_channel(1);
            let runner = std::sync::Arc::clone(check);
            // A check that never returns leaves its thread behind; the gate still decides.
            std::thread::spawn(move || {
                let _ = done.send(runner.run());
            });
            let outcome = match result.recv_timeout(self.timeout) {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            };
            if let Err(reason) = outcome {
                failures.push(CheckFailure { check: check.name().to_owned(), reason });
            }
        }
        failures
    }
}

/// What the agent does after the gate ran on a boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateDecision {
    /// Not a trial boot: nothing to decide.
    NotOnTrial,
    /// Healthy: `slot` is now the active slot. Report `succeeded`.
    MarkedGood { slot: Slot },
    /// Unhealthy with tries left: reboot to try again (GRUB counts). Report the failures.
    RetryBoot { tries_left: u8, failures: Vec<CheckFailure> },
    /// Unhealthy and no tries left: reboot, GRUB falls back to the old slot.
    FallBack { failures: Vec<CheckFailure> },
    /// GRUB already fell back from `failed`: report `rolled_back`.
    RolledBack { failed: Slot },
}

/// Applies a gate result to the A/B state after booting `booted`. The caller persists `state`.
pub fn decide(state: &mut AbState, booted: Slot, failures: Vec<CheckFailure>) -> GateDecision {
    match state.outcome(booted) {
        BootOutcome::Normal => GateDecision::NotOnTrial,
        BootOutcome::RolledBack { failed } => {
            state.acknowledge_rollback();
            GateDecision::RolledBack { failed }
        }
        BootOutcome::Trial { slot, tries_left } => {
            if failures.is_empty() {
                state.mark_good(slot);
                GateDecision::MarkedGood { slot }
            } else if tries_left > 0 {
                GateDecision::RetryBoot { tries_left, failures }
            } else {
                GateDecision::FallBack { failures }
            }
        }
    }
}

/// Revert an update that has not reached the coordinator for this long since it booted.
pub const CONNECTIVITY_GRACE: Duration = Duration::from_secs(3600);

/// The connectivity rule, on explicit times: `booted_at` is when the updated slot first booted,
/// `last_contact` the last successful coordinator contact (if any since then).
pub fn should_revert_for_connectivity(
    booted_at: SystemTime,
    last_contact: Option<SystemTime>,
    now: SystemTime,
) -> bool {
    let confirmed = last_contact.is_some_and(|contact| contact >= booted_at);
    !confirmed && now.duration_since(booted_at).is_ok_and(|since| since > CONNECTIVITY_GRACE)
}

/// The coordinator's `/healthz` answers 200 over HTTP (also proves the network is up).
#[derive(Debug, Clone)]
pub struct ApiReachable {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

impl HealthCheck for ApiReachable {
    fn name(&self) -> &str {
        "coordinator API reachable"
    }

    fn run(&self) -> Result<(), String> {
        let mut stream =
            TcpStream::connect_timeout(&self.addr, self.timeout).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        let request = format!("GET /healthz HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status).map_err(|e| e.to_string())?;
        match &status[9..12] {
            b"200" => Ok(()),
            other => Err(format!("/healthz answered {}", String::from_utf8_lossy(other))),
        }
    }
}

/// The disk holding the agent's state accepts a durable write.
#[derive(Debug, Clone)]
pub struct DiskWritable {
    pub dir: PathBuf,
}

impl HealthCheck for DiskWritable {
    fn name(&self) -> &str {
        "disk writable"
    }

    fn run(&self) -> Result<(), String> {
        let path = self.dir.join(".sitecast-health-probe");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(b"ok")?;
            file.sync_all()?;
            std::fs::remove_file(&path)
        };
        write().map_err(|e| format!("{}: {e}", self.dir.display()))
    }
}

/// The clock is plausible: not before a time known to have passed (e.g. the manifest's
/// `created`), which catches an RTC reset to 1970 before TLS and expiry checks go wrong.
#[derive(Debug, Clone)]
pub struct TimeSynchronized {
    pub not_before: SystemTime,
    pub now: fn() -> SystemTime,
}

impl HealthCheck for TimeSynchronized {
    fn name(&self) -> &str {
        "time synchronized"
    }

    fn run(&self) -> Result<(), String> {
        if (self.now)() >= self.not_before {
            Ok(())
        } else {
            Err("system clock is before the release was created".into())
        }
    }
}

/// A process (the agent itself, after a reboot) is running: its pid file names a live pid.
#[derive(Debug, Clone)]
pub struct ProcessRunning {
    pub label: String,
    pub pid_file: PathBuf,
}

impl HealthCheck for ProcessRunning {
    fn name(&self) -> &str {
        &self.label
    }

    fn run(&self) -> Result<(), String> {
        let text = std::fs::read_to_string(&self.pid_file)
            .map_err(|e| format!("{}: {e}", self.pid_file.display()))?;
        let pid: u32 = text.trim().parse().map_err(|_| format!("bad pid file {text:?}"))?;
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            Ok(())
        } else {
            Err(format!("process {pid} is not running"))
        }
    }
}
