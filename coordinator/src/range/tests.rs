use axum::http::HeaderValue;
use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
use proptest::strategy::{Just, Strategy};

use super::*;

const ETAG: &str = "\"0123abcd\"";

fn range(value: &str, size: u64) -> RangeDecision {
    decide(Some(value), None, ETAG, size)
}

fn partial(start: u64, end: u64) -> RangeDecision {
    RangeDecision::Partial(start..end)
}

#[test]
fn no_range_is_the_whole_representation() {
    assert_eq!(decide(None, None, ETAG, 100), RangeDecision::Full);
    // If-Range without Range means nothing (§13.1.5).
    assert_eq!(decide(None, Some(ETAG), ETAG, 100), RangeDecision::Full);
}

#[test]
fn closed_open_ended_and_suffix_ranges() {
    assert_eq!(range("bytes=0-9", 100), partial(0, 10));
    assert_eq!(range("bytes=10-10", 100), partial(10, 11));
    assert_eq!(range("bytes=90-", 100), partial(90, 100));
    assert_eq!(range("bytes=0-", 100), partial(0, 100));
    assert_eq!(range("bytes=-10", 100), partial(90, 100));
    assert_eq!(range("bytes=99-99", 100), partial(99, 100));
}

#[test]
fn the_unit_is_case_insensitive() {
    assert_eq!(range("Bytes=0-9", 100), partial(0, 10));
    assert_eq!(range("BYTES=0-9", 100), partial(0, 10));
}

#[test]
fn an_unknown_unit_is_ignored() {
    assert_eq!(range("items=0-9", 100), RangeDecision::Full);
    assert_eq!(range("bytesx=0-9", 100), RangeDecision::Full);
    assert_eq!(range("0-9", 100), RangeDecision::Full);
}

#[test]
fn invalid_syntax_is_ignored_not_refused() {
    for value in [
        "bytes=",
        "bytes=,",
        "bytes= , ,",
        "bytes=-",
        "bytes=+0-+9",
        "bytes=0-+9",
        "bytes=-+5",
        "bytes=-5-",
        "bytes=0x10-20",
        "bytes=a-b",
        "bytes=1.5-2",
        "bytes=9-0",
        "bytes=5-4",
        "bytes=0-9-10",
        "bytes=0-9,x",
        "bytes=0-1,5-3",
        "bytes 0-9",
        "bytes =0-9",
        "=0-9",
        "",
    ] {
        assert_eq!(range(value, 100), RangeDecision::Full, "{value:?}");
        // Even where no range would have been satisfiable: invalid wins over unsatisfiable.
        assert_eq!(range(value, 0), RangeDecision::Full, "{value:?} on an empty body");
    }
}

#[test]
fn whitespace_around_elements_and_dashes_is_tolerated() {
    assert_eq!(range("bytes= 0-9", 100), partial(0, 10));
    assert_eq!(range("bytes=0-9 ", 100), partial(0, 10));
    assert_eq!(range("bytes=\t0 - 9\t", 100), partial(0, 10));
    assert_eq!(range("  bytes=-5  ", 100), partial(95, 100));
    assert_eq!(range("bytes=0-4 , 5-9", 100), partial(0, 10));
    // Inside a number is not whitespace but garbage.
    assert_eq!(range("bytes=1 0-20", 100), RangeDecision::Full);
}

#[test]
fn an_end_beyond_the_size_is_clamped() {
    assert_eq!(range("bytes=50-1000", 100), partial(50, 100));
    assert_eq!(range("bytes=0-99999999999999999999999999", 100), partial(0, 100));
    assert_eq!(range("bytes=-1000", 100), partial(0, 100));
    assert_eq!(range("bytes=-99999999999999999999999999", 100), partial(0, 100));
    assert_eq!(range(&format!("bytes=0-{}", u64::MAX), u64::MAX), partial(0, u64::MAX));
}

