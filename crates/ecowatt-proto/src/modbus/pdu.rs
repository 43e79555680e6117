//! Protocol data units: function code + data, without addressing or CRC.

use alloc::vec::Vec;
use core::fmt;

use super::{FrameError, READ_HOLDING_REGISTERS, WRITE_SINGLE_REGISTER};

/// A request PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `0x03`: read `quantity` holding registers starting at `start`.
    ReadHoldingRegisters {
        /// First register address.
        start: u16,
        /// Number of registers.
        quantity: u16,
    },
    /// `0x06`: write `value` to the register at `address`.
    WriteSingleRegister {
        /// Register address.
        address: u16,
        /// Raw value.
        value: u16,
    },
}

/// A response PDU: data, or the device's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to `0x03`: the register values, in order.
    ReadHoldingRegisters(Vec<u16>),
    /// Answer to `0x06`: the echo of the write.
    WriteSingleRegister {
        /// Register address.
        address: u16,
        /// Raw value.
        value: u16,
    },
    /// The device said no.
    Exception(Exception),
}

/// A Modbus exception response: "the device said no". Data, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// Function code of the refused request (without the `0x80` bit).
    pub function: u8,
    /// Why it was refused.
    pub code: ExceptionCode,
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Modbus exception {:02X} ({}) for function {:#04x}",
            self.code.as_u8(),
            self.code.description(),
            self.function
        )
    }
}

/// Modbus exception codes (Modbus Application Protocol v1.1b3, section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionCode {
    /// 01
    IllegalFunction,
    /// 02
    IllegalDataAddress,
    /// 03
    IllegalDataValue,
    /// 04
    SlaveDeviceFailure,
    /// 05
    Acknowledge,
    /// 06
    SlaveDeviceBusy,
    /// 08
    MemoryParityError,
    /// 0A
    GatewayPathUnavailable,
    /// 0B
    GatewayTargetFailedToRespond,
    /// Any other code a device may send.
    Other(u8),
}

impl ExceptionCode {
    /// The code byte.
    pub fn as_u8(self) -> u8 {
        match self {
            ExceptionCode::IllegalFunction => 0x01,
            ExceptionCode::IllegalDataAddress => 0x02,
            ExceptionCode::IllegalDataValue => 0x03,
            ExceptionCode::SlaveDeviceFailure => 0x04,
            ExceptionCode::Acknowledge => 0x05,
            ExceptionCode::SlaveDeviceBusy => 0x06,
            ExceptionCode::MemoryParityError => 0x08,
            ExceptionCode::GatewayPathUnavailable => 0x0A,
            ExceptionCode::GatewayTargetFailedToRespond => 0x0B,
            ExceptionCode::Other(code) => code,
        }
    }

    /// Human-readable meaning.
    pub fn description(self) -> &'static str {
        match self {
            ExceptionCode::IllegalFunction => "illegal function",
            ExceptionCode::IllegalDataAddress => "illegal data address",
            ExceptionCode::IllegalDataValue => "illegal data value",
            ExceptionCode::SlaveDeviceFailure => "slave device failure",
            ExceptionCode::Acknowledge => "acknowledge",
            ExceptionCode::SlaveDeviceBusy => "slave device busy",
            ExceptionCode::MemoryParityError => "memory parity error",
            ExceptionCode::GatewayPathUnavailable => "gateway path unavailable",
            ExceptionCode::GatewayTargetFailedToRespond => "gateway target failed to respond",
            ExceptionCode::Other(_) => "unknown exception",
        }
    }
}

impl From<u8> for ExceptionCode {
    fn from(code: u8) -> Self {
        match code {
            0x01 => ExceptionCode::IllegalFunction,
            0x02 => ExceptionCode::IllegalDataAddress,
            0x03 => ExceptionCode::IllegalDataValue,
            0x04 => ExceptionCode::SlaveDeviceFailure,
            0x05 => ExceptionCode::Acknowledge,
            0x06 => ExceptionCode::SlaveDeviceBusy,
            0x08 => ExceptionCode::MemoryParityError,
            0x0A => ExceptionCode::GatewayPathUnavailable,
            0x0B => ExceptionCode::GatewayTargetFailedToRespond,
            other => ExceptionCode::Other(other),
        }
    }
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn expect_len(pdu: &[u8], function: u8, expected: usize) -> Result<(), FrameError> {
    if pdu.len() == expected {
        Ok(())
    } else {
        Err(FrameError::LengthMismatch { function, expected, actual: pdu.len() })
    }
}

impl Request {
    /// The function code.
    pub fn function(&self) -> u8 {
        match self {
            Request::ReadHoldingRegisters { .. } => READ_HOLDING_REGISTERS,
            Request::WriteSingleRegister { .. } => WRITE_SINGLE_REGISTER,
        }
    }

