//! `ecowatt device --mqtt`: the agent publishes straight to a broker (a home
//! broker, with or without a cloud): the newest sample as its state (retained,
//! engineering units, the same JSON the server publishes), its availability
//! (retained, `offline` as its last will), and Home Assistant discovery, so
//! the inverter appears in Home Assistant with no YAML. On a device without a
//! server, Home Assistant's export-limit `number` sets the limit: the
//! payload is read strictly, the core checks and executes it (written, read
//! back) and the outcome is published on the device's `commands` topic. With
//! a server, the limit is a read-only sensor here: commands go through the
//! server, which validates and audits them. Topic layout: docs/mqtt.md.

use std::time::Duration;

use ecowatt_core::machine::LocalRefused;
use ecowatt_formats::mqtt::{self as shared, Topics};
use ecowatt_proto::codec::Sample;
use ecowatt_proto::messages::CommandResult;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How the agent reaches its broker.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// `mqtt://[user:password@]host[:port]`, or `mqtts://` for TLS.
    pub url: String,
    /// The CA (PEM) of an `mqtts://` broker with a private PKI (default: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// EcoWatt's topic prefix and Home Assistant's discovery prefix.
    pub topics: Topics,
    /// Client id (default `ecowatt-device-NAME`).
    pub client_id: Option<String>,
}

impl MqttSettings {
    /// The default prefixes for `url`.
    pub fn new(url: &str) -> Self {
        MqttSettings {
            url: url.to_owned(),
            topics: Topics {
                prefix: shared::DEFAULT_PREFIX.to_owned(),
                discovery: shared::DEFAULT_DISCOVERY_PREFIX.to_owned(),
            },
            client_id: None,
            ca_file: None,
        }
    }

    /// Checks the URL and the CA file without connecting: the broker and its TLS.
    pub fn check(&self) -> Result<(shared::Broker, Option<shared::Tls>), String> {
        let broker = shared::parse_url(&self.url)?;
        let tls = shared::Tls::for_broker(broker.tls, self.ca_file.as_deref())?;
        Ok((broker, tls))
    }
}

/// Export-limit commands from the broker: a percentage read from the
/// payload (its range is the core's to check), or why the payload was not one.
pub type Commands = mpsc::UnboundedReceiver<Result<u16, &'static str>>;

/// Messages waiting for the broker at most (beyond them, states are dropped
/// and counted: a newer one follows within a poll interval).
const QUEUE: usize = 64;
/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The agent's side of its broker connection.
pub struct Link {
    client: AsyncClient,
    topics: Topics,
    device: String,
    /// States not queued because the broker was away.
    dropped: u64,
}

