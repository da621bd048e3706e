//! The HTTP server: thin axum handlers over [`Fleet`], the store and the image store.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use jiff::Timestamp;
use serde::Deserialize;
use sitecast_manifest::api::{self, CheckinRequest, ErrorBody, ReportRequest};
use sitecast_manifest::window::MaintenanceWindow;
use sitecast_manifest::{ImageInfo, PublicKey, Signature, TrustedRoot};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::blobs::{BlobStore, ImportError};
use crate::fleet::{Fleet, FleetConfig, FleetError, RolloutRequest};
use crate::session::{self, SessionError, Sessions};
use crate::store::{Change, ReleaseRecord, Store, StoreError};
use crate::web;

/// JSON bodies larger than this are refused (413) before they are parsed.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

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
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            root: None,
            operator_token: None,
            enrollment_token: None,
            public_url: None,
            fleet: FleetConfig::default(),
            tick: Duration::from_secs(5),
            max_upload_bytes: 64 << 30,
            session_ttl: session::DEFAULT_TTL,
        }
    }
}

/// Tokens generated on the first start, to be shown to the operator once.
#[derive(Debug, Clone)]
pub struct FirstRunTokens {
    pub operator: Option<String>,
    pub enrollment: Option<String>,
}

#[derive(Debug)]
struct AppState {
    fleet: Mutex<Fleet>,
    store: Arc<dyn Store>,
    blobs: BlobStore,
    root: Option<TrustedRoot>,
    clock: Arc<dyn Clock>,
    public_url: Option<String>,
    checkins: AtomicU64,
    /// Browser sign-ins; in memory only, so a restart signs everyone out.
    sessions: Mutex<Sessions>,
    iroh: std::sync::OnceLock<crate::iroh_origin::IrohOrigin>,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// A running coordinator's state and routes.
#[derive(Debug, Clone)]
pub struct Coordinator {
    state: Arc<AppState>,
    data_dir: PathBuf,
    tick: Duration,
    max_upload: u64,
}

const OPERATOR_TOKEN: &str = "operator_token_blake3";
const ENROLLMENT_TOKEN: &str = "enrollment_token_blake3";

fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

impl Coordinator {
    /// Opens (or creates) the data directory: `state.redb` and `blobs/`.
    pub fn open(
        config: ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<(Self, FirstRunTokens)> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&config.data_dir.join("state.redb"))?);
        let blobs = BlobStore::open(&config.data_dir.join("blobs"))?;
        let mut fleet = Fleet::from_snapshot(store.load()?, config.fleet.clone());
        let mut changes = Vec::new();
        let mut first_run = FirstRunTokens { operator: None, enrollment: None };
        for (key, configured, shown) in [
            (OPERATOR_TOKEN, &config.operator_token, &mut first_run.operator),
            (ENROLLMENT_TOKEN, &config.enrollment_token, &mut first_run.enrollment),
        ] {
            match configured {
                Some(token) => changes.push(fleet.meta_change(key, token_hash(token))),
                None if !fleet.meta.contains_key(key) => {
                    let token = random_token()?;
                    changes.push(fleet.meta_change(key, token_hash(&token)));
                    *shown = Some(token);
                }
                None => {}
            }
        }
        store.commit(&changes, true)?;
        let state = AppState {
            fleet: Mutex::new(fleet),
            store,
            blobs,
            root: config.root,
            clock,
            public_url: config.public_url,
            checkins: AtomicU64::new(0),
            iroh: std::sync::OnceLock::new(),
            sessions: Mutex::new(Sessions::new(config.session_ttl)),
        };
        let data_dir = config.data_dir.clone();
        Ok((
            Self {
                state: Arc::new(state),
                data_dir,
                tick: config.tick,
                max_upload: config.max_upload_bytes,
            },
            first_run,
        ))
    }

    pub fn router(&self) -> Router {
        let json_limit = DefaultBodyLimit::max(MAX_JSON_BYTES);
        let upload_limit =
            DefaultBodyLimit::max(usize::try_from(self.max_upload).unwrap_or(usize::MAX));
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics))
            .route("/api/releases", post(publish).layer(upload_limit).get(list_releases))
            .route("/api/releases/{version}/deactivate", post(deactivate))
            .route("/api/releases/{version}/manifest", get(manifest))
            .route("/api/releases/{version}/image", get(image))
            .route("/api/blobs/{hash}/ranges", get(blob_ranges))
            .route("/api/rollouts", post(create_rollout).get(list_rollouts))
            .route("/api/rollouts/{id}", get(show_rollout))
            .route("/api/rollouts/{id}/{action}", post(control_rollout))
            .route("/api/appliances", get(list_appliances))
            .route("/api/appliances/checkin", post(checkin))
            .route("/api/appliances/report", post(report))
            .route("/api/appliances/{key}/pin", post(pin))
            .route("/api/groups/{group}/pin", post(pin_group))
            .route("/api/appliances/{key}/window", put(appliance_window))
            .route("/api/sites", get(sites))
            .route("/api/sites/{site}/window", put(site_window))
            .route("/api/audit", get(audit))
            .route("/api/session", get(session_status).post(sign_in).delete(sign_out))
            .route(web::PAGE.path, get(|| async { page_asset(&web::PAGE) }))
            .route(web::SCRIPT.path, get(|| async { page_asset(&web::SCRIPT) }))
            .route(web::STYLE.path, get(|| async { page_asset(&web::STYLE) }))
            .layer(json_limit)
            .with_state(Arc::clone(&self.state))
    }

    /// Also serves every release over iroh-blobs on `listen` (images imported by reference).
    pub async fn enable_iroh(&self, listen: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
        let dir = self.data_dir.join("iroh");
        let origin = crate::iroh_origin::IrohOrigin::start(&dir, listen).await?;
        let hashes: Vec<String> =
            lock(&self.state.fleet).releases.values().map(|r| r.blake3.clone()).collect();
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
    pub fn tick(&self) -> Result<(), StoreError> {
        let state = &self.state;
        let mut fleet = lock(&state.fleet);
        let now = state.clock.now();
        let changes = fleet.tick(now);
        state.store.commit(&changes, true)
    }

    /// Writes check-in bookkeeping (last seen, addresses) to the store.
    pub fn flush(&self) -> Result<(), StoreError> {
        let changes = lock(&self.state.fleet).take_dirty();
        if changes.is_empty() {
            return Ok(());
        }
        self.state.store.commit(&changes, true)
    }

    /// Serves until the listener fails; ticks and flushes in the background.
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
                    worker.flush()?;
                    if run_engine { worker.tick() } else { Ok(()) }
                })
                .await;
                match result {
                    Ok(Err(error)) => tracing::error!(%error, "background commit failed"),
                    Err(error) => tracing::error!(%error, "background task panicked"),
                    Ok(Ok(())) => {}
                }
            }
        }));
        axum::serve(listener, self.router()).await
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ----- errors -----

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.message, code: self.code.to_owned() };
        (self.status, Json(body)).into_response()
    }
}

