//! Is this request, and then this response, cacheable?
//!
//! The request rule is mirrored into nginx by `mcpage nginx` (session cookies,
//! `Authorization`, method, query string, host), so a request the layer would
//! not cache is also never answered from memcached.

use std::fmt;

use headers::{CacheControl, HeaderMapExt, Vary};
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, COOKIE, HOST, SET_COOKIE,
};
use http::{HeaderMap, Method, StatusCode};

use crate::config::Compiled;

/// Why a request or response was not cached (the `X-Cache: BYPASS` reason,
/// logged at debug level and counted in the metrics). [`Bypass::reason`]
/// gives the stable snake_case name; `Bypass::iter()` (strum) lists them all.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::EnumCount, strum::EnumIter, strum::IntoStaticStr,
)]
#[strum(serialize_all = "snake_case")]
#[non_exhaustive]
pub enum Bypass {
    /// Not a GET.
    Method,
    /// The path matches no `include` or an `exclude` regex.
    Excluded,
    /// A session cookie was sent.
    Session,
    /// An `Authorization` header was sent.
    Authorization,
    /// A query string, with `keys.query = "bypass"`.
    QueryString,
    /// nginx would answer 400 for this target.
    BadRequest,
    /// The memcached key would exceed 250 bytes.
    KeyTooLong,
    /// Host mode: the host is missing, invalid or not allowed, or an
    /// absolute-form target names another host than the `Host` header.
    Host,
    /// memcached (the index pool) is unavailable or its breaker is open.
    Unavailable,
    /// The response status is not 200.
    Status,
    /// The response content type is not in `cache.content_types`.
    ContentType,
    /// The response sets a cookie.
    SetCookie,
    /// `Cache-Control: private`, `no-store` or `no-cache`.
    CacheControl,
    /// `Vary` on something other than `Accept-Encoding`.
    Vary,
    /// The response is already content-encoded.
    ContentEncoding,
    /// The body is larger than `cache.max_body_bytes`.
    TooLarge,
    /// The application opted out (the [`SkipCache`](crate::SkipCache) extension).
    OptOut,
    /// Too many or too long tags.
    Tags,
    /// The raw path is not the canonical spelling of the `$uri` nginx keys on
    /// (`//`, `.` or `..` segments, `%2F`, an encoded unreserved character):
    /// the app might route it elsewhere than the key's own path
    /// ([`key::is_canonical_path`](crate::key::is_canonical_path)).
    NonCanonicalPath,
    /// The request carries a header outside the key that apps honour to
    /// change what they render ([`UNKEYED_HEADERS`], or an `X-Forwarded-Host`
    /// other than `Host`); the rendered nginx clears them, so only a request
    /// that did not come through it has one.
    UnkeyedHeader,
}

