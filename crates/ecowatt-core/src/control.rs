//! What the cloud asks of the device: the config it runs (validated again
//! here, persisted, reported with any refused field) and the commands it
//! executes, each id at most once, with results kept until the server has them.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use ecowatt_proto::messages::{CommandResult, ConfigState, Operation, Rejection};

use crate::kv::{KeyValue, KvError};

const CONFIG_KEY: &str = "cfg";
const JOURNAL_KEY: &str = "cmd.journal";
/// Ids remembered as executed, so a redelivery is not executed again.
pub const REMEMBERED: usize = 256;

/// The seed's defaults: poll every 5 s, upload every 900 s, every register.
pub const DEFAULT_CONFIG: ConfigState = ConfigState {
    version: 0,
    poll_interval_ms: 5_000,
    upload_interval_ms: 900_000,
    registers: 0x03FF,
};

/// Checks `desired` against the device's own limits. Fields out of range keep
/// their current value and are reported; the version is the one applied.
pub fn apply(current: &ConfigState, desired: &ConfigState) -> (ConfigState, Vec<Rejection>) {
    let mut next = ConfigState { version: desired.version, ..*current };
    let mut rejected = Vec::new();
    if (1_000..=3_600_000).contains(&desired.poll_interval_ms) {
        next.poll_interval_ms = desired.poll_interval_ms;
    } else {
        rejected.push(Rejection { field: 1, reason: 1 });
    }
    if (10_000..=86_400_000).contains(&desired.upload_interval_ms)
        && desired.upload_interval_ms >= next.poll_interval_ms
    {
        next.upload_interval_ms = desired.upload_interval_ms;
    } else {
        rejected.push(Rejection { field: 2, reason: 1 });
    }
    if desired.registers != 0 && desired.registers & !0x03FF == 0 {
        next.registers = desired.registers;
    } else {
        rejected.push(Rejection { field: 3, reason: 2 });
    }
    (next, rejected)
}

/// The persisted config (the defaults when none is stored).
pub fn load_config(kv: &mut impl KeyValue) -> Result<(ConfigState, Vec<Rejection>), KvError> {
    let Some(b) = kv.get(CONFIG_KEY)? else { return Ok((DEFAULT_CONFIG, Vec::new())) };
    if b.len() < 19 {
        return Ok((DEFAULT_CONFIG, Vec::new()));
    }
    let c = ConfigState {
        version: u64::from_be_bytes(b[0..8].try_into().expect("8")),
        poll_interval_ms: u32::from_be_bytes(b[8..12].try_into().expect("4")),
        upload_interval_ms: u32::from_be_bytes(b[12..16].try_into().expect("4")),
        registers: u16::from_be_bytes([b[16], b[17]]),
    };
    let n = usize::from(b[18]);
    let rejected =
        b[19..].chunks_exact(2).take(n).map(|r| Rejection { field: r[0], reason: r[1] }).collect();
    Ok((c, rejected))
}

/// Persists the applied config with its refusals.
pub fn store_config(
    kv: &mut impl KeyValue,
    c: &ConfigState,
    rejected: &[Rejection],
) -> Result<(), KvError> {
    let mut b = Vec::with_capacity(19 + 2 * rejected.len());
    b.extend_from_slice(&c.version.to_be_bytes());
    b.extend_from_slice(&c.poll_interval_ms.to_be_bytes());
    b.extend_from_slice(&c.upload_interval_ms.to_be_bytes());
    b.extend_from_slice(&c.registers.to_be_bytes());
    b.push(rejected.len() as u8);
    for r in rejected {
        b.extend_from_slice(&[r.field, r.reason]);
    }
    kv.set(CONFIG_KEY, &b)
}

/// Which commands ran, and the results the server has not confirmed yet.
///
/// Before a command runs, its id and operation are written as *in flight*. A
/// reboot that finds one in flight never runs it again (each id is executed
/// at most once); it is [`Journal::interrupted`], and the shell reads the
/// register back and reports what is true with [`Journal::resolve`]: a
/// write whose value the inverter holds succeeded, one it does not hold
/// failed (with the value read), and one that cannot be read back failed
/// with no value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Journal {
    done: VecDeque<u64>,
    pending: Vec<CommandResult>,
    in_flight: Option<(u64, Option<Operation>)>,
    /// Found in flight at load: run before the reboot, outcome unknown.
    interrupted: bool,
}

fn put_op(b: &mut Vec<u8>, op: &Operation) {
    let (kind, register, value) = match *op {
        Operation::Write { register, value } => (1u8, register, value),
        Operation::Read { register } => (2, register, 0),
    };
    b.push(kind);
    b.extend_from_slice(&register.to_be_bytes());
    b.extend_from_slice(&value.to_be_bytes());
}

fn get_op(b: &[u8]) -> Option<Operation> {
    let register = u16::from_be_bytes([*b.get(1)?, *b.get(2)?]);
    let value = u16::from_be_bytes([*b.get(3)?, *b.get(4)?]);
    match b.first()? {
        1 => Some(Operation::Write { register, value }),
        2 => Some(Operation::Read { register }),
        _ => None,
    }
}

fn put_result(b: &mut Vec<u8>, r: &CommandResult) {
    b.extend_from_slice(&r.command_id.to_be_bytes());
    b.push(u8::from(r.succeeded));
    b.push(r.exception.unwrap_or(0));
    b.push(u8::from(r.value.is_some()));
    b.extend_from_slice(&r.value.unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&r.executed_ms.to_be_bytes());
}

