//! Hostile requests, responses and configuration: no panics, sane results.
//!
//! - request targets (arbitrary bytes, where `http::Uri` parses them) through
//!   the layer in process, and the key functions on arbitrary bytes;
//! - tags: arbitrary strings (CR, LF, anything) in `CacheTags`, 10,000 tags, a
//!   1 MB tag, and `X-Cache-Tags` headers with 10,000 tags, 1 MB, or any bytes;
//! - configuration files: arbitrary TOML-ish text into `Config::figment_from`
//!   and `validate`: an error, never a panic, and bad values name their field;
//! - pages larger than memcached's item limit (`-I 1m`): served, counted in
//!   `store_errors`, and no older version of the URL survives;
//! - Host header games in host mode: never another host's page, only allowed
//!   hosts stored.
//!
//! Proptest case counts default to CI-sized numbers; `PROPTEST_CASES=N`
//! replaces every one of them with N.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use mcpage::key::{
    KeyScheme, QueryMode, memcached_escape, memcached_unescape, nginx_host, nginx_uri, split_url,
    wire_key_len,
};
use mcpage::{Cache, CacheTags, Config, PageCacheLayer};
use mcpage_tests::{Stack, StackBuilder, get, request_target};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

/// A counter the proptest closures (`Fn`) can bump.
#[derive(Default)]
struct Count(Cell<usize>);

impl Count {
    fn bump(&self) -> usize {
        self.0.set(self.0.get() + 1);
        self.0.get()
    }

    fn get(&self) -> usize {
        self.0.get()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn x_cache<B>(response: &Response<B>) -> String {
    response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn body_of(response: Response) -> Vec<u8> {
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body")
        .to_vec()
}

/// One memcached and a cache on it, patient enough for a loaded machine;
/// `tweak` changes the config.
fn stack<'a>(tweak: impl FnOnce(&mut Config) + 'a) -> StackBuilder<'a> {
    Stack::builder()
        .config(|c| c.memcached.timeout_ms = 2_000)
        .config(tweak)
}

/// Is `key` a key memcached accepts and the one nginx would send for `value`?
fn check_key(key: &mcpage::key::PageKey) -> Result<(), TestCaseError> {
    prop_assert_eq!(&memcached_escape(&key.unescaped), &key.escaped);
    let unescaped = memcached_unescape(&key.escaped);
    prop_assert_eq!(unescaped.as_ref(), Some(&key.unescaped));
    prop_assert!(wire_key_len(&key.escaped) <= 250, "{:?}", key);
    prop_assert!(!key.escaped.iter().any(|b| *b <= b' '), "{:?}", key);
    prop_assert_eq!(key.uri.first(), Some(&b'/'));
    Ok(())
}

// ---------------------------------------------------------------------------
// request targets
// ---------------------------------------------------------------------------

/// Bytes that look like request targets: heavy on the characters nginx's
/// normalization cares about, with anything else mixed in.
fn target_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => prop::sample::select(b"/.%?#;=&+:@![]~-_2eEfF0aA".to_vec()),
        2 => b'a'..=b'z',
        1 => any::<u8>(),
        1 => prop::sample::select(vec![0x00, 0x09, 0x0a, 0x0d, 0x20, 0x7f, 0x80, 0xc3, 0xff]),
    ];
    let path = prop::collection::vec(byte, 0..120);
    prop_oneof![
        4 => path.clone().prop_map(|p| [b"/".to_vec(), p].concat()),
        1 => prop::collection::vec(any::<u8>(), 0..80),
        1 => (
            prop::sample::select(vec!["http://", "https://", "HTTP://", "ftp://", "http:/", ""]),
            "[a-zA-Z0-9.:\\[\\]@-]{0,20}",
            path,
        )
            .prop_map(|(scheme, host, path)| {
                [scheme.as_bytes(), host.as_bytes(), b"/", &path].concat()
            }),
        1 => prop::collection::vec(any::<u8>(), 240..300)
            .prop_map(|p| [b"/".to_vec(), p].concat()),
    ]
}

/// Targets `http::Uri` mostly accepts: printable ASCII with the characters
/// normalization cares about, percent escapes of anything, and absolute forms.
fn uri_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => prop::sample::select(b"/.%?#;=&+:@!~-_2eEfF0aAzZ".to_vec()).prop_map(|b| vec![b]),
        3 => (0x21u8..0x7f).prop_map(|b| vec![b]),
        2 => any::<u8>().prop_map(|b| format!("%{b:02X}").into_bytes()),
        1 => prop::sample::select(vec!["/..", "/.", "//", "%2e%2e", "%2F", "%00", "%7F", "%20"])
            .prop_map(|p| p.as_bytes().to_vec()),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ];
    let path = prop::collection::vec(piece, 0..60).prop_map(|p| p.concat());
    prop_oneof![
        5 => path.clone().prop_map(|p| [b"/".to_vec(), p].concat()),
        2 => (
            prop::sample::select(vec!["http://", "https://"]),
            prop::sample::select(vec![
                "a.test", "A.TEST", "a.test.", "a.test:80", "b.test", "[::1]", "[::1]:1",
                "user@a.test", "evil.test", "127.0.0.1", "a.test:x",
            ]),
            path,
        )
            .prop_map(|(scheme, host, path)| {
                [scheme.as_bytes(), host.as_bytes(), b"/", &path].concat()
            }),
        1 => prop::collection::vec(0x21u8..0x7f, 240..300)
            .prop_map(|p| [b"/".to_vec(), p].concat()),
    ]
}

