//! Inverter commands: what an operator may ask (validated against the
//! register map and the device's rated power, never clamped), what the
//! device does for it (an [`Action`], stored in typed columns), and its life:
//! `queued → delivered → succeeded | failed | expired | cancelled`, then
//! `confirmed` once a later reading shows the value. The rules are plain
//! functions here; [`store`] holds the SQL.

pub mod store;

use std::collections::BTreeMap;

use ecowatt_proto::registers::{self, EXPORT_LIMIT};
use serde::{Deserialize, Serialize};

pub use store::Commands;

use crate::domain::Invalid;

/// The commands an operator can queue, as the API and the seed name them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "type", content = "parameters")]
pub enum CommandRequest {
    /// Set the export limit to a percentage of rated power (0..=100).
    SetPowerPercentage {
        /// Percent of rated power.
        percentage: i64,
    },
    /// Set the export limit in watts, converted with the device's rated power.
    SetPower {
        /// Watts.
        power_value: i64,
    },
    /// Write a raw value to a writable register.
    WriteRegister {
        /// Register address.
        register_address: i64,
        /// Raw value.
        value: i64,
    },
    /// Read one register.
    ReadRegister {
        /// Register address.
        register_address: i64,
    },
}

/// What the device does on the inverter for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Action {
    /// Write `value` to `register` (then read it back).
    Write {
        /// Register address.
        register: u16,
        /// Raw value.
        value: u16,
    },
    /// Read `register`.
    Read {
        /// Register address.
        register: u16,
    },
}

impl CommandRequest {
    /// The command type as the seed names it.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandRequest::SetPowerPercentage { .. } => "set_power_percentage",
            CommandRequest::SetPower { .. } => "set_power",
            CommandRequest::WriteRegister { .. } => "write_register",
            CommandRequest::ReadRegister { .. } => "read_register",
        }
    }

    /// The seed's `parameters` object.
    pub fn parameters(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut o)) => o.remove("parameters").unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    /// [`Self::action`], except that with `any_address` a write to an
    /// address outside the register map (16-bit address and value) is
    /// passed on as it is: the original server's rule, under which the
    /// device executes it and reports the inverter's Modbus exception.
    /// Addresses in the map keep their checks.
    pub fn action_with(&self, rated_w: i64, any_address: bool) -> Result<Action, Invalid> {
        if let (true, CommandRequest::WriteRegister { register_address, value }) =
            (any_address, self)
        {
            if let (Ok(register), Ok(value)) =
                (u16::try_from(*register_address), u16::try_from(*value))
            {
                if registers::by_address(register).is_none() {
                    return Ok(Action::Write { register, value });
                }
            }
        }
        self.action(rated_w)
    }

    /// Validates against the register map and the device's rated power, and
    /// says what the device must do. Out-of-range values are refused, never clamped.
    pub fn action(&self, rated_w: i64) -> Result<Action, Invalid> {
        let write = |field: &str, address: i64, value: i64| -> Result<Action, Invalid> {
            let address = u16::try_from(address).map_err(|_| {
                Invalid::new(field, format!("no register {address}; the map is 0..=9"))
            })?;
            let raw = u16::try_from(value).map_err(|_| {
                Invalid::new("value", format!("{value} is not a 16-bit register value"))
            })?;
            registers::check_write(address, raw).map_err(|e| match e {
                registers::WriteError::OutOfRange { min, max, .. } => Invalid::new(
                    if field == "register_address" { "value" } else { field },
                    format!("{value} is outside {min}..={max} for register {address}"),
                ),
                other => Invalid::new("register_address", other.to_string()),
            })?;
            Ok(Action::Write { register: address, value: raw })
        };
        match *self {
            CommandRequest::SetPowerPercentage { percentage } => {
                if !(0..=100).contains(&percentage) {
                    return Err(Invalid::new(
                        "percentage",
                        format!("{percentage} is outside 0..=100"),
                    ));
                }
                write("percentage", i64::from(EXPORT_LIMIT), percentage)
            }
            CommandRequest::SetPower { power_value } => {
                if !(0..=rated_w).contains(&power_value) {
                    return Err(Invalid::new(
                        "power_value",
                        format!(
                            "{power_value} W is outside 0..={rated_w} W (the device's rated power)"
                        ),
                    ));
                }
                let pct = (power_value * 100 + rated_w / 2) / rated_w.max(1);
                write("power_value", i64::from(EXPORT_LIMIT), pct)
            }
            CommandRequest::WriteRegister { register_address, value } => {
                write("register_address", register_address, value)
            }
            CommandRequest::ReadRegister { register_address } => {
                match u16::try_from(register_address).ok().and_then(registers::by_address) {
                    Some(r) => Ok(Action::Read { register: r.address }),
                    None => Err(Invalid::new(
                        "register_address",
                        format!("no register {register_address}; the map is 0..=9"),
                    )),
                }
            }
        }
    }
}

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Waiting for the device.
    Queued,
    /// Handed to the device at least once; no result yet.
    Delivered,
    /// The device reports success.
    Succeeded,
    /// The device reports failure.
    Failed,
    /// Its time-to-live passed before a result arrived.
    Expired,
    /// An operator cancelled it before a result arrived.
    Cancelled,
    /// Succeeded, and a later reading shows the value took effect.
    Confirmed,
}

