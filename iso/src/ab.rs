//! A/B slot state, kept in the GRUB environment block, as a plain state machine.
//!
//! Variables (read by `docs/grub-ab.cfg`):
//! - `sitecast_active` = `A`|`B`: the last slot marked good; boots when no trial is pending;
//! - `sitecast_next` = `A`|`B`|empty: a slot on trial;
//! - `sitecast_tries`: trial boots left; GRUB decrements it *before* each trial boot, so a
//!   kernel that never reaches userspace still uses a try;
//! - `sitecast_good` = `0`|`1`: GRUB sets 0 when it starts a trial boot, the health gate 1;
//! - `sitecast_fallback` = `A`|`B`|empty: set by GRUB when it gave up on a trial slot.

use std::fmt;

use crate::device::Device;
use crate::grubenv::{EnvError, EnvStore, GrubEnv};
use crate::writer::VerifiedSlot;

/// Trial boots a newly activated slot gets.
pub const DEFAULT_TRIES: u8 = 3;
/// The GRUB script counts down with an if-chain from this value.
pub const MAX_TRIES: u8 = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    fn parse(value: &str) -> Option<Slot> {
        match value {
            "A" => Some(Slot::A),
            "B" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AbError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("variable {name} has value {value:?}, expected {expected}")]
    BadValue { name: &'static str, value: String, expected: &'static str },
    #[error("slot {0} is the active slot; only the standby slot may be activated")]
    ActivatingActive(Slot),
    #[error("tries must be 1..={MAX_TRIES}, got {0}")]
    BadTries(u8),
}

/// What the environment block says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbState {
    pub active: Slot,
    pub next: Option<Slot>,
    pub tries: u8,
    pub good: bool,
    pub fallback: Option<Slot>,
}

impl Default for AbState {
    /// A fresh appliance: slot A, nothing pending.
    fn default() -> Self {
        Self { active: Slot::A, next: None, tries: 0, good: true, fallback: None }
    }
}

/// How the slot that is running came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootOutcome {
    /// The active, known-good slot.
    Normal,
    /// A trial boot of a new slot; the health gate decides.
    Trial { slot: Slot, tries_left: u8 },
    /// GRUB gave up on `failed` and booted the old slot.
    RolledBack { failed: Slot },
}

impl AbState {
    pub fn from_env(env: &GrubEnv) -> Result<Self, AbError> {
        let slot = |name: &'static str| -> Result<Option<Slot>, AbError> {
            match env.get(name).unwrap_or("") {
                "" => Ok(None),
                value => Slot::parse(value).map(Some).ok_or_else(|| AbError::BadValue {
                    name,
                    value: value.to_owned(),
                    expected: "A, B or empty",
                }),
            }
        };
        let tries = env.get("sitecast_tries").unwrap_or("0");
        let tries = tries.parse::<u8>().map_err(|_| AbError::BadValue {
            name: "sitecast_tries",
            value: tries.to_owned(),
            expected: "0..9",
        })?;
        Ok(Self {
            active: slot("sitecast_active")?.unwrap_or(Slot::A),
            next: slot("sitecast_next")?,
            tries,
            good: env.get("sitecast_good").unwrap_or("1") == "1",
            fallback: slot("sitecast_fallback")?,
        })
    }

    /// Writes the variables into `env`, keeping any others there.
    pub fn write_to(&self, env: &mut GrubEnv) -> Result<(), AbError> {
        let slot = |s: Option<Slot>| s.map(|s| s.to_string()).unwrap_or_default();
        env.set("sitecast_active", &self.active.to_string())?;
        env.set("sitecast_next", &slot(self.next))?;
        env.set("sitecast_tries", &self.tries.to_string())?;
        env.set("sitecast_good", if self.good { "1" } else { "0" })?;
        env.set("sitecast_fallback", &slot(self.fallback))?;
        Ok(())
    }

    /// The slot to write an update into.
    pub fn standby(&self) -> Slot {
        self.active.other()
    }

    /// Interprets the state after booting into `booted`.
    pub fn outcome(&self, booted: Slot) -> BootOutcome {
        match (self.next, self.fallback) {
            (Some(next), _) if next == booted && next != self.active => {
                BootOutcome::Trial { slot: next, tries_left: self.tries }
            }
            (_, Some(failed)) if booted == self.active => BootOutcome::RolledBack { failed },
            _ => BootOutcome::Normal,
        }
    }

    /// The health gate passed on `booted`: it becomes the active slot.
    pub fn mark_good(&mut self, booted: Slot) {
        *self = Self { active: booted, next: None, tries: 0, good: true, fallback: None };
    }

    /// The agent reported the rollback; forget it.
    pub fn acknowledge_rollback(&mut self) {
        self.fallback = None;
    }

    /// Go back to the other slot (an operator's rollback, or lost connectivity after an
    /// update). The other slot held the previous, good release.
    pub fn revert(&mut self) {
        let previous = self.active.other();
        *self = Self {
            active: previous,
            next: None,
            tries: 0,
            good: true,
            fallback: Some(self.active),
        };
    }

    /// What `docs/grub-ab.cfg` does at boot, as a model for property tests (the real script
    /// is booted in QEMU by `iso/tests/grub_boot.rs`). Returns the slot booted.
    pub fn grub_model_boot(&mut self) -> Slot {
        match self.next {
            Some(next) if next != self.active && self.tries > 0 => {
                self.tries -= 1;
                self.good = false;
                next
            }
            Some(next) if next != self.active => {
                self.fallback = Some(next);
                self.next = None;
                self.active
            }
            _ => self.active,
        }
    }
}

/// Reads the A/B state from `store` (a fresh state if there is no block yet).
pub fn load_state(store: &impl EnvStore) -> Result<(AbState, GrubEnv), AbError> {
    let env = store.load()?.unwrap_or_default();
    Ok((AbState::from_env(&env)?, env))
}

/// Saves the A/B state into `store`, atomically.
pub fn save_state(
    store: &mut impl EnvStore,
    state: &AbState,
    mut env: GrubEnv,
) -> Result<(), AbError> {
    state.write_to(&mut env)?;
    store.store(&env)?;
    Ok(())
}

/// A slot scheduled for its trial boots ("Activated").
#[derive(Debug)]
pub struct ActivatedSlot {
    pub slot: Slot,
    pub tries: u8,
}

impl<D: Device> VerifiedSlot<D> {
    /// Schedules this verified slot for `tries` trial boots. Only a `VerifiedSlot` has this
    /// method, so an unverified image cannot be activated.
    pub fn activate(self, store: &mut impl EnvStore, tries: u8) -> Result<ActivatedSlot, AbError> {
        if !(1..=MAX_TRIES).contains(&tries) {
            return Err(AbError::BadTries(tries));
        }
        let (mut state, env) = load_state(store)?;
        if state.active == self.slot_name {
            return Err(AbError::ActivatingActive(self.slot_name));
        }
        state.next = Some(self.slot_name);
        state.tries = tries;
        state.fallback = None;
        save_state(store, &state, env)?;
        Ok(ActivatedSlot { slot: self.slot_name, tries })
    }
}
