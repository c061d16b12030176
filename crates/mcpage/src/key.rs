//! The nginx key contract: request target → `$uri` → `V` → memcached key `K`.
//!
//! Everything here works on bytes, never on `str`: `%FF` decodes to the single
//! byte `0xFF`, and nginx hands such bytes to memcached verbatim.
//!
//! - [`nginx_uri`] is an exact port of `ngx_http_parse_complex_uri` (nginx's
//!   `$uri` normalization, non-Win32), including every case where nginx answers
//!   400.
//! - [`memcached_escape`] is `ngx_escape_uri(…, NGX_ESCAPE_MEMCACHED)`: the key
//!   nginx sends in `get K`.
//! - [`nginx_host`] is nginx's `$host` (from `ngx_http_validate_host`).
//! - [`KeyScheme::page_key`] puts them together into the value `V` (hashed to
//!   pick the server, see [`crate::ring`]) and the key `K` (stored in memcached).
//!
//! See `reference/nginx-memcached.md` §1 and §5 for the verified contract.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// memcached's `KEY_MAX_LENGTH`: longer keys get `CLIENT_ERROR`, which nginx
/// turns into a 502 (not a 404), so such keys must never be stored.
pub const MAX_KEY_LEN: usize = 250;

/// nginx would answer `400 Bad Request` for this request target, so it never
/// looks anything up in memcached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequest;

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nginx answers 400 Bad Request for this request target")
    }
}

impl std::error::Error for BadRequest {}

/// The result of nginx's URI normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxUri {
    /// `$uri`: decoded and normalized, without the query. Always starts with `/`.
    pub uri: Vec<u8>,
    /// `$args`: the raw bytes after the `?` that ended the path, up to the first
    /// `#`. `None` when there was no such `?`; `Some(empty)` for `/about?`.
    pub args: Option<Vec<u8>>,
}

/// Normalizes an origin-form request target the way nginx computes `$uri` and
/// `$args` (`ngx_http_parse_complex_uri`, non-Win32).
///
/// `target` must start with `/` (anything else is [`BadRequest`]). Percent
/// escapes are decoded (`%2F` acts as `/`, `%2E` as `.`; `%25`, `%23` and `%3F`
/// become literal `%`, `#` and `?`), `.`/`..` segments are resolved, and with
/// `merge_slashes` (nginx's default) runs of `/` collapse. `+` stays `+`.
///
/// # Errors
/// [`BadRequest`] where nginx answers 400: `..` above the root, `%00`, and a
/// `%` not followed by two hex digits.
pub fn nginx_uri(target: &[u8], merge_slashes: bool) -> Result<NginxUri, BadRequest> {
    if target.first() != Some(&b'/') {
        return Err(BadRequest);
    }
    let mut uri = Vec::with_capacity(target.len());
    let args = parse_complex_uri(target, merge_slashes, false, &mut uri)?;
    Ok(NginxUri {
        uri,
        args: args.map(|r| target[r].to_vec()),
    })
}

/// Path states of `ngx_http_parse_complex_uri` (`sw_usual` … `sw_dot_dot`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Usual,
    Slash,
    Dot,
    DotDot,
}

/// Percent-decoding states (`sw_quoted`, `sw_quoted_second`); the path state is
/// kept aside meanwhile, which is nginx's `quoted_state`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    None,
    Hi,
    Lo(u8),
}

/// nginx's `usual[]` bitmap: bytes that never change the path state.
const fn is_usual(c: u8) -> bool {
    const USUAL: [u32; 8] = [
        0x0000_0000,
        0x7fff_37d6,
        0xffff_ffff,
        0x7fff_ffff,
        0xffff_ffff,
        0xffff_ffff,
        0xffff_ffff,
        0xffff_ffff,
    ];
    (USUAL[(c >> 5) as usize] >> (c & 0x1f)) & 1 == 1
}

const fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The range of `$args` in `target`: after the `?` at `start - 1`, up to `#`.
fn args_range(target: &[u8], start: usize) -> Range<usize> {
    let end = target[start..]
        .iter()
        .position(|&c| c == b'#')
        .map_or(target.len(), |k| start + k);
    start..end
}

/// Drops the last path segment: `out[base..]` ends with `/..`; truncate after
/// the `/` that precedes the segment before it. 400 when there is none.
fn pop_segment(out: &mut Vec<u8>, base: usize) -> Result<(), BadRequest> {
    let mut u = out.len().checked_sub(4).ok_or(BadRequest)?;
    loop {
        if u < base {
            return Err(BadRequest);
        }
        if out[u] == b'/' {
            out.truncate(u + 1);
            return Ok(());
        }
        u = u.checked_sub(1).ok_or(BadRequest)?;
    }
}

