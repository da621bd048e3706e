//! The rollout engine on plain data with a virtual clock.

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};
use sitecast_coordinator::engine::*;
use sitecast_manifest::api::UpdateState;

fn t0() -> Timestamp {
    "2026-11-23T00:00:00Z".parse().expect("ts")
}

fn hours(h: i64) -> SignedDuration {
    SignedDuration::from_hours(h)
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("appliance-{i:05}")).collect()
}

fn fleet(
    rollout: &Rollout,
    keys: &[String],
    mut state: impl FnMut(usize, &str) -> Option<UpdateState>,
) -> Vec<ApplianceView> {
    keys.iter()
        .map(|k| ApplianceView {
            key: k.clone(),
            group: None,
            state: state(rollout.stage_of(k).expect("member"), k),
            state_since: t0(),
            online: true,
        })
        .collect()
}

fn staged(n: usize) -> (Rollout, Vec<String>) {
    let keys = keys(n);
    let rollout =
        Rollout::new(7, 2, Some(1), Strategy::Staged, None, vec![], &keys, t0()).expect("valid");
    (rollout, keys)
}

#[test]
fn default_staged_rollout_is_5_25_100() {
    let (rollout, keys) = staged(200);
    let counts = rollout.stage_counts(&fleet(&rollout, &keys, |_, _| None));
    assert_eq!(counts.iter().map(|c| c.members).collect::<Vec<_>>(), vec![10, 40, 150]);
    let offered = keys.iter().filter(|k| rollout.offers_to(k)).count();
    assert_eq!(offered, 10, "only 5% get the update in stage 0");
}

#[test]
fn a_healthy_stage_advances_only_after_its_delay() {
    let (mut rollout, keys) = staged(100);
    let all_good =
        fleet(&rollout, &keys, |stage, _| (stage == 0).then_some(UpdateState::Succeeded));
    assert_eq!(decide(&rollout, &all_good, t0() + hours(23)), vec![]);
    let decisions = decide(&rollout, &all_good, t0() + hours(24));
    assert_eq!(decisions, vec![Decision::AdvanceStage { to: 1 }]);
    rollout.apply(&decisions[0], t0() + hours(24));
    assert_eq!(rollout.current_stage, 1);
    // Stage 1 has not reported: no further advance, however long we wait.
    assert_eq!(decide(&rollout, &all_good, t0() + hours(100)), vec![]);
}

#[test]
fn failures_above_the_threshold_pause_the_rollout() {
    let (rollout, keys) = staged(200);
    // 10 members in stage 0: 9 succeeded, 1 failed = 10%: not above the threshold.
    let mut seen = 0;
    let mut outcome = |failures: usize| {
        seen += 1;
        if seen <= failures { UpdateState::RolledBack } else { UpdateState::Succeeded }
    };
    let one = fleet(&rollout, &keys, |stage, _| (stage == 0).then(|| outcome(1)));
    let decisions = decide(&rollout, &one, t0() + hours(1));
    assert!(decisions.iter().all(|d| !matches!(d, Decision::Pause { .. })), "{decisions:?}");
    seen = 0;
    let mut outcome = |failures: usize| {
        seen += 1;
        if seen <= failures { UpdateState::Failed } else { UpdateState::Succeeded }
    };
    let two = fleet(&rollout, &keys, |stage, _| (stage == 0).then(|| outcome(2)));
    let decisions = decide(&rollout, &two, t0() + hours(1));
    assert!(
        matches!(&decisions[..], [Decision::Pause { reason }] if reason.contains("20%")),
        "{decisions:?}"
    );
}

#[test]
fn a_silent_reboot_counts_as_failure_and_stops_the_rollout() {
    let (rollout, keys) = staged(20);
    let view = fleet(&rollout, &keys, |stage, _| (stage == 0).then_some(UpdateState::Rebooting));
    assert_eq!(decide(&rollout, &view, t0() + SignedDuration::from_mins(29)), vec![]);
    let decisions = decide(&rollout, &view, t0() + SignedDuration::from_mins(31));
    assert!(matches!(decisions[0], Decision::MarkFailed { .. }), "{decisions:?}");
    assert!(matches!(decisions.last(), Some(Decision::Pause { .. })), "{decisions:?}");
}

#[test]
fn canary_waits_for_the_operator_and_completion_needs_everyone() {
    let keys = keys(40);
    let mut rollout =
        Rollout::new(1, 2, Some(1), Strategy::Canary, None, vec![], &keys, t0()).expect("ok");
    let good = |limit: usize| {
        move |stage: usize, _: &str| (stage <= limit).then_some(UpdateState::Succeeded)
    };
    assert_eq!(decide(&rollout, &fleet(&rollout, &keys, good(0)), t0() + hours(1000)), vec![]);
    rollout.apply(&Decision::AdvanceStage { to: 1 }, t0());
    assert_eq!(decide(&rollout, &fleet(&rollout, &keys, good(0)), t0() + hours(1)), vec![]);
    assert_eq!(
        decide(&rollout, &fleet(&rollout, &keys, good(1)), t0() + hours(1)),
        vec![Decision::Complete]
    );
}

