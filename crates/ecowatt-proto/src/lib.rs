//! EcoWatt wire formats, shared by the device, the simulator and the server.
//!
//! `no_std` + `alloc` so that the same code runs on Linux and on an ESP32-C3
//! (`riscv32imc-unknown-none-elf`). Parts:
//! - [`crc`] — CRC-16/MODBUS.
//! - [`hex`] — the uppercase hex text the Inverter SIM HTTP API carries frames in.
//! - [`modbus`] — Modbus RTU requests, responses and exceptions for function
//!   codes `0x03` and `0x06`, with full validation, and the Modbus TCP (MBAP)
//!   framing of the same PDUs.
//! - [`registers`] — the inverter register map (name, unit, gain, access, valid
//!   range) and raw <-> engineering-unit conversion.
//! - [`seal`] — the sealed envelope of device protocol v1 (AES-128-GCM, keys per
//!   direction, answers bound to requests).
//! - [`replay`] — the 64-entry replay window.
//! - [`messages`] — bodies of the protocol's messages (sync, telemetry, errors).
//! - [`firmware`] — signed firmware manifests (Ed25519) and semantic-version ordering.
//! - [`codec`] — the telemetry batch codec (columnar, delta, zero runs).
#![no_std]

extern crate alloc;

pub mod codec;
pub mod crc;
pub mod delivery;
pub mod firmware;
pub mod hex;
pub mod messages;
pub mod modbus;
pub mod registers;
pub mod replay;
pub mod seal;
