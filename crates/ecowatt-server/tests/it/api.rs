//! The operator API through the router, as a client sees it.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ecowatt_server::api::app;
use ecowatt_testkit::server::{TempDb, TestServer};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

pub struct Client {
    pub server: TestServer,
    pub token: String,
}

impl Client {
    pub async fn start(db: &TempDb, legacy: bool) -> Client {
        let server = TestServer::start(db, legacy).await;
        let token = server.admin_token.clone();
        Client { server, token }
    }

    /// A client of a server with these settings.
    pub async fn start_tuned(db: &TempDb, file: ecowatt_server::settings::SettingsFile) -> Client {
        let server = TestServer::start_tuned(db, "127.0.0.1:0", file).await;
        let token = server.admin_token.clone();
        Client { server, token }
    }

    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
        content_type: &str,
    ) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", content_type);
        }
        let req = req.body(body.map(Body::from).unwrap_or_default()).unwrap();
        let resp = app(self.server.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, text) =
            self.raw(method, path, token, body.map(|b| b.to_string()), "application/json").await;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        (status, v)
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some(&self.token.clone()), method, path, body).await
    }

    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body.clone()).await;
        assert!(status.is_success(), "{method} {path} {body:?} -> {status} {v}");
        v
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {v}"))
}

#[tokio::test]
async fn tokens_authenticate_and_roles_authorise() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let (status, v) = c.call_as(None, "GET", "/api/v1/devices", None).await;
    assert_eq!((status, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (status, _) = c.call_as(Some("ewt_wrong"), "GET", "/api/v1/devices", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let v =
        c.ok("POST", "/api/v1/tokens", Some(json!({"name": "dashboard", "role": "viewer"}))).await;
    let viewer = v["token"].as_str().unwrap().to_owned();
    assert!(viewer.starts_with("ewt_"));
    let (status, _) = c.call_as(Some(&viewer), "GET", "/api/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK, "viewers read");
    let (status, v) =
        c.call_as(Some(&viewer), "POST", "/api/v1/devices", Some(json!({"name": "x"}))).await;
    assert_eq!((status, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "viewers do not change");

    let id = c.ok("GET", "/api/v1/tokens", None).await["tokens"][1]["id"].as_i64().unwrap();
    c.ok("DELETE", &format!("/api/v1/tokens/{id}"), None).await;
    let (status, _) = c.call_as(Some(&viewer), "GET", "/api/v1/devices", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked");
    let (status, v) = c.call("DELETE", &format!("/api/v1/tokens/{id}"), None).await;
    assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "conflict"));

    let audit = c.ok("GET", "/api/v1/audit?limit=10", None).await;
    let entry = &audit["entries"][0];
    assert_eq!(
        (entry["action"].as_str(), entry["actor"].as_str()),
        (Some("token.revoke"), Some("admin#1"))
    );
    c.server.stop().await;
}

#[tokio::test]
async fn devices_are_added_with_a_key_shown_once() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let (status, v) = c
        .call("POST", "/api/v1/devices", Some(json!({"name": "roof-1", "rated_power_w": 8000})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let key = v["provisioning"]["key"].as_str().unwrap();
    assert_eq!(key.len(), 32, "128-bit key in hex");
    assert_eq!(v["provisioning"]["device"], "roof-1");
    let shown = c.ok("GET", "/api/v1/devices/roof-1", None).await;
    assert!(!shown.to_string().contains(key), "the key is never shown again");
    assert_eq!(shown["device"]["rated_power_w"], 8000);
    assert_eq!(shown["config"]["desired_version"], 1);

    let (status, v) = c.call("POST", "/api/v1/devices", Some(json!({"name": "roof-1"}))).await;
    assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "conflict"));
    for bad in ["roof 2", ".", "..", "...", ""] {
        let (status, v) = c.call("POST", "/api/v1/devices", Some(json!({"name": bad}))).await;
        assert_eq!(
            (status, v["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("name")),
            "{bad:?}"
        );
    }
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "roof.2"}))).await;
    let (status, v) = c
        .call("POST", "/api/v1/devices", Some(json!({"name": "r", "rated_power_w": 1_000_000})))
        .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("rated_power_w"))
    );

    let rotated = c.ok("POST", "/api/v1/devices/roof-1/rotate-key", None).await;
    assert_ne!(rotated["provisioning"]["key"].as_str().unwrap(), key);
    assert_eq!(rotated["device"]["key_version"], 2);
    assert_eq!(c.ok("POST", "/api/v1/devices/roof-1/disable", None).await["enabled"], false);
    assert_eq!(c.ok("POST", "/api/v1/devices/roof-1/enable", None).await["enabled"], true);
    let (status, _) = c.call("DELETE", "/api/v1/devices/roof-1", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = c.call("GET", "/api/v1/devices/roof-1", None).await;
    assert_eq!((status, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    c.server.stop().await;
}

#[tokio::test]
async fn config_changes_are_validated_versioned_and_kept() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "d"}))).await;
    let v = c
        .ok(
            "PATCH",
            "/api/v1/devices/d/config",
            Some(json!({"poll_interval_ms": 10000, "upload_interval_ms": 900000})),
        )
        .await;
    assert_eq!(
        (v["desired_version"].as_i64(), v["desired"]["poll_interval_ms"].as_i64()),
        (Some(2), Some(10_000))
    );
    for (body, field) in [
        (json!({"poll_interval_ms": 500}), "poll_interval_ms"),
        (json!({"upload_interval_ms": 999999999}), "upload_interval_ms"),
        (json!({"registers": [11]}), "registers"),
    ] {
        let (status, v) = c.call("PATCH", "/api/v1/devices/d/config", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v["error"]["field"], field, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(".."), "the limit is named: {v}");
    }
    let (status, v) = c.call("PATCH", "/api/v1/devices/d/config", Some(json!({"poll": 5}))).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_body"),
        "unknown fields are refused"
    );
    let h = c.ok("GET", "/api/v1/devices/d/config/history", None).await;
    assert_eq!(h["versions"].as_array().unwrap().len(), 2);
    c.server.stop().await;
}

