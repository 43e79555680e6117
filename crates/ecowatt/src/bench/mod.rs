//! `ecowatt bench`: repeatable measurements, bounded in count and time, on
//! loopback only. Figures go to `docs/performance.md`.

mod codec;
mod commands;
mod fleet;
mod legacy;
mod measure;
mod micro;
mod ota;
mod protocol;
mod query;
mod sim;

use std::time::Duration;

use clap::Subcommand;

use crate::units::parse_duration;

/// What to measure.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Modbus RTU frame encode/decode (and CRC) operations per second, one core.
    Frames {
        /// Operations per measurement.
        #[arg(long, default_value_t = 2_000_000)]
        iterations: u64,
    },
    /// Simulator requests per second over the SIM HTTP API and Modbus TCP (loopback, in-process).
    Sim {
        /// Requests per protocol, at most.
        #[arg(long, default_value_t = 50_000)]
        requests: u64,
        /// Concurrent clients (one connection each).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
        clients: u64,
        /// Time limit per protocol.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        max_time: Duration,
    },
    /// Telemetry codecs v1 and v2: bytes per sample on a realistic dataset (or
    /// a recorded CSV) against deflate, zstd, a per-column delta + zstd baseline
    /// and the entropy floor; encode and decode speed.
    Codec(codec::CodecArgs),
    /// Device protocol: seal and open per second (one core), and sealed sync
    /// requests per second a server on loopback sustains (SQLite, in process).
    Protocol {
        /// Simulated devices, one thread and one connection each.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
        devices: u64,
        /// Sync requests in total, at most.
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        /// Time limit of the server measurement.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        max_time: Duration,
    },
    /// A simulated fleet against a server process on loopback: uploads, data
    /// points and command delivery latency while devices hold long polls.
    Fleet(fleet::FleetArgs),
    /// One curtailment of a whole simulated fleet (tagged `bench`, long polls
    /// open, each device the core's machine with read-back): time until 50 %,
    /// 99 % and 100 % of devices confirmed, server CPU and memory.
    Curtail(fleet::CurtailArgs),
    /// A firmware update's device side: download throughput (range requests,
    /// slot writes with a sync per chunk, SHA-256) and peak heap, against a
    /// server in a child process.
    Ota(ota::OtaArgs),
    /// The original firmware's hot requests (/changes, /command/poll) against a
    /// server process with --legacy-api: requests/s and server CPU per request.
    Legacy(legacy::LegacyArgs),
    /// Energy reads against a filled store: a year of one device at 5 s charted
    /// in at most 1,000 points, its energy per month, and the fleet's energy
    /// today over many devices (server in this process, SQLite or PostgreSQL).
    Query(query::QueryArgs),
    /// Command queue -> deliver -> result cycles per second, and config updates
    /// per second, through the store (SQLite in a temp dir, or the database given).
    Commands {
        /// Database to run in (e.g. postgres://postgres@127.0.0.1:5432/ecowatt_bench):
        /// its schema is created if need be, and the bench's devices are removed
        /// afterwards; SQLite in a temporary directory if absent.
        #[arg(long)]
        database: Option<String>,
        /// Concurrent workers (one device each).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
        workers: u64,
        /// Cycles (and config updates) in total, at most.
        #[arg(long, default_value_t = 5_000)]
        cycles: u64,
        /// Time limit per measurement.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        max_time: Duration,
    },
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Frames { iterations } => {
            micro::frames(iterations.max(1));
            Ok(())
        }
        BenchCommand::Sim { requests, clients, max_time } => {
            sim::run(requests.max(1), clients, max_time)
        }
        BenchCommand::Fleet(args) => fleet::run(args),
        BenchCommand::Curtail(args) => fleet::run_curtail(args),
        BenchCommand::Ota(args) => ota::run(args),
        BenchCommand::Legacy(args) => legacy::run(args),
        BenchCommand::Codec(args) => codec::run(args),
        BenchCommand::Query(args) => query::run(args),
        BenchCommand::Protocol { devices, requests, max_time } => {
            protocol::run(devices, requests.max(1), max_time)
        }
        BenchCommand::Commands { database, workers, cycles, max_time } => {
            tokio::runtime::Runtime::new()?.block_on(commands::run(
                database,
                workers,
                cycles.max(1),
                max_time,
            ))
        }
    }
}
