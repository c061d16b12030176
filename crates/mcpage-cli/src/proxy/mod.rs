//! `mcpage proxy`: the page cache in front of any HTTP backend.
//!
//! ```text
//! nginx ──miss──▶ mcpage proxy (PageCacheLayer) ──▶ backend (Django, Rails, ...)
//!                      └─ stores pages tagged by the backend's `X-Cache-Tags` header
//! ```
//!
//! A tower stack: [`forward::Forward`] (hyper-util's pooled client, bodies
//! streamed both ways) wrapped in [`mcpage::PageCacheLayer`]. The admin paths
//! under `/_mcpage/` ([`admin`]) are answered before the layer and never cached
//! or forwarded. SIGINT/SIGTERM stop accepting, let in-flight requests finish
//! (bounded), then wait for background page writes. With `proxy.journal`,
//! pending invalidations (memcached did not confirm them yet) are kept in
//! that file and retried after a restart ([`crate::journal`]).

mod admin;
mod forward;
mod xkey;

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use mcpage::PageBody;
use mcpage::{Cache, PageCache, PageCacheLayer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tower::{Layer as _, ServiceExt as _};

use forward::{Forward, ForwardOptions, Upstream};

use crate::journal::{self, Journal};

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After a shutdown signal: how long in-flight requests may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Then: how long background page writes may take to finish.
const SETTLE_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (say, out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Arguments of `mcpage proxy`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on, `host:port` or `unix:/path` [default: `proxy.listen`
    /// from the config, 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The backend, `http://host:port` (plain HTTP only) or `unix:/path` (HTTP
    /// over a unix socket) [default: `proxy.upstream`].
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// How long to wait for the backend to connect and send its response head
    /// before answering 504 [default: `proxy.upstream_timeout_ms`, 30000].
    #[arg(long, value_name = "MS")]
    upstream_timeout_ms: Option<u64>,
    /// Also cache pages that carry no `X-Cache-Tags` header (removable only by
    /// URL, prefix or TTL) [default: `proxy.cache_untagged`, off: a page is
    /// cached only when the backend tags it].
    #[arg(long)]
    cache_untagged: bool,
}

/// The body of every response: the layer's (the backend's, possibly buffered)
/// or one the proxy wrote itself.
type ProxyBody = Either<PageBody<Incoming>, Full<Bytes>>;

/// Shared by every connection.
#[derive(Debug)]
pub(crate) struct State {
    cache: Cache,
    service: PageCache<Forward>,
    /// The service under the layer (shares its counters).
    forward: Forward,
    token: Option<admin::Token>,
    /// Varnish-style purges from a loopback client need no token.
    purge_from_loopback: bool,
    /// `proxy.journal`: pending invalidations across restarts.
    journal: Option<Journal>,
    upstream_errors: AtomicU64,
}

/// Run the proxy until SIGINT or SIGTERM.
pub(crate) async fn run(config: &mcpage::Config, args: Args) -> anyhow::Result<ExitCode> {
    let (upstream, source) = match &args.upstream {
        Some(url) => (url.as_str(), "--upstream"),
        None => (config.proxy.upstream.as_str(), "proxy.upstream"),
    };
    let upstream = match Upstream::parse(upstream, source) {
        Ok(upstream) => upstream,
        Err(error) => {
            // A configuration error, reported like the others in main.
            eprintln!("mcpage: {error:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let upstream_timeout_ms = args
        .upstream_timeout_ms
        .unwrap_or(config.proxy.upstream_timeout_ms);
    if upstream_timeout_ms == 0 {
        eprintln!("mcpage: invalid `--upstream-timeout-ms`: must be at least 1");
        return Ok(ExitCode::from(2));
    }
    let cache_untagged = args.cache_untagged || config.proxy.cache_untagged;
    let listen = args.listen.as_deref().unwrap_or(&config.proxy.listen);

    // Before binding: a signal that arrives once we listen must not kill us.
    let mut signals = Signals::install()?;
    let listener = Listener::bind(listen).await?;
    let local = listener.describe()?;

    let cache = Cache::connect(config).await?;
    let upstream_text = upstream.to_string();
    let forward = Forward::new(
        upstream,
        &ForwardOptions {
            head_timeout: Duration::from_millis(upstream_timeout_ms),
            idle_timeout: Duration::from_millis(config.proxy.upstream_idle_timeout_ms),
            cache_untagged,
            tag_headers: config
                .cache
                .tag_headers
                .iter()
                .filter_map(|header| http::HeaderName::from_bytes(header.name.as_bytes()).ok())
                .collect(),
        },
    );
    let journal = config.proxy.journal.as_deref().map(Journal::new);
    if let Some(journal) = &journal {
        // Before serving: work a previous process left pending is retried now.
        let pending = journal::read(journal.path())?;
        if !pending.is_empty() {
            let count = pending.len();
            if let Err(error) = cache.invalidator().restore(pending) {
                tracing::error!(%error, "journal {}", journal.path().display());
            }
            tracing::warn!(
                count,
                "journal {}: retrying pending invalidations of a previous run",
                journal.path().display()
            );
        }
    }
    let state = Arc::new(State {
        service: PageCacheLayer::new(cache.clone()).layer(forward.clone()),
        forward,
        token: admin::Token::new(config.proxy.invalidate_token.as_deref()),
        purge_from_loopback: config.proxy.purge_from_loopback,
        cache,
        journal,
        upstream_errors: AtomicU64::new(0),
    });
    if state.journal.is_some() {
        tokio::spawn(keep_journal(Arc::clone(&state)));
    }
    tracing::info!(
        "mcpage proxy listening on {local}, upstream {upstream_text}, memcached {}{}{}{}",
        servers(&config.memcached.servers),
        if config.memcached.index_servers.is_empty() {
            String::new()
        } else {
            format!(", tag index {}", servers(&config.memcached.index_servers))
        },
        if state.token.is_some() {
            ", invalidate endpoint on"
        } else {
            ", invalidate endpoint off (no proxy.invalidate_token)"
        },
        if cache_untagged {
            ", caching untagged pages too"
        } else {
            ""
        },
    );

    if config.cache.names_only_loopback() {
        tracing::warn!("{}", crate::check::LOOPBACK_ONLY);
    }

    let graceful = GracefulShutdown::new();
    let signal = loop {
        tokio::select! {
            biased;
            signal = signals.next() => break signal,
            accepted = listener.accept(&graceful, &state) => if let Err(error) = accepted {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            },
        }
    };
    listener.close();
    let in_flight = graceful.count();
    tracing::info!(
        signal,
        connections = in_flight,
        "shutting down: no new connections, finishing in-flight requests"
    );
    // A second signal cuts both waits short.
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}: closing them");
        }
        signal = signals.next() => {
            tracing::warn!(signal, "second signal: closing in-flight requests");
        }
    }
    tokio::select! {
        () = state.cache.wait_for_writes() => {}
        () = tokio::time::sleep(SETTLE_GRACE) => {
            tracing::warn!("background page writes still running after {SETTLE_GRACE:?}: dropped");
        }
        signal = signals.next() => {
            tracing::warn!(signal, "second signal: background page writes dropped");
        }
    }
    if let Some(journal) = &state.journal {
        let invalidator = state.cache.invalidator();
        if let Err(error) = journal.save(&invalidator).await {
            tracing::error!("{error:#}");
        }
        let pending = invalidator.pending().count;
        if pending > 0 {
            tracing::warn!(
                pending,
                "stopping with pending invalidations: kept in {}",
                journal.path().display()
            );
        }
    }
    tracing::info!("mcpage proxy stopped");
    Ok(ExitCode::SUCCESS)
}

/// Rewrite the journal whenever the pending queue changes.
async fn keep_journal(state: Arc<State>) {
    let invalidator = state.cache.invalidator();
    let mut changes = invalidator.pending_changes();
    let Some(journal) = &state.journal else {
        return;
    };
    loop {
        if let Err(error) = journal.save(&invalidator).await {
            tracing::error!("{error:#}");
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

fn servers(servers: &[mcpage::ServerSpec]) -> String {
    servers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// SIGINT and SIGTERM, handled by the proxy instead of ending the process.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
        })
    }

    /// The name of the next signal.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Where the proxy listens: a TCP address or a unix socket.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// `host:port`, or `unix:/path`: a socket file left behind by a process
    /// that is gone is replaced, a live one is an error.
    async fn bind(listen: &str) -> anyhow::Result<Listener> {
        let Some(path) = listen.strip_prefix("unix:") else {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            return Ok(Listener::Tcp(listener));
        };
        let path = Path::new(path);
        if !path.is_absolute() {
            anyhow::bail!("cannot listen on {listen}: the socket path must be absolute");
        }
        if let Ok(metadata) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt as _;
            if !metadata.file_type().is_socket() {
                anyhow::bail!("cannot listen on {listen}: the file exists and is not a socket");
            }
            if UnixStream::connect(path).await.is_ok() {
                anyhow::bail!("cannot listen on {listen}: another process is listening there");
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {listen}"))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot listen on {listen}"))?;
        // The same reach as a loopback port: nginx's workers run as another
        // user. Restrict access with the permissions of the directory.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("cannot make {listen} writable for nginx"))?;
        Ok(Listener::Unix(listener, path.to_owned()))
    }

    /// `http://127.0.0.1:8081` or `unix:/path`, for the log.
    fn describe(&self) -> anyhow::Result<String> {
        match self {
            Listener::Tcp(listener) => {
                let local = listener.local_addr().context("listening address")?;
                Ok(format!("http://{local}"))
            }
            Listener::Unix(_, path) => Ok(format!("unix:{}", path.display())),
        }
    }

    /// Accept one connection and serve it in its own task.
    async fn accept(&self, graceful: &GracefulShutdown, state: &Arc<State>) -> std::io::Result<()> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                serve_connection(graceful, state, stream, Some(peer.ip()));
            }
            Listener::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                serve_connection(graceful, state, stream, None);
            }
        }
        Ok(())
    }

    /// Stop accepting; a unix socket's file is removed.
    fn close(self) {
        if let Listener::Unix(listener, path) = self {
            drop(listener);
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(%error, path = %path.display(), "cannot remove the socket file");
            }
        }
    }
}

