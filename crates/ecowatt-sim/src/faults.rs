//! One-shot error flags, as the Inverter SIM's `/api/user/error-flag/add`
//! sets them: each added flag applies to exactly one later read or write.

use std::collections::VecDeque;

use ecowatt_proto::crc::crc16;
use ecowatt_proto::modbus::{Exception, ExceptionCode, Response, rtu};
use serde::Deserialize;

/// The kinds of error the SIM API can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorType {
    /// Answer with a Modbus exception.
    Exception,
    /// Answer with a frame whose CRC is wrong.
    CrcError,
    /// Answer with garbage bytes.
    Corrupt,
    /// Answer nothing.
    PacketDrop,
    /// Answer normally, but late.
    Delay,
}

/// A fault waiting to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refuse the request with this exception code (the request has no effect).
    Exception(u8),
    /// Carry out the request, then corrupt the CRC of the answer.
    CrcError,
    /// Carry out the request, then answer garbage of the same length.
    Corrupt,
    /// Lose the request: no effect, blank answer.
    PacketDrop,
    /// Carry out the request and answer after this many milliseconds.
    Delay(u64),
}

/// Why a flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// `EXCEPTION` needs `exceptionCode`.
    #[error("errorType EXCEPTION requires exceptionCode (1..=255)")]
    MissingExceptionCode,
    /// `DELAY` needs `delayMs`.
    #[error("errorType DELAY requires delayMs")]
    MissingDelay,
    /// A delay longer than the simulator allows.
    #[error("delayMs must be at most {max}")]
    DelayTooLong {
        /// The largest delay accepted.
        max: u64,
    },
}

/// Largest delay a flag may ask for, so that no request hangs for long.
pub const MAX_DELAY_MS: u64 = 60_000;

impl Fault {
    /// Builds a fault from the SIM API's fields.
    pub fn from_api(
        kind: ErrorType,
        exception_code: Option<u8>,
        delay_ms: Option<u64>,
    ) -> Result<Self, FlagError> {
        Ok(match kind {
            ErrorType::Exception => match exception_code {
                Some(code) if code > 0 => Fault::Exception(code),
                _ => return Err(FlagError::MissingExceptionCode),
            },
            ErrorType::CrcError => Fault::CrcError,
            ErrorType::Corrupt => Fault::Corrupt,
            ErrorType::PacketDrop => Fault::PacketDrop,
            ErrorType::Delay => {
                let ms = delay_ms.ok_or(FlagError::MissingDelay)?;
                if ms > MAX_DELAY_MS {
                    return Err(FlagError::DelayTooLong { max: MAX_DELAY_MS });
                }
                Fault::Delay(ms)
            }
        })
    }

    /// The exception frame this fault stands for, for a request to `slave`
    /// with `function`.
    pub fn exception_frame(slave: u8, function: u8, code: u8) -> Vec<u8> {
        let e = Exception { function: function & 0x7F, code: ExceptionCode::from(code) };
        rtu::encode_response(slave, &Response::Exception(e))
    }
}

/// Breaks the CRC of `frame` (flips every bit of its last byte).
pub fn corrupt_crc(mut frame: Vec<u8>) -> Vec<u8> {
    if let Some(last) = frame.last_mut() {
        *last ^= 0xFF;
    }
    frame
}

/// Garbage of `len` bytes (at least 5) derived from `salt`, made so that its CRC
/// never checks.
pub fn garbage(len: usize, salt: u64) -> Vec<u8> {
    let mut x = salt | 1;
    let mut bytes: Vec<u8> = (0..len.max(5))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let n = bytes.len();
    let crc = crc16(&bytes[..n - 2]).to_le_bytes();
    if bytes[n - 2..] == crc {
        bytes[n - 1] ^= 0xFF;
    }
    bytes
}

/// The pending flags, first added first applied.
#[derive(Debug, Default)]
pub struct FaultQueue(VecDeque<Fault>);

/// Most flags that may wait at once.
pub const MAX_PENDING: usize = 1_000;

impl FaultQueue {
    /// Adds a flag; refuses when [`MAX_PENDING`] already wait.
    pub fn push(&mut self, fault: Fault) -> bool {
        if self.0.len() >= MAX_PENDING {
            return false;
        }
        self.0.push_back(fault);
        true
    }

    /// Takes the flag for the next request, if any.
    pub fn pop(&mut self) -> Option<Fault> {
        self.0.pop_front()
    }

    /// Number of flags waiting.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no flag waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
