//! The seed's curl examples against `--legacy-api`, and the original's bugs
//! that must not come back (lost config changes, commands sent once).

use axum::http::StatusCode;
use ecowatt_testkit::server::TempDb;
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
    // A lost answer does not lose the change: it is flagged again.
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!(v["Changed"], true);
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!(v["Changed"], true);
    let (_, v) = c.call_as(None, "POST", "/changes", Some(changes.clone())).await;
    assert_eq!((v["Changed"].as_bool(), v["newPollTimer"].as_i64()), (Some(false), Some(10)));

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

    // write_register is validated when queued: register 3 is read-only.
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
