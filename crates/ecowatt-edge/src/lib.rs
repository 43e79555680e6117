//! EcoWatt's HTTP edge: what every listener of ours does before a request
//! reaches its router, so that no stalled socket, flood or shutdown can hurt
//! the clients that behave.
//!
//! - [`serve`] — the accept loop: HTTP/1.1 through hyper, every connection
//!   watched ([`Limits`]: header, idle and send timeouts), a cap on
//!   connections in total and per source address that sheds the connection
//!   idle the longest before refusing a new one, and a graceful shutdown
//!   with a deadline.
//! - [`body`] — a layer that refuses a body over the route's limit from its
//!   declared length, and a body that does not arrive in time.
//! - [`error`] — the JSON error every refusal of ours carries.
//! - [`Stats`] — counters for `/metrics`.
//! - [`tls`] — [`serve_tls`]: the same loop over TLS, with certificates
//!   reloaded in place; [`redirect_to_https`] for the plain port.
//!
//! Handlers find the peer's address as `axum::extract::ConnectInfo<SocketAddr>`
//! in the request's extensions.

pub mod body;
mod conn;
pub mod error;
mod redirect;
mod registry;
mod stats;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

pub use body::BodyGuardLayer;
pub use stats::{Closed, Stats};
pub use tls::{Tls, TlsError};

use conn::{ConnState, InFlight, Watched};
use registry::{Admission, Registry};

/// How long and how many: the limits a listener enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the first byte of a request to the end of its header.
    pub header_timeout: Duration,
    /// How long a connection may wait, with no request in flight and no byte
    /// of the next one, before it is closed.
    pub idle_timeout: Duration,
    /// How long a response may wait for a peer that does not read it.
    pub send_timeout: Duration,
    /// Open connections in all; past it the one idle the longest is closed to
    /// make room, and when none is idle the new one is refused (503).
    pub max_connections: usize,
    /// Open connections from one source address (the same rule among them).
    pub max_per_source: usize,
    /// After shutdown begins, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            max_connections: default_max_connections(),
            max_per_source: 256,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Descriptors kept back from connections: database files and connections,
/// the log, firmware files, the listener itself.
pub const RESERVED_FILES: u64 = 128;

/// Connections that fit under this process's open-files limit, with
/// [`RESERVED_FILES`] kept back (at least 64).
pub fn default_max_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    soft.saturating_sub(RESERVED_FILES).clamp(64, 1 << 20) as usize
}

/// Raises this process's soft open-files limit to its hard limit (as most
/// servers do at start); returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// How often the watchdog looks at every connection.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Serves `router` on `listener` within `limits` until `shutdown` completes;
/// then stops accepting, lets every connection finish the request it is on
/// (idle ones close at once) for at most `limits.shutdown_grace`, closes
/// what is left, and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, router, limits, stats, None, shutdown).await
}

/// As [`serve`], over TLS with `tls`'s certificate: a handshake must finish
/// within the header timeout, a client that speaks plain HTTP gets a 400
/// (`https_required`), every response carries `Strict-Transport-Security`,
/// and the certificate is reloaded when its files change or on SIGHUP.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    tls: Arc<Tls>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let watcher = Arc::clone(&tls).watch();
    let result = serve_with(listener, router, limits, stats, Some(tls), shutdown).await;
    watcher.abort();
    result
}

/// Serves every request of a plain-HTTP listener with a permanent redirect
/// (308, so methods and bodies are kept) to the same host and path over
/// HTTPS on `https_port`.
pub fn redirect_to_https(https_port: u16) -> Router {
    Router::new().fallback(move |request: axum::extract::Request| async move {
        redirect::to_https(&request, https_port)
    })
}

