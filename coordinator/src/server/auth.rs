//! Who is asking: the operator (bearer token or session cookie with CSRF token), an appliance
//! (a request signed by its enrolled key), or the holder of an image URL that Central Command
//! signed into an offer. As axum extractors, so a handler reads as what it does and the check
//! happens before its body is read.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use jiff::Timestamp;
use sitecast_manifest::PublicKey;
use sitecast_manifest::Signature;
use sitecast_manifest::api;

use super::{ApiError, AppState, FirstRunTokens, MAX_APPLIANCE_BYTES, lock};
use crate::fleet::Fleet;
use crate::session;
use crate::store::Change;

pub const OPERATOR_TOKEN: &str = "operator_token_blake3";
pub(super) const ENROLLMENT_TOKEN: &str = "enrollment_token_blake3";
/// The hawkBit DDI gateway token: lets any device of the tenant poll and register itself.
pub(super) const DDI_GATEWAY_TOKEN: &str = "ddi_gateway_token_blake3";
/// The key Central Command signs image URLs with (hex); never leaves the server.
pub const URL_SECRET: &str = "image_url_secret";

pub(super) fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

pub(super) fn random_hex(len: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// Why the configured tokens cannot be taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum TokenError {
    #[error("no random numbers for a token: {0}")]
    Random(#[from] std::io::Error),
    /// A replica would change a token every replica checks.
    #[error(
        "this replica's {0} differs from the one the database holds (the other replicas'): give \
         every replica the same tokens; to change one, stop the replicas and start one Central \
         Command without --replica with the new token"
    )]
    DiffersFromReplicas(&'static str),
}

/// The token hashes and URL secret to store at start: configured tokens replace stored ones
/// (audited when they change), missing ones are generated and shown once. A replica takes
/// the tokens the database holds, or refuses to start.
pub(super) fn initial_tokens(
    fleet: &Fleet,
    config: &super::ServerConfig,
    now: Timestamp,
) -> Result<(Vec<Change>, FirstRunTokens), TokenError> {
    let mut changes: Vec<Change> = Vec::new();
    let mut first_run = FirstRunTokens { operator: None, enrollment: None };
    let mut add = |fleet: &Fleet, key: &str, hash: String, why: &str| {
        let mut batch = fleet.token_set(key, hash, why, now);
        // Audit entries are numbered after the ones already gathered here.
        for change in &mut batch {
            if let Change::Audit(entry) = change {
                entry.seq +=
                    changes.iter().filter(|c| matches!(c, Change::Audit(_))).count() as u64;
            }
        }
        changes.extend(batch);
    };
    for (key, flag, configured, shown) in [
        (OPERATOR_TOKEN, "--operator-token", &config.operator_token, &mut first_run.operator),
        (
            ENROLLMENT_TOKEN,
            "--enrollment-token",
            &config.enrollment_token,
            &mut first_run.enrollment,
        ),
    ] {
        let stored = fleet.meta.get(key);
        match configured {
            Some(token) if stored != Some(&token_hash(token)) => {
                if config.replica && stored.is_some() {
                    return Err(TokenError::DiffersFromReplicas(flag));
                }
                let why = if stored.is_some() { "replaced by configuration" } else { "configured" };
                add(fleet, key, token_hash(token), why);
            }
            None if stored.is_none() => {
                let token = random_hex(24)?;
                add(fleet, key, token_hash(&token), "generated at first start");
                *shown = Some(token);
            }
            _ => {}
        }
    }
    // Never generated: without one configured, DDI devices need a target token each, and a
    // token configured before is revoked (an empty hash matches no token).
    let stored = fleet.meta.get(DDI_GATEWAY_TOKEN).filter(|hash| !hash.is_empty());
    let flag = "--ddi-gateway-token";
    match &config.ddi_gateway_token {
        Some(token) if stored != Some(&token_hash(token)) => {
            if config.replica && stored.is_some() {
                return Err(TokenError::DiffersFromReplicas(flag));
            }
            add(fleet, DDI_GATEWAY_TOKEN, token_hash(token), "configured");
        }
        None if stored.is_some() && config.replica => {
            return Err(TokenError::DiffersFromReplicas(flag));
        }
        None if stored.is_some() => {
            add(fleet, DDI_GATEWAY_TOKEN, String::new(), "revoked: no longer configured");
        }
        _ => {}
    }
    if !fleet.meta.contains_key(URL_SECRET) {
        changes.push(Fleet::meta_change(URL_SECRET, random_hex(32)?));
    }
    Ok((changes, first_run))
}

