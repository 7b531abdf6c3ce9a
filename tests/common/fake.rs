//! A fake OpenAI upstream: a small axum app on `127.0.0.1:0` that answers like the real API
//! (JSON bodies with fresh ids, `x-request-id` and rate-limit headers, OpenAI error bodies,
//! server-sent events in each API's framing) and records what it receives.
//!
//! How it behaves is one value, [`Behaviour`], given at start ([`FakeUpstream::with`]) or
//! changed mid-test ([`FakeUpstream::behave`]); what it saw is read from [`FakeState`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use llm_dedup::{Dedup, DedupBuilder};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How the fake upstream behaves. Its default answers every call at once, in full.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Wait before answering.
    pub delay: Duration,
    /// Answer every call with this status and an OpenAI error body.
    pub fail_status: Option<u16>,
    /// Non-streamed answers wait for [`FakeState::release`]; streams send their first event
    /// at once and the rest once released.
    pub hold: bool,
    /// How streams end.
    pub stream_end: StreamEnd,
    /// Wait between stream events.
    pub chunk_delay: Duration,
    /// Requests per second allowed (0: no limit); past it, 429 with `retry-after-ms`.
    pub limit_per_sec: u32,
    /// Count `limit_per_sec` in fixed one-second windows (nothing comes back before a window
    /// ends) on the wall clock's whole seconds, instead of a bucket refilling continuously.
    pub limit_window: bool,
    /// Answer every call 429 `insufficient_quota`.
    pub quota_exhausted: bool,
    /// Refuse this many calls (the next ones) with 429 `rate_limit_exceeded`, asking to wait
    /// as `retry_style` says.
    pub refuse_next: usize,
    pub retry_style: RetryStyle,
    /// Refuse this many calls with a 429 whose every wait is absurd (`retry-after: inf`,
    /// `retry-after-ms: 1e20`, a reset centuries away, `NaN` counts): a broken or hostile
    /// compatible upstream.
    pub absurd_refusals: usize,
    /// Take this many calls (the next ones) and never answer them: no status, no byte.
    pub hang_calls: usize,
    /// Keep no bodies (for tests that measure memory).
    pub forget_bodies: bool,
    /// Answer embeddings requests with one embedding too few (a broken upstream).
    pub embed_drop_last: bool,
    /// API keys (`Authorization` values) refused with OpenAI's `401 invalid_api_key`.
    pub refused_keys: Vec<String>,
    /// Non-streamed answers report this `usage` instead of their own.
    pub usage: Option<Value>,
    /// Answers report this model (a dated snapshot, the model behind an Azure deployment)
    /// instead of the one requested.
    pub reported_model: Option<String>,
    /// Streamed chat answers carry this many extra content events of `big_event_bytes` each.
    pub extra_events: usize,
    pub big_event_bytes: usize,
    /// When non-zero, a streamed answer's first event is followed by one `data:` line of this
    /// many bytes that never ends with a blank line, then (once released, when `hold` is set)
    /// the connection closes.
    pub unterminated_bytes: usize,
    /// Non-streamed chat answers carry a field of this many bytes.
    pub padding_bytes: usize,
    /// Streams go silent after their first event and stay open, never sending another byte.
    pub silent_streams: bool,
    /// Simulates the provider's own prompt cache on chat completions, as OpenAI's works: the
    /// first message (a system prompt) of 1,024 tokens or more (four bytes a token) is a
    /// prefix of its caller's organization (`Authorization`), readable once the first byte of
    /// an answer that wrote it is out; reading it is counted in `cached_tokens` (in 128-token
    /// steps). Prefill takes this long per 1,000 prompt tokens, a tenth of it for cached ones.
    pub prefill_per_ktok: Option<Duration>,
}

/// How the fake ends its streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamEnd {
    /// With the framing's end marker.
    #[default]
    Complete,
    /// Cut after the first event: the connection drops.
    Cut,
    /// An error event after the first event.
    ErrorEvent,
    /// The rest of the events, then the connection closes (whatever they were).
    Closed,
}

/// How the fake asks a refused client to wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RetryStyle {
    /// `retry-after-ms: 300`.
    #[default]
    Millis,
    /// `retry-after: 1` (seconds).
    Seconds,
    /// `retry-after` as an HTTP date one second away.
    HttpDate,
}

