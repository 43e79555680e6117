//! Modbus as the inverter speaks it: Read Holding Registers (`0x03`), Write
//! Single Register (`0x06`) and exception responses.
//!
//! The PDU types ([`Request`], [`Response`]) are shared by both framings:
//! [`rtu`] (slave address + PDU + CRC-16, the serial line and the SIM HTTP API)
//! and [`tcp`] (MBAP header + PDU, Modbus TCP). Every decoding failure is a
//! distinct [`FrameError`] variant carrying what is needed to act on it.

mod error;
mod pdu;
pub mod rtu;
pub mod tcp;

pub use error::FrameError;
pub use pdu::{Exception, ExceptionCode, Request, Response};

/// Function code: Read Holding Registers.
pub const READ_HOLDING_REGISTERS: u8 = 0x03;
/// Function code: Write Single Register.
pub const WRITE_SINGLE_REGISTER: u8 = 0x06;
/// Largest register count one `0x03` request may ask for (Modbus spec, 6.3).
pub const MAX_READ_QUANTITY: u16 = 125;
