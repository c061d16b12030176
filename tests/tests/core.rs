//! The core contract end to end: real memcached instances, real nginx with the
//! rendered config, an axum app behind the layer. nginx is the oracle: a key or
//! server choice is right when nginx serves what the layer stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{OriginalUri, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use mcpage::{Cache, CacheTags, Config, PageCacheLayer};
use mcpage_tests::{Memcached, Stack, get};
use tokio::sync::Notify;

/// What the app renders, and how often it was asked.
#[derive(Clone, Default)]
struct Site {
    renders: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    /// `/race/*` handlers signal `started` and wait for `release`.
    started: Arc<Notify>,
    release: Arc<Notify>,
}

impl Site {
    fn renders_of(&self, target: &str) -> usize {
        self.renders
            .lock()
            .expect("lock")
            .get(target)
            .copied()
            .unwrap_or(0)
    }
}

async fn page(State(site): State<Site>, OriginalUri(uri): OriginalUri) -> Response {
    let target = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    site.total.fetch_add(1, Ordering::SeqCst);
    *site
        .renders
        .lock()
        .expect("lock")
        .entry(target.clone())
        .or_default() += 1;
    let path = uri.path();
    let html = [(header::CONTENT_TYPE, "text/html; charset=utf-8")];
    let body = format!("<p>page for {target}</p>");
    let segment = |i: usize| path.split('/').nth(i).unwrap_or_default().to_owned();
    match segment(1).as_str() {
        "tagged" => (
            CacheTags::new([segment(2), format!("page:{}", segment(3))]),
            html,
            body,
        )
            .into_response(),
        "header-tags" => (
            html,
            [("x-cache-tags", format!("{}, extra", segment(2)))],
            body,
        )
            .into_response(),
        "set-cookie" => (html, [(header::SET_COOKIE, "csrftoken=abc")], body).into_response(),
        "private" => (html, [(header::CACHE_CONTROL, "private")], body).into_response(),
        "no-store" => (html, [(header::CACHE_CONTROL, "no-store")], body).into_response(),
        "missing" => (StatusCode::NOT_FOUND, html, body).into_response(),
        "json" => ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
        "big" => {
            // /big/<bytes>/<compressible|random>
            let size: usize = segment(2).parse().unwrap_or(0);
            let body: Vec<u8> = if segment(3) == "random" {
                mcpage_tests::random_text(size, 2_463_534_242)
            } else {
                vec![b'x'; size]
            };
            (html, body).into_response()
        }
        "race" => {
            // Which render of this target (from 1): tells a shared response from a fresh one.
            let nth = site.renders_of(&target);
            site.started.notify_one();
            site.release.notified().await;
            let body = format!("<p>page for {target}, render {nth}</p>");
            (CacheTags::new(["race"]), html, body).into_response()
        }
        _ => (html, body).into_response(),
    }
}

/// The site behind the layer on `servers` memcached, nginx in front.
async fn start(servers: usize, tweak: impl FnOnce(&mut Config)) -> (Stack, Site) {
    start_on(Transport::Tcp, servers, tweak).await
}

/// How nginx and the cache reach memcached.
#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    /// Every memcached on a unix socket (`unix:/path` servers), index included.
    Unix,
}

async fn start_on(
    transport: Transport,
    servers: usize,
    tweak: impl FnOnce(&mut Config),
) -> (Stack, Site) {
    let site = Site::default();
    let mut builder = Stack::builder().page_servers(servers);
    if let Transport::Unix = transport {
        builder = builder.unix_sockets().index_server(&[]);
    }
    let stack = builder
        .config(|c| {
            c.cache.exclude = vec!["^/excluded".to_owned()];
            c.memcached.timeout_ms = 500;
            // Tests count stores: on a loaded machine a store answered after the
            // default window would not be kept (a miss, counted as late).
            c.invalidation.write_window_ms = 250;
        })
        .config(tweak)
        .app(|cache| site_router(&site, cache))
        .start()
        .await;
    (stack, site)
}

