//! One invalidation run: the protocol for a set of tags, URLs and prefixes
//! (the combined calls of `mod.rs`), with every failure attributed to the
//! tags, URLs or prefixes it concerns.
//!
//! 1. When tags are involved and a separate index server restarted, purge
//!    every page first ([`Runner::recover_lost_index`]). When that cannot be
//!    checked, the tags stay pending, but the steps below still run.
//! 2. Bump the invalidation clock G ([`Clocks::bump`]) to C and raise the
//!    clock of every tag, URL, and the purge clock for prefixes, to C. A
//!    target whose clock could not be raised fails here: nothing of it is
//!    deleted or forgotten.
//! 3. **Settle**: wait 2W (W = `invalidation.write_window_ms`) after the last
//!    raise was confirmed.
//! 4. Tags: read their index shards in chunks of [`CHUNK_SHARDS`] (one
//!    pipelined read), delete the pages they list (quiet mode, every server
//!    at once, at most [`CHUNK_DELETES`] per round, each page once per run),
//!    then clear, all shards of the chunk at once, the records of pages
//!    confirmed gone whose renders started before C (CAS-guarded: concurrent
//!    appends survive). Memory stays bounded by a chunk, whatever the tag's
//!    size.
//! 5. URLs: delete their pages. Prefixes: walk each page server's key list
//!    (`lru_crawler metadump`) and delete the matching pages.
//!
//! # Why a request that starts after the run returned never sees older data
//!
//! The caller commits, then invalidates. A render that read G >= C started
//! after step 2, so it read committed data. A render that read G < C is
//! either stopped by its clock pre-check (its check landed after the raise),
//! or its pre-check landed before the raise: then its index record landed
//! before step 4's read, and its store executed before the raise's
//! confirmation + 2W (put.rs explains both bounds), that is before step 4.
//! So step 4 (or 5) finds the page and its delete executes after the page's
//! store: when the run ends, no such page is in memcached, and none can
//! arrive. The layer's single-flight never hands a request a render whose
//! clock is older than the clock the request read (layer/service.rs).
//!
//! The cost: the 2W wait in every run (latency only: nothing is sent
//! meanwhile), and pages rendered during those 2W are deleted too (fresh or
//! not: a record does not say which store of a key is in memcached).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use memcache::exp::{Delete, Get, Meta, MutationStatus, Set, Ttl};

use super::Target;
use crate::clock::Clocks;
use crate::error::{Error, Result};
use crate::key::{KeyScheme, memcached_unescape};
use crate::memcached::{Circuit, Deletion, Pool, quiet_safe, text};
use crate::tags::{self, IndexKeys};

/// Index shards read (and their pages deleted, their records cleared) at
/// once: one tag's shards at the default `cache.index_shards`, so a tag costs
/// one read round trip; at most 16 x `index_shard_max_bytes` (4 MiB) held.
const CHUNK_SHARDS: usize = 16;
/// Page deletes sent at once (all servers, several connections each; see
/// `memcached::quiet`): 10,000 pages go in one round. At most 20,000 keys
/// of at most 250 bytes are held.
const CHUNK_DELETES: usize = 20_000;

/// How many times a shard is re-read when writers keep appending to it while
/// it is being cleared. Giving up leaves records of deleted pages behind: only
/// garbage (a few bytes, a few extra deletes next time), never a lost record.
const SHARD_CLEAR_ROUNDS: usize = 5;

/// Most `lru_crawler metadump` passes per server in one purge.
const PURGE_PASSES: usize = 8;

/// `lru_crawler metadump` may take a while on a big server.
const METADUMP_DEADLINE: Duration = Duration::from_secs(60);

/// Everything a run needs; shared by every run of one [`super::Invalidator`].
#[derive(Debug)]
pub(crate) struct Runner {
    pub(crate) pages: Arc<Pool>,
    pub(crate) index: Arc<Pool>,
    pub(crate) clocks: Clocks,
    pub(crate) index_keys: IndexKeys,
    pub(crate) keys: KeyScheme,
    pub(crate) index_ttl: u32,
    /// 2W + 1 ms: see [`settle_time`].
    pub(crate) settle: Duration,
}

