//! `ecowatt`: one binary for every EcoWatt role.

mod bench;
mod demo;
mod inverter;
mod sim;
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
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this machine and watch live readings (the first thing to try).
    Demo(demo::DemoArgs),
    /// Run the inverter simulator: the course's Inverter SIM HTTP API and Modbus TCP.
    Sim(sim::SimArgs),
    /// Talk to an inverter (or the simulator): read its registers, set its export limit.
    #[command(subcommand)]
    Inverter(inverter::InverterCommand),
    /// Measure: Modbus frame encode/decode rates, simulator requests per second.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Inverter(cmd) => inverter::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
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
