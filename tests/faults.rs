//! Faults of the machine rather than of the input: the process killed with SIGKILL while it
//! writes, and a database another writer holds locked. Nothing already stored may be lost or
//! damaged, and the proxy keeps answering meanwhile.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{Behaviour, FakeUpstream, Proxy, chat, client, post, start_proxy};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_sustained_writes_leaves_a_consistent_database() {
    let upstream = FakeUpstream::with(Behaviour {
        forget_bodies: true,
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cache.sqlite3");
    let proxy = start_proxy(&db, &upstream.url());
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    // Eight clients each asking distinct questions as fast as answers come.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|worker| {
            let (url, stop, acknowledged) = (url.clone(), stop.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let c = client();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let body = chat(&format!("worker {worker} question {i}"));
                    let sent = c
                        .post(&url)
                        .header("authorization", "Bearer sk-test-key-1")
                        .body(body)
                        .send()
                        .await;
                    let Ok(answer) = sent else {
                        break; // the process is gone
                    };
                    let ok = answer.status() == 200;
                    if !(ok && answer.bytes().await.is_ok()) {
                        break;
                    }
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    // Killed in the middle of sustained writes: once 200 answers were acknowledged.
    common::eventually(|| acknowledged.load(Ordering::SeqCst) >= 200).await;
    let (code, _) = tokio::task::spawn_blocking(move || proxy.signal(Signal::SIGKILL))
        .await
        .expect("join");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(code, -1, "killed, not exited");
    let acknowledged = acknowledged.load(Ordering::SeqCst);

    // The file opens, is intact, and every entry in it is a complete answer.
    let conn = rusqlite::Connection::open(&db).expect("opens after SIGKILL");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(check, "ok");
    let mut stmt = conn
        .prepare("SELECT key, status, body, size FROM entries")
        .expect("query");
    let rows: Vec<(String, i64, Vec<u8>, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("read");
    for (key, status, body, size) in &rows {
        assert_eq!(*status, 200, "{key}");
        let answer: serde_json::Value =
            serde_json::from_slice(body).unwrap_or_else(|e| panic!("{key} is cut: {e}"));
        assert!(answer["choices"].is_array(), "{key}: {answer}");
        assert!(*size >= body.len() as i64, "{key}");
    }
    let lost = acknowledged.saturating_sub(rows.len());
    eprintln!(
        "{acknowledged} answers acknowledged, {} on disk after SIGKILL, {lost} lost",
        rows.len()
    );
}

/// The value of a counter in Prometheus text.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_locked_by_another_writer_is_waited_out_and_nothing_is_lost() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let proxy = Proxy::with_db(&upstream, &db).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    assert_eq!(post(&c, &url, chat("before"), &[]).await.cache, "miss");
    proxy.engine.flush().await.expect("flush");

    // Another process takes the write lock and keeps it.
    let mut other = rusqlite::Connection::open(&db).expect("open");
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("write lock");
    for i in 0..3 {
        let r = post(&c, &url, chat(&format!("during {i}")), &[]).await;
        assert_eq!(
            (r.status, r.cache.as_str()),
            (200, "miss"),
            "answered meanwhile"
        );
        let again = post(&c, &url, chat(&format!("during {i}")), &[]).await;
        assert_eq!(again.cache, "hit", "from memory");
    }
    // The writer waits out its busy timeout, fails, and counts it.
    let failed = "llm_dedup_store_errors_total";
    common::eventually_async(|| async {
        counter(&proxy.engine.metrics_text().await, failed) >= 1.0
    })
    .await;
    lock.rollback().expect("release");
    drop(other);

    // Once the lock is gone, what was kept is written.
    proxy.engine.flush().await.expect("flush");
    proxy.stop().await;
    let conn = rusqlite::Connection::open(&db).expect("open");
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM entries", [], |r| r.get(0))
        .expect("count");
    assert_eq!(stored, 4, "every answer reached the disk");
}

/// A purge made while an answer waits in the write queue (here: kept because another writer
/// held the lock) removes that answer too: it is not written after the purge and left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_removes_answers_queued_before_it() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let proxy = Proxy::with_db(&upstream, &db).await;
    let c = client();
    let url = proxy.url("/v1/chat/completions");
    assert_eq!(post(&c, &url, chat("stored"), &[]).await.cache, "miss");
    proxy.engine.flush().await.expect("flush");

    let mut other = rusqlite::Connection::open(&db).expect("open");
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("write lock");
    assert_eq!(post(&c, &url, chat("queued"), &[]).await.cache, "miss");
    let failed = "llm_dedup_store_errors_total";
    common::eventually_async(|| async {
        counter(&proxy.engine.metrics_text().await, failed) >= 1.0
    })
    .await;
    lock.rollback().expect("release");
    drop(other);
    // The operator purges everything, before the writer tries again.
    let mut inspector = llm_dedup::inspect::Inspector::open(&db).expect("inspector");
    let all = llm_dedup::inspect::Selection::default();
    let removed = inspector.purge(&all).expect("purged");
    assert_eq!(removed.len(), 1, "the stored answer");
    drop(inspector);

    proxy.engine.flush().await.expect("flush");
    let conn = rusqlite::Connection::open(&db).expect("open");
    let left: Vec<String> = conn
        .prepare("SELECT key FROM entries")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("read");
    assert!(
        left.is_empty(),
        "an answer queued before the purge was written after it: {left:?}"
    );
    // An answer made after the purge is kept.
    assert_eq!(post(&c, &url, chat("after"), &[]).await.cache, "miss");
    proxy.engine.flush().await.expect("flush");
    let count: i64 = conn
        .query_row("SELECT count(*) FROM entries", [], |r| r.get(0))
        .expect("count");
    assert_eq!(count, 1);
    proxy.stop().await;
}
