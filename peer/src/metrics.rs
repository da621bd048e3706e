//! The agent's Prometheus metrics, served as text on a small HTTP listener.

use std::fmt::Write as _;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// This process's peak resident set size (`VmHWM`), on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[derive(Debug, Default, Clone)]
pub struct AgentMetrics {
    pub download_seconds: Option<f64>,
    pub apply_seconds: Option<f64>,
    pub reboot_seconds: Option<f64>,
    pub rollback_count: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_lan: u64,
    pub bytes_from_mirror: u64,
    pub bytes_reused: u64,
    pub bytes_uploaded: u64,
    pub peers: u64,
    pub peers_found_by_mdns: u64,
    pub checkins: u64,
    pub checkin_errors: u64,
    pub lan_refused: u64,
    pub announcements_ignored: u64,
}

#[derive(Debug, Default)]
pub struct Metrics(Mutex<AgentMetrics>);

impl Metrics {
    pub fn update(&self, f: impl FnOnce(&mut AgentMetrics)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn snapshot(&self) -> AgentMetrics {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn render(&self) -> String {
        let m = self.snapshot();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if let Some(value) = value {
                let _ = writeln!(out, "{name} {value}");
            }
        };
        family(
            "update_download_seconds",
            "gauge",
            "Time the last update took to download and verify.",
            m.download_seconds,
        );
        family(
            "update_apply_seconds",
            "gauge",
            "Time the last update took to read back and activate.",
            m.apply_seconds,
        );
        family(
            "update_reboot_seconds",
            "gauge",
            "Time from reboot to the health gate's verdict.",
            m.reboot_seconds,
        );
        family(
            "update_rollback_count",
            "counter",
            "Updates that ended on the old slot.",
            Some(m.rollback_count as f64),
        );
        family(
            "sitecast_bytes_from_origin_total",
            "counter",
            "Release bytes fetched from the origin.",
            Some(m.bytes_from_origin as f64),
        );
        family(
            "sitecast_bytes_from_lan_total",
            "counter",
            "Release bytes fetched from LAN peers.",
            Some(m.bytes_from_lan as f64),
        );
        family(
            "sitecast_bytes_from_mirror_total",
            "counter",
            "Release bytes fetched from the release's mirrors (CDN, object store, nginx).",
            Some(m.bytes_from_mirror as f64),
        );
        family(
            "sitecast_bytes_reused_total",
            "counter",
            "Release bytes copied from the active slot (shared with the running image).",
            Some(m.bytes_reused as f64),
        );
        family(
            "sitecast_bytes_uploaded_total",
            "counter",
            "Release bytes served to LAN peers.",
            Some(m.bytes_uploaded as f64),
        );
        family(
            "sitecast_peers",
            "gauge",
            "Site peers connected on the control plane.",
            Some(m.peers as f64),
        );
        family(
            "sitecast_peers_found_by_mdns_total",
            "counter",
            "Site peers found by multicast DNS.",
            Some(m.peers_found_by_mdns as f64),
        );
        family(
            "sitecast_checkins_total",
            "counter",
            "Successful check-ins.",
            Some(m.checkins as f64),
        );
        family(
            "sitecast_checkin_errors_total",
            "counter",
            "Failed check-ins.",
            Some(m.checkin_errors as f64),
        );
        family(
            "sitecast_lan_refused_total",
            "counter",
            "LAN connections and requests refused to appliances that are not site members.",
            Some(m.lan_refused as f64),
        );
        family(
            "sitecast_announcements_ignored_total",
            "counter",
            "Site announcements of appliances that are not site members, ignored.",
            Some(m.announcements_ignored as f64),
        );
        out
    }
}

/// Answers every connection with the metrics text (one request per connection).
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let metrics = std::sync::Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_non_members_are_exported() {
        let metrics = Metrics::default();
        metrics.update(|m| {
            m.lan_refused = 3;
            m.announcements_ignored = 5;
        });
        let text = metrics.render();
        assert!(text.contains("\nsitecast_lan_refused_total 3\n"), "{text}");
        assert!(text.contains("\nsitecast_announcements_ignored_total 5\n"), "{text}");
    }
}
