//! A per-server circuit breaker: after `threshold` consecutive failures the
//! server is skipped for `cooldown`, then one call probes it again.
//!
//! Request-path work (clock reads, stores) consults it so a dead or paused
//! memcached costs one timeout per cooldown instead of one per request.
//! Invalidation does not: it must try every server and report what failed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    /// The server, as configured: named in the log lines.
    server: String,
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are refused; 0 = closed.
    open_until_ms: AtomicU64,
    opened_total: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(server: impl Into<String>, threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            server: server.into(),
            threshold: threshold.max(1),
            cooldown,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            opened_total: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// May a call go to this server now? While open, exactly one caller per
    /// cooldown gets `true` (the probe).
    pub(crate) fn allow(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        if now < until {
            return false;
        }
        // Half-open: the caller that moves the deadline forward is the probe.
        let next = now + self.cooldown_ms();
        self.open_until_ms
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn cooldown_ms(&self) -> u64 {
        u64::try_from(self.cooldown.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub(crate) fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        // A load first: the common case (closed) stays a plain read on the
        // request path; only a success after an opening pays the swap.
        if self.open_until_ms.load(Ordering::Acquire) != 0
            && self.open_until_ms.swap(0, Ordering::AcqRel) != 0
        {
            tracing::info!(server = %self.server, "memcached circuit breaker closed");
        }
    }

    /// One more consecutive failure; `error` is logged when it opens the
    /// breaker (a permission or path problem shows at the default log level).
    pub(crate) fn record_failure(&self, error: &dyn std::fmt::Display) {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= self.threshold {
            let next = self.now_ms() + self.cooldown_ms();
            if self.open_until_ms.swap(next, Ordering::AcqRel) == 0 {
                self.opened_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    server = %self.server,
                    failures,
                    error = %error,
                    "memcached circuit breaker opened"
                );
            }
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) != 0
    }

    pub(crate) fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_once_per_cooldown() {
        let breaker = Breaker::new("s", 3, Duration::ZERO);
        assert!(breaker.allow());
        breaker.record_failure(&"test");
        breaker.record_failure(&"test");
        assert!(!breaker.is_open());
        breaker.record_failure(&"test");
        assert!(breaker.is_open());
        assert_eq!(breaker.opened_total(), 1);
        breaker.record_success();
        assert!(!breaker.is_open());
        assert!(breaker.allow());
    }

    #[test]
    fn open_breaker_refuses_until_cooldown() {
        let breaker = Breaker::new("s", 1, Duration::from_secs(3600));
        breaker.record_failure(&"test");
        assert!(!breaker.allow());
        assert!(!breaker.allow());
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let breaker = Breaker::new("s", 1, Duration::from_millis(1));
        breaker.record_failure(&"test");
        // Poll until the 1 ms cooldown has passed; then one probe, then refusal.
        let deadline = Instant::now() + Duration::from_secs(5);
        while breaker.now_ms() < breaker.open_until_ms.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "cooldown never ended");
            std::thread::yield_now();
        }
        assert!(breaker.allow());
        assert!(!breaker.allow());
    }
}
