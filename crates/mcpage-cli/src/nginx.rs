//! `mcpage nginx` (placeholder).

use std::process::ExitCode;

/// Arguments of `mcpage nginx`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_config: &mcpage::Config, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
