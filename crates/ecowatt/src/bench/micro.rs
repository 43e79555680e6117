//! Single-core micro benches: Modbus RTU frames.

use std::hint::black_box;

use ecowatt_proto::crc::crc16;
use ecowatt_proto::modbus::{Request, Response, rtu};

use super::measure::rate;

/// Modbus RTU encode/decode and CRC operations per second.
pub fn frames(iterations: u64) {
    outln!("Modbus RTU frames, {iterations} operations each (single thread):");
    let read10 = Request::ReadHoldingRegisters { start: 0, quantity: 10 };
    let answer = rtu::encode_response(0x11, &Response::ReadHoldingRegisters((0..10).collect()));
    rate("CRC-16 of a 25-byte frame", iterations, |i| {
        black_box(crc16(black_box(&answer[..23 + (i & 1) as usize])));
    });
    rate("encode read request (0x03, 10 registers)", iterations, |i| {
        let req = Request::ReadHoldingRegisters { start: (i & 1) as u16, quantity: 10 };
        black_box(rtu::encode_request(0x11, black_box(&req)));
    });
    rate("encode read response (10 registers)", iterations, |i| {
        let resp = Response::ReadHoldingRegisters(vec![i as u16; 10]);
        black_box(rtu::encode_response(0x11, black_box(&resp)));
    });
    rate("decode + validate read response", iterations, |_| {
        black_box(rtu::decode_reply(0x11, &read10, black_box(&answer)).unwrap());
    });
    let write = Request::WriteSingleRegister { address: 8, value: 50 };
    let echo = rtu::encode_request(0x11, &write);
    rate("decode + validate write echo", iterations, |_| {
        black_box(rtu::decode_reply(0x11, &write, black_box(&echo)).unwrap());
    });
}
