//! Counters and the snapshots [`Cache::stats`](crate::Cache::stats),
//! `/_mcpage/metrics` and `mcpage stats` report.

use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use strum::{EnumCount, IntoEnumIterator};

use crate::error::Result;
use crate::policy::Bypass;

/// Counters since start, shared by the layer, the write path and the invalidator.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) stores: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) retracted: AtomicU64,
    pub(crate) late: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) shared: AtomicU64,
    bypass: [AtomicU64; Bypass::COUNT],
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidation_errors: AtomicU64,
    pub(crate) invalidation_runs: AtomicU64,
    pub(crate) invalidation_retries: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) pages_removed: AtomicU64,
}

impl Metrics {
    pub(crate) fn bypassed(&self, reason: Bypass) {
        self.bypass[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, servers: Vec<ServerStats>, pending: Pending) -> CacheStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            stores: load(&self.stores),
            store_errors: load(&self.store_errors),
            retracted: load(&self.retracted),
            late: load(&self.late),
            misses: load(&self.misses),
            shared: load(&self.shared),
            bypass: Bypass::iter()
                .map(|reason| BypassCount {
                    reason,
                    count: load(&self.bypass[reason as usize]),
                })
                .collect(),
            invalidations: load(&self.invalidations),
            invalidation_errors: load(&self.invalidation_errors),
            invalidation_runs: load(&self.invalidation_runs),
            invalidation_retries: load(&self.invalidation_retries),
            invalidations_refused: load(&self.refused),
            pending,
            pages_removed: load(&self.pages_removed),
            servers,
        }
    }
}

/// A snapshot of the counters, for `/_mcpage/metrics` and `mcpage stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Pages stored in memcached.
    pub stores: u64,
    /// Stores that failed (memcached error, breaker open, index full).
    pub store_errors: u64,
    /// Renders not kept because an invalidation overlapped them: not stored
    /// (the clock pre-check saw it) or deleted again right after storing.
    pub retracted: u64,
    /// Pages not cached because memcached could not take the store within
    /// the write window (`invalidation.write_window_ms`).
    pub late: u64,
    /// Cacheable requests that reached the application.
    pub misses: u64,
    /// Requests answered from another request's render (single-flight).
    pub shared: u64,
    /// Requests not cached, one entry per [`Bypass`] reason (zeros included).
    pub bypass: Vec<BypassCount>,
    /// Completed invalidation calls.
    pub invalidations: u64,
    /// Invalidation calls that returned an error (pending, refused, ...).
    pub invalidation_errors: u64,
    /// Protocol runs (concurrent calls are combined into one run).
    pub invalidation_runs: u64,
    /// Background retries of pending invalidations.
    pub invalidation_retries: u64,
    /// Invalidation calls refused because too many were waiting.
    pub invalidations_refused: u64,
    /// Invalidations memcached has not confirmed yet (retried in the background).
    pub pending: Pending,
    /// Pages removed by invalidation.
    pub pages_removed: u64,
    /// Per memcached server (pages and index pool).
    pub servers: Vec<ServerStats>,
}

/// Requests not cached for one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BypassCount {
    /// The reason.
    pub reason: Bypass,
    /// Requests since start.
    pub count: u64,
}

/// The client's view of one memcached server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// As written in the config.
    pub name: String,
    /// The circuit breaker is open: request-path work skips this server.
    pub breaker_open: bool,
    /// Times the breaker opened since start.
    pub breaker_opened: u64,
    /// Failed operations since start.
    pub errors: u64,
}

/// Tag index items on one index server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexUsage {
    /// Index items (tag shards).
    pub items: u64,
    /// Their total size in bytes (as memcached counts items).
    pub bytes: u64,
    /// The largest one.
    pub largest: u64,
}

/// What one memcached server answered to a diagnostic command.
#[derive(Debug)]
#[non_exhaustive]
pub struct ServerReport<T> {
    /// The server as written in the config.
    pub server: String,
    /// Its answer, or why there is none.
    pub result: Result<T>,
}

/// What waits to be retried ([`Invalidator::pending`](crate::Invalidator::pending)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pending {
    /// Tags, URLs and prefixes waiting.
    pub count: usize,
    /// How long the oldest has waited.
    pub oldest: Option<Duration>,
    /// Failed retries in a row.
    pub attempts: u32,
    /// The last failure, while anything is pending.
    pub last_error: Option<String>,
}
