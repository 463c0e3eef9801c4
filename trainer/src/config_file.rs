//! `--config FILE` for every flag of a command, not only the shared training options.
//!
//! The shared options ([`TrainOptions`]) merge key by key through serde (`config.rs`), with
//! paths relative to the file. Every other key of the file names one of the command's own
//! flags (dpo's `beta`, grpo's `num_generations`, an evaluator spec, ...): [`expand_argv`]
//! turns those into command-line arguments placed before the user's own, so a flag typed on
//! the command line still wins (the parser lets a later occurrence of a flag override an
//! earlier one). One mechanism for every command: a new flag is configurable without a line
//! here.
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::builder::ValueHint;

use crate::config::TrainOptions;

/// The shared options of a config file, merged under the command line. Here, not in
/// `config.rs`: the file format knows the options, the options know no file format.
impl TrainOptions {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        // The other keys are the command's own flags ([`expand_argv`]).
        let shared = shared_part(read_table(path)?);
        let opts: TrainOptions = toml::Value::Table(shared).try_into().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Relative paths in a config file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { base.join(p) } else { p });
        Ok(TrainOptions { dataset: rel(opts.dataset.clone()), eval_dataset: rel(opts.eval_dataset.clone()), output: rel(opts.output.clone()), ..opts })
    }

    /// The command line over the TOML file of `--config` (when given).
    pub fn with_config_file(self, config: Option<&Path>) -> Result<Self> {
        Ok(match config {
            Some(path) => self.over(Self::from_toml_file(path)?),
            None => self,
        })
    }
}

/// The TOML file as a table, with errors that name the file.
pub fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The keys [`TrainOptions`] reads (every field serialises, `None` as null).
pub fn shared_keys() -> BTreeSet<String> {
    match serde_json::to_value(TrainOptions::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// The file's shared-option keys only (the rest belongs to [`expand_argv`]).
pub fn shared_part(table: toml::Table) -> toml::Table {
    let keys = shared_keys();
    table.into_iter().filter(|(k, _)| keys.contains(k)).collect()
}

/// `argv` with the command-specific keys of `--config FILE` inserted as flags right after the
/// subcommand. `cli` is the program's clap command (to find the subcommand's flags, their
/// kinds and which of them are paths). Unknown keys are an error naming the file.
pub fn expand_argv(cli: &clap::Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(sub_name) = argv.get(1).and_then(|s| s.to_str()) else { return Ok(argv) };
    let Some(sub) = cli.find_subcommand(sub_name) else { return Ok(argv) };
    if !sub.get_arguments().any(|a| a.get_long() == Some("config")) {
        return Ok(argv);
    }
    let Some(path) = config_path(&argv[2..]) else { return Ok(argv) };
    let table = read_table(Path::new(&path))?;
    let base = Path::new(&path).parent().unwrap_or(Path::new(".")).to_path_buf();
    let shared = shared_keys();
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in table {
        if shared.contains(&key) {
            continue;
        }
        let flag = key.replace('_', "-");
        let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(flag.as_str()) || a.get_all_aliases().is_some_and(|al| al.contains(&flag.as_str()))) else {
            bail!("{path}: unknown key `{key}`: `lora-train {sub_name}` has no --{flag}");
        };
        if flag == "config" {
            bail!("{path}: a config file cannot name another config file");
        }
        let takes_value = arg.get_action().takes_values();
        let is_path = matches!(arg.get_value_hint(), ValueHint::AnyPath | ValueHint::FilePath | ValueHint::DirPath);
        let render = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) if is_path && Path::new(s).is_relative() => base.join(s).display().to_string(),
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!("{path}: key `{key}`: expected a string, number or boolean, got {}", other.type_str()),
            })
        };
        match (&value, takes_value) {
            (toml::Value::Boolean(true), false) => extra.push(format!("--{flag}").into()),
            (toml::Value::Boolean(false), false) => {}
            (_, false) => bail!("{path}: key `{key}`: --{flag} is a switch; write `{key} = true` or `false`"),
            (toml::Value::Array(items), true) => {
                let rendered = items.iter().map(render).collect::<Result<Vec<_>>>()?;
                if matches!(arg.get_action(), clap::ArgAction::Append) {
                    extra.extend(rendered.into_iter().map(|v| OsString::from(format!("--{flag}={v}"))));
                } else {
                    extra.push(format!("--{flag}={}", rendered.join(",")).into());
                }
            }
            (v, true) => extra.push(format!("--{flag}={}", render(v)?).into()),
        }
    }
    let mut out = argv[..2].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// The value of `--config X` / `--config=X` among a subcommand's arguments.
fn config_path(args: &[OsString]) -> Option<String> {
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(|s| s.into_owned());
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[derive(clap::Parser, Debug)]
    #[command(args_override_self = true)]
    struct Demo {
        #[command(subcommand)]
        cmd: Sub,
    }
    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Dpo {
            #[command(flatten)]
            options: TrainOptions,
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, default_value_t = 0.1)]
            beta: f64,
            #[arg(long)]
            precompute_ref_logps: bool,
            #[arg(long)]
            adapter: Option<PathBuf>,
            #[arg(long)]
            evaluator: Vec<String>,
        },
    }

    fn expand(toml_text: &str, args: &[&str]) -> Result<Vec<String>> {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, toml_text).unwrap();
        let mut argv: Vec<OsString> = vec!["lora-train".into(), "dpo".into(), "--config".into(), cfg.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let out = expand_argv(&Demo::command(), argv)?;
        Ok(out.into_iter().map(|s| s.to_string_lossy().replace(&dir.path().display().to_string(), "DIR")).collect())
    }

    #[test]
    fn method_keys_become_flags_before_the_users_own() {
        let out = expand("beta = 0.3\nlearning_rate = 1e-4\nprecompute_ref_logps = true\nadapter = \"sft\"\nevaluator = [\"numeric\", \"exact\"]\n", &["--beta", "0.5"]).unwrap();
        assert_eq!(&out[2..7], ["--adapter=DIR/sft", "--beta=0.3", "--evaluator=numeric", "--evaluator=exact", "--precompute-ref-logps"]);
        assert_eq!(&out[out.len() - 2..], ["--beta", "0.5"]);
        // The shared key is left to TrainOptions (merged through serde, paths relative to the file).
        assert!(!out.iter().any(|a| a.contains("learning-rate")));
        use clap::Parser;
        let Sub::Dpo { beta, precompute_ref_logps, evaluator, .. } = Demo::try_parse_from(&out).unwrap().cmd;
        assert_eq!(beta, 0.5, "the command line wins over the file");
        assert!(precompute_ref_logps);
        assert_eq!(evaluator, ["numeric", "exact"]);
    }

    #[test]
    fn unknown_and_mistyped_keys_name_the_file() {
        let err = expand("betta = 0.3\n", &[]).unwrap_err().to_string();
        assert!(err.contains("c.toml") && err.contains("unknown key `betta`"), "{err}");
        let err = expand("precompute_ref_logps = 1\n", &[]).unwrap_err().to_string();
        assert!(err.contains("is a switch"), "{err}");
        let err = expand("beta = { a = 1 }\n", &[]).unwrap_err().to_string();
        assert!(err.contains("expected a string, number or boolean"), "{err}");
        let err = expand("beta = \n", &[]).unwrap_err().to_string();
        assert!(err.contains("c.toml"), "{err}");
    }
}
