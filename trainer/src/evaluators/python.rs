//! `py:FILE.py[:FUNCTION]`: a `cmd:` evaluator whose process is the shipped shim
//! (`py_shim.py`, compiled into the binary and passed with `python3 -c`, so there is no
//! file to install or clean up) serving FUNCTION from FILE.
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use super::pool::Launch;

const SHIM: &str = include_str!("py_shim.py");

/// The interpreter: `LORA_TRAIN_PYTHON` (for a virtual environment), else `python3`.
fn python() -> String {
    std::env::var("LORA_TRAIN_PYTHON").ok().filter(|p| !p.trim().is_empty()).unwrap_or_else(|| "python3".into())
}

/// Checks that FILE imports and has FUNCTION (one short run of the shim), so a typo is
/// an error now rather than every sample failing later.
pub(crate) fn launch(file: &Path, function: &str) -> Result<Launch> {
    if !file.is_file() {
        bail!("no Python file {}", file.display());
    }
    let python = python();
    let path = file.to_string_lossy().into_owned();
    let args = vec!["-u".to_string(), "-c".to_string(), SHIM.to_string(), path, function.to_string()];
    let check = Command::new(&python)
        .args(&args)
        .arg("--check")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {python} (set LORA_TRAIN_PYTHON to choose the interpreter)"))?;
    if !check.status.success() {
        let stderr = String::from_utf8_lossy(&check.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        bail!("{python} could not load `{function}` from {}: {last}", file.display());
    }
    Ok(Launch { program: python, args })
}