impl From<FleetError> for ApiError {
    fn from(error: FleetError) -> Self {
        let (status, code) = match &error {
            FleetError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            FleetError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            FleetError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            FleetError::UnknownAppliance(_) => (StatusCode::FORBIDDEN, "unknown_appliance"),
        };
        Self::new(status, code, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        Self::internal(error)
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

fn session_id(headers: &HeaderMap) -> Option<&str> {
    session::session_cookie(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")))
}

// ----- authentication -----

impl AppState {
    fn token_matches(&self, meta_key: &str, token: &str) -> bool {
        lock(&self.fleet).meta.get(meta_key).is_some_and(|hash| *hash == token_hash(token))
    }

    /// Admits the operator: the bearer token (CLI, scripts) or a session cookie from the
    /// Fleet Updates page. A cookie is sent by the browser on its own, so with a cookie every
    /// method but GET/HEAD also needs the session's CSRF token; a bearer token is never sent
    /// implicitly and needs none. A request with an `Authorization` header is judged by it alone.
    fn operator(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            return match value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
                None => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "operator token required (Authorization: Bearer …)",
                )),
                Some(token) if self.token_matches(OPERATOR_TOKEN, token) => Ok(()),
                Some(_) => {
                    Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "wrong operator token"))
                }
            };
        }
        let Some(id) = session_id(headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "operator token required (Authorization: Bearer …), or sign in at /fleet-updates",
            ));
        };
        let changes_state = !matches!(*method, Method::GET | Method::HEAD);
        let csrf = headers.get(session::CSRF_HEADER).and_then(|v| v.to_str().ok());
        lock(&self.sessions)
            .check(id, changes_state, csrf, self.clock.now())
            .map(drop)
            .map_err(ApiError::from)
    }

    /// Whether the browser reached us over HTTPS (directly or through a TLS proxy), so the
    /// session cookie may be `Secure`.
    fn https(&self, headers: &HeaderMap) -> bool {
        self.public_url.as_deref().is_some_and(|u| u.starts_with("https://"))
            || headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("https"))
    }

    /// Checks an appliance's signed request; returns its key.
    fn appliance(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<String, ApiError> {
        let unauthorized =
            |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let key = text(api::HEADER_APPLIANCE)
            .ok_or_else(|| unauthorized("appliance identity header missing"))?;
        let key =
            PublicKey::from_hex(key).map_err(|e| unauthorized(&format!("appliance key: {e}")))?;
        let timestamp: i64 = text(api::HEADER_TIMESTAMP)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| unauthorized("request timestamp missing"))?;
        let skew = (self.clock.now().as_second() - timestamp).abs();
        if skew > api::MAX_CLOCK_SKEW_SECS {
            return Err(unauthorized(&format!(
                "request timestamp is {skew} s off the server's clock"
            )));
        }
        let signature = text(api::HEADER_SIGNATURE)
            .and_then(|s| Signature::from_hex(s).ok())
            .ok_or_else(|| unauthorized("request signature missing or malformed"))?;
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        let message = api::appliance_signing_bytes(method.as_str(), path, timestamp, body);
        if !key.verify(&message, &signature) {
            return Err(unauthorized("request signature does not match the appliance key"));
        }
        Ok(key.to_hex())
    }

    fn public_url(&self, headers: &HeaderMap) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        format!("http://{host}")
    }
}

