//! Every frame in `shared/reference/inverter-sim-api.md` ("Known-good frames").

use ecowatt_proto::hex;
use ecowatt_proto::modbus::{Exception, ExceptionCode, FrameError, Request, Response, rtu};
use ecowatt_proto::registers::REGISTERS;

fn bytes(text: &str) -> Vec<u8> {
    hex::decode(text).unwrap()
}

#[test]
fn read_two_registers_request() {
    let req = Request::ReadHoldingRegisters { start: 0, quantity: 2 };
    assert_eq!(hex::encode_upper(&rtu::encode_request(0x11, &req)), "110300000002C69B");
    assert_eq!(rtu::decode_request(&bytes("110300000002C69B")).unwrap(), (0x11, req));
}

#[test]
fn read_two_registers_response() {
    let req = Request::ReadHoldingRegisters { start: 0, quantity: 2 };
    let resp = rtu::decode_reply(0x11, &req, &bytes("1103040904002A2870")).unwrap();
    assert_eq!(resp, Response::ReadHoldingRegisters(vec![0x0904, 0x002A]));
    let Response::ReadHoldingRegisters(values) = resp else { unreachable!() };
    assert_eq!(REGISTERS[0].to_engineering(values[0]), 230.8);
    assert_eq!(REGISTERS[1].to_engineering(values[1]), 4.2);
    assert_eq!(
        hex::encode_upper(&rtu::encode_response(0x11, &Response::ReadHoldingRegisters(values))),
        "1103040904002A2870"
    );
}

#[test]
fn read_all_ten_and_the_night_capture() {
    let req = Request::ReadHoldingRegisters { start: 0, quantity: 10 };
    assert_eq!(hex::encode_upper(&rtu::encode_request(0x11, &req)), "11030000000AC75D");
    let frame = bytes("11031409040000138F066A066300000000016100320000BAAD");
    let Response::ReadHoldingRegisters(values) = rtu::decode_reply(0x11, &req, &frame).unwrap()
    else {
        panic!("not a read response")
    };
    assert_eq!(values, [0x0904, 0, 0x138F, 0x066A, 0x0663, 0, 0, 0x0161, 0x0032, 0]);
    assert_eq!(REGISTERS[2].to_engineering(values[2]), 50.07);
    assert_eq!(REGISTERS[7].to_engineering(values[7]), 35.3);
    assert_eq!(values[8], 50);
}

#[test]
fn write_register_8() {
    for (value, text) in [(16, "1106000800100B54"), (50, "1106000800328B4D")] {
        let req = Request::WriteSingleRegister { address: 8, value };
        let frame = rtu::encode_request(0x11, &req);
        assert_eq!(hex::encode_upper(&frame), text);
        // Success is the exact echo of the request.
        assert_eq!(
            rtu::decode_reply(0x11, &req, &frame).unwrap(),
            Response::WriteSingleRegister { address: 8, value }
        );
    }
}

#[test]
fn exception_frames() {
    let write = Request::WriteSingleRegister { address: 8, value: 500 };
    assert_eq!(
        rtu::decode_reply(0x11, &write, &bytes("11860303A4")).unwrap(),
        Response::Exception(Exception { function: 6, code: ExceptionCode::IllegalDataValue })
    );
    let read = Request::ReadHoldingRegisters { start: 10, quantity: 1 };
    assert_eq!(
        rtu::decode_reply(0x11, &read, &bytes("118302C134")).unwrap(),
        Response::Exception(Exception { function: 3, code: ExceptionCode::IllegalDataAddress })
    );
    let emulated = Response::Exception(Exception { function: 1, code: ExceptionCode::from(1) });
    assert_eq!(hex::encode_upper(&rtu::encode_response(0x01, &emulated)), "0181018190");
}

