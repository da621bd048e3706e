//! `sitecast-coordinator`: the server (`serve`) and the operator CLI that talks to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod operator;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use operator::{
    AgentReleaseCommand, AppliancesCommand, ClientArgs, DdiTargetCommand, ReleaseCommand,
    RolloutCommand,
};
use sitecast_coordinator::server::{Coordinator, ServerConfig, SystemClock};
use sitecast_coordinator::store::{PostgresStore, StoreError};
use sitecast_manifest::TrustedRoot;

#[derive(Parser)]
#[command(name = "sitecast-coordinator", version, about = "sitecast Central Command")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write man pages and shell completions into DIR (for packagers).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Run the server.
    Serve(ServeArgs),
    /// Publish, list and deactivate releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Publish and list agent releases (the agent apart from the image).
    #[command(subcommand)]
    AgentRelease(AgentReleaseCommand),
    /// Create and steer rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The fleet.
    #[command(subcommand)]
    Appliances(AppliancesCommand),
    /// Devices that speak hawkBit DDI (SWUpdate).
    #[command(subcommand)]
    DdiTarget(DdiTargetCommand),
    /// Move a stopped Central Command's state from its data directory's redb file into an
    /// empty PostgreSQL database (docs/scale-out.md). Images stay in the data directory.
    Migrate {
        /// The data directory (its `state.redb` is read, not changed).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The PostgreSQL database to fill, as for `serve --database`.
        #[arg(long, env = "SITECAST_DATABASE", hide_env_values = true)]
        database: String,
    },
    /// The audit log.
    Audit {
        #[command(flatten)]
        client: ClientArgs,
        /// Entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// State (redb) and images. Default: $XDG_DATA_HOME/sitecast-coordinator or
    /// ~/.local/share/sitecast-coordinator.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the state in this PostgreSQL database instead of redb in the data directory
    /// (`postgres://user:password@host/db`, or `host=/run/postgresql dbname=sitecast`); its
    /// schema is created or migrated at start. Images stay in the data directory.
    #[arg(long, env = "SITECAST_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// With --database: when another Central Command is using the database, wait (not
    /// listening) and take over as soon as it stops or dies, instead of refusing to start.
    #[arg(long, requires = "database")]
    standby: bool,
    /// With --database: share the database with other Central Commands started with
    /// --replica, each serving everything (check-ins, the API, the page) behind one load
    /// balancer (docs/scale-out.md). With --standby: wait while one not started so (or one of
    /// another version) uses it.
    #[arg(long, requires = "database", conflicts_with = "iroh_listen")]
    replica: bool,
    /// The root of trust release manifests must verify against.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Operator token; without one a token is generated on the first start and shown once.
    #[arg(long, env = "SITECAST_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: Option<String>,
    /// Token appliances present on their first check-in; generated and shown once if not set.
    #[arg(long, env = "SITECAST_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: Option<String>,
    /// hawkBit DDI gateway token: devices of the tenant that present it may poll and are
    /// registered on their first poll (without it each needs its own target token).
    #[arg(long, env = "SITECAST_DDI_GATEWAY_TOKEN", hide_env_values = true)]
    ddi_gateway_token: Option<String>,
    /// The hawkBit tenant in DDI devices' URLs (`/{tenant}/controller/v1/...`).
    #[arg(long, default_value = "DEFAULT")]
    ddi_tenant: String,
    /// URL appliances reach this server at (default: from each request's Host header).
    #[arg(long)]
    public_url: Option<String>,
    /// Also serve the images over iroh-blobs (QUIC) on this address, e.g. 0.0.0.0:4434.
    #[arg(long)]
    iroh_listen: Option<SocketAddr>,
    #[arg(long, default_value_t = 5)]
    tick_secs: u64,
    #[arg(long, default_value_t = 60)]
    checkin_interval_secs: u64,
    /// An appliance that has not checked in for this long is offline.
    #[arg(long, default_value_t = 180)]
    offline_after_secs: u64,
    /// Connections one client address (IPv4, or IPv6 /64) may hold. Behind a TLS proxy every
    /// appliance comes from the proxy's address: raise this there.
    #[arg(long, default_value_t = 256)]
    max_connections_per_client: usize,
    /// Verified-range streams one client address may hold (of 64 in all). Behind a proxy,
    /// raise it to 64.
    #[arg(long, default_value_t = 16)]
    max_range_streams_per_client: usize,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); read again whenever it or
    /// the key changes, so a renewal needs no restart. Without it: plain HTTP (behind a TLS
    /// proxy, or in a lab).
    #[arg(long, requires = "tls_key")]
    tls_certificate: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_certificate")]
    tls_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    sitecast_coordinator::install_tls_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::GenerateDocs { dir } => Ok(sitecast_cli_docs::write(Cli::command(), &dir)?),
        Command::Release(command) => operator::release(command).await,
        Command::AgentRelease(command) => operator::agent_release(command).await,
        Command::Rollout(command) => operator::rollout(command).await,
        Command::Appliances(command) => operator::appliances(command).await,
        Command::Audit { client, after } => operator::audit(client, after).await,
        Command::DdiTarget(command) => operator::ddi_target(command).await,
        Command::Migrate { data_dir, database } => {
            let data_dir = data_dir.unwrap_or_else(default_data_dir);
            tokio::task::spawn_blocking(move || migrate(&data_dir, &database)).await?
        }
    }
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("sitecast-coordinator")
}

