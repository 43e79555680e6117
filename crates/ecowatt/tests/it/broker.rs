//! The device protocol over an MQTT broker, as an operator sets it up:
//! `ecowatt broker mosquitto` writes the per-device accounts and ACL from
//! the server's devices, a real Mosquitto runs with them, `ecowatt server
//! --device-broker` takes the devices' requests from it, and a device agent
//! with `--cloud mqtt://...` syncs, uploads and executes a command through
//! it. The broker keeps each device to its own topics; the server refuses
//! an envelope of another device on a device's topic.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ecowatt_formats::broker::{Answer, broker_password};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::cli::{Killed, free_port, ok, run, sim, wait_for};

/// `None` (the test is skipped) when Mosquitto is not installed, unless CI
/// requires it (`ECOWATT_TEST_MQTT_REQUIRED`).
fn mosquitto_installed() -> bool {
    let there = Command::new("mosquitto").arg("-h").output().is_ok();
    if !there {
        assert!(
            std::env::var_os("ECOWATT_TEST_MQTT_REQUIRED").is_none(),
            "mosquitto is not installed"
        );
        eprintln!("skipped: mosquitto is not installed");
    }
    there
}

/// Mosquitto with the files `ecowatt broker mosquitto` made in `d/broker`.
fn start_mosquitto(d: &Path, port: u16) -> Killed {
    let log = std::fs::File::create(d.join("mosquitto.log")).unwrap();
    let child = Command::new("mosquitto")
        .args(["-c", "broker/mosquitto.conf"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let child = Killed(child);
    let up = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let t0 = std::time::Instant::now();
    while !up() {
        let log = std::fs::read_to_string(d.join("mosquitto.log")).unwrap_or_default();
        assert!(t0.elapsed() < Duration::from_secs(10), "mosquitto did not listen: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn server(d: &Path, port: u16, extra: &[&str]) -> Killed {
    let bind = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["server", "--bind", &bind, "--data-dir", "data"])
        .args(extra)
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    wait_for("the server to listen", 20, up);
    Killed(child)
}

fn key_of(d: &Path, device: &str) -> ([u8; 16], u32) {
    let text = std::fs::read_to_string(d.join(format!("{device}.provision.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = ecowatt_proto::hex::decode(v["key"].as_str().unwrap()).unwrap();
    (key.try_into().unwrap(), v["device_id"].as_u64().unwrap() as u32)
}

/// A plain MQTT client as `user`; its events on a thread, kept.
fn client(port: u16, user: &str, password: &str) -> (Client, std::sync::mpsc::Receiver<Event>) {
    let id = format!("ewtest-{user}-{}", std::process::id());
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password);
    let (c, mut conn) = Client::new(o, 16);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for e in conn.iter() {
            let stop = e.is_err();
            if let Ok(e) = e
                && tx.send(e).is_err()
            {
                return;
            }
            if stop {
                return;
            }
        }
    });
    (c, rx)
}

/// The next event `f` picks within 10 s.
fn next<T>(
    rx: &std::sync::mpsc::Receiver<Event>,
    mut f: impl FnMut(Event) -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(e) => {
                if let Some(v) = f(e) {
                    return Some(v);
                }
            }
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn devices_speak_the_protocol_through_mosquitto_each_on_its_own_topics() {
    if !mosquitto_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let conn = ["--server", url.as_str(), "--data-dir", "data"];
    let cli = |args: &[&str]| ok(run(d, &[args, &conn[..]].concat()));

    // A server, a device, the broker's files from it.
    let first = server(d, port, &[]);
    cli(&["device", "add", "roof-1"]);
    let broker_port = free_port();
    let bp = broker_port.to_string();
    let made = cli(&["broker", "mosquitto", "--out", "broker", "--port", &bp]);
    assert!(made.contains("1 device(s)"), "{made}");
    let password = std::fs::read_to_string(d.join("broker/server-password")).unwrap();
    let passwd = std::fs::read_to_string(d.join("broker/passwd")).unwrap();
    assert!(passwd.starts_with("ecowatt-server:$7$101$") && passwd.contains("\nroof-1:$7$101$"));
    // Started as root, Mosquitto would run as its own user, who cannot read
    // the (owner-only) files.
    let mut conf = std::fs::read_to_string(d.join("broker/mosquitto.conf")).unwrap();
    conf.insert_str(0, "user root\n");
    std::fs::write(d.join("broker/mosquitto.conf"), conf).unwrap();
    let mosquitto = start_mosquitto(d, broker_port);
    drop(first);

    // The server again, now taking device requests from the broker too.
    let broker_url = format!("mqtt://ecowatt-server:{}@127.0.0.1:{broker_port}", password.trim());
    let _server = server(d, port, &["--device-broker", &broker_url]);
    let (_sim, inverter) = sim();
    let agent = |name: &str| {
        let cloud = format!("mqtt://127.0.0.1:{broker_port}");
        let child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args(["device", "--provision", &format!("{name}.provision.json")])
            .args(["--inverter", &inverter, "--state-dir", &format!("state-{name}")])
            .args(["--cloud", &cloud, "--batch-max", "2"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Killed(child)
    };
    let _roof1 = agent("roof-1");
    let online = |name: &str| cli(&["device", "show", name]).contains("online");
    wait_for("roof-1 to sync through the broker", 30, || online("roof-1"));
    // A command reaches it through its held sync and its result comes back.
    let done = cli(&["command", "roof-1", "set-power-percentage", "40", "--wait"]);
    assert!(done.contains("succeeded") || done.contains("confirmed"), "{done}");
    // Its samples arrive (uploads through the broker, a batch every 2 samples).
    let config = cli(&["config", "set", "roof-1", "--poll", "1s"]);
    assert!(!config.is_empty());
    wait_for("roof-1's samples", 30, || {
        cli(&["telemetry", "roof-1", "--csv"]).lines().count() >= 2
    });
    // Energy from the rollups written with them, in the site's time zone.
    cli(&["device", "timezone", "roof-1", "Europe/Berlin"]);
    let energy = cli(&["energy", "roof-1"]);
    assert!(energy.contains("(Europe/Berlin)") && energy.contains("kWh"), "{energy}");
    let fleet = cli(&["energy"]);
    assert!(fleet.starts_with("Fleet: 1 devices, 1 online"), "{fleet}");
    // Exported: its samples as CSV on standard output, its rollups as a Parquet file.
    let csv = cli(&["export", "roof-1", "--since", "1h", "--registers", "Pac"]);
    assert!(csv.starts_with("time,unix_ms,seq,Pac_W\n") && csv.lines().count() >= 2, "{csv}");
    cli(&["export", "roof-1", "--data", "rollups", "--format", "parquet", "-o", "roof-1.parquet"]);
    let parquet = std::fs::read(d.join("roof-1.parquet")).unwrap();
    assert!(parquet.starts_with(b"PAR1") && parquet.ends_with(b"PAR1"), "{} bytes", parquet.len());

    // A device added later: the files made again, Mosquitto reloaded (SIGHUP), and it connects.
    cli(&["device", "add", "roof-2"]);
    let made = cli(&["broker", "mosquitto", "--out", "broker", "--port", &bp]);
    assert!(made.contains("2 device(s)"), "{made}");
    assert_eq!(std::fs::read_to_string(d.join("broker/server-password")).unwrap(), password);
    let mut conf = std::fs::read_to_string(d.join("broker/mosquitto.conf")).unwrap();
    conf.insert_str(0, "user root\n");
    std::fs::write(d.join("broker/mosquitto.conf"), conf).unwrap();
    let hup = Command::new("kill").args(["-HUP", &mosquitto.0.id().to_string()]).status();
    assert!(hup.unwrap().success());
    std::thread::sleep(Duration::from_millis(500));
    let _roof2 = agent("roof-2");
    wait_for("roof-2 to sync through the broker", 30, || online("roof-2"));

    // The broker's ACL: roof-1 cannot listen to roof-2's answers nor speak on its topics.
    let (key1, _) = key_of(d, "roof-1");
    let (key2, id2) = key_of(d, "roof-2");
    let (watcher, events) = client(broker_port, "ecowatt-server", password.trim());
    watcher.subscribe("ecowatt-device/+/up/+", QoS::AtLeastOnce).unwrap();
    assert!(
        next(&events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).is_some()
    );
    let (intruder, seen) = client(broker_port, "roof-1-probe-unused", "x");
    assert!(
        next(&seen, |e| match e {
            Event::Incoming(Packet::ConnAck(a)) => Some(a.code),
            _ => None,
        })
        .is_none_or(|code| code != rumqttc::ConnectReturnCode::Success),
        "an unknown user was let in"
    );
    drop(intruder);
    let (roof1, seen) = client(broker_port, "roof-1", &broker_password(&key1));
    roof1.subscribe("ecowatt-device/roof-2/down/+", QoS::AtLeastOnce).unwrap();
    roof1.subscribe("ecowatt-device/roof-1/down/+", QoS::AtLeastOnce).unwrap();
    // Mosquitto grants the subscription but delivers nothing the ACL does not
    // let it read: the servers answer roof-2, then roof-1; roof-1 gets only its own.
    for _ in 0..2 {
        next(&seen, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(()))
            .expect("a SUBACK");
    }
    for (topic, marker) in [
        ("ecowatt-device/roof-2/down/sync", b"for roof-2".to_vec()),
        ("ecowatt-device/roof-1/down/sync", b"for roof-1".to_vec()),
    ] {
        watcher.publish(topic, QoS::AtLeastOnce, false, marker).unwrap();
    }
    let first = next(&seen, |e| match e {
        Event::Incoming(Packet::Publish(p)) if p.payload.starts_with(b"for roof-") => {
            Some(p.payload.to_vec())
        }
        _ => None,
    });
    assert_eq!(first.as_deref(), Some(&b"for roof-1"[..]), "roof-1 read another device's answers");
    roof1.publish("ecowatt-device/roof-2/up/sync", QoS::AtLeastOnce, false, b"x".to_vec()).unwrap();
    // Garbage on its own topic: seen by the servers, answered with the HTTP refusal.
    roof1
        .publish("ecowatt-device/roof-1/up/sync", QoS::AtLeastOnce, false, b"garbage".to_vec())
        .unwrap();
    let up = next(&events, |e| match e {
        Event::Incoming(Packet::Publish(p))
            if p.payload.as_ref() == b"x" || p.payload.as_ref() == b"garbage" =>
        {
            Some(p.topic)
        }
        _ => None,
    });
    assert_eq!(
        up.as_deref(),
        Some("ecowatt-device/roof-1/up/sync"),
        "the ACL let roof-1 speak for roof-2"
    );
    let answer = next(&seen, |e| match e {
        Event::Incoming(Packet::Publish(p)) if p.topic == "ecowatt-device/roof-1/down/sync" => {
            Answer::decode(&p.payload).ok()
        }
        _ => None,
    })
    .expect("an answer to the garbage");
    assert_eq!(answer.status, 400);
    assert!(String::from_utf8_lossy(&answer.body).contains("malformed_envelope"));

    // An envelope of roof-2 published by roof-1 on its own topic: refused, recorded.
    let header = ecowatt_proto::seal::Header {
        msg_type: ecowatt_proto::messages::MessageType::SyncRequest as u8,
        direction: ecowatt_proto::seal::Direction::Up,
        key_version: 1,
        device_id: id2,
        counter: 1 << 40,
    };
    let keys = ecowatt_proto::seal::Keys::derive(&key2);
    let sealed = ecowatt_proto::seal::seal(&keys, &header, None, b"anything");
    roof1.publish("ecowatt-device/roof-1/up/sync", QoS::AtLeastOnce, false, sealed).unwrap();
    let answer = next(&seen, |e| match e {
        Event::Incoming(Packet::Publish(p)) if p.topic == "ecowatt-device/roof-1/down/sync" => {
            Answer::decode(&p.payload).ok().filter(|a| a.correlation == 1 << 40)
        }
        _ => None,
    })
    .expect("an answer to the foreign envelope");
    assert_eq!(answer.status, 401, "{}", String::from_utf8_lossy(&answer.body));
    let metrics = ureq::get(format!("{url}/metrics")).call().unwrap().body_mut().read_to_string();
    let metrics = metrics.unwrap();
    assert!(
        metrics.contains("ecowatt_security_events_total{kind=\"topic_mismatch\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ecowatt_device_broker_requests_total{route=\"sync\"}"), "{metrics}");
    // roof-2 still fine: nothing of the foreign envelope was applied.
    assert!(online("roof-2"));

    // The broker restarted mid-stream: the server and the devices reconnect by
    // themselves and commands flow again.
    drop((roof1, watcher));
    drop(mosquitto);
    let errors = "ecowatt_device_broker_errors_total";
    wait_for("the server to notice the broker gone", 15, || counter(&url, errors) > 0);
    let _mosquitto = start_mosquitto(d, broker_port);
    let done = cli(&["command", "roof-2", "set-power-percentage", "55", "--wait"]);
    assert!(done.contains("succeeded") || done.contains("confirmed"), "{done}");
    assert!(counter(&url, "ecowatt_device_broker_connections_total") >= 2);
}

/// A Mosquitto of the test's own that lets anyone in, on a free port.
fn open_mosquitto(d: &Path) -> (Killed, u16) {
    let port = free_port();
    let conf = format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n");
    std::fs::write(d.join("open.conf"), conf).unwrap();
    let child = Command::new("mosquitto")
        .args(["-c", "open.conf"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    wait_for("mosquitto to listen", 10, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (child, port)
}

fn counter(url: &str, line: &str) -> u64 {
    let text = ureq::get(format!("{url}/metrics")).call().unwrap().body_mut().read_to_string();
    text.unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(line).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_split_the_devices_requests_through_one_shared_subscription() {
    if !mosquitto_installed() {
        return;
    }
    let Some(db) = ecowatt_testkit::server::TempDb::postgres().await else {
        eprintln!("note: ECOWATT_TEST_PG_URL is unset; PostgreSQL part skipped");
        return;
    };
    let database = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_mosquitto, broker_port) = open_mosquitto(d);
        let broker = format!("mqtt://127.0.0.1:{broker_port}");
        let (pa, pb) = (free_port(), free_port());
        let start = |port: u16, data: &str| {
            let bind = format!("127.0.0.1:{port}");
            let child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
                .args(["server", "--bind", &bind, "--data-dir", data, "--database", &database])
                .args(["--device-broker", &broker])
                .current_dir(d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            wait_for("a server to listen", 30, || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            Killed(child)
        };
        let _a = start(pa, "a");
        let _b = start(pb, "b");
        let (ua, ub) = (format!("http://127.0.0.1:{pa}"), format!("http://127.0.0.1:{pb}"));
        let cli = |url: &str, args: &[&str]| {
            ok(run(d, &[args, &["--server", url, "--data-dir", "a"][..]].concat()))
        };
        let names: Vec<String> = (0..4).map(|i| format!("site-{i}")).collect();
        // Each its own inverter: one written by two agents would not read back as written.
        let _agents: Vec<(Killed, Killed)> = names
            .iter()
            .map(|name| {
                let (sim, inverter) = sim();
                cli(&ua, &["device", "add", name]);
                let child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
                    .args(["device", "--provision", &format!("{name}.provision.json")])
                    .args(["--inverter", &inverter, "--state-dir", &format!("state-{name}")])
                    .args(["--cloud", &broker])
                    .current_dir(d)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                (Killed(child), sim)
            })
            .collect();
        // Commands queued through either server reach the devices through the broker.
        for (i, name) in names.iter().enumerate() {
            let url = if i % 2 == 0 { &ua } else { &ub };
            let pct = (20 + i).to_string();
            let done = cli(url, &["command", name, "set-power-percentage", &pct, "--wait"]);
            assert!(done.contains("succeeded") || done.contains("confirmed"), "{done}");
        }
        // Both servers took some of the requests: one subscription, split.
        let sync = "ecowatt_device_broker_requests_total{route=\"sync\"}";
        wait_for("both servers to take syncs", 30, || {
            counter(&ua, sync) > 0 && counter(&ub, sync) > 0
        });
    })
    .await
    .unwrap();
    drop(db);
}
