//! What EcoWatt publishes to an MQTT broker, as plain functions: topic
//! names, readings in engineering units, Home Assistant discovery configs,
//! and the reading of an export-limit command. The layout is in docs/mqtt.md.

use ecowatt_proto::codec;
use ecowatt_proto::registers::{EXPORT_LIMIT, REGISTERS};
use serde_json::{Map, Value, json};

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

/// One sample as a JSON object: `t` (Unix ms), `seq`, and each register by
/// name in engineering units.
pub fn sample_json(mask: u16, sample: &codec::Sample) -> Value {
    let mut o = Map::new();
    o.insert("t".into(), json!(sample.unix_ms));
    o.insert("seq".into(), json!(sample.seq));
    let addresses = (0..REGISTERS.len()).filter(|a| mask & (1 << a) != 0);
    for (a, raw) in addresses.zip(&sample.values) {
        o.insert(
            REGISTERS[a].name.into(),
            json!(crate::telemetry::read::engineering(a, f64::from(*raw))),
        );
    }
    Value::Object(o)
}

/// A batch's readings message: the unit of each register, then the samples
/// (the JSON of [`sample_json`] each), written straight into text: at a
/// fleet's rate, building `Value`s for a million values a second cost more
/// than the publishing itself.
pub fn readings_text(device: &str, batch: &codec::Batch) -> String {
    use std::fmt::Write;
    let present: Vec<usize> =
        (0..REGISTERS.len()).filter(|a| batch.registers & (1 << a) != 0).collect();
    let mut out = String::with_capacity(64 + batch.samples.len() * (24 + 16 * present.len()));
    out.push_str(r#"{"device":"#);
    out.push_str(&Value::from(device).to_string());
    out.push_str(r#","units":{"#);
    for (i, &a) in present.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, r#"{sep}"{}":{}"#, REGISTERS[a].name, Value::from(REGISTERS[a].unit));
    }
    out.push_str(r#"},"samples":["#);
    for (k, s) in batch.samples.iter().enumerate() {
        let sep = if k == 0 { "" } else { "," };
        let _ = write!(out, r#"{sep}{{"t":{},"seq":{}"#, s.unix_ms, s.seq);
        for (&a, raw) in present.iter().zip(&s.values) {
            let v = crate::telemetry::read::engineering(a, f64::from(*raw));
            // As serde_json writes a float: always with a fraction.
            if v.fract() == 0.0 {
                let _ = write!(out, r#","{}":{v:.1}"#, REGISTERS[a].name);
            } else {
                let _ = write!(out, r#","{}":{v}"#, REGISTERS[a].name);
            }
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// Commands shown per device.
pub const COMMANDS_SHOWN: i64 = 10;

/// A config shadow: desired and applied versions and configs.
pub fn config_json(s: &crate::config::ConfigShadow) -> Value {
    json!({
        "desired_version": s.desired_version,
        "desired": s.desired,
        "reported_version": s.reported_version,
        "reported": s.reported,
        "rejected": s.rejected,
    })
}

/// The newest commands (newest first): what each asked and where it stands.
pub fn commands_json(commands: &[crate::commands::Command]) -> Value {
    Value::Array(
        commands
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": c.kind,
                    "parameters": c.parameters,
                    "status": c.status,
                    "result": c.result_message,
                    "created_by": c.created_by,
                    "created_ms": c.created_ms,
                    "completed_ms": c.completed_ms,
                    "confirmed_ms": c.confirmed_ms,
                })
            })
            .collect(),
    )
}

/// A device's firmware progress in its newest rollout.
pub fn firmware_json(version: &str, d: &crate::firmware::rollouts::RolloutDevice) -> Value {
    json!({
        "running": d.running,
        "offered": version,
        "state": d.state.as_str(),
        "done": d.done,
        "total": d.total,
        "percent": d.percent,
        "reason": d.reason,
        "updated_ms": d.updated_ms,
    })
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

fn common(t: &Topics, device: &str) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("state_topic".into(), json!(t.state(device)));
    o.insert(
        "availability".into(),
        json!([{"topic": t.server_availability()}, {"topic": t.availability(device)}]),
    );
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

/// Every discovery message of a device: (topic, retained config JSON).
pub fn discovery(t: &Topics, device: &str) -> Vec<(String, Value)> {
    let id = object_id(device);
    let mut out = Vec::new();
    for (address, name, class, unit) in SENSORS {
        let key = REGISTERS[address].name.to_lowercase();
        let mut o = common(t, device);
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
    let mut o = common(t, device);
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

/// Largest command payload read.
pub const MAX_COMMAND_BYTES: usize = 32;

/// An export-limit command's payload (Home Assistant sends the number as
/// text, `40` or `40.0`): a whole percentage 0..=100, or why not.
pub fn export_limit_command(payload: &[u8]) -> Result<i64, &'static str> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err("oversized");
    }
    let text = std::str::from_utf8(payload).map_err(|_| "not_text")?.trim();
    let v: f64 = text.parse().map_err(|_| "not_a_number")?;
    if !v.is_finite() || v.fract() != 0.0 {
        return Err("not_a_whole_percentage");
    }
    if !(0.0..=100.0).contains(&v) {
        return Err("out_of_range");
    }
    Ok(v as i64)
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
    fn samples_are_in_engineering_units_by_name() {
        let s = codec::Sample { seq: 7, unix_ms: 1_000, values: vec![2301, 5000, 4200] };
        let mask = 1 | 1 << 2 | 1 << 9;
        assert_eq!(
            sample_json(mask, &s),
            json!({"t": 1000, "seq": 7, "Vac1": 230.1, "Fac1": 50.0, "Pac": 4200.0})
        );
        let s2 = codec::Sample { seq: 8, unix_ms: 6_000, values: vec![2299, 4999, 0] };
        let batch = codec::Batch { registers: mask, samples: vec![s.clone(), s2.clone()] };
        let r: Value = serde_json::from_str(&readings_text("d\"q", &batch)).unwrap();
        assert_eq!(r["device"], "d\"q");
        assert_eq!(r["units"], json!({"Vac1": "V", "Fac1": "Hz", "Pac": "W"}));
        // The text is the same JSON as the samples' values.
        assert_eq!(r["samples"], json!([sample_json(mask, &s), sample_json(mask, &s2)]));
    }

    /// Checked against Home Assistant's MQTT discovery schema: the
    /// sensor and number platforms' keys, their allowed device classes
    /// and units (homeassistant/components/sensor/const.py).
    #[test]
    fn discovery_configs_follow_home_assistants_schema() {
        let t = topics();
        let configs = discovery(&t, "roof-1");
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
