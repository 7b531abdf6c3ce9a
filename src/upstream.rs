//! The upstream client: how a request that must reach the provider gets there.
//!
//! This module owns the pooled `reqwest` client, the join of the upstream base URL with a
//! request path, and the header rules of a forwarding proxy (hop-by-hop headers never cross;
//! credential headers go through as received and nowhere else). It never logs a header.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Method;
use http::header::{self, HeaderMap, HeaderName};

use crate::error::{Error, ErrorKind};
use crate::headers::{HOP_BY_HOP, NAMESPACE_HEADER, OWN_PREFIX, TTL_HEADER};
use crate::metrics::{TimeoutCounters, TimeoutLabels};

/// Timeouts of the upstream calls. A call that runs past one fails like an unreachable
/// upstream would (retried within the governor's retry budget, then a `504`), and nothing of
/// it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Limit on establishing a connection (TCP and TLS).
    pub connect: Duration,
    /// Limit on the time from sending a request to the first byte of its answer (its status
    /// and headers). A non-streamed answer of a reasoning model comes whole after minutes of
    /// thinking, so this is long.
    pub first_byte: Duration,
    /// Limit on silence once an answer has started: between two chunks of its body or stream.
    pub idle: Duration,
}

impl Default for Timeouts {
    /// 10 s to connect, 10 min to the first byte (the official SDKs' own timeout), 5 min of
    /// silence in an answer.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(600),
            idle: Duration::from_secs(300),
        }
    }
}

impl Timeouts {
    /// The limit on establishing a connection. By default, 10 s.
    #[must_use]
    pub fn connect(mut self, timeout: Duration) -> Self {
        self.connect = timeout;
        self
    }

    /// The limit on the time to an answer's first byte. By default, 10 min.
    #[must_use]
    pub fn first_byte(mut self, timeout: Duration) -> Self {
        self.first_byte = timeout;
        self
    }

    /// The limit on silence once an answer has started. By default, 5 min.
    #[must_use]
    pub fn idle(mut self, timeout: Duration) -> Self {
        self.idle = timeout;
        self
    }
}

/// Which of the [`Timeouts`] fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutKind {
    Connect,
    FirstByte,
    Idle,
}

impl TimeoutKind {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Connect => "connect",
            TimeoutKind::FirstByte => "first_byte",
            TimeoutKind::Idle => "idle",
        }
    }
}

/// A caller's own HTTP client, put in a request's extensions (`http::Request::extensions`) by
/// the middleware: the engine sends that caller's requests with it, so the client's default
/// headers, proxy, TLS settings and timeouts apply. Its callers' credential partition is
/// derived with `id` (`Partition::of_client`: their requests may carry their credential only
/// as a default header of the client, which the engine never sees), so two clients never
/// share answers (unless the engine's cache is shared by design) or budgets.
#[derive(Clone)]
pub(crate) struct CallerClient {
    pub(crate) client: CallerTransport,
    pub(crate) id: [u8; 16],
}

/// What a caller's requests go upstream with.
#[derive(Clone)]
pub(crate) enum CallerTransport {
    /// Its reqwest client (the middleware's `with_client`).
    #[cfg_attr(not(feature = "middleware"), allow(dead_code))]
    Client(reqwest::Client),
    /// Its own tower service (`DedupLayer`'s inner service), behind one boxed call.
    Service(ServiceCall),
}

/// A caller's tower service, as one call from an `http::Request` to a reqwest response.
pub(crate) type ServiceCall = std::sync::Arc<
    dyn Fn(
            http::Request<reqwest::Body>,
        ) -> futures_util::future::BoxFuture<
            'static,
            Result<reqwest::Response, Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + Sync,
>;

/// The failure a caller's service answered with.
#[derive(Debug, thiserror::Error)]
#[error("the service failed")]
struct ServiceFailed(#[source] Box<dyn std::error::Error + Send + Sync>);

/// A pooled HTTP client bound to one upstream base URL.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    /// The base as a URL, to tell whether an absolute URL lies under it.
    base_url: reqwest::Url,
    /// Where requests go (may hold a password).
    request_base: String,
    /// What logs, keys and errors name (never holds a password).
    shown_base: String,
    timeouts: Timeouts,
    /// Timeouts that fired, by kind (the `llm_dedup_upstream_timeouts_total` counter).
    timed_out: TimeoutCounters,
}

/// The TLS of the engine's own client: rustls on the ring provider, offering HTTP/2 then
/// HTTP/1.1, and trusting Mozilla's root certificates (webpki-roots, compiled in, so a
/// container without a CA bundle still reaches the provider) and the system's (or those
/// `SSL_CERT_FILE` or `SSL_CERT_DIR` name instead: a private CA, or an egress proxy that
/// inspects TLS). reqwest takes it whole: no process-wide crypto provider is needed, and none
/// is installed (the program's own choice stays its own). Each client has a configuration of
/// its own (its own TLS sessions); the certificates are read once per process.
fn tls() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        // ring supports every default version: this cannot fail.
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
        .with_root_certificates(Arc::clone(roots()))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// Mozilla's root certificates and the system's, read at the first call. Certificates the
