//! Rollups written at ingest (docs/energy.md): per device, per 5-minute,
//! hour and day bucket, the energy integrated from AC power, and each
//! register's count, minimum, maximum and sum, with the bucket's sample and
//! missing-sample counts. The rules, as pure functions; the ingest group
//! applies them to what it stores, in the same transaction.
//!
//! **Energy** is the trapezoid integral of AC power (`Pac`, W) between
//! *adjacent* samples: consecutive `seq`s no more than [`MAX_BRIDGE_MS`]
//! apart in time (and not going back in time). A longer gap, or a `seq`
//! missing between two samples, is not bridged: nothing is invented for it,
//! and the missing samples are counted. An interval crossing a bucket's
//! edge is split there, power interpolated linearly. Each interval is
//! counted once, by the upload that brings the later of its two samples
//! (so a resent batch, a retried one that grew, or a late one that fills
//! a hole adds exactly what was not there).
//!
//! **Buckets**: 5 minutes and hours are aligned to UTC (to local time too
//! in every zone whose offset is whole hours); days run from the site's
//! local midnight to the next (23 or 25 hours across a DST change).

use std::collections::BTreeMap;

use ecowatt_proto::codec::Sample;
use jiff::tz::TimeZone;

/// Longest time between two adjacent samples that is integrated (10 min).
pub const MAX_BRIDGE_MS: i64 = 600_000;
/// The register whose value is AC power in watts.
pub const PAC: u16 = 9;
/// Registers the rollups keep statistics of.
pub const REGISTERS: usize = ecowatt_proto::registers::REGISTER_COUNT;

/// A rollup level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// 5 minutes (UTC-aligned).
    Min5 = 0,
    /// An hour (UTC-aligned).
    Hour = 1,
    /// A day in the site's time zone.
    Day = 2,
}

impl Level {
    /// Every level.
    pub const ALL: [Level; 3] = [Level::Min5, Level::Hour, Level::Day];

    /// Its column value.
    pub fn code(self) -> i64 {
        self as i64
    }

    /// The level of a column value.
    pub fn from_code(code: i64) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.code() == code)
    }

    /// The level the API names `name` (`5m`, `1h`, `1d`); a clear error
    /// on `field` otherwise.
    pub fn parse(field: &'static str, name: &str) -> Result<Level, crate::domain::Invalid> {
        Level::ALL.into_iter().find(|x| x.name() == name).ok_or_else(|| {
            crate::domain::Invalid::new(field, format!("{name:?} is not 5m, 1h or 1d"))
        })
    }

    /// Its name in the API (`5m`, `1h`, `1d`).
    pub fn name(self) -> &'static str {
        match self {
            Level::Min5 => "5m",
            Level::Hour => "1h",
            Level::Day => "1d",
        }
    }

    /// The bucket holding `ms`: its start and end (Unix ms).
    pub fn bounds(self, tz: &TimeZone, ms: i64) -> (i64, i64) {
        let fixed = |len: i64| {
            let start = ms.div_euclid(len) * len;
            (start, start + len)
        };
        match self {
            Level::Min5 => fixed(300_000),
            Level::Hour => fixed(3_600_000),
            Level::Day => day_bounds(tz, ms),
        }
    }
}

/// The local day holding `ms` in `tz`: its first and its next day's first instant.
pub fn day_bounds(tz: &TimeZone, ms: i64) -> (i64, i64) {
    let Ok(t) = jiff::Timestamp::from_millisecond(ms) else { return (ms, ms + 86_400_000) };
    let zoned = t.to_zoned_datetime(tz.clone());
    let start = zoned.start_of_day().map(|z| z.timestamp().as_millisecond());
    let next = zoned
        .date()
        .tomorrow()
        .ok()
        .and_then(|d| d.to_zoned_datetime(tz.clone()).ok())
        .map(|z| z.timestamp().as_millisecond());
    match (start, next) {
        (Ok(s), Some(n)) => (s, n),
        _ => {
            let s = ms.div_euclid(86_400_000) * 86_400_000;
            (s, s + 86_400_000)
        }
    }
}

