//! Arbitrary bytes as a telemetry batch: decoding never panics, and whatever
//! decodes as v1 re-encodes to the same bytes (v1 has one encoding per batch).
#![no_main]

use ecowatt_proto::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = codec::decode(data) {
        if data[0] == codec::CODEC_V1 {
            assert_eq!(codec::encode(batch.registers, &batch.samples).unwrap(), data);
        }
    }
});
