//! Index bounds under churn: many page writes over 10,000 URLs and 100 tags
//! (each page 1-5 tags), through the layer in process, with the tag index on
//! its own memcached started with `-M` (no evictions) and `-m 64`.
//!
//! Every index item must stay within `cache.index_shard_max_bytes` (far below
//! memcached's 1 MiB item limit), the index server must never evict, and
//! invalidating every tag afterwards must remove every page.
//!
//! CI runs 100,000 writes; `scripts/stress` runs 1,000,000
//! (`MCPAGE_CHURN_WRITES`) in release mode.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::OriginalUri;
use axum::http::header;
use mcpage::{Cache, CacheTags, PageCacheLayer};
use mcpage_tests::{Memcached, Stack, env_count};
use tower::ServiceExt;

const URLS: u64 = 10_000;
const TAGS: u64 = 100;
/// Requests in flight at once.
const CONCURRENCY: usize = 64;
/// Let the background writes catch up every this many batches (real traffic
/// would pace itself; the layer's write queue holds 10,000).
const SETTLE_EVERY: usize = 16;
/// An invalidation of one tag every this many writes, so records carry
/// different clocks and the clearing path runs under churn too.
const INVALIDATE_EVERY: u64 = 10_000;
/// How often the largest index item is sampled while writing.
const SAMPLES: u64 = 10;

fn writes() -> u64 {
    env_count("MCPAGE_CHURN_WRITES", 100_000)
}

/// The tags of page `i`: 1 to 5 distinct tags out of 100, fixed per URL.
fn tags_of(i: u64) -> Vec<String> {
    let count = 1 + (i.wrapping_mul(2_654_435_761) >> 7) % 5;
    (0..count)
        .map(|k| format!("tag:{}", (i.wrapping_mul(7) + k * 13) % TAGS))
        .collect()
}

