//! `sitecast-coordinator`: the server (`serve`) and the operator CLI that talks to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use sitecast_coordinator::engine::{StagePlan, Strategy};
use sitecast_coordinator::server::{Coordinator, ServerConfig, SystemClock};
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

#[derive(Args, Clone)]
struct ClientArgs {
    #[arg(long, env = "SITECAST_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, env = "SITECAST_OPERATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the server's JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Trust only this CA (PEM) for an https:// URL, instead of the system's roots.
    #[arg(long, env = "SITECAST_CA_FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Upload a signed manifest and its image (streamed), or name an image already on the server.
    Publish {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, conflicts_with = "server_path")]
        image: Option<PathBuf>,
        /// A path on the coordinator's own disk; it is copied in, so the file may change later.
        #[arg(long)]
        server_path: Option<PathBuf>,
    },
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    Deactivate {
        #[command(flatten)]
        client: ClientArgs,
        version: u64,
    },
}

#[derive(Subcommand)]
enum AgentReleaseCommand {
    /// Publish a signed agent release whose builds are directories on the coordinator's own
    /// disk (copied in, each file checked against the manifest).
    Publish {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        manifest: PathBuf,
        /// PLATFORM=DIR on the coordinator (repeat per platform of the manifest).
        #[arg(long = "build", required = true)]
        builds: Vec<String>,
    },
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// The release (with --agent: the agent release) to roll out.
        #[arg(long)]
        version: u64,
        /// Roll out an agent release, not an image release.
        #[arg(long)]
        agent: bool,
        /// With --agent: switch only inside each appliance's maintenance window.
        #[arg(long, requires = "agent")]
        in_window: bool,
        #[arg(long, value_enum, default_value = "staged")]
        strategy: StrategyArg,
        /// A stage as PERCENT:DELAY_HOURS (repeat; default 5:24, 25:24, 100:0).
        #[arg(long = "stage")]
        stages: Vec<String>,
        /// Only appliances of these groups.
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long)]
        failure_threshold: Option<f64>,
    },
    Pause {
        #[command(flatten)]
        client: ClientArgs,
        id: u64,
    },
    Resume {
        #[command(flatten)]
        client: ClientArgs,
        id: u64,
    },
    Advance {
        #[command(flatten)]
        client: ClientArgs,
        id: u64,
    },
    Rollback {
        #[command(flatten)]
        client: ClientArgs,
        id: u64,
    },
    Status {
        #[command(flatten)]
        client: ClientArgs,
        id: Option<u64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StrategyArg {
    Immediate,
    Staged,
    Canary,
}

#[derive(Subcommand)]
enum AppliancesCommand {
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
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
        Command::Release(command) => release(command).await,
        Command::AgentRelease(command) => agent_release(command).await,
        Command::Rollout(command) => rollout(command).await,
        Command::Appliances(AppliancesCommand::List { client }) => {
            let list = Client::new(&client)?.get("/api/appliances").await?;
            print(&client, &list, |list| {
                for a in list.as_array().into_iter().flatten() {
                    println!(
                        "{:.16}  {:<12} {:<12} v{:<4} {:<12} {}",
                        a["key"].as_str().unwrap_or(""),
                        a["site"].as_str().unwrap_or(""),
                        a["name"].as_str().unwrap_or(""),
                        a["installed_version"],
                        a["update"]["state"].as_str().unwrap_or("-"),
                        if a["online"].as_bool() == Some(true) { "online" } else { "offline" }
                    );
                }
            });
            Ok(())
        }
        Command::Audit { client, after } => {
            let entries = Client::new(&client)?.get(&format!("/api/audit?after={after}")).await?;
            print(&client, &entries, |entries| {
                for e in entries.as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {} {:<24} {:<22} {}",
                        e["seq"],
                        e["at"].as_str().unwrap_or(""),
                        e["actor"].as_str().unwrap_or("").chars().take(24).collect::<String>(),
                        e["action"].as_str().unwrap_or(""),
                        e["detail"]
                    );
                }
            });
            Ok(())
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

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = ServerConfig::new(args.data_dir.unwrap_or_else(default_data_dir));
    if let Some(root) = &args.root {
        let bytes = std::fs::read(root).with_context(|| format!("reading {}", root.display()))?;
        config.root = Some(TrustedRoot::pin(&bytes).context("root of trust")?);
    }
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
    let (coordinator, first_run) = Coordinator::open(config, Arc::new(SystemClock))?;
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

/// The operator's HTTP client.
struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Self> {
        let mut http = reqwest::Client::builder();
        if args.url.starts_with("https://") {
            let trust = match &args.ca_file {
                Some(path) => sitecast_tls::Trust::CaFile(path.clone()),
                None => sitecast_tls::Trust::SystemRoots,
            };
            http = http.tls_backend_preconfigured(sitecast_tls::client_config(&trust)?);
        }
        Ok(Self {
            http: http.build()?,
            url: args.url.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request.send().await.with_context(|| format!("reaching {}", self.url))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned));
            bail!("{status}: {}", message.unwrap_or(text));
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.send(self.request(reqwest::Method::POST, path).json(&body)).await
    }
}

