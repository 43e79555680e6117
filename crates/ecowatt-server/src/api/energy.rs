//! Energy from the rollups: `/api/v1/devices/{name}/energy` (per local day,
//! month or year), `/api/v1/devices/{name}/rollups` (a register's series at
//! the level that fits), `PUT /api/v1/devices/{name}/timezone`, and
//! `/api/v1/fleet/energy` (the fleet now and today, by group, and who
//! produces below their peers) in one request.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::{ApiJson, Path, Query};
use super::{AppState, Operator};
use crate::domain::Invalid;
use crate::error::ApiError;
use crate::telemetry::energy::{Period, by_period, level_for, step_for, underperforming, width_of};
use crate::telemetry::read::{MAX_POINTS, ONLINE_WITHIN_MS, engineering, registers, time_bound};
use crate::telemetry::rollup::Level;

/// Most local days one energy request spans.
pub const MAX_DAYS: i64 = 3_700;

/// Most rollup buckets one `/rollups` request reads (then merged into its points).
pub const MAX_BUCKETS: i64 = 120_000;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct EnergyQuery {
    /// `day` (default), `month` or `year`.
    period: Option<String>,
    /// First local date, `YYYY-MM-DD` (default: the start of this month, year, or ten years ago).
    from: Option<String>,
    /// Last local date, included (default: today).
    to: Option<String>,
}

