use std::time::Duration;

use ecowatt_device::transport::{LinkOptions, ModbusTcp, open};
use ecowatt_proto::modbus::{Exception, ExceptionCode};
use ecowatt_testkit::TestSim;

use crate::client;

#[tokio::test(flavor = "multi_thread")]
async fn reads_and_writes_over_modbus_tcp() {
    let sim = TestSim::start(2).await;
    let url = sim.tcp_url();
    tokio::task::spawn_blocking(move || {
        let mut c = client(open(&url, &LinkOptions::default()).unwrap());
        let regs = c.read_holding(0x12, 0, 10).unwrap().unwrap();
        assert_eq!(regs.len(), 10);
        assert_eq!(c.write_single(0x12, 8, 25).unwrap(), Ok(()));
        assert_eq!(c.read_holding(0x12, 8, 1).unwrap().unwrap(), [25]);
        assert_eq!(
            c.write_single(0x12, 3, 1).unwrap(),
            Err(Exception { function: 6, code: ExceptionCode::IllegalDataAddress })
        );
        // A unit with no inverter behind the gateway.
        assert_eq!(
            c.read_holding(0x40, 0, 1).unwrap(),
            Err(Exception { function: 3, code: ExceptionCode::GatewayTargetFailedToRespond })
        );
    })
    .await
    .unwrap();
    assert_eq!(sim.limit_pct(0x12), 25);
    assert_eq!(sim.limit_pct(0x11), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_answers_late_or_wrongly_is_detected() {
    // A fake server: the first connection never answers; the second answers
    // with the wrong transaction id; the third answers properly.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (silent, _) = listener.accept().unwrap();
        let (mut wrong, _) = listener.accept().unwrap();
        let mut req = [0u8; 12];
        wrong.read_exact(&mut req).unwrap();
        let mut answer = ecowatt_proto::modbus::tcp::encode(
            u16::from_be_bytes([req[0], req[1]]).wrapping_add(7),
            req[6],
            &[0x03, 0x02, 0x00, 0x01],
        );
        wrong.write_all(&answer).unwrap();
        let (mut good, _) = listener.accept().unwrap();
        good.read_exact(&mut req).unwrap();
        answer[..2].copy_from_slice(&req[..2]);
        good.write_all(&answer).unwrap();
        drop(silent);
    });
    tokio::task::spawn_blocking(move || {
        let mut c = client(ModbusTcp::new(addr.to_string(), Duration::from_millis(200)));
        assert_eq!(c.read_holding(0x11, 0, 1).unwrap().unwrap(), [1]);
        let s = c.stats();
        assert_eq!((s.timeouts, s.frame_errors, s.attempts), (1, 1, 3));
    })
    .await
    .unwrap();
    server.join().unwrap();
}

/// A fake Modbus TCP server that answers its first request one byte every
/// `every`, or closes without answering when `every` is `None`.
fn slow_server(every: Option<Duration>) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 12];
        s.read_exact(&mut req).unwrap();
        let Some(every) = every else { return };
        let answer = ecowatt_proto::modbus::tcp::encode(
            u16::from_be_bytes([req[0], req[1]]),
            req[6],
            &[0x03, 0x02, 0x00, 0x01],
        );
        for b in answer {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    });
    (addr, server)
}

#[test]
fn a_peer_dribbling_its_answer_cannot_stretch_the_timeout() {
    use ecowatt_core::link::Transport;
    use ecowatt_proto::modbus::{Request, rtu};
    let (addr, server) = slow_server(Some(Duration::from_millis(250)));
    let mut tcp = ModbusTcp::new(addr.to_string(), Duration::from_secs(1));
    let request =
        rtu::encode_request(0x11, &Request::ReadHoldingRegisters { start: 0, quantity: 1 });
    let started = std::time::Instant::now();
    let answer = tcp.transact(&request);
    let took = started.elapsed();
    assert_eq!(answer, Err(ecowatt_core::link::TransportError::Timeout));
    // The whole answer takes 11 bytes x 250 ms; the deadline is 1 s.
    assert!(took < Duration::from_millis(1400), "waited {took:?} for a 1 s timeout");
    drop(tcp);
    server.join().unwrap();
}

#[test]
fn a_peer_that_closes_without_answering_is_named_so() {
    use ecowatt_core::link::{Transport, TransportError};
    use ecowatt_proto::modbus::{Request, rtu};
    let (addr, server) = slow_server(None);
    let mut tcp = ModbusTcp::new(addr.to_string(), Duration::from_secs(1));
    let request =
        rtu::encode_request(0x11, &Request::ReadHoldingRegisters { start: 0, quantity: 1 });
    match tcp.transact(&request) {
        Err(TransportError::Io(msg)) => {
            assert!(msg.contains("closed the connection without answering"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
}
