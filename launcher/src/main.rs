//! `sitecast-launcher`: starts the current agent version, rolls a failing new one back, and
//! falls back to the image's own agent. Small on purpose, and changed only with the OS image.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use jiff::{SignedDuration, Timestamp};
use sitecast_launcher::{
    Agent, AgentStore, Decision, ExitRecord, Launcher, LauncherState, Policy, StoreError,
};

/// The agent asks for a reboot with this status (see sitecast-peer); the launcher passes it on.
const EXIT_REBOOT: i32 = 75;
/// Lines of an agent's output kept for a rollback record.
const LOG_TAIL_LINES: usize = 20;

#[derive(Parser)]
#[command(
    name = "sitecast-launcher",
    version,
    about = "Starts the sitecast agent; rolls back a failing new version"
)]
struct Cli {
    /// The agent version store (versions, current, previous, confirmed): on the data
    /// partition, beside the agent's state (which a switch never touches).
    #[arg(long, default_value = "/var/lib/sitecast/agents")]
    store: PathBuf,
    /// The agent the OS image ships, run when no version is installed apart from it (or the
    /// installed one is not newer, or does not run on the booted OS release).
    #[arg(long, default_value = "/usr/bin/sitecast-peer")]
    image_agent: PathBuf,
    /// The booted OS release (`VERSION_ID=N`); an agent version that does not run on it is not
    /// started. Missing: not checked.
    #[arg(long, default_value = "/etc/sitecast-release")]
    os_release_file: PathBuf,
    /// A new version must check in successfully within this long.
    #[arg(long, default_value_t = 300)]
    trial_timeout_secs: u64,
    /// Exits within --crash-window-secs that make a crash loop.
    #[arg(long, default_value_t = 3)]
    crash_limit: usize,
    #[arg(long, default_value_t = 600)]
    crash_window_secs: u64,
    /// A confirmed agent that crash-loops makes the launcher ask Central Command for a newer
    /// one (the frozen path) at most this often.
    #[arg(long, default_value_t = 900)]
    fetch_interval_secs: u64,
    /// The root of trust the frozen path verifies agent releases against. By default the one
    /// the agent recorded at its last successful check-in; set it to the image's own file so
    /// that nothing an agent writes changes what the launcher trusts.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Pause before starting the agent again after it exited.
    #[arg(long, default_value_t = 2000)]
    restart_delay_ms: u64,
    /// Write man pages and shell completions into DIR (for packagers).
    #[arg(long, hide = true)]
    generate_docs: Option<PathBuf>,
    /// The agent's arguments (after `--`).
    #[arg(last = true)]
    agent_args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = &cli.generate_docs {
        return match sitecast_cli_docs::write(Cli::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&format!("writing docs: {error}")),
        };
    }
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(error) => fail(&error),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("sitecast-launcher: error: {message}");
    ExitCode::FAILURE
}

fn run(cli: &Cli) -> Result<u8, String> {
    let store = AgentStore::open(&cli.store).map_err(|e| e.to_string())?;
    let policy = Policy {
        trial_timeout: SignedDuration::from_secs(cli.trial_timeout_secs as i64),
        crash_limit: cli.crash_limit.max(1),
        crash_window: SignedDuration::from_secs(cli.crash_window_secs as i64),
        fetch_interval: SignedDuration::from_secs(cli.fetch_interval_secs as i64),
    };
    let rule = Rule::read(cli);
    let state_path = cli.store.join("launcher.json");
    let mut launcher = Launcher::new(policy, load_state(&state_path));
    launcher.started(Timestamp::now());
    // No agent runs yet, so no version is being staged: the one moment pruning is safe.
    match store.prune(Timestamp::now()) {
        Ok(removed) if !removed.is_empty() => eprintln!("sitecast-launcher: removed {removed:?}"),
        Ok(_) => {}
        Err(error) => eprintln!("sitecast-launcher: pruning old versions: {error}"),
    }
    loop {
        let now = Timestamp::now();
        let _ = note_confirmation(&store, &mut launcher);
        let current = rule.current(&store, true).map_err(|e| e.to_string())?;
        let decision = launcher.decide(current, now);
        save_state(&state_path, &launcher.state);
        let agent = match decision {
            Decision::Run(agent) => agent,
            Decision::RollBack { from, to, reason } => {
                eprintln!("sitecast-launcher: agent {from} failed ({reason:?}); back to {to:?}");
                switch_to(&store, to, now).map_err(|e| e.to_string())?;
                write_record(&cli.store, from, to, &reason, now);
                continue;
            }
            Decision::FetchLatest => {
                let above =
                    current.unwrap_or(rule.image_release).max(launcher.state.given_up.unwrap_or(0));
                match sitecast_launcher::frozen::fetch_latest(
                    &store,
                    above,
                    rule.booted_os,
                    cli.root.as_deref(),
                    now,
                ) {
                    Ok(version) => {
                        eprintln!(
                            "sitecast-launcher: the agent keeps crashing; agent {version} fetched from Central Command (frozen path), on trial now"
                        );
                        continue;
                    }
                    Err(error) => {
                        eprintln!(
                            "sitecast-launcher: the agent keeps crashing; frozen path: {error}"
                        );
                        current.map_or(Agent::Image, Agent::Version)
                    }
                }
            }
        };
        match supervise(cli, &store, &rule, &mut launcher, agent, &state_path) {
            Ended::Reboot => return Ok(EXIT_REBOOT as u8),
            Ended::Exited(exit) => {
                launcher.exited(exit);
                save_state(&state_path, &launcher.state);
            }
            Ended::Replaced => {}
        }
        std::thread::sleep(Duration::from_millis(cli.restart_delay_ms));
    }
}

