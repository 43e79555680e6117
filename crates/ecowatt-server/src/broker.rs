//! The device protocol over an MQTT broker (`--device-broker URL`,
//! docs/protocol.md "Over an MQTT broker"): this server takes every
//! device's requests through one MQTT v5 shared subscription
//! (`$share/GROUP/PREFIX/+/up/+`), so that the server processes sharing a
//! database split them, hands each to the handler that answers it over HTTP
//! (the same door, replay window, transaction and long poll), and publishes
//! the answer on the device's own `down` topic. MQTT is only a transport.
//!
//! The broker authenticates each device (user name = device name, password
//! from its key: [`ecowatt_formats::broker::broker_password`]) and its ACL
//! keeps each to its own topics (`ecowatt broker mosquitto` writes both); on
//! top, an envelope must be of the device whose topic it comes on.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ecowatt_formats::broker::{Answer, FetchRequest, Route};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::api::{AppState, Source};
use crate::devices::{DeviceId, KeyLookup};
use crate::error::ApiError;
use crate::protocol::door::{Answer as Refusal, Refused};

pub use crate::settings::{BrokerSettings, DEFAULT_IN_FLIGHT};

/// Longest wait between two connection attempts (from 250 ms, doubling).
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn options(s: &BrokerSettings, body_limit: usize) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(&s.client_id, &s.broker.host, s.broker.port);
    if let Some(tls) = &s.tls {
        o.set_transport(tls.transport()?);
    }
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(true);
    // Larger than any request the server takes, so that an oversized one is
    // refused here (413) instead of breaking the connection.
    let max = (body_limit as u32).max(ecowatt_formats::broker::MAX_PACKET) + 1024;
    o.set_max_packet_size(Some(max));
    o.set_request_channel_capacity(4096);
    // Answers are small and each awaited: no waiting for Nagle.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    o.set_network_options(network);
    if let Some((u, p)) = &s.broker.credentials {
        o.set_credentials(u, p);
    }
    Ok(o)
}

/// Starts taking requests from the broker; the task ends when the server stops.
pub fn start(settings: BrokerSettings, state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(settings, state))
}

