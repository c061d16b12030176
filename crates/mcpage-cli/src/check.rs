//! `mcpage check`: does nginx serve what mcpage stores?
//!
//! 1. For a few probe targets (`/mcpage-probe-<nonce>-<n>`), the page is
//!    stored through the library (`Cache::store_page`, the layer's write
//!    path) on the server mcpage expects, and a body naming each other page
//!    server is written to that server under the same key.
//! 2. Each probe is fetched through nginx with hyper's client: plain
//!    HTTP/1.1, no `Accept-Encoding`, no redirect followed, a new TCP
//!    connection per request (`Connection: close`), as separate clients
//!    would send them. The body says which server nginx asked:
//!    - the expected one (with `X-Cache: HIT`): nginx and mcpage agree;
//!    - another one: the ring differs (servers, weights, hashing);
//!    - none: memcached's `cmd_get` counters before and after tell whether
//!      nginx asked memcached at all (no: config not included, or bypass
//!      rules) or asked for another key (prefix mismatch).
//! 3. On a hit, ~20 more requests are sent (one after another, each on its
//!    own connection to nginx) and memcached's `total_connections` compared:
//!    growing by one per request means nginx has no keepalive pool to
//!    memcached (with one, the requests being sequential, at most one new
//!    connection per nginx worker).
//! 4. The probe keys are deleted from every page server, also on failure.
//!
//! Exit codes: 0 hit; 1 anything wrong (the line says what).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_ENCODING, HOST, HeaderName, HeaderValue, USER_AGENT};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use mcpage::MemcachedClient;
use mcpage::key::PageKey;
use mcpage::{Cache, Config};
use memcache::exp::{Delete, Set, Ttl};

use crate::http_client::{self, Reuse, root_cause};

/// Arguments of `mcpage check`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// nginx, as clients reach it [default: http://<nginx.listen>].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
}

/// Said when `cache.allowed_hosts` is still the loopback-only default.
pub(crate) const LOOPBACK_ONLY: &str = "cache.allowed_hosts names only localhost and 127.0.0.1: \
     pages for any other host name are never cached; set it to the site's names";

/// Probe pages per run: one key can land on the right server by chance
/// even when the rings differ; several rarely all do.
const PROBES: usize = 8;
/// Requests sent to measure new memcached connections.
const KEEPALIVE_REQUESTS: u64 = 20;
/// Lifetime of the probes written directly (a backstop: they are deleted).
const PROBE_TTL_SECS: u32 = 120;
/// One memcached operation.
const MEMCACHED_TIMEOUT: Duration = Duration::from_secs(2);
/// One HTTP exchange with nginx (a miss may wait for the app).
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

