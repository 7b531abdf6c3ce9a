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
use llm_dedup::server::OperatorAccess;
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

/// An engine in front of `upstream` keeping its database in `dir`.
fn with_database(upstream: &FakeUpstream, dir: &tempfile::TempDir) -> Dedup {
    upstream
        .engine()
        .database(dir.path().join("c.db"))
        .build()
        .expect("engine")
}

/// A GET from a client on loopback, as the operator's own tools on the proxy's machine are.
fn get(path: &str) -> Request<Body> {
    get_from(path, "127.0.0.1:40000", None)
}

/// A GET from the client at `peer`, with `Authorization: Bearer TOKEN` when `token` is given.
fn get_from(path: &str, peer: &str, token: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    // What an HTTP/1.1 client sends: the host it connected to.
    let request = request.header("host", "127.0.0.1:8080");
    let mut request = request.body(Body::empty()).expect("request");
    let peer: std::net::SocketAddr = peer.parse().expect("address");
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    request
}

/// The status and error code of `request` through an app whose operator endpoints are open as
/// `access` says.
async fn operator_answer(
    engine: &Dedup,
    access: &OperatorAccess,
    request: Request<Body>,
) -> (StatusCode, Value) {
    let response = llm_dedup::server::app_with(engine.clone(), access.clone())
        .oneshot(request)
        .await
        .expect("the app answers every request");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body["error"]["code"].clone())
}

/// Every operator endpoint: the same access rule holds for each.
const OPERATOR_PATHS: [&str; 5] = [
    "/_llm-dedup/stats",
    "/_llm-dedup/metrics",
    "/_llm-dedup/",
    "/_llm-dedup",
    "/_llm-dedup/series",
];

/// Without a token the operator endpoints answer loopback clients only, and tell others how to
/// open them; with one, they answer whoever presents it, and nobody else, loopback included.
/// Health stays open to everyone (load balancers).
#[tokio::test]
async fn operator_endpoints_answer_loopback_or_the_token_and_health_stays_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = FakeUpstream::start().await;
    let engine = with_database(&upstream, &dir);
    let far = "10.1.2.3:5555";
    let loopback6 = "[::1]:5555";
    let open = OperatorAccess::loopback_only();
    for path in OPERATOR_PATHS {
        let (status, _) = operator_answer(&engine, &open, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path} from 127.0.0.1");
        let (status, _) = operator_answer(&engine, &open, get_from(path, loopback6, None)).await;
        assert_eq!(status, StatusCode::OK, "{path} from ::1");
        let (status, code) = operator_answer(&engine, &open, get_from(path, far, None)).await;
        assert_eq!(
            (status, code),
            (StatusCode::FORBIDDEN, json!("operator_loopback_only")),
            "{path} from another machine without a token"
        );
        // In-process callers with no peer address are not on loopback either.
        let bare = Request::get(path).body(Body::empty()).expect("request");
        let (status, _) = operator_answer(&engine, &open, bare).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} with no peer address");
    }
    let guarded = OperatorAccess::token("s3cret-token");
    for path in OPERATOR_PATHS {
        for (peer, token, expected) in [
            (far, Some("s3cret-token"), StatusCode::OK),
            ("127.0.0.1:1", Some("s3cret-token"), StatusCode::OK),
            (far, None, StatusCode::UNAUTHORIZED),
            ("127.0.0.1:1", None, StatusCode::UNAUTHORIZED),
            (far, Some("s3cret-tokem"), StatusCode::UNAUTHORIZED),
            (far, Some("s3cret-token-and-more"), StatusCode::UNAUTHORIZED),
        ] {
            let (status, code) =
                operator_answer(&engine, &guarded, get_from(path, peer, token)).await;
            assert_eq!(status, expected, "{path} from {peer} with {token:?}");
            if status == StatusCode::UNAUTHORIZED {
                assert_eq!(code, json!("invalid_api_key"));
            }
        }
    }
    for access in [&open, &guarded] {
        let (status, _) =
            operator_answer(&engine, access, get_from("/_llm-dedup/health", far, None)).await;
        assert_eq!(status, StatusCode::OK, "health answers anyone");
    }
}

