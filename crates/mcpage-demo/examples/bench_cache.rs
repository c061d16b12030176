//! The Rust half of `scripts/bench`: what wrk cannot measure from outside.
//!
//! ```text
//! bench_cache serve --config FILE --db PATH --with-layer ADDR --without-layer ADDR
//! bench_cache cache --config FILE [--pages 10000] [--concurrency 100] [--rounds 5]
//! ```
//!
//! `serve` runs the demo twice in one process on one database: `app(demo)`
//! (behind `PageCacheLayer`) on `--with-layer` and `routes(demo)` (no layer) on
//! `--without-layer`, so wrk can compare the two on bypassed (logged-in)
//! requests. It prints `ready` once both listen and stops on SIGTERM or Ctrl-C.
//!
//! `cache` works against the memcached servers of `--config`, which must be
//! throwaway instances (it stores and removes pages) with a separate
//! `index_servers` pool (it counts the page servers' items):
//! - invalidation: stores `--pages` pages under one tag with
//!   `Cache::store_page` (the layer's write path), then times
//!   `invalidate_tags` for that tag and checks that every page was removed;
//! - read-your-writes costs: 1,000 pages stored one after another through
//!   the write path (time per write; it makes 5 round trips, the clock
//!   pre-check being the fifth), and 100 invalidations of a one-page tag one
//!   after another (latency; every invalidation waits 2W,
//!   `invalidation.write_window_ms`, before it deletes);
//! - single-flight: `--rounds` times, `--concurrency` GETs of one uncached
//!   article go through the demo behind the layer at once; a counter between
//!   the layer and the routes counts the renders. First in process, where a
//!   render waits until every request has entered the layer (so all are
//!   concurrent misses), then over HTTP, nothing held (`--concurrency`
//!   loopback clients connect, then all send at once).
//!
//! Results are printed as `name key=value ...` lines for the script to parse.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use clap::{Parser, Subcommand};
use mcpage::{Cache, Config, PageCacheLayer};
use mcpage_demo::Demo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Benchmarks of the demo and the cache that wrk cannot do from outside.
#[derive(Debug, Parser)]
#[command(name = "bench_cache")]
struct Cli {
    /// mcpage config (memcached servers of throwaway instances).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve `app(demo)` and `routes(demo)` on two ports until SIGTERM.
    Serve {
        /// SQLite database (created and seeded when missing).
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Address of the demo behind `PageCacheLayer`.
        #[arg(long, value_name = "ADDR")]
        with_layer: SocketAddr,
        /// Address of the demo without the layer.
        #[arg(long, value_name = "ADDR")]
        without_layer: SocketAddr,
    },
    /// Time the invalidation of a big tag and count renders of concurrent misses.
    Cache {
        /// Pages stored under the one tag that is then invalidated.
        #[arg(long, default_value_t = 10_000)]
        pages: usize,
        /// Concurrent requests for one uncached URL.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        /// Single-flight rounds, each on another article.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench_cache: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench_cache: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(Some(&cli.config))?;
    let cache = Cache::connect(&config).await?;
    match cli.command {
        Command::Serve {
            db,
            with_layer,
            without_layer,
        } => serve(cache, db, with_layer, without_layer).await,
        Command::Cache {
            pages,
            concurrency,
            rounds,
        } => {
            invalidation(&cache, pages).await?;
            read_your_writes_costs(&cache).await?;
            single_flight(&cache, concurrency, rounds).await
        }
    }
}

async fn open_demo(db: PathBuf, cache: Cache) -> anyhow::Result<Demo> {
    tokio::task::spawn_blocking(move || Demo::open(&db, cache))
        .await
        .context("open the demo")?
}

async fn serve(
    cache: Cache,
    db: PathBuf,
    with_layer: SocketAddr,
    without_layer: SocketAddr,
) -> anyhow::Result<()> {
    let demo = open_demo(db, cache.clone()).await?;
    let layered = TcpListener::bind(with_layer)
        .await
        .with_context(|| format!("listen on {with_layer}"))?;
    let bare = TcpListener::bind(without_layer)
        .await
        .with_context(|| format!("listen on {without_layer}"))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        // An error means the sender is gone: stop as well.
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut servers = JoinSet::new();
    servers.spawn(
        axum::serve(layered, mcpage_demo::app(demo.clone()))
            .with_graceful_shutdown(until_stopped(stopped.clone()))
            .into_future(),
    );
    servers.spawn(
        axum::serve(bare, mcpage_demo::routes(demo))
            .with_graceful_shutdown(until_stopped(stopped))
            .into_future(),
    );
    println!("ready with_layer=http://{with_layer} without_layer=http://{without_layer}");
    shutdown_signal().await;
    let _ = stop.send(true);
    while let Some(result) = servers.join_next().await {
        result.context("server task")?.context("serve")?;
    }
    cache.wait_for_writes().await;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                eprintln!("bench_cache: cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Items memcached holds on the page servers (`curr_items`, summed).
async fn page_items(cache: &Cache) -> anyhow::Result<u64> {
    let pages: Vec<String> = cache
        .config()
        .memcached
        .servers
        .iter()
        .map(|s| s.address.clone())
        .collect();
    let mut total = 0;
    for report in cache.memcached_stats().await {
        let (server, stats) = (report.server, report.result);
        if !pages
            .iter()
            .any(|p| server.split_whitespace().next() == Some(p.as_str()))
        {
            continue;
        }
        let stats = stats.with_context(|| format!("stats of {server}"))?;
        total += stats
            .get("curr_items")
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{server} reports no curr_items"))?;
    }
    Ok(total)
}

/// Store one page through the write path. A store the write window gave up
/// on (`Error::WriteWindow`: the machine was too busy to send it in time, so
/// it was not kept) is tried again, as the next request would.
async fn store(cache: &Cache, url: &str, body: &[u8], tag: &str) -> anyhow::Result<()> {
    let mut attempts = 0;
    loop {
        match cache.store_page(url, body.to_vec(), [tag]).await {
            Err(mcpage::Error::WriteWindow { .. }) if attempts < 10 => attempts += 1,
            other => return other.map(drop).with_context(|| format!("store {url}")),
        }
    }
}

/// Three times: store `pages` pages under one tag, then time
/// `invalidate_tags` of that tag. Prints the median round (`ms`) and all of
/// them (`rounds_ms`): one invalidation is one sample of a noisy machine.
async fn invalidation(cache: &Cache, pages: usize) -> anyhow::Result<()> {
    const TAG: &str = "bench:invalidate";
    /// Pages stored at once.
    const WRITERS: usize = 32;
    const ROUNDS: usize = 3;
    ensure!(pages > 0, "--pages must be at least 1");
    let invalidator = cache.invalidator();
    // Leftovers of an earlier run against the same servers.
    invalidator.invalidate_tags([TAG]).await?;
    let before = page_items(cache).await?;

    // About the size of a small article page; the size does not change the
    // number of round trips an invalidation makes.
    let body = bytes_of(2048);
    // (time to invalidate, pages removed, pages left, time to store)
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut writers = JoinSet::new();
        for _ in 0..WRITERS.min(pages) {
            let (cache, body, next) = (cache.clone(), body.clone(), Arc::clone(&next));
            writers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pages {
                        return anyhow::Ok(());
                    }
                    let url = format!("/bench/invalidate/{i:05}");
                    store(&cache, &url, &body, TAG).await?;
                }
            });
        }
        while let Some(result) = writers.join_next().await {
            result.context("writer task")??;
        }
        let stored_in = started.elapsed();
        let stored = page_items(cache).await?.saturating_sub(before);
        ensure!(
            stored == pages as u64,
            "{stored} of {pages} pages are in memcached after storing (evictions? give memcached more -m)"
        );

