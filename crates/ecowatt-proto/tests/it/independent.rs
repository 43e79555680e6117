//! Our frames against `rmodbus`, an independent Modbus implementation.

use ecowatt_proto::modbus::{Exception, ExceptionCode, Request, Response, rtu};
use proptest::prelude::*;
use rmodbus::server::ModbusFrame;
use rmodbus::server::context::ModbusContext;
use rmodbus::server::storage::ModbusStorageSmall;
use rmodbus::{ModbusProto, client::ModbusRequest};

/// Runs one RTU request frame through an rmodbus slave holding `holdings`.
fn rmodbus_slave(unit: u8, holdings: &mut ModbusStorageSmall, frame: &[u8]) -> Vec<u8> {
    let mut response = Vec::new();
    let mut f = ModbusFrame::new(unit, frame, ModbusProto::Rtu, &mut response);
    f.parse().expect("rmodbus parses our request");
    if f.processing_required {
        if f.readonly {
            f.process_read(holdings).expect("read");
        } else {
            f.process_write(holdings).expect("write");
        }
    }
    assert!(f.response_required);
    f.finalize_response().unwrap();
    response
}

proptest! {
    #[test]
    fn read_requests_match_rmodbus(slave in 1..=247u8, start in any::<u16>(), quantity in 1..=125u16) {
        let mut theirs = Vec::new();
        ModbusRequest::new(slave, ModbusProto::Rtu)
            .generate_get_holdings(start, quantity, &mut theirs)
            .unwrap();
        let ours = rtu::encode_request(slave, &Request::ReadHoldingRegisters { start, quantity });
        prop_assert_eq!(ours, theirs);
    }

    #[test]
    fn write_requests_match_rmodbus(slave in 1..=247u8, address in any::<u16>(), value in any::<u16>()) {
        let mut theirs = Vec::new();
        ModbusRequest::new(slave, ModbusProto::Rtu)
            .generate_set_holding(address, value, &mut theirs)
            .unwrap();
        let ours = rtu::encode_request(slave, &Request::WriteSingleRegister { address, value });
        prop_assert_eq!(ours, theirs);
    }

    #[test]
    fn rmodbus_parses_our_read_responses(values in proptest::collection::vec(any::<u16>(), 1..=125)) {
        let mut client = ModbusRequest::new(0x11, ModbusProto::Rtu);
        let mut req = Vec::new();
        client.generate_get_holdings(0, values.len() as u16, &mut req).unwrap();
        let ours = rtu::encode_response(0x11, &Response::ReadHoldingRegisters(values.clone()));
        let mut parsed = Vec::new();
        client.parse_u16(&ours, &mut parsed).unwrap();
        prop_assert_eq!(parsed, values);
    }

    #[test]
    fn we_parse_rmodbus_slave_answers(
        start in 0..900u16, quantity in 1..=100u16, seed in any::<u16>(), value in any::<u16>()
    ) {
        let mut holdings = ModbusStorageSmall::new();
        for i in 0..1000u16 {
            holdings.set_holding(i, i.wrapping_mul(31).wrapping_add(seed)).unwrap();
        }
        let read = Request::ReadHoldingRegisters { start, quantity };
        let answer = rmodbus_slave(0x11, &mut holdings, &rtu::encode_request(0x11, &read));
        let expected: Vec<u16> =
            (start..start + quantity).map(|i| i.wrapping_mul(31).wrapping_add(seed)).collect();
        prop_assert_eq!(
            rtu::decode_reply(0x11, &read, &answer).unwrap(),
            Response::ReadHoldingRegisters(expected)
        );

        let write = Request::WriteSingleRegister { address: start, value };
        let frame = rtu::encode_request(0x11, &write);
        let answer = rmodbus_slave(0x11, &mut holdings, &frame);
        prop_assert_eq!(&answer, &frame, "a write is answered by its echo");
        prop_assert_eq!(holdings.get_holding(start).unwrap(), value);
    }
}

#[test]
fn we_parse_rmodbus_exceptions() {
    let mut holdings = ModbusStorageSmall::new();
    // Beyond the 1000 registers rmodbus's small storage holds.
    let read = Request::ReadHoldingRegisters { start: 2000, quantity: 2 };
    let answer = rmodbus_slave(0x11, &mut holdings, &rtu::encode_request(0x11, &read));
    assert_eq!(
        rtu::decode_reply(0x11, &read, &answer).unwrap(),
        Response::Exception(Exception { function: 3, code: ExceptionCode::IllegalDataAddress })
    );
}
