//! The EcoWatt device's logic, free of I/O so that it runs on Linux, in tests
//! with fake time and faulty transports, and on an ESP32-C3.
//!
//! `no_std` + `alloc`; no `Arc`, no atomics, no `std` time. Parts:
//! - [`link`] — the inverter link: a Modbus RTU client over a [`link::Transport`]
//!   trait, with retries and bounded backoff driven by a sans-IO
//!   [`link::Transaction`].
//! - [`ota`] — firmware updates on A/B slots with trial boot and rollback.
//! - [`schedule`] — when to poll and when to upload (with backoff), from the time passed in.
//! - [`control`] — config applied with the device's own limits, commands run at most once.
//! - [`samplelog`] — readings kept until acknowledged, bounded, power-cut safe.
//! - [`machine`] — the device as one machine joining the parts: events in
//!   (time, inverter and server answers, image chunks), actions out.
//! - [`flashkv`] — the key-value store on raw NOR flash, log-structured and
//!   safe against a power cut at any word.
//! - [`flashslots`] — the two image slots on raw NOR flash, a sector erased
//!   when a write first reaches it.
//! - [`provision`] — the provisioning partition's format (identity, key,
//!   server, Wi-Fi, trusted firmware keys).
//! - [`http1`] — the HTTP/1.1 a device speaks (sealed POST, ranged GET,
//!   reading an answer with limits), without I/O.
//! - [`kv`] — the key-value store trait, and an in-memory double that fails on demand.
//! - [`session`] — the device side of protocol v1: sealing with counters reserved
//!   in blocks, opening only the answer to the request outstanding.
#![no_std]

extern crate alloc;

pub mod control;
pub mod flashkv;
pub mod flashslots;
pub mod http1;
pub mod kv;
pub mod link;
pub mod machine;
pub mod ota;
pub mod provision;
pub mod samplelog;
pub mod schedule;
pub mod session;
