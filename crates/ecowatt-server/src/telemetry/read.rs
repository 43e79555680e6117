//! Reading telemetry: stored batches decoded into samples (a sample held by
//! overlapping batches counts once), registers named by address or name,
//! values in engineering units, a range cut into at most so many averaged
//! points, and the completeness of a device's `seq`s.

use std::collections::BTreeMap;

use ecowatt_proto::codec;
use ecowatt_proto::registers::{REGISTER_COUNT, REGISTERS};

use super::StoredBatch;
use crate::domain::Invalid;

/// A device counts as online when it talked to the server this recently.
pub const ONLINE_WITHIN_MS: i64 = 90_000;
/// The latest time a query may name: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;
/// Most points a query may ask for.
pub const MAX_POINTS: usize = 10_000;

/// One decoded sample with a value per register address (if sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Its sequence number.
    pub seq: u64,
    /// When it was read, Unix ms.
    pub unix_ms: u64,
    /// Raw values by register address.
    pub values: [Option<u16>; REGISTER_COUNT],
}

/// A stored batch that does not decode (a bug, or a tampered database).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stored batch starting at seq {first_seq} does not decode: {reason}")]
pub struct CorruptBatch {
    /// Where it starts.
    pub first_seq: i64,
    /// The codec's complaint.
    pub reason: String,
}

/// The samples of `batches`, by `seq`: a sample in two batches (a batch
/// resent after a reboot) counts once.
pub fn decode_all(batches: &[StoredBatch]) -> Result<BTreeMap<u64, Reading>, CorruptBatch> {
    let mut rows = BTreeMap::new();
    for b in batches {
        let batch = codec::decode(&b.data)
            .map_err(|e| CorruptBatch { first_seq: b.first_seq, reason: e.to_string() })?;
        let addresses: Vec<usize> =
            (0..REGISTER_COUNT).filter(|r| batch.registers & (1 << r) != 0).collect();
        for s in batch.samples {
            let mut values = [None; REGISTER_COUNT];
            for (a, v) in addresses.iter().zip(&s.values) {
                values[*a] = Some(*v);
            }
            rows.insert(s.seq, Reading { seq: s.seq, unix_ms: s.unix_ms, values });
        }
    }
    Ok(rows)
}

/// A time bound of a query, refused outside 0..=[`MAX_TIME_MS`] (so that no
/// arithmetic on it can overflow and every answer is about real dates).
pub fn time_bound(field: &str, value: Option<i64>) -> Result<Option<i64>, Invalid> {
    match value {
        Some(v) if !(0..=MAX_TIME_MS).contains(&v) => Err(Invalid::new(
            field,
            format!("{v} is outside 0..={MAX_TIME_MS} (Unix ms, up to the year 9999)"),
        )),
        v => Ok(v),
    }
}

/// The registers a query names (`None`: all), by address (`0..=9`) or name
/// (`Pac`, any case), comma-separated.
pub fn registers(list: Option<&str>) -> Result<Vec<usize>, Invalid> {
    let Some(list) = list else { return Ok((0..REGISTER_COUNT).collect()) };
    list.split(',')
        .map(|r| {
            let r = r.trim();
            r.parse::<usize>()
                .ok()
                .filter(|a| *a < REGISTER_COUNT)
                .or_else(|| REGISTERS.iter().position(|reg| reg.name.eq_ignore_ascii_case(r)))
                .ok_or_else(|| {
                    Invalid::new(
                        "registers",
                        format!("{r:?} is not a register (0..=9 or a name like Pac)"),
                    )
                })
        })
        .collect()
}

pub use ecowatt_formats::mqtt::engineering;

/// One point of a series: a sample (with its `seq`) or the average of a
/// time bucket's samples (at the mean of their times, without one: a point
/// never lies where there was no data); raw values of the registers asked
/// for, in their order.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Time, Unix ms.
    pub t: i64,
    /// The sample's `seq`, when the point is one sample.
    pub seq: Option<u64>,
    /// Raw values (averaged in a bucket), `None` where not sampled.
    pub values: Vec<Option<f64>>,
}

/// A range of samples as points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Samples in the range.
    pub samples: usize,
    /// Whether the points are bucket averages.
    pub downsampled: bool,
    /// The points, in time order.
    pub points: Vec<Point>,
}

/// The samples of `readings` in `from..=to` as points of the registers
/// `wanted`: each sample when there are at most `max_points`, else averages
/// over `max_points` equal time buckets (empty buckets left out).
pub fn series(
    readings: &BTreeMap<u64, Reading>,
    from: i64,
    to: i64,
    wanted: &[usize],
    max_points: usize,
) -> Series {
    let in_range: Vec<&Reading> =
        readings.values().filter(|r| (from..=to).contains(&(r.unix_ms as i64))).collect();
    let raw = |r: &Reading, a: usize| r.values[a].map(f64::from);
    if in_range.len() <= max_points {
        let points = in_range
            .iter()
            .map(|r| Point {
                t: r.unix_ms as i64,
                seq: Some(r.seq),
                values: wanted.iter().map(|a| raw(r, *a)).collect(),
            })
            .collect();
        return Series { samples: in_range.len(), downsampled: false, points };
    }
    let width = ((to - from) / max_points as i64).max(1);
    // Per bucket: the sum and count of its sample times, and per register.
    type Sums = ((i128, i64), Vec<(f64, u32)>);
    let mut buckets: BTreeMap<i64, Sums> = BTreeMap::new();
    for r in &in_range {
        let (times, sums) = buckets
            .entry((r.unix_ms as i64 - from) / width)
            .or_insert_with(|| ((0, 0), vec![(0.0, 0); wanted.len()]));
        times.0 += i128::from(r.unix_ms);
        times.1 += 1;
        for (slot, a) in wanted.iter().enumerate() {
            if let Some(v) = raw(r, *a) {
                sums[slot].0 += v;
                sums[slot].1 += 1;
            }
        }
    }
    let points = buckets
        .into_iter()
        .map(|(_, ((time_sum, n), sums))| Point {
            t: (time_sum / i128::from(n)) as i64,
            seq: None,
            values: sums.iter().map(|(s, n)| (*n > 0).then(|| s / f64::from(*n))).collect(),
        })
        .collect();
    Series { samples: in_range.len(), downsampled: true, points }
}

