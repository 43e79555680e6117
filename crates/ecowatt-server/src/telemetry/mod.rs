//! Telemetry: the compressed batches devices send, stored as sent (a
//! resent or grown batch stores only the samples it adds: [`trim`]), written
//! in group commits ([`ingest`]) and decoded on read ([`read`]).

pub mod energy;
pub mod export;
pub mod ingest;
pub mod partitions;
pub mod read;
pub mod rollup;

use ecowatt_proto::codec;
use sqlx::Row;
use sqlx::any::AnyRow;

pub use ingest::{Accepted, Ingest};

use crate::db::{Db, StoreError, StoreResult};

/// A telemetry batch as the device sent it, with what the server read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    /// First `seq` in it.
    pub first_seq: i64,
    /// Last `seq` in it.
    pub last_seq: i64,
    /// Number of samples.
    pub count: i64,
    /// Time of its first sample, Unix ms.
    pub first_ms: i64,
    /// Time of its last sample, Unix ms.
    pub last_ms: i64,
    /// Register mask.
    pub registers: i64,
    /// Codec version (1 or 2), as the device sent it.
    pub codec: i64,
    /// The encoded samples.
    pub data: Vec<u8>,
}

impl StoredBatch {
    /// The record of an encoded batch of decoded `samples` (non-empty).
    pub fn of(codec_id: u8, registers: u16, samples: &[codec::Sample], data: Vec<u8>) -> Self {
        StoredBatch {
            first_seq: samples.first().map_or(0, |x| x.seq as i64),
            last_seq: samples.last().map_or(0, |x| x.seq as i64),
            count: samples.len() as i64,
            first_ms: samples.iter().map(|x| x.unix_ms).min().unwrap_or(0) as i64,
            last_ms: samples.iter().map(|x| x.unix_ms).max().unwrap_or(0) as i64,
            registers: i64::from(registers),
            codec: i64::from(codec_id),
            data,
        }
    }
}

/// The samples of `batch` that no range in `covered` (`seq` ranges, both
/// ends included) holds: the batch itself when none is covered, a re-encoded
/// batch of the others, or `None` when every one is (a resend of stored
/// samples: the first stored copy stands).
///
/// Only a batch that really shares `seq`s with a covered range is decoded;
/// one that does not decode (it was checked when it arrived, so never in
/// practice) is stored whole rather than failing its group.
pub fn trim(batch: &StoredBatch, covered: &[(i64, i64)]) -> Option<StoredBatch> {
    let (from, to) = (batch.first_seq, batch.last_seq);
    let covered: Vec<(i64, i64)> =
        covered.iter().copied().filter(|&(a, b)| b >= from && a <= to).collect();
    if covered.is_empty() {
        return Some(batch.clone());
    }
    let held = |seq: i64| covered.iter().any(|&(a, b)| (a..=b).contains(&seq));
    let decoded = match codec::decode(&batch.data) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, from, to, "an accepted batch does not decode: stored whole");
            return Some(batch.clone());
        }
    };
    let total = decoded.samples.len();
    let new: Vec<_> = decoded.samples.into_iter().filter(|x| !held(x.seq as i64)).collect();
    if new.len() == total {
        return Some(batch.clone());
    }
    let (Some(first), Some(last)) = (new.first(), new.last()) else { return None };
    // Re-encoded in the batch's own version (stored batches keep theirs).
    let data = codec::encode_as(batch.data[0], decoded.registers, &new)
        .expect("a subset of a valid batch encodes");
    Some(StoredBatch {
        first_seq: first.seq as i64,
        last_seq: last.seq as i64,
        count: new.len() as i64,
        first_ms: new.iter().map(|x| x.unix_ms).min().unwrap_or(0) as i64,
        last_ms: new.iter().map(|x| x.unix_ms).max().unwrap_or(0) as i64,
        data,
        ..batch.clone()
    })
}