/// Which agent runs after an OS update ([`sitecast_launcher::lifecycle::store_version_runs`]):
/// what the launcher knows of the image's agent and the booted OS release.
struct Rule {
    image_release: u64,
    booted_os: Option<u64>,
}

impl Rule {
    fn read(cli: &Cli) -> Self {
        let booted_os = match sitecast_manifest::release_file::read_version(&cli.os_release_file) {
            Ok(version) => Some(version),
            Err(error) => {
                eprintln!("sitecast-launcher: OS release unknown ({error}); not checked");
                None
            }
        };
        Self { image_release: image_agent_release(&cli.image_agent), booted_os }
    }

    /// The store's current version if it is the one to run, else `None` (the image's agent).
    fn current(&self, store: &AgentStore, say: bool) -> Result<Option<u64>, StoreError> {
        let Some(version) = store.current()? else { return Ok(None) };
        let os = store.os_releases(version);
        let runs = sitecast_launcher::lifecycle::store_version_runs(
            version,
            self.image_release,
            os,
            self.booted_os,
        );
        if !runs && say {
            eprintln!(
                "sitecast-launcher: agent {version} not started: the image's agent is release {}, agent {version} runs on OS releases {os:?}, booted {:?}",
                self.image_release, self.booted_os
            );
        }
        Ok(runs.then_some(version))
    }
}

