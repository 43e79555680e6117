//! `/api/openapi.json` and `/api/docs`: the API described, readable offline.

use axum::Json;
use axum::response::Html;
use serde_json::{Value, json};

/// (method, path, summary, admin only?)
const ENDPOINTS: &[(&str, &str, &str, bool)] = &[
    ("get", "/healthz", "Liveness: 200 when the store answers", false),
    ("get", "/metrics", "Prometheus metrics", false),
    ("get", "/api/v1/devices", "List devices", false),
    (
        "post",
        "/api/v1/devices",
        "Register a device {name, rated_power_w}; returns its key once, in `provisioning`",
        true,
    ),
    ("get", "/api/v1/devices/{name}", "A device and its config shadow", false),
    ("delete", "/api/v1/devices/{name}", "Remove a device with its config and commands", true),
    ("post", "/api/v1/devices/{name}/disable", "Disable a device", true),
    ("post", "/api/v1/devices/{name}/enable", "Enable a device", true),
    ("post", "/api/v1/devices/{name}/rotate-key", "Give a device a new key; returns it once", true),
    ("get", "/api/v1/devices/{name}/config", "Config shadow: desired and reported", false),
    (
        "patch",
        "/api/v1/devices/{name}/config",
        "Change the desired config {poll_interval_ms, upload_interval_ms, registers}",
        true,
    ),
    (
        "get",
        "/api/v1/devices/{name}/config/history",
        "Desired config versions, newest first",
        false,
    ),
    (
        "get",
        "/api/v1/devices/{name}/commands",
        "A device's commands (filters: status, type, before, since_ms, limit)",
        false,
    ),
    (
        "post",
        "/api/v1/devices/{name}/commands",
        "Queue a command {type, parameters, ttl_s?, lease_s?, ramp_pct_per_s? (export limits; see docs/export-control.md)}",
        true,
    ),
    (
        "get",
        "/api/v1/commands",
        "Commands (filters: device, status, type, before, since_ms, limit)",
        false,
    ),
    ("get", "/api/v1/commands/statistics", "Command statistics (device optional)", false),
    ("get", "/api/v1/commands/export", "Export commands: format=csv|jsonl, same filters", false),
    ("get", "/api/v1/commands/{id}", "One command", false),
    ("post", "/api/v1/commands/{id}/cancel", "Cancel an open command", true),
    ("get", "/api/v1/tokens", "List operator tokens", true),
    ("post", "/api/v1/tokens", "Create a token {name, role: admin|viewer}; returns it once", true),
    ("delete", "/api/v1/tokens/{id}", "Revoke a token", true),
    ("get", "/api/v1/audit", "Audit log, newest first (before, limit)", false),
    ("get", "/api/v1/security-events", "Device protocol refusals, newest first", false),
    (
        "get",
        "/api/v1/devices/{name}/telemetry",
        "Samples in engineering units (from_ms, to_ms, registers, max_points, format=csv)",
        false,
    ),
    ("get", "/api/v1/devices/{name}/latest", "Newest sample, online, last seen", false),
    ("get", "/api/v1/devices/{name}/completeness", "Gaps in seq and reported drops", false),
    ("get", "/api/v1/firmware", "Stored firmware images", false),
    (
        "post",
        "/api/v1/firmware",
        "Upload a signed image (body) with its manifest (hex JSON in the ecowatt-manifest header)",
        true,
    ),
    ("get", "/api/v1/firmware/{id}/image", "An image's bytes (Range supported)", false),
    (
        "put",
        "/api/v1/devices/{name}/failsafe",
        "Set the fail-safe export limit {failsafe: 0..100 | \"hold\" | null}",
        true,
    ),
    ("put", "/api/v1/devices/{name}/tags", "Replace a device's tags {tags: [..]}", true),
    (
        "put",
        "/api/v1/devices/{name}/ramp",
        "Default ramp of export limits {ramp_pct_per_s: 0.01..100 | null}",
        true,
    ),
    (
        "get",
        "/api/v1/devices/{name}/control",
        "Tags, fail-safe, the leased limit the device reports, its episodes",
        false,
    ),
    (
        "get",
        "/api/v1/devices/{name}/schedule",
        "The export-limit schedule: definition, version, active entry and next changes (site time), what the device reports",
        false,
    ),
    (
        "put",
        "/api/v1/devices/{name}/schedule",
        "Set the schedule {timezone, default_pct?, entries: [\"mon-fri 11:00-14:00 0%\" | {days, start, end, limit_pct}]}; refused: unknown_timezone, schedule_overlap, schedule_time_invalid, schedule_days_invalid, schedule_limit_invalid",
        true,
    ),
    (
        "delete",
        "/api/v1/devices/{name}/schedule",
        "Clear the schedule (a new version without entries)",
        true,
    ),
    (
        "post",
        "/api/v1/devices/{name}/schedule/resume",
        "Return to the schedule: a command that ends any command's limit or lease and writes the schedule's limit in force",
        true,
    ),
    (
        "put",
        "/api/v1/groups/{group}/schedule",
        "Set the schedule of every enabled device tagged group (group_empty when none)",
        true,
    ),
    ("delete", "/api/v1/groups/{group}/schedule", "Clear the schedule of a group", true),
    (
        "post",
        "/api/v1/curtailments",
        "Curtail a group {group, percent, lease_s?, ramp_pct_per_s?}; refused whole (group_empty, failsafe_not_configured)",
        true,
    ),
    ("get", "/api/v1/curtailments", "Curtailments, newest first, with progress", false),
    (
        "get",
        "/api/v1/curtailments/{id}",
        "A curtailment: confirmed, pending, offline, failed, time to confirm p50/p99, failures",
        false,
    ),
    (
        "post",
        "/api/v1/curtailments/{id}/release",
        "Release: its devices back to their schedule's limit, or 100 % without one",
        true,
    ),
    ("get", "/api/v1/rollouts", "Rollouts, newest first, with device counts per state", false),
    (
        "post",
        "/api/v1/rollouts",
        "Start a rollout {firmware_id | version [+target], devices | percent, waves?, failure_threshold_pct?}",
        true,
    ),
    (
        "get",
        "/api/v1/rollouts/{id}",
        "A rollout with each device's progress and running version",
        false,
    ),
    ("post", "/api/v1/rollouts/{id}/pause", "Pause a running rollout (offers withdrawn)", true),
    ("post", "/api/v1/rollouts/{id}/resume", "Resume a paused rollout", true),
    (
        "post",
        "/api/v1/rollouts/{id}/abort",
        "Abort a rollout (devices not installing are cancelled)",
        true,
    ),
    (
        "get",
        "/api/v1/device/firmware/{token}",
        "Device: the image an update offer names (Range supported); see docs/firmware.md",
        false,
    ),
    (
        "post",
        "/api/v1/device/sync",
        "Device protocol: sealed sync (long poll); see docs/protocol.md",
        false,
    ),
    (
        "post",
        "/api/v1/device/telemetry",
        "Device protocol: sealed telemetry upload; see docs/protocol.md",
        false,
    ),
];

