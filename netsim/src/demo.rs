//! The local demo, the README's first command: a coordinator and several appliances as
//! processes on loopback with file-backed A/B slots, a signed release published and rolled
//! out in two waves, live progress, and the origin offload at the end.
//!
//! The processes are this same binary started with hidden subcommands (`coordinator`,
//! `agent`), so the demo needs nothing but `cargo run`. Agents "reboot" by exiting with
//! status 75; the demo restarts them, as systemd would after a reboot.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jiff::{Timestamp, ToSpan};
use serde_json::{Value, json};
use sitecast_manifest::{
    ContentIndex, ImageDigest, ImageInfo, Release, RoleKeys, Root, SecretKey, TrustedRoot,
};
use sitecast_peer::config::{AgentConfig, BootSlotSource};

pub const OPERATOR: &str = "demo-operator-token";
pub const ENROLL: &str = "demo-enrollment-token";
const SITE: &str = "demo-store";
pub(crate) const PLATFORM: &str = "x86_64-appliance";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub work_dir: PathBuf,
    pub appliances: usize,
    pub image_mib: u64,
    /// This binary (started again for the coordinator and agent processes).
    pub exe: PathBuf,
    pub time_limit: Duration,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub appliances: Vec<(String, u64, String, String)>,
    pub image_bytes: u64,
    pub origin_bytes: u64,
    pub lan_bytes: u64,
    pub seconds: f64,
    pub coordinator: String,
}

impl DemoReport {
    pub fn all_updated(&self, version: u64) -> bool {
        self.appliances.iter().all(|(_, v, _, state)| *v == version && state == "succeeded")
    }
}

pub(crate) struct Processes {
    pub children: Vec<(String, Child)>,
}

