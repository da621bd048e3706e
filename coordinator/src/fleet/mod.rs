//! The fleet as the coordinator knows it, in memory, and every operation on it.
//!
//! **Commit, then apply.** An operation reads the fleet (`&self`) and returns the [`Change`]s
//! it would make, without touching it; the server commits them to the store and only then
//! calls [`Fleet::apply`], the one place the fleet changes. Loading at start goes through the
//! same `apply`, so what is served after a restart is exactly what was stored. No I/O here, and
//! time is passed in.
//!
//! The one exception is check-in bookkeeping (last seen, addresses, agent version): it is
//! applied at once and flushed in the background, and losing a few seconds of it in a crash
//! loses nothing that was answered as done. It never goes back in time: a record applied
//! from another replica's batch keeps this view's newer bookkeeping.
//!
//! With replicas, the fleet is a view of the shared store at a log [`Fleet::position`]: in a
//! replica's turn to write, it is caught up (the other replicas' batches applied in order)
//! before a change is computed, and the store refuses a batch computed at a stale position.

mod agents;
mod appliances;
mod ddi;
mod rollouts;
mod sites;
mod validate;

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::UpdateState;
use sitecast_manifest::window::MaintenanceWindow;

pub use self::appliances::{CheckinPlan, Enrollment, ReportAuth};
pub use self::ddi::{
    DDI_PLATFORM, DdiExecution, DdiFeedback, DdiFinished, DdiNext, DdiPoll, check_swu_filename,
    ddi_key,
};
pub use self::rollouts::{RolloutAction, RolloutRequest, RolloutView};
pub use self::sites::{SiteRelease, SiteSummary, SitesOverview, WindowOccurrence};
use crate::engine::{ApplianceView, Rollout, RolloutKind};
use crate::store::{
    AgentReleaseRecord, ApplianceRecord, AuditEntry, Change, ReleaseRecord, SessionRecord,
    SiteRecord, Snapshot,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("unknown appliance {0}: enroll it with the fleet's enrollment token first")]
    UnknownAppliance(String),
    /// A report whose sequence number or timestamp is not newer than the last one accepted:
    /// a replay, or reports arriving out of order.
    #[error("stale report: {0}")]
    StaleReport(String),
    /// A report about a release this appliance was never offered.
    #[error("not offered: {0}")]
    NotOffered(String),
    /// Another enrolled appliance already has this name or MAC address.
    #[error(
        "{what} is already enrolled as appliance {owner}; an operator must remove that appliance first"
    )]
    IdentityTaken { what: String, owner: String },
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub checkin_interval_secs: u64,
    /// No check-in for this long: offline.
    pub offline_after_secs: u64,
    pub default_window: MaintenanceWindow,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            checkin_interval_secs: 60,
            offline_after_secs: 180,
            default_window: MaintenanceWindow::default(),
        }
    }
}

/// An appliance as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceListing {
    #[serde(flatten)]
    pub record: ApplianceRecord,
    pub online: bool,
}

#[derive(Debug, Default)]
pub struct Fleet {
    pub releases: BTreeMap<u64, ReleaseRecord>,
    pub agent_releases: BTreeMap<u64, AgentReleaseRecord>,
    pub rollouts: BTreeMap<u64, Rollout>,
    pub appliances: BTreeMap<String, ApplianceRecord>,
    pub sites: BTreeMap<String, SiteRecord>,
    pub meta: BTreeMap<String, String>,
    pub site_bytes: BTreeMap<(String, u64), u64>,
    /// Fleet Updates sign-ins, by the BLAKE3 of their cookie.
    pub sessions: BTreeMap<String, SessionRecord>,
    /// The store's log position this view is at (0 on a store only this server writes).
    pub position: u64,
    audit_next: u64,
    /// Appliances whose bookkeeping changed since the last flush.
    dirty: BTreeSet<String>,
    pub config: FleetConfig,
    /// The coordinator's iroh-blobs provider addresses, handed to appliances.
    pub iroh_addresses: Vec<String>,
    /// Appliance keys by site: a check-in lists its site's peers without scanning the fleet.
    members: BTreeMap<String, BTreeSet<String>>,
    /// Appliance keys by normalized MAC and by name: who owns an identity.
    owners: BTreeMap<String, String>,
}

/// Changes being gathered by an operation, with audit entries numbered after the fleet's last.
struct Batch<'a> {
    fleet: &'a Fleet,
    changes: Vec<Change>,
}

impl<'a> Batch<'a> {
    fn new(fleet: &'a Fleet) -> Self {
        Self { fleet, changes: Vec::new() }
    }

    fn push(&mut self, change: Change) -> &mut Self {
        self.changes.push(change);
        self
    }

