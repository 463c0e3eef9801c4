//! `lora-train`: the command-line entry point. The interface is `commands::Cli`
//! (`commands/cli.rs`); each subcommand lives in `commands/<name>.rs`.
use lora_train::commands;

// glibc malloc fragments badly under candle's many short-lived buffers
// (ARCHITECTURE.md, Pitfalls: the prototype only reached its speed after switching).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any candle op starts its thread pool or allocates (see the function's comment).
    lora_kernels::configure_cpu();
    lora_train::logging::init();
    let cli = commands::parse_command_line();
    let result = commands::run(cli.command);
    let outcome = lora_train::run_control::Outcome::of(&result);
    if let Err(err) = result {
        // A workflow at a gate and a stopped run are not errors: their message says how
        // to go on (`--resume`, `--yes`).
        let label = if outcome == lora_train::run_control::Outcome::Failed { "error" } else { "stopped" };
        eprintln!("{label}: {err:#}");
    }
    std::process::ExitCode::from(outcome.exit_code())
}
