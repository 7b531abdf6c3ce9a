//! Whether the fleet's Redis is one node or a cluster, and the connections each takes.
//!
//! `--redis URL` names one node. At the first connection the replica asks it (`INFO
//! cluster`): a node with `cluster_enabled:1` is one of a cluster, and the replica then speaks
//! through redis-rs's cluster client, which learns the slots from that node, follows `MOVED`
//! and `ASK`, and refreshes its map when the topology changes; any other node is used alone.
//! `--redis-mode` forces either (a managed service that refuses `INFO`, say). The choice is
//! logged once.
//!
//! Every key layout fits a cluster (`layout.rs`): what one script or pipeline touches shares a
//! hash tag. Events go over plain pub/sub, which a cluster carries to every node, so a
//! replica may listen on any node; if its node goes away it listens on another
//! ([`Conn::nodes`]).

use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::{ConnectionAddr, ConnectionInfo};

use super::conn::{CONNECT_TIMEOUT, OP_TIMEOUT};

/// Whether `--redis` names a single node or a node of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisMode {
    /// Ask the node at start (`INFO cluster`).
    #[default]
    Auto,
    /// A single node (or a primary with replicas behind one address).
    Single,
    /// Any node of a Redis Cluster or Valkey cluster.
    Cluster,
}

impl std::str::FromStr for RedisMode {
    type Err = String;

    fn from_str(s: &str) -> Result<RedisMode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(RedisMode::Auto),
            "single" => Ok(RedisMode::Single),
            "cluster" => Ok(RedisMode::Cluster),
            _ => Err(format!(
                "{s:?} is not a Redis mode (auto, single or cluster)"
            )),
        }
    }
}

impl RedisMode {
    /// Whether the mode says the node is a cluster's; `None` when the node must be asked.
    fn said(self) -> Option<bool> {
        match self {
            RedisMode::Auto => None,
            RedisMode::Single => Some(false),
            RedisMode::Cluster => Some(true),
        }
    }

    /// How the mode is named in logs and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Auto => "auto",
            RedisMode::Single => "single",
            RedisMode::Cluster => "cluster",
        }
    }
}

/// Whether what a node says of itself in `INFO cluster` makes it a cluster node.
fn says_cluster(info: &str) -> bool {
    info.lines().any(|line| line.trim() == "cluster_enabled:1")
}

/// Whether the node `client` names is one of a cluster, as `mode` says or the node does.
pub(super) async fn is_cluster(
    client: &redis::Client,
    mode: RedisMode,
) -> redis::RedisResult<bool> {
    if let Some(cluster) = mode.said() {
        return Ok(cluster);
    }
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(CONNECT_TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut conn)
        .await?;
    Ok(says_cluster(&info))
}

/// As [`is_cluster`], blocking (for the build and the inspector).
pub(super) fn is_cluster_blocking(
    client: &redis::Client,
    mode: RedisMode,
) -> redis::RedisResult<bool> {
    if let Some(cluster) = mode.said() {
        return Ok(cluster);
    }
    let mut conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    conn.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let info: String = redis::cmd("INFO").arg("cluster").query(&mut conn)?;
    Ok(says_cluster(&info))
}

/// A cluster client that starts from the node `client` names (with its password, user and
/// TLS), whose calls wait at most `response` each.
pub(super) fn cluster_client(
    client: &redis::Client,
    response: Duration,
) -> redis::RedisResult<ClusterClient> {
    ClusterClient::builder([client.get_connection_info().clone()])
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(response)
        // A call is cut at the fleet's own timeout anyway; a slot moving needs a retry or two.
        .retries(2)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .build()
}

/// A blocking connection to the node `client` names, or to its cluster, each call waiting
/// at most `timeout` (for the build and the inspector).
pub(super) fn blocking(
    client: &redis::Client,
    cluster: bool,
    timeout: Duration,
) -> redis::RedisResult<Box<dyn redis::ConnectionLike + Send>> {
    if cluster {
        let conn = cluster_client(client, timeout)?.get_connection()?;
        return Ok(Box::new(conn));
    }
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(Box::new(conn))
}

