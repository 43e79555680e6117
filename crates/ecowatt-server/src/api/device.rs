//! `/api/v1/device/*`: the sealed device protocol v1 (`docs/protocol.md`).
//!
//! Every request is an envelope sealed with the device's key; every answer is
//! sealed to the device and bound to the request's counter. What the peer
//! learns from a refusal is only the code the spec lists; the server records
//! the precise reason as a security event.

use std::time::Duration;

use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ecowatt_proto::codec;
use ecowatt_proto::messages::{
    self, MessageType, SyncRequest, SyncResponse, TelemetryAck, TelemetryUpload,
};
use ecowatt_proto::registers::EXPORT_LIMIT;
use ecowatt_proto::seal::{self, Direction, Header, Keys};
use serde_json::json;

use super::{AppState, Source};
use crate::commands::Action;
use crate::config::{DeviceConfig, Rejection};
use crate::error::ApiError;
use crate::store::{
    CommandOutcome, DeviceCrypto, KeyLookup, StoredBatch, SyncDelivery, SyncRefusal, SyncReport,
};

/// Longest a sync is held open waiting for news.
pub const MAX_WAIT_MS: u32 = 25_000;
/// A delivered command without a result is handed out again on the next sync.
const REDELIVER_MS: i64 = 0;

fn refuse(status: StatusCode, code: &'static str) -> Response {
    ApiError::new(status, code, code.replace('_', " ")).into_response()
}

/// The answer to a source that has used up its refusals (see `refusals.rs`).
fn rate_limited() -> Response {
    let mut r = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many refused requests from this address; try again later",
    )
    .into_response();
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
    r
}

/// Records a refusal (counted now, written as a tallied security event) and
/// logs the first of its kind from its source this minute.
fn event(
    state: &AppState,
    source: Option<IpAddr>,
    device: Option<&str>,
    kind: &'static str,
    detail: serde_json::Value,
) {
    state.metrics.inc("ecowatt_security_events_total", format!("kind=\"{kind}\""));
    if state.refusals.refused(source, device, kind, detail.clone(), crate::now_ms()) {
        tracing::warn!(?source, device, kind, %detail, "device protocol security event (repeats this minute are counted, not logged)");
    } else {
        tracing::debug!(?source, device, kind, %detail, "device protocol security event");
    }
}

/// The refusal at the door: the code the spec lists, or 429 once the source
/// is throttled.
fn door_refusal(throttled: bool, status: StatusCode, code: &'static str) -> Response {
    if throttled { rate_limited() } else { refuse(status, code) }
}

fn config_state(version: i64, c: &DeviceConfig) -> messages::ConfigState {
    messages::ConfigState {
        version: version as u64,
        poll_interval_ms: c.poll_interval_ms as u32,
        upload_interval_ms: c.upload_interval_ms as u32,
        registers: c.registers.iter().fold(0u16, |m, r| m | (1 << r)),
    }
}

fn device_config(c: &messages::ConfigState) -> DeviceConfig {
    DeviceConfig {
        poll_interval_ms: i64::from(c.poll_interval_ms),
        upload_interval_ms: i64::from(c.upload_interval_ms),
        registers: (0..10u16).filter(|r| c.registers & (1 << r) != 0).collect(),
    }
}

/// The offer as the device protocol carries it (an unreadable stored
/// manifest offers nothing, loudly).
fn offer(d: &SyncDelivery) -> Option<messages::UpdateOffer> {
    let row = d.update.as_ref()?;
    let parsed = crate::firmware::parse_manifest(&row.manifest).and_then(|(m, signer, sig)| {
        let token: [u8; 16] = ecowatt_proto::hex::decode(&row.token)
            .ok()
            .and_then(|t| t.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("bad token"))?;
        Ok(messages::UpdateOffer {
            token,
            manifest: m,
            algorithm: match signer {
                ecowatt_proto::firmware::PublicKey::Ed25519(_) => {
                    messages::signature_algorithm::ED25519
                }
                ecowatt_proto::firmware::PublicKey::Rsa2048(_) => {
                    messages::signature_algorithm::RSA2048_SHA256
                }
            },
            signature: sig,
        })
    });
    match parsed {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::error!(device = %d.device, error = %e, "stored manifest unreadable; no offer");
            None
        }
    }
}

fn answer_body(d: &SyncDelivery) -> Vec<u8> {
    SyncResponse {
        update: offer(d),
        server_time_ms: crate::now_ms() as u64,
        config: d.config.as_ref().map(|(v, c)| config_state(*v, c)),
        commands: d
            .commands
            .iter()
            .map(|c| messages::DeviceCommand {
                id: c.id as u64,
                op: match c.action {
                    Action::Write { register, value } => {
                        messages::Operation::Write { register, value }
                    }
                    Action::Read { register } => messages::Operation::Read { register },
                },
                expires_ms: c.expires_ms as u64,
            })
            .collect(),
    }
    .encode()
}