/// 2W + 1 ms: the write path's stores that started before a clock raise was
/// confirmed have executed by then (put.rs); the extra millisecond covers
/// timers that round to whole milliseconds.
pub(crate) fn settle_time(write_window_ms: u64) -> Duration {
    Duration::from_millis(write_window_ms.saturating_mul(2).saturating_add(1))
}

/// What a run did for each of its targets.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Per target: the pages it listed that this run deleted (as
    /// [`PageId`]s of this run), or why it failed.
    pub(crate) targets: HashMap<Target, Result<HashSet<PageId>>>,
    /// Pages purged because an index server lost its records (step 1).
    pub(crate) index_recovery: usize,
    /// Distinct pages this run deleted.
    pub(crate) pages_removed: usize,
}

impl Outcome {
    fn new(targets: &BTreeSet<Target>) -> Self {
        Outcome {
            targets: targets
                .iter()
                .map(|t| (t.clone(), Ok(HashSet::new())))
                .collect(),
            index_recovery: 0,
            pages_removed: 0,
        }
    }

    fn fail(&mut self, target: &Target, error: &Error) {
        if let Some(slot) = self.targets.get_mut(target)
            && slot.is_ok()
        {
            *slot = Err(error.duplicate());
        }
    }

    fn fail_all(&mut self, error: &Error) {
        for slot in self.targets.values_mut() {
            if slot.is_ok() {
                *slot = Err(error.duplicate());
            }
        }
    }

    fn is_live(&self, target: &Target) -> bool {
        self.targets.get(target).is_some_and(Result::is_ok)
    }

    fn removed(&mut self, target: &Target, page: PageId) {
        if let Some(Ok(set)) = self.targets.get_mut(target) {
            set.insert(page);
        }
    }
}

/// A page this run deleted, numbered in the order of deletion: what the
/// per-target counts are made of (a few bytes each instead of a copy of the
/// key, for tags of tens of thousands of pages).
pub(crate) type PageId = u32;

/// Pages known to be gone so far in a run, and whether this run deleted them.
#[derive(Default)]
struct Deleted {
    /// Key -> `Some(id)` when this run deleted it, `None` when it was
    /// already missing.
    gone: HashMap<Vec<u8>, Option<PageId>>,
    /// How many of them this run deleted (the next id).
    removed: PageId,
}

impl Deleted {
    fn is_confirmed(&self, page: &[u8]) -> bool {
        self.gone.contains_key(page)
    }

    /// The page's id when this run deleted it.
    fn removed_id(&self, page: &[u8]) -> Option<PageId> {
        self.gone.get(page).copied().flatten()
    }

    /// `page` is gone; `applied`: this run's delete removed it.
    fn confirm(&mut self, page: &[u8], applied: bool) -> Option<PageId> {
        if let Some(known) = self.gone.get(page) {
            return *known;
        }
        let id = applied.then(|| {
            self.removed += 1;
            self.removed - 1
        });
        self.gone.insert(page.to_vec(), id);
        id
    }
}

