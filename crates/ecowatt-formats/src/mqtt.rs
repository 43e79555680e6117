//! What EcoWatt publishes to an MQTT broker, whoever publishes it (the
//! server for its whole fleet, or a device agent straight to a home broker):
//! topic names, a sample in engineering units, Home Assistant discovery
//! configs, and the reading of an export-limit command. Layout: docs/mqtt.md.

use ecowatt_proto::codec;
use ecowatt_proto::registers::{EXPORT_LIMIT, REGISTERS};
use serde_json::{Map, Value, json};

/// Default prefix of EcoWatt's topics.
pub const DEFAULT_PREFIX: &str = "ecowatt";
/// Default Home Assistant discovery prefix.
pub const DEFAULT_DISCOVERY_PREFIX: &str = "homeassistant";

/// How to check an `mqtts://` broker's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// The system's root certificates.
    SystemRoots,
    /// Only this CA (PEM), for a private PKI.
    Ca(Vec<u8>),
}

impl Tls {
    /// For a broker URL that says TLS: the CA in `ca_file` if given, else the
    /// system's roots; a CA file for a plain `mqtt://` broker is an error.
    pub fn for_broker(tls: bool, ca_file: Option<&std::path::Path>) -> Result<Option<Tls>, String> {
        match (ca_file, tls) {
            (Some(path), true) => std::fs::read(path)
                .map(|pem| Some(Tls::Ca(pem)))
                .map_err(|e| format!("CA file {}: {e}", path.display())),
            (None, true) => Ok(Some(Tls::SystemRoots)),
            (Some(_), false) => Err("a CA file needs an mqtts:// broker".into()),
            (None, false) => Ok(None),
        }
    }

    /// The rumqttc transport (rustls; the process's crypto provider).
    pub fn transport(&self) -> Result<rumqttc::Transport, String> {
        let config = match self {
            Tls::Ca(pem) => {
                rumqttc::TlsConfiguration::Simple { ca: pem.clone(), alpn: None, client_auth: None }
            }
            // rumqttc's default loads the platform's roots and panics if it cannot.
            Tls::SystemRoots => std::panic::catch_unwind(rumqttc::TlsConfiguration::default)
                .map_err(|_| {
                    "the system's root certificates cannot be loaded; give a CA file".to_owned()
                })?,
        };
        Ok(rumqttc::Transport::tls_with_config(config))
    }
}

/// A broker's address as a URL gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// Reads `mqtt://[user:password@]host[:port]` (1883 by default) or
/// `mqtts://...` (TLS, 8883 by default).
pub fn parse_url(url: &str) -> Result<Broker, String> {
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtt", rest)) => (false, rest),
        Some(("mqtts", rest)) => (true, rest),
        _ => return Err(format!("{url:?} is not an mqtt://host:port or mqtts://host:port URL")),
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, hostport) = match rest.rsplit_once('@') {
        Some((creds, hp)) => {
            let (u, p) = creds.split_once(':').unwrap_or((creds, ""));
            (Some((u.to_owned(), p.to_owned())), hp)
        }
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| format!("{url:?}: port {p:?} is not a number"))?),
        None => (hostport, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} names no broker host"));
    }
    Ok(Broker { host: host.to_owned(), port, credentials, tls })
}

/// Topics under a prefix (`ecowatt` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// EcoWatt's own topics start with it.
    pub prefix: String,
    /// Home Assistant's discovery prefix (`homeassistant`).
    pub discovery: String,
}

impl Topics {
    /// The server's availability (`online`, `offline`; its last will).
    pub fn server_availability(&self) -> String {
        format!("{}/server/availability", self.prefix)
    }
    /// A device's newest sample (retained).
    pub fn state(&self, device: &str) -> String {
        format!("{}/{device}/state", self.prefix)
    }
    /// Every sample of each batch, as it arrives (not retained).
    pub fn readings(&self, device: &str) -> String {
        format!("{}/{device}/readings", self.prefix)
    }
    /// A device's energy today (retained): `{"today_kwh", "date"}`.
    pub fn energy(&self, device: &str) -> String {
        format!("{}/{device}/energy", self.prefix)
    }
    /// A device's availability (retained).
    pub fn availability(&self, device: &str) -> String {
        format!("{}/{device}/availability", self.prefix)
    }
    /// A device's config shadow (retained).
    pub fn config(&self, device: &str) -> String {
        format!("{}/{device}/config", self.prefix)
    }
    /// A device's newest commands with their status and result (retained).
    pub fn commands(&self, device: &str) -> String {
        format!("{}/{device}/commands", self.prefix)
    }
    /// A device's firmware: running version and its newest rollout (retained).
    pub fn firmware(&self, device: &str) -> String {
        format!("{}/{device}/firmware", self.prefix)
    }
    /// Where Home Assistant sets the export limit.
    pub fn export_limit_set(&self, device: &str) -> String {
        format!("{}/{device}/export_limit/set", self.prefix)
    }
    /// The subscription that receives every device's export-limit command.
    pub fn export_limit_set_all(&self) -> String {
        format!("{}/+/export_limit/set", self.prefix)
    }
    /// The device of an export-limit command topic.
    pub fn device_of_command<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let device = rest.strip_suffix("/export_limit/set")?;
        (!device.is_empty() && !device.contains('/')).then_some(device)
    }
    /// The discovery topic of one entity (`component`: `sensor`, `number`).
    pub fn discovery(&self, component: &str, device: &str, key: &str) -> String {
        format!("{}/{component}/{}/{key}/config", self.discovery, object_id(device))
    }
}