/// The fleet's shared connection: to one node, or to a cluster.
#[derive(Clone)]
pub(super) enum Conn {
    /// The shared connection to one node, reconnecting by itself.
    Single(redis::aio::ConnectionManager),
    /// A connection of its own to one node (a follower's, for blocking reads).
    Plain(redis::aio::MultiplexedConnection),
    /// A cluster's nodes, as redis-rs's cluster client keeps them.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// Connects as `cluster` says, each call waiting at most [`OP_TIMEOUT`].
    pub(super) async fn open(client: &redis::Client, cluster: bool) -> redis::RedisResult<Conn> {
        if cluster {
            let conn = cluster_client(client, OP_TIMEOUT)?
                .get_async_connection()
                .await?;
            return Ok(Conn::Cluster(conn));
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1);
        Ok(Conn::Single(
            client.get_connection_manager_with_config(config).await?,
        ))
    }

    /// A connection of its own for blocking reads (a stream a follower waits on), whose
    /// calls may take up to `response`.
    pub(super) async fn own(
        client: &redis::Client,
        cluster: bool,
        response: Duration,
    ) -> redis::RedisResult<Conn> {
        if cluster {
            let conn = cluster_client(client, response)?
                .get_async_connection()
                .await?;
            return Ok(Conn::Cluster(conn));
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response));
        Ok(Conn::Plain(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }

    /// Clients for the nodes a listener may subscribe on, the one `--redis` names first: for a
    /// cluster, every node it knows of now (a message published on any reaches all).
    pub(super) async fn nodes(&mut self, named: &redis::Client) -> Vec<redis::Client> {
        let mut nodes = vec![named.clone()];
        if let Conn::Cluster(conn) = self {
            let listed: redis::RedisResult<String> =
                redis::cmd("CLUSTER").arg("NODES").query_async(conn).await;
            if let Ok(listed) = listed {
                let info = named.get_connection_info();
                for (host, port, _) in cluster_nodes(&listed) {
                    if let Ok(client) = redis::Client::open(at(info, &host, port)) {
                        nodes.push(client);
                    }
                }
            }
        }
        nodes
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The connection info of `named`, at `host:port` instead (same password, user, TLS).
pub(super) fn at(named: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match named.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    named.clone().set_addr(addr)
}

/// The nodes `CLUSTER NODES` lists that are up: host, port, and whether each is a master.
/// A node that does not know its own address (`:6379`) is left out.
pub(super) fn cluster_nodes(listed: &str) -> Vec<(String, u16, bool)> {
    listed
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_id, address, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"))
            {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return None;
            }
            Some((
                host.to_owned(),
                port.parse().ok()?,
                flags.contains(&"master"),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_says_whether_it_is_of_a_cluster() {
        assert!(says_cluster("# Cluster\r\ncluster_enabled:1\r\n"));
        assert!(!says_cluster("# Cluster\r\ncluster_enabled:0\r\n"));
        assert!(!says_cluster(""));
    }

    #[test]
    fn the_nodes_of_a_cluster_are_read_from_its_own_listing() {
        let listed = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,node-b master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
6ec2 [::1]:30005@40005 master - 0 1426238316232 5 connected 10923-16383
824f 127.0.0.1:30006@40006 master,fail - 1426238316232 0 5 disconnected
1111 :30007@40007 master,noaddr - 0 0 0 disconnected
";
        assert_eq!(
            cluster_nodes(listed),
            vec![
                ("127.0.0.1".to_owned(), 30004, false),
                ("127.0.0.1".to_owned(), 30002, true),
                ("127.0.0.1".to_owned(), 30001, true),
                ("::1".to_owned(), 30005, true),
            ]
        );
        assert!(cluster_nodes("garbage\n\n1 2\n").is_empty());
    }

    #[test]
    fn a_mode_is_named_or_refused() {
        for mode in [RedisMode::Auto, RedisMode::Single, RedisMode::Cluster] {
            assert_eq!(mode.as_str().parse::<RedisMode>(), Ok(mode));
        }
        assert!("sentinel".parse::<RedisMode>().is_err());
    }
}
