//! Devices that speak hawkBit DDI (SWUpdate's suricatta mode): appliances in the same registry,
//! marked by their [`DdiRecord`], offered the same releases by the same pins, rollouts and
//! windows. An offer becomes a DDI action (a number, as SWUpdate requires); the device's
//! feedback drives the same update states as a sitecast agent's reports, so the rollout
//! engine counts, advances and auto-pauses over both alike.
//!
//! A window holds a device by not offering its action (`update: "skip"` would tell SWUpdate the
//! update is done); once the device has begun an action it stays offered until the device
//! closes it, since SWUpdate sends its verdict after the reboot against whatever is offered.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde_json::json;
use sitecast_manifest::api::{ReportRequest, UpdateState};

use super::appliances::record_update_state;
use super::validate::{self, MAX_ERROR, MAX_TEXT};
use super::{Batch, Fleet, FleetError};
use crate::store::{
    ApplianceRecord, Change, DdiAction, DdiRecord, OfferRecord, ReleaseRecord, SwuArtifact,
};

/// The platform recorded for DDI devices (no sitecast image is built for it).
pub const DDI_PLATFORM: &str = "hawkbit-ddi";
/// Most `configData` attributes kept per device.
const MAX_ATTRIBUTES: usize = 64;

/// A DDI device's key in the registry: its controller id, in a namespace of its own.
pub fn ddi_key(controller_id: &str) -> String {
    format!("ddi:{controller_id}")
}

/// A poll's outcome: what to store first, and what the device should do.
#[derive(Debug)]
pub struct DdiPoll {
    pub durable: Vec<Change>,
    /// The record with this poll's bookkeeping (last seen), applied after.
    pub seen: ApplianceRecord,
    pub next: DdiNext,
}

/// What a poll offers a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdiNext {
    Nothing,
    /// Install the release of this action (`deploymentBase`).
    Deploy(u32),
    /// Stop this action: its rollout was rolled back (`cancelAction`).
    Cancel(u32),
}

/// A device's feedback on an action, as DDI has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdiFeedback {
    pub execution: DdiExecution,
    /// `success`, `failure` or `none`.
    pub finished: DdiFinished,
    /// Chunks installed of all, when the device says.
    pub progress: Option<(u64, u64)>,
    pub details: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdiExecution {
    Proceeding,
    Closed,
    Canceled,
    Rejected,
    /// `scheduled`, `resumed`, `downloaded`, `download` and states newer clients may send.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdiFinished {
    Success,
    Failure,
    None,
}

impl DdiFeedback {
    /// The update state this feedback puts the device in. As in hawkBit, only a closing
    /// execution ends an action: `proceeding` with `failure` is a step that went wrong, not
    /// the verdict.
    fn state(&self) -> UpdateState {
        match (self.execution, self.finished) {
            (DdiExecution::Closed, DdiFinished::Success) => UpdateState::Succeeded,
            (DdiExecution::Closed | DdiExecution::Rejected | DdiExecution::Canceled, _) => {
                UpdateState::Failed
            }
            // Every chunk installed: the device runs its post-update command (the reboot) and
            // closes the action when it comes back.
            _ if self.progress.is_some_and(|(done, of)| of > 0 && done >= of) => {
                UpdateState::Rebooting
            }
            _ => UpdateState::Downloading,
        }
    }
}

impl Fleet {
    /// Whether a SWUpdate artifact may be published as release `version`: beside its image,
    /// or alone when there is no such release. A release takes one artifact, once: devices may
    /// be downloading it.
    pub fn swu_publishable(&self, version: u64) -> Result<(), FleetError> {
        match self.releases.get(&version).and_then(|r| r.swu.as_ref()) {
            Some(swu) => Err(FleetError::Conflict(format!(
                "release {version} already has the SWUpdate artifact {}",
                swu.filename
            ))),
            None => Ok(()),
        }
    }

    /// Publishes `swu` with release `version`, or as release `version` on its own (named
    /// `name`) when there is none.
    pub fn publish_swu(
        &self,
        version: u64,
        swu: SwuArtifact,
        name: Option<String>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        self.swu_publishable(version)?;
        let mut release = match self.releases.get(&version) {
            Some(release) => release.clone(),
            None => ReleaseRecord {
                version,
                version_name: validate::text("name", &name.unwrap_or_else(|| version.to_string()))?,
                notes: String::new(),
                created: now,
                published: now,
                active: true,
                blake3: String::new(),
                sha256: String::new(),
                size: 0,
                platforms: Vec::new(),
                rollback_floor: None,
                manifest: String::new(),
                swu: None,
                mirrors: Vec::new(),
                index: None,
                outboard: None,
                group_hashes: None,
                plans: Vec::new(),
            },
        };
        let detail = json!({"version": version, "filename": swu.filename, "size": swu.size,
            "sha256": swu.sha256, "with_image": release.has_image()});
        release.swu = Some(Box::new(swu));
        let mut batch = Batch::new(self);
        batch.audit(now, "operator", "release.swu", detail);
        batch.push(Change::Release(Box::new(release)));
        Ok(batch.finish())
    }

