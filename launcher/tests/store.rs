//! The agent version store on a real file system: a switch changes every file at once or none,
//! a crash (the process killed) at every step leaves a complete version current, mismatched
//! files install nothing, and retired versions go after seven days (clock passed in).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use jiff::{SignedDuration, Timestamp};
use sitecast_launcher::{AgentStore, KEEP_RETIRED, Step, StoreError};
use sitecast_manifest::{AgentBuild, AgentFile, ImageDigest, ImageInfo};

/// Agent builds in these tests run on every OS release.
const ANY_OS: sitecast_manifest::OsReleases = sitecast_manifest::OsReleases { min: 0, max: None };

/// Files of agent `version`: an executable and a data file, with contents of their own.
fn files(version: u64) -> Vec<(String, Vec<u8>, bool)> {
    vec![
        ("bin/sitecast-peer".into(), format!("agent v{version} ").repeat(5000).into_bytes(), true),
        ("share/defaults.toml".into(), format!("version = {version}\n").into_bytes(), false),
    ]
}

fn build(version: u64) -> AgentBuild {
    let files = files(version)
        .into_iter()
        .map(|(path, bytes, executable)| {
            let digest = ImageDigest::of_reader(&bytes[..]).expect("in memory");
            AgentFile {
                path,
                size: digest.size,
                blake3: digest.blake3,
                sha256: digest.sha256,
                executable,
            }
        })
        .collect();
    AgentBuild { platform: "x86_64-appliance".into(), entry: "bin/sitecast-peer".into(), files }
}

/// Stages agent `version` from memory, as the agent would from fetched blobs.
fn stage(store: &AgentStore, version: u64) -> Result<(), StoreError> {
    let contents = files(version);
    store.stage(version, &build(version), ANY_OS, |file| {
        let bytes = contents.iter().find(|(p, ..)| *p == file.path).expect("known file").1.clone();
        Ok(Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read>)
    })
}

/// Every file of `version` in the store is complete and what its manifest says.
fn assert_complete(store: &AgentStore, version: u64) {
    for file in build(version).files {
        let path = store.version_dir(version).join(&file.path);
        let expected = ImageInfo { size: file.size, blake3: file.blake3, sha256: file.sha256 };
        ImageDigest::check(std::fs::File::open(&path).expect("installed file"), &expected)
            .unwrap_or_else(|e| panic!("version {version} {}: {e}", file.path));
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, if file.executable { 0o755 } else { 0o644 }, "{}", file.path);
    }
}

fn now() -> Timestamp {
    "2026-12-01T04:00:00Z".parse().expect("timestamp")
}

/// A store with version 1 current, beside an agent state directory.
fn store_with_v1(dir: &Path) -> (PathBuf, PathBuf) {
    let (root, state) = (dir.join("agent"), dir.join("state"));
    std::fs::create_dir_all(&state).expect("state");
    std::fs::write(state.join("agent.json"), b"{\"report_seq\":7}").expect("state file");
    let store = AgentStore::open(&root).expect("open");
    stage(&store, 1).expect("stage v1");
    store.switch(1, now()).expect("switch to v1");
    (root, state)
}

#[test]
fn a_switch_changes_every_file_at_once_and_a_rollback_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, state) = store_with_v1(dir.path());
    let state_before = std::fs::read(state.join("agent.json")).expect("state");
    let store = AgentStore::open(&root).expect("open");

    stage(&store, 2).expect("stage v2");
    assert_eq!(store.current().expect("current"), Some(1), "staging does not switch");
    store.switch(2, now()).expect("switch");
    assert_eq!((store.current().expect("c"), store.previous().expect("p")), (Some(2), Some(1)));
    // What runs is reached through the one link.
    let running = std::fs::read(root.join("current/share/defaults.toml")).expect("via current");
    assert_eq!(running, b"version = 2\n");
    assert_complete(&store, 2);

    assert_eq!(store.roll_back(now()).expect("roll back"), 1);
    assert_eq!((store.current().expect("c"), store.previous().expect("p")), (Some(1), Some(2)));
    assert_eq!(
        std::fs::read(root.join("current/share/defaults.toml")).expect("v1"),
        b"version = 1\n"
    );
    assert_eq!(std::fs::read(state.join("agent.json")).expect("state"), state_before);
    assert!(matches!(store.switch(9, now()), Err(StoreError::NotInstalled(9))));
}

