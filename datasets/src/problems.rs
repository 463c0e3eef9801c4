//! Validation problems and the error that lists them as `FILE:LINE: message`.
use std::fmt;
use std::path::{Path, PathBuf};

/// At most this many problems are printed; the total is always given.
pub const SHOWN_PROBLEMS: usize = 50;

/// One thing wrong with the data. `line` is 1-based; `None` for whole-file problems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem found in one file. Displays as one `FILE:LINE: message` line per problem
/// (the first `SHOWN_PROBLEMS`), then the total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl DatasetError {
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        DatasetError { path: path.to_path_buf(), problems: vec![Problem { line: None, message: message.into() }] }
    }

    pub fn total(&self) -> usize {
        self.problems.len()
    }

    /// The problems as `FILE:LINE: message` strings (all of them), e.g. for `--json`.
    pub fn lines(&self) -> Vec<String> {
        self.problems.iter().map(|p| self.format_problem(p)).collect()
    }

    fn format_problem(&self, problem: &Problem) -> String {
        match problem.line {
            Some(line) => format!("{}:{}: {}", self.path.display(), line, problem.message),
            None => format!("{}: {}", self.path.display(), problem.message),
        }
    }
}

impl fmt::Display for DatasetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.problems.iter().take(SHOWN_PROBLEMS) {
            writeln!(f, "{}", self.format_problem(problem))?;
        }
        let total = self.total();
        if total > SHOWN_PROBLEMS {
            writeln!(f, "... {} more not shown", total - SHOWN_PROBLEMS)?;
        }
        write!(f, "{}: {} problem{} found", self.path.display(), total, if total == 1 { "" } else { "s" })
    }
}

impl std::error::Error for DatasetError {}

/// Collects the problems of one line; `parse.rs` appends to it as it walks the JSON.
#[derive(Debug, Default)]
pub(crate) struct LineProblems {
    pub messages: Vec<String>,
}

impl LineProblems {
    pub fn push(&mut self, message: impl Into<String>) {
        self.messages.push(message.into());
    }
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}
