//! Leased export limits and the fail-safe: a limit the server set with a
//! lease holds while the device hears from the server; after `lease_ms` of
//! silence the inverter gets the installer's fail-safe limit, and when the
//! server is heard again the leased limit comes back (unless a newer command
//! replaces it). Every lapse and resumption is an [`Episode`] reported until
//! the server acknowledges it.
//!
//! Precedence, highest first: a command's limit (leased or not) replaces
//! whatever was in force; a lapsed lease puts the fail-safe in force until
//! the server is heard again; an unleased limit stays until the next command.
//!
//! What is persisted (key `limit`): the fail-safe, the lease held (command,
//! limit, lease length, deadline, lapsed) and the episodes not yet
//! acknowledged. The deadline is written again only when it moved by more
//! than an eighth of the lease, so a restart may find it up to that much
//! early (never late); a restart that finds it passed, or that has no clock
//! to tell, applies the fail-safe before anything else.

use alloc::vec::Vec;

use ecowatt_proto::messages::{
    CommandControl, ControlOrders, ControlReport, EARLIEST_SAMPLE_MS, Episode, EpisodeKind,
    EpisodeOutcome, LeaseState, MAX_EPISODES, Operation, RampState, failsafe,
};
use ecowatt_proto::registers::EXPORT_LIMIT;

use super::{Device, Note};
use crate::kv::{KeyValue, KvError};
use crate::ota::Slots;

const KEY: &str = "limit";
/// Episodes kept for the server at most (the oldest go first).
const KEPT: usize = 32;

/// A limit held under a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    pub command_id: u64,
    pub value: u16,
    pub lease_ms: u32,
    /// Unix ms after which silence lapses the lease.
    pub deadline_ms: u64,
    /// Lapsed: the fail-safe is in force.
    pub lapsed: bool,
}

/// A register write the limit logic needs, waiting for the inverter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Due {
    pub kind: EpisodeKind,
    pub value: u16,
}

/// The export-limit control state.
#[derive(Debug)]
pub(super) struct Limit {
    failsafe: u16,
    held: Option<Held>,
    episodes: Vec<Episode>,
    /// The deadline the store holds.
    stored_deadline: u64,
    /// Leases and ramps that came with commands not executed yet.
    orders: Vec<CommandControl>,
    /// The ramp under way.
    pub ramp: Option<Ramp>,
    /// A write waiting for the inverter or under way.
    due: Option<Due>,
    /// `due` was handed to the inverter.
    writing: bool,
}

impl Limit {
    fn empty() -> Self {
        Limit {
            failsafe: failsafe::UNSET,
            held: None,
            episodes: Vec::new(),
            stored_deadline: 0,
            orders: Vec::new(),
            ramp: None,
            due: None,
            writing: false,
        }
    }

    /// Loads the state; a lease that ran out while the device was off (or
    /// whose end cannot be told without a clock) is lapsed now.
    pub(super) fn load(kv: &mut impl KeyValue, now_ms: u64) -> Result<Self, KvError> {
        let mut l = Limit::empty();
        if let Some(b) = kv.get(KEY)? {
            l.decode(&b);
        }
        if let Some(h) = l.held {
            l.stored_deadline = h.deadline_ms;
            // (A lapse is stored once its fail-safe was written: nothing to redo.)
            if !h.lapsed && (now_ms < EARLIEST_SAMPLE_MS || now_ms >= h.deadline_ms) {
                // The fail-safe is written before anything else.
                l.due = Some(Due { kind: EpisodeKind::FailSafe, value: h.value });
            }
        }
        Ok(l)
    }

