//! The sealed device protocol v1 (`docs/protocol.md`): what an authentic
//! sync reports and what goes back, what an upload stores, and the rules of
//! both. The door ([`door`]) checks a request up to its tag; the message is
//! then admitted (replay window, key, enabled) in the transaction that
//! applies it ([`store`]); [`messages`] maps the wire messages to the
//! aggregates' types and back.

pub mod deliveries;
pub mod door;
pub mod messages;
pub mod store;

use crate::commands::{Command, CommandOutcome};
use crate::config::{DeviceConfig, Rejection};
pub use crate::devices::admission::SyncRefusal;
pub use crate::telemetry::Accepted;
use crate::telemetry::StoredBatch;
pub use store::Protocol;

/// Longest a sync is held open waiting for news.
pub const MAX_WAIT_MS: u32 = 25_000;
/// A delivered command without a result is handed out again on the next sync.
pub const REDELIVER_MS: i64 = 0;
/// Most commands handed out in one answer.
pub const COMMANDS_PER_ANSWER: i64 = 32;

/// What an authentic sync request reports, to be applied once.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// The version of the key that sealed it.
    pub key_version: i64,
    /// Its counter.
    pub counter: u64,
    /// The config version and config the device runs.
    pub applied: Option<(i64, DeviceConfig)>,
    /// Fields it refused.
    pub rejected: Vec<Rejection>,
    /// Command results.
    pub results: Vec<(i64, CommandOutcome)>,
    /// Firmware version it runs.
    pub firmware: Option<String>,
    /// How its firmware update is going.
    pub ota: Option<ecowatt_proto::messages::OtaReport>,
    /// Its export control (absent from firmware without it).
    pub control: Option<ecowatt_proto::messages::ControlReport>,
    /// Its schedule (absent from firmware without it).
    pub schedule: Option<ecowatt_proto::messages::ScheduleReport>,
}

/// What goes back to the device in a sync answer.
#[derive(Debug, Clone)]
pub struct SyncDelivery {
    /// The device's name.
    pub device: String,
    /// The server's counter for the answer.
    pub down_counter: u64,
    /// The desired config, when the device does not run it.
    pub config: Option<(i64, DeviceConfig)>,
    /// Commands handed out.
    pub commands: Vec<Command>,
    /// A firmware update to offer.
    pub update: Option<crate::firmware::rollouts::Offer>,
    /// Leases and the fail-safe, for a device that reports control.
    pub control: Option<ecowatt_proto::messages::ControlOrders>,
    /// A plan to run and commands that return to it (only to a device that reported a schedule).
    pub schedule: Option<ecowatt_proto::messages::ScheduleOrders>,
}

impl SyncDelivery {
    /// An answer with nothing in it.
    pub fn empty(device: String, down_counter: u64) -> Self {
        SyncDelivery {
            device,
            down_counter,
            config: None,
            commands: vec![],
            update: None,
            control: None,
            schedule: None,
        }
    }
}

/// A telemetry upload, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The batch to store.
    pub batch: StoredBatch,
    /// The same, decoded (for the rollups).
    pub decoded: std::sync::Arc<ecowatt_proto::codec::Batch>,
    /// Samples the device has dropped so far.
    pub dropped_total: i64,
    /// The newest reading of the export limit in it (value, Unix ms): it
    /// confirms the writes it shows took effect.
    pub export_limit: Option<(u16, i64)>,
}

/// What the server last stored of a device, for telling a quiet sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Firmware version last reported.
    pub firmware: Option<String>,
    /// Config version last reported.
    pub reported_version: Option<i64>,
    /// The config last reported, as stored (JSON text).
    pub reported: Option<String>,
    /// The fields last refused, as stored (JSON text).
    pub rejected: Option<String>,
    /// The desired config version.
    pub desired_version: i64,
    /// Commands waiting to be delivered.
    pub commands: i64,
    /// Firmware offers waiting.
    pub offers: i64,
    /// The control the device last reported, as stored (JSON text).
    pub control_reported: Option<String>,
    /// The installer's fail-safe, as stored.
    pub failsafe: Option<i64>,
    /// The schedule version the device is to run (`devices.schedule_version`).
    pub schedule_version: i64,
}

