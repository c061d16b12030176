//! `invalidate_tags` deletes in the meta protocol's quiet mode (`md <key> q`,
//! one `mn` per server): on real memcached servers, every page goes, the count
//! is exact (pages already gone are not counted), keys the client would send
//! base64-encoded still go, and a server that does not answer makes the
//! invalidation an error that keeps the index, so that the next one finishes.

use mcpage::{Cache, Config, Error, ServerSpec};
use mcpage_tests::Memcached;

const TAG: &str = "purge";

fn page_keys(servers: &[&Memcached]) -> Vec<Vec<u8>> {
    servers
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| k.starts_with(b"/p/"))
        .collect()
}

/// Two page servers and an index server (`-M`), `count` pages stored under
/// [`TAG`] as `/p/<n>`.
async fn stored(count: usize, timeout_ms: u64) -> ([Memcached; 2], Memcached, Cache) {
    let pages = [Memcached::start(), Memcached::start()];
    let index = Memcached::start_with(&["-M"]);
    let mut config = Config::default();
    config.memcached.servers = pages.iter().map(|m| ServerSpec::new(m.address())).collect();
    config.memcached.index_servers = vec![ServerSpec::new(index.address())];
    config.memcached.timeout_ms = timeout_ms;
    let cache = Cache::connect(&config).await.expect("cache");
    for i in 0..count {
        cache
            .store_page(&format!("/p/{i}"), format!("page {i}"), [TAG])
            .await
            .expect("store");
    }
    (pages, index, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_purge_removes_every_page_on_every_server_and_counts_exactly() {
    const COUNT: usize = 3000;
    let (pages, _index, cache) = stored(COUNT, 1000).await;
    // A key with 0x7F: the meta client sends it base64-encoded, so it goes
    // through the ordinary pipelined delete beside the quiet batches.
    cache
        .store_page("/p/x%7F", "odd key", [TAG])
        .await
        .expect("store");
    let both = [&pages[0], &pages[1]];
    assert_eq!(page_keys(&both).len(), COUNT + 1);
    assert!(
        pages.iter().all(|m| m.keys().len() > COUNT / 4),
        "the pages are spread over both servers"
    );
    // Ten pages are already gone (evicted, expired): memcached answers `NF`
    // for them even in quiet mode; they are not counted as removed.
    for i in 0..10 {
        let key = format!("/p/{i}");
        assert!(pages.iter().any(|m| m.delete_raw(key.as_bytes())));
    }

    let removed = cache
        .invalidator()
        .invalidate_tags([TAG])
        .await
        .expect("invalidate");
    assert_eq!(removed.pages, COUNT + 1 - 10, "{removed:?}");
    assert_eq!(removed.count_for(TAG), COUNT + 1 - 10);
    assert!(page_keys(&both).is_empty(), "no page left");

    // The index was cleared: nothing is listed any more.
    let again = cache
        .invalidator()
        .invalidate_tags([TAG])
        .await
        .expect("invalidate");
    assert_eq!(again.pages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_confirm_makes_the_purge_an_error_and_the_next_one_finishes() {
    const COUNT: usize = 400;
    let (pages, _index, cache) = stored(COUNT, 200).await;
    // A first invalidation stores the index server's boot marker on one page
    // server; pause the other one, so that the invalidation gets as far as
    // the deletes.
    cache
        .invalidator()
        .invalidate_tags(["unrelated"])
        .await
        .expect("invalidate");
    let marker = pages
        .iter()
        .position(|m| m.keys().iter().any(|k| k.starts_with(b"mcpage:boot:")))
        .expect("the boot marker is on a page server");
    let (kept, paused) = (&pages[marker], &pages[1 - marker]);
    let on_paused = page_keys(&[paused]).len();
    assert!(on_paused > 0 && on_paused < COUNT);

    paused.pause();
    let result = cache.invalidator().invalidate_tags([TAG]).await;
    paused.resume();
    match result {
        Err(Error::Pending { items, .. }) => assert_eq!(items, 1, "the tag is pending"),
        other => panic!("a paused server must leave the purge pending: {other:?}"),
    }
    // The other server's pages are gone; the paused one's are deleted by the
    // invalidator's own retry once it resumes (their index records were kept).
    assert!(page_keys(&[kept]).is_empty());
    mcpage_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the pending purge is retried and confirmed",
        || async { page_keys(&[&pages[0], &pages[1]]).is_empty() },
    )
    .await;
}
