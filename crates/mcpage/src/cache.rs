//! [`Cache`]: the shared handle behind the layer, the invalidator and the CLI.
//! It owns the configuration, the memcached pools, the clocks, the write path
//! and the counters, and hands each part only what it needs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::Clocks;
use crate::config::{Compiled, Config};
use crate::error::{Error, Result};
use crate::invalidate::Invalidator;
use crate::key::{KeyScheme, KeySkip, PageKey};
use crate::memcached::{Circuit, Pool, Server, text};
use crate::policy::{self, Bypass};
use crate::put::{PageWrite, Writer, Written};
use crate::stats::{CacheStats, IndexUsage, Metrics, ServerReport};
use crate::tags::{self, IndexKeys};

/// A connected page cache: configuration, memcached pools and counters.
/// Cheap to clone; clones share everything.
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    compiled: Compiled,
    keys: KeyScheme,
    pages: Arc<Pool>,
    index: Arc<Pool>,
    index_keys: IndexKeys,
    clocks: Clocks,
    writer: Arc<Writer>,
    invalidator: Invalidator,
    metrics: Arc<Metrics>,
}

/// `lru_crawler metadump` may take a while on a big server.
const METADUMP_DEADLINE: Duration = Duration::from_secs(60);

impl Cache {
    /// Validate `config` and set up the memcached pools (connections are dialed lazily).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::Memcached`]
    /// when a server address cannot be used.
    pub async fn connect(config: &Config) -> Result<Cache> {
        let compiled = config.compile()?;
        let m = &config.memcached;
        let pages = Arc::new(Pool::connect(&m.servers, m.hashing, m).await?);
        let index = if m.index_servers.is_empty() {
            Arc::clone(&pages)
        } else {
            Arc::new(Pool::connect(&m.index_servers, m.hashing, m).await?)
        };
        let keys = KeyScheme::new(
            config.keys.prefix.as_bytes().to_vec(),
            config.keys.query,
            config.keys.merge_slashes,
            config.keys.host,
        );
        let index_keys = IndexKeys::new(&config.index_namespace(), config.cache.index_shards);
        let index_ttl = tags::index_ttl(config.cache.ttl_secs);
        let clocks = Clocks::new(Arc::clone(&index), index_keys.clone(), index_ttl);
        let metrics = Arc::new(Metrics::default());
        let writer = Arc::new(Writer::new(
            Arc::clone(&pages),
            Arc::clone(&index),
            clocks.clone(),
            index_keys.clone(),
            &config.cache,
            Duration::from_millis(config.invalidation.write_window_ms),
            Arc::clone(&metrics),
        ));
        let invalidator = Invalidator::new(
            Arc::clone(&pages),
            Arc::clone(&index),
            clocks.clone(),
            index_keys.clone(),
            keys.clone(),
            index_ttl,
            &config.invalidation,
            Arc::clone(&metrics),
        );
        Ok(Cache {
            inner: Arc::new(Inner {
                config: config.clone(),
                compiled,
                keys,
                pages,
                index,
                index_keys,
                clocks,
                writer,
                invalidator,
                metrics,
            }),
        })
    }

    /// The configuration this cache runs on.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The handle for removing pages.
    pub fn invalidator(&self) -> Invalidator {
        self.inner.invalidator.clone()
    }

    /// The nginx key for a request target (and, in host mode, the Host header).
    ///
    /// # Errors
    /// The reason nginx would not look this target up in memcached.
    pub fn page_key(&self, host: Option<&[u8]>, target: &[u8]) -> Result<PageKey, KeySkip> {
        self.inner.keys.page_key(host, target)
    }

    /// Would an anonymous GET of `target` be cached (before the response is
    /// known)? The page key, or the reason why not. `host` is the Host header
    /// (`None`: none was sent, and nginx uses its first `server_name`); the
    /// host the key is built from must be one of `cache.allowed_hosts` in
    /// every mode, and the raw path must be canonical
    /// ([`key::is_canonical_path`](crate::key::is_canonical_path)).
    ///
    /// # Errors
    /// The [`Bypass`] reason when the request would not be cached.
    pub fn classify(&self, host: Option<&[u8]>, target: &[u8]) -> Result<PageKey, Bypass> {
        let inner = &self.inner;
        let host_mode = inner.config.keys.host;
        if host_mode && host.is_none() && target.first() == Some(&b'/') {
            return Err(Bypass::Host);
        }
        let key = self.page_key(host, target)?;
        // The host nginx keys on or serves: an absolute-form target's own host
        // wins over the Host header, as in nginx's $host.
        let line_host = crate::key::request_line_host(target);
        if let Some(host) = line_host.or(host) {
            let name = crate::key::nginx_host(host).ok_or(Bypass::Host)?;
            if !inner.compiled.allowed_hosts.contains(&name) {
                return Err(Bypass::Host);
            }
        }
        if !crate::key::is_canonical_path(target, &key.uri) {
            return Err(Bypass::NonCanonicalPath);
        }
        policy::check_path(&inner.compiled, &key.uri)?;
        Ok(key)
    }

