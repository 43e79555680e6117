//! `/api/v1/devices`: register, list, show, disable, enable, rotate key, remove.

use axum::Json;
use axum::extract::State;

use super::json::Path;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::ApiJson;
use super::{AppState, Operator};
use crate::devices::Device;
use crate::error::ApiError;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    name: String,
    rated_power_w: Option<i64>,
    /// Tags (groups for curtailment).
    #[serde(default)]
    tags: Vec<String>,
    /// The fail-safe export limit (`docs/export-control.md`).
    #[serde(default)]
    failsafe: Value,
    /// The site's IANA time zone (its energy days), default UTC.
    timezone: Option<String>,
}

/// The seed assumed a 10 kW inverter.
const DEFAULT_RATED_W: i64 = 10_000;

/// What a device agent needs to start: shown once, when the key is made.
fn provisioning(state: &AppState, device: &Device, key: &str) -> Value {
    json!({
        "format": "ecowatt-provisioning/1",
        "device": device.name,
        "device_id": device.id,
        "key": key,
        "key_version": device.key_version,
        "server": state.settings.public_url,
        // The keys the device trusts for firmware manifests (its factory keys).
        "firmware_keys": state
            .settings
            .firmware_keys
            .iter()
            .map(|k| ecowatt_proto::hex::encode_upper(k.as_bytes()))
            .collect::<Vec<_>>(),
    })
}

#[utoipa::path(
    post,
    path = "/api/v1/devices",
    operation_id = "devices_add",
    tag = "devices",
    summary = "Register a device {name, rated_power_w}; returns its key once, in `provisioning`",
    request_body = NewDevice,
    responses((status = 201, description = "{device, provisioning}: the key, shown only now", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn add(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    op.require_admin()?;
    // Checked before anything is made.
    for t in &req.tags {
        crate::control::check_tag(t)?;
    }
    let failsafe = crate::control::FailSafe::parse(&req.failsafe)?;
    if let Some(tz) = &req.timezone {
        crate::devices::check_timezone(tz)?;
    }
    let key = crate::random_hex(16);
    let rated = req.rated_power_w.unwrap_or(DEFAULT_RATED_W);
    let device = crate::registration::register(
        &state.devices,
        &req.name,
        rated,
        &key,
        &op.actor(),
        crate::now_ms(),
    )
    .await?;
    let now = crate::now_ms();
    if !req.tags.is_empty() {
        state.control.set_tags(&device.name, &req.tags, &op.actor(), now).await?;
    }
    if failsafe.is_some() {
        state.control.set_failsafe(&device.name, failsafe, &op.actor(), now).await?;
    }
    if let Some(tz) = &req.timezone {
        state.devices.set_timezone(&device.name, tz, &op.actor(), now).await?;
    }
    let provisioning = provisioning(&state, &device, &key);
    Ok((StatusCode::CREATED, Json(json!({ "device": device, "provisioning": provisioning }))))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices",
    operation_id = "devices_list",
    tag = "devices",
    summary = "List devices (online, firmware, last seen)",
    responses((status = 200, description = "every device, with whether it is online", body = DeviceList), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn list(
    State(state): State<AppState>,
    _op: Operator,
) -> Result<Json<DeviceList>, ApiError> {
    let now = crate::now_ms();
    let devices = state
        .devices
        .list()
        .await?
        .into_iter()
        .map(|device| {
            let online = device
                .last_seen_ms
                .is_some_and(|t| now - t <= crate::telemetry::read::ONLINE_WITHIN_MS);
            ListedDevice { device, online }
        })
        .collect();
    Ok(Json(DeviceList { devices }))
}

/// `GET /api/v1/devices`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DeviceList {
    /// The devices, by name.
    pub devices: Vec<ListedDevice>,
}

/// A device as listed: its record and whether it is online (talked to the
/// server in the last 90 s).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ListedDevice {
    #[serde(flatten)]
    device: Device,
    /// Talked to the server in the last 90 s.
    online: bool,
}

/// `GET /api/v1/devices/{name}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DeviceDetail {
    /// The device.
    device: Device,
    /// Its config shadow.
    config: crate::config::ConfigShadow,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}",
    operation_id = "devices_show",
    tag = "devices",
    summary = "A device and its config shadow",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the device and its config shadow", body = DeviceDetail), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let device = state.devices.get(&name).await?;
    let config = state.configs.shadow(&name).await?;
    Ok(Json(DeviceDetail { device, config }))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{name}/disable",
    operation_id = "devices_disable",
    tag = "devices",
    summary = "Disable a device",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the device", body = crate::devices::Device), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn disable(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Device>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.devices.set_enabled(&name, false, &op.actor(), crate::now_ms()).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{name}/legacy",
    operation_id = "devices_legacy_on",
    tag = "devices",
    summary = "Mark a device as running the original firmware: its legacy /process uploads are accepted (weak security: docs/migration.md)",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the device", body = crate::devices::Device), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn legacy_on(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Device>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.legacy.mark(&name, true, &op.actor(), crate::now_ms()).await?))
}

