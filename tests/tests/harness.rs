//! Smoke tests of the harness itself, and of the rendered nginx config
//! against a real nginx and a real memcached.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get as get_route;
use mcpage::Config;
use mcpage::ServerSpec;
use mcpage_tests::{Memcached, Stack, get, gzip, request, request_target, wait_until};

const EVENTUALLY: Duration = Duration::from_secs(10);

/// One request as the app saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().expect("recorder lock").clone()
    }

    fn count(&self) -> usize {
        self.0.lock().expect("recorder lock").len()
    }

    fn last(&self) -> Seen {
        self.seen().last().cloned().expect("the app saw a request")
    }
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn record(
    State(recorder): State<Recorder>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.to_string(), ToString::to_string);
    let reply = format!("app:{method} {target}");
    recorder.0.lock().expect("recorder lock").push(Seen {
        method: method.to_string(),
        target,
        body: body.to_vec(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
    (
        StatusCode::OK,
        [
            ("content-type", "text/html; charset=utf-8"),
            ("x-cache", "MISS"),
        ],
        reply,
    )
}

/// memcached + the recording app + nginx in front of both.
async fn stack(change: impl FnOnce(&mut Config)) -> (Stack, Recorder) {
    let recorder = Recorder::default();
    let router = Router::new()
        .route("/_mcpage/health", get_route(|| async { "ok" }))
        .fallback(record)
        .with_state(recorder.clone());
    let stack = Stack::builder()
        .config(change)
        .app(|_| router)
        .start()
        .await;
    (stack, recorder)
}

#[track_caller]
fn assert_hit(response: &mcpage_tests::Response, body: &str) {
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    assert_eq!(response.header("x-cache"), Some("HIT"), "{response:?}");
    assert_eq!(response.text(), body);
}

#[track_caller]
fn assert_from_app(response: &mcpage_tests::Response, expected_body: &str) {
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    assert_eq!(response.text(), expected_body, "{response:?}");
    let x_cache: Vec<_> = response.headers.get_all("x-cache").iter().collect();
    assert_eq!(x_cache, ["MISS"], "only the app's X-Cache: {response:?}");
}

#[test]
fn memcached_start_set_get_keys_stats() {
    let memcached = Memcached::start();
    assert!(memcached.address().starts_with("127.0.0.1:"));
    assert_eq!(
        memcached.address(),
        format!("127.0.0.1:{}", memcached.port())
    );
    assert_eq!(memcached.get_raw(b"/nothing"), None);
    memcached.set_raw(b"/hello", 0, b"hello\r\nEND\r\n");
    memcached.set_raw(b"/caf\xC3\xA9", 2, b"");
    memcached.set_raw(b"/100%25", 7, b"x");
    assert_eq!(
        memcached.get_raw(b"/hello"),
        Some((0, b"hello\r\nEND\r\n".to_vec()))
    );
    assert_eq!(memcached.get_raw(b"/caf\xC3\xA9"), Some((2, Vec::new())));
    let mut keys = memcached.keys();
    keys.sort();
    assert_eq!(
        keys,
        [
            b"/100%25".to_vec(),
            b"/caf\xC3\xA9".to_vec(),
            b"/hello".to_vec()
        ]
    );
    let stats = memcached.stats();
    assert_eq!(
        stats.get("curr_items").map(String::as_str),
        Some("3"),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("pid").map(String::as_str),
        memcached.pid().map(|p| p.to_string()).as_deref()
    );
    assert!(memcached.delete_raw(b"/hello"));
    assert!(!memcached.delete_raw(b"/hello"));
    memcached.flush_all();
    assert_eq!(memcached.get_raw(b"/100%25"), None);
}

#[test]
fn memcached_stop_restart_pause_resume() {
    let memcached = Memcached::start_with(&["-c", "500"]);
    let port = memcached.port();
    assert_eq!(
        memcached.stats().get("max_connections").map(String::as_str),
        Some("500")
    );
    memcached.set_raw(b"k", 0, b"v");

    memcached.pause();
    assert!(
        !memcached.is_responsive(Duration::from_millis(200)),
        "a paused memcached answered"
    );
    memcached.resume();
    assert!(memcached.is_responsive(Duration::from_secs(5)));
    assert_eq!(memcached.get_raw(b"k"), Some((0, b"v".to_vec())));

    memcached.stop();
    assert!(memcached.pid().is_none());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still open after stop"
    );

    memcached.restart();
    assert_eq!(memcached.port(), port);
    assert_eq!(
        memcached.get_raw(b"k"),
        None,
        "a restarted memcached is empty"
    );
    assert_eq!(
        memcached.stats().get("max_connections").map(String::as_str),
        Some("500")
    );

    // A paused server still drops cleanly.
    memcached.pause();
}

#[tokio::test]
async fn hit_miss_and_headers() {
    let (s, recorder) = stack(|_| {}).await;
    s.memcached()[0].set_raw(b"/hello", 0, b"<h1>hello</h1>");

    let hit = get(&s.nginx().url("/hello"), &[]).await;
    assert_hit(&hit, "<h1>hello</h1>");
    assert_eq!(hit.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(hit.header("content-length"), Some("14"));
    assert_eq!(recorder.count(), 0, "a hit never reaches the app");

    // HEAD is answered from the stored GET.
    let head = request("HEAD", &s.nginx().url("/hello"), &[], b"").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("x-cache"), Some("HIT"));
    assert!(head.body.is_empty());

    // nginx normalizes the target into $uri: these are the same key.
    for target in ["//hello", "/x/../hello", "/%68ello", "/./hello"] {
        assert_hit(&get(&s.nginx().url(target), &[]).await, "<h1>hello</h1>");
    }
    assert_eq!(recorder.count(), 0);

    // A miss falls through to the app, which sees the raw target.
    let miss = get(&s.nginx().url("/missing"), &[]).await;
    assert_from_app(&miss, "app:GET /missing");
    assert_eq!(recorder.count(), 1);
    let raw = "/a//b/%2e%2e/c%C3%A9?x=%41";
    // (bypass mode: a query goes to the app too, still raw)
    assert_from_app(
        &get(&s.nginx().url(raw), &[]).await,
        &format!("app:GET {raw}"),
    );
    let seen = recorder.last();
    assert_eq!(seen.target, raw);
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("host"), Some(s.nginx().address()));

    // Non-UTF-8 bytes in the target are sent as they are.
    s.memcached()[0].set_raw(b"/caf\xC3\xA9", 0, b"cafe");
    let raw_utf8 = request_target("GET", s.nginx().address(), b"/caf\xC3\xA9", &[], b"")
        .await
        .expect("raw target");
    assert_hit(&raw_utf8, "cafe");
    assert_hit(&get(&s.nginx().url("/caf%c3%a9"), &[]).await, "cafe");

    // The access log says what happened.
    wait_until(
        EVENTUALLY,
        "the access log shows hits and misses",
        || async {
            let log = s.nginx().access_log();
            log.contains("\"GET /hello HTTP/1.1\" 200 14 cache=HIT bypass=- ")
                && log.contains("\"GET /missing HTTP/1.1\" 200 ")
                && log.lines().any(|l| {
                    l.contains("/missing")
                        && l.contains(" cache=MISS ")
                        && l.contains("upstream_status=404 : 200")
                })
        },
    )
    .await;
}

