//! Arbitrary bytes as every message body: decoding never panics, and whatever
//! decodes re-encodes to the same bytes.
#![no_main]

use ecowatt_proto::messages::{ErrorMessage, SyncRequest, SyncResponse, TelemetryAck, TelemetryUpload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = SyncRequest::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(m) = SyncResponse::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(m) = TelemetryUpload::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(m) = TelemetryAck::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(m) = ErrorMessage::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
