//! `ecowatt bench ota`: a firmware update's device side, measured. A server
//! runs as a child process (so its memory is not counted); this process is the
//! device: the core's device machine on the agent's stores (`FileKv`,
//! `FileSlots`) and its HTTP side (`ecowatt_device::net`), as `ecowatt device`
//! runs it: the offer on a sealed sync, range fetches written to the
//! file-backed slot with a sync per chunk, SHA-256, progress records, pending
//! mark. It reports throughput and how much its resident memory grew at the
//! peak (Linux `VmHWM`, reset before each update).

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ecowatt_core::link::TransportError;
use ecowatt_core::machine::{Action, Device, Event, Note, Settings};
use ecowatt_core::session::Credentials;
use ecowatt_device::agent::CHUNK;
use ecowatt_device::filekv::FileKv;
use ecowatt_device::net::Net;
use ecowatt_device::slots::FileSlots;
use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use ecowatt_proto::hex;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `VmHWM` and `VmRSS` of this process, bytes (Linux `/proc`).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak (`VmHWM`) to the current RSS; returns the current RSS.
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    rss().1
}

/// Options of `ecowatt bench ota`.
#[derive(Args, Debug)]
pub struct OtaArgs {
    /// Image size, bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..=32 * 1024 * 1024))]
    size: u64,
    /// Updates to measure (each into a fresh device state).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    runs: u64,
    /// Encrypted rollouts: the image comes in sealed 4 KiB chunks the device decrypts.
    #[arg(long)]
    encrypted: bool,
}

