//! Agent release manifests (`sitecast.agent`): signed by the release keys, refused when forged,
//! passed off as an image release, malformed, or not for this appliance.

mod common;

use common::*;
use jiff::ToSpan;
use serde_json::{Value, json};
use sitecast_manifest::*;

fn file(path: &str, contents: &[u8], executable: bool) -> AgentFile {
    let digest = ImageDigest::of_reader(contents).expect("in memory");
    AgentFile {
        path: path.into(),
        size: digest.size,
        blake3: digest.blake3,
        sha256: digest.sha256,
        executable,
    }
}

fn agent_release(f: &Fixture, version: u64) -> AgentRelease {
    AgentRelease {
        version,
        version_name: format!("1.{version}"),
        builds: vec![AgentBuild {
            platform: PLATFORM.into(),
            entry: "bin/sitecast-peer".into(),
            files: vec![
                file("bin/sitecast-peer", b"\x7fELF agent", true),
                file("share/agent.toml.example", b"# example", false),
            ],
        }],
        os_releases: OsReleases { min: 3, max: Some(9) },
        notes: String::new(),
        created: f.now - 1.hour(),
        expires: f.now + 24.hours(),
    }
}

fn policy(os_release: u64, installed_version: u64) -> AgentPolicy {
    AgentPolicy {
        platform: PLATFORM.into(),
        os_release,
        installed_version,
        intent: Intent::Upgrade,
    }
}

fn signed(f: &Fixture, signed: Value) -> Vec<u8> {
    let Value::Object(signed) = signed else { panic!("an object") };
    SignedDocument::sign(signed, &[&f.release_keys[0]]).to_bytes()
}

#[test]
fn a_signed_agent_release_verifies_and_names_the_build_for_this_appliance() {
    let f = Fixture::new(1);
    let release = agent_release(&f, 4);
    let bytes = release.sign(&[&f.release_keys[0]]).to_bytes();
    let verified = f.root.verify_agent_release(&bytes, f.now).expect("genuine");
    assert_eq!(verified.release(), &release);
    assert_eq!(verified.to_bytes(), bytes);

    let build = verified.build_for(&policy(5, 3)).expect("for this appliance");
    assert_eq!(build.entry, "bin/sitecast-peer");
    assert_eq!(
        verified.build_for(&AgentPolicy { platform: "arm64-box".into(), ..policy(5, 3) }),
        Err(VerifyError::WrongPlatform {
            platform: "arm64-box".into(),
            supported: vec![PLATFORM.into()]
        })
    );
    assert_eq!(
        verified.build_for(&policy(10, 3)),
        Err(VerifyError::OsReleaseNotSupported { os_release: 10, min: 3, max: Some(9) })
    );
    assert_eq!(
        verified.build_for(&policy(2, 3)),
        Err(VerifyError::OsReleaseNotSupported { os_release: 2, min: 3, max: Some(9) })
    );
    assert_eq!(
        verified.build_for(&policy(5, 4)),
        Err(VerifyError::NotNewer { version: 4, installed: 4 })
    );
    // An operator-ordered rollback of the agent may go back.
    let back = AgentPolicy { intent: Intent::Rollback, ..policy(5, 6) };
    assert!(verified.build_for(&back).is_ok());
}