/// How whole a device's record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completeness {
    /// Lowest `seq` stored.
    pub first_seq: Option<u64>,
    /// Highest `seq` stored.
    pub last_seq: Option<u64>,
    /// Distinct samples stored.
    pub received: u64,
    /// Samples stored more than once (overlapping batches; 0 since ingest
    /// stores only the samples a resent batch adds).
    pub duplicates: i64,
    /// `seq`s missing between the first and the last.
    pub missing: u64,
    /// The first 100 gaps, as inclusive `seq` ranges.
    pub gaps: Vec<(u64, u64)>,
}

/// The completeness of `batches`, decoded as `readings`.
pub fn completeness(batches: &[StoredBatch], readings: &BTreeMap<u64, Reading>) -> Completeness {
    let stored: i64 = batches.iter().map(|b| b.count).sum();
    let seqs: Vec<u64> = readings.keys().copied().collect();
    let mut gaps = Vec::new();
    let mut missing = 0u64;
    for w in seqs.windows(2) {
        if w[1] > w[0] + 1 {
            missing += w[1] - w[0] - 1;
            if gaps.len() < 100 {
                gaps.push((w[0] + 1, w[1] - 1));
            }
        }
    }
    Completeness {
        first_seq: seqs.first().copied(),
        last_seq: seqs.last().copied(),
        received: seqs.len() as u64,
        duplicates: stored - seqs.len() as i64,
        missing,
        gaps,
    }
}

#[cfg(test)]
mod tests {
    use ecowatt_proto::codec::{Sample, encode};

    use super::*;

    fn stored(seqs: &[u64], mask: u16) -> StoredBatch {
        let n = mask.count_ones() as usize;
        let samples: Vec<Sample> = seqs
            .iter()
            .map(|&seq| Sample { seq, unix_ms: 1_000 * seq, values: vec![seq as u16; n] })
            .collect();
        StoredBatch::of(1, mask, &samples, encode(mask, &samples).unwrap())
    }

    #[test]
    fn overlapping_batches_decode_to_each_sample_once_and_gaps_are_counted() {
        let batches = [stored(&[1, 2, 3], 0b11), stored(&[3, 4], 0b11), stored(&[7, 10], 0b11)];
        let r = decode_all(&batches).unwrap();
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 7, 10]);
        assert_eq!(r[&4].values[..3], [Some(4), Some(4), None]);
        let c = completeness(&batches, &r);
        assert_eq!((c.first_seq, c.last_seq, c.received), (Some(1), Some(10), 6));
        assert_eq!((c.duplicates, c.missing, c.gaps), (1, 4, vec![(5, 6), (8, 9)]));
        let empty = completeness(&[], &BTreeMap::new());
        assert_eq!((empty.first_seq, empty.received, empty.missing), (None, 0, 0));
    }

    #[test]
    fn a_batch_that_does_not_decode_is_an_error_naming_it() {
        let mut b = stored(&[5, 6], 1);
        b.data.truncate(2);
        assert_eq!(decode_all(&[b]).unwrap_err().first_seq, 5);
    }

    #[test]
    fn series_is_each_sample_or_bucket_averages() {
        let r = decode_all(&[stored(&(1..=10).collect::<Vec<_>>(), 0b1)]).unwrap();
        let s = series(&r, 2_000, 9_000, &[0], 100);
        assert_eq!((s.samples, s.downsampled, s.points.len()), (8, false, 8));
        assert_eq!(s.points[0], Point { t: 2_000, seq: Some(2), values: vec![Some(2.0)] });
        // Two buckets of 3,999 ms: samples 1..=4 and 5..=8 (9 and 10 lie
        // outside), each at the mean of its samples' times.
        let s = series(&r, 1_000, 8_999, &[0, 1], 2);
        assert_eq!((s.samples, s.downsampled), (8, true));
        assert_eq!(
            s.points,
            vec![
                Point { t: 2_500, seq: None, values: vec![Some(2.5), None] },
                Point { t: 6_500, seq: None, values: vec![Some(6.5), None] },
            ]
        );
        // A range reaching far before the data: the one bucket's point is at
        // the data, not at the middle of the range (years before it).
        let s = series(&r, 0, 10_000_000_000, &[0], 1);
        assert_eq!(s.points[0].t, 5_500);
        assert_eq!(s.points[0].values, vec![Some(5.5)]);
    }

    #[test]
    fn registers_by_address_or_name_and_bounds() {
        assert_eq!(registers(None).unwrap().len(), REGISTER_COUNT);
        assert_eq!(registers(Some("0, pac")).unwrap()[0], 0);
        assert_eq!(registers(Some("10")).unwrap_err().field, "registers");
        assert_eq!(registers(Some("watts")).unwrap_err().field, "registers");
        assert_eq!(time_bound("to_ms", Some(MAX_TIME_MS)), Ok(Some(MAX_TIME_MS)));
        assert_eq!(time_bound("to_ms", Some(-1)).unwrap_err().field, "to_ms");
        assert_eq!(time_bound("to_ms", Some(MAX_TIME_MS + 1)).unwrap_err().field, "to_ms");
        assert_eq!(time_bound("to_ms", None), Ok(None));
    }
}
