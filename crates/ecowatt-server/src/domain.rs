//! Validated domain values: device configuration and inverter commands.
//! Every refusal names the field and the limit.

use ecowatt_proto::registers::{self, EXPORT_LIMIT, REGISTER_COUNT};
use serde::{Deserialize, Serialize};

/// Why a value was refused: the field, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The offending field, as named in the API.
    pub field: String,
    /// What is wrong and what the limit is.
    pub message: String,
}

impl Invalid {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid { field: field.into(), message: message.into() }
    }
}

/// Poll interval limits, milliseconds.
pub const POLL_MS: (i64, i64) = (1_000, 3_600_000);
/// Upload interval limits, milliseconds.
pub const UPLOAD_MS: (i64, i64) = (10_000, 86_400_000);

/// What the device should do: the desired side of the config shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Time between two register reads, ms (seed default 5 s).
    pub poll_interval_ms: i64,
    /// Time between two uploads, ms (seed default 900 s).
    pub upload_interval_ms: i64,
    /// Register addresses to sample (default: all of 0..=9).
    pub registers: Vec<u16>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            poll_interval_ms: 5_000,
            upload_interval_ms: 900_000,
            registers: (0..REGISTER_COUNT as u16).collect(),
        }
    }
}

/// A partial update of a [`DeviceConfig`]: absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// New poll interval, ms.
    pub poll_interval_ms: Option<i64>,
    /// New upload interval, ms.
    pub upload_interval_ms: Option<i64>,
    /// New register selection.
    pub registers: Option<Vec<u16>>,
}

impl DeviceConfig {
    /// `self` with `patch` applied, validated as a whole.
    pub fn patched(&self, patch: &ConfigPatch) -> Result<DeviceConfig, Invalid> {
        let next = DeviceConfig {
            poll_interval_ms: patch.poll_interval_ms.unwrap_or(self.poll_interval_ms),
            upload_interval_ms: patch.upload_interval_ms.unwrap_or(self.upload_interval_ms),
            registers: patch.registers.clone().unwrap_or_else(|| self.registers.clone()),
        };
        next.validate()?;
        Ok(next)
    }

    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<(), Invalid> {
        let in_range = |field: &str, v: i64, (lo, hi): (i64, i64)| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Invalid::new(field, format!("{v} ms is outside {lo}..={hi} ms")))
            }
        };
        in_range("poll_interval_ms", self.poll_interval_ms, POLL_MS)?;
        in_range("upload_interval_ms", self.upload_interval_ms, UPLOAD_MS)?;
        if self.upload_interval_ms < self.poll_interval_ms {
            return Err(Invalid::new(
                "upload_interval_ms",
                format!(
                    "{} ms is shorter than the poll interval ({} ms)",
                    self.upload_interval_ms, self.poll_interval_ms
                ),
            ));
        }
        if self.registers.is_empty() {
            return Err(Invalid::new("registers", "select at least one register (0..=9)"));
        }
        let mut seen = [false; REGISTER_COUNT];
        for &r in &self.registers {
            let slot = seen.get_mut(usize::from(r)).ok_or_else(|| {
                Invalid::new("registers", format!("no register {r}; the map is 0..=9"))
            })?;
            if *slot {
                return Err(Invalid::new("registers", format!("register {r} is listed twice")));
            }
            *slot = true;
        }
        Ok(())
    }
}

/// The commands an operator can queue, as the API and the seed name them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
}

/// Time-to-live limits for a command, seconds.
pub const TTL_S: (i64, i64) = (10, 7 * 86_400);
/// Time-to-live when none is given, seconds.
pub const DEFAULT_TTL_S: i64 = 600;

/// Validates a time-to-live.
pub fn check_ttl(ttl_s: i64) -> Result<i64, Invalid> {
    if (TTL_S.0..=TTL_S.1).contains(&ttl_s) {
        Ok(ttl_s)
    } else {
        Err(Invalid::new("ttl_s", format!("{ttl_s} s is outside {}..={} s", TTL_S.0, TTL_S.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_limits_name_the_field() {
        let c = DeviceConfig::default();
        assert!(c.validate().is_ok());
        let e = c
            .patched(&ConfigPatch { poll_interval_ms: Some(10), ..Default::default() })
            .unwrap_err();
        assert_eq!(e.field, "poll_interval_ms");
        assert!(e.message.contains("1000..=3600000"), "{e}");
        let e = c
            .patched(&ConfigPatch {
                poll_interval_ms: Some(60_000),
                upload_interval_ms: Some(30_000),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.field, "upload_interval_ms");
        for regs in [vec![], vec![10], vec![1, 1]] {
            let e = c
                .patched(&ConfigPatch { registers: Some(regs), ..Default::default() })
                .unwrap_err();
            assert_eq!(e.field, "registers");
        }
    }

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
}
