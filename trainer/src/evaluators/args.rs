//! The evaluator flags every scoring command shares (`#[command(flatten)]`).
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

use super::{builtin::Builtin, combine, parse_spec, python, Context, EvaluatorSet, Spec};

#[derive(clap::Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvaluatorArgs {
    /// How to score a completion in [0, 1]: exact, exact:ci, numeric[:TOL], regex:PATTERN,
    /// json, json-schema:FILE, label, contains, contains:ci, length:MIN-MAX, cmd:COMMAND,
    /// py:FILE.py[:FUNCTION]. Repeatable: the reward is the weighted sum.
    #[arg(long = "evaluator", value_name = "SPEC", help_heading = "Evaluators")]
    pub evaluators: Vec<String>,
    /// One weight per --evaluator, comma-separated, e.g. 1,0.5 [default: 1 each].
    #[arg(long, value_name = "W,..", value_delimiter = ',', allow_negative_numbers = true, help_heading = "Evaluators")]
    pub reward_weights: Option<Vec<f64>>,
    /// Processes per cmd:/py: evaluator.
    #[arg(long, default_value_t = 4, help_heading = "Evaluators")]
    pub evaluator_workers: usize,
    /// Seconds a cmd:/py: evaluator may take for one sample before it counts as hung.
    #[arg(long, default_value_t = 30.0, help_heading = "Evaluators")]
    pub evaluator_timeout: f64,
}

impl EvaluatorArgs {
    /// A context with the pool settings; the caller adds labels and a token counter.
    pub fn context(&self) -> Result<Context> {
        let timeout = Duration::try_from_secs_f64(self.evaluator_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| anyhow!("--evaluator-timeout must be a positive number of seconds, got {}", self.evaluator_timeout))?;
        Ok(Context::new(self.evaluator_workers, timeout))
    }

    /// What can be checked before a model loads (a model takes minutes; a typo should
    /// not): at least one evaluator, every spec parses and builds (patterns compile,
    /// schema and Python files load), one weight per evaluator, a valid timeout. `label`
    /// and `length` need the data's labels and the tokenizer: [`EvaluatorArgs::build`]
    /// finishes them.
    pub fn check(&self) -> Result<()> {
        let ctx = self.context()?;
        combine::weights_for(&self.evaluators, self.reward_weights.as_deref())?;
        for spec in &self.evaluators {
            let check = || -> Result<()> {
                match parse_spec(spec)? {
                    Spec::Label | Spec::Length { .. } | Spec::Cmd(_) => {}
                    Spec::Py { file, function } => drop(python::launch(&file, &function)?),
                    other => drop(Builtin::new(other, &ctx)?),
                }
                Ok(())
            };
            check().with_context(|| format!("evaluator `{spec}`"))?;
        }
        Ok(())
    }

    /// Builds the evaluators; `ctx` comes from [`EvaluatorArgs::context`].
    pub fn build(&self, ctx: &Context) -> Result<EvaluatorSet> {
        EvaluatorSet::new(&self.evaluators, self.reward_weights.as_deref(), ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        evaluators: EvaluatorArgs,
    }

    #[test]
    fn flags_parse_and_build() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["x", "--evaluator", "numeric", "--evaluator", "regex:^a,b", "--reward-weights", "1,-0.5", "--evaluator-timeout", "0.5"]).unwrap();
        let args = cli.evaluators;
        assert_eq!(args.evaluators, ["numeric", "regex:^a,b"]);
        assert_eq!(args.reward_weights.as_deref(), Some(&[1.0, -0.5][..]));
        assert_eq!(args.evaluator_workers, 4);
        let ctx = args.context().unwrap();
        assert_eq!(ctx.timeout, Duration::from_millis(500));
        assert_eq!(args.build(&ctx).unwrap().weights(), [1.0, -0.5]);

        let defaults = Cli::try_parse_from(["x"]).unwrap().evaluators;
        assert_eq!(defaults.context().unwrap().timeout, Duration::from_secs(30));
        let bad = Cli::try_parse_from(["x", "--evaluator-timeout", "0"]).unwrap().evaluators;
        assert!(bad.context().is_err());
    }
}
