//! Updates that send only what changed: appliances whose active slot holds an older image
//! copy what the new one shares with it (found through the release's signed content index),
//! verify every group before it is written, and fetch only the rest, from each other first.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1024 * 1024;

/// `len` bytes from a seeded stream (as compressed filesystems look: nothing repeats).
fn noise(len: usize, seed: &str) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    blake3::Hasher::new_derive_key(seed).finalize_xof().fill(&mut bytes);
    bytes
}

/// Release 1 and release 2 of an image: 2 differs by 20 kB inserted, 50 kB changed and
/// 10 kB removed, each in a different place.
fn image_pair(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let old = noise(12 * MIB, "release 1");
    let mut new = [
        &old[..2 * MIB],
        &noise(20_000, "inserted")[..],
        &old[2 * MIB..9 * MIB],
        &old[9 * MIB + 10_000..],
    ]
    .concat();
    new[6 * MIB..6 * MIB + 50_000].copy_from_slice(&noise(50_000, "changed"));
    std::fs::write(dir.join("image-v1.raw"), &old).expect("v1");
    std::fs::write(dir.join("image-v2.raw"), &new).expect("v2");
    (old, new)
}

/// What an appliance whose active slot holds `active` finds of `new` there, as the agent
/// finds it (the same index and planner): the groups it copies, and the bytes it holds of
/// the groups it holds in part (those of at least `MIN_PART` bytes).
struct Found {
    copied: std::collections::BTreeSet<u64>,
    partly: std::collections::BTreeMap<u64, u64>,
}

