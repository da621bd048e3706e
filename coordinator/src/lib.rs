//! Central Command: releases, staged rollouts, appliance check-ins, the origin that serves the
//! images, audit log and metrics. The rollout engine ([`engine`]) and the fleet's operations
//! ([`fleet`]) are plain code with time passed in; [`server`] is a thin axum shell over them,
//! with state in one redb file or a PostgreSQL database ([`store`]) and images in a directory
//! ([`blobs`]). The Fleet
//! Updates page ([`web`]) is served from the binary and signs operators in with [`session`]s.

pub mod blobs;
pub mod engine;
pub mod fleet;
pub mod iroh_origin;
pub mod listener;
pub mod metrics;
pub mod range;
pub mod server;
pub mod session;
pub mod store;
pub mod web;
pub mod wire;

/// reqwest is built with rustls but no crypto provider once iroh is in the same build (it
/// enables `rustls-no-provider`), and then panics when a client is built before a
/// process-wide provider exists. Installs ring's provider; harmless if one is installed.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its causes, joined: a client error's own message ("error sending request",
/// "db error") says too little.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
