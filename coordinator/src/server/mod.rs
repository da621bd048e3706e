//! The HTTP server: thin axum handlers over [`Fleet`], the store and the image store.
//!
//! Every state change goes through [`mutate`]: compute the changes from the fleet as it is,
//! commit them, and only then apply them, all under the fleet lock. A commit that fails closes
//! the store: writes are refused (503) and `/healthz` says so until the store is reopened and
//! the fleet reloaded from what is durable, so nothing answered as done is ever lost and
//! nothing unstored is ever served. The reopening and reloading run beside the fleet lock,
//! not under it, so a slow repair holds up no read and no check-in that only updates
//! bookkeeping.
//!
//! On a store several replicas share, replicas take turns to change the fleet: in its turn, a
//! replica catches its fleet up with the store ([`AppState::catch_up`]), computes, commits and
//! applies ([`AppState::serialized`]). Once a second the background catches up for reads too.

mod agent_releases;
mod appliances;
mod auth;
mod ddi;
mod mirrors;
mod operator;
mod origin;
mod range_pool;
mod releases;
mod session_api;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use jiff::Timestamp;
use serde::Deserialize;
use sitecast_manifest::TrustedRoot;
use sitecast_manifest::api::ErrorBody;

use crate::blobs::BlobStore;
use crate::fleet::{Fleet, FleetConfig, FleetError};
use crate::session::{self, SessionError};
use crate::store::{Change, Store, StoreError};
use crate::web;

pub use self::auth::{OPERATOR_TOKEN, URL_SECRET};

/// JSON bodies larger than this are refused (413) before they are parsed.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;
/// The largest body an appliance may send (a check-in with every field at its bound is under
/// 16 KiB), so unauthenticated clients cannot make the server hold much memory each.
pub const MAX_APPLIANCE_BYTES: usize = 64 * 1024;
/// The largest sign-in body (`{"token": …}`), read before anyone is known.
const MAX_SIGN_IN_BYTES: usize = 4 * 1024;

/// Where "now" comes from: the system clock, or a clock tests move by hand.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

#[derive(Debug)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Mutex::new(start))
    }

    pub fn advance(&self, by: jiff::SignedDuration) {
        let mut now = lock(&self.0);
        *now = now.checked_add(by).expect("test clock stays in range");
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *lock(&self.0)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// A PostgreSQL database for the state (`postgres://…`); `None`: redb in `data_dir`.
    /// Images stay in `data_dir` either way.
    pub database: Option<String>,
    /// Shares `database` with other Central Commands (replicas).
    pub replica: bool,
    /// The root of trust releases must verify against; without it publishing is refused.
    pub root: Option<TrustedRoot>,
    pub operator_token: Option<String>,
    pub enrollment_token: Option<String>,
    /// Base URL appliances reach this server at; by default taken from each request's `Host`.
    pub public_url: Option<String>,
    pub fleet: FleetConfig,
    /// How often the rollout engine runs.
    pub tick: Duration,
    pub max_upload_bytes: u64,
    /// How long a Fleet Updates sign-in lasts.
    pub session_ttl: jiff::SignedDuration,
    /// New appliances enrolled per second at most, after a burst of `enroll_burst`.
    pub enroll_per_sec: f64,
    pub enroll_burst: u32,
    /// Verified-range responses being encoded at once; more wait briefly, then get 503.
    pub max_range_streams: usize,
    /// Of those, how many one client (IPv4 address or IPv6 /64) may hold or wait for at once;
    /// beyond it the answer is 503 at once. At least 1, at most `max_range_streams`. Behind a
    /// proxy every client is the proxy: raise it to `max_range_streams` there.
    pub max_range_streams_per_client: usize,
    /// How long an image download URL handed out in an offer stays valid.
    pub image_url_ttl: jiff::SignedDuration,
    /// Connection, header, body and write bounds of the listener.
    pub limits: crate::listener::Limits,
    /// Serve HTTPS with this certificate (re-read when the files change); `None`: plain HTTP,
    /// for a TLS proxy in front or a lab.
    pub tls: Option<sitecast_tls::CertificateFiles>,
    /// The hawkBit tenant DDI devices name in their URLs (case-insensitive).
    pub ddi_tenant: String,
    /// The DDI gateway token: any device of the tenant may poll with it and is registered.
    pub ddi_gateway_token: Option<String>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            database: None,
            replica: false,
            root: None,
            operator_token: None,
            enrollment_token: None,
            public_url: None,
            fleet: FleetConfig::default(),
            tick: Duration::from_secs(5),
            max_upload_bytes: 64 << 30,
            session_ttl: session::DEFAULT_TTL,
            enroll_per_sec: 20.0,
            enroll_burst: 200,
            max_range_streams: 64,
            // A quarter of the pool.
            max_range_streams_per_client: 16,
            image_url_ttl: jiff::SignedDuration::from_hours(24),
            limits: crate::listener::Limits::default(),
            tls: None,
            ddi_tenant: "DEFAULT".to_owned(),
            ddi_gateway_token: None,
        }
    }
}

