//! Who belongs to this appliance's site, as Central Command last said (`site_members` in a
//! check-in answer). The LAN data plane serves only members and the site control plane hears
//! only members' announcements, so an appliance of another fleet that learnt a release's
//! manifest cannot fetch the image from this site. Integrity never depended on this (every
//! group is verified); confidentiality and fairness do.
//!
//! With no list (a coordinator that does not say, or none heard from yet) every peer is
//! admitted, as before membership existed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use tokio::sync::Notify;

/// What a non-member tried, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A LAN connection or a request on one (data plane).
    Lan,
    /// An announcement on the site's gossip topic (control plane).
    Announcement,
}

/// The membership and what was refused, for `status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MembershipStatus {
    /// How many members the coordinator named; `None`: it did not say, everyone is admitted.
    pub members: Option<usize>,
    /// LAN connections and requests refused to non-members.
    pub lan_refused: u64,
    /// Announcements of non-members ignored.
    pub announcements_ignored: u64,
}

#[derive(Debug, Default)]
struct Inner {
    members: RwLock<Option<BTreeSet<[u8; 32]>>>,
    lan_refused: AtomicU64,
    announcements_ignored: AtomicU64,
    /// Non-members seen since the agent last took them (at most [`STRANGERS_HELD`]): they
    /// may have enrolled since the last check-in.
    strangers: Mutex<BTreeSet<[u8; 32]>>,
    /// Woken when one is added.
    stranger: Notify,
}

/// Strangers held at most until the agent takes them; more are dropped (the agent's own
/// limits on early check-ins are far lower).
pub const STRANGERS_HELD: usize = 64;

/// A handle on the site's membership, shared by the data plane, the control plane and the
/// agent (which sets it from check-in answers); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Membership(Arc<Inner>);

/// The identity keys of a `site_members` list; entries that are not 32-byte hex keys are
/// skipped (they cannot name a peer anyway).
pub fn parse_members(hex_keys: &[String]) -> BTreeSet<[u8; 32]> {
    hex_keys.iter().filter_map(|key| sitecast_manifest::decode_hex::<32>(key).ok()).collect()
}

impl Membership {
    /// Admits exactly `members`, or everyone for `None`.
    pub fn set(&self, members: Option<BTreeSet<[u8; 32]>>) {
        *self.0.members.write().unwrap_or_else(|p| p.into_inner()) = members;
    }

    /// The members Central Command named, if it did.
    pub fn members(&self) -> Option<Vec<[u8; 32]>> {
        let members = self.0.members.read().unwrap_or_else(|p| p.into_inner());
        members.as_ref().map(|members| members.iter().copied().collect())
    }

    pub fn admits(&self, peer: &[u8; 32]) -> bool {
        match &*self.0.members.read().unwrap_or_else(|p| p.into_inner()) {
            Some(members) => members.contains(peer),
            None => true,
        }
    }

    /// Counts a refusal of `peer` and hands it to whoever waits in
    /// [`Membership::strangers_seen`].
    pub fn refused(&self, what: Refusal, peer: &[u8; 32]) {
        let counter = match what {
            Refusal::Lan => &self.0.lan_refused,
            Refusal::Announcement => &self.0.announcements_ignored,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut strangers = self.0.strangers.lock().unwrap_or_else(|p| p.into_inner());
        if strangers.len() < STRANGERS_HELD {
            strangers.insert(*peer);
        }
        drop(strangers);
        // One stored permit at most: a burst of strangers wakes the waiter once.
        self.0.stranger.notify_one();
    }

    /// Completes with the non-members that showed up since it last completed (each once, at
    /// most [`STRANGERS_HELD`]). Cancel-safe: strangers are taken only as it completes.
    pub async fn strangers_seen(&self) -> Vec<[u8; 32]> {
        loop {
            let strangers =
                std::mem::take(&mut *self.0.strangers.lock().unwrap_or_else(|p| p.into_inner()));
            if !strangers.is_empty() {
                return strangers.into_iter().collect();
            }
            self.0.stranger.notified().await;
        }
    }

    pub fn status(&self) -> MembershipStatus {
        MembershipStatus {
            members: self
                .0
                .members
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(BTreeSet::len),
            lan_refused: self.0.lan_refused.load(Ordering::Relaxed),
            announcements_ignored: self.0.announcements_ignored.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_list_admits_everyone_a_list_only_its_members() {
        let membership = Membership::default();
        assert!(membership.admits(&[1; 32]), "a coordinator that does not say: as before");
        let member = hex::encode([1u8; 32]);
        membership.set(Some(parse_members(&[member, "not hex".into(), "abcd".into()])));
        assert!(membership.admits(&[1; 32]));
        assert!(!membership.admits(&[2; 32]));
        assert_eq!(membership.status().members, Some(1), "malformed entries name nobody");
        membership.set(Some(BTreeSet::new()));
        assert!(!membership.admits(&[1; 32]), "an empty list admits nobody");
        membership.set(None);
        assert!(membership.admits(&[2; 32]));
    }

    #[test]
    fn strangers_reach_the_waiter_once_per_burst_each_once() {
        use futures_util::FutureExt;
        let membership = Membership::default();
        membership.refused(Refusal::Lan, &[7; 32]);
        membership.refused(Refusal::Announcement, &[7; 32]);
        membership.refused(Refusal::Lan, &[8; 32]);
        assert_eq!(membership.strangers_seen().now_or_never(), Some(vec![[7; 32], [8; 32]]));
        assert_eq!(membership.strangers_seen().now_or_never(), None, "the burst was one wake-up");
        let status = membership.status();
        assert_eq!((status.lan_refused, status.announcements_ignored), (2, 1));

        // However many strangers come before the waiter looks, a bounded number is held.
        for n in 0..=u8::MAX {
            membership.refused(Refusal::Lan, &[n; 32]);
        }
        let held = membership.strangers_seen().now_or_never().expect("strangers");
        assert_eq!(held.len(), STRANGERS_HELD);
        assert_eq!(membership.status().lan_refused, 2 + 256, "every refusal is counted");
    }
}
