//! The admin paths under `/_mcpage/`, answered by the proxy itself (never
//! forwarded, never cached): `invalidate`, `metrics`, `health`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::State;

/// Largest invalidation request body.
const MAX_INVALIDATE_BODY: usize = 1024 * 1024;

/// The SHA-256 of the configured bearer token: compared in constant time
/// and of fixed length, so neither the token nor its length leaks by timing.
#[derive(Debug)]
pub(crate) struct Token([u8; 32]);

impl Token {
    /// `None` for a missing or empty token (the endpoint is then off).
    pub(crate) fn new(token: Option<&str>) -> Option<Token> {
        token
            .filter(|t| !t.is_empty())
            .map(|t| Token(digest(t.as_bytes())))
    }

    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.ct_eq(&digest(presented)))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(&Sha256::digest(bytes));
    out
}

/// Answer a request whose path starts with `/_mcpage/`.
pub(crate) async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    match request.uri().path() {
        "/_mcpage/invalidate" => {
            // Without a token the endpoint does not exist, whatever the method.
            let Some(token) = &state.token else {
                return text(
                    StatusCode::NOT_FOUND,
                    "mcpage proxy: /_mcpage/invalidate is off: set proxy.invalidate_token \
                     (or MCPAGE_PROXY__INVALIDATE_TOKEN)\n",
                );
            };
            if method != Method::POST {
                return not_allowed("POST");
            }
            invalidate(state, token, request).await
        }
        "/_mcpage/metrics" if is_get(&method) => metrics(state),
        "/_mcpage/health" if is_get(&method) => health(state),
        "/_mcpage/metrics" | "/_mcpage/health" => not_allowed("GET, HEAD"),
        _ => text(StatusCode::NOT_FOUND, "mcpage proxy: no such admin path\n"),
    }
}

fn is_get(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = value.to_string();
    body.push('\n');
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn error_json(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("mcpage proxy: method not allowed (allowed: {allow})\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// `POST /_mcpage/invalidate` body. Unknown fields are an error, so a typo
/// (`"tag"`) is a 400 rather than a silent no-op.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InvalidateRequest {
    #[serde(default)]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) urls: Vec<String>,
    #[serde(default)]
    pub(crate) prefix: Option<String>,
}

/// The `Authorization: Bearer <token>` value, when the scheme is Bearer.
pub(crate) fn bearer(request: &Request<Incoming>) -> Option<&[u8]> {
    let value = request.headers().get(AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

async fn invalidate(
    state: &State,
    token: &Token,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if !bearer(&request).is_some_and(|presented| token.matches(presented)) {
        return unauthorized();
    }
    let body = match Limited::new(request.into_body(), MAX_INVALIDATE_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return error_json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body over {MAX_INVALIDATE_BODY} bytes"),
            );
        }
        Err(error) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {error}"),
            );
        }
    };
    let wanted: InvalidateRequest = match serde_json::from_slice(&body) {
        Ok(wanted) => wanted,
        Err(error) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                &format!(
                    "bad JSON ({error}); expected {{\"tags\": [...], \"urls\": [...], \"prefix\": \"...\"}}"
                ),
            );
        }
    };
    apply(state, wanted).await
}

/// 401 with the scheme to use.
pub(crate) fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = error_json(
        StatusCode::UNAUTHORIZED,
        "missing or wrong `Authorization: Bearer <token>`",
    );
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Run an authorized invalidation (JSON endpoint or Varnish-style purge):
/// 200 with counts, 400 for a URL without a key, 502 when memcached did not confirm.
pub(crate) async fn apply(state: &State, wanted: InvalidateRequest) -> Response<Full<Bytes>> {
    if wanted.prefix.as_deref() == Some("") {
        return error_json(
            StatusCode::BAD_REQUEST,
            "empty prefix; write \"/\" to remove every page",
        );
    }

    let invalidator = state.cache.invalidator();
    let mut pages = 0;
    let mut errors: Vec<String> = Vec::new();
    let mut counts: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    let mut record = |kind: &'static str, result: mcpage::Result<mcpage::Removed>| match result {
        Ok(removed) => {
            pages += removed.pages;
            let entry = counts.entry(kind).or_default();
            for removed in removed.by_item {
                entry.insert(removed.item, removed.pages.into());
            }
            Ok(())
        }
        Err(error) => Err(error),
    };

    // URLs first: one that maps to no cache key is the caller's mistake (400),
    // and is found before anything is removed.
    if !wanted.urls.is_empty() {
        match record("urls", invalidator.invalidate_urls(&wanted.urls).await) {
            Ok(()) => {}
            Err(error @ mcpage::Error::NoCacheKey { .. }) => {
                return error_json(StatusCode::BAD_REQUEST, &error.to_string());
            }
            Err(error) => errors.push(error.to_string()),
        }
    }
    if !wanted.tags.is_empty() {
        if let Err(error) = record("tags", invalidator.invalidate_tags(&wanted.tags).await) {
            errors.push(error.to_string());
        }
    }
    if let Some(prefix) = &wanted.prefix {
        if let Err(error) = record("prefix", invalidator.purge_prefix(prefix).await) {
            errors.push(error.to_string());
        }
    }
    if !errors.is_empty() {
        let message = errors.join("; ");
        tracing::warn!(error = %message, "invalidation failed");
        // Never a 200 when memcached did not confirm: some pages may remain.
        return error_json(StatusCode::BAD_GATEWAY, &message);
    }
    tracing::info!(
        pages,
        tags = ?wanted.tags,
        urls = ?wanted.urls,
        prefix = ?wanted.prefix,
        "invalidated"
    );
    let mut out = serde_json::Map::new();
    out.insert("pages".to_owned(), pages.into());
    for kind in ["tags", "urls", "prefix"] {
        out.insert(
            kind.to_owned(),
            counts.remove(kind).unwrap_or_default().into(),
        );
    }
    json(StatusCode::OK, &serde_json::Value::Object(out))
}

