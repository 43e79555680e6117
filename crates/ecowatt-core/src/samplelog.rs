//! The sample log: readings wait here, in RAM and in the key-value store,
//! until the server acknowledges them.
//!
//! - Each sample is one key (`log.s.<seq mod capacity>`) written in one atomic
//!   `set`: a power cut at any write loses at most the sample being written.
//! - `seq` never repeats and has no gaps of its own making: a slot keeps its
//!   sample until a newer one overwrites it, so the newest `seq` written is
//!   always found again after a reboot, and the next one follows it. (A `seq`
//!   whose write failed was never stored nor sent, so it is free to use.)
//! - Bounded: a sample `capacity` or more behind the newest is overwritten.
//!   That is the overflow policy (oldest dropped), and every drop is counted
//!   in `dropped_total`, which uploads report to the server.
//! - Samples leave only by [`SampleLog::ack`], with the `seq` the server stored
//!   (or [`SampleLog::discard`], counted as dropped, when the server refuses them).
//! - The capacity may change between boots. The slots live in a
//!   *generation* of keys (`log.s.<slot>` for the first, `log.<g>.s.<slot>`
//!   after), recorded with its capacity in `log.layout`. A new capacity
//!   copies the waiting samples (the newest that fit; the others counted as
//!   dropped) into the next generation, then switches `log.layout` in one
//!   write, then removes the old generation: a power cut anywhere in between
//!   finds one complete generation, and no `seq` is given twice.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ecowatt_proto::codec::Sample;

use crate::kv::{KeyValue, KvError};

const ACKED_KEY: &str = "log.acked";
const DROPPED_KEY: &str = "log.dropped";
const LAYOUT_KEY: &str = "log.layout";

fn slot_key(generation: u64, slot: u64) -> String {
    if generation == 0 { format!("log.s.{slot}") } else { format!("log.{generation}.s.{slot}") }
}

/// Where the slots are: `log.layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    capacity: u64,
    generation: u64,
    /// The dropped count as of the switch to this generation (the samples
    /// that did not fit are counted in the same write that switches).
    dropped: u64,
    /// A generation to remove (capacity, generation), left by a power cut.
    old: Option<(u64, u64)>,
}

impl Layout {
    fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        let (old_cap, old_gen) = self.old.unwrap_or((0, 0));
        for (i, v) in
            [self.capacity, self.generation, self.dropped, old_cap, old_gen].iter().enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Layout> {
        let v = |i: usize| Some(u64::from_be_bytes(b.get(i * 8..i * 8 + 8)?.try_into().ok()?));
        if b.len() != 40 {
            return None;
        }
        let old_cap = v(3)?;
        Some(Layout {
            capacity: v(0)?.max(1),
            generation: v(1)?,
            dropped: v(2)?,
            old: (old_cap > 0).then_some((old_cap, v(4)?)),
        })
    }
}

/// A stored sample: the registers it holds (mask) and their values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The sample.
    pub sample: Sample,
    /// Bit `i` set: register `i` is in `sample.values`, in address order.
    pub registers: u16,
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + 2 * e.sample.values.len());
    out.extend_from_slice(&e.sample.seq.to_be_bytes());
    out.extend_from_slice(&e.sample.unix_ms.to_be_bytes());
    out.extend_from_slice(&e.registers.to_be_bytes());
    for v in &e.sample.values {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

fn decode_entry(b: &[u8]) -> Option<Entry> {
    if b.len() < 18 || (b.len() - 18) % 2 != 0 {
        return None;
    }
    let registers = u16::from_be_bytes([b[16], b[17]]);
    let values: Vec<u16> =
        b[18..].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    if values.len() != registers.count_ones() as usize {
        return None;
    }
    Some(Entry {
        sample: Sample {
            seq: u64::from_be_bytes(b[0..8].try_into().ok()?),
            unix_ms: u64::from_be_bytes(b[8..16].try_into().ok()?),
            values,
        },
        registers,
    })
}

fn read_u64(kv: &mut impl KeyValue, key: &str) -> Result<u64, KvError> {
    Ok(match kv.get(key)? {
        Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().expect("8 bytes")),
        _ => 0,
    })
}

/// The log.
#[derive(Debug)]
pub struct SampleLog {
    capacity: u64,
    generation: u64,
    pending: VecDeque<Entry>,
    next_seq: u64,
    acked: u64,
    dropped: u64,
}

