//! The fleet's connection to Redis and its fault rule.
//!
//! Every call has a short timeout ([`OP_TIMEOUT`]). A failure is counted
//! (`llm_dedup_redis_errors_total`), logged at most once a minute, and turns Redis off for
//! [`BACKOFF`]: meanwhile each replica uses its own tiers and flights only, and then tries
//! again (the connection reconnects by itself). No request fails because Redis did: a call
//! that cannot be made answers [`Unavailable`], and its caller goes on alone.

use std::future::Future;
use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::topology::{self, Conn};
use super::{Fleet, Unavailable};

/// Longest wait for one Redis call.
pub const OP_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest wait to connect.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis is left alone after a failure.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// Where a Redis URL (`redis://`, `rediss://`, `unix://`) points, as the client reads it
/// (nothing is connected): its host and port, or `None` for a Unix socket; an error naming
/// why for anything that is not a Redis URL.
pub fn redis_address(url: &str) -> Result<Option<(String, u16)>, String> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| format!("not a Redis URL: {e}"))?;
    Ok(match info.addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    })
}

/// Makes sure `rediss://` can speak TLS. redis-rs builds its rustls configuration on the
/// process-wide crypto provider: it installs ring itself when ring is the only provider built
/// in, and panics when the program also has aws-lc-rs (reqwest's default `rustls` feature
/// brings it) and has installed none. So, for a `rediss://` URL and no provider installed,
/// ring is installed first, as redis-rs would; a program's own choice is left alone.
pub(super) fn provide_tls(url: &str) {
    let tls = url
        .get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"));
    if tls && rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error says another thread installed one meanwhile, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Whether `error` is Redis's answer about a value it holds (of another type than the fleet
/// writes there, or one a script could not read), rather than a fault of Redis or of the
/// way to it: a value someone else wrote, which must not turn Redis off for the replica.
fn about_a_value(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match error.kind() {
        // WRONGTYPE, and any other error code the client library has no name for.
        ErrorKind::Extension => error.code().is_some_and(|code| code == "WRONGTYPE"),
        // A script's own error (`ERR user_script:…`), or a reply of another shape.
        ErrorKind::Server(ServerErrorKind::ResponseError) => error.to_string().contains("script"),
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse => true,
        _ => false,
    }
}

impl Fleet {
    /// Redis calls that failed or timed out.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Runs one Redis call with the connection, under [`OP_TIMEOUT`]; a failure is counted,
    /// logged at most once a minute, and turns Redis off for [`BACKOFF`].
    pub(super) async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // Whoever uses the fleet's tier hears what the other replicas replace or purge.
        self.subscribe();
        let conn = self.connection().await?;
        match tokio::time::timeout(OP_TIMEOUT, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if about_a_value(&e) => {
                // Redis answered: what it holds under this key is not what a replica wrote
                // there (a value of another type, a number that is not one). This call goes
                // without Redis; the replica's other requests keep it.
                tracing::debug!(call = what, error = %e, "a value in Redis is not the fleet's");
                self.rejected(super::seal::Rejected::Malformed);
                Err(Unavailable)
            }
            Ok(Err(e)) => {
                self.failed(what, &e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(what, "timed out");
                Err(Unavailable)
            }
        }
    }

    /// Runs `script` (its hash computed once) with the keys and arguments `fill` adds, as one
    /// call under the rules of [`Fleet::call`].
    pub(super) async fn run_script<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &'static LazyLock<redis::Script>,
        fill: impl FnOnce(&mut redis::ScriptInvocation<'static>),
    ) -> Result<T, Unavailable> {
        let mut invocation = script.prepare_invoke();
        fill(&mut invocation);
        self.call(what, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// The shared connection, made on first use; [`Unavailable`] while Redis is left alone.
    pub(super) async fn connection(&self) -> Result<Conn, Unavailable> {
        let down = self.inner.down_until.lock().ok().and_then(|d| *d);
        if down.is_some_and(|until| Instant::now() < until) {
            return Err(Unavailable);
        }
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        // Another caller's attempt, made while this one queued for the lock, may have failed:
        // each queued caller must not try again in turn.
        let down = self.inner.down_until.lock().ok().and_then(|d| *d);
        if down.is_some_and(|until| Instant::now() < until) {
            return Err(Unavailable);
        }
        let made = tokio::time::timeout(CONNECT_TIMEOUT * 2, async {
            let cluster = self.cluster().await?;
            Conn::open(&self.inner.client, cluster).await
        })
        .await;
        match made {
            Ok(Ok(conn)) => {
                *slot = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.failed("connect", &e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed("connect", "timed out");
                Err(Unavailable)
            }
        }
    }

    /// Whether the fleet's Redis is a cluster: as `--redis-mode` says, or as its node says
    /// the first time it is asked (then logged, once).
    pub(super) async fn cluster(&self) -> redis::RedisResult<bool> {
        if let Some(cluster) = self.inner.cluster.get() {
            return Ok(*cluster);
        }
        let cluster = topology::is_cluster(&self.inner.client, self.inner.mode).await?;
        self.learned(cluster);
        Ok(cluster)
    }

    /// As [`Fleet::cluster`], blocking.
    pub(super) fn cluster_blocking(&self) -> redis::RedisResult<bool> {
        if let Some(cluster) = self.inner.cluster.get() {
            return Ok(*cluster);
        }
        let cluster = topology::is_cluster_blocking(&self.inner.client, self.inner.mode)?;
        self.learned(cluster);
        Ok(cluster)
    }

    fn learned(&self, cluster: bool) {
        if self.inner.cluster.set(cluster).is_ok() {
            tracing::info!(
                redis = %self.inner.shown,
                mode = if cluster { "cluster" } else { "single node" },
                asked = self.inner.mode.as_str(),
                "the fleet's Redis"
            );
        }
    }

    /// Connects now (at start-up, so the mode is known and logged before the first request),
    /// under the fault rule.
    pub async fn connect(&self) -> Result<(), Unavailable> {
        self.connection().await.map(|_| ())
    }

    /// Counts a failed call, logs it at most once a minute, and leaves Redis alone for
    /// [`BACKOFF`].
    pub(super) fn failed(&self, what: &str, error: &str) {
        if let Ok(mut down) = self.inner.down_until.lock() {
            *down = Some(Instant::now() + BACKOFF);
        }
        self.count_failure(what, error);
    }

    /// Counts a failed call and logs it at most once a minute, leaving Redis on: for a call on
    /// a connection of its own (a followed stream's), whose failure says nothing of the
    /// shared connection the replica's other requests use.
    pub(super) fn count_failure(&self, what: &str, error: &str) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(held) = self.inner.gate.open() {
            tracing::warn!(
                call = what,
                error,
                failures_since_last_line = held,
                "Redis call failed; this replica uses its own tiers, flights and budget until \
                 Redis answers again"
            );
        }
    }
}
