//! Arbitrary bytes as a sealed envelope: parsing and opening never panic, and
//! nothing opens without the key (the fuzzer has no way to forge a tag).
#![no_main]

use ecowatt_proto::seal::{self, Keys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = Keys::derive(&[7u8; 16]);
    let _ = seal::Header::parse(data);
    assert!(seal::open(&keys, data, None).is_err());
    assert!(seal::open(&keys, data, Some(1)).is_err());
});
