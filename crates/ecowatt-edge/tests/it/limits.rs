//! Time limits, body limits and connection caps, each against a real listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use ecowatt_edge::{BodyGuardLayer, Closed, Limits, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

/// A listener with short limits, and what it serves:
/// `/fast`, `/hold` (until `release` is notified), `POST /echo` (body ≤ 1 KiB),
/// `/big` (8 MiB).
pub struct Edge {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub release: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub fn limits() -> Limits {
    Limits {
        header_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_millis(900),
        send_timeout: Duration::from_millis(600),
        max_connections: 64,
        max_per_source: 8,
        shutdown_grace: Duration::from_millis(800),
    }
}

impl Edge {
    pub async fn start(limits: Limits) -> Edge {
        let release = Arc::new(Notify::new());
        let held = Arc::clone(&release);
        let router = Router::new()
            .route("/fast", get(|| async { "ok" }))
            .route(
                "/hold",
                get(move || {
                    let held = Arc::clone(&held);
                    async move {
                        held.notified().await;
                        "released"
                    }
                }),
            )
            .route("/big", get(|| async { vec![b'x'; 8 << 20] }))
            .route(
                "/echo",
                post(|body: axum::body::Bytes| async move { body.len().to_string() })
                    .route_layer(BodyGuardLayer::new(1024, Duration::from_millis(500))),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ecowatt_edge::serve(
            listener,
            router,
            limits,
            Arc::clone(&stats),
            async {
                let _ = stopped.await;
            },
        ));
        Edge { addr, stats, release, stop: Some(stop), task }
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Sends `request` and reads until the server closes (or `within` passes):
/// the answer's bytes and whether the server closed.
pub async fn exchange(s: &mut TcpStream, request: &[u8], within: Duration) -> (String, bool) {
    s.write_all(request).await.unwrap();
    read_until_closed(s, within).await
}

pub async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Reads one response to a `/fast` request (keep-alive, so the server does not close).
pub async fn get_fast(s: &mut TcpStream) -> String {
    s.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "an idle connection was still open after 5 s");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(850) && took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(edge.stats.closed_count(Closed::IdleTimeout), 1);
}

#[tokio::test]
async fn a_keep_alive_connection_is_served_then_closed_when_idle() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    for _ in 0..3 {
        assert!(get_fast(&mut s).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed);
    assert_eq!(edge.stats.closed_count(Closed::IdleTimeout), 1);
}

#[tokio::test]
async fn half_a_header_dribbled_byte_by_byte_is_cut_at_the_header_timeout() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let started = Instant::now();
    // One byte every 100 ms: keeps the socket busy, never finishes the header.
    let header = b"GET /fast HTTP/1.1\r\nhost: example\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for b in header {
        if s.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(100), s.read(&mut probe)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let took = closed_after.expect("the server kept a dribbling header open");
    assert!(took < Duration::from_millis(2000), "closed only after {took:?}");
    assert_eq!(edge.stats.closed_count(Closed::HeaderTimeout), 1);
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let started = Instant::now();
    let (answer, _) = exchange(
        &mut s,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000000\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"body_too_large""#), "{answer}");
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let (answer, _) = exchange(
        &mut s,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly a few bytes",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"body_timeout""#), "{answer}");
    // A whole body is served.
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let (answer, _) = exchange(
        &mut s,
        b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\n5"), "{answer}");
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let chunk = format!("800\r\n{}\r\n", "y".repeat(0x800));
    let request = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{chunk}0\r\n\r\n"
    );
    let (answer, _) = exchange(&mut s, request.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn a_source_at_its_cap_loses_its_oldest_idle_connection_not_the_new_one() {
    let edge = Edge::start(limits()).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(edge.addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The ninth from the same address is served; the first is closed.
    let mut ninth = TcpStream::connect(edge.addr).await.unwrap();
    assert!(get_fast(&mut ninth).await.starts_with("HTTP/1.1 200"));
    let (_, closed) = read_until_closed(&mut idle[0], Duration::from_millis(500)).await;
    assert!(closed, "the oldest idle connection was kept");
    let (_, closed) = read_until_closed(&mut idle[7], Duration::from_millis(100)).await;
    assert!(!closed, "a newer idle connection was closed");
    assert_eq!(edge.stats.closed_count(Closed::ShedSource), 1);
}

#[tokio::test]
async fn busy_connections_are_never_shed_and_a_newcomer_is_told_503() {
    let edge = Edge::start(limits()).await;
    let mut busy = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(edge.addr).await.unwrap();
        s.write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(edge.addr).await.unwrap();
    let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(closed && answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("server_busy"), "{answer}");
    // The long requests are all still served.
    edge.release.notify_waiters();
    for s in &mut busy {
        let mut buf = vec![0u8; 512];
        let n =
            tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("released"));
    }
    assert_eq!(edge.stats.closed_count(Closed::RefusedSource), 1);
}

#[tokio::test]
async fn the_total_cap_sheds_the_connection_idle_the_longest_from_any_source() {
    let edge = Edge::start(Limits { max_connections: 4, ..limits() }).await;
    let mut first = TcpStream::connect(edge.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(TcpStream::connect(edge.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut newcomer = TcpStream::connect(edge.addr).await.unwrap();
    assert!(get_fast(&mut newcomer).await.starts_with("HTTP/1.1 200"));
    let (_, closed) = read_until_closed(&mut first, Duration::from_millis(500)).await;
    assert!(closed);
    assert_eq!(edge.stats.closed_count(Closed::Shed), 1);
}

#[tokio::test]
async fn a_peer_that_stops_reading_a_response_is_cut_at_the_send_timeout() {
    let edge = Edge::start(limits()).await;
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    // Read nothing for a while: the server's writes block.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(closed);
    assert!(answer.len() < 8 << 20, "the whole response arrived; the test proves nothing");
    assert_eq!(edge.stats.closed_count(Closed::SendTimeout), 1);
}