impl Runner {
    /// Run the protocol for `targets` (see the module docs).
    pub(crate) async fn run(&self, targets: &BTreeSet<Target>) -> Outcome {
        let mut outcome = Outcome::new(targets);
        let has_tags = targets.iter().any(|t| matches!(t, Target::Tag(_)));
        // Not knowing whether the index lost records leaves the tags pending
        // (retried), but what the index lists is still deleted now.
        let mut recovery_error = None;
        if has_tags {
            match self.recover_lost_index().await {
                Ok(recovered) => outcome.index_recovery = recovered,
                Err(error) => recovery_error = Some(error),
            }
        }
        // Page keys of the URL targets; a URL that has none (a journal written
        // under another config) fails on its own.
        let mut url_keys: Vec<(Target, Vec<u8>)> = Vec::new();
        for target in targets {
            if let Target::Url(url) = target {
                match self.page_key(url) {
                    Ok(key) => url_keys.push((target.clone(), key)),
                    Err(error) => outcome.fail(target, &error),
                }
            }
        }
        let Some(raised) = self.raise(targets, &url_keys, &mut outcome).await else {
            return outcome;
        };
        self.settle(raised).await;

        let mut deleted = Deleted::default();
        let tags: Vec<(&Target, &str)> = targets
            .iter()
            .filter(|t| outcome.is_live(t))
            .filter_map(|t| match t {
                Target::Tag(tag) => Some((t, tag.as_str())),
                _ => None,
            })
            .collect();
        self.delete_tags(&tags, raised.clock, &mut deleted, &mut outcome)
            .await;

        let urls: Vec<(Target, Vec<u8>)> = url_keys
            .into_iter()
            .filter(|(t, _)| outcome.is_live(t))
            .collect();
        if !urls.is_empty() {
            let keys: Vec<&[u8]> = urls.iter().map(|(_, k)| k.as_slice()).collect();
            let failed = self.delete_pages(&keys, &mut deleted).await;
            for (target, key) in &urls {
                if let Some(error) = failed.get(key.as_slice()) {
                    outcome.fail(target, error);
                } else if let Some(id) = deleted.removed_id(key) {
                    outcome.removed(target, id);
                }
            }
        }

        for target in targets {
            if let Target::Prefix(prefix) = target
                && outcome.is_live(target)
            {
                match self.purge_keys(prefix, &mut deleted).await {
                    Ok(removed) => {
                        for id in removed {
                            outcome.removed(target, id);
                        }
                    }
                    Err(error) => outcome.fail(target, &error),
                }
            }
        }
        if let Some(error) = recovery_error {
            for target in targets {
                if matches!(target, Target::Tag(_)) {
                    outcome.fail(target, &error);
                }
            }
        }
        outcome.pages_removed = deleted.removed as usize + outcome.index_recovery;
        outcome
    }

    fn page_key(&self, url: &str) -> Result<Vec<u8>> {
        let (host, target) = crate::key::split_url(url);
        self.keys
            .page_key(host.map(str::as_bytes), target.as_bytes())
            .map(|key| key.escaped)
            .map_err(|reason| Error::NoCacheKey {
                url: url.to_owned(),
                reason,
            })
    }

    /// Step 2: bump G, raise every live target's clock. `None` when no
    /// target is left to work on.
    async fn raise(
        &self,
        targets: &BTreeSet<Target>,
        url_keys: &[(Target, Vec<u8>)],
        outcome: &mut Outcome,
    ) -> Option<Raised> {
        if !targets.iter().any(|t| outcome.is_live(t)) {
            return None;
        }
        let clock = match self.clocks.bump().await {
            Ok(clock) => clock,
            Err(error) => {
                outcome.fail_all(&error);
                return None;
            }
        };
        let ik = &self.index_keys;
        // (clock key, the targets it stands for); one purge clock for all prefixes.
        let mut keys: Vec<(Vec<u8>, Vec<Target>)> = Vec::new();
        let mut prefixes = Vec::new();
        for target in targets.iter().filter(|t| outcome.is_live(t)) {
            match target {
                Target::Tag(tag) => keys.push((ik.tag_clock(tag), vec![target.clone()])),
                Target::Url(_) => {
                    if let Some((_, key)) = url_keys.iter().find(|(t, _)| t == target) {
                        keys.push((ik.url_clock(key), vec![target.clone()]));
                    }
                }
                Target::Prefix(_) => prefixes.push(target.clone()),
            }
        }
        if !prefixes.is_empty() {
            keys.push((ik.purge_clock(), prefixes));
        }
        let clock_keys: Vec<Vec<u8>> = keys.iter().map(|(k, _)| k.clone()).collect();
        for ((_, owners), result) in keys.iter().zip(self.clocks.raise(&clock_keys, clock).await) {
            if let Err(error) = result {
                // Not raised: a render in flight could keep a stale page. This
                // target stops here, before anything is deleted or forgotten.
                for target in owners {
                    outcome.fail(target, &error);
                }
            }
        }
        let at = Instant::now();
        targets
            .iter()
            .any(|t| outcome.is_live(t))
            .then_some(Raised { clock, at })
    }