/// An authentic request, past the door.
struct Admitted {
    crypto: DeviceCrypto,
    /// The full version of the key that opened it (the store checks it is
    /// still one of the device's when it admits the message).
    key_version: i64,
    key: [u8; 16],
    keys: Keys,
    header: Header,
    plaintext: Vec<u8>,
}

/// Content type, length, header, device, key, tag and type: everything short
/// of the replay check (which runs in the transaction that applies the message).
async fn door(
    state: &AppState,
    source: Option<IpAddr>,
    headers: &HeaderMap,
    body: Bytes,
    expected: MessageType,
) -> Result<Admitted, Response> {
    let throttled = state.refusals.throttled(source);
    let octets = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/octet-stream"));
    if !octets {
        event(state, source, None, "wrong_content_type", json!({}));
        return Err(door_refusal(
            throttled,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ));
    }
    let header = match Header::parse(&body) {
        Ok(h) => h,
        Err(e) => {
            event(
                state,
                source,
                None,
                "malformed_envelope",
                json!({"reason": e.code(), "len": body.len()}),
            );
            return Err(door_refusal(throttled, StatusCode::BAD_REQUEST, "malformed_envelope"));
        }
    };
    let crypto = match state
        .devices
        .crypto(i64::from(header.device_id), header.key_version, !throttled)
        .await
    {
        Ok(KeyLookup::Found(c)) => c,
        Ok(KeyLookup::Unknown) => {
            // The work a bad tag costs (derive, open), so that an unknown id
            // cannot be told from a known one by the time its refusal takes.
            let keys = Keys::derive(std::hint::black_box(&[0xA5; 16]));
            let _ = std::hint::black_box(seal::open(&keys, &body, None));
            event(state, source, None, "unknown_device", json!({"device_id": header.device_id}));
            return Err(door_refusal(throttled, StatusCode::UNAUTHORIZED, "auth_failed"));
        }
        Ok(KeyLookup::NotLookedUp) => {
            event(state, source, None, "rate_limited", json!({"device_id": header.device_id}));
            return Err(rate_limited());
        }
        Err(e) => return Err(ApiError::from(e).into_response()),
    };
    let name = crypto.name.clone();
    let Some((key_version, key)) = crypto.key_for(header.key_version) else {
        event(
            state,
            source,
            Some(&name),
            "unknown_key_version",
            json!({"key_version": header.key_version}),
        );
        return Err(door_refusal(throttled, StatusCode::UNAUTHORIZED, "auth_failed"));
    };
    let keys = Keys::derive(&key);
    let (header, plaintext) = match seal::open(&keys, &body, None) {
        Ok(opened) => opened,
        Err(e) => {
            event(
                state,
                source,
                Some(&name),
                "bad_tag",
                json!({"reason": e.code(), "counter": header.counter}),
            );
            return Err(door_refusal(throttled, StatusCode::UNAUTHORIZED, "auth_failed"));
        }
    };
    // Authentic from here on: the header is covered by the tag.
    if header.direction != Direction::Up || header.msg_type != expected as u8 {
        event(state, source, Some(&name), "wrong_type", json!({"type": header.msg_type}));
        return Err(refuse(StatusCode::BAD_REQUEST, "wrong_type"));
    }
    Ok(Admitted { crypto, key_version, key, keys, header, plaintext })
}

fn refused(
    state: &AppState,
    source: Option<IpAddr>,
    name: &str,
    counter: u64,
    refusal: SyncRefusal,
) -> Response {
    match refusal {
        SyncRefusal::Replay(e) => {
            event(
                state,
                source,
                Some(name),
                "replay",
                json!({"counter": counter, "reason": e.code()}),
            );
            refuse(StatusCode::CONFLICT, "replay")
        }
        SyncRefusal::Disabled => {
            event(state, source, Some(name), "device_disabled", json!({}));
            refuse(StatusCode::FORBIDDEN, "device_disabled")
        }
        SyncRefusal::StaleKey => {
            event(state, source, Some(name), "stale_key", json!({"counter": counter}));
            refuse(StatusCode::UNAUTHORIZED, "auth_failed")
        }
    }
}

fn answer(keys: &Keys, request: &Header, down_counter: u64, delivery: &SyncDelivery) -> Response {
    sealed(keys, request, MessageType::SyncResponse, down_counter, &answer_body(delivery))
}

