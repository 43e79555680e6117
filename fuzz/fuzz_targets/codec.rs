//! Arbitrary bytes as a telemetry batch: decoding never panics, and whatever
//! decodes re-encodes to the same bytes.
#![no_main]

use ecowatt_proto::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = codec::decode(data) {
        assert_eq!(codec::encode(batch.registers, &batch.samples).unwrap(), data);
    }
});
