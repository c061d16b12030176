//! The one error type of the library.

use std::sync::Arc;

use crate::key::KeySkip;

/// Everything that can go wrong in mcpage, one variant per failure.
///
/// Request-path problems (a memcached outage, a key nginx would reject) never
/// surface as errors to HTTP clients: the layer fails open. These errors reach
/// callers of configuration loading, of [`Cache::store_page`](crate::Cache::store_page)
/// and of the [`Invalidator`](crate::Invalidator), where silence would be a lie.
/// [`Error::server`] names the memcached server an error is about, if any.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid; `field` names it (`cache.include[2]`).
    #[error("invalid config `{field}`: {reason}")]
    Config {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration could not be read or parsed (file, TOML, env).
    #[error("cannot load config: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A memcached server did not confirm an operation (transport error,
    /// timeout, or an answer the client rejected). Shared by every operation
    /// of a pipelined batch that failed as a whole, hence the `Arc`.
    #[error("memcached {server}: {source}")]
    Memcached {
        /// The server as written in the config.
        server: String,
        /// What the client reported.
        #[source]
        source: Arc<memcache::exp::Error>,
    },
    /// A memcached server answered something the operation cannot use.
    #[error("memcached {server}: {message}")]
    Protocol {
        /// The server as written in the config.
        server: String,
        /// What was unexpected.
        message: String,
    },
    /// The circuit breaker for a server is open: recent calls failed, so the
    /// call was not attempted.
    #[error("memcached {server}: circuit breaker open after repeated failures")]
    BreakerOpen {
        /// The server as written in the config.
        server: String,
    },
    /// A compare-and-swap loop on one item (an invalidation clock, a tag
    /// index item) lost every round to concurrent writers.
    #[error("memcached {server}: item `{item}` kept changing under concurrent writers")]
    Contended {
        /// The server as written in the config.
        server: String,
        /// The item's key, lossily decoded.
        item: String,
    },
    /// memcached did not confirm an invalidation. The tags, URLs or prefixes
    /// it did not confirm are queued and retried in the background, with
    /// backoff, until memcached confirms ([`Invalidator::pending`]
    /// says what is waiting). Until then their pages may be stale.
    ///
    /// [`Invalidator::pending`]: crate::Invalidator::pending
    #[error(
        "invalidation not confirmed by memcached; {items} tag(s)/URL(s)/prefix(es) pending, retried until confirmed (first failure: {first})"
    )]
    Pending {
        /// Tags, URLs and prefixes of this call that are pending.
        items: usize,
        /// The first failure, for the log line.
        #[source]
        first: Box<Error>,
    },
    /// memcached did not confirm an invalidation, and the retry queue is full
    /// (`invalidation.pending_limit`): it is **not** retried; call again later.
    #[error(
        "invalidation retry queue full ({limit} items): not retried; call again later{}",
        .first.as_ref().map(|e| format!(" (first failure: {e})")).unwrap_or_default()
    )]
    QueueFull {
        /// `invalidation.pending_limit`.
        limit: usize,
        /// The memcached failure that left the call unconfirmed (none when
        /// [`Invalidator::restore`](crate::Invalidator::restore) found no room).
        #[source]
        first: Option<Box<Error>>,
    },
    /// Too many callers are already waiting for the next combined
    /// invalidation (`invalidation.max_waiting`); nothing was done.
    #[error("{waiting} invalidations already waiting; retry after {} s", .retry_after.as_secs())]
    Overloaded {
        /// Callers waiting when this one was refused.
        waiting: usize,
        /// A fair time to wait before calling again (the last run's duration, at least 1 s).
        retry_after: std::time::Duration,
    },
    /// The invalidation task stopped before it answered (the runtime is
    /// shutting down); whether pages were removed is unknown.
    #[error("the invalidation task stopped before it answered")]
    Stopped,
    /// A URL given to the API maps to no cache key, so it can have no page.
    #[error("`{url}` has no cache key ({})", .reason.reason())]
    NoCacheKey {
        /// The URL as given.
        url: String,
        /// Why nginx would not look it up.
        #[source]
        reason: KeySkip,
    },
    /// [`Cache::store_page`](crate::Cache::store_page): the page was stored,
    /// then deleted again because an invalidation overlapped the write.
    #[error("`{url}` was invalidated while being stored")]
    Retracted {
        /// The URL as given.
        url: String,
    },
    /// The write path could not start a page store, or have it answered,
    /// within the write window after its clock pre-check
    /// (`invalidation.write_window_ms`): the page is not kept (a store that
    /// may have landed is deleted again). Only a slow or overloaded memcached
    /// causes it; the request was served, the page is simply not cached.
    #[error(
        "page store not {stage}ed within the write window ({elapsed_ms} ms after the clock check; window {window_ms} ms)"
    )]
    WriteWindow {
        /// `start` (too late to send) or `answer` (sent, no answer in time).
        stage: &'static str,
        /// Milliseconds since the pre-check started.
        elapsed_ms: u64,
        /// `invalidation.write_window_ms`.
        window_ms: u64,
    },
    /// Compressing a page (`cache.gzip`) failed.
    #[error("gzip failed: {0}")]
    Gzip(#[source] std::io::Error),
    /// The stored body would exceed `cache.max_body_bytes` (after gzip when enabled).
    #[error("body of {bytes} bytes exceeds cache.max_body_bytes ({limit})")]
    TooLarge {
        /// Size of the body as it would be stored.
        bytes: usize,
        /// `cache.max_body_bytes`.
        limit: usize,
    },
    /// A tag index item cannot take another record even after compaction.
    #[error(
        "memcached {server}: tag index item `{item}` is full ({bytes} bytes); raise cache.index_shards"
    )]
    IndexFull {
        /// The index server as written in the config.
        server: String,
        /// The index item's key.
        item: String,
        /// Its size after compaction.
        bytes: usize,
    },
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The memcached server (as written in the config) this error is about,
    /// if it is about one; for [`Error::Pending`] and [`Error::QueueFull`], that of the first failure.
    pub fn server(&self) -> Option<&str> {
        match self {
            Error::Memcached { server, .. }
            | Error::Protocol { server, .. }
            | Error::BreakerOpen { server }
            | Error::Contended { server, .. }
            | Error::IndexFull { server, .. } => Some(server),
            Error::Pending { first, .. } => first.server(),
            Error::QueueFull { first, .. } => first.as_deref().and_then(Error::server),
            _ => None,
        }
    }

    /// The same failure again (errors are not `Clone`: sources are shared or
    /// rendered), for one failure reported to several callers.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Memcached { server, source } => Error::Memcached {
                server: server.clone(),
                source: Arc::clone(source),
            },
            Error::BreakerOpen { server } => Error::BreakerOpen {
                server: server.clone(),
            },
            Error::Contended { server, item } => Error::Contended {
                server: server.clone(),
                item: item.clone(),
            },
            Error::Stopped => Error::Stopped,
            other => Error::Protocol {
                server: other.server().unwrap_or_default().to_owned(),
                message: other.detail(),
            },
        }
    }

    /// What went wrong on the server, without the `memcached <server>: `
    /// prefix of the `Display` form (for reports that name the server apart).
    /// Errors that are not about a server give their whole message.
    pub fn detail(&self) -> String {
        match self {
            Error::Memcached { source, .. } => source.to_string(),
            Error::Protocol { message, .. } => message.clone(),
            Error::BreakerOpen { .. } => "circuit breaker open after repeated failures".to_owned(),
            Error::Contended { item, .. } => {
                format!("item `{item}` kept changing under concurrent writers")
            }
            Error::IndexFull { item, bytes, .. } => {
                format!("tag index item `{item}` is full ({bytes} bytes); raise cache.index_shards")
            }
            other => other.to_string(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_the_server_an_error_is_about() {
        let protocol = Error::Protocol {
            server: "127.0.0.1:11211".into(),
            message: "odd".into(),
        };
        assert_eq!(protocol.server(), Some("127.0.0.1:11211"));
        assert_eq!(protocol.detail(), "odd");
        assert_eq!(protocol.to_string(), "memcached 127.0.0.1:11211: odd");
        assert_eq!(protocol.duplicate().to_string(), protocol.to_string());
        let pending = Error::Pending {
            items: 1,
            first: Box::new(protocol),
        };
        assert_eq!(pending.server(), Some("127.0.0.1:11211"));
        let too_large = Error::TooLarge { bytes: 2, limit: 1 };
        assert_eq!(too_large.server(), None);
        assert_eq!(too_large.detail(), too_large.to_string());
    }
}
