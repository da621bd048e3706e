//! Agent releases: published apart from images, offered by pins and agent rollouts, the
//! appliances' agent reports, and the frozen path's answer (the newest agent release for a
//! platform).
//!
//! An agent update succeeds when the appliance checks in running the offered release: the
//! new agent's first check-in is the heartbeat that proves it works.

use jiff::Timestamp;
use serde_json::json;
use sitecast_manifest::api::{ReportRequest, UpdateIntent};

use super::rollouts::agent_runs_on;
use super::{Batch, Fleet, FleetError};
use crate::engine::{RolloutKind, RolloutState};
use crate::store::{AgentReleaseRecord, ApplianceRecord, Change, OfferRecord};

/// An agent release due for an appliance.
pub(super) struct AgentDue<'a> {
    pub(super) release: &'a AgentReleaseRecord,
    pub intent: UpdateIntent,
    pub rollout: Option<u64>,
    pub in_window: bool,
}

impl Fleet {
    pub fn publish_agent(
        &self,
        record: AgentReleaseRecord,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if self.agent_releases.contains_key(&record.version) {
            return Err(FleetError::Conflict(format!(
                "agent release {} is already published",
                record.version
            )));
        }
        let detail = json!({"version": record.version, "platforms": record.platforms});
        let mut batch = Batch::new(self);
        batch.push(Change::AgentRelease(record));
        batch.audit(now, "operator", "agent_release.publish", detail);
        Ok(batch.finish())
    }

    /// The newest agent release an appliance can take: a build for `platform`, for
    /// `os_release` (if given), newer than `above` (if given), not expired at `now`. The
    /// frozen path asks with all of them, so an expired or unfitting newest release does not
    /// hide an older one that works, and an older one is never offered as a fix.
    pub fn latest_agent(
        &self,
        platform: &str,
        os_release: Option<u64>,
        above: Option<u64>,
        now: Timestamp,
    ) -> Option<&AgentReleaseRecord> {
        self.agent_releases.values().rev().find(|r| {
            r.platforms.iter().any(|p| p == platform)
                && os_release.is_none_or(|os| r.runs_on_os(os))
                && above.is_none_or(|v| r.version > v)
                && r.expires > now
        })
    }

    pub(super) fn agent_release(&self, version: u64) -> Result<&AgentReleaseRecord, FleetError> {
        self.agent_releases
            .get(&version)
            .ok_or_else(|| FleetError::NotFound(format!("agent release {version}")))
    }

    /// The agent release due for `appliance`, if any: a pin (its own, else its group's)
    /// first, then a fleet rollback of an agent rollout, then the agent rollout's stage. An
    /// agent that does not say which agent release it runs is offered none.
    pub(super) fn agent_due(
        &self,
        appliance: &ApplianceRecord,
        now: Timestamp,
    ) -> Option<AgentDue<'_>> {
        let running = appliance.agent_release?;
        let usable = |version: u64| {
            self.agent_releases
                .get(&version)
                .filter(|r| r.expires > now && agent_runs_on(r, appliance))
        };
        let due =
            |release, intent, rollout, in_window| AgentDue { release, intent, rollout, in_window };
        let group_pin =
            appliance.group.as_deref().and_then(|g| self.group_pin(g, RolloutKind::Agent));
        if let Some(pin) = appliance.agent_pin.or(group_pin) {
            let intent = match pin.cmp(&running) {
                std::cmp::Ordering::Equal => return None,
                std::cmp::Ordering::Greater => UpdateIntent::Upgrade,
                std::cmp::Ordering::Less => UpdateIntent::Rollback,
            };
            return usable(pin).map(|r| due(r, intent, None, false));
        }
        let mut rollouts = self.rollouts.values().rev().filter(|r| r.kind == RolloutKind::Agent);
        for rollout in rollouts.clone() {
            if rollout.rolled_back && running == rollout.version {
                let previous = rollout.previous_version?;
                return usable(previous)
                    .map(|r| due(r, UpdateIntent::Rollback, Some(rollout.id), false));
            }
            // A newer rollout of this very release supersedes older rollbacks of it.
            if rollout.version == running {
                break;
            }
        }
        let rollout = rollouts.find(|r| r.state == RolloutState::InProgress)?;
        if rollout.version <= running || !rollout.offers_to(&appliance.key) {
            return None;
        }
        usable(rollout.version)
            .map(|r| due(r, UpdateIntent::Upgrade, Some(rollout.id), rollout.in_window))
    }

    /// Whether the blob `blake3` (hex) is a file of a published agent release.
    pub fn is_agent_file(&self, blake3: &str) -> bool {
        self.agent_releases.values().any(|r| r.files.iter().any(|f| f == blake3))
    }
}

/// The offer record for an agent release due now.
pub(super) fn agent_offer_record(due: &AgentDue<'_>, now: Timestamp) -> OfferRecord {
    OfferRecord { rollout: due.rollout, version: due.release.version, intent: due.intent, at: now }
}

/// Sets `record`'s agent update to `report` (audited when its state changes).
pub(super) fn record_agent_state(
    record: &mut ApplianceRecord,
    report: ReportRequest,
    now: Timestamp,
    batch: &mut Batch,
    actor: &str,
) {
    let row = &mut record.agent_update;
    super::appliances::record_update_state(
        row,
        report,
        now,
        batch,
        actor,
        "appliance.agent_report",
    );
}
