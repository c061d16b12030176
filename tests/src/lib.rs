//! Harness for mcpage's end-to-end tests: a real memcached and a real nginx,
//! started by the tests on free loopback ports and stopped on drop (in the
//! style of redis-rs' test support).
//!
//! - [`Memcached`]: a `memcached` process, with raw text-protocol access
//!   ([`Memcached::get_raw`] asks exactly as nginx does).
//! - [`Nginx`]: nginx running [`mcpage::nginx::render_nginx_full`] in its own
//!   temp directory.
//! - [`App`]: an axum router served on a free port (nginx's `app`).
//! - [`get`] / [`request`] / [`request_target`]: a raw HTTP/1.1 client that
//!   sends the request target byte for byte, follows no redirect and adds no
//!   `Accept-Encoding`.
//! - [`wait_until`]: poll an eventual condition with a deadline.
//!
//! A missing `memcached` or `nginx` binary fails the test with the command
//! that installs it; nothing is skipped.
//!
//! Running as root (as CI does): nginx's workers then run as its built-in
//! user (`nobody`). Every directory [`Nginx`] uses is made `0755`, and nginx
//! creates its temp directories itself, owned by the worker user, so no
//! `user` line is rendered and the rendered config stays the one users run.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to run when a binary is missing.
pub const INSTALL_HINT: &str = "install them with `apt-get install -y memcached nginx` \
     (Debian's `nginx` package includes the memcached and gunzip modules)";

/// How long a process may take to become ready.
const START_DEADLINE: Duration = Duration::from_secs(15);
/// How long one HTTP exchange may take.
const HTTP_DEADLINE: Duration = Duration::from_secs(30);
/// How long one memcached exchange may take.
const MEMCACHED_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The interval of every polling loop.
const POLL: Duration = Duration::from_millis(5);

/// A free TCP port on 127.0.0.1 (bound once, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0")
}

/// `127.0.0.1:<free port>`, for `config.nginx.listen` and `config.nginx.app`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A fresh directory under the system temp dir, traversable by everyone.
fn unique_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "mcpage-{kind}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    // nginx workers started by root run as `nobody`: they must reach the temp paths.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    dir
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Send a signal by name to `pid` with the `kill` command (no unsafe code).
fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .arg("-s")
        .arg(name)
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn spawn_error(binary: &str, error: std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::NotFound {
        panic!("`{binary}` is not installed: {INSTALL_HINT}");
    }
    panic!("cannot start `{binary}`: {error}");
}

/// Wait for `child` to exit, killing it after `grace`.
fn reap(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(POLL),
        }
    }
}

// ---------------------------------------------------------------------------
// memcached
// ---------------------------------------------------------------------------

/// A `memcached` process on a free loopback port, killed on drop.
///
/// Runs `memcached -l 127.0.0.1 -p PORT -U 0 -m 64 -t 1` plus the extra
/// arguments (and `-u root` when the tests run as root).
pub struct Memcached {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    dir: PathBuf,
}

impl Memcached {
    /// Start with the default arguments.
    pub fn start() -> Memcached {
        Memcached::start_with(&[])
    }

