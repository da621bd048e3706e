//! The fleet as the coordinator knows it, in memory, and every operation on it. Operations
//! return the [`Change`]s to commit; the HTTP layer commits them and only then answers. No I/O
//! here, and time is passed in.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sitecast_manifest::api::{
    CheckinRequest, CheckinResponse, OriginUrls, ReportRequest, SitePeer, UpdateIntent,
    UpdateState, normalize_mac,
};
use sitecast_manifest::window::MaintenanceWindow;

use crate::engine::{
    self, ApplianceView, Decision, Rollout, RolloutState, StageCounts, StagePlan, Strategy,
};
use crate::store::{
    ApplianceRecord, AuditEntry, Change, ReleaseRecord, SiteRecord, Snapshot, UpdateRow,
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

/// A request to start a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRequest {
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
}

/// A rollout with its live counts, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub stage_counts: Vec<StageCounts>,
    pub failure_rate: f64,
    pub next_stage_at: Option<Timestamp>,
}

/// The release whose offload the Sites view shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRelease {
    pub version: u64,
    pub version_name: String,
    pub size: u64,
}

/// A maintenance window occurrence, as instants and as the site's wall-clock reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowOccurrence {
    pub start: Timestamp,
    pub end: Timestamp,
    /// E.g. `Tue 24 Nov 02:00–05:00 CET`, in the window's time zone.
    pub local: String,
    /// Open at the coordinator's `now`.
    pub open: bool,
}

/// One site at a glance: its appliances, its window, and how much of the current release came
/// from the origin rather than from LAN peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSummary {
    pub site: String,
    pub appliances: usize,
    pub online: usize,
    pub offline: usize,
    /// Appliances with the current release (or newer) installed.
    pub on_release: usize,
    pub window: MaintenanceWindow,
    /// No window was set for the site, so the fleet default applies.
    pub window_is_default: bool,
    /// The window open now, or the next one; `None` if it never opens.
    pub next_window: Option<WindowOccurrence>,
    /// Bytes of the current release the origin served to the site.
    pub origin_bytes: u64,
    /// `origin_bytes` ÷ image size: about 1 when the site shares one copy over its LAN.
    pub origin_copies: Option<f64>,
    /// Bytes of the current release the site's appliances report having from LAN peers.
    pub lan_bytes: u64,
}

/// `GET /api/sites`: every site, with the coordinator's clock so ages can be shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SitesOverview {
    pub server_time: Timestamp,
    pub release: Option<SiteRelease>,
    pub sites: Vec<SiteSummary>,
    /// Origin bytes of the current release served to unsigned requests (legacy agents, humans).
    pub unattributed_origin_bytes: u64,
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
    pub rollouts: BTreeMap<u64, Rollout>,
    pub appliances: BTreeMap<String, ApplianceRecord>,
    pub sites: BTreeMap<String, SiteRecord>,
    pub meta: BTreeMap<String, String>,
    pub site_bytes: BTreeMap<(String, u64), u64>,
    audit_next: u64,
    /// Appliances whose bookkeeping changed since the last flush.
    dirty: BTreeSet<String>,
    pub config: FleetConfig,
    /// The coordinator's iroh-blobs provider addresses, handed to appliances.
    pub iroh_addresses: Vec<String>,
    /// Appliance keys by site: a check-in lists its site's peers without scanning the fleet.
    members: BTreeMap<String, BTreeSet<String>>,
}

impl Fleet {
    pub fn from_snapshot(snapshot: Snapshot, config: FleetConfig) -> Self {
        let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for appliance in snapshot.appliances.values() {
            members.entry(appliance.site.clone()).or_default().insert(appliance.key.clone());
        }
        Self {
            members,
            releases: snapshot.releases,
            rollouts: snapshot.rollouts,
            appliances: snapshot.appliances,
            sites: snapshot.sites,
            meta: snapshot.meta,
            site_bytes: snapshot.site_bytes,
            audit_next: snapshot.audit_next.max(1),
            dirty: BTreeSet::new(),
            config,
            iroh_addresses: Vec::new(),
        }
    }

