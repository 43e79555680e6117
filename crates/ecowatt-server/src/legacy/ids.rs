//! The original server's command ids, `CMD_<n>_<unix seconds>`: EcoWatt's
//! id `n` and the second it was queued, so that an id from before a
//! migration (the original's counter restarted at 1000 on every start)
//! never completes a different command that happens to share its number.

use crate::domain::Invalid;

/// A command id as the original wrote it.
pub fn format(id: i64, created_ms: i64) -> String {
    format!("CMD_{id}_{}", created_ms.div_euclid(1000))
}

/// A parsed id: the number, and the second it claims (none for `CMD_<n>`
/// or a bare number, the forms EcoWatt's own API shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacyId {
    /// EcoWatt's command id.
    pub id: i64,
    /// The queue time the id claims, Unix seconds.
    pub unix_s: Option<i64>,
}

impl LegacyId {
    /// Whether the id names a command queued at `created_ms`.
    pub fn matches(&self, created_ms: i64) -> bool {
        self.unix_s.is_none_or(|s| s == created_ms.div_euclid(1000))
    }
}

/// Reads `CMD_<n>_<unix>`, `CMD_<n>` or `<n>`.
pub fn parse(text: &str) -> Result<LegacyId, Invalid> {
    let bad = || {
        Invalid::new("command_id", format!("{text:?} is not a command id like CMD_12_1760802351"))
    };
    let body = text.strip_prefix("CMD_").unwrap_or(text);
    let mut parts = body.split('_');
    let number = |p: Option<&str>| -> Result<Option<i64>, Invalid> {
        match p {
            None => Ok(None),
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map(Some).map_err(|_| bad())
            }
            Some(_) => Err(bad()),
        }
    };
    let id = number(parts.next())?.ok_or_else(bad)?;
    let unix_s = number(parts.next())?;
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(LegacyId { id, unix_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_the_timestamp_is_checked() {
        let text = format(1002, 1_760_802_351_523);
        assert_eq!(text, "CMD_1002_1760802351");
        let id = parse(&text).unwrap();
        assert_eq!(id, LegacyId { id: 1002, unix_s: Some(1_760_802_351) });
        assert!(id.matches(1_760_802_351_000));
        assert!(id.matches(1_760_802_351_999));
        // The same number queued at another second is another command.
        assert!(!id.matches(1_760_802_352_000));
        assert!(!id.matches(1_700_000_000_000));
        // EcoWatt's own forms name the number alone.
        assert_eq!(parse("CMD_7").unwrap(), LegacyId { id: 7, unix_s: None });
        assert_eq!(parse("7").unwrap(), LegacyId { id: 7, unix_s: None });
        assert!(parse("7").unwrap().matches(123));
        for bad in [
            "",
            "CMD_",
            "CMD_x",
            "CMD_1_",
            "CMD_1_2_3",
            "CMD_-1",
            "CMD_1_y",
            "CMD_99999999999999999999",
        ] {
            assert_eq!(parse(bad).unwrap_err().field, "command_id", "{bad}");
        }
    }
}
