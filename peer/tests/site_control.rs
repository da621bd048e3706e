//! The site control plane on its own (libp2p over loopback, dialled by address since mDNS
//! cannot work on loopback): announcements reach the site's peers on the release's topic,
//! another site's peers never hear them, a peer that goes away is reported gone, and nothing
//! a site peer passes on in another's name is heard.

use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::{gossipsub, noise, tcp, yamux};
use sitecast_manifest::SecretKey;
use sitecast_peer::pieces::{HaveMap, PieceSet};
use sitecast_peer::scheduler::Assignment;
use sitecast_peer::site::{Announcement, Heard, SiteConfig, SiteControl};
use sitecast_peer::site_message::seal;

fn keys<const N: usize>() -> [SecretKey; N] {
    std::array::from_fn(|_| SecretKey::generate().expect("rng"))
}

async fn control(key: &SecretKey, site: &str) -> SiteControl {
    control_with(key, site, Duration::from_millis(300)).await
}

async fn control_with(key: &SecretKey, site: &str, heartbeat: Duration) -> SiteControl {
    let config = SiteConfig {
        site: site.into(),
        listen: "/ip4/127.0.0.1/tcp/0".into(),
        mdns: false,
        heartbeat,
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
    let [key_a, key_b, key_c] = keys();
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

/// A site peer that speaks the wire protocol by hand: gossipsub as the agents configure it,
/// publishing whatever bytes the test gives it.
fn hostile_peer(key: &SecretKey) -> libp2p::Swarm<gossipsub::Behaviour> {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.seed()).expect("key");
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("tcp")
        .with_behaviour(|_| {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                .message_id_fn(|m| {
                    gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
                })
                .build()
                .expect("config");
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)
                .expect("gossipsub")
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

fn announcement(blob: &[u8; 32], have: std::ops::Range<u64>) -> Vec<u8> {
    let mut pieces = PieceSet::empty(100);
    pieces.insert_range(have);
    serde_json::to_vec(&Announcement {
        blob: hex::encode(blob),
        have: HaveMap::from(&pieces),
        fetching: None,
        preparing: false,
        origin_assignment: Assignment::NEWEST.code(),
        iroh_addrs: Vec::new(),
    })
    .expect("encodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_is_heard_only_from_its_author() {
    let [author, listener_key, hostile_key] = keys();
    // A heartbeat longer than the test: the hostile peer is never reported gone.
    let listener = control_with(&listener_key, "store-1", Duration::from_secs(60)).await;
    let blob = [9u8; 32];
    let mut heard = listener.listen(blob);
    // The wire name of the release's topic: agents of one protocol version must agree on it.
    let topic_name = format!("sitecast/2/store-1/{}", hex::encode(blob));
    let topic = gossipsub::IdentTopic::new(topic_name.clone());

    let mut hostile = hostile_peer(&hostile_key);
    hostile.behaviour_mut().subscribe(&topic).expect("subscribe");
    hostile
        .dial(listener.addresses()[0].parse::<libp2p::Multiaddr>().expect("addr"))
        .expect("dial");
    let subscribed = async {
        loop {
            if let libp2p::swarm::SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) =
                hostile.select_next_some().await
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), subscribed)
        .await
        .expect("the listener subscribed");

    let mut forged = seal(&hostile_key, &topic_name, 20, &announcement(&blob, 0..100));
    forged[1..33].copy_from_slice(author.public().as_bytes());
    let messages = [
        // What the author really said, passed on by another peer: not heard.
        seal(&author, &topic_name, 10, &announcement(&blob, 10..40)),
        // The author's name on the hostile peer's signature: not heard.
        forged,
        // The hostile peer's own word, from its own connection: heard.
        seal(&hostile_key, &topic_name, 1, &announcement(&blob, 50..60)),
    ];
    for message in messages {
        hostile.behaviour_mut().publish(topic.clone(), message).expect("publish");
    }

    let first = loop {
        tokio::select! {
            _ = hostile.select_next_some() => {}
            heard = next(&mut heard, Duration::from_secs(10)) => break heard,
        }
    };
    let Some(Heard::Announced { peer, announcement }) = first else {
        panic!("expected the hostile peer's own announcement, got {first:?}");
    };
    assert_eq!(peer, *hostile_key.public().as_bytes(), "only what came from its author");
    let mut expected = PieceSet::empty(100);
    expected.insert_range(50..60);
    assert_eq!(announcement.have.to_set(100), expected);
}
