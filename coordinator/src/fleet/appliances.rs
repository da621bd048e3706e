//! Appliances: check-ins (enrollment, identity, the offer), reports, pins and windows.
//!
//! A report counts only for an offer the appliance was actually given: the offer is stored
//! (durably, before the answer that carries it) and a report about any other release is
//! refused. Reports carry a sequence number that must rise, so a captured report cannot be
//! sent again or out of order.

use jiff::Timestamp;
use serde_json::json;
use sitecast_manifest::api::{
    AgentOffer, BlobOffer, CheckinRequest, CheckinResponse, InstalledImage, OriginUrls,
    ReportRequest, SitePeer, UpdateIntent, UpdateState,
};
use sitecast_manifest::window::MaintenanceWindow;
use sitecast_manifest::{Blake3Hash, Sha256Hash};

use super::agents::{AgentDue, agent_offer_record, record_agent_state};
use super::rollouts::runs_on;
use super::validate::{self, CheckedIdentity};
use super::{Batch, Fleet, FleetError};
use crate::engine::{RolloutKind, RolloutState};
use crate::store::{ApplianceRecord, Change, OfferRecord, ReleaseRecord, StoredFile, UpdateRow};

/// What a check-in needs stored before it is answered, and the answer.
#[derive(Debug)]
pub struct CheckinPlan {
    /// To commit durably, then apply: registration, identity changes, a new offer.
    pub durable: Vec<Change>,
    /// The record with this check-in's bookkeeping (last seen, addresses), applied after.
    pub seen: ApplianceRecord,
    pub response: CheckinResponse,
    pub registered: bool,
}

/// Whether a check-in from an unknown key may enroll it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrollment {
    /// The fleet's enrollment token came with it.
    Token,
    None,
}

/// What authenticated a report, for refusing replays from agents that send no sequence number.
#[derive(Debug, Clone)]
pub struct ReportAuth {
    /// The signed request's timestamp (seconds).
    pub timestamp: i64,
    /// A digest of the request's signature.
    pub signature: String,
}

impl Fleet {
    /// Registers or refreshes an appliance and says whether an update is due for it.
    pub fn checkin(
        &self,
        key: &str,
        request: CheckinRequest,
        enrollment: Enrollment,
        now: Timestamp,
        public_url: &str,
    ) -> Result<CheckinPlan, FleetError> {
        let identity = validate::checkin(&request)?;
        let existing = self.appliances.get(key);
        if existing.is_none() && enrollment != Enrollment::Token {
            return Err(FleetError::UnknownAppliance(key.to_owned()));
        }
        self.check_identity_is_free(key, existing, &identity)?;
        let mut record = existing.cloned().unwrap_or_else(|| ApplianceRecord {
            key: key.to_owned(),
            registered: now,
            ..ApplianceRecord::default()
        });
        let before = record.clone();
        self.set_identity(&mut record, identity, request.installed_version);
        record.active_slot = request.active_slot;
        record.agent_version = validate::clip(&request.agent_version, validate::MAX_TEXT);
        record.agent_release = request.agent_release;
        record.agent_previous = request.agent_previous;
        record.peer = validate::peer_addresses(request.peer);
        record.last_checkin = now;

        let mut batch = Batch::new(self);
        let actor = format!("appliance:{key}");
        let offer = self.due(&record);
        let offered = offer.as_ref().map(|(release, intent, rollout)| OfferRecord {
            rollout: *rollout,
            version: release.version,
            intent: *intent,
            at: now,
        });
        let new_offer = offered.as_ref().is_some_and(|o| {
            record
                .offer
                .as_ref()
                .is_none_or(|old| (old.rollout, old.version) != (o.rollout, o.version))
        });
        if new_offer {
            record.offer = offered.clone();
        }
        let registered = existing.is_none();
        let changed = identity_changes(&before, &record);
        if registered {
            let detail = json!({"appliance": key, "site": record.site, "name": record.name,
                "group": record.group, "macs": record.macs, "platform": record.platform});
            batch.audit(now, &actor, "appliance.register", detail);
        } else if !changed.is_empty() {
            batch.audit(now, &actor, "appliance.update", json!(changed));
        }
        let agent_due = self.agent_due(&record, now);
        let agent_changed =
            self.settle_agent_offer(&mut record, agent_due.as_ref(), now, &mut batch);
        if let Some(claim) = record.claimed_version.filter(|c| before.claimed_version != Some(*c)) {
            let detail = json!({"claimed": claim, "recorded": record.installed_version});
            batch.audit(now, &actor, "appliance.version_unverified", detail);
        }
        if new_offer && let Some(o) = &offered {
            let detail = json!({"version": o.version, "rollout": o.rollout, "intent": o.intent});
            batch.audit(now, &actor, "appliance.offer", detail);
        }
        if registered
            || !changed.is_empty()
            || new_offer
            || agent_changed
            || record.claimed_version != before.claimed_version
        {
            batch.push(Change::Appliance(Box::new(record.clone())));
        }
        let mut response = self.answer(&record, offer, now, public_url);
        if agent_due.is_some() && response.site_peers.is_empty() {
            // An agent release's files come through the site swarm as an image does.
            response.site_peers = self.site_peers(&record, None, now);
        }
        response.agent_offer = agent_due.map(|due| AgentOffer {
            version: due.release.version,
            manifest: due.release.manifest.clone(),
            rollout: due.rollout,
            intent: due.intent,
            files: format!("{public_url}/api/agent-releases/files"),
            ranges: Some(format!("{public_url}/api/blobs")),
            in_window: due.in_window,
        });
        Ok(CheckinPlan { durable: batch.finish(), seen: record, response, registered })
    }

