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
#![forbid(unsafe_code)]

mod breaker;
mod cache;
pub mod config;
mod error;
mod invalidate;
pub mod key;
pub mod layer;
pub mod nginx;
mod policy;
pub mod ring;
mod store;
mod tags;

#[cfg(test)]
mod reference_tests;

/// The README's examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use cache::{Cache, CacheStats, IndexUsage, ServerStats};
pub use config::Config;
pub use error::{Error, Result};
pub use invalidate::{Invalidator, Removed};
pub use layer::{CacheTags, PageCache, PageCacheLayer};
pub use policy::Bypass;
