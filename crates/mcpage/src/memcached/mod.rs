//! The memcached client: one `memcache::exp` async meta client per server,
//! routed by nginx's own ring, with a circuit breaker per server, pipelined
//! batches, and the text-protocol commands the meta client does not speak
//! (`stats`, `lru_crawler metadump`; parsed in [`text`]).
//!
//! Every server gets its own client (not one multi-server client with a
//! `Router`) because routing needs the unescaped value V, weights and nginx's
//! skip walk, and because invalidation must address servers one by one and
//! report which one failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use memcache::exp::{AsyncMetaClient, MetaClientBuilder, Operation};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

mod breaker;
mod quiet;
pub(crate) mod text;
mod unix;

use std::sync::Arc;

use breaker::Breaker;
pub(crate) use quiet::{Deletion, quiet_safe};

use crate::config::{MemcachedConfig, ServerSpec};
use crate::error::{Error, Result};
use crate::ring::{Hashing, Ring};

/// How a server is reached: the meta client over TCP, or the same
/// commands over a unix socket.
enum Client {
    Tcp(AsyncMetaClient),
    Unix(unix::UnixClient),
}

impl Client {
    /// A client for `address` (`ip:port` or `unix:/path`) with `max_idle`
    /// idle connections and `timeout` per exchange.
    async fn connect(address: &str, timeout: Duration, max_idle: usize) -> Result<Client> {
        Ok(match address.strip_prefix("unix:") {
            Some(path) => Client::Unix(unix::UnixClient::new(path.into(), max_idle, timeout)),
            None => Client::Tcp(
                MetaClientBuilder::new()
                    .io_timeout(Some(timeout))
                    .connect_timeout(Some(timeout))
                    .max_idle(max_idle)
                    .connect_async(address)
                    .await
                    .map_err(|source| Error::Memcached {
                        server: address.to_owned(),
                        source: Arc::new(source),
                    })?,
            ),
        })
    }

    async fn run<O: Operation>(&self, operation: O) -> memcache::exp::Result<O::Output> {
        match self {
            Client::Tcp(client) => client.run(operation).await,
            Client::Unix(client) => client.run(operation).await,
        }
    }

    async fn run_many<O: Operation>(
        &self,
        operations: Vec<O>,
    ) -> memcache::exp::Result<Vec<memcache::exp::Result<O::Output>>> {
        match self {
            Client::Tcp(client) => client.run_many(operations).await,
            Client::Unix(client) => client.run_many(operations).await,
        }
    }
}

/// One memcached server addressed directly, as `memcached.servers` names it
/// (`ip:port`, or `unix:/path` for its socket), for tools that must write to
/// or read from one particular server: `mcpage check` writes a different
/// probe to each server to see which one nginx reads. The [`Cache`](crate::Cache)
/// routes by nginx's ring instead; use it for pages.
///
/// ```no_run
/// # async fn example() -> mcpage::Result<()> {
/// use memcache::exp::{Get, Set};
/// use std::time::Duration;
///
/// let socket = "unix:/run/memcached/memcached.sock";
/// let server = mcpage::MemcachedClient::connect(socket, Duration::from_millis(500)).await?;
/// server.run(Set::new("/about", b"<p>about</p>".as_slice())).await?;
/// let page = server.run(Get::new("/about")).await?;
/// # Ok(())
/// # }
/// ```
pub struct MemcachedClient {
    name: String,
    client: Client,
}

impl std::fmt::Debug for MemcachedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl MemcachedClient {
    /// A client for `address`, `timeout` per exchange (connecting included).
    /// Nothing is sent until the first operation.
    ///
    /// # Errors
    ///
    /// [`Error::Memcached`] when an `ip:port` address cannot be used.
    pub async fn connect(address: &str, timeout: Duration) -> Result<MemcachedClient> {
        Ok(MemcachedClient {
            name: address.to_owned(),
            client: Client::connect(address, timeout, 1).await?,
        })
    }

    /// The server as given to [`connect`](Self::connect).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run one `memcache::exp` operation (`Get`, `Set`, `Delete`, ...).
    ///
    /// # Errors
    ///
    /// [`Error::Memcached`] naming the server, with the client's error
    /// (transport, timeout, or a reply the server refused the command with).
    pub async fn run<O: Operation>(&self, operation: O) -> Result<O::Output> {
        self.client
            .run(operation)
            .await
            .map_err(|source| Error::Memcached {
                server: self.name.clone(),
                source: Arc::new(source),
            })
    }
}

/// The longest pause between two lines of a text command's answer (raised to
/// `memcached.timeout_ms` when that is longer): memcached's LRU crawler may
/// take a moment to start a metadump.
const TEXT_IDLE_FLOOR: Duration = Duration::from_secs(2);

/// A raw connection to a server, for what the meta client does not do.
pub(crate) type Stream = Either<TcpStream, UnixStream>;

/// One memcached server.
pub(crate) struct Server {
    name: String,
    client: Client,
    breaker: Breaker,
    /// Failed operations (transport, protocol, rejected, breaker open).
    errors: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Whether a call honours the server's circuit breaker (request path: fail
/// fast while it is open) or must be attempted regardless (invalidation: an
/// open breaker is not a confirmation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Circuit {
    Honour,
    Ignore,
}

