//! The agent's life: check in, verify what is offered, fetch it into the standby slot, wait for
//! the maintenance window, activate and reboot, and after the reboot run the health gate.
//! Nothing a coordinator sends can crash it: every problem is logged, reported and retried.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use sitecast_iso::ab::{self, BootOutcome};
use sitecast_iso::health::{
    self, ApiReachable, CheckFailure, DiskWritable, GateDecision, TimeSynchronized,
};
use sitecast_iso::{EnvFile, FileDevice, Slot, SlotPaths, VerifiedSlot};
use sitecast_manifest::api::{
    BlobOffer, CheckinRequest, CheckinResponse, InstalledImage, OriginUrls, PeerAddresses,
    ReportRequest, UpdateIntent, UpdateState,
};
use sitecast_manifest::{ContentIndex, ImageInfo, InstallPolicy, Intent, SecretKey, TrustedRoot};
use tokio::sync::{mpsc, oneshot};

mod agent_releases;
mod download;

use crate::agent_update::Launched;
use crate::config::{AgentConfig, BootSlotSource};
use crate::coordinator::{ClientError, CoordinatorClient, STALE_REPORT, UNKNOWN_APPLIANCE};
use crate::early_checkin::EarlyCheckins;
use crate::gate::{CommandCheck, TrialGate};
use crate::membership::{Membership, MembershipStatus};
use crate::metrics::Metrics;
use crate::scheduler::PeerId;
use crate::state::{AgentState, UpdateRecord};
use crate::swarm::{LanFetcher, PeerNews, TransferStats};
use download::{Download, ReuseFrom};

/// Exit status that asks the supervisor to start the agent again, as after a reboot.
pub const EXIT_REBOOT: i32 = 75;

/// When lingering for site peers that began at `since` ends (never, if it has not begun).
async fn linger_ends(since: Option<std::time::Instant>) {
    match since {
        Some(since) => {
            tokio::time::sleep_until(tokio::time::Instant::from_std(since + LINGER_FOR_PEERS)).await
        }
        None => std::future::pending().await,
    }
}

/// How long an appliance whose slot is ready keeps serving the release to site peers that
/// may still be downloading it, from when its reboot was due: an appliance that finished
/// first (a delta transfer that needed little) would otherwise take the pieces only it
/// fetched offline, and the others would fetch them from the origin again.
pub const LINGER_FOR_PEERS: Duration = Duration::from_secs(60);
/// While it lingers, an appliance checks in at least this often, so it reboots soon after
/// its site peers report their slots ready, not up to a check-in interval later; at large
/// sites less often ([`linger_checkin`]).
pub const LINGER_CHECKIN: Duration = Duration::from_secs(5);

/// How often a lingering appliance of a site of `members` checks in: each answer names every
/// member, so a site's lingering check-ins stay at about two a second in all (the WAN's share
/// grows with the site, not with its square).
pub fn linger_checkin(members: usize) -> Duration {
    LINGER_CHECKIN.max(Duration::from_millis(500) * u32::try_from(members).unwrap_or(u32::MAX))
}

/// Commands from the local control socket.
#[derive(Debug)]
pub enum Command {
    Check,
    Rollback(oneshot::Sender<Result<String, String>>),
    SkipWindow,
}

/// What `status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub appliance: String,
    pub site: String,
    pub booted_slot: String,
    pub slot_versions: std::collections::BTreeMap<String, u64>,
    pub update: Option<UpdateRecord>,
    pub progress: Option<f64>,
    pub peers: u64,
    pub discovery: crate::site::Discovery,
    /// Where site peers reach this appliance.
    pub addresses: PeerAddresses,
    pub last_contact: Option<Timestamp>,
    pub last_error: Option<String>,
    /// Keys of the configuration file this agent does not know, ignored.
    pub config_unknown_keys: Vec<String>,
    pub membership: MembershipStatus,
    /// Whether the coordinator has accepted a check-in (the enrollment token is not sent).
    pub enrolled: bool,
    /// The last report sequence number used.
    pub report_seq: u64,
}

/// Where a download's byte figures start from: this process's counters when it started, and
/// what the update record held then (earlier runs of the same download).
#[derive(Debug, Clone, Copy)]
struct FiguresBase {
    counters: TransferStats,
    recorded: TransferStats,
}

/// Ways the agent stops.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The reboot command ran (or the supervisor should restart us).
    Reboot,
}

/// A blob's swarm on the LAN: news of the site peers that take part, have-maps to announce,
/// and fetches from those peers.
pub struct Joined {
    pub news: mpsc::Receiver<PeerNews>,
    pub announce: mpsc::Sender<crate::swarm::Holding>,
    pub fetcher: Arc<dyn LanFetcher>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined").finish_non_exhaustive()
    }
}

