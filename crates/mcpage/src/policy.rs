//! Is this request, and then this response, cacheable?
//!
//! The request rule is mirrored into nginx by `mcpage nginx` (session cookies,
//! `Authorization`, method, query string, host), so a request the layer would
//! not cache is also never answered from memcached. A request's
//! `Cache-Control: no-store` is the one request rule nginx does not mirror: it
//! forbids storing the response (RFC 9111 5.2.1.5), not serving a stored one.

use std::fmt;
use std::time::{Duration, SystemTime};

use headers::{HeaderMapExt, Vary};
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, COOKIE, DATE, EXPIRES, HOST,
    HeaderName, HeaderValue, SET_COOKIE,
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
    /// Already stale (RFC 9111 4.2): the remaining freshness lifetime
    /// (`s-maxage` > `max-age` > `Expires` - `Date`, minus the current age
    /// from `Age` and `Date`) is under one second, or the freshness
    /// information is invalid (`Expires: 0`, an unparsable or obsolete-format
    /// date, `max-age=-1`, `max-age="60"`, `max-age=1.5`, conflicting duplicates).
    Stale,
    /// A targeted cache-control field (`cache.targeted_fields`, RFC 9213:
    /// `CDN-Cache-Control`, `Surrogate-Control`, ...) says `private`,
    /// `no-store` or `no-cache`.
    TargetedField,
    /// The `Content-Type` nginx sends on a hit (the URI extension's type or
    /// `default_type`, plus `charset` for `charset_types`) differs from the
    /// response's, type or charset.
    ContentTypeDiffers,
    /// A security-relevant header ([`CHECKED_HEADERS`](crate::CHECKED_HEADERS) or a name in
    /// `nginx.add_headers`) differs from what nginx sends on a hit: the
    /// response lacks a configured one, carries another value, or carries one
    /// that nginx would drop.
    HeaderDiffers,
    /// The request says `Cache-Control: no-store` (RFC 9111 5.2.1.5): no
    /// response to it may be stored. Not mirrored into nginx: a page stored
    /// before may still answer it (the directive does not apply to it).
    RequestNoStore,
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

/// [`UNKEYED_HEADERS`] parsed once (a `&str` lookup parses the name each time).
static UNKEYED_HEADER_NAMES: std::sync::LazyLock<Vec<http::HeaderName>> =
    std::sync::LazyLock::new(|| {
        UNKEYED_HEADERS
            .iter()
            .map(|name| http::HeaderName::from_static(name))
            .collect()
    });

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

/// Request headers and method: anonymous GET only, and no `Cache-Control:
/// no-store` (RFC 9111 5.2.1.5).
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
    // RFC 9111 5.2.1.5, looked for anywhere in the value like the response's
    // words (`forbids_storing`): not storing is always safe.
    if headers
        .get_all(CACHE_CONTROL)
        .iter()
        .any(|value| contains_ignore_case(value.as_bytes(), b"no-store"))
    {
        return Err(Bypass::RequestNoStore);
    }
    if UNKEYED_HEADER_NAMES
        .iter()
        .any(|name| headers.get(name).is_some_and(|v| !v.is_empty()))
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

/// Does `value` hold `word` anywhere, ASCII case-insensitively?
fn contains_ignore_case(value: &[u8], word: &[u8]) -> bool {
    value
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
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

/// When the request started and its response head arrived, for the current
/// age of a response (RFC 9111 4.2.3: `request_time`, `response_time`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) request: SystemTime,
    pub(crate) response: SystemTime,
}

impl Timing {
    /// Both ends now (a response produced without waiting).
    #[cfg(test)]
    pub(crate) fn at(now: SystemTime) -> Timing {
        Timing {
            request: now,
            response: now,
        }
    }
}

/// Response status and headers, for the page nginx will serve at `uri` (the
/// normalized `$uri`). Returns the TTL to store with: the remaining freshness
/// lifetime (RFC 9111 4.2), capped by `ttl_secs`; `ttl_secs` when the
/// response gives no explicit lifetime.
pub(crate) fn check_response(
    compiled: &Compiled,
    ttl_secs: u32,
    status: StatusCode,
    headers: &HeaderMap,
    uri: &[u8],
    timing: Timing,
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
    check_representation(compiled, headers, uri)?;
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
    let directives = governing_directives(compiled, headers)?;
    let remaining = remaining_freshness(&directives, headers, timing)?;
    let ttl = match remaining {
        None => ttl_secs,
        Some(remaining) => u32::try_from(remaining.as_secs())
            .unwrap_or(u32::MAX)
            .min(ttl_secs),
    };
    if ttl == 0 {
        return Err(Bypass::Stale);
    }
    Ok(ttl)
}

