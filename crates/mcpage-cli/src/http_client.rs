//! hyper-util's HTTP/1.1 client over plain TCP, as the proxy (to its
//! upstream) and `mcpage check` (to nginx) use it, and the wording of its
//! errors.

use std::error::Error as StdError;
use std::time::Duration;

use hyper::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// What happens to a connection once its response is read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reuse {
    /// Closed: every request dials a fresh TCP connection.
    Never,
    /// Kept for the next request to the same host: up to `max_idle` idle
    /// connections per host, each for up to `idle_timeout`.
    Pool {
        max_idle: usize,
        idle_timeout: Duration,
    },
}

/// An HTTP/1.1 client (`http://` only, `TCP_NODELAY`) whose connection
/// attempts give up after `connect_timeout`. It adds a `Host` header from the
/// request URI unless the request has one, and no other header.
pub(crate) fn client<B>(connect_timeout: Duration, reuse: Reuse) -> Client<HttpConnector, B>
where
    B: Body + Send,
    B::Data: Send,
{
    client_with(tcp_connector(connect_timeout), reuse)
}

/// TCP connections with `TCP_NODELAY`, given up after `connect_timeout`.
pub(crate) fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector
}

/// An HTTP/1.1 client over any connector (TCP, a unix socket).
pub(crate) fn client_with<C, B>(connector: C, reuse: Reuse) -> Client<C, B>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
    B: Body + Send,
    B::Data: Send,
{
    let mut builder = Client::builder(TokioExecutor::new());
    match reuse {
        Reuse::Never => builder.pool_max_idle_per_host(0),
        Reuse::Pool {
            max_idle,
            idle_timeout,
        } => builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(max_idle),
    };
    builder.build(connector)
}

/// The most specific reason in an error chain: an I/O error's kind when it
/// is a common one (`connection refused`), else the innermost message.
pub(crate) fn root_cause(error: &(dyn StdError + 'static)) -> String {
    let mut current: &(dyn StdError + 'static) = error;
    loop {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut
                | NotConnected | AddrNotAvailable | HostUnreachable | NetworkUnreachable
                | BrokenPipe => io.kind().to_string(),
                _ => io.to_string(),
            };
        }
        match current.source() {
            Some(source) => current = source,
            None => return current.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_cause_names_the_io_error() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(root_cause(&io), "connection refused");
        let other = std::io::Error::other("name or service not known");
        assert_eq!(root_cause(&other), "name or service not known");
    }
}
