//! RTU over a serial line, through a pseudo-terminal pair: our transport on one
//! end, a simulated inverter speaking raw RTU on the other.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ecowatt_core::link::TransportError;
use ecowatt_device::transport::SerialRtu;
use ecowatt_proto::modbus::{Exception, ExceptionCode, rtu};
use ecowatt_sim::inverter::Inverter;
use ecowatt_sim::model::ModelConfig;
use serialport::{SerialPort, TTYPort};

use crate::client;

/// Serves RTU requests on `port` from a simulated inverter at 0x11 until
/// `stop`; `mangle` may alter each answer (by request number).
fn inverter_on_the_line(
    mut port: TTYPort,
    stop: Arc<AtomicBool>,
    mangle: impl Fn(usize, Vec<u8>) -> Option<Vec<u8>> + Send + 'static,
) -> std::thread::JoinHandle<Inverter> {
    std::thread::spawn(move || {
        let mut inverter = Inverter::new(0x11, ModelConfig::default());
        port.set_timeout(Duration::from_millis(20)).unwrap();
        let mut buf = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let mut chunk = [0u8; 64];
            match port.read(&mut chunk) {
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(_) => continue,
            }
            // Requests for 0x03 and 0x06 are 8 bytes.
            while buf.len() >= 8 {
                let frame: Vec<u8> = buf.drain(..8).collect();
                let Ok((slave, request)) = rtu::decode_request(&frame) else { continue };
                let answer =
                    rtu::encode_response(slave, &inverter.handle(&request, 1_782_043_200_000));
                if let Some(bytes) = mangle(n, answer) {
                    // Send in two pieces, as a slow line would.
                    let (a, b) = bytes.split_at(bytes.len() / 2);
                    port.write_all(a).unwrap();
                    port.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                    port.write_all(b).unwrap();
                }
                n += 1;
            }
        }
        inverter
    })
}

#[test]
fn reads_and_writes_over_a_serial_line() {
    let (ours, theirs) = TTYPort::pair().expect("pseudo-terminal pair");
    let stop = Arc::new(AtomicBool::new(false));
    let slave = inverter_on_the_line(theirs, stop.clone(), |_, a| Some(a));
    let mut c = client(SerialRtu::from_port(Box::new(ours), Duration::from_millis(500)));
    let regs = c.read_holding(0x11, 0, 10).unwrap().unwrap();
    assert_eq!(regs.len(), 10);
    assert_eq!(c.write_single(0x11, 8, 60).unwrap(), Ok(()));
    assert_eq!(c.read_holding(0x11, 8, 1).unwrap().unwrap(), [60]);
    assert_eq!(
        c.write_single(0x11, 8, 101).unwrap(),
        Err(Exception { function: 6, code: ExceptionCode::IllegalDataValue })
    );
    stop.store(true, Ordering::SeqCst);
    let mut inverter = slave.join().unwrap();
    assert_eq!(inverter.read(0).limit_pct, 60);
}

#[test]
fn line_noise_and_silence_are_retried() {
    let (ours, theirs) = TTYPort::pair().expect("pseudo-terminal pair");
    let stop = Arc::new(AtomicBool::new(false));
    // First answer: one bit flipped; second: nothing; third: good.
    let slave = inverter_on_the_line(theirs, stop.clone(), |n, mut a| match n {
        0 => {
            a[4] ^= 0x10;
            Some(a)
        }
        1 => None,
        _ => Some(a),
    });
    let mut c = client(SerialRtu::from_port(Box::new(ours), Duration::from_millis(200)));
    assert_eq!(c.read_holding(0x11, 0, 10).unwrap().unwrap().len(), 10);
    let s = c.stats();
    assert_eq!((s.crc_errors, s.timeouts, s.attempts), (1, 1, 3));
    stop.store(true, Ordering::SeqCst);
    slave.join().unwrap();
}

#[test]
fn a_silent_line_is_a_timeout() {
    let (ours, _theirs) = TTYPort::pair().expect("pseudo-terminal pair");
    let mut c = client(SerialRtu::from_port(Box::new(ours), Duration::from_millis(100)));
    assert_eq!(c.read_holding(0x11, 0, 10), Err(TransportError::Timeout));
}

#[test]
fn an_answer_cut_short_is_reported_incomplete_not_as_a_crc_error() {
    use ecowatt_core::link::Transport;
    use ecowatt_proto::modbus::{FrameError, Request};
    let (ours, theirs) = TTYPort::pair().expect("pseudo-terminal pair");
    let stop = Arc::new(AtomicBool::new(false));
    // Every answer loses its last 6 bytes.
    let slave = inverter_on_the_line(theirs, stop.clone(), |_, mut a| {
        a.truncate(a.len() - 6);
        Some(a)
    });
    let mut port = SerialRtu::from_port(Box::new(ours), Duration::from_millis(200));
    let request =
        rtu::encode_request(0x11, &Request::ReadHoldingRegisters { start: 0, quantity: 10 });
    assert_eq!(
        port.transact(&request),
        Err(TransportError::Frame(FrameError::Incomplete { len: 19, expected: 25 }))
    );
    stop.store(true, Ordering::SeqCst);
    slave.join().unwrap();
}
