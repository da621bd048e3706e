//! The appliances' API (check-in, report; signed by the appliance's key) and the operator's
//! view of them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use sitecast_manifest::api::{CheckinRequest, CheckinResponse, ReportRequest};

use super::auth::{ENROLLMENT_TOKEN, Operator, SignedAppliance};
use super::{ApiError, AppState, change, lock, parse_json};
use crate::engine::RolloutKind;
use crate::fleet::{ApplianceListing, Enrollment, ReportAuth};

pub(super) async fn checkin(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    signed: SignedAppliance,
) -> Result<Json<CheckinResponse>, ApiError> {
    let request: CheckinRequest = parse_json(&signed.body)?;
    let enrollment = match &request.enrollment_token {
        Some(token) if !signed.enrolled && state.token_matches(ENROLLMENT_TOKEN, token) => {
            Enrollment::Token
        }
        _ => Enrollment::None,
    };
    let public_url = state.public_url(&headers);
    state.checkins.fetch_add(1, Ordering::Relaxed);
    let key = signed.key;
    let now = state.clock.now();
    // Most check-ins change only bookkeeping: answered at once, under one hold of the lock so
    // no change committed in between is overwritten.
    let answered = {
        let mut fleet = lock(&state.fleet);
        let plan = fleet.checkin(&key, request.clone(), enrollment, now, &public_url)?;
        if plan.durable.is_empty() {
            fleet.note_seen(plan.seen);
            Some(plan.response)
        } else {
            None
        }
    };
    let mut response = match answered {
        Some(response) => response,
        None => {
            let worker = Arc::clone(&state);
            tokio::task::spawn_blocking(move || {
                durable_checkin(&worker, &key, request, enrollment, now, &public_url)
            })
            .await
            .map_err(ApiError::internal)??
        }
    };
    if let (Some(origin), Some(version)) = (response.origin.as_mut(), response.version) {
        origin.image.push_str(&state.signed_image_query(version, state.clock.now()));
    }
    Ok(Json(response))
}

/// A check-in that registers, changes what the appliance is, or carries a new offer: stored
/// before it is answered, computed again under the writer's lock so nothing changed since.
fn durable_checkin(
    state: &Arc<AppState>,
    key: &str,
    request: CheckinRequest,
    enrollment: Enrollment,
    now: jiff::Timestamp,
    public_url: &str,
) -> Result<CheckinResponse, ApiError> {
    let mut spent = false;
    state.serialized(|state, fleet| {
        let plan = fleet.checkin(key, request.clone(), enrollment, now, public_url)?;
        // Only enrollments that would succeed spend the enrollment budget, once.
        if plan.registered && !spent {
            if !lock(&state.enrollments).take(std::time::Instant::now()) {
                return Err(ApiError::too_many(
                    "enrollment_busy",
                    "too many appliances are enrolling right now; check in again shortly",
                    10,
                ));
            }
            spent = true;
        }
        state.commit_and_apply(fleet, &plan.durable, true)?;
        fleet.note_seen(plan.seen);
        Ok(plan.response)
    })
}

pub(super) async fn report(
    State(state): State<Arc<AppState>>,
    signed: SignedAppliance,
) -> Result<StatusCode, ApiError> {
    take_report(&state, RolloutKind::Image, signed).await
}

/// `POST /api/appliances/agent-report`: the same body as a report, about an agent release.
pub(super) async fn agent_report(
    State(state): State<Arc<AppState>>,
    signed: SignedAppliance,
) -> Result<StatusCode, ApiError> {
    take_report(&state, RolloutKind::Agent, signed).await
}

async fn take_report(
    state: &Arc<AppState>,
    kind: RolloutKind,
    signed: SignedAppliance,
) -> Result<StatusCode, ApiError> {
    let report: ReportRequest = parse_json(&signed.body)?;
    let auth = ReportAuth { timestamp: signed.timestamp, signature: signed.signature_digest };
    let key = signed.key;
    change(state, move |fleet, now| fleet.report(&key, kind, report.clone(), &auth, now)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    _: Operator,
) -> Json<Vec<ApplianceListing>> {
    let fleet = lock(&state.fleet);
    let now = state.clock.now();
    Json(
        fleet
            .appliances
            .values()
            .map(|a| ApplianceListing { record: a.clone(), online: fleet.is_online(a, now) })
            .collect(),
    )
}

/// `DELETE /api/appliances/{key}`: an operator removes an appliance (replaced or gone).
pub(super) async fn remove(
    State(state): State<Arc<AppState>>,
    _: Operator,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    change(&state, move |fleet, now| fleet.remove_appliance(&key, now)).await?;
    Ok(StatusCode::NO_CONTENT)
}
