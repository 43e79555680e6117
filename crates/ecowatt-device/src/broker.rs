//! The device protocol over an MQTT broker (`ecowatt device --server
//! mqtt://broker:1883`; docs/protocol.md "Over an MQTT broker"): the
//! machine's sealed requests and image fetches are published on the
//! device's own `up` topics and answered on its `down` topics, matched by
//! the envelope's counter (a fetch's own correlation). Nothing else changes:
//! the machine seals, retries and checks exactly as over HTTP.
//!
//! The broker knows the device by its name and a password derived from its
//! key ([`ecowatt_formats::broker::broker_password`]) unless the URL gives
//! credentials.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ecowatt_core::machine::{Action, Channel, Event, Failure};
use ecowatt_formats::broker::{self as b, Answer, DeviceTopics, FetchRequest, Route};
use ecowatt_formats::mqtt::{Tls, parse_url};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::oneshot;

/// Requests waiting for their answers, by route and correlation: the
/// answer, or why none will come (the connection was lost).
type Pending = Arc<Mutex<HashMap<(Route, u64), oneshot::Sender<Result<Answer, String>>>>>;

/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Who the device is to the broker.
#[derive(Debug, Clone)]
pub struct BrokerIdentity {
    /// Its name (user name and topic level).
    pub device: String,
    /// Its key (the password is derived from it).
    pub key: [u8; 16],
    /// Its key's version byte (said in image fetches).
    pub key_version: u8,
}

/// A device's connection to its broker, for the protocol.
#[derive(Clone)]
pub struct BrokerNet {
    client: AsyncClient,
    topics: DeviceTopics,
    device: String,
    key_version: u8,
    pending: Pending,
    next_fetch: Arc<AtomicU64>,
}

impl BrokerNet {
    /// Connects (in the background, again after every loss) to the broker at
    /// `url` (`mqtt://[user:password@]host[:port]`, `mqtts://`), trusting
    /// what `tls` says for `mqtts://`.
    pub fn start(
        url: &str,
        ca_file: Option<&std::path::Path>,
        who: &BrokerIdentity,
        topics: DeviceTopics,
    ) -> Result<BrokerNet, String> {
        let broker = parse_url(url)?;
        let tls = Tls::for_broker(broker.tls, ca_file)?;
        let mut options =
            MqttOptions::new(format!("ecowatt-device-{}", who.device), broker.host, broker.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(b::MAX_PACKET as usize + 1024, b::MAX_PACKET as usize + 1024);
        if let Some(tls) = &tls {
            options.set_transport(tls.transport()?);
        }
        let (user, password) = broker
            .credentials
            .unwrap_or_else(|| (who.device.clone(), b::broker_password(&who.key)));
        options.set_credentials(user, password);
        let (client, mut events) = AsyncClient::new(options, 16);
        // Small request, small answer: Nagle's wait for the peer's delayed
        // ACK cost each round trip 40 ms.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        let pending: Pending = Arc::default();
        let subscription = topics.down_all(&who.device);
        tokio::spawn(drive(events, client.clone(), topics.clone(), subscription, pending.clone()));
        Ok(BrokerNet {
            client,
            topics,
            device: who.device.clone(),
            key_version: who.key_version,
            pending,
            next_fetch: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Carries out a [`Action::Post`] or [`Action::Fetch`] and returns the
    /// event that answers it; `None` for any other action.
    pub async fn carry(&self, action: &Action) -> Option<Event> {
        match action {
            Action::Post { channel, body, timeout_ms } => {
                let answer = self.post(*channel, body, *timeout_ms).await;
                Some(Event::Server { channel: *channel, answer })
            }
            Action::Fetch { token, offset, len } => {
                Some(Event::Chunk(self.fetch(token, *offset, *len).await))
            }
            _ => None,
        }
    }

    /// Publishes a sealed request and waits for its answer: the body on 200.
    pub async fn post(
        &self,
        channel: Channel,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<Vec<u8>, Failure> {
        let route = match channel {
            Channel::Sync => Route::Sync,
            Channel::Upload => Route::Telemetry,
        };
        let counter = ecowatt_proto::seal::Header::parse(body)
            .map_err(|e| Failure::unreachable(format!("not an envelope: {e}")))?
            .counter;
        self.ask(route, counter, body.to_vec(), timeout_ms, 200).await
    }

    /// Asks `len` bytes of the offered image from `offset`.
    pub async fn fetch(&self, token: &[u8; 16], offset: u64, len: u32) -> Result<Vec<u8>, Failure> {
        let correlation = self.next_fetch.fetch_add(1, Ordering::Relaxed);
        let request = FetchRequest {
            correlation,
            offset,
            len: len.clamp(1, b::MAX_FETCH),
            key_version: self.key_version,
            token: *token,
        };
        self.ask(Route::Firmware, correlation, request.encode(), 30_000, 206).await
    }

    async fn ask(
        &self,
        route: Route,
        correlation: u64,
        payload: Vec<u8>,
        timeout_ms: u64,
        ok: u16,
    ) -> Result<Vec<u8>, Failure> {
        let (tx, rx) = oneshot::channel();
        let key = (route, correlation);
        self.pending.lock().expect("pending lock").insert(key, tx);
        let topic = self.topics.up(&self.device, route);
        let forget = || {
            self.pending.lock().expect("pending lock").remove(&key);
        };
        if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
            forget();
            return Err(Failure::unreachable(format!("MQTT broker: {e}")));
        }
        match tokio::time::timeout(Duration::from_millis(timeout_ms), rx).await {
            Ok(Ok(Ok(a))) if a.status == ok => Ok(a.body),
            Ok(Ok(Err(lost))) => Err(Failure::unreachable(lost)),
            Ok(Ok(Ok(a))) => Err(Failure {
                status: Some(a.status),
                message: format!(
                    "{} over MQTT: {}",
                    route.name(),
                    String::from_utf8_lossy(&a.body)
                ),
            }),
            Ok(Err(_)) | Err(_) => {
                forget();
                Err(Failure::unreachable(format!(
                    "no answer to {} over MQTT within {timeout_ms} ms",
                    route.name()
                )))
            }
        }
    }

    /// Disconnects.
    pub async fn stop(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.disconnect()).await;
    }
}

/// The connection: subscribes to the device's answers at every connection
/// and hands each to the request waiting for it.
async fn drive(
    mut events: EventLoop,
    client: AsyncClient,
    topics: DeviceTopics,
    subscription: String,
    pending: Pending,
) {
    let mut backoff = Duration::from_millis(250);
    let mut connected = false;
    loop {
        match events.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = Duration::from_millis(250);
                tracing::info!(subscription = %subscription, "device broker: connected");
                let _ = client.try_subscribe(subscription.clone(), QoS::AtLeastOnce);
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(subscription = %subscription, "device broker: subscription refused (its ACL?)");
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let Some((_, route)) = topics.parse_down(&p.topic) else { continue };
                match Answer::decode(&p.payload) {
                    Ok(a) => {
                        let waiter =
                            pending.lock().expect("pending lock").remove(&(route, a.correlation));
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(a));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "device broker: unreadable answer"),
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                // Requests under way get no answer on a new connection (a
                // long poll would wait out its whole timeout): they fail now
                // and the machine retries them.
                let lost: Vec<_> = pending.lock().expect("pending lock").drain().collect();
                for (_, w) in lost {
                    let _ = w.send(Err(format!("connection to the MQTT broker lost: {e}")));
                }
                if connected {
                    tracing::warn!(error = %e, "device broker: connection lost; reconnecting");
                } else {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "device broker: cannot connect");
                }
                connected = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
