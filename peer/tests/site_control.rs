//! The site control plane on its own (libp2p over loopback, dialled by address since mDNS
//! cannot work on loopback): announcements reach the site's peers on the release's topic,
//! another site's peers never hear them, and a peer that goes away is reported gone.

use std::time::Duration;

use sitecast_manifest::SecretKey;
use sitecast_peer::pieces::{HaveMap, PieceSet};
use sitecast_peer::site::{Heard, SiteConfig, SiteControl};

async fn control(key: &SecretKey, site: &str) -> SiteControl {
    let config = SiteConfig {
        site: site.into(),
        listen: "/ip4/127.0.0.1/tcp/0".into(),
        mdns: false,
        heartbeat: Duration::from_millis(300),
        membership: Default::default(),
    };
    SiteControl::start(key, config).await.expect("control plane")
}

async fn next(heard: &mut tokio::sync::mpsc::Receiver<Heard>, within: Duration) -> Option<Heard> {
    tokio::time::timeout(within, heard.recv()).await.ok().flatten()
}

/// Waits until `heard` says the peer of `key` is gone (announcements before that are fine).
async fn wait_gone(heard: &mut tokio::sync::mpsc::Receiver<Heard>, key: &SecretKey, why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match next(heard, Duration::from_secs(15)).await {
            Some(Heard::Gone { peer }) => {
                assert_eq!(peer, *key.public().as_bytes());
                return;
            }
            Some(Heard::Announced { .. }) => {
                assert!(tokio::time::Instant::now() < deadline, "never told that it {why}")
            }
            None => panic!("never told that the peer {why}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_reach_the_site_and_silence_means_gone() {
    let (key_a, key_b, key_c) = (
        SecretKey::generate().expect("rng"),
        SecretKey::generate().expect("rng"),
        SecretKey::generate().expect("rng"),
    );
    let a = control(&key_a, "store-1").await;
    let b = control(&key_b, "store-1").await;
    let other_site = control(&key_c, "store-2").await;
    let blob = [7u8; 32];
    let mut heard_b = b.listen(blob);
    let mut heard_other = other_site.listen(blob);
    b.dial(&a.addresses()[0]).expect("dial");
    other_site.dial(&a.addresses()[0]).expect("dial");
    assert!(b.dial("/ip4/127.0.0.1/tcp/1").is_err(), "an address without a peer id is refused");

    let mut have = PieceSet::empty(100);
    have.insert_range(10..40);
    let iroh = vec!["127.0.0.1:4433".parse().expect("addr")];
    a.announce(blob, HaveMap::from(&have), iroh.clone());
    let Some(Heard::Announced { peer, announcement }) =
        next(&mut heard_b, Duration::from_secs(10)).await
    else {
        panic!("b never heard a's announcement");
    };
    assert_eq!(peer, *key_a.public().as_bytes(), "the signer is the peer announced");
    assert_eq!(announcement.have.to_set(100), have);
    assert_eq!(announcement.iroh_addrs, iroh);

    // Growth is announced again.
    have.insert_range(0..100);
    a.announce(blob, HaveMap::from(&have), iroh.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match next(&mut heard_b, Duration::from_secs(10)).await {
            Some(Heard::Announced { announcement, .. })
                if announcement.have.to_set(100).is_full() =>
            {
                break;
            }
            Some(_) => assert!(tokio::time::Instant::now() < deadline, "no full have-map"),
            None => panic!("b heard nothing more"),
        }
    }

    // Another site is connected to a but its topic differs: it hears nothing of store-1.
    assert_eq!(next(&mut heard_other, Duration::from_secs(2)).await, None);

    // a stops announcing the release but stays connected: silent for three heartbeats, it
    // is gone for this release; then it announces again and is back.
    a.stop(blob);
    wait_gone(&mut heard_b, &key_a, "went silent").await;
    a.announce(blob, HaveMap::from(&have), iroh.clone());
    assert!(
        matches!(next(&mut heard_b, Duration::from_secs(10)).await, Some(Heard::Announced { .. })),
        "a is back"
    );

    // a goes away: b hears that it is gone (its connection closes).
    drop(a);
    wait_gone(&mut heard_b, &key_a, "went away").await;
}
