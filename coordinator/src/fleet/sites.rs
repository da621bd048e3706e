//! The Sites view: each site's appliances, window and origin offload for the current release.

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sitecast_manifest::api::ReportRequest;
use sitecast_manifest::window::MaintenanceWindow;

use serde_json::json;

use super::{Batch, Fleet, FleetError};
use crate::store::{ApplianceRecord, Change, SiteRecord};

/// The release whose offload the Sites view shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRelease {
    pub version: u64,
    pub version_name: String,
    pub size: u64,
}

/// A maintenance window occurrence, as instants and as the site's wall-clock reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowOccurrence {
    pub start: Timestamp,
    pub end: Timestamp,
    /// E.g. `Tue 24 Nov 02:00–05:00 CET`, in the window's time zone.
    pub local: String,
    /// Open at the coordinator's `now`.
    pub open: bool,
}

/// One site at a glance: its appliances, its window, and how much of the current release came
/// from the origin rather than from LAN peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSummary {
    pub site: String,
    pub appliances: usize,
    pub online: usize,
    pub offline: usize,
    /// Appliances with the current release (or newer) installed.
    pub on_release: usize,
    pub window: MaintenanceWindow,
    /// No window was set for the site, so the fleet default applies.
    pub window_is_default: bool,
    /// The window open now, or the next one; `None` if it never opens.
    pub next_window: Option<WindowOccurrence>,
    /// Bytes of the current release Central Command served to the site.
    pub origin_bytes: u64,
    /// Bytes of the current release the site's appliances report having from its mirrors.
    #[serde(default)]
    pub mirror_bytes: u64,
    /// (`origin_bytes` + `mirror_bytes`) ÷ image size: about 1 when the site shares one
    /// copy over its LAN.
    pub origin_copies: Option<f64>,
    /// Bytes of the current release the site's appliances report having from LAN peers.
    pub lan_bytes: u64,
    /// Bytes of the current release the site's appliances copied from their active slots
    /// (shared with the release they ran): neither fetched nor sent.
    #[serde(default)]
    pub reused_bytes: u64,
}

/// `GET /api/sites`: every site, with the coordinator's clock so ages can be shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SitesOverview {
    pub server_time: Timestamp,
    pub release: Option<SiteRelease>,
    pub sites: Vec<SiteSummary>,
    /// Origin bytes of the current release served to unsigned requests (legacy agents, humans).
    pub unattributed_origin_bytes: u64,
}

impl Fleet {
    pub fn set_site_window(
        &self,
        site: &str,
        window: MaintenanceWindow,
        now: Timestamp,
    ) -> Result<Vec<Change>, FleetError> {
        window.validate().map_err(|e| FleetError::Invalid(e.to_string()))?;
        let record = SiteRecord { id: site.to_owned(), window };
        let detail = json!({"site": site, "window": record.window});
        let mut batch = Batch::new(self);
        batch.push(Change::Site(record));
        batch.audit(now, "operator", "site.window", detail);
        Ok(batch.finish())
    }

