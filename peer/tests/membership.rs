//! LAN admission by site membership. A peer that is not a member of the site (another fleet's
//! appliance, or any key Central Command does not list) gets no byte from the site's data
//! plane and is not heard on its control plane, even when it knows the release; members get
//! everything. First the two planes driven directly with a member set, then real agents
//! against a real coordinator that names the members.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, ResponseDecoder, SlotPaths};
use sitecast_manifest::{ImageDigest, ImageInfo, SecretKey};
use sitecast_peer::agent::Lan;
use sitecast_peer::lan::{LanNodeForAgent, UploadLimits};
use sitecast_peer::membership::Membership;
use sitecast_peer::pieces::{HaveMap, PieceSet};
use sitecast_peer::scheduler::PeerId;
use sitecast_peer::site::{Heard, SiteConfig, SiteControl};
use sitecast_peer::swarm::{FetchError, LanFetcher, PeerNews, piece_count, piece_groups};

fn image_info(path: &Path) -> ImageInfo {
    let digest = ImageDigest::of_reader(std::fs::File::open(path).expect("open")).expect("hash");
    ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 }
}

/// The outboard of `image` (complete) kept in `dir`, so it can be served from there.
fn outboard(dir: &Path, image: &Path, info: &ImageInfo) {
    let paths = SlotPaths::beside(image, dir);
    OutboardStore::new(
        BlobLayout::new(info.blake3, info.size),
        FileDevice::open_or_create(&paths.outboard).expect("outboard"),
    )
    .compute_from(std::fs::File::open(image).expect("open"))
    .expect("outboard");
}

/// A LAN node on loopback serving `image` (complete) from `dir`.
async fn serving(dir: &Path, image: &Path, info: &ImageInfo) -> LanNodeForAgent {
    outboard(dir, image, info);
    let node = LanNodeForAgent::bind_loopback(
        &SecretKey::generate().expect("rng"),
        "store-1",
        UploadLimits::default(),
    )
    .await
    .expect("bind");
    node.serve_installed(info, image.to_owned(), dir.to_owned());
    node
}

/// A LAN node that knows the release (it has the manifest) and where `server` is.
async fn fetching(server: &LanNodeForAgent, info: &ImageInfo, dir: &Path) -> LanNodeForAgent {
    let node = LanNodeForAgent::bind_loopback(
        &SecretKey::generate().expect("rng"),
        "store-1",
        UploadLimits::default(),
    )
    .await
    .expect("bind");
    node.node.add_peer(server.node.id().0, &server.node.direct_addrs());
    let slot = dir.join(format!("slot-of-{}.img", hex::encode(&node.node.id().0[..4])));
    std::fs::File::create(&slot).expect("slot").set_len(info.size).expect("size");
    let _ = node.join(info, slot, dir.to_owned());
    node
}

/// Every piece of the release from `server`, each response verified; or the first failure.
async fn fetch_everything(
    client: &LanNodeForAgent,
    server: &LanNodeForAgent,
    info: &ImageInfo,
) -> Result<u64, FetchError> {
    let layout = BlobLayout::new(info.blake3, info.size);
    let fetcher = client.fetcher_for(info);
    let mut total = 0;
    for piece in 0..piece_count(&layout) {
        let groups = piece_groups(&layout, piece);
        let body: Bytes = fetcher.fetch(server.node.id(), groups.clone()).await?;
        let ranges = layout.chunk_ranges(groups);
        for item in ResponseDecoder::new(layout, &ranges, &body[..]).expect("header") {
            item.expect("every group verifies");
        }
        total += body.len() as u64;
    }
    Ok(total)
}