fn migrate(data_dir: &std::path::Path, database: &str) -> Result<()> {
    use sitecast_coordinator::store::RedbStore;
    let path = data_dir.join("state.redb");
    anyhow::ensure!(path.exists(), "no state in {} (is --data-dir right?)", data_dir.display());
    let from = RedbStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let to = PostgresStore::open(database).context("opening the PostgreSQL database")?;
    let copied = sitecast_coordinator::store::copy(&from, &to)?;
    println!(
        "copied {} releases, {} agent releases, {} rollouts, {} appliances, {} sites and {} audit \
         entries; start the server with --database and the same --data-dir (for the images)",
        copied.releases,
        copied.agent_releases,
        copied.rollouts,
        copied.appliances,
        copied.sites,
        copied.audit_entries
    );
    Ok(())
}

/// Opens the database once no other Central Command is using it: a standby's start. A
/// database that is down (restarting, not up yet at boot) is waited for too.
async fn take_over(url: &str, replica: bool) -> Result<PostgresStore> {
    url.parse::<postgres::Config>().context("--database")?;
    let mut waiting = false;
    let mut last_error = String::new();
    loop {
        let opening = url.to_owned();
        let open = move || match replica {
            true => PostgresStore::open_replica(&opening),
            false => PostgresStore::open(&opening),
        };
        match tokio::task::spawn_blocking(open).await? {
            Err(StoreError::InUse | StoreError::OtherFormat { .. }) => {
                if !std::mem::replace(&mut waiting, true) {
                    println!(
                        "standby: another Central Command is using the database; waiting to take over"
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                let error = error.to_string();
                if error != std::mem::replace(&mut last_error, error.clone()) {
                    eprintln!("standby: the database cannot be used yet ({error}); trying again");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(store) => {
                if waiting {
                    println!("standby: the database is free; taking over");
                }
                return Ok(store);
            }
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = ServerConfig::new(args.data_dir.unwrap_or_else(default_data_dir));
    if let Some(root) = &args.root {
        let bytes = std::fs::read(root).with_context(|| format!("reading {}", root.display()))?;
        config.root = Some(TrustedRoot::pin(&bytes).context("root of trust")?);
    }
    config.database = args.database;
    config.replica = args.replica;
    config.operator_token = args.operator_token;
    config.enrollment_token = args.enrollment_token;
    config.ddi_gateway_token = args.ddi_gateway_token;
    config.ddi_tenant = args.ddi_tenant;
    config.public_url = args.public_url;
    config.tick = Duration::from_secs(args.tick_secs.max(1));
    config.fleet.checkin_interval_secs = args.checkin_interval_secs;
    config.fleet.offline_after_secs = args.offline_after_secs;
    config.limits.max_connections_per_ip = args.max_connections_per_client;
    config.max_range_streams_per_client = args.max_range_streams_per_client;
    config.tls = match (args.tls_certificate, args.tls_key) {
        (Some(certificate), Some(key)) => Some(sitecast_tls::CertificateFiles { certificate, key }),
        _ => None,
    };
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let data_dir = config.data_dir.clone();
    let (coordinator, first_run) = match (&config.database, args.standby) {
        (Some(url), true) => {
            let store = take_over(url, args.replica).await?;
            Coordinator::open_with_store(config, Arc::new(SystemClock), Arc::new(store))?
        }
        _ => Coordinator::open(config, Arc::new(SystemClock))?,
    };
    if let Some(token) = first_run.operator {
        println!("operator token (shown once, keep it): {token}");
    }
    if let Some(token) = first_run.enrollment {
        println!("enrollment token for appliances (shown once): {token}");
    }
    if let Some(listen) = args.iroh_listen {
        for address in coordinator.enable_iroh(listen).await? {
            println!("iroh-blobs origin at {address}");
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("listening on {scheme}://{} (data in {})", listener.local_addr()?, data_dir.display());
    coordinator.serve(listener).await?;
    Ok(())
}
