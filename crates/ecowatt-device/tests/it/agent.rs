//! The device agent end to end, in one process: simulator, server and agent on
//! loopback, with short intervals (1 s polls, small batches) on an agent clock
//! that runs [`SPEED`] times as fast as real time.

use std::path::Path;
use std::time::{Duration, Instant};

use ecowatt_device::agent::{self, AgentOptions, Provisioning};
use ecowatt_testkit::TestSim;
use ecowatt_testkit::server::{TempDb, TestServer};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Op {
    pub url: String,
    pub token: String,
}

impl Op {
    pub fn of(server: &TestServer) -> Op {
        Op { url: server.url.clone(), token: server.admin_token.clone() }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (url, token, method, path) =
            (self.url.clone(), self.token.clone(), method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let full = format!("{url}{path}");
            let auth = format!("Bearer {token}");
            let mut resp = match (method.as_str(), body) {
                ("GET", _) => agent.get(&full).header("Authorization", &auth).call(),
                ("PATCH", Some(b)) => {
                    agent.patch(&full).header("Authorization", &auth).send_json(&b)
                }
                (_, Some(b)) => agent.post(&full).header("Authorization", &auth).send_json(&b),
                (_, None) => agent.post(&full).header("Authorization", &auth).send_empty(),
            }
            .expect("server reachable");
            let status = resp.status();
            let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
            assert!(status.is_success(), "{method} {path} -> {status} {v}");
            v
        })
        .await
        .unwrap()
    }

    pub async fn until(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.call("GET", path, None).await;
            if ok(&v) {
                return v;
            }
            assert!(t0.elapsed() < timeout, "waited {timeout:?} for {what}; last: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A device agent running in this process until stopped.
pub struct Running {
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<agent::Stopped>,
}

/// Runs an agent with `opts` until [`Running::stop`].
pub fn start(opts: AgentOptions) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        agent::run(opts, async {
            let _ = stopped.await;
        })
        .await
        .expect("agent runs")
    });
    Running { stop, task }
}

