//! Bodies of device protocol v1 messages, carried inside sealed envelopes.
//! Big-endian integers, counts as one byte, strings as a length byte and
//! UTF-8; every decoder checks every length and refuses trailing bytes.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::firmware::{Manifest, Version};

/// Message types (the envelope's type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Device -> server: reported state, results; asks for config and commands.
    SyncRequest = 0x01,
    /// Server -> device: config, commands.
    SyncResponse = 0x02,
    /// Device -> server: a batch of samples.
    TelemetryUpload = 0x03,
    /// Server -> device: samples stored.
    TelemetryAck = 0x04,
    /// Server -> device: the request was authentic but could not be served.
    Error = 0x7F,
}

impl MessageType {
    /// Parses a type byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(MessageType::SyncRequest),
            0x02 => Some(MessageType::SyncResponse),
            0x03 => Some(MessageType::TelemetryUpload),
            0x04 => Some(MessageType::TelemetryAck),
            0x7F => Some(MessageType::Error),
            _ => None,
        }
    }

    /// The type an answer to this request has.
    pub fn answer(self) -> Option<MessageType> {
        match self {
            MessageType::SyncRequest => Some(MessageType::SyncResponse),
            MessageType::TelemetryUpload => Some(MessageType::TelemetryAck),
            _ => None,
        }
    }
}

/// Why a message body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The body ends before a field.
    Truncated {
        /// Offset of the field.
        at: usize,
    },
    /// Bytes left after the last field.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A list longer than the protocol allows.
    TooMany {
        /// The list.
        field: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A field whose value is not allowed.
    BadValue {
        /// The field.
        field: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { at } => write!(f, "body ends at byte {at}, before a field"),
            DecodeError::TrailingBytes { count } => write!(f, "{count} bytes after the last field"),
            DecodeError::TooMany { field, count, max } => {
                write!(f, "{field}: {count} entries, at most {max}")
            }
            DecodeError::BadValue { field } => write!(f, "{field}: value not allowed"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Most command results in one sync request.
pub const MAX_RESULTS: usize = 32;
/// Most commands in one sync response.
pub const MAX_COMMANDS: usize = 32;
/// Most rejected config fields reported at once.
pub const MAX_REJECTED: usize = 8;
/// Longest firmware version string, bytes.
pub const MAX_FIRMWARE_LEN: usize = 32;
/// Largest telemetry batch, bytes.
pub const MAX_BATCH_LEN: usize = 60_000;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(DecodeError::Truncated { at: self.at })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn count(&mut self, field: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > max { Err(DecodeError::TooMany { field, count: n, max }) } else { Ok(n) }
    }
    fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A complete device configuration with its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigState {
    /// Version (from 1).
    pub version: u64,
    /// Poll interval, ms.
    pub poll_interval_ms: u32,
    /// Upload interval, ms.
    pub upload_interval_ms: u32,
    /// Bit `i` set: register `i` is sampled (bits 10..16 must be clear).
    pub registers: u16,
}

impl ConfigState {
    fn put(&self, out: &mut Vec<u8>) {
        put_u64(out, self.version);
        put_u32(out, self.poll_interval_ms);
        put_u32(out, self.upload_interval_ms);
        put_u16(out, self.registers);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let c = ConfigState {
            version: r.u64()?,
            poll_interval_ms: r.u32()?,
            upload_interval_ms: r.u32()?,
            registers: r.u16()?,
        };
        if c.registers & !0x03FF != 0 {
            return Err(DecodeError::BadValue { field: "registers" });
        }
        Ok(c)
    }
}

/// A config field the device refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// 1 poll interval, 2 upload interval, 3 registers.
    pub field: u8,
    /// 1 out of range, 2 unsupported, 3 other.
    pub reason: u8,
}

/// How a command went on the inverter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandResult {
    /// The command's id.
    pub command_id: u64,
    /// Whether it succeeded (for writes: echoed and read back equal).
    pub succeeded: bool,
    /// Modbus exception code, if the inverter refused.
    pub exception: Option<u8>,
    /// The register's value read back (or read).
    pub value: Option<u16>,
    /// When it was executed, Unix ms (0: unknown).
    pub executed_ms: u64,
}

/// Device -> server: what the device runs and what it did; asks what to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncRequest {
    /// How long the server may hold the request open for news (long poll), ms.
    pub wait_ms: u32,
    /// The config the device runs.
    pub applied: Option<ConfigState>,
    /// Fields of the latest config it refused.
    pub rejected: Vec<Rejection>,
    /// Results of commands executed since the last acknowledged sync.
    pub results: Vec<CommandResult>,
    /// The firmware version it runs.
    pub firmware: String,
    /// How its latest firmware update is going, if one is under way or just ended.
    pub ota: Option<OtaReport>,
    /// What the device holds of the export-limit control (a device that
    /// enforces leases always sends it; an older one never does).
    pub control: Option<ControlReport>,
    /// The schedule it runs (protocol 1.2; only after a `control` report).
    pub schedule: Option<ScheduleReport>,
    /// The telemetry codecs the device can encode, a [`codec`](crate::codec)
    /// bit set (bit `v` = version `v`); none from a device of protocol ≤ 1.2,
    /// which encodes v1 only.
    pub codecs: Option<u8>,
    /// The firmware delivery forms the device takes besides clear images
    /// (protocol 1.4, [`DELIVERY_EXTENSION`]): [`DELIVERY_ENCRYPTED`].
    pub delivery: Option<u8>,
}

/// Where a firmware update stands on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OtaState {
    /// Writing the image into the inactive slot.
    Downloading = 1,
    /// Checking the written image against the manifest's SHA-256.
    Verifying = 2,
    /// Marking the new slot pending and restarting into it.
    Installing = 3,
    /// Running the new image on trial, before its health check.
    Trial = 4,
    /// The new image passed its health check and is confirmed.
    Succeeded = 5,
    /// Refused or failed before any slot switch (see the reason).
    Failed = 6,
    /// The new image did not confirm itself; the old one runs again.
    RolledBack = 7,
}

impl OtaState {
    /// Parses a state byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => OtaState::Downloading,
            2 => OtaState::Verifying,
            3 => OtaState::Installing,
            4 => OtaState::Trial,
            5 => OtaState::Succeeded,
            6 => OtaState::Failed,
            7 => OtaState::RolledBack,
            _ => return None,
        })
    }

    /// Its name in the operator API.
    pub fn name(self) -> &'static str {
        match self {
            OtaState::Downloading => "downloading",
            OtaState::Verifying => "verifying",
            OtaState::Installing => "installing",
            OtaState::Trial => "trial",
            OtaState::Succeeded => "succeeded",
            OtaState::Failed => "failed",
            OtaState::RolledBack => "rolled_back",
        }
    }
}