/// How much a sync changes ([`quietness`]). A sync is *quiet* when it
/// reports what the server already stored and there is nothing to deliver:
/// then it only advances the replay window (in the ingest's group commit)
/// instead of taking a transaction of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quietness {
    /// Nothing: admitted in a group commit, answered empty.
    Quiet,
    /// Only results of its commands and its control state (the new text
    /// here): recorded in a group commit, answered empty.
    Light(Option<String>),
    /// Anything else: its own transaction.
    Busy,
}

/// Whether a sync is quiet, light or busy against what is `stored` (whose
/// `commands` count leaves out those the sync brings results for).
pub fn quietness(report: &SyncReport, stored: &Stored, now: i64) -> Quietness {
    if report.ota.is_some() {
        return Quietness::Busy;
    }
    let mut control_text = None;
    if let Some(c) = &report.control {
        let desired = crate::control::FailSafe::from_column(stored.failsafe);
        if !c.episodes.is_empty() || crate::control::failsafe_to_send(desired, c.failsafe).is_some()
        {
            return Quietness::Busy;
        }
        let text = crate::control::reported_json(c, report.schedule.as_ref());
        if stored.control_reported.as_deref() != Some(text.as_str()) {
            control_text = Some(text);
        }
    }
    if let Some(s) = &report.schedule
        && crate::control::schedules::plan_due(stored.schedule_version, s, now)
    {
        return Quietness::Busy;
    }
    let same_report = match &report.applied {
        None => true,
        Some((version, applied)) => {
            Some(*version) == stored.reported_version
                && stored.reported.as_deref() == Some(json_text(applied).as_str())
                && stored.rejected.as_deref() == Some(json_text(&report.rejected).as_str())
        }
    };
    let unchanged = same_report
        && (report.firmware.is_none() || report.firmware == stored.firmware)
        && report.applied.as_ref().map(|(v, _)| *v).or(stored.reported_version)
            == Some(stored.desired_version)
        && stored.commands == 0
        && stored.offers == 0;
    match (unchanged, report.results.is_empty() && control_text.is_none()) {
        (false, _) => Quietness::Busy,
        (true, true) => Quietness::Quiet,
        (true, false) => Quietness::Light(control_text),
    }
}

/// A value as JSON text, as the config shadow stores it.
fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("stored values serialise")
}

