//! Output files that are never overwritten (`pairs`): a directory gets a new,
//! time-stamped file inside it; a file path must be free, and so must its sidecar.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The file to write for `--output PATH`: inside PATH when it is a directory (or ends
/// with a separator), `{stem}-YYYYMMDD-HHMMSS.{ext}` in UTC, with `-2`, `-3`, ... when two
/// runs land in the same second; otherwise PATH itself, which must not exist. `sidecar`
/// is the suffix of a companion file that must be free too.
pub fn fresh_path(path: &Path, stem: &str, ext: &str, sidecar: &str) -> Result<PathBuf> {
    let as_dir = path.is_dir() || path.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR);
    if !as_dir {
        for p in [path.to_path_buf(), with_suffix(path, sidecar)] {
            if p.exists() {
                bail!("{}: already exists (never overwritten; give a new file or a directory)", p.display());
            }
        }
        return Ok(path.to_path_buf());
    }
    let stamp = lora_datasets::strftime("%Y%m%d-%H%M%S", lora_datasets::unix_now());
    for n in 1.. {
        let name = if n == 1 { format!("{stem}-{stamp}.{ext}") } else { format!("{stem}-{stamp}-{n}.{ext}") };
        let candidate = path.join(name);
        if !candidate.exists() && !with_suffix(&candidate, sidecar).exists() {
            return Ok(candidate);
        }
    }
    unreachable!("an unbounded range always yields a free name")
}

/// `path` with `suffix` appended to its file name (`pairs.jsonl` -> `pairs.jsonl.provenance.json`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_a_directory_are_fresh_and_files_are_never_taken() {
        let dir = tempfile::tempdir().unwrap();
        let a = fresh_path(dir.path(), "pairs", "jsonl", ".provenance.json").unwrap();
        assert_eq!(a.parent().unwrap(), dir.path());
        let name = a.file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("pairs-20") && name.ends_with(".jsonl"), "{name}");
        std::fs::write(&a, "").unwrap();
        let b = fresh_path(dir.path(), "pairs", "jsonl", ".provenance.json").unwrap();
        assert_ne!(a, b);
        assert!(fresh_path(&a, "pairs", "jsonl", ".provenance.json").is_err());
        let c = dir.path().join("c.jsonl");
        std::fs::write(with_suffix(&c, ".provenance.json"), "{}").unwrap();
        assert!(fresh_path(&c, "pairs", "jsonl", ".provenance.json").is_err(), "a taken sidecar blocks too");
    }
}
