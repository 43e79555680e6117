//! The server's MQTT integration (`--mqtt mqtt://host:1883`): every
//! batch this server stores goes to the broker in engineering units (each
//! device's newest sample retained), with each device's availability, the
//! server's own (its last will), and Home Assistant discovery so that each
//! inverter appears there with no YAML; Home Assistant's export-limit
//! `number` queues a real command through the normal queue (validated,
//! audited as `mqtt`, confirmed by read-back). It hears of telemetry from
//! the store's announcements and never reaches into the store itself for it.
//!
//! Outgoing messages wait in a bounded queue while the broker is away;
//! what does not fit is dropped and counted (`ecowatt_mqtt_dropped_total`),
//! never kept without bound. The layout is in docs/mqtt.md.

pub mod payloads;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::commands::CommandRequest;
use crate::commands::store::QueueOptions;
use crate::metrics::Metrics;
use payloads::Topics;

/// Who the audit log names for commands from the broker.
pub const ACTOR: &str = "mqtt";

/// Where and how to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// Client id (unique per server process on one broker).
    pub client_id: String,
    /// TLS (`mqtts://`), and how the broker's certificate is checked.
    pub tls: Option<Tls>,
    /// Topic layout.
    pub topics: Topics,
    /// Messages that may wait while the broker is away.
    pub buffer: usize,
}

pub use ecowatt_formats::mqtt::{Broker, DEFAULT_DISCOVERY_PREFIX, DEFAULT_PREFIX, parse_url};
/// How often devices are re-read: new ones discovered, removed ones'
/// entities removed, availability changes published.
pub const RECONCILE: Duration = Duration::from_secs(5);
/// Longest wait between two connection attempts (from 250 ms, doubling).
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Default outgoing buffer, messages.
pub const DEFAULT_BUFFER: usize = 10_000;

pub use ecowatt_formats::mqtt::Tls;