    /// Step 3: wait until the write path's stores that started before the
    /// clocks were raised have executed (put.rs).
    async fn settle(&self, raised: Raised) {
        tokio::time::sleep_until((raised.at + self.settle).into()).await;
    }

    /// Step 4 for every live tag, chunk by chunk.
    async fn delete_tags(
        &self,
        tags: &[(&Target, &str)],
        clock: u64,
        deleted: &mut Deleted,
        outcome: &mut Outcome,
    ) {
        let shard_keys: Vec<(usize, Vec<u8>)> = tags
            .iter()
            .enumerate()
            .flat_map(|(t, (_, tag))| self.index_keys.all_shards(tag).map(move |key| (t, key)))
            .collect();
        for chunk in shard_keys.chunks(CHUNK_SHARDS) {
            let reads = chunk
                .iter()
                .map(|(_, key)| (key.clone(), Get::new(key).meta(Meta::NONE.cas())))
                .collect();
            // (tag, shard key, CAS, value) of every non-empty shard read.
            let mut shards: Vec<(usize, Vec<u8>, u64, Vec<u8>)> = Vec::new();
            for ((t, key), result) in chunk
                .iter()
                .zip(self.index.run_routed(Circuit::Ignore, reads).await)
            {
                match result {
                    Ok(read) => {
                        if let (Some(value), Some(cas)) = (read.value, read.item.cas) {
                            shards.push((*t, key.clone(), cas, value));
                        }
                    }
                    Err(error) => outcome.fail(tags[*t].0, &error),
                }
            }
            // Each page once per run, whichever tags list it (borrowed from
            // the shards read: no copy per page).
            let mut wanted: Vec<&[u8]> = shards
                .iter()
                .flat_map(|(_, _, _, value)| tags::entries(value).map(|(page, _)| page))
                .collect();
            wanted.sort_unstable();
            wanted.dedup();
            let failed = self.delete_pages(&wanted, deleted).await;
            let mut clears = Vec::new();
            for (t, shard, cas, value) in shards {
                let target = tags[t].0;
                let mut complete = true;
                for (page, _) in tags::entries(&value) {
                    if let Some(error) = failed.get(page) {
                        outcome.fail(target, error);
                        complete = false;
                    } else if let Some(id) = deleted.removed_id(page) {
                        outcome.removed(target, id);
                    }
                }
                // Forget the records whose pages are confirmed gone, and only those.
                if complete && outcome.is_live(target) {
                    clears.push((target, shard, value, cas));
                }
            }
            // The shards are independent items: clear them all at once.
            let (targets, clearing): (Vec<_>, Vec<_>) = clears
                .into_iter()
                .map(|(target, shard, value, cas)| {
                    let clear = async move { self.clear_shard(&shard, value, cas, clock).await };
                    (target, clear)
                })
                .unzip();
            let cleared = join_all(clearing).await;
            for (target, result) in targets.into_iter().zip(cleared) {
                if let Err(error) = result {
                    outcome.fail(target, &error);
                }
            }
        }
    }