/// The LAN side the agent plugs into the swarm: discovery news, fetching, announcing,
/// serving. Several blobs may be joined at once (an image and an agent release's files).
pub trait Lan: Send + Sync {
    /// Starts taking part in the blob `image` in `slot` (a partition, or a file): news of
    /// site peers come in, have-maps go out, and verified groups of the slot are served to
    /// peers.
    fn join(&self, image: &ImageInfo, slot: PathBuf, state_dir: PathBuf) -> Joined;
    /// [`Self::join`] for a download that first copies what the active slot holds: the site
    /// is told so, and waits for it before it fetches from the origin.
    fn join_preparing(&self, image: &ImageInfo, slot: PathBuf, state_dir: PathBuf) -> Joined;
    /// Keeps serving a blob this appliance holds complete (its running slot, an agent
    /// release's file), so later waves of a rollout fetch it from the LAN. Every group is
    /// still re-verified as it is sent.
    fn serve_installed(&self, image: &ImageInfo, slot: PathBuf, state_dir: PathBuf);
    /// Stops serving and announcing a blob (its file is about to go).
    fn unserve(&self, blob: &sitecast_manifest::Blake3Hash);
    /// How site peers reach this appliance.
    fn addresses(&self) -> PeerAddresses;
    /// Peers the coordinator named for this site (for networks without multicast).
    fn site_peers(&self, peers: &[sitecast_manifest::api::SitePeer]);
    /// Site peers connected and how they were found.
    fn discovery(&self) -> crate::site::Discovery;
    /// Whom the LAN serves and hears; the agent sets it from check-in answers.
    fn membership(&self) -> Membership;
    /// Closes the connections gracefully as the agent exits, so peers see them end at once.
    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

pub struct Agent {
    config: AgentConfig,
    key: SecretKey,
    root: TrustedRoot,
    client: CoordinatorClient,
    state: AgentState,
    env: EnvFile,
    booted: Slot,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<Status>>,
    lan: Option<Arc<dyn Lan>>,
    /// This process's transfer counters, all downloads together (the metrics show them).
    stats: Arc<Mutex<TransferStats>>,
    /// The image a download found the active slot to hold, when the agent had not recorded
    /// one (Central Command named it and the slot's bytes hash to it): recorded when the
    /// download ends, so a later one does not hash the slot again.
    active_confirmed: Arc<Mutex<Option<InstalledImage>>>,
    /// Where the running download's figures start from (see [`Agent::count_figures`]).
    figures_base: Option<FiguresBase>,
    /// The slot read back and checked, waiting for the window.
    ready: Option<VerifiedSlot<FileDevice>>,
    /// Since when the slot has been ready and the window open (see [`LINGER_FOR_PEERS`]).
    lingering_since: Option<std::time::Instant>,
    /// Whether a site peer may still be downloading the release on offer: as the swarm saw
    /// it when it finished, then as Central Command says at each check-in.
    site_downloading: bool,
    /// Whether the last check-in's answer named online site peers.
    site_has_peers: bool,
    download: Option<tokio::task::JoinHandle<Result<VerifiedSlot<FileDevice>, String>>>,
    /// Stops the running download (a newer offer replaces it).
    download_stop: Option<tokio::sync::oneshot::Sender<()>>,
    download_started: Option<std::time::Instant>,
    membership: Membership,
    /// How the launcher started this process (if it did): its store and agent release.
    launched: Launched,
    /// A version of the launcher's store that has not yet confirmed there; the first
    /// successful check-in confirms it (that ends its trial).
    unconfirmed: bool,
    /// Fetching and staging an agent release.
    agent_fetch: Option<tokio::task::JoinHandle<Result<TransferStats, String>>>,
    /// Set to stop the running fetch (it stops at its next read).
    agent_fetch_cancel: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("site", &self.config.site)
            .field("booted", &self.booted)
            .finish_non_exhaustive()
    }
}

fn system_time(t: Timestamp) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.as_second()).unwrap_or(0))
}