#[test]
fn key_functions_take_any_bytes() {
    let schemes: Vec<KeyScheme> = [
        (QueryMode::Bypass, false),
        (QueryMode::Include, false),
        (QueryMode::Bypass, true),
        (QueryMode::Include, true),
    ]
    .into_iter()
    .flat_map(|(query, host)| {
        [
            KeyScheme::new(b"".to_vec(), query, true, host),
            KeyScheme::new(b"page:".to_vec(), query, false, host),
        ]
    })
    .collect();
    let host = prop_oneof![
        Just(None),
        prop::sample::select(vec![
            "a.test",
            "A.Test.:80",
            "[::1]",
            "[::1]:8080",
            "x:",
            "a..b",
            "é.test"
        ])
        .prop_map(|h| Some(h.as_bytes().to_vec())),
        "[a-zA-Z0-9.:\\[\\]/ _-]{0,24}".prop_map(|h| Some(h.into_bytes())),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ];
    let ok: [Count; 8] = Default::default();
    let total = cases(20_000);
    runner(total)
        .run(&(target_bytes(), host), |(target, host)| {
            let _ = nginx_uri(&target, true);
            let _ = nginx_uri(&target, false);
            if let Ok(uri) = nginx_uri(&target, true) {
                prop_assert_eq!(uri.uri.first(), Some(&b'/'));
            }
            let escaped = memcached_escape(&target);
            prop_assert_eq!(memcached_unescape(&escaped), Some(target.clone()));
            let _ = memcached_unescape(&target);
            let _ = wire_key_len(&target);
            if let Some(h) = host.as_deref().and_then(nginx_host) {
                prop_assert!(!h.is_empty());
                prop_assert!(
                    !h.iter()
                        .any(|b| b.is_ascii_uppercase() || *b == b'/' || *b <= b' ' || *b == 0x7f)
                );
                prop_assert_eq!(nginx_host(&h), Some(h.clone()), "nginx_host is idempotent");
            }
            let _ = split_url(&String::from_utf8_lossy(&target));
            for (i, scheme) in schemes.iter().enumerate() {
                let first = scheme.page_key(host.as_deref(), &target);
                prop_assert_eq!(&first, &scheme.page_key(host.as_deref(), &target));
                if let Ok(key) = first {
                    ok[i].bump();
                    check_key(&key)?;
                    prop_assert!(key.unescaped.starts_with(scheme.prefix()));
                    let rest = &key.unescaped[scheme.prefix().len()..];
                    if scheme.host() {
                        let keyed_host = rest.split(|b| *b == b'/').next().unwrap_or_default();
                        prop_assert!(!keyed_host.is_empty());
                        let normalized = nginx_host(keyed_host);
                        prop_assert_eq!(normalized.as_deref(), Some(keyed_host));
                    } else {
                        prop_assert!(rest.starts_with(&key.uri));
                    }
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "hostile: key functions on {total} arbitrary targets: no panic; keys per scheme {:?}",
        ok.iter().map(Count::get).collect::<Vec<_>>()
    );
}

#[test]
fn request_targets_through_the_layer() {
    let rt = runtime();
    let stack = rt.block_on(stack(|_| {}).start());
    let memcached = &stack.memcached()[0];
    let plain = stack.cache().clone();
    // A second cache on the same memcached, with host keys.
    let mut config = stack.config().clone();
    config.keys.host = true;
    config.keys.query = QueryMode::Include;
    config.keys.prefix = "h:".to_owned();
    config.cache.allowed_hosts = vec!["a.test".to_owned(), "[::1]".to_owned()];
    let host_mode = rt.block_on(Cache::connect(&config)).expect("cache");
    let routers: Vec<(Cache, Router)> = [plain, host_mode]
        .into_iter()
        .map(|cache| {
            let router = Router::new()
                .fallback(|| async {
                    (
                        CacheTags::new(["fuzz"]),
                        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        "ok",
                    )
                })
                .layer(PageCacheLayer::new(cache.clone()));
            (cache, router)
        })
        .collect();
    let stored: std::cell::RefCell<Vec<Vec<u8>>> = std::cell::RefCell::default();
    let (parsed, tried) = (Count::default(), Count::default());
    let total = cases(3_000);
    runner(total)
        .run(
            &(
                uri_bytes(),
                prop::sample::select(vec!["a.test", "A.TEST.:80", "b.test", "[::1]:1"]),
            ),
            |(target, host)| {
                tried.bump();
                let Ok(uri) = http::Uri::try_from(target.as_slice()) else {
                    return Ok(());
                };
                parsed.bump();
                for (i, (cache, router)) in routers.iter().enumerate() {
                    let request = Request::get(uri.clone())
                        .header(header::HOST, host)
                        .body(Body::empty())
                        .expect("request");
                    let response = rt
                        .block_on(router.clone().oneshot(request))
                        .expect("infallible");
                    prop_assert_eq!(response.status(), 200);
                    let verdict = x_cache(&response);
                    prop_assert!(response.headers().get("x-cache-tags").is_none());
                    let body = rt.block_on(body_of(response));
                    prop_assert_eq!(&body[..], b"ok");
                    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
                    let host_header = (i == 1).then_some(host.as_bytes());
                    let classified = cache.classify(host_header, pq.as_bytes());
                    let authority = uri.authority().map(|a| a.as_str().as_bytes());
                    if i == 1
                        && authority.is_some_and(|a| nginx_host(a) != nginx_host(host.as_bytes()))
                    {
                        // The target names another host than the Host header.
                        prop_assert_eq!(verdict.as_str(), "BYPASS", "{:?}", uri);
                    }
                    match verdict.as_str() {
                        "MISS" => {
                            let key = classified.map_err(|b| {
                                TestCaseError::fail(format!("MISS but classify says {b}"))
                            })?;
                            check_key(&key)?;
                            stored.borrow_mut().push(key.escaped);
                        }
                        "BYPASS" => {}
                        other => prop_assert!(false, "X-Cache {:?}", other),
                    }
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        for (cache, _) in &routers {
            cache.wait_for_writes().await;
        }
    });
    let stored = stored.into_inner();
    let expected: HashSet<Vec<u8>> = stored.iter().cloned().collect();
    for key in &expected {
        assert_eq!(
            memcached.get_raw(key).map(|(_, v)| v),
            Some(b"ok".to_vec()),
            "{}",
            String::from_utf8_lossy(key)
        );
    }
    let unexpected: Vec<String> = memcached
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with(b"mcpage:") && !expected.contains(k))
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .collect();
    assert!(
        unexpected.is_empty(),
        "stored but never answered MISS: {unexpected:?}"
    );
    let errors: u64 = routers.iter().map(|(c, _)| c.stats().store_errors).sum();
    assert_eq!(errors, 0);
    println!(
        "hostile: {} generated targets, {} parsed by http::Uri, each through 2 layers \
         (plain, host mode): no panic, every response 200 with the page; {} cached under {} keys, \
         all valid and all where nginx looks",
        tried.get(),
        parsed.get(),
        stored.len(),
        expected.len()
    );
}

// ---------------------------------------------------------------------------
// tags
// ---------------------------------------------------------------------------

/// The next response's tags and header, set by the test before each request.
#[derive(Clone, Default)]
struct Tagged {
    tags: Arc<Mutex<Vec<String>>>,
    header: Arc<Mutex<Option<HeaderValue>>>,
}

async fn tagged_page(State(t): State<Tagged>, OriginalUri(uri): OriginalUri) -> Response {
    let tags = t.tags.lock().expect("lock").clone();
    let header_value = t.header.lock().expect("lock").clone();
    let mut response = (
        CacheTags::new(tags),
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("page {}", uri.path()),
    )
        .into_response();
    if let Some(value) = header_value {
        response.headers_mut().insert("x-cache-tags", value);
    }
    response
}

fn tagged_router(cache: &Cache, tagged: &Tagged) -> Router {
    Router::new()
        .fallback(tagged_page)
        .with_state(tagged.clone())
        .layer(PageCacheLayer::new(cache.clone()))
}

#[test]
fn any_tag_string_indexes_and_invalidates() {
    let rt = runtime();
    let stack = rt.block_on(stack(|_| {}).start());
    let (memcached, cache) = (&stack.memcached()[0], stack.cache());
    let tagged = Tagged::default();
    let router = tagged_router(cache, &tagged);
    let tag = prop_oneof![
        3 => proptest::string::string_regex("(?s).{1,40}").expect("regex"),
        1 => "[a-z]{0,5}(\r\n|\n|\r|\t| |\0|,|;|%)[a-z]{0,5}",
        1 => any::<String>(),
    ];
    let n = Count::default();
    let invalidated = Count::default();
    let total = cases(500);
    runner(total)
        .run(&prop::collection::vec(tag, 1..6), |tags| {
            let path = format!("/tags/{}", n.bump());
            *tagged.tags.lock().expect("lock") = tags.clone();
            let request = Request::get(&path).body(Body::empty()).expect("request");
            let response = rt
                .block_on(router.clone().oneshot(request))
                .expect("infallible");
            let verdict = x_cache(&response);
            let body = rt.block_on(body_of(response));
            prop_assert_eq!(body, format!("page {path}").into_bytes());
            let effective: Vec<&str> = tags
                .iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .collect();
            let fits = effective.iter().all(|t| t.len() <= 1024);
            prop_assert_eq!(verdict.as_str(), if fits { "MISS" } else { "BYPASS" });
            rt.block_on(cache.wait_for_writes());
            let key = cache.page_key(None, path.as_bytes()).expect("key").escaped;
            prop_assert_eq!(memcached.get_raw(&key).is_some(), fits);
            if !fits {
                return Ok(());
            }
            if let Some(tag) = effective.last() {
                let removed = rt
                    .block_on(cache.invalidator().invalidate_tags([*tag]))
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(removed.pages, 1, "invalidating {:?}", tag);
                invalidated.bump();
            } else {
                rt.block_on(cache.invalidator().invalidate_urls([&path]))
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            }
            prop_assert!(memcached.get_raw(&key).is_none(), "page survived");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    for key in memcached.keys() {
        assert!(
            key.len() <= 250 && !key.iter().any(|b| *b <= b' '),
            "invalid key {key:?}"
        );
    }
    println!(
        "hostile: {} pages with 1-5 arbitrary tags (CR, LF, NUL, commas, unicode): \
         {} invalidated by one of their tags, every one removed",
        n.get(),
        invalidated.get()
    );
}

#[test]
fn oversized_tag_sets_are_served_not_cached() {
    let rt = runtime();
    let stack = rt.block_on(stack(|_| {}).start());
    let (memcached, cache) = (&stack.memcached()[0], stack.cache());
    let tagged = Tagged::default();
    let router = tagged_router(cache, &tagged);
    let many: Vec<String> = (0..10_000).map(|i| format!("tag:{i}")).collect();
    let huge = "x".repeat(1 << 20);
    let at_limit: Vec<String> = (0..128)
        .map(|i| format!("{i:04}{}", "y".repeat(1020)))
        .collect();
    let cases: Vec<(&str, Vec<String>, bool)> = vec![
        ("/ten-thousand-tags", many.clone(), false),
        ("/one-megabyte-tag", vec![huge.clone()], false),
        (
            "/129-tags",
            (0..129).map(|i| format!("t{i}")).collect(),
            false,
        ),
        ("/1025-byte-tag", vec!["z".repeat(1025)], false),
        ("/128-tags-of-1024-bytes", at_limit.clone(), true),
    ];
    rt.block_on(async {
        for (path, tags, cached) in cases {
            *tagged.tags.lock().expect("lock") = tags;
            let request = Request::get(path).body(Body::empty()).expect("request");
            let response = router.clone().oneshot(request).await.expect("infallible");
            assert_eq!(response.status(), 200, "{path}");
            assert_eq!(
                x_cache(&response),
                if cached { "MISS" } else { "BYPASS" },
                "{path}"
            );
            assert_eq!(body_of(response).await, format!("page {path}").into_bytes());
            cache.wait_for_writes().await;
            let key = cache.page_key(None, path.as_bytes()).expect("key").escaped;
            assert_eq!(memcached.get_raw(&key).is_some(), cached, "{path}");
        }
        let removed = cache
            .invalidator()
            .invalidate_tags([&at_limit[127]])
            .await
            .expect("invalidate");
        assert_eq!(removed.pages, 1);
        // Invalidating 10,000 tags (and a 1 MB one) at once is fine too.
        let removed = cache
            .invalidator()
            .invalidate_tags(&many)
            .await
            .expect("10,000 tags");
        assert_eq!(removed.pages, 0);
        cache
            .invalidator()
            .invalidate_tags([&huge])
            .await
            .expect("1 MB tag");
    });
    assert_eq!(cache.stats().store_errors, 0);
    println!(
        "hostile: CacheTags with 10,000 tags, a 1 MB tag, 129 tags, a 1025-byte tag: served, not cached; \
         128 tags of 1024 bytes: cached and invalidated"
    );
}

#[test]
fn any_x_cache_tags_header_is_removed_and_never_fails_the_page() {
    let rt = runtime();
    let stack = rt.block_on(stack(|_| {}).start());
    let (memcached, cache) = (&stack.memcached()[0], stack.cache());
    let tagged = Tagged::default();
    let router = tagged_router(cache, &tagged);
    let n = Count::default();
    let (misses, bypasses) = (Count::default(), Count::default());
    let value = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        "[ ,a-z:\t]{0,60}".prop_map(String::into_bytes),
        prop::collection::vec(prop::sample::select(b", ab\xc3\xa9\xff\t".to_vec()), 0..60),
    ];
    runner(cases(600))
        .run(&value, |value| {
            let Ok(value) = HeaderValue::from_bytes(&value) else {
                return Ok(());
            };
            let path = format!("/header/{}", n.bump());
            *tagged.tags.lock().expect("lock") = Vec::new();
            *tagged.header.lock().expect("lock") = Some(value.clone());
            let request = Request::get(&path).body(Body::empty()).expect("request");
            let response = rt
                .block_on(router.clone().oneshot(request))
                .expect("infallible");
            prop_assert!(response.headers().get("x-cache-tags").is_none());
            let verdict = x_cache(&response);
            prop_assert_eq!(
                rt.block_on(body_of(response)),
                format!("page {path}").into_bytes()
            );
            rt.block_on(cache.wait_for_writes());
            let key = cache.page_key(None, path.as_bytes()).expect("key").escaped;
            match verdict.as_str() {
                "MISS" => {
                    misses.bump();
                    prop_assert!(memcached.get_raw(&key).is_some());
                    // Any UTF-8 (HeaderValue::to_str only takes visible ASCII).
                    let text = std::str::from_utf8(value.as_bytes())
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let first = text.split(',').map(str::trim).find(|t| !t.is_empty());
                    match first {
                        Some(tag) => {
                            let removed = rt
                                .block_on(cache.invalidator().invalidate_tags([tag]))
                                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                            prop_assert_eq!(removed.pages, 1, "tag {:?} of {:?}", tag, text);
                        }
                        None => {
                            rt.block_on(cache.invalidator().invalidate_urls([&path]))
                                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        }
                    }
                    prop_assert!(memcached.get_raw(&key).is_none());
                }
                "BYPASS" => {
                    bypasses.bump();
                    prop_assert!(memcached.get_raw(&key).is_none());
                }
                other => prop_assert!(false, "X-Cache {:?}", other),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "hostile: {} arbitrary X-Cache-Tags values: {} cached and removed by their first tag, \
         {} refused (not UTF-8, too many, too long); never sent to the client",
        n.get(),
        misses.get(),
        bypasses.get()
    );
}

/// Through real nginx: huge `X-Cache-Tags` headers never reach the client,
/// the client gets the page, the page is not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_x_cache_tags_headers_through_nginx() {
    let stack = stack(|_| {})
        .app(|cache| {
            Router::new()
                .fallback(|OriginalUri(uri): OriginalUri| async move {
                    let value = match uri.path() {
                        "/many" => (0..10_000)
                            .map(|i| format!("tag:{i}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        "/huge" => "h".repeat(1 << 20),
                        _ => "ok, fine".to_owned(),
                    };
                    (
                        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        [("x-cache-tags", value)],
                        format!("page {}", uri.path()),
                    )
                })
                .layer(PageCacheLayer::new(cache.clone()))
        })
        .start()
        .await;
    let (memcached, cache, nginx) = (&stack.memcached()[0], stack.cache(), stack.nginx());
    for path in ["/many", "/huge"] {
        for headers in [&[][..], &[("cookie", "sessionid=1")][..]] {
            let response = get(&nginx.url(path), headers).await;
            assert_eq!(response.status, 200, "{path}: {}", nginx.error_log());
            assert_eq!(response.body, format!("page {path}").as_bytes());
            assert!(response.headers.get("x-cache-tags").is_none());
            assert_eq!(response.header("x-cache"), Some("BYPASS"));
        }
    }
    let fine = get(&nginx.url("/fine"), &[]).await;
    assert_eq!(fine.header("x-cache"), Some("MISS"));
    cache.wait_for_writes().await;
    let pages: Vec<Vec<u8>> = memcached
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with(b"mcpage:"))
        .collect();
    assert_eq!(pages, vec![b"/fine".to_vec()]);
    println!(
        "hostile: X-Cache-Tags with 10,000 tags and of 1 MB through nginx: the client gets the page \
         (200, without the header), nothing cached"
    );
}

// ---------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------

/// `field` (dotted) and a TOML value for it.
fn known_fields() -> Vec<(&'static str, &'static str)> {
    vec![
        ("memcached", "servers"),
        ("memcached", "hashing"),
        ("memcached", "index_servers"),
        ("memcached", "timeout_ms"),
        ("memcached", "breaker_failures"),
        ("memcached", "breaker_cooldown_ms"),
        ("memcached", "max_idle"),
        ("keys", "prefix"),
        ("keys", "query"),
        ("keys", "merge_slashes"),
        ("keys", "host"),
        ("cache", "ttl_secs"),
        ("cache", "include"),
        ("cache", "exclude"),
        ("cache", "session_cookies"),
        ("cache", "content_types"),
        ("cache", "allowed_hosts"),
        ("cache", "max_body_bytes"),
        ("cache", "gzip"),
        ("cache", "gzip_flag"),
        ("cache", "index_namespace"),
        ("cache", "index_shards"),
        ("cache", "index_shard_max_bytes"),
        ("nginx", "listen"),
        ("nginx", "app"),
        ("nginx", "keepalive"),
        ("nginx", "buffer_size"),
        ("nginx", "charset"),
        ("proxy", "listen"),
        ("proxy", "upstream"),
        ("proxy", "invalidate_token"),
        ("proxy", "journal"),
        ("invalidation", "write_window_ms"),
        ("invalidation", "retry_min_ms"),
        ("invalidation", "retry_max_ms"),
        ("invalidation", "pending_limit"),
        ("invalidation", "max_waiting"),
    ]
}

/// A TOML basic string holding `text` exactly.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Valid TOML values of every shape, many of them bad for the field they land in.
fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![0i64, 1, -1, 65535, 65536, 1 << 32, 2_592_001, 524_289])
            .prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        (-1e9f64..1e9).prop_map(|f| format!("{f:.3}")),
        ".{0,30}".prop_map(|s| toml_string(&s)),
        prop::sample::select(vec![
            "127.0.0.1:11211",
            "127.0.0.1",
            ":11211",
            "h:99999",
            "h:1 weight=0",
            "h:1 weight=x",
            "h:1 max_fails=3",
            "unix:/tmp/m.sock",
            "(",
            "a{1000}{1000}",
            "64kb",
            "64k",
            "",
            "a b",
            "%",
            "consistent",
            "modulo",
            "ketama",
            "include",
            "bypass",
            "http://x:1",
            "[::1]",
            "a/b",
            "..",
            "text/html",
        ])
        .prop_map(toml_string),
    ];
    scalar.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            (inner.clone(), any::<u16>()).prop_map(|(address, weight)| format!(
                "{{ address = {address}, weight = {weight} }}"
            )),
        ]
    })
}