    /// The DDI device with this controller id.
    pub fn ddi_device(&self, controller_id: &str) -> Option<&ApplianceRecord> {
        self.appliances.get(&ddi_key(controller_id)).filter(|a| a.ddi.is_some())
    }

    /// Registers a DDI device at `site` (in `group`: a sitecast appliance names its own, a DDI
    /// client cannot), or gives a registered one a new place and target token. `token_hash` is
    /// `None` for a device that registers itself with the gateway token.
    pub fn ddi_register(
        &self,
        controller_id: &str,
        site: &str,
        group: Option<&str>,
        token_hash: Option<String>,
        actor: &str,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let controller_id = checked_controller_id(controller_id)?;
        let site = validate::text("site", site)?;
        if site.is_empty() {
            return Err(FleetError::Invalid("site must not be empty".into()));
        }
        let group = match group {
            Some(group) => Some(validate::text("group", group)?).filter(|g| !g.is_empty()),
            None => None,
        };
        let key = ddi_key(&controller_id);
        // Its name is its controller id, and names are one appliance's each.
        if let Some(owner) =
            self.owners.get(&format!("name:{controller_id}")).filter(|o| **o != key)
        {
            return Err(FleetError::IdentityTaken {
                what: format!("name {controller_id:?}"),
                owner: owner.clone(),
            });
        }
        let mut record = match self.appliances.get(&key) {
            Some(existing) => existing.clone(),
            None => ApplianceRecord {
                key: key.clone(),
                name: controller_id.clone(),
                platform: DDI_PLATFORM.to_owned(),
                registered: now,
                last_checkin: now,
                ddi: Some(DdiRecord {
                    controller_id: controller_id.clone(),
                    ..DdiRecord::default()
                }),
                ..ApplianceRecord::default()
            },
        };
        let ddi = record.ddi.get_or_insert_with(DdiRecord::default);
        ddi.token_hash = token_hash.or(ddi.token_hash.take());
        record.site = site;
        record.group = group;
        let mut batch = Batch::new(self);
        let detail = json!({"appliance": key, "site": record.site, "group": record.group,
            "client": "hawkbit-ddi"});
        batch.audit(now, actor, "appliance.register", detail);
        batch.push(Change::Appliance(Box::new(record)));
        Ok(batch.finish())
    }

    /// A device's poll: the action it should run now, stored before it is offered.
    pub fn ddi_poll(&self, controller_id: &str, now: Timestamp) -> Result<DdiPoll, FleetError> {
        let mut record = self
            .ddi_device(controller_id)
            .ok_or_else(|| FleetError::UnknownAppliance(ddi_key(controller_id)))?
            .clone();
        record.last_checkin = now;
        let ddi = record.ddi.clone().unwrap_or_default();
        let poll = |next, durable| DdiPoll { durable, next, seen: record.clone() };
        if let Some(action) = ddi.action.as_ref().filter(|a| !a.closed) {
            if self.withdrawn(&record, action) {
                return Ok(poll(DdiNext::Cancel(action.id), Vec::new()));
            }
            // Begun: offered until the device closes it (its verdict after the reboot needs it).
            if action.begun {
                return Ok(poll(DdiNext::Deploy(action.id), Vec::new()));
            }
        }
        let window_open = self.window_of(&record).is_open(now).unwrap_or(false);
        let due = self.due(&record).filter(|_| window_open);
        let Some((release, intent, rollout)) = due else {
            return Ok(poll(DdiNext::Nothing, Vec::new()));
        };
        let same =
            ddi.action.as_ref().filter(|a| (a.version, a.rollout) == (release.version, rollout));
        match same {
            Some(action) if !action.closed => {
                return Ok(poll(DdiNext::Deploy(action.id), Vec::new()));
            }
            // Failed: offering it again would reinstall (and reboot) at every poll. A new
            // rollout, or a pin to another release, offers anew.
            Some(action) if action.failed => return Ok(poll(DdiNext::Nothing, Vec::new())),
            _ => {}
        }
        let id = ddi.actions_issued.checked_add(1).ok_or_else(|| {
            FleetError::Conflict(format!("device {controller_id} has used every action id"))
        })?;
        let offer = OfferRecord { rollout, version: release.version, intent, at: now };
        let detail = json!({"version": offer.version, "rollout": offer.rollout,
            "intent": offer.intent, "action": id});
        let mut batch = Batch::new(self);
        batch.audit(now, &format!("appliance:{}", record.key), "appliance.offer", detail);
        let action = DdiAction {
            id,
            version: release.version,
            rollout,
            begun: false,
            closed: false,
            failed: false,
            cancel_rejected: false,
        };
        record.offer = Some(offer);
        record.ddi = Some(DdiRecord { action: Some(action), actions_issued: id, ..ddi });
        batch.push(Change::Appliance(Box::new(record.clone())));
        Ok(DdiPoll { durable: batch.finish(), next: DdiNext::Deploy(id), seen: record })
    }