    /// Applies check-in bookkeeping that needs no durable commit (so the identity, and with
    /// it the site and owner indexes, is as stored).
    pub fn note_seen(&mut self, seen: ApplianceRecord) {
        // Only the bookkeeping: whatever else is stored stays as stored.
        let Some(current) = self.appliances.get_mut(&seen.key) else { return };
        super::copy_bookkeeping(&seen, current);
        self.dirty.insert(seen.key);
    }

    /// Stores a new agent offer, and the success of the offered one when the appliance checks
    /// in running it. Whether `record` changed.
    fn settle_agent_offer(
        &self,
        record: &mut ApplianceRecord,
        due: Option<&AgentDue<'_>>,
        now: Timestamp,
        batch: &mut Batch<'_>,
    ) -> bool {
        let actor = format!("appliance:{}", record.key);
        let mut changed = false;
        if let Some(due) = due {
            let offer = agent_offer_record(due, now);
            let new = record
                .agent_offer
                .as_ref()
                .is_none_or(|old| (old.rollout, old.version) != (offer.rollout, offer.version));
            if new {
                let detail = json!({"version": offer.version, "rollout": offer.rollout,
                    "intent": offer.intent});
                batch.audit(now, &actor, "appliance.agent_offer", detail);
                record.agent_offer = Some(offer);
                changed = true;
            }
        }
        // The offered release checking in is its heartbeat: the switch worked.
        let offered = record.agent_offer.as_ref().map(|o| (o.version, o.rollout));
        if let Some((version, rollout)) = offered
            && record.agent_release == Some(version)
            && record.agent_update.as_ref().is_none_or(|u| {
                u.report.version != version || u.report.state != UpdateState::Succeeded
            })
        {
            // What the agent reported of this update (its bytes, the release it left) stays.
            let earlier =
                (record.agent_update.as_ref()).filter(|u| u.report.version == version).map(|u| {
                    (u.report.previous_version, u.report.bytes_from_origin, u.report.bytes_from_lan)
                });
            let (previous_version, bytes_from_origin, bytes_from_lan) =
                earlier.unwrap_or((None, 0, 0));
            let report = ReportRequest {
                state: UpdateState::Succeeded,
                version,
                previous_version,
                rollout,
                progress: None,
                bytes_from_origin,
                bytes_from_lan,
                bytes_from_mirror: 0,
                bytes_reused: 0,
                slot: None,
                error: None,
                seq: None,
            };
            record_agent_state(record, report, now, batch, &actor);
            changed = true;
        }
        changed
    }