async fn run(settings: BrokerSettings, state: AppState) {
    let options = match options(&settings, state.settings.body_limit) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "device broker: cannot be used; the device protocol is served over HTTP only");
            return;
        }
    };
    let (client, mut events) = AsyncClient::new(options, 4096);
    let slots = Arc::new(Semaphore::new(settings.in_flight));
    let shared = settings.topics.up_shared(&settings.group);
    let address = format!("{}:{}", settings.broker.host, settings.broker.port);
    let mut backoff = Duration::from_millis(250);
    let mut connected = false;
    let mut phase = Phase::Running;
    loop {
        let now = tokio::time::Instant::now();
        match phase {
            Phase::Draining(until) => {
                let idle = slots.available_permits() == settings.in_flight;
                if idle || now >= until {
                    if !idle {
                        tracing::warn!(
                            held = settings.in_flight - slots.available_permits(),
                            "device broker: requests still in hand at the end of the grace period"
                        );
                    }
                    // Queued behind every answer: when it goes out, they have.
                    let _ = client.try_disconnect();
                    phase = Phase::Flushing(now + Duration::from_secs(2));
                }
            }
            Phase::Flushing(until) if now >= until => break,
            _ => {}
        }
        let tick = async {
            match phase {
                Phase::Running => state.news.stopping().await,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let event = tokio::select! {
            e = events.poll() => e,
            _ = tick => {
                if phase == Phase::Running {
                    // No new requests; the long polls held are answered at
                    // once (their handlers see the stop) and sent.
                    phase = Phase::Draining(now + state.settings.limits.shutdown_grace);
                    let _ = client.try_unsubscribe(shared.clone());
                }
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = Duration::from_millis(250);
                state.metrics.inc("ecowatt_device_broker_connections_total", "");
                tracing::info!(broker = %address, subscription = %shared, "device broker: connected; taking device requests");
                if let Err(e) = client.subscribe(shared.clone(), QoS::AtLeastOnce).await {
                    tracing::warn!(error = %e, "device broker: cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as Code;
                if ack.return_codes.iter().any(|c| !matches!(c, Code::Success(_))) {
                    tracing::error!(codes = ?ack.return_codes, subscription = %shared, "device broker: the subscription was refused (ACL of the server's broker user?)");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if phase == Phase::Running => {
                take(&state, &client, &settings, &slots, p);
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "device broker: disconnected by the broker");
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                state.metrics.inc("ecowatt_device_broker_errors_total", "");
                if connected {
                    tracing::warn!(broker = %address, error = %e, "device broker: connection lost; reconnecting");
                } else {
                    tracing::warn!(broker = %address, error = %e, retry_in_ms = backoff.as_millis() as u64, "device broker: cannot connect");
                }
                connected = false;
                if phase != Phase::Running {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = state.news.stopping() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Where the task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking requests.
    Running,
    /// The server stops: no new requests; waiting (until then) for the
    /// handlers in hand to finish.
    Draining(tokio::time::Instant),
    /// Disconnect queued behind the last answers; waiting (until then) for it to go out.
    Flushing(tokio::time::Instant),
}

/// Hands one request to its handler on a task of its own; the answer goes
/// to the device's `down` topic.
fn take(
    state: &AppState,
    client: &AsyncClient,
    settings: &BrokerSettings,
    slots: &Arc<Semaphore>,
    p: Publish,
) {
    let Ok(topic) = std::str::from_utf8(&p.topic) else { return };
    let Some((device, route)) = settings.topics.parse_up(topic) else {
        state.metrics.inc("ecowatt_device_broker_ignored_total", "");
        tracing::debug!(topic, "device broker: not a request topic; ignored");
        return;
    };
    let reply = settings.topics.down(device, route);
    let (device, client, state) = (device.to_owned(), client.clone(), state.clone());
    let label = format!("route=\"{}\"", route.name());
    state.metrics.inc("ecowatt_device_broker_requests_total", label);
    let slot = slots.clone().try_acquire_owned();
    let limit = state.settings.body_limit;
    tokio::spawn(async move {
        let answer = match slot {
            Ok(_slot) => answer(&state, &device, route, p.payload, limit).await,
            Err(_) => {
                state.metrics.inc("ecowatt_device_broker_busy_total", "");
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "the server handles as many broker requests as it may; try again",
                );
                let correlation = correlation(route, &p.payload);
                Answer { status: 503, correlation, body: body_of(error.into_response()).await }
            }
        };
        if let Err(e) = client.publish(reply, QoS::AtLeastOnce, false, answer.encode()).await {
            tracing::warn!(error = %e, "device broker: cannot publish an answer");
        }
    });
}

/// What a request's answer is matched by: a sync's or upload's envelope
/// counter, a fetch's own correlation (0 when unreadable).
fn correlation(route: Route, payload: &[u8]) -> u64 {
    match route {
        Route::Sync | Route::Telemetry => {
            ecowatt_proto::seal::Header::parse(payload).map(|h| h.counter).unwrap_or(0)
        }
        Route::Firmware => FetchRequest::decode(payload).map(|f| f.correlation).unwrap_or(0),
    }
}

async fn body_of(response: Response) -> Vec<u8> {
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

async fn framed(correlation: u64, response: Response) -> Answer {
    let status = response.status().as_u16();
    Answer { status, correlation, body: body_of(response).await }
}

/// The answer to one request from `device`'s topic: what the HTTP endpoint answers.
async fn answer(
    state: &AppState,
    device: &str,
    route: Route,
    payload: Bytes,
    limit: usize,
) -> Answer {
    let correlation = correlation(route, &payload);
    if payload.len() > limit {
        let error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request is larger than {limit} bytes"),
        );
        return framed(correlation, error.into_response()).await;
    }
    let response = match route {
        Route::Sync | Route::Telemetry => {
            if let Some(refused) = of_another_device(state, device, &payload).await {
                crate::api::device::refused(state, None, refused)
            } else {
                let mut headers = HeaderMap::new();
                let octets = HeaderValue::from_static("application/octet-stream");
                headers.insert(header::CONTENT_TYPE, octets);
                let (s, src) = (State(state.clone()), Source(None));
                if route == Route::Sync {
                    crate::api::device::sync(s, src, headers, payload).await
                } else {
                    crate::api::device::telemetry(s, src, headers, payload).await
                }
            }
        }
        Route::Firmware => fetch(state, device, &payload).await,
    };
    framed(correlation, response).await
}

/// A request on `device`'s topic sealed under another device's id is
/// refused (`topic_mismatch`) before anything of it is applied: the broker
/// vouches for the topic, the envelope for itself, and both must agree.
async fn of_another_device(state: &AppState, device: &str, payload: &[u8]) -> Option<Refused> {
    let header = ecowatt_proto::seal::Header::parse(payload).ok()?;
    let id = DeviceId(i64::from(header.device_id));
    match state.devices.crypto(id, header.key_version, true).await {
        Ok(KeyLookup::Found(c)) if c.name != device => {
            let detail = json!({"topic_device": device, "device_id": header.device_id});
            Some(Refused::new(Refusal::AuthFailed, "topic_mismatch", Some(device), detail))
        }
        _ => None,
    }
}

/// A range of an offered image, asked on `device`'s topic: the device is the
/// asker (the broker authenticated it).
async fn fetch(state: &AppState, device: &str, payload: &[u8]) -> Response {
    let bad = |code: &'static str, message: String| {
        ApiError::new(StatusCode::BAD_REQUEST, code, message).into_response()
    };
    let f = match FetchRequest::decode(payload) {
        Ok(f) => f,
        Err(e) => return bad("malformed_fetch", e.to_string()),
    };
    let max = ecowatt_formats::broker::MAX_FETCH;
    if f.len == 0 || f.len > max {
        return bad("fetch_too_large", format!("a fetch asks 1..={max} bytes, not {}", f.len));
    }
    let asker = match state.devices.get(device).await {
        Ok(d) => d.id.0,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut headers = HeaderMap::new();
    let last = f.offset.saturating_add(u64::from(f.len) - 1);
    let range = format!("bytes={}-{last}", f.offset);
    headers.insert(header::RANGE, HeaderValue::from_str(&range).expect("ASCII"));
    let token = ecowatt_proto::hex::encode_upper(&f.token);
    let asked = crate::api::firmware::Asker::new(asker, f.key_version);
    crate::api::firmware::device_image(
        State(state.clone()),
        Source(None),
        crate::api::json::Path(token),
        Query(asked),
        headers,
    )
    .await
    .unwrap_or_else(|e| e.into_response())
}
