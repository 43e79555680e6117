//! Reading the rollups (written at ingest: [`super::rollup`]): a device's
//! energy per local day, month or year, its series at a rollup level, the
//! fleet now and today, and the rule that names devices producing below
//! their peers. Plus their retention.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Telemetry;
use super::rollup::{Level, REGISTERS, RegStat};
use crate::db::{StoreError, StoreResult};
use crate::devices::DeviceId;

/// One stored rollup bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    /// Its start, Unix ms.
    pub bucket_ms: i64,
    /// Energy, Wh.
    pub energy_wh: f64,
    /// Time integrated, ms.
    pub covered_ms: i64,
    /// Samples.
    pub samples: i64,
    /// Samples missing.
    pub missing: i64,
    /// Per register.
    pub regs: [RegStat; REGISTERS],
}

/// A rollup row selected as [`select_columns`] lists them for `wanted`.
fn rollup_from(row: &AnyRow, wanted: &[usize]) -> StoreResult<RollupRow> {
    let mut regs = [RegStat::default(); REGISTERS];
    for (i, &r) in wanted.iter().enumerate() {
        let at = 5 + 4 * i;
        let stat = &mut regs[r];
        stat.n = row.try_get(at)?;
        stat.min = row.try_get::<Option<i64>, _>(at + 1)?.unwrap_or(0);
        stat.max = row.try_get::<Option<i64>, _>(at + 2)?.unwrap_or(0);
        stat.sum = row.try_get(at + 3)?;
    }
    Ok(RollupRow {
        bucket_ms: row.try_get(0)?,
        energy_wh: row.try_get(1)?,
        covered_ms: row.try_get(2)?,
        samples: row.try_get(3)?,
        missing: row.try_get(4)?,
        regs,
    })
}

/// The columns of a rollup read for the registers `wanted` (the others
/// are not read: a year's chart of one register reads 9 of 47 columns).
fn select_columns(wanted: &[usize]) -> String {
    let mut cols = String::from("bucket_ms, energy_wh, covered_ms, samples, missing");
    for r in wanted {
        cols.push_str(&format!(", n{r}, min{r}, max{r}, sum{r}"));
    }
    cols
}

/// How energy is summed: per local day, month or year.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A local day.
    Day,
    /// A calendar month.
    Month,
    /// A calendar year.
    Year,
}

impl Period {
    /// From the API's word.
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            "year" => Some(Period::Year),
            _ => None,
        }
    }

    /// The label of the period holding local `date` (`2026-12-01`, `2026-12`, `2026`).
    pub fn label(self, date: Date) -> String {
        match self {
            Period::Day => date.to_string(),
            Period::Month => format!("{:04}-{:02}", date.year(), date.month()),
            Period::Year => format!("{:04}", date.year()),
        }
    }
}

/// Energy of one period.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct PeriodEnergy {
    /// `2026-12-01`, `2026-12` or `2026`.
    pub period: String,
    /// kWh.
    pub energy_kwh: f64,
    /// Samples in it.
    pub samples: i64,
    /// Samples missing from it.
    pub missing: i64,
}

/// Day rollups summed per `period` in `tz` (rows in time order).
pub fn by_period(rows: &[RollupRow], tz: &TimeZone, period: Period) -> Vec<PeriodEnergy> {
    let mut out: Vec<PeriodEnergy> = Vec::new();
    for r in rows {
        let Ok(t) = jiff::Timestamp::from_millisecond(r.bucket_ms) else { continue };
        let label = period.label(t.to_zoned_datetime(tz.clone()).date());
        match out.last_mut() {
            Some(last) if last.period == label => {
                last.energy_kwh += r.energy_wh / 1000.0;
                last.samples += r.samples;
                last.missing += r.missing;
            }
            _ => out.push(PeriodEnergy {
                period: label,
                energy_kwh: r.energy_wh / 1000.0,
                samples: r.samples,
                missing: r.missing,
            }),
        }
    }
    out
}

/// Most buckets merged into one point of a chart: a level finer than this
/// many times the points asked is not read. A year of 1,000 points is read
/// as 365 days, not 8,760 hours (merging those took SQLite 32 ms at the
/// median, 57 ms at p99: `ecowatt bench query`), a week as 2,016
/// five-minute buckets merged three to a point.
pub const MERGE_MAX: i64 = 8;

/// A level's bucket width, ms (a day's is nominal: 23 or 25 hours on a DST change).
pub fn width_of(level: Level) -> i64 {
    match level {
        Level::Min5 => 300_000,
        Level::Hour => 3_600_000,
        Level::Day => 86_400_000,
    }
}

