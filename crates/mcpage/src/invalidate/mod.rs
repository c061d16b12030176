//! [`Invalidator`]: remove pages by tag, by URL or by key prefix; combine
//! concurrent calls; retry what memcached did not confirm.
//!
//! - **The protocol** of one run, and why a request that starts after it
//!   returned never gets older data, is in [`run`] (and `put.rs` for the
//!   write path's side).
//! - **Combining.** Calls do not run the protocol themselves: they join the
//!   next run. At most one run is in flight per `Invalidator`; calls that
//!   arrive meanwhile are merged into the run that starts when it ends, so
//!   every caller returns once a run that **started after its call** and
//!   covers all its targets is done: the read-your-writes promise holds for
//!   each caller, and a burst of 200 identical calls costs two runs, not
//!   200. Runs are spawned tasks: a caller that goes away (an HTTP client
//!   hanging up) does not cancel one. More than `invalidation.max_waiting`
//!   callers waiting is [`Error::Overloaded`], with a time to retry after.
//! - **Never lost.** Targets a run could not confirm are kept in a bounded
//!   queue (`invalidation.pending_limit`; a full queue is [`Error::QueueFull`])
//!   and retried in the background with exponential backoff
//!   (`invalidation.retry_min_ms` .. `retry_max_ms`) until memcached confirms.
//!   The caller is told ([`Error::Pending`]); [`Invalidator::pending`] says
//!   how many targets wait and since when. A later run that started after a
//!   target was queued and confirmed it also settles it. While a target is
//!   pending its pages may be stale: the read-your-writes promise starts when
//!   the retry confirms, not when the call returned `Pending`.
//!   [`Invalidator::pending_items`], [`Invalidator::restore`] and
//!   [`Invalidator::pending_changes`] let a process keep the queue across
//!   restarts (the proxy's journal).
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

mod run;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::Clocks;
use crate::config::InvalidationConfig;
use crate::error::{Error, Result};
use crate::key::KeyScheme;
use crate::memcached::Pool;
use crate::stats::{Metrics, Pending};
use crate::tags::IndexKeys;
use run::{Outcome, Runner};

/// Removes pages; obtained from [`Cache::invalidator`](crate::Cache::invalidator).
/// Cheap to clone; clones share everything (one combined run at a time, one
/// retry queue).
#[derive(Debug, Clone)]
pub struct Invalidator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runner: Runner,
    state: Mutex<State>,
    /// Bumped whenever the set of pending targets changes.
    changes: watch::Sender<u64>,
    retry_min: Duration,
    retry_max: Duration,
    pending_limit: usize,
    max_waiting: usize,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct State {
    /// A run is in flight (its task drives the runs that follow).
    running: bool,
    /// The calls that arrived since the run in flight started.
    next: Option<Batch>,
    /// How long the last run took: the Retry-After of [`Error::Overloaded`].
    last_run: Duration,
    pending: BTreeMap<Target, Queued>,
    /// The retry task is alive.
    retrying: bool,
    /// Failed retries in a row (the backoff exponent).
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Queued {
    since: Instant,
    since_unix_ms: u64,
}

/// Calls merged into one run.
#[derive(Debug)]
struct Batch {
    targets: BTreeSet<Target>,
    /// Callers waiting (the retry task not counted).
    waiters: usize,
    done: watch::Sender<Option<Arc<Answer>>>,
}

/// A finished run, as its callers see it.
#[derive(Debug)]
struct Answer {
    outcome: Outcome,
    /// Failed targets that are in the retry queue (the others did not fit).
    queued: HashSet<Target>,
}

/// Something an invalidation removes pages by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Target {
    /// Every page registered under this tag.
    Tag(String),
    /// The page of this URL, as a user writes it (`/a//b`, `/caf%C3%A9`).
    Url(String),
    /// Every page whose path starts with this (`/` is every page).
    Prefix(String),
}

impl Target {
    /// The tag, URL or prefix as given.
    pub fn item(&self) -> &str {
        match self {
            Target::Tag(item) | Target::Url(item) | Target::Prefix(item) => item,
        }
    }
}