    fn audit(
        &mut self,
        changes: &mut Vec<Change>,
        now: Timestamp,
        actor: &str,
        action: &str,
        detail: serde_json::Value,
    ) {
        let entry = AuditEntry {
            seq: self.audit_next,
            at: now,
            actor: actor.to_owned(),
            action: action.to_owned(),
            detail,
        };
        self.audit_next += 1;
        changes.push(Change::Audit(entry));
    }

    pub fn meta_change(&mut self, key: &str, value: String) -> Change {
        self.meta.insert(key.to_owned(), value.clone());
        Change::Meta { key: key.to_owned(), value }
    }

    // ----- releases -----

    pub fn publish(
        &mut self,
        record: ReleaseRecord,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if self.releases.contains_key(&record.version) {
            return Err(FleetError::Conflict(format!(
                "release {} is already published",
                record.version
            )));
        }
        let mut changes = vec![Change::Release(record.clone())];
        let detail =
            json!({"version": record.version, "blake3": record.blake3, "size": record.size});
        self.audit(&mut changes, now, "operator", "release.publish", detail);
        self.releases.insert(record.version, record);
        Ok(changes)
    }

    fn release(&self, version: u64) -> Result<&ReleaseRecord, FleetError> {
        self.releases
            .get(&version)
            .ok_or_else(|| FleetError::NotFound(format!("release {version}")))
    }

    pub fn deactivate(&mut self, version: u64, now: Timestamp) -> Result<Vec<Change>, FleetError> {
        let release = self
            .releases
            .get_mut(&version)
            .ok_or_else(|| FleetError::NotFound(format!("release {version}")))?;
        release.active = false;
        let mut changes = vec![Change::Release(release.clone())];
        self.audit(
            &mut changes,
            now,
            "operator",
            "release.deactivate",
            json!({"version": version}),
        );
        Ok(changes)
    }

    // ----- rollouts -----

    pub fn create_rollout(
        &mut self,
        request: RolloutRequest,
        now: Timestamp,
    ) -> Result<(u64, Vec<Change>), FleetError> {
        let release = self.release(request.version)?;
        if !release.active {
            return Err(FleetError::Conflict(format!(
                "release {} is deactivated",
                request.version
            )));
        }
        if let Some(running) = self
            .rollouts
            .values()
            .find(|r| matches!(r.state, RolloutState::InProgress | RolloutState::Paused))
        {
            return Err(FleetError::Conflict(format!(
                "rollout {} of release {} is still {}; complete or roll it back first",
                running.id,
                running.version,
                running.state.as_str()
            )));
        }
        let previous_version =
            self.releases.range(..request.version).rev().find(|(_, r)| r.active).map(|(v, _)| *v);
        let targets: Vec<String> = self
            .appliances
            .values()
            .filter(|a| {
                request.groups.is_empty()
                    || a.group.as_ref().is_some_and(|g| request.groups.contains(g))
            })
            .map(|a| a.key.clone())
            .collect();
        let id = self.rollouts.keys().next_back().map_or(1, |id| id + 1);
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
        if let Some(threshold) = request.failure_threshold {
            if !(0.0..=1.0).contains(&threshold) {
                return Err(FleetError::Invalid(format!(
                    "failure_threshold {threshold} is not within 0..1"
                )));
            }
            rollout.failure_threshold = threshold;
        }
        if let Some(deadline) = request.report_deadline_secs {
            rollout.report_deadline_secs = deadline;
        }
        let mut changes = vec![Change::Rollout(rollout.clone())];
        let detail = json!({"rollout": id, "version": rollout.version, "strategy": rollout.strategy, "targets": targets.len()});
        self.audit(&mut changes, now, "operator", "rollout.create", detail);
        self.rollouts.insert(id, rollout);
        Ok((id, changes))
    }