/// Tokens generated on the first start, to be shown to the operator once.
#[derive(Debug, Clone)]
pub struct FirstRunTokens {
    pub operator: Option<String>,
    pub enrollment: Option<String>,
}

/// Where hawkBit DDI clients find their device ([`ddi`]).
const DDI_BASE: &str = "/{tenant}/controller/v1/{controller_id}";

#[derive(Debug)]
struct AppState {
    fleet: Mutex<Fleet>,
    store: Arc<dyn Store>,
    /// Why the store is closed, if a commit failed and it has not been reopened since.
    /// Changed only under the fleet lock.
    store_failure: Mutex<Option<String>>,
    /// Held while the store is reopened and the fleet reloaded (see [`AppState::repair`]).
    repairing: Mutex<()>,
    blobs: BlobStore,
    root: Option<TrustedRoot>,
    clock: Arc<dyn Clock>,
    public_url: Option<String>,
    /// Whether this server terminates TLS itself (then its own URLs are `https://`).
    serves_tls: bool,
    checkins: AtomicU64,
    /// Whether this replica held the engine's lease at its last tick.
    leading: AtomicBool,
    /// When the fleet was last caught up with a shared store.
    caught_up: Mutex<std::time::Instant>,
    /// When a request last asked for a catch-up ([`AppState::may_catch_up`]).
    catch_up_tried: Mutex<Option<std::time::Instant>>,
    session_ttl: jiff::SignedDuration,
    iroh: std::sync::OnceLock<crate::iroh_origin::IrohOrigin>,
    enrollments: Mutex<auth::RateLimit>,
    refusals: Mutex<auth::RateLimit>,
    range_pool: range_pool::RangePool,
    /// Answers being compressed against a reference ([`origin::REFERENCE_STREAMS`]).
    reference_streams: Arc<tokio::sync::Semaphore>,
    image_url_ttl: jiff::SignedDuration,
    ddi_tenant: String,
    listener_stats: crate::listener::Stats,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Tries a change makes before it gives up (503) while the log keeps moving under it (only a
/// writer outside the replicas' turns can make it move).
const ATTEMPTS: usize = 8;

/// The fleet as stored, with the tokens a first start sets (only one of several replicas
/// starting at once sets them: the others find them stored).
fn first_load(
    store: &dyn Store,
    config: &ServerConfig,
    clock: &dyn Clock,
) -> anyhow::Result<(Fleet, FirstRunTokens)> {
    let mut attempts = 0;
    loop {
        let mut fleet = Fleet::from_snapshot(store.load()?, config.fleet.clone());
        let (changes, first_run) = auth::initial_tokens(&fleet, config, clock.now())?;
        if changes.is_empty() {
            return Ok((fleet, first_run));
        }
        match store.commit_at(&changes, true, fleet.position) {
            Ok(position) => {
                fleet.apply(&changes);
                fleet.position = position;
                return Ok((fleet, first_run));
            }
            Err(StoreError::Moved(_)) if attempts < ATTEMPTS => attempts += 1,
            Err(error) => return Err(error.into()),
        }
    }
}

/// A running coordinator's state and routes.
#[derive(Debug, Clone)]
pub struct Coordinator {
    state: Arc<AppState>,
    data_dir: PathBuf,
    tick: Duration,
    max_upload: u64,
    limits: crate::listener::Limits,
    tls: Option<Arc<sitecast_tls::rustls::ServerConfig>>,
}

impl Coordinator {
    /// Opens (or creates) the data directory: `state.redb` and `blobs/`.
    pub fn open(
        config: ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<(Self, FirstRunTokens)> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store: Arc<dyn Store> = match &config.database {
            Some(url) if config.replica => {
                Arc::new(crate::store::PostgresStore::open_replica(url)?)
            }
            Some(url) => Arc::new(crate::store::PostgresStore::open(url)?),
            None => Arc::new(crate::store::RedbStore::open(&config.data_dir.join("state.redb"))?),
        };
        Self::open_with_store(config, clock, store)
    }

    /// As [`Coordinator::open`], on a store of the caller's (tests use one that fails on
    /// demand).
    pub fn open_with_store(
        config: ServerConfig,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<(Self, FirstRunTokens)> {
        std::fs::create_dir_all(&config.data_dir)?;
        // Unusable certificate files fail the start, not the first handshake.
        let tls = config.tls.clone().map(sitecast_tls::server_config).transpose()?;
        let blobs = BlobStore::open(&config.data_dir.join("blobs"))?;
        let (fleet, first_run) = first_load(store.as_ref(), &config, clock.as_ref())?;
        let state = AppState {
            fleet: Mutex::new(fleet),
            store,
            store_failure: Mutex::new(None),
            repairing: Mutex::new(()),
            blobs,
            root: config.root,
            clock,
            public_url: config.public_url,
            serves_tls: tls.is_some(),
            checkins: AtomicU64::new(0),
            leading: AtomicBool::new(false),
            caught_up: Mutex::new(std::time::Instant::now()),
            catch_up_tried: Mutex::new(None),
            iroh: std::sync::OnceLock::new(),
            session_ttl: config.session_ttl,
            enrollments: Mutex::new(auth::RateLimit::new(
                config.enroll_per_sec,
                config.enroll_burst,
            )),
            refusals: Mutex::new(auth::RateLimit::new(1.0, 20)),
            range_pool: range_pool::RangePool::new(
                config.max_range_streams,
                config.max_range_streams_per_client,
            ),
            reference_streams: Arc::new(tokio::sync::Semaphore::new(origin::REFERENCE_STREAMS)),
            image_url_ttl: config.image_url_ttl,
            ddi_tenant: config.ddi_tenant.clone(),
            listener_stats: crate::listener::Stats::default(),
        };
        let data_dir = config.data_dir.clone();
        Ok((
            Self {
                state: Arc::new(state),
                data_dir,
                tick: config.tick,
                max_upload: config.max_upload_bytes,
                limits: config.limits,
                tls,
            },
            first_run,
        ))
    }

    pub fn router(&self) -> Router {
        let json_limit = DefaultBodyLimit::max(MAX_JSON_BYTES);
        let upload_limit =
            DefaultBodyLimit::max(usize::try_from(self.max_upload).unwrap_or(usize::MAX));
        Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(session_api::metrics))
            .route("/api/releases", post(releases::publish).layer(upload_limit).get(releases::list))
            .route("/api/releases/{version}/deactivate", post(releases::deactivate))
            .route("/api/releases/{version}/manifest", get(releases::manifest))
            .route("/api/releases/{version}/image", get(origin::image))
            .route("/api/releases/{version}/mirrors", put(mirrors::set))
            .route("/api/blobs/{hash}/ranges", get(origin::blob_ranges))
            .route("/api/blobs/{hash}/outboard", get(origin::blob_outboard))
            .route("/api/blobs/{hash}/bytes", get(origin::blob_bytes))
            .route("/api/agent-releases", post(agent_releases::publish).get(agent_releases::list))
            .route("/api/agent-releases/latest", get(agent_releases::latest))
            .route("/api/agent-releases/files/{hash}", get(agent_releases::file))
            .route("/api/rollouts", post(operator::create_rollout).get(operator::list_rollouts))
            .route("/api/rollouts/{id}", get(operator::show_rollout))
            .route("/api/rollouts/{id}/{action}", post(operator::control_rollout))
            .route("/api/appliances", get(appliances::list))
            .route("/api/appliances/checkin", post(appliances::checkin))
            .route("/api/appliances/report", post(appliances::report))
            .route("/api/appliances/agent-report", post(appliances::agent_report))
            .route("/api/appliances/{key}", axum::routing::delete(appliances::remove))
            .route("/api/appliances/{key}/pin", post(operator::pin))
            .route("/api/groups/{group}/pin", post(operator::pin_group))
            .route("/api/appliances/{key}/agent-pin", post(operator::agent_pin))
            .route("/api/groups/{group}/agent-pin", post(operator::agent_pin_group))
            .route("/api/appliances/{key}/window", put(operator::appliance_window))
            .route("/api/sites", get(operator::sites))
            .route("/api/sites/{site}/window", put(operator::site_window))
            .route("/api/audit", get(operator::audit))
            .route(
                "/api/session",
                get(session_api::status)
                    .post(session_api::sign_in)
                    .layer(DefaultBodyLimit::max(MAX_SIGN_IN_BYTES))
                    .delete(session_api::sign_out),
            )
            .route("/api/ddi/targets", post(ddi::register_target))
            .route(
                "/api/releases/{version}/swu/{filename}",
                put(releases::publish_swu).layer(upload_limit),
            )
            .route(DDI_BASE, get(ddi::poll))
            .route(&format!("{DDI_BASE}/deploymentBase/{{action}}"), get(ddi::deployment))
            .route(&format!("{DDI_BASE}/deploymentBase/{{action}}/feedback"), post(ddi::feedback))
            .route(&format!("{DDI_BASE}/configData"), put(ddi::config_data))
            .route(&format!("{DDI_BASE}/cancelAction/{{action}}"), get(ddi::cancel_action))
            .route(
                &format!("{DDI_BASE}/cancelAction/{{action}}/feedback"),
                post(ddi::cancel_feedback),
            )
            .route(
                &format!("{DDI_BASE}/softwaremodules/{{version}}/artifacts/{{filename}}"),
                get(ddi::artifact),
            )
            .route(web::PAGE.path, get(|| async { session_api::page_asset(&web::PAGE) }))
            .route(web::SCRIPT.path, get(|| async { session_api::page_asset(&web::SCRIPT) }))
            .route(web::STYLE.path, get(|| async { session_api::page_asset(&web::STYLE) }))
            .layer(json_limit)
            .with_state(Arc::clone(&self.state))
    }

    /// Also serves every release over iroh-blobs on `listen` (images imported by reference).
    pub async fn enable_iroh(&self, listen: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
        let dir = self.data_dir.join("iroh");
        let origin = crate::iroh_origin::IrohOrigin::start(&dir, listen).await?;
        let hashes: Vec<String> = lock(&self.state.fleet)
            .releases
            .values()
            .filter(|r| r.has_image())
            .map(|r| r.blake3.clone())
            .collect();
        for hash in hashes {
            let hash = sitecast_manifest::Blake3Hash::from_hex(&hash)?;
            origin.add(&self.state.blobs.data_path(&hash)).await?;
        }
        let addresses = origin.addresses();
        lock(&self.state.fleet).iroh_addresses = addresses.clone();
        let _ = self.state.iroh.set(origin);
        Ok(addresses)
    }

    /// Runs the rollout engine once (the server also does it every `tick`).
    /// On a shared store, only the replica holding the engine's lease runs it.
    pub fn tick(&self) -> Result<(), StoreError> {
        let state = &self.state;
        let leads = state.store.lead()?;
        if state.store.shared() && leads != state.leading.swap(leads, Ordering::Relaxed) {
            match leads {
                true => tracing::info!("this replica runs the rollout engine now (its lease)"),
                false => tracing::info!("another replica runs the rollout engine"),
            }
        }
        if !leads {
            return Ok(());
        }
        let ticked = state.serialized(|state, fleet| {
            let changes = fleet.tick(state.clock.now());
            state.commit_and_apply(fleet, &changes, true)
        });
        if ticked.as_ref().is_err_and(|e| !matches!(e, StoreError::Moved(_) | StoreError::Busy(_)))
        {
            // Another replica may do better: the lease goes back, to be asked for again.
            state.store.resign();
            state.leading.store(false, Ordering::Relaxed);
        }
        ticked
    }

    /// Catches the fleet up with what other replicas committed, and reads the byte counters
    /// they add to (on a store only this server writes: nothing to do).
    pub fn refresh(&self) -> Result<(), StoreError> {
        let state = &self.state;
        if !state.store.shared() || lock(&state.store_failure).is_some() {
            return Ok(());
        }
        // Under the fleet lock, as counting is: a total read earlier could be older than one
        // this server added meanwhile.
        let mut fleet = lock(&state.fleet);
        if let Some(counters) = state.store.counters()? {
            fleet.site_bytes = counters;
        }
        state.catch_up(&mut fleet)
    }

    /// Closes the store when it is no longer this server's though nothing was written (a
    /// PostgreSQL database another Central Command took over): `/healthz` then says so, and
    /// writes are refused, as after a failed commit.
    pub fn check_store(&self) -> Result<(), StoreError> {
        if lock(&self.state.store_failure).is_some() {
            return Ok(());
        }
        let checked = self.state.store.check();
        if let Err(error) = &checked {
            let _fleet = lock(&self.state.fleet);
            self.state.closed_by(error);
        }
        checked
    }

    /// Writes check-in bookkeeping (last seen, addresses) to the store.
    pub fn flush(&self) -> Result<(), StoreError> {
        // Under the fleet lock, and on a view caught up with the store, so a newer durable
        // record is never overwritten by this one.
        self.state.serialized(|state, fleet| {
            let changes = fleet.take_dirty();
            let result = state.commit_and_apply(fleet, &changes, false);
            if result.is_err() {
                fleet.mark_dirty(&changes);
            }
            result
        })
    }

    /// Why the store is closed, if it is.
    pub fn store_failure(&self) -> Option<String> {
        lock(&self.state.store_failure).clone()
    }

    /// Serves within the configured [`crate::listener::Limits`] until dropped; ticks and
    /// flushes in the background.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let background = self.clone();
        // The engine and flusher live exactly as long as the server: dropping or aborting
        // `serve` stops them too.
        let _background = AbortOnDrop(tokio::spawn(async move {
            let mut interval = tokio::time::interval(background.tick.min(Duration::from_secs(1)));
            let mut last_tick = std::time::Instant::now();
            loop {
                interval.tick().await;
                let worker = background.clone();
                let run_engine = last_tick.elapsed() >= background.tick;
                if run_engine {
                    last_tick = std::time::Instant::now();
                }
                let result = tokio::task::spawn_blocking(move || {
                    // Each step on its own: one failing does not hold up the others.
                    let steps: [(&str, Step<'_>); 4] = [
                        ("checking the store", &|| worker.check_store()),
                        ("catching up with the other replicas", &|| worker.refresh()),
                        ("writing check-in bookkeeping", &|| worker.flush()),
                        ("running the rollout engine", &|| match run_engine {
                            true => worker.tick(),
                            false => Ok(()),
                        }),
                    ];
                    for (step, run) in steps {
                        if let Err(error) = run() {
                            tracing::error!(%error, "{step} failed");
                        }
                    }
                })
                .await;
                if let Err(error) = result {
                    tracing::error!(%error, "background task panicked");
                }
            }
        }));
        let stats = self.state.listener_stats.clone();
        let (limits, tls) = (self.limits.clone(), self.tls.clone());
        crate::listener::serve_with_stats(listener, self.router(), limits, stats, tls).await
    }
}

/// One step of the background work.
type Step<'a> = &'a dyn Fn() -> Result<(), StoreError>;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AppState {
    /// The fleet, for a change. While the store is closed after a failed commit, first reopens
    /// it and reloads the fleet from it ([`AppState::repair`]), or refuses.
    fn writable(&self) -> Result<MutexGuard<'_, Fleet>, StoreError> {
        if lock(&self.store_failure).is_some() {
            self.repair()?;
        }
        let fleet = lock(&self.fleet);
        // A commit failed again between the repair and here: refused; the next write repairs.
        if let Some(why) = lock(&self.store_failure).as_ref() {
            return Err(StoreError::Closed(why.clone()));
        }
        Ok(fleet)
    }

    /// Whether a catch-up asked for by a request (an unknown key or cookie, which anyone can
    /// send) may run now: one per `gap` at most, counted from the last one tried.
    fn may_catch_up(&self, gap: Duration) -> bool {
        let mut last = lock(&self.catch_up_tried);
        let due = last.is_none_or(|at| at.elapsed() > gap);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due && self.store.shared()
    }

    /// Catches up with a shared store now, off the async executor (a store only this server
    /// writes has nothing to catch up with).
    async fn catch_up_now(self: &Arc<Self>) -> Result<(), ApiError> {
        if !self.store.shared() {
            return Ok(());
        }
        let state = Arc::clone(self);
        let caught_up = tokio::task::spawn_blocking(move || {
            let mut fleet = lock(&state.fleet);
            state.catch_up(&mut fleet)
        });
        Ok(caught_up.await.map_err(ApiError::internal)??)
    }

    /// Runs `attempt` (compute, commit, apply) on the fleet caught up with the store. Replicas
    /// take turns: the others' writers wait (in the order they asked) while this one catches
    /// up, computes and commits, so a change is never computed on a view another replica is
    /// about to overtake. The log still refuses a batch on a stale position, which only a
    /// writer outside this turn-taking could cause: then it is computed again.
    fn serialized<T, E: From<StoreError> + Overtaken>(
        &self,
        mut attempt: impl FnMut(&AppState, &mut Fleet) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut fleet = self.writable()?;
        let _turn = match self.store.shared() {
            true => Some(WritersHeld::take(self.store.as_ref())?),
            false => None,
        };
        for _ in 0..ATTEMPTS {
            self.catch_up(&mut fleet)?;
            match attempt(self, &mut fleet) {
                // The log is behind this view (a database restored, or failed over to a
                // standby that lacked the last batches): what it has is the truth.
                Err(error) if error.overtaken_from_behind(fleet.position) => {
                    self.reload(&mut fleet)?
                }
                Err(error) if error.overtaken() => {}
                done => return done,
            }
        }
        Err(StoreError::Moved(fleet.position).into())
    }

    /// Applies the batches other replicas committed since the fleet's position, in order; a
    /// fleet too far behind (or behind a batch it cannot read) is loaded again. Under the
    /// fleet lock. Nothing to do on a store only this server writes.
    fn catch_up(&self, fleet: &mut Fleet) -> Result<(), StoreError> {
        if !self.store.shared() {
            return Ok(());
        }
        match self.store.changes_since(fleet.position)? {
            Some(batches) => {
                for (position, changes) in batches {
                    fleet.apply(&changes);
                    fleet.position = position;
                }
            }
            None => {
                tracing::info!(
                    position = fleet.position,
                    "far behind the store: loading the fleet"
                );
                self.reload(fleet)?;
            }
        }
        *lock(&self.caught_up) = std::time::Instant::now();
        Ok(())
    }

    /// Loads the fleet again from the store (check-in bookkeeping since the last flush is
    /// dropped, as at a restart: the next check-ins bring it back).
    fn reload(&self, fleet: &mut Fleet) -> Result<(), StoreError> {
        let mut stored = Fleet::from_snapshot(self.store.load()?, fleet.config.clone());
        stored.iroh_addresses = std::mem::take(&mut fleet.iroh_addresses);
        *fleet = stored;
        Ok(())
    }

    /// Reopens a closed store and reloads the fleet from what is durable. The slow part
    /// (opening the database, reading every record, building a fleet from them) runs without
    /// the fleet lock, so reads and check-ins that change nothing durable are answered
    /// meanwhile; only the swap takes it.
    ///
    /// No commit can land between the load and the swap: every commit is made under the fleet
    /// lock by a writer that found the store open under that lock ([`AppState::writable`],
    /// [`AppState::count_origin_bytes`]), the store is closed all the while, and it is marked
    /// open only after the swap, in the same hold of the lock. (Every change of
    /// `store_failure` happens under the fleet lock.)
    fn repair(&self) -> Result<(), StoreError> {
        // One repair at a time; writers that come meanwhile wait for it, then find it open.
        let _repairing = lock(&self.repairing);
        let Some(why) = lock(&self.store_failure).clone() else {
            return Ok(());
        };
        let config = lock(&self.fleet).config.clone();
        let stored = self.store.reopen().and_then(|()| self.store.load()).map_err(|error| {
            // Another Central Command has the database now: that is the reason to show, and
            // it stays so until this one is stopped.
            if matches!(error, StoreError::InUse | StoreError::OtherFormat { .. }) {
                let _fleet = lock(&self.fleet);
                *lock(&self.store_failure) = Some(error.to_string());
            }
            StoreError::Closed(format!("{why}; reopening: {error}"))
        })?;
        let mut stored = Fleet::from_snapshot(stored, config);
        let mut fleet = lock(&self.fleet);
        // Not stored: where this server's iroh endpoint listens. Check-in bookkeeping since
        // the last flush is dropped, as at a restart (the next check-ins bring it back).
        stored.iroh_addresses = std::mem::take(&mut fleet.iroh_addresses);
        *fleet = stored;
        *lock(&self.store_failure) = None;
        drop(fleet);
        tracing::warn!(was = %why, "store reopened; fleet reloaded from it");
        Ok(())
    }

    /// Counts origin bytes served: bookkeeping, committed and applied like any change but not
    /// worth closing the store over; not counted while the store is closed.
    fn count_origin_bytes(&self, change: Change) {
        let mut fleet = lock(&self.fleet);
        if lock(&self.store_failure).is_some() {
            tracing::warn!("the store is closed: origin bytes not counted");
            return;
        }
        match self.store.commit(std::slice::from_ref(&change), false) {
            Ok(()) => fleet.apply(&[change]),
            Err(error) => tracing::error!(%error, "counting origin bytes"),
        }
    }

    /// Closes the store after a failed commit. Called under the fleet lock.
    fn closed_by(&self, error: &StoreError) {
        tracing::error!(%error, "commit failed: the store is closed until it can be reopened");
        lock(&self.store_failure).get_or_insert_with(|| error.to_string());
    }

    /// Commits `changes`, then applies them; on failure applies nothing and closes the store.
    fn commit_and_apply(
        &self,
        fleet: &mut Fleet,
        changes: &[Change],
        durable: bool,
    ) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        match self.store.commit_at(changes, durable, fleet.position) {
            Ok(position) => {
                fleet.apply(changes);
                fleet.position = position;
                Ok(())
            }
            // Nothing stored, nothing wrong: computed again on the caught-up fleet, or
            // answered as busy.
            Err(error @ (StoreError::Moved(_) | StoreError::Busy(_))) => Err(error),
            Err(error) => {
                self.closed_by(&error);
                Err(error)
            }
        }
    }
}