fn state_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("agent.json")
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        metrics: Arc<Metrics>,
        status: Arc<Mutex<Status>>,
        lan: Option<Arc<dyn Lan>>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        std::fs::create_dir_all(&config.state_dir)?;
        let key = crate::identity::load_or_create(&config.state_dir.join("identity.key"))?;
        let root_bytes = std::fs::read(&config.root)
            .map_err(|e| anyhow::anyhow!("root of trust {}: {e}", config.root.display()))?;
        let root = TrustedRoot::pin(&root_bytes)?;
        let client = CoordinatorClient::new(
            &config.coordinator,
            config.coordinator_ca.as_deref(),
            key.clone(),
        )?;
        let state = AgentState::load(&state_path(&config))?;
        let env = EnvFile::new(&config.grubenv);
        let membership = lan.as_ref().map(|lan| lan.membership()).unwrap_or_default();
        let launched = Launched::from_env();
        // Before anything is served: a restart without the coordinator keeps the last word.
        membership.set(state.site_members.as_deref().map(crate::membership::parse_members));
        Ok(Self {
            config,
            key,
            root,
            client,
            state,
            env,
            booted: Slot::A,
            metrics,
            status,
            lan,
            stats: Arc::new(Mutex::new(TransferStats::default())),
            active_confirmed: Arc::default(),
            figures_base: None,
            ready: None,
            lingering_since: None,
            site_downloading: false,
            site_has_peers: false,
            download: None,
            download_stop: None,
            download_started: None,
            membership,
            unconfirmed: launched.from_store,
            launched,
            agent_fetch: None,
            agent_fetch_cancel: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    fn save(&self) {
        if let Err(error) = self.state.save(&state_path(&self.config)) {
            tracing::error!(%error, "saving agent state");
        }
        self.publish_status(None);
    }

    fn publish_status(&self, error: Option<String>) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.appliance = self.key.public().to_hex();
        status.site = self.config.site.clone();
        status.booted_slot = self.booted.to_string();
        status.slot_versions = self.state.slot_versions.clone();
        status.update = self.state.update.clone();
        status.last_contact = self.state.last_contact;
        let stats = *self.stats.lock().unwrap_or_else(|p| p.into_inner());
        status.progress = (self.download.is_some() && stats.pieces_total > 0)
            .then(|| stats.pieces_done as f64 / stats.pieces_total as f64);
        if error.is_some() {
            status.last_error = error;
        }
        status.config_unknown_keys = self.config.unknown_keys.clone();
        status.membership = self.membership.status();
        status.enrolled = self.state.enrolled;
        status.report_seq = self.state.report_seq;
        self.metrics.update(|m| {
            m.lan_refused = status.membership.lan_refused;
            m.announcements_ignored = status.membership.announcements_ignored;
        });
        if let Some(lan) = &self.lan {
            status.addresses = lan.addresses();
            status.discovery = lan.discovery();
            status.peers = status.discovery.connected;
            self.metrics.update(|m| {
                m.peers = status.discovery.connected;
                m.peers_found_by_mdns = status.discovery.found_by_mdns;
            });
        }
    }

    /// Which slot is running; with file-backed slots, apply GRUB's rules first as GRUB would.
    fn determine_boot_slot(&mut self) -> anyhow::Result<()> {
        self.booted = match self.config.boot_slot {
            BootSlotSource::SimulateGrub => {
                let (mut ab_state, mut vars) = ab::load_state(&self.env)?;
                let booted = ab_state.grub_model_boot();
                ab_state.write_to(&mut vars)?;
                use sitecast_iso::EnvStore;
                self.env.store(&vars)?;
                booted
            }
            BootSlotSource::Cmdline => {
                let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
                match cmdline.split_whitespace().find_map(|w| w.strip_prefix("ab.partition=")) {
                    Some("B") => Slot::B,
                    _ => Slot::A,
                }
            }
        };
        // A fresh appliance: its running slot holds whatever it was installed with.
        self.state.slot_versions.entry(self.booted.to_string()).or_insert(0);
        Ok(())
    }

    /// Reports the update's `state`; returns whether the coordinator has it (or refused it
    /// for good).
    async fn report(&mut self, state: UpdateState, error: Option<String>) -> bool {
        self.count_figures();
        let Some(update) = &self.state.update else { return true };
        let report = ReportRequest {
            state,
            version: update.version,
            previous_version: Some(update.previous_version),
            rollout: update.rollout,
            progress: None,
            bytes_from_origin: update.bytes_from_origin,
            bytes_from_lan: update.bytes_from_lan,
            bytes_from_mirror: update.bytes_from_mirror,
            bytes_reused: update.bytes_reused,
            slot: Some(if state == UpdateState::Succeeded {
                update.slot.clone()
            } else {
                self.booted.to_string()
            }),
            error,
            seq: None,
        };
        self.send_report(report, false).await
    }

    /// Numbers and sends a report. A number the coordinator finds stale (this agent's count
    /// is behind: its state was lost or restored from an old copy) is replaced once by one
    /// above the coordinator's, learnt from a check-in. Returns whether the coordinator has
    /// the report or refused it for good (a 4xx answer other than `unknown_appliance` and
    /// `stale_report`): not on a network or server error.
    async fn send_report(&mut self, mut report: ReportRequest, agent: bool) -> bool {
        report.seq = Some(self.take_report_seq());
        let mut result = self.client.report(&report, agent).await;
        if let Err(error) = &result
            && error.is_refusal(STALE_REPORT.0, STALE_REPORT.1)
        {
            tracing::warn!(seq = ?report.seq, "report number refused as stale; learning the coordinator's");
            // The answer's offer is left to the regular check-in.
            match self.exchange_checkin().await {
                Ok(response) => self.learn(&response),
                Err(error) => tracing::warn!(%error, "check-in for the report number failed"),
            }
            report.seq = Some(self.take_report_seq());
            result = self.client.report(&report, agent).await;
        }
        match result {
            Ok(()) => true,
            Err(error) => {
                // Not final: a coordinator that no longer knows this appliance (it enrolls
                // again, then hears the report) or a number still behind.
                let unknown = error.is_refusal(UNKNOWN_APPLIANCE.0, UNKNOWN_APPLIANCE.1);
                if unknown {
                    self.forget_enrollment();
                }
                tracing::warn!(%error, "report not delivered; the next check-in carries the state");
                let retry = unknown || error.is_refusal(STALE_REPORT.0, STALE_REPORT.1);
                !retry && matches!(error, ClientError::Refused { status: 400..=499, .. })
            }
        }
    }

    /// The next report number, saved before the report carrying it leaves.
    fn take_report_seq(&mut self) -> u64 {
        let seq = self.state.next_report_seq();
        self.save();
        seq
    }

    /// The coordinator does not know this appliance (an operator removed it): the next
    /// check-in carries the enrollment token again.
    fn forget_enrollment(&mut self) {
        if self.state.enrolled {
            tracing::warn!(
                "the coordinator does not know this appliance any more; enrolling again"
            );
            self.state.enrolled = false;
            self.save();
        }
    }

    fn set_update_state(&mut self, state: UpdateState, error: Option<String>) {
        if let Some(update) = self.state.update.as_mut() {
            update.state = state;
            update.error = error;
        }
        self.save();
    }

    /// After a (simulated or real) boot: the health gate decides about a trial slot.
    async fn after_boot(&mut self) -> Option<Exit> {
        let (mut ab_state, vars) = match ab::load_state(&self.env) {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(%error, "boot state unreadable; staying on the running slot");
                return None;
            }
        };
        match ab_state.outcome(self.booted) {
            BootOutcome::Normal => {
                // Marked good, but the agent stopped before recording it: finish the bookkeeping.
                if let Some(update) = self.state.update.clone()
                    && update.state == UpdateState::Rebooting
                    && update.slot == self.booted.to_string()
                    && ab_state.active == self.booted
                {
                    self.record_success(self.booted).await;
                }
                None
            }
            BootOutcome::RolledBack { failed } => {
                self.record_rollback(failed);
                // Recorded first: an agent stopped before this finds the rollback again and
                // reports what it recorded.
                ab_state.acknowledge_rollback();
                if let Err(error) = ab::save_state(&mut self.env, &ab_state, vars) {
                    tracing::error!(%error, "acknowledging the rollback failed");
                }
                self.metrics.update(|m| m.rollback_count = self.state.rollbacks);
                self.report_rollback().await;
                None
            }
            BootOutcome::Trial { slot, .. } => {
                let started = std::time::Instant::now();
                if let Some(update) = self.state.update.as_mut()
                    && update.slot == slot.to_string()
                {
                    update.trial_boots += 1;
                    self.save();
                }
                let gate = self.health_gate();
                let checks = gate.names().to_vec();
                // Checks block (the command for up to its time limit): off the runtime.
                let failures =
                    tokio::task::spawn_blocking(move || gate.run()).await.unwrap_or_else(|error| {
                        let reason = format!("the gate stopped: {error}");
                        vec![CheckFailure { check: "health gate".into(), reason }]
                    });
                let decision = health::decide(&mut ab_state, slot, failures);
                match decision {
                    GateDecision::MarkedGood { slot } => {
                        tracing::info!(%slot, ?checks, "health gate passed; marking the slot good");
                        if let Err(error) = ab::save_state(&mut self.env, &ab_state, vars) {
                            tracing::error!(%error, "marking the slot good failed; GRUB will count this boot");
                            return Some(Exit::Reboot);
                        }
                        self.metrics
                            .update(|m| m.reboot_seconds = Some(started.elapsed().as_secs_f64()));
                        self.record_success(slot).await;
                        None
                    }
                    GateDecision::RetryBoot { failures, .. }
                    | GateDecision::FallBack { failures } => {
                        let reasons: Vec<String> =
                            failures.iter().map(|f| format!("{}: {}", f.check, f.reason)).collect();
                        let message =
                            format!("health gate failed on slot {slot}: {}", reasons.join("; "));
                        tracing::error!(%message);
                        self.set_update_state(UpdateState::Rebooting, Some(message.clone()));
                        self.report(UpdateState::Rebooting, Some(message)).await;
                        Some(Exit::Reboot)
                    }
                    GateDecision::NotOnTrial | GateDecision::RolledBack { .. } => None,
                }
            }
        }
    }

    /// The new slot is good: remember its release and floor, then report success.
    async fn record_success(&mut self, slot: Slot) {
        if let Some(update) = self.state.update.clone() {
            self.state.slot_versions.insert(slot.to_string(), update.version);
            if let Ok(verified) =
                self.root.verify_release(update.manifest.as_bytes(), Timestamp::now())
            {
                let image = &verified.release().image;
                self.state.record_slot_image(slot, image.size, &image.blake3);
                let floor = verified.release().rollback_floor.unwrap_or(0);
                self.state.rollback_floor = self.state.rollback_floor.max(floor);
            }
        }
        self.state.booted_at = Some(Timestamp::now());
        self.set_update_state(UpdateState::Succeeded, None);
        self.report(UpdateState::Succeeded, None).await;
    }

    /// Records that GRUB gave up slot `failed` (unless this agent already did, and stopped
    /// before acknowledging it), with the reason its report gives.
    fn record_rollback(&mut self, failed: Slot) {
        let recorded = self.state.update.as_ref().is_some_and(|update| {
            update.state == UpdateState::RolledBack && update.slot == failed.to_string()
        });
        if recorded {
            tracing::warn!(%failed, "a rollback recorded before the agent stopped");
            return;
        }
        let message = rollback_message(failed, self.booted, self.state.update.as_ref());
        tracing::warn!(%message);
        self.state.rollbacks += 1;
        if let Some(update) = self.state.update.as_mut() {
            update.state = UpdateState::RolledBack;
            update.error = Some(message);
            update.unreported = true;
        }
        self.save();
    }

    /// Sends the recorded rollback's report if the coordinator does not have it yet.
    async fn report_rollback(&mut self) {
        let Some(update) = &self.state.update else { return };
        if update.state != UpdateState::RolledBack || !update.unreported {
            return;
        }
        let error = update.error.clone();
        if self.report(UpdateState::RolledBack, error).await {
            if let Some(update) = self.state.update.as_mut() {
                update.unreported = false;
            }
            self.save();
        }
    }

    /// The release the running system names in `release_file` is the booted slot's, whatever
    /// the state says (the file is part of what runs). Never fatal.
    fn learn_running_release(&mut self) {
        let Some(path) = &self.config.release_file else { return };
        let version = match crate::release_file::read_version(path) {
            Ok(0) => {
                tracing::warn!(file = %path.display(), "VERSION_ID 0 names no release; ignored");
                return;
            }
            Ok(version) => version,
            Err(error) => {
                tracing::warn!(%error, "the running release is not known from the system");
                return;
            }
        };
        let slot = self.booted;
        let recorded = self.state.version_of(slot);
        if recorded == version {
            return;
        }
        if recorded == 0 {
            tracing::info!(%slot, version, file = %path.display(), "running release read from the system");
        } else {
            tracing::warn!(
                %slot,
                recorded,
                version,
                file = %path.display(),
                "the system runs another release than the agent recorded; trusting the system"
            );
        }
        if self.state.slot_versions.insert(slot.to_string(), version) != Some(version) {
            // The size and hash recorded were another release's.
            self.state.forget_slot_image(slot);
        }
        self.save();
    }

    fn health_gate(&self) -> TrialGate {
        let timeout = Duration::from_secs(self.config.health_timeout_secs);
        let mut gate =
            TrialGate::new(timeout).with(DiskWritable { dir: self.config.state_dir.clone() });
        let host_port = self
            .config
            .coordinator
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if let Some(addr) = host_port.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            gate = gate.with(ApiReachable { addr, timeout });
        }
        let not_before = self
            .state
            .update
            .as_ref()
            .and_then(|u| self.root.verify_release(u.manifest.as_bytes(), Timestamp::now()).ok())
            .map_or(std::time::SystemTime::UNIX_EPOCH, |v| system_time(v.release().created));
        let gate = gate.with(TimeSynchronized { not_before, now: std::time::SystemTime::now });
        match CommandCheck::new(self.config.health_command.clone(), timeout) {
            Some(command) => gate.with_command(command),
            None => gate,
        }
    }

    fn checkin_request(&self) -> CheckinRequest {
        let macs = if self.config.macs.is_empty() {
            crate::identity::local_macs()
        } else {
            self.config.macs.clone()
        };
        CheckinRequest {
            site: self.config.site.clone(),
            name: self.config.name.clone(),
            group: self.config.group.clone(),
            macs,
            platform: self.config.platform.clone(),
            installed_version: self.state.version_of(self.booted),
            active_slot: Some(self.booted.to_string()),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            agent_release: Some(self.launched.release),
            agent_previous: self.launched.store.as_deref().and_then(|store| {
                sitecast_launcher::AgentStore::at(store).previous().ok().flatten()
            }),
            // A fleet-wide secret: it goes over the wire only until the coordinator knows us.
            enrollment_token: if self.state.enrolled {
                None
            } else {
                self.config.enrollment_token.clone()
            },
            peer: self.lan.as_ref().map(|l| l.addresses()).unwrap_or_default(),
        }
    }

    /// One check-in request; an appliance the coordinator does not know (any more) asks
    /// again at once with the enrollment token.
    async fn exchange_checkin(&mut self) -> Result<CheckinResponse, ClientError> {
        match self.client.checkin(&self.checkin_request()).await {
            Err(error)
                if self.state.enrolled
                    && error.is_refusal(UNKNOWN_APPLIANCE.0, UNKNOWN_APPLIANCE.1) =>
            {
                self.forget_enrollment();
                self.client.checkin(&self.checkin_request()).await
            }
            result => result,
        }
    }

    /// What every check-in answer settles, whatever it offers: this appliance is enrolled,
    /// the coordinator's report count, the site's members. The caller saves the state.
    fn learn(&mut self, response: &CheckinResponse) {
        self.state.enrolled = true;
        if let Some(accepted) = response.report_seq
            && self.state.raise_report_seq(accepted)
        {
            tracing::warn!(
                accepted,
                "the coordinator accepted more reports than this agent counted; continuing above"
            );
        }
        // In one order, so a list that only comes in another order is not a change.
        let members = response.site_members.clone().map(|mut members| {
            members.sort();
            members.dedup();
            members
        });
        if self.state.site_members != members {
            tracing::info!(members = ?members.as_ref().map(Vec::len), "site membership changed");
            self.membership.set(members.as_deref().map(crate::membership::parse_members));
            self.state.site_members = members;
        }
    }

    async fn checkin(&mut self) {
        let response = match self.exchange_checkin().await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%error, "check-in failed");
                self.metrics.update(|m| m.checkin_errors += 1);
                self.publish_status(Some(error.to_string()));
                return;
            }
        };
        self.learn(&response);
        // Before an offer replaces the update record.
        self.report_rollback().await;
        self.metrics.update(|m| m.checkins += 1);
        if response.window.is_some() {
            self.state.window = response.window.clone();
        }
        let now = Timestamp::now();
        self.state.last_contact = Some(now);
        // The coordinator answered: an error from reaching it (or from an earlier offer) is
        // over; one this answer causes is shown again below.
        self.status.lock().unwrap_or_else(|p| p.into_inner()).last_error = None;
        if self.unconfirmed
            && let Some(store) = &self.launched.store
        {
            let version = self.launched.release;
            match sitecast_launcher::AgentStore::confirm(store, version) {
                Ok(()) => {
                    tracing::info!(version, "agent version confirmed to the launcher");
                    self.unconfirmed = false;
                }
                // Tried again at the next check-in: unconfirmed, the version is rolled back.
                Err(error) => tracing::warn!(%error, "cannot confirm to the launcher"),
            }
        }
        if self.state.booted_at.is_some_and(|booted| now >= booted) {
            // The update is confirmed: the coordinator heard from the new release.
            self.state.booted_at = None;
        }
        self.record_frozen_path();
        self.settle_agent_update().await;
        self.consider_agent_offer(response.agent_offer.as_ref()).await;
        if let Some(lan) = &self.lan {
            lan.site_peers(&response.site_peers);
        }
        self.site_downloading =
            response.site_peers.iter().any(|p| p.state == Some(UpdateState::Downloading));
        self.site_has_peers = !response.site_peers.is_empty();
        if self.download_superseded(&response) {
            tracing::info!(version = ?response.version, "a newer offer replaces the running download");
            self.stop_download().await;
        }
        let downloading = self.download.is_some();
        if let Err(message) = self.consider(&response) {
            tracing::warn!(%message, "offered update refused");
            self.publish_status(Some(message.clone()));
            // Tell the coordinator, so a bad release shows up in the rollout instead of
            // silently never installing.
            if let Some(version) = response.version {
                let report = ReportRequest {
                    state: UpdateState::Failed,
                    version,
                    previous_version: Some(self.state.version_of(self.booted)),
                    rollout: response.rollout,
                    progress: None,
                    bytes_from_origin: 0,
                    bytes_from_lan: 0,
                    bytes_from_mirror: 0,
                    bytes_reused: 0,
                    slot: Some(self.booted.to_string()),
                    error: Some(message),
                    seq: None,
                };
                self.send_report(report, false).await;
            }
        }
        // What the running download moved so far is recorded at every check-in: a restart
        // goes on counting from there.
        self.count_figures();
        self.save();
        if !downloading && self.download.is_some() {
            self.report(UpdateState::Downloading, None).await;
        }
    }

    /// Whether the running download is not what the coordinator offers any more: another
    /// release, or the same one from another origin address.
    fn download_superseded(&self, response: &CheckinResponse) -> bool {
        let (Some(_), Some(update), Some(version)) =
            (&self.download, &self.state.update, response.version)
        else {
            return false;
        };
        let ranges = response.origin.as_ref().map(|o| &o.ranges);
        let Some(manifest) = &response.manifest else { return false };
        let different = version != update.version || ranges != update.ranges_url.as_ref();
        if !response.update_available || !different {
            return false;
        }
        // A refused offer must not cost the download that runs.
        match self.verify_offer(response, manifest, version) {
            Ok(_) => true,
            Err(message) => {
                tracing::warn!(%message, "offered update refused; the running download goes on");
                false
            }
        }
    }

    /// Stops the running download and waits until it has let go of the slot; what it
    /// verified and wrote stays recorded for a download of the same release.
    async fn stop_download(&mut self) {
        if let Some(stop) = self.download_stop.take() {
            let _ = stop.send(());
        }
        if let Some(download) = self.download.take() {
            let _ = download.await;
        }
        self.download_started = None;
        self.count_figures();
        self.figures_base = None;
    }

    /// Sets the update record's byte figures: what the record held when the running download
    /// started (earlier runs of the same download, before a restart or a retry) and what this
    /// process's counters moved since. Nothing while no download runs.
    fn count_figures(&mut self) {
        let (Some(update), Some(base)) = (self.state.update.as_mut(), &self.figures_base) else {
            return;
        };
        let now = *self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let (then, recorded) = (&base.counters, &base.recorded);
        // Saturating: a state file is read as it is, and a figure in it may be anything.
        let since =
            |now: u64, then: u64, recorded: u64| recorded.saturating_add(now.saturating_sub(then));
        update.bytes_from_origin =
            since(now.bytes_from_origin, then.bytes_from_origin, recorded.bytes_from_origin);
        update.bytes_from_lan =
            since(now.bytes_from_lan, then.bytes_from_lan, recorded.bytes_from_lan);
        update.bytes_from_mirror =
            since(now.bytes_from_mirror, then.bytes_from_mirror, recorded.bytes_from_mirror);
        update.bytes_reused = since(now.bytes_reused, then.bytes_reused, recorded.bytes_reused);
    }

    /// The offered manifest, verified against the root and this appliance's install policy.
    fn verify_offer(
        &self,
        response: &CheckinResponse,
        manifest: &str,
        version: u64,
    ) -> Result<sitecast_manifest::VerifiedRelease, String> {
        let intent = match response.intent {
            Some(UpdateIntent::Rollback) => Intent::Rollback,
            _ => Intent::Upgrade,
        };
        self.root
            .verify_release(manifest.as_bytes(), Timestamp::now())
            .and_then(|v| {
                v.check_install(&InstallPolicy {
                    platform: self.config.platform.clone(),
                    installed_version: self.state.version_of(self.booted),
                    rollback_floor: self.state.rollback_floor,
                    intent,
                })
                .map(|()| v)
            })
            .map_err(|e| format!("release {version} refused: {e}"))
    }

    /// Looks at an offer; starts a download if it is new and verifies.
    fn consider(&mut self, response: &CheckinResponse) -> Result<(), String> {
        if !response.update_available {
            return Ok(());
        }
        let (Some(manifest), Some(version)) = (&response.manifest, response.version) else {
            return Err("the coordinator offered an update without a manifest".into());
        };
        if self.download.is_some() {
            return Ok(());
        }
        // Downloading after a restart: start again, the writer resumes from its records.
        // A release GRUB gave up on here is not taken again for the same offer (until its
        // rollout is paused it is still offered: that would be a loop of bad boots); a new
        // rollout of it is.
        if let Some(update) = &self.state.update
            && update.version == version
            && (matches!(
                update.state,
                UpdateState::Ready | UpdateState::Rebooting | UpdateState::Succeeded
            ) || (update.state == UpdateState::RolledBack
                && update.rollout == response.rollout))
        {
            return Ok(());
        }
        let installed = self.state.version_of(self.booted);
        let verified = self.verify_offer(response, manifest, version)?;
        let standby = ab::load_state(&self.env).map_err(|e| e.to_string())?.0.standby();
        let standby = if standby == self.booted { self.booted.other() } else { standby };
        // The same release again, after a restart mid-download or a failed try: its bytes so
        // far count towards this update (the slot's records keep what they brought).
        let again = [UpdateState::Downloading, UpdateState::Failed];
        let carried = self
            .state
            .update
            .as_ref()
            .filter(|u| u.version == version && again.contains(&u.state))
            .map(UpdateRecord::figures)
            .unwrap_or_default();
        self.state.update = Some(UpdateRecord {
            version,
            manifest: manifest.clone(),
            state: UpdateState::Downloading,
            slot: standby.to_string(),
            previous_version: installed,
            rollout: response.rollout,
            intent: response.intent.unwrap_or(UpdateIntent::Upgrade),
            started: Timestamp::now(),
            ranges_url: response.origin.as_ref().map(|o| o.ranges.clone()),
            outboard_blob: response.origin.as_ref().and_then(|o| o.outboard_blob.clone()),
            group_hashes_blob: response.origin.as_ref().and_then(|o| o.group_hashes_blob.clone()),
            plan_blob: response.origin.as_ref().and_then(|o| o.plan.clone()),
            error: None,
            bytes_from_origin: carried.bytes_from_origin,
            bytes_from_lan: carried.bytes_from_lan,
            bytes_from_mirror: carried.bytes_from_mirror,
            bytes_reused: carried.bytes_reused,
            download_seconds: None,
            trial_boots: 0,
            unreported: false,
        });
        // The standby slot is about to be overwritten: whatever it held is neither ready to
        // activate nor a release to roll back to any more.
        self.ready = None;
        self.lingering_since = None;
        self.state.slot_versions.remove(&standby.to_string());
        self.state.forget_slot_image(standby);
        let release = verified.release();
        self.start_download(
            release.image.clone(),
            release.index.clone(),
            standby,
            response.origin.clone(),
        );
        Ok(())
    }

    fn start_download(
        &mut self,
        image: ImageInfo,
        index: Option<ContentIndex>,
        slot: Slot,
        origin_urls: Option<OriginUrls>,
    ) {
        let paths = SlotPaths::beside(self.config.slot_path(slot), &self.config.state_dir);
        // What the running image shares with the new one is copied from its slot.
        let active = self.booted;
        let index_url = origin_urls.as_ref().and_then(|o| o.index.clone());
        let reuse = index.zip(index_url).map(|(index, index_url)| ReuseFrom {
            index,
            index_url,
            active: self.config.slot_path(active).to_owned(),
            active_len: self.state.slot_image_sizes.get(&active.to_string()).copied(),
            active_blake3: self.state.slot_image_blake3.get(&active.to_string()).cloned(),
            installed: origin_urls.as_ref().and_then(|o| o.installed),
        });
        let members = self.membership.members().unwrap_or_default();
        tracing::info!(%slot, size = image.size, blake3 = %image.blake3, "download started");
        let download = Download {
            image,
            slot,
            paths,
            client: self.client.clone(),
            ranges_url: origin_urls.as_ref().map(|o| o.ranges.clone()),
            outboard_url: origin_urls.as_ref().and_then(|o| o.outboard.clone()),
            bytes_url: origin_urls.as_ref().and_then(|o| o.bytes.clone()),
            outboard_blob: origin_urls.as_ref().and_then(|o| o.outboard_blob.clone()),
            group_hashes_blob: origin_urls.as_ref().and_then(|o| o.group_hashes_blob.clone()),
            plan_blob: origin_urls.as_ref().and_then(|o| o.plan.clone()),
            mirrors: origin_urls.map(|o| o.mirrors).unwrap_or_default(),
            reuse,
            state_dir: self.config.state_dir.clone(),
            me: PeerId(*self.key.public().as_bytes()),
            site_members: members.into_iter().map(PeerId).collect(),
            lan: self.lan.clone(),
            stats: Arc::clone(&self.stats),
            active_confirmed: Arc::clone(&self.active_confirmed),
        };
        self.download_started = Some(std::time::Instant::now());
        let counters = *self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let recorded = self.state.update.as_ref().map(UpdateRecord::figures).unwrap_or_default();
        self.figures_base = Some(FiguresBase { counters, recorded });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        self.download_stop = Some(stop);
        self.download = Some(tokio::spawn(download.run(stopped)));
    }

    async fn download_finished(&mut self, result: Result<VerifiedSlot<FileDevice>, String>) {
        self.download = None;
        self.download_stop = None;
        let confirmed = self.active_confirmed.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(image) = confirmed {
            self.state.record_slot_image(self.booted, image.size, &image.blake3);
            self.save();
        }
        let stats = *self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let seconds = self.download_started.take().map(|s| s.elapsed().as_secs_f64());
        self.count_figures();
        self.figures_base = None;
        if let Some(update) = self.state.update.as_mut() {
            update.download_seconds = seconds;
        }
        self.metrics.update(|m| {
            m.bytes_from_origin = stats.bytes_from_origin;
            m.bytes_from_lan = stats.bytes_from_lan;
            m.bytes_from_mirror = stats.bytes_from_mirror;
            m.bytes_reused = stats.bytes_reused;
            m.download_seconds = seconds;
        });
        // This update's figures (the metrics count every download of this process).
        let figures = self.state.update.as_ref().map(UpdateRecord::figures).unwrap_or_default();
        tracing::info!(
            seconds = seconds.unwrap_or(0.0),
            bytes_from_origin = figures.bytes_from_origin,
            bytes_from_lan = figures.bytes_from_lan,
            bytes_from_mirror = figures.bytes_from_mirror,
            bytes_reused = figures.bytes_reused,
            peak_rss_mib = crate::metrics::peak_rss_bytes().unwrap_or(0) >> 20,
            ok = result.is_ok(),
            "download finished"
        );
        match result {
            Ok(verified) => {
                self.ready = Some(verified);
                // Until the next check-in says otherwise: the swarm's own last view, and any
                // site peer it may not have heard from yet (a download copied whole from the
                // active slot ends before the first news of the site arrives).
                self.site_downloading = stats.peers_missing_pieces > 0 || self.site_has_peers;
                self.serve_running_release();
                self.set_update_state(UpdateState::Ready, None);
                self.report(UpdateState::Ready, None).await;
            }
            Err(error) => {
                self.set_update_state(UpdateState::Failed, Some(error.clone()));
                self.report(UpdateState::Failed, Some(error)).await;
            }
        }
    }

    fn window_open(
        &self,
        response_window: Option<&sitecast_manifest::window::MaintenanceWindow>,
    ) -> bool {
        if self.state.skip_window {
            return true;
        }
        match response_window {
            Some(window) => window.is_open(Timestamp::now()).unwrap_or(false),
            None => true,
        }
    }

    /// Activates the ready slot and reboots into it.
    async fn activate_and_reboot(&mut self) -> Option<Exit> {
        let started = std::time::Instant::now();
        let verified = match self.ready.take() {
            Some(verified) => verified,
            None => return None,
        };
        match verified.activate(&mut self.env, self.config.boot_tries) {
            Ok(_) => {
                self.state.skip_window = false;
                self.metrics.update(|m| m.apply_seconds = Some(started.elapsed().as_secs_f64()));
                self.set_update_state(UpdateState::Rebooting, None);
                self.report(UpdateState::Rebooting, None).await;
                Some(self.reboot())
            }
            Err(error) => {
                let message = format!("activation failed: {error}");
                self.set_update_state(UpdateState::Failed, Some(message.clone()));
                self.report(UpdateState::Failed, Some(message)).await;
                None
            }
        }
    }

    fn reboot(&self) -> Exit {
        self.save();
        if let Some((program, args)) = self.config.reboot_command.split_first() {
            tracing::info!(?self.config.reboot_command, "rebooting");
            if let Err(error) = std::process::Command::new(program).args(args).status() {
                tracing::error!(%error, "reboot command failed");
            }
        }
        Exit::Reboot
    }

    /// Operator-ordered local rollback: back to the other slot if it holds a verified release.
    fn local_rollback(&mut self) -> Result<String, String> {
        if self.download.is_some() {
            return Err("a download is writing the other slot; wait for it to finish".into());
        }
        let other = self.booted.other();
        let version = self.state.version_of(other);
        if version == 0 {
            return Err(format!("slot {other} holds no known release"));
        }
        let (mut ab_state, vars) = ab::load_state(&self.env).map_err(|e| e.to_string())?;
        if ab_state.active != self.booted {
            return Err(
                "the running slot is not the active one; finish the current update first".into()
            );
        }
        ab_state.revert();
        ab::save_state(&mut self.env, &ab_state, vars).map_err(|e| e.to_string())?;
        self.state.rollbacks += 1;
        self.save();
        Ok(format!("slot {other} (release {version}) is active; rebooting"))
    }

    /// Runs until a reboot.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> anyhow::Result<Exit> {
        self.determine_boot_slot()?;
        self.publish_status(None);
        tracing::info!(slot = %self.booted, appliance = %self.key.public(), "agent started");
        if !self.config.unknown_keys.is_empty() {
            tracing::warn!(
                keys = ?self.config.unknown_keys,
                "configuration keys this agent does not know are ignored (written for a newer agent, or typos; `sitecast-peer config check` lists them)"
            );
        }
        if let Some(exit) = self.after_boot().await {
            return Ok(self.reboot_after(exit));
        }
        self.learn_running_release();
        self.serve_running_release();
        self.serve_agent_files();
        // A slot verified before a restart is checked again before it may be activated.
        if let Some(update) = self.state.update.clone()
            && update.state == UpdateState::Ready
        {
            self.recheck_ready(&update);
        }
        // The next regular check-in, and an early one strangers on the LAN asked for.
        let mut regular_at = tokio::time::Instant::now();
        let mut early_at: Option<tokio::time::Instant> = None;
        let mut early = EarlyCheckins::default();
        // `status` shows progress and the site's connections as they are, not as they were
        // at the last check-in (a minute ago in the field).
        let mut refresh_status = tokio::time::interval(Duration::from_millis(500));
        let membership = self.membership.clone();
        loop {
            tokio::select! {
                _ = refresh_status.tick() => self.publish_status(None),
                strangers = membership.strangers_seen() => {
                    for peer in strangers {
                        if early.handle_stranger(peer) {
                            tracing::info!(peer = %hex::encode(peer), "a non-member showed up; checking in early");
                            early_at = Some(tokio::time::Instant::now());
                        }
                    }
                    self.publish_status(None);
                }
                () = tokio::time::sleep_until(early_at.map_or(regular_at, |at| at.min(regular_at))) => {
                    let now = tokio::time::Instant::now();
                    let regular = now >= regular_at;
                    if regular {
                        regular_at = now + self.config.checkin_interval();
                    }
                    early_at = None;
                    early.handle_checkin(regular);
                    self.checkin().await;
                    if let Some(booted) = self.state.booted_at
                        && health::should_revert_for_connectivity(system_time(booted), self.state.last_contact.map(system_time), std::time::SystemTime::now())
                    {
                        tracing::error!("no contact with the coordinator for an hour after the update: reverting");
                        if self.local_rollback().is_ok() {
                            return Ok(self.reboot_after(Exit::Reboot));
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Check) => regular_at = tokio::time::Instant::now(),
                    Some(Command::SkipWindow) => {
                        self.state.skip_window = true;
                        self.save();
                    }
                    Some(Command::Rollback(answer)) => {
                        let result = self.local_rollback();
                        let ok = result.is_ok();
                        let _ = answer.send(result);
                        if ok {
                            return Ok(self.reboot_after(Exit::Reboot));
                        }
                    }
                    None => {}
                },
                result = async { self.download.as_mut().expect("guarded").await }, if self.download.is_some() => {
                    let result = result.unwrap_or_else(|e| Err(e.to_string()));
                    self.download_finished(result).await;
                }
                result = async { self.agent_fetch.as_mut().expect("guarded").await }, if self.agent_fetch.is_some() => {
                    let result = result.unwrap_or_else(|e| Err(e.to_string()));
                    self.agent_fetch_finished(result).await;
                }
                // Lingering for site peers ends on time, not at the next check-in.
                () = linger_ends(self.lingering_since), if self.ready.is_some() && self.lingering_since.is_some() => {}
            }
            // A reboot that was due in the window goes ahead once lingering ends, even if the
            // window closed meanwhile.
            if self.ready.is_some()
                && (self.window_open(self.state.window.as_ref()) || self.lingering_since.is_some())
                && !self.lingers_for_peers()
                && let Some(exit) = self.activate_and_reboot().await
            {
                return Ok(exit);
            }
            // The check-in that says the site is done comes sooner while it lingers.
            if self.lingering_since.is_some() {
                let members = self.membership.members().map_or(1, |m| m.len());
                regular_at = regular_at.min(tokio::time::Instant::now() + linger_checkin(members));
            }
        }
    }

    /// Whether to keep serving the ready release a while before rebooting: while site peers
    /// are downloading it, for at most [`LINGER_FOR_PEERS`] from when the reboot was due.
    fn lingers_for_peers(&mut self) -> bool {
        // An operator who said "now" (skip-window) means now.
        if self.lan.is_none() || !self.site_downloading || self.state.skip_window {
            return false;
        }
        let since = *self.lingering_since.get_or_insert_with(|| {
            tracing::info!(
                "site peers are still downloading the release: serving it before rebooting"
            );
            std::time::Instant::now()
        });
        since.elapsed() < LINGER_FOR_PEERS
    }

    fn serve_running_release(&self) {
        let (Some(lan), Some(update)) = (&self.lan, &self.state.update) else { return };
        let holds_it = update.state == UpdateState::Succeeded || update.state == UpdateState::Ready;
        let slot = if update.slot == "B" { Slot::B } else { Slot::A };
        if !holds_it {
            return;
        }
        if let Ok(verified) = self.root.verify_release(update.manifest.as_bytes(), Timestamp::now())
        {
            lan.serve_installed(
                &verified.release().image,
                self.config.slot_path(slot).to_owned(),
                self.config.state_dir.clone(),
            );
            // Its content index, outboard, group hashes and plan too, for the site's later stages
            // (after a restart as well).
            let cache = download::release_files(&self.config.state_dir);
            let index = verified.release().index.as_ref().map(|index| index.file());
            let blobs = update
                .outboard_blob
                .iter()
                .chain(&update.group_hashes_blob)
                .chain(&update.plan_blob);
            let side = blobs.map(BlobOffer::file);
            for file in index.into_iter().chain(side) {
                if cache.holds(&file) {
                    let path = cache.paths(&file.blake3).slot;
                    lan.serve_installed(&file, path, cache.dir().to_owned());
                }
            }
        }
    }

    fn reboot_after(&self, exit: Exit) -> Exit {
        match exit {
            Exit::Reboot => self.reboot(),
        }
    }

    fn recheck_ready(&mut self, update: &UpdateRecord) {
        let slot = if update.slot == "B" { Slot::B } else { Slot::A };
        let Ok(verified) = self.root.verify_release(update.manifest.as_bytes(), Timestamp::now())
        else {
            self.set_update_state(
                UpdateState::Failed,
                Some("the manifest no longer verifies".into()),
            );
            return;
        };
        let image = verified.release().image.clone();
        match FileDevice::open(self.config.slot_path(slot)).map_err(|e| e.to_string()).and_then(
            |device| VerifiedSlot::check_existing(slot, &image, device).map_err(|e| e.to_string()),
        ) {
            Ok(verified) => self.ready = Some(verified),
            Err(error) => self.set_update_state(
                UpdateState::Failed,
                Some(format!("ready slot changed: {error}")),
            ),
        }
    }
}

