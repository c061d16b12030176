//! Configuration: one file drives the library, the proxy and the nginx side.
//!
//! Layered the figment way: [`Config::default()`] < `mcpage.toml` < `MCPAGE_*`
//! environment variables (`__` separates sections: `MCPAGE_CACHE__TTL_SECS=60`).
//!
//! ```
//! use mcpage::Config;
//!
//! let config: Config = Config::figment()
//!     .merge(figment::providers::Serialized::default("keys.prefix", "page:"))
//!     .extract()
//!     .expect("valid config");
//! assert_eq!(config.keys.prefix, "page:");
//! config.validate().expect("the defaults are valid");
//! ```

use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use regex::bytes::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::QueryMode;
use crate::ring::Hashing;

/// The whole configuration. Every field has a default; see README.md for the reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Where pages and the tag index live.
    pub memcached: MemcachedConfig,
    /// How request targets become memcached keys (must match nginx).
    pub keys: KeysConfig,
    /// What is cached, for how long.
    pub cache: CacheConfig,
    /// The nginx side rendered by `mcpage nginx`.
    pub nginx: NginxConfig,
    /// `mcpage proxy`: the layer in front of any HTTP backend.
    pub proxy: ProxyConfig,
    /// Read-your-writes, retries of unconfirmed invalidations, bursts.
    pub invalidation: InvalidationConfig,
}

/// `[memcached]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemcachedConfig {
    /// Page servers, exactly as written in nginx's upstream (`127.0.0.1:11211`,
    /// optionally `127.0.0.1:11211 weight=2` or `{ address = "...", weight = 2 }`).
    pub servers: Vec<ServerSpec>,
    /// nginx `hash $memcached_key consistent;` or plain `hash $memcached_key;`.
    pub hashing: Hashing,
    /// Tag index pool; empty means the page servers.
    pub index_servers: Vec<ServerSpec>,
    /// Per-operation timeout (connect and each exchange).
    pub timeout_ms: u64,
    /// Consecutive failures after which a server's circuit breaker opens.
    pub breaker_failures: u32,
    /// How long an open breaker skips a server before one probe call.
    pub breaker_cooldown_ms: u64,
    /// Idle connections kept per server.
    pub max_idle: usize,
}

impl Default for MemcachedConfig {
    fn default() -> Self {
        MemcachedConfig {
            servers: vec![ServerSpec::new("127.0.0.1:11211")],
            hashing: Hashing::Consistent,
            index_servers: Vec::new(),
            timeout_ms: 100,
            breaker_failures: 5,
            breaker_cooldown_ms: 2_000,
            max_idle: 32,
        }
    }
}

impl MemcachedConfig {
    /// The servers that hold the tag index: `index_servers`, or the page servers.
    pub fn index_pool(&self) -> &[ServerSpec] {
        if self.index_servers.is_empty() {
            &self.servers
        } else {
            &self.index_servers
        }
    }
}

/// One memcached server as nginx's upstream names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ServerSpecRepr", into = "ServerSpecRepr")]
pub struct ServerSpec {
    /// `ip:port` or `unix:/path` as written in the nginx `server` line; it is
    /// hashed (`unix:` servers by their path), so `127.0.0.1:11211` and
    /// `[::ffff:127.0.0.1]:11211` are different rings.
    pub address: String,
    /// nginx `weight=`.
    pub weight: u32,
}

impl ServerSpec {
    /// A server with weight 1.
    pub fn new(address: impl Into<String>) -> Self {
        ServerSpec {
            address: address.into(),
            weight: 1,
        }
    }

