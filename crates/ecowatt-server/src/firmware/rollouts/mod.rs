//! Firmware rollouts: which devices get which image, in waves, and how far
//! each got. A rollout offers its current wave's devices the image on their
//! syncs; a wave ends when each of its devices has succeeded, failed, rolled
//! back or been cancelled, and the next is offered; a wave whose failures
//! pass the rollout's threshold aborts it ([`wave_outcome`]). The rules are
//! plain functions here; [`store`] holds the SQL.

pub mod store;

use std::collections::BTreeMap;

use ecowatt_proto::messages::OtaState;
use serde::Serialize;

pub use store::Rollouts;

use crate::domain::Invalid;

/// Where a rollout is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Offering its current wave.
    Running,
    /// Offering nothing until resumed.
    Paused,
    /// Stopped for good (by an operator, or by its failure threshold).
    Aborted,
    /// Every wave done.
    Completed,
}

impl RolloutState {
    /// Every state.
    pub const ALL: [RolloutState; 4] = [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Aborted,
        RolloutState::Completed,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "completed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        RolloutState::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Where one device is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Its wave has not come.
    Pending,
    /// Offered, no report yet.
    Offered,
    /// Downloading into its inactive slot.
    Downloading,
    /// Checking the image.
    Verifying,
    /// Switching slots and restarting.
    Installing,
    /// Running the new image on trial.
    Trial,
    /// Runs the new image, confirmed.
    Succeeded,
    /// Refused or failed before any slot switch.
    Failed,
    /// The new image did not confirm itself; the old one runs.
    RolledBack,
    /// Taken out (the rollout was aborted before it installed).
    Cancelled,
}

impl DeviceState {
    /// Every state.
    pub const ALL: [DeviceState; 10] = [
        DeviceState::Pending,
        DeviceState::Offered,
        DeviceState::Downloading,
        DeviceState::Verifying,
        DeviceState::Installing,
        DeviceState::Trial,
        DeviceState::Succeeded,
        DeviceState::Failed,
        DeviceState::RolledBack,
        DeviceState::Cancelled,
    ];

    /// The states in which the offer is (still) sent: the device has not
    /// started installing. Aborting cancels these.
    pub const WAITING: [DeviceState; 4] = [
        DeviceState::Pending,
        DeviceState::Offered,
        DeviceState::Downloading,
        DeviceState::Verifying,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Offered => "offered",
            DeviceState::Downloading => "downloading",
            DeviceState::Verifying => "verifying",
            DeviceState::Installing => "installing",
            DeviceState::Trial => "trial",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
            DeviceState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        DeviceState::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// What a device's OTA report says its state is.
    pub fn reported(state: OtaState) -> DeviceState {
        match state {
            OtaState::Downloading => DeviceState::Downloading,
            OtaState::Verifying => DeviceState::Verifying,
            OtaState::Installing => DeviceState::Installing,
            OtaState::Trial => DeviceState::Trial,
            OtaState::Succeeded => DeviceState::Succeeded,
            OtaState::Failed => DeviceState::Failed,
            OtaState::RolledBack => DeviceState::RolledBack,
        }
    }

    /// Its part in the rollout is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeviceState::Succeeded
                | DeviceState::Failed
                | DeviceState::RolledBack
                | DeviceState::Cancelled
        )
    }

    /// It counts against the failure threshold.
    pub fn is_failure(self) -> bool {
        matches!(self, DeviceState::Failed | DeviceState::RolledBack)
    }

    /// The offer is (still) sent.
    pub fn is_waiting(self) -> bool {
        DeviceState::WAITING.contains(&self)
    }
}

/// `states` as an SQL list: `('pending', 'offered')`.
pub fn sql_list(states: &[DeviceState]) -> String {
    let names: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
    format!("({})", names.join(", "))
}

/// Which devices a rollout is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutTarget {
    /// These devices, by name.
    Devices(Vec<String>),
    /// This percentage (1-100) of the enabled devices.
    Percent(u32),
}

/// A rollout to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    /// The image.
    pub firmware_id: i64,
    /// The devices.
    pub target: RolloutTarget,
    /// Cumulative percentages of the rollout's devices per wave, ending at 100.
    pub waves: Vec<u32>,
    /// A wave whose failures (failed or rolled back) exceed this percentage of
    /// its devices aborts the rollout.
    pub failure_threshold_pct: u32,
    /// Each device gets the image encrypted under a key only it can derive;
    /// a device that cannot decrypt fails (`encryption_unsupported`).
    pub encrypted: bool,
}

