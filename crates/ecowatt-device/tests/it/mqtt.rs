//! `ecowatt device --mqtt` against the real broker on this machine (Mosquitto
//! at 127.0.0.1:1883, started by `.ci/run`): a device without a server
//! announces itself to Home Assistant, publishes its states, takes the export
//! limit from Home Assistant's number (checked and read back by the core) and
//! refuses what the core refuses; a device with a server publishes too, with
//! the limit read-only (commands go through the server).

use std::sync::Arc;
use std::time::Duration;

use ecowatt_device::agent::{AgentOptions, Provisioning};
use ecowatt_device::mqtt::MqttSettings;
use ecowatt_testkit::TestSim;
use rumqttc::{AsyncClient, QoS};

const BROKER: (&str, u16) = ("127.0.0.1", 1883);

/// Skips when no broker runs here, unless the suite is required (`.ci/run`).
fn broker_or_skip() -> bool {
    let up = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], BROKER.1)),
        Duration::from_secs(1),
    )
    .is_ok();
    if !up {
        assert!(
            std::env::var_os("ECOWATT_TEST_MQTT_REQUIRED").is_none(),
            "no MQTT broker at 127.0.0.1:1883, and the MQTT suite is required"
        );
        eprintln!("note: no MQTT broker at 127.0.0.1:1883; MQTT part skipped");
    }
    up
}

use ecowatt_testkit::mosquitto::{Seen, last_json, last_text, until};

use crate::agent::start;

async fn subscribe(filters: &[String]) -> (AsyncClient, Seen) {
    ecowatt_testkit::mosquitto::subscribe(BROKER.1, filters).await
}