#[tokio::test]
async fn non_get_methods_reach_the_app_with_their_body() {
    let (s, recorder) = stack(|_| {}).await;
    s.memcached()[0].set_raw(b"/hello", 0, b"cached");

    let form = b"comment=hello+world&x=%26";
    let response = request(
        "POST",
        &s.nginx().url("/hello"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form,
    )
    .await;
    assert_from_app(&response, "app:POST /hello");
    let seen = recorder.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body, form);
    assert_eq!(
        seen.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );

    // A body larger than client_body_buffer_size goes through nginx's temp file.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let response = request("PUT", &s.nginx().url("/upload?x=1"), &[], &big).await;
    assert_from_app(&response, "app:PUT /upload?x=1");
    let seen = recorder.last();
    assert_eq!(seen.method, "PUT");
    assert!(
        seen.body == big,
        "the large body arrived changed ({} bytes)",
        seen.body.len()
    );

    for method in ["DELETE", "PATCH", "OPTIONS"] {
        let response = request(method, &s.nginx().url("/hello"), &[], b"").await;
        assert_from_app(&response, &format!("app:{method} /hello"));
    }
    // Methods are case-sensitive: `get` is not GET.
    let response = request("get", &s.nginx().url("/hello"), &[], b"").await;
    assert_ne!(response.header("x-cache"), Some("HIT"), "{response:?}");
    assert_eq!(
        s.memcached()[0].get_raw(b"/hello"),
        Some((0, b"cached".to_vec()))
    );

    wait_until(
        EVENTUALLY,
        "the access log shows the method bypass",
        || async {
            s.nginx().access_log().lines().any(|l| {
                l.contains("\"POST /hello HTTP/1.1\" 200")
                    && l.contains("cache=BYPASS bypass=method")
            })
        },
    )
    .await;
}