impl CommandStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [CommandStatus; 7] = [
        CommandStatus::Queued,
        CommandStatus::Delivered,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Expired,
        CommandStatus::Cancelled,
        CommandStatus::Confirmed,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
            CommandStatus::Cancelled => "cancelled",
            CommandStatus::Confirmed => "confirmed",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<Self> {
        CommandStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether no result has arrived yet.
    pub fn is_open(self) -> bool {
        matches!(self, CommandStatus::Queued | CommandStatus::Delivered)
    }

    /// Whether the device's result has been recorded.
    pub fn has_result(self) -> bool {
        matches!(self, CommandStatus::Succeeded | CommandStatus::Failed | CommandStatus::Confirmed)
    }
}

/// Time-to-live limits for a command, seconds.
pub const TTL_S: (i64, i64) = (10, 7 * 86_400);
/// Time-to-live when none is given, seconds.
pub const DEFAULT_TTL_S: i64 = 600;

/// Shortest and longest lease of an export limit, ms: a lease must outlive
/// a long poll and its retries, and a week is the longest silence anyone
/// means to cover.
pub const LEASE_MS: (i64, i64) = (60_000, 7 * 86_400_000);
/// The lease of an export limit to a device with a fail-safe, when none is given.
pub const DEFAULT_LEASE_MS: i64 = 900_000;

/// The lease `action` is held under: `asked` (ms) if given, else the default
/// when the device has a fail-safe (`failsafe`); only a write of the export
/// limit holds one, and only on a device whose installer set a fail-safe.
pub fn lease_for(
    action: &Action,
    asked: Option<i64>,
    failsafe: Option<i64>,
) -> Result<Option<i64>, crate::db::StoreError> {
    let limit = matches!(action, Action::Write { register: EXPORT_LIMIT, .. });
    let Some(lease) = asked else {
        return Ok((limit && failsafe.is_some()).then_some(DEFAULT_LEASE_MS));
    };
    if !limit {
        return Err(Invalid::new("lease_s", "only an export limit is held under a lease").into());
    }
    check_lease(lease)?;
    if failsafe.is_none() {
        return Err(crate::db::StoreError::Refused {
            code: "failsafe_not_configured",
            message: "the device has no fail-safe limit, so a lease could not end safely; set one \
                      (`ecowatt device failsafe NAME 40%` or `hold`)"
                .into(),
        });
    }
    Ok(Some(lease))
}

/// Checks a lease's length, ms.
pub fn check_lease(lease_ms: i64) -> Result<i64, Invalid> {
    if (LEASE_MS.0..=LEASE_MS.1).contains(&lease_ms) {
        return Ok(lease_ms);
    }
    let (s, min, max) = (lease_ms / 1000, LEASE_MS.0 / 1000, LEASE_MS.1 / 1000);
    Err(Invalid::new("lease_s", format!("{s} s is outside {min}..={max} s")))
}

/// Slowest and fastest ramp, hundredths of a percent of rated power per second.
pub const RAMP_CENTI: (i64, i64) = (1, 10_000);

/// The ramp rate `action` is reached at (hundredths of % per second):
/// `asked` (% per second) if given, else the device's default; only a write
/// of the export limit ramps.
pub fn ramp_for(
    action: &Action,
    asked: Option<f64>,
    default_centi: Option<i64>,
) -> Result<Option<i64>, Invalid> {
    let limit = matches!(action, Action::Write { register: EXPORT_LIMIT, .. });
    let Some(pct) = asked else { return Ok(default_centi.filter(|_| limit)) };
    if !limit {
        return Err(Invalid::new("ramp_pct_per_s", "only an export limit is ramped"));
    }
    ramp_centi(pct).map(Some)
}

/// A ramp rate in % per second as hundredths, checked (0.01..=100).
pub fn ramp_centi(pct_per_s: f64) -> Result<i64, Invalid> {
    let centi = (pct_per_s * 100.0).round();
    if pct_per_s.is_finite() && (RAMP_CENTI.0 as f64..=RAMP_CENTI.1 as f64).contains(&centi) {
        Ok(centi as i64)
    } else {
        Err(Invalid::new(
            "ramp_pct_per_s",
            format!("{pct_per_s} is outside 0.01..=100 % per second"),
        ))
    }
}

/// Validates a time-to-live.
pub fn check_ttl(ttl_s: i64) -> Result<i64, Invalid> {
    if (TTL_S.0..=TTL_S.1).contains(&ttl_s) {
        Ok(ttl_s)
    } else {
        Err(Invalid::new("ttl_s", format!("{ttl_s} s is outside {}..={} s", TTL_S.0, TTL_S.1)))
    }
}

impl Action {
    /// The typed columns it is stored in: operation, register, value.
    pub fn columns(self) -> (&'static str, i64, Option<i64>) {
        match self {
            Action::Write { register, value } => {
                ("write", i64::from(register), Some(i64::from(value)))
            }
            Action::Read { register } => ("read", i64::from(register), None),
        }
    }

    /// Read back from its typed columns.
    pub fn from_columns(op: &str, register: i64, value: Option<i64>) -> Option<Action> {
        let register = u16::try_from(register).ok()?;
        match (op, value) {
            ("write", Some(v)) => Some(Action::Write { register, value: u16::try_from(v).ok()? }),
            ("read", None) => Some(Action::Read { register }),
            _ => None,
        }
    }
}

/// A queued inverter command and everything known about it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Command {
    /// Numeric id, never reused.
    pub id: i64,
    /// The device it is for.
    pub device: String,
    /// The seed's command type (`set_power_percentage`, ...).
    pub kind: String,
    /// The seed's `parameters`.
    pub parameters: serde_json::Value,
    /// What the device does on the inverter.
    pub action: Action,
    /// Where it is in its life.
    pub status: CommandStatus,
    /// When it was queued.
    pub created_ms: i64,
    /// Who queued it.
    pub created_by: String,
    /// When it expires if no result has arrived.
    pub expires_ms: i64,
    /// When it was last handed to the device.
    pub delivered_ms: Option<i64>,
    /// How often it was handed to the device.
    pub delivery_count: i64,
    /// When its result arrived (or it expired or was cancelled).
    pub completed_ms: Option<i64>,
    /// When the device says it executed it.
    pub executed_ms: Option<i64>,
    /// The device's message, or why it ended.
    pub result_message: Option<String>,
    /// The Modbus exception code, when the inverter refused.
    pub exception_code: Option<i64>,
    /// The register value read back (or read) by the device.
    pub result_value: Option<i64>,
    /// When a later reading confirmed the value.
    pub confirmed_ms: Option<i64>,
    /// The lease an export limit is held under (`None`: not leased).
    pub lease_ms: Option<i64>,
    /// The ramp an export limit is reached at, % of rated power per second (`None`: at once).
    pub ramp_pct_per_s: Option<f64>,
    /// The curtailment it belongs to.
    pub curtailment_id: Option<i64>,
    /// It returns the device to its schedule: a device running one writes
    /// the schedule's limit in force instead of this command's value.
    pub resume: bool,
}

