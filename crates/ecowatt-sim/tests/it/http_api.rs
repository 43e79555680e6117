//! The SIM HTTP API as the course documents it.

use axum::http::StatusCode;
use ecowatt_proto::hex;
use ecowatt_proto::modbus::{Exception, ExceptionCode, Request, Response, rtu};
use ecowatt_proto::registers::REGISTERS;

use crate::fixture::Fixture;

fn read_frame(slave: u8, start: u16, quantity: u16) -> String {
    hex::encode_upper(&rtu::encode_request(
        slave,
        &Request::ReadHoldingRegisters { start, quantity },
    ))
}

fn write_frame(slave: u8, address: u16, value: u16) -> String {
    hex::encode_upper(&rtu::encode_request(slave, &Request::WriteSingleRegister { address, value }))
}

fn decode(request: &str, answer: &str) -> Response {
    let (slave, req) = rtu::decode_request(&hex::decode(request).unwrap()).unwrap();
    rtu::decode_reply(slave, &req, &hex::decode(answer).unwrap())
        .unwrap_or_else(|e| panic!("answer {answer} to {request}: {e}"))
}

fn registers(response: Response) -> Vec<u16> {
    match response {
        Response::ReadHoldingRegisters(v) => v,
        other => panic!("expected registers, got {other:?}"),
    }
}

#[tokio::test]
async fn reference_read_gets_a_crc_correct_plausible_answer() {
    let f = Fixture::start(1, None).await;
    let answer = f.frame("read", "110300000002C69B").await;
    assert_eq!(answer, answer.to_uppercase(), "answers are uppercase hex");
    let v = registers(decode("110300000002C69B", &answer));
    let vac = REGISTERS[0].to_engineering(v[0]);
    let iac = REGISTERS[1].to_engineering(v[1]);
    assert!((210.0..=250.0).contains(&vac), "Vac1 {vac}");
    assert!((1.0..=50.0).contains(&iac), "Iac1 {iac} at noon");

    let all = registers(decode("11030000000AC75D", &f.frame("read", "11030000000AC75D").await));
    assert_eq!(all.len(), 10);
    assert_eq!(all[8], 100, "export limit starts at 100 %");
    let fac = REGISTERS[2].to_engineering(all[2]);
    assert!((49.8..=50.2).contains(&fac), "Fac1 {fac}");
}

#[tokio::test]
async fn writes_echo_and_out_of_range_is_exception_03() {
    let f = Fixture::start(1, None).await;
    assert_eq!(f.frame("write", "1106000800100B54").await, "1106000800100B54");
    let after =
        registers(decode(&read_frame(0x11, 8, 1), &f.frame("read", &read_frame(0x11, 8, 1)).await));
    assert_eq!(after, [16]);

    let answer = f.frame("write", &write_frame(0x11, 8, 500)).await;
    assert_eq!(answer, "11860303A4");
    // Read-only registers refuse writes too.
    let answer = f.frame("write", &write_frame(0x11, 9, 1)).await;
    assert_eq!(
        decode(&write_frame(0x11, 9, 1), &answer),
        Response::Exception(Exception { function: 6, code: ExceptionCode::IllegalDataAddress })
    );
}

#[tokio::test]
async fn valid_frames_asking_for_invalid_things_get_exceptions() {
    let f = Fixture::start(1, None).await;
    // Address beyond the map: the reference's 118302C134.
    assert_eq!(f.frame("read", &read_frame(0x11, 9, 2)).await, "118302C134");
    let zero = read_frame(0x11, 0, 0);
    assert_eq!(
        decode(&zero, &f.frame("read", &zero).await),
        Response::Exception(Exception { function: 3, code: ExceptionCode::IllegalDataValue })
    );
    // A write frame on the read endpoint is an illegal function there.
    let w = write_frame(0x11, 8, 10);
    assert_eq!(
        decode(&w, &f.frame("read", &w).await),
        Response::Exception(Exception { function: 6, code: ExceptionCode::IllegalFunction })
    );
    // An unknown function code with a good CRC.
    let mut body = vec![0x11, 0x2B, 0x0E, 0x01];
    body.extend_from_slice(&ecowatt_proto::crc::crc16_bytes(&body));
    let answer = hex::decode(&f.frame("read", &hex::encode_upper(&body)).await).unwrap();
    assert_eq!(answer[..3], [0x11, 0xAB, 0x01]);
}