/// A target waiting to be retried, as [`Invalidator::pending_items`] lists it
/// and [`Invalidator::restore`] takes it back (serde: `{"target": {"tag":
/// "comments"}, "since_unix_ms": 1700000000000}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PendingItem {
    /// What to invalidate.
    pub target: Target,
    /// When it was first not confirmed (milliseconds since the Unix epoch).
    pub since_unix_ms: u64,
}

impl PendingItem {
    /// A pending target first not confirmed at `since_unix_ms`.
    pub fn new(target: Target, since_unix_ms: u64) -> Self {
        PendingItem {
            target,
            since_unix_ms,
        }
    }
}

/// What an invalidation removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removed {
    /// Distinct pages deleted from memcached (pages already gone are not
    /// counted), [`index_recovery`](Self::index_recovery) included. When calls
    /// are combined, a page counts for every call whose targets listed it.
    pub pages: usize,
    /// Per tag, URL or prefix, in the order given (sorted, without duplicates).
    pub by_item: Vec<RemovedItem>,
    /// Pages purged first because a separate index server restarted and lost
    /// its records (see [`Invalidator::invalidate_tags`]); 0 normally.
    pub index_recovery: usize,
}

/// Pages one tag, URL or prefix listed that were deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemovedItem {
    /// The tag, URL or prefix as given.
    pub item: String,
    /// The same, with its kind.
    pub target: Target,
    /// Pages deleted that it listed.
    pub pages: usize,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Invalidator {
    #[expect(clippy::too_many_arguments, reason = "the parts the Cache owns")]
    pub(crate) fn new(
        pages: Arc<Pool>,
        index: Arc<Pool>,
        clocks: Clocks,
        index_keys: IndexKeys,
        keys: KeyScheme,
        index_ttl: u32,
        config: &InvalidationConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Invalidator {
            inner: Arc::new(Inner {
                runner: Runner {
                    pages,
                    index,
                    clocks,
                    index_keys,
                    keys,
                    index_ttl,
                    settle: run::settle_time(config.write_window_ms),
                },
                state: Mutex::default(),
                changes: watch::Sender::new(0),
                retry_min: Duration::from_millis(config.retry_min_ms),
                retry_max: Duration::from_millis(config.retry_max_ms.max(config.retry_min_ms)),
                pending_limit: config.pending_limit,
                max_waiting: config.max_waiting,
                metrics,
            }),
        }
    }

    /// Remove every page registered under any of `tags`, on every server.
    /// Tags are trimmed; empty ones are ignored. Returns once a run that
    /// started after this call has removed them (calls are combined: see the
    /// [module docs](self)).
    ///
    /// When a separate index server restarted since the last invalidation (its
    /// records are gone), every page is purged first, once: the count includes
    /// them, also in [`Removed::index_recovery`].
    ///
    /// # Errors
    /// [`Error::Pending`] when memcached did not confirm (some pages may
    /// remain until the background retry confirms); [`Error::QueueFull`] when
    /// it did not confirm and the retry queue had no room; [`Error::Overloaded`]
    /// when too many calls are already waiting (nothing was done);
    /// [`Error::Stopped`] when the runtime shuts down meanwhile.
    pub async fn invalidate_tags<I, T>(&self, tags: I) -> Result<Removed>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.invalidate(tags.into_iter().map(|t| Target::Tag(t.as_ref().to_owned())))
            .await
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
        self.invalidate(urls.into_iter().map(|u| Target::Url(u.as_ref().to_owned())))
            .await
    }

    /// Remove every page whose value V starts with `keys.prefix` + `prefix`
    /// (`/` removes all pages; in host mode write `example.com/blog/`), by
    /// walking each page server's key list (`lru_crawler metadump`). Also the
    /// recovery after an index server lost its data.
    ///
    /// # Errors
    /// As [`invalidate_tags`](Self::invalidate_tags); a server that cannot
    /// list its keys leaves the purge pending.
    pub async fn purge_prefix(&self, prefix: &str) -> Result<Removed> {
        self.invalidate([Target::Prefix(prefix.to_owned())]).await
    }

    /// Tags, URLs and prefixes at once, in one run: what
    /// [`invalidate_tags`](Self::invalidate_tags),
    /// [`invalidate_urls`](Self::invalidate_urls) and
    /// [`purge_prefix`](Self::purge_prefix) each do for one kind. Tags are
    /// trimmed; empty tags and URLs are ignored (an empty prefix is the key
    /// prefix itself: every page).
    ///
    /// # Errors
    /// As [`invalidate_urls`](Self::invalidate_urls).
    pub async fn invalidate(&self, targets: impl IntoIterator<Item = Target>) -> Result<Removed> {
        let mut wanted = BTreeSet::new();
        for target in targets {
            let target = match target {
                Target::Tag(tag) => Target::Tag(tag.trim().to_owned()),
                other => other,
            };
            match &target {
                Target::Tag(item) | Target::Url(item) if item.is_empty() => continue,
                Target::Url(url) => {
                    // A URL that can have no page is the caller's mistake, not
                    // a memcached failure: refused before anything is removed.
                    let (host, path) = crate::key::split_url(url);
                    self.inner
                        .runner
                        .keys
                        .page_key(host.map(str::as_bytes), path.as_bytes())
                        .map_err(|reason| Error::NoCacheKey {
                            url: url.clone(),
                            reason,
                        })?;
                }
                _ => {}
            }
            wanted.insert(target);
        }
        let result = self.submit(wanted, true).await;
        let metrics = &self.inner.metrics;
        match &result {
            Ok(_) => metrics.invalidations.fetch_add(1, Ordering::Relaxed),
            Err(_) => metrics.invalidation_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Tags, URLs and prefixes memcached has not confirmed yet, and since when.
    pub fn pending(&self) -> Pending {
        let state = self.state();
        Pending {
            count: state.pending.len(),
            oldest: state.pending.values().map(|q| q.since.elapsed()).max(),
            attempts: state.attempts,
            last_error: (!state.pending.is_empty())
                .then(|| state.last_error.clone())
                .flatten(),
        }
    }

    /// Every pending target, for a journal ([`restore`](Self::restore) takes them back).
    pub fn pending_items(&self) -> Vec<PendingItem> {
        self.state()
            .pending
            .iter()
            .map(|(target, queued)| PendingItem::new(target.clone(), queued.since_unix_ms))
            .collect()
    }

    /// Changes whenever the set of pending targets changes (a journal writer
    /// waits on it, then writes [`pending_items`](Self::pending_items)).
    pub fn pending_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Queue `items` (read back from a journal) for retry, as if they had just
    /// failed, keeping their age; the retries start at once. Returns how many
    /// were added (targets already pending are not counted).
    ///
    /// # Errors
    /// [`Error::QueueFull`] (without a first failure) when they do not all
    /// fit; those that fit are queued.
    pub fn restore(&self, items: impl IntoIterator<Item = PendingItem>) -> Result<usize> {
        let now = SystemTime::now();
        let mut added = 0;
        let mut dropped = 0;
        {
            let mut state = self.state();
            for item in items {
                if state.pending.contains_key(&item.target) {
                    continue;
                }
                if state.pending.len() >= self.inner.pending_limit {
                    dropped += 1;
                    continue;
                }
                let age = now
                    .duration_since(UNIX_EPOCH + Duration::from_millis(item.since_unix_ms))
                    .unwrap_or_default();
                let since = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                state.pending.insert(
                    item.target,
                    Queued {
                        since,
                        since_unix_ms: item.since_unix_ms,
                    },
                );
                added += 1;
            }
            state.last_error = Some("restored from a journal: not confirmed yet".to_owned());
            start_retries(&self.inner, &mut state);
        }
        self.inner.changes.send_modify(|n| *n += 1);
        if dropped > 0 {
            tracing::error!(
                dropped,
                limit = self.inner.pending_limit,
                "pending invalidations not restored: the retry queue is full"
            );
            return Err(Error::QueueFull {
                limit: self.inner.pending_limit,
                first: None,
            });
        }
        Ok(added)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Join the next run with `targets` and wait for it. `caller`: counted
    /// against `max_waiting` (the retry task is not).
    async fn submit(&self, targets: BTreeSet<Target>, caller: bool) -> Result<Removed> {
        if targets.is_empty() {
            return Ok(Removed::default());
        }
        let mut done = {
            let mut state = self.state();
            let waiting = state.next.as_ref().map_or(0, |b| b.waiters);
            if caller && waiting >= self.inner.max_waiting {
                self.inner.metrics.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded {
                    waiting,
                    retry_after: state.last_run.max(Duration::from_secs(1)),
                });
            }
            let batch = state.next.get_or_insert_with(|| Batch {
                targets: BTreeSet::new(),
                waiters: 0,
                done: watch::Sender::new(None),
            });
            batch.targets.extend(targets.iter().cloned());
            batch.waiters += usize::from(caller);
            let done = batch.done.subscribe();
            if !state.running {
                state.running = true;
                tokio::spawn(drive(Arc::clone(&self.inner)));
            }
            done
        };
        let answer = match done.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone(),
            Err(_) => None,
        };
        let Some(answer) = answer else {
            return Err(Error::Stopped);
        };
        answer_for(&answer, &targets, self.inner.pending_limit)
    }
}

