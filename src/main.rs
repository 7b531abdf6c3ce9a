//! The `llm-dedup` command: parses arguments and calls the library. No caching logic lives here.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use llm_dedup::Dedup;
use llm_dedup::inspect::Inspector;

mod report;
use tracing_subscriber::EnvFilter;

/// A caching, coalescing proxy for LLM APIs: repeats are answered from a local cache, identical
/// requests in flight at the same moment share one upstream call.
#[derive(Parser, Debug)]
#[command(name = "llm-dedup", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the caching proxy. Point a client's base URL at it (e.g.
    /// OPENAI_BASE_URL=http://127.0.0.1:8080/v1).
    Serve(Box<ServeArgs>),
    /// What the cache holds and what it saved since the database was created.
    Stats(StatsArgs),
    /// One line per stored answer.
    List(ListArgs),
    /// One stored answer with its metadata (KEY may be a unique prefix of at least 4 digits).
    Show(ShowArgs),
    /// Remove stored answers; prints what it removed.
    Purge(PurgeArgs),
    /// Write every stored answer as JSON Lines (to stdout, or --output).
    Export(ExportArgs),
    /// Add stored answers from an export (stdin, or --input); skips keys already present.
    Import(ImportArgs),
}

#[derive(clap::Args, Debug)]
struct DbArg {
    /// SQLite database file [default: the same as `serve`]
    #[arg(long, env = "LLM_DEDUP_DB")]
    db: Option<PathBuf>,

    /// Inspect a fleet's shared tier in this Redis instead of a database file (stats, list,
    /// show and purge)
    #[arg(
        long,
        env = "LLM_DEDUP_REDIS",
        value_name = "URL",
        conflicts_with = "db"
    )]
    redis: Option<String>,
}

impl DbArg {
    fn path(&self) -> Result<PathBuf> {
        match &self.db {
            Some(p) => Ok(p.clone()),
            None => default_db_path(),
        }
    }

    /// The fleet's Redis to inspect, if one was named.
    fn fleet(&self) -> Result<Option<llm_dedup::inspect::FleetInspector>> {
        self.redis
            .as_deref()
            .map(llm_dedup::inspect::FleetInspector::open)
            .transpose()
            .map_err(anyhow::Error::from)
    }

    fn open(&self) -> Result<Inspector> {
        if self.redis.is_some() {
            anyhow::bail!("export and import work on a database file, not on --redis");
        }
        let path = self.path()?;
        Inspector::open(&path).map_err(anyhow::Error::from)
    }
}

#[derive(clap::Args, Debug)]
struct StatsArgs {
    #[command(flatten)]
    db: DbArg,
    /// The price file the proxy serves with (--prices), to report its date.
    #[arg(long, env = "LLM_DEDUP_PRICES", value_name = "FILE")]
    prices: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
enum SortArg {
    /// Most recently used first.
    #[default]
    Recent,
    /// Most hits first.
    Hits,
    /// Largest first.
    Size,
}

#[derive(clap::Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    db: DbArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only answers for this model.
    #[arg(long)]
    model: Option<String>,
    /// Only answers for this route (chat.completions, completions, embeddings, responses,
    /// moderations, messages).
    #[arg(long)]
    route: Option<String>,
    /// Only answers stored longer ago than this (e.g. 12h, 7d).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// At most this many lines.
    #[arg(long)]
    limit: Option<usize>,
    /// Order of the lines.
    #[arg(long, value_enum, default_value_t = SortArg::Recent)]
    sort: SortArg,
}

#[derive(clap::Args, Debug)]
struct ShowArgs {
    #[command(flatten)]
    db: DbArg,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The key, or a unique prefix of it.
    key: String,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
    .args(["all", "key", "older_than", "model", "expired"])))]