/// Why an update failed or rolled back (0 in a report: no reason).
pub mod ota_reason {
    /// The manifest's signature does not verify against the device's keys.
    pub const BAD_SIGNATURE: u8 = 1;
    /// Not newer than the running version.
    pub const DOWNGRADE: u8 = 2;
    /// Security counter below the device's own.
    pub const SECURITY_COUNTER: u8 = 3;
    /// Built for other hardware.
    pub const WRONG_TARGET: u8 = 4;
    /// The downloaded image does not match the manifest.
    pub const HASH_MISMATCH: u8 = 5;
    /// The image could not be downloaded.
    pub const DOWNLOAD_FAILED: u8 = 6;
    /// Writing the slot failed.
    pub const FLASH: u8 = 7;
    /// The new image did not reach the cloud within its health-check bound.
    pub const HEALTH_CHECK: u8 = 8;
    /// The device has no key to check signatures with.
    pub const NO_TRUSTED_KEY: u8 = 9;
    /// The device's own storage failed.
    pub const STORAGE: u8 = 10;
    /// A chunk of an image delivered encrypted failed authentication (altered,
    /// or encrypted for another device).
    pub const DECRYPT_FAILED: u8 = 11;
    /// Highest code defined.
    pub const MAX: u8 = 11;

    /// Its name in the operator API.
    pub fn name(code: u8) -> &'static str {
        match code {
            BAD_SIGNATURE => "bad_signature",
            DOWNGRADE => "downgrade",
            SECURITY_COUNTER => "security_counter",
            WRONG_TARGET => "wrong_target",
            HASH_MISMATCH => "hash_mismatch",
            DOWNLOAD_FAILED => "download_failed",
            FLASH => "flash_error",
            HEALTH_CHECK => "health_check_failed",
            NO_TRUSTED_KEY => "no_trusted_key",
            STORAGE => "storage_error",
            DECRYPT_FAILED => "decrypt_failed",
            _ => "",
        }
    }
}

/// Device -> server: the state of the update to `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaReport {
    /// Where it stands.
    pub state: OtaState,
    /// The version being installed.
    pub version: String,
    /// Bytes written to the slot so far.
    pub done: u64,
    /// Image size.
    pub total: u64,
    /// Why it failed or rolled back (an [`ota_reason`] code; 0: none).
    pub reason: u8,
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let b = &s.as_bytes()[..s.len().min(max)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn get_str(r: &mut Reader<'_>, field: &'static str, max: usize) -> Result<String, DecodeError> {
    let n = r.count(field, max)?;
    let s = core::str::from_utf8(r.take(n)?).map_err(|_| DecodeError::BadValue { field })?;
    Ok(String::from(s))
}

impl SyncRequest {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 28 * self.results.len());
        put_u32(&mut out, self.wait_ms);
        out.push(u8::from(self.applied.is_some()));
        if let Some(c) = &self.applied {
            c.put(&mut out);
        }
        out.push(self.rejected.len().min(MAX_REJECTED) as u8);
        for r in self.rejected.iter().take(MAX_REJECTED) {
            out.extend_from_slice(&[r.field, r.reason]);
        }
        out.push(self.results.len().min(MAX_RESULTS) as u8);
        for r in self.results.iter().take(MAX_RESULTS) {
            put_u64(&mut out, r.command_id);
            out.push(if r.succeeded { 1 } else { 2 });
            out.push(r.exception.unwrap_or(0));
            out.push(u8::from(r.value.is_some()));
            put_u16(&mut out, r.value.unwrap_or(0));
            put_u64(&mut out, r.executed_ms);
        }
        put_str(&mut out, &self.firmware, MAX_FIRMWARE_LEN);
        match &self.ota {
            None => out.push(0),
            Some(o) => {
                out.push(1);
                out.push(o.state as u8);
                put_str(&mut out, &o.version, MAX_FIRMWARE_LEN);
                put_u64(&mut out, o.done);
                put_u64(&mut out, o.total);
                out.push(o.reason);
            }
        }
        let codecs = self.codecs.is_some() || self.delivery.is_some();
        if self.control.is_some() || self.schedule.is_some() || codecs {
            self.control.clone().unwrap_or_default().put(&mut out);
        }
        if self.schedule.is_some() || codecs {
            self.schedule.unwrap_or_default().put(&mut out);
        }
        if codecs {
            // A device that states no codecs encodes v1 only.
            out.extend_from_slice(&[CODEC_EXTENSION, self.codecs.unwrap_or(1 << 1)]);
        }
        if let Some(d) = self.delivery {
            out.extend_from_slice(&[DELIVERY_EXTENSION, d]);
        }
        out
    }

    /// Decodes a body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let wait_ms = r.u32()?;
        let applied = match r.u8()? {
            0 => None,
            1 => Some(ConfigState::get(&mut r)?),
            _ => return Err(DecodeError::BadValue { field: "flags" }),
        };
        let n = r.count("rejected", MAX_REJECTED)?;
        let mut rejected = Vec::with_capacity(n);
        for _ in 0..n {
            let field = r.u8()?;
            let reason = r.u8()?;
            if !(1..=3).contains(&field) || !(1..=3).contains(&reason) {
                return Err(DecodeError::BadValue { field: "rejected" });
            }
            rejected.push(Rejection { field, reason });
        }
        let n = r.count("results", MAX_RESULTS)?;
        let mut results = Vec::with_capacity(n);
        for _ in 0..n {
            let command_id = r.u64()?;
            let succeeded = match r.u8()? {
                1 => true,
                2 => false,
                _ => return Err(DecodeError::BadValue { field: "outcome" }),
            };
            let exception = match r.u8()? {
                0 => None,
                e => Some(e),
            };
            let has_value = r.u8()?;
            let value = r.u16()?;
            // One encoding per value: no stray value bytes without the flag.
            let value = match (has_value, value) {
                (0, 0) => None,
                (1, v) => Some(v),
                _ => return Err(DecodeError::BadValue { field: "has_value" }),
            };
            results.push(CommandResult {
                command_id,
                succeeded,
                exception,
                value,
                executed_ms: r.u64()?,
            });
        }
        let firmware = get_str(&mut r, "firmware", MAX_FIRMWARE_LEN)?;
        let ota = match r.u8()? {
            0 => None,
            1 => {
                let state = OtaState::from_byte(r.u8()?)
                    .ok_or(DecodeError::BadValue { field: "ota_state" })?;
                let version = get_str(&mut r, "ota_version", MAX_FIRMWARE_LEN)?;
                let done = r.u64()?;
                let total = r.u64()?;
                let reason = r.u8()?;
                if done > total || reason > ota_reason::MAX {
                    return Err(DecodeError::BadValue { field: "ota" });
                }
                Some(OtaReport { state, version, done, total, reason })
            }
            _ => return Err(DecodeError::BadValue { field: "ota_flag" }),
        };
        let control = if r.at < r.bytes.len() { Some(ControlReport::get(&mut r)?) } else { None };
        let schedule = if r.at < r.bytes.len() { Some(ScheduleReport::get(&mut r)?) } else { None };
        let codecs = if r.at < r.bytes.len() { Some(get_codecs(&mut r)?) } else { None };
        let delivery = if r.at < r.bytes.len() {
            Some(get_extension(&mut r, DELIVERY_EXTENSION, "delivery", |d| {
                d == DELIVERY_ENCRYPTED
            })?)
        } else {
            None
        };
        r.finish()?;
        Ok(SyncRequest {
            wait_ms,
            applied,
            rejected,
            results,
            firmware,
            ota,
            control,
            schedule,
            codecs,
            delivery,
        })
    }
}

