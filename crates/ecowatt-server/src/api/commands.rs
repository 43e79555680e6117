//! `/api/v1/.../commands`: queue, list with filters and paging, show, cancel,
//! statistics, export as CSV or JSON lines.

use axum::Json;
use axum::extract::State;

use super::json::{Path, Query};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::json::ApiJson;
use super::{AppState, Operator};
use crate::commands::{self, Command, CommandFilter, CommandRequest, CommandStatus};
use crate::domain::Invalid;
use crate::error::ApiError;

/// A command to queue, as `POST /api/v1/devices/{name}/commands` takes it:
/// the seed's `{type, parameters}` and the options. [`queue_for`] reads the
/// same JSON (the legacy API queues through it too).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // the shape of the body `queue_for` reads
pub struct QueueCommand {
    /// `{"type": "set_power_percentage", "parameters": {"percentage": 50}}`, ...
    #[serde(flatten)]
    command: crate::commands::CommandRequest,
    /// Time-to-live, seconds (10..=604800; default 600).
    ttl_s: Option<i64>,
    /// Hold an export limit under a lease, seconds (60..=604800; docs/export-control.md).
    lease_s: Option<i64>,
    /// Reach an export limit at this rate, % of rated power per second (0.01..=100).
    ramp_pct_per_s: Option<f64>,
}

/// Queues `body` (`{"type", "parameters", "ttl_s"?, "lease_s"?}`, the seed's shape) for
/// `device`; the commands aggregate validates it.
pub async fn queue_for(
    state: &AppState,
    device: &str,
    mut body: Value,
    actor: &str,
) -> Result<Command, ApiError> {
    let ttl_s = match body.as_object_mut().and_then(|o| o.remove("ttl_s")) {
        None | Some(Value::Null) => commands::DEFAULT_TTL_S,
        Some(v) => super::control::seconds("ttl_s", &v)?,
    };
    let lease_ms = match body.as_object_mut().and_then(|o| o.remove("lease_s")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(super::control::seconds("lease_s", &v)?.saturating_mul(1000)),
    };
    let ramp_pct_per_s = match body.as_object_mut().and_then(|o| o.remove("ramp_pct_per_s")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64().ok_or_else(|| Invalid::new("ramp_pct_per_s", "a number of % per second"))?,
        ),
    };
    let request: CommandRequest = serde_json::from_value(body).map_err(|e| {
        ApiError::invalid(Invalid::new(
            "type",
            format!("{e}; types: set_power_percentage, set_power, write_register, read_register"),
        ))
    })?;
    let options =
        commands::store::QueueOptions { ttl_s, lease_ms, ramp_pct_per_s, ..Default::default() };
    Ok(state.commands.queue_with(device, &request, &options, actor, crate::now_ms()).await?)
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{name}/commands",
    operation_id = "commands_queue",
    tag = "commands",
    summary = "Queue a command {type, parameters, ttl_s?, lease_s?, ramp_pct_per_s? (export limits; see docs/export-control.md)}",
    params(("name" = String, Path, description = "Device name")),
    request_body = QueueCommand,
    responses((status = 201, description = "queued", body = crate::commands::Command), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn queue(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<Command>), ApiError> {
    op.require_admin()?;
    let command = queue_for(&state, &name, body, &op.actor()).await?;
    state.metrics.inc("ecowatt_commands_queued_total", "");
    Ok((StatusCode::CREATED, Json(command)))
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only this device's.
    device: Option<String>,
    /// Only in this status (queued, delivered, succeeded, failed, expired, cancelled, confirmed).
    status: Option<String>,
    /// Only of this type (set_power_percentage, set_power, write_register, read_register).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// Page: commands with an id below this (`next_before` of the previous page).
    before: Option<i64>,
    /// Only commands queued at or after this time, Unix ms.
    since_ms: Option<i64>,
    /// At most this many (1..=1000; default 100).
    limit: Option<i64>,
}

impl ListQuery {
    fn filter(&self, max: i64) -> Result<CommandFilter, ApiError> {
        let status = match &self.status {
            None => None,
            Some(s) => Some(CommandStatus::parse(s).ok_or_else(|| {
                Invalid::new(
                    "status",
                    "one of queued, delivered, succeeded, failed, expired, cancelled, confirmed",
                )
            })?),
        };
        let limit = self.limit.unwrap_or(100);
        if !(1..=max).contains(&limit) {
            return Err(Invalid::new("limit", format!("{limit} is outside 1..={max}")).into());
        }
        Ok(CommandFilter {
            device: self.device.clone(),
            status,
            kind: self.kind.clone(),
            before_id: self.before,
            since_ms: self.since_ms,
            limit,
        })
    }
}

/// A page of commands, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct CommandPage {
    /// The commands.
    commands: Vec<Command>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<i64>,
}

