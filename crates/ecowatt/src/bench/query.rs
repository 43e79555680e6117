//! `ecowatt bench query`: what reading energy costs. A server in this process
//! (SQLite in a temporary directory, or the PostgreSQL database given) is
//! filled through its own ingest path (the group commit that writes batches
//! and rollups, as device uploads do): one device with a year of samples
//! every 5 s (the simulator's inverter), and a fleet of devices that have
//! reported today. Then, over HTTP on loopback with an operator token, the
//! year's chart (`/rollups`, at most 1,000 points), the year's energy per
//! month, and the fleet's energy today (`/fleet/energy`), each asked
//! `--requests` times: latency quantiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ecowatt_proto::codec::{self, Sample};
use ecowatt_server::protocol::Upload;
use ecowatt_server::telemetry::StoredBatch;
use ecowatt_sim::model::{Model, ModelConfig};

use super::measure::{Run, report};

/// Measure the energy queries against a filled store.
#[derive(Args, Debug)]
pub struct QueryArgs {
    /// Devices that reported today (the fleet view reads each).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    devices: u64,
    /// Days of 5 s samples of the charted device (365: a year).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3_650))]
    days: u64,
    /// Times each query is asked (one after the other).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    requests: u64,
    /// PostgreSQL URL for the server (an empty database; default: SQLite in a temporary directory).
    #[arg(long)]
    database: Option<String>,
}

const STEP_MS: u64 = 5_000;
/// Samples per upload of the charted device: an hour.
const PER_BATCH: usize = 720;
/// Every register.
const MASK: u16 = 0x03ff;

/// One upload of `samples` as the server's ingest takes it (encoded with
/// codec v2, and decoded, as a device upload is).
fn upload_of(samples: &[Sample]) -> anyhow::Result<Upload> {
    let data = codec::encode_as(codec::v2::CODEC_V2, MASK, samples)?;
    let decoded = Arc::new(codec::decode(&data)?);
    Ok(Upload {
        batch: StoredBatch::of(codec::v2::CODEC_V2, MASK, samples, data),
        decoded,
        dropped_total: 0,
        export_limit: None,
    })
}

fn sample(model: &mut Model, seq: u64, unix_ms: u64) -> Sample {
    Sample { seq, unix_ms, values: model.read(unix_ms).to_registers().to_vec() }
}

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run_async(args))
}