#[test]
fn files_that_do_not_match_the_manifest_install_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _) = store_with_v1(dir.path());
    let store = AgentStore::open(&root).expect("open");

    // The second file is one byte off: the first, already written, must not survive either.
    let mut contents = files(2);
    contents[1].1[0] ^= 1;
    let error = store
        .stage(2, &build(2), ANY_OS, |file| {
            let bytes = contents.iter().find(|(p, ..)| *p == file.path).expect("file").1.clone();
            Ok(Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read>)
        })
        .expect_err("mismatch");
    assert!(
        matches!(&error, StoreError::Mismatch { version: 2, file, .. } if file == "share/defaults.toml"),
        "{error}"
    );
    assert!(!store.installed(2));
    assert_eq!(std::fs::read_dir(root.join("staging")).expect("staging").count(), 0);

    // A source that never ends is cut one byte past the declared size.
    let error = store
        .stage(2, &build(2), ANY_OS, |_| Ok(Box::new(std::io::repeat(b'x')) as Box<dyn Read>))
        .expect_err("endless");
    assert!(matches!(error, StoreError::Mismatch { .. }), "{error}");
    assert_eq!(store.current().expect("current"), Some(1));
    assert_complete(&store, 1);
}

#[test]
fn files_linked_from_the_agent_cache_take_no_second_copy_and_are_checked_too() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _) = store_with_v1(dir.path());
    let store = AgentStore::open(&root).expect("open");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).expect("cache");
    let cached = |contents: &[(String, Vec<u8>, bool)]| {
        for (path, bytes, _) in contents {
            std::fs::write(cache.join(path.replace('/', "_")), bytes).expect("cached file");
        }
    };
    let source = |file: &AgentFile| cache.join(file.path.replace('/', "_"));

    // A file that does not match its manifest installs nothing, linked or not.
    let mut contents = files(2);
    contents[0].1[7] ^= 1;
    cached(&contents);
    let error = store.stage_linked(2, &build(2), ANY_OS, source).expect_err("mismatch");
    assert!(matches!(&error, StoreError::Mismatch { version: 2, .. }), "{error}");
    assert!(!store.installed(2));
    assert_eq!(std::fs::read_dir(root.join("staging")).expect("staging").count(), 0);

    cached(&files(2));
    store.stage_linked(2, &build(2), ANY_OS, source).expect("staged");
    assert_complete(&store, 2);
    for file in build(2).files {
        let installed = std::fs::metadata(store.version_dir(2).join(&file.path)).expect("stat");
        let in_cache = std::fs::metadata(source(&file)).expect("stat");
        assert_eq!(installed.ino(), in_cache.ino(), "{}: copied, not linked", file.path);
    }
    // The cache lets go of its files; the version keeps them.
    std::fs::remove_dir_all(&cache).expect("cache removed");
    assert_complete(&store, 2);
}

#[test]
fn retired_versions_are_kept_seven_days_then_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _) = store_with_v1(dir.path());
    let store = AgentStore::open(&root).expect("open");
    stage(&store, 2).expect("stage v2");
    store.switch(2, now()).expect("switch");
    // Staged but never switched to (a rollout paused before this appliance's turn).
    stage(&store, 3).expect("stage v3");

    let almost = now() + KEEP_RETIRED - SignedDuration::from_secs(1);
    assert_eq!(store.prune(almost).expect("prune"), vec![3], "v1 is kept for rollback");
    assert_eq!(store.previous().expect("previous"), Some(1));
    assert_eq!(store.prune(now() + KEEP_RETIRED).expect("prune"), vec![1]);
    assert_eq!(store.previous().expect("previous"), None, "no rollback once it is gone");
    assert!(matches!(store.roll_back(now()), Err(StoreError::NoPrevious)));
    assert_eq!(store.current().expect("current"), Some(2));
    assert_complete(&store, 2);
    // Far in the future the current version is still never removed.
    assert!(store.prune(now() + KEEP_RETIRED * 10).expect("prune").is_empty());
}

