//! `mcpage nginx`: print nginx's side of the configuration.
//!
//! Without flags: the `http {}`-level include ([`render_nginx_config`]), to
//! save as `/etc/nginx/conf.d/mcpage.conf`. With `--full --prefix-dir DIR`: a
//! complete, self-contained `nginx.conf` ([`render_nginx_full`]) whose pid,
//! logs and temp paths all live under `DIR`, for local runs and tests:
//!
//! ```text
//! mcpage nginx --full --prefix-dir /tmp/mc > /tmp/mc/nginx.conf
//! nginx -p /tmp/mc/ -c /tmp/mc/nginx.conf -e /tmp/mc/error.log -g 'daemon off;'
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use mcpage::nginx::{render_nginx_config, render_nginx_full};

/// Arguments of `mcpage nginx`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a complete nginx.conf (events, http, types, logs) instead of the http-level include.
    #[arg(long, requires = "prefix_dir")]
    full: bool,
    /// With --full: the directory for pid, lock file, logs and temp paths.
    #[arg(long, value_name = "DIR", requires = "full")]
    prefix_dir: Option<PathBuf>,
}

pub(crate) fn run(config: &mcpage::Config, args: Args) -> anyhow::Result<ExitCode> {
    let text = match (&args.full, &args.prefix_dir) {
        (true, Some(dir)) => {
            // nginx resolves relative paths against its own prefix, not our cwd.
            let dir = std::path::absolute(dir)
                .with_context(|| format!("--prefix-dir {}", dir.display()))?;
            render_nginx_full(config, &dir)
        }
        _ => render_nginx_config(config),
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("write to stdout")?;
    Ok(ExitCode::SUCCESS)
}
