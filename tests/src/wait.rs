//! Polling with a deadline, never a fixed sleep.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::process::POLL;

/// Poll `condition` until it holds; panics with `what` after `deadline`.
/// For eventual conditions ("the page is in memcached now"), never a fixed sleep.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
