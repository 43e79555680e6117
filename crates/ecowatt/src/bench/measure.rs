//! What every bench shares: a run's counts and latencies, their quantiles
//! and report line, operations per second, and waiting for a server child.

use std::time::{Duration, Instant};

/// The outcome of a load: counts, sorted latencies, and how long it took.
pub struct Run {
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Latencies, µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Wall time.
    pub elapsed: Duration,
}

/// The `p` quantile (0..=1) of sorted latencies, 0 when there are none.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One line: rate, counts and latency quantiles.
pub fn report(label: &str, run: &Run) {
    let pct = |p: f64| percentile(&run.latencies_us, p);
    outln!(
        "  {label:<14} {:>9.0} req/s  ok {:>7}  failed {:>4}  p50 {:>6} us  p99 {:>6} us  max {:>7} us  ({:.1} s)",
        run.ok as f64 / run.elapsed.as_secs_f64(),
        run.ok,
        run.failed,
        pct(0.50),
        pct(0.99),
        run.latencies_us.last().copied().unwrap_or(0),
        run.elapsed.as_secs_f64()
    );
}

/// Runs `f` `iterations` times and prints operations per second.
pub fn rate(label: &str, iterations: u64, f: impl Fn(u64)) {
    let started = Instant::now();
    for i in 0..iterations {
        f(i);
    }
    let secs = started.elapsed().as_secs_f64();
    outln!(
        "  {label:<44} {:>12.0} ops/s  {:>7.1} ns/op",
        iterations as f64 / secs,
        secs * 1e9 / iterations as f64
    );
}

/// Waits (up to 30 s) for a server child at `base` to answer `/healthz` and to
/// have written its first admin token into `data_dir`; returns the token.
pub fn wait_for_server(
    http: &ureq::Agent,
    base: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(data_dir.join("admin.token")) {
            if http.get(format!("{base}/healthz")).call().is_ok_and(|r| r.status() == 200) {
                return Ok(t.trim().to_owned());
            }
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "the server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process's `/proc` files, opened before the bench holds thousands of
/// sockets (later opens could fail for want of descriptors).
pub struct ProcFiles {
    status: std::fs::File,
    stat: std::fs::File,
}

impl ProcFiles {
    pub fn open(pid: u32) -> anyhow::Result<ProcFiles> {
        Ok(ProcFiles {
            status: std::fs::File::open(format!("/proc/{pid}/status"))?,
            stat: std::fs::File::open(format!("/proc/{pid}/stat"))?,
        })
    }
}

fn reread(f: &mut std::fs::File) -> Option<String> {
    use std::io::{Read, Seek};
    f.rewind().ok()?;
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    Some(s)
}

/// (RSS kB, peak RSS kB, CPU ticks) of a process, from /proc.
pub fn proc_usage(files: &mut ProcFiles) -> (u64, u64, u64) {
    let status = reread(&mut files.status).unwrap_or_default();
    let kb = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let (rss, peak) = (kb("VmRSS:"), kb("VmHWM:"));
    let ticks = reread(&mut files.stat)
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (rss, peak, ticks)
}

/// An `ecowatt server` child process on a free loopback port with a data
/// directory of its own, for the benches that measure a server from outside.
pub struct ServerProcess {
    child: std::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data directory (removed at [`ServerProcess::stop`]).
    pub dir: std::path::PathBuf,
}

impl ServerProcess {
    /// Starts `ecowatt server ARGS` (every simulated device connects from
    /// loopback, so the per-address connection cap is lifted); its log filter
    /// is `log_env` if set, else `default_log`.
    pub fn start(
        name: &str,
        args: &[&str],
        log_env: &str,
        default_log: &str,
    ) -> anyhow::Result<ServerProcess> {
        use anyhow::Context;
        let dir = std::env::temp_dir().join(format!("ecowatt-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["server", "--bind", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(&dir)
            .args(["--max-connections-per-source", "1000000"])
            .args(args)
            .env("RUST_LOG", std::env::var(log_env).unwrap_or(default_log.into()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the server")?;
        Ok(ServerProcess { child, port, dir })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until it answers (off the async runtime); an operator agent,
    /// its base URL and the admin token.
    pub async fn operator(&self) -> anyhow::Result<(ureq::Agent, String, String)> {
        let base = format!("http://127.0.0.1:{}", self.port);
        let ops: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let (agent, url, dir) = (ops.clone(), base.clone(), self.dir.clone());
        let token =
            tokio::task::spawn_blocking(move || wait_for_server(&agent, &url, &dir)).await??;
        Ok((ops, base, token))
    }

    /// Stops it gracefully (SIGINT) and removes its data directory.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
