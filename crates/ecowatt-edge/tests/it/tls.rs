//! TLS on a real listener: a client that trusts our private CA is served,
//! plain HTTP and untrusting clients are refused with a reason, bad or expired
//! certificates are refused at load and at reload, and a certificate replaced
//! under load takes over without one failed request.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use ecowatt_edge::tls::{self, Issue, Issued};
use ecowatt_edge::{Limits, Stats, Tls};
use tokio::sync::oneshot;

use crate::limits::{exchange, limits};

/// A private CA and a certificate for 127.0.0.1 and localhost, in `dir`.
fn pki(dir: &Path) -> Issued {
    let ca = tls::new_ca(30).unwrap();
    write_leaf(dir, &ca, Issue::for_days(&hosts(), 30));
    std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
    ca
}

fn hosts() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

fn write_leaf(dir: &Path, ca: &Issued, issue: Issue) {
    let leaf = tls::issue(&ca.key, &issue).unwrap();
    std::fs::write(dir.join("server.pem"), leaf.cert).unwrap();
    std::fs::write(dir.join("server.key"), leaf.key).unwrap();
}

fn load(dir: &Path) -> Result<Arc<Tls>, ecowatt_edge::TlsError> {
    Tls::load(&dir.join("server.pem"), &dir.join("server.key"))
}

struct Server {
    port: u16,
    tls: Arc<Tls>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(dir: &Path, limits: Limits) -> Server {
    let tls = load(dir).unwrap();
    let router = Router::new().route("/fast", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(ecowatt_edge::serve_tls(
        listener,
        router,
        limits,
        Arc::new(Stats::default()),
        Arc::clone(&tls),
        async {
            let _ = stopped.await;
        },
    ));
    Server { port, tls, stop: Some(stop) }
}

/// A client that trusts only the CA in `ca_pem`.
fn client(ca_pem: &str) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let certs = Certificate::from_pem(ca_pem.as_bytes()).unwrap().to_owned();
    let tls = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![certs]))).build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GETs `url` on a blocking thread: the status and the HSTS header, or the error.
