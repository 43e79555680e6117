//! The seed's curl examples against `--legacy-api`, and the original's bugs
//! that must not come back (lost config changes, commands sent once).

use axum::http::StatusCode;
use ecowatt_server::settings::{LegacyFile, SettingsFile};
use ecowatt_testkit::server::{TempDb, TestServer};
use serde_json::json;

use crate::api::Client;

async fn legacy_server() -> (Client, TempDb) {
    let db = TempDb::sqlite();
    let c = Client::start(&db, true).await;
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "ESP32_EcoWatt_Smart"}))).await;
    (c, db)
}

#[tokio::test]
async fn remote_configuration_as_the_seed_documents_it() {
    let (c, _db) = legacy_server().await;
    // curl -X POST http://localhost:5001/config/update -d '{"device_id":"ESP32_EcoWatt_Smart","poll_frequency":10}'
    let (status, v) = c
        .call_as(
            None,
            "POST",
            "/config/update",
            Some(json!({"device_id": "ESP32_EcoWatt_Smart", "poll_frequency": 10})),
        )
        .await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::OK, Some("success")));
    let (_, v) = c
        .call_as(
            None,
            "POST",
            "/config/update",
            Some(json!({"device_id": "ESP32_EcoWatt_Smart", "upload_frequency": 600})),
        )
        .await;
    assert_eq!(v["status"], "success");

    let changes = json!({"device_id": "ESP32_EcoWatt_Smart"});
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!(
        v,
        json!({"Changed": true, "pollFreqChanged": true, "newPollTimer": 10, "uploadFreqChanged": true, "newUploadTimer": 600})
    );
    // "Reset change flag after sending" (the guide).
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!(
        (v["Changed"].as_bool(), v["pollFreqChanged"].as_bool(), v["newPollTimer"].as_i64()),
        (Some(false), Some(false), Some(10))
    );

    // The legacy device is an ordinary device everywhere else.
    let shadow = c.ok("GET", "/api/v1/devices/ESP32_EcoWatt_Smart/config", None).await;
    assert_eq!(
        (shadow["desired"]["poll_interval_ms"].as_i64(), shadow["reported_version"].as_i64()),
        (Some(10_000), Some(3))
    );
    let audit = c.ok("GET", "/api/v1/audit", None).await;
    assert_eq!(audit["entries"][0]["actor"], "legacy-api");

    // Bad values are refused with the seed's field names; unknown devices are 404.
    let (status, v) = c
        .call_as(
            None,
            "POST",
            "/config/update",
            Some(json!({"device_id": "ESP32_EcoWatt_Smart", "poll_frequency": 0})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("poll_frequency"))
    );
    let (status, _) =
        c.call_as(None, "POST", "/changes", Some(json!({"device_id": "unknown"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = c.call_as(None, "POST", "/changes", Some(json!({}))).await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("device_id"))
    );
}

#[tokio::test]
async fn command_execution_as_the_seed_documents_it() {
    let (c, _db) = legacy_server().await;
    let dev = json!({"device_id": "ESP32_EcoWatt_Smart"});
    let (status, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": "ESP32_EcoWatt_Smart", "command_type": "set_power_percentage", "parameters": {"percentage": 50}})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let id = v["command_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("CMD_"));

    let (_, v) = c.call_as(None, "POST", "/command/poll", Some(dev.clone())).await;
    assert_eq!(v["command"]["command_id"], id.as_str());
    assert_eq!(v["command"]["command_type"], "set_power_percentage");
    assert_eq!(v["command"]["parameters"], json!({"percentage": 50}));
    // Not handed out twice at once...
    let (_, v) = c.call_as(None, "POST", "/command/poll", Some(dev.clone())).await;
    assert!(v["command"].is_null());
    let (_, v) = c.call_as(None, "GET", &format!("/command/status/{id}"), None).await;
    assert_eq!(v["status"], "sent");

    let (status, v) = c
        .call_as(None, "POST", "/command/result", Some(json!({"command_id": id, "status": "completed", "result": "Power set successfully to 50%"})))
        .await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::OK, Some("success")));
    let (_, v) = c.call_as(None, "GET", &format!("/command/status/{id}"), None).await;
    assert_eq!(
        (v["status"].as_str(), v["result"].as_str()),
        (Some("completed"), Some("Power set successfully to 50%"))
    );
    assert!(v["completed_time"].as_str().unwrap().ends_with('Z'));

    // A register of the map keeps its checks: register 3 is read-only.
    let (status, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": "ESP32_EcoWatt_Smart", "command_type": "write_register", "parameters": {"register_address": 3, "value": 75}})))
        .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("register_address"))
    );
    let (_, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": "ESP32_EcoWatt_Smart", "command_type": "write_register", "parameters": {"register_address": 8, "value": 75}})))
        .await;
    let second = v["command_id"].as_str().unwrap().to_owned();
    let (_, v) =
        c.call_as(None, "GET", "/command/pending?device_id=ESP32_EcoWatt_Smart", None).await;
    assert_eq!(v["count"], 1);
    let (_, v) = c.call_as(None, "POST", "/command/poll", Some(dev.clone())).await;
    assert_eq!(v["command"]["command_id"], second.as_str());
    let (_, _) = c
        .call_as(
            None,
            "POST",
            "/command/result",
            Some(
                json!({"command_id": second, "status": "failed", "result": "Modbus exception 04"}),
            ),
        )
        .await;

    let (_, v) =
        c.call_as(None, "GET", "/command/history?device_id=ESP32_EcoWatt_Smart", None).await;
    assert_eq!(v["commands"].as_array().unwrap().len(), 2);
    let (_, v) = c.call_as(None, "GET", "/command/statistics", None).await;
    assert_eq!(
        (v["total_commands"].as_i64(), v["completed"].as_i64(), v["failed"].as_i64()),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(v["success_rate"], 50.0);
    let (_, v) = c.call_as(None, "GET", "/command/logs", None).await;
    assert_eq!(v["logs"].as_array().unwrap().len(), 2);

    let (status, _) = c
        .call_as(
            None,
            "POST",
            "/command/result",
            Some(json!({"command_id": "CMD_999", "status": "completed"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_disabled_device_is_refused() {
    let (c, _db) = legacy_server().await;
    // Answered from memory first (nothing to tell)...
    for path in ["/changes", "/command/poll"] {
        let (status, _) =
            c.call_as(None, "POST", path, Some(json!({"device_id": "ESP32_EcoWatt_Smart"}))).await;
        assert_eq!(status, StatusCode::OK);
    }
    // ...which disabling outdates.
    c.ok("POST", "/api/v1/devices/ESP32_EcoWatt_Smart/disable", None).await;
    for path in ["/changes", "/command/poll", "/ota/check"] {
        let (status, v) =
            c.call_as(None, "POST", path, Some(json!({"device_id": "ESP32_EcoWatt_Smart"}))).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("device_disabled")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn ota_check_answers_in_the_seed_shape() {
    let (c, _db) = legacy_server().await;
    let (status, v) = c
        .call_as(
            None,
            "POST",
            "/ota/check",
            Some(json!({"device_id": "ESP32_EcoWatt_Smart", "current_version": "1.0.3"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["update_available"], false);
    assert_eq!(v["message"], "Device is running latest version: 1.0.3");
    let (status, v) = c.call_as(None, "GET", "/ota/download/firmware_1.0.4.bin", None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
}

async fn legacy_server_with(legacy: LegacyFile) -> (Client, TempDb) {
    let db = TempDb::sqlite();
    let file =
        SettingsFile { legacy_api: Some(true), legacy: Some(legacy), ..SettingsFile::default() };
    let server = TestServer::start_tuned(&db, "127.0.0.1:0", file).await;
    let token = server.admin_token.clone();
    let c = Client { server, token };
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "ESP32_EcoWatt_Smart"}))).await;
    (c, db)
}

#[tokio::test]
async fn a_new_device_is_not_told_to_change_and_config_status_shows_what_waits() {
    let (c, _db) = legacy_server().await;
    let changes = json!({"device_id": "ESP32_EcoWatt_Smart"});
    // Added for migration, changed by nobody: the original firmware keeps its timers.
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!(
        (v["Changed"].as_bool(), v["pollFreqChanged"].as_bool()),
        (Some(false), Some(false))
    );
    let (status, v) =
        c.call_as(None, "GET", "/config/status?device_id=ESP32_EcoWatt_Smart", None).await;
    assert_eq!((status, v["changed"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    // The guide's integration test: curl -d with no Content-Type.
    let (status, body) = c
        .raw(
            "POST",
            "/config/update",
            None,
            Some(r#"{"device_id":"ESP32_EcoWatt_Smart","upload_frequency":600}"#.into()),
            "application/x-www-form-urlencoded",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, v) = c.call_as(None, "GET", "/config/status", None).await;
    let d = &v["devices"][0];
    assert_eq!(
        (
            v["count"].as_i64(),
            d["device_id"].as_str(),
            d["upload_frequency"].as_i64(),
            d["changed"].as_bool()
        ),
        (Some(1), Some("ESP32_EcoWatt_Smart"), Some(600), Some(true)),
        "{v}"
    );
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!(
        (v["Changed"].as_bool(), v["pollFreqChanged"].as_bool(), v["uploadFreqChanged"].as_bool()),
        (Some(true), Some(false), Some(true))
    );
    let (_, v) = c.call_as(None, "GET", "/config/status?device_id=ESP32_EcoWatt_Smart", None).await;
    assert_eq!(
        (v["changed"].as_bool(), v["applied_upload_frequency"].as_i64()),
        (Some(false), Some(600))
    );
    let (status, _) = c.call_as(None, "GET", "/config/status?device_id=nobody", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Not JSON at all: a clear 400.
    let (status, body) =
        c.raw("POST", "/changes", None, Some("device_id=x".into()), "text/plain").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("invalid_json"), "{body}");
}

#[tokio::test]
async fn the_stricter_behaviours_stay_available() {
    let (c, _db) = legacy_server_with(LegacyFile {
        config_repeat: Some(3),
        strict_commands: Some(true),
        ..LegacyFile::default()
    })
    .await;
    c.call_as(
        None,
        "POST",
        "/config/update",
        Some(json!({"device_id": "ESP32_EcoWatt_Smart", "poll_frequency": 10})),
    )
    .await;
    let changes = json!({"device_id": "ESP32_EcoWatt_Smart"});
    let mut flags = vec![];
    for _ in 0..4 {
        let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
        flags.push(v["Changed"].as_bool().unwrap());
    }
    assert_eq!(flags, [true, true, true, false], "a lost answer does not lose the change");
    let (status, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": "ESP32_EcoWatt_Smart", "command_type": "write_register", "parameters": {"register_address": 40001, "value": 4500}})))
        .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("register_address"))
    );
}

/// `flask/test_command_execution.py`, the guide's automated suite, step by
/// step against EcoWatt (tests/legacy/migration_test.py runs the same
/// requests from Python against a real server process).
#[tokio::test]
async fn the_guides_ten_step_command_suite_passes() {
    let (c, _db) = legacy_server().await;
    let dev = "ESP32_EcoWatt_Smart";
    // 1. Queue command (set_power 5000 W).
    let (status, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": dev, "command_type": "set_power", "parameters": {"power_value": 5000}})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let id1 = v["command_id"].as_str().unwrap().to_owned();
    let (n, t) = id1.strip_prefix("CMD_").unwrap().split_once('_').expect("CMD_<n>_<unix>");
    assert!(n.parse::<i64>().is_ok() && t.parse::<i64>().unwrap() > 1_700_000_000, "{id1}");
    // 2. Poll command.
    let (_, v) = c.call_as(None, "POST", "/command/poll", Some(json!({"device_id": dev}))).await;
    assert_eq!(
        (v["command"]["command_id"].as_str(), v["command"]["command_type"].as_str()),
        (Some(id1.as_str()), Some("set_power"))
    );
    // 3. Submit result.
    let (status, _) = c
        .call_as(None, "POST", "/command/result", Some(json!({"command_id": id1, "status": "completed", "result": "Command set_power: executed successfully (TEST)"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    // 4. Get status.
    let (_, v) = c.call_as(None, "GET", &format!("/command/status/{id1}"), None).await;
    assert_eq!(v["status"], "completed");
    // 5. History (with the suite's limit=10).
    let (status, v) =
        c.call_as(None, "GET", &format!("/command/history?device_id={dev}&limit=10"), None).await;
    assert_eq!((status, v["commands"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{v}");
    // 6. Pending.
    let (_, v) = c.call_as(None, "GET", &format!("/command/pending?device_id={dev}"), None).await;
    assert_eq!(v["count"], 0);
    // 7. Statistics.
    let (_, v) = c.call_as(None, "GET", "/command/statistics", None).await;
    assert_eq!(
        (
            v["total_commands"].as_i64(),
            v["completed"].as_i64(),
            v["pending"].as_i64(),
            v["active_devices"].as_i64(),
            v["total_queued"].as_i64()
        ),
        (Some(1), Some(1), Some(0), Some(1), Some(1))
    );
    assert_eq!(v["success_rate"], 100.0);
    // 8. Queue write_register 40001: queued, as the original did.
    let (status, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": dev, "command_type": "write_register", "parameters": {"register_address": 40001, "value": 4500}})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let id2 = v["command_id"].as_str().unwrap().to_owned();
    // Pending counts queued and sent commands.
    let (_, v) = c.call_as(None, "GET", "/command/statistics", None).await;
    assert_eq!(v["pending"], 1);
    // 9. Submit a failed result (the suite does not poll first).
    let (status, _) = c
        .call_as(None, "POST", "/command/result", Some(json!({"command_id": id2, "status": "failed", "result": "Inverter SIM timeout - command execution failed (TEST)"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    // 10. Export logs.
    let (_, v) = c.call_as(None, "GET", &format!("/command/logs?device_id={dev}"), None).await;
    assert_eq!(v["logs"].as_array().map(Vec::len), Some(2));
    let (_, v) = c.call_as(None, "GET", "/command/statistics", None).await;
    assert_eq!(
        (
            v["total_commands"].as_i64(),
            v["completed"].as_i64(),
            v["failed"].as_i64(),
            v["pending"].as_i64()
        ),
        (Some(2), Some(1), Some(1), Some(0))
    );
    assert_eq!(v["success_rate"], 50.0);

    // An original id whose timestamp names another second is another command.
    let (n, t) = id1.strip_prefix("CMD_").unwrap().split_once('_').unwrap();
    let other = format!("CMD_{n}_{}", t.parse::<i64>().unwrap() - 3600);
    let (status, _) = c.call_as(None, "GET", &format!("/command/status/{other}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = c
        .call_as(
            None,
            "POST",
            "/command/result",
            Some(json!({"command_id": other, "status": "completed"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn legacy_commands_live_a_week_unless_a_ttl_is_given() {
    let (c, _db) = legacy_server().await;
    let dev = "ESP32_EcoWatt_Smart";
    let (_, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": dev, "command_type": "set_power_percentage", "parameters": {"percentage": 40}})))
        .await;
    let id = v["command_id"].as_str().unwrap();
    let n: i64 = id.split('_').nth(1).unwrap().parse().unwrap();
    let cmd = c.ok("GET", &format!("/api/v1/commands/{n}"), None).await;
    let life = cmd["expires_ms"].as_i64().unwrap() - cmd["created_ms"].as_i64().unwrap();
    assert_eq!(life, 7 * 86_400_000);
    let (_, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": dev, "command_type": "set_power_percentage", "parameters": {"percentage": 40}, "ttl": 3600})))
        .await;
    let n: i64 = v["command_id"].as_str().unwrap().split('_').nth(1).unwrap().parse().unwrap();
    let cmd = c.ok("GET", &format!("/api/v1/commands/{n}"), None).await;
    assert_eq!(
        cmd["expires_ms"].as_i64().unwrap() - cmd["created_ms"].as_i64().unwrap(),
        3_600_000
    );
    let (status, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": dev, "command_type": "set_power_percentage", "parameters": {"percentage": 40}, "ttl": 1})))
        .await;
    assert_eq!((status, v["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("ttl_s")));
}

#[tokio::test]
async fn ota_check_without_a_version_is_a_400() {
    let (c, _db) = legacy_server().await;
    let (status, v) = c
        .call_as(None, "POST", "/ota/check", Some(json!({"device_id": "ESP32_EcoWatt_Smart"})))
        .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("current_version"))
    );
}

/// The original firmware's upload as its `uploadSmartCompressedDataToCloud`
/// builds it, sealed by its `SecurityLayer::securePayload`.
fn secured_upload(
    nonce: u32,
    device: &str,
    packets: &[(Vec<u8>, u64)],
    key: &[u8; 32],
) -> serde_json::Value {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let compressed: Vec<_> = packets
        .iter()
        .map(|(bytes, millis)| {
            json!({
                "compressed_binary": b64.encode(bytes),
                "decompression_metadata": {"method": "BATCH_TEMPORAL", "register_count": 10, "timestamp": millis,
                    "register_layout": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]},
                "performance_metrics": {"academic_ratio": 0.5},
            })
        })
        .collect();
    let inner =
        json!({"device_id": device, "timestamp": 60_000, "data_type": "compressed_sensor_batch",
        "total_samples": packets.len(), "compressed_data": compressed})
        .to_string();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(&nonce.to_be_bytes());
    mac.update(inner.as_bytes());
    let mac: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    json!({"nonce": nonce, "payload": b64.encode(&inner), "mac": mac, "encrypted": false})
}

/// A temporal base batch (`0x70`) of `samples` of all ten registers.
fn temporal_base(samples: &[[u16; 10]]) -> Vec<u8> {
    let mut b = vec![0x70, (samples.len() * 10) as u8];
    b.extend((0..samples.len() * 10).map(|i| (i % 10) as u8));
    for s in samples {
        s.iter().for_each(|v| b.extend(v.to_le_bytes()));
    }
    b
}

#[tokio::test]
async fn original_firmware_uploads_are_stored_as_telemetry_with_the_originals_security() {
    use ecowatt_server::settings::ORIGINAL_UPLOAD_HMAC_KEY as KEY;
    let (c, db) = legacy_server().await;
    let dev = "ESP32_EcoWatt_Smart";
    let s = |k: u16, pow: u16| [2430 + k, 170, 500, 3000, 2950, 70, 65, 350, pow, 4100 + k];
    let batch = temporal_base(&[s(0, 100), s(1, 100), s(2, 100), s(3, 100), s(4, 40)]);
    let up = secured_upload(10_001, dev, &[(batch.clone(), 60_000)], &KEY);

    // Not marked legacy: refused, nothing stored.
    let (status, v) = c.call_as(None, "POST", "/process", Some(up.clone())).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("legacy_not_enabled")),
        "{v}"
    );
    // An unsecured upload is refused (the original accepted plain JSON: no protection at all).
    let (status, v) = c
        .call_as(
            None,
            "POST",
            "/process",
            Some(json!({"device_id": dev, "compressed_data": [{"compressed_binary": "cAA="}]})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("legacy_unsecured"))
    );

    let d = c.ok("POST", &format!("/api/v1/devices/{dev}/legacy"), None).await;
    assert_eq!(d["legacy"], true);
    // An export limit of 40 % queued, delivered and reported done...
    let (_, v) = c
        .call_as(None, "POST", "/command/queue", Some(json!({"device_id": dev, "command_type": "set_power_percentage", "parameters": {"percentage": 40}})))
        .await;
    let id = v["command_id"].as_str().unwrap().to_owned();
    c.call_as(None, "POST", "/command/poll", Some(json!({"device_id": dev}))).await;
    c.call_as(
        None,
        "POST",
        "/command/result",
        Some(json!({"command_id": id, "status": "completed", "result": "ok"})),
    )
    .await;

    // A tampered upload is refused and advances nothing.
    let mut tampered = up.clone();
    tampered["mac"] = json!("00".repeat(32));
    let (status, v) = c.call_as(None, "POST", "/process", Some(tampered)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("legacy_bad_mac"))
    );

    let (status, body) =
        c.raw("POST", "/process", None, Some(up.to_string()), "application/json").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["decompression_successes"].as_i64(), v["total_samples_processed"].as_i64()),
        (Some(1), Some(5)),
        "{v}"
    );
    // The same upload again is a replay; so is an older nonce.
    for nonce in [10_001, 10_000] {
        let (status, v) = c
            .call_as(
                None,
                "POST",
                "/process",
                Some(secured_upload(nonce, dev, &[(batch.clone(), 55_000)], &KEY)),
            )
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("legacy_replay"))
        );
    }

    // Stored as any device's telemetry, in engineering units, the last
    // sample timed at receipt (made when uploaded), samples a poll
    // interval (5 s) apart.
    let t = c.ok("GET", &format!("/api/v1/devices/{dev}/telemetry?registers=Vac1,Pow"), None).await;
    let points = t["points"].as_array().unwrap();
    assert_eq!(points.len(), 5, "{t}");
    let times: Vec<i64> = points.iter().map(|p| p["t"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[1] - w[0] == 5_000), "{times:?}");
    assert!((ecowatt_formats::time::now_ms() - times[4]).abs() < 3_000, "{times:?}");
    assert_eq!(
        (points[0]["v"][0].as_f64(), points[4]["v"][0].as_f64()),
        (Some(243.0), Some(243.4)),
        "{t}"
    );
    assert_eq!(points[4]["v"][1].as_f64(), Some(40.0));
    // Rollups as for any device: its energy (AC power 4,100 to 4,104 W over
    // four 5 s intervals) and samples today.
    let e = c.ok("GET", &format!("/api/v1/devices/{dev}/energy?period=year"), None).await;
    let wh = e["total_kwh"].as_f64().unwrap() * 1000.0;
    let expected = (4100.0 + 2.0 * (4101.0 + 4102.0 + 4103.0) + 4104.0) / 2.0 * 5.0 / 3600.0;
    assert!((wh - expected).abs() < 1e-9, "{wh} Wh against {expected}: {e}");
    assert_eq!(e["periods"][0]["samples"], 5, "{e}");
    // ... and the 40 % read back (after the result) confirms the command.
    let n: i64 = id.split('_').nth(1).unwrap().parse().unwrap();
    assert_eq!(c.ok("GET", &format!("/api/v1/commands/{n}"), None).await["status"], "confirmed");

    // A batch the original encoder made lossy is named, counted, not stored;
    // the others of the upload are stored.
    let lossy = vec![0x50, 50, 1, 0];
    let up = secured_upload(10_002, dev, &[(lossy, 58_000), (batch.clone(), 59_000)], &KEY);
    // (Made 2 s and 1 s before the upload: timed back from receipt.)
    let v = c.call_as(None, "POST", "/process", Some(up)).await.1;
    assert_eq!(
        (v["decompression_successes"].as_i64(), v["undecodable"][0]["reason"].as_str()),
        (Some(1), Some("lossy")),
        "{v}"
    );
    let metrics = c.raw("GET", "/metrics", Some(&c.token.clone()), None, "").await.1;
    assert!(metrics.contains("ecowatt_legacy_batches_total{outcome=\"lossy\"} 1"), "{metrics}");
    assert!(
        metrics.contains("ecowatt_legacy_uploads_total{outcome=\"legacy_replay\"} 2"),
        "{metrics}"
    );

    // The nonce survives a server restart (the original's did not).
    c.server.stop().await;
    let server = TestServer::start(&db, true).await;
    let c = Client { token: server.admin_token.clone(), server };
    let (status, v) = c
        .call_as(
            None,
            "POST",
            "/process",
            Some(secured_upload(10_002, dev, &[(batch.clone(), 1)], &KEY)),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("legacy_replay"))
    );
    let (status, _) = c
        .call_as(None, "POST", "/process", Some(secured_upload(10_003, dev, &[(batch, 1)], &KEY)))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Unmarked again (migrated): refused.
    c.ok("DELETE", &format!("/api/v1/devices/{dev}/legacy"), None).await;
    let (status, _) = c
        .call_as(
            None,
            "POST",
            "/process",
            Some(secured_upload(10_004, dev, &[(vec![0x70, 0], 1)], &KEY)),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The hot requests' copies hold only while the device's news does, and
/// `/command/poll` stays quiet only until the time the store gave.
#[tokio::test]
async fn copies_in_memory_hold_until_news_or_their_time() {
    let (c, _db) = legacy_server().await;
    let hot = c.server.state.legacy.hot();
    let dev = "ESP32_EcoWatt_Smart";
    let stamp = hot.stamp(dev);
    hot.learn_poll(dev, stamp, 1_000);
    hot.learn_timers(dev, stamp, Some((5, 900)));
    assert!(hot.quiet_poll(dev, 999));
    assert!(!hot.quiet_poll(dev, 1_000), "a delivered command is due again");
    assert_eq!(hot.quiet_timers(dev, 0), Some((5, 900)));
    // A copy learned under an old stamp is not kept.
    c.server.state.news.device(dev);
    assert!(!hot.quiet_poll(dev, 0) && hot.quiet_timers(dev, 0).is_none());
    hot.learn_poll(dev, stamp, 1_000);
    assert!(!hot.quiet_poll(dev, 0), "learned under a stamp that no longer holds");
    // While other servers' news may be missed, nothing is answered from memory.
    let stamp = hot.stamp(dev);
    hot.learn_poll(dev, stamp, i64::MAX);
    assert!(hot.quiet_poll(dev, 0));
    c.server.state.news.set_hearing(false);
    assert!(hot.stamp(dev).is_none() && !hot.quiet_poll(dev, 0));
    c.server.state.news.set_hearing(true);
    assert!(!hot.quiet_poll(dev, 0), "copies from before the gap are outdated");
}
