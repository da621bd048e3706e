//! Releases, rollouts and the engine's tick: each computes its changes from the fleet as it is.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sitecast_manifest::api::UpdateState;

use super::{Batch, Fleet, FleetError};
use crate::engine::{
    self, Decision, Rollout, RolloutKind, RolloutState, StageCounts, StagePlan, Strategy,
};
use crate::store::{AgentReleaseRecord, ApplianceRecord, Change, ReleaseRecord, UpdateRow};

/// A request to start a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRequest {
    /// An image release (the default) or an agent release.
    #[serde(default)]
    pub kind: RolloutKind,
    pub version: u64,
    pub strategy: Strategy,
    #[serde(default)]
    pub stages: Option<Vec<StagePlan>>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub failure_threshold: Option<f64>,
    #[serde(default)]
    pub report_deadline_secs: Option<u64>,
    /// Agent rollouts: switch only inside each appliance's maintenance window (by default an
    /// agent switches at once: a restart of the agent does not interrupt the appliance).
    #[serde(default)]
    pub in_window: bool,
}

/// What an operator can do to a running rollout (`POST /api/rollouts/{id}/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Pause,
    Resume,
    Advance,
    Rollback,
}

impl std::str::FromStr for RolloutAction {
    type Err = FleetError;

    fn from_str(text: &str) -> Result<Self, FleetError> {
        match text {
            "pause" => Ok(Self::Pause),
            "resume" => Ok(Self::Resume),
            "advance" => Ok(Self::Advance),
            "rollback" => Ok(Self::Rollback),
            other => Err(FleetError::Invalid(format!("unknown rollout action {other:?}"))),
        }
    }
}

impl RolloutAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Advance => "advance",
            Self::Rollback => "rollback",
        }
    }
}

/// A rollout with its live counts, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub stage_counts: Vec<StageCounts>,
    pub failure_rate: f64,
    /// Succeeded ÷ finished over every stage (1 while none finished).
    #[serde(default)]
    pub success_rate: f64,
    pub next_stage_at: Option<Timestamp>,
    /// Appliances of the targeted groups whose platform the release does not list: not part
    /// of the rollout, and not waited for.
    #[serde(default)]
    pub not_applicable: usize,
}

/// Whether `release` runs on `appliance`'s hardware (a release that lists none runs on all).
pub(super) fn runs_on(release: &ReleaseRecord, appliance: &ApplianceRecord) -> bool {
    if appliance.ddi.is_some() {
        // A DDI client installs a SWUpdate artifact; its hardware check is the device's own.
        return release.swu.is_some();
    }
    release.has_image()
        && (release.platforms.is_empty() || release.platforms.contains(&appliance.platform))
}

/// Whether agent `release` has a build for `appliance`'s platform and runs on its OS release.
pub(super) fn agent_runs_on(release: &AgentReleaseRecord, appliance: &ApplianceRecord) -> bool {
    release.platforms.contains(&appliance.platform)
        && release.runs_on_os(appliance.installed_version)
}

/// Succeeded ÷ finished (succeeded, failed, rolled back) over all stages; 1 while none
/// finished.
fn success_rate(stages: &[StageCounts]) -> f64 {
    let (mut succeeded, mut finished) = (0usize, 0usize);
    for (state, n) in stages.iter().flat_map(|s| &s.by_state) {
        match state.as_str() {
            "succeeded" => {
                succeeded += n;
                finished += n;
            }
            "failed" | "rolled_back" => finished += n,
            _ => {}
        }
    }
    if finished == 0 { 1.0 } else { succeeded as f64 / finished as f64 }
}

fn group_pin_key(group: &str, kind: RolloutKind) -> String {
    match kind {
        RolloutKind::Image => format!("pin.group.{group}"),
        RolloutKind::Agent => format!("agent_pin.group.{group}"),
    }
}

/// The release a rollout rolls out.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Image(&'a ReleaseRecord),
    Agent(&'a AgentReleaseRecord),
}

