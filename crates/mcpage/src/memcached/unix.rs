//! The meta protocol over a unix socket (`unix:/path` servers).
//!
//! `memcache::exp` 0.21 dials TCP only. For a server on a unix socket this
//! module carries the same commands: the crate still builds each command
//! ([`Operation::prepare`]) and decodes each answer ([`parse_meta_result`],
//! [`Operation::parse`]), so the two transports cannot disagree on the
//! protocol; only the framing (one reply per command, a `VA` reply's data
//! block, per `protocol.txt` of memcached) and a small pool of idle
//! connections live here. `prepare`/`parse` are public but hidden from the
//! crate's docs, which is why the dependency is pinned to `~0.21`.
//!
//! Failure semantics follow the crate's: a command that fails to encode fails
//! the batch before anything is written; a transport failure or the deadline
//! fails every command not yet answered and drops the connection (its stream
//! may be out of step); `CLIENT_ERROR`/`SERVER_ERROR` replies fail their own
//! command only.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use memcache::exp::{Error, MetaResponse, Operation, ReturnCode, parse_meta_result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

type Connection = BufReader<UnixStream>;

/// A meta-protocol client for one memcached on a unix socket.
pub(crate) struct UnixClient {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    timeout: Duration,
}

/// One reply: its header and, for `VA`, the data block; or the command's own error.
type Reply = Result<(MetaResponse, Option<Vec<u8>>), Error>;

impl UnixClient {
    /// A client for the socket at `path`; connections are opened on demand,
    /// at most `max_idle` kept between exchanges, each exchange bounded by
    /// `timeout`.
    pub(crate) fn new(path: PathBuf, max_idle: usize, timeout: Duration) -> UnixClient {
        UnixClient {
            path,
            idle: Mutex::new(Vec::new()),
            max_idle,
            timeout,
        }
    }

    /// Run one operation.
    pub(crate) async fn run<O: Operation>(&self, operation: O) -> Result<O::Output, Error> {
        self.run_many(vec![operation])
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::Protocol("response missing".to_owned())))
    }

    /// Run operations pipelined on one connection; one result per operation, in order.
    pub(crate) async fn run_many<O: Operation>(
        &self,
        operations: Vec<O>,
    ) -> Result<Vec<Result<O::Output, Error>>, Error> {
        let mut payload = Vec::new();
        for operation in &operations {
            operation.prepare()?.encode_into(&mut payload)?;
        }
        let mut replies: Vec<Reply> = Vec::with_capacity(operations.len());
        let exchange = async {
            let mut connection = self.checkout().await?;
            connection.get_mut().write_all(&payload).await?;
            while replies.len() < operations.len() {
                replies.push(read_reply(&mut connection).await?);
            }
            Ok::<_, Error>(connection)
        };
        let failure = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(connection)) => {
                self.checkin(connection);
                None
            }
            Ok(Err(error)) => Some(error),
            Err(_) => Some(Error::Timeout { key: Vec::new() }),
        };
        let mut replies = replies.into_iter();
        Ok(operations
            .iter()
            .map(|operation| match replies.next() {
                Some(reply) => reply.and_then(|(response, value)| {
                    let mut wire = parse_meta_result(response)?;
                    wire.value = value;
                    operation.parse(wire)
                }),
                None => Err(match &failure {
                    Some(Error::Io(e)) => Error::Io(std::io::Error::new(e.kind(), e.to_string())),
                    Some(Error::Timeout { .. }) | None => Error::Timeout {
                        key: operation.key().to_vec(),
                    },
                    Some(other) => Error::Protocol(other.to_string()),
                }),
            })
            .collect())
    }

    /// An idle connection that is still in step, or a new one.
    async fn checkout(&self) -> Result<Connection, Error> {
        loop {
            let candidate = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match candidate {
                Some(connection) if is_reusable(&connection) => return Ok(connection),
                Some(_) => continue,
                None => return Ok(BufReader::new(UnixStream::connect(&self.path).await?)),
            }
        }
    }

    fn checkin(&self, connection: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(connection);
        }
    }
}

/// An idle connection is in step when nothing is buffered or readable: a
/// readable EOF means memcached closed it (restart) while it sat in the pool.
fn is_reusable(connection: &Connection) -> bool {
    if !connection.buffer().is_empty() {
        return false;
    }
    let mut probe = [0u8; 1];
    match connection.get_ref().try_read(&mut probe) {
        Ok(_) => false,
        Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Read one reply. The outer error is the transport's (the stream can no
/// longer be trusted); the inner one the command's own (`CLIENT_ERROR`, ...).
async fn read_reply(connection: &mut Connection) -> Result<Reply, Error> {
    let mut line = Vec::new();
    if connection.read_until(b'\n', &mut line).await? == 0 {
        return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| Error::Protocol("reply line without CRLF".to_owned()))?;
    let response = match MetaResponse::parse_header(line) {
        Ok(response) => response,
        Err(error @ (Error::Rejected(_) | Error::Server(_))) => return Ok(Err(error)),
        Err(error) => return Err(error),
    };
    if response.rc() != ReturnCode::Va {
        return Ok(Ok((response, None)));
    }
    // `VA <datalen> <flags>*`: parse_header checked the length already.
    let length = line
        .split(|b| *b == b' ')
        .nth(1)
        .and_then(|token| std::str::from_utf8(token).ok())
        .and_then(|token| token.parse::<usize>().ok())
        .ok_or_else(|| Error::Protocol("VA reply without a data length".to_owned()))?;
    let mut value = vec![0u8; length + 2];
    connection.read_exact(&mut value).await?;
    if !value.ends_with(b"\r\n") {
        return Err(Error::Protocol(
            "data block missing CRLF terminator".to_owned(),
        ));
    }
    value.truncate(length);
    Ok(Ok((response, Some(value))))
}