    /// A name or MAC this appliance did not have before must not belong to another one (what
    /// it already had stays its own, even if stored twice before names and MACs were checked).
    fn check_identity_is_free(
        &self,
        key: &str,
        existing: Option<&ApplianceRecord>,
        identity: &CheckedIdentity,
    ) -> Result<(), FleetError> {
        let had_name = existing.is_some_and(|e| e.name == identity.name);
        let had_mac = |mac: &String| existing.is_some_and(|e| e.macs.contains(mac));
        let name = (!identity.name.is_empty() && !had_name)
            .then(|| (format!("name:{}", identity.name), format!("name {:?}", identity.name)));
        let macs = identity
            .macs
            .iter()
            .filter(|m| !had_mac(m))
            .map(|m| (format!("mac:{m}"), format!("MAC address {m}")));
        for (owned, what) in macs.chain(name) {
            if let Some(owner) = self.owners.get(&owned).filter(|owner| *owner != key) {
                return Err(FleetError::IdentityTaken { what, owner: owner.clone() });
            }
        }
        Ok(())
    }

    /// Takes what the appliance says about itself; an installed version that no release
    /// explains is kept apart as a claim, not recorded as installed.
    fn set_identity(&self, record: &mut ApplianceRecord, identity: CheckedIdentity, claim: u64) {
        record.site = identity.site;
        record.name = identity.name;
        record.group = identity.group;
        record.macs = identity.macs;
        record.platform = identity.platform;
        // A version we published, one older than the newest (a factory image that was never
        // published here), or the one already recorded: believable. Anything else is a claim.
        let newest = self.releases.keys().next_back().copied();
        let believable = self.releases.contains_key(&claim)
            || newest.is_some_and(|n| claim <= n)
            || claim == record.installed_version;
        if believable {
            record.installed_version = claim;
            record.claimed_version = None;
        } else {
            record.claimed_version = Some(claim);
        }
    }

    /// The maintenance window `appliance` keeps: its own, else its site's, else the default.
    pub(super) fn window_of(&self, appliance: &ApplianceRecord) -> MaintenanceWindow {
        let site_window = self.sites.get(&appliance.site).map(|s| s.window.clone());
        appliance
            .window
            .clone()
            .or(site_window)
            .unwrap_or_else(|| self.config.default_window.clone())
    }

