//! `ecowatt`: one binary for every EcoWatt role.

// mimalloc rather than glibc's allocator: in the 5-minute fleet benchmark
// glibc's `malloc_consolidate`/`unlink_chunk` grew from ~14 % to ~21 % of the
// server's samples as its heap fragmented (docs/performance.md, Fleet).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints to standard output like `print!`; when the reader has gone
/// (`ecowatt commands list | head -1`), the program ends quietly with status 0
/// instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*), false) };
}

/// [`out!`] with a newline, for `println!`.
macro_rules! outln {
    () => { $crate::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*), true) };
}

mod agent_cmd;
mod bench;
mod broker_cmd;
mod client;
mod curtail;
mod demo;
mod firmware;
mod inverter;
mod look;
mod operator;
mod rollout;
mod schedule;
mod server;
mod signals;
mod sim;
mod tls_cmd;
mod units;

use clap::{Parser, Subcommand};

/// EcoWatt: monitor and control solar inverters from the cloud.
///
/// Start with `ecowatt demo`: it runs an inverter simulator on this machine
/// and shows live readings. `ecowatt <command> --help` explains each command.
#[derive(Parser)]
#[command(name = "ecowatt", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run everything on this machine and watch live readings (the first thing to try).
    Demo(demo::DemoArgs),
    /// Run the inverter simulator: the course's Inverter SIM HTTP API and Modbus TCP.
    Sim(sim::SimArgs),
    /// Talk to an inverter (or the simulator): read its registers, set its export limit.
    #[command(subcommand)]
    Inverter(inverter::InverterCommand),
    /// Run the cloud server (operator API, store; --legacy-api for original firmware).
    Server(server::ServerArgs),
    /// Run the device agent (--provision FILE --inverter URL), or manage devices
    /// (add writes the provisioning file with the device key).
    #[command(args_conflicts_with_subcommands = true)]
    Device {
        #[command(subcommand)]
        cmd: Option<operator::DeviceCommand>,
        #[command(flatten)]
        agent: agent_cmd::AgentArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Change and inspect a device's configuration (poll and upload intervals, registers).
    Config {
        #[command(subcommand)]
        cmd: operator::ConfigCommand,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Queue a command for a device, e.g. `ecowatt command roof-1 set-power-percentage 50 --wait`.
    Command {
        #[command(flatten)]
        args: operator::CommandArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// List, show, cancel, export queued commands and their statistics.
    Commands {
        #[command(subcommand)]
        cmd: operator::CommandsCommand,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Curtail a group's export limit under a lease and follow its confirmations,
    /// e.g. `ecowatt curtail --group feeder-7 30% --lease 15m --wait`; release, show, list.
    Curtail {
        #[command(flatten)]
        args: curtail::CurtailArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Time-of-day export-limit plans run by the device offline, in the site's time zone,
    /// e.g. `ecowatt schedule set roof-1 --tz Europe/Berlin --entry "mon-fri 11:00-14:00 0%"`.
    Schedule {
        #[command(subcommand)]
        cmd: schedule::ScheduleCommand,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Recent samples of a device in engineering units, e.g. `ecowatt telemetry roof-1 --watch`.
    Telemetry {
        #[command(flatten)]
        args: look::TelemetryArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Energy from the server's rollups: `energy roof-1 --period month`, or the fleet today
    /// (power now, energy today, per group, devices below their peers) without a device.
    Energy {
        #[command(flatten)]
        args: look::EnergyArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Every raw sample (at most 7 days) or rollup of a range as CSV or Parquet, e.g.
    /// `ecowatt export roof-1 --data rollups --level 1d --since 8760h --format parquet -o roof-1.parquet`.
    Export {
        #[command(flatten)]
        args: look::ExportArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// The fleet in a few lines: devices online, power now, pending commands,
    /// active rollouts, security events in the last hour.
    Status {
        #[command(flatten)]
        args: look::StatusArgs,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Create, list and revoke operator tokens (roles: admin, viewer).
    Token {
        #[command(subcommand)]
        cmd: operator::TokenCommand,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Show the audit log: who changed what, when.
    Audit {
        /// Entries to show, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// The device transport's MQTT broker: `broker mosquitto --out DIR` writes its per-device
    /// accounts and ACL (each device only its own topics) from the server's devices.
    Broker {
        #[command(subcommand)]
        cmd: broker_cmd::BrokerCommand,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Private TLS certificates for HTTPS (`tls init --host NAME`: a CA and a server certificate).
    #[command(subcommand)]
    Tls(tls_cmd::TlsCommand),
    /// Make a firmware signing key pair, Ed25519 or RSA-2048 (kept offline; the server only gets the public key).
    Keygen(firmware::KeygenArgs),
    /// Sign firmware images and check them (signed manifests: version, size, SHA-256, security counter).
    #[command(subcommand)]
    Firmware(firmware::FirmwareCommand),
    /// Roll a stored firmware image out to devices in waves; follow, pause, resume, abort.
    Rollout {
        #[command(subcommand)]
        cmd: rollout::RolloutCommand,
        #[command(flatten)]
        conn: client::ServerConn,
    },
    /// Measure: Modbus frame rates, simulator requests per second, command queue cycles.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Copy the server's SQLite store while it runs: a consistent, compact
    /// database file (for PostgreSQL use pg_dump; docs/operations.md).
    Backup {
        /// The new file to write (never overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The server's data directory (its store is DATA_DIR/ecowatt.db).
        #[arg(long, env = "ECOWATT_DATA_DIR", default_value = "./ecowatt-data")]
        data_dir: std::path::PathBuf,
        /// Or the store's database URL (sqlite://PATH).
        #[arg(long, env = "ECOWATT_DATABASE", hide_env_values = true)]
        database: Option<String>,
    },
    /// Shell completions on standard output, e.g.
    /// `ecowatt completions bash > ~/.local/share/bash-completion/completions/ecowatt`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Manual pages made from this CLI's own definition: `ecowatt.1` on
    /// standard output (`ecowatt man | man -l -`), or with --out one page per
    /// command (`ecowatt-device-add.1`, ...) into a directory.
    Man {
        /// Write every page into this directory (created if missing).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// `ecowatt backup --out FILE`.
fn backup(
    out: std::path::PathBuf,
    data_dir: std::path::PathBuf,
    database: Option<String>,
) -> anyhow::Result<()> {
    use ecowatt_server::db::sqlite_file;
    let url =
        database.unwrap_or_else(|| ecowatt_server::db::sqlite_url(&data_dir.join("ecowatt.db")));
    let Some(path) = sqlite_file::path_of(&url) else {
        anyhow::bail!(
            "{} is not a SQLite store: back up PostgreSQL with pg_dump (docs/operations.md)",
            url.split('@').next_back().unwrap_or("the database")
        );
    };
    let started = std::time::Instant::now();
    let bytes = tokio::runtime::Runtime::new()?
        .block_on(sqlite_file::backup(&path, &out))
        .map_err(|e| anyhow::anyhow!("backup of {}: {e}", path.display()))?;
    outln!(
        "Backed up {} to {} ({:.1} MB in {:.1} s); restore: stop the server, put it in place of ecowatt.db (and remove ecowatt.db-wal and -shm)",
        path.display(),
        out.display(),
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `ecowatt completions SHELL`.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(
        shell,
        &mut <Cli as clap::CommandFactory>::command(),
        "ecowatt",
        &mut script,
    );
    out!("{}", String::from_utf8(script)?);
    Ok(())
}

/// `ecowatt man [--out DIR]`.
fn man(out: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    let page = |cmd: &clap::Command| -> anyhow::Result<Vec<u8>> {
        let mut roff = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut roff)?;
        Ok(roff)
    };
    let Some(dir) = out else {
        out!("{}", String::from_utf8(page(&cmd)?)?);
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    // Every command, depth first, named after its path: ecowatt-device-add.1.
    let mut todo = vec![("ecowatt".to_owned(), cmd)];
    let mut written = 0;
    while let Some((name, cmd)) = todo.pop() {
        let named = cmd.clone().name(name.clone());
        std::fs::write(dir.join(format!("{name}.1")), page(&named)?)?;
        written += 1;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            todo.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
    }
    outln!("{written} manual pages in {} (man -l {}/ecowatt.1)", dir.display(), dir.display());
    Ok(())
}

/// Writes to standard output for [`out!`] and [`outln!`]: a closed pipe ends
/// the program quietly (nobody reads what it would say); another write error
/// ends it with a message.
fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|()| {
        if newline {
            stdout.write_all(b"\n")?;
        }
        // Line by line, as `println!` to a terminal is: `--watch` and `--wait`
        // show progress as it happens even through a pipe.
        stdout.flush()
    });
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: writing to standard output: {e}");
            std::process::exit(1)
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The services log what they do; the demo and the operator's commands
    // print their own output, which INFO lines would bury (RUST_LOG=info
    // shows them).
    let quiet = !matches!(
        cli.command,
        Verb::Server(_) | Verb::Sim(_) | Verb::Device { cmd: None, .. } | Verb::Bench(_)
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // The fleet bench's thousands of simulated devices would each log
        // their broker connection.
        let bench_devices = matches!(cli.command, Verb::Bench(_)) && !quiet;
        tracing_subscriber::EnvFilter::new(match (quiet, bench_devices) {
            (true, _) => "warn",
            (false, true) => "info,ecowatt_device=warn",
            (false, false) => "info",
        })
    });
    // Colours only on a terminal: a log written to a file or a pipe stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // ECOWATT_LOG_FORMAT=json gives one JSON object per line, for log collectors.
    if std::env::var("ECOWATT_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match cli.command {
        Verb::Demo(args) => demo::run(args),
        Verb::Sim(args) => sim::run(args),
        Verb::Inverter(cmd) => inverter::run(cmd),
        Verb::Bench(cmd) => bench::run(cmd),
        Verb::Server(args) => server::run(args),
        Verb::Keygen(args) => firmware::keygen(args),
        Verb::Tls(cmd) => tls_cmd::run(cmd),
        Verb::Broker { cmd, conn } => broker_cmd::run(cmd, &conn),
        Verb::Firmware(cmd) => firmware::run(cmd),
        Verb::Device { cmd: Some(cmd), conn, .. } => operator::device(&conn, cmd),
        Verb::Device { cmd: None, agent, conn } => agent_cmd::run(agent, conn.ca_file),
        Verb::Config { cmd, conn } => operator::config(&conn, cmd),
        Verb::Command { args, conn } => operator::command(&conn, args),
        Verb::Commands { cmd, conn } => operator::commands(&conn, cmd),
        Verb::Curtail { args, conn } => curtail::run(&conn, args),
        Verb::Schedule { cmd, conn } => schedule::run(&conn, cmd),
        Verb::Telemetry { args, conn } => look::telemetry(&conn, args),
        Verb::Status { args, conn } => look::status(&conn, args),
        Verb::Energy { args, conn } => look::energy(&conn, args),
        Verb::Export { args, conn } => look::export(&conn, args),
        Verb::Token { cmd, conn } => operator::token(&conn, cmd),
        Verb::Audit { limit, conn } => operator::audit(&conn, limit),
        Verb::Rollout { cmd, conn } => rollout::run(&conn, cmd),
        Verb::Backup { out, data_dir, database } => backup(out, data_dir, database),
        Verb::Completions { shell } => completions(shell),
        Verb::Man { out } => man(out),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
