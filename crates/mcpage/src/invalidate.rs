//! [`Invalidator`]: remove pages by tag, by URL or by key prefix.
//!
//! Every call first advances the invalidation clock and the clocks of what it
//! invalidates, then finds and deletes pages. A render that read the clock
//! before that and registers its page after the index was read sees the new
//! clock when it rechecks, and deletes its own page (the write path, `put.rs`),
//! so no stale page survives an invalidation that reported success.
//!
//! The protocol, in the order an invalidation runs:
//! 1. Bump the invalidation clock G ([`Clocks::bump`]) and raise the clock of
//!    every tag, URL or the purge clock to it. If one cannot be raised, stop
//!    and report: nothing was deleted or forgotten.
//! 2. Read the tags' index items (one pipelined batch) and delete the pages
//!    they list on the servers nginx asks.
//! 3. Clear the index records of pages confirmed gone whose renders started
//!    before this invalidation (CAS-guarded: concurrent appends survive).
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

use crate::clock::Clocks;
use crate::error::{Error, Result};
use crate::key::{KeyScheme, memcached_unescape};
use crate::memcached::{Circuit, Deletion, Pool, quiet_safe, text};
use crate::stats::Metrics;
use crate::tags::{self, IndexKeys};

/// Removes pages; obtained from [`Cache::invalidator`](crate::Cache::invalidator).
/// Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct Invalidator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pages: Arc<Pool>,
    index: Arc<Pool>,
    clocks: Clocks,
    index_keys: IndexKeys,
    keys: KeyScheme,
    index_ttl: u32,
    metrics: Arc<Metrics>,
}

/// What an invalidation removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removed {
    /// Distinct pages deleted from memcached (pages already gone are not
    /// counted), [`index_recovery`](Self::index_recovery) included.
    pub pages: usize,
    /// Per tag, URL or prefix, in the order given (sorted, without duplicates).
    pub by_item: Vec<RemovedItem>,
    /// Pages purged first because a separate index server restarted and lost
    /// its records (see [`Invalidator::invalidate_tags`]); 0 normally.
    pub index_recovery: usize,
}

