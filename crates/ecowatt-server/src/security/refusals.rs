//! Refusals of traffic that did not authenticate (or was refused at the
//! device protocol's door): counted at once, written as one security event
//! per source address, kind and device per minute (with a count), and
//! budgeted per source address.
//!
//! A flood of garbage used to cost a database row and a WARN line per
//! request (21,080 rows in 5 s from one client). Now a minute of it from one
//! address is one row whose count grows, written at most every
//! [`FLUSH_EVERY`], and one WARN line. Each refusal also takes a token from
//! its address's bucket ([`Refusals::per_minute`] tokens, refilled evenly);
//! an address with an empty bucket is *throttled*: whatever it sends that
//! does not authenticate is answered `429 rate_limited`, and what would need
//! the store before authenticating is refused without it. A request that
//! authenticates is never throttled, so an honest device is never slowed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{SecurityEventRow, SecurityEvents};
use crate::db::StoreResult;

/// How often the tallies are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Distinct (source, kind, device) keys tallied per minute; beyond, new
/// sources are tallied together under no source (a spoofed-address flood
/// must not grow memory without bound).
pub const MAX_KEYS: usize = 10_000;
/// Addresses whose buckets are kept; beyond, full buckets are forgotten first.
const MAX_BUCKETS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    minute: i64,
    source: Option<IpAddr>,
    kind: &'static str,
    device: Option<String>,
}

#[derive(Debug)]
struct Tally {
    count: u64,
    first_ms: i64,
    last_ms: i64,
    detail: Value,
    /// The row written for it, once written.
    row: Option<i64>,
    /// `count` as last written.
    written: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Refusals {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    tallies: Mutex<HashMap<Key, Tally>>,
    /// One flush at a time: two would both insert a row for a new tally.
    flushing: tokio::sync::Mutex<()>,
}

impl Refusals {
    /// Each address may cause `per_minute` refusals a minute (and as many at once).
    pub fn new(per_minute: u32) -> Self {
        Refusals {
            per_minute: per_minute.max(1),
            buckets: Mutex::default(),
            tallies: Mutex::default(),
            flushing: tokio::sync::Mutex::default(),
        }
    }

    /// The budget per address and minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let per_sec = f64::from(self.per_minute) / 60.0;
        let gained = now.duration_since(b.at).as_secs_f64() * per_sec;
        b.tokens = (b.tokens + gained).min(f64::from(self.per_minute));
        b.at = now;
    }

    /// Whether `source` has used up its budget of refusals.
    pub fn throttled(&self, source: Option<IpAddr>) -> bool {
        let Some(ip) = source else { return false };
        let mut buckets = lock(&self.buckets);
        match buckets.get_mut(&ip) {
            Some(b) => {
                self.refill(b, Instant::now());
                b.tokens < 1.0
            }
            None => false,
        }
    }