/// The finest rollup level that charts `from..to` in at most `max_points`
/// points with at most [`MERGE_MAX`] buckets merged into each, and whose
/// buckets are still kept from `from` on (`min5_since`: the oldest
/// 5-minute bucket retention keeps, if it removes them); days when none does.
pub fn level_for(from: i64, to: i64, max_points: usize, min5_since: Option<i64>) -> Level {
    let span = (to - from).max(1);
    for level in [Level::Min5, Level::Hour] {
        let kept = level != Level::Min5 || min5_since.is_none_or(|since| from >= since);
        if kept && span / width_of(level) < max_points as i64 * MERGE_MAX {
            return level;
        }
    }
    Level::Day
}

/// The width of a chart's point over `from..to` at `level` for at most
/// `max_points` points: a whole number of buckets, ms.
pub fn step_for(level: Level, from: i64, to: i64, max_points: usize) -> i64 {
    let width = width_of(level);
    let buckets = (to - from).max(1) / width + 1;
    width * (buckets as u64).div_ceil(max_points.max(1) as u64).max(1) as i64
}

/// A device as the fleet view sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetDevice {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Rated power, W.
    pub rated_w: i64,
    /// Its newest sample: time and AC power.
    pub tail: Option<(i64, Option<i64>)>,
    /// Its site's time zone.
    pub timezone: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Energy of its local today, Wh.
    pub today_wh: f64,
    /// Samples of its local today.
    pub today_samples: i64,
    /// Samples missing from its local today.
    pub today_missing: i64,
}

impl FleetDevice {
    /// Its AC power now: its newest sample's, if taken within
    /// [`super::read::ONLINE_WITHIN_MS`] of `now`.
    pub fn power_now(&self, now: i64) -> Option<i64> {
        match self.tail {
            Some((ms, Some(pac))) if now - ms <= super::read::ONLINE_WITHIN_MS => Some(pac),
            _ => None,
        }
    }
}

/// A device producing below its peers: its specific yield today (kWh per
/// kW rated) under half the median of the devices that reported today.
pub const UNDERPERFORMING_SHARE: f64 = 0.5;

/// The devices of `fleet` under [`UNDERPERFORMING_SHARE`] of the median
/// specific yield today (among those with samples today), with their yield
/// and the median; none when fewer than 3 devices reported.
pub fn underperforming(fleet: &[FleetDevice]) -> (Option<f64>, Vec<(&FleetDevice, f64)>) {
    let yields: Vec<(&FleetDevice, f64)> = fleet
        .iter()
        .filter(|d| d.today_samples > 0 && d.rated_w > 0)
        .map(|d| (d, d.today_wh / d.rated_w as f64))
        .collect();
    if yields.len() < 3 {
        return (None, Vec::new());
    }
    let mut sorted: Vec<f64> = yields.iter().map(|(_, y)| *y).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    let below = yields.into_iter().filter(|(_, y)| *y < median * UNDERPERFORMING_SHARE).collect();
    (Some(median), below)
}

