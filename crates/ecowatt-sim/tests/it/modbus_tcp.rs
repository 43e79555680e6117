//! Modbus TCP, checked with tokio-modbus, a standard client.

use ecowatt_proto::registers::REGISTERS;
use tokio_modbus::client::{Reader, Writer, tcp};
use tokio_modbus::{ExceptionCode, Slave};

use crate::fixture::Fixture;

#[tokio::test]
async fn a_standard_client_reads_all_registers_and_writes_the_limit() {
    let f = Fixture::start(1, None).await;
    let mut ctx = tcp::connect_slave(f.sim.tcp_addr, Slave(0x11)).await.unwrap();
    let regs = ctx.read_holding_registers(0, 10).await.unwrap().unwrap();
    assert_eq!(regs.len(), 10);
    assert!((200.0..260.0).contains(&REGISTERS[0].to_engineering(regs[0])));
    assert_eq!(regs[8], 100);

    ctx.write_single_register(8, 35).await.unwrap().unwrap();
    let regs = ctx.read_holding_registers(0, 10).await.unwrap().unwrap();
    assert_eq!(regs[8], 35);
    assert!(regs[9] <= 3_500, "Pac {} above 35 % of 10 kW", regs[9]);

    let refused = ctx.write_single_register(8, 500).await.unwrap();
    assert_eq!(refused, Err(ExceptionCode::IllegalDataValue));
    let refused = ctx.read_holding_registers(5, 10).await.unwrap();
    assert_eq!(refused, Err(ExceptionCode::IllegalDataAddress));
}

#[tokio::test]
async fn units_select_inverters_and_missing_ones_are_reported() {
    let f = Fixture::start(2, None).await;
    let mut ctx = tcp::connect_slave(f.sim.tcp_addr, Slave(0x12)).await.unwrap();
    ctx.write_single_register(8, 55).await.unwrap().unwrap();
    let limits: Vec<u16> =
        f.state().sim.lock().unwrap().snapshot().iter().map(|i| i.limit_pct).collect();
    assert_eq!(limits, [100, 55]);

    let mut ctx = tcp::connect_slave(f.sim.tcp_addr, Slave(0x30)).await.unwrap();
    let refused = ctx.read_holding_registers(0, 1).await.unwrap();
    assert_eq!(refused, Err(ExceptionCode::GatewayTargetDevice));

    // Unit 0xFF ("this device") is the first inverter.
    let mut ctx = tcp::connect_slave(f.sim.tcp_addr, Slave(0xFF)).await.unwrap();
    assert_eq!(ctx.read_holding_registers(8, 1).await.unwrap().unwrap(), [100]);
}

#[tokio::test]
async fn a_connection_that_sends_garbage_is_closed_and_others_carry_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start(1, None).await;
    let mut raw = tokio::net::TcpStream::connect(f.sim.tcp_addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let n = raw.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let mut ctx = tcp::connect_slave(f.sim.tcp_addr, Slave(0x11)).await.unwrap();
    assert!(ctx.read_holding_registers(0, 10).await.unwrap().is_ok());
}

#[tokio::test]
async fn a_request_whose_length_is_wrong_for_its_function_gets_exception_03() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start(1, None).await;
    let mut raw = tokio::net::TcpStream::connect(f.sim.tcp_addr).await.unwrap();
    // Read holding registers with one byte too many (PDU of 6 instead of 5).
    raw.write_all(&[0, 7, 0, 0, 0, 7, 0x11, 0x03, 0, 0, 0, 10, 0xAA]).await.unwrap();
    let mut answer = [0u8; 9];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, [0, 7, 0, 0, 0, 3, 0x11, 0x83, 0x03], "exception 03, not 0B");
}

#[tokio::test]
async fn a_client_that_stops_mid_request_is_cut_off_and_an_idle_one_too() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start(1, None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = f.state();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let r = ecowatt_sim::tcp::connection_within(
                    &mut s,
                    state,
                    Duration::from_millis(600),
                    Duration::from_millis(300),
                )
                .await;
                let _ = r;
            });
        }
    });
    // Half a header, then nothing: cut after the request time, not the idle time.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0, 1, 0, 0]).await.unwrap();
    let started = Instant::now();
    let n = half.read(&mut [0u8; 8]).await.unwrap_or(0);
    assert_eq!(n, 0);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(550), "{took:?}");
    // A complete header and half a PDU: cut the same way.
    let mut half_pdu = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_pdu.write_all(&[0, 1, 0, 0, 0, 6, 0x11, 0x03, 0]).await.unwrap();
    let started = Instant::now();
    assert_eq!(half_pdu.read(&mut [0u8; 8]).await.unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_millis(550));
    // Silent: cut after the idle time.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    assert_eq!(silent.read(&mut [0u8; 8]).await.unwrap_or(0), 0);
    assert!(started.elapsed() >= Duration::from_millis(550));
}
