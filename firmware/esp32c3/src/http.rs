//! The device protocol's HTTP over embassy-net TCP: one connection per
//! request (`Connection: close`), the request bytes and the answer's reading
//! from `ecowatt_core::http1`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ecowatt_core::http1::{self, Answer, Origin};
use ecowatt_core::machine::{Action, Event, Failure, MAX_ANSWER};
use embassy_net::dns::DnsQueryType;
use embassy_net::tcp::TcpSocket;
use embassy_net::{IpAddress, Stack};
use embassy_time::{Duration, with_timeout};

/// Socket buffers: the largest answer is an image chunk (4 KiB) and headers.
const RX: usize = 6 * 1024;
const TX: usize = 2 * 1024;

/// A client for the server in the provisioning.
pub struct Http {
    stack: Stack<'static>,
    origin: Origin,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl Http {
    /// A client of `origin`.
    pub fn new(stack: Stack<'static>, origin: Origin) -> Self {
        Http { stack, origin, rx: alloc::vec![0; RX], tx: alloc::vec![0; TX] }
    }

    /// Carries out a `Post` or `Fetch` and returns the event that answers it.
    pub async fn carry(&mut self, action: &Action) -> Option<Event> {
        match action {
            Action::Post { channel, body, timeout_ms } => {
                let request = http1::post(&self.origin, channel.path(), body);
                let answer = self.exchange(&request, 200, *timeout_ms, MAX_ANSWER).await;
                Some(Event::Server { channel: *channel, answer })
            }
            Action::Fetch { token, offset, len } => {
                let token = ecowatt_proto::hex::encode_upper(token);
                let path = alloc::format!("/api/v1/device/firmware/{token}");
                let last = offset + u64::from((*len).max(1)) - 1;
                let request = http1::get_range(&self.origin, &path, *offset, last);
                Some(Event::Chunk(self.exchange(&request, 206, 30_000, *len as usize).await))
            }
            _ => None,
        }
    }

    async fn address(&self) -> Result<IpAddress, Failure> {
        if let Ok(ip) = self.origin.host.parse::<core::net::Ipv4Addr>() {
            return Ok(IpAddress::Ipv4(ip));
        }
        let found = self.stack.dns_query(&self.origin.host, DnsQueryType::A).await;
        found
            .ok()
            .and_then(|a| a.first().copied())
            .ok_or_else(|| Failure::unreachable(String::from("DNS: ") + &self.origin.host))
    }

    async fn exchange(
        &mut self,
        request: &[u8],
        ok: u16,
        timeout_ms: u64,
        limit: usize,
    ) -> Result<Vec<u8>, Failure> {
        let address = self.address().await?;
        let port = self.origin.port;
        let mut socket = TcpSocket::new(self.stack, &mut self.rx, &mut self.tx);
        socket.set_timeout(Some(Duration::from_millis(timeout_ms)));
        let unreachable = |e: &dyn core::fmt::Debug| Failure::unreachable(alloc::format!("{e:?}"));
        let result = with_timeout(Duration::from_millis(timeout_ms), async {
            socket.connect((address, port)).await.map_err(|e| unreachable(&e))?;
            let mut sent = 0;
            while sent < request.len() {
                sent += socket.write(&request[sent..]).await.map_err(|e| unreachable(&e))?;
            }
            let mut answer = Answer::new(limit);
            let mut buf = [0u8; 1024];
            loop {
                let n = socket.read(&mut buf).await.map_err(|e| unreachable(&e))?;
                if n == 0 {
                    break;
                }
                if answer.feed(&buf[..n]).map_err(|e| Failure::unreachable(e.to_string()))? {
                    break;
                }
            }
            answer.finish().map_err(|e| Failure::unreachable(e.to_string()))
        })
        .await;
        socket.close();
        let (status, body) = result.map_err(|_| Failure::unreachable("timed out"))??;
        if status == ok {
            Ok(body)
        } else {
            let message = String::from_utf8_lossy(&body).to_string();
            Err(Failure { status: Some(status), message })
        }
    }
}