impl Target<'_> {
    fn runs_on(self, appliance: &ApplianceRecord) -> bool {
        match self {
            Target::Image(release) => runs_on(release, appliance),
            // An agent that does not say which agent release it runs is never offered one.
            Target::Agent(release) => {
                agent_runs_on(release, appliance) && appliance.agent_release.is_some()
            }
        }
    }
}

impl Fleet {
    pub(super) fn rollout_target(
        &self,
        kind: RolloutKind,
        version: u64,
    ) -> Result<Target<'_>, FleetError> {
        match kind {
            RolloutKind::Image => self.release(version).map(Target::Image),
            RolloutKind::Agent => self.agent_release(version).map(Target::Agent),
        }
    }
}

/// The update row a rollout of `kind` follows on `record`.
pub(super) fn update_row(
    record: &mut ApplianceRecord,
    kind: RolloutKind,
) -> Option<&mut UpdateRow> {
    match kind {
        RolloutKind::Image => record.update.as_mut(),
        RolloutKind::Agent => record.agent_update.as_mut(),
    }
}

impl Fleet {
    pub fn publish(
        &self,
        record: ReleaseRecord,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if self.releases.contains_key(&record.version) {
            return Err(FleetError::Conflict(format!(
                "release {} is already published",
                record.version
            )));
        }
        let detail =
            json!({"version": record.version, "blake3": record.blake3, "size": record.size});
        let mut batch = Batch::new(self);
        batch.push(Change::Release(Box::new(record)));
        batch.audit(now, "operator", "release.publish", detail);
        Ok(batch.finish())
    }

    pub fn deactivate(&self, version: u64, now: Timestamp) -> Result<Vec<Change>, FleetError> {
        let mut release = self.release(version)?.clone();
        release.active = false;
        let mut batch = Batch::new(self);
        batch.push(Change::Release(Box::new(release)));
        batch.audit(now, "operator", "release.deactivate", json!({"version": version}));
        Ok(batch.finish())
    }

    /// The release whose mirrors may be `mirrors`: it has an image, and every URL is one.
    pub fn mirrorable(
        &self,
        version: u64,
        mirrors: &[String],
    ) -> Result<&ReleaseRecord, FleetError> {
        let release = self.release(version)?;
        if !release.has_image() {
            return Err(FleetError::Invalid(format!(
                "release {version} has no sitecast image to mirror"
            )));
        }
        super::validate::mirrors(mirrors)?;
        Ok(release)
    }

    /// Names the HTTP origins appliances fetch the release's image from before Central
    /// Command (which stays the fallback); an empty list leaves Central Command alone.
    pub fn set_mirrors(
        &self,
        version: u64,
        mirrors: Vec<String>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let mut release = self.mirrorable(version, &mirrors)?.clone();
        release.mirrors = mirrors;
        let detail = json!({"version": version, "mirrors": release.mirrors});
        let mut batch = Batch::new(self);
        batch.push(Change::Release(Box::new(release)));
        batch.audit(now, "operator", "release.mirrors", detail);
        Ok(batch.finish())
    }

    /// The id the next rollout gets.
    pub fn next_rollout_id(&self) -> u64 {
        self.rollouts.keys().next_back().map_or(1, |id| id + 1)
    }

