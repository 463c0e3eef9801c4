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
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A workflow stopped at a gate it may not pass alone: its own exit status.
        Err(err) if err.downcast_ref::<lora_train::workflow::Stopped>().is_some() => {
            eprintln!("stopped: {err:#}");
            std::process::ExitCode::from(lora_train::workflow::EXIT_NEEDS_APPROVAL)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