/// A browser cannot send a bearer token, so with `--admin-token` the page also takes the token
/// as HTTP Basic credentials (any user name), and its refusal asks the browser for them. The
/// page is one self-contained document that may reach this proxy and nothing else.
#[tokio::test]
async fn the_live_page_opens_to_a_browser_with_the_token_and_reaches_no_other_host() {
    use base64::Engine as _;
    let upstream = FakeUpstream::start().await;
    let engine = upstream.engine().build().expect("engine");
    let guarded = OperatorAccess::token("s3cret-token");
    let app = || llm_dedup::server::app_with(engine.clone(), guarded.clone());
    let basic = |credentials: &str| {
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        let mut request = get_from("/_llm-dedup/", "10.1.2.3:5555", None);
        request.headers_mut().insert(
            "authorization",
            format!("Basic {encoded}").parse().expect("value"),
        );
        request
    };
    let refused = app().oneshot(basic("admin:wrong")).await.expect("answer");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let challenges: Vec<_> = refused
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic realm=")),
        "{challenges:?}"
    );
    assert!(challenges.iter().any(|c| c == "Bearer"), "{challenges:?}");
    for bad in ["", "s3cret-token", "not base64 at all"] {
        let mut request = basic("x:y");
        request.headers_mut().insert(
            "authorization",
            format!("Basic {bad}").parse().expect("value"),
        );
        let answer = app().oneshot(request).await.expect("answer");
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
    }

    let page = app()
        .oneshot(basic("admin:s3cret-token"))
        .await
        .expect("answer");
    assert_eq!(page.status(), StatusCode::OK);
    let header = |name: &str| page.headers()[name].to_str().expect("ascii").to_owned();
    assert!(header("content-type").starts_with("text/html"));
    let policy = header("content-security-policy");
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"));
    let html = page.into_body().collect().await.expect("body").to_bytes();
    let html = String::from_utf8(html.to_vec()).expect("utf-8");
    // Self-contained: no script, style, font or image from anywhere else.
    for reference in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(
            !html.contains(reference),
            "the page refers elsewhere: {reference}"
        );
    }
    assert!(html.contains("/_llm-dedup/stats") && html.contains("/_llm-dedup/series"));

    // The series: a day of minutes by default, fewer on request, nonsense refused.
    let series = call(&engine, get("/_llm-dedup/series?minutes=60")).await;
    assert_eq!(series.status, StatusCode::OK);
    assert_eq!(series.body["step_ms"], 60_000);
    let outcomes = series.body["outcomes"].as_array().expect("outcomes");
    assert_eq!(outcomes.len(), 6);
    assert!(
        outcomes
            .iter()
            .all(|o| o[1].as_array().map(Vec::len) == Some(60))
    );
    let day = call(&engine, get("/_llm-dedup/series")).await;
    assert_eq!(
        day.body["outcomes"][0][1].as_array().map(Vec::len),
        Some(1440)
    );
    for bad in ["0", "1441", "-1", "ten"] {
        let reply = call(&engine, get(&format!("/_llm-dedup/series?minutes={bad}"))).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.body["error"]["param"], "minutes");
    }
}

/// `/stats` does not wait for the writer, nor open the database for writing: calls in a loop
/// within a second get the same figures, and figures committed later show up after it.
#[tokio::test]
async fn stats_are_read_cheaply_and_at_most_a_second_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = FakeUpstream::start().await;
    let engine = with_database(&upstream, &dir);
    let app = llm_dedup::server::app(engine.clone());
    let stats = |app: axum::Router| async move {
        let response = app.oneshot(get("/_llm-dedup/stats")).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        serde_json::from_slice::<Value>(&bytes).expect("json")
    };
    let before = stats(app.clone()).await;
    assert_eq!(before["totals"]["requests"], json!(0));
    let r = call(&engine, post("/v1/chat/completions", chat("one"), &[])).await;
    assert_eq!(r.status, StatusCode::OK);
    engine.flush().await.expect("flush");
    // Within the second: the same figures, not a new read.
    assert_eq!(stats(app.clone()).await, before);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = stats(app.clone()).await;
    assert_eq!(after["totals"]["requests"], json!(1), "{after}");
    assert_eq!(after["entries"], json!(1), "{after}");
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
        .governor(GovernorSettings::default().retry_budget(Duration::ZERO))
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
        .governor(
            GovernorSettings::default()
                .rpm(Some(1))
                .max_queue_wait(Duration::from_millis(50)),
        )
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