impl Running {
    /// Stops it and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// How much faster than real time the agents' clocks run.
pub const SPEED: u32 = 5;

fn start_agent(p: &Provisioning, sim: &TestSim, state: &Path) -> Running {
    let mut opts = AgentOptions::new(p.clone(), sim.http_url(), state.to_path_buf());
    opts.batch_max = 3;
    opts.long_poll_ms = 2_000;
    opts.clock = std::sync::Arc::new(ecowatt_device::clock::FastClock::new(SPEED));
    start(opts)
}

pub async fn provision(op: &Op, name: &str) -> Provisioning {
    let v = op
        .call("POST", "/api/v1/devices", Some(json!({"name": name, "rated_power_w": 10000})))
        .await;
    op.call(
        "PATCH",
        &format!("/api/v1/devices/{name}/config"),
        Some(json!({"poll_interval_ms": 1000, "upload_interval_ms": 10000})),
    )
    .await;
    serde_json::from_value(v["provisioning"].clone()).unwrap()
}

fn complete(v: &Value, at_least: u64) -> bool {
    v["received"].as_u64().unwrap_or(0) >= at_least && v["missing"] == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn telemetry_arrives_and_a_command_is_executed_confirmed_and_followed() {
    let sim = TestSim::start(1).await;
    let db = TempDb::sqlite();
    let server = TestServer::start(&db, false).await;
    let op = Op::of(&server);
    let p = provision(&op, "roof-1").await;
    let state = db.dir.path().join("device");
    let agent = start_agent(&p, &sim, &state);

    op.until(
        "/api/v1/devices/roof-1/config",
        "the config to be applied",
        Duration::from_secs(20),
        |v| v["reported_version"] == 2,
    )
    .await;
    op.until("/api/v1/devices/roof-1/completeness", "6 samples", Duration::from_secs(30), |v| {
        complete(v, 6)
    })
    .await;

    let cmd = op
        .call(
            "POST",
            "/api/v1/devices/roof-1/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 30}})),
        )
        .await;
    let id = cmd["id"].as_i64().unwrap();
    let done = op
        .until(
            &format!("/api/v1/commands/{id}"),
            "the command to be confirmed",
            Duration::from_secs(30),
            |v| v["status"] == "confirmed",
        )
        .await;
    assert_eq!(done["result_value"], 30, "read back from the inverter");
    assert_eq!(sim.limit_pct(0x11), 30, "register 8 in the simulator");
    let latest = op
        .until(
            "/api/v1/devices/roof-1/latest",
            "a reading after the limit",
            Duration::from_secs(20),
            |v| v["sample"]["readings"][8]["raw"] == 30,
        )
        .await;
    let pac = latest["sample"]["readings"][9]["value"].as_f64().unwrap();
    assert!(pac <= 3_000.0, "AC power follows the 30 % limit: {pac} W");

    // An invalid command is refused when queued, and nothing reaches the device.
    let (url, token) = (server.url.clone(), server.admin_token.clone());
    let status = tokio::task::spawn_blocking(move || {
        ureq::post(format!("{url}/api/v1/devices/roof-1/commands"))
            .header("Authorization", &format!("Bearer {token}"))
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(json!({"type": "set_power_percentage", "parameters": {"percentage": 130}}))
            .unwrap()
            .status()
            .as_u16()
    })
    .await
    .unwrap();
    assert_eq!(status, 400);

    // The agent's fast clock stamps samples ahead of the server's: name the range.
    let to = ecowatt_formats::time::now_ms() + 86_400_000;
    let data = op
        .call(
            "GET",
            &format!("/api/v1/devices/roof-1/telemetry?registers=Pac,Pow&to_ms={to}"),
            None,
        )
        .await;
    assert!(data["points"].as_array().unwrap().len() >= 6);
    assert_eq!(data["registers"][0]["name"], "Pac");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_while_the_server_is_down_or_the_device_restarts() {
    let sim = TestSim::start(1).await;
    let db = TempDb::sqlite();
    let server = TestServer::start(&db, false).await;
    let addr = server.addr.to_string();
    let op = Op::of(&server);
    let p = provision(&op, "roof-2").await;
    let state = db.dir.path().join("device");
    let agent = start_agent(&p, &sim, &state);
    op.until(
        "/api/v1/devices/roof-2/completeness",
        "first samples",
        Duration::from_secs(30),
        |v| complete(v, 3),
    )
    .await;

    // The server goes away; the device keeps sampling (for 10 s of its time).
    server.stop().await;
    tokio::time::sleep(Duration::from_secs(10) / SPEED).await;
    // A command is queued while the device cannot reach us... once the server is back.
    let server = TestServer::start_on(&db, false, &addr).await;
    let op = Op::of(&server);
    let cmd = op
        .call(
            "POST",
            "/api/v1/devices/roof-2/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 55}})),
        )
        .await;
    let id = cmd["id"].as_i64().unwrap();
    let after_outage = op
        .until("/api/v1/devices/roof-2/completeness", "the backlog", Duration::from_secs(40), |v| {
            complete(v, 12)
        })
        .await;
    assert_eq!(after_outage["dropped_reported"], 0);

    // The device restarts with samples still unsent.
    agent.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = op.call("GET", "/api/v1/devices/roof-2/completeness", None).await["last_seq"]
        .as_u64()
        .unwrap();
    let agent = start_agent(&p, &sim, &state);
    let v = op
        .until(
            "/api/v1/devices/roof-2/completeness",
            "samples after the restart",
            Duration::from_secs(40),
            |v| v["last_seq"].as_u64().unwrap_or(0) > before + 3,
        )
        .await;
    assert_eq!(v["missing"], 0, "no gap after a restart: {v}");
    // The backlog resent after the outage and the restart overlapped what was
    // stored: every sample is stored once (the telemetry query merges by
    // `seq`, so only the stored counts can show a duplicate).
    assert_eq!(v["duplicates"], 0, "no sample stored twice: {v}");

    // The command queued during the outage ran exactly once, and the config
    // survived the restart.
    let c = op
        .until(&format!("/api/v1/commands/{id}"), "the command", Duration::from_secs(30), |v| {
            v["status"] == "confirmed" || v["status"] == "succeeded"
        })
        .await;
    assert_eq!(sim.limit_pct(0x11), 55);
    assert_eq!(
        sim.limit_writes(0x11).iter().filter(|&&w| w == 55).count(),
        1,
        "the inverter was written once, whatever the redeliveries ({} deliveries)",
        c["delivery_count"]
    );
    let shadow = op.call("GET", "/api/v1/devices/roof-2/config", None).await;
    assert_eq!(shadow["reported"]["poll_interval_ms"], 1000);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_cut_short_by_a_restart_is_reported_as_the_inverter_holds_it() {
    use ecowatt_core::control::Journal;
    use ecowatt_proto::messages::Operation;
    let sim = TestSim::start(1).await;
    let db = TempDb::sqlite();
    let server = TestServer::start(&db, false).await;
    let op = Op::of(&server);
    let p = provision(&op, "roof-1").await;
    let state = db.dir.path().join("device");
    // Two commands were executing when the device lost power: one whose
    // write reached the inverter, one whose write did not. Each restart finds
    // one of them in flight.
    for (i, pct) in [37u16, 64].into_iter().enumerate() {
        let v = op
            .call(
                "POST",
                "/api/v1/devices/roof-1/commands",
                Some(json!({"type": "set_power_percentage", "parameters": {"percentage": pct}})),
            )
            .await;
        let id = &v["id"].as_u64().unwrap();
        {
            let mut kv = ecowatt_device::filekv::FileKv::open(&state).unwrap();
            let mut j = Journal::load(&mut kv).unwrap();
            assert!(j.begin(&mut kv, *id, Operation::Write { register: 8, value: pct }).unwrap());
        }
        if i == 0 {
            sim.set_limit(0x11, 37); // the write went through before the cut
        }
        let agent = start_agent(&p, &sim, &state);
        let path = format!("/api/v1/commands/{id}");
        let done = op
            .until(&path, "the interrupted command's result", Duration::from_secs(20), |v| {
                v["status"] != "queued" && v["status"] != "delivered"
            })
            .await;
        agent.stop().await;
        if i == 0 {
            // Succeeded, and maybe already confirmed by an uploaded reading.
            let status = done["status"].as_str();
            assert!(matches!(status, Some("succeeded" | "confirmed")), "{done}");
            assert_eq!(done["result_value"].as_u64(), Some(37), "{done}");
        } else {
            assert_eq!(done["status"], "failed", "{done}");
            assert_eq!(done["result_value"], 37, "{done}");
            assert!(done["result_message"].as_str().unwrap().contains("reads 37"), "{done}");
        }
    }
    assert_eq!(sim.limit_pct(0x11), 37, "neither command ran after the restart");
    server.stop().await;
}
