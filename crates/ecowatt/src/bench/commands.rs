//! The command queue and config shadow through the store, without HTTP.

use std::time::{Duration, Instant};

use ecowatt_server::commands::{CommandOutcome, CommandRequest};
use ecowatt_server::config::ConfigPatch;
use ecowatt_server::store::Store;

use super::measure::{Run, report};

/// Command cycles and config updates per second through the store, in
/// `database` (its schema is created if need be; the bench's devices, named
/// `bench-RANDOM-N`, are removed afterwards with everything of theirs), or
/// in SQLite in a temporary directory.
pub async fn run(
    database: Option<String>,
    workers: u64,
    cycles: u64,
    max_time: Duration,
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let url = database
        .unwrap_or_else(|| ecowatt_server::db::sqlite_url(&scratch.path().join("ecowatt.db")));
    let store = std::sync::Arc::new(Store::open(&url).await?);
    let prefix = format!("bench-{}", &ecowatt_server::devices::new_key()[..8]);
    let now = ecowatt_formats::time::now_ms();
    for w in 0..workers {
        ecowatt_server::registration::register(
            &store.devices(),
            &format!("{prefix}-{w}"),
            10_000,
            "00",
            "bench",
            now,
        )
        .await?;
    }
    outln!(
        "Command store, {} backend, {workers} workers (one device each), at most {cycles} operations or {max_time:?}:",
        store.db().backend()
    );
    let per_worker = cycles.div_ceil(workers);

    // queue -> deliver -> result, each worker on its own device.
    let run = |kind: u8| {
        let (store, prefix) = (store.clone(), prefix.clone());
        async move {
            let started = Instant::now();
            let deadline = started + max_time;
            let mut tasks = Vec::new();
            for w in 0..workers {
                let (store, prefix) = (store.clone(), prefix.clone());
                tasks.push(tokio::spawn(async move {
                    let device = format!("{prefix}-{w}");
                    let mut lat = Vec::with_capacity(per_worker as usize);
                    for i in 0..per_worker {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        let now = ecowatt_formats::time::now_ms();
                        if kind == 0 {
                            let r =
                                CommandRequest::SetPowerPercentage { percentage: (i % 101) as i64 };
                            let commands = store.commands();
                            let c = commands.queue(&device, &r, 600, "bench", now).await?;
                            let got = commands.deliver(&device, 600_000, 1, now).await?;
                            anyhow::ensure!(
                                got.len() == 1 && got[0].id == c.id,
                                "delivered {got:?}"
                            );
                            let ok = CommandOutcome::succeeded();
                            commands.record_result(&device, c.id, &ok, now).await?;
                        } else {
                            let patch = ConfigPatch {
                                poll_interval_ms: Some(1_000 + (i % 1000) as i64),
                                ..Default::default()
                            };
                            store.configs().update(&device, &patch, "bench", now).await?;
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok::<_, anyhow::Error>(lat)
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            all.sort_unstable();
            Ok::<_, anyhow::Error>(Run {
                ok: all.len() as u64,
                failed: 0,
                latencies_us: all,
                elapsed: started.elapsed(),
            })
        }
    };
    let cycles_run = run(0).await?;
    report("cmd cycles", &cycles_run);
    let config_run = run(1).await?;
    report("config upd", &config_run);
    for w in 0..workers {
        store.devices().delete(&format!("{prefix}-{w}"), "bench", now).await?;
    }
    store.close().await;
    Ok(())
}