async fn page(state: &AppState, filter: CommandFilter) -> Result<Json<CommandPage>, ApiError> {
    let commands = state.commands.list(&filter).await?;
    let next_before =
        (commands.len() as i64 == filter.limit).then(|| commands.last().map(|c| c.id)).flatten();
    Ok(Json(CommandPage { commands, next_before }))
}

/// `GET /api/v1/commands/statistics`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Statistics {
    /// The device asked for, or null for all.
    device: Option<String>,
    /// The figures.
    statistics: commands::CommandStats,
}

#[utoipa::path(
    get,
    path = "/api/v1/commands",
    operation_id = "commands_list",
    tag = "commands",
    summary = "Commands (filters: device, status, type, before, since_ms, limit)",
    params(ListQuery),
    responses((status = 200, description = "a page of commands, newest first", body = CommandPage), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn list(
    State(state): State<AppState>,
    _op: Operator,
    Query(q): Query<ListQuery>,
) -> Result<Json<CommandPage>, ApiError> {
    page(&state, q.filter(1000)?).await
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/commands",
    operation_id = "commands_list_for_device",
    tag = "commands",
    summary = "A device's commands (filters: status, type, before, since_ms, limit)",
    params(("name" = String, Path, description = "Device name"), ListQuery),
    responses((status = 200, description = "a page of the device's commands, newest first", body = CommandPage), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn list_for_device(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<CommandPage>, ApiError> {
    state.devices.get(&name).await?;
    let mut filter = q.filter(1000)?;
    filter.device = Some(name);
    page(&state, filter).await
}

/// The longest `wait_ms` a request may ask for (as a device's long poll).
pub const MAX_WAIT_MS: u64 = 25_000;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ShowQuery {
    /// Wait up to this long (0..=25000 ms) for the command's status to differ
    /// from `changed_from` (default: its status now, if still open).
    wait_ms: Option<u64>,
    /// The status the caller last saw.
    changed_from: Option<String>,
}

/// One command; with `wait_ms`, a long poll that answers as soon as its
/// status changes from `changed_from` (a result, a delivery, a
/// confirmation): `ecowatt command --wait` follows the outcome as it happens.
#[utoipa::path(
    get,
    path = "/api/v1/commands/{id}",
    operation_id = "commands_show",
    tag = "commands",
    summary = "One command; with wait_ms, a long poll answered as soon as its status changes from changed_from",
    params(("id" = i64, Path, description = "Command id"), ShowQuery),
    responses((status = 200, description = "the command (after a wait: as soon as its status changed, or at the end of the wait)", body = crate::commands::Command), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    Path(id): Path<i64>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<Command>, ApiError> {
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(Invalid::new(
            "wait_ms",
            format!("{wait_ms} is over {MAX_WAIT_MS} (ask again to wait longer)"),
        )));
    }
    let from = match q.changed_from.as_deref() {
        None => None,
        Some(s) => Some(CommandStatus::parse(s).ok_or_else(|| {
            Invalid::new("changed_from", format!("{s:?} is not a command status"))
        })?),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    let mut from = from;
    loop {
        // Listening before reading: a change between the two is not missed.
        let changed = state.news.command_change();
        let command = state.commands.get(id).await?;
        // Without `changed_from`, the status at the first read is the one to leave.
        let first_read = from.is_none();
        let from = *from.get_or_insert(command.status);
        let settled = command.status != from
            || (first_read && q.changed_from.is_none() && !command.status.is_open());
        if wait_ms == 0 || settled || tokio::time::Instant::now() >= deadline {
            return Ok(Json(command));
        }
        // Another server process may record the change without telling this
        // one (expiries, confirmations): look again every second regardless.
        let recheck = deadline.min(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
        tokio::select! {
            () = changed => {}
            () = tokio::time::sleep_until(recheck) => {}
            () = state.news.stopping() => return Ok(Json(state.commands.get(id).await?)),
        }
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/commands/{id}/cancel",
    operation_id = "commands_cancel",
    tag = "commands",
    summary = "Cancel an open command",
    params(("id" = i64, Path, description = "Command id")),
    responses((status = 200, description = "cancelled", body = crate::commands::Command), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn cancel(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Command>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.commands.cancel(id, &op.actor(), crate::now_ms()).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct StatsQuery {
    device: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/commands/statistics",
    operation_id = "commands_statistics",
    tag = "commands",
    summary = "Command statistics (device optional)",
    params(StatsQuery),
    responses((status = 200, description = "totals by status and type, success rate, mean times", body = Statistics), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn statistics(
    State(state): State<AppState>,
    _op: Operator,
    Query(q): Query<StatsQuery>,
) -> Result<Json<Statistics>, ApiError> {
    if let Some(d) = &q.device {
        state.devices.get(d).await?;
    }
    let statistics = state.commands.stats(q.device.as_deref()).await?;
    Ok(Json(Statistics { device: q.device, statistics }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ExportQuery {
    /// `csv` (default) or `jsonl`.
    format: Option<String>,
    /// The list's filters (documented with the list).
    #[serde(flatten)]
    #[param(ignore)]
    list: ListQuery,
}

const CSV_COLUMNS: [&str; 15] = [
    "id",
    "device",
    "type",
    "parameters",
    "status",
    "created_ms",
    "created_by",
    "expires_ms",
    "delivered_ms",
    "delivery_count",
    "completed_ms",
    "executed_ms",
    "result_message",
    "exception_code",
    "result_value",
];

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

#[utoipa::path(
    get,
    path = "/api/v1/commands/export",
    operation_id = "commands_export",
    tag = "commands",
    summary = "Export commands: format=csv|jsonl, same filters",
    params(ExportQuery, ListQuery),
    responses((status = 200, description = "CSV (text/csv) or JSON lines (application/x-ndjson)", body = String), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn export(
    State(state): State<AppState>,
    _op: Operator,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let mut filter = q.list.filter(100_000)?;
    if q.list.limit.is_none() {
        filter.limit = 100_000;
    }
    let commands = state.commands.list(&filter).await?;
    match q.format.as_deref().unwrap_or("jsonl") {
        "jsonl" => {
            let mut body = String::new();
            for c in &commands {
                body.push_str(&serde_json::to_string(c).expect("command serialises"));
                body.push('\n');
            }
            Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
        }
        "csv" => {
            let mut body = CSV_COLUMNS.join(",");
            body.push('\n');
            for c in &commands {
                let row = [
                    c.id.to_string(),
                    c.device.clone(),
                    c.kind.clone(),
                    c.parameters.to_string(),
                    c.status.as_str().to_owned(),
                    c.created_ms.to_string(),
                    c.created_by.clone(),
                    c.expires_ms.to_string(),
                    opt(&c.delivered_ms),
                    c.delivery_count.to_string(),
                    opt(&c.completed_ms),
                    opt(&c.executed_ms),
                    opt(&c.result_message),
                    opt(&c.exception_code),
                    opt(&c.result_value),
                ];
                body.push_str(&row.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
                body.push('\n');
            }
            Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
        }
        other => Err(Invalid::new("format", format!("{other:?} is not csv or jsonl")).into()),
    }
}