    /// Whether `action` should be cancelled: it is the upgrade of a rollout since rolled back
    /// (not that rollout's way back), the device has not installed it yet (once it reboots
    /// into it, it must be let finish, and the rollback then brings it back), and it has not
    /// refused to stop.
    fn withdrawn(&self, record: &ApplianceRecord, action: &DdiAction) -> bool {
        let rolled_back = action
            .rollout
            .and_then(|id| self.rollouts.get(&id))
            .is_some_and(|r| r.rolled_back && r.version == action.version);
        let installed = record.update.as_ref().is_some_and(|u| {
            u.report.version == action.version
                && matches!(u.report.state, UpdateState::Rebooting | UpdateState::Succeeded)
        });
        rolled_back && !installed && !action.cancel_rejected
    }

    /// The device's open action `id` if it is being cancelled.
    pub fn ddi_cancelled(&self, controller_id: &str, id: u32) -> Result<&DdiAction, FleetError> {
        let record = self.ddi_device(controller_id);
        let action = record.and_then(|r| Some((r, r.ddi.as_ref()?.action.as_ref()?)));
        let action = action.filter(|(r, a)| a.id == id && !a.closed && self.withdrawn(r, a));
        action.map(|(_, a)| a).ok_or_else(|| {
            FleetError::NotFound(format!("cancel action {id} of device {controller_id}"))
        })
    }

    /// Records the device's answer to the cancellation of action `id`: SWUpdate acknowledges
    /// with `closed`; `rejected` means it could not stop (it goes on, and reports as usual).
    pub fn ddi_cancel_feedback(
        &self,
        controller_id: &str,
        id: u32,
        feedback: DdiFeedback,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let action = self.ddi_cancelled(controller_id, id)?.clone();
        let stopped = matches!(feedback.execution, DdiExecution::Closed | DdiExecution::Canceled)
            && feedback.finished != DdiFinished::Failure;
        let mut batch = Batch::new(self);
        let mut record = self.ddi_device(controller_id).cloned().expect("checked above");
        if stopped {
            let rollout = action.rollout.unwrap_or_default();
            let error = format!("cancelled: rollout {rollout} was rolled back");
            record_action_state(
                &mut record,
                &action,
                UpdateState::Failed,
                Some(error),
                now,
                &mut batch,
            );
        }
        note_feedback(&mut record, &feedback, now, |open| {
            open.closed = stopped;
            open.failed = stopped;
            open.cancel_rejected = !stopped;
        });
        batch.push(Change::Appliance(Box::new(record)));
        Ok(batch.finish())
    }

    /// The device's action `id` and its release, if that is the action it was given.
    pub fn ddi_action(
        &self,
        controller_id: &str,
        id: u32,
    ) -> Result<(&DdiAction, &ReleaseRecord), FleetError> {
        let not_given = || FleetError::NotFound(format!("action {id} of device {controller_id}"));
        let record = self.ddi_device(controller_id).ok_or_else(not_given)?;
        let action = record.ddi.as_ref().and_then(|d| d.action.as_ref());
        let action = action.filter(|a| a.id == id).ok_or_else(not_given)?;
        let release = self.releases.get(&action.version).ok_or_else(not_given)?;
        Ok((action, release))
    }