        let started = Instant::now();
        let removed = invalidator.invalidate_tags([TAG]).await?;
        let took = started.elapsed();
        let left = page_items(cache).await?.saturating_sub(before);
        rounds.push((took, removed.pages, left, stored_in));
    }
    let all: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.1}", millis(r.0)))
        .collect();
    // The round with the median time; a round that left pages is reported
    // whatever its time (the script fails the run on it).
    rounds.sort_by_key(|r| r.0);
    let worst_left = rounds.iter().map(|r| r.2).max().unwrap_or(0);
    let (took, removed, _, stored_in) = rounds[ROUNDS / 2];
    println!(
        "invalidate pages={pages} removed={removed} left={worst_left} ms={:.1} rounds_ms={} pages_per_s={:.0} store_s={:.2} stores_per_s={:.0}",
        millis(took),
        all.join(","),
        per_second(removed, took),
        stored_in.as_secs_f64(),
        per_second(pages, stored_in),
    );
    Ok(())
}

/// What read-your-writes costs: the write path's time per page (sequential,
/// so round trips add up) and an invalidation's latency.
async fn read_your_writes_costs(cache: &Cache) -> anyhow::Result<()> {
    const WRITES: usize = 1_000;
    const INVALIDATIONS: usize = 100;
    const TAG: &str = "bench:rw";
    let body = bytes_of(2048);
    let started = Instant::now();
    for i in 0..WRITES {
        let url = format!("/bench/rw/{i:04}");
        store(cache, &url, &body, TAG).await?;
    }
    let write = started.elapsed() / u32::try_from(WRITES).unwrap_or(u32::MAX);
    let invalidator = cache.invalidator();
    invalidator.invalidate_tags([TAG]).await?;
    let mut latencies = Vec::with_capacity(INVALIDATIONS);
    for _ in 0..INVALIDATIONS {
        cache
            .store_page("/bench/rw/one", body.clone(), [TAG])
            .await?;
        let started = Instant::now();
        let removed = invalidator.invalidate_tags([TAG]).await?;
        latencies.push(started.elapsed());
        ensure!(removed.pages == 1, "the one page was not removed");
    }
    latencies.sort();
    let window = cache.config().invalidation.write_window_ms;
    println!(
        "rw_costs write_us={:.0} write_round_trips=5 window_ms={window} settle_ms={} inv_p50_ms={:.1} inv_p99_ms={:.1}",
        write.as_secs_f64() * 1e6,
        2 * window + 1,
        millis(latencies[INVALIDATIONS / 2]),
        millis(latencies[INVALIDATIONS * 99 / 100]),
    );
    Ok(())
}