    /// The same server with another weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut words = text.split_whitespace();
        let address = words.next().ok_or("empty server")?.to_owned();
        let mut spec = ServerSpec::new(address);
        for word in words {
            match word.split_once('=') {
                Some(("weight", n)) => {
                    spec.weight = n.parse().map_err(|_| format!("bad weight `{n}`"))?;
                }
                _ if spec.address.starts_with("unix:") && !word.contains('=') => {
                    return Err(format!(
                        "`{text}`: no spaces in a socket path (nginx's `server` line ends the path at the first space)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "unsupported server parameter `{word}` (only weight=N)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            f.write_str(&self.address)
        } else {
            write!(f, "{} weight={}", self.address, self.weight)
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum ServerSpecRepr {
    Text(String),
    Table {
        address: String,
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

impl TryFrom<ServerSpecRepr> for ServerSpec {
    type Error = String;
    fn try_from(repr: ServerSpecRepr) -> std::result::Result<Self, String> {
        match repr {
            ServerSpecRepr::Text(text) => ServerSpec::parse(&text),
            ServerSpecRepr::Table { address, weight } => Ok(ServerSpec { address, weight }),
        }
    }
}

impl From<ServerSpec> for ServerSpecRepr {
    fn from(spec: ServerSpec) -> Self {
        ServerSpecRepr::Text(spec.to_string())
    }
}

/// A response header that carries tags (`cache.tag_headers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagHeader {
    /// The header name (case-insensitive), e.g. `surrogate-key`.
    pub name: String,
    /// What separates its tags.
    pub separator: TagSeparator,
}

/// What separates the tags in one header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagSeparator {
    /// `a, b` (surrounding spaces trimmed).
    Comma,
    /// `a b` (any run of spaces or tabs).
    Space,
}

/// `cache.allowed_hosts` by default: loopback only.
const DEFAULT_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];

impl CacheConfig {
    /// Are `allowed_hosts` still the loopback-only default? (A production
    /// site then caches nothing: the proxy and `mcpage check` say so.)
    pub fn names_only_loopback(&self) -> bool {
        self.allowed_hosts
            .iter()
            .all(|h| DEFAULT_HOSTS.contains(&h.as_str()))
    }
}

/// `[keys]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KeysConfig {
    /// nginx: `set $memcached_key "<prefix>$uri";`
    pub prefix: String,
    /// `bypass`: requests with a query string are never cached; `include`: key `$uri?$args`.
    pub query: QueryMode,
    /// nginx `merge_slashes` (on by default in nginx too).
    pub merge_slashes: bool,
    /// Several sites: V = `<prefix>$host$uri`; only `cache.allowed_hosts` are cached.
    pub host: bool,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            prefix: String::new(),
            query: QueryMode::Bypass,
            merge_slashes: true,
            host: false,
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Page lifetime in memcached, the backstop behind invalidation.
    pub ttl_secs: u32,
    /// Regexes on the normalized path; a page is cached when one matches...
    pub include: Vec<String>,
    /// ...and none of these does.
    pub exclude: Vec<String>,
    /// Cookies that mean "logged in" (as does any `Authorization` header).
    pub session_cookies: Vec<String>,
    /// Response media types that are cached (parameters such as charset ignored).
    pub content_types: Vec<String>,
    /// The site's host names (lowercase, no port), in every mode: a request
    /// whose `Host` is not one of them is never stored, and nginx sends it to
    /// the app without asking memcached. Without `keys.host`, the first one is
    /// the canonical name nginx sends the app for cacheable requests. The
    /// default names only loopback, so a local demo works and a production
    /// site caches nothing until its names are set (the proxy says so at start).
    pub allowed_hosts: Vec<String>,
    /// Response headers read as the page's tags, each with its separator;
    /// all of them are removed before the client sees the response. Besides
    /// the default `X-Cache-Tags` (comma), what other caches' apps send:
    /// `X-Drupal-Cache-Tags` (space), `X-Magento-Tags` (comma),
    /// `Surrogate-Key` (space, Fastly), `Cache-Tag` (comma, Cloudflare),
    /// `xkey` (space, Varnish xkey).
    pub tag_headers: Vec<TagHeader>,
    /// Largest body stored (after gzip when `gzip` is on).
    pub max_body_bytes: usize,
    /// Store gzip bodies flagged with `gzip_flag` (nginx `memcached_gzip_flag`).
    pub gzip: bool,
    /// The client-flags bit nginx reads as "this value is gzip".
    pub gzip_flag: u32,
    /// Prefix of the tag index keys (clock, tag clocks, index shards). Empty
    /// (the default): derived from `keys.prefix`, so deployments with
    /// different prefixes on one pool never share tags or clocks (see
    /// [`Config::index_namespace`]).
    pub index_namespace: String,
    /// Index items per tag; a tag's pages are spread over them.
    pub index_shards: u32,
    /// Largest index item; a registration that would exceed it is refused
    /// (that page is then not cached) instead of nearing memcached's item limit.
    pub index_shard_max_bytes: usize,
    /// Targeted cache-control fields (RFC 9213), highest precedence first: the
    /// first one present and valid replaces `Cache-Control` for mcpage.
    pub targeted_fields: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl_secs: 3600,
            include: vec!["^/".to_owned()],
            exclude: Vec::new(),
            session_cookies: vec!["sessionid".to_owned()],
            content_types: vec!["text/html".to_owned()],
            allowed_hosts: DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect(),
            tag_headers: vec![TagHeader {
                name: "x-cache-tags".to_owned(),
                separator: TagSeparator::Comma,
            }],
            max_body_bytes: 1_000_000,
            gzip: false,
            gzip_flag: 2,
            index_namespace: String::new(),
            index_shards: 16,
            index_shard_max_bytes: 256 * 1024,
            targeted_fields: vec![
                "mcpage-cache-control".to_owned(),
                "cdn-cache-control".to_owned(),
                "surrogate-control".to_owned(),
            ],
        }
    }
}

/// `[nginx]`: what `mcpage nginx` renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NginxConfig {
    /// nginx `listen`.
    pub listen: String,
    /// Where nginx sends misses and bypassed requests (`host:port`, or
    /// `unix:/path` for the proxy's or the app's unix socket).
    pub app: String,
    /// `keepalive` connections per worker to memcached; at least the peak
    /// concurrent requests per worker (64 lost 30-45% against 512 at 128 connections).
    pub keepalive: u32,
    /// `memcached_buffer_size`: at least the typical page (4k default cost 30-65%).
    pub buffer_size: String,
    /// `charset` added to cached content types (`off`: none).
    pub charset: String,
    /// Headers sent on every hit (`add_header NAME "VALUE" always;`), e.g.
    /// `[["X-Frame-Options", "DENY"]]`. A response is stored only when it
    /// carries exactly these values (and no other security header, see
    /// [`CHECKED_HEADERS`](crate::CHECKED_HEADERS)), so a hit equals its miss.
    pub add_headers: Vec<(String, String)>,
}

impl Default for NginxConfig {
    fn default() -> Self {
        NginxConfig {
            listen: "127.0.0.1:8080".to_owned(),
            app: "127.0.0.1:8081".to_owned(),
            keepalive: 512,
            buffer_size: "64k".to_owned(),
            charset: "utf-8".to_owned(),
            add_headers: Vec::new(),
        }
    }
}

/// `[proxy]`: `mcpage proxy` in front of any backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Where the proxy listens (nginx's `app`): `host:port` or `unix:/path`.
    pub listen: String,
    /// The backend, `http://host:port` or `unix:/path` (HTTP/1.1 over a unix socket).
    pub upstream: String,
    /// Bearer token for `POST /_mcpage/invalidate` and Varnish-style
    /// `PURGE`/`PURGEKEYS`; none disables the endpoint.
    pub invalidate_token: Option<String>,
    /// Accept `PURGE`/`PURGEKEYS` (xkey) without a token from a client on
    /// loopback (nginx's `X-Real-IP`), as Varnish ACLs usually do.
    pub purge_from_loopback: bool,
    /// How long the backend may take to connect and send its response head
    /// before the proxy answers 504.
    pub upstream_timeout_ms: u64,
    /// How long an idle backend connection is kept for reuse; keep it below
    /// the backend's keep-alive timeout (gunicorn: 2 s, Node: 5 s). 0: never reuse.
    pub upstream_idle_timeout_ms: u64,
    /// Also cache pages without an `X-Cache-Tags` header (removable only by
    /// URL, prefix or TTL). Off: a page is cached only when the backend tags it.
    pub cache_untagged: bool,
    /// File that keeps pending invalidations (memcached did not confirm them
    /// yet) across restarts; none keeps them in memory only. `mcpage stats`
    /// reads it too.
    pub journal: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:8081".to_owned(),
            upstream: "http://127.0.0.1:8000".to_owned(),
            invalidate_token: None,
            purge_from_loopback: false,
            upstream_timeout_ms: 30_000,
            upstream_idle_timeout_ms: 1000,
            cache_untagged: false,
            journal: None,
        }
    }
}

