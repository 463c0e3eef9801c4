//! The command-line interface as a reviewed text file, and the rules every command keeps.
//!
//! `cli_snapshot` renders every subcommand's flags (names, short forms, aliases visible and
//! hidden, value names, defaults, help) into `tests/snapshots/cli.txt` and fails with a diff
//! when the interface changed: a change to a flag is a change to that file in the same
//! commit. `UPDATE_CLI_SNAPSHOT=1 cargo test --test all -- cli_snapshot` rewrites it.
//! `one_meaning_per_flag` checks the naming rules the README promises.
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

fn snapshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/cli.txt")
}

/// Every command with its full name (`run sft`, `jobs list`), depth first, in clap's order.
fn walk(cmd: &Command, prefix: &str, out: &mut Vec<(String, Command)>) {
    for sub in cmd.get_subcommands() {
        let name = format!("{prefix} {}", sub.get_name());
        out.push((name.clone(), sub.clone()));
        walk(sub, &name, out);
    }
}

fn commands() -> Vec<(String, Command)> {
    let mut out = Vec::new();
    walk(&lora_train::commands::command(), "lora-train", &mut out);
    out
}

/// The flags of `cmd` (positionals too), without clap's own `--help`/`--version`.
fn flags(cmd: &Command) -> Vec<&Arg> {
    cmd.get_arguments().filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version)).collect()
}

fn render_arg(a: &Arg) -> String {
    let mut s = String::new();
    match (a.get_long(), a.get_short()) {
        (Some(l), Some(c)) => write!(s, "  -{c}, --{l}").unwrap(),
        (Some(l), None) => write!(s, "  --{l}").unwrap(),
        (None, Some(c)) => write!(s, "  -{c}").unwrap(),
        (None, None) => write!(s, "  <{}>", a.get_id()).unwrap(),
    }
    let takes_value = a.get_num_args().is_some_and(|n| n.takes_values()) || matches!(a.get_action(), ArgAction::Set | ArgAction::Append);
    if takes_value && a.get_long().is_some() {
        let names: Vec<String> = a.get_value_names().map(|v| v.iter().map(|n| n.to_string()).collect()).unwrap_or_else(|| vec![a.get_id().to_string().to_uppercase()]);
        write!(s, " <{}>", names.join(" ")).unwrap();
    }
    if matches!(a.get_action(), ArgAction::Append) {
        s.push_str(" (repeatable)");
    }
    if let Some(d) = a.get_value_delimiter() {
        write!(s, " (delimiter '{d}')").unwrap();
    }
    let visible: Vec<&str> = a.get_visible_aliases().unwrap_or_default();
    let all: Vec<&str> = a.get_all_aliases().unwrap_or_default();
    let hidden: Vec<&&str> = all.iter().filter(|x| !visible.contains(x)).collect();
    if !visible.is_empty() {
        write!(s, " [alias: {}]", visible.iter().map(|x| format!("--{x}")).collect::<Vec<_>>().join(", ")).unwrap();
    }
    if !hidden.is_empty() {
        write!(s, " [hidden alias: {}]", hidden.iter().map(|x| format!("--{x}")).collect::<Vec<_>>().join(", ")).unwrap();
    }
    let defaults: Vec<String> = a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    if !defaults.is_empty() {
        write!(s, " [default: {}]", defaults.join(",")).unwrap();
    }
    let possible: Vec<String> = a.get_possible_values().iter().filter(|p| !p.is_hide_set()).map(|p| p.get_name().to_string()).collect();
    if !possible.is_empty() && !matches!(a.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        write!(s, " [values: {}]", possible.join(", ")).unwrap();
    }
    if a.is_required_set() {
        s.push_str(" (required)");
    }
    if a.is_hide_set() {
        s.push_str(" (hidden)");
    }
    if let Some(h) = a.get_help_heading() {
        write!(s, " {{{h}}}").unwrap();
    }
    s.push('\n');
    let help = a.get_long_help().or(a.get_help()).map(|h| h.to_string()).unwrap_or_default();
    for line in help.lines() {
        writeln!(s, "      {}", line.trim_end()).unwrap();
    }
    s
}

fn render() -> String {
    let mut out = String::from("# Every flag of every lora-train command (tests/all/cli_flags.rs).\n# Regenerate: UPDATE_CLI_SNAPSHOT=1 cargo test --workspace --test all -- cli_snapshot\n");
    for (name, cmd) in commands() {
        write!(out, "\n## {name}{}\n", if cmd.is_hide_set() { " (hidden)" } else { "" }).unwrap();
        for a in flags(&cmd) {
            out.push_str(&render_arg(a));
        }
    }
    out
}

/// The lines that differ, numbered, old (`-`) then new (`+`), as a reviewer reads them.
fn diff(old: &str, new: &str) -> String {
    let (o, n): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    // Skip the common head and tail; what is left is the change.
    let head = o.iter().zip(&n).take_while(|(a, b)| a == b).count();
    let tail = o[head..].iter().rev().zip(n[head..].iter().rev()).take_while(|(a, b)| a == b).count();
    let mut d = String::new();
    for (i, l) in o[head..o.len() - tail].iter().enumerate() {
        writeln!(d, "-{:>5} {l}", head + i + 1).unwrap();
    }
    for (i, l) in n[head..n.len() - tail].iter().enumerate() {
        writeln!(d, "+{:>5} {l}", head + i + 1).unwrap();
    }
    d
}

#[test]
fn cli_snapshot() {
    let now = render();
    let path = snapshot_path();
    if std::env::var_os("UPDATE_CLI_SNAPSHOT").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &now).unwrap();
        return;
    }
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        before == now,
        "the command-line interface changed; review the diff below and, if intended, rerun with UPDATE_CLI_SNAPSHOT=1 to update {}:\n{}",
        path.display(),
        diff(&before, &now)
    );
}

