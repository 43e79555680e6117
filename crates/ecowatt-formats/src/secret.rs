//! Secrets on disk (tokens, keys): written readable by their owner only.

use std::io::Write;
use std::path::Path;

/// Writes `secret` and a newline to `path`, created (or truncated) with
/// mode 0600 on Unix.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    write_secret_bytes(path, &[secret.as_bytes(), b"\n"].concat())
}

/// Writes `bytes` to `path`, created (or truncated) with mode 0600 on Unix.
pub fn write_secret_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_written_for_their_owner_only() {
        let dir = std::env::temp_dir().join(format!("ecowatt-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "an old, longer secret\n").unwrap();
        super::write_secret(&path, "s3cret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::remove_file(&path);
            super::write_secret(&path, "s3cret").unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