struct PurgeArgs {
    #[command(flatten)]
    db: DbArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Remove every stored answer (asks first on a terminal, unless --yes).
    #[arg(long)]
    all: bool,
    /// Remove the answer with this key (or unique prefix).
    #[arg(long)]
    key: Option<String>,
    /// Remove answers stored longer ago than this (e.g. 30d).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Remove answers for this model.
    #[arg(long)]
    model: Option<String>,
    /// Remove answers past their TTL.
    #[arg(long)]
    expired: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    db: DbArg,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    db: DbArg,
    /// Read from this file instead of stdin.
    #[arg(long, short = 'i')]
    input: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LLM_DEDUP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Upstream base URL that requests are forwarded to.
    #[arg(
        long,
        env = "LLM_DEDUP_UPSTREAM",
        default_value = "https://api.openai.com"
    )]
    upstream: String,

    /// SQLite database file [default: llm-dedup/cache.sqlite3 in the platform's data
    /// directory, e.g. ~/.local/share on Linux]
    #[arg(long, env = "LLM_DEDUP_DB")]
    db: Option<PathBuf>,

    /// How long answers are served from the cache (e.g. 90s, 12h, 30d).
    #[arg(long, env = "LLM_DEDUP_TTL", default_value = "30d", value_parser = parse_ttl)]
    ttl: Duration,

    /// Bound of the in-memory tier (e.g. 256MiB, 2GiB).
    #[arg(long, env = "LLM_DEDUP_MEMORY", default_value = "256MiB")]
    memory: ByteSize,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "LLM_DEDUP_MAX_BODY", default_value = "64MiB")]
    max_body: ByteSize,

    /// Share one cache between all API keys (by default each credential has its own entries).
    /// A credential is answered from the shared cache only once the upstream has accepted it
    /// (see --verify-window).
    #[arg(long, env = "LLM_DEDUP_SHARED_CACHE")]
    shared_cache: bool,

    /// With --shared-cache: how long an upstream 2xx answer to a credential's request lets
    /// that credential be answered from the shared cache (e.g. 10m, 1h).
    #[arg(long, env = "LLM_DEDUP_VERIFY_WINDOW", default_value = "10m", value_parser = parse_wait)]
    verify_window: Duration,

    /// Share answers, in-flight requests and purges with the other replicas through this
    /// Redis or Valkey (redis://HOST:PORT, rediss:// for TLS) [default: no sharing]
    #[arg(long, env = "LLM_DEDUP_REDIS", value_name = "URL", value_parser = parse_redis_url)]
    redis: Option<String>,

    /// With --redis: where the other replicas reach this one (http://HOST:PORT). A replica
    /// following a stream this one receives reads the rest from here if Redis goes away
    /// mid-stream [default: the --listen address; for 0.0.0.0, this host's address towards
    /// the Redis]
    #[arg(long, env = "LLM_DEDUP_ADVERTISE", value_name = "URL", requires = "redis",
          value_parser = llm_dedup::advertised_url)]
    advertise: Option<String>,

    /// Another request header that identifies a caller (repeatable; the environment variable
    /// takes a comma-separated list). Added to authorization, x-api-key, api-key,
    /// ocp-apim-subscription-key, x-goog-api-key and proxy-authorization, to cookie, which
    /// otherwise counts only without those, and to openai-organization and openai-project,
    /// which count beside them.
    #[arg(long = "credential-header", value_name = "NAME", env = "LLM_DEDUP_CREDENTIAL_HEADER",
          value_delimiter = ',', value_parser = parse_credential_header)]
    credential_headers: Vec<String>,

    /// Another request header whose value changes the answer, so it enters the cache key
    /// (repeatable; the environment variable takes a comma-separated list). Added to
    /// anthropic-version, anthropic-beta, openai-beta, extra-parameters and
    /// azureml-model-deployment.
    #[arg(long = "key-header", value_name = "NAME", env = "LLM_DEDUP_KEY_HEADER",
          value_delimiter = ',', value_parser = parse_key_header)]
    key_headers: Vec<String>,

    /// Open /_llm-dedup/stats and /_llm-dedup/metrics to clients presenting
    /// `Authorization: Bearer TOKEN` (and to nobody else); prefer --admin-token-file, which
    /// keeps the token out of the process list [default: loopback clients only]
    #[arg(long, env = "LLM_DEDUP_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token,
          conflicts_with = "admin_token_file")]
    admin_token: Option<String>,

    /// As --admin-token, with the token read from this file (e.g. a mounted Kubernetes
    /// secret); surrounding blanks and a final newline are ignored
    #[arg(long, env = "LLM_DEDUP_ADMIN_TOKEN_FILE", value_name = "PATH",
          value_parser = read_token_file)]
    admin_token_file: Option<String>,

    /// A price file (the format of the built-in data/prices.json) whose models extend and
    /// override the built-in prices that value what the cache saves.
    #[arg(long, env = "LLM_DEDUP_PRICES", value_name = "FILE")]
    prices: Option<PathBuf>,

    /// Largest streamed answer stored; a longer stream is passed on live but not stored.
    #[arg(long, env = "LLM_DEDUP_MAX_STREAM", default_value = "32MiB")]
    max_stream: ByteSize,

    /// Requests per minute never to exceed upstream, per credential [default: learned from
    /// the upstream's rate-limit headers]
    #[arg(long, env = "LLM_DEDUP_RPM", value_parser = clap::value_parser!(u32).range(1..))]
    rpm: Option<u32>,

    /// Tokens per minute never to exceed upstream, per credential [default: learned from the
    /// upstream's rate-limit headers]
    #[arg(long, env = "LLM_DEDUP_TPM", value_parser = clap::value_parser!(u32).range(1..))]
    tpm: Option<u32>,

    /// Total time one request may spend waiting out upstream refusals (429, 5xx, ...) before
    /// the last answer is passed on as it came.
    #[arg(long, env = "LLM_DEDUP_RETRY_BUDGET", default_value = "60s", value_parser = parse_wait)]
    retry_budget: Duration,

    /// Longest a request waits in line for upstream budget before it is answered 429.
    #[arg(long, env = "LLM_DEDUP_MAX_QUEUE_WAIT", default_value = "60s", value_parser = parse_wait)]
    max_queue_wait: Duration,

    /// Most upstream calls at the same time [default: no bound]
    #[arg(long, env = "LLM_DEDUP_MAX_CONCURRENCY",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    max_concurrency: Option<usize>,

    /// Keep stored answers under this total size (e.g. 10GiB), removing the least recently
    /// used first [default: no bound]
    #[arg(long, env = "LLM_DEDUP_MAX_DISK")]
    max_disk: Option<ByteSize>,

    /// How long an embedding input headed upstream waits for inputs of other requests (same
    /// model, options, user and credential) to share its call, e.g. 5ms; 0 turns merging off.
    #[arg(long, env = "LLM_DEDUP_EMBED_BATCH_WINDOW", default_value = "5ms", value_parser = parse_window)]
    embed_batch_window: Duration,

    /// Most embedding inputs in one upstream call.
    #[arg(long, env = "LLM_DEDUP_EMBED_MAX_INPUTS", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    embed_max_inputs: u32,

    /// Most tokens in one upstream embeddings call (a text counts its bytes, a safe upper
    /// bound of its tokens).
    #[arg(long, env = "LLM_DEDUP_EMBED_MAX_TOKENS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    embed_max_tokens: u64,

    /// How long connecting to the upstream may take.
    #[arg(long, env = "LLM_DEDUP_UPSTREAM_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_wait)]
    upstream_connect_timeout: Duration,

    /// How long the upstream may take to begin its answer (status and headers): a
    /// non-streamed answer of a reasoning model comes whole after minutes of thinking. Keep it
    /// at most your clients' own timeout (the official SDKs': 10 minutes).
    #[arg(long, env = "LLM_DEDUP_UPSTREAM_TIMEOUT", default_value = "10m", value_parser = parse_wait)]
    upstream_timeout: Duration,

    /// The longest silence of the upstream once its answer (a body or a stream) has started.
    #[arg(long, env = "LLM_DEDUP_UPSTREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_wait)]
    upstream_idle_timeout: Duration,

    /// How long a request's headers may take to arrive (also how long an idle keep-alive
    /// connection stays open); then the connection is closed.
    #[arg(long, env = "LLM_DEDUP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_wait)]
    header_timeout: Duration,

    /// Longest silence while a request body arrives; then the request gets 408.
    #[arg(long, env = "LLM_DEDUP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_wait)]
    body_timeout: Duration,

    /// Most client connections open at once; past it, a connection gets 503 with Retry-After.
    #[arg(long, env = "LLM_DEDUP_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    max_connections: usize,

    /// Most bytes of request bodies held in memory at once, over all requests; past it, 503
    /// with Retry-After. At least --max-body.
    #[arg(long, env = "LLM_DEDUP_MAX_BUFFERED", default_value = "256MiB")]
    max_buffered: ByteSize,

    /// How long a stop (SIGTERM, Ctrl-C) waits for answers in progress before it closes their
    /// connections and exits.
    #[arg(long, env = "LLM_DEDUP_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_wait)]
    drain_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try e.g. 90s, 12h, 30d)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// A TTL: longer than zero, at most ten years (an expiry must stay a representable time).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    at_most(parse_duration(s)?, llm_dedup::MAX_TTL, "10 years")
}

