//! Boot counting and rollback through the A/B state machine and the model of the GRUB script
//! (the script itself boots in QEMU in `grub_boot.rs`).

use sitecast_iso::ab::{AbState, BootOutcome, load_state};
use sitecast_iso::{
    CrashDevice, CrashEnvStore, DEFAULT_TRIES, EnvStore, PowerSupply, Slot, SlotWriter,
    VerifiedSlot,
};
use sitecast_manifest::{ImageDigest, ImageInfo};

/// A verified image in slot B, activated with the default tries, on a fresh appliance.
fn activated() -> CrashEnvStore {
    let image = vec![42u8; 50_000];
    let digest = ImageDigest::of_reader(&image[..]).expect("hash");
    let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
    let power = PowerSupply::new();
    let slot = CrashDevice::new(image.len(), power.clone());
    slot.preload(0, &image);
    let outboard = CrashDevice::new(4096, power.clone());
    // Seed the outboard as the download would have, then let the writer find the groups.
    let mut store = sitecast_iso::OutboardStore::new(
        sitecast_iso::BlobLayout::new(info.blake3, info.size),
        outboard.clone(),
    );
    store.compute_from(&image[..]).expect("outboard");
    let writer =
        SlotWriter::open(Slot::B, &info, slot, CrashDevice::new(4096, power.clone()), outboard)
            .expect("open");
    assert!(writer.is_complete(), "seeded from the slot");
    let mut env = CrashEnvStore::new(power);
    writer.finish().expect("verified").activate(&mut env, DEFAULT_TRIES).expect("activate");
    env
}

fn boot(env: &CrashEnvStore) -> (Slot, AbState) {
    let (mut state, mut vars) = load_state(env).expect("load");
    let booted = state.grub_model_boot();
    state.write_to(&mut vars).expect("vars");
    env.grub_save(&vars).expect("save");
    (booted, state)
}

#[test]
fn three_failed_health_gates_roll_back_to_the_old_slot() {
    let env = activated();
    for tries_left in (0..DEFAULT_TRIES).rev() {
        let (booted, state) = boot(&env);
        assert_eq!(booted, Slot::B);
        assert_eq!(state.outcome(booted), BootOutcome::Trial { slot: Slot::B, tries_left });
        // Health gate fails: nothing is written; the agent reboots.
    }
    let (booted, state) = boot(&env);
    assert_eq!(booted, Slot::A);
    assert_eq!(state.outcome(booted), BootOutcome::RolledBack { failed: Slot::B });
    // And it stays on A.
    let (booted, _) = boot(&env);
    assert_eq!(booted, Slot::A);
}

#[test]
fn a_success_on_the_second_try_marks_good_and_stops_counting() {
    let mut env = activated();
    boot(&env);
    let (booted, mut state) = boot(&env);
    assert_eq!((booted, state.tries), (Slot::B, 1));
    state.mark_good(booted);
    let (_, mut vars) = load_state(&env).expect("load");
    state.write_to(&mut vars).expect("vars");
    env.store(&vars).expect("store");
    for _ in 0..5 {
        let (booted, state) = boot(&env);
        assert_eq!(booted, Slot::B);
        assert_eq!(state.outcome(booted), BootOutcome::Normal);
        assert_eq!(state.tries, 0);
    }
}

#[test]
fn the_running_slot_cannot_be_activated() {
    let mut env = activated();
    let image = vec![7u8; 1000];
    let digest = ImageDigest::of_reader(&image[..]).expect("hash");
    let info = ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 };
    let device = CrashDevice::new(image.len(), PowerSupply::new());
    device.preload(0, &image);
    let verified = VerifiedSlot::check_existing(Slot::A, &info, device).expect("intact");
    let error = verified.activate(&mut env, DEFAULT_TRIES).expect_err("A is running");
    assert_eq!(
        error.to_string(),
        "slot A is the active slot; only the standby slot may be activated"
    );
    assert_eq!(load_state(&env).expect("load").0.next, Some(Slot::B), "state untouched");
}
