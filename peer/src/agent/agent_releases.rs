//! The agent's side of agent releases: an offer verified, its files fetched and staged in the
//! launcher's store, the switch (inside the window if the rollout asks), and reports to
//! Central Command, including the launcher's rollback of a version that failed.

use jiff::Timestamp;
use sitecast_launcher::RollbackRecord;
use sitecast_launcher::frozen::FrozenPath;
use sitecast_manifest::api::{AgentOffer, ReportRequest, UpdateIntent, UpdateState};
use sitecast_manifest::{AgentPolicy, ImageInfo, Intent};
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::agent_files::{FileCache, FileSources};
use crate::agent_update::{self, AgentFetch, OfferStep};
use crate::scheduler::PeerId;
use crate::state::{AGENT_FETCH_ATTEMPTS, AgentUpdateRecord};
use crate::swarm::TransferStats;

/// Versions the launcher rolled back from that are remembered (the oldest are forgotten).
const REFUSED_KEPT: usize = 32;

impl Agent {
    /// Acts on the agent offer of a check-in answer, if any.
    pub(super) async fn consider_agent_offer(&mut self, offer: Option<&AgentOffer>) {
        let Some(offer) = offer else { return };
        self.reconcile_agent_record();
        let fetching = self.agent_fetch.is_some();
        let step = agent_update::next_step(
            offer,
            self.state.agent_update.as_ref(),
            &self.state.agent_refused,
            self.launched.release,
            fetching,
        );
        match step {
            OfferStep::Nothing => {}
            OfferStep::Switch => self.switch_agent().await,
            OfferStep::Fetch => {
                if let Some(fetch) = self.agent_fetch.take() {
                    tracing::info!(
                        version = offer.version,
                        "another agent release replaces the running fetch"
                    );
                    // Cancelled, and waited for: two fetches must never write the store's
                    // staging or the file cache at once.
                    self.agent_fetch_cancel.cancel();
                    let _ = fetch.await;
                }
                self.start_agent_fetch(offer).await;
            }
        }
    }

    /// Squares the agent update record with the store after a restart of the agent or the
    /// launcher: a staged version the launcher pruned at its start is fetched again; a switch
    /// that a crash interrupted (saved as `rebooting`, the store not switched) is made again.
    fn reconcile_agent_record(&mut self) {
        let Some(store) = self.launched.store.as_deref() else { return };
        let store = sitecast_launcher::AgentStore::at(store);
        let running = self.launched.release;
        let Some(record) = self.state.agent_update.as_mut() else { return };
        let installed = store.installed(record.version);
        let fixed = match record.state {
            UpdateState::Ready if !installed => UpdateState::Downloading,
            UpdateState::Rebooting
                if record.version != running
                    && store.current().ok().flatten() != Some(record.version) =>
            {
                if installed {
                    UpdateState::Ready
                } else {
                    UpdateState::Downloading
                }
            }
            _ => return,
        };
        tracing::info!(version = record.version, state = fixed.as_str(), "agent update resumed");
        record.state = fixed;
        self.save();
    }

    /// Verifies the offer and starts fetching its files; a refused offer is reported.
    async fn start_agent_fetch(&mut self, offer: &AgentOffer) {
        // Attempts count per rollout: a new rollout of the release starts again.
        let attempts = self
            .state
            .agent_update
            .as_ref()
            .filter(|r| r.version == offer.version && r.rollout == offer.rollout)
            .map_or(0, |r| r.attempts);
        self.state.agent_update = Some(AgentUpdateRecord {
            version: offer.version,
            manifest: offer.manifest.clone(),
            rollout: offer.rollout,
            intent: offer.intent,
            files: offer.files.clone(),
            in_window: offer.in_window,
            state: UpdateState::Downloading,
            error: None,
            attempts,
            started: Timestamp::now(),
            bytes_from_origin: 0,
            bytes_from_lan: 0,
        });
        let (build, os_releases) = match self.verify_agent_offer(offer) {
            Ok(verified) => verified,
            Err(message) => {
                tracing::warn!(%message, "agent release refused");
                // Refused for good: the same offer is not tried again.
                self.agent_failed(message, AGENT_FETCH_ATTEMPTS).await;
                return;
            }
        };
        let store = self.launched.store.clone().expect("checked by verify_agent_offer");
        tracing::info!(version = offer.version, "fetching agent release");
        self.save();
        self.send_agent_report(UpdateState::Downloading, None).await;
        self.agent_fetch_cancel = CancellationToken::new();
        let swarm = offer.ranges.as_ref().map(|ranges| {
            let members = self.membership.members().unwrap_or_default();
            let sources = FileSources {
                client: self.client.clone(),
                ranges: ranges.clone(),
                lan: self.lan.clone(),
                me: PeerId(*self.key.public().as_bytes()),
                site_members: members.into_iter().map(PeerId).collect(),
            };
            (sources, FileCache::new(&self.config.state_dir))
        });
        self.agent_fetch = Some(tokio::spawn(agent_update::fetch_and_stage(AgentFetch {
            client: self.client.clone(),
            cancel: self.agent_fetch_cancel.clone(),
            store_root: store,
            version: offer.version,
            build,
            os_releases,
            files_url: offer.files.clone(),
            swarm,
        })));
    }