    /// Start with extra arguments (`-I 2m`, `-M`, ...).
    pub fn start_with(args: &[&str]) -> Memcached {
        let mut memcached = Memcached {
            child: None,
            port: 0,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir: unique_dir("memcached"),
        };
        // Another process may take the free port before memcached binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            memcached.port = free_port();
            match memcached.spawn() {
                Ok(()) => return memcached,
                Err(e) => last_error = format!("{e:#}"),
            }
        }
        panic!("memcached did not start: {last_error}");
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.join("memcached.log");
        let log = std::fs::File::create(&log_path).context("create memcached.log")?;
        let mut command = Command::new("memcached");
        command
            .args([
                "-l",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "0",
                "-m",
                "64",
                "-t",
                "1",
            ])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log);
        if is_root() {
            command.args(["-u", "root"]);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| spawn_error("memcached", e));
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    bail!(
                        "memcached exited with {status} on port {}: {log}",
                        self.port
                    );
                }
            }
            if self.is_responsive(Duration::from_millis(200)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "memcached on port {} not ready after {START_DEADLINE:?}: {log}",
                    self.port
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:PORT`, as written in `memcached.servers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kill the process; the port then refuses connections.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Stop (when running) and start again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("memcached did not restart on port {}: {e:#}", self.port);
        }
    }

    /// SIGSTOP: connections are accepted by the kernel but never answered.
    pub fn pause(&self) {
        let pid = self.pid().expect("memcached is not running");
        assert!(signal(pid, "STOP"), "`kill -s STOP {pid}` failed");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        let pid = self.pid().expect("memcached is not running");
        assert!(signal(pid, "CONT"), "`kill -s CONT {pid}` failed");
    }

    /// Does `version` get an answer within `timeout` on a fresh connection?
    pub fn is_responsive(&self, timeout: Duration) -> bool {
        let exchange = || -> std::io::Result<bool> {
            let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.write_all(b"version\r\n")?;
            let mut line = Vec::new();
            BufReader::new(stream).read_until(b'\n', &mut line)?;
            Ok(line.starts_with(b"VERSION "))
        };
        exchange().unwrap_or(false)
    }

    fn connect(&self) -> anyhow::Result<BufReader<TcpStream>> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))
            .with_context(|| format!("connect to memcached at {}", self.address()))?;
        stream.set_read_timeout(Some(MEMCACHED_IO_TIMEOUT))?;
        stream.set_write_timeout(Some(MEMCACHED_IO_TIMEOUT))?;
        Ok(BufReader::new(stream))
    }

    /// Send one command and read lines until one equals `end` (or an error line).
    fn lines_until(&self, command: &[u8], end: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut conn = self.connect()?;
        conn.get_mut().write_all(command)?;
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            if conn.read_until(b'\n', &mut line)? == 0 {
                bail!("memcached closed the connection after {lines:?}");
            }
            let line = line.strip_suffix(b"\r\n").unwrap_or(&line).to_vec();
            if line == end {
                return Ok(lines);
            }
            if line == b"ERROR"
                || line.starts_with(b"CLIENT_ERROR")
                || line.starts_with(b"SERVER_ERROR")
            {
                bail!("memcached answered {}", String::from_utf8_lossy(&line));
            }
            lines.push(line);
        }
    }

    /// `stats`, raw: name → value.
    pub fn stats(&self) -> HashMap<String, String> {
        let lines = self
            .lines_until(b"stats\r\n", b"END")
            .expect("memcached stats");
        lines
            .iter()
            .filter_map(|line| {
                let line = String::from_utf8_lossy(line);
                let mut words = line.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("STAT"), Some(name), Some(value)) => {
                        Some((name.to_owned(), value.to_owned()))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// A classic text `get` on a fresh connection, exactly what nginx sends:
    /// `(flags, value)`, or `None` on a miss. `key` is the literal memcached key.
    pub fn get_raw(&self, key: &[u8]) -> Option<(u32, Vec<u8>)> {
        self.try_get_raw(key)
            .unwrap_or_else(|e| panic!("memcached get {}: {e:#}", String::from_utf8_lossy(key)))
    }

    fn try_get_raw(&self, key: &[u8]) -> anyhow::Result<Option<(u32, Vec<u8>)>> {
        let mut conn = self.connect()?;
        let mut command = b"get ".to_vec();
        command.extend_from_slice(key);
        command.extend_from_slice(b"\r\n");
        conn.get_mut().write_all(&command)?;
        let mut line = Vec::new();
        conn.read_until(b'\n', &mut line)?;
        if line == b"END\r\n" {
            return Ok(None);
        }
        let header = String::from_utf8_lossy(&line).into_owned();
        let words: Vec<&str> = header.trim_end().split(' ').collect();
        let (flags, len) = match words.as_slice() {
            ["VALUE", _key, flags, len, ..] => (flags.parse::<u32>()?, len.parse::<usize>()?),
            _ => bail!("unexpected answer {header:?}"),
        };
        let mut value = vec![0; len + 7];
        conn.read_exact(&mut value)?;
        if !value.ends_with(b"\r\nEND\r\n") {
            bail!("bad trailer after {len} bytes");
        }
        value.truncate(len);
        Ok(Some((flags, value)))
    }

    /// `set key flags 0 len` (no expiry); panics unless memcached says `STORED`.
    pub fn set_raw(&self, key: &[u8], flags: u32, value: &[u8]) {
        self.set_raw_ttl(key, flags, 0, value);
    }

    /// `set` with an exptime (seconds, 0 = never).
    pub fn set_raw_ttl(&self, key: &[u8], flags: u32, exptime: u32, value: &[u8]) {
        let mut command = b"set ".to_vec();
        command.extend_from_slice(key);
        command.extend_from_slice(format!(" {flags} {exptime} {}\r\n", value.len()).as_bytes());
        command.extend_from_slice(value);
        command.extend_from_slice(b"\r\n");
        let answer = self.one_line(&command);
        assert_eq!(
            answer,
            "STORED",
            "memcached set {}",
            String::from_utf8_lossy(key)
        );
    }

    /// `delete key`: whether something was deleted.
    pub fn delete_raw(&self, key: &[u8]) -> bool {
        let mut command = b"delete ".to_vec();
        command.extend_from_slice(key);
        command.extend_from_slice(b"\r\n");
        match self.one_line(&command).as_str() {
            "DELETED" => true,
            "NOT_FOUND" => false,
            other => panic!("memcached delete {}: {other}", String::from_utf8_lossy(key)),
        }
    }

    /// `flush_all`.
    pub fn flush_all(&self) {
        assert_eq!(self.one_line(b"flush_all\r\n"), "OK");
    }

    fn one_line(&self, command: &[u8]) -> String {
        let exchange = || -> anyhow::Result<String> {
            let mut conn = self.connect()?;
            conn.get_mut().write_all(command)?;
            let mut line = String::new();
            conn.read_line(&mut line)?;
            Ok(line.trim_end().to_owned())
        };
        exchange().unwrap_or_else(|e| panic!("memcached at {}: {e:#}", self.address()))
    }

    /// Every key memcached holds (`lru_crawler metadump hash`: the LRU walk of `all` skips items that move while it runs), decoded from
    /// the URL encoding metadump uses: the literal keys, as [`get_raw`](Self::get_raw) takes them.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // A crawl still running from a previous call answers BUSY: retry.
            match self.lines_until(b"lru_crawler metadump hash\r\n", b"END") {
                Ok(lines) if !lines.iter().any(|l| l.starts_with(b"BUSY")) => {
                    return lines
                        .iter()
                        .filter_map(|line| {
                            let key = line.strip_prefix(b"key=")?;
                            let end = key.iter().position(|b| *b == b' ').unwrap_or(key.len());
                            Some(percent_decode(&key[..end]))
                        })
                        .collect();
                }
                Ok(_) => {}
                Err(e) if Instant::now() >= deadline => panic!("memcached metadump: {e:#}"),
                Err(_) => {}
            }
            assert!(Instant::now() < deadline, "memcached metadump stayed BUSY");
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl fmt::Debug for Memcached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memcached")
            .field("address", &self.address())
            .field("pid", &self.pid())
            .finish()
    }
}

fn percent_decode(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' && i + 2 < text.len() {
            if let (Some(h), Some(l)) = (hex(text[i + 1]), hex(text[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// nginx running `render_nginx_full(config)` from its own temp directory,
/// stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
pub struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
    address: String,
}

impl Nginx {
    /// Render, start and wait until `config.nginx.listen` accepts connections.
    /// Panics with error.log when nginx does not come up. Point
    /// `config.nginx.listen`/`app` at [`free_addr`]s first.
    pub fn start(config: &mcpage::Config) -> Nginx {
        let dir = unique_dir("nginx");
        let conf = dir.join("nginx.conf");
        let text = mcpage::nginx::render_nginx_full(config, &dir);
        std::fs::write(&conf, &text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let output = std::fs::File::create(dir.join("stderr.log")).expect("create stderr.log");
        let mut prefix = dir.clone().into_os_string();
        prefix.push("/");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("dup stderr.log"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| spawn_error("nginx", e));
        let mut nginx = Nginx {
            child: Some(child),
            dir,
            address: connect_address(&config.nginx.listen),
        };
        nginx.wait_ready(&text);
        nginx
    }

    fn wait_ready(&mut self, config_text: &str) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "nginx exited ({status}) before listening on {}\n--- error.log:\n{}\n--- stderr:\n{}\n--- nginx.conf:\n{config_text}",
                    self.address,
                    self.error_log(),
                    self.read("stderr.log"),
                );
            }
            if TcpStream::connect(&self.address).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nginx not listening on {} after {START_DEADLINE:?}\n--- error.log:\n{}\n--- stderr:\n{}",
                    self.address,
                    self.error_log(),
                    self.read("stderr.log"),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `host:port` nginx listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `http://host:port` + `path` (`path` starts with `/`; sent unchanged).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// The prefix directory (nginx.conf, logs, temp paths).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The rendered nginx.conf this instance runs.
    pub fn config_text(&self) -> String {
        self.read("nginx.conf")
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        self.read("error.log")
    }

    /// The access log so far (format `mcpage`); lines appear when a response
    /// is finished, so poll with [`wait_until`].
    pub fn access_log(&self) -> String {
        self.read("access.log")
    }

    fn read(&self, name: &str) -> String {
        std::fs::read(self.dir.join(name))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
            if matches!(child.try_wait(), Ok(None)) {
                let _ = signal(child.id(), "TERM");
            }
            reap(&mut child, Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl fmt::Debug for Nginx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nginx")
            .field("address", &self.address)
            .field("dir", &self.dir)
            .finish()
    }
}

/// Where to connect for an nginx `listen` value (`8080`, `127.0.0.1:8080`, `[::1]:8080 reuseport`).
fn connect_address(listen: &str) -> String {
    let addr = listen.split_whitespace().next().unwrap_or(listen);
    if addr.contains(':') {
        addr.replace("*:", "127.0.0.1:")
            .replace("0.0.0.0:", "127.0.0.1:")
    } else {
        format!("127.0.0.1:{addr}")
    }
}

// ---------------------------------------------------------------------------
// the application behind nginx
// ---------------------------------------------------------------------------

/// An axum router served on a loopback port in a tokio task, stopped on drop.
#[derive(Debug)]
pub struct App {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Serve `router` on a free 127.0.0.1 port. Needs a tokio runtime.
    pub async fn serve(router: axum::Router) -> App {
        App::serve_on("127.0.0.1:0", router).await
    }

    /// Serve `router` on `address` (say a [`free_addr`] already in the config).
    pub async fn serve_on(address: &str, router: axum::Router) -> App {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .unwrap_or_else(|e| panic!("bind app on {address}: {e}"));
        let address = listener.local_addr().expect("app address");
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("app server failed: {e}");
            }
        });
        App { address, task }
    }

    /// `127.0.0.1:PORT`, for `config.nginx.app`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The response headers (repeated ones kept).
    pub headers: HeaderMap,
    /// The body, de-chunked but never decompressed.
    pub body: Bytes,
}

impl Response {
    /// The first value of a header, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET url` with extra headers; see [`request`].
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Response {
    request("GET", url, headers, b"").await
}

/// One HTTP/1.1 request on a fresh connection. `url` is `http://host:port`
/// followed by the request target, which is sent byte for byte (`/a//b`,
/// `/a/%2e%2e/c` stay as they are). `Host` defaults to the authority,
/// `Connection: close` is added, and `Content-Length` whenever there is a
/// body or the method is POST/PUT/PATCH. Nothing else is added (no
/// `Accept-Encoding`), and redirects are not followed. Panics on I/O errors.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    try_request(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e:#}"))
}

/// [`request`] returning errors instead of panicking.
pub async fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, target) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    request_target(method, authority, target.as_bytes(), headers, body).await
}

