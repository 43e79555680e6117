//! `GET /api/v1/devices/{name}/export`: a device's raw samples or rollups
//! over a range as CSV or Parquet, every row (no averaging), as a download.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::json::{Path, Query};
use super::{AppState, Operator};
use crate::domain::Invalid;
use crate::error::ApiError;
use crate::telemetry::energy::width_of;
use crate::telemetry::export::{Table, rollups, samples};
use crate::telemetry::read::{decode_all, registers, time_bound};
use crate::telemetry::rollup::Level;

/// The widest range of raw samples one export holds (a week: 604,800
/// samples at a 1 s poll); longer ranges are several exports, or rollups.
pub const MAX_RAW_EXPORT_MS: i64 = 7 * 86_400_000;

/// Most rollup buckets one export holds (a year of 5-minute buckets).
pub const MAX_EXPORT_BUCKETS: i64 = 106_000;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ExportQuery {
    /// `samples` (default: every raw sample) or `rollups`.
    data: Option<String>,
    /// `csv` (default) or `parquet`.
    format: Option<String>,
    /// Start, Unix ms (default: a day before `to_ms`).
    from_ms: Option<i64>,
    /// End, Unix ms, included (default: now).
    to_ms: Option<i64>,
    /// Registers by name or address, e.g. `Pac,Vac1` (default: all).
    registers: Option<String>,
    /// Rollups: `5m`, `1h` (default) or `1d`.
    level: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/export",
    operation_id = "telemetry_export",
    tag = "telemetry",
    summary = "Raw samples (at most 7 days) or rollups over a range as CSV or Parquet: data=samples|rollups, format=csv|parquet, from_ms, to_ms, registers, level",
    params(("name" = String, Path, description = "Device name"), ExportQuery),
    responses((status = 200, description = "text/csv or application/vnd.apache.parquet, as an attachment: time (UTC), then per row seq and registers in units (samples) or energy_wh, covered_ms, samples, missing and each register's mean, min, max (rollups)"), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn export(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let parquet = match q.format.as_deref() {
        None | Some("csv") => false,
        Some("parquet") => true,
        Some(f) => {
            return Err(Invalid::new("format", format!("{f:?} is not csv or parquet")).into());
        }
    };
    let raw = match q.data.as_deref() {
        None | Some("samples") => true,
        Some("rollups") => false,
        Some(d) => {
            return Err(Invalid::new("data", format!("{d:?} is not samples or rollups")).into());
        }
    };
    let (id, _, _) = state.telemetry.zone_of(&name).await?;
    let to = time_bound("to_ms", q.to_ms)?.unwrap_or_else(crate::now_ms);
    let from = time_bound("from_ms", q.from_ms)?.unwrap_or((to - 86_400_000).max(0));
    if from > to {
        return Err(Invalid::new("from_ms", "must not be after to_ms").into());
    }
    let wanted = registers(q.registers.as_deref())?;
    let (table, what): (Table, String) = if raw {
        if q.level.is_some() {
            return Err(Invalid::new("level", "only for data=rollups").into());
        }
        if to - from > MAX_RAW_EXPORT_MS {
            let message = format!(
                "{} days of raw samples is more than 7: export them in parts, or export rollups",
                (to - from) as f64 / 86_400_000.0
            );
            return Err(Invalid::new("to_ms", message).into());
        }
        let readings = decode_all(&state.telemetry.range(&name, from, to).await?)
            .map_err(super::telemetry::corrupt)?;
        let mut rows: Vec<_> =
            readings.values().filter(|r| (from..=to).contains(&(r.unix_ms as i64))).collect();
        rows.sort_by_key(|r| (r.unix_ms, r.seq));
        (samples(&rows, &wanted), "samples".into())
    } else {
        let level = match q.level.as_deref() {
            None => Level::Hour,
            Some(l) => Level::parse("level", l)?,
        };
        let buckets = (to - from) / width_of(level);
        if buckets > MAX_EXPORT_BUCKETS {
            let message = format!(
                "{buckets} {} buckets is more than {MAX_EXPORT_BUCKETS}: a shorter range or a coarser level",
                level.name()
            );
            return Err(Invalid::new("to_ms", message).into());
        }
        let rows = state.telemetry.rollups(id, level, from, to + 1, &wanted).await?;
        (rollups(&rows, &wanted), format!("rollups-{}", level.name()))
    };
    let file = format!("{name}-{what}-{from}-{to}");
    let disposition =
        |ext: &str| format!("attachment; filename=\"{}.{ext}\"", file.replace('"', ""));
    if parquet {
        let bytes = table.parquet().map_err(|e| {
            tracing::error!(error = %e, "writing Parquet failed");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "export_failed",
                "writing Parquet failed",
            )
        })?;
        let headers = [
            (header::CONTENT_TYPE, "application/vnd.apache.parquet".to_owned()),
            (header::CONTENT_DISPOSITION, disposition("parquet")),
        ];
        Ok((headers, bytes).into_response())
    } else {
        let headers = [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition("csv")),
        ];
        Ok((headers, table.csv()).into_response())
    }
}
