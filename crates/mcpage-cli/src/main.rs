//! `mcpage`: render nginx's side, explain keys, invalidate, check, stats, and
//! the caching reverse proxy for any backend. Thin: parse, load config, dispatch.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod explain;
mod http_client;
mod invalidate;
mod journal;
mod nginx;
mod proxy;
mod stats;

/// A full-page cache that nginx serves from memcached.
#[derive(Debug, Parser)]
#[command(name = "mcpage", version, about)]
struct Cli {
    /// Config file [default: mcpage.toml in the working directory]; MCPAGE_* env overrides it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the nginx configuration for this config.
    Nginx(nginx::Args),
    /// Show the key, server and cacheability nginx and mcpage agree on for request targets.
    Explain(explain::Args),
    /// Remove pages by tag, URL or prefix.
    Invalidate(invalidate::Args),
    /// Run the caching reverse proxy in front of any HTTP backend.
    Proxy(proxy::Args),
    /// Write a probe page, fetch it through nginx, and say what is wrong if it is not a hit.
    Check(check::Args),
    /// Per-server memcached statistics and tag index sizes.
    Stats(stats::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mcpage=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match mcpage::Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("mcpage: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mcpage: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Nginx(args) => nginx::run(&config, args),
            Command::Explain(args) => explain::run(&config, args).await,
            Command::Invalidate(args) => invalidate::run(&config, args).await,
            Command::Proxy(args) => proxy::run(&config, args).await,
            Command::Check(args) => check::run(&config, args).await,
            Command::Stats(args) => stats::run(&config, args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mcpage: {error:#}");
            ExitCode::FAILURE
        }
    }
}
