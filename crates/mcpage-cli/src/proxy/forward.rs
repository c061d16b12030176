//! The forwarding service under the layer: one request to the upstream over
//! a keepalive pool, bodies streamed both ways, hop-by-hop headers removed.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use mcpage::SkipCache;

use crate::http_client::{self, Reuse, root_cause};

/// Idle upstream connections kept open, and for how long.
const POOL_MAX_IDLE: usize = 64;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_CACHE_TAGS: HeaderName = HeaderName::from_static("x-cache-tags");

/// The backend, `http://host[:port]` without a path.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    authority: Authority,
    /// As given, without a trailing slash: used in error messages and logs.
    display: String,
}

impl Upstream {
    /// Parse `text`; `source` names where it came from (`proxy.upstream`, `--upstream`).
    pub(crate) fn parse(text: &str, source: &str) -> anyhow::Result<Upstream> {
        let invalid =
            |reason: &str| anyhow::anyhow!("invalid config `{source}`: `{text}` {reason}");
        let uri: Uri = text
            .trim()
            .parse()
            .map_err(|_| invalid("is not a URL such as http://127.0.0.1:8000"))?;
        match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => {}
            Some(scheme) if *scheme == Scheme::HTTPS => {
                return Err(invalid(
                    "uses https, which the proxy does not speak: run it next to the backend \
                     and point it at the backend's plain http:// address",
                ));
            }
            _ => return Err(invalid("must start with http://")),
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
        })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
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

/// The tower service that sends a request to the upstream.
#[derive(Clone, Debug)]
pub(crate) struct Forward {
    client: Client<HttpConnector, Incoming>,
    upstream: Arc<Upstream>,
    head_timeout: Duration,
    cache_untagged: bool,
}

impl Forward {
    /// A client with a keepalive pool; `head_timeout` bounds connecting plus
    /// waiting for the response head (the body then streams without a limit).
    /// Unless `cache_untagged`, a response without an `X-Cache-Tags` header is
    /// marked [`SkipCache`]: the backend opts pages in by tagging them.
    pub(crate) fn new(upstream: Upstream, head_timeout: Duration, cache_untagged: bool) -> Forward {
        let reuse = Reuse::Pool {
            max_idle: POOL_MAX_IDLE,
            idle_timeout: POOL_IDLE_TIMEOUT,
        };
        Forward {
            client: http_client::client(head_timeout, reuse),
            upstream: Arc::new(upstream),
            head_timeout,
            cache_untagged,
        }
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
        let sent = self.client.request(Request::from_parts(parts, body));
        match tokio::time::timeout(self.head_timeout, sent).await {
            Ok(Ok(mut response)) => {
                remove_hop_by_hop(response.headers_mut());
                if !self.cache_untagged && !response.headers().contains_key(&X_CACHE_TAGS) {
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
/// peer to `X-Forwarded-For` (nginx's own value is kept in front).
pub(crate) fn prepare_request_headers(headers: &mut HeaderMap, peer: IpAddr) {
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
    chain.extend_from_slice(peer.to_canonical().to_string().as_bytes());
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
        for (bad, needle) in [
            ("https://127.0.0.1:8443", "https"),
            ("127.0.0.1:8000", "http://"),
            ("ftp://x", "http://"),
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
        prepare_request_headers(&mut headers, "::ffff:127.0.0.1".parse().expect("ip"));
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["cookie", "host", "x-forwarded-for"]);
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.7, 10.0.0.1, 127.0.0.1"
        );
    }
}
