//! The appliance agent: check-in with the coordinator, manifest verification, the site swarm
//! (LAN discovery, multi-source verified transfer, origin fallback), apply, reboot in the
//! maintenance window.
//!
//! - [`scheduler`], [`pieces`]: the swarm scheduler, sans-IO, shared with the simulator (the
//!   `sitecast-scheduler` crate);
//! - [`swarm`]: its async shell (origin over HTTP, LAN peers over [`lan`], verify then write);
//! - [`lan`]: iroh QUIC with the iroh-blobs wire protocol, served from the slot;
//! - [`site`]: the control plane on libp2p: mDNS discovery, have-maps by gossipsub, each
//!   signed by its author ([`site_message`]);
//! - [`agent`]: the update lifecycle; [`agent_update`]: agent releases (the agent updated
//!   apart from the image, through `sitecast-launcher`'s store), their files fetched through
//!   the site swarm ([`agent_files`]); [`daemon`] wires it with the control socket and metrics;
//!   [`gate`]: its health gate on a trial boot; [`release_file`]: the running release as the
//!   system says; [`early_checkin`]: when strangers on the LAN make it check in early.
//! - [`reuse`]: copying what a new image shares with the running one from the active slot
//!   ([`patch`]: fetching only the rest of the groups it holds in part)
//!   (found through the release's content index), each group verified before it is written;
//!   [`mirror`]: a release's other HTTP origins; [`outboard`]: the image's parent hashes, which
//!   both verify against.

pub mod agent;
pub mod agent_files;
pub mod agent_update;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod daemon;
pub mod early_checkin;
pub mod gate;
pub mod identity;
pub mod lan;
pub mod membership;
pub mod metrics;
pub mod mirror;
pub mod outboard;
pub mod patch;
pub mod reuse;
pub mod site;
pub mod site_message;
pub mod state;
pub mod swarm;

pub use sitecast_manifest::release_file;
pub use sitecast_scheduler::{pieces, scheduler};