/// The delivery extension (protocol 1.4): encrypted firmware delivery
/// ([`crate::delivery`]). It rides after the codec extension (a request or
/// answer with it carries control, schedule and codec blocks; a device that
/// states no codecs sends v1 only): `ext u8 = 4, value u8`. In a request the
/// value is the delivery forms the device takes ([`DELIVERY_ENCRYPTED`]); in
/// an answer, present only with an offer delivered encrypted and only to a
/// device that takes it, the chunk size's power of two
/// ([`crate::delivery::MIN_CHUNK_LOG2`]..=[`crate::delivery::MAX_CHUNK_LOG2`]).
pub const DELIVERY_EXTENSION: u8 = 4;
/// The device decrypts images delivered in sealed chunks.
pub const DELIVERY_ENCRYPTED: u8 = 1;

fn get_extension(
    r: &mut Reader<'_>,
    ext: u8,
    field: &'static str,
    valid: impl Fn(u8) -> bool,
) -> Result<u8, DecodeError> {
    if r.u8()? != ext {
        return Err(DecodeError::BadValue { field: "extension" });
    }
    match r.u8()? {
        v if valid(v) => Ok(v),
        _ => Err(DecodeError::BadValue { field }),
    }
}

/// The codec extension (protocol 1.3): telemetry codec negotiation. It rides
/// after the schedule extension (a request or answer with it carries control
/// and schedule blocks, empty if need be): `ext u8 = 3, codecs u8`, a bit set
/// (bit `v` = codec version `v`; bit 0 clear, not empty). A device states
/// what it can encode, the server answers with what it accepts, only to a
/// device that asked; the device then uploads with the newest version both
/// name, and with v1 until it has heard.
pub const CODEC_EXTENSION: u8 = 3;

fn get_codecs(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    get_extension(r, CODEC_EXTENSION, "codecs", |c| c != 0 && c & 1 == 0)
}

/// The export-limit control extension (protocol 1.1): leased limits and the
/// fail-safe. It rides after the last field of a sync request or answer,
/// introduced by [`CONTROL_EXTENSION`]; a decoder of 1.0 refuses the trailing
/// bytes, so a server sends [`ControlOrders`] only to a device whose request
/// carried a [`ControlReport`].
pub const CONTROL_EXTENSION: u8 = 1;

/// Values of a fail-safe limit on the wire besides 0..=100 %.
pub mod failsafe {
    /// No fail-safe configured: a lease cannot be held.
    pub const UNSET: u16 = 0xFFFE;
    /// Configured as "no change": the limit in force stays when a lease lapses.
    pub const HOLD: u16 = 0xFFFF;
    /// Whether `v` is a valid fail-safe value.
    pub fn valid(v: u16) -> bool {
        v <= 100 || v == UNSET || v == HOLD
    }
}

/// Most episodes one request reports.
pub const MAX_EPISODES: usize = 8;

/// A leased limit the device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    /// The command that set it.
    pub command_id: u64,
    /// The limit, % of rated power.
    pub value: u16,
    /// The lease ran out: the fail-safe is in force until the server is heard again.
    pub lapsed: bool,
}

/// The fastest ramp, hundredths of a percent per second (100 %/s).
pub const MAX_RAMP_CENTI: u16 = 10_000;

/// A ramp under way: the export limit stepped towards a command's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RampState {
    /// The command.
    pub command_id: u64,
    /// The limit written and read back so far, %.
    pub value: u16,
    /// Where it goes, %.
    pub target: u16,
}

/// What happened to a lease while nobody was looking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EpisodeKind {
    /// The lease ran out (or a restart found it run out): the fail-safe was applied.
    FailSafe = 1,
    /// The server was heard again: the leased limit was applied again.
    Resumed = 2,
}

/// How an episode's register write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EpisodeOutcome {
    /// Written and read back equal.
    Confirmed = 1,
    /// The inverter refused, could not be reached, or read back another value.
    Failed = 2,
    /// Nothing written: the fail-safe is "no change".
    Held = 3,
}

/// One lease episode, reported until a sync answer acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    /// What happened.
    pub kind: EpisodeKind,
    /// The lease's command.
    pub command_id: u64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// The limit meant (the fail-safe, or the leased limit; 0 when [`EpisodeOutcome::Held`]).
    pub value: u16,
    /// How the write went.
    pub outcome: EpisodeOutcome,
}

/// Device -> server: the control state (extension of [`SyncRequest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlReport {
    /// The fail-safe it applies when a lease lapses (a [`failsafe`] value).
    pub failsafe: u16,
    /// The leased limit it holds.
    pub lease: Option<LeaseState>,
    /// The ramp under way.
    pub ramp: Option<RampState>,
    /// Episodes not acknowledged yet, oldest first.
    pub episodes: Vec<Episode>,
}

impl ControlReport {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(CONTROL_EXTENSION);
        put_u16(out, self.failsafe);
        match &self.lease {
            None => out.push(0),
            Some(l) => {
                out.push(if l.lapsed { 2 } else { 1 });
                put_u64(out, l.command_id);
                put_u16(out, l.value);
            }
        }
        match &self.ramp {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                put_u64(out, r.command_id);
                put_u16(out, r.value);
                put_u16(out, r.target);
            }
        }
        out.push(self.episodes.len().min(MAX_EPISODES) as u8);
        for e in self.episodes.iter().take(MAX_EPISODES) {
            out.push(e.kind as u8);
            put_u64(out, e.command_id);
            put_u64(out, e.at_ms);
            put_u16(out, e.value);
            out.push(e.outcome as u8);
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8()? != CONTROL_EXTENSION {
            return Err(DecodeError::BadValue { field: "extension" });
        }
        let failsafe = r.u16()?;
        if !failsafe::valid(failsafe) {
            return Err(DecodeError::BadValue { field: "failsafe" });
        }
        let lease = match r.u8()? {
            0 => None,
            s @ (1 | 2) => {
                let command_id = r.u64()?;
                let value = r.u16()?;
                if value > 100 {
                    return Err(DecodeError::BadValue { field: "lease_value" });
                }
                Some(LeaseState { command_id, value, lapsed: s == 2 })
            }
            _ => return Err(DecodeError::BadValue { field: "lease_state" }),
        };
        let ramp = match r.u8()? {
            0 => None,
            1 => {
                let command_id = r.u64()?;
                let value = r.u16()?;
                let target = r.u16()?;
                if value > 100 || target > 100 {
                    return Err(DecodeError::BadValue { field: "ramp" });
                }
                Some(RampState { command_id, value, target })
            }
            _ => return Err(DecodeError::BadValue { field: "ramp_flag" }),
        };
        let n = r.count("episodes", MAX_EPISODES)?;
        let mut episodes = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = match r.u8()? {
                1 => EpisodeKind::FailSafe,
                2 => EpisodeKind::Resumed,
                _ => return Err(DecodeError::BadValue { field: "episode_kind" }),
            };
            let command_id = r.u64()?;
            let at_ms = r.u64()?;
            let value = r.u16()?;
            let outcome = match r.u8()? {
                1 => EpisodeOutcome::Confirmed,
                2 => EpisodeOutcome::Failed,
                3 => EpisodeOutcome::Held,
                _ => return Err(DecodeError::BadValue { field: "episode_outcome" }),
            };
            episodes.push(Episode { kind, command_id, at_ms, value, outcome });
        }
        Ok(ControlReport { failsafe, lease, ramp, episodes })
    }
}

