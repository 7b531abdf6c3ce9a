//! The `llm-dedup` binary as an operator runs it: start-up errors, and a clean stop by SIGTERM.

mod common;

use common::{Behaviour, FakeUpstream, chat, client, llm_dedup, post, start_proxy};

/// Runs the binary to completion and returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let (code, _, err) = common::run_cli(args);
    (code, err)
}

/// Starts `serve` on `db` with any free port; for start-up errors, which exit at once.
fn serve_on(db: &std::path::Path) -> (i32, String) {
    let db = db.to_str().expect("utf8 path");
    run(&["serve", "--listen", "127.0.0.1:0", "--db", db])
}

#[test]
fn an_invalid_listen_address_is_refused_with_a_clear_message() {
    let (code, err) = run(&["serve", "--listen", "not-an-address"]);
    assert_ne!(code, 0);
    assert!(err.contains("--listen"), "{err}");
    assert!(err.contains("not-an-address"), "{err}");
}

#[test]
fn invalid_sizes_and_durations_are_refused() {
    let (code, err) = run(&["serve", "--ttl", "forever"]);
    assert_ne!(code, 0);
    assert!(err.contains("--ttl"), "{err}");
    let (code, err) = run(&["serve", "--memory", "lots"]);
    assert_ne!(code, 0);
    assert!(err.contains("--memory"), "{err}");
}

