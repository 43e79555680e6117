//! Modbus TCP: the core's RTU frames are re-framed with an MBAP header on the
//! way out and given a CRC on the way back, so the core validates one format.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use ecowatt_core::link::{Transport, TransportError};
use ecowatt_proto::crc::crc16_bytes;
use ecowatt_proto::modbus::{FrameError, rtu, tcp};

/// A Modbus TCP client connection, reopened after any failure.
pub struct ModbusTcp {
    addr: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    transaction: u16,
}

impl ModbusTcp {
    /// A client of `host:port`; connects on first use.
    pub fn new(addr: String, timeout: Duration) -> Self {
        ModbusTcp { addr, timeout, stream: None, transaction: 0 }
    }

    fn connect(&self) -> Result<TcpStream, TransportError> {
        let addrs = self
            .addr
            .to_socket_addrs()
            .map_err(|e| TransportError::Io(format!("{}: {e}", self.addr)))?;
        let mut last = TransportError::Io(format!("{}: no address", self.addr));
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) => {
                    let setup = stream
                        .set_nodelay(true)
                        .and_then(|_| stream.set_read_timeout(Some(self.timeout)))
                        .and_then(|_| stream.set_write_timeout(Some(self.timeout)));
                    return setup.map(|_| stream).map_err(|e| io_error(&self.addr, e));
                }
                Err(e) => last = io_error(&self.addr, e),
            }
        }
        Err(last)
    }

    fn exchange(&mut self, unit: u8, pdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        if self.stream.is_none() {
            self.stream = Some(self.connect()?);
        }
        let stream = self.stream.as_mut().expect("connected above");
        self.transaction = self.transaction.wrapping_add(1);
        let sent = self.transaction;
        stream.write_all(&tcp::encode(sent, unit, pdu)).map_err(|e| io_error(&self.addr, e))?;
        let mut header = [0u8; tcp::HEADER_LEN];
        stream.read_exact(&mut header).map_err(|e| io_error(&self.addr, e))?;
        let head = tcp::decode_header(&header)?;
        if head.transaction != sent {
            return Err(FrameError::TransactionMismatch {
                expected: sent,
                actual: head.transaction,
            }
            .into());
        }
        // The answer as an RTU frame: unit, PDU, CRC.
        let mut frame = vec![0u8; 1 + head.pdu_len];
        frame[0] = head.unit;
        stream.read_exact(&mut frame[1..]).map_err(|e| io_error(&self.addr, e))?;
        let crc = crc16_bytes(&frame);
        frame.extend_from_slice(&crc);
        Ok(frame)
    }
}

fn io_error(addr: &str, e: std::io::Error) -> TransportError {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => TransportError::Timeout,
        _ => TransportError::Io(format!("{addr}: {e}")),
    }
}

impl Transport for ModbusTcp {
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        let (unit, pdu) = rtu::split(request)?;
        let result = self.exchange(unit, pdu);
        if result.is_err() {
            // The stream may hold half an answer: start clean next time.
            self.stream = None;
        }
        result
    }
}
