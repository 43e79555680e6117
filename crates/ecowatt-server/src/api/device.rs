//! `/api/v1/device/*`: the sealed device protocol v1 (`docs/protocol.md`),
//! over HTTP. The protocol's checks and rules live in [`crate::protocol`];
//! here are the statuses, the long poll's wait and the security events'
//! logging.

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ecowatt_proto::messages::{DELIVERY_ENCRYPTED, MessageType, SyncRequest, TelemetryAck};
use ecowatt_proto::seal::{self, Direction, Header, Keys};
use serde_json::json;

use super::{AppState, Source};
use crate::devices::DeviceId;
use crate::error::ApiError;
use crate::protocol::door::{self, Answer, Refused};
use crate::protocol::{MAX_WAIT_MS, REDELIVER_MS, SyncDelivery, answer_now, messages};

/// The answer to a refusal, after recording its security event (counted
/// now, written tallied; the first of its kind from its source this minute
/// is logged as a warning).
pub(crate) fn refused(state: &AppState, source: Option<IpAddr>, r: Refused) -> Response {
    if let Some(kind) = r.kind {
        state.metrics.inc("ecowatt_security_events_total", format!("kind=\"{kind}\""));
        let (device, detail) = (r.device.as_deref(), &r.detail);
        if state.refusals.refused(source, device, kind, detail.clone(), crate::now_ms()) {
            tracing::warn!(?source, device, kind, %detail, "device protocol security event (repeats this minute are counted, not logged)");
        } else {
            tracing::debug!(?source, device, kind, %detail, "device protocol security event");
        }
    }
    let answer = if r.throttled { Answer::RateLimited } else { r.answer };
    let status = match &answer {
        Answer::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Answer::MalformedEnvelope | Answer::WrongType | Answer::MalformedBody => {
            StatusCode::BAD_REQUEST
        }
        Answer::AuthFailed => StatusCode::UNAUTHORIZED,
        Answer::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Answer::Replay => StatusCode::CONFLICT,
        Answer::DeviceDisabled => StatusCode::FORBIDDEN,
        Answer::SampleTimeOutOfRange(_) | Answer::CodecNotOffered(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        Answer::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let message = match &answer {
        Answer::SampleTimeOutOfRange(m) | Answer::CodecNotOffered(m) => m.clone(),
        Answer::RateLimited => {
            "too many refused requests from this address; try again later".to_owned()
        }
        Answer::Store(e) => {
            tracing::error!(error = %e, "store failure");
            "the store failed; try again".to_owned()
        }
        other => other.code().replace('_', " "),
    };
    let mut response = ApiError::new(status, answer.code(), message).into_response();
    if answer == Answer::RateLimited {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
    }
    response
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

fn answer(keys: &Keys, request: &Header, delivery: &SyncDelivery, codecs: Option<u8>) -> Response {
    let body = messages::answer_body(delivery, codecs, crate::now_ms());
    sealed(keys, request, MessageType::SyncResponse, delivery.down_counter, &body)
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

/// What a long poll keeps while it waits: enough to seal its answer. (Memory
/// per open long poll is what bounds a server holding 10,000 of them.)
struct Held {
    key: [u8; 16],
    header: Header,
    device_id: DeviceId,
    delivery: SyncDelivery,
    wait_ms: u32,
    /// The codecs to offer (the request stated its own).
    codecs: Option<u8>,
    /// The device takes encrypted images.
    takes_encrypted: bool,
    notified: std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>,
}

/// `POST /api/v1/device/sync`: the device reports and asks; the answer carries
/// config and commands, at once or when they arrive within the wait it allows.
#[utoipa::path(
    post,
    path = "/api/v1/device/sync",
    operation_id = "device_sync",
    tag = "device protocol",
    summary = "Device protocol: sealed sync (long poll); see docs/protocol.md",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A sealed envelope (docs/protocol.md)"),
    responses((status = 200, description = "a sealed answer (docs/protocol.md)", body = Vec<u8>), (status = "4XX", description = "refused: a sealed or JSON error (docs/protocol.md#transport)")),
)]
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
    // share of a group commit (`Protocol::sync`).
    // Boxed, so that the transaction's future is not part of every waiting
    // long poll's (10,000 of them held ~70 MB more when it was inline).
    let delivery = if woken {
        match Box::pin(deliver_now(&state, held.device_id, held.takes_encrypted)).await {
            Ok(d) => d,
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else {
        held.delivery
    };
    state.metrics.inc("ecowatt_device_syncs_total", "");
    answer(&Keys::derive(&held.key), &held.header, &delivery, held.codecs)
}

/// A sync up to its wait: `Err` is the answer when there is nothing to wait for.
async fn sync_first(
    state: &AppState,
    source: Option<IpAddr>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Held, Response> {
    let a = door::open(
        &state.devices,
        &state.refusals,
        source,
        content_type(headers),
        &body,
        MessageType::SyncRequest,
    )
    .await
    .map_err(|r| refused(state, source, r))?;
    let name = a.crypto.name.clone();
    let request = SyncRequest::decode(&a.plaintext).map_err(|e| {
        let detail = json!({"reason": e.to_string()});
        refused(
            state,
            source,
            Refused::new(Answer::MalformedBody, "malformed_body", Some(&name), detail),
        )
    })?;
    let report = messages::report_of(&request, a.key_version, a.header.counter);
    // Listen before looking, so that news arriving in between is not missed.
    let mut notified = Box::pin(state.news.waiter(&name).notified_owned());
    notified.as_mut().enable();

    let delivery = state
        .protocol
        .sync(a.crypto.id, &report, true, REDELIVER_MS, crate::now_ms())
        .await
        .map_err(|e| ApiError::from(e).into_response())?
        .map_err(|r| refused(state, source, Refused::admission(&name, a.header.counter, r)))?;
    for (_, outcome) in &report.results {
        let label = if outcome.success { "success" } else { "failure" };
        state.metrics.inc("ecowatt_command_results_total", format!("outcome=\"{label}\""));
    }
    let takes_encrypted = request.delivery.is_some_and(|d| d & DELIVERY_ENCRYPTED != 0);
    let delivery = screen_offer(state, delivery, takes_encrypted).await;
    let wait_ms = request.wait_ms.min(MAX_WAIT_MS);
    let codecs = request.codecs.map(|_| state.settings.codecs);
    if answer_now(&delivery, request.ota.as_ref().map(|o| o.version.as_str()), wait_ms) {
        state.metrics.inc("ecowatt_device_syncs_total", "");
        return Err(answer(&a.keys, &a.header, &delivery, codecs));
    }
    let (key, header, device_id) = (a.key, a.header, a.crypto.id);
    Ok(Held { key, header, device_id, delivery, wait_ms, codecs, takes_encrypted, notified })
}

/// What news brought to a waiting device, screened as [`screen_offer`] does.
async fn deliver_now(
    state: &AppState,
    device_id: DeviceId,
    takes_encrypted: bool,
) -> crate::db::StoreResult<SyncDelivery> {
    let d = state.protocol.deliver(device_id, REDELIVER_MS, crate::now_ms()).await?;
    Ok(screen_offer(state, d, takes_encrypted).await)
}

/// An encrypted offer to a device that does not take encrypted images is
/// not made: its place in the rollout fails (`encryption_unsupported`).
async fn screen_offer(
    state: &AppState,
    mut d: SyncDelivery,
    takes_encrypted: bool,
) -> SyncDelivery {
    if let Some(offer) = d.update.take_if(|u| u.encrypted && !takes_encrypted) {
        tracing::warn!(device = %d.device, "an encrypted rollout cannot reach a device that takes no encrypted images");
        if let Err(e) = state
            .rollouts
            .refuse_offer(&offer.token, "encryption_unsupported", crate::now_ms())
            .await
        {
            tracing::warn!(device = %d.device, error = %e, "cannot mark the offer failed (tried again at the next sync)");
        }
    }
    d
}

/// `POST /api/v1/device/telemetry`: a batch of samples; stored once, acknowledged.
#[utoipa::path(
    post,
    path = "/api/v1/device/telemetry",
    operation_id = "device_telemetry",
    tag = "device protocol",
    summary = "Device protocol: sealed telemetry upload; see docs/protocol.md",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A sealed envelope (docs/protocol.md)"),
    responses((status = 200, description = "a sealed acknowledgement (docs/protocol.md)", body = Vec<u8>), (status = "4XX", description = "refused: a sealed or JSON error (docs/protocol.md#transport)")),
)]
pub async fn telemetry(
    State(state): State<AppState>,
    Source(source): Source,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let opened = door::open(
        &state.devices,
        &state.refusals,
        source,
        content_type(&headers),
        &body,
        MessageType::TelemetryUpload,
    )
    .await;
    let a = match opened {
        Ok(a) => a,
        Err(r) => return refused(&state, source, r),
    };
    let name = a.crypto.name.clone();
    let now = crate::now_ms();
    let upload = match messages::upload_of(&a.plaintext, &name, state.settings.codecs, now) {
        Ok(u) => u,
        Err(r) => return refused(&state, source, r),
    };
    let stored = state.protocol.upload(a.crypto.id, a.key_version, a.header.counter, &upload, now);
    let accepted = match stored.await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(r)) => {
            return refused(&state, source, Refused::admission(&name, a.header.counter, r));
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    state.metrics.inc("ecowatt_telemetry_batches_total", "");
    let ack = TelemetryAck { acked_through: upload.batch.last_seq as u64 };
    sealed(&a.keys, &a.header, MessageType::TelemetryAck, accepted.down_counter, &ack.encode())
}

#[cfg(test)]
mod tests {
    /// What a waiting long poll holds is the `sync` future (its first step
    /// and its delivery are boxed, its state is one `Arc`): 10,000 of them
    /// at once is the fleet's memory. When the delivery's transaction was
    /// inline and the state a handle per aggregate, the future was 2,464
    /// bytes and the fleet bench's server 90 MB bigger.
    #[tokio::test]
    async fn a_waiting_long_poll_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::db::sqlite_url(&dir.path().join("e.db"));
        let store = crate::store::Store::open(&url).await.unwrap();
        let file = crate::settings::SettingsFile {
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let settings = crate::settings::Settings::resolve(file).unwrap();
        let state = super::AppState::new(store.clone(), settings, Default::default());
        assert_eq!(std::mem::size_of_val(&state), std::mem::size_of::<usize>());
        let waiting = super::sync(
            axum::extract::State(state),
            super::Source(None),
            axum::http::HeaderMap::new(),
            axum::body::Bytes::new(),
        );
        let size = std::mem::size_of_val(&waiting);
        assert!(size <= 1024, "the sync future is {size} bytes");
        drop(waiting);
        store.close().await;
    }
}