    /// Every site that has appliances or a window, with its offload for the current release.
    pub fn sites_overview(&self, now: Timestamp) -> SitesOverview {
        let release = self.current_release();
        let version = release.map(|r| r.version);
        let mut names: BTreeSet<&str> = self.sites.keys().map(String::as_str).collect();
        names.extend(self.appliances.values().map(|a| a.site.as_str()));
        let origin_of = |site: &str| {
            version.map_or(0, |v| self.site_bytes.get(&(site.to_owned(), v)).copied().unwrap_or(0))
        };
        let sites = names
            .into_iter()
            .map(|site| {
                let members: Vec<&ApplianceRecord> =
                    self.appliances.values().filter(|a| a.site == site).collect();
                let online = members.iter().filter(|a| self.is_online(a, now)).count();
                let (window, window_is_default) = match self.sites.get(site) {
                    Some(record) => (record.window.clone(), false),
                    None => (self.config.default_window.clone(), true),
                };
                let origin_bytes = origin_of(site);
                let reports = || {
                    members
                        .iter()
                        .filter_map(|a| a.update.as_ref())
                        .filter(|u| Some(u.report.version) == version)
                };
                // Reported figures: summed without overflowing, whatever an appliance says.
                let total = |bytes: fn(&ReportRequest) -> u64| {
                    reports().fold(0u64, |sum, u| sum.saturating_add(bytes(&u.report)))
                };
                let lan_bytes = total(|r| r.bytes_from_lan);
                let mirror_bytes = total(|r| r.bytes_from_mirror);
                let reused_bytes = total(|r| r.bytes_reused);
                SiteSummary {
                    site: site.to_owned(),
                    appliances: members.len(),
                    online,
                    offline: members.len() - online,
                    on_release: members
                        .iter()
                        .filter(|a| version.is_some_and(|v| a.installed_version >= v))
                        .count(),
                    next_window: window_occurrence(&window, now),
                    window,
                    window_is_default,
                    origin_bytes,
                    mirror_bytes,
                    origin_copies: release
                        .filter(|r| r.size > 0)
                        .map(|r| origin_bytes.saturating_add(mirror_bytes) as f64 / r.size as f64),
                    lan_bytes,
                    reused_bytes,
                }
            })
            .collect();
        SitesOverview {
            server_time: now,
            release: release.map(|r| SiteRelease {
                version: r.version,
                version_name: r.version_name.clone(),
                size: r.size,
            }),
            sites,
            unattributed_origin_bytes: origin_of("unattributed"),
        }
    }
}

/// The window open at `now` or the next one, written in the window's own time zone.
fn window_occurrence(window: &MaintenanceWindow, now: Timestamp) -> Option<WindowOccurrence> {
    let (start, end) = window.current_or_next(now).ok().flatten()?;
    let tz = jiff::tz::TimeZone::get(&window.timezone).ok()?;
    let start_local = start.to_zoned_datetime(tz.clone());
    let end_local = end.to_zoned_datetime(tz);
    let end_format =
        if start_local.date() == end_local.date() { "%H:%M %Z" } else { "%a %H:%M %Z" };
    let local =
        format!("{}–{}", start_local.strftime("%a %-d %b %H:%M"), end_local.strftime(end_format));
    Some(WindowOccurrence { start, end, local, open: start <= now })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sitecast_manifest::window::Weekday;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn window(start: &str, end: &str, tz: &str, days: &[Weekday]) -> MaintenanceWindow {
        MaintenanceWindow {
            start: start.into(),
            end: end.into(),
            timezone: tz.into(),
            days: days.to_vec(),
        }
    }

    #[test]
    fn windows_are_written_in_the_sites_own_time() {
        // Sunday 2026-03-29 is the spring-forward day in Berlin: 02:00 does not exist and the
        // window opens at 03:00 CEST.
        let berlin = window("02:00", "05:00", "Europe/Berlin", &[Weekday::Sun]);
        let next = window_occurrence(&berlin, ts("2026-03-28T12:00:00Z")).expect("a window");
        assert_eq!(next.local, "Sun 29 Mar 03:00–05:00 CEST");
        assert_eq!((next.start, next.open), (ts("2026-03-29T01:00:00Z"), false));
        // Crossing midnight names the second day; open now says so.
        let nyc = window("22:00", "02:00", "America/New_York", &[Weekday::Mon]);
        let open = window_occurrence(&nyc, ts("2026-11-24T04:00:00Z")).expect("a window");
        assert_eq!(open.local, "Mon 23 Nov 22:00–Tue 02:00 EST");
        assert!(open.open);
        assert_eq!(
            window_occurrence(&window("02:00", "05:00", "UTC", &[]), ts("2026-11-24T04:00:00Z")),
            None
        );
    }
}
