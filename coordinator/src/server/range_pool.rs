//! Who may encode verified ranges: at most `max_range_streams` encoders at once over everyone,
//! and at most `max_range_streams_per_client` of them held (or waited for) by one client, so a
//! single client that reads a few bytes every 25 s cannot keep the whole pool from the fleet.
//!
//! A client is what the listener counts connections by ([`Client`]: an IPv4 address or an
//! IPv6 /64). A client over its share is told so at once; only a request within its share
//! waits (briefly) for a free encoder.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::listener::Client;

/// Why no encoder was handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// This client already holds (or waits for) its share.
    ClientShare,
    /// Every encoder stayed taken for the whole wait.
    Pool,
}

/// The encoders and each client's count of them.
#[derive(Debug)]
pub(super) struct RangePool {
    streams: Arc<Semaphore>,
    shares: Arc<Shares>,
}

#[derive(Debug)]
struct Shares {
    per_client: usize,
    /// Requests holding or waiting for an encoder, by client. `None` is a request without a
    /// known peer address (never the case behind the listener): all of those count as one.
    held: Mutex<HashMap<Option<Client>, usize>>,
}

impl Shares {
    fn lock(&self) -> MutexGuard<'_, HashMap<Option<Client>, usize>> {
        // Consistent after every statement, so a panic elsewhere cannot leave it half-changed.
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One client's place in its share, given back on drop.
#[derive(Debug)]
struct Share {
    shares: Arc<Shares>,
    client: Option<Client>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.lock();
        if let Some(count) = held.get_mut(&self.client) {
            *count -= 1;
            // Entries live only while their client holds something, so the map stays small.
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

/// An encoder, held until dropped.
#[derive(Debug)]
pub(super) struct Stream {
    _permit: OwnedSemaphorePermit,
    _share: Share,
}

impl RangePool {
    /// `total` encoders, at most `per_client` of them for one client (both at least 1, and a
    /// share never above the total).
    pub(super) fn new(total: usize, per_client: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            streams: Arc::new(Semaphore::new(total)),
            shares: Arc::new(Shares {
                per_client: per_client.clamp(1, total),
                held: Mutex::default(),
            }),
        }
    }

    /// An encoder for a request from `peer`: refused at once if its client has its share,
    /// else waits up to `wait` for one to be free.
    pub(super) async fn acquire(
        &self,
        peer: Option<SocketAddr>,
        wait: Duration,
    ) -> Result<Stream, Busy> {
        let share = self.reserve(peer.map(|p| Client::of(p.ip())))?;
        let permit = tokio::time::timeout(wait, Arc::clone(&self.streams).acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Busy::Pool)?;
        Ok(Stream { _permit: permit, _share: share })
    }

    fn reserve(&self, client: Option<Client>) -> Result<Share, Busy> {
        let mut held = self.shares.lock();
        let count = held.entry(client).or_insert(0);
        if *count >= self.shares.per_client {
            return Err(Busy::ClientShare);
        }
        *count += 1;
        Ok(Share { shares: Arc::clone(&self.shares), client })
    }

    #[cfg(test)]
    fn tracked_clients(&self) -> usize {
        self.shares.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("test address"))
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_client_gets_its_share_at_most_and_others_the_rest() {
        let pool = RangePool::new(4, 2);
        let a1 = pool.acquire(peer("192.0.2.1:1000"), WAIT).await.expect("a1");
        let a2 = pool.acquire(peer("192.0.2.1:1001"), WAIT).await.expect("a2");
        // Refused without waiting: the clock is paused, so a wait would auto-advance it.
        let before = tokio::time::Instant::now();
        assert_eq!(
            pool.acquire(peer("192.0.2.1:1002"), WAIT).await.unwrap_err(),
            Busy::ClientShare
        );
        assert_eq!(tokio::time::Instant::now(), before, "a client over its share does not wait");
        // The same /64 is the same client; another /64 is not.
        let v6 = pool.acquire(peer("[2001:db8:1:2::1]:1"), WAIT).await.expect("v6");
        let v6b = pool.acquire(peer("[2001:db8:1:2::ffff]:1"), WAIT).await.expect("same /64");
        assert_eq!(
            pool.acquire(peer("[2001:db8:1:2::7]:1"), WAIT).await.unwrap_err(),
            Busy::ClientShare
        );
        // The pool is full now: another client within its share waits, then hears `Pool`.
        assert_eq!(pool.acquire(peer("192.0.2.9:1"), WAIT).await.unwrap_err(), Busy::Pool);
        assert!(tokio::time::Instant::now() >= before + WAIT, "waited for a free encoder");
        drop(v6);
        let b = pool.acquire(peer("192.0.2.9:1"), WAIT).await.expect("room again");
        drop((a1, a2, v6b, b));
        assert_eq!(pool.tracked_clients(), 0, "no entries left behind");
        assert_eq!(pool.streams.available_permits(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waits_in_vain_gives_its_share_back() {
        let pool = RangePool::new(1, 1);
        let held = pool.acquire(peer("192.0.2.1:1"), WAIT).await.expect("first");
        for _ in 0..3 {
            assert_eq!(pool.acquire(peer("192.0.2.2:1"), WAIT).await.unwrap_err(), Busy::Pool);
        }
        assert_eq!(pool.tracked_clients(), 1, "only the holder is counted");
        drop(held);
        let _second = pool.acquire(peer("192.0.2.2:1"), WAIT).await.expect("second client");
    }

    #[test]
    fn shares_are_at_least_one_and_at_most_the_pool() {
        assert_eq!(RangePool::new(4, 0).shares.per_client, 1);
        assert_eq!(RangePool::new(4, 100).shares.per_client, 4);
        assert_eq!(RangePool::new(0, 0).streams.available_permits(), 1);
    }
}