    /// A new rollout over the appliances of its groups whose platform the release lists.
    /// One image rollout and one agent rollout may run at a time.
    pub fn create_rollout(
        &self,
        request: RolloutRequest,
        now: Timestamp,
    ) -> Result<(u64, Vec<Change>), FleetError> {
        let target = self.rollout_target(request.kind, request.version)?;
        match target {
            Target::Image(release) if !release.active => {
                return Err(FleetError::Conflict(format!(
                    "release {} is deactivated",
                    request.version
                )));
            }
            Target::Agent(release) if release.expires <= now => {
                return Err(FleetError::Conflict(format!(
                    "agent release {} expired at {}",
                    request.version, release.expires
                )));
            }
            _ => {}
        }
        let previous_version = match request.kind {
            RolloutKind::Image => {
                // What the appliances it reaches can go back to: a release with an image for
                // one with an image, one with a `.swu` for a `.swu` alone.
                let by_image = self.releases.get(&request.version).is_some_and(|r| r.has_image());
                self.releases
                    .range(..request.version)
                    .rev()
                    .find(|(_, r)| {
                        r.active && if by_image { r.has_image() } else { r.swu.is_some() }
                    })
                    .map(|(v, _)| *v)
            }
            RolloutKind::Agent => {
                self.agent_releases.range(..request.version).next_back().map(|(v, _)| *v)
            }
        };
        if let Some(running) = self.rollouts.values().find(|r| {
            r.kind == request.kind
                && matches!(r.state, RolloutState::InProgress | RolloutState::Paused)
        }) {
            return Err(FleetError::Conflict(format!(
                "{} rollout {} of release {} is still {}; complete or roll it back first",
                running.kind.as_str(),
                running.id,
                running.version,
                running.state.as_str()
            )));
        }
        if let Some(threshold) = request.failure_threshold
            && !(0.0..=1.0).contains(&threshold)
        {
            return Err(FleetError::Invalid(format!(
                "failure_threshold {threshold} is not within 0..1"
            )));
        }
        let in_groups = |a: &&ApplianceRecord| {
            request.groups.is_empty()
                || a.group.as_ref().is_some_and(|g| request.groups.contains(g))
        };
        let (targets, not_applicable): (Vec<&ApplianceRecord>, Vec<&ApplianceRecord>) =
            self.appliances.values().filter(in_groups).partition(|a| target.runs_on(a));
        let targets: Vec<String> = targets.into_iter().map(|a| a.key.clone()).collect();
        let id = self.next_rollout_id();
        let mut rollout = Rollout::new(
            id,
            request.version,
            previous_version,
            request.strategy,
            request.stages,
            request.groups,
            &targets,
            now,
        )
        .map_err(FleetError::Invalid)?;
        rollout.kind = request.kind;
        rollout.in_window = request.in_window;
        if let Some(threshold) = request.failure_threshold {
            rollout.failure_threshold = threshold;
        }
        if let Some(deadline) = request.report_deadline_secs {
            rollout.report_deadline_secs = deadline;
        }
        let detail = json!({"rollout": id, "kind": rollout.kind, "version": rollout.version, "strategy": rollout.strategy,
            "targets": targets.len(), "not_applicable": not_applicable.len()});
        let mut batch = Batch::new(self);
        batch.push(Change::Rollout(rollout));
        batch.audit(now, "operator", "rollout.create", detail);
        Ok((id, batch.finish()))
    }

    pub fn control(
        &self,
        id: u64,
        action: RolloutAction,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let mut rollout = self
            .rollouts
            .get(&id)
            .ok_or_else(|| FleetError::NotFound(format!("rollout {id}")))?
            .clone();
        let finished = matches!(rollout.state, RolloutState::Completed | RolloutState::Failed);
        match action {
            _ if finished && action != RolloutAction::Rollback => {
                return Err(FleetError::Conflict(format!(
                    "rollout {id} is {}",
                    rollout.state.as_str()
                )));
            }
            RolloutAction::Pause => {
                rollout.state = RolloutState::Paused;
                rollout.paused_reason = Some("paused by operator".into());
            }
            RolloutAction::Resume => {
                rollout.state = RolloutState::InProgress;
                rollout.paused_reason = None;
            }
            RolloutAction::Advance => {
                if rollout.current_stage >= rollout.last_stage() {
                    return Err(FleetError::Conflict(format!("rollout {id} is at its last stage")));
                }
                rollout.current_stage += 1;
                rollout.stage_started = now;
                rollout.state = RolloutState::InProgress;
                rollout.paused_reason = None;
            }
            RolloutAction::Rollback => {
                if rollout.rolled_back {
                    return Err(FleetError::Conflict(format!(
                        "rollout {id} is already rolled back"
                    )));
                }
                let previous = rollout.previous_version.ok_or_else(|| {
                    FleetError::Conflict(format!(
                        "rollout {id} has no previous release to return to"
                    ))
                })?;
                let floor = match rollout.kind {
                    RolloutKind::Image => self.releases.get(&rollout.version),
                    RolloutKind::Agent => None,
                }
                .and_then(|r| r.rollback_floor)
                .unwrap_or(0);
                if previous < floor {
                    return Err(FleetError::Conflict(format!(
                        "cannot roll back to {previous}: release {} set the rollback floor {floor}",
                        rollout.version
                    )));
                }
                rollout.state = RolloutState::Failed;
                rollout.rolled_back = true;
                rollout.paused_reason = Some(format!("rolled back to {previous} by operator"));
            }
        }
        let detail = json!({"rollout": id, "stage": rollout.current_stage, "state": rollout.state});
        let mut batch = Batch::new(self);
        batch.push(Change::Rollout(rollout));
        batch.audit(now, "operator", &format!("rollout.{}", action.as_str()), detail);
        Ok(batch.finish())
    }