/// The request target as raw bytes (it may be anything, even invalid UTF-8):
/// `authority` is `host:port`, or `unix:/path` for a unix socket (then `Host`
/// defaults to `localhost`).
pub async fn request_target(
    method: &str,
    authority: &str,
    target: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = Vec::with_capacity(256 + target.len());
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let socket = authority.strip_prefix("unix:");
    if !has("host") {
        let host = if socket.is_some() {
            "localhost"
        } else {
            authority
        };
        head.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    }
    for (name, value) in headers {
        head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !has("connection") {
        head.extend_from_slice(b"Connection: close\r\n");
    }
    if !has("content-length")
        && !has("transfer-encoding")
        && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH"))
    {
        head.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);

    let exchange = async {
        if let Some(path) = socket {
            let mut stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("connect to {authority}"))?;
            stream.write_all(&head).await.context("send request")?;
            return read_response(&mut stream, method == "HEAD").await;
        }
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        stream.write_all(&head).await.context("send request")?;
        read_response(&mut stream, method == "HEAD").await
    };
    tokio::time::timeout(HTTP_DEADLINE, exchange)
        .await
        .with_context(|| format!("no complete response within {HTTP_DEADLINE:?}"))?
}

async fn read_response(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    head_request: bool,
) -> anyhow::Result<Response> {
    let mut buf = Vec::with_capacity(8192);
    let header_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!(
                "connection closed in the response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut rest = buf[header_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split(' ')
        .nth(1)
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let status =
        StatusCode::from_bytes(code.as_bytes()).with_context(|| format!("bad status {code:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header {line:?}"))?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_bytes(value.trim().as_bytes())?,
        );
    }

    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
        });
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .map(|v| -> anyhow::Result<usize> { Ok(v.to_str()?.trim().parse()?) })
        .transpose()?;

    let body = if no_body {
        Vec::new()
    } else if chunked {
        read_chunked(stream, rest).await?
    } else if let Some(length) = length {
        while rest.len() < length {
            if stream.read_buf(&mut rest).await? == 0 {
                bail!(
                    "connection closed after {} of {length} body bytes",
                    rest.len()
                );
            }
        }
        rest.truncate(length);
        rest
    } else {
        stream.read_to_end(&mut rest).await?;
        rest
    };
    Ok(Response {
        status,
        headers,
        body: Bytes::from(body),
    })
}

