//! The key-value store on Linux: one file per key in a directory, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so
//! a power cut leaves the old or the new value.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ecowatt_core::kv::{KeyValue, KvError};

/// A directory of small files.
#[derive(Debug)]
pub struct FileKv {
    dir: PathBuf,
}

impl FileKv {
    /// Opens (creating) the directory.
    pub fn open(dir: &Path) -> std::io::Result<FileKv> {
        fs::create_dir_all(dir)?;
        Ok(FileKv { dir: dir.to_path_buf() })
    }

    fn path(&self, key: &str) -> PathBuf {
        let name: String = key
            .chars()
            .map(
                |c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' },
            )
            .collect();
        self.dir.join(name)
    }
}

fn err(e: std::io::Error) -> KvError {
    KvError(e.to_string())
}

impl KeyValue for FileKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match fs::read(self.path(key)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(value).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err)
    }

    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}