/// How a command's export limit is held and reached: under a lease (the
/// device holds the limit while it hears from the server, and applies its
/// fail-safe after `lease_ms` of silence) and at a ramp rate (the register
/// stepped so power changes no faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandControl {
    /// The command (one of the answer's commands, a write of the export limit).
    pub command_id: u64,
    /// How long the limit outlives the last answer heard, ms (0: not leased).
    pub lease_ms: u32,
    /// Ramp rate, hundredths of a percent of rated power per second (0: at once).
    pub ramp_centi_pct_per_s: u16,
}

/// Server -> device: the control extension of [`SyncResponse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlOrders {
    /// The fail-safe to apply from now on (a [`failsafe`] value), when it
    /// differs from the one the device reported.
    pub failsafe: Option<u16>,
    /// Leases and ramps of the answer's commands (a command without an
    /// entry is neither leased nor ramped).
    pub commands: Vec<CommandControl>,
}

impl ControlOrders {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(CONTROL_EXTENSION);
        match self.failsafe {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                put_u16(out, v);
            }
        }
        out.push(self.commands.len().min(MAX_COMMANDS) as u8);
        for c in self.commands.iter().take(MAX_COMMANDS) {
            put_u64(out, c.command_id);
            put_u32(out, c.lease_ms);
            put_u16(out, c.ramp_centi_pct_per_s);
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8()? != CONTROL_EXTENSION {
            return Err(DecodeError::BadValue { field: "extension" });
        }
        let failsafe = match r.u8()? {
            0 => None,
            1 => {
                let v = r.u16()?;
                if !failsafe::valid(v) {
                    return Err(DecodeError::BadValue { field: "failsafe" });
                }
                Some(v)
            }
            _ => return Err(DecodeError::BadValue { field: "failsafe_flag" }),
        };
        let n = r.count("command_controls", MAX_COMMANDS)?;
        let mut commands = Vec::with_capacity(n);
        for _ in 0..n {
            let command_id = r.u64()?;
            let lease_ms = r.u32()?;
            let ramp_centi_pct_per_s = r.u16()?;
            if ramp_centi_pct_per_s > MAX_RAMP_CENTI {
                return Err(DecodeError::BadValue { field: "ramp" });
            }
            commands.push(CommandControl { command_id, lease_ms, ramp_centi_pct_per_s });
        }
        Ok(ControlOrders { failsafe, commands })
    }
}

/// The schedule extension (protocol 1.2): a time-of-day plan of export
/// limits the device runs offline. It rides after the control extension,
/// introduced by [`SCHEDULE_EXTENSION`]; a server sends [`ScheduleOrders`]
/// only to a device whose request carried a [`ScheduleReport`].
///
/// The server compiles the plan (its days, times and the site's time zone,
/// daylight saving included) into steps in UTC for a horizon of days; the
/// device needs no calendar and no time-zone rules.
pub const SCHEDULE_EXTENSION: u8 = 2;

/// Most steps one plan carries.
pub const MAX_STEPS: usize = 256;

/// A plan entry's index when no entry is active (the plan's default applies).
pub const NO_ENTRY: u8 = 0xFF;

/// Where a device's export limit comes from, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum ScheduleState {
    /// No plan (or an empty one).
    #[default]
    None = 0,
    /// The plan's step in force.
    Following = 1,
    /// A command without a lease, until the plan's next step.
    Command = 2,
    /// A leased command, while its lease holds.
    Lease = 3,
    /// A lapsed lease: the fail-safe, until the server is heard again.
    FailSafe = 4,
    /// The plan's horizon passed without a newer one: the fail-safe.
    Ended = 5,
}

/// One step of a plan: from `at_ms` the export limit is `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// When, Unix ms (whole seconds after the plan's start).
    pub at_ms: u64,
    /// The export limit, %.
    pub value: u8,
    /// The plan entry it comes from ([`NO_ENTRY`]: the plan's default).
    pub entry: u8,
}

/// A compiled plan: steps from `from_ms` until `until_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The schedule's version (the server's; 0 is never sent).
    pub version: u64,
    /// When the first step starts, Unix ms.
    pub from_ms: u64,
    /// When the plan ends, Unix ms (after it, the fail-safe).
    pub until_ms: u64,
    /// Steps, strictly ascending, the first at `from_ms`; none: no schedule.
    pub steps: Vec<Step>,
}

/// Device -> server: the schedule it runs (extension of [`SyncRequest`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleReport {
    /// The plan's version (0: none).
    pub version: u64,
    /// Its horizon, Unix ms.
    pub until_ms: u64,
    /// Where the export limit comes from now.
    pub state: ScheduleState,
    /// The plan's entry in force ([`NO_ENTRY`]: its default, or no plan).
    pub entry: u8,
    /// The plan's limit now, % (0xFF: none).
    pub value: u8,
    /// The last step written: when, and whether it was read back equal.
    pub last: Option<(u64, bool)>,
}

impl ScheduleReport {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(SCHEDULE_EXTENSION);
        put_u64(out, self.version);
        put_u64(out, self.until_ms);
        out.push(self.state as u8);
        out.push(self.entry);
        out.push(self.value);
        match self.last {
            None => out.push(0),
            Some((at, ok)) => {
                out.push(if ok { 1 } else { 2 });
                put_u64(out, at);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8()? != SCHEDULE_EXTENSION {
            return Err(DecodeError::BadValue { field: "extension" });
        }
        let version = r.u64()?;
        let until_ms = r.u64()?;
        let state = match r.u8()? {
            0 => ScheduleState::None,
            1 => ScheduleState::Following,
            2 => ScheduleState::Command,
            3 => ScheduleState::Lease,
            4 => ScheduleState::FailSafe,
            5 => ScheduleState::Ended,
            _ => return Err(DecodeError::BadValue { field: "schedule_state" }),
        };
        let entry = r.u8()?;
        let value = r.u8()?;
        if value > 100 && value != 0xFF {
            return Err(DecodeError::BadValue { field: "schedule_value" });
        }
        let last = match r.u8()? {
            0 => None,
            f @ (1 | 2) => Some((r.u64()?, f == 1)),
            _ => return Err(DecodeError::BadValue { field: "schedule_last" }),
        };
        Ok(ScheduleReport { version, until_ms, state, entry, value, last })
    }
}

/// Server -> device: the schedule extension of [`SyncResponse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleOrders {
    /// A plan to run from now on (a new version, or the same version with
    /// a later horizon); a plan without steps removes the schedule.
    pub plan: Option<Plan>,
    /// Commands of this answer that return the export limit to the plan:
    /// the device writes the plan's limit in force instead of the
    /// command's value (which stands when it has no plan running), and
    /// drops any lease.
    pub resume: Vec<u64>,
}