/// The state machine, appending `$uri` to `out` (which may already hold a
/// prefix: nothing before its current length is ever touched). Returns the
/// range of `$args` within `target`.
///
/// With `implicit_slash` a `/` is written first and `target` is the rest of an
/// absolute-form target with an empty path (`http://h` or `http://h?q`).
fn parse_complex_uri(
    target: &[u8],
    merge_slashes: bool,
    implicit_slash: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Range<usize>>, BadRequest> {
    let base = out.len();
    let mut state = Path::Usual;
    if implicit_slash {
        out.push(b'/');
        state = Path::Slash;
    }
    let mut quote = Quote::None;
    let mut i = 0;
    let n = target.len();
    while i < n {
        let raw = target[i];
        i += 1;
        let c = match quote {
            Quote::None => {
                if raw == b'%' {
                    quote = Quote::Hi;
                    continue;
                }
                if state == Path::Usual && is_usual(raw) {
                    // Fast path: copy the whole run of ordinary bytes.
                    let run = target[i..]
                        .iter()
                        .position(|&c| !is_usual(c))
                        .map_or(n, |k| i + k);
                    out.extend_from_slice(&target[i - 1..run]);
                    i = run;
                    continue;
                }
                raw
            }
            Quote::Hi => {
                quote = Quote::Lo(hex_val(raw).ok_or(BadRequest)?);
                continue;
            }
            Quote::Lo(hi) => {
                quote = Quote::None;
                let x = (hi << 4) | hex_val(raw).ok_or(BadRequest)?;
                match x {
                    b'%' | b'#' | b'?' => {
                        out.push(x);
                        state = Path::Usual;
                        continue;
                    }
                    0 => return Err(BadRequest),
                    // Re-fed through the switch below in the saved state.
                    _ => x,
                }
            }
        };
        match state {
            Path::Usual => match c {
                b'/' => {
                    out.push(c);
                    state = Path::Slash;
                }
                b'?' => return Ok(Some(args_range(target, i))),
                b'#' => return Ok(None),
                _ => out.push(c),
            },
            Path::Slash => match c {
                b'/' => {
                    if !merge_slashes {
                        out.push(c);
                    }
                }
                b'.' => {
                    out.push(c);
                    state = Path::Dot;
                }
                b'?' => return Ok(Some(args_range(target, i))),
                b'#' => return Ok(None),
                _ => {
                    out.push(c);
                    state = Path::Usual;
                }
            },
            Path::Dot => match c {
                b'/' => {
                    out.pop();
                    state = Path::Slash;
                }
                b'.' => {
                    out.push(c);
                    state = Path::DotDot;
                }
                b'?' => {
                    out.pop();
                    return Ok(Some(args_range(target, i)));
                }
                b'#' => {
                    out.pop();
                    return Ok(None);
                }
                _ => {
                    out.push(c);
                    state = Path::Usual;
                }
            },
            Path::DotDot => match c {
                b'/' => {
                    pop_segment(out, base)?;
                    state = Path::Slash;
                }
                b'?' => {
                    pop_segment(out, base)?;
                    return Ok(Some(args_range(target, i)));
                }
                b'#' => {
                    pop_segment(out, base)?;
                    return Ok(None);
                }
                _ => {
                    out.push(c);
                    state = Path::Usual;
                }
            },
        }
    }
    if quote != Quote::None {
        return Err(BadRequest);
    }
    match state {
        Path::Dot => {
            out.pop();
        }
        Path::DotDot => pop_segment(out, base)?,
        Path::Usual | Path::Slash => {}
    }
    Ok(None)
}

/// Whether nginx's `NGX_ESCAPE_MEMCACHED` table escapes this byte
/// (`0x00`–`0x20` and `%`).
const fn needs_escape(c: u8) -> bool {
    c <= 0x20 || c == b'%'
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// `ngx_escape_uri(V, NGX_ESCAPE_MEMCACHED)`: the key nginx sends as `get K`.
///
/// Bytes `0x00`–`0x20` and `%` become `%XX` (UPPERCASE hex); everything else,
/// including DEL (`0x7F`) and `0x80`–`0xFF`, is copied. The mapping is
/// injective; see [`memcached_unescape`].
pub fn memcached_escape(value: &[u8]) -> Vec<u8> {
    let escapes = value.iter().filter(|&&c| needs_escape(c)).count();
    let mut out = Vec::with_capacity(value.len() + 2 * escapes);
    push_escaped(value, &mut out);
    out
}

fn push_escaped(value: &[u8], out: &mut Vec<u8>) {
    for &c in value {
        if needs_escape(c) {
            out.extend_from_slice(&[
                b'%',
                HEX_UPPER[usize::from(c >> 4)],
                HEX_UPPER[usize::from(c & 0xf)],
            ]);
        } else {
            out.push(c);
        }
    }
}

/// The inverse of [`memcached_escape`]: recovers `V` from a stored key `K`
/// (to route it to its server, which hashes `V`).
///
/// Strict: returns `None` unless `key` is exactly what [`memcached_escape`]
/// produces for some value, i.e. `unescape(k) == Some(v)` implies
/// `escape(v) == k`. So a `%` must be followed by two UPPERCASE hex digits
/// naming a byte that escaping escapes (`%41` is rejected), and raw bytes
/// `0x00`–`0x20` are rejected.
pub fn memcached_unescape(key: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(key.len());
    let mut i = 0;
    while i < key.len() {
        let c = key[i];
        if c == b'%' {
            let hi = upper_hex_val(*key.get(i + 1)?)?;
            let lo = upper_hex_val(*key.get(i + 2)?)?;
            let x = (hi << 4) | lo;
            if !needs_escape(x) {
                return None;
            }
            out.push(x);
            i += 3;
        } else if needs_escape(c) {
            return None;
        } else {
            out.push(c);
            i += 1;
        }
    }
    Some(out)
}

const fn upper_hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Whether the `memcache` crate's meta client sends this key base64-encoded
/// (`b` flag): any byte `<= 0x20` or `0x7F`.
const fn is_base64_trigger(c: u8) -> bool {
    c <= 0x20 || c == 0x7f
}

/// The key length memcached checks against [`MAX_KEY_LEN`] for a key sent by
/// the `memcache` crate's meta client.
///
/// That client base64-encodes (standard alphabet, padded) any key containing a
/// byte `<= 0x20` or `0x7F`, and memcached checks the encoded length: so this
/// is `key.len()` for a plain key and `4 * ceil(key.len() / 3)` otherwise.
/// After nginx escaping only DEL (`0x7F`) can trigger this, e.g. `/x%7F`.
pub fn wire_key_len(key: &[u8]) -> usize {
    if key.iter().any(|&c| is_base64_trigger(c)) {
        base64_len(key.len())
    } else {
        key.len()
    }
}

const fn base64_len(n: usize) -> usize {
    4 * n.div_ceil(3)
}

/// nginx's `$host` from a raw `Host` header value (or the host of an
/// absolute-form request line): `None` when nginx would reject it.
///
/// Port of `ngx_http_validate_host` plus the normalization nginx applies:
/// ASCII letters are lowercased, a `:port` suffix is removed (after `]` for an
/// `[ipv6]` literal), and one trailing `.` is removed.
///
/// Rejected, as nginx does: empty (also after trimming), `/`, control bytes,
/// space and DEL, and `..`. Rejected in addition, to stay on the safe side of
/// every nginx version (a rejected host only means "not cached"): a leading
/// `.`, a `[` that is not the first byte, a `]` without a leading `[`, an
/// unclosed `[`, and anything but `:` and digits after the host (`[::1]x`,
/// `host:80x`).
pub fn nginx_host(raw: &[u8]) -> Option<Vec<u8>> {
    host_part(raw).map(<[u8]>::to_ascii_lowercase)
}

/// Validates `raw` as [`nginx_host`] does and returns the part that becomes
/// `$host` once lowercased.
fn host_part(raw: &[u8]) -> Option<&[u8]> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum St {
        Usual,
        Literal,
        Rest,
    }
    let mut dot_pos: Option<usize> = None;
    let mut host_len = raw.len();
    let mut state = St::Usual;
    for (i, &ch) in raw.iter().enumerate() {
        match ch {
            b'.' => {
                if i == 0 || dot_pos == Some(i - 1) {
                    return None;
                }
                dot_pos = Some(i);
            }
            b':' if state == St::Usual => {
                host_len = i;
                state = St::Rest;
            }
            b'[' => {
                if i != 0 {
                    return None;
                }
                state = St::Literal;
            }
            b']' => {
                if state != St::Literal {
                    return None;
                }
                host_len = i + 1;
                state = St::Rest;
            }
            b'/' => return None,
            _ if ch <= 0x20 || ch == 0x7f => return None,
            _ => {}
        }
    }
    if state == St::Literal {
        return None;
    }
    // Only `:digits` (possibly empty) may follow the host.
    if let Some((&first, port)) = raw[host_len..].split_first()
        && (first != b':' || !port.iter().all(u8::is_ascii_digit))
    {
        return None;
    }
    if host_len > 0 && dot_pos == Some(host_len - 1) {
        host_len -= 1;
    }
    if host_len == 0 {
        return None;
    }
    Some(&raw[..host_len])
}

/// How a query string takes part in the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    /// nginx keys on `$uri`; a request with a query string (even an empty `?`)
    /// is never cached (nginx sends it to the application).
    #[default]
    Bypass,
    /// nginx keys on `"$uri?$args"`: `V` always contains `?`, even when the
    /// query is empty or absent (`/about?`).
    Include,
}