fn print(client: &ClientArgs, value: &Value, human: impl FnOnce(&Value)) {
    if client.json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        human(value);
    }
}

async fn agent_release(command: AgentReleaseCommand) -> Result<()> {
    match command {
        AgentReleaseCommand::Publish { client, manifest, builds } => {
            let manifest_text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let mut dirs = serde_json::Map::new();
            for build in builds {
                let Some((platform, dir)) = build.split_once('=') else {
                    bail!("--build {build:?}: expected PLATFORM=DIR");
                };
                dirs.insert(platform.to_owned(), Value::String(dir.to_owned()));
            }
            let body = json!({"manifest": manifest_text, "builds": dirs});
            let record = Client::new(&client)?.post("/api/agent-releases", body).await?;
            print(&client, &record, |r| {
                println!("published agent release {} for {}", r["version"], r["platforms"]);
            });
        }
        AgentReleaseCommand::List { client } => {
            let list = Client::new(&client)?.get("/api/agent-releases").await?;
            print(&client, &list, |list| {
                for r in list.as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {:<14} {}",
                        r["version"],
                        r["version_name"].as_str().unwrap_or(""),
                        r["platforms"]
                    );
                }
            });
        }
    }
    Ok(())
}

async fn release(command: ReleaseCommand) -> Result<()> {
    match command {
        ReleaseCommand::Publish { client, manifest, image, server_path } => {
            let manifest_text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let http = Client::new(&client)?;
            let record = match (image, server_path) {
                (Some(image), None) => {
                    let file = tokio::fs::File::open(&image)
                        .await
                        .with_context(|| format!("opening {}", image.display()))?;
                    let len = file.metadata().await?.len();
                    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
                    let part = reqwest::multipart::Part::stream_with_length(
                        reqwest::Body::wrap_stream(stream),
                        len,
                    )
                    .file_name("image")
                    .mime_str("application/octet-stream")?;
                    let form = reqwest::multipart::Form::new()
                        .text("manifest", manifest_text)
                        .part("image", part);
                    http.send(http.request(reqwest::Method::POST, "/api/releases").multipart(form))
                        .await?
                }
                (None, Some(path)) => {
                    http.post(
                        "/api/releases",
                        json!({"manifest": manifest_text, "image_path": path}),
                    )
                    .await?
                }
                _ => bail!("give --image (upload) or --server-path (a file on the coordinator)"),
            };
            print(&client, &record, |r| {
                println!(
                    "published release {} ({}), {} bytes, blake3 {}",
                    r["version"],
                    r["version_name"].as_str().unwrap_or(""),
                    r["size"],
                    r["blake3"].as_str().unwrap_or("")
                );
            });
        }
        ReleaseCommand::List { client } => {
            let list = Client::new(&client)?.get("/api/releases").await?;
            print(&client, &list, |list| {
                for r in list.as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {:<14} {:>12} bytes  {}  {}",
                        r["version"],
                        r["version_name"].as_str().unwrap_or(""),
                        r["size"],
                        if r["active"].as_bool() == Some(true) { "active" } else { "inactive" },
                        r["blake3"].as_str().unwrap_or("")
                    );
                }
            });
        }
        ReleaseCommand::Deactivate { client, version } => {
            Client::new(&client)?
                .post(&format!("/api/releases/{version}/deactivate"), Value::Null)
                .await?;
            println!("release {version} deactivated");
        }
    }
    Ok(())
}

