use std::time::Duration;

use ecowatt_core::link::TransportError;
use ecowatt_device::transport::{LinkOptions, SimHttp, open};
use ecowatt_proto::modbus::{Exception, ExceptionCode};
use ecowatt_testkit::TestSim;

use crate::client;

fn add_flag(url: &str, body: &str) {
    let status = ureq::post(format!("{url}/api/user/error-flag/add"))
        .header("content-type", "application/json")
        .send(body)
        .map(|r| r.status().as_u16());
    assert_eq!(status.ok(), Some(200), "adding flag {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_and_writes_through_the_sim_api() {
    let sim = TestSim::start(1).await;
    let url = sim.http_url();
    let regs = tokio::task::spawn_blocking(move || {
        let mut c = client(open(&url, &LinkOptions::default()).unwrap());
        assert_eq!(c.write_single(0x11, 8, 42).unwrap(), Ok(()));
        let refused = c.write_single(0x11, 8, 500).unwrap().unwrap_err();
        assert_eq!(refused, Exception { function: 6, code: ExceptionCode::IllegalDataValue });
        c.read_holding(0x11, 0, 10).unwrap().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(regs[8], 42);
    assert_eq!(sim.limit_pct(0x11), 42);
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_faults_are_retried_and_counted() {
    let sim = TestSim::start(1).await;
    let url = sim.http_url();
    tokio::task::spawn_blocking(move || {
        add_flag(&url, r#"{"errorType":"CRC_ERROR"}"#);
        add_flag(&url, r#"{"errorType":"PACKET_DROP"}"#);
        let mut c = client(SimHttp::new(&url, None, Duration::from_secs(2)));
        assert_eq!(c.read_holding(0x11, 0, 10).unwrap().unwrap().len(), 10);
        let stats = c.stats();
        assert_eq!((stats.attempts, stats.crc_errors, stats.timeouts), (3, 1, 1));

        add_flag(&url, r#"{"errorType":"CORRUPT"}"#);
        assert!(c.read_holding(0x11, 0, 10).unwrap().is_ok());
        assert_eq!(c.stats().crc_errors + c.stats().frame_errors, 2);

        // Three drops in a row exhaust the budget of three attempts.
        for _ in 0..3 {
            add_flag(&url, r#"{"errorType":"PACKET_DROP"}"#);
        }
        assert_eq!(c.read_holding(0x11, 0, 10), Err(TransportError::Timeout));

        // A delay beyond the timeout is a timeout, then the retry succeeds.
        add_flag(&url, r#"{"errorType":"DELAY","delayMs":1500}"#);
        let mut c = client(SimHttp::new(&url, None, Duration::from_millis(300)));
        assert!(c.read_holding(0x11, 0, 10).unwrap().is_ok());
        assert_eq!(c.stats().timeouts, 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_api_key_is_refused_without_retrying() {
    let sim = TestSim::start_with(1, Some("team-key")).await;
    let url = sim.http_url();
    tokio::task::spawn_blocking(move || {
        let mut c = client(SimHttp::new(&url, Some("wrong".into()), Duration::from_secs(2)));
        let err = c.read_holding(0x11, 0, 10).unwrap_err();
        assert!(matches!(&err, TransportError::Refused(m) if m.contains("401")), "{err:?}");
        assert_eq!(c.stats().attempts, 1);
        let mut c = client(SimHttp::new(&url, Some("team-key".into()), Duration::from_secs(2)));
        assert!(c.read_holding(0x11, 0, 10).unwrap().is_ok());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_is_not_there_is_an_io_error() {
    // Bind and drop to get a port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    tokio::task::spawn_blocking(move || {
        let mut c =
            client(SimHttp::new(&format!("http://127.0.0.1:{port}"), None, Duration::from_secs(1)));
        assert!(matches!(c.read_holding(0x11, 0, 10), Err(TransportError::Io(_))));
        assert_eq!(c.stats().attempts, 3);
    })
    .await
    .unwrap();
}