/// A time a request may wait: longer than zero, at most one day.
fn parse_wait(s: &str) -> Result<Duration, String> {
    at_most(parse_duration(s)?, llm_dedup::MAX_SETTING_WAIT, "1 day")
}

fn at_most(d: Duration, max: Duration, spelled: &str) -> Result<Duration, String> {
    if d > max {
        return Err(format!("must be at most {spelled}"));
    }
    Ok(d)
}

/// An operator token: not empty (surrounding blanks are dropped, as a header value's are).
fn parse_token(s: &str) -> Result<String, String> {
    let token = s.trim();
    if token.is_empty() {
        return Err("is empty: give a secret, or leave the flag out".into());
    }
    Ok(token.to_owned())
}

/// The operator token in the file at `path`.
fn read_token_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_token(&text).map_err(|why| format!("{path} {why}"))
}

/// A Redis URL the client accepts (checked, not connected).
fn parse_redis_url(s: &str) -> Result<String, String> {
    redis::Client::open(s).map_err(|e| format!("not a Redis URL: {e}"))?;
    Ok(s.to_owned())
}

/// A key header name, checked as the engine will take it.
fn parse_key_header(s: &str) -> Result<String, String> {
    llm_dedup::key::KeyHeaders::with_extra([s])?;
    Ok(s.trim().to_ascii_lowercase())
}

