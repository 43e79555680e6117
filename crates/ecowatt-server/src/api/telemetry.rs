//! `/api/v1/devices/{name}/telemetry|latest|completeness`: stored batches,
//! decoded on read, in engineering units.

use axum::Json;
use axum::extract::State;

use super::json::{Path, Query};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ecowatt_proto::registers::{REGISTER_COUNT, REGISTERS};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Operator};
use crate::domain::Invalid;
use crate::error::ApiError;
use crate::telemetry::read::{
    CorruptBatch, MAX_POINTS, MAX_TIME_MS, ONLINE_WITHIN_MS, completeness as completeness_of,
    decode_all, engineering, registers, series, time_bound,
};

/// A stored batch that does not decode: logged, a 500 with a stable code.
pub(super) fn corrupt(e: CorruptBatch) -> ApiError {
    tracing::error!(error = %e, "a stored batch does not decode");
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "corrupt_telemetry",
        "a stored batch does not decode",
    )
}

fn eng(address: usize, raw: Option<f64>) -> Value {
    raw.map_or(Value::Null, |v| json!(engineering(address, v)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct RangeQuery {
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    registers: Option<String>,
    max_points: Option<usize>,
    format: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/telemetry",
    operation_id = "telemetry_query",
    tag = "telemetry",
    summary = "Samples in engineering units (from_ms, to_ms, registers, max_points, format=csv)",
    params(("name" = String, Path, description = "Device name"), RangeQuery),
    responses((status = 200, description = "the samples (text/csv with format=csv)", body = Series), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn query(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Response, ApiError> {
    state.devices.get(&name).await?;
    let now = crate::now_ms();
    let to = time_bound("to_ms", q.to_ms)?.unwrap_or(now);
    let from = time_bound("from_ms", q.from_ms)?.unwrap_or((to - 86_400_000).max(0));
    if from > to {
        return Err(Invalid::new("from_ms", "must not be after to_ms").into());
    }
    let max_points = q.max_points.unwrap_or(1_000);
    if !(1..=MAX_POINTS).contains(&max_points) {
        return Err(Invalid::new(
            "max_points",
            format!("{max_points} is outside 1..={MAX_POINTS}"),
        )
        .into());
    }
    let wanted = registers(q.registers.as_deref())?;
    let readings = decode_all(&state.telemetry.range(&name, from, to).await?).map_err(corrupt)?;
    let series = series(&readings, from, to, &wanted, max_points);
    let (downsampled, points) = (series.downsampled, series.points);

    if q.format.as_deref() == Some("csv") {
        let mut out = String::from(if downsampled { "unix_ms" } else { "seq,unix_ms" });
        for a in &wanted {
            out.push_str(&format!(
                ",{}_{}",
                REGISTERS[*a].name,
                REGISTERS[*a].unit.replace('°', "deg")
            ));
        }
        out.push('\n');
        for p in &points {
            if let Some(seq) = p.seq {
                out.push_str(&format!("{seq},"));
            }
            out.push_str(&p.t.to_string());
            for (slot, a) in wanted.iter().enumerate() {
                out.push(',');
                if let Value::Number(n) = eng(*a, p.values[slot]) {
                    out.push_str(&n.to_string());
                }
            }
            out.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response());
    }
    let registers = wanted
        .iter()
        .map(|&address| {
            let r = &REGISTERS[address];
            RegisterInfo { address, name: r.name, description: r.description, unit: r.unit }
        })
        .collect();
    let points = points
        .iter()
        .map(|p| SeriesPoint {
            t: p.t,
            seq: p.seq,
            v: wanted
                .iter()
                .enumerate()
                .map(|(slot, a)| p.values[slot].map(|raw| engineering(*a, raw)))
                .collect(),
        })
        .collect();
    let body = Series {
        device: name,
        from_ms: from,
        to_ms: to,
        samples: series.samples,
        downsampled,
        registers,
        points,
    };
    Ok(Json(body).into_response())
}

/// `GET /api/v1/devices/{name}/telemetry` as JSON.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Series {
    /// The device.
    device: String,
    /// The range asked for, Unix ms.
    from_ms: i64,
    /// The range asked for, Unix ms.
    to_ms: i64,
    /// Samples in the range.
    samples: usize,
    /// Whether the points are averages of equal time buckets (more samples
    /// than `max_points`); an average lies at the mean time of its samples.
    downsampled: bool,
    /// The registers of `v`, in order.
    registers: Vec<RegisterInfo>,
    /// The points, in time order.
    points: Vec<SeriesPoint>,
}

/// A register as a series names it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RegisterInfo {
    /// Register address.
    address: usize,
    /// Short name (`Pac`).
    name: &'static str,
    /// What it measures.
    description: &'static str,
    /// Engineering unit.
    unit: &'static str,
}

/// One point: a sample (with its `seq`) or a bucket's average.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SeriesPoint {
    /// Time, Unix ms.
    t: i64,
    /// The sample's sequence number (absent for an average).
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// Values in engineering units, one per register (null: not sampled).
    v: Vec<Option<f64>>,
}

/// `GET /api/v1/devices/{name}/latest`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Latest {
    /// The device.
    device: String,
    /// Talked to the server in the last 90 s.
    online: bool,
    /// When it last did, Unix ms.
    last_seen_ms: Option<i64>,
    /// The upload interval it reports running (else the one it was asked for), ms.
    upload_interval_ms: i64,
    /// When its next upload is due (an estimate: the newest sample's time
    /// plus the interval), Unix ms; null before its first upload.
    next_upload_due_ms: Option<i64>,
    /// The newest sample; null before the first upload (a device uploads its
    /// first sample as soon as it starts).
    sample: Option<LatestSample>,
}

/// A device's newest sample.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct LatestSample {
    /// Its sequence number.
    seq: u64,
    /// Its time, Unix ms.
    t: u64,
    /// The registers sampled, in address order.
    readings: Vec<Reading>,
}

/// One register of a sample, raw and in its engineering unit.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Reading {
    /// Register address.
    address: usize,
    /// Short name (`Pac`).
    name: &'static str,
    /// What it measures (`AC output power`).
    description: &'static str,
    /// The raw register value.
    raw: u16,
    /// In `unit`.
    value: f64,
    /// Engineering unit (`W`).
    unit: &'static str,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/latest",
    operation_id = "telemetry_latest",
    tag = "telemetry",
    summary = "Newest sample, online, last seen, when the next upload is due",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the newest sample and when the next is due", body = Latest), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn latest(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Latest>, ApiError> {
    let device = state.devices.get(&name).await?;
    let online = device.last_seen_ms.is_some_and(|t| crate::now_ms() - t <= ONLINE_WITHIN_MS);
    // When data will next arrive: the interval the device reports running
    // (else the one it was asked for), from its newest batch's last sample
    // (it uploads within a poll of it).
    let shadow = state.configs.shadow(&name).await?;
    let upload_interval_ms = shadow.reported.as_ref().unwrap_or(&shadow.desired).upload_interval_ms;
    let mut latest = Latest {
        device: name.clone(),
        online,
        last_seen_ms: device.last_seen_ms,
        upload_interval_ms,
        next_upload_due_ms: None,
        sample: None,
    };
    let Some(batch) = state.telemetry.latest(&name).await? else {
        return Ok(Json(latest));
    };
    latest.next_upload_due_ms = Some(batch.last_ms + upload_interval_ms);
    let readings = decode_all(std::slice::from_ref(&batch)).map_err(corrupt)?;
    let r = readings.values().next_back().expect("a stored batch is never empty");
    let readings = (0..REGISTER_COUNT)
        .filter_map(|a| {
            r.values[a].map(|raw| Reading {
                address: a,
                name: REGISTERS[a].name,
                description: REGISTERS[a].description,
                raw,
                value: engineering(a, f64::from(raw)),
                unit: REGISTERS[a].unit,
            })
        })
        .collect();
    latest.sample = Some(LatestSample { seq: r.seq, t: r.unix_ms, readings });
    Ok(Json(latest))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CompletenessQuery {
    from_ms: Option<i64>,
    to_ms: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/completeness",
    operation_id = "telemetry_completeness",
    tag = "telemetry",
    summary = "Gaps in seq and reported drops",
    params(("name" = String, Path, description = "Device name"), CompletenessQuery),
    responses((status = 200, description = "received, gaps, duplicates, drops the device reported", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn completeness(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<CompletenessQuery>,
) -> Result<Json<Value>, ApiError> {
    state.devices.get(&name).await?;
    let from = time_bound("from_ms", q.from_ms)?.unwrap_or(0);
    let to = time_bound("to_ms", q.to_ms)?.unwrap_or(MAX_TIME_MS);
    let batches = state.telemetry.range(&name, from, to).await?;
    let c = completeness_of(&batches, &decode_all(&batches).map_err(corrupt)?);
    Ok(Json(json!({
        "device": name,
        "first_seq": c.first_seq,
        "last_seq": c.last_seq,
        "received": c.received,
        "duplicates": c.duplicates,
        "missing": c.missing,
        "gaps": c.gaps.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        "dropped_reported": state.telemetry.dropped_total(&name).await?,
    })))
}
