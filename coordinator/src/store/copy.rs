//! Moving a deployment from one store to another (redb to PostgreSQL): every record and every
//! audit entry, into a store that holds nothing yet.

use super::{Change, Snapshot, Store, StoreError};

/// Audit entries read and written at a time.
const AUDIT_PAGE: usize = 1000;

/// What [`copy`] carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copied {
    pub releases: usize,
    pub agent_releases: usize,
    pub rollouts: usize,
    pub appliances: usize,
    pub sites: usize,
    pub audit_entries: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the target already holds a fleet ({0}); copy only into an empty store")]
    TargetNotEmpty(String),
}

/// Copies everything in `from` into `to`, which must be empty: the records in one batch, then
/// the audit log in order, page by page. Stop the server on `from` first: what it writes
/// meanwhile is not carried over. A copy cut short leaves `to` partly filled, and a second
/// copy then refuses it: empty it (for PostgreSQL, drop and create the database) and copy
/// again.
pub fn copy(from: &dyn Store, to: &dyn Store) -> Result<Copied, CopyError> {
    let target = to.load()?;
    if let Some(what) = holds(&target) {
        return Err(CopyError::TargetNotEmpty(what));
    }
    let snapshot = from.load()?;
    let copied = Copied {
        releases: snapshot.releases.len(),
        agent_releases: snapshot.agent_releases.len(),
        rollouts: snapshot.rollouts.len(),
        appliances: snapshot.appliances.len(),
        sites: snapshot.sites.len(),
        audit_entries: 0,
    };
    let mut records: Vec<Change> = Vec::new();
    records.extend(snapshot.releases.into_values().map(|r| Change::Release(Box::new(r))));
    records.extend(snapshot.agent_releases.into_values().map(Change::AgentRelease));
    records.extend(snapshot.rollouts.into_values().map(Change::Rollout));
    records.extend(snapshot.appliances.into_values().map(|a| Change::Appliance(Box::new(a))));
    records.extend(snapshot.sites.into_values().map(Change::Site));
    records.extend(snapshot.meta.into_iter().map(|(key, value)| Change::Meta { key, value }));
    // Counters are increments: into an empty store, the total is the increment.
    records.extend(
        snapshot.site_bytes.into_iter().map(|((site, version), add)| Change::SiteBytes {
            site,
            version,
            add,
        }),
    );
    to.commit(&records, true)?;
    let mut copied = copied;
    let mut after = 0;
    loop {
        let page = from.audit(after, AUDIT_PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        copied.audit_entries += page.len();
        let page: Vec<Change> = page.into_iter().map(Change::Audit).collect();
        to.commit(&page, true)?;
    }
    Ok(copied)
}

/// What a store holds, if anything.
fn holds(snapshot: &Snapshot) -> Option<String> {
    let counts = [
        ("releases", snapshot.releases.len()),
        ("agent releases", snapshot.agent_releases.len()),
        ("rollouts", snapshot.rollouts.len()),
        ("appliances", snapshot.appliances.len()),
        ("sites", snapshot.sites.len()),
        ("settings", snapshot.meta.len()),
        ("byte counters", snapshot.site_bytes.len()),
        ("audit entries", snapshot.audit_next.saturating_sub(1) as usize),
    ];
    let held: Vec<String> =
        counts.iter().filter(|(_, n)| *n > 0).map(|(what, n)| format!("{n} {what}")).collect();
    (!held.is_empty()).then(|| held.join(", "))
}