    /// Appends the PDU bytes to `out`.
    pub fn encode_pdu(&self, out: &mut Vec<u8>) {
        out.push(self.function());
        let (a, b) = match *self {
            Request::ReadHoldingRegisters { start, quantity } => (start, quantity),
            Request::WriteSingleRegister { address, value } => (address, value),
        };
        out.extend_from_slice(&a.to_be_bytes());
        out.extend_from_slice(&b.to_be_bytes());
    }

    /// Decodes a request PDU. Quantities are not range-checked here: a
    /// well-formed request for something invalid is the server's to refuse
    /// with an exception.
    pub fn decode_pdu(pdu: &[u8]) -> Result<Self, FrameError> {
        let Some(&function) = pdu.first() else {
            return Err(FrameError::TooShort { len: 0, min: 1 });
        };
        match function {
            READ_HOLDING_REGISTERS => {
                expect_len(pdu, function, 5)?;
                Ok(Request::ReadHoldingRegisters { start: be16(pdu, 1), quantity: be16(pdu, 3) })
            }
            WRITE_SINGLE_REGISTER => {
                expect_len(pdu, function, 5)?;
                Ok(Request::WriteSingleRegister { address: be16(pdu, 1), value: be16(pdu, 3) })
            }
            _ => Err(FrameError::UnsupportedFunction { function }),
        }
    }

    /// Length of the complete response PDU when the device answers with data.
    pub fn response_pdu_len(&self) -> usize {
        match *self {
            Request::ReadHoldingRegisters { quantity, .. } => 2 + 2 * usize::from(quantity),
            Request::WriteSingleRegister { .. } => 5,
        }
    }

    /// Checks that `response` answers this request: same function, the number
    /// of registers asked for, or the exact echo of the write.
    pub fn check_response(&self, response: Response) -> Result<Response, FrameError> {
        match (self, &response) {
            (_, Response::Exception(e)) if e.function == self.function() => Ok(response),
            (Request::ReadHoldingRegisters { quantity, .. }, Response::ReadHoldingRegisters(v)) => {
                let returned = v.len() as u16;
                if returned == *quantity {
                    Ok(response)
                } else {
                    Err(FrameError::QuantityMismatch { requested: *quantity, returned })
                }
            }
            (
                Request::WriteSingleRegister { address, value },
                Response::WriteSingleRegister { address: a, value: v },
            ) => {
                if (address, value) == (a, v) {
                    Ok(response)
                } else {
                    Err(FrameError::EchoMismatch { expected: (*address, *value), actual: (*a, *v) })
                }
            }
            _ => Err(FrameError::FunctionMismatch {
                expected: self.function(),
                actual: response.function_byte(),
            }),
        }
    }
}

impl Response {
    /// The function byte as sent (with `0x80` set for exceptions).
    pub fn function_byte(&self) -> u8 {
        match self {
            Response::ReadHoldingRegisters(_) => READ_HOLDING_REGISTERS,
            Response::WriteSingleRegister { .. } => WRITE_SINGLE_REGISTER,
            Response::Exception(e) => e.function | 0x80,
        }
    }

    /// Appends the PDU bytes to `out`.
    ///
    /// # Panics
    /// If a read response holds more than 127 registers (its byte count would
    /// not fit the one-byte field); the protocol never asks for more than 125.
    pub fn encode_pdu(&self, out: &mut Vec<u8>) {
        out.push(self.function_byte());
        match self {
            Response::ReadHoldingRegisters(values) => {
                let count = u8::try_from(values.len() * 2).expect("at most 127 registers");
                out.push(count);
                for v in values {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Response::WriteSingleRegister { address, value } => {
                out.extend_from_slice(&address.to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
            Response::Exception(e) => out.push(e.code.as_u8()),
        }
    }

    /// Decodes a response PDU (any supported function, or an exception).
    pub fn decode_pdu(pdu: &[u8]) -> Result<Self, FrameError> {
        let Some(&function) = pdu.first() else {
            return Err(FrameError::TooShort { len: 0, min: 1 });
        };
        if function & 0x80 != 0 {
            expect_len(pdu, function, 2)?;
            return Ok(Response::Exception(Exception {
                function: function & 0x7F,
                code: ExceptionCode::from(pdu[1]),
            }));
        }
        match function {
            READ_HOLDING_REGISTERS => {
                let Some(&count) = pdu.get(1) else {
                    return Err(FrameError::TooShort { len: pdu.len(), min: 2 });
                };
                let data = &pdu[2..];
                if data.len() != usize::from(count) {
                    return Err(FrameError::ByteCountMismatch {
                        declared: count,
                        actual: data.len(),
                    });
                }
                if count % 2 != 0 {
                    return Err(FrameError::OddByteCount { count });
                }
                Ok(Response::ReadHoldingRegisters(
                    data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect(),
                ))
            }
            WRITE_SINGLE_REGISTER => {
                expect_len(pdu, function, 5)?;
                Ok(Response::WriteSingleRegister { address: be16(pdu, 1), value: be16(pdu, 3) })
            }
            _ => Err(FrameError::UnsupportedFunction { function }),
        }
    }
}
