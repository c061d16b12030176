//! memcached faults under load, through real nginx and the layer: two page
//! servers and one index server (`index_servers`). A bounded load loop on
//! loopback runs while the index server is stopped and restarted empty, one
//! page server is killed and restarted empty, and the other paused with
//! SIGSTOP (timeouts). Meanwhile the "database" is committed to and tags are
//! invalidated.
//!
//! Figures printed (and what is asserted):
//! - failed user requests: must be 0 (nginx falls back to the app, the layer
//!   fails open);
//! - request latency p50/p99 per phase: printed, never asserted;
//! - invalidations that returned `Ok` but left a page: must be 0. A page is
//!   "left" when, once the round's requests and background writes are done, a
//!   server holds a page of the tag that shows data older than the commit the
//!   invalidation followed; an invalidation with no requests running must
//!   leave no page of the tag at all;
//! - invalidations that returned `Err` during a fault: expected > 0 (they are
//!   retried once the fault is over, and the retry must succeed);
//! - after the index server restart: the pages that lost their index records
//!   (orphans), and that `purge_prefix("/")` removes them.
//!
//! Each phase is bounded in requests (`MCPAGE_FAULT_REQUESTS` per phase,
//! default 2,000).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{OriginalUri, State};
use axum::http::header;
use mcpage::{Cache, CacheTags, PageCacheLayer};
use mcpage_tests::{Memcached, Stack, env_count, try_request};
use tokio::sync::Notify;

/// Distinct pages; page `i` has tags `t{i % 10}` and `u{i % 7}`.
const PAGES: u64 = 300;
const T_TAGS: u64 = 10;
const U_TAGS: u64 = 7;
const TAGS: usize = (T_TAGS + U_TAGS) as usize;
/// Rounds per phase: each runs a share of the phase's requests.
const ROUNDS: usize = 8;
/// Concurrent clients.
const CLIENTS: usize = 16;

fn requests_per_phase() -> usize {
    usize::try_from(env_count("MCPAGE_FAULT_REQUESTS", 2_000)).unwrap_or(usize::MAX)
}

/// Tag slots: `t0..t9` are 0..10, `u0..u6` are 10..17.
fn tag_name(slot: usize) -> String {
    if (slot as u64) < T_TAGS {
        format!("t{slot}")
    } else {
        format!("u{}", slot as u64 - T_TAGS)
    }
}

fn tags_of(page: u64) -> [usize; 2] {
    [(page % T_TAGS) as usize, (T_TAGS + page % U_TAGS) as usize]
}

/// The "database": one version per tag; a page shows the versions of its tags.
#[derive(Clone)]
struct Data {
    versions: Arc<Vec<AtomicU64>>,
}

async fn render(
    State(data): State<Data>,
    OriginalUri(uri): OriginalUri,
) -> impl axum::response::IntoResponse {
    let page: u64 = uri
        .path()
        .strip_prefix("/p/")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let [a, b] = tags_of(page);
    // Read the data before rendering, as an app reads its database.
    let va = data.versions[a].load(Ordering::SeqCst);
    let vb = data.versions[b].load(Ordering::SeqCst);
    (
        CacheTags::new([tag_name(a), tag_name(b)]),
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("<p>/p/{page} {va} {vb}</p>"),
    )
}

