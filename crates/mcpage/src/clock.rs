//! The invalidation clocks, the one piece of state the write path and the
//! invalidator agree through (DESIGN.md, "Why this order is race-free").
//!
//! - G (`<ns>clock`): a counter on the index pool that only grows. The write
//!   path reads it before a render; every invalidation bumps it first.
//! - Per tag, per URL and for purges (`<ns>tc:`, `<ns>uc:`, `<ns>pc`): the
//!   value of G at the last invalidation that covered them, raised (never
//!   lowered) by the invalidator before it deletes anything.
//!
//! A page rendered after reading G = g may be kept only when none of its
//! clocks is above g ([`Clocks::advanced_since`]).

use std::time::{SystemTime, UNIX_EPOCH};

use memcache::exp::{Arithmetic, Get, Meta, Set, Ttl};

use crate::error::{Error, Result};
use crate::memcached::{Circuit, Pool};
use crate::tags::IndexKeys;

use std::sync::Arc;

/// Clock items are never older than this; a clock that expires is recreated
/// at the current time in microseconds, which is above every value handed out.
const CLOCK_TTL_SECS: u32 = 30 * 24 * 3600;

/// Rounds of a compare-and-swap raise before giving up under contention.
const RAISE_ROUNDS: usize = 16;

/// The clocks on the index pool.
#[derive(Debug, Clone)]
pub(crate) struct Clocks {
    index: Arc<Pool>,
    keys: IndexKeys,
    /// Lifetime of tag, URL and purge clocks: longer than any page they cover.
    ttl: u32,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn parse_clock(value: Option<&[u8]>) -> Option<u64> {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Clocks {
    pub(crate) fn new(index: Arc<Pool>, keys: IndexKeys, ttl: u32) -> Self {
        Clocks { index, keys, ttl }
    }

    /// Read G (creating it when missing). On the request path use
    /// [`Circuit::Honour`], so an index outage costs one timeout per cooldown.
    ///
    /// # Errors
    /// The index server failed or its breaker is open.
    pub(crate) async fn read(&self, circuit: Circuit) -> Result<u64> {
        self.add(circuit, 0).await
    }

    /// Advance G by one and return the new value: the clock of an invalidation.
    ///
    /// # Errors
    /// The index server did not confirm.
    pub(crate) async fn bump(&self) -> Result<u64> {
        self.add(Circuit::Ignore, 1).await
    }

    async fn add(&self, circuit: Circuit, delta: u64) -> Result<u64> {
        let key = self.keys.clock();
        let server = self.index.route(&key);
        let op = Arithmetic::new(&key)
            .delta(delta)
            .initial(now_micros(), CLOCK_TTL_SECS);
        let result = server.run(circuit, op).await?;
        result
            .value
            .ok_or_else(|| server.protocol("clock increment returned no value"))
    }

    /// Raise each clock item to at least `clock` (CAS loop: a concurrent
    /// invalidation that set a higher value is never lowered). One result per key.
    pub(crate) async fn raise(&self, keys: &[Vec<u8>], clock: u64) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(keys.len());
        for key in keys {
            results.push(self.raise_one(key, clock).await);
        }
        results
    }

    async fn raise_one(&self, key: &[u8], clock: u64) -> Result<()> {
        let server = self.index.route(key);
        let value = clock.to_string();
        let ttl = Ttl::secs(self.ttl);
        for _ in 0..RAISE_ROUNDS {
            let current = server
                .run(Circuit::Ignore, Get::new(key).meta(Meta::NONE.cas()))
                .await?;
            let set = match (&current.value, current.item.cas) {
                (Some(old), Some(cas)) => {
                    if parse_clock(Some(old)).is_some_and(|old| old >= clock) {
                        return Ok(());
                    }
                    Set::new(key, &value).ttl(ttl).compare_cas(cas)
                }
                _ => Set::new(key, &value).ttl(ttl).add(),
            };
            if server.run(Circuit::Ignore, set).await?.applied() {
                return Ok(());
            }
        }
        Err(Error::Contended {
            server: server.name().to_owned(),
            item: String::from_utf8_lossy(key).into_owned(),
        })
    }

    /// Did any of `keys` (tag, URL or purge clocks) advance past `since`, the
    /// G a render read before it started? An unreadable clock counts as advanced.
    ///
    /// # Errors
    /// A clock could not be read: the caller cannot tell, and must not keep the page.
    pub(crate) async fn advanced_since(&self, keys: Vec<Vec<u8>>, since: u64) -> Result<bool> {
        let ops = keys.into_iter().map(|k| (k.clone(), Get::new(k))).collect();
        let mut advanced = false;
        for result in self.index.run_routed(Circuit::Ignore, ops).await {
            let result = result?;
            if result.hit() {
                advanced |= parse_clock(result.value.as_deref()).is_none_or(|c| c > since);
            }
        }
        Ok(advanced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_parsing() {
        assert_eq!(parse_clock(Some(b"42")), Some(42));
        assert_eq!(parse_clock(Some(b" 42\r\n")), Some(42));
        assert_eq!(parse_clock(Some(b"x")), None);
        assert_eq!(parse_clock(None), None);
    }
}
