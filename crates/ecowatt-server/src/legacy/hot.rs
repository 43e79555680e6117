//! The original firmware's hot requests served from memory: each device
//! asks `/changes` and `/command/poll` every cycle, and nearly always there
//! is nothing to tell. A device's copy records that, stamped with its news
//! ([`crate::news::News::stamp`]): any write that concerns the device (a
//! config change, a command queued, the device disabled or removed, from
//! this server or, on PostgreSQL, another) outdates it, and the next
//! request reads the store again. When and how long the copy holds is the
//! store's answer, not a guess: `/command/poll` is quiet only until a
//! delivered command without a result is due again.
//!
//! Times devices were last seen are written in batches (every
//! [`SEEN_FLUSH`]), not per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::db::Db;
use crate::news::Stamp;

/// How often the devices' last-seen times are written.
pub const SEEN_FLUSH: Duration = Duration::from_secs(2);

/// What a device's requests would read in the store, while its stamp holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copy {
    stamp: Stamp,
    /// `/changes` has nothing to flag: the timers to echo (s).
    quiet_timers: Option<(i64, i64)>,
    /// `/command/poll` has nothing to hand out before this time (ms).
    quiet_poll_until: i64,
}

/// The copies, and the last-seen times not yet written.
pub struct Hot {
    db: Db,
    copies: Mutex<HashMap<String, Copy>>,
    seen: Arc<Mutex<HashMap<String, i64>>>,
    flusher: std::sync::Once,
}

impl Hot {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Hot { db, copies: Mutex::default(), seen: Arc::default(), flusher: std::sync::Once::new() }
    }

    /// The stamp to take before reading a device's state from the store.
    pub fn stamp(&self, device: &str) -> Option<Stamp> {
        self.db.news().stamp(device)
    }

    fn current(&self, device: &str) -> Option<Copy> {
        let stamp = self.stamp(device)?;
        self.copies.lock().expect("legacy copies").get(device).copied().filter(|c| c.stamp == stamp)
    }

    /// `/changes` from memory: the timers to echo, when there is nothing to flag.
    pub fn quiet_timers(&self, device: &str, now: i64) -> Option<(i64, i64)> {
        let timers = self.current(device)?.quiet_timers?;
        self.seen(device, now);
        Some(timers)
    }

    /// `/command/poll` from memory: true when there is nothing to hand out.
    pub fn quiet_poll(&self, device: &str, now: i64) -> bool {
        let quiet = self.current(device).is_some_and(|c| now < c.quiet_poll_until);
        if quiet {
            self.seen(device, now);
        }
        quiet
    }

    fn update(&self, device: &str, stamp: Option<Stamp>, f: impl FnOnce(&mut Copy)) {
        let Some(stamp) = stamp else { return };
        let mut copies = self.copies.lock().expect("legacy copies");
        let copy = copies.entry(device.to_owned()).or_insert(Copy {
            stamp,
            quiet_timers: None,
            quiet_poll_until: i64::MIN,
        });
        if copy.stamp != stamp {
            *copy = Copy { stamp, quiet_timers: None, quiet_poll_until: i64::MIN };
        }
        f(copy);
    }

    /// After `/changes` read the store (under `stamp`, taken before): what it
    /// will answer while nothing changes (`None`: it flagged a change).
    pub fn learn_timers(&self, device: &str, stamp: Option<Stamp>, quiet: Option<(i64, i64)>) {
        self.update(device, stamp, |c| c.quiet_timers = quiet);
    }

    /// After `/command/poll` read the store and handed out nothing: quiet
    /// until `until` (ms).
    pub fn learn_poll(&self, device: &str, stamp: Option<Stamp>, until: i64) {
        self.update(device, stamp, |c| c.quiet_poll_until = until);
    }

    /// Records that `device` talked at `now`; written within [`SEEN_FLUSH`].
    pub fn seen(&self, device: &str, now: i64) {
        self.flusher.call_once(|| {
            let (db, seen) = (self.db.clone(), Arc::downgrade(&self.seen));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SEEN_FLUSH).await;
                    let Some(seen) = seen.upgrade() else { return };
                    let batch = std::mem::take(&mut *seen.lock().expect("legacy seen"));
                    if let Err(e) = flush(&db, &batch).await {
                        tracing::warn!(error = %e, devices = batch.len(), "cannot write legacy devices' last-seen times");
                    }
                }
            });
        });
        let mut seen = self.seen.lock().expect("legacy seen");
        let t = seen.entry(device.to_owned()).or_insert(now);
        *t = (*t).max(now);
    }
}

impl Hot {
    /// Writes the last-seen times recorded so far now (the server's stop,
    /// and tests); they are otherwise written within [`SEEN_FLUSH`].
    pub async fn flush_seen(&self) -> crate::db::StoreResult<()> {
        let batch = std::mem::take(&mut *self.seen.lock().expect("legacy seen"));
        flush(&self.db, &batch).await
    }
}

/// Writes last-seen times, never moving one back.
async fn flush(db: &Db, batch: &HashMap<String, i64>) -> crate::db::StoreResult<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut tx = db.write().await?;
    for (name, t) in batch {
        sqlx::query(
            "UPDATE devices SET last_seen_ms = $1 WHERE name = $2 AND (last_seen_ms IS NULL OR last_seen_ms < $1)",
        )
        .bind(*t)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}