#[test]
fn bad_stage_plans_are_refused() {
    let keys = keys(3);
    let plan = |percents: &[u8]| {
        percents.iter().map(|&percent| StagePlan { percent, delay_hours: 0 }).collect::<Vec<_>>()
    };
    for stages in [plan(&[]), plan(&[50]), plan(&[50, 20, 100]), plan(&[0, 100])] {
        let result =
            Rollout::new(1, 2, None, Strategy::Staged, Some(stages.clone()), vec![], &keys, t0());
        assert!(result.is_err(), "{stages:?}");
    }
}

proptest! {
    /// Same appliance, same stage: membership depends only on the rollout and the key set,
    /// not on the order the fleet was listed in; stage sizes follow the plan.
    #[test]
    fn stage_membership_is_deterministic_and_sized(n in 1usize..400, rollout in any::<u64>(), rotate in any::<usize>()) {
        let keys = keys(n);
        let stages = Strategy::Staged.default_stages();
        let a = assign_stages(rollout, &keys, &stages);
        let mut shuffled = keys.clone();
        shuffled.rotate_left(rotate % n);
        shuffled.reverse();
        prop_assert_eq!(&a, &assign_stages(rollout, &shuffled, &stages));
        let in_stage = |s: usize| a.values().filter(|&&v| v == s).count();
        let first = (5 * n).div_ceil(100).max(1);
        prop_assert_eq!(in_stage(0), first.min(n));
        prop_assert_eq!(in_stage(0) + in_stage(1), (25 * n).div_ceil(100).max(first).min(n));
        prop_assert_eq!(a.len(), n);
    }

    /// Driving a rollout through random outcomes: it never offers beyond the current stage,
    /// never advances past a stage whose failure rate is above the threshold, and completes
    /// only when every member succeeded.
    #[test]
    fn random_fleets_never_break_the_rules(
        n in 1usize..120,
        outcomes in prop::collection::vec(0u8..20, 120),
        step_hours in 1i64..30,
    ) {
        let keys = keys(n);
        let mut rollout = Rollout::new(3, 2, Some(1), Strategy::Staged, None, vec![], &keys, t0()).expect("ok");
        let mut now = t0();
        for _ in 0..20 {
            let view: Vec<ApplianceView> = keys.iter().enumerate().map(|(i, k)| ApplianceView {
                key: k.clone(),
                group: None,
                state: rollout.reached(k).then(|| match outcomes[i] {
                    0 => UpdateState::Failed,
                    1 => UpdateState::Downloading,
                    _ => UpdateState::Succeeded,
                }),
                state_since: now,
                online: true,
            }).collect();
            let rate = rollout.failure_rate(&view);
            for decision in decide(&rollout, &view, now) {
                match &decision {
                    Decision::AdvanceStage { to } => {
                        prop_assert!(rate <= rollout.failure_threshold);
                        prop_assert_eq!(*to, rollout.current_stage + 1);
                        prop_assert!(*to <= rollout.last_stage());
                    }
                    Decision::Complete => {
                        prop_assert!(view.iter().all(|a| a.state == Some(UpdateState::Succeeded)));
                    }
                    Decision::Pause { .. } => prop_assert!(rate > rollout.failure_threshold),
                    Decision::MarkFailed { .. } => {}
                }
                rollout.apply(&decision, now);
            }
            for key in &keys {
                if rollout.offers_to(key) {
                    prop_assert!(rollout.stage_of(key).is_some_and(|s| s <= rollout.current_stage));
                }
            }
            now += hours(step_hours);
        }
    }
}

#[test]
fn appliances_outside_the_rollout_neither_count_nor_hold_it_up() {
    let (rollout, keys) = staged(20);
    let stage0: Vec<String> =
        keys.iter().filter(|k| rollout.stage_of(k) == Some(0)).cloned().collect();
    let mut view = fleet(&rollout, &keys, |stage, _| (stage == 0).then_some(UpdateState::Failed));
    // Keys enrolled after creation report success in bulk: not members, not counted.
    view.extend((0..100).map(|i| ApplianceView {
        key: format!("late-{i}"),
        group: None,
        state: Some(UpdateState::Succeeded),
        state_since: t0(),
        online: true,
    }));
    assert!(rollout.stage_of("late-0").is_none());
    assert!(!rollout.offers_to("late-0"));
    assert_eq!(rollout.failure_rate(&view), 1.0, "{} failed in stage 0", stage0.len());
    assert!(matches!(decide(&rollout, &view, t0())[..], [Decision::Pause { .. }]));
    let counted: usize = rollout.stage_counts(&view).iter().map(|c| c.members).sum();
    assert_eq!(counted, 20);
}
