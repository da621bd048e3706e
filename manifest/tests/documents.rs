//! Forward compatibility, field validation and root rotation.

mod common;

use common::*;
use jiff::ToSpan;
use serde_json::{Value, json};
use sitecast_manifest::*;

/// The failure that once left a fleet unable to update: a manifest from a newer writer, with
/// fields this reader has never heard of, at the top, inside `image`, and in the envelope.
#[test]
fn a_manifest_from_a_future_writer_is_accepted() {
    let f = Fixture::new(1);
    let mut signed = f.release(5).to_signed();
    signed.insert("delta_from".into(), json!({"version": 4, "blake3": "ab".repeat(32)}));
    signed.insert("min_agent".into(), json!("3.1"));
    signed.insert("weights".into(), json!([0.25, 1e-3]));
    signed["image"]["compression"] = json!("zstd");
    let document = SignedDocument::sign(signed, &[&f.release_keys[0]]);
    let mut envelope: Value = serde_json::from_slice(&document.to_bytes()).expect("json");
    envelope["transport_hint"] = json!("cdn");
    envelope["signatures"][0]["scheme"] = json!("ed25519");
    let bytes = serde_json::to_vec_pretty(&envelope).expect("json");

    let verified = f.root.verify_release(&bytes, f.now).expect("future manifest verifies");
    assert_eq!(verified.release(), &f.release(5));
    assert_eq!(verified.check_install(&f.appliance(4)), Ok(()));
    // The unknown fields are still there, and still signed, when it is passed on.
    let passed_on = verified.to_bytes();
    assert!(String::from_utf8_lossy(&passed_on).contains("\"compression\":\"zstd\""));
    assert!(f.root.verify_release(&passed_on, f.now).is_ok());

    // Changing an unknown field breaks the signature like any other.
    let tampered = String::from_utf8(passed_on).expect("utf8").replace("zstd", "gzip");
    assert_eq!(
        f.root.verify_release(tampered.as_bytes(), f.now),
        Err(VerifyError::BadSignature { role: Role::Release, key: f.release_keys[0].public() })
    );
}

#[test]
fn a_newer_major_format_is_named_not_misread() {
    let f = Fixture::new(1);
    let mut signed = f.release(5).to_signed();
    signed.insert("format".into(), json!(2));
    let bytes = SignedDocument::sign(signed, &[&f.release_keys[0]]).to_bytes();
    assert_eq!(
        f.root.verify_release(&bytes, f.now),
        Err(VerifyError::UnsupportedFormat { found: 2, supported: 1 })
    );
}

#[test]
fn size_and_hash_fields_are_checked() {
    let f = Fixture::new(1);
    let cases: [(&str, Value, &str); 6] = [
        ("size", json!(0), "image.size"),
        ("size", json!(-5), "image.size"),
        ("size", json!(MAX_IMAGE_BYTES + 1), "image.size"),
        ("size", json!("12"), "image.size"),
        ("blake3", json!("AB".repeat(32)), "image.blake3"),
        ("sha256", json!("ab".repeat(31)), "image.sha256"),
    ];
    for (name, value, field) in cases {
        let mut signed = f.release(5).to_signed();
        signed["image"][name] = value.clone();
        let bytes = SignedDocument::sign(signed, &[&f.release_keys[0]]).to_bytes();
        match f.root.verify_release(&bytes, f.now) {
            Err(VerifyError::InvalidField { field: got, .. }) => assert_eq!(got, field, "{value}"),
            other => panic!("{name}={value}: expected InvalidField, got {other:?}"),
        }
    }
    let mut floor_above = f.release(5);
    floor_above.rollback_floor = Some(6);
    assert!(matches!(
        f.root.verify_release(&f.signed(&floor_above, 1), f.now),
        Err(VerifyError::InvalidField { field: "rollback_floor", .. })
    ));
}

#[test]
fn malformed_documents_get_a_clear_error() {
    let f = Fixture::new(1);
    for bytes in [&b""[..], b"{", b"[]", b"{\"signed\":{}}", b"{\"signed\":[],\"signatures\":[]}"] {
        assert!(
            matches!(f.root.verify_release(bytes, f.now), Err(VerifyError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    let mut signed = f.release(5).to_signed();
    signed.remove("version");
    let bytes = SignedDocument::sign(signed, &[&f.release_keys[0]]).to_bytes();
    let error = f.root.verify_release(&bytes, f.now).expect_err("missing field");
    assert!(error.to_string().contains("version"), "{error}");
}

#[test]
fn root_rotation_needs_old_and_new_thresholds() {
    let f = Fixture::new(1);
    let new_root_keys: Vec<SecretKey> = (0..2).map(|_| key()).collect();
    let next = Root {
        version: 2,
        expires: f.now + (24 * 365).hours(),
        root: RoleKeys {
            keys: new_root_keys.iter().map(SecretKey::public).collect(),
            threshold: 2,
        },
        release: f.root.root().release.clone(),
    };
    let [old_a, old_b] = [&f.root_keys[0], &f.root_keys[1]];
    let [new_a, new_b] = [&new_root_keys[0], &new_root_keys[1]];

    let only_new = next.sign(&[new_a, new_b]).to_bytes();
    assert_eq!(
        f.root.rotate(&only_new),
        Err(VerifyError::UnknownKey { role: Role::Root, key: new_a.public() })
    );
    let one_old = next.sign(&[old_a, new_a, new_b]).to_bytes();
    assert_eq!(
        f.root.rotate(&one_old),
        Err(VerifyError::ThresholdNotMet { role: Role::Root, valid: 1, threshold: 2 })
    );
    let one_new = next.sign(&[old_a, old_b, new_a]).to_bytes();
    assert_eq!(
        f.root.rotate(&one_new),
        Err(VerifyError::ThresholdNotMet { role: Role::Root, valid: 1, threshold: 2 })
    );
    let skipping = Root { version: 3, ..next.clone() }.sign(&[old_a, old_b, new_a, new_b]);
    assert_eq!(
        f.root.rotate(&skipping.to_bytes()),
        Err(VerifyError::RootVersion { expected: 2, found: 3 })
    );

    let rotated = f.root.rotate(&next.sign(&[old_a, old_b, new_a, new_b]).to_bytes()).expect("ok");
    assert_eq!(rotated.root().version, 2);
    // The rotated root, pinned from its own bytes, still trusts the same release keys.
    let pinned = TrustedRoot::pin(&rotated.to_bytes()).expect("self-signed");
    assert!(pinned.verify_release(&f.signed(&f.release(5), 1), f.now).is_ok());
}

#[test]
fn a_root_with_an_impossible_threshold_is_refused() {
    let k = key();
    let root = Root {
        version: 1,
        expires: "2030-01-01T00:00:00Z".parse().expect("ts"),
        root: RoleKeys { keys: vec![k.public()], threshold: 2 },
        release: RoleKeys { keys: vec![k.public()], threshold: 1 },
    };
    assert!(matches!(
        TrustedRoot::pin(&root.sign(&[&k]).to_bytes()),
        Err(VerifyError::InvalidField { field: "root", .. })
    ));
    let twice =
        Root { root: RoleKeys { keys: vec![k.public(), k.public()], threshold: 1 }, ..root };
    assert!(matches!(
        TrustedRoot::pin(&twice.sign(&[&k]).to_bytes()),
        Err(VerifyError::InvalidField { field: "root", .. })
    ));
}
