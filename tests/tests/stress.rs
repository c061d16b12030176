//! Stale-page race under load: renders of versioned pages race with commits and
//! invalidations; after each round settles, every page left in memcached must
//! show the current version. CI runs 250 rounds; `scripts/stress` runs more
//! (`MCPAGE_STRESS_ROUNDS`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{OriginalUri, State};
use axum::http::header;
use mcpage::{CacheTags, PageCacheLayer};
use mcpage_tests::{Stack, env_count};
use tower::ServiceExt;

const PAGES: usize = 16;
const RENDERS_PER_ROUND: usize = 8;

fn rounds() -> usize {
    usize::try_from(env_count("MCPAGE_STRESS_ROUNDS", 250)).unwrap_or(usize::MAX)
}

async fn yield_times(n: u64) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// A cache on one fresh memcached, patient enough for a loaded machine.
async fn cache_on_one_memcached() -> Stack {
    Stack::builder()
        .config(|c| {
            c.memcached.timeout_ms = 2_000;
            // Every invalidation waits twice the write window: keep the rounds short.
            c.invalidation.write_window_ms = 5;
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_page_survives_concurrent_invalidation() {
    let stack = cache_on_one_memcached().await;
    let (memcached, cache) = (&stack.memcached()[0], stack.cache());

    // The "database": one version number every page shows.
    let version = Arc::new(AtomicU64::new(0));
    let router = Router::new()
        .fallback(
            |State(version): State<Arc<AtomicU64>>, OriginalUri(uri): OriginalUri| async move {
                // Read the data, then take a while to render (yields, not sleeps).
                let seen = version.load(Ordering::SeqCst);
                let spin = u64::from(uri.path().len() as u32 % 7);
                yield_times(spin).await;
                (
                    CacheTags::new(["data"]),
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    format!("v{seen}"),
                )
            },
        )
        .with_state(Arc::clone(&version))
        // Every render must race on its own; single-flight would only hide races.
        .layer(PageCacheLayer::new(cache.clone()).single_flight(false));

    let mut rng = fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15);
    let rounds = rounds();
    let mut stale = 0usize;
    let mut stored_checked = 0usize;
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..RENDERS_PER_ROUND {
            let path = format!("/p/{}", rng.u64(..PAGES as u64));
            let delay = rng.u64(..8);
            // Some renders start after the invalidation has read the index
            // (it waits 2W = 10 ms first): their pages stay, to be checked.
            let late_start = std::time::Duration::from_millis(rng.u64(..3) * 8);
            let router = router.clone();
            tasks.spawn(async move {
                tokio::time::sleep(late_start).await;
                yield_times(delay).await;
                let request = axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("request");
                router.oneshot(request).await.expect("infallible").status()
            });
        }
        // The writer: commit, then invalidate, racing the renders.
        let writer_delay = rng.u64(..8);
        let writer = {
            let version = Arc::clone(&version);
            let cache = cache.clone();
            tokio::spawn(async move {
                yield_times(writer_delay).await;
                version.fetch_add(1, Ordering::SeqCst);
                cache.invalidator().invalidate_tags(["data"]).await
            })
        };
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.expect("render task"), 200);
        }
        writer
            .await
            .expect("writer task")
            .expect("invalidation confirmed");
        cache.wait_for_writes().await;
        let current = format!("v{}", version.load(Ordering::SeqCst));
        for page in 0..PAGES {
            if let Some((_, body)) = memcached.get_raw(format!("/p/{page}").as_bytes()) {
                stored_checked += 1;
                if body != current.as_bytes() {
                    stale += 1;
                    eprintln!(
                        "round {round}: /p/{page} shows {} but the data is {current}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
        }
    }
    let stats = cache.stats();
    println!(
        "stale race: {rounds} rounds, {} renders, {} invalidations, {stored_checked} stored pages checked, \
         {} not kept after an overlapping invalidation, {} late, stale pages found: {stale} ({:?})",
        rounds * RENDERS_PER_ROUND,
        stats.invalidations,
        stats.retracted,
        stats.late,
        started.elapsed()
    );
    assert_eq!(stats.store_errors, 0);
    assert_eq!(stale, 0, "stale pages survived an invalidation");
    assert!(
        stored_checked > 0,
        "some pages must have been stored for the check to mean anything"
    );
    assert!(
        stats.retracted > 0,
        "the rounds never produced an overlap; the test would prove nothing"
    );
}

/// With single-flight on, concurrent requests share renders, including renders
/// that are still being stored: a request that starts after an invalidation
/// returned must never be answered with a page rendered from older data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_request_after_an_invalidation_gets_an_older_shared_render() {
    const SHARED_PAGES: u64 = 4;
    const REQUESTS_PER_ROUND: usize = 16;
    let stack = cache_on_one_memcached().await;
    let cache = stack.cache();

    let version = Arc::new(AtomicU64::new(0));
    let router = Router::new()
        .fallback(|State(version): State<Arc<AtomicU64>>| async move {
            let seen = version.load(Ordering::SeqCst);
            yield_times(4).await;
            (
                CacheTags::new(["data"]),
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                format!("{seen}"),
            )
        })
        .with_state(Arc::clone(&version))
        .layer(PageCacheLayer::new(cache.clone()));
    // The version every request starting now must at least see: published
    // once its invalidation has returned.
    let confirmed = Arc::new(AtomicU64::new(0));

    let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D);
    let rounds = rounds();
    let mut older = 0usize;
    for round in 0..rounds {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..REQUESTS_PER_ROUND {
            let path = format!("/s/{}", rng.u64(..SHARED_PAGES));
            let delay = rng.u64(..24);
            let router = router.clone();
            let confirmed = Arc::clone(&confirmed);
            tasks.spawn(async move {
                yield_times(delay).await;
                let floor = confirmed.load(Ordering::SeqCst);
                let request = axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("request");
                let response = router.oneshot(request).await.expect("infallible");
                let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .expect("body");
                let seen: u64 = std::str::from_utf8(&body)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .expect("a version");
                (floor, seen)
            });
        }
        let writer_delay = rng.u64(..16);
        let writer = {
            let version = Arc::clone(&version);
            let confirmed = Arc::clone(&confirmed);
            let cache = cache.clone();
            tokio::spawn(async move {
                yield_times(writer_delay).await;
                let committed = version.fetch_add(1, Ordering::SeqCst) + 1;
                let result = cache.invalidator().invalidate_tags(["data"]).await;
                if result.is_ok() {
                    confirmed.fetch_max(committed, Ordering::SeqCst);
                }
                result
            })
        };
        while let Some(answer) = tasks.join_next().await {
            let (floor, seen) = answer.expect("request task");
            if seen < floor {
                older += 1;
                eprintln!("round {round}: a request that started at version {floor} got {seen}");
            }
        }
        writer
            .await
            .expect("writer task")
            .expect("invalidation confirmed");
    }
    cache.wait_for_writes().await;
    let stats = cache.stats();
    println!(
        "shared renders: {rounds} rounds of {REQUESTS_PER_ROUND} requests on {SHARED_PAGES} pages, \
         {} answered from another request's render, {} renders retracted; \
         answers older than a returned invalidation: {older}",
        stats.shared, stats.retracted
    );
    assert_eq!(
        older, 0,
        "a request got a render older than an invalidation it followed"
    );
    assert!(
        stats.shared > 0,
        "no request ever shared a render; the test would prove nothing"
    );
}