/// Spawn the retry task unless it runs or nothing is pending.
fn start_retries(inner: &Arc<Inner>, state: &mut State) {
    if !state.retrying && !state.pending.is_empty() {
        state.retrying = true;
        tokio::spawn(retry(Invalidator {
            inner: Arc::clone(inner),
        }));
    }
}

/// What one caller gets from a run: its targets' counts, or the first failure.
fn answer_for(answer: &Answer, targets: &BTreeSet<Target>, limit: usize) -> Result<Removed> {
    let mut removed = Removed {
        index_recovery: 0,
        ..Removed::default()
    };
    let mut pages: HashSet<run::PageId> = HashSet::new();
    let mut first: Option<&Error> = None;
    let mut failed = 0;
    let mut lost = false;
    for target in targets {
        match answer.outcome.targets.get(target) {
            Some(Ok(set)) => {
                pages.extend(set.iter().copied());
                removed.by_item.push(RemovedItem {
                    item: target.item().to_owned(),
                    target: target.clone(),
                    pages: set.len(),
                });
                if matches!(target, Target::Tag(_)) {
                    removed.index_recovery = answer.outcome.index_recovery;
                }
            }
            Some(Err(error)) => {
                failed += 1;
                first.get_or_insert(error);
                lost |= !answer.queued.contains(target);
            }
            None => {
                failed += 1;
                first.get_or_insert(&Error::Stopped);
            }
        }
    }
    match first {
        None => {
            removed.pages = pages.len() + removed.index_recovery;
            Ok(removed)
        }
        Some(first) if lost => Err(Error::QueueFull {
            limit,
            first: Some(Box::new(first.duplicate())),
        }),
        Some(first) => Err(Error::Pending {
            items: failed,
            first: Box::new(first.duplicate()),
        }),
    }
}