/// Runs `op` on the fleet and commits its changes durably, off the async executor.
async fn mutate<T: Send + 'static>(
    state: &Arc<AppState>,
    op: impl FnOnce(&mut Fleet, Timestamp) -> Result<(T, Vec<Change>), FleetError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let mut fleet = lock(&state.fleet);
        let now = state.clock.now();
        let (value, changes) = op(&mut fleet, now)?;
        state.store.commit(&changes, true)?;
        Ok(value)
    })
    .await
    .map_err(ApiError::internal)?
}

// ----- releases -----

#[derive(Deserialize)]
struct PublishPath {
    manifest: String,
    image_path: PathBuf,
}

async fn publish(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let root = state.root.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_root",
            "this coordinator has no root of trust configured (--root)",
        )
    })?;
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (verified, incoming) = if is_multipart {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request("malformed_upload", e.to_string()))?;
        receive_upload(&state, &root, multipart).await?
    } else {
        let body =
            axum::body::to_bytes(request.into_body(), MAX_JSON_BYTES).await.map_err(|e| {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            })?;
        let request: PublishPath = parse_json(&body)?;
        let verified = verify_manifest(&state, &root, request.manifest.as_bytes())?;
        (verified, Err(request.image_path))
    };
    let image = verified.release().image.clone();
    let blobs = state.blobs.clone();
    let import_image = image.clone();
    tokio::task::spawn_blocking(move || match incoming {
        Ok(path) => blobs.import(&path, &import_image),
        Err(source) => blobs.import_path(&source, &import_image),
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| match e {
        ImportError::Mismatch(e) => ApiError::bad_request(
            "image_mismatch",
            format!("image does not match the manifest: {e}"),
        ),
        ImportError::Io(e) => ApiError::bad_request("image_unreadable", format!("image: {e}")),
    })?;
    let release = verified.release();
    let record = ReleaseRecord {
        version: release.version,
        version_name: release.version_name.clone(),
        notes: release.notes.clone(),
        created: release.created,
        published: state.clock.now(),
        active: true,
        blake3: image.blake3.to_hex(),
        sha256: image.sha256.to_hex(),
        size: image.size,
        platforms: release.platforms.clone(),
        rollback_floor: release.rollback_floor,
        manifest: String::from_utf8_lossy(&verified.to_bytes()).into_owned(),
    };
    if let Some(iroh) = state.iroh.get() {
        iroh.add(&state.blobs.data_path(&image.blake3)).await.map_err(ApiError::internal)?;
    }
    let shown = record.clone();
    mutate(&state, move |fleet, now| Ok(((), fleet.publish(record, now)?))).await?;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

use axum::extract::FromRequest;

fn verify_manifest(
    state: &AppState,
    root: &TrustedRoot,
    bytes: &[u8],
) -> Result<sitecast_manifest::VerifiedRelease, ApiError> {
    let verified = root.verify_release(bytes, state.clock.now()).map_err(|e| {
        ApiError::bad_request("manifest_rejected", format!("manifest rejected: {e}"))
    })?;
    let version = verified.release().version;
    if lock(&state.fleet).releases.contains_key(&version) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("release {version} is already published"),
        ));
    }
    Ok(verified)
}

