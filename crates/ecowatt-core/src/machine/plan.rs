//! The export-limit schedule, run offline: the server compiles the site's
//! time-of-day plan (days, times, time zone with daylight saving) into
//! steps in UTC for a horizon of days; the device writes each step's limit
//! when its time comes, read back like any limit, whether or not it hears
//! from the server.
//!
//! Precedence, highest first (docs/export-control.md):
//! 1. a lapsed lease: the fail-safe, until the server is heard again;
//! 2. a leased command: its limit, while the lease holds;
//! 3. a command without a lease: its limit, until the plan's next step;
//! 4. the plan's step in force (between entries, the plan's default);
//! 5. past the plan's horizon with no newer plan: the fail-safe.
//!
//! A command the server marks as a return to the plan (a curtailment's
//! release) writes the plan's limit in force instead of its own value and
//! ends any lease. A step that comes while a lease holds is skipped (the
//! lease wins); one that comes during a command's ramp waits for the ramp,
//! after which the command is the newer and holds until the step after.
//!
//! What is persisted (key `plan`): the plan, the step last taken, and the
//! command overriding it, so a restart neither writes a step again nor
//! undoes a command.

use alloc::vec::Vec;

use ecowatt_proto::messages::{
    MAX_COMMANDS, NO_ENTRY, Plan, ScheduleOrders, ScheduleReport, ScheduleState, Step,
};

use super::{Device, Note};
use crate::kv::{KeyValue, KvError};
use crate::ota::Slots;

const KEY: &str = "plan";
/// A step the inverter did not take is written again after this long, ms.
pub(super) const RETRY_MS: u64 = 30_000;

/// The plan and where the device is in it.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    plan: Plan,
    /// The time of the step last taken (the plan's end once that is taken).
    taken: u64,
    /// A command without a lease that holds until the next step.
    command: Option<u64>,
    /// Commands that return to the plan, not executed yet.
    resume: Vec<u64>,
    /// A step's limit waiting for the inverter.
    due: Option<u16>,
    writing: bool,
    /// A failed write is tried again from then.
    retry_at: u64,
    /// The last step written: when, and whether it read back equal.
    last: Option<(u64, bool)>,
}

/// What is in force at a time: a step, or the plan's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Now {
    Step(Step),
    Ended(u64),
}

impl Now {
    fn key(self) -> u64 {
        match self {
            Now::Step(s) => s.at_ms,
            Now::Ended(until) => until,
        }
    }
}

impl Schedule {
    pub(super) fn load(kv: &mut impl KeyValue) -> Result<Self, KvError> {
        let mut s = Schedule::default();
        if let Some(b) = kv.get(KEY)? {
            s.decode(&b);
        }
        Ok(s)
    }

    fn decode(&mut self, b: &[u8]) {
        let u64_at = |i: usize| b.get(i..i + 8).map(|s| u64::from_be_bytes(s.try_into().unwrap()));
        let (Some(version), Some(from_ms), Some(until_ms), Some(taken), Some(command)) =
            (u64_at(0), u64_at(8), u64_at(16), u64_at(24), u64_at(32))
        else {
            return;
        };
        let Some(n) = b.get(40..42).map(|s| usize::from(u16::from_be_bytes([s[0], s[1]]))) else {
            return;
        };
        let mut steps = Vec::with_capacity(n);
        for k in 0..n {
            let Some(s) = b.get(42 + 6 * k..48 + 6 * k) else { return };
            let off = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
            steps.push(Step { at_ms: from_ms + u64::from(off) * 1000, value: s[4], entry: s[5] });
        }
        self.plan = Plan { version, from_ms, until_ms, steps };
        self.taken = taken;
        self.command = (command != 0).then_some(command);
    }