const CRASH_AT: &str = "SITECAST_TEST_CRASH_AT";
const CRASH_STORE: &str = "SITECAST_TEST_CRASH_STORE";
const CRASH_MODE: &str = "SITECAST_TEST_CRASH_MODE";
/// Steps the update below goes through: two files, install, previous, switch.
const STEPS: usize = 5;

static STEPS_DONE: AtomicUsize = AtomicUsize::new(0);

fn abort_at_configured_step(_: Step) {
    let at: usize = std::env::var(CRASH_AT).expect("set").parse().expect("number");
    if STEPS_DONE.fetch_add(1, Ordering::SeqCst) == at {
        // As kill -9: no destructors, no cleanup.
        std::process::abort();
    }
}

/// Not a test of its own: the child process of the crash test below, which runs the update
/// of the store named in the environment and dies at the step it names.
#[test]
fn child_process_of_the_crash_test() {
    let (Ok(_), Ok(root)) = (std::env::var(CRASH_AT), std::env::var(CRASH_STORE)) else {
        return;
    };
    let mut store = AgentStore::open(Path::new(&root)).expect("open");
    store.crash_at(abort_at_configured_step);
    if std::env::var(CRASH_MODE).as_deref() == Ok("rollback") {
        store.roll_back(now()).expect("roll back");
    } else {
        stage(&store, 2).expect("stage");
        store.switch(2, now()).expect("switch");
    }
}

/// Runs the child process above on the store at `root`, dying after step `at`; whether it
/// ran to the end.
fn crash_child(root: &Path, mode: &str, at: usize) -> bool {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_process_of_the_crash_test", "--nocapture", "--test-threads=1"])
        .env(CRASH_AT, at.to_string())
        .env(CRASH_STORE, root)
        .env(CRASH_MODE, mode)
        .output()
        .expect("child");
    output.status.success()
}

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success());
}

#[test]
fn a_crash_at_every_step_of_a_rollback_keeps_both_versions_reachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pristine, _) = store_with_v1(dir.path());
    {
        let store = AgentStore::open(&pristine).expect("open");
        stage(&store, 2).expect("stage v2");
        store.switch(2, now()).expect("switch to v2");
    }
    // Two steps: the links `current` and `previous`.
    for at in 0..=2 {
        let root = dir.path().join(format!("rollback-crash-{at}"));
        copy_tree(&pristine, &root);
        assert_eq!(crash_child(&root, "rollback", at), at == 2, "step {at}");
        let store = AgentStore::open(&root).expect("reopen");
        assert_eq!(store.current().expect("current"), Some(1), "after step {at}");
        assert_complete(&store, 1);
        // The version rolled back from is still there to look at, and nothing was lost.
        assert!(store.installed(2));
        assert!(store.prune(now()).expect("prune").is_empty(), "after step {at}");
        assert!(store.installed(1) && store.installed(2));
    }
}

#[test]
fn a_crash_at_every_step_of_an_update_leaves_a_complete_agent_current() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pristine, state) = store_with_v1(dir.path());
    let state_before = std::fs::read(state.join("agent.json")).expect("state");
    for at in 0..=STEPS {
        let root = dir.path().join(format!("crash-{at}"));
        copy_tree(&pristine, &root);
        assert_eq!(crash_child(&root, "update", at), at == STEPS, "step {at}");

        // What the launcher finds at its next start.
        let store = AgentStore::open(&root).expect("reopen");
        let current = store.current().expect("current").expect("some version current");
        let expected = if at >= 4 { 2 } else { 1 };
        assert_eq!(current, expected, "crash after step {at}");
        assert_complete(&store, current);
        assert_eq!(std::fs::read_dir(root.join("staging")).expect("staging").count(), 0);
        // The update carries on from where it stopped.
        stage(&store, 2).expect("stage again");
        store.switch(2, now()).expect("switch again");
        assert_complete(&store, 2);
        assert_eq!(store.roll_back(now()).expect("roll back"), 1);
        assert_complete(&store, 1);
    }
    assert_eq!(std::fs::read(state.join("agent.json")).expect("state"), state_before);
}
