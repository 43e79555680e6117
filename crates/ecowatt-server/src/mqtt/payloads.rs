//! What the server publishes to an MQTT broker besides what every publisher
//! shares (`ecowatt_formats::mqtt`: topics, samples, discovery, commands
//! read): a batch's readings, config shadows, commands, firmware progress.
//! The layout is in docs/mqtt.md.

use ecowatt_formats::mqtt::engineering;
pub use ecowatt_formats::mqtt::{
    MAX_COMMAND_BYTES, Topics, export_limit_command, object_id, sample_json,
};
use ecowatt_proto::codec;
use ecowatt_proto::registers::REGISTERS;
use serde_json::{Value, json};

/// The server's discovery messages of a device: its entities are available
/// while the server and the device are, and the export limit is settable
/// (a queued, audited command).
pub fn discovery(t: &Topics, device: &str) -> Vec<(String, Value)> {
    let both = [t.server_availability(), t.availability(device)];
    let mut out = ecowatt_formats::mqtt::discovery(t, device, &both, true);
    // Energy comes from the server's rollups (a device alone has none).
    out.push(ecowatt_formats::mqtt::energy_discovery(t, device, &both));
    out
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
            let v = engineering(a, f64::from(*raw));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_the_samples_json_written_as_text() {
        let mask = 1 | 1 << 2 | 1 << 9;
        let s = codec::Sample { seq: 7, unix_ms: 1_000, values: vec![2301, 5000, 4200] };
        let s2 = codec::Sample { seq: 8, unix_ms: 6_000, values: vec![2299, 4999, 0] };
        let batch = codec::Batch { registers: mask, samples: vec![s.clone(), s2.clone()] };
        let r: Value = serde_json::from_str(&readings_text("d\"q", &batch)).unwrap();
        assert_eq!(r["device"], "d\"q");
        assert_eq!(r["units"], json!({"Vac1": "V", "Fac1": "Hz", "Pac": "W"}));
        // The text is the same JSON as the samples' values.
        assert_eq!(r["samples"], json!([sample_json(mask, &s), sample_json(mask, &s2)]));
    }
}
