//! The rollout engine: pure decisions over a rollout and the fleet's state, with time passed
//! in. Handlers load the state, call [`decide`], apply and store the decisions.
//!
//! Policy:
//! - stage membership is fixed when the rollout is created: the targeted appliances are ordered
//!   by a hash of (rollout id, appliance key) and each stage takes the next share, so the same
//!   appliance is always in the same stage. Only members count and only members are offered
//!   the release: an appliance enrolled later, or whose platform the release does not list,
//!   is not part of this rollout (so keys enrolled after the fact cannot dilute its failure
//!   rate; they get the release from the next rollout or a pin);
//! - a stage advances after its delay when every online member of it has succeeded (canary
//!   rollouts wait for the operator after the canary stage);
//! - the rollout pauses when the failure rate among the current stage's members that finished
//!   exceeds the threshold (default 10%);
//! - an appliance that stays `rebooting` past the report deadline counts as failed: a bricked
//!   device must stop the rollout.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::UpdateState;

pub const DEFAULT_FAILURE_THRESHOLD: f64 = 0.10;
pub const DEFAULT_REPORT_DEADLINE_SECS: u64 = 30 * 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Everyone at once.
    Immediate,
    /// Stages advance by themselves after their delay when healthy.
    Staged,
    /// A small first stage; the operator advances after looking at it.
    Canary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Cumulative share of the targeted appliances, 1–100.
    pub percent: u8,
    /// Time the stage runs before it may advance.
    pub delay_hours: u32,
}

impl Strategy {
    pub fn default_stages(self) -> Vec<StagePlan> {
        match self {
            Strategy::Immediate => vec![StagePlan { percent: 100, delay_hours: 0 }],
            Strategy::Staged => vec![
                StagePlan { percent: 5, delay_hours: 24 },
                StagePlan { percent: 25, delay_hours: 24 },
                StagePlan { percent: 100, delay_hours: 0 },
            ],
            Strategy::Canary => vec![
                StagePlan { percent: 5, delay_hours: 0 },
                StagePlan { percent: 100, delay_hours: 0 },
            ],
        }
    }
}

/// What a rollout rolls out: an OS image release, or an agent release (the same engine; the
/// states are the agent update's, `rebooting` being the agent's restart into the new version).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    #[default]
    Image,
    Agent,
}

impl RolloutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::Image => "image",
            RolloutKind::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    InProgress,
    Paused,
    Completed,
    /// Stopped for good: rolled back by an operator.
    Failed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::InProgress => "in_progress",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Failed => "failed",
        }
    }
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    #[serde(default)]
    pub kind: RolloutKind,
    /// The release being rolled out (an agent release's version for an agent rollout).
    pub version: u64,
    /// What a fleet rollback returns to.
    pub previous_version: Option<u64>,
    pub strategy: Strategy,
    pub stages: Vec<StagePlan>,
    pub current_stage: usize,
    pub state: RolloutState,
    pub created: Timestamp,
    pub stage_started: Timestamp,
    pub failure_threshold: f64,
    pub report_deadline_secs: u64,
    /// Targeted groups; empty: the whole fleet.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Appliance key → stage, fixed at creation.
    pub members: BTreeMap<String, usize>,
    #[serde(default)]
    pub paused_reason: Option<String>,
    #[serde(default)]
    pub rolled_back: bool,
    /// Agent rollouts: appliances switch only inside their maintenance window.
    #[serde(default)]
    pub in_window: bool,
}

/// What the engine needs to know about one appliance.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplianceView {
    pub key: String,
    pub group: Option<String>,
    /// Its state for this rollout's release, if it reported one.
    pub state: Option<UpdateState>,
    pub state_since: Timestamp,
    pub online: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    MarkFailed { appliance: String, reason: String },
    Pause { reason: String },
    AdvanceStage { to: usize },
    Complete,
}

