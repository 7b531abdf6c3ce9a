//! The engine's client speaks TLS to the provider and checks its certificate. It trusts a CA
//! the system's store names (here a test CA given with `SSL_CERT_FILE`, as a private CA or an
//! egress proxy that inspects TLS would be), and refuses a server that no CA it trusts
//! signed, saying why in the log. The provider is `openssl s_server`; the test skips without
//! `openssl` (CI installs it and requires it).

mod common;

use std::time::Duration;

use common::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_speaks_tls_and_trusts_only_certificates_it_can_check() {
    let Some(dir) = common::tls::certificates() else {
        return;
    };
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let port = common::free_port();
    let Ok(server) = std::process::Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .args(["-cert", &path("server.pem"), "-key", &path("server.key")])
        // A status page for any request, over HTTP/1.0.
        .args(["-www", "-quiet"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        RedisServer::missing_component("openssl");
        return;
    };
    // Stopped however the test ends.
    let _server = Stopped(server);
    let listening = common::poll_blocking(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()
            .then_some(())
    });
    assert!(listening.is_some(), "openssl s_server listens");
    let upstream = format!("https://localhost:{port}");

    // Its CA named by SSL_CERT_FILE: the provider is reached, and its answer passed on.
    let (status, page, _) = ask(&upstream, &dir.path().join("a.db"), Some(&path("ca.pem"))).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("s_server"),
        "the provider's own answer: {page}"
    );

    // The system's store alone, which does not hold the test CA: refused, and the log says
    // why (no client gets an answer from a server it cannot check).
    let (status, body, log) = ask(&upstream, &dir.path().join("b.db"), None).await;
    assert_eq!(status, 502);
    assert!(body.contains("upstream_unreachable"), "{body}");
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "the log says the certificate was not trusted:\n{log}"
    );
}

/// Starts a proxy in front of `upstream`, trusting the certificates in `ca` (as
/// `SSL_CERT_FILE`) or else the system's, asks it for `/v1/models` and stops it: (status,
/// body, what it logged).
async fn ask(upstream: &str, db: &std::path::Path, ca: Option<&str>) -> (u16, String, String) {
    let mut command = common::llm_dedup();
    command
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    if let Some(ca) = ca {
        command.env("SSL_CERT_FILE", ca);
    }
    let proxy = common::start_proxy_command(command, db, upstream, &["--listen", "127.0.0.1:0"]);
    let answer = common::client()
        .get(format!("http://{}/v1/models", proxy.addr))
        .send()
        .await
        .expect("answer");
    let status = answer.status().as_u16();
    let body = answer.text().await.expect("body");
    let (_, log) = proxy.terminate();
    (status, body, log)
}

/// A child process killed when dropped.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
