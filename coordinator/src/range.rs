//! Range and conditional requests for the plain image download (RFC 9110 §13 and §14), as pure
//! functions so the handler only maps an [`Outcome`] to a status and headers.
//!
//! Legacy agents resume interrupted multi-GiB downloads with `Range` and revalidate with
//! `If-None-Match`; getting either wrong means a client that re-downloads everything or, worse,
//! one that is told "416" for a request the RFC says to answer with the whole image.
//!
//! Choices, each allowed by RFC 9110 and close to nginx:
//! - An invalid `Range` (unknown unit, bad syntax, `last < first`, signs, an empty set) is
//!   ignored: the whole image, 200. Only a valid set with no satisfiable range is a 416.
//! - Several ranges are coalesced (overlapping or adjacent ones merge). If they collapse into one
//!   range it is served as a single-part 206; otherwise the whole image is sent with 200 rather
//!   than `multipart/byteranges`: no agent asks for several ranges, and serving them would add a
//!   multipart encoder and a way to make the server seek all over a large file.
//! - Whitespace around list elements and around the `-` is tolerated, as nginx does.
//! - The image has an ETag but no `Last-Modified`, so date validators never match: an
//!   `If-Range` date means "send everything".
//! - A zero-length image has no non-empty range to send: `bytes=-N` (which the RFC calls
//!   satisfiable) is answered with the whole, empty, image; every other range is a 416.

use std::ops::Range;

use axum::http::{HeaderMap, HeaderName, Method, header};

/// What to do with a `Range` (and `If-Range`) for a representation of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeDecision {
    /// 200 with the whole representation.
    Full,
    /// 206 with these bytes; never empty, always within `0..size`.
    Partial(Range<u64>),
    /// 416 with `Content-Range: bytes */size`.
    NotSatisfiable,
}

/// What to answer a GET or HEAD with, after every precondition and the range are considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 412: `If-Match` failed, or `If-None-Match` matched on a method other than GET/HEAD.
    PreconditionFailed,
    /// 304, with the `ETag` but no body.
    NotModified,
    /// 200 with the whole representation.
    Full,
    /// 206 with these bytes and [`content_range`].
    Partial(Range<u64>),
    /// 416 with [`unsatisfied_content_range`].
    NotSatisfiable,
}

/// Evaluates the request's preconditions and range in the order RFC 9110 §13.2.2 prescribes.
///
/// `etag` is the quoted entity tag sent in the response's `ETag` (e.g. `"abc"`). A header
/// repeated on several lines counts as one comma-separated list; bytes that are not visible
/// ASCII never match anything.
pub fn evaluate(method: &Method, headers: &HeaderMap, etag: &str, size: u64) -> Outcome {
    if precondition_failed(field(headers, header::IF_MATCH).as_deref(), etag) {
        return Outcome::PreconditionFailed;
    }
    if not_modified(field(headers, header::IF_NONE_MATCH).as_deref(), etag) {
        return if method == Method::GET || method == Method::HEAD {
            Outcome::NotModified
        } else {
            Outcome::PreconditionFailed
        };
    }
    // §14.2: range handling is defined for GET only; HEAD describes the full response.
    if method != Method::GET {
        return Outcome::Full;
    }
    let range = field(headers, header::RANGE);
    let if_range = field(headers, header::IF_RANGE);
    match decide(range.as_deref(), if_range.as_deref(), etag, size) {
        RangeDecision::Full => Outcome::Full,
        RangeDecision::Partial(range) => Outcome::Partial(range),
        RangeDecision::NotSatisfiable => Outcome::NotSatisfiable,
    }
}

/// Decides a `Range` header (with its `If-Range`) for a representation of `size` bytes.
pub fn decide(range: Option<&str>, if_range: Option<&str>, etag: &str, size: u64) -> RangeDecision {
    let Some(range) = range else {
        return RangeDecision::Full;
    };
    // §13.1.5: the range is only honoured if the client's copy is the current one, compared
    // strongly; a date cannot match because the image has no Last-Modified.
    if let Some(validator) = if_range
        && !if_range_matches(validator, etag)
    {
        return RangeDecision::Full;
    }
    match parse_range(range) {
        Some(specs) => select(&specs, size),
        None => RangeDecision::Full,
    }
}

/// Whether `If-None-Match` asks for a 304: `*`, or any listed tag weakly matching `etag`.
/// A malformed field matches nothing, so the client gets the full response.
pub fn not_modified(if_none_match: Option<&str>, etag: &str) -> bool {
    let Some(value) = if_none_match else {
        return false;
    };
    list_matches(value, etag, weak_eq)
}

/// Whether `If-Match` fails (412): present, not `*`, and no listed tag strongly matching `etag`.
/// A malformed field fails, like nginx, because the client's assumption cannot be confirmed.
pub fn precondition_failed(if_match: Option<&str>, etag: &str) -> bool {
    let Some(value) = if_match else {
        return false;
    };
    !list_matches(value, etag, strong_eq)
}

/// `Content-Range` for a 206 of `range` out of `size` bytes; `range` must be non-empty.
pub fn content_range(range: &Range<u64>, size: u64) -> String {
    format!("bytes {}-{}/{size}", range.start, range.end.saturating_sub(1))
}

