//! The frozen launcher of the sitecast agent, and the store of agent versions it starts.
//!
//! The agent can be updated apart from the OS image (`sitecast.agent` manifests). What makes
//! that safe is kept small and changes only with the image: [`store`] holds agent versions
//! side by side on the data partition and switches between them with one rename, so all of a
//! version's files change together or none do, the previous version stays for a rollback for
//! [`store::KEEP_RETIRED`], and the agent's own state directory is never touched;
//! [`lifecycle`] decides, with time passed in, which version runs, when a version on trial is
//! rolled back, and when the frozen path must fetch a fix from Central Command;
//! [`rollback_record`] tells the next agent what was rolled back and why; [`frozen`] fetches
//! the fix for an agent that keeps crashing, straight from Central Command.

pub mod frozen;
pub mod lifecycle;
pub mod rollback_record;
pub mod store;

pub use lifecycle::{Agent, Decision, ExitRecord, Launcher, LauncherState, Policy, RollbackReason};
pub use rollback_record::RollbackRecord;
pub use store::{AgentStore, KEEP_RETIRED, Step, StoreError};
