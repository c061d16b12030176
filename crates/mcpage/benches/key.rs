//! Key normalization cost: request target -> nginx `$uri` -> memcached key.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use mcpage::key::{KeyScheme, QueryMode, nginx_uri};

const TARGETS: [&str; 6] = [
    "/",
    "/articles/2024/05/how-we-cache-everything",
    "/a//b/./c/../d",
    "/caf%C3%A9/%E2%82%AC/x%20y",
    "/category/rust?page=2",
    "/static/a/very/long/path/with/many/segments/to/walk/through/index.html",
];

fn benches(c: &mut Criterion) {
    let scheme = KeyScheme::new(b"page:".to_vec(), QueryMode::Bypass, true, false);
    let mut group = c.benchmark_group("key");
    group.bench_function("nginx_uri", |b| {
        b.iter(|| {
            for t in TARGETS {
                let _ = black_box(nginx_uri(black_box(t.as_bytes()), true));
            }
        })
    });
    group.bench_function("page_key", |b| {
        b.iter(|| {
            for t in TARGETS {
                let _ = black_box(scheme.page_key(None, black_box(t.as_bytes())));
            }
        })
    });
    group.bench_function("copy_baseline", |b| {
        b.iter(|| {
            for t in TARGETS {
                black_box(black_box(t.as_bytes()).to_vec());
            }
        })
    });
    group.finish();
}

/// One line a human can compare across runs: ns per key and the ratio to copying the bytes.
fn ratio() {
    let scheme = KeyScheme::new(b"page:".to_vec(), QueryMode::Bypass, true, false);
    let rounds = 200_000;
    let time = |f: &dyn Fn()| {
        let start = Instant::now();
        for _ in 0..rounds {
            f();
        }
        start.elapsed().as_nanos() as f64 / (rounds * TARGETS.len()) as f64
    };
    let copy = time(&|| {
        for t in TARGETS {
            black_box(black_box(t.as_bytes()).to_vec());
        }
    });
    let key = time(&|| {
        for t in TARGETS {
            let _ = black_box(scheme.page_key(None, black_box(t.as_bytes())));
        }
    });
    println!(
        "page_key: {key:.1} ns/target, copy baseline {copy:.1} ns/target, ratio {:.1}x",
        key / copy
    );
}

criterion_group!(group, benches);

fn main() {
    group();
    ratio();
    Criterion::default().configure_from_args().final_summary();
}
