//! Certificates for the tests that speak TLS, made with the `openssl` command.

use std::path::Path;

/// A directory holding what [`make_certificates`] makes, or `None` (after saying why, or
/// failing where outside programs are required) when `openssl` cannot make them.
pub fn certificates() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("tempdir");
    if make_certificates(dir.path()) {
        return Some(dir);
    }
    super::RedisServer::missing_component("openssl");
    None
}

/// Makes, in `dir`, a test CA (`ca.pem`, `ca.key`) and a certificate it signed for
/// `localhost` (`server.pem`, `server.key`); false when `openssl` is missing or fails.
pub fn make_certificates(dir: &Path) -> bool {
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").is_err() {
        return false;
    }
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=llm-dedup test CA",
    ]) && openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]) && openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ])
}