/// A name usable in Home Assistant ids (`[a-zA-Z0-9_-]`).
pub fn object_id(device: &str) -> String {
    let clean: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    format!("ecowatt_{clean}")
}

/// A raw value of register `address` in its unit, to three decimals.
pub fn engineering(address: usize, raw: f64) -> f64 {
    (raw / f64::from(REGISTERS[address].gain) * 1000.0).round() / 1000.0
}

/// One sample as a JSON object: `t` (Unix ms), `seq`, and each register by
/// name in engineering units.
pub fn sample_json(mask: u16, sample: &codec::Sample) -> Value {
    let mut o = Map::new();
    o.insert("t".into(), json!(sample.unix_ms));
    o.insert("seq".into(), json!(sample.seq));
    let addresses = (0..REGISTERS.len()).filter(|a| mask & (1 << a) != 0);
    for (a, raw) in addresses.zip(&sample.values) {
        o.insert(REGISTERS[a].name.into(), json!(engineering(a, f64::from(*raw))));
    }
    Value::Object(o)
}

/// Home Assistant's view of each measured register: (key, name, device
/// class, unit). The export limit is a `number` entity instead.
const SENSORS: [(usize, &str, &str, &str); 9] = [
    (0, "AC voltage", "voltage", "V"),
    (1, "AC current", "current", "A"),
    (2, "AC frequency", "frequency", "Hz"),
    (3, "PV1 voltage", "voltage", "V"),
    (4, "PV2 voltage", "voltage", "V"),
    (5, "PV1 current", "current", "A"),
    (6, "PV2 current", "current", "A"),
    (7, "Inverter temperature", "temperature", "°C"),
    (9, "AC power", "power", "W"),
];

fn common(t: &Topics, device: &str, availability: &[String]) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("state_topic".into(), json!(t.state(device)));
    let topics: Vec<Value> = availability.iter().map(|a| json!({ "topic": a })).collect();
    o.insert("availability".into(), Value::Array(topics));
    o.insert("availability_mode".into(), json!("all"));
    o.insert(
        "device".into(),
        json!({
            "identifiers": [object_id(device)],
            "name": device,
            "manufacturer": "EcoWatt",
            "model": "Solar inverter (Modbus)",
        }),
    );
    o.insert("origin".into(), json!({"name": "EcoWatt", "sw_version": env!("CARGO_PKG_VERSION")}));
    o
}

/// Every discovery message of a device: (topic, retained config JSON). The
/// entities are available while every topic of `availability` says
/// `online`; the export limit is a `number` whose command topic is
/// [`Topics::export_limit_set`] when `settable`, else a read-only sensor.
pub fn discovery(
    t: &Topics,
    device: &str,
    availability: &[String],
    settable: bool,
) -> Vec<(String, Value)> {
    let id = object_id(device);
    let mut out = Vec::new();
    for (address, name, class, unit) in SENSORS {
        let key = REGISTERS[address].name.to_lowercase();
        let mut o = common(t, device, availability);
        o.insert("name".into(), json!(name));
        o.insert("unique_id".into(), json!(format!("{id}_{key}")));
        o.insert("object_id".into(), json!(format!("{id}_{key}")));
        o.insert(
            "value_template".into(),
            json!(format!("{{{{ value_json.{} }}}}", REGISTERS[address].name)),
        );
        o.insert("device_class".into(), json!(class));
        o.insert("state_class".into(), json!("measurement"));
        o.insert("unit_of_measurement".into(), json!(unit));
        out.push((t.discovery("sensor", device, &key), Value::Object(o)));
    }
    let limit = REGISTERS[usize::from(EXPORT_LIMIT)].name;
    let mut o = common(t, device, availability);
    if !settable {
        o.insert("name".into(), json!("Export limit"));
        o.insert("unique_id".into(), json!(format!("{id}_export_limit")));
        o.insert("object_id".into(), json!(format!("{id}_export_limit")));
        o.insert("value_template".into(), json!(format!("{{{{ value_json.{limit} }}}}")));
        o.insert("unit_of_measurement".into(), json!("%"));
        o.insert("state_class".into(), json!("measurement"));
        o.insert("icon".into(), json!("mdi:transmission-tower-export"));
        out.push((t.discovery("sensor", device, "export_limit"), Value::Object(o)));
        return out;
    }
    o.insert("name".into(), json!("Export limit"));
    o.insert("unique_id".into(), json!(format!("{id}_export_limit")));
    o.insert("object_id".into(), json!(format!("{id}_export_limit")));
    o.insert("value_template".into(), json!(format!("{{{{ value_json.{limit} }}}}")));
    o.insert("command_topic".into(), json!(t.export_limit_set(device)));
    o.insert("min".into(), json!(0));
    o.insert("max".into(), json!(100));
    o.insert("step".into(), json!(1));
    o.insert("mode".into(), json!("box"));
    o.insert("unit_of_measurement".into(), json!("%"));
    o.insert("icon".into(), json!("mdi:transmission-tower-export"));
    out.push((t.discovery("number", device, "export_limit"), Value::Object(o)));
    out
}