/// The hit nginx produces has the response's `Content-Type` (type and
/// charset, no other parameter) and the same security-relevant headers.
fn check_representation(
    compiled: &Compiled,
    headers: &HeaderMap,
    uri: &[u8],
) -> Result<(), Bypass> {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Bypass::ContentType);
    };
    let value = value.to_str().map_err(|_| Bypass::ContentType)?;
    let mut parts = split_unquoted(value, b';').into_iter();
    let media_type = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !compiled.content_types.contains(&media_type) {
        return Err(Bypass::ContentType);
    }
    let (hit_type, hit_charset) = compiled.hit_types.content_type_for(uri);
    if media_type != hit_type {
        return Err(Bypass::ContentTypeDiffers);
    }
    let mut charset = None;
    for parameter in parts {
        let parameter = parameter.trim();
        if parameter.is_empty() {
            continue;
        }
        match parameter.split_once('=') {
            Some((name, value))
                if name.trim().eq_ignore_ascii_case("charset") && charset.is_none() =>
            {
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                charset = Some(value);
            }
            // nginx sends no other parameter (and one charset).
            _ => return Err(Bypass::ContentTypeDiffers),
        }
    }
    let same_charset = match (charset, hit_charset) {
        (None, None) => true,
        (Some(got), Some(want)) => got.eq_ignore_ascii_case(want),
        _ => false,
    };
    if !same_charset {
        return Err(Bypass::ContentTypeDiffers);
    }
    for name in &compiled.checked_headers {
        let got = headers.get_all(name).iter().map(HeaderValue::as_bytes);
        let want = compiled
            .add_headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes());
        if !got.eq(want) {
            return Err(Bypass::HeaderDiffers);
        }
    }
    Ok(())
}

/// Does the (lowercased) value hold one of the words that keep a response
/// out of a shared cache, anywhere, as nginx's own proxy cache looks for them
/// (`ngx_http_upstream_process_cache_control`)? A malformed `private;
/// max-age=0` still keeps the page private.
fn forbids_storing(value: &[u8]) -> bool {
    let value = value.to_ascii_lowercase();
    let has = |word: &[u8]| value.windows(word.len()).any(|w| w == word);
    has(b"private") || has(b"no-store") || has(b"no-cache")
}

/// The directives that govern this cache (RFC 9213 2.2): the first targeted
/// field of `cache.targeted_fields` that is present and valid replaces
/// `Cache-Control`; an invalid one is ignored (but, on the safe side, its
/// `private`/`no-store`/`no-cache` still count). Without one, `Cache-Control`.
fn governing_directives(
    compiled: &Compiled,
    headers: &HeaderMap,
) -> Result<Vec<Directive>, Bypass> {
    for name in &compiled.targeted_fields {
        let mut joined = Vec::new();
        for value in headers.get_all(name) {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
        }
        if joined.trim_ascii().is_empty() {
            continue;
        }
        if forbids_storing(&joined) {
            return Err(Bypass::TargetedField);
        }
        if let Some(directives) = std::str::from_utf8(&joined).ok().and_then(parse_targeted)
            && !directives.is_empty()
        {
            return Ok(directives);
        }
    }
    for value in headers.get_all(CACHE_CONTROL) {
        if forbids_storing(value.as_bytes()) {
            return Err(Bypass::CacheControl);
        }
    }
    // RFC 9111 5.2: an unparsable Cache-Control is not trusted: not stored.
    let mut directives = Vec::new();
    for value in headers.get_all(CACHE_CONTROL) {
        let value = value.to_str().map_err(|_| Bypass::CacheControl)?;
        directives.extend(parse_directives(value).ok_or(Bypass::CacheControl)?);
    }
    // Not `headers::CacheControl`: it matches directive names case-sensitively
    // (`Max-Age=60` would be ignored) and refuses a whole value for an
    // overlong `max-age` that RFC 9111 1.2.2 reads as 2^31.
    Ok(directives)
}

