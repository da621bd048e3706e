//! Operator sessions for the Fleet Updates page: a browser signs in once with the operator
//! token and then carries a cookie instead of the token.
//!
//! A cookie is an ambient credential (the browser attaches it to any request to this origin,
//! including ones another site makes it send), so a session also has a CSRF token that the
//! page must echo in `x-csrf-token` on every state change. The cookie is `HttpOnly` (page
//! scripts, and so an injected script, cannot read it) and `SameSite=Strict`.
//!
//! Sessions live only in memory: a restart signs everyone out, which is cheaper than storing
//! bearer-equivalent secrets on disk. Only the BLAKE3 of each session id is kept, so the map
//! cannot be turned back into cookies, and lookups do not compare secrets byte by byte.
//! Time is passed in, like everywhere else in the coordinator.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};

/// The cookie that carries the session id.
pub const COOKIE_NAME: &str = "sitecast_session";
/// The header cookie-authenticated state changes must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Absolute lifetime of a session; signing in again starts a new one.
pub const DEFAULT_TTL: SignedDuration = SignedDuration::from_hours(12);
/// More live sessions than this and the one closest to expiry is dropped, so a script that
/// holds the token cannot grow the map without bound.
pub const MAX_SESSIONS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the session has expired or is unknown; sign in again")]
    Unknown,
    #[error(
        "{CSRF_HEADER} header missing or wrong: changes made with a session cookie need the CSRF token returned at sign-in"
    )]
    Csrf,
    #[error("no random numbers for a session id: {0}")]
    Random(String),
}

/// What the browser gets at sign-in: the cookie value and the CSRF token for the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub id: String,
    pub csrf_token: String,
    pub expires: Timestamp,
    /// A short, non-secret name for the audit log.
    pub tag: String,
}

/// A live session. The CSRF token is kept as is so a reloaded page (which only has the cookie)
/// can ask for it again: it is worthless without the cookie, which scripts cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub csrf_token: String,
    pub expires: Timestamp,
}

#[derive(Debug)]
pub struct Sessions {
    by_id_hash: HashMap<blake3::Hash, SessionInfo>,
    ttl: SignedDuration,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(DEFAULT_TTL)
    }
}

fn random_hex() -> Result<String, SessionError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| SessionError::Random(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// Short tag derived from the session id; reveals nothing usable about the id.
fn tag_of(id: &str) -> String {
    let hash = blake3::derive_key("sitecast session audit tag v1", id.as_bytes());
    hex::encode(&hash[..4])
}

impl Sessions {
    pub fn new(ttl: SignedDuration) -> Self {
        Self { by_id_hash: HashMap::new(), ttl }
    }

    /// Starts a session (the caller has checked the operator token).
    pub fn create(&mut self, now: Timestamp) -> Result<NewSession, SessionError> {
        self.by_id_hash.retain(|_, s| s.expires > now);
        while self.by_id_hash.len() >= MAX_SESSIONS {
            let Some(oldest) =
                self.by_id_hash.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
            else {
                break;
            };
            self.by_id_hash.remove(&oldest);
        }
        let id = random_hex()?;
        let csrf_token = random_hex()?;
        let expires = now.checked_add(self.ttl).unwrap_or(Timestamp::MAX);
        self.by_id_hash.insert(
            blake3::hash(id.as_bytes()),
            SessionInfo { csrf_token: csrf_token.clone(), expires },
        );
        let tag = tag_of(&id);
        Ok(NewSession { id, csrf_token, expires, tag })
    }

    fn live(&self, id: &str, now: Timestamp) -> Option<&SessionInfo> {
        self.by_id_hash.get(&blake3::hash(id.as_bytes())).filter(|s| s.expires > now)
    }

    /// Checks a cookie-authenticated request. Safe methods need only a live session; anything
    /// that may change state also needs the session's CSRF token.
    pub fn check(
        &self,
        id: &str,
        changes_state: bool,
        csrf: Option<&str>,
        now: Timestamp,
    ) -> Result<SessionInfo, SessionError> {
        let session = self.live(id, now).ok_or(SessionError::Unknown)?;
        // Comparing hashes (`blake3::Hash` equality is constant-time) so the response time
        // says nothing about how much of a guessed token was right.
        let expected = blake3::hash(session.csrf_token.as_bytes());
        if changes_state && csrf.map(|t| blake3::hash(t.as_bytes())) != Some(expected) {
            return Err(SessionError::Csrf);
        }
        Ok(session.clone())
    }

    /// The audit tag of a live session (to audit its end before ending it).
    pub fn tag(&self, id: &str, now: Timestamp) -> Option<String> {
        self.live(id, now).map(|_| tag_of(id))
    }

    /// Ends a session; returns its audit tag if it existed.
    pub fn remove(&mut self, id: &str) -> Option<String> {
        self.by_id_hash.remove(&blake3::hash(id.as_bytes())).map(|_| tag_of(id))
    }

    pub fn len(&self) -> usize {
        self.by_id_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id_hash.is_empty()
    }
}

/// The session id from `Cookie` header values, if one is present.
pub fn session_cookie<'a>(cookie_headers: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    cookie_headers
        .into_iter()
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim_matches('"'))
}

