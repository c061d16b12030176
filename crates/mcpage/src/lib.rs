//! mcpage: a full-page cache that nginx serves by itself.
//!
//! The application stores each rendered page in memcached under exactly the key
//! nginx's `memcached_pass` computes, so a hit never reaches the application.
//! Pages are registered under tags; [`Invalidator::invalidate_tags`] removes every
//! page that depends on a tag, on every memcached server, without races.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use mcpage::{Cache, CacheTags, Config, PageCacheLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::load(None)?; // mcpage.toml + MCPAGE_* env
//! let cache = Cache::connect(&config).await?;
//! let app: Router = Router::new()
//!     .route("/", get(|| async {
//!         (CacheTags::new(["home", "comments"]), axum::response::Html("<h1>hi</h1>"))
//!     }))
//!     .layer(PageCacheLayer::new(cache.clone()));
//! // after a commit that changes comments:
//! let removed = cache.invalidator().invalidate_tags(["comments"]).await?;
//! # let _ = (app, removed);
//! # Ok(())
//! # }
//! ```
//!
//! # Map of the crate
//!
//! In the order a request meets them:
//!
//! - [`config`](Config): one [`Config`] for both sides; `mcpage nginx` renders
//!   the nginx side ([`nginx`]) from it, so the two cannot drift.
//! - [`key`]: the request target as nginx normalizes it (`$uri`), the value V
//!   nginx hashes and the escaped key K it sends (`reference/nginx-memcached.md`).
//! - [`ring`]: which memcached server nginx asks for V.
//! - `policy`: may this request, then this response, be cached ([`Bypass`]).
//! - `layer`: the tower middleware ([`PageCacheLayer`]); concurrent misses
//!   coalesce in `lock` (single-flight, a leaf module).
//! - `put`: the write path (register the page in its tags' index, store it,
//!   re-check the clocks); `clock`: the invalidation clocks both protocols
//!   agree through; `tags`: the tag index format.
//! - `invalidate`: the [`Invalidator`]: concurrent calls combined into runs,
//!   unconfirmed ones queued and retried; `invalidate::run`, the protocol of
//!   one run (raise clocks, settle, delete, clear the index).
//! - `memcached`: the client (one meta-protocol client per server, circuit
//!   breakers, pipelined batches, text-protocol diagnostics).
//! - `cache`: the [`Cache`] handle that owns all of the above; `stats`: counters.
#![forbid(unsafe_code)]

mod cache;
mod clock;
mod config;
mod error;
mod hit;
mod invalidate;
pub mod key;
mod layer;
mod lock;
mod memcached;
pub mod nginx;
mod policy;
mod put;
pub mod ring;
mod stats;
mod tags;

#[cfg(test)]
mod reference_tests;

/// The README's examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use cache::Cache;
pub use config::{
    CacheConfig, Config, InvalidationConfig, KeysConfig, MemcachedConfig, NginxConfig, ProxyConfig,
    ServerSpec, TagHeader, TagSeparator,
};
pub use error::{Error, Result};
pub use hit::CHECKED_HEADERS;
pub use invalidate::{Invalidator, PendingItem, Removed, RemovedItem, Target};
pub use layer::{CacheTags, PageBody, PageCache, PageCacheLayer, SkipCache};
pub use memcached::MemcachedClient;
pub use policy::{Bypass, UNKEYED_HEADERS};
pub use stats::{BypassCount, CacheStats, IndexUsage, Pending, ServerReport, ServerStats};