#[tokio::test]
async fn commands_are_validated_when_queued_and_can_be_listed_cancelled_exported() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "d", "rated_power_w": 5000}))).await;
    let (status, v) = c
        .call(
            "POST",
            "/api/v1/devices/d/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 50}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!((v["status"].as_str(), v["action"]["value"].as_i64()), (Some("queued"), Some(50)));
    let first = v["id"].as_i64().unwrap();
    let v = c
        .ok(
            "POST",
            "/api/v1/devices/d/commands",
            Some(json!({"type": "set_power", "parameters": {"power_value": 2500}, "ttl_s": 60})),
        )
        .await;
    assert_eq!(v["action"]["value"], 50, "2500 W of a 5 kW inverter is 50 %");

    for (body, field) in [
        (json!({"type": "set_power_percentage", "parameters": {"percentage": 150}}), "percentage"),
        (json!({"type": "set_power", "parameters": {"power_value": 6000}}), "power_value"),
        (
            json!({"type": "write_register", "parameters": {"register_address": 3, "value": 1}}),
            "register_address",
        ),
        (
            json!({"type": "write_register", "parameters": {"register_address": 8, "value": 101}}),
            "value",
        ),
        (
            json!({"type": "read_register", "parameters": {"register_address": 12}}),
            "register_address",
        ),
        (json!({"type": "reboot", "parameters": {}}), "type"),
        (
            json!({"type": "set_power_percentage", "parameters": {"percentage": 5}, "ttl_s": 1}),
            "ttl_s",
        ),
    ] {
        let (status, v) = c.call("POST", "/api/v1/devices/d/commands", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_eq!(v["error"]["field"], field, "{body} -> {v}");
    }
    let (status, _) = c
        .call(
            "POST",
            "/api/v1/devices/nope/commands",
            Some(json!({"type": "read_register", "parameters": {"register_address": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let list = c.ok("GET", "/api/v1/devices/d/commands?status=queued&limit=1", None).await;
    assert_eq!(list["commands"].as_array().unwrap().len(), 1);
    let next = list["next_before"].as_i64().unwrap();
    let list = c.ok("GET", &format!("/api/v1/commands?device=d&before={next}"), None).await;
    assert_eq!(list["commands"][0]["id"].as_i64(), Some(first));
    let (status, v) = c.call("GET", "/api/v1/commands?status=bogus", None).await;
    assert_eq!((status, v["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("status")));

    assert_eq!(
        c.ok("POST", &format!("/api/v1/commands/{first}/cancel"), None).await["status"],
        "cancelled"
    );
    let (status, _) = c.call("POST", &format!("/api/v1/commands/{first}/cancel"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);

    let stats = c.ok("GET", "/api/v1/commands/statistics?device=d", None).await;
    assert_eq!(stats["statistics"]["total_commands"], 2);
    let (status, csv) =
        c.raw("GET", "/api/v1/commands/export?format=csv", Some(&c.token), None, "").await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("id,device,type,parameters,status"));
    assert!(lines[2].contains("\"{\"\"percentage\"\":50}\""), "JSON quoted for CSV: {}", lines[2]);
    let (_, jsonl) = c
        .raw(
            "GET",
            "/api/v1/commands/export?format=jsonl&status=cancelled",
            Some(&c.token),
            None,
            "",
        )
        .await;
    let rows: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((rows.len(), rows[0]["status"].as_str()), (1, Some("cancelled")));
    c.server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_never_a_500() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let t = Some(c.token.clone());
    let (status, text) = c
        .raw("POST", "/api/v1/devices", t.as_deref(), Some("{nope".into()), "application/json")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("invalid_json"), "{text}");
    let (status, text) =
        c.raw("POST", "/api/v1/devices", t.as_deref(), Some("{}".into()), "text/plain").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{text}");
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(200_000));
    let (status, text) =
        c.raw("POST", "/api/v1/devices", t.as_deref(), Some(huge), "application/json").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("body_too_large"));
    let (status, text) = c.raw("GET", "/api/v1/commands/abc", t.as_deref(), None, "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, text) = c.raw("GET", "/nowhere", None, None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("no_route"));
    let (status, _) = c.raw("GET", "/command/history", None, None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the legacy API is off by default");
    c.server.stop().await;
}

#[tokio::test]
async fn health_metrics_and_api_docs() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    assert_eq!(c.raw("GET", "/healthz", None, None, "").await, (StatusCode::OK, "ok".into()));
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "d"}))).await;
    c.ok(
        "POST",
        "/api/v1/devices/d/commands",
        Some(json!({"type": "read_register", "parameters": {"register_address": 9}})),
    )
    .await;
    let (_, metrics) = c.raw("GET", "/metrics", None, None, "").await;
    assert!(metrics.contains("ecowatt_commands_queued_total 1"), "{metrics}");
    assert!(metrics.contains("ecowatt_devices 1"), "{metrics}");
    assert!(metrics.contains("route=\"/api/v1/devices\",status=\"201\""), "{metrics}");
    let (status, spec) = c.call_as(None, "GET", "/api/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["paths"]["/api/v1/devices/{name}/commands"]["post"].is_object());
    let (status, page) = c.raw("GET", "/api/docs", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("/api/v1/commands/{id}/cancel")
            && !page.contains("http://")
            && !page.contains("https://")
    );
    c.server.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_one_page_with_nothing_from_the_internet() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let (status, page) = c.raw("GET", "/", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<title>EcoWatt</title>") && page.contains("/api/v1/devices"));
    for external in ["http://", "https://", "//cdn"] {
        assert!(
            !page.contains(external),
            "the page loads nothing from elsewhere: found {external:?}"
        );
    }
    // What it does load (the vendored charting library) comes from this server.
    for (i, _) in page.match_indices("src=\"").chain(page.match_indices("href=\"/")) {
        let path = page[i..].split('"').nth(1).unwrap();
        assert!(path.starts_with('/') && !path.starts_with("//"), "{path}");
        if path.starts_with("/dashboard/") {
            let (status, body) = c.raw("GET", path, None, None, "").await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(body.len() > 1000, "{path}");
        }
    }
    assert!(page.contains("src=\"/dashboard/uplot-1.6.32.min.js\""));
    // Its links: its icon and the charts' style sheet, from this server.
    let links: Vec<&str> = page.split("<link ").skip(1).collect();
    assert_eq!(links.len(), 2);
    assert!(links[0].contains("href=\"/favicon.svg\""), "{}", links[0]);
    assert!(links[1].contains("href=\"/dashboard/uplot-1.6.32.min.css\""), "{}", links[1]);
    let (status, icon) = c.raw("GET", "/favicon.ico", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(icon.starts_with("<svg"), "{icon}");
    assert_eq!(c.raw("GET", "/dashboard", None, None, "").await.1, page);
    c.server.stop().await;
}

#[tokio::test]
async fn the_first_start_creates_one_admin_token_and_later_starts_keep_it() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let token = c.token.clone();
    c.server.stop().await;
    let again = TestServer::start(&db, false).await;
    assert_eq!(again.admin_token, token, "the token file is kept");
    assert_eq!(again.state.operators.count().await.unwrap(), 1, "no second admin token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(again.data_dir.join("admin.token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only the owner may read the token file");
    }
    again.stop().await;
}

#[tokio::test]
async fn waiting_on_a_command_answers_as_soon_as_its_status_changes() {
    use std::time::{Duration, Instant};
    let db = TempDb::sqlite();
    let c = Client::start(&db, true).await;
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "d"}))).await;
    let body = json!({"type": "set_power_percentage", "parameters": {"percentage": 40}});
    let id = c.ok("POST", "/api/v1/devices/d/commands", Some(body)).await["id"].as_i64().unwrap();
    let wait = |from: &str| format!("/api/v1/commands/{id}?wait_ms=20000&changed_from={from}");

    // Nothing happens: the wait lasts its time and answers the same status.
    let t = Instant::now();
    let v =
        c.ok("GET", &format!("/api/v1/commands/{id}?wait_ms=300&changed_from=queued"), None).await;
    assert_eq!(v["status"], "queued");
    assert!(t.elapsed() >= Duration::from_millis(300));

    // The device (on the legacy API) takes it after 200 ms, reports after 400 ms:
    // each wait answers at the change, long before its 20 s.
    let device = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, got) =
            c.call_as(None, "POST", "/command/poll", Some(json!({"device_id": "d"}))).await;
        assert_eq!(status, StatusCode::OK, "{got}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let result = json!({"command_id": got["command"]["command_id"], "status": "completed", "result": "ok"});
        c.call_as(None, "POST", "/command/result", Some(result)).await;
    };
    let operator = async {
        let t = Instant::now();
        let v = c.ok("GET", &wait("queued"), None).await;
        assert_eq!(v["status"], "delivered", "{v}");
        let v = c.ok("GET", &wait("delivered"), None).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        t.elapsed()
    };
    let ((), took) = tokio::join!(device, operator);
    assert!(
        took < Duration::from_secs(10),
        "the waits ended at the changes, not at 20 s: {took:?}"
    );
    // Without changed_from, a wait on an open command ends when it leaves the
    // status it had at the request.
    let body = json!({"type": "set_power_percentage", "parameters": {"percentage": 41}});
    let id2 = c.ok("POST", "/api/v1/devices/d/commands", Some(body)).await["id"].as_i64().unwrap();
    let device = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.call_as(None, "POST", "/command/poll", Some(json!({"device_id": "d"}))).await;
    };
    let operator = async {
        let t = Instant::now();
        let v = c.ok("GET", &format!("/api/v1/commands/{id2}?wait_ms=20000"), None).await;
        (v, t.elapsed())
    };
    let ((), (v, took)) = tokio::join!(device, operator);
    assert_eq!(v["status"], "delivered", "{v}");
    assert!(took < Duration::from_secs(10), "ended at the delivery, not at 20 s: {took:?}");
    // Without changed_from, a command already settled answers at once.
    let t = Instant::now();
    assert_eq!(
        c.ok("GET", &format!("/api/v1/commands/{id}?wait_ms=20000"), None).await["status"],
        "succeeded"
    );
    assert!(t.elapsed() < Duration::from_secs(10));

    for bad in ["wait_ms=25001", "wait_ms=10&changed_from=done"] {
        let (status, v) = c.call("GET", &format!("/api/v1/commands/{id}?{bad}"), None).await;
        assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "invalid_field"), "{bad}: {v}");
    }
    c.server.stop().await;
}