/// Per-stage counts of appliance states (for the API, the page and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCounts {
    pub members: usize,
    pub by_state: BTreeMap<String, usize>,
}

impl Rollout {
    /// A new rollout of `version` over `targets` (appliance keys), stages fixed now.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        version: u64,
        previous_version: Option<u64>,
        strategy: Strategy,
        stages: Option<Vec<StagePlan>>,
        groups: Vec<String>,
        targets: &[String],
        now: Timestamp,
    ) -> Result<Self, String> {
        let stages = stages.unwrap_or_else(|| strategy.default_stages());
        validate_stages(&stages)?;
        Ok(Self {
            id,
            kind: RolloutKind::Image,
            version,
            previous_version,
            strategy,
            members: assign_stages(id, targets, &stages),
            stages,
            current_stage: 0,
            state: RolloutState::InProgress,
            created: now,
            stage_started: now,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            report_deadline_secs: DEFAULT_REPORT_DEADLINE_SECS,
            groups,
            paused_reason: None,
            rolled_back: false,
            in_window: false,
        })
    }

    pub fn last_stage(&self) -> usize {
        self.stages.len() - 1
    }

    /// The stage of a member; `None` for an appliance that is not part of this rollout.
    pub fn stage_of(&self, key: &str) -> Option<usize> {
        self.members.get(key).copied()
    }

    /// Whether an appliance of `group` falls within the rollout's groups (at creation).
    pub fn targets(&self, group: Option<&str>) -> bool {
        self.groups.is_empty() || group.is_some_and(|g| self.groups.iter().any(|t| t == g))
    }

    /// Has this appliance's stage been reached (whatever the rollout's state)?
    pub fn reached(&self, key: &str) -> bool {
        self.stage_of(key).is_some_and(|stage| stage <= self.current_stage)
    }

    /// May this appliance be offered the release now?
    pub fn offers_to(&self, key: &str) -> bool {
        self.state == RolloutState::InProgress && self.reached(key)
    }

    /// When the current stage may advance (its delay has passed).
    pub fn next_stage_at(&self) -> Option<Timestamp> {
        if self.current_stage >= self.last_stage() {
            return None;
        }
        let delay =
            SignedDuration::from_hours(i64::from(self.stages[self.current_stage].delay_hours));
        self.stage_started.checked_add(delay).ok()
    }

    pub fn apply(&mut self, decision: &Decision, now: Timestamp) {
        match decision {
            Decision::MarkFailed { .. } => {}
            Decision::Pause { reason } => {
                self.state = RolloutState::Paused;
                self.paused_reason = Some(reason.clone());
            }
            Decision::AdvanceStage { to } => {
                self.current_stage = *to;
                self.stage_started = now;
            }
            Decision::Complete => self.state = RolloutState::Completed,
        }
    }

    /// Counts per stage of the appliances targeted.
    pub fn stage_counts(&self, fleet: &[ApplianceView]) -> Vec<StageCounts> {
        let mut counts = vec![StageCounts::default(); self.stages.len()];
        for appliance in fleet {
            let Some(stage) = self.stage_of(&appliance.key) else { continue };
            let stage = &mut counts[stage];
            stage.members += 1;
            let state = appliance.state.map_or("not_started", UpdateState::as_str);
            *stage.by_state.entry(state.to_owned()).or_default() += 1;
        }
        counts
    }

    /// Failed ÷ finished among the current stage's members.
    pub fn failure_rate(&self, fleet: &[ApplianceView]) -> f64 {
        let (mut failed, mut finished) = (0usize, 0usize);
        for appliance in self.current_members(fleet) {
            if let Some(state) = appliance.state.filter(|s| s.is_terminal()) {
                finished += 1;
                failed += usize::from(state.is_failure());
            }
        }
        if finished == 0 { 0.0 } else { failed as f64 / finished as f64 }
    }

    fn current_members<'a>(
        &'a self,
        fleet: &'a [ApplianceView],
    ) -> impl Iterator<Item = &'a ApplianceView> {
        fleet.iter().filter(|a| self.stage_of(&a.key) == Some(self.current_stage))
    }
}