/// One cache directive (RFC 9111 5.2): its name, lowercased, and its
/// argument as written (a quoted string keeps its quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Directive {
    name: String,
    argument: Option<String>,
}

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `text` split at `separator` outside double quotes.
fn split_unquoted(text: &str, separator: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// `#cache-directive` (RFC 9111 5.2, RFC 9110 5.6.1 lists): `None` when it
/// is not that syntax (an unterminated quote, a space inside a name, ...).
fn parse_directives(value: &str) -> Option<Vec<Directive>> {
    let mut directives = Vec::new();
    for member in split_unquoted(value, b',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let (name, argument) = match member.split_once('=') {
            Some((name, argument)) => (name, Some(argument)),
            None => (member, None),
        };
        if !is_token(name) {
            return None;
        }
        if let Some(argument) = argument {
            let quoted =
                argument.len() >= 2 && argument.starts_with('"') && argument.ends_with('"');
            if !quoted && !is_token(argument) {
                return None;
            }
        }
        directives.push(Directive {
            name: name.to_ascii_lowercase(),
            argument: argument.map(str::to_owned),
        });
    }
    Some(directives)
}

/// A targeted field (RFC 9213 2.1) is a Structured Field Dictionary (RFC
/// 8941 3.2): lowercase keys, bare items, optional parameters; `max-age` and
/// `s-maxage` must be Integers. `None` when it is not (`max-age="60"`,
/// `MaX-aGe=60`, `max-age =60`, `&&&`): the field is then ignored.
fn parse_targeted(value: &str) -> Option<Vec<Directive>> {
    let mut directives = Vec::new();
    for member in split_unquoted(value, b',') {
        let member = member.trim_matches([' ', '\t']);
        let mut parts = split_unquoted(member, b';').into_iter();
        let (name, argument) = sf_pair(parts.next()?)?;
        for parameter in parts {
            sf_pair(parameter.trim_start_matches(' '))?;
        }
        if matches!(name, "max-age" | "s-maxage")
            && !argument.is_some_and(|a| sf_integer(a.strip_prefix('-').unwrap_or(a)))
        {
            return None;
        }
        directives.push(Directive {
            name: name.to_owned(),
            argument: argument.map(str::to_owned),
        });
    }
    Some(directives)
}

/// `key[=bare-item]` of RFC 8941 3.1.2 / 3.2.
fn sf_pair(text: &str) -> Option<(&str, Option<&str>)> {
    let (key, value) = match text.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (text, None),
    };
    let mut bytes = key.bytes();
    let first = bytes.next()?;
    if !(first.is_ascii_lowercase() || first == b'*')
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b))
    {
        return None;
    }
    if let Some(value) = value
        && !sf_bare_item(value)
    {
        return None;
    }
    Some((key, value))
}

fn sf_integer(digits: &str) -> bool {
    (1..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// An RFC 8941 bare item: Integer, Decimal, String, Token, Byte Sequence, Boolean.
fn sf_bare_item(item: &str) -> bool {
    let number = item.strip_prefix('-').unwrap_or(item);
    let decimal = number.split_once('.').is_some_and(|(int, frac)| {
        (1..=12).contains(&int.len())
            && (1..=3).contains(&frac.len())
            && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    });
    let string = item.len() >= 2
        && item.starts_with('"')
        && item.ends_with('"')
        && item[1..item.len() - 1]
            .bytes()
            .all(|b| (b' '..0x7f).contains(&b));
    let token = item
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'*')
        && item
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
    let bytes = item.len() >= 2
        && item.starts_with(':')
        && item.ends_with(':')
        && item[1..item.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    sf_integer(number) || decimal || string || token || bytes || item == "?0" || item == "?1"
}

/// RFC 9111 1.2.2: larger delta-seconds are taken as 2^31.
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// `1*DIGIT`, saturating at 2^31; `None` for anything else.
fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |n| n.min(MAX_DELTA_SECONDS)),
    )
}

/// The argument of `name` (`max-age`, `s-maxage`): digits, in token or
/// quoted-string form (RFC 9111 5.2: recipients accept both); anything else
/// (`-1`, `'60'`, `1.5`, none) or conflicting occurrences: stale (4.2.1).
fn lifetime_directive(directives: &[Directive], name: &str) -> Result<Option<u64>, Bypass> {
    let mut found = None;
    for directive in directives.iter().filter(|d| d.name == name) {
        let seconds = directive
            .argument
            .as_deref()
            .map(|a| {
                a.strip_prefix('"')
                    .and_then(|a| a.strip_suffix('"'))
                    .unwrap_or(a)
            })
            .and_then(delta_seconds)
            .ok_or(Bypass::Stale)?;
        if found.is_some_and(|f| f != seconds) {
            return Err(Bypass::Stale);
        }
        found = Some(seconds);
    }
    Ok(found)
}

