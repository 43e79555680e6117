//! Arbitrary bytes as a v2 telemetry batch (the version byte is forced, so
//! every input reaches the v2 decoder): decoding never panics nor allocates
//! beyond the sample limit, and whatever decodes re-encodes (v2 lets the
//! encoder choose models, so not to the same bytes) to the same samples.
#![no_main]

use ecowatt_proto::codec::{self, CODEC_V2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(CODEC_V2);
    bytes.extend_from_slice(data);
    if let Ok(batch) = codec::decode(&bytes) {
        assert!(batch.samples.len() <= codec::MAX_SAMPLES);
        let again = codec::encode_as(CODEC_V2, batch.registers, &batch.samples).unwrap();
        assert_eq!(codec::decode(&again).unwrap(), batch);
    }
});
