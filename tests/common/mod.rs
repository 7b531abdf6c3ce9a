//! Test support: a fake OpenAI upstream ([`fake`]), a real `redis-server`
//! ([`redis_server`]), a proxy started on a real port, and helpers that wait on what can be
//! observed instead of sleeping.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::body::Bytes;
use llm_dedup::server::EdgeLimits;
use llm_dedup::{Dedup, DedupBuilder};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod fake;
pub mod fleet;
mod http;
mod redis_cluster;
mod redis_server;
pub mod tls;
#[allow(unused_imports)] // Each test uses some.
pub use fake::{
    Behaviour, EMBED_MAX_INPUT_TOKENS, EMBED_MAX_INPUTS, EMBED_MAX_TOKENS, FakeState, FakeUpstream,
    RetryStyle, StreamEnd, caller_headers, fake_embedding, fake_tokens, stream_events,
};
#[allow(unused_imports)] // Only the tests and benches of the fleet start one.
pub use redis_cluster::RedisCluster;
#[allow(unused_imports)]
pub use redis_server::{RedisServer, poll_blocking};

/// Waits until `condition` (an async one) holds, looking every 10 ms; fails the test after
/// 10 s.
pub async fn eventually_async<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the condition did not hold within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `n` requests wait on flights of `engine` (their own or one they joined).
pub async fn waiting(engine: &Dedup, n: usize) {
    eventually(|| engine.waiting() >= n).await;
}

/// The value of a sample in Prometheus text: `name` as written, labels included
/// (`llm_dedup_clients_refused_total{reason="max_connections"}`).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// The value of a sample in `engine`'s metrics (see [`sample`]).
pub async fn figure(engine: &Dedup, name: &str) -> f64 {
    sample(&engine.metrics_text().await, name)
}

/// Waits until the sample `name` in `engine`'s metrics is `value` (see [`eventually`]).
pub async fn figure_becomes(engine: &Dedup, name: &str, value: f64) {
    eventually_async(|| async { figure(engine, name).await == value }).await;
}

/// Waits until `condition` holds, looking every 10 ms; fails the test after 10 s.
pub async fn eventually(mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the condition did not hold within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The proxy, serving on a real port until stopped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub engine: Dedup,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start(builder: DedupBuilder) -> Proxy {
        Proxy::start_with(builder, EdgeLimits::default()).await
    }

    /// A proxy whose edge has `limits`.
    pub async fn start_with(builder: DedupBuilder, limits: EdgeLimits) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        Proxy::serve(listener, builder, limits)
    }

    /// A replica of a fleet (`builder` has a Redis) that tells the others where it is.
    pub async fn advertised(builder: DedupBuilder) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        Proxy::serve(
            listener,
            builder.advertise(format!("http://{addr}")),
            EdgeLimits::default(),
        )
    }

    fn serve(
        listener: tokio::net::TcpListener,
        builder: DedupBuilder,
        limits: EdgeLimits,
    ) -> Proxy {
        let engine = builder.build().expect("engine");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(llm_dedup::server::serve(
            listener,
            engine.clone(),
            llm_dedup::server::OperatorAccess::loopback_only(),
            limits,
            async move {
                let _ = stopped.await;
            },
        ));
        Proxy {
            addr,
            engine,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// A proxy in front of `upstream`, every setting at its default (no database).
    pub async fn over(upstream: &FakeUpstream) -> Proxy {
        Proxy::start(upstream.engine()).await
    }

    /// A proxy in front of `upstream` with a database at `db`.
    pub async fn with_db(upstream: &FakeUpstream, db: &Path) -> Proxy {
        Proxy::start(upstream.engine().database(db)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful stop: drains requests and flushes the database.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("clean stop");
        }
    }
}

/// What a client sees of one answer.
#[derive(Debug)]
pub struct Seen {
    pub status: u16,
    pub cache: String,
    pub key: Option<String>,
    pub age: Option<u64>,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub raw: Bytes,
}

pub use http::client_builder;

/// A loopback port free a moment ago, for a server the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn client() -> reqwest::Client {
    client_builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> Seen {
    let mut req = client.post(url).header("content-type", "application/json");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        req = req.header("authorization", "Bearer sk-test-key-1");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    seen(req.body(body).send().await.expect("request sent")).await
}

pub async fn seen(resp: reqwest::Response) -> Seen {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let cache = get("llm-dedup-cache").unwrap_or_default();
    let key = get("llm-dedup-key");
    let age = get("age").and_then(|a| a.parse().ok());
    let raw = resp.bytes().await.expect("body");
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Seen {
        status,
        cache,
        key,
        age,
        headers,
        body,
        raw,
    }
}

pub fn chat(content: &str) -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).to_string()
}

/// The `llm-dedup` binary, with no `LLM_DEDUP_*` setting leaking in from the environment.
pub fn llm_dedup() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llm-dedup"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LLM_DEDUP_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs the binary to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = llm_dedup().args(args).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A proxy process with its stderr collected line by line.
pub struct Running {
    pub child: std::process::Child,
    pub addr: String,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// What was logged before the proxy said it was ready.
    pub start_log: Vec<String>,
}

/// Starts `llm-dedup serve` on a free port with `db`, in front of `upstream`, debug logging on.
pub fn start_proxy(db: &std::path::Path, upstream: &str) -> Running {
    start_proxy_with(db, upstream, &["--listen", "127.0.0.1:0"])
}

/// Starts `llm-dedup serve` with `db`, in front of `upstream`, with `args` (which name the
/// address to listen on), debug logging on.
pub fn start_proxy_with(db: &std::path::Path, upstream: &str, args: &[&str]) -> Running {
    start_proxy_command(llm_dedup(), db, upstream, args)
}

/// As [`start_proxy_with`], from `command` (the binary, with an environment of its own).
pub fn start_proxy_command(
    mut command: std::process::Command,
    db: &std::path::Path,
    upstream: &str,
    args: &[&str],
) -> Running {
    let mut child = command
        .args(["serve", "--upstream", upstream])
        .args(args)
        .arg("--db")
        .arg(db)
        .env("RUST_LOG", "llm_dedup=debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut start_log = Vec::new();
    let ready = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("proxy starts");
        if line.contains("proxy ready") {
            break line;
        }
        start_log.push(line);
    };
    let addr = ready
        .split("listen=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {ready:?}"))
        .to_owned();
    Running {
        child,
        addr,
        lines,
        start_log,
    }
}

impl Running {
    /// Sends SIGTERM and returns (exit code, everything logged).
    pub fn terminate(self) -> (i32, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `signal` and returns (exit code, everything logged).
    pub fn signal(mut self, signal: nix::sys::signal::Signal) -> (i32, String) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal");
        let status = self.child.wait().expect("wait");
        let mut log = std::mem::take(&mut self.start_log);
        log.extend(self.lines.try_iter());
        (status.code().unwrap_or(-1), log.join("\n"))
    }
}