    fn audit(&mut self, now: Timestamp, actor: &str, action: &str, detail: serde_json::Value) {
        let earlier = self.changes.iter().filter(|c| matches!(c, Change::Audit(_))).count();
        let entry = AuditEntry {
            seq: self.fleet.audit_next + earlier as u64,
            at: now,
            actor: actor.to_owned(),
            action: action.to_owned(),
            detail,
        };
        self.changes.push(Change::Audit(entry));
    }

    fn finish(self) -> Vec<Change> {
        self.changes
    }
}

/// Check-in bookkeeping: what a check-in that changes nothing durable updates.
fn copy_bookkeeping(from: &ApplianceRecord, to: &mut ApplianceRecord) {
    to.last_checkin = from.last_checkin;
    to.peer = from.peer.clone();
    to.agent_version = from.agent_version.clone();
    to.agent_release = from.agent_release;
    to.agent_previous = from.agent_previous;
    to.active_slot = from.active_slot.clone();
}

fn owner_keys(record: &ApplianceRecord) -> impl Iterator<Item = String> + '_ {
    let name = (!record.name.is_empty()).then(|| format!("name:{}", record.name));
    record.macs.iter().map(|m| format!("mac:{m}")).chain(name)
}

impl Fleet {
    /// The fleet as stored: every record goes through [`Fleet::apply`], as at run time.
    pub fn from_snapshot(snapshot: Snapshot, config: FleetConfig) -> Self {
        let mut fleet = Self {
            config,
            audit_next: snapshot.audit_next.max(1),
            position: snapshot.position,
            sessions: snapshot.sessions,
            ..Self::default()
        };
        let mut changes: Vec<Change> = Vec::new();
        changes.extend(snapshot.releases.into_values().map(|r| Change::Release(Box::new(r))));
        changes.extend(snapshot.agent_releases.into_values().map(Change::AgentRelease));
        changes.extend(snapshot.rollouts.into_values().map(Change::Rollout));
        changes.extend(snapshot.appliances.into_values().map(|a| Change::Appliance(Box::new(a))));
        changes.extend(snapshot.sites.into_values().map(Change::Site));
        changes.extend(snapshot.meta.into_iter().map(|(key, value)| Change::Meta { key, value }));
        fleet.apply(&changes);
        // Counters are stored as totals and applied as increments.
        fleet.site_bytes = snapshot.site_bytes;
        fleet
    }