impl ScheduleOrders {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(SCHEDULE_EXTENSION);
        match &self.plan {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                put_u64(out, p.version);
                put_u64(out, p.from_ms);
                put_u64(out, p.until_ms);
                let n = p.steps.len().min(MAX_STEPS);
                put_u16(out, n as u16);
                for s in &p.steps[..n] {
                    put_u32(out, (s.at_ms.saturating_sub(p.from_ms) / 1000) as u32);
                    out.push(s.value);
                    out.push(s.entry);
                }
            }
        }
        out.push(self.resume.len().min(MAX_COMMANDS) as u8);
        for id in self.resume.iter().take(MAX_COMMANDS) {
            put_u64(out, *id);
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8()? != SCHEDULE_EXTENSION {
            return Err(DecodeError::BadValue { field: "extension" });
        }
        let plan = match r.u8()? {
            0 => None,
            1 => Some(Plan::get(r)?),
            _ => return Err(DecodeError::BadValue { field: "plan_flag" }),
        };
        let n = r.count("resume", MAX_COMMANDS)?;
        let mut resume = Vec::with_capacity(n);
        for _ in 0..n {
            resume.push(r.u64()?);
        }
        Ok(ScheduleOrders { plan, resume })
    }
}

impl Plan {
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u64()?;
        let from_ms = r.u64()?;
        let until_ms = r.u64()?;
        let n = usize::from(r.u16()?);
        if n > MAX_STEPS {
            return Err(DecodeError::TooMany { field: "steps", count: n, max: MAX_STEPS });
        }
        if version == 0 || until_ms <= from_ms {
            return Err(DecodeError::BadValue { field: "plan" });
        }
        let mut steps: Vec<Step> = Vec::with_capacity(n);
        for _ in 0..n {
            let at_ms = from_ms.saturating_add(u64::from(r.u32()?) * 1000);
            let value = r.u8()?;
            let entry = r.u8()?;
            let ordered = match steps.last() {
                None => at_ms == from_ms,
                Some(prev) => prev.at_ms < at_ms,
            };
            if value > 100 || !ordered || at_ms >= until_ms {
                return Err(DecodeError::BadValue { field: "step" });
            }
            steps.push(Step { at_ms, value, entry });
        }
        Ok(Plan { version, from_ms, until_ms, steps })
    }

    /// The step in force at `now_ms` (`None` before the plan or after it).
    pub fn step_at(&self, now_ms: u64) -> Option<&Step> {
        if now_ms >= self.until_ms {
            return None;
        }
        self.steps.iter().take_while(|s| s.at_ms <= now_ms).last()
    }
}

/// What the device is to do on the inverter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Write `value` to `register`, then read it back.
    Write {
        /// Register address.
        register: u16,
        /// Raw value.
        value: u16,
    },
    /// Read `register`.
    Read {
        /// Register address.
        register: u16,
    },
}

/// A command for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCommand {
    /// Its id: the device executes each id at most once.
    pub id: u64,
    /// What to do.
    pub op: Operation,
    /// Do not execute after this Unix ms.
    pub expires_ms: u64,
}

/// Server -> device: the latest config (if the device does not run it) and commands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncResponse {
    /// The server's clock, Unix ms (devices without a clock set theirs from it).
    pub server_time_ms: u64,
    /// The desired config, when its version differs from the applied one.
    pub config: Option<ConfigState>,
    /// Commands to execute, oldest first.
    pub commands: Vec<DeviceCommand>,
    /// A firmware update the device is to install.
    pub update: Option<UpdateOffer>,
    /// Leases of the commands above and the fail-safe limit, only ever
    /// sent to a device whose request carried a [`ControlReport`].
    pub control: Option<ControlOrders>,
    /// A schedule to run and commands that return to it, only ever sent to
    /// a device whose request carried a [`ScheduleReport`].
    pub schedule: Option<ScheduleOrders>,
    /// The telemetry codecs the server accepts (bit `v` = version `v`), only
    /// ever sent to a device whose request carried its own.
    pub codecs: Option<u8>,
    /// With an update offer delivered encrypted ([`crate::delivery`]): its
    /// chunk size as a power of two. Only ever sent to a device whose request
    /// carried [`DELIVERY_ENCRYPTED`].
    pub delivery: Option<u8>,
}

/// Signature algorithms of an update offer.
pub mod signature_algorithm {
    /// Ed25519, 64-byte signature.
    pub const ED25519: u8 = 1;
    /// RSA-2048 PKCS#1 v1.5 with SHA-256, 256-byte signature.
    pub const RSA2048_SHA256: u8 = 2;
}

/// Longest signature in an offer, bytes.
pub const MAX_SIGNATURE_LEN: usize = 512;
/// Longest hardware target name, bytes.
pub const MAX_TARGET_LEN: usize = 64;

/// Server -> device: install this signed image, downloadable (with byte
/// ranges) at `/api/v1/device/firmware/{hex(token)}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateOffer {
    /// Names the download for this device and image.
    pub token: [u8; 16],
    /// What the image is.
    pub manifest: Manifest,
    /// A [`signature_algorithm`] code.
    pub algorithm: u8,
    /// The signature over the manifest's signed bytes.
    pub signature: Vec<u8>,
}

impl UpdateOffer {
    fn put(&self, out: &mut Vec<u8>) {
        let m = &self.manifest;
        out.extend_from_slice(&self.token);
        put_str(out, &alloc::format!("{}", m.version), MAX_FIRMWARE_LEN);
        put_u64(out, m.size);
        out.extend_from_slice(&m.sha256);
        put_u32(out, m.security_counter);
        put_str(out, &m.target, MAX_TARGET_LEN);
        put_u64(out, m.created_ms);
        out.push(self.algorithm);
        let sig = &self.signature[..self.signature.len().min(MAX_SIGNATURE_LEN)];
        put_u16(out, sig.len() as u16);
        out.extend_from_slice(sig);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let token: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let version = get_str(r, "version", MAX_FIRMWARE_LEN)?;
        let version =
            Version::parse(&version).map_err(|_| DecodeError::BadValue { field: "version" })?;
        let size = r.u64()?;
        let sha256: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        let security_counter = r.u32()?;
        let target = get_str(r, "target", MAX_TARGET_LEN)?;
        let created_ms = r.u64()?;
        let algorithm = r.u8()?;
        let n = usize::from(r.u16()?);
        if n > MAX_SIGNATURE_LEN {
            return Err(DecodeError::TooMany {
                field: "signature",
                count: n,
                max: MAX_SIGNATURE_LEN,
            });
        }
        let signature = r.take(n)?.to_vec();
        let manifest = Manifest { version, size, sha256, security_counter, target, created_ms };
        Ok(UpdateOffer { token, manifest, algorithm, signature })
    }
}