/// `[invalidation]`: what makes an invalidation that returned hold for every
/// later request, and what happens to one memcached did not confirm
/// (README, "What mcpage promises").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct InvalidationConfig {
    /// W: a page store must start within W of the write path's clock
    /// pre-check and be answered within W more, or the page is not kept;
    /// every invalidation waits 2W after raising its clocks before it reads
    /// the tag index and deletes (its cost in latency).
    pub write_window_ms: u64,
    /// First retry of an invalidation memcached did not confirm; the delay
    /// doubles after each failed attempt, up to `retry_max_ms`.
    pub retry_min_ms: u64,
    /// Longest delay between two retries (`retry_min_ms` when smaller).
    pub retry_max_ms: u64,
    /// Tags, URLs and prefixes that may wait to be retried at once; an
    /// unconfirmed invalidation that does not fit is an error (`QueueFull`).
    pub pending_limit: usize,
    /// Callers that may wait for the next combined invalidation run; more
    /// are refused (`Overloaded`; the proxy answers 429 with Retry-After).
    pub max_waiting: usize,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        InvalidationConfig {
            write_window_ms: 50,
            retry_min_ms: 100,
            retry_max_ms: 10_000,
            pending_limit: 10_000,
            max_waiting: 10_000,
        }
    }
}

