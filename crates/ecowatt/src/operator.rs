//! Operator commands, all through the server's API: `device`, `token`,
//! `config`, `command`, `commands`, `audit`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{ServerConn, segment, when};
use crate::units::{parse_duration, parse_power_w};

/// Manage devices.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device: creates its 128-bit key and writes a provisioning file
    /// for the device agent. The key is shown only this once.
    Add {
        /// Device name (letters, digits, _ - .), e.g. the seed's ESP32_EcoWatt_Smart.
        name: String,
        /// Rated AC power of its inverter (set_power converts watts with it).
        #[arg(long, default_value = "10kW", value_parser = parse_power_w)]
        rated_power: u32,
        /// Where to write the provisioning file [default: NAME.provision.json].
        #[arg(long)]
        out: Option<PathBuf>,
        /// A tag (group for `ecowatt curtail`); repeat for several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Its fail-safe export limit: `40%` or `hold` (docs/export-control.md).
        #[arg(long)]
        failsafe: Option<String>,
        /// The site's IANA time zone, where its energy days begin, e.g. Europe/Berlin [default: UTC].
        #[arg(long)]
        tz: Option<String>,
    },
    /// Set the site's IANA time zone (where its energy days begin), e.g. `device timezone roof-1 Europe/Berlin`.
    Timezone {
        /// Device name.
        name: String,
        /// IANA time zone.
        tz: String,
    },
    /// List devices: state (online, offline, disabled), firmware, last seen.
    List {
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set the fail-safe export limit a device applies when a leased limit
    /// lapses (the server silent for the lease): `40%`, `hold` (no change),
    /// or `clear` (unset: the device takes no leased limits).
    Failsafe {
        /// Device name.
        name: String,
        /// `40%` (0..=100), `hold`, or `clear`.
        value: String,
    },
    /// Set the rate at which a device reaches a new export limit by default,
    /// % of rated power per second (e.g. 2.5), or `off` (at once).
    Ramp {
        /// Device name.
        name: String,
        /// `2.5` (0.01..=100) or `off`.
        rate: String,
    },
    /// Replace a device's tags (groups for `ecowatt curtail --group`); none clears them.
    Tag {
        /// Device name.
        name: String,
        /// Tags, e.g. feeder-7 site-north.
        tags: Vec<String>,
    },
    /// Show a device's export control: tags, fail-safe, leased limit, episodes.
    Control {
        /// Device name.
        name: String,
    },
    /// Show a device: state, firmware, config desired and applied, newest reading.
    Show {
        /// Device name.
        name: String,
        /// The API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Disable a device: the server refuses it until enabled again.
    Disable {
        /// Device name.
        name: String,
    },
    /// Enable a disabled device.
    Enable {
        /// Device name.
        name: String,
    },
    /// Mark a device as running the original (seed) firmware, or no longer:
    /// while on, its legacy /process uploads are accepted under the
    /// original's weak, shared-key security (docs/migration.md).
    Legacy {
        /// Device name.
        name: String,
        /// `on` while it runs the original firmware, `off` once migrated.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Remove a device, its config and its commands (the audit log keeps its history).
    Remove {
        /// Device name.
        name: String,
    },
    /// Write the provisioning partition of an ESP32-C3 device (offline): the
    /// provisioning file's identity, key, server and firmware keys, and the
    /// Wi-Fi network. Flash it with `espflash write-bin 0x3F0000 FILE`
    /// (docs/firmware-esp32c3.md); it is never compiled into the image.
    ProvisionImage {
        /// The device's provisioning file (from `device add`).
        #[arg(long)]
        provision: PathBuf,
        /// Wi-Fi network name.
        #[arg(long)]
        wifi_ssid: String,
        /// Wi-Fi password (empty for an open network).
        #[arg(long, env = "ECOWATT_WIFI_PASSWORD", hide_env_values = true, default_value = "")]
        wifi_password: String,
        /// The server the device reaches, if not the provisioning file's
        /// (the device resolves names with DNS; `http://` only).
        #[arg(long)]
        server: Option<String>,
        /// Partition size, bytes (the partition table's `provision`).
        #[arg(long, default_value_t = 0x10000)]
        size: usize,
        /// Where to write it [default: NAME.provision.bin].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Give a device a new key and write a new provisioning file.
    RotateKey {
        /// Device name.
        name: String,
        /// Where to write the provisioning file [default: NAME.provision.json].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn write_provisioning(v: &Value, name: &str, out: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{name}.provision.json")));
    let text = serde_json::to_string_pretty(&v["provisioning"])?;
    ecowatt_formats::secret::write_secret(&path, &text)?;
    Ok(path)
}

/// The provisioning partition's bytes for a device.
pub fn provision_image(
    file: &ecowatt_device::agent::Provisioning,
    wifi_ssid: &str,
    wifi_password: &str,
    server: Option<String>,
    size: usize,
) -> anyhow::Result<Vec<u8>> {
    let bad = |e: String| anyhow::anyhow!("provisioning file: {e}");
    let server = server.unwrap_or_else(|| file.server.clone()).trim_end_matches('/').to_owned();
    if ecowatt_core::http1::Origin::parse(&server).is_err() {
        bail!("the server must be http://host[:port] (the device speaks plain HTTP): {server:?}");
    }
    let p = ecowatt_core::provision::Provision {
        device: file.device.clone(),
        creds: file.credentials().map_err(bad)?,
        server,
        wifi_ssid: wifi_ssid.to_owned(),
        wifi_password: wifi_password.to_owned(),
        firmware_keys: file.trusted_keys().map_err(bad)?,
    };
    if wifi_ssid.is_empty() || wifi_ssid.contains('\n') || wifi_password.contains('\n') {
        bail!("the Wi-Fi name must be given, and neither it nor the password may hold a newline");
    }
    let mut bytes = p.encode();
    // The device reads back what it is given, or nothing.
    ecowatt_core::provision::Provision::decode(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let room = size.min(ecowatt_core::provision::MAX_LEN);
    if bytes.len() > room {
        bail!("the provisioning ({} bytes) is over the {room} bytes a device reads", bytes.len());
    }
    bytes.resize(size, 0xFF);
    Ok(bytes)
}

pub fn device(conn: &ServerConn, cmd: DeviceCommand) -> anyhow::Result<()> {
    if let DeviceCommand::ProvisionImage {
        provision,
        wifi_ssid,
        wifi_password,
        server,
        size,
        out,
    } = cmd
    {
        let file = ecowatt_device::agent::Provisioning::load(&provision)?;
        let bytes = provision_image(&file, &wifi_ssid, &wifi_password, server, size)?;
        let path = out.unwrap_or_else(|| PathBuf::from(format!("{}.provision.bin", file.device)));
        ecowatt_formats::secret::write_secret_bytes(&path, &bytes)?;
        outln!(
            "Provisioning partition for {} ({} bytes): {} (it holds the device key and the Wi-Fi password; keep it secret)",
            file.device,
            bytes.len(),
            path.display()
        );
        outln!("Flash it: espflash write-bin 0x3F0000 {}", path.display());
        return Ok(());
    }
    let api = conn.connect()?;
    match cmd {
        DeviceCommand::Add { name, rated_power, out, tags, failsafe, tz } => {
            let mut body = json!({"name": name, "rated_power_w": rated_power, "tags": tags});
            if let Some(f) = failsafe {
                body["failsafe"] = failsafe_value(&f)?;
            }
            if let Some(tz) = tz {
                body["timezone"] = json!(tz);
            }
            let v = api.call("POST", "/api/v1/devices", Some(&body))?;
            let path = write_provisioning(&v, &name, out)?;
            outln!("Device {name} added (id {}, rated {} W).", v["device"]["id"], rated_power);
            outln!(
                "Provisioning file: {} (it holds the device key, shown only now; keep it secret)",
                path.display()
            );
        }
        DeviceCommand::Timezone { name, tz } => {
            let path = format!("/api/v1/devices/{}/timezone", segment(&name));
            api.call("PUT", &path, Some(&json!({"timezone": tz})))?;
            outln!("Device {name}: time zone {tz} (energy days from now on).");
        }
        DeviceCommand::List { json } => {
            let v = api.call("GET", "/api/v1/devices", None)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            outln!(
                "{:<24} {:<8} {:<12} {:<19} {:>9} {:>5}",
                "name",
                "state",
                "firmware",
                "last seen (UTC)",
                "rated W",
                "id"
            );
            for d in v["devices"].as_array().into_iter().flatten() {
                outln!(
                    "{:<24} {:<8} {:<12} {:<19} {:>9} {:>5}",
                    d["name"].as_str().unwrap_or("?"),
                    device_state(d),
                    d["firmware"].as_str().unwrap_or("-"),
                    when(&d["last_seen_ms"]),
                    d["rated_power_w"].to_string(),
                    d["id"].to_string()
                );
            }
        }
        DeviceCommand::Failsafe { name, value } => {
            let v = failsafe_value(&value)?;
            let path = format!("/api/v1/devices/{}/failsafe", segment(&name));
            print_control(&api.call("PUT", &path, Some(&json!({ "failsafe": v })))?);
        }
        DeviceCommand::Ramp { name, rate } => {
            let v = match rate.trim_end_matches("%/s").trim_end_matches('%') {
                "off" | "none" => Value::Null,
                r => json!(r.parse::<f64>().map_err(|_| {
                    anyhow::anyhow!("{rate:?}: give % per second (2.5) or off")
                })?),
            };
            let path = format!("/api/v1/devices/{}/ramp", segment(&name));
            print_control(&api.call("PUT", &path, Some(&json!({ "ramp_pct_per_s": v })))?);
        }
        DeviceCommand::Tag { name, tags } => {
            let path = format!("/api/v1/devices/{}/tags", segment(&name));
            print_control(&api.call("PUT", &path, Some(&json!({ "tags": tags })))?);
        }
        DeviceCommand::Control { name } => {
            let path = format!("/api/v1/devices/{}/control", segment(&name));
            print_control(&api.call("GET", &path, None)?);
        }
        DeviceCommand::Show { name, json } => {
            let v = api.call("GET", &format!("/api/v1/devices/{}", segment(&name)), None)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let latest =
                api.call("GET", &format!("/api/v1/devices/{}/latest", segment(&name)), None)?;
            print_device(&v, &latest);
        }
        DeviceCommand::Disable { name } => {
            api.call("POST", &format!("/api/v1/devices/{}/disable", segment(&name)), None)?;
            outln!("Device {name} disabled.");
        }
        DeviceCommand::Enable { name } => {
            api.call("POST", &format!("/api/v1/devices/{}/enable", segment(&name)), None)?;
            outln!("Device {name} enabled.");
        }
        DeviceCommand::Legacy { name, state } => {
            let on = state == "on";
            let method = if on { "POST" } else { "DELETE" };
            api.call(method, &format!("/api/v1/devices/{}/legacy", segment(&name)), None)?;
            if on {
                outln!(
                    "Device {name} marked legacy: its original-firmware uploads are accepted (shared, published key: migrate it)."
                );
            } else {
                outln!("Device {name} no longer legacy: original-firmware uploads are refused.");
            }
        }
        DeviceCommand::Remove { name } => {
            api.call("DELETE", &format!("/api/v1/devices/{}", segment(&name)), None)?;
            outln!("Device {name} removed.");
        }
        DeviceCommand::ProvisionImage { .. } => unreachable!("handled above"),
        DeviceCommand::RotateKey { name, out } => {
            let v =
                api.call("POST", &format!("/api/v1/devices/{}/rotate-key", segment(&name)), None)?;
            let path = write_provisioning(&v, &name, out)?;
            outln!(
                "Device {name} has key version {}. New provisioning file: {}",
                v["device"]["key_version"],
                path.display()
            );
        }
    }
    Ok(())
}

/// Manage operator tokens.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; it is printed once.
    ///
    /// With --local it is written straight into the store named by --data-dir
    /// (or --database), without the server: the way back in when no admin
    /// token works. Run it on the server's machine, as the server's user.
    Create {
        /// Who or what it is for.
        name: String,
        /// admin (may change things) or viewer (may only read).
        #[arg(long, default_value = "viewer", value_parser = ["admin", "viewer"])]
        role: String,
        /// Write the token into the store directly (no server, no token needed).
        #[arg(long)]
        local: bool,
        /// With --local: the database URL [default: SQLite in --data-dir].
        #[arg(long, env = "ECOWATT_DATABASE", hide_env_values = true, requires = "local")]
        database: Option<String>,
    },
    /// List tokens.
    List,
    /// Revoke a token by id.
    Revoke {
        /// Token id (from `token list`).
        id: i64,
    },
}

pub fn token(conn: &ServerConn, cmd: TokenCommand) -> anyhow::Result<()> {
    if let TokenCommand::Create { name, role, local: true, database } = &cmd {
        return local_token(conn, name, role, database.as_deref());
    }
    let api = conn.connect()?;
    match cmd {
        TokenCommand::Create { name, role, .. } => {
            let v =
                api.call("POST", "/api/v1/tokens", Some(&json!({"name": name, "role": role})))?;
            outln!("{}", v["token"].as_str().unwrap_or_default());
            eprintln!("Token {} ({role}) created; it is shown only now.", v["info"]["id"]);
        }
        TokenCommand::List => {
            let v = api.call("GET", "/api/v1/tokens", None)?;
            outln!(
                "{:>4} {:<20} {:<7} {:<19} {:<19}",
                "id",
                "name",
                "role",
                "created (UTC)",
                "revoked (UTC)"
            );
            for t in v["tokens"].as_array().into_iter().flatten() {
                outln!(
                    "{:>4} {:<20} {:<7} {:<19} {:<19}",
                    t["id"].to_string(),
                    t["name"].as_str().unwrap_or("?"),
                    t["role"].as_str().unwrap_or("?"),
                    when(&t["created_ms"]),
                    when(&t["revoked_ms"])
                );
            }
        }
        TokenCommand::Revoke { id } => {
            api.call("DELETE", &format!("/api/v1/tokens/{id}"), None)?;
            outln!("Token {id} revoked.");
        }
    }
    Ok(())
}

/// `token create --local`: a token written straight into the store.
fn local_token(
    conn: &ServerConn,
    name: &str,
    role: &str,
    database: Option<&str>,
) -> anyhow::Result<()> {
    use ecowatt_server::db::sqlite_file;
    use ecowatt_server::operators::Role;
    use ecowatt_server::store::Store;
    let url = match database {
        Some(url) => url.to_owned(),
        None => ecowatt_server::db::sqlite_url(&conn.data_dir.join("ecowatt.db")),
    };
    // Never create a store here: only an existing one gets a token.
    if let Some(path) = sqlite_file::path_of(&url)
        && sqlite_file::check(&path)? != sqlite_file::FileState::Database
    {
        anyhow::bail!(
            "no store at {} (point --data-dir at the server's data directory, or pass --database)",
            path.display()
        );
    }
    let role = Role::parse(role).context("role")?;
    let rt = tokio::runtime::Runtime::new()?;
    let (secret, token) = rt.block_on(async {
        let store = Store::open(&url).await?;
        anyhow::ensure!(!store.created(), "the database at {url} held no store");
        let secret = ecowatt_server::operators::generate_token();
        let hash = ecowatt_server::operators::hash_token(&secret);
        let actor = format!("local:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
        let token = store
            .operators()
            .create(name, role, &hash, &actor, ecowatt_formats::time::now_ms())
            .await?;
        store.close().await;
        Ok((secret, token))
    })?;
    outln!("{secret}");
    eprintln!(
        "Token {} ({}) written into the store directly; it is shown only now.",
        token.id,
        token.role.as_str()
    );
    Ok(())
}

/// Change and inspect device configuration.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Change a device's desired config (a new version; the device applies it and reports back).
    Set {
        /// Device name.
        device: String,
        /// Poll interval (1s..=1h), e.g. 10s.
        #[arg(long, value_parser = parse_duration)]
        poll: Option<Duration>,
        /// Upload interval (10s..=24h), e.g. 15m.
        #[arg(long, value_parser = parse_duration)]
        upload: Option<Duration>,
        /// Registers to sample, e.g. 0,1,2,9.
        #[arg(long, value_delimiter = ',')]
        registers: Option<Vec<u16>>,
    },
    /// Show desired and reported config.
    Show {
        /// Device name.
        device: String,
    },
    /// Show the desired config's versions.
    History {
        /// Device name.
        device: String,
    },
}

pub fn config(conn: &ServerConn, cmd: ConfigCommand) -> anyhow::Result<()> {
    let api = conn.connect()?;
    match cmd {
        ConfigCommand::Set { device, poll, upload, registers } => {
            if poll.is_none() && upload.is_none() && registers.is_none() {
                bail!("nothing to change: give --poll, --upload or --registers");
            }
            let mut patch = serde_json::Map::new();
            if let Some(p) = poll {
                patch.insert("poll_interval_ms".into(), json!(p.as_millis() as i64));
            }
            if let Some(u) = upload {
                patch.insert("upload_interval_ms".into(), json!(u.as_millis() as i64));
            }
            if let Some(r) = registers {
                patch.insert("registers".into(), json!(r));
            }
            let v = api.call(
                "PATCH",
                &format!("/api/v1/devices/{}/config", segment(&device)),
                Some(&Value::Object(patch)),
            )?;
            outln!("Config version {} of {device}: {}", v["desired_version"], v["desired"]);
        }
        ConfigCommand::Show { device } => {
            let v =
                api.call("GET", &format!("/api/v1/devices/{}/config", segment(&device)), None)?;
            outln!("device    {device}");
            outln!(
                "desired   v{} {} (set {})",
                v["desired_version"],
                v["desired"],
                when(&v["desired_ms"])
            );
            match v["reported_version"].as_i64() {
                Some(r) => {
                    outln!("reported  v{r} {} (at {})", v["reported"], when(&v["reported_ms"]))
                }
                None => outln!("reported  nothing yet"),
            }
            for r in v["rejected"].as_array().into_iter().flatten() {
                outln!(
                    "rejected  {}: {}",
                    r["field"].as_str().unwrap_or("?"),
                    r["reason"].as_str().unwrap_or("?")
                );
            }
        }
        ConfigCommand::History { device } => {
            let v = api.call(
                "GET",
                &format!("/api/v1/devices/{}/config/history", segment(&device)),
                None,
            )?;
            for h in v["versions"].as_array().into_iter().flatten() {
                outln!(
                    "v{:<4} {} {:<16} {}",
                    h["version"],
                    when(&h["at_ms"]),
                    h["actor"].as_str().unwrap_or("?"),
                    h["config"]
                );
            }
        }
    }
    Ok(())
}

/// Options of a queued command.
#[derive(Args, Debug, Clone)]
pub struct QueueOpts {
    /// Time-to-live: the command expires if no result arrives in time (10s..=7d).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    ttl: Duration,
    /// Wait for the outcome and print it; exits non-zero unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    wait_timeout: Duration,
    /// Hold an export limit under a lease (1m..=7d): after this long without
    /// hearing from the server the device applies its fail-safe limit
    /// [default: 15m when the device has a fail-safe].
    #[arg(long, value_parser = parse_duration)]
    lease: Option<Duration>,
    /// Reach an export limit at this rate, % of rated power per second
    /// (0.01..=100), each step read back [default: the device's ramp].
    #[arg(long)]
    ramp: Option<f64>,
}

/// Queue a command for a device.
#[derive(Args, Debug)]
pub struct CommandArgs {
    /// Device name.
    device: String,
    #[command(subcommand)]
    action: CommandAction,
}

/// The command to queue.
#[derive(Subcommand, Debug)]
pub enum CommandAction {
    /// Set the export limit, percent of rated power (0..=100).
    SetPowerPercentage {
        /// Percent.
        percentage: i64,
        #[command(flatten)]
        opts: QueueOpts,
    },
    /// Set the export limit in watts (converted with the device's rated power).
    SetPower {
        /// Power with its unit, e.g. 2500W or 2.5kW (a bare number is refused).
        #[arg(value_parser = parse_watts)]
        power: i64,
        #[command(flatten)]
        opts: QueueOpts,
    },
    /// Write a raw value to a writable register (only register 8, 0..=100).
    WriteRegister {
        /// Register address.
        address: i64,
        /// Raw value.
        value: i64,
        #[command(flatten)]
        opts: QueueOpts,
    },
    /// Read one register.
    ReadRegister {
        /// Register address (0..=9).
        address: i64,
        #[command(flatten)]
        opts: QueueOpts,
    },
}

/// A power with its unit: `2500W`, `2.5kW`. A bare number is refused: `5`
/// meant as 5 kW or 5 % would limit the inverter to 0 %.
fn parse_watts(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (n, f) = if let Some(n) = t.strip_suffix("kW").or_else(|| t.strip_suffix("kw")) {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('W').or_else(|| t.strip_suffix('w')) {
        (n, 1.0)
    } else if t.ends_with('%') {
        return Err(format!(
            "{text:?} is a percentage: use `set-power-percentage {}`",
            t.trim_end_matches('%')
        ));
    } else {
        return Err(format!(
            "{text:?} has no unit: give watts or kilowatts, e.g. 2500W or 2.5kW (or use set-power-percentage)"
        ));
    };
    let watts = n
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a power like 2500W or 2.5kW"))?
        * f;
    if !watts.is_finite() || watts < 0.0 {
        return Err(format!("{text:?}: a power is 0 W or more"));
    }
    Ok(watts.round() as i64)
}

pub fn command(conn: &ServerConn, args: CommandArgs) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let (body, opts) = match args.action {
        CommandAction::SetPowerPercentage { percentage, opts } => (
            json!({"type": "set_power_percentage", "parameters": {"percentage": percentage}}),
            opts,
        ),
        CommandAction::SetPower { power, opts } => {
            (json!({"type": "set_power", "parameters": {"power_value": power}}), opts)
        }
        CommandAction::WriteRegister { address, value, opts } => (
            json!({"type": "write_register", "parameters": {"register_address": address, "value": value}}),
            opts,
        ),
        CommandAction::ReadRegister { address, opts } => {
            (json!({"type": "read_register", "parameters": {"register_address": address}}), opts)
        }
    };
    let mut body = body;
    body["ttl_s"] = json!(opts.ttl.as_secs() as i64);
    if let Some(lease) = opts.lease {
        body["lease_s"] = json!(lease.as_secs() as i64);
    }
    if let Some(ramp) = opts.ramp {
        body["ramp_pct_per_s"] = json!(ramp);
    }
    let v = api.call(
        "POST",
        &format!("/api/v1/devices/{}/commands", segment(&args.device)),
        Some(&body),
    )?;
    let id = v["id"].as_i64().unwrap_or_default();
    outln!(
        "Command {id} queued for {}: {} {}",
        args.device,
        v["kind"].as_str().unwrap_or("?"),
        v["parameters"]
    );
    if !opts.wait {
        return Ok(());
    }
    let deadline = Instant::now() + opts.wait_timeout;
    let mut last = v["status"].as_str().unwrap_or("queued").to_owned();
    outln!("  {last}");
    loop {
        // A long poll: the server answers as soon as the status changes.
        let left = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let wait = left.min(ecowatt_server::api::MAX_COMMAND_WAIT_MS);
        let c = api.call(
            "GET",
            &format!("/api/v1/commands/{id}?wait_ms={wait}&changed_from={last}"),
            None,
        )?;
        let status = c["status"].as_str().unwrap_or("?").to_owned();
        if status != last {
            outln!("  {status}");
            last = status.clone();
        }
        match status.as_str() {
            "queued" | "delivered" => {}
            "succeeded" | "confirmed" => {
                outln!("Command {id} {status}: {}", describe(&c));
                return Ok(());
            }
            _ => bail!("command {id} {status}: {}", describe(&c)),
        }
        if Instant::now() >= deadline {
            bail!(
                "command {id} is still {status} after {:?}; it stays queued until it expires",
                opts.wait_timeout
            );
        }
    }
}

fn describe(c: &Value) -> String {
    let mut parts = vec![];
    if let Some(m) = c["result_message"].as_str().filter(|m| !m.is_empty()) {
        parts.push(m.to_owned());
    }
    if let Some(v) = c["result_value"].as_i64() {
        parts.push(format!("register reads {v}"));
    }
    if let Some(e) = c["exception_code"].as_i64() {
        parts.push(format!("Modbus exception {e:02X}"));
    }
    if parts.is_empty() { "no details".to_owned() } else { parts.join("; ") }
}

/// Inspect and manage queued commands.
#[derive(Subcommand, Debug)]
pub enum CommandsCommand {
    /// List commands, newest first.
    List {
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        /// Only in this status (queued, delivered, succeeded, failed, expired, cancelled, confirmed).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one command.
    Show {
        /// Command id.
        id: i64,
    },
    /// Cancel a command that has no result yet.
    Cancel {
        /// Command id.
        id: i64,
    },
    /// Statistics.
    Stats {
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
    },
    /// Export commands as CSV or JSON lines to standard output.
    Export {
        /// csv or jsonl.
        #[arg(long, default_value = "csv", value_parser = ["csv", "jsonl"])]
        format: String,
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
    },
}

pub fn commands(conn: &ServerConn, cmd: CommandsCommand) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let query = |pairs: &[(&str, Option<String>)]| {
        let q: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", segment(v))))
            .collect();
        if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
    };
    match cmd {
        CommandsCommand::List { device, status, limit } => {
            let q = query(&[
                ("device", device),
                ("status", status),
                ("limit", Some(limit.to_string())),
            ]);
            let v = api.call("GET", &format!("/api/v1/commands{q}"), None)?;
            outln!(
                "{:>6} {:<20} {:<22} {:<10} {:<19} parameters",
                "id",
                "device",
                "type",
                "status",
                "queued (UTC)"
            );
            for c in v["commands"].as_array().into_iter().flatten() {
                outln!(
                    "{:>6} {:<20} {:<22} {:<10} {:<19} {}",
                    c["id"].to_string(),
                    c["device"].as_str().unwrap_or("?"),
                    c["kind"].as_str().unwrap_or("?"),
                    c["status"].as_str().unwrap_or("?"),
                    when(&c["created_ms"]),
                    c["parameters"]
                );
            }
        }
        CommandsCommand::Show { id } => outln!(
            "{}",
            serde_json::to_string_pretty(&api.call(
                "GET",
                &format!("/api/v1/commands/{id}"),
                None
            )?)?
        ),
        CommandsCommand::Cancel { id } => {
            api.call("POST", &format!("/api/v1/commands/{id}/cancel"), None)?;
            outln!("Command {id} cancelled.");
        }
        CommandsCommand::Stats { device } => {
            let v = api.call(
                "GET",
                &format!("/api/v1/commands/statistics{}", query(&[("device", device)])),
                None,
            )?;
            outln!("{}", serde_json::to_string_pretty(&v["statistics"])?);
        }
        CommandsCommand::Export { format, device } => {
            let q = query(&[("format", Some(format)), ("device", device)]);
            out!("{}", api.call_text("GET", &format!("/api/v1/commands/export{q}"), None)?);
        }
    }
    Ok(())
}

pub fn audit(conn: &ServerConn, limit: i64) -> anyhow::Result<()> {
    let v = conn.connect()?.call("GET", &format!("/api/v1/audit?limit={limit}"), None)?;
    for e in v["entries"].as_array().into_iter().flatten() {
        outln!(
            "{} {:<16} {:<18} {:<24} {}",
            when(&e["at_ms"]),
            e["actor"].as_str().unwrap_or("?"),
            e["action"].as_str().unwrap_or("?"),
            e["target"].as_str().unwrap_or("?"),
            e["detail"]
        );
    }
    Ok(())
}

/// `online`, `offline` or `disabled`.
fn device_state(d: &Value) -> &'static str {
    if d["enabled"] == false {
        "disabled"
    } else if d["online"] == true {
        "online"
    } else {
        "offline"
    }
}

/// A config as people read it: `poll 10 s, upload 900 s, registers 0,1,...`.
fn config_text(c: &Value) -> String {
    let secs =
        |v: &Value| v.as_i64().map_or("?".to_owned(), |ms| format!("{} s", ms as f64 / 1000.0));
    let regs: Vec<String> =
        c["registers"].as_array().into_iter().flatten().map(|r| r.to_string()).collect();
    format!(
        "poll {}, upload {}, registers {}",
        secs(&c["poll_interval_ms"]),
        secs(&c["upload_interval_ms"]),
        regs.join(",")
    )
}

/// `device show`, for people.
fn print_device(v: &Value, latest: &Value) {
    let (d, c) = (&v["device"], &v["config"]);
    let state = device_state(&json!({"enabled": d["enabled"], "online": latest["online"]}));
    outln!("device     {} (id {})", d["name"].as_str().unwrap_or("?"), d["id"]);
    outln!("state      {state}, last seen {} UTC", when(&d["last_seen_ms"]));
    outln!("firmware   {}", d["firmware"].as_str().unwrap_or("not reported yet"));
    if d["legacy"] == true {
        outln!("legacy     runs the original firmware (uploads accepted under its shared key)");
    }
    outln!("rated      {} W", d["rated_power_w"]);
    outln!("key        version {}", d["key_version"]);
    outln!("added      {} UTC", when(&d["created_ms"]));
    outln!("config     desired v{}: {}", c["desired_version"], config_text(&c["desired"]));
    match c["reported_version"].as_i64() {
        Some(r) => outln!(
            "           applied v{r}: {} (reported {} UTC)",
            config_text(&c["reported"]),
            when(&c["reported_ms"])
        ),
        None => outln!("           applied: nothing reported yet"),
    }
    match latest["sample"]["readings"].as_array() {
        Some(readings) => {
            let parts: Vec<String> = readings
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {}",
                        r["name"].as_str().unwrap_or("?"),
                        r["value"],
                        r["unit"].as_str().unwrap_or("")
                    )
                })
                .collect();
            outln!("reading    {} UTC: {}", when(&latest["sample"]["t"]), parts.join(", "));
        }
        None => outln!("reading    none yet"),
    }
    if let Some(t) = latest["next_upload_due_ms"].as_i64() {
        outln!("next       upload due {} UTC", when(&Value::from(t)));
    }
}

