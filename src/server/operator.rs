//! Who may read the operator endpoints, and which paths are theirs.
//!
//! This module owns the access rule of `/_llm-dedup/*` (loopback clients naming a loopback
//! host, or holders of the operator token) and the normalization that keeps every spelling of
//! those paths (`//_llm-dedup`, `/%5Fllm-dedup`, dot segments, another case) at the proxy:
//! none of them is ever forwarded upstream.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Who may read the operator endpoints (`/_llm-dedup/stats`, `/_llm-dedup/metrics`, the live
/// page `/_llm-dedup/` and its `/_llm-dedup/series`): they name every tenant's models and the
/// database's path. `/_llm-dedup/health` is open to all (load balancers probe it).
#[derive(Clone, Default)]
pub struct OperatorAccess {
    /// The blake3 hash of the token, when there is one: comparing hashes takes the same time
    /// whatever the presented token, so a timing cannot reveal the token byte by byte.
    token: Option<blake3::Hash>,
    /// The address the proxy listens on: without a token, a `Host` naming it is accepted
    /// besides the loopback names.
    listen: Option<SocketAddr>,
}

impl OperatorAccess {
    /// Clients on a loopback address only, naming a loopback host (`localhost`, `127.0.0.1`,
    /// `[::1]`, any port) or the address listened on (the default).
    pub fn loopback_only() -> OperatorAccess {
        OperatorAccess::default()
    }

    /// Any client presenting `Authorization: Bearer TOKEN`, and nobody else (loopback
    /// included). A browser may present it as HTTP Basic credentials instead (any user name,
    /// the token as password): it asks for them itself, which lets an operator open the live
    /// page with a token.
    pub fn token(token: &str) -> OperatorAccess {
        OperatorAccess {
            token: Some(blake3::hash(token.as_bytes())),
            listen: None,
        }
    }

    /// The same rule for a proxy listening on `addr`: without a token, a `Host` naming that
    /// address is accepted too.
    pub fn listening_on(mut self, addr: SocketAddr) -> OperatorAccess {
        self.listen = Some(addr);
        self
    }

    /// Whether a token opens the endpoints to clients beyond loopback.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Lets `request` through, or answers why not: `401` for a missing or wrong token; without
    /// a token, `403` for a client off loopback and `421` for a loopback client naming another
    /// host (a page of another site whose name resolves to this machine: DNS rebinding). A
    /// request with no peer address (an app called in-process) is not on loopback.
    pub(super) fn check(&self, request: &Request) -> Result<(), Box<Response>> {
        match &self.token {
            Some(expected) => {
                let presented = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(presented_token)
                    .map(|t| blake3::hash(t.as_bytes()));
                // `blake3::Hash`'s equality is constant-time.
                if presented.as_ref() == Some(expected) {
                    return Ok(());
                }
                let mut response = operator_refusal(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "operator endpoints need the operator token: send Authorization: Bearer \
                     TOKEN, with the TOKEN given to --admin-token (LLM_DEDUP_ADMIN_TOKEN)",
                );
                let challenges = response.headers_mut();
                challenges.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                challenges.append(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Basic realm=\"llm-dedup operator\", charset=\"UTF-8\"",
                    ),
                );
                Err(Box::new(response))
            }
            None => {
                let peer = request.extensions().get::<ConnectInfo<SocketAddr>>();
                if peer.is_some_and(|ConnectInfo(addr)| addr.ip().is_loopback()) {
                    if self.names_this_proxy(request) {
                        return Ok(());
                    }
                    return Err(Box::new(operator_refusal(
                        StatusCode::MISDIRECTED_REQUEST,
                        "operator_host_not_allowed",
                        "operator endpoints answer requests naming this machine only (Host: \
                         localhost, 127.0.0.1 or [::1]); start the proxy with --admin-token to \
                         read them under another name",
                    )));
                }
                Err(Box::new(operator_refusal(
                    StatusCode::FORBIDDEN,
                    "operator_loopback_only",
                    "operator endpoints answer clients on this machine only; start the proxy \
                     with --admin-token TOKEN (LLM_DEDUP_ADMIN_TOKEN) and send \
                     Authorization: Bearer TOKEN to read them from elsewhere",
                )))
            }
        }
    }
}

impl OperatorAccess {
    /// Whether `request` names this machine: the authority of its target (HTTP/2) or its
    /// `Host`, a loopback name or address, or the address listened on.
    fn names_this_proxy(&self, request: &Request) -> bool {
        let authority = match request.uri().authority() {
            Some(authority) => authority.as_str(),
            None => match request.headers().get(header::HOST).map(HeaderValue::to_str) {
                Some(Ok(host)) => host,
                _ => return false,
            },
        };
        let name = host_name(authority.trim());
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let Ok(ip) = name.parse::<std::net::IpAddr>() else {
            return false;
        };
        ip.is_loopback()
            || self
                .listen
                .is_some_and(|listen| !listen.ip().is_unspecified() && listen.ip() == ip)
    }
}

/// The host of an authority (`host`, `host:port`, `[v6]`, `[v6]:port`), without its port or
/// brackets.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(v6, _)| v6);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Where the operator endpoints live: nothing under it is ever forwarded.
pub(super) const OPERATOR_PREFIX: &str = "/_llm-dedup";

/// The operator path that `path` spells another way (repeated slashes, percent escapes, dot
/// segments, another case), if it does: what it must be routed as. `None` for a path that is
/// routed as it is (an operator path spelled plainly, or any path outside the prefix).
pub(super) fn operator_spelling(path: &str) -> Option<String> {
    let plain = !path.contains('%') && !path.contains("//") && !path.contains("/.");
    if plain {
        // Only another case could hide the prefix.
        let prefix = path.get(..OPERATOR_PREFIX.len())?;
        let rest = &path[OPERATOR_PREFIX.len()..];
        let under = rest.is_empty() || rest.starts_with('/');
        return (under
            && prefix != OPERATOR_PREFIX
            && prefix.eq_ignore_ascii_case(OPERATOR_PREFIX))
        .then(|| format!("{OPERATOR_PREFIX}{rest}"));
    }
    let decoded = percent_decoded(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let first = segments.first()?;
    if !first.eq_ignore_ascii_case(&OPERATOR_PREFIX[1..]) {
        return None;
    }
    let mut normalized = OPERATOR_PREFIX.to_owned();
    for segment in &segments[1..] {
        normalized.push('/');
        // Written back so that it parses as a path again, whatever it decoded to.
        for byte in segment.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte) {
                normalized.push(char::from(byte));
            } else {
                normalized.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    if decoded.ends_with('/') && segments.len() == 1 {
        normalized.push('/');
    }
    Some(normalized)
}

/// `path` with its percent escapes decoded (an invalid escape is kept as it is).
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Routes every spelling of an operator path as that path (see [`operator_spelling`]).
pub(super) async fn normalize_operator_path(mut request: Request) -> Request {
    if let Some(path) = operator_spelling(request.uri().path()) {
        let target = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        // Every byte of `target` is one a path may hold; should it still not parse, the
        // request goes to an operator path that does not exist rather than upstream.
        let uri = target
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/_llm-dedup/unknown"));
        *request.uri_mut() = uri;
    }
    request
}

/// The token an `Authorization` value presents: `Bearer TOKEN`, or `Basic` credentials whose
/// password is the token. Schemes are case-insensitive (RFC 9110 §11.1).
fn presented_token(value: &str) -> Option<String> {
    use base64::Engine as _;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        return Some(password.to_owned());
    }
    None
}

fn operator_refusal(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}