    fn encode(&self) -> Vec<u8> {
        let p = &self.plan;
        let mut b = Vec::with_capacity(42 + 6 * p.steps.len());
        for v in [p.version, p.from_ms, p.until_ms, self.taken, self.command.unwrap_or(0)] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&(p.steps.len() as u16).to_be_bytes());
        for s in &p.steps {
            b.extend_from_slice(&(((s.at_ms - p.from_ms) / 1000) as u32).to_be_bytes());
            b.push(s.value);
            b.push(s.entry);
        }
        b
    }

    /// What is in force at `now_ms` (`None`: no plan, or before its start).
    fn at(&self, now_ms: u64) -> Option<Now> {
        if self.plan.steps.is_empty() {
            return None;
        }
        if now_ms >= self.plan.until_ms {
            return Some(Now::Ended(self.plan.until_ms));
        }
        self.plan.step_at(now_ms).copied().map(Now::Step)
    }

    /// When what is in force changes next.
    pub(super) fn next_change(&self) -> Option<u64> {
        if self.plan.steps.is_empty() || self.taken >= self.plan.until_ms {
            return None;
        }
        let next = self.plan.steps.iter().find(|s| s.at_ms > self.taken).map(|s| s.at_ms);
        Some(next.unwrap_or(self.plan.until_ms))
    }

    /// When a failed step's write is tried again.
    pub(super) fn retry_at(&self) -> Option<u64> {
        self.due.filter(|_| !self.writing).map(|_| self.retry_at)
    }

    /// The step's limit waiting, marked as under way.
    pub(super) fn start_write(&mut self, now_ms: u64) -> Option<u16> {
        if self.writing || now_ms < self.retry_at {
            return None;
        }
        let v = self.due?;
        self.writing = true;
        Some(v)
    }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    fn save_plan(&mut self) {
        if let Err(e) = self.kv.set(KEY, &self.schedule.encode()) {
            self.say(Note::StorageFailed("schedule", e));
        }
    }

    /// What the next sync reports of the schedule.
    pub(super) fn plan_report(&self, now_ms: u64) -> ScheduleReport {
        let s = &self.schedule;
        let step = s.at(now_ms).and_then(|n| match n {
            Now::Step(step) => Some(step),
            Now::Ended(_) => None,
        });
        let state = match (s.at(now_ms), self.limit.lease()) {
            _ if s.plan.steps.is_empty() => ScheduleState::None,
            (_, Some(true)) => ScheduleState::FailSafe,
            (_, Some(false)) => ScheduleState::Lease,
            (Some(Now::Ended(_)), None) => ScheduleState::Ended,
            _ if s.command.is_some() => ScheduleState::Command,
            _ => ScheduleState::Following,
        };
        ScheduleReport {
            version: s.plan.version,
            until_ms: s.plan.until_ms,
            state,
            entry: step.map_or(NO_ENTRY, |x| x.entry),
            value: step.map_or(0xFF, |x| x.value),
            last: s.last,
        }
    }

    /// Takes the schedule part of a sync answer.
    pub(super) fn take_schedule(&mut self, orders: Option<ScheduleOrders>) {
        let Some(o) = orders else { return };
        if let Some(plan) = o.plan {
            if plan.version != self.schedule.plan.version {
                // A new plan takes over at once (under a lease, when it ends).
                self.schedule.taken = 0;
                self.schedule.command = None;
                if !self.schedule.writing {
                    self.schedule.due = None;
                }
            }
            self.schedule.plan = plan;
            self.save_plan();
        }
        for id in o.resume {
            if !self.schedule.resume.contains(&id) {
                self.schedule.resume.push(id);
            }
        }
        let n = self.schedule.resume.len();
        if n > MAX_COMMANDS {
            self.schedule.resume.drain(..n - MAX_COMMANDS);
        }
    }

    /// Takes the step whose time came: its limit is due unless a lease
    /// holds; a command's override ends with it.
    pub(super) fn advance_plan(&mut self, now_ms: u64) {
        let Some(now) = self.schedule.at(now_ms) else { return };
        if now.key() <= self.schedule.taken || self.limit.ramp.is_some() {
            return; // taken already, or a command's ramp goes first
        }
        self.schedule.taken = now.key();
        self.schedule.command = None;
        self.schedule.due = match (now, self.limit.lease()) {
            (_, Some(_)) => None, // the lease (or its fail-safe) wins
            (Now::Step(s), None) => Some(u16::from(s.value)),
            (Now::Ended(_), None) => self.limit.failsafe_value(),
        };
        self.save_plan();
    }

    /// The limit a command returning to the plan writes, if it is one and a
    /// plan is running: the step in force, or past the plan's end the
    /// fail-safe (unless that is "no change").
    pub(super) fn resume_value(&self, id: u64, now_ms: u64) -> Option<u16> {
        if !self.schedule.resume.contains(&id) {
            return None;
        }
        match self.schedule.at(now_ms)? {
            Now::Step(s) => Some(u16::from(s.value)),
            Now::Ended(_) => self.limit.failsafe_value(),
        }
    }

    /// A command's limit took effect: it overrides the step in force until
    /// the next one (or, returning to the plan, ends any override).
    pub(super) fn plan_commanded(&mut self, now_ms: u64, id: u64) {
        let resumed = self.schedule.resume.contains(&id);
        self.schedule.resume.retain(|r| *r != id);
        if self.schedule.plan.steps.is_empty() {
            return;
        }
        if let Some(now) = self.schedule.at(now_ms) {
            self.schedule.taken = now.key();
        }
        self.schedule.command = (!resumed && self.limit.lease().is_none()).then_some(id);
        if !self.schedule.writing {
            self.schedule.due = None;
        }
        self.save_plan();
    }

    /// How a step's write went: one that failed is tried again in
    /// [`RETRY_MS`] until it is read back, or until something newer wins.
    pub(super) fn plan_written(&mut self, now_ms: u64, value: u16, confirmed: bool) {
        self.schedule.writing = false;
        if confirmed {
            self.schedule.due = None;
        } else {
            self.schedule.retry_at = now_ms + RETRY_MS;
        }
        self.schedule.last = Some((now_ms, confirmed));
        self.say(Note::Scheduled { value, confirmed });
    }
}
