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
    /// The discrete-event fleet simulator (not built yet).
    Sim,
    /// The network-namespace lab (not built yet).
    Lab,
    /// (internal) Central Command for the demo.
    #[command(hide = true)]
    Coordinator {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        root: PathBuf,
    },
    /// (internal) An appliance agent for the demo.
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
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
        Command::Sim | Command::Lab => {
            anyhow::bail!("not built yet: the simulator and the lab come with the netsim issue")
        }
        Command::Coordinator { listen, data_dir, root } => {
            sitecast_netsim::demo::coordinator_process(&listen, data_dir, &root).await?;
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
