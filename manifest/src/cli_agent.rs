//! `sitecast-manifest sign-agent` and the agent half of `verify`: agent releases from build
//! directories, one per platform.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Args;
use jiff::{Timestamp, ToSpan};
use sitecast_manifest::{
    AgentBuild, AgentFile, AgentPolicy, AgentRelease, ImageDigest, Intent, OsReleases, TrustedRoot,
    VerifiedAgentRelease,
};

#[derive(Args)]
pub(crate) struct SignAgentArgs {
    /// A platform's build as PLATFORM=DIR (repeat per platform): every regular file under DIR
    /// is a file of the build, executable if its mode says so; symbolic links are refused.
    #[arg(long = "build", required = true)]
    builds: Vec<String>,
    /// The file the launcher starts, relative to each build's DIR.
    #[arg(long, default_value = "bin/sitecast-peer")]
    entry: String,
    /// Monotonic agent version.
    #[arg(long)]
    version: u64,
    /// Display name; defaults to the version number.
    #[arg(long)]
    name: Option<String>,
    /// The oldest OS release this agent runs on.
    #[arg(long, default_value_t = 0)]
    os_min: u64,
    /// The newest OS release this agent runs on (default: every later one).
    #[arg(long)]
    os_max: Option<u64>,
    #[arg(long, default_value = "")]
    notes: String,
    #[arg(long, default_value_t = 90)]
    expires_days: i64,
    #[command(flatten)]
    signing: crate::Signing,
}

pub(crate) fn sign_agent(args: SignAgentArgs) -> Result<()> {
    let keys = args.signing.secret_keys()?;
    let mut builds = Vec::new();
    for build in &args.builds {
        let Some((platform, dir)) = build.split_once('=') else {
            bail!("--build {build:?}: expected PLATFORM=DIR");
        };
        let files = files_under(Path::new(dir))?;
        builds.push(AgentBuild { platform: platform.into(), entry: args.entry.clone(), files });
    }
    let now = Timestamp::now();
    let release = AgentRelease {
        version: args.version,
        version_name: args.name.unwrap_or_else(|| args.version.to_string()),
        builds,
        os_releases: OsReleases { min: args.os_min, max: args.os_max },
        notes: args.notes,
        created: now,
        expires: now + (args.expires_days * 24).hours(),
    };
    // What every appliance would refuse is refused here, with or without --root.
    release.check().context("the agent release")?;
    let bytes = release.sign(&keys.iter().collect::<Vec<_>>()).to_bytes();
    // With the root, the signatures too (enough keys, the right ones).
    args.signing.verify_and_write(&bytes, |root, bytes| {
        root.verify_agent_release(bytes, now)?;
        Ok(())
    })?;
    let files: usize = release.builds.iter().map(|b| b.files.len()).sum();
    println!(
        "signed agent release {} ({} platform(s), {files} files) -> {}",
        release.version,
        release.builds.len(),
        args.signing.out.display()
    );
    Ok(())
}

/// Every regular file under `dir`, by path relative to it (sorted), hashed.
fn files_under(dir: &Path) -> Result<Vec<AgentFile>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current)
            .with_context(|| format!("reading {}", current.display()))?;
        for entry in entries {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let relative = path.strip_prefix(dir).expect("under dir");
                let Some(relative) = relative.to_str() else {
                    bail!("{}: not a UTF-8 path", path.display());
                };
                found.insert(relative.to_owned(), (path.clone(), meta));
            } else {
                bail!("{}: only regular files and directories go into a build", path.display());
            }
        }
    }
    if found.is_empty() {
        bail!("{}: no files", dir.display());
    }
    found
        .into_iter()
        .map(|(relative, (path, meta))| {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let digest = ImageDigest::of_reader(file)
                .with_context(|| format!("hashing {}", path.display()))?;
            Ok(AgentFile {
                path: relative,
                size: digest.size,
                blake3: digest.blake3,
                sha256: digest.sha256,
                executable: meta.permissions().mode() & 0o111 != 0,
            })
        })
        .collect()
}

/// `verify` for an agent release: the signatures and fields, then for one appliance if
/// `platform` is given, then a build directory's files against the manifest if `dir` is.
pub(crate) fn verify_agent(
    root: &TrustedRoot,
    bytes: &[u8],
    now: Timestamp,
    platform: Option<String>,
    os_release: u64,
    installed: u64,
    dir: Option<&Path>,
) -> Result<()> {
    let verified = root.verify_agent_release(bytes, now).context("agent manifest")?;
    if let Some(platform) = platform {
        let policy = AgentPolicy {
            platform,
            os_release,
            installed_version: installed,
            intent: Intent::Upgrade,
        };
        let build = verified.build_for(&policy).context("appliance policy")?;
        if let Some(dir) = dir {
            check_files(build, dir)?;
        }
    } else if dir.is_some() {
        bail!("--dir needs --platform: which build to check it against");
    }
    report(&verified);
    Ok(())
}

fn check_files(build: &AgentBuild, dir: &Path) -> Result<()> {
    for file in &build.files {
        let path = dir.join(&file.path);
        let found =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let expected = sitecast_manifest::ImageInfo {
            size: file.size,
            blake3: file.blake3,
            sha256: file.sha256,
        };
        ImageDigest::check(found, &expected).with_context(|| format!("file {}", file.path))?;
    }
    Ok(())
}

fn report(verified: &VerifiedAgentRelease) {
    let release = verified.release();
    let platforms: Vec<&str> = release.builds.iter().map(|b| b.platform.as_str()).collect();
    println!(
        "OK: agent release {} ({}) verified; platforms {}",
        release.version,
        release.version_name,
        platforms.join(", ")
    );
}
