//! The write path (DESIGN.md "Write path"): a rendered page becomes a
//! memcached item nginx serves, without ever outliving an invalidation.
//!
//! 1. Encode the body (gzip when enabled) and check its size first: a body
//!    that turns out too large must not leave an index record.
//! 2. Register the page key in one shard of every tag's index (an atomic
//!    append, compacting shards that have doubled). If that fails, stop.
//! 3. **Pre-check**: note the time t0, then read the clocks of its tags, its
//!    URL and purges ([`Clocks`]). If any advanced past the G read before the
//!    render, an invalidation overlapped it: do not store (`Abandoned`).
//! 4. Store the page under its key, on the server nginx asks, only if that
//!    is still within the write window W (`invalidation.write_window_ms`)
//!    after t0, and with W as the store's own deadline. A store that is not
//!    answered in time is deleted again and reported ([`Error::WriteWindow`]).
//! 5. **Post-check**: re-read the same clocks; if any advanced, delete the
//!    page again (`Retracted`).
//!
//! # Why a request that starts after an invalidation returned never sees this page stale
//!
//! Let an invalidation I (invalidate.rs) raise a clock this page depends on
//! to C (every raise confirmed, at time r), and let this render have read
//! G = g < C (it may show data older than what I covers). The pre-check's
//! clock read lands in memcached either after I's raise or before it:
//!
//! - After: it sees C > g and the page is never stored.
//! - Before: then t0 < r, and the index records (step 2, confirmed before t0)
//!   landed before I's raise, so I finds them when it reads the index. The
//!   store was started before t0 + W with a deadline of W: it was answered
//!   before t0 + 2W, or given up at that deadline (and memcached is assumed
//!   not to execute it later: the one assumption, below). So the store
//!   executed before t0 + 2W < r + 2W. I waits 2W after r before it reads the
//!   index and deletes, so its delete of this key executes after the store:
//!   when I returns, the page is gone, and no later store of this render exists.
//!
//! A render with g >= C read G after I raised it, so after the commit I
//! covers (callers invalidate after committing): its page is fresh.
//! Single-flight followers are judged the same way (layer/service.rs).
//!
//! The assumption: memcached does not execute a store after the writer's
//! deadline for it has passed unanswered. A healthy memcached answers in
//! microseconds; a memcached paused (SIGSTOP, a frozen VM) with a store in
//! flight can execute it later, possibly after an invalidation's delete. The
//! writer deletes such a store again, the post-check catches most of the
//! rest, and the page TTL bounds what remains (README, "What mcpage promises").
//!
//! Writes run in the background ([`Writer::spawn`]), bounded in number; the
//! request that rendered the page never waits on memcached.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use memcache::exp::{Delete, Get, Meta, MutationStatus, Set, Ttl};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::clock::Clocks;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::key::PageKey;
use crate::lock::Permit;
use crate::memcached::{Circuit, Pool, Server};
use crate::stats::Metrics;
use crate::tags::{self, IndexKeys};

/// Background writes running at once; more wait for a slot.
const MAX_CONCURRENT_WRITES: usize = 64;
/// Writes waiting for a slot; beyond this a page is simply not cached.
const MAX_QUEUED_WRITES: usize = 10_000;
/// Rounds of append / add when index items appear and disappear concurrently.
const REGISTER_ROUNDS: usize = 3;
/// Rounds of a CAS-guarded compaction before appending anyway.
const COMPACT_ROUNDS: usize = 4;

/// A rendered page on its way to memcached.
#[derive(Debug)]
pub(crate) struct PageWrite {
    pub(crate) key: PageKey,
    pub(crate) body: Bytes,
    /// Seconds.
    pub(crate) ttl: u32,
    /// Sorted, without duplicates or empty tags.
    pub(crate) tags: Vec<String>,
    /// The invalidation clock G read before the render started.
    pub(crate) clock: u64,
    /// The layer's single-flight for this page: held, never read, so that
    /// requests share the render until the write ends (dropped with the page).
    #[expect(dead_code, reason = "held for its Drop")]
    pub(crate) flight: Option<Permit>,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Stored,
    /// Not stored: the pre-check saw an invalidation that overlapped the render.
    Abandoned,
    /// Stored, then deleted: the post-check saw an overlapping invalidation.
    Retracted,
}

/// The write path's state: pools, clocks, limits and the background tasks.
#[derive(Debug)]
pub(crate) struct Writer {
    pages: Arc<Pool>,
    index: Arc<Pool>,
    clocks: Clocks,
    index_keys: IndexKeys,
    gzip_flag: Option<u32>,
    max_body_bytes: usize,
    index_shard_max_bytes: usize,
    index_ttl: u32,
    metrics: Arc<Metrics>,
    /// W: the store starts within W of the pre-check and has W to be answered.
    window: Duration,
    tasks: TaskTracker,
    /// Bounds concurrent background writes (and so memcached connections).
    slots: Arc<Semaphore>,
}

enum Compacted {
    AlreadyListed,
    Size(usize),
}