/// The OpenAPI document is generated from the handlers: every operation it
/// lists is routed (never `no_route` or 405), operation ids are unique,
/// request and response bodies name the handlers' own types, who may call
/// each is stated, and the docs page lists every operation.
#[tokio::test]
async fn the_openapi_document_and_the_router_are_one_list() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, true).await;
    let (_, spec) = c.call_as(None, "GET", "/api/openapi.json", None).await;
    let (_, page) = c.raw("GET", "/api/docs", None, None, "").await;
    let mut ids = std::collections::HashSet::new();
    let mut count = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            count += 1;
            assert!(ids.insert(op["operationId"].as_str().unwrap().to_owned()), "{method} {path}");
            assert!(op["summary"].is_string(), "{method} {path}: no summary");
            let concrete = path
                .replace("{name}", "nosuch")
                .replace("{group}", "nosuch")
                .replace("{token}", "00")
                .replace("{action}", "pause")
                .replace("{id}", "999999");
            let body = matches!(method.as_str(), "post" | "put" | "patch").then(|| "{}".to_owned());
            let (status, text) = c
                .raw(&method.to_uppercase(), &concrete, Some(&c.token), body, "application/json")
                .await;
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("\"no_route\""),
                "{method} {path} is documented but not routed: {status} {text}"
            );
            assert!(page.contains(&format!("<code>{}</code>", method.to_uppercase())), "{method}");
            assert!(
                page.contains(&format!("<code>{path}</code>")),
                "{path} missing from /api/docs"
            );
        }
    }
    assert!(count >= 50, "{count} operations");
    // Bodies are the handlers' types, with their fields.
    let queue = &spec["paths"]["/api/v1/devices/{name}/commands"]["post"];
    assert_eq!(
        queue["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/QueueCommand"
    );
    assert_eq!(
        queue["responses"]["201"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Command"
    );
    assert_eq!(queue["security"][0]["bearer"][0], "admin");
    let schemas = &spec["components"]["schemas"];
    for field in ["id", "device", "status", "result_message", "lease_ms"] {
        assert!(schemas["Command"]["properties"][field].is_object(), "Command.{field}");
    }
    assert!(schemas["ConfigPatch"]["properties"]["upload_interval_ms"].is_object());
    assert_eq!(schemas["ErrorBody"]["required"][0], "error");
    let refused = &queue["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(refused, "#/components/schemas/ErrorBody");
    // The answers most clients read are typed too.
    let answer = |path: &str| {
        spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(answer("/api/v1/devices"), "#/components/schemas/DeviceList");
    assert_eq!(answer("/api/v1/devices/{name}/latest"), "#/components/schemas/Latest");
    assert_eq!(answer("/api/v1/devices/{name}/telemetry"), "#/components/schemas/Series");
    assert_eq!(answer("/api/v1/commands"), "#/components/schemas/CommandPage");
    assert!(schemas["Latest"]["properties"]["next_upload_due_ms"].is_object());
    assert!(schemas["Reading"]["properties"]["description"].is_object());
    // Query parameters come from the handlers' query types.
    let list = &spec["paths"]["/api/v1/commands"]["get"]["parameters"];
    let names: Vec<&str> =
        list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for q in ["device", "status", "type", "before", "since_ms", "limit"] {
        assert!(names.contains(&q), "{q} in {names:?}");
    }
    // Who may call: health and metrics need nothing, reads any token, changes admin.
    assert!(spec["paths"]["/healthz"]["get"]["security"].is_null());
    assert!(
        page.contains("<code>/healthz</code></td><td>Health")
            && page.contains("nothing (no token)")
    );
    assert_eq!(spec["paths"]["/api/v1/devices"]["get"]["security"][0]["bearer"], json!([]));
    c.server.stop().await;
}
