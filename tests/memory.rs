//! The memory tier holds what `--memory` allows, counted in the bytes it really keeps alive,
//! not in the bytes its weigher believes in. This test binary counts every live heap byte of
//! the process (a counting global allocator), so it runs alone in its own binary.

mod common;

use std::sync::atomic::Ordering;

use common::{Behaviour, FakeUpstream};
use futures_util::StreamExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn request(i: usize) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let body = common::chat(&format!("question number {i}, asked once"));
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test-key-1")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request")
}

/// Live heap bytes allocated since `region` began.
fn live(region: &Region<'_, std::alloc::System>) -> i64 {
    let change = region.change();
    // Reallocations are already in both (growth as allocated, shrinking as freed).
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_answers_fill_the_memory_tier_to_its_bound_and_no_further() {
    const BOUND: u64 = 4 * 1024 * 1024;
    let upstream = FakeUpstream::with(Behaviour {
        forget_bodies: true,
        ..Behaviour::default()
    })
    .await;
    let engine = upstream
        .engine()
        .memory_bytes(BOUND)
        .build()
        .expect("engine");
    // Warm up the client pool and the runtime outside the measured region.
    engine.send(request(usize::MAX)).await.expect("warm-up");
    let region = Region::new(GLOBAL);
    let sent = futures_util::stream::iter(0..8_000)
        .map(|i| {
            let engine = engine.clone();
            async move {
                engine
                    .send(request(i))
                    .await
                    .expect("answer")
                    .into_bytes()
                    .await
            }
        })
        .buffer_unordered(16)
        .count()
        .await;
    assert_eq!(sent, 8_000);
    assert!(upstream.state.calls.load(Ordering::SeqCst) > 8_000);
    let (weighed, entries) = {
        engine.metrics_text().await; // settles the tier's pending evictions
        engine.memory_usage()
    };
    let held = live(&region);
    eprintln!("{entries} entries weighed {weighed} bytes; {held} live heap bytes");
    drop(engine);
    // Its background tasks end and free what they hold.
    common::eventually(|| live(&region) < 512 * 1024).await;
    let left = live(&region);
    assert!(left < 512 * 1024, "{left} bytes outlive the engine");
    assert!(
        weighed <= BOUND,
        "the tier believes it holds {weighed} bytes"
    );
    // What the entries really keep alive stays within a quarter of the bound above it; the
    // rest of the allowance is the memo of known requests (a sixteenth of the bound) and
    // what the runtime and the client pools keep.
    let allowance = (BOUND + BOUND / 4 + BOUND / 16 + 1024 * 1024) as i64;
    assert!(
        held <= allowance,
        "{held} live bytes for a {BOUND}-byte bound ({:.1}×)",
        held as f64 / BOUND as f64
    );
}