/// A token bucket: `rate` per second, at most `burst` at once.
#[derive(Debug)]
pub(super) struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<std::time::Instant>,
    /// Taken while empty, since the last successful take.
    pub(super) refused: u64,
}

impl RateLimit {
    pub(super) fn new(rate: f64, burst: u32) -> Self {
        Self { rate, burst: f64::from(burst), tokens: f64::from(burst), at: None, refused: 0 }
    }

    pub(super) fn take(&mut self, now: std::time::Instant) -> bool {
        let elapsed = self.at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

impl AppState {
    pub(super) fn token_matches(&self, meta_key: &str, token: &str) -> bool {
        lock(&self.fleet).meta.get(meta_key).is_some_and(|hash| *hash == token_hash(token))
    }

    /// Records a refused credential in the audit log, at most about once a second (the rest
    /// are counted into the next entry), so a flood of bad tokens cannot fill the disk.
    pub(super) fn refused(self: &Arc<Self>, what: &'static str, from: Option<SocketAddr>) {
        let suppressed = {
            let mut limit = lock(&self.refusals);
            let before = limit.refused;
            if !limit.take(std::time::Instant::now()) {
                return;
            }
            std::mem::replace(&mut limit.refused, 0).min(before)
        };
        let from = from.map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
        let why = if suppressed > 0 {
            format!("{what} (+{suppressed} not logged)")
        } else {
            what.to_owned()
        };
        let state = Arc::clone(self);
        tokio::spawn(async move {
            let _ =
                super::change(&state, move |fleet, now| Ok(fleet.auth_refused(&why, &from, now)))
                    .await;
        });
    }

    /// Whether the client reached us over HTTPS (directly or through a TLS proxy): the session
    /// cookie may be `Secure`, and the URLs we hand out are `https://`.
    pub(super) fn https(&self, headers: &HeaderMap) -> bool {
        self.serves_tls
            || self.public_url.as_deref().is_some_and(|u| u.starts_with("https://"))
            || headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("https"))
    }

    pub(super) fn public_url(&self, headers: &HeaderMap) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        // Host and X-Forwarded-Proto are the client's word, but only its own answer uses
        // them: a TLS proxy that sets the header gets https:// URLs without --public-url.
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        let scheme = if self.https(headers) { "https" } else { "http" };
        format!("{scheme}://{host}")
    }

    fn url_signature(&self, version: u64, expires: i64) -> Option<String> {
        let secret = lock(&self.fleet).meta.get(URL_SECRET).cloned()?;
        let key: [u8; 32] = hex::decode(secret).ok()?.try_into().ok()?;
        let message = format!("sitecast image url v1\n{version}\n{expires}");
        Some(blake3::keyed_hash(&key, message.as_bytes()).to_hex().to_string())
    }

    /// `?expires=…&sig=…` for the image of `version`, valid for the configured time.
    pub(super) fn signed_image_query(&self, version: u64, now: Timestamp) -> String {
        let expires = (now + self.image_url_ttl).as_second();
        match self.url_signature(version, expires) {
            Some(sig) => format!("?expires={expires}&sig={sig}"),
            None => String::new(),
        }
    }