#[utoipa::path(
    delete,
    path = "/api/v1/devices/{name}/legacy",
    operation_id = "devices_legacy_off",
    tag = "devices",
    summary = "Stop accepting a device's legacy uploads (it migrated to EcoWatt's firmware)",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the device", body = crate::devices::Device), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn legacy_off(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Device>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.legacy.mark(&name, false, &op.actor(), crate::now_ms()).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{name}/enable",
    operation_id = "devices_enable",
    tag = "devices",
    summary = "Enable a device",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the device", body = crate::devices::Device), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn enable(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Device>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.devices.set_enabled(&name, true, &op.actor(), crate::now_ms()).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{name}/rotate-key",
    operation_id = "devices_rotate_key",
    tag = "devices",
    summary = "Give a device a new key; returns it once",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "{device, provisioning}: the new key, shown only now", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn rotate_key(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let key = crate::random_hex(16);
    let device = state.devices.rotate_key(&name, &key, &op.actor(), crate::now_ms()).await?;
    let provisioning = provisioning(&state, &device, &key);
    Ok(Json(json!({ "device": device, "provisioning": provisioning })))
}

#[utoipa::path(
    delete,
    path = "/api/v1/devices/{name}",
    operation_id = "devices_remove",
    tag = "devices",
    summary = "Remove a device with its config and commands",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 204, description = "removed"), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn remove(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    op.require_admin()?;
    state.devices.delete(&name, &op.actor(), crate::now_ms()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/api/v1/broker/accounts",
    operation_id = "broker_accounts",
    tag = "devices",
    summary = "The device broker's accounts: per enabled device its user, password hash (Mosquitto $7$) and topics",
    responses((status = 200, description = "{prefix, accounts: [{username, password_hash, publish, subscribe}]}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn broker_accounts(
    State(state): State<AppState>,
    op: Operator,
) -> Result<Json<Value>, ApiError> {
    use ecowatt_formats::broker::{self as b, Route};
    op.require_admin()?;
    let topics =
        state.settings.device_broker.as_ref().map(|s| s.topics.clone()).unwrap_or_default();
    let keys = state.devices.enabled_keys().await?;
    let accounts: Vec<Value> = keys
        .iter()
        .filter_map(|(name, key)| {
            let key: [u8; 16] = ecowatt_proto::hex::decode(key).ok()?.try_into().ok()?;
            let mut salt = [0u8; 12];
            getrandom::fill(&mut salt).expect("the system's random source");
            let hash = b::mosquitto_hash(&b::broker_password(&key), &salt);
            let publish: Vec<String> = Route::ALL.iter().map(|r| topics.up(name, *r)).collect();
            Some(json!({
                "username": name,
                "password_hash": hash,
                "publish": publish,
                "subscribe": topics.down_all(name),
            }))
        })
        .collect();
    Ok(Json(json!({"prefix": topics.prefix, "accounts": accounts})))
}