    /// Records a device's feedback on its action `id`.
    pub fn ddi_feedback(
        &self,
        controller_id: &str,
        id: u32,
        feedback: DdiFeedback,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let (action, _) = self.ddi_action(controller_id, id)?;
        if action.closed {
            // The same verdict again (its answer was lost, and the device repeats it): done.
            if action.failed == (feedback.state() == UpdateState::Failed)
                && feedback.execution == DdiExecution::Closed
            {
                return Ok(Vec::new());
            }
            return Err(FleetError::Conflict(format!(
                "action {id} of device {controller_id} is already closed"
            )));
        }
        let action = action.clone();
        let mut record = self.ddi_device(controller_id).cloned().expect("checked above");
        let state = feedback.state();
        let details = feedback.details.join("\n");
        let error = (state == UpdateState::Failed).then(|| validate::clip(&details, MAX_ERROR));
        let mut batch = Batch::new(self);
        record_action_state(&mut record, &action, state, error, now, &mut batch);
        if state == UpdateState::Succeeded {
            record.installed_version = action.version;
        }
        note_feedback(&mut record, &feedback, now, |open| {
            open.begun = true;
            open.closed = matches!(state, UpdateState::Succeeded | UpdateState::Failed);
            open.failed = state == UpdateState::Failed;
        });
        batch.push(Change::Appliance(Box::new(record)));
        Ok(batch.finish())
    }

    /// Stores the attributes a device sends as `configData` (bounded and clipped).
    pub fn ddi_config_data(
        &self,
        controller_id: &str,
        data: BTreeMap<String, String>,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        let mut record = self
            .ddi_device(controller_id)
            .ok_or_else(|| FleetError::UnknownAppliance(ddi_key(controller_id)))?
            .clone();
        // Kept, not refused, beyond the bound: SWUpdate repeats a refused `configData` and
        // installs nothing until it is taken.
        let attributes: BTreeMap<String, String> = data
            .into_iter()
            .take(MAX_ATTRIBUTES)
            .map(|(k, v)| (validate::clip(&k, MAX_TEXT), validate::clip(&v, MAX_ERROR)))
            .collect();
        let ddi = record.ddi.get_or_insert_with(DdiRecord::default);
        if ddi.attributes_received && ddi.attributes == attributes {
            return Ok(Vec::new());
        }
        ddi.attributes = attributes;
        ddi.attributes_received = true;
        record.last_checkin = now;
        Ok(vec![Change::Appliance(Box::new(record))])
    }
}

/// Sets the device's update to `state` in `action` (audited when the state changes).
fn record_action_state(
    record: &mut ApplianceRecord,
    action: &DdiAction,
    state: UpdateState,
    error: Option<String>,
    now: Timestamp,
    batch: &mut Batch<'_>,
) {
    let report = ReportRequest {
        state,
        version: action.version,
        previous_version: Some(record.installed_version),
        rollout: action.rollout,
        progress: None,
        bytes_from_origin: 0,
        bytes_from_lan: 0,
        bytes_from_mirror: 0,
        bytes_reused: 0,
        slot: None,
        error,
        seq: None,
    };
    let actor = format!("appliance:{}", record.key);
    record_update_state(&mut record.update, report, now, batch, &actor, "appliance.report");
}

/// Keeps what the device said last, and updates its open action with `update`.
fn note_feedback(
    record: &mut ApplianceRecord,
    feedback: &DdiFeedback,
    now: Timestamp,
    update: impl FnOnce(&mut DdiAction),
) {
    record.last_checkin = now;
    if let Some(ddi) = record.ddi.as_mut() {
        ddi.last_feedback = Some(validate::clip(&feedback.details.join("\n"), MAX_ERROR));
        if let Some(action) = ddi.action.as_mut() {
            update(action);
        }
    }
}

/// A `.swu` file name as DDI clients need it: SWUpdate skips artifacts not ending in `.swu`.
pub fn check_swu_filename(name: &str) -> Result<(), FleetError> {
    let ok = name.len() > 4
        && name.len() <= 128
        && name.ends_with(".swu")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(FleetError::Invalid(format!(
            "artifact name {name:?}: up to 128 characters of A-Z a-z 0-9 - _ . +, ending in .swu"
        )))
    }
}

/// A controller id: what hawkBit allows (up to 64 printable characters, no slash).
fn checked_controller_id(id: &str) -> Result<String, FleetError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_TEXT
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if ok {
        Ok(id.to_owned())
    } else {
        Err(FleetError::Invalid(format!(
            "controller id {id:?}: 1 to {MAX_TEXT} characters of A-Z a-z 0-9 - _ . : @"
        )))
    }
}
