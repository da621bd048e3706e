//! One test per attack from the TUF specification that applies to one signed manifest plus its
//! root. Each asserts the precise error.

mod common;

use std::io::{self, Read};

use common::*;
use jiff::ToSpan;
use sitecast_manifest::*;

/// Arbitrary installation: an image or manifest nobody trusted signed.
#[test]
fn arbitrary_installation_is_refused() {
    let f = Fixture::new(1);
    let release = f.release(5);

    let unsigned = SignedDocument::sign(release.to_signed(), &[]).to_bytes();
    assert_eq!(
        f.root.verify_release(&unsigned, f.now),
        Err(VerifyError::ThresholdNotMet { role: Role::Release, valid: 0, threshold: 1 })
    );

    let attacker = key();
    let forged = release.sign(&[&attacker]).to_bytes();
    assert_eq!(
        f.root.verify_release(&forged, f.now),
        Err(VerifyError::UnknownKey { role: Role::Release, key: attacker.public() })
    );

    // A genuine manifest with an attacker's image behind it.
    let verified = f.root.verify_release(&f.signed(&release, 1), f.now).expect("genuine");
    let mut evil = f.image.clone();
    evil[4096] ^= 1;
    let error = ImageDigest::check(&evil[..], &verified.release().image).expect_err("tampered");
    assert!(matches!(error, ImageError::Blake3Mismatch { .. }), "{error}");
}

/// Rollback: an old, genuinely signed manifest replayed to an appliance that moved on.
#[test]
fn rollback_and_replay_are_refused() {
    let f = Fixture::new(1);
    let old = f.root.verify_release(&f.signed(&f.release(4), 1), f.now).expect("genuine");
    assert_eq!(
        old.check_install(&f.appliance(5)),
        Err(VerifyError::NotNewer { version: 4, installed: 5 })
    );
    assert_eq!(
        old.check_install(&f.appliance(4)),
        Err(VerifyError::NotNewer { version: 4, installed: 4 })
    );

    // Even an operator-ordered rollback stops at the floor a newer release set.
    let mut rollback = f.appliance(9);
    rollback.intent = Intent::Rollback;
    rollback.rollback_floor = 6;
    assert_eq!(
        old.check_install(&rollback),
        Err(VerifyError::BelowRollbackFloor { version: 4, floor: 6 })
    );
    rollback.rollback_floor = 4;
    assert_eq!(old.check_install(&rollback), Ok(()));
}

/// Indefinite freeze: a stale manifest (or a stale root) served forever.
#[test]
fn freeze_is_refused_after_expiry() {
    let f = Fixture::new(1);
    let release = f.release(5);
    let bytes = f.signed(&release, 1);
    let later = release.expires + 1.second();
    assert_eq!(
        f.root.verify_release(&bytes, later),
        Err(VerifyError::Expired { expires: release.expires, now: later })
    );
    assert_eq!(
        f.root.verify_release(&bytes, release.expires),
        Err(VerifyError::Expired { expires: release.expires, now: release.expires })
    );

    let root_expiry = f.root.root().expires;
    assert_eq!(
        f.root.verify_release(&bytes, root_expiry),
        Err(VerifyError::RootExpired { version: 1, expires: root_expiry, now: root_expiry })
    );
}

/// Fast-forward: a huge version number signed below threshold would lock out every later
/// release. It is refused, and the genuine next release still installs.
#[test]
fn fast_forward_needs_the_threshold() {
    let f = Fixture::new(2);
    let mut forward = f.release(u64::MAX);
    forward.version_name = "forever".into();
    assert_eq!(
        f.root.verify_release(&f.signed(&forward, 1), f.now),
        Err(VerifyError::ThresholdNotMet { role: Role::Release, valid: 1, threshold: 2 })
    );
    let next = f.root.verify_release(&f.signed(&f.release(6), 2), f.now).expect("genuine");
    assert_eq!(next.check_install(&f.appliance(5)), Ok(()));
}

/// Mix-and-match: a manifest for other hardware, a key of another root, or signatures lifted
/// from one manifest onto another.
#[test]
fn mix_and_match_is_refused() {
    let f = Fixture::new(1);
    let mut other_hardware = f.release(5);
    other_hardware.platforms = vec!["arm64-kiosk".into()];
    let verified = f.root.verify_release(&f.signed(&other_hardware, 1), f.now).expect("signed");
    assert_eq!(
        verified.check_install(&f.appliance(4)),
        Err(VerifyError::WrongPlatform {
            platform: PLATFORM.into(),
            supported: vec!["arm64-kiosk".into()]
        })
    );

    let other_fleet = Fixture::new(1);
    let foreign = other_fleet.signed(&other_fleet.release(5), 1);
    assert_eq!(
        f.root.verify_release(&foreign, f.now),
        Err(VerifyError::UnknownKey {
            role: Role::Release,
            key: other_fleet.release_keys[0].public()
        })
    );

    let genuine = SignedDocument::parse(&f.signed(&f.release(5), 1)).expect("parse");
    let mut spliced = SignedDocument::sign(f.release(6).to_signed(), &[]).to_bytes();
    spliced = splice_signatures(&spliced, &genuine);
    assert_eq!(
        f.root.verify_release(&spliced, f.now),
        Err(VerifyError::BadSignature { role: Role::Release, key: f.release_keys[0].public() })
    );
}