fn sealed(
    keys: &Keys,
    request: &Header,
    msg_type: MessageType,
    down_counter: u64,
    body: &[u8],
) -> Response {
    let header = Header {
        msg_type: msg_type as u8,
        direction: Direction::Down,
        key_version: request.key_version,
        device_id: request.device_id,
        counter: down_counter,
    };
    let sealed = seal::seal(keys, &header, Some(request.counter), body);
    ([(header::CONTENT_TYPE, "application/octet-stream")], sealed).into_response()
}

/// What a long poll keeps while it waits: enough to seal its answer. (Memory
/// per open long poll is what bounds a server holding 10,000 of them.)
struct Held {
    key: [u8; 16],
    header: Header,
    device_id: i64,
    delivery: SyncDelivery,
    wait_ms: u32,
    notified: std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>,
}

/// What a device's result says, in words (the protocol carries only the
/// outcome, the exception and the value read back).
fn result_message(r: &messages::CommandResult) -> Option<String> {
    match (r.succeeded, r.exception, r.value) {
        (_, Some(e), _) => Some(format!("Modbus exception {e:02X}")),
        (true, None, _) => None,
        (false, None, Some(v)) => Some(format!("the register reads {v}, not the value asked for")),
        (false, None, None) => Some(
            "no answer from the inverter (or the device restarted before it could read the register back)"
                .to_owned(),
        ),
    }
}