fn batch_from(row: &AnyRow) -> StoreResult<StoredBatch> {
    Ok(StoredBatch {
        first_seq: row.try_get("first_seq")?,
        last_seq: row.try_get("last_seq")?,
        count: row.try_get("sample_count")?,
        first_ms: row.try_get("first_ms")?,
        last_ms: row.try_get("last_ms")?,
        registers: row.try_get("registers")?,
        codec: row.try_get("codec")?,
        data: row.try_get("data")?,
    })
}

/// The stored telemetry.
#[derive(Clone)]
pub struct Telemetry {
    db: Db,
}

impl Telemetry {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Telemetry { db }
    }

    /// Batches of `device` with samples between `from_ms` and `to_ms`, in `seq` order.
    pub async fn range(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<StoredBatch>> {
        let rows = sqlx::query(
            "SELECT b.* FROM telemetry_batches b JOIN devices d ON d.id = b.device_id \
             WHERE d.name = $1 AND b.last_ms >= $2 AND b.first_ms <= $3 ORDER BY b.first_seq, b.last_seq",
        )
        .bind(device)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(batch_from).collect()
    }

    /// The batch holding the device's newest sample.
    pub async fn latest(&self, device: &str) -> StoreResult<Option<StoredBatch>> {
        let row = sqlx::query(
            "SELECT b.* FROM telemetry_batches b JOIN devices d ON d.id = b.device_id \
             WHERE d.name = $1 ORDER BY b.last_seq DESC LIMIT 1",
        )
        .bind(device)
        .fetch_optional(self.db.reader())
        .await?;
        row.as_ref().map(batch_from).transpose()
    }

    /// Samples the device reported dropping.
    pub async fn dropped_total(&self, device: &str) -> StoreResult<i64> {
        let row = sqlx::query("SELECT dropped_total FROM devices WHERE name = $1")
            .bind(device)
            .fetch_optional(self.db.reader())
            .await?;
        Ok(row
            .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))?
            .try_get("dropped_total")?)
    }
}

#[cfg(test)]
mod tests {
    use ecowatt_proto::codec::{Sample, encode};

    use super::*;

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> StoredBatch {
        let samples: Vec<Sample> = seqs
            .map(|seq| Sample { seq, unix_ms: 1_000 * seq, values: vec![seq as u16] })
            .collect();
        StoredBatch::of(1, 1, &samples, encode(1, &samples).unwrap())
    }

    #[test]
    fn trim_keeps_only_the_samples_no_stored_range_holds() {
        let b = batch(10..=19);
        let seqs = |t: Option<StoredBatch>| t.map(|t| (t.first_seq, t.last_seq, t.count));
        type Case = (&'static [(i64, i64)], Option<(i64, i64, i64)>);
        let cases: &[Case] = &[
            (&[], Some((10, 19, 10))),
            (&[(0, 9), (20, 30)], Some((10, 19, 10))),
            (&[(0, 14)], Some((15, 19, 5))),
            (&[(15, 40)], Some((10, 14, 5))),
            (&[(0, 12), (17, 40)], Some((13, 16, 4))),
            (&[(10, 19)], None),
            (&[(0, 14), (15, 19)], None),
        ];
        for (covered, want) in cases {
            assert_eq!(seqs(trim(&b, covered)), *want, "covered {covered:?}");
        }
        let kept = trim(&b, &[(0, 14)]).unwrap();
        let decoded = codec::decode(&kept.data).unwrap();
        assert_eq!(
            decoded.samples.iter().map(|x| x.seq).collect::<Vec<_>>(),
            vec![15, 16, 17, 18, 19]
        );
        assert_eq!((kept.first_ms, kept.last_ms), (15_000, 19_000));
    }

    #[test]
    fn a_batch_that_does_not_decode_is_kept_whole() {
        let mut b = batch(10..=19);
        b.data.truncate(3);
        assert_eq!(trim(&b, &[(0, 12)]), Some(b.clone()));
    }
}
