//! The command line: every subcommand's arguments, with their defaults, environment variables
//! and checks (clap), and the few values they name that need reading (the database's default
//! path, a price file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use llm_dedup::inspect::Inspector;

/// A caching, coalescing proxy for LLM APIs: repeats are answered from a local cache, identical
/// requests in flight at the same moment share one upstream call.
#[derive(Parser, Debug)]
#[command(name = "llm-dedup", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
pub(crate) struct DbArg {
    /// SQLite database file [default: the same as `serve`]
    #[arg(long, env = "LLM_DEDUP_DB")]
    pub(crate) db: Option<PathBuf>,

    /// Inspect a fleet's shared tier in this Redis instead of a database file (stats, list,
    /// show and purge)
    #[arg(
        long,
        env = "LLM_DEDUP_REDIS",
        value_name = "URL",
        conflicts_with = "db"
    )]
    pub(crate) redis: Option<String>,

    #[command(flatten)]
    pub(crate) fleet: FleetArgs,
}

/// How to speak to the fleet's Redis: its mode, and the fleet secret given inline or in a
/// file.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct FleetArgs {
    /// With --redis: whether the URL names a single node or any node of a Redis Cluster or
    /// Valkey cluster (auto asks the node with INFO cluster)
    #[arg(long, env = "LLM_DEDUP_REDIS_MODE", value_name = "MODE", default_value = "auto",
          value_parser = parse_redis_mode)]
    pub(crate) redis_mode: llm_dedup::RedisMode,

    /// With --redis: the secret every replica of the fleet and the inspector share (16 bytes
    /// or more, e.g. `openssl rand -hex 32`). What a replica writes to Redis is sealed with
    /// it and only what is sealed with it is trusted; prefer --fleet-secret-file, which keeps
    /// it out of the process list [default: none: Redis is trusted entirely]
    #[arg(long, env = "LLM_DEDUP_FLEET_SECRET", hide_env_values = true, requires = "redis",
          value_parser = SecretParser, conflicts_with = "fleet_secret_file")]
    pub(crate) fleet_secret: Option<llm_dedup::FleetSecret>,

    /// As --fleet-secret, read from this file (e.g. a mounted Kubernetes secret); a final
    /// newline is ignored
    #[arg(long, env = "LLM_DEDUP_FLEET_SECRET_FILE", value_name = "PATH", requires = "redis",
          value_parser = read_secret_file)]
    pub(crate) fleet_secret_file: Option<llm_dedup::FleetSecret>,
}

impl FleetArgs {
    /// The secret given, if any.
    pub(crate) fn secret(&self) -> Option<&llm_dedup::FleetSecret> {
        self.fleet_secret
            .as_ref()
            .or(self.fleet_secret_file.as_ref())
    }
}

impl DbArg {
    pub(crate) fn path(&self) -> Result<PathBuf> {
        match &self.db {
            Some(p) => Ok(p.clone()),
            None => default_db_path(),
        }
    }

    /// The fleet's Redis to inspect, if one was named.
    pub(crate) fn fleet(&self) -> Result<Option<llm_dedup::inspect::FleetInspector>> {
        let secret = self.fleet.secret();
        if self.redis.is_some() && secret.is_none() {
            eprintln!(
                "note: no --fleet-secret-file: entries are read unchecked, and replicas that run \
                 with a fleet secret ignore this inspector's purges"
            );
        }
        self.redis
            .as_deref()
            .map(|url| {
                llm_dedup::inspect::FleetInspector::open_as(url, secret, self.fleet.redis_mode)
            })
            .transpose()
            .map_err(anyhow::Error::from)
    }

