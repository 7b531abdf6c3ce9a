//! The fleet on a real three-master Redis Cluster (Debian's `redis-server` as cluster nodes,
//! joined by `redis-cli --cluster create`): everything the fleet does on one node, it does on
//! a cluster, with no Redis call failing (no `CROSSSLOT`, `MOVED` followed); a master killed
//! mid-traffic fails no request, and sharing resumes once it is back.
//!
//! Each test starts its own cluster on free loopback ports and skips, saying so, when
//! `redis-server` is not installed (CI fails instead).

mod common;

use common::fleet::{self, launch, replicas, stop};
use common::{FakeUpstream, RedisCluster, chat, client, post};

#[tokio::test]
async fn an_answer_from_one_replica_is_a_hit_on_another() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    fleet::an_answer_is_a_hit_everywhere(&cluster.url()).await;
}

#[tokio::test]
async fn identical_requests_on_three_replicas_make_one_upstream_call() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    fleet::identical_requests_make_one_call(&cluster.url()).await;
}

#[tokio::test]
async fn a_stream_is_shared_live_across_replicas() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    fleet::a_stream_is_shared_live(&cluster.url()).await;
}

#[tokio::test]
async fn replicas_share_a_fixed_window_budget() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    fleet::replicas_share_a_window_budget(&cluster.url()).await;
}

/// The inspector, pointed at one node, reads every master's entries, and its purge reaches
/// every replica (pub/sub carried over the cluster bus).
#[tokio::test]
async fn the_inspector_reads_every_master_and_its_purge_reaches_every_replica() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    fleet::the_inspector_reads_and_purges_every_replica(&cluster.url_of(1)).await;
}

/// Entries of many keys spread over the masters, each key's lease and stream beside its
/// entry: a cluster is used as one.
#[tokio::test]
async fn entries_spread_over_every_master() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let replicas = replicas(&upstream, &cluster.url()).await;
    let answers = fleet::answers(launch(&replicas, 30, |i| format!("spread {i}"))).await;
    assert!(answers.iter().all(|a| a.status == 200));
    common::eventually(|| cluster.keys("llm-dedup:*:e:*") == 30).await;
    for node in 0..3 {
        let held = cluster.command_on(node, "DBSIZE");
        let held: usize = held
            .trim_start_matches(':')
            .trim()
            .parse()
            .expect("a count");
        assert!(held > 0, "node {node} holds none of 30 entries");
    }
    fleet::stop_clean(replicas).await;
}

/// A master killed while requests flow: no request fails (each replica goes on alone while
/// the cluster is down), and once the master is back the replicas share answers again by
/// themselves.
#[tokio::test]
async fn a_master_killed_mid_traffic_fails_no_request_and_sharing_resumes() {
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let replicas = replicas(&upstream, &cluster.url()).await;
    let c = client();
    let before = fleet::answers(launch(&replicas, 30, |i| format!("before {i}"))).await;
    assert!(before.iter().all(|a| a.status == 200));

    let during = launch(&replicas, 60, |i| format!("during {i}"));
    cluster.kill(2);
    let during = fleet::answers(during).await;
    assert!(during.iter().all(|a| a.status == 200), "no request fails");
    cluster.wait_failed(0);
    let down = fleet::answers(launch(&replicas, 30, |i| format!("down {i}"))).await;
    assert!(
        down.iter().all(|a| a.status == 200),
        "none while it is down"
    );
    let mut errors = 0.0;
    for replica in &replicas {
        errors += common::figure(&replica.engine, "llm_dedup_redis_errors_total").await;
    }
    assert!(errors > 0.0, "the replicas saw the cluster fail");

    cluster.restart(2);
    // Sharing resumes: an answer one replica stores is a hit on another.
    let mut round = 0;
    common::eventually_async(|| {
        round += 1;
        let prompt = format!("after {round}");
        let (c, replicas) = (&c, &replicas);
        async move {
            let url = |i: usize| replicas[i].url("/v1/chat/completions");
            let first = post(c, &url(0), chat(&prompt), &[]).await;
            let again = post(c, &url(1), chat(&prompt), &[]).await;
            first.status == 200 && again.cache == "hit"
        }
    })
    .await;
    stop(replicas).await;
}

/// `--redis-mode single` on a cluster node uses it as one node (what every replica did before
/// the fleet knew clusters): keys of other slots are refused (`MOVED`), counted as Redis
/// errors, and no request fails.
#[tokio::test]
async fn a_cluster_taken_for_a_single_node_fails_no_request() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let proxy = common::Proxy::start(
        upstream
            .engine()
            .redis(cluster.url())
            .redis_mode(llm_dedup::RedisMode::Single),
    )
    .await;
    let seen = fleet::answers(launch(std::slice::from_ref(&proxy), 20, |i| {
        format!("q {i}")
    }))
    .await;
    assert!(seen.iter().all(|a| a.status == 200));
    let errors = common::figure(&proxy.engine, "llm_dedup_redis_errors_total").await;
    assert!(errors > 0.0, "keys of other nodes' slots are refused");
    proxy.stop().await;
}