#[tokio::test]
async fn logged_in_and_query_requests_bypass_memcached() {
    let (s, recorder) = stack(|_| {}).await;
    s.memcached()[0].set_raw(b"/hello", 0, b"cached");
    let url = s.nginx().url("/hello");

    for cookie in [
        "sessionid=x",
        "a=1; sessionid=x",
        "a=1;sessionid=",
        "sessionid",
        "theme=dark; sessionid =1",
    ] {
        let response = get(&url, &[("Cookie", cookie)]).await;
        assert_from_app(&response, "app:GET /hello");
        assert_eq!(recorder.last().header("cookie"), Some(cookie));
    }
    // Two Cookie headers: nginx joins them.
    let response = get(&url, &[("Cookie", "a=1"), ("Cookie", "sessionid=2")]).await;
    assert_from_app(&response, "app:GET /hello");

    for cookie in [
        "xsessionid=1",
        "a=sessionid=1",
        "sessionidx=1",
        "SESSIONID=1",
        "q=1; my_sessionid=2",
    ] {
        assert_hit(&get(&url, &[("Cookie", cookie)]).await, "cached");
    }

    assert_from_app(
        &get(&url, &[("Authorization", "Basic eDp5")]).await,
        "app:GET /hello",
    );
    assert_from_app(
        &get(&s.nginx().url("/hello?x=1"), &[]).await,
        "app:GET /hello?x=1",
    );
    assert_from_app(
        &get(&s.nginx().url("/hello?"), &[]).await,
        "app:GET /hello?",
    );
    // An encoded `?` is part of the path, not a query.
    s.memcached()[0].set_raw(b"/q?x", 0, b"question");
    assert_hit(&get(&s.nginx().url("/q%3Fx"), &[]).await, "question");

    wait_until(
        EVENTUALLY,
        "the access log names the bypass reasons",
        || async {
            let log = s.nginx().access_log();
            ["bypass=cookie", "bypass=authorization", "bypass=query"]
                .iter()
                .all(|reason| log.contains(&format!("cache=BYPASS {reason} ")))
        },
    )
    .await;
}

#[tokio::test]
async fn admin_paths_go_to_the_app() {
    let (s, recorder) = stack(|_| {}).await;
    s.memcached()[0].set_raw(b"/_mcpage/health", 0, b"cached health");
    let response = get(&s.nginx().url("/_mcpage/health"), &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "ok");
    assert_eq!(response.header("x-cache"), None);
    let response = request("POST", &s.nginx().url("/_mcpage/invalidate"), &[], b"tag=x").await;
    assert_eq!(response.text(), "app:POST /_mcpage/invalidate");
    assert_eq!(recorder.last().body, b"tag=x");
    wait_until(EVENTUALLY, "the access log shows ADMIN", || async {
        s.nginx()
            .access_log()
            .contains("\"GET /_mcpage/health HTTP/1.1\" 200 2 cache=ADMIN")
    })
    .await;
}

#[tokio::test]
async fn gzip_values_are_served_compressed_or_gunzipped() {
    let (s, _) = stack(|config| {
        config.cache.gzip = true;
        config.cache.gzip_flag = 2;
    })
    .await;
    let page = "<h1>compressed</h1>".repeat(100);
    let compressed = gzip(page.as_bytes());
    s.memcached()[0].set_raw(b"/gz", 2 | 1, &compressed);

    let plain = get(&s.nginx().url("/gz"), &[]).await;
    assert_hit(&plain, &page);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));

    let gz = get(&s.nginx().url("/gz"), &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(gz.status, StatusCode::OK);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("x-cache"), Some("HIT"));
    assert_eq!(gz.body, compressed);

    // Without the flag the value is served as stored.
    s.memcached()[0].set_raw(b"/plain", 1, b"plain");
    let response = get(&s.nginx().url("/plain"), &[("Accept-Encoding", "gzip")]).await;
    assert_hit(&response, "plain");
    assert_eq!(response.header("content-encoding"), None);
}