    /// Makes committed changes visible. Call only after the store has committed them.
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            match change {
                Change::Release(record) => {
                    self.releases.insert(record.version, (**record).clone());
                }
                Change::AgentRelease(record) => {
                    self.agent_releases.insert(record.version, record.clone());
                }
                Change::Rollout(rollout) => {
                    self.rollouts.insert(rollout.id, rollout.clone());
                }
                Change::Appliance(record) => self.put_appliance((**record).clone()),
                Change::ApplianceRemoved { key } => {
                    self.forget_appliance(key);
                    self.dirty.remove(key);
                }
                Change::Site(site) => {
                    self.sites.insert(site.id.clone(), site.clone());
                }
                Change::Meta { key, value } => {
                    self.meta.insert(key.clone(), value.clone());
                }
                Change::SiteBytes { site, version, add } => {
                    *self.site_bytes.entry((site.clone(), *version)).or_default() += add;
                }
                Change::Audit(entry) => self.audit_next = self.audit_next.max(entry.seq + 1),
                Change::Session { id_hash, session: Some(session) } => {
                    self.sessions.insert(id_hash.clone(), session.clone());
                }
                Change::Session { id_hash, session: None } => {
                    self.sessions.remove(id_hash);
                }
            }
        }
    }

    fn put_appliance(&mut self, mut record: ApplianceRecord) {
        if let Some(current) = self.appliances.get(&record.key)
            && current.last_checkin > record.last_checkin
        {
            copy_bookkeeping(current, &mut record);
        }
        self.forget_appliance(&record.key);
        self.members.entry(record.site.clone()).or_default().insert(record.key.clone());
        for owned in owner_keys(&record) {
            self.owners.insert(owned, record.key.clone());
        }
        self.appliances.insert(record.key.clone(), record);
    }

    fn forget_appliance(&mut self, key: &str) {
        let Some(old) = self.appliances.remove(key) else { return };
        if let Some(site) = self.members.get_mut(&old.site) {
            site.remove(key);
            if site.is_empty() {
                self.members.remove(&old.site);
            }
        }
        for owned in owner_keys(&old) {
            if self.owners.get(&owned).is_some_and(|owner| owner == key) {
                self.owners.remove(&owned);
            }
        }
    }

    /// The meta entry change for `key` (applied, like every change, after it is stored).
    pub fn meta_change(key: &str, value: String) -> Change {
        Change::Meta { key: key.to_owned(), value }
    }

    pub fn is_online(&self, appliance: &ApplianceRecord, now: Timestamp) -> bool {
        now.duration_since(appliance.last_checkin)
            <= SignedDuration::from_secs(self.config.offline_after_secs as i64)
    }

    /// What the engine sees of each member of `rollout`.
    fn views(&self, rollout: &Rollout, now: Timestamp) -> Vec<ApplianceView> {
        rollout
            .members
            .keys()
            .filter_map(|key| self.appliances.get(key))
            .map(|a| {
                let (update, running) = match rollout.kind {
                    RolloutKind::Image => (a.update.as_ref(), Some(a.installed_version)),
                    RolloutKind::Agent => (a.agent_update.as_ref(), a.agent_release),
                };
                let update = update.filter(|u| u.report.version == rollout.version);
                // A member already on the release (or a newer one) is never offered it: done.
                let already = (running.is_some_and(|v| v >= rollout.version) && update.is_none())
                    .then_some(UpdateState::Succeeded);
                ApplianceView {
                    key: a.key.clone(),
                    group: a.group.clone(),
                    state: update.map(|u| u.report.state).or(already),
                    state_since: update.map_or(a.registered, |u| u.since),
                    online: self.is_online(a, now),
                }
            })
            .collect()
    }

    fn release(&self, version: u64) -> Result<&ReleaseRecord, FleetError> {
        self.releases
            .get(&version)
            .ok_or_else(|| FleetError::NotFound(format!("release {version}")))
    }

    /// The release with this image: the newest active one, else the newest (one image may
    /// be signed again as a new release, the old one then deactivated).
    pub fn release_by_hash(&self, blake3: &str) -> Option<&ReleaseRecord> {
        let mut same = self.releases.values().rev().filter(|r| r.has_image() && r.blake3 == blake3);
        let newest = same.clone().next();
        same.find(|r| r.active).or(newest)
    }

    /// The release whose image's content index, outboard, group hashes or a plan is the blob
    /// `blake3`, if one is.
    pub fn release_by_side_file(&self, blake3: &str) -> Option<&ReleaseRecord> {
        self.releases.values().rev().find(|r| {
            r.index.as_deref() == Some(blake3)
                || r.outboard.as_ref().is_some_and(|o| o.blake3 == blake3)
                || r.group_hashes.as_ref().is_some_and(|g| g.blake3 == blake3)
                || r.plans.iter().any(|p| p.file.blake3 == blake3)
        })
    }

    /// The sequence number the next audit entry will get.
    pub fn next_audit_seq(&self) -> u64 {
        self.audit_next
    }

    /// Bookkeeping to flush (non-durably): appliances that only checked in. If the flush
    /// fails, [`Fleet::mark_dirty`] puts them back.
    pub fn take_dirty(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|key| {
                self.appliances.get(&key).map(|a| Change::Appliance(Box::new(a.clone())))
            })
            .collect()
    }

    pub fn mark_dirty(&mut self, changes: &[Change]) {
        for change in changes {
            if let Change::Appliance(record) = change {
                self.dirty.insert(record.key.clone());
            }
        }
    }

    /// Origin bytes served to a site for a release: an increment, so replicas add up.
    pub fn count_origin_bytes(site: &str, version: u64, bytes: u64) -> Change {
        Change::SiteBytes { site: site.to_owned(), version, add: bytes }
    }

    // ----- operator sessions and tokens -----

    /// Stores a sign-in to the Fleet Updates page, audited by the session's non-secret tag.
    pub fn session_opened(
        &self,
        new: &crate::session::NewSession,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> Vec<Change> {
        let mut batch = Batch::new(self);
        for change in crate::session::open(&self.sessions, new, ttl, now) {
            batch.push(change);
        }
        let expires = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
        let detail = serde_json::json!({"session": new.tag, "expires": expires});
        batch.audit(now, "operator", "session.open", detail);
        batch.finish()
    }

    /// Ends the session with cookie `id`, if it is live.
    pub fn session_closed(&self, id: &str, now: Timestamp) -> Vec<Change> {
        let mut batch = Batch::new(self);
        if let Some(session) = crate::session::live(&self.sessions, id, now) {
            let id_hash = crate::session::id_hash(id);
            batch.push(Change::Session { id_hash, session: None });
            let detail = serde_json::json!({"session": session.tag});
            batch.audit(now, "operator", "session.close", detail);
        }
        batch.finish()
    }

    /// A refused sign-in or operator request: who tried (address) and why.
    pub fn auth_refused(&self, what: &str, from: &str, now: Timestamp) -> Vec<Change> {
        let mut batch = Batch::new(self);
        let detail = serde_json::json!({"from": from, "reason": what});
        batch.audit(now, "anonymous", "auth.refused", detail);
        batch.finish()
    }

    /// A token set or replaced (its hash stored, never the token).
    pub fn token_set(&self, key: &str, hash: String, why: &str, now: Timestamp) -> Vec<Change> {
        let mut batch = Batch::new(self);
        batch.push(Self::meta_change(key, hash));
        let detail = serde_json::json!({"token": key, "reason": why});
        batch.audit(now, "system", "token.set", detail);
        batch.finish()
    }
}
