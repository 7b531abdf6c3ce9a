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
}

impl OperatorAccess {
    /// Clients on a loopback address only (the default).
    pub fn loopback_only() -> OperatorAccess {
        OperatorAccess { token: None }
    }

    /// Any client presenting `Authorization: Bearer TOKEN`, and nobody else (loopback
    /// included). A browser may present it as HTTP Basic credentials instead (any user name,
    /// the token as password): it asks for them itself, which lets an operator open the live
    /// page with a token.
    pub fn token(token: &str) -> OperatorAccess {
        OperatorAccess {
            token: Some(blake3::hash(token.as_bytes())),
        }
    }

    /// Whether a token opens the endpoints to clients beyond loopback.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Lets `request` through, or answers why not: `401` for a missing or wrong token, `403`
    /// for a client off loopback when there is no token. A request with no peer address (an
    /// app called in-process) is not on loopback.
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
                    return Ok(());
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