impl NewRollout {
    /// Checks the waves and the threshold.
    pub fn validate(&self) -> Result<(), Invalid> {
        let w = &self.waves;
        if w.is_empty()
            || w.len() > 10
            || w.windows(2).any(|p| p[0] >= p[1])
            || w[0] == 0
            || *w.last().expect("not empty") != 100
        {
            return Err(Invalid::new(
                "waves",
                "1 to 10 rising percentages of the rollout's devices, ending at 100 (e.g. [10, 50, 100])",
            ));
        }
        if self.failure_threshold_pct > 100 {
            return Err(Invalid::new("failure_threshold_pct", "a percentage, 0 to 100"));
        }
        if let RolloutTarget::Percent(p) = self.target
            && !(1..=100).contains(&p)
        {
            return Err(Invalid::new("percent", "1 to 100"));
        }
        if matches!(&self.target, RolloutTarget::Devices(d) if d.is_empty()) {
            return Err(Invalid::new("devices", "name at least one device"));
        }
        Ok(())
    }
}

/// What an operator does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Stop offering; downloads in flight stop and keep their progress.
    Pause,
    /// Offer again.
    Resume,
    /// Stop for good: devices not yet installing are cancelled.
    Abort,
}

impl RolloutAction {
    /// The state `action` leads to from `state`, if it may be taken there.
    pub fn from_state(self, state: RolloutState) -> Option<RolloutState> {
        use RolloutState::*;
        match (self, state) {
            (RolloutAction::Pause, Running) => Some(Paused),
            (RolloutAction::Resume, Paused) => Some(Running),
            (RolloutAction::Abort, Running | Paused) => Some(Aborted),
            _ => None,
        }
    }

    /// Its audit name and past participle.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            RolloutAction::Pause => ("rollout.pause", "paused"),
            RolloutAction::Resume => ("rollout.resume", "resumed"),
            RolloutAction::Abort => ("rollout.abort", "aborted"),
        }
    }
}

/// A rollout with its progress.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollout {
    /// Numeric id.
    pub id: i64,
    /// The image.
    pub firmware_id: i64,
    /// Its version.
    pub version: String,
    /// Its hardware target.
    pub target: String,
    /// Where it is.
    pub state: RolloutState,
    /// Cumulative percentages per wave.
    pub waves: Vec<u32>,
    /// The wave being offered (from 0).
    pub current_wave: i64,
    /// Abort threshold, percent of a wave.
    pub failure_threshold_pct: i64,
    /// Why it was aborted.
    pub reason: Option<String>,
    /// The image goes to each device encrypted ([`NewRollout::encrypted`]).
    pub encrypted: bool,
    /// When it was created.
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
    /// Last change.
    pub updated_ms: i64,
    /// Devices per state.
    pub counts: BTreeMap<DeviceState, i64>,
    /// Devices in it.
    pub devices_total: i64,
}

/// One device's progress in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutDevice {
    /// Device name.
    pub device: String,
    /// Its wave (from 0).
    pub wave: i64,
    /// Where it is.
    pub state: DeviceState,
    /// Bytes downloaded.
    pub done: i64,
    /// Image size.
    pub total: i64,
    /// Download progress, percent.
    pub percent: i64,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
    /// The version the device reports running.
    pub running: Option<String>,
    /// Last change.
    pub updated_ms: i64,
}

/// A firmware update offered to one device in one rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// Names the download (hex of 16 random bytes).
    pub token: String,
    /// The stored image.
    pub firmware_id: i64,
    /// The image's signed manifest JSON, as uploaded.
    pub manifest: serde_json::Value,
    /// It goes encrypted; only to a device that takes it.
    pub encrypted: bool,
}

/// What a download token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    /// The stored image.
    pub firmware_id: i64,
    /// The device it is offered to.
    pub device_id: i64,
    /// Delivered encrypted for that device.
    pub encrypted: bool,
}

/// The wave (from 0) of the `i`-th of `n` devices: the first whose
/// cumulative share covers it. A wave's cumulative count is its share of `n`
/// rounded to the nearest device (34 % of 3 is 1, not 2), and at least one,
/// so that a small first wave still tries one device first.
pub fn wave_of(i: usize, n: usize, waves: &[u32]) -> usize {
    waves
        .iter()
        .position(|&pct| i < ((n * pct as usize + 50) / 100).max(1))
        .unwrap_or(waves.len() - 1)
}

/// A deterministic shuffle key, so that a percentage picks a spread of devices.
pub fn spread(rollout_seed: &str, name: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(format!("{rollout_seed}/{name}").as_bytes()).into()
}