/// `POST /api/v1/device/sync`: the device reports and asks; the answer carries
/// config and commands, at once or when they arrive within the wait it allows.
pub async fn sync(
    State(state): State<AppState>,
    Source(source): Source,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The door, the decoding and the first transaction run in their own
    // (boxed) future, finished before the wait: what waits is only `Held`.
    let held = match Box::pin(sync_first(&state, source, &headers, body)).await {
        Ok(held) => held,
        Err(answered) => return answered,
    };
    // News, the end of the wait, or the server stopping (which answers now
    // with what the first step prepared, so that the device syncs again
    // elsewhere or later instead of waiting for its timeout).
    let woken = tokio::select! {
        woken = tokio::time::timeout(Duration::from_millis(u64::from(held.wait_ms)), held.notified) => woken.is_ok(),
        _ = state.news.stopping() => false,
    };
    // A wait that ends with no news answers with what the first step prepared
    // (its down counter is unused): an idle long poll costs one read and a
    // share of a group commit (`SqlStore::quiet_sync`).
    let delivery = if woken {
        match state.store.device_deliver(held.device_id, REDELIVER_MS, crate::now_ms()).await {
            Ok(d) => d,
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else {
        held.delivery
    };
    state.metrics.inc("ecowatt_device_syncs_total", "");
    answer(&Keys::derive(&held.key), &held.header, delivery.down_counter, &delivery)
}

/// A sync up to its wait: `Err` is the answer when there is nothing to wait for.
async fn sync_first(
    state: &AppState,
    source: Option<IpAddr>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Held, Response> {
    let a = door(state, source, headers, body, MessageType::SyncRequest).await?;
    let name = a.crypto.name.clone();
    let request = match SyncRequest::decode(&a.plaintext) {
        Ok(r) => r,
        Err(e) => {
            event(state, source, Some(&name), "malformed_body", json!({"reason": e.to_string()}));
            return Err(refuse(StatusCode::BAD_REQUEST, "malformed_body"));
        }
    };
    let report = SyncReport {
        key_version: a.key_version,
        counter: a.header.counter,
        applied: request.applied.as_ref().map(|c| (c.version as i64, device_config(c))),
        rejected: request
            .rejected
            .iter()
            .map(|r| Rejection::from_protocol(r.field, r.reason))
            .collect(),
        results: request
            .results
            .iter()
            .map(|r| {
                let outcome = CommandOutcome {
                    success: r.succeeded,
                    message: result_message(r),
                    exception_code: r.exception,
                    value: r.value,
                    executed_ms: (r.executed_ms > 0).then_some(r.executed_ms as i64),
                };
                (r.command_id as i64, outcome)
            })
            .collect(),
        firmware: (!request.firmware.is_empty()).then(|| request.firmware.clone()),
        ota: request.ota.clone(),
    };
    // Listen before looking, so that news arriving in between is not missed.
    let mut notified = Box::pin(state.news.waiter(&name).notified_owned());
    notified.as_mut().enable();

    let now = crate::now_ms();
    let delivery =
        match state.store.device_sync(a.crypto.id, &report, true, REDELIVER_MS, now).await {
            Ok(Ok(d)) => d,
            Ok(Err(refusal)) => {
                return Err(refused(state, source, &name, a.header.counter, refusal));
            }
            Err(e) => return Err(ApiError::from(e).into_response()),
        };
    for (_, outcome) in &report.results {
        let label = if outcome.success { "success" } else { "failure" };
        state.metrics.inc("ecowatt_command_results_total", format!("outcome=\"{label}\""));
    }
    let wait_ms = request.wait_ms.min(MAX_WAIT_MS);
    // An offer is news unless the device already works on that version.
    let new_offer = delivery.update.as_ref().is_some_and(|u| {
        request.ota.as_ref().map(|o| o.version.as_str()) != u.manifest["version"].as_str()
    });
    if delivery.config.is_some() || !delivery.commands.is_empty() || new_offer || wait_ms == 0 {
        state.metrics.inc("ecowatt_device_syncs_total", "");
        return Err(answer(&a.keys, &a.header, delivery.down_counter, &delivery));
    }
    Ok(Held { key: a.key, header: a.header, device_id: a.crypto.id, delivery, wait_ms, notified })
}

/// `POST /api/v1/device/telemetry`: a batch of samples; stored once, acknowledged.
pub async fn telemetry(
    State(state): State<AppState>,
    Source(source): Source,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let a = match door(&state, source, &headers, body, MessageType::TelemetryUpload).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let name = a.crypto.name.clone();
    let decoded = TelemetryUpload::decode(&a.plaintext).map_err(|e| e.to_string()).and_then(|up| {
        if up.codec != codec::CODEC_V1 {
            return Err(format!("codec {} unknown", up.codec));
        }
        let batch = codec::decode(&up.batch).map_err(|e| e.to_string())?;
        let (first, last) = (
            batch.samples.first().expect("decode refuses empty"),
            batch.samples.last().expect("non-empty"),
        );
        if first.seq != up.first_seq || batch.samples.len() != usize::from(up.count) {
            return Err("header disagrees with the batch".into());
        }
        if last.seq > i64::MAX as u64 {
            return Err(format!("seq {} is beyond 2^63 - 1", last.seq));
        }
        let stored = StoredBatch {
            first_seq: first.seq as i64,
            last_seq: last.seq as i64,
            count: batch.samples.len() as i64,
            first_ms: batch.samples.iter().map(|s| s.unix_ms).min().unwrap_or(0) as i64,
            last_ms: batch.samples.iter().map(|s| s.unix_ms).max().unwrap_or(0) as i64,
            registers: i64::from(batch.registers),
            codec: i64::from(up.codec),
            data: up.batch.clone(),
        };
        Ok((up, batch, stored))
    });
    let (upload, batch, stored) = match decoded {
        Ok(d) => d,
        Err(reason) => {
            event(&state, source, Some(&name), "malformed_body", json!({"reason": reason}));
            return refuse(StatusCode::BAD_REQUEST, "malformed_body");
        }
    };
    let now = crate::now_ms();
    // Before anything is stored or acknowledged: a time outside the range the
    // server keeps would be acknowledged and then never shown.
    if let Some(bad) =
        batch.samples.iter().find(|x| !messages::sample_time_ok(x.unix_ms, now as u64))
    {
        event(
            &state,
            source,
            Some(&name),
            "sample_time_out_of_range",
            json!({"seq": bad.seq, "unix_ms": bad.unix_ms, "server_ms": now}),
        );
        return ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "sample_time_out_of_range",
            format!(
                "sample {} is stamped {} ms; accepted are times from 2020-01-01 to one day past the server's clock ({now} ms)",
                bad.seq, bad.unix_ms
            ),
        )
        .into_response();
    }
    let dropped = upload.dropped_total.min(i64::MAX as u64) as i64;
    let down = match state
        .store
        .device_telemetry(a.crypto.id, a.key_version, a.header.counter, &stored, dropped, now)
        .await
    {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(refusal)) => return refused(&state, source, &name, a.header.counter, refusal),
        Err(e) => return ApiError::from(e).into_response(),
    };
    state.metrics.inc("ecowatt_telemetry_batches_total", "");
    // A reading of the export limit confirms the writes it shows took effect
    // (asked only when the device has writes waiting for that).
    if down.unconfirmed && batch.registers & (1 << EXPORT_LIMIT) != 0 {
        let index = (batch.registers & ((1 << EXPORT_LIMIT) - 1)).count_ones() as usize;
        if let Some(last) = batch.samples.last() {
            let reading = (EXPORT_LIMIT, last.values[index], last.unix_ms as i64);
            let _ = state.commands.confirm(a.crypto.id, reading.0, reading.1, reading.2).await;
        }
    }
    let ack = TelemetryAck { acked_through: stored.last_seq as u64 };
    sealed(&a.keys, &a.header, MessageType::TelemetryAck, down.down_counter, &ack.encode())
}
