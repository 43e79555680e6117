//! One connection as the watchdog sees it: whether a request is in flight,
//! since when it has been idle, when the next request's first byte came,
//! and since when its writes have been blocked by a peer that does not read.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Milliseconds since this process first asked, never 0 (0 means "not set").
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What the watchdog and the accept loop know of one connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub id: u64,
    pub source: IpAddr,
    /// Requests dispatched whose response has not been sent in full.
    in_flight: AtomicU32,
    /// When the last request finished (or the connection opened).
    idle_since: AtomicU64,
    /// The first byte of a request not yet dispatched (0: none).
    header_started: AtomicU64,
    /// Since when a write has waited for the peer to read (0: not waiting).
    write_blocked: AtomicU64,
    /// Set when the connection is to be dropped now.
    closing: AtomicBool,
    close: Notify,
}

impl ConnState {
    pub fn new(id: u64, source: IpAddr) -> Self {
        ConnState {
            id,
            source,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ms()),
            header_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    /// No request in flight: the connection waits for (or reads) the next one.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    pub fn idle_since(&self) -> u64 {
        self.idle_since.load(Ordering::Relaxed)
    }

    pub fn header_started(&self) -> u64 {
        self.header_started.load(Ordering::Relaxed)
    }

    pub fn write_blocked(&self) -> u64 {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// Drops the connection now (the task serving it ends at once).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.notify_one();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Completes when [`ConnState::close`] was called.
    pub async fn closed(&self) {
        self.close.notified().await;
    }
}

/// A request in flight on a connection, from dispatch until its response
/// body is sent (or dropped).
pub(crate) struct InFlight(Arc<ConnState>);

impl InFlight {
    pub fn start(conn: Arc<ConnState>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.header_started.store(0, Ordering::Relaxed);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that ends its request's [`InFlight`] when it is done.
pub(crate) struct GuardedBody {
    inner: axum::body::Body,
    _guard: InFlight,
}

impl GuardedBody {
    pub fn new(inner: axum::body::Body, guard: InFlight) -> Self {
        GuardedBody { inner, _guard: guard }
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting reads and blocked writes on its [`ConnState`].
pub(crate) struct Watched {
    io: TcpStream,
    conn: Arc<ConnState>,
}

impl Watched {
    pub fn new(io: TcpStream, conn: Arc<ConnState>) -> Self {
        Watched { io, conn }
    }

    fn wrote<T>(&self, polled: Poll<T>) -> Poll<T> {
        match &polled {
            Poll::Pending => {
                if self.conn.write_blocked.load(Ordering::Relaxed) == 0 {
                    self.conn.write_blocked.store(now_ms(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => self.conn.write_blocked.store(0, Ordering::Relaxed),
        }
        polled
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.conn.is_idle()
            && self.conn.header_started.load(Ordering::Relaxed) == 0
        {
            self.conn.header_started.store(now_ms(), Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.wrote(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
