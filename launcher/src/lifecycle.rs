//! What the launcher decides, as plain data with time passed in: which agent runs, when a
//! version on trial has failed and the last confirmed one comes back, and when the frozen path
//! (ask Central Command for the latest agent release) is the only way left.
//!
//! A version is on trial from its switch until it *confirms*: the agent writes its version to
//! the store's `confirmed` file after its first successful check-in. A version on trial that
//! crash-loops or does not confirm in time is rolled back. A version that crash-loops anyway
//! (a confirmed one that now crashes on something new in every check-in answer, or the
//! image's own agent) is what the frozen path is for. The shell persists [`LauncherState`]
//! after every change, so a power cut does not forget a trial or its exits.

use jiff::{SignedDuration, Timestamp};

/// Which agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    /// A version from the store.
    Version(u64),
    /// The agent the OS image ships (no version installed apart from it, or all given up).
    Image,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// A new version must confirm within this long of its first start.
    pub trial_timeout: SignedDuration,
    /// This many exits within `crash_window` are a crash loop.
    pub crash_limit: usize,
    pub crash_window: SignedDuration,
    /// The frozen path is tried at most this often.
    pub fetch_interval: SignedDuration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            trial_timeout: SignedDuration::from_mins(5),
            crash_limit: 3,
            crash_window: SignedDuration::from_mins(10),
            fetch_interval: SignedDuration::from_mins(15),
        }
    }
}

/// How an agent process ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitRecord {
    pub at: Timestamp,
    /// Exit status, or `None` if a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The end of what it wrote, for the operator.
    pub log_tail: String,
}

/// Why a version on trial was given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackReason {
    /// It exited `crash_limit` times within the window.
    CrashLoop { exits: Vec<ExitRecord> },
    /// It ran but never confirmed (no successful check-in).
    NeverConfirmed { waited: SignedDuration },
}

/// The rule between the OS image's own agent and one installed apart from it, after an OS
/// update (or rollback) changed either: the store's current version runs only if it is newer
/// than the image's agent and runs on the booted OS release (when both are known); otherwise
/// the image's agent runs. The store is left as it is, so booting back into an OS release the
/// version runs on finds it again.
pub fn store_version_runs(
    version: u64,
    image_release: u64,
    os_releases: Option<sitecast_manifest::OsReleases>,
    booted_os: Option<u64>,
) -> bool {
    let compatible = match (os_releases, booted_os) {
        (Some(range), Some(os)) => range.contains(os),
        _ => true,
    };
    version > image_release && compatible
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start (or keep running) this agent.
    Run(Agent),
    /// Switch the store to `to` (the last confirmed version, or the image's agent), keep
    /// `reason` for the agent to report, then ask again.
    RollBack { from: u64, to: Agent, reason: RollbackReason },
    /// Fetch, verify and stage the latest agent release through the frozen endpoint, switch
    /// to it if it is another version, then ask again.
    FetchLatest,
}

/// The trial of a version: since when it has been given the chance to confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub version: u64,
    pub since: Timestamp,
}

/// What the launcher remembers across its own restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LauncherState {
    /// The last version that confirmed.
    #[serde(default)]
    pub confirmed: Option<u64>,
    #[serde(default)]
    pub trial: Option<Trial>,
    /// Exits of the agent within the crash window, oldest first.
    #[serde(default)]
    pub exits: Vec<ExitRecord>,
    /// When the frozen path was last taken.
    #[serde(default)]
    pub fetched_at: Option<Timestamp>,
    /// The newest version rolled back from: the frozen path asks only for newer ones (it
    /// would fetch the same failed version again and again).
    #[serde(default)]
    pub given_up: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launcher {
    pub policy: Policy,
    pub state: LauncherState,
}

impl Launcher {
    pub fn new(policy: Policy, state: LauncherState) -> Self {
        Self { policy, state }
    }

    /// The launcher (re)started at `now`: a trial in progress starts its clock again, so the
    /// time the appliance was off or rebooting is not held against the version.
    pub fn started(&mut self, now: Timestamp) {
        if let Some(trial) = &mut self.state.trial {
            trial.since = now;
        }
    }

    /// The agent process ended.
    pub fn exited(&mut self, exit: ExitRecord) {
        self.state.exits.push(exit);
    }

