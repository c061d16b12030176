//! [`Cache`]: the shared handle behind the layer, the invalidator and the CLI,
//! and the write path of DESIGN.md (register, store, recheck).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use memcache::exp::{Arithmetic, Delete, Get, Meta, MutationStatus, Set, Ttl};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::config::{Compiled, Config};
use crate::error::{Error, Result};
use crate::invalidate::Invalidator;
use crate::key::{KeyScheme, KeySkip, PageKey};
use crate::policy::Bypass;
use crate::store::{Mode, Pool};
use crate::tags::{self, IndexKeys};

/// A connected page cache: configuration, memcached pools and counters.
/// Cheap to clone; clones share everything.
#[derive(Clone, Debug)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) compiled: Compiled,
    pub(crate) keys: KeyScheme,
    pub(crate) pages: Arc<Pool>,
    pub(crate) index: Arc<Pool>,
    pub(crate) index_keys: IndexKeys,
    pub(crate) metrics: Metrics,
    writes: TaskTracker,
    /// Bounds concurrent background writes (and so memcached connections).
    write_slots: Arc<Semaphore>,
}

/// Background writes running at once; more wait for a slot.
const MAX_CONCURRENT_WRITES: usize = 64;
/// Writes waiting for a slot; beyond this a page is simply not cached.
const MAX_QUEUED_WRITES: usize = 10_000;

/// Counters since start; see [`Cache::stats`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) stores: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) retracted: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) shared: AtomicU64,
    pub(crate) bypass: [AtomicU64; Bypass::ALL.len()],
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidation_errors: AtomicU64,
    pub(crate) pages_removed: AtomicU64,
}

