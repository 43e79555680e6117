//! Leased export limits on virtual time: the fail-safe when the server goes
//! silent (within one poll of the lease's end, never before), restarts mid
//! lease and after it ran out, a lease renewed across an outage a little
//! shorter than it, and who wins among a command, a lease and the fail-safe.

use alloc::vec::Vec;

use ecowatt_core::machine::Note;
use ecowatt_proto::messages::{EpisodeKind, EpisodeOutcome, failsafe};

use crate::world::{MINUTE, SECOND, World};

const LEASE: u32 = 5 * 60_000;
const POLL: u64 = 5 * SECOND;

fn limit(w: &World) -> u16 {
    w.inverter.regs[8]
}

/// A device holding 30 % under a lease of `lease_ms`, with a fail-safe of 40 %.
fn holding(lease_ms: u32) -> World {
    let mut w = World::new();
    w.server.failsafe = Some(40);
    w.run_until(w.now + MINUTE);
    w.server.leased(1, 30, lease_ms);
    assert!(w.run_until_true(MINUTE, |w| limit(w) == 30), "the leased limit is written");
    assert!(w.run_until_true(MINUTE, |w| w.server.control.as_ref().is_some_and(|c| {
        c.lease.is_some_and(|l| l.command_id == 1 && !l.lapsed) && c.failsafe == 40
    })));
    w
}

fn kinds(w: &World) -> Vec<(EpisodeKind, u16, EpisodeOutcome)> {
    w.server.episodes.iter().map(|e| (e.kind, e.value, e.outcome)).collect()
}

pub fn a_silent_server_lapses_the_lease_into_the_failsafe_within_a_poll() {
    let mut w = holding(LEASE);
    w.server.up = false;
    let deadline = w.last_heard + u64::from(LEASE);
    // Never before the lease's end...
    w.run_until(deadline - SECOND);
    assert_eq!(limit(&w), 30, "the limit holds while the lease runs");
    // ...and within one poll interval after it.
    assert!(w.run_until_true(POLL, |w| limit(w) == 40), "fail-safe by {}", w.now - deadline);
    assert_eq!(w.count(|n| matches!(n, Note::Lease(_))), 1);
    // The server comes back: the episode is reported and the leased limit returns.
    w.run_until(w.now + 10 * MINUTE);
    w.server.up = true;
    assert!(w.run_until_true(2 * MINUTE, |w| limit(w) == 30), "the lease comes back");
    w.run_until(w.now + MINUTE);
    assert_eq!(
        kinds(&w),
        [
            (EpisodeKind::FailSafe, 40, EpisodeOutcome::Confirmed),
            (EpisodeKind::Resumed, 30, EpisodeOutcome::Confirmed)
        ]
    );
    assert!(w.server.episodes[0].at_ms >= deadline);
    let lease = w.server.control.as_ref().unwrap().lease.unwrap();
    assert!(!lease.lapsed && lease.value == 30);
    assert!(w.server.control.as_ref().unwrap().episodes.is_empty(), "acknowledged ones go");
}

pub fn a_restart_mid_lease_resumes_it_with_the_remaining_time() {
    let lease = 16 * 60_000;
    let mut w = holding(lease);
    w.server.up = false;
    let deadline = w.last_heard + u64::from(lease);
    w.run_until(w.now + 6 * MINUTE);
    w.reboot();
    assert_eq!(limit(&w), 30);
    // The stored end may be early by an eighth of the lease, never late.
    let earliest = deadline - u64::from(lease / 8);
    w.run_until(earliest - SECOND);
    assert_eq!(limit(&w), 30, "the lease goes on after the restart");
    assert!(w.run_until_true(u64::from(lease / 8) + POLL, |w| limit(w) == 40));
    assert!(w.now <= deadline + POLL);
}

pub fn a_lease_that_ran_out_while_off_applies_the_failsafe_first() {
    let mut w = holding(LEASE);
    w.server.up = false;
    // Off for longer than the lease; the inverter meanwhile holds 30 %.
    w.device = None;
    w.now += 2 * u64::from(LEASE);
    let writes = w.inverter.writes.len();
    w.reboot();
    w.run_until(w.now + SECOND);
    assert_eq!(w.inverter.writes[writes..].first(), Some(&(8, 40)), "first thing: the fail-safe");
    w.server.up = true;
    assert!(w.run_until_true(2 * MINUTE, |w| limit(w) == 30), "and back once heard");
    assert_eq!(kinds(&w)[0], (EpisodeKind::FailSafe, 40, EpisodeOutcome::Confirmed));
}