async fn run_async(args: QueryArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let file = ecowatt_server::settings::SettingsFile {
        data_dir: Some(scratch.path().to_owned()),
        database: args.database.clone(),
        // The year's 5-minute buckets stay, as in the first 35 days of a real one.
        rollup_5m_retention_days: Some(0),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = crate::server::InProcess::start(listener, file).await?;
    let state = server.state.clone();
    let backend = state.store.db().backend();
    let now = ecowatt_formats::time::now_ms() as u64;
    outln!(
        "Energy queries, {backend} backend: one device with {} days at 5 s, {} devices reporting today",
        args.days,
        args.devices
    );

    // The charted device: a year of hourly uploads, one after the other.
    let started = Instant::now();
    let year = ecowatt_server::registration::register(
        &state.devices,
        "year-1",
        5_000,
        &ecowatt_server::devices::new_key(),
        "bench",
        now as i64,
    )
    .await?;
    let mut model = Model::new(ModelConfig { seed: 1, ..ModelConfig::default() });
    let first_ms = (now - args.days * 86_400_000) / 3_600_000 * 3_600_000;
    let total = (args.days * 86_400_000 / STEP_MS) as usize;
    let mut seq = 0u64;
    let mut counter = 0u64;
    let mut stored = 0usize;
    while stored < total {
        let n = PER_BATCH.min(total - stored);
        let samples: Vec<Sample> = (0..n as u64)
            .map(|i| sample(&mut model, seq + i + 1, first_ms + (stored as u64 + i) * STEP_MS))
            .collect();
        seq += n as u64;
        stored += n;
        counter += 1;
        let up = upload_of(&samples)?;
        let at = ecowatt_formats::time::now_ms();
        state
            .protocol
            .upload(year.id, year.key_version, counter, &up, at)
            .await?
            .map_err(|r| anyhow::anyhow!("upload refused: {r:?}"))?;
    }
    outln!(
        "  filled: {total} samples of year-1 in {counter} uploads ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // The fleet: each device registered and one upload of its last five minutes.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = args.devices.div_ceil(64);
    for t in 0..64u64 {
        let state = state.clone();
        let range = (t * per_task)..((t + 1) * per_task).min(args.devices);
        tasks.spawn(async move {
            for d in range {
                let dev = ecowatt_server::registration::register(
                    &state.devices,
                    &format!("fleet-{d}"),
                    5_000,
                    &ecowatt_server::devices::new_key(),
                    "bench",
                    now as i64,
                )
                .await?;
                let mut model = Model::new(ModelConfig { seed: d + 2, ..ModelConfig::default() });
                let samples: Vec<Sample> = (0..60u64)
                    .map(|i| sample(&mut model, i + 1, now - 300_000 + i * STEP_MS))
                    .collect();
                let at = ecowatt_formats::time::now_ms();
                state
                    .protocol
                    .upload(dev.id, dev.key_version, 1, &upload_of(&samples)?, at)
                    .await?
                    .map_err(|r| anyhow::anyhow!("upload refused: {r:?}"))?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    outln!(
        "  filled: {} devices with five minutes each ({:.1} s)",
        args.devices,
        started.elapsed().as_secs_f64()
    );

    let base = server.url.clone();
    let token = server.admin_token.clone();
    let requests = args.requests;
    let year_from = now - 365 * 86_400_000;
    // The first sample's UTC date (`YYYY-MM-DD`, the device's zone is UTC).
    let first_day = ecowatt_formats::time::iso8601(first_ms as i64)[..10].to_owned();
    let results = tokio::task::spawn_blocking(move || {
        let http: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let ask = |label: &str, path: String, check: &dyn Fn(&serde_json::Value) -> String| {
            let url = format!("{base}{path}");
            let mut lat = Vec::with_capacity(requests as usize);
            let (mut ok, mut failed, mut said) = (0, 0, String::new());
            let t0 = Instant::now();
            for _ in 0..requests {
                let t = Instant::now();
                let answer = http
                    .get(&url)
                    .header("Authorization", &format!("Bearer {token}"))
                    .call()
                    .map_err(anyhow::Error::from)
                    .and_then(|mut r| {
                        anyhow::ensure!(r.status() == 200, "{}", r.status());
                        Ok(r.body_mut().read_json::<serde_json::Value>()?)
                    });
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                match answer {
                    Ok(v) => {
                        ok += 1;
                        said = check(&v);
                    }
                    Err(e) => {
                        failed += 1;
                        said = e.to_string();
                    }
                }
            }
            lat.sort_unstable();
            let run = Run { ok, failed, latencies_us: lat, elapsed: t0.elapsed() };
            report(label, &run);
            outln!("  {:<14} {said}", "");
            run
        };
        let chart = ask(
            "year chart",
            format!(
                "/api/v1/devices/year-1/rollups?from_ms={year_from}&to_ms={now}&registers=Pac&max_points=1000"
            ),
            &|v| {
                format!(
                    "{} points at level {} (a year of Pac: mean, min, max)",
                    v["points"].as_array().map_or(0, Vec::len),
                    v["level"].as_str().unwrap_or("?")
                )
            },
        );
        let months = ask(
            "year by month",
            format!("/api/v1/devices/year-1/energy?period=month&from={first_day}"),
            &|v| {
                format!(
                    "{} months, {:.1} kWh",
                    v["periods"].as_array().map_or(0, Vec::len),
                    v["total_kwh"].as_f64().unwrap_or(0.0)
                )
            },
        );
        let fleet = ask("fleet today", "/api/v1/fleet/energy".to_owned(), &|v| {
            format!(
                "{} devices, {} online, {:.0} W now, {:.1} kWh today",
                v["devices"],
                v["online"],
                v["power_now_w"].as_f64().unwrap_or(0.0),
                v["energy_today_kwh"].as_f64().unwrap_or(0.0)
            )
        });
        [chart, months, fleet]
    })
    .await?;
    server.stop().await?;
    let p99 = |r: &Run| {
        Duration::from_micros(u64::from(super::measure::percentile(&r.latencies_us, 0.99)))
    };
    outln!(
        "  targets: year chart p99 {:?} (< 50 ms), fleet today p99 {:?} (< 200 ms)",
        p99(&results[0]),
        p99(&results[2])
    );
    anyhow::ensure!(results.iter().all(|r| r.failed == 0), "some queries failed");
    Ok(())
}
