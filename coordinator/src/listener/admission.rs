//! Which accepted connections get served: a total cap, so the server's memory and descriptors
//! are bounded, and a per-address cap, so one client cannot take the whole total.
//!
//! IPv6 clients are counted per /64: that is what one site (or one attacker) gets, and counting
//! single addresses would give an attacker 2^64 separate allowances.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was closed unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    OverTotal,
    OverPerIp,
}

/// The unit the per-address limit counts: one client, as far as any per-client share goes
/// (the verified-range pool counts by it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
}

impl Client {
    pub fn of(ip: IpAddr) -> Self {
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        match ip.to_canonical() {
            IpAddr::V4(v4) => Client::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut prefix = [0; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Client::V6(prefix)
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Admission {
    total: Arc<Semaphore>,
    per_client: Arc<PerClient>,
}

#[derive(Debug)]
struct PerClient {
    max: usize,
    open: Mutex<HashMap<Client, usize>>,
}

impl PerClient {
    fn lock(&self) -> MutexGuard<'_, HashMap<Client, usize>> {
        // The map is consistent after every statement, so a panic elsewhere cannot corrupt it.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection's place under both limits, given back on drop.
#[derive(Debug)]
pub(super) struct Slot {
    _total: OwnedSemaphorePermit,
    per_client: Arc<PerClient>,
    client: Client,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.per_client.lock();
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            // Entries live only while their client has connections, so the map stays small.
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

impl Admission {
    pub(super) fn new(max_total: usize, max_per_client: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total.min(Semaphore::MAX_PERMITS))),
            per_client: Arc::new(PerClient { max: max_per_client, open: Mutex::default() }),
        }
    }

    pub(super) fn admit(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let client = Client::of(ip);
        // Checked first so a client over its own share is reported as such even when the
        // server is also full.
        let mut open = self.per_client.lock();
        let count = open.get(&client).copied().unwrap_or(0);
        if count >= self.per_client.max {
            return Err(Refused::OverPerIp);
        }
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| Refused::OverTotal)?;
        open.insert(client, count + 1);
        drop(open);
        Ok(Slot { _total: total, per_client: Arc::clone(&self.per_client), client })
    }

    #[cfg(test)]
    fn tracked_clients(&self) -> usize {
        self.per_client.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn ipv6_clients_are_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(Client::of(ip("2001:db8:1:2::1")), Client::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Client::of(ip("2001:db8:1:2::1")), Client::of(ip("2001:db8:1:3::1")));
        assert_eq!(Client::of(ip("::ffff:192.0.2.7")), Client::of(ip("192.0.2.7")));
        assert_ne!(Client::of(ip("192.0.2.7")), Client::of(ip("192.0.2.8")));
        assert_eq!(
            Client::of(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Client::V4(Ipv4Addr::LOCALHOST.octets())
        );
        assert_ne!(Client::of(IpAddr::V6(Ipv6Addr::LOCALHOST)), Client::V4([0, 0, 0, 1]));
    }

    #[test]
    fn per_client_and_total_limits_are_separate_and_given_back() {
        let admission = Admission::new(3, 2);
        let a1 = admission.admit(ip("192.0.2.1")).expect("first from a");
        let a2 = admission.admit(ip("192.0.2.1")).expect("second from a");
        assert_eq!(admission.admit(ip("192.0.2.1")).unwrap_err(), Refused::OverPerIp);
        let b1 = admission.admit(ip("192.0.2.2")).expect("first from b");
        assert_eq!(admission.admit(ip("192.0.2.3")).unwrap_err(), Refused::OverTotal);
        // Over both: reported as the client's own limit.
        assert_eq!(admission.admit(ip("192.0.2.1")).unwrap_err(), Refused::OverPerIp);
        drop(a1);
        let c1 = admission.admit(ip("192.0.2.3")).expect("room again after a1 closed");
        assert_eq!(admission.admit(ip("192.0.2.1")).unwrap_err(), Refused::OverTotal);
        drop((a2, b1, c1));
        assert_eq!(admission.tracked_clients(), 0, "no entries left behind");
        assert_eq!(admission.total.available_permits(), 3);
    }

    #[test]
    fn a_refusal_over_the_total_does_not_leak_a_per_client_count() {
        let admission = Admission::new(1, 5);
        let held = admission.admit(ip("192.0.2.1")).expect("first");
        for _ in 0..10 {
            assert_eq!(admission.admit(ip("192.0.2.2")).unwrap_err(), Refused::OverTotal);
        }
        drop(held);
        assert_eq!(admission.tracked_clients(), 0);
        let _ = admission.admit(ip("192.0.2.2")).expect("admitted once there is room");
    }
}
