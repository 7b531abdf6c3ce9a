//! What replicas and the inspector tell each other, on one pub/sub channel
//! ([`Layout::channel`](super::Layout::channel)), and the local waiters those messages wake.
//!
//! [`Message`] is the one wire form: its [`Message::encode`] and [`Message::parse`] are used by
//! every replica and by the inspector. A replica hears every message, and wakes the local
//! waiters of a key (`done`, `live`) or hands an [`Event`] to its listener (`replaced`,
//! `purge`), which drops the copies it holds.
//!
//! With a fleet secret, a message is sent sealed ([`seal_message`]: the time it was sent
//! and a seal over the channel, the message and that time), and a message is obeyed only if
//! its seal holds and it is at most [`MESSAGE_FRESH`] old ([`open_message`]): anyone else
//! who can publish on the channel is ignored, and so is a sealed message replayed later.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;

use super::conn::{BACKOFF, CONNECT_TIMEOUT};
use super::seal::{MESSAGE_FRESH, Rejected, Seal, Sealed};
use super::{Event, Fleet};
use crate::entry::unix_ms;
use crate::key::CacheKey;

/// One message on the fleet's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who sent it: a replica's id, or `inspector`.
    pub from: String,
    /// What it says.
    pub says: Says,
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Says {
    /// The lease on this key ended: its waiters look again.
    Done(CacheKey),
    /// A stream for this key began to be relayed: its waiters look again.
    Live(CacheKey),
    /// The answer under this key was replaced.
    Replaced(CacheKey),
    /// The entry under this key was purged.
    Purged(CacheKey),
    /// Every entry was purged.
    PurgedAll,
}

impl Message {
    /// The wire form: `"{from} {what} {key}"`, or `"{from} purge all"`.
    pub fn encode(&self) -> String {
        let (what, arg) = match &self.says {
            Says::Done(key) => ("done", key.to_hex()),
            Says::Live(key) => ("live", key.to_hex()),
            Says::Replaced(key) => ("replaced", key.to_hex()),
            Says::Purged(key) => ("purge", key.to_hex()),
            Says::PurgedAll => ("purge", "all".to_owned()),
        };
        format!("{} {what} {arg}", self.from)
    }

    /// Reads the wire form; `None` for anything else.
    pub fn parse(text: &str) -> Option<Message> {
        let mut words = text.split(' ');
        let (from, what, arg) = (words.next()?, words.next()?, words.next()?);
        if words.next().is_some() || from.is_empty() {
            return None;
        }
        let key = CacheKey::from_hex(arg);
        let says = match (what, arg, key) {
            ("done", _, Some(key)) => Says::Done(key),
            ("live", _, Some(key)) => Says::Live(key),
            ("replaced", _, Some(key)) => Says::Replaced(key),
            ("purge", "all", _) => Says::PurgedAll,
            ("purge", _, Some(key)) => Says::Purged(key),
            _ => return None,
        };
        Some(Message {
            from: from.to_owned(),
            says,
        })
    }
}

/// `text` (a message's wire form) as sent on `channel` at `now` by a fleet with a secret:
/// `"{text} {unix ms} {seal}"`.
pub(super) fn seal_message(
    seal: &Seal,
    channel: &str,
    text: &str,
    now: std::time::SystemTime,
) -> String {
    let ms = unix_ms(now).to_string();
    let mac = seal.mac(
        Sealed::Message,
        &[channel.as_bytes(), text.as_bytes(), ms.as_bytes()],
    );
    format!("{text} {ms} {}", mac.to_hex())
}

/// The wire form inside a payload heard on `channel` at `now`, if it was sealed by this
/// fleet's secret and sent at most [`MESSAGE_FRESH`] before (or after: clocks differ).
pub(super) fn open_message<'a>(
    seal: &Seal,
    channel: &str,
    payload: &'a str,
    now: std::time::SystemTime,
) -> Option<&'a str> {
    let (rest, mac) = payload.rsplit_once(' ')?;
    let (text, ms) = rest.rsplit_once(' ')?;
    let sent: i64 = ms.parse().ok()?;
    let mac = blake3::Hash::from_hex(mac).ok()?;
    let fresh = unix_ms(now).abs_diff(sent) <= MESSAGE_FRESH.as_millis() as u64;
    let sealed = seal.mac(
        Sealed::Message,
        &[channel.as_bytes(), text.as_bytes(), ms.as_bytes()],
    );
    (fresh && sealed == mac).then_some(text)
}