/// Computes changes with `op`, commits them durably and applies them, off the async executor;
/// then `view` reads the result from the fleet as it now is.
/// `op` may run more than once (another replica committed first): it computes from the fleet
/// it is given, and changes nothing else.
async fn mutate<T: Send + 'static, K: Send + 'static>(
    state: &Arc<AppState>,
    mut op: impl FnMut(&Fleet, Timestamp) -> Result<(K, Vec<Change>), FleetError> + Send + 'static,
    view: impl FnOnce(&Fleet, K, Timestamp) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let mut view = Some(view);
        state.serialized(|state, fleet| {
            let now = state.clock.now();
            let (key, changes) = op(fleet, now)?;
            state.commit_and_apply(fleet, &changes, true)?;
            let view = view.take().expect("a view once a change is stored");
            Ok(view(fleet, key, now))
        })
    })
    .await
    .map_err(ApiError::internal)?
}

/// `mutate` for operations with nothing to show but success.
async fn change(
    state: &Arc<AppState>,
    mut op: impl FnMut(&Fleet, Timestamp) -> Result<Vec<Change>, FleetError> + Send + 'static,
) -> Result<(), ApiError> {
    mutate(state, move |fleet, now| Ok(((), op(fleet, now)?)), |_, (), _| ()).await
}