fn splice_signatures(target: &[u8], donor: &SignedDocument) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(target).expect("json");
    value["signatures"] = serde_json::to_value(donor.signatures()).expect("signatures");
    serde_json::to_vec(&value).expect("json")
}

/// Key compromise below threshold: one stolen key of a 2-of-3 set cannot sign alone, and
/// repeating its signature does not count twice.
#[test]
fn one_compromised_key_is_not_enough() {
    let f = Fixture::new(2);
    let release = f.release(5);
    let stolen = &f.release_keys[2];
    let mut document = release.sign(&[stolen]);
    assert_eq!(
        f.root.verify_release(&document.to_bytes(), f.now),
        Err(VerifyError::ThresholdNotMet { role: Role::Release, valid: 1, threshold: 2 })
    );
    let entry = document.signatures()[0].clone();
    let mut value: serde_json::Value = serde_json::from_slice(&document.to_bytes()).expect("json");
    value["signatures"] = serde_json::to_value([&entry, &entry]).expect("json");
    assert_eq!(
        f.root.verify_release(&serde_json::to_vec(&value).expect("json"), f.now),
        Err(VerifyError::ThresholdNotMet { role: Role::Release, valid: 1, threshold: 2 })
    );
    // Root keys are not release keys.
    document = release.sign(&[&f.root_keys[0], &f.root_keys[1]]);
    assert_eq!(
        f.root.verify_release(&document.to_bytes(), f.now),
        Err(VerifyError::UnknownKey { role: Role::Release, key: f.root_keys[0].public() })
    );
    document.add_signature(&f.release_keys[0]);
    document.add_signature(&f.release_keys[1]);
    assert!(f.root.verify_release(&document.to_bytes(), f.now).is_ok());
}

/// Wrong software installation: a signed document of the wrong kind, or for other hardware.
#[test]
fn wrong_software_is_refused() {
    let f = Fixture::new(1);
    let root_bytes = f.root.to_bytes();
    assert_eq!(
        f.root.verify_release(&root_bytes, f.now),
        Err(VerifyError::WrongDocumentType { expected: RELEASE_TYPE, found: ROOT_TYPE.into() })
    );
    let release_bytes = f.signed(&f.release(5), 1);
    assert_eq!(
        TrustedRoot::pin(&release_bytes),
        Err(VerifyError::WrongDocumentType { expected: ROOT_TYPE, found: RELEASE_TYPE.into() })
    );
    let verified = f.root.verify_release(&release_bytes, f.now).expect("genuine");
    let mut kiosk = f.appliance(1);
    kiosk.platform = "arm64-kiosk".into();
    assert!(matches!(verified.check_install(&kiosk), Err(VerifyError::WrongPlatform { .. })));
}

/// Endless data: an oversized manifest is refused unread, and an image longer than declared is
/// refused after one byte past its declared size.
#[test]
fn endless_data_is_refused_without_reading_it_all() {
    let f = Fixture::new(1);
    let huge = vec![b' '; MAX_DOCUMENT_BYTES + 1];
    assert_eq!(
        f.root.verify_release(&huge, f.now),
        Err(VerifyError::TooLarge { limit: MAX_DOCUMENT_BYTES })
    );

    let verified = f.root.verify_release(&f.signed(&f.release(5), 1), f.now).expect("genuine");
    let declared = verified.release().image.size;
    let mut endless = CountingReader { inner: io::repeat(7), read: 0 };
    let error = ImageDigest::check(&mut endless, &verified.release().image).expect_err("endless");
    assert!(matches!(error, ImageError::TooLarge { declared: d } if d == declared), "{error}");
    assert_eq!(endless.read, declared + 1);

    let mut longer = f.image.clone();
    longer.push(0);
    assert!(matches!(
        ImageDigest::check(&longer[..], &verified.release().image),
        Err(ImageError::TooLarge { .. })
    ));
    assert!(matches!(
        ImageDigest::check(&f.image[..100], &verified.release().image),
        Err(ImageError::TooShort { actual: 100, .. })
    ));
}

struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}
