//! `lora-train generate` (not implemented yet).
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lora-train generate` is not implemented yet")
}
