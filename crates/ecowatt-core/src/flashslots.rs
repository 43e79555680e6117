//! The two image slots on raw NOR flash (the ESP32-C3's `ota_0` and
//! `ota_1`), as the [`Slots`] the OTA logic writes through.
//!
//! Images are written front to back ([`crate::ota::Download`] refuses
//! anything else), so a sector is erased when a write first reaches its start:
//! no erase of a whole 1.75 MiB slot stalls the device, and a download resumed
//! after a power cut (at a progress record, which is sector-aligned) erases the
//! sector it resumes in before writing it again. `erase` clears the first
//! sector only, so a cut download never leaves an old image's header in
//! front of new bytes. The last chunk of an image is padded with erased bytes
//! to whole words.

use alloc::format;
use alloc::vec::Vec;

use crate::flashkv::NorFlash;
use crate::ota::{FlashError, Slot, Slots};

/// Slot A and slot B, each a flash region.
pub struct FlashSlots<F> {
    regions: [F; 2],
}

impl<F: NorFlash> FlashSlots<F> {
    /// Slot A on `a`, slot B on `b`.
    pub fn new(a: F, b: F) -> Self {
        FlashSlots { regions: [a, b] }
    }

    fn region(&mut self, slot: Slot) -> &mut F {
        match slot {
            Slot::A => &mut self.regions[0],
            Slot::B => &mut self.regions[1],
        }
    }

    /// The regions back.
    pub fn into_regions(self) -> [F; 2] {
        self.regions
    }
}

fn flash_err(e: crate::kv::KvError) -> FlashError {
    FlashError(e.0)
}

impl<F: NorFlash> Slots for FlashSlots<F> {
    fn erase(&mut self, slot: Slot) -> Result<(), FlashError> {
        self.region(slot).erase(0).map_err(flash_err)
    }

    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        let (sector, word) = (F::SECTOR as u64, F::WORD.max(1) as u64);
        let region = self.region(slot);
        let size = u64::from(region.sectors()) * sector;
        let end = offset + data.len() as u64;
        if end > size {
            return Err(FlashError(format!("{end} bytes do not fit a {size}-byte slot")));
        }
        if offset % word != 0 {
            return Err(FlashError(format!("a write at {offset} is not word-aligned")));
        }
        // Sectors this write is the first to reach.
        let mut s = offset.div_ceil(sector) * sector;
        while s < end {
            region.erase((s / sector) as u32).map_err(flash_err)?;
            s += sector;
        }
        let mut padded = Vec::from(data);
        padded.resize((data.len() as u64).div_ceil(word) as usize * word as usize, 0xFF);
        // One write per sector: flash drivers program within a sector.
        let mut at = 0usize;
        while at < padded.len() {
            let addr = offset + at as u64;
            let room = (sector - addr % sector) as usize;
            let n = room.min(padded.len() - at);
            region.write(addr as u32, &padded[at..at + n]).map_err(flash_err)?;
            at += n;
        }
        Ok(())
    }

    fn read(&mut self, slot: Slot, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        self.region(slot).read(offset as u32, buf).map_err(flash_err)
    }
}