fn config_doc() -> impl Strategy<Value = (String, Vec<(String, String)>)> {
    let line = (prop::sample::select(known_fields()), toml_value());
    prop::collection::vec(line, 1..4).prop_map(|lines| {
        // A key or a table written twice is a TOML error naming no field:
        // each field once, each section once.
        let mut sections: std::collections::BTreeMap<&str, Vec<(&str, String)>> =
            std::collections::BTreeMap::new();
        for ((section, field), value) in lines {
            let fields = sections.entry(section).or_default();
            if !fields.iter().any(|(f, _)| *f == field) {
                fields.push((field, value));
            }
        }
        let mut text = String::new();
        let mut named = Vec::new();
        for (section, fields) in sections {
            text.push_str(&format!("[{section}]\n"));
            for (field, value) in fields {
                text.push_str(&format!("{field} = {value}\n"));
                named.push((format!("{section}.{field}"), field.to_owned()));
            }
        }
        (text, named)
    })
}

/// Write `text` to a fresh file and load it the way `Config::load` does.
fn load_config(dir: &std::path::Path, n: usize, text: &[u8]) -> Result<Config, String> {
    let path = dir.join(format!("mcpage-{n}.toml"));
    std::fs::write(&path, text).expect("write config");
    let loaded = Config::figment_from(&path)
        .extract::<Config>()
        .map_err(|e| e.to_string())
        .and_then(|config| {
            config
                .validate()
                .map(|()| config)
                .map_err(|e| e.to_string())
        });
    let _ = std::fs::remove_file(&path);
    loaded
}

