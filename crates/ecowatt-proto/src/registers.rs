//! The inverter's register map (`shared/reference/inverter-sim-api.md`):
//! name, unit, gain, access and valid range, with raw <-> engineering-unit
//! conversion (`raw = value x gain`).

use core::fmt;
use core::ops::RangeInclusive;

/// Whether a register can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// One register of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// Modbus holding-register address.
    pub address: u16,
    /// Short name, as in the course documentation (`Vac1`).
    pub name: &'static str,
    /// What it measures.
    pub description: &'static str,
    /// Engineering unit (`V`, `A`, `Hz`, `°C`, `%`, `W`).
    pub unit: &'static str,
    /// `raw = value x gain`.
    pub gain: u16,
    /// Read or read/write.
    pub access: Access,
    /// Raw values a write may carry (`None` for read-only registers).
    pub writable: Option<RangeInclusive<u16>>,
}

/// Number of registers in the map (addresses `0..=9`).
pub const REGISTER_COUNT: usize = 10;
/// Address of the export power limit (percent of rated power, writable 0..=100).
pub const EXPORT_LIMIT: u16 = 8;

macro_rules! reg {
    ($addr:expr, $name:expr, $desc:expr, $unit:expr, $gain:expr) => {
        Register {
            address: $addr,
            name: $name,
            description: $desc,
            unit: $unit,
            gain: $gain,
            access: Access::Read,
            writable: None,
        }
    };
}

/// The register map, indexed by address.
pub static REGISTERS: [Register; REGISTER_COUNT] = [
    reg!(0, "Vac1", "L1 phase voltage", "V", 10),
    reg!(1, "Iac1", "L1 phase current", "A", 10),
    reg!(2, "Fac1", "L1 phase frequency", "Hz", 100),
    reg!(3, "Vpv1", "PV1 input voltage", "V", 10),
    reg!(4, "Vpv2", "PV2 input voltage", "V", 10),
    reg!(5, "Ipv1", "PV1 input current", "A", 10),
    reg!(6, "Ipv2", "PV2 input current", "A", 10),
    reg!(7, "Temp", "inverter internal temperature", "°C", 10),
    Register {
        address: EXPORT_LIMIT,
        name: "Pow",
        description: "export power limit, percent of rated",
        unit: "%",
        gain: 1,
        access: Access::ReadWrite,
        writable: Some(0..=100),
    },
    reg!(9, "Pac", "AC output power", "W", 1),
];

/// Why a value cannot be written to a register.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteError {
    /// No register at this address.
    UnknownRegister {
        /// The address asked for.
        address: u16,
    },
    /// The register is read-only.
    ReadOnly {
        /// The register's address.
        address: u16,
    },
    /// The value is outside the register's writable range.
    OutOfRange {
        /// The register's address.
        address: u16,
        /// The raw value refused.
        raw: u16,
        /// Smallest raw value accepted.
        min: u16,
        /// Largest raw value accepted.
        max: u16,
    },
    /// An engineering value that is not a number or has no raw representation.
    NotRepresentable {
        /// The register's address.
        address: u16,
    },
}

impl WriteError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::UnknownRegister { .. } => "unknown_register",
            WriteError::ReadOnly { .. } => "register_read_only",
            WriteError::OutOfRange { .. } => "value_out_of_range",
            WriteError::NotRepresentable { .. } => "value_not_representable",
        }
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WriteError::UnknownRegister { address } => {
                write!(f, "no register at address {address}")
            }
            WriteError::ReadOnly { address } => write!(f, "register {address} is read-only"),
            WriteError::OutOfRange { address, raw, min, max } => {
                write!(f, "value {raw} out of range for register {address} ({min}..={max})")
            }
            WriteError::NotRepresentable { address } => {
                write!(f, "value cannot be represented in register {address}")
            }
        }
    }
}

impl core::error::Error for WriteError {}

/// The register at `address`, if the map has one.
pub fn by_address(address: u16) -> Option<&'static Register> {
    REGISTERS.get(usize::from(address))
}

/// The register named `name` (case-insensitive), if the map has one.
pub fn by_name(name: &str) -> Option<&'static Register> {
    REGISTERS.iter().find(|r| r.name.eq_ignore_ascii_case(name))
}

/// Checks that `raw` may be written to `address`.
pub fn check_write(address: u16, raw: u16) -> Result<&'static Register, WriteError> {
    let register = by_address(address).ok_or(WriteError::UnknownRegister { address })?;
    let range = register.writable.as_ref().ok_or(WriteError::ReadOnly { address })?;
    if range.contains(&raw) {
        Ok(register)
    } else {
        Err(WriteError::OutOfRange { address, raw, min: *range.start(), max: *range.end() })
    }
}

impl Register {
    /// Converts a raw register value to engineering units.
    pub fn to_engineering(&self, raw: u16) -> f64 {
        f64::from(raw) / f64::from(self.gain)
    }

    /// Converts an engineering value to the nearest raw value, refusing values
    /// that fall outside `0..=65535` after scaling (never clamped).
    pub fn to_raw(&self, value: f64) -> Result<u16, WriteError> {
        let scaled = value * f64::from(self.gain);
        // `f64::round` is not in `core`; add one half and truncate (values are >= 0).
        if !scaled.is_finite() || !(-0.5..65535.5).contains(&scaled) {
            return Err(WriteError::NotRepresentable { address: self.address });
        }
        Ok((scaled + 0.5) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_matches_reference() {
        for (i, r) in REGISTERS.iter().enumerate() {
            assert_eq!(usize::from(r.address), i, "{} is out of place", r.name);
        }
        let names: [&str; 10] =
            ["Vac1", "Iac1", "Fac1", "Vpv1", "Vpv2", "Ipv1", "Ipv2", "Temp", "Pow", "Pac"];
        for (r, n) in REGISTERS.iter().zip(names) {
            assert_eq!(r.name, n);
        }
        assert_eq!(by_name("fac1").unwrap().gain, 100);
        assert!(by_address(10).is_none());
    }

    #[test]
    fn conversions_use_the_gain() {
        // Reference capture: Vac1 = 0x0904 = 230.8 V, Fac1 = 0x138F = 50.07 Hz.
        assert_eq!(REGISTERS[0].to_engineering(0x0904), 230.8);
        assert_eq!(REGISTERS[2].to_engineering(0x138F), 50.07);
        assert_eq!(REGISTERS[0].to_raw(230.8).unwrap(), 2308);
        assert_eq!(REGISTERS[2].to_raw(50.07).unwrap(), 5007);
        assert!(REGISTERS[0].to_raw(-1.0).is_err());
        assert!(REGISTERS[0].to_raw(7000.0).is_err());
        assert!(REGISTERS[0].to_raw(f64::NAN).is_err());
    }

    #[test]
    fn only_the_export_limit_is_writable_and_only_in_range() {
        assert!(check_write(EXPORT_LIMIT, 0).is_ok());
        assert!(check_write(EXPORT_LIMIT, 100).is_ok());
        assert_eq!(
            check_write(EXPORT_LIMIT, 101),
            Err(WriteError::OutOfRange { address: 8, raw: 101, min: 0, max: 100 })
        );
        for address in (0..10).filter(|&a| a != EXPORT_LIMIT) {
            assert_eq!(check_write(address, 1), Err(WriteError::ReadOnly { address }));
        }
        assert_eq!(check_write(10, 1), Err(WriteError::UnknownRegister { address: 10 }));
    }
}
