//! `sitecast-manifest`: the offline operator tool for keys, roots and release manifests.

mod cli_agent;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use jiff::{Timestamp, ToSpan};
use serde_json::{Value, json};
use sitecast_manifest::{
    AGENT_TYPE, ContentIndex, ImageDigest, ImageInfo, InstallPolicy, Intent, PublicKey, Release,
    RoleKeys, Root, SecretKey, SignedDocument, TrustedRoot,
};

#[derive(Parser)]
#[command(
    name = "sitecast-manifest",
    version,
    about = "Sign and verify sitecast release manifests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write man pages and shell completions into DIR (for packagers).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Generate an ed25519 key pair: PATH (secret, mode 0600) and PATH.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Create or rotate the root of trust.
    #[command(subcommand)]
    Root(RootCommand),
    /// Hash an image (streamed) and write a signed release manifest.
    Sign(SignArgs),
    /// Hash an agent's build directories (one per platform) and write a signed agent release.
    SignAgent(cli_agent::SignAgentArgs),
    /// Verify a manifest against a root, and optionally an image and an appliance's state.
    Verify(VerifyArgs),
    /// Show a root or manifest without verifying it.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what an update from an older image would fetch: the newer image's content-defined
    /// chunks that the older one lacks (both streamed; nothing is written).
    Delta {
        /// The image appliances run now.
        #[arg(long)]
        from: PathBuf,
        /// The image to roll out.
        #[arg(long)]
        to: PathBuf,
        /// Average chunk size in KiB.
        #[arg(long, default_value_t = 4)]
        chunk_kib: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RootCommand {
    /// Write the first root, signed by its root keys.
    Init(RootArgs),
    /// Write the next root, signed by a threshold of the current root keys and of its own.
    Rotate {
        /// The root in force now.
        #[arg(long)]
        current: PathBuf,
        /// Secret keys of the current root that approve the rotation.
        #[arg(long = "old-key", required = true)]
        old_keys: Vec<PathBuf>,
        #[command(flatten)]
        next: RootArgs,
    },
}

#[derive(Args)]
struct RootArgs {
    /// Root key files; secret key files also sign.
    #[arg(long = "root-key", required = true)]
    root_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    root_threshold: u32,
    /// Release key files (public or secret; only the public key is used).
    #[arg(long = "release-key", required = true)]
    release_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    release_threshold: u32,
    /// Days until the root expires.
    #[arg(long, default_value_t = 365)]
    expires_days: i64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SignArgs {
    #[arg(long)]
    image: PathBuf,
    /// Monotonic release number.
    #[arg(long)]
    version: u64,
    /// Display name; defaults to the version number.
    #[arg(long)]
    name: Option<String>,
    /// Platform the image is built for (repeat for several).
    #[arg(long = "platform", required = true)]
    platforms: Vec<String>,
    #[arg(long, default_value = "")]
    notes: String,
    #[arg(long, default_value_t = 90)]
    expires_days: i64,
    /// Appliances that install this release refuse anything older than this version afterwards.
    #[arg(long)]
    rollback_floor: Option<u64>,
    /// Sign no content index: appliances then fetch the whole image, whatever their active
    /// slot holds.
    #[arg(long)]
    no_index: bool,
    #[command(flatten)]
    signing: Signing,
}

/// Which keys sign a document, and where it goes: the same for image and agent releases.
#[derive(Args)]
struct Signing {
    /// Release secret key files (repeat to meet a threshold).
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Check the result against this root before writing it.
    #[arg(long)]
    root: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

impl Signing {
    fn secret_keys(&self) -> Result<Vec<SecretKey>> {
        let keys = secret_keys(&self.keys)?;
        if keys.len() != self.keys.len() {
            bail!("every --key must be a secret key file");
        }
        Ok(keys)
    }

    /// Writes the signed `bytes` to `--out`, once `verify` accepts them under `--root` (if
    /// one is named).
    fn verify_and_write(
        &self,
        bytes: &[u8],
        verify: impl FnOnce(&TrustedRoot, &[u8]) -> Result<()>,
    ) -> Result<()> {
        if let Some(root) = &self.root {
            let root = TrustedRoot::pin(&read(root)?).context("root")?;
            verify(&root, bytes).context("the new manifest does not verify against the root")?;
        }
        write_document(&self.out, bytes)
    }
}

#[derive(Args)]
struct VerifyArgs {
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    manifest: PathBuf,
    /// Also check this image against the manifest's size and hashes.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Check the release for an appliance of this platform.
    #[arg(long)]
    platform: Option<String>,
    /// The appliance's installed release version.
    #[arg(long, default_value_t = 0, requires = "platform")]
    installed: u64,
    /// The appliance's rollback floor.
    #[arg(long, default_value_t = 0, requires = "platform")]
    floor: u64,
    /// Allow an older release (an operator-ordered rollback), never below the floor.
    #[arg(long, requires = "platform")]
    rollback: bool,
    /// For an agent release: the OS release the appliance runs.
    #[arg(long, default_value_t = 0, requires = "platform")]
    os_release: u64,
    /// For an agent release: check the files in this directory against the platform's build.
    #[arg(long, conflicts_with = "image")]
    dir: Option<PathBuf>,
    /// Verify as of this time (RFC 3339) instead of now.
    #[arg(long)]
    now: Option<Timestamp>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Root(RootCommand::Init(args)) => {
            let signers = secret_keys(&args.root_keys)?;
            let document = build_root(&args, 1)?.sign(&signers.iter().collect::<Vec<_>>());
            let trusted = TrustedRoot::pin(&document.to_bytes())
                .context("the new root does not carry enough of its own root signatures")?;
            write_document(&args.out, &trusted.to_bytes())?;
            println!("wrote root version 1 to {}", args.out.display());
            Ok(())
        }
        Command::Root(RootCommand::Rotate { current, old_keys, next }) => {
            let current = TrustedRoot::pin(&read(&current)?).context("current root")?;
            let root = build_root(&next, current.root().version + 1)?;
            let mut signers = secret_keys(&old_keys)?;
            signers.extend(secret_keys(&next.root_keys)?);
            let document = root.sign(&signers.iter().collect::<Vec<_>>());
            let rotated = current
                .rotate(&document.to_bytes())
                .context("the rotation is not signed by enough old and new root keys")?;
            write_document(&next.out, &rotated.to_bytes())?;
            println!("wrote root version {} to {}", root.version, next.out.display());
            Ok(())
        }
        Command::Sign(args) => sign(args),
        Command::SignAgent(args) => cli_agent::sign_agent(args),
        Command::Verify(args) => verify(args),
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Delta { from, to, chunk_kib, json } => delta(&from, &to, chunk_kib, json),
        Command::GenerateDocs { dir } => Ok(sitecast_cli_docs::write(Cli::command(), &dir)?),
    }
}

fn delta(from: &Path, to: &Path, chunk_kib: u32, json: bool) -> Result<()> {
    anyhow::ensure!((1..=1024).contains(&chunk_kib), "--chunk-kib must be 1 to 1024");
    let chunking = sitecast_delta::Chunking::around(chunk_kib * 1024);
    let chunked = |path: &Path| -> Result<Vec<sitecast_delta::Chunk>> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        sitecast_delta::chunks(reader, chunking)
            .with_context(|| format!("reading {}", path.display()))
    };
    let estimate = sitecast_delta::estimate(&chunked(from)?, &chunked(to)?);
    let share = |bytes: u64| 100.0 * bytes as f64 / estimate.image_bytes.max(1) as f64;
    if json {
        let value = serde_json::json!({
            "image_bytes": estimate.image_bytes,
            "chunks": estimate.chunks,
            "chunk_bytes_average": chunk_kib * 1024,
            "reused_bytes": estimate.reused_bytes,
            "missing_bytes": estimate.missing_bytes,
            "groups": estimate.groups,
            "groups_missing": estimate.groups_missing,
            "missing_group_bytes": estimate.missing_group_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!(
        "update from {} to {} ({:.1} MiB, {} chunks of about {chunk_kib} KiB):",
        from.display(),
        to.display(),
        mib(estimate.image_bytes),
        estimate.chunks
    );
    let row = |what: &str, bytes: u64| {
        println!("  {what:<34} {:>9.2} MiB {:>6.1} %", mib(bytes), share(bytes));
    };
    row("reused from the older image", estimate.reused_bytes);
    row("to fetch, missing chunks", estimate.missing_bytes);
    row("to fetch, as whole 16 KiB groups", estimate.missing_group_bytes);
    println!(
        "  ({} of {} groups touched by a missing chunk)",
        estimate.groups_missing, estimate.groups
    );
    Ok(())
}

fn keygen(out: &Path, force: bool) -> Result<()> {
    let key = SecretKey::generate().context("reading the OS random source")?;
    let public_path = pub_path(out);
    write_private(out, key.to_file_text().as_bytes(), force)?;
    fs::write(&public_path, key.public().to_file_text())
        .with_context(|| format!("writing {}", public_path.display()))?;
    println!("{}", key.public());
    Ok(())
}

fn pub_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Creates `path` with mode 0600 from the start, so the secret is never readable by others.
fn write_private(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {} (use --force to replace a key)", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn secret_keys(paths: &[PathBuf]) -> Result<Vec<SecretKey>> {
    let mut keys = Vec::new();
    for path in paths {
        let text = read_text(path)?;
        if let Ok(key) = SecretKey::from_file_text(&text) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// A public key from a `.pub` file, or the public half of a secret key file.
fn public_key(path: &Path) -> Result<PublicKey> {
    let text = read_text(path)?;
    if let Ok(secret) = SecretKey::from_file_text(&text) {
        return Ok(secret.public());
    }
    PublicKey::from_file_text(&text)
        .with_context(|| format!("{} is not a key file", path.display()))
}

fn build_root(args: &RootArgs, version: u64) -> Result<Root> {
    let keys = |paths: &[PathBuf]| paths.iter().map(|p| public_key(p)).collect::<Result<Vec<_>>>();
    Ok(Root {
        version,
        expires: Timestamp::now() + (args.expires_days * 24).hours(),
        root: RoleKeys { keys: keys(&args.root_keys)?, threshold: args.root_threshold },
        release: RoleKeys { keys: keys(&args.release_keys)?, threshold: args.release_threshold },
    })
}

fn write_document(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut text = bytes.to_vec();
    text.push(b'\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn open_image(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("opening image {}", path.display()))
}

/// The content index of the image at `path` (a second streamed read), as the manifest signs it.
fn content_index(path: &Path, chunking: sitecast_delta::Chunking) -> Result<ContentIndex> {
    ContentIndex::make(open_image(path)?, chunking, io::sink())
        .with_context(|| format!("indexing {}", path.display()))
}

fn sign(args: SignArgs) -> Result<()> {
    let keys = args.signing.secret_keys()?;
    let digest = ImageDigest::of_reader(open_image(&args.image)?)
        .with_context(|| format!("hashing {}", args.image.display()))?;
    let index = match args.no_index {
        true => None,
        false => Some(content_index(&args.image, sitecast_delta::Chunking::default())?),
    };
    let now = Timestamp::now();
    let release = Release {
        version: args.version,
        version_name: args.name.unwrap_or_else(|| args.version.to_string()),
        image: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
        platforms: args.platforms,
        notes: args.notes,
        created: now,
        expires: now + (args.expires_days * 24).hours(),
        rollback_floor: args.rollback_floor,
        index,
    };
    let bytes = release.sign(&keys.iter().collect::<Vec<_>>()).to_bytes();
    args.signing.verify_and_write(&bytes, |root, bytes| {
        root.verify_release(bytes, now)?;
        Ok(())
    })?;
    println!(
        "signed release {} ({} bytes, blake3 {}) -> {}",
        release.version,
        digest.size,
        digest.blake3,
        args.signing.out.display()
    );
    Ok(())
}

fn verify(args: VerifyArgs) -> Result<()> {
    let now = args.now.unwrap_or_else(Timestamp::now);
    let root = TrustedRoot::pin(&read(&args.root)?).context("root")?;
    let bytes = read(&args.manifest)?;
    let kind = SignedDocument::parse(&bytes)
        .ok()
        .and_then(|d| d.signed().get("type").and_then(Value::as_str).map(str::to_owned));
    if kind.as_deref() == Some(AGENT_TYPE) {
        return cli_agent::verify_agent(
            &root,
            &bytes,
            now,
            args.platform,
            args.os_release,
            args.installed,
            args.dir.as_deref(),
        );
    }
    let verified = root.verify_release(&bytes, now).context("manifest")?;
    if let Some(platform) = args.platform {
        let policy = InstallPolicy {
            platform,
            installed_version: args.installed,
            rollback_floor: args.floor,
            intent: if args.rollback { Intent::Rollback } else { Intent::Upgrade },
        };
        verified.check_install(&policy).context("appliance policy")?;
    }
    if let Some(image) = &args.image {
        ImageDigest::check(open_image(image)?, &verified.release().image)
            .with_context(|| format!("image {}", image.display()))?;
    }
    let release = verified.release();
    println!("OK: release {} ({}) verified", release.version, release.version_name);
    Ok(())
}

fn inspect(path: &Path, as_json: bool) -> Result<()> {
    let document = SignedDocument::parse(&read(path)?).context("document")?;
    let signed = document.signed();
    let keys: Vec<String> = document.signatures().iter().map(|s| s.key.to_hex()).collect();
    if as_json {
        let out = json!({ "verified": false, "signed": signed, "signed_by": keys });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} (signatures NOT verified; use `verify`)", path.display());
    for (name, value) in signed {
        let shown = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("  {name:<14} {shown}");
    }
    for key in keys {
        println!("  signed by      {key}");
    }
    Ok(())
}