    fn decode(&mut self, b: &[u8]) {
        let u16_at = |i: usize| b.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
        let u32_at = |i: usize| b.get(i..i + 4).map(|s| u32::from_be_bytes(s.try_into().unwrap()));
        let u64_at = |i: usize| b.get(i..i + 8).map(|s| u64::from_be_bytes(s.try_into().unwrap()));
        let Some(fs) = u16_at(0).filter(|v| failsafe::valid(*v)) else { return };
        self.failsafe = fs;
        let mut at = 3;
        if b.get(2).is_some_and(|f| *f != 0) {
            let (Some(command_id), Some(value), Some(lease_ms), Some(deadline_ms)) =
                (u64_at(3), u16_at(11), u32_at(13), u64_at(17))
            else {
                return;
            };
            let lapsed = b.get(2) == Some(&2);
            self.held = Some(Held { command_id, value, lease_ms, deadline_ms, lapsed });
            at = 25;
        }
        let n = b.get(at).copied().unwrap_or(0) as usize;
        for k in 0..n {
            let e = at + 1 + 20 * k;
            let kind = match b.get(e) {
                Some(1) => EpisodeKind::FailSafe,
                Some(2) => EpisodeKind::Resumed,
                _ => return,
            };
            let outcome = match b.get(e + 19) {
                Some(1) => EpisodeOutcome::Confirmed,
                Some(2) => EpisodeOutcome::Failed,
                Some(3) => EpisodeOutcome::Held,
                _ => return,
            };
            let (Some(command_id), Some(at_ms), Some(value)) =
                (u64_at(e + 1), u64_at(e + 9), u16_at(e + 17))
            else {
                return;
            };
            self.episodes.push(Episode { kind, command_id, at_ms, value, outcome });
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(26 + 20 * self.episodes.len());
        b.extend_from_slice(&self.failsafe.to_be_bytes());
        match &self.held {
            None => b.push(0),
            Some(h) => {
                b.push(if h.lapsed { 2 } else { 1 });
                b.extend_from_slice(&h.command_id.to_be_bytes());
                b.extend_from_slice(&h.value.to_be_bytes());
                b.extend_from_slice(&h.lease_ms.to_be_bytes());
                b.extend_from_slice(&h.deadline_ms.to_be_bytes());
            }
        }
        b.push(self.episodes.len() as u8);
        for e in &self.episodes {
            b.push(e.kind as u8);
            b.extend_from_slice(&e.command_id.to_be_bytes());
            b.extend_from_slice(&e.at_ms.to_be_bytes());
            b.extend_from_slice(&e.value.to_be_bytes());
            b.push(e.outcome as u8);
        }
        b
    }

    fn save(&mut self, kv: &mut impl KeyValue) -> Result<(), KvError> {
        kv.set(KEY, &self.encode())?;
        self.stored_deadline = self.held.map_or(0, |h| h.deadline_ms);
        Ok(())
    }

    /// What the next sync reports.
    pub(super) fn report(&self) -> ControlReport {
        ControlReport {
            failsafe: self.failsafe,
            lease: self.held.map(|h| LeaseState {
                command_id: h.command_id,
                value: h.value,
                lapsed: h.lapsed,
            }),
            ramp: self.ramp.map(|r| RampState {
                command_id: r.command_id,
                value: r.value,
                target: r.target,
            }),
            episodes: self.episodes.iter().take(MAX_EPISODES).copied().collect(),
        }
    }

    /// The ramp rate ordered for command `id` (hundredths of % per second), if any.
    pub(super) fn ramp_rate(&self, id: u64) -> Option<u16> {
        self.orders
            .iter()
            .find(|o| o.command_id == id)
            .map(|o| o.ramp_centi_pct_per_s)
            .filter(|r| *r > 0)
    }

    /// When the lease lapses, if one is running.
    pub(super) fn deadline(&self) -> Option<u64> {
        self.held.filter(|h| !h.lapsed && self.due.is_none()).map(|h| h.deadline_ms)
    }

    /// The write waiting for the inverter, marked as under way.
    pub(super) fn start_write(&mut self) -> Option<Due> {
        if self.writing {
            return None;
        }
        let due = self.due?;
        self.writing = true;
        Some(due)
    }

    /// A fail-safe or a return is being written.
    pub(super) fn writing(&self) -> bool {
        self.writing
    }

    /// The lease held, if any: whether it lapsed.
    pub(super) fn lease(&self) -> Option<bool> {
        self.held.map(|h| h.lapsed)
    }

    /// The fail-safe value to write now, or `None` when it is "no change" (or unset).
    pub(super) fn failsafe_value(&self) -> Option<u16> {
        (self.failsafe <= 100).then_some(self.failsafe)
    }
}

/// Whether `value` is a write of the export limit.
pub(super) fn limit_write(op: Operation) -> Option<u16> {
    match op {
        Operation::Write { register: EXPORT_LIMIT, value } => Some(value),
        _ => None,
    }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    pub(super) fn save_limit(&mut self, what: &'static str) {
        if let Err(e) = self.limit.save(&mut self.kv) {
            self.say(Note::StorageFailed(what, e));
        }
    }

    /// The server answered: a running lease is renewed, a lapsed one comes
    /// back if `resume` (a sync answer with no new limit command in it).
    pub(super) fn heard(&mut self, now_ms: u64, resume: bool) {
        let Some(h) = self.limit.held.as_mut() else { return };
        if h.lapsed {
            if resume && self.limit.due.is_none() {
                self.limit.due = Some(Due { kind: EpisodeKind::Resumed, value: h.value });
            }
            return;
        }
        if self.limit.due.is_some() {
            return; // lapsing: the write decides
        }
        h.deadline_ms = now_ms + u64::from(h.lease_ms);
        // Written again only when it moved by an eighth of the lease: a restart
        // finds it at most that much early.
        if h.deadline_ms >= self.limit.stored_deadline + u64::from(h.lease_ms / 8) {
            self.save_limit("lease");
        }
    }

    /// Takes the control part of a sync answer.
    pub(super) fn take_orders(&mut self, orders: Option<ControlOrders>) {
        let Some(o) = orders else { return };
        if let Some(fs) = o.failsafe {
            if fs != self.limit.failsafe {
                self.limit.failsafe = fs;
                self.save_limit("fail-safe limit");
                self.say(Note::FailSafeSet(fs));
            }
        }
        for c in o.commands {
            if !self.limit.orders.iter().any(|o| o.command_id == c.command_id) {
                self.limit.orders.push(c);
            }
        }
        // Orders of commands long gone are forgotten.
        let n = self.limit.orders.len();
        if n > 64 {
            self.limit.orders.drain(..n - 64);
        }
    }

    /// Lapses a lease whose deadline passed. A ramp under way ends there
    /// (its command fails with the value reached): the fail-safe wins.
    pub(super) fn advance_limit(&mut self, now_ms: u64) {
        if self.limit.deadline().is_some_and(|d| now_ms >= d) {
            let value = self.limit.held.map_or(0, |h| h.value);
            self.limit.due = Some(Due { kind: EpisodeKind::FailSafe, value });
            if let Some(r) = self.limit.ramp.take() {
                self.finish_command(r.command_id, r.op, false, None, Some(r.value), now_ms);
            }
        }
    }

    /// The register value to write for `due` now, or the episode is
    /// finished at once (a fail-safe of "no change").
    pub(super) fn limit_target(&mut self, now_ms: u64, due: Due) -> Option<u16> {
        match due.kind {
            EpisodeKind::Resumed => Some(due.value),
            EpisodeKind::FailSafe => match self.limit.failsafe_value() {
                Some(v) => Some(v),
                None => {
                    self.end_episode(now_ms, due, 0, EpisodeOutcome::Held);
                    None
                }
            },
        }
    }

    /// Records how a fail-safe or resumption went (`value`: what was written,
    /// or read back when it failed).
    pub(super) fn end_episode(
        &mut self,
        now_ms: u64,
        due: Due,
        value: u16,
        outcome: EpisodeOutcome,
    ) {
        self.limit.due = None;
        self.limit.writing = false;
        let Some(h) = self.limit.held.as_mut() else { return };
        match due.kind {
            EpisodeKind::FailSafe => h.lapsed = true,
            EpisodeKind::Resumed => {
                h.lapsed = false;
                h.deadline_ms = now_ms + u64::from(h.lease_ms);
            }
        }
        let episode =
            Episode { kind: due.kind, command_id: h.command_id, at_ms: now_ms, value, outcome };
        // A restart mid-episode writes the fail-safe again: one episode for it.
        let repeat = self.limit.episodes.last().is_some_and(|e| {
            e.kind == episode.kind && e.command_id == episode.command_id && e.outcome == outcome
        });
        if !repeat {
            self.limit.episodes.push(episode);
            if self.limit.episodes.len() > KEPT {
                self.limit.episodes.remove(0);
            }
        }
        self.save_limit("lease episode");
        self.say(Note::Lease(episode));
    }

    /// A command's write of the export limit succeeded: it is the limit in
    /// force now, leased if its lease came with it.
    pub(super) fn limit_commanded(&mut self, now_ms: u64, command_id: u64, value: u16) {
        let order = self.limit.orders.iter().position(|o| o.command_id == command_id);
        let lease = order.map(|i| self.limit.orders.remove(i).lease_ms).filter(|l| *l > 0);
        // A fail-safe or resumption waiting is overtaken by the command.
        if !self.limit.writing {
            self.limit.due = None;
        }
        self.limit.held = lease.map(|lease_ms| Held {
            command_id,
            value,
            lease_ms,
            deadline_ms: now_ms + u64::from(lease_ms),
            lapsed: false,
        });
        self.save_limit("lease");
    }

    /// Episodes the server has recorded.
    pub(super) fn episodes_acknowledged(&mut self, reported: &[Episode]) {
        let before = self.limit.episodes.len();
        self.limit.episodes.retain(|e| !reported.contains(e));
        if self.limit.episodes.len() != before {
            self.save_limit("lease episode");
        }
    }

    /// How long a sync may be held open so that an answer comes before the
    /// running lease ends (half the time left).
    pub(super) fn lease_wait_cap(&self, now_ms: u64) -> Option<u32> {
        let d = self.limit.deadline()?;
        Some((d.saturating_sub(now_ms) / 2).min(u64::from(u32::MAX)) as u32)
    }

    /// How soon a failed sync is tried again: a running lease's end comes
    /// no later than this, so the device tries more often as it nears.
    pub(super) fn retry_before_lapse(&self, now_ms: u64, backoff_ms: u64) -> u64 {
        match self.limit.deadline() {
            Some(d) if d > now_ms => backoff_ms.min(((d - now_ms) / 2).max(1_000)),
            _ => backoff_ms,
        }
    }
}

/// Shortest time between two ramp steps, ms (one Modbus write a second at most).
pub(super) const RAMP_STEP_MS: u64 = 1_000;

/// A ramp: the export limit stepped from `from` towards `target` no faster
/// than `rate` (hundredths of % per second), each step read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ramp {
    pub command_id: u64,
    pub op: Operation,
    pub from: u16,
    pub target: u16,
    pub rate: u16,
    pub started_ms: u64,
    /// Written and read back so far.
    pub value: u16,
    /// When the next step is due.
    pub next_at: u64,
}