/// The other replicas' writers held back, until dropped.
struct WritersHeld<'a>(&'a dyn Store);

impl<'a> WritersHeld<'a> {
    fn take(store: &'a dyn Store) -> Result<Self, StoreError> {
        store.hold_writers()?;
        Ok(Self(store))
    }
}

impl Drop for WritersHeld<'_> {
    fn drop(&mut self) {
        self.0.release_writers();
    }
}

/// An error that says another replica committed first (and nothing was stored).
trait Overtaken {
    /// The log's head, if the error says it moved.
    fn moved_to(&self) -> Option<u64>;

    fn overtaken(&self) -> bool {
        self.moved_to().is_some()
    }

    /// Refused by a log whose head is behind `position`, where this view already is.
    fn overtaken_from_behind(&self, position: u64) -> bool {
        self.moved_to().is_some_and(|head| head < position)
    }
}

impl Overtaken for StoreError {
    fn moved_to(&self) -> Option<u64> {
        match self {
            StoreError::Moved(head) => Some(*head),
            _ => None,
        }
    }
}

impl Overtaken for ApiError {
    fn moved_to(&self) -> Option<u64> {
        (self.code == OVERTAKEN).then_some(self.moved_to).flatten()
    }
}

/// The code of [`StoreError::Moved`] as an answer: every attempt overtaken.
const OVERTAKEN: &str = "store_overtaken";