/// The compiled, checked form the cache runs on; built once by [`Config::compile`].
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) include: Vec<Regex>,
    pub(crate) exclude: Vec<Regex>,
    pub(crate) content_types: Vec<String>,
    pub(crate) session_cookies: Vec<String>,
    pub(crate) allowed_hosts: Vec<Vec<u8>>,
    pub(crate) tag_headers: Vec<(http::HeaderName, TagSeparator)>,
    /// `cache.targeted_fields`, in precedence order.
    pub(crate) targeted_fields: Vec<http::HeaderName>,
    /// The Content-Type nginx sends on a hit.
    pub(crate) hit_types: crate::hit::HitTypes,
    /// `nginx.add_headers`.
    pub(crate) add_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `CHECKED_HEADERS` and the names in `nginx.add_headers`.
    pub(crate) checked_headers: Vec<http::HeaderName>,
}

impl Config {
    /// defaults < `mcpage.toml` in the working directory < `MCPAGE_*` env.
    pub fn figment() -> Figment {
        Self::figment_from(Path::new("mcpage.toml"))
    }

    /// defaults < the TOML file `path` (when it exists) < `MCPAGE_*` env.
    pub fn figment_from(path: &Path) -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(path))
            .merge(env_provider())
    }

    /// Load from `path` (or `mcpage.toml`) and the environment, then [`validate`](Self::validate).
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let figment = match path {
            Some(path) => {
                if !path.exists() {
                    return Err(Error::config(
                        "--config",
                        format!("{} does not exist", path.display()),
                    ));
                }
                Self::figment_from(path)
            }
            None => Self::figment(),
        };
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The prefix of the tag index keys and clocks: `cache.index_namespace`
    /// when set, else `mcpage:` for an empty `keys.prefix` (the namespace of
    /// earlier versions) and `mcpage:<8 hex digits of sha256(keys.prefix)>:`
    /// otherwise, so two deployments on one pool never share tags or clocks.
    pub fn index_namespace(&self) -> String {
        use sha2::{Digest, Sha256};
        if !self.cache.index_namespace.is_empty() {
            return self.cache.index_namespace.clone();
        }
        if self.keys.prefix.is_empty() {
            return "mcpage:".to_owned();
        }
        let digest = Sha256::digest(self.keys.prefix.as_bytes());
        let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("mcpage:{hex}:")
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.compile().map(drop)
    }

    pub(crate) fn compile(&self) -> Result<Compiled> {
        check_servers("memcached.servers", &self.memcached.servers, false)?;
        check_servers(
            "memcached.index_servers",
            &self.memcached.index_servers,
            true,
        )?;
        if self.memcached.timeout_ms == 0 {
            return Err(Error::config("memcached.timeout_ms", "must be at least 1"));
        }
        let inv = &self.invalidation;
        if !(1..=10_000).contains(&inv.write_window_ms) {
            return Err(Error::config(
                "invalidation.write_window_ms",
                "must be 1..=10000",
            ));
        }
        for (field, value) in [
            ("invalidation.retry_min_ms", inv.retry_min_ms),
            ("invalidation.pending_limit", inv.pending_limit as u64),
            ("invalidation.max_waiting", inv.max_waiting as u64),
        ] {
            if value == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        if self.proxy.upstream_timeout_ms == 0 {
            return Err(Error::config(
                "proxy.upstream_timeout_ms",
                "must be at least 1",
            ));
        }
        check_unix_socket("nginx.listen", &self.nginx.listen)?;
        check_unix_socket("nginx.app", &self.nginx.app)?;
        check_unix_socket("proxy.listen", &self.proxy.listen)?;
        check_unix_socket("proxy.upstream", &self.proxy.upstream)?;
        if self
            .keys
            .prefix
            .bytes()
            .any(|b| b <= b' ' || b == b'"' || b == b'%' || b == 0x7f)
        {
            return Err(Error::config(
                "keys.prefix",
                "must not contain spaces, control characters, '%' or '\"' (nginx would escape them)",
            ));
        }
        if self.keys.prefix.len() >= crate::key::MAX_KEY_LEN {
            return Err(Error::config(
                "keys.prefix",
                "must be shorter than 250 bytes (memcached's key limit): no page key would fit",
            ));
        }
        if self.cache.ttl_secs == 0 || self.cache.ttl_secs > 30 * 24 * 3600 {
            return Err(Error::config(
                "cache.ttl_secs",
                "must be 1..=2592000 (30 days)",
            ));
        }
        if self.cache.gzip && (self.cache.gzip_flag == 0 || !self.cache.gzip_flag.is_power_of_two())
        {
            return Err(Error::config(
                "cache.gzip_flag",
                "must be a single bit, e.g. 2",
            ));
        }
        if self.cache.content_types.is_empty() {
            return Err(Error::config(
                "cache.content_types",
                "must name at least one type",
            ));
        }
        if self
            .cache
            .index_namespace
            .bytes()
            .any(|b| b <= b' ' || b == b'%' || b == 0x7f)
        {
            return Err(Error::config(
                "cache.index_namespace",
                "must not contain spaces or '%'",
            ));
        }
        if self.cache.index_namespace.len() + INDEX_KEY_OVERHEAD > crate::key::MAX_KEY_LEN {
            return Err(Error::config(
                "cache.index_namespace",
                format!(
                    "must be at most {} bytes: index keys add {INDEX_KEY_OVERHEAD} to it and memcached keys end at 250",
                    crate::key::MAX_KEY_LEN - INDEX_KEY_OVERHEAD
                ),
            ));
        }
        if !(1..=1024).contains(&self.cache.index_shards) {
            return Err(Error::config("cache.index_shards", "must be 1..=1024"));
        }
        if !(1024..=512 * 1024).contains(&self.cache.index_shard_max_bytes) {
            return Err(Error::config(
                "cache.index_shard_max_bytes",
                "must be 1024..=524288",
            ));
        }
        if self.cache.allowed_hosts.is_empty() {
            return Err(Error::config(
                "cache.allowed_hosts",
                "needs at least one host name: pages are only stored for the site's own names",
            ));
        }
        let allowed_hosts = self
            .cache
            .allowed_hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let field = format!("cache.allowed_hosts[{i}]");
                let normalized = crate::key::nginx_host(host.as_bytes())
                    .ok_or_else(|| Error::config(&field, "not a valid host name"))?;
                // nginx compares `$host` (lowercase, no port) with these names.
                if normalized != host.as_bytes() {
                    return Err(Error::config(
                        field,
                        format!(
                            "write `{}`: lowercase, without port or trailing dot",
                            String::from_utf8_lossy(&normalized)
                        ),
                    ));
                }
                Ok(normalized)
            })
            .collect::<Result<Vec<_>>>()?;
        if self.cache.tag_headers.is_empty() {
            return Err(Error::config(
                "cache.tag_headers",
                "needs at least one header (x-cache-tags)",
            ));
        }
        let tag_headers = self
            .cache
            .tag_headers
            .iter()
            .enumerate()
            .map(|(i, header)| {
                http::HeaderName::from_bytes(header.name.as_bytes())
                    .map(|name| (name, header.separator))
                    .map_err(|_| {
                        Error::config(
                            format!("cache.tag_headers[{i}].name"),
                            format!("`{}` is not a header name", header.name),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        check_nginx_size("nginx.buffer_size", &self.nginx.buffer_size)?;
        let targeted_fields = self
            .cache
            .targeted_fields
            .iter()
            .enumerate()
            .map(|(i, name)| {
                http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                    Error::config(format!("cache.targeted_fields[{i}]"), "not a header name")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let charset = &self.nginx.charset;
        if charset.is_empty()
            || !charset
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(&b))
        {
            return Err(Error::config(
                "nginx.charset",
                "must be a charset name such as utf-8, or off",
            ));
        }
        let add_headers = self
            .nginx
            .add_headers
            .iter()
            .enumerate()
            .map(|(i, (name, value))| check_add_header(i, name, value))
            .collect::<Result<Vec<_>>>()?;
        let mut checked_headers: Vec<http::HeaderName> = crate::hit::CHECKED_HEADERS
            .iter()
            .map(|name| http::HeaderName::from_static(name))
            .collect();
        for (name, _) in &add_headers {
            if !checked_headers.contains(name) {
                checked_headers.push(name.clone());
            }
        }
        Ok(Compiled {
            targeted_fields,
            hit_types: crate::hit::HitTypes::new(&self.cache.content_types, &self.nginx.charset),
            add_headers,
            checked_headers,
            include: compile_regexes("cache.include", &self.cache.include)?,
            exclude: compile_regexes("cache.exclude", &self.cache.exclude)?,
            content_types: self
                .cache
                .content_types
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            session_cookies: self.cache.session_cookies.clone(),
            allowed_hosts,
            tag_headers,
        })
    }
}

/// One `nginx.add_headers` entry: a header name nginx lets `add_header` set
/// on a hit, and a value it renders verbatim (no `$` variables, no controls).
fn check_add_header(
    i: usize,
    name: &str,
    value: &str,
) -> Result<(http::HeaderName, http::HeaderValue)> {
    let field = format!("nginx.add_headers[{i}]");
    let header = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Error::config(&field, format!("`{name}` is not a header name")))?;
    if [
        "content-type",
        "content-length",
        "content-encoding",
        "x-cache",
        "set-cookie",
        "vary",
    ]
    .contains(&header.as_str())
    {
        return Err(Error::config(
            &field,
            format!("`{name}` is set by nginx or mcpage, not by add_headers"),
        ));
    }
    if value.is_empty() || value.bytes().any(|b| b < b' ' || b == 0x7f || b == b'$') {
        return Err(Error::config(
            &field,
            "the value must be non-empty, without control characters or `$` (nginx variables)",
        ));
    }
    let value = http::HeaderValue::from_str(value)
        .map_err(|_| Error::config(&field, "not a header value"))?;
    Ok((header, value))
}

/// The longest index key past the namespace: `t:` + 32 hex digits + `:` + a
/// shard number below 1024 (see `tags::IndexKeys`).
const INDEX_KEY_OVERHEAD: usize = 2 + 32 + 1 + 4;

/// `MCPAGE_SECTION__FIELD`; variables without `__` (say `MCPAGE_LOG`) are not config.
fn env_provider() -> Env {
    Env::prefixed("MCPAGE_")
        .filter(|key| key.as_str().contains("__"))
        .split("__")
}

/// The longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `unix:/path` (when `address` starts with `unix:`): an absolute path that
/// fits a socket address and that nginx's config syntax keeps as one word.
fn check_unix_socket(field: &str, address: &str) -> Result<()> {
    let Some(path) = address.strip_prefix("unix:") else {
        return Ok(());
    };
    if !path.starts_with('/') {
        return Err(Error::config(
            field,
            format!("`{address}`: the socket path must be absolute, e.g. unix:/run/mcpage.sock"),
        ));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(Error::config(
            field,
            format!("`{address}`: socket paths are at most {MAX_SOCKET_PATH} bytes"),
        ));
    }
    if path
        .bytes()
        .any(|b| b <= b' ' || b == 0x7f || b"\"';{}#$".contains(&b))
    {
        return Err(Error::config(
            field,
            format!("`{address}`: no spaces, quotes or any of ;{{}}#$ in a socket path"),
        ));
    }
    Ok(())
}

fn check_servers(field: &str, servers: &[ServerSpec], may_be_empty: bool) -> Result<()> {
    if servers.is_empty() && !may_be_empty {
        return Err(Error::config(field, "needs at least one server"));
    }
    for (i, server) in servers.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let address = &server.address;
        if !(1..=1000).contains(&server.weight) {
            // 160 ring points per unit of weight: keep the ring a sane size.
            return Err(Error::config(field, "weight must be 1..=1000"));
        }
        if address.starts_with("unix:") {
            // nginx hashes `unix:/path` by its path (ngx_http_upstream_init_chash),
            // as `ring` does; the socket must be the one nginx's workers reach.
            check_unix_socket(&field, address)?;
            continue;
        }
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            // nginx would hash an empty port but connect to 80: always write the port.
            _ => {
                return Err(Error::config(field, format!("`{address}` must be ip:port")));
            }
        }
        // nginx resolves a name in an upstream once, into every address it
        // has, each a server of its own (`ngx_parse_url`): `localhost:11211`
        // becomes 127.0.0.1 and ::1, a ring unlike mcpage's one server.
        if address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::config(
                field,
                format!(
                    "`{address}` is not an IP address and port: nginx resolves a host name \
                     into all of its addresses, each a server of its own, so its ring would \
                     differ from mcpage's; write the address (127.0.0.1:11211, [::1]:11211)"
                ),
            ));
        }
    }
    Ok(())
}

