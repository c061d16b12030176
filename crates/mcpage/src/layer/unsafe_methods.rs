//! RFC 9111 4.4: a non-error response to an unsafe method invalidates the
//! target URI and the same-site URIs in `Location` and `Content-Location`.
//! The layer does it through [`Invalidator::invalidate_urls`](crate::Invalidator::invalidate_urls)
//! before the response goes back, so a post-redirect-get lands on a fresh page
//! even when the app forgot a tag.

use http::header::{CONTENT_LOCATION, LOCATION};
use http::{HeaderMap, Method, StatusCode};

use crate::cache::Cache;
use crate::key::nginx_host;

/// GET, HEAD, OPTIONS and TRACE are safe (RFC 9110 9.2.1); every other
/// method, known or not, invalidates.
pub(crate) fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What an unsafe request needs to find the pages it changed, taken from the
/// request before the service consumes it.
#[derive(Debug, Clone)]
pub(crate) struct UnsafeRequest {
    /// The request's host (absolute-form authority, else `Host`), as sent.
    host: Option<String>,
    /// The request target in origin form (path and query).
    target: String,
}

impl UnsafeRequest {
    pub(crate) fn new(host: Option<&[u8]>, target: &str) -> UnsafeRequest {
        UnsafeRequest {
            host: host
                .and_then(|h| std::str::from_utf8(h).ok())
                .map(str::to_owned),
            target: target.to_owned(),
        }
    }

    /// The URLs to invalidate after a response with `status` and `headers`:
    /// none for an error (or 1xx) status; else the target and the same-site
    /// `Location` / `Content-Location`, each only if it has a page key.
    pub(crate) fn urls(
        &self,
        cache: &Cache,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Vec<String> {
        if !(status.is_success() || status.is_redirection()) {
            return Vec::new();
        }
        let mut targets = vec![self.target.clone()];
        for name in [LOCATION, CONTENT_LOCATION] {
            for value in headers.get_all(name) {
                if let Some(target) = value.to_str().ok().and_then(|v| self.resolve(v)) {
                    targets.push(target);
                }
            }
        }
        let host_mode = cache.config().keys.host;
        let mut urls = Vec::new();
        for target in targets {
            let host = self.host.as_deref().map(str::as_bytes);
            if cache.page_key(host, target.as_bytes()).is_err() {
                continue;
            }
            let url = match (&self.host, host_mode) {
                (Some(host), true) => format!("http://{host}{target}"),
                _ => target,
            };
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        urls
    }

    /// A URI reference from `Location`/`Content-Location` as an origin-form
    /// target on this site (RFC 3986 5.2, the path merge without dot-segment
    /// removal: nginx's normalization does that for the key); `None` for
    /// another host or scheme.
    fn resolve(&self, reference: &str) -> Option<String> {
        let reference = reference.trim();
        let reference = reference.split('#').next().unwrap_or_default();
        let lower = reference.to_ascii_lowercase();
        let after_authority = if let Some(rest) = reference.strip_prefix("//") {
            Some(rest)
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            reference.split_once("://").map(|(_, rest)| rest)
        } else {
            None
        };
        if let Some(rest) = after_authority {
            let (authority, path) = match rest.find(['/', '?']) {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            let same = match (&self.host, nginx_host(authority.as_bytes())) {
                (Some(ours), Some(theirs)) => nginx_host(ours.as_bytes()) == Some(theirs),
                _ => false,
            };
            if !same {
                return None;
            }
            return Some(match path {
                "" => "/".to_owned(),
                p if p.starts_with('?') => format!("/{p}"),
                p => p.to_owned(),
            });
        }
        // Another scheme (`mailto:`): the colon comes before any `/`.
        if let Some(colon) = reference.find(':')
            && !reference[..colon].contains(['/', '?'])
        {
            return None;
        }
        let (base_path, _) = self
            .target
            .split_once('?')
            .unwrap_or((self.target.as_str(), ""));
        Some(if reference.starts_with('/') {
            reference.to_owned()
        } else if reference.is_empty() {
            self.target.clone()
        } else if reference.starts_with('?') {
            format!("{base_path}{reference}")
        } else {
            let dir = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
            format!("{dir}{reference}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_methods() {
        for method in ["POST", "PUT", "DELETE", "PATCH", "PURGE", "FOO"] {
            let method = Method::from_bytes(method.as_bytes()).expect("method");
            assert!(is_unsafe(&method), "{method}");
        }
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(!is_unsafe(&method), "{method}");
        }
    }

    #[test]
    fn resolve_table() {
        let request = UnsafeRequest::new(Some(b"Example.com:8080"), "/articles/42/comments?x=1");
        let table: &[(&str, Option<&str>)] = &[
            ("/articles/42", Some("/articles/42")),
            ("/articles/42#c7", Some("/articles/42")),
            ("http://example.com/articles/42", Some("/articles/42")),
            ("HTTPS://EXAMPLE.COM:8080/a?b=1", Some("/a?b=1")),
            ("http://example.com", Some("/")),
            ("http://example.com?q", Some("/?q")),
            ("//example.com/x", Some("/x")),
            ("http://evil.example/articles/42", None),
            ("//evil.example/x", None),
            ("http://example.com.evil/x", None),
            ("mailto:a@example.com", None),
            ("javascript:alert(1)", None),
            ("42", Some("/articles/42/42")),
            ("../41", Some("/articles/42/../41")),
            ("?page=2", Some("/articles/42/comments?page=2")),
            ("", Some("/articles/42/comments?x=1")),
            ("a:b/c", None),
            ("./a:b", Some("/articles/42/./a:b")),
        ];
        for (reference, expected) in table {
            assert_eq!(
                request.resolve(reference).as_deref(),
                *expected,
                "{reference}"
            );
        }
        let hostless = UnsafeRequest::new(None, "/a");
        assert_eq!(hostless.resolve("http://example.com/b"), None);
        assert_eq!(hostless.resolve("/b").as_deref(), Some("/b"));
    }
}