fn page_index(path: &str) -> u64 {
    path.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Largest index item (value bytes) and the total, read back from memcached.
fn index_items(index: &Memcached) -> (usize, usize, usize) {
    let mut largest = 0;
    let mut total = 0;
    let mut items = 0;
    for key in index.keys() {
        if !key.starts_with(b"mcpage:t:") {
            continue;
        }
        if let Some((_, value)) = index.get_raw(&key) {
            items += 1;
            largest = largest.max(value.len());
            total += value.len();
        }
    }
    (items, largest, total)
}

async fn largest_index_item(cache: &Cache) -> usize {
    let usage = cache.index_usage().await;
    let usage = &usage.first().expect("one index server").result;
    let largest = usage.as_ref().expect("index usage").largest;
    usize::try_from(largest).unwrap_or(usize::MAX)
}

fn stat(memcached: &Memcached, name: &str) -> u64 {
    memcached
        .stats()
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_stays_bounded_under_churn() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mcpage=warn")
        .with_test_writer()
        .try_init();
    let stack = Stack::builder()
        .index_server(&["-M", "-m", "64"])
        .config(|c| c.memcached.timeout_ms = 2_000)
        .start()
        .await;
    let (pages, index, cache) = (&stack.memcached()[0], stack.index(), stack.cache());
    let max_item = stack.config().cache.index_shard_max_bytes;

    let router = Router::new()
        .fallback(|OriginalUri(uri): OriginalUri| async move {
            (
                CacheTags::new(tags_of(page_index(uri.path()))),
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                format!("<p>page {}</p>", uri.path()),
            )
        })
        .layer(PageCacheLayer::new(cache.clone()).single_flight(false));

    let writes = writes();
    let sample_every = (writes / SAMPLES).max(1);
    let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D);
    let mut largest_seen = 0usize;
    let mut invalidations = 0u64;
    let mut done = 0u64;
    let mut batches = 0usize;
    let mut next_sample = sample_every;
    let mut next_invalidation = INVALIDATE_EVERY;
    let mut writing = Duration::ZERO;
    let started = Instant::now();
    while done < writes {
        let batch_started = Instant::now();
        let n = CONCURRENCY.min(usize::try_from(writes - done).unwrap_or(CONCURRENCY));
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let path = format!("/churn/{}", rng.u64(..URLS));
                let request = axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("request");
                router.clone().oneshot(request)
            })
            .collect();
        for response in futures_util::future::join_all(calls).await {
            let response = response.expect("infallible");
            assert_eq!(response.status(), 200);
            assert_eq!(
                response
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok()),
                Some("MISS"),
                "{:?}",
                cache.stats()
            );
        }
        done += n as u64;
        batches += 1;
        if batches % SETTLE_EVERY == 0 {
            cache.wait_for_writes().await;
        }
        writing += batch_started.elapsed();
        if done >= next_invalidation {
            next_invalidation += INVALIDATE_EVERY;
            let tag = format!("tag:{}", rng.u64(..TAGS));
            cache
                .invalidator()
                .invalidate_tags([tag])
                .await
                .expect("invalidation during churn");
            invalidations += 1;
        }
        if done >= next_sample || done == writes {
            next_sample += sample_every;
            cache.wait_for_writes().await;
            // One metadump: item sizes as memcached counts them (key and
            // header included), so at least the value sizes.
            let largest = largest_index_item(cache).await;
            largest_seen = largest_seen.max(largest);
            assert!(
                largest <= max_item,
                "after {done} writes an index item is {largest} bytes (limit {max_item})"
            );
        }
    }
    cache.wait_for_writes().await;
    let write_rate = writes as f64 / writing.as_secs_f64();

    // Exact value sizes at the end, and item sizes as memcached counts them.
    let (items, largest_value, total) = index_items(index);
    let usage = cache.index_usage().await;
    let usage = &usage.first().expect("one index server").result;
    let usage = usage.as_ref().expect("index usage");
    largest_seen = largest_seen.max(usize::try_from(usage.largest).unwrap_or(usize::MAX));
    let evictions = stat(index, "evictions");
    let stats = cache.stats();
    println!(
        "churn: {writes} writes over {URLS} URLs and {TAGS} tags (1-5 per page) in {:.1?}, \
         {write_rate:.0} writes/s; {invalidations} invalidations during churn; \
         largest index item {largest_seen} bytes over {SAMPLES} samples (limit {max_item}); \
         at the end {items} items, largest value {largest_value} bytes, {total} value bytes in all \
         ({} bytes as memcached counts them); index-server evictions {evictions}; \
         stores {}, store errors {}, retracted {}",
        started.elapsed(),
        usage.bytes,
        stats.stores,
        stats.store_errors,
        stats.retracted,
    );
    assert!(
        largest_seen <= max_item && largest_value <= max_item,
        "largest index item {largest_seen}"
    );
    assert!(largest_seen < 1024 * 1024 / 4, "far below 1 MiB");
    assert_eq!(evictions, 0, "the -M index server never evicts");
    assert_eq!(stats.store_errors, 0, "{stats:?}");

    // Invalidating every tag removes every page.
    let started = Instant::now();
    let removed = cache
        .invalidator()
        .invalidate_tags((0..TAGS).map(|t| format!("tag:{t}")))
        .await
        .expect("invalidate every tag");
    let elapsed = started.elapsed();
    let left: Vec<Vec<u8>> = pages
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(b"/churn/"))
        .collect();
    let (items_after, _, _) = index_items(index);
    println!(
        "churn: invalidating all {TAGS} tags removed {} pages in {elapsed:.1?}; \
         pages left: {}, index items left: {items_after}",
        removed.pages,
        left.len()
    );
    assert!(removed.pages > 0);
    assert!(
        left.is_empty(),
        "{} pages survived, e.g. {:?}",
        left.len(),
        left.first()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    );
    assert_eq!(items_after, 0, "the index was cleared");
    assert_eq!(stat(index, "evictions"), 0);
}
