//! Modbus TCP framing: a 7-byte MBAP header (transaction id, protocol id 0,
//! length, unit id) followed by the PDU; no CRC (TCP checks integrity).

use alloc::vec::Vec;

use super::{FrameError, Request, Response};

/// Length of the MBAP header, unit id included.
pub const HEADER_LEN: usize = 7;
/// Largest PDU (Modbus Application Protocol v1.1b3, 4.1).
pub const MAX_PDU_LEN: usize = 253;

/// A decoded MBAP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Transaction identifier, echoed by the server.
    pub transaction: u16,
    /// Unit identifier (the slave address behind a gateway).
    pub unit: u8,
    /// Length of the PDU that follows the header.
    pub pdu_len: usize,
}

/// Encodes an MBAP header and `pdu` as one ADU.
pub fn encode(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut adu = Vec::with_capacity(HEADER_LEN + pdu.len());
    adu.extend_from_slice(&transaction.to_be_bytes());
    adu.extend_from_slice(&0u16.to_be_bytes());
    // The length field counts the unit id and the PDU; a PDU is at most 253 bytes.
    adu.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    adu.push(unit);
    adu.extend_from_slice(pdu);
    adu
}

/// Encodes a request ADU.
pub fn encode_request(transaction: u16, unit: u8, request: &Request) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(5);
    request.encode_pdu(&mut pdu);
    encode(transaction, unit, &pdu)
}

/// Encodes a response ADU.
pub fn encode_response(transaction: u16, unit: u8, response: &Response) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(2 + 2 * 125);
    response.encode_pdu(&mut pdu);
    encode(transaction, unit, &pdu)
}

/// Decodes and checks an MBAP header.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let protocol = u16::from_be_bytes([bytes[2], bytes[3]]);
    if protocol != 0 {
        return Err(FrameError::NotModbusProtocol { protocol });
    }
    let length = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
    if length < 2 {
        return Err(FrameError::TooShort { len: length, min: 2 });
    }
    if length > MAX_PDU_LEN + 1 {
        return Err(FrameError::TooLong { len: length, max: MAX_PDU_LEN + 1 });
    }
    Ok(Header {
        transaction: u16::from_be_bytes([bytes[0], bytes[1]]),
        unit: bytes[6],
        pdu_len: length - 1,
    })
}
