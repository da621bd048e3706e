//! When strangers on the LAN make the agent check in before its time. A non-member that shows
//! up may be an appliance enrolled since the last check-in, and the coordinator's answer would
//! admit it; but strangers must not set the agent's pace. So each stranger earns at most one
//! early check-in until the next regular one, and all strangers together at most
//! [`EARLY_CHECKINS_PER_INTERVAL`] per check-in interval, however many there are.
//!
//! Sans-IO: the agent says what happened ([`EarlyCheckins::handle_stranger`],
//! [`EarlyCheckins::handle_checkin`]) and schedules the check-in itself.

use std::collections::BTreeSet;

/// Early check-ins at most between two regular ones.
pub const EARLY_CHECKINS_PER_INTERVAL: u32 = 2;
/// Strangers remembered at most until the next regular check-in. One not remembered (there
/// were more) may ask again, within [`EARLY_CHECKINS_PER_INTERVAL`].
pub const STRANGERS_REMEMBERED: usize = 64;

#[derive(Debug, Default)]
pub struct EarlyCheckins {
    /// Strangers that asked for (or were covered by) an early check-in since the last
    /// regular one.
    seen: BTreeSet<[u8; 32]>,
    /// Early check-ins asked for since the last regular one.
    asked: u32,
    /// One is asked for and has not happened yet: strangers seen meanwhile are covered by it.
    pending: bool,
}

impl EarlyCheckins {
    /// `peer`, not a member of the site, showed up. Returns whether the agent should check in
    /// early (as soon as it can).
    pub fn handle_stranger(&mut self, peer: [u8; 32]) -> bool {
        if self.seen.contains(&peer) {
            return false;
        }
        if !self.pending && self.asked >= EARLY_CHECKINS_PER_INTERVAL {
            return false;
        }
        if self.seen.len() < STRANGERS_REMEMBERED {
            self.seen.insert(peer);
        }
        if self.pending {
            return false;
        }
        self.asked += 1;
        self.pending = true;
        true
    }

    /// A check-in is made: `regular` if its time had come (or an operator asked), not early.
    pub fn handle_checkin(&mut self, regular: bool) {
        self.pending = false;
        if regular {
            self.seen.clear();
            self.asked = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u32) -> [u8; 32] {
        let mut key = [0; 32];
        key[..4].copy_from_slice(&n.to_be_bytes());
        key
    }

    #[test]
    fn a_stranger_earns_one_early_checkin_until_the_next_regular_one() {
        let mut early = EarlyCheckins::default();
        assert!(early.handle_stranger(peer(1)));
        early.handle_checkin(false);
        for _ in 0..10 {
            assert!(!early.handle_stranger(peer(1)), "the same stranger again");
            early.handle_checkin(false);
        }
        early.handle_checkin(true);
        assert!(early.handle_stranger(peer(1)), "after a regular check-in it may ask again");
    }

    #[test]
    fn all_strangers_together_earn_two_per_interval() {
        let mut early = EarlyCheckins::default();
        let mut checkins = 0;
        for n in 0..1000 {
            if early.handle_stranger(peer(n)) {
                checkins += 1;
                early.handle_checkin(false);
            }
        }
        assert_eq!(checkins, EARLY_CHECKINS_PER_INTERVAL);
        early.handle_checkin(true);
        assert!(early.handle_stranger(peer(5000)));
    }

    #[test]
    fn strangers_seen_before_the_early_checkin_happens_are_covered_by_it() {
        let mut early = EarlyCheckins::default();
        assert!(early.handle_stranger(peer(1)));
        assert!(!early.handle_stranger(peer(2)), "one check-in is already coming");
        early.handle_checkin(false);
        assert!(!early.handle_stranger(peer(2)), "covered: it does not ask again");
        assert!(early.handle_stranger(peer(3)));
        early.handle_checkin(false);
        assert!(!early.handle_stranger(peer(4)), "two per interval");
    }

    #[test]
    fn memory_is_bounded() {
        let mut early = EarlyCheckins::default();
        assert!(early.handle_stranger(peer(0)));
        for n in 1..10_000 {
            assert!(!early.handle_stranger(peer(n)));
        }
        assert_eq!(early.seen.len(), STRANGERS_REMEMBERED);
        early.handle_checkin(false);
        // One it could not remember may ask again, within the budget.
        assert!(early.handle_stranger(peer(9_999)));
        early.handle_checkin(false);
        assert!(!early.handle_stranger(peer(9_998)));
        assert!(early.seen.len() <= STRANGERS_REMEMBERED);
    }
}