fn parse_stage(text: &str) -> Result<StagePlan> {
    let (percent, delay) = text.split_once(':').unwrap_or((text, "0"));
    Ok(StagePlan {
        percent: percent.parse().context("stage percent")?,
        delay_hours: delay.parse().context("stage delay hours")?,
    })
}

fn show_rollout(r: &Value) {
    let stages = r["stages"].as_array().map_or(0, Vec::len);
    println!(
        "rollout {} of {} {}: {} ({}), stage {}/{}, failure rate {:.0}% (threshold {:.0}%){}",
        r["id"],
        if r["kind"] == "agent" { "agent release" } else { "release" },
        r["version"],
        r["state"].as_str().unwrap_or(""),
        r["strategy"].as_str().unwrap_or(""),
        r["current_stage"].as_u64().unwrap_or(0) + 1,
        stages,
        r["failure_rate"].as_f64().unwrap_or(0.0) * 100.0,
        r["failure_threshold"].as_f64().unwrap_or(0.0) * 100.0,
        r["paused_reason"].as_str().map(|s| format!(" - {s}")).unwrap_or_default()
    );
    for (i, counts) in r["stage_counts"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  stage {} ({}%): {} appliances {}",
            i + 1,
            r["stages"][i]["percent"],
            counts["members"],
            counts["by_state"]
        );
    }
}

async fn rollout(command: RolloutCommand) -> Result<()> {
    let (client, path, body) = match command {
        RolloutCommand::Create {
            client,
            version,
            agent,
            in_window,
            strategy,
            stages,
            groups,
            failure_threshold,
        } => {
            let strategy = match strategy {
                StrategyArg::Immediate => Strategy::Immediate,
                StrategyArg::Staged => Strategy::Staged,
                StrategyArg::Canary => Strategy::Canary,
            };
            let stages = if stages.is_empty() {
                None
            } else {
                Some(stages.iter().map(|s| parse_stage(s)).collect::<Result<Vec<_>>>()?)
            };
            let kind = if agent { "agent" } else { "image" };
            let body = json!({"kind": kind, "version": version, "strategy": strategy, "stages": stages,
                "groups": groups, "failure_threshold": failure_threshold, "in_window": in_window});
            (client, "/api/rollouts".to_owned(), Some(body))
        }
        RolloutCommand::Pause { client, id } => (client, format!("/api/rollouts/{id}/pause"), None),
        RolloutCommand::Resume { client, id } => {
            (client, format!("/api/rollouts/{id}/resume"), None)
        }
        RolloutCommand::Advance { client, id } => {
            (client, format!("/api/rollouts/{id}/advance"), None)
        }
        RolloutCommand::Rollback { client, id } => {
            (client, format!("/api/rollouts/{id}/rollback"), None)
        }
        RolloutCommand::Status { client, id } => {
            let http = Client::new(&client)?;
            let path = id.map_or("/api/rollouts".to_owned(), |id| format!("/api/rollouts/{id}"));
            let value = http.get(&path).await?;
            print(&client, &value, |v| match v.as_array() {
                Some(list) if list.is_empty() => println!("no rollouts"),
                Some(list) => list.iter().for_each(show_rollout),
                None => show_rollout(v),
            });
            return Ok(());
        }
    };
    let value = Client::new(&client)?.post(&path, body.unwrap_or(Value::Null)).await?;
    print(&client, &value, show_rollout);
    Ok(())
}
