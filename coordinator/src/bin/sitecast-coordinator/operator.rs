//! The operator's commands: a thin client of Central Command's HTTP API, printing a summary
//! (or, with `--json`, the server's answer).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sitecast_coordinator::engine::{StagePlan, Strategy};

#[derive(Args, Clone)]
pub(crate) struct ClientArgs {
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
pub(crate) enum ReleaseCommand {
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
    /// Name other HTTP origins of a release's image (a CDN, an object store, nginx), tried
    /// in order before Central Command; none: Central Command alone. Each must answer
    /// `Range` requests with the release's bytes (checked now); appliances verify every
    /// group they fetch from it.
    Mirrors {
        #[command(flatten)]
        client: ClientArgs,
        version: u64,
        urls: Vec<String>,
    },
    /// Publish a SWUpdate artifact (.swu, signed with your SWUpdate key) with a release, or
    /// alone as a release of its own, for devices that speak hawkBit DDI (streamed).
    Swu {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        version: u64,
        /// The .swu file; its name is the name devices are given.
        #[arg(long)]
        file: PathBuf,
        /// With no release VERSION yet: the name of the release this artifact makes alone.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AgentReleaseCommand {
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
pub(crate) enum RolloutCommand {
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
pub(crate) enum StrategyArg {
    Immediate,
    Staged,
    Canary,
}

#[derive(Subcommand)]
pub(crate) enum AppliancesCommand {
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
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

pub(crate) async fn agent_release(command: AgentReleaseCommand) -> Result<()> {
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
                println!("{:>6} {:<14} PLATFORMS", "AGENT", "NAME");
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

pub(crate) async fn release(command: ReleaseCommand) -> Result<()> {
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
                println!(
                    "{:>7} {:<14} {:>12}  {:<8}  {:<16}  BLAKE3",
                    "RELEASE", "NAME", "BYTES", "STATUS", "SWUPDATE"
                );
                for r in list.as_array().into_iter().flatten() {
                    println!(
                        "{:>7} {:<14} {:>12}  {:<8}  {:<16}  {}",
                        r["version"],
                        r["version_name"].as_str().unwrap_or(""),
                        r["size"],
                        if r["active"].as_bool() == Some(true) { "active" } else { "inactive" },
                        r["swu"]["filename"].as_str().unwrap_or("-"),
                        r["blake3"].as_str().filter(|h| !h.is_empty()).unwrap_or("(no image)")
                    );
                }
            });
        }
        ReleaseCommand::Swu { client, version, file, name } => {
            let filename = file
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{} has no file name", file.display()))?
                .to_owned();
            let body = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let stream = tokio_util::io::ReaderStream::with_capacity(body, 256 * 1024);
            let http = Client::new(&client)?;
            let mut path = format!("/api/releases/{version}/swu/{filename}");
            if let Some(name) = &name {
                path.push_str(&format!("?name={}", percent_encoded(name)));
            }
            let request =
                http.request(reqwest::Method::PUT, &path).body(reqwest::Body::wrap_stream(stream));
            let record = http.send(request).await?;
            print(&client, &record, |r| {
                let swu = &r["swu"];
                println!(
                    "release {version}: {} ({} bytes, sha256 {}) for DDI devices",
                    swu["filename"].as_str().unwrap_or(""),
                    swu["size"],
                    swu["sha256"].as_str().unwrap_or("")
                );
            });
        }
        ReleaseCommand::Deactivate { client, version } => {
            Client::new(&client)?
                .post(&format!("/api/releases/{version}/deactivate"), Value::Null)
                .await?;
            println!("release {version} deactivated");
        }
        ReleaseCommand::Mirrors { client, version, urls } => {
            let body = serde_json::json!({ "mirrors": urls });
            let http = Client::new(&client)?;
            let path = format!("/api/releases/{version}/mirrors");
            http.send(http.request(reqwest::Method::PUT, &path).json(&body)).await?;
            match urls.len() {
                0 => {
                    println!("release {version}: no mirrors; appliances fetch from Central Command")
                }
                n => println!("release {version}: {n} mirror(s) checked and named"),
            }
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

pub(crate) async fn rollout(command: RolloutCommand) -> Result<()> {
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

#[derive(Subcommand)]
pub(crate) enum DdiTargetCommand {
    /// Register a device that speaks hawkBit DDI (or give it a new target token); the token
    /// is printed once.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// The device's controller id (`id` in SWUpdate's suricatta section).
        #[arg(long)]
        controller_id: String,
        #[arg(long)]
        site: String,
        /// The group rollouts and pins may target it by.
        #[arg(long)]
        group: Option<String>,
    },
}

pub(crate) async fn appliances(command: AppliancesCommand) -> Result<()> {
    let AppliancesCommand::List { client } = command;
    let list = Client::new(&client)?.get("/api/appliances").await?;
    print(&client, &list, |list| {
        println!(
            "{:<16}  {:<12} {:<12} {:<11} {:<5} {:<12} STATUS",
            "KEY", "SITE", "NAME", "CLIENT", "VER", "UPDATE"
        );
        for a in list.as_array().into_iter().flatten() {
            println!(
                "{:<16.16}  {:<12} {:<12} {:<11} v{:<4} {:<12} {}",
                a["key"].as_str().unwrap_or(""),
                a["site"].as_str().unwrap_or(""),
                a["name"].as_str().unwrap_or(""),
                if a["ddi"].is_object() { "hawkbit-ddi" } else { "sitecast" },
                a["installed_version"],
                a["update"]["state"].as_str().unwrap_or("-"),
                if a["online"].as_bool() == Some(true) { "online" } else { "offline" }
            );
        }
    });
    Ok(())
}

pub(crate) async fn audit(client: ClientArgs, after: u64) -> Result<()> {
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

pub(crate) async fn ddi_target(command: DdiTargetCommand) -> Result<()> {
    let DdiTargetCommand::Add { client, controller_id, site, group } = command;
    let body = json!({"controller_id": controller_id, "site": site, "group": group});
    let target = Client::new(&client)?.post("/api/ddi/targets", body).await?;
    print(&client, &target, |t| {
        println!("registered {}", t["appliance"].as_str().unwrap_or(""));
        println!("target token (shown once): {}", t["target_token"].as_str().unwrap_or(""));
    });
    Ok(())
}

/// `text` for a URL's query: unreserved characters as they are, every other byte as `%XX`.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