impl Writer {
    pub(crate) fn new(
        pages: Arc<Pool>,
        index: Arc<Pool>,
        clocks: Clocks,
        index_keys: IndexKeys,
        cache: &CacheConfig,
        window: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Writer {
            pages,
            index,
            clocks,
            index_keys,
            gzip_flag: cache.gzip.then_some(cache.gzip_flag),
            max_body_bytes: cache.max_body_bytes,
            index_shard_max_bytes: cache.index_shard_max_bytes,
            index_ttl: tags::index_ttl(cache.ttl_secs),
            metrics,
            window,
            tasks: TaskTracker::new(),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_WRITES)),
        }
    }

    /// Start the write path for a rendered page off the response path.
    pub(crate) fn spawn(self: &Arc<Self>, page: PageWrite) {
        if self.tasks.len() >= MAX_QUEUED_WRITES {
            let dropped = self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            if dropped % 1000 == 0 {
                tracing::warn!(
                    "background write queue full ({MAX_QUEUED_WRITES}): pages not cached"
                );
            }
            return;
        }
        let writer = Arc::clone(self);
        self.tasks.spawn(async move {
            let Ok(_slot) = Arc::clone(&writer.slots).acquire_owned().await else {
                return;
            };
            let key = String::from_utf8_lossy(&page.key.escaped).into_owned();
            match writer.write(&page).await {
                Ok(Written::Stored) => {
                    writer.metrics.stores.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Written::Retracted | Written::Abandoned) => {
                    writer.metrics.retracted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key, "invalidated during render; not kept");
                }
                Err(error @ Error::WriteWindow { .. }) => {
                    writer.metrics.late.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key, %error, "page not cached");
                }
                Err(error) => {
                    writer.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key, %error, "page not cached");
                }
            }
            // Stored (nginx answers from now on) or not: new requests render
            // again. Dropping `page` drops its flight permit.
        });
    }

    /// Wait until every background write started so far has finished.
    pub(crate) async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }

    /// Register in every tag's index, pre-check the clocks, store within the
    /// write window, then post-check the clocks (see the module docs).
    ///
    /// # Errors
    /// The body is too large or cannot be compressed; a tag's index item is
    /// full; memcached did not confirm the registration or the store; a
    /// clock could not be read (then the page is not stored, or deleted
    /// again); [`Error::WriteWindow`] when the store could not start or be
    /// answered within the write window (then it is deleted again).
    pub(crate) async fn write(&self, page: &PageWrite) -> Result<Written> {
        let (body, flags) = self.encode_body(&page.body)?;
        self.register(page).await?;
        let ik = &self.index_keys;
        let mut clocks: Vec<Vec<u8>> = page.tags.iter().map(|tag| ik.tag_clock(tag)).collect();
        clocks.push(ik.url_clock(&page.key.escaped));
        clocks.push(ik.purge_clock());

        // t0 is taken before the pre-check is sent: the bound the proof uses.
        let t0 = Instant::now();
        if self
            .clocks
            .advanced_since(clocks.clone(), page.clock)
            .await?
        {
            return Ok(Written::Abandoned);
        }
        let server = self.pages.route(&page.key.unescaped);
        let window_error = |stage| Error::WriteWindow {
            stage,
            elapsed_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            window_ms: u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX),
        };
        if t0.elapsed() >= self.window {
            return Err(window_error("start"));
        }
        let set = Set::new(&page.key.escaped, body)
            .client_flags(flags)
            .ttl(Ttl::secs(page.ttl));
        match tokio::time::timeout(self.window, server.run(Circuit::Honour, set)).await {
            Ok(Ok(stored)) if stored.applied() => {}
            Ok(Ok(stored)) => {
                return Err(server.protocol(format!("page store answered {:?}", stored.status)));
            }
            Ok(Err(error)) => {
                // It may have been executed (written, then the answer failed).
                if !matches!(error, Error::BreakerOpen { .. }) {
                    let _ = retract(server, page).await;
                }
                return Err(error);
            }
            Err(_) => {
                let _ = retract(server, page).await;
                return Err(window_error("answer"));
            }
        }
        match self.clocks.advanced_since(clocks, page.clock).await {
            Ok(false) => Ok(Written::Stored),
            Ok(true) => {
                retract(server, page).await?;
                Ok(Written::Retracted)
            }
            Err(error) => {
                // Cannot tell whether an invalidation overlapped: do not keep it.
                retract(server, page).await?;
                Err(error)
            }
        }
    }

    /// The bytes to store and their client flags (nginx's `memcached_gzip_flag`).
    fn encode_body(&self, body: &Bytes) -> Result<(Vec<u8>, u32)> {
        let (bytes, flags) = match self.gzip_flag {
            Some(flag) => {
                use std::io::Write;
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 3),
                    flate2::Compression::fast(),
                );
                let gz = encoder
                    .write_all(body)
                    .and_then(|()| encoder.finish())
                    .map_err(Error::Gzip)?;
                (gz, flag)
            }
            None => (body.to_vec(), 0),
        };
        if bytes.len() > self.max_body_bytes {
            return Err(Error::TooLarge {
                bytes: bytes.len(),
                limit: self.max_body_bytes,
            });
        }
        Ok((bytes, flags))
    }

    /// Append the page key to one shard of every tag, compacting shards that
    /// have doubled since their last compaction.
    async fn register(&self, page: &PageWrite) -> Result<()> {
        if page.tags.is_empty() {
            return Ok(());
        }
        let max = self.index_shard_max_bytes;
        let ttl = self.index_ttl;
        let record = tags::record(&page.key.escaped, page.clock);
        let shards: Vec<Vec<u8>> = page
            .tags
            .iter()
            .map(|tag| self.index_keys.shard_for(tag, &page.key.escaped))
            .collect();
        // One round trip: size and compaction mark of every shard, extending
        // its life so it outlives the page about to be stored.
        let probes = shards
            .iter()
            .map(|k| {
                let get = Get::new(k)
                    .without_value()
                    .meta(Meta::NONE.size())
                    .touch(Ttl::secs(ttl));
                (k.clone(), get)
            })
            .collect();
        let probed = self.index.run_routed(Circuit::Honour, probes).await;
        let mut appends = Vec::with_capacity(shards.len());
        for (shard, probe) in shards.iter().zip(probed) {
            let probe = probe?;
            let size = usize::try_from(probe.item.size.unwrap_or(0)).unwrap_or(usize::MAX);
            let compacted = probe.client_flags.unwrap_or(0) as usize;
            let mut size = if probe.hit() { size } else { 0 };
            if size + record.len() > max || tags::needs_compaction(size, compacted, record.len()) {
                match self
                    .compact_shard(shard, &page.key.escaped, page.clock)
                    .await?
                {
                    Compacted::AlreadyListed => continue,
                    Compacted::Size(new) => size = new,
                }
            }
            if size + record.len() > max {
                return Err(Error::IndexFull {
                    server: self.index.route(shard).name().to_owned(),
                    item: String::from_utf8_lossy(shard).into_owned(),
                    bytes: size,
                });
            }
            let append = Set::new(shard, &record).append().vivify_ttl(ttl);
            appends.push((shard.clone(), append));
        }
        // memcached before 1.6.21 ignores autovivify on append (answers NS):
        // create the missing items with `add`, and append again where another
        // writer created one first. Never read-modify-write.
        let mut pending = appends;
        for _ in 0..REGISTER_ROUNDS {
            let results = self
                .index
                .run_routed(Circuit::Honour, pending.clone())
                .await;
            let mut missing = Vec::new();
            for ((shard, _), result) in pending.iter().zip(results) {
                if !result?.applied() {
                    missing.push((
                        shard.clone(),
                        Set::new(shard, &record).ttl(Ttl::secs(ttl)).add(),
                    ));
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            let results = self
                .index
                .run_routed(Circuit::Honour, missing.clone())
                .await;
            pending = Vec::new();
            for ((shard, _), result) in missing.iter().zip(results) {
                if !result?.applied() {
                    pending.push((
                        shard.clone(),
                        Set::new(shard, &record).append().vivify_ttl(ttl),
                    ));
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
        }
        let shard = pending
            .first()
            .map(|(shard, _)| shard.clone())
            .unwrap_or_default();
        Err(Error::Contended {
            server: self.index.route(&shard).name().to_owned(),
            item: String::from_utf8_lossy(&shard).into_owned(),
        })
    }

    /// Keep one record per page (its latest clock), CAS-guarded so a
    /// concurrent append or invalidation is never overwritten. Tells whether the
    /// page is already listed at `clock` or later (then no append is needed).
    async fn compact_shard(&self, shard: &[u8], page_key: &[u8], clock: u64) -> Result<Compacted> {
        let server = self.index.route(shard);
        for _ in 0..COMPACT_ROUNDS {
            let current = server
                .run(Circuit::Honour, Get::new(shard).meta(Meta::NONE.cas()))
                .await?;
            let (Some(value), Some(cas)) = (current.value.as_deref(), current.item.cas) else {
                return Ok(Compacted::Size(0));
            };
            let compacted = tags::compact(value);
            let listed = tags::lists(&compacted, page_key, clock);
            if compacted.len() == value.len() {
                return Ok(if listed {
                    Compacted::AlreadyListed
                } else {
                    Compacted::Size(value.len())
                });
            }
            let size = compacted.len();
            let flags = u32::try_from(size).unwrap_or(u32::MAX);
            let set = Set::new(shard, compacted)
                .client_flags(flags)
                .ttl(Ttl::secs(self.index_ttl))
                .compare_cas(cas);
            match server.run(Circuit::Honour, set).await?.status {
                MutationStatus::Applied => {
                    return Ok(if listed {
                        Compacted::AlreadyListed
                    } else {
                        Compacted::Size(size)
                    });
                }
                MutationStatus::NotFound => return Ok(Compacted::Size(0)),
                _ => continue,
            }
        }
        // Lost every race to concurrent writers: append anyway; the next writer compacts.
        Ok(Compacted::Size(0))
    }
}

/// Delete a page just stored (an invalidation overlapped its render, or the
/// store's answer did not come in time).
async fn retract(server: &Server, page: &PageWrite) -> Result<()> {
    server
        .run(Circuit::Ignore, Delete::new(&page.key.escaped))
        .await
        .map(drop)
}
