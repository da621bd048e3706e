//! `sitecast-netsim`: fleet simulations and the local demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sitecast-netsim", version, about = "sitecast fleet simulations and demo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local demo: a coordinator and appliances on loopback (no root needed).
    Demo {
        /// Where keys, images, slots and logs go (kept after the run).
        #[arg(long, default_value = "target/sitecast-demo")]
        work_dir: PathBuf,
        #[arg(long, default_value_t = 5)]
        appliances: usize,
        #[arg(long, default_value_t = 64)]
        image_mib: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        time_limit_secs: u64,
    },
    /// The discrete-event fleet simulator: sites of appliances running the peer's scheduler.
    Sim {
        #[arg(long, default_value_t = 1)]
        sites: usize,
        #[arg(long, default_value_t = 8)]
        appliances: usize,
        #[arg(long, default_value_t = 64)]
        image_mib: u64,
        /// Origin → site rate.
        #[arg(long, default_value_t = 50.0)]
        wan_mbit: f64,
        /// Each appliance's LAN rate, up and down.
        #[arg(long, default_value_t = 500.0)]
        lan_mbit: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Appliances (by index, in every site) that serve corrupt data.
        #[arg(long = "corrupt")]
        corrupt: Vec<usize>,
        /// A delta transfer: the appliances run this many older releases (appliance `i` the
        /// `i % N`th); the newest lacks `--changed-percent` of the image, in runs, and each
        /// older one that much more.
        #[arg(long, default_value_t = 0)]
        older_releases: usize,
        #[arg(long, default_value_t = 5.0)]
        changed_percent: f64,
        /// Write each site's event trace (joins, requests, completions, announcements) to
        /// stderr, one line per event.
        #[arg(long)]
        trace: bool,
    },
    /// The swarm's goals over a matrix of site shapes (appliances, transfer size, WAN- to
    /// LAN-limited links, slow, asymmetric, late and corrupt appliances): one line per shape
    /// and a summary; fails if any shape misses a goal.
    Sweep {
        /// The reduced matrix that CI runs, instead of the whole space.
        #[arg(long)]
        reduced: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print only the shapes that miss a goal.
        #[arg(long)]
        misses_only: bool,
    },
    /// The network-namespace lab (root): real coordinator and agents in namespaces, shaped
    /// links, mDNS discovery; removes everything it created when it ends.
    Lab {
        #[command(flatten)]
        shape: LabShape,
    },
    /// Real appliances in QEMU (software emulation): builds the appliance image from Debian
    /// packages (cached), starts Central Command, boots a site of VMs on release 1, publishes
    /// and rolls out release 2, and prints what each VM did. Needs no root.
    Vm {
        #[arg(long, default_value_t = 2)]
        appliances: usize,
        /// The site's WAN downlink (Central Command → site); 0 for no limit.
        #[arg(long, default_value_t = 40.0)]
        wan_mbit: f64,
        /// Consoles, disks and the coordinator's log (cleared first, kept after the run).
        #[arg(long, default_value = "target/sitecast-vm")]
        work_dir: PathBuf,
        /// The built appliance (kept: the next run reuses what has not changed).
        #[arg(long, default_value = "target/sitecast-vm-images")]
        images_dir: PathBuf,
    },
    /// (internal) The lab's controller, run inside the lab's origin namespace.
    #[command(hide = true)]
    LabRun {
        #[arg(long)]
        prefix: String,
        #[command(flatten)]
        shape: LabShape,
    },
    /// (internal) Central Command for the demo.
    #[command(hide = true)]
    Coordinator {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        root: PathBuf,
        /// How often appliances are told to check in; offline after three missed.
        #[arg(long, default_value_t = 1)]
        checkin_interval_secs: u64,
    },
    /// (internal) An appliance agent for the demo.
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct LabShape {
    #[arg(long, default_value_t = 4)]
    appliances: usize,
    #[arg(long, default_value_t = 16)]
    image_mib: u64,
    /// The origin's upload (the site's WAN).
    #[arg(long, default_value_t = 50.0)]
    wan_mbit: f64,
    /// Each appliance's LAN rate, up and down.
    #[arg(long, default_value_t = 500.0)]
    lan_mbit: f64,
    /// One-way delay on every shaped link.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Packet loss on every shaped link.
    #[arg(long, default_value_t = 0.0)]
    loss_percent: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where keys, images, slots and logs go (kept after the run).
    #[arg(long, default_value = "target/sitecast-lab")]
    work_dir: PathBuf,
    #[arg(long, default_value_t = 300)]
    time_limit_secs: u64,
    /// Then time every appliance downloading the image by plain HTTP at once.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    http_baseline: bool,
    /// A delta transfer, as `sim` models it: the appliances run this many older releases.
    #[arg(long, default_value_t = 0)]
    older_releases: usize,
    #[arg(long, default_value_t = 5.0)]
    changed_percent: f64,
}

