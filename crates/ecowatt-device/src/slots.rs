//! A/B firmware slots on Linux: two files in the state directory
//! (`slot-a.bin`, `slot-b.bin`), behind `ecowatt_core::ota::Slots`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ecowatt_core::ota::{FlashError, Slot, Slots};

/// Two image files.
#[derive(Debug)]
pub struct FileSlots {
    dir: PathBuf,
}

impl FileSlots {
    /// Slots in `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<FileSlots> {
        std::fs::create_dir_all(dir)?;
        Ok(FileSlots { dir: dir.to_path_buf() })
    }

    /// The file of a slot (to run the image in it, for example).
    pub fn path(&self, slot: Slot) -> PathBuf {
        self.dir.join(match slot {
            Slot::A => "slot-a.bin",
            Slot::B => "slot-b.bin",
        })
    }
}

fn err(e: std::io::Error) -> FlashError {
    FlashError(e.to_string())
}

impl Slots for FileSlots {
    fn erase(&mut self, slot: Slot) -> Result<(), FlashError> {
        let f = File::create(self.path(slot)).map_err(err)?;
        f.sync_all().map_err(err)
    }

    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        let mut f = OpenOptions::new().write(true).open(self.path(slot)).map_err(err)?;
        f.seek(SeekFrom::Start(offset)).map_err(err)?;
        f.write_all(data).map_err(err)?;
        // Durable before the progress record that names it.
        f.sync_data().map_err(err)
    }

    fn read(&mut self, slot: Slot, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        let mut f = File::open(self.path(slot)).map_err(err)?;
        f.seek(SeekFrom::Start(offset)).map_err(err)?;
        f.read_exact(buf).map_err(err)
    }
}
