//! The local demo: what a fresh machine runs first.
//!
//! Today it shows the release flow up to a verified, signed manifest: keys, a root of trust, a
//! generated image, the signature and the checks an appliance makes. The site swarm part
//! (coordinator, appliances, origin offload) is not built yet and the demo says so.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use jiff::{Timestamp, ToSpan};
use sitecast_manifest::{
    ImageDigest, ImageInfo, InstallPolicy, Intent, Release, RoleKeys, Root, SecretKey, TrustedRoot,
    VerifyError,
};

/// What the demo made and measured.
#[derive(Debug)]
pub struct DemoReport {
    pub work_dir: PathBuf,
    pub image_bytes: u64,
    pub manifest: PathBuf,
    pub hash_seconds: f64,
}

/// Runs the release flow in `work_dir`, narrating to `out`.
pub fn run(work_dir: &Path, image_mib: u64, out: &mut impl Write) -> anyhow::Result<DemoReport> {
    fs::create_dir_all(work_dir)?;
    let now = Timestamp::now();
    writeln!(out, "sitecast demo in {}", work_dir.display())?;

    let root_key = SecretKey::generate()?;
    let release_keys = [SecretKey::generate()?, SecretKey::generate()?];
    let root = Root {
        version: 1,
        expires: now + (24 * 365).hours(),
        root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
        release: RoleKeys {
            keys: release_keys.iter().map(SecretKey::public).collect(),
            threshold: 2,
        },
    };
    let root_bytes = root.sign(&[&root_key]).to_bytes();
    fs::write(work_dir.join("root.json"), &root_bytes)?;
    let trusted = TrustedRoot::pin(&root_bytes)?;
    writeln!(out, "1. root of trust: 1 root key, 2-of-2 release keys -> root.json")?;

    let image = work_dir.join("image-v2.raw");
    let image_bytes = image_mib * 1024 * 1024;
    sitecast_iso::generate::write_image(&image, image_bytes, "sitecast demo image")?;
    let started = Instant::now();
    let digest = ImageDigest::of_reader(File::open(&image)?)?;
    let hash_seconds = started.elapsed().as_secs_f64();
    writeln!(
        out,
        "2. image: {image_mib} MiB, BLAKE3 {} ({:.0} MiB/s with SHA-256 alongside)",
        digest.blake3,
        image_mib as f64 / hash_seconds
    )?;

    let release = Release {
        version: 2,
        version_name: "2026.11.2".into(),
        image: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
        platforms: vec!["x86_64-appliance".into()],
        notes: "demo release".into(),
        created: now,
        expires: now + (24 * 30).hours(),
        rollback_floor: Some(1),
    };
    let manifest_bytes = release.sign(&[&release_keys[0], &release_keys[1]]).to_bytes();
    let manifest = work_dir.join("manifest-v2.json");
    fs::write(&manifest, &manifest_bytes)?;
    writeln!(out, "3. signed by both release keys -> {}", manifest.display())?;

    let verified = trusted.verify_release(&manifest_bytes, Timestamp::now())?;
    let appliance = InstallPolicy {
        platform: "x86_64-appliance".into(),
        installed_version: 1,
        rollback_floor: 0,
        intent: Intent::Upgrade,
    };
    verified.check_install(&appliance)?;
    ImageDigest::check(File::open(&image)?, &verified.release().image)?;
    writeln!(out, "4. an appliance on version 1 verifies manifest and image: OK")?;

    let replay = InstallPolicy { installed_version: 2, ..appliance };
    let refused: VerifyError = verified.check_install(&replay).expect_err("replay is refused");
    writeln!(out, "5. the same manifest replayed to an appliance on version 2: {refused}")?;
    Ok(DemoReport { work_dir: work_dir.to_owned(), image_bytes, manifest, hash_seconds })
}
