//! Real appliances in QEMU: the `appliance/` recipe's disk booted by GRUB from its own
//! partitions, updated by Central Command (the real `sitecast-coordinator` on the host) over
//! a rate-limited "WAN", and, for a site of several, sharing a virtual LAN.
//!
//! - [`Images`]: `appliance/build-image` run once per set of inputs (it caches), with the
//!   lab's releases: 1 and 2 good, 3 whose own health check fails, 4 whose kernel never
//!   reaches its root file system.
//! - [`VmLab`]: Central Command, the WAN forwarder ([`wan`]), the LAN hub ([`hub`]) and the
//!   VMs ([`qemu`]); operator calls over HTTP as an operator would make them.
//! - [`update_site`]: the `sitecast-netsim vm` scenario: boot, publish, roll out, measure.
//!
//! Work dirs keep every console log, the coordinator's log and the disks: what a failed run
//! needs looking at.

pub mod hub;
pub mod qemu;
pub mod wan;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::demo::{Api, ENROLL, OPERATOR};
use qemu::{Vm, VmNet};

/// The lab's releases: `appliance/build-image --releases "1 2 3 4" --bad-health 3
/// --no-userspace 4`.
pub const GOOD: u64 = 2;
pub const BAD_HEALTH: u64 = 3;
pub const NO_USERSPACE: u64 = 4;
const RELEASES: &str = "1 2 3 4";

/// How long any one step may take before the harness calls it a hang. Generous: under
/// software emulation on a loaded 2-core machine a boot takes 20–60 s.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// The repository (for `appliance/`), as compiled in.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_owned()
}

