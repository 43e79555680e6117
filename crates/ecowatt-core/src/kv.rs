//! The device's key-value store (on ESP32: NVS; on Linux: files), behind a
//! trait, and an in-memory double that can fail after N writes, so that
//! power-loss tests can cut power at every write.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a key-value operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError(pub String);

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key-value store: {}", self.0)
    }
}

impl core::error::Error for KvError {}

/// Durable small values by key. `set` returns only once the value is durable.
pub trait KeyValue {
    /// The value at `key`, if any.
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Stores `value` at `key`, atomically: after a power cut the old or the new value is there.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError>;
    /// Removes `key` (nothing happens if it is absent). A store that cannot
    /// delete keeps an empty value, which every reader here treats as absent.
    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        self.set(key, &[])
    }
}

impl<T: KeyValue + ?Sized> KeyValue for &mut T {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        (**self).get(key)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        (**self).set(key, value)
    }
    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        (**self).remove(key)
    }
}

/// An in-memory store; with [`MemoryKv::fail_after`] every write past the
/// budget fails, as if power were cut just before it.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    values: BTreeMap<String, Vec<u8>>,
    writes: usize,
    budget: Option<usize>,
}

impl MemoryKv {
    /// An empty store that never fails.
    pub fn new() -> Self {
        MemoryKv::default()
    }

    /// Lets `n` more writes succeed, then fails every write.
    pub fn fail_after(&mut self, n: usize) {
        self.budget = Some(self.writes + n);
    }

    /// Writes never fail again ("power restored").
    pub fn heal(&mut self) {
        self.budget = None;
    }

    /// Writes that succeeded so far.
    pub fn writes(&self) -> usize {
        self.writes
    }
}

impl KeyValue for MemoryKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.values.get(key).cloned())
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        if self.budget.is_some_and(|b| self.writes >= b) {
            return Err(KvError(String::from("write failed (power cut)")));
        }
        // A key written again (a sample log's slot) keeps its allocations:
        // the fleet bench's 10,000 devices write about 100,000 a second.
        match self.values.get_mut(key) {
            Some(stored) => {
                stored.clear();
                stored.extend_from_slice(value);
            }
            None => {
                self.values.insert(String::from(key), value.to_vec());
            }
        }
        self.writes += 1;
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        if self.budget.is_some_and(|b| self.writes >= b) {
            return Err(KvError(String::from("write failed (power cut)")));
        }
        self.values.remove(key);
        self.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_written_again_replaces_the_old_one_whatever_its_length() {
        let mut kv = MemoryKv::new();
        kv.set("slot/1", b"a longer first value").unwrap();
        kv.set("slot/1", b"short").unwrap();
        assert_eq!(kv.get("slot/1").unwrap().as_deref(), Some(&b"short"[..]));
        kv.set("slot/1", b"longer again than that").unwrap();
        assert_eq!(kv.get("slot/1").unwrap().as_deref(), Some(&b"longer again than that"[..]));
        kv.set("slot/1", b"").unwrap();
        assert_eq!(kv.get("slot/1").unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(kv.writes(), 4);
        // A power cut fails the write and leaves the value as it was.
        kv.fail_after(0);
        assert!(kv.set("slot/1", b"lost").is_err());
        assert_eq!(kv.get("slot/1").unwrap().as_deref(), Some(&b""[..]));
    }
}
