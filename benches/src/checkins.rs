//! Central Command on a runtime of its own, signed check-ins as appliances send them, and a
//! closed-loop load generator that measures requests per second and latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use sitecast_coordinator::server::{Coordinator, ServerConfig, SystemClock};
use sitecast_manifest::SecretKey;
use sitecast_manifest::api;

/// A Central Command on a runtime (two threads) of its own, as in production, with the
/// bench's tokens and no limit on enrolling; stopped (its database connection closed, its
/// locks let go) when dropped.
#[derive(Debug)]
pub struct Server {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(mut config: ServerConfig) -> Self {
        config.operator_token = Some("bench-operator".into());
        config.enrollment_token = Some("bench-enroll".into());
        // The benches enroll their whole fleet at once.
        config.enroll_burst = u32::MAX;
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("rt");
            runtime.block_on(async move {
                let (coordinator, _) =
                    Coordinator::open(config, Arc::new(SystemClock)).expect("open");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let url = format!("http://{}", listener.local_addr().expect("addr"));
                url_tx.send(url).expect("send");
                tokio::select! {
                    served = coordinator.serve(listener) => served.expect("serve"),
                    _ = stopped => {}
                }
            });
        });
        let url = url_rx.recv().expect("server url");
        Self { url, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Requests in flight at once.
pub const CONCURRENCY: usize = 64;

pub fn checkin_body(site: usize, version: u64, enroll: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "site": format!("site-{site}"),
        "platform": "x86_64-appliance",
        "installed_version": version,
        "enrollment_token": if enroll { Some("bench-enroll") } else { None },
    }))
    .expect("json")
}

/// A check-in to `url`, signed by `key` now.
pub fn signed(
    client: &reqwest::Client,
    url: &str,
    key: &SecretKey,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let timestamp = Timestamp::now().as_second();
    let message = api::appliance_signing_bytes("POST", "/api/appliances/checkin", timestamp, &body);
    client
        .post(format!("{url}/api/appliances/checkin"))
        .header(api::HEADER_APPLIANCE, key.public().to_hex())
        .header(api::HEADER_TIMESTAMP, timestamp.to_string())
        .header(api::HEADER_SIGNATURE, key.sign(&message).to_hex())
        .header("content-type", "application/json")
        .body(body)
}

/// Runs [`CONCURRENCY`] loops of `request` for `seconds`; returns (requests/s, p50, p99).
pub async fn load<F, Fut>(seconds: u64, request: F) -> (f64, Duration, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let request = Arc::new(request);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let request = Arc::clone(&request);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = worker;
            while Instant::now() < deadline {
                let start = Instant::now();
                request(i).await;
                latencies.push(start.elapsed());
                i += CONCURRENCY;
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (all.len() as f64 / elapsed.as_secs_f64(), at(0.50), at(0.99))
}

/// One line of a load table: rate, percentiles, and the rate as a ratio of `baseline`'s.
pub fn row(name: &str, (rate, p50, p99): (f64, Duration, Duration), baseline: f64) {
    println!(
        "  {name:<44} {rate:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ratio {:.2}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        rate / baseline
    );
}