    pub fn control(
        &mut self,
        id: u64,
        action: &str,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| FleetError::NotFound(format!("rollout {id}")))?;
        let finished = matches!(rollout.state, RolloutState::Completed | RolloutState::Failed);
        match action {
            _ if finished && action != "rollback" => {
                return Err(FleetError::Conflict(format!(
                    "rollout {id} is {}",
                    rollout.state.as_str()
                )));
            }
            "pause" => {
                rollout.state = RolloutState::Paused;
                rollout.paused_reason = Some("paused by operator".into());
            }
            "resume" => {
                rollout.state = RolloutState::InProgress;
                rollout.paused_reason = None;
            }
            "advance" => {
                if rollout.current_stage >= rollout.last_stage() {
                    return Err(FleetError::Conflict(format!("rollout {id} is at its last stage")));
                }
                rollout.current_stage += 1;
                rollout.stage_started = now;
                rollout.state = RolloutState::InProgress;
                rollout.paused_reason = None;
            }
            "rollback" => {
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
                let floor =
                    self.releases.get(&rollout.version).and_then(|r| r.rollback_floor).unwrap_or(0);
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
            other => return Err(FleetError::Invalid(format!("unknown rollout action {other:?}"))),
        }
        let mut changes = vec![Change::Rollout(rollout.clone())];
        let detail = json!({"rollout": id, "stage": rollout.current_stage, "state": rollout.state});
        self.audit(&mut changes, now, "operator", &format!("rollout.{action}"), detail);
        Ok(changes)
    }

    pub fn rollout_view(&self, rollout: &Rollout, now: Timestamp) -> RolloutView {
        let views = self.views(rollout, now);
        RolloutView {
            rollout: rollout.clone(),
            stage_counts: rollout.stage_counts(&views),
            failure_rate: rollout.failure_rate(&views),
            next_stage_at: rollout.next_stage_at(),
        }
    }

    fn views(&self, rollout: &Rollout, now: Timestamp) -> Vec<ApplianceView> {
        self.appliances
            .values()
            .map(|a| {
                let update = a.update.as_ref().filter(|u| u.report.version == rollout.version);
                ApplianceView {
                    key: a.key.clone(),
                    group: a.group.clone(),
                    state: update.map(|u| u.report.state),
                    state_since: update.map_or(a.registered, |u| u.since),
                    online: self.is_online(a, now),
                }
            })
            .collect()
    }

    pub fn is_online(&self, appliance: &ApplianceRecord, now: Timestamp) -> bool {
        now.duration_since(appliance.last_checkin)
            <= SignedDuration::from_secs(self.config.offline_after_secs as i64)
    }

    /// Runs the engine over every live rollout.
    pub fn tick(&mut self, now: Timestamp) -> Vec<Change> {
        let mut changes = Vec::new();
        let live: Vec<u64> = self
            .rollouts
            .values()
            .filter(|r| matches!(r.state, RolloutState::InProgress | RolloutState::Paused))
            .map(|r| r.id)
            .collect();
        for id in live {
            let rollout = self.rollouts[&id].clone();
            let decisions = engine::decide(&rollout, &self.views(&rollout, now), now);
            if decisions.is_empty() {
                continue;
            }
            let mut updated = rollout;
            for decision in &decisions {
                if let Decision::MarkFailed { appliance, reason } = decision
                    && let Some(record) = self.appliances.get_mut(appliance)
                    && let Some(update) = record.update.as_mut()
                {
                    update.report.state = UpdateState::Failed;
                    update.report.error = Some(reason.clone());
                    update.since = now;
                    changes.push(Change::Appliance(Box::new(record.clone())));
                }
                updated.apply(decision, now);
                let detail = json!({"rollout": id, "decision": format!("{decision:?}")});
                self.audit(&mut changes, now, "system", "rollout.decide", detail);
            }
            changes.push(Change::Rollout(updated.clone()));
            self.rollouts.insert(id, updated);
        }
        changes
    }

    // ----- appliances -----

