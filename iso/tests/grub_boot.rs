//! `docs/grub-ab.cfg` booted for real: GRUB in QEMU reads the environment block our code wrote,
//! counts tries, falls back, and boots a kernel that reports its slot (`ab.partition=A|B`).
//! Each boot takes about 10 s under software emulation; `iso/tests/grub-boot/` has the harness.

use std::path::{Path, PathBuf};
use std::process::Command;

use sitecast_iso::ab::{AbState, BootOutcome, load_state, save_state};
use sitecast_iso::{EnvFile, GrubEnv, Slot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Booted {
    Slot(Slot),
    /// The kernel never reached userspace.
    Nothing,
}

/// Boots once with the env block at `env`; `broken` never reaches userspace.
fn boot(env: &Path, broken: Option<Slot>) -> Booted {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grub-boot/boot-once.sh");
    let workdir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("grub-boot");
    let mut command = Command::new(harness);
    command.arg(&workdir).arg(env);
    if let Some(slot) = broken {
        command.env("SITECAST_BREAK_SLOT", slot.to_string());
    }
    let output = command.output().expect("run boot-once.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "boot harness failed (it needs qemu-system-x86, grub-pc-bin, xorriso, busybox-static, \
         linux-image-amd64, e2fsprogs; scripts/test installs them):\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    match stdout.trim() {
        "booted=A" => Booted::Slot(Slot::A),
        "booted=B" => Booted::Slot(Slot::B),
        "booted=none" => Booted::Nothing,
        other => panic!("unexpected harness output {other:?}"),
    }
}

fn state(store: &EnvFile) -> AbState {
    load_state(store).expect("GRUB left a block we can read").0
}

/// A fresh appliance on slot A with slot B activated for `tries` trial boots, written by us.
fn activated(dir: &Path, tries: u8) -> EnvFile {
    let mut store = EnvFile::new(dir.join("grubenv"));
    let state = AbState { active: Slot::A, next: Some(Slot::B), tries, good: true, fallback: None };
    save_state(&mut store, &state, GrubEnv::default()).expect("write env");
    store
}

#[test]
fn a_slot_that_never_boots_uses_its_tries_then_the_old_slot_boots_and_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = activated(dir.path(), 3);
    for tries_left in [2, 1, 0] {
        assert_eq!(boot(store.path(), Some(Slot::B)), Booted::Nothing);
        let now = state(&store);
        assert_eq!(
            (now.next, now.tries, now.good),
            (Some(Slot::B), tries_left, false),
            "GRUB counted"
        );
    }
    assert_eq!(boot(store.path(), Some(Slot::B)), Booted::Slot(Slot::A));
    let now = state(&store);
    assert_eq!(now.outcome(Slot::A), BootOutcome::RolledBack { failed: Slot::B });
    assert_eq!(now.next, None);
    assert_eq!(boot(store.path(), None), Booted::Slot(Slot::A), "and A stays");
}

#[test]
fn a_slot_marked_good_boots_without_counting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = activated(dir.path(), 3);
    assert_eq!(boot(store.path(), None), Booted::Slot(Slot::B));
    let (mut now, env) = load_state(&store).expect("read");
    assert_eq!(now.outcome(Slot::B), BootOutcome::Trial { slot: Slot::B, tries_left: 2 });
    // The health gate passes on this try: mark good, as the agent does.
    now.mark_good(Slot::B);
    save_state(&mut store, &now, env).expect("write");
    for _ in 0..2 {
        assert_eq!(boot(store.path(), None), Booted::Slot(Slot::B));
        let after = state(&store);
        assert_eq!(
            after,
            AbState { active: Slot::B, next: None, tries: 0, good: true, fallback: None }
        );
    }
}
