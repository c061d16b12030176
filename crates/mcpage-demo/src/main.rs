//! `mcpage-demo`: the demo blog behind nginx and memcached.
//!
//! ```text
//! mcpage-demo [--config FILE] [--listen ADDR] [--db PATH]
//! ```
//!
//! Reads the same configuration as `mcpage` (`--config FILE`, default
//! `mcpage.toml` in the working directory, then `MCPAGE_*` variables), listens
//! on `nginx.app` (127.0.0.1:8081 by default) and keeps its SQLite database in
//! `mcpage-demo.sqlite3` (created and seeded on first start). Stops on Ctrl-C
//! or SIGTERM after the requests in flight and the pending cache writes.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// The mcpage demo blog (SQLite), cached by nginx from memcached.
#[derive(Debug, Parser)]
#[command(name = "mcpage-demo", version, about)]
struct Cli {
    /// Config file [default: mcpage.toml in the working directory]; MCPAGE_* env overrides it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: the config's nginx.app, 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// SQLite database, created and seeded when missing (`:memory:` for a throwaway one).
    #[arg(long, value_name = "PATH", default_value = "mcpage-demo.sqlite3")]
    db: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("mcpage=info,mcpage_demo=info")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match mcpage::Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("mcpage-demo: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mcpage-demo: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mcpage-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: mcpage::Config, cli: Cli) -> anyhow::Result<()> {
    let missing: Vec<&str> = mcpage_demo::EXCLUDE
        .into_iter()
        .filter(|rule| !config.cache.exclude.iter().any(|r| r == rule))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            "cache.exclude lacks {missing:?}: the feed and the search still opt out of caching, \
             but the demo's configs list them (nginx/demo.toml)"
        );
    }
    let cache = mcpage::Cache::connect(&config).await?;
    let db = cli.db.clone();
    let demo = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || mcpage_demo::Demo::open(&db, cache)).await??
    };
    let listen = cli.listen.unwrap_or_else(|| config.nginx.app.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let address = listener.local_addr().context("local address")?;
    eprintln!(
        "mcpage-demo: listening on http://{address} (database {}); nginx serves it on http://{}",
        cli.db.display(),
        config.nginx.listen
    );
    axum::serve(listener, mcpage_demo::app(demo))
        .with_graceful_shutdown(shutdown())
        .await
        .context("serve")?;
    // Pages rendered just before the signal are stored (or dropped) before exit.
    cache.wait_for_writes().await;
    eprintln!("mcpage-demo: stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
