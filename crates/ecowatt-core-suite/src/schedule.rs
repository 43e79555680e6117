//! The export-limit schedule on virtual time: steps written on the second
//! with the server gone, who wins among a command, a lease, the fail-safe
//! and the schedule, a restart that neither writes a step again nor undoes
//! a command, the horizon's end, and a step the inverter does not take.
//! (Days, times, time zones and daylight saving are the server's: it
//! compiles them into the UTC steps these tests hand the device.)

use alloc::vec::Vec;

use ecowatt_core::machine::Note;
use ecowatt_proto::messages::{NO_ENTRY, Plan, ScheduleState, Step};

use crate::world::{HOUR, MINUTE, SECOND, World};

const LEASE: u32 = 5 * 60_000;
const POLL: u64 = 5 * SECOND;

fn limit(w: &World) -> u16 {
    w.inverter.regs[8]
}

/// A plan from `from` of `(offset, limit, entry)` steps, ending `until` after `from`.
fn plan(version: u64, from: u64, steps: &[(u64, u8, u8)], until: u64) -> Plan {
    Plan {
        version,
        from_ms: from,
        until_ms: from + until,
        steps: steps
            .iter()
            .map(|&(off, value, entry)| Step { at_ms: from + off, value, entry })
            .collect(),
    }
}

fn state(w: &World) -> Option<ScheduleState> {
    w.server.schedule.map(|s| s.state)
}

/// A device that took `p` (a plan starting now), with a fail-safe of 40 %.
fn scheduled(steps: &[(u64, u8, u8)], until: u64) -> (World, u64) {
    let mut w = World::new();
    w.server.failsafe = Some(40);
    w.run_until(w.now + MINUTE);
    let t = w.now - w.now % MINUTE + MINUTE;
    w.run_until(t - SECOND);
    w.server.plan = Some(plan(1, t, steps, until));
    assert!(w.run_until_true(MINUTE, |w| w.server.schedule.is_some_and(|s| s.version == 1)));
    (w, t)
}

/// Runs until `at` and checks the limit is `before` just before it and
/// `after` within a second of it.
fn step_at(w: &mut World, at: u64, before: u16, after: u16) {
    w.run_until(at - SECOND);
    assert_eq!(limit(w), before, "just before {}", at);
    assert!(w.run_until_true(SECOND, |w| limit(w) == after), "{after} % by {} s late", SECOND);
}

pub fn a_schedule_runs_offline_step_on_time() {
    let (mut w, t) =
        scheduled(&[(0, 100, NO_ENTRY), (HOUR, 0, 0), (3 * HOUR, 100, NO_ENTRY)], 48 * HOUR);
    // The step in force at the start is written at once (it is 100 % already).
    assert_eq!(limit(&w), 100);
    w.server.up = false;
    step_at(&mut w, t + HOUR, 100, 0);
    step_at(&mut w, t + 3 * HOUR, 0, 100);
    // The next day repeats nothing: the plan had no more steps.
    w.run_until(t + 30 * HOUR);
    assert_eq!(w.inverter.timed.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [100, 0, 100]);
    assert_eq!(w.count(|n| matches!(n, Note::Scheduled { confirmed: true, .. })), 3);
    w.server.up = true;
    let syncs = w.server.syncs;
    assert!(w.run_until_true(2 * MINUTE, |w| w.server.syncs > syncs));
    let r = w.server.schedule.unwrap();
    assert_eq!((r.state, r.entry, r.value), (ScheduleState::Following, NO_ENTRY, 100));
    assert_eq!(r.last.map(|(at, ok)| (at >= t + 3 * HOUR, ok)), Some((true, true)));
    // The same version with a later horizon writes nothing; a new version
    // takes over at once.
    let writes = w.inverter.timed.len();
    w.server.plan = Some(plan(1, t, &[(0, 100, NO_ENTRY)], 96 * HOUR));
    w.server.schedule.as_mut().unwrap().version = 0; // (make the double send it again)
    w.run_until(w.now + MINUTE);
    assert_eq!(w.inverter.timed.len(), writes);
    w.server.plan = Some(plan(2, t, &[(0, 30, 0)], 96 * HOUR));
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 30));
}

