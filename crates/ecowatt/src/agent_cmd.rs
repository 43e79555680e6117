//! `ecowatt device --provision FILE --inverter URL [--mqtt URL]`: run the
//! device agent; `ecowatt device --mqtt URL --name NAME --inverter URL`: a
//! device without a server, publishing to (and taken commands from) a broker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ecowatt_device::agent::{self, AgentOptions, Provisioning, RestartMode, Stopped};
use ecowatt_device::mqtt::MqttSettings;
use ecowatt_device::transport::LinkOptions;

use crate::units::{parse_duration, parse_slave};

/// Options of the device agent (given without a subcommand).
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Provisioning file written by `ecowatt device add` (device id, key, server).
    #[arg(long, env = "ECOWATT_PROVISION")]
    provision: Option<PathBuf>,
    /// The inverter: http://host:port (Inverter SIM API), tcp://host:port (Modbus TCP) or serial:/dev/ttyUSB0.
    #[arg(long, env = "ECOWATT_INVERTER_URL")]
    inverter: Option<String>,
    /// Modbus slave address of the inverter.
    #[arg(long, default_value = "0x11", value_parser = parse_slave)]
    slave: u8,
    /// Inverter SIM API key (raw Authorization header).
    #[arg(long, env = "ECOWATT_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Inverter answer timeout.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    inverter_timeout: Duration,
    /// Server URL (http:// or https://), or the device broker that carries the protocol
    /// (mqtt://host[:port] or mqtts://; docs/protocol.md) [default: the provisioning file's].
    #[arg(long = "cloud")]
    cloud: Option<String>,
    /// Where the device keeps its state (counters, unsent samples, config) [default: ./ecowatt-device/NAME].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Samples kept while the server is unreachable before the oldest are dropped (and counted).
    #[arg(long, default_value_t = 17_280)]
    log_capacity: u64,
    /// Samples per upload; a full batch is sent without waiting for the upload interval.
    #[arg(long, default_value_t = 720, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_max: u64,
    /// Public key file (from `ecowatt keygen`: Ed25519 or RSA-2048) whose firmware signatures this device accepts; repeatable [default: the provisioning file's keys].
    #[arg(long = "firmware-key")]
    firmware_keys: Vec<PathBuf>,
    /// How long a newly installed image has to complete a sync before the device returns to the old one.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    health_check: Duration,
    /// After installing an image: restart in this process, or exit with status 75 so that a supervisor (systemd Restart=always) starts the agent again.
    #[arg(long, value_enum, default_value = "in-process")]
    restart: Restart,
    /// Also publish to this MQTT broker (mqtt://[user:password@]host[:port], mqtts:// for TLS): states, availability and Home Assistant discovery. Without --provision: a device with no server at all, whose export limit Home Assistant sets.
    #[arg(long, env = "ECOWATT_DEVICE_MQTT", value_name = "URL")]
    mqtt: Option<String>,
    /// The CA certificate (PEM) of an mqtts:// broker with a private PKI [default: the system's roots].
    #[arg(long, env = "ECOWATT_DEVICE_MQTT_CA_FILE", value_name = "PEM", requires = "mqtt")]
    mqtt_ca_file: Option<PathBuf>,
    /// Prefix of the MQTT topics.
    #[arg(long, default_value = "ecowatt")]
    mqtt_prefix: String,
    /// Home Assistant's MQTT discovery prefix.
    #[arg(long, default_value = "homeassistant")]
    mqtt_discovery_prefix: String,
    /// The device's name, for a device without a server (--mqtt without --provision).
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Restart {
    InProcess,
    Exit,
}

/// Exit status asking a supervisor to start the agent again (EX_TEMPFAIL).
const RESTART_STATUS: i32 = 75;

pub fn run(args: AgentArgs, ca_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mqtt = args.mqtt.as_ref().map(|url| {
        let mut m = MqttSettings::new(url);
        m.topics.prefix = args.mqtt_prefix.clone();
        m.topics.discovery = args.mqtt_discovery_prefix.clone();
        m.ca_file = args.mqtt_ca_file.clone();
        m
    });
    if let Some(m) = &mqtt {
        m.check().map_err(anyhow::Error::msg)?;
    }
    let provisioning = match (&args.provision, &mqtt) {
        (Some(path), _) => Provisioning::load(path)?,
        (None, Some(_)) => {
            let name = args.name.as_deref().context(
                "give --name NAME for a device without a server (--mqtt without --provision)",
            )?;
            if name.is_empty() || name.contains(['/', '+', '#']) {
                anyhow::bail!("--name {name:?}: a device name cannot be empty or hold / + #");
            }
            Provisioning::local(name)
        }
        (None, None) => anyhow::bail!(
            "give --provision FILE (from `ecowatt device add`) to run the device agent, --mqtt URL --name NAME for a device without a server, or a subcommand (see --help)"
        ),
    };
    let cloud = args.provision.is_some();
    let inverter = args
        .inverter
        .clone()
        .context("give --inverter URL (e.g. http://127.0.0.1:8080 for `ecowatt sim`)")?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("ecowatt-device").join(&provisioning.device));
    let mut opts = AgentOptions::new(provisioning, inverter, state_dir);
    opts.server = args.cloud.clone();
    opts.server_ca = ca_file;
    opts.slave = args.slave;
    opts.link = LinkOptions { timeout: args.inverter_timeout, api_key: args.api_key.clone() };
    opts.log_capacity = args.log_capacity;
    opts.batch_max = args.batch_max as usize;
    opts.health_check = args.health_check;
    opts.cloud = cloud;
    opts.mqtt = mqtt;
    opts.restart = match args.restart {
        Restart::InProcess => RestartMode::InProcess,
        Restart::Exit => RestartMode::Exit,
    };
    if !args.firmware_keys.is_empty() {
        opts.firmware_keys = args
            .firmware_keys
            .iter()
            .map(|p| crate::firmware::read_public_key(p))
            .collect::<anyhow::Result<_>>()?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    let stopped =
        rt.block_on(async move { agent::run(opts, crate::signals::stop_requested()).await })?;
    if stopped == Stopped::Restart {
        drop(rt);
        std::process::exit(RESTART_STATUS);
    }
    Ok(())
}
