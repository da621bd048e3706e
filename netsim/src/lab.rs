//! The namespace lab: a site built from Linux network namespaces, with the real coordinator and
//! real agents as processes, link rates shaped by `tc tbf` (delay and loss by netem beneath it,
//! where the kernel has it), and discovery by mDNS for real.
//!
//! ```text
//!   <p>-o (origin, 10.77.0.1)        <p>-a1 … <p>-aN (appliances, 10.77.0.11 …)
//!        eth0: tbf rate W (WAN)            eth0: tbf rate L (LAN upload)
//!          │                                 │
//!   <p>-sw: br0 (10.77.0.254) ── ports: tbf rate L toward each appliance (LAN download)
//! ```
//!
//! `sitecast-netsim lab` (the outer process, root) builds the namespaces and links, runs the
//! lab's controller (`lab-run`, hidden) inside the origin's namespace (beside Central Command,
//! so that its polling of the API never crosses the shaped WAN), and always removes every
//! namespace and kills every process in them afterwards: on success, failure, a panic, Ctrl-C
//! or SIGTERM. A lab killed with -9 (or interrupted while building its namespaces) is cleaned
//! up by the next one. Nothing of the lab reaches the host's own network namespace.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sitecast_peer::config::AgentConfig;

use crate::demo::{Api, Fixture, Processes, log_file};
use crate::sim::SiteSpec;

const SITE: &str = "lab-site";
const COORDINATOR: &str = "10.77.0.1:8080";
/// Namespace names start with this and the outer process's pid.
pub const PREFIX: &str = "sclab";
/// As in the field (the agent's default): the demo's check-ins every second, each answer
/// naming every site member and peer, took a quarter of a 4 Mbit/s WAN at 16 appliances. The
/// lab asks for a check-in where it waits for one (the rollout's start).
const CHECKIN_SECS: u64 = 60;
/// Appliances get 10.77.0.11 and up; the switch is .254.
const MAX_APPLIANCES: usize = 200;

/// The site's shape.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub appliances: usize,
    pub image_mib: u64,
    pub wan_mbit: f64,
    pub lan_mbit: f64,
    /// One-way delay added on every shaped link, milliseconds.
    pub delay_ms: f64,
    /// Packet loss on every shaped link, percent.
    pub loss_percent: f64,
    pub seed: u64,
    pub work_dir: PathBuf,
    pub time_limit: Duration,
    /// Afterwards, every appliance downloads the image by plain HTTP at once (curl), as the
    /// fleet without sitecast would: the baseline on the same links.
    pub http_baseline: bool,
    /// A delta transfer: the appliances run this many older releases, as the simulator
    /// models them ([`SiteSpec::on_older_releases`]); 0 for a whole image.
    pub older_releases: usize,
    pub changed_percent: f64,
}

impl LabOptions {
    /// The flags `lab` passes on to `lab-run`.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--appliances={}", self.appliances),
            format!("--image-mib={}", self.image_mib),
            format!("--wan-mbit={}", self.wan_mbit),
            format!("--lan-mbit={}", self.lan_mbit),
            format!("--delay-ms={}", self.delay_ms),
            format!("--loss-percent={}", self.loss_percent),
            format!("--seed={}", self.seed),
            format!("--work-dir={}", self.work_dir.display()),
            format!("--time-limit-secs={}", self.time_limit.as_secs()),
            format!("--http-baseline={}", self.http_baseline),
            format!("--older-releases={}", self.older_releases),
            format!("--changed-percent={}", self.changed_percent),
        ]
    }

    /// The site as the simulator sees it: the same appliances, links and, for a delta
    /// transfer, the same pieces held by each.
    pub fn site_spec(&self) -> SiteSpec {
        let spec = SiteSpec::uniform(
            self.appliances,
            self.image_mib << 20,
            self.wan_mbit,
            self.lan_mbit,
            self.seed,
        );
        match self.older_releases {
            0 => spec,
            releases => spec.on_older_releases(releases, self.changed_percent / 100.0),
        }
    }
}

