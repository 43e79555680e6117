//! Firmware updates end to end: simulator, server and agent in one process,
//! the image signed here, uploaded, rolled out, downloaded with ranges,
//! installed on the file-backed A/B slots and confirmed (or rolled back).

use std::path::Path;
use std::time::Duration;

use ecowatt_core::ota::{BootRecord, Slot};
use ecowatt_device::agent::{AgentOptions, Provisioning, RestartMode, Stopped};
use ecowatt_device::filekv::FileKv;
use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use ecowatt_testkit::TestSim;
use ecowatt_testkit::server::{TempDb, TestServer};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::agent::{Op, provision, start};

const K1: [u8; 32] = [11; 32];
const K2: [u8; 32] = [22; 32];

fn public(seed: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(seed).verifying_key().to_bytes()
}

fn public_hex(seed: &[u8; 32]) -> String {
    ecowatt_proto::hex::encode_upper(&public(seed))
}

fn image(len: usize, salt: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 13) as u8)
        .collect()
}

fn manifest(data: &[u8], version: &str) -> Manifest {
    Manifest {
        version: Version::parse(version).unwrap(),
        size: data.len() as u64,
        sha256: Sha256::digest(data).into(),
        security_counter: 1,
        target: format!("linux-{}", std::env::consts::ARCH),
        created_ms: 1_800_000_000_000,
    }
}

fn sign(m: &Manifest, seed: &[u8; 32]) -> [u8; 64] {
    SigningKey::from_bytes(seed).sign(&m.signed_bytes().unwrap()).to_bytes()
}

/// The RSA-2048 test key (made for the tests, never for firmware).
fn rsa_key() -> (rsa::RsaPrivateKey, PublicKey) {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let k = rsa::RsaPrivateKey::from_pkcs8_pem(include_str!(
        "../../../ecowatt-proto/tests/it/keys/rsa-test-1.pem"
    ))
    .unwrap();
    let n = PublicKey::from_bytes(&k.n().to_bytes_be()).unwrap();
    (k, n)
}

/// Uploads a signed image as `ecowatt firmware upload` does.
async fn upload(op: &Op, data: &[u8], version: &str, seed: &[u8; 32]) -> i64 {
    let m = manifest(data, version);
    let key = PublicKey::Ed25519(public(seed));
    upload_signed(op, data, &m, &key, &sign(&m, seed)).await
}

/// Uploads an image signed with RSA-2048 PKCS#1 v1.5 / SHA-256.
async fn upload_rsa(op: &Op, data: &[u8], version: &str) -> i64 {
    use rsa::signature::{SignatureEncoding, Signer as _};
    let m = manifest(data, version);
    let (k, public) = rsa_key();
    let sig = rsa::pkcs1v15::SigningKey::<Sha256>::new(k).sign(&m.signed_bytes().unwrap()).to_vec();
    upload_signed(op, data, &m, &public, &sig).await
}

async fn upload_signed(op: &Op, data: &[u8], m: &Manifest, key: &PublicKey, sig: &[u8]) -> i64 {
    let json = ecowatt_formats::manifest::manifest_json(m, key, sig);
    let (url, token, data) = (op.url.clone(), op.token.clone(), data.to_vec());
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut resp = agent
            .post(&format!("{url}/api/v1/firmware"))
            .header("Authorization", &format!("Bearer {token}"))
            .header(
                "ecowatt-manifest",
                &ecowatt_proto::hex::encode_upper(json.to_string().as_bytes()),
            )
            .send(&data[..])
            .unwrap();
        let v: Value = resp.body_mut().read_json().unwrap();
        assert_eq!(resp.status(), 201, "{v}");
        v["id"].as_i64().unwrap()
    })
    .await
    .unwrap()
}

fn options(p: &Provisioning, sim: &TestSim, state: &Path) -> AgentOptions {
    let mut opts = AgentOptions::new(p.clone(), sim.http_url(), state.to_path_buf());
    opts.batch_max = 3;
    opts.long_poll_ms = 2_000;
    opts.firmware = "1.0.0".into();
    opts.clock = std::sync::Arc::new(ecowatt_device::clock::FastClock::new(super::agent::SPEED));
    opts
}

