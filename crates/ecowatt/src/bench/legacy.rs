//! `ecowatt bench legacy`: the original firmware's hot requests (`/changes`
//! and `/command/poll`, each device's every cycle) against a server process
//! with `--legacy-api`: requests per second, and the server's CPU time per
//! request (from /proc, so the load generator's speed does not enter it).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::measure::{ProcFiles, ServerProcess, proc_usage};
use crate::units::parse_duration;

/// `ecowatt bench legacy`.
#[derive(Args, Debug)]
pub struct LegacyArgs {
    /// Legacy devices.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    devices: u64,
    /// Requests in the measurement (half `/changes`, half `/command/poll`), at most.
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    connections: u64,
    /// Time limit of the measurement.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    max_time: Duration,
    /// Database URL (default: SQLite in a temporary directory); use a fresh database.
    #[arg(long)]
    database: Option<String>,
}

pub fn run(args: LegacyArgs) -> anyhow::Result<()> {
    let mut extra = vec!["--legacy-api"];
    if let Some(db) = &args.database {
        extra.extend(["--database", db]);
    }
    let server = ServerProcess::start("legacy-bench", &extra, "ECOWATT_BENCH_SERVER_LOG", "error")?;
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(drive(&args, &server));
    server.stop();
    result
}

/// One request on a keep-alive connection; the answer's body length.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<usize> {
    stream.write_all(request).await?;
    buf.clear();
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = std::str::from_utf8(&buf[..end])?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "answer: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
            })
            .context("no Content-Length")?;
        if buf.len() >= end + 4 + len {
            return Ok(len);
        }
    }
}

fn request(path: &str, device: &str, port: u16) -> Vec<u8> {
    // As the original firmware sends them (its HTTPClient: JSON, keep-alive).
    let body = if path == "/changes" {
        format!(r#"{{"device_id":"{device}","timestamp":123456}}"#)
    } else {
        format!(r#"{{"device_id":"{device}"}}"#)
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: ESP32HTTPClient\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn drive(args: &LegacyArgs, server: &ServerProcess) -> anyhow::Result<()> {
    let (ops, base, token) = server.operator().await?;
    let (port, pid) = (server.port, server.pid());
    let names: Vec<String> = (0..args.devices).map(|i| format!("ESP32_legacy_{i}")).collect();
    {
        let (ops, base, names) = (ops.clone(), base.clone(), names.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for name in &names {
                let r = ops
                    .post(format!("{base}/api/v1/devices"))
                    .header("Authorization", &format!("Bearer {token}"))
                    .send_json(serde_json::json!({"name": name}))?;
                anyhow::ensure!(r.status().is_success(), "adding {name}: {}", r.status());
            }
            Ok(())
        })
        .await??;
    }
    let requests: Vec<Vec<u8>> = names
        .iter()
        .flat_map(|n| [request("/changes", n, port), request("/command/poll", n, port)])
        .collect();
    let requests = std::sync::Arc::new(requests);
    let mut files = ProcFiles::open(pid)?;
    // Warm-up: every device's requests once.
    let mut warm = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    warm.set_nodelay(true)?;
    let mut buf = Vec::new();
    for r in requests.iter() {
        exchange(&mut warm, r, &mut buf).await?;
    }
    drop(warm);

    let per_connection = args.requests.div_ceil(args.connections);
    let deadline = Instant::now() + args.max_time;
    let (_, _, ticks0) = proc_usage(&mut files);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(4096);
            let mut done = 0u64;
            let mut i = (c as usize * 7919) % requests.len();
            while done < per_connection && Instant::now() < deadline {
                exchange(&mut s, &requests[i], &mut buf).await?;
                i = (i + 1) % requests.len();
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (rss, peak, ticks1) = proc_usage(&mut files);
    let cpu_s = (ticks1 - ticks0) as f64 / 100.0;
    outln!(
        "Legacy: {} devices, {} requests (/changes and /command/poll alternating) over {} connections in {:.2} s: {:.0} requests/s",
        args.devices,
        total,
        args.connections,
        elapsed,
        total as f64 / elapsed
    );
    outln!(
        "  server CPU {:.2} s = {:.1} µs per request ({:.0} % of a core); RSS {} MiB (peak {} MiB)",
        cpu_s,
        cpu_s * 1e6 / total.max(1) as f64,
        100.0 * cpu_s / elapsed,
        rss / 1024,
        peak / 1024
    );
    Ok(())
}