fn found_in(active: &[u8], new: &[u8]) -> Found {
    use sitecast_delta::index::IndexEntry;
    use sitecast_delta::reuse::{GroupPlanner, OlderImage};
    let chunking = sitecast_delta::Chunking::default();
    let older = OlderImage::read(active, chunking).expect("older");
    let mut planner = GroupPlanner::new(&older, new.len() as u64);
    let chunks = sitecast_delta::chunks(new, chunking).expect("chunks");
    let mut found = Found { copied: Default::default(), partly: Default::default() };
    for copy in chunks.iter().flat_map(|c| planner.push(&IndexEntry::from(c))) {
        if copy.whole {
            found.copied.insert(copy.group);
        } else if copy.len() >= sitecast_peer::reuse::MIN_PART {
            found.partly.insert(copy.group, copy.len());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_on_two_older_releases_fetches_each_missing_piece_from_the_origin_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (old, new) = image_pair(dir.path());
    let new_path = dir.path().join("image-v2.raw");
    let image = origin.publish_image(2, &new_path, Some(content_index_of(&new_path))).await;

    // a0 and a1 run release 1, a0's copy damaged in one place (a disk that lost a block
    // since it was installed); a2 runs release 0, which differs from 1 elsewhere.
    let mut older = old.clone();
    older[10 * MIB..10 * MIB + 30_000].copy_from_slice(&noise(30_000, "release 0"));
    let mut damaged = old.clone();
    damaged[4 * MIB..4 * MIB + 40_000].iter_mut().for_each(|b| *b ^= 0x55);
    let mut agents = Vec::new();
    // What each agent reads of its active slot: a partition larger than the image it holds,
    // all of it unless the agent recorded the image's size when it installed it (a1 did).
    let mut actives = Vec::new();
    for (i, active) in [damaged, old.clone(), older].into_iter().enumerate() {
        let name = format!("a{i}");
        let mut agent =
            AgentProcess::new(&dir.path().join(&name), &origin, "store-1", &name, 16 * MIB as u64);
        let mut slot = active.clone();
        slot.resize(16 * MIB, 0);
        std::fs::write(agent.dir.join("slot-a.img"), &slot).expect("slot A");
        if i == 1 {
            std::fs::create_dir_all(agent.dir.join("state")).expect("state dir");
            let state = serde_json::json!({"slot_image_sizes": {"A": active.len()}});
            std::fs::write(agent.dir.join("state/agent.json"), state.to_string()).expect("state");
            actives.push(active);
        } else {
            actives.push(slot);
        }
        agent.start();
        agents.push(agent);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 3, deadline, &agents[0]).await;
    wait_members_known(&mut agents, 3, deadline).await;
    origin.rollout(2).await;
    wait_state(&origin, &["a0", "a1", "a2"], "ready", deadline).await;

    for agent in &agents {
        let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
        assert!(slot[..new.len()] == new[..], "{}: slot B is not release 2", agent.name);
    }
    let list = appliances(&origin).await;
    let reported = |name: &str| {
        let appliance = list.iter().find(|a| a["name"] == name).expect("listed");
        appliance["update"]["bytes_reused"].as_u64().unwrap_or(0)
    };
    // Each copied what its own active slot shares with release 2, no more, no less.
    let layout = sitecast_iso::BlobLayout::new(image.blake3, image.size);
    let found: Vec<_> = actives.iter().map(|active| found_in(active, &new)).collect();
    let copied: Vec<_> = found.iter().map(|f| f.copied.clone()).collect();
    for (i, groups) in copied.iter().enumerate() {
        let bytes: u64 =
            groups.iter().map(|&g| layout.group_bytes(g).end - layout.group_bytes(g).start).sum();
        assert_eq!(reported(&format!("a{i}")), bytes, "a{i}");
        assert!(bytes as f64 >= 0.95 * new.len() as f64, "a{i} copied only {bytes} bytes");
    }
    for agent in &agents {
        let log = agent.log();
        let lines = log.lines().filter(|l| {
            ["fetched", "copied from the active slot", "download finished"]
                .iter()
                .any(|what| l.contains(what))
        });
        eprintln!("{}:\n{}", agent.name, lines.collect::<Vec<_>>().join("\n"));
    }

    // The origin sent each piece no appliance could make whole from its own slot once (a
    // piece one of them made whole comes over the LAN), and of it only what the appliance
    // that fetched it lacked of the span of groups it had not copied: the rest of the groups
    // it held in part, the others whole; plus the index and the group hashes (from which each
    // rebuilds the outboard) once each.
    let pieces = sitecast_scheduler::pieces::PieceLayout::new(layout.groups());
    let lacked = |piece: u64, found: &Found| {
        let missing: Vec<u64> =
            pieces.groups_of(piece).filter(|g| !found.copied.contains(g)).collect();
        let (Some(&first), Some(&last)) = (missing.first(), missing.last()) else {
            return (0, 0);
        };
        let span = layout.group_bytes(last).end - layout.group_bytes(first).start;
        let held: u64 = (first..=last).filter_map(|g| found.partly.get(&g)).sum();
        (span, span - held)
    };
    let (mut spans, mut least, mut most, mut from_origin) = (0, 0, 0, 0);
    for piece in 0..pieces.pieces() {
        let lacks: Vec<(u64, u64)> = found.iter().map(|f| lacked(piece, f)).collect();
        if lacks.iter().all(|&(span, _)| span > 0) {
            from_origin += 1;
            spans += lacks.iter().map(|&(span, _)| span).min().expect("three");
            least += lacks.iter().map(|&(_, rest)| rest).min().expect("three");
            most += lacks.iter().map(|&(_, rest)| rest).max().expect("three");
        }
    }
    // What no appliance's slot holds must cross the WAN at least once, whatever the plan.
    let chunking = sitecast_delta::Chunking::default();
    let mut held = Vec::new();
    for active in &actives {
        held.extend(sitecast_delta::chunks(&active[..], chunking).expect("chunks"));
    }
    let new_chunks = sitecast_delta::chunks(&new[..], chunking).expect("chunks");
    let nowhere = sitecast_delta::estimate(&held, &new_chunks).missing_bytes;
    let index = content_index_of(&new_path).size;
    let metadata = index + layout.group_hashes_len();
    let served = origin.origin_bytes("store-1", 2).await;
    eprintln!(
        "Central Command served {served} bytes for a {}-byte image: of {from_origin} pieces no \
         appliance could copy, the rest of the spans ({least} to {most} bytes; {spans} as \
         whole groups; {nowhere} in no slot), {index} of index, {} of group hashes",
        image.size,
        layout.group_hashes_len()
    );
    assert!(served >= nowhere + metadata, "{served} bytes served");
    assert!(served < spans + metadata, "{served} bytes served: groups held in part fetched whole");
    // Parents and headers sent with what is fetched come on top: a few per cent.
    let most = (1.05 * (most + metadata) as f64) as u64;
    assert!(served <= most, "{served} bytes served, more than {most}");
    let site = &origin.operator_get("/api/sites").await["sites"][0];
    let reused: u64 = ["a0", "a1", "a2"].iter().map(|n| reported(n)).sum();
    assert_eq!(site["reused_bytes"], reused, "{site}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_signed_index_is_not_its_images_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (_, _) = image_pair(dir.path());
    // The index of release 1's image signed for release 2's.
    let wrong = content_index_of(&dir.path().join("image-v1.raw"));
    let (status, body) =
        origin.try_publish_image(2, &dir.path().join("image-v2.raw"), Some(wrong)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("index_mismatch"), "{body}");
    let releases = origin.operator_get("/api/releases").await;
    assert_eq!(releases, serde_json::json!([]), "nothing is published");
    // The same release with its own index is published.
    let path = dir.path().join("image-v2.raw");
    origin.publish_image(2, &path, Some(content_index_of(&path))).await;
}

/// What copying needs of the image at `new_path`, made in `dir` as Central Command makes it:
/// the image's digest, its outboard (and where it is), and the content index of the image at
/// `index_of` (the new image's own, unless a test lies).
struct Prepared {
    image: sitecast_manifest::ImageInfo,
    outboard: sitecast_iso::OutboardStore<sitecast_iso::FileDevice>,
    outboard_path: std::path::PathBuf,
    index: std::path::PathBuf,
}

fn prepare(dir: &Path, new_path: &Path, index_of: &Path) -> Prepared {
    use sitecast_iso::{BlobLayout, FileDevice, OutboardStore};
    let digest =
        sitecast_manifest::ImageDigest::of_reader(std::fs::File::open(new_path).expect("open"))
            .expect("hash");
    let image = sitecast_manifest::ImageInfo {
        size: digest.size,
        blake3: digest.blake3,
        sha256: digest.sha256,
    };
    let layout = BlobLayout::new(image.blake3, image.size);
    let outboard_path = dir.join("new.obao4");
    let mut outboard =
        OutboardStore::new(layout, FileDevice::open_or_create(&outboard_path).expect("outboard"));
    outboard.compute_from(std::fs::File::open(new_path).expect("open")).expect("outboard");
    let index = dir.join("index");
    sitecast_delta::index::write(
        std::fs::File::open(index_of).expect("open"),
        sitecast_delta::Chunking::default(),
        std::fs::File::create(&index).expect("index"),
    )
    .expect("index");
    Prepared { image, outboard, outboard_path, index }
}

/// Copies from `active` into a fresh slot for the image at `new_path`, with the content index
/// of the image at `index_of`; the slot, its paths and what was copied.
fn copy_with_index(
    dir: &Path,
    new_path: &Path,
    index_of: &Path,
    active: &Path,
) -> (sitecast_iso::SlotWriter<sitecast_iso::FileDevice>, sitecast_peer::reuse::Reused) {
    use sitecast_iso::{Slot, SlotPaths, SlotWriter};
    let Prepared { image, outboard, index, .. } = prepare(dir, new_path, index_of);
    let slot = dir.join("slot-b.img");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&slot);
    file.expect("slot").set_len(16 * MIB as u64).expect("size");
    let mut writer =
        SlotWriter::open_paths(Slot::B, &image, &SlotPaths::beside(&slot, dir)).expect("writer");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut heard = 0;
    let mut written = |bytes| heard += bytes;
    let (reused, _) = sitecast_peer::reuse::copy_from_active(
        &mut writer,
        &outboard,
        &index,
        active,
        None,
        &stop,
        &mut written,
    )
    .expect("copy");
    assert_eq!(heard, reused.bytes, "the bytes written as they were written");
    (writer, reused)
}

#[test]
fn an_index_that_lies_costs_fetches_never_a_wrong_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, _) = image_pair(dir.path());
    let active = dir.path().join("slot-a.img");
    std::fs::write(&active, &old).expect("slot A");
    // A new image of the same size with 50 kB changed at 6 MiB, offered with release 1's
    // index: it places release 1's chunks everywhere, which is wrong in the changed part.
    let mut new = old.clone();
    new[6 * MIB..6 * MIB + 50_000].copy_from_slice(&noise(50_000, "changed"));
    let new_path = dir.path().join("image-v3.raw");
    std::fs::write(&new_path, &new).expect("v3");
    let (writer, reused) =
        copy_with_index(dir.path(), &new_path, &dir.path().join("image-v1.raw"), &active);
    let changed_groups = 50_000 / 16384 + 2;
    assert!(reused.refused > 0 && reused.refused <= changed_groups, "{reused:?}");
    assert_eq!(reused.groups + reused.refused, writer.layout().groups(), "{reused:?}");
    assert_eq!(reused.groups, writer.written_groups(), "{reused:?}");
    // Every group written is release 2's; none past what verified.
    let slot = std::fs::read(dir.path().join("slot-b.img")).expect("slot");
    let layout = writer.layout();
    for group in 0..layout.groups() {
        let bytes = layout.group_bytes(group);
        let (start, end) = (bytes.start as usize, bytes.end as usize);
        if writer.has(group) {
            assert!(slot[start..end] == new[start..end], "group {group} written wrong");
        } else {
            assert!(slot[start..end].iter().all(|&b| b == 0), "group {group} written unverified");
        }
    }
}

