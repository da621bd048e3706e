//! The hawkBit DDI controller API, under `/{tenant}/controller/v1/{controllerId}`, for devices
//! whose update client speaks it (SWUpdate's suricatta mode). What a device may do is in
//! [`crate::fleet`]; this is the wire: token authentication as hawkBit has it, the JSON DDI
//! clients expect, tolerant reading of what they send, and the artifact download with `HEAD`
//! and `Range`.
//!
//! Answers to feedback and `configData` are `200` with an empty body: SWUpdate counts only
//! 200, 206 and 226 as done and repeats anything else.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::auth::{DDI_GATEWAY_TOKEN, peer_address, token_hash};
use super::auth::{Operator, random_hex};
use super::{ApiError, AppState, RequestBody, lock};
use jiff::Timestamp;

use crate::fleet::{DdiExecution, DdiFeedback, DdiFinished, DdiNext, Fleet, FleetError, ddi_key};
use crate::store::Change;

/// A DDI request's device, authenticated by its target token or the tenant's gateway token.
pub(super) struct DdiDevice {
    pub controller_id: String,
    /// It came with the gateway token and is not registered yet (only a poll registers it).
    pub unregistered: bool,
}

impl FromRequestParts<Arc<AppState>> for DdiDevice {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let Path(params) = Path::<BTreeMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid", e.body_text()))?;
        let tenant = params.get("tenant").map(String::as_str).unwrap_or_default();
        let controller_id = params.get("controller_id").cloned().unwrap_or_default();
        // Tenants are case-insensitive in hawkBit (`DEFAULT` and `default` are one).
        if !tenant.eq_ignore_ascii_case(&state.ddi_tenant) {
            return Err(ApiError::not_found(format!("tenant {tenant}")));
        }
        let unauthorized = |why: &'static str| {
            state.refused(why, peer_address(parts));
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why)
        };
        let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let Some((scheme, token)) = authorization.and_then(|v| v.split_once(' ')) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a DDI device needs Authorization: TargetToken … or GatewayToken …",
            ));
        };
        let token = token.trim();
        // Whether it is registered, and its target token's hash (not the whole record: this
        // runs on every request a device makes).
        let (registered, expected) = {
            let fleet = lock(&state.fleet);
            let device = fleet.ddi_device(&controller_id);
            let expected = device.and_then(|r| r.ddi.as_ref()?.token_hash.clone());
            (device.is_some(), expected)
        };
        match scheme {
            "TargetToken" => {
                if expected.is_some_and(|hash| hash == token_hash(token)) {
                    Ok(Self { controller_id, unregistered: false })
                } else {
                    Err(unauthorized("wrong DDI target token"))
                }
            }
            "GatewayToken" if state.token_matches(DDI_GATEWAY_TOKEN, token) => {
                Ok(Self { unregistered: !registered, controller_id })
            }
            "GatewayToken" => Err(unauthorized("wrong DDI gateway token")),
            _ => Err(unauthorized("unknown DDI authorization scheme")),
        }
    }
}

/// `GET {base}`: the polling interval, and links to what the device should do now.
pub(super) async fn poll(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    device: DdiDevice,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now();
    let id = device.controller_id;
    // A DDI device's poll is its check-in.
    state.checkins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if device.unregistered {
        // Registrations through the gateway token spend the enrollment budget, as enrollments do.
        if !lock(&state.enrollments).take(std::time::Instant::now()) {
            return Err(ApiError::too_many(
                "enrollment_busy",
                "too many appliances are enrolling right now; poll again shortly",
                10,
            ));
        }
        let site = state.ddi_tenant.clone();
        let registering = id.clone();
        super::change(&state, move |fleet, now| {
            // Registered meanwhile (through another replica): as it is.
            if fleet.appliances.contains_key(&crate::fleet::ddi_key(&registering)) {
                return Ok(Vec::new());
            }
            fleet.ddi_register(&registering, &site, None, None, "gateway", now)
        })
        .await?;
    }
    // Most polls change only bookkeeping: answered at once. One that creates an action is
    // stored before it is answered, off the async executor.
    let quick = {
        let mut fleet = lock(&state.fleet);
        let poll = fleet.ddi_poll(&id, now)?;
        poll.durable.is_empty().then(|| seen(&mut fleet, poll))
    };
    let (next, wants_attributes, sleep) = match quick {
        Some(answer) => answer,
        None => {
            let (worker, id) = (Arc::clone(&state), id.clone());
            tokio::task::spawn_blocking(move || {
                worker.serialized(|worker, fleet| {
                    let poll = fleet.ddi_poll(&id, now)?;
                    worker.commit_and_apply(fleet, &poll.durable, true)?;
                    Ok::<_, ApiError>(seen(fleet, poll))
                })
            })
            .await
            .map_err(ApiError::internal)??
        }
    };
    let base = base_url(&state, &headers, &id);
    let mut links = serde_json::Map::new();
    match next {
        DdiNext::Deploy(action) => {
            let href = format!("{base}/deploymentBase/{action}");
            links.insert("deploymentBase".into(), json!({ "href": href }));
        }
        // No query string: SWUpdate appends `/feedback` to this link.
        DdiNext::Cancel(action) => {
            let href = format!("{base}/cancelAction/{action}");
            links.insert("cancelAction".into(), json!({ "href": href }));
        }
        DdiNext::Nothing => {}
    }
    if wants_attributes {
        links.insert("configData".into(), json!({"href": format!("{base}/configData")}));
    }
    Ok(Json(json!({
        "config": {"polling": {"sleep": hh_mm_ss(sleep)}},
        "_links": links,
    })))
}

