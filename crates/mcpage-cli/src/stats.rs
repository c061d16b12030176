//! `mcpage stats` (placeholder).

use std::process::ExitCode;

/// Arguments of `mcpage stats`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) async fn run(_config: &mcpage::Config, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
