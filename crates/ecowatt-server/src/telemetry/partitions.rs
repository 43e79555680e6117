//! PostgreSQL's raw telemetry is partitioned by arrival (`received_ms`,
//! migration 17): partitions of a fixed width made ahead of time, and
//! dropped whole once they end before the retention limit, so that
//! retention costs a `DROP TABLE` instead of deleting as many rows as
//! arrive. Rows that find no partition (stored before the migration, or
//! while none was made) land in the default partition, which retention
//! empties row by row.

use std::time::Duration;

use sqlx::Row;

use super::Telemetry;
use crate::db::{Dialect, StoreResult};

/// The width of a partition for `retention` (none: kept for ever): an
/// eighth of it, between 10 seconds (a bench's minute) and a day (90 days
/// make 90 partitions).
pub fn width_for(retention: Option<Duration>) -> i64 {
    let day = 86_400_000;
    retention.map_or(day, |keep| (keep.as_millis() as i64 / 8).clamp(10_000, day))
}

/// Partitions are made at least this far ahead (ms), so that one is there
/// long before its first row: a row that finds none goes to the default
/// partition, and a partition cannot be made over rows waiting there.
pub const AHEAD_MIN: i64 = 10 * 60_000;

/// The partitions to have at `now`: `[start, end)` of each, aligned on
/// `width`, from the one holding `now` to the one holding `now + ahead`.
pub fn wanted(now: i64, width: i64, ahead: i64) -> Vec<(i64, i64)> {
    let first = now.div_euclid(width);
    let last = (now + ahead).div_euclid(width);
    (first..=last).map(|i| (i * width, (i + 1) * width)).collect()
}

/// `FOR VALUES FROM ('1') TO ('2')` as PostgreSQL writes a range bound.
fn bounds(expr: &str) -> Option<(i64, i64)> {
    let numbers: Vec<i64> = expr
        .split(|c: char| !c.is_ascii_digit() && c != '-')
        .filter(|s| !s.is_empty() && *s != "-")
        .filter_map(|s| s.parse().ok())
        .collect();
    match numbers[..] {
        [from, to] => Some((from, to)),
        _ => None,
    }
}

impl Telemetry {
    /// The range partitions of `telemetry_batches` (name, start, end), by
    /// start; none on SQLite.
    pub async fn partitions(&self) -> StoreResult<Vec<(String, i64, i64)>> {
        if self.db.dialect() != Dialect::Postgres {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'telemetry_batches'::regclass",
        )
        .fetch_all(self.db.reader())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let bound: String = r.try_get("bound")?;
            if let Some((from, to)) = bounds(&bound) {
                out.push((r.try_get("name")?, from, to));
            }
        }
        out.sort_by_key(|p| p.1);
        Ok(out)
    }

    /// Makes the partitions `wanted` that are missing (PostgreSQL; nothing
    /// on SQLite). One that cannot be made (it overlaps one of another
    /// width, or rows of its range wait in the default partition) is left
    /// out with a warning: its rows go to the default partition. Returns how
    /// many were made.
    pub async fn make_partitions(&self, wanted: &[(i64, i64)]) -> StoreResult<usize> {
        if self.db.dialect() != Dialect::Postgres {
            return Ok(0);
        }
        let have: Vec<(i64, i64)> =
            self.partitions().await?.into_iter().map(|(_, a, b)| (a, b)).collect();
        let mut made = 0;
        for &(from, to) in wanted {
            if have.iter().any(|&(a, b)| a < to && from < b) {
                continue;
            }
            let mut tx = self.db.write().await?;
            // Never stall the ingest for long: statements queue behind a
            // lock asked for (a bench measured upload p99 in seconds with
            // 2 s); one not had goes on the next sweep (they are made well
            // ahead: [`AHEAD_MIN`]).
            sqlx::query("SET LOCAL lock_timeout = '500ms'").execute(&mut *tx).await?;
            let made_it = sqlx::query(&format!(
                "CREATE TABLE telemetry_batches_p{from} PARTITION OF telemetry_batches \
                 FOR VALUES FROM ({from}) TO ({to})"
            ))
            .execute(&mut *tx)
            .await;
            match made_it {
                Ok(_) => {
                    tx.commit().await?;
                    made += 1;
                }
                Err(e) => {
                    tracing::warn!(from, to, error = %e, "cannot make a telemetry partition");
                }
            }
        }
        Ok(made)
    }

    /// Drops the partitions that end at or before `before_ms` (their every
    /// batch was received before it; the default partition, having no end,
    /// is never one); returns how many.
    pub async fn drop_partitions(&self, before_ms: i64) -> StoreResult<usize> {
        let mut dropped = 0;
        for (name, _, to) in self.partitions().await? {
            if to > before_ms {
                continue;
            }
            let mut tx = self.db.write().await?;
            sqlx::query("SET LOCAL lock_timeout = '500ms'").execute(&mut *tx).await?;
            // The name is PostgreSQL's own, as read from its catalog. Detached
            // first: the parent is locked before the partition, in the order
            // the ingest's statements lock them.
            let name = name.replace('"', "");
            sqlx::query(&format!("ALTER TABLE telemetry_batches DETACH PARTITION \"{name}\""))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("DROP TABLE \"{name}\"")).execute(&mut *tx).await?;
            tx.commit().await?;
            dropped += 1;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_follow_the_retention_within_bounds() {
        assert_eq!(width_for(None), 86_400_000);
        assert_eq!(width_for(Some(Duration::from_secs(90 * 86_400))), 86_400_000);
        assert_eq!(width_for(Some(Duration::from_secs(4 * 86_400))), 43_200_000);
        assert_eq!(width_for(Some(Duration::from_secs(40))), 10_000);
    }

    #[test]
    fn the_partitions_wanted_cover_now_and_ahead_aligned() {
        let w = 10_000;
        assert_eq!(
            wanted(25_000, w, 30_000),
            [(20_000, 30_000), (30_000, 40_000), (40_000, 50_000), (50_000, 60_000)]
        );
        assert_eq!(wanted(20_000, w, 0), [(20_000, 30_000)]);
    }

    #[test]
    fn range_bounds_are_read_as_postgresql_writes_them() {
        assert_eq!(
            bounds("FOR VALUES FROM ('1796148000000') TO ('1796234400000')"),
            Some((1_796_148_000_000, 1_796_234_400_000))
        );
        assert_eq!(bounds("FOR VALUES FROM (0) TO (10000)"), Some((0, 10_000)));
        assert_eq!(bounds("DEFAULT"), None);
    }
}
