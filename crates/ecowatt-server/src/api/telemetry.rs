//! `/api/v1/devices/{name}/telemetry|latest|completeness`: stored batches,
//! decoded on read, in engineering units.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;

use super::json::{Path, Query};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ecowatt_proto::codec;
use ecowatt_proto::registers::{REGISTER_COUNT, REGISTERS};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Operator};
use crate::domain::Invalid;
use crate::error::ApiError;
use crate::store::StoredBatch;

/// A device counts as online when it talked to the server this recently.
pub const ONLINE_WITHIN_MS: i64 = 90_000;

/// One decoded sample: `seq`, time, and a value per register (if sampled).
type Row = (u64, u64, [Option<u16>; REGISTER_COUNT]);

fn decode_all(batches: &[StoredBatch]) -> Result<BTreeMap<u64, Row>, ApiError> {
    let mut rows = BTreeMap::new();
    for b in batches {
        let batch = codec::decode(&b.data).map_err(|e| {
            tracing::error!(error = %e, first_seq = b.first_seq, "a stored batch does not decode");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt_telemetry",
                "a stored batch does not decode",
            )
        })?;
        let addresses: Vec<usize> =
            (0..REGISTER_COUNT).filter(|r| batch.registers & (1 << r) != 0).collect();
        for s in batch.samples {
            let mut values = [None; REGISTER_COUNT];
            for (a, v) in addresses.iter().zip(&s.values) {
                values[*a] = Some(*v);
            }
            // Overlapping batches (a batch resent after a reboot) hold the same samples.
            rows.insert(s.seq, (s.seq, s.unix_ms, values));
        }
    }
    Ok(rows)
}

/// The latest time a query may name: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// A time bound of a query, refused outside 0..=[`MAX_TIME_MS`] (so that no
/// arithmetic on it can overflow and every answer is about real dates).
fn time_param(field: &str, value: Option<i64>) -> Result<Option<i64>, ApiError> {
    match value {
        Some(v) if !(0..=MAX_TIME_MS).contains(&v) => Err(Invalid::new(
            field,
            format!("{v} is outside 0..={MAX_TIME_MS} (Unix ms, up to the year 9999)"),
        )
        .into()),
        v => Ok(v),
    }
}

#[derive(Deserialize)]
pub struct RangeQuery {
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    registers: Option<String>,
    max_points: Option<usize>,
    format: Option<String>,
}

fn registers(q: &Option<String>) -> Result<Vec<usize>, ApiError> {
    match q {
        None => Ok((0..REGISTER_COUNT).collect()),
        Some(list) => list
            .split(',')
            .map(|r| {
                let r = r.trim();
                r.parse::<usize>()
                    .ok()
                    .filter(|a| *a < REGISTER_COUNT)
                    .or_else(|| REGISTERS.iter().position(|reg| reg.name.eq_ignore_ascii_case(r)))
                    .ok_or_else(|| {
                        Invalid::new(
                            "registers",
                            format!("{r:?} is not a register (0..=9 or a name like Pac)"),
                        )
                        .into()
                    })
            })
            .collect(),
    }
}

fn eng(address: usize, raw: Option<f64>) -> Value {
    raw.map_or(Value::Null, |v| {
        json!((v / f64::from(REGISTERS[address].gain) * 1000.0).round() / 1000.0)
    })
}

