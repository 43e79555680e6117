//! Shutdown: stop accepting, finish what is in flight within the grace period,
//! close what is left.

use std::time::{Duration, Instant};

use ecowatt_edge::{Closed, Limits};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::limits::{Edge, get_fast, limits, read_until_closed};

#[tokio::test]
async fn shutdown_closes_idle_connections_at_once_and_lets_a_request_finish() {
    let mut edge = Edge::start(Limits { idle_timeout: Duration::from_secs(60), ..limits() }).await;
    let mut idle = TcpStream::connect(edge.addr).await.unwrap();
    assert!(get_fast(&mut idle).await.starts_with("HTTP/1.1 200"));
    let mut busy = TcpStream::connect(edge.addr).await.unwrap();
    busy.write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    edge.stop();
    let (_, closed) = read_until_closed(&mut idle, Duration::from_millis(300)).await;
    assert!(closed, "an idle keep-alive connection outlived the shutdown");
    // The request in flight still gets its answer.
    edge.release.notify_waiters();
    let (answer, closed) = read_until_closed(&mut busy, Duration::from_secs(2)).await;
    assert!(answer.contains("released") && closed, "{answer}");
    edge.task.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_millis(800), "{:?}", started.elapsed());
    assert!(TcpStream::connect(edge.addr).await.is_err(), "still accepting after shutdown");
}

#[tokio::test]
async fn shutdown_ends_within_the_grace_period_whatever_the_peers_do() {
    let mut edge = Edge::start(Limits {
        idle_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(60),
        ..limits()
    })
    .await;
    // A request that never finishes, a header never finished, a body never sent.
    let mut held = TcpStream::connect(edge.addr).await.unwrap();
    held.write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut half = TcpStream::connect(edge.addr).await.unwrap();
    half.write_all(b"GET /fast HTTP/1.1\r\nho").await.unwrap();
    let mut bodyless = TcpStream::connect(edge.addr).await.unwrap();
    bodyless
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    edge.stop();
    edge.task.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_millis(1500), "{took:?}");
    for s in [&mut held, &mut half] {
        let (_, closed) = read_until_closed(s, Duration::from_millis(500)).await;
        assert!(closed);
    }
    assert!(edge.stats.closed_count(Closed::ShutdownForced) >= 1);
}
