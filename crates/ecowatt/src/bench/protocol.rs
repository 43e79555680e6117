//! The sealed device protocol: envelopes per second, syncs per second
//! against a server in process, refusal timing, and push latency.

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::measure::{Run, percentile, rate, report};

/// What a prober can learn from timing: the server's own time (in process,
/// through the router) to refuse an envelope for a device id no device has,
/// and one for a real device sealed with the wrong key. Both should cost
/// the same: the key lookup is in memory, and an unknown id is given the
/// work of a bad tag.
fn refusal_times(
    rt: &tokio::runtime::Runtime,
    server: &crate::server::InProcess,
    known: &ecowatt_core::session::Credentials,
) -> anyhow::Result<()> {
    use ecowatt_proto::messages::SyncRequest;
    use ecowatt_proto::seal::{self, Direction, Header, Keys};
    use tower::ServiceExt;
    let body = SyncRequest::default().encode();
    let forged = |device_id: u32, counter: u64| {
        let header =
            Header { msg_type: 1, direction: Direction::Up, key_version: 1, device_id, counter };
        seal::seal(&Keys::derive(&[0xEE; 16]), &header, None, &body)
    };
    let app = ecowatt_server::api::app(server.state.clone());
    let rounds = 5_000u64;
    let (mut unknown, mut bad_tag) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for i in 0..rounds {
            for (device_id, out) in [(u32::MAX - 7, &mut unknown), (known.device_id, &mut bad_tag)]
            {
                let request = hyper::Request::post("/api/v1/device/sync")
                    .header("content-type", "application/octet-stream")
                    .body(axum::body::Body::from(forged(device_id, i + 1)))
                    .expect("request");
                let t0 = Instant::now();
                let answer = app.clone().oneshot(request).await.expect("infallible");
                out.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                assert_eq!(answer.status(), 401);
            }
        }
    });
    unknown.sort_unstable();
    bad_tag.sort_unstable();
    let us = |v: &[u32], p: f64| f64::from(percentile(v, p)) / 1000.0;
    outln!(
        "Refusals, in process, {rounds} each, alternating: unknown device id p50 {:.1} µs p90 {:.1} µs; known device, bad tag p50 {:.1} µs p90 {:.1} µs",
        us(&unknown, 0.5),
        us(&unknown, 0.9),
        us(&bad_tag, 0.5),
        us(&bad_tag, 0.9)
    );
    Ok(())
}

