//! Interop with the real `grub-editenv` (Debian `grub-common`): it reads what we write, we read
//! what it writes.

use std::path::Path;
use std::process::Command;

use sitecast_iso::ab::{AbState, load_state, save_state};
use sitecast_iso::{EnvFile, EnvStore, GrubEnv, Slot};

fn grub_editenv(file: &Path, args: &[&str]) -> String {
    let output = Command::new("grub-editenv")
        .arg(file)
        .args(args)
        .output()
        .expect("grub-editenv is required (apt install grub-common)");
    assert!(
        output.status.success(),
        "grub-editenv {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

#[test]
fn grub_editenv_reads_what_we_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grubenv");
    let mut store = EnvFile::new(&path);
    let mut env = GrubEnv::default();
    env.set("saved_entry", "appliance").expect("name");
    env.set("odd", "back\\slash and\nnewline").expect("name");
    let state =
        AbState { active: Slot::A, next: Some(Slot::B), tries: 3, good: false, fallback: None };
    save_state(&mut store, &state, env).expect("store");

    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1024);
    let listed = grub_editenv(&path, &["list"]);
    for line in [
        "saved_entry=appliance",
        "sitecast_active=A",
        "sitecast_next=B",
        "sitecast_tries=3",
        "sitecast_good=0",
        "sitecast_fallback=",
    ] {
        assert!(listed.lines().any(|l| l == line), "{line:?} missing from:\n{listed}");
    }
    // grub-editenv prints the unescaped value, newline included.
    assert!(listed.contains("odd=back\\slash and\nnewline"), "{listed}");
    // And rewriting it with grub-editenv keeps our variables readable to us.
    grub_editenv(&path, &["set", "sitecast_tries=2"]);
    let (state, env) = load_state(&store).expect("load");
    assert_eq!(state.tries, 2);
    assert_eq!(state.next, Some(Slot::B));
    assert_eq!(env.get("odd"), Some("back\\slash and\nnewline"));
}

#[test]
fn we_read_what_grub_editenv_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grubenv");
    grub_editenv(&path, &["create"]);
    let store = EnvFile::new(&path);
    assert_eq!(store.load().expect("load"), Some(GrubEnv::default()));
    grub_editenv(
        &path,
        &[
            "set",
            "sitecast_active=B",
            "sitecast_next=A",
            "sitecast_tries=1",
            "sitecast_good=1",
            "x=a=b",
        ],
    );
    let (state, env) = load_state(&store).expect("load");
    assert_eq!(
        state,
        AbState { active: Slot::B, next: Some(Slot::A), tries: 1, good: true, fallback: None }
    );
    assert_eq!(env.get("x"), Some("a=b"));
    grub_editenv(&path, &["unset", "sitecast_next"]);
    assert_eq!(load_state(&store).expect("load").0.next, None);
}

#[test]
fn malformed_blocks_are_refused_with_a_reason() {
    assert_eq!(
        GrubEnv::parse(&[b'#'; 1000]).expect_err("short").to_string(),
        "environment block is 1000 bytes, GRUB's is exactly 1024"
    );
    let mut block = [b'#'; 1024];
    block[..6].copy_from_slice(b"hello\n");
    assert!(GrubEnv::parse(&block).expect_err("header").to_string().contains("does not start"));
    let mut env = GrubEnv::default();
    env.set("big", &"x".repeat(1000)).expect("name");
    assert!(env.encode().is_err());
    assert!(env.set("a=b", "c").is_err());
}

/// GRUB reads the file system without replaying ext4's journal, so the agent must change the
/// block where it is (same inode, same blocks), as GRUB's `save_env` does: a rename would
/// stay invisible to GRUB until the journal is checkpointed (found by the VM test: after a
/// power cut GRUB still saw the trial the agent had already marked good).
#[test]
fn the_block_is_rewritten_in_place_unless_it_must_be_replaced() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grubenv");
    grub_editenv(&path, &["create"]);
    let inode = std::fs::metadata(&path).expect("stat").ino();
    let mut store = EnvFile::new(&path);
    let state = AbState { active: Slot::B, next: None, tries: 0, good: true, fallback: None };
    save_state(&mut store, &state, GrubEnv::default()).expect("store");
    assert_eq!(std::fs::metadata(&path).expect("stat").ino(), inode, "the file was replaced");
    assert!(grub_editenv(&path, &["list"]).lines().any(|l| l == "sitecast_active=B"));

    // Variables past the first sector: still rewritten in place (the whole block), and the
    // next short block clears them, second sector too.
    let mut env = GrubEnv::default();
    env.set("long", &"x".repeat(600)).expect("name");
    save_state(&mut store, &state, env).expect("store");
    assert_eq!(std::fs::metadata(&path).expect("stat").ino(), inode, "the file was replaced");
    assert!(grub_editenv(&path, &["list"]).lines().any(|l| l.starts_with("long=xxx")));
    save_state(&mut store, &state, GrubEnv::default()).expect("store");
    let listed = grub_editenv(&path, &["list"]);
    assert!(!listed.contains("long="), "{listed}");
    assert!(listed.lines().any(|l| l == "sitecast_good=1"), "{listed}");
    assert_eq!(std::fs::metadata(&path).expect("stat").ino(), inode, "the file was replaced");

    // A file that is not a whole block is created anew, not patched.
    std::fs::write(&path, b"# GRUB Environment Block\n").expect("truncate");
    save_state(&mut store, &state, GrubEnv::default()).expect("store");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1024);
}