pub fn a_lease_is_renewed_across_an_outage_a_little_shorter_than_it() {
    let mut w = holding(LEASE);
    w.server.up = false;
    let back = w.last_heard + u64::from(LEASE) - 6 * SECOND;
    // Failed syncs back off, but never past the lease's end.
    while w.now < back {
        w.run_until((w.now + SECOND).min(back));
        assert_eq!(limit(&w), 30);
    }
    w.server.up = true;
    w.run_until(w.now + 3 * u64::from(LEASE));
    assert_eq!(limit(&w), 30, "renewed in time, and by every answer after");
    assert!(w.server.episodes.is_empty(), "{:?}", w.server.episodes);
    assert_eq!(w.inverter.writes, [(8, 30)]);
}

pub fn a_command_wins_over_a_lapsed_lease_and_an_unleased_limit_ends_it() {
    let mut w = holding(LEASE);
    w.server.up = false;
    assert!(w.run_until_true(u64::from(LEASE) + MINUTE, |w| limit(w) == 40));
    // Back, with a new limit that carries no lease: it replaces the lapsed
    // one at once (30 % is never written again).
    w.server.command(2, 60, u64::MAX);
    w.server.up = true;
    assert!(w.run_until_true(2 * MINUTE, |w| limit(w) == 60));
    w.run_until(w.now + MINUTE);
    assert_eq!(w.inverter.writes, [(8, 30), (8, 40), (8, 60)]);
    assert_eq!(w.server.control.as_ref().unwrap().lease, None, "no lease held");
    // Silence now changes nothing: nothing is leased.
    w.server.up = false;
    w.run_until(w.now + 3 * u64::from(LEASE));
    assert_eq!(limit(&w), 60);
    // A leased command mid-lease takes over with its own lease.
    w.server.up = true;
    w.server.leased(3, 20, LEASE);
    assert!(w.run_until_true(2 * MINUTE, |w| limit(w) == 20));
    w.server.leased(4, 25, 2 * LEASE);
    assert!(w.run_until_true(2 * MINUTE, |w| limit(w) == 25));
    w.server.up = false;
    let heard = w.last_heard;
    w.run_until(heard + u64::from(LEASE) + MINUTE);
    assert_eq!(limit(&w), 25, "the newer, longer lease holds");
    assert!(w.run_until_true(u64::from(LEASE) + POLL, |w| limit(w) == 40));
}

pub fn a_failsafe_of_no_change_holds_and_is_reported() {
    let mut w = holding(LEASE);
    w.server.failsafe = Some(failsafe::HOLD);
    assert!(w.run_until_true(2 * MINUTE, |w| {
        w.server.control.as_ref().is_some_and(|c| c.failsafe == failsafe::HOLD)
    }));
    w.server.up = false;
    w.run_until(w.now + 2 * u64::from(LEASE));
    w.server.up = true;
    w.run_until(w.now + MINUTE);
    assert_eq!(w.inverter.writes, [(8, 30), (8, 30)], "only the return writes");
    assert_eq!(kinds(&w)[0], (EpisodeKind::FailSafe, 0, EpisodeOutcome::Held));
}

pub fn a_failsafe_the_inverter_does_not_take_is_reported_failed() {
    let mut w = holding(LEASE);
    w.server.up = false;
    w.inverter.silent = true;
    w.run_until(w.now + 2 * u64::from(LEASE));
    w.inverter.silent = false;
    w.server.up = true;
    w.run_until(w.now + 2 * MINUTE);
    assert_eq!(kinds(&w)[0], (EpisodeKind::FailSafe, 40, EpisodeOutcome::Failed));
    assert_eq!(limit(&w), 30, "back to the lease once heard");
}

pub fn a_power_cut_at_every_write_of_a_lapse_ends_on_the_failsafe_reported_once() {
    for n in 0..6 {
        let mut w = holding(LEASE);
        w.server.up = false;
        let deadline = w.last_heard + u64::from(LEASE);
        w.run_until(deadline - SECOND);
        w.power.cut_after(n);
        assert!(w.run_until_true(MINUTE, |w| limit(w) == 40), "cut after {n}");
        w.server.up = true;
        assert!(w.run_until_true(2 * MINUTE, |w| limit(w) == 30), "cut after {n}");
        w.run_until(w.now + MINUTE);
        let failsafes = kinds(&w).iter().filter(|k| k.0 == EpisodeKind::FailSafe).count();
        assert_eq!(failsafes, 1, "cut after {n}: {:?}", kinds(&w));
    }
}

/// Every export-limit write after `from_ms`, checked against the line from
/// `start` at `rate` (hundredths of % per second): never ahead of it.
fn never_faster(w: &World, from_ms: u64, start: u16, rate: u16) {
    let writes: Vec<(u64, u16)> =
        w.inverter.timed.iter().filter(|(t, _)| *t >= from_ms).copied().collect();
    let t0 = writes.first().expect("a step").0;
    for (t, v) in &writes {
        let allowed = u64::from(rate) * (t - t0 + 1_000) / 100_000;
        assert!(
            u64::from(start.abs_diff(*v)) <= allowed,
            "{v}% at {} ms: faster than {rate}/100 %/s",
            t - t0
        );
    }
}