    pub(crate) fn open(&self) -> Result<Inspector> {
        if self.redis.is_some() {
            anyhow::bail!("export and import work on a database file, not on --redis");
        }
        let path = self.path()?;
        Inspector::open(&path).map_err(anyhow::Error::from)
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// The price file the proxy serves with (--prices), to report its date.
    #[arg(long, env = "LLM_DEDUP_PRICES", value_name = "FILE")]
    pub(crate) prices: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub(crate) enum SortArg {
    /// Most recently used first.
    #[default]
    Recent,
    /// Most hits first.
    Hits,
    /// Largest first.
    Size,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Only answers for this model.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Only answers for this route (chat.completions, completions, embeddings, responses,
    /// moderations, messages).
    #[arg(long)]
    pub(crate) route: Option<String>,
    /// Only answers stored longer ago than this (e.g. 12h, 7d).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) older_than: Option<Duration>,
    /// At most this many lines.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Order of the lines.
    #[arg(long, value_enum, default_value_t = SortArg::Recent)]
    pub(crate) sort: SortArg,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// The key, or a unique prefix of it.
    pub(crate) key: String,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
    .args(["all", "key", "older_than", "model", "expired"])))]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Remove every stored answer (asks first on a terminal, unless --yes).
    #[arg(long)]
    pub(crate) all: bool,
    /// Remove the answer with this key (or unique prefix).
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Remove answers stored longer ago than this (e.g. 30d).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) older_than: Option<Duration>,
    /// Remove answers for this model.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Remove answers past their TTL.
    #[arg(long)]
    pub(crate) expired: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o')]
    pub(crate) output: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    pub(crate) db: DbArg,
    /// Read from this file instead of stdin.
    #[arg(long, short = 'i')]
    pub(crate) input: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LLM_DEDUP_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Upstream base URL that requests are forwarded to.
    #[arg(
        long,
        env = "LLM_DEDUP_UPSTREAM",
        default_value = "https://api.openai.com"
    )]
    pub(crate) upstream: String,

    /// SQLite database file [default: llm-dedup/cache.sqlite3 in the platform's data
    /// directory, e.g. ~/.local/share on Linux]
    #[arg(long, env = "LLM_DEDUP_DB")]
    pub(crate) db: Option<PathBuf>,

    /// How long answers are served from the cache (e.g. 90s, 12h, 30d).
    #[arg(long, env = "LLM_DEDUP_TTL", default_value = "30d", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,

    /// Bound of the in-memory tier (e.g. 256MiB, 2GiB).
    #[arg(long, env = "LLM_DEDUP_MEMORY", default_value = "256MiB")]
    pub(crate) memory: ByteSize,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "LLM_DEDUP_MAX_BODY", default_value = "64MiB")]
    pub(crate) max_body: ByteSize,

    /// Share one cache between all API keys (by default each credential has its own entries).
    /// A credential is answered from the shared cache only once the upstream has accepted it
    /// (see --verify-window).
    #[arg(long, env = "LLM_DEDUP_SHARED_CACHE")]
    pub(crate) shared_cache: bool,

    /// With --shared-cache: how long an upstream 2xx answer to a credential's request lets
    /// that credential be answered from the shared cache (e.g. 10m, 1h).
    #[arg(long, env = "LLM_DEDUP_VERIFY_WINDOW", default_value = "10m", value_parser = parse_wait)]
    pub(crate) verify_window: Duration,

    /// The longest an upstream call waits while another request in flight writes a long prompt
    /// prefix it shares in the provider's cache, so that it reads the prefix instead of paying
    /// to write it again (0 turns it off; at most 1m)
    #[arg(long, env = "LLM_DEDUP_PREFIX_WAIT", default_value = "2s", value_parser = parse_prefix_wait)]
    pub(crate) prefix_wait: Duration,

    /// Answers kept under one key for sampled requests (temperature absent or above 0, top_p
    /// below 1, or n above 1): while a key holds fewer, a repeat goes upstream and its answer
    /// is added; then repeats get one of them at random. A request's llm-dedup-bucket header
    /// overrides it (1 to 20)
    #[arg(long, env = "LLM_DEDUP_BUCKET", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=20))]
    pub(crate) bucket: u8,

    /// Share answers, in-flight requests and purges with the other replicas through this
    /// Redis or Valkey (redis://HOST:PORT, rediss:// for TLS) [default: no sharing]
    #[arg(long, env = "LLM_DEDUP_REDIS", value_name = "URL", value_parser = parse_redis_url)]
    pub(crate) redis: Option<String>,

    /// With --redis: where the other replicas reach this one (http://HOST:PORT). A replica
    /// following a stream this one receives reads the rest from here if Redis goes away
    /// mid-stream [default: the --listen address; for 0.0.0.0, this host's address towards
    /// the Redis]
    #[arg(long, env = "LLM_DEDUP_ADVERTISE", value_name = "URL", requires = "redis",
          value_parser = llm_dedup::unstable::advertised_url)]
    pub(crate) advertise: Option<String>,

    #[command(flatten)]
    pub(crate) fleet: FleetArgs,

    /// Another request header that identifies a caller (repeatable; the environment variable
    /// takes a comma-separated list). Added to authorization, x-api-key, api-key,
    /// ocp-apim-subscription-key, x-goog-api-key and proxy-authorization, to cookie, which
    /// otherwise counts only without those, and to openai-organization and openai-project,
    /// which count beside them.
    #[arg(long = "credential-header", value_name = "NAME", env = "LLM_DEDUP_CREDENTIAL_HEADER",
          value_delimiter = ',', value_parser = parse_credential_header)]
    pub(crate) credential_headers: Vec<String>,

    /// Another request header whose value changes the answer, so it enters the cache key
    /// (repeatable; the environment variable takes a comma-separated list). Added to
    /// anthropic-version, anthropic-beta, openai-beta, extra-parameters and
    /// azureml-model-deployment.
    #[arg(long = "key-header", value_name = "NAME", env = "LLM_DEDUP_KEY_HEADER",
          value_delimiter = ',', value_parser = parse_key_header)]
    pub(crate) key_headers: Vec<String>,

    /// Open /_llm-dedup/stats and /_llm-dedup/metrics to clients presenting
    /// `Authorization: Bearer TOKEN` (and to nobody else); prefer --admin-token-file, which
    /// keeps the token out of the process list [default: loopback clients only]
    #[arg(long, env = "LLM_DEDUP_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token,
          conflicts_with = "admin_token_file")]
    pub(crate) admin_token: Option<String>,

    /// As --admin-token, with the token read from this file (e.g. a mounted Kubernetes
    /// secret); surrounding blanks and a final newline are ignored
    #[arg(long, env = "LLM_DEDUP_ADMIN_TOKEN_FILE", value_name = "PATH",
          value_parser = read_token_file)]
    pub(crate) admin_token_file: Option<String>,

    /// A price file (the format of the built-in data/prices.json) whose models extend and
    /// override the built-in prices that value what the cache saves.
    #[arg(long, env = "LLM_DEDUP_PRICES", value_name = "FILE")]
    pub(crate) prices: Option<PathBuf>,

    /// Largest streamed answer stored; a longer stream is passed on live but not stored.
    #[arg(long, env = "LLM_DEDUP_MAX_STREAM", default_value = "32MiB")]
    pub(crate) max_stream: ByteSize,

    /// Requests per minute never to exceed upstream, per credential [default: learned from
    /// the upstream's rate-limit headers]
    #[arg(long, env = "LLM_DEDUP_RPM", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rpm: Option<u32>,

    /// Tokens per minute never to exceed upstream, per credential [default: learned from the
    /// upstream's rate-limit headers]
    #[arg(long, env = "LLM_DEDUP_TPM", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) tpm: Option<u32>,

    /// Total time one request may spend waiting out upstream refusals (429, 5xx, ...) before
    /// the last answer is passed on as it came.
    #[arg(long, env = "LLM_DEDUP_RETRY_BUDGET", default_value = "60s", value_parser = parse_wait)]
    pub(crate) retry_budget: Duration,

    /// Longest a request waits in line for upstream budget before it is answered 429.
    #[arg(long, env = "LLM_DEDUP_MAX_QUEUE_WAIT", default_value = "60s", value_parser = parse_wait)]
    pub(crate) max_queue_wait: Duration,

    /// Most upstream calls at the same time [default: no bound]
    #[arg(long, env = "LLM_DEDUP_MAX_CONCURRENCY",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub(crate) max_concurrency: Option<usize>,

    /// Keep stored answers under this total size (e.g. 10GiB), removing the least recently
    /// used first [default: no bound]
    #[arg(long, env = "LLM_DEDUP_MAX_DISK")]
    pub(crate) max_disk: Option<ByteSize>,

    /// How long an embedding input headed upstream waits for inputs of other requests (same
    /// model, options, user and credential) to share its call, e.g. 5ms; 0 turns merging off.
    #[arg(long, env = "LLM_DEDUP_EMBED_BATCH_WINDOW", default_value = "5ms", value_parser = parse_window)]
    pub(crate) embed_batch_window: Duration,

    /// Most embedding inputs in one upstream call.
    #[arg(long, env = "LLM_DEDUP_EMBED_MAX_INPUTS", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) embed_max_inputs: u32,

    /// Most tokens in one upstream embeddings call (a text counts its bytes, a safe upper
    /// bound of its tokens).
    #[arg(long, env = "LLM_DEDUP_EMBED_MAX_TOKENS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) embed_max_tokens: u64,

    /// How long connecting to the upstream may take.
    #[arg(long, env = "LLM_DEDUP_UPSTREAM_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_wait)]
    pub(crate) upstream_connect_timeout: Duration,

    /// How long the upstream may take to begin its answer (status and headers): a
    /// non-streamed answer of a reasoning model comes whole after minutes of thinking. Keep it
    /// at most your clients' own timeout (the official SDKs': 10 minutes).
    #[arg(long, env = "LLM_DEDUP_UPSTREAM_TIMEOUT", default_value = "10m", value_parser = parse_wait)]
    pub(crate) upstream_timeout: Duration,

    /// The longest silence of the upstream once its answer (a body or a stream) has started.
    #[arg(long, env = "LLM_DEDUP_UPSTREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_wait)]
    pub(crate) upstream_idle_timeout: Duration,

    /// How long a request's headers may take to arrive (also how long an idle keep-alive
    /// connection stays open); then the connection is closed.
    #[arg(long, env = "LLM_DEDUP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_wait)]
    pub(crate) header_timeout: Duration,

    /// Longest silence while a request body arrives; then the request gets 408.
    #[arg(long, env = "LLM_DEDUP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_wait)]
    pub(crate) body_timeout: Duration,

    /// Most client connections open at once; past it, a connection gets 503 with Retry-After.
    #[arg(long, env = "LLM_DEDUP_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub(crate) max_connections: usize,

    /// Most bytes of request bodies held in memory at once, over all requests; past it, 503
    /// with Retry-After. At least --max-body.
    #[arg(long, env = "LLM_DEDUP_MAX_BUFFERED", default_value = "256MiB")]
    pub(crate) max_buffered: ByteSize,

    /// How long a stop (SIGTERM, Ctrl-C) waits for answers in progress before it closes their
    /// connections and exits.
    #[arg(long, env = "LLM_DEDUP_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_wait)]
    pub(crate) drain_timeout: Duration,
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

