//! Logs go to stderr (stdout is reserved for `--json` output).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORA_TRAIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
