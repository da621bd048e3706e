//! The Fleet Updates page: its assets, sign-in and sign-out, and the metrics it links to.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use serde::Deserialize;

use super::auth::{ClientAddr, OPERATOR_TOKEN, session_id};
use super::{ApiError, AppState, RequestBody, change, lock, mutate, parse_json};
use crate::session::{self, SessionError};
use crate::web;

pub(super) fn page_asset(asset: &web::Asset) -> Response {
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
pub(super) async fn sign_in(
    State(state): State<Arc<AppState>>,
    ClientAddr(from): ClientAddr,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let request: SignInRequest = parse_json(&body)?;
    if !state.token_matches(OPERATOR_TOKEN, &request.token) {
        tracing::warn!("refused a Fleet Updates sign-in: wrong operator token");
        state.refused("sign-in with a wrong operator token", from);
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "wrong operator token"));
    }
    let new = session::NewSession::draw()?;
    let (ttl, opened) = (state.session_ttl, new.clone());
    // Stored and audited before the browser gets its cookie; valid on every replica.
    let expires = mutate(
        &state,
        move |fleet, now| Ok((now, fleet.session_opened(&opened, ttl, now))),
        move |_, at, _| at.checked_add(ttl).unwrap_or(Timestamp::MAX),
    )
    .await?;
    let max_age = state.clock.now().duration_until(expires);
    let cookie = session::set_cookie(&new.id, max_age, state.https(&headers));
    let body =
        SessionBody { signed_in: true, csrf_token: Some(new.csrf_token), expires: Some(expires) };
    Ok(session_response(StatusCode::OK, Some(cookie), body))
}

/// `GET /api/session`: whether the cookie is a live session, and its CSRF token (the page
/// forgets it on reload; only a same-origin script can read this answer).
pub(super) async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let live = |state: &AppState| {
        let now = state.clock.now();
        let id = session_id(&headers)?;
        session::check(&lock(&state.fleet).sessions, id, false, None, now).ok()
    };
    let mut live_now = live(&state);
    // Signed in on another replica a moment ago: this one may not have caught up yet.
    if live_now.is_none()
        && session_id(&headers).is_some()
        && state.may_catch_up(super::auth::CATCH_UP_GAP)
    {
        // Not caught up: the page is told it is signed out, and signs in again.
        if state.catch_up_now().await.is_ok() {
            live_now = live(&state);
        }
    }
    let body = match live_now {
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
pub(super) async fn sign_out(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let clear = Some(session::clear_cookie(state.https(&headers)));
    let gone = SessionBody { signed_in: false, csrf_token: None, expires: None };
    let Some(id) = session_id(&headers) else {
        return Ok(session_response(StatusCode::OK, clear, gone));
    };
    let csrf = headers.get(session::CSRF_HEADER).and_then(|v| v.to_str().ok());
    let check = || session::check(&lock(&state.fleet).sessions, id, true, csrf, state.clock.now());
    let mut checked = check();
    if checked == Err(SessionError::Unknown) && state.store.shared() {
        // Opened on another replica a moment ago: this one must know it to end it, and must
        // not say it ended a session it could not see. (Cookies nobody signed in with cost
        // at most one catch-up per gap; past it, the browser is asked to try again.)
        if !state.may_catch_up(super::auth::CATCH_UP_GAP) {
            return Err(ApiError::busy("busy", "try signing out again in a moment", 1));
        }
        state.catch_up_now().await?;
        checked = check();
    }
    match checked {
        // Commit, then apply: the session ends only once its end is stored and audited, so a
        // sign-out that cannot be stored leaves the session as it was (and says so). Computed
        // under the fleet lock, so two sign-outs of one session end it once.
        Ok(_) => {
            let id = id.to_owned();
            change(&state, move |fleet, now| Ok(fleet.session_closed(&id, now))).await?;
        }
        Err(SessionError::Unknown) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(session_response(StatusCode::OK, clear, gone))
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = crate::metrics::render(
        &lock(&state.fleet),
        state.clock.now(),
        state.checkins.load(Ordering::Relaxed),
    );
    crate::metrics::render_server(
        &mut text,
        &state.listener_stats.snapshot(),
        lock(&state.store_failure).is_some(),
        lock(&state.enrollments).refused,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
