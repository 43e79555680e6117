//! The SQLite file, looked at before it is opened: a file that is not a
//! database, or is shorter than its own header says, is refused at once with
//! what is wrong (opening it through the pool only said "pool timed out",
//! after 30 s), and a missing or empty file is told apart so that a server
//! whose database vanished does not start again empty.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::StoreError;

/// What is at a SQLite database path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// No file.
    Missing,
    /// A file of 0 bytes (SQLite would make it a new, empty database).
    Empty,
    /// A database whose header and length agree.
    Database,
}

/// The file a `sqlite://PATH?...` URL names.
pub fn path_of(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Looks at the file at `path` (see the module documentation).
pub fn check(path: &Path) -> Result<FileState, StoreError> {
    let unusable = |why: String| StoreError::Unusable(format!("{}: {why}", path.display()));
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileState::Missing),
        Err(e) => return Err(unusable(e.to_string())),
    };
    let len = file.metadata().map_err(|e| unusable(e.to_string()))?.len();
    if len == 0 {
        return Ok(FileState::Empty);
    }
    let mut header = [0u8; 100];
    if len < 100 || file.read_exact(&mut header).is_err() {
        return Err(unusable(format!(
            "{len} bytes, shorter than a SQLite header (100): not a database, or cut short; restore it from a backup"
        )));
    }
    if &header[..16] != b"SQLite format 3\0" {
        return Err(unusable(
            "not a SQLite database (its first bytes are not \"SQLite format 3\"); restore it from a backup"
                .to_owned(),
        ));
    }
    // Page size at 16 (1 means 65536), page count at 28, valid when the
    // "version-valid-for" number at 92 equals the change counter at 24.
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes(header[28..32].try_into().expect("4 bytes")));
    let valid = header[92..96] == header[24..28];
    if valid && pages > 0 && len < pages * page_size {
        return Err(unusable(format!(
            "truncated: its header counts {pages} pages of {page_size} bytes ({} bytes), the file has {len}; restore it from a backup",
            pages * page_size
        )));
    }
    Ok(FileState::Database)
}

/// Writes a consistent copy of the SQLite store at `path` into `out` (a new
/// file) while servers may be using it: `VACUUM INTO` reads one snapshot
/// (write-ahead log included) without blocking writers for long, and the copy
/// is a compact, complete database (no `-wal` file needed). Refuses to
/// overwrite `out`.
pub async fn backup(path: &Path, out: &Path) -> Result<u64, StoreError> {
    use sqlx::ConnectOptions;
    if check(path)? != FileState::Database {
        return Err(StoreError::Unusable(format!("no store at {}", path.display())));
    }
    if out.exists() {
        return Err(StoreError::Conflict(format!("{} exists; choose a new file", out.display())));
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(30))
        .connect()
        .await?;
    let target =
        out.to_str().ok_or_else(|| StoreError::Unusable("the backup path is not UTF-8".into()))?;
    sqlx::query("VACUUM INTO ?").bind(target).execute(&mut conn).await?;
    drop(conn);
    // The copy must be a store this version opens.
    let copied = check(out)?;
    if copied != FileState::Database {
        return Err(StoreError::Unusable(format!(
            "the copy at {} is not a database",
            out.display()
        )));
    }
    std::fs::metadata(out).map(|m| m.len()).map_err(|e| StoreError::Unusable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_files() {
        assert_eq!(path_of("sqlite:///var/lib/e.db?mode=rwc"), Some("/var/lib/e.db".into()));
        assert_eq!(path_of("sqlite://./data/e.db"), Some("./data/e.db".into()));
        assert_eq!(path_of("sqlite::memory:"), None);
        assert_eq!(path_of("postgres://x/y"), None);
    }

    #[test]
    fn garbage_short_and_missing_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        assert_eq!(check(&p).unwrap(), FileState::Missing);
        std::fs::write(&p, b"").unwrap();
        assert_eq!(check(&p).unwrap(), FileState::Empty);
        std::fs::write(&p, [7u8; 4096]).unwrap();
        assert!(check(&p).unwrap_err().to_string().contains("not a SQLite database"));
        std::fs::write(&p, b"SQLite").unwrap();
        assert!(check(&p).unwrap_err().to_string().contains("shorter than a SQLite header"));
    }
}