/// Request headers that are not part of the key but that frameworks honour to
/// change the page: the host or scheme used for absolute links, the path
/// routed, the method run. nginx as rendered by `mcpage nginx` clears each of
/// them (`proxy_set_header X ""`); a cacheable request that still carries one
/// did not come through it and is not stored ([`Bypass::UnkeyedHeader`]).
/// `X-Forwarded-Host` is allowed when it equals `Host` (nginx sets it so);
/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Port` and `X-Real-IP`
/// are set by nginx from the connection and trusted (the app listens on loopback).
pub const UNKEYED_HEADERS: [&str; 15] = [
    "forwarded",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-uri",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "front-end-https",
];

impl Bypass {
    /// A short stable name (`session`, `set_cookie`, ...).
    pub fn reason(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for Bypass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl From<crate::key::KeySkip> for Bypass {
    fn from(skip: crate::key::KeySkip) -> Self {
        use crate::key::KeySkip;
        match skip {
            KeySkip::BadRequest => Bypass::BadRequest,
            KeySkip::QueryString => Bypass::QueryString,
            KeySkip::TooLong => Bypass::KeyTooLong,
            KeySkip::BadHost => Bypass::Host,
        }
    }
}

/// Request headers and method: anonymous GET only.
pub(crate) fn check_request(
    compiled: &Compiled,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), Bypass> {
    if method != Method::GET {
        return Err(Bypass::Method);
    }
    if headers.contains_key(AUTHORIZATION) {
        return Err(Bypass::Authorization);
    }
    if has_session_cookie(&compiled.session_cookies, headers) {
        return Err(Bypass::Session);
    }
    if UNKEYED_HEADERS
        .iter()
        .any(|name| headers.get(*name).is_some_and(|v| !v.is_empty()))
    {
        return Err(Bypass::UnkeyedHeader);
    }
    if let Some(forwarded) = headers.get("x-forwarded-host").filter(|v| !v.is_empty()) {
        let host = headers
            .get(HOST)
            .map(|h| crate::key::nginx_host(h.as_bytes()));
        if host != Some(crate::key::nginx_host(forwarded.as_bytes())) {
            return Err(Bypass::UnkeyedHeader);
        }
    }
    Ok(())
}

/// Does any `Cookie` header carry one of `names` (exact cookie-name match)?
pub(crate) fn has_session_cookie(names: &[String], headers: &HeaderMap) -> bool {
    if names.is_empty() {
        return false;
    }
    headers.get_all(COOKIE).iter().any(|value| {
        value.as_bytes().split(|b| *b == b';').any(|pair| {
            let name = pair
                .split(|b| *b == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            names.iter().any(|n| n.as_bytes() == name)
        })
    })
}

/// The normalized path against include/exclude.
pub(crate) fn check_path(compiled: &Compiled, uri: &[u8]) -> Result<(), Bypass> {
    let included = compiled.include.iter().any(|re| re.is_match(uri));
    if !included || compiled.exclude.iter().any(|re| re.is_match(uri)) {
        return Err(Bypass::Excluded);
    }
    Ok(())
}

/// Response status and headers. Returns the TTL to store with: the configured
/// one, shortened by `s-maxage`/`max-age` when the app asks for less.
pub(crate) fn check_response(
    compiled: &Compiled,
    ttl_secs: u32,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<u32, Bypass> {
    if status != StatusCode::OK {
        return Err(Bypass::Status);
    }
    if headers.contains_key(SET_COOKIE) {
        return Err(Bypass::SetCookie);
    }
    if headers.contains_key(CONTENT_ENCODING) {
        return Err(Bypass::ContentEncoding);
    }
    let media_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .ok_or(Bypass::ContentType)?;
    if !compiled.content_types.contains(&media_type) {
        return Err(Bypass::ContentType);
    }
    // RFC 9110 12.5.5: nginx serves one representation per key, so the only
    // variation a hit may carry is the encoding (gzip flag or gunzip).
    let vary = headers.typed_try_get::<Vary>().map_err(|_| Bypass::Vary)?;
    if let Some(vary) = vary
        && (vary.is_any()
            || vary
                .iter_strs()
                .any(|field| !field.is_empty() && !field.eq_ignore_ascii_case("accept-encoding")))
    {
        return Err(Bypass::Vary);
    }
    // Safe side first, as nginx's own proxy cache does
    // (`ngx_http_upstream_process_cache_control`): the words anywhere in the
    // value, so a malformed `private; max-age=0` still keeps the page private.
    for value in headers.get_all(CACHE_CONTROL) {
        let value = value.as_bytes().to_ascii_lowercase();
        let has = |word: &[u8]| value.windows(word.len()).any(|w| w == word);
        if has(b"private") || has(b"no-store") || has(b"no-cache") {
            return Err(Bypass::CacheControl);
        }
    }
    // RFC 9111 5.2.2: an unparsable Cache-Control (`max-age=abc`) is not
    // trusted for a lifetime: not stored.
    let cache_control = headers
        .typed_try_get::<CacheControl>()
        .map_err(|_| Bypass::CacheControl)?;
    let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let mut ttl = ttl_secs;
    if let Some(cc) = cache_control {
        // s-maxage speaks to shared caches and overrides max-age (RFC 9111 5.2.2.10).
        if let Some(lifetime) = cc.s_max_age().or(cc.max_age()) {
            ttl = ttl.min(secs(lifetime));
        }
    }
    if ttl == 0 {
        return Err(Bypass::CacheControl);
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use http::HeaderValue;

    fn compiled() -> Compiled {
        let mut config = Config::default();
        config.cache.exclude = vec![r"\.xml$".into(), "^/articles/search".into()];
        config.cache.session_cookies = vec!["sessionid".into(), "remember_me".into()];
        config.compile().expect("valid")
    }

    type Headers<'a> = &'a [(&'a str, &'a str)];

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("name");
            map.append(name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn request_table() {
        let c = compiled();
        let table: &[(Headers, Result<(), Bypass>)] = &[
            (&[], Ok(())),
            (&[("cookie", "_ga=GA1.2.3; theme=dark")], Ok(())),
            (&[("cookie", "sessionid=abc")], Err(Bypass::Session)),
            (&[("cookie", "a=1; sessionid=abc")], Err(Bypass::Session)),
            (
                &[("cookie", "a=1"), ("cookie", "remember_me=1")],
                Err(Bypass::Session),
            ),
            (&[("cookie", "xsessionid=1; q=sessionid")], Ok(())),
            (&[("cookie", "sessionid")], Err(Bypass::Session)),
            (
                &[("authorization", "Basic eDp5")],
                Err(Bypass::Authorization),
            ),
            (&[("x-original-url", "/other")], Err(Bypass::UnkeyedHeader)),
            (&[("X-Rewrite-URL", "/other")], Err(Bypass::UnkeyedHeader)),
            (
                &[("forwarded", "host=evil.example")],
                Err(Bypass::UnkeyedHeader),
            ),
            (&[("x-host", "evil.example")], Err(Bypass::UnkeyedHeader)),
            (
                &[("x-forwarded-server", "evil")],
                Err(Bypass::UnkeyedHeader),
            ),
            (
                &[("x-http-method-override", "DELETE")],
                Err(Bypass::UnkeyedHeader),
            ),
            (&[("x-original-url", "")], Ok(())),
            (
                &[
                    ("host", "example.com"),
                    ("x-forwarded-host", "evil.example"),
                ],
                Err(Bypass::UnkeyedHeader),
            ),
            (
                &[("x-forwarded-host", "example.com")],
                Err(Bypass::UnkeyedHeader),
            ),
            (
                &[
                    ("host", "Example.com:8080"),
                    ("x-forwarded-host", "example.com"),
                ],
                Ok(()),
            ),
            (
                &[
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-for", "10.0.0.1"),
                ],
                Ok(()),
            ),
        ];
        for (pairs, expected) in table {
            assert_eq!(
                check_request(&c, &Method::GET, &headers(pairs)),
                *expected,
                "{pairs:?}"
            );
        }
        assert_eq!(
            check_request(&c, &Method::HEAD, &HeaderMap::new()),
            Err(Bypass::Method)
        );
        assert_eq!(
            check_request(&c, &Method::POST, &HeaderMap::new()),
            Err(Bypass::Method)
        );
    }

    #[test]
    fn path_table() {
        let c = compiled();
        assert_eq!(check_path(&c, b"/articles/1"), Ok(()));
        assert_eq!(check_path(&c, b"/feed.xml"), Err(Bypass::Excluded));
        assert_eq!(check_path(&c, b"/articles/search/x"), Err(Bypass::Excluded));
        assert_eq!(check_path(&c, b"/caf\xc3\xa9"), Ok(()));
        assert_eq!(check_path(&c, b"/\xff"), Ok(()));
    }

    #[test]
    fn response_table() {
        let c = compiled();
        let html = ("content-type", "text/html; charset=utf-8");
        let table: &[(u16, Headers, Result<u32, Bypass>)] = &[
            (200, &[html], Ok(3600)),
            (200, &[("content-type", "TEXT/HTML")], Ok(3600)),
            (404, &[html], Err(Bypass::Status)),
            (301, &[html], Err(Bypass::Status)),
            (200, &[], Err(Bypass::ContentType)),
            (
                200,
                &[("content-type", "application/json")],
                Err(Bypass::ContentType),
            ),
            (200, &[html, ("set-cookie", "a=1")], Err(Bypass::SetCookie)),
            (
                200,
                &[html, ("cache-control", "private")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "public, no-store")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "No-Cache")],
                Err(Bypass::CacheControl),
            ),
            (200, &[html, ("cache-control", "max-age=60")], Ok(60)),
            (
                200,
                &[html, ("cache-control", "max-age=0")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "max-age=60, s-maxage=600")],
                Ok(600),
            ),
            (200, &[html, ("cache-control", "max-age=99999")], Ok(3600)),
            (200, &[html, ("vary", "Accept-Encoding")], Ok(3600)),
            (
                200,
                &[html, ("vary", "accept-encoding, Cookie")],
                Err(Bypass::Vary),
            ),
            (200, &[html, ("vary", "*")], Err(Bypass::Vary)),
            (
                200,
                &[html, ("vary", "accept-encoding"), ("vary", "cookie")],
                Err(Bypass::Vary),
            ),
            (200, &[html, ("vary", "")], Ok(3600)),
            // Malformed values err on the safe side (nginx looks for the words).
            (
                200,
                &[html, ("cache-control", "private; max-age=0")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "max-age=3600; private")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "\"no-store\"")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "max-age=abc")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "max-age=-3600")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[html, ("cache-control", "public, s-maxage=0, max-age=600")],
                Err(Bypass::CacheControl),
            ),
            (
                200,
                &[
                    html,
                    ("cache-control", "public"),
                    ("cache-control", "max-age=5"),
                ],
                Ok(5),
            ),
            (
                200,
                &[html, ("content-encoding", "gzip")],
                Err(Bypass::ContentEncoding),
            ),
        ];
        for (status, pairs, expected) in table {
            let status = StatusCode::from_u16(*status).expect("status");
            assert_eq!(
                check_response(&c, 3600, status, &headers(pairs)),
                *expected,
                "{status} {pairs:?}"
            );
        }
    }

    #[test]
    fn reasons_are_unique_snake_case_and_index_the_counters() {
        use strum::{EnumCount, IntoEnumIterator};
        let mut reasons: Vec<_> = Bypass::iter().map(Bypass::reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), Bypass::COUNT);
        assert_eq!(Bypass::QueryString.reason(), "query_string");
        assert_eq!(Bypass::KeyTooLong.to_string(), "key_too_long");
        for (i, b) in Bypass::iter().enumerate() {
            assert_eq!(b as usize, i);
        }
    }
}