/// Reads a multipart upload: `manifest` first, then `image`, streamed to disk and cut off one
/// byte past the size the manifest declares.
async fn receive_upload(
    state: &AppState,
    root: &TrustedRoot,
    mut multipart: Multipart,
) -> Result<(sitecast_manifest::VerifiedRelease, Result<PathBuf, PathBuf>), ApiError> {
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request("malformed_upload", format!("upload: {e}"))
    };
    let mut verified = None;
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("manifest") => {
                let bytes = field.bytes().await.map_err(malformed)?;
                verified = Some(verify_manifest(state, root, &bytes)?);
            }
            Some("image") => {
                let verified = verified.ok_or_else(|| {
                    ApiError::bad_request(
                        "malformed_upload",
                        "send the manifest field before the image",
                    )
                })?;
                let declared = verified.release().image.size;
                let path = state.blobs.incoming_path();
                let mut file = tokio::fs::File::create(&path).await.map_err(ApiError::internal)?;
                let mut received = 0u64;
                let outcome: Result<(), ApiError> = async {
                    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                        received += chunk.len() as u64;
                        if received > declared {
                            return Err(ApiError::bad_request(
                                "image_mismatch",
                                format!("image is larger than the {declared} bytes the manifest declares"),
                            ));
                        }
                        file.write_all(&chunk).await.map_err(ApiError::internal)?;
                    }
                    file.sync_all().await.map_err(ApiError::internal)
                }
                .await;
                if let Err(error) = outcome {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(error);
                }
                return Ok((verified, Ok(path)));
            }
            _ => {}
        }
    }
    Err(ApiError::bad_request(
        "malformed_upload",
        "the upload needs a `manifest` and an `image` field",
    ))
}

async fn list_releases(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let releases: Vec<ReleaseRecord> = lock(&state.fleet).releases.values().cloned().collect();
    Ok(Json(releases).into_response())
}

async fn deactivate(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(version): Path<u64>,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    mutate(&state, move |fleet, now| Ok(((), fleet.deactivate(version, now)?))).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn release(state: &AppState, version: u64) -> Result<ReleaseRecord, ApiError> {
    lock(&state.fleet).releases.get(&version).cloned().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("release {version} not found"))
    })
}

async fn manifest(
    State(state): State<Arc<AppState>>,
    Path(version): Path<u64>,
) -> Result<Response, ApiError> {
    let record = release(&state, version)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], record.manifest).into_response())
}

fn image_info(record: &ReleaseRecord) -> Result<ImageInfo, ApiError> {
    Ok(ImageInfo {
        size: record.size,
        blake3: sitecast_manifest::Blake3Hash::from_hex(&record.blake3)
            .map_err(ApiError::internal)?,
        sha256: sitecast_manifest::Sha256Hash::from_hex(&record.sha256)
            .map_err(ApiError::internal)?,
    })
}