impl Ramp {
    /// Starts at `from` (read from the inverter) at `now`.
    pub(super) fn new(
        command_id: u64,
        op: Operation,
        from: u16,
        target: u16,
        rate: u16,
        now: u64,
    ) -> Self {
        let mut r =
            Ramp { command_id, op, from, target, rate, started_ms: now, value: from, next_at: now };
        r.next_at = r.next_step_after(now);
        r
    }

    /// Percent the line from `from` at `rate` has covered at `now`, whole.
    fn covered(&self, now: u64) -> u64 {
        u64::from(self.rate) * now.saturating_sub(self.started_ms) / 100_000
    }

    /// The value due at `now`: never ahead of the rate's line.
    pub(super) fn due(&self, now: u64) -> u16 {
        let span = u64::from(self.from.abs_diff(self.target));
        let moved = self.covered(now).min(span) as u16;
        if self.target >= self.from { self.from + moved } else { self.from - moved }
    }

    /// When the next whole percent is due after a step at `now` (at least
    /// [`RAMP_STEP_MS`] later).
    pub(super) fn next_step_after(&self, now: u64) -> u64 {
        let next = self.covered(now) + 1;
        let at = self.started_ms + (next * 100_000).div_ceil(u64::from(self.rate.max(1)));
        at.max(now + RAMP_STEP_MS)
    }
}
