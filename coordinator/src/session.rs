//! Operator sessions for the Fleet Updates page: a browser signs in once with the operator
//! token and then carries a cookie instead of the token.
//!
//! A cookie is an ambient credential (the browser attaches it to any request to this origin,
//! including ones another site makes it send), so a session also has a CSRF token that the
//! page must echo in `x-csrf-token` on every state change. The cookie is `HttpOnly` (page
//! scripts, and so an injected script, cannot read it) and `SameSite=Strict`.
//!
//! Sessions are stored like the rest of the fleet ([`SessionRecord`], committed before the
//! browser gets its cookie), so every replica of Central Command knows them and a restart
//! keeps them. Only the BLAKE3 of each session id is stored, so the records cannot be turned
//! back into cookies, and lookups do not compare secrets byte by byte. Time is passed in,
//! like everywhere else in the coordinator.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use crate::store::{Change, SessionRecord};

/// The cookie that carries the session id.
pub const COOKIE_NAME: &str = "sitecast_session";
/// The header cookie-authenticated state changes must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Absolute lifetime of a session; signing in again starts a new one.
pub const DEFAULT_TTL: SignedDuration = SignedDuration::from_hours(12);
/// More live sessions than this and the one closest to expiry is dropped, so a script that
/// holds the token cannot grow the table without bound.
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

/// What the browser gets at sign-in: the cookie value and the CSRF token for the page. Drawn
/// before the sign-in is computed, so computing it again (after another replica committed
/// first) gives the same session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub id: String,
    pub csrf_token: String,
    /// A short, non-secret name for the audit log.
    pub tag: String,
}

impl NewSession {
    pub fn draw() -> Result<Self, SessionError> {
        let id = random_hex()?;
        let csrf_token = random_hex()?;
        let tag = tag_of(&id);
        Ok(Self { id, csrf_token, tag })
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

/// The key a session is stored under: the BLAKE3 of its id.
pub fn id_hash(id: &str) -> String {
    blake3::hash(id.as_bytes()).to_hex().to_string()
}

/// The changes that store `new` until `now + ttl`: expired sessions go, and the ones closest
/// to expiry while more than [`MAX_SESSIONS`] would be live.
pub fn open(
    sessions: &BTreeMap<String, SessionRecord>,
    new: &NewSession,
    ttl: SignedDuration,
    now: Timestamp,
) -> Vec<Change> {
    let mut live: Vec<(&String, &SessionRecord)> =
        sessions.iter().filter(|(_, s)| s.expires > now).collect();
    live.sort_by_key(|(_, s)| s.expires);
    let over = (live.len() + 1).saturating_sub(MAX_SESSIONS);
    let dropped = sessions
        .iter()
        .filter(|(_, s)| s.expires <= now)
        .map(|(key, _)| key)
        .chain(live.iter().take(over).map(|(key, _)| *key));
    let mut changes: Vec<Change> =
        dropped.map(|key| Change::Session { id_hash: key.clone(), session: None }).collect();
    let expires = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
    let record =
        SessionRecord { csrf_token: new.csrf_token.clone(), expires, tag: new.tag.clone() };
    changes.push(Change::Session { id_hash: id_hash(&new.id), session: Some(record) });
    changes
}

/// The live session with cookie `id`, if there is one.
pub fn live<'a>(
    sessions: &'a BTreeMap<String, SessionRecord>,
    id: &str,
    now: Timestamp,
) -> Option<&'a SessionRecord> {
    sessions.get(&id_hash(id)).filter(|s| s.expires > now)
}

/// Checks a cookie-authenticated request. Safe methods need only a live session; anything
/// that may change state also needs the session's CSRF token.
pub fn check(
    sessions: &BTreeMap<String, SessionRecord>,
    id: &str,
    changes_state: bool,
    csrf: Option<&str>,
    now: Timestamp,
) -> Result<SessionRecord, SessionError> {
    let session = live(sessions, id, now).ok_or(SessionError::Unknown)?;
    // Comparing hashes (`blake3::Hash` equality is constant-time) so the response time
    // says nothing about how much of a guessed token was right.
    let expected = blake3::hash(session.csrf_token.as_bytes());
    if changes_state && csrf.map(|t| blake3::hash(t.as_bytes())) != Some(expected) {
        return Err(SessionError::Csrf);
    }
    Ok(session.clone())
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

    /// The sessions after `changes`, as the fleet applies them.
    fn applied(mut sessions: BTreeMap<String, SessionRecord>, changes: Vec<Change>) -> Sessions {
        for change in changes {
            let Change::Session { id_hash, session } = change else { panic!("{change:?}") };
            match session {
                Some(session) => sessions.insert(id_hash, session),
                None => sessions.remove(&id_hash),
            };
        }
        sessions
    }

    type Sessions = BTreeMap<String, SessionRecord>;

    fn signed_in(
        sessions: Sessions,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> (Sessions, NewSession) {
        let new = NewSession::draw().expect("random");
        let changes = open(&sessions, &new, ttl, now);
        (applied(sessions, changes), new)
    }

    #[test]
    fn a_session_reads_without_csrf_but_changes_need_it() {
        let (sessions, new) = signed_in(Sessions::new(), DEFAULT_TTL, t0());
        assert_eq!(new.id.len(), 64);
        assert_ne!(new.id, new.csrf_token);
        assert!(!sessions.contains_key(&new.id), "the cookie itself is stored");
        assert!(check(&sessions, &new.id, false, None, t0()).is_ok());
        assert_eq!(check(&sessions, &new.id, true, None, t0()), Err(SessionError::Csrf));
        assert_eq!(check(&sessions, &new.id, true, Some("nope"), t0()), Err(SessionError::Csrf));
        let record = check(&sessions, &new.id, true, Some(&new.csrf_token), t0()).expect("ok");
        assert_eq!(
            (record.csrf_token, record.expires),
            (new.csrf_token.clone(), t0() + DEFAULT_TTL)
        );
        // Another session's CSRF token is not this one's.
        let (sessions, other) = signed_in(sessions, DEFAULT_TTL, t0());
        assert_eq!(
            check(&sessions, &new.id, true, Some(&other.csrf_token), t0()),
            Err(SessionError::Csrf)
        );
        assert_eq!(check(&sessions, "forged", false, None, t0()), Err(SessionError::Unknown));
    }

    #[test]
    fn sessions_expire_and_expired_ones_are_dropped() {
        let hour = SignedDuration::from_hours(1);
        let (sessions, new) = signed_in(Sessions::new(), hour, t0());
        let later = t0() + SignedDuration::from_mins(59);
        assert!(check(&sessions, &new.id, false, None, later).is_ok());
        let expired = t0() + hour;
        assert_eq!(check(&sessions, &new.id, false, None, expired), Err(SessionError::Unknown));
        // Expired sessions are dropped when the next one is stored.
        let (sessions, live) = signed_in(sessions, hour, expired);
        assert_eq!(sessions.len(), 1);
        assert!(check(&sessions, &live.id, false, None, expired).is_ok());
    }

    #[test]
    fn the_table_is_bounded() {
        let (mut sessions, first) = signed_in(Sessions::new(), DEFAULT_TTL, t0());
        for i in 1..=MAX_SESSIONS as i64 {
            sessions = signed_in(sessions, DEFAULT_TTL, t0() + SignedDuration::from_secs(i)).0;
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert_eq!(check(&sessions, &first.id, false, None, t0()), Err(SessionError::Unknown));
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