/// Seal and open per second, sealed syncs per second against a server in
/// process (SQLite in a temporary directory), the timing of refusals, and
/// the latency of a command pushed to a long-polling device.
pub fn run(devices: u64, requests: u64, max_time: Duration) -> anyhow::Result<()> {
    use ecowatt_core::kv::MemoryKv;
    use ecowatt_core::session::{Credentials, Session};
    use ecowatt_proto::messages::{CommandResult, MessageType, SyncRequest};
    use ecowatt_proto::seal::{self, Direction, Header, Keys};

    let body = SyncRequest {
        results: vec![CommandResult {
            command_id: 1,
            succeeded: true,
            exception: None,
            value: Some(50),
            executed_ms: 1,
        }],
        firmware: "1.0.0".into(),
        ..SyncRequest::default()
    }
    .encode();
    let keys = Keys::derive(&[7; 16]);
    let header = |counter| Header {
        msg_type: 1,
        direction: Direction::Up,
        key_version: 1,
        device_id: 1,
        counter,
    };
    let iterations = 200_000;
    outln!(
        "Sealed envelopes, {}-byte sync request body, {iterations} each (single thread):",
        body.len()
    );
    rate("seal (AES-128-GCM)", iterations, |i| {
        black_box(seal::seal(&keys, &header(i + 1), None, black_box(&body)));
    });
    let sealed = seal::seal(&keys, &header(1), None, &body);
    rate("open + verify", iterations, |_| {
        black_box(seal::open(&keys, black_box(&sealed), None).expect("opens"));
    });

    let rt = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::tempdir()?;
    let server = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let file = ecowatt_server::settings::SettingsFile {
            data_dir: Some(scratch.path().to_path_buf()),
            ..Default::default()
        };
        crate::server::InProcess::start(listener, file).await
    })?;
    let mut creds = Vec::new();
    for d in 0..devices {
        let key = [d as u8; 16];
        let device = rt.block_on(ecowatt_server::registration::register(
            &server.state.devices,
            &format!("bench-{d}"),
            10_000,
            &ecowatt_proto::hex::encode_upper(&key),
            "bench",
            ecowatt_formats::time::now_ms(),
        ))?;
        creds.push(Credentials { device_id: device.id.0 as u32, key, key_version: 1 });
    }
    outln!(
        "Sealed syncs against the server on loopback (SQLite), {devices} devices, at most {requests} requests or {max_time:?}:"
    );
    let url = format!("{}/api/v1/device/sync", server.url);
    let per_device = requests.div_ceil(devices);
    let started = Instant::now();
    let deadline = started + max_time;
    let results: Vec<(u64, u64, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = creds
            .iter()
            .map(|c| {
                let url = &url;
                s.spawn(move || {
                    let mut kv = MemoryKv::new();
                    let mut session = Session::start(c.clone(), &mut kv).expect("session");
                    let agent: ureq::Agent =
                        ureq::Agent::config_builder().http_status_as_error(false).build().into();
                    let body = SyncRequest::default().encode();
                    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
                    for _ in 0..per_device {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        let sealed =
                            session.seal(&mut kv, MessageType::SyncRequest, &body).expect("seal");
                        let answer = agent
                            .post(url)
                            .header("content-type", "application/octet-stream")
                            .send(&sealed.bytes[..])
                            .ok()
                            .filter(|r| r.status() == 200)
                            .and_then(|mut r| r.body_mut().read_to_vec().ok());
                        match answer.map(|a| session.open(sealed.counter, &a)) {
                            Some(Ok(_)) => ok += 1,
                            _ => {
                                session.abandon(sealed.counter);
                                failed += 1
                            }
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    (ok, failed, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("device thread")).collect()
    });
    let mut run = Run { ok: 0, failed: 0, latencies_us: Vec::new(), elapsed: started.elapsed() };
    for (ok, failed, lat) in results {
        run.ok += ok;
        run.failed += failed;
        run.latencies_us.extend(lat);
    }
    run.latencies_us.sort_unstable();
    report("sealed sync", &run);
    refusal_times(&rt, &server, &creds[0])?;

    // Push: one device long-polls; an operator queues a command through the API;
    // latency from the API's answer to the device holding the command.
    let name = "bench-push";
    let key = [0xA5u8; 16];
    let device = rt.block_on(ecowatt_server::registration::register(
        &server.state.devices,
        name,
        10_000,
        &ecowatt_proto::hex::encode_upper(&key),
        "bench",
        ecowatt_formats::time::now_ms(),
    ))?;
    let c = Credentials { device_id: device.id.0 as u32, key, key_version: 1 };
    let api: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let queue_url = format!("{}/api/v1/devices/{name}/commands", server.url);
    let token = format!("Bearer {}", server.admin_token);
    let rounds = 50;
    let mut push_lat = Vec::with_capacity(rounds);
    let mut kv = MemoryKv::new();
    let mut session = Session::start(c, &mut kv)?;
    let mut results = Vec::new();
    for _ in 0..rounds {
        // The device runs config v1, so only a command can end the wait.
        let applied = ecowatt_proto::messages::ConfigState {
            version: 1,
            poll_interval_ms: 5_000,
            upload_interval_ms: 900_000,
            registers: 0x03FF,
        };
        let body = SyncRequest {
            wait_ms: 10_000,
            applied: Some(applied),
            results: std::mem::take(&mut results),
            ..SyncRequest::default()
        }
        .encode();
        let sealed = session.seal(&mut kv, MessageType::SyncRequest, &body)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let poll_url = url.clone();
        let counter = sealed.counter;
        let poller = std::thread::spawn(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let answer = agent
                .post(&poll_url)
                .header("content-type", "application/octet-stream")
                .send(&sealed.bytes[..])
                .ok()
                .and_then(|mut r| r.body_mut().read_to_vec().ok());
            let _ = tx.send(Instant::now());
            answer
        });
        std::thread::sleep(Duration::from_millis(20));
        // From the moment the operator sends the command (an upper bound: it includes
        // the operator's own request).
        let queued = Instant::now();
        api.post(&queue_url).header("Authorization", &token).send_json(
            serde_json::json!({"type": "read_register", "parameters": {"register_address": 9}}),
        )?;
        let received = rx.recv_timeout(Duration::from_secs(15))?;
        let answer = poller.join().expect("poller").ok_or_else(|| anyhow::anyhow!("no answer"))?;
        let (_, plain) = session.open(counter, &answer)?;
        let resp = ecowatt_proto::messages::SyncResponse::decode(&plain)?;
        for cmd in resp.commands {
            results.push(CommandResult {
                command_id: cmd.id,
                succeeded: true,
                exception: None,
                value: Some(1),
                executed_ms: 0,
            });
        }
        anyhow::ensure!(received > queued, "the sync ended before the command was sent");
        push_lat.push(received.duration_since(queued).as_micros().min(u32::MAX as u128) as u32);
    }
    push_lat.sort_unstable();
    let push = Run {
        ok: rounds as u64,
        failed: 0,
        latencies_us: push_lat,
        elapsed: Duration::from_secs(1),
    };
    outln!(
        "Push: operator sends a command to the API -> long-polling device holds it ({rounds} rounds):"
    );
    report("push latency", &push);
    rt.block_on(server.stop())?;
    anyhow::ensure!(run.failed == 0, "{} syncs failed", run.failed);
    Ok(())
}
