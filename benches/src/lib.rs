//! Benchmarks that print ratios against raw baselines measured in the same run, so a figure
//! means the same on any machine. Run them with `cargo bench -p sitecast-benches`; the figures
//! we keep are in `docs/performance.md`.
//!
//! This library holds what the benchmarks share: test data and a timer that reports the best
//! of several runs (the least disturbed by the other work on a small machine), and signed
//! check-ins with a load generator ([`checkins`]).

pub mod checkins;

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes to use, from `SITECAST_BENCH_MIB` (default `default_mib`).
pub fn bench_bytes(default_mib: u64) -> u64 {
    let mib = std::env::var("SITECAST_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_mib);
    mib * 1024 * 1024
}

/// Writes `len` bytes of incompressible, reproducible data to `path`.
pub fn write_test_image(path: &Path, len: u64) -> io::Result<()> {
    sitecast_iso::generate::write_image(path, len, "sitecast benchmark image")
}

/// Runs `f` `runs` times and returns the fastest time with the last result.
pub fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let value = f();
        best = best.min(start.elapsed());
        last = Some(value);
    }
    (best, last.expect("at least one run"))
}

/// Throughput in MiB/s.
pub fn mib_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / time.as_secs_f64()
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    sitecast_peer::metrics::peak_rss_bytes()
}

/// nginx serving one directory on a free loopback port (a baseline; `None` if not installed).
#[derive(Debug)]
pub struct Nginx {
    pub url: String,
    child: std::process::Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn nginx(dir: &Path, image: &Path) -> Option<Nginx> {
    let binary =
        ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let root = image.parent()?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).ok()?;
    let config = format!(
        "daemon off; worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log;
         events {{ worker_connections 64; }}
         http {{ access_log off; sendfile on; tcp_nopush on;
                client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
                server {{ listen 127.0.0.1:{port}; root {root}; }} }}",
        prefix = prefix.display(),
        root = root.display()
    );
    let config_path = prefix.join("nginx.conf");
    std::fs::write(&config_path, config).ok()?;
    let child = Command::new(binary)
        .arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(&prefix)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Nginx { url: format!("http://127.0.0.1:{port}"), child });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
