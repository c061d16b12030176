//! What nginx sends on a hit besides the body: its `Content-Type`, from the
//! URI's extension or `default_type`, and the `charset` it adds. Shared by
//! the renderer (nginx.rs), which writes it into nginx, and the policy,
//! which stores a page only when the hit will carry the same type.

/// The types a hit gets from its URI's extension. Rendered as a `types`
/// block inside the memcached location (so a site's own `mime.types` cannot
/// change what a hit carries) and at the top of [`render_nginx_full`]; the
/// layer stores a page only when its `Content-Type` is the one nginx will send.
pub(crate) const HIT_TYPES: &[(&str, &[&str])] = &[
    ("text/html", &["html", "htm", "shtml"]),
    ("text/css", &["css"]),
    ("text/xml", &["xml"]),
    ("text/plain", &["txt"]),
    ("application/javascript", &["js", "mjs"]),
    ("application/json", &["json"]),
    ("application/rss+xml", &["rss"]),
    ("application/atom+xml", &["atom"]),
    ("application/pdf", &["pdf"]),
    ("image/svg+xml", &["svg", "svgz"]),
    ("image/png", &["png"]),
    ("image/jpeg", &["jpeg", "jpg"]),
    ("image/gif", &["gif"]),
    ("image/webp", &["webp"]),
    ("image/x-icon", &["ico"]),
    ("font/woff", &["woff"]),
    ("font/woff2", &["woff2"]),
];

/// nginx's `charset_types` when none is configured (`ngx_http_charset_filter_module`).
const DEFAULT_CHARSET_TYPES: [&str; 6] = [
    "text/html",
    "text/xml",
    "text/plain",
    "text/vnd.wap.wml",
    "application/javascript",
    "application/rss+xml",
];

/// The `Content-Type` nginx sends on a hit, as rendered from a `Config`:
/// the type of the URI's extension ([`HIT_TYPES`]) or `default_type` (the
/// first of `cache.content_types`), with `; charset=<nginx.charset>` when
/// that type is one of `charset_types`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HitTypes {
    default_type: String,
    charset: Option<String>,
    /// The rendered `charset_types` (text/html is implied by nginx).
    rendered_charset_types: Vec<String>,
}

impl HitTypes {
    /// From `cache.content_types` and `nginx.charset`.
    pub(crate) fn new(cache_content_types: &[String], charset: &str) -> HitTypes {
        let mut content_types: Vec<String> = Vec::new();
        for media_type in cache_content_types {
            let media_type = media_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if !media_type.is_empty() && !content_types.contains(&media_type) {
                content_types.push(media_type);
            }
        }
        let default_type = content_types
            .first()
            .map_or_else(|| "text/html".to_owned(), Clone::clone);
        // nginx always adds `charset` to text/html (naming it again is a warning).
        let rendered_charset_types = content_types
            .into_iter()
            .filter(|t| t != "text/html")
            .collect();
        let charset = (!charset.eq_ignore_ascii_case("off")).then(|| charset.to_ascii_lowercase());
        HitTypes {
            default_type,
            charset,
            rendered_charset_types,
        }
    }

    /// The `charset_types` to render (text/html is implied by nginx).
    pub(crate) fn rendered_charset_types(&self) -> &[String] {
        &self.rendered_charset_types
    }

    /// nginx's `default_type`: the first cached content type.
    pub(crate) fn default_type(&self) -> &str {
        &self.default_type
    }

    /// Type and charset of a hit for the normalized `$uri`.
    pub(crate) fn content_type_for(&self, uri: &[u8]) -> (&str, Option<&str>) {
        let media_type = extension(uri)
            .and_then(|ext| {
                HIT_TYPES
                    .iter()
                    .find(|(_, exts)| exts.iter().any(|e| e.as_bytes().eq_ignore_ascii_case(ext)))
            })
            .map_or(self.default_type.as_str(), |(t, _)| t);
        let charset_applies = media_type == "text/html"
            || if self.rendered_charset_types.is_empty() {
                DEFAULT_CHARSET_TYPES.contains(&media_type)
            } else {
                self.rendered_charset_types.iter().any(|t| t == media_type)
            };
        (
            media_type,
            self.charset.as_deref().filter(|_| charset_applies),
        )
    }
}

/// nginx's `r->exten` (`ngx_http_set_exten`): after the last `.` of the last
/// segment, unless that dot starts the segment; bytes 0 and 1 are never looked at.
fn extension(uri: &[u8]) -> Option<&[u8]> {
    for i in (2..uri.len()).rev() {
        match uri[i] {
            b'.' if uri[i - 1] != b'/' => return Some(&uri[i + 1..]),
            b'/' => return None,
            _ => {}
        }
    }
    None
}

/// Response headers that change how a browser treats the page. A hit carries
/// none of the app's headers, only `nginx.add_headers`: a response is stored
/// only when its values of these (and of every name in `nginx.add_headers`)
/// are exactly the configured ones ([`Bypass::HeaderDiffers`](crate::Bypass::HeaderDiffers)).
pub const CHECKED_HEADERS: [&str; 14] = [
    "content-security-policy",
    "content-security-policy-report-only",
    "x-frame-options",
    "strict-transport-security",
    "referrer-policy",
    "x-content-type-options",
    "permissions-policy",
    "cross-origin-opener-policy",
    "cross-origin-embedder-policy",
    "cross-origin-resource-policy",
    "content-disposition",
    "x-xss-protection",
    "x-permitted-cross-domain-policies",
    "clear-site-data",
];
