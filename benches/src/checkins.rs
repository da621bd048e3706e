//! Signed check-ins as appliances send them, and a closed-loop load generator that measures
//! requests per second and latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use sitecast_manifest::SecretKey;
use sitecast_manifest::api;

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