async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry::new(limits, Arc::clone(&stats)));
    let (draining_tx, draining) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut watchdog = tokio::time::interval(WATCH_EVERY);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut http = hyper::server::conn::http1::Builder::new();
    // Our watchdog keeps the time limits; hyper's own header timer would
    // count the idle wait between requests as header time.
    http.timer(TokioTimer::new()).header_read_timeout(None).max_headers(64).keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = watchdog.tick() => registry.watch(),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match registry.admit(peer.ip()) {
                    Admission::Open(conn) => {
                        let job = Job { peer, conn, router: router.clone(), http: http.clone(), draining: draining.clone(), registry: Arc::clone(&registry) };
                        match &tls {
                            None => tasks.spawn(job.plain(stream)),
                            Some(tls) => tasks.spawn(job.tls(stream, Arc::clone(tls))),
                        };
                    }
                    // A TLS client would not read a plain answer: just close.
                    Admission::Refuse(_) if tls.is_some() => drop(stream),
                    Admission::Refuse(why) => {
                        tasks.spawn(refuse(stream, why));
                    }
                },
                Err(e) if is_out_of_files(&e) => {
                    // Free a descriptor: the connection idle the longest goes.
                    tracing::warn!(error = %e, "out of file descriptors: shedding an idle connection");
                    registry.shed_for_descriptor();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = draining_tx.send(true);
    let open = registry.len();
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let left = tasks.len();
        tracing::warn!(left, "shutdown deadline passed: closing the connections still open");
        stats.closed(Closed::ShutdownForced, left as u64);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    tracing::debug!(open, "listener drained");
    Ok(())
}

fn is_out_of_files(e: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// One admitted connection and what serving it needs.
struct Job {
    peer: SocketAddr,
    conn: Arc<ConnState>,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    draining: watch::Receiver<bool>,
    registry: Arc<Registry>,
}

impl Job {
    async fn plain(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let io = Watched::new(stream, Arc::clone(&self.conn));
        self.serve(io, false).await
    }

    /// Plain HTTP is answered 400; else the handshake (within the time
    /// limits the watchdog keeps: its bytes start the header clock), then
    /// HTTP over the TLS stream.
    async fn tls(self, stream: TcpStream, tls: Arc<Tls>) {
        let _ = stream.set_nodelay(true);
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            peeked = stream.peek(&mut first) => peeked,
            _ = self.conn.closed() => return self.registry.remove(&self.conn),
        };
        match peeked {
            // A TLS record of type handshake.
            Ok(1) if first[0] == 0x16 => {}
            Ok(1) => {
                tls.stats.plain_http.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                answer_plain_http(stream).await;
                return self.registry.remove(&self.conn);
            }
            _ => return self.registry.remove(&self.conn),
        }
        let accepting = tls.acceptor().accept(Watched::new(stream, Arc::clone(&self.conn)));
        let mut draining = self.draining.clone();
        let stream = tokio::select! {
            accepted = accepting => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    tls.stats.handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                    return self.registry.remove(&self.conn);
                }
            },
            _ = self.conn.closed() => return self.registry.remove(&self.conn),
            _ = draining.wait_for(|d| *d) => return self.registry.remove(&self.conn),
        };
        self.serve(stream, true).await
    }

    async fn serve<I>(self, io: I, hsts: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Job { peer, conn, router, http, mut draining, registry } = self;
        let io = TokioIo::new(io);
        let state = Arc::clone(&conn);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let guard = InFlight::start(Arc::clone(&state));
            request.extensions_mut().insert(ConnectInfo(peer));
            let call = router.clone().oneshot(request.map(axum::body::Body::new));
            async move {
                let mut response = call.await?;
                if hsts {
                    response.headers_mut().insert(
                        axum::http::header::STRICT_TRANSPORT_SECURITY,
                        axum::http::HeaderValue::from_static("max-age=31536000"),
                    );
                }
                Ok::<_, std::convert::Infallible>(
                    response.map(|b| conn::GuardedBody::new(b, guard)),
                )
            }
        });
        let serving = http.serve_connection(io, service);
        tokio::pin!(serving);
        let mut graceful = *draining.borrow();
        if graceful {
            return registry.remove(&conn);
        }
        loop {
            tokio::select! {
                result = serving.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = conn.closed() => break,
                changed = draining.changed(), if !graceful => {
                    if changed.is_err() || *draining.borrow() {
                        // Nothing in flight (idle, or a header not finished):
                        // close now; else finish the request, then close.
                        if conn.is_idle() {
                            break;
                        }
                        graceful = true;
                        serving.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        registry.remove(&conn);
    }
}

/// Answers plain HTTP sent to the TLS port: 400 `https_required`, then closes
/// (after reading what the client sent, so that it sees the answer).
async fn answer_plain_http(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = error::body(
        "https_required",
        "this port speaks HTTPS: use an https:// URL (the request was not processed)",
    );
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 4096];
        let _ = stream.read(&mut sink).await?;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Answers a connection that cannot be admitted with a 503 and closes it.
async fn refuse(mut stream: TcpStream, why: &'static str) {
    use tokio::io::AsyncWriteExt;
    let body = error::body("server_busy", why);
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
