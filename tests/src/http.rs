//! A raw HTTP/1.1 client: the request target goes out byte for byte.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one HTTP exchange may take.
const HTTP_DEADLINE: Duration = Duration::from_secs(30);

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The response headers (repeated ones kept).
    pub headers: HeaderMap,
    /// The body, de-chunked but never decompressed.
    pub body: Bytes,
}

impl Response {
    /// The first value of a header, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET url` with extra headers; see [`request`].
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Response {
    request("GET", url, headers, b"").await
}

/// One HTTP/1.1 request on a fresh connection. `url` is `http://host:port`
/// followed by the request target, which is sent byte for byte (`/a//b`,
/// `/a/%2e%2e/c` stay as they are). `Host` defaults to the authority,
/// `Connection: close` is added, and `Content-Length` whenever there is a
/// body or the method is POST/PUT/PATCH. Nothing else is added (no
/// `Accept-Encoding`), and redirects are not followed. Panics on I/O errors.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    try_request(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e:#}"))
}

/// [`request`] returning errors instead of panicking.
pub async fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, target) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    request_target(method, authority, target.as_bytes(), headers, body).await
}

/// The request target as raw bytes (it may be anything, even invalid UTF-8):
/// `authority` is `host:port`, or `unix:/path` for a unix socket (then `Host`
/// defaults to `localhost`).
pub async fn request_target(
    method: &str,
    authority: &str,
    target: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = Vec::with_capacity(256 + target.len());
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let socket = authority.strip_prefix("unix:");
    if !has("host") {
        let host = if socket.is_some() {
            "localhost"
        } else {
            authority
        };
        head.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    }
    for (name, value) in headers {
        head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !has("connection") {
        head.extend_from_slice(b"Connection: close\r\n");
    }
    if !has("content-length")
        && !has("transfer-encoding")
        && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH"))
    {
        head.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);

    let exchange = async {
        if let Some(path) = socket {
            let mut stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("connect to {authority}"))?;
            stream.write_all(&head).await.context("send request")?;
            return read_response(&mut stream, method == "HEAD").await;
        }
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        stream.write_all(&head).await.context("send request")?;
        read_response(&mut stream, method == "HEAD").await
    };
    tokio::time::timeout(HTTP_DEADLINE, exchange)
        .await
        .with_context(|| format!("no complete response within {HTTP_DEADLINE:?}"))?
}

async fn read_response(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    head_request: bool,
) -> anyhow::Result<Response> {
    let mut buf = Vec::with_capacity(8192);
    let header_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!(
                "connection closed in the response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut rest = buf[header_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split(' ')
        .nth(1)
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let status =
        StatusCode::from_bytes(code.as_bytes()).with_context(|| format!("bad status {code:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header {line:?}"))?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_bytes(value.trim().as_bytes())?,
        );
    }

    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
        });
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .map(|v| -> anyhow::Result<usize> { Ok(v.to_str()?.trim().parse()?) })
        .transpose()?;

    let body = if no_body {
        Vec::new()
    } else if chunked {
        read_chunked(stream, rest).await?
    } else if let Some(length) = length {
        while rest.len() < length {
            if stream.read_buf(&mut rest).await? == 0 {
                bail!(
                    "connection closed after {} of {length} body bytes",
                    rest.len()
                );
            }
        }
        rest.truncate(length);
        rest
    } else {
        stream.read_to_end(&mut rest).await?;
        rest
    };
    Ok(Response {
        status,
        headers,
        body: Bytes::from(body),
    })
}

async fn read_chunked(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    mut buf: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        // chunk-size line
        let line_end = loop {
            if let Some(i) = find(&buf[pos..], b"\r\n") {
                break pos + i;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("connection closed in a chunk header");
            }
        };
        let size_text = String::from_utf8_lossy(&buf[pos..line_end]).into_owned();
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers (if any) end with an empty line; nothing here needs them.
            return Ok(body);
        }
        while buf.len() < pos + size + 2 {
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("connection closed in a chunk");
            }
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
