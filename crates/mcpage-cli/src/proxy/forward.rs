//! The forwarding service under the layer: one request to the upstream over
//! a keepalive pool (TCP or a unix socket), bodies streamed both ways,
//! hop-by-hop headers removed. An idempotent request whose pooled connection
//! the backend closed before answering is sent once more on a fresh one.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioIo;
use mcpage::SkipCache;

use crate::http_client::{self, Reuse, root_cause};
use tokio::net::UnixStream;

/// Idle upstream connections kept open at most.
const POOL_MAX_IDLE: usize = 64;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The authority of requests sent over a unix socket: the pool's key, and the
/// `Host` of a request that came without one.
const UNIX_AUTHORITY: &str = "localhost";

/// The backend: `http://host[:port]` without a path, or `unix:/path`.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// The authority put into the request URI (`localhost` for a socket).
    authority: Authority,
    /// The socket, for `unix:/path`.
    socket: Option<PathBuf>,
    /// As given, without a trailing slash: used in error messages and logs.
    display: String,
}

impl Upstream {
    /// Parse `text`; `source` names where it came from (`proxy.upstream`, `--upstream`).
    pub(crate) fn parse(text: &str, source: &str) -> anyhow::Result<Upstream> {
        let invalid =
            |reason: &str| anyhow::anyhow!("invalid config `{source}`: `{text}` {reason}");
        if let Some(path) = text.trim().strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(invalid(
                    "needs an absolute socket path, such as unix:/run/gunicorn.sock",
                ));
            }
            return Ok(Upstream {
                authority: Authority::from_static(UNIX_AUTHORITY),
                socket: Some(PathBuf::from(path)),
                display: format!("unix:{path}"),
            });
        }
        let uri: Uri = text.trim().parse().map_err(|_| {
            invalid(
                "is not a URL such as http://127.0.0.1:8000 or a socket such as unix:/run/app.sock",
            )
        })?;
        match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => {}
            Some(scheme) if *scheme == Scheme::HTTPS => {
                return Err(invalid(
                    "uses https, which the proxy does not speak: run it next to the backend \
                     and point it at the backend's plain http:// address",
                ));
            }
            _ => return Err(invalid("must start with http:// or unix:")),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("must not contain credentials"));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(invalid(
                "must not have a path or query: requests are forwarded with their own path",
            ));
        }
        Ok(Upstream {
            display: format!("http://{authority}"),
            authority,
            socket: None,
        })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// Dials the backend's unix socket for hyper's pool.
#[derive(Clone, Debug)]
pub(crate) struct UnixConnector {
    path: Arc<Path>,
}

impl tower::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = Arc::clone(&self.path);
        Box::pin(async move { UnixStream::connect(&*path).await.map(TokioIo::new) })
    }
}

/// What the client sends: the client's body, or nothing (a bodiless GET or
/// HEAD, which can be sent again).
type RequestBody = Either<Incoming, Empty<Bytes>>;

/// A pooled client and one that never reuses a connection (for the retry).
#[derive(Clone, Debug)]
struct Clients<C> {
    pooled: Client<C, RequestBody>,
    fresh: Client<C, RequestBody>,
}

impl<C> Clients<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    fn new(connector: C, idle_timeout: Duration) -> Clients<C> {
        let build = |max_idle: usize| {
            http_client::client_with(
                connector.clone(),
                Reuse::Pool {
                    max_idle,
                    idle_timeout,
                },
            )
        };
        let max_idle = if idle_timeout.is_zero() {
            0
        } else {
            POOL_MAX_IDLE
        };
        Clients {
            pooled: build(max_idle),
            fresh: build(0),
        }
    }

    fn send(&self, fresh: bool, request: Request<RequestBody>) -> ResponseFuture {
        if fresh {
            self.fresh.request(request)
        } else {
            self.pooled.request(request)
        }
    }
}

/// The clients for a TCP or a unix-socket backend.
#[derive(Clone, Debug)]
enum Dialer {
    Tcp(Clients<HttpConnector>),
    Unix(Clients<UnixConnector>),
}

impl Dialer {
    fn send(&self, fresh: bool, request: Request<RequestBody>) -> ResponseFuture {
        match self {
            Dialer::Tcp(clients) => clients.send(fresh, request),
            Dialer::Unix(clients) => clients.send(fresh, request),
        }
    }
}

