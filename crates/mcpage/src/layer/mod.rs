//! [`PageCacheLayer`]: store anonymous pages where nginx will find them.
//!
//! ```no_run
//! use axum::{Router, response::Html, routing::get};
//! use mcpage::{Cache, CacheTags, Config, PageCacheLayer};
//!
//! async fn article() -> (CacheTags, Html<&'static str>) {
//!     (CacheTags::new(["article:42", "comments"]), Html("<h1>Article 42</h1>"))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Cache::connect(&Config::default()).await?;
//! let app: Router = Router::new()
//!     .route("/articles/42", get(article))
//!     .layer(PageCacheLayer::new(cache));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! For each request the layer decides, without touching memcached, whether the
//! request may be cached (anonymous GET, path included and not excluded, a key
//! nginx can compute). Bypassed requests go straight to the service and get
//! `X-Cache: BYPASS`. A cacheable request reads the invalidation clock, runs the
//! service, and when the response passes the policy (200, cached content type,
//! no `Set-Cookie`, not private, small enough) answers `X-Cache: MISS` and stores
//! the page in the background. memcached trouble never fails a request.
//!
//! A request with an unsafe method (anything but GET, HEAD, OPTIONS, TRACE)
//! that gets a 2xx or 3xx invalidates its target URI and the same-site URLs
//! in the response's `Location` and `Content-Location` (RFC 9111 4.4) before
//! the response goes back.
//!
//! Tags come from the [`CacheTags`] response extension and from an
//! `X-Cache-Tags: a, b` response header, which is removed before the client sees it.

mod body;
mod service;
mod unsafe_methods;

#[cfg(feature = "axum")]
use std::convert::Infallible;
use std::sync::Arc;

pub use body::PageBody;
pub use service::PageCache;

use crate::cache::Cache;

/// The tower layer; wraps a service in [`PageCache`].
#[derive(Debug, Clone)]
pub struct PageCacheLayer {
    cache: Cache,
    flights: Arc<service::Flights>,
    single_flight: bool,
}

impl PageCacheLayer {
    /// Cache pages with `cache`.
    pub fn new(cache: Cache) -> Self {
        PageCacheLayer {
            cache,
            flights: Arc::default(),
            single_flight: true,
        }
    }

    /// Concurrent misses for one key render once and share the response
    /// (default: on). Only responses that would be cached are shared, until
    /// the page is stored, and never with a request that arrived after an
    /// invalidation started (it renders itself).
    pub fn single_flight(mut self, enabled: bool) -> Self {
        self.single_flight = enabled;
        self
    }
}

impl<S> tower::Layer<S> for PageCacheLayer {
    type Service = PageCache<S>;

    fn layer(&self, inner: S) -> PageCache<S> {
        PageCache::new(
            inner,
            self.cache.clone(),
            Arc::clone(&self.flights),
            self.single_flight,
        )
    }
}

/// The tags a page depends on; put it in the response extensions (axum: return
/// it as part of the response, e.g. `(CacheTags::new(["comments"]), Html(..))`;
/// plain tower: `response.extensions_mut().insert(tags)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheTags(Vec<String>);

impl CacheTags {
    /// Tags from strings; empty ones are ignored.
    pub fn new<I, T>(tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        CacheTags(
            tags.into_iter()
                .map(Into::into)
                .filter(|t: &String| !t.trim().is_empty())
                .collect(),
        )
    }

    /// Add one tag.
    pub fn push(&mut self, tag: impl Into<String>) {
        let tag = tag.into();
        if !tag.trim().is_empty() {
            self.0.push(tag);
        }
    }

    /// The tags.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponseParts for CacheTags {
    type Error = Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Infallible> {
        match res.extensions_mut().get_mut::<CacheTags>() {
            Some(existing) => existing.0.extend(self.0),
            None => {
                res.extensions_mut().insert(self);
            }
        }
        Ok(res)
    }
}

/// Response extension: never cache this response (e.g. it shows a CSRF token);
/// axum: return it as part of the response, like [`CacheTags`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkipCache;

#[cfg(feature = "axum")]
impl axum::response::IntoResponseParts for SkipCache {
    type Error = Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Infallible> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}