/// One register's statistics in a bucket (raw values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegStat {
    /// Samples that carried it.
    pub n: i64,
    /// Smallest value (meaningless when `n` is 0).
    pub min: i64,
    /// Largest value.
    pub max: i64,
    /// Sum of its values.
    pub sum: i64,
}

impl RegStat {
    fn add(&mut self, v: i64) {
        if self.n == 0 {
            (self.min, self.max) = (v, v);
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.n += 1;
        self.sum += v;
    }
}

/// What a bucket gained (or holds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    /// Energy, Wh.
    pub energy_wh: f64,
    /// Time integrated, ms.
    pub covered_ms: i64,
    /// Samples in it.
    pub samples: i64,
    /// Samples missing from it (estimated from the device's own interval).
    pub missing: i64,
    /// Each register's statistics, by address.
    pub regs: [RegStat; REGISTERS],
}

/// A rollup row's key: device, level, bucket start.
pub type Key = (i64, Level, i64);

/// A sample reduced to what integration needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Its seq.
    pub seq: i64,
    /// Its time, Unix ms.
    pub ms: i64,
    /// AC power, W (absent when the batch's mask leaves it out).
    pub pac: Option<u16>,
}

/// The AC power of a sample of a batch with register `mask`.
pub fn pac_of(mask: u16, sample: &Sample) -> Option<u16> {
    if mask & (1 << PAC) == 0 {
        return None;
    }
    let index = (mask & ((1 << PAC) - 1)).count_ones() as usize;
    sample.values.get(index).copied()
}

/// The point of a sample.
pub fn point(mask: u16, sample: &Sample) -> Point {
    Point { seq: sample.seq as i64, ms: sample.unix_ms as i64, pac: pac_of(mask, sample) }
}

/// The contributions of one group: buckets by key.
#[derive(Debug, Default)]
pub struct Rollups {
    /// What each bucket gains.
    pub buckets: BTreeMap<Key, Bucket>,
    /// Each device's local day last found (start, end): a batch's samples
    /// almost always share it, and finding it in a time zone costs more than
    /// the rest of a sample's rollup.
    days: std::collections::HashMap<i64, (i64, i64)>,
}

impl Rollups {
    /// The bucket of `level` holding `ms` for `device` in `tz`.
    fn bounds(&mut self, device: i64, tz: &TimeZone, level: Level, ms: i64) -> (i64, i64) {
        if level != Level::Day {
            return level.bounds(tz, ms);
        }
        match self.days.get(&device) {
            Some(&(s, e)) if (s..e).contains(&ms) => (s, e),
            _ => {
                let day = level.bounds(tz, ms);
                self.days.insert(device, day);
                day
            }
        }
    }

    /// A sample's values in its buckets.
    pub fn sample(&mut self, device: i64, tz: &TimeZone, mask: u16, sample: &Sample) {
        let ms = sample.unix_ms as i64;
        for level in Level::ALL {
            let start = self.bounds(device, tz, level, ms).0;
            let b = self.buckets.entry((device, level, start)).or_default();
            b.samples += 1;
            let present = (0..REGISTERS as u16).filter(|r| mask & (1 << r) != 0);
            for (r, v) in present.zip(&sample.values) {
                b.regs[r as usize].add(i64::from(*v));
            }
        }
    }