    /// The check-in answer for `appliance`, given what is due for it.
    fn answer(
        &self,
        appliance: &ApplianceRecord,
        due: Option<(&ReleaseRecord, UpdateIntent, Option<u64>)>,
        now: Timestamp,
        public_url: &str,
    ) -> CheckinResponse {
        let window = self.window_of(appliance);
        // The site's LAN peers: not its DDI devices, which have no sitecast agent to share with.
        let mut site_members: Vec<String> = self
            .members
            .get(&appliance.site)
            .into_iter()
            .flatten()
            .filter(|key| self.appliances.get(*key).is_none_or(|a| a.ddi.is_none()))
            .cloned()
            .collect();
        if !site_members.contains(&appliance.key) {
            site_members.push(appliance.key.clone());
        }
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
            site_members: Some(site_members),
            report_seq: Some(appliance.report_seq),
            agent_offer: None,
        };
        let Some((release, intent, rollout)) = due else {
            return response;
        };
        response.update_available = true;
        response.intent = Some(intent);
        response.manifest = Some(release.manifest.clone());
        response.version = Some(release.version);
        response.rollout = rollout;
        let installed = self.installed_image(appliance);
        response.origin = Some(OriginUrls {
            ranges: format!("{public_url}/api/blobs/{}/ranges", release.blake3),
            image: format!("{public_url}/api/releases/{}/image", release.version),
            iroh: self.iroh_addresses.clone(),
            outboard: Some(format!("{public_url}/api/blobs/{}/outboard", release.blake3)),
            mirrors: release.mirrors.clone(),
            outboard_blob: release.outboard.as_ref().and_then(|o| blob_offer(o, public_url)),
            group_hashes_blob: release
                .group_hashes
                .as_ref()
                .and_then(|g| blob_offer(g, public_url)),
            index: release
                .index
                .as_ref()
                .map(|index| format!("{public_url}/api/blobs/{index}/ranges")),
            bytes: Some(format!("{public_url}/api/blobs/{}/bytes", release.blake3)),
            installed,
            plan: installed
                .and_then(|image| release.plans.iter().find(|p| p.from == image.blake3.to_hex()))
                .and_then(|plan| blob_offer(&plan.file, public_url)),
        });
        response.site_peers = self.site_peers(appliance, Some(release), now);
        response
    }

    /// The image of the release `appliance` says it runs, if one is stored here: its agent
    /// checks its active slot against it ([`OriginUrls::installed`]).
    fn installed_image(&self, appliance: &ApplianceRecord) -> Option<InstalledImage> {
        let release = self.releases.get(&appliance.installed_version)?;
        let blake3 = Blake3Hash::from_hex(&release.blake3).ok()?;
        release.has_image().then_some(InstalledImage { blake3, size: release.size })
    }

    /// The online appliances of `appliance`'s site, for its LAN to dial (networks without
    /// multicast), with their state of `release` if an image is offered.
    fn site_peers(
        &self,
        appliance: &ApplianceRecord,
        release: Option<&ReleaseRecord>,
        now: Timestamp,
    ) -> Vec<SitePeer> {
        self.members
            .get(&appliance.site)
            .into_iter()
            .flatten()
            .filter_map(|key| self.appliances.get(key))
            .filter(|p| p.key != appliance.key && p.ddi.is_none() && self.is_online(p, now))
            .map(|p| SitePeer {
                appliance: p.key.clone(),
                addresses: p.peer.clone(),
                installed_version: p.installed_version,
                state: release.and_then(|release| {
                    p.update
                        .as_ref()
                        .filter(|u| u.report.version == release.version)
                        .map(|u| u.report.state)
                }),
            })
            .collect()
    }

    /// The release due for this appliance, if any: a pin (the appliance's, else its group's)
    /// first, then a fleet rollback, then the rollout's stage.
    pub(super) fn due<'a>(
        &'a self,
        appliance: &ApplianceRecord,
    ) -> Option<(&'a ReleaseRecord, UpdateIntent, Option<u64>)> {
        let usable = |version: u64| {
            self.releases.get(&version).filter(|r| r.active && runs_on(r, appliance))
        };
        let group_pin =
            appliance.group.as_deref().and_then(|g| self.group_pin(g, RolloutKind::Image));
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
        let mut rollouts = self.rollouts.values().rev().filter(|r| r.kind == RolloutKind::Image);
        for rollout in rollouts.clone() {
            if rollout.rolled_back && appliance.installed_version == rollout.version {
                let previous = rollout.previous_version?;
                return usable(previous).map(|r| (r, UpdateIntent::Rollback, Some(rollout.id)));
            }
            // A newer rollout of this very release supersedes older rollbacks of it.
            if rollout.version == appliance.installed_version {
                break;
            }
        }
        let rollout = rollouts.find(|r| r.state == RolloutState::InProgress)?;
        if rollout.version <= appliance.installed_version || !rollout.offers_to(&appliance.key) {
            return None;
        }
        usable(rollout.version).map(|r| (r, UpdateIntent::Upgrade, Some(rollout.id)))
    }

    /// Records an appliance's report of its image update, or with `kind` agent of its agent
    /// update (`POST /api/appliances/report` and `/agent-report`).
    pub fn report(
        &self,
        key: &str,
        kind: RolloutKind,
        report: ReportRequest,
        auth: &ReportAuth,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let mut record = self.fresh_report(key, &report, auth)?;
        if !was_offered(&record, kind, &report) {
            let what = match kind {
                RolloutKind::Image => "release",
                RolloutKind::Agent => "agent release",
            };
            return Err(FleetError::NotOffered(format!(
                "appliance {key} was not offered {what} {}{}",
                report.version,
                report.rollout.map(|r| format!(" by rollout {r}")).unwrap_or_default()
            )));
        }
        let mut batch = Batch::new(self);
        let actor = format!("appliance:{key}");
        match kind {
            RolloutKind::Image => {
                if matches!(report.state, UpdateState::Succeeded) {
                    record.installed_version = report.version;
                    record.claimed_version = None;
                    record.active_slot = report.slot.clone().or(record.active_slot.take());
                }
                record.last_checkin = now;
                let row = &mut record.update;
                record_update_state(row, report, now, &mut batch, &actor, "appliance.report");
            }
            RolloutKind::Agent => record_agent_state(&mut record, report, now, &mut batch, &actor),
        }
        batch.push(Change::Appliance(Box::new(record)));
        Ok(batch.finish())
    }

    /// The appliance a report comes from, with the report's sequence number (or signature)
    /// taken as its newest; a replayed or reordered report, or an unknown state, is refused.
    pub(super) fn fresh_report(
        &self,
        key: &str,
        report: &ReportRequest,
        auth: &ReportAuth,
    ) -> Result<ApplianceRecord, FleetError> {
        let existing =
            self.appliances.get(key).ok_or_else(|| FleetError::UnknownAppliance(key.to_owned()))?;
        if report.state == UpdateState::Unknown {
            return Err(FleetError::Invalid("unknown update state".into()));
        }
        let mut record = existing.clone();
        check_fresh(&mut record, report, auth)?;
        Ok(record)
    }

    /// Pins an appliance to a release, or with `kind` agent to an agent release (or unpins it).
    pub fn pin(
        &self,
        key: &str,
        kind: RolloutKind,
        version: Option<u64>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if let Some(v) = version {
            self.rollout_target(kind, v)?;
        }
        let mut record = self.appliance(key)?.clone();
        let action = match kind {
            RolloutKind::Image => {
                record.pin_version = version;
                "appliance.pin"
            }
            RolloutKind::Agent => {
                record.agent_pin = version;
                "appliance.agent_pin"
            }
        };
        let mut batch = Batch::new(self);
        batch.push(Change::Appliance(Box::new(record)));
        batch.audit(now, "operator", action, json!({"appliance": key, "version": version}));
        Ok(batch.finish())
    }

    /// Overrides (or with `None`, clears) the maintenance window of one appliance.
    pub fn set_appliance_window(
        &self,
        key: &str,
        window: Option<MaintenanceWindow>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        if let Some(window) = &window {
            window.validate().map_err(|e| FleetError::Invalid(e.to_string()))?;
        }
        let mut record = self.appliance(key)?.clone();
        record.window = window.clone();
        let mut batch = Batch::new(self);
        batch.push(Change::Appliance(Box::new(record)));
        let detail = json!({"appliance": key, "window": window});
        batch.audit(now, "operator", "appliance.window", detail);
        Ok(batch.finish())
    }

    /// Removes an appliance (replaced, stolen, decommissioned): its key can no longer check
    /// in without the enrollment token, and its name and MACs are free for a new identity.
    pub fn remove_appliance(&self, key: &str, now: Timestamp) -> Result<Vec<Change>, FleetError> {
        let record = self.appliance(key)?;
        let mut batch = Batch::new(self);
        batch.push(Change::ApplianceRemoved { key: key.to_owned() });
        let detail = json!({"appliance": key, "site": record.site, "name": record.name, "macs": record.macs});
        batch.audit(now, "operator", "appliance.remove", detail);
        Ok(batch.finish())
    }

    fn appliance(&self, key: &str) -> Result<&ApplianceRecord, FleetError> {
        self.appliances.get(key).ok_or_else(|| FleetError::NotFound(format!("appliance {key}")))
    }
}

