//! The appliance agent: check-in with the coordinator, manifest verification, the site swarm
//! (LAN discovery, multi-source verified transfer, origin fallback), apply, reboot in the
//! maintenance window.
//!
//! Built so far: the swarm [`scheduler`] (sans-IO, shared with the simulator) and [`pieces`].
//! The network shells and the daemon come next (the peer issue); nothing here claims them.

pub mod pieces;
pub mod scheduler;