/// What the integration reads: the store's news, devices, commands.
pub struct Sources {
    /// Announcements (telemetry stored, the server stopping).
    pub news: Arc<crate::news::News>,
    /// Device names, last-seen times.
    pub devices: crate::devices::Devices,
    /// Where Home Assistant's commands are queued, and the commands shown.
    pub commands: crate::commands::Commands,
    /// Config shadows shown.
    pub configs: crate::config::Configs,
    /// Firmware progress shown.
    pub rollouts: crate::firmware::Rollouts,
    /// Energy today, from the rollups.
    pub telemetry: crate::telemetry::Telemetry,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Starts publishing; the task ends when the server stops (after telling
/// the broker it is offline).
pub fn start(settings: MqttSettings, sources: Sources) -> tokio::task::JoinHandle<()> {
    // Subscribe now, so that no batch stored from here on is missed.
    let telemetry = sources.news.subscribe_telemetry();
    let changes = sources.news.subscribe_changes();
    tokio::spawn(run(settings, sources, telemetry, changes))
}

fn options(s: &MqttSettings) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(&s.client_id, &s.host, s.port);
    if let Some(tls) = &s.tls {
        o.set_transport(tls.transport()?);
    }
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_last_will(LastWill::new(
        s.topics.server_availability(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some((u, p)) = &s.credentials {
        o.set_credentials(u, p);
    }
    Ok(o)
}

/// The integration's state between events.
struct Publisher {
    settings: MqttSettings,
    sources: Sources,
    client: AsyncClient,
    /// Device names by id, and the devices discovery was published for.
    names: HashMap<i64, String>,
    announced: HashSet<String>,
    /// Availability last published per device.
    online: HashMap<String, bool>,
    connected: bool,
    dropped_logged: u64,
    /// Devices whose config or commands changed since the last publication.
    pending: HashSet<crate::news::Changed>,
    /// Changes were missed: publish every device's.
    pending_all: bool,
    /// Energy today last published per device: (local date, Wh).
    energy: HashMap<String, (String, f64)>,
}

impl Publisher {
    fn publish(&mut self, topic: String, retain: bool, payload: Vec<u8>) {
        if self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload).is_err() {
            self.sources.metrics.inc("ecowatt_mqtt_dropped_total", "");
            let dropped = self.sources.metrics.get("ecowatt_mqtt_dropped_total", "");
            // The first, then every 1,000th.
            if dropped == 1 || dropped >= self.dropped_logged + 1000 {
                self.dropped_logged = dropped;
                tracing::warn!(
                    dropped,
                    buffer = self.settings.buffer,
                    "MQTT outgoing buffer full (broker away or slow): messages dropped"
                );
            }
        } else {
            self.sources.metrics.inc("ecowatt_mqtt_published_total", "");
        }
    }

    fn json(&mut self, topic: String, retain: bool, v: &Value) {
        self.publish(topic, retain, v.to_string().into_bytes());
    }

    /// Re-reads the devices: discovery for new ones, removal of the
    /// entities of removed ones, availability when it changed (all of it
    /// when `all`, after a connection).
    async fn reconcile(&mut self, all: bool) {
        let devices = match self.sources.devices.list().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT: cannot list devices");
                return;
            }
        };
        let now = crate::now_ms();
        let t = self.settings.topics.clone();
        let mut present = HashSet::new();
        self.names.clear();
        for d in &devices {
            self.names.insert(d.id.0, d.name.clone());
            present.insert(d.name.clone());
            if all || !self.announced.contains(&d.name) {
                for (topic, config) in payloads::discovery(&t, &d.name) {
                    self.json(topic, true, &config);
                }
                self.announced.insert(d.name.clone());
            }
            let online = d.enabled
                && d.last_seen_ms
                    .is_some_and(|s| now - s <= crate::telemetry::read::ONLINE_WITHIN_MS);
            if all || self.online.get(&d.name) != Some(&online) {
                let word = if online { "online" } else { "offline" };
                self.publish(t.availability(&d.name), true, word.as_bytes().to_vec());
                self.online.insert(d.name.clone(), online);
            }
        }
        let gone: Vec<String> = self.announced.difference(&present).cloned().collect();
        for name in gone {
            // An empty retained config removes the entity from Home Assistant.
            for (topic, _) in payloads::discovery(&t, &name) {
                self.publish(topic, true, Vec::new());
            }
            self.publish(t.availability(&name), true, Vec::new());
            self.publish(t.state(&name), true, Vec::new());
            self.publish(t.energy(&name), true, Vec::new());
            self.energy.remove(&name);
            self.announced.remove(&name);
            self.online.remove(&name);
        }
    }

    async fn telemetry(&mut self, t: crate::news::Telemetry) {
        if !self.names.contains_key(&t.device_id) {
            self.reconcile(false).await;
        }
        let Some(name) = self.names.get(&t.device_id).cloned() else { return };
        let batch = match ecowatt_proto::codec::decode(&t.data) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, device = %name, "MQTT: a stored batch does not decode");
                return;
            }
        };
        let topics = self.settings.topics.clone();
        self.publish(
            topics.readings(&name),
            false,
            payloads::readings_text(&name, &batch).into_bytes(),
        );
        if let Some(last) = batch.samples.last() {
            self.json(topics.state(&name), true, &payloads::sample_json(batch.registers, last));
        }
        if self.online.get(&name) != Some(&true) {
            self.publish(topics.availability(&name), true, b"online".to_vec());
            self.online.insert(name, true);
        }
    }

    /// Each device's energy today (its site's local day, from the rollups),
    /// when it changed: one read for the whole fleet.
    async fn publish_energy(&mut self) {
        let now = crate::now_ms();
        let fleet = match self.sources.telemetry.fleet(now).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT: cannot read energy today");
                return;
            }
        };
        let topics = self.settings.topics.clone();
        for d in fleet {
            let tz = jiff::tz::TimeZone::get(&d.timezone).unwrap_or(jiff::tz::TimeZone::UTC);
            let date = jiff::Timestamp::from_millisecond(now)
                .map(|t| t.to_zoned_datetime(tz).date().to_string())
                .unwrap_or_default();
            let now_value = (date.clone(), d.today_wh);
            if self.energy.get(&d.name) == Some(&now_value) {
                continue;
            }
            let kwh = (d.today_wh / 10.0).round() / 100.0;
            let v = serde_json::json!({"today_kwh": kwh, "date": date});
            self.json(topics.energy(&d.name), true, &v);
            self.energy.insert(d.name, now_value);
        }
    }

    /// Publishes the config and newest commands of the devices that changed.
    async fn publish_changes(&mut self) {
        let mut names: HashSet<String> = HashSet::new();
        if std::mem::take(&mut self.pending_all) {
            names.extend(self.names.values().cloned());
        }
        for c in std::mem::take(&mut self.pending) {
            match c {
                crate::news::Changed::Name(n) => {
                    names.insert(n);
                }
                crate::news::Changed::Id(id) => {
                    if !self.names.contains_key(&id) {
                        self.reconcile(false).await;
                    }
                    if let Some(n) = self.names.get(&id) {
                        names.insert(n.clone());
                    }
                }
            }
        }
        let topics = self.settings.topics.clone();
        for name in names {
            // A device removed meanwhile has nothing to show (reconcile clears it).
            let Ok(shadow) = self.sources.configs.shadow(&name).await else { continue };
            self.json(topics.config(&name), true, &payloads::config_json(&shadow));
            let filter = crate::commands::CommandFilter {
                device: Some(name.clone()),
                limit: payloads::COMMANDS_SHOWN,
                ..Default::default()
            };
            match self.sources.commands.list(&filter).await {
                Ok(commands) => {
                    self.json(topics.commands(&name), true, &payloads::commands_json(&commands))
                }
                Err(e) => tracing::warn!(error = %e, device = %name, "MQTT: cannot read commands"),
            }
        }
    }

    /// Home Assistant set the export limit: queued like any operator's command.
    async fn command(&mut self, topic: &str, payload: &[u8]) {
        let m = &self.sources.metrics;
        let Some(device) = self.settings.topics.device_of_command(topic) else { return };
        let percentage = match payloads::export_limit_command(payload) {
            Ok(p) => p,
            Err(why) => {
                m.inc("ecowatt_mqtt_commands_total", format!("outcome=\"{why}\""));
                tracing::warn!(
                    device,
                    why,
                    bytes = payload.len(),
                    "MQTT export-limit command refused"
                );
                return;
            }
        };
        let request = CommandRequest::SetPowerPercentage { percentage };
        let queued = self
            .sources
            .commands
            .queue_with(device, &request, &QueueOptions::default(), ACTOR, crate::now_ms())
            .await;
        match queued {
            Ok(c) => {
                m.inc("ecowatt_mqtt_commands_total", "outcome=\"queued\"");
                tracing::info!(
                    device,
                    percentage,
                    command = c.id,
                    "MQTT export-limit command queued"
                );
            }
            Err(e) => {
                let outcome = match &e {
                    crate::db::StoreError::NotFound(_) => "unknown_device",
                    crate::db::StoreError::Invalid(_) | crate::db::StoreError::Refused { .. } => {
                        "refused"
                    }
                    _ => "store_error",
                };
                m.inc("ecowatt_mqtt_commands_total", format!("outcome=\"{outcome}\""));
                tracing::warn!(device, percentage, error = %e, "MQTT export-limit command not queued");
            }
        }
    }
}