impl Metrics {
    pub(crate) fn bypassed(&self, reason: Bypass) {
        self.bypass[reason.index()].fetch_add(1, Ordering::Relaxed);
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
    /// Pages deleted again right after storing, because a tag was invalidated during the render.
    pub retracted: u64,
    /// Cacheable requests that reached the application.
    pub misses: u64,
    /// Requests answered from another request's render (single-flight).
    pub shared: u64,
    /// Requests not cached, by reason.
    pub bypass: Vec<(Bypass, u64)>,
    /// Completed invalidation calls.
    pub invalidations: u64,
    /// Invalidation calls that returned an error.
    pub invalidation_errors: u64,
    /// Pages removed by invalidation.
    pub pages_removed: u64,
    /// Per memcached server (pages and index pool).
    pub servers: Vec<ServerStats>,
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

/// What the layer hands to the write path.
#[derive(Debug)]
pub(crate) struct PageWrite {
    pub(crate) key: PageKey,
    pub(crate) body: Bytes,
    pub(crate) ttl: u32,
    pub(crate) tags: Vec<String>,
    /// The invalidation clock read before the render started.
    pub(crate) clock: u64,
    /// The layer's single-flight for this page, closed when the write ends.
    pub(crate) flight: Option<crate::layer::Leader>,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Stored,
    /// Stored, then deleted: an invalidation overlapped the render.
    Retracted,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn parse_clock(value: Option<&[u8]>) -> Option<u64> {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Clock items are never older than this; a clock that expires is recreated
/// at the current time in microseconds, which is above every value handed out.
const CLOCK_TTL_SECS: u32 = 30 * 24 * 3600;

impl Cache {
    /// Validate `config` and set up the memcached pools (connections are dialed lazily).
    pub async fn connect(config: &Config) -> Result<Cache> {
        let compiled = config.compile()?;
        let m = &config.memcached;
        let pages = Arc::new(Pool::connect(&m.servers, m.hashing, m).await?);
        let index = if m.index_servers.is_empty() {
            Arc::clone(&pages)
        } else {
            Arc::new(Pool::connect(&m.index_servers, m.hashing, m).await?)
        };
        let keys = KeyScheme::new(
            config.keys.prefix.as_bytes().to_vec(),
            config.keys.query,
            config.keys.merge_slashes,
            config.keys.host,
        );
        Ok(Cache {
            inner: Arc::new(Inner {
                index_keys: IndexKeys::new(
                    &config.cache.index_namespace,
                    config.cache.index_shards,
                ),
                config: config.clone(),
                compiled,
                keys,
                pages,
                index,
                metrics: Metrics::default(),
                writes: TaskTracker::new(),
                write_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_WRITES)),
            }),
        })
    }

    /// The configuration this cache runs on.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The handle for removing pages.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator::new(self.clone())
    }

    /// The nginx key for a request target (and, in host mode, the Host header).
    pub fn page_key(&self, host: Option<&[u8]>, target: &[u8]) -> Result<PageKey, KeySkip> {
        self.inner.keys.page_key(host, target)
    }

    /// Would an anonymous GET of `target` be cached (before the response is
    /// known)? The page key, or the reason why not. `host` is the Host header,
    /// used in host mode (`keys.host`) and checked against `cache.allowed_hosts`.
    pub fn classify(&self, host: Option<&[u8]>, target: &[u8]) -> Result<PageKey, Bypass> {
        let inner = &self.inner;
        let host_mode = inner.config.keys.host;
        if host_mode && host.is_none() && target.first() == Some(&b'/') {
            return Err(Bypass::Host);
        }
        let key = self.page_key(host, target)?;
        if host_mode {
            // Check the host the key was built from (an absolute-form target's
            // own host wins over the Host header, as in nginx's $host).
            let rest = key
                .value
                .get(inner.config.keys.prefix.len()..)
                .unwrap_or_default();
            let keyed_host = rest.split(|b| *b == b'/').next().unwrap_or_default();
            if !inner
                .compiled
                .allowed_hosts
                .iter()
                .any(|allowed| allowed == keyed_host)
            {
                return Err(Bypass::Host);
            }
        }
        crate::policy::check_path(&inner.compiled, &key.uri)?;
        Ok(key)
    }

    /// The memcached server (as written in the config) nginx asks for `key`.
    pub fn server_for(&self, key: &PageKey) -> &str {
        &self.inner.pages.route(&key.value).name
    }

    /// Wait until every background write started so far has finished.
    /// Useful before shutdown and in tests; requests never wait on it.
    pub async fn settle(&self) {
        let writes = &self.inner.writes;
        writes.close();
        writes.wait().await;
        writes.reopen();
    }

    /// Counters since start.
    pub fn stats(&self) -> CacheStats {
        let m = &self.inner.metrics;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let servers = self
            .distinct_servers()
            .into_iter()
            .map(|server| ServerStats {
                name: server.name.clone(),
                breaker_open: server.breaker.is_open(),
                breaker_opened: server.breaker.opened_total(),
                errors: load(&server.errors),
            })
            .collect();
        CacheStats {
            stores: load(&m.stores),
            store_errors: load(&m.store_errors),
            retracted: load(&m.retracted),
            misses: load(&m.misses),
            shared: load(&m.shared),
            bypass: Bypass::ALL
                .iter()
                .map(|b| (*b, load(&m.bypass[b.index()])))
                .collect(),
            invalidations: load(&m.invalidations),
            invalidation_errors: load(&m.invalidation_errors),
            pages_removed: load(&m.pages_removed),
            servers,
        }
    }

    /// Store `body` as the page for `target` (a path as a user writes it, or
    /// `http://host/path` in host mode) under `tags`, through the same write path
    /// as the layer: register, store, recheck. For probes (`mcpage check`) and
    /// pre-warming. Fails when the page was invalidated while being stored.
    pub async fn store_page<I, T>(
        &self,
        target: &str,
        body: impl Into<Bytes>,
        tags: I,
    ) -> Result<PageKey>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let (host, path) = crate::key::split_url(target);
        let key = self
            .page_key(host.map(str::as_bytes), path.as_bytes())
            .map_err(|skip| {
                Error::Invalid(format!("`{target}` has no cache key ({})", skip.reason()))
            })?;
        let mut tags: Vec<String> = tags
            .into_iter()
            .map(Into::into)
            .filter(|t| !t.trim().is_empty())
            .collect();
        tags.sort();
        tags.dedup();
        let clock = self.read_clock(Mode::Always).await?;
        let page = PageWrite {
            key,
            body: body.into(),
            ttl: self.inner.config.cache.ttl_secs,
            tags,
            clock,
            flight: None,
        };
        match self.write(&page).await? {
            Written::Stored => Ok(page.key),
            Written::Retracted => Err(Error::Invalid(format!(
                "`{target}` was invalidated while being stored"
            ))),
        }
    }

    /// memcached's own `stats` of every configured server (pages and index
    /// pool, each once), in config order.
    pub async fn memcached_stats(&self) -> Vec<(String, Result<BTreeMap<String, String>>)> {
        let mut out = Vec::new();
        for server in self.distinct_servers() {
            let stats = server
                .text_command("stats", Duration::ZERO)
                .await
                .map(|lines| {
                    lines
                        .iter()
                        .filter_map(|line| {
                            let line = String::from_utf8_lossy(line);
                            let mut words = line.strip_prefix("STAT ")?.splitn(2, ' ');
                            Some((
                                words.next()?.to_owned(),
                                words.next().unwrap_or_default().to_owned(),
                            ))
                        })
                        .collect()
                });
            out.push((server.name.clone(), stats));
        }
        out
    }