#[test]
fn forged_replayed_or_passed_off_documents_are_refused() {
    let f = Fixture::new(1);
    let release = agent_release(&f, 4);

    let attacker = key();
    let forged = release.sign(&[&attacker]).to_bytes();
    assert_eq!(
        f.root.verify_agent_release(&forged, f.now),
        Err(VerifyError::UnknownKey { role: Role::Release, key: attacker.public() })
    );
    // Root keys sign roots, not agents.
    let by_root_key = release.sign(&[&f.root_keys[0]]).to_bytes();
    assert!(matches!(
        f.root.verify_agent_release(&by_root_key, f.now),
        Err(VerifyError::UnknownKey { role: Role::Release, .. })
    ));

    let genuine = release.sign(&[&f.release_keys[0]]).to_bytes();
    let mut changed = String::from_utf8(genuine.clone()).expect("utf8");
    changed = changed.replace("\"version\":4", "\"version\":5");
    assert!(matches!(
        f.root.verify_agent_release(changed.as_bytes(), f.now),
        Err(VerifyError::BadSignature { .. })
    ));

    // An image release is not an agent release, and the other way round.
    let image_release = f.signed(&f.release(4), 1);
    assert_eq!(
        f.root.verify_agent_release(&image_release, f.now),
        Err(VerifyError::WrongDocumentType { expected: AGENT_TYPE, found: RELEASE_TYPE.into() })
    );
    assert_eq!(
        f.root.verify_release(&genuine, f.now),
        Err(VerifyError::WrongDocumentType { expected: RELEASE_TYPE, found: AGENT_TYPE.into() })
    );

    let later = f.now + 25.hours();
    assert!(matches!(
        f.root.verify_agent_release(&genuine, later),
        Err(VerifyError::Expired { .. })
    ));
}

#[test]
fn fields_a_newer_writer_adds_are_ignored_and_still_signed() {
    let f = Fixture::new(1);
    let mut document = Value::Object(agent_release(&f, 4).to_signed());
    document["rollout_hint"] = json!({"canary": true});
    document["builds"][0]["files"][0]["selinux_label"] = json!("system_u:object_r:bin_t");
    document["builds"][0]["signature_scheme"] = json!("none");
    let verified = f.root.verify_agent_release(&signed(&f, document), f.now).expect("newer writer");
    assert_eq!(verified.release(), &agent_release(&f, 4));
}

#[test]
fn malformed_builds_are_refused_naming_the_field() {
    let f = Fixture::new(1);
    let base = Value::Object(agent_release(&f, 4).to_signed());
    let field_of = |edit: &dyn Fn(&mut Value)| {
        let mut document = base.clone();
        edit(&mut document);
        match f.root.verify_agent_release(&signed(&f, document), f.now) {
            Err(VerifyError::InvalidField { field, reason }) => (field, reason),
            other => panic!("not refused as invalid: {other:?}"),
        }
    };
    for bad in ["../etc/passwd", "/usr/bin/x", "bin//x", "bin/./x", "", "bin\\x"] {
        let (field, reason) = field_of(&|d| d["builds"][0]["files"][1]["path"] = json!(bad));
        assert_eq!(field, "builds.files.path", "{bad:?}: {reason}");
    }
    // A file, and a file inside it as if it were a directory.
    let (field, _) =
        field_of(&|d| d["builds"][0]["files"][1]["path"] = json!("bin/sitecast-peer/x"));
    assert_eq!(field, "builds.files.path");
    let (field, _) = field_of(&|d| d["builds"][0]["files"][1]["path"] = json!("bin/sitecast-peer"));
    assert_eq!(field, "builds.files.path");
    let (field, _) = field_of(&|d| d["builds"][0]["entry"] = json!("share/agent.toml.example"));
    assert_eq!(field, "builds.entry", "the entry must be executable");
    let (field, _) = field_of(&|d| d["builds"][0]["entry"] = json!("bin/missing"));
    assert_eq!(field, "builds.entry");
    let (field, _) = field_of(&|d| d["builds"][0]["files"] = json!([]));
    assert_eq!(field, "builds.files");
    let (field, _) =
        field_of(&|d| d["builds"][0]["files"][0]["size"] = json!(MAX_AGENT_FILE_BYTES + 1));
    assert_eq!(field, "builds.files.size");
    let (field, _) = field_of(&|d| d["builds"][0]["files"][0]["blake3"] = json!("00ff"));
    assert_eq!(field, "builds.files.blake3");
    let (field, _) = field_of(&|d| {
        let build = d["builds"][0].clone();
        d["builds"].as_array_mut().expect("array").push(build);
    });
    assert_eq!(field, "builds.platform");
    let (field, _) = field_of(&|d| d["builds"] = json!([]));
    assert_eq!(field, "builds");
    let (field, _) = field_of(&|d| d["os_releases"] = json!({"min": 5, "max": 4}));
    assert_eq!(field, "os_releases");
}