    /// The interval between adjacent points `a` (earlier seq) and `b`: its
    /// energy split over the buckets it crosses, or, when not bridged, the
    /// samples missing in it (counted in `a`'s buckets). `interval_ms` is
    /// the device's sampling interval, for counting missing samples.
    pub fn interval(&mut self, device: i64, tz: &TimeZone, a: Point, b: Point, interval_ms: i64) {
        let dt = b.ms - a.ms;
        let skipped = b.seq - a.seq - 1;
        let bridged = skipped == 0 && dt > 0 && dt <= MAX_BRIDGE_MS;
        let missing = if interval_ms > 0 && dt > interval_ms * 3 / 2 {
            (dt + interval_ms / 2) / interval_ms - 1
        } else {
            skipped.max(0)
        };
        if missing > 0 {
            for level in Level::ALL {
                let key = (device, level, self.bounds(device, tz, level, a.ms).0);
                self.buckets.entry(key).or_default().missing += missing;
            }
        }
        let (true, Some(p0), Some(p1)) = (bridged, a.pac, b.pac) else { return };
        let (p0, p1) = (f64::from(p0), f64::from(p1));
        let at = |t: i64| p0 + (p1 - p0) * (t - a.ms) as f64 / dt as f64;
        for level in Level::ALL {
            let mut t = a.ms;
            while t < b.ms {
                let (start, end) = self.bounds(device, tz, level, t);
                let until = end.min(b.ms);
                let wh = (at(t) + at(until)) / 2.0 * (until - t) as f64 / 3_600_000.0;
                let bucket = self.buckets.entry((device, level, start)).or_default();
                bucket.energy_wh += wh;
                bucket.covered_ms += until - t;
                t = until;
            }
        }
    }
}

/// The device's sampling interval as its samples show it: the median time
/// between adjacent ones (0 when it cannot be told).
pub fn typical_interval(points: &[Point]) -> i64 {
    let mut dts: Vec<i64> = points
        .windows(2)
        .filter(|w| w[1].seq == w[0].seq + 1 && w[1].ms > w[0].ms)
        .map(|w| w[1].ms - w[0].ms)
        .collect();
    if dts.is_empty() {
        return 0;
    }
    let mid = dts.len() / 2;
    *dts.select_nth_unstable(mid).1
}

/// A device's newest stored sample (its `seq` is `devices.stored_seq`; its
/// time and power are unknown for samples stored before the rollups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// Its seq.
    pub seq: i64,
    /// Its time.
    pub ms: Option<i64>,
    /// Its AC power.
    pub pac: Option<u16>,
}

impl Tail {
    fn point(self) -> Option<Point> {
        self.ms.map(|ms| Point { seq: self.seq, ms, pac: self.pac })
    }
}

/// A batch the group stores: its device, the batch as the device sent it,
/// and which of its samples are new (`None`: all; a resend that repeats
/// stored samples keeps only the others).
pub struct Stored<'a> {
    /// The device.
    pub device: i64,
    /// As sent.
    pub original: &'a ecowatt_proto::codec::Batch,
    /// The new samples' seqs, sorted, when not all are.
    pub new_seqs: Option<Vec<i64>>,
}

/// What a group adds to the rollups, and what it leaves behind.
#[derive(Debug, Default)]
pub struct GroupRollups {
    /// Bucket contributions.
    pub rollups: Rollups,
    /// Devices' newest samples, where the group changed them.
    pub tails: std::collections::HashMap<i64, Tail>,
    /// Each stored batch's first and last AC power, in the order given.
    pub edges: Vec<(Option<u16>, Option<u16>)>,
}