/// Refuses a replayed or reordered report and records this one as the newest.
fn check_fresh(
    record: &mut ApplianceRecord,
    report: &ReportRequest,
    auth: &ReportAuth,
) -> Result<(), FleetError> {
    match report.seq {
        Some(seq) if seq <= record.report_seq => Err(FleetError::StaleReport(format!(
            "sequence number {seq} is not above {}, the last accepted",
            record.report_seq
        ))),
        Some(seq) => {
            record.report_seq = seq;
            Ok(())
        }
        // Agents from before sequence numbers: the signed timestamp must move on (or, within
        // the same second, the request must be another one).
        None => {
            let last = record.last_report_at.unwrap_or(i64::MIN);
            let same_request = record.last_report_signature.as_deref() == Some(&auth.signature);
            if auth.timestamp < last || (auth.timestamp == last && same_request) {
                return Err(FleetError::StaleReport(format!(
                    "signed at {}, not after the last accepted report ({last})",
                    auth.timestamp
                )));
            }
            record.last_report_at = Some(auth.timestamp);
            record.last_report_signature = Some(auth.signature.clone());
            Ok(())
        }
    }
}

/// The identity fields that differ, as `{field: [before, after]}`.
fn identity_changes(
    before: &ApplianceRecord,
    after: &ApplianceRecord,
) -> serde_json::Map<String, serde_json::Value> {
    let mut changed = serde_json::Map::new();
    let mut compare = |field: &str, a: serde_json::Value, b: serde_json::Value| {
        if a != b {
            changed.insert(field.to_owned(), json!([a, b]));
        }
    };
    compare("site", json!(before.site), json!(after.site));
    compare("name", json!(before.name), json!(after.name));
    compare("group", json!(before.group), json!(after.group));
    compare("macs", json!(before.macs), json!(after.macs));
    compare("platform", json!(before.platform), json!(after.platform));
    compare("installed_version", json!(before.installed_version), json!(after.installed_version));
    changed
}

