//! Durable file writes shared by every crate that writes run outputs.
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Write `bytes` to `path` so that a reader (or a run killed at any moment) sees either
/// the old file or the whole new one, never a half-written one: write a temporary file
/// in the same directory, fsync it, rename it over `path`, then fsync the directory so
/// the rename itself survives a crash. Creates the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{}: path has no file name", path.display()))?.to_string_lossy();
    // Same directory (rename is atomic only within one file system); pid + counter keep
    // concurrent writers (processes or threads) off each other's temporary file.
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let written = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// fsync a directory, making renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // Only Unix lets a directory be opened and fsynced; elsewhere rename is all we have.
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("{}: cannot fsync directory", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_whole_file_and_leaves_no_temporary() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("sub/run.json");
        write_atomic(&p, b"{\"a\":1}")?;
        write_atomic(&p, b"{}")?;
        assert_eq!(fs::read(&p)?, b"{}");
        assert_eq!(fs::read_dir(dir.path().join("sub"))?.count(), 1);
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // The target is a non-empty directory: the rename fails after the data was written.
        let p = dir.path().join("taken");
        fs::create_dir_all(p.join("inside"))?;
        assert!(write_atomic(&p, b"x").is_err());
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }
}