/// The rollups of a group's stored batches, in arrival order. `tails`: each
/// device's newest stored sample as the group starts; `known`: stored
/// samples at batch edges that out-of-order batches border (device, seq).
pub fn of_group(
    stored: &[Stored<'_>],
    zone_of: impl Fn(i64) -> TimeZone,
    mut tails: std::collections::HashMap<i64, Tail>,
    mut known: std::collections::HashMap<(i64, i64), Point>,
) -> GroupRollups {
    let mut out = GroupRollups::default();
    let mut changed = std::collections::HashSet::new();
    for s in stored {
        let (dev, mask) = (s.device, s.original.registers);
        let tz = zone_of(dev);
        let pts: Vec<Point> = s.original.samples.iter().map(|x| point(mask, x)).collect();
        let is_new = |seq: i64| s.new_seqs.as_ref().is_none_or(|v| v.binary_search(&seq).is_ok());
        let interval = typical_interval(&pts);
        for (x, p) in s.original.samples.iter().zip(&pts) {
            if is_new(p.seq) {
                out.rollups.sample(dev, &tz, mask, x);
            }
        }
        for w in pts.windows(2) {
            if is_new(w[0].seq) || is_new(w[1].seq) {
                out.rollups.interval(dev, &tz, w[0], w[1], interval);
            }
        }
        let (Some(&first), Some(&last)) = (pts.first(), pts.last()) else {
            out.edges.push((None, None));
            continue;
        };
        let tail = tails.get(&dev).copied();
        if is_new(first.seq) {
            let from_tail = tail.filter(|t| t.seq == first.seq - 1).and_then(Tail::point);
            if let Some(left) = from_tail.or_else(|| known.get(&(dev, first.seq - 1)).copied()) {
                out.rollups.interval(dev, &tz, left, first, interval);
            }
        }
        if is_new(last.seq)
            && let Some(right) = known.get(&(dev, last.seq + 1)).copied()
        {
            out.rollups.interval(dev, &tz, last, right, interval);
        }
        // Its new samples now border later batches.
        let new: Vec<&Point> = pts.iter().filter(|p| is_new(p.seq)).collect();
        if let (Some(a), Some(b)) = (new.first(), new.last()) {
            known.insert((dev, a.seq), **a);
            known.insert((dev, b.seq), **b);
            out.edges.push((a.pac, b.pac));
            if tail.is_none_or(|t| b.seq > t.seq) {
                tails.insert(dev, Tail { seq: b.seq, ms: Some(b.ms), pac: b.pac });
                changed.insert(dev);
            }
        } else {
            out.edges.push((None, None));
        }
    }
    out.tails = tails.into_iter().filter(|(d, _)| changed.contains(d)).collect();
    out
}

/// The rollup table's columns after the key, in order.
pub fn value_columns() -> Vec<String> {
    let mut c: Vec<String> =
        ["energy_wh", "covered_ms", "samples", "missing"].iter().map(|s| s.to_string()).collect();
    for r in 0..REGISTERS {
        c.extend([format!("n{r}"), format!("min{r}"), format!("max{r}"), format!("sum{r}")]);
    }
    c
}

/// `SET` clauses that add a new row's values to the stored one's (`least`
/// and `greatest`: the dialect's two-argument minimum and maximum).
pub fn merge_clauses(least: &str, greatest: &str) -> String {
    let t = "telemetry_rollups";
    let mut parts: Vec<String> = ["energy_wh", "covered_ms", "samples", "missing"]
        .iter()
        .map(|c| format!("{c} = {t}.{c} + excluded.{c}"))
        .collect();
    for r in 0..REGISTERS {
        parts.push(format!("n{r} = {t}.n{r} + excluded.n{r}"));
        parts.push(format!("sum{r} = {t}.sum{r} + excluded.sum{r}"));
        for (c, f) in [("min", least), ("max", greatest)] {
            parts.push(format!(
                "{c}{r} = {f}(COALESCE({t}.{c}{r}, excluded.{c}{r}), COALESCE(excluded.{c}{r}, {t}.{c}{r}))"
            ));
        }
    }
    parts.join(", ")
}

/// A register's minimum or maximum as stored: `None` when no sample carried it.
pub fn extreme(stat: &RegStat, max: bool) -> Option<i64> {
    (stat.n > 0).then_some(if max { stat.max } else { stat.min })
}

/// The upsert of `rollups` as statements, each ending `;\n` (only numbers
/// inlined, all made here), in `dialect`: the ingest's SQLite script, and
/// the legacy API's uploads on either backend.
pub fn literal_upsert(rollups: &Rollups, sql: &mut String, dialect: crate::db::Dialect) {
    use std::fmt::Write as _;
    let keys: Vec<_> = rollups.buckets.iter().collect();
    let columns = value_columns().join(", ");
    let merge = match dialect {
        crate::db::Dialect::Sqlite => merge_clauses("min", "max"),
        crate::db::Dialect::Postgres => merge_clauses("LEAST", "GREATEST"),
    };
    let opt = |v: Option<i64>| v.map_or("NULL".to_owned(), |v| v.to_string());
    for chunk in keys.chunks(200) {
        let _ = write!(
            sql,
            "INSERT INTO telemetry_rollups (device_id, level, bucket_ms, {columns}) VALUES "
        );
        for (n, ((dev, level, start), b)) in chunk.iter().enumerate() {
            let _ = write!(
                sql,
                "{}({dev}, {}, {start}, {:?}, {}, {}, {}",
                if n == 0 { "" } else { ", " },
                level.code(),
                b.energy_wh,
                b.covered_ms,
                b.samples,
                b.missing
            );
            for r in &b.regs {
                let _ = write!(
                    sql,
                    ", {}, {}, {}, {}",
                    r.n,
                    opt(extreme(r, false)),
                    opt(extreme(r, true)),
                    r.sum
                );
            }
            sql.push(')');
        }
        let _ = writeln!(sql, " ON CONFLICT (device_id, level, bucket_ms) DO UPDATE SET {merge};");
    }
}

/// The PostgreSQL upsert, its values bound as arrays from `$first` on
/// (device, level, bucket, energy, covered, samples, missing, then per
/// register n, min, max, sum; [`bind_pg_upsert`] binds them).
pub fn pg_upsert(first: usize) -> String {
    let columns = value_columns();
    let mut types = vec!["int8[]", "int8[]", "int8[]", "float8[]", "int8[]", "int8[]", "int8[]"];
    types.extend(std::iter::repeat_n("int8[]", 4 * REGISTERS));
    let params: Vec<String> =
        types.iter().enumerate().map(|(i, t)| format!("${}::{t}", i + first)).collect();
    format!(
        "INSERT INTO telemetry_rollups (device_id, level, bucket_ms, {}) SELECT * FROM UNNEST({}) \
         ON CONFLICT (device_id, level, bucket_ms) DO UPDATE SET {}",
        columns.join(", "),
        params.join(", "),
        merge_clauses("LEAST", "GREATEST")
    )
}

/// Binds `rollups` as [`pg_upsert`]'s arrays, after what `q` has bound.
pub fn bind_pg_upsert<'q>(q: crate::db::PgQuery<'q>, rollups: &Rollups) -> crate::db::PgQuery<'q> {
    let b = &rollups.buckets;
    let mut q = q
        .bind(b.keys().map(|k| k.0).collect::<Vec<i64>>())
        .bind(b.keys().map(|k| k.1.code()).collect::<Vec<i64>>())
        .bind(b.keys().map(|k| k.2).collect::<Vec<i64>>())
        .bind(b.values().map(|v| v.energy_wh).collect::<Vec<f64>>())
        .bind(b.values().map(|v| v.covered_ms).collect::<Vec<i64>>())
        .bind(b.values().map(|v| v.samples).collect::<Vec<i64>>())
        .bind(b.values().map(|v| v.missing).collect::<Vec<i64>>());
    for r in 0..REGISTERS {
        q = q
            .bind(b.values().map(|v| v.regs[r].n).collect::<Vec<i64>>())
            .bind(b.values().map(|v| extreme(&v.regs[r], false)).collect::<Vec<Option<i64>>>())
            .bind(b.values().map(|v| extreme(&v.regs[r], true)).collect::<Vec<Option<i64>>>())
            .bind(b.values().map(|v| v.regs[r].sum).collect::<Vec<i64>>());
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn p(seq: i64, ms: i64, pac: u16) -> Point {
        Point { seq, ms, pac: Some(pac) }
    }

    fn energy(r: &Rollups, level: Level) -> f64 {
        r.buckets.iter().filter(|(k, _)| k.1 == level).map(|(_, b)| b.energy_wh).sum()
    }

    #[test]
    fn an_interval_is_a_trapezoid_split_at_bucket_edges() {
        let utc = TimeZone::UTC;
        let mut r = Rollups::default();
        // 1000 W to 2000 W over 10 minutes, from 2 min before a 5-minute edge.
        let t0: i64 = 1_782_000_000_000 - 120_000;
        let t0 = t0 - t0.rem_euclid(300_000) + 180_000;
        r.interval(1, &utc, p(1, t0, 1000), p(2, t0 + 600_000, 2000), 600_000);
        for level in Level::ALL {
            assert!((energy(&r, level) - 250.0).abs() < 1e-9, "{level:?}");
        }
        let min5: Vec<f64> = r
            .buckets
            .iter()
            .filter(|(k, _)| k.1 == Level::Min5)
            .map(|(_, b)| b.energy_wh)
            .collect();
        assert_eq!(min5.len(), 3, "2 min, 5 min, 3 min");
        // The first 2 minutes: 1000 W -> 1200 W.
        assert!((min5[0] - 1100.0 * 2.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn gaps_and_holes_are_not_bridged_but_counted() {
        let utc = TimeZone::UTC;
        let mut r = Rollups::default();
        let t = 1_782_000_000_000;
        // 11 minutes apart: not bridged; 131 samples of 5 s missing.
        r.interval(1, &utc, p(1, t, 1000), p(2, t + 660_000, 1000), 5_000);
        assert_eq!(energy(&r, Level::Day), 0.0);
        let missing: i64 =
            r.buckets.iter().filter(|(k, _)| k.1 == Level::Day).map(|(_, b)| b.missing).sum();
        assert_eq!(missing, 131);
        // A seq missing between two samples 10 s apart: not bridged, one missing.
        let mut r = Rollups::default();
        r.interval(1, &utc, p(1, t, 1000), p(3, t + 10_000, 1000), 5_000);
        assert_eq!(energy(&r, Level::Day), 0.0);
        assert_eq!(r.buckets.values().next().unwrap().missing, 1);
        // Time going back: nothing.
        let mut r = Rollups::default();
        r.interval(1, &utc, p(1, t, 1000), p(2, t - 5_000, 1000), 5_000);
        assert_eq!(energy(&r, Level::Day), 0.0);
    }

    #[test]
    fn days_follow_the_site_s_zone_across_dst() {
        let berlin = tz("Europe/Berlin");
        // 2026-03-29: clocks go forward at 02:00 local, a 23-hour day.
        let noon = jiff::civil::date(2026, 3, 29)
            .at(12, 0, 0, 0)
            .to_zoned_datetime(berlin.clone())
            .unwrap();
        let (s, e) = Level::Day.bounds(&berlin, noon.timestamp().as_millisecond());
        assert_eq!(e - s, 23 * 3_600_000);
        let autumn = jiff::civil::date(2026, 10, 25)
            .at(12, 0, 0, 0)
            .to_zoned_datetime(berlin.clone())
            .unwrap();
        let (s, e) = Level::Day.bounds(&berlin, autumn.timestamp().as_millisecond());
        assert_eq!(e - s, 25 * 3_600_000);
        // Local midnight, not UTC's.
        let local_midnight =
            jiff::civil::date(2026, 3, 29).at(0, 0, 0, 0).to_zoned_datetime(berlin).unwrap();
        assert_eq!(
            Level::Day
                .bounds(&tz("Europe/Berlin"), local_midnight.timestamp().as_millisecond() + 1)
                .0,
            local_midnight.timestamp().as_millisecond()
        );
    }

    #[test]
    fn samples_fill_each_register_s_statistics() {
        let mut r = Rollups::default();
        let mask = (1 << 0) | (1 << PAC);
        for (i, (v, pac)) in [(2300u16, 100u16), (2310, 300), (2290, 200)].into_iter().enumerate() {
            let s = Sample {
                seq: i as u64 + 1,
                unix_ms: 1_782_000_000_000 + i as u64 * 5000,
                values: vec![v, pac],
            };
            assert_eq!(pac_of(mask, &s), Some(pac));
            r.sample(7, &TimeZone::UTC, mask, &s);
        }
        let b = r.buckets.values().next().unwrap();
        assert_eq!(b.samples, 3);
        assert_eq!(b.regs[0], RegStat { n: 3, min: 2290, max: 2310, sum: 6900 });
        assert_eq!(b.regs[9], RegStat { n: 3, min: 100, max: 300, sum: 600 });
        assert_eq!(b.regs[1].n, 0);
    }

    #[test]
    fn the_typical_interval_is_the_median() {
        let pts = [p(1, 0, 0), p(2, 5000, 0), p(3, 10_000, 0), p(4, 60_000, 0), p(5, 65_000, 0)];
        assert_eq!(typical_interval(&pts), 5000);
        assert_eq!(typical_interval(&pts[..1]), 0);
    }
}
