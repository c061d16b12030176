//! [`PageCache`]: the service the layer produces.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use super::unsafe_methods::{self, UnsafeRequest};
use super::{CacheTags, PageBody, SkipCache};
use crate::cache::Cache;
use crate::key::PageKey;
use crate::lock::{self, Role};
use crate::policy::{self, Bypass};
use crate::put::PageWrite;
use crate::tags;
use bytes::{Bytes, BytesMut};
use http::header::{HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static MISS: HeaderValue = HeaderValue::from_static("MISS");
static BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
static STORED: HeaderValue = HeaderValue::from_static("mcpage; fwd=uri-miss; stored");
static COLLAPSED: HeaderValue = HeaderValue::from_static("mcpage; fwd=uri-miss; collapsed");
static UNSTORED: HeaderValue = HeaderValue::from_static("mcpage; fwd=uri-miss");

/// With gzip on, bodies up to this many times `max_body_bytes` are buffered
/// in the hope they compress below the limit.
const GZIP_BUFFER_FACTOR: usize = 8;

/// Wraps a service: stores its cacheable responses for nginx. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct PageCache<S> {
    inner: S,
    cache: Cache,
    flights: Arc<Flights>,
    single_flight: bool,
}

/// A response shared with concurrent requests for the same key.
#[derive(Debug)]
pub(crate) struct Shared {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// The invalidation clock the leader read before it rendered.
    clock: u64,
}

/// In-flight renders by page key (see [`crate::lock`]).
pub(crate) type Flights = lock::Flights<Arc<Shared>>;

impl<S> PageCache<S> {
    pub(crate) fn new(inner: S, cache: Cache, flights: Arc<Flights>, single_flight: bool) -> Self {
        PageCache {
            inner,
            cache,
            flights,
            single_flight,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Decide from the request alone: the page key, or why not.
    fn classify<B>(&self, request: &Request<B>) -> Result<PageKey, Bypass> {
        policy::check_request(self.cache.policy(), request.method(), request.headers())?;
        let uri = original_uri(request);
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let header = request.headers().get(HOST).map(HeaderValue::as_bytes);
        let authority = uri.authority().map(|a| a.as_str().as_bytes());
        // An absolute-form target (or HTTP/2 :authority) naming another host
        // than the Host header: nginx keys on (and checks) the former, apps
        // may render either. Storing what was rendered for one under the
        // other would serve one host's page for another: not cached.
        if let (Some(header), Some(authority)) = (header, authority)
            && crate::key::nginx_host(header) != crate::key::nginx_host(authority)
        {
            return Err(Bypass::Host);
        }
        let host = authority.or(header);
        self.cache.classify(host, target.as_bytes())
    }
}

/// The request target nginx saw: inside axum's `Router::nest` the URI is
/// stripped, and the original is kept in the `OriginalUri` extension.
fn original_uri<B>(request: &Request<B>) -> &http::Uri {
    #[cfg(feature = "axum")]
    if let Some(original) = request.extensions().get::<axum::extract::OriginalUri>() {
        return &original.0;
    }
    request.uri()
}

/// What the layer did with a request: `X-Cache` and RFC 9211 `Cache-Status`
/// (`fwd=bypass` when the request was never cacheable, `fwd=uri-miss` when
/// it missed; `detail` names the [`Bypass`] reason; nginx answers hits with
/// `mcpage; hit`).
enum Outcome {
    /// The request is not cacheable.
    Bypass(Bypass),
    /// It missed, and the response is not stored (with the reason, if any).
    NotStored(Option<Bypass>),
    /// It missed; the response is being stored.
    Stored,
    /// Answered from a concurrent request's render (single-flight).
    Collapsed,
}

fn mark<B>(response: &mut Response<B>, outcome: Outcome) {
    set_status(response.headers_mut(), outcome);
}

/// `Cache-Status` values per [`Bypass`] reason, built once: the bypass path
/// (logged-in users) must not allocate for a header.
fn status_values(fwd: &str) -> Vec<HeaderValue> {
    use strum::IntoEnumIterator;
    Bypass::iter()
        .map(|reason| {
            HeaderValue::from_str(&format!("mcpage; fwd={fwd}; detail={}", reason.reason()))
                .unwrap_or_else(|_| HeaderValue::from_static("mcpage"))
        })
        .collect()
}

static BYPASSED: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| status_values("bypass"));
static NOT_STORED: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| status_values("uri-miss"));