pub async fn query(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Response, ApiError> {
    state.devices.get(&name).await?;
    let now = crate::now_ms();
    let to = time_param("to_ms", q.to_ms)?.unwrap_or(now);
    let from = time_param("from_ms", q.from_ms)?.unwrap_or((to - 86_400_000).max(0));
    if from > to {
        return Err(Invalid::new("from_ms", "must not be after to_ms").into());
    }
    let max_points = q.max_points.unwrap_or(1_000);
    if !(1..=10_000).contains(&max_points) {
        return Err(Invalid::new("max_points", format!("{max_points} is outside 1..=10000")).into());
    }
    let wanted = registers(&q.registers)?;
    let rows = decode_all(&state.store.telemetry(&name, from, to).await?)?;
    let rows: Vec<&Row> =
        rows.values().filter(|(_, t, _)| (from..=to).contains(&(*t as i64))).collect();

    // Downsample into equal time buckets, averaging, when there are too many samples.
    let downsampled = rows.len() > max_points;
    let mut points: Vec<(i64, Option<u64>, Vec<Option<f64>>)> = Vec::new();
    if downsampled {
        let width = ((to - from) / max_points as i64).max(1);
        let mut buckets: BTreeMap<i64, (i64, Vec<(f64, u32)>)> = BTreeMap::new();
        for (_, t, values) in &rows {
            let k = (*t as i64 - from) / width;
            let entry = buckets.entry(k).or_insert_with(|| (0, vec![(0.0, 0); wanted.len()]));
            entry.0 = entry.0.max(*t as i64);
            for (slot, a) in wanted.iter().enumerate() {
                if let Some(v) = values[*a] {
                    entry.1[slot].0 += f64::from(v);
                    entry.1[slot].1 += 1;
                }
            }
        }
        for (k, (_, sums)) in buckets {
            let t = from + k * width + width / 2;
            points.push((
                t,
                None,
                sums.iter().map(|(s, n)| (*n > 0).then(|| s / f64::from(*n))).collect(),
            ));
        }
    } else {
        for (seq, t, values) in &rows {
            points.push((
                *t as i64,
                Some(*seq),
                wanted.iter().map(|a| values[*a].map(f64::from)).collect(),
            ));
        }
    }

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
        for (t, seq, values) in &points {
            if let Some(seq) = seq {
                out.push_str(&format!("{seq},"));
            }
            out.push_str(&t.to_string());
            for (slot, a) in wanted.iter().enumerate() {
                out.push(',');
                if let Value::Number(n) = eng(*a, values[slot]) {
                    out.push_str(&n.to_string());
                }
            }
            out.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response());
    }
    let registers: Vec<Value> = wanted
        .iter()
        .map(|a| json!({"address": a, "name": REGISTERS[*a].name, "unit": REGISTERS[*a].unit}))
        .collect();
    let points: Vec<Value> = points
        .iter()
        .map(|(t, seq, values)| {
            let v: Vec<Value> =
                wanted.iter().enumerate().map(|(slot, a)| eng(*a, values[slot])).collect();
            match seq {
                Some(seq) => json!({"t": t, "seq": seq, "v": v}),
                None => json!({"t": t, "v": v}),
            }
        })
        .collect();
    Ok(Json(json!({
        "device": name, "from_ms": from, "to_ms": to, "samples": rows.len(),
        "downsampled": downsampled, "registers": registers, "points": points,
    }))
    .into_response())
}

pub async fn latest(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let device = state.devices.get(&name).await?;
    let online = device.last_seen_ms.is_some_and(|t| crate::now_ms() - t <= ONLINE_WITHIN_MS);
    let Some(batch) = state.store.telemetry_latest(&name).await? else {
        return Ok(Json(
            json!({"device": name, "online": online, "last_seen_ms": device.last_seen_ms, "sample": null}),
        ));
    };
    let rows = decode_all(std::slice::from_ref(&batch))?;
    let (seq, t, values) = rows.values().next_back().expect("a stored batch is never empty");
    let readings: Vec<Value> = (0..REGISTER_COUNT)
        .filter_map(|a| {
            values[a].map(|raw| {
                json!({"address": a, "name": REGISTERS[a].name, "raw": raw, "value": eng(a, Some(f64::from(raw))), "unit": REGISTERS[a].unit})
            })
        })
        .collect();
    Ok(Json(json!({
        "device": name, "online": online, "last_seen_ms": device.last_seen_ms,
        "sample": {"seq": seq, "t": t, "readings": readings},
    })))
}

#[derive(Deserialize)]
pub struct CompletenessQuery {
    from_ms: Option<i64>,
    to_ms: Option<i64>,
}

pub async fn completeness(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<CompletenessQuery>,
) -> Result<Json<Value>, ApiError> {
    state.devices.get(&name).await?;
    let from = time_param("from_ms", q.from_ms)?.unwrap_or(0);
    let to = time_param("to_ms", q.to_ms)?.unwrap_or(MAX_TIME_MS);
    let batches = state.store.telemetry(&name, from, to).await?;
    let stored: i64 = batches.iter().map(|b| b.count).sum();
    let rows = decode_all(&batches)?;
    let seqs: Vec<u64> = rows.keys().copied().collect();
    let mut gaps = Vec::new();
    let mut missing = 0u64;
    for w in seqs.windows(2) {
        if w[1] > w[0] + 1 {
            missing += w[1] - w[0] - 1;
            if gaps.len() < 100 {
                gaps.push(json!([w[0] + 1, w[1] - 1]));
            }
        }
    }
    Ok(Json(json!({
        "device": name,
        "first_seq": seqs.first(),
        "last_seq": seqs.last(),
        "received": seqs.len(),
        // Samples stored more than once (overlapping batches); 0 since ingest
        // stores only the samples a resent batch adds.
        "duplicates": stored - seqs.len() as i64,
        "missing": missing,
        "gaps": gaps,
        "dropped_reported": state.store.dropped_total(&name).await?,
    })))
}