impl SyncResponse {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 21 * self.commands.len());
        put_u64(&mut out, self.server_time_ms);
        out.push(u8::from(self.config.is_some()));
        if let Some(c) = &self.config {
            c.put(&mut out);
        }
        out.push(self.commands.len().min(MAX_COMMANDS) as u8);
        for c in self.commands.iter().take(MAX_COMMANDS) {
            put_u64(&mut out, c.id);
            let (op, register, value) = match c.op {
                Operation::Write { register, value } => (1, register, value),
                Operation::Read { register } => (2, register, 0),
            };
            out.push(op);
            put_u16(&mut out, register);
            put_u16(&mut out, value);
            put_u64(&mut out, c.expires_ms);
        }
        match &self.update {
            None => out.push(0),
            Some(u) => {
                out.push(1);
                u.put(&mut out);
            }
        }
        let codecs = self.codecs.is_some() || self.delivery.is_some();
        if self.control.is_some() || self.schedule.is_some() || codecs {
            self.control.clone().unwrap_or_default().put(&mut out);
        }
        if self.schedule.is_some() || codecs {
            self.schedule.clone().unwrap_or_default().put(&mut out);
        }
        if codecs {
            out.extend_from_slice(&[CODEC_EXTENSION, self.codecs.unwrap_or(1 << 1)]);
        }
        if let Some(d) = self.delivery {
            out.extend_from_slice(&[DELIVERY_EXTENSION, d]);
        }
        out
    }

    /// Decodes a body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let server_time_ms = r.u64()?;
        let config = match r.u8()? {
            0 => None,
            1 => Some(ConfigState::get(&mut r)?),
            _ => return Err(DecodeError::BadValue { field: "flags" }),
        };
        let n = r.count("commands", MAX_COMMANDS)?;
        let mut commands = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u64()?;
            let op = r.u8()?;
            let register = r.u16()?;
            let value = r.u16()?;
            let op = match op {
                1 => Operation::Write { register, value },
                2 if value == 0 => Operation::Read { register },
                _ => return Err(DecodeError::BadValue { field: "op" }),
            };
            commands.push(DeviceCommand { id, op, expires_ms: r.u64()? });
        }
        let update = match r.u8()? {
            0 => None,
            1 => Some(UpdateOffer::get(&mut r)?),
            _ => return Err(DecodeError::BadValue { field: "update_flag" }),
        };
        let control = if r.at < r.bytes.len() { Some(ControlOrders::get(&mut r)?) } else { None };
        let schedule = if r.at < r.bytes.len() { Some(ScheduleOrders::get(&mut r)?) } else { None };
        let codecs = if r.at < r.bytes.len() { Some(get_codecs(&mut r)?) } else { None };
        let delivery = if r.at < r.bytes.len() {
            let chunk = crate::delivery::MIN_CHUNK_LOG2..=crate::delivery::MAX_CHUNK_LOG2;
            Some(get_extension(&mut r, DELIVERY_EXTENSION, "delivery", |d| chunk.contains(&d))?)
        } else {
            None
        };
        if delivery.is_some() && update.is_none() {
            return Err(DecodeError::BadValue { field: "delivery" });
        }
        r.finish()?;
        Ok(SyncResponse {
            server_time_ms,
            config,
            commands,
            update,
            control,
            schedule,
            codecs,
            delivery,
        })
    }
}

/// Earliest sample time the server accepts: 2020-01-01T00:00:00Z (a device
/// whose clock was never set stamps 1970).
pub const EARLIEST_SAMPLE_MS: u64 = 1_577_836_800_000;
/// How far ahead of the server's clock a sample time may be.
pub const MAX_SAMPLE_AHEAD_MS: u64 = 86_400_000;

/// Whether a sample stamped `unix_ms` is in the range the server accepts
/// when its clock reads `now_ms`: not before [`EARLIEST_SAMPLE_MS`], not more
/// than [`MAX_SAMPLE_AHEAD_MS`] ahead.
pub fn sample_time_ok(unix_ms: u64, now_ms: u64) -> bool {
    (EARLIEST_SAMPLE_MS..=now_ms.saturating_add(MAX_SAMPLE_AHEAD_MS)).contains(&unix_ms)
}

/// Device -> server: a batch of samples, encoded with a telemetry codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryUpload {
    /// `seq` of the first sample in the batch.
    pub first_seq: u64,
    /// Number of samples.
    pub count: u16,
    /// Samples the device dropped since it started counting (log overflow).
    pub dropped_total: u64,
    /// Codec of `batch` (1: the v1 columnar delta codec).
    pub codec: u8,
    /// The encoded samples.
    pub batch: Vec<u8>,
}

impl TelemetryUpload {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(23 + self.batch.len());
        put_u64(&mut out, self.first_seq);
        put_u16(&mut out, self.count);
        put_u64(&mut out, self.dropped_total);
        out.push(self.codec);
        put_u32(&mut out, self.batch.len() as u32);
        out.extend_from_slice(&self.batch);
        out
    }

    /// Decodes a body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let first_seq = r.u64()?;
        let count = r.u16()?;
        let dropped_total = r.u64()?;
        let codec = r.u8()?;
        let len = r.u32()? as usize;
        if len > MAX_BATCH_LEN {
            return Err(DecodeError::TooMany { field: "batch", count: len, max: MAX_BATCH_LEN });
        }
        let batch = r.take(len)?.to_vec();
        r.finish()?;
        Ok(TelemetryUpload { first_seq, count, dropped_total, codec, batch })
    }
}

/// Server -> device: every sample up to `acked_through` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryAck {
    /// Highest `seq` stored.
    pub acked_through: u64,
}

impl TelemetryAck {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        self.acked_through.to_be_bytes().to_vec()
    }

    /// Decodes a body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let acked_through = r.u64()?;
        r.finish()?;
        Ok(TelemetryAck { acked_through })
    }
}

/// Server -> device: an authentic request that could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorMessage {
    /// 1 malformed body, 2 wrong message type, 3 device disabled, 4 server busy.
    pub code: u16,
}