pub fn a_command_a_lease_and_the_failsafe_win_over_the_schedule_in_that_order() {
    let (mut w, t) = scheduled(
        &[(0, 100, NO_ENTRY), (HOUR, 0, 0), (2 * HOUR, 50, 1), (6 * HOUR, 100, NO_ENTRY)],
        48 * HOUR,
    );
    // A command without a lease holds until the next step...
    w.run_until(t + 10 * MINUTE);
    w.server.command(1, 70, u64::MAX);
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 70));
    assert!(w.run_until_true(MINUTE, |w| state(w) == Some(ScheduleState::Command)));
    step_at(&mut w, t + HOUR, 70, 0);
    assert!(w.run_until_true(MINUTE, |w| state(w) == Some(ScheduleState::Following)));
    // ...a leased one for as long as its lease holds: the step is skipped.
    w.run_until(t + HOUR + 10 * MINUTE);
    w.server.leased(2, 20, LEASE);
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 20));
    w.run_until(t + 2 * HOUR + MINUTE);
    assert_eq!(limit(&w), 20, "the lease wins over the 50 % step");
    assert_eq!(state(&w), Some(ScheduleState::Lease));
    assert_eq!(w.server.schedule.map(|s| (s.entry, s.value)), Some((1, 50)), "the entry in force");
    // The server goes: the lease lapses into the fail-safe, which holds over the schedule.
    w.run_until(t + 2 * HOUR + 10 * MINUTE);
    w.server.up = false;
    let lapse = w.last_heard + u64::from(LEASE);
    assert!(w.run_until_true(lapse + POLL - w.now, |w| limit(w) == 40));
    // The server is back: the lease comes back.
    w.run_until(t + 2 * HOUR + 30 * MINUTE);
    w.server.up = true;
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 20));
    assert!(w.run_until_true(MINUTE, |w| state(w) == Some(ScheduleState::Lease)));
    // A release returns to the schedule: the step in force (50 %), not the command's 100 %.
    w.server.command(3, 100, u64::MAX);
    w.server.resume.push(3);
    assert!(w.run_until_true(MINUTE, |w| w.server.results.contains_key(&3)));
    assert_eq!(limit(&w), 50);
    let (result, _) = w.server.results[&3];
    assert!(result.succeeded && result.value == Some(50));
    assert!(w.run_until_true(MINUTE, |w| state(w) == Some(ScheduleState::Following)));
    assert_eq!(w.server.control.as_ref().unwrap().lease, None, "the lease ended");
    // And the schedule goes on without the server.
    w.server.up = false;
    step_at(&mut w, t + 6 * HOUR, 50, 100);
    let values: Vec<u16> = w.inverter.timed.iter().map(|(_, v)| *v).collect();
    assert_eq!(values, [100, 70, 0, 20, 40, 20, 50, 100]);
}

pub fn a_restart_neither_writes_a_step_again_nor_undoes_a_command() {
    let (mut w, t) = scheduled(&[(0, 80, 0), (HOUR, 10, 1), (2 * HOUR, 80, 0)], 48 * HOUR);
    assert_eq!(limit(&w), 80);
    w.server.command(1, 60, u64::MAX);
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 60));
    w.run_until(w.now + MINUTE);
    w.server.up = false;
    w.reboot();
    w.run_until(t + HOUR - SECOND);
    assert_eq!(limit(&w), 60, "the command holds across the restart");
    step_at(&mut w, t + HOUR, 60, 10);
    w.reboot();
    w.run_until(t + 2 * HOUR - SECOND);
    assert_eq!(w.inverter.timed.iter().filter(|(_, v)| *v == 10).count(), 1, "written once");
    step_at(&mut w, t + 2 * HOUR, 10, 80);
}

pub fn past_its_horizon_a_schedule_ends_in_the_failsafe() {
    let (mut w, t) = scheduled(&[(0, 100, NO_ENTRY), (HOUR, 70, 0)], 3 * HOUR);
    w.server.up = false;
    step_at(&mut w, t + HOUR, 100, 70);
    step_at(&mut w, t + 3 * HOUR, 70, 40);
    w.server.up = true;
    assert!(w.run_until_true(2 * MINUTE, |w| state(w) == Some(ScheduleState::Ended)));
    // A command holds over the ended plan; a return to the plan writes the fail-safe again.
    w.server.command(1, 70, u64::MAX);
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 70));
    w.server.command(2, 100, u64::MAX);
    w.server.resume.push(2);
    assert!(w.run_until_true(MINUTE, |w| w.server.results.contains_key(&2)));
    assert_eq!((limit(&w), w.server.results[&2].0.value), (40, Some(40)));
    // A new plan takes over from the fail-safe.
    w.server.plan = Some(plan(2, t + 3 * HOUR, &[(0, 90, 0)], 24 * HOUR));
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 90));
    assert!(w.run_until_true(MINUTE, |w| state(w) == Some(ScheduleState::Following)));
}

pub fn a_step_the_inverter_does_not_take_is_reported_failed_and_tried_again() {
    let (mut w, t) = scheduled(&[(0, 100, NO_ENTRY), (HOUR, 0, 0)], 48 * HOUR);
    w.run_until(t + HOUR - MINUTE);
    w.inverter.silent = true;
    w.run_until(t + HOUR + 2 * MINUTE);
    assert_eq!(limit(&w), 100);
    assert!(w.count(|n| matches!(n, Note::Scheduled { value: 0, confirmed: false })) >= 2);
    assert!(w.run_until_true(2 * MINUTE, |w| {
        w.server.schedule.is_some_and(|s| s.last.is_some_and(|(at, ok)| !ok && at >= t + HOUR))
    }));
    // The inverter answers again: the step is written within the retry interval.
    w.inverter.silent = false;
    assert!(w.run_until_true(31 * SECOND, |w| limit(w) == 0));
    assert!(w.run_until_true(2 * MINUTE, |w| {
        w.server.schedule.is_some_and(|s| s.last.is_some_and(|(_, ok)| ok))
    }));
}
