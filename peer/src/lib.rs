//! The appliance agent: check-in with the coordinator, manifest verification, the site swarm
//! (LAN discovery, multi-source verified transfer, origin fallback), apply, reboot in the
//! maintenance window.
//!
//! Not built yet: see the peer issue. Nothing here claims to work.
