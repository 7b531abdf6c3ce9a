//! `llm-dedup serve`: the proxy wired from its arguments, and what the process does around
//! it (the open-file limit, the address the fleet is told, handing freed memory back, signals).

use anyhow::{Context, Result};
use llm_dedup::Dedup;

use super::args::{ServeArgs, default_db_path, read_prices};

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let db = match args.db {
        Some(path) => path,
        None => default_db_path()?,
    };
    let max_body = usize::try_from(args.max_body.as_u64()).context("--max-body is too large")?;
    if args.max_buffered.as_u64() < args.max_body.as_u64() {
        anyhow::bail!(
            "--max-buffered ({}) must be at least --max-body ({}): a request of --max-body \
             could never be held",
            args.max_buffered,
            args.max_body
        );
    }
    let limits = llm_dedup::server::EdgeLimits::default()
        .header_timeout(args.header_timeout)
        .body_timeout(args.body_timeout)
        .max_connections(files_for(args.max_connections))
        .max_buffered(args.max_buffered.as_u64())
        .drain_timeout(args.drain_timeout);
    let max_stream =
        usize::try_from(args.max_stream.as_u64()).context("--max-stream is too large")?;
    let mut builder = Dedup::builder();
    if let Some(file) = &args.prices {
        builder = builder.prices(read_prices(file)?);
    }
    // Bound before the engine is built: the fleet is told the port really listened on.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("listening socket")?;
    if let Some(redis) = &args.redis {
        builder = builder.redis(redis);
        let advertise = match &args.advertise {
            Some(url) => url.clone(),
            None => default_advertise(redis, local),
        };
        tracing::info!(
            advertise,
            "telling the fleet where this replica is (see --advertise)"
        );
        builder = builder.advertise(advertise);
        builder = builder.redis_mode(args.fleet.redis_mode);
        match args.fleet.secret() {
            Some(secret) => builder = builder.fleet_secret(secret.clone()),
            None => tracing::warn!(
                "no --fleet-secret: this replica trusts whatever the fleet's Redis holds and \
                 says (answers, purges, peers), and reads no stream's rest from another \
                 replica if Redis goes away; set a secret if anyone but the replicas can \
                 write to that Redis"
            ),
        }
    }
    let engine = builder
        .upstream(&args.upstream)
        .database(&db)
        .memory_bytes(args.memory.as_u64())
        .ttl(args.ttl)
        .max_body(max_body)
        .max_stream_bytes(max_stream)
        .shared_cache(args.shared_cache)
        .verify_window(args.verify_window)
        .prefix_wait(args.prefix_wait)
        .bucket(args.bucket)
        .key_headers(
            llm_dedup::KeyHeaders::with_extra(&args.key_headers)
                .map_err(anyhow::Error::msg)
                .context("--key-header")?,
        )
        .credential_headers(
            llm_dedup::CredentialHeaders::with_extra(&args.credential_headers)
                .map_err(anyhow::Error::msg)
                .context("--credential-header")?,
        )
        .max_disk(args.max_disk.map(|b| b.as_u64()))
        .timeouts(
            llm_dedup::Timeouts::default()
                .connect(args.upstream_connect_timeout)
                .first_byte(args.upstream_timeout)
                .idle(args.upstream_idle_timeout),
        )
        .governor(
            llm_dedup::GovernorSettings::default()
                .rpm(args.rpm)
                .tpm(args.tpm)
                .retry_budget(args.retry_budget)
                .max_queue_wait(args.max_queue_wait)
                .max_concurrency(args.max_concurrency),
        )
        .embeddings(
            llm_dedup::EmbedSettings::default()
                .batch_window(args.embed_batch_window)
                .max_inputs(args.embed_max_inputs as usize)
                .max_tokens(args.embed_max_tokens),
        )
        .build()
        .context("cannot start the cache")?;
    let access = match args.admin_token.as_ref().or(args.admin_token_file.as_ref()) {
        Some(token) => llm_dedup::server::OperatorAccess::token(token),
        None => {
            if !local.ip().is_loopback() {
                tracing::warn!(
                    listen = %local,
                    "listening beyond loopback without --admin-token: the operator endpoints \
                     (/_llm-dedup/stats, /_llm-dedup/metrics) answer loopback clients only; \
                     set --admin-token to read them from elsewhere"
                );
            }
            llm_dedup::server::OperatorAccess::loopback_only()
        }
    };
    let shutdown = shutdown_signal();
    give_back_freed_memory();
    tracing::info!(
        listen = %local,
        upstream = engine.upstream(),
        db = %db.display(),
        shared_cache = args.shared_cache,
        redis = args.redis.is_some(),
        "llm-dedup proxy ready"
    );
    llm_dedup::server::serve(listener, engine, access, limits, shutdown)
        .await
        .context("serving")?;
    tracing::info!("stopped cleanly; every stored answer is on disk");
    Ok(())
}