/// Home Assistant's energy sensor of a device: kWh of its site's local
/// day from the server's rollups, `total_increasing` (it returns to 0 at
/// local midnight, which Home Assistant takes as a new cycle), on the
/// device's `energy` topic.
pub fn energy_discovery(t: &Topics, device: &str, availability: &[String]) -> (String, Value) {
    let id = object_id(device);
    let mut o = common(t, device, availability);
    o.insert("state_topic".into(), json!(t.energy(device)));
    o.insert("name".into(), json!("Energy today"));
    o.insert("unique_id".into(), json!(format!("{id}_energy_today")));
    o.insert("object_id".into(), json!(format!("{id}_energy_today")));
    o.insert("value_template".into(), json!("{{ value_json.today_kwh }}"));
    o.insert("device_class".into(), json!("energy"));
    o.insert("state_class".into(), json!("total_increasing"));
    o.insert("unit_of_measurement".into(), json!("kWh"));
    o.insert("suggested_display_precision".into(), json!(2));
    (t.discovery("sensor", device, "energy_today"), Value::Object(o))
}

/// Largest command payload read.
pub const MAX_COMMAND_BYTES: usize = 32;

/// A number entity's payload (Home Assistant sends the number as text, `40`
/// or `40.0`): a whole number, or why not.
pub fn whole_number(payload: &[u8]) -> Result<i64, &'static str> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err("oversized");
    }
    let text = std::str::from_utf8(payload).map_err(|_| "not_text")?.trim();
    let v: f64 = text.parse().map_err(|_| "not_a_number")?;
    if !v.is_finite() || v.fract() != 0.0 {
        return Err("not_a_whole_percentage");
    }
    if v.abs() > 1e15 {
        return Err("out_of_range");
    }
    Ok(v as i64)
}

