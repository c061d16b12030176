//! Harness for mcpage's end-to-end tests: a real memcached and a real nginx,
//! started by the tests on free loopback ports and stopped on drop (in the
//! style of redis-rs' test support).
//!
//! - [`Memcached`]: a `memcached` process, with raw text-protocol access
//!   ([`Memcached::get_raw`] asks exactly as nginx does).
//! - [`Nginx`]: nginx running [`mcpage::nginx::render_nginx_full`] in its own
//!   temp directory.
//! - [`App`]: an axum router served on a free port (nginx's `app`), by the
//!   [`Stack`] builder.
//! - [`get`] / [`request`] / [`request_target`]: a raw HTTP/1.1 client that
//!   sends the request target byte for byte, follows no redirect and adds no
//!   `Accept-Encoding`.
//! - [`wait_until`]: poll an eventual condition with a deadline.
//! - [`Stack`]: all of it wired together by one builder: memcached page
//!   servers (and an index server), the mcpage `Cache` on them, the app
//!   behind nginx, or only memcached and the cache.
//!
//! A missing `memcached` or `nginx` binary fails the test with the command
//! that installs it; nothing is skipped.
//!
//! Running as root (as CI does): nginx's workers then run as its built-in
//! user (`nobody`). Every directory [`Nginx`] uses is made `0755`, and nginx
//! creates its temp directories itself, owned by the worker user, so no
//! `user` line is rendered and the rendered config stays the one users run.

mod app;
mod data;
mod http;
mod memcached;
mod nginx;
mod process;
mod stack;
mod wait;

pub use app::App;
pub use data::{env_count, gzip, random_text};
pub use http::{Response, get, request, request_target, try_request};
pub use memcached::Memcached;
pub use nginx::Nginx;
pub use process::{INSTALL_HINT, free_addr, free_port, temp_dir};
pub use stack::{Stack, StackBuilder};
pub use wait::wait_until;
