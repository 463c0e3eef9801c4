//! Phase `approval` (and the promotion gate's confirm): one question on a terminal,
//! `--yes` in scripts. Without a terminal and without `--yes` the workflow stops with
//! exit status 3 (`AwaitingApproval`), having written what the person has to read; rerunning with
//! `--resume --yes` continues after the gate.
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{AwaitingApproval, Workflow};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Approval {
    /// `--yes` or `terminal`.
    pub by: String,
    pub at_unix: f64,
}

/// Approves `what` (shown in `file`) or stops the workflow.
pub fn require(wf: &Workflow, what: &str, file: &Path) -> Result<Approval> {
    let approved = |by: &str| Approval { by: by.into(), at_unix: super::now_unix() };
    if wf.yes {
        return Ok(approved("--yes"));
    }
    if super::interactive() {
        if super::ask(&format!("Approve the {what} ({})?", file.display()))? {
            return Ok(approved("terminal"));
        }
        return Err(AwaitingApproval(format!("the {what} was not approved; nothing after it ran. Continue later with the same command and --resume (--yes to approve)")).into());
    }
    Err(AwaitingApproval(format!(
        "the {what} needs an approval: no terminal and no --yes. Read {}, then continue with the same command plus --resume --yes",
        file.display()
    ))
    .into())
}
