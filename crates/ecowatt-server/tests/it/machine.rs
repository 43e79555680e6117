//! The server against the device as it runs: the core's device machine
//! (`ecowatt_core::machine`, what the Linux agent and the ESP32-C3 firmware
//! drive), carried out in process over the router. What the protocol probe
//! of `protocol.rs` sends by hand (reports, results, control) comes here
//! from the machine itself: config applied, a leased limit executed and
//! read back, a curtailment confirmed, samples uploaded.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ecowatt_core::kv::MemoryKv;
use ecowatt_core::link::Outcome;
use ecowatt_core::machine::{Action, Device, Event, Failure, Settings};
use ecowatt_core::ota::{FlashError, Slot, Slots};
use ecowatt_core::session::Credentials;
use ecowatt_proto::firmware::Version;
use ecowatt_proto::modbus::{Exception, ExceptionCode, Request as Modbus, Response};
use ecowatt_server::api::{AppState, app};
use ecowatt_testkit::server::TempDb;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::api::Client;

/// This device has no image slots (updates are the agent tests' concern).
struct NoSlots;

impl Slots for NoSlots {
    fn erase(&mut self, _: Slot) -> Result<(), FlashError> {
        Err(FlashError("no slots".into()))
    }
    fn write(&mut self, _: Slot, _: u64, _: &[u8]) -> Result<(), FlashError> {
        Err(FlashError("no slots".into()))
    }
    fn read(&mut self, _: Slot, _: u64, _: &mut [u8]) -> Result<(), FlashError> {
        Err(FlashError("no slots".into()))
    }
}

/// The machine, an inverter of ten registers, and the server it talks to.
struct MachineDevice {
    device: Device<MemoryKv, NoSlots>,
    regs: [u16; 10],
    state: AppState,
}

fn now() -> u64 {
    ecowatt_formats::time::now_ms() as u64
}

impl MachineDevice {
    fn boot(p: &Value, state: AppState) -> Self {
        MachineDevice::boot_with(p, state, ecowatt_proto::codec::SUPPORTED)
    }

