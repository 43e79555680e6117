//! A Modbus TCP server over the same inverters, so that standard Modbus tools
//! work against the simulator.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ecowatt_proto::modbus::tcp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::SimState;

/// Connections that send nothing this long are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A request begun (its first byte in) must be complete within this, and an
/// answer must be taken by the client within it: a peer that stops
/// mid-request, or stops reading, is cut off.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves Modbus TCP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, state).await {
                            tracing::debug!(%peer, error = %e, "modbus tcp connection closed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "modbus tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn connection(mut stream: TcpStream, state: Arc<SimState>) -> std::io::Result<()> {
    connection_within(&mut stream, state, IDLE_TIMEOUT, REQUEST_TIMEOUT).await
}

/// Serves one connection: each request's first byte within `idle`, the rest
/// of it and the answer's delivery within `request`.
pub async fn connection_within(
    stream: &mut TcpStream,
    state: Arc<SimState>,
    idle: Duration,
    request: Duration,
) -> std::io::Result<()> {
    let timed_out =
        || std::io::Error::new(std::io::ErrorKind::TimedOut, "request not complete in time");
    stream.set_nodelay(true)?;
    let mut header = [0u8; tcp::HEADER_LEN];
    let mut pdu = [0u8; tcp::MAX_PDU_LEN];
    loop {
        match tokio::time::timeout(idle, stream.read(&mut header[..1])).await {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
        let answer = tokio::time::timeout(request, async {
            stream.read_exact(&mut header[1..]).await?;
            // A header that is not Modbus: the stream cannot be resynchronised; close it.
            let head = tcp::decode_header(&header)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let pdu = &mut pdu[..head.pdu_len];
            stream.read_exact(pdu).await?;
            let response = state.sim.lock().expect("simulator lock").handle_tcp(head.unit, pdu);
            stream.write_all(&tcp::encode_response(head.transaction, head.unit, &response)).await
        })
        .await;
        answer.map_err(|_| timed_out())??;
    }
}
