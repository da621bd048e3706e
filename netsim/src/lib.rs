//! Simulations of fleets and the local demo:
//! - [`sim`]: the discrete-event simulator, running the peer crate's own scheduler on a virtual
//!   clock for whole fleets;
//! - [`sweep`]: the swarm's goals held over a matrix of site shapes;
//! - [`lab`]: real coordinator and agent processes in Linux network namespaces with shaped
//!   links (root);
//! - [`demo`]: the README's first command, processes on loopback;
//! - [`vm`]: real appliances in QEMU, booted by GRUB from their own partitions.

pub mod demo;
pub mod lab;
pub mod sim;
pub mod sweep;
pub mod vm;