/// Why a request gets no cache key (it is then simply not cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySkip {
    /// nginx answers 400 for this request target (or its request-line host).
    BadRequest,
    /// A query string is present and the scheme is [`QueryMode::Bypass`].
    QueryString,
    /// The key is longer than [`MAX_KEY_LEN`] as memcached counts it
    /// ([`wire_key_len`]).
    TooLong,
    /// Host mode: the host is missing or nginx would reject it.
    BadHost,
}

impl KeySkip {
    /// A short, stable `snake_case` reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            KeySkip::BadRequest => "bad_request",
            KeySkip::QueryString => "query_string",
            KeySkip::TooLong => "key_too_long",
            KeySkip::BadHost => "bad_host",
        }
    }
}

impl fmt::Display for KeySkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for KeySkip {}

/// The cache key of one request, as nginx computes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// `V`, the value of nginx's `$memcached_key` as nginx evaluates it
    /// (unescaped); nginx hashes it to pick the server (`ngx_http_upstream_hash`).
    pub unescaped: Vec<u8>,
    /// `K = escape(V)`, the memcached key nginx sends on the wire
    /// (`ngx_escape_uri` with `NGX_ESCAPE_MEMCACHED`).
    pub escaped: Vec<u8>,
    /// The normalized `$uri` (no prefix, host or query), for include/exclude
    /// matching.
    pub uri: Vec<u8>,
}

/// How `V` is built; mirror of nginx's `set $memcached_key …;`.
///
/// | `query` | `host` | nginx |
/// |---|---|---|
/// | `Bypass` | `false` | `set $memcached_key "<prefix>$uri";` |
/// | `Include` | `false` | `set $memcached_key "<prefix>$uri?$args";` |
/// | `Bypass` | `true` | `set $memcached_key "<prefix>$host$uri";` |
/// | `Include` | `true` | `set $memcached_key "<prefix>$host$uri?$args";` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScheme {
    prefix: Vec<u8>,
    query: QueryMode,
    merge_slashes: bool,
    host: bool,
}

impl KeyScheme {
    /// A key scheme: `prefix` is the literal text before `$uri` (or `$host`) in
    /// nginx's `$memcached_key`, `merge_slashes` nginx's directive of that name
    /// (on by default), `host` whether `$host` is part of the key.
    pub fn new(
        prefix: impl Into<Vec<u8>>,
        query: QueryMode,
        merge_slashes: bool,
        host: bool,
    ) -> KeyScheme {
        KeyScheme {
            prefix: prefix.into(),
            query,
            merge_slashes,
            host,
        }
    }

    /// The literal key prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// How the query string takes part in the key.
    pub fn query(&self) -> QueryMode {
        self.query
    }

    /// nginx's `merge_slashes`.
    pub fn merge_slashes(&self) -> bool {
        self.merge_slashes
    }

    /// Whether `$host` is part of the key.
    pub fn host(&self) -> bool {
        self.host
    }