/// Why the upstream gave no response; becomes a text response with `status`.
#[derive(Debug)]
pub(crate) struct UpstreamError {
    /// 502, or 504 when the response head did not arrive in time.
    pub(crate) status: StatusCode,
    /// `mcpage proxy: upstream http://... unreachable: connection refused`
    pub(crate) message: String,
}

/// How the forwarding service is set up.
#[derive(Debug)]
pub(crate) struct ForwardOptions {
    /// Bounds connecting plus waiting for the response head (both attempts).
    pub(crate) head_timeout: Duration,
    /// How long an idle connection stays in the pool; zero: never reused.
    pub(crate) idle_timeout: Duration,
    /// Also cache responses without a tag header.
    pub(crate) cache_untagged: bool,
    /// The response headers that carry tags (`cache.tag_headers`).
    pub(crate) tag_headers: Vec<HeaderName>,
}

/// The tower service that sends a request to the upstream.
#[derive(Clone, Debug)]
pub(crate) struct Forward {
    dialer: Dialer,
    upstream: Arc<Upstream>,
    head_timeout: Duration,
    cache_untagged: bool,
    tag_headers: Arc<[HeaderName]>,
    retries: Arc<AtomicU64>,
}

impl Forward {
    /// A client with a keepalive pool; `head_timeout` bounds connecting plus
    /// waiting for the response head (the body then streams without a limit).
    /// Unless `cache_untagged`, a response without an `X-Cache-Tags` header is
    /// marked [`SkipCache`]: the backend opts pages in by tagging them.
    pub(crate) fn new(upstream: Upstream, options: &ForwardOptions) -> Forward {
        let dialer = match &upstream.socket {
            Some(path) => Dialer::Unix(Clients::new(
                UnixConnector {
                    path: Arc::from(path.as_path()),
                },
                options.idle_timeout,
            )),
            None => Dialer::Tcp(Clients::new(
                http_client::tcp_connector(options.head_timeout),
                options.idle_timeout,
            )),
        };
        Forward {
            dialer,
            upstream: Arc::new(upstream),
            head_timeout: options.head_timeout,
            cache_untagged: options.cache_untagged,
            tag_headers: Arc::from(options.tag_headers.as_slice()),
            retries: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests sent again on a fresh connection (see [`closed_before_response`]).
    pub(crate) fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    async fn forward(
        self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut parts, body) = request.into_parts();
        // The raw target as received (`handle` only lets origin-form through).
        let target = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.upstream.authority.clone());
        uri.path_and_query = Some(target);
        parts.uri = Uri::from_parts(uri).map_err(|error| UpstreamError {
            status: StatusCode::BAD_REQUEST,
            message: format!("mcpage proxy: cannot forward this request target: {error}"),
        })?;
        // Our own connection to the upstream: always HTTP/1.1 with keepalive.
        parts.version = Version::HTTP_11;
        // A bodiless GET or HEAD can be sent again: keep what it takes.
        let replay = (matches!(parts.method, Method::GET | Method::HEAD) && body.is_end_stream())
            .then(|| {
                (
                    parts.method.clone(),
                    parts.uri.clone(),
                    parts.headers.clone(),
                )
            });
        let body = match replay {
            Some(_) => Either::Right(Empty::new()),
            None => Either::Left(body),
        };
        let deadline = tokio::time::Instant::now() + self.head_timeout;
        let sent = self.dialer.send(false, Request::from_parts(parts, body));
        let result = match tokio::time::timeout_at(deadline, sent).await {
            Ok(Err(error)) if replay.is_some() && closed_before_response(&error) => {
                let Some((method, uri, headers)) = replay else {
                    return Err(self.failed(&error));
                };
                self.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    %method, %uri, error = %root_cause(&error),
                    "the backend closed the connection before answering: sending again on a fresh one"
                );
                let mut again = Request::new(Either::Right(Empty::new()));
                *again.method_mut() = method;
                *again.uri_mut() = uri;
                *again.headers_mut() = headers;
                tokio::time::timeout_at(deadline, self.dialer.send(true, again)).await
            }
            other => other,
        };
        match result {
            Ok(Ok(mut response)) => {
                remove_hop_by_hop(response.headers_mut());
                let tagged = self
                    .tag_headers
                    .iter()
                    .any(|name| response.headers().contains_key(name));
                if !self.cache_untagged && !tagged {
                    response.extensions_mut().insert(SkipCache);
                }
                Ok(response)
            }
            Ok(Err(error)) => Err(self.failed(&error)),
            Err(_elapsed) => Err(UpstreamError {
                status: StatusCode::GATEWAY_TIMEOUT,
                message: format!(
                    "mcpage proxy: upstream {} did not answer within {} ms",
                    self.upstream,
                    self.head_timeout.as_millis()
                ),
            }),
        }
    }

    fn failed(&self, error: &hyper_util::client::legacy::Error) -> UpstreamError {
        let cause = root_cause(error);
        let message = if error.is_connect() {
            format!(
                "mcpage proxy: upstream {} unreachable: {cause}",
                self.upstream
            )
        } else {
            format!("mcpage proxy: upstream {} failed: {cause}", self.upstream)
        };
        UpstreamError {
            status: StatusCode::BAD_GATEWAY,
            message,
        }
    }
}

