//! Grid-safe export control through the router: fail-safes and tags, leases
//! on export limits, the control extension of the sync (orders out, state
//! and episodes in), curtailments of a group with their progress and
//! release, and bad input refused with stable codes and nothing queued.
//! Run on SQLite and (when configured) PostgreSQL.

use ecowatt_proto::messages::{
    CommandResult, ControlReport, Episode, EpisodeKind, EpisodeOutcome, LeaseState, RampState,
    ScheduleReport, SyncRequest, failsafe,
};
use ecowatt_testkit::server::TempDb;
use serde_json::{Value, json};

use crate::api::Client;
use crate::protocol::Probe;

fn control(fs: u16, lease: Option<LeaseState>, episodes: Vec<Episode>) -> SyncRequest {
    SyncRequest {
        firmware: "1.0.0".into(),
        control: Some(ControlReport { failsafe: fs, lease, ramp: None, episodes }),
        ..Default::default()
    }
}

fn succeeded(id: u64, value: u16) -> CommandResult {
    CommandResult {
        command_id: id,
        succeeded: true,
        exception: None,
        value: Some(value),
        executed_ms: 1,
    }
}

async fn refused(c: &Client, method: &str, path: &str, body: Value) -> (u16, String, Value) {
    let (status, v) = c.call(method, path, Some(body)).await;
    (
        status.as_u16(),
        v["error"]["code"].as_str().unwrap_or("").to_owned(),
        v["error"]["field"].clone(),
    )
}

async fn commands_total(c: &Client) -> usize {
    c.ok("GET", "/api/v1/commands", None).await["commands"].as_array().unwrap().len()
}

