//! Simulations of fleets (a discrete-event simulator running the peer's own scheduler, and a
//! lab of real processes in network namespaces) and the local demo.
//!
//! Today only the demo's first part exists: the release signing round trip on a generated
//! image. The simulator, the lab and the swarm part of the demo come with the netsim issue.

pub mod demo;
pub mod sim;