/// An HTTP-date in the preferred IMF-fixdate form only (RFC 9110 5.6.7):
/// `httpdate` parses it; the obsolete forms (two-digit years, asctime) and
/// anything else give `None`.
fn imf_fixdate(value: &HeaderValue) -> Option<SystemTime> {
    let text = value.to_str().ok()?.trim();
    let time = httpdate::parse_http_date(text).ok()?;
    (httpdate::fmt_http_date(time) == text).then_some(time)
}

/// The one value of a singleton field, `None` when absent; two different
/// values are an error.
fn singleton<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.any(|v| Some(v) != first) {
        return Err(());
    }
    Ok(first)
}

/// The remaining freshness lifetime at storing time (RFC 9111 4.2): `None`
/// when the response gives no explicit lifetime.
fn remaining_freshness(
    directives: &[Directive],
    headers: &HeaderMap,
    timing: Timing,
) -> Result<Option<Duration>, Bypass> {
    // 4.2.3: the Date the origin sent, else when the response arrived.
    let date = singleton(headers, &DATE)
        .ok()
        .flatten()
        .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?.trim()).ok())
        .unwrap_or(timing.response);
    // 4.2.1: s-maxage (a shared cache), then max-age, then Expires - Date.
    let s_maxage = lifetime_directive(directives, "s-maxage")?;
    let max_age = lifetime_directive(directives, "max-age")?;
    let lifetime = match s_maxage.or(max_age) {
        Some(seconds) => Duration::from_secs(seconds),
        None => match singleton(headers, &EXPIRES).map_err(|()| Bypass::Stale)? {
            None => return Ok(None),
            // 5.3: an invalid date, especially `0`, is in the past.
            Some(value) => imf_fixdate(value)
                .ok_or(Bypass::Stale)?
                .duration_since(date)
                .map_err(|_| Bypass::Stale)?,
        },
    };
    // 5.1: the first member of Age; an invalid one is ignored.
    let age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(v.split(',').next().unwrap_or_default().trim()))
        .map_or(Duration::ZERO, Duration::from_secs);
    // 4.2.3: current_age = max(apparent_age, age_value + response_delay).
    let apparent_age = timing.response.duration_since(date).unwrap_or_default();
    let response_delay = timing
        .response
        .duration_since(timing.request)
        .unwrap_or_default();
    let current_age = apparent_age.max(age + response_delay);
    match lifetime.checked_sub(current_age) {
        Some(remaining) if remaining >= Duration::from_secs(1) => Ok(Some(remaining)),
        _ => Err(Bypass::Stale),
    }
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
            // RFC 9111 5.2.1.5: a response to a no-store request is not
            // stored; the other request directives only state preferences
            // about serving (5.2.1), which nginx answers from memcached anyway.
            (
                &[("cache-control", "no-store")],
                Err(Bypass::RequestNoStore),
            ),
            (
                &[("cache-control", "No-Store")],
                Err(Bypass::RequestNoStore),
            ),
            (
                &[("cache-control", "max-age=0, no-store")],
                Err(Bypass::RequestNoStore),
            ),
            (
                &[
                    ("cache-control", "max-age=0"),
                    ("cache-control", "no-store"),
                ],
                Err(Bypass::RequestNoStore),
            ),
            (
                &[("cache-control", "no-store;x")],
                Err(Bypass::RequestNoStore),
            ),
            (&[("cache-control", "no-cache")], Ok(())),
            (&[("cache-control", "max-age=0")], Ok(())),
            (&[("cache-control", "nothing-to-see-here")], Ok(())),
            (&[("pragma", "no-cache")], Ok(())),
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
            (
                200,
                &[("content-type", "TEXT/HTML; charset=UTF-8")],
                Ok(3600),
            ),
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
                Err(Bypass::Stale),
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
                Err(Bypass::Stale),
            ),
            (
                200,
                &[html, ("cache-control", "max-age=-3600")],
                Err(Bypass::Stale),
            ),
            (
                200,
                &[html, ("cache-control", "public, s-maxage=0, max-age=600")],
                Err(Bypass::Stale),
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
                check_response(&c, 3600, status, &headers(pairs), b"/a", Timing::at(now())),
                *expected,
                "{status} {pairs:?}"
            );
        }
    }

    /// A fixed "now" on a whole second: 2026-11-29 12:00:00 UTC.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_953_600)
    }

    fn date(offset: i64) -> String {
        let at = if offset >= 0 {
            now() + Duration::from_secs(offset.unsigned_abs())
        } else {
            now() - Duration::from_secs(offset.unsigned_abs())
        };
        httpdate::fmt_http_date(at)
    }

    /// RFC 9111 4.2: the TTL is the remaining freshness lifetime, capped by
    /// `ttl_secs`; invalid freshness is stale.
    #[test]
    fn freshness_table() {
        let c = compiled();
        let html = ("content-type", "text/html; charset=utf-8");
        let now_date = date(0);
        type Row<'a> = (Vec<(&'a str, String)>, Result<u32, Bypass>);
        let table: Vec<Row> = vec![
            // No explicit lifetime: the configured TTL.
            (vec![], Ok(3600)),
            (vec![("date", now_date.clone())], Ok(3600)),
            // max-age / s-maxage, capped by ttl_secs.
            (vec![("cache-control", "max-age=60".into())], Ok(60)),
            (vec![("cache-control", "Max-Age=60".into())], Ok(60)),
            (
                vec![("cache-control", "max-age=60, s-maxage=600".into())],
                Ok(600),
            ),
            (
                vec![("cache-control", "s-maxage=30, max-age=600".into())],
                Ok(30),
            ),
            (vec![("cache-control", "max-age=99999".into())], Ok(3600)),
            (
                vec![("cache-control", "max-age=99999999999999999999".into())],
                Ok(3600),
            ),
            (
                vec![("cache-control", "max-age=0".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "s-maxage=0, max-age=600".into())],
                Err(Bypass::Stale),
            ),
            // Invalid lifetimes are stale (4.2.1, 5.2.2.1).
            (
                vec![("cache-control", "max-age=-3600".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age='3600'".into())],
                Err(Bypass::Stale),
            ),
            (vec![("cache-control", "max-age=\"60\"".into())], Ok(60)),
            (
                vec![("cache-control", "max-age=\"-60\"".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age=abc".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age=1.5".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age=+60".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "s-maxage=-1".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age=60, max-age=3600".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("cache-control", "max-age=60, max-age=60".into())],
                Ok(60),
            ),
            // Not the directive syntax at all: not trusted.
            (
                vec![("cache-control", "max-age 60".into())],
                Err(Bypass::CacheControl),
            ),
            // Age and Date (4.2.3).
            (
                vec![
                    ("cache-control", "max-age=3600".into()),
                    ("age", "7200".into()),
                ],
                Err(Bypass::Stale),
            ),
            (
                vec![
                    ("cache-control", "max-age=3600".into()),
                    ("age", "3600".into()),
                ],
                Err(Bypass::Stale),
            ),
            (
                vec![
                    ("cache-control", "max-age=3600".into()),
                    ("age", "3000".into()),
                ],
                Ok(600),
            ),
            (
                vec![("cache-control", "max-age=3".into()), ("age", "2".into())],
                Ok(1),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("age", "100, 0".into()),
                ],
                Ok(500),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("age", "abc".into()),
                ],
                Ok(600),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("age", "-100".into()),
                ],
                Ok(600),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("date", date(-100)),
                ],
                Ok(500),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("date", date(-100)),
                    ("age", "200".into()),
                ],
                Ok(400),
            ),
            (
                vec![("cache-control", "max-age=600".into()), ("date", date(100))],
                Ok(600),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("date", date(-600)),
                ],
                Err(Bypass::Stale),
            ),
            (
                vec![
                    ("cache-control", "max-age=600".into()),
                    ("date", "garbage".into()),
                ],
                Ok(600),
            ),
            // Expires - Date (4.2.1, 5.3).
            (
                vec![("expires", date(600)), ("date", now_date.clone())],
                Ok(600),
            ),
            (vec![("expires", date(600))], Ok(600)),
            (
                vec![("expires", date(99999)), ("date", now_date.clone())],
                Ok(3600),
            ),
            (vec![("expires", date(600)), ("date", date(-100))], Ok(600)),
            (
                vec![
                    ("expires", date(600)),
                    ("date", now_date.clone()),
                    ("age", "60".into()),
                ],
                Ok(540),
            ),
            (
                vec![("expires", date(1)), ("date", now_date.clone())],
                Ok(1),
            ),
            (
                vec![("expires", date(-1)), ("date", now_date.clone())],
                Err(Bypass::Stale),
            ),
            (
                vec![("expires", now_date.clone()), ("date", now_date.clone())],
                Err(Bypass::Stale),
            ),
            (vec![("expires", date(-3600))], Err(Bypass::Stale)),
            (vec![("expires", "0".into())], Err(Bypass::Stale)),
            (vec![("expires", "-1".into())], Err(Bypass::Stale)),
            (vec![("expires", "".into())], Err(Bypass::Stale)),
            (vec![("expires", "garbage".into())], Err(Bypass::Stale)),
            (
                vec![("expires", "Sunday, 29-Nov-26 13:00:00 GMT".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("expires", "Sun Nov 29 13:00:00 2026".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("expires", "Sun, 29 Nov 2026 13:00:00 EST".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("expires", "Sun, 29 Nov 2026 13:00:00 +0000".into())],
                Err(Bypass::Stale),
            ),
            (
                vec![("expires", date(600)), ("expires", date(700))],
                Err(Bypass::Stale),
            ),
            // max-age and s-maxage win over Expires, even an invalid one (5.3).
            (
                vec![
                    ("expires", "0".into()),
                    ("cache-control", "max-age=60".into()),
                ],
                Ok(60),
            ),
            (
                vec![
                    ("expires", date(600)),
                    ("cache-control", "s-maxage=60".into()),
                ],
                Ok(60),
            ),
            (
                vec![
                    ("expires", date(-600)),
                    ("cache-control", "max-age=0".into()),
                ],
                Err(Bypass::Stale),
            ),
        ];
        for (pairs, expected) in &table {
            let mut pairs: Vec<(&str, &str)> =
                pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
            pairs.push(html);
            assert_eq!(
                check_response(
                    &c,
                    3600,
                    StatusCode::OK,
                    &headers(&pairs),
                    b"/a",
                    Timing::at(now())
                ),
                *expected,
                "{pairs:?}"
            );
        }
        // The render's own duration counts as age (response_delay).
        let slow = Timing {
            request: now() - Duration::from_millis(500),
            response: now(),
        };
        let check = |pairs: &[(&str, &str)], timing| {
            let mut pairs = pairs.to_vec();
            pairs.push(html);
            check_response(&c, 3600, StatusCode::OK, &headers(&pairs), b"/a", timing)
        };
        assert_eq!(
            check(&[("cache-control", "max-age=3"), ("age", "2")], slow),
            Err(Bypass::Stale)
        );
        assert_eq!(check(&[("cache-control", "max-age=60")], slow), Ok(59));
        // A Date truncated to the second, with the response half a second later.
        let later = Timing::at(now() + Duration::from_millis(500));
        assert_eq!(
            check(
                &[("cache-control", "max-age=60"), ("date", &now_date)],
                later
            ),
            Ok(59)
        );
    }

    /// RFC 9213: the first targeted field that is present and valid replaces
    /// Cache-Control.
    #[test]
    fn targeted_fields_table() {
        let c = compiled();
        let html = ("content-type", "text/html; charset=utf-8");
        let table: &[(Headers, Result<u32, Bypass>)] = &[
            (&[("cdn-cache-control", "max-age=60")], Ok(60)),
            (
                &[("cdn-cache-control", "private")],
                Err(Bypass::TargetedField),
            ),
            (
                &[("cdn-cache-control", "no-store")],
                Err(Bypass::TargetedField),
            ),
            (&[("cdn-cache-control", "max-age=0")], Err(Bypass::Stale)),
            (&[("cdn-cache-control", "max-age=-1")], Err(Bypass::Stale)),
            (
                &[("surrogate-control", "no-store")],
                Err(Bypass::TargetedField),
            ),
            (&[("surrogate-control", "max-age=120")], Ok(120)),
            (&[("mcpage-cache-control", "max-age=30")], Ok(30)),
            // The targeted field replaces Cache-Control, both ways.
            (
                &[
                    ("cache-control", "no-cache"),
                    ("cdn-cache-control", "max-age=60"),
                ],
                Ok(60),
            ),
            (
                &[
                    ("cache-control", "private, max-age=0"),
                    ("cdn-cache-control", "public, max-age=600"),
                ],
                Ok(600),
            ),
            (
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "no-store"),
                ],
                Err(Bypass::TargetedField),
            ),
            (
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "max-age=0"),
                ],
                Err(Bypass::Stale),
            ),
            (
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "public"),
                ],
                Ok(3600),
            ),
            // Precedence: the configured order, first present and valid wins.
            (
                &[
                    ("mcpage-cache-control", "max-age=30"),
                    ("cdn-cache-control", "no-store"),
                ],
                Ok(30),
            ),
            (
                &[
                    ("cdn-cache-control", "max-age=40"),
                    ("surrogate-control", "max-age=0"),
                ],
                Ok(40),
            ),
            (
                &[
                    ("mcpage-cache-control", "max-age=30"),
                    ("cdn-cache-control", "max-age=40"),
                ],
                Ok(30),
            ),
            // Invalid or empty: ignored, the next one (or Cache-Control) governs...
            (
                &[
                    ("cdn-cache-control", "max-age 60"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[("cdn-cache-control", ""), ("cache-control", "max-age=50")],
                Ok(50),
            ),
            (
                &[
                    ("mcpage-cache-control", "\"x"),
                    ("cdn-cache-control", "max-age=40"),
                ],
                Ok(40),
            ),
            // ...but its private/no-store/no-cache still count (safe side).
            (
                &[
                    ("cdn-cache-control", "\"no-store\""),
                    ("cache-control", "max-age=50"),
                ],
                Err(Bypass::TargetedField),
            ),
            (
                &[("cdn-cache-control", "no-store;x")],
                Err(Bypass::TargetedField),
            ),
            // Not a Structured Field Dictionary, or max-age not an Integer
            // (RFC 9213 2.1): ignored, Cache-Control governs.
            (
                &[
                    ("cdn-cache-control", "max-age=10000, &&&&&"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[
                    ("cdn-cache-control", "max-age=\"10000\""),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[
                    ("cdn-cache-control", "max-age= 100"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[
                    ("cdn-cache-control", "MaX-aGe=100"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[
                    ("cdn-cache-control", "max-age=1.5"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[
                    ("cdn-cache-control", "foobar, max-age=100"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(100),
            ),
            (
                &[
                    ("surrogate-control", "max-age=100, content=\"ESI/1.0\""),
                    ("cache-control", "max-age=50"),
                ],
                Ok(100),
            ),
            (
                &[
                    ("surrogate-control", "max-age=60+30"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(50),
            ),
            (
                &[
                    ("cdn-cache-control", "max-age=-1"),
                    ("cache-control", "max-age=50"),
                ],
                Err(Bypass::Stale),
            ),
            (
                &[
                    ("cdn-cache-control", "max-age=99999999999"),
                    ("cache-control", "max-age=50"),
                ],
                Ok(3600),
            ),
            // Age applies to targeted lifetimes too.
            (
                &[("cdn-cache-control", "max-age=60"), ("age", "60")],
                Err(Bypass::Stale),
            ),
        ];
        for (pairs, expected) in table {
            let mut pairs = pairs.to_vec();
            pairs.push(html);
            assert_eq!(
                check_response(
                    &c,
                    3600,
                    StatusCode::OK,
                    &headers(&pairs),
                    b"/a",
                    Timing::at(now())
                ),
                *expected,
                "{pairs:?}"
            );
        }
        // A site's own list: only `edge-control` is honoured.
        let mut config = Config::default();
        config.cache.targeted_fields = vec!["edge-control".into()];
        let own = config.compile().expect("valid");
        let check = |pairs: &[(&str, &str)]| {
            let mut pairs = pairs.to_vec();
            pairs.push(html);
            check_response(
                &own,
                3600,
                StatusCode::OK,
                &headers(&pairs),
                b"/a",
                Timing::at(now()),
            )
        };
        assert_eq!(check(&[("edge-control", "max-age=5")]), Ok(5));
        assert_eq!(check(&[("cdn-cache-control", "max-age=5")]), Ok(3600));
    }

    /// The hit nginx produces must carry the response's Content-Type and
    /// security headers.
    #[test]
    fn representation_table() {
        let mut config = Config::default();
        config.cache.content_types = vec![
            "text/html".into(),
            "application/json".into(),
            "text/plain".into(),
        ];
        config.nginx.add_headers = vec![
            ("X-Frame-Options".into(), "DENY".into()),
            (
                "Content-Security-Policy".into(),
                "default-src 'self'".into(),
            ),
        ];
        let c = config.compile().expect("valid");
        let security: &[(&str, &str)] = &[
            ("x-frame-options", "DENY"),
            ("content-security-policy", "default-src 'self'"),
        ];
        let table: &[(&[u8], Headers, Result<u32, Bypass>)] = &[
            (
                b"/a",
                &[("content-type", "text/html; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/a",
                &[("content-type", "text/html;charset=UTF-8")],
                Ok(3600),
            ),
            (
                b"/a",
                &[("content-type", "Text/HTML; Charset=\"utf-8\"")],
                Ok(3600),
            ),
            (
                b"/a",
                &[("content-type", "text/html")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/a",
                &[("content-type", "text/html; charset=iso-8859-1")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/a",
                &[("content-type", "text/html; charset=utf-8; q=1")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/a",
                &[("content-type", "application/json; charset=utf-8")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/a",
                &[("content-type", "text/plain; charset=utf-8")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/a",
                &[("content-type", "image/png")],
                Err(Bypass::ContentType),
            ),
            (
                b"/a",
                &[("content-type", "text/html"), ("content-type", "text/html")],
                Err(Bypass::ContentType),
            ),
            // The URI's extension decides the hit's type (nginx `types`).
            (
                b"/api/x.json",
                &[("content-type", "application/json; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/api/x.JSON",
                &[("content-type", "application/json; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/api/x.json",
                &[("content-type", "application/json")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/api/x.json",
                &[("content-type", "text/html; charset=utf-8")],
                Err(Bypass::ContentTypeDiffers),
            ),
            (
                b"/robots.txt",
                &[("content-type", "text/plain; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/page.html",
                &[("content-type", "text/html; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/v1.2/page",
                &[("content-type", "text/html; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/.json",
                &[("content-type", "text/html; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/x.unknown",
                &[("content-type", "text/html; charset=utf-8")],
                Ok(3600),
            ),
            (
                b"/x.css",
                &[("content-type", "text/html; charset=utf-8")],
                Err(Bypass::ContentTypeDiffers),
            ),
        ];
        for (uri, pairs, expected) in table {
            let mut pairs = pairs.to_vec();
            pairs.extend_from_slice(security);
            assert_eq!(
                check_response(
                    &c,
                    3600,
                    StatusCode::OK,
                    &headers(&pairs),
                    uri,
                    Timing::at(now())
                ),
                *expected,
                "{} {pairs:?}",
                String::from_utf8_lossy(uri)
            );
        }
        let html = ("content-type", "text/html; charset=utf-8");
        let headers_table: &[(Headers, Result<u32, Bypass>)] = &[
            (
                &[
                    ("x-frame-options", "DENY"),
                    ("content-security-policy", "default-src 'self'"),
                ],
                Ok(3600),
            ),
            // A configured header missing, or with another value.
            (&[("x-frame-options", "DENY")], Err(Bypass::HeaderDiffers)),
            (
                &[
                    ("x-frame-options", "SAMEORIGIN"),
                    ("content-security-policy", "default-src 'self'"),
                ],
                Err(Bypass::HeaderDiffers),
            ),
            (
                &[
                    ("x-frame-options", "DENY"),
                    ("x-frame-options", "DENY"),
                    ("content-security-policy", "default-src 'self'"),
                ],
                Err(Bypass::HeaderDiffers),
            ),
            // A security header nginx would drop.
            (
                &[
                    ("x-frame-options", "DENY"),
                    ("content-security-policy", "default-src 'self'"),
                    ("x-content-type-options", "nosniff"),
                ],
                Err(Bypass::HeaderDiffers),
            ),
            (
                &[
                    ("x-frame-options", "DENY"),
                    ("content-security-policy", "default-src 'self'"),
                    ("content-disposition", "attachment"),
                ],
                Err(Bypass::HeaderDiffers),
            ),
            (
                &[
                    ("x-frame-options", "DENY"),
                    ("content-security-policy", "default-src 'self'"),
                    ("strict-transport-security", "max-age=1"),
                ],
                Err(Bypass::HeaderDiffers),
            ),
            // Other headers are dropped by a hit without harm (README).
            (
                &[
                    ("x-frame-options", "DENY"),
                    ("content-security-policy", "default-src 'self'"),
                    ("etag", "\"1\""),
                    ("link", "</a.css>; rel=preload"),
                ],
                Ok(3600),
            ),
        ];
        for (pairs, expected) in headers_table {
            let mut pairs = pairs.to_vec();
            pairs.push(html);
            assert_eq!(
                check_response(
                    &c,
                    3600,
                    StatusCode::OK,
                    &headers(&pairs),
                    b"/a",
                    Timing::at(now())
                ),
                *expected,
                "{pairs:?}"
            );
        }
        // Without add_headers, any security header means "not stored".
        let plain = compiled();
        let pairs = [html, ("x-content-type-options", "nosniff")];
        assert_eq!(
            check_response(
                &plain,
                3600,
                StatusCode::OK,
                &headers(&pairs),
                b"/a",
                Timing::at(now())
            ),
            Err(Bypass::HeaderDiffers)
        );
        // charset off: no charset on a hit, so none on the response.
        let mut config = Config::default();
        config.nginx.charset = "off".into();
        let off = config.compile().expect("valid");
        let check = |ct: &str| {
            check_response(
                &off,
                3600,
                StatusCode::OK,
                &headers(&[("content-type", ct)]),
                b"/a",
                Timing::at(now()),
            )
        };
        assert_eq!(check("text/html"), Ok(3600));
        assert_eq!(
            check("text/html; charset=utf-8"),
            Err(Bypass::ContentTypeDiffers)
        );
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