/// A credential header name, checked as the engine will take it.
fn parse_credential_header(s: &str) -> Result<String, String> {
    llm_dedup::CredentialHeaders::with_extra([s])?;
    Ok(s.trim().to_ascii_lowercase())
}

/// A merging window: zero (off) up to one second.
fn parse_window(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (try e.g. 5ms, or 0 for off)"))?;
    if d > Duration::from_secs(1) {
        return Err(
            "must be at most 1s: every embedding request sent upstream waits that long".into(),
        );
    }
    Ok(d)
}

fn default_db_path() -> Result<PathBuf> {
    let dir = dirs::data_dir()
        .context("no data directory on this platform; pass --db PATH")?
        .join("llm-dedup");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    Ok(dir.join("cache.sqlite3"))
}

/// The built-in prices extended by the price file `file`.
pub(crate) fn read_prices(file: &std::path::Path) -> Result<llm_dedup::PriceTable> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--prices: cannot read {}", file.display()))?;
    llm_dedup::PriceTable::with_overrides(&text, &file.display().to_string())
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--prices: {} is not a price file", file.display()))
}

async fn serve(args: ServeArgs) -> Result<()> {
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
        .key_headers(
            llm_dedup::key::KeyHeaders::with_extra(&args.key_headers)
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
        .governor(llm_dedup::GovernorSettings {
            rpm: args.rpm,
            tpm: args.tpm,
            retry_budget: args.retry_budget,
            max_queue_wait: args.max_queue_wait,
            max_concurrency: args.max_concurrency,
        })
        .embeddings(llm_dedup::EmbedSettings {
            batch_window: args.embed_batch_window,
            max_inputs: args.embed_max_inputs as usize,
            max_tokens: args.embed_max_tokens,
        })
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
        if let Some(ip) = redis_host(redis).and_then(|(host, port)| route_to(&host, port)) {
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

/// The host and port of a Redis URL, unless it is a Unix socket.
fn redis_host(url: &str) -> Option<(String, u16)> {
    let info = redis::IntoConnectionInfo::into_connection_info(url).ok()?;
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("llm_dedup=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Stats(args) => report::stats(&args),
        Command::List(args) => report::list(&args),
        Command::Show(args) => report::show(&args),
        Command::Purge(args) => report::purge(&args),
        Command::Export(args) => report::export(&args),
        Command::Import(args) => report::import(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {}",
                llm_dedup::error::describe_chain(e.as_ref() as &(dyn std::error::Error + 'static))
            );
            ExitCode::FAILURE
        }
    }
}