impl Journal {
    /// Loads the journal; a command found in flight is
    /// [`Journal::interrupted`] until resolved.
    pub fn load(kv: &mut impl KeyValue) -> Result<Journal, KvError> {
        let mut j = Journal::default();
        if let Some(b) = kv.get(JOURNAL_KEY)? {
            j = Journal::decode(&b).unwrap_or_default();
        }
        j.interrupted = j.in_flight.is_some();
        Ok(j)
    }

    /// The command a reboot cut short, and its operation (unknown when an
    /// older build wrote the journal): read the register, then [`Journal::resolve`].
    pub fn interrupted(&self) -> Option<(u64, Option<Operation>)> {
        self.in_flight.filter(|_| self.interrupted)
    }

    /// Records how the interrupted command ended, from `read_back` (the
    /// register's value now, if it could be read): its result goes to the
    /// server like any other, and the id is never run. Returns that result
    /// (none if no command was interrupted).
    pub fn resolve(
        &mut self,
        kv: &mut impl KeyValue,
        read_back: Option<u16>,
        now_ms: u64,
    ) -> Result<Option<CommandResult>, KvError> {
        let Some((id, op)) = self.interrupted() else { return Ok(None) };
        let succeeded = match op {
            Some(Operation::Write { value, .. }) => read_back == Some(value),
            Some(Operation::Read { .. }) => read_back.is_some(),
            None => false,
        };
        let value = if op.is_some() { read_back } else { None };
        self.interrupted = false;
        let result = CommandResult {
            command_id: id,
            succeeded,
            exception: None,
            value,
            executed_ms: now_ms,
        };
        self.finish(kv, result)?;
        Ok(Some(result))
    }

    fn decode(b: &[u8]) -> Option<Journal> {
        let mut at = 0;
        let mut take = |n: usize| {
            let s = b.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let flight_id = u64::from_be_bytes(take(8)?.try_into().ok()?);
        let n_done = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let mut done = VecDeque::new();
        for _ in 0..n_done {
            done.push_back(u64::from_be_bytes(take(8)?.try_into().ok()?));
        }
        let n_pending = take(1)?[0];
        let mut pending = Vec::new();
        for _ in 0..n_pending {
            let r = take(21)?;
            pending.push(CommandResult {
                command_id: u64::from_be_bytes(r[0..8].try_into().ok()?),
                succeeded: r[8] == 1,
                exception: (r[9] != 0).then_some(r[9]),
                value: (r[10] == 1).then(|| u16::from_be_bytes([r[11], r[12]])),
                executed_ms: u64::from_be_bytes(r[13..21].try_into().ok()?),
            });
        }
        // The in-flight command's operation follows (absent when written by an older build).
        let op = take(5).and_then(get_op);
        let in_flight = (flight_id != 0).then_some((flight_id, op));
        Some(Journal { done, pending, in_flight, interrupted: false })
    }

    fn save(&self, kv: &mut impl KeyValue) -> Result<(), KvError> {
        let mut b = Vec::with_capacity(16 + 8 * self.done.len() + 21 * self.pending.len());
        b.extend_from_slice(&self.in_flight.map_or(0, |(id, _)| id).to_be_bytes());
        b.extend_from_slice(&(self.done.len() as u16).to_be_bytes());
        for id in &self.done {
            b.extend_from_slice(&id.to_be_bytes());
        }
        b.push(self.pending.len().min(255) as u8);
        for r in self.pending.iter().take(255) {
            put_result(&mut b, r);
        }
        if let Some((_, Some(op))) = &self.in_flight {
            put_op(&mut b, op);
        }
        kv.set(JOURNAL_KEY, &b)
    }

    fn remember(&mut self, id: u64) {
        self.done.push_back(id);
        while self.done.len() > REMEMBERED {
            self.done.pop_front();
        }
    }

    /// Whether command `id` may run `op` now; if so it is recorded as in
    /// flight first. (An interrupted command not resolved yet is resolved as
    /// unknown first: failed, no value.)
    pub fn begin(
        &mut self,
        kv: &mut impl KeyValue,
        id: u64,
        op: Operation,
    ) -> Result<bool, KvError> {
        if self.done.contains(&id) || self.in_flight.is_some_and(|(f, _)| f == id) {
            return Ok(false);
        }
        if self.interrupted {
            // Never read back: its outcome and time are unknown.
            if let Some((_, op)) = self.in_flight.as_mut() {
                *op = None;
            }
            let _unknown = self.resolve(kv, None, 0)?;
        }
        self.in_flight = Some((id, Some(op)));
        self.save(kv)?;
        Ok(true)
    }

    /// Records how the command in flight went.
    pub fn finish(&mut self, kv: &mut impl KeyValue, result: CommandResult) -> Result<(), KvError> {
        self.in_flight = None;
        self.remember(result.command_id);
        self.pending.push(result);
        self.save(kv)
    }

    /// Results to report (at most 32 per sync).
    pub fn results(&self) -> Vec<CommandResult> {
        self.pending.iter().take(32).copied().collect()
    }

    /// The server has recorded these results.
    pub fn acknowledged(
        &mut self,
        kv: &mut impl KeyValue,
        reported: &[CommandResult],
    ) -> Result<(), KvError> {
        let before = self.pending.len();
        self.pending.retain(|p| !reported.iter().any(|r| r.command_id == p.command_id));
        if self.pending.len() != before { self.save(kv) } else { Ok(()) }
    }
}