fn members(nodes: &[&LanNodeForAgent]) -> Option<BTreeSet<[u8; 32]>> {
    Some(nodes.iter().map(|n| n.node.id().0).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_serves_members_only() {
    sitecast_coordinator::install_tls_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image.raw");
    sitecast_iso::generate::write_image(&image, 3 * 1024 * 1024 + 11, "membership").expect("image");
    let info = image_info(&image);
    let server = serving(dir.path(), &image, &info).await;
    let member = fetching(&server, &info, dir.path()).await;
    let stranger = fetching(&server, &info, dir.path()).await;
    server.membership().set(members(&[&server, &member]));

    let total = fetch_everything(&member, &server, &info).await.expect("a member gets everything");
    let refused = fetch_everything(&stranger, &server, &info).await;
    assert!(matches!(refused, Err(FetchError::Failed(_))), "{refused:?}");
    assert_eq!(server.node.uploaded(), total, "not a byte went to the stranger");
    assert!(server.membership().status().lan_refused >= 1);

    // Admission follows the list: the stranger enrolled, the member was moved elsewhere
    // (its open connection is refused at its next request).
    server.membership().set(members(&[&server, &stranger]));
    assert_eq!(fetch_everything(&stranger, &server, &info).await, Ok(total));
    let moved = fetch_everything(&member, &server, &info).await;
    assert!(matches!(moved, Err(FetchError::Failed(_))), "{moved:?}");
    assert_eq!(server.node.uploaded(), 2 * total);

    // No list at all (a coordinator that does not say): everyone, as before membership.
    server.membership().set(None);
    assert_eq!(fetch_everything(&member, &server, &info).await, Ok(total));
}

async fn control(key: &SecretKey, membership: Membership) -> SiteControl {
    let config = SiteConfig {
        site: "store-1".into(),
        listen: "/ip4/127.0.0.1/tcp/0".into(),
        mdns: false,
        heartbeat: Duration::from_millis(300),
        membership,
    };
    SiteControl::start(key, config).await.expect("control plane")
}

/// The next announcement heard (skipping "gone" news of others), within 15 s.
async fn next_announcer(heard: &mut tokio::sync::mpsc::Receiver<Heard>) -> [u8; 32] {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, heard.recv()).await {
            Ok(Some(Heard::Announced { peer, .. })) => return peer,
            Ok(Some(Heard::Gone { .. })) => {}
            Ok(None) | Err(_) => panic!("no announcement heard"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_of_non_members_are_not_heard() {
    let keys: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate().expect("rng")).collect();
    let [listener_key, member_key, stranger_key] = &keys[..] else { unreachable!() };
    let key = |k: &SecretKey| *k.public().as_bytes();
    let membership = Membership::default();
    membership.set(Some([key(listener_key), key(member_key)].into()));
    let listener = control(listener_key, membership.clone()).await;
    let member = control(member_key, Membership::default()).await;
    let stranger = control(stranger_key, Membership::default()).await;
    let blob = [3u8; 32];
    let mut heard = listener.listen(blob);
    member.dial(&listener.addresses()[0]).expect("dial");
    stranger.dial(&listener.addresses()[0]).expect("dial");
    let everything = HaveMap::from(&PieceSet::full(10));
    let addrs = vec!["127.0.0.1:4433".parse().expect("addr")];
    member.announce(blob, everything.clone(), addrs.clone());
    stranger.announce(blob, everything.clone(), addrs.clone());

    // The stranger's announcements arrive (they are counted) and are dropped; the member's
    // are heard.
    let deadline = Instant::now() + Duration::from_secs(30);
    while membership.status().announcements_ignored < 2 {
        assert_eq!(next_announcer(&mut heard).await, key(member_key), "a stranger was heard");
        assert!(Instant::now() < deadline, "the stranger's announcements never arrived");
    }
    assert_eq!(next_announcer(&mut heard).await, key(member_key));

    // Enrolled, the stranger is heard; removed, the member is gone at once and not heard
    // after that.
    membership.set(Some([key(listener_key), key(stranger_key)].into()));
    let (mut stranger_heard, mut member_gone) = (false, false);
    while !(stranger_heard && member_gone) {
        match tokio::time::timeout(Duration::from_secs(15), heard.recv()).await {
            Ok(Some(Heard::Announced { peer, .. })) => {
                assert!(!(member_gone && peer == key(member_key)), "heard after it was gone");
                stranger_heard |= peer == key(stranger_key);
            }
            Ok(Some(Heard::Gone { peer })) => member_gone |= peer == key(member_key),
            Ok(None) | Err(_) => {
                panic!("stranger heard: {stranger_heard}, member gone: {member_gone}")
            }
        }
    }
}

/// Relies on the coordinator naming each site's members in check-in answers (`site_members`).
///
/// A member appliance that checks in only once an hour serves the release; a stranger that
/// knows the release (another fleet's appliance on the same LAN: it learnt the member's
/// addresses from its announcements) is refused every byte and its own announcements are not
/// heard by the site; a freshly enrolled member is admitted soon (the member checks in early
/// when a non-member shows up, once for each) and fetches the whole release from the member
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_no_byte_and_a_new_member_gets_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, info) = origin.publish(2, 6 * 1024 * 1024 + 9).await;
    let image = std::fs::read(&image_path).expect("image");
    let deadline = Instant::now() + Duration::from_secs(120);

    // The member: updated, so it serves release 2 from its running slot whatever the window.
    let watch_a0 = RecordingRelay::start(&origin.url).await;
    let mut a0 = AgentProcess::new(&dir.path().join("a0"), &origin, "store-1", "a0", info.size);
    a0.set_coordinator(&watch_a0.url);
    a0.set_arg("--checkin-interval-secs", "3600");
    a0.configure(&format!(
        "control_socket = \"{}\"\n",
        a0.dir.join("state/control.sock").display()
    ));
    a0.start();
    wait_enrolled(&origin, 1, deadline, &a0).await;
    origin.rollout(2).await;
    assert!(a0.control("check").contains("check-in requested"));
    wait_state(&origin, &["a0"], "ready", deadline).await;
    assert!(a0.control("skip-window").contains("will not wait"));
    wait_reboot(&mut a0, deadline).await;
    let checkins_before_restart = watch_a0.requests("/api/appliances/checkin").len();
    a0.start();
    wait_state(&origin, &["a0"], "succeeded", deadline).await;
    let a0_status = a0.status().await.expect("a0's status");
    let a0_libp2p = a0_status["addresses"]["libp2p"][0].as_str().expect("libp2p").to_owned();
    let a0_id = PeerId(
        sitecast_manifest::decode_hex::<32>(a0_status["appliance"].as_str().expect("key"))
            .expect("hex key"),
    );
    // Its first (regular) check-in after the restart is made: from here on, with an hour
    // between regular ones, every check-in is an early one.
    while watch_a0.requests("/api/appliances/checkin").len() == checkins_before_restart {
        assert!(Instant::now() < deadline, "a0 never checked in after its restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checkins_before = watch_a0.requests("/api/appliances/checkin").len();

    // The stranger joins the release on the site's control plane, as an agent would, and
    // announces that it holds it all (to lure members into fetching from it).
    let stranger = LanNodeForAgent::bind_loopback(
        &SecretKey::generate().expect("rng"),
        "store-1",
        UploadLimits::default(),
    )
    .await
    .expect("bind");
    stranger.site.dial(&a0_libp2p).expect("dial a0");
    let stranger_dir = dir.path().join("stranger");
    std::fs::create_dir_all(&stranger_dir).expect("dir");
    let stranger_slot = stranger_dir.join("slot.img");
    std::fs::File::create(&stranger_slot).expect("slot").set_len(info.size).expect("size");
    let joined = stranger.join(&info, stranger_slot, stranger_dir.clone());
    let mut news = joined.news;
    outboard(&stranger_dir, &image_path, &info);
    stranger.serve_installed(&info, image_path.clone(), stranger_dir);
    // It hears where a0 is and what it holds...
    loop {
        match tokio::time::timeout(Duration::from_secs(30), news.recv()).await {
            Ok(Some(PeerNews::Have(peer, holding))) if holding.have.is_full() && peer == a0_id => {
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the stranger never heard a0"),
        }
    }
    // ...and gets nothing.
    let layout = BlobLayout::new(info.blake3, info.size);
    for piece in 0..piece_count(&layout) {
        let groups = piece_groups(&layout, piece);
        let answer = stranger.fetcher_for(&info).fetch(a0_id, groups).await;
        assert!(
            matches!(answer, Err(FetchError::Failed(_))),
            "piece {piece}: {:?}",
            answer.map(|body| body.len())
        );
    }
    loop {
        let status = a0.status().await.unwrap_or_default();
        let membership = &status["membership"];
        if membership["lan_refused"].as_u64() >= Some(1)
            && membership["announcements_ignored"].as_u64() >= Some(1)
        {
            assert_eq!(membership["members"], 1, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "a0 never refused the stranger: {status}\n{}", a0.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A new member, pinned to the release once enrolled, whose origin goes away as soon as
    // its download starts: it can only finish from a0, which has to learn of it first.
    let origin_relay = CuttableRelay::start(&origin.url, 256 * 1024).await;
    let mut a1 = AgentProcess::new(&dir.path().join("a1"), &origin, "store-1", "a1", info.size);
    a1.set_coordinator(&origin_relay.url);
    a1.start();
    wait_enrolled(&origin, 2, deadline, &a1).await;
    let a1_key = a1.status().await.expect("status")["appliance"].as_str().expect("key").to_owned();
    origin.pin(&a1_key, 2).await;
    while local_state(&a1).await != "downloading" {
        assert!(a1.exited().is_none() && Instant::now() < deadline, "{}", a1.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    origin_relay.cut();
    let a1_status = a1.status().await.expect("a1's status");
    stranger
        .site
        .dial(a1_status["addresses"]["libp2p"][0].as_str().expect("libp2p"))
        .expect("dial");
    while local_state(&a1).await != "ready" {
        assert!(a1.exited().is_none(), "a1 stopped:\n{}", a1.log());
        assert!(Instant::now() < deadline, "a1 never finished:\n{}\n{}", a1.log(), a0.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slot = std::fs::read(a1.dir.join("slot-b.img")).expect("slot");
    assert!(slot == image, "a1's slot B differs from the image");
    let a1_status = a1.status().await.expect("status");
    assert!(a1_status["update"]["bytes_from_lan"].as_u64() > Some(0), "{a1_status}");
    // a1 never counted on the stranger, whose announcements it ignored.
    assert_eq!(stranger.node.uploaded(), 0, "a member fetched from the stranger");
    while a1.status().await.unwrap_or_default()["membership"]["announcements_ignored"].as_u64()
        < Some(1)
    {
        assert!(Instant::now() < deadline, "a1 never heard the stranger:\n{}", a1.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The stranger is still refused, and it made a0 check in early once however often it
    // came back; a1 once more.
    let again = stranger.fetcher_for(&info).fetch(a0_id, 0..1).await;
    assert!(matches!(again, Err(FetchError::Failed(_))), "{:?}", again.map(|b| b.len()));
    let early = watch_a0.requests("/api/appliances/checkin").len() - checkins_before;
    assert!(early >= 1, "a0 never checked in early");
    assert!(
        early as u32 <= sitecast_peer::early_checkin::EARLY_CHECKINS_PER_INTERVAL,
        "{early} early check-ins:\n{}",
        a0.log()
    );
}