/// What the report of GRUB's fallback from `failed` to `booted` says: why the slot was given
/// up, as far as the update record tells (written before each trial reboot).
pub fn rollback_message(failed: Slot, booted: Slot, update: Option<&UpdateRecord>) -> String {
    let trial =
        update.filter(|u| u.slot == failed.to_string() && u.state == UpdateState::Rebooting);
    match trial {
        // Only a failed health gate leaves an error on an update that is rebooting.
        Some(UpdateRecord { error: Some(gate), .. }) => {
            format!("slot {failed} used up its tries (last health gate: {gate}); back on {booted}")
        }
        Some(update) if update.trial_boots == 0 => format!(
            "slot {failed} used up its tries without the agent starting on it (kernel or early \
             boot failed); back on {booted}"
        ),
        Some(update) => format!(
            "slot {failed} used up its tries (the agent started on it {} time(s) but its health \
             gate never finished); back on {booted}",
            update.trial_boots
        ),
        None => format!("slot {failed} used up its tries; back on {booted}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_site_lingers_with_fewer_check_ins_each() {
        let per_second = |members: usize| members as f64 / linger_checkin(members).as_secs_f64();
        assert_eq!(linger_checkin(1), LINGER_CHECKIN);
        assert_eq!(linger_checkin(10), LINGER_CHECKIN);
        for members in [10, 24, 128, 1000] {
            assert!(per_second(members) <= 2.0, "{members}: {} a second", per_second(members));
        }
        assert!(linger_checkin(1000) > LINGER_FOR_PEERS, "past the linger: no extra check-in");
    }

    fn update(state: UpdateState, error: Option<&str>, trial_boots: u32) -> UpdateRecord {
        UpdateRecord {
            version: 2,
            manifest: String::new(),
            state,
            slot: "B".into(),
            previous_version: 1,
            rollout: Some(1),
            intent: UpdateIntent::Upgrade,
            started: Timestamp::UNIX_EPOCH,
            ranges_url: None,
            outboard_blob: None,
            group_hashes_blob: None,
            plan_blob: None,
            error: error.map(str::to_owned),
            bytes_from_origin: 0,
            bytes_from_lan: 0,
            bytes_from_mirror: 0,
            bytes_reused: 0,
            download_seconds: None,
            trial_boots,
            unreported: false,
        }
    }

    #[test]
    fn a_rollback_says_why_the_slot_was_given_up() {
        let gate = "health gate failed on slot B: health command: `check` failed (exit status: 1)";
        let failed = update(UpdateState::Rebooting, Some(gate), 2);
        assert_eq!(
            rollback_message(Slot::B, Slot::A, Some(&failed)),
            format!("slot B used up its tries (last health gate: {gate}); back on A")
        );
        let never_started = update(UpdateState::Rebooting, None, 0);
        assert_eq!(
            rollback_message(Slot::B, Slot::A, Some(&never_started)),
            "slot B used up its tries without the agent starting on it (kernel or early boot \
             failed); back on A"
        );
        let gate_unfinished = update(UpdateState::Rebooting, None, 1);
        assert!(
            rollback_message(Slot::B, Slot::A, Some(&gate_unfinished))
                .contains("the agent started on it 1 time(s) but its health gate never finished"),
        );
        // Nothing on trial that the record knows of: no reason to give.
        let plain = "slot B used up its tries; back on A";
        assert_eq!(rollback_message(Slot::B, Slot::A, None), plain);
        let succeeded = update(UpdateState::Succeeded, None, 1);
        assert_eq!(rollback_message(Slot::B, Slot::A, Some(&succeeded)), plain);
        let other_slot = update(UpdateState::Rebooting, Some(gate), 1);
        assert_eq!(
            rollback_message(Slot::A, Slot::B, Some(&other_slot)),
            "slot A used up its tries; back on B"
        );
    }
}