impl LabShape {
    fn options(&self) -> sitecast_netsim::lab::LabOptions {
        sitecast_netsim::lab::LabOptions {
            appliances: self.appliances,
            image_mib: self.image_mib,
            wan_mbit: self.wan_mbit,
            lan_mbit: self.lan_mbit,
            delay_ms: self.delay_ms,
            loss_percent: self.loss_percent,
            seed: self.seed,
            // The controller runs from another working directory's view of the same files.
            work_dir: std::path::absolute(&self.work_dir).unwrap_or_else(|_| self.work_dir.clone()),
            time_limit: Duration::from_secs(self.time_limit_secs),
            http_baseline: self.http_baseline,
            older_releases: self.older_releases,
            changed_percent: self.changed_percent,
        }
    }
}

/// One digest for a run of sites: BLAKE3 over the sites' trace digests in site order, so two
/// runs (or two builds) can be compared from the command line.
fn trace_digest(results: &[sitecast_netsim::sim::SiteResult]) -> String {
    let mut hasher = blake3::Hasher::new();
    for result in results {
        hasher.update(result.trace_digest.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Demo { work_dir, appliances, image_mib, time_limit_secs } => {
            let options = sitecast_netsim::demo::DemoOptions {
                work_dir,
                appliances,
                image_mib,
                exe: std::env::current_exe()?,
                time_limit: Duration::from_secs(time_limit_secs),
            };
            let report = sitecast_netsim::demo::run(&options, &mut std::io::stdout()).await?;
            Ok(if report.all_updated(2) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Sim {
            sites,
            appliances,
            image_mib,
            wan_mbit,
            lan_mbit,
            seed,
            corrupt,
            older_releases,
            changed_percent,
            trace,
        } => {
            let mut spec = sitecast_netsim::sim::SiteSpec::uniform(
                appliances,
                image_mib << 20,
                wan_mbit,
                lan_mbit,
                seed,
            );
            if older_releases > 0 {
                spec = spec.on_older_releases(older_releases, changed_percent / 100.0);
            }
            spec.corrupt = corrupt.into_iter().collect();
            spec.print_trace = trace;
            let started = std::time::Instant::now();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let results = sitecast_netsim::sim::simulate_sites(&spec, sites, threads);
            let wall = started.elapsed().as_secs_f64();
            let worst = results.iter().map(|r| r.origin_bytes).max().unwrap_or(0);
            let seconds = results.iter().map(|r| r.seconds).fold(0.0, f64::max);
            let intact = results.iter().all(|r| r.intact);
            println!(
                "{sites} site(s) × {appliances} appliances, {image_mib} MiB, WAN {wan_mbit} Mbit/s, LAN {lan_mbit} Mbit/s, seed {seed}"
            );
            let transfer = spec.transfer_bytes();
            if older_releases > 0 {
                println!(
                    "  on {older_releases} older release(s), {changed_percent} % of the image changed since each: {transfer} bytes held by none (the transfer)"
                );
            }
            // Each site's bound is the shape's, or more where it counts what its corrupt
            // appliances fetched (measured in the run); the shape's with no site at all.
            let bound =
                results.iter().map(|r| r.bound_seconds).fold(spec.bound_seconds(), f64::max);
            println!(
                "  slowest site {seconds:.2} s (bound {bound:.2} s, ×{:.2}); worst origin bytes per site {:.3} × the transfer; intact: {intact}; simulated in {wall:.2} s",
                seconds / bound,
                worst as f64 / transfer as f64
            );
            if !intact {
                let seeds: Vec<u64> = results
                    .iter()
                    .zip(0..)
                    .filter(|(r, _)| !r.intact)
                    .map(|(_, k)| seed + k)
                    .collect();
                println!("  sites not intact: seeds {seeds:?}");
            }
            let summary = serde_json::json!({
                "appliances": appliances * sites,
                "sites": sites,
                "image_bytes": spec.image_bytes,
                "transfer_bytes": transfer,
                "origin_bytes": results.iter().map(|r| r.origin_bytes).sum::<u64>(),
                "origin_bytes_per_site_max": worst,
                "lan_bytes": results.iter().map(|r| r.lan_bytes).sum::<u64>(),
                "seconds": seconds,
                "bound_seconds": bound,
                "intact": intact,
                "seed": seed,
                "events": results.iter().map(|r| r.events).sum::<u64>(),
                "trace_digest": trace_digest(&results),
                "wall_seconds": wall,
            });
            println!("{summary}");
            Ok(if intact { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Sweep { reduced, seed, misses_only } => {
            use sitecast_netsim::sweep;
            let started = std::time::Instant::now();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let verdicts = sweep::run(sweep::matrix(!reduced, seed), threads, |verdict| {
                if !misses_only || !verdict.meets_goals() {
                    println!("{}", verdict.line());
                }
            });
            let missed = verdicts.iter().filter(|v| !v.meets_goals()).count();
            let worst =
                |ratio: fn(&sweep::Verdict) -> f64| verdicts.iter().map(ratio).fold(0.0, f64::max);
            println!(
                "{} shapes, {missed} missed a goal; worst time ÷ bound {:.2} (goal {}), worst origin ÷ transfer {:.3} (goal {}); simulated in {:.1} s",
                verdicts.len(),
                worst(sweep::Verdict::time_ratio),
                sweep::MAX_TIME_RATIO,
                worst(sweep::Verdict::origin_ratio),
                sweep::MAX_ORIGIN_RATIO,
                started.elapsed().as_secs_f64()
            );
            Ok(if missed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Lab { shape } => {
            let code =
                sitecast_netsim::lab::run(&shape.options(), &std::env::current_exe()?).await?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Command::Vm { appliances, wan_mbit, work_dir, images_dir } => {
            let options = sitecast_netsim::vm::VmUpdateOptions {
                lab: sitecast_netsim::vm::VmLabOptions {
                    work_dir,
                    site: "vm-site".into(),
                    wan_mbit: (wan_mbit > 0.0).then_some(wan_mbit),
                    lan: appliances > 1,
                    checkin_interval_secs: 5,
                },
                appliances,
                images_dir,
            };
            let exe = std::env::current_exe()?;
            sitecast_netsim::vm::update_site(&options, &exe, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::LabRun { prefix, shape } => lab_run(&prefix, &shape.options()).await,
        Command::Coordinator { listen, data_dir, root, checkin_interval_secs } => {
            sitecast_netsim::demo::coordinator_process(
                &listen,
                data_dir,
                &root,
                checkin_interval_secs,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { config } => {
            sitecast_coordinator::install_tls_provider();
            let config = sitecast_peer::config::AgentConfig::load(&config)?;
            match sitecast_peer::daemon::run(config).await? {
                sitecast_peer::agent::Exit::Reboot => {
                    Ok(ExitCode::from(sitecast_peer::agent::EXIT_REBOOT as u8))
                }
            }
        }
    }
}

/// The lab's controller: runs the release, prints a summary and the JSON line.
async fn lab_run(prefix: &str, options: &sitecast_netsim::lab::LabOptions) -> Result<ExitCode> {
    let mut stdout = std::io::stdout();
    let started = std::time::Instant::now();
    let report =
        sitecast_netsim::lab::controller(options, prefix, &std::env::current_exe()?, &mut stdout)
            .await?;
    let spec = options.site_spec();
    let bound = spec.bound_seconds();
    // The simulator's prediction for the same site, for the fidelity comparison.
    let simulated = sitecast_netsim::sim::simulate_site(&spec);
    let f = report.image_bytes as f64;
    println!(
        "{} appliances, {} MiB, WAN {} Mbit/s, LAN {} Mbit/s: every slot verified in {:.2} s (bound {bound:.2} s, ×{:.2}), rollout done in {:.2} s; origin sent {:.3} × the image (plain HTTP: {} ×); intact: {}",
        options.appliances,
        options.image_mib,
        options.wan_mbit,
        options.lan_mbit,
        report.seconds,
        report.seconds / bound,
        report.total_seconds,
        report.origin_bytes as f64 / f,
        options.appliances,
        report.intact
    );
    println!(
        "  the simulator predicts {:.2} s and {:.3} × the image for this site",
        simulated.seconds,
        simulated.origin_bytes as f64 / f
    );
    if options.older_releases > 0 {
        println!(
            "  on {} older release(s): {} bytes held by none (the transfer); origin sent {:.3} × that and the index and group hashes ({} bytes), the simulator {:.3} × the transfer",
            options.older_releases,
            report.transfer_bytes,
            report.origin_bytes as f64 / (report.transfer_bytes + report.side_bytes) as f64,
            report.side_bytes,
            simulated.origin_bytes as f64 / report.transfer_bytes as f64
        );
    }
    let summary = serde_json::json!({
        "appliances": options.appliances,
        "image_bytes": report.image_bytes,
        "transfer_bytes": report.transfer_bytes,
        "side_bytes": report.side_bytes,
        "origin_bytes": report.origin_bytes,
        "seconds": report.seconds,
        "bound_seconds": bound,
        "intact": report.intact,
        "total_seconds": report.total_seconds,
        "connected_min": report.connected_min,
        "found_by_mdns": report.found_by_mdns,
        "http_seconds": report.http_seconds,
        "sim_seconds": simulated.seconds,
        "sim_origin_bytes": simulated.origin_bytes,
        "seed": options.seed,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    println!("{summary}");
    Ok(if report.intact { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
