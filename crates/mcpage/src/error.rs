//! The one error type of the library.

/// Everything that can go wrong in mcpage.
///
/// Request-path problems (a memcached outage, a key nginx would reject) never
/// surface as errors to HTTP clients: the layer fails open. These errors reach
/// callers of configuration loading and of the [`Invalidator`](crate::Invalidator),
/// where silence would be a lie.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid; `field` names it (`cache.include[2]`).
    #[error("invalid config `{field}`: {reason}")]
    Config {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration could not be read or parsed (file, TOML, env).
    #[error("cannot load config: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A memcached server did not confirm an operation.
    #[error("memcached {server}: {source}")]
    Memcached {
        /// The server as written in the config.
        server: String,
        /// What the client reported.
        #[source]
        source: memcache::exp::Error,
    },
    /// A memcached server answered something the operation cannot use.
    #[error("memcached {server}: {message}")]
    Protocol {
        /// The server as written in the config.
        server: String,
        /// What was unexpected.
        message: String,
    },
    /// The circuit breaker for a server is open: recent calls failed, so the
    /// call was not attempted.
    #[error("memcached {server}: circuit breaker open after repeated failures")]
    BreakerOpen {
        /// The server as written in the config.
        server: String,
    },
    /// Invalidation could not be completed; some pages may still be cached.
    #[error(
        "invalidation incomplete: {failed} of {attempted} memcached operations failed (first: {first})"
    )]
    Incomplete {
        /// Operations that were attempted.
        attempted: usize,
        /// Operations that failed or were not confirmed.
        failed: usize,
        /// The first failure, for the log line.
        first: Box<Error>,
    },
    /// An argument cannot be used (a URL that maps to no cache key, say).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