/// Files the process keeps open besides client connections: the listener, upstream and
/// Redis connections, the database and its journal, the runtime's own.
#[cfg(unix)]
const FILES_BESIDE_CONNECTIONS: u64 = 256;

/// The most client connections the open-file limit allows, up to `wanted`: the soft limit is
/// raised as far as the hard one lets it (a service manager's default soft limit, 1,024, is
/// below the default `--max-connections`). Past the limit, accepting would fail instead.
fn files_for(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let needed = (wanted as u64).saturating_add(FILES_BESIDE_CONNECTIONS);
        match rlimit::increase_nofile_limit(needed) {
            Ok(limit) if limit < needed => {
                let fits = usize::try_from(limit.saturating_sub(FILES_BESIDE_CONNECTIONS))
                    .unwrap_or(usize::MAX)
                    .max(1);
                tracing::warn!(
                    open_files = limit,
                    max_connections = fits,
                    "the open-file limit is below what --max-connections needs: serving at most \
                     this many connections (raise the hard limit, e.g. LimitNOFILE=)"
                );
                return fits;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
        }
    }
    wanted
}

/// Where the other replicas reach this one when `--advertise` is not given: the address
/// listened on, or, when that is every interface, the address this host reaches the fleet's
/// Redis from (the network the replicas share), with the port listened on.
fn default_advertise(redis: &str, local: std::net::SocketAddr) -> String {
    let mut addr = local;
    if local.ip().is_unspecified() {
        let host = llm_dedup::unstable::redis_address(redis).ok().flatten();
        if let Some(ip) = host.and_then(|(host, port)| route_to(&host, port)) {
            addr.set_ip(ip);
        } else {
            // Redis on a Unix socket, or not resolvable now: replicas on this host.
            addr.set_ip(if local.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
    }
    format!("http://{addr}")
}

/// The local address packets to `host:port` leave from (a UDP socket's route; nothing sent).
fn route_to(host: &str, port: u16) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let target = (host, port).to_socket_addrs().ok()?.next()?;
    let any: std::net::SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// How often the proxy hands the allocator's free pages back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Hands the pages glibc's allocator holds free back to the system every [`TRIM_EVERY`]
/// (`malloc_trim`), for the life of the process. A full memory tier evicts and stores
/// answers of varied sizes all the time; the pages freed in the middle of the heap are
/// otherwise kept, and resident memory creeps up (BENCHMARKS.md, the memory soak: a trim
/// took 4.3 MiB off a proxy at `--memory 64MiB`). The proxy's own choice: the library,
/// embedded in another program, leaves that program's allocator alone.
#[allow(unsafe_code)]
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    // SAFETY: malloc_trim takes no pointer and only walks glibc's own arenas
                    // under their locks; it is safe to call from any thread at any time.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that trims the heap; memory stays as the allocator keeps it");
        }
    }
}

/// Listens for Ctrl-C and SIGTERM from the moment it is called (not from the first poll: a
/// signal sent right after "proxy ready" must find the handler in place), and resolves on
/// either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| tracing::error!(error = %e, "cannot listen for {name}"))
                .ok()
        };
        (
            listen(SignalKind::interrupt(), "Ctrl-C"),
            listen(SignalKind::terminate(), "SIGTERM"),
        )
    };
    async move {
        #[cfg(unix)]
        {
            async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = received(&mut interrupt) => {},
                () = received(&mut terminate) => {},
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("shutting down: draining requests and flushing the database");
    }
}
