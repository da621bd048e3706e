//! The appliance agent: check-in with the coordinator, manifest verification, the site swarm
//! (LAN discovery, multi-source verified transfer, origin fallback), apply, reboot in the
//! maintenance window.
//!
//! Built so far: the swarm [`scheduler`] (sans-IO, shared with the simulator), [`pieces`],
//! configuration, identity and the coordinator client. The LAN data plane and the daemon come
//! next; nothing here claims them.

pub mod agent;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod identity;
pub mod lan;
pub mod metrics;
pub mod pieces;
pub mod scheduler;
pub mod state;
pub mod swarm;