pub fn a_ramp_steps_no_faster_than_its_rate_and_confirms_each_step() {
    let mut w = World::new();
    w.run_until(w.now + MINUTE);
    let start = limit(&w);
    let from = w.now;
    w.server.ramped(7, 40, 250); // 100 % -> 40 % at 2.5 %/s: 24 s
    assert!(w.run_until_true(2 * MINUTE, |w| w.server.results.contains_key(&7)));
    let (result, _) = w.server.results[&7];
    assert!(result.succeeded && result.value == Some(40), "{result:?}");
    assert_eq!(limit(&w), 40);
    never_faster(&w, from, start, 250);
    let steps = w.inverter.timed.iter().filter(|(t, _)| *t >= from).count();
    assert!((20..=61).contains(&steps), "stepped in {steps} writes");
    let took = w.inverter.timed.last().unwrap().0
        - w.inverter.timed.iter().find(|(t, _)| *t >= from).unwrap().0;
    assert!((22 * SECOND..=26 * SECOND).contains(&took), "took {took} ms");
    assert_eq!(w.count(|n| matches!(n, Note::Ramp { command_id: 7, .. })), steps);
}

pub fn a_new_limit_takes_over_a_ramp_from_where_it_is() {
    let mut w = World::new();
    w.run_until(w.now + MINUTE);
    w.server.ramped(7, 0, 100); // 100 % -> 0 % at 1 %/s
    let from = w.now;
    w.run_until(w.now + 30 * SECOND);
    let mid = limit(&w);
    assert!((60..=80).contains(&mid), "mid-ramp at {mid}%");
    // The server reports progress as the device tells it.
    let r = w.server.control.as_ref().unwrap().ramp.expect("a ramp under way");
    assert_eq!((r.command_id, r.target), (7, 0));
    // A new ramped command takes over from the current value, towards 90 %.
    w.server.ramped(8, 90, 200);
    assert!(w.run_until_true(2 * MINUTE, |w| w.server.results.contains_key(&8)));
    let (old, _) = w.server.results[&7];
    assert!(!old.succeeded, "the first ramp did not reach its target");
    let (new, _) = w.server.results[&8];
    assert_eq!((new.succeeded, new.value), (true, Some(90)));
    let after: Vec<u16> =
        w.inverter.timed.iter().filter(|(t, _)| *t > from).map(|(_, v)| *v).collect();
    let turn = (1..after.len()).find(|&i| after[i] > after[i - 1]).expect("it turns");
    assert!(after[..turn].windows(2).all(|p| p[1] < p[0]), "down first: {after:?}");
    assert!(after[turn - 1..].windows(2).all(|p| p[1] > p[0]), "then up: {after:?}");
    assert!(after[turn] - after[turn - 1] <= 2, "from where it was, no jump: {after:?}");
    assert_eq!(after.last(), Some(&90));
    assert!(w.server.control.as_ref().unwrap().ramp.is_none());
}

pub fn a_lease_that_lapses_mid_ramp_ends_the_ramp_in_the_failsafe() {
    let mut w = holding(LEASE);
    // A slow ramp from 30 % down (0.05 %/s: ten minutes, longer than the
    // lease still held), and then the server goes.
    w.server.ramped(2, 0, 5);
    assert!(w.run_until_true(MINUTE, |w| limit(w) < 30));
    w.server.up = false;
    let lapse = w.last_heard + u64::from(LEASE);
    assert!(w.run_until_true(lapse + POLL - w.now, |w| limit(w) == 40), "the fail-safe");
    // The ramp never writes over it.
    w.run_until(w.now + 2 * MINUTE);
    assert_eq!(limit(&w), 40);
    let after: Vec<u16> =
        w.inverter.timed.iter().filter(|(t, _)| *t >= lapse).map(|(_, v)| *v).collect();
    assert_eq!(after, [40], "nothing after the fail-safe");
    w.server.up = true;
    assert!(w.run_until_true(2 * MINUTE, |w| w.server.results.contains_key(&2)));
    let (r, _) = w.server.results[&2];
    assert!(!r.succeeded && r.value.is_some_and(|v| v > 0 && v < 30), "{r:?}");
}

pub fn a_ramp_the_inverter_stops_taking_fails_with_the_value_reached() {
    let mut w = World::new();
    w.run_until(w.now + MINUTE);
    w.server.ramped(7, 50, 500);
    w.run_until(w.now + 4 * SECOND);
    w.inverter.silent = true;
    w.run_until(w.now + 20 * SECOND);
    w.inverter.silent = false;
    assert!(w.run_until_true(2 * MINUTE, |w| w.server.results.contains_key(&7)));
    let (r, _) = w.server.results[&7];
    assert!(!r.succeeded, "{r:?}");
    let reached = r.value.expect("the value it reached");
    assert!((50..100).contains(&reached), "{reached}");
}