    /// Size of the tag index per index server: (server, items, bytes, largest item),
    /// from `lru_crawler metadump`.
    pub async fn index_usage(&self) -> Vec<(String, Result<IndexUsage>)> {
        let prefix = format!("{}t:", self.inner.index_keys.namespace());
        let mut out = Vec::new();
        for server in self.inner.index.servers() {
            let usage = server.metadump(Duration::from_secs(60)).await.map(|lines| {
                let mut usage = IndexUsage::default();
                for line in &lines {
                    let Some(key) = crate::invalidate::metadump_key(line) else {
                        continue;
                    };
                    if !key.starts_with(prefix.as_bytes()) {
                        continue;
                    }
                    let size = String::from_utf8_lossy(line)
                        .split(' ')
                        .find_map(|field| field.strip_prefix("size=")?.parse::<u64>().ok())
                        .unwrap_or(0);
                    usage.items += 1;
                    usage.bytes += size;
                    usage.largest = usage.largest.max(size);
                }
                usage
            });
            out.push((server.name.clone(), usage));
        }
        out
    }

    fn distinct_servers(&self) -> Vec<&crate::store::Server> {
        let mut servers: Vec<&crate::store::Server> = Vec::new();
        for pool in [&self.inner.pages, &self.inner.index] {
            for server in pool.servers() {
                if !servers.iter().any(|s| s.name == server.name) {
                    servers.push(server);
                }
            }
        }
        servers
    }

    /// Read the invalidation clock G (creating it when missing). Request path:
    /// honours the breaker, so an index outage costs one timeout per cooldown.
    pub(crate) async fn read_clock(&self, mode: Mode) -> Result<u64> {
        self.bump_clock(mode, 0).await
    }

    /// Add `delta` to the clock and return the new value.
    pub(crate) async fn bump_clock(&self, mode: Mode, delta: u64) -> Result<u64> {
        let key = self.inner.index_keys.clock();
        let server = self.inner.index.route(&key);
        let op = Arithmetic::new(&key)
            .delta(delta)
            .initial(now_micros(), CLOCK_TTL_SECS);
        let result = server.run(mode, op).await?;
        result.value.ok_or_else(|| Error::Protocol {
            server: server.name.clone(),
            message: "clock increment returned no value".to_owned(),
        })
    }

    /// Lifetime of index items and clocks: longer than any page they cover.
    pub(crate) fn index_ttl(&self) -> u32 {
        self.inner
            .config
            .cache
            .ttl_secs
            .saturating_add(tags::INDEX_TTL_MARGIN_SECS)
    }

