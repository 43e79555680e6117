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
//! - Samples leave only by [`SampleLog::ack`], with the `seq` the server stored.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ecowatt_proto::codec::Sample;

use crate::kv::{KeyValue, KvError};

const ACKED_KEY: &str = "log.acked";
const DROPPED_KEY: &str = "log.dropped";

fn slot_key(slot: u64) -> String {
    format!("log.s.{slot}")
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
    pending: VecDeque<Entry>,
    next_seq: u64,
    acked: u64,
    dropped: u64,
}

impl SampleLog {
    /// Opens the log after a (re)boot: every unacknowledged sample is back, in order.
    pub fn open(kv: &mut impl KeyValue, capacity: u64) -> Result<SampleLog, KvError> {
        let capacity = capacity.max(1);
        let acked = read_u64(kv, ACKED_KEY)?;
        let dropped = read_u64(kv, DROPPED_KEY)?;
        let mut pending: Vec<Entry> = Vec::new();
        let mut newest = acked;
        for slot in 0..capacity {
            if let Some(bytes) = kv.get(&slot_key(slot))? {
                match decode_entry(&bytes) {
                    Some(e) if e.sample.seq % capacity == slot => {
                        newest = newest.max(e.sample.seq);
                        if e.sample.seq > acked {
                            pending.push(e);
                        }
                    }
                    _ => {}
                }
            }
        }
        pending.sort_by_key(|e| e.sample.seq);
        Ok(SampleLog { capacity, pending: pending.into(), next_seq: newest + 1, acked, dropped })
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
        kv.set(&slot_key(seq % self.capacity), &encode_entry(&entry))?;
        self.next_seq += 1;
        self.pending.push_back(entry);
        Ok(seq)
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