/// Unique topic prefixes for one test run.
fn prefixes(tag: &str) -> (String, String) {
    let n = format!("{}{}", std::process::id(), ecowatt_formats::time::now_ms() % 1_000_000);
    (format!("ewdev{tag}{n}"), format!("hadev{tag}{n}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_without_a_server_is_set_from_home_assistant_through_its_broker() {
    if !broker_or_skip() {
        return;
    }
    let sim = TestSim::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (prefix, discovery) = prefixes("l");
    let (client, seen) = subscribe(&[format!("{prefix}/#"), format!("{discovery}/#")]).await;
    let mut opts =
        AgentOptions::new(Provisioning::local("home-1"), sim.http_url(), dir.path().into());
    opts.cloud = false;
    let mut m = MqttSettings::new(&format!("mqtt://{}:{}", BROKER.0, BROKER.1));
    m.topics.prefix = prefix.clone();
    m.topics.discovery = discovery.clone();
    opts.mqtt = Some(m);
    opts.clock = Arc::new(ecowatt_device::clock::FastClock::new(5));
    let agent = start(opts);

    // Announced to Home Assistant: nine sensors and the settable limit.
    let number = format!("{discovery}/number/ecowatt_home-1/export_limit/config");
    let config = until("discovery", || last_json(&seen, &number)).await;
    assert_eq!(config["command_topic"], format!("{prefix}/home-1/export_limit/set"));
    assert_eq!(config["availability"][0]["topic"], format!("{prefix}/home-1/availability"));
    let sensors = until("nine sensors", || {
        let n = seen.lock().unwrap().keys().filter(|t| t.contains("/sensor/")).count();
        (n == 9).then_some(n)
    })
    .await;
    assert_eq!(sensors, 9);
    let availability = format!("{prefix}/home-1/availability");
    until("online", || (last_text(&seen, &availability)? == "online").then_some(())).await;
    // States in engineering units.
    let state_topic = format!("{prefix}/home-1/state");
    let state = until("a state", || last_json(&seen, &state_topic)).await;
    assert!(state["Vac1"].as_f64().is_some_and(|v| v > 200.0), "{state}");
    assert_eq!(state["Pow"], 100.0);

    // Home Assistant sets 40 %: written, read back, reported, and the state follows.
    let set = format!("{prefix}/home-1/export_limit/set");
    client.publish(&set, QoS::AtLeastOnce, false, "40").await.unwrap();
    let commands = format!("{prefix}/home-1/commands");
    let done = until("the command's result", || {
        let c = last_json(&seen, &commands)?;
        (c[0]["status"] == "succeeded").then_some(c)
    })
    .await;
    assert_eq!(done[0]["parameters"]["percentage"], 40);
    assert_eq!(sim.limit_pct(0x11), 40);
    until("the state at 40 %", || (last_json(&seen, &state_topic)?["Pow"] == 40.0).then_some(()))
        .await;

    // What the core refuses, and what is not a number, change nothing.
    for (payload, code) in [("101", "value_out_of_range"), ("abc", "not_a_number")] {
        client.publish(&set, QoS::AtLeastOnce, false, payload).await.unwrap();
        until(code, || {
            let c = last_json(&seen, &commands)?;
            (c[0]["status"] == "refused" && c[0]["result"] == code).then_some(())
        })
        .await;
    }
    assert_eq!(sim.limit_writes(0x11), vec![40], "only the valid command was written");

    // Stopping says offline.
    agent.stop().await;
    until("offline", || (last_text(&seen, &availability)? == "offline").then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_with_a_server_publishes_its_states_with_the_limit_read_only() {
    if !broker_or_skip() {
        return;
    }
    let sim = TestSim::start(1).await;
    let db = ecowatt_testkit::server::TempDb::sqlite();
    let server = ecowatt_testkit::server::TestServer::start(&db, false).await;
    let op = crate::agent::Op::of(&server);
    let p = crate::agent::provision(&op, "roof-9").await;
    let (prefix, discovery) = prefixes("c");
    let (client, seen) = subscribe(&[format!("{prefix}/#"), format!("{discovery}/#")]).await;
    let mut opts = AgentOptions::new(p, sim.http_url(), db.dir.path().join("device"));
    let mut m = MqttSettings::new(&format!("mqtt://{}:{}", BROKER.0, BROKER.1));
    m.topics.prefix = prefix.clone();
    m.topics.discovery = discovery.clone();
    opts.mqtt = Some(m);
    let agent = start(opts);
    let limit = format!("{discovery}/sensor/ecowatt_roof-9/export_limit/config");
    let config = until("the read-only limit", || last_json(&seen, &limit)).await;
    assert!(config.get("command_topic").is_none(), "{config}");
    let state = format!("{prefix}/roof-9/state");
    until("a state", || last_json(&seen, &state)).await;
    // A command published anyway is not taken: the server is where limits are set.
    let set = format!("{prefix}/roof-9/export_limit/set");
    client.publish(&set, QoS::AtLeastOnce, false, "40").await.unwrap();
    // And the server has its samples too.
    op.until(
        "/api/v1/devices/roof-9/latest",
        "samples at the server",
        Duration::from_secs(30),
        |v| !v["sample"].is_null(),
    )
    .await;
    assert_ne!(sim.limit_pct(0x11), 40);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_reaches_an_mqtts_broker_of_a_private_pki_and_refuses_another() {
    let b = match ecowatt_testkit::mosquitto::TlsBroker::start() {
        Ok(b) => b,
        Err(e) => {
            assert!(std::env::var_os("ECOWATT_TEST_MQTT_REQUIRED").is_none(), "{e}");
            return eprintln!("note: {e}; MQTT TLS part skipped");
        }
    };
    let sim = TestSim::start(1).await;
    let (_client, seen) =
        ecowatt_testkit::mosquitto::subscribe(b.plain_port, &["#".to_owned()]).await;
    let run = |name: &str, ca: &std::path::Path| {
        let dir = tempfile::tempdir().unwrap();
        let mut opts =
            AgentOptions::new(Provisioning::local(name), sim.http_url(), dir.path().into());
        opts.cloud = false;
        let mut m = MqttSettings::new(&format!("mqtts://localhost:{}", b.tls_port));
        m.ca_file = Some(ca.to_path_buf());
        opts.mqtt = Some(m);
        opts.clock = Arc::new(ecowatt_device::clock::FastClock::new(5));
        (start(opts), dir)
    };
    // Trusting the broker's CA: online, states published over TLS.
    let (home, _d1) = run("tls-home", &b.ca);
    until("online over TLS", || {
        (last_text(&seen, "ecowatt/tls-home/availability")? == "online").then_some(())
    })
    .await;
    until("a state over TLS", || last_json(&seen, "ecowatt/tls-home/state")).await;
    // Trusting another CA: the broker is refused, the agent keeps running, nothing is published.
    let (stranger, _d2) = run("tls-stranger", &b.other_ca);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!stranger.task.is_finished(), "the agent keeps running while its broker is refused");
    assert!(last_text(&seen, "ecowatt/tls-stranger/availability").is_none());
    home.stop().await;
    stranger.stop().await;
    // A CA file with a plain broker is refused before anything starts.
    let mut m = MqttSettings::new("mqtt://127.0.0.1:1883");
    m.ca_file = Some(b.ca.clone());
    assert!(m.check().unwrap_err().contains("mqtts://"));
}