/// The OpenAPI 3.1 document.
pub async fn openapi() -> Json<Value> {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let mut paths = serde_json::Map::new();
    for (method, path, summary, admin) in ENDPOINTS {
        let mut responses = json!({
            "200": {"description": "success"},
            "400": {"description": "invalid input; `field` names it", "content": {"application/json": {"schema": error}}},
            "404": {"description": "not found", "content": {"application/json": {"schema": error}}},
        });
        // Operator endpoints take a bearer token; device endpoints are sealed envelopes instead.
        let operator = path.starts_with("/api/v1") && !path.starts_with("/api/v1/device/");
        if operator {
            responses["401"] = json!({"description": "missing or bad token", "content": {"application/json": {"schema": error}}});
        }
        if *admin {
            responses["403"] = json!({"description": "needs an admin token", "content": {"application/json": {"schema": error}}});
        }
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({"summary": summary, "parameters": params, "responses": responses});
        if operator {
            op["security"] = json!([{"bearer": []}]);
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[*method] = op;
    }
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "EcoWatt server API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "field": {"type": "string"}
                    }
                }}
            }}
        }
    }))
}

/// A self-contained HTML page listing every endpoint (no CDN, no script).
pub async fn page() -> Html<String> {
    let mut rows = String::new();
    for (method, path, summary, admin) in ENDPOINTS {
        rows.push_str(&format!(
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>\n",
            method.to_uppercase(),
            path,
            summary.replace('<', "&lt;"),
            if *admin {
                "admin"
            } else if path.ends_with("{token}") {
                "download token in the path"
            } else if path.starts_with("/api/v1/device/") {
                "sealed envelope"
            } else if !path.starts_with("/api/v1/") {
                "nothing (no token)"
            } else {
                "any token"
            }
        ));
    }
    Html(format!(
        "<!doctype html><html lang=en><meta charset=utf-8><title>EcoWatt API</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4rem;text-align:left}}</style>\
         <h1>EcoWatt server API</h1><p>Send <code>Authorization: Bearer &lt;token&gt;</code> to every \
         operator endpoint under <code>/api/v1</code> (<code>/healthz</code> and <code>/metrics</code> need none; \
         device endpoints are sealed envelopes). Errors are <code>{{\"error\": {{\"code\", \"message\", \"field\"}}}}</code>. \
         Machine-readable: <a href=\"/api/openapi.json\">/api/openapi.json</a>.</p>\
         <table><tr><th>method</th><th>path</th><th>what</th><th>needs</th></tr>{rows}</table></html>"
    ))
}

/// The web dashboard: one self-contained page (no CDN), talking to `/api/v1`
/// with the operator's token.
pub async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// The dashboard's icon (a sun over a panel), for `/favicon.svg` and the
/// `/favicon.ico` browsers ask for on their own: a page load logs no error.
pub async fn favicon() -> impl axum::response::IntoResponse {
    const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\">\
<circle cx=\"16\" cy=\"12\" r=\"6\" fill=\"#f5c211\"/>\
<path d=\"M4 30 L9 20 H23 L28 30 Z\" fill=\"#1a5fb4\"/>\
<path d=\"M11 20 L9 30 M21 20 L23 30 M6.5 25 H25.5\" stroke=\"#fff\" stroke-width=\"1.2\"/></svg>";
    (
        [
            (axum::http::header::CONTENT_TYPE, "image/svg+xml"),
            (axum::http::header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        ICON,
    )
}