    /// Registers or refreshes an appliance and says whether an update is due for it.
    pub fn checkin(
        &mut self,
        key: &str,
        request: CheckinRequest,
        enrollment_ok: bool,
        now: Timestamp,
        public_url: &str,
    ) -> Result<(CheckinResponse, Vec<Change>, bool), FleetError> {
        let macs: Vec<String> = request.macs.iter().filter_map(|m| normalize_mac(m)).collect();
        if macs.len() != request.macs.len() {
            return Err(FleetError::Invalid(format!(
                "unreadable MAC address in {:?}",
                request.macs
            )));
        }
        if request.site.trim().is_empty() {
            return Err(FleetError::Invalid("site must not be empty".into()));
        }
        let mut changes = Vec::new();
        let previous_site = self.appliances.get(key).map(|a| a.site.clone());
        let registered = previous_site.is_none();
        if registered {
            if !enrollment_ok {
                return Err(FleetError::UnknownAppliance(key.to_owned()));
            }
            let detail = json!({"appliance": key, "site": request.site, "macs": macs});
            self.audit(
                &mut changes,
                now,
                &format!("appliance:{key}"),
                "appliance.register",
                detail,
            );
            // Everything else is filled in below, as on every check-in.
            let record = ApplianceRecord {
                key: key.to_owned(),
                registered: now,
                ..ApplianceRecord::default()
            };
            self.appliances.insert(key.to_owned(), record);
        }
        if previous_site.as_deref() != Some(request.site.as_str()) {
            if let Some(previous) = previous_site.and_then(|site| self.members.get_mut(&site)) {
                previous.remove(key);
            }
            self.members.entry(request.site.clone()).or_default().insert(key.to_owned());
        }
        let record = self.appliances.get_mut(key).expect("registered above");
        record.site = request.site;
        record.name = request.name;
        record.group = request.group;
        record.macs = macs;
        record.platform = request.platform;
        record.installed_version = request.installed_version;
        record.active_slot = request.active_slot;
        record.agent_version = request.agent_version;
        record.peer = request.peer;
        record.last_checkin = now;
        let record = record.clone();
        if registered {
            changes.push(Change::Appliance(Box::new(record.clone())));
        } else {
            self.dirty.insert(key.to_owned());
        }
        let response = self.offer(&record, now, public_url);
        Ok((response, changes, registered))
    }

    fn offer(
        &self,
        appliance: &ApplianceRecord,
        now: Timestamp,
        public_url: &str,
    ) -> CheckinResponse {
        let site_window = self.sites.get(&appliance.site).map(|s| s.window.clone());
        let window = appliance
            .window
            .clone()
            .or(site_window)
            .unwrap_or_else(|| self.config.default_window.clone());
        let mut response = CheckinResponse {
            appliance: appliance.key.clone(),
            update_available: false,
            intent: None,
            manifest: None,
            version: None,
            rollout: None,
            origin: None,
            window: Some(window),
            site_peers: Vec::new(),
            checkin_interval_secs: Some(self.config.checkin_interval_secs),
            server_time: now,
        };
        let Some((release, intent, rollout)) = self.due(appliance) else {
            return response;
        };
        response.update_available = true;
        response.intent = Some(intent);
        response.manifest = Some(release.manifest.clone());
        response.version = Some(release.version);
        response.rollout = rollout;
        response.origin = Some(OriginUrls {
            ranges: format!("{public_url}/api/blobs/{}/ranges", release.blake3),
            image: format!("{public_url}/api/releases/{}/image", release.version),
            iroh: self.iroh_addresses.clone(),
        });
        response.site_peers = self
            .members
            .get(&appliance.site)
            .into_iter()
            .flatten()
            .filter_map(|key| self.appliances.get(key))
            .filter(|p| p.key != appliance.key && self.is_online(p, now))
            .map(|p| SitePeer {
                appliance: p.key.clone(),
                addresses: p.peer.clone(),
                installed_version: p.installed_version,
                state: p
                    .update
                    .as_ref()
                    .filter(|u| u.report.version == release.version)
                    .map(|u| u.report.state),
            })
            .collect();
        response
    }

