//! What the cloud asks of the device: the config it runs (validated again
//! here, persisted, reported with any refused field) and the commands it
//! executes, each id at most once, with results kept until the server has them.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use ecowatt_proto::messages::{CommandResult, ConfigState, Rejection};

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
/// Before a command runs its id is written as *in flight*; a reboot that finds
/// an id in flight reports it failed ("interrupted") instead of running it
/// again: each id is executed at most once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Journal {
    done: VecDeque<u64>,
    pending: Vec<CommandResult>,
    in_flight: Option<u64>,
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
    /// Loads the journal; an id found in flight becomes a failed result.
    pub fn load(kv: &mut impl KeyValue, now_ms: u64) -> Result<Journal, KvError> {
        let mut j = Journal::default();
        if let Some(b) = kv.get(JOURNAL_KEY)? {
            j = Journal::decode(&b).unwrap_or_default();
        }
        if let Some(id) = j.in_flight.take() {
            j.remember(id);
            j.pending.push(CommandResult {
                command_id: id,
                succeeded: false,
                exception: None,
                value: None,
                executed_ms: now_ms,
            });
            j.save(kv)?;
        }
        Ok(j)
    }

    fn decode(b: &[u8]) -> Option<Journal> {
        let mut at = 0;
        let mut take = |n: usize| {
            let s = b.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let flight = u64::from_be_bytes(take(8)?.try_into().ok()?);
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
        Some(Journal { done, pending, in_flight: (flight != 0).then_some(flight) })
    }

    fn save(&self, kv: &mut impl KeyValue) -> Result<(), KvError> {
        let mut b = Vec::with_capacity(11 + 8 * self.done.len() + 21 * self.pending.len());
        b.extend_from_slice(&self.in_flight.unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&(self.done.len() as u16).to_be_bytes());
        for id in &self.done {
            b.extend_from_slice(&id.to_be_bytes());
        }
        b.push(self.pending.len().min(255) as u8);
        for r in self.pending.iter().take(255) {
            put_result(&mut b, r);
        }
        kv.set(JOURNAL_KEY, &b)
    }

    fn remember(&mut self, id: u64) {
        self.done.push_back(id);
        while self.done.len() > REMEMBERED {
            self.done.pop_front();
        }
    }

    /// Whether `id` may run now; if so it is recorded as in flight first.
    pub fn begin(&mut self, kv: &mut impl KeyValue, id: u64) -> Result<bool, KvError> {
        if self.done.contains(&id) || self.in_flight == Some(id) {
            return Ok(false);
        }
        self.in_flight = Some(id);
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