/// `Content-Range` for a 416.
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// All lines of a header as one list; `None` when it is absent.
fn field(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let parts: Vec<_> = values.map(|v| String::from_utf8_lossy(v.as_bytes())).collect();
    Some(parts.join(", "))
}

/// One byte-range-spec: `first-[last]` or `-suffix`.
#[derive(Debug, Clone, Copy)]
enum Spec {
    From { first: u64, last: Option<u64> },
    Suffix(u64),
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Parses `bytes=<range-set>`; `None` for anything the RFC says to ignore.
fn parse_range(value: &str) -> Option<Vec<Spec>> {
    let (unit, set) = value.trim_matches(is_ows).split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    // The list rule lets recipients skip empty elements (`bytes=0-1,,5-6`).
    for element in set.split(',').map(|e| e.trim_matches(is_ows)).filter(|e| !e.is_empty()) {
        let (first, last) = element.split_once('-')?;
        let (first, last) = (first.trim_matches(is_ows), last.trim_matches(is_ows));
        let spec = match (first.is_empty(), last.is_empty()) {
            (true, true) => return None,
            (true, false) => Spec::Suffix(digits(last)?),
            (false, true) => Spec::From { first: digits(first)?, last: None },
            (false, false) => {
                let (first, last) = (digits(first)?, digits(last)?);
                if last < first {
                    return None;
                }
                Spec::From { first, last: Some(last) }
            }
        };
        specs.push(spec);
    }
    (!specs.is_empty()).then_some(specs)
}

/// `1*DIGIT`, saturating: a position past `u64::MAX` is past the end of any representation,
/// which is still a valid (if unsatisfiable, or clamped) range, not a syntax error.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add(u64::from(b - b'0'))))
}

fn select(specs: &[Spec], size: u64) -> RangeDecision {
    // §14.1.1: satisfiable means an int-range starting inside the representation or a suffix
    // of non-zero length. The latter selects nothing of an empty representation.
    let mut satisfiable = false;
    let mut ranges: Vec<Range<u64>> = Vec::with_capacity(specs.len());
    for spec in specs {
        let range = match *spec {
            Spec::From { first, .. } if first >= size => continue,
            Spec::From { first, last } => {
                first..last.map_or(size, |last| last.saturating_add(1).min(size))
            }
            Spec::Suffix(0) => continue,
            Spec::Suffix(length) => size - length.min(size)..size,
        };
        satisfiable = true;
        if !range.is_empty() {
            ranges.push(range);
        }
    }
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    match merged.as_slice() {
        [single] => RangeDecision::Partial(single.clone()),
        [] if !satisfiable => RangeDecision::NotSatisfiable,
        // Disjoint ranges (we do not send multipart) or a suffix of an empty representation.
        _ => RangeDecision::Full,
    }
}

/// An entity tag: `W/` flag and the quoted part, quotes included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag<'a> {
    weak: bool,
    opaque: &'a str,
}

fn weak_eq(a: Tag<'_>, b: Tag<'_>) -> bool {
    a.opaque == b.opaque
}

fn strong_eq(a: Tag<'_>, b: Tag<'_>) -> bool {
    !a.weak && !b.weak && a.opaque == b.opaque
}

/// Parses one entity tag at the start of `s`; returns it and the rest.
fn parse_tag(s: &str) -> Option<(Tag<'_>, &str)> {
    let (weak, quoted) = match s.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let inner = quoted.strip_prefix('"')?;
    // etagc: any visible character but DQUOTE, or obs-text.
    let end = inner.find(|c: char| c == '"' || (c.is_ascii() && !c.is_ascii_graphic()))?;
    if !inner[end..].starts_with('"') {
        return None;
    }
    Some((Tag { weak, opaque: &quoted[..end + 2] }, &inner[end + 1..]))
}

/// The representation's own tag; `None` if `etag` is not a well-formed entity tag.
fn own_tag(etag: &str) -> Option<Tag<'_>> {
    match parse_tag(etag.trim_matches(is_ows))? {
        (tag, "") => Some(tag),
        _ => None,
    }
}

/// `*` or `#entity-tag` matched against `etag` with `eq`; malformed lists match nothing.
fn list_matches(value: &str, etag: &str, eq: fn(Tag<'_>, Tag<'_>) -> bool) -> bool {
    let value = value.trim_matches(is_ows);
    if value == "*" {
        return true;
    }
    let own = own_tag(etag);
    let mut rest = value;
    let mut matched = false;
    loop {
        rest = rest.trim_start_matches(|c| is_ows(c) || c == ',');
        if rest.is_empty() {
            return matched;
        }
        let Some((tag, after)) = parse_tag(rest) else {
            return false;
        };
        matched |= own.is_some_and(|own| eq(tag, own));
        rest = after.trim_start_matches(is_ows);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return false;
        }
    }
}

fn if_range_matches(validator: &str, etag: &str) -> bool {
    match (own_tag(validator), own_tag(etag)) {
        (Some(theirs), Some(ours)) => strong_eq(theirs, ours),
        // An HTTP-date (or garbage): we have no Last-Modified to compare it with.
        _ => false,
    }
}

#[cfg(test)]
mod tests;
