//! The proxy's own answers, through `server::app` without a socket: operator endpoints, and
//! the shape of every error the proxy makes itself (status, OpenAI-style body, the headers the
//! SDKs read). Tests that need a real connection (streams, hang-ups, chunked bodies, shutdown)
//! stay in the other files.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{FakeUpstream, chat};
use http_body_util::BodyExt;
use llm_dedup::{Dedup, GovernorSettings};
use serde_json::{Value, json};
use tower::ServiceExt;

/// What the client sees of one answer of the app.
struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(engine: &Dedup, request: Request<Body>) -> Reply {
    let response = llm_dedup::server::app(engine.clone())
        .oneshot(request)
        .await
        .expect("the app answers every request");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

fn post(path: &str, body: impl Into<Body>, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test-key-1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(body.into()).expect("request")
}

/// An engine whose upstream refuses connections.
fn dead_engine() -> Dedup {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    Dedup::builder()
        .upstream(dead)
        .governor(GovernorSettings {
            retry_budget: Duration::ZERO,
            ..GovernorSettings::default()
        })
        .build()
        .expect("engine")
}

/// Asserts the OpenAI error shape with `status`, `type` and `code`, and what it tells SDKs.
fn assert_error(reply: &Reply, status: u16, kind: &str, code: &str, retry: bool) {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    let error = &reply.body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(
        (&error["type"], &error["code"]),
        (&json!(kind), &json!(code))
    );
    assert_eq!(error["param"], Value::Null);
    let expected = if retry { "true" } else { "false" };
    assert_eq!(reply.headers["x-should-retry"], expected, "{}", reply.body);
}

#[tokio::test]
async fn the_health_endpoint_answers_without_the_upstream() {
    let engine = dead_engine();
    let r = call(&engine, get("/_llm-dedup/health")).await;
    assert_eq!(
        (r.status, &r.body["status"]),
        (StatusCode::OK, &json!("ok"))
    );
    // Nothing under the operator prefix is forwarded upstream (which is down here: a
    // forwarded request would answer 502).
    let r = call(&engine, get("/_llm-dedup/nothing-here")).await;
    assert_eq!(
        (r.status, &r.body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_stats_need_a_database() {
    let engine = dead_engine();
    let response = llm_dedup::server::app(engine.clone())
        .oneshot(get("/_llm-dedup/metrics"))
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/openmetrics-text")
    );
    let text = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8(text.to_vec()).expect("utf-8");
    assert!(
        text.contains("# TYPE llm_dedup_memory_tier_bytes gauge"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    // This engine keeps no database: the stats endpoint says so in the error shape.
    let r = call(&engine, get("/_llm-dedup/stats")).await;
    assert_error(&r, 500, "server_error", "internal_error", false);
}

#[tokio::test]
async fn every_error_the_proxy_makes_has_the_providers_shape() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().max_body(1024).build().expect("engine");
    let url = "/v1/chat/completions";

    let r = call(&engine, post(url, "{\"model\": ", &[])).await;
    assert_error(&r, 400, "invalid_request_error", "invalid_request", false);
    let r = call(&engine, post(url, "[1, 2]", &[])).await;
    assert_error(&r, 400, "invalid_request_error", "invalid_request", false);
    let r = call(
        &engine,
        post(url, chat("x"), &[("cache-control", "max-age=soon")]),
    )
    .await;
    assert_error(&r, 400, "invalid_request_error", "invalid_request", false);
    let r = call(&engine, post(url, vec![b' '; 2048], &[])).await;
    assert_error(&r, 413, "invalid_request_error", "request_too_large", false);
    let only = [("cache-control", "only-if-cached")];
    let r = call(&engine, post(url, chat("never asked"), &only)).await;
    assert_error(&r, 504, "invalid_request_error", "not_cached", false);
    assert_eq!(upstream.calls(), 0, "no bad request reached the upstream");

    let dead = dead_engine();
    let r = call(&dead, post(url, chat("x"), &[])).await;
    assert_error(&r, 502, "upstream_error", "upstream_unreachable", true);
}

#[tokio::test]
async fn a_full_queue_says_when_to_come_back() {
    let upstream = FakeUpstream::start().await;
    let engine = upstream
        .engine()
        .governor(GovernorSettings {
            rpm: Some(1),
            max_queue_wait: Duration::from_millis(50),
            ..GovernorSettings::default()
        })
        .build()
        .expect("engine");
    let url = "/v1/chat/completions";
    assert_eq!(call(&engine, post(url, chat("a"), &[])).await.status, 200);
    let r = call(&engine, post(url, chat("b"), &[])).await;
    assert_error(&r, 429, "rate_limit_exceeded", "queue_full", true);
    let wait: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!((1..=60).contains(&wait), "{wait}");
}