/// Errors that say the server (not the request) is unwell.
fn is_server_failure(error: &memcache::exp::Error) -> bool {
    use memcache::exp::Error as E;
    matches!(
        error,
        E::Io(_) | E::Timeout { .. } | E::Ambiguous { .. } | E::Protocol(_)
    )
}

impl Server {
    /// The server as written in the config.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The client's view of this server, for [`crate::CacheStats`].
    pub(crate) fn health(&self) -> crate::ServerStats {
        crate::ServerStats {
            name: self.name.clone(),
            breaker_open: self.breaker.is_open(),
            breaker_opened: self.breaker.opened_total(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// A protocol error about this server.
    pub(crate) fn protocol(&self, message: impl Into<String>) -> Error {
        Error::Protocol {
            server: self.name.clone(),
            message: message.into(),
        }
    }

    fn check(&self, circuit: Circuit) -> Result<()> {
        if circuit == Circuit::Honour && !self.breaker.allow() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(Error::BreakerOpen {
                server: self.name.clone(),
            });
        }
        Ok(())
    }

    fn error(&self, source: memcache::exp::Error) -> Error {
        self.errors.fetch_add(1, Ordering::Relaxed);
        Error::Memcached {
            server: self.name.clone(),
            source: Arc::new(source),
        }
    }

    /// Run one operation.
    pub(crate) async fn run<O: Operation>(
        &self,
        circuit: Circuit,
        operation: O,
    ) -> Result<O::Output> {
        self.check(circuit)?;
        match self.client.run(operation).await {
            Ok(output) => {
                self.breaker.record_success();
                Ok(output)
            }
            Err(error) => {
                if is_server_failure(&error) {
                    self.breaker.record_failure(&error);
                }
                Err(self.error(error))
            }
        }
    }

    /// Run operations pipelined on this server; one result per operation, in order.
    pub(crate) async fn run_many<O: Operation>(
        &self,
        circuit: Circuit,
        operations: Vec<O>,
    ) -> Vec<Result<O::Output>> {
        if operations.is_empty() {
            return Vec::new();
        }
        let count = operations.len();
        if let Err(error) = self.check(circuit) {
            return fail_all(count, &error);
        }
        match self.client.run_many(operations).await {
            Ok(results) => {
                let mut failed = None;
                let out = results
                    .into_iter()
                    .map(|result| {
                        result.map_err(|error| {
                            if failed.is_none() && is_server_failure(&error) {
                                failed = Some(error.to_string());
                            }
                            self.error(error)
                        })
                    })
                    .collect();
                if let Some(error) = failed {
                    self.breaker.record_failure(&error);
                } else {
                    self.breaker.record_success();
                }
                out
            }
            Err(error) => {
                if is_server_failure(&error) {
                    self.breaker.record_failure(&error);
                }
                let error = self.error(error);
                fail_all(count, &error)
            }
        }
    }

    /// Every item's `lru_crawler metadump` line (`key=... exp=... size=...`).
    ///
    /// Walks the hash table (`metadump hash`): the LRU walk (`metadump all`)
    /// misses items that move between LRU segments while it runs (about 1% of
    /// recently written or read items under traffic, measured on 1.6.18), so
    /// `purge_prefix("/")` would leave pages behind. `all` is only the
    /// fallback for a memcached that does not know `hash`.
    pub(crate) async fn metadump(&self, deadline: Duration) -> Result<Vec<Vec<u8>>> {
        match self
            .text_command("lru_crawler metadump hash", deadline)
            .await
        {
            Err(Error::Protocol { message, .. }) if !message.contains("BUSY") => {
                self.text_command("lru_crawler metadump all", deadline)
                    .await
            }
            other => other,
        }
    }

    /// A fresh raw connection (TCP with Nagle off, or the unix socket).
    pub(crate) async fn connect(&self) -> std::io::Result<Stream> {
        match self.name.strip_prefix("unix:") {
            Some(path) => Ok(Either::Right(UnixStream::connect(path).await?)),
            None => {
                let stream = TcpStream::connect(&self.name).await?;
                stream.set_nodelay(true)?;
                Ok(Either::Left(stream))
            }
        }
    }

    /// Raw text command over a fresh connection, for what the meta client
    /// does not speak (`stats`, `lru_crawler metadump`). Returns the lines up to
    /// the terminator line (`END`), without it.
    pub(crate) async fn text_command(
        &self,
        command: &str,
        deadline: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let io = |e: std::io::Error| self.error(memcache::exp::Error::Io(e));
        // A long answer (a metadump) may take `deadline`, but a server that
        // stops sending (paused, overloaded) fails after `idle`, not after
        // the whole deadline: `mcpage stats` must not hang for a minute.
        let idle = self.timeout.max(TEXT_IDLE_FLOOR);
        let exchange = async {
            let mut stream = self.connect().await.map_err(io)?;
            stream.write_all(command.as_bytes()).await.map_err(io)?;
            stream.write_all(b"\r\n").await.map_err(io)?;
            let mut reader = BufReader::new(stream);
            let mut lines = Vec::new();
            loop {
                let mut line = Vec::new();
                let read = tokio::time::timeout(idle, reader.read_until(b'\n', &mut line))
                    .await
                    .map_err(|_| {
                        self.error(memcache::exp::Error::Timeout {
                            key: command.as_bytes().to_vec(),
                        })
                    })?;
                if read.map_err(io)? == 0 {
                    return Err(Error::Protocol {
                        server: self.name.clone(),
                        message: format!("connection closed during `{command}`"),
                    });
                }
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                if line == b"END" {
                    return Ok(lines);
                }
                if line.starts_with(b"ERROR")
                    || line.starts_with(b"CLIENT_ERROR")
                    || line.starts_with(b"SERVER_ERROR")
                    || line.starts_with(b"BUSY")
                {
                    return Err(Error::Protocol {
                        server: self.name.clone(),
                        message: format!("`{command}`: {}", String::from_utf8_lossy(&line)),
                    });
                }
                lines.push(line);
            }
        };
        tokio::time::timeout(deadline.max(self.timeout), exchange)
            .await
            .map_err(|_| {
                self.error(memcache::exp::Error::Timeout {
                    key: command.as_bytes().to_vec(),
                })
            })?
    }
}

/// The error of a batch that failed as a whole, once per operation.
fn fail_all<T>(count: usize, error: &Error) -> Vec<Result<T>> {
    (0..count).map(|_| Err(error.duplicate())).collect()
}

/// A set of servers and the ring nginx builds over them.
#[derive(Debug)]
pub(crate) struct Pool {
    servers: Vec<Server>,
    ring: Ring,
}

impl Pool {
    pub(crate) async fn connect(
        specs: &[ServerSpec],
        hashing: Hashing,
        config: &MemcachedConfig,
    ) -> Result<Pool> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut servers = Vec::with_capacity(specs.len());
        for spec in specs {
            let client = Client::connect(&spec.address, timeout, config.max_idle).await?;
            servers.push(Server {
                name: spec.address.clone(),
                client,
                breaker: Breaker::new(
                    spec.address.as_str(),
                    config.breaker_failures,
                    Duration::from_millis(config.breaker_cooldown_ms),
                ),
                errors: AtomicU64::new(0),
                timeout,
            });
        }
        let weighted: Vec<(String, u32)> = specs
            .iter()
            .map(|s| (s.address.clone(), s.weight))
            .collect();
        Ok(Pool {
            servers,
            ring: Ring::new(&weighted, hashing),
        })
    }

    pub(crate) fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// The server nginx asks for the (unescaped) value V.
    pub(crate) fn route(&self, value: &[u8]) -> &Server {
        &self.servers[self.ring.pick(value)]
    }

    /// Run `(value, operation)` pairs grouped per server (routed by V), the
    /// groups concurrently; results in input order.
    pub(crate) async fn run_routed<O: Operation>(
        &self,
        circuit: Circuit,
        ops: Vec<(Vec<u8>, O)>,
    ) -> Vec<Result<O::Output>> {
        let ops = ops
            .into_iter()
            .map(|(value, op)| (self.ring.pick(&value), op))
            .collect();
        self.run_on(circuit, ops).await
    }

    /// Like [`run_routed`](Self::run_routed) with the server index given.
    pub(crate) async fn run_on<O: Operation>(
        &self,
        circuit: Circuit,
        ops: Vec<(usize, O)>,
    ) -> Vec<Result<O::Output>> {
        let mut groups: Vec<(Vec<usize>, Vec<O>)> = self
            .servers
            .iter()
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        let count = ops.len();
        for (position, (server, op)) in ops.into_iter().enumerate() {
            groups[server].0.push(position);
            groups[server].1.push(op);
        }
        self.run_grouped(circuit, groups, count).await
    }

    async fn run_grouped<O: Operation>(
        &self,
        circuit: Circuit,
        groups: Vec<(Vec<usize>, Vec<O>)>,
        count: usize,
    ) -> Vec<Result<O::Output>> {
        let mut positions = Vec::new();
        let mut names = Vec::new();
        let futures: Vec<_> = groups
            .into_iter()
            .zip(&self.servers)
            .filter(|((idx, _), _)| !idx.is_empty())
            .map(|((idx, ops), server)| {
                positions.push(idx);
                names.push(server.name.as_str());
                server.run_many(circuit, ops)
            })
            .collect();
        let results = join_all(futures).await;
        let mut out: Vec<Option<Result<O::Output>>> = (0..count).map(|_| None).collect();
        for ((idx, results), server) in positions.into_iter().zip(results).zip(&names) {
            // One result per operation; a short answer fails the rest.
            let mut results = results.into_iter();
            for position in idx {
                out[position] = Some(results.next().unwrap_or_else(|| {
                    Err(Error::Protocol {
                        server: (*server).to_owned(),
                        message: "pipelined batch returned fewer results than operations"
                            .to_owned(),
                    })
                }));
            }
        }
        // Every position was in exactly one group, so every slot is filled.
        out.into_iter().flatten().collect()
    }
}