async fn run(
    settings: MqttSettings,
    sources: Sources,
    mut telemetry: tokio::sync::broadcast::Receiver<crate::news::Telemetry>,
    mut changes: tokio::sync::broadcast::Receiver<crate::news::Changed>,
) {
    let options = match options(&settings) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "MQTT: not started");
            return;
        }
    };
    let (client, mut eventloop) = AsyncClient::new(options, settings.buffer.max(1));
    let news = Arc::clone(&sources.news);
    let mut p = Publisher {
        settings,
        sources,
        client,
        names: HashMap::new(),
        announced: HashSet::new(),
        online: HashMap::new(),
        connected: false,
        dropped_logged: 0,
        pending: HashSet::new(),
        pending_all: false,
        energy: HashMap::new(),
    };
    let mut tick = tokio::time::interval(RECONCILE);
    // Changes are published at most this often per device (a burst of
    // commands to one device is one message).
    let mut flush = tokio::time::interval(Duration::from_millis(250));
    let mut failures = 0u32;
    let stopping = news.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    p.connected = true;
                    tracing::info!(host = %p.settings.host, port = p.settings.port, "MQTT: connected to the broker");
                    let t = p.settings.topics.clone();
                    p.publish(t.server_availability(), true, b"online".to_vec());
                    if p.client.try_subscribe(t.export_limit_set_all(), QoS::AtLeastOnce).is_err() {
                        tracing::warn!("MQTT: cannot subscribe to export-limit commands");
                    }
                    p.reconcile(true).await;
                    p.energy.clear();
                    p.publish_energy().await;
                }
                Ok(Event::Incoming(Packet::Publish(msg))) => p.command(&msg.topic, &msg.payload).await,
                Ok(_) => {}
                Err(e) => {
                    p.sources.metrics.inc("ecowatt_mqtt_connection_errors_total", "");
                    if p.connected || failures == 0 {
                        tracing::warn!(error = %e, host = %p.settings.host, port = p.settings.port,
                            "MQTT: broker connection failed or lost; retrying with backoff");
                    }
                    p.connected = false;
                    failures = failures.saturating_add(1);
                    let backoff = Duration::from_millis(125u64 << failures.min(7)).min(MAX_BACKOFF);
                    tokio::time::sleep(backoff).await;
                }
            },
            received = telemetry.recv() => match received {
                Ok(t) => p.telemetry(t).await,
                Err(RecvError::Lagged(n)) => {
                    p.sources.metrics.add("ecowatt_mqtt_dropped_total", "", n);
                    tracing::warn!(batches = n, "MQTT: publishing fell behind; batches dropped");
                }
                Err(RecvError::Closed) => return,
            },
            changed = changes.recv() => match changed {
                Ok(c) => {
                    p.pending.insert(c);
                }
                Err(RecvError::Lagged(_)) => p.pending_all = true,
                Err(RecvError::Closed) => return,
            },
            _ = flush.tick(), if !p.pending.is_empty() || p.pending_all => p.publish_changes().await,
            _ = tick.tick() => {
                if p.connected {
                    p.reconcile(false).await;
                    p.publish_energy().await;
                }
            }
            _ = &mut stopping => {
                // A clean disconnect fires no last will: say it ourselves.
                let t = p.settings.topics.server_availability();
                p.publish(t, true, b"offline".to_vec());
                let _ = p.client.try_disconnect();
                let flush = async { while eventloop.poll().await.is_ok() {} };
                let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = |h: &str, port, c: Option<(&str, &str)>| Broker {
            host: h.into(),
            port,
            credentials: c.map(|(u, p)| (u.into(), p.into())),
            tls: false,
        };
        assert_eq!(parse_url("mqtt://localhost").unwrap(), b("localhost", 1883, None));
        assert_eq!(
            parse_url("mqtt://ha:secret@homeassistant.local:1884/").unwrap(),
            b("homeassistant.local", 1884, Some(("ha", "secret")))
        );
        assert_eq!(
            parse_url("mqtts://broker.example").unwrap(),
            Broker { tls: true, ..b("broker.example", 8883, None) }
        );
        for bad in ["localhost:1883", "http://x", "mqtt://", "mqtt://h:x", "mqtts://"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
