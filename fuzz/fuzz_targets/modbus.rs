//! Arbitrary bytes as Modbus RTU and TCP frames: decoding never panics, and
//! whatever decodes re-encodes to the same bytes.
#![no_main]

use ecowatt_proto::modbus::{Request, Response, rtu, tcp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((slave, r)) = rtu::decode_request(data) {
        assert_eq!(rtu::encode_request(slave, &r), data);
    }
    if let Ok((slave, r)) = rtu::decode_response(data) {
        assert_eq!(rtu::encode_response(slave, &r), data);
    }
    let _ = rtu::expected_response_len(data);
    if data.len() >= tcp::HEADER_LEN {
        let _ = tcp::decode_header(data[..tcp::HEADER_LEN].try_into().unwrap());
        let _ = Request::decode_pdu(&data[tcp::HEADER_LEN..]);
        let _ = Response::decode_pdu(&data[tcp::HEADER_LEN..]);
    }
});