    /// A device that may upload with these codecs (a bit set).
    fn boot_with(p: &Value, state: AppState, codecs: u8) -> Self {
        let creds = Credentials {
            device_id: p["device_id"].as_u64().unwrap() as u32,
            key: ecowatt_proto::hex::decode(p["key"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap(),
            key_version: 1,
        };
        let mut settings = Settings::new(Version::parse("1.0.0").unwrap(), "test");
        settings.long_poll_ms = 300;
        settings.batch_max = 5;
        settings.codecs = codecs;
        let device = Device::boot(MemoryKv::new(), NoSlots, creds, settings, now()).unwrap();
        MachineDevice { device, regs: [2300, 50, 2400, 48, 5000, 2310, 30, 450, 100, 1500], state }
    }

    /// A device added through the API, tagged `tag`, with a fail-safe of
    /// 40 %, its machine booted from its provisioning.
    async fn added(c: &Client, name: &str, tag: &str) -> Self {
        let body = json!({"name": name, "tags": [tag], "failsafe": 40});
        let added = c.ok("POST", "/api/v1/devices", Some(body)).await;
        MachineDevice::boot(&added["provisioning"], c.server.state.clone())
    }

    fn inverter(&mut self, request: &Modbus) -> Outcome {
        match *request {
            Modbus::ReadHoldingRegisters { start, quantity } => {
                match self.regs.get(start as usize..(start + quantity) as usize) {
                    Some(v) => Ok(Ok(Response::ReadHoldingRegisters(v.to_vec()))),
                    None => {
                        Ok(Err(Exception { function: 3, code: ExceptionCode::IllegalDataAddress }))
                    }
                }
            }
            Modbus::WriteSingleRegister { address: 8, value } if value <= 100 => {
                self.regs[8] = value;
                Ok(Ok(Response::WriteSingleRegister { address: 8, value }))
            }
            Modbus::WriteSingleRegister { .. } => {
                Ok(Err(Exception { function: 6, code: ExceptionCode::IllegalDataAddress }))
            }
        }
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, Failure> {
        let req = Request::post(path)
            .header("content-type", "application/octet-stream")
            .body(Body::from(body))
            .unwrap();
        let resp = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        if status == StatusCode::OK {
            Ok(bytes)
        } else {
            Err(Failure {
                status: Some(status.as_u16()),
                message: String::from_utf8_lossy(&bytes).into(),
            })
        }
    }

    /// Runs in real time (the server's clocks are real) until `done` holds
    /// on the server's API, for at most `limit`.
    async fn run_until(&mut self, c: &Client, limit: Duration, done: impl AsyncCheck) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if done.check(c).await {
                return true;
            }
            // What the machine asks for now (answers may bring more: those
            // wait for the next round, after the check).
            let actions: Vec<Action> = std::iter::from_fn(|| self.device.poll_action()).collect();
            for action in actions {
                let event = match action {
                    Action::Inverter { request, .. } => Event::Inverter(self.inverter(&request)),
                    Action::Post { channel, body, .. } => {
                        Event::Server { channel, answer: self.post(channel.path(), body).await }
                    }
                    Action::Fetch { .. } => Event::Chunk(Err(Failure::unreachable("no slots"))),
                    Action::Restart | Action::Note(_) => continue,
                };
                self.device.handle(now(), event);
            }
            let wake = self.device.next_wakeup().saturating_sub(now()).min(50);
            tokio::time::sleep(Duration::from_millis(wake)).await;
            self.device.handle(now(), Event::Tick);
        }
        done.check(c).await
    }
}

/// A condition read from the operator API.
trait AsyncCheck {
    async fn check(&self, c: &Client) -> bool;
}

struct Get<F: Fn(&Value) -> bool>(String, F);

impl<F: Fn(&Value) -> bool> AsyncCheck for Get<F> {
    async fn check(&self, c: &Client) -> bool {
        (self.1)(&c.ok("GET", &self.0, None).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_machine_applies_config_holds_a_leased_limit_and_confirms_a_curtailment() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut dev = MachineDevice::added(&c, "m1", "feeder-1").await;
    let within = Duration::from_secs(20);

    // Its first sync: the server's config is applied and reported, with its control.
    let reported = Get("/api/v1/devices/m1/config".into(), |v: &Value| v["reported_version"] == 1);
    assert!(dev.run_until(&c, within, reported).await, "config v1 reported");
    let control =
        Get("/api/v1/devices/m1/control".into(), |v: &Value| v["reported"]["failsafe"] == 40);
    assert!(dev.run_until(&c, within, control).await, "the fail-safe reached the device");

    // A config change, applied by the machine.
    c.ok("PATCH", "/api/v1/devices/m1/config", Some(json!({"poll_interval_ms": 1000}))).await;
    let v2 = Get("/api/v1/devices/m1/config".into(), |v: &Value| v["reported_version"] == 2);
    assert!(dev.run_until(&c, within, v2).await, "config v2 applied");

    // A leased limit: executed, read back, held under its lease.
    let cmd = c
        .ok(
            "POST",
            "/api/v1/devices/m1/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 30}, "lease_s": 120})),
        )
        .await;
    let path = format!("/api/v1/commands/{}", cmd["id"]);
    let done =
        Get(path.clone(), |v: &Value| v["status"] == "succeeded" || v["status"] == "confirmed");
    assert!(dev.run_until(&c, within, done).await, "the command succeeded");
    assert_eq!(dev.regs[8], 30);
    assert_eq!(c.ok("GET", &path, None).await["result_value"], 30);
    let leased = Get("/api/v1/devices/m1/control".into(), |v: &Value| {
        v["reported"]["lease"]["limit_pct"] == 30 && v["reported"]["lease"]["lapsed"] == false
    });
    assert!(dev.run_until(&c, within, leased).await, "the device holds the lease");

    // A curtailment of its group, confirmed by read-back.
    let cur = c
        .ok("POST", "/api/v1/curtailments", Some(json!({"group": "feeder-1", "percent": 15})))
        .await;
    let path = format!("/api/v1/curtailments/{}", cur["id"]);
    let settled = Get(path.clone(), |v: &Value| v["progress"]["settled"] == true);
    assert!(dev.run_until(&c, within, settled).await, "the curtailment settled");
    assert_eq!(c.ok("GET", &path, None).await["progress"]["confirmed"], 1);
    assert_eq!(dev.regs[8], 15);

    // And its samples reached the store.
    let stored = Get("/api/v1/devices/m1/latest".into(), |v: &Value| !v["sample"].is_null());
    assert!(dev.run_until(&c, within, stored).await, "samples uploaded");
    c.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_machine_runs_its_schedule_and_a_release_returns_to_it() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut dev = MachineDevice::added(&c, "m2", "feeder-2").await;
    let within = Duration::from_secs(20);
    let path = "/api/v1/devices/m2/schedule".to_string();

    // A schedule whose entry is in force all day: the machine takes the plan and writes it.
    let plan = json!({"timezone": "Europe/Berlin", "entries": ["daily 00:00-24:00 25%"]});
    c.ok("PUT", &path, Some(plan)).await;
    let following = Get(path.clone(), |v: &Value| {
        v["in_sync"] == true
            && v["reported"]["state"] == "following"
            && v["reported"]["last_step"]["confirmed"] == true
    });
    assert!(dev.run_until(&c, within, following).await, "the schedule runs");
    assert_eq!(dev.regs[8], 25);
    let shown = c.ok("GET", &path, None).await;
    assert_eq!(shown["reported"]["limit_pct"], 25);
    assert_eq!(shown["active"]["entry"], "daily 00:00-24:00 25%");

    // A curtailment (leased) wins over it...
    let cur = c
        .ok("POST", "/api/v1/curtailments", Some(json!({"group": "feeder-2", "percent": 10})))
        .await;
    let leased = Get(path.clone(), |v: &Value| v["reported"]["state"] == "lease");
    assert!(dev.run_until(&c, within, leased).await, "the curtailment's lease holds");
    assert_eq!(dev.regs[8], 10);
    // ...and its release returns to the schedule's 25 %, not to 100 %.
    let rel = c.ok("POST", &format!("/api/v1/curtailments/{}/release", cur["id"]), None).await;
    let released = Get(format!("/api/v1/curtailments/{}", rel["id"]), |v: &Value| {
        v["progress"]["settled"] == true
    });
    assert!(dev.run_until(&c, within, released).await, "the release settled");
    assert_eq!(dev.regs[8], 25);
    let following = Get(path.clone(), |v: &Value| v["reported"]["state"] == "following");
    assert!(dev.run_until(&c, within, following).await, "back on the schedule");

    // Cleared: the device runs no schedule (the limit stays where it is).
    c.ok("DELETE", &path, None).await;
    let none =
        Get(path.clone(), |v: &Value| v["in_sync"] == true && v["reported"]["state"] == "none");
    assert!(dev.run_until(&c, within, none).await, "the schedule is cleared on the device");
    assert_eq!(dev.regs[8], 25);
    c.server.stop().await;
}

/// The codecs of `device`'s stored batches, in order.
async fn stored_codecs(c: &Client, device: &str) -> Vec<i64> {
    let batches = c.server.state.telemetry.range(device, 0, i64::MAX).await.unwrap();
    batches.iter().map(|b| b.codec).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_device_and_a_v2_device_upload_side_by_side_and_read_the_same() {
    use ecowatt_proto::codec::{CODEC_V1, CODEC_V2};
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let add = |name: &'static str| {
        let c = &c;
        async move {
            let added = c.ok("POST", "/api/v1/devices", Some(json!({"name": name}))).await;
            fast(c, name).await;
            added
        }
    };
    let old = add("old").await;
    let new = add("new").await;
    let state = c.server.state.clone();
    let mut old = MachineDevice::boot_with(&old["provisioning"], state.clone(), 1 << CODEC_V1);
    let mut new = MachineDevice::boot_with(&new["provisioning"], state, codec_all());
    let within = Duration::from_secs(40);
    for (name, dev) in [("old", &mut old), ("new", &mut new)] {
        let ten = Get(format!("/api/v1/devices/{name}/telemetry"), |v: &Value| {
            v["samples"].as_u64().is_some_and(|n| n >= 12)
        });
        assert!(dev.run_until(&c, within, ten).await, "{name}: samples stored");
    }
    assert_eq!(old.device.codec_in_use(), CODEC_V1);
    assert_eq!(new.device.codec_in_use(), CODEC_V2);
    let (o, n) = (stored_codecs(&c, "old").await, stored_codecs(&c, "new").await);
    // Both devices' samples, in full.
    assert!(o.iter().all(|x| *x == 1), "the v1 device's batches: {o:?}");
    assert!(n.contains(&2), "the v2 device's batches: {n:?}");
    // Read back alike: the same inverter, the same readings.
    for name in ["old", "new"] {
        let latest = c.ok("GET", &format!("/api/v1/devices/{name}/latest"), None).await;
        let raw: Vec<u64> = latest["sample"]["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["raw"].as_u64().unwrap())
            .collect();
        assert_eq!(raw, [2300, 50, 2400, 48, 5000, 2310, 30, 450, 100, 1500], "{name}: {latest}");
    }
    c.server.stop().await;
}

/// Samples every second (batches of five go when full).
async fn fast(c: &Client, name: &str) {
    let quick = json!({"poll_interval_ms": 1000, "upload_interval_ms": 10_000});
    c.ok("PATCH", &format!("/api/v1/devices/{name}/config"), Some(quick)).await;
}

fn codec_all() -> u8 {
    ecowatt_proto::codec::SUPPORTED
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_offers_v1_only_keeps_a_v2_device_on_v1() {
    let db = TempDb::sqlite();
    let file = ecowatt_server::settings::SettingsFile {
        telemetry_codecs: Some(vec![1]),
        ..Default::default()
    };
    let c = Client::start_tuned(&db, file).await;
    let added = c.ok("POST", "/api/v1/devices", Some(json!({"name": "d"}))).await;
    fast(&c, "d").await;
    let mut dev = MachineDevice::boot(&added["provisioning"], c.server.state.clone());
    let stored = Get("/api/v1/devices/d/telemetry".into(), |v: &Value| {
        v["samples"].as_u64().is_some_and(|n| n >= 12)
    });
    assert!(dev.run_until(&c, Duration::from_secs(40), stored).await, "samples stored");
    assert_eq!(dev.device.codec_in_use(), ecowatt_proto::codec::CODEC_V1);
    assert!(stored_codecs(&c, "d").await.iter().all(|x| *x == 1));
    c.server.stop().await;
}
