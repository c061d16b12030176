//! [`Invalidator`]: remove pages by tag, by URL or by key prefix.
//!
//! Every call first advances the invalidation clock and the clocks of what it
//! invalidates, then finds and deletes pages. A render that read the clock
//! before that and registers its page after the index was read sees the new
//! clock when it rechecks, and deletes its own page (see `Cache::write`), so
//! no stale page survives an invalidation that reported success.
//!
//! ```no_run
//! # async fn run(cache: mcpage::Cache) -> mcpage::Result<()> {
//! let invalidator = cache.invalidator();
//! let removed = invalidator.invalidate_tags(["comments", "article:42"]).await?;
//! println!("removed {} pages", removed.pages);
//! invalidator.invalidate_urls(["/about"]).await?;
//! invalidator.purge_prefix("/articles/").await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use memcache::exp::{Delete, Get, Meta, MutationStatus, Set, Ttl};

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::key::memcached_unescape;
use crate::store::{Mode, Pool};
use crate::tags;

/// Removes pages; obtained from [`Cache::invalidator`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Invalidator {
    cache: Cache,
}

/// What an invalidation removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removed {
    /// Distinct pages deleted from memcached (pages already gone are not counted).
    pub pages: usize,
    /// Per tag, URL or prefix: pages deleted that it listed.
    pub by_item: Vec<(String, usize)>,
}

/// Counts failures without stopping: an invalidation tries everything, then
/// reports whether anything was not confirmed.
#[derive(Default)]
struct Failures {
    attempted: usize,
    failed: usize,
    first: Option<Error>,
}

impl Failures {
    fn check<T>(&mut self, result: Result<T>) -> Option<T> {
        self.attempted += 1;
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.failed += 1;
                self.first.get_or_insert(error);
                None
            }
        }
    }

    fn finish(self, removed: Removed) -> Result<Removed> {
        match self.first {
            None => Ok(removed),
            Some(first) => Err(Error::Incomplete {
                attempted: self.attempted,
                failed: self.failed,
                first: Box::new(first),
            }),
        }
    }
}

/// How many times a shard is re-read when writers keep appending to it while
/// it is being cleared. Giving up leaves records of deleted pages behind: only
/// garbage (a few bytes, a few extra deletes next time), never a lost record.
const SHARD_CLEAR_ROUNDS: usize = 5;

/// Most `lru_crawler metadump` passes per server in one purge.
const PURGE_PASSES: usize = 8;

/// `lru_crawler metadump` may take a while on a big server.
const METADUMP_DEADLINE: Duration = Duration::from_secs(60);

impl Invalidator {
    pub(crate) fn new(cache: Cache) -> Self {
        Invalidator { cache }
    }