fn x_cache(response: &mcpage_tests::Response) -> &str {
    response
        .headers
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_is_rendered_stored_then_served_by_nginx_alone() {
    let (stack, site) = start(1, |_| {}).await;
    let first = stack.fetch("/articles/1", &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(x_cache(&first), "MISS");
    stack.cache().wait_for_writes().await;
    assert!(stack.stored("/articles/1"));

    let second = stack.fetch("/articles/1", &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(x_cache(&second), "HIT");
    assert_eq!(second.body, first.body);
    assert_eq!(
        second
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        site.renders_of("/articles/1"),
        1,
        "the app never saw the hit"
    );
}

/// Targets whose keys exercise normalization, escaping and the hash input.
fn tricky_targets() -> Vec<String> {
    let mut targets: Vec<String> = [
        "/a//b",
        "/caf%C3%A9",
        "/x%20y",
        "/100%25",
        "/a/./b2",
        "/a/%2e%2e/c",
        "/",
        "/about",
        "/articles/1",
        "/articles/2",
        "/p+q",
        "/.hidden",
        "/a/...",
        "/q%3Fx",
        "/h%23x",
        "/x%0Ay",
        "/x%7F",
        "/tab%09tab",
        "/%E2%82%AC/euro",
        "/UPPER/Case",
        "/trailing/",
        "/a%2Fb/enc-slash",
        "/w/173",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..520 {
        let flavour = match i % 6 {
            0 => format!("/p/{i}"),
            1 => format!("/p//{i}//x"),
            2 => format!("/p/%{:02X}{i}", 0x21 + (i % 90)),
            3 => format!("/p/caf%C3%A9/{i}"),
            4 => format!("/p/sp%20ace/{i}/./y"),
            _ => format!("/p/deep/{i}/z/../w"),
        };
        targets.push(flavour);
    }
    targets
}

async fn every_stored_page_is_a_hit(transport: Transport, hashing: mcpage::ring::Hashing) {
    let (stack, site) = start_on(transport, 3, |c| c.memcached.hashing = hashing).await;
    if let Transport::Unix = transport {
        assert_eq!(
            stack.nginx().config_text().matches("server unix:").count(),
            3,
            "nginx reads the pages over the sockets"
        );
    }
    // Keep one target per key, so each body names the target that stored it.
    let mut seen = std::collections::HashSet::new();
    let targets: Vec<String> = tricky_targets()
        .into_iter()
        .filter(|t| {
            seen.insert(
                stack
                    .cache()
                    .page_key(None, t.as_bytes())
                    .expect("cacheable")
                    .escaped,
            )
        })
        .collect();
    assert!(targets.len() >= 500, "{} distinct keys", targets.len());
    let mut canonical = 0;
    for target in &targets {
        let response = stack.fetch(target, &[]).await;
        assert_eq!(response.status, 200, "{target}");
        let key = stack
            .cache()
            .page_key(None, target.as_bytes())
            .expect("cacheable");
        if mcpage::key::is_canonical_path(target.as_bytes(), &key.uri) {
            assert_eq!(x_cache(&response), "MISS", "{target}");
            canonical += 1;
        } else {
            // The app's answer to another spelling of the path is never
            // stored; store the page for the key itself, so that nginx's
            // normalization of this spelling is still checked below.
            assert_eq!(x_cache(&response), "BYPASS", "{target}");
            stack
                .cache()
                .store_page(
                    target,
                    format!("<p>page for {target}</p>"),
                    Vec::<String>::new(),
                )
                .await
                .expect("stored");
        }
    }
    stack.cache().wait_for_writes().await;
    assert_eq!(stack.cache().stats().stores as usize, canonical);
    assert!(canonical >= 200 && canonical < targets.len(), "{canonical}");
    for target in &targets {
        let response = stack.fetch(target, &[]).await;
        assert_eq!(
            x_cache(&response),
            "HIT",
            "{target} was stored but nginx missed it"
        );
        assert_eq!(
            response.body,
            format!("<p>page for {target}</p>").as_bytes(),
            "{target}"
        );
    }
    for m in stack.memcached() {
        let items: usize = m
            .stats()
            .get("curr_items")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            items > 50,
            "every server holds pages ({items} on {})",
            m.address()
        );
    }
    assert_eq!(
        site.total.load(Ordering::SeqCst),
        targets.len(),
        "hits never reached the app"
    );

    // Keys over 250 bytes are never stored, and the user still gets the page.
    let exactly_250 = format!("/{}", "k".repeat(249));
    let too_long = format!("/{}", "k".repeat(250));
    let escaped_too_long = format!("/{}", "%20".repeat(90)); // 181 bytes of V, 271 of K
    let base64_too_long = format!("/{}%7F", "d".repeat(190)); // 193 bytes of K, 260 on the wire
    for target in [&too_long, &escaped_too_long, &base64_too_long] {
        for _ in 0..2 {
            let response = stack.fetch(target, &[]).await;
            assert_eq!(response.status, 200, "{target}: never a 502");
            assert_eq!(x_cache(&response), "BYPASS");
        }
    }
    stack.fetch(&exactly_250, &[]).await;
    stack.cache().wait_for_writes().await;
    assert!(stack.stored(&exactly_250), "{:?}", stack.cache().stats());
    assert_eq!(
        x_cache(&stack.fetch(&exactly_250, &[]).await),
        "HIT",
        "{}",
        stack.nginx().error_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_ring_matches_nginx_for_500_urls() {
    every_stored_page_is_a_hit(Transport::Tcp, mcpage::ring::Hashing::Consistent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modulo_hash_matches_nginx_for_500_urls() {
    every_stored_page_is_a_hit(Transport::Tcp, mcpage::ring::Hashing::Modulo).await;
}

/// nginx hashes a `unix:/path` server by its path alone
/// (`ngx_http_upstream_init_chash`): the ring over three sockets must pick
/// what nginx picks, and the cache's own client must speak over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_ring_over_unix_sockets_matches_nginx_for_500_urls() {
    every_stored_page_is_a_hit(Transport::Unix, mcpage::ring::Hashing::Consistent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modulo_hash_over_unix_sockets_matches_nginx_for_500_urls() {
    every_stored_page_is_a_hit(Transport::Unix, mcpage::ring::Hashing::Modulo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_tag_removes_exactly_its_pages_on_all_servers() {
    tag_invalidation_on_all_servers(Transport::Tcp).await;
}

/// The quiet deletes, the index and the clocks over unix sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_tag_over_unix_sockets_removes_exactly_its_pages() {
    tag_invalidation_on_all_servers(Transport::Unix).await;
}

async fn tag_invalidation_on_all_servers(transport: Transport) {
    let (stack, site) = start_on(transport, 3, |_| {}).await;
    for i in 0..60 {
        stack.fetch(&format!("/tagged/comments/{i}"), &[]).await;
        stack.fetch(&format!("/tagged/other/{i}"), &[]).await;
    }
    stack.fetch("/header-tags/comments/h", &[]).await;
    stack.cache().wait_for_writes().await;
    assert_eq!(
        x_cache(&stack.fetch("/tagged/comments/0", &[]).await),
        "HIT"
    );
    assert_eq!(
        x_cache(&stack.fetch("/header-tags/comments/h", &[]).await),
        "HIT"
    );
    let header_tags = stack.fetch("/header-tags/x/y", &[]).await;
    assert!(
        header_tags.headers.get("x-cache-tags").is_none(),
        "X-Cache-Tags never reaches the client"
    );

    let removed = stack
        .cache()
        .invalidator()
        .invalidate_tags(["comments"])
        .await
        .expect("invalidate");
    assert_eq!(removed.pages, 61);
    assert_eq!(removed.count_for("comments"), 61);
    for i in 0..60 {
        assert!(
            !stack.stored(&format!("/tagged/comments/{i}")),
            "comments page {i} survived"
        );
        assert_eq!(
            x_cache(&stack.fetch(&format!("/tagged/other/{i}"), &[]).await),
            "HIT"
        );
    }
    assert_ne!(
        x_cache(&stack.fetch("/tagged/comments/7", &[]).await),
        "HIT"
    );
    assert_eq!(site.renders_of("/tagged/comments/7"), 2);
    // The index was cleared: invalidating again removes only what was re-rendered.
    stack.cache().wait_for_writes().await;
    let again = stack
        .cache()
        .invalidator()
        .invalidate_tags(["comments"])
        .await
        .expect("invalidate");
    assert_eq!(again.pages, 1);
    // URLs as a user writes them map through the key contract.
    let removed = stack
        .cache()
        .invalidator()
        .invalidate_urls(["/tagged//other/./3"])
        .await
        .expect("urls");
    assert_eq!(removed.pages, 1);
    assert!(!stack.stored("/tagged/other/3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_anonymous_cacheable_responses_are_stored() {
    let (stack, _) = start(2, |_| {}).await;
    // A page in the cache must not be served to logged-in users.
    stack.fetch("/shared", &[]).await;
    stack.cache().wait_for_writes().await;
    assert_eq!(x_cache(&stack.fetch("/shared", &[]).await), "HIT");
    for headers in [
        &[("cookie", "sessionid=s3cr3t")][..],
        &[("cookie", "theme=dark; sessionid=s3cr3t")][..],
        &[("authorization", "Basic dTpw")][..],
    ] {
        let response = stack.fetch("/shared", headers).await;
        assert_eq!(
            x_cache(&response),
            "BYPASS",
            "{headers:?} got a cached page"
        );
    }
    // An analytics cookie alone does not prevent caching, nor does a look-alike name.
    stack
        .fetch("/analytics", &[("cookie", "_ga=GA1.2.3; xsessionid=1")])
        .await;
    stack.cache().wait_for_writes().await;
    assert!(stack.stored("/analytics"));

    let never: [(&str, &[(&str, &str)]); 9] = [
        ("/private-page", &[("cookie", "sessionid=s3cr3t")]),
        ("/auth-page", &[("authorization", "Bearer t")]),
        ("/set-cookie/x", &[]),
        ("/private/x", &[]),
        ("/no-store/x", &[]),
        ("/missing/x", &[]),
        ("/json/x", &[]),
        ("/excluded/x", &[]),
        ("/query", &[]),
    ];
    for (target, headers) in never {
        let target = if target == "/query" {
            "/query?page=2"
        } else {
            target
        };
        for _ in 0..2 {
            let response = stack.fetch(target, headers).await;
            assert_ne!(x_cache(&response), "HIT", "{target}");
        }
    }
    stack.cache().wait_for_writes().await;
    for (target, _) in never {
        assert!(!stack.stored(target), "{target} was stored");
    }
    assert_eq!(stack.cache().stats().stores, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_render_that_overlaps_an_invalidation_is_not_kept() {
    let (stack, site) = start(2, |_| {}).await;
    for (round, invalidate) in [(0, true), (1, false)] {
        let target = format!("/race/{round}");
        let url = stack.nginx().url(&target);
        let started = site.started.notified();
        let request = tokio::spawn(async move { get(&url, &[]).await });
        // The handler is running: the clock was read before it started.
        started.await;
        if invalidate {
            let removed = stack
                .cache()
                .invalidator()
                .invalidate_tags(["race"])
                .await
                .expect("invalidate");
            assert_eq!(removed.pages, 0, "nothing was registered yet");
        }
        site.release.notify_one();
        let response = request.await.expect("request task");
        assert_eq!(response.status, 200);
        stack.cache().wait_for_writes().await;
        assert_eq!(stack.stored(&target), !invalidate, "{target}");
    }
    assert_eq!(stack.cache().stats().retracted, 1);
    assert_eq!(stack.cache().stats().stores, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_down_fails_open_and_invalidation_reports_it() {
    let (stack, _) = start(2, |c| c.memcached.timeout_ms = 200).await;
    stack.fetch("/before", &[]).await;
    stack.cache().wait_for_writes().await;
    for m in stack.memcached() {
        m.stop();
    }
    for i in 0..20 {
        let response = stack.fetch(&format!("/down/{i}"), &[]).await;
        assert_eq!(
            response.status, 200,
            "request {i} failed while memcached was down"
        );
        assert_eq!(
            response.body,
            format!("<p>page for /down/{i}</p>").as_bytes()
        );
    }
    let response = stack.fetch("/before", &[]).await;
    assert_eq!(response.status, 200);
    assert_ne!(x_cache(&response), "HIT");
    let error = stack
        .cache()
        .invalidator()
        .invalidate_tags(["comments"])
        .await
        .expect_err("must not claim success");
    assert!(error.to_string().contains("memcached"), "{error}");
    assert!(
        stack
            .cache()
            .invalidator()
            .invalidate_urls(["/before"])
            .await
            .is_err()
    );
    assert!(
        stack.cache().stats().servers.iter().any(|s| s.breaker_open),
        "the breaker opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_pages_are_served_compressed_by_nginx() {
    let (stack, _) = start(1, |c| c.cache.gzip = true).await;
    let page = stack.fetch("/zipped", &[]).await;
    stack.cache().wait_for_writes().await;
    let hit = stack.fetch("/zipped", &[("accept-encoding", "gzip")]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(
        hit.headers
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&hit.body[..]), &mut plain)
        .expect("gunzip");
    assert_eq!(plain, page.body);
    // A client without gzip gets it decompressed by nginx (gunzip on).
    let identity = stack.fetch("/zipped", &[]).await;
    assert_eq!(x_cache(&identity), "HIT");
    assert!(identity.headers.get("content-encoding").is_none());
    assert_eq!(identity.body, page.body);
}

/// Drive the layer in-process (no HTTP) for the volume tests.
async fn render_through_layer(
    cache: &Cache,
    targets: impl Iterator<Item = String>,
    concurrency: usize,
) {
    use tower::ServiceExt;
    let router = Router::new()
        .fallback(|OriginalUri(uri): OriginalUri| async move {
            (
                CacheTags::new(["big"]),
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                format!("page {uri}"),
            )
        })
        .layer(PageCacheLayer::new(cache.clone()).single_flight(false));
    let targets: Vec<String> = targets.collect();
    for (n, chunk) in targets.chunks(concurrency).enumerate() {
        if n % 32 == 31 {
            // Let the background writes keep up, as real traffic would.
            cache.wait_for_writes().await;
        }
        let mut calls = Vec::with_capacity(chunk.len());
        for target in chunk {
            let request = axum::http::Request::get(target.as_str())
                .body(axum::body::Body::empty())
                .expect("request");
            calls.push(router.clone().oneshot(request));
        }
        for response in futures_util::future::join_all(calls).await {
            let response = response.expect("infallible");
            if response
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                != Some("MISS")
            {
                panic!("{:?}", cache.stats());
            }
            assert_eq!(
                response
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok()),
                Some("MISS")
            );
        }
    }
    cache.wait_for_writes().await;
}

fn index_item_sizes(memcached: &Memcached) -> Vec<(Vec<u8>, usize)> {
    memcached
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(b"mcpage:t:"))
        .map(|k| {
            let size = memcached.get_raw(&k).map_or(0, |(_, v)| v.len());
            (k, size)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_stays_bounded() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mcpage=warn")
        .with_test_writer()
        .try_init();
    let stack = Stack::builder()
        .memcached_args(&["-m", "256"])
        .config(|c| {
            c.memcached.timeout_ms = 1000;
            // 64 writes at once on a loaded machine: a store answered late would not be kept.
            c.invalidation.write_window_ms = 1000;
        })
        .start()
        .await;
    let (memcached, cache, config) = (&stack.memcached()[0], stack.cache(), stack.config());

    // One URL rendered 10,000 times keeps its index item small.
    let started = std::time::Instant::now();
    render_through_layer(cache, (0..10_000).map(|_| "/same".to_owned()), 32).await;
    let sizes = index_item_sizes(memcached);
    assert_eq!(sizes.len(), 1, "one shard holds the one page");
    let (_, size) = &sizes[0];
    println!(
        "index item after 10,000 renders of one URL: {size} bytes ({:?})",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    assert!(*size <= 2 * 4096, "index grew to {size} bytes");

    // A tag with 50,000 pages never nears the 1 MiB item limit.
    render_through_layer(cache, (0..50_000).map(|i| format!("/big/{i}")), 64).await;
    let sizes = index_item_sizes(memcached);
    let largest = sizes.iter().map(|(_, s)| *s).max().unwrap_or(0);
    let total: usize = sizes.iter().map(|(_, s)| *s).sum();
    println!(
        "50,000 pages: {} index items, largest {largest} bytes, total {total} bytes ({:?})",
        sizes.len(),
        started.elapsed()
    );
    assert!(
        largest <= config.cache.index_shard_max_bytes,
        "largest index item {largest} bytes"
    );
    assert!(largest < 512 * 1024);
    // Stores answered after the write window (`late`, a loaded machine) are
    // simply not kept: they neither fail nor grow the index.
    assert_eq!(cache.stats().store_errors, 0);

    let started = std::time::Instant::now();
    let removed = cache
        .invalidator()
        .invalidate_tags(["big"])
        .await
        .expect("invalidate");
    let elapsed = started.elapsed();
    println!("invalidated {} pages in {elapsed:?}", removed.pages);
    assert_eq!(removed.pages, 50_001);
    assert!(
        index_item_sizes(memcached).is_empty(),
        "the index was cleared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_over_the_size_limit_are_served_whole_and_not_stored() {
    let (stack, _) = start(1, |c| c.cache.max_body_bytes = 100_000).await;
    for target in ["/big/250000/x", "/big/100001/x"] {
        for _ in 0..2 {
            let response = stack.fetch(target, &[]).await;
            assert_eq!(response.status, 200);
            assert_eq!(x_cache(&response), "BYPASS");
            assert_eq!(
                response.body.len(),
                target
                    .split('/')
                    .nth(2)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            );
        }
    }
    stack.fetch("/big/100000/x", &[]).await;
    stack.cache().wait_for_writes().await;
    assert!(!stack.stored("/big/250000/x"));
    assert!(stack.stored("/big/100000/x"), "exactly the limit is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_counts_the_compressed_size() {
    let (stack, _) = start(1, |c| {
        c.cache.max_body_bytes = 100_000;
        c.cache.gzip = true;
    })
    .await;
    // 400 kB of one byte compresses far below the limit; random text does not.
    let compressible = stack.fetch("/big/400000/x", &[]).await;
    let random = stack.fetch("/big/400000/random", &[]).await;
    assert_eq!(random.body.len(), 400_000);
    stack.cache().wait_for_writes().await;
    assert!(stack.stored("/big/400000/x"));
    assert!(!stack.stored("/big/400000/random"));
    assert_eq!(
        stack.cache().stats().store_errors,
        1,
        "the oversized gzip body was refused, not stored"
    );
    let hit = stack.fetch("/big/400000/x", &[]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(
        hit.body, compressible.body,
        "nginx gunzips for a client without gzip"
    );
}

/// A request through the layer in process, polled by the test itself.
type Call = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
>;

fn call(router: &Router, target: &str) -> Call {
    use tower::ServiceExt;
    let request = axum::http::Request::get(target)
        .body(axum::body::Body::empty())
        .expect("request");
    Box::pin(router.clone().oneshot(request))
}

/// Drive `call` until its `/race/*` handler has started (and waits for `release`).
async fn until_in_handler(site: &Site, call: &mut Call) {
    let started = site.started.notified();
    tokio::pin!(started);
    tokio::select! {
        biased;
        _ = &mut started => {}
        _ = call => panic!("the request finished before it was released"),
    }
}

async fn body_of(call: Call) -> axum::body::Bytes {
    let response = call.await.expect("infallible");
    assert_eq!(response.status(), 200);
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body")
}

fn site_router(site: &Site, cache: &Cache) -> Router {
    Router::new()
        .fallback(page)
        .with_state(site.clone())
        .layer(PageCacheLayer::new(cache.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_key_render_once() {
    // A cache on one fresh memcached (pages and index), with the default config.
    let stack = Stack::builder().start().await;
    let cache = stack.cache();
    let site = Site::default();
    let router = site_router(&site, cache);
    // The leader reads the clock and enters the handler, which waits for `release`.
    let mut leader = call(&router, "/race/flight");
    until_in_handler(&site, &mut leader).await;
    // Every follower is polled once, which makes it join the leader's flight.
    let mut followers: Vec<Call> = (0..99).map(|_| call(&router, "/race/flight")).collect();
    for follower in &mut followers {
        assert!(futures_util::poll!(follower.as_mut()).is_pending());
    }
    site.release.notify_one();
    let leader_body = body_of(leader).await;
    for follower in followers {
        assert_eq!(body_of(follower).await, leader_body);
    }
    assert_eq!(
        site.renders_of("/race/flight"),
        1,
        "100 concurrent misses, one render"
    );
    assert_eq!(cache.stats().shared, 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_never_gets_a_render_older_than_an_invalidation() {
    // A cache on one fresh memcached (pages and index), with the default config.
    let stack = Stack::builder().start().await;
    let cache = stack.cache();
    let site = Site::default();
    let router = site_router(&site, cache);
    // The leader read the clock and is rendering from data about to change...
    let mut leader = call(&router, "/race/stale");
    until_in_handler(&site, &mut leader).await;
    // ...which changes (the app invalidates after its commit)...
    cache
        .invalidator()
        .invalidate_tags(["race"])
        .await
        .expect("invalidate");
    // ...and then a request for the page arrives and joins the flight.
    let mut follower = call(&router, "/race/stale");
    assert!(futures_util::poll!(follower.as_mut()).is_pending());
    site.release.notify_one();
    let leader_body = body_of(leader).await;
    assert!(
        std::str::from_utf8(&leader_body)
            .expect("utf-8")
            .contains("render 1")
    );
    // The follower must not take the leader's (stale) page: it renders itself.
    until_in_handler(&site, &mut follower).await;
    site.release.notify_one();
    let follower_body = body_of(follower).await;
    assert!(
        std::str::from_utf8(&follower_body)
            .expect("utf-8")
            .contains("render 2"),
        "the follower got {follower_body:?}"
    );
    assert_eq!(site.renders_of("/race/stale"), 2);
    assert_eq!(cache.stats().shared, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_while_the_page_is_being_stored_shares_the_render() {
    let stack = Stack::builder()
        .index_server(&[])
        // A paused page server holds the write instead of failing it.
        .config(|c| c.memcached.timeout_ms = 60_000)
        .start()
        .await;
    let (pages, cache) = (&stack.memcached()[0], stack.cache());
    let site = Site::default();
    let router = site_router(&site, cache);

    pages.pause();
    let first = body_of(call(&router, "/written")).await;
    // The render is done; its write waits for the page server. nginx cannot
    // answer yet, so this request reaches the app: it shares the render.
    let second = body_of(call(&router, "/written")).await;
    assert_eq!(first, second);
    assert_eq!(site.renders_of("/written"), 1);
    assert_eq!(cache.stats().shared, 1);

    pages.resume();
    cache.wait_for_writes().await;
    let key = cache
        .page_key(None, b"/written")
        .expect("cacheable target")
        .escaped;
    assert_eq!(
        pages.get_raw(&key).map(|(_, body)| body),
        Some(first.to_vec())
    );
    // Stored: the flight is over (nginx answers from now on; this request
    // came to the app directly, so it renders).
    body_of(call(&router, "/written")).await;
    assert_eq!(site.renders_of("/written"), 2);
    assert_eq!(cache.stats().shared, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mode_never_serves_one_hosts_page_for_another() {
    let (stack, _) = start(2, |c| {
        c.keys.host = true;
        c.cache.allowed_hosts = vec!["a.test".to_owned(), "b.test".to_owned()];
    })
    .await;
    let authority = stack.nginx().address().to_owned();
    let fetch = |host: &'static str, target: &'static str| {
        let authority = authority.clone();
        async move {
            mcpage_tests::request_target(
                "GET",
                &authority,
                target.as_bytes(),
                &[("host", host)],
                b"",
            )
            .await
            .expect("request")
        }
    };
    let a = fetch("a.test", "/page").await;
    assert_eq!(x_cache(&a), "MISS");
    stack.cache().wait_for_writes().await;
    assert_eq!(
        x_cache(&fetch("A.test:8080", "/page").await),
        "HIT",
        "$host is lowercased, port dropped"
    );
    // Another allowed host has its own key; a host that is not allowed is never cached.
    assert_eq!(x_cache(&fetch("b.test", "/page").await), "MISS");
    for _ in 0..2 {
        assert_eq!(x_cache(&fetch("evil.test", "/page").await), "BYPASS");
    }
    // An absolute-form target names its own host, whatever the Host header says.
    let absolute = fetch("a.test", "http://evil.test/page").await;
    assert_ne!(x_cache(&absolute), "HIT");
    stack.cache().wait_for_writes().await;
    let keys: Vec<Vec<u8>> = stack
        .memcached()
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| !k.starts_with(b"mcpage:"))
        .collect();
    let mut keys: Vec<String> = keys
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["a.test/page", "b.test/page"]);
}

/// A pooled connection to a memcached that restarted on its socket reads EOF:
/// it is dropped, not used, and the next operations go over a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_memcached_on_a_unix_socket_gets_new_connections() {
    let stack = Stack::builder().unix_sockets().start().await;
    let cache = stack.cache();
    for round in 0..3 {
        for i in 0..20 {
            cache
                .store_page(&format!("/u/{round}/{i}"), format!("page {i}"), ["u"])
                .await
                .unwrap_or_else(|e| panic!("store in round {round}: {e}"));
        }
        let keys = stack.memcached()[0].keys();
        assert_eq!(
            keys.iter().filter(|k| k.starts_with(b"/u/")).count(),
            20,
            "round {round}"
        );
        let removed = cache
            .invalidator()
            .invalidate_tags(["u"])
            .await
            .expect("invalidate");
        assert_eq!(removed.pages, 20, "round {round}");
        stack.memcached()[0].restart();
    }
    let stats = cache.stats();
    assert_eq!(
        (stats.store_errors, stats.invalidation_errors),
        (0, 0),
        "{stats:?}"
    );
    assert!(stats.servers.iter().all(|s| s.errors == 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_server_restart_is_recovered_by_the_next_invalidation() {
    let stack = Stack::builder().index_server(&["-M"]).start().await;
    let (pages, index, cache) = (&stack.memcached()[0], stack.index(), stack.cache());
    let invalidator = cache.invalidator();
    let stored = || {
        pages
            .keys()
            .iter()
            .filter(|k| k.starts_with(b"/r/"))
            .count()
    };
    for i in 0..20 {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        cache
            .store_page(&format!("/r/{i}"), format!("page {i}"), [tag])
            .await
            .expect("store");
    }
    // A first invalidation remembers which index process it talks to; nothing else goes.
    let first = invalidator
        .invalidate_tags(["unrelated"])
        .await
        .expect("invalidate");
    assert_eq!(first.pages, 0);
    assert_eq!(stored(), 20);

    index.restart();
    // The "odd" pages lost their index records; the next invalidation notices
    // the new index process and purges every page instead of leaving orphans.
    let removed = invalidator
        .invalidate_tags(["even"])
        .await
        .expect("invalidate");
    assert_eq!(removed.index_recovery, 20, "{removed:?}");
    assert_eq!(stored(), 0, "no orphans left");

    // Once recovered, invalidations are selective again.
    cache
        .store_page("/r/kept", "kept", ["odd"])
        .await
        .expect("store");
    let removed = invalidator
        .invalidate_tags(["even"])
        .await
        .expect("invalidate");
    assert_eq!(removed.pages, 0);
    assert!(pages.get_raw(b"/r/kept").is_some());
}