fn run_command(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run_command("ip", &all)
}

/// Limits `dev`'s egress to `rate_mbit` with a token bucket, plus delay and loss by netem
/// beneath it when asked for.
fn shape(ns: &str, dev: &str, rate_mbit: f64, options: &LabOptions) -> Result<()> {
    // A burst of at least one timer tick at the rate, and of a whole GSO packet (veth hands
    // the qdisc up to 64 KiB at once).
    let burst = ((rate_mbit * 1e6 / 8.0 / 250.0) as u64).max(64 * 1024);
    let (rate, burst) = (format!("{rate_mbit}mbit"), burst.to_string());
    let tbf = ["qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", &rate, "burst"];
    let mut args = tbf.to_vec();
    args.extend([burst.as_str(), "latency", "100ms"]);
    in_ns(ns, "tc", &args)?;
    if options.delay_ms > 0.0 || options.loss_percent > 0.0 {
        let (delay, loss) =
            (format!("{}ms", options.delay_ms), format!("{}%", options.loss_percent));
        let netem = [
            "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay", &delay,
            "loss", &loss,
        ];
        in_ns(ns, "tc", &netem).context(
            "delay and loss need the kernel's netem qdisc (sch_netem), which this kernel lacks",
        )?;
    }
    Ok(())
}

fn appliance_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

/// Whether this process runs as root (the lab needs it for namespaces and `tc`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .is_some_and(|euid| euid == "0")
    })
}

fn namespaces() -> Vec<String> {
    let output = Command::new("ip").args(["netns", "list"]).output();
    output
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Namespaces of a lab whose process is gone (killed with -9): removed before a new lab starts.
fn remove_stale_labs() {
    for ns in namespaces() {
        let Some(pid) = ns.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&ns);
        }
    }
}