impl SampleLog {
    /// Opens the log after a (re)boot: every unacknowledged sample is back,
    /// in order, also when `capacity` differs from the last boot's (see the
    /// module documentation).
    pub fn open(kv: &mut impl KeyValue, capacity: u64) -> Result<SampleLog, KvError> {
        let capacity = capacity.max(1);
        let acked = read_u64(kv, ACKED_KEY)?;
        let recorded = kv.get(LAYOUT_KEY)?.as_deref().and_then(Layout::decode);
        let mut layout = match recorded {
            Some(l) => l,
            // Before layouts were recorded: the first generation, whose
            // capacity may have been another; its slots run on as far as it
            // did, and each entry carries its own `seq`.
            None => {
                let mut old = capacity;
                while kv.get(&slot_key(0, old))?.is_some_and(|v| !v.is_empty()) {
                    old += 1;
                }
                Layout { capacity: old, generation: 0, dropped: 0, old: None }
            }
        };
        let mut dropped = read_u64(kv, DROPPED_KEY)?.max(layout.dropped);
        if let Some((cap, generation)) = layout.old {
            for slot in 0..cap {
                kv.remove(&slot_key(generation, slot))?;
            }
            layout.old = None;
            kv.set(LAYOUT_KEY, &layout.encode())?;
        }
        let mut pending: Vec<Entry> = Vec::new();
        let mut newest = acked;
        for slot in 0..layout.capacity {
            let Some(e) =
                kv.get(&slot_key(layout.generation, slot))?.and_then(|b| decode_entry(&b))
            else {
                continue;
            };
            // A recorded layout's slots hold their own `seq`s only.
            if recorded.is_some() && e.sample.seq % layout.capacity != slot {
                continue;
            }
            newest = newest.max(e.sample.seq);
            if e.sample.seq > acked {
                pending.push(e);
            }
        }
        pending.sort_by_key(|e| e.sample.seq);
        pending.dedup_by_key(|e| e.sample.seq);
        if recorded.is_none() && layout.capacity == capacity {
            kv.set(LAYOUT_KEY, &Layout { capacity, ..layout }.encode())?;
        } else if recorded.is_none() || layout.capacity != capacity {
            // A new capacity: the newest samples that fit go to the next
            // generation; the rest are dropped, counted in the switch itself.
            let extra = pending.len().saturating_sub(capacity as usize);
            pending.drain(..extra);
            let next = layout.generation + 1;
            for e in &pending {
                kv.set(&slot_key(next, e.sample.seq % capacity), &encode_entry(e))?;
            }
            dropped += extra as u64;
            let switched = Layout {
                capacity,
                generation: next,
                dropped,
                old: Some((layout.capacity, layout.generation)),
            };
            kv.set(LAYOUT_KEY, &switched.encode())?;
            kv.set(DROPPED_KEY, &dropped.to_be_bytes())?;
            for slot in 0..layout.capacity {
                kv.remove(&slot_key(layout.generation, slot))?;
            }
            layout = Layout { old: None, ..switched };
            kv.set(LAYOUT_KEY, &layout.encode())?;
        }
        Ok(SampleLog {
            capacity,
            generation: layout.generation,
            pending: pending.into(),
            next_seq: newest + 1,
            acked,
            dropped,
        })
    }

    /// Appends a reading; returns its `seq`. On error nothing was stored and
    /// no `seq` that was handed out before is reused later.
    pub fn append(
        &mut self,
        kv: &mut impl KeyValue,
        unix_ms: u64,
        registers: u16,
        values: Vec<u16>,
    ) -> Result<u64, KvError> {
        let seq = self.next_seq;
        let entry = Entry { sample: Sample { seq, unix_ms, values }, registers };
        // Samples `capacity` or more behind are dropped (their slots get reused);
        // `pending` is in `seq` order, so they are at its front.
        let overwritten =
            self.pending.iter().take_while(|e| e.sample.seq + self.capacity <= seq).count();
        if overwritten > 0 {
            kv.set(DROPPED_KEY, &(self.dropped + overwritten as u64).to_be_bytes())?;
            self.dropped += overwritten as u64;
            self.pending.drain(..overwritten);
        }
        kv.set(&slot_key(self.generation, seq % self.capacity), &encode_entry(&entry))?;
        self.next_seq += 1;
        self.pending.push_back(entry);
        Ok(seq)
    }

    /// The newest sample kept, with its register mask.
    pub fn newest(&self) -> Option<(u16, &Sample)> {
        self.pending.back().map(|e| (e.registers, &e.sample))
    }

    /// Up to `max` of the oldest unacknowledged samples that share one register
    /// mask, oldest first.
    pub fn batch(&self, max: usize) -> (u16, Vec<Sample>) {
        let Some(first) = self.pending.front() else { return (0, Vec::new()) };
        let mask = first.registers;
        let samples = self
            .pending
            .iter()
            .take(max)
            .take_while(|e| e.registers == mask)
            .map(|e| e.sample.clone())
            .collect();
        (mask, samples)
    }

    /// Forgets every sample up to `seq` (the server stored them).
    pub fn ack(&mut self, kv: &mut impl KeyValue, seq: u64) -> Result<(), KvError> {
        if seq <= self.acked {
            return Ok(());
        }
        kv.set(ACKED_KEY, &seq.to_be_bytes())?;
        self.acked = seq;
        while self.pending.front().is_some_and(|e| e.sample.seq <= seq) {
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Gives up the samples up to `seq` that the server will never take
    /// (stamped outside the times it keeps): they leave the log counted as
    /// dropped, and the count reaches the server with the next upload. The
    /// count is written first: a power cut between the two writes counts
    /// them twice, never hides them. Returns how many left.
    pub fn discard(&mut self, kv: &mut impl KeyValue, seq: u64) -> Result<u64, KvError> {
        let n = self.pending.iter().take_while(|e| e.sample.seq <= seq).count() as u64;
        if n > 0 {
            kv.set(DROPPED_KEY, &(self.dropped + n).to_be_bytes())?;
            self.dropped += n;
        }
        self.ack(kv, seq)?;
        Ok(n)
    }

    /// Samples waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Samples dropped by the overflow policy, ever.
    pub fn dropped_total(&self) -> u64 {
        self.dropped
    }

    /// Highest `seq` acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The `seq` the next sample will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
