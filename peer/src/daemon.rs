//! The agent daemon as a library call: control socket, metrics listener, LAN node, agent.
//! `sitecast-peer run` and the demo's agent processes both use it.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::agent::{Agent, Exit, Status};
use crate::config::AgentConfig;
use crate::metrics::Metrics;

/// The LAN node shares the appliance's identity key (it is also its iroh endpoint id), and
/// both planes one membership, which the agent sets from its check-ins.
pub async fn bind_lan(config: &AgentConfig) -> Result<Arc<dyn crate::agent::Lan>> {
    let key = crate::identity::load_or_create(&config.state_dir.join("identity.key"))?;
    let listen =
        config.lan_listen.parse().with_context(|| format!("lan_listen {:?}", config.lan_listen))?;
    let limits = crate::lan::UploadLimits {
        streams: config.max_upload_peers,
        total_bytes_per_sec: config.upload_limit_bytes_per_sec,
        per_peer_bytes_per_sec: config.upload_limit_per_peer_bytes_per_sec,
    };
    let membership = crate::membership::Membership::default();
    let node = crate::lan::LanNode::bind(&key, listen, limits, membership.clone()).await?;
    tracing::info!(id = %hex::encode(node.id().0), addrs = ?node.advertised_addrs(), "LAN endpoint bound");
    let site = crate::site::SiteControl::start(
        &key,
        crate::site::SiteConfig {
            site: config.site.clone(),
            listen: config.libp2p_listen.clone(),
            mdns: config.mdns,
            heartbeat: std::time::Duration::from_secs(1),
            membership,
        },
    )
    .await?;
    for peer in &config.static_peers {
        // A bad entry (e.g. the old `<id>@<ip:port>` form) must not keep the agent from
        // starting: that would turn a config mistake into failed boots.
        if let Err(error) = site.dial(peer) {
            tracing::error!(%error, "static peer {peer:?} ignored");
        }
    }
    tracing::info!(addrs = ?site.addresses(), mdns = config.mdns, "site control plane listening");
    Ok(Arc::new(crate::lan::LanNodeForAgent::new(node, site, config.coordinator_peers)))
}

/// glibc gives each thread that contends for the heap an arena of its own (up to eight per
/// core), and memory freed in an arena stays there: with the transfer's blocking threads
/// (decode, write, serve) the agent's peak RSS grew with the image, to 72 MiB for 4 GiB;
/// with two arenas it stays near 52 MiB.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter, and glibc takes its own lock for it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Runs the agent until it reboots (or asks its supervisor to restart it).
pub async fn run(config: AgentConfig) -> Result<Exit> {
    limit_malloc_arenas();
    let metrics = Arc::new(Metrics::default());
    let status = Arc::new(Mutex::new(Status::default()));
    let (commands_tx, commands) = tokio::sync::mpsc::channel(8);
    if let Some(dir) = config.control_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let socket = config.control_socket.clone();
    let control_status = Arc::clone(&status);
    tokio::spawn(async move {
        if let Err(error) = crate::control::serve(&socket, commands_tx, control_status).await {
            tracing::error!(%error, "control socket");
        }
    });
    if !config.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.metrics_listen)
            .await
            .context("metrics listener")?;
        tokio::spawn(crate::metrics::serve(listener, Arc::clone(&metrics)));
    }
    let lan = bind_lan(&config).await?;
    let agent = Agent::new(config, metrics, status, Some(Arc::clone(&lan)))?;
    let exit = agent.run(commands).await;
    // The reboot command has run (or the supervisor restarts us): end the connections
    // cleanly so peers see them close at once.
    lan.close().await;
    exit
}
