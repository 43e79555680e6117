//! Firmware rollouts through the router: waves, offers on the sealed sync,
//! device reports, pause/resume/abort, the failure threshold, downloads by
//! token with byte ranges. Run on SQLite and (when configured) PostgreSQL.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ecowatt_proto::firmware::{Manifest, Version};
use ecowatt_proto::messages::{OtaReport, OtaState, SyncRequest, SyncResponse, ota_reason};
use ecowatt_server::api::app;
use ecowatt_server::firmware::Firmware;
use ecowatt_testkit::server::TempDb;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use crate::api::Client;
use crate::protocol::Probe;

pub async fn store_image(c: &Client, version: &str, data: &[u8]) -> i64 {
    let m = Manifest {
        version: Version::parse(version).unwrap(),
        size: data.len() as u64,
        sha256: Sha256::digest(data).into(),
        security_counter: 0,
        target: "linux-x86_64".into(),
        created_ms: 1,
    };
    // The store keeps what the upload endpoint checked; the signature is not
    // this test's concern (the device checks it).
    // RFC 8032's first test key: a valid point, whose signature this is not.
    let key = ecowatt_proto::firmware::PublicKey::from_bytes(
        &ecowatt_proto::hex::decode(
            "D75A980182B10AB7D54BFED3C964073A0EE172F3DAA62325AF021A68F707511A",
        )
        .unwrap(),
    )
    .unwrap();
    let manifest = ecowatt_formats::manifest::manifest_json(&m, &key, &[2; 64]);
    let fw = Firmware {
        id: 0,
        version: version.into(),
        target: m.target.clone(),
        size: m.size as i64,
        sha256: ecowatt_proto::hex::encode_upper(&m.sha256),
        security_counter: 0,
        created_ms: 1,
        manifest,
        uploaded_ms: 1,
        uploaded_by: "test".into(),
    };
    c.server.state.firmware.add(&fw, data).await.unwrap().id
}

pub fn report(state: OtaState, version: &str, done: u64, total: u64, reason: u8) -> SyncRequest {
    SyncRequest {
        firmware: "1.0.0".into(),
        ota: Some(OtaReport { state, version: version.into(), done, total, reason }),
        ..Default::default()
    }
}

fn idle() -> SyncRequest {
    SyncRequest { firmware: "1.0.0".into(), ..Default::default() }
}

struct Fleet {
    c: Client,
    devices: Vec<(String, Probe)>,
}

impl Fleet {
    async fn sync(&mut self, name: &str, req: &SyncRequest) -> SyncResponse {
        let state = self.c.server.state.clone();
        let dev = &mut self.devices.iter_mut().find(|(n, _)| n == name).unwrap().1;
        dev.sync(&state, req).await.unwrap()
    }
}

fn device<'a>(rollout: &'a Value, name: &str) -> &'a Value {
    rollout["devices"].as_array().unwrap().iter().find(|d| d["device"] == name).unwrap()
}

