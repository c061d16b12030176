//! Read-your-writes, judged during the run: through real nginx, two app
//! processes (two layer-wrapped apps, each with its own `Cache`, behind two
//! nginx) on one memcached pool. The "database" is a version number; a page
//! shows the version it was rendered from, and a render takes 0-30 ms. A
//! writer commits a new version, then invalidates the tag (~35 times a
//! second, each invalidation on its own task, alternating between the two
//! apps' invalidators) and records the version once the invalidation has
//! returned. 16 readers fetch pages through either nginx; an answer to a
//! request that started after an invalidation returned must show at least
//! that version. CI runs 3 s; `scripts/stress` runs longer
//! (`MCPAGE_RW_SECONDS`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use mcpage::{CacheTags, PageCacheLayer, ServerSpec};
use mcpage_tests::{Memcached, Stack, env_count, get};

const READERS: usize = 16;
const PAGES: u64 = 8;
/// Commits (and invalidations) per second.
const WRITES_PER_SECOND: u64 = 35;

struct Database {
    version: AtomicU64,
    /// Seeds the render delays.
    renders: AtomicU64,
}

/// Read the data first, then take 0-30 ms to render it.
async fn render(
    State(db): State<Arc<Database>>,
) -> (CacheTags, [(header::HeaderName, &'static str); 1], String) {
    let version = db.version.load(Ordering::SeqCst);
    let n = db.renders.fetch_add(1, Ordering::Relaxed);
    let delay = fastrand::Rng::with_seed(n).u64(0..31);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    (
        CacheTags::new(["data"]),
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("v{version}"),
    )
}

/// One app process: its own cache (connections, single-flight), its own
/// nginx, on the shared memcached pool.
async fn node(memcached: &[Memcached], db: &Arc<Database>) -> Stack {
    let servers: Vec<ServerSpec> = memcached
        .iter()
        .map(|m| ServerSpec::new(m.address()))
        .collect();
    let db = Arc::clone(db);
    Stack::builder()
        .page_servers(0)
        .config(move |config| {
            config.memcached.servers = servers;
            // Patient on a loaded machine: a slow answer costs a cached page, never correctness.
            config.memcached.timeout_ms = 1_000;
        })
        .app(move |cache| {
            Router::new()
                .fallback(render)
                .with_state(db)
                .layer(PageCacheLayer::new(cache.clone()))
        })
        .start()
        .await
}

#[derive(Default)]
struct Counts {
    answers: AtomicU64,
    hits: AtomicU64,
    /// Answers older than an invalidation that returned before the request started.
    older: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_answer_is_older_than_a_returned_invalidation() {
    read_your_writes([Memcached::start(), Memcached::start()]).await;
}

/// The same over unix sockets: nginx and both apps reach the two memcached
/// over their sockets (the apps through mcpage's own unix transport).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_answer_is_older_than_a_returned_invalidation_over_unix_sockets() {
    read_your_writes([Memcached::start_unix(&[]), Memcached::start_unix(&[])]).await;
}

async fn read_your_writes(memcached: [Memcached; 2]) {
    let seconds = env_count("MCPAGE_RW_SECONDS", 3);
    let db = Arc::new(Database {
        version: AtomicU64::new(0),
        renders: AtomicU64::new(0),
    });
    let nodes = Arc::new([node(&memcached, &db).await, node(&memcached, &db).await]);
    // The highest version whose invalidation has returned.
    let confirmed = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);

    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..READERS {
        let (nodes, confirmed, counts) = (
            Arc::clone(&nodes),
            Arc::clone(&confirmed),
            Arc::clone(&counts),
        );
        readers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D ^ (reader as u64 + 1));
            while Instant::now() < deadline {
                let node = &nodes[usize::from(rng.bool())];
                let path = format!("/p/{}", rng.u64(0..PAGES));
                // Read before the request starts: every invalidation counted
                // here had returned by then.
                let floor = confirmed.load(Ordering::SeqCst);
                let response = get(&node.nginx().url(&path), &[]).await;
                assert_eq!(response.status, 200, "{}", response.text());
                let seen: u64 = response
                    .text()
                    .strip_prefix('v')
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("not a version: {}", response.text()));
                counts.answers.fetch_add(1, Ordering::Relaxed);
                if response.header("x-cache") == Some("HIT") {
                    counts.hits.fetch_add(1, Ordering::Relaxed);
                }
                if seen < floor {
                    counts.older.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "{path}: answered v{seen} ({:?}) after the invalidation of v{floor} returned",
                        response.header("x-cache")
                    );
                }
            }
        });
    }

    let mut invalidations = tokio::task::JoinSet::new();
    let mut latencies = Vec::new();
    let interval = Duration::from_millis(1_000 / WRITES_PER_SECOND);
    let mut next = Instant::now();
    let mut writes = 0u64;
    while Instant::now() < deadline {
        let version = db.version.fetch_add(1, Ordering::SeqCst) + 1;
        let invalidator = nodes[usize::try_from(writes % 2).unwrap_or(0)]
            .cache()
            .invalidator();
        let confirmed = Arc::clone(&confirmed);
        invalidations.spawn(async move {
            let started = Instant::now();
            invalidator
                .invalidate_tags(["data"])
                .await
                .expect("invalidation confirmed");
            confirmed.fetch_max(version, Ordering::SeqCst);
            started.elapsed()
        });
        writes += 1;
        while let Some(done) = invalidations.try_join_next() {
            latencies.push(done.expect("invalidation task"));
        }
        // Pacing the writer, not synchronizing anything.
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    while let Some(done) = invalidations.join_next().await {
        latencies.push(done.expect("invalidation task"));
    }
    while let Some(done) = readers.join_next().await {
        done.expect("reader task");
    }

    latencies.sort();
    let percentile = |p: usize| latencies[(latencies.len() - 1) * p / 100];
    let stats: Vec<_> = nodes.iter().map(|n| n.cache().stats()).collect();
    let answers = counts.answers.load(Ordering::Relaxed);
    let hits = counts.hits.load(Ordering::Relaxed);
    let older = counts.older.load(Ordering::Relaxed);
    println!(
        "read-your-writes: {seconds} s, 2 nginx + 2 app processes on 2 memcached, {READERS} readers, \
         {writes} commits+invalidations ({WRITES_PER_SECOND}/s; latency p50 {:?}, p99 {:?}, max {:?}), \
         {answers} answers ({hits} nginx hits), {} stores, {} renders not kept (invalidated meanwhile), \
         {} stores late; answers older than a returned invalidation: {older}",
        percentile(50),
        percentile(99),
        percentile(100),
        stats.iter().map(|s| s.stores).sum::<u64>(),
        stats.iter().map(|s| s.retracted).sum::<u64>(),
        stats.iter().map(|s| s.late).sum::<u64>(),
    );
    assert_eq!(older, 0, "answers older than a returned invalidation");
    assert!(
        hits > 0 && writes > 10,
        "nginx must have served hits between invalidations for the test to mean anything"
    );
}