/// Pages one tag, URL or prefix listed that were deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemovedItem {
    /// The tag, URL or prefix as given.
    pub item: String,
    /// Pages deleted that it listed.
    pub pages: usize,
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
    pub(crate) fn new(
        pages: Arc<Pool>,
        index: Arc<Pool>,
        clocks: Clocks,
        index_keys: IndexKeys,
        keys: KeyScheme,
        index_ttl: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Invalidator {
            inner: Arc::new(Inner {
                pages,
                index,
                clocks,
                index_keys,
                keys,
                index_ttl,
                metrics,
            }),
        }
    }

    /// Remove every page registered under any of `tags`, on every server.
    /// Tags are trimmed; empty ones are ignored.
    ///
    /// When a separate index server restarted since the last invalidation (its
    /// records are gone), every page is purged first, once: the count includes
    /// them, also in [`Removed::index_recovery`].
    ///
    /// # Errors
    /// [`Error::Incomplete`] when memcached did not confirm every clock raise,
    /// index read or delete (some pages may remain; calling again is safe);
    /// a memcached error when the invalidation clock could not be advanced.
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
    ///
    /// # Errors
    /// [`Error::NoCacheKey`] for a URL that can have no page (before anything
    /// is removed); otherwise as [`invalidate_tags`](Self::invalidate_tags).
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
                .inner
                .keys
                .page_key(host.map(str::as_bytes), target.as_bytes())
                .map_err(|reason| Error::NoCacheKey {
                    url: url.clone(),
                    reason,
                })?;
            page_keys.push(key.escaped);
        }
        let result = self.invalidate_urls_inner(&urls, page_keys).await;
        self.account(result)
    }

    /// Remove every page whose value V starts with `keys.prefix` + `prefix`
    /// (`/` removes all pages; in host mode write `example.com/blog/`), by
    /// walking each page server's key list (`lru_crawler metadump`). Also the
    /// recovery after an index server lost its data.
    ///
    /// # Errors
    /// As [`invalidate_tags`](Self::invalidate_tags); a server that cannot
    /// list its keys makes the purge [`Error::Incomplete`].
    pub async fn purge_prefix(&self, prefix: &str) -> Result<Removed> {
        let result = self.purge_prefix_inner(prefix).await;
        self.account(result)
    }

    fn account(&self, result: Result<Removed>) -> Result<Removed> {
        let metrics = &self.inner.metrics;
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
        let inner = &self.inner;
        let ik = &inner.index_keys;
        let recovered = self.recover_lost_index().await?;
        let clock = inner.clocks.bump().await?;
        let mut failures = Failures::default();
        let clock_keys: Vec<Vec<u8>> = tags.iter().map(|t| ik.tag_clock(t)).collect();
        for result in inner.clocks.raise(&clock_keys, clock).await {
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
            .zip(inner.index.run_routed(Circuit::Ignore, reads).await)
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
            .map(|(tag, pages)| RemovedItem {
                item: tag.clone(),
                pages: pages
                    .iter()
                    .filter(|p| deleted.removed.contains(*p))
                    .count(),
            })
            .collect();

        // Forget the records whose pages are confirmed gone, and only those.
        let done = shards
            .into_iter()
            .filter(|(_, _, value)| {
                tags::entries(value).all(|(page, _)| deleted.confirmed.contains(page))
            })
            .collect();
        self.clear_shards(done, clock, &mut failures).await;
        failures.finish(Removed {
            pages: deleted.removed.len() + recovered,
            by_item,
            index_recovery: recovered,
        })
    }

    /// An index server that restarted since the last invalidation lost the
    /// records of every page stored before: those pages could never be found
    /// by tag again and would stay, stale, until their TTL. Detect it (each
    /// index server's process id and start time, remembered on the page
    /// servers) and purge every page once; returns how many were removed.
    /// Nothing to do when pages and index share servers: a restart lost both.
    async fn recover_lost_index(&self) -> Result<usize> {
        let inner = &self.inner;
        if Arc::ptr_eq(&inner.pages, &inner.index) {
            return Ok(0);
        }
        let mut lost = Vec::new();
        let mut remember = Vec::new();
        for server in inner.index.servers() {
            let stats = text::stats(&server.text_command("stats", Duration::ZERO).await?);
            let stat = |name: &str| text::stat_u64(&stats, name);
            let (Some(pid), Some(time), Some(uptime)) = (stat("pid"), stat("time"), stat("uptime"))
            else {
                return Err(server.protocol("stats without pid, time or uptime"));
            };
            let boot = format!("{pid}:{}", time.saturating_sub(uptime));
            let key = inner.index_keys.index_boot(server.name());
            let marker = inner
                .pages
                .route(&key)
                .run(Circuit::Ignore, Get::new(&key))
                .await?;
            match marker.value {
                Some(seen) if seen == boot.as_bytes() => {}
                Some(_) => {
                    lost.push(server.name().to_owned());
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
            inner.pages.route(&key).run(Circuit::Ignore, set).await?;
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
        let inner = &self.inner;
        let clock = inner.clocks.bump().await?;
        let mut failures = Failures::default();
        let clock_keys: Vec<Vec<u8>> = page_keys
            .iter()
            .map(|k| inner.index_keys.url_clock(k))
            .collect();
        for result in inner.clocks.raise(&clock_keys, clock).await {
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
            .map(|(url, key)| RemovedItem {
                item: url.clone(),
                pages: usize::from(deleted.removed.contains(key)),
            })
            .collect();
        failures.finish(Removed {
            pages: deleted.removed.len(),
            by_item,
            index_recovery: 0,
        })
    }

    async fn purge_prefix_inner(&self, prefix: &str) -> Result<Removed> {
        let inner = &self.inner;
        let clock = inner.clocks.bump().await?;
        let mut failures = Failures::default();
        for result in inner
            .clocks
            .raise(&[inner.index_keys.purge_clock()], clock)
            .await
        {
            failures.check(result);
        }
        if failures.failed > 0 {
            return failures.finish(Removed::default());
        }
        let mut wanted = inner.keys.prefix().to_vec();
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
                    .filter_map(|line| text::metadump_key(line))
                    .filter(|key| !key.starts_with(namespace))
                    .filter(|key| {
                        memcached_unescape(key).is_some_and(|value| value.starts_with(&wanted))
                    })
                    .map(|key| (index, Delete::new(key)))
                    .collect();
                if doomed.is_empty() {
                    break;
                }
                for result in inner.pages.run_on(Circuit::Ignore, doomed).await {
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
            by_item: vec![RemovedItem {
                item: prefix.to_owned(),
                pages: removed,
            }],
            index_recovery: 0,
        })
    }

    /// Delete page keys on the servers nginx reads them from: every server at
    /// once, one quiet-mode batch each (`md <key> q`, one `mn`: memcached
    /// answers only what did not succeed); the rare keys the meta client
    /// would base64-encode go in an ordinary pipelined batch alongside.
    async fn delete_pages(&self, keys: HashSet<Vec<u8>>, failures: &mut Failures) -> Deleted {
        let (quiet, plain): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
            keys.into_iter().partition(|key| quiet_safe(key));
        let value = |key: &Vec<u8>| memcached_unescape(key).unwrap_or_else(|| key.clone());
        let quiet_pairs: Vec<(Vec<u8>, &[u8])> = quiet
            .iter()
            .map(|key| (value(key), key.as_slice()))
            .collect();
        let plain_ops = plain
            .iter()
            .map(|key| (value(key), Delete::new(key)))
            .collect();
        let pages = &self.inner.pages;
        let (quiet_results, plain_results) = futures_util::future::join(
            pages.delete_quiet_routed(&quiet_pairs),
            pages.run_routed(Circuit::Ignore, plain_ops),
        )
        .await;
        let mut deleted = Deleted::default();
        let quiet_results = quiet_results
            .into_iter()
            .map(|result| result.map(|gone| gone == Deletion::Deleted));
        let plain_results = plain_results
            .into_iter()
            .map(|result| result.map(|done| done.status == MutationStatus::Applied));
        for (key, result) in quiet
            .into_iter()
            .zip(quiet_results)
            .chain(plain.into_iter().zip(plain_results))
        {
            if let Some(applied) = failures.check(result) {
                if applied {
                    deleted.removed.insert(key.clone());
                }
                deleted.confirmed.insert(key);
            }
        }
        deleted
    }

    /// [`clear_shard`](Self::clear_shard) of many shards: the first attempt of
    /// every shard in one pipelined batch per index server, then the shards
    /// that changed meanwhile (CAS mismatch) one by one.
    async fn clear_shards(
        &self,
        shards: Vec<(Vec<u8>, u64, Vec<u8>)>,
        clock: u64,
        failures: &mut Failures,
    ) {
        let ttl = Ttl::secs(self.inner.index_ttl);
        let (mut emptied, mut kept) = (Vec::new(), Vec::new());
        let (mut deletes, mut sets) = (Vec::new(), Vec::new());
        for (position, (shard, cas, value)) in shards.iter().enumerate() {
            let rest = tags::retain_since(value, clock);
            if rest.is_empty() {
                emptied.push(position);
                deletes.push((shard.clone(), Delete::new(shard).compare_cas(*cas)));
            } else {
                kept.push(position);
                sets.push((
                    shard.clone(),
                    Set::new(shard, rest).ttl(ttl).compare_cas(*cas),
                ));
            }
        }
        let index = &self.inner.index;
        let (deleted, set) = futures_util::future::join(
            index.run_routed(Circuit::Ignore, deletes),
            index.run_routed(Circuit::Ignore, sets),
        )
        .await;
        let mut changed = Vec::new();
        for (position, result) in emptied
            .into_iter()
            .zip(deleted)
            .chain(kept.into_iter().zip(set))
        {
            if let Some(result) = failures.check(result)
                && result.status == MutationStatus::CasMismatch
            {
                changed.push(position);
            }
        }
        for position in changed {
            let (shard, cas, value) = &shards[position];
            self.clear_shard(shard, value.clone(), *cas, clock, failures)
                .await;
        }
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
        let server = self.inner.index.route(shard);
        for _ in 0..SHARD_CLEAR_ROUNDS {
            let kept = tags::retain_since(&value, clock);
            let result = if kept.is_empty() {
                server
                    .run(Circuit::Ignore, Delete::new(shard).compare_cas(cas))
                    .await
            } else {
                let set = Set::new(shard, kept)
                    .ttl(Ttl::secs(self.inner.index_ttl))
                    .compare_cas(cas);
                server.run(Circuit::Ignore, set).await
            };
            match failures.check(result) {
                Some(result) if result.status == MutationStatus::CasMismatch => {}
                _ => return,
            }
            let Some(current) = failures.check(
                server
                    .run(Circuit::Ignore, Get::new(shard).meta(Meta::NONE.cas()))
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

impl Removed {
    /// The count for one tag, URL or prefix (0 when it was not part of the call).
    pub fn count_for(&self, item: &str) -> usize {
        self.by_item
            .iter()
            .find(|entry| entry.item == item)
            .map_or(0, |entry| entry.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_sorts_and_drops_empty() {
        let items = ["b", "a", "", "b"].map(String::from);
        assert_eq!(
            unique(items.into_iter()),
            vec!["a".to_owned(), "b".to_owned()]
        );
    }
}