/// Whether `report` is about the release the appliance was offered. Matched on the release
/// alone: an agent keeps the rollout of the offer it started with, while the same release may
/// since have been offered again by a pin or a new rollout.
fn was_offered(record: &ApplianceRecord, kind: RolloutKind, report: &ReportRequest) -> bool {
    let (offer, update) = match kind {
        RolloutKind::Image => (&record.offer, &record.update),
        RolloutKind::Agent => (&record.agent_offer, &record.agent_update),
    };
    let offered = offer.as_ref().is_some_and(|o| o.version == report.version);
    // Records from before offers were stored: the image update already under way still counts.
    let under_way = kind == RolloutKind::Image
        && offer.is_none()
        && update.as_ref().is_some_and(|u| u.report.version == report.version);
    offered || under_way
}

/// Sets an update row (the image's or the agent's) to `report`, audited as `action` when its
/// state changes; `started` and `since` carry over while the release and state stay.
pub(super) fn record_update_state(
    row: &mut Option<UpdateRow>,
    mut report: ReportRequest,
    now: Timestamp,
    batch: &mut Batch,
    actor: &str,
    action: &str,
) {
    let same = row.as_ref().filter(|u| u.report.version == report.version);
    let changed = same.is_none_or(|u| u.report.state != report.state);
    let started = same.map_or(now, |u| u.started);
    let since = if changed { now } else { same.map_or(now, |u| u.since) };
    report.error = report.error.map(|e| validate::clip(&e, validate::MAX_ERROR));
    if changed {
        let detail =
            json!({"version": report.version, "state": report.state, "error": report.error});
        batch.audit(now, actor, action, detail);
    }
    *row = Some(UpdateRow { report, started, since });
}

/// A stored file offered as a blob whose verified ranges Central Command serves.
fn blob_offer(file: &StoredFile, public_url: &str) -> Option<BlobOffer> {
    Some(BlobOffer {
        ranges: format!("{public_url}/api/blobs/{}/ranges", file.blake3),
        size: file.size,
        blake3: Blake3Hash::from_hex(&file.blake3).ok()?,
        sha256: Sha256Hash::from_hex(&file.sha256).ok()?,
    })
}