/// One `bytes=` range of a `size`-byte body, as `start..end`.
fn parse_range(value: &str, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let range = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            size.saturating_sub(n)..size
        }
        (start, "") => start.parse().ok()?..size,
        (start, end) => start.parse().ok()?..end.parse::<u64>().ok()?.saturating_add(1).min(size),
    };
    (range.start < range.end).then_some(range)
}

/// The plain image for legacy agents and humans: `Range`, `ETag`, SHA-256 in a header.
async fn image(
    State(state): State<Arc<AppState>>,
    Path(version): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = release(&state, version)?;
    let etag = format!("\"{}\"", record.blake3);
    let mut response_headers = HeaderMap::new();
    let value = |s: &str| HeaderValue::from_str(s).map_err(ApiError::internal);
    response_headers.insert(header::ETAG, value(&etag)?);
    response_headers.insert(header::ACCEPT_RANGES, value("bytes")?);
    response_headers.insert(api::HEADER_IMAGE_SHA256, value(&record.sha256)?);
    response_headers.insert(header::CONTENT_TYPE, value("application/octet-stream")?);
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let (status, range) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => (StatusCode::OK, 0..record.size),
        Some(spec) => match parse_range(spec, record.size) {
            Some(range) => {
                let content_range =
                    format!("bytes {}-{}/{}", range.start, range.end - 1, record.size);
                response_headers.insert(header::CONTENT_RANGE, value(&content_range)?);
                (StatusCode::PARTIAL_CONTENT, range)
            }
            None => {
                response_headers
                    .insert(header::CONTENT_RANGE, value(&format!("bytes */{}", record.size))?);
                return Ok((StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response());
            }
        },
    };
    let path = state.blobs.data_path(&image_info(&record)?.blake3);
    let mut file = tokio::fs::File::open(&path).await.map_err(ApiError::internal)?;
    file.seek(std::io::SeekFrom::Start(range.start)).await.map_err(ApiError::internal)?;
    use tokio::io::AsyncReadExt;
    let length = range.end - range.start;
    response_headers.insert(header::CONTENT_LENGTH, value(&length.to_string())?);
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(length), 256 * 1024);
    Ok((status, response_headers, Body::from_stream(stream)).into_response())
}

#[derive(Deserialize)]
struct GroupRange {
    start: u64,
    end: u64,
}