    /// Start the write path for a rendered page off the response path.
    pub(crate) fn spawn_write(&self, page: PageWrite) {
        if self.inner.writes.len() >= MAX_QUEUED_WRITES {
            let dropped = self
                .inner
                .metrics
                .store_errors
                .fetch_add(1, Ordering::Relaxed);
            if dropped % 1000 == 0 {
                tracing::warn!(
                    "background write queue full ({MAX_QUEUED_WRITES}): pages not cached"
                );
            }
            return;
        }
        let cache = self.clone();
        self.inner.writes.spawn(async move {
            let Ok(_slot) = Arc::clone(&cache.inner.write_slots).acquire_owned().await else {
                return;
            };
            match cache.write(&page).await {
                Ok(Written::Stored) => {
                    cache.inner.metrics.stores.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Written::Retracted) => {
                    cache.inner.metrics.retracted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key = %String::from_utf8_lossy(&page.key.key), "invalidated during render; not kept");
                }
                Err(error) => {
                    cache.inner.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %String::from_utf8_lossy(&page.key.key), %error, "page not cached");
                }
            }
            // Stored (nginx answers from now on) or not: new requests render again.
            if let Some(flight) = page.flight {
                flight.close();
            }
        });
    }

    /// Register in every tag's index, store, then recheck the clocks.
    pub(crate) async fn write(&self, page: &PageWrite) -> Result<Written> {
        // Encode first: a body that turns out too large must not leave an index record.
        let (body, flags) = self.encode_body(&page.body)?;
        self.register(page).await?;
        let server = self.inner.pages.route(&page.key.value);
        let set = Set::new(&page.key.key, body)
            .client_flags(flags)
            .ttl(Ttl::secs(page.ttl));
        let stored = server.run(Mode::FailFast, set).await?;
        if !stored.applied() {
            return Err(Error::Protocol {
                server: server.name.clone(),
                message: format!("page store answered {:?}", stored.status),
            });
        }
        match self.invalidated_since(page).await {
            Ok(false) => Ok(Written::Stored),
            Ok(true) => {
                server.run(Mode::Always, Delete::new(&page.key.key)).await?;
                Ok(Written::Retracted)
            }
            Err(error) => {
                // Cannot tell whether an invalidation overlapped: do not keep it.
                server.run(Mode::Always, Delete::new(&page.key.key)).await?;
                Err(error)
            }
        }
    }

    fn encode_body(&self, body: &Bytes) -> Result<(Vec<u8>, u32)> {
        let cache = &self.inner.config.cache;
        let (bytes, flags) = if cache.gzip {
            use std::io::Write;
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 3),
                flate2::Compression::fast(),
            );
            encoder
                .write_all(body)
                .and_then(|()| encoder.finish())
                .map(|gz| (gz, cache.gzip_flag))
                .map_err(|e| Error::Invalid(format!("gzip failed: {e}")))?
        } else {
            (body.to_vec(), 0)
        };
        if bytes.len() > cache.max_body_bytes {
            return Err(Error::Invalid(format!(
                "body of {} bytes exceeds cache.max_body_bytes ({})",
                bytes.len(),
                cache.max_body_bytes
            )));
        }
        Ok((bytes, flags))
    }

    /// Did an invalidation of one of the page's tags, of its URL, or a purge
    /// advance past the clock read before the render? An error when a clock cannot be read.
    async fn invalidated_since(&self, page: &PageWrite) -> Result<bool> {
        let ik = &self.inner.index_keys;
        let mut keys: Vec<Vec<u8>> = page.tags.iter().map(|tag| ik.tag_clock(tag)).collect();
        keys.push(ik.url_clock(&page.key.key));
        keys.push(ik.purge_clock());
        let ops = keys.into_iter().map(|k| (k.clone(), Get::new(k))).collect();
        let mut invalidated = false;
        for result in self.inner.index.run_routed(Mode::Always, ops).await {
            let result = result?;
            if result.hit() {
                // An unreadable clock counts as advanced.
                invalidated |=
                    parse_clock(result.value.as_deref()).is_none_or(|tc| tc > page.clock);
            }
        }
        Ok(invalidated)
    }

    /// Append the page key to one shard of every tag, compacting shards that
    /// have doubled since their last compaction.
    async fn register(&self, page: &PageWrite) -> Result<()> {
        if page.tags.is_empty() {
            return Ok(());
        }
        let ik = &self.inner.index_keys;
        let max = self.inner.config.cache.index_shard_max_bytes;
        let ttl = self.index_ttl();
        let record = tags::record(&page.key.key, page.clock);
        let shards: Vec<Vec<u8>> = page
            .tags
            .iter()
            .map(|tag| ik.shard_for(tag, &page.key.key))
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
        let probed = self.inner.index.run_routed(Mode::FailFast, probes).await;
        let mut appends = Vec::with_capacity(shards.len());
        for (shard, probe) in shards.iter().zip(probed) {
            let probe = probe?;
            let size = usize::try_from(probe.item.size.unwrap_or(0)).unwrap_or(usize::MAX);
            let compacted = probe.client_flags.unwrap_or(0) as usize;
            let mut size = if probe.hit() { size } else { 0 };
            if size + record.len() > max || tags::needs_compaction(size, compacted, record.len()) {
                match self
                    .compact_shard(shard, &page.key.key, page.clock, ttl)
                    .await?
                {
                    Compacted::AlreadyListed => continue,
                    Compacted::Size(new) => size = new,
                }
            }
            if size + record.len() > max {
                return Err(Error::Invalid(format!(
                    "tag index item {} is full ({size} bytes); raise cache.index_shards",
                    String::from_utf8_lossy(shard)
                )));
            }
            let append = Set::new(shard, &record).append().vivify_ttl(ttl);
            appends.push((shard.clone(), append));
        }
        // memcached before 1.6.21 ignores autovivify on append (answers NS):
        // create the missing items with `add`, and append again where another
        // writer created one first. Never read-modify-write.
        let mut pending = appends;
        for _ in 0..3 {
            let results = self
                .inner
                .index
                .run_routed(Mode::FailFast, pending.clone())
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
                .inner
                .index
                .run_routed(Mode::FailFast, missing.clone())
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
        Err(Error::Protocol {
            server: String::new(),
            message: "index item kept appearing and disappearing during registration".to_owned(),
        })
    }

    /// Keep one record per page (its latest clock), CAS-guarded so a
    /// concurrent append or invalidation is never overwritten. Tells whether the
    /// page is already listed at `clock` or later (then no append is needed).
    async fn compact_shard(
        &self,
        shard: &[u8],
        page_key: &[u8],
        clock: u64,
        ttl: u32,
    ) -> Result<Compacted> {
        let server = self.inner.index.route(shard);
        for _ in 0..4 {
            let current = server
                .run(Mode::FailFast, Get::new(shard).meta(Meta::NONE.cas()))
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
                .ttl(Ttl::secs(ttl))
                .compare_cas(cas);
            match server.run(Mode::FailFast, set).await?.status {
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

enum Compacted {
    AlreadyListed,
    Size(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_parsing() {
        assert_eq!(parse_clock(Some(b"42")), Some(42));
        assert_eq!(parse_clock(Some(b"x")), None);
        assert_eq!(parse_clock(None), None);
    }
}
