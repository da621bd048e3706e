//! `sitecast-peer`: the appliance agent (`run`) and its local commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use sitecast_peer::agent::{EXIT_REBOOT, Exit};
use sitecast_peer::config::{AgentConfig, BootSlotSource};

#[derive(Parser)]
#[command(name = "sitecast-peer", version, about = "sitecast appliance agent")]
struct Cli {
    /// Configuration file (TOML); every option can also be given as a flag.
    #[arg(
        long,
        global = true,
        default_value = "/etc/sitecast/agent.toml",
        env = "SITECAST_AGENT_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write man pages and shell completions into DIR (for packagers).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Run the agent.
    Run(Box<Overrides>),
    /// Ask the running agent to check in now.
    Check,
    /// Slots, versions, download progress, peers.
    Status {
        #[arg(long)]
        json: bool,
        /// Keep showing a progress bar while a download runs.
        #[arg(long)]
        watch: bool,
    },
    /// Go back to the other slot (if it holds a verified release) and reboot.
    Rollback,
    /// Reboot into a ready update without waiting for the maintenance window.
    SkipWindow,
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the agent release this program is built as (the launcher asks the image's agent).
    AgentRelease,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Strict reading: fails naming every key this agent does not know (the agent itself only
    /// warns about them) and every invalid setting.
    Check,
}

#[derive(Args, Default)]
struct Overrides {
    #[arg(long)]
    coordinator: Option<String>,
    /// Trust only this CA (PEM) for an https:// coordinator, not the system's roots.
    #[arg(long)]
    coordinator_ca: Option<PathBuf>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    platform: Option<String>,
    #[arg(long, env = "SITECAST_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: Option<String>,
    #[arg(long)]
    root: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    slot_a: Option<PathBuf>,
    #[arg(long)]
    slot_b: Option<PathBuf>,
    #[arg(long)]
    grubenv: Option<PathBuf>,
    #[arg(long, value_parser = ["cmdline", "simulate-grub"])]
    boot_slot: Option<String>,
    /// Reboot command (repeat for arguments); "" to exit with status 75 instead.
    #[arg(long, num_args = 0..)]
    reboot_command: Option<Vec<String>>,
    #[arg(long)]
    checkin_interval_secs: Option<u64>,
    #[arg(long)]
    control_socket: Option<PathBuf>,
    #[arg(long)]
    metrics_listen: Option<String>,
    #[arg(long)]
    lan_listen: Option<String>,
    #[arg(long)]
    libp2p_listen: Option<String>,
    /// Turn multicast DNS discovery on or off.
    #[arg(long)]
    mdns: Option<bool>,
    /// Dial the site peers the coordinator lists (on or off).
    #[arg(long)]
    coordinator_peers: Option<bool>,
    #[arg(long = "static-peer")]
    static_peers: Vec<String>,
    /// MAC address to report (repeat for more); none given: the configuration's, or those
    /// read from /sys/class/net.
    #[arg(long = "mac")]
    macs: Vec<String>,
}

fn apply(config: &mut AgentConfig, o: Overrides) {
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = o.$field { config.$field = v; })* };
    }
    set!(
        coordinator,
        site,
        name,
        platform,
        root,
        state_dir,
        slot_a,
        slot_b,
        grubenv,
        checkin_interval_secs,
        control_socket,
        metrics_listen,
        lan_listen,
        libp2p_listen,
        mdns,
        coordinator_peers
    );
    if o.enrollment_token.is_some() {
        config.enrollment_token = o.enrollment_token;
    }
    if o.coordinator_ca.is_some() {
        config.coordinator_ca = o.coordinator_ca;
    }
    if let Some(source) = o.boot_slot {
        config.boot_slot = if source == "simulate-grub" {
            BootSlotSource::SimulateGrub
        } else {
            BootSlotSource::Cmdline
        };
    }
    if let Some(command) = o.reboot_command {
        config.reboot_command = command.into_iter().filter(|a| !a.is_empty()).collect();
    }
    if !o.static_peers.is_empty() {
        config.static_peers = o.static_peers;
    }
    if !o.macs.is_empty() {
        config.macs = o.macs;
    }
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
    if let Command::Config(ConfigCommand::Check) = cli.command {
        return Ok(check_config(&cli.config));
    }
    if let Command::AgentRelease = cli.command {
        println!("{}", sitecast_peer::agent_update::image_agent_release());
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::GenerateDocs { dir } = &cli.command {
        sitecast_cli_docs::write(Cli::command(), dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = AgentConfig::load(&cli.config)?;
    let command = match cli.command {
        Command::Run(overrides) => {
            apply(&mut config, *overrides);
            return Ok(match sitecast_peer::daemon::run(config).await? {
                Exit::Reboot => ExitCode::from(EXIT_REBOOT as u8),
            });
        }
        Command::Check => "check",
        Command::Status { json, watch } if watch && !json => {
            // A live bar on the terminal until the download ends.
            loop {
                let status = agent_status(&config.control_socket).await?;
                let Some(progress) = status["progress"].as_f64() else {
                    println!();
                    print_status(&status);
                    return Ok(ExitCode::SUCCESS);
                };
                print!("\r{}", progress_bar(progress, 40));
                std::io::Write::flush(&mut std::io::stdout())?;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        Command::Status { json, .. } => {
            let status = agent_status(&config.control_socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Rollback => "rollback",
        Command::SkipWindow => "skip-window",
        Command::Config(_) | Command::GenerateDocs { .. } | Command::AgentRelease => {
            unreachable!("answered above")
        }
    };
    let response = sitecast_peer::control::request(&config.control_socket, command)
        .await
        .with_context(|| format!("is the agent running? ({})", config.control_socket.display()))?;
    println!("{}", response.message);
    Ok(if response.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let problems = AgentConfig::check(path);
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    eprintln!("{}: {} problem(s)", path.display(), problems.len());
    ExitCode::FAILURE
}

/// The running agent's status, from its control socket.
async fn agent_status(socket: &std::path::Path) -> Result<serde_json::Value> {
    let response = sitecast_peer::control::request(socket, "status")
        .await
        .with_context(|| format!("is the agent running? ({})", socket.display()))?;
    Ok(response.status.unwrap_or_default())
}

/// `[##########..........]  50%`
fn progress_bar(fraction: f64, width: usize) -> String {
    let fraction = fraction.clamp(0.0, 1.0);
    let filled = (fraction * width as f64).round() as usize;
    format!("[{}{}] {:3.0}%", "#".repeat(filled), ".".repeat(width - filled), fraction * 100.0)
}

fn print_status(status: &serde_json::Value) {
    println!(
        "appliance {:.16}… at site {}",
        status["appliance"].as_str().unwrap_or(""),
        status["site"].as_str().unwrap_or("")
    );
    println!(
        "running slot {}; slots: {}",
        status["booted_slot"].as_str().unwrap_or("?"),
        status["slot_versions"]
    );
    match status["update"].as_object() {
        Some(update) => println!(
            "update to release {}: {} (slot {}){}",
            update["version"],
            update["state"].as_str().unwrap_or(""),
            update["slot"].as_str().unwrap_or(""),
            update["error"].as_str().map(|e| format!(" - {e}")).unwrap_or_default()
        ),
        None => println!("no update"),
    }
    if let Some(progress) = status["progress"].as_f64() {
        println!("{}", progress_bar(progress, 40));
    }
    if let Some(error) = status["last_error"].as_str() {
        println!("last error: {error}");
    }
    if let Some(members) = status["membership"]["members"].as_u64() {
        println!(
            "site members: {members}; refused on the LAN: {}, announcements ignored: {}",
            status["membership"]["lan_refused"], status["membership"]["announcements_ignored"]
        );
    }
    let unknown: Vec<&str> = status["config_unknown_keys"]
        .as_array()
        .map(|keys| keys.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    if !unknown.is_empty() {
        println!("configuration keys ignored (unknown to this agent): {}", unknown.join(", "));
    }
}