    pub(super) fn image_url_valid(&self, version: u64, expires: i64, sig: &str) -> bool {
        expires >= self.clock.now().as_second()
            && self.url_signature(version, expires).is_some_and(|good| {
                // Both are hex of the same length; compare without an early exit.
                good.len() == sig.len()
                    && good.bytes().zip(sig.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            })
    }
}

pub(super) fn peer_address(parts: &Parts) -> Option<SocketAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// The least time between catch-ups asked for by requests with keys or cookies this replica
/// does not know.
pub(super) const CATCH_UP_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The client's address, when the listener recorded it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(peer_address(parts)))
    }
}

/// The operator: the bearer token (CLI, scripts) or a session cookie from the Fleet Updates
/// page. A cookie is sent by the browser on its own, so with a cookie every method but
/// GET/HEAD also needs the session's CSRF token; a bearer token is never sent implicitly and
/// needs none. A request with an `Authorization` header is judged by it alone.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operator;

impl Operator {
    /// Whether these request parts carry the operator's credentials.
    pub(super) fn check(state: &Arc<AppState>, parts: &Parts) -> Result<Self, ApiError> {
        let headers = &parts.headers;
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            return match value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
                None => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "operator token required (Authorization: Bearer …)",
                )),
                Some(token) if state.token_matches(OPERATOR_TOKEN, token) => Ok(Self),
                Some(_) => {
                    state.refused("wrong operator token", peer_address(parts));
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
        let changes_state = !matches!(parts.method, Method::GET | Method::HEAD);
        let csrf = headers.get(session::CSRF_HEADER).and_then(|v| v.to_str().ok());
        session::check(&lock(&state.fleet).sessions, id, changes_state, csrf, state.clock.now())
            .map(|_| Self)
            .map_err(ApiError::from)
    }
}

impl FromRequestParts<Arc<AppState>> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let by_cookie = !parts.headers.contains_key(header::AUTHORIZATION)
            && session_id(&parts.headers).is_some();
        let changes = by_cookie && !matches!(parts.method, Method::GET | Method::HEAD);
        match Self::check(state, parts) {
            // A change made with a session this replica knows is judged on sessions caught up
            // with the other replicas: one ended on another replica changes nothing here.
            Ok(_) if changes && state.store.shared() => {
                state.catch_up_now().await?;
                Self::check(state, parts)
            }
            // Signed in on another replica a moment ago: this one may not have caught up yet.
            // (Cookies nobody signed in with cost at most one catch-up per gap.)
            Err(error) if error.code == "session_expired" && state.may_catch_up(CATCH_UP_GAP) => {
                state.catch_up_now().await?;
                Self::check(state, parts)
            }
            checked => checked,
        }
    }
}

pub(super) fn session_id(headers: &HeaderMap) -> Option<&str> {
    session::session_cookie(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()))
}

/// The signed headers of an appliance request, checked for form and freshness.
struct SignedHeaders {
    key: PublicKey,
    timestamp: i64,
    signature: Signature,
}

fn signed_headers(state: &AppState, headers: &HeaderMap) -> Result<SignedHeaders, ApiError> {
    let unauthorized =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let key = text(api::HEADER_APPLIANCE)
        .ok_or_else(|| unauthorized("appliance identity header missing"))?;
    let key = PublicKey::from_hex(key).map_err(|e| unauthorized(&format!("appliance key: {e}")))?;
    let timestamp: i64 = text(api::HEADER_TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| unauthorized("request timestamp missing"))?;
    let skew = state.clock.now().as_second().saturating_sub(timestamp).saturating_abs();
    if skew > api::MAX_CLOCK_SKEW_SECS {
        return Err(unauthorized(&format!("request timestamp is {skew} s off the server's clock")));
    }
    let signature = text(api::HEADER_SIGNATURE)
        .and_then(|s| Signature::from_hex(s).ok())
        .ok_or_else(|| unauthorized("request signature missing or malformed"))?;
    Ok(SignedHeaders { key, timestamp, signature })
}