/// system's store holds but rustls cannot parse are skipped; a store named by `SSL_CERT_FILE`
/// or `SSL_CERT_DIR` that cannot be read is logged as a warning (a mistyped path would
/// otherwise show only later, as an upstream whose certificate is not trusted).
fn roots() -> &'static Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let system = rustls_native_certs::load_native_certs();
        let (added, skipped) = roots.add_parsable_certificates(system.certs);
        let named = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
            .into_iter()
            .any(|name| std::env::var_os(name).is_some());
        if named && let Some(error) = system.errors.first() {
            tracing::warn!(
                error = %error,
                added,
                "cannot read all the certificates SSL_CERT_FILE or SSL_CERT_DIR name: only \
                 those read and Mozilla's roots are trusted for the upstream"
            );
        } else {
            tracing::debug!(added, skipped, "read the system's root certificates");
        }
        Arc::new(roots)
    })
}

impl Upstream {
    /// A client for `base` (an `http` or `https` URL, optionally with a path prefix).
    pub fn new(base: &str, timeouts: Timeouts) -> Result<Upstream, Error> {
        let url = reqwest::Url::parse(base).map_err(|e| {
            Error::with_source(
                ErrorKind::Cache,
                format!("upstream {base:?} is not a URL"),
                e,
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::new(
                ErrorKind::Cache,
                format!("upstream {base:?} must be an http:// or https:// URL with a host"),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Error::new(
                ErrorKind::Cache,
                format!("upstream {base:?} must not have a query or fragment"),
            ));
        }
        let mut shown = url.clone();
        // Never show a password that an operator put in the URL.
        let _ = shown.set_password(None);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls())
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // Follow no redirects: a proxy passes them on.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::with_source(ErrorKind::Cache, "cannot build the HTTP client", e))?;
        Ok(Upstream {
            client,
            base_url: url.clone(),
            request_base: url.as_str().trim_end_matches('/').to_owned(),
            shown_base: shown.as_str().trim_end_matches('/').to_owned(),
            timeouts,
            timed_out: TimeoutCounters::default(),
        })
    }

    /// The timeouts of its calls.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Counts the timeouts that fire in `counters` (the engine's metric).
    pub(crate) fn counting_timeouts(mut self, counters: TimeoutCounters) -> Upstream {
        self.timed_out = counters;
        self
    }

    /// The base URL, without a trailing slash and without any password.
    pub fn base(&self) -> &str {
        &self.shown_base
    }

    /// The upstream as a cache key names it: the base URL as shown, and, when the URL carries
    /// credentials (a gateway may route or bill by them), their keyed hash under `salt`, so
    /// that two passwords never share entries and no password can be read back from a key.
    pub fn identity(&self, salt: &[u8; 32]) -> String {
        let (user, password) = (self.base_url.username(), self.base_url.password());
        if user.is_empty() && password.is_none() {
            return self.shown_base.clone();
        }
        let mut credentials = Vec::new();
        credentials.extend_from_slice(user.as_bytes());
        credentials.push(b':');
        credentials.extend_from_slice(password.unwrap_or("").as_bytes());
        let digest = blake3::keyed_hash(salt, &credentials);
        format!("{} credentials {}", self.shown_base, digest.to_hex())
    }

    /// The path and query of `url` relative to the base, if `url` lies under it (same scheme,
    /// host and port, and a path that continues the base path).
    pub fn relative(&self, url: &reqwest::Url) -> Option<String> {
        let base = &self.base_url;
        if url.scheme() != base.scheme()
            || url.host_str() != base.host_str()
            || url.port_or_known_default() != base.port_or_known_default()
        {
            return None;
        }
        let prefix = base.path().trim_end_matches('/');
        let rest = url.path().strip_prefix(prefix)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let rest = if rest.is_empty() { "/" } else { rest };
        Some(match url.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        })
    }