/// `Set-Cookie` for a new session. `secure` when the page is served over HTTPS (a `Secure`
/// cookie is never sent over plain HTTP, which would lock out an operator on `http://`).
pub fn set_cookie(id: &str, max_age: SignedDuration, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age.as_secs().max(0),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that makes the browser forget the session.
pub fn clear_cookie(secure: bool) -> String {
    set_cookie("", SignedDuration::ZERO, secure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Timestamp {
        "2026-11-23T10:00:00Z".parse().expect("timestamp")
    }

    #[test]
    fn a_session_reads_without_csrf_but_changes_need_it() {
        let mut sessions = Sessions::default();
        let new = sessions.create(t0()).expect("session");
        assert_eq!(new.id.len(), 64);
        assert_ne!(new.id, new.csrf_token);
        assert!(sessions.check(&new.id, false, None, t0()).is_ok());
        assert_eq!(sessions.check(&new.id, true, None, t0()), Err(SessionError::Csrf));
        assert_eq!(sessions.check(&new.id, true, Some("nope"), t0()), Err(SessionError::Csrf));
        assert_eq!(
            sessions.check(&new.id, true, Some(&new.csrf_token), t0()),
            Ok(SessionInfo { csrf_token: new.csrf_token.clone(), expires: new.expires })
        );
        // Another session's CSRF token is not this one's.
        let other = sessions.create(t0()).expect("session");
        assert_eq!(
            sessions.check(&new.id, true, Some(&other.csrf_token), t0()),
            Err(SessionError::Csrf)
        );
        assert_eq!(sessions.check("forged", false, None, t0()), Err(SessionError::Unknown));
    }

    #[test]
    fn sessions_expire_and_can_be_removed() {
        let mut sessions = Sessions::new(SignedDuration::from_hours(1));
        let new = sessions.create(t0()).expect("session");
        let later = t0() + SignedDuration::from_mins(59);
        assert!(sessions.check(&new.id, false, None, later).is_ok());
        let expired = t0() + SignedDuration::from_hours(1);
        assert_eq!(sessions.check(&new.id, false, None, expired), Err(SessionError::Unknown));
        // Expired sessions are swept when the next one is created.
        sessions.create(expired).expect("session");
        assert_eq!(sessions.len(), 1);
        let live = sessions.create(expired).expect("session");
        assert_eq!(sessions.remove(&live.id), Some(live.tag));
        assert_eq!(sessions.check(&live.id, false, None, expired), Err(SessionError::Unknown));
        assert_eq!(sessions.remove(&live.id), None);
    }

    #[test]
    fn the_map_is_bounded() {
        let mut sessions = Sessions::default();
        let first = sessions.create(t0()).expect("session");
        for i in 1..=MAX_SESSIONS as i64 {
            sessions.create(t0() + SignedDuration::from_secs(i)).expect("session");
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert_eq!(sessions.check(&first.id, false, None, t0()), Err(SessionError::Unknown));
    }

    #[test]
    fn cookies_are_found_among_others_and_written_strictly() {
        let id = "ab".repeat(32);
        let header = format!("theme=dark; {COOKIE_NAME}={id}; other=1");
        assert_eq!(session_cookie([header.as_str()]), Some(id.as_str()));
        assert_eq!(session_cookie(["a=1", "sitecast_session=x"]), Some("x"));
        assert_eq!(session_cookie(["sitecast_session_other=x"]), None);
        let set = set_cookie(&id, DEFAULT_TTL, false);
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
        assert!(set.contains("Max-Age=43200") && !set.contains("Secure"), "{set}");
        assert!(set_cookie(&id, DEFAULT_TTL, true).ends_with("; Secure"));
        assert!(clear_cookie(false).starts_with("sitecast_session=; Path=/; Max-Age=0;"));
    }
}