fn config_dir(test: &str) -> tempfile::TempDir {
    mcpage_tests::temp_dir(&format!("hostile-{test}"))
}

#[test]
fn config_errors_name_the_field() {
    let temp = config_dir("named");
    let dir = temp.path();
    // One bad value at a time: the error names the field.
    let long_prefix = format!("[keys]\nprefix = \"{}\"\n", "p".repeat(250));
    let long_namespace = format!("[cache]\nindex_namespace = \"{}\"\n", "n".repeat(212));
    let fixed: Vec<(&str, &str)> = vec![
        (&long_prefix, "keys.prefix"),
        (&long_namespace, "cache.index_namespace"),
        ("[memcached]\nservers = []\n", "memcached.servers"),
        (
            "[memcached]\nservers = [\"127.0.0.1\"]\n",
            "memcached.servers[0]",
        ),
        (
            "[memcached]\nservers = [\"h:1 weight=0\"]\n",
            "memcached.servers[0]",
        ),
        ("[memcached]\nservers = [\"h:1 max_fails=3\"]\n", "servers"),
        ("[memcached]\nservers = \"127.0.0.1:11211\"\n", "servers"),
        (
            "[memcached]\nindex_servers = [\"x\"]\n",
            "memcached.index_servers[0]",
        ),
        ("[memcached]\nhashing = \"ketama\"\n", "hashing"),
        ("[memcached]\ntimeout_ms = 0\n", "memcached.timeout_ms"),
        (
            "[proxy]\nupstream_timeout_ms = 0\n",
            "proxy.upstream_timeout_ms",
        ),
        ("[memcached]\ntimeout_ms = -1\n", "timeout_ms"),
        ("[keys]\nprefix = \"a b\"\n", "keys.prefix"),
        ("[keys]\nquery = \"sometimes\"\n", "query"),
        ("[cache]\nttl_secs = 0\n", "cache.ttl_secs"),
        ("[cache]\nttl_secs = \"1h\"\n", "ttl_secs"),
        ("[cache]\nttl_secs = 99999999999\n", "ttl_secs"),
        ("[cache]\ninclude = [\"^/\", \"(\"]\n", "cache.include[1]"),
        (
            "[cache]\nexclude = [\"a{1000}{1000}{1000}\"]\n",
            "cache.exclude[0]",
        ),
        ("[cache]\ncontent_types = []\n", "cache.content_types"),
        ("[cache]\ngzip = true\ngzip_flag = 3\n", "cache.gzip_flag"),
        ("[cache]\nindex_shards = 0\n", "cache.index_shards"),
        (
            "[cache]\nindex_shard_max_bytes = 2000000\n",
            "cache.index_shard_max_bytes",
        ),
        ("[cache]\nallowed_hosts = []\n", "cache.allowed_hosts"),
        (
            "[cache]\nallowed_hosts = [\"Example.com:8080\"]\n",
            "cache.allowed_hosts[0]",
        ),
        (
            "[memcached]\nservers = [\"localhost:11211\"]\n",
            "memcached.servers[0]",
        ),
        (
            "[keys]\nhost = true\n[cache]\nallowed_hosts = [\"a/b\"]\n",
            "cache.allowed_hosts[0]",
        ),
        ("[nginx]\nbuffer_size = \"64kb\"\n", "nginx.buffer_size"),
        ("[cache]\nttl = 5\n", "ttl"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ];
    for (n, (text, field)) in fixed.iter().enumerate() {
        let error = load_config(dir, n, text.as_bytes()).expect_err(&format!("accepted {text:?}"));
        assert!(
            error.contains(field),
            "{text:?}: error {error:?} does not name `{field}`"
        );
    }

    // The longest accepted prefix and namespace still give valid keys.
    let config = load_config(
        dir,
        999,
        format!(
            "[keys]\nprefix = \"{}\"\n[cache]\nindex_namespace = \"{}\"\n",
            "p".repeat(249),
            "n".repeat(211)
        )
        .as_bytes(),
    )
    .expect("the longest prefix and namespace");
    assert_eq!(config.keys.prefix.len(), 249);

    // Generated documents with valid TOML values, many wrong for their field:
    // either accepted or refused naming one of the fields written.
    let refused = Count::default();
    let total = cases(2_000);
    let n = Count(Cell::new(fixed.len()));
    runner(total)
        .run(&config_doc(), |(text, fields)| {
            if let Err(error) = load_config(dir, n.bump(), text.as_bytes()) {
                refused.bump();
                // `keys.host = true` without allowed hosts names cache.allowed_hosts.
                let named = fields.iter().any(|(dotted, leaf)| {
                    error.contains(dotted.as_str()) || error.contains(leaf.as_str())
                }) || error.contains("cache.allowed_hosts");
                prop_assert!(named, "{:?}\n-> {}", text, error);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(dir);
    println!(
        "hostile: {} fixed bad values each named their field; {total} generated configs, \
         {} refused, each naming a field it set",
        fixed.len(),
        refused.get()
    );
}

#[test]
fn any_config_text_is_an_error_or_a_config_never_a_panic() {
    let temp = config_dir("any");
    let dir = temp.path();
    let mut hostile: Vec<Vec<u8>> = vec![
        format!("[cache]\ninclude = {}\n", "[".repeat(100_000)).into_bytes(),
        format!("a = {}1{}\n", "[".repeat(5_000), "]".repeat(5_000)).into_bytes(),
        format!("[keys]\nprefix = {}\n", toml_string(&"p".repeat(1 << 20))).into_bytes(),
        format!(
            "[cache]\nindex_namespace = {}\n",
            toml_string(&"n".repeat(300))
        )
        .into_bytes(),
        format!(
            "[cache]\ninclude = [{}]\n",
            toml_string(&"(a|b)*".repeat(100_000))
        )
        .into_bytes(),
        b"[cache]\nttl_secs = 1e400\n".to_vec(),
        b"[memcached]\nservers = [\"\xff\xfe:1\"]\n".to_vec(),
        b"\0\0\0[\0]".to_vec(),
        b"[memcached\nservers = [".to_vec(),
        format!("{}\n", "[a.b.c.d]".repeat(10_000)).into_bytes(),
        b"[memcached]\nservers = [{ address = \"h:1\", weight = 4294967296 }]\n".to_vec(),
        b"[memcached]\nservers = [{ address = \"h:1\", weight = 1001 }]\n".to_vec(),
        b"[cache]\nmax_body_bytes = 18446744073709551615\n".to_vec(),
        b"[nginx]\nbuffer_size = \"99999999999999999999999k\"\n".to_vec(),
    ];
    let accepted_prefix = load_config(dir, 0, &hostile[2]).is_ok();
    let accepted_namespace = load_config(dir, 0, &hostile[3]).is_ok();
    for (n, text) in hostile.drain(..).enumerate() {
        let _ = load_config(dir, n, &text);
    }
    let line = prop_oneof![
        3 => (prop::sample::select(known_fields()), toml_value())
            .prop_map(|((s, f), v)| format!("[{s}]\n{f} = {v}")),
        1 => "[\\[\\]\"'=a-z_.{}, 0-9#\\\\\n-]{0,40}",
        1 => any::<String>(),
    ];
    let total = cases(2_000);
    let ok = Count::default();
    let n = Count(Cell::new(100));
    runner(total)
        .run(&prop::collection::vec(line, 0..5), |lines| {
            if load_config(dir, n.bump(), lines.join("\n").as_bytes()).is_ok() {
                ok.bump();
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(dir);
    println!(
        "hostile: 14 hostile config files (100,000 nested arrays, a 1 MB prefix, a huge regex, ...) \
         and {total} generated ones: no panic, {} accepted; a 1 MB keys.prefix is {}, \
         a 300-byte cache.index_namespace is {}",
        ok.get(),
        if accepted_prefix {
            "accepted"
        } else {
            "refused"
        },
        if accepted_namespace {
            "accepted"
        } else {
            "refused"
        },
    );
    assert!(
        !accepted_prefix,
        "a key prefix no key can fit behind must be refused"
    );
    assert!(
        !accepted_namespace,
        "an index namespace no index key can fit behind must be refused"
    );
}

// ---------------------------------------------------------------------------
// pages over memcached's item limit
// ---------------------------------------------------------------------------

async fn page_over_the_item_limit(gzip: bool) {
    let big = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = Arc::new(mcpage_tests::random_text(2 << 20, 7));
    let stack = stack(|c| {
        c.cache.max_body_bytes = 4 << 20;
        c.cache.gzip = gzip;
    })
    .memcached_args(&["-I", "1m"])
    .app(|cache| {
        Router::new()
            .fallback({
                let big = Arc::clone(&big);
                move || async move {
                    let page = if big.load(std::sync::atomic::Ordering::SeqCst) {
                        body.to_vec()
                    } else {
                        b"<p>small old version</p>".to_vec()
                    };
                    (
                        CacheTags::new(["grow"]),
                        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        page,
                    )
                }
            })
            .layer(PageCacheLayer::new(cache.clone()))
    })
    .start()
    .await;
    let (memcached, cache, nginx, app) = (
        &stack.memcached()[0],
        stack.cache(),
        stack.nginx(),
        stack.app(),
    );
    let key = cache.page_key(None, b"/grow").expect("key").escaped;

    // The small version is cached and served by nginx.
    assert_eq!(
        get(&nginx.url("/grow"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    cache.wait_for_writes().await;
    let hit = get(&nginx.url("/grow"), &[]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert!(memcached.get_raw(&key).is_some());

    // The page grows past 1 MiB; a request reaches the app (say nginx timed out
    // on memcached): the user gets the whole page, memcached refuses it.
    big.store(true, std::sync::atomic::Ordering::SeqCst);
    let errors_before = cache.stats().store_errors;
    let direct = get(&format!("http://{}/grow", app.address()), &[]).await;
    assert_eq!(direct.status, 200);
    assert_eq!(direct.header("x-cache"), Some("MISS"));
    assert_eq!(direct.body.len(), 2 << 20);
    assert!(
        direct.body == mcpage_tests::random_text(2 << 20, 7),
        "the whole page"
    );
    cache.wait_for_writes().await;
    let stats = cache.stats();
    assert_eq!(
        stats.store_errors,
        errors_before + 1,
        "the refusal is counted: {stats:?}"
    );
    assert!(
        memcached.get_raw(&key).is_none(),
        "the old small version survived as a stale page"
    );
    // nginx now misses and the user gets the big page from the app.
    let after = get(&nginx.url("/grow"), &[]).await;
    assert_eq!(after.status, 200);
    assert_ne!(after.header("x-cache"), Some("HIT"));
    assert_eq!(after.body.len(), 2 << 20);
    assert!(
        !stats.servers.iter().any(|s| s.breaker_open),
        "a refused item is not a server failure"
    );
    println!(
        "hostile: 2 MB page (gzip {}) over memcached's 1 MiB item limit: served whole, \
         store_errors +1, the older cached version is gone (a miss, not a stale page)",
        if gzip {
            "on: random text, still over 1 MiB compressed"
        } else {
            "off"
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_over_the_item_limit_are_served_and_leave_no_stale_version() {
    page_over_the_item_limit(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_pages_over_the_item_limit_are_served_and_leave_no_stale_version() {
    page_over_the_item_limit(true).await;
}

// ---------------------------------------------------------------------------
// Host header games
// ---------------------------------------------------------------------------

/// The page names the host it was rendered for, as an app that follows RFC
/// 9112 does: the request target's authority, else the Host header.
async fn host_page(OriginalUri(uri): OriginalUri, headers: HeaderMap) -> Response {
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("host={host} path={}", uri.path()),
    )
        .into_response()
}

/// The normalized host a body names.
fn host_in(body: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let host = text.strip_prefix("host=")?.split(" path=").next()?;
    nginx_host(host.as_bytes())
}

/// One raw exchange (HTTP/1.0 or anything else): status and body.
async fn raw_exchange(address: &str, request: &[u8]) -> (u16, Vec<u8>) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("answer within 30 s")
        .expect("exchange");
    let status = std::str::from_utf8(&answer[..answer.len().min(12)])
        .ok()
        .and_then(|s| s.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or_else(Vec::new, |i| answer[i + 4..].to_vec());
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_games_never_serve_another_hosts_page() {
    // The router nginx's app serves, also called in process below.
    let mut served = None;
    let stack = stack(|c| {
        c.keys.host = true;
        c.cache.allowed_hosts = vec!["a.test".to_owned(), "b.test".to_owned()];
    })
    .app(|cache| {
        let router = Router::new()
            .fallback(host_page)
            .layer(PageCacheLayer::new(cache.clone()));
        served = Some(router.clone());
        router
    })
    .start()
    .await;
    let router = served.expect("the app was built");
    let (memcached, cache, nginx, app) = (
        &stack.memcached()[0],
        stack.cache(),
        stack.nginx(),
        stack.app(),
    );
    let authority = nginx.address().to_owned();

    // Cache both allowed hosts' pages first, so a mix-up would show.
    for host in ["a.test", "b.test"] {
        let first = request_target("GET", &authority, b"/page", &[("host", host)], b"")
            .await
            .expect("request");
        assert_eq!(first.header("x-cache"), Some("MISS"));
    }
    cache.wait_for_writes().await;

    // (Host header, request target, the host nginx keys on: $host)
    let games: Vec<(&str, &str, &str)> = vec![
        ("a.test", "/page", "a.test"),
        ("A.TEST", "/page", "a.test"),
        ("a.test:8080", "/page", "a.test"),
        ("a.test.", "/page", "a.test"),
        ("A.Test.:80", "/page", "a.test"),
        ("b.test", "/page", "b.test"),
        ("b.test", "http://a.test/page", "a.test"),
        ("a.test", "http://b.test/page", "b.test"),
        ("a.test", "http://evil.test/page", "evil.test"),
        ("evil.test", "http://a.test/page", "a.test"),
        ("evil.test", "/page", "evil.test"),
        ("[::1]:8080", "/page", "[::1]"),
        ("[::1]", "/page", "[::1]"),
        ("a.test,b.test", "/page", "a.test,b.test"),
        ("a.test@b.test", "/page", "a.test@b.test"),
        ("a.test:80:80", "/page", "a.test"),
        ("127.0.0.1", "/page", "127.0.0.1"),
    ];
    let mut hits = 0;
    for (host, target, keyed) in &games {
        let response = request_target("GET", &authority, target.as_bytes(), &[("host", host)], b"")
            .await
            .expect("request");
        if response.status != 200 {
            assert_eq!(response.status, 400, "{host} {target}");
            continue;
        }
        if response.header("x-cache") == Some("HIT") {
            hits += 1;
            assert_eq!(
                host_in(&response.body).as_deref(),
                Some(keyed.as_bytes()),
                "Host {host} target {target}: served {}",
                response.text()
            );
        }
    }
    // No Host at all (HTTP/1.0), and two Host headers.
    // Without a Host, nginx's `$host` is its first `server_name` (a.test): the
    // request is a.test's, and may get a.test's page, never another host's.
    let (status, body) = raw_exchange(&authority, b"GET /page HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(
        !String::from_utf8_lossy(&body).contains("host=b.test"),
        "{body:?}"
    );
    let (status, _) = raw_exchange(
        &authority,
        b"GET /page HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "two Host headers");

    // The app reached directly (not through nginx), absolute-form targets
    // naming one host with a Host header naming another.
    for (host, target) in [
        ("a.test", "http://A.TEST./direct-same"),
        ("a.test", "http://b.test/direct"),
        ("b.test", "http://a.test/direct"),
        ("a.test", "http://evil.test/direct"),
        ("evil.test", "http://a.test/direct2"),
    ] {
        let response = request_target(
            "GET",
            &app.address(),
            target.as_bytes(),
            &[("host", host)],
            b"",
        )
        .await
        .expect("request");
        assert_eq!(response.status, 200);
    }
    // In process, too: an HTTP/2-style request with an authority and no Host.
    let request = Request::get("http://b.test/inproc")
        .body(Body::empty())
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), 200);
    cache.wait_for_writes().await;

    // Every stored page is under an allowed host and names that same host.
    let mut stored = Vec::new();
    for key in memcached.keys() {
        if key.starts_with(b"mcpage:") {
            continue;
        }
        let keyed_host = key
            .split(|b| *b == b'/')
            .next()
            .unwrap_or_default()
            .to_vec();
        assert!(
            keyed_host == b"a.test" || keyed_host == b"b.test",
            "stored for a host that is not allowed: {}",
            String::from_utf8_lossy(&key)
        );
        let (_, body) = memcached.get_raw(&key).expect("listed key");
        assert_eq!(
            host_in(&body).as_deref(),
            Some(&keyed_host[..]),
            "{} holds {}",
            String::from_utf8_lossy(&key),
            String::from_utf8_lossy(&body)
        );
        stored.push(String::from_utf8_lossy(&key).into_owned());
    }
    stored.sort();
    println!(
        "hostile: {} Host games through nginx ({hits} hits, each the page of the host nginx keyed on), \
         no Host, two Hosts, absolute-form straight to the app: stored only {stored:?}, \
         each naming its own host",
        games.len()
    );
}