impl Telemetry {
    /// `device`'s rollups at `level` with buckets starting in `from..to`, in
    /// time order, with the statistics of the registers `wanted` (the
    /// others' are left empty).
    pub async fn rollups(
        &self,
        device: DeviceId,
        level: Level,
        from: i64,
        to: i64,
        wanted: &[usize],
    ) -> StoreResult<Vec<RollupRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM telemetry_rollups WHERE device_id = $1 AND level = $2 \
             AND bucket_ms >= $3 AND bucket_ms < $4 ORDER BY bucket_ms",
            select_columns(wanted)
        ))
        .bind(device.0)
        .bind(level.code())
        .bind(from)
        .bind(to)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(|r| rollup_from(r, wanted)).collect()
    }

    /// `device`'s rollups at `level` over `from..to`, merged by the
    /// database into points of `step` ms counted from `from` (a whole
    /// number of buckets): each point's time its first bucket's, energy,
    /// counts and sums added, minimum and maximum the group's; buckets
    /// starting less than `reach` ms before `from` (reaching into it) count
    /// too. Only the points cross to the server (a year of hours is 8,760
    /// rows, 974 points). Days merged several to a point are grouped by a
    /// nominal 24 hours: a group may hold one day more or less around DST.
    pub async fn rollup_points(
        &self,
        device: DeviceId,
        level: Level,
        (from, to, reach): (i64, i64, i64),
        step: i64,
        wanted: &[usize],
    ) -> StoreResult<Vec<RollupRow>> {
        // A point a bucket: the buckets as they are. (Grouped by a nominal
        // day, a 23-hour DST day and the next would share a group.)
        if step == width_of(level) {
            return self.rollups(device, level, from - reach + 1, to, wanted).await;
        }
        // Groups counted from a start aligned with `from`, before every bucket read.
        let base = from - step * (reach + step - 1).div_euclid(step);
        let big = |col: &str| format!("CAST(SUM({col}) AS BIGINT)");
        let mut cols = format!(
            "MIN(bucket_ms), SUM(energy_wh), {}, {}, {}",
            big("covered_ms"),
            big("samples"),
            big("missing")
        );
        for r in wanted {
            cols.push_str(&format!(
                ", {}, MIN(min{r}), MAX(max{r}), {}",
                big(&format!("n{r}")),
                big(&format!("sum{r}"))
            ));
        }
        let rows = sqlx::query(&format!(
            "SELECT {cols} FROM telemetry_rollups WHERE device_id = $1 AND level = $2 \
             AND bucket_ms >= $3 AND bucket_ms < $4 GROUP BY (bucket_ms - $5) / $6 ORDER BY 1"
        ))
        .bind(device.0)
        .bind(level.code())
        .bind(from - reach + 1)
        .bind(to)
        .bind(base)
        .bind(step)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(|r| rollup_from(r, wanted)).collect()
    }

    /// A device's id and its site's time zone.
    pub async fn zone_of(&self, device: &str) -> StoreResult<(DeviceId, TimeZone, String)> {
        let row = sqlx::query("SELECT id, timezone FROM devices WHERE name = $1")
            .bind(device)
            .fetch_optional(self.db.reader())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))?;
        let name: String = row.try_get("timezone")?;
        let tz = TimeZone::get(&name).unwrap_or(TimeZone::UTC);
        Ok((DeviceId(row.try_get("id")?), tz, name))
    }

    /// Every device with its newest sample, tags and energy of its local
    /// today at `now`: three reads, whatever the fleet's size.
    pub async fn fleet(&self, now: i64) -> StoreResult<Vec<FleetDevice>> {
        let rows = sqlx::query(
            "SELECT id, name, rated_w, timezone, tail_ms, tail_pac FROM devices ORDER BY name",
        )
        .fetch_all(self.db.reader())
        .await?;
        let mut fleet = Vec::with_capacity(rows.len());
        let mut index = std::collections::HashMap::new();
        for r in &rows {
            let tail_ms: Option<i64> = r.try_get("tail_ms")?;
            let d = FleetDevice {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                rated_w: r.try_get("rated_w")?,
                tail: tail_ms.map(|ms| (ms, r.try_get("tail_pac").ok().flatten())),
                timezone: r.try_get("timezone")?,
                tags: Vec::new(),
                today_wh: 0.0,
                today_samples: 0,
                today_missing: 0,
            };
            index.insert(d.id, fleet.len());
            fleet.push(d);
        }
        let tags = sqlx::query("SELECT device_id, tag FROM device_tags ORDER BY tag")
            .fetch_all(self.db.reader())
            .await?;
        for t in &tags {
            if let Some(&i) = index.get(&t.try_get::<i64, _>("device_id")?) {
                fleet[i].tags.push(t.try_get("tag")?);
            }
        }
        // Every zone's today starts within 26 hours before now (UTC-12..+14).
        let days = sqlx::query(
            "SELECT device_id, bucket_ms, energy_wh, samples, missing FROM telemetry_rollups \
             WHERE level = $1 AND bucket_ms > $2 AND bucket_ms <= $3",
        )
        .bind(Level::Day.code())
        .bind(now - 26 * 3_600_000)
        .bind(now)
        .fetch_all(self.db.reader())
        .await?;
        let mut zones: std::collections::HashMap<String, (i64, i64)> = Default::default();
        for r in &days {
            let Some(&i) = index.get(&r.try_get::<i64, _>("device_id")?) else { continue };
            let d = &mut fleet[i];
            let today = *zones.entry(d.timezone.clone()).or_insert_with(|| {
                let tz = TimeZone::get(&d.timezone).unwrap_or(TimeZone::UTC);
                Level::Day.bounds(&tz, now)
            });
            if r.try_get::<i64, _>("bucket_ms")? == today.0 {
                d.today_wh += r.try_get::<f64, _>("energy_wh")?;
                d.today_samples += r.try_get::<i64, _>("samples")?;
                d.today_missing += r.try_get::<i64, _>("missing")?;
            }
        }
        Ok(fleet)
    }

    /// Samples each device reported dropping, by device id.
    pub async fn dropped_by_device(&self) -> StoreResult<std::collections::HashMap<i64, i64>> {
        let rows = sqlx::query("SELECT id, dropped_total FROM devices WHERE dropped_total > 0")
            .fetch_all(self.db.reader())
            .await?;
        rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("dropped_total")?))).collect()
    }

    /// Deletes stored batches received before `before_ms`, at most `limit`
    /// (oldest first), so that a sweep never holds the writer long. (By
    /// arrival, not sample time: a backlog or an import of old samples is
    /// kept for the whole period too.)
    ///
    /// On PostgreSQL only the default partition's rows are deleted here;
    /// the others go whole ([`Telemetry::drop_partitions`]).
    pub async fn purge_raw(&self, before_ms: i64, limit: i64) -> StoreResult<u64> {
        let table = match self.db.dialect() {
            crate::db::Dialect::Sqlite => "telemetry_batches",
            crate::db::Dialect::Postgres => "telemetry_batches_default",
        };
        let mut tx = self.db.write().await?;
        let done = sqlx::query(&format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} \
             WHERE received_ms < $1 ORDER BY received_ms LIMIT $2)"
        ))
        .bind(before_ms)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Deletes rollups of `level` whose bucket starts before `before_ms`.
    pub async fn purge_rollups(&self, level: Level, before_ms: i64) -> StoreResult<u64> {
        let mut tx = self.db.write().await?;
        let done = sqlx::query("DELETE FROM telemetry_rollups WHERE level = $1 AND bucket_ms < $2")
            .bind(level.code())
            .bind(before_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(ms: i64, wh: f64) -> RollupRow {
        RollupRow {
            bucket_ms: ms,
            energy_wh: wh,
            covered_ms: 0,
            samples: 1,
            missing: 0,
            regs: [RegStat::default(); REGISTERS],
        }
    }

    #[test]
    fn days_sum_into_local_months_and_years() {
        let tz = TimeZone::get("Pacific/Auckland").unwrap();
        let start = |y, m, d| {
            jiff::civil::date(y, m, d)
                .to_zoned_datetime(tz.clone())
                .unwrap()
                .timestamp()
                .as_millisecond()
        };
        let rows = [
            day(start(2026, 11, 30), 1000.0),
            day(start(2026, 12, 1), 2000.0),
            day(start(2027, 1, 1), 500.0),
        ];
        let months = by_period(&rows, &tz, Period::Month);
        let got: Vec<(&str, f64)> =
            months.iter().map(|p| (p.period.as_str(), p.energy_kwh)).collect();
        assert_eq!(got, [("2026-11", 1.0), ("2026-12", 2.0), ("2027-01", 0.5)]);
        let years = by_period(&rows, &tz, Period::Year);
        assert_eq!(years.len(), 2);
        assert_eq!(years[0].energy_kwh, 3.0);
        assert_eq!(by_period(&rows, &tz, Period::Day)[1].period, "2026-12-01");
    }

    #[test]
    fn the_level_is_the_finest_that_fits_and_is_still_kept() {
        let h = 3_600_000;
        assert_eq!(level_for(0, 24 * h, 1000, None), Level::Min5);
        assert_eq!(level_for(0, 7 * 24 * h, 1000, None), Level::Min5, "2,016 buckets, 3 a point");
        assert_eq!(level_for(0, 30 * 24 * h, 1000, None), Level::Hour, "8,640 five minutes: hours");
        assert_eq!(level_for(0, 300 * 24 * h, 1000, None), Level::Hour);
        assert_eq!(level_for(0, 365 * 24 * h, 1000, None), Level::Day, "8,760 hours: days");
        assert_eq!(level_for(0, 24 * h, 10, None), Level::Hour);
        // Five-minute buckets removed before `from`: hours.
        assert_eq!(level_for(0, 24 * h, 1000, Some(1)), Level::Hour);
        assert_eq!(level_for(1, 24 * h, 1000, Some(1)), Level::Min5);
    }

    #[test]
    fn a_point_is_a_whole_number_of_buckets_for_at_most_the_points_asked() {
        let h = 3_600_000;
        assert_eq!(step_for(Level::Hour, 0, 8760 * h, 1000), 9 * h, "a year: 974 points");
        assert_eq!(step_for(Level::Min5, 0, 24 * h, 1000), 300_000, "a day as it is");
        assert_eq!(step_for(Level::Min5, 0, 30 * 24 * h, 1000), 9 * 300_000);
        assert_eq!(step_for(Level::Hour, 0, 2 * h, 1), 3 * h);
    }

    #[test]
    fn devices_under_half_the_median_yield_are_named() {
        let d = |name: &str, rated_w, today_wh, today_samples| FleetDevice {
            id: 0,
            name: name.into(),
            rated_w,
            tail: None,
            timezone: "UTC".into(),
            tags: vec![],
            today_wh,
            today_samples,
            today_missing: 0,
        };
        let fleet = [
            d("a", 10_000, 40_000.0, 10),
            d("b", 5_000, 19_000.0, 10),
            d("c", 10_000, 15_000.0, 10),
            d("d", 10_000, 0.0, 0),
        ];
        let (median, below) = underperforming(&fleet);
        assert_eq!(median, Some(3.8));
        let names: Vec<&str> = below.iter().map(|(d, _)| d.name.as_str()).collect();
        assert_eq!(names, ["c"], "1.5 kWh/kW is under 1.9; d reported nothing today");
        assert_eq!(underperforming(&fleet[..2]).0, None);
    }
}