async fn read_chunked(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    mut buf: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        // chunk-size line
        let line_end = loop {
            if let Some(i) = find(&buf[pos..], b"\r\n") {
                break pos + i;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("connection closed in a chunk header");
            }
        };
        let size_text = String::from_utf8_lossy(&buf[pos..line_end]).into_owned();
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers (if any) end with an empty line; nothing here needs them.
            return Ok(body);
        }
        while buf.len() < pos + size + 2 {
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("connection closed in a chunk");
            }
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// polling
// ---------------------------------------------------------------------------

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

/// Gzip `data` (for values stored with the gzip flag).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"/caf%C3%A9"), b"/caf\xC3\xA9");
        assert_eq!(percent_decode(b"/100%25"), b"/100%");
        assert_eq!(percent_decode(b"/a%2"), b"/a%2");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
    }

    #[test]
    fn listen_to_connect_address() {
        assert_eq!(connect_address("8080"), "127.0.0.1:8080");
        assert_eq!(connect_address("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(connect_address("[::1]:8080 reuseport"), "[::1]:8080");
    }
}

/// A small deterministic generator for load and race tests, so a failing run
/// can be replayed from its seed.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A count from the environment (`MCPAGE_STRESS_ROUNDS=100000`), or `default`:
/// CI runs the short version, `scripts/stress` the long one.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory under the system temp dir, traversable by nginx
/// workers (which run as `nobody` when the tests run as root), removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory; `kind` goes into its name.
    pub fn new(kind: &str) -> TempDir {
        TempDir(unique_dir(kind))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `len` bytes of printable, incompressible text (it stays that size after
/// gzip), the same for the same seed.
pub fn random_text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    (0..len)
        .map(|_| b'!' + (rng.next_u64() % 94) as u8)
        .collect()
}
