//! Two `ecowatt server` processes on one PostgreSQL database: commands queued
//! through both, delivered through both to one device and answered through
//! both. Nothing lost, no id duplicated, every result recorded once.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(database: &str, data_dir: &std::path::Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args([
            "server",
            "--legacy-api",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--database",
            database,
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while ureq::get(format!("{url}/healthz")).call().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, url }
}

fn post(url: &str, path: &str, token: Option<&str>, body: Value) -> Value {
    let mut req = ureq::post(format!("{url}{path}")).config().http_status_as_error(false).build();
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.send_json(body).unwrap();
    let status = resp.status();
    let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn two_server_processes_share_one_postgresql_without_losing_or_duplicating() {
    let Some(db) = ecowatt_testkit::server::TempDb::postgres().await else {
        eprintln!("note: ECOWATT_TEST_PG_URL is unset; PostgreSQL part skipped");
        return;
    };
    let url = db.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    tokio::task::spawn_blocking(move || {
        let a = start(&url, &a_dir);
        let b = start(&url, &b_dir);
        // The first start made one admin token; the second found tokens and made none.
        let token = std::fs::read_to_string(a_dir.join("admin.token")).unwrap().trim().to_owned();
        assert!(!b_dir.join("admin.token").exists(), "one database, one first start");
        post(&a.url, "/api/v1/devices", Some(&token), json!({"name": "shared"}));

        let servers = [a.url.clone(), b.url.clone()];
        // Operators queue through both servers at once.
        let queued: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let (servers, token) = (&servers, &token);
                    s.spawn(move || {
                        (0..15)
                            .map(|i| {
                                let v = post(
                                    &servers[(t + i) % 2],
                                    "/api/v1/devices/shared/commands",
                                    Some(token),
                                    json!({"type": "set_power_percentage", "parameters": {"percentage": i}}),
                                );
                                v["id"].as_u64().unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<u64> = queued.iter().copied().collect();
        assert_eq!(unique.len(), 60, "no duplicated id");

        // The device polls both servers alternately and reports each result to the other one.
        let mut done = HashSet::new();
        let t0 = Instant::now();
        let mut turn = 0;
        while done.len() < 60 {
            assert!(t0.elapsed() < Duration::from_secs(60), "only {} of 60 delivered", done.len());
            let v = post(&servers[turn % 2], "/command/poll", None, json!({"device_id": "shared"}));
            turn += 1;
            let Some(id) = v["command"]["command_id"].as_str() else { continue };
            let n: u64 = id.split('_').nth(1).unwrap().parse().unwrap();
            assert!(done.insert(n), "command {n} delivered twice before its result");
            post(&servers[turn % 2], "/command/result", None, json!({"command_id": id, "status": "completed", "result": "ok"}));
            // A repeated report is recorded once.
            post(&servers[(turn + 1) % 2], "/command/result", None, json!({"command_id": id, "status": "failed", "result": "late"}));
        }
        assert_eq!(done, unique, "every command delivered");
        let stats = ureq::get(format!("{}/api/v1/commands/statistics?device=shared", servers[1]))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .body_mut()
            .read_json::<Value>()
            .unwrap();
        assert_eq!(stats["statistics"]["by_status"]["succeeded"], 60, "{stats}");
        assert_eq!(stats["statistics"]["by_status"]["failed"], 0, "the late reports changed nothing");

        // The legacy hot requests are answered from memory on each server
        // (nothing to tell), and a change made through the other server
        // reaches them (its NOTIFY outdates the copies).
        for server in &servers {
            assert!(post(server, "/command/poll", None, json!({"device_id": "shared"}))["command"].is_null());
            let v = post(server, "/changes", None, json!({"device_id": "shared"}));
            assert_eq!(v["Changed"], false);
        }
        let queued = post(&servers[0], "/api/v1/devices/shared/commands", Some(&token),
            json!({"type": "set_power_percentage", "parameters": {"percentage": 77}}));
        post(&servers[0], "/config/update", None, json!({"device_id": "shared", "poll_frequency": 12}));
        let t0 = Instant::now();
        let (mut delivered, mut flagged) = (false, false);
        while !(delivered && flagged) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the other server's copies stayed stale");
            if !delivered {
                let v = post(&servers[1], "/command/poll", None, json!({"device_id": "shared"}));
                if let Some(id) = v["command"]["command_id"].as_str() {
                    assert_eq!(id.split('_').nth(1).unwrap(), queued["id"].to_string());
                    delivered = true;
                }
            }
            if !flagged {
                let v = post(&servers[1], "/changes", None, json!({"device_id": "shared"}));
                flagged = v["Changed"] == true && v["newPollTimer"] == 12;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop((a, b));
    })
    .await
    .unwrap();
    db.cleanup().await;
}