impl ErrorMessage {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        self.code.to_be_bytes().to_vec()
    }

    /// Decodes a body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let code = r.u16()?;
        r.finish()?;
        Ok(ErrorMessage { code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_offer() -> UpdateOffer {
        UpdateOffer {
            token: [7; 16],
            manifest: Manifest {
                version: Version::parse("1.3.0-rc.1").unwrap(),
                size: 200_000,
                sha256: [0xAB; 32],
                security_counter: 2,
                target: String::from("linux-x86_64"),
                created_ms: 1_800_000_000_000,
            },
            algorithm: signature_algorithm::ED25519,
            signature: alloc::vec![0x5A; 64],
        }
    }

    fn sample_request() -> SyncRequest {
        SyncRequest {
            wait_ms: 25_000,
            applied: Some(ConfigState {
                version: 3,
                poll_interval_ms: 5_000,
                upload_interval_ms: 900_000,
                registers: 0x03FF,
            }),
            rejected: alloc::vec![Rejection { field: 3, reason: 2 }],
            results: alloc::vec![CommandResult {
                command_id: 42,
                succeeded: false,
                exception: Some(3),
                value: None,
                executed_ms: 1_800_000_000_000
            }],
            firmware: String::from("1.2.0"),
            ota: Some(OtaReport {
                state: OtaState::Downloading,
                version: String::from("1.3.0"),
                done: 65_536,
                total: 200_000,
                reason: 0,
            }),
            control: None,
            schedule: None,
            codecs: None,
            delivery: None,
        }
    }

    #[test]
    fn round_trips() {
        let req = sample_request();
        assert_eq!(SyncRequest::decode(&req.encode()).unwrap(), req);
        assert_eq!(
            SyncRequest::decode(&SyncRequest::default().encode()).unwrap(),
            SyncRequest::default()
        );
        let resp = SyncResponse {
            server_time_ms: 7,
            config: Some(ConfigState {
                version: 4,
                poll_interval_ms: 10_000,
                upload_interval_ms: 60_000,
                registers: 0x0301,
            }),
            commands: alloc::vec![
                DeviceCommand {
                    id: 9,
                    op: Operation::Write { register: 8, value: 30 },
                    expires_ms: 99
                },
                DeviceCommand { id: 10, op: Operation::Read { register: 9 }, expires_ms: 99 },
            ],
            update: Some(sample_offer()),
            control: None,
            schedule: None,
            codecs: None,
            delivery: None,
        };
        assert_eq!(SyncResponse::decode(&resp.encode()).unwrap(), resp);
        let bytes = resp.encode();
        for len in 0..bytes.len() {
            assert!(SyncResponse::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        assert_eq!(SyncResponse::decode(&resp.encode()).unwrap(), resp);
        let up = TelemetryUpload {
            first_seq: 100,
            count: 60,
            dropped_total: 2,
            codec: 1,
            batch: alloc::vec![1, 2, 3],
        };
        assert_eq!(TelemetryUpload::decode(&up.encode()).unwrap(), up);
        assert_eq!(
            TelemetryAck::decode(&TelemetryAck { acked_through: 5 }.encode())
                .unwrap()
                .acked_through,
            5
        );
        assert_eq!(ErrorMessage::decode(&ErrorMessage { code: 2 }.encode()).unwrap().code, 2);
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let bytes = sample_request().encode();
        for len in 0..bytes.len() {
            assert!(SyncRequest::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(SyncRequest::decode(&long), Err(DecodeError::BadValue { field: "extension" }));
    }

    fn control_report() -> ControlReport {
        ControlReport {
            failsafe: 40,
            lease: Some(LeaseState { command_id: 9, value: 30, lapsed: true }),
            ramp: Some(RampState { command_id: 10, value: 45, target: 60 }),
            episodes: alloc::vec![
                Episode {
                    kind: EpisodeKind::FailSafe,
                    command_id: 9,
                    at_ms: 1_800_000_000_000,
                    value: 40,
                    outcome: EpisodeOutcome::Confirmed,
                },
                Episode {
                    kind: EpisodeKind::Resumed,
                    command_id: 9,
                    at_ms: 1_800_000_060_000,
                    value: 30,
                    outcome: EpisodeOutcome::Failed,
                },
            ],
        }
    }

    #[test]
    fn the_control_extension_round_trips_and_is_checked() {
        let base = sample_request();
        let req = SyncRequest { control: Some(control_report()), ..base.clone() };
        let bytes = req.encode();
        assert_eq!(SyncRequest::decode(&bytes).unwrap(), req);
        // A 1.0 request (no extension) still decodes; a cut inside the extension does not.
        let plain = base.encode().len();
        assert_eq!(SyncRequest::decode(&bytes[..plain]).unwrap(), base);
        for len in plain + 1..bytes.len() {
            assert!(SyncRequest::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        // (A byte after the control extension can only start the schedule one.)
        assert_eq!(SyncRequest::decode(&long), Err(DecodeError::BadValue { field: "extension" }));
        for (at, value, field) in [
            (plain, 2, "extension"),
            (plain + 1, 0x01, "failsafe"), // 0x0128 = 296 %
            (plain + 3, 3, "lease_state"),
            (plain + 12, 0x01, "lease_value"),
            (plain + 14, 2, "ramp_flag"),
            (plain + 25, 0x01, "ramp"),
            (plain + 28, 9, "episode_kind"),
            (plain + 28 + 19, 4, "episode_outcome"),
        ] {
            let mut bad = bytes.clone();
            bad[at] = value;
            assert_eq!(SyncRequest::decode(&bad), Err(DecodeError::BadValue { field }), "{field}");
        }
        let mut many = bytes.clone();
        many[plain + 27] = 9;
        assert!(matches!(SyncRequest::decode(&many), Err(DecodeError::TooMany { .. })));

        let orders = ControlOrders {
            failsafe: Some(failsafe::HOLD),
            commands: alloc::vec![CommandControl {
                command_id: 9,
                lease_ms: 900_000,
                ramp_centi_pct_per_s: 250
            }],
        };
        let resp = SyncResponse { server_time_ms: 7, control: Some(orders), ..Default::default() };
        let bytes = resp.encode();
        assert_eq!(SyncResponse::decode(&bytes).unwrap(), resp);
        let plain = SyncResponse { control: None, ..resp.clone() }.encode().len();
        for len in plain + 1..bytes.len() {
            assert!(SyncResponse::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut fast = bytes.clone();
        let n = fast.len();
        fast[n - 2..].copy_from_slice(&10_001u16.to_be_bytes());
        assert_eq!(SyncResponse::decode(&fast), Err(DecodeError::BadValue { field: "ramp" }));
        let mut bad = bytes.clone();
        bad[plain + 2] = 0x02; // 0x02FF
        assert_eq!(SyncResponse::decode(&bad), Err(DecodeError::BadValue { field: "failsafe" }));
    }

    #[test]
    fn the_schedule_extension_round_trips_and_is_checked() {
        let report = ScheduleReport {
            version: 4,
            until_ms: 1_800_000_000_000,
            state: ScheduleState::Command,
            entry: 1,
            value: 30,
            last: Some((1_790_000_000_000, true)),
        };
        let req = SyncRequest {
            control: Some(control_report()),
            schedule: Some(report),
            ..sample_request()
        };
        let bytes = req.encode();
        assert_eq!(SyncRequest::decode(&bytes).unwrap(), req);
        let plain = SyncRequest { schedule: None, ..req.clone() }.encode().len();
        for len in plain + 1..bytes.len() {
            assert!(SyncRequest::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        for (at, value, field) in [
            (plain, 3, "extension"),
            (plain + 17, 6, "schedule_state"),
            (plain + 19, 101, "schedule_value"),
            (plain + 20, 3, "schedule_last"),
        ] {
            let mut bad = bytes.clone();
            bad[at] = value;
            assert_eq!(SyncRequest::decode(&bad), Err(DecodeError::BadValue { field }), "{field}");
        }
        // A schedule report without a control report still carries an (empty) control one.
        let alone = SyncRequest { schedule: Some(report), ..sample_request() };
        let back = SyncRequest::decode(&alone.encode()).unwrap();
        assert_eq!(back.schedule, Some(report));
        assert_eq!(back.control, Some(ControlReport::default()));

        let from = 1_790_000_000_000;
        let plan = Plan {
            version: 4,
            from_ms: from,
            until_ms: from + 86_400_000,
            steps: alloc::vec![
                Step { at_ms: from, value: 100, entry: NO_ENTRY },
                Step { at_ms: from + 3_600_000, value: 0, entry: 0 },
                Step { at_ms: from + 7_200_000, value: 100, entry: NO_ENTRY },
            ],
        };
        assert_eq!(plan.step_at(from - 1), None);
        assert_eq!(plan.step_at(from + 3_600_000).map(|s| s.value), Some(0));
        assert_eq!(plan.step_at(from + 86_399_999).map(|s| s.value), Some(100));
        assert_eq!(plan.step_at(from + 86_400_000), None, "after its horizon");
        let orders = ScheduleOrders { plan: Some(plan.clone()), resume: alloc::vec![7, 8] };
        let resp = SyncResponse { server_time_ms: 7, schedule: Some(orders), ..Default::default() };
        let bytes = resp.encode();
        let back = SyncResponse::decode(&bytes).unwrap();
        assert_eq!(back.schedule, resp.schedule);
        let plain = SyncResponse { schedule: None, ..back.clone() }.encode().len();
        for len in plain + 1..bytes.len() {
            assert!(SyncResponse::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        // Steps: the first at the start, ascending, before the end, limits within 0..=100.
        let steps = plain + 2 + 24 + 2;
        for (at, value) in [
            (steps + 3, 1),         // the first step one second late
            (steps + 6 + 2, 0x20),  // the second step after the third
            (steps + 6 + 4, 101),   // a limit of 101 %
            (steps + 12 + 1, 0xFF), // the third step beyond the horizon
        ] {
            let mut bad = bytes.clone();
            bad[at] = value;
            assert_eq!(
                SyncResponse::decode(&bad),
                Err(DecodeError::BadValue { field: "step" }),
                "byte {at}"
            );
        }
        let mut version0 = bytes.clone();
        version0[plain + 2..plain + 10].fill(0);
        assert_eq!(SyncResponse::decode(&version0), Err(DecodeError::BadValue { field: "plan" }));
        let mut many = bytes.clone();
        many[plain + 26..plain + 28].copy_from_slice(&257u16.to_be_bytes());
        assert!(matches!(SyncResponse::decode(&many), Err(DecodeError::TooMany { .. })));
    }

    #[test]
    fn limits_and_values_are_checked() {
        let mut bytes = SyncRequest::default().encode();
        bytes[6] = 33; // results count
        assert!(matches!(
            SyncRequest::decode(&bytes),
            Err(DecodeError::TooMany { field: "results", .. })
        ));
        let mut bytes = SyncRequest::default().encode();
        bytes[4] = 2; // flags
        assert_eq!(SyncRequest::decode(&bytes), Err(DecodeError::BadValue { field: "flags" }));
        let mut over = sample_request();
        over.ota.as_mut().unwrap().done = 300_000; // more than the image
        assert_eq!(
            SyncRequest::decode(&over.encode()),
            Err(DecodeError::BadValue { field: "ota" })
        );
        let mut state = SyncRequest::default().encode();
        *state.last_mut().unwrap() = 1; // an OTA report with no fields
        assert!(matches!(SyncRequest::decode(&state), Err(DecodeError::Truncated { .. })));
        let mut big = TelemetryUpload {
            first_seq: 0,
            count: 0,
            dropped_total: 0,
            codec: 1,
            batch: alloc::vec![],
        }
        .encode();
        big[19..23].copy_from_slice(&(MAX_BATCH_LEN as u32 + 1).to_be_bytes());
        assert!(matches!(
            TelemetryUpload::decode(&big),
            Err(DecodeError::TooMany { field: "batch", .. })
        ));
    }

    #[test]
    fn the_codec_extension_round_trips_and_is_checked() {
        use crate::codec::SUPPORTED;
        // A request with codecs carries (empty) control and schedule blocks before them.
        let req = SyncRequest { codecs: Some(SUPPORTED), ..sample_request() };
        let bytes = req.encode();
        let back = SyncRequest::decode(&bytes).unwrap();
        assert_eq!(back.codecs, Some(SUPPORTED));
        assert_eq!(back.control, Some(ControlReport::default()));
        assert_eq!(back.schedule, Some(ScheduleReport::default()));
        assert_eq!(&bytes[bytes.len() - 2..], &[CODEC_EXTENSION, 0b110]);
        // Without it, a 1.2 request is what it was.
        let old = SyncRequest { codecs: None, ..back.clone() };
        assert_eq!(SyncRequest::decode(&old.encode()).unwrap().codecs, None);
        for bad in [0u8, 0b111, 0b1] {
            let mut b = bytes.clone();
            *b.last_mut().unwrap() = bad;
            assert_eq!(SyncRequest::decode(&b), Err(DecodeError::BadValue { field: "codecs" }));
        }
        let mut cut = bytes.clone();
        cut.pop();
        assert!(SyncRequest::decode(&cut).is_err());
        let mut wrong = bytes.clone();
        let at = wrong.len() - 2;
        wrong[at] = 4;
        assert_eq!(SyncRequest::decode(&wrong), Err(DecodeError::BadValue { field: "extension" }));

        let resp = SyncResponse { server_time_ms: 7, codecs: Some(0b10), ..Default::default() };
        let back = SyncResponse::decode(&resp.encode()).unwrap();
        assert_eq!(back.codecs, Some(0b10));
        assert_eq!(back.schedule, Some(ScheduleOrders::default()));
        let mut long = resp.encode();
        long.push(0);
        assert!(SyncResponse::decode(&long).is_err());
    }

    #[test]
    fn the_delivery_extension_rides_after_the_codecs_and_is_checked() {
        // A device that states no codecs still carries a (v1-only) codec block before it.
        let req = SyncRequest { delivery: Some(DELIVERY_ENCRYPTED), ..sample_request() };
        let back = SyncRequest::decode(&req.encode()).unwrap();
        assert_eq!((back.codecs, back.delivery), (Some(0b10), Some(DELIVERY_ENCRYPTED)));
        let with_codecs = SyncRequest {
            codecs: Some(0b110),
            control: Some(ControlReport::default()),
            schedule: Some(ScheduleReport::default()),
            ..req.clone()
        };
        assert_eq!(SyncRequest::decode(&with_codecs.encode()).unwrap(), with_codecs);
        for bad in [0u8, 2, 255] {
            let mut b = req.encode();
            *b.last_mut().unwrap() = bad;
            assert_eq!(SyncRequest::decode(&b), Err(DecodeError::BadValue { field: "delivery" }));
        }
        let mut b = req.encode();
        let n = b.len();
        b[n - 2] = 9;
        assert_eq!(SyncRequest::decode(&b), Err(DecodeError::BadValue { field: "extension" }));

        let offer = sample_offer();
        let resp = SyncResponse {
            update: Some(offer),
            codecs: Some(0b110),
            delivery: Some(12),
            control: Some(ControlOrders::default()),
            schedule: Some(ScheduleOrders::default()),
            ..Default::default()
        };
        assert_eq!(SyncResponse::decode(&resp.encode()).unwrap(), resp);
        for bad in [9u8, 17] {
            let mut b = resp.encode();
            *b.last_mut().unwrap() = bad;
            assert_eq!(SyncResponse::decode(&b), Err(DecodeError::BadValue { field: "delivery" }));
        }
        // Encrypted delivery of no offer: refused.
        let alone = SyncResponse { update: None, ..resp };
        assert_eq!(
            SyncResponse::decode(&alone.encode()),
            Err(DecodeError::BadValue { field: "delivery" })
        );
    }
}
