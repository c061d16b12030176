//! `POST /_mcpage/invalidate` when memcached does not confirm, and in bursts:
//! the real `mcpage proxy` binary with real memcached servers (pages on their
//! own servers, the tag index on another). Pages are stored through the
//! library's write path by the test itself; no backend or nginx is needed to
//! invalidate.
//!
//! - A page server paused with SIGSTOP: the call answers `202` (pending); after
//!   SIGCONT the proxy's own retries remove every page, no call repeated.
//! - A page server that stays down: the work stays pending and is shown by
//!   `/_mcpage/metrics`, `/_mcpage/health` and `mcpage stats` (the journal).
//! - A proxy killed (SIGKILL) with work pending finishes it after a restart.
//! - A burst: 200 concurrent calls for a tag with many pages (2,000 in CI;
//!   `MCPAGE_BURST_PAGES`, 20,000 in `scripts/stress`): every call succeeds or
//!   is told to retry, memcached receives deletes within 3x the pages, and the
//!   proxy's peak resident memory is printed and bounded.
//! - More callers than `invalidation.max_waiting`: refused at once with `429`
//!   and `Retry-After`.
//!
//! Every wait polls with a deadline; nothing sleeps a fixed time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mcpage::{Cache, Config, ServerSpec};
use mcpage_tests::{Memcached, Response, env_count, free_addr, request, temp_dir, wait_until};
use serde_json::{Value, json};

const TOKEN: &str = "token-for-invalidation-tests";
/// Longest wait for the proxy to come up, a retry to land, a process to exit.
const DEADLINE: Duration = Duration::from_secs(30);
const TAG: &str = "bulk";

/// The `mcpage proxy` binary on its config file; SIGTERM, then SIGKILL, on drop.
struct Proxy {
    child: Option<Child>,
    address: String,
    log: PathBuf,
}

impl Proxy {
    async fn start(config: &Path, address: &str) -> Proxy {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = config.with_extension(format!("{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
        let output = File::create(&log).expect("create the proxy log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mcpage"));
        command
            .arg("--config")
            .arg(config)
            .arg("proxy")
            .env("RUST_LOG", "mcpage=info")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("dup the log"))
            .stderr(output);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MCPAGE_") {
                command.env_remove(name);
            }
        }
        let mut proxy = Proxy {
            child: Some(command.spawn().expect("start mcpage proxy")),
            address: address.to_owned(),
            log,
        };
        let started = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = proxy.child.as_mut().map(Child::try_wait) {
                proxy.child = None;
                panic!("mcpage proxy exited ({status}):\n{}", proxy.log());
            }
            let health = format!("http://{address}/_mcpage/health");
            if mcpage_tests::try_request("GET", &health, &[], b"")
                .await
                .is_ok_and(|r| r.status == 200)
            {
                return proxy;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "proxy not ready:\n{}",
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the proxy runs")
    }

    /// SIGKILL: no shutdown, no last journal write.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Peak resident memory (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    async fn invalidate(&self, body: &Value) -> Response {
        let auth = format!("Bearer {TOKEN}");
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", auth.as_str()),
        ];
        let url = format!("http://{}/_mcpage/invalidate", self.address);
        request("POST", &url, &headers, body.to_string().as_bytes()).await
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/_mcpage/metrics", self.address);
        let response = request("GET", &url, &[], b"").await;
        assert_eq!(response.status, 200);
        response.text()
    }

    /// A sample of `/_mcpage/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample `{name}` in:\n{text}"))
    }

    async fn health(&self) -> String {
        let url = format!("http://{}/_mcpage/health", self.address);
        request("GET", &url, &[], b"").await.text()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &child.id().to_string()])
                .status();
            let started = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && started.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Page servers, an index server, and a config file for a proxy on them.