/// The versions a stored page body shows, for its two tags.
fn shown_versions(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let inner = text.strip_prefix("<p>")?.strip_suffix("</p>")?;
    let mut words = inner.split(' ').skip(1);
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

#[derive(Default)]
struct Load {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    /// Answered by nginx from memcached.
    hits: usize,
}

/// `requests` GETs of random pages through nginx, `CLIENTS` at a time; counts
/// each finished request in `done` and wakes `halfway` once half are done.
async fn load(
    nginx: &str,
    requests: usize,
    seed: u64,
    done: Arc<AtomicUsize>,
    halfway: Arc<Notify>,
) -> Load {
    let mut clients = tokio::task::JoinSet::new();
    let mut seeds = fastrand::Rng::with_seed(seed);
    for client in 0..CLIENTS {
        let share = requests / CLIENTS + usize::from(client < requests % CLIENTS);
        let nginx = nginx.to_owned();
        let done = Arc::clone(&done);
        let halfway = Arc::clone(&halfway);
        let mut rng = seeds.fork();
        clients.spawn(async move {
            let mut out = Load::default();
            for _ in 0..share {
                let page = rng.u64(..PAGES);
                let url = format!("http://{nginx}/p/{page}");
                let started = Instant::now();
                let result = try_request("GET", &url, &[], b"").await;
                out.latencies.push(started.elapsed());
                let prefix = format!("<p>/p/{page} ");
                match result {
                    Ok(r) if r.status == 200 && r.body.starts_with(prefix.as_bytes()) => {
                        out.hits += usize::from(r.header("x-cache") == Some("HIT"));
                    }
                    Ok(r) => out
                        .failures
                        .push(format!("/p/{page}: {} {:?}", r.status, r.text())),
                    Err(e) => out.failures.push(format!("/p/{page}: {e:#}")),
                }
                if done.fetch_add(1, Ordering::SeqCst) + 1 == requests / 2 {
                    halfway.notify_one();
                }
            }
            out
        });
    }
    let mut all = Load::default();
    while let Some(part) = clients.join_next().await {
        let part = part.expect("client task");
        all.latencies.extend(part.latencies);
        all.failures.extend(part.failures);
        all.hits += part.hits;
    }
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Which page server is down or paused (it cannot be read), if any.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Faulty {
    None,
    Page(usize),
}

struct Run {
    /// Two page servers, an index server with `-M`, the app and nginx.
    stack: Stack,
    data: Data,
    /// Per tag: the version committed before its last invalidation that returned Ok.
    confirmed: Vec<u64>,
    /// Tags whose invalidation returned Err and must be retried.
    pending: BTreeSet<usize>,
    rng: fastrand::Rng,
    requests_per_round: usize,
    // Figures.
    failed_requests: usize,
    ok_invalidations: usize,
    err_invalidations: usize,
    left_pages: usize,
    /// Per phase: name, p50, p99.
    latency: Vec<(String, Duration, Duration)>,
}

impl Run {
    async fn start() -> Run {
        let data = Data {
            versions: Arc::new((0..TAGS).map(|_| AtomicU64::new(0)).collect()),
        };
        let stack = Stack::builder()
            .page_servers(2)
            .index_server(&["-M"])
            .config(|c| {
                c.memcached.timeout_ms = 100;
                c.memcached.breaker_cooldown_ms = 500;
            })
            .app(|cache| {
                Router::new()
                    .fallback(render)
                    .with_state(data.clone())
                    .layer(PageCacheLayer::new(cache.clone()))
            })
            .start()
            .await;
        Run {
            stack,
            data,
            confirmed: vec![0; TAGS],
            pending: BTreeSet::new(),
            rng: fastrand::Rng::with_seed(0xD1B5_4A32_D192_ED03),
            requests_per_round: (requests_per_phase() / ROUNDS).max(CLIENTS),
            failed_requests: 0,
            ok_invalidations: 0,
            err_invalidations: 0,
            left_pages: 0,
            latency: Vec::new(),
        }
    }

    fn key(&self, page: u64) -> Vec<u8> {
        self.stack
            .cache()
            .page_key(None, format!("/p/{page}").as_bytes())
            .expect("cacheable")
            .escaped
    }

    fn readable(&self, faulty: Faulty) -> Vec<&Memcached> {
        self.stack
            .memcached()
            .iter()
            .enumerate()
            .filter(|(i, _)| faulty != Faulty::Page(*i))
            .map(|(_, m)| m)
            .collect()
    }

    /// Commit to tag `slot`, then invalidate it; record the outcome.
    async fn commit_and_invalidate(
        cache: &Cache,
        data: &Data,
        slot: usize,
    ) -> (usize, u64, mcpage::Result<mcpage::Removed>) {
        let version = data.versions[slot].fetch_add(1, Ordering::SeqCst) + 1;
        let result = cache.invalidator().invalidate_tags([tag_name(slot)]).await;
        (slot, version, result)
    }

    fn record(&mut self, slot: usize, version: u64, result: &mcpage::Result<mcpage::Removed>) {
        match result {
            Ok(_) => {
                self.ok_invalidations += 1;
                self.confirmed[slot] = self.confirmed[slot].max(version);
                self.pending.remove(&slot);
            }
            Err(_) => {
                self.err_invalidations += 1;
                self.pending.insert(slot);
            }
        }
    }

    /// Pages on readable servers that show data older than a confirmed invalidation.
    fn stale_pages(&self, faulty: Faulty) -> Vec<String> {
        let mut stale = Vec::new();
        for page in 0..PAGES {
            let key = self.key(page);
            let [ta, tb] = tags_of(page);
            for server in self.readable(faulty) {
                if let Some((_, body)) = server.get_raw(&key) {
                    let (va, vb) = shown_versions(&body).unwrap_or((0, 0));
                    if va < self.confirmed[ta] || vb < self.confirmed[tb] {
                        stale.push(format!(
                            "/p/{page} on {} shows {} (confirmed {}={} {}={})",
                            server.address(),
                            String::from_utf8_lossy(&body),
                            tag_name(ta),
                            self.confirmed[ta],
                            tag_name(tb),
                            self.confirmed[tb],
                        ));
                    }
                }
            }
        }
        stale
    }

    /// One phase: rounds of load with a commit + invalidation racing it, then
    /// (quiescent) a check of every readable page and an invalidation that
    /// must leave nothing of its tag behind.
    async fn phase(&mut self, name: &str, faulty: Faulty, expect_errors: bool) {
        let mut latencies = Vec::new();
        let mut hits = 0;
        let errors_before = self.err_invalidations;
        let started = Instant::now();
        for _ in 0..ROUNDS {
            let done = Arc::new(AtomicUsize::new(0));
            let halfway = Arc::new(Notify::new());
            let slot = self.rng.usize(..TAGS);
            let writer = {
                let cache = self.stack.cache().clone();
                let data = self.data.clone();
                let halfway = Arc::clone(&halfway);
                tokio::spawn(async move {
                    halfway.notified().await;
                    Run::commit_and_invalidate(&cache, &data, slot).await
                })
            };
            let seed = self.rng.u64(..);
            let result = load(
                self.stack.nginx().address(),
                self.requests_per_round,
                seed,
                done,
                halfway,
            )
            .await;
            let (slot, version, outcome) = writer.await.expect("writer task");
            self.record(slot, version, &outcome);
            self.failed_requests += result.failures.len();
            for failure in result.failures.iter().take(5) {
                eprintln!("{name}: failed request {failure}");
            }
            latencies.extend(result.latencies);
            hits += result.hits;
            // Every request has finished, so every write was started: wait for them.
            self.stack.cache().wait_for_writes().await;
            let stale = self.stale_pages(faulty);
            if outcome.is_ok() {
                for page in &stale {
                    eprintln!("{name}: left after an invalidation that returned Ok: {page}");
                }
                self.left_pages += stale.len();
            }

            // Quiescent: an invalidation that returns Ok leaves no page of its tag.
            let slot = self.rng.usize(..TAGS);
            let (slot, version, outcome) =
                Run::commit_and_invalidate(self.stack.cache(), &self.data, slot).await;
            self.record(slot, version, &outcome);
            if outcome.is_ok() {
                let mut left = 0;
                for page in (0..PAGES).filter(|p| tags_of(*p).contains(&slot)) {
                    let key = self.key(page);
                    for server in self.readable(faulty) {
                        if server.get_raw(&key).is_some() {
                            eprintln!(
                                "{name}: /p/{page} on {} survived invalidating {} (Ok)",
                                server.address(),
                                tag_name(slot)
                            );
                            left += 1;
                        }
                    }
                }
                self.left_pages += left;
            }
        }
        latencies.sort();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        let max = latencies.last().copied().unwrap_or_default();
        let errors = self.err_invalidations - errors_before;
        let stats = self.stack.cache().stats();
        let breakers: Vec<String> = stats
            .servers
            .iter()
            .map(|s| {
                format!(
                    "{}{}",
                    s.breaker_opened,
                    if s.breaker_open { " (open)" } else { "" }
                )
            })
            .collect();
        let line = format!(
            "{name:<22} {:>5} requests ({hits:>4} hits) in {:>6.2?}: p50 {p50:>9.2?} p99 {p99:>9.2?} max {max:>9.2?}; \
             invalidations Err {errors}/{}; breaker opened [A, B, index] = [{}]; \
             stores {} store errors {} bypass(unavailable) {}",
            latencies.len(),
            started.elapsed(),
            2 * ROUNDS,
            breakers.join(", "),
            stats.stores,
            stats.store_errors,
            stats
                .bypass
                .iter()
                .find(|b| b.reason == mcpage::Bypass::Unavailable)
                .map_or(0, |b| b.count),
        );
        println!("faults: {line}");
        self.latency.push((name.to_owned(), p50, p99));
        if expect_errors {
            assert!(
                errors > 0,
                "{name}: no invalidation reported the fault; would they claim success?"
            );
        }
    }

    /// Retry every invalidation that returned Err; each must now succeed.
    async fn retry_pending(&mut self, when: &str) -> usize {
        let pending: Vec<usize> = self.pending.iter().copied().collect();
        for slot in &pending {
            let version = self.data.versions[*slot].load(Ordering::SeqCst);
            let result = self
                .stack
                .cache()
                .invalidator()
                .invalidate_tags([tag_name(*slot)])
                .await;
            if let Err(error) = &result {
                panic!("{when}: retrying {} failed: {error}", tag_name(*slot));
            }
            self.record(*slot, version, &result);
        }
        pending.len()
    }

    fn page_keys(&self) -> Vec<Vec<u8>> {
        self.stack
            .memcached()
            .iter()
            .flat_map(Memcached::keys)
            .filter(|k| k.starts_with(b"/p/"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_faults_under_load_fail_open_and_never_leave_a_stale_page() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mcpage=error")
        .with_test_writer()
        .try_init();
    let mut run = Run::start().await;
    let started = Instant::now();

    run.phase("baseline", Faulty::None, false).await;
    assert!(!run.page_keys().is_empty(), "the baseline cached pages");

    // The index server dies: requests still succeed (nginx serves what is
    // cached, the app the rest, uncached); every invalidation reports Err.
    run.stack.index().stop();
    run.phase("index server down", Faulty::None, true).await;
    let before_restart: BTreeSet<Vec<u8>> = run.page_keys().into_iter().collect();
    run.stack.index().restart();
    // The pages stored before the restart lost their index records. The first
    // retried invalidation notices the new index process and purges every page
    // (Invalidator::recover_lost_index), so no orphan stays stale.
    let retried_after_index = run.retry_pending("after the index restart").await;
    let orphans_stale = run.stale_pages(Faulty::None);
    let orphans_left: Vec<Vec<u8>> = run
        .page_keys()
        .into_iter()
        .filter(|k| before_restart.contains(k))
        .collect();
    let removed = run
        .stack
        .cache()
        .invalidator()
        .purge_prefix("/")
        .await
        .expect("purge_prefix after the index restart");
    let survivors: Vec<Vec<u8>> = run
        .page_keys()
        .into_iter()
        .filter(|k| before_restart.contains(k))
        .collect();
    println!(
        "faults: index restart: {} pages were cached before it (their index records are gone); \
         after the retried invalidations (automatic recovery) {} orphans left, {} stale; \
         a manual purge_prefix(\"/\") then removed {}, orphans left {}",
        before_restart.len(),
        orphans_left.len(),
        orphans_stale.len(),
        removed.pages,
        survivors.len()
    );
    assert!(
        orphans_stale.is_empty(),
        "stale orphans after the automatic recovery"
    );
    assert!(
        !before_restart.is_empty(),
        "pages were cached when the index died"
    );
    assert!(survivors.is_empty(), "orphans survived purge_prefix(\"/\")");
    assert!(run.stale_pages(Faulty::None).is_empty());
    run.phase("index server restarted", Faulty::None, false)
        .await;

    // A page server dies: nginx and the layer skip it; invalidations that
    // cannot reach it report Err.
    run.stack.memcached()[0].stop();
    run.phase("page server killed", Faulty::Page(0), true).await;
    // It comes back empty: the failed invalidations are retried and succeed.
    run.stack.memcached()[0].restart();
    let retried_after_kill = run.retry_pending("after the restart").await;
    let stale = run.stale_pages(Faulty::None);
    assert!(stale.is_empty(), "after the retries: {stale:?}");
    run.phase("page server restarted", Faulty::None, false)
        .await;

    // Paused: connections hang until the timeouts. The other page server, so
    // that nginx has not marked it failed already (fail_timeout 10 s).
    run.stack.memcached()[1].pause();
    run.phase("page server paused", Faulty::Page(1), true).await;
    run.stack.memcached()[1].resume();
    run.stack.cache().wait_for_writes().await;
    let retried_after_pause = run.retry_pending("after SIGCONT").await;
    let stale = run.stale_pages(Faulty::None);
    assert!(stale.is_empty(), "after resume and retries: {stale:?}");
    run.phase("page server resumed", Faulty::None, false).await;

    println!(
        "faults: {} phases in {:.1?}; failed user requests {}; invalidations Ok {}, Err {} \
         (retried once the fault was over, all Ok: {} after the index restart, {} after the kill, \
         {} after the pause); pages left by an Ok invalidation {}",
        run.latency.len(),
        started.elapsed(),
        run.failed_requests,
        run.ok_invalidations,
        run.err_invalidations,
        retried_after_index,
        retried_after_kill,
        retried_after_pause,
        run.left_pages
    );
    let latency: Vec<String> = run
        .latency
        .iter()
        .map(|(name, p50, p99)| format!("{name} {p50:.1?}/{p99:.1?}"))
        .collect();
    println!("faults: latency p50/p99: {}", latency.join("; "));
    assert_eq!(run.failed_requests, 0, "user requests failed");
    assert_eq!(
        run.left_pages, 0,
        "an invalidation that returned Ok left a page"
    );
    assert!(run.err_invalidations > 0);
}
