//! One builder for every end-to-end setup: memcached page servers (and an
//! index server), the mcpage [`Cache`] on them, the app, and nginx in front.

use axum::Router;
use mcpage::ServerSpec;
use mcpage::{Cache, Config};

use crate::app::App;
use crate::http::{Response, get};
use crate::memcached::Memcached;
use crate::nginx::Nginx;
use crate::process::free_addr;

/// A change to the config, from [`StackBuilder::config`].
type ConfigChange<'a> = Box<dyn FnOnce(&mut Config) + 'a>;

/// What nginx sends misses to.
enum AppSpec<'a> {
    /// An axum router built on the stack's cache, served in process.
    Router(Box<dyn FnOnce(&Cache) -> Router + 'a>),
    /// An app the test runs itself (a process) at this address.
    At(String),
}

/// How to start a [`Stack`]; from [`Stack::builder`].
///
/// ```no_run
/// # async fn example(router: axum::Router) {
/// let stack = mcpage_tests::Stack::builder()
///     .page_servers(2)
///     .index_server(&["-M"])
///     .config(|c| c.memcached.timeout_ms = 500)
///     .app(|cache| router.layer(mcpage::PageCacheLayer::new(cache.clone())))
///     .start()
///     .await;
/// # }
/// ```
#[must_use = "a builder does nothing until `start`"]
pub struct StackBuilder<'a> {
    page_servers: usize,
    memcached_args: Vec<String>,
    index_args: Option<Vec<String>>,
    unix_sockets: bool,
    changes: Vec<ConfigChange<'a>>,
    app: Option<AppSpec<'a>>,
}

impl<'a> StackBuilder<'a> {
    /// How many memcached page servers (`memcached.servers`); 1 by default.
    pub fn page_servers(mut self, count: usize) -> Self {
        self.page_servers = count;
        self
    }

    /// Extra arguments for every page server (`-m 256`, `-I 1m`, ...).
    pub fn memcached_args(mut self, args: &[&str]) -> Self {
        self.memcached_args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Every memcached (pages and index) on a unix socket, named `unix:/path`
    /// in the config, for nginx and the cache alike.
    pub fn unix_sockets(mut self) -> Self {
        self.unix_sockets = true;
        self
    }

    /// A separate memcached for the tag index (`memcached.index_servers`),
    /// started with `args` (`-M`, as recommended for production, or none).
    pub fn index_server(mut self, args: &[&str]) -> Self {
        self.index_args = Some(args.iter().map(|a| (*a).to_owned()).collect());
        self
    }

    /// Change the config once the servers (and nginx's `listen` and `app`)
    /// are in it, before the cache connects and nginx renders it. Changes
    /// apply in the order given.
    pub fn config(mut self, change: impl FnOnce(&mut Config) + 'a) -> Self {
        self.changes.push(Box::new(change));
        self
    }

    /// Serve the router `app` builds on the stack's cache behind nginx. The
    /// router is served as it is: add [`mcpage::PageCacheLayer`] to cache it.
    pub fn app(mut self, app: impl FnOnce(&Cache) -> Router + 'a) -> Self {
        self.app = Some(AppSpec::Router(Box::new(app)));
        self
    }

    /// Point nginx at an app the test runs itself on `address`. nginx starts
    /// before that app has to listen.
    pub fn app_at(mut self, address: &str) -> Self {
        self.app = Some(AppSpec::At(address.to_owned()));
        self
    }

    /// Start memcached, connect the cache and, with an app, serve it and
    /// start nginx on a free port. Without an app: memcached and the cache only.
    /// Panics when something does not come up, or the config is invalid.
    pub async fn start(self) -> Stack {
        let args: Vec<&str> = self.memcached_args.iter().map(String::as_str).collect();
        let start = |args: &[&str]| {
            if self.unix_sockets {
                Memcached::start_unix(args)
            } else {
                Memcached::start_with(args)
            }
        };
        let memcached: Vec<Memcached> = (0..self.page_servers).map(|_| start(&args)).collect();
        let index = self.index_args.map(|args| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            start(&args)
        });
        let mut config = Config::default();
        config.memcached.servers = memcached
            .iter()
            .map(|m| ServerSpec::new(m.address()))
            .collect();
        config.memcached.index_servers =
            index.iter().map(|m| ServerSpec::new(m.address())).collect();
        let with_nginx = self.app.is_some();
        if with_nginx {
            config.nginx.listen = free_addr();
        }
        // The app's port is taken now, so the config the cache sees is final.
        let in_process = match self.app {
            Some(AppSpec::Router(build)) => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the app on 127.0.0.1:0");
                config.nginx.app = listener.local_addr().expect("app address").to_string();
                Some((build, listener))
            }
            Some(AppSpec::At(address)) => {
                config.nginx.app = address;
                None
            }
            None => None,
        };
        for change in self.changes {
            change(&mut config);
        }
        config.validate().expect("valid test config");
        let cache = Cache::connect(&config).await.expect("cache");
        let app = in_process.map(|(build, listener)| App::serve(listener, build(&cache)));
        let nginx = with_nginx.then(|| Nginx::start(&config));
        Stack {
            nginx,
            app,
            cache,
            config,
            memcached,
            index,
        }
    }
}

/// memcached page servers (and an index server), the [`Cache`] on them, and,
/// when there is an app, the app and nginx in front of it: all stopped on drop,
/// nginx and the app first.
pub struct Stack {
    nginx: Option<Nginx>,
    app: Option<App>,
    cache: Cache,
    config: Config,
    memcached: Vec<Memcached>,
    index: Option<Memcached>,
}

impl Stack {
    /// One page server, no index server, the default config, no app and no
    /// nginx, until the builder says otherwise.
    pub fn builder<'a>() -> StackBuilder<'a> {
        StackBuilder {
            page_servers: 1,
            memcached_args: Vec::new(),
            index_args: None,
            unix_sockets: false,
            changes: Vec::new(),
            app: None,
        }
    }

    /// The page servers, in `memcached.servers` order (each can be stopped,
    /// paused or restarted through a shared reference).
    pub fn memcached(&self) -> &[Memcached] {
        &self.memcached
    }

    /// The index server; panics without [`StackBuilder::index_server`].
    pub fn index(&self) -> &Memcached {
        self.index
            .as_ref()
            .expect("no index server: call `.index_server(..)`")
    }

    /// The cache (the one the app's layer was given).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The config the cache and nginx run, with the servers' addresses.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// nginx; panics for a stack without an app.
    pub fn nginx(&self) -> &Nginx {
        self.nginx
            .as_ref()
            .expect("no nginx without an app: call `.app(..)` or `.app_at(..)`")
    }

    /// The in-process app; panics unless it came from [`StackBuilder::app`].
    pub fn app(&self) -> &App {
        self.app
            .as_ref()
            .expect("no in-process app: call `.app(..)`")
    }

    /// `GET target` through nginx with extra headers (see [`get`]).
    pub async fn fetch(&self, target: &str, headers: &[(&str, &str)]) -> Response {
        get(&self.nginx().url(target), headers).await
    }

    /// Is the page for `target` in memcached, on any page server? (The key
    /// the cache computes; panics when `target` is not cacheable.)
    pub fn stored(&self, target: &str) -> bool {
        let key = self
            .cache
            .page_key(None, target.as_bytes())
            .expect("cacheable target")
            .escaped;
        self.memcached.iter().any(|m| m.get_raw(&key).is_some())
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("memcached", &self.memcached)
            .field("index", &self.index)
            .field("nginx", &self.nginx)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}