impl Fleet {
    /// Calls `listener` with every event another replica publishes (from a task of its own).
    pub fn on_event(&self, listener: impl Fn(Event) + Send + Sync + 'static) {
        let _ = self.inner.listener.set(Box::new(listener));
    }

    /// Tells the other replicas that the answer under `key` was replaced.
    pub fn replaced(&self, key: &CacheKey) {
        self.publish(Says::Replaced(*key));
    }

    /// Publishes what this replica `says`, from a task of its own (nothing waits on it).
    pub(super) fn publish(&self, says: Says) {
        let fleet = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let channel = fleet.inner.layout.channel();
            let mut message = Message {
                from: fleet.inner.replica.clone(),
                says,
            }
            .encode();
            if let Some(seal) = &fleet.inner.seal {
                message = seal_message(seal, &channel, &message, std::time::SystemTime::now());
            }
            let _: Result<i64, _> = fleet
                .call("publish", |mut c| async move {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(message)
                        .query_async(&mut c)
                        .await
                })
                .await;
        });
    }

    /// Starts listening to the fleet's events, once.
    pub(super) fn subscribe(&self) {
        if self.inner.subscribed.load(Ordering::Relaxed)
            || self.inner.subscribed.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.subscribed.store(false, Ordering::SeqCst);
            return;
        };
        // Weak: the task ends when the last handle on the fleet is gone.
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            use futures_util::StreamExt;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let fleet = Fleet { inner };
                let connected = fleet.listen().await;
                let mut pubsub = match connected {
                    Ok(pubsub) => pubsub,
                    Err(e) => {
                        fleet.failed("subscribe", &e);
                        drop(fleet);
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                };
                let weak_inner = Arc::downgrade(&fleet.inner);
                drop(fleet);
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Some(inner) = weak_inner.upgrade() else {
                        return;
                    };
                    let payload: String = message.get_payload().unwrap_or_default();
                    let fleet = Fleet { inner };
                    if let Some(message) = fleet.read_message(&payload) {
                        fleet.heard(message);
                    }
                }
                // The connection dropped: every waiter looks again, then we reconnect.
                if let Some(inner) = weak.upgrade() {
                    Fleet { inner }.wake_all();
                }
                tokio::time::sleep(BACKOFF).await;
            }
        });
    }

    /// A subscription to the fleet's channel: on the node `--redis` names or, in a cluster
    /// whose node that is went away, on another (plain pub/sub: a cluster carries what is
    /// published on any node to every node, so any node hears every replica).
    async fn listen(&self) -> Result<redis::aio::PubSub, String> {
        let nodes = match self.connection().await {
            Ok(mut conn) => conn.nodes(&self.inner.client).await,
            Err(_) => vec![self.inner.client.clone()],
        };
        let mut last = String::from("no node to listen on");
        for node in nodes {
            let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let mut pubsub = node.get_async_pubsub().await?;
                pubsub.subscribe(self.inner.layout.channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".to_owned(),
            }
        }
        Err(last)
    }

    /// The message a payload heard on the channel carries, if this replica may trust it (see
    /// the module documentation); one it may not is counted.
    fn read_message(&self, payload: &str) -> Option<Message> {
        let text = match &self.inner.seal {
            None => Some(payload),
            Some(seal) => {
                let channel = self.inner.layout.channel();
                open_message(seal, &channel, payload, std::time::SystemTime::now())
                    .filter(|_| self.first_hearing(payload))
            }
        };
        let message = text.and_then(Message::parse);
        if message.is_none() {
            self.rejected(Rejected::Message);
        }
        message
    }

    /// Whether the sealed message `payload` is heard for the first time within
    /// [`MESSAGE_FRESH`] (a message published again by someone who saw it is not obeyed
    /// twice); past that, its time is stale anyway.
    fn first_hearing(&self, payload: &str) -> bool {
        let Some((_, mac)) = payload.rsplit_once(' ') else {
            return false;
        };
        let Ok(mac) = blake3::Hash::from_hex(mac) else {
            return false;
        };
        let Ok(mut heard) = self.inner.heard.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        if heard.at.len() >= heard.clear_at {
            // Forgotten once stale on both sides of the clocks' disagreement.
            heard
                .at
                .retain(|_, at| now.duration_since(*at) <= MESSAGE_FRESH * 2);
            heard.clear_at = (heard.at.len() * 2).max(1024);
        }
        heard.at.insert(mac, now).is_none()
    }

    /// Handles one message.
    fn heard(&self, message: Message) {
        let event = match message.says {
            Says::Done(key) | Says::Live(key) => {
                let waiter = self
                    .inner
                    .waiters
                    .lock()
                    .ok()
                    .and_then(|w| w.get(&key).cloned());
                if let Some(waiter) = waiter {
                    waiter.notify_waiters();
                }
                return;
            }
            // What this replica said, it did already.
            _ if message.from == self.inner.replica => return,
            Says::Replaced(key) => Event::Replaced(key),
            Says::Purged(key) => Event::Purged(key),
            Says::PurgedAll => Event::PurgedAll,
        };
        if let Some(listener) = self.inner.listener.get() {
            listener(event);
        }
    }

    fn wake_all(&self) {
        if let Ok(waiters) = self.inner.waiters.lock() {
            for waiter in waiters.values() {
                waiter.notify_waiters();
            }
        }
    }

    /// The local waiter on another replica's flight of `key` (see `turns.rs`).
    pub(super) fn waiter(&self, key: &CacheKey) -> Arc<Notify> {
        let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.entry(*key).or_default().clone()
    }

    /// Forgets the waiter on `key` once nobody else waits on it.
    pub(super) fn forget_waiter(&self, key: &CacheKey, notify: &Arc<Notify>) {
        let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Two references: the map's and ours; nobody else waits on this key.
        if waiters.get(key).is_some_and(|n| Arc::ptr_eq(n, notify))
            && Arc::strong_count(notify) == 2
        {
            waiters.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written_and_nothing_else_reads() {
        let key = CacheKey::from_hex(&"ab".repeat(32)).expect("key");
        for says in [
            Says::Done(key),
            Says::Live(key),
            Says::Replaced(key),
            Says::Purged(key),
            Says::PurgedAll,
        ] {
            let message = Message {
                from: "0123456789abcdef".into(),
                says,
            };
            assert_eq!(Message::parse(&message.encode()), Some(message));
        }
        let seal = Seal::new(
            &super::super::FleetSecret::new("a secret of sixteen bytes or more").expect("secret"),
        );
        let now = std::time::SystemTime::now();
        let sealed = seal_message(&seal, "ch", "x purge all", now);
        assert_eq!(open_message(&seal, "ch", &sealed, now), Some("x purge all"));
        assert_eq!(
            open_message(&seal, "other", &sealed, now),
            None,
            "another channel"
        );
        let later = now + MESSAGE_FRESH + std::time::Duration::from_secs(1);
        assert_eq!(
            open_message(&seal, "ch", &sealed, later),
            None,
            "replayed later"
        );
        let other = Seal::new(
            &super::super::FleetSecret::new("another fleet's secret, sixteen+").expect("secret"),
        );
        assert_eq!(
            open_message(&other, "ch", &sealed, now),
            None,
            "another fleet"
        );
        assert_eq!(
            open_message(&seal, "ch", "x purge all", now),
            None,
            "not sealed"
        );
        let forged = sealed.replacen("purge all", "purge 00", 1);
        assert_eq!(open_message(&seal, "ch", &forged, now), None, "changed");
        for bad in [
            "",
            "x",
            "x purge",
            "x purge nothex",
            "x done all",
            "x shout all",
            "x purge all extra",
            " purge all",
        ] {
            assert_eq!(Message::parse(bad), None, "{bad:?}");
        }
    }
}