    /// The build for this appliance and the OS releases it runs on, if the offer verifies.
    fn verify_agent_offer(
        &self,
        offer: &AgentOffer,
    ) -> Result<(sitecast_manifest::AgentBuild, sitecast_manifest::OsReleases), String> {
        if self.launched.store.is_none() {
            return Err(format!(
                "agent release {} refused: this agent is not run by sitecast-launcher, so it cannot switch versions",
                offer.version
            ));
        }
        let policy = AgentPolicy {
            platform: self.config.platform.clone(),
            os_release: self.state.version_of(self.booted),
            installed_version: self.launched.release,
            intent: match offer.intent {
                UpdateIntent::Rollback => Intent::Rollback,
                _ => Intent::Upgrade,
            },
        };
        let verified = self
            .root
            .verify_agent_release(offer.manifest.as_bytes(), Timestamp::now())
            .map_err(|e| format!("agent release {} refused: {e}", offer.version))?;
        if verified.release().version != offer.version {
            return Err(format!(
                "agent release {} refused: its manifest is for agent release {}",
                offer.version,
                verified.release().version
            ));
        }
        let build = verified
            .build_for(&policy)
            .cloned()
            .map_err(|e| format!("agent release {} refused: {e}", offer.version))?;
        Ok((build, verified.release().os_releases))
    }

    /// The fetch ended: staged (switch, if the window allows) or failed (tried again at a
    /// later check-in, up to its attempts).
    pub(super) async fn agent_fetch_finished(&mut self, result: Result<TransferStats, String>) {
        self.agent_fetch = None;
        match result {
            Ok(stats) => {
                tracing::info!(
                    bytes_from_origin = stats.bytes_from_origin,
                    bytes_from_lan = stats.bytes_from_lan,
                    "agent release staged"
                );
                if let Some(record) = self.state.agent_update.as_mut() {
                    record.state = UpdateState::Ready;
                    record.error = None;
                    record.bytes_from_origin = stats.bytes_from_origin;
                    record.bytes_from_lan = stats.bytes_from_lan;
                }
                self.save();
                self.send_agent_report(UpdateState::Ready, None).await;
                self.switch_agent().await;
            }
            Err(error) => {
                tracing::warn!(%error, "fetching the agent release failed");
                let attempts =
                    self.state.agent_update.as_ref().map_or(0, |r| r.attempts).saturating_add(1);
                self.agent_failed(error, attempts).await;
            }
        }
    }

    async fn agent_failed(&mut self, error: String, attempts: u32) {
        if let Some(record) = self.state.agent_update.as_mut() {
            record.state = UpdateState::Failed;
            record.error = Some(error.clone());
            record.attempts = attempts;
        }
        self.save();
        self.publish_status(Some(error.clone()));
        self.send_agent_report(UpdateState::Failed, Some(error)).await;
    }

    /// Switches the store to the staged version, unless the offer waits for the window. The
    /// state says `rebooting` before the switch: the launcher may stop this process at once.
    pub(super) async fn switch_agent(&mut self) {
        let Some(record) = self.state.agent_update.clone() else { return };
        if record.state != UpdateState::Ready {
            return;
        }
        if record.in_window && !self.window_open(self.state.window.as_ref()) {
            return;
        }
        let Some(store) = self.launched.store.clone() else { return };
        if let Some(record) = self.state.agent_update.as_mut() {
            record.state = UpdateState::Rebooting;
        }
        self.save();
        self.send_agent_report(UpdateState::Rebooting, None).await;
        tracing::info!(
            version = record.version,
            "switching to agent release; the launcher restarts into it"
        );
        let switched =
            tokio::task::spawn_blocking(move || agent_update::switch(&store, record.version))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(error) = switched {
            // E.g. the staged version was pruned by a launcher restart while it waited for
            // the window: fetched again at a later check-in, up to the attempts.
            let attempts = record.attempts.saturating_add(1);
            self.agent_failed(format!("switching to agent {}: {error}", record.version), attempts)
                .await;
        }
    }