    /// Records a refusal; returns whether it is the first of its kind from
    /// its source (and about its device) this minute, which the caller logs.
    pub fn refused(
        &self,
        source: Option<IpAddr>,
        device: Option<&str>,
        kind: &'static str,
        detail: Value,
        now_ms: i64,
    ) -> bool {
        if let Some(ip) = source {
            let now = Instant::now();
            let mut buckets = lock(&self.buckets);
            if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
                let (per_minute, per_sec) =
                    (f64::from(self.per_minute), f64::from(self.per_minute) / 60.0);
                buckets.retain(|_, b| {
                    b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < per_minute
                });
            }
            let b =
                buckets.entry(ip).or_insert(Bucket { tokens: f64::from(self.per_minute), at: now });
            self.refill(b, now);
            b.tokens = (b.tokens - 1.0).max(0.0);
        }
        let minute = now_ms.div_euclid(60_000);
        let mut tallies = lock(&self.tallies);
        let mut key = Key { minute, source, kind, device: device.map(str::to_owned) };
        if !tallies.contains_key(&key) && tallies.len() >= MAX_KEYS {
            key.source = None;
            key.device = None;
        }
        let first = !tallies.contains_key(&key);
        let tally = tallies.entry(key).or_insert_with(|| Tally {
            count: 0,
            first_ms: now_ms,
            last_ms: now_ms,
            detail,
            row: None,
            written: 0,
        });
        tally.count += 1;
        tally.last_ms = tally.last_ms.max(now_ms);
        first
    }

    /// Writes what was tallied since the last flush: a new row per new key,
    /// a new count for the others; keys of past minutes are then forgotten.
    pub async fn flush(&self, events: &SecurityEvents, now_ms: i64) -> StoreResult<()> {
        let _one_at_a_time = self.flushing.lock().await;
        let (keys, rows): (Vec<Key>, Vec<SecurityEventRow>) = {
            let tallies = lock(&self.tallies);
            let mut changed: Vec<(&Key, &Tally)> =
                tallies.iter().filter(|(_, t)| t.count > t.written).collect();
            // New rows in the order their first refusal came.
            changed.sort_by(|a, b| (a.1.first_ms, a.0.kind).cmp(&(b.1.first_ms, b.0.kind)));
            changed
                .into_iter()
                .map(|(k, t)| {
                    let row = SecurityEventRow {
                        id: t.row,
                        at_ms: t.first_ms,
                        last_ms: t.last_ms,
                        source: k.source.map(|ip| ip.to_string()),
                        device: k.device.clone(),
                        kind: k.kind.to_owned(),
                        detail: t.detail.clone(),
                        count: t.count as i64,
                    };
                    (k.clone(), row)
                })
                .unzip()
        };
        let ids = if rows.is_empty() { Vec::new() } else { events.save(&rows).await? };
        let minute = now_ms.div_euclid(60_000);
        let mut tallies = lock(&self.tallies);
        for ((key, row), id) in keys.iter().zip(&rows).zip(ids) {
            if let Some(t) = tallies.get_mut(key) {
                t.row = Some(id);
                t.written = row.count as u64;
            }
        }
        tallies.retain(|k, t| k.minute >= minute || t.count > t.written);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters, never a broken map.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_throttled_after_its_budget_and_others_are_not() {
        let r = Refusals::new(5);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..5 {
            assert!(!r.throttled(Some(a)));
            r.refused(Some(a), None, "bad_tag", Value::Null, 0);
        }
        assert!(r.throttled(Some(a)));
        assert!(!r.throttled(Some(b)), "another address pays for nothing");
        assert!(!r.throttled(None), "requests without an address (in-process) are never throttled");
    }

    #[test]
    fn refusals_are_tallied_per_source_kind_device_and_minute() {
        let r = Refusals::new(1000);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(r.refused(Some(a), None, "bad_tag", Value::Null, 1_000));
        assert!(!r.refused(Some(a), None, "bad_tag", Value::Null, 2_000));
        assert!(r.refused(Some(a), Some("d"), "bad_tag", Value::Null, 2_000));
        assert!(r.refused(Some(a), None, "replay", Value::Null, 2_000));
        assert!(r.refused(Some(a), None, "bad_tag", Value::Null, 61_000), "a new minute");
        let tallies = lock(&r.tallies);
        assert_eq!(tallies.len(), 4);
        let first = Key { minute: 0, source: Some(a), kind: "bad_tag", device: None };
        assert_eq!(tallies[&first].count, 2);
        assert_eq!((tallies[&first].first_ms, tallies[&first].last_ms), (1_000, 2_000));
    }

    #[tokio::test]
    async fn flushes_at_once_write_one_row_per_tally_with_its_whole_count() {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::db::sqlite_url(&dir.path().join("e.db"));
        let db = crate::db::Db::open(&url, Default::default()).await.unwrap();
        let store = SecurityEvents::new(db.clone());
        let r = Refusals::new(1000);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for round in 0..3 {
            for _ in 0..5 {
                r.refused(Some(a), None, "bad_tag", Value::Null, 1_000 + round);
            }
            let (x, y) = tokio::join!(r.flush(&store, 2_000), r.flush(&store, 2_000));
            x.unwrap();
            y.unwrap();
        }
        let events = store.list(None, 10).await.unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].count, events[0].source.as_deref()), (15, Some("192.0.2.1")));
        db.close().await;
    }

    #[test]
    fn a_flood_from_many_addresses_is_folded_once_the_keys_are_many() {
        let r = Refusals::new(10);
        for i in 0..(MAX_KEYS as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            r.refused(Some(ip), None, "unknown_device", Value::Null, 0);
        }
        let tallies = lock(&r.tallies);
        assert_eq!(tallies.len(), MAX_KEYS + 1);
        let folded = Key { minute: 0, source: None, kind: "unknown_device", device: None };
        assert_eq!(tallies[&folded].count, 500);
    }
}
