//! Modbus RTU framing: `[slave][function][data...][CRC lo][CRC hi]`.

use alloc::vec::Vec;

use super::{FrameError, READ_HOLDING_REGISTERS, Request, Response, WRITE_SINGLE_REGISTER};
use crate::crc::{crc16, crc16_bytes};

/// Smallest RTU frame: slave, function, two CRC bytes.
pub const MIN_FRAME_LEN: usize = 4;
/// Largest RTU frame (Modbus over serial line v1.02, 2.5.1).
pub const MAX_FRAME_LEN: usize = 256;

fn seal(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16_bytes(&frame);
    frame.extend_from_slice(&crc);
    frame
}

/// Encodes a request to `slave` as a complete RTU frame.
pub fn encode_request(slave: u8, request: &Request) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8);
    frame.push(slave);
    request.encode_pdu(&mut frame);
    seal(frame)
}

/// Encodes a response from `slave` as a complete RTU frame.
pub fn encode_response(slave: u8, response: &Response) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + 2 * 125);
    frame.push(slave);
    response.encode_pdu(&mut frame);
    seal(frame)
}

/// Checks length bounds and CRC, and splits a frame into slave address and PDU.
pub fn split(frame: &[u8]) -> Result<(u8, &[u8]), FrameError> {
    if frame.len() < MIN_FRAME_LEN {
        return Err(FrameError::TooShort { len: frame.len(), min: MIN_FRAME_LEN });
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong { len: frame.len(), max: MAX_FRAME_LEN });
    }
    let (body, crc) = frame.split_at(frame.len() - 2);
    let expected = crc16(body);
    let actual = u16::from_le_bytes([crc[0], crc[1]]);
    if expected != actual {
        return Err(FrameError::CrcMismatch { expected, actual });
    }
    Ok((body[0], &body[1..]))
}

/// Decodes a request frame (the slave's side).
pub fn decode_request(frame: &[u8]) -> Result<(u8, Request), FrameError> {
    let (slave, pdu) = split(frame)?;
    Ok((slave, Request::decode_pdu(pdu)?))
}

/// Decodes any response frame, without relating it to a request.
pub fn decode_response(frame: &[u8]) -> Result<(u8, Response), FrameError> {
    let (slave, pdu) = split(frame)?;
    Ok((slave, Response::decode_pdu(pdu)?))
}

/// Decodes `frame` as the answer of `slave` to `request`: CRC, slave address,
/// function, byte count and register count, or the exact echo of a write.
/// An exception response is `Ok(Response::Exception(_))`: the device said no.
pub fn decode_reply(slave: u8, request: &Request, frame: &[u8]) -> Result<Response, FrameError> {
    let (actual, pdu) = split(frame).map_err(|e| match (e, expected_response_len(frame)) {
        // A CRC that fails on fewer bytes than the answer announces: cut short.
        (FrameError::CrcMismatch { .. } | FrameError::TooShort { .. }, Some(expected))
            if expected > frame.len() =>
        {
            FrameError::Incomplete { len: frame.len(), expected }
        }
        (e, _) => e,
    })?;
    if actual != slave {
        return Err(FrameError::SlaveMismatch { expected: slave, actual });
    }
    request.check_response(Response::decode_pdu(pdu)?)
}

/// Given the first bytes of a response arriving on a serial line, the total
/// length of the frame, once it can be known (2 bytes for writes and
/// exceptions, 3 for reads). `None` means: read more.
pub fn expected_response_len(head: &[u8]) -> Option<usize> {
    let function = *head.get(1)?;
    if function & 0x80 != 0 {
        return Some(5);
    }
    match function {
        READ_HOLDING_REGISTERS => head.get(2).map(|&count| 5 + usize::from(count)),
        WRITE_SINGLE_REGISTER => Some(8),
        // Unknown function: the caller can only wait for the line to go quiet.
        _ => None,
    }
}