async fn get_with(agent: ureq::Agent, url: String) -> Result<(u16, Option<String>), String> {
    tokio::task::spawn_blocking(move || {
        let response = agent.get(&url).call().map_err(|e| e.to_string())?;
        let hsts = response
            .headers()
            .get("strict-transport-security")
            .map(|h| h.to_str().unwrap().to_owned());
        Ok((response.status().as_u16(), hsts))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_client_trusting_the_ca_is_served_with_hsts_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let server = start(dir.path(), limits()).await;
    let url = format!("https://localhost:{}/fast", server.port);
    let (status, hsts) = get_with(client(&ca.cert), url.clone()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(hsts.as_deref(), Some("max-age=31536000"));
    // By IP address too (the certificate names it).
    let by_ip = format!("https://127.0.0.1:{}/fast", server.port);
    assert_eq!(get_with(client(&ca.cert), by_ip).await.unwrap().0, 200);

    // A client with another CA does not trust us: the handshake fails, and says why.
    let other = tls::new_ca(30).unwrap();
    let refused = get_with(client(&other.cert), url.clone()).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.tls.stats.handshake_failures.load(Ordering::Relaxed) < 1 {
        assert!(Instant::now() < deadline, "handshake failures not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Plain HTTP to the TLS port: a 400 that says what to do.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let (answer, closed) =
        exchange(&mut s, b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(3)).await;
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"https_required\""), "{answer}");
    assert_eq!(server.tls.stats.plain_http.load(Ordering::Relaxed), 1);

    // A certificate for another name: the client refuses it.
    let elsewhere = vec!["example.org".to_owned()];
    write_leaf(dir.path(), &ca, Issue::for_days(&elsewhere, 30));
    server.tls.reload().unwrap();
    let refused = get_with(client(&ca.cert), url).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let server = start(dir.path(), limits()).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    // The first bytes of a ClientHello record, then nothing.
    let started = Instant::now();
    let (_, closed) = exchange(&mut s, &[0x16, 0x03, 0x01, 0x02], Duration::from_secs(5)).await;
    assert!(closed, "a stalled handshake was still open after 5 s");
    assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());
}

#[test]
fn unusable_certificates_are_refused_at_load_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let ca = pki(path);
    let code = |r: Result<Arc<Tls>, ecowatt_edge::TlsError>| r.unwrap_err().code();

    // Expired yesterday; valid only from tomorrow.
    let day = 86_400;
    let now = Issue::for_days(&hosts(), 0).not_after;
    write_leaf(
        path,
        &ca,
        Issue { hosts: hosts(), not_before: now - 30 * day, not_after: now - day },
    );
    assert_eq!(code(load(path)), "tls_cert_expired");
    write_leaf(
        path,
        &ca,
        Issue { hosts: hosts(), not_before: now + 2 * day, not_after: now + 9 * day },
    );
    assert_eq!(code(load(path)), "tls_cert_not_yet_valid");

    // A key that is not the certificate's.
    write_leaf(path, &ca, Issue::for_days(&hosts(), 30));
    let other = tls::issue(&ca.key, &Issue::for_days(&hosts(), 30)).unwrap();
    std::fs::write(path.join("server.key"), &other.key).unwrap();
    assert_eq!(code(load(path)), "tls_key_mismatch");

    // Files that do not parse, or are missing.
    std::fs::write(
        path.join("server.key"),
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert_eq!(code(load(path)), "tls_key_invalid");
    std::fs::write(path.join("server.key"), "hello").unwrap();
    assert_eq!(code(load(path)), "tls_key_invalid");
    std::fs::write(path.join("server.pem"), "no certificate here").unwrap();
    assert_eq!(code(load(path)), "tls_cert_invalid");
    std::fs::remove_file(path.join("server.pem")).unwrap();
    let err = load(path).unwrap_err();
    assert_eq!(err.code(), "tls_file_unreadable");
    assert!(err.to_string().contains("server.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_under_load_takes_over_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let old_ca = pki(&path);
    let server = start(&path, Limits { max_per_source: 64, ..limits() }).await;
    let url = format!("https://localhost:{}/fast", server.port);

    // Clients trusting both CAs: a new connection per request, all the time.
    let new_ca = tls::new_ca(30).unwrap();
    let both = format!("{}{}", old_ca.cert, new_ca.cert);
    let (ok, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::<String>::new())),
        Arc::new(AtomicBool::new(false)),
    );
    let mut load = Vec::new();
    for _ in 0..4 {
        let (agent, url) = (client(&both), url.clone());
        let (ok, failed, stop) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
        load.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // A fresh connection each time: every request is a handshake.
                match agent.get(&url).header("connection", "close").call() {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A reload that fails (a key that is not the certificate's) keeps the old pair.
    let bad = tls::issue(&new_ca.key, &Issue::for_days(&hosts(), 30)).unwrap();
    std::fs::write(path.join("server.key"), &bad.key).unwrap();
    assert_eq!(server.tls.reload().unwrap_err().code(), "tls_key_mismatch");
    assert_eq!(get_with(client(&old_ca.cert), url.clone()).await.unwrap().0, 200);

    // The new pair written in place: the file watcher picks it up (no signal sent).
    write_leaf(&path, &new_ca, Issue::for_days(&hosts(), 30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.tls.stats.reloads.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the changed files were not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok.load(Ordering::Relaxed) > 20, "only {} requests", ok.load(Ordering::Relaxed));
    // New connections get the new certificate: a client trusting only the new CA is served,
    // one trusting only the old one no more.
    assert_eq!(get_with(client(&new_ca.cert), url.clone()).await.unwrap().0, 200);
    assert!(get_with(client(&old_ca.cert), url).await.is_err());
}

use std::sync::Mutex;