/// `len` bytes of HTML-ish text.
fn bytes_of(len: usize) -> Vec<u8> {
    b"<p>mcpage bench page</p>\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn per_second(count: usize, duration: Duration) -> f64 {
    count as f64 / duration.as_secs_f64().max(1e-9)
}

/// What the single-flight runs count.
#[derive(Debug, Default)]
struct Counters {
    /// Requests that entered the layer.
    entered: AtomicUsize,
    /// Requests that reached the demo's routes (renders).
    renders: AtomicUsize,
    /// While set, a render waits (at most a second) until this many requests
    /// have entered the layer, so that they are all concurrent misses.
    hold_until: AtomicUsize,
}

/// Outside the layer: counts the requests entering it.
async fn count_entered(
    State(counters): State<Arc<Counters>>,
    request: Request,
    next: Next,
) -> Response {
    counters.entered.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

/// Inside the layer: counts the renders (holding them while asked to).
async fn count_renders(
    State(counters): State<Arc<Counters>>,
    request: Request,
    next: Next,
) -> Response {
    counters.renders.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(1);
    while counters.entered.load(Ordering::SeqCst) < counters.hold_until.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        tokio::task::yield_now().await;
    }
    next.run(request).await
}

/// `concurrency` concurrent GETs of one uncached article through the layer,
/// `rounds` times on other articles: first in process with every request
/// inside the layer before the render starts, then over HTTP as they come.
async fn single_flight(cache: &Cache, concurrency: usize, rounds: usize) -> anyhow::Result<()> {
    ensure!(
        concurrency > 0 && rounds > 0,
        "--concurrency and --rounds must be at least 1"
    );
    let demo = open_demo(PathBuf::from(":memory:"), cache.clone()).await?;
    let counters = Arc::new(Counters::default());
    // As `mcpage_demo::app`, with counters around and inside the layer.
    let app = mcpage_demo::routes(demo.clone())
        .layer(middleware::from_fn_with_state(
            Arc::clone(&counters),
            count_renders,
        ))
        .layer(PageCacheLayer::new(cache.clone()))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&counters),
            count_entered,
        ));
    let mut articles = demo
        .page_urls()
        .await?
        .into_iter()
        .filter(|url| url.starts_with("/articles/"))
        .rev();
    let round = |counters: &Counters, hold: usize| {
        counters.entered.store(0, Ordering::SeqCst);
        counters.hold_until.store(hold, Ordering::SeqCst);
        counters.renders.load(Ordering::SeqCst)
    };

    // In process: the first render waits until all requests are in the layer
    // (without that, entering 100 requests takes about as long as a render).
    let mut report = Report::default();
    for url in articles.by_ref().take(rounds) {
        cache.invalidator().invalidate_urls([url.as_str()]).await?;
        let before = round(&counters, concurrency);
        let started = Instant::now();
        let requests = (0..concurrency).map(|_| {
            let request = Request::get(url.as_str())
                .body(Body::empty())
                .context("request");
            let app = app.clone();
            async move { anyhow::Ok(answer(app.oneshot(request?).await?).await) }
        });
        let answers = futures_util::future::join_all(requests)
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        report.round(
            &url,
            &answers,
            counters.renders.load(Ordering::SeqCst) - before,
            started.elapsed(),
        )?;
    }
    report.print("single_flight_in_process", concurrency, rounds);

    // Over HTTP, nothing held: the clients connect first, then all send at
    // once; the server reads and parses them one after the other, so a
    // request that arrives after the render ended starts another.
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("listen on loopback")?;
    let address = listener.local_addr().context("local address")?;
    let server = tokio::spawn(axum::serve(listener, app).into_future());
    let mut report = Report::default();
    for url in articles.take(rounds) {
        cache.invalidator().invalidate_urls([url.as_str()]).await?;
        let before = round(&counters, 0);
        let started = Instant::now();
        let answers = concurrent_gets(address, &url, concurrency).await?;
        report.round(
            &url,
            &answers,
            counters.renders.load(Ordering::SeqCst) - before,
            started.elapsed(),
        )?;
    }
    server.abort();
    report.print("single_flight_http", concurrency, rounds);
    cache.wait_for_writes().await;
    Ok(())
}