fn validate_stages(stages: &[StagePlan]) -> Result<(), String> {
    if stages.is_empty() {
        return Err("a rollout needs at least one stage".into());
    }
    let mut previous = 0;
    for stage in stages {
        if stage.percent <= previous || stage.percent > 100 {
            return Err(format!(
                "stage percentages must rise from 1 to 100; {} after {previous}",
                stage.percent
            ));
        }
        previous = stage.percent;
    }
    if previous != 100 {
        return Err("the last stage must reach 100%".into());
    }
    Ok(())
}

/// Orders `targets` by a hash of (rollout, key) and gives each stage its cumulative share;
/// a first stage above 0% always has at least one appliance.
pub fn assign_stages(
    rollout: u64,
    targets: &[String],
    stages: &[StagePlan],
) -> BTreeMap<String, usize> {
    let mut ordered: Vec<(blake3::Hash, &String)> = targets
        .iter()
        .map(|key| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&rollout.to_le_bytes()).update(key.as_bytes());
            (hasher.finalize(), key)
        })
        .collect();
    ordered.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(b.1)));
    ordered.dedup_by(|a, b| a.1 == b.1);
    let n = ordered.len();
    let mut members = BTreeMap::new();
    let mut stage = 0;
    for (rank, (_, key)) in ordered.into_iter().enumerate() {
        while stage + 1 < stages.len() && rank >= stage_size(stages[stage].percent, n) {
            stage += 1;
        }
        members.insert(key.clone(), stage);
    }
    members
}

fn stage_size(percent: u8, n: usize) -> usize {
    (usize::from(percent) * n).div_ceil(100).max(1)
}

/// What should happen now. Decisions come in the order they apply.
pub fn decide(rollout: &Rollout, fleet: &[ApplianceView], now: Timestamp) -> Vec<Decision> {
    let mut decisions = Vec::new();
    if matches!(rollout.state, RolloutState::Completed | RolloutState::Failed) {
        return decisions;
    }
    let deadline = SignedDuration::from_secs(rollout.report_deadline_secs as i64);
    let mut fleet: Vec<ApplianceView> = fleet.to_vec();
    for appliance in fleet.iter_mut().filter(|a| rollout.reached(&a.key)) {
        let overdue = appliance.state == Some(UpdateState::Rebooting)
            && now.duration_since(appliance.state_since) > deadline;
        if overdue {
            decisions.push(Decision::MarkFailed {
                appliance: appliance.key.clone(),
                reason: format!(
                    "no report within {} minutes of rebooting",
                    deadline.as_secs() / 60
                ),
            });
            appliance.state = Some(UpdateState::Failed);
        }
    }
    if rollout.state == RolloutState::Paused {
        return decisions;
    }
    let rate = rollout.failure_rate(&fleet);
    if rate > rollout.failure_threshold {
        decisions.push(Decision::Pause {
            reason: format!(
                "failure rate {:.0}% in stage {} is above the {:.0}% threshold",
                rate * 100.0,
                rollout.current_stage + 1,
                rollout.failure_threshold * 100.0
            ),
        });
        return decisions;
    }
    let stage_done = rollout
        .current_members(&fleet)
        .filter(|a| a.online || a.state.is_some())
        .all(|a| a.state == Some(UpdateState::Succeeded));
    if !stage_done {
        return decisions;
    }
    if rollout.current_stage == rollout.last_stage() {
        decisions.push(Decision::Complete);
    } else if (rollout.strategy != Strategy::Canary || rollout.current_stage > 0)
        && rollout.next_stage_at().is_some_and(|at| now >= at)
    {
        decisions.push(Decision::AdvanceStage { to: rollout.current_stage + 1 });
    }
    decisions
}