/// What a wave's device states say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveOutcome {
    /// Its failures pass the threshold: the rollout aborts.
    Abort {
        /// Devices failed or rolled back.
        failures: usize,
        /// Devices in the wave.
        total: usize,
    },
    /// Some device has not finished.
    Open,
    /// Every device finished, within the threshold: the next wave may start.
    Done,
}

/// The wave policy: a wave whose failures exceed `threshold_pct` percent of
/// its devices aborts the rollout; else it is done when every device is.
pub fn wave_outcome(states: &[DeviceState], threshold_pct: i64) -> WaveOutcome {
    let failures = states.iter().filter(|s| s.is_failure()).count();
    if !states.is_empty() && failures as i64 * 100 > threshold_pct * states.len() as i64 {
        return WaveOutcome::Abort { failures, total: states.len() };
    }
    if states.iter().all(|s| s.is_final()) { WaveOutcome::Done } else { WaveOutcome::Open }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_split_by_cumulative_share() {
        let w = |n: usize, waves: &[u32]| (0..n).map(|i| wave_of(i, n, waves)).collect::<Vec<_>>();
        assert_eq!(w(10, &[10, 50, 100]), [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        assert_eq!(w(3, &[100]), [0, 0, 0]);
        // A small share of a small fleet still gets one device first.
        assert_eq!(w(3, &[1, 100]), [0, 1, 1]);
        assert_eq!(w(1, &[50, 100]), [0]);
        // The nearest count, not the next one up: 34 % of 3 devices is 1.
        assert_eq!(w(3, &[34, 100]), [0, 1, 1]);
        assert_eq!(w(3, &[67, 100]), [0, 0, 1]);
        assert_eq!(w(4, &[25, 50, 100]), [0, 1, 2, 2]);
    }

    #[test]
    fn the_wave_policy() {
        use DeviceState::*;
        for (states, threshold, outcome) in [
            (&[Succeeded, Succeeded][..], 20, WaveOutcome::Done),
            (&[Succeeded, Downloading][..], 20, WaveOutcome::Open),
            (&[Succeeded, Cancelled][..], 0, WaveOutcome::Done),
            (&[Failed, Succeeded, Succeeded, Succeeded, Succeeded][..], 20, WaveOutcome::Done),
            (
                &[Failed, RolledBack, Succeeded, Succeeded][..],
                20,
                WaveOutcome::Abort { failures: 2, total: 4 },
            ),
            (&[Failed, Offered][..], 0, WaveOutcome::Abort { failures: 1, total: 2 }),
            (&[][..], 0, WaveOutcome::Done),
        ] {
            assert_eq!(wave_outcome(states, threshold), outcome, "{states:?} at {threshold} %");
        }
    }

    #[test]
    fn operators_move_rollouts_along_their_lifecycle() {
        use RolloutAction::*;
        use RolloutState::*;
        for (action, from, to) in [
            (Pause, Running, Some(Paused)),
            (Pause, Paused, None),
            (Resume, Paused, Some(Running)),
            (Resume, Running, None),
            (Abort, Running, Some(Aborted)),
            (Abort, Paused, Some(Aborted)),
            (Abort, Completed, None),
            (Pause, Aborted, None),
        ] {
            assert_eq!(action.from_state(from), to, "{action:?} from {from:?}");
        }
    }

    #[test]
    fn device_states_name_themselves_and_group() {
        for s in DeviceState::ALL {
            assert_eq!(DeviceState::parse(s.as_str()), Some(s));
            assert!(!(s.is_waiting() && s.is_final()), "{s:?}");
        }
        assert_eq!(
            sql_list(&DeviceState::WAITING),
            "('pending', 'offered', 'downloading', 'verifying')"
        );
        assert_eq!(DeviceState::reported(OtaState::RolledBack), DeviceState::RolledBack);
    }

    #[test]
    fn new_rollouts_are_checked() {
        let ok = NewRollout {
            firmware_id: 1,
            target: RolloutTarget::Percent(10),
            waves: vec![10, 50, 100],
            failure_threshold_pct: 20,
            encrypted: false,
        };
        assert!(ok.validate().is_ok());
        for (bad, field) in [
            (NewRollout { waves: vec![50, 50, 100], ..ok.clone() }, "waves"),
            (NewRollout { waves: vec![0, 100], ..ok.clone() }, "waves"),
            (NewRollout { waves: vec![10, 90], ..ok.clone() }, "waves"),
            (NewRollout { failure_threshold_pct: 101, ..ok.clone() }, "failure_threshold_pct"),
            (NewRollout { target: RolloutTarget::Percent(0), ..ok.clone() }, "percent"),
            (NewRollout { target: RolloutTarget::Devices(vec![]), ..ok.clone() }, "devices"),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, field);
        }
    }
}