fn set_status(headers: &mut HeaderMap, outcome: Outcome) {
    let (x_cache, status) = match outcome {
        Outcome::Bypass(reason) => (&BYPASS, BYPASSED.get(reason as usize)),
        Outcome::NotStored(Some(reason)) => (&BYPASS, NOT_STORED.get(reason as usize)),
        Outcome::NotStored(None) => (&BYPASS, Some(&UNSTORED)),
        Outcome::Stored => (&MISS, Some(&STORED)),
        Outcome::Collapsed => (&MISS, Some(&COLLAPSED)),
    };
    headers.insert(X_CACHE.clone(), x_cache.clone());
    if let Some(status) = status {
        headers.insert(CACHE_STATUS.clone(), status.clone());
    }
}

/// Remove every configured tag header (the client never sees tags).
fn strip_tags(cache: &Cache, headers: &mut HeaderMap) {
    for (name, _) in &cache.policy().tag_headers {
        headers.remove(name);
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for PageCache<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Unpin + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<PageBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The ready service goes into the future; a fresh clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        match self.classify(&request) {
            Err(reason) => {
                self.cache.metrics().bypassed(reason);
                tracing::debug!(reason = reason.reason(), uri = %request.uri(), "cache bypass");
                if unsafe_methods::is_unsafe(request.method()) {
                    let uri = original_uri(&request);
                    let host = uri
                        .authority()
                        .map(|a| a.as_str().as_bytes())
                        .or_else(|| request.headers().get(HOST).map(HeaderValue::as_bytes));
                    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
                    let unsafe_request = UnsafeRequest::new(host, target);
                    Box::pin(invalidating(
                        inner,
                        self.cache.clone(),
                        unsafe_request,
                        request,
                    ))
                } else {
                    Box::pin(bypass(inner, self.cache.clone(), request, reason))
                }
            }
            Ok(key) => {
                let flights = self.single_flight.then(|| Arc::clone(&self.flights));
                Box::pin(cacheable(inner, self.cache.clone(), flights, key, request))
            }
        }
    }
}

async fn bypass<S, ReqBody, ResBody>(
    mut inner: S,
    cache: Cache,
    request: Request<ReqBody>,
    reason: Bypass,
) -> Result<Response<PageBody<ResBody>>, S::Error>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let mut response = inner.call(request).await?.map(PageBody::inner);
    strip_tags(&cache, response.headers_mut());
    mark(&mut response, Outcome::Bypass(reason));
    Ok(response)
}

/// An unsafe request: bypassed, and a 2xx/3xx answer invalidates the pages it
/// may have changed before it goes back (RFC 9111 4.4). A failed invalidation
/// is logged and counted (`invalidation_errors`), never fails the request.
async fn invalidating<S, ReqBody, ResBody>(
    inner: S,
    cache: Cache,
    unsafe_request: UnsafeRequest,
    request: Request<ReqBody>,
) -> Result<Response<PageBody<ResBody>>, S::Error>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let response = bypass(inner, cache.clone(), request, Bypass::Method).await?;
    let urls = unsafe_request.urls(&cache, response.status(), response.headers());
    if !urls.is_empty()
        && let Err(error) = cache.invalidator().invalidate_urls(&urls).await
    {
        tracing::warn!(%error, ?urls, "invalidation after an unsafe method failed");
    }
    Ok(response)
}