fn date(field: &'static str, v: &str) -> Result<jiff::civil::Date, Invalid> {
    v.parse().map_err(|_| Invalid::new(field, format!("{v:?} is not a date (YYYY-MM-DD)")))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/energy",
    operation_id = "energy_device",
    tag = "telemetry",
    summary = "Energy per local day, month or year (period, from, to: local dates)",
    params(("name" = String, Path, description = "Device name"), EnergyQuery),
    responses((status = 200, description = "{device, timezone, period, from, to, total_kwh, periods: [{period, energy_kwh, samples, missing}]}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn device_energy(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<EnergyQuery>,
) -> Result<Json<Value>, ApiError> {
    let period = match q.period.as_deref() {
        None => Period::Day,
        Some(p) => Period::parse(p)
            .ok_or_else(|| Invalid::new("period", format!("{p:?} is not day, month or year")))?,
    };
    let (id, tz, zone) = state.telemetry.zone_of(&name).await?;
    let today = jiff::Timestamp::from_millisecond(crate::now_ms())
        .map_err(|_| Invalid::new("to", "the server's clock is out of range"))?
        .to_zoned_datetime(tz.clone())
        .date();
    let to = q.to.as_deref().map(|v| date("to", v)).transpose()?.unwrap_or(today);
    let from = match q.from.as_deref() {
        Some(v) => date("from", v)?,
        None => match period {
            Period::Day => to.first_of_month(),
            Period::Month => to.first_of_year(),
            Period::Year => to.first_of_year().saturating_sub(jiff::Span::new().years(9)),
        },
    };
    if from > to {
        return Err(Invalid::new("from", "must not be after to").into());
    }
    let days = (to - from).get_days() as i64 + 1;
    if days > MAX_DAYS {
        return Err(Invalid::new("to", format!("{days} days is more than {MAX_DAYS}")).into());
    }
    let start = |d: jiff::civil::Date| {
        d.to_zoned_datetime(tz.clone()).map(|z| z.timestamp().as_millisecond()).unwrap_or(0)
    };
    let end = to.tomorrow().map(start).unwrap_or(i64::MAX);
    let rows = state.telemetry.rollups(id, Level::Day, start(from), end, &[]).await?;
    let periods = by_period(&rows, &tz, period);
    let total: f64 = periods.iter().map(|p| p.energy_kwh).sum();
    Ok(Json(json!({
        "device": name,
        "timezone": zone,
        "period": match period { Period::Day => "day", Period::Month => "month", Period::Year => "year" },
        "from": from.to_string(),
        "to": to.to_string(),
        "total_kwh": total,
        "periods": periods,
    })))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct RollupQuery {
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    /// Registers by name or address, e.g. `Pac,Vac1` (default: all).
    registers: Option<String>,
    /// At most this many points (default 1,000): picks the finest level
    /// that fits with at most 8 buckets merged into a point.
    max_points: Option<usize>,
    /// `5m`, `1h` or `1d` instead of the level that fits (its buckets are
    /// still merged to fit `max_points`).
    level: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/rollups",
    operation_id = "energy_rollups",
    tag = "telemetry",
    summary = "A long range from the rollups: per point energy and each register's mean, min, max (the finest level that fits max_points, buckets merged into points of step_ms)",
    params(("name" = String, Path, description = "Device name"), RollupQuery),
    responses((status = 200, description = "{device, level, step_ms, registers, points: [{t, energy_wh, samples, missing, mean, min, max}]}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn device_rollups(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<RollupQuery>,
) -> Result<Json<Value>, ApiError> {
    let (id, _, _) = state.telemetry.zone_of(&name).await?;
    let now = crate::now_ms();
    let to = time_bound("to_ms", q.to_ms)?.unwrap_or(now);
    let from = time_bound("from_ms", q.from_ms)?.unwrap_or((to - 365 * 86_400_000).max(0));
    if from > to {
        return Err(Invalid::new("from_ms", "must not be after to_ms").into());
    }
    let max_points = q.max_points.unwrap_or(1_000);
    if !(1..=MAX_POINTS).contains(&max_points) {
        let message = format!("{max_points} is outside 1..={MAX_POINTS}");
        return Err(Invalid::new("max_points", message).into());
    }
    let min5_since = state.settings.rollup_5m_retention.map(|keep| now - keep.as_millis() as i64);
    let level = match q.level.as_deref() {
        None => level_for(from, to, max_points, min5_since),
        Some(l) => Level::parse("level", l)?,
    };
    let wanted = registers(q.registers.as_deref())?;
    // Buckets that start before `from` but reach into it count too (a local
    // day lasts up to 25 hours).
    let reach = if level == Level::Day { 25 * 3_600_000 } else { width_of(level) };
    if (to - from) / width_of(level) > MAX_BUCKETS {
        let message =
            format!("more than {MAX_BUCKETS} {} buckets: ask for a coarser level", level.name());
        return Err(Invalid::new("level", message).into());
    }
    let step = step_for(level, from, to, max_points);
    let rows =
        state.telemetry.rollup_points(id, level, (from, to + 1, reach), step, &wanted).await?;
    let points: Vec<Value> = rows
        .iter()
        .map(|r| {
            let stat = |f: &dyn Fn(&crate::telemetry::rollup::RegStat) -> f64| -> Vec<Value> {
                wanted
                    .iter()
                    .map(|&a| {
                        let s = &r.regs[a];
                        if s.n == 0 { Value::Null } else { json!(engineering(a, f(s))) }
                    })
                    .collect()
            };
            json!({
                "t": r.bucket_ms,
                "energy_wh": r.energy_wh,
                "samples": r.samples,
                "missing": r.missing,
                "mean": stat(&|s| s.sum as f64 / s.n as f64),
                "min": stat(&|s| s.min as f64),
                "max": stat(&|s| s.max as f64),
            })
        })
        .collect();
    let regs: Vec<Value> = wanted
        .iter()
        .map(|&a| {
            let r = &ecowatt_proto::registers::REGISTERS[a];
            json!({"address": a, "name": r.name, "unit": r.unit})
        })
        .collect();
    Ok(Json(json!({
        "device": name,
        "level": level.name(),
        "step_ms": step,
        "from_ms": from,
        "to_ms": to,
        "registers": regs,
        "points": points,
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimezoneBody {
    /// IANA name, e.g. `Europe/Berlin`.
    timezone: String,
}

#[utoipa::path(
    put,
    path = "/api/v1/devices/{name}/timezone",
    operation_id = "devices_timezone",
    tag = "devices",
    summary = "Set the site's time zone {timezone}: where its energy days begin",
    params(("name" = String, Path, description = "Device name")),
    request_body = TimezoneBody,
    responses((status = 200, description = "{device, timezone}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn set_timezone(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<TimezoneBody>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    state.devices.set_timezone(&name, &body.timezone, &op.actor(), crate::now_ms()).await?;
    Ok(Json(json!({"device": name, "timezone": body.timezone})))
}

#[utoipa::path(
    get,
    path = "/api/v1/fleet/energy",
    operation_id = "energy_fleet",
    tag = "telemetry",
    summary = "The fleet now and today in one request: power now, energy today (each site's local day), per group, and devices below their peers",
    responses((status = 200, description = "{power_now_w, energy_today_kwh, devices, online, groups, underperforming: {rule, median_kwh_per_kw, devices}, per_device}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn fleet_energy(
    State(state): State<AppState>,
    _op: Operator,
) -> Result<Json<Value>, ApiError> {
    let now = crate::now_ms();
    let fleet = state.telemetry.fleet(now).await?;
    let mut groups: std::collections::BTreeMap<&str, (i64, f64, usize)> = Default::default();
    let (mut power, mut energy, mut online) = (0i64, 0.0f64, 0usize);
    let mut per_device = Vec::with_capacity(fleet.len());
    for d in &fleet {
        let p = d.power_now(now);
        power += p.unwrap_or(0);
        energy += d.today_wh;
        online += usize::from(p.is_some());
        for t in &d.tags {
            let g = groups.entry(t.as_str()).or_default();
            g.0 += p.unwrap_or(0);
            g.1 += d.today_wh;
            g.2 += 1;
        }
        per_device.push(json!({
            "device": d.name,
            "power_w": p,
            "energy_today_kwh": d.today_wh / 1000.0,
            "rated_power_w": d.rated_w,
        }));
    }
    let (median, below) = underperforming(&fleet);
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(tag, (p, e, n))| json!({"tag": tag, "devices": n, "power_now_w": p, "energy_today_kwh": e / 1000.0}))
        .collect();
    Ok(Json(json!({
        "at_ms": now,
        "devices": fleet.len(),
        "online": online,
        "power_now_w": power,
        "energy_today_kwh": energy / 1000.0,
        "groups": groups,
        "underperforming": {
            "rule": "energy today per kW rated under half the median of the devices that reported today (at least 3)",
            "median_kwh_per_kw": median.map(|m| m / 1000.0),
            "devices": below.iter().map(|(d, y)| json!({"device": d.name, "kwh_per_kw": y / 1000.0})).collect::<Vec<_>>(),
        },
        "per_device": per_device,
    })))
}

#[utoipa::path(
    get,
    path = "/api/v1/fleet",
    operation_id = "fleet_overview",
    tag = "devices",
    summary = "The dashboard's fleet page in one request: every device's state, power now, energy today, config versions, firmware and alarms, with the totals",
    responses((status = 200, description = "{at_ms, devices: n, online, power_now_w, energy_today_kwh, rows: [{name, enabled, online, last_seen_ms, firmware, power_w, energy_today_kwh, desired_version, reported_version, missing_today, dropped, failed_commands}]}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn fleet_overview(
    State(state): State<AppState>,
    _op: Operator,
) -> Result<Json<Value>, ApiError> {
    let now = crate::now_ms();
    let (devices, energy, versions, failed) = tokio::try_join!(
        state.devices.list(),
        state.telemetry.fleet(now),
        state.configs.versions(),
        state.commands.failed_by_device(),
    )?;
    let dropped = state.telemetry.dropped_by_device().await?;
    let by_id: std::collections::HashMap<i64, &crate::telemetry::energy::FleetDevice> =
        energy.iter().map(|d| (d.id, d)).collect();
    let (mut power, mut today, mut online) = (0i64, 0.0f64, 0usize);
    let rows: Vec<Value> = devices
        .iter()
        .map(|d| {
            let e = by_id.get(&d.id.0);
            let is_online =
                d.enabled && d.last_seen_ms.is_some_and(|s| now - s <= ONLINE_WITHIN_MS);
            let p = e.and_then(|e| e.power_now(now));
            let wh = e.map_or(0.0, |e| e.today_wh);
            power += p.unwrap_or(0);
            today += wh;
            online += usize::from(is_online);
            let (desired, reported) = versions.get(&d.id.0).copied().unwrap_or((0, None));
            json!({
                "name": d.name,
                "enabled": d.enabled,
                "online": is_online,
                "last_seen_ms": d.last_seen_ms,
                "firmware": d.firmware,
                "power_w": p,
                "energy_today_kwh": wh / 1000.0,
                "desired_version": desired,
                "reported_version": reported,
                "missing_today": e.map_or(0, |e| e.today_missing),
                "dropped": dropped.get(&d.id.0).copied().unwrap_or(0),
                "failed_commands": failed.get(&d.id.0).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(Json(json!({
        "at_ms": now,
        "devices": rows.len(),
        "online": online,
        "power_now_w": power,
        "energy_today_kwh": today / 1000.0,
        "rows": rows,
    })))
}