/// A device's report of how a command went.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommandOutcome {
    /// Whether it succeeded.
    pub success: bool,
    /// Free text.
    pub message: Option<String>,
    /// Modbus exception code, when the inverter refused.
    pub exception_code: Option<u8>,
    /// Register value read back (or read).
    pub value: Option<u16>,
    /// When the device executed it.
    pub executed_ms: Option<i64>,
}

impl CommandOutcome {
    /// Succeeded, with nothing more to say (tools and tests).
    pub fn succeeded() -> Self {
        CommandOutcome {
            success: true,
            message: None,
            exception_code: None,
            value: None,
            executed_ms: None,
        }
    }
}

/// Which commands to list.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// Only this device's.
    pub device: Option<String>,
    /// Only in this status.
    pub status: Option<CommandStatus>,
    /// Only of this type.
    pub kind: Option<String>,
    /// Only ids below this (paging backwards, newest first).
    pub before_id: Option<i64>,
    /// Only queued at or after this time.
    pub since_ms: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// Command statistics (the seed's fields and more).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CommandStats {
    /// All commands.
    pub total_commands: i64,
    /// Count by status.
    pub by_status: BTreeMap<String, i64>,
    /// Count by type.
    pub by_type: BTreeMap<String, i64>,
    /// Succeeded (or confirmed) over all finished by the device, percent.
    pub success_rate: f64,
    /// Mean time from queued to result, ms, over commands with a result.
    pub average_completion_ms: Option<f64>,
    /// Mean time from queued to first delivery, ms.
    pub average_delivery_ms: Option<f64>,
    /// Devices with at least one command.
    pub devices_with_commands: i64,
}