/// Did the connection close (or reset) before a response head arrived? That
/// is what a pooled connection looks like when the backend's keep-alive timer
/// closed it just as the request went out: the backend did not answer it.
fn closed_before_response(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() {
        return false;
    }
    let mut current: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(error) = current {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe);
        }
        current = error.source();
    }
    false
}

impl tower::Service<Request<Incoming>> for Forward {
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        // The pool dials on demand; there is no backpressure to report.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().forward(request))
    }
}

/// Remove the hop-by-hop headers of RFC 9110 §7.6.1: `Connection` and every
/// header it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`. `Host` is never removed.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| *name != HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Prepare a client's request for the upstream: drop hop-by-hop headers and
/// `Expect` (this side already answered `100 Continue`), then append the
/// peer to `X-Forwarded-For` (nginx's own value is kept in front). A peer on
/// a unix socket (`None`) has no address to append.
pub(crate) fn prepare_request_headers(headers: &mut HeaderMap, peer: Option<IpAddr>) {
    remove_hop_by_hop(headers);
    headers.remove(http::header::EXPECT);
    let mut chain: Vec<u8> = Vec::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() {
            chain.extend_from_slice(value);
            chain.extend_from_slice(b", ");
        }
    }
    match peer {
        Some(peer) => chain.extend_from_slice(peer.to_canonical().to_string().as_bytes()),
        None if chain.is_empty() => return,
        None => chain.truncate(chain.len() - 2),
    }
    // Valid header values joined by ", " plus an IP address: always valid.
    if let Ok(value) = HeaderValue::from_bytes(&chain) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let ok = Upstream::parse("http://127.0.0.1:8000", "proxy.upstream").expect("plain");
        assert_eq!(ok.to_string(), "http://127.0.0.1:8000");
        let ok = Upstream::parse("http://localhost:8000/", "proxy.upstream").expect("slash");
        assert_eq!(ok.to_string(), "http://localhost:8000");
        let ok = Upstream::parse("unix:/run/gunicorn.sock", "proxy.upstream").expect("socket");
        assert_eq!(ok.to_string(), "unix:/run/gunicorn.sock");
        assert_eq!(ok.socket.as_deref(), Some(Path::new("/run/gunicorn.sock")));
        for (bad, needle) in [
            ("https://127.0.0.1:8443", "https"),
            ("127.0.0.1:8000", "http://"),
            ("ftp://x", "http://"),
            ("unix:run/app.sock", "absolute"),
            ("http://127.0.0.1:8000/app", "path"),
            ("http://u:p@127.0.0.1:8000", "credentials"),
            ("not a url", "not a URL"),
        ] {
            let error = Upstream::parse(bad, "--upstream")
                .expect_err(bad)
                .to_string();
            assert!(error.contains("`--upstream`"), "{error}");
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret, host"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "example.org"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.1"),
            ("expect", "100-continue"),
            ("cookie", "a=b"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let mut unix = headers.clone();
        prepare_request_headers(&mut headers, Some("::ffff:127.0.0.1".parse().expect("ip")));
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["cookie", "host", "x-forwarded-for"]);
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.7, 10.0.0.1, 127.0.0.1"
        );
        // Over a unix socket: nothing appended, nothing invented.
        prepare_request_headers(&mut unix, None);
        assert_eq!(unix["x-forwarded-for"], "203.0.113.7, 10.0.0.1");
        let mut bare = HeaderMap::new();
        prepare_request_headers(&mut bare, None);
        assert!(bare.is_empty());
    }
}
