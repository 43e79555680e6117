//! The inverter link against a scripted transport and a recording delay.

use std::collections::VecDeque;

use ecowatt_core::link::{Client, Delay, RetryPolicy, Transport, TransportError};
use ecowatt_proto::hex;
use ecowatt_proto::modbus::{Exception, ExceptionCode, FrameError};

/// Answers each request with the next scripted result and records the requests.
#[derive(Default)]
struct Scripted {
    answers: VecDeque<Result<Vec<u8>, TransportError>>,
    sent: Vec<Vec<u8>>,
}

impl Scripted {
    fn new(answers: impl IntoIterator<Item = Result<&'static str, TransportError>>) -> Self {
        Scripted {
            answers: answers.into_iter().map(|a| a.map(|h| hex::decode(h).unwrap())).collect(),
            sent: Vec::new(),
        }
    }
}

impl Transport for Scripted {
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent.push(request.to_vec());
        self.answers.pop_front().expect("the test scripted enough answers")
    }
}

#[derive(Default)]
struct Recorded(Vec<u32>);

impl Delay for Recorded {
    fn delay_ms(&mut self, ms: u32) {
        self.0.push(ms);
    }
}

const READ2: &str = "110300000002C69B";
const READ2_ANSWER: &str = "1103040904002A2870";

#[test]
fn reads_registers_first_time() {
    let mut t = Scripted::new([Ok(READ2_ANSWER)]);
    let mut d = Recorded::default();
    let values = Client::new(&mut t, &mut d).read_holding(0x11, 0, 2).unwrap().unwrap();
    assert_eq!(values, [2308, 42]);
    assert_eq!(t.sent, [hex::decode(READ2).unwrap()]);
    assert!(d.0.is_empty());
}

#[test]
fn retries_timeouts_and_crc_errors_with_growing_backoff() {
    let bad_crc = "1103040904002A2871";
    let mut t = Scripted::new([Err(TransportError::Timeout), Ok(bad_crc), Ok(READ2_ANSWER)]);
    let mut d = Recorded::default();
    let policy = RetryPolicy { attempts: 3, initial_backoff_ms: 100, max_backoff_ms: 1_000 };
    let mut client = Client::new(&mut t, &mut d).with_policy(policy);
    assert_eq!(client.read_holding(0x11, 0, 2).unwrap().unwrap(), [2308, 42]);
    let stats = client.stats();
    assert_eq!((stats.attempts, stats.timeouts, stats.crc_errors, stats.failures), (3, 1, 1, 0));
    assert_eq!(d.0, [100, 200]);
    assert_eq!(t.sent.len(), 3);
    assert!(t.sent.iter().all(|f| f == &hex::decode(READ2).unwrap()), "same frame each time");
}

#[test]
fn gives_up_after_the_budget_and_reports_the_last_error() {
    let mut t = Scripted::new([
        Err(TransportError::Timeout),
        Err(TransportError::Io("reset".into())),
        Ok("1103040904002A2871"),
    ]);
    let mut d = Recorded::default();
    let mut client = Client::new(&mut t, &mut d);
    let err = client.read_holding(0x11, 0, 2).unwrap_err();
    assert!(matches!(err, TransportError::Frame(FrameError::CrcMismatch { .. })), "{err:?}");
    assert_eq!(client.stats().failures, 1);
    assert_eq!(d.0.len(), 2);
}

#[test]
fn backoff_is_bounded() {
    let p = RetryPolicy { attempts: 20, initial_backoff_ms: 100, max_backoff_ms: 2_000 };
    let waits: Vec<u32> = (1..=19).map(|r| p.backoff_ms(r)).collect();
    assert_eq!(&waits[..6], [100, 200, 400, 800, 1_600, 2_000]);
    assert!(waits.iter().all(|&w| w <= 2_000));
    assert_eq!(p.backoff_ms(255), 2_000);
}

#[test]
fn an_exception_is_data_and_is_not_retried() {
    let mut t = Scripted::new([Ok("11860303A4")]);
    let mut d = Recorded::default();
    let mut client = Client::new(&mut t, &mut d);
    let refused = client.write_single(0x11, 8, 500).unwrap().unwrap_err();
    assert_eq!(refused, Exception { function: 6, code: ExceptionCode::IllegalDataValue });
    assert_eq!(client.stats().exceptions, 1);
    assert_eq!(t.sent.len(), 1);
}

#[test]
fn a_write_succeeds_on_its_echo_only() {
    let mut t = Scripted::new([Ok("1106000800100B54")]);
    let mut d = Recorded::default();
    assert_eq!(Client::new(&mut t, &mut d).write_single(0x11, 8, 16), Ok(Ok(())));

    // An echo of another value is a frame error, retried, then reported.
    let wrong = "1106000800328B4D";
    let mut t = Scripted::new([Ok(wrong), Ok(wrong), Ok(wrong)]);
    let err = Client::new(&mut t, &mut d).write_single(0x11, 8, 16).unwrap_err();
    assert_eq!(
        err,
        TransportError::Frame(FrameError::EchoMismatch { expected: (8, 16), actual: (8, 50) })
    );
}

#[test]
fn a_refused_link_is_not_retried() {
    let mut t = Scripted::new([Err(TransportError::Refused("HTTP 401".into()))]);
    let mut d = Recorded::default();
    let err = Client::new(&mut t, &mut d).read_holding(0x11, 0, 2).unwrap_err();
    assert_eq!(err.code(), "refused");
    assert!(d.0.is_empty());
}

#[test]
fn an_answer_from_another_slave_is_rejected() {
    // Slave 0x12 answering a request to 0x11: never taken as the inverter's data.
    let mut t = Scripted::new([Ok("120304090400"), Ok("12"), Ok("")]);
    let mut d = Recorded::default();
    let err = Client::new(&mut t, &mut d)
        .with_policy(RetryPolicy { attempts: 3, ..RetryPolicy::default() })
        .read_holding(0x11, 0, 2)
        .unwrap_err();
    assert!(matches!(err, TransportError::Frame(FrameError::TooShort { .. })), "{err:?}");
    let frame = ecowatt_proto::modbus::rtu::encode_response(
        0x12,
        &ecowatt_proto::modbus::Response::ReadHoldingRegisters(vec![1, 2]),
    );
    let mut t = Scripted { answers: VecDeque::from([Ok(frame)]), sent: vec![] };
    let err = Client::new(&mut t, &mut d)
        .with_policy(RetryPolicy { attempts: 1, ..RetryPolicy::default() })
        .read_holding(0x11, 0, 2)
        .unwrap_err();
    assert_eq!(
        err,
        TransportError::Frame(FrameError::SlaveMismatch { expected: 0x11, actual: 0x12 })
    );
}