#[test]
fn copying_resumes_after_a_restart_with_what_was_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, _) = image_pair(dir.path());
    let active = dir.path().join("slot-a.img");
    std::fs::write(&active, &old).expect("slot A");
    let new_path = dir.path().join("image-v2.raw");
    let (writer, first) = copy_with_index(dir.path(), &new_path, &new_path, &active);
    assert!(first.groups > 0 && first.refused == 0, "{first:?}");
    drop(writer);
    // Opened again (an agent restarted mid-download): the recorded groups are not copied
    // twice, and the slot still holds them.
    let (writer, second) = copy_with_index(dir.path(), &new_path, &new_path, &active);
    assert_eq!(second.groups, 0, "{second:?}");
    assert_eq!(writer.written_groups(), first.groups);
    assert_eq!(
        writer.stats().resumed + writer.stats().seeded,
        first.groups,
        "{:?}",
        writer.stats()
    );
}

/// An image that compresses (an uncompressed file system): lines of text with a little
/// noise, so no two groups are alike.
fn compressible(len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len + 100);
    let mut i = 0u64;
    while bytes.len() < len {
        let salt = blake3::hash(&i.to_le_bytes()).to_hex();
        bytes.extend_from_slice(
            format!("/usr/share/doc/package-{i}/copyright {}\n", &salt[..8]).as_bytes(),
        );
        i += 1;
    }
    bytes.truncate(len);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_compresses_crosses_the_wan_compressed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let image = compressible(6 * MIB + 1234);
    let path = dir.path().join("image-v2.raw");
    std::fs::write(&path, &image).expect("image");
    // No index: every byte comes from the origin.
    origin.publish_image(2, &path, None).await;
    let mut agent =
        AgentProcess::new(&dir.path().join("a0"), &origin, "store-1", "a0", 8 * MIB as u64);
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;
    wait_state(&origin, &["a0"], "ready", deadline).await;

    let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
    assert!(slot[..image.len()] == image[..], "slot B is not the image");
    // Counted as sent on the wire: compressed, with the outboard's parents inside.
    let served = origin.origin_bytes("store-1", 2).await;
    eprintln!("Central Command served {served} bytes for a {}-byte image", image.len());
    assert!(served > 0 && served < image.len() as u64 / 2, "{served} bytes served");
    // The agent counts the same bytes, as they crossed the wire, not as they decompressed
    // (short only by the ends of streams it had no need to read).
    let list = appliances(&origin).await;
    let reported = list[0]["update"]["bytes_from_origin"].as_u64().expect("reported");
    assert!(reported <= served && served - reported < served / 100, "{reported} of {served}");
}