/// Names a flag answers to that a user sees in `--help`: its long name and visible aliases.
fn visible_names(a: &Arg) -> Vec<String> {
    if a.is_hide_set() {
        return Vec::new();
    }
    a.get_long().into_iter().chain(a.get_visible_aliases().unwrap_or_default()).map(str::to_string).collect()
}

fn all_names(a: &Arg) -> Vec<String> {
    a.get_long().into_iter().chain(a.get_all_aliases().unwrap_or_default()).map(str::to_string).collect()
}

#[test]
fn one_meaning_per_flag() {
    let mut problems = Vec::new();
    let mut adapter_help: Vec<(String, String)> = Vec::new();
    for (name, cmd) in commands() {
        let args = flags(&cmd);
        let find = |long: &str| args.iter().find(|a| all_names(a).iter().any(|n| n == long)).copied();
        // `-o` wherever `--output` is.
        if let Some(a) = find("output") {
            if a.get_short() != Some('o') {
                problems.push(format!("{name}: --output has no -o"));
            }
        }
        // One spelling for devices: `--device` (a list where the command uses several);
        // `--devices` only as a hidden alias kept for one release.
        let visible: Vec<String> = args.iter().flat_map(|a| visible_names(a)).collect();
        if visible.iter().any(|n| n == "devices") {
            problems.push(format!("{name}: --devices is visible (the flag is --device)"));
        }
        // `--adapter` is the adapter applied to --model (eval, generate, compare, export,
        // merge, serve); the adapter a training run starts from is `--init-adapter`.
        if let Some(a) = args.iter().find(|a| a.get_long() == Some("adapter")) {
            adapter_help.push((name.clone(), a.get_help().map(|h| h.to_string()).unwrap_or_default()));
        }
        if let Some(a) = find("init-adapter") {
            if a.get_long() != Some("init-adapter") || !a.get_visible_aliases().unwrap_or_default().is_empty() {
                problems.push(format!("{name}: --init-adapter must be the flag's own name, with no visible alias"));
            }
        }
        // The reference side has one name: --ref-adapter.
        if visible.iter().any(|n| n == "baseline-adapter") {
            problems.push(format!("{name}: --baseline-adapter is visible (the flag is --ref-adapter)"));
        }
        // `--max-length` is TRL's max_length everywhere: the most tokens of one sequence, a
        // pair's prompt + completion. It is its own flag where it can differ from
        // --max-sequence-length (dpo, orpo), a hidden spelling of it elsewhere.
        if let Some(a) = find("max-length") {
            let own = a.get_long() == Some("max-length");
            let alias_of_seq = a.get_long() == Some("max-sequence-length") && !a.get_visible_aliases().unwrap_or_default().contains(&"max-length");
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if !(own && help.contains("prompt + completion") || alias_of_seq) {
                problems.push(format!("{name}: --max-length is neither the prompt + completion cap nor a hidden alias of --max-sequence-length"));
            }
        }
        // No two flags of a command answer to the same name.
        let mut seen = std::collections::BTreeSet::new();
        for n in args.iter().flat_map(|a| all_names(a)) {
            if !seen.insert(n.clone()) {
                problems.push(format!("{name}: --{n} names two flags"));
            }
        }
    }
    // Every command's --adapter is the adapter used on --model (applied, folded in, merged,
    // served), never the one a training run starts from.
    for (name, help) in &adapter_help {
        let h = help.to_lowercase();
        let used = ["apply", "fold", "merged", "serve"].iter().any(|w| h.contains(w));
        if !used || h.contains("start from") || h.contains("initial") {
            problems.push(format!("{name}: --adapter does not read as the adapter used on --model: {help}"));
        }
    }
    assert!(adapter_help.len() >= 6, "--adapter found in too few commands: {adapter_help:?}");
    // The reference side is --ref-adapter in both commands that have one.
    for name in ["lora-train eval", "lora-train compare"] {
        let cmd = commands().into_iter().find(|(n, _)| n == name).map(|(_, c)| c).unwrap();
        if !cmd.get_arguments().any(|a| a.get_long() == Some("ref-adapter")) {
            problems.push(format!("{name}: no --ref-adapter"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The old spellings still parse (hidden aliases kept for one release).
#[test]
fn old_flag_names_still_parse() {
    let parse = |argv: &[&str]| lora_train::commands::command().try_get_matches_from(argv).map(|_| ()).map_err(|e| e.to_string());
    for argv in [
        &["lora-train", "sweep", "--model", "m", "--dataset", "d", "-o", "o", "--device", "cpu"][..],
        &["lora-train", "run", "sft", "--model", "m", "--dataset", "d", "-o", "o", "--device", "cpu"],
        &["lora-train", "dpo", "--model", "m", "--dataset", "d", "-o", "o", "--adapter", "a"],
        &["lora-train", "orpo", "--model", "m", "--dataset", "d", "-o", "o", "--adapter", "a"],
        &["lora-train", "compare", "--model", "m", "--adapter", "a", "--dataset", "d", "--output", "o", "--baseline-adapter", "b", "--evaluator", "json"],
        &["lora-train", "eval", "--model", "m", "--dataset", "d", "--max-length", "64"],
        &["lora-train", "inspect", "--dataset", "d", "--max-length", "64"],
        &["lora-train", "run", "classify", "--model", "m", "--dataset", "d", "-o", "o", "--split", "0.3"],
    ] {
        assert!(parse(argv).is_ok(), "{argv:?}: {:?}", parse(argv));
    }
}
