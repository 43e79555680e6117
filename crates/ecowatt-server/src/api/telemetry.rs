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

fn corrupt(e: CorruptBatch) -> ApiError {
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
    responses((status = 200, description = "{registers, points: [{t, seq?, v}], downsampled} (text/csv with format=csv)", body = serde_json::Value), crate::error::ErrorResponses),
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
    let registers: Vec<Value> = wanted
        .iter()
        .map(|a| {
            let r = &REGISTERS[*a];
            json!({"address": a, "name": r.name, "description": r.description, "unit": r.unit})
        })
        .collect();
    let points: Vec<Value> = points
        .iter()
        .map(|p| {
            let v: Vec<Value> =
                wanted.iter().enumerate().map(|(slot, a)| eng(*a, p.values[slot])).collect();
            match p.seq {
                Some(seq) => json!({"t": p.t, "seq": seq, "v": v}),
                None => json!({"t": p.t, "v": v}),
            }
        })
        .collect();
    Ok(Json(json!({
        "device": name, "from_ms": from, "to_ms": to, "samples": series.samples,
        "downsampled": downsampled, "registers": registers, "points": points,
    }))
    .into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/latest",
    operation_id = "telemetry_latest",
    tag = "telemetry",
    summary = "Newest sample, online, last seen, when the next upload is due",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "{online, last_seen_ms, upload_interval_ms, next_upload_due_ms, sample}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn latest(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let device = state.devices.get(&name).await?;
    let online = device.last_seen_ms.is_some_and(|t| crate::now_ms() - t <= ONLINE_WITHIN_MS);
    // When data will next arrive: the interval the device reports running
    // (else the one it was asked for), from its newest batch's last sample
    // (it uploads within a poll of it). A device uploads its first sample as
    // soon as it starts.
    let shadow = state.configs.shadow(&name).await?;
    let upload_ms = shadow.reported.as_ref().unwrap_or(&shadow.desired).upload_interval_ms;
    let Some(batch) = state.telemetry.latest(&name).await? else {
        return Ok(Json(json!({
            "device": name, "online": online, "last_seen_ms": device.last_seen_ms,
            "upload_interval_ms": upload_ms, "next_upload_due_ms": null, "sample": null,
        })));
    };
    let next_upload_due_ms = batch.last_ms + upload_ms;
    let readings = decode_all(std::slice::from_ref(&batch)).map_err(corrupt)?;
    let r = readings.values().next_back().expect("a stored batch is never empty");
    let readings: Vec<Value> = (0..REGISTER_COUNT)
        .filter_map(|a| {
            r.values[a].map(|raw| {
                json!({"address": a, "name": REGISTERS[a].name, "description": REGISTERS[a].description, "raw": raw, "value": eng(a, Some(f64::from(raw))), "unit": REGISTERS[a].unit})
            })
        })
        .collect();
    Ok(Json(json!({
        "device": name, "online": online, "last_seen_ms": device.last_seen_ms,
        "upload_interval_ms": upload_ms, "next_upload_due_ms": next_upload_due_ms,
        "sample": {"seq": r.seq, "t": r.unix_ms, "readings": readings},
    })))
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