struct Setup {
    pages: Vec<Memcached>,
    index: Memcached,
    config: Config,
    config_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(page_servers: usize, change: impl FnOnce(&mut Config)) -> Setup {
        let dir = temp_dir("invalidation");
        let pages: Vec<Memcached> = (0..page_servers).map(|_| Memcached::start()).collect();
        let index = Memcached::start_with(&["-M"]);
        let mut config = Config::default();
        config.memcached.servers = pages.iter().map(|m| ServerSpec::new(m.address())).collect();
        config.memcached.index_servers = vec![ServerSpec::new(index.address())];
        // A paused server costs each attempt this long.
        config.memcached.timeout_ms = 300;
        config.proxy.listen = free_addr();
        config.proxy.upstream = format!("http://{}", free_addr());
        config.proxy.invalidate_token = Some(TOKEN.to_owned());
        config.proxy.journal = Some(dir.path().join("proxy.journal").display().to_string());
        config.invalidation.retry_min_ms = 50;
        config.invalidation.retry_max_ms = 400;
        change(&mut config);
        let config_file = dir.path().join("mcpage.toml");
        std::fs::write(&config_file, toml::to_string(&config).expect("TOML"))
            .expect("write config");
        Setup {
            pages,
            index,
            config,
            config_file,
            dir,
        }
    }

    async fn proxy(&self) -> Proxy {
        Proxy::start(&self.config_file, &self.config.proxy.listen).await
    }

    /// Store `count` pages `/p/N` under `TAG` through the library's write
    /// path (patiently: nothing invalidates meanwhile).
    async fn seed(&self, count: usize) {
        let mut config = self.config.clone();
        config.memcached.timeout_ms = 5_000;
        config.invalidation.write_window_ms = 5_000;
        let cache = Arc::new(Cache::connect(&config).await.expect("cache"));
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..32 {
            let cache = Arc::clone(&cache);
            tasks.spawn(async move {
                for page in (worker..count).step_by(32) {
                    cache
                        .store_page(&format!("/p/{page}"), format!("page {page}"), [TAG])
                        .await
                        .expect("store a page");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("seeding task");
        }
    }

    /// Pages `/p/N` still in memcached (on any page server).
    fn left(&self, count: usize) -> usize {
        (0..count)
            .filter(|page| {
                let key = format!("/p/{page}");
                self.pages
                    .iter()
                    .any(|m| m.get_raw(key.as_bytes()).is_some())
            })
            .count()
    }

    /// Pages `/p/N` on page server `server`.
    fn on(&self, server: usize, count: usize) -> usize {
        (0..count)
            .filter(|page| {
                self.pages[server]
                    .get_raw(format!("/p/{page}").as_bytes())
                    .is_some()
            })
            .count()
    }

    /// `mcpage stats --json`, run on the same config.
    fn stats_json(&self) -> Value {
        let output = Command::new(env!("CARGO_BIN_EXE_mcpage"))
            .arg("--config")
            .arg(&self.config_file)
            .args(["stats", "--json"])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "off")
            .output()
            .expect("run mcpage stats");
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "mcpage stats --json ({e}):\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }
}

fn body(response: &Response) -> Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()))
}

async fn wait_for_metric(proxy: &Proxy, name: &str, what: &str, wanted: impl Fn(f64) -> bool) {
    wait_until(DEADLINE, what, || async {
        wanted(proxy.metric(name).await)
    })
    .await;
}

async fn wait_for_nothing_pending(proxy: &Proxy) {
    let what = "no invalidation pending";
    wait_for_metric(proxy, "mcpage_pending_invalidations", what, |v| v == 0.0).await;
}