/// A lone appliance (`client`, enrolled) fills its slot from Central Command alone after
/// copying from its active slot (release 1) what it can; with `damaged`, the parts it holds
/// of the groups it holds in part are damaged after the copy (a disk that lost them
/// meanwhile); with `reference`, it asks for what it lacks compressed against its active
/// slot. What it fetched (decompressed).
async fn fill_with_patches(
    client: sitecast_peer::coordinator::CoordinatorClient,
    key: sitecast_manifest::SecretKey,
    (old_path, new_path): (&Path, &Path),
    dir: &Path,
    name: &str,
    damaged: bool,
    reference: bool,
) -> u64 {
    use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, Slot, SlotPaths, SlotWriter};
    use std::os::unix::fs::FileExt;
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).expect("dir");
    let active = sub.join("slot-a.img");
    std::fs::copy(old_path, &active).expect("slot A");
    let offer = client.checkin(&lone_checkin("lab", name)).await.expect("checkin");
    assert!(offer.update_available, "release 2 is offered");
    let urls = offer.origin.expect("origin");
    let bytes_url = urls.bytes.expect("Central Command offers plain bytes");
    // Against the active slot, with the plan for the pair Central Command offers.
    let plan = match reference {
        true => Some(fetch_plan(&client, &key, urls.plan.as_ref().expect("a plan"), &sub).await),
        false => None,
    };

    // The index and the outboard as Central Command has them, made here from the image.
    let Prepared { image, outboard, outboard_path, index } = prepare(&sub, new_path, new_path);
    let layout = BlobLayout::new(image.blake3, image.size);
    let slot = sub.join("slot-b.img");
    std::fs::File::create(&slot).expect("slot").set_len(image.size + 4096).expect("size");
    let mut writer =
        SlotWriter::open_paths(Slot::B, &image, &SlotPaths::beside(&slot, &sub)).expect("writer");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let copied = match &plan {
        Some(plan) => {
            // The outboard rebuilt from the plan and the active slot, as the agent does.
            let hashes = sub.join("plan-hashes");
            sitecast_peer::reuse::group_hashes_from_plan(plan, &active, layout, &hashes, &stop)
                .expect("group hashes");
            let device = FileDevice::open_or_create(&sub.join("planned.obao4")).expect("outboard");
            let mut rebuilt = OutboardStore::new(layout, device);
            let hashes = std::fs::File::open(&hashes).expect("hashes");
            assert!(rebuilt.rebuild_from_group_hashes(hashes).expect("rebuild"), "the plan's tree");
            sitecast_peer::reuse::copy_with_plan(
                &mut writer,
                &rebuilt,
                plan,
                &active,
                &stop,
                &mut |_| {},
            )
        }
        None => sitecast_peer::reuse::copy_from_active(
            &mut writer,
            &outboard,
            &index,
            &active,
            None,
            &stop,
            &mut |_| {},
        ),
    };
    let (_, parts) = copied.expect("copy");
    let partial = parts.partial;
    assert!(!partial.is_empty(), "the changes' edges leave groups held in part");
    if damaged {
        let file = std::fs::OpenOptions::new().write(true).open(&active).expect("slot A");
        for (_, spans) in partial.iter() {
            file.write_all_at(&[0x55; 8], spans[0].from).expect("damage");
        }
    }
    let outboard =
        OutboardStore::new(layout, FileDevice::open_read_only(&outboard_path).expect("outboard"));
    let active = FileDevice::open_read_only(&active).expect("slot A");
    let from = blake3::hash(&std::fs::read(old_path).expect("v1")).to_hex().to_string();
    let patches = sitecast_peer::patch::Patches::new(partial, active, outboard, bytes_url)
        .with_reference(reference.then_some((from, parts.runs)));
    let (_news_tx, news) = tokio::sync::mpsc::channel(8);
    let (announce, _announced) = tokio::sync::mpsc::channel(8);
    let stats =
        std::sync::Arc::new(std::sync::Mutex::new(sitecast_peer::swarm::TransferStats::default()));
    let me = sitecast_peer::scheduler::PeerId(*key.public().as_bytes());
    let swarm = sitecast_peer::swarm::Swarm::new(
        me,
        writer,
        Some((client, urls.ranges)),
        None,
        news,
        announce,
        stats.clone(),
        |config| config.discovery_grace = Duration::ZERO,
    )
    .with_patches(std::sync::Arc::new(patches));
    let writer = swarm.run().await.expect("swarm completes");
    writer.finish().expect("the slot reads back as release 2");
    let written = std::fs::read(&slot).expect("slot");
    assert!(written[..image.size as usize] == std::fs::read(new_path).expect("v2")[..]);
    let stats = *stats.lock().expect("stats");
    stats.bytes_from_origin
}

