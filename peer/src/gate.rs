//! The health gate the agent runs on a trial boot: the built-in checks of
//! [`sitecast_iso::health`] and then the release's own command (`health_command`).
//!
//! The command bounds itself: it is killed at its time limit, so the reason for a hung check
//! is the command's own (its output so far), not the gate's generic "no answer".

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use sitecast_iso::health::{CheckFailure, HealthCheck, HealthGate};

/// How much of the command's output a failure keeps: its end, where the reason usually is.
pub const OUTPUT_TAIL: usize = 300;
/// How long the output may still take to arrive once the command has exited or was killed
/// (a descendant that left the command's process group may hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// How long a killed command may take to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(2);

/// The checks of a trial boot and their names, for the log.
pub struct TrialGate {
    builtin: HealthGate,
    names: Vec<String>,
    command: Option<CommandCheck>,
}

impl std::fmt::Debug for TrialGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrialGate").field("checks", &self.names).finish()
    }
}

impl TrialGate {
    /// No checks yet; each built-in check gets `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { builtin: HealthGate::new(timeout), names: Vec::new(), command: None }
    }

    /// Adds a built-in check.
    pub fn with(mut self, check: impl HealthCheck + 'static) -> Self {
        self.names.push(check.name().to_owned());
        self.builtin = self.builtin.with(check);
        self
    }

    /// Adds the release's command as the last check.
    pub fn with_command(mut self, command: CommandCheck) -> Self {
        self.names.push(command.name().to_owned());
        self.command = Some(command);
        self
    }

    /// The checks that run, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Runs every check, blocking (call it off the async runtime); returns all failures
    /// (empty: healthy).
    pub fn run(&self) -> Vec<CheckFailure> {
        let mut failures = self.builtin.run();
        if let Some(command) = &self.command
            && let Err(reason) = command.run()
        {
            failures.push(CheckFailure { check: command.name().to_owned(), reason });
        }
        failures
    }
}

/// A command that must exit 0 within `timeout`.
#[derive(Debug, Clone)]
pub struct CommandCheck {
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandCheck {
    /// `argv`: the program and its arguments (no shell); `None` if empty.
    pub fn new(argv: Vec<String>, timeout: Duration) -> Option<Self> {
        (!argv.is_empty()).then_some(Self { argv, timeout })
    }

    fn shown(&self) -> String {
        format!("`{}`", self.argv.join(" "))
    }
}

impl HealthCheck for CommandCheck {
    fn name(&self) -> &str {
        "health command"
    }

    fn run(&self) -> Result<(), String> {
        let (program, args) = self.argv.split_first().expect("CommandCheck::new refuses empty");
        let deadline = Instant::now() + self.timeout;
        let (output, writer) = std::io::pipe()
            .map_err(|e| format!("{}: no pipe for its output: {e}", self.shown()))?;
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null());
        let spawned = writer.try_clone().and_then(|copy| {
            command.stdout(copy).stderr(writer);
            // Its own process group, so a timeout kills whatever it started too.
            #[cfg(unix)]
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            command.spawn()
        });
        // The command holds the pipe's other copies: dropped, the output ends when the
        // process (and what it started) exits.
        drop(command);
        let mut child =
            spawned.map_err(|e| format!("{} could not be started: {e}", self.shown()))?;
        let tail = Arc::new(Mutex::new(Tail::default()));
        let (ended, output_ended) = mpsc::sync_channel(1);
        let reader_tail = Arc::clone(&tail);
        std::thread::spawn(move || {
            read_tail(output, &reader_tail);
            let _ = ended.send(());
        });
        let outcome = wait_until(&mut child, deadline);
        if let Outcome::TimedOut = outcome {
            kill_group(&mut child);
        }
        let _ = output_ended.recv_timeout(OUTPUT_GRACE);
        let output = tail.lock().unwrap_or_else(|p| p.into_inner()).text();
        match outcome {
            Outcome::Exited(status) if status.success() => Ok(()),
            Outcome::Exited(status) => Err(format!("{} failed ({status}): {output}", self.shown())),
            Outcome::TimedOut => Err(format!(
                "{} did not finish within {:?} and was killed: {output}",
                self.shown(),
                self.timeout
            )),
            Outcome::WaitFailed(error) => {
                kill_group(&mut child);
                Err(format!("{}: waiting for it failed: {error}: {output}", self.shown()))
            }
        }
    }
}

enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    WaitFailed(std::io::Error),
}

