//! Central Command with its state in PostgreSQL, alone and as two replicas sharing the
//! database, against one server on redb, in the same run: signed check-ins per second (spread
//! over the replicas as a load balancer would) and enrollments (each a durable, audited
//! commit, 64 at a time, so replicas contend for the log).
//!
//! `SITECAST_BENCH_DATABASE='host=/tmp/benchpg user=postgres dbname=postgres' cargo bench -p sitecast-benches --bench replicas`
//! (`SITECAST_BENCH_APPLIANCES`, default 2000; `SITECAST_BENCH_SECONDS`, default 5). The
//! database's `public` schema is dropped and made again before each configuration. Without
//! a database the bench says so and measures nothing.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use sitecast_benches::checkins::{CONCURRENCY, Server, checkin_body, load, row, signed};
use sitecast_coordinator::server::ServerConfig;
use sitecast_manifest::SecretKey;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Empties the database: every table, and the schema's migrations with them.
fn reset(database: &str) {
    let mut client = postgres::Client::connect(database, postgres::NoTls).expect("connect");
    client.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public").expect("reset");
}

/// (enrollments per second, check-ins per second with p50 and p99).
fn measure(
    urls: &[String],
    keys: &Arc<Vec<SecretKey>>,
    seconds: u64,
) -> (f64, (f64, std::time::Duration, std::time::Duration)) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    runtime.block_on(async {
        let client =
            reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
        let urls: Arc<Vec<String>> = Arc::new(urls.to_vec());
        let enrolling = Instant::now();
        let workers = (0..CONCURRENCY).map(|worker| {
            let (client, urls, keys) = (client.clone(), Arc::clone(&urls), Arc::clone(keys));
            async move {
                for i in (worker..keys.len()).step_by(CONCURRENCY) {
                    let url = &urls[i % urls.len()];
                    let body = checkin_body(i % 100, 1, true);
                    let response = signed(&client, url, &keys[i], body).send().await;
                    let status = response.expect("enroll").status();
                    assert!(status.is_success(), "enrollment answered {status}");
                }
            }
        });
        join_all(workers).await;
        let enrollments = keys.len() as f64 / enrolling.elapsed().as_secs_f64();
        let (client, keys) = (client.clone(), Arc::clone(keys));
        let checkins = load(seconds, move |i| {
            let url = &urls[i % urls.len()];
            let request =
                signed(&client, url, &keys[i % keys.len()], checkin_body(i % 100, 1, false));
            async move {
                let response = request.send().await.expect("checkin");
                assert!(response.status().is_success());
                response.bytes().await.expect("body");
            }
        })
        .await;
        (enrollments, checkins)
    })
}

fn main() {
    sitecast_coordinator::install_tls_provider();
    let Ok(database) = std::env::var("SITECAST_BENCH_DATABASE") else {
        println!(
            "replicas: skipped, SITECAST_BENCH_DATABASE (a PostgreSQL connection string) is not set"
        );
        return;
    };
    let appliances = env_number("SITECAST_BENCH_APPLIANCES", 2000) as usize;
    let seconds = env_number("SITECAST_BENCH_SECONDS", 5);
    let keys: Arc<Vec<SecretKey>> =
        Arc::new((0..appliances).map(|_| SecretKey::generate().expect("rng")).collect());
    println!(
        "Central Command replicas: {appliances} appliances, {CONCURRENCY} concurrent, {seconds} s of check-ins; servers and client on this 2-core machine"
    );
    let mut baseline = None;
    for (name, on_postgres, replicas) in [
        ("redb, one server", false, 1),
        ("PostgreSQL, one server", true, 1),
        ("PostgreSQL, two replicas", true, 2),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        if on_postgres {
            reset(&database);
        }
        let servers: Vec<Server> = (0..replicas)
            .map(|_| {
                let mut config = ServerConfig::new(dir.path().join("data"));
                config.database = on_postgres.then(|| database.clone());
                config.replica = replicas > 1;
                Server::start(config)
            })
            .collect();
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let (enrollments, checkins) = measure(&urls, &keys, seconds);
        let baseline = *baseline.get_or_insert(checkins.0);
        row(&format!("{name}: signed check-ins"), checkins, baseline);
        println!("  {:<44} {enrollments:>8.0} /s", format!("{name}: enrollments, 64 at a time"));
        drop(servers);
    }
    println!("  (ratio: check-ins per second against redb, one server)");
}