/// A fail-safe as the CLI takes it (`40%`, `hold`, `clear`), for the API.
fn failsafe_value(text: &str) -> anyhow::Result<Value> {
    Ok(match text {
        "clear" | "none" => Value::Null,
        "hold" => json!("hold"),
        p => {
            json!(p.trim_end_matches('%').parse::<i64>().map_err(|_| {
                anyhow::anyhow!("{p:?}: give a percentage (40%), hold, or clear")
            })?)
        }
    })
}

/// A device's export control, for people.
fn print_control(v: &Value) {
    let failsafe = match &v["failsafe"] {
        Value::Null => "not set (no leased limits)".to_owned(),
        Value::String(s) => s.clone(),
        n => format!("{n}%"),
    };
    let ramp = v["ramp_pct_per_s"].as_f64().map_or("at once".to_owned(), |r| format!("{r} %/s"));
    outln!(
        "{}: tags [{}], fail-safe {failsafe}, ramp {ramp}",
        v["device"].as_str().unwrap_or("?"),
        v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    match &v["reported"] {
        Value::Null => outln!(
            "  the device has not reported export control (not synced yet, or older firmware)"
        ),
        r => {
            let fs = match &r["failsafe"] {
                Value::Null => "not set".to_owned(),
                Value::String(s) => s.clone(),
                n => format!("{n}%"),
            };
            if let Some(p) = r["ramp"].as_object() {
                outln!(
                    "  ramp of command {}: at {}%, going to {}%",
                    p["command_id"],
                    p["limit_pct"],
                    p["target_pct"]
                );
            }
            match &r["lease"] {
                Value::Null => outln!("  device: fail-safe {fs}, no leased limit"),
                l => outln!(
                    "  device: fail-safe {fs}, leased limit {}% (command {}){}",
                    l["limit_pct"],
                    l["command_id"],
                    if l["lapsed"] == true { ", LAPSED: fail-safe in force" } else { "" }
                ),
            }
        }
    }
    for e in v["episodes"].as_array().into_iter().flatten() {
        outln!(
            "  {} {:<9} command {} limit {}% {}",
            when(&e["at_ms"]),
            e["kind"].as_str().unwrap_or("?"),
            e["command_id"],
            e["limit_pct"],
            e["outcome"].as_str().unwrap_or("?")
        );
    }
}

#[cfg(test)]
mod provision_tests {
    use super::provision_image;

    fn file() -> ecowatt_device::agent::Provisioning {
        serde_json::from_value(serde_json::json!({
            "device": "roof-1", "device_id": 12, "key": "00112233445566778899AABBCCDDEEFF",
            "key_version": 3, "server": "http://192.0.2.10:8000/",
            "firmware_keys": ["0101010101010101010101010101010101010101010101010101010101010101"]
        }))
        .unwrap()
    }

    #[test]
    fn the_partition_holds_what_the_firmware_reads() {
        let bytes = provision_image(&file(), "home", "pass word", None, 0x10000).unwrap();
        assert_eq!(bytes.len(), 0x10000);
        assert!(bytes[bytes.len() - 1] == 0xFF, "the rest is erased");
        let p = ecowatt_core::provision::Provision::decode(&bytes).unwrap();
        assert_eq!((p.device.as_str(), p.creds.device_id, p.creds.key_version), ("roof-1", 12, 3));
        assert_eq!(p.creds.key[0..2], [0x00, 0x11]);
        assert_eq!((p.server.as_str(), p.wifi_ssid.as_str()), ("http://192.0.2.10:8000", "home"));
        assert_eq!((p.wifi_password.as_str(), p.firmware_keys.len()), ("pass word", 1));
        let other = provision_image(&file(), "home", "", Some("http://cloud:80".into()), 4096);
        assert_eq!(
            ecowatt_core::provision::Provision::decode(&other.unwrap()).unwrap().server,
            "http://cloud:80"
        );
    }

    #[test]
    fn what_the_device_could_not_use_is_refused_here() {
        assert!(provision_image(&file(), "", "x", None, 0x10000).is_err(), "no Wi-Fi name");
        assert!(provision_image(&file(), "a\nb", "x", None, 0x10000).is_err(), "a newline");
        assert!(provision_image(&file(), "home", "x", Some("https://c".into()), 0x10000).is_err());
        assert!(provision_image(&file(), "home", "x", None, 64).is_err(), "too small a partition");
    }
}
