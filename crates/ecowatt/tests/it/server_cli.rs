//! The operator commands against a real server, as an operator uses them.

use std::process::{Command, Output, Stdio};

use ecowatt_testkit::server::{TempDb, TestServer};
use serde_json::{Value, json};

fn ecowatt(server: &TestServer, dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(args)
        .env("ECOWATT_SERVER", &server.url)
        .env("ECOWATT_DATA_DIR", &server.data_dir)
        .env_remove("ECOWATT_TOKEN")
        .current_dir(dir)
        .output()
        .expect("run ecowatt")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What an original-firmware device does on the legacy API.
fn legacy(server: &TestServer, path: &str, body: Value) -> Value {
    ureq::post(format!("{}{path}", server.url))
        .send_json(&body)
        .expect("legacy call")
        .body_mut()
        .read_json()
        .expect("JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_adds_a_device_configures_it_and_commands_it() {
    let db = TempDb::sqlite();
    let server = TestServer::start(&db, true).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let s = tokio::task::spawn_blocking(move || {
        let out =
            stdout(&ecowatt(&server, &dir, &["device", "add", "roof-1", "--rated-power", "5kW"]));
        assert!(out.contains("roof-1.provision.json"), "{out}");
        let prov: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("roof-1.provision.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(prov["key"].as_str().unwrap().len(), 32);
        assert_eq!(prov["server"], server.url.as_str());
        assert!(stdout(&ecowatt(&server, &dir, &["device", "list"])).contains("roof-1"));

        let out = stdout(&ecowatt(
            &server,
            &dir,
            &["config", "set", "roof-1", "--poll", "10s", "--upload", "15m"],
        ));
        assert!(out.contains("version 2"), "{out}");
        let bad = ecowatt(&server, &dir, &["config", "set", "roof-1", "--poll", "1ms"]);
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("field poll_interval_ms"));
        let out = stdout(&ecowatt(&server, &dir, &["config", "show", "roof-1"]));
        assert!(out.contains("\"poll_interval_ms\":10000"), "{out}");

        let refused = ecowatt(&server, &dir, &["command", "roof-1", "set-power-percentage", "150"]);
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("150 is outside 0..=100"));

        // `--wait` prints the outcome once the device reports it.
        let waiting = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args([
                "command",
                "roof-1",
                "set-power-percentage",
                "50",
                "--wait",
                "--wait-timeout",
                "20s",
            ])
            .env("ECOWATT_SERVER", &server.url)
            .env("ECOWATT_DATA_DIR", &server.data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut delivered = Value::Null;
        for _ in 0..200 {
            delivered = legacy(&server, "/command/poll", json!({"device_id": "roof-1"}));
            if !delivered["command"].is_null() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let id = delivered["command"]["command_id"]
            .as_str()
            .expect("the device got the command")
            .to_owned();
        // The device takes a while; `--wait` follows with long polls, not a
        // request every 250 ms.
        std::thread::sleep(std::time::Duration::from_millis(1_500));
        legacy(
            &server,
            "/command/result",
            json!({"command_id": id, "status": "completed", "result": "Power set to 50%"}),
        );
        let out = waiting.wait_with_output().unwrap();
        let text = stdout(&out);
        assert!(text.contains("succeeded") && text.contains("Power set to 50%"), "{text}");
        assert!(text.contains("  delivered\n"), "each status as it happens: {text}");
        let metrics = ureq::get(format!("{}/metrics", server.url))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let gets: u64 = metrics
            .lines()
            .filter(|l| l.contains(r#"method="GET",route="/api/v1/commands/{id}""#))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert!(
            (1..=3).contains(&gets),
            "--wait asked {gets} times over 1.5 s (a long poll per status)"
        );

        // A bare number is no power: `5` would have limited the inverter to 0 %.
        let bare = ecowatt(&server, &dir, &["command", "roof-1", "set-power", "5"]);
        assert!(!bare.status.success());
        let err = String::from_utf8_lossy(&bare.stderr);
        assert!(err.contains("has no unit") && err.contains("2.5kW"), "{err}");
        let pct = ecowatt(&server, &dir, &["command", "roof-1", "set-power", "5%"]);
        assert!(String::from_utf8_lossy(&pct.stderr).contains("set-power-percentage 5"));
        let out = stdout(&ecowatt(&server, &dir, &["command", "roof-1", "set-power", "2.5kW"]));
        assert!(out.contains("queued"), "{out}");

        // Output to a reader that has gone ends quietly (`... | head -1`, `| true`).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let closed = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args(["commands", "list"])
            .env("ECOWATT_SERVER", &server.url)
            .env("ECOWATT_DATA_DIR", &server.data_dir)
            .stdout(writer)
            .output()
            .unwrap();
        assert_eq!(closed.status.code(), Some(0), "{closed:?}");
        assert!(closed.stderr.is_empty(), "{}", String::from_utf8_lossy(&closed.stderr));

        let csv = stdout(&ecowatt(&server, &dir, &["commands", "export", "--format", "csv"]));
        assert_eq!(csv.lines().count(), 3, "the header, 50 % and 2.5 kW: {csv}");
        let stats = stdout(&ecowatt(&server, &dir, &["commands", "stats"]));
        assert!(stats.contains("\"success_rate\": 100.0"), "{stats}");
        let audit = stdout(&ecowatt(&server, &dir, &["audit"]));
        assert!(
            audit.contains("command.queue")
                && audit.contains("config.set")
                && audit.contains("device.add"),
            "{audit}"
        );

        // A viewer token reads but cannot change.
        let token =
            stdout(&ecowatt(&server, &dir, &["token", "create", "dash", "--role", "viewer"]))
                .trim()
                .to_owned();
        let as_viewer = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_ecowatt"))
                .args(args)
                .env("ECOWATT_SERVER", &server.url)
                .env("ECOWATT_TOKEN", &token)
                .output()
                .unwrap()
        };
        assert!(as_viewer(&["device", "list"]).status.success());
        let denied = as_viewer(&["device", "remove", "roof-1"]);
        assert!(String::from_utf8_lossy(&denied.stderr).contains("forbidden"));
        server
    })
    .await
    .unwrap();
    s.stop().await;
}

#[test]
fn the_server_command_reads_a_toml_file_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("ecowatt.toml");
    std::fs::write(
        &config,
        format!(
            "bind = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["server", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let mut healthy = false;
    for _ in 0..100 {
        if ureq::get(&url).call().is_ok_and(|r| r.status() == 200) {
            healthy = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(healthy, "server did not come up");
    assert!(
        dir.path().join("data/ecowatt.db").exists() && dir.path().join("data/admin.token").exists()
    );
    Command::new("sh").args(["-c", &format!("kill -INT {}", child.id())]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "bind = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["server", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_admin_token_is_recovered_on_the_servers_machine() {
    let db = TempDb::sqlite();
    let server = TestServer::start(&db, false).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let server = tokio::task::spawn_blocking(move || {
        // The only admin token is lost.
        std::fs::remove_file(server.data_dir.join("admin.token")).unwrap();
        let locked_out = ecowatt(&server, &dir, &["device", "list"]);
        assert!(!locked_out.status.success());
        // Without --local, creating a token needs one.
        let refused = ecowatt(&server, &dir, &["token", "create", "rescue", "--role", "admin"]);
        assert!(!refused.status.success());
        let token = stdout(&ecowatt(
            &server,
            &dir,
            &["token", "create", "rescue", "--role", "admin", "--local"],
        ));
        let token = token.trim();
        assert!(token.starts_with("ewt_"), "{token}");
        let listed = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args(["token", "list", "--token", token])
            .env("ECOWATT_SERVER", &server.url)
            .current_dir(&dir)
            .output()
            .unwrap();
        let listed = stdout(&listed);
        assert!(listed.contains("rescue") && listed.contains("admin"), "{listed}");
        // It never makes a store where there was none.
        let nowhere = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args(["token", "create", "x", "--local", "--data-dir"])
            .arg(dir.join("no-such-dir"))
            .output()
            .unwrap();
        assert!(!nowhere.status.success());
        assert!(String::from_utf8_lossy(&nowhere.stderr).contains("no store at"));
        assert!(!dir.join("no-such-dir").exists());
        server
    })
    .await
    .unwrap();
    let audit = server.state.operators.audit(None, 10).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "token.create" && e.actor.starts_with("local:")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_servers_sqlite_store_is_backed_up_and_the_copy_opens() {
    let db = TempDb::sqlite();
    let server = TestServer::start(&db, false).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let url = db.url.clone();
    let server = tokio::task::spawn_blocking(move || {
        stdout(&ecowatt(&server, &dir, &["device", "add", "before"]));
        let backup = |out: &str| {
            Command::new(env!("CARGO_BIN_EXE_ecowatt"))
                .args(["backup", "--out", out, "--database", &url])
                .current_dir(&dir)
                .output()
                .unwrap()
        };
        let text = stdout(&backup("copy.db"));
        assert!(text.contains("Backed up") && text.contains("copy.db"), "{text}");
        // The server goes on; what it writes after is not in the copy.
        stdout(&ecowatt(&server, &dir, &["device", "add", "after"]));
        let again = backup("copy.db");
        assert!(!again.status.success(), "never overwritten");
        assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
        let pg = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args(["backup", "--out", "x.db", "--database", "postgres://u:secret@db/ecowatt"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&pg.stderr);
        assert!(err.contains("pg_dump") && !err.contains("secret"), "{err}");
        (server, dir)
    })
    .await
    .unwrap();
    let (server, dir) = server;
    server.stop().await;
    // The copy is a whole store: a server opens it and finds what it held.
    let copy = ecowatt_server::db::sqlite_url(&dir.join("copy.db"));
    let store = ecowatt_server::store::Store::open(&copy).await.unwrap();
    let names: Vec<String> =
        store.devices().list().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["before"]);
    store.close().await;
}