    /// The memcached server (as written in the config) nginx asks for `key`.
    pub fn server_for(&self, key: &PageKey) -> &str {
        self.inner.pages.route(&key.unescaped).name()
    }

    /// Wait until every background write started so far has finished (stored,
    /// retracted or failed). Useful before shutdown and in tests; requests never wait on it.
    pub async fn wait_for_writes(&self) {
        self.inner.writer.wait().await;
    }

    /// Counters since start.
    pub fn stats(&self) -> CacheStats {
        let servers = self
            .distinct_servers()
            .into_iter()
            .map(Server::health)
            .collect();
        self.inner
            .metrics
            .snapshot(servers, self.inner.invalidator.pending())
    }

    /// Store `body` as the page for `target` (a path as a user writes it, or
    /// `http://host/path` in host mode) under `tags`, through the same write path
    /// as the layer: register, store, recheck. For probes (`mcpage check`) and
    /// pre-warming.
    ///
    /// # Errors
    /// [`Error::NoCacheKey`] when `target` can have no page;
    /// [`Error::Retracted`] when the page was invalidated while being stored;
    /// [`Error::TooLarge`], [`Error::IndexFull`] or a memcached error when it
    /// could not be stored.
    pub async fn store_page<I, T>(
        &self,
        target: &str,
        body: impl Into<Bytes>,
        tags: I,
    ) -> Result<PageKey>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let (host, path) = crate::key::split_url(target);
        let key = self
            .page_key(host.map(str::as_bytes), path.as_bytes())
            .map_err(|reason| Error::NoCacheKey {
                url: target.to_owned(),
                reason,
            })?;
        let mut tags: Vec<String> = tags
            .into_iter()
            .map(Into::into)
            .filter(|t| !t.trim().is_empty())
            .collect();
        tags.sort();
        tags.dedup();
        let clock = self.inner.clocks.read(Circuit::Ignore).await?;
        let page = PageWrite {
            key,
            body: body.into(),
            ttl: self.inner.config.cache.ttl_secs,
            tags,
            clock,
            flight: None,
        };
        match self.inner.writer.write(&page).await? {
            Written::Stored => Ok(page.key),
            Written::Retracted | Written::Abandoned => Err(Error::Retracted {
                url: target.to_owned(),
            }),
        }
    }

    /// memcached's own `stats` (name -> value) of every configured server
    /// (pages and index pool, each once), in config order.
    pub async fn memcached_stats(&self) -> Vec<ServerReport<BTreeMap<String, String>>> {
        let mut out = Vec::new();
        for server in self.distinct_servers() {
            let result = server
                .text_command("stats", Duration::ZERO)
                .await
                .map(|lines| text::stats(&lines));
            out.push(ServerReport {
                server: server.name().to_owned(),
                result,
            });
        }
        out
    }

    /// Size of the tag index per index server, from `lru_crawler metadump`.
    pub async fn index_usage(&self) -> Vec<ServerReport<IndexUsage>> {
        let prefix = format!("{}t:", self.inner.index_keys.namespace());
        let mut out = Vec::new();
        for server in self.inner.index.servers() {
            let result = server.metadump(METADUMP_DEADLINE).await.map(|lines| {
                let mut usage = IndexUsage::default();
                for line in &lines {
                    let Some(key) = text::metadump_key(line) else {
                        continue;
                    };
                    if !key.starts_with(prefix.as_bytes()) {
                        continue;
                    }
                    let size = text::metadump_size(line).unwrap_or(0);
                    usage.items += 1;
                    usage.bytes += size;
                    usage.largest = usage.largest.max(size);
                }
                usage
            });
            out.push(ServerReport {
                server: server.name().to_owned(),
                result,
            });
        }
        out
    }

    fn distinct_servers(&self) -> Vec<&Server> {
        let mut servers: Vec<&Server> = Vec::new();
        for pool in [&self.inner.pages, &self.inner.index] {
            for server in pool.servers() {
                if !servers.iter().any(|s| s.name() == server.name()) {
                    servers.push(server);
                }
            }
        }
        servers
    }

    /// The compiled request and response policy.
    pub(crate) fn policy(&self) -> &Compiled {
        &self.inner.compiled
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Read G before a render (request path: honours the breaker).
    pub(crate) async fn read_clock(&self) -> Result<u64> {
        self.inner.clocks.read(Circuit::Honour).await
    }

    /// Start the write path for a rendered page, off the response path.
    pub(crate) fn spawn_write(&self, page: PageWrite) {
        self.inner.writer.spawn(page);
    }
}
