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
    let (dir, tmp) = write_temporary(path, bytes)?;
    let renamed = fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()));
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    sync_dir(dir)
}

/// As [`write_atomic`], but `path` must not exist: the whole file appears under its name
/// or nothing does, and an existing file (even one created a moment ago by another
/// process) is never replaced. A hard link, unlike a rename, fails when the name is taken.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.exists() {
        anyhow::bail!("{}: already exists (never overwritten)", path.display());
    }
    let (dir, tmp) = write_temporary(path, bytes)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!("{}: already exists (never overwritten)", path.display()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// The bytes in a fsynced temporary file next to `path`: same directory (rename and link
/// work only within one file system); pid + counter keep concurrent writers (processes or
/// threads) off each other's temporary file. Creates the directory if needed.
fn write_temporary<'a>(path: &'a Path, bytes: &[u8]) -> Result<(&'a Path, std::path::PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{}: path has no file name", path.display()))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let written = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    Ok((dir, tmp))
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
    fn write_new_never_replaces_a_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("pairs.jsonl");
        write_new(&p, b"first")?;
        let err = write_new(&p, b"second").unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(fs::read(&p)?, b"first");
        assert_eq!(fs::read_dir(dir.path())?.count(), 1, "no temporary left behind");
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
