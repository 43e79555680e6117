//! Properties: decode(encode(x)) == x, and any single flipped bit is detected.

use ecowatt_proto::modbus::{Exception, ExceptionCode, Request, Response, rtu, tcp};
use proptest::prelude::*;

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u16>(), 1..=125u16)
            .prop_map(|(start, quantity)| Request::ReadHoldingRegisters { start, quantity }),
        (any::<u16>(), any::<u16>())
            .prop_map(|(address, value)| Request::WriteSingleRegister { address, value }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        proptest::collection::vec(any::<u16>(), 0..=125).prop_map(Response::ReadHoldingRegisters),
        (any::<u16>(), any::<u16>())
            .prop_map(|(address, value)| Response::WriteSingleRegister { address, value }),
        (prop_oneof![Just(3u8), Just(6u8)], 1..=0x7Fu8).prop_map(|(function, code)| {
            Response::Exception(Exception { function, code: ExceptionCode::from(code) })
        }),
    ]
}

proptest! {
    #[test]
    fn request_round_trip(slave in any::<u8>(), req in request()) {
        let frame = rtu::encode_request(slave, &req);
        prop_assert_eq!(rtu::decode_request(&frame).unwrap(), (slave, req.clone()));
        let adu = tcp::encode_request(7, slave, &req);
        let header = tcp::decode_header(adu[..7].try_into().unwrap()).unwrap();
        prop_assert_eq!(header.unit, slave);
        prop_assert_eq!(Request::decode_pdu(&adu[7..]).unwrap(), req);
    }

    #[test]
    fn response_round_trip(slave in any::<u8>(), resp in response()) {
        let frame = rtu::encode_response(slave, &resp);
        prop_assert_eq!(rtu::decode_response(&frame).unwrap(), (slave, resp.clone()));
        prop_assert_eq!(rtu::expected_response_len(&frame[..3]), Some(frame.len()));
        let adu = tcp::encode_response(9, slave, &resp);
        prop_assert_eq!(Response::decode_pdu(&adu[7..]).unwrap(), resp);
    }

    #[test]
    fn any_single_bit_flip_is_detected(
        slave in any::<u8>(), resp in response(), bit in any::<prop::sample::Index>()
    ) {
        let frame = rtu::encode_response(slave, &resp);
        let bit = bit.index(frame.len() * 8);
        let mut flipped = frame.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(rtu::decode_response(&flipped).is_err(), "flip of bit {} accepted", bit);
    }

    #[test]
    fn any_single_bit_flip_in_a_request_is_detected(
        slave in any::<u8>(), req in request(), bit in 0..64usize
    ) {
        let mut frame = rtu::encode_request(slave, &req);
        frame[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(rtu::decode_request(&frame).is_err(), "flip of bit {} accepted", bit);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = rtu::decode_response(&bytes);
        let _ = rtu::decode_request(&bytes);
        let _ = rtu::expected_response_len(&bytes);
    }
}