#[tokio::test]
async fn memcached_down_or_oversized_keys_fall_back_to_the_app() {
    let (s, _) = stack(|config| config.keys.prefix = "p$x:".to_owned()).await;
    s.memcached()[0].set_raw(b"p$x:/hello", 0, b"prefixed");
    assert_hit(&get(&s.nginx().url("/hello"), &[]).await, "prefixed");

    // A key over 250 bytes is not even asked for (memcached would answer CLIENT_ERROR).
    let long = format!("/{}", "a".repeat(260));
    assert_from_app(
        &get(&s.nginx().url(&long), &[]).await,
        &format!("app:GET {long}"),
    );

    s.memcached()[0].stop();
    assert_from_app(&get(&s.nginx().url("/hello"), &[]).await, "app:GET /hello");
    wait_until(EVENTUALLY, "the access log shows ERROR", || async {
        let log = s.nginx().access_log();
        log.contains(" cache=BYPASS bypass=long_key ")
            && log
                .lines()
                .any(|l| l.contains("GET /hello ") && l.contains(" cache=ERROR "))
    })
    .await;
    assert!(
        s.nginx().error_log().contains("connect() failed"),
        "{}",
        s.nginx().error_log()
    );
}

#[tokio::test]
async fn host_mode_keys_and_allowed_hosts() {
    let (s, recorder) = stack(|config| {
        config.keys.host = true;
        config.cache.allowed_hosts = vec!["example.com".to_owned()];
    })
    .await;
    s.memcached()[0].set_raw(b"example.com/hello", 0, b"example");
    s.memcached()[0].set_raw(b"other.org/hello", 0, b"other");
    assert_hit(
        &get(&s.nginx().url("/hello"), &[("Host", "Example.COM:8080")]).await,
        "example",
    );
    assert_from_app(
        &get(&s.nginx().url("/hello"), &[("Host", "other.org")]).await,
        "app:GET /hello",
    );
    assert_eq!(recorder.last().header("host"), Some("other.org"));
    assert_from_app(&get(&s.nginx().url("/hello"), &[]).await, "app:GET /hello");
}

/// A request target whose `$uri` is `/` + `escapes` escaped bytes + `plain` letters.
fn target_with(escapes: usize, plain: usize) -> (String, Vec<u8>) {
    const ESCAPED: [(&str, &[u8]); 4] = [
        ("%20", b"%20"),
        ("%25", b"%25"),
        ("%0A", b"%0A"),
        ("%09", b"%09"),
    ];
    let mut target = String::from("/");
    let mut key = b"/".to_vec();
    for i in 0..escapes {
        let (request, wire) = ESCAPED[i % ESCAPED.len()];
        target.push_str(request);
        key.extend_from_slice(wire);
    }
    target.push_str(&"a".repeat(plain));
    key.extend(std::iter::repeat_n(b'a', plain));
    (target, key)
}

