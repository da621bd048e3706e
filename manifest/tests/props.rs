//! Property tests: canonical round trips, tamper evidence, and a decoder that never panics.

mod common;

use std::sync::LazyLock;

use common::*;
use jiff::{Timestamp, ToSpan};
use proptest::prelude::*;
use serde_json::{Map, Value};
use sitecast_manifest::*;

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| Fixture::new(2));

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".*".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Releases with arbitrary text and numbers, plus fields from some future writer.
fn signed_release() -> impl Strategy<Value = Map<String, Value>> {
    (
        1u64..u64::MAX,
        ".{0,20}",
        prop::collection::vec("[a-z0-9_-]{1,12}", 1..4),
        ".{0,80}",
        0i64..(1 << 30),
        1i64..(1 << 30),
        prop::option::of(0u64..1000),
        prop::collection::btree_map("x_[a-z]{1,8}", json_value(), 0..3),
    )
        .prop_map(|(version, name, platforms, notes, created, lifetime, floor, extra)| {
            let created = Timestamp::from_second(created).expect("in range");
            let mut release = FIXTURE.release(version);
            release.version_name = name;
            release.platforms = platforms;
            release.notes = notes;
            release.created = created;
            release.expires = created + lifetime.seconds();
            release.rollback_floor = floor.map(|f| f.min(version));
            let mut signed = release.to_signed();
            signed.extend(extra);
            signed
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_decode_encode_is_identical(signed in signed_release()) {
        let keys: Vec<&SecretKey> = FIXTURE.release_keys.iter().take(2).collect();
        let bytes = SignedDocument::sign(signed, &keys).to_bytes();
        let decoded = SignedDocument::parse(&bytes).expect("own output parses");
        prop_assert_eq!(decoded.to_bytes(), bytes.clone());
        let created = Timestamp::from_second(0).expect("epoch");
        let verified = FIXTURE.root.verify_release(&bytes, created).expect("verifies");
        prop_assert_eq!(verified.to_bytes(), bytes.clone());
        let typed_again = verified.release().sign(&keys).to_bytes();
        let reparsed = FIXTURE.root.verify_release(&typed_again, created).expect("verifies");
        prop_assert_eq!(reparsed.release(), verified.release());
    }

    #[test]
    fn any_single_byte_change_fails_verification(
        signed in signed_release(),
        position in any::<prop::sample::Index>(),
        delta in 1u8..=255,
    ) {
        let keys: Vec<&SecretKey> = FIXTURE.release_keys.iter().take(2).collect();
        let mut bytes = SignedDocument::sign(signed, &keys).to_bytes();
        let epoch = Timestamp::from_second(0).expect("epoch");
        prop_assert!(FIXTURE.root.verify_release(&bytes, epoch).is_ok());
        let i = position.index(bytes.len());
        bytes[i] = bytes[i].wrapping_add(delta);
        let result = FIXTURE.root.verify_release(&bytes, epoch);
        prop_assert!(result.is_err(), "byte {} changed by {}: still verified", i, delta);
    }

    #[test]
    fn the_decoder_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = SignedDocument::parse(&bytes);
        let _ = FIXTURE.root.verify_release(&bytes, FIXTURE.now);
        let _ = TrustedRoot::pin(&bytes);
        let _ = FIXTURE.root.rotate(&bytes);
    }

    #[test]
    fn the_decoder_never_panics_on_damaged_documents(
        cut in any::<prop::sample::Index>(),
        splice in prop::collection::vec(any::<u8>(), 0..16),
        which in 0usize..2,
    ) {
        let genuine = match which {
            0 => FIXTURE.signed(&FIXTURE.release(3), 2),
            _ => FIXTURE.root.to_bytes(),
        };
        let at = cut.index(genuine.len());
        let mut bytes = genuine[..at].to_vec();
        bytes.extend(&splice);
        bytes.extend(&genuine[at..]);
        let _ = FIXTURE.root.verify_release(&bytes, FIXTURE.now);
        let _ = TrustedRoot::pin(&bytes);
    }
}
