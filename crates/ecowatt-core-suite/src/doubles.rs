//! Flash and key-value store on one power supply, with the flash's rules, for
//! power-cut tests of the OTA parts and of the whole device machine.

use alloc::vec::Vec;

use alloc::rc::Rc;
use core::cell::Cell;

use ecowatt_core::kv::{KeyValue, KvError};
use ecowatt_core::ota::{FlashError, Slot, Slots};

/// One power supply for flash and key-value store: after `budget` writes of
/// either kind, every write fails.
#[derive(Default)]
pub struct Power {
    writes: Cell<usize>,
    budget: Cell<Option<usize>>,
    failed: Cell<bool>,
    full: Cell<bool>,
}

impl Power {
    pub fn tick(&self) -> Result<(), FlashError> {
        if self.full.get() {
            return Err(FlashError("no space left".into()));
        }
        if self.budget.get().is_some_and(|b| self.writes.get() >= b) {
            self.failed.set(true);
            return Err(FlashError("power cut".into()));
        }
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }

    /// Lets `n` more writes succeed, then fails every write.
    pub fn cut_after(&self, n: usize) {
        self.budget.set(Some(self.writes.get() + n));
    }

    /// Power is back: writes succeed again.
    pub fn restore(&self) {
        self.budget.set(None);
        self.failed.set(false);
    }

    /// The store is full (`true`): every write fails, and the device lives on.
    pub fn set_full(&self, full: bool) {
        self.full.set(full);
    }

    /// A write failed since the last [`Power::restore`].
    pub fn is_cut(&self) -> bool {
        self.failed.get()
    }

    /// Writes that succeeded.
    pub fn writes(&self) -> usize {
        self.writes.get()
    }
}

/// Two slots of NOR flash: erase before write, front-to-back writes, a
/// write only clears bits.
#[derive(Default)]
pub struct Flash {
    pub slots: [Vec<u8>; 2],
    pub erased: [bool; 2],
    pub power: Rc<Power>,
    pub erases: usize,
    /// Every write fails (a worn-out or missing flash chip).
    pub broken: bool,
}

/// The index of `s` in [`Flash::slots`].
pub fn idx(s: Slot) -> usize {
    match s {
        Slot::A => 0,
        Slot::B => 1,
    }
}

impl Slots for Flash {
    fn erase(&mut self, slot: Slot) -> Result<(), FlashError> {
        if self.broken {
            return Err(FlashError("flash error".into()));
        }
        self.power.tick()?;
        self.erases += 1;
        self.slots[idx(slot)].clear();
        self.erased[idx(slot)] = true;
        Ok(())
    }
    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        if self.broken {
            return Err(FlashError("flash error".into()));
        }
        let i = idx(slot);
        assert!(self.erased[i], "write before erase");
        let (at, s) = (offset as usize, &mut self.slots[i]);
        assert!(at <= s.len(), "writes go front to back, without gaps");
        // NOR flash: a write only clears bits. Bytes written before a cut may
        // be written again with the same value; anything else needs an erase.
        for (k, b) in data.iter().enumerate().take(s.len().saturating_sub(at)) {
            assert_eq!(s[at + k] & b, *b, "byte {} rewritten without an erase", at + k);
        }
        self.power.tick()?;
        let overlap = data.len().min(s.len() - at);
        s[at..at + overlap].copy_from_slice(&data[..overlap]);
        s.extend_from_slice(&data[overlap..]);
        Ok(())
    }
    fn read(&mut self, slot: Slot, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        let s = &self.slots[idx(slot)];
        buf.copy_from_slice(&s[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

/// A key-value store on the same power supply as the flash.
pub struct Kv<M> {
    pub inner: M,
    pub power: Rc<Power>,
}

impl<M: KeyValue> KeyValue for Kv<M> {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.power.tick().map_err(|e| KvError(e.0))?;
        self.inner.set(key, value)
    }
    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        self.power.tick().map_err(|e| KvError(e.0))?;
        self.inner.remove(key)
    }
}
