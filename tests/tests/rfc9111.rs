//! Issue 11 end to end, through real nginx: a page is stored only for its
//! remaining freshness (RFC 9111 4.2), never against a targeted field
//! (RFC 9213), only when the hit nginx builds equals the miss (Content-Type,
//! security headers), never for a request that says `no-store` (RFC 9111
//! 5.2.1.5), and an unsafe method invalidates what it changed (RFC 9111 4.4)
//! before its response goes back.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::OriginalUri;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use mcpage::{Bypass, Cache, PageCacheLayer};
use mcpage_tests::{Memcached, Nginx, Stack, get, request};

const HTML: &str = "text/html; charset=utf-8";

/// One page: the headers the app sends, and what must happen to it.
struct Case {
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// `Ok(range of the TTL in memcached)` or the bypass reason.
    expected: Result<(u64, u64), Bypass>,
}

/// `{now}`, `{now+N}`, `{now-N}` in a header value become HTTP dates at render time.
const CASES: &[Case] = &[
    Case {
        path: "/c/plain",
        headers: &[],
        expected: Ok((3590, 3600)),
    },
    Case {
        path: "/c/max-age",
        headers: &[("cache-control", "max-age=60")],
        expected: Ok((55, 60)),
    },
    Case {
        path: "/c/s-maxage",
        headers: &[("cache-control", "max-age=5, s-maxage=120")],
        expected: Ok((115, 120)),
    },
    Case {
        path: "/c/age-over",
        headers: &[("cache-control", "max-age=3600"), ("age", "7200")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/age-part",
        headers: &[("cache-control", "max-age=3600"), ("age", "3000")],
        expected: Ok((590, 600)),
    },
    Case {
        path: "/c/date-old",
        headers: &[("cache-control", "max-age=600"), ("date", "{now-300}")],
        expected: Ok((290, 300)),
    },
    Case {
        path: "/c/expires",
        headers: &[("expires", "{now+600}"), ("date", "{now}")],
        expected: Ok((590, 600)),
    },
    Case {
        path: "/c/expires-past",
        headers: &[("expires", "{now-1}"), ("date", "{now}")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/expires-date",
        headers: &[("expires", "{now}"), ("date", "{now}")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/expires-0",
        headers: &[("expires", "0")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/expires-2digit",
        headers: &[("expires", "Sunday, 06-Nov-94 08:49:37 GMT")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/expires-tz",
        headers: &[("expires", "Thu, 01 Jan 2099 00:00:00 EST")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/max-age-negative",
        headers: &[("cache-control", "max-age=-3600")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/max-age-single-quoted",
        headers: &[("cache-control", "max-age='3600'")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/max-age-abc",
        headers: &[("cache-control", "max-age=abc")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/max-age-fraction",
        headers: &[("cache-control", "max-age=1.5")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/s-maxage-negative",
        headers: &[("cache-control", "s-maxage=-1")],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/private-semicolon",
        headers: &[("cache-control", "private; max-age=0")],
        expected: Err(Bypass::CacheControl),
    },
    Case {
        path: "/c/no-store-x",
        headers: &[("cache-control", "no-store;x")],
        expected: Err(Bypass::CacheControl),
    },
    Case {
        path: "/c/cdn-no-store",
        headers: &[("cdn-cache-control", "no-store")],
        expected: Err(Bypass::TargetedField),
    },
    Case {
        path: "/c/cdn-private",
        headers: &[("cdn-cache-control", "private")],
        expected: Err(Bypass::TargetedField),
    },
    Case {
        path: "/c/cdn-max-age-0",
        headers: &[
            ("cache-control", "max-age=600"),
            ("cdn-cache-control", "max-age=0"),
        ],
        expected: Err(Bypass::Stale),
    },
    Case {
        path: "/c/cdn-wins",
        headers: &[
            ("cache-control", "no-cache"),
            ("cdn-cache-control", "max-age=60"),
        ],
        expected: Ok((55, 60)),
    },
    Case {
        path: "/c/surrogate-no-store",
        headers: &[("surrogate-control", "no-store")],
        expected: Err(Bypass::TargetedField),
    },
    Case {
        path: "/c/own-field",
        headers: &[
            ("mcpage-cache-control", "max-age=30"),
            ("cdn-cache-control", "no-store"),
        ],
        expected: Ok((25, 30)),
    },
    Case {
        path: "/c/latin1",
        headers: &[("content-type", "text/html; charset=iso-8859-1")],
        expected: Err(Bypass::ContentTypeDiffers),
    },
    Case {
        path: "/c/text-plain",
        headers: &[("content-type", "text/plain; charset=utf-8")],
        expected: Err(Bypass::ContentTypeDiffers),
    },
    Case {
        path: "/c/json-at-html",
        headers: &[("content-type", "application/json; charset=utf-8")],
        expected: Err(Bypass::ContentTypeDiffers),
    },
    Case {
        path: "/c/data.json",
        headers: &[("content-type", "application/json; charset=utf-8")],
        expected: Ok((3590, 3600)),
    },
    Case {
        path: "/c/data2.json",
        headers: &[("content-type", "application/json")],
        expected: Err(Bypass::ContentTypeDiffers),
    },
    Case {
        path: "/c/robots.txt",
        headers: &[("content-type", "text/plain; charset=utf-8")],
        expected: Ok((3590, 3600)),
    },
    Case {
        path: "/c/nosniff",
        headers: &[("x-content-type-options", "nosniff")],
        expected: Err(Bypass::HeaderDiffers),
    },
    Case {
        path: "/c/attachment",
        headers: &[("content-disposition", "attachment")],
        expected: Err(Bypass::HeaderDiffers),
    },
    Case {
        path: "/c/csp",
        headers: &[("content-security-policy", "default-src 'none'")],
        expected: Err(Bypass::HeaderDiffers),
    },
    Case {
        path: "/c/frame-sameorigin",
        headers: &[("x-frame-options", "SAMEORIGIN")],
        expected: Err(Bypass::HeaderDiffers),
    },
];

fn http_date(spec: &str, now: SystemTime) -> String {
    let Some(inner) = spec.strip_prefix("{now").and_then(|s| s.strip_suffix('}')) else {
        return spec.to_owned();
    };
    let at = match (inner.strip_prefix('+'), inner.strip_prefix('-')) {
        (Some(n), _) => now + Duration::from_secs(n.parse().expect("offset")),
        (_, Some(n)) => now - Duration::from_secs(n.parse().expect("offset")),
        _ => now,
    };
    httpdate::fmt_http_date(at)
}

/// The app: `/c/*` answers as its case says (with `X-Frame-Options: DENY`,
/// which the config adds to every hit, unless the case sets it); `POST`
/// answers per path (see `unsafe_methods_invalidate_...`); the rest is a page.
async fn app(method: Method, OriginalUri(uri): OriginalUri) -> Response {
    let path = uri.path().to_owned();
    if method != Method::GET && method != Method::HEAD {
        let status = if path.ends_with("/fail") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::SEE_OTHER
        };
        let mut response = (status, "posted").into_response();
        let headers = response.headers_mut();
        headers.insert("location", HeaderValue::from_static("/articles/1#comments"));
        if let Ok(value) = HeaderValue::from_str(
            uri.query()
                .and_then(|q| q.strip_prefix("cl="))
                .unwrap_or("/articles/2"),
        ) {
            headers.insert("content-location", value);
        }
        return response;
    }
    let mut response = format!("<p>{path}</p>").into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static(HTML));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    if let Some(case) = CASES.iter().find(|c| c.path == path) {
        let now = SystemTime::now();
        for (name, value) in case.headers {
            let name = HeaderName::from_static(name);
            let value = HeaderValue::from_str(&http_date(value, now)).expect("value");
            headers.insert(name, value);
        }
    }
    response
}

/// The stack of these tests: one memcached, several content types, one fixed header.
struct Site {
    stack: Stack,
}

impl Site {
    async fn start() -> Site {
        let stack = Stack::builder()
            .config(|config| {
                config.memcached.timeout_ms = 500;
                config.cache.content_types = vec![
                    "text/html".into(),
                    "application/json".into(),
                    "text/plain".into(),
                ];
                config.nginx.add_headers = vec![("X-Frame-Options".into(), "DENY".into())];
            })
            .app(|cache| {
                Router::new()
                    .fallback(app)
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

    fn nginx(&self) -> &Nginx {
        self.stack.nginx()
    }

    fn key(&self, target: &str) -> Vec<u8> {
        self.cache()
            .page_key(None, target.as_bytes())
            .expect("cacheable target")
            .escaped
    }

    fn stored(&self, target: &str) -> bool {
        self.memcached().get_raw(&self.key(target)).is_some()
    }

    /// The remaining TTL memcached holds for the page (`mg <key> t`).
    fn ttl(&self, target: &str) -> Option<u64> {
        let mut stream = TcpStream::connect(self.memcached().address()).expect("connect");
        let mut command = b"mg ".to_vec();
        command.extend_from_slice(&self.key(target));
        command.extend_from_slice(b" t\r\n");
        stream.write_all(&command).expect("write");
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).expect("read");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix('t'))
            .and_then(|t| t.parse().ok())
    }

    fn bypass_count(&self, reason: Bypass) -> u64 {
        self.cache()
            .stats()
            .bypass
            .iter()
            .find(|b| b.reason == reason)
            .map_or(0, |b| b.count)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_fresh_identical_representations_are_stored_for_their_remaining_lifetime() {
    let stack = Site::start().await;
    let mut expected_bypasses = std::collections::HashMap::<Bypass, u64>::new();
    for case in CASES {
        let miss = get(&stack.nginx().url(case.path), &[]).await;
        assert_eq!(miss.status, 200, "{}", case.path);
        stack.cache().wait_for_writes().await;
        match case.expected {
            Ok((low, high)) => {
                assert_eq!(miss.header("x-cache"), Some("MISS"), "{}", case.path);
                let ttl = stack.ttl(case.path);
                assert!(
                    ttl.is_some_and(|t| (low..=high).contains(&t)),
                    "{}: TTL {ttl:?}, expected {low}..={high}",
                    case.path
                );
                let hit = get(&stack.nginx().url(case.path), &[]).await;
                assert_eq!(hit.header("x-cache"), Some("HIT"), "{}", case.path);
                assert_eq!(hit.body, miss.body, "{}", case.path);
                for name in ["content-type", "x-frame-options"] {
                    assert_eq!(hit.header(name), miss.header(name), "{}: {name}", case.path);
                }
            }
            Err(reason) => {
                assert_eq!(miss.header("x-cache"), Some("BYPASS"), "{}", case.path);
                assert!(!stack.stored(case.path), "{} was stored", case.path);
                *expected_bypasses.entry(reason).or_default() += 1;
            }
        }
    }
    for (reason, count) in &expected_bypasses {
        assert_eq!(stack.bypass_count(*reason), *count, "{reason}");
    }
    println!(
        "{} cases through nginx: {} stored for their remaining lifetime, {} not stored ({:?})",
        CASES.len(),
        CASES.iter().filter(|c| c.expected.is_ok()).count(),
        expected_bypasses.values().sum::<u64>(),
        expected_bypasses
    );
}

/// RFC 9111 5.2.1.5: the response to a request with `Cache-Control:
/// no-store` is never stored, while a page stored before still answers such
/// a request (the directive does not apply to it). A browser's reload
/// (`max-age=0`, `no-cache`) only states a preference (5.2.1): stored as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_store_request_is_answered_but_its_response_never_stored() {
    let stack = Site::start().await;
    let page = "/no-store/article";
    for value in ["no-store", "max-age=0, No-Store"] {
        let miss = get(&stack.nginx().url(page), &[("cache-control", value)]).await;
        assert_eq!(miss.status, 200, "{value}");
        assert_eq!(miss.header("x-cache"), Some("BYPASS"), "{value}");
        stack.cache().wait_for_writes().await;
        assert!(!stack.stored(page), "stored after {value}");
    }
    assert_eq!(stack.bypass_count(Bypass::RequestNoStore), 2);

    let reload = get(&stack.nginx().url(page), &[("cache-control", "max-age=0")]).await;
    assert_eq!(reload.header("x-cache"), Some("MISS"));
    stack.cache().wait_for_writes().await;
    assert!(stack.stored(page));

    let hit = get(&stack.nginx().url(page), &[("cache-control", "no-store")]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.body, reload.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_target_location_and_content_location_before_answering() {
    let stack = Site::start().await;
    let pages = ["/comments", "/articles/1", "/articles/2", "/articles/3"];
    let warm = |stack: &Site| {
        let urls: Vec<String> = pages.iter().map(|p| stack.nginx().url(p)).collect();
        async move {
            for url in &urls {
                get(url, &[]).await;
            }
        }
    };
    warm(&stack).await;
    stack.cache().wait_for_writes().await;
    for page in pages {
        assert!(stack.stored(page), "{page}");
    }

    // A failed POST changes nothing.
    let failed = request("POST", &stack.nginx().url("/comments/fail"), &[], b"x").await;
    assert_eq!(failed.status, 400);
    for page in pages {
        assert!(stack.stored(page), "{page} after a 400");
    }

    // 303 to /articles/1, Content-Location on another host: the target and
    // the Location are gone when the response arrives, the other host's
    // /articles/3 (the same path here) stays.
    let other = request(
        "POST",
        &stack
            .nginx()
            .url("/comments?cl=http://evil.example/articles/3"),
        &[],
        b"x",
    )
    .await;
    assert_eq!(other.status, 303);
    // The target has a query string: not a page (keys.query = "bypass").
    assert!(!stack.stored("/articles/1"));
    assert!(stack.stored("/articles/3"));
    assert!(stack.stored("/articles/2"));

    // A same-site absolute Content-Location counts; so does the target.
    let same_site = format!("http://{}/articles/2", stack.nginx().address());
    let posted = request(
        "POST",
        &stack.nginx().url(&format!("/comments?cl={same_site}")),
        &[],
        b"x",
    )
    .await;
    assert_eq!(posted.status, 303);
    assert!(!stack.stored("/articles/2"));
    let put = request("PUT", &stack.nginx().url("/comments"), &[], b"x").await;
    assert_eq!(put.status, 303);
    assert!(!stack.stored("/comments"));
    assert!(stack.stored("/articles/3"));
    // The redirect's GET is rendered afresh, not served from memcached.
    let after = get(&stack.nginx().url("/articles/1"), &[]).await;
    assert_eq!(after.header("x-cache"), Some("MISS"));

    // What it costs a POST: invalidating 2-3 URLs vs. a POST that invalidates
    // nothing (400), straight to the app (no nginx), sequential.
    let direct = format!("http://{}", stack.stack.app().address());
    let mut figures = Vec::new();
    for path in ["/comments/fail", "/comments"] {
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..200 {
            let start = Instant::now();
            request("POST", &format!("{direct}{path}"), &[], b"x").await;
            times.push(start.elapsed());
        }
        times.sort();
        figures.push((path, times[times.len() / 2], times[times.len() * 99 / 100]));
    }
    println!(
        "POST cost, 200 sequential each, median/p99: no invalidation (400) {:?}/{:?}, \
         invalidating target + Location + Content-Location (303) {:?}/{:?}",
        figures[0].1, figures[0].2, figures[1].1, figures[1].2
    );
}
