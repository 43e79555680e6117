//! Devices' keys, kept in memory.
//!
//! Every device request needs its device's key before anything else, and a
//! key changes only when an operator rotates it: reading it from the database
//! every time was the most frequent query of a fleet (one per request, ~2,200
//! per second for 10,000 devices). The copy here can be stale in only one way
//! that matters, a rotation made by another server process, and that is
//! caught where it counts: the transaction that admits a message checks the
//! key version against the device's row ([`super::SyncRefusal::StaleKey`]).
//! A version the copy does not hold is read again, and this process forgets
//! a device's entry when it rotates its key or deletes it.
//!
//! Every device's keys are loaded when the store opens, so the copy is
//! *complete*: a device id it does not hold is unknown, answered without a
//! read (an unknown id then costs what a bad tag costs, and ids cannot be
//! probed by timing; a flood of made-up ids costs the database nothing). On
//! SQLite one process owns the store, so the copy stays complete. On
//! PostgreSQL other servers add, rotate and remove devices too: they
//! announce it (`NOTIFY ecowatt_keys`), and the copy counts as complete only
//! while this process is listening; between a lost connection and the
//! reload after the next one, a miss is read from the database.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::DeviceCrypto;

/// The PostgreSQL channel on which a server announces that a device's keys
/// changed (payload: the device id).
pub const CHANNEL: &str = "ecowatt_keys";

/// At most this many devices' keys are kept; past it the map starts over
/// (a fleet this size would be served by several processes anyway).
const MAX_ENTRIES: usize = 1_000_000;

/// Device id → keys.
#[derive(Default)]
pub struct KeyCache {
    map: Mutex<HashMap<i64, DeviceCrypto>>,
    complete: AtomicBool,
}

impl KeyCache {
    /// Replaces the whole copy with `all` devices' keys; it is then complete
    /// if `complete` (see the module documentation).
    pub fn load(&self, all: Vec<DeviceCrypto>, complete: bool) {
        let mut map = self.lock();
        map.clear();
        if all.len() <= MAX_ENTRIES {
            map.extend(all.into_iter().map(|c| (c.id, c)));
            self.complete.store(complete, Ordering::SeqCst);
        } else {
            self.complete.store(false, Ordering::SeqCst);
        }
    }

    /// Whether a device id missing from the copy is unknown.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    /// The copy may miss changes from now on (another server's announcements
    /// are not being heard).
    pub fn set_incomplete(&self) {
        self.complete.store(false, Ordering::SeqCst);
    }

    /// The keys kept for `device_id`.
    pub fn get(&self, device_id: i64) -> Option<DeviceCrypto> {
        self.lock().get(&device_id).cloned()
    }

    /// Keeps `crypto` (replacing what was kept for its device).
    pub fn put(&self, crypto: DeviceCrypto) {
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES && !map.contains_key(&crypto.id) {
            map.clear();
            self.complete.store(false, Ordering::SeqCst);
        }
        map.insert(crypto.id, crypto);
    }

    /// Drops what is kept for `device_id`.
    pub fn forget(&self, device_id: i64) {
        self.lock().remove(&device_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, DeviceCrypto>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
