//! Deletes in the meta protocol's quiet mode, for invalidations of many pages.
//!
//! `memcache::exp` 0.21 does not speak quiet mode: its pipelined batches read
//! one reply per command, and its connection type says quiet commands would
//! desynchronize the stream. So this module writes the commands itself, over
//! one fresh connection per server (as [`Server::text_command`] does):
//! `md <key> q O<n>` for every key, then one `mn`, in a single write. memcached
//! leaves out the `HD` of every delete that succeeded and still answers
//! everything else: `NF O<n>` (already gone), `EX`, `CLIENT_ERROR`,
//! `SERVER_ERROR`; then `MN` once all were processed. So 10,000 deletes cost
//! one write, one round trip and a few bytes of replies, instead of 10,000
//! `HD` lines parsed one by one.
//!
//! A key is reported deleted only when the `MN` came back and no reply named
//! it; a reply that names no key (an error line without `O`) or a connection
//! that fails before `MN` leaves every key not named otherwise unconfirmed:
//! an error, never a silent success.

use std::borrow::Cow;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Pool, Server};
use crate::error::{Error, Result};

/// Most keys per connection: 10,000 deletes for one server go over four
/// connections at once (memcached's default is four worker threads).
const QUIET_CHUNK: usize = 2_500;

/// What memcached said about one key of a quiet delete batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deletion {
    /// Deleted by this batch (no reply before `MN`).
    Deleted,
    /// Not there (`NF`).
    Missing,
}

/// Whether `key` can be sent as is: the client would base64-encode keys with
/// bytes <= 0x20 or 0x7F (the meta `b` flag), and memcached refuses keys over
/// 250 bytes. Such keys go through the ordinary (non-quiet) path.
pub(crate) fn quiet_safe(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= 250 && key.iter().all(|&b| b > 0x20 && b < 0x7F)
}

/// Input positions, their keys, and the server they go to: one connection's batch.
type Chunk<'a, 'k> = (&'a [usize], &'a [&'k [u8]], &'a Server);

impl Server {
    /// Delete `keys` (each [`quiet_safe`]) with quiet-mode `md`; one result per
    /// key, in order. Bounded by the server's timeout plus a millisecond per
    /// 100 keys.
    pub(crate) async fn delete_quiet(&self, keys: &[&[u8]]) -> Vec<Result<Deletion>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let mut payload = Vec::with_capacity(keys.iter().map(|k| k.len() + 16).sum::<usize>() + 4);
        for (n, key) in keys.iter().enumerate() {
            payload.extend_from_slice(b"md ");
            payload.extend_from_slice(key);
            // Writing into a Vec cannot fail.
            let _ = write!(payload, " q O{n}\r\n");
        }
        payload.extend_from_slice(b"mn\r\n");
        let mut answers: Vec<Option<Result<Deletion>>> = keys.iter().map(|_| None).collect();
        let deadline = self.timeout + Duration::from_millis(keys.len() as u64 / 100);
        let outcome = tokio::time::timeout(deadline, self.quiet_exchange(&payload, &mut answers))
            .await
            .unwrap_or_else(|_| Err(self.error(memcache::exp::Error::Timeout { key: Vec::new() })));
        let unconfirmed = match outcome {
            Ok(None) => None,
            Ok(Some(line)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                Some(self.protocol(format!(
                    "quiet delete batch: `{line}` names no key, so no delete of the batch without a reply is confirmed"
                )))
            }
            // Counted by `Server::error` already.
            Err(error) => Some(error),
        };
        answers
            .into_iter()
            .map(|answer| match (answer, &unconfirmed) {
                (Some(answer), _) => answer,
                (None, None) => Ok(Deletion::Deleted),
                (None, Some(error)) => Err(copy_error(error)),
            })
            .collect()
    }

    /// Write the batch, read replies up to `MN`, fill `answers` from the
    /// replies that name a key. `Ok(Some(line))`: a reply named no key.
    async fn quiet_exchange(
        &self,
        payload: &[u8],
        answers: &mut [Option<Result<Deletion>>],
    ) -> Result<Option<String>> {
        let io = |e: std::io::Error| self.error(memcache::exp::Error::Io(e));
        let stream = self.connect().await.map_err(io)?;
        let (read, mut write) = tokio::io::split(stream);
        // Write and read at once: memcached answers while the batch is still
        // arriving, and a reader that waited for the whole write could
        // deadlock with a server whose send buffer is full.
        let writer = async {
            write.write_all(payload).await?;
            write.flush().await
        };
        let reader = async {
            let mut reader = BufReader::new(read);
            let mut unnamed = None;
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                if text == "MN" {
                    return Ok(unnamed);
                }
                let mut tokens = text.split(' ');
                let code = tokens.next().unwrap_or_default();
                let slot = tokens
                    .find_map(|t| t.strip_prefix('O'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&n| n < answers.len());
                match slot {
                    Some(n) => {
                        answers[n] = Some(match code {
                            "NF" => Ok(Deletion::Missing),
                            "HD" => Ok(Deletion::Deleted),
                            _ => {
                                self.errors.fetch_add(1, Ordering::Relaxed);
                                Err(self.protocol(format!("quiet delete: `{text}`")))
                            }
                        });
                    }
                    None => {
                        unnamed.get_or_insert(text);
                    }
                }
            }
        };
        let (written, read) = tokio::join!(writer, reader);
        written.map_err(io)?;
        read.map_err(io)
    }
}

impl Pool {
    /// Delete `(value, key)` pairs in quiet mode on the servers nginx asks
    /// for each value V, all servers at once; one result per pair, in order.
    pub(crate) async fn delete_quiet_routed(
        &self,
        pairs: &[(Cow<'_, [u8]>, &[u8])],
    ) -> Vec<Result<Deletion>> {
        let mut groups: Vec<(Vec<usize>, Vec<&[u8]>)> = self
            .servers
            .iter()
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        for (position, (value, key)) in pairs.iter().enumerate() {
            let group = &mut groups[self.ring.pick(value)];
            group.0.push(position);
            group.1.push(*key);
        }
        // A big batch is split over a few connections: memcached gives each
        // connection to one of its worker threads, so the chunks are deleted
        // in parallel.
        let chunks: Vec<Chunk<'_, '_>> = groups
            .iter()
            .zip(&self.servers)
            .flat_map(|((positions, keys), server)| {
                positions
                    .chunks(QUIET_CHUNK)
                    .zip(keys.chunks(QUIET_CHUNK))
                    .map(move |(positions, keys)| (positions, keys, server))
            })
            .collect();
        let exchanges = chunks
            .iter()
            .map(|(_, keys, server)| server.delete_quiet(keys));
        let mut out: Vec<Option<Result<Deletion>>> = pairs.iter().map(|_| None).collect();
        for ((positions, _, _), results) in chunks.iter().zip(join_all(exchanges).await) {
            for (&position, result) in positions.iter().zip(results) {
                out[position] = Some(result);
            }
        }
        out.into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(Error::Protocol {
                        server: String::new(),
                        message: "quiet delete batch returned fewer results than keys".to_owned(),
                    })
                })
            })
            .collect()
    }
}

fn copy_error(error: &Error) -> Error {
    match error {
        Error::Memcached { server, source } => Error::Memcached {
            server: server.clone(),
            source: Arc::clone(source),
        },
        other => Error::Protocol {
            server: other.server().unwrap_or_default().to_owned(),
            message: other.detail(),
        },
    }
}