/// How long a replica may go without catching up with the others before its health check
/// says so (it catches up once a second).
const BEHIND_AFTER: Duration = Duration::from_secs(10);

async fn healthz(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    let behind = lock(&state.caught_up).elapsed();
    if state.store.shared() && behind > BEHIND_AFTER && lock(&state.store_failure).is_none() {
        let behind = behind.as_secs();
        let why = format!("behind the other replicas: not caught up for {behind} s\n");
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    match lock(&state.store_failure).clone() {
        None => "ok\n".into_response(),
        Some(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {why}\n")).into_response()
        }
    }
}

// ----- errors -----

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    /// From [`StoreError::Moved`]: where the log's head was.
    moved_to: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None, moved_to: None }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    fn busy(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    fn too_many(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    /// A stored image or file that cannot be read. Missing, it is most likely on another
    /// replica's disk (or lost from this one): shown plainly, and as passing for the client,
    /// which asks again (another replica may have it).
    fn stored_file(error: std::io::Error) -> Self {
        if error.kind() != std::io::ErrorKind::NotFound {
            return Self::internal(error);
        }
        tracing::error!(%error, "a published file is not in this data directory");
        Self::busy(
            "file_not_here",
            "the file is published but missing from this Central Command's data directory \
             (replicas need a shared data directory, or mirrors for images)",
            5,
        )
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.message, code: self.code.to_owned() };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<FleetError> for ApiError {
    fn from(error: FleetError) -> Self {
        let (status, code) = match &error {
            FleetError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            FleetError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            FleetError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            FleetError::UnknownAppliance(_) => (StatusCode::FORBIDDEN, "unknown_appliance"),
            FleetError::StaleReport(_) => (StatusCode::CONFLICT, "stale_report"),
            FleetError::NotOffered(_) => (StatusCode::CONFLICT, "not_offered"),
            FleetError::IdentityTaken { .. } => (StatusCode::CONFLICT, "identity_taken"),
        };
        Self::new(status, code, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if let StoreError::Moved(head) = error {
            let message = format!("nothing was changed: {error}; try again");
            return Self { moved_to: Some(head), ..Self::busy(OVERTAKEN, message, 1) };
        }
        if let StoreError::Busy(_) = error {
            return Self::busy("store_busy", format!("nothing was changed: {error}; try again"), 1);
        }
        tracing::error!(%error, "store");
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("nothing was changed: the store failed ({error})"),
            )
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::Unknown => {
                Self::new(StatusCode::UNAUTHORIZED, "session_expired", error.to_string())
            }
            SessionError::Csrf => Self::new(StatusCode::FORBIDDEN, "csrf", error.to_string()),
            SessionError::Random(_) => Self::internal(error),
        }
    }
}

/// A request body within the route's limit. Over the limit (or cut off), the answer is a JSON
/// error with a stable code like every other, not the framework's plain text.
pub(super) struct RequestBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state).await.map(Self).map_err(|rejection| {
            let code = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                _ => "unreadable_body",
            };
            ApiError::new(rejection.status(), code, rejection.body_text())
        })
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")))
}
