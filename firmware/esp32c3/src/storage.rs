//! Flash drivers: partitions as the core's `NorFlash` regions (the key-value
//! store's, and the two OTA slots' under the core's `FlashSlots`), and the
//! boot decision handed to the ESP-IDF bootloader through `otadata`.
//!
//! One `FlashStorage` (esp-storage) is shared by all of them; the chip has one
//! core and the device machine calls one driver at a time.

use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;

use ecowatt_core::flashkv::NorFlash;
use ecowatt_core::kv::KvError;
use ecowatt_core::ota::Slot;
use embedded_storage::nor_flash::{NorFlash as _, ReadNorFlash as _};
use esp_bootloader_esp_idf::ota_updater::OtaUpdater;
use esp_bootloader_esp_idf::partitions::{self, AppPartitionSubType, PartitionType};
use esp_storage::FlashStorage;

/// The flash, shared.
pub type Flash = Rc<RefCell<FlashStorage<'static>>>;

const SECTOR: u32 = 4096;

/// Where a partition is.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    /// Offset in flash.
    pub offset: u32,
    /// Size.
    pub len: u32,
}

/// The partitions the firmware uses, found in the partition table.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The key-value store (data, undefined, label `ewkv`).
    pub kv: Place,
    /// Provisioning (data, undefined, label `provision`).
    pub provision: Place,
    /// `ota_0` (slot A) and `ota_1` (slot B).
    pub slots: [Place; 2],
    /// The slot the bootloader started.
    pub running: Option<Slot>,
}

/// Reads the partition table.
pub fn layout(flash: &Flash) -> Result<Layout, String> {
    let mut f = flash.borrow_mut();
    let mut buf = [0u8; partitions::PARTITION_TABLE_MAX_LEN];
    let pt = partitions::read_partition_table(&mut *f, &mut buf).map_err(|e| format_err(&e))?;
    let (mut kv, mut provision, mut slots) = (None, None, [None, None]);
    for p in pt.iter() {
        let place = Place { offset: p.offset(), len: p.len() };
        match (p.raw_type(), p.raw_subtype(), p.label_as_str()) {
            (1, 0x06, "ewkv") => kv = Some(place),
            (1, 0x06, "provision") => provision = Some(place),
            (0, 0x10, _) => slots[0] = Some(place),
            (0, 0x11, _) => slots[1] = Some(place),
            _ => {}
        }
    }
    let running = pt.booted_partition().ok().flatten().and_then(|p| match p.partition_type() {
        PartitionType::App(AppPartitionSubType::Ota0) => Some(Slot::A),
        PartitionType::App(AppPartitionSubType::Ota1) => Some(Slot::B),
        _ => None,
    });
    let missing = |what: &str| String::from("the partition table has no ") + what;
    Ok(Layout {
        kv: kv.ok_or_else(|| missing("key-value partition (data, undefined, ewkv)"))?,
        provision: provision
            .ok_or_else(|| missing("provisioning partition (data, undefined, provision)"))?,
        slots: [
            slots[0].ok_or_else(|| missing("ota_0"))?,
            slots[1].ok_or_else(|| missing("ota_1"))?,
        ],
        running,
    })
}

fn format_err(e: &impl core::fmt::Debug) -> String {
    alloc::format!("{e:?}")
}

/// Reads the first `max` bytes of a partition (provisioning is a few
/// hundred bytes at its start; the rest of its 64 KiB is erased).
pub fn read(flash: &Flash, place: Place, max: u32) -> Result<alloc::vec::Vec<u8>, String> {
    let mut buf = alloc::vec![0u8; place.len.min(max) as usize];
    flash.borrow_mut().read(place.offset, &mut buf).map_err(|e| format_err(&e))?;
    Ok(buf)
}

/// A partition as the core's `NorFlash` (addresses relative to it).
pub struct Region {
    flash: Flash,
    place: Place,
}

impl Region {
    /// The region at `place`.
    pub fn new(flash: Flash, place: Place) -> Self {
        Region { flash, place }
    }
}

fn kv_err(e: impl core::fmt::Debug) -> KvError {
    KvError(format_err(&e))
}

impl NorFlash for Region {
    const WORD: usize = 4;
    const SECTOR: usize = SECTOR as usize;

    fn sectors(&self) -> u32 {
        self.place.len / SECTOR
    }

    fn read(&mut self, addr: u32, buf: &mut [u8]) -> Result<(), KvError> {
        self.flash.borrow_mut().read(self.place.offset + addr, buf).map_err(kv_err)
    }

    fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), KvError> {
        self.flash.borrow_mut().write(self.place.offset + addr, data).map_err(kv_err)
    }

    fn erase(&mut self, index: u32) -> Result<(), KvError> {
        let from = self.place.offset + index * SECTOR;
        self.flash.borrow_mut().erase(from, from + SECTOR).map_err(kv_err)
    }
}

/// Makes `otadata` name `slot`, as the core decided; `true` if it changed
/// (the device must restart for the bootloader to follow).
pub fn select(flash: &Flash, slot: Slot) -> Result<bool, String> {
    let mut f = flash.borrow_mut();
    let mut buf = [0u8; partitions::PARTITION_TABLE_MAX_LEN];
    let mut ota = OtaUpdater::new(&mut *f, &mut buf).map_err(|e| format_err(&e))?;
    let want = match slot {
        Slot::A => AppPartitionSubType::Ota0,
        Slot::B => AppPartitionSubType::Ota1,
    };
    if ota.selected_partition().map_err(|e| format_err(&e))? == want {
        return Ok(false);
    }
    ota.activate_next_partition().map_err(|e| format_err(&e))?;
    Ok(true)
}
