//! Central Command: releases, staged rollouts, appliance check-ins, the origin that serves the
//! images, audit log and metrics. The rollout engine ([`engine`]) and the fleet's operations
//! ([`fleet`]) are plain code with time passed in; [`server`] is a thin axum shell over them,
//! with state in one redb file ([`store`]) and images in a directory ([`blobs`]).

pub mod blobs;
pub mod engine;
pub mod fleet;
pub mod metrics;
pub mod server;
pub mod store;
