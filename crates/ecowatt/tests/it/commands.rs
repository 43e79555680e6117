use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use ecowatt_testkit::TestSim;

fn ecowatt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecowatt")).args(args).output().expect("run ecowatt")
}

/// Runs the binary off the async runtime (it blocks on network I/O).
async fn ecowatt_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ecowatt(&refs)
    })
    .await
    .unwrap()
}

fn explain(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_command_explains_itself() {
    for args in [
        &["--help"][..],
        &["demo", "--help"],
        &["sim", "--help"],
        &["inverter", "--help"],
        &["inverter", "read", "--help"],
        &["inverter", "set-limit", "--help"],
        &["bench", "--help"],
        &["bench", "frames", "--help"],
        &["bench", "sim", "--help"],
        &["bench", "commands", "--help"],
        &["server", "--help"],
        &["device", "add", "--help"],
        &["device", "rotate-key", "--help"],
        &["config", "set", "--help"],
        &["command", "--help"],
        &["command", "x", "set-power-percentage", "--help"],
        &["commands", "export", "--help"],
        &["token", "create", "--help"],
        &["audit", "--help"],
        &["keygen", "--help"],
        &["tls", "init", "--help"],
        &["rollout", "start", "--help"],
        &["bench", "ota", "--help"],
        &["firmware", "sign", "--help"],
        &["firmware", "verify", "--help"],
        &["bench", "codec", "--help"],
        &["bench", "fleet", "--help"],
        &["bench", "protocol", "--help"],
        &["bench", "curtail", "--help"],
        &["bench", "legacy", "--help"],
        &["device", "legacy", "--help"],
        &["curtail", "--help"],
        &["curtail", "release", "--help"],
        &["device", "failsafe", "--help"],
        &["device", "ramp", "--help"],
        &["device", "tag", "--help"],
        &["device", "control", "--help"],
        &["telemetry", "--help"],
        &["status", "--help"],
        &["completions", "--help"],
        &["man", "--help"],
    ] {
        let out = ecowatt(args);
        assert!(out.status.success(), "{args:?}: {}", explain(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
}

#[test]
fn shell_completions_and_manual_pages_come_from_the_cli_definition() {
    // bash: the script loads, and completes a command and a subcommand.
    let script = ecowatt(&["completions", "bash"]);
    assert!(script.status.success(), "{}", explain(&script));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ecowatt.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    // As bash calls it: the words, the one completed, and its arguments
    // (the command, the current word, the word before).
    let complete = |words: &str, cword: usize| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
                 _ecowatt ecowatt \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
                 echo \"${{COMPREPLY[@]}}\"",
                file.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", explain(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(complete("ecowatt tele", 1).trim(), "telemetry");
    let device = complete("ecowatt device ''", 2);
    assert!(device.contains("add") && device.contains("rotate-key"), "{device}");
    for shell in ["zsh", "fish"] {
        let out = ecowatt(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", explain(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("rotate-key") && text.contains("set-power-percentage"), "{shell}");
    }
    assert!(!ecowatt(&["completions", "tcsh"]).status.success());

    // man: one page on standard output, or one per command.
    let page = ecowatt(&["man"]);
    let text = String::from_utf8_lossy(&page.stdout);
    assert!(text.contains(".TH ecowatt 1") && text.contains("telemetry"), "{text}");
    let out = ecowatt(&["man", "--out", dir.path().join("man").to_str().unwrap()]);
    assert!(out.status.success(), "{}", explain(&out));
    let add = std::fs::read_to_string(dir.path().join("man/ecowatt-device-add.1")).unwrap();
    assert!(add.contains(".TH ecowatt-device-add 1") && add.contains("rated\\-power"), "{add}");
    assert!(dir.path().join("man/ecowatt-commands-export.1").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn inverter_read_prints_engineering_units_over_each_transport() {
    let sim = TestSim::start(1).await;
    for url in [sim.http_url(), sim.tcp_url()] {
        let out = ecowatt_async(&["inverter", "read", "--url", &url, "--json"]).await;
        assert!(out.status.success(), "{}", explain(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let regs = v["registers"].as_array().unwrap();
        assert_eq!(regs.len(), 10);
        assert_eq!(regs[2]["name"], "Fac1");
        let hz = regs[2]["value"].as_f64().unwrap();
        assert!((49.5..50.5).contains(&hz), "{hz}");
        assert_eq!(regs[2]["unit"], "Hz");

        let out = ecowatt_async(&["inverter", "read", "--url", &url]).await;
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("Vac1") && table.contains(" V\n") && table.contains(" Hz\n"),
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn set_limit_writes_register_8_and_refuses_out_of_range_values() {
    let sim = TestSim::start(1).await;
    let url = sim.http_url();
    let out = ecowatt_async(&["inverter", "set-limit", "30", "--url", &url]).await;
    assert!(out.status.success(), "{}", explain(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("now 30 %"));
    assert_eq!(sim.limit_pct(0x11), 30);

    let out = ecowatt_async(&["inverter", "set-limit", "150", "--url", &url]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("out of range") && err.contains("nothing was sent"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");
    assert_eq!(sim.limit_pct(0x11), 30, "unchanged");
    assert_eq!(sim.sim.state.sim.lock().unwrap().counters().requests, 2, "write + read-back only");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_inverter_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("tcp://127.0.0.1:{port}");
    let out = ecowatt_async(&["inverter", "read", "--url", &url, "--attempts", "1"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: reading inverter 0x11"), "{err}");
    let out = ecowatt_async(&["inverter", "read", "--url", "ftp://x"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported inverter URL"));
}

#[test]
fn sim_serves_both_protocols_and_stops_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["sim", "--http", "127.0.0.1:0", "--modbus-tcp", "127.0.0.1:0", "--inverters", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut http, mut tcp) = (None, None);
    for line in lines.by_ref().take(10) {
        let line = line.unwrap();
        if let Some(u) = line.split("SIM HTTP API : ").nth(1) {
            http = Some(u.trim().to_owned());
        }
        if let Some(u) = line.split("Modbus TCP   : ").nth(1) {
            tcp = Some(u.trim().to_owned());
        }
        if http.is_some() && tcp.is_some() {
            break;
        }
    }
    let (http, tcp) = (http.expect("HTTP URL printed"), tcp.expect("TCP URL printed"));
    for url in [&http, &tcp] {
        let out = ecowatt(&["inverter", "read", "--url", url, "--slave", "0x12"]);
        assert!(out.status.success(), "{url}: {}", explain(&out));
    }
    let killed =
        Command::new("sh").args(["-c", &format!("kill -INT {}", child.id())]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on Ctrl-C: {status:?}");
}

#[test]
fn demo_runs_simulator_server_and_devices_and_prints_stored_readings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args([
            "demo",
            "--for",
            "9s",
            "--interval",
            "1s",
            "--start",
            "11:00",
            "--bind",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("run ecowatt");
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("admin token : ewt_"), "{text}");
    for name in ["inverter-1", "inverter-2", "inverter-3"] {
        let rows: Vec<&str> =
            text.lines().filter(|l| l.starts_with(name) && l.contains("online")).collect();
        assert!(!rows.is_empty(), "{name}: no stored readings in\n{text}");
        // Late morning: every inverter produces power, and the server has its samples.
        let last = rows.last().unwrap();
        let pac: f64 = last.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(pac > 0.0, "{name}: {last}");
    }
    assert!(text.contains("Stopping the demo."));
    assert!(data.join(".ecowatt-demo").exists() && data.join("server/ecowatt.db").exists());
    // A rerun recreates its own directory, but never one it did not make.
    let other = dir.path().join("precious");
    std::fs::create_dir_all(&other).unwrap();
    let out = ecowatt(&[
        "demo",
        "--for",
        "1s",
        "--data-dir",
        other.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a demo directory"));
}

#[test]
fn bench_curtail_runs_bounded_and_every_device_confirms() {
    let out =
        ecowatt(&["bench", "curtail", "--devices", "20", "--warmup", "4s", "--timeout", "20s"]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for figure in [
        "Curtailment of 20 devices to 30%",
        "20 confirmed by read-back, 0 failed, 0 pending, 0 offline (settled",
        "50 % of devices",
        "Server during the curtailment: CPU",
    ] {
        assert!(text.contains(figure), "{figure:?} missing from:\n{text}");
    }
}

#[test]
fn bench_legacy_runs_bounded_and_reports_cpu_per_request() {
    let out =
        ecowatt(&["bench", "legacy", "--devices", "5", "--requests", "2000", "--connections", "4"]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for figure in ["Legacy: 5 devices, 2000 requests", "requests/s", "µs per request"] {
        assert!(text.contains(figure), "{figure:?} missing from:\n{text}");
    }
}

/// The operator's curtailment from the CLI against the demo's feeder: a
/// group that matches nothing is refused; the demo's is curtailed and
/// followed until every device confirmed, then released.
#[test]
fn curtail_from_the_cli_follows_confirmations_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let (mut demo, lines, url, token) =
        start_demo(dir.path(), &["--for", "60s", "--interval", "30s"]);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ecowatt"))
            .args(args)
            .env("ECOWATT_SERVER", &url)
            .env("ECOWATT_TOKEN", &token)
            .output()
            .unwrap()
    };
    let out = run(&["curtail", "--group", "nobody", "30%"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("group_empty"), "{}", explain(&out));
    let out = run(&["curtail", "--group", "demo-feeder", "30%", "--lease", "10m", "--wait"]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 devices: 3 confirmed, 0 pending, 0 offline, 0 failed"), "{text}");
    assert!(text.contains("lease 600 s"), "{text}");
    let out = run(&["device", "control", "inverter-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fail-safe 50%") && text.contains("leased limit 30%"), "{text}");
    let out = run(&["curtail", "release", "1", "--wait"]);
    assert!(out.status.success(), "{}", explain(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("release 2"), "{}", explain(&out));
    let out = run(&["curtail", "release", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already_released"), "{}", explain(&out));
    // SIGTERM (systemd, containers) stops the demo gracefully, at once.
    let asked = std::time::Instant::now();
    let killed =
        Command::new("sh").args(["-c", &format!("kill -TERM {}", demo.id())]).status().unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = demo.wait().unwrap();
    assert!(status.success(), "a graceful stop: {status:?}");
    assert!(rest.iter().any(|l| l.contains("Stopping the demo.")), "{rest:?}");
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "the demo took {took:?} to stop");
}

/// The rest of a demo's standard output, line by line.
type DemoLines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// A demo in `dir` on a free port with `args`, once its banner is printed:
/// the process, the rest of its output, its server's URL and admin token.
fn start_demo(
    dir: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, DemoLines, String, String) {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .arg("demo")
        .args(args)
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the demo");
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let (url, token) = demo_banner(&mut lines);
    (demo, lines, url, token)
}

/// A demo's server, from its banner: (URL, admin token).
fn demo_banner(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> (String, String) {
    let (mut url, mut token) = (String::new(), String::new());
    while url.is_empty() || token.is_empty() {
        let line = lines.next().expect("the demo's banner").unwrap();
        if let Some(t) = line.strip_prefix("  admin token : ") {
            token = t.trim().to_owned();
        }
        if let Some(u) = line.strip_prefix("  API         : ") {
            url = u.trim().trim_end_matches("/api/docs").to_owned();
        }
    }
    (url, token)
}

/// What an operator looks at from the terminal: devices with state and
/// firmware, one device, recent samples (table, CSV, followed), the fleet.
#[test]
fn an_operator_looks_at_devices_telemetry_and_the_fleet_from_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut demo, _lines, url, token) =
        start_demo(dir.path(), &["--for", "90s", "--interval", "60s", "--start", "11:00"]);
    let cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ecowatt"));
        c.args(args).env("ECOWATT_SERVER", &url).env("ECOWATT_TOKEN", &token);
        c
    };
    let run = |args: &[&str]| {
        let out = cmd(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", explain(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Each device uploads its first sample as soon as it starts.
    let mut table = String::new();
    for _ in 0..100 {
        table = run(&["telemetry", "inverter-1", "--registers", "Pac,Vac1", "--limit", "2"]);
        if table.lines().count() >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let rows: Vec<&str> = table.lines().collect();
    assert!(
        rows[0].contains("seq") && rows[0].contains("Pac W") && rows[0].contains("Vac1 V"),
        "{table}"
    );
    assert_eq!(rows.len(), 3, "the header and the 2 newest: {table}");
    let volts: f64 = rows[2].split_whitespace().last().unwrap().parse().unwrap();
    assert!((200.0..260.0).contains(&volts), "engineering units: {table}");
    let csv = run(&["telemetry", "inverter-1", "--registers", "Pac", "--csv"]);
    assert!(csv.starts_with("seq,unix_ms,Pac_W\n"), "{csv}");

    let list = run(&["device", "list"]);
    assert!(list.lines().next().unwrap().contains("firmware"), "{list}");
    for name in ["inverter-1", "inverter-2", "inverter-3"] {
        let row = list.lines().find(|l| l.starts_with(name)).expect(name);
        assert!(row.contains("online") && row.contains("0.1.0"), "{list}");
    }
    let show = run(&["device", "show", "inverter-1"]);
    assert!(show.contains("state      online") && show.contains("firmware   0.1.0"), "{show}");
    assert!(show.contains("applied v2: poll 1 s, upload 10 s") && show.contains("Pac "), "{show}");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["device", "show", "inverter-1", "--json"])).unwrap();
    assert_eq!(json["device"]["name"], "inverter-1");

    let status = run(&["status"]);
    assert!(status.contains("devices    3 (3 online, 0 offline)"), "{status}");
    assert!(status.contains("kW from 3 online devices"), "{status}");
    assert!(status.contains("pending") && status.contains("rollouts   none active"), "{status}");
    assert!(status.contains("security   0 events in the last hour"), "{status}");

    // --watch prints new samples as they arrive (the demo uploads every 10 s of its clock).
    let mut watch =
        cmd(&["telemetry", "inverter-2", "--registers", "Pac", "--limit", "1", "--watch"])
            .args(["--every", "200ms"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    let mut followed = BufReader::new(watch.stdout.take().unwrap()).lines();
    let seqs: Vec<u64> = followed
        .by_ref()
        .skip(1)
        .take(3)
        .map(|l| l.unwrap().split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "new samples, in order: {seqs:?}");
    let _ = demo.kill();
    let _ = demo.wait();
}

#[test]
fn bench_fleet_runs_bounded_and_reports_every_figure() {
    let out = ecowatt(&[
        "bench",
        "fleet",
        "--devices",
        "5",
        "--duration",
        "2s",
        "--upload-every",
        "1s",
        "--commands-per-sec",
        "2",
    ]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for figure in [
        "uploads (",
        "data points/s",
        "upload latency p50",
        "commands delivered through",
        "RSS",
        "B per data point",
        "Errors: none",
    ] {
        assert!(text.contains(figure), "{figure:?} missing from:\n{text}");
    }
}

#[test]
fn bench_frames_runs_and_reports_rates() {
    let out = ecowatt(&["bench", "frames", "--iterations", "1000"]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("ops/s").count(), 5, "{text}");
}

#[test]
fn bench_sim_runs_bounded_and_reports_both_protocols() {
    let out =
        ecowatt(&["bench", "sim", "--requests", "200", "--clients", "2", "--max-time", "10s"]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SIM HTTP API") && text.contains("Modbus TCP"), "{text}");
    assert!(text.contains("failed    0"), "{text}");
}

/// `ecowatt demo --mqtt`: the simulated inverters appear on a broker with
/// Home Assistant discovery, and Home Assistant's export limit reaches the
/// simulated inverter: the state published after the read-back shows it,
/// and the command is confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_in_home_assistant_sets_the_export_limit_through_mqtt() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let Ok(mut broker) = Command::new("mosquitto")
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        assert!(std::env::var_os("ECOWATT_TEST_MQTT_REQUIRED").is_none(), "mosquitto is required");
        eprintln!("note: cannot start mosquitto; MQTT part skipped");
        return;
    };
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "mosquitto did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (sub, mut events) =
        AsyncClient::new(MqttOptions::new("demo-test-sub", "127.0.0.1", port), 100);
    sub.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    let seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>> =
        Default::default();
    let into = seen.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                into.lock().unwrap().insert(p.topic.clone(), p.payload.to_vec());
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let (mut demo, _lines, url, token) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || start_demo(&dir, &["--inverters", "1", "--mqtt", &broker_url, "--for", "90s"])
    })
    .await
    .unwrap();
    let get = |topic: &str| -> Option<serde_json::Value> {
        seen.lock().unwrap().get(topic).and_then(|b| serde_json::from_slice(b).ok())
    };
    let wait = |what: &str, t0: std::time::Instant| {
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "timed out waiting for {what}");
    };
    let t0 = std::time::Instant::now();
    let number = loop {
        if let Some(n) = get("homeassistant/number/ecowatt_inverter-1/export_limit/config") {
            break n;
        }
        wait("discovery", t0);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let command_topic = number["command_topic"].as_str().unwrap().to_owned();
    sub.publish(&command_topic, QoS::AtLeastOnce, false, "20").await.unwrap();
    // The device applies it, reads it back, uploads: the state shows 20 %.
    let t0 = std::time::Instant::now();
    loop {
        if get("ecowatt/inverter-1/state").is_some_and(|s| s["Pow"] == 20.0) {
            break;
        }
        wait("the state to show 20 %", t0);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let commands: serde_json::Value =
        ureq::get(format!("{url}/api/v1/devices/inverter-1/commands"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
    let mqtt: Vec<&serde_json::Value> = commands["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["created_by"] == "mqtt")
        .collect();
    assert_eq!(mqtt.len(), 1, "{commands}");
    assert!(matches!(mqtt[0]["status"].as_str(), Some("succeeded" | "confirmed")), "{commands}");
    // Its result reached the broker too.
    let t0 = std::time::Instant::now();
    loop {
        let shown = get("ecowatt/inverter-1/commands");
        if shown.as_ref().is_some_and(|v| {
            v.as_array().is_some_and(|a| {
                a.iter().any(|c| {
                    c["created_by"] == "mqtt"
                        && matches!(c["status"].as_str(), Some("succeeded" | "confirmed"))
                })
            })
        }) {
            break;
        }
        wait("the result on the commands topic", t0);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = demo.kill();
    let _ = demo.wait();
    let _ = broker.kill();
    let _ = broker.wait();
}

#[test]
fn bench_codec_measures_a_recorded_log_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.csv");
    let mut text = String::from("unix_ms,r0,r9\n");
    for i in 0..150u64 {
        text +=
            &format!("{},{},{}\n", 1_800_000_000_000 + 5_000 * i + i % 7, 2300 + i % 3, 1500 + i);
    }
    std::fs::write(&log, text).unwrap();
    let out = ecowatt(&["bench", "codec", "--csv", log.to_str().unwrap(), "--batch", "60"]);
    assert!(out.status.success(), "{}", explain(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("decoded back exactly") && stdout.contains("log.csv"), "{stdout}");
    assert!(stdout.contains("codec v2: encode"), "{stdout}");
    std::fs::write(&log, "unix_ms,r0\n1,70000\n").unwrap();
    let out = ecowatt(&["bench", "codec", "--csv", log.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", explain(&out));
}
