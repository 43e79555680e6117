//! Modbus RTU on a serial line (an RS485 adapter on USB): write the frame,
//! read until the response is complete by its own length fields, or time out.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use ecowatt_core::link::{Transport, TransportError};
use ecowatt_proto::modbus::{FrameError, rtu};
use serialport::{ClearBuffer, SerialPort};

/// Parity of the serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit (8N1, the common inverter setting).
    None,
    /// Even parity (the Modbus spec's default, 8E1).
    Even,
    /// Odd parity.
    Odd,
}

/// Line settings, from a URL query such as `baud=9600&parity=even&stop=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialSettings {
    /// Bits per second.
    pub baud: u32,
    /// Parity.
    pub parity: Parity,
    /// Stop bits (1 or 2).
    pub stop_bits: u8,
}

impl Default for SerialSettings {
    fn default() -> Self {
        SerialSettings { baud: 9_600, parity: Parity::None, stop_bits: 1 }
    }
}

impl SerialSettings {
    /// Parses `key=value&...`; unknown keys and bad values are errors.
    pub fn parse_query(query: &str) -> Result<Self, String> {
        let mut s = SerialSettings::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| format!("{pair:?} is not key=value"))?;
            match key {
                "baud" => {
                    s.baud =
                        value.parse().ok().filter(|b| (300..=4_000_000).contains(b)).ok_or_else(
                            || format!("baud {value:?} is not a rate in 300..=4000000"),
                        )?;
                }
                "parity" => {
                    s.parity = match value {
                        "none" | "N" => Parity::None,
                        "even" | "E" => Parity::Even,
                        "odd" | "O" => Parity::Odd,
                        _ => return Err(format!("parity {value:?} is not none, even or odd")),
                    };
                }
                "stop" => {
                    s.stop_bits = match value {
                        "1" => 1,
                        "2" => 2,
                        _ => return Err(format!("stop {value:?} is not 1 or 2")),
                    };
                }
                _ => return Err(format!("unknown serial option {key:?} (baud, parity, stop)")),
            }
        }
        Ok(s)
    }
}

/// An RTU transport over any serial port.
pub struct SerialRtu {
    port: Box<dyn SerialPort>,
    timeout: Duration,
}

impl SerialRtu {
    /// Opens the serial device at `path`.
    pub fn open(
        path: &str,
        settings: &SerialSettings,
        timeout: Duration,
    ) -> serialport::Result<Self> {
        let port = serialport::new(path, settings.baud)
            .data_bits(serialport::DataBits::Eight)
            .parity(match settings.parity {
                Parity::None => serialport::Parity::None,
                Parity::Even => serialport::Parity::Even,
                Parity::Odd => serialport::Parity::Odd,
            })
            .stop_bits(if settings.stop_bits == 2 {
                serialport::StopBits::Two
            } else {
                serialport::StopBits::One
            })
            .timeout(timeout)
            .open()?;
        Ok(SerialRtu::from_port(port, timeout))
    }

    /// Wraps an already open port (a pseudo-terminal in tests).
    pub fn from_port(port: Box<dyn SerialPort>, timeout: Duration) -> Self {
        SerialRtu { port, timeout }
    }
}

impl Transport for SerialRtu {
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        let io = |e: std::io::Error| TransportError::Io(format!("serial: {e}"));
        // Bytes left over from an earlier, late answer would corrupt this one.
        let _ = self.port.clear(ClearBuffer::Input);
        self.port.write_all(request).map_err(io)?;
        self.port.flush().map_err(io)?;

        let deadline = Instant::now() + self.timeout;
        let mut answer = Vec::with_capacity(rtu::MAX_FRAME_LEN);
        let mut chunk = [0u8; rtu::MAX_FRAME_LEN];
        loop {
            if let Some(len) = rtu::expected_response_len(&answer) {
                if answer.len() >= len {
                    answer.truncate(len);
                    return Ok(answer);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || answer.len() >= rtu::MAX_FRAME_LEN {
                break;
            }
            self.port.set_timeout(left).map_err(|e| io(e.into()))?;
            match self.port.read(&mut chunk) {
                // A line with nothing to say (a pty whose other end closed): wait a little.
                Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        // Time is up: nothing is a timeout; fewer bytes than the answer announces
        // is an incomplete answer; anything else goes to the validator, which
        // names what is wrong with it.
        let expected = rtu::expected_response_len(&answer).unwrap_or(rtu::MIN_FRAME_LEN);
        if answer.is_empty() {
            Err(TransportError::Timeout)
        } else if answer.len() < expected {
            Err(TransportError::Frame(FrameError::Incomplete { len: answer.len(), expected }))
        } else {
            Ok(answer)
        }
    }
}