/// What a device's result does to a command in `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultEffect {
    /// Nothing: a result was recorded before (a retried report).
    Repeat,
    /// The command ends in `status`; `late` names the state it had already
    /// ended in (expired or cancelled), for the message: it ran all the same.
    Record {
        /// `Succeeded` or `Failed`.
        status: CommandStatus,
        /// Expired or cancelled before the result arrived.
        late: Option<CommandStatus>,
    },
}

/// The rule for a result: recorded once, and the truth wins over an expiry
/// or cancellation (the device ran it before it learned).
pub fn result_effect(status: CommandStatus, outcome: &CommandOutcome) -> ResultEffect {
    if status.has_result() {
        return ResultEffect::Repeat;
    }
    let next = if outcome.success { CommandStatus::Succeeded } else { CommandStatus::Failed };
    ResultEffect::Record { status: next, late: (!status.is_open()).then_some(status) }
}

/// The message a recorded result keeps: the device's, and when the command
/// had already ended (`late`), that it ran all the same.
pub fn result_text(outcome: &CommandOutcome, late: Option<CommandStatus>) -> String {
    let message = outcome.message.clone().unwrap_or_default();
    match late {
        Some(late) => format!("{message} (result arrived after the command was {})", late.as_str())
            .trim()
            .to_owned(),
        None => message,
    }
}

/// The action a reading of `register` = `value` confirms: a write of that
/// value to that register that succeeded before the reading.
pub fn confirmed_by(register: u16, value: u16) -> Action {
    Action::Write { register, value }
}

/// Whether a command in `status` doing `action` waits for a reading to confirm it.
pub fn awaits_confirmation(status: CommandStatus, action: Action) -> bool {
    status == CommandStatus::Succeeded && matches!(action, Action::Write { .. })
}