#[tokio::test]
async fn long_keys_are_never_asked_and_never_disable_a_server() {
    let other = Memcached::start();
    let (s, _) = stack(|config| {
        config.keys.prefix = "pg:".to_owned();
        config
            .memcached
            .servers
            .push(ServerSpec::new(other.address()));
    })
    .await;
    let scheme = mcpage::key::KeyScheme::new("pg:", mcpage::key::QueryMode::Bypass, true, false);
    let escaped_key = |target: &str| {
        let uri = mcpage::key::nginx_uri(target.as_bytes(), true).expect("valid target");
        mcpage::key::memcached_escape(&[b"pg:".as_slice(), &uri.uri].concat())
    };
    let both = |key: &[u8], value: &[u8]| {
        s.memcached()[0].set_raw(key, 0, value);
        other.set_raw(key, 0, value);
    };
    // Where each page lives before: one server answers "A", the other "B".
    for i in 0..20 {
        s.memcached()[0].set_raw(format!("pg:/k{i}").as_bytes(), 0, b"A");
        other.set_raw(format!("pg:/k{i}").as_bytes(), 0, b"B");
    }
    let mut before = Vec::new();
    for i in 0..20 {
        before.push(get(&s.nginx().url(&format!("/k{i}")), &[]).await.text());
    }
    assert!(
        before.contains(&"A".to_owned()) && before.contains(&"B".to_owned()),
        "{before:?}"
    );

    // len(K) = 3 (prefix) + 1 + 3 * escapes + plain: 250 is asked, 251 is not.
    for escapes in [0, 1, 2, 40, 81, 82] {
        let plain = 246 - 3 * escapes;
        let (target, key) = target_with(escapes, plain);
        let mut wire = b"pg:".to_vec();
        wire.extend_from_slice(&key);
        assert_eq!(wire.len(), 250);
        assert_eq!(
            escaped_key(&target),
            wire,
            "the layer computes the same key"
        );
        both(&wire, b"longest");
        assert_hit(&get(&s.nginx().url(&target), &[]).await, "longest");

        let (target, _) = target_with(escapes, plain + 1);
        assert!(
            scheme.page_key(None, target.as_bytes()).is_err(),
            "the layer never stores 251 bytes"
        );
        assert_from_app(
            &get(&s.nginx().url(&target), &[]).await,
            &format!("app:GET {target}"),
        );
    }
    for (escapes, plain) in [(83, 0), (84, 0), (100, 0), (0, 400), (90, 300)] {
        let (target, _) = target_with(escapes, plain);
        assert_from_app(
            &get(&s.nginx().url(&target), &[]).await,
            &format!("app:GET {target}"),
        );
    }

    let mut after = Vec::new();
    for i in 0..20 {
        after.push(get(&s.nginx().url(&format!("/k{i}")), &[]).await.text());
    }
    assert_eq!(
        before,
        after,
        "long keys moved pages:\n{}",
        s.nginx().error_log()
    );
    let errors = s.nginx().error_log();
    assert!(
        !errors.contains("invalid response") && !errors.contains("disabled"),
        "{errors}"
    );
    wait_until(
        EVENTUALLY,
        "the access log shows long_key bypasses",
        || async {
            s.nginx()
                .access_log()
                .matches("cache=BYPASS bypass=long_key ")
                .count()
                == 11
        },
    )
    .await;
}

#[tokio::test]
async fn ordinary_traffic_logs_no_warnings() {
    let (s, _) = stack(|_| {}).await;
    s.memcached()[0].set_raw(b"/hello", 0, b"hi");
    assert_hit(&get(&s.nginx().url("/hello"), &[]).await, "hi");
    get(&s.nginx().url("/miss"), &[]).await;
    get(&s.nginx().url("/hello"), &[("Cookie", "sessionid=1")]).await;
    get(&s.nginx().url("/_mcpage/health"), &[]).await;
    request("POST", &s.nginx().url("/_mcpage/invalidate"), &[], b"x").await;
    request("POST", &s.nginx().url("/form"), &[], b"x").await;
    wait_until(EVENTUALLY, "six access log lines", || async {
        s.nginx().access_log().lines().count() == 6
    })
    .await;
    let log = s.nginx().access_log();
    for expected in [
        "\"GET /hello HTTP/1.1\" 200 2 cache=HIT bypass=- upstream=127.0.0.1:",
        "\"GET /miss HTTP/1.1\" 200 13 cache=MISS bypass=- ",
        "\"GET /hello HTTP/1.1\" 200 14 cache=BYPASS bypass=cookie ",
        "\"GET /_mcpage/health HTTP/1.1\" 200 2 cache=ADMIN bypass=- ",
        "\"POST /_mcpage/invalidate HTTP/1.1\" 200 28 cache=ADMIN bypass=method ",
        "\"POST /form HTTP/1.1\" 200 14 cache=BYPASS bypass=method ",
    ] {
        assert!(log.contains(expected), "no `{expected}` in:\n{log}");
    }
    assert_eq!(s.nginx().error_log(), "", "nginx logged errors or warnings");
}