/// `peer`: the client's address; none over a unix socket.
fn serve_connection<I>(
    graceful: &GracefulShutdown,
    state: &Arc<State>,
    stream: I,
    peer: Option<IpAddr>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::clone(state);
    let service = service_fn(move |request| handle(Arc::clone(&state), peer, request));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, ?peer, "connection ended with an error");
        }
    });
}

/// One request: admin path, or through the layer to the upstream.
async fn handle(
    state: Arc<State>,
    peer: Option<IpAddr>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if request.uri().path().starts_with("/_mcpage/") {
        return Ok(admin::handle(&state, request).await.map(Either::Right));
    }
    if xkey::is_purge(&request) {
        return Ok(xkey::handle(&state, peer, request).await.map(Either::Right));
    }
    if request.method() == Method::CONNECT {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "mcpage proxy: CONNECT is not supported\n",
        ));
    }
    // Forwarded: origin form (`/path?query`), and the path and query of absolute
    // form. Refused: `*` (server-wide OPTIONS), which names no page.
    if !request
        .uri()
        .path_and_query()
        .is_some_and(|pq| pq.as_str().starts_with('/'))
    {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "mcpage proxy: unsupported request target\n",
        ));
    }
    // Before the layer: it judges the request the backend will see.
    forward::prepare_request_headers(request.headers_mut(), peer);
    match state.service.clone().oneshot(request).await {
        Ok(response) => Ok(response.map(Either::Left)),
        Err(error) => {
            state.upstream_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(status = error.status.as_u16(), "{}", error.message);
            let mut body = error.message;
            body.push('\n');
            Ok(text(error.status, body))
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
