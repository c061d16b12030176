//! `mcpage proxy` end to end: the real binary between a real nginx (rendered
//! from the same config) and a small Python backend, with two real memcached
//! servers. The backend counts its requests per path (`GET /__count?path=/x`,
//! asked directly, never through nginx) and tags its pages with `X-Cache-Tags`.
//!
//! Every wait polls with a deadline; nothing sleeps a fixed time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mcpage_tests::{Response, Stack, free_addr, free_port, get, request, temp_dir, wait_until};
use serde_json::{Value, json};
use tempfile::TempDir;

/// Longest wait for a process to come up or for a background write to land.
const DEADLINE: Duration = Duration::from_secs(15);
/// Polling interval.
const POLL: Duration = Duration::from_millis(5);
const TOKEN: &str = "s3cret-token-for-tests";

// ---------------------------------------------------------------------------
// processes
// ---------------------------------------------------------------------------

/// Send a signal by name with the `kill` command (no unsafe code).
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("run kill: {e}"));
    assert!(status.success(), "kill -s {name} {pid} failed");
}

/// Wait for `child` to exit within `deadline`; `None` when it did not.
fn wait_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

fn read(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The test backend: python3's http.server.
const BACKEND_PY: &str = r#"
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

COUNTS = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        sys.stderr.write("backend: " + (format % args) + "\n")

    def setup(self):
        super().setup()
        self.answered = 0  # responses on this connection

    def address_string(self):
        return str(self.client_address or "unix")

    def reply(self, status, body, content_type="text/html; charset=utf-8", headers=()):
        self.answered += 1
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def count(self, path):
        with LOCK:
            COUNTS[path] = COUNTS.get(path, 0) + 1
            return COUNTS[path]

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def dropped(self, path):
        """`/flaky/...` on a reused connection: close it without a response
        byte, as a backend does whose keep-alive timer fires as the request
        arrives."""
        if path.startswith("/flaky/") and self.answered > 0:
            self.count(path)
            self.close_connection = True
            return True
        return False

    def do_GET(self):
        url = urlsplit(self.path)
        path = url.path
        if self.dropped(path):
            return
        if path.startswith("/flaky/"):
            n = self.count(path)
            return self.reply(200, f"flaky {n}", "text/plain")
        if path == "/__count":
            wanted = parse_qs(url.query).get("path", [""])[0]
            with LOCK:
                n = COUNTS.get(wanted, 0)
            return self.reply(200, str(n), "text/plain")
        n = self.count(path)
        if path.startswith("/articles/"):
            article = path.rsplit("/", 1)[1]
            return self.reply(200, f"<h1>Article {article}</h1><p>render {n}</p>",
                              headers=[("X-Cache-Tags", f"comments, article:{article}")])
        if path == "/about":
            return self.reply(200, f"<h1>About</h1><p>render {n}</p>",
                              headers=[("X-Cache-Tags", "about")])
        if path == "/untagged":
            return self.reply(200, f"<h1>No tags</h1><p>render {n}</p>")
        if path == "/login":
            return self.reply(200, f"<h1>Welcome back</h1><p>render {n}</p>",
                              headers=[("Set-Cookie", "sessionid=abc123; Path=/; HttpOnly"),
                                       ("X-Cache-Tags", "login")])
        if path.startswith("/slow/"):
            time.sleep(int(path.rsplit("/", 1)[1]) / 1000)
            return self.reply(200, "slow done", "text/plain")
        if path.startswith("/echo"):
            headers = {}
            for name, value in self.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            return self.reply(200, json.dumps({"target": self.path, "headers": headers}),
                              "application/json",
                              headers=[("Connection", "X-Hop"), ("X-Hop", "1"),
                                       ("Keep-Alive", "timeout=5"), ("Proxy-Agent", "backend"),
                                       ("X-Kept", "yes")])
        return self.reply(404, "not found", "text/plain")

    do_HEAD = do_GET

    def do_POST(self):
        body = self.read_body()
        if self.dropped(urlsplit(self.path).path):
            return
        self.count(urlsplit(self.path).path)
        self.reply(200, f"POST {self.path}: {len(body)} bytes", "text/plain")


# backend.py PORT_FILE (PORT | unix:PATH) [IDLE_SECONDS]: with a socket, the
# pages are served there and the counts on a free TCP port; with IDLE_SECONDS,
# a connection idle that long is closed (like gunicorn's keep-alive timeout).
port_file, where = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    Handler.timeout = float(sys.argv[3])
port = 0
if where.startswith("unix:"):
    import socketserver

    class UnixServer(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

    unix = UnixServer(where[len("unix:"):], Handler)
    threading.Thread(target=unix.serve_forever, daemon=True).start()
else:
    port = int(where)
server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.replace(port_file + ".tmp", port_file)
server.serve_forever()
"#;

/// The Python backend on a loopback port or a unix socket, killed on drop.
struct Backend {
    child: Child,
    /// `127.0.0.1:PORT`: where `count` asks.
    address: String,
    /// What the proxy forwards to: `http://127.0.0.1:PORT` or `unix:/path`.
    upstream: String,
    log: PathBuf,
}

impl Backend {
    /// Start on `port` (0: any free port) and wait until it listens.
    fn start(dir: &Path, port: u16) -> Backend {
        Backend::start_on(dir, &port.to_string(), None)
    }

    /// Start on `where_` (a port, or `unix:/path`), closing connections idle
    /// for `idle_secs`; wait until it listens.
    fn start_on(dir: &Path, where_: &str, idle_secs: Option<f64>) -> Backend {
        let script = dir.join("backend.py");
        std::fs::write(&script, BACKEND_PY).expect("write backend.py");
        let name: String = where_
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let port_file = dir.join(format!("backend-{name}.port"));
        let log_path = dir.join(format!("backend-{name}.log"));
        let log = File::create(&log_path).expect("create backend log");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&port_file)
            .arg(where_)
            .args(idle_secs.map(|s| s.to_string()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!(
                        "`python3` is not installed: install it with `apt-get install -y python3`"
                    );
                }
                panic!("cannot start python3: {e}");
            });
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let port: u16 = text.trim().parse().expect("backend port");
                let address = format!("127.0.0.1:{port}");
                let upstream = if where_.starts_with("unix:") {
                    where_.to_owned()
                } else {
                    format!("http://{address}")
                };
                return Backend {
                    child,
                    address,
                    upstream,
                    log: log_path,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the python backend exited ({status}):\n{}", read(&log_path));
            }
            if start.elapsed() >= DEADLINE {
                let _ = child.kill();
                panic!("the python backend did not start:\n{}", read(&log_path));
            }
            std::thread::sleep(POLL);
        }
    }

    /// How many requests for `path` reached the backend.
    async fn count(&self, path: &str) -> u64 {
        let response = get(&format!("http://{}/__count?path={path}", self.address), &[]).await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.text().trim().parse().expect("a count")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mcpage --config FILE proxy ARGS`, the real binary; SIGTERM (then SIGKILL)
/// on drop. Ready once `/_mcpage/health` answers.
struct Proxy {
    child: Option<Child>,
    address: String,
    log: PathBuf,
}

impl Proxy {
    async fn start(
        config_file: &Path,
        address: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        let log = config_file.with_extension("log");
        let output = File::create(&log).expect("create proxy log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mcpage"));
        command
            .arg("--config")
            .arg(config_file)
            .arg("proxy")
            .args(args)
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("dup log"))
            .stderr(output)
            .env("RUST_LOG", "mcpage=info");
        // The test's own environment must not change the config under test.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MCPAGE_") {
                command.env_remove(name);
            }
        }
        command.envs(env.iter().copied());
        let child = command.spawn().expect("start mcpage proxy");
        let mut proxy = Proxy {
            child: Some(child),
            address: address.to_owned(),
            log,
        };
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = proxy.child.as_mut().map(Child::try_wait) {
                proxy.child = None;
                panic!("mcpage proxy exited ({status}):\n{}", proxy.log());
            }
            if let Ok(response) = proxy.try_request("GET", "/_mcpage/health", &[], b"").await {
                if response.status == 200 {
                    return proxy;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "mcpage proxy not ready on {address}:\n{}",
                proxy.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// A request to the proxy itself, on a TCP address or its unix socket.
    async fn try_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Response> {
        mcpage_tests::request_target(method, &self.address, target.as_bytes(), headers, body).await
    }

    async fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_request(method, target, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {target} to the proxy: {e:#}"))
    }

    fn log(&self) -> String {
        read(&self.log)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("proxy running")
    }

    /// Wait for the process to exit on its own (after a signal).
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("proxy running");
        match wait_exit(&mut child, DEADLINE) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                panic!("mcpage proxy did not exit:\n{}", self.log());
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-s", "TERM", &child.id().to_string()])
                    .status();
            }
            if wait_exit(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// the setup: memcached ×2, backend, proxy, nginx
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Setup<'a> {
    /// `proxy.invalidate_token` in the config file.
    token_in_file: Option<&'a str>,
    /// `MCPAGE_PROXY__INVALIDATE_TOKEN` in the proxy's environment.
    token_in_env: Option<&'a str>,
    /// Start no backend (its port stays free: connections are refused).
    no_backend: bool,
    /// Give `--listen` and `--upstream` as flags; the config file names other addresses.
    flags: bool,
    /// More arguments for `mcpage proxy`.
    args: &'a [&'a str],
    /// More environment variables for `mcpage proxy`.
    env: &'a [(&'a str, &'a str)],
    /// Unix sockets from nginx to the proxy and from the proxy to the backend.
    unix: bool,
    /// The backend closes connections idle this long (seconds).
    backend_idle_secs: Option<f64>,
}

// Fields drop in order: the proxy stops before what it talks to.
struct Env {
    proxy: Proxy,
    backend: Option<Backend>,
    /// Two page servers, and nginx in front of the proxy.
    stack: Stack,
    upstream_port: u16,
    dir: TempDir,
}

impl Env {
    async fn start(setup: Setup<'_>) -> Env {
        let dir = temp_dir("proxy");
        let socket = |name: &str| format!("unix:{}", dir.path().join(name).display());
        let backend_on = if setup.unix {
            socket("backend.sock")
        } else {
            "0".to_owned()
        };
        let backend = (!setup.no_backend)
            .then(|| Backend::start_on(dir.path(), &backend_on, setup.backend_idle_secs));
        let upstream_port = match &backend {
            Some(backend) => backend
                .address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok()),
            None => Some(free_port()),
        }
        .expect("upstream port");
        let upstream = match &backend {
            Some(backend) => backend.upstream.clone(),
            None if setup.unix => backend_on.clone(),
            None => format!("http://127.0.0.1:{upstream_port}"),
        };
        let listen = if setup.unix {
            socket("proxy.sock")
        } else {
            free_addr()
        };

        let stack = Stack::builder()
            .page_servers(2)
            .app_at(&listen)
            .config(|config| {
                config.proxy.invalidate_token = setup.token_in_file.map(str::to_owned);
                if setup.flags {
                    // The config file says otherwise; the flags win.
                    config.proxy.listen = free_addr();
                    config.proxy.upstream = "http://127.0.0.1:1".to_owned();
                } else {
                    config.proxy.listen = listen.clone();
                    config.proxy.upstream = upstream.clone();
                }
            })
            .start()
            .await;
        let mut args: Vec<&str> = Vec::new();
        if setup.flags {
            args.extend(["--listen", &listen, "--upstream", &upstream]);
        }
        args.extend(setup.args);
        let config_file = dir.path().join("mcpage.toml");
        std::fs::write(
            &config_file,
            toml::to_string(stack.config()).expect("config as TOML"),
        )
        .expect("write mcpage.toml");
        let env: Vec<(&str, &str)> = setup
            .token_in_env
            .map(|token| ("MCPAGE_PROXY__INVALIDATE_TOKEN", token))
            .into_iter()
            .chain(setup.env.iter().copied())
            .collect();
        let proxy = Proxy::start(&config_file, &listen, &args, &env).await;
        Env {
            proxy,
            backend,
            stack,
            upstream_port,
            dir,
        }
    }

    /// With untagged caching on: a page without `X-Cache-Tags` is cached; a
    /// backend slower than `timeout_ms` gets a 504 naming the limit.
    async fn untagged_is_cached_and_slow_backend_times_out(&self, timeout_ms: u64) {
        assert_cache(&self.page("/untagged").await, "MISS");
        self.wait_stored("/untagged").await;
        assert_cache(&self.page("/untagged").await, "HIT");
        assert!(self.proxy.log().contains("caching untagged pages too"));
        let slow = get(&self.proxy.url("/slow/3000"), &[]).await;
        assert_eq!(slow.status, 504, "{}", slow.text());
        assert_eq!(
            slow.text(),
            format!(
                "mcpage proxy: upstream http://127.0.0.1:{} did not answer within {timeout_ms} ms\n",
                self.upstream_port
            )
        );
    }

    fn backend(&self) -> &Backend {
        self.backend.as_ref().expect("a backend")
    }

    /// `GET path` through nginx, as a browser without cookies.
    async fn page(&self, path: &str) -> Response {
        let response = get(&self.stack.nginx().url(path), &[]).await;
        assert!(
            response.header("x-cache-tags").is_none(),
            "X-Cache-Tags reached the client: {response:?}"
        );
        response
    }

    /// Is the page for `path` in memcached (on either server)?
    fn stored(&self, path: &str) -> bool {
        self.stack
            .memcached()
            .iter()
            .any(|m| m.get_raw(path.as_bytes()).is_some())
    }

    async fn wait_stored(&self, path: &str) {
        wait_until(DEADLINE, &format!("{path} is in memcached"), || async {
            self.stored(path)
        })
        .await;
    }

    async fn count(&self, path: &str) -> u64 {
        self.backend().count(path).await
    }

    /// `POST /_mcpage/invalidate` to `base` (the proxy or nginx).
    async fn invalidate(&self, url: &str, token: Option<&str>, body: &Value) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        request("POST", url, &headers, body.to_string().as_bytes()).await
    }

    async fn metrics(&self) -> String {
        let response = self
            .proxy
            .request("GET", "/_mcpage/metrics", &[], b"")
            .await;
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        response.text()
    }
}

/// The value of the sample `name` (with labels, exactly as written).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample `{name}` in:\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("sample `{name}`: {e}"))
}

fn body_json(response: &Response) -> Value {
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{response:?}"
    );
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()))
}

#[track_caller]
fn assert_cache(response: &Response, expected: &str) {
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("x-cache"),
        Some(expected),
        "{:?}\n{}",
        response.headers,
        response.text()
    );
}

// ---------------------------------------------------------------------------
// the tests
// ---------------------------------------------------------------------------

/// Misses store, nginx serves hits, the tag/URL/prefix invalidation endpoint
/// removes exactly the right pages and refuses without the token; metrics count it.
#[tokio::test]
async fn pages_are_served_by_nginx_and_invalidated_over_http() {
    let env = Env::start(Setup {
        token_in_file: Some(TOKEN),
        ..Setup::default()
    })
    .await;
    let log = env.proxy.log();
    assert!(
        log.contains(&format!(
            "mcpage proxy listening on http://{}, upstream http://127.0.0.1:{}, memcached {}, {}",
            env.proxy.address,
            env.upstream_port,
            env.stack.memcached()[0].address(),
            env.stack.memcached()[1].address()
        )),
        "{log}"
    );

    let pages = ["/articles/1", "/articles/2", "/about"];
    for path in pages {
        let miss = env.page(path).await;
        assert_cache(&miss, "MISS");
        assert_eq!(
            miss.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(miss.text().contains("render 1"), "{}", miss.text());
        assert_eq!(env.count(path).await, 1);
        env.wait_stored(path).await;
        let hit = env.page(path).await;
        assert_cache(&hit, "HIT");
        assert_eq!(hit.body, miss.body);
        assert_eq!(
            env.count(path).await,
            1,
            "{path}: a hit reached the backend"
        );
    }

    // Refused without the right token: nothing removed.
    let comments = json!({"tags": ["comments"]});
    let proxy_invalidate = env.proxy.url("/_mcpage/invalidate");
    let refused = env.invalidate(&proxy_invalidate, None, &comments).await;
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    assert!(body_json(&refused)["error"].is_string());
    for wrong in ["wrong", "s3cret-token-for-test", "s3cret-token-for-tests2"] {
        let refused = env
            .invalidate(&proxy_invalidate, Some(wrong), &comments)
            .await;
        assert_eq!(refused.status, 401, "{wrong}: {}", refused.text());
    }
    let basic = request(
        "POST",
        &proxy_invalidate,
        &[("Authorization", &format!("Basic {TOKEN}"))],
        comments.to_string().as_bytes(),
    )
    .await;
    assert_eq!(basic.status, 401);
    for path in pages {
        assert!(env.stored(path), "{path} was removed without a token");
        assert_cache(&env.page(path).await, "HIT");
    }

    // Bad requests.
    let bad = request(
        "POST",
        &proxy_invalidate,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"{\"tags\": [",
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(
        body_json(&bad)["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad JSON"))
    );
    let typo = env
        .invalidate(
            &proxy_invalidate,
            Some(TOKEN),
            &json!({"tag": ["comments"]}),
        )
        .await;
    assert_eq!(typo.status, 400, "{}", typo.text());
    let no_key = env
        .invalidate(
            &proxy_invalidate,
            Some(TOKEN),
            &json!({"urls": ["/a/../../etc"]}),
        )
        .await;
    assert_eq!(no_key.status, 400, "{}", no_key.text());
    let get_it = get(&proxy_invalidate, &[]).await;
    assert_eq!(get_it.status, 405);
    assert_eq!(get_it.header("allow"), Some("POST"));
    assert!(pages.iter().all(|path| env.stored(path)));

    // The tag, sent to the proxy directly.
    let done = env
        .invalidate(&proxy_invalidate, Some(TOKEN), &comments)
        .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(
        body_json(&done),
        json!({"pages": 2, "tags": {"comments": 2}, "urls": {}, "prefix": {}})
    );
    assert!(!env.stored("/articles/1") && !env.stored("/articles/2"));
    assert!(env.stored("/about"));
    for path in ["/articles/1", "/articles/2"] {
        let miss = env.page(path).await;
        assert_cache(&miss, "MISS");
        assert!(miss.text().contains("render 2"), "{}", miss.text());
        assert_eq!(env.count(path).await, 2);
        env.wait_stored(path).await;
    }
    assert_cache(&env.page("/about").await, "HIT");
    assert_eq!(env.count("/about").await, 1);

    // A tag and a URL, through nginx from loopback; the token from the config file.
    let done = env
        .invalidate(
            &env.stack.nginx().url("/_mcpage/invalidate"),
            Some(TOKEN),
            &json!({"tags": ["article:1"], "urls": ["/about"]}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(
        body_json(&done),
        json!({"pages": 2, "tags": {"article:1": 1}, "urls": {"/about": 1}, "prefix": {}})
    );
    assert!(!env.stored("/articles/1") && !env.stored("/about"));
    assert!(env.stored("/articles/2"));

    // A prefix. It walks memcached's `lru_crawler metadump`, which can skip an
    // item that was just read (memcached moves it between LRU segments during
    // the crawl; see the report), so purge until the page is gone: the pages
    // removed over all calls must add up to exactly one.
    let mut removed = 0;
    let mut calls = 0;
    while env.stored("/articles/2") {
        calls += 1;
        assert!(calls <= 20, "purge_prefix never removed /articles/2");
        let done = env
            .invalidate(
                &proxy_invalidate,
                Some(TOKEN),
                &json!({"prefix": "/articles/"}),
            )
            .await;
        assert_eq!(done.status, 200, "{}", done.text());
        let done = body_json(&done);
        let pages = done["pages"].as_u64().expect("pages");
        assert_eq!(
            done,
            json!({"pages": pages, "tags": {}, "urls": {}, "prefix": {"/articles/": pages}})
        );
        removed += pages;
    }
    assert_eq!(removed, 1);

    let metrics = env.metrics().await;
    for line in [
        "# HELP mcpage_stores_total Pages stored in memcached.",
        "# TYPE mcpage_stores_total counter",
        "# TYPE mcpage_bypass_total counter",
        "# TYPE mcpage_breaker_open gauge",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    assert_eq!(metric(&metrics, "mcpage_stores_total"), 5, "{metrics}");
    assert_eq!(metric(&metrics, "mcpage_misses_total"), 5, "{metrics}");
    assert_eq!(
        metric(&metrics, "mcpage_pages_removed_total"),
        5,
        "{metrics}"
    );
    // One call per request (tags, URLs and a prefix together are one call).
    assert_eq!(
        metric(&metrics, "mcpage_invalidations_total"),
        2 + calls,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mcpage_invalidation_runs_total"),
        2 + calls,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mcpage_bypass_total{reason=\"session\"}"),
        0
    );
    for m in env.stack.memcached() {
        let server = m.address();
        assert_eq!(
            metric(
                &metrics,
                &format!("mcpage_breaker_open{{server=\"{server}\"}}")
            ),
            0
        );
        assert_eq!(
            metric(
                &metrics,
                &format!("mcpage_memcached_errors_total{{server=\"{server}\"}}")
            ),
            0
        );
    }
    let health = get(&env.proxy.url("/_mcpage/health"), &[]).await;
    assert_eq!(
        (health.status.as_u16(), health.text().as_str()),
        (200, "ok\n")
    );
    let unknown = get(&env.proxy.url("/_mcpage/nothing"), &[]).await;
    assert_eq!(unknown.status, 404);
}

/// POSTs reach the backend with their body; logged-in requests and pages that
/// set a cookie are never cached. With memcached gone, pages are still served
/// and invalidation says it failed.
#[tokio::test]
async fn posts_sessions_and_cookies_bypass_and_memcached_outages_fail_open() {
    let env = Env::start(Setup {
        token_in_env: Some(TOKEN),
        ..Setup::default()
    })
    .await;

    let post = request(
        "POST",
        &env.stack.nginx().url("/articles/1/comments"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"text=hello+world",
    )
    .await;
    assert_cache(&post, "BYPASS");
    assert_eq!(post.text(), "POST /articles/1/comments: 16 bytes");
    assert_eq!(env.count("/articles/1/comments").await, 1);

    // A session cookie: never cached, never answered from memcached.
    let session = [("Cookie", "theme=dark; sessionid=abc123")];
    for n in 1..=2 {
        let response = get(&env.stack.nginx().url("/articles/3"), &session).await;
        assert_cache(&response, "BYPASS");
        assert!(response.header("x-cache-tags").is_none());
        assert_eq!(env.count("/articles/3").await, n);
    }
    assert!(!env.stored("/articles/3"));
    // Cached for anonymous visitors, still rendered for the logged-in one.
    assert_cache(&env.page("/articles/3").await, "MISS");
    env.wait_stored("/articles/3").await;
    assert_cache(&env.page("/articles/3").await, "HIT");
    assert_eq!(env.count("/articles/3").await, 3);
    assert_cache(
        &get(&env.stack.nginx().url("/articles/3"), &session).await,
        "BYPASS",
    );
    assert_eq!(env.count("/articles/3").await, 4);

    // A page that sets a cookie is never stored.
    for n in 1..=2 {
        let login = env.page("/login").await;
        assert_cache(&login, "BYPASS");
        assert!(
            login
                .header("set-cookie")
                .is_some_and(|c| c.starts_with("sessionid="))
        );
        assert_eq!(env.count("/login").await, n);
    }
    assert!(!env.stored("/login"));

    // A page without X-Cache-Tags is not cached (the backend opts in by tagging).
    for n in 1..=2 {
        assert_cache(&env.page("/untagged").await, "BYPASS");
        assert_eq!(env.count("/untagged").await, n);
    }
    assert!(!env.stored("/untagged"));

    let metrics = env.metrics().await;
    assert_eq!(
        metric(&metrics, "mcpage_bypass_total{reason=\"session\"}"),
        3,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mcpage_bypass_total{reason=\"set_cookie\"}"),
        2,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mcpage_bypass_total{reason=\"method\"}"),
        1,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mcpage_bypass_total{reason=\"opt_out\"}"),
        2,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "mcpage_stores_total"), 1, "{metrics}");

    // The token came from MCPAGE_PROXY__INVALIDATE_TOKEN.
    let proxy_invalidate = env.proxy.url("/_mcpage/invalidate");
    let done = env
        .invalidate(
            &proxy_invalidate,
            Some(TOKEN),
            &json!({"tags": ["article:3"]}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(body_json(&done)["pages"], 1);

    // memcached goes away: pages are still served (not cached), invalidation fails loudly.
    assert_cache(&env.page("/about").await, "MISS");
    env.wait_stored("/about").await;
    for m in env.stack.memcached() {
        m.stop();
    }
    for n in 2..=8 {
        let response = env.page("/about").await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(
            response.text().contains(&format!("render {n}")),
            "{}",
            response.text()
        );
    }
    assert_eq!(env.count("/about").await, 8);
    let failed = env
        .invalidate(&proxy_invalidate, Some(TOKEN), &json!({"tags": ["about"]}))
        .await;
    // Not confirmed: pending (retried in the background), and said so.
    assert_eq!(failed.status, 202, "{}", failed.text());
    let error = body_json(&failed);
    assert_eq!(error["pending"], true, "{error}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("memcached")),
        "{error}"
    );
    assert_eq!(error["pending_total"], 1, "{error}");

    let health = get(&env.proxy.url("/_mcpage/health"), &[]).await;
    assert_eq!(health.status, 200);
    assert!(health.text().starts_with("ok\n"), "{}", health.text());
    assert!(
        health.text().contains("pending invalidations: 1"),
        "{}",
        health.text()
    );
    let metrics = env.metrics().await;
    assert_eq!(
        metric(&metrics, "mcpage_pending_invalidations"),
        1,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "mcpage_invalidation_errors_total") >= 1,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "mcpage_bypass_total{reason=\"unavailable\"}") >= 1,
        "{metrics}"
    );
    let errors: u64 = env
        .stack
        .memcached()
        .iter()
        .map(|m| {
            metric(
                &metrics,
                &format!(
                    "mcpage_memcached_errors_total{{server=\"{}\"}}",
                    m.address()
                ),
            )
        })
        .sum();
    assert!(errors >= 1, "{metrics}");
}

/// A backend that is down or slow gives a clear 502/504, the proxy stays up,
/// and recovers when the backend comes. Flags override the config; without a
/// token the invalidation endpoint does not exist; https is refused.
#[tokio::test]
async fn backend_down_gives_502_and_the_proxy_survives() {
    let mut env = Env::start(Setup {
        no_backend: true,
        flags: true,
        args: &["--upstream-timeout-ms", "500", "--cache-untagged"],
        ..Setup::default()
    })
    .await;
    let expected = format!(
        "mcpage proxy: upstream http://127.0.0.1:{} unreachable: connection refused\n",
        env.upstream_port
    );
    for url in [
        env.stack.nginx().url("/articles/1"),
        env.proxy.url("/articles/1"),
    ] {
        let response = get(&url, &[]).await;
        assert_eq!(response.status, 502, "{url}");
        assert_eq!(response.text(), expected, "{url}");
    }
    let post = request("POST", &env.proxy.url("/comments"), &[], b"x").await;
    assert_eq!((post.status.as_u16(), post.text()), (502, expected.clone()));
    assert_eq!(
        get(&env.proxy.url("/_mcpage/health"), &[]).await.status,
        200
    );
    assert_eq!(
        metric(&env.metrics().await, "mcpage_proxy_upstream_errors_total"),
        3
    );
    // No token configured: the endpoint does not exist.
    let none = env
        .invalidate(
            &env.proxy.url("/_mcpage/invalidate"),
            Some(TOKEN),
            &json!({"tags": ["x"]}),
        )
        .await;
    assert_eq!(none.status, 404, "{}", none.text());

    // The backend comes up on that port: the same proxy serves it.
    env.backend = Some(Backend::start(env.dir.path(), env.upstream_port));
    let miss = env.page("/articles/1").await;
    assert_cache(&miss, "MISS");
    env.wait_stored("/articles/1").await;
    assert_cache(&env.page("/articles/1").await, "HIT");
    // --cache-untagged and --upstream-timeout-ms.
    env.untagged_is_cached_and_slow_backend_times_out(500).await;
    assert_eq!(
        get(&env.proxy.url("/_mcpage/health"), &[]).await.status,
        200
    );

    // https is a configuration error, before anything listens.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcpage"))
        .arg("--config")
        .arg(env.dir.path().join("mcpage.toml"))
        .args([
            "proxy",
            "--listen",
            &free_addr(),
            "--upstream",
            "https://127.0.0.1:8443",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(env.dir.path().join("https.log")).expect("create log"))
        .spawn()
        .expect("start mcpage proxy");
    let status = wait_exit(&mut child, DEADLINE).expect("exits");
    let stderr = read(&env.dir.path().join("https.log"));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid config `--upstream`") && stderr.contains("https"),
        "{stderr}"
    );
}

/// `proxy.upstream_timeout_ms` and `proxy.cache_untagged` come from the
/// configuration (here its environment variables) when no flag is given.
#[tokio::test]
async fn upstream_timeout_and_untagged_caching_come_from_the_config() {
    let env = Env::start(Setup {
        env: &[
            ("MCPAGE_PROXY__UPSTREAM_TIMEOUT_MS", "400"),
            ("MCPAGE_PROXY__CACHE_UNTAGGED", "true"),
        ],
        ..Setup::default()
    })
    .await;
    env.untagged_is_cached_and_slow_backend_times_out(400).await;
}

/// The request reaches the backend as sent: raw target, Host, forwarded
/// headers (peer appended), bodies streamed; hop-by-hop headers dropped both
/// ways; odd targets answered, never a crash; SIGTERM lets requests finish.
#[tokio::test]
async fn requests_are_forwarded_faithfully_and_shutdown_is_graceful() {
    let mut env = Env::start(Setup::default()).await;

    let target = "/echo/a//b/%2e%2e/c%2Fd?x=1&y=%20&z";
    let response = get(
        &env.proxy.url(target),
        &[
            ("Host", "example.org"),
            ("Connection", "keep-alive, X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "example.org"),
            ("Cookie", "theme=dark"),
        ],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let echo: Value = serde_json::from_slice(&response.body).expect("echo JSON");
    assert_eq!(echo["target"], target);
    let headers = &echo["headers"];
    assert_eq!(headers["host"], json!(["example.org"]));
    assert_eq!(
        headers["x-forwarded-for"],
        json!(["203.0.113.9, 127.0.0.1"])
    );
    assert_eq!(headers["x-forwarded-proto"], json!(["https"]));
    assert_eq!(headers["x-forwarded-host"], json!(["example.org"]));
    assert_eq!(headers["cookie"], json!(["theme=dark"]));
    for gone in ["x-drop-me", "keep-alive", "proxy-authorization", "te"] {
        assert!(headers.get(gone).is_none(), "{gone} forwarded: {headers}");
    }
    // The backend's hop-by-hop headers stop at the proxy too.
    assert_eq!(response.header("x-kept"), Some("yes"));
    for gone in ["x-hop", "keep-alive", "proxy-agent"] {
        assert!(
            response.header(gone).is_none(),
            "{gone}: {:?}",
            response.headers
        );
    }
    assert_eq!(response.header("x-cache"), Some("BYPASS"));

    // Through nginx: nginx's forwarded headers arrive, with nginx's address appended.
    let response = get(&env.stack.nginx().url("/echo/nginx"), &[]).await;
    let echo: Value = serde_json::from_slice(&response.body).expect("echo JSON");
    assert_eq!(
        echo["headers"]["x-forwarded-for"],
        json!(["127.0.0.1, 127.0.0.1"])
    );
    assert_eq!(echo["headers"]["x-forwarded-proto"], json!(["http"]));
    // A cacheable request carries the Host nginx chose: the site's first
    // name with nginx's own port, never the client's spelling.
    let port = env
        .stack
        .nginx()
        .address()
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned())
        .expect("nginx port");
    assert_eq!(
        echo["headers"]["host"],
        json!([format!("localhost:{port}")])
    );

    // Bodies stream both ways: chunked in, and a large one with a length.
    let chunked = request(
        "POST",
        &env.proxy.url("/upload"),
        &[("Transfer-Encoding", "chunked")],
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(chunked.text(), "POST /upload: 11 bytes");
    let big = vec![b'x'; 3 * 1024 * 1024];
    let large = request("POST", &env.proxy.url("/upload"), &[], &big).await;
    assert_eq!(large.text(), format!("POST /upload: {} bytes", big.len()));

    // Odd request targets are answered, and the proxy carries on.
    let authority = env.proxy.address.clone();
    for (method, target) in [
        ("OPTIONS", &b"*"[..]),
        ("GET", b"http://example.org/echo/absolute"),
        ("GET", b"/_mcpage/../about"),
        ("CONNECT", b"example.org:443"),
        ("GET", b"/a b"),
        ("GET", b"/\xff\x00"),
    ] {
        let response = mcpage_tests::request_target(method, &authority, target, &[], b"").await;
        if let Ok(response) = response {
            assert!(
                response.status.is_client_error() || response.status.is_success(),
                "{method} {}: {response:?}",
                String::from_utf8_lossy(target)
            );
        }
    }
    assert_eq!(
        get(&env.proxy.url("/_mcpage/health"), &[]).await.status,
        200
    );

    // SIGTERM while a request is in flight: it completes, then the process exits 0.
    let slow_url = env.proxy.url("/slow/400");
    let in_flight = tokio::spawn(async move { get(&slow_url, &[]).await });
    wait_until(DEADLINE, "the slow request reached the backend", || async {
        env.count("/slow/400").await == 1
    })
    .await;
    signal(env.proxy.pid(), "TERM");
    let slow = in_flight.await.expect("the slow request");
    assert_eq!(
        (slow.status.as_u16(), slow.text().as_str()),
        (200, "slow done")
    );
    let status = env.proxy.wait_exit();
    let log = env.proxy.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("mcpage proxy stopped"), "{log}");
    assert!(
        std::net::TcpStream::connect(&env.proxy.address).is_err(),
        "still accepting after shutdown"
    );
}

/// nginx reaches the proxy over a unix socket and the proxy reaches the
/// backend over another: pages are cached and served by nginx, POSTs and the
/// admin endpoints work, nothing is appended to `X-Forwarded-For`, a backend
/// gone is a 502 that names the socket, and the socket file is removed on
/// exit (and a stale one replaced on start).
#[tokio::test]
async fn unix_sockets_from_nginx_through_the_proxy_to_the_backend() {
    let mut env = Env::start(Setup {
        unix: true,
        token_in_env: Some(TOKEN),
        ..Setup::default()
    })
    .await;
    let proxy_socket = env.dir.path().join("proxy.sock");
    let backend_socket = env.dir.path().join("backend.sock");
    let log = env.proxy.log();
    assert!(
        log.contains(&format!(
            "mcpage proxy listening on unix:{}, upstream unix:{},",
            proxy_socket.display(),
            backend_socket.display()
        )),
        "{log}"
    );
    assert!(
        env.stack
            .nginx()
            .config_text()
            .contains(&format!("server unix:{};", proxy_socket.display())),
        "{}",
        env.stack.nginx().config_text()
    );

    for path in ["/articles/1", "/about"] {
        assert_cache(&env.page(path).await, "MISS");
        env.wait_stored(path).await;
        assert_cache(&env.page(path).await, "HIT");
        assert_eq!(env.count(path).await, 1, "{path}");
    }
    let post = request(
        "POST",
        &env.stack.nginx().url("/articles/1/comments"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"text=hello+world",
    )
    .await;
    assert_eq!(post.text(), "POST /articles/1/comments: 16 bytes");
    // A peer on a unix socket has no address: nginx's value arrives unchanged.
    let echo = env.page("/echo/unix").await;
    let echo: Value = serde_json::from_slice(&echo.body).expect("echo JSON");
    assert_eq!(echo["headers"]["x-forwarded-for"], json!(["127.0.0.1"]));

    // The admin endpoints on the proxy's socket.
    let auth = format!("Bearer {TOKEN}");
    let done = env
        .proxy
        .request(
            "POST",
            "/_mcpage/invalidate",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            json!({"tags": ["article:1"]}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(body_json(&done)["pages"], 1);
    assert_cache(&env.page("/articles/1").await, "MISS");
    assert_cache(&env.page("/about").await, "HIT");

    // The backend gone: its socket refuses, then does not exist.
    env.backend = None;
    let unreachable = format!(
        "mcpage proxy: upstream unix:{} unreachable: ",
        backend_socket.display()
    );
    let refused = env.proxy.request("GET", "/untagged", &[], b"").await;
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert_eq!(refused.text(), format!("{unreachable}connection refused\n"));
    std::fs::remove_file(&backend_socket).expect("remove the backend's socket");
    let missing = get(&env.stack.nginx().url("/untagged"), &[]).await;
    assert_eq!(missing.status, 502, "{}", missing.text());
    assert!(
        missing.text().starts_with(&unreachable) && missing.text().contains("No such file"),
        "{}",
        missing.text()
    );

    // SIGTERM removes the socket file.
    signal(env.proxy.pid(), "TERM");
    assert!(env.proxy.wait_exit().success(), "{}", env.proxy.log());
    assert!(!proxy_socket.exists(), "the socket file is left behind");
    // A socket file whose process is gone is replaced; a live one is refused.
    drop(std::os::unix::net::UnixListener::bind(&proxy_socket).expect("a stale socket"));
    assert!(proxy_socket.exists());
    let config_file = env.dir.path().join("mcpage.toml");
    let address = format!("unix:{}", proxy_socket.display());
    let again = Proxy::start(&config_file, &address, &[], &[]).await;
    let mut second = Command::new(env!("CARGO_BIN_EXE_mcpage"))
        .arg("--config")
        .arg(&config_file)
        .arg("proxy")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(env.dir.path().join("second.log")).expect("create log"))
        .spawn()
        .expect("start a second proxy");
    let status = wait_exit(&mut second, DEADLINE).expect("the second proxy exits");
    let stderr = read(&env.dir.path().join("second.log"));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("another process is listening there"),
        "{stderr}"
    );
    let health = again.request("GET", "/_mcpage/health", &[], b"").await;
    assert_eq!(health.status, 200);
}

/// An idempotent request (GET, HEAD) that went out on a pooled connection the
/// backend closed without answering is sent once more on a fresh connection;
/// a POST is not (its 502 says why). The backend here drops every request on
/// a reused connection; whether the pool reuses one is up to timing, so each
/// case polls until it happened, and every answer on the way must be right.
#[tokio::test]
async fn a_request_the_backend_dropped_on_a_pooled_connection_is_retried_if_idempotent() {
    let env = Env::start(Setup::default()).await;
    let retries = || async { metric(&env.metrics().await, "mcpage_proxy_upstream_retries_total") };
    for method in ["GET", "HEAD"] {
        let before = retries().await;
        wait_until(DEADLINE, &format!("a {method} sent again"), || async {
            let response = env.proxy.request(method, "/flaky/page", &[], b"").await;
            assert_eq!(response.status, 200, "{method}: {}", response.text());
            assert_eq!(response.body.is_empty(), method == "HEAD");
            retries().await > before
        })
        .await;
    }
    let before = retries().await;
    wait_until(DEADLINE, "a POST dropped on a pooled connection", || async {
        let response = env.proxy.request("POST", "/flaky/form", &[], b"x=1").await;
        match response.status.as_u16() {
            200 => false,
            502 => {
                assert_eq!(
                    response.text(),
                    format!(
                        "mcpage proxy: upstream http://127.0.0.1:{} failed: connection closed before message completed\n",
                        env.upstream_port
                    )
                );
                true
            }
            other => panic!("POST: {other} {}", response.text()),
        }
    })
    .await;
    assert_eq!(retries().await, before, "a POST was sent twice");
    assert_eq!(
        metric(&env.metrics().await, "mcpage_proxy_upstream_errors_total"),
        1
    );
}

/// A backend that closes idle keep-alive connections after 1 s (gunicorn's
/// default is 2 s) and requests spaced about that far apart: the proxy drops
/// idle connections first (`proxy.upstream_idle_timeout_ms`, 1000 by default)
/// and sends a GET again when the race is lost anyway. No request may fail.
#[tokio::test]
async fn a_backend_closing_idle_connections_after_one_second_gives_no_errors() {
    let env = Env::start(Setup {
        backend_idle_secs: Some(1.0),
        ..Setup::default()
    })
    .await;
    // The spacing is the scenario, not a synchronization: every answer is
    // checked, whatever the timing.
    let spacings_ms = [1000, 990, 1010, 1000, 995, 1005, 1000, 985, 1015, 1000];
    for (i, spacing) in spacings_ms.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(spacing)).await;
        // Two at once: more than one pooled connection ages together.
        let (a, b) = tokio::join!(
            env.proxy.request("GET", "/untagged", &[], b""),
            env.proxy.request("GET", "/about", &[], b"")
        );
        for response in [a, b] {
            assert_eq!(response.status, 200, "request {i}: {}", response.text());
        }
    }
    let metrics = env.metrics().await;
    let closed_idle = read(&env.backend().log)
        .matches("Request timed out")
        .count();
    println!(
        "idle-closing backend: {} requests spaced ~1 s, 0 errors; {} sent again, {closed_idle} connections closed idle by the backend",
        2 * spacings_ms.len(),
        metric(&metrics, "mcpage_proxy_upstream_retries_total")
    );
    assert_eq!(
        metric(&metrics, "mcpage_proxy_upstream_errors_total"),
        0,
        "{metrics}"
    );
}

/// A purge client written for Varnish xkey (FOSHttpCache and kin) works
/// unchanged: `PURGEKEYS` with `xkey-softpurge`, `PURGE <url>`, sent to nginx
/// exactly as those clients send them to Varnish.
#[tokio::test]
async fn varnish_xkey_purge_requests_work_unchanged() {
    let env = Env::start(Setup {
        token_in_file: Some(TOKEN),
        ..Setup::default()
    })
    .await;
    for path in ["/articles/1", "/articles/2", "/about"] {
        assert_cache(&env.page(path).await, "MISS");
        env.wait_stored(path).await;
    }
    let nginx = env.stack.nginx();
    let auth = format!("Bearer {TOKEN}");

    let refused = request(
        "PURGEKEYS",
        &nginx.url("/"),
        &[("xkey-softpurge", "article:1 about")],
        b"",
    )
    .await;
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(env.stored("/articles/1"), "refused, yet removed");

    let purged = request(
        "PURGEKEYS",
        &nginx.url("/"),
        &[
            ("xkey-softpurge", "article:1 about"),
            ("Authorization", &auth),
        ],
        b"",
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(body_json(&purged)["pages"], 2, "{}", purged.text());
    assert!(!env.stored("/articles/1") && !env.stored("/about"));
    assert!(env.stored("/articles/2"), "an untouched tag's page stays");

    let purged = request(
        "PURGE",
        &nginx.url("/articles/2"),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert!(!env.stored("/articles/2"), "PURGE <url> removes that page");
    assert_cache(&env.page("/articles/2").await, "MISS");
}
