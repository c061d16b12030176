//! Varnish-style purge requests, so a purge client written for Varnish
//! (FOSHttpCache, the Drupal/Magento Varnish modules) works unchanged:
//!
//! - `PURGE` or `PURGEKEYS` with `xkey-purge: tag1 tag2` (vmod xkey): the
//!   pages tagged with any of them are removed, as `invalidate_tags`;
//! - `xkey-softpurge` is treated as a purge (mcpage has no grace period to
//!   serve stale pages from);
//! - `PURGE /path` without an xkey header: that URL's page, as `invalidate_urls`.
//!
//! Guarded like `POST /_mcpage/invalidate`: `Authorization: Bearer <token>`,
//! or, with `proxy.purge_from_loopback = true`, a client on loopback (the
//! address nginx passes in `X-Real-IP` when the request came through it).
//! The answer is the JSON endpoint's: 200 with counts, 502 when memcached did
//! not confirm.

use std::net::IpAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::State;
use super::admin::{self, InvalidateRequest};

/// The xkey headers (vmod xkey, FOSHttpCache).
const XKEY_HEADERS: [&str; 2] = ["xkey-purge", "xkey-softpurge"];

/// Is this a Varnish-style purge request?
pub(crate) fn is_purge(request: &Request<Incoming>) -> bool {
    let method = request.method().as_str();
    method == "PURGE" || method == "PURGEKEYS"
}

/// The tags of the xkey headers: separated by spaces (xkey) or commas.
fn xkey_tags(headers: &http::HeaderMap) -> Vec<String> {
    XKEY_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([' ', '\t', ',']))
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The client's address: nginx's `X-Real-IP` when the connection is local
/// (nginx in front, or a unix socket), else the peer.
fn client(request: &Request<Incoming>, peer: Option<IpAddr>) -> Option<IpAddr> {
    if peer.is_none_or(|p| p.is_loopback()) {
        if let Some(real) = request
            .headers()
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
        {
            return real.trim().parse().ok();
        }
    }
    peer
}

/// Answer a `PURGE` / `PURGEKEYS` request.
pub(crate) async fn handle(
    state: &State,
    peer: Option<IpAddr>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let by_token = state.token.as_ref().is_some_and(|token| {
        admin::bearer(&request).is_some_and(|presented| token.matches(presented))
    });
    let by_address = state.purge_from_loopback
        && client(&request, peer).is_some_and(|address| address.is_loopback());
    if !by_token && !by_address {
        return admin::unauthorized();
    }
    let tags = xkey_tags(request.headers());
    let wanted = if !tags.is_empty() {
        InvalidateRequest {
            tags,
            urls: Vec::new(),
            prefix: None,
        }
    } else if request.method().as_str() == "PURGE" {
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        InvalidateRequest {
            tags: Vec::new(),
            urls: vec![target],
            prefix: None,
        }
    } else {
        return admin::error_json(
            StatusCode::BAD_REQUEST,
            "PURGEKEYS needs an xkey-purge or xkey-softpurge header naming the tags",
        );
    };
    admin::apply(state, wanted).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xkey_headers_name_tags_separated_by_spaces_or_commas() {
        let mut headers = http::HeaderMap::new();
        headers.insert("xkey-purge", "node:1  node_list".parse().expect("value"));
        headers.append("xkey-softpurge", "a,b\tc".parse().expect("value"));
        assert_eq!(xkey_tags(&headers), ["node:1", "node_list", "a", "b", "c"]);
        assert!(xkey_tags(&http::HeaderMap::new()).is_empty());
    }
}
