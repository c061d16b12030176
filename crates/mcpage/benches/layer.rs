//! The layer's overhead on a bypassed (logged-in) request, against the bare service.
//! Bypassed requests never touch memcached, so none needs to run.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use http::{Request, Response};
use http_body_util::Full;
use mcpage::{Cache, Config, PageCacheLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

fn request() -> Request<Full<Bytes>> {
    Request::get("/articles/42")
        .header("cookie", "_ga=1; sessionid=abc")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

async fn handler(_: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .body(Full::new(Bytes::from_static(b"<h1>hello</h1>")))
        .expect("response"))
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cache = runtime
        .block_on(Cache::connect(&Config::default()))
        .expect("cache");
    let bare = service_fn(handler);
    let layered = PageCacheLayer::new(cache).layer(service_fn(handler));
    let mut group = c.benchmark_group("bypassed_request");
    group.bench_function("bare", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(bare.oneshot(request()).await) })
    });
    group.bench_function("with_layer", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(layered.clone().oneshot(request()).await) })
    });
    group.finish();

    // The ratio, measured interleaved so both see the same machine state.
    let rounds = 100_000;
    let (mut bare_ns, mut layer_ns) = (0u128, 0u128);
    runtime.block_on(async {
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..rounds {
                let mut s = bare;
                black_box(s.ready().await.expect("ready").call(request()).await.ok());
            }
            bare_ns += start.elapsed().as_nanos();
            let start = Instant::now();
            for _ in 0..rounds {
                let mut s = layered.clone();
                black_box(s.ready().await.expect("ready").call(request()).await.ok());
            }
            layer_ns += start.elapsed().as_nanos();
        }
    });
    let per = |ns: u128| ns as f64 / (5 * rounds) as f64;
    println!(
        "bypassed request: bare {:.0} ns, with layer {:.0} ns, throughput ratio {:.3} (layer/bare); \
         a real request over HTTP costs tens of microseconds, so the overhead there is {:.1} % of 20 us",
        per(bare_ns),
        per(layer_ns),
        per(bare_ns) / per(layer_ns),
        (per(layer_ns) - per(bare_ns)) / 200.0
    );
}

criterion_group!(group, benches);

fn main() {
    group();
    Criterion::default().configure_from_args().final_summary();
}