    /// The version a group is pinned to (kept as a meta entry `pin.group.<name>`).
    pub fn group_pin(&self, group: &str) -> Option<u64> {
        self.meta.get(&format!("pin.group.{group}")).and_then(|v| v.parse().ok())
    }

    /// Pins every appliance of `group` to a version (or unpins the group); an appliance's own
    /// pin wins over its group's.
    pub fn pin_group(
        &mut self,
        group: &str,
        version: Option<u64>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if let Some(v) = version {
            self.release(v)?;
        }
        let value = version.map(|v| v.to_string()).unwrap_or_default();
        let mut changes = vec![self.meta_change(&format!("pin.group.{group}"), value)];
        self.audit(
            &mut changes,
            now,
            "operator",
            "group.pin",
            json!({"group": group, "version": version}),
        );
        Ok(changes)
    }

    /// The release due for this appliance, if any: a pin (the appliance's, else its group's)
    /// first, then a fleet rollback, then the rollout's stage.
    fn due(
        &self,
        appliance: &ApplianceRecord,
    ) -> Option<(&ReleaseRecord, UpdateIntent, Option<u64>)> {
        let usable = |version: u64| {
            self.releases.get(&version).filter(|r| {
                r.active && (r.platforms.is_empty() || r.platforms.contains(&appliance.platform))
            })
        };
        let group_pin = appliance.group.as_deref().and_then(|g| self.group_pin(g));
        if let Some(pin) = appliance.pin_version.or(group_pin) {
            if pin == appliance.installed_version {
                return None;
            }
            let intent = if pin > appliance.installed_version {
                UpdateIntent::Upgrade
            } else {
                UpdateIntent::Rollback
            };
            return usable(pin).map(|r| (r, intent, None));
        }
        for rollout in self.rollouts.values().rev() {
            if rollout.rolled_back && appliance.installed_version == rollout.version {
                let previous = rollout.previous_version?;
                return usable(previous).map(|r| (r, UpdateIntent::Rollback, Some(rollout.id)));
            }
        }
        let rollout = self.rollouts.values().rev().find(|r| r.state == RolloutState::InProgress)?;
        if rollout.version <= appliance.installed_version
            || !rollout.offers_to(&appliance.key, appliance.group.as_deref())
        {
            return None;
        }
        usable(rollout.version).map(|r| (r, UpdateIntent::Upgrade, Some(rollout.id)))
    }

    /// Records an appliance's report of its update.
    pub fn report(
        &mut self,
        key: &str,
        report: ReportRequest,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let record = self
            .appliances
            .get_mut(key)
            .ok_or_else(|| FleetError::UnknownAppliance(key.to_owned()))?;
        if report.state == UpdateState::Unknown {
            return Err(FleetError::Invalid("unknown update state".into()));
        }
        let changed_state = record
            .update
            .as_ref()
            .is_none_or(|u| u.report.state != report.state || u.report.version != report.version);
        let started = record
            .update
            .as_ref()
            .filter(|u| u.report.version == report.version)
            .map_or(now, |u| u.started);
        let since =
            if changed_state { now } else { record.update.as_ref().map_or(now, |u| u.since) };
        if matches!(report.state, UpdateState::Succeeded) {
            record.installed_version = report.version;
            record.active_slot = report.slot.clone().or(record.active_slot.take());
        }
        let detail = changed_state.then(
            || json!({"version": report.version, "state": report.state, "error": report.error}),
        );
        record.update = Some(UpdateRow { report, started, since });
        record.last_checkin = now;
        let mut changes = vec![Change::Appliance(Box::new(record.clone()))];
        if let Some(detail) = detail {
            self.audit(&mut changes, now, &format!("appliance:{key}"), "appliance.report", detail);
        }
        Ok(changes)
    }