impl Processes {
    /// Starts again every agent that exited with status 75 (its "reboot", as a supervisor
    /// would) and returns their names; any other exit is an error pointing at its log.
    pub(crate) fn restart_rebooted(
        &mut self,
        logs: &Path,
        start: impl Fn(&str) -> Result<Child>,
    ) -> Result<Vec<String>> {
        let mut rebooted = Vec::new();
        for (name, child) in &mut self.children {
            let Some(status) = child.try_wait()? else { continue };
            match status.code() {
                Some(75) => {
                    *child = start(name)?;
                    rebooted.push(name.clone());
                }
                code => bail!(
                    "{name} stopped ({code:?}); see {}",
                    logs.join(format!("{name}.log")).display()
                ),
            }
        }
        Ok(rebooted)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Marks a work directory as ours, so a later run may clear it.
const WORK_MARKER: &str = ".sitecast-work";

/// Empties `work` for a new run, but only if an earlier run made it (or it is empty): a
/// mistyped `--work-dir` must not delete someone's files.
pub(crate) fn fresh_work_dir(work: &Path) -> Result<()> {
    if work.exists() {
        let empty = std::fs::read_dir(work)?.next().is_none();
        if !empty && !work.join(WORK_MARKER).exists() {
            bail!(
                "{} exists and was not made by sitecast (no {WORK_MARKER}); choose another --work-dir",
                work.display()
            );
        }
        std::fs::remove_dir_all(work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join(WORK_MARKER), "made by sitecast-netsim; cleared on the next run\n")?;
    Ok(())
}

/// A locally administered unicast MAC address derived from an appliance's name.
pub(crate) fn local_mac(name: &str) -> String {
    let hash = blake3::hash(name.as_bytes());
    let b = hash.as_bytes();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

pub(crate) fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?)
}

/// Keys, root of trust, two images and release 2 signed, as an operator prepares them offline.
#[derive(Debug)]
pub(crate) struct Fixture {
    pub root_path: PathBuf,
    /// Release 1: what the appliances run from slot A.
    pub v1: PathBuf,
    /// Release 2: what is rolled out.
    pub v2: PathBuf,
    pub image: ImageInfo,
    pub manifest: String,
}

/// Overwrites `ranges` of the file at `path` with noise named by `label` and each range's
/// offset (so two files overwritten with one label hold the same bytes there).
fn overwrite(path: &Path, ranges: &[std::ops::Range<u64>], label: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buffer = vec![0; 1 << 20];
    for range in ranges {
        let mut noise = blake3::Hasher::new_derive_key(label);
        let mut noise = noise.update(&range.start.to_le_bytes()).finalize_xof();
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(buffer.len() as u64) as usize;
            noise.fill(&mut buffer[..n]);
            file.write_all_at(&buffer[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

impl Fixture {
    pub(crate) fn create(work: &Path, image_bytes: u64, label: &str) -> Result<Self> {
        Self::create_with(work, image_bytes, label, None)
    }

    /// As [`Fixture::create`], for a delta transfer: release 2 is release 1 with the bytes in
    /// `changed` new, and its manifest signs a content index, so appliances copy the rest
    /// from their active slot.
    pub(crate) fn create_delta(
        work: &Path,
        image_bytes: u64,
        label: &str,
        changed: &[std::ops::Range<u64>],
    ) -> Result<Self> {
        Self::create_with(work, image_bytes, label, Some(changed))
    }

    fn create_with(
        work: &Path,
        image_bytes: u64,
        label: &str,
        changed: Option<&[std::ops::Range<u64>]>,
    ) -> Result<Self> {
        let root_key = SecretKey::generate()?;
        let release_key = SecretKey::generate()?;
        let now = Timestamp::now();
        let root = Root {
            version: 1,
            expires: now + (24 * 365).hours(),
            root: RoleKeys { keys: vec![root_key.public()], threshold: 1 },
            release: RoleKeys { keys: vec![release_key.public()], threshold: 1 },
        };
        let root_bytes = root.sign(&[&root_key]).to_bytes();
        TrustedRoot::pin(&root_bytes)?;
        let root_path = work.join("root.json");
        std::fs::write(&root_path, &root_bytes)?;
        let v1 = work.join("release-1.img");
        let v2 = work.join("release-2.img");
        sitecast_iso::generate::write_image(&v1, image_bytes, &format!("{label} release 1"))?;
        let index = match changed {
            Some(changed) => {
                std::fs::copy(&v1, &v2)?;
                overwrite(&v2, changed, &format!("{label} release 2"))?;
                let index = work.join("release-2.index");
                let chunking = sitecast_delta::Chunking::default();
                let image = std::fs::File::open(&v2)?;
                Some(ContentIndex::make(image, chunking, std::fs::File::create(index)?)?)
            }
            None => {
                sitecast_iso::generate::write_image(
                    &v2,
                    image_bytes,
                    &format!("{label} release 2"),
                )?;
                None
            }
        };
        let digest = ImageDigest::of_reader(std::fs::File::open(&v2)?)?;
        let image = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
        let release = Release {
            version: 2,
            version_name: "2026.11.2".into(),
            image: image.clone(),
            platforms: vec![PLATFORM.into()],
            notes: format!("{label} release"),
            created: now,
            expires: now + (24 * 30).hours(),
            rollback_floor: Some(1),
            index,
        };
        let manifest = String::from_utf8(release.sign(&[&release_key]).to_bytes())?;
        Ok(Self { root_path, v1, v2, image, manifest })
    }

    /// An appliance's agent with file-backed slots in `dir`, checking in every second, GRUB's
    /// rules applied by the agent itself, and "reboots" by exiting with status 75.
    pub(crate) fn agent_config(
        &self,
        dir: &Path,
        coordinator: &str,
        site: &str,
        name: &str,
    ) -> AgentConfig {
        AgentConfig {
            coordinator: coordinator.into(),
            site: site.into(),
            name: name.into(),
            platform: PLATFORM.into(),
            enrollment_token: Some(ENROLL.into()),
            root: self.root_path.clone(),
            state_dir: dir.join("state"),
            slot_a: dir.join("slot-a.img"),
            slot_b: dir.join("slot-b.img"),
            grubenv: dir.join("grubenv"),
            boot_slot: BootSlotSource::SimulateGrub,
            reboot_command: Vec::new(),
            checkin_interval_secs: 1,
            control_socket: dir.join("state/control.sock"),
            // Agents on one host would all report the host's MACs, and a MAC belongs to one
            // appliance: each gets its own locally administered address.
            macs: vec![local_mac(name)],
            ..AgentConfig::default()
        }
    }

    /// An appliance's directory as from the factory: release 1 in slot A, an empty slot B.
    pub(crate) fn install_appliance(&self, dir: &Path) -> Result<()> {
        self.install_older(dir, None)
    }

    /// As [`Fixture::install_appliance`], with an older release in slot A: release 2 but for
    /// the bytes in `lacks` (`None`: release 1).
    pub(crate) fn install_older(
        &self,
        dir: &Path,
        lacks: Option<&[std::ops::Range<u64>]>,
    ) -> Result<()> {
        std::fs::create_dir_all(dir.join("state"))?;
        match lacks {
            Some(lacks) => {
                std::fs::copy(&self.v2, dir.join("slot-a.img"))?;
                overwrite(&dir.join("slot-a.img"), lacks, "older releases")?;
            }
            None => {
                std::fs::copy(&self.v1, dir.join("slot-a.img"))?;
            }
        }
        std::fs::File::create(dir.join("slot-b.img"))?.set_len(self.image.size)?;
        std::fs::write(
            dir.join("state/agent.json"),
            json!({"slot_versions": {"A": 1}}).to_string(),
        )?;
        Ok(())
    }
}

/// Runs the demo, narrating to `out`.
pub async fn run(options: &DemoOptions, out: &mut (impl Write + Send)) -> Result<DemoReport> {
    sitecast_coordinator::install_tls_provider();
    let work = &options.work_dir;
    fresh_work_dir(work)?;
    std::fs::create_dir_all(work.join("logs"))?;
    let logs = work.join("logs");
    let started = Instant::now();
    writeln!(
        out,
        "sitecast demo: {} appliances, {} MiB image, work dir {}",
        options.appliances,
        options.image_mib,
        work.display()
    )?;

    let image_bytes = options.image_mib * 1024 * 1024;
    let fixture = Fixture::create(work, image_bytes, "sitecast demo")?;
    let (root_path, v2, image, manifest) =
        (&fixture.root_path, &fixture.v2, &fixture.image, &fixture.manifest);
    writeln!(out, "1. signed release 2 offline: {} bytes, BLAKE3 {}", image.size, image.blake3)?;

    // 3. Central Command.
    let mut processes = Processes { children: Vec::new() };
    let mut coordinator = Command::new(&options.exe)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(work.join("coordinator"))
        .arg("--root")
        .arg(root_path)
        .stdout(Stdio::piped())
        .stderr(log_file(&logs, "coordinator")?)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = coordinator.stdout.take().context("coordinator stdout")?;
    processes.children.push(("coordinator".into(), coordinator));
    let url = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        lines.find_map(|l| {
            l.ok()?
                .strip_prefix("listening on ")
                .map(|s| s.split_whitespace().next().unwrap_or("").to_owned())
        })
    })
    .await?
    .context("the coordinator did not start")?;
    writeln!(out, "2. Central Command at {url}")?;
    let http = reqwest::Client::new();
    let api = Api { http: http.clone(), url: url.clone() };
    api.post("/api/releases", json!({"manifest": manifest, "image_path": v2})).await?;
    let window = json!({"start": "00:00", "end": "23:59", "timezone": "UTC",
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]});
    api.put(&format!("/api/sites/{SITE}/window"), window).await?;
    writeln!(
        out,
        "3. published release 2 (the coordinator verified manifest and image); window open all day"
    )?;

    // 4. Appliances, each with slots A and B in files and release 1 running from A.
    let mut agents = BTreeMap::new();
    for i in 1..=options.appliances {
        let name = format!("appliance-{i}");
        let dir = work.join(&name);
        fixture.install_appliance(&dir)?;
        let config = AgentConfig {
            lan_listen: "127.0.0.1:0".into(),
            // Loopback has no multicast: peers come from the coordinator's site list.
            libp2p_listen: "/ip4/127.0.0.1/tcp/0".into(),
            mdns: false,
            ..fixture.agent_config(&dir, &url, SITE, &name)
        };
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)?;
        agents.insert(name, config_path);
    }
    let start_agent = |name: &str, config: &Path| -> Result<Child> {
        Ok(Command::new(&options.exe)
            .arg("agent")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file(&logs, name)?)
            .spawn()?)
    };
    for (name, config) in &agents {
        processes.children.push((name.clone(), start_agent(name, config)?));
    }
    let deadline = Instant::now() + options.time_limit;
    while api.get("/api/appliances").await?.as_array().map_or(0, Vec::len) < options.appliances {
        if Instant::now() > deadline {
            bail!("appliances did not enroll; see {}", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writeln!(
        out,
        "4. {} appliances enrolled (site {SITE}), each running release 1 from slot A",
        options.appliances
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 5. A staged rollout: a first wave, then everyone.
    let first = (100 / options.appliances.max(1)).clamp(1, 50) as u8;
    let rollout = api
        .post(
            "/api/rollouts",
            json!({"version": 2, "strategy": "staged",
            "stages": [{"percent": first, "delay_hours": 0}, {"percent": 100, "delay_hours": 0}]}),
        )
        .await?;
    let id = rollout["id"].as_u64().unwrap_or(1);
    writeln!(out, "5. rollout {id}: wave 1 ({first}%), then wave 2 (100%) when wave 1 is healthy")?;

    let mut last_line = String::new();
    loop {
        for name in processes.restart_rebooted(&logs, |name| start_agent(name, &agents[name]))? {
            writeln!(out, "   {name} reboots into its new slot")?;
        }
        let view = api.get(&format!("/api/rollouts/{id}")).await?;
        let list = api.get("/api/appliances").await?;
        let states = update_states(&list);
        let origin = origin_bytes(&api, SITE, 2).await?;
        let line = format!(
            "stage {}/2 {}: {} | origin {:.2} × image",
            view["current_stage"].as_u64().unwrap_or(0) + 1,
            view["state"].as_str().unwrap_or(""),
            summarize(&states),
            origin as f64 / image_bytes as f64
        );
        if line != last_line {
            writeln!(out, "   [{:5.1}s] {line}", started.elapsed().as_secs_f64())?;
            last_line = line;
        }
        if view["state"] == "completed" {
            break;
        }
        rollout_deadline(deadline, options.time_limit, &logs)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // 6. Summary.
    let list = api.get("/api/appliances").await?;
    let appliances: Vec<(String, u64, String, String)> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or("").to_owned(),
                a["installed_version"].as_u64().unwrap_or(0),
                a["active_slot"].as_str().unwrap_or("?").to_owned(),
                a["update"]["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let mut appliances = appliances;
    appliances.sort();
    let lan_bytes: u64 = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["update"]["bytes_from_lan"].as_u64().unwrap_or(0))
        .sum();
    let report = DemoReport {
        appliances,
        image_bytes,
        origin_bytes: origin_bytes(&api, SITE, 2).await?,
        lan_bytes,
        seconds: started.elapsed().as_secs_f64(),
        coordinator: url.clone(),
    };
    writeln!(out, "\nsummary")?;
    for (name, version, slot, state) in &report.appliances {
        writeln!(out, "  {name:<14} release {version}  slot {slot}  {state}")?;
    }
    writeln!(
        out,
        "  the origin sent {:.3} × the image to the site ({} bytes; plain HTTP: {} ×); LAN peers sent {} bytes\n  {:.1} s in all",
        report.origin_bytes as f64 / image_bytes as f64,
        report.origin_bytes,
        options.appliances,
        report.lan_bytes,
        report.seconds
    )?;
    writeln!(
        out,
        "  coordinator was at {url} (Fleet Updates page: {url}/fleet-updates); logs and slots in {}",
        work.display()
    )?;
    Ok(report)
}

/// Each appliance's update state in an `/api/appliances` answer ("waiting" before it has one).
pub(crate) fn update_states(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|a| a["update"]["state"].as_str().unwrap_or("waiting").to_owned())
        .collect()
}

/// An error once a rollout has run past `deadline`.
pub(crate) fn rollout_deadline(deadline: Instant, limit: Duration, logs: &Path) -> Result<()> {
    if Instant::now() > deadline {
        bail!("the rollout did not complete in {limit:?}; logs in {}", logs.display());
    }
    Ok(())
}

pub(crate) fn summarize(states: &[String]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for state in states {
        *counts.entry(state.as_str()).or_default() += 1;
    }
    counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", ")
}

/// Bytes of release `version` Central Command served to `site` (its own count, `/metrics`).
pub(crate) async fn origin_bytes(api: &Api, site: &str, version: u64) -> Result<u64> {
    let text = api.http.get(format!("{}/metrics", api.url)).send().await?.text().await?;
    let prefix =
        format!("sitecast_origin_bytes_served_total{{site=\"{site}\",version=\"{version}\"}} ");
    Ok(text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// Central Command's operator API, with the lab's operator token.
#[derive(Debug)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
}

impl Api {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request.bearer_auth(OPERATOR).send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.url))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.url)).json(&body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.url)).json(&body)).await
    }
}

/// The `coordinator` subcommand: Central Command with the demo's tokens, telling appliances to
/// check in every `checkin_interval_secs`.
pub async fn coordinator_process(
    listen: &str,
    data_dir: PathBuf,
    root: &Path,
    checkin_interval_secs: u64,
) -> Result<()> {
    sitecast_coordinator::install_tls_provider();
    let mut config = sitecast_coordinator::server::ServerConfig::new(data_dir);
    config.root = Some(TrustedRoot::pin(&std::fs::read(root)?)?);
    config.operator_token = Some(OPERATOR.into());
    config.enrollment_token = Some(ENROLL.into());
    config.tick = Duration::from_secs(1);
    config.fleet.checkin_interval_secs = checkin_interval_secs;
    config.fleet.offline_after_secs = (checkin_interval_secs * 3).max(10);
    let (coordinator, _) = sitecast_coordinator::server::Coordinator::open(
        config,
        std::sync::Arc::new(sitecast_coordinator::server::SystemClock),
    )?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    coordinator.serve(listener).await?;
    Ok(())
}