    /// The key nginx looks up for this request.
    ///
    /// - `host`: the raw `Host` header value (only used in host mode). It is
    ///   normalized to `$host` by [`nginx_host`]. For an absolute-form target
    ///   the host of the target wins, as in nginx.
    /// - `target`: the raw request target as received (`path?query`, as from
    ///   `http::Uri::path_and_query()` of the original URI); absolute-form
    ///   `http://h/p?q` is accepted too and keyed on its `/p?q` part.
    ///
    /// `V = prefix [+ $host] + $uri [+ "?" + $args]`, `K = escape(V)`.
    ///
    /// # Errors
    /// Checked in this order: [`KeySkip::BadRequest`] (nginx answers 400 for
    /// the target), [`KeySkip::BadHost`] (host mode: missing or invalid host),
    /// [`KeySkip::QueryString`] (a `?` in bypass mode), [`KeySkip::TooLong`]
    /// (`wire_key_len(K) > 250`).
    pub fn page_key(&self, host: Option<&[u8]>, target: &[u8]) -> Result<PageKey, KeySkip> {
        let Target {
            path,
            implicit_slash,
            line_host,
        } = split_target(target)?;
        let host = if self.host {
            // The request-line host of an absolute-form target wins, as in nginx.
            match line_host.or(host).and_then(host_part) {
                Some(h) => Some(h),
                None => {
                    // nginx answers 400 either way; report the target first.
                    let mut scratch = Vec::with_capacity(path.len() + 1);
                    return Err(
                        match parse_complex_uri(
                            path,
                            self.merge_slashes,
                            implicit_slash,
                            &mut scratch,
                        ) {
                            Ok(_) => KeySkip::BadHost,
                            Err(BadRequest) => KeySkip::BadRequest,
                        },
                    );
                }
            }
        } else {
            None
        };

        // One buffer for V: prefix, then $host, then $uri parsed in place.
        let mut value =
            Vec::with_capacity(self.prefix.len() + host.map_or(0, <[u8]>::len) + path.len() + 2);
        value.extend_from_slice(&self.prefix);
        if let Some(h) = host {
            value.extend(h.iter().map(u8::to_ascii_lowercase));
        }
        let uri_start = value.len();
        let args = parse_complex_uri(path, self.merge_slashes, implicit_slash, &mut value)
            .map_err(|BadRequest| KeySkip::BadRequest)?;
        let uri_end = value.len();
        match self.query {
            QueryMode::Bypass => {
                if args.is_some() {
                    return Err(KeySkip::QueryString);
                }
            }
            QueryMode::Include => {
                value.push(b'?');
                if let Some(r) = args {
                    value.extend_from_slice(&path[r]);
                }
            }
        }

        // Length as memcached will count it, before building K.
        let (escapes, base64) = value.iter().fold((0usize, false), |(n, b), &c| {
            (n + usize::from(needs_escape(c)), b || c == 0x7f)
        });
        let key_len = value.len() + 2 * escapes;
        let wire = if base64 { base64_len(key_len) } else { key_len };
        if wire > MAX_KEY_LEN {
            return Err(KeySkip::TooLong);
        }
        let mut key = Vec::with_capacity(key_len);
        push_escaped(&value, &mut key);
        let uri = value[uri_start..uri_end].to_vec();
        Ok(PageKey {
            unescaped: value,
            escaped: key,
            uri,
        })
    }
}

/// A request target split for normalization.
struct Target<'a> {
    /// The part nginx normalizes (origin-form, or what follows the authority).
    path: &'a [u8],
    /// The path was empty (`http://h`, `http://h?q`): nginx uses `/`, and
    /// `path` is the remainder (`""`, `?q`).
    implicit_slash: bool,
    /// The host of an absolute-form target (validated).
    line_host: Option<&'a [u8]>,
}

/// The host of an absolute-form request target (`http://h:8080/p` gives
/// `h:8080`), which nginx uses instead of the `Host` header; `None` for
/// origin-form (`/p`) and for targets nginx rejects.
pub fn request_line_host(target: &[u8]) -> Option<&[u8]> {
    split_target(target).ok()?.line_host
}

/// Is the raw path of `target` the canonical spelling of `uri`, the `$uri`
/// nginx keys it on? Only then does an app that routes on the raw path (as
/// nginx's `proxy_pass` without a URI part hands it) answer for the very page
/// the key names. Canonical means: percent-decoding the raw path gives exactly
/// `uri` (no `//` when slashes are merged, no `.` or `..` segments, nothing
/// nginx rewrote), no `%2F` (an encoded slash that raw routers keep as one
/// segment and nginx decodes), and no percent-encoded unreserved character
/// (`A-Z a-z 0-9 - . _ ~`, RFC 3986 2.3: equivalent, but spelled otherwise).
/// Other escapes (non-ASCII bytes, spaces, reserved characters) are fine.
///
/// A non-canonical target still gets the canonical page from nginx on a hit;
/// the layer only refuses to store what the app answers for it.
pub fn is_canonical_path(target: &[u8], uri: &[u8]) -> bool {
    let Ok(Target {
        path,
        implicit_slash,
        ..
    }) = split_target(target)
    else {
        return false;
    };
    let raw = path.split(|&c| c == b'?').next().unwrap_or_default();
    if implicit_slash {
        return raw.is_empty() && uri == b"/";
    }
    let hex = |c: u8| (c as char).to_digit(16);
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&c) = raw.get(i) {
        if c == b'%' {
            let (Some(hi), Some(lo)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) else {
                return false;
            };
            let byte = u8::try_from(hi * 16 + lo).unwrap_or(0);
            if byte == b'/'
                || byte.is_ascii_alphanumeric()
                || matches!(byte, b'-' | b'.' | b'_' | b'~')
            {
                return false;
            }
            decoded.push(byte);
            i += 3;
        } else {
            decoded.push(c);
            i += 1;
        }
    }
    decoded == uri
}

/// Splits a request target into the part nginx normalizes and, for
/// absolute-form, the request-line host.
fn split_target(target: &[u8]) -> Result<Target<'_>, KeySkip> {
    // nginx's request-line parser answers 400 for raw control bytes, space and DEL.
    if target.iter().any(|&c| c <= b' ' || c == 0x7f) {
        return Err(KeySkip::BadRequest);
    }
    match target.first() {
        Some(b'/') => {
            return Ok(Target {
                path: target,
                implicit_slash: false,
                line_host: None,
            });
        }
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return Err(KeySkip::BadRequest),
    }
    // scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) "://"
    let colon = target
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')))
        .ok_or(KeySkip::BadRequest)?;
    let rest = target[colon..]
        .strip_prefix(b"://")
        .ok_or(KeySkip::BadRequest)?;
    let auth_end = rest
        .iter()
        .position(|&c| c == b'/' || c == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(auth_end);
    if !request_line_host_ok(authority) || host_part(authority).is_none() {
        return Err(KeySkip::BadRequest);
    }
    Ok(Target {
        path,
        implicit_slash: path.first() != Some(&b'/'),
        line_host: Some(authority),
    })
}

