//! Fitting in with other caches' conventions: the tag headers their apps
//! already send (`cache.tag_headers`) and RFC 9211 `Cache-Status`, through
//! real nginx.

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use mcpage::{PageCacheLayer, TagHeader, TagSeparator};
use mcpage_tests::Stack;

/// `/drupal/...` tags like Drupal, `/fastly/...` like Fastly apps.
async fn page(request: Request) -> impl IntoResponse {
    let path = request.uri().path().to_owned();
    let html = ("content-type", "text/html; charset=utf-8");
    if path.starts_with("/drupal/") {
        ([html, ("x-drupal-cache-tags", "node:1 node_list")], path).into_response()
    } else if path.starts_with("/fastly/") {
        ([html, ("surrogate-key", "node:2  frontpage")], path).into_response()
    } else {
        ([html, ("x-cache-tags", "plain")], path).into_response()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_caches_tag_headers_are_read_and_never_reach_the_client() {
    let stack = Stack::builder()
        .config(|c| {
            c.cache.tag_headers.extend([
                TagHeader {
                    name: "x-drupal-cache-tags".into(),
                    separator: TagSeparator::Space,
                },
                TagHeader {
                    name: "surrogate-key".into(),
                    separator: TagSeparator::Space,
                },
            ]);
        })
        .app(|cache| {
            Router::new()
                .fallback(page)
                .layer(PageCacheLayer::new(cache.clone()))
        })
        .start()
        .await;
    for path in ["/drupal/a", "/fastly/b", "/plain/c"] {
        let miss = stack.fetch(path, &[]).await;
        assert_eq!(miss.header("x-cache"), Some("MISS"), "{path}");
        assert_eq!(
            miss.header("cache-status"),
            Some("mcpage; fwd=uri-miss; stored"),
            "{path}"
        );
        for name in ["x-cache-tags", "x-drupal-cache-tags", "surrogate-key"] {
            assert!(miss.header(name).is_none(), "{name} reached the client");
        }
        stack.cache().wait_for_writes().await;
        assert!(stack.stored(path), "{path}");
        let hit = stack.fetch(path, &[]).await;
        assert_eq!(hit.header("cache-status"), Some("mcpage; hit"), "{path}");
    }
    // A bypass names its reason.
    let bypass = stack.fetch("/plain/c", &[("cookie", "sessionid=1")]).await;
    assert_eq!(
        bypass.header("cache-status"),
        Some("mcpage; fwd=bypass; detail=session")
    );

    let invalidator = stack.cache().invalidator();
    let removed = invalidator
        .invalidate_tags(["node_list"])
        .await
        .expect("ok");
    assert_eq!(removed.pages, 1);
    assert!(!stack.stored("/drupal/a") && stack.stored("/fastly/b"));
    let removed = invalidator
        .invalidate_tags(["frontpage"])
        .await
        .expect("ok");
    assert_eq!(removed.pages, 1);
    assert!(!stack.stored("/fastly/b") && stack.stored("/plain/c"));
}