/// Marks the combiner idle if the task driving it ends without doing so
/// (a panic): the next call starts a new one instead of waiting forever.
struct Idle(Arc<Inner>);

impl Drop for Idle {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.running = false;
        }
    }
}

/// The task that runs batches one after another while calls keep coming.
async fn drive(inner: Arc<Inner>) {
    let _idle = Idle(Arc::clone(&inner));
    loop {
        let batch = {
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            match state.next.take() {
                Some(batch) => batch,
                None => {
                    state.running = false;
                    return;
                }
            }
        };
        let started = Instant::now();
        let outcome = inner.runner.run(&batch.targets).await;
        inner
            .metrics
            .invalidation_runs
            .fetch_add(1, Ordering::Relaxed);
        inner
            .metrics
            .pages_removed
            .fetch_add(outcome.pages_removed as u64, Ordering::Relaxed);
        let queued = settle_pending(&inner, &outcome, started);
        batch
            .done
            .send_replace(Some(Arc::new(Answer { outcome, queued })));
    }
}

/// After a run: confirmed targets leave the queue when the run started after
/// they were queued; failed ones join it while there is room. Returns the
/// failed targets that are queued.
fn settle_pending(inner: &Arc<Inner>, outcome: &Outcome, started: Instant) -> HashSet<Target> {
    let mut queued = HashSet::new();
    let mut changed = false;
    let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.last_run = started.elapsed();
    for (target, result) in &outcome.targets {
        match result {
            Ok(_) => {
                if state
                    .pending
                    .get(target)
                    .is_some_and(|queued| queued.since < started)
                {
                    state.pending.remove(target);
                    changed = true;
                }
            }
            Err(error) => {
                state.last_error = Some(error.to_string());
                if !state.pending.contains_key(target) {
                    if state.pending.len() >= inner.pending_limit {
                        continue;
                    }
                    state.pending.insert(
                        target.clone(),
                        Queued {
                            since: started,
                            since_unix_ms: unix_ms(SystemTime::now()),
                        },
                    );
                    changed = true;
                }
                queued.insert(target.clone());
            }
        }
    }
    start_retries(inner, &mut state);
    drop(state);
    if changed {
        inner.changes.send_modify(|n| *n += 1);
    }
    queued
}