/// Verified ranges: `[size u64 LE][bao encoding of groups start..end]`, what iroh-blobs sends
/// for a ranged get, so appliances check origin data exactly like LAN data.
async fn blob_ranges(
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    Query(range): Query<GroupRange>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = lock(&state.fleet).release_by_hash(&hash).cloned().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("blob {hash} not found"))
    })?;
    let site = if headers.contains_key(api::HEADER_APPLIANCE) {
        let key = state.appliance(&method, &uri, &headers, &[])?;
        lock(&state.fleet).appliances.get(&key).map(|a| a.site.clone())
    } else {
        None
    };
    let info = image_info(&record)?;
    let layout = sitecast_iso::BlobLayout::new(info.blake3, info.size);
    if range.start >= range.end || range.end > layout.groups() {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "bad_range",
            format!("groups {}..{} are not within 0..{}", range.start, range.end, layout.groups()),
        ));
    }
    let length = layout.encoded_len(range.start..range.end);
    let (data, outboard) = state.blobs.open_image(&info).map_err(ApiError::internal)?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let groups = range.start..range.end;
    let counter = Arc::clone(&state);
    let version = record.version;
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter { sender, sent: 0 };
        let result = outboard.encode_groups(&data, groups, &mut writer);
        let sent = writer.sent;
        if let Err(error) = result {
            // The body is cut short, so the client sees a truncated response, never bad bytes.
            tracing::error!(%error, "serving verified ranges failed");
            let _ = writer.sender.blocking_send(Err(error));
        }
        let site = site.unwrap_or_else(|| "unattributed".to_owned());
        let mut fleet = lock(&counter.fleet);
        let change = fleet.count_origin_bytes(&site, version, sent);
        drop(fleet);
        if let Err(error) = counter.store.commit(&[change], false) {
            tracing::error!(%error, "counting origin bytes");
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let mut response = Body::from_stream(stream).into_response();
    let response_headers = response.headers_mut();
    response_headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// Bridges the synchronous encoder to the async body.
struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    sent: u64,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sender
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        self.sent += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ----- rollouts -----

async fn create_rollout(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let request: RolloutRequest = parse_json(&body)?;
    let view = mutate(&state, move |fleet, now| {
        let (id, changes) = fleet.create_rollout(request, now)?;
        Ok((fleet.rollout_view(&fleet.rollouts[&id], now), changes))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_rollouts(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let fleet = lock(&state.fleet);
    let now = state.clock.now();
    let views: Vec<_> = fleet.rollouts.values().map(|r| fleet.rollout_view(r, now)).collect();
    Ok(Json(views).into_response())
}

async fn show_rollout(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let fleet = lock(&state.fleet);
    let rollout = fleet
        .rollouts
        .get(&id)
        .ok_or_else(|| ApiError::from(FleetError::NotFound(format!("rollout {id}"))))?;
    Ok(Json(fleet.rollout_view(rollout, state.clock.now())).into_response())
}

async fn control_rollout(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((id, action)): Path<(u64, String)>,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let view = mutate(&state, move |fleet, now| {
        let changes = fleet.control(id, &action, now)?;
        Ok((fleet.rollout_view(&fleet.rollouts[&id], now), changes))
    })
    .await?;
    Ok(Json(view).into_response())
}

// ----- appliances -----

async fn checkin(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = state.appliance(&method, &uri, &headers, &body)?;
    let request: CheckinRequest = parse_json(&body)?;
    let enrollment_ok = request
        .enrollment_token
        .as_deref()
        .is_some_and(|t| state.token_matches(ENROLLMENT_TOKEN, t));
    let public_url = state.public_url(&headers);
    state.checkins.fetch_add(1, Ordering::Relaxed);
    let (response, changes) = {
        let mut fleet = lock(&state.fleet);
        let now = state.clock.now();
        let (response, changes, _) =
            fleet.checkin(&key, request, enrollment_ok, now, &public_url)?;
        (response, changes)
    };
    if !changes.is_empty() {
        let store = Arc::clone(&state.store);
        tokio::task::spawn_blocking(move || store.commit(&changes, true))
            .await
            .map_err(ApiError::internal)??;
    }
    Ok(Json(response).into_response())
}

async fn report(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = state.appliance(&method, &uri, &headers, &body)?;
    let report: ReportRequest = parse_json(&body)?;
    mutate(&state, move |fleet, now| Ok(((), fleet.report(&key, report, now)?))).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_appliances(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let fleet = lock(&state.fleet);
    let now = state.clock.now();
    let list: Vec<crate::fleet::ApplianceListing> = fleet
        .appliances
        .values()
        .map(|a| crate::fleet::ApplianceListing {
            record: a.clone(),
            online: fleet.is_online(a, now),
        })
        .collect();
    Ok(Json(list).into_response())
}

#[derive(Deserialize)]
struct PinRequest {
    version: Option<u64>,
}

async fn pin(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let request: PinRequest = parse_json(&body)?;
    mutate(&state, move |fleet, now| Ok(((), fleet.pin(&key, request.version, now)?))).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pin_group(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(group): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let request: PinRequest = parse_json(&body)?;
    mutate(&state, move |fleet, now| Ok(((), fleet.pin_group(&group, request.version, now)?)))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn appliance_window(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let window: Option<MaintenanceWindow> = parse_json(&body)?;
    mutate(&state, move |fleet, now| Ok(((), fleet.set_appliance_window(&key, window, now)?)))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn site_window(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(site): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let window: MaintenanceWindow = parse_json(&body)?;
    mutate(&state, move |fleet, now| Ok(((), fleet.set_site_window(&site, window, now)?))).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    /// The newest `tail` entries instead (the page starts with these, then follows `after`).
    #[serde(default)]
    tail: Option<usize>,
    #[serde(default = "default_audit_limit")]
    limit: usize,
}

fn default_audit_limit() -> usize {
    500
}

async fn audit(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let (after, limit) = match query.tail {
        Some(tail) => {
            let next = lock(&state.fleet).next_audit_seq();
            (next.saturating_sub(tail as u64 + 1), tail)
        }
        None => (query.after, query.limit),
    };
    let store = Arc::clone(&state.store);
    let entries = tokio::task::spawn_blocking(move || store.audit(after, limit.min(5000)))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(entries).into_response())
}

// ----- Fleet Updates page -----

fn page_asset(asset: &web::Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::CONTENT_SECURITY_POLICY, web::CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Compiled in: a new coordinator brings a new page, so always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        asset.body,
    )
        .into_response()
}

async fn sites(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.operator(&method, &headers)?;
    let overview = lock(&state.fleet).sites_overview(state.clock.now());
    Ok(Json(overview).into_response())
}

#[derive(Deserialize)]
struct SignInRequest {
    token: String,
}

/// What the page learns about its session. Always 200, signed in or not: the page asks on
/// every load, and a 401 there would be an error in the browser console.
#[derive(serde::Serialize)]
struct SessionBody {
    signed_in: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<Timestamp>,
}

fn session_response(status: StatusCode, cookie: Option<String>, body: SessionBody) -> Response {
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /api/session {"token"}`: the operator token buys a session cookie and a CSRF token.
async fn sign_in(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SignInRequest = parse_json(&body)?;
    if !state.token_matches(OPERATOR_TOKEN, &request.token) {
        tracing::warn!("refused a Fleet Updates sign-in: wrong operator token");
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "wrong operator token"));
    }
    let now = state.clock.now();
    let new = lock(&state.sessions).create(now)?;
    let (tag, expires) = (new.tag.clone(), new.expires);
    let audited =
        mutate(&state, move |fleet, now| Ok(((), fleet.session_opened(&tag, expires, now)))).await;
    if let Err(error) = audited {
        // A sign-in that is not in the audit log does not happen.
        lock(&state.sessions).remove(&new.id);
        return Err(error);
    }
    let max_age = now.duration_until(expires);
    let cookie = session::set_cookie(&new.id, max_age, state.https(&headers));
    let body =
        SessionBody { signed_in: true, csrf_token: Some(new.csrf_token), expires: Some(expires) };
    Ok(session_response(StatusCode::OK, Some(cookie), body))
}

/// `GET /api/session`: whether the cookie is a live session, and its CSRF token (the page
/// forgets it on reload; only a same-origin script can read this answer).
async fn session_status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let now = state.clock.now();
    let live =
        session_id(&headers).and_then(|id| lock(&state.sessions).check(id, false, None, now).ok());
    let body = match live {
        Some(info) => SessionBody {
            signed_in: true,
            csrf_token: Some(info.csrf_token),
            expires: Some(info.expires),
        },
        None => SessionBody { signed_in: false, csrf_token: None, expires: None },
    };
    session_response(StatusCode::OK, None, body)
}

/// `DELETE /api/session`: signs out (needs the CSRF token, so another site cannot do it).
async fn sign_out(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let clear = Some(session::clear_cookie(state.https(&headers)));
    let gone = SessionBody { signed_in: false, csrf_token: None, expires: None };
    let Some(id) = session_id(&headers) else {
        return Ok(session_response(StatusCode::OK, clear, gone));
    };
    let csrf = headers.get(session::CSRF_HEADER).and_then(|v| v.to_str().ok());
    let now = state.clock.now();
    let checked = lock(&state.sessions).check(id, true, csrf, now);
    match checked {
        Ok(_) => {
            let tag = lock(&state.sessions).remove(id);
            if let Some(tag) = tag {
                mutate(&state, move |fleet, now| Ok(((), fleet.session_closed(&tag, now)))).await?;
            }
        }
        Err(SessionError::Unknown) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(session_response(StatusCode::OK, clear, gone))
}

// ----- metrics -----

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = crate::metrics::render(
        &lock(&state.fleet),
        state.clock.now(),
        state.checkins.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