/// An appliance request whose signature over method, path, timestamp and body checks out.
/// Only a key that is enrolled, or a first check-in, gets its body read, at most
/// [`MAX_APPLIANCE_BYTES`] of it.
#[derive(Debug)]
pub(super) struct SignedAppliance {
    /// Hex public key.
    pub key: String,
    pub enrolled: bool,
    pub timestamp: i64,
    /// BLAKE3 of the signature: names this exact request (replay checks).
    pub signature_digest: String,
    pub body: Bytes,
}

impl FromRequest<Arc<AppState>> for SignedAppliance {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        let signed = signed_headers(state, &parts.headers)?;
        let key = signed.key.to_hex();
        let mut enrolled = lock(&state.fleet).appliances.contains_key(&key);
        let first_checkin = parts.uri.path() == "/api/appliances/checkin";
        // Enrolled through another replica a moment ago: this one may not have caught up. (A
        // check-in catches up anyway; unknown keys cost at most one catch-up per 100 ms.)
        if !enrolled && !first_checkin && state.may_catch_up(CATCH_UP_GAP) {
            state.catch_up_now().await?;
            enrolled = lock(&state.fleet).appliances.contains_key(&key);
        }
        if !enrolled && !first_checkin {
            return Err(crate::fleet::FleetError::UnknownAppliance(key).into());
        }
        // A first check-in is under 16 KiB with every field at its bound; read no more of a
        // body whose signature cannot be checked until it is all here.
        let limit = if enrolled { MAX_APPLIANCE_BYTES } else { 16 * 1024 };
        let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("request body: {e}"))
        })?;
        let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
        let message =
            api::appliance_signing_bytes(parts.method.as_str(), path, signed.timestamp, &body);
        if !signed.key.verify(&message, &signed.signature) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "request signature does not match the appliance key",
            ));
        }
        let signature_digest =
            blake3::hash(signed.signature.to_hex().as_bytes()).to_hex().to_string();
        Ok(Self { key, enrolled, timestamp: signed.timestamp, signature_digest, body })
    }
}

/// Who may read image bytes: the operator, an enrolled appliance (signed request), or the
/// holder of an image URL from an offer (images only, not agent release files).
#[derive(Debug, Clone)]
pub(super) enum ImageReader {
    Operator,
    /// An enrolled appliance, of this site (origin bytes are counted per site).
    Appliance {
        site: String,
    },
    SignedUrl,
}

impl ImageReader {
    /// Checks the request parts; `version` is the release asked for (for signed URLs), `None`
    /// for a blob no signed URL names.
    pub(super) fn check(
        state: &Arc<AppState>,
        parts: &Parts,
        version: Option<u64>,
    ) -> Result<Self, ApiError> {
        if parts.headers.contains_key(header::AUTHORIZATION) || session_id(&parts.headers).is_some()
        {
            return Operator::check(state, parts).map(|_| Self::Operator);
        }
        if parts.headers.contains_key(api::HEADER_APPLIANCE) {
            let signed = signed_headers(state, &parts.headers)?;
            let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
            let message =
                api::appliance_signing_bytes(parts.method.as_str(), path, signed.timestamp, &[]);
            if !signed.key.verify(&message, &signed.signature) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "request signature does not match the appliance key",
                ));
            }
            let key = signed.key.to_hex();
            let site = lock(&state.fleet).appliances.get(&key).map(|a| a.site.clone());
            return match site {
                Some(site) => Ok(Self::Appliance { site }),
                None => Err(crate::fleet::FleetError::UnknownAppliance(key).into()),
            };
        }
        let query = parts.uri.query().unwrap_or("");
        let field = |name: &str| {
            query.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        };
        let expires = field("expires").and_then(|e| e.parse::<i64>().ok());
        match (expires, field("sig")) {
            (Some(expires), Some(sig))
                if version.is_some_and(|v| state.image_url_valid(v, expires, sig)) =>
            {
                Ok(Self::SignedUrl)
            }
            (Some(_), Some(_)) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "url_expired",
                "this image URL is expired or not signed by this server; check in for a new one",
            )),
            _ => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "images are for enrolled appliances (signed request or the URL from an offer) and operators",
            )),
        }
    }
}