async fn cacheable<S, ReqBody, ResBody>(
    mut inner: S,
    cache: Cache,
    flights: Option<Arc<Flights>>,
    key: PageKey,
    request: Request<ReqBody>,
) -> Result<Response<PageBody<ResBody>>, S::Error>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Unpin,
{
    let metrics = cache.metrics();
    let role = flights.map(|f| f.join(&key.escaped));
    // The clock must be read before the render starts (see DESIGN.md); a
    // follower also judges the leader's render by it.
    let clock = match cache.read_clock().await {
        Ok(clock) => clock,
        Err(error) => {
            metrics.bypassed(Bypass::Unavailable);
            tracing::debug!(%error, "cache bypass: invalidation clock unavailable");
            return bypass(inner, cache, request, Bypass::Unavailable).await;
        }
    };
    let leader = match role {
        None => None,
        Some(Role::Leader(leader)) => Some(leader),
        Some(Role::Follower(follower)) => {
            // The leader's render may predate an invalidation that finished
            // before this request arrived: share it only when no invalidation
            // started between the leader's clock read and this one.
            let shared = follower
                .shared()
                .await
                .filter(|shared| shared.clock >= clock);
            if let Some(shared) = shared {
                metrics.shared.fetch_add(1, Ordering::Relaxed);
                let mut response = Response::new(PageBody::buffered(shared.body.clone(), None));
                *response.status_mut() = shared.status;
                *response.headers_mut() = shared.headers.clone();
                mark(&mut response, Outcome::Collapsed);
                return Ok(response);
            }
            // The leader's response was not cacheable, is older than an
            // invalidation, or the leader went away: render ourselves (with
            // this request's clock, read before its render as well).
            None
        }
    };

    metrics.misses.fetch_add(1, Ordering::Relaxed);
    let request_time = SystemTime::now();
    let response = inner.call(request).await?;
    let timing = policy::Timing {
        request: request_time,
        response: SystemTime::now(),
    };
    let (mut parts, body) = response.into_parts();
    // Every configured tag header, each value parsed with its separator.
    let mut header_tags: Option<Vec<String>> = Some(Vec::new());
    for (name, separator) in &cache.policy().tag_headers {
        for value in parts.headers.get_all(name) {
            header_tags = header_tags.and_then(|mut tags| {
                tags.extend(tags::parse_header(value.as_bytes(), *separator)?);
                Some(tags)
            });
        }
    }
    strip_tags(&cache, &mut parts.headers);

    let config = &cache.config().cache;
    let decision = if parts.extensions.get::<SkipCache>().is_some() {
        Err(Bypass::OptOut)
    } else {
        policy::check_response(
            cache.policy(),
            config.ttl_secs,
            parts.status,
            &parts.headers,
            &key.uri,
            timing,
        )
    };
    let tags = decision.and_then(|ttl| {
        let mut tags = header_tags.ok_or(Bypass::Tags)?;
        if let Some(extension) = parts.extensions.get::<CacheTags>() {
            tags.extend(extension.as_slice().iter().map(|t| t.trim().to_owned()));
        }
        tags.sort();
        tags.dedup();
        if tags.len() > tags::MAX_TAGS_PER_PAGE
            || tags.iter().any(|t| t.len() > tags::MAX_TAG_BYTES)
        {
            return Err(Bypass::Tags);
        }
        Ok((ttl, tags))
    });
    let (ttl, tags) = match tags {
        Ok(ok) => ok,
        Err(reason) => {
            metrics.bypassed(reason);
            tracing::debug!(reason = reason.reason(), "cache bypass (response)");
            let mut response = Response::from_parts(parts, PageBody::inner(body));
            mark(&mut response, Outcome::NotStored(Some(reason)));
            return Ok(response);
        }
    };

    let limit = if config.gzip {
        config.max_body_bytes.saturating_mul(GZIP_BUFFER_FACTOR)
    } else {
        config.max_body_bytes
    };
    let (data, trailers) = match collect_limited(body, limit).await {
        Collected::Complete(data, trailers) => (data, trailers),
        Collected::TooLarge(prefix, rest) => {
            metrics.bypassed(Bypass::TooLarge);
            let mut response = Response::from_parts(parts, PageBody::chain(prefix, rest));
            mark(&mut response, Outcome::NotStored(Some(Bypass::TooLarge)));
            return Ok(response);
        }
        Collected::Failed(prefix, error) => {
            let mut response = Response::from_parts(parts, PageBody::failed(prefix, error));
            mark(&mut response, Outcome::NotStored(None));
            return Ok(response);
        }
    };
    if trailers.is_none() {
        set_status(&mut parts.headers, Outcome::Stored);
    } else {
        // Trailers cannot be stored for nginx; the response itself is fine.
        parts.headers.insert(X_CACHE.clone(), MISS.clone());
        parts.headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static("mcpage; fwd=uri-miss"),
        );
    }
    if let Some(leader) = &leader {
        leader.finish(trailers.is_none().then(|| {
            Arc::new(Shared {
                status: parts.status,
                headers: parts.headers.clone(),
                body: data.clone(),
                clock,
            })
        }));
    }
    if trailers.is_none() {
        cache.spawn_write(PageWrite {
            key,
            body: data.clone(),
            ttl,
            tags,
            clock,
            flight: leader.map(lock::Leader::into_permit),
        });
    }
    Ok(Response::from_parts(
        parts,
        PageBody::buffered(data, trailers),
    ))
}

enum Collected<B: Body> {
    Complete(Bytes, Option<HeaderMap>),
    TooLarge(Bytes, B),
    Failed(Bytes, B::Error),
}

/// Read the whole body if it fits in `limit` bytes.
async fn collect_limited<B>(mut body: B, limit: usize) -> Collected<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Collected::Complete(buffer.freeze(), None),
            Some(Err(error)) => return Collected::Failed(buffer.freeze(), error),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buffer.extend_from_slice(&data);
                    if buffer.len() > limit {
                        return Collected::TooLarge(buffer.freeze(), body);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Collected::Complete(buffer.freeze(), Some(trailers));
                    }
                }
            },
        }
    }
}