async fn get_range(c: &Client, path: &str, range: &str) -> (StatusCode, Vec<u8>) {
    let req = Request::get(path).header("range", range).body(Body::empty()).unwrap();
    let resp = app(c.server.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn rollout_goes_wave_by_wave_and_aborts_past_its_threshold(db: TempDb) {
    let c = Client::start(&db, false).await;
    let mut devices = Vec::new();
    for i in 1..=4 {
        let name = format!("d{i}");
        devices.push((name.clone(), Probe::provision(&c, &name).await));
    }
    let mut f = Fleet { c, devices };
    let image: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let fw = store_image(&f.c, "1.1.0", &image).await;

    // Bad requests are refused with stable codes.
    for (body, field) in [
        (json!({"firmware_id": fw, "devices": ["d1"], "waves": [50]}), "waves"),
        (json!({"firmware_id": fw, "devices": ["d1"], "waves": [60, 40, 100]}), "waves"),
        (json!({"firmware_id": fw, "devices": ["d1"], "percent": 50}), "devices"),
        (json!({"firmware_id": fw, "percent": 0}), "percent"),
        (json!({"devices": ["d1"]}), "firmware_id"),
    ] {
        let (status, v) = f.c.call("POST", "/api/v1/rollouts", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_eq!(v["error"]["code"], "invalid_field", "{v}");
        assert_eq!(v["error"]["field"], field, "{body} -> {v}");
    }
    let (status, v) = f
        .c
        .call("POST", "/api/v1/rollouts", Some(json!({"firmware_id": fw, "devices": ["nobody"]})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    let r =
        f.c.ok(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"version": "1.1.0", "devices": ["d1", "d2", "d3", "d4"],
                        "waves": [25, 100], "failure_threshold_pct": 50})),
        )
        .await;
    let id = r["id"].as_i64().unwrap();
    assert_eq!((r["state"].as_str(), r["devices_total"].as_i64()), (Some("running"), Some(4)));
    let first: Vec<String> = r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["wave"] == 0)
        .map(|d| d["device"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(first.len(), 1, "25% of 4 devices in the first wave: {r}");
    let canary = first[0].clone();
    let rest: Vec<String> =
        ["d1", "d2", "d3", "d4"].iter().map(|s| s.to_string()).filter(|n| *n != canary).collect();

    // Only the first wave is offered, with the whole signed manifest.
    let offer = f.sync(&canary, &idle()).await.update.expect("the canary is offered the image");
    assert_eq!(offer.manifest.version.to_string(), "1.1.0");
    assert_eq!(offer.manifest.size, image.len() as u64);
    assert_eq!(offer.signature, vec![2; 64]);
    for n in &rest {
        assert!(f.sync(n, &idle()).await.update.is_none(), "{n} is in the second wave");
    }
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(device(&r, &canary)["state"], "offered");

    // The image by its token, with ranges (a resumed download).
    let path =
        format!("/api/v1/device/firmware/{}", ecowatt_proto::hex::encode_upper(&offer.token));
    let (status, body) = get_range(&f.c, &path, "bytes=65536-").await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, image[65_536..]);
    // Ranges as a device fetches them, 4 KiB at a time: one read of the image
    // from the database serves them all (the copy is the one held).
    let firmware_id =
        f.c.server
            .state
            .rollouts
            .download(&ecowatt_proto::hex::encode_upper(&offer.token))
            .await
            .unwrap()
            .firmware_id;
    let held = f.c.server.state.firmware.bytes(firmware_id).await.unwrap();
    for at in (0..image.len()).step_by(4096).take(8) {
        let last = (at + 4095).min(image.len() - 1);
        let (status, body) = get_range(&f.c, &path, &format!("bytes={at}-{last}")).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(body, image[at..=last]);
    }
    let again = f.c.server.state.firmware.bytes(firmware_id).await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&held, &again), "served from the copy in memory");
    let (status, _) =
        get_range(&f.c, "/api/v1/device/firmware/00000000000000000000000000000000", "bytes=0-")
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get_range(&f.c, "/api/v1/device/firmware/..%2F..", "bytes=0-").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Progress shows; pause withdraws the offer, resume brings it back.
    let half = report(OtaState::Downloading, "1.1.0", 50_000, 100_000, 0);
    assert!(f.sync(&canary, &half).await.update.is_some());
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(
        (device(&r, &canary)["state"].as_str(), device(&r, &canary)["percent"].as_i64()),
        (Some("downloading"), Some(50))
    );
    let r = f.c.ok("POST", &format!("/api/v1/rollouts/{id}/pause"), None).await;
    assert_eq!(r["state"], "paused");
    assert!(f.sync(&canary, &half).await.update.is_none(), "paused: no offer");
    let (status, v) = f.c.call("POST", &format!("/api/v1/rollouts/{id}/pause"), None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    f.c.ok("POST", &format!("/api/v1/rollouts/{id}/resume"), None).await;
    assert!(f.sync(&canary, &half).await.update.is_some(), "resumed: offered again");

    // The canary goes through trial to success: the next wave is offered.
    for state in [OtaState::Verifying, OtaState::Installing] {
        f.sync(&canary, &report(state, "1.1.0", 100_000, 100_000, 0)).await;
    }
    let mut trial = report(OtaState::Trial, "1.1.0", 0, 0, 0);
    trial.firmware = "1.1.0".into();
    assert!(f.sync(&canary, &trial).await.update.is_none(), "no offer to a device in trial");
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(
        (device(&r, &canary)["state"].as_str(), r["current_wave"].as_i64()),
        (Some("trial"), Some(0))
    );
    let mut done = report(OtaState::Succeeded, "1.1.0", 0, 0, 0);
    done.firmware = "1.1.0".into();
    f.sync(&canary, &done).await;
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(r["current_wave"], 1, "{r}");
    assert_eq!(device(&r, &canary)["running"], "1.1.0");
    for n in &rest {
        assert!(f.sync(n, &idle()).await.update.is_some(), "{n} is offered in wave 2");
    }

    // One failure in three is within 50%; two are not: the rollout aborts and
    // the third device is cancelled.
    let bad_sig = report(OtaState::Failed, "1.1.0", 0, 100_000, ota_reason::BAD_SIGNATURE);
    f.sync(&rest[0], &bad_sig).await;
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(r["state"], "running");
    assert_eq!(device(&r, &rest[0])["reason"], "bad_signature");
    let rolled = report(OtaState::RolledBack, "1.1.0", 0, 0, ota_reason::HEALTH_CHECK);
    f.sync(&rest[1], &rolled).await;
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(r["state"], "aborted", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("failure threshold"), "{r}");
    assert_eq!(device(&r, &rest[1])["state"], "rolled_back");
    assert_eq!(device(&r, &rest[2])["state"], "cancelled");
    assert!(f.sync(&rest[2], &idle()).await.update.is_none(), "aborted: no offer");
    assert_eq!(r["counts"]["succeeded"], 1);
    let (status, _) = f.c.call("POST", &format!("/api/v1/rollouts/{id}/resume"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = f.c.call("POST", &format!("/api/v1/rollouts/{id}/explode"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A percentage picks that share of the enabled devices; a device is in
    // one active rollout at a time.
    let fw2 = store_image(&f.c, "1.2.0", &image[..1000]).await;
    let r =
        f.c.ok("POST", "/api/v1/rollouts", Some(json!({"firmware_id": fw2, "percent": 50}))).await;
    assert_eq!(r["devices_total"], 2);
    let busy = r["devices"][0]["device"].as_str().unwrap().to_owned();
    let (status, v) =
        f.c.call("POST", "/api/v1/rollouts", Some(json!({"firmware_id": fw2, "devices": [busy]})))
            .await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    let r2 = f.c.ok("POST", &format!("/api/v1/rollouts/{}/abort", r["id"]), None).await;
    assert_eq!(r2["counts"]["cancelled"], 2);
    let list = f.c.ok("GET", "/api/v1/rollouts", None).await;
    assert_eq!(list["rollouts"].as_array().unwrap().len(), 2);
    let audit = f.c.ok("GET", "/api/v1/audit", None).await.to_string();
    for action in ["rollout.start", "rollout.pause", "rollout.resume", "rollout.abort"] {
        assert!(audit.contains(action), "{action} audited");
    }
}

#[tokio::test]
async fn rollout_waves_threshold_and_downloads_on_sqlite() {
    rollout_goes_wave_by_wave_and_aborts_past_its_threshold(TempDb::sqlite()).await;
}

#[tokio::test]
async fn rollout_waves_threshold_and_downloads_on_postgresql() {
    let Some(db) = TempDb::postgres().await else {
        eprintln!("PostgreSQL part skipped: ECOWATT_TEST_PG_URL is not set");
        return;
    };
    rollout_goes_wave_by_wave_and_aborts_past_its_threshold(db).await;
}

/// An encrypted rollout: offered with the delivery extension only to a device
/// that takes it (the other fails `encryption_unsupported`, which counts
/// toward the threshold), downloaded as the sealed chunk stream only that
/// device's key opens, by any range, and refused to another device.
async fn encrypted_rollout_reaches_only_devices_that_decrypt(db: TempDb) {
    use ecowatt_proto::delivery::{DEFAULT_CHUNK_LOG2, Delivery, TAG_LEN};
    use ecowatt_proto::messages::DELIVERY_ENCRYPTED;
    let c = Client::start(&db, false).await;
    let mut devices = Vec::new();
    for name in ["new", "old"] {
        devices.push((name.to_owned(), Probe::provision(&c, name).await));
    }
    let key = devices[0].1.creds.key;
    let other = devices[1].1.creds.device_id;
    let mut f = Fleet { c, devices };
    let image: Vec<u8> = (0..50_000u32).map(|i| (i * 13 + i / 97) as u8).collect();
    let fw = store_image(&f.c, "1.1.0", &image).await;
    let (status, v) =
        f.c.call(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"firmware_id": fw, "devices": ["new"], "encrypted": "yes"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let r =
        f.c.ok(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"firmware_id": fw, "devices": ["new", "old"], "encrypted": true,
                        "failure_threshold_pct": 100})),
        )
        .await;
    assert_eq!(r["encrypted"], true);
    let id = r["id"].as_i64().unwrap();

    // A device that takes no encrypted images (protocol ≤ 1.3) is not offered it.
    let answer = f.sync("old", &idle()).await;
    assert!(answer.update.is_none() && answer.delivery.is_none(), "{answer:?}");
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(
        (device(&r, "old")["state"].as_str(), device(&r, "old")["reason"].as_str()),
        (Some("failed"), Some("encryption_unsupported")),
        "{r}"
    );

    // One that does is offered it with the chunk size.
    let takes = SyncRequest { delivery: Some(DELIVERY_ENCRYPTED), ..idle() };
    let answer = f.sync("new", &takes).await;
    let offer = answer.update.expect("an offer");
    assert_eq!(answer.delivery, Some(DEFAULT_CHUNK_LOG2));
    let token = ecowatt_proto::hex::encode_upper(&offer.token);
    let path = format!("/api/v1/device/firmware/{token}");
    let d = Delivery::new(&key, &offer.token, DEFAULT_CHUNK_LOG2, image.len() as u64);
    // Whole, and by chunks as the device asks: each opens with the device's key.
    let (status, stream) = get_range(&f.c, &path, "bytes=0-").await;
    assert_eq!((status, stream.len() as u64), (StatusCode::PARTIAL_CONTENT, d.stream_len()));
    let mut plain = Vec::new();
    for i in 0..d.chunks() {
        let from = d.stream_offset(i);
        let last = from + d.plain_len(i) + TAG_LEN as u64 - 1;
        let (status, mut chunk) = get_range(&f.c, &path, &format!("bytes={from}-{last}")).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(chunk, stream[from as usize..=last as usize]);
        d.open(i, &mut chunk).unwrap();
        plain.extend_from_slice(&chunk[..chunk.len() - TAG_LEN]);
    }
    assert_eq!(plain, image);
    // Another device's key does not open it; another device may not ask for it.
    let foreign = Delivery::new(&[0x33; 16], &offer.token, DEFAULT_CHUNK_LOG2, image.len() as u64);
    assert!(foreign.open(0, &mut stream[..4_096 + TAG_LEN].to_vec()).is_err());
    let (status, body) = get_range(&f.c, &format!("{path}?device={other}"), "bytes=0-").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&body).contains("image_for_another_device"));
    // A bad chunk reported by the device fails it with its reason.
    let failed = report(OtaState::Failed, "1.1.0", 8_192, 50_000, ota_reason::DECRYPT_FAILED);
    f.sync("new", &SyncRequest { delivery: Some(DELIVERY_ENCRYPTED), ..failed }).await;
    let r = f.c.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await;
    assert_eq!(device(&r, "new")["reason"], "decrypt_failed", "{r}");
    let audit = f.c.ok("GET", "/api/v1/audit", None).await.to_string();
    assert!(audit.contains("\"encrypted\":true"), "{audit}");
}

#[tokio::test]
async fn encrypted_rollouts_on_sqlite() {
    encrypted_rollout_reaches_only_devices_that_decrypt(TempDb::sqlite()).await;
}

#[tokio::test]
async fn encrypted_rollouts_on_postgresql() {
    let Some(db) = TempDb::postgres().await else {
        eprintln!("PostgreSQL part skipped: ECOWATT_TEST_PG_URL is not set");
        return;
    };
    encrypted_rollout_reaches_only_devices_that_decrypt(db).await;
}

/// The raw stored blob of image `id`.
async fn stored_blob(c: &Client, id: i64) -> Vec<u8> {
    use sqlx::Row;
    sqlx::query("SELECT data FROM firmware WHERE id = $1")
        .bind(id)
        .fetch_one(c.server.state.store.db().reader())
        .await
        .unwrap()
        .try_get("data")
        .unwrap()
}

/// Images are sealed at rest under the server's image key: the database holds
/// no plaintext, the API and devices get the image, images stored in clear
/// before are sealed at the next start, and a server with another key
/// refuses to start instead of serving nothing.
async fn images_are_encrypted_at_rest(db: TempDb) {
    use ecowatt_server::firmware::at_rest::MAGIC;
    let image: Vec<u8> = (0..30_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    // Stored by a process without the key (as before this release): in clear.
    let bare = ecowatt_server::store::Store::open(&db.url).await.unwrap();
    let fw = |version: &str| Firmware {
        id: 0,
        version: version.into(),
        target: "linux-x86_64".into(),
        size: image.len() as i64,
        sha256: ecowatt_proto::hex::encode_upper(&Sha256::digest(&image)),
        security_counter: 0,
        created_ms: 1,
        manifest: json!({}),
        uploaded_ms: 1,
        uploaded_by: "test".into(),
    };
    let old = bare.firmwares().add(&fw("1.0.0"), &image).await.unwrap().id;
    bare.close().await;

    let c = Client::start(&db, false).await;
    let key_file = c.server.data_dir.join("image.key");
    assert!(key_file.exists(), "the image key is made at the first start");
    let new = store_image(&c, "1.1.0", &image).await;
    for id in [old, new] {
        let blob = stored_blob(&c, id).await;
        assert!(blob.starts_with(MAGIC), "image {id} is sealed at rest");
        assert!(!blob.windows(32).any(|w| w == &image[1_000..1_032]), "plaintext in the database");
        let req = Request::get(format!("/api/v1/firmware/{id}/image"))
            .header("authorization", format!("Bearer {}", c.token))
            .body(Body::empty())
            .unwrap();
        let resp = app(c.server.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().to_vec(), image);
    }
    c.server.stop().await;

    // Another key in its place: the server does not start, and says what to do.
    std::fs::write(&key_file, "11".repeat(32)).unwrap();
    let settings =
        ecowatt_server::settings::Settings::resolve(ecowatt_server::settings::SettingsFile {
            data_dir: Some(db.dir.path().to_path_buf()),
            database: Some(db.url.clone()),
            ..Default::default()
        })
        .unwrap();
    let err = ecowatt_server::run::prepare(settings).await.err().expect("refused to start");
    assert!(err.to_string().contains("image_key_file"), "{err}");
    db.cleanup().await;
}

#[tokio::test]
async fn images_at_rest_on_sqlite() {
    images_are_encrypted_at_rest(TempDb::sqlite()).await;
}

#[tokio::test]
async fn images_at_rest_on_postgresql() {
    let Some(db) = TempDb::postgres().await else {
        eprintln!("PostgreSQL part skipped: ECOWATT_TEST_PG_URL is not set");
        return;
    };
    images_are_encrypted_at_rest(db).await;
}