#[tokio::test]
async fn invalid_frames_get_a_blank_answer() {
    let f = Fixture::start(1, None).await;
    for bad in ["110300000002C69C", "1103", "not hex", "", "110300000002C6", "120300000002C6A8"] {
        assert_eq!(f.frame("read", bad).await, "", "{bad:?} should get a blank answer");
    }
}

#[tokio::test]
async fn malformed_json_is_400_with_an_empty_frame() {
    let f = Fixture::start(1, None).await;
    for body in ["{", "frame=1103", r#"{"frame": 17}"#, "[]"] {
        let (status, text) = f.post("/api/inverter/read", body, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(text, r#"{"frame":""}"#);
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let f = Fixture::start(1, None).await;
    let huge = format!(r#"{{"frame":"{}"}}"#, "0".repeat(100_000));
    let (status, _) = f.post("/api/inverter/read", &huge, None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn the_api_key_is_checked_when_configured() {
    let f = Fixture::start(1, Some("c2VjcmV0LWtleQ==")).await;
    let body = r#"{"frame":"110300000002C69B"}"#;
    let (status, text) = f.post("/api/inverter/read", body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(text.contains("missing_api_key"), "{text}");
    let (status, text) = f.post("/api/inverter/read", body, Some("Bearer c2VjcmV0LWtleQ==")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the raw key, not Bearer");
    assert!(text.contains("bad_api_key"), "{text}");
    let (status, _) = f.post("/api/inverter/read", body, Some("c2VjcmV0LWtleQ==")).await;
    assert_eq!(status, StatusCode::OK);
    let flag = r#"{"errorType":"PACKET_DROP"}"#;
    assert_eq!(f.post("/api/user/error-flag/add", flag, None).await.0, StatusCode::UNAUTHORIZED);
    // The error-emulation endpoint needs no key.
    let emu = r#"{"slaveAddress":1,"functionCode":1,"errorType":"EXCEPTION","exceptionCode":1,"delayMs":0}"#;
    assert_eq!(f.post("/api/inverter/error", emu, None).await.0, StatusCode::OK);
}

async fn add_flag(f: &Fixture, body: &str) {
    let (status, text) = f.post("/api/user/error-flag/add", body, None).await;
    assert_eq!(status, StatusCode::OK, "{body} -> {text}");
}

#[tokio::test]
async fn error_flags_are_one_shot_and_each_does_what_it_says() {
    let f = Fixture::start(1, None).await;
    let read = read_frame(0x11, 0, 10);

    add_flag(&f, r#"{"errorType":"EXCEPTION","exceptionCode":6}"#).await;
    assert_eq!(
        decode(&read, &f.frame("read", &read).await),
        Response::Exception(Exception { function: 3, code: ExceptionCode::SlaveDeviceBusy })
    );
    // One-shot: the next request is normal again.
    registers(decode(&read, &f.frame("read", &read).await));

    add_flag(&f, r#"{"errorType":"CRC_ERROR"}"#).await;
    let answer = hex::decode(&f.frame("read", &read).await).unwrap();
    assert_eq!(answer.len(), 25);
    assert!(matches!(
        rtu::split(&answer),
        Err(ecowatt_proto::modbus::FrameError::CrcMismatch { .. })
    ));

    add_flag(&f, r#"{"errorType":"CORRUPT"}"#).await;
    let answer = hex::decode(&f.frame("read", &read).await).unwrap();
    assert!(rtu::decode_response(&answer).is_err(), "garbage must not decode: {answer:02X?}");

    add_flag(&f, r#"{"errorType":"PACKET_DROP"}"#).await;
    assert_eq!(f.frame("read", &read).await, "");

    add_flag(&f, r#"{"errorType":"DELAY","delayMs":150}"#).await;
    let started = std::time::Instant::now();
    registers(decode(&read, &f.frame("read", &read).await));
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));

    // Flags queue up, one per request, in order.
    add_flag(&f, r#"{"errorType":"PACKET_DROP"}"#).await;
    add_flag(&f, r#"{"errorType":"EXCEPTION","exceptionCode":4}"#).await;
    assert_eq!(f.frame("read", &read).await, "");
    assert!(matches!(decode(&read, &f.frame("read", &read).await), Response::Exception(_)));
    registers(decode(&read, &f.frame("read", &read).await));
}

#[tokio::test]
async fn a_dropped_write_has_no_effect_but_a_garbled_answer_does() {
    let f = Fixture::start(1, None).await;
    add_flag(&f, r#"{"errorType":"PACKET_DROP"}"#).await;
    assert_eq!(f.frame("write", &write_frame(0x11, 8, 30)).await, "");
    assert_eq!(f.state().sim.lock().unwrap().snapshot()[0].limit_pct, 100);
    add_flag(&f, r#"{"errorType":"CRC_ERROR"}"#).await;
    assert_ne!(f.frame("write", &write_frame(0x11, 8, 30)).await, write_frame(0x11, 8, 30));
    assert_eq!(f.state().sim.lock().unwrap().snapshot()[0].limit_pct, 30);
}

#[tokio::test]
async fn bad_flags_get_clear_errors() {
    let f = Fixture::start(1, None).await;
    for (body, code) in [
        (r#"{"errorType":"EXCEPTION"}"#, "invalid_flag"),
        (r#"{"errorType":"DELAY"}"#, "invalid_flag"),
        (r#"{"errorType":"DELAY","delayMs":3600000}"#, "invalid_flag"),
        (r#"{"errorType":"FIRE"}"#, "invalid_body"),
        ("{", "invalid_body"),
    ] {
        let (status, text) = f.post("/api/user/error-flag/add", body, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], code, "{body} -> {text}");
    }
    assert_eq!(f.state().sim.lock().unwrap().pending_faults(), 0);
}

#[tokio::test]
async fn the_error_emulation_endpoint_matches_the_reference() {
    let f = Fixture::start(1, None).await;
    let body = r#"{"slaveAddress":1,"functionCode":1,"errorType":"EXCEPTION","exceptionCode":1,"delayMs":0}"#;
    let (status, text) = f.post("/api/inverter/error", body, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, r#"{"frame":"0181018190"}"#);
    let (_, text) = f
        .post(
            "/api/inverter/error",
            r#"{"slaveAddress":17,"functionCode":3,"errorType":"PACKET_DROP"}"#,
            None,
        )
        .await;
    assert_eq!(text, r#"{"frame":""}"#);
    let (_, text) = f
        .post(
            "/api/inverter/error",
            r#"{"slaveAddress":17,"functionCode":3,"errorType":"CRC_ERROR"}"#,
            None,
        )
        .await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let frame = hex::decode(v["frame"].as_str().unwrap()).unwrap();
    assert!(rtu::split(&frame).is_err());
}

#[tokio::test]
async fn several_inverters_answer_at_their_own_addresses() {
    let f = Fixture::start(3, None).await;
    for slave in [0x11, 0x12, 0x13] {
        let req = read_frame(slave, 0, 10);
        assert_eq!(registers(decode(&req, &f.frame("read", &req).await)).len(), 10);
    }
    assert_eq!(f.frame("read", &read_frame(0x14, 0, 10)).await, "", "no inverter at 0x14");
    // Limits are per inverter.
    f.frame("write", &write_frame(0x12, 8, 40)).await;
    let limits: Vec<u16> =
        f.state().sim.lock().unwrap().snapshot().iter().map(|i| i.limit_pct).collect();
    assert_eq!(limits, [100, 40, 100]);
}

#[tokio::test]
async fn after_a_limit_of_20_ac_power_stays_at_or_below_20_percent_all_day() {
    let f = Fixture::start(1, None).await;
    assert_eq!(f.frame("write", &write_frame(0x11, 8, 20)).await, write_frame(0x11, 8, 20));
    let read = read_frame(0x11, 0, 10);
    let start = crate::fixture::NOON_MS - 6 * 3_600_000;
    let mut max_pac = 0;
    for step in 0..=144 {
        f.clock.set_ms(start + step * 300_000); // every 5 minutes, 06:00 to 18:00
        let regs = registers(decode(&read, &f.frame("read", &read).await));
        assert!(regs[9] <= 2_000, "Pac {} W above 20 % of 10 kW at step {step}", regs[9]);
        max_pac = max_pac.max(regs[9]);
    }
    assert!(max_pac > 1_500, "the sun should reach the cap: {max_pac}");
}

#[tokio::test]
async fn state_endpoint_reports_every_inverter() {
    let f = Fixture::start(2, None).await;
    let resp = axum::http::Request::get("/api/sim/state").body(axum::body::Body::empty()).unwrap();
    let resp = tower::ServiceExt::oneshot(ecowatt_sim::http::app(f.state()), resp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["inverters"].as_array().unwrap().len(), 2);
    assert_eq!(v["sim_time_ms"], crate::fixture::NOON_MS);
}