/// Without a token, the operator endpoints answer a loopback client only when it names a
/// loopback host (or the address listened on): a page on another site that resolves its own
/// name to 127.0.0.1 (DNS rebinding) reaches the port from the operator's browser, but it names
/// its own host. With a token, the token decides.
#[tokio::test]
async fn without_a_token_operator_endpoints_answer_only_a_loopback_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = FakeUpstream::start().await;
    let engine = with_database(&upstream, &dir);
    let open = OperatorAccess::loopback_only();
    let listening =
        OperatorAccess::loopback_only().listening_on("10.0.0.5:8080".parse().expect("addr"));
    let with_host = |path: &str, host: Option<&str>, token: Option<&str>| {
        let mut request = get_from(path, "127.0.0.1:40000", token);
        request.headers_mut().remove("host");
        if let Some(host) = host {
            request
                .headers_mut()
                .insert("host", host.parse().expect("value"));
        }
        request
    };
    for path in OPERATOR_PATHS {
        for host in [
            "localhost",
            "LocalHost:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]",
            "[::1]:8080",
        ] {
            let (status, _) =
                operator_answer(&engine, &open, with_host(path, Some(host), None)).await;
            assert_eq!(status, StatusCode::OK, "{path} with Host: {host}");
        }
        for host in [
            Some("attacker.example"),
            Some("attacker.example:8080"),
            Some("localhost.attacker.example"),
            Some("127.0.0.1.attacker.example"),
            Some("10.0.0.5:8080"),
            None,
        ] {
            let (status, code) = operator_answer(&engine, &open, with_host(path, host, None)).await;
            assert_eq!(
                (status, code),
                (
                    StatusCode::MISDIRECTED_REQUEST,
                    json!("operator_host_not_allowed")
                ),
                "{path} with Host: {host:?}"
            );
        }
        // The address the proxy listens on names it too.
        let named = with_host(path, Some("10.0.0.5:8080"), None);
        let (status, _) = operator_answer(&engine, &listening, named).await;
        assert_eq!(status, StatusCode::OK, "{path} named by the listen address");
        let other = with_host(path, Some("attacker.example"), None);
        let (status, _) = operator_answer(&engine, &listening, other).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    }
    let guarded = OperatorAccess::token("s3cret-token");
    let named = with_host(
        "/_llm-dedup/stats",
        Some("proxy.internal.example"),
        Some("s3cret-token"),
    );
    let (status, _) = operator_answer(&engine, &guarded, named).await;
    assert_eq!(status, StatusCode::OK, "with a token, the token decides");
    let health = with_host("/_llm-dedup/health", Some("attacker.example"), None);
    let (status, _) = operator_answer(&engine, &open, health).await;
    assert_eq!(status, StatusCode::OK, "health answers any host");
}

/// Nothing under `/_llm-dedup/` is forwarded upstream, however its path is spelled: repeated
/// slashes, escapes, dot segments and another case all reach the proxy's own endpoints, under
/// their access rule.
#[tokio::test]
async fn operator_paths_are_never_forwarded_however_spelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = FakeUpstream::start().await;
    let engine = with_database(&upstream, &dir);
    let open = OperatorAccess::loopback_only();
    for path in [
        "//_llm-dedup/stats",
        "///_llm-dedup//stats",
        "/%5Fllm-dedup/stats",
        "/%5fllm-dedup/stats",
        "/_llm%2Ddedup/stats",
        "/%2F_llm-dedup/stats",
        "/_llm-dedup%2Fstats",
        "/./_llm-dedup/stats",
        "/v1/../_llm-dedup/stats",
        "/v1/%2E%2E/_llm-dedup/stats",
        "/_LLM-DEDUP/stats",
        "/_Llm-Dedup/stats?x=1",
    ] {
        let (status, _) = operator_answer(&engine, &open, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path} is the stats endpoint");
        let (status, code) =
            operator_answer(&engine, &open, get_from(path, "10.1.2.3:5555", None)).await;
        assert_eq!(
            (status, code),
            (StatusCode::FORBIDDEN, json!("operator_loopback_only")),
            "{path} keeps the access rule"
        );
    }
    for path in ["//_llm-dedup/nothing-here", "/%5Fllm-dedup/x"] {
        let (status, code) = operator_answer(&engine, &open, get(path)).await;
        assert_eq!(
            (status, code),
            (StatusCode::NOT_FOUND, json!("not_found")),
            "{path}"
        );
    }
    assert_eq!(upstream.calls(), 0, "nothing was forwarded");
    // Paths that only look alike go upstream as they came.
    for path in ["/v1/_llm-dedup/stats", "/_llm-deduplicate", "/%5Fother"] {
        let reply = call(&engine, get(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.body["path"], path, "{path}");
    }
    assert_eq!(upstream.calls(), 3);
}
