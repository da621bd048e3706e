//! What an appliance may say about itself: bounded, printable, one spelling per MAC.

use sitecast_manifest::api::{CheckinRequest, PeerAddresses, normalize_mac};

use super::FleetError;

/// Longest site id, name, group, platform or agent version.
pub(super) const MAX_TEXT: usize = 64;
/// Longest error message kept from a report.
pub(super) const MAX_ERROR: usize = 2000;
/// Most MAC addresses one appliance may list (real appliances have a handful of NICs).
pub(super) const MAX_MACS: usize = 16;
/// Most addresses of each kind an appliance may list for its site peers.
pub(super) const MAX_ADDRESSES: usize = 16;
const MAX_ADDRESS_LEN: usize = 256;

/// Most mirrors one release may name.
pub(super) const MAX_MIRRORS: usize = 8;
const MAX_URL_LEN: usize = 2048;

/// Mirror URLs: absolute `http` or `https` URLs with a host, each once (a file path, which
/// only Central Command could read, is refused).
pub(super) fn mirrors(urls: &[String]) -> Result<(), FleetError> {
    let invalid = |why: String| Err(FleetError::Invalid(why));
    if urls.len() > MAX_MIRRORS {
        return invalid(format!("{} mirrors; at most {MAX_MIRRORS}", urls.len()));
    }
    for (i, url) in urls.iter().enumerate() {
        if url.len() > MAX_URL_LEN {
            return invalid(format!("mirror {} is longer than {MAX_URL_LEN} bytes", i + 1));
        }
        let parsed = match reqwest::Url::parse(url) {
            Ok(parsed) => parsed,
            Err(error) => return invalid(format!("mirror {url:?} is not a URL: {error}")),
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return invalid(format!("mirror {url:?} is not an http or https URL"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return invalid(format!("mirror {url:?} names no host"));
        }
        if urls[..i].contains(url) {
            return invalid(format!("mirror {url:?} is named twice"));
        }
    }
    Ok(())
}

/// A check-in's identity fields, validated and normalized.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CheckedIdentity {
    pub site: String,
    pub name: String,
    pub group: Option<String>,
    pub macs: Vec<String>,
    pub platform: String,
}

pub(super) fn checkin(request: &CheckinRequest) -> Result<CheckedIdentity, FleetError> {
    let site = text("site", &request.site)?;
    if site.is_empty() {
        return Err(FleetError::Invalid("site must not be empty".into()));
    }
    let group = match &request.group {
        Some(group) => Some(text("group", group)?).filter(|g| !g.is_empty()),
        None => None,
    };
    Ok(CheckedIdentity {
        site,
        name: text("name", &request.name)?,
        group,
        macs: macs(&request.macs)?,
        platform: text("platform", &request.platform)?,
    })
}

/// Characters that would make a name show as something it is not: controls (NUL, newline,
/// escape) and invisible formatting (right-to-left override, zero-width joiners, BOM).
fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

pub(super) fn text(field: &str, value: &str) -> Result<String, FleetError> {
    let value = value.trim();
    if value.chars().count() > MAX_TEXT {
        return Err(FleetError::Invalid(format!("{field} is longer than {MAX_TEXT} characters")));
    }
    if let Some(c) = value.chars().find(|c| deceptive(*c)) {
        return Err(FleetError::Invalid(format!(
            "{field} contains the control or formatting character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(value.to_owned())
}

fn macs(given: &[String]) -> Result<Vec<String>, FleetError> {
    if given.len() > MAX_MACS {
        return Err(FleetError::Invalid(format!("more than {MAX_MACS} MAC addresses")));
    }
    let mut macs = Vec::with_capacity(given.len());
    for text in given {
        let mac = normalize_mac(text)
            .ok_or_else(|| FleetError::Invalid(format!("unreadable MAC address {text:?}")))?;
        let first = u8::from_str_radix(&mac[..2], 16).expect("normalized");
        if mac == "00:00:00:00:00:00" || first & 1 == 1 {
            return Err(FleetError::Invalid(format!(
                "{text:?} is not an interface's address (all zero, broadcast or multicast)"
            )));
        }
        if macs.contains(&mac) {
            return Err(FleetError::Invalid(format!("MAC address {mac} is listed twice")));
        }
        macs.push(mac);
    }
    macs.sort();
    Ok(macs)
}

/// Addresses are for peers to dial; too many or too long ones are dropped, not stored.
pub(super) fn peer_addresses(mut peer: PeerAddresses) -> PeerAddresses {
    let keep = |list: &mut Vec<String>| {
        list.retain(|a| a.len() <= MAX_ADDRESS_LEN && !a.chars().any(deceptive));
        list.truncate(MAX_ADDRESSES);
    };
    keep(&mut peer.libp2p);
    keep(&mut peer.iroh_addrs);
    peer.iroh_id = peer.iroh_id.filter(|id| id.len() <= MAX_ADDRESS_LEN);
    peer
}

/// At most `max` characters of `text` (for free text that is shown, never parsed).
pub(super) fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(site: &str, macs: &[&str]) -> CheckinRequest {
        CheckinRequest {
            site: site.into(),
            name: "a".into(),
            group: None,
            macs: macs.iter().map(|m| (*m).to_owned()).collect(),
            platform: "p".into(),
            installed_version: 1,
            active_slot: None,
            agent_version: String::new(),
            agent_release: None,
            agent_previous: None,
            enrollment_token: None,
            peer: PeerAddresses::default(),
        }
    }

    #[test]
    fn one_spelling_per_mac_and_only_interface_addresses() {
        let ok = checkin(&request("s", &["AA-BB-CC-00-11-22", "aabb.cc00.1133"])).expect("ok");
        assert_eq!(ok.macs, vec!["aa:bb:cc:00:11:22", "aa:bb:cc:00:11:33"]);
        for bad in [
            &["aa:bb:cc:00:11:22", "AA-BB-CC-00-11-22"][..],
            &["ff:ff:ff:ff:ff:ff"],
            &["00:00:00:00:00:00"],
            &["01:00:5e:00:00:01"],
            &["a:a:b:b:c:c:0:0:1:1:2:2"],
            &["aa:bb-cc:00:11:22"],
        ] {
            assert!(checkin(&request("s", bad)).is_err(), "{bad:?} was accepted");
        }
        let many: Vec<String> = (0..=MAX_MACS).map(|i| format!("02:00:00:00:00:{i:02x}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(checkin(&request("s", &many)).is_err());
    }

    #[test]
    fn names_that_hide_what_they_are_are_refused() {
        for bad in ["store\u{0}9", "store\u{202E}9", "a\nb", "\u{200B}", &"x".repeat(MAX_TEXT + 1)]
        {
            assert!(checkin(&request(bad, &[])).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(checkin(&request(" Zürich 7 ", &[])).expect("ok").site, "Zürich 7");
        assert!(checkin(&request("  ", &[])).is_err(), "an empty site");
    }
}