pub(crate) async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let base = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", connect_address(&config.nginx.listen)));
    let authority = nginx_authority(&base)?;
    let cache = Cache::connect(config)
        .await
        .context("cannot set up the memcached pools")?;
    // Pages are stored and served for the site's own names only: probe under
    // the URL's host when it is one of them, else under the first name.
    let first = config
        .cache
        .allowed_hosts
        .first()
        .context("cache.allowed_hosts is empty")?;
    let url_host = mcpage::key::nginx_host(authority.as_str().as_bytes());
    let allowed = url_host.is_some_and(|name| {
        config
            .cache
            .allowed_hosts
            .iter()
            .any(|allowed| allowed.as_bytes() == name)
    });
    let host = if config.keys.host || !allowed {
        first.clone()
    } else {
        authority.to_string()
    };
    // Probing a site by a name it does not list: say why nothing is cached.
    if !allowed && config.cache.names_only_loopback() {
        eprintln!("mcpage check: WARNING: {LOOPBACK_ONLY}");
    }
    let host_header = HeaderValue::from_str(&host)
        .with_context(|| format!("`{host}` cannot be sent as a Host header"))?;

    let mut clients = Vec::new();
    for server in &config.memcached.servers {
        // Each server by its own address, TCP or unix socket, as nginx reaches it.
        let client = MemcachedClient::connect(&server.address, MEMCACHED_TIMEOUT)
            .await
            .with_context(|| format!("memcached {}", server.address))?;
        clients.push((server.address.clone(), client));
    }

    let nonce = random_hex()?;
    let mut probes = Vec::with_capacity(PROBES);
    for n in 0..PROBES {
        let path = format!("/mcpage-probe-{nonce}-{n}");
        let key = cache
            .page_key(config.keys.host.then_some(host.as_bytes()), path.as_bytes())
            .map_err(|skip| {
                anyhow::anyhow!(
                    "the probe {path} has no cache key ({}): is keys.prefix very long?",
                    skip.reason()
                )
            })?;
        let expected = cache.server_for(&key).to_owned();
        probes.push(Probe {
            path,
            key,
            expected,
        });
    }

    let checker = Checker {
        config,
        cache: &cache,
        clients: &clients,
        http: http_client::client(HTTP_TIMEOUT, Reuse::Never),
        authority: &authority,
        host: &host,
        host_header,
        nonce: &nonce,
        base: &base,
        written: Mutex::new(Vec::new()),
    };
    let outcome = checker.check(&probes).await;
    let cleanup = checker.remove().await;
    let code = match outcome {
        Ok(verdict) => {
            println!("{}", verdict.line);
            for warning in &verdict.warnings {
                eprintln!("mcpage check: WARNING: {warning}");
            }
            if verdict.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("mcpage check: {error:#}");
            ExitCode::FAILURE
        }
    };
    if let Err(error) = cleanup {
        eprintln!(
            "mcpage check: could not remove every probe (they expire in {PROBE_TTL_SECS} s or cache.ttl_secs): {error:#}"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

struct Probe {
    path: String,
    key: PageKey,
    /// The server mcpage stores it on (and expects nginx to ask).
    expected: String,
}

struct Checker<'a> {
    config: &'a Config,
    cache: &'a Cache,
    clients: &'a [(String, MemcachedClient)],
    /// To nginx: no connection is reused (see the module docs, step 3).
    http: Client<HttpConnector, Empty<Bytes>>,
    /// nginx, `host:port`.
    authority: &'a Authority,
    /// The Host of the probes: `keys.host` mode's first allowed host, else
    /// [`Checker::authority`].
    host: &'a str,
    host_header: HeaderValue,
    nonce: &'a str,
    base: &'a str,
    /// Probe writes attempted: (key, server, confirmed).
    written: Mutex<Vec<(Vec<u8>, String, bool)>>,
}

struct Verdict {
    ok: bool,
    line: String,
    warnings: Vec<String>,
}

impl Verdict {
    fn fail(line: String) -> Verdict {
        Verdict {
            ok: false,
            line,
            warnings: Vec::new(),
        }
    }
}

/// What nginx answered for one probe.
enum Answer {
    /// The body written to this server.
    From { server: String, x_cache_hit: bool },
    /// Something else (the app, an error page).
    Other { status: u16 },
}

impl Checker<'_> {
    fn body(&self, path: &str, server: &str) -> String {
        format!(
            "mcpage check {}: probe {path} stored on memcached {server}\n",
            self.nonce
        )
    }

    async fn check(&self, probes: &[Probe]) -> anyhow::Result<Verdict> {
        // Every server (pages and index pool) must answer first: with one
        // down, the write path cannot confirm a page and would only say so
        // indirectly.
        for report in self.cache.memcached_stats().await {
            if let Err(error) = report.result {
                bail!(
                    "memcached {}: {} (nothing was checked: every memcached server must answer)",
                    report.server,
                    error.detail()
                );
            }
        }
        self.write(probes).await?;
        let before = self.page_stats().await?;
        let mut answers = Vec::with_capacity(probes.len());
        for probe in probes {
            answers.push(self.fetch(probe).await?);
        }
        let after = self.page_stats().await?;

        let mut hits = 0;
        for (probe, answer) in probes.iter().zip(&answers) {
            match answer {
                Answer::From { server, .. } if *server == probe.expected => hits += 1,
                Answer::From { server, .. } => {
                    return Ok(Verdict::fail(format!(
                        "wrong server on the ring: nginx asked {server}, mcpage expects {} for key `{}` \
                         (servers, weights or hashing differ between nginx and mcpage.toml: \
                         re-render nginx's side with `mcpage nginx`)",
                        probe.expected,
                        show(&probe.key.escaped)
                    )));
                }
                Answer::Other { .. } => {}
            }
        }
        if hits == probes.len() {
            return Ok(self.hit(probes, &answers).await);
        }
        let status = answers.iter().find_map(|a| match a {
            Answer::Other { status } => Some(*status),
            Answer::From { .. } => None,
        });
        let status = status.map_or_else(String::new, |s| format!("; nginx answered {s}"));
        if hits > 0 {
            return Ok(Verdict::fail(format!(
                "only {hits} of {} probes were served from memcached: nginx asks servers mcpage \
                 does not write to (compare nginx's upstream with memcached.servers){status}",
                probes.len()
            )));
        }
        let gets: u64 = before
            .iter()
            .map(|(server, b)| {
                after
                    .get(server)
                    .map_or(0, |a| a.gets.saturating_sub(b.gets))
            })
            .sum();
        let prefix = &self.config.keys.prefix;
        Ok(Verdict::fail(if gets == 0 {
            format!(
                "nginx did not ask memcached (is the mcpage location/config included? bypass rules?){status}"
            )
        } else {
            format!(
                "nginx asked for another key: prefix mismatch (nginx `set $memcached_key` differs from \
                 keys.prefix = \"{prefix}\", or keys.query/keys.host differ); expected key `{}`{status}",
                show(&probes[0].key.escaped)
            )
        }))
    }

    /// Every probe hit on the expected server: also look at keepalive.
    async fn hit(&self, probes: &[Probe], answers: &[Answer]) -> Verdict {
        let probe = &probes[0];
        let mut warnings = Vec::new();
        if answers.iter().any(|a| {
            matches!(
                a,
                Answer::From {
                    x_cache_hit: false,
                    ..
                }
            )
        }) {
            warnings.push(
                "hits carry no `X-Cache: HIT` header: this nginx config was not rendered by `mcpage nginx`"
                    .to_owned(),
            );
        }
        match self.keepalive(probe).await {
            Ok(Some(opened)) if opened >= KEEPALIVE_REQUESTS => warnings.push(format!(
                "no keepalive pool to memcached: every hit opens a TCP connection (4x fewer requests, \
                 p99 70-200 ms): {opened} new connections for {KEEPALIVE_REQUESTS} requests; use \
                 `upstream {{ ... keepalive N; }}` as `mcpage nginx` renders it"
            )),
            Ok(_) => {}
            Err(error) => warnings.push(format!("keepalive not measured: {error:#}")),
        }
        Verdict {
            ok: true,
            line: format!(
                "HIT: nginx serves pages from memcached; key `{}` on server `{}` \
                 ({} probes through {}, each from the server mcpage expects)",
                show(&probe.key.escaped),
                probe.expected,
                probes.len(),
                self.base
            ),
            warnings,
        }
    }

    /// New memcached connections on the probe's server during
    /// [`KEEPALIVE_REQUESTS`] hits (`None`: counters unavailable).
    async fn keepalive(&self, probe: &Probe) -> anyhow::Result<Option<u64>> {
        let before = self.page_stats().await?;
        for _ in 0..KEEPALIVE_REQUESTS {
            self.fetch(probe).await?;
        }
        let after = self.page_stats().await?;
        let count = |stats: &BTreeMap<String, Counters>| {
            stats.get(&probe.expected).and_then(|c| c.connections)
        };
        Ok(match (count(&before), count(&after)) {
            // Minus the connection that read the second snapshot.
            (Some(b), Some(a)) => Some(a.saturating_sub(b).saturating_sub(1)),
            _ => None,
        })
    }

    /// Store the probes: through the library on the expected server, directly
    /// (a body naming the server) on every other one.
    async fn write(&self, probes: &[Probe]) -> anyhow::Result<()> {
        let host_mode = self.config.keys.host;
        for probe in probes {
            let target = if host_mode {
                format!("http://{}{}", self.host, probe.path)
            } else {
                probe.path.clone()
            };
            let body = self.body(&probe.path, &probe.expected);
            let stored = self
                .cache
                .store_page(&target, body, std::iter::empty::<String>())
                .await;
            self.attempted(&probe.key.escaped, &probe.expected, stored.is_ok());
            let stored = stored.with_context(|| {
                format!("cannot store the probe page {} through mcpage", probe.path)
            })?;
            if stored.escaped != probe.key.escaped {
                bail!(
                    "mcpage stored the probe under `{}`, expected `{}`",
                    show(&stored.escaped),
                    show(&probe.key.escaped)
                );
            }
            for (server, client) in self.clients {
                if *server == probe.expected {
                    continue;
                }
                let set = Set::new(&probe.key.escaped, self.body(&probe.path, server))
                    .ttl(Ttl::secs(PROBE_TTL_SECS));
                let result = client.run(set).await;
                self.attempted(&probe.key.escaped, server, result.is_ok());
                let result = result
                    .with_context(|| format!("cannot write the probe to memcached {server}"))?;
                if !result.applied() {
                    bail!("memcached {server} refused the probe ({:?})", result.status);
                }
            }
        }
        Ok(())
    }

    fn attempted(&self, key: &[u8], server: &str, confirmed: bool) {
        if let Ok(mut written) = self.written.lock() {
            written.push((key.to_vec(), server.to_owned(), confirmed));
        }
    }

    /// Delete every probe key written (or maybe written) so far. Failures
    /// count only where the write was confirmed: a server that refused the
    /// write has already been reported.
    async fn remove(&self) -> anyhow::Result<()> {
        let written = self.written.lock().map(|w| w.clone()).unwrap_or_default();
        let mut first_error = None;
        for (key, server, confirmed) in written {
            let Some((_, client)) = self.clients.iter().find(|(name, _)| *name == server) else {
                continue;
            };
            if let Err(error) = client.run(Delete::new(&key)).await
                && confirmed
            {
                first_error.get_or_insert_with(|| format!("memcached {server}: {error}"));
            }
        }
        match first_error {
            None => Ok(()),
            Some(error) => bail!("{error}"),
        }
    }

    async fn fetch(&self, probe: &Probe) -> anyhow::Result<Answer> {
        let response = self
            .get(&probe.path)
            .await
            .with_context(|| format!("GET {}{} through nginx", self.base, probe.path))?;
        for (server, _) in self.clients {
            if response.body == self.body(&probe.path, server).as_bytes() {
                return Ok(Answer::From {
                    server: server.clone(),
                    x_cache_hit: response.x_cache_hit,
                });
            }
        }
        Ok(Answer::Other {
            status: response.status,
        })
    }

    /// memcached counters of every page server that answered.
    async fn page_stats(&self) -> anyhow::Result<BTreeMap<String, Counters>> {
        let mut out = BTreeMap::new();
        for report in self.cache.memcached_stats().await {
            let server = report.server;
            if !self.clients.iter().any(|(name, _)| *name == server) {
                continue;
            }
            let stats = report
                .result
                .with_context(|| format!("stats of memcached {server}"))?;
            let number = |name: &str| stats.get(name).and_then(|v| v.trim().parse::<u64>().ok());
            let gets = number("cmd_get").unwrap_or_else(|| {
                number("get_hits").unwrap_or(0) + number("get_misses").unwrap_or(0)
            });
            out.insert(
                server,
                Counters {
                    gets,
                    connections: number("total_connections"),
                },
            );
        }
        Ok(out)
    }
}

