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

use std::collections::HashMap;
use std::sync::Mutex;

use super::DeviceCrypto;

/// At most this many devices' keys are kept; past it the map starts over
/// (a fleet this size would be served by several processes anyway).
const MAX_ENTRIES: usize = 1_000_000;

/// Device id → keys.
#[derive(Default)]
pub struct KeyCache {
    map: Mutex<HashMap<i64, DeviceCrypto>>,
}

impl KeyCache {
    /// The keys kept for `device_id`.
    pub fn get(&self, device_id: i64) -> Option<DeviceCrypto> {
        self.lock().get(&device_id).cloned()
    }

    /// Keeps `crypto` (replacing what was kept for its device).
    pub fn put(&self, crypto: DeviceCrypto) {
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES && !map.contains_key(&crypto.id) {
            map.clear();
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
