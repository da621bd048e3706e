//! The swarm's decisions, with no I/O: which piece an appliance fetches from which LAN peer or
//! from the origin, and how a transfer is cut into pieces. No sockets, no clock, no async
//! runtime (as `quinn-proto` is to `quinn`): the agent (`sitecast-peer`) drives it from its
//! tasks, the simulator (`sitecast-netsim`) on a virtual clock, the same code in both.
//!
//! - [`pieces`]: sets of pieces and the have-maps peers exchange, and the size of a piece;
//! - [`scheduler`]: the state machine, events in, actions out.

pub mod pieces;
pub mod scheduler;
