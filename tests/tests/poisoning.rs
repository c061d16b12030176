//! Cache poisoning, tried as an attacker would: real nginx (as `mcpage nginx`
//! renders it) in front of an app wrapped in the layer (what `mcpage proxy`
//! runs), whose pages echo everything the request could shape them with: the
//! Host, the forwarded and override headers, the raw request target.
//!
//! For every input, a clean visitor afterwards never gets a page shaped by
//! it; whatever is stored under a key is the app's answer to that key's own
//! path; two deployments on one memcached never touch each other's pages.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::header;
use axum::response::IntoResponse;
use mcpage::{Cache, CacheTags, Config, PageCacheLayer, ServerSpec};
use mcpage_tests::{Memcached, Stack, request_target};
use proptest::prelude::*;

/// Headers an app reads to build links or route (the ones the echo shows).
const ECHOED: [&str; 14] = [
    "host",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "forwarded",
    "x-host",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-method-override",
    "x-original-host",
    "x-forwarded-scheme",
];

/// The page: `target=<raw target>` then one `name=value` line per echoed header.
async fn echo(request: Request) -> impl IntoResponse {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
    let mut body = format!("target={target}\n");
    for name in ECHOED {
        if let Some(value) = request.headers().get(name) {
            body.push_str(&format!(
                "{name}={}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
    }
    (
        CacheTags::new(["echo"]),
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
}

struct Site {
    stack: Stack,
}

impl Site {
    async fn start() -> Site {
        let stack = Stack::builder()
            .config(|c| c.memcached.timeout_ms = 500)
            .app(|cache| {
                Router::new()
                    .fallback(echo)
                    .layer(PageCacheLayer::new(cache.clone()))
            })
            .start()
            .await;
        Site { stack }
    }

    fn cache(&self) -> &Cache {
        self.stack.cache()
    }

    fn memcached(&self) -> &Memcached {
        &self.stack.memcached()[0]
    }

    async fn get(&self, target: &[u8], headers: &[(&str, &str)]) -> mcpage_tests::Response {
        request_target("GET", self.stack.nginx().address(), target, headers, b"")
            .await
            .expect("request through nginx")
    }

    /// A clean visitor's view of `path` once the page is in memcached.
    async fn clean(&self, path: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let response = self.get(path.as_bytes(), &[]).await;
            self.cache().wait_for_writes().await;
            if response.header("x-cache") == Some("HIT") {
                return response.text();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never became a hit: {:?}",
                response.header("x-cache")
            );
        }
    }
}

fn assert_clean(what: &str, body: &str) {
    for marker in ["evil", "/other", "DELETE", "6666", "10.6.6.6", "prefix"] {
        assert!(
            !body.contains(marker),
            "{what}: a clean visitor got a page shaped by the attacker ({marker}):\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_unkeyed_header_shapes_a_page_served_to_others() {
    let site = Site::start().await;
    let attacks: &[(&str, &str)] = &[
        ("Host", "evil.example"),
        ("Host", "localhost:6666"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Server", "evil.example"),
        ("X-Host", "evil.example"),
        ("X-Original-Host", "evil.example"),
        ("Forwarded", "host=evil.example;proto=https"),
        ("X-Original-URL", "/other"),
        ("X-Rewrite-URL", "/other"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Forwarded-Prefix", "/prefix"),
        ("X-Forwarded-For", "10.6.6.6"),
        ("X-Forwarded-Scheme", "evil"),
    ];
    let mut through_nginx = 0;
    for (n, (name, value)) in attacks.iter().enumerate() {
        let path = format!("/article/{n}");
        // The attacker goes first, through nginx: the miss reaches the app.
        let attacked = site.get(path.as_bytes(), &[(name, value)]).await;
        assert_eq!(attacked.status, 200, "{name}: {value}");
        through_nginx += 1;
        site.cache().wait_for_writes().await;
        let body = site.clean(&path).await;
        assert_clean(&format!("{name}: {value} through nginx"), &body);
        // nginx's own Host reaches the app for cacheable requests, never the client's.
        assert!(
            body.contains("host=localhost") || body.contains("host=127.0.0.1"),
            "{body}"
        );
    }
    // The same headers sent to the app directly (a request that did not come
    // through the rendered nginx): never stored, with a reason.
    let mut direct = 0;
    for (n, (name, value)) in attacks.iter().enumerate() {
        if *name == "X-Forwarded-For" || *value == "localhost:6666" {
            // Set by nginx from the connection (X-Forwarded-For) or chosen by
            // it (the Host's port): trusted from nginx, see README.
            continue;
        }
        let path = format!("/direct/{n}");
        let response = request_target(
            "GET",
            &site.stack.app().address(),
            path.as_bytes(),
            &[(name, value)],
            b"",
        )
        .await
        .expect("request to the app");
        assert_eq!(
            response.header("x-cache"),
            Some("BYPASS"),
            "{name}: {value}"
        );
        site.cache().wait_for_writes().await;
        let key = site
            .cache()
            .page_key(None, path.as_bytes())
            .expect("key")
            .escaped;
        assert!(
            site.memcached().get_raw(&key).is_none(),
            "{name}: {value} stored"
        );
        direct += 1;
    }
    let stats = site.cache().stats();
    let count = |reason: mcpage::Bypass| {
        stats
            .bypass
            .iter()
            .find(|b| b.reason == reason)
            .map_or(0, |b| b.count)
    };
    assert!(count(mcpage::Bypass::UnkeyedHeader) >= 10, "{stats:?}");
    assert!(count(mcpage::Bypass::Host) >= 1, "{stats:?}");
    println!(
        "poisoning: {through_nginx} hostile headers through nginx, {direct} sent to the app \
         directly: 0 pages shaped by them (unkeyed_header bypasses: {}, host: {})",
        count(mcpage::Bypass::UnkeyedHeader),
        count(mcpage::Bypass::Host)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_targets_are_served_but_never_stored_under_the_canonical_key() {
    let site = Site::start().await;
    for raw in [
        "/posts//1",
        "/posts/./1",
        "/posts/x/../1",
        "/posts%2F1",
        "/p%6fsts/1",
    ] {
        let response = site.get(raw.as_bytes(), &[]).await;
        assert_eq!(response.status, 200, "{raw}");
        site.cache().wait_for_writes().await;
        let key = site
            .cache()
            .page_key(None, b"/posts/1")
            .expect("key")
            .escaped;
        if let Some((_, stored)) = site.memcached().get_raw(&key) {
            let stored = String::from_utf8_lossy(&stored).into_owned();
            assert!(
                stored.starts_with("target=/posts/1\n"),
                "{raw}: the key of /posts/1 holds another answer:\n{stored}"
            );
        }
    }
    let body = site.clean("/posts/1").await;
    assert!(body.starts_with("target=/posts/1\n"), "{body}");
}

/// Path pieces an attacker (or a sloppy client) mixes into a target.
fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a", "b", "posts", "1", "/", "//", "/./", "/../", "%2F", "%2f", "%2e", "%2E%2E", "%41",
        "%7E", "%C3%A9", "%20", ";x", ".", "..", "~",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 6,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever ends up under a key is the app's answer to that key's own path.
    #[test]
    fn whatever_is_stored_is_the_answer_to_the_keys_own_path(
        targets in prop::collection::vec(prop::collection::vec(piece(), 1..6), 20..40)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let site = Site::start().await;
            for pieces in &targets {
                let target = format!("/{}", pieces.concat());
                let _ = request_target("GET", site.stack.nginx().address(), target.as_bytes(), &[], b"").await;
            }
            site.cache().wait_for_writes().await;
            for key in site.memcached().keys() {
                if key.starts_with(b"mcpage:") {
                    continue; // the tag index and clocks
                }
                let Some((_, stored)) = site.memcached().get_raw(&key) else {
                    continue;
                };
                let stored = String::from_utf8_lossy(&stored).into_owned();
                let answered = stored
                    .lines()
                    .next()
                    .and_then(|line| line.strip_prefix("target="))
                    .unwrap_or_default()
                    .to_owned();
                let page = site.cache().page_key(None, answered.as_bytes());
                prop_assert!(
                    page.as_ref().is_ok_and(|page| page.escaped == key
                        && mcpage::key::is_canonical_path(answered.as_bytes(), &page.uri)),
                    "key {} holds the answer for {answered}",
                    String::from_utf8_lossy(&key)
                );
            }
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_on_one_pool_never_touch_each_others_pages_or_clocks() {
    let memcached = Memcached::start();
    let deployment = |prefix: &str| {
        let mut config = Config::default();
        config.memcached.servers = vec![ServerSpec::new(memcached.address())];
        config.keys.prefix = prefix.to_owned();
        config
    };
    let staging = Cache::connect(&deployment("stg:")).await.expect("staging");
    let production = Cache::connect(&deployment("prod:"))
        .await
        .expect("production");
    for cache in [&staging, &production] {
        for path in ["/a", "/b"] {
            cache
                .store_page(path, "<p>page</p>", ["comments"])
                .await
                .expect("stored");
        }
    }
    let removed = staging
        .invalidator()
        .invalidate_tags(["comments"])
        .await
        .expect("invalidated");
    assert_eq!(removed.pages, 2, "staging removes its own two pages only");
    let present = |prefix: &'static str| {
        let memcached = &memcached;
        move |path: &str| {
            memcached
                .get_raw(format!("{prefix}{path}").as_bytes())
                .is_some()
        }
    };
    assert!(!present("stg:")("/a") && !present("stg:")("/b"));
    assert!(
        present("prod:")("/a") && present("prod:")("/b"),
        "production kept its pages"
    );
    // Staging's invalidation raised staging's clocks only: a production page
    // stored now is kept (not retracted as if it had overlapped).
    production
        .store_page("/c", "<p>page</p>", ["comments"])
        .await
        .expect("production's clocks did not move");
    let removed = production
        .invalidator()
        .invalidate_tags(["comments"])
        .await
        .expect("invalidated");
    assert_eq!(removed.pages, 3);
    let namespaces: Vec<String> = memcached
        .keys()
        .iter()
        .filter(|k| k.starts_with(b"mcpage:"))
        .map(|k| String::from_utf8_lossy(&k[..16.min(k.len())]).into_owned())
        .collect();
    let distinct: std::collections::BTreeSet<&String> = namespaces.iter().collect();
    assert!(
        distinct.len() >= 2,
        "each deployment has its own index namespace: {distinct:?}"
    );
    println!(
        "deployments: staging removed 2 of 4 pages, production 3; index namespaces {distinct:?}"
    );
}
