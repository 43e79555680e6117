//! The server's edge against real sockets: stalled and idle connections,
//! floods of garbage, declared bodies over the limit, and shutdown with
//! long polls open. (The edge's own rules are tested in `ecowatt-edge`;
//! these show what an honest device sees while they apply.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ecowatt_edge::Closed;
use ecowatt_proto::messages::{MessageType, SyncRequest, SyncResponse};
use ecowatt_server::settings::SettingsFile;
use ecowatt_testkit::server::{TempDb, TestServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::Client;
use crate::protocol::Probe;

/// One HTTP/1.1 request on a fresh connection (`connection: close`): status and body.
pub async fn http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{head}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a header");
    let status = std::str::from_utf8(&answer[9..12]).unwrap().parse().unwrap();
    (status, answer[split + 4..].to_vec())
}

/// A sync over a real socket: the opened answer, or the status and body.
async fn sync_over_tcp(
    addr: SocketAddr,
    dev: &mut Probe,
    req: &SyncRequest,
) -> Result<SyncResponse, (u16, String)> {
    let sealed = dev.seal(req);
    let (status, body) = http(
        addr,
        "POST /api/v1/device/sync HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream",
        &sealed,
    )
    .await;
    if status != 200 {
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    let (t, plain) = dev.open(&body).expect("an authentic answer");
    assert_eq!(t, MessageType::SyncResponse);
    Ok(SyncResponse::decode(&plain).unwrap())
}

async fn client_with(db: &TempDb, file: SettingsFile) -> Client {
    let server = TestServer::start_tuned(db, "127.0.0.1:0", file).await;
    let token = server.admin_token.clone();
    Client { server, token }
}

#[tokio::test]
async fn hundreds_of_idle_sockets_from_one_host_do_not_lock_out_a_device() {
    let db = TempDb::sqlite();
    let c = client_with(
        &db,
        SettingsFile {
            max_connections: Some(60),
            max_connections_per_source: Some(40),
            ..SettingsFile::default()
        },
    )
    .await;
    let mut dev = Probe::provision(&c, "d").await;
    let addr = c.server.addr;
    // 300 connections that send nothing, some half a header, one a huge
    // declared body: what locked every device out before.
    let mut held = Vec::new();
    for i in 0..300 {
        let Ok(mut s) = TcpStream::connect(addr).await else { continue };
        let _ = match i % 3 {
            0 => Ok(()),
            1 => s.write_all(b"POST /api/v1/device/sync HTTP/1.1\r\nhost: x\r\ncont").await,
            _ => {
                s.write_all(
                    b"POST /api/v1/device/sync HTTP/1.1\r\ncontent-length: 1000000000000\r\n\r\n",
                )
                .await
            }
        };
        held.push(s);
    }
    let started = Instant::now();
    let answer = sync_over_tcp(addr, &mut dev, &SyncRequest::default()).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // The huge declared bodies were answered 413 and closed; the idle and
    // half-header ones were shed, oldest first, to stay within 40.
    let stats = &c.server.state.edge;
    assert!(stats.closed_count(Closed::ShedSource) >= 150, "{:?}", stats.closed_counts());
    assert!(stats.open() <= 40, "{} open", stats.open());
    c.server.stop().await;
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_read() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut s = TcpStream::connect(c.server.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(
        b"POST /api/v1/device/telemetry HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000000000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 1024];
    let n =
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#"{"error":{"code":"body_too_large""#), "{answer}");
    assert!(started.elapsed() < Duration::from_millis(500));
    // The operator API's limit is the settings' body limit.
    let (status, body) = http(
        c.server.addr,
        &format!("POST /api/v1/devices HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer {}", c.token),
        &vec![b' '; 70_000],
    )
    .await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    c.server.stop().await;
}

#[tokio::test]
async fn a_garbage_flood_is_one_tallied_event_then_429_while_the_device_passes() {
    let db = TempDb::sqlite();
    let c =
        client_with(&db, SettingsFile { refusals_per_minute: Some(50), ..SettingsFile::default() })
            .await;
    let mut dev = Probe::provision(&c, "d").await;
    let addr = c.server.addr;
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for i in 0..300u32 {
        let mut garbage = vec![1u8, 1, 1, 1];
        garbage.extend_from_slice(&(i % 7 + 5000).to_be_bytes());
        garbage.extend_from_slice(&[0u8; 40]);
        let (status, _) = http(
            addr,
            "POST /api/v1/device/sync HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream",
            &garbage,
        )
        .await;
        *statuses.entry(status).or_default() += 1;
    }
    assert_eq!(statuses.get(&401), Some(&50), "{statuses:?}: the budget, then 429");
    assert_eq!(statuses.get(&429), Some(&250), "{statuses:?}");
    // The device shares the flooder's address and is not slowed.
    for _ in 0..3 {
        let started = Instant::now();
        assert!(sync_over_tcp(addr, &mut dev, &SyncRequest::default()).await.is_ok());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // Operators from that address are throttled too, before their token is looked at.
    let (status, body) = http(addr, "GET /api/v1/devices HTTP/1.1\r\nhost: x", b"").await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    c.server.flush_security_events().await;
    let events = c.server.state.security_events.list(None, 100).await.unwrap();
    let unknown: Vec<_> = events.iter().filter(|e| e.kind == "unknown_device").collect();
    assert_eq!(unknown.len(), 1, "one row per source, kind and minute: {events:?}");
    assert_eq!(unknown[0].count, 300, "{events:?}");
    assert_eq!(unknown[0].source.as_deref(), Some("127.0.0.1"));
    let (_, metrics) = c.raw("GET", "/metrics", None, None, "").await;
    assert!(
        metrics.contains("ecowatt_security_events_total{kind=\"unknown_device\"} 300"),
        "{metrics}"
    );
    c.server.stop().await;
}

#[tokio::test]
async fn shutdown_answers_every_long_poll_at_once_and_returns() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let addr = c.server.addr;
    let mut polls = Vec::new();
    for i in 0..20 {
        let mut dev = Probe::provision(&c, &format!("d{i}")).await;
        // Once to apply the config, so the next sync has nothing to deliver.
        let first = sync_over_tcp(addr, &mut dev, &SyncRequest::default()).await.unwrap();
        let applied = first.config;
        polls.push(tokio::spawn(async move {
            let req = SyncRequest { wait_ms: 25_000, applied, ..Default::default() };
            let answer = sync_over_tcp(addr, &mut dev, &req).await;
            (answer, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let server = c.server;
    let stopping = tokio::spawn(server.stop());
    for poll in polls {
        let (answer, at) = poll.await.unwrap();
        let answer = answer.expect("a sealed answer, not a cut connection");
        assert!(answer.commands.is_empty() && answer.config.is_none());
        assert!(at.duration_since(started) < Duration::from_secs(1), "{:?}", at - started);
    }
    stopping.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn device_endpoints_want_octet_stream() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut dev = Probe::provision(&c, "d").await;
    let sealed = dev.seal(&SyncRequest::default());
    for ct in ["application/json", "text/plain", "multipart/form-data"] {
        let (status, body) = http(
            c.server.addr,
            &format!("POST /api/v1/device/sync HTTP/1.1\r\nhost: x\r\ncontent-type: {ct}"),
            &sealed,
        )
        .await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, v["error"]["code"].as_str()), (415, Some("unsupported_media_type")));
    }
    let (status, _) =
        http(c.server.addr, "POST /api/v1/device/sync HTTP/1.1\r\nhost: x", &sealed).await;
    assert_eq!(status, 415, "no content type at all");
    let (status, _) = http(
        c.server.addr,
        "POST /api/v1/device/sync HTTP/1.1\r\nhost: x\r\ncontent-type: Application/Octet-Stream; charset=binary",
        &sealed,
    )
    .await;
    assert_eq!(status, 200, "the media type is case-insensitive, parameters ignored");
    c.server.stop().await;
}