    /// Delete page keys on the servers nginx reads them from, at most
    /// [`CHUNK_DELETES`] at once. Returns the failures by key.
    async fn delete_pages(&self, keys: &[&[u8]], deleted: &mut Deleted) -> HashMap<Vec<u8>, Error> {
        let mut failed = HashMap::new();
        for chunk in keys.chunks(CHUNK_DELETES) {
            let todo: Vec<&[u8]> = chunk
                .iter()
                .copied()
                .filter(|key| !deleted.is_confirmed(key))
                .collect();
            // Every server at once, one quiet-mode batch each (`md <key> q`,
            // one `mn`: memcached answers only what did not succeed); the rare
            // keys the meta client would base64-encode go in an ordinary
            // pipelined batch alongside. The ring hashes the value V, which is
            // the key itself unless the key has escapes.
            let (quiet, plain): (Vec<&[u8]>, Vec<&[u8]>) =
                todo.into_iter().partition(|key| quiet_safe(key));
            let quiet_pairs: Vec<(Cow<'_, [u8]>, &[u8])> =
                quiet.iter().map(|key| (ring_value(key), *key)).collect();
            let plain_ops = plain
                .iter()
                .map(|key| (ring_value(key).into_owned(), Delete::new(*key)))
                .collect();
            let (quiet_results, plain_results) = futures_util::future::join(
                self.pages.delete_quiet_routed(&quiet_pairs),
                self.pages.run_routed(Circuit::Ignore, plain_ops),
            )
            .await;
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
                match result {
                    Ok(applied) => {
                        deleted.confirm(key, applied);
                    }
                    Err(error) => {
                        failed.insert(key.to_vec(), error);
                    }
                }
            }
        }
        failed
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
    ) -> Result<()> {
        let server = self.index.route(shard);
        for _ in 0..SHARD_CLEAR_ROUNDS {
            let kept = tags::retain_since(&value, clock);
            let result = if kept.is_empty() {
                server
                    .run(Circuit::Ignore, Delete::new(shard).compare_cas(cas))
                    .await?
            } else {
                let set = Set::new(shard, kept)
                    .ttl(Ttl::secs(self.index_ttl))
                    .compare_cas(cas);
                server.run(Circuit::Ignore, set).await?
            };
            if result.status != MutationStatus::CasMismatch {
                return Ok(());
            }
            let current = server
                .run(Circuit::Ignore, Get::new(shard).meta(Meta::NONE.cas()))
                .await?;
            let (Some(current), Some(current_cas)) = (current.value, current.item.cas) else {
                return Ok(());
            };
            (value, cas) = (current, current_cas);
        }
        Ok(())
    }

    /// Step 5 for one prefix: delete every page whose value V starts with
    /// `keys.prefix` + `prefix`, walking each page server's key list.
    async fn purge_keys(&self, prefix: &str, deleted: &mut Deleted) -> Result<Vec<PageId>> {
        let mut wanted = self.keys.prefix().to_vec();
        wanted.extend_from_slice(prefix.as_bytes());
        let namespace = self.index_keys.namespace().as_bytes();
        let mut removed = Vec::new();
        let mut first_error = None;
        for (index, server) in self.pages.servers().iter().enumerate() {
            // `Server::metadump` walks the hash table, which sees every item
            // once; the LRU walk it falls back to on an old memcached can skip
            // items that move in the LRU while the crawler walks it (seen on
            // 1.6.18 for recently read items): walk again until a pass finds
            // nothing left to delete.
            for _ in 0..PURGE_PASSES {
                let lines = match server.metadump(METADUMP_DEADLINE).await {
                    Ok(lines) => lines,
                    Err(error) => {
                        first_error.get_or_insert(error);
                        break;
                    }
                };
                let doomed: Vec<Vec<u8>> = lines
                    .iter()
                    .filter_map(|line| text::metadump_key(line))
                    .filter(|key| !key.starts_with(namespace))
                    .filter(|key| {
                        memcached_unescape(key).is_some_and(|value| value.starts_with(&wanted))
                    })
                    .collect();
                if doomed.is_empty() {
                    break;
                }
                for chunk in doomed.chunks(CHUNK_DELETES) {
                    let ops = chunk.iter().map(|key| (index, Delete::new(key))).collect();
                    for (key, result) in chunk
                        .iter()
                        .zip(self.pages.run_on(Circuit::Ignore, ops).await)
                    {
                        match result {
                            Ok(result) => {
                                let applied = result.status == MutationStatus::Applied;
                                if let Some(id) = deleted.confirm(key, applied) {
                                    removed.push(id);
                                }
                            }
                            Err(error) => {
                                first_error.get_or_insert(error);
                            }
                        }
                    }
                }
            }
        }
        // A page deleted in two passes (stored again in between) counts once.
        removed.sort_unstable();
        removed.dedup();
        match first_error {
            None => Ok(removed),
            Some(error) => Err(error),
        }
    }