/// Whether a sync is answered at once rather than held for news: it has
/// something to deliver (an offer counts unless the device already works on
/// that version), or the device asked not to wait.
pub fn answer_now(d: &SyncDelivery, working_on: Option<&str>, wait_ms: u32) -> bool {
    let new_offer = d.update.as_ref().is_some_and(|u| working_on != u.manifest["version"].as_str());
    let failsafe = d.control.as_ref().is_some_and(|c| c.failsafe.is_some());
    let plan = d.schedule.as_ref().is_some_and(|s| s.plan.is_some());
    d.config.is_some() || !d.commands.is_empty() || new_offer || failsafe || plan || wait_ms == 0
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::firmware::rollouts::Offer;

    fn config() -> DeviceConfig {
        DeviceConfig { poll_interval_ms: 1000, upload_interval_ms: 5000, registers: vec![0, 1] }
    }

    fn stored() -> Stored {
        Stored {
            firmware: Some("1.0.0".into()),
            reported_version: Some(3),
            reported: Some(serde_json::to_string(&config()).unwrap()),
            rejected: Some("[]".into()),
            desired_version: 3,
            commands: 0,
            offers: 0,
            control_reported: None,
            failsafe: None,
            schedule_version: 0,
        }
    }

    fn is_quiet(report: &SyncReport, stored: &Stored, now: i64) -> bool {
        quietness(report, stored, now) == Quietness::Quiet
    }

    #[test]
    fn a_sync_is_quiet_only_when_it_changes_nothing_and_nothing_waits() {
        let same = SyncReport { applied: Some((3, config())), ..Default::default() };
        assert!(is_quiet(&same, &stored(), 0));
        assert!(is_quiet(&SyncReport::default(), &stored(), 0), "reports nothing");
        let fw = SyncReport { firmware: Some("1.0.0".into()), ..same.clone() };
        assert!(is_quiet(&fw, &stored(), 0));

        let cases: Vec<(&str, SyncReport, Stored)> = vec![
            (
                "new firmware",
                SyncReport { firmware: Some("1.1.0".into()), ..same.clone() },
                stored(),
            ),
            ("new version", SyncReport { applied: Some((2, config())), ..same.clone() }, stored()),
            (
                "other config",
                SyncReport {
                    applied: Some((3, DeviceConfig { poll_interval_ms: 2000, ..config() })),
                    ..same.clone()
                },
                stored(),
            ),
            (
                "refusals changed",
                SyncReport {
                    rejected: vec![Rejection {
                        field: "poll_interval_ms".into(),
                        reason: "x".into(),
                    }],
                    ..same.clone()
                },
                stored(),
            ),
            (
                "a result",
                SyncReport { results: vec![(1, CommandOutcome::succeeded())], ..same.clone() },
                stored(),
            ),
            (
                "an OTA report",
                SyncReport {
                    ota: Some(ecowatt_proto::messages::OtaReport {
                        state: ecowatt_proto::messages::OtaState::Downloading,
                        version: "1.1.0".into(),
                        done: 0,
                        total: 10,
                        reason: 0,
                    }),
                    ..same.clone()
                },
                stored(),
            ),
            ("a config to send", same.clone(), Stored { desired_version: 4, ..stored() }),
            ("a command waits", same.clone(), Stored { commands: 1, ..stored() }),
            ("an offer waits", same.clone(), Stored { offers: 1, ..stored() }),
            (
                "never reported",
                SyncReport::default(),
                Stored { reported_version: None, ..stored() },
            ),
        ];
        for (what, report, stored) in cases {
            assert!(!is_quiet(&report, &stored, 0), "{what}");
        }
    }

    #[test]
    fn results_and_a_changed_control_state_are_light_anything_more_is_busy() {
        use ecowatt_proto::messages::{ControlReport, Episode, EpisodeKind, EpisodeOutcome};
        let same = SyncReport { applied: Some((3, config())), ..Default::default() };
        let result = SyncReport { results: vec![(1, CommandOutcome::succeeded())], ..same.clone() };
        assert_eq!(quietness(&result, &stored(), 0), Quietness::Light(None));
        let control = ControlReport { failsafe: 0xFFFE, ..Default::default() };
        let text = crate::control::reported_json(&control, None);
        let reporting = SyncReport { control: Some(control.clone()), ..result.clone() };
        assert_eq!(quietness(&reporting, &stored(), 0), Quietness::Light(Some(text.clone())));
        let as_stored = Stored { control_reported: Some(text), ..stored() };
        assert_eq!(quietness(&reporting, &as_stored, 0), Quietness::Light(None));
        let no_results = SyncReport { results: vec![], ..reporting.clone() };
        assert_eq!(quietness(&no_results, &as_stored, 0), Quietness::Quiet);
        // Another command waiting, an episode, a fail-safe to send, a new config: busy.
        assert_eq!(quietness(&result, &Stored { commands: 1, ..stored() }, 0), Quietness::Busy);
        let episode = Episode {
            kind: EpisodeKind::FailSafe,
            command_id: 1,
            at_ms: 1,
            value: 0,
            outcome: EpisodeOutcome::Confirmed,
        };
        let with_episode = SyncReport {
            control: Some(ControlReport { episodes: vec![episode], ..control.clone() }),
            ..result.clone()
        };
        assert_eq!(quietness(&with_episode, &as_stored, 0), Quietness::Busy);
        assert_eq!(
            quietness(&reporting, &Stored { failsafe: Some(40), ..as_stored.clone() }, 0),
            Quietness::Busy
        );
        assert_eq!(
            quietness(&result, &Stored { desired_version: 4, ..stored() }, 0),
            Quietness::Busy
        );
    }

    #[test]
    fn a_sync_waits_only_when_it_has_nothing_new() {
        let empty = SyncDelivery::empty("d".into(), 1);
        assert!(!answer_now(&empty, None, 1000));
        assert!(answer_now(&empty, None, 0));
        let with_config = SyncDelivery { config: Some((2, config())), ..empty.clone() };
        assert!(answer_now(&with_config, None, 1000));
        let offer = Offer {
            token: "T".into(),
            firmware_id: 1,
            manifest: json!({"version": "1.2.0"}),
            encrypted: false,
        };
        let offered = SyncDelivery { update: Some(offer), ..empty };
        assert!(answer_now(&offered, None, 1000));
        assert!(answer_now(&offered, Some("1.1.0"), 1000));
        assert!(!answer_now(&offered, Some("1.2.0"), 1000), "already working on it");
    }
}