/// The characters nginx's request-line parser accepts in an absolute-form host
/// (`sw_host`, `sw_host_ip_literal`, `sw_port`); anything else is a 400.
fn request_line_host_ok(authority: &[u8]) -> bool {
    let port = if authority.first() == Some(&b'[') {
        let Some(close) = authority.iter().position(|&c| c == b']') else {
            return false;
        };
        let literal_ok = authority[1..close].iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b':' | b'-'
                        | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        });
        if !literal_ok {
            return false;
        }
        &authority[close + 1..]
    } else {
        let end = authority
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || c == b'.' || c == b'-'))
            .unwrap_or(authority.len());
        &authority[end..]
    };
    match port.split_first() {
        None => true,
        Some((&b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// A URL as a user writes it, for invalidation and probes: `http://host/path?q`
/// → (Some(host), "/path?q"); `/path` → (None, "/path").
pub fn split_url(url: &str) -> (Option<&str>, &str) {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            return match rest.find('/') {
                Some(slash) => (Some(&rest[..slash]), &rest[slash..]),
                None => (Some(rest), "/"),
            };
        }
    }
    (None, url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_paths() {
        let scheme = KeyScheme::new("", QueryMode::Include, true, false);
        let table: &[(&[u8], bool)] = &[
            (b"/posts/1", true),
            (b"/posts/1?a=b", true),
            (b"/", true),
            (b"/caf%C3%A9", true),
            (b"/caf\xc3\xa9", true),
            (b"/a%20b", true),
            (b"/a%3Bb", true),
            (b"/posts//1", false),
            (b"/posts/./1", false),
            (b"/posts/x/../1", false),
            (b"/posts%2F1", false),
            (b"/posts%2f1", false),
            (b"/%70osts/1", false),
            (b"/posts/%31", false),
            (b"/a%2Eb", false),
            (b"/a%7Eb", false),
            (b"/a/%2e%2e/b", false),
            (b"http://example.com/posts/1", true),
            (b"http://example.com", true),
            (b"http://example.com//x", false),
        ];
        for (target, canonical) in table {
            let key = scheme.page_key(Some(b"example.com"), target).expect("key");
            assert_eq!(
                is_canonical_path(target, &key.uri),
                *canonical,
                "{}",
                String::from_utf8_lossy(target)
            );
        }
        // Not merged: `//` is nginx's own $uri, so it is canonical.
        let unmerged = KeyScheme::new("", QueryMode::Bypass, false, false);
        let key = unmerged.page_key(None, b"/a//b").expect("key");
        assert!(is_canonical_path(b"/a//b", &key.uri));
    }

    fn uri(t: &[u8]) -> Option<Vec<u8>> {
        nginx_uri(t, true).ok().map(|u| u.uri)
    }

    #[test]
    fn url_splitting() {
        assert_eq!(split_url("/a//b"), (None, "/a//b"));
        assert_eq!(
            split_url("http://example.com/x?y"),
            (Some("example.com"), "/x?y")
        );
        assert_eq!(split_url("https://example.com"), (Some("example.com"), "/"));
    }

    #[test]
    fn spec_table_section_5() {
        let rows: &[(&[u8], &[u8], &[u8])] = &[
            (b"/a//b", b"/a/b", b"/a/b"),
            (b"/a/./b", b"/a/b", b"/a/b"),
            (b"/a%2Fb", b"/a/b", b"/a/b"),
            (b"/a/b/../c", b"/a/c", b"/a/c"),
            (b"/a/%2e%2e/c", b"/c", b"/c"),
            (b"/a%2f..%2fb", b"/b", b"/b"),
            (b"/a/.", b"/a/", b"/a/"),
            (b"/a/..", b"/", b"/"),
            (b"//", b"/", b"/"),
            (b"/%2e/x", b"/x", b"/x"),
            (b"/caf%C3%A9", b"/caf\xC3\xA9", b"/caf\xC3\xA9"),
            (b"/caf%c3%a9", b"/caf\xC3\xA9", b"/caf\xC3\xA9"),
            (b"/caf\xC3\xA9", b"/caf\xC3\xA9", b"/caf\xC3\xA9"),
            (b"/x%20y", b"/x y", b"/x%20y"),
            (b"/100%25", b"/100%", b"/100%25"),
            (b"/x%0Ay", b"/x\ny", b"/x%0Ay"),
            (b"/x%7F", b"/x\x7F", b"/x\x7F"),
            (b"/q%3Fx?y=1", b"/q?x", b"/q?x"),
            (b"/h%23x", b"/h#x", b"/h#x"),
            (b"/p+q", b"/p+q", b"/p+q"),
            (b"/.hidden", b"/.hidden", b"/.hidden"),
            (b"/a/...", b"/a/...", b"/a/..."),
            (b"/", b"/", b"/"),
        ];
        for &(target, v, k) in rows {
            let got = nginx_uri(target, true).expect("valid target");
            assert_eq!(got.uri, v, "{}", target.escape_ascii());
            assert_eq!(memcached_escape(&got.uri), k, "{}", target.escape_ascii());
        }
        // `$request_uri` of `/a/%2e%2e/c` is the raw target.
        assert_eq!(memcached_escape(b"/a/%2e%2e/c"), b"/a/%252e%252e/c");
    }

    #[test]
    fn bad_requests() {
        let bad: &[&[u8]] = &[
            b"/../x",
            b"/a/../../x",
            b"/a%00b",
            b"/a%zz",
            b"/a%2",
            b"/a%",
            b"/a%g0",
            b"/%2e%2e",
            b"/%2E%2E/x",
            b"/..",
            b"/..?x",
            b"/..#x",
            b"/a/b/../../..",
            b"/a%2f%2e%2e%2f..",
            b"",
            b"a/b",
            b"*",
            b"%2Fa",
        ];
        for &t in bad {
            assert_eq!(nginx_uri(t, true), Err(BadRequest), "{}", t.escape_ascii());
            assert_eq!(nginx_uri(t, false), Err(BadRequest), "{}", t.escape_ascii());
        }
    }

    #[test]
    fn args_and_fragments() {
        let n = nginx_uri(b"/about?", true).expect("valid");
        assert_eq!(
            (n.uri.as_slice(), n.args.as_deref()),
            (&b"/about"[..], Some(&b""[..]))
        );
        let n = nginx_uri(b"/a?x=1&y=%2F#frag", true).expect("valid");
        assert_eq!(n.args.as_deref(), Some(&b"x=1&y=%2F"[..]));
        let n = nginx_uri(b"/a#b?c", true).expect("valid");
        assert_eq!((n.uri.as_slice(), n.args), (&b"/a"[..], None));
        let n = nginx_uri(b"/a/.?q", true).expect("valid");
        assert_eq!(
            (n.uri.as_slice(), n.args.as_deref()),
            (&b"/a/"[..], Some(&b"q"[..]))
        );
        let n = nginx_uri(b"/a/b/..?q", true).expect("valid");
        assert_eq!(
            (n.uri.as_slice(), n.args.as_deref()),
            (&b"/a/"[..], Some(&b"q"[..]))
        );
        let n = nginx_uri(b"/a?b?c", true).expect("valid");
        assert_eq!(n.args.as_deref(), Some(&b"b?c"[..]));
        let n = nginx_uri(b"/a%3Fb", true).expect("valid");
        assert_eq!((n.uri.as_slice(), n.args), (&b"/a?b"[..], None));
        // A bad escape after '?' does not matter: the path ended.
        let n = nginx_uri(b"/a?%zz", true).expect("valid");
        assert_eq!(n.args.as_deref(), Some(&b"%zz"[..]));
    }

    #[test]
    fn merge_slashes_off() {
        let u = |t: &[u8]| nginx_uri(t, false).expect("valid").uri;
        assert_eq!(u(b"/a//b"), b"/a//b");
        assert_eq!(u(b"//"), b"//");
        assert_eq!(u(b"/a%2F%2Fb"), b"/a//b");
        assert_eq!(u(b"/a//../b"), b"/a/b");
        assert_eq!(uri(b"/a//../b").as_deref(), Some(&b"/b"[..]));
    }

    #[test]
    fn decoded_specials_reset_state() {
        // %25 / %23 / %3F are literal and leave the path state at "usual":
        // a following "/.." still works from there.
        assert_eq!(uri(b"/a%25/../b").as_deref(), Some(&b"/b"[..]));
        assert_eq!(uri(b"/%25..").as_deref(), Some(&b"/%.."[..]));
        assert_eq!(uri(b"/.%25").as_deref(), Some(&b"/.%"[..]));
        assert_eq!(uri(b"/a/%2E").as_deref(), Some(&b"/a/"[..]));
        assert_eq!(uri(b"/a/.%2E/b").as_deref(), Some(&b"/b"[..]));
    }

    #[test]
    fn escape_table() {
        for c in 0u8..=255 {
            let e = memcached_escape(&[c]);
            if c <= 0x20 || c == b'%' {
                assert_eq!(e, format!("%{c:02X}").into_bytes());
            } else {
                assert_eq!(e, [c]);
            }
            assert_eq!(memcached_unescape(&e), Some(vec![c]));
        }
    }

    #[test]
    fn unescape_rejects() {
        let bad: &[&[u8]] = &[
            b"%", b"%2", b"%zz", b"%0a", b"%41", b"a b", b"\n", b"%%", b"/%7F", b"%2g",
        ];
        for &k in bad {
            assert_eq!(memcached_unescape(k), None, "{}", k.escape_ascii());
        }
        assert_eq!(
            memcached_unescape(b"/x\x7F").as_deref(),
            Some(&b"/x\x7F"[..])
        );
        assert_eq!(
            memcached_unescape(b"/100%25").as_deref(),
            Some(&b"/100%"[..])
        );
    }

    #[test]
    fn wire_length() {
        assert_eq!(wire_key_len(b"/abc"), 4);
        assert_eq!(wire_key_len(b"/x\x7F"), 4);
        assert_eq!(wire_key_len(b"/x\x7Fy"), 8);
        assert_eq!(wire_key_len(&[b'a'; 250]), 250);
        let mut k = vec![b'a'; 200];
        k[100] = 0x7f;
        assert_eq!(wire_key_len(&k), 268);

        let s = KeyScheme::new("", QueryMode::Bypass, true, false);
        let pk = s.page_key(None, b"/x%7F").expect("short");
        assert_eq!(pk.escaped, b"/x\x7F");
        // 200 bytes with a DEL: 268 on the wire, too long.
        let mut t = b"/".to_vec();
        t.extend_from_slice(&[b'a'; 196]);
        t.extend_from_slice(b"%7F");
        assert_eq!(s.page_key(None, &t).map(|_| ()), Err(KeySkip::TooLong));
        // 187 bytes with a DEL: 4 * 63 = 252 > 250.
        let mut t = b"/".to_vec();
        t.extend_from_slice(&[b'a'; 185]);
        t.extend_from_slice(b"%7F");
        assert_eq!(s.page_key(None, &t).map(|_| ()), Err(KeySkip::TooLong));
        // 186 bytes with a DEL: 4 * 62 = 248.
        let mut t = b"/".to_vec();
        t.extend_from_slice(&[b'a'; 184]);
        t.extend_from_slice(b"%7F");
        assert_eq!(s.page_key(None, &t).map(|k| k.escaped.len()), Ok(186));
    }

    #[test]
    fn length_limit_exact() {
        let s = KeyScheme::new("page:", QueryMode::Bypass, true, false);
        let mut t = b"/".to_vec();
        t.extend_from_slice(&[b'a'; 244]);
        let k = s.page_key(None, &t).expect("250 bytes fit");
        assert_eq!(k.escaped.len(), 250);
        t.push(b'a');
        assert_eq!(s.page_key(None, &t), Err(KeySkip::TooLong));
        // Escapes count: 82 spaces are 246 bytes escaped, + "page:/" = 252.
        let mut t = b"/".to_vec();
        for _ in 0..82 {
            t.extend_from_slice(b"%20");
        }
        assert_eq!(s.page_key(None, &t), Err(KeySkip::TooLong));
    }

    #[test]
    fn query_modes() {
        let bypass = KeyScheme::new("", QueryMode::Bypass, true, false);
        let include = KeyScheme::new("", QueryMode::Include, true, false);
        assert_eq!(bypass.page_key(None, b"/about?"), Err(KeySkip::QueryString));
        assert_eq!(
            bypass.page_key(None, b"/about?x=1"),
            Err(KeySkip::QueryString)
        );
        let k = bypass.page_key(None, b"/about#x?y").expect("fragment only");
        assert_eq!(k.unescaped, b"/about");
        let k = bypass.page_key(None, b"/a%3Fb").expect("no query");
        assert_eq!(
            (k.unescaped.as_slice(), k.escaped.as_slice()),
            (&b"/a?b"[..], &b"/a?b"[..])
        );

        let k = include.page_key(None, b"/about").expect("ok");
        assert_eq!(k.unescaped, b"/about?");
        assert_eq!(k.uri, b"/about");
        let k = include.page_key(None, b"/about?").expect("ok");
        assert_eq!(k.unescaped, b"/about?");
        let k = include
            .page_key(None, b"/a//b/../c?x=%20y&z=1+2#f")
            .expect("ok");
        assert_eq!(k.unescaped, b"/a/c?x=%20y&z=1+2");
        assert_eq!(k.escaped, b"/a/c?x=%2520y&z=1+2");
        // Raw spaces and control bytes never reach $uri: nginx answers 400.
        for raw in [&b"/a b"[..], b"/a\tb", b"/a?x=1 2", b"/\x7f"] {
            assert_eq!(
                include.page_key(None, raw),
                Err(KeySkip::BadRequest),
                "{raw:?}"
            );
        }
        assert_eq!(k.uri, b"/a/c");
        assert_eq!(include.page_key(None, b"/../x?y"), Err(KeySkip::BadRequest));
    }

    #[test]
    fn prefix_handling() {
        let s = KeyScheme::new("page:", QueryMode::Bypass, true, false);
        let k = s.page_key(None, b"/about").expect("ok");
        assert_eq!(k.unescaped, b"page:/about");
        assert_eq!(k.escaped, b"page:/about");
        assert_eq!(k.uri, b"/about");
        // `..` can never climb into the prefix, even one with slashes.
        let s = KeyScheme::new("site/a/", QueryMode::Bypass, true, false);
        assert_eq!(s.page_key(None, b"/../x"), Err(KeySkip::BadRequest));
        let k = s.page_key(None, b"/b/../x").expect("ok");
        assert_eq!(k.unescaped, b"site/a//x");
        // A prefix with bytes that need escaping is escaped as nginx would.
        let s = KeyScheme::new(b"p %".to_vec(), QueryMode::Bypass, true, false);
        let k = s.page_key(None, b"/").expect("ok");
        assert_eq!(k.escaped, b"p%20%25/");
        assert_eq!(s.prefix(), b"p %");
        assert_eq!(s.query(), QueryMode::Bypass);
        assert!(s.merge_slashes());
        assert!(!s.host());
    }

    #[test]
    fn host_normalization() {
        let rows: &[(&[u8], Option<&[u8]>)] = &[
            (b"example.com", Some(b"example.com")),
            (b"Example.COM", Some(b"example.com")),
            (b"example.com:8080", Some(b"example.com")),
            (b"example.com.", Some(b"example.com")),
            (b"example.com.:80", Some(b"example.com")),
            (b"example.com:", Some(b"example.com")),
            (b"[::1]", Some(b"[::1]")),
            (b"[::1]:8080", Some(b"[::1]")),
            (b"[FE80::1]", Some(b"[fe80::1]")),
            (b"127.0.0.1:11211", Some(b"127.0.0.1")),
            (b"caf\xC3\xA9.example", Some(b"caf\xC3\xA9.example")),
            (b"under_score", Some(b"under_score")),
            (b"", None),
            (b".", None),
            (b":80", None),
            (b"example..com", None),
            (b".example.com", None),
            (b"example.com..", None),
            (b"a/b", None),
            (b"a\0b", None),
            (b"a b", None),
            (b"a\tb", None),
            (b"a\x7Fb", None),
            (b"[::1", None),
            (b"::1]", None),
            (b"a[b]", None),
            (b"[::1]x", None),
            (b"[::1]:80x", None),
            (b"host:80x", None),
            (b"host:8:0", None),
        ];
        for &(raw, want) in rows {
            assert_eq!(nginx_host(raw).as_deref(), want, "{}", raw.escape_ascii());
        }
    }

    #[test]
    fn host_mode() {
        let s = KeyScheme::new("p:", QueryMode::Bypass, true, true);
        let k = s
            .page_key(Some(b"WWW.Example.com:8080"), b"/a//b")
            .expect("ok");
        assert_eq!(k.unescaped, b"p:www.example.com/a/b");
        assert_eq!(k.uri, b"/a/b");
        assert_eq!(s.page_key(None, b"/"), Err(KeySkip::BadHost));
        assert_eq!(s.page_key(Some(b""), b"/"), Err(KeySkip::BadHost));
        assert_eq!(s.page_key(Some(b"a..b"), b"/"), Err(KeySkip::BadHost));
        // Bad target wins over bad host.
        assert_eq!(s.page_key(Some(b"a..b"), b"/.."), Err(KeySkip::BadRequest));
        // `..` cannot climb into the host.
        assert_eq!(s.page_key(Some(b"h"), b"/../x"), Err(KeySkip::BadRequest));
        let inc = KeyScheme::new("", QueryMode::Include, true, true);
        let k = inc.page_key(Some(b"h.example"), b"/x?q=1").expect("ok");
        assert_eq!(k.unescaped, b"h.example/x?q=1");
        // Without host mode the header is ignored.
        let plain = KeyScheme::new("", QueryMode::Bypass, true, false);
        let k = plain.page_key(Some(b"bad..host"), b"/x").expect("ok");
        assert_eq!(k.unescaped, b"/x");
    }

    #[test]
    fn absolute_form() {
        let s = KeyScheme::new("", QueryMode::Include, true, false);
        let k = s
            .page_key(None, b"http://example.com/a//b?q=1")
            .expect("ok");
        assert_eq!(k.unescaped, b"/a/b?q=1");
        let k = s.page_key(None, b"http://example.com").expect("ok");
        assert_eq!(k.unescaped, b"/?");
        let k = s.page_key(None, b"https://example.com:8443?x").expect("ok");
        assert_eq!(k.unescaped, b"/?x");
        assert_eq!(k.uri, b"/");
        let k = s.page_key(None, b"HTTP://[::1]:80/p").expect("ok");
        assert_eq!(k.unescaped, b"/p?");
        for bad in [
            &b"http:/x"[..],
            b"http//x/",
            b"http://",
            b"http:///p",
            b"http://u@h/p",
            b"http://h:x/p",
            b"http://h..x/p",
            b"http://[::1/p",
            b"http://h/../p",
            b"1http://h/",
        ] {
            assert_eq!(
                s.page_key(None, bad),
                Err(KeySkip::BadRequest),
                "{}",
                bad.escape_ascii()
            );
        }
        // Host mode: the request-line host wins over the Host header.
        let h = KeyScheme::new("", QueryMode::Bypass, true, true);
        let k = h
            .page_key(Some(b"other"), b"http://Example.com./p")
            .expect("ok");
        assert_eq!(k.unescaped, b"example.com/p");
        let k = h.page_key(None, b"http://example.com/p").expect("ok");
        assert_eq!(k.unescaped, b"example.com/p");
    }

    #[test]
    fn reasons() {
        let all = [
            (KeySkip::BadRequest, "bad_request"),
            (KeySkip::QueryString, "query_string"),
            (KeySkip::TooLong, "key_too_long"),
            (KeySkip::BadHost, "bad_host"),
        ];
        for (skip, reason) in all {
            assert_eq!(skip.reason(), reason);
            assert_eq!(skip.to_string(), reason);
        }
        assert!(!BadRequest.to_string().is_empty());
    }

    #[test]
    fn page_key_matches_parts() {
        let s = KeyScheme::new("pre:", QueryMode::Bypass, true, false);
        let k = s.page_key(None, b"/caf%c3%a9/x%20y").expect("ok");
        let n = nginx_uri(b"/caf%c3%a9/x%20y", true).expect("ok");
        assert_eq!(k.uri, n.uri);
        let mut v = b"pre:".to_vec();
        v.extend_from_slice(&n.uri);
        assert_eq!(k.escaped, memcached_escape(&v));
        assert_eq!(k.unescaped, v);
    }

    fn interesting_target() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"/".to_vec()),
            Just(b".".to_vec()),
            Just(b"..".to_vec()),
            Just(b"%".to_vec()),
            Just(b"%2e".to_vec()),
            Just(b"%2E".to_vec()),
            Just(b"%2F".to_vec()),
            Just(b"%2f".to_vec()),
            Just(b"%25".to_vec()),
            Just(b"%00".to_vec()),
            Just(b"%3F".to_vec()),
            Just(b"%23".to_vec()),
            Just(b"?".to_vec()),
            Just(b"#".to_vec()),
            Just(b"a".to_vec()),
            Just(b"F".to_vec()),
            Just(b"7".to_vec()),
            any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|ps| {
            let mut t = b"/".to_vec();
            for p in ps {
                t.extend_from_slice(&p);
            }
            t
        })
    }

    proptest! {
        #[test]
        fn unescape_inverts_escape(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(memcached_unescape(&memcached_escape(&v)), Some(v));
        }

        #[test]
        fn unescape_is_strict(k in proptest::collection::vec(any::<u8>(), 0..50)) {
            if let Some(v) = memcached_unescape(&k) {
                prop_assert_eq!(memcached_escape(&v), k);
            }
        }

        #[test]
        fn escape_output_is_clean(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let k = memcached_escape(&v);
            for (i, &c) in k.iter().enumerate() {
                prop_assert!(c > 0x20);
                if c == b'%' {
                    let hex = |c: Option<&u8>| c.is_some_and(|&c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c));
                    prop_assert!(hex(k.get(i + 1)) && hex(k.get(i + 2)));
                }
            }
        }

        #[test]
        fn nginx_uri_total(t in proptest::collection::vec(any::<u8>(), 0..100), m in any::<bool>()) {
            if let Ok(n) = nginx_uri(&t, m) {
                prop_assert_eq!(n.uri.first(), Some(&b'/'));
            }
        }

        #[test]
        fn nginx_uri_interesting(t in interesting_target(), m in any::<bool>()) {
            if let Ok(n) = nginx_uri(&t, m) {
                prop_assert_eq!(n.uri.first(), Some(&b'/'));
                if m {
                    prop_assert!(!n.uri.windows(2).any(|w| w == b"//"));
                }
                // Normalization is idempotent on the escaped form.
                let again = nginx_uri(&memcached_escape(&n.uri), m);
                if !n.uri.contains(&0) && !n.uri.contains(&b'?') && !n.uri.contains(&b'#') {
                    prop_assert_eq!(again.map(|a| a.uri), Ok(n.uri.clone()));
                }
            }
        }

        #[test]
        fn page_key_total(t in proptest::collection::vec(any::<u8>(), 0..300),
                          h in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                          host in any::<bool>(), inc in any::<bool>()) {
            let q = if inc { QueryMode::Include } else { QueryMode::Bypass };
            let s = KeyScheme::new("p:", q, true, host);
            if let Ok(k) = s.page_key(h.as_deref(), &t) {
                prop_assert!(wire_key_len(&k.escaped) <= MAX_KEY_LEN);
                prop_assert_eq!(memcached_unescape(&k.escaped), Some(k.unescaped.clone()));
                prop_assert_eq!(k.uri.first(), Some(&b'/'));
            }
        }
    }
}