    pub fn rollout_view(&self, rollout: &Rollout, now: Timestamp) -> RolloutView {
        let views = self.views(rollout, now);
        let not_applicable =
            self.rollout_target(rollout.kind, rollout.version).map_or(0, |target| {
                self.appliances
                    .values()
                    .filter(|a| rollout.targets(a.group.as_deref()) && !target.runs_on(a))
                    .count()
            });
        let stage_counts = rollout.stage_counts(&views);
        RolloutView {
            rollout: rollout.clone(),
            success_rate: success_rate(&stage_counts),
            stage_counts,
            failure_rate: rollout.failure_rate(&views),
            next_stage_at: rollout.next_stage_at(),
            not_applicable,
        }
    }

    /// Runs the engine over every live rollout.
    pub fn tick(&self, now: Timestamp) -> Vec<Change> {
        let mut batch = Batch::new(self);
        let live = self
            .rollouts
            .values()
            .filter(|r| matches!(r.state, RolloutState::InProgress | RolloutState::Paused));
        for rollout in live {
            let decisions = engine::decide(rollout, &self.views(rollout, now), now);
            if decisions.is_empty() {
                continue;
            }
            let mut updated = rollout.clone();
            for decision in &decisions {
                if let Decision::MarkFailed { appliance, reason } = decision
                    && let Some(record) = self.appliances.get(appliance)
                {
                    let mut record = record.clone();
                    if let Some(update) = update_row(&mut record, rollout.kind) {
                        update.report.state = UpdateState::Failed;
                        update.report.error = Some(reason.clone());
                        update.since = now;
                        batch.push(Change::Appliance(Box::new(record)));
                    }
                }
                updated.apply(decision, now);
                let detail = json!({"rollout": rollout.id, "decision": format!("{decision:?}")});
                batch.audit(now, "system", "rollout.decide", detail);
            }
            batch.push(Change::Rollout(updated));
        }
        batch.finish()
    }

    /// The release (or agent release) a group is pinned to, kept as a meta entry
    /// `pin.group.<name>` (`agent_pin.group.<name>`).
    pub fn group_pin(&self, group: &str, kind: RolloutKind) -> Option<u64> {
        self.meta.get(&group_pin_key(group, kind)).and_then(|v| v.parse().ok())
    }

    /// Pins every appliance of `group` to a release, or with `kind` agent to an agent release
    /// (or unpins the group); an appliance's own pin wins over its group's.
    pub fn pin_group(
        &self,
        group: &str,
        kind: RolloutKind,
        version: Option<u64>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if let Some(v) = version {
            self.rollout_target(kind, v)?;
        }
        let value = version.map(|v| v.to_string()).unwrap_or_default();
        let action = match kind {
            RolloutKind::Image => "group.pin",
            RolloutKind::Agent => "group.agent_pin",
        };
        let mut batch = Batch::new(self);
        batch.push(Self::meta_change(&group_pin_key(group, kind), value));
        batch.audit(now, "operator", action, json!({"group": group, "version": version}));
        Ok(batch.finish())
    }

    /// The release the fleet is on its way to: the newest rollout's, else the newest active
    /// release.
    pub fn current_release(&self) -> Option<&ReleaseRecord> {
        match self.rollouts.values().rev().find(|r| r.kind == RolloutKind::Image) {
            Some(rollout) => self.releases.get(&rollout.version),
            None => self.releases.values().rev().find(|r| r.active),
        }
    }
}