struct Counters {
    gets: u64,
    connections: Option<u64>,
}

struct HttpResponse {
    status: u16,
    x_cache_hit: bool,
    body: Vec<u8>,
}

impl HttpResponse {
    /// A gzip body (`Content-Encoding: gzip`, which nginx may send for a
    /// page stored compressed) is decompressed when it can be.
    fn new(status: u16, headers: &HeaderMap, body: Bytes) -> HttpResponse {
        let any = |name: &HeaderName, wanted: &[u8]| {
            headers
                .get_all(name)
                .iter()
                .any(|value| value.as_bytes().trim_ascii().eq_ignore_ascii_case(wanted))
        };
        let mut body = body.to_vec();
        if any(&CONTENT_ENCODING, b"gzip") {
            let mut plain = Vec::new();
            if flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut plain)
                .is_ok()
            {
                body = plain;
            }
        }
        HttpResponse {
            status,
            x_cache_hit: any(&X_CACHE, b"HIT"),
            body,
        }
    }
}

impl Checker<'_> {
    /// One `GET` of `path` on a new connection (`Connection: close`), within
    /// [`HTTP_TIMEOUT`]: no `Accept-Encoding`, no redirect followed.
    async fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .with_context(|| format!("`{path}` cannot be requested"))?;
        let request = Request::get(uri)
            .header(HOST, self.host_header.clone())
            .header(USER_AGENT, "mcpage-check")
            .header(CONNECTION, "close")
            .body(Empty::new())
            .context("cannot build the request")?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|error| {
                let cause = root_cause(&error);
                if error.is_connect() {
                    anyhow!("cannot connect to {}: {cause}", self.authority)
                } else {
                    anyhow!("{cause}")
                }
            })?;
            let (head, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|error| anyhow!("reading the body: {}", root_cause(&error)))?;
            anyhow::Ok(HttpResponse::new(
                head.status.as_u16(),
                &head.headers,
                body.to_bytes(),
            ))
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange)
            .await
            .with_context(|| format!("no response within {HTTP_TIMEOUT:?}"))?
    }
}