#[test]
fn a_start_at_or_beyond_the_size_is_not_satisfiable() {
    assert_eq!(range("bytes=100-", 100), RangeDecision::NotSatisfiable);
    assert_eq!(range("bytes=100-200", 100), RangeDecision::NotSatisfiable);
    assert_eq!(range("bytes=99999999999999999999999-", 100), RangeDecision::NotSatisfiable);
    assert_eq!(range("bytes=-0", 100), RangeDecision::NotSatisfiable);
    assert_eq!(range("bytes=200-300,100-", 100), RangeDecision::NotSatisfiable);
    // One satisfiable range among unsatisfiable ones is served.
    assert_eq!(range("bytes=200-300,5-9,-0", 100), partial(5, 10));
}

#[test]
fn zero_size_bodies() {
    assert_eq!(range("bytes=0-", 0), RangeDecision::NotSatisfiable);
    assert_eq!(range("bytes=0-0", 0), RangeDecision::NotSatisfiable);
    assert_eq!(range("bytes=-0", 0), RangeDecision::NotSatisfiable);
    // The RFC calls a non-zero suffix satisfiable, but it selects nothing: send the (empty) whole.
    assert_eq!(range("bytes=-5", 0), RangeDecision::Full);
}

#[test]
fn several_ranges_collapse_or_fall_back_to_the_whole() {
    // Overlapping and adjacent ranges merge into one, served as a single part.
    assert_eq!(range("bytes=0-9,5-19", 100), partial(0, 20));
    assert_eq!(range("bytes=0-9,10-19", 100), partial(0, 20));
    assert_eq!(range("bytes=10-19,0-9", 100), partial(0, 20));
    assert_eq!(range("bytes=0-9,0-9,0-9", 100), partial(0, 10));
    assert_eq!(range("bytes=-10,80-", 100), partial(80, 100));
    assert_eq!(range("bytes=0-1,,2-3", 100), partial(0, 4));
    // Disjoint ranges would need multipart/byteranges, which we do not send.
    assert_eq!(range("bytes=0-9,20-29", 100), RangeDecision::Full);
    assert_eq!(range("bytes=0-0,-1", 100), RangeDecision::Full);
}

#[test]
fn if_range_honours_the_range_only_for_a_strong_match() {
    assert_eq!(decide(Some("bytes=0-9"), Some(ETAG), ETAG, 100), partial(0, 10));
    assert_eq!(decide(Some("bytes=0-9"), Some(" \"0123abcd\" "), ETAG, 100), partial(0, 10));
    for validator in [
        "\"other\"",
        "W/\"0123abcd\"",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "*",
        "\"0123abcd\", \"other\"",
        "",
    ] {
        assert_eq!(
            decide(Some("bytes=0-9"), Some(validator), ETAG, 100),
            RangeDecision::Full,
            "{validator:?}"
        );
    }
    // A weak current tag can never satisfy If-Range.
    assert_eq!(decide(Some("bytes=0-9"), Some("W/\"x\""), "W/\"x\"", 100), RangeDecision::Full);
    // A stale client copy gets the whole image, even when its range was unsatisfiable.
    assert_eq!(decide(Some("bytes=500-"), Some("\"other\""), ETAG, 100), RangeDecision::Full);
}

#[test]
fn if_none_match_uses_weak_comparison_over_a_list() {
    assert!(!not_modified(None, ETAG));
    assert!(not_modified(Some(ETAG), ETAG));
    assert!(not_modified(Some("*"), ETAG));
    assert!(not_modified(Some(" * "), ETAG));
    assert!(not_modified(Some("W/\"0123abcd\""), ETAG));
    assert!(not_modified(Some("\"a\", \"0123abcd\""), ETAG));
    assert!(not_modified(Some("\"a\",W/\"0123abcd\",\"b\""), ETAG));
    assert!(not_modified(Some(",\"a\", ,\"0123abcd\","), ETAG));
    assert!(not_modified(Some(ETAG), "W/\"0123abcd\""));
    // Commas are legal inside a tag, so a naive split would be wrong.
    assert!(not_modified(Some("\"a,b\""), "\"a,b\""));
    assert!(!not_modified(Some("\"a,b\""), "\"a\""));

    assert!(!not_modified(Some("\"other\""), ETAG));
    assert!(!not_modified(Some("0123abcd"), ETAG));
    assert!(!not_modified(Some("w/\"0123abcd\""), ETAG));
    assert!(!not_modified(Some("\"0123abcd"), ETAG));
    assert!(!not_modified(Some(""), ETAG));
    // A malformed list matches nothing, even if a valid matching tag is in it.
    assert!(!not_modified(Some("\"0123abcd\" junk"), ETAG));
    assert!(!not_modified(Some("\"0123abcd\", *"), ETAG));
    assert!(!not_modified(Some("\"0123 abcd\""), "\"0123 abcd\""));
}

