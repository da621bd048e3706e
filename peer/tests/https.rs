//! Appliances reach Central Command over HTTPS: served by Central Command itself, or through
//! a real TLS terminator (Debian's nginx) in front of it; with a certificate they must not
//! trust, they refuse, keep their state, and say why.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::nginx::Nginx;
use common::*;
use sitecast_tls::test_ca::TestCa;

/// How the agent's status says it refused the server (`ClientError::Certificate`).
const REFUSED: &str = "refused the coordinator's TLS certificate";

/// Polls the coordinator until the one appliance's update reaches `state`.
async fn wait_update_state(origin: &Origin, state: &str, agent: &AgentProcess, deadline: Instant) {
    loop {
        let list = appliances(origin).await;
        if list.first().is_some_and(|a| a["update"]["state"] == state) {
            return;
        }
        assert!(Instant::now() < deadline, "never {state}: {list:?}\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the agent's own status until its last error contains `words`.
async fn wait_error(agent: &mut AgentProcess, words: &str, deadline: Instant) -> String {
    loop {
        if let Some(code) = agent.exited() {
            panic!("{} exited with {code}:\n{}", agent.name, agent.log());
        }
        let status = agent.status().await.unwrap_or_default();
        if let Some(error) = status["last_error"].as_str().filter(|e| e.contains(words)) {
            return error.to_owned();
        }
        assert!(Instant::now() < deadline, "no `{words}` error: {status}\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_updates_over_central_commands_own_tls_and_refuses_certificates_it_must_not_trust()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet_ca = TestCa::new("fleet CA");
    let ca = fleet_ca.write_root(&dir.path().join("fleet-ca.pem"));
    // For `localhost` only: an agent that dials 127.0.0.1 meets a certificate for another name.
    let live = fleet_ca.issue(dir.path(), "server", &["localhost"], false);
    let tls = OriginTls { certificate: live.clone(), ca: ca.clone(), host: "localhost".into() };
    let origin = Origin::start_with(dir.path(), OriginOptions { tls: Some(tls) }).await;
    assert!(origin.url.starts_with("https://localhost:"), "{}", origin.url);
    origin.publish(2, 2 * 1024 * 1024 + 77).await;

    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", 4 << 20);
    agent.set_arg("--coordinator-ca", &ca.display().to_string());
    // For `sitecast-peer status`, which finds the agent through its configuration.
    let socket = dir.path().join("a1/state/control.sock");
    agent.configure(&format!("control_socket = \"{}\"\n", socket.display()));
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(90);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;
    // Downloaded from the origin over HTTPS (the only source), verified, reported.
    wait_update_state(&origin, "ready", &agent, deadline).await;
    assert!(origin.origin_bytes("store-1", 2).await >= 2 * 1024 * 1024);

    // Refusals: each agent's check-in fails on the certificate, and its status says which way.
    let port = origin.url.rsplit(':').next().expect("port").to_owned();
    let mut stranger =
        AgentProcess::new(&dir.path().join("stranger"), &origin, "store-1", "stranger", 1 << 20);
    let other_ca = TestCa::new("someone else's CA").write_root(&dir.path().join("other-ca.pem"));
    stranger.set_arg("--coordinator-ca", &other_ca.display().to_string());
    stranger.start();
    let error = wait_error(&mut stranger, REFUSED, deadline).await;
    assert!(error.contains("UnknownIssuer"), "{error}");

    let mut by_address = AgentProcess::new(
        &dir.path().join("by-address"),
        &origin,
        "store-1",
        "by-address",
        1 << 20,
    );
    by_address.set_coordinator(&format!("https://127.0.0.1:{port}"));
    by_address.set_arg("--coordinator-ca", &ca.display().to_string());
    by_address.start();
    let error = wait_error(&mut by_address, REFUSED, deadline).await;
    assert!(error.contains("not valid for name"), "{error}");

    // Without a pinned CA the system's roots are used, and they do not know the fleet's CA.
    let mut unpinned =
        AgentProcess::new(&dir.path().join("unpinned"), &origin, "store-1", "unpinned", 1 << 20);
    unpinned.start();
    let error = wait_error(&mut unpinned, REFUSED, deadline).await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    // A CA file that cannot be read: the agent runs on (its site, its status) and says why.
    let mut misconfigured =
        AgentProcess::new(&dir.path().join("no-ca"), &origin, "store-1", "no-ca", 1 << 20);
    misconfigured.set_arg("--coordinator-ca", "/nonexistent/ca.pem");
    misconfigured.start();
    let error = wait_error(&mut misconfigured, "TLS configuration", deadline).await;
    assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    assert_eq!(appliances(&origin).await.len(), 1, "none of them enrolled");

    // The certificate is renewed with an expired one (the server reloads it at the next
    // handshake; the agent's kept-alive connection is older, so it restarts, as after a
    // power cut): the enrolled agent refuses it and keeps everything it had.
    agent.kill();
    let before = agent.state_file();
    let expired = fleet_ca.issue(dir.path(), "expired", &["localhost"], true);
    replace(&expired, &live);
    agent.start();
    let error = wait_error(&mut agent, REFUSED, deadline).await;
    assert!(error.contains("expired"), "{error}");
    assert_eq!(agent.state_file(), before, "a refused check-in changes nothing");
    assert!(agent.exited().is_none(), "the agent runs on:\n{}", agent.log());
    let (_, status, _) = agent.cli(&["status"]);
    assert!(status.contains("expired"), "`sitecast-peer status` says why: {status}");

    // A good certificate again: the agent is back in contact and the error is gone.
    let renewed = fleet_ca.issue(dir.path(), "renewed", &["localhost"], false);
    replace(&renewed, &live);
    loop {
        let status = agent.status().await.unwrap_or_default();
        if status["last_error"].is_null() && status["last_contact"] != before["last_contact"] {
            break;
        }
        assert!(Instant::now() < deadline, "never back in contact: {status}\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts `new`'s key and certificate where `live`'s are, key first: in between, the server
/// sees a certificate without its key and keeps the old pair.
fn replace(new: &sitecast_tls::CertificateFiles, live: &sitecast_tls::CertificateFiles) {
    std::fs::copy(&new.key, &live.key).expect("key");
    std::fs::copy(&new.certificate, &live.certificate).expect("certificate");
}

/// Debian's nginx terminating TLS in front of a plain-HTTP coordinator.
fn tls_terminator(
    dir: &Path,
    certificate: &sitecast_tls::CertificateFiles,
    upstream: &str,
) -> Nginx {
    Nginx::start(dir, |port| {
        format!(
            "server {{\n    listen 127.0.0.1:{port} ssl;\n\
               ssl_certificate {}; ssl_certificate_key {};\n\
               client_max_body_size 0;\n\
               location / {{\n      proxy_pass {upstream};\n      proxy_http_version 1.1;\n\
                 proxy_set_header Host $http_host;\n\
                 proxy_set_header X-Forwarded-Proto https;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                 proxy_buffering off;\n    }}\n  }}",
            certificate.certificate.display(),
            certificate.key.display(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_updates_through_a_tls_terminator_in_front_of_central_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let fleet_ca = TestCa::new("fleet CA");
    let ca = fleet_ca.write_root(&dir.path().join("fleet-ca.pem"));
    let certificate = fleet_ca.issue(dir.path(), "proxy", &["localhost"], false);
    let nginx = tls_terminator(&dir.path().join("nginx"), &certificate, &origin.url);
    origin.publish(2, 2 * 1024 * 1024 + 77).await;

    let mut agent = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", 4 << 20);
    agent.set_coordinator(&format!("https://localhost:{}", nginx.port));
    agent.set_arg("--coordinator-ca", &ca.display().to_string());
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(90);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;
    wait_update_state(&origin, "ready", &agent, deadline).await;

    // Check-ins, the image's verified ranges and the reports all went through the proxy: the
    // coordinator told the agent its URLs are https:// (X-Forwarded-Proto), not its own.
    let log = nginx.access_log();
    for path in ["/api/appliances/checkin", "/api/blobs/", "/api/appliances/report"] {
        assert!(log.contains(path), "{path} not proxied:\n{log}");
    }
    assert!(origin.origin_bytes("store-1", 2).await >= 2 * 1024 * 1024);
}
