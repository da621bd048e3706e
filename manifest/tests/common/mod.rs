//! A small fleet's worth of keys, a root and a release to attack.
#![allow(dead_code, unreachable_pub)]

use jiff::{Timestamp, ToSpan};
use sitecast_manifest::*;

pub const PLATFORM: &str = "x86_64-appliance-v2";

pub struct Fixture {
    pub now: Timestamp,
    pub root_keys: Vec<SecretKey>,
    pub release_keys: Vec<SecretKey>,
    pub root: TrustedRoot,
    pub image: Vec<u8>,
}

impl Fixture {
    /// A root with `release_threshold` of three release keys.
    pub fn new(release_threshold: u32) -> Self {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().expect("timestamp");
        let root_keys: Vec<SecretKey> = (0..2).map(|_| key()).collect();
        let release_keys: Vec<SecretKey> = (0..3).map(|_| key()).collect();
        let root = Root {
            version: 1,
            expires: now + (24 * 365).hours(),
            root: RoleKeys {
                keys: root_keys.iter().map(SecretKey::public).collect(),
                threshold: 2,
            },
            release: RoleKeys {
                keys: release_keys.iter().map(SecretKey::public).collect(),
                threshold: release_threshold,
            },
        };
        let signers: Vec<&SecretKey> = root_keys.iter().collect();
        let root = TrustedRoot::pin(&root.sign(&signers).to_bytes()).expect("fixture root");
        let image = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        Self { now, root_keys, release_keys, root, image }
    }

    pub fn release(&self, version: u64) -> Release {
        let digest = ImageDigest::of_reader(&self.image[..]).expect("in-memory image");
        Release {
            version,
            version_name: format!("2026.11.{version}"),
            image: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
            platforms: vec![PLATFORM.into()],
            notes: "fixes".into(),
            created: self.now - 1.hour(),
            expires: self.now + (24 * 30).hours(),
            rollback_floor: None,
            index: None,
        }
    }

    /// `release` signed by the first `signers` release keys.
    pub fn signed(&self, release: &Release, signers: usize) -> Vec<u8> {
        let keys: Vec<&SecretKey> = self.release_keys.iter().take(signers).collect();
        release.sign(&keys).to_bytes()
    }

    pub fn appliance(&self, installed_version: u64) -> InstallPolicy {
        InstallPolicy {
            platform: PLATFORM.into(),
            installed_version,
            rollback_floor: 0,
            intent: Intent::Upgrade,
        }
    }
}

pub fn key() -> SecretKey {
    SecretKey::generate().expect("os randomness")
}