#[test]
fn if_match_uses_strong_comparison() {
    assert!(!precondition_failed(None, ETAG));
    assert!(!precondition_failed(Some("*"), ETAG));
    assert!(!precondition_failed(Some(ETAG), ETAG));
    assert!(!precondition_failed(Some("\"a\", \"0123abcd\""), ETAG));
    assert!(precondition_failed(Some("W/\"0123abcd\""), ETAG));
    assert!(precondition_failed(Some("\"other\""), ETAG));
    assert!(precondition_failed(Some("garbage"), ETAG));
}

#[test]
fn content_range_headers() {
    assert_eq!(content_range(&(0..10), 100), "bytes 0-9/100");
    assert_eq!(content_range(&(99..100), 100), "bytes 99-99/100");
    assert_eq!(unsatisfied_content_range(100), "bytes */100");
}

fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(name.clone(), HeaderValue::from_str(value).expect("test header"));
    }
    map
}

#[test]
fn evaluate_follows_the_rfc_precedence() {
    let get = &Method::GET;
    let eval = |method, pairs: &[(HeaderName, &str)]| evaluate(method, &headers(pairs), ETAG, 100);
    assert_eq!(eval(get, &[]), Outcome::Full);
    assert_eq!(eval(get, &[(header::RANGE, "bytes=0-9")]), Outcome::Partial(0..10));
    assert_eq!(eval(get, &[(header::RANGE, "bytes=200-")]), Outcome::NotSatisfiable);
    // If-None-Match beats Range.
    assert_eq!(
        eval(get, &[(header::RANGE, "bytes=0-9"), (header::IF_NONE_MATCH, "*")]),
        Outcome::NotModified
    );
    // If-Match beats If-None-Match.
    assert_eq!(
        eval(get, &[(header::IF_MATCH, "\"other\""), (header::IF_NONE_MATCH, ETAG)]),
        Outcome::PreconditionFailed
    );
    assert_eq!(
        eval(get, &[(header::IF_MATCH, ETAG), (header::RANGE, "bytes=0-9")]),
        Outcome::Partial(0..10)
    );
    assert_eq!(
        eval(get, &[(header::IF_RANGE, "\"old\""), (header::RANGE, "bytes=0-9")]),
        Outcome::Full
    );
    // HEAD: conditionals apply, Range does not (§14.2).
    assert_eq!(eval(&Method::HEAD, &[(header::IF_NONE_MATCH, ETAG)]), Outcome::NotModified);
    assert_eq!(eval(&Method::HEAD, &[(header::RANGE, "bytes=0-9")]), Outcome::Full);
    // A matching If-None-Match on an unsafe method is a failed precondition, not a 304.
    assert_eq!(eval(&Method::PUT, &[(header::IF_NONE_MATCH, "*")]), Outcome::PreconditionFailed);
}

#[test]
fn evaluate_joins_repeated_header_lines_into_one_list() {
    let map = headers(&[(header::IF_NONE_MATCH, "\"a\""), (header::IF_NONE_MATCH, ETAG)]);
    assert_eq!(evaluate(&Method::GET, &map, ETAG, 100), Outcome::NotModified);
    // Range is not a list of units: two lines are invalid, hence ignored.
    let map = headers(&[(header::RANGE, "bytes=0-9"), (header::RANGE, "bytes=20-29")]);
    assert_eq!(evaluate(&Method::GET, &map, ETAG, 100), Outcome::Full);
}

#[test]
fn evaluate_never_matches_bytes_that_are_not_ascii() {
    let mut map = HeaderMap::new();
    let value = HeaderValue::from_bytes(b"\"0123abcd\xff\"").expect("obs-text is a legal value");
    map.insert(header::IF_NONE_MATCH, value.clone());
    assert_eq!(evaluate(&Method::GET, &map, ETAG, 100), Outcome::Full);
    map.clear();
    map.insert(header::IF_MATCH, value);
    assert_eq!(evaluate(&Method::GET, &map, ETAG, 100), Outcome::PreconditionFailed);
}