    /// Pins an appliance to a version (or unpins it).
    pub fn pin(
        &mut self,
        key: &str,
        version: Option<u64>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if let Some(v) = version {
            self.release(v)?;
        }
        let record = self
            .appliances
            .get_mut(key)
            .ok_or_else(|| FleetError::NotFound(format!("appliance {key}")))?;
        record.pin_version = version;
        let mut changes = vec![Change::Appliance(Box::new(record.clone()))];
        self.audit(
            &mut changes,
            now,
            "operator",
            "appliance.pin",
            json!({"appliance": key, "version": version}),
        );
        Ok(changes)
    }

    /// Overrides (or with `None`, clears) the maintenance window of one appliance.
    pub fn set_appliance_window(
        &mut self,
        key: &str,
        window: Option<MaintenanceWindow>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if let Some(window) = &window {
            window.validate().map_err(|e| FleetError::Invalid(e.to_string()))?;
        }
        let record = self
            .appliances
            .get_mut(key)
            .ok_or_else(|| FleetError::NotFound(format!("appliance {key}")))?;
        record.window = window.clone();
        let mut changes = vec![Change::Appliance(Box::new(record.clone()))];
        self.audit(
            &mut changes,
            now,
            "operator",
            "appliance.window",
            json!({"appliance": key, "window": window}),
        );
        Ok(changes)
    }

    pub fn set_site_window(
        &mut self,
        site: &str,
        window: MaintenanceWindow,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        window.validate().map_err(|e| FleetError::Invalid(e.to_string()))?;
        let record = SiteRecord { id: site.to_owned(), window };
        let mut changes = vec![Change::Site(record.clone())];
        self.audit(
            &mut changes,
            now,
            "operator",
            "site.window",
            json!({"site": site, "window": record.window}),
        );
        self.sites.insert(site.to_owned(), record);
        Ok(changes)
    }

    /// Origin bytes served to a site for a release.
    pub fn count_origin_bytes(&mut self, site: &str, version: u64, bytes: u64) -> Change {
        let total = self.site_bytes.entry((site.to_owned(), version)).or_default();
        *total += bytes;
        Change::SiteBytes { site: site.to_owned(), version, total: *total }
    }

    /// Bookkeeping to flush (non-durably): appliances that only checked in.
    pub fn take_dirty(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|key| {
                self.appliances.get(&key).map(|a| Change::Appliance(Box::new(a.clone())))
            })
            .collect()
    }

    pub fn release_by_hash(&self, blake3: &str) -> Option<&ReleaseRecord> {
        self.releases.values().find(|r| r.blake3 == blake3)
    }

    /// The sequence number the next audit entry will get.
    pub fn next_audit_seq(&self) -> u64 {
        self.audit_next
    }

    // ----- operator sessions -----

    /// Records a sign-in to the Fleet Updates page (by the session's non-secret tag).
    pub fn session_opened(&mut self, tag: &str, expires: Timestamp, now: Timestamp) -> Vec<Change> {
        let mut changes = Vec::new();
        let detail = json!({"session": tag, "expires": expires});
        self.audit(&mut changes, now, "operator", "session.open", detail);
        changes
    }

    pub fn session_closed(&mut self, tag: &str, now: Timestamp) -> Vec<Change> {
        let mut changes = Vec::new();
        self.audit(&mut changes, now, "operator", "session.close", json!({"session": tag}));
        changes
    }

    // ----- sites -----

    /// The release the fleet is on its way to: the newest rollout's, else the newest active
    /// release.
    pub fn current_release(&self) -> Option<&ReleaseRecord> {
        match self.rollouts.values().next_back() {
            Some(rollout) => self.releases.get(&rollout.version),
            None => self.releases.values().rev().find(|r| r.active),
        }
    }

    /// Every site that has appliances or a window, with its offload for the current release.
    pub fn sites_overview(&self, now: Timestamp) -> SitesOverview {
        let release = self.current_release();
        let version = release.map(|r| r.version);
        let mut names: BTreeSet<&str> = self.sites.keys().map(String::as_str).collect();
        names.extend(self.appliances.values().map(|a| a.site.as_str()));
        let origin_of = |site: &str| {
            version.map_or(0, |v| self.site_bytes.get(&(site.to_owned(), v)).copied().unwrap_or(0))
        };
        let sites = names
            .into_iter()
            .map(|site| {
                let members: Vec<&ApplianceRecord> =
                    self.appliances.values().filter(|a| a.site == site).collect();
                let online = members.iter().filter(|a| self.is_online(a, now)).count();
                let (window, window_is_default) = match self.sites.get(site) {
                    Some(record) => (record.window.clone(), false),
                    None => (self.config.default_window.clone(), true),
                };
                let origin_bytes = origin_of(site);
                let lan_bytes = members
                    .iter()
                    .filter_map(|a| a.update.as_ref())
                    .filter(|u| Some(u.report.version) == version)
                    .map(|u| u.report.bytes_from_lan)
                    .sum();
                SiteSummary {
                    site: site.to_owned(),
                    appliances: members.len(),
                    online,
                    offline: members.len() - online,
                    on_release: members
                        .iter()
                        .filter(|a| version.is_some_and(|v| a.installed_version >= v))
                        .count(),
                    next_window: window_occurrence(&window, now),
                    window,
                    window_is_default,
                    origin_bytes,
                    origin_copies: release
                        .filter(|r| r.size > 0)
                        .map(|r| origin_bytes as f64 / r.size as f64),
                    lan_bytes,
                }
            })
            .collect();
        SitesOverview {
            server_time: now,
            release: release.map(|r| SiteRelease {
                version: r.version,
                version_name: r.version_name.clone(),
                size: r.size,
            }),
            sites,
            unattributed_origin_bytes: origin_of("unattributed"),
        }
    }
}

