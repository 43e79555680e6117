//! Modbus TCP: the core's RTU frames are re-framed with an MBAP header on the
//! way out and given a CRC on the way back, so the core validates one format.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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
        // One deadline for the whole answer, however it is cut into reads.
        let deadline = Instant::now() + self.timeout;
        if self.stream.is_none() {
            self.stream = Some(self.connect()?);
        }
        let stream = self.stream.as_mut().expect("connected above");
        self.transaction = self.transaction.wrapping_add(1);
        let sent = self.transaction;
        stream.write_all(&tcp::encode(sent, unit, pdu)).map_err(|e| io_error(&self.addr, e))?;
        let mut header = [0u8; tcp::HEADER_LEN];
        read_by(stream, &mut header, deadline, &self.addr)?;
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
        read_by(stream, &mut frame[1..], deadline, &self.addr)?;
        let crc = crc16_bytes(&frame);
        frame.extend_from_slice(&crc);
        Ok(frame)
    }
}

/// Fills `buf` before `deadline`, however slowly the peer sends: each read
/// waits only for the time left, so a peer dribbling bytes cannot stretch
/// the timeout.
fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    addr: &str,
) -> Result<(), TransportError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(|e| io_error(addr, e))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(TransportError::Io(format!(
                    "{addr}: the inverter closed the connection {}",
                    if filled == 0 { "without answering" } else { "in the middle of its answer" }
                )));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(addr, e)),
        }
    }
    Ok(())
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
