//! The inspector's access to a fleet's Redis (`stats`, `list`, `show` and `purge` with
//! `--redis URL`): blocking, as the command line is.
//!
//! Entries are read with `SCAN` (never `KEYS`, which blocks the server) in pages, on every
//! master of a cluster (each holds its own slots' keys), and decoded
//! as the replicas wrote them; with the fleet secret, entries not sealed with it are left out
//! and counted ([`Admin::untrusted`]). A purge deletes entries and announces it on the fleet's
//! channel (sealed with the secret, without which replicas that have one ignore it), so that
//! every replica drops its copies.

use std::time::Duration;

use super::events::{Message, Says, seal_message};
use super::seal::{FleetSecret, Seal, Sealed};
use super::topology::{self, RedisMode};
use super::{Layout, codec};
use crate::entry::StoredAnswer;
use crate::key::CacheKey;

/// Keys asked for in one `SCAN` step, and read in one pipeline.
const PAGE: usize = 500;

/// The fleet's Redis could not be used, with why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AdminError(String);

impl From<redis::RedisError> for AdminError {
    fn from(e: redis::RedisError) -> Self {
        AdminError(e.to_string())
    }
}

/// A blocking connection to a fleet's Redis, for the inspector.
pub struct Admin {
    /// To the node `--redis` names, or to its cluster.
    conn: Box<dyn redis::ConnectionLike + Send>,
    /// To each node whose keys are scanned: that node, or every master of the cluster.
    scanned: Vec<redis::Connection>,
    cluster: bool,
    layout: Layout,
    shown: String,
    seal: Option<Seal>,
    untrusted: u64,
}

impl Admin {
    /// Connects to the Redis at `url`, with a short timeout; `secret` is the fleet's, if it
    /// has one.
    pub fn open(
        url: &str,
        secret: Option<&FleetSecret>,
        mode: RedisMode,
    ) -> Result<Admin, AdminError> {
        super::conn::provide_tls(url);
        let client = redis::Client::open(url)?;
        let timeout = Duration::from_secs(5);
        let cluster = topology::is_cluster_blocking(&client, mode)?;
        let mut conn = topology::blocking(&client, cluster, timeout)?;
        let named = client.get_connection_info();
        let nodes: Vec<redis::ConnectionInfo> = if cluster {
            let listed: String = redis::cmd("CLUSTER").arg("NODES").query(conn.as_mut())?;
            topology::cluster_nodes(&listed)
                .into_iter()
                .filter(|(_, _, master)| *master)
                .map(|(host, port, _)| topology::at(named, &host, port))
                .collect()
        } else {
            vec![named.clone()]
        };
        if nodes.is_empty() {
            return Err(AdminError("the cluster lists no master that is up".into()));
        }
        let scanned = nodes
            .into_iter()
            .map(|node| {
                let conn = redis::Client::open(node)?.get_connection_with_timeout(timeout)?;
                conn.set_read_timeout(Some(timeout))?;
                Ok(conn)
            })
            .collect::<Result<_, redis::RedisError>>()?;
        Ok(Admin {
            conn,
            scanned,
            cluster,
            layout: Layout::default(),
            shown: named.addr().to_string(),
            seal: secret.map(Seal::new),
            untrusted: 0,
        })
    }

    /// The nodes read: 1 for a single node, every master of a cluster.
    pub fn masters(&self) -> usize {
        self.scanned.len()
    }

    /// Entries read so far that were not sealed with the fleet's secret (left out).
    pub fn untrusted(&self) -> u64 {
        self.untrusted
    }

    /// The Redis server, without any password.
    pub fn server(&self) -> &str {
        &self.shown
    }

    /// Every stored answer, read page by page from each scanned node, with the size of its
    /// value in Redis.
    pub fn entries(&mut self) -> Result<Vec<(StoredAnswer, u64)>, AdminError> {
        let mut out = Vec::new();
        let now = crate::entry::unix_ms(std::time::SystemTime::now());
        for node in &mut self.scanned {
            let names: Vec<String> =
                redis::Commands::scan_match::<_, String>(node, self.layout.entries())?
                    .collect::<Result<_, _>>()?;
            for page in names.chunks(PAGE) {
                // One GET a key (a node's keys lie in many slots: no MGET across them).
                let mut pipe = redis::pipe();
                for name in page {
                    pipe.cmd("GET").arg(name);
                }
                let values: Vec<Option<Vec<u8>>> = pipe.query(node)?;
                for (name, value) in page.iter().zip(values) {
                    let (Some(key), Some(value)) = (self.layout.entry_key(name), value) else {
                        continue;
                    };
                    let opened = match &self.seal {
                        Some(seal) => seal.open(Sealed::Entry, name, &value, now),
                        None => Some(value.as_slice()),
                    };
                    let entry =
                        opened.and_then(|v| codec::decode_entry(key, v, codec::MAX_INFLATED));
                    match entry {
                        Some(entry) => out.push((entry, value.len() as u64)),
                        None => self.untrusted += 1,
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes the stored answers under `keys` and tells every replica: that the keys of
    /// `buckets` were purged (each with every answer of its bucket), or everything when
    /// `all`.
    pub fn purge(
        &mut self,
        keys: &[CacheKey],
        buckets: &[CacheKey],
        all: bool,
    ) -> Result<(), AdminError> {
        if self.cluster {
            // A master that is down keeps its entries, and they would come back with it.
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(self.conn.as_mut())?;
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return Err(AdminError(
                    "the cluster is not whole (cluster_state is not ok): a master that is down \
                     would keep its entries; purge once it is back"
                        .into(),
                ));
            }
        }
        for page in keys.chunks(PAGE) {
            let names: Vec<String> = page.iter().map(|k| self.layout.entry(k)).collect();
            if self.cluster {
                // Each key in its own slot: one DEL each, routed by the cluster client.
                for name in &names {
                    let _: i64 = redis::cmd("DEL").arg(name).query(self.conn.as_mut())?;
                }
            } else {
                let _: i64 = redis::cmd("DEL").arg(&names).query(self.conn.as_mut())?;
            }
        }
        if all {
            self.announce(Says::PurgedAll)?;
        } else {
            for key in buckets {
                self.announce(Says::Purged(*key))?;
            }
        }
        Ok(())
    }

    fn announce(&mut self, says: Says) -> Result<(), AdminError> {
        let channel = self.layout.channel();
        let mut message = Message {
            from: "inspector".to_owned(),
            says,
        }
        .encode();
        if let Some(seal) = &self.seal {
            message = seal_message(seal, &channel, &message, std::time::SystemTime::now());
        }
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query(self.conn.as_mut())?;
        Ok(())
    }
}
