//! A site's LAN for VMs: an Ethernet hub on 127.0.0.1 that QEMU's socket networking connects
//! to (`-netdev socket,connect=…`). Every frame one VM sends reaches every other VM, as on a
//! hub, so broadcast and multicast (ARP, mDNS) work without root, tap devices or a multicast
//! route on loopback. QEMU's stream framing: a 4-byte big-endian length, then the frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

/// Largest frame accepted: a jumbo frame and then some; anything larger is a broken stream.
const MAX_FRAME: usize = 65_536;
/// Frames queued for one port before the hub drops for it (a hub never waits for a port).
const PORT_QUEUE: usize = 512;

#[derive(Debug)]
pub struct Hub {
    pub port: u16,
    /// Bytes of frames delivered to ports (each copy counted).
    pub bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

type Ports = Arc<Mutex<Vec<(usize, mpsc::Sender<Arc<Vec<u8>>>)>>>;

impl Hub {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let bytes = Arc::new(AtomicU64::new(0));
        let ports: Ports = Arc::default();
        let counter = bytes.clone();
        let task = tokio::spawn(async move {
            let mut next_id = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let id = next_id;
                next_id += 1;
                let (mut reader, mut writer) = stream.into_split();
                let (tx, mut rx) = mpsc::channel::<Arc<Vec<u8>>>(PORT_QUEUE);
                ports.lock().await.push((id, tx));
                tokio::spawn(async move {
                    while let Some(frame) = rx.recv().await {
                        let len = (frame.len() as u32).to_be_bytes();
                        if writer.write_all(&len).await.is_err()
                            || writer.write_all(&frame).await.is_err()
                        {
                            break;
                        }
                    }
                });
                let ports = ports.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 4];
                        if reader.read_exact(&mut len).await.is_err() {
                            break;
                        }
                        let len = u32::from_be_bytes(len) as usize;
                        if len > MAX_FRAME {
                            break;
                        }
                        let mut frame = vec![0; len];
                        if reader.read_exact(&mut frame).await.is_err() {
                            break;
                        }
                        let frame = Arc::new(frame);
                        for (other, tx) in ports.lock().await.iter() {
                            if *other != id && tx.try_send(frame.clone()).is_ok() {
                                counter.fetch_add(len as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    // The VM is gone (powered off or cut): its port leaves the hub.
                    ports.lock().await.retain(|(other, _)| *other != id);
                });
            }
        });
        Ok(Hub { port, bytes, task })
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}
