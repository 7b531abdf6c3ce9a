//! A real `redis-server` for the fleet's tests and benchmarks, and the library's own unit
//! tests of the fleet (each includes this file): one way to start, reach and stop one.

#![allow(dead_code)]

/// The environment variable CI sets (`.ci/run`): a test that needs a real component fails
/// without it, instead of skipping.
pub const REQUIRE: &str = "LLM_DEDUP_REQUIRE_COMPONENTS";

/// Says loudly that `program` is missing and the test skips, or fails the test when CI asks
/// for every component ([`REQUIRE`]).
pub fn missing(program: &str) {
    if std::env::var_os(REQUIRE).is_some_and(|v| !v.is_empty()) {
        panic!(
            "{program} is not installed, and {REQUIRE} is set: this test must run (apt-get install {program})"
        );
    }
    eprintln!(
        "\n*** {program} is not installed: SKIPPING this test (apt-get install {program}; CI \
         sets {REQUIRE} and fails instead) ***\n"
    );
}

/// Polls `check` every 20 ms until it gives a value or `limit` has passed (for what happens
/// outside any runtime: a child process starting or exiting).
pub fn poll_blocking<T>(
    limit: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A real `redis-server` on a free loopback port, persistence off, stopped when dropped.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
}

impl RedisServer {
    /// See [`missing`] (for tests that name only the server type).
    pub fn missing_component(program: &str) {
        missing(program);
    }

    /// Starts one, or says why not and returns `None` when `redis-server` is not installed
    /// (the README's test command runs without it); with [`REQUIRE`] set (CI), panics
    /// instead.
    pub fn start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        RedisServer::on(port)
    }

    /// Starts one on `port` (to restart a server where the replicas expect it).
    pub fn on(port: u16) -> Option<RedisServer> {
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing("redis-server");
                return None;
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let server = RedisServer { child, port };
        let answers = || {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            conn.write_all(b"PING\r\n").ok()?;
            let mut buf = [0u8; 7];
            (conn.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n").then_some(())
        };
        poll_blocking(std::time::Duration::from_secs(10), answers)
            .expect("redis-server did not start");
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command with `redis-cli`-like inline syntax and returns the raw reply.
    pub fn command(&self, line: &str) -> String {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        conn.write_all(format!("{line}\r\n").as_bytes())
            .expect("write");
        let mut buf = vec![0u8; 64 * 1024];
        let n = conn.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Kills the server at once (as a crash would).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