    /// After a check-in: this process being the version switched to ends that update; a
    /// rollback the launcher recorded since the last look is reported, once, and its
    /// version never fetched again.
    pub(super) async fn settle_agent_update(&mut self) {
        let running = self.launched.release;
        if let Some(record) = self.state.agent_update.as_mut()
            && record.version == running
            && record.state != UpdateState::Succeeded
        {
            // Central Command saw the same in this check-in (the agent release it carries).
            record.state = UpdateState::Succeeded;
            record.error = None;
            self.save();
        }
        let Some(store) = self.launched.store.as_deref() else { return };
        let Some(rollback) = RollbackRecord::read(store) else { return };
        if self.state.agent_rollback_seen == Some(rollback.at) {
            return;
        }
        let summary = rollback.summary();
        tracing::warn!(%summary, "the launcher rolled an agent release back");
        if !self.state.agent_refused.contains(&rollback.from) {
            self.state.agent_refused.push(rollback.from);
            let excess = self.state.agent_refused.len().saturating_sub(REFUSED_KEPT);
            self.state.agent_refused.drain(..excess);
        }
        self.state.agent_rollback_seen = Some(rollback.at);
        let ours = self.state.agent_update.as_mut().filter(|r| r.version == rollback.from);
        let report = ours.is_some();
        if let Some(record) = ours {
            record.state = UpdateState::RolledBack;
            record.error = Some(summary.clone());
        }
        self.save();
        self.publish_status(Some(summary.clone()));
        if report {
            self.send_agent_report(UpdateState::RolledBack, Some(summary)).await;
        }
    }

    /// Serves the files of the agent release this appliance fetched, held whole in its cache,
    /// to site peers that fetch it later (a later stage of the rollout, after a restart).
    pub(super) fn serve_agent_files(&self) {
        let (Some(lan), Some(record)) = (&self.lan, &self.state.agent_update) else { return };
        let held = [UpdateState::Ready, UpdateState::Rebooting, UpdateState::Succeeded];
        if !held.contains(&record.state) {
            return;
        }
        let Ok(verified) =
            self.root.verify_agent_release(record.manifest.as_bytes(), Timestamp::now())
        else {
            return;
        };
        let cache = FileCache::new(&self.config.state_dir);
        let mut served = 0;
        for file in verified.release().builds.iter().flat_map(|b| &b.files) {
            let info = ImageInfo { size: file.size, blake3: file.blake3, sha256: file.sha256 };
            if info.size > 0 && cache.holds(&info) {
                lan.serve_installed(&info, cache.paths(&info.blake3).slot, cache.dir().to_owned());
                served += 1;
            }
        }
        tracing::info!(
            version = record.version,
            files = served,
            "agent release files served to site peers"
        );
    }

    /// Tells the launcher how this check-in reached Central Command, for its frozen path (the
    /// fix for an agent that keeps crashing, maybe on this very configuration later).
    pub(super) fn record_frozen_path(&self) {
        let Some(store) = &self.launched.store else { return };
        // Absolute: the launcher may run from another directory.
        let absolute =
            |path: &std::path::Path| std::fs::canonicalize(path).unwrap_or(path.to_owned());
        let path = FrozenPath {
            coordinator: self.config.coordinator.clone(),
            coordinator_ca: self.config.coordinator_ca.as_deref().map(absolute),
            root: absolute(&self.config.root),
            identity_key: absolute(&self.config.state_dir.join("identity.key")),
            platform: self.config.platform.clone(),
            os_release: self.state.version_of(self.booted),
        };
        if let Err(error) = path.record(store) {
            tracing::warn!(%error, "cannot record the launcher's frozen path");
        }
    }

    /// Reports the agent update's state to Central Command (best effort: the check-ins carry
    /// the agent release that runs, which is what decides success).
    async fn send_agent_report(&mut self, state: UpdateState, error: Option<String>) {
        let Some(record) = &self.state.agent_update else { return };
        let report = ReportRequest {
            state,
            version: record.version,
            previous_version: Some(self.launched.release),
            rollout: record.rollout,
            progress: None,
            bytes_from_origin: record.bytes_from_origin,
            bytes_from_lan: record.bytes_from_lan,
            bytes_from_mirror: 0,
            bytes_reused: 0,
            slot: None,
            error,
            seq: None,
        };
        self.send_report(report, true).await;
    }
}