/// Waits for `child` until `deadline`. std has no wait with a time limit, so it looks at the
/// child every few milliseconds (a health check runs for seconds at most, once per boot).
fn wait_until(child: &mut Child, deadline: Instant) -> Outcome {
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Outcome::Exited(status),
            Ok(None) => {}
            Err(error) => return Outcome::WaitFailed(error),
        }
        let now = Instant::now();
        if now >= deadline {
            return Outcome::TimedOut;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Kills the command's process group (what it started with it), then the command, and reaps
/// it if that happens soon.
fn kill_group(child: &mut Child) {
    signal_group(child.id());
    let _ = child.kill();
    let _ = wait_until(child, Instant::now() + REAP_GRACE);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn signal_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) only sends a signal; it touches no memory of this process. The
        // group is the child's own (`process_group(0)`), and the child is not reaped yet, so
        // its id (the group's) cannot have been reused.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// Without libc only the command itself is killed (`Child::kill`).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn signal_group(_pid: u32) {}

/// The last [`OUTPUT_TAIL`] bytes of the output.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    cut: bool,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > OUTPUT_TAIL {
            self.bytes.drain(..self.bytes.len() - OUTPUT_TAIL);
            self.cut = true;
        }
    }

    /// Lossy UTF-8, trimmed; a character cut in two at the start is left out.
    fn text(&self) -> String {
        let start = if self.cut {
            self.bytes.iter().take(3).take_while(|&&b| b & 0xC0 == 0x80).count()
        } else {
            0
        };
        let text = String::from_utf8_lossy(&self.bytes[start..]);
        match (text.trim(), self.cut) {
            ("", _) => "no output".to_owned(),
            (text, true) => format!("…{text}"),
            (text, false) => text.to_owned(),
        }
    }
}

fn read_tail(mut output: std::io::PipeReader, tail: &Mutex<Tail>) {
    let mut buffer = [0u8; 4096];
    loop {
        match output.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => tail.lock().unwrap_or_else(|p| p.into_inner()).push(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> CommandCheck {
        CommandCheck::new(vec!["sh".into(), "-c".into(), script.into()], timeout).expect("argv")
    }

    #[test]
    fn the_tail_keeps_the_end_and_drops_a_cut_character() {
        let mut tail = Tail::default();
        tail.push(b"  \n");
        assert_eq!(tail.text(), "no output");
        tail.push("é".repeat(OUTPUT_TAIL).as_bytes());
        tail.push(b"the end\n");
        let text = tail.text();
        assert!(text.starts_with('…') && text.ends_with("the end"), "{text}");
        assert!(!text.contains('\u{FFFD}'), "a character cut in two shows as garbage: {text}");
        assert!(text.len() <= OUTPUT_TAIL + '…'.len_utf8());
    }

    #[test]
    fn an_empty_command_is_no_check() {
        assert!(CommandCheck::new(Vec::new(), Duration::from_secs(1)).is_none());
    }

    /// A gate of the command alone.
    fn gate(command: CommandCheck) -> TrialGate {
        TrialGate::new(Duration::from_secs(60)).with_command(command)
    }

    #[test]
    fn a_command_that_exits_0_passes() {
        let gate = gate(sh("echo all fine; echo >&2 still fine", Duration::from_secs(60)));
        assert_eq!(gate.names(), ["health command"]);
        assert_eq!(gate.run(), []);
    }

    #[test]
    fn a_command_that_fails_fails_the_gate_with_its_status_and_output() {
        let script = "echo checking the till service; echo >&2 till service is down; exit 1";
        let failures = gate(sh(script, Duration::from_secs(60))).run();
        let [failure] = &failures[..] else { panic!("{failures:?}") };
        assert_eq!(failure.check, "health command");
        let reason = &failure.reason;
        assert!(reason.starts_with("`sh -c echo checking"), "names the command: {reason}");
        assert!(reason.contains("exit status: 1"), "{reason}");
        assert!(
            reason.ends_with("checking the till service\ntill service is down"),
            "stdout and stderr, in order: {reason}"
        );

        // Only the end of a long output, and a death by a signal.
        let script = "i=0; while [ $i -lt 100 ]; do echo line $i; i=$((i+1)); done; kill -TERM $$";
        let failures = gate(sh(script, Duration::from_secs(60))).run();
        let reason = &failures[0].reason;
        assert!(reason.contains("signal: 15"), "{reason}");
        assert!(reason.ends_with("line 99") && !reason.contains("line 9\n"), "{reason}");
        let (_, output) = reason.split_once("(SIGTERM)): ").expect("status, then output");
        assert!(output.starts_with('…') && output.len() <= OUTPUT_TAIL + '…'.len_utf8());
    }

    #[test]
    fn a_command_that_cannot_start_fails_the_gate() {
        let missing = "/nonexistent/sitecast-health-check";
        let check = CommandCheck::new(vec![missing.into()], Duration::from_secs(60)).expect("argv");
        let failures = gate(check).run();
        let reason = &failures[0].reason;
        assert!(reason.contains(missing) && reason.contains("could not be started"), "{reason}");
    }

    /// Whether process `pid` still runs (a zombie does not: it has exited, and whoever
    /// adopted it may not reap it).
    fn running(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.starts_with(" Z")))
    }

    #[test]
    fn a_command_past_its_time_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("sleeper.pid");
        let script = format!(
            "echo waiting for the till service; sleep 600 & echo $! > {}; wait",
            pid_file.display()
        );
        let failures = gate(sh(&script, Duration::from_secs(2))).run();
        let reason = &failures[0].reason;
        assert!(reason.contains("did not finish within 2s and was killed"), "{reason}");
        assert!(reason.ends_with("waiting for the till service"), "{reason}");
        let sleeper = std::fs::read_to_string(&pid_file).expect("the script started its sleeper");
        // Killed with the command; it may take a moment to die.
        let deadline = Instant::now() + Duration::from_secs(60);
        while running(sleeper.trim()) {
            assert!(Instant::now() < deadline, "what the command started still runs");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
