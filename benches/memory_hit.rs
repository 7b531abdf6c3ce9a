//! A memory-tier hit through the library (`Dedup::send`), against the same request answered
//! by the upstream over loopback HTTP as a baseline; and the same hit by an engine whose price
//! table is empty, which measures what valuing a hit (`llm-dedup-saved-usd`) costs; and a hit
//! from a full bucket of three answers (`llm-dedup-bucket: 3`), which looks up all three and
//! picks one.

mod support;

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::Full;
use llm_dedup::{CacheStatus, Dedup, PriceTable};

fn request() -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(support::REQUEST.as_bytes())))
        .expect("valid request")
}

/// The request, asking for a bucket of three answers.
fn bucket_request() -> http::Request<Full<Bytes>> {
    let mut request = request();
    request
        .headers_mut()
        .insert("llm-dedup-bucket", http::HeaderValue::from_static("3"));
    request
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = rt.block_on(support::serve(support::fixed_app()));
    let engine_with = |prices: PriceTable| {
        let engine = Dedup::builder()
            .upstream(format!("http://{upstream}"))
            .prices(prices)
            .build()
            .expect("engine");
        let first = rt.block_on(engine.send(request())).expect("first answer");
        assert_eq!(first.cache, CacheStatus::Miss);
        engine
    };
    let engine = engine_with(PriceTable::built_in());
    let no_prices = PriceTable::parse(r#"{"taken": "2026-01-01", "models": {}}"#).expect("empty");
    let unpriced = engine_with(no_prices);
    let bucketed = engine_with(PriceTable::built_in());
    for _ in 0..2 {
        let filled = rt
            .block_on(bucketed.send(bucket_request()))
            .expect("filled");
        assert_eq!(filled.cache, CacheStatus::Miss);
    }

    let mut group = c.benchmark_group("memory_hit");
    for (name, engine, priced) in [
        ("Dedup::send hit", &engine, true),
        ("Dedup::send hit, no price table", &unpriced, false),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let answer = rt
                    .block_on(engine.send(black_box(request())))
                    .expect("answer");
                assert_eq!(answer.cache, CacheStatus::Hit);
                assert_eq!(answer.headers.contains_key("llm-dedup-saved-usd"), priced);
                answer
            })
        });
    }
    let client = support::client_builder().build().expect("client");
    let url = format!("http://{upstream}/v1/chat/completions");
    group.bench_function("Dedup::send hit from a bucket of 3", |b| {
        b.iter(|| {
            let answer = rt
                .block_on(bucketed.send(black_box(bucket_request())))
                .expect("answer");
            assert_eq!(answer.cache, CacheStatus::Hit);
            answer
        })
    });
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