/// The plan offered, fetched from Central Command as the site fetches it (verified against
/// the hash offered) into a cache in `dir`; its path.
async fn fetch_plan(
    client: &sitecast_peer::coordinator::CoordinatorClient,
    key: &sitecast_manifest::SecretKey,
    plan: &sitecast_manifest::api::BlobOffer,
    dir: &Path,
) -> PathBuf {
    let cache = sitecast_peer::agent_files::FileCache::at(dir.join("plan-cache"));
    let sources = sitecast_peer::agent_files::FileSources {
        client: client.clone(),
        ranges: String::new(),
        lan: None,
        me: sitecast_peer::scheduler::PeerId(*key.public().as_bytes()),
        site_members: Vec::new(),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let file = plan.file();
    let ranges = plan.ranges.clone();
    let fetched = sitecast_peer::agent_files::fetch_blob(&sources, &cache, &file, ranges, &cancel);
    fetched.await.expect("plan fetched");
    cache.paths(&plan.blake3).slot
}

/// Appliances of site "lab" with these names, enrolled by hand (no agent process): a client
/// and key each.
async fn enrolled_at<const N: usize>(
    origin: &Origin,
    names: [&str; N],
) -> Vec<(sitecast_peer::coordinator::CoordinatorClient, sitecast_manifest::SecretKey)> {
    let mut clients = Vec::new();
    for name in names {
        let key = sitecast_manifest::SecretKey::generate().expect("rng");
        let client =
            sitecast_peer::coordinator::CoordinatorClient::new(&origin.url, None, key.clone())
                .expect("client");
        client.checkin(&lone_checkin("lab", name)).await.expect("enrolled");
        clients.push((client, key));
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_held_in_part_are_fetched_whole_when_their_parts_do_not_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    image_pair(dir.path());
    let new_path = dir.path().join("image-v2.raw");
    origin.publish_image(2, &new_path, Some(content_index_of(&new_path))).await;
    let clients = enrolled_at(&origin, ["intact", "damaged"]).await;
    origin.rollout(2).await;
    let mut fetched = Vec::new();
    let v1 = dir.path().join("image-v1.raw");
    let pair = (v1.as_path(), new_path.as_path());
    for ((client, key), (name, damaged)) in
        clients.into_iter().zip([("intact", false), ("damaged", true)])
    {
        fetched.push(fill_with_patches(client, key, pair, dir.path(), name, damaged, false).await);
    }
    // Both slots are release 2 (checked as they are filled); the damaged parts cost their
    // groups whole.
    assert!(
        fetched[1] > fetched[0],
        "{} bytes fetched with damaged parts, {} without",
        fetched[1],
        fetched[0]
    );
}

/// Publishes release 1 and release 2 (each with its index, so Central Command plans the
/// update from 1 to 2), 2 being release 1 with a byte changed
/// every 3000 in its fourth MiB (every chunk there is new, yet near what release 1 holds) and
/// 20,000 bytes of new noise at 6 MiB. Returns the paths of the two images.
async fn publish_a_near_pair(origin: &Origin, dir: &Path) -> (PathBuf, PathBuf) {
    let old = noise(8 * MIB, "release 1");
    let mut new = [&old[..6 * MIB], &noise(20_000, "inserted")[..], &old[6 * MIB..]].concat();
    for at in (3 * MIB..4 * MIB).step_by(3000) {
        new[at] ^= 0x5a;
    }
    let (v1, v2) = (dir.join("image-v1.raw"), dir.join("image-v2.raw"));
    std::fs::write(&v1, &old).expect("v1");
    std::fs::write(&v2, &new).expect("v2");
    origin.publish_image(1, &v1, Some(content_index_of(&v1))).await;
    origin.publish_image(2, &v2, Some(content_index_of(&v2))).await;
    (v1, v2)
}

/// Central Command plans the update from each older release it holds with an index: an
/// appliance on release 1 is offered the plan from release 1's image, a small part of the
/// index and group hashes it replaces; one on a release Central Command does not hold gets
/// none. From the plan and the active slot the agent makes the group hashes, and trusts them
/// only if their tree hashes to the signed root: a damaged slot, a wrong hash or runs that
/// point elsewhere do not. With a plan it trusts, it copies what the index would have found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_for_the_pair_is_trusted_only_if_its_tree_hashes_to_the_signed_root() {
    use sitecast_iso::{BlobLayout, FileDevice, OutboardStore, Slot, SlotPaths, SlotWriter};
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (old, new) = image_pair(dir.path());
    let (v1, v2) = (dir.path().join("image-v1.raw"), dir.path().join("image-v2.raw"));
    origin.publish_image(1, &v1, Some(content_index_of(&v1))).await;
    let index = content_index_of(&v2);
    let image = origin.publish_image(2, &v2, Some(index.clone())).await;
    let clients = enrolled_at(&origin, ["on-1"]).await;
    let (client, key) = &clients[0];
    let on_0 = sitecast_manifest::SecretKey::generate().expect("rng");
    let other = sitecast_peer::coordinator::CoordinatorClient::new(&origin.url, None, on_0)
        .expect("client");
    let on_0_checkin = sitecast_manifest::api::CheckinRequest {
        installed_version: 0,
        ..lone_checkin("lab", "on-0")
    };
    other.checkin(&on_0_checkin).await.expect("enrolled");
    origin.rollout(2).await;

    let offered = other.checkin(&on_0_checkin).await.expect("checkin").origin.expect("origin");
    assert_eq!(offered.plan, None, "no plan from a release Central Command does not hold");
    let offered = client.checkin(&lone_checkin("lab", "on-1")).await.expect("checkin");
    let plan = offered.origin.expect("origin").plan.expect("a plan from release 1");
    let layout = BlobLayout::new(image.blake3, image.size);
    let replaced = index.size + layout.group_hashes_len();
    eprintln!("plan {} bytes, index and group hashes {replaced}", plan.size);
    assert!(plan.size * 5 < replaced, "plan {} bytes, replaces {replaced}", plan.size);

    // Fetched as the site fetches it, verified against the hash offered.
    let plan = std::fs::read(fetch_plan(client, key, &plan, dir.path()).await).expect("plan");

    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("dir");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (plan_path, active_path) = (work.join("plan"), work.join("slot-a.img"));
    let trusted = |plan: &[u8], active: &[u8]| -> Result<bool, String> {
        std::fs::write(&plan_path, plan).expect("plan");
        std::fs::write(&active_path, active).expect("slot A");
        let hashes = work.join("hashes");
        sitecast_peer::reuse::group_hashes_from_plan(
            &plan_path,
            &active_path,
            layout,
            &hashes,
            &stop,
        )
        .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(work.join("outboard"));
        let device = FileDevice::open_or_create(&work.join("outboard")).expect("outboard");
        let mut outboard = OutboardStore::new(layout, device);
        Ok(outboard
            .rebuild_from_group_hashes(std::fs::File::open(&hashes).expect("hashes"))
            .expect("rebuild"))
    };
    let mut damaged = old.clone();
    damaged[MIB] ^= 1;
    assert_eq!(trusted(&plan, &damaged), Ok(false), "a damaged active slot");
    let mut wrong_hash = plan.clone();
    *wrong_hash.last_mut().expect("hashes") ^= 1;
    assert_eq!(trusted(&wrong_hash, &old), Ok(false), "a wrong group hash");
    // A run that points a byte further on in the older image, with the honest hashes of the
    // groups the runs do not cover whole.
    let new_hashes = {
        let mut hashes = Vec::new();
        sitecast_iso::write_group_hashes(layout, &new[..], &mut hashes).expect("hashes");
        hashes
    };
    let read = sitecast_delta::plan::PlanReader::new(&plan[..], layout.size).expect("plan");
    let mut runs = read.runs.clone();
    assert!(runs.len() >= 3, "{runs:?}");
    runs[1].old += 1;
    assert!(runs[1].old + runs[1].len <= runs[2].old, "{runs:?}");
    let mut shifted = Vec::new();
    let hash_of = |group: u64| {
        let at = group as usize * 32;
        Ok(new_hashes[at..at + 32].try_into().expect("32 bytes"))
    };
    sitecast_delta::plan::write(read.header, &runs, hash_of, &mut shifted).expect("plan");
    assert_eq!(trusted(&shifted, &old), Ok(false), "a run that points elsewhere");
    assert_eq!(trusted(&plan, &old), Ok(true), "the plan and the slot it is for");

    // With the plan trusted, the copy finds what the index finds.
    let outboard = OutboardStore::new(
        layout,
        FileDevice::open_read_only(&work.join("outboard")).expect("outboard"),
    );
    let slot = work.join("slot-b.img");
    std::fs::File::create(&slot).expect("slot").set_len(16 * MIB as u64).expect("size");
    let mut writer =
        SlotWriter::open_paths(Slot::B, &image, &SlotPaths::beside(&slot, &work)).expect("writer");
    let (reused, parts) = sitecast_peer::reuse::copy_with_plan(
        &mut writer,
        &outboard,
        &plan_path,
        &active_path,
        &stop,
        &mut |_| {},
    )
    .expect("copy");
    let found = found_in(&old, &new);
    assert_eq!(reused.groups, found.copied.len() as u64, "{reused:?}");
    assert_eq!(reused.refused, 0, "{reused:?}");
    let partly: Vec<u64> = parts.partial.iter().map(|(group, _)| group).collect();
    assert_eq!(partly, found.partly.keys().copied().collect::<Vec<_>>());
    drop(writer);
    let written = std::fs::read(&slot).expect("slot B");
    for &group in &found.copied {
        let bytes = layout.group_bytes(group);
        let (start, end) = (bytes.start as usize, bytes.end as usize);
        assert!(written[start..end] == new[start..end], "group {group}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_missing_crosses_the_wan_compressed_against_the_active_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (v1, v2) = publish_a_near_pair(&origin, dir.path()).await;
    let fills = [("alone", false, false), ("against", false, true), ("damaged", true, true)];
    let clients = enrolled_at(&origin, fills.map(|(name, _, _)| name)).await;
    origin.rollout(2).await;
    let mut fetched = Vec::new();
    for ((client, key), (name, damaged, reference)) in clients.into_iter().zip(fills) {
        let pair = (v1.as_path(), v2.as_path());
        let filled = fill_with_patches(client, key, pair, dir.path(), name, damaged, reference);
        fetched.push(filled.await);
    }
    eprintln!("bytes on the wire: {fetched:?} (alone, against the active slot, damaged)");
    // Each slot is release 2 (checked as it is filled). The changed MiB crosses as its
    // changes, not its bytes; a damaged slot decompresses wrong, and costs a fetch.
    assert!(fetched[1] * 4 < fetched[0], "{fetched:?}");
    assert!(fetched[2] > fetched[1], "{fetched:?}");
}

/// An appliance whose active slot the installer wrote knows only which release runs there:
/// Central Command names that release's image, the agent checks it against the slot's bytes,
/// and what it lacks then crosses compressed against the slot. An appliance whose slot no
/// longer holds the image named (a block lost since) does not take Central Command's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_the_installer_wrote_learns_which_image_its_slot_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (v1, v2) = publish_a_near_pair(&origin, dir.path()).await;
    let (old, new) = (std::fs::read(&v1).expect("v1"), std::fs::read(&v2).expect("v2"));
    // Each on a site of its own, so that each site's origin bytes are one appliance's.
    let names = [("installed", "store-1"), ("damaged", "store-2")];
    let mut agents = Vec::new();
    for (name, site) in names {
        let mut agent =
            AgentProcess::new(&dir.path().join(name), &origin, site, name, 16 * MIB as u64);
        let mut slot = old.clone();
        if name == "damaged" {
            slot[MIB..MIB + 4096].iter_mut().for_each(|b| *b ^= 0x55);
        }
        slot.resize(16 * MIB, 0);
        std::fs::write(agent.dir.join("slot-a.img"), &slot).expect("slot A");
        // What the system says runs: release 1; no image size or hash recorded.
        std::fs::create_dir_all(agent.dir.join("state")).expect("state dir");
        let state = serde_json::json!({"slot_versions": {"A": 1}});
        std::fs::write(agent.dir.join("state/agent.json"), state.to_string()).expect("state");
        agent.start();
        agents.push(agent);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 2, deadline, &agents[0]).await;
    origin.rollout(2).await;
    wait_state(&origin, &["installed", "damaged"], "ready", deadline).await;

    for agent in &agents {
        let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot");
        assert!(slot[..new.len()] == new[..], "{}: slot B is not release 2", agent.name);
    }
    let (installed, damaged) = (agents[0].log(), agents[1].log());
    assert!(
        installed.contains("the active slot holds the image Central Command names"),
        "{installed}"
    );
    assert!(damaged.contains("does not hold the image Central Command names"), "{damaged}");
    // A slot that holds release 1 updates with the plan from it, not the index and group
    // hashes; a slot that does not is read whole with the index.
    let planned = "the outboard is rebuilt from the plan and the active slot";
    assert!(installed.contains(planned), "{installed}");
    assert!(!damaged.contains(planned), "{damaged}");
    // The image confirmed is recorded, so a later download does not hash the slot again; a
    // slot that did not confirm it records nothing.
    let recorded = |agent: &AgentProcess| {
        let state = std::fs::read(agent.dir.join("state/agent.json")).expect("state");
        let state: serde_json::Value = serde_json::from_slice(&state).expect("json");
        (state["slot_image_blake3"]["A"].clone(), state["slot_image_sizes"]["A"].clone())
    };
    let release_1 = serde_json::json!(blake3::hash(&old).to_hex().to_string());
    assert_eq!(recorded(&agents[0]), (release_1, serde_json::json!(old.len())));
    assert_eq!(recorded(&agents[1]), (serde_json::Value::Null, serde_json::Value::Null));
    let served = [origin.origin_bytes("store-1", 2).await, origin.origin_bytes("store-2", 2).await];
    eprintln!("Central Command served {served:?} bytes (slot confirmed, slot damaged)");
    // The changed MiB crosses as its changes, not its bytes, only where the slot was confirmed.
    assert!(served[0] * 4 < served[1], "{served:?}");
    // And the site of the confirmed slot fetched less than the index and group hashes alone.
    let layout = sitecast_iso::BlobLayout::new(blake3::hash(&new).into(), new.len() as u64);
    let side = content_index_of(&v2).size + layout.group_hashes_len();
    assert!(served[0] < side, "{} bytes served, the index and group hashes are {side}", served[0]);
}

/// The Debian pair of `benches/debian-pair` (bookworm minbase, then plus curl and less, as
/// squashfs three ways), built if missing: needs root and deb.debian.org, so not in CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement on a real pair: cargo nextest run -p sitecast-peer --test delta --run-ignored only --no-capture"]
async fn a_lone_appliance_updates_between_two_debian_root_file_systems() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pair = std::env::var_os("SITECAST_DEBIAN_PAIR")
        .map_or_else(|| repo.join("target/debian-pair"), std::path::PathBuf::from);
    let built = std::process::Command::new(repo.join("benches/debian-pair")).arg(&pair).status();
    assert!(built.is_ok_and(|s| s.success()), "benches/debian-pair failed");
    for kind in ["zstd", "gzip", "none"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = Origin::start(dir.path()).await;
        let (old, new) = (pair.join(format!("a-{kind}.sqfs")), pair.join(format!("b-{kind}.sqfs")));
        let index = content_index_of(&new);
        // Release 1 is the active slot's: Central Command compresses against it when asked,
        // and plans the update from it.
        origin.publish_image(1, &old, Some(content_index_of(&old))).await;
        let image = origin.publish_image(2, &new, Some(index.clone())).await;
        let names = ["solo", "solo-reference"];
        let clients = enrolled_at(&origin, names).await;
        origin.rollout(2).await;
        let mut before = 0;
        for (((client, key), name), reference) in clients.into_iter().zip(names).zip([false, true])
        {
            let pair = (old.as_path(), new.as_path());
            let fetched = fill_with_patches(client, key, pair, dir.path(), name, false, reference);
            let fetched = fetched.await;
            let served = origin.origin_bytes("lab", 2).await - before;
            before += served;
            let layout = sitecast_iso::BlobLayout::new(image.blake3, image.size);
            // Against the active slot, the plan for the pair replaces the index and group
            // hashes, and Central Command's count includes it.
            let side = match reference {
                true => 0,
                false => index.size + layout.group_hashes_len(),
            };
            let against = match reference {
                true => "against the active slot, with the plan",
                false => "alone, with the index and group hashes",
            };
            println!(
                "squashfs {kind}, compressed {against}: {} bytes; Central Command sent {served} \
                 bytes (the agent counted {fetched}), + {side} = {} ({:.1} % of the image)",
                image.size,
                served + side,
                100.0 * (served + side) as f64 / image.size as f64
            );
        }
    }
}

/// The number in `name=N` on the last line of `log` that says `what` (colour codes dropped).
fn logged_number(log: &str, what: &str, name: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(what))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                chars.by_ref().find(|&c| c == 'm');
            }
            c => plain.push(c),
        }
    }
    let value = plain.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}=")))?;
    value.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_copying_resumes_without_copying_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    // Large enough that the copy takes a while (here 10 s and more): it is interrupted once a
    // check-in has counted some of it.
    let old = noise(128 * MIB, "release 1, large");
    let mut new = old.clone();
    new[100 * MIB..100 * MIB + 30_000].copy_from_slice(&noise(30_000, "changed"));
    let new_path = dir.path().join("image-v2.raw");
    std::fs::write(&new_path, &new).expect("v2");
    let image = origin.publish_image(2, &new_path, Some(content_index_of(&new_path))).await;
    let mut agent =
        AgentProcess::new(&dir.path().join("a0"), &origin, "store-1", "a0", 130 * MIB as u64);
    std::fs::write(agent.dir.join("slot-a.img"), &old).expect("slot A");
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_enrolled(&origin, 1, deadline, &agent).await;
    origin.rollout(2).await;

    // Progress is recorded at each checkpoint (every 4 MiB written), and the bytes copied at
    // each check-in: kill -9 once a check-in has counted some, mid-copy.
    let counted = |agent: &AgentProcess| {
        let state = agent.state_file_if_saved().unwrap_or_default();
        state["update"]["bytes_reused"].as_u64().unwrap_or(0)
    };
    while counted(&agent) == 0 {
        assert!(Instant::now() < deadline, "nothing copied:\n{}", agent.log());
        // A poll interval, not a wait for time to pass: the loop ends on the state file, and
        // polls this often so the kill lands soon after, mid-copy.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    agent.kill();
    let counted_at_kill = counted(&agent);
    let copied_whole = "copied from the active slot what the new image shares with it";
    assert!(!agent.log().contains(copied_whole), "the copy ended before the kill: test it slower");

    // What the record holds now (opening it seeds groups written but not yet recorded, as the
    // agent does when it starts).
    let paths =
        sitecast_iso::SlotPaths::beside(&agent.dir.join("slot-b.img"), &agent.dir.join("state"));
    let writer = sitecast_iso::SlotWriter::open_paths(sitecast_iso::Slot::B, &image, &paths)
        .expect("the slot opens after kill -9");
    let layout = writer.layout();
    let recorded = (0..layout.groups()).filter(|&g| writer.has(g)).count() as u64;
    drop(writer);
    let copyable = found_in(&old, &new).copied.len() as u64;
    eprintln!("{recorded} of {copyable} groups recorded at the kill");
    assert!(recorded > 0 && recorded < copyable, "{recorded} of {copyable} groups recorded");

    agent.start();
    wait_state(&origin, &["a0"], "ready", deadline).await;
    let slot = std::fs::read(agent.dir.join("slot-b.img")).expect("slot B");
    assert!(slot[..new.len()] == new[..], "slot B is not release 2");
    // The second run copied only what the first had not recorded.
    let log = agent.log();
    let second = logged_number(&log, copied_whole, "groups")
        .unwrap_or_else(|| panic!("the second run copied nothing:\n{log}"));
    assert_eq!(second + recorded, copyable, "{log}");
    // The update's figure goes on from what the first run's check-ins counted.
    let second_bytes = logged_number(&log, copied_whole, "bytes").expect("bytes logged");
    let status = agent.status().await.expect("status");
    let reported = status["update"]["bytes_reused"].as_u64().unwrap_or(0);
    assert_eq!(reported, counted_at_kill + second_bytes, "{status}");
}
