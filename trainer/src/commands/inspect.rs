//! `lora-train inspect`: validate a dataset and print its statistics (format, counts,
//! duplicates, token lengths with a model's tokenizer, label balance).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use lora_datasets::{compute_stats, load_dataset, DatasetStats, Format, StatsOptions};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// JSONL dataset to check (chat, preference or prompts; see the README).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Model whose tokenizer and chat template give token statistics: a Hugging Face
    /// model directory, a .gguf file, or a hub id.
    #[arg(long)]
    pub model: Option<String>,
    /// Validate as this format instead of detecting it: chat, preference or prompts.
    #[arg(long)]
    pub format: Option<Format>,
    /// Count sequences longer than this many tokens (they would be truncated in training;
    /// for preference pairs, the `--max-length` of dpo/orpo, which is the same flag here).
    #[arg(long, alias = "max-length", default_value_t = 2048)]
    pub max_sequence_length: usize,
    /// Preference pairs: count prompts longer than this (dpo/orpo keep their end).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Flag labelled data whose most/least frequent label ratio exceeds this.
    #[arg(long, default_value_t = 50.0)]
    pub imbalance_threshold: f64,
    /// Print one JSON object on stdout (also when the data is invalid; exit code 1 then).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let dataset = match load_dataset(&args.dataset, args.format) {
        Ok(dataset) => dataset,
        Err(err) => {
            if args.json {
                let report = json!({
                    "path": args.dataset.display().to_string(),
                    "valid": false,
                    "total_problems": err.total(),
                    // Capped so a wholly broken file still gives a manageable object; total_problems counts all.
                    "problems": err.lines().into_iter().take(1000).collect::<Vec<_>>(),
                });
                println!("{report}");
            }
            // main prints the error (every problem as FILE:LINE, capped) on stderr.
            return Err(anyhow::anyhow!("{err}"));
        }
    };
    let options = StatsOptions {
        max_seq_len: args.max_sequence_length,
        imbalance_threshold: args.imbalance_threshold,
        max_prompt_length: args.max_prompt_length,
    };
    let stats = match &args.model {
        Some(model) => {
            let bundle = lora_models::load_tokenizer_bundle(model).with_context(|| format!("loading the tokenizer of {model}"))?;
            let template = crate::chat::template_for(&bundle)?;
            compute_stats(&dataset, Some((&bundle.tokenizer, &template)), &options)
        }
        None => compute_stats(&dataset, None, &options),
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    if args.json {
        let mut report = serde_json::to_value(&stats)?;
        report["valid"] = json!(true);
        report["elapsed_s"] = json!(elapsed_s);
        println!("{report}");
    } else {
        print!("{}", human_report(&stats));
        eprintln!("inspected in {elapsed_s:.2}s");
    }
    Ok(())
}

fn human_report(stats: &DatasetStats) -> String {
    let mut out = format!("{}: {} dataset, {} samples, valid\n", stats.path, stats.format, stats.samples);
    let roles: Vec<String> = stats.role_counts.iter().map(|(role, n)| format!("{} {n}", role.as_str())).collect();
    out += &format!("messages    {}\n", roles.join(", "));
    out += &format!("duplicates  {}", stats.duplicates);
    if let Some((line, first)) = stats.duplicate_examples.first() {
        out += &format!(" (e.g. line {line} repeats line {first})");
    }
    out.push('\n');
    if let Some(t) = &stats.tokens {
        out += &format!(
            "tokens      {} sequences: min {}, mean {:.1}, p50 {}, p95 {}, max {}; total {}, loss tokens {}\n",
            t.sequences, t.min, t.mean, t.p50, t.p95, t.max, t.total, t.loss_tokens
        );
        out += &format!("            {} longer than {} (--max-sequence-length)\n", t.over_max_length, t.max_seq_len);
        for (line, reason) in t.failed.iter().take(5) {
            out += &format!("            line {line}: {reason}\n");
        }
    }
    if stats.format == Format::Preference {
        out += &format!("identical   {} pair(s) with the same chosen and rejected outputs\n", stats.identical_pairs);
    }
    if let Some(p) = &stats.pairs {
        let len = |l: &lora_datasets::pairs::LengthSummary| format!("min {}, mean {:.1}, max {}", l.min, l.mean, l.max);
        out += &format!("pairs       prompt {}\n            chosen {}\n            rejected {}\n", len(&p.prompt), len(&p.chosen), len(&p.rejected));
        out += &format!(
            "            at --max-prompt-length {} / --max-length {}: {} prompt(s) cut at the start, {} completion(s) cut at the end, {} pair(s) dropped\n",
            p.limits.max_prompt_length.map_or("-".to_string(), |v| v.to_string()),
            p.limits.max_length,
            p.truncation.prompts_truncated,
            p.truncation.completions_truncated,
            p.truncation.dropped.len()
        );
    }
    if let Some(l) = &stats.labels {
        let shown: Vec<String> = l.counts.iter().take(10).map(|(label, n)| format!("{label:?} {n}")).collect();
        let more = if l.counts.len() > 10 { format!(", ... ({} labels)", l.counts.len()) } else { String::new() };
        out += &format!("labels      from {}: {}{more}\n", l.source, shown.join(", "));
        out += &format!(
            "            imbalance {:.1} (most/least frequent; flagged above {}){}\n",
            l.imbalance_ratio,
            l.imbalance_threshold,
            if l.imbalanced { "  IMBALANCED" } else { "" }
        );
    }
    for warning in &stats.warnings {
        out += &format!("warning: {warning}\n");
    }
    out
}
