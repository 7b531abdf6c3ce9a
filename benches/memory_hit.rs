//! A memory-tier hit through the library (`Dedup::send`), against the same request answered
//! by the upstream over loopback HTTP as a baseline.

mod support;

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::Full;
use llm_dedup::{CacheStatus, Dedup};

fn request() -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(support::REQUEST.as_bytes())))
        .expect("valid request")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = rt.block_on(support::serve(support::fixed_app()));
    let engine = Dedup::builder()
        .upstream(format!("http://{upstream}"))
        .build()
        .expect("engine");
    let first = rt.block_on(engine.send(request())).expect("first answer");
    assert_eq!(first.cache, CacheStatus::Miss);

    let mut group = c.benchmark_group("memory_hit");
    group.bench_function("Dedup::send hit", |b| {
        b.iter(|| {
            let answer = rt
                .block_on(engine.send(black_box(request())))
                .expect("answer");
            assert_eq!(answer.cache, CacheStatus::Hit);
            answer
        })
    });
    let client = reqwest::Client::new();
    let url = format!("http://{upstream}/v1/chat/completions");
    group.bench_function("baseline: upstream over loopback", |b| {
        b.iter(|| {
            rt.block_on(async {
                client
                    .post(&url)
                    .body(support::REQUEST)
                    .send()
                    .await
                    .expect("sent")
                    .bytes()
                    .await
                    .expect("body")
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
