//! Single-core micro benches: Modbus RTU frames and the telemetry codec.

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

/// Bytes per sample of codec v1 against raw registers and deflate.
pub fn codec(batch: usize, seed: u64) {
    use ecowatt_proto::codec::{self, Sample};
    use ecowatt_sim::model::{Model, ModelConfig};

    // 2026-06-21 00:00 UTC; local solar time = UTC.
    let midnight: u64 = 1_782_000_000_000;
    let poll_ms = 5_000;
    let day: Vec<Sample> = {
        let mut m = Model::new(ModelConfig { seed, ..ModelConfig::default() });
        (0..17_280u64)
            .map(|i| {
                let t = midnight + i * poll_ms;
                Sample { seq: i + 1, unix_ms: t, values: m.read(t).to_registers().to_vec() }
            })
            .collect()
    };
    // Night, as the course SIM answers: every register constant.
    let night: Vec<Sample> = (0..1_440u64)
        .map(|i| Sample {
            seq: i + 1,
            unix_ms: midnight + i * poll_ms,
            values: vec![0x0904, 0, 0x138F, 0x066A, 0x0663, 0, 0, 0x0161, 0x0032, 0],
        })
        .collect();
    outln!(
        "Telemetry codec, {batch}-sample batches of 10 registers (5 s poll); bytes per sample (per value):"
    );
    for (label, samples) in [("simulated day (24 h, seed)", &day), ("constant night (2 h)", &night)]
    {
        let (mut ours, mut raw, mut deflate, mut biggest) = (0usize, 0usize, 0usize, 0usize);
        for chunk in samples.chunks(batch) {
            let encoded = codec::encode(0x03FF, chunk).expect("valid batch");
            biggest = biggest.max(encoded.len());
            ours += encoded.len();
            // Raw: seq (8) + time (8) + 10 registers (20) per sample, as a naive device would send.
            let mut bytes = Vec::with_capacity(chunk.len() * 36);
            for s in chunk {
                bytes.extend_from_slice(&s.seq.to_be_bytes());
                bytes.extend_from_slice(&s.unix_ms.to_be_bytes());
                for v in &s.values {
                    bytes.extend_from_slice(&v.to_be_bytes());
                }
            }
            raw += bytes.len();
            deflate += miniz_oxide::deflate::compress_to_vec(&bytes, 6).len();
            assert_eq!(codec::decode(&encoded).expect("decodes").samples, chunk, "lossless");
        }
        let n = samples.len() as f64;
        let per = |b: usize| format!("{:>6.2} ({:.2})", b as f64 / n, b as f64 / n / 10.0);
        outln!(
            "  {label:<28} codec v1 {}   raw {}   deflate {}   largest batch {biggest} B",
            per(ours),
            per(raw),
            per(deflate)
        );
    }
    outln!(
        "  (raw registers alone, without seq and time: 20 B per sample; encoder state: a few integers besides its output)"
    );
}
