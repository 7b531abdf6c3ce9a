//! A real three-master Redis Cluster for the fleet's cluster tests and benchmarks: Debian's
//! `redis-server` run as cluster nodes (each in a directory of its own, on a free port whose
//! bus port, port + 10000, is free too), joined with `redis-cli --cluster create`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::redis_server::{missing, poll_blocking};

/// How long a node may be unreachable before the others call it failed (short, so that a
/// test sees the cluster notice a killed master within seconds).
const NODE_TIMEOUT_MS: u64 = 2000;

/// One node: its process (none while killed), its port and its directory.
struct Node {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// Three masters on loopback ports, their slots split evenly; stopped and removed when
/// dropped.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dirs: tempfile::TempDir,
}

/// Ports handed out in this process so far (see [`free_port_pair`]).
static HANDED_OUT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A free loopback port whose bus port (+ 10000) is free too, both below the ephemeral range
/// (32768 and up on Linux) that every other test's `bind(0)` draws from, so that no port
/// chosen here is taken meanwhile by a port the system hands out. Candidates walk a range
/// from a point that depends on the process, so parallel tests and processes rarely try the
/// same one; a node that still cannot bind its port is started again on another
/// ([`RedisCluster::start`]).
fn free_port_pair() -> u16 {
    loop {
        let n = HANDED_OUT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let offset = (std::process::id()
            .wrapping_mul(7919)
            .wrapping_add(n.wrapping_mul(37)))
            % 2700;
        let port = 20_000 + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// Sends one inline command to `port` and returns the raw reply.
fn ask(port: u16, line: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(format!("{line}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = conn.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn spawn(port: u16, dir: &std::path::Path) -> std::io::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn answers_ping(port: u16) -> Option<()> {
    ask(port, "PING")
        .filter(|r| r.starts_with("+PONG"))
        .map(|_| ())
}

impl RedisCluster {
    /// Starts three masters and joins them, or says why not and returns `None` when
    /// `redis-server` or `redis-cli` is not installed (CI fails instead).
    pub fn start() -> Option<RedisCluster> {
        let dirs = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let dir = dirs.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&dir).expect("node dir");
            let mut started = None;
            for _ in 0..10 {
                let port = free_port_pair();
                let mut child = match spawn(port, &dir) {
                    Ok(child) => child,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        missing("redis-server");
                        return None;
                    }
                    Err(e) => panic!("cannot start redis-server: {e}"),
                };
                // Up, and ours: a node that could not bind its port has exited (another
                // process's node may answer there).
                let up = poll_blocking(Duration::from_secs(10), || {
                    answers_ping(port)?;
                    child.try_wait().ok().flatten().is_none().then_some(())
                });
                if up.is_some() && child.try_wait().ok().flatten().is_none() {
                    started = Some((child, port));
                    break;
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            let (child, port) = started.expect("a cluster node did not start on 10 ports");
            nodes.push(Node {
                child: Some(child),
                port,
                dir,
            });
        }
        let cluster = RedisCluster { nodes, _dirs: dirs };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match created {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing("redis-cli");
                return None;
            }
            Err(e) => panic!("cannot run redis-cli: {e}"),
        }
        cluster.wait_ok();
        Some(cluster)
    }

    /// Waits until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            poll_blocking(Duration::from_secs(30), || {
                ask(node.port, "CLUSTER INFO")
                    .filter(|info| info.contains("cluster_state:ok"))
                    .map(|_| ())
            })
            .expect("the cluster did not become ok");
        }
    }

    /// Waits until node `survivor` sees the cluster as failed (a master it cannot reach).
    pub fn wait_failed(&self, survivor: usize) {
        poll_blocking(Duration::from_secs(30), || {
            ask(self.nodes[survivor].port, "CLUSTER INFO")
                .filter(|info| info.contains("cluster_state:fail"))
                .map(|_| ())
        })
        .expect("the cluster did not notice the failed master");
    }

    /// The URL of node `i` (any node will do for the fleet).
    pub fn url_of(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The URL of the first node.
    pub fn url(&self) -> String {
        self.url_of(0)
    }

    /// Runs one command on node `i` and returns the raw reply (a key on another node's slot
    /// answers `-MOVED`).
    pub fn command_on(&self, i: usize, line: &str) -> String {
        ask(self.nodes[i].port, line).expect("the node answers")
    }

    /// Keys matching `pattern` over every running node.
    pub fn keys(&self, pattern: &str) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| {
                let reply = ask(n.port, &format!("KEYS {pattern}")).unwrap_or_default();
                reply
                    .lines()
                    .next()
                    .and_then(|l| l.strip_prefix('*'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Kills node `i` at once (as a crash would); it keeps its directory and its place in
    /// the cluster's configuration.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again, on its port with its configuration: it rejoins with its slots.
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.child = Some(spawn(node.port, &node.dir).expect("restart redis-server"));
        let port = node.port;
        poll_blocking(Duration::from_secs(10), || answers_ping(port))
            .expect("the node did not restart");
        self.wait_ok();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
