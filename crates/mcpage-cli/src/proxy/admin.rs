//! The admin paths under `/_mcpage/`, answered by the proxy itself (never
//! forwarded, never cached): `invalidate`, `metrics`, `health`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mcpage::Target;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::State;

/// Largest invalidation request body.
const MAX_INVALIDATE_BODY: usize = 1024 * 1024;
/// `Retry-After` when the retry queue is full or the proxy is stopping.
const RETRY_AFTER_SECS: u64 = 5;

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

    let targets = wanted
        .tags
        .iter()
        .map(|tag| Target::Tag(tag.clone()))
        .chain(wanted.urls.iter().map(|url| Target::Url(url.clone())))
        .chain(wanted.prefix.iter().map(|p| Target::Prefix(p.clone())));
    let invalidator = state.cache.invalidator();
    // One combined run for all three kinds (concurrent calls share runs).
    let removed = match invalidator.invalidate(targets).await {
        Ok(removed) => removed,
        Err(error) => return invalidation_error(state, &invalidator, &error).await,
    };
    tracing::info!(
        pages = removed.pages,
        tags = ?wanted.tags,
        urls = ?wanted.urls,
        prefix = ?wanted.prefix,
        "invalidated"
    );
    let mut counts: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    for item in removed.by_item {
        let kind = match item.target {
            Target::Url(_) => "urls",
            Target::Prefix(_) => "prefix",
            _ => "tags",
        };
        counts
            .entry(kind)
            .or_default()
            .insert(item.item, item.pages.into());
    }
    let mut out = serde_json::Map::new();
    out.insert("pages".to_owned(), removed.pages.into());
    for kind in ["tags", "urls", "prefix"] {
        out.insert(
            kind.to_owned(),
            counts.remove(kind).unwrap_or_default().into(),
        );
    }
    json(StatusCode::OK, &serde_json::Value::Object(out))
}

/// The answer to an invalidation that did not complete: `202` when it is
/// pending (journaled first, so a crash after the answer does not lose it),
/// `429`/`503` with `Retry-After` when refused, `400` for a URL without a key.
async fn invalidation_error(
    state: &State,
    invalidator: &mcpage::Invalidator,
    error: &mcpage::Error,
) -> Response<Full<Bytes>> {
    let message = error.to_string();
    let (status, retry_after) = match error {
        mcpage::Error::NoCacheKey { .. } => return error_json(StatusCode::BAD_REQUEST, &message),
        mcpage::Error::Pending { .. } => {
            tracing::warn!(error = %message, "invalidation pending");
            if let Some(journal) = &state.journal
                && let Err(error) = journal.save(invalidator).await
            {
                tracing::error!("{error:#}");
            }
            let pending = invalidator.pending();
            return json(
                StatusCode::ACCEPTED,
                &serde_json::json!({
                    "pending": true,
                    "error": message,
                    "pending_total": pending.count,
                    "oldest_pending_secs": pending.oldest.map_or(0.0, |age| age.as_secs_f64()),
                    "journaled": state.journal.is_some(),
                }),
            );
        }
        mcpage::Error::Overloaded { retry_after, .. } => {
            (StatusCode::TOO_MANY_REQUESTS, retry_after.as_secs().max(1))
        }
        mcpage::Error::QueueFull { .. } | mcpage::Error::Stopped => {
            (StatusCode::SERVICE_UNAVAILABLE, RETRY_AFTER_SECS)
        }
        // Never a 200 when memcached did not confirm: some pages may remain.
        _ => (StatusCode::BAD_GATEWAY, RETRY_AFTER_SECS),
    };
    tracing::warn!(error = %message, status = status.as_u16(), "invalidation refused");
    let mut response = error_json(status, &message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// `GET /_mcpage/health`: `ok`, plus the memcached servers whose breaker is
/// open (the proxy still serves then: requests just are not cached) and the
/// invalidations memcached has not confirmed yet (their pages may be stale).
fn health(state: &State) -> Response<Full<Bytes>> {
    let stats = state.cache.stats();
    let mut body = String::from("ok\n");
    for server in &stats.servers {
        if server.breaker_open {
            let _ = writeln!(body, "memcached {}: breaker open", server.name);
        }
    }
    if stats.pending.count > 0 {
        let _ = writeln!(
            body,
            "pending invalidations: {}, oldest {:.1} s (retried until memcached confirms; last error: {})",
            stats.pending.count,
            stats.pending.oldest.unwrap_or_default().as_secs_f64(),
            stats.pending.last_error.as_deref().unwrap_or("none"),
        );
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
        "Renders not kept because an invalidation overlapped them (not stored, or deleted right after).",
        stats.retracted,
    );
    counter(
        "mcpage_stores_late_total",
        "Pages not cached because memcached did not take the store within invalidation.write_window_ms.",
        stats.late,
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
        "mcpage_invalidation_runs_total",
        "Invalidation protocol runs (concurrent calls are combined into one run).",
        stats.invalidation_runs,
    );
    counter(
        "mcpage_invalidation_retries_total",
        "Background retries of invalidations memcached had not confirmed.",
        stats.invalidation_retries,
    );
    counter(
        "mcpage_invalidations_refused_total",
        "Invalidation calls refused (429) because too many were waiting.",
        stats.invalidations_refused,
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

    let _ = write!(
        out,
        "# HELP mcpage_pending_invalidations Tags, URLs and prefixes memcached has not confirmed yet (retried).\n\
         # TYPE mcpage_pending_invalidations gauge\nmcpage_pending_invalidations {}\n\
         # HELP mcpage_oldest_pending_invalidation_seconds Age of the oldest pending invalidation (0 when none).\n\
         # TYPE mcpage_oldest_pending_invalidation_seconds gauge\nmcpage_oldest_pending_invalidation_seconds {:.3}\n",
        stats.pending.count,
        stats.pending.oldest.unwrap_or_default().as_secs_f64(),
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