/// `GET /_mcpage/health`: `ok`, plus the memcached servers whose breaker is
/// open (the proxy still serves then: requests just are not cached).
fn health(state: &State) -> Response<Full<Bytes>> {
    let mut body = String::from("ok\n");
    for server in state.cache.stats().servers {
        if server.breaker_open {
            let _ = writeln!(body, "memcached {}: breaker open", server.name);
        }
    }
    text(StatusCode::OK, body)
}

/// `GET /_mcpage/metrics`: Prometheus text exposition of [`mcpage::CacheStats`]
/// and the proxy's own counters.
fn metrics(state: &State) -> Response<Full<Bytes>> {
    let stats = state.cache.stats();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
    };
    counter(
        "mcpage_stores_total",
        "Pages stored in memcached.",
        stats.stores,
    );
    counter(
        "mcpage_store_errors_total",
        "Page stores that failed (memcached error, breaker open, index full).",
        stats.store_errors,
    );
    counter(
        "mcpage_retracted_total",
        "Pages deleted right after storing because a tag was invalidated during the render.",
        stats.retracted,
    );
    counter(
        "mcpage_misses_total",
        "Cacheable requests that reached the backend.",
        stats.misses,
    );
    counter(
        "mcpage_shared_total",
        "Requests answered from a concurrent request's render (single-flight).",
        stats.shared,
    );
    counter(
        "mcpage_invalidations_total",
        "Completed invalidation calls.",
        stats.invalidations,
    );
    counter(
        "mcpage_invalidation_errors_total",
        "Invalidation calls that memcached did not confirm.",
        stats.invalidation_errors,
    );
    counter(
        "mcpage_pages_removed_total",
        "Pages removed by invalidation.",
        stats.pages_removed,
    );
    counter(
        "mcpage_proxy_upstream_errors_total",
        "Requests the upstream did not answer (502/504 from the proxy).",
        state.upstream_errors.load(Ordering::Relaxed),
    );
    counter(
        "mcpage_proxy_upstream_retries_total",
        "Idempotent requests sent again on a fresh connection: the backend closed the pooled one before answering.",
        state.forward.retries(),
    );

    out.push_str(
        "# HELP mcpage_bypass_total Requests not cached, by reason.\n\
         # TYPE mcpage_bypass_total counter\n",
    );
    for bypass in &stats.bypass {
        let _ = writeln!(
            out,
            "mcpage_bypass_total{{reason=\"{}\"}} {}",
            label(bypass.reason.reason()),
            bypass.count
        );
    }
    let servers = &stats.servers;
    let mut per_server =
        |name: &str, kind: &str, help: &str, value: &dyn Fn(&mcpage::ServerStats) -> u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for server in servers {
                let _ = writeln!(
                    out,
                    "{name}{{server=\"{}\"}} {}",
                    label(&server.name),
                    value(server)
                );
            }
        };
    per_server(
        "mcpage_memcached_errors_total",
        "counter",
        "Failed memcached operations, per server.",
        &|s| s.errors,
    );
    per_server(
        "mcpage_breaker_open",
        "gauge",
        "1 while the server's circuit breaker is open (its work is skipped).",
        &|s| u64::from(s.breaker_open),
    );
    per_server(
        "mcpage_breaker_opened_total",
        "counter",
        "Times the server's circuit breaker opened.",
        &|s| s.breaker_opened,
    );
    let mut response = text(StatusCode::OK, out);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let token = Token::new(Some("s3cret")).expect("token");
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cre"));
        assert!(!token.matches(b"s3cret "));
        assert!(!token.matches(b""));
        assert!(Token::new(Some("")).is_none());
        assert!(Token::new(None).is_none());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("a\nb"), "a\\nb");
    }

    #[test]
    fn invalidate_requests_parse_strictly() {
        let ok: InvalidateRequest =
            serde_json::from_str(r#"{"tags": ["comments"], "prefix": "/a/"}"#).expect("ok");
        assert_eq!(ok.tags, ["comments"]);
        assert!(ok.urls.is_empty());
        assert_eq!(ok.prefix.as_deref(), Some("/a/"));
        assert!(serde_json::from_str::<InvalidateRequest>(r#"{"tag": ["x"]}"#).is_err());
        assert!(serde_json::from_str::<InvalidateRequest>(r#"{"tags": "x"}"#).is_err());
    }
}