impl Link {
    /// Connects (in the background, again and again while the broker is
    /// away) as `device`; `settable`: Home Assistant may set the export limit.
    /// Export-limit commands arrive on the receiver, read but not yet checked.
    pub fn start(
        settings: &MqttSettings,
        device: &str,
        settable: bool,
    ) -> Result<(Link, Commands), String> {
        let (broker, tls) = settings.check()?;
        let id = settings.client_id.clone().unwrap_or_else(|| format!("ecowatt-device-{device}"));
        let mut options = MqttOptions::new(id, broker.host, broker.port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(tls) = &tls {
            options.set_transport(tls.transport()?);
        }
        if let Some((user, password)) = broker.credentials {
            options.set_credentials(user, password);
        }
        let topics = settings.topics.clone();
        options.set_last_will(LastWill::new(
            topics.availability(device),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        let (client, events) = AsyncClient::new(options, QUEUE);
        let (commands, received) = mpsc::unbounded_channel();
        let announce = Announce { topics: topics.clone(), device: device.to_owned(), settable };
        tokio::spawn(drive(events, client.clone(), announce, commands));
        Ok((Link { client, topics, device: device.to_owned(), dropped: 0 }, received))
    }

    fn publish(&mut self, topic: String, retain: bool, payload: &Value) {
        let bytes = payload.to_string().into_bytes();
        if self.client.try_publish(topic, QoS::AtLeastOnce, retain, bytes).is_err() {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(dropped = self.dropped, "MQTT broker away: states dropped");
            }
        }
    }

    /// A new sample: the device's state.
    pub fn sample(&mut self, mask: u16, sample: &Sample) {
        let topic = self.topics.state(&self.device);
        self.publish(topic, true, &shared::sample_json(mask, sample));
    }

    /// A local command's outcome: refused, or executed with its read-back
    /// (`percent`: none when the payload was not a number).
    pub fn command(&mut self, percent: Option<u16>, created_ms: u64, outcome: CommandOutcome) {
        let (id, status, result, completed_ms) = match outcome {
            CommandOutcome::Refused(why) => (Value::Null, "refused", json!(why), created_ms),
            CommandOutcome::Executed(r) => {
                let status = if r.succeeded { "succeeded" } else { "failed" };
                let message = match (r.succeeded, r.exception, r.value) {
                    (true, _, _) => Value::Null,
                    (_, Some(e), _) => json!(format!("Modbus exception {e:02X}")),
                    (_, None, Some(v)) => json!(format!("the register reads {v}")),
                    (_, None, None) => json!("no answer from the inverter"),
                };
                (json!(r.command_id), status, message, r.executed_ms)
            }
        };
        let topic = self.topics.commands(&self.device);
        let newest = json!([{
            "id": id,
            "type": "set_power_percentage",
            "parameters": {"percentage": percent},
            "status": status,
            "result": result,
            "created_by": "mqtt",
            "created_ms": created_ms,
            "completed_ms": completed_ms,
        }]);
        self.publish(topic, true, &newest);
    }

    /// Says `offline` (retained) and disconnects, waiting at most a second.
    pub async fn stop(self) {
        let topic = self.topics.availability(&self.device);
        let said = self.client.publish(topic, QoS::AtLeastOnce, true, "offline").await;
        if said.is_ok() {
            // Time for the event loop to carry it before the disconnect.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.disconnect()).await;
    }
}

/// What became of a local command.
#[derive(Debug, Clone)]
pub enum CommandOutcome {
    /// Not taken: the payload's or the core's reason (a stable code).
    Refused(&'static str),
    /// Executed, with its read-back.
    Executed(CommandResult),
}

impl From<LocalRefused> for CommandOutcome {
    fn from(r: LocalRefused) -> Self {
        CommandOutcome::Refused(r.code())
    }
}

/// What the device says about itself on every connection.
struct Announce {
    topics: Topics,
    device: String,
    settable: bool,
}

/// Polls the connection (reconnecting with back-off), announces the device
/// on each connection and hands on export-limit commands.
async fn drive(
    mut events: EventLoop,
    client: AsyncClient,
    a: Announce,
    commands: mpsc::UnboundedSender<Result<u16, &'static str>>,
) {
    let set = a.topics.export_limit_set(&a.device);
    let mut backoff = Duration::from_millis(250);
    let mut failures = 0u64;
    while !commands.is_closed() {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(250);
                tracing::info!(device = %a.device, "MQTT broker connected");
                let own = [a.topics.availability(&a.device)];
                let mut messages: Vec<(String, Vec<u8>)> =
                    shared::discovery(&a.topics, &a.device, &own, a.settable)
                        .into_iter()
                        .map(|(t, c)| (t, c.to_string().into_bytes()))
                        .collect();
                messages.push((own[0].clone(), b"online".to_vec()));
                for (topic, payload) in messages {
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload);
                }
                if a.settable {
                    let _ = client.try_subscribe(set.clone(), QoS::AtLeastOnce);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == set => {
                // Read here; the range is the core's to check (as for a server's command).
                let read = shared::whole_number(&p.payload)
                    .and_then(|v| u16::try_from(v).map_err(|_| "out_of_range"));
                if let Err(why) = read {
                    tracing::warn!(why, "an export-limit command from MQTT was not read");
                }
                let _ = commands.send(read);
            }
            // The agent is stopping.
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "MQTT broker unreachable; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