    /// The running agent of `version` checked in: a trial of it is passed, and whatever
    /// exits came before no longer count toward a crash loop.
    pub fn confirmed(&mut self, version: u64) {
        if self.state.trial.is_some_and(|t| t.version == version) {
            self.state.trial = None;
        }
        self.state.confirmed = Some(version);
        self.state.exits.clear();
    }

    /// What to do now, given the store's `current` version.
    pub fn decide(&mut self, current: Option<u64>, now: Timestamp) -> Decision {
        let window = self.policy.crash_window;
        self.state.exits.retain(|e| now.duration_since(e.at) < window);
        let crash_loop = self.state.exits.len() >= self.policy.crash_limit;

        if let Some(version) = current
            && self.state.confirmed != Some(version)
        {
            let trial = match self.state.trial {
                // A clock that jumped back restarts the trial rather than stopping it.
                Some(trial) if trial.version == version && trial.since <= now => trial,
                _ => {
                    // A new trial starts clean: exits of the version before are not its own.
                    self.state.exits.clear();
                    let trial = Trial { version, since: now };
                    self.state.trial = Some(trial);
                    return Decision::Run(Agent::Version(version));
                }
            };
            let waited = now.duration_since(trial.since);
            let reason = if crash_loop {
                Some(RollbackReason::CrashLoop { exits: std::mem::take(&mut self.state.exits) })
            } else if waited >= self.policy.trial_timeout {
                Some(RollbackReason::NeverConfirmed { waited })
            } else {
                None
            };
            return match reason {
                Some(reason) => {
                    self.state.trial = None;
                    // Back to the last version that proved itself, not merely the one before
                    // (which may never have confirmed either); else the image's agent.
                    let to = match self.state.confirmed {
                        Some(good) if good != version => Agent::Version(good),
                        _ => Agent::Image,
                    };
                    self.state.given_up = self.state.given_up.max(Some(version));
                    Decision::RollBack { from: version, to, reason }
                }
                None => Decision::Run(Agent::Version(version)),
            };
        }

        // Nothing is on trial now; a trial left from a version no longer current is over.
        self.state.trial = None;
        let running = current.map_or(Agent::Image, Agent::Version);
        let may_fetch = self
            .state
            .fetched_at
            .is_none_or(|at| now.duration_since(at) >= self.policy.fetch_interval);
        if crash_loop && may_fetch {
            self.state.fetched_at = Some(now);
            return Decision::FetchLatest;
        }
        Decision::Run(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(minutes: i64) -> Timestamp {
        let start: Timestamp = "2026-12-01T04:00:00Z".parse().expect("timestamp");
        start + SignedDuration::from_mins(minutes)
    }

    fn exit(at: Timestamp) -> ExitRecord {
        ExitRecord { at, code: Some(101), signal: None, log_tail: "panicked".into() }
    }

    fn confirmed_on(version: u64) -> Launcher {
        let state = LauncherState { confirmed: Some(version), ..LauncherState::default() };
        Launcher::new(Policy::default(), state)
    }

    #[test]
    fn a_new_version_that_crash_loops_is_rolled_back_with_its_exits() {
        let mut launcher = confirmed_on(2);
        assert_eq!(launcher.decide(Some(3), t(0)), Decision::Run(Agent::Version(3)));
        for minute in 0..3 {
            launcher.exited(exit(t(minute)));
            let decision = launcher.decide(Some(3), t(minute));
            if minute < 2 {
                assert_eq!(decision, Decision::Run(Agent::Version(3)), "exit {minute}");
            } else {
                let Decision::RollBack { from: 3, to: Agent::Version(2), reason } = decision else {
                    panic!("not rolled back: {decision:?}");
                };
                let RollbackReason::CrashLoop { exits } = reason else { panic!("{reason:?}") };
                assert_eq!(exits.len(), 3);
            }
        }
        // Back on 2 (the shell switched the store): 2 runs, nothing is on trial.
        assert_eq!(launcher.decide(Some(2), t(3)), Decision::Run(Agent::Version(2)));
        assert_eq!(launcher.state.trial, None);
    }

    #[test]
    fn a_new_version_that_never_checks_in_is_rolled_back_at_the_timeout() {
        let mut launcher = confirmed_on(2);
        assert_eq!(launcher.decide(Some(3), t(0)), Decision::Run(Agent::Version(3)));
        assert_eq!(launcher.decide(Some(3), t(4)), Decision::Run(Agent::Version(3)));
        let decision = launcher.decide(Some(3), t(5));
        assert_eq!(
            decision,
            Decision::RollBack {
                from: 3,
                to: Agent::Version(2),
                reason: RollbackReason::NeverConfirmed { waited: SignedDuration::from_mins(5) }
            }
        );
    }

    #[test]
    fn a_version_that_confirms_passes_its_trial_and_slow_crashes_are_not_a_loop() {
        let mut launcher = confirmed_on(2);
        launcher.decide(Some(3), t(0));
        launcher.exited(exit(t(1)));
        launcher.confirmed(3);
        assert_eq!(launcher.state.trial, None);
        // Exits spread wider than the window never add up to a loop.
        for minute in [20, 35, 50, 65] {
            launcher.exited(exit(t(minute)));
            assert_eq!(launcher.decide(Some(3), t(minute)), Decision::Run(Agent::Version(3)));
        }
        // A trial survives the launcher's own restart (state saved and read back), with its
        // clock started again: the time the appliance was off does not count.
        let mut launcher = Launcher::new(Policy::default(), confirmed_on(3).state);
        launcher.decide(Some(4), t(100));
        let saved = launcher.state.clone();
        let mut restarted = Launcher::new(Policy::default(), saved);
        restarted.started(t(160));
        assert_eq!(restarted.decide(Some(4), t(160)), Decision::Run(Agent::Version(4)));
        assert!(matches!(
            restarted.decide(Some(4), t(165)),
            Decision::RollBack { from: 4, reason: RollbackReason::NeverConfirmed { .. }, .. }
        ));
    }

    #[test]
    fn a_rollback_returns_to_the_last_confirmed_version_not_merely_the_one_before() {
        let mut launcher = confirmed_on(2);
        launcher.decide(Some(3), t(0));
        // 3 is replaced by 4 before it ever confirmed; 4 fails: back to 2, not to 3.
        launcher.decide(Some(4), t(1));
        assert!(matches!(
            launcher.decide(Some(4), t(7)),
            Decision::RollBack { from: 4, to: Agent::Version(2), .. }
        ));
        // A clock that jumps back restarts a trial instead of freezing it.
        launcher.decide(Some(5), t(10));
        assert_eq!(launcher.decide(Some(5), t(-30)), Decision::Run(Agent::Version(5)));
        assert_eq!(launcher.state.trial.map(|t| t.since), Some(t(-30)));
    }

    #[test]
    fn a_first_version_that_fails_falls_back_to_the_images_agent() {
        let mut launcher = Launcher::new(Policy::default(), LauncherState::default());
        assert_eq!(launcher.decide(None, t(0)), Decision::Run(Agent::Image));
        assert_eq!(launcher.decide(Some(1), t(1)), Decision::Run(Agent::Version(1)));
        assert!(matches!(
            launcher.decide(Some(1), t(7)),
            Decision::RollBack { from: 1, to: Agent::Image, .. }
        ));
    }

    #[test]
    fn a_confirmed_agent_that_crash_loops_takes_the_frozen_path_at_most_every_interval() {
        let mut launcher = confirmed_on(3);
        for minute in 0..3 {
            launcher.exited(exit(t(minute)));
        }
        assert_eq!(launcher.decide(Some(3), t(2)), Decision::FetchLatest);
        // The fetch brought nothing newer: it keeps crashing, and is not hammered.
        launcher.exited(exit(t(3)));
        assert_eq!(launcher.decide(Some(3), t(3)), Decision::Run(Agent::Version(3)));
        for minute in 15..18 {
            launcher.exited(exit(t(minute)));
        }
        assert_eq!(launcher.decide(Some(3), t(17)), Decision::FetchLatest);
        // The fix arrived and was switched to: it is on trial, the old exits are not its own.
        assert_eq!(launcher.decide(Some(4), t(18)), Decision::Run(Agent::Version(4)));
        assert!(launcher.state.exits.is_empty());
        // The image's own agent crash-looping (nothing installed apart) takes it too.
        let mut fresh = Launcher::new(Policy::default(), LauncherState::default());
        for minute in 0..3 {
            fresh.exited(exit(t(minute)));
        }
        assert_eq!(fresh.decide(None, t(2)), Decision::FetchLatest);
    }
}