/// Whether a command is handed to its device now: queued, or delivered at
/// or before `redeliver_at` without a result, and not expired.
pub fn deliverable(
    status: CommandStatus,
    delivered_ms: Option<i64>,
    expires_ms: i64,
    now: i64,
    redeliver_at: i64,
) -> bool {
    expires_ms > now
        && match status {
            CommandStatus::Queued => true,
            CommandStatus::Delivered => delivered_ms.is_some_and(|t| t <= redeliver_at),
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked_against_the_register_map_and_never_clamped() {
        let ok = |c: CommandRequest| c.action(10_000).unwrap();
        assert_eq!(
            ok(CommandRequest::SetPowerPercentage { percentage: 50 }),
            Action::Write { register: 8, value: 50 }
        );
        assert_eq!(
            ok(CommandRequest::SetPower { power_value: 2_500 }),
            Action::Write { register: 8, value: 25 }
        );
        assert_eq!(
            CommandRequest::SetPower { power_value: 2_500 }.action(5_000).unwrap(),
            Action::Write { register: 8, value: 50 }
        );
        assert_eq!(
            ok(CommandRequest::ReadRegister { register_address: 9 }),
            Action::Read { register: 9 }
        );
        let err = |c: CommandRequest| c.action(10_000).unwrap_err();
        assert_eq!(err(CommandRequest::SetPowerPercentage { percentage: 101 }).field, "percentage");
        assert_eq!(err(CommandRequest::SetPowerPercentage { percentage: -1 }).field, "percentage");
        assert_eq!(err(CommandRequest::SetPower { power_value: 12_000 }).field, "power_value");
        assert_eq!(
            err(CommandRequest::WriteRegister { register_address: 3, value: 1 }).field,
            "register_address"
        );
        assert_eq!(
            err(CommandRequest::WriteRegister { register_address: 8, value: 500 }).field,
            "value"
        );
        assert_eq!(
            err(CommandRequest::WriteRegister { register_address: 8, value: 70_000 }).field,
            "value"
        );
        assert_eq!(
            err(CommandRequest::ReadRegister { register_address: 10 }).field,
            "register_address"
        );
    }

    #[test]
    fn commands_use_the_seed_json_shape() {
        let c: CommandRequest = serde_json::from_str(
            r#"{"type":"set_power_percentage","parameters":{"percentage":50}}"#,
        )
        .unwrap();
        assert_eq!(c, CommandRequest::SetPowerPercentage { percentage: 50 });
        assert_eq!(c.parameters(), serde_json::json!({"percentage": 50}));
        assert_eq!(c.kind(), "set_power_percentage");
    }

    fn outcome(success: bool) -> CommandOutcome {
        CommandOutcome {
            success,
            message: None,
            exception_code: None,
            value: None,
            executed_ms: None,
        }
    }

    #[test]
    fn a_result_is_recorded_once_and_wins_over_an_expiry() {
        use CommandStatus::*;
        for (status, success, effect) in [
            (Queued, true, ResultEffect::Record { status: Succeeded, late: None }),
            (Delivered, false, ResultEffect::Record { status: Failed, late: None }),
            (Expired, true, ResultEffect::Record { status: Succeeded, late: Some(Expired) }),
            (Cancelled, false, ResultEffect::Record { status: Failed, late: Some(Cancelled) }),
            (Succeeded, false, ResultEffect::Repeat),
            (Failed, true, ResultEffect::Repeat),
            (Confirmed, true, ResultEffect::Repeat),
        ] {
            assert_eq!(result_effect(status, &outcome(success)), effect, "{status:?} {success}");
        }
    }

    #[test]
    fn only_succeeded_writes_wait_for_a_reading() {
        let write = Action::Write { register: 8, value: 50 };
        let read = Action::Read { register: 8 };
        for status in CommandStatus::ALL {
            assert_eq!(awaits_confirmation(status, write), status == CommandStatus::Succeeded);
            assert!(!awaits_confirmation(status, read));
        }
        assert_eq!(confirmed_by(8, 50), write);
    }

    #[test]
    fn delivery_and_redelivery() {
        use CommandStatus::*;
        for (status, delivered, expires, d) in [
            (Queued, None, 2_000, true),
            (Queued, None, 1_000, false),
            (Delivered, Some(400), 2_000, true),
            (Delivered, Some(600), 2_000, false),
            (Succeeded, Some(400), 2_000, false),
            (Cancelled, None, 2_000, false),
        ] {
            assert_eq!(deliverable(status, delivered, expires, 1_000, 500), d, "{status:?}");
        }
    }

    #[test]
    fn actions_round_trip_through_their_columns() {
        for a in [Action::Write { register: 8, value: 65_535 }, Action::Read { register: 0 }] {
            let (op, r, v) = a.columns();
            assert_eq!(Action::from_columns(op, r, v), Some(a));
        }
        assert_eq!(Action::from_columns("write", 8, None), None);
        assert_eq!(Action::from_columns("erase", 8, Some(1)), None);
        assert_eq!(Action::from_columns("write", 70_000, Some(1)), None);
    }
}
