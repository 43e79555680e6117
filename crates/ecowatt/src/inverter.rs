//! `ecowatt inverter`: read and write an inverter (or the simulator) directly.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ecowatt_core::link::{Client, RetryPolicy};
use ecowatt_device::ThreadDelay;
use ecowatt_device::transport::{self, LinkOptions, Transport};
use ecowatt_proto::registers::{self, EXPORT_LIMIT, REGISTER_COUNT, REGISTERS};

use crate::units::{parse_duration, parse_slave};

/// Where the inverter is and how to talk to it.
#[derive(Args, Debug, Clone)]
pub struct LinkArgs {
    /// The inverter: http://host:port (Inverter SIM API), tcp://host:port
    /// (Modbus TCP) or serial:/dev/ttyUSB0?baud=9600&parity=none (RTU over RS485).
    #[arg(long, env = "ECOWATT_INVERTER_URL")]
    pub url: String,
    /// Modbus slave address (decimal or 0x-hex).
    #[arg(long, default_value = "0x11", value_parser = parse_slave)]
    pub slave: u8,
    /// Inverter SIM API key, sent raw in the Authorization header.
    #[arg(long, env = "ECOWATT_SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How long to wait for each answer (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Attempts per request; timeouts and corrupt answers are retried with backoff.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub attempts: u8,
}

impl LinkArgs {
    /// A client over the transport the URL names.
    pub fn client(&self) -> anyhow::Result<Client<Box<dyn Transport + Send>, ThreadDelay>> {
        let options = LinkOptions { timeout: self.timeout, api_key: self.api_key.clone() };
        let transport = transport::open(&self.url, &options)?;
        let policy = RetryPolicy { attempts: self.attempts, ..RetryPolicy::default() };
        Ok(Client::new(transport, ThreadDelay).with_policy(policy))
    }
}

/// Talk to an inverter.
#[derive(Subcommand, Debug)]
pub enum InverterCommand {
    /// Read registers 0..=9 in one request and print them in engineering units.
    Read {
        #[command(flatten)]
        link: LinkArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set the export power limit (register 8), in percent of rated power (0..=100).
    ///
    /// Values outside 0..=100 are refused before anything is sent. The limit is
    /// read back after the write to show that the inverter took it.
    SetLimit {
        /// The new limit, percent of rated power.
        percent: u16,
        #[command(flatten)]
        link: LinkArgs,
    },
}

pub fn run(cmd: InverterCommand) -> anyhow::Result<()> {
    match cmd {
        InverterCommand::Read { link, json } => read(&link, json),
        InverterCommand::SetLimit { percent, link } => set_limit(&link, percent),
    }
}

fn read(link: &LinkArgs, json: bool) -> anyhow::Result<()> {
    let mut client = link.client()?;
    let values = match client
        .read_holding(link.slave, 0, REGISTER_COUNT as u16)
        .with_context(|| format!("reading inverter {:#04x} at {}", link.slave, link.url))?
    {
        Ok(values) => values,
        Err(exception) => bail!("the inverter refused the read: {exception}"),
    };
    if json {
        let registers: Vec<_> = REGISTERS
            .iter()
            .zip(&values)
            .map(|(r, &raw)| {
                serde_json::json!({
                    "address": r.address, "name": r.name, "description": r.description,
                    "raw": raw, "value": r.to_engineering(raw), "unit": r.unit,
                })
            })
            .collect();
        outln!("{}", serde_json::json!({ "slave": link.slave, "registers": registers }));
    } else {
        outln!("Inverter {:#04x} at {}", link.slave, link.url);
        for (r, &raw) in REGISTERS.iter().zip(&values) {
            let decimals = match r.gain {
                100 => 2,
                10 => 1,
                _ => 0,
            };
            outln!(
                "  {:>2} {:<5} {:<38} {:>9.*} {}",
                r.address,
                r.name,
                r.description,
                decimals,
                r.to_engineering(raw),
                r.unit
            );
        }
    }
    Ok(())
}

fn set_limit(link: &LinkArgs, percent: u16) -> anyhow::Result<()> {
    registers::check_write(EXPORT_LIMIT, percent)
        .map_err(|e| anyhow::anyhow!("{e}; nothing was sent"))?;
    let mut client = link.client()?;
    let context = || format!("writing register 8 of inverter {:#04x} at {}", link.slave, link.url);
    if let Err(exception) =
        client.write_single(link.slave, EXPORT_LIMIT, percent).with_context(context)?
    {
        bail!("the inverter refused the new limit: {exception}");
    }
    let now = match client.read_holding(link.slave, EXPORT_LIMIT, 1).with_context(context)? {
        Ok(v) => v[0],
        Err(exception) => bail!("the limit was written, but reading it back failed: {exception}"),
    };
    if now != percent {
        bail!("the inverter echoed the write but reads back {now} %, not {percent} %");
    }
    outln!("Export limit of inverter {:#04x} is now {now} % of rated power.", link.slave);
    Ok(())
}