/// Applies a poll's bookkeeping; what to offer, whether to ask for attributes, the interval.
fn seen(fleet: &mut crate::fleet::Fleet, poll: crate::fleet::DdiPoll) -> (DdiNext, bool, u64) {
    let wants = poll.seen.ddi.as_ref().is_some_and(|d| !d.attributes_received);
    let sleep = fleet.config.checkin_interval_secs;
    fleet.note_seen(poll.seen);
    (poll.next, wants, sleep)
}

/// `GET {base}/deploymentBase/{actionId}`: the release as one chunk with its `.swu` artifact.
pub(super) async fn deployment(
    State(state): State<Arc<AppState>>,
    Path((_, _, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    device: DdiDevice,
) -> Result<Json<Value>, ApiError> {
    let action = action_id(&action)?;
    let (release, swu) = {
        let fleet = lock(&state.fleet);
        let (_, release) = fleet.ddi_action(&device.controller_id, action)?;
        let swu = release.swu.clone().ok_or_else(|| ApiError::not_found("artifact"))?;
        (release.clone(), swu)
    };
    let base = base_url(&state, &headers, &device.controller_id);
    let download = format!("{base}/softwaremodules/{}/artifacts/{}", release.version, swu.filename);
    Ok(Json(json!({
        "id": action.to_string(),
        "deployment": {
            "download": "forced",
            "update": "forced",
            "chunks": [{
                "part": "os",
                "version": release.version_name,
                "name": "sitecast",
                "artifacts": [{
                    "filename": swu.filename,
                    "hashes": {"sha1": swu.sha1, "md5": swu.md5, "sha256": swu.sha256},
                    "size": swu.size,
                    "_links": {
                        "download": {"href": download},
                        "download-http": {"href": download},
                    },
                }],
            }],
        },
    })))
}

/// `POST {base}/deploymentBase/{actionId}/feedback`.
pub(super) async fn feedback(
    State(state): State<Arc<AppState>>,
    Path((_, _, action)): Path<(String, String, String)>,
    device: DdiDevice,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    take_feedback(&state, &action, device, &body, Fleet::ddi_feedback).await
}

/// [`Fleet::ddi_feedback`] or [`Fleet::ddi_cancel_feedback`].
type RecordFeedback =
    fn(&Fleet, &str, u32, DdiFeedback, Timestamp) -> Result<Vec<Change>, FleetError>;

/// Records feedback on `action` with `record` (a deployment's or a cancellation's); `200`.
async fn take_feedback(
    state: &Arc<AppState>,
    action: &str,
    device: DdiDevice,
    body: &[u8],
    record: RecordFeedback,
) -> Result<StatusCode, ApiError> {
    let action = action_id(action)?;
    let feedback = parse_feedback(body)?;
    let id = device.controller_id;
    super::change(state, move |fleet, now| record(fleet, &id, action, feedback.clone(), now))
        .await?;
    Ok(StatusCode::OK)
}

/// `PUT {base}/configData`: the device's attributes.
pub(super) async fn config_data(
    State(state): State<Arc<AppState>>,
    device: DdiDevice,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    let value = tolerant_json(&body)?;
    let data = value
        .get("data")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_request("invalid", "configData needs a `data` object"))?;
    let attributes: std::collections::BTreeMap<String, String> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
        .collect();
    let id = device.controller_id;
    super::change(&state, move |fleet, now| fleet.ddi_config_data(&id, attributes.clone(), now))
        .await?;
    Ok(StatusCode::OK)
}

/// `GET`/`HEAD {base}/softwaremodules/{version}/artifacts/{filename}`: the `.swu`, with `Range`.
pub(super) async fn artifact(
    State(state): State<Arc<AppState>>,
    Path((_, _, version, filename)): Path<(String, String, u64, String)>,
    headers: HeaderMap,
    device: DdiDevice,
) -> Result<Response, ApiError> {
    let swu = {
        let fleet = lock(&state.fleet);
        // Only the artifact of a release this device was offered.
        let offered = fleet
            .ddi_device(&device.controller_id)
            .and_then(|r| r.ddi.as_ref()?.action.as_ref())
            .is_some_and(|a| a.version == version);
        let release = fleet.releases.get(&version).filter(|r| offered && r.active);
        release.and_then(|r| r.swu.clone()).filter(|s| s.filename == filename)
    };
    let swu = swu.ok_or_else(|| ApiError::not_found(format!("artifact {filename}")))?;
    let blake3 =
        sitecast_manifest::Blake3Hash::from_hex(&swu.blake3).map_err(ApiError::internal)?;
    let mut response_headers = HeaderMap::new();
    response_headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    super::origin::ranged_file(
        &headers,
        &state.blobs.data_path(&blake3),
        swu.size,
        &format!("\"{}\"", swu.blake3),
        response_headers,
    )
    .await
}

/// `GET {base}/cancelAction/{actionId}`: the action to stop.
pub(super) async fn cancel_action(
    State(state): State<Arc<AppState>>,
    Path((_, _, action)): Path<(String, String, String)>,
    device: DdiDevice,
) -> Result<Json<Value>, ApiError> {
    let action = action_id(&action)?;
    lock(&state.fleet).ddi_cancelled(&device.controller_id, action)?;
    Ok(Json(json!({"id": action.to_string(), "cancelAction": {"stopId": action.to_string()}})))
}

/// `POST {base}/cancelAction/{actionId}/feedback`.
pub(super) async fn cancel_feedback(
    State(state): State<Arc<AppState>>,
    Path((_, _, action)): Path<(String, String, String)>,
    device: DdiDevice,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    take_feedback(&state, &action, device, &body, Fleet::ddi_cancel_feedback).await
}

fn base_url(state: &AppState, headers: &HeaderMap, controller_id: &str) -> String {
    format!("{}/{}/controller/v1/{controller_id}", state.public_url(headers), state.ddi_tenant)
}

fn hh_mm_ss(seconds: u64) -> String {
    format!("{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

fn action_id(text: &str) -> Result<u32, ApiError> {
    text.parse().map_err(|_| ApiError::not_found(format!("action {text}")))
}

/// JSON as DDI clients send it: SWUpdate puts raw newlines and other control bytes inside
/// strings of some failure feedback. Outside strings they are whitespace anyway, so each
/// becomes a space.
fn tolerant_json(body: &[u8]) -> Result<Value, ApiError> {
    let cleaned: Vec<u8> = body.iter().map(|&b| if b < 0x20 { b' ' } else { b }).collect();
    serde_json::from_slice(&cleaned)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")))
}

/// A feedback body's status; what a newer client adds is ignored.
fn parse_feedback(body: &[u8]) -> Result<DdiFeedback, ApiError> {
    let value = tolerant_json(body)?;
    let status = value
        .get("status")
        .ok_or_else(|| ApiError::bad_request("invalid", "feedback needs a `status` object"))?;
    let execution = match status.get("execution").and_then(Value::as_str) {
        Some("proceeding") => DdiExecution::Proceeding,
        Some("closed") => DdiExecution::Closed,
        Some("canceled") => DdiExecution::Canceled,
        Some("rejected") => DdiExecution::Rejected,
        Some(_) => DdiExecution::Other,
        None => return Err(ApiError::bad_request("invalid", "feedback needs `status.execution`")),
    };
    let result = status.get("result");
    let finished = match result.and_then(|r| r.get("finished")).and_then(Value::as_str) {
        Some("success") => DdiFinished::Success,
        Some("failure") => DdiFinished::Failure,
        _ => DdiFinished::None,
    };
    let progress = result
        .and_then(|r| r.get("progress"))
        .and_then(|p| Some((p.get("cnt")?.as_u64()?, p.get("of")?.as_u64()?)));
    let details = status
        .get("details")
        .and_then(Value::as_array)
        .map(|d| d.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(DdiFeedback { execution, finished, progress, details })
}

#[derive(serde::Deserialize)]
pub(super) struct TargetRequest {
    controller_id: String,
    site: String,
    #[serde(default)]
    group: Option<String>,
}

/// `POST /api/ddi/targets` (operator): registers a DDI device, or gives it a new target token.
/// The token is shown in this answer only; Central Command keeps its hash.
pub(super) async fn register_target(
    State(state): State<Arc<AppState>>,
    _: Operator,
    RequestBody(body): RequestBody,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: TargetRequest = super::parse_json(&body)?;
    let token = random_hex(16).map_err(ApiError::internal)?;
    let hash = token_hash(&token);
    let (id, site, group) = (request.controller_id.clone(), request.site, request.group);
    super::change(&state, move |fleet, now| {
        fleet.ddi_register(&id, &site, group.as_deref(), Some(hash.clone()), "operator", now)
    })
    .await?;
    let key = ddi_key(&request.controller_id);
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"controller_id": request.controller_id, "appliance": key, "target_token": token}),
        ),
    ))
}
