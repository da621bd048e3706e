//! The operator's API: rollouts, pins, windows, sites and the audit log.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use sitecast_manifest::window::MaintenanceWindow;

use super::auth::Operator;
use super::{ApiError, AppState, RequestBody, change, lock, mutate, parse_json};
use crate::engine::RolloutKind;
use crate::fleet::{FleetError, RolloutAction, RolloutRequest, RolloutView, SitesOverview};
use crate::store::AuditEntry;

pub(super) async fn create_rollout(
    State(state): State<Arc<AppState>>,
    _: Operator,
    RequestBody(body): RequestBody,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let request: RolloutRequest = parse_json(&body)?;
    let view = mutate(
        &state,
        move |fleet, now| fleet.create_rollout(request.clone(), now),
        |fleet, id, now| fleet.rollout_view(&fleet.rollouts[&id], now),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub(super) async fn list_rollouts(
    State(state): State<Arc<AppState>>,
    _: Operator,
) -> Json<Vec<RolloutView>> {
    let fleet = lock(&state.fleet);
    let now = state.clock.now();
    Json(fleet.rollouts.values().map(|r| fleet.rollout_view(r, now)).collect())
}

pub(super) async fn show_rollout(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(id): Path<u64>,
) -> Result<Json<RolloutView>, ApiError> {
    let fleet = lock(&state.fleet);
    let rollout =
        fleet.rollouts.get(&id).ok_or_else(|| FleetError::NotFound(format!("rollout {id}")))?;
    Ok(Json(fleet.rollout_view(rollout, state.clock.now())))
}

pub(super) async fn control_rollout(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path((id, action)): Path<(u64, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let action: RolloutAction = action.parse()?;
    let view = mutate(
        &state,
        move |fleet, now| Ok((id, fleet.control(id, action, now)?)),
        |fleet, id, now| fleet.rollout_view(&fleet.rollouts[&id], now),
    )
    .await?;
    Ok(Json(view))
}

#[derive(Deserialize)]
struct PinRequest {
    version: Option<u64>,
}

/// Whom a pin holds: one appliance or every appliance in a group.
enum PinTarget {
    Appliance(String),
    Group(String),
}

/// Pins (or, with no version, unpins) the target's image or agent.
async fn set_pin(
    state: &Arc<AppState>,
    kind: RolloutKind,
    target: PinTarget,
    body: &[u8],
) -> Result<StatusCode, ApiError> {
    let version = parse_json::<PinRequest>(body)?.version;
    change(state, move |fleet, now| match &target {
        PinTarget::Appliance(key) => fleet.pin(key, kind, version, now),
        PinTarget::Group(group) => fleet.pin_group(group, kind, version, now),
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn pin(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(key): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    set_pin(&state, RolloutKind::Image, PinTarget::Appliance(key), &body).await
}

pub(super) async fn pin_group(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(group): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    set_pin(&state, RolloutKind::Image, PinTarget::Group(group), &body).await
}

pub(super) async fn agent_pin(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(key): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    set_pin(&state, RolloutKind::Agent, PinTarget::Appliance(key), &body).await
}

pub(super) async fn agent_pin_group(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(group): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    set_pin(&state, RolloutKind::Agent, PinTarget::Group(group), &body).await
}

pub(super) async fn appliance_window(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(key): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    let window: Option<MaintenanceWindow> = parse_json(&body)?;
    change(&state, move |fleet, now| fleet.set_appliance_window(&key, window.clone(), now)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn site_window(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(site): Path<String>,
    RequestBody(body): RequestBody,
) -> Result<StatusCode, ApiError> {
    let window: MaintenanceWindow = parse_json(&body)?;
    change(&state, move |fleet, now| fleet.set_site_window(&site, window.clone(), now)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn sites(State(state): State<Arc<AppState>>, _: Operator) -> Json<SitesOverview> {
    Json(lock(&state.fleet).sites_overview(state.clock.now()))
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
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

pub(super) async fn audit(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
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
    Ok(Json(entries))
}
