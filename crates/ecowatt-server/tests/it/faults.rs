//! Faults of the machine under the server: a full disk, a database that is
//! missing, empty, cut short or not a database, and the last admin token.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ecowatt_server::store::Store;
use ecowatt_testkit::server::{TempDb, TestServer};
use serde_json::json;

use crate::api::Client;

#[tokio::test]
async fn a_write_connection_left_in_a_failed_transaction_is_replaced() {
    let db = TempDb::sqlite();
    let store = Store::open(&db.url).await.unwrap();
    ecowatt_server::registration::register(&store.devices(), "a", 10_000, "00", "t", 0)
        .await
        .unwrap();
    store.db().wedge_writer_like_a_full_disk().await.unwrap();
    // Before: "attempted to call begin_with at non-zero transaction depth" on
    // every write until a restart.
    ecowatt_server::registration::register(&store.devices(), "b", 10_000, "00", "t", 0)
        .await
        .expect("writes work again");
    store.writable().await.expect("and the store says so");
    assert_eq!(store.devices().list().await.unwrap().len(), 2);
    store.close().await;
}

/// Mounts a small tmpfs (needs root; says so and returns `None` without it).
fn small_disk(dir: &std::path::Path, size: &str) -> Option<()> {
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "note: cannot mount a tmpfs here (not root?): the real full-disk part is skipped"
        );
    }
    ok.then_some(())
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_says_unhealthy_and_recovers_when_space_returns() {
    let db = TempDb::sqlite();
    let disk = db.dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    if small_disk(&disk, "4m").is_none() {
        return;
    }
    let _unmount = Unmount(disk.clone());
    let db = TempDb::sqlite_in(&disk);
    let c = Client::start(&db, false).await;
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "before"}))).await;
    let (status, _) = c.raw("GET", "/healthz", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    // Fill the disk.
    let filler = disk.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 8 << 20]);
    let mut refused = 0;
    for i in 0..50 {
        let (status, v) =
            c.call("POST", "/api/v1/devices", Some(json!({"name": format!("full-{i}")}))).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(v["error"]["code"], "storage_unavailable");
            refused += 1;
        }
    }
    assert!(refused > 0, "the disk never filled");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, text) = c.raw("GET", "/healthz", None, None, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    // Space comes back: writes and health follow without a restart.
    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    loop {
        let (status, _) = c
            .call(
                "POST",
                "/api/v1/devices",
                Some(json!({"name": format!("after-{}", started.elapsed().as_millis())})),
            )
            .await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "writes did not recover: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = c.raw("GET", "/healthz", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    let devices = c.ok("GET", "/api/v1/devices", None).await;
    assert!(
        devices["devices"].as_array().unwrap().iter().any(|d| d["name"] == "before"),
        "{devices}"
    );
    c.server.stop().await;
}

#[tokio::test]
async fn a_database_gone_or_empty_under_a_used_data_directory_is_refused_not_started_empty() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    c.ok("POST", "/api/v1/devices", Some(json!({"name": "kept"}))).await;
    let token = c.server.admin_token.clone();
    c.server.stop().await;
    let file = db.dir.path().join("ecowatt.db");
    // The store is in the main file and its write-ahead log: keep both.
    let wal = db.dir.path().join("ecowatt.db-wal");
    // A pool connection may still be closing (and checkpointing the log into
    // the main file) just after the stop: take the two files once they hold
    // still, so that the copy is one state of the store, not two.
    let snapshot = || (std::fs::read(&file).unwrap(), std::fs::read(&wal).ok());
    let (mut saved, mut saved_wal) = snapshot();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let again = snapshot();
        if again == (saved.clone(), saved_wal.clone()) {
            break;
        }
        (saved, saved_wal) = again;
    }
    for (what, bytes) in [("missing", None), ("empty", Some(Vec::new()))] {
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(db.dir.path().join("ecowatt.db-wal"));
        let _ = std::fs::remove_file(db.dir.path().join("ecowatt.db-shm"));
        if let Some(b) = &bytes {
            std::fs::write(&file, b).unwrap();
        }
        let err = ecowatt_server::run::prepare(settings(&db)).await.err().expect(what);
        let text = err.to_string();
        assert!(text.contains("missing or empty") && text.contains("restore"), "{what}: {text}");
        let kept = std::fs::read_to_string(db.dir.path().join("admin.token")).unwrap();
        assert_eq!(kept.trim(), token, "{what}: admin.token was overwritten");
    }
    // Cut short, or not a database: refused at once, saying what is wrong.
    for (what, bytes, says) in [
        ("truncated", saved[..saved.len() / 2].to_vec(), "truncated"),
        ("garbage", vec![0x42; saved.len()], "not a SQLite database"),
    ] {
        std::fs::write(&file, &bytes).unwrap();
        let started = Instant::now();
        let err = ecowatt_server::run::prepare(settings(&db)).await.err().expect(what);
        assert!(err.to_string().contains(says), "{what}: {err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{what}: {:?}", started.elapsed());
    }
    // The real files back: everything is there.
    std::fs::write(&file, &saved).unwrap();
    if let Some(w) = &saved_wal {
        std::fs::write(&wal, w).unwrap();
    }
    let server = TestServer::start(&db, false).await;
    assert_eq!(server.state.devices.get("kept").await.unwrap().name, "kept");
    server.stop().await;
}

fn settings(db: &TempDb) -> ecowatt_server::settings::Settings {
    ecowatt_server::settings::Settings::resolve(ecowatt_server::settings::SettingsFile {
        data_dir: Some(db.dir.path().to_path_buf()),
        database: Some(db.url.clone()),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn the_last_admin_token_cannot_be_revoked() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let tokens = c.ok("GET", "/api/v1/tokens", None).await;
    let admin = tokens["tokens"][0]["id"].as_i64().unwrap();
    let (status, v) = c.call("DELETE", &format!("/api/v1/tokens/{admin}"), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("last_admin_token"))
    );
    // With a second admin, the first can go, and then the second cannot.
    let second =
        c.ok("POST", "/api/v1/tokens", Some(json!({"name": "ops", "role": "admin"}))).await;
    c.ok("DELETE", &format!("/api/v1/tokens/{admin}"), None).await;
    let secret = second["token"].as_str().unwrap();
    let id = second["info"]["id"].as_i64().unwrap();
    let (status, v) =
        c.call_as(Some(secret), "DELETE", &format!("/api/v1/tokens/{id}"), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("last_admin_token"))
    );
    c.server.stop().await;
}