/// nginx's address from `--url` (`http://host[:port][/...]`; a path or
/// query is ignored): `host:port`, port 80 when absent.
fn nginx_authority(url: &str) -> anyhow::Result<Authority> {
    let usage = || {
        format!(
            "--url `{url}` must be http://host:port (nginx's listen address; https is not supported)"
        )
    };
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|error| anyhow!("{}: {error}", usage()))?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        bail!("{}", usage());
    }
    let authority = match uri.authority() {
        Some(authority) if !authority.host().is_empty() => authority,
        _ => bail!("--url `{url}` has no host"),
    };
    if authority.as_str().contains('@') {
        bail!("--url `{url}` must not contain credentials");
    }
    let port = match authority.port_u16() {
        Some(port) => port,
        // `host:` or a port out of range.
        None if authority.as_str() != authority.host() => {
            bail!("--url `{url}` has no valid port (1-65535)")
        }
        None => 80,
    };
    Authority::try_from(format!("{}:{port}", authority.host()))
        .map_err(|error| anyhow!("{}: {error}", usage()))
}

/// Where to connect for an nginx `listen` value (`8080`, `127.0.0.1:8080`, `*:80`).
fn connect_address(listen: &str) -> String {
    let addr = listen.split_whitespace().next().unwrap_or(listen);
    if addr.contains(':') {
        addr.replace("*:", "127.0.0.1:")
            .replace("0.0.0.0:", "127.0.0.1:")
            .replace("[::]:", "[::1]:")
    } else {
        format!("127.0.0.1:{addr}")
    }
}

