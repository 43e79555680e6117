//! Parsing of the units operators type: durations (`500ms`, `10s`, `15m`,
//! `2h`) and power (`10kW`, `8000W`, `8000`).

use std::time::Duration;

/// Parses `500ms`, `10s`, `15m`, `2h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration like 10s, 15m, 500ms"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a power in watts: `10kW`, `8000W`, `8000`.
pub fn parse_power_w(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let (number, factor) = if let Some(n) = t.strip_suffix("kW").or_else(|| t.strip_suffix("kw")) {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('W').or_else(|| t.strip_suffix('w')) {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("{text:?} is not a power like 10kW or 8000W"))?;
    let watts = value * factor;
    if !(100.0..=65_000.0).contains(&watts) {
        return Err(format!(
            "{text:?}: rated power must be 100 W to 65 kW (register 9 holds watts in 16 bits)"
        ));
    }
    Ok(watts.round() as u32)
}

/// Parses a slave address: decimal (`17`) or hex (`0x11`), 1..=247.
pub fn parse_slave(text: &str) -> Result<u8, String> {
    let t = text.trim();
    let value = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("{text:?} is not a slave address (17 or 0x11)"))?;
    if !(1..=247).contains(&value) {
        return Err(format!("slave address {value} is outside 1..=247"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn powers_and_slaves() {
        assert_eq!(parse_power_w("10kW").unwrap(), 10_000);
        assert_eq!(parse_power_w("8000W").unwrap(), 8_000);
        assert_eq!(parse_power_w("5000").unwrap(), 5_000);
        assert!(parse_power_w("100kW").is_err());
        assert!(parse_power_w("lots").is_err());
        assert_eq!(parse_slave("0x11").unwrap(), 17);
        assert_eq!(parse_slave("17").unwrap(), 17);
        assert!(parse_slave("0").is_err() && parse_slave("300").is_err());
    }
}