    /// Remove every page registered under any of `tags`, on every server.
    ///
    /// When a separate index server restarted since the last invalidation (its
    /// records are gone), every page is purged first, once: the count includes
    /// them under [`Removed::INDEX_RECOVERY`].
    pub async fn invalidate_tags<I, T>(&self, tags: I) -> Result<Removed>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let tags: Vec<String> = unique(tags.into_iter().map(|t| t.as_ref().trim().to_owned()));
        let result = self.invalidate_tags_inner(&tags).await;
        self.account(result)
    }

    /// Remove the pages of `urls`, written as a user would (`/a//b`, `/caf%C3%A9`,
    /// or `http://host/path` in host mode): each is mapped through the key contract.
    pub async fn invalidate_urls<I, T>(&self, urls: I) -> Result<Removed>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let urls: Vec<String> = unique(urls.into_iter().map(|u| u.as_ref().to_owned()));
        // A URL that can have no page is the caller's mistake, not a memcached failure.
        let mut page_keys = Vec::with_capacity(urls.len());
        for url in &urls {
            let (host, target) = crate::key::split_url(url);
            let key = self
                .cache
                .page_key(host.map(str::as_bytes), target.as_bytes())
                .map_err(|skip| {
                    Error::Invalid(format!("`{url}` has no cache key ({})", skip.reason()))
                })?;
            page_keys.push(key.key);
        }
        let result = self.invalidate_urls_inner(&urls, page_keys).await;
        self.account(result)
    }

    /// Remove every page whose value V starts with `keys.prefix` + `prefix`
    /// (`/` removes all pages; in host mode write `example.com/blog/`), by
    /// walking each page server's key list (`lru_crawler metadump`). Also the
    /// recovery after an index server lost its data.
    pub async fn purge_prefix(&self, prefix: &str) -> Result<Removed> {
        let result = self.purge_prefix_inner(prefix).await;
        self.account(result)
    }

    fn account(&self, result: Result<Removed>) -> Result<Removed> {
        let metrics = &self.cache.inner.metrics;
        match &result {
            Ok(removed) => {
                metrics.invalidations.fetch_add(1, Ordering::Relaxed);
                metrics
                    .pages_removed
                    .fetch_add(removed.pages as u64, Ordering::Relaxed);
            }
            Err(_) => {
                metrics.invalidation_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn invalidate_tags_inner(&self, tags: &[String]) -> Result<Removed> {
        if tags.is_empty() {
            return Ok(Removed::default());
        }
        let inner = &self.cache.inner;
        let ik = &inner.index_keys;
        let recovered = self.recover_lost_index().await?;
        let clock = self.cache.bump_clock(Mode::Always, 1).await?;
        let mut failures = Failures::default();
        let clock_keys: Vec<Vec<u8>> = tags.iter().map(|t| ik.tag_clock(t)).collect();
        for result in self.raise_clocks(&clock_keys, clock).await {
            failures.check(result);
        }
        // A clock that was not raised could let a render in flight keep a stale
        // page: stop here and report, before anything is deleted or forgotten.
        if failures.failed > 0 {
            return failures.finish(Removed::default());
        }

        // Read every shard of every tag in one pipelined batch.
        let shard_keys: Vec<(usize, Vec<u8>)> = tags
            .iter()
            .enumerate()
            .flat_map(|(t, tag)| ik.all_shards(tag).map(move |key| (t, key)))
            .collect();
        let reads = shard_keys
            .iter()
            .map(|(_, key)| (key.clone(), Get::new(key).meta(Meta::NONE.cas())))
            .collect();
        let mut pages_by_tag: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); tags.len()];
        // (shard key, CAS, value) of every non-empty shard read.
        let mut shards: Vec<(Vec<u8>, u64, Vec<u8>)> = Vec::new();
        for ((t, key), result) in shard_keys
            .into_iter()
            .zip(inner.index.run_routed(Mode::Always, reads).await)
        {
            let Some(result) = failures.check(result) else {
                continue;
            };
            if let (Some(value), Some(cas)) = (result.value, result.item.cas) {
                pages_by_tag[t].extend(tags::entries(&value).map(|(page, _)| page.to_vec()));
                shards.push((key, cas, value));
            }
        }

        let all: HashSet<Vec<u8>> = pages_by_tag.iter().flatten().cloned().collect();
        let deleted = self.delete_pages(all, &mut failures).await;
        let by_item = tags
            .iter()
            .zip(&pages_by_tag)
            .map(|(tag, pages)| {
                (
                    tag.clone(),
                    pages
                        .iter()
                        .filter(|p| deleted.removed.contains(*p))
                        .count(),
                )
            })
            .collect();

        // Forget the records whose pages are confirmed gone, and only those.
        for (shard, cas, value) in shards {
            if tags::entries(&value).all(|(page, _)| deleted.confirmed.contains(page)) {
                self.clear_shard(&shard, value, cas, clock, &mut failures)
                    .await;
            }
        }
        let mut by_item: Vec<(String, usize)> = by_item;
        if recovered > 0 {
            by_item.push((Removed::INDEX_RECOVERY.to_owned(), recovered));
        }
        failures.finish(Removed {
            pages: deleted.removed.len() + recovered,
            by_item,
        })
    }

    /// An index server that restarted since the last invalidation lost the
    /// records of every page stored before: those pages could never be found
    /// by tag again and would stay, stale, until their TTL. Detect it (each
    /// index server's process id and start time, remembered on the page
    /// servers) and purge every page once; returns how many were removed.
    /// Nothing to do when pages and index share servers: a restart lost both.
    async fn recover_lost_index(&self) -> Result<usize> {
        let inner = &self.cache.inner;
        if Arc::ptr_eq(&inner.pages, &inner.index) {
            return Ok(0);
        }
        let mut lost = Vec::new();
        let mut remember = Vec::new();
        for server in inner.index.servers() {
            let stats = server.text_command("stats", Duration::ZERO).await?;
            let stat = |name: &str| {
                stats.iter().find_map(|line| {
                    let line = std::str::from_utf8(line).ok()?;
                    let value = line
                        .strip_prefix("STAT ")?
                        .strip_prefix(name)?
                        .strip_prefix(' ')?;
                    value.trim().parse::<u64>().ok()
                })
            };
            let (Some(pid), Some(time), Some(uptime)) = (stat("pid"), stat("time"), stat("uptime"))
            else {
                return Err(Error::Protocol {
                    server: server.name.clone(),
                    message: "stats without pid, time or uptime".to_owned(),
                });
            };
            let boot = format!("{pid}:{}", time.saturating_sub(uptime));
            let key = inner.index_keys.index_boot(&server.name);
            let marker = inner
                .pages
                .route(&key)
                .run(Mode::Always, Get::new(&key))
                .await?;
            match marker.value {
                Some(seen) if seen == boot.as_bytes() => {}
                Some(_) => {
                    lost.push(server.name.clone());
                    remember.push((key, boot));
                }
                // First invalidation ever (or the marker's page server lost it).
                None => remember.push((key, boot)),
            }
        }
        let mut removed = 0;
        if !lost.is_empty() {
            tracing::warn!(servers = ?lost, "tag index restarted and lost its records: purging every page");
            removed = self.purge_prefix_inner("").await?.pages;
        }
        // Only after the purge succeeded: a failed purge is retried next time.
        for (key, boot) in remember {
            let set = Set::new(&key, boot.as_bytes()).ttl(Ttl::NEVER);
            inner.pages.route(&key).run(Mode::Always, set).await?;
        }
        Ok(removed)
    }

    async fn invalidate_urls_inner(
        &self,
        urls: &[String],
        page_keys: Vec<Vec<u8>>,
    ) -> Result<Removed> {
        if urls.is_empty() {
            return Ok(Removed::default());
        }
        let ik = &self.cache.inner.index_keys;
        let clock = self.cache.bump_clock(Mode::Always, 1).await?;
        let mut failures = Failures::default();
        let clock_keys: Vec<Vec<u8>> = page_keys.iter().map(|k| ik.url_clock(k)).collect();
        for result in self.raise_clocks(&clock_keys, clock).await {
            failures.check(result);
        }
        if failures.failed > 0 {
            return failures.finish(Removed::default());
        }
        let deleted = self
            .delete_pages(page_keys.iter().cloned().collect(), &mut failures)
            .await;
        let by_item = urls
            .iter()
            .zip(&page_keys)
            .map(|(url, key)| (url.clone(), usize::from(deleted.removed.contains(key))))
            .collect();
        failures.finish(Removed {
            pages: deleted.removed.len(),
            by_item,
        })
    }

    async fn purge_prefix_inner(&self, prefix: &str) -> Result<Removed> {
        let inner = &self.cache.inner;
        let clock = self.cache.bump_clock(Mode::Always, 1).await?;
        let mut failures = Failures::default();
        for result in self
            .raise_clocks(&[inner.index_keys.purge_clock()], clock)
            .await
        {
            failures.check(result);
        }
        if failures.failed > 0 {
            return failures.finish(Removed::default());
        }
        let mut wanted = inner.config.keys.prefix.as_bytes().to_vec();
        wanted.extend_from_slice(prefix.as_bytes());
        let namespace = inner.index_keys.namespace().as_bytes();
        let mut removed = 0;
        for (index, server) in inner.pages.servers().iter().enumerate() {
            // `Server::metadump` walks the hash table, which sees every item
            // once; the LRU walk it falls back to on an old memcached can skip
            // items that move in the LRU while the crawler walks it (seen on
            // 1.6.18 for recently read items): walk again until a pass finds
            // nothing left to delete.
            for _ in 0..PURGE_PASSES {
                let Some(lines) = failures.check(server.metadump(METADUMP_DEADLINE).await) else {
                    break;
                };
                let doomed: Vec<(usize, Delete)> = lines
                    .iter()
                    .filter_map(|line| metadump_key(line))
                    .filter(|key| !key.starts_with(namespace))
                    .filter(|key| {
                        memcached_unescape(key).is_some_and(|value| value.starts_with(&wanted))
                    })
                    .map(|key| (index, Delete::new(key)))
                    .collect();
                if doomed.is_empty() {
                    break;
                }
                for result in inner.pages.run_on(Mode::Always, doomed).await {
                    if let Some(result) = failures.check(result)
                        && result.status == MutationStatus::Applied
                    {
                        removed += 1;
                    }
                }
            }
        }
        failures.finish(Removed {
            pages: removed,
            by_item: vec![(prefix.to_owned(), removed)],
        })
    }

    /// Raise each clock to at least `clock` (CAS loop: a concurrent
    /// invalidation that set a higher value is never lowered).
    async fn raise_clocks(&self, keys: &[Vec<u8>], clock: u64) -> Vec<Result<()>> {
        let index: &Pool = &self.cache.inner.index;
        let ttl = Ttl::secs(self.cache.index_ttl());
        let value = clock.to_string();
        let mut results = Vec::with_capacity(keys.len());
        for key in keys {
            let server = index.route(key);
            let mut outcome = Err(Error::Protocol {
                server: server.name.clone(),
                message: "tag clock kept changing under concurrent invalidations".to_owned(),
            });
            for _ in 0..16 {
                let current = match server
                    .run(Mode::Always, Get::new(key).meta(Meta::NONE.cas()))
                    .await
                {
                    Ok(current) => current,
                    Err(error) => {
                        outcome = Err(error);
                        break;
                    }
                };
                let set = match (&current.value, current.item.cas) {
                    (Some(old), Some(cas)) => {
                        let old = std::str::from_utf8(old)
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok());
                        if old.is_some_and(|old| old >= clock) {
                            outcome = Ok(());
                            break;
                        }
                        Set::new(key, &value).ttl(ttl).compare_cas(cas)
                    }
                    _ => Set::new(key, &value).ttl(ttl).add(),
                };
                match server.run(Mode::Always, set).await {
                    Ok(result) if result.applied() => {
                        outcome = Ok(());
                        break;
                    }
                    Ok(_) => continue,
                    Err(error) => {
                        outcome = Err(error);
                        break;
                    }
                }
            }
            results.push(outcome);
        }
        results
    }

    /// Delete page keys on the servers nginx reads them from.
    async fn delete_pages(&self, keys: HashSet<Vec<u8>>, failures: &mut Failures) -> Deleted {
        let keys: Vec<Vec<u8>> = keys.into_iter().collect();
        let ops = keys
            .iter()
            .map(|key| {
                let value = memcached_unescape(key).unwrap_or_else(|| key.clone());
                (value, Delete::new(key))
            })
            .collect();
        let mut deleted = Deleted::default();
        for (key, result) in keys
            .into_iter()
            .zip(self.cache.inner.pages.run_routed(Mode::Always, ops).await)
        {
            if let Some(result) = failures.check(result) {
                if result.status == MutationStatus::Applied {
                    deleted.removed.insert(key.clone());
                }
                deleted.confirmed.insert(key);
            }
        }
        deleted
    }

    /// Drop the records of renders that started before this invalidation
    /// (`clock`), keeping any that started after it, whenever they registered
    /// (see [`tags::record`]). CAS-guarded: a concurrent append or compaction
    /// makes it re-read and filter again.
    async fn clear_shard(
        &self,
        shard: &[u8],
        mut value: Vec<u8>,
        mut cas: u64,
        clock: u64,
        failures: &mut Failures,
    ) {
        let server = self.cache.inner.index.route(shard);
        for _ in 0..SHARD_CLEAR_ROUNDS {
            let kept = tags::retain_since(&value, clock);
            let result = if kept.is_empty() {
                server
                    .run(Mode::Always, Delete::new(shard).compare_cas(cas))
                    .await
            } else {
                let set = Set::new(shard, kept)
                    .ttl(Ttl::secs(self.cache.index_ttl()))
                    .compare_cas(cas);
                server.run(Mode::Always, set).await
            };
            match failures.check(result) {
                Some(result) if result.status == MutationStatus::CasMismatch => {}
                _ => return,
            }
            let Some(current) = failures.check(
                server
                    .run(Mode::Always, Get::new(shard).meta(Meta::NONE.cas()))
                    .await,
            ) else {
                return;
            };
            let (Some(current), Some(current_cas)) = (current.value, current.item.cas) else {
                return;
            };
            (value, cas) = (current, current_cas);
        }
    }
}