/// 64 random bits as hex: the probes' nonce.
fn random_hex() -> anyhow::Result<String> {
    let bits =
        getrandom::u64().map_err(|error| anyhow!("no randomness for the probes: {error}"))?;
    Ok(format!("{bits:016x}"))
}

fn show(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_listen_addresses() {
        for (url, authority) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://127.0.0.1:8080/", "127.0.0.1:8080"),
            ("http://127.0.0.1:8080/some/path?q=1", "127.0.0.1:8080"),
            ("http://example.com", "example.com:80"),
            ("http://[::1]:8080", "[::1]:8080"),
            ("http://[::1]", "[::1]:80"),
            (" http://localhost:81 ", "localhost:81"),
        ] {
            assert_eq!(nginx_authority(url).expect(url).as_str(), authority);
        }
        for (bad, needle) in [
            ("https://example.com", "https is not supported"),
            ("127.0.0.1:8080", "must be http://host:port"),
            ("ftp://example.com", "must be http://host:port"),
            ("http://", "must be http://host:port"),
            ("http:///path", "must be http://host:port"),
            ("not a url", "must be http://host:port"),
            ("http://exa mple.com", "must be http://host:port"),
            ("http://127.0.0.1:99999", "port"),
            ("http://127.0.0.1:/", "port"),
            ("", "must be http://host:port"),
            ("http://u:p@127.0.0.1:8080", "credentials"),
        ] {
            let error = nginx_authority(bad).expect_err(bad).to_string();
            assert!(error.starts_with(&format!("--url `{bad}` ")), "{error}");
            assert!(error.contains(needle), "{bad}: {error}");
        }
        assert_eq!(connect_address("8080"), "127.0.0.1:8080");
        assert_eq!(connect_address("0.0.0.0:80 reuseport"), "127.0.0.1:80");
    }

    #[test]
    fn responses() {
        let mut headers = HeaderMap::new();
        headers.append(&X_CACHE, HeaderValue::from_static("HIT"));
        let response = HttpResponse::new(200, &headers, Bytes::from_static(b"abc"));
        assert_eq!((response.status, response.x_cache_hit), (200, true));
        assert_eq!(response.body, b"abc");

        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gzip, b"plain").expect("compress");
        let compressed = gzip.finish().expect("compress");
        let mut headers = HeaderMap::new();
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.append(&X_CACHE, HeaderValue::from_static("MISS"));
        let response = HttpResponse::new(404, &headers, Bytes::from(compressed));
        assert_eq!((response.status, response.x_cache_hit), (404, false));
        assert_eq!(response.body, b"plain");
    }

    #[test]
    fn nonces_differ() {
        let (a, b) = (random_hex().expect("a"), random_hex().expect("b"));
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