/// A fleet secret given inline.
/// Reads a fleet secret given inline; a bad one is refused without showing it (clap's own
/// error for a value would print it to the terminal and to whatever collects its output).
#[derive(Clone)]
struct SecretParser;

impl clap::builder::TypedValueParser for SecretParser {
    type Value = llm_dedup::FleetSecret;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        llm_dedup::FleetSecret::new(value.as_encoded_bytes()).map_err(|why| {
            let name = arg.map(|a| a.to_string()).unwrap_or_default();
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}' (not shown): {why}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

/// The fleet secret in the file at `path`.
fn read_secret_file(path: &str) -> Result<llm_dedup::FleetSecret, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    llm_dedup::FleetSecret::new(bytes).map_err(|why| format!("{path}: {why}"))
}

/// A Redis mode: auto, single or cluster.
fn parse_redis_mode(s: &str) -> Result<llm_dedup::RedisMode, String> {
    s.parse()
}

/// A Redis URL the client accepts (checked, not connected).
fn parse_redis_url(s: &str) -> Result<String, String> {
    llm_dedup::unstable::redis_address(s)?;
    Ok(s.to_owned())
}

/// A key header name, checked as the engine will take it.
fn parse_key_header(s: &str) -> Result<String, String> {
    llm_dedup::KeyHeaders::with_extra([s])?;
    Ok(s.trim().to_ascii_lowercase())
}

/// A credential header name, checked as the engine will take it.
fn parse_credential_header(s: &str) -> Result<String, String> {
    llm_dedup::CredentialHeaders::with_extra([s])?;
    Ok(s.trim().to_ascii_lowercase())
}

/// A prefix wait: zero (off) up to a minute.
fn parse_prefix_wait(s: &str) -> Result<Duration, String> {
    at_most(parse_duration(s)?, Duration::from_secs(60), "1m")
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

pub(crate) fn default_db_path() -> Result<PathBuf> {
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