#[test]
fn each_validation_failure_is_its_own_error() {
    let read2 = Request::ReadHoldingRegisters { start: 0, quantity: 2 };
    let good = bytes("1103040904002A2870");
    let reply = |frame: &[u8]| rtu::decode_reply(0x11, &read2, frame);

    assert_eq!(reply(&good[..3]), Err(FrameError::Incomplete { len: 3, expected: 9 }));
    assert_eq!(reply(&[0x11, 0x2B, 0]), Err(FrameError::TooShort { len: 3, min: 4 }));
    assert_eq!(reply(&[0u8; 300]), Err(FrameError::TooLong { len: 300, max: 256 }));
    let mut bad_crc = good.clone();
    bad_crc[8] ^= 0xFF;
    assert!(matches!(reply(&bad_crc), Err(FrameError::CrcMismatch { .. })));
    let other_slave = rtu::encode_response(0x12, &Response::ReadHoldingRegisters(vec![1, 2]));
    assert_eq!(
        reply(&other_slave),
        Err(FrameError::SlaveMismatch { expected: 0x11, actual: 0x12 })
    );
    let write_echo =
        rtu::encode_response(0x11, &Response::WriteSingleRegister { address: 8, value: 1 });
    assert_eq!(reply(&write_echo), Err(FrameError::FunctionMismatch { expected: 3, actual: 6 }));
    let three = rtu::encode_response(0x11, &Response::ReadHoldingRegisters(vec![1, 2, 3]));
    assert_eq!(reply(&three), Err(FrameError::QuantityMismatch { requested: 2, returned: 3 }));
    // Byte count field says 4, but 6 data bytes follow (CRC recomputed so only the count is wrong).
    let mut body = vec![0x11, 0x03, 0x04, 0, 1, 0, 2, 0, 3];
    body.extend_from_slice(&ecowatt_proto::crc::crc16_bytes(&body));
    assert_eq!(reply(&body), Err(FrameError::ByteCountMismatch { declared: 4, actual: 6 }));
    let mut odd = vec![0x11, 0x03, 0x03, 0, 1, 0];
    odd.extend_from_slice(&ecowatt_proto::crc::crc16_bytes(&odd));
    assert_eq!(reply(&odd), Err(FrameError::OddByteCount { count: 3 }));
    let mut unknown = vec![0x11, 0x2B, 0x00];
    unknown.extend_from_slice(&ecowatt_proto::crc::crc16_bytes(&unknown));
    assert_eq!(reply(&unknown), Err(FrameError::UnsupportedFunction { function: 0x2B }));

    let write = Request::WriteSingleRegister { address: 8, value: 16 };
    let wrong_echo =
        rtu::encode_request(0x11, &Request::WriteSingleRegister { address: 8, value: 17 });
    assert_eq!(
        rtu::decode_reply(0x11, &write, &wrong_echo),
        Err(FrameError::EchoMismatch { expected: (8, 16), actual: (8, 17) })
    );
    let mut short_write = vec![0x11, 0x06, 0x00, 0x08];
    short_write.extend_from_slice(&ecowatt_proto::crc::crc16_bytes(&short_write));
    assert_eq!(
        rtu::decode_reply(0x11, &write, &short_write),
        Err(FrameError::LengthMismatch { function: 6, expected: 5, actual: 3 })
    );
    // All codes are distinct.
    let codes = [
        FrameError::TooShort { len: 0, min: 0 },
        FrameError::TooLong { len: 0, max: 0 },
        FrameError::CrcMismatch { expected: 0, actual: 0 },
        FrameError::SlaveMismatch { expected: 0, actual: 0 },
        FrameError::FunctionMismatch { expected: 0, actual: 0 },
        FrameError::UnsupportedFunction { function: 0 },
        FrameError::LengthMismatch { function: 0, expected: 0, actual: 0 },
        FrameError::ByteCountMismatch { declared: 0, actual: 0 },
        FrameError::OddByteCount { count: 0 },
        FrameError::QuantityMismatch { requested: 0, returned: 0 },
        FrameError::EchoMismatch { expected: (0, 0), actual: (0, 0) },
        FrameError::NotModbusProtocol { protocol: 0 },
        FrameError::TransactionMismatch { expected: 0, actual: 0 },
    ]
    .map(|e| e.code());
    let mut unique = codes.to_vec();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), codes.len());
}

#[test]
fn serial_framing_knows_the_response_length_early() {
    assert_eq!(rtu::expected_response_len(&[0x11]), None);
    assert_eq!(rtu::expected_response_len(&[0x11, 0x03]), None);
    assert_eq!(rtu::expected_response_len(&[0x11, 0x03, 0x14]), Some(25));
    assert_eq!(rtu::expected_response_len(&[0x11, 0x06]), Some(8));
    assert_eq!(rtu::expected_response_len(&[0x11, 0x86]), Some(5));
}

#[test]
fn modbus_tcp_header() {
    use ecowatt_proto::modbus::tcp;
    let req = Request::ReadHoldingRegisters { start: 0, quantity: 10 };
    let adu = tcp::encode_request(0x0102, 0x11, &req);
    assert_eq!(adu, [0x01, 0x02, 0, 0, 0, 6, 0x11, 0x03, 0, 0, 0, 10]);
    let header = tcp::decode_header(adu[..7].try_into().unwrap()).unwrap();
    assert_eq!(header, tcp::Header { transaction: 0x0102, unit: 0x11, pdu_len: 5 });
    assert_eq!(Request::decode_pdu(&adu[7..]).unwrap(), req);
    assert_eq!(
        tcp::decode_header(&[0, 1, 0, 1, 0, 6, 1]),
        Err(FrameError::NotModbusProtocol { protocol: 1 })
    );
    assert_eq!(
        tcp::decode_header(&[0, 1, 0, 0, 0, 1, 1]),
        Err(FrameError::TooShort { len: 1, min: 2 })
    );
    assert_eq!(
        tcp::decode_header(&[0, 1, 0, 0, 1, 0, 1]),
        Err(FrameError::TooLong { len: 256, max: 254 })
    );
}

#[test]
fn an_answer_cut_short_is_incomplete_and_a_whole_garbled_one_a_crc_error() {
    let req = Request::ReadHoldingRegisters { start: 0, quantity: 10 };
    let frame = bytes("11031409040000138F066A066300000000016100320000BAAD");
    for cut in [4, 10, 24] {
        assert_eq!(
            rtu::decode_reply(0x11, &req, &frame[..cut]),
            Err(FrameError::Incomplete { len: cut, expected: 25 })
        );
    }
    let mut garbled = frame.clone();
    garbled[10] ^= 0x01;
    assert!(matches!(rtu::decode_reply(0x11, &req, &garbled), Err(FrameError::CrcMismatch { .. })));
}