/// What the fake saw, and the signals a test gives it.
#[derive(Default)]
pub struct FakeState {
    behaviour: Mutex<Behaviour>,
    /// Calls received, all paths.
    pub calls: AtomicUsize,
    /// Releases what [`Behaviour::hold`] holds.
    pub release: Notify,
    /// Signalled on every call received.
    pub arrived: Notify,
    /// 429s answered.
    pub refusals: AtomicUsize,
    /// Calls being answered right now, and the most at once.
    pub in_progress: AtomicUsize,
    pub peak_in_progress: AtomicUsize,
    /// Headers of the last request received.
    pub last_headers: Mutex<Option<HeaderMap>>,
    /// Bodies received, in order (unless [`Behaviour::forget_bodies`]).
    pub bodies: Mutex<Vec<Bytes>>,
    /// Embedding inputs received, over all calls.
    pub embed_inputs: AtomicUsize,
    /// The rate limiter's bucket: (tokens, last refill).
    limiter: Mutex<Option<(f64, std::time::Instant)>>,
    /// With [`Behaviour::prefill_per_ktok`]: the prefixes readable from the simulated prompt
    /// cache, by organization and prefix digest; and the prompt tokens of the calls so far,
    /// and of those the ones read from it.
    readable: Mutex<std::collections::HashSet<(String, [u8; 32])>>,
    pub prompt_tokens: AtomicUsize,
    pub cached_tokens: AtomicUsize,
    /// Prompt tokens written to the simulated cache (Anthropic's explicit writes).
    pub written_tokens: AtomicUsize,
    /// The rate limiter's window: (used in it, its number in seconds since the epoch).
    window: Mutex<Option<(f64, f64)>>,
}

impl FakeState {
    /// Reads the behaviour as it is now.
    fn now<T>(&self, read: impl FnOnce(&Behaviour) -> T) -> T {
        read(&self.behaviour.lock().expect("lock"))
    }

    /// Takes one from a count of calls to treat specially, if any is left.
    fn take(&self, count: impl FnOnce(&mut Behaviour) -> &mut usize) -> bool {
        let mut behaviour = self.behaviour.lock().expect("lock");
        let left = count(&mut behaviour);
        let taken = *left > 0;
        *left = left.saturating_sub(1);
        taken
    }
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    _server: JoinHandle<()>,
}

impl FakeUpstream {
    /// A fake that answers every call at once, in full.
    pub async fn start() -> FakeUpstream {
        FakeUpstream::with(Behaviour::default()).await
    }