fn remove_namespace(ns: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// The lab's namespaces; dropping it kills their processes and removes them.
#[derive(Debug)]
pub struct Network {
    pub prefix: String,
    created: Vec<String>,
}

impl Network {
    pub fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    pub fn origin(&self) -> String {
        format!("{}-o", self.prefix)
    }

    pub fn appliance(&self, i: usize) -> String {
        format!("{}-a{i}", self.prefix)
    }

    /// Builds the site: namespaces, bridge, veth pairs, addresses and shaping.
    pub fn create(options: &LabOptions) -> Result<Self> {
        remove_stale_labs();
        let mut network =
            Self { prefix: format!("{PREFIX}{}", std::process::id()), created: Vec::new() };
        let switch = network.switch();
        network.add_namespace(&switch)?;
        run_command("ip", &["-n", &switch, "link", "set", "lo", "up"])?;
        // No IGMP snooping: mDNS multicast reaches every port.
        run_command(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"],
        )?;
        run_command("ip", &["-n", &switch, "addr", "add", "10.77.0.254/24", "dev", "br0"])?;
        run_command("ip", &["-n", &switch, "link", "set", "br0", "up"])?;
        let mut hosts = vec![(network.origin(), "po".to_owned(), "10.77.0.1".to_owned())];
        for i in 1..=options.appliances {
            hosts.push((network.appliance(i), format!("pa{i}"), appliance_ip(i)));
        }
        for (ns, port, ip) in &hosts {
            network.add_namespace(ns)?;
            run_command(
                "ip",
                &[
                    "-n", &switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
            )?;
            run_command("ip", &["-n", &switch, "link", "set", port, "master", "br0"])?;
            run_command("ip", &["-n", &switch, "link", "set", port, "up"])?;
            run_command("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            run_command("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run_command("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run_command("ip", &["-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            let is_origin = *ns == network.origin();
            shape(
                ns,
                "eth0",
                if is_origin { options.wan_mbit } else { options.lan_mbit },
                options,
            )?;
            if !is_origin {
                // The switch port's egress is the appliance's download.
                shape(&switch, port, options.lan_mbit, options)?;
            }
        }
        Ok(network)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        run_command("ip", &["netns", "add", ns])?;
        self.created.push(ns.to_owned());
        Ok(())
    }

    /// Kills every process in the lab's namespaces and removes them.
    pub fn remove(&mut self) {
        for ns in self.created.drain(..).rev() {
            remove_namespace(&ns);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `sitecast-netsim lab`: builds the network, runs the controller in it, cleans up. Returns
/// the controller's exit code.
pub async fn run(options: &LabOptions, exe: &Path) -> Result<i32> {
    if !is_root() {
        bail!("the lab needs root (network namespaces and tc); try sudo, or `sitecast-netsim sim`");
    }
    if !(1..=MAX_APPLIANCES).contains(&options.appliances) {
        bail!("--appliances must be 1..={MAX_APPLIANCES} (one /24 for the site)");
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!("the lab needs `{tool}` (iproute2)");
        }
    }
    let mut network = Network::create(options)?;
    println!(
        "lab: namespaces {}-{{sw,o,a1..a{}}} up; WAN {} Mbit/s, LAN {} Mbit/s",
        network.prefix, options.appliances, options.wan_mbit, options.lan_mbit
    );
    let mut controller = tokio::process::Command::new("ip")
        .args(["netns", "exec", &network.origin()])
        .arg(exe)
        .arg("lab-run")
        .arg(format!("--prefix={}", network.prefix))
        .args(options.to_args())
        .kill_on_drop(true)
        .spawn()
        .context("starting the lab controller")?;
    let code = tokio::select! {
        status = controller.wait() => status?.code().unwrap_or(1),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("lab: interrupted; removing namespaces {}-*", network.prefix);
            130
        }
        _ = terminate.recv() => {
            eprintln!("lab: terminated; removing namespaces {}-*", network.prefix);
            143
        }
    };
    network.remove();
    Ok(code)
}

/// What the lab measured.
#[derive(Debug, Clone)]
pub struct LabReport {
    pub image_bytes: u64,
    /// What no appliance held at the start: the image, unless they ran older releases.
    pub transfer_bytes: u64,
    /// The content index and group hashes of a delta transfer (0 otherwise).
    pub side_bytes: u64,
    pub origin_bytes: u64,
    /// From the rollout's start until every appliance held the verified image.
    pub seconds: f64,
    /// Until every appliance ran the release after its reboot and health gate.
    pub total_seconds: f64,
    pub intact: bool,
    /// The fewest site peers any appliance was connected to before the rollout (with
    /// coordinator peers off, only mDNS brings them).
    pub connected_min: u64,
    /// Site peers found by mDNS, summed over the appliances, at the end (a peer that was
    /// dialled first may never need to find the dialler itself).
    pub found_by_mdns: u64,
    /// Every appliance downloading the image by plain HTTP at once: seconds until the last
    /// finished (with `http_baseline`).
    pub http_seconds: Option<f64>,
}

/// The fewest connected peers and the peers found by mDNS over all appliances.
async fn discovery(agents: &BTreeMap<String, (PathBuf, PathBuf)>) -> (u64, u64) {
    let (mut connected_min, mut found) = (u64::MAX, 0);
    for (_, dir) in agents.values() {
        let status = sitecast_peer::control::request(&dir.join("state/control.sock"), "status")
            .await
            .ok()
            .and_then(|r| r.status);
        let discovery = status.as_ref().map(|s| &s["discovery"]);
        let field = |f: &str| discovery.and_then(|d| d[f].as_u64()).unwrap_or(0);
        connected_min = connected_min.min(field("connected"));
        found += field("found_by_mdns");
    }
    (connected_min, found)
}

fn hash_file(path: &Path) -> Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok((size, hasher.finalize()))
}

/// `lab-run`: the controller, inside the origin's namespace.
pub async fn controller(
    options: &LabOptions,
    prefix: &str,
    exe: &Path,
    out: &mut (impl Write + Send),
) -> Result<LabReport> {
    sitecast_coordinator::install_tls_provider();
    let ns = |suffix: &str| format!("{prefix}-{suffix}");
    let work = &options.work_dir;
    crate::demo::fresh_work_dir(work)?;
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let image_bytes = options.image_mib << 20;
    let label = format!("sitecast lab seed {}", options.seed);
    let spec = options.site_spec();
    let delta = options.older_releases > 0;
    let fixture = match delta {
        true => Fixture::create_delta(work, image_bytes, &label, &spec.transfer_ranges())?,
        false => Fixture::create(work, image_bytes, &label)?,
    };

    let mut processes = Processes { children: Vec::new() };
    let mut coordinator = Command::new("ip")
        .args(["netns", "exec", &ns("o")])
        .arg(exe)
        .args(["coordinator", "--listen", COORDINATOR, "--data-dir"])
        .arg(work.join("coordinator"))
        .arg(format!("--checkin-interval-secs={CHECKIN_SECS}"))
        .arg("--root")
        .arg(&fixture.root_path)
        .stdout(Stdio::piped())
        .stderr(log_file(&logs, "coordinator")?)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = coordinator.stdout.take().context("coordinator stdout")?;
    processes.children.push(("coordinator".into(), coordinator));
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .find(|l| l.as_ref().is_ok_and(|l| l.starts_with("listening on")))
    })
    .await?
    .context("the coordinator did not start")??;
    let api = Api { http: reqwest::Client::new(), url: format!("http://{COORDINATOR}") };
    api.post("/api/releases", json!({"manifest": fixture.manifest, "image_path": fixture.v2}))
        .await?;
    let window = json!({"start": "00:00", "end": "23:59", "timezone": "UTC",
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]});
    api.put(&format!("/api/sites/{SITE}/window"), window).await?;
    writeln!(
        out,
        "lab: Central Command at http://{COORDINATOR} in {}; release 2 published",
        ns("o")
    )?;

    let mut agents: BTreeMap<String, (PathBuf, PathBuf)> = BTreeMap::new();
    for i in 1..=options.appliances {
        let name = format!("appliance-{i}");
        let dir = work.join(&name);
        match delta {
            true => fixture.install_older(&dir, Some(&spec.lacked_ranges(i - 1)))?,
            false => fixture.install_appliance(&dir)?,
        }
        let config = AgentConfig {
            lan_listen: "0.0.0.0:4433".into(),
            libp2p_listen: "/ip4/0.0.0.0/tcp/4434".into(),
            mdns: true,
            // Discovery is by mDNS only, so the lab shows that it works.
            coordinator_peers: false,
            checkin_interval_secs: CHECKIN_SECS,
            ..fixture.agent_config(&dir, &format!("http://{COORDINATOR}"), SITE, &name)
        };
        let path = dir.join("agent.toml");
        std::fs::write(&path, toml::to_string(&config)?)?;
        agents.insert(name, (path, dir));
    }
    let start_agent = |name: &str, config: &Path| -> Result<Child> {
        let i: usize = name.trim_start_matches("appliance-").parse()?;
        Ok(Command::new("ip")
            .args(["netns", "exec", &ns(&format!("a{i}"))])
            .arg(exe)
            .arg("agent")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file(&logs, name)?)
            .spawn()?)
    };
    for (name, (config, _)) in &agents {
        processes.children.push((name.clone(), start_agent(name, config)?));
    }
    let deadline = Instant::now() + options.time_limit;
    let n = options.appliances;

    // Check in now rather than at the next interval (a minute).
    let check_in_all = || async {
        for (_, dir) in agents.values() {
            let _ = sitecast_peer::control::request(&dir.join("state/control.sock"), "check").await;
        }
    };
    // Enrolled, and every appliance connected to every other, found by mDNS alone.
    let mut told_members = false;
    let connected_min = loop {
        let enrolled = api.get("/api/appliances").await?.as_array().map_or(0, Vec::len);
        let (connected_min, _) = discovery(&agents).await;
        if enrolled == n && connected_min + 1 >= n as u64 {
            break connected_min;
        }
        // Each learns the site's members from a check-in, and keeps only them connected.
        if enrolled == n && !told_members {
            check_in_all().await;
            told_members = true;
        }
        if Instant::now() > deadline {
            bail!(
                "after {:?}: {enrolled} of {n} enrolled, each connected to at least {connected_min} peers by mDNS; logs in {}",
                options.time_limit,
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    writeln!(
        out,
        "lab: {n} appliances enrolled; each connected to its {} site peers, found by mDNS",
        n - 1
    )?;

    let rollout = api.post("/api/rollouts", json!({"version": 2, "strategy": "immediate"})).await?;
    let id = rollout["id"].as_u64().unwrap_or(1);
    let started = Instant::now();
    check_in_all().await;
    let mut downloaded: Option<f64> = None;
    let mut last_line = String::new();
    loop {
        processes.restart_rebooted(&logs, |name| start_agent(name, &agents[name].0))?;
        let list = api.get("/api/appliances").await?;
        let states = crate::demo::update_states(&list);
        if downloaded.is_none()
            && states.len() == n
            && states.iter().all(|s| ["ready", "rebooting", "succeeded"].contains(&s.as_str()))
        {
            downloaded = Some(started.elapsed().as_secs_f64());
        }
        let line = crate::demo::summarize(&states);
        if line != last_line {
            writeln!(out, "   [{:6.2}s] {line}", started.elapsed().as_secs_f64())?;
            last_line = line;
        }
        let view = api.get(&format!("/api/rollouts/{id}")).await?;
        if view["state"] == "completed" {
            break;
        }
        crate::demo::rollout_deadline(deadline, options.time_limit, &logs)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total_seconds = started.elapsed().as_secs_f64();
    let (_, found_by_mdns) = discovery(&agents).await;
    let origin_bytes = crate::demo::origin_bytes(&api, SITE, 2).await?;
    let http_seconds = if options.http_baseline {
        let url = format!("http://{COORDINATOR}/api/releases/2/image");
        // Images are for the fleet: the baseline downloads as the operator would.
        let auth = format!("Authorization: Bearer {}", crate::demo::OPERATOR);
        let started = Instant::now();
        let curls: Vec<Child> = (1..=n)
            .map(|i| {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns(&format!("a{i}")),
                        "curl",
                        "-sf",
                        "-H",
                        &auth,
                        "-o",
                        "/dev/null",
                        &url,
                    ])
                    .spawn()
                    .context("curl (the plain HTTP baseline)")
            })
            .collect::<Result<_>>()?;
        for mut curl in curls {
            let status = tokio::task::spawn_blocking(move || curl.wait()).await??;
            if !status.success() {
                bail!("the plain HTTP download failed: {status}");
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        writeln!(out, "lab: plain HTTP, every appliance at once: {seconds:.2} s")?;
        Some(seconds)
    } else {
        None
    };
    let mut intact = true;
    for (name, (_, dir)) in &agents {
        let (size, hash) = hash_file(&dir.join("slot-b.img"))?;
        let ok = size == fixture.image.size && hash.as_bytes() == fixture.image.blake3.as_bytes();
        if !ok {
            writeln!(out, "   {name}: slot B does not match the release")?;
        }
        intact &= ok;
    }
    // What a delta transfer sends besides the image's bytes, once per site: the content
    // index and the group hashes (from which each appliance rebuilds the outboard).
    let side_bytes = match delta {
        true => {
            let index = std::fs::metadata(work.join("release-2.index"))?.len();
            let layout = sitecast_iso::BlobLayout::new(fixture.image.blake3, fixture.image.size);
            index + layout.group_hashes_len()
        }
        false => 0,
    };
    Ok(LabReport {
        image_bytes,
        transfer_bytes: spec.transfer_bytes(),
        side_bytes,
        origin_bytes,
        seconds: downloaded.unwrap_or(total_seconds),
        total_seconds,
        intact,
        connected_min,
        found_by_mdns,
        http_seconds,
    })
}
