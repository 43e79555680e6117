//! Prometheus metrics: counters kept in memory, rendered in the text
//! exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Counters by name and label set.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
}

/// Help text of each counter.
const HELP: &[(&str, &str)] = &[
    ("ecowatt_http_requests_total", "HTTP requests by route and status."),
    ("ecowatt_commands_queued_total", "Commands queued."),
    ("ecowatt_command_results_total", "Command results recorded, by outcome."),
    ("ecowatt_config_updates_total", "Desired config versions created."),
    ("ecowatt_auth_failures_total", "Requests refused for a missing or bad token, by reason."),
    ("ecowatt_security_events_total", "Device protocol messages refused, by kind."),
    ("ecowatt_device_syncs_total", "Device syncs answered."),
    ("ecowatt_telemetry_batches_total", "Telemetry batches accepted (retries included)."),
    (
        "ecowatt_telemetry_batches_purged_total",
        "Raw telemetry batches deleted past telemetry_retention_days (rollups stay).",
    ),
    (
        "ecowatt_telemetry_partitions_dropped_total",
        "PostgreSQL raw telemetry partitions dropped whole past telemetry_retention_days.",
    ),
    (
        "ecowatt_legacy_uploads_total",
        "Original-firmware /process uploads, by outcome (accepted or the refusal's code).",
    ),
    ("ecowatt_legacy_batches_total", "Original-firmware batches: stored, or why not decoded."),
    ("ecowatt_mqtt_published_total", "Messages handed to the MQTT client."),
    (
        "ecowatt_mqtt_dropped_total",
        "MQTT messages dropped: the outgoing buffer was full or publishing fell behind.",
    ),
    ("ecowatt_mqtt_commands_total", "Export-limit commands from MQTT, by outcome."),
    ("ecowatt_mqtt_connection_errors_total", "MQTT broker connection failures and losses."),
    (
        "ecowatt_device_broker_requests_total",
        "Device protocol requests taken from the device broker, by route.",
    ),
    ("ecowatt_device_broker_connections_total", "Connections made to the device broker."),
    ("ecowatt_device_broker_errors_total", "Device broker connection failures and losses."),
    (
        "ecowatt_device_broker_busy_total",
        "Device broker requests answered 503 busy: as many in flight as allowed.",
    ),
    ("ecowatt_device_broker_ignored_total", "Messages from the device broker on no request topic."),
];

impl Metrics {
    /// Adds one to counter `name` with `labels` (already formatted: `a="b",c="d"`).
    pub fn inc(&self, name: &'static str, labels: impl Into<String>) {
        *self.counters.lock().expect("metrics lock").entry((name, labels.into())).or_default() += 1;
    }

    /// Adds `n` to counter `name` with `labels`.
    pub fn add(&self, name: &'static str, labels: impl Into<String>, n: u64) {
        *self.counters.lock().expect("metrics lock").entry((name, labels.into())).or_default() += n;
    }

    /// The current value of a counter.
    pub fn get(&self, name: &'static str, labels: &str) -> u64 {
        self.counters
            .lock()
            .expect("metrics lock")
            .get(&(name, labels.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The text exposition of every counter, plus `gauges`.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let counters = self.counters.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((n, labels), value) in counters.iter().filter(|((n, _), _)| n == name) {
                if labels.is_empty() {
                    let _ = writeln!(out, "{n} {value}");
                } else {
                    let _ = writeln!(out, "{n}{{{labels}}} {value}");
                }
            }
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