fn check_nginx_size(field: &str, size: &str) -> Result<()> {
    let digits = size.trim_end_matches(['k', 'K', 'm', 'M']);
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || size.len() - digits.len() > 1
    {
        return Err(Error::config(
            field,
            format!("`{size}` is not an nginx size such as 64k"),
        ));
    }
    Ok(())
}

fn compile_regexes(field: &str, patterns: &[String]) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, pattern)| {
            Regex::new(pattern).map_err(|e| Error::config(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    /// The reference block in README.md's "Configuration" section is the
    /// defaults (but for the example's second server), field for field.
    #[test]
    fn readme_documents_every_default() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split_once("\n## Configuration\n")
            .map(|(_, rest)| rest)
            .expect("README has a Configuration section");
        let block = section
            .split_once("```toml\n")
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(block, _)| block)
            .expect("the section has a toml block");
        let documented: Config = Figment::from(Toml::string(block))
            .extract()
            .expect("the README's block parses");
        let mut expected = Config::default();
        expected
            .memcached
            .servers
            .push(ServerSpec::new("127.0.0.1:11212"));
        assert_eq!(format!("{documented:#?}"), format!("{expected:#?}"));
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults");
    }

    #[test]
    fn toml_then_env_layering() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "mcpage.toml",
                r#"
                [memcached]
                servers = ["127.0.0.1:11211", "127.0.0.1:11212 weight=2", { address = "127.0.0.1:11213", weight = 3 }]
                hashing = "modulo"
                [keys]
                prefix = "page:"
                query = "include"
                [cache]
                ttl_secs = 60
                "#,
            )?;
            jail.set_env("MCPAGE_CACHE__TTL_SECS", "120");
            jail.set_env("MCPAGE_PROXY__INVALIDATE_TOKEN", "s3cret");
            jail.set_env("MCPAGE_LOG", "ignored: not a config variable");
            let config: Config = Config::figment().extract()?;
            assert_eq!(
                config.memcached.servers,
                vec![
                    ServerSpec::new("127.0.0.1:11211"),
                    ServerSpec::new("127.0.0.1:11212").weight(2),
                    ServerSpec::new("127.0.0.1:11213").weight(3),
                ]
            );
            assert_eq!(config.memcached.hashing, Hashing::Modulo);
            assert_eq!(config.keys.prefix, "page:");
            assert_eq!(config.keys.query, QueryMode::Include);
            assert_eq!(config.cache.ttl_secs, 120);
            assert_eq!(config.proxy.invalidate_token.as_deref(), Some("s3cret"));
            config.validate().expect("valid");
            Ok(())
        });
    }

    fn field_of(config: &Config) -> String {
        match config.validate() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_values_name_their_field() {
        let mut c = Config::default();
        c.cache.include = vec!["^/".into(), "(".into()];
        assert_eq!(field_of(&c), "cache.include[1]");

        let mut c = Config::default();
        c.memcached.servers.clear();
        assert_eq!(field_of(&c), "memcached.servers");

        let mut c = Config::default();
        c.memcached.servers = vec![ServerSpec::new("127.0.0.1")];
        assert_eq!(field_of(&c), "memcached.servers[0]");

        let mut c = Config::default();
        c.keys.prefix = "a b".into();
        assert_eq!(field_of(&c), "keys.prefix");

        let mut c = Config::default();
        c.cache.allowed_hosts.clear();
        assert_eq!(field_of(&c), "cache.allowed_hosts");

        let mut c = Config::default();
        c.cache.allowed_hosts = vec!["Example.com:8080".into()];
        assert_eq!(field_of(&c), "cache.allowed_hosts[0]");

        let mut c = Config::default();
        c.memcached.servers = vec![ServerSpec::new("localhost:11211")];
        assert_eq!(field_of(&c), "memcached.servers[0]");

        let mut c = Config::default();
        c.memcached.index_servers = vec![ServerSpec::new("memcached:11211")];
        assert_eq!(field_of(&c), "memcached.index_servers[0]");

        let mut c = Config::default();
        c.nginx.buffer_size = "64kb".into();
        assert_eq!(field_of(&c), "nginx.buffer_size");
    }

    #[test]
    fn index_namespace_belongs_to_one_deployment() {
        let mut c = Config::default();
        assert_eq!(
            c.index_namespace(),
            "mcpage:",
            "unchanged for the default prefix"
        );
        c.keys.prefix = "stg:".into();
        let staging = c.index_namespace();
        c.keys.prefix = "prod:".into();
        let production = c.index_namespace();
        assert_ne!(staging, production);
        assert!(staging.starts_with("mcpage:") && staging.len() == "mcpage:".len() + 9);
        c.cache.index_namespace = "shared:".into();
        assert_eq!(c.index_namespace(), "shared:", "explicit wins");
        c.validate().expect("valid");
    }

    #[test]
    fn unix_sockets_need_an_absolute_path_nginx_can_parse() {
        let mut c = Config::default();
        c.nginx.listen = "unix:/run/mcpage/nginx.sock".into();
        c.nginx.app = "unix:/run/mcpage/proxy.sock".into();
        c.proxy.listen = "unix:/run/mcpage/proxy.sock".into();
        c.proxy.upstream = "unix:/run/gunicorn.sock".into();
        c.memcached.servers = vec![
            ServerSpec::new("unix:/run/memcached/a.sock"),
            ServerSpec::new("unix:/run/memcached/b.sock"),
        ];
        c.memcached.index_servers = vec![ServerSpec::new("unix:/run/memcached/index.sock")];
        c.validate().expect("unix sockets everywhere");
        let long = format!("unix:/{}", "s".repeat(MAX_SOCKET_PATH));
        for bad in [
            "unix:run/app.sock",
            "unix:",
            "unix:/a b",
            "unix:/a;b",
            &long,
        ] {
            let mut c = Config::default();
            c.nginx.app = bad.to_owned();
            assert_eq!(field_of(&c), "nginx.app", "{bad}");
            let mut c = Config::default();
            c.proxy.upstream = bad.to_owned();
            assert_eq!(field_of(&c), "proxy.upstream", "{bad}");
            let mut c = Config::default();
            c.memcached.servers = vec![ServerSpec::new(bad)];
            assert_eq!(field_of(&c), "memcached.servers[0]", "{bad}");
        }
    }

    #[test]
    fn unknown_hashing_and_fields_are_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file("mcpage.toml", "[memcached]\nhashing = \"ketama\"\n")?;
            let err = Config::figment()
                .extract::<Config>()
                .expect_err("unknown hashing");
            assert!(err.to_string().contains("ketama"), "{err}");
            jail.create_file("mcpage.toml", "[cache]\nttl = 5\n")?;
            let err = Config::figment()
                .extract::<Config>()
                .expect_err("unknown field");
            assert!(err.to_string().contains("ttl"), "{err}");
            jail.create_file(
                "mcpage.toml",
                "[memcached]\nservers = [\"127.0.0.1:11211 max_fails=3\"]\n",
            )?;
            let err = Config::figment()
                .extract::<Config>()
                .expect_err("unsupported parameter");
            assert!(err.to_string().contains("max_fails"), "{err}");
            jail.create_file(
                "mcpage.toml",
                "[memcached]\nservers = [\"unix:/run/my dir/mc.sock\"]\n",
            )?;
            let err = Config::figment()
                .extract::<Config>()
                .expect_err("a socket path with a space");
            assert!(
                err.to_string().contains("no spaces in a socket path"),
                "{err}"
            );
            Ok(())
        });
    }
}