    /// Sends a request (with the caller's own client `via`, if it gave one, else the
    /// engine's) and returns as soon as the answer's status and headers arrive.
    pub async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: reqwest::Body,
        via: Option<&CallerClient>,
    ) -> Result<reqwest::Response, Error> {
        let url = format!("{}{}", self.request_base, path_and_query);
        let client = match via.map(|caller| &caller.client) {
            None => &self.client,
            Some(CallerTransport::Client(client)) => client,
            Some(CallerTransport::Service(call)) => {
                return self
                    .through_service(call, method, &url, headers, body)
                    .await;
            }
        };
        let sent = client
            .request(method.clone(), url)
            .headers(request_headers(headers))
            .body(body)
            .send();
        match tokio::time::timeout(self.timeouts.first_byte, sent).await {
            Ok(sent) => sent.map_err(|e| self.error(e)),
            Err(_) => Err(self.timed_out(TimeoutKind::FirstByte)),
        }
    }

    /// Sends a request through a caller's own tower service, within the first-byte timeout.
    async fn through_service(
        &self,
        call: &ServiceCall,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, Error> {
        let mut request = http::Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = url.parse().map_err(|e| {
            Error::with_source(ErrorKind::InvalidRequest, "not a URL the upstream takes", e)
        })?;
        *request.headers_mut() = request_headers(headers);
        match tokio::time::timeout(self.timeouts.first_byte, call(request)).await {
            Ok(sent) => sent.map_err(|e| {
                Error::with_source(
                    ErrorKind::UpstreamUnreachable,
                    format!("the caller's service could not reach {}", self.shown_base),
                    ServiceFailed(e),
                )
            }),
            Err(_) => Err(self.timed_out(TimeoutKind::FirstByte)),
        }
    }

    /// The next chunk of an answer's body (`None` at its end), unless the upstream stays
    /// silent longer than the idle timeout.
    pub async fn next_chunk(
        &self,
        response: &mut reqwest::Response,
    ) -> Result<Option<bytes::Bytes>, Error> {
        match tokio::time::timeout(self.timeouts.idle, response.chunk()).await {
            Ok(chunk) => chunk.map_err(|e| self.error(e)),
            Err(_) => Err(self.timed_out(TimeoutKind::Idle)),
        }
    }

    /// An answer's body as a stream of chunks, ending with an error if the upstream stays
    /// silent longer than the idle timeout.
    pub fn body_stream(
        &self,
        response: reqwest::Response,
    ) -> futures_util::stream::BoxStream<'static, Result<bytes::Bytes, Error>> {
        use futures_util::StreamExt;
        let upstream = self.clone();
        futures_util::stream::unfold(Some(response), move |response| {
            let upstream = upstream.clone();
            async move {
                let mut response = response?;
                match upstream.next_chunk(&mut response).await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(response))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            }
        })
        .boxed()
    }

    /// The error of a call that ran past one of its timeouts, counted.
    fn timed_out(&self, kind: TimeoutKind) -> Error {
        self.timed_out
            .get_or_create(&TimeoutLabels {
                kind: kind.as_str(),
            })
            .inc();
        let (limit, what, flag) = match kind {
            TimeoutKind::Connect => (
                self.timeouts.connect,
                "could not be connected to within",
                "--upstream-connect-timeout",
            ),
            TimeoutKind::FirstByte => (
                self.timeouts.first_byte,
                "sent no answer within",
                "--upstream-timeout",
            ),
            TimeoutKind::Idle => (
                self.timeouts.idle,
                "went silent in the middle of its answer for",
                "--upstream-idle-timeout",
            ),
        };
        Error::new(
            ErrorKind::UpstreamTimeout,
            format!(
                "upstream {} {what} {} ({flag}); nothing of it was stored",
                self.shown_base,
                humantime::format_duration(limit)
            ),
        )
    }

    /// Sends a request to another replica of the fleet, at `url` (its advertised address and
    /// the path), with `headers` as given: the caller forwards what it may (its client's
    /// credential goes to a replica of the same proxy, as the client sent it to this one).
    pub async fn send_to_replica(
        &self,
        method: &Method,
        url: &str,
        headers: HeaderMap,
        body: bytes::Bytes,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.client
            .request(method.clone(), url)
            .headers(headers)
            .body(body)
            .send()
            .await
    }

    /// Classifies a transport error, naming the upstream but never a header.
    pub fn error(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() && e.is_connect() {
            return self.timed_out(TimeoutKind::Connect);
        }
        let kind = if e.is_timeout() {
            ErrorKind::UpstreamTimeout
        } else {
            ErrorKind::UpstreamUnreachable
        };
        let what = if e.is_timeout() {
            "did not answer in time"
        } else if e.is_connect() {
            "cannot be reached"
        } else {
            "failed"
        };
        // `without_url`: the URL may carry a password; the display form is named instead.
        Error::with_source(
            kind,
            format!("upstream {} {what}", self.shown_base),
            e.without_url(),
        )
    }
}

/// Headers named by a `Connection` header, which are hop-by-hop for that message.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    if !headers.contains_key(header::CONNECTION) {
        return Vec::new();
    }
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect()
}

/// Removes from `headers` the hop-by-hop headers, the names `listed` in its `Connection`
/// header, `also`, and with `own` every header of llm-dedup's own (`llm-dedup-*`).
///
/// One pass over the names present, then a removal for each one found: on the hit path this
/// costs less than looking up every name of the lists (measured with `cargo bench --bench
/// load`).
fn strip(headers: &mut HeaderMap, listed: &[HeaderName], also: &[&str], own: bool) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            HOP_BY_HOP.contains(&n)
                || also.contains(&n)
                || listed.contains(name)
                || (own && n.starts_with(OWN_PREFIX))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Headers of a client's request that never go upstream besides the hop-by-hop ones: `Host`