/// Renders per round of concurrent misses.
#[derive(Default)]
struct Report {
    renders: Vec<usize>,
    worst: Duration,
}

impl Report {
    /// Check that every answer was a 200 `MISS` with the same body, and count.
    fn round(
        &mut self,
        url: &str,
        answers: &[(String, Bytes)],
        renders: usize,
        took: Duration,
    ) -> anyhow::Result<()> {
        let misses = answers.iter().filter(|(x, _)| x.as_str() == "MISS").count();
        ensure!(
            misses == answers.len(),
            "{url}: {misses} of {} answers were 200 with X-Cache: MISS",
            answers.len()
        );
        if let Some(pair) = answers.windows(2).find(|pair| pair[0].1 != pair[1].1) {
            let (a, b) = (&pair[0].1, &pair[1].1);
            let at = a.iter().zip(b.iter()).take_while(|(x, y)| x == y).count();
            let around = |body: &Bytes| {
                String::from_utf8_lossy(&body[at.saturating_sub(40)..(at + 40).min(body.len())])
                    .into_owned()
            };
            bail!(
                "{url}: two answers differ ({} and {} bytes) from byte {at}: {:?} vs {:?}",
                a.len(),
                b.len(),
                around(a),
                around(b)
            );
        }
        self.renders.push(renders);
        self.worst = self.worst.max(took);
        Ok(())
    }

    fn print(&self, name: &str, concurrency: usize, rounds: usize) {
        let list: Vec<String> = self.renders.iter().map(ToString::to_string).collect();
        println!(
            "{name} requests={concurrency} rounds={rounds} renders={} max_renders={} worst_ms={:.1}",
            list.join(","),
            self.renders.iter().max().copied().unwrap_or_default(),
            millis(self.worst),
        );
    }
}

/// The `X-Cache` header of a 200 response (`status <code>` otherwise) and its body.
async fn answer(response: Response) -> (String, Bytes) {
    let x_cache = if response.status() == StatusCode::OK {
        response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned()
    } else {
        format!("status {}", response.status())
    };
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    (x_cache, body)
}

/// Connect `n` clients, then let all of them send `GET url` at once; the
/// `X-Cache` value of each 200 answer (`"status <code>"` for others).
async fn concurrent_gets(
    address: SocketAddr,
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<(String, Bytes)>> {
    let start = Arc::new(Barrier::new(n));
    let request = Arc::new(format!(
        "GET {url} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    ));
    let mut clients = JoinSet::new();
    for _ in 0..n {
        let (start, request) = (Arc::clone(&start), Arc::clone(&request));
        clients.spawn(async move {
            let mut stream = TcpStream::connect(address).await.context("connect")?;
            stream.set_nodelay(true).context("nodelay")?;
            start.wait().await;
            stream
                .write_all(request.as_bytes())
                .await
                .context("send the request")?;
            let mut answer = Vec::new();
            stream
                .read_to_end(&mut answer)
                .await
                .context("read the answer")?;
            anyhow::Ok(parse_answer(&answer))
        });
    }
    let mut answers = Vec::with_capacity(n);
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = clients.join_next() => match next {
                Some(result) => answers.push(result.context("client task")??),
                None => break,
            },
            () = &mut deadline => bail!("{n} concurrent GETs of {url} took over 30 s"),
        }
    }
    Ok(answers)
}

/// The `X-Cache` header of a 200 answer (`status <line>` otherwise) and the
/// body (the demo answers with `Content-Length`: no chunked decoding needed).
fn parse_answer(answer: &[u8]) -> (String, Bytes) {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(answer.len());
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = Bytes::copy_from_slice(answer.get(split + 4..).unwrap_or_default());
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return (format!("status {status}"), body);
    }
    let x_cache = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("x-cache"))
        .map_or_else(|| "none".to_owned(), |(_, value)| value.trim().to_owned());
    (x_cache, body)
}
