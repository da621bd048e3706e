//! A site's WAN link for VMs: a TCP forwarder from the address the VMs use for Central Command
//! to the real one, with the site's downlink rate shared by all connections (a token bucket)
//! and a count of what came down it. QEMU's user network has no rate limit, and the lab needs
//! one to make a download last long enough to cut power in the middle of it, and to make the
//! LAN worth using.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Wan {
    /// Where VMs connect (on the host, so `10.0.N.2:port` from a guest).
    pub port: u16,
    /// Bytes sent down the link (Central Command → site), every connection.
    pub down_bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// The downlink's budget: bytes may be sent once the clock reaches `free_at`.
struct Bucket {
    bytes_per_sec: f64,
    free_at: Instant,
}

impl Bucket {
    /// Reserves `n` bytes of the link and returns when they may go.
    fn reserve(&mut self, n: usize) -> Instant {
        let now = Instant::now();
        // At most 100 ms of unused capacity carries over, as a link's short queue would.
        let start = self.free_at.max(now - Duration::from_millis(100));
        self.free_at = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        start
    }
}

impl Wan {
    /// Forwards to `upstream` (e.g. `127.0.0.1:PORT`), at most `mbit` Mbit/s down if given.
    pub async fn start(upstream: String, mbit: Option<f64>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let down_bytes = Arc::new(AtomicU64::new(0));
        let bucket = mbit.map(|m| {
            Arc::new(Mutex::new(Bucket { bytes_per_sec: m * 1e6 / 8.0, free_at: Instant::now() }))
        });
        let counter = down_bytes.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let bucket = bucket.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    });
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let n = match server_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(bucket) = &bucket {
                            let at = bucket.lock().await.reserve(n);
                            tokio::time::sleep_until(at).await;
                        }
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = client_write.shutdown().await;
                    up.abort();
                });
            }
        });
        Ok(Wan { port, down_bytes, task })
    }

    pub fn down_bytes(&self) -> u64 {
        self.down_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_spaces_bytes_at_the_rate() {
        let now = Instant::now();
        let mut bucket = Bucket { bytes_per_sec: 1000.0, free_at: now };
        let first = bucket.reserve(500);
        let second = bucket.reserve(500);
        // The second half-second's bytes go half a second after the first's.
        let gap = second.duration_since(first);
        assert!((gap.as_secs_f64() - 0.5).abs() < 1e-6, "{gap:?}");
    }
}
