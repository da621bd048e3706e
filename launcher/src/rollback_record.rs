//! `rollback.json` in the store: the last rollback the launcher made, which the agent that
//! runs afterwards reports to Central Command (and never fetches that version again).
//!
//! Written by the frozen launcher and read by agents of any later version: fields are only
//! ever added, and unknown ones are ignored.

use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::lifecycle::{Agent, ExitRecord, RollbackReason};
use crate::store::{StoreError, write_synced};

const FILE: &str = "rollback.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRecord {
    /// The version given up.
    pub from: u64,
    /// The version that runs instead; `None`: the OS image's own agent (written `"image"` by
    /// the first launchers, `null` since).
    #[serde(default, deserialize_with = "version_or_image")]
    pub to: Option<u64>,
    /// `crash loop` or `never checked in`.
    pub reason: String,
    pub at: Timestamp,
    /// The exits that made the crash loop, with the end of their output.
    #[serde(default)]
    pub exits: Vec<ExitRecord>,
}

fn version_or_image<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_u64())
}

impl RollbackRecord {
    pub fn new(from: u64, to: Agent, reason: &RollbackReason, at: Timestamp) -> Self {
        let (reason, exits) = match reason {
            RollbackReason::CrashLoop { exits } => ("crash loop", exits.clone()),
            RollbackReason::NeverConfirmed { .. } => ("never checked in", Vec::new()),
        };
        let to = match to {
            Agent::Version(version) => Some(version),
            Agent::Image => None,
        };
        Self { from, to, reason: reason.to_owned(), at, exits }
    }

    /// One line for an operator: what was given up, why, and the last thing it said.
    pub fn summary(&self) -> String {
        let to = self.to.map_or("the image's agent".to_owned(), |v| format!("agent {v}"));
        let mut text =
            format!("the launcher rolled agent {} back to {to}: {}", self.from, self.reason);
        let last_line = self.exits.last().and_then(|e| e.log_tail.lines().last());
        if let Some(line) = last_line.filter(|l| !l.trim().is_empty()) {
            text.push_str(&format!("; its last output: {}", line.trim()));
        } else if let Some(exit) = self.exits.last() {
            match (exit.code, exit.signal) {
                (Some(code), _) => text.push_str(&format!("; it exited with status {code}")),
                (None, Some(signal)) => text.push_str(&format!("; signal {signal} ended it")),
                (None, None) => {}
            }
        }
        text
    }

    pub fn write(&self, store: &Path) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(self).expect("plain data");
        write_synced(&store.join(FILE), &bytes)
    }

    /// The last rollback, if any (an unreadable record counts as none).
    pub fn read(store: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(store.join(FILE)).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_the_first_launchers_still_reads() {
        let old = r#"{"from":3,"to":"image","reason":"crash loop","at":"2026-12-01T04:00:00Z","exits":[]}"#;
        let record: RollbackRecord = serde_json::from_str(old).expect("the first format");
        assert_eq!((record.from, record.to), (3, None));
        let newer =
            r#"{"from":3,"to":2,"reason":"never checked in","at":"2026-12-01T04:00:00Z","why":{}}"#;
        let record: RollbackRecord = serde_json::from_str(newer).expect("with a field to come");
        assert_eq!(record.to, Some(2));
        assert_eq!(
            record.summary(),
            "the launcher rolled agent 3 back to agent 2: never checked in"
        );
    }
}
