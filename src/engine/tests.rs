//! Failures injected into a flight's task: what every waiter sees, and what the upstream sees.
//!
//! These tests reach inside the engine (a fault switch that only test builds have), so they
//! live here rather than in `tests/`, with a small upstream of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;

use super::Dedup;
use crate::answer::AnswerBody;
use crate::error::ErrorKind;

/// Where a flight's task panics, in a test build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    None,
    /// Right after the upstream answered, before anything is stored.
    AfterUpstream,
    /// While a streamed answer arrives, after its first event.
    MidStream,
}

/// The fault switch of an engine in a test build.
#[derive(Default)]
pub(super) struct Faults(std::sync::Mutex<Option<Fault>>);

impl Faults {
    pub(super) fn set(&self, fault: Fault) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
    }

    /// Panics if `here` is the fault set.
    pub(super) fn trip(&self, here: Fault) {
        let set = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        if set == Some(here) {
            panic!("injected fault: {here:?}");
        }
    }
}

/// An upstream that counts its calls and answers a chat request with JSON, or with a stream
/// of three events 50 ms apart.
async fn upstream() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let calls = counted.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let streaming = body.windows(14).any(|w| w == b"\"stream\":true}");
            if !streaming {
                let json = format!(
                    r#"{{"id":"chatcmpl-{n}","choices":[],"usage":{{"prompt_tokens":1}}}}"#
                );
                return ([("content-type", "application/json")], json).into_response();
            }
            let events = futures_util::stream::iter(["first", "second", "third"])
                .then(|word| async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>(format!("data: {{\"word\":\"{word}\"}}\n\n"))
                })
                .chain(futures_util::stream::once(async {
                    Ok("data: [DONE]\n\n".to_owned())
                }));
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(events),
            )
                .into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

use axum::response::IntoResponse;

fn request(stream: bool) -> http::Request<Full<Bytes>> {
    let body = if stream {
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#
    } else {
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
    };
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

#[tokio::test]
async fn a_flight_that_dies_fails_every_waiter_once_and_leaves_the_table() {
    let (url, calls) = upstream().await;
    let engine = Dedup::builder().upstream(url).build().expect("engine");
    engine.engine.faults.set(Fault::AfterUpstream);
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.send(request(false)).await })
        })
        .collect();
    for waiter in waiters {
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("no waiter hangs")
            .expect("task");
        let e = outcome.expect_err("the flight died");
        assert_eq!(e.kind(), ErrorKind::Abandoned, "{e}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the dead flight was not led again"
    );
    assert_eq!(engine.in_flight(), 0, "the flight left the table");
    // Nothing was stored, and the engine goes on answering.
    engine.engine.faults.set(Fault::None);
    let answer = engine.send(request(false)).await.expect("answered");
    assert_eq!(answer.cache, crate::CacheStatus::Miss);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stream_whose_flight_dies_ends_for_every_subscriber() {
    let (url, calls) = upstream().await;
    let engine = Dedup::builder().upstream(url).build().expect("engine");
    engine.engine.faults.set(Fault::MidStream);
    let leader = engine.send(request(true)).await.expect("the stream starts");
    let follower = engine.send(request(true)).await.expect("joins live");
    assert_eq!(follower.cache, crate::CacheStatus::Coalesced);
    for answer in [leader, follower] {
        let AnswerBody::Stream(stream) = answer.body else {
            panic!("a stream");
        };
        let items: Vec<_> = tokio::time::timeout(Duration::from_secs(5), stream.collect())
            .await
            .expect("the stream ends instead of hanging");
        let last = items.last().expect("something arrived");
        assert!(
            last.is_err(),
            "the stream ends with an error, not as if complete"
        );
        let received: Vec<u8> = items.iter().flatten().flat_map(|b| b.to_vec()).collect();
        assert!(received.starts_with(b"data: {\"word\":\"first\"}"));
    }
    assert_eq!(engine.in_flight(), 0, "the flight left the table");
    engine.engine.faults.set(Fault::None);
    let again = engine.send(request(true)).await.expect("answered");
    assert_eq!(again.cache, crate::CacheStatus::Miss, "nothing was stored");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