const PAGES: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_leaves_the_invalidation_pending_until_the_proxy_confirms_it() {
    let setup = Setup::new(3, |_| {});
    setup.seed(PAGES).await;
    let paused = (0..3)
        .max_by_key(|&s| setup.on(s, PAGES))
        .expect("three servers");
    let on_paused = setup.on(paused, PAGES);
    assert!(on_paused > 0, "some pages live on the server to pause");
    let proxy = setup.proxy().await;

    setup.pages[paused].pause();
    let answer = proxy.invalidate(&json!({"tags": [TAG]})).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    let pending = body(&answer);
    assert_eq!(pending["pending"], true, "{pending}");
    assert_eq!(pending["journaled"], true, "{pending}");
    assert_eq!(proxy.metric("mcpage_pending_invalidations").await, 1.0);
    assert!(proxy.health().await.contains("pending invalidations: 1"));
    setup.pages[paused].resume();

    // Nobody calls again: the proxy's retries finish the work.
    wait_for_nothing_pending(&proxy).await;
    let left = setup.left(PAGES);
    let retries = proxy.metric("mcpage_invalidation_retries_total").await;
    println!(
        "pending: {PAGES} tagged pages on 3 servers, {on_paused} on the one paused with SIGSTOP; \
         the invalidation answered 202 (pending), after SIGCONT {retries} background retries, \
         stale pages left: {left}"
    );
    assert_eq!(left, 0, "stale pages after the retry");
    assert_eq!(
        proxy
            .metric("mcpage_oldest_pending_invalidation_seconds")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stays_down_keeps_the_work_pending_and_visible() {
    let setup = Setup::new(2, |_| {});
    setup.seed(PAGES).await;
    let proxy = setup.proxy().await;
    setup.pages[1].stop();
    let answer = proxy.invalidate(&json!({"tags": [TAG]})).await;
    assert_eq!(answer.status, 202, "{}", answer.text());

    // Several retries later, still pending, and said so everywhere.
    wait_for_metric(
        &proxy,
        "mcpage_invalidation_retries_total",
        "three retries",
        |v| v >= 3.0,
    )
    .await;
    assert_eq!(proxy.metric("mcpage_pending_invalidations").await, 1.0);
    assert!(
        proxy
            .metric("mcpage_oldest_pending_invalidation_seconds")
            .await
            > 0.0
    );
    let health = proxy.health().await;
    assert!(health.contains("pending invalidations: 1"), "{health}");
    assert!(health.contains(&setup.pages[1].address()), "{health}");
    let stats = setup.stats_json();
    assert_eq!(stats["pending"]["count"], 1, "{stats}");
    assert!(
        stats["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("pending")))),
        "{stats}"
    );
    assert_eq!(
        setup.on(0, PAGES),
        0,
        "the reachable server's pages are gone"
    );
    println!(
        "down: a page server stopped; after {} retries the invalidation is still pending \
         (metrics, health, `mcpage stats` from the journal: 1 pending)",
        proxy.metric("mcpage_invalidation_retries_total").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_with_work_pending_finishes_it_after_a_restart() {
    let setup = Setup::new(2, |_| {});
    setup.seed(PAGES).await;
    let mut proxy = setup.proxy().await;
    // The index server (which holds the clocks) paused: no retry can succeed
    // before the kill.
    setup.index.pause();
    let answer = proxy
        .invalidate(&json!({"tags": [TAG], "urls": ["/p/0"]}))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    proxy.kill();
    setup.index.resume();
    let journal = std::fs::read_to_string(setup.dir.path().join("proxy.journal")).expect("journal");
    assert!(
        journal.contains(TAG) && journal.contains("/p/0"),
        "{journal}"
    );
    assert_eq!(
        setup.left(PAGES),
        PAGES,
        "nothing was removed before the kill"
    );

    let proxy = setup.proxy().await;
    wait_for_nothing_pending(&proxy).await;
    let left = setup.left(PAGES);
    println!(
        "restart: proxy killed (SIGKILL) with 2 invalidations pending; after the restart the \
         journal's work ran, pages left: {left}"
    );
    assert_eq!(left, 0);
    wait_until(DEADLINE, "the journal is empty", || async {
        setup.stats_json()["pending"]["count"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_invalidations_is_combined_and_bounded() {
    let pages = usize::try_from(env_count("MCPAGE_BURST_PAGES", 2_000)).unwrap_or(usize::MAX);
    let calls = usize::try_from(env_count("MCPAGE_BURST_CALLS", 200)).unwrap_or(usize::MAX);
    let setup = Setup::new(1, |c| c.memcached.timeout_ms = 2_000);
    let seeding = Instant::now();
    setup.seed(pages).await;
    let seeding = seeding.elapsed();
    let proxy = Arc::new(setup.proxy().await);
    let deletes = |m: &Memcached| {
        let stats = m.stats();
        let n = |k: &str| {
            stats
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        n("delete_hits") + n("delete_misses")
    };
    let before = deletes(&setup.pages[0]);

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let proxy = Arc::clone(&proxy);
        tasks.spawn(async move {
            let started = Instant::now();
            let answer = proxy.invalidate(&json!({"tags": [TAG]})).await;
            (answer, started.elapsed())
        });
    }
    let (mut ok, mut retry, mut latencies) = (0, 0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (answer, latency) = done.expect("caller task");
        latencies.push(latency);
        match answer.status.as_u16() {
            200 => ok += 1,
            429 | 503 => {
                assert!(answer.header("retry-after").is_some(), "{answer:?}");
                retry += 1;
            }
            other => panic!("answered {other}: {}", answer.text()),
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let deleted = deletes(&setup.pages[0]) - before;
    let runs = proxy.metric("mcpage_invalidation_runs_total").await;
    let rss_mib = proxy.peak_rss_kib() as f64 / 1024.0;
    let left = setup.left(pages);
    println!(
        "burst: {calls} concurrent POST /_mcpage/invalidate of a tag with {pages} pages (seeded in \
         {seeding:?}): {ok} answered 200, {retry} told to retry, in {elapsed:?} (call p50 {:?}, max \
         {:?}); {runs} combined runs; memcached received {deleted} page deletes ({:.2}x the pages); \
         proxy peak RSS {rss_mib:.1} MiB; pages left {left}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        deleted as f64 / pages as f64,
    );
    assert_eq!(ok + retry, calls);
    assert!(ok > 0);
    assert_eq!(left, 0);
    assert!(
        deleted <= 3 * pages as u64,
        "{deleted} deletes for {pages} pages"
    );
    assert!(rss_mib < 100.0, "proxy peak RSS {rss_mib:.1} MiB");
}

/// `invalidation.max_waiting = 1` and the index server paused, so a run cannot
/// finish: one run in flight holds one caller, one caller may wait for the
/// next run, and the third of three concurrent calls is refused at once with
/// `429` and `Retry-After` (whatever order they arrive in). After SIGCONT the
/// others complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_beyond_max_waiting_are_told_to_retry() {
    let setup = Setup::new(1, |c| {
        c.invalidation.max_waiting = 1;
        c.memcached.timeout_ms = 10_000;
    });
    setup.seed(3).await;
    let proxy = Arc::new(setup.proxy().await);
    setup.index.pause();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let proxy = Arc::clone(&proxy);
        calls.spawn(async move { proxy.invalidate(&json!({"tags": [TAG]})).await });
    }
    // Only a refusal can answer while the index server is paused.
    let first = calls
        .join_next()
        .await
        .expect("a call")
        .expect("caller task");
    assert_eq!(first.status, 429, "{}", first.text());
    assert!(first.header("retry-after").is_some(), "{first:?}");
    setup.index.resume();
    let mut statuses = vec![first.status.as_u16()];
    while let Some(done) = calls.join_next().await {
        statuses.push(done.expect("caller task").status.as_u16());
    }
    statuses.sort_unstable();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(setup.left(3), 0);
    println!(
        "refused: max_waiting = 1, 3 concurrent calls while a run waits on a paused index server: \
         answers {statuses:?} (429 with Retry-After at once; the rest after SIGCONT)"
    );
}