#[derive(Default)]
struct Deleted {
    /// Deleted by this call.
    removed: HashSet<Vec<u8>>,
    /// Known to be gone (deleted now or already missing).
    confirmed: HashSet<Vec<u8>>,
}

fn unique(items: impl Iterator<Item = String>) -> Vec<String> {
    let set: BTreeSet<String> = items.filter(|s| !s.is_empty()).collect();
    set.into_iter().collect()
}

/// The raw key of a `lru_crawler metadump` line (`key=<uri-encoded> exp=...`).
pub(crate) fn metadump_key(line: &[u8]) -> Option<Vec<u8>> {
    let encoded = line.strip_prefix(b"key=")?.split(|b| *b == b' ').next()?;
    percent_decode(encoded)
}

fn percent_decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(encoded.len());
    let mut bytes = encoded.iter();
    while let Some(&b) = bytes.next() {
        if b == b'%' {
            let hi = hex(*bytes.next()?)?;
            let lo = hex(*bytes.next()?)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

/// Per-item counts keyed for tests and the CLI.
impl Removed {
    /// The `by_item` entry for pages purged because an index server restarted
    /// and lost its records (see [`Invalidator::invalidate_tags`]).
    pub const INDEX_RECOVERY: &str = "(index restarted: all pages purged)";

    /// The count for one tag, URL or prefix.
    pub fn count_for(&self, item: &str) -> usize {
        self.by_item
            .iter()
            .find(|(name, _)| name == item)
            .map_or(0, |(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadump_lines() {
        assert_eq!(
            metadump_key(b"key=%2Fcaf%C3%A9 exp=-1 la=1 cas=2 fetch=no cls=1 size=70"),
            Some(b"/caf\xc3\xa9".to_vec())
        );
        assert_eq!(
            metadump_key(b"key=%2Fx%2520y exp=1"),
            Some(b"/x%20y".to_vec())
        );
        assert_eq!(metadump_key(b"END"), None);
        assert_eq!(metadump_key(b"key=%2 exp"), None);
    }

    #[test]
    fn unique_sorts_and_drops_empty() {
        let items = ["b", "a", "", "b"].map(String::from);
        assert_eq!(
            unique(items.into_iter()),
            vec!["a".to_owned(), "b".to_owned()]
        );
    }
}