pub fn run(args: OtaArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ecowatt-ota-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(args: &OtaArgs, dir: &Path) -> anyhow::Result<()> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("{e}"))?;
    let signing = SigningKey::from_bytes(&seed);
    let public = signing.verifying_key().to_bytes();
    std::fs::write(dir.join("key.pub"), hex::encode_upper(&public))?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let data_dir = dir.join("server");
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .args(["server", "--bind", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data_dir)
        .arg("--firmware-key")
        .arg(dir.join("key.pub"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the server")?;
    let result = device_side(args, dir, port, &data_dir, &signing, &public);
    let _ = std::process::Command::new("kill").args(["-INT", &server.id().to_string()]).status();
    let _ = server.wait();
    result
}

fn device_side(
    args: &OtaArgs,
    dir: &Path,
    port: u16,
    data_dir: &Path,
    signing: &SigningKey,
    public: &[u8; 32],
) -> anyhow::Result<()> {
    let base = format!("http://127.0.0.1:{port}");
    let http: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let token = super::measure::wait_for_server(&http, &base, data_dir)?;
    let auth = format!("Bearer {token}");
    let call = |method: &str, path: &str, body: Value| -> anyhow::Result<Value> {
        let req = http.post(format!("{base}{path}")).header("Authorization", &auth);
        let mut resp = match method {
            "POST" => req.send_json(&body)?,
            _ => anyhow::bail!("unsupported"),
        };
        let v: Value = resp.body_mut().read_json()?;
        anyhow::ensure!(resp.status().is_success(), "{path}: {v}");
        Ok(v)
    };

    // The image: pseudo-random bytes, signed here.
    let image: Vec<u8> =
        (0..args.size as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let manifest = Manifest {
        version: Version::parse("2.0.0")?,
        size: args.size,
        sha256: Sha256::digest(&image).into(),
        security_counter: 1,
        target: format!("linux-{}", std::env::consts::ARCH),
        created_ms: ecowatt_formats::time::now_ms() as u64,
    };
    let sig = signing.sign(&manifest.signed_bytes().map_err(|e| anyhow::anyhow!("{e}"))?);
    let json = ecowatt_formats::manifest::manifest_json(
        &manifest,
        &PublicKey::Ed25519(*public),
        &sig.to_bytes(),
    );
    let mut resp = http
        .post(format!("{base}/api/v1/firmware"))
        .header("Authorization", &auth)
        .header("ecowatt-manifest", &hex::encode_upper(json.to_string().as_bytes()))
        .send(&image[..])?;
    let fw: Value = resp.body_mut().read_json()?;
    anyhow::ensure!(resp.status().is_success(), "upload: {fw}");
    let image_sha = manifest.sha256;
    drop(image); // not part of what the device holds

    outln!(
        "Firmware update, device side: {:.1} MiB image, {} runs, {} (server in a child process)",
        args.size as f64 / 1_048_576.0,
        args.runs,
        if args.encrypted { "encrypted delivery" } else { "clear delivery" }
    );
    let (mut rates, mut peaks) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        // A device, a rollout for it, and the offer on a sealed sync.
        let name = format!("ota-bench-{run}");
        let v = call("POST", "/api/v1/devices", json!({"name": name}))?;
        let p = &v["provisioning"];
        let key: [u8; 16] = hex::decode(p["key"].as_str().unwrap_or(""))
            .ok()
            .and_then(|k| k.try_into().ok())
            .context("device key")?;
        let creds = Credentials {
            device_id: p["device_id"].as_u64().context("device id")? as u32,
            key,
            key_version: 1,
        };
        call(
            "POST",
            "/api/v1/rollouts",
            json!({"firmware_id": fw["id"], "devices": [name], "encrypted": args.encrypted}),
        )?;
        let net = Net::new(&base, Default::default()).asking_as(creds.device_id, creds.key_version);
        let state = dir.join(format!("device-{run}"));
        let mut settings = Settings::new(Version::parse("1.0.0")?, &manifest.target);
        settings.firmware_keys = vec![PublicKey::Ed25519(*public)];
        settings.chunk = CHUNK;
        let (kv, slots) = (FileKv::open(&state)?, FileSlots::open(&state.join("slots"))?);
        let slot_b = slots.path(ecowatt_core::ota::Slot::B);
        let device = Device::boot(kv, slots, creds, settings, now_ms())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let baseline = reset_peak();
        let (started, fetches) = update(device, &net)?;
        let secs = started.elapsed().as_secs_f64();
        let peak = rss().0.saturating_sub(baseline);
        let written: [u8; 32] = Sha256::digest(std::fs::read(&slot_b)?).into();
        anyhow::ensure!(written == image_sha, "the slot does not hold the image");
        let mib_s = args.size as f64 / 1_048_576.0 / secs;
        outln!(
            "  run {}: {:>7.2} s  {:>7.1} MiB/s  peak RSS +{:>6} KiB over the start of the update  ({} range fetches)",
            run + 1,
            secs,
            mib_s,
            peak / 1024,
            fetches
        );
        rates.push(mib_s);
        peaks.push(peak);
    }
    rates.sort_by(f64::total_cmp);
    outln!(
        "  median {:.1} MiB/s; peak RSS growth at most {} KiB (fetch buffer {} KiB, SHA-256 state, HTTP client)",
        rates[rates.len() / 2],
        peaks.iter().max().unwrap_or(&0) / 1024,
        CHUNK / 1024
    );
    Ok(())
}

fn now_ms() -> u64 {
    ecowatt_formats::time::now_ms() as u64
}

/// Drives the machine (no inverter attached) until the image is installed:
/// when the offer came, and how many fetches it took. Requests run on
/// threads as in the agent, so a held long poll never delays a fetch.
fn update(mut device: Device<FileKv, FileSlots>, net: &Net) -> anyhow::Result<(Instant, u64)> {
    let (events, answers) = mpsc::channel::<Event>();
    let (mut started, mut fetches) = (Instant::now(), 0);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        while let Some(action) = device.poll_action() {
            match action {
                Action::Note(Note::UpdateOffered { .. }) => started = Instant::now(),
                Action::Note(Note::UpdateInstalled { .. }) => return Ok((started, fetches)),
                Action::Note(Note::UpdateFailed { reason, message }) => {
                    anyhow::bail!("update failed ({reason}): {message}")
                }
                Action::Note(_) => {}
                Action::Restart => anyhow::bail!("restart before the image was installed"),
                Action::Inverter { .. } => {
                    let _ = events.send(Event::Inverter(Err(TransportError::Timeout)));
                }
                action => {
                    fetches += u64::from(matches!(action, Action::Fetch { .. }));
                    let (net, events) = (net.clone(), events.clone());
                    std::thread::spawn(move || {
                        if let Some(event) = net.carry(&action) {
                            let _ = events.send(event);
                        }
                    });
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no update within 10 minutes");
        let wait = device.next_wakeup().saturating_sub(now_ms()).min(1_000);
        let event = answers.recv_timeout(Duration::from_millis(wait)).unwrap_or(Event::Tick);
        device.handle(now_ms(), event);
    }
}