async fn export_control(db: TempDb) {
    let c = Client::start(&db, false).await;
    let state = c.server.state.clone();
    let mut devs = Vec::new();
    for n in ["f1", "f2", "f3", "old"] {
        devs.push(Probe::provision(&c, n).await);
    }

    // Bad input: clear errors with stable codes, nothing queued.
    let none =
        json!({"type": "set_power_percentage", "parameters": {"percentage": 30}, "lease_s": 900});
    assert_eq!(
        refused(&c, "POST", "/api/v1/devices/f1/commands", none).await.1,
        "failsafe_not_configured",
        "a lease needs a fail-safe"
    );
    for (body, field) in
        [(json!({"failsafe": 101}), "failsafe"), (json!({"failsafe": "sometimes"}), "failsafe")]
    {
        let r = refused(&c, "PUT", "/api/v1/devices/f1/failsafe", body).await;
        assert_eq!((r.0, r.1.as_str(), r.2.as_str()), (400, "invalid_field", Some(field)));
    }
    for n in ["f1", "f2", "f3"] {
        c.ok("PUT", &format!("/api/v1/devices/{n}/failsafe"), Some(json!({"failsafe": 40}))).await;
        c.ok("PUT", &format!("/api/v1/devices/{n}/tags"), Some(json!({"tags": ["feeder-7"]})))
            .await;
    }
    c.ok("PUT", "/api/v1/devices/old/tags", Some(json!({"tags": ["feeder-8"]}))).await;
    let r = refused(&c, "PUT", "/api/v1/devices/old/tags", json!({"tags": ["a b"]})).await;
    assert_eq!((r.0, r.1.as_str()), (400, "invalid_field"));
    for (body, code, field) in [
        (
            json!({"type": "set_power_percentage", "parameters": {"percentage": 30}, "lease_s": 0}),
            "invalid_field",
            "lease_s",
        ),
        (
            json!({"type": "set_power_percentage", "parameters": {"percentage": 30}, "lease_s": 99_999_999}),
            "invalid_field",
            "lease_s",
        ),
        (
            json!({"type": "read_register", "parameters": {"register_address": 8}, "lease_s": 900}),
            "invalid_field",
            "lease_s",
        ),
        (
            json!({"type": "set_power_percentage", "parameters": {"percentage": 130}, "lease_s": 900}),
            "invalid_field",
            "percentage",
        ),
    ] {
        let r = refused(&c, "POST", "/api/v1/devices/f1/commands", body).await;
        assert_eq!((r.1.as_str(), r.2.as_str()), (code, Some(field)));
    }
    for (body, code) in [
        (json!({"group": "nobody", "percent": 30}), "group_empty"),
        (json!({"group": "feeder-8", "percent": 30}), "failsafe_not_configured"),
        (json!({"group": "feeder-7", "percent": 101}), "invalid_field"),
        (json!({"group": "feeder-7", "percent": 30, "lease_s": 0}), "invalid_field"),
        (json!({"group": "feeder-7", "percent": 30, "lease_s": 30 * 86_400}), "invalid_field"),
        (json!({"group": "bad group", "percent": 30}), "invalid_field"),
    ] {
        assert_eq!(
            refused(&c, "POST", "/api/v1/curtailments", body.clone()).await.1,
            code,
            "{body}"
        );
    }
    assert_eq!(commands_total(&c).await, 0, "nothing was queued");

    // A device that reports control gets its fail-safe, and a leased limit with its lease.
    let resp = devs[0].sync(&state, &control(failsafe::UNSET, None, vec![])).await.unwrap();
    assert_eq!(resp.control.unwrap().failsafe, Some(40));
    let cmd = c
        .ok("POST", "/api/v1/devices/f1/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 30}, "lease_s": 120})))
        .await;
    assert_eq!(cmd["lease_ms"], 120_000);
    let id = cmd["id"].as_u64().unwrap();
    let resp = devs[0].sync(&state, &control(40, None, vec![])).await.unwrap();
    let orders = resp.control.unwrap();
    assert_eq!((orders.failsafe, orders.commands.len()), (None, 1));
    assert_eq!((orders.commands[0].command_id, orders.commands[0].lease_ms), (id, 120_000));
    // Without a lease given, a limit to a device with a fail-safe gets the default.
    let dflt = c
        .ok(
            "POST",
            "/api/v1/devices/f1/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 35}})),
        )
        .await;
    assert_eq!(dflt["lease_ms"], 900_000);
    c.ok("POST", &format!("/api/v1/commands/{}/cancel", dflt["id"]), None).await;

    // Its state and episodes are stored, each episode once.
    let lease = LeaseState { command_id: id, value: 30, lapsed: true };
    let episode = Episode {
        kind: EpisodeKind::FailSafe,
        command_id: id,
        at_ms: 1_800_000_000_000,
        value: 40,
        outcome: EpisodeOutcome::Confirmed,
    };
    let mut report = control(40, Some(lease), vec![episode]);
    report.results = vec![succeeded(id, 30)];
    devs[0].sync(&state, &report).await.unwrap();
    devs[0].sync(&state, &control(40, Some(lease), vec![episode])).await.unwrap();
    let shown = c.ok("GET", "/api/v1/devices/f1/control", None).await;
    assert_eq!(shown["failsafe"], 40);
    assert_eq!(shown["tags"], json!(["feeder-7"]));
    assert_eq!(shown["reported"]["lease"]["lapsed"], true);
    assert_eq!(shown["episodes"].as_array().unwrap().len(), 1, "{shown}");
    assert_eq!(shown["episodes"][0]["kind"], "failsafe");

    // A device whose firmware has no control cannot hold a lease: the
    // command fails with why, never confirmed.
    c.ok("PUT", "/api/v1/devices/old/failsafe", Some(json!({"failsafe": "hold"}))).await;
    let leased = c
        .ok(
            "POST",
            "/api/v1/devices/old/commands",
            Some(json!({"type": "set_power_percentage", "parameters": {"percentage": 30}})),
        )
        .await;
    let plain = SyncRequest { firmware: "0.9.0".into(), ..Default::default() };
    let resp = devs[3].sync(&state, &plain).await.unwrap();
    assert!(resp.commands.is_empty() && resp.control.is_none(), "{resp:?}");
    let cmd = c.ok("GET", &format!("/api/v1/commands/{}", leased["id"]), None).await;
    assert_eq!(cmd["status"], "failed");
    assert!(cmd["result_message"].as_str().unwrap().contains("cannot hold a leased limit"));

    // A curtailment of the group: one request, progress as devices confirm.
    let cur = c
        .ok(
            "POST",
            "/api/v1/curtailments",
            Some(json!({"group": "feeder-7", "percent": 20, "lease_s": 600})),
        )
        .await;
    let cid = cur["id"].as_i64().unwrap();
    assert_eq!(
        (cur["progress"]["devices"].as_i64(), cur["lease_ms"].as_i64()),
        (Some(3), Some(600_000))
    );
    assert_eq!(cur["progress"]["settled"], false);
    // f3 has never been heard from: offline; f1 and f2 online.
    let p = &cur["progress"];
    assert_eq!((p["pending"].as_i64(), p["offline"].as_i64()), (Some(1), Some(2)), "{p}");
    let r1 = devs[0].sync(&state, &control(40, None, vec![])).await.unwrap();
    let r2 = devs[1].sync(&state, &control(40, None, vec![])).await.unwrap();
    for r in [&r1, &r2] {
        assert_eq!(r.commands.len(), 1);
        assert_eq!(r.control.as_ref().unwrap().commands[0].lease_ms, 600_000);
    }
    let mut ok = control(40, None, vec![]);
    ok.results = vec![succeeded(r1.commands[0].id, 20)];
    devs[0].sync(&state, &ok).await.unwrap();
    // f2's inverter reads back another value: failed, never confirmed.
    let mut bad = control(40, None, vec![]);
    bad.results = vec![CommandResult { succeeded: false, ..succeeded(r2.commands[0].id, 55) }];
    devs[1].sync(&state, &bad).await.unwrap();
    let cur = c.ok("GET", &format!("/api/v1/curtailments/{cid}"), None).await;
    let p = &cur["progress"];
    assert_eq!(
        (p["confirmed"].as_i64(), p["failed"].as_i64(), p["offline"].as_i64()),
        (Some(1), Some(1), Some(1)),
        "{cur}"
    );
    assert!(p["confirm_p50_ms"].as_i64().is_some());
    assert_eq!(cur["failures"][0]["device"], "f2");
    assert!(cur["failures"][0]["reason"].as_str().unwrap().contains("reads 55"));

    // Release: one action; what was still waiting is cancelled.
    let rel = c.ok("POST", &format!("/api/v1/curtailments/{cid}/release"), None).await;
    assert_eq!((rel["percent"].as_i64(), rel["releases"].as_i64()), (Some(100), Some(cid)));
    assert!(rel["lease_ms"].is_null());
    assert_eq!(
        refused(&c, "POST", &format!("/api/v1/curtailments/{cid}/release"), json!(null)).await.1,
        "already_released"
    );
    let r1 = devs[0].sync(&state, &control(40, None, vec![])).await.unwrap();
    assert_eq!(r1.commands.len(), 1);
    assert!(r1.control.unwrap().commands.is_empty(), "a release holds no lease");
    let list = c.ok("GET", "/api/v1/curtailments", None).await;
    assert_eq!(list["curtailments"].as_array().unwrap().len(), 2);
    let audit = c.ok("GET", "/api/v1/audit", None).await;
    let actions: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for a in ["curtailment.start", "curtailment.release", "device.failsafe", "device.tags"] {
        assert!(actions.contains(&a), "{a} audited: {actions:?}");
    }
    c.server.stop().await;
}

async fn ramps(db: TempDb) {
    let c = Client::start(&db, false).await;
    let state = c.server.state.clone();
    let mut dev = Probe::provision(&c, "r1").await;
    let cmd = |extra: Value| {
        let mut b = json!({"type": "set_power_percentage", "parameters": {"percentage": 30}});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    for bad in [json!(0), json!(200), json!("fast"), json!(-1)] {
        let r = refused(&c, "PUT", "/api/v1/devices/r1/ramp", json!({"ramp_pct_per_s": bad})).await;
        assert_eq!(r.0, 400, "{bad}");
    }
    for (body, field) in [
        (cmd(json!({"ramp_pct_per_s": 0})), "ramp_pct_per_s"),
        (cmd(json!({"ramp_pct_per_s": 101})), "ramp_pct_per_s"),
        (
            json!({"type": "read_register", "parameters": {"register_address": 8}, "ramp_pct_per_s": 1}),
            "ramp_pct_per_s",
        ),
    ] {
        let r = refused(&c, "POST", "/api/v1/devices/r1/commands", body).await;
        assert_eq!((r.0, r.1.as_str(), r.2.as_str()), (400, "invalid_field", Some(field)));
    }
    assert_eq!(commands_total(&c).await, 0);
    // The device's default, and a rate given with the command.
    let shown = c.ok("PUT", "/api/v1/devices/r1/ramp", Some(json!({"ramp_pct_per_s": 2.5}))).await;
    assert_eq!(shown["ramp_pct_per_s"], 2.5);
    let a = c.ok("POST", "/api/v1/devices/r1/commands", Some(cmd(json!({})))).await;
    let b =
        c.ok("POST", "/api/v1/devices/r1/commands", Some(cmd(json!({"ramp_pct_per_s": 1})))).await;
    assert_eq!(
        (a["ramp_pct_per_s"].as_f64(), b["ramp_pct_per_s"].as_f64()),
        (Some(2.5), Some(1.0))
    );
    assert!(a["lease_ms"].is_null(), "no fail-safe: not leased");
    let resp = dev.sync(&state, &control(failsafe::UNSET, None, vec![])).await.unwrap();
    let orders = resp.control.unwrap().commands;
    let rate = |id: &Value| {
        orders.iter().find(|o| o.command_id == id.as_u64().unwrap()).unwrap().ramp_centi_pct_per_s
    };
    assert_eq!((rate(&a["id"]), rate(&b["id"])), (250, 100));
    // Progress the device reports is shown.
    let mut report = control(failsafe::UNSET, None, vec![]);
    report.control.as_mut().unwrap().ramp =
        Some(RampState { command_id: a["id"].as_u64().unwrap(), value: 80, target: 30 });
    dev.sync(&state, &report).await.unwrap();
    let shown = c.ok("GET", "/api/v1/devices/r1/control", None).await;
    assert_eq!(shown["reported"]["ramp"]["limit_pct"], 80);
    assert_eq!(shown["reported"]["ramp"]["target_pct"], 30);
    // A curtailment's rate (or each device's default).
    c.ok("PUT", "/api/v1/devices/r1/failsafe", Some(json!({"failsafe": 0}))).await;
    c.ok("PUT", "/api/v1/devices/r1/tags", Some(json!({"tags": ["g"]}))).await;
    let bad = json!({"group": "g", "percent": 10, "ramp_pct_per_s": 500});
    assert_eq!(refused(&c, "POST", "/api/v1/curtailments", bad).await.1, "invalid_field");
    c.ok(
        "POST",
        "/api/v1/curtailments",
        Some(json!({"group": "g", "percent": 10, "ramp_pct_per_s": 5})),
    )
    .await;
    c.ok("POST", "/api/v1/curtailments", Some(json!({"group": "g", "percent": 20}))).await;
    let resp = dev.sync(&state, &control(0, None, vec![])).await.unwrap();
    let rates: Vec<u16> =
        resp.control.unwrap().commands.iter().map(|o| o.ramp_centi_pct_per_s).collect();
    assert!(rates.ends_with(&[500, 250]), "{rates:?}");
    c.server.stop().await;
}

fn scheduled(version: u64, until_ms: u64) -> SyncRequest {
    SyncRequest {
        schedule: Some(ScheduleReport { version, until_ms, ..Default::default() }),
        ..control(40, None, vec![])
    }
}

async fn schedules(db: TempDb) {
    let c = Client::start(&db, false).await;
    let state = c.server.state.clone();
    let mut dev = Probe::provision(&c, "s1").await;
    let mut old = Probe::provision(&c, "s-old").await;
    let plan = json!({"timezone": "Europe/Berlin", "entries": ["mon-fri 11:00-14:00 0%", "sat,sun 10:00-16:00 30%"]});

    // Bad input: its own code and field, nothing stored.
    for (body, code, field) in [
        (json!({"timezone": "Mars/Olympus", "entries": []}), "unknown_timezone", "timezone"),
        (
            json!({"timezone": "UTC", "entries": ["mon-fri 11:00-14:00 0%", "fri 13:00-15:00 50%"]}),
            "schedule_overlap",
            "entries[1]",
        ),
        (
            json!({"timezone": "UTC", "entries": ["mon 14:00-11:00 0%"]}),
            "schedule_time_invalid",
            "entries[0]",
        ),
        (
            json!({"timezone": "UTC", "entries": ["mon 11:00-14:00 120%"]}),
            "schedule_limit_invalid",
            "entries[0]",
        ),
        (
            json!({"timezone": "UTC", "entries": ["moonday 11:00-14:00 0%"]}),
            "schedule_days_invalid",
            "entries[0]",
        ),
        (json!({"timezone": "UTC", "schedule": []}), "schedule_invalid", "schedule"),
    ] {
        let r = refused(&c, "PUT", "/api/v1/devices/s1/schedule", body).await;
        assert_eq!((r.0, r.1.as_str(), r.2.as_str()), (400, code, Some(field)));
    }
    let shown = c.ok("GET", "/api/v1/devices/s1/schedule", None).await;
    assert_eq!((shown["version"].clone(), shown["schedule"].clone()), (json!(0), Value::Null));
    let r = refused(&c, "PUT", "/api/v1/groups/nobody/schedule", plan.clone()).await;
    assert_eq!((r.0, r.1.as_str()), (409, "group_empty"));

    // Set: version 1, shown with the entry in force and the next changes;
    // the same schedule again is the same version.
    let shown = c.ok("PUT", "/api/v1/devices/s1/schedule", Some(plan.clone())).await;
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["schedule"]["entries"][0], "mon-fri 11:00-14:00 0%");
    assert!(
        shown["active"]["limit_pct"].is_number() && shown["next"].as_array().unwrap().len() == 6
    );
    assert!(shown["reported"].is_null(), "not reported yet");
    let again = c.ok("PUT", "/api/v1/devices/s1/schedule", Some(plan.clone())).await;
    assert_eq!(again["version"], 1);

    // The device reporting another version is sent the compiled plan...
    let now = ecowatt_formats::time::now_ms() as u64;
    let resp = dev.sync(&state, &scheduled(0, 0)).await.unwrap();
    let p = resp.schedule.unwrap().plan.unwrap();
    assert_eq!(p.version, 1);
    assert!(p.from_ms <= now && p.until_ms >= now + 13 * 86_400_000);
    assert!(p.steps.len() >= 20, "two weeks of weekdays and weekends");
    // ...one running it hears nothing more until its horizon nears...
    let resp = dev.sync(&state, &scheduled(1, p.until_ms)).await.unwrap();
    assert_eq!(resp.schedule, None);
    let shown = c.ok("GET", "/api/v1/devices/s1/schedule", None).await;
    assert_eq!(
        (shown["in_sync"].clone(), shown["reported"]["version"].clone()),
        (json!(true), json!(1))
    );
    // ...then it is sent the same version further ahead.
    let resp = dev.sync(&state, &scheduled(1, now + 86_400_000)).await.unwrap();
    let refreshed = resp.schedule.unwrap().plan.unwrap();
    assert_eq!(refreshed.version, 1);
    assert!(refreshed.until_ms > now + 86_400_000);
    // A device whose firmware cannot run schedules is sent none.
    let resp = old.sync(&state, &control(40, None, vec![])).await.unwrap();
    assert_eq!(resp.schedule, None);
    assert!(c.ok("GET", "/api/v1/devices/s-old/schedule", None).await["reported"].is_null());

    // A group: every enabled member, one new version each; clearing is a version too.
    for n in ["s1", "s-old"] {
        c.ok("PUT", &format!("/api/v1/devices/{n}/tags"), Some(json!({"tags": ["site-3"]}))).await;
    }
    let utc = json!({"timezone": "UTC", "default_pct": 80, "entries": [{"days": "daily", "start": "00:00", "end": "24:00", "limit_pct": 25}]});
    let set = c.ok("PUT", "/api/v1/groups/site-3/schedule", Some(utc)).await;
    assert_eq!(set["devices"], 2);
    let shown = c.ok("GET", "/api/v1/devices/s1/schedule", None).await;
    assert_eq!(
        (shown["version"].clone(), shown["active"]["limit_pct"].clone()),
        (json!(2), json!(25))
    );
    assert_eq!(shown["active"]["entry"], "daily 00:00-24:00 25%");
    let resp = dev.sync(&state, &scheduled(1, now + 10 * 86_400_000)).await.unwrap();
    let p = resp.schedule.unwrap().plan.unwrap();
    assert_eq!((p.version, p.steps[0].value), (2, 25));
    c.ok("DELETE", "/api/v1/groups/site-3/schedule", None).await;
    let shown = c.ok("GET", "/api/v1/devices/s1/schedule", None).await;
    assert_eq!((shown["version"].clone(), shown["schedule"].clone()), (json!(3), Value::Null));
    let resp = dev.sync(&state, &scheduled(2, now + 10 * 86_400_000)).await.unwrap();
    let p = resp.schedule.unwrap().plan.unwrap();
    assert_eq!((p.version, p.steps.len()), (3, 0), "a plan without steps: no schedule");
    let resp = dev.sync(&state, &scheduled(3, u64::MAX)).await.unwrap();
    assert_eq!(resp.schedule, None, "a cleared schedule is never refreshed");

    // A release (and a resume) returns to the schedule: marked in the
    // answer, never leased.
    for n in ["s1", "s-old"] {
        c.ok("PUT", &format!("/api/v1/devices/{n}/failsafe"), Some(json!({"failsafe": 40}))).await;
    }
    let cur =
        c.ok("POST", "/api/v1/curtailments", Some(json!({"group": "site-3", "percent": 10}))).await;
    let rel = c.ok("POST", &format!("/api/v1/curtailments/{}/release", cur["id"]), None).await;
    let resume = c.ok("POST", "/api/v1/devices/s1/schedule/resume", None).await;
    assert!(resume["lease_ms"].is_null() && resume["resume"] == true);
    let resp = dev.sync(&state, &scheduled(3, u64::MAX)).await.unwrap();
    let ids: Vec<u64> = resp.commands.iter().map(|c| c.id).collect();
    let orders = resp.schedule.unwrap();
    assert_eq!(orders.resume.len(), 2, "the release's command and the resume");
    assert!(orders.resume.iter().all(|id| ids.contains(id)));
    let leased: Vec<u64> = resp
        .control
        .unwrap()
        .commands
        .iter()
        .filter(|o| o.lease_ms > 0)
        .map(|o| o.command_id)
        .collect();
    assert!(orders.resume.iter().all(|id| !leased.contains(id)));
    assert_eq!(rel["releases"], cur["id"]);
    c.server.stop().await;
}

#[tokio::test]
async fn schedules_on_sqlite() {
    schedules(TempDb::sqlite()).await;
}

#[tokio::test]
async fn schedules_on_postgresql() {
    if let Some(db) = TempDb::postgres().await {
        schedules(db).await;
    }
}

#[tokio::test]
async fn ramps_on_sqlite() {
    ramps(TempDb::sqlite()).await;
}

#[tokio::test]
async fn ramps_on_postgresql() {
    let Some(db) = TempDb::postgres().await else {
        eprintln!("PostgreSQL part skipped: ECOWATT_TEST_PG_URL is not set");
        return;
    };
    ramps(db).await;
}

#[tokio::test]
async fn export_control_on_sqlite() {
    export_control(TempDb::sqlite()).await;
}

#[tokio::test]
async fn export_control_on_postgresql() {
    let Some(db) = TempDb::postgres().await else {
        eprintln!("PostgreSQL part skipped: ECOWATT_TEST_PG_URL is not set");
        return;
    };
    export_control(db).await;
}