/// The workspace's binaries the lab needs, next to `exe` (this binary, or a test's).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    pub fn beside(exe: &Path) -> Result<Self> {
        let dir = exe.parent().context("binary has no directory")?.to_owned();
        for name in
            ["sitecast-peer", "sitecast-launcher", "sitecast-manifest", "sitecast-coordinator"]
        {
            if !dir.join(name).is_file() {
                bail!(
                    "{} is missing: build the workspace's binaries first (cargo build --workspace{})",
                    dir.join(name).display(),
                    if dir.ends_with("release") { " --release" } else { "" }
                );
            }
        }
        Ok(Binaries { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The built appliance: lab keys, release images with manifests, the template disk.
#[derive(Debug, Clone)]
pub struct Images {
    pub dir: PathBuf,
    pub disk: PathBuf,
}

impl Images {
    /// Runs the recipe into `dir` (cached there: a second call with the same inputs takes
    /// seconds; parallel callers wait for one build).
    pub fn build(dir: &Path, binaries: &Binaries) -> Result<Self> {
        let script = repo().join("appliance/build-image");
        let output = Command::new(&script)
            .args(["--releases", RELEASES])
            .args(["--bad-health", &BAD_HEALTH.to_string()])
            .args(["--no-userspace", &NO_USERSPACE.to_string()])
            .arg("--agent")
            .arg(binaries.path("sitecast-peer"))
            .arg("--launcher")
            .arg(binaries.path("sitecast-launcher"))
            .arg("--manifest-tool")
            .arg(binaries.path("sitecast-manifest"))
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "appliance/build-image failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(Images { dir: dir.to_owned(), disk: dir.join("disk.img") })
    }

    pub fn image(&self, version: u64) -> PathBuf {
        self.dir.join(format!("release-{version}.img"))
    }

    pub fn manifest(&self, version: u64) -> PathBuf {
        self.dir.join(format!("release-{version}.manifest"))
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root.json")
    }

    /// Size and BLAKE3 of a release image: what its manifest signs.
    pub fn digest(&self, version: u64) -> Result<(u64, blake3::Hash)> {
        let bytes = std::fs::read(self.image(version))?;
        Ok((bytes.len() as u64, blake3::hash(&bytes)))
    }
}

#[derive(Debug, Clone)]
pub struct VmLabOptions {
    pub work_dir: PathBuf,
    pub site: String,
    /// The site's WAN downlink (Central Command → site); `None`: as fast as QEMU goes.
    pub wan_mbit: Option<f64>,
    /// The VMs share a LAN (needed for more than one appliance to swap chunks).
    pub lan: bool,
    pub checkin_interval_secs: u64,
}

/// Central Command, the site's links, and its appliances.
#[derive(Debug)]
pub struct VmLab {
    pub options: VmLabOptions,
    pub images: Images,
    pub api: Api,
    pub wan: wan::Wan,
    pub hub: Option<hub::Hub>,
    pub vms: Vec<Vm>,
    coordinator: Child,
    binaries: Binaries,
}

impl VmLab {
    pub async fn start(options: VmLabOptions, images: Images, binaries: Binaries) -> Result<Self> {
        let work = &options.work_dir;
        if work.exists() {
            std::fs::remove_dir_all(work)
                .with_context(|| format!("clearing {}", work.display()))?;
        }
        std::fs::create_dir_all(work)?;
        let log = std::fs::File::create(work.join("coordinator.log"))?;
        let mut coordinator = Command::new(binaries.path("sitecast-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(work.join("coordinator"))
            .arg("--root")
            .arg(images.root())
            .args(["--operator-token", OPERATOR, "--enrollment-token", ENROLL])
            .args(["--tick-secs", "1"])
            .args(["--checkin-interval-secs", &options.checkin_interval_secs.to_string()])
            // A VM is away for a reboot under emulation (30–60 s); that is not "offline".
            .args(["--offline-after-secs", "300"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting sitecast-coordinator")?;
        let stdout = coordinator.stdout.take().context("coordinator stdout")?;
        let url = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout).lines().find_map(|line| {
                line.ok()?
                    .strip_prefix("listening on ")
                    .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
            })
        })
        .await?
        .with_context(|| format!("the coordinator did not start; see {}", work.display()))?;
        let upstream = url.trim_start_matches("http://").to_owned();
        let wan = wan::Wan::start(upstream, options.wan_mbit).await?;
        let hub = if options.lan { Some(hub::Hub::start().await?) } else { None };
        let api = Api { http: reqwest::Client::new(), url };
        Ok(VmLab { options, images, api, wan, hub, vms: Vec::new(), coordinator, binaries })
    }

    /// Provisions a disk for appliance number `vms.len() + 1` of the site and boots it.
    pub fn add_appliance(&mut self, name: &str) -> Result<usize> {
        let index = self.vms.len() + 1;
        let work = &self.options.work_dir;
        let disk = work.join(format!("{name}.img"));
        // Each VM its own user network, so their addresses differ (10.0.2.15 for all would
        // make every peer look like itself); the host is .2 of it.
        let subnet = 10 + index;
        let coordinator = format!("http://10.0.{subnet}.2:{}", self.wan.port);
        let mut provision = Command::new(repo().join("appliance/provision-disk"));
        provision
            .args(["--name", name, "--site", &self.options.site])
            .args(["--coordinator", &coordinator, "--enrollment-token", ENROLL])
            .args(["--checkin-interval", &self.options.checkin_interval_secs.to_string()]);
        if self.hub.is_some() {
            provision.args(["--net-static", &format!("eth1=192.168.77.{}/24", 10 + index)]);
        }
        let output = provision.arg(&self.images.disk).arg(&disk).output()?;
        if !output.status.success() {
            bail!("provision-disk failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let net = VmNet {
            user_net: format!("10.0.{subnet}.0/24"),
            lan_hub_port: self.hub.as_ref().map(|h| h.port),
            mac: format!("52:54:00:12:00:{index:02x}"),
            lan_mac: format!("52:54:00:77:00:{index:02x}"),
        };
        let console = work.join(format!("{name}.console.log"));
        let vm = Vm::start(name, &repo().join("appliance/run-vm"), &disk, &console, net)?;
        self.vms.push(vm);
        Ok(self.vms.len() - 1)
    }

    pub fn vm(&mut self, name: &str) -> &mut Vm {
        self.vms.iter_mut().find(|v| v.name == name).expect("no such VM")
    }

    /// Publishes a release as an operator would, by server path (the coordinator copies it).
    pub async fn publish(&self, version: u64) -> Result<()> {
        let manifest = std::fs::read_to_string(self.images.manifest(version))?;
        let image = self.images.image(version);
        self.api.post("/api/releases", json!({"manifest": manifest, "image_path": image})).await?;
        Ok(())
    }

    /// Publishes release `version` signed again without its content index: appliances fetch
    /// the whole image instead of copying what their active slot shares with it (a test of
    /// the swarm itself).
    pub async fn publish_whole(&self, version: u64) -> Result<()> {
        let text = std::fs::read(self.images.manifest(version))?;
        let root = sitecast_manifest::TrustedRoot::pin(&std::fs::read(self.images.root())?)?;
        let verified = root.verify_release(&text, jiff::Timestamp::now())?;
        let release = sitecast_manifest::Release { index: None, ..verified.release().clone() };
        let key_text = std::fs::read_to_string(self.images.dir.join("keys/release.key"))?;
        let key = sitecast_manifest::SecretKey::from_file_text(&key_text)?;
        let manifest = String::from_utf8(release.sign(&[&key]).to_bytes())?;
        let image = self.images.image(version);
        self.api.post("/api/releases", json!({"manifest": manifest, "image_path": image})).await?;
        Ok(())
    }

    /// The site's maintenance window, open all day: the default (02:00–05:00 UTC) would
    /// hold a lab update for hours.
    pub async fn open_window(&self) -> Result<()> {
        let window = json!({"start": "00:00", "end": "23:59", "timezone": "UTC",
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]});
        self.api.put(&format!("/api/sites/{}/window", self.options.site), window).await?;
        Ok(())
    }

    /// An immediate rollout of `version` to the whole fleet; returns its id.
    pub async fn roll_out(&self, version: u64) -> Result<u64> {
        let rollout = self
            .api
            .post("/api/rollouts", json!({"version": version, "strategy": "immediate"}))
            .await?;
        rollout["id"].as_u64().context("rollout id")
    }

    /// Signs agent release `version` with the lab's release key (platform `x86_64-appliance`,
    /// every OS release) from the files under `build_dir`, `entry` the program the launcher
    /// starts, and publishes it.
    pub async fn publish_agent(&self, version: u64, build_dir: &Path, entry: &str) -> Result<()> {
        use sitecast_manifest::{AgentBuild, AgentFile, AgentRelease, ImageDigest, OsReleases};
        let mut files = Vec::new();
        for path in walk(build_dir)? {
            let digest = ImageDigest::of_reader(std::fs::File::open(&path)?)?;
            let relative = path.strip_prefix(build_dir)?.to_string_lossy().into_owned();
            let executable =
                std::os::unix::fs::PermissionsExt::mode(&path.metadata()?.permissions()) & 0o111
                    != 0;
            files.push(AgentFile {
                path: relative,
                size: digest.size,
                blake3: digest.blake3,
                sha256: digest.sha256,
                executable,
            });
        }
        let now = jiff::Timestamp::now();
        let release = AgentRelease {
            version,
            version_name: format!("lab agent {version}"),
            builds: vec![AgentBuild {
                platform: "x86_64-appliance".into(),
                entry: entry.into(),
                files,
            }],
            os_releases: OsReleases { min: 0, max: None },
            notes: String::new(),
            created: now - jiff::SignedDuration::from_hours(1),
            expires: now + jiff::SignedDuration::from_hours(24 * 30),
        };
        let key_text = std::fs::read_to_string(self.images.dir.join("keys/release.key"))?;
        let key = sitecast_manifest::SecretKey::from_file_text(&key_text)?;
        let manifest = String::from_utf8(release.sign(&[&key]).to_bytes())?;
        let body = json!({"manifest": manifest, "builds": {"x86_64-appliance": build_dir}});
        self.api.post("/api/agent-releases", body).await?;
        Ok(())
    }

    pub async fn roll_out_agent(&self, version: u64) -> Result<u64> {
        let body = json!({"kind": "agent", "version": version, "strategy": "immediate"});
        let rollout = self.api.post("/api/rollouts", body).await?;
        rollout["id"].as_u64().context("rollout id")
    }

    pub async fn rollout(&self, id: u64) -> Result<Value> {
        self.api.get(&format!("/api/rollouts/{id}")).await
    }

    /// The appliance's record at Central Command, by name.
    pub async fn appliance(&self, name: &str) -> Result<Option<Value>> {
        let list = self.api.get("/api/appliances").await?;
        Ok(list.as_array().into_iter().flatten().find(|a| a["name"] == name).cloned())
    }

    /// Polls Central Command until `done` holds for the appliance's record, while its VM
    /// runs. A hang (QEMU gone, or [`PATIENCE`] spent) is an error naming the console log.
    pub async fn wait_appliance(
        &mut self,
        name: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(record) = self.appliance(name).await?
                && done(&record)
            {
                return Ok(record);
            }
            let vm = self.vm(name);
            if !vm.is_running() {
                bail!(
                    "{name}: QEMU stopped waiting for {what}; console in {}",
                    vm.console.display()
                );
            }
            if Instant::now() > deadline {
                bail!("{name}: no {what} after {PATIENCE:?}; console in {}", vm.console.display());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls the rollout until `done` holds for its view.
    pub async fn wait_rollout(
        &self,
        id: u64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let view = self.rollout(id).await?;
            if done(&view) {
                return Ok(view);
            }
            if Instant::now() > deadline {
                bail!("rollout {id}: no {what} after {PATIENCE:?}: {view}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Bytes of `version` Central Command served to the site (its own count).
    pub async fn origin_bytes(&self, version: u64) -> Result<u64> {
        crate::demo::origin_bytes(&self.api, &self.options.site, version).await
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }
}

impl VmLab {
    /// Powers every VM off and stops Central Command (also on drop).
    pub fn shut_down(&mut self) {
        self.vms.clear();
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

impl Drop for VmLab {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A GPT partition of a disk file, by name: (offset, length) in bytes.
pub fn partition(disk: &Path, name: &str) -> Result<(u64, u64)> {
    let output = Command::new("sfdisk").arg("--json").arg(disk).output()?;
    if !output.status.success() {
        bail!("sfdisk --json {}: {}", disk.display(), String::from_utf8_lossy(&output.stderr));
    }
    let table: Value = serde_json::from_slice(&output.stdout)?;
    let sector = table["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    table["partitiontable"]["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| Some((p["start"].as_u64()? * sector, p["size"].as_u64()? * sector)))
        .with_context(|| format!("{} has no partition {name}", disk.display()))
}

/// BLAKE3 of the first `len` bytes of a partition, read from the host's disk file.
pub fn partition_blake3(disk: &Path, name: &str, len: u64) -> Result<blake3::Hash> {
    use std::io::{Read, Seek, SeekFrom};
    let (offset, size) = partition(disk, name)?;
    if len > size {
        bail!("partition {name} is {size} bytes, less than {len}");
    }
    let mut file = std::fs::File::open(disk)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut (&mut file).take(len), &mut hasher)?;
    Ok(hasher.finalize())
}

/// The GRUB environment block as GRUB itself reads it from the disk's boot partition.
pub fn grubenv(disk: &Path) -> Result<String> {
    let output = Command::new("grub-fstest")
        .arg(disk)
        .args(["cat", "(loop0,gpt2)/grub/grubenv"])
        .output()
        .context("grub-fstest (Debian package grub-common)")?;
    if !output.status.success() {
        bail!("grub-fstest: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One variable of an env block's text (`name=value` lines).
pub fn env_var<'a>(env: &'a str, name: &str) -> Option<&'a str> {
    env.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The agent's peak memory while downloading, from its `download finished … peak_rss_mib=N`
/// line on the console.
pub fn peak_rss_mib(console: &str) -> Option<u64> {
    console
        .lines()
        .filter(|l| l.contains("download finished"))
        .filter_map(|l| l.split("peak_rss_mib=").nth(1)?.split_whitespace().next()?.parse().ok())
        .max()
}

/// Kernel uptime when the system finished starting (`rcS`: `…, up 5.15 s;`), every boot.
pub fn boot_seconds(console: &str) -> Vec<f64> {
    console
        .lines()
        .filter(|l| l.contains("sitecast-rcS: sitecast appliance release"))
        .filter_map(|l| l.split(", up ").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[derive(Debug, Clone)]
pub struct VmUpdateOptions {
    pub lab: VmLabOptions,
    pub appliances: usize,
    pub images_dir: PathBuf,
}

/// Per appliance: (name, seconds from publish to succeeded, boot seconds (kernel to rcS end,
/// every boot), peak agent RSS MiB).
#[derive(Debug, Clone)]
pub struct VmUpdateReport {
    pub appliances: Vec<(String, f64, Vec<f64>, Option<u64>)>,
    pub image_bytes: u64,
    pub origin_bytes: u64,
    pub first_checkin_seconds: Vec<f64>,
}

/// `sitecast-netsim vm`: a site of VMs on release 1; release 2 is published and rolled out;
/// every VM must boot it from slot B and report success. Prints what each did.
pub async fn update_site(
    options: &VmUpdateOptions,
    exe: &Path,
    out: &mut (impl Write + Send),
) -> Result<VmUpdateReport> {
    sitecast_coordinator::install_tls_provider();
    let binaries = Binaries::beside(exe)?;
    let started = Instant::now();
    writeln!(out, "building the appliance (cached in {})", options.images_dir.display())?;
    let images = Images::build(&options.images_dir, &binaries)?;
    let (image_bytes, blake3) = images.digest(GOOD)?;
    writeln!(
        out,
        "  release {GOOD}: {image_bytes} bytes, BLAKE3 {blake3} ({:.1} s)",
        started.elapsed().as_secs_f64()
    )?;
    let mut lab = VmLab::start(options.lab.clone(), images, binaries).await?;
    writeln!(
        out,
        "Central Command at {}; site {} behind a WAN of {}",
        lab.api.url,
        lab.options.site,
        lab.options.wan_mbit.map_or("unlimited".into(), |m| format!("{m} Mbit/s"))
    )?;
    lab.open_window().await?;
    // The release the appliances come with (Central Command believes an installed version
    // only when a published release explains it).
    lab.publish(1).await?;
    let names: Vec<String> = (1..=options.appliances).map(|i| format!("vm{i}")).collect();
    for name in &names {
        lab.add_appliance(name)?;
    }
    let mut first_checkin = Vec::new();
    for name in &names {
        lab.wait_appliance(name, "first check-in", |_| true).await?;
        let seconds = lab.vm(name).started.elapsed().as_secs_f64();
        writeln!(out, "  {name}: QEMU start → first check-in {seconds:.1} s")?;
        first_checkin.push(seconds);
    }
    lab.publish(GOOD).await?;
    let published = Instant::now();
    let id = lab.roll_out(GOOD).await?;
    writeln!(out, "published release {GOOD}; rollout {id} (immediate)")?;
    let mut appliances = Vec::new();
    for name in &names {
        lab.wait_appliance(name, "success", |a| {
            a["update"]["state"] == "succeeded" && a["installed_version"] == GOOD
        })
        .await?;
        let seconds = published.elapsed().as_secs_f64();
        let console = lab.vm(name).console_text();
        let booted = qemu::booted(&console);
        writeln!(
            out,
            "  {name}: succeeded {seconds:.1} s after publishing; booted {:?}; boots {:?} s; agent peak {} MiB",
            booted,
            boot_seconds(&console),
            peak_rss_mib(&console).map_or("?".into(), |m| m.to_string())
        )?;
        appliances.push((name.clone(), seconds, boot_seconds(&console), peak_rss_mib(&console)));
    }
    let origin_bytes = lab.origin_bytes(GOOD).await?;
    writeln!(
        out,
        "origin sent {:.3} × the image to the site ({origin_bytes} bytes; plain HTTP: {} ×); WAN carried {} bytes in all; logs in {}",
        origin_bytes as f64 / image_bytes as f64,
        options.appliances,
        lab.wan.down_bytes(),
        lab.options.work_dir.display()
    )?;
    Ok(VmUpdateReport {
        appliances,
        image_bytes,
        origin_bytes,
        first_checkin_seconds: first_checkin,
    })
}
