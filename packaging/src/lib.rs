//! The Debian packages of sitecast: `build-debs` makes `sitecast-coordinator`,
//! `sitecast-agent` and `sitecast-manifest` from the workspace's binaries, with systemd units,
//! default configuration under `/etc/sitecast/`, man pages and shell completions generated
//! from the command lines. `tests/install.rs` installs, starts, upgrades and removes them in
//! a throw-away Debian root. This library is empty; the crate exists for that test.