    /// An index server that restarted since the last invalidation lost the
    /// records of every page stored before: those pages could never be found
    /// by tag again and would stay, stale, until their TTL. Detect it (each
    /// index server's process id and start time, remembered on the page
    /// servers) and purge every page once; returns how many were removed.
    /// Nothing to do when pages and index share servers: a restart lost both.
    async fn recover_lost_index(&self) -> Result<usize> {
        if Arc::ptr_eq(&self.pages, &self.index) {
            return Ok(0);
        }
        let mut lost = Vec::new();
        let mut remember = Vec::new();
        for server in self.index.servers() {
            let stats = text::stats(&server.text_command("stats", Duration::ZERO).await?);
            let stat = |name: &str| text::stat_u64(&stats, name);
            let (Some(pid), Some(time), Some(uptime)) = (stat("pid"), stat("time"), stat("uptime"))
            else {
                return Err(server.protocol("stats without pid, time or uptime"));
            };
            let boot = format!("{pid}:{}", time.saturating_sub(uptime));
            let key = self.index_keys.index_boot(server.name());
            let marker = self
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
            let all = BTreeSet::from([Target::Prefix(String::new())]);
            let raised = {
                let mut outcome = Outcome::new(&all);
                let raised = self.raise(&all, &[], &mut outcome).await;
                if let Some(Err(error)) = outcome.targets.remove(&Target::Prefix(String::new())) {
                    return Err(error);
                }
                raised
            };
            if let Some(raised) = raised {
                self.settle(raised).await;
            }
            removed = self.purge_keys("", &mut Deleted::default()).await?.len();
        }
        // Only after the purge succeeded: a failed purge is retried next time.
        for (key, boot) in remember {
            let set = Set::new(&key, boot.as_bytes()).ttl(Ttl::NEVER);
            self.pages.route(&key).run(Circuit::Ignore, set).await?;
        }
        Ok(removed)
    }
}

/// The value V nginx hashes for a page key K: K itself unless it has escapes.
fn ring_value(key: &[u8]) -> Cow<'_, [u8]> {
    if key.contains(&b'%') {
        memcached_unescape(key).map_or(Cow::Borrowed(key), Cow::Owned)
    } else {
        Cow::Borrowed(key)
    }
}

/// The clock of a run and when its raise was confirmed.
#[derive(Debug, Clone, Copy)]
struct Raised {
    clock: u64,
    at: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_page_gets_one_id_and_only_deleted_pages_get_one() {
        let mut deleted = Deleted::default();
        // (page, this run's delete applied, expected id)
        let table: [(&[u8], bool, Option<PageId>); 6] = [
            (b"/a", true, Some(0)),
            (b"/b", false, None),
            (b"/c", true, Some(1)),
            // Seen again (listed by another tag, or a duplicate record): the
            // first answer stands.
            (b"/a", false, Some(0)),
            (b"/b", true, None),
            (b"/c", true, Some(1)),
        ];
        for (page, applied, id) in table {
            assert_eq!(deleted.confirm(page, applied), id, "{page:?}");
            assert!(deleted.is_confirmed(page));
            assert_eq!(deleted.removed_id(page), id);
        }
        assert_eq!(deleted.removed, 2);
        assert!(!deleted.is_confirmed(b"/d"));
    }
}