/// The retry task: while anything is pending, wait (exponential backoff),
/// then submit every pending target as one call.
async fn retry(invalidator: Invalidator) {
    loop {
        let (delay, targets) = {
            let mut state = invalidator.state();
            if state.pending.is_empty() {
                state.retrying = false;
                state.attempts = 0;
                return;
            }
            let factor = 1u32.checked_shl(state.attempts.min(20)).unwrap_or(u32::MAX);
            let delay = invalidator
                .inner
                .retry_min
                .saturating_mul(factor)
                .min(invalidator.inner.retry_max);
            let targets: BTreeSet<Target> = state.pending.keys().cloned().collect();
            (delay, targets)
        };
        tokio::time::sleep(delay).await;
        invalidator
            .inner
            .metrics
            .invalidation_retries
            .fetch_add(1, Ordering::Relaxed);
        let confirmed = invalidator.submit(targets, false).await.is_ok();
        let mut state = invalidator.state();
        state.attempts = if confirmed {
            0
        } else {
            state.attempts.saturating_add(1)
        };
    }
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
    fn pending_items_are_journaled_as_json() {
        let item = PendingItem::new(Target::Tag("comments".into()), 1_700_000_000_000);
        let text = serde_json::to_string(&item).expect("json");
        assert_eq!(
            text,
            r#"{"target":{"tag":"comments"},"since_unix_ms":1700000000000}"#
        );
        let back: PendingItem = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, item);
    }

    #[test]
    fn a_caller_gets_its_own_targets_counts_or_its_first_failure() {
        let tag = Target::Tag("a".into());
        let url = Target::Url("/x".into());
        let mut outcome = Outcome {
            targets: Default::default(),
            index_recovery: 0,
            pages_removed: 2,
        };
        outcome
            .targets
            .insert(tag.clone(), Ok(HashSet::from([0, 1])));
        outcome
            .targets
            .insert(url.clone(), Err(Error::BreakerOpen { server: "s".into() }));
        let answer = Answer {
            outcome,
            queued: HashSet::from([url.clone()]),
        };
        let removed = answer_for(&answer, &BTreeSet::from([tag.clone()]), 10).expect("ok");
        assert_eq!((removed.pages, removed.count_for("a")), (2, 2));
        let both = BTreeSet::from([tag, url.clone()]);
        assert!(matches!(
            answer_for(&answer, &both, 10),
            Err(Error::Pending { items: 1, .. })
        ));
        let lost = Answer {
            queued: HashSet::new(),
            ..answer
        };
        assert!(matches!(
            answer_for(&lost, &BTreeSet::from([url]), 10),
            Err(Error::QueueFull { limit: 10, .. })
        ));
    }
}