#[test]
fn durations_out_of_range_are_refused_not_wrapped() {
    for (flag, value, bound) in [
        ("--ttl", "11y", "10 years"),
        ("--retry-budget", "2days", "1 day"),
        ("--max-queue-wait", "100000000y", "1 day"),
    ] {
        let (code, err) = run(&["serve", flag, value]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains(bound), "{flag}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, err) = run(&["serve", "--ttl", "584942417355y"]);
    assert_eq!(code, 2, "beyond what a duration holds: {err}");
    assert!(err.contains("--ttl") && err.contains("too large"), "{err}");
    for flag in ["--rpm", "--tpm", "--max-concurrency"] {
        let (code, err) = run(&["serve", flag, "0"]);
        assert_eq!(code, 2, "{flag} 0 would stop all traffic: {err}");
        assert!(err.contains(flag), "{err}");
    }
    let (code, err) = run(&["serve", "--max-concurrency", "18446744073709551615"]);
    assert_eq!(code, 2, "{err}");
    let (code, err) = run(&["serve", "--ttl", "10"]);
    assert_eq!(code, 2, "a bare number has no unit: {err}");
}

#[test]
fn tenancy_flags_are_checked_at_start_up() {
    for (args, expected) in [
        (
            &["serve", "--credential-header", "not a name"][..],
            "not a header name",
        ),
        (
            &["serve", "--credential-header", "Connection"][..],
            "transport or control",
        ),
        (
            &["serve", "--credential-header", "llm-dedup-ttl"][..],
            "transport or control",
        ),
        (&["serve", "--verify-window", "0s"][..], "longer than zero"),
        (&["serve", "--verify-window", "2days"][..], "1 day"),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let (code, err) = run(&["serve", "--admin-token", " "]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--admin-token") && err.contains("is empty"),
        "{err}"
    );
}

#[test]
fn fleet_flags_are_checked_at_start_up() {
    let redis = ["--redis", "redis://127.0.0.1:9"];
    for (extra, expected) in [
        (&["--advertise", "http://10.0.0.5:8080"][..], "--redis"),
        (
            &[redis[0], redis[1], "--advertise", "10.0.0.5:8080"][..],
            "http://",
        ),
        (
            &[redis[0], redis[1], "--advertise", "http://10.0.0.5:8080/v1"][..],
            "host and a port only",
        ),
        (
            &[
                redis[0],
                redis[1],
                "--advertise",
                "http://u:p@10.0.0.5:8080",
            ][..],
            "credentials",
        ),
        (&["--redis", "http://not-redis"][..], "not a Redis URL"),
    ] {
        let args: Vec<&str> = std::iter::once("serve")
            .chain(extra.iter().copied())
            .collect();
        let (code, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// With `--redis` and no `--advertise`, a replica tells the fleet the address it listens on
/// or, listening on every interface, its address towards the Redis, with its port.
#[test]
fn a_replica_advertises_where_it_listens_unless_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = "http://127.0.0.1:9";
    for (i, (listen, advertise)) in [
        ("127.0.0.1:0", None),
        ("0.0.0.0:0", None),
        ("0.0.0.0:0", Some("http://replica-a.internal:8080")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut args = vec!["--listen", listen, "--redis", "redis://127.0.0.1:9"];
        args.extend(advertise.iter().flat_map(|a| ["--advertise", *a]));
        let running =
            common::start_proxy_with(&dir.path().join(format!("{i}.db")), upstream, &args);
        let port = running.addr.rsplit(':').next().expect("port").to_owned();
        let expected = advertise.map_or(format!("http://127.0.0.1:{port}"), str::to_owned);
        let (_, log) = running.terminate();
        let told = log
            .lines()
            .find(|l| l.contains("telling the fleet where this replica is"))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(told.contains(&expected), "{listen}: {told}");
    }
}

/// Listening beyond loopback without an operator token is allowed (the operator endpoints
/// then answer loopback only) but said at start; with a token, nothing is said.
#[test]
fn serving_beyond_loopback_without_a_token_warns_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = "http://127.0.0.1:9";
    let open = common::start_proxy_with(
        &dir.path().join("a.db"),
        upstream,
        &["--listen", "0.0.0.0:0"],
    );
    let (_, log) = open.terminate();
    assert!(log.contains("without --admin-token"), "{log}");
    let guarded = common::start_proxy_with(
        &dir.path().join("b.db"),
        upstream,
        &["--listen", "0.0.0.0:0", "--admin-token", "s3cret-token"],
    );
    let (_, log) = guarded.terminate();
    assert!(!log.contains("without --admin-token"), "{log}");
    assert!(
        !log.contains("s3cret-token"),
        "the token is never logged: {log}"
    );
}

/// `--admin-token-file` reads the token from a file (a mounted secret), so it never sits in
/// the process list; a missing or empty file is refused at start.
#[test]
fn the_operator_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret-from-file\n").expect("write");
    let running = common::start_proxy_with(
        &dir.path().join("a.db"),
        "http://127.0.0.1:9",
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-token-file",
            file.to_str().expect("utf-8"),
        ],
    );
    let status = |token: Option<&str>| {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&running.addr).expect("connect");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            conn,
            "GET /_llm-dedup/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
        )
        .expect("sent");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("answer");
        answer[9..12].parse::<u16>().expect("status")
    };
    assert_eq!(status(Some("s3cret-from-file")), 200);
    assert_eq!(status(None), 401, "the token decides, loopback included");
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", running.child.id()))
        .unwrap_or_default();
    assert!(!cmdline.contains("s3cret-from-file"), "{cmdline}");
    let (_, log) = running.terminate();
    assert!(!log.contains("s3cret-from-file"), "never logged: {log}");

    std::fs::write(&file, " \n").expect("write");
    let (code, err) = run(&["serve", "--admin-token-file", file.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--admin-token-file") && err.contains("is empty"),
        "{err}"
    );
    let missing = dir.path().join("missing");
    let (code, err) = run(&[
        "serve",
        "--admin-token-file",
        missing.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn a_database_in_a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("no/such/dir/cache.db");
    let (code, err) = serve_on(&db);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("important.txt");
    let content = b"quarterly numbers, do not overwrite\n".repeat(200);
    std::fs::write(&db, &content).expect("write");
    let (code, err) = serve_on(&db);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not an SQLite database"), "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), content);
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        1,
        "no -wal/-shm files"
    );
}

#[test]
fn help_documents_every_flag_with_its_default_and_variable() {
    let out = llm_dedup()
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env, default) in [
        ("--listen", "LLM_DEDUP_LISTEN", Some("127.0.0.1:8080")),
        (
            "--upstream",
            "LLM_DEDUP_UPSTREAM",
            Some("https://api.openai.com"),
        ),
        ("--db", "LLM_DEDUP_DB", None),
        ("--ttl", "LLM_DEDUP_TTL", Some("30d")),
        ("--memory", "LLM_DEDUP_MEMORY", Some("256MiB")),
        ("--max-body", "LLM_DEDUP_MAX_BODY", Some("64MiB")),
        ("--shared-cache", "LLM_DEDUP_SHARED_CACHE", None),
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
        assert!(help.contains(env), "{env} missing from:\n{help}");
        if let Some(d) = default {
            assert!(help.contains(d), "default {d} missing from:\n{help}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_right_after_an_answer_loses_nothing() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cache.sqlite3");
    let c = client();
    let secret = "sk-proj-NEVERLOGGED42";
    let auth = format!("Bearer {secret}");

    let proxy = start_proxy(&db, &upstream.url());
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let mut keys = Vec::new();
    for i in 0..20 {
        let a = post(
            &c,
            &url,
            chat(&format!("q{i}")),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!((a.status, a.cache.as_str()), (200, "miss"));
        keys.push(a.key.expect("key"));
    }
    // Stop at once: the answers were received, the write-behind queue may not have committed.
    let (code, log) = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .expect("join");
    assert_eq!(code, 0, "clean exit; log:\n{log}");
    assert!(
        !log.contains("NEVERLOGGED"),
        "a credential reached the log:\n{log}"
    );
    // Debug logging was on, so each answer was logged (without its credential).
    let answered = log.lines().filter(|l| l.contains("answered")).count();
    assert_eq!(answered, 20, "{log}");

    // Every answer is on disk.
    let conn = rusqlite::Connection::open(&db).expect("open");
    for key in &keys {
        let n: i64 = conn
            .query_row("SELECT count(*) FROM entries WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .expect("query");
        assert_eq!(n, 1, "entry {key} lost");
    }
    drop(conn);

    // And a new process answers them from the cache.
    let proxy = start_proxy(&db, &upstream.url());
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let again = post(&c, &url, chat("q19"), &[("authorization", &auth)]).await;
    assert_eq!(again.cache, "hit");
    assert_eq!(upstream.calls(), 20);
    let (code, _) = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .expect("join");
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_upstream_refusal_is_logged_once_with_what_was_done() {
    let upstream = FakeUpstream::with(Behaviour {
        quota_exhausted: true,
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = start_proxy(&dir.path().join("c.db"), &upstream.url());
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let r = post(&client(), &url, chat("refused"), &[]).await;
    assert_eq!(r.status, 429);
    let (code, log) = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .expect("join");
    assert_eq!(code, 0);
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream refused the request"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    assert!(
        refusals[0].contains("INFO") && refusals[0].contains("status=429"),
        "{log}"
    );
    assert!(refusals[0].contains("not retried"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_under_only_if_cached_is_not_logged_as_a_failure() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = start_proxy(&dir.path().join("c.db"), &upstream.url());
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let headers = [("cache-control", "only-if-cached")];
    let r = post(&client(), &url, chat("never stored"), &headers).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body["error"]["code"], "not_cached");
    let (code, log) = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .expect("join");
    assert_eq!(code, 0);
    // The client asked for exactly this answer: a debug line, not a warning.
    assert!(!log.contains("WARN"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("request refused") && l.contains("504")),
        "{log}"
    );
    assert_eq!(upstream.calls(), 0);
}