/// Range-like strings: mostly well-formed specs, with the odd piece of noise.
fn range_header() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        (0u64..80).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("99999999999999999999999".to_owned()),
        Just(String::new()),
    ];
    let spec = (number.clone(), number, prop_oneof![Just(""), Just(" "), Just("+"), Just("-")])
        .prop_map(|(a, b, noise)| format!("{a}-{noise}{b}"));
    (
        prop_oneof![Just("bytes="), Just("Bytes="), Just("items="), Just("bytes ="), Just("")],
        prop::collection::vec(spec, 0..5),
        prop_oneof![Just(","), Just(", "), Just(",,")],
    )
        .prop_map(|(unit, specs, separator)| format!("{unit}{}", specs.join(separator)))
}

/// The bytes a valid single-range request selects, by marking bytes one at a time: an oracle that
/// shares no arithmetic with [`select`].
fn marked(specs: &[(Option<u64>, Option<u64>)], size: u64) -> Vec<bool> {
    let mut marks = vec![false; usize::try_from(size).expect("small size")];
    for (index, mark) in marks.iter_mut().enumerate() {
        let byte = index as u64;
        for spec in specs {
            *mark |= match *spec {
                (Some(first), Some(last)) => first <= byte && byte <= last,
                (Some(first), None) => first <= byte,
                (None, Some(suffix)) => byte + suffix >= size,
                (None, None) => unreachable!("not generated"),
            };
        }
    }
    marks
}

proptest! {
    #[test]
    fn any_input_never_panics_and_partials_are_in_bounds(
        value in prop_oneof![range_header(), ".*"],
        if_range in proptest::option::of(prop_oneof![Just(ETAG.to_owned()), ".*"]),
        size in prop_oneof![0u64..100, any::<u64>(), Just(u64::MAX)],
    ) {
        match decide(Some(&value), if_range.as_deref(), ETAG, size) {
            RangeDecision::Partial(range) => {
                prop_assert!(range.start < range.end, "{range:?} is empty");
                prop_assert!(range.end <= size, "{range:?} exceeds {size}");
                let header = content_range(&range, size);
                prop_assert!(header.starts_with("bytes "));
            }
            RangeDecision::Full | RangeDecision::NotSatisfiable => {}
        }
        let _ = not_modified(Some(&value), ETAG);
        let _ = precondition_failed(Some(&value), &value);
    }

    #[test]
    fn valid_ranges_select_exactly_the_requested_bytes(
        specs in prop::collection::vec(
            prop_oneof![
                (0u64..40, 0u64..40).prop_map(|(a, b)| (Some(a.min(b)), Some(a.max(b)))),
                (0u64..40).prop_map(|a| (Some(a), None)),
                (0u64..40).prop_map(|n| (None, Some(n))),
            ],
            1..4,
        ),
        size in 0u64..32,
    ) {
        let text: Vec<String> = specs
            .iter()
            .map(|spec| match *spec {
                (Some(a), Some(b)) => format!("{a}-{b}"),
                (Some(a), None) => format!("{a}-"),
                (None, Some(n)) => format!("-{n}"),
                (None, None) => unreachable!("not generated"),
            })
            .collect();
        let decision = range(&format!("bytes={}", text.join(",")), size);
        let marks = marked(&specs, size);
        // Runs of selected bytes, as start..end.
        let mut runs = Vec::new();
        let mut start = None;
        for (index, &mark) in marks.iter().chain([false].iter()).enumerate() {
            match (mark, start) {
                (true, None) => start = Some(index as u64),
                (false, Some(s)) => {
                    runs.push(s..index as u64);
                    start = None;
                }
                _ => {}
            }
        }
        let any_satisfiable_spec = specs.iter().any(|spec| match *spec {
            (Some(first), _) => first < size,
            (None, Some(suffix)) => suffix > 0,
            (None, None) => false,
        });
        let expected = match runs.as_slice() {
            [run] => RangeDecision::Partial(run.clone()),
            [] if !any_satisfiable_spec => RangeDecision::NotSatisfiable,
            _ => RangeDecision::Full,
        };
        prop_assert_eq!(decision, expected);
    }
}