/// The agent release the image's agent is (`<image agent> agent-release`); 0 if it cannot say
/// (an agent from before agent releases): then any installed version is newer.
fn image_agent_release(image_agent: &Path) -> u64 {
    let output = Command::new(image_agent)
        .arg("agent-release")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    output
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes `to` the agent that runs: the last confirmed version (by a rollback if it is
/// `previous`), or the image's own agent if that version is gone.
fn switch_to(store: &AgentStore, to: Agent, now: Timestamp) -> Result<(), StoreError> {
    match to {
        Agent::Version(version) if store.previous()? == Some(version) => {
            store.roll_back(now).map(drop)
        }
        Agent::Version(version) if store.installed(version) => store.switch(version, now),
        _ => store.use_image(now),
    }
}

/// Reads the agent's confirmation (it may have confirmed and exited between two looks);
/// whether it was news.
fn note_confirmation(store: &AgentStore, launcher: &mut Launcher) -> bool {
    // The file names the version that confirmed, whichever runs now (it may have confirmed
    // just before a switch).
    let news = store.confirmed().filter(|version| launcher.state.confirmed != Some(*version));
    if let Some(version) = news {
        launcher.confirmed(version);
    }
    news.is_some()
}

/// How one run of the agent ended.
enum Ended {
    /// It asked for a reboot (exit 75), and it is a version that has proved itself.
    Reboot,
    /// It exited (or could not be started at all).
    Exited(ExitRecord),
    /// The launcher stopped it: another agent is to run (a rollback, a switch).
    Replaced,
}

/// Runs `agent` until it exits or the lifecycle wants another one.
fn supervise(
    cli: &Cli,
    store: &AgentStore,
    rule: &Rule,
    launcher: &mut Launcher,
    agent: Agent,
    state_path: &Path,
) -> Ended {
    let program = match agent {
        Agent::Version(version) => match store.entry(version) {
            Ok(program) => program,
            Err(error) => return Ended::Exited(failed_to_start(&error.to_string())),
        },
        Agent::Image => cli.image_agent.clone(),
    };
    let mut command = Command::new(&program);
    command.args(&cli.agent_args).stderr(Stdio::piped());
    command.env("SITECAST_AGENT_STORE", &cli.store);
    if let Agent::Version(version) = agent {
        command.env("SITECAST_AGENT_VERSION", version.to_string());
    }
    // A version that cannot even be started (wrong architecture, a noexec mount) counts as
    // an exit like any other, so it is rolled back like any other.
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return Ended::Exited(failed_to_start(&format!("{}: {error}", program.display())));
        }
    };
    let output = forward_stderr(&mut child);
    loop {
        let status = match child.try_wait() {
            Ok(status) => status,
            Err(error) => return Ended::Exited(failed_to_start(&error.to_string())),
        };
        if note_confirmation(store, launcher) {
            save_state(state_path, &launcher.state);
        }
        if let Some(status) = status {
            let proved = match agent {
                Agent::Version(version) => launcher.state.confirmed == Some(version),
                Agent::Image => true,
            };
            // A reboot request is honoured from an agent that has checked in; from one on
            // trial it counts as an exit, or a bad version could reboot-loop the appliance.
            if status.code() == Some(EXIT_REBOOT) && proved {
                return Ended::Reboot;
            }
            return Ended::Exited(exit_record(status, &output));
        }
        // The trial clock runs while the agent runs; a switch of the store shows here too.
        let current = rule.current(store, false).ok().flatten();
        match launcher.clone().decide(current, Timestamp::now()) {
            Decision::Run(next) if next == agent => {}
            // Fetching happens between runs; a running agent is not stopped for it.
            Decision::FetchLatest => {}
            _ => {
                stop(&mut child);
                return Ended::Replaced;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long a replaced agent has to finish what it is writing after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops an agent that is being replaced: SIGTERM, and SIGKILL if it is still there after
/// [`STOP_GRACE`] (every write of the agent survives a kill anyway; this only spares it one).
fn stop(child: &mut Child) {
    if terminate(child) {
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while std::time::Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGTERM to `child`; whether it could.
#[allow(unsafe_code)]
fn terminate(child: &Child) -> bool {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return false };
    // SAFETY: kill(2) only sends a signal; it touches no memory of this process. The child is
    // not reaped yet, so its id cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}

fn failed_to_start(error: &str) -> ExitRecord {
    eprintln!("sitecast-launcher: cannot start the agent: {error}");
    ExitRecord { at: Timestamp::now(), code: None, signal: None, log_tail: error.to_owned() }
}

/// The agent's output: its last lines, and word when its end was read.
struct Output {
    tail: Arc<Mutex<VecDeque<String>>>,
    done: std::sync::mpsc::Receiver<()>,
}

/// Passes the agent's stderr on (to the journal) and keeps its last lines.
fn forward_stderr(child: &mut Child) -> Output {
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let (sender, done) = std::sync::mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        let tail = Arc::clone(&tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == LOG_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            let _ = sender.send(());
        });
    }
    Output { tail, done }
}

fn exit_record(status: ExitStatus, output: &Output) -> ExitRecord {
    use std::os::unix::process::ExitStatusExt;
    // The last lines (the crash) may still be in the pipe; a child the agent left behind
    // could hold it open, so wait a little, not forever.
    let _ = output.done.recv_timeout(Duration::from_secs(2));
    let tail = output.tail.lock().unwrap_or_else(|p| p.into_inner());
    ExitRecord {
        at: Timestamp::now(),
        code: status.code(),
        signal: status.signal(),
        log_tail: tail.iter().cloned().collect::<Vec<_>>().join("\n"),
    }
}

/// The launcher's memory; unreadable (a newer launcher's, or damaged) starts afresh.
fn load_state(path: &Path) -> LauncherState {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            eprintln!("sitecast-launcher: ignoring unreadable {}: {error}", path.display());
            LauncherState::default()
        }),
        Err(_) => LauncherState::default(),
    }
}

fn save_state(path: &Path, state: &LauncherState) {
    let bytes = serde_json::to_vec(state).expect("plain data");
    if let Err(error) = sitecast_launcher::store::write_synced(path, &bytes) {
        eprintln!("sitecast-launcher: saving {}: {error}", path.display());
    }
}

/// `rollback.json` in the store: what the agent reports on its next check-in.
fn write_record(
    store: &Path,
    from: u64,
    to: Agent,
    reason: &sitecast_launcher::RollbackReason,
    now: Timestamp,
) {
    let record = sitecast_launcher::RollbackRecord::new(from, to, reason, now);
    if let Err(error) = record.write(store) {
        eprintln!("sitecast-launcher: writing rollback.json: {error}");
    }
}