/// An export-limit command's payload: a whole percentage 0..=100, or why not.
pub fn export_limit_command(payload: &[u8]) -> Result<i64, &'static str> {
    let v = whole_number(payload)?;
    if !(0..=100).contains(&v) {
        return Err("out_of_range");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics { prefix: "ecowatt".into(), discovery: "homeassistant".into() }
    }

    #[test]
    fn topics_and_ids() {
        let t = topics();
        assert_eq!(t.state("roof-1"), "ecowatt/roof-1/state");
        assert_eq!(t.device_of_command("ecowatt/roof-1/export_limit/set"), Some("roof-1"));
        for bad in [
            "ecowatt//export_limit/set",
            "ecowatt/a/b/export_limit/set",
            "other/a/export_limit/set",
            "ecowatt/a/state",
        ] {
            assert_eq!(t.device_of_command(bad), None, "{bad}");
        }
        assert_eq!(object_id("site.7 roof"), "ecowatt_site_7_roof");
        assert_eq!(
            t.discovery("number", "a.b", "export_limit"),
            "homeassistant/number/ecowatt_a_b/export_limit/config"
        );
    }

    #[test]
    fn a_sample_is_in_engineering_units_by_name() {
        let s = codec::Sample { seq: 7, unix_ms: 1_000, values: vec![2301, 5000, 4200] };
        let mask = 1 | 1 << 2 | 1 << 9;
        assert_eq!(
            sample_json(mask, &s),
            json!({"t": 1000, "seq": 7, "Vac1": 230.1, "Fac1": 50.0, "Pac": 4200.0})
        );
        assert_eq!(engineering(2, 4999.0), 49.99);
    }

    /// Checked against Home Assistant's MQTT discovery schema: the
    /// sensor and number platforms' keys, their allowed device classes
    /// and units (homeassistant/components/sensor/const.py).
    #[test]
    fn discovery_configs_follow_home_assistants_schema() {
        let t = topics();
        let both = [t.server_availability(), t.availability("roof-1")];
        let configs = discovery(&t, "roof-1", &both, true);
        assert_eq!(configs.len(), 10);
        let allowed_units = [
            ("voltage", "V"),
            ("current", "A"),
            ("frequency", "Hz"),
            ("temperature", "°C"),
            ("power", "W"),
        ];
        let mut ids = std::collections::HashSet::new();
        for (topic, c) in &configs {
            assert!(topic.starts_with("homeassistant/") && topic.ends_with("/config"), "{topic}");
            assert!(ids.insert(c["unique_id"].as_str().unwrap().to_owned()), "unique ids");
            assert_eq!(c["state_topic"], "ecowatt/roof-1/state");
            assert_eq!(c["availability_mode"], "all");
            assert_eq!(c["availability"][0]["topic"], "ecowatt/server/availability");
            assert_eq!(c["availability"][1]["topic"], "ecowatt/roof-1/availability");
            assert_eq!(c["device"]["identifiers"][0], "ecowatt_roof-1");
            let template = c["value_template"].as_str().unwrap();
            assert!(
                template.starts_with("{{ value_json.") && template.ends_with(" }}"),
                "{template}"
            );
            if topic.contains("/sensor/") {
                let class = c["device_class"].as_str().unwrap();
                let unit = c["unit_of_measurement"].as_str().unwrap();
                assert!(allowed_units.contains(&(class, unit)), "{class} {unit}");
                assert_eq!(c["state_class"], "measurement");
                assert!(c.get("command_topic").is_none());
            } else {
                assert!(topic.contains("/number/"));
                assert_eq!(c["command_topic"], "ecowatt/roof-1/export_limit/set");
                assert_eq!(
                    (c["min"].as_i64(), c["max"].as_i64(), c["step"].as_i64()),
                    (Some(0), Some(100), Some(1))
                );
                assert_eq!(c["value_template"], "{{ value_json.Pow }}");
            }
        }
    }

    #[test]
    fn the_energy_sensor_is_a_total_increasing_kwh_meter() {
        let t = topics();
        let both = [t.server_availability(), t.availability("roof-1")];
        let (topic, c) = energy_discovery(&t, "roof-1", &both);
        assert_eq!(topic, "homeassistant/sensor/ecowatt_roof-1/energy_today/config");
        // Home Assistant's energy dashboard takes sensors of class energy,
        // state class total or total_increasing, in Wh or kWh.
        assert_eq!(
            (
                c["device_class"].as_str(),
                c["state_class"].as_str(),
                c["unit_of_measurement"].as_str()
            ),
            (Some("energy"), Some("total_increasing"), Some("kWh"))
        );
        assert_eq!(c["state_topic"], "ecowatt/roof-1/energy");
        assert_eq!(c["value_template"], "{{ value_json.today_kwh }}");
        assert_eq!(c["unique_id"], "ecowatt_roof-1_energy_today");
        assert_eq!(c["availability"][1]["topic"], "ecowatt/roof-1/availability");
        assert!(c.get("command_topic").is_none());
    }

    #[test]
    fn a_device_announces_itself_with_its_own_availability_and_a_read_only_limit() {
        let t = topics();
        let own = [t.availability("roof-1")];
        let configs = discovery(&t, "roof-1", &own, false);
        assert_eq!(configs.len(), 10);
        for (topic, c) in &configs {
            assert_eq!(c["availability"], json!([{"topic": "ecowatt/roof-1/availability"}]));
            assert!(topic.contains("/sensor/"), "{topic}");
            assert!(c.get("command_topic").is_none());
        }
        let limit = &configs.last().unwrap().1;
        assert_eq!(limit["value_template"], "{{ value_json.Pow }}");
        assert_eq!(limit["unit_of_measurement"], "%");
    }

    #[test]
    fn export_limit_commands_are_read_strictly() {
        for (payload, want) in [
            (&b"40"[..], Ok(40)),
            (b" 40.0 ", Ok(40)),
            (b"0", Ok(0)),
            (b"100", Ok(100)),
            (b"101", Err("out_of_range")),
            (b"-1", Err("out_of_range")),
            (b"40.5", Err("not_a_whole_percentage")),
            (b"NaN", Err("not_a_whole_percentage")),
            (b"abc", Err("not_a_number")),
            (b"\\xff", Err("not_a_number")),
            (&[0xFF, 0xFE], Err("not_text")),
        ] {
            assert_eq!(export_limit_command(payload), want, "{payload:?}");
        }
        assert_eq!(export_limit_command(&[b'1'; 33]), Err("oversized"));
    }
}