    /// A fake that behaves as `behaviour` says.
    pub async fn with(behaviour: Behaviour) -> FakeUpstream {
        let state = Arc::new(FakeState {
            behaviour: Mutex::new(behaviour),
            ..FakeState::default()
        });
        let app = Router::new().fallback(answer).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake upstream");
        });
        FakeUpstream {
            addr,
            state,
            _server: server,
        }
    }

    /// Changes how the fake behaves from now on (calls in progress see the change at their
    /// next step).
    pub fn behave(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.state.behaviour.lock().expect("lock"));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An engine in front of this upstream, every other setting at its default.
    pub fn engine(&self) -> DedupBuilder {
        Dedup::builder().upstream(self.url())
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` calls have arrived.
    pub async fn wait_for_calls(&self, n: usize) {
        loop {
            let notified = self.state.arrived.notified();
            if self.calls() >= n {
                return;
            }
            tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .expect("upstream call did not arrive");
        }
    }
}

async fn answer(State(state): State<Arc<FakeState>>, request: Request) -> Response {
    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    *state.last_headers.lock().expect("lock") = Some(parts.headers.clone());
    if !state.now(|b| b.forget_bodies) {
        state.bodies.lock().expect("lock").push(body.clone());
    }
    state.arrived.notify_waiters();
    if state.take(|b| &mut b.hang_calls) {
        // Taken, never answered.
        std::future::pending::<()>().await;
    }
    // What self-hosted servers (vLLM, Ollama, LiteLLM) answer to anyone, key or no key: a
    // health probe, and a CORS preflight.
    if parts.method == axum::http::Method::OPTIONS {
        return Response::builder()
            .status(StatusCode::NO_CONTENT)
            .header("access-control-allow-origin", "*")
            .header("access-control-allow-methods", "GET, POST, OPTIONS")
            .body(Body::empty())
            .expect("preflight");
    }
    if parts.method == axum::http::Method::GET && parts.uri.path() == "/health" {
        return json_answer(StatusCode::OK, &json!({"status": "ok"}), vec![]);
    }

    let now = state.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
    state.peak_in_progress.fetch_max(now, Ordering::SeqCst);
    let delay = state.now(|b| b.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    state.in_progress.fetch_sub(1, Ordering::SeqCst);
    let mut rate_headers: Vec<(&'static str, String)> = vec![
        ("x-ratelimit-limit-requests", "10000".into()),
        ("x-ratelimit-remaining-requests", "9999".into()),
        ("x-ratelimit-reset-requests", "6ms".into()),
    ];
    if state.take(|b| &mut b.absurd_refusals) {
        state.refusals.fetch_add(1, Ordering::SeqCst);
        return refusal(
            rate_limited(),
            vec![
                ("retry-after", "inf".into()),
                ("retry-after-ms", "1e20".into()),
                ("x-ratelimit-limit-requests", "600".into()),
                ("x-ratelimit-remaining-requests", "0".into()),
                ("x-ratelimit-reset-requests", "99999999999999h".into()),
                ("x-ratelimit-limit-tokens", "NaN".into()),
                ("x-ratelimit-remaining-tokens", "NaN".into()),
                ("x-ratelimit-reset-tokens", "1e400s".into()),
            ],
        );
    }
    if state.now(|b| b.quota_exhausted) {
        state.refusals.fetch_add(1, Ordering::SeqCst);
        return refusal(
            json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
            vec![],
        );
    }
    if state.take(|b| &mut b.refuse_next) {
        state.refusals.fetch_add(1, Ordering::SeqCst);
        let style = state.now(|b| b.retry_style);
        let retry = match style {
            RetryStyle::Millis => ("retry-after-ms", "300".to_owned()),
            RetryStyle::Seconds => ("retry-after", "1".to_owned()),
            RetryStyle::HttpDate => (
                "retry-after",
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(1)),
            ),
        };
        return refusal(rate_limited(), vec![retry]);
    }
    let limit = state.now(|b| b.limit_per_sec);
    if limit > 0 {
        let limit = f64::from(limit);
        let window = state.now(|b| b.limit_window);
        // (allowed, remaining after this call, seconds until the budget is whole again)
        let (allowed, remaining, reset) = if window {
            // (used in the window, the window's number): one-second windows on the wall
            // clock's whole seconds, as a limiter counting per second does; a client's first
            // call may come at any point of one.
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs_f64();
            let number = since.floor();
            let mut counted = state.window.lock().expect("lock");
            let used = match *counted {
                Some((used, seen)) if seen == number => used,
                _ => 0.0,
            };
            let allowed = used < limit;
            let used = if allowed { used + 1.0 } else { used };
            *counted = Some((used, number));
            let reset = number + 1.0 - since;
            (allowed, limit - used, reset)
        } else {
            // A bucket refilling continuously, as OpenAI's does.
            let mut limiter = state.limiter.lock().expect("lock");
            let now = std::time::Instant::now();
            let (tokens, at) = limiter.unwrap_or((limit, now));
            let tokens = (tokens + now.duration_since(at).as_secs_f64() * limit).min(limit);
            let allowed = tokens >= 1.0;
            let after = if allowed { tokens - 1.0 } else { tokens };
            *limiter = Some((after, now));
            (allowed, after, (limit - after) / limit)
        };
        let reset_ms = (reset * 1000.0).ceil().max(1.0);
        let mut headers = vec![
            ("x-ratelimit-limit-requests", format!("{limit}")),
            (
                "x-ratelimit-remaining-requests",
                format!("{}", remaining.max(0.0).floor()),
            ),
            ("x-ratelimit-reset-requests", format!("{reset_ms}ms")),
        ];
        if !allowed {
            state.refusals.fetch_add(1, Ordering::SeqCst);
            // A bucket frees its next request sooner than a window resets.
            let wait_ms = if window {
                reset_ms
            } else {
                ((1.0 - remaining) / limit * 1000.0).ceil()
            };
            headers.push(("retry-after-ms", format!("{wait_ms}")));
            return refusal(rate_limited(), headers);
        }
        rate_headers = headers;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let streaming = request.get("stream") == Some(&Value::Bool(true));
    if state.now(|b| b.hold) && !streaming {
        state.release.notified().await;
    }
    let key = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if state.now(|b| b.refused_keys.contains(&key)) {
        // OpenAI's text names the tail of the key it refused.
        let tail = &key[key.len().saturating_sub(4)..];
        return json_answer(
            StatusCode::UNAUTHORIZED,
            &json!({"error": {"message": format!("Incorrect API key provided: sk-***{tail}. You can find your API key at https://platform.openai.com/account/api-keys."),
                "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
            vec![("x-request-id", format!("req_{n}"))],
        );
    }
    let callers = caller_headers(&key);
    if let Some(fail) = state.now(|b| b.fail_status) {
        let status = StatusCode::from_u16(fail).expect("status");
        let (kind, message) = if status.is_server_error() {
            (
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            )
        } else {
            ("invalid_request_error", "Invalid request.")
        };
        return (
            status,
            [
                ("content-type", "application/json"),
                ("x-request-id", "req_err"),
            ],
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
                .to_string(),
        )
            .into_response();
    }

    let (cached, written) = prefill(&state, &key, &body, &request, &parts.uri).await;
    let reported = state.now(|b| b.reported_model.clone());
    let model = reported.unwrap_or_else(|| {
        request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-4o-mini")
            .to_owned()
    });
    let path = parts.uri.path().to_owned();
    if streaming {
        let usage = request.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        let mut events = stream_events(n, &path, &model, usage);
        let (extra, size) = state.now(|b| (b.extra_events, b.big_event_bytes.max(1)));
        if extra > 0 && path == "/v1/chat/completions" {
            let filler: String = "x".repeat(size);
            let big = format!(
                "data: {}\n\n",
                json!({"id": format!("chatcmpl-{n}"), "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"content": filler}, "finish_reason": null}]})
            );
            let at = events.len() - 2;
            events.splice(at..at, std::iter::repeat_n(big, extra));
        }
        let unterminated = state.now(|b| b.unterminated_bytes);
        let mut end = None;
        if unterminated > 0 {
            // An event that never ends, sent with the first (before any hold), then nothing.
            events.truncate(1);
            events[0].push_str("data: ");
            events[0].push_str(&"x".repeat(unterminated));
            end = Some(StreamEnd::Closed);
        }
        return stream(state, n, events, end, callers);
    }
    let mut body = match path.as_str() {
        p if p.ends_with("/chat/completions") => json!({
            "id": format!("chatcmpl-{n}"), "object": "chat.completion", "created": 1_700_000_000,
            "model": model, "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {n}")},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
        }),
        "/v1/completions" => json!({
            "id": format!("cmpl-{n}"), "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": format!("text {n}"), "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        }),
        p if p.ends_with("/embeddings") => {
            return embeddings(&state, &request, &model, rate_headers);
        }
        "/v1/responses" => json!({
            "id": format!("resp_{n}"), "object": "response", "status": "completed", "model": model,
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": format!("resp {n}")}]}],
            "usage": {"input_tokens": 8, "output_tokens": 2, "total_tokens": 10},
            // The Responses object echoes these request fields back.
            "metadata": request.get("metadata").cloned().unwrap_or(json!({})),
            "user": request.get("user").cloned().unwrap_or(Value::Null),
            "safety_identifier": request.get("safety_identifier").cloned().unwrap_or(Value::Null),
            "prompt_cache_key": request.get("prompt_cache_key").cloned().unwrap_or(Value::Null),
            "prompt_cache_retention": request.get("prompt_cache_retention").cloned().unwrap_or(Value::Null),
            "store": request.get("store").cloned().unwrap_or(Value::Bool(true))
        }),
        "/v1/messages" => json!({
            "id": format!("msg_{n}"), "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": format!("message {n}")}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 5}
        }),
        "/v1/moderations" => json!({
            "id": format!("modr-{n}"), "model": "omni-moderation-latest",
            "results": [{"flagged": false, "categories": {}, "category_scores": {}}]
        }),
        "/v1/models" => {
            json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}],
                               "call": n})
        }
        _ => json!({"path": path, "call": n, "received_bytes": body.len()}),
    };
    let padding = state.now(|b| b.padding_bytes);
    if padding > 0 && body.get("choices").is_some() {
        body["padding"] = Value::String("p".repeat(padding));
    }
    if state.now(|b| b.prefill_per_ktok.is_some()) && body.get("usage").is_some() {
        if path.ends_with("/messages") {
            body["usage"]["cache_read_input_tokens"] = json!(cached);
            body["usage"]["cache_creation_input_tokens"] = json!(written);
        } else {
            body["usage"]["prompt_tokens_details"] = json!({"cached_tokens": cached});
        }
    }
    if let Some(usage) = state.now(|b| b.usage.clone())
        && body.get("usage").is_some()
    {
        body["usage"] = usage;
    }
    rate_headers.extend([
        ("x-request-id", format!("req_{n}")),
        ("openai-processing-ms", "42".to_owned()),
    ]);
    rate_headers.extend(callers);
    json_answer(StatusCode::OK, &body, rate_headers)
}

/// The headers OpenAI's answers carry about the caller whose key is `key`: a cookie, its
/// organization and project (named here after the key's tail, so a test can tell whose they are).
pub fn caller_headers(key: &str) -> Vec<(&'static str, String)> {
    let tail: String = key.chars().filter(char::is_ascii_alphanumeric).collect();
    let tail = &tail[tail.len().saturating_sub(4)..];
    vec![
        (
            "set-cookie",
            format!("__cf_bm=cookie-{tail}; path=/; HttpOnly"),
        ),
        ("openai-organization", format!("org-{tail}")),
        ("openai-project", format!("proj_{tail}")),
    ]
}

/// Most inputs and tokens the fake accepts in one embeddings request, as OpenAI does.
pub const EMBED_MAX_INPUTS: usize = 2048;
pub const EMBED_MAX_TOKENS: usize = 300_000;
/// The most tokens one input may have (text-embedding-3-*).
pub const EMBED_MAX_INPUT_TOKENS: usize = 8192;

/// The fake's token count of an input: one per word of a text, one per id of a token array.
pub fn fake_tokens(input: &Value) -> usize {
    match input {
        Value::String(s) => s.split_whitespace().count().max(1),
        Value::Array(a) => a.len(),
        _ => 1,
    }
}

/// The embedding the fake gives an input, as the JSON text it sends: three numbers derived
/// from the input, spelled with trailing zeros (a re-serialized value would lose them), or
/// their little-endian `f32` bytes in base64.
pub fn fake_embedding(input: &Value, base64: bool) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input.to_string().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let values: Vec<f32> = (0..3)
        .map(|i| ((h >> (i * 16)) & 0xffff) as f32 / 65536.0 - 0.5)
        .collect();
    if base64 {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        format!("\"{}\"", base64_encode(&bytes))
    } else {
        let spelled: Vec<String> = values.iter().map(|v| format!("{v:.10}")).collect();
        format!("[{}]", spelled.join(", "))
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An OpenAI-style `400`/`404` error answer.
fn invalid(status: StatusCode, message: &str, code: Value) -> Response {
    json_answer(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}}),
        vec![("x-request-id", "req_invalid".to_owned())],
    )
}

/// The simulated prompt cache ([`Behaviour::prefill_per_ktok`]): waits out the prefill of a
/// request by organization `key`, then makes its prefix readable (its first byte is about to
/// go out), and gives the tokens read from the cache and written to it. Chat completions as
/// OpenAI caches them (the first message, automatically); Anthropic messages at a
/// `cache_control` breakpoint on the last system block (a write is reported as such).
async fn prefill(
    state: &FakeState,
    key: &str,
    body: &[u8],
    request: &Value,
    uri: &axum::http::Uri,
) -> (usize, usize) {
    let Some(per_ktok) = state.now(|b| b.prefill_per_ktok) else {
        return (0, 0);
    };
    let path = uri.path();
    let (prefix, explicit) = if path.ends_with("/chat/completions") {
        (request.pointer("/messages/0"), false)
    } else if path.ends_with("/messages") {
        let marked = request
            .get("system")
            .and_then(Value::as_array)
            .and_then(|blocks| blocks.last())
            .is_some_and(|block| block.get("cache_control").is_some());
        (request.get("system").filter(|_| marked), true)
    } else {
        return (0, 0);
    };
    let prompt = body.len() / 4;
    let prefix = prefix.map(Value::to_string).unwrap_or_default();
    let prefix_tokens = prefix.len() / 4;
    let cacheable = prefix_tokens >= 1024;
    let digest = *blake3::hash(prefix.as_bytes()).as_bytes();
    let entry = (key.to_owned(), digest);
    let hit = cacheable && state.readable.lock().expect("lock").contains(&entry);
    let cached = match (hit, explicit) {
        (false, _) => 0,
        (true, false) => prefix_tokens / 128 * 128,
        (true, true) => prefix_tokens,
    };
    let written = if cacheable && !hit && explicit {
        prefix_tokens
    } else {
        0
    };
    let work = per_ktok.mul_f64(prompt.saturating_sub(cached) as f64 / 1000.0)
        + per_ktok.mul_f64(cached as f64 / 10_000.0);
    tokio::time::sleep(work).await;
    if cacheable {
        state.readable.lock().expect("lock").insert(entry);
    }
    state.prompt_tokens.fetch_add(prompt, Ordering::SeqCst);
    state.cached_tokens.fetch_add(cached, Ordering::SeqCst);
    state.written_tokens.fetch_add(written, Ordering::SeqCst);
    (cached, written)
}

/// Answers an embeddings request as OpenAI does: one embedding per input at its `index`,
/// `usage` summing the inputs' tokens, and its errors for inputs it does not accept.
fn embeddings(
    state: &FakeState,
    request: &Value,
    model: &str,
    mut headers: Vec<(&'static str, String)>,
) -> Response {
    if model == "missing-model" {
        return invalid(
            StatusCode::NOT_FOUND,
            "The model `missing-model` does not exist or you do not have access to it.",
            json!("model_not_found"),
        );
    }
    let input = request.get("input").cloned().unwrap_or(Value::Null);
    let inputs: Vec<Value> = match &input {
        Value::String(s) if !s.is_empty() => vec![input.clone()],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_u64) => vec![input.clone()],
        Value::Array(a)
            if !a.is_empty()
                && (a.iter().all(|v| v.as_str().is_some_and(|s| !s.is_empty()))
                    || a.iter().all(|v| {
                        v.as_array()
                            .is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_u64))
                    })) =>
        {
            a.clone()
        }
        _ => {
            return invalid(
                StatusCode::BAD_REQUEST,
                "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
                Value::Null,
            );
        }
    };
    if inputs.len() > EMBED_MAX_INPUTS {
        return invalid(
            StatusCode::BAD_REQUEST,
            &format!("'$.input' is invalid: at most {EMBED_MAX_INPUTS} inputs"),
            Value::Null,
        );
    }
    if let Some(long) = inputs
        .iter()
        .map(fake_tokens)
        .find(|n| *n > EMBED_MAX_INPUT_TOKENS)
    {
        // One input over the model's context fails the whole call, whatever the others are.
        return invalid(
            StatusCode::BAD_REQUEST,
            &format!(
                "This model's maximum context length is {EMBED_MAX_INPUT_TOKENS} tokens, however \
                 you requested {long} tokens ({long} in your prompt; 0 for the completion). \
                 Please reduce your prompt; or completion length."
            ),
            Value::Null,
        );
    }
    let tokens: usize = inputs.iter().map(fake_tokens).sum();
    if tokens > EMBED_MAX_TOKENS {
        return invalid(
            StatusCode::BAD_REQUEST,
            &format!("Requested {tokens} tokens, max {EMBED_MAX_TOKENS} tokens per request"),
            json!("max_tokens_per_request"),
        );
    }
    state.embed_inputs.fetch_add(inputs.len(), Ordering::SeqCst);
    let base64 = request.get("encoding_format") == Some(&json!("base64"));
    let answered = if state.now(|b| b.embed_drop_last) {
        inputs.len() - 1
    } else {
        inputs.len()
    };
    let data: Vec<String> = inputs[..answered]
        .iter()
        .enumerate()
        .map(|(i, input)| {
            format!(
                r#"{{"object": "embedding", "index": {i}, "embedding": {}}}"#,
                fake_embedding(input, base64)
            )
        })
        .collect();
    let body = format!(
        r#"{{"object": "list", "data": [{}], "model": {}, "usage": {{"prompt_tokens": {tokens}, "total_tokens": {tokens}}}}}"#,
        data.join(", "),
        Value::from(model)
    );
    let n = state.calls.load(Ordering::SeqCst);
    headers.extend([
        ("x-request-id", format!("req_{n}")),
        ("openai-processing-ms", "42".to_owned()),
        ("content-type", "application/json".to_owned()),
    ]);
    let mut response = (StatusCode::OK, body).into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    response
}

/// A JSON answer with `headers` added.
fn json_answer(status: StatusCode, body: &Value, headers: Vec<(&'static str, String)>) -> Response {
    let mut response = (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    response
}

fn rate_limited() -> Value {
    json!({"error": {"message": "Rate limit reached for gpt-4o-mini in organization org-test on requests per min (RPM): Limit 600, Used 600, Requested 1. Please try again in 100ms.",
        "type": "requests", "param": null, "code": "rate_limit_exceeded"}})
}

/// A 429 as OpenAI sends it, with `headers` added.
fn refusal(body: Value, headers: Vec<(&'static str, String)>) -> Response {
    json_answer(StatusCode::TOO_MANY_REQUESTS, &body, headers)
}

/// The events of a streamed answer in the framing of `path`, as the real APIs send them.
pub fn stream_events(n: usize, path: &str, model: &str, usage: bool) -> Vec<String> {
    let named = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    match path {
        "/v1/responses" => vec![
            named(
                "response.created",
                json!({"type": "response.created", "sequence_number": 0,
                "response": {"id": format!("resp_{n}"), "status": "in_progress", "error": null}}),
            ),
            named(
                "response.output_text.delta",
                json!({"type": "response.output_text.delta",
                "sequence_number": 1, "delta": "Hel"}),
            ),
            // An event type this proxy does not know: kept and replayed as it came.
            named(
                "response.x_future_event",
                json!({"type": "response.x_future_event",
                "sequence_number": 2}),
            ),
            named(
                "response.output_text.delta",
                json!({"type": "response.output_text.delta",
                "sequence_number": 3, "delta": "lo"}),
            ),
            named(
                "response.completed",
                json!({"type": "response.completed", "sequence_number": 4,
                "response": {"id": format!("resp_{n}"), "status": "completed",
                             "usage": {"input_tokens": 8, "output_tokens": 2, "total_tokens": 10}}}),
            ),
        ],
        "/v1/messages" => vec![
            named(
                "message_start",
                json!({"type": "message_start", "message": {"id": format!("msg_{n}"),
                "model": model, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
            ),
            named(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            named("ping", json!({"type": "ping"})),
            named(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"}}),
            ),
            named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            named(
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
            ),
            named("message_stop", json!({"type": "message_stop"})),
        ],
        _ => {
            let chunk = |delta: Value, finish: Value| {
                format!(
                    "data: {}\n\n",
                    json!({"id": format!("chatcmpl-{n}"),
                    "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                )
            };
            let mut events = vec![
                chunk(json!({"role": "assistant", "content": "Hel"}), Value::Null),
                chunk(json!({"content": "lo"}), Value::Null),
                chunk(json!({}), json!("stop")),
            ];
            if usage {
                events.push(format!(
                    "data: {}\n\n",
                    json!({"id": format!("chatcmpl-{n}"),
                    "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})
                ));
            }
            events.push("data: [DONE]\n\n".to_owned());
            events
        }
    }
}

/// A streamed answer: the first event at once; the rest after `release` when `hold` is set
/// (so a test can prove the first event arrived before the stream ended), `chunk_delay`
/// apart; ended as `end` says, or else as the behaviour's `stream_end` says.
fn stream(
    state: Arc<FakeState>,
    n: usize,
    events: Vec<String>,
    end: Option<StreamEnd>,
    callers: Vec<(&'static str, String)>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut events = events.into_iter();
        if let Some(first) = events.next() {
            let _ = tx.send(Ok(Bytes::from(first))).await;
        }
        if state.now(|b| b.silent_streams) {
            // The connection stays open; nothing more comes.
            let _keep = tx;
            std::future::pending::<()>().await;
            return;
        }
        if state.now(|b| b.hold) {
            state.release.notified().await;
        }
        match end.unwrap_or_else(|| state.now(|b| b.stream_end)) {
            StreamEnd::Cut => {
                let _ = tx
                    .send(Err(std::io::Error::other("connection dropped")))
                    .await;
                return;
            }
            StreamEnd::ErrorEvent => {
                let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
                let _ = tx.send(Ok(Bytes::from_static(error.as_bytes()))).await;
            }
            StreamEnd::Complete | StreamEnd::Closed => {}
        }
        for event in events {
            let delay = state.now(|b| b.chunk_delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = tx.send(Ok(Bytes::from(event))).await;
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("x-request-id", format!("req_{n}"));
    for (name, value) in callers {
        response = response.header(name, value);
    }
    response.body(Body::from_stream(body)).expect("response")
}
