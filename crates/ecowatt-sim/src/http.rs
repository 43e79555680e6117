//! The Inverter SIM HTTP API (`shared/reference/inverter-sim-api.md`), plus
//! `/api/sim/state` and `/healthz` of our own.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ecowatt_proto::hex;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::SimState;
use crate::faults::{self, ErrorType, Fault};
use crate::sim::{Answer, Endpoint};

/// Largest request body accepted; a frame is at most 256 bytes (512 hex digits).
pub const BODY_LIMIT: usize = 4 * 1024;
/// Longest a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The SIM HTTP API over `state`.
pub fn app(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/api/inverter/read", post(read))
        .route("/api/inverter/write", post(write))
        .route("/api/user/error-flag/add", post(add_error_flag))
        .route("/api/inverter/error", post(emulate_error))
        .route("/api/sim/state", get(sim_state))
        .route("/healthz", get(|| async { "ok" }))
        .route_layer(ecowatt_edge::BodyGuardLayer::new(BODY_LIMIT, BODY_TIMEOUT))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// An error with a stable code, rendered as `{"error": {"code", "message"}}`.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

fn authorize(state: &SimState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    match headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        Some(given) if given == key => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "bad_api_key", "wrong API key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send the API key in the Authorization header",
        )),
    }
}

fn frame_reply(status: StatusCode, frame: &str) -> Response {
    (status, Json(json!({ "frame": frame }))).into_response()
}

#[derive(Deserialize)]
struct FrameBody {
    frame: String,
}

async fn read(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    exchange(&state, &headers, &body, Endpoint::Read).await
}

async fn write(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    exchange(&state, &headers, &body, Endpoint::Write).await
}

async fn exchange(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: Endpoint,
) -> Response {
    if let Err(e) = authorize(state, headers) {
        return e.into_response();
    }
    // A malformed JSON body gets an empty frame and 400, as the course service does.
    let Ok(FrameBody { frame }) = serde_json::from_slice::<FrameBody>(body) else {
        return frame_reply(StatusCode::BAD_REQUEST, "");
    };
    // Text that is not hex is not a valid frame: a blank answer.
    let Ok(bytes) = hex::decode(frame.trim()) else {
        return frame_reply(StatusCode::OK, "");
    };
    let answer = state.sim.lock().expect("simulator lock").handle_rtu(&bytes, endpoint);
    match answer {
        Answer::Frame(f) => frame_reply(StatusCode::OK, &hex::encode_upper(&f)),
        Answer::Delayed(ms, f) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            frame_reply(StatusCode::OK, &hex::encode_upper(&f))
        }
        Answer::Blank => frame_reply(StatusCode::OK, ""),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorFlag {
    error_type: ErrorType,
    exception_code: Option<u8>,
    delay_ms: Option<u64>,
}

async fn add_error_flag(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
    let flag: ErrorFlag = parse(&body)?;
    let fault = Fault::from_api(flag.error_type, flag.exception_code, flag.delay_ms)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_flag", e.to_string()))?;
    let mut sim = state.sim.lock().expect("simulator lock");
    if !sim.add_fault(fault) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_flags",
            format!("at most {} flags may wait", faults::MAX_PENDING),
        ));
    }
    Ok(Json(json!({"status": "ok", "pending": sim.pending_faults()})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorEmulation {
    slave_address: u8,
    function_code: u8,
    error_type: ErrorType,
    exception_code: Option<u8>,
    delay_ms: Option<u64>,
}

/// The frame an error of this kind would produce: no state changes, no auth.
async fn emulate_error(body: Bytes) -> Result<Response, ApiError> {
    let e: ErrorEmulation = parse(&body)?;
    let fault = Fault::from_api(e.error_type, e.exception_code, e.delay_ms)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, "invalid_flag", err.to_string()))?;
    // An exception frame is the base every other kind distorts.
    let code = e.exception_code.filter(|c| *c > 0).unwrap_or(0x04);
    let base = Fault::exception_frame(e.slave_address, e.function_code, code);
    let frame = match fault {
        Fault::Exception(_) => base,
        Fault::CrcError => faults::corrupt_crc(base),
        Fault::Corrupt => faults::garbage(base.len(), u64::from(e.function_code)),
        Fault::PacketDrop => Vec::new(),
        Fault::Delay(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Vec::new()
        }
    };
    Ok(frame_reply(StatusCode::OK, &hex::encode_upper(&frame)))
}

async fn sim_state(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
    let mut sim = state.sim.lock().expect("simulator lock");
    Ok(Json(json!({
        "sim_time_ms": sim.now_ms(),
        "inverters": sim.snapshot(),
        "counters": sim.counters(),
        "pending_flags": sim.pending_faults(),
    })))
}