/// and `Content-Length` (set for the new connection), `Accept-Encoding` (the client decodes
/// compressed answers itself, and stored bodies are kept decoded) and llm-dedup's own controls
/// (these by name, and every other `llm-dedup-*` header by its prefix: each speaks to this
/// proxy, never to the provider).
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "accept-encoding",
    TTL_HEADER,
    NAMESPACE_HEADER,
];

/// Turns a client's request headers into the ones sent upstream, in place: the one rule for
/// what is forwarded. The engine applies it as soon as a request arrives, so that its key,
/// its exact-request digest and its credential partition are computed from exactly what the
/// upstream will see (a header named in `Connection` must not change the key when it is not
/// sent), and [`Upstream::send`] applies it again to whatever it is given.
///
/// Returns the `Proxy-Authorization` the client addressed to this proxy, which is removed
/// like every hop-by-hop header but still tells callers apart (it partitions the cache).
pub fn forwarded(headers: &mut HeaderMap) -> Option<http::HeaderValue> {
    let listed = connection_listed(headers);
    let proxy_credential = headers.remove(header::PROXY_AUTHORIZATION);
    strip(headers, &listed, NOT_FORWARDED, true);
    proxy_credential.filter(|_| !listed.contains(&header::PROXY_AUTHORIZATION))
}

/// The headers to send upstream: `headers` as [`forwarded`] leaves them.
pub fn request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    forwarded(&mut out);
    out
}

/// The headers to pass back to the client: the upstream's, less hop-by-hop headers and the
/// framing headers of the upstream message (`Content-Length`, `Content-Encoding`).
pub fn response_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    strip(
        &mut out,
        &connection_listed(headers),
        &["content-length", "content-encoding"],
        false,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_speaks_tls_without_a_process_wide_crypto_provider() {
        // Nothing in this test binary installs one (a program embedding the engine need not):
        // a client that relied on it would panic in `build`, and building one installs none.
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());
        Upstream::new("https://api.openai.com", Timeouts::default()).expect("client");
        assert!(
            rustls::crypto::CryptoProvider::get_default().is_none(),
            "building the client installed a process-wide provider"
        );
        // Mozilla's roots at least, whatever the system holds.
        assert!(roots().len() >= webpki_roots::TLS_SERVER_ROOTS.len());
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-test"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "127.0.0.1:8080"),
            ("accept-encoding", "gzip"),
            ("llm-dedup-ttl", "60"),
            // Every header of llm-dedup's own speaks to the proxy, not to the provider.
            ("llm-dedup-bucket", "3"),
            ("llm-dedup-prefix", "off"),
            ("llm-dedup-anything-later", "x"),
            ("content-type", "application/json"),
        ] {
            h.append(k, v.parse().expect("value"));
        }
        h.append(
            "proxy-authorization",
            "Basic cHJveHk=".parse().expect("value"),
        );
        let out = request_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["authorization", "content-type"]);
        let mut in_place = h.clone();
        let to_proxy = forwarded(&mut in_place);
        assert_eq!(in_place, out, "one rule, whichever way it is applied");
        assert_eq!(
            to_proxy.as_ref().map(|v| v.as_bytes()),
            Some(&b"Basic cHJveHk="[..])
        );
    }

    #[test]
    fn tells_which_urls_lie_under_the_base() {
        let u = Upstream::new("https://api.example.com/openai", Timeouts::default()).expect("ok");
        let rel = |s: &str| u.relative(&reqwest::Url::parse(s).expect("url"));
        assert_eq!(
            rel("https://api.example.com/openai/v1/embeddings?x=1").as_deref(),
            Some("/v1/embeddings?x=1")
        );
        assert_eq!(
            rel("https://api.example.com:443/openai").as_deref(),
            Some("/")
        );
        assert_eq!(rel("https://api.example.com/openaiX/v1"), None);
        assert_eq!(rel("http://api.example.com/openai/v1"), None);
        assert_eq!(rel("https://other.example.com/openai/v1"), None);
    }

    #[test]
    fn rejects_bad_upstreams_and_hides_passwords() {
        assert!(Upstream::new("not a url", Timeouts::default()).is_err());
        assert!(Upstream::new("ftp://example.com", Timeouts::default()).is_err());
        assert!(Upstream::new("http://example.com/?a=b", Timeouts::default()).is_err());
        let u =
            Upstream::new("https://user:pw@example.com/base/", Timeouts::default()).expect("valid");
        assert_eq!(u.base(), "https://user@example.com/base");
    }
}