async fn rollout_state(op: &Op, id: i64, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    op.until(&format!("/api/v1/rollouts/{id}"), what, Duration::from_secs(40), ok).await
}

fn boot_record(state: &Path) -> BootRecord {
    let mut kv = FileKv::open(state).unwrap();
    BootRecord::load(&mut kv, &Version::parse("1.0.0").unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_updates_the_device_which_restarts_into_the_new_image_and_confirms_it() {
    let sim = TestSim::start(1).await;
    let db = TempDb::sqlite();
    let rsa_hex = ecowatt_proto::hex::encode_upper(rsa_key().1.as_bytes());
    let keys = vec![public_hex(&K1), rsa_hex];
    let server = TestServer::start_with(&db, false, "127.0.0.1:0", keys.clone()).await;
    let op = Op::of(&server);
    let p = provision(&op, "roof-1").await;
    assert_eq!(p.firmware_keys, keys, "the provisioning file carries the trusted keys");
    let state = db.dir.path().join("device");
    let agent = start(options(&p, &sim, &state));
    op.until(
        "/api/v1/devices/roof-1",
        "the device to report 1.0.0",
        Duration::from_secs(20),
        |v| v["device"]["firmware"] == "1.0.0",
    )
    .await;

    let data = image(300_000, 1);
    let fw = upload(&op, &data, "1.1.0", &K1).await;
    let r = op
        .call("POST", "/api/v1/rollouts", Some(json!({"firmware_id": fw, "devices": ["roof-1"]})))
        .await;
    let id = r["id"].as_i64().unwrap();
    let r = rollout_state(&op, id, "the rollout to complete", |v| v["state"] == "completed").await;
    let dev = &r["devices"][0];
    assert_eq!(
        (dev["state"].as_str(), dev["running"].as_str()),
        (Some("succeeded"), Some("1.1.0"))
    );
    assert_eq!(dev["percent"], 100);
    let d = op.call("GET", "/api/v1/devices/roof-1", None).await;
    assert_eq!(d["device"]["firmware"], "1.1.0", "the device reports what it really runs");
    // The image is in slot B, byte for byte, and slot B is the confirmed one.
    assert_eq!(std::fs::read(state.join("slots").join("slot-b.bin")).unwrap(), data);
    let rec = boot_record(&state);
    assert_eq!((rec.active, rec.version.to_string(), rec.pending), (Slot::B, "1.1.0".into(), None));
    assert_eq!(rec.security_counter, 1);

    // After a restart it still runs the new image: a command queued while it
    // is down can only be answered by a sync of the restarted agent, and that
    // sync reports the version it booted.
    agent.stop().await;
    let read = op
        .call(
            "POST",
            "/api/v1/devices/roof-1/commands",
            Some(json!({"type": "read_register", "parameters": {"register_address": 9}})),
        )
        .await;
    let agent = start(options(&p, &sim, &state));
    op.until(
        &format!("/api/v1/commands/{}", read["id"]),
        "a result from the restarted agent",
        Duration::from_secs(20),
        |v| v["status"] == "succeeded",
    )
    .await;
    let d = op.call("GET", "/api/v1/devices/roof-1", None).await;
    assert_eq!(d["device"]["firmware"], "1.1.0", "the restarted agent runs the new image");
    assert_eq!(boot_record(&state).active, Slot::B);

    // The next update is signed with RSA-2048 (the seed's scheme) and lands in slot A.
    let data = image(200_000, 9);
    let fw = upload_rsa(&op, &data, "1.2.0").await;
    let r = op
        .call("POST", "/api/v1/rollouts", Some(json!({"firmware_id": fw, "devices": ["roof-1"]})))
        .await;
    let r = rollout_state(&op, r["id"].as_i64().unwrap(), "the RSA-signed rollout", |v| {
        v["state"] == "completed"
    })
    .await;
    assert_eq!(r["devices"][0]["running"], "1.2.0");
    assert_eq!(std::fs::read(state.join("slots").join("slot-a.bin")).unwrap(), data);
    assert_eq!(boot_record(&state).active, Slot::A);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_images_never_switch_slots_and_a_failing_wave_aborts_the_rollout() {
    let sim = TestSim::start(3).await;
    let db = TempDb::sqlite();
    let keys = vec![public_hex(&K1), public_hex(&K2)];
    let server = TestServer::start_with(&db, false, "127.0.0.1:0", keys).await;
    let op = Op::of(&server);
    let mut agents = Vec::new();
    for name in ["a", "b", "c"] {
        let p = provision(&op, name).await;
        let mut opts = options(&p, &sim, &db.dir.path().join(name));
        opts.slave = 0x11 + agents.len() as u8;
        // The devices trust K1 only (the server trusts both).
        opts.firmware_keys = vec![PublicKey::Ed25519(public(&K1))];
        agents.push(start(opts));
    }

    // A downgrade, properly signed, is refused.
    let old = upload(&op, &image(10_000, 2), "0.9.0", &K1).await;
    let r = op
        .call("POST", "/api/v1/rollouts", Some(json!({"firmware_id": old, "devices": ["a"]})))
        .await;
    let r = rollout_state(&op, r["id"].as_i64().unwrap(), "the downgrade to be refused", |v| {
        v["devices"][0]["state"] == "failed"
    })
    .await;
    assert_eq!(r["devices"][0]["reason"], "downgrade");
    assert_eq!(r["state"], "aborted", "1 failure of 1 passes the default 20% threshold");

    // A newer image signed by a key the devices do not trust: the first wave
    // fails, the rollout aborts, the last device is never offered it.
    let evil = upload(&op, &image(50_000, 3), "1.2.0", &K2).await;
    let r = op
        .call(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"firmware_id": evil, "devices": ["a", "b", "c"], "waves": [50, 100],
                        "failure_threshold_pct": 50})),
        )
        .await;
    let r = rollout_state(&op, r["id"].as_i64().unwrap(), "the rollout to abort", |v| {
        v["state"] == "aborted"
    })
    .await;
    let states: Vec<(&str, &str)> = r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["state"].as_str().unwrap(), d["reason"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        states,
        [("failed", "bad_signature"), ("failed", "bad_signature"), ("cancelled", "")],
        "{r}"
    );
    for name in ["a", "b", "c"] {
        let state = db.dir.path().join(name);
        let rec = boot_record(&state);
        assert_eq!(
            (rec.active, rec.version.to_string(), rec.pending),
            (Slot::A, "1.0.0".into(), None)
        );
        let slot_b = state.join("slots").join("slot-b.bin");
        assert!(!slot_b.exists(), "{name}: nothing was written to the inactive slot");
        let d = op.call("GET", &format!("/api/v1/devices/{name}"), None).await;
        assert_eq!(d["device"]["firmware"], "1.0.0");
    }
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_cannot_reach_the_cloud_is_rolled_back_and_reported() {
    let sim = TestSim::start(1).await;
    let db = TempDb::sqlite();
    let keys = vec![public_hex(&K1)];
    let server = TestServer::start_with(&db, false, "127.0.0.1:0", keys.clone()).await;
    let addr = server.addr.to_string();
    let op = Op::of(&server);
    let p = provision(&op, "roof-1").await;
    let state = db.dir.path().join("device");
    let mut opts = options(&p, &sim, &state);
    // Exit after installing, as under a supervisor, so the test decides when it boots again.
    opts.restart = RestartMode::Exit;
    opts.health_check = Duration::from_secs(2);

    let fw = upload(&op, &image(120_000, 4), "1.1.0", &K1).await;
    let r = op
        .call("POST", "/api/v1/rollouts", Some(json!({"firmware_id": fw, "devices": ["roof-1"]})))
        .await;
    let id = r["id"].as_i64().unwrap();
    let first = start(opts.clone());
    let stopped = tokio::time::timeout(Duration::from_secs(40), first.task).await.unwrap().unwrap();
    assert_eq!(stopped, Stopped::Restart, "installed: the agent asks to be restarted");
    assert!(boot_record(&state).pending.is_some());

    // The new image boots on trial while the cloud is down: its health check
    // fails and it asks for a restart...
    server.stop().await;
    let trial = start(opts.clone());
    let stopped = tokio::time::timeout(Duration::from_secs(20), trial.task).await.unwrap().unwrap();
    assert_eq!(stopped, Stopped::Restart);
    // ...which boots the old image again and reports the rollback.
    let server = TestServer::start_with(&db, false, &addr, keys).await;
    let op = Op::of(&server);
    let again = start(opts);
    let r = rollout_state(&op, id, "the rollback to be reported", |v| {
        v["devices"][0]["state"] == "rolled_back"
    })
    .await;
    assert_eq!(r["devices"][0]["reason"], "health_check_failed");
    assert_eq!(r["state"], "aborted");
    op.until("/api/v1/devices/roof-1", "the old version", Duration::from_secs(10), |v| {
        v["device"]["firmware"] == "1.0.0"
    })
    .await;
    let rec = boot_record(&state);
    assert_eq!((rec.active, rec.version.to_string(), rec.pending), (Slot::A, "1.0.0".into(), None));
    // Reported, then cleared once the server has acknowledged the report
    // (polled: the agent's long polls make the moment vary).
    let t0 = std::time::Instant::now();
    while boot_record(&state).rolled_back.is_some() {
        assert!(t0.elapsed() < Duration::from_secs(15), "the rollback record was never cleared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    again.stop().await;
}

/// What the [`Proxy`] does to the image downloads passing through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meddle {
    /// Nothing.
    Pass,
    /// The next download's connection is cut after this many body bytes.
    CutAfter(usize),
    /// Every download from now on has this byte of its body flipped.
    Flip(usize),
}

/// A TCP proxy in front of the server that can cut or alter image downloads
/// (`GET /api/v1/device/firmware/…`): one request at a time per connection,
/// as the agent sends them.
struct Proxy {
    url: String,
    meddle: std::sync::Arc<std::sync::Mutex<Meddle>>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// The request line of every download, in order.
    downloads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proxy {
    async fn start(to: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let meddle = std::sync::Arc::new(std::sync::Mutex::new(Meddle::Pass));
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let downloads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, c, d) = (meddle.clone(), cuts.clone(), downloads.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (m, c, d) = (m.clone(), c.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(to).await else { return };
                    let (mut from_client, mut client_out) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    // Requests go through as they come; a download's request
                    // marks the answer that follows it.
                    let pending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let marked = pending.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_client.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if buf[..n].starts_with(b"GET /api/v1/device/firmware/") {
                                let line = String::from_utf8_lossy(&buf[..n]);
                                d.lock()
                                    .unwrap()
                                    .push(line.lines().next().unwrap_or("").to_owned());
                                marked.store(true, Ordering::SeqCst);
                            }
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut held: Vec<u8> = Vec::new();
                    loop {
                        // One answer: its header, then content-length bytes.
                        let body_at = loop {
                            if let Some(p) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            match from_server.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => held.extend_from_slice(&buf[..n]),
                            }
                        };
                        let text = String::from_utf8_lossy(&held[..body_at]).to_ascii_lowercase();
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while held.len() < body_at + len {
                            match from_server.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => held.extend_from_slice(&buf[..n]),
                            }
                        }
                        let mut answer: Vec<u8> = held.drain(..body_at + len).collect();
                        let download = pending.swap(false, Ordering::SeqCst);
                        let meddle = if download { *m.lock().unwrap() } else { Meddle::Pass };
                        match meddle {
                            Meddle::Pass => {}
                            Meddle::Flip(at) if at < len => answer[body_at + at] ^= 0x01,
                            Meddle::Flip(_) => {}
                            Meddle::CutAfter(k) => {
                                *m.lock().unwrap() = Meddle::Pass;
                                c.fetch_add(1, Ordering::Relaxed);
                                let _ = client_out.write_all(&answer[..body_at + k.min(len)]).await;
                                return; // the connection closes mid-body
                            }
                        }
                        if client_out.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Proxy { url, meddle, cuts, downloads }
    }

    fn set(&self, m: Meddle) {
        *self.meddle.lock().unwrap() = m;
    }
}

/// GETs `path` from the server as anyone could: status and body.
async fn get(url: &str, path: &str) -> (u16, Vec<u8>) {
    let full = format!("{url}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut r = agent.get(&full).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_vec().unwrap())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_rollout_resumes_a_cut_download_refuses_altered_chunks_and_stays_private() {
    let sim = TestSim::start(2).await;
    let db = TempDb::sqlite();
    let server = TestServer::start_with(&db, false, "127.0.0.1:0", vec![public_hex(&K1)]).await;
    let op = Op::of(&server);
    let proxy = Proxy::start(server.addr).await;
    let (pa, pb) = (provision(&op, "a").await, provision(&op, "b").await);
    let (state_a, state_b) = (db.dir.path().join("a"), db.dir.path().join("b"));
    let mut opts = options(&pa, &sim, &state_a);
    opts.server = Some(proxy.url.clone());
    let agent = start(opts);

    // Device a: an encrypted rollout, its download cut once in the middle of a chunk.
    let data = image(150_000, 5);
    let fw = upload(&op, &data, "1.1.0", &K1).await;
    proxy.set(Meddle::CutAfter(5_000));
    let r = op
        .call(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"firmware_id": fw, "devices": ["a"], "encrypted": true})),
        )
        .await;
    assert_eq!(r["encrypted"], true);
    let id = r["id"].as_i64().unwrap();
    let r =
        rollout_state(&op, id, "the encrypted rollout to complete", |v| v["state"] == "completed")
            .await;
    assert_eq!(r["devices"][0]["running"], "1.1.0", "{r}");
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::Relaxed), 1, "a download was cut");
    assert_eq!(std::fs::read(state_a.join("slots").join("slot-b.bin")).unwrap(), data);

    // What the download URL gives anyone is ciphertext: not the image, and
    // longer by a tag per 4 KiB chunk. Asked as device b, it is refused.
    // The agent says who asks: `GET /api/v1/device/firmware/TOKEN?device=ID&key=1 HTTP/1.1`.
    let line = proxy.downloads.lock().unwrap()[0].clone();
    let target = line.split(' ').nth(1).unwrap().to_owned();
    let (path, asker) = target.split_once('?').unwrap();
    assert_eq!(asker, format!("device={}&key={}", pa.device_id, pa.key_version), "{line}");
    let token = path.rsplit('/').next().unwrap().to_owned();
    let path = format!("/api/v1/device/firmware/{token}");
    let (status, stream) = get(&server.url, &path).await;
    assert_eq!(status, 200);
    assert_eq!(stream.len(), 150_000 + 16 * 150_000usize.div_ceil(4_096));
    assert!(stream.windows(64).all(|w| w != &data[4_096..4_160]), "plaintext in the stream");
    let (status, body) = get(&server.url, &format!("{path}?device={}", pb.device_id)).await;
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("image_for_another_device"));
    server.flush_security_events().await;
    let events = op.call("GET", "/api/v1/security-events", None).await;
    assert!(events.to_string().contains("image_for_another_device"), "{events}");

    // Device b: every download altered in one byte of its body. The chunk is
    // refused, nothing is switched, and the rollout says why.
    let mut opts = options(&pb, &sim, &state_b);
    opts.slave = 0x12;
    opts.server = Some(proxy.url.clone());
    let agent_b = start(opts);
    proxy.set(Meddle::Flip(100));
    let fw = upload(&op, &image(40_000, 6), "1.2.0", &K1).await;
    let r = op
        .call(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"firmware_id": fw, "devices": ["b"], "encrypted": true})),
        )
        .await;
    let r = rollout_state(&op, r["id"].as_i64().unwrap(), "the altered download to fail", |v| {
        v["devices"][0]["state"] == "failed"
    })
    .await;
    assert_eq!(r["devices"][0]["reason"], "decrypt_failed", "{r}");
    let rec = boot_record(&state_b);
    assert_eq!((rec.active, rec.version.to_string(), rec.pending), (Slot::A, "1.0.0".into(), None));
    agent.stop().await;
    agent_b.stop().await;
}