/// The window open at `now` or the next one, written in the window's own time zone.
fn window_occurrence(window: &MaintenanceWindow, now: Timestamp) -> Option<WindowOccurrence> {
    let (start, end) = window.current_or_next(now).ok().flatten()?;
    let tz = jiff::tz::TimeZone::get(&window.timezone).ok()?;
    let start_local = start.to_zoned_datetime(tz.clone());
    let end_local = end.to_zoned_datetime(tz);
    let end_format =
        if start_local.date() == end_local.date() { "%H:%M %Z" } else { "%a %H:%M %Z" };
    let local =
        format!("{}–{}", start_local.strftime("%a %-d %b %H:%M"), end_local.strftime(end_format));
    Some(WindowOccurrence { start, end, local, open: start <= now })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sitecast_manifest::window::Weekday;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn window(start: &str, end: &str, tz: &str, days: &[Weekday]) -> MaintenanceWindow {
        MaintenanceWindow {
            start: start.into(),
            end: end.into(),
            timezone: tz.into(),
            days: days.to_vec(),
        }
    }

    #[test]
    fn windows_are_written_in_the_sites_own_time() {
        // Sunday 2026-03-29 is the spring-forward day in Berlin: 02:00 does not exist and the
        // window opens at 03:00 CEST.
        let berlin = window("02:00", "05:00", "Europe/Berlin", &[Weekday::Sun]);
        let next = window_occurrence(&berlin, ts("2026-03-28T12:00:00Z")).expect("a window");
        assert_eq!(next.local, "Sun 29 Mar 03:00–05:00 CEST");
        assert_eq!((next.start, next.open), (ts("2026-03-29T01:00:00Z"), false));
        // Crossing midnight names the second day; open now says so.
        let nyc = window("22:00", "02:00", "America/New_York", &[Weekday::Mon]);
        let open = window_occurrence(&nyc, ts("2026-11-24T04:00:00Z")).expect("a window");
        assert_eq!(open.local, "Mon 23 Nov 22:00–Tue 02:00 EST");
        assert!(open.open);
        assert_eq!(
            window_occurrence(&window("02:00", "05:00", "UTC", &[]), ts("2026-11-24T04:00:00Z")),
            None
        );
    }
}
