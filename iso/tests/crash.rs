//! Power cuts at every write, sync and rename of fetch → verify → activate → boot → health
//! gate. After each, the appliance boots a slot whose image verified, and the update resumes
//! without fetching again what was durably recorded.

mod common;

use common::*;
use sitecast_iso::ab::{load_state, save_state};
use sitecast_iso::*;
use sitecast_manifest::{ImageDigest, ImageInfo};

const GROUPS: usize = 23;
const CHECKPOINT_EVERY: usize = 4;
const RESPONSE_GROUPS: u64 = 3;

struct Appliance {
    power: PowerSupply,
    slot_a: CrashDevice,
    slot_b: CrashDevice,
    progress: CrashDevice,
    outboard: CrashDevice,
    env: CrashEnvStore,
    old: ImageInfo,
}

impl Appliance {
    fn new(old_image: &[u8], slot_len: usize) -> Self {
        let power = PowerSupply::new();
        let slot_a = CrashDevice::new(slot_len, power.clone());
        slot_a.preload(0, old_image);
        let digest = ImageDigest::of_reader(old_image).expect("hash");
        let env = CrashEnvStore::new(power.clone());
        let mut vars = GrubEnv::default();
        AbState::default().write_to(&mut vars).expect("vars");
        env.grub_save(&vars).expect("initial env");
        Self {
            slot_b: CrashDevice::new(slot_len, power.clone()),
            progress: CrashDevice::new(4096, power.clone()),
            outboard: CrashDevice::new(64 * 1024, power.clone()),
            slot_a,
            env,
            old: ImageInfo { size: digest.size, blake3: digest.blake3, sha256: digest.sha256 },
            power,
        }
    }

    /// Power loss: each device keeps its durable bytes and some unsynced writes.
    fn crash(&self, rng: &mut u64) {
        for device in [&self.slot_a, &self.slot_b, &self.progress, &self.outboard] {
            device.crash(|| next(rng).is_multiple_of(2));
        }
        self.power.restore();
    }

    fn slot(&self, slot: Slot) -> &CrashDevice {
        match slot {
            Slot::A => &self.slot_a,
            Slot::B => &self.slot_b,
        }
    }

    /// GRUB at power-on (the model of docs/grub-ab.cfg); its in-place save is not ours to cut.
    fn boot(&self) -> Slot {
        let (mut state, mut vars) = load_state(&self.env).expect("env readable after any crash");
        let booted = state.grub_model_boot();
        state.write_to(&mut vars).expect("vars");
        self.env.grub_save(&vars).expect("grub save");
        booted
    }

    /// The agent, from whatever state it finds, until the new slot is marked good. Returns the
    /// groups it fetched.
    fn run_agent(
        &mut self,
        origin: &Origin,
        fetched: &mut u64,
        booted: &mut Slot,
    ) -> Result<(), String> {
        loop {
            let (mut state, vars) = load_state(&self.env).map_err(|e| e.to_string())?;
            match state.outcome(*booted) {
                BootOutcome::Trial { slot, .. } => {
                    // Health gate passes.
                    state.mark_good(slot);
                    save_state(&mut self.env, &state, vars).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                _ if state.active == Slot::B => return Ok(()),
                _ if state.next == Some(Slot::B) => {
                    *booted = self.boot();
                    continue;
                }
                _ => {}
            }
            let mut writer = SlotWriter::open(
                Slot::B,
                &origin.info,
                self.slot_b.clone(),
                self.progress.clone(),
                self.outboard.clone(),
            )
            .map_err(|e| e.to_string())?
            .with_checkpoint_every(CHECKPOINT_EVERY);
            for range in writer.missing() {
                for start in (range.start..range.end).step_by(RESPONSE_GROUPS as usize) {
                    let groups = start..(start + RESPONSE_GROUPS).min(range.end);
                    *fetched += groups.end - groups.start;
                    deliver(&mut writer, origin, groups.clone(), &origin.response(groups))
                        .map_err(|e| e.to_string())?;
                }
            }
            let verified = writer.finish().map_err(|e| e.to_string())?;
            verified.activate(&mut self.env, DEFAULT_TRIES).map_err(|e| e.to_string())?;
        }
    }
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn verifies(device: &CrashDevice, image: &ImageInfo) -> bool {
    let bytes = device.live();
    ImageDigest::check(&bytes[..image.size as usize], image).is_ok()
}

#[test]
fn every_power_cut_leaves_a_bootable_verified_slot_and_resumes() {
    let new = Origin::new(GROUPS * 16 * 1024 - 777, 11);
    let old_image = Origin::new(GROUPS * 16 * 1024 - 5000, 3).image;
    let slot_len = GROUPS * 16 * 1024;

    // A clean run counts the operations a power cut can hit.
    let mut clean = Appliance::new(&old_image, slot_len);
    let (mut fetched, mut booted) = (0, Slot::A);
    clean.run_agent(&new, &mut fetched, &mut booted).expect("clean run");
    assert_eq!(fetched, GROUPS as u64);
    let operations = clean.power.operations();
    assert!(operations > 2 * GROUPS as u64, "{operations} operations");

    for seed in [0x9e37_79b9_7f4a_7c15u64, 0x2545_f491_4f6c_dd1d] {
        for cut in 0..operations {
            let context = format!("seed {seed:#x}, power cut at operation {cut}");
            let mut rng = seed ^ cut;
            let mut appliance = Appliance::new(&old_image, slot_len);
            appliance.power.cut_after(cut);
            let (mut fetched, mut booted) = (0, Slot::A);
            let result = appliance.run_agent(&new, &mut fetched, &mut booted);
            assert!(result.is_err(), "{context}: the cut was not hit");
            assert!(appliance.power.is_cut(), "{context}: failed without a cut: {result:?}");
            appliance.crash(&mut rng);

            let booted = appliance.boot();
            let expected = if booted == Slot::A { &appliance.old } else { &new.info };
            assert!(
                verifies(appliance.slot(booted), expected),
                "{context}: booted {booted} unverified"
            );

            // Resume: what the record says is durable is not fetched again.
            let resumed = {
                let writer = SlotWriter::open(
                    Slot::B,
                    &new.info,
                    appliance.slot_b.clone(),
                    appliance.progress.clone(),
                    appliance.outboard.clone(),
                );
                writer.map(|w| {
                    GROUPS as u64 - w.missing().iter().map(|r| r.end - r.start).sum::<u64>()
                })
            }
            .expect("reopen after crash");
            let mut refetched = 0;
            let mut running = booted;
            appliance
                .run_agent(&new, &mut refetched, &mut running)
                .expect("finishes after the crash");
            assert!(
                refetched <= GROUPS as u64 - resumed,
                "{context}: refetched {refetched}, resumed {resumed}"
            );
            // Work lost to the cut is bounded by what was in flight: the groups since the last
            // checkpoint plus the response being written.
            let in_flight = CHECKPOINT_EVERY as u64 + RESPONSE_GROUPS;
            assert!(
                fetched + refetched <= GROUPS as u64 + in_flight,
                "{context}: {fetched} + {refetched}"
            );
            let (state, _) = load_state(&appliance.env).expect("env");
            assert_eq!(state.active, Slot::B, "{context}");
            assert!(verifies(&appliance.slot_b, &new.info), "{context}");
            assert!(verifies(&appliance.slot_a, &appliance.old), "{context}: old slot damaged");
        }
    }
}
