//! llm-dedup ends duplicate LLM API traffic.
//!
//! It answers repeated requests from its cache (memory, then SQLite, then a fleet's Redis),
//! merges identical requests in flight at the same moment into one upstream call, and passes
//! everything else through unchanged. The same engine runs inside a Rust program ([`Dedup`])
//! and behind the `llm-dedup serve` proxy ([`server`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), llm_dedup::Error> {
//! use llm_dedup::{CacheStatus, Dedup};
//!
//! let engine = Dedup::builder()
//!     .upstream("https://api.openai.com")
//!     .build()?;
//! let request = http::Request::post("/v1/embeddings")
//!     .header("authorization", "Bearer sk-...")
//!     .header("content-type", "application/json")
//!     .body(http_body_util::Full::new(bytes::Bytes::from_static(
//!         br#"{"model": "text-embedding-3-small", "input": "hello"}"#,
//!     )))
//!     .expect("a valid request");
//! let answer = engine.send(request).await?;
//! assert!(matches!(answer.cache, CacheStatus::Miss | CacheStatus::Hit | CacheStatus::Coalesced));
//! let body = answer.into_bytes().await?;
//! # let _ = body;
//! engine.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # An existing `reqwest` client (feature `middleware`)
//!
//! [`middleware::DedupMiddleware`] plugs the engine into a `reqwest-middleware` chain: every
//! request to the engine's upstream goes through the cache, everything else goes on down the
//! chain.
//!
#![cfg_attr(
    feature = "middleware",
    doc = r##"```no_run
# async fn demo() -> Result<(), Box<dyn std::error::Error>> {
let engine = llm_dedup::Dedup::builder().upstream("https://api.openai.com").build()?;
let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    .with(llm_dedup::middleware::DedupMiddleware::new(engine.clone()))
    .build();
let answer = client
    .post("https://api.openai.com/v1/embeddings")
    .bearer_auth("sk-...")
    .body(r#"{"model": "text-embedding-3-small", "input": "hello"}"#)
    .send()
    .await?;
assert!(answer.headers().contains_key("llm-dedup-cache"));
# Ok(()) }
```"##
)]
//!
//! # A tower service
//!
//! A [`Dedup`] is a `tower::Service<http::Request<B>>` answering `http::Response<AnswerBody>`
//! (and `http::Response::from(answer)` turns an [`Answer`] into one), so it drops into axum,
//! hyper or any tower stack; `tower::ServiceExt::oneshot` sends one request.
//!
//! # Defaults worth knowing in a program
//!
//! The engine paces calls under the upstream's rate limit and waits out `429`s for up to a
//! minute ([`GovernorSettings`]): with a client that already retries (the official SDKs retry
//! twice), [`GovernorSettings::off`] hands every answer on as it came. Concurrent embedding
//! requests of one credential are merged into shared upstream calls within 5 ms
//! ([`EmbedSettings`]); `EmbedSettings::default().batch_window(Duration::ZERO)` turns that
//! off. Without `DedupBuilder::database` the cache lives in memory only.
//!
//! # Sharing and shutting down
//!
//! [`Dedup`] is cheap to clone; clones share the memory tier, the in-flight table and the
//! database writer, so one engine serves every task of a program. Two engines never share
//! anything, unless they are replicas on one Redis (`DedupBuilder::redis`). The
//! only state outside an engine is a small per-thread table of shortcuts to
//! answers in memory, each tagged with the engine it belongs to. Dropping the last handle lets
//! the writer commit what is queued in the background; [`Dedup::close`] waits for in-flight
//! upstream calls and for that commit.
//!
//! # Cargo features
//!
//! Each is a face or a tier; all but `middleware` are on by default, and a program embedding
//! the engine usually turns off what it does not use (`default-features = false`):
//!
//! - `sqlite`: the disk tier (`DedupBuilder::database`, `max_disk`, `sweep_interval`) and
//!   `inspect::Inspector`, on bundled SQLite. Without it, answers live in memory (and a
//!   fleet's Redis), and no `libsqlite3-sys` enters the program.
//! - `redis`: the fleet tier (`DedupBuilder::redis`, `fleet_secret`, `advertise`,
//!   `redis_mode`) and `inspect::FleetInspector`.
//! - `server`: the proxy's HTTP face ([`server`]), on axum and hyper.
//! - `middleware`: the reqwest-middleware adapter ([`middleware`]).
//! - `cli`: the `llm-dedup` binary; it needs the others but `middleware`.
//!
//! See `ARCHITECTURE.md` for the map of the modules and the invariants they keep.

// Leaves: they import nothing of the crate but each other (see ARCHITECTURE.md).
mod answer;
mod counts;
mod error;
#[cfg(test)]
mod fuzzing;
mod headers;
mod inflight;
mod key;
mod prefix;
mod prices;
mod route;
mod series;
mod sse;
mod throttle;
mod usage;

// The engine and what it is made of.
mod controls;
mod embeddings;
mod engine;
mod entry;
mod fleet;
mod governor;
mod live;
mod memory;
mod metrics;
// Without the `sqlite` feature, a disk tier that cannot be opened stands in.
#[cfg_attr(not(feature = "sqlite"), path = "store/off.rs")]
mod store;
mod upstream;

// The faces: the proxy, the inspector's queries, the reqwest middleware.
pub mod inspect;
#[cfg(feature = "middleware")]
pub mod middleware;
#[cfg(feature = "server")]
mod page;
#[cfg(feature = "server")]
pub mod server;
mod service;

pub use answer::{Answer, AnswerBody, CacheStatus};
pub use controls::MAX_TTL;
pub use counts::Counts;
pub use embeddings::EmbedSettings;
pub use engine::{DEFAULT_PREFIX_WAIT, DEFAULT_VERIFY_WINDOW, Dedup, DedupBuilder, LiveFigures};
pub use error::{Error, ErrorKind, Origin};
#[cfg(feature = "redis")]
pub use fleet::{FleetSecret, RedisMode};
pub use governor::{GovernorSettings, MAX_SETTING_WAIT};
pub use headers::{BUCKET_HEADER, CACHE_HEADER, KEY_HEADER, NAMESPACE_HEADER, TTL_HEADER};
pub use key::{
    CacheKey, CredentialHeaders, DEFAULT_IGNORED_FIELDS, KEY_VERSION, KeyHeaders, KeyPolicy,
    MAX_BUCKET,
};
pub use prices::{PriceTable, PricesInfo, Usd};
pub use route::Route;
pub use series::SeriesSnapshot;
pub use service::{DedupLayer, DedupService, UpstreamBody};
pub use upstream::Timeouts;
pub use usage::Usage;

/// Internals that the crate's own binary, benchmarks and tests reach. No stability promise:
/// any release may change or remove them; a program embedding llm-dedup should not use them.
#[doc(hidden)]
pub mod unstable {
    pub use crate::error::describe_chain;
    #[cfg(feature = "redis")]
    pub use crate::fleet::{Layout as FleetLayout, advertised_url, redis_address};
    pub use crate::key::{CanonicalBody, CredentialFingerprint, KeyParts, Partition};
    pub use crate::prefix::Prefixes;
}

#[cfg(test)]
mod architecture {
    //! ARCHITECTURE.md's boundaries, enforced: the leaves import nothing of the crate but each
    //! other, no two top-level modules import each other (directly or round a circle), the
    //! engine imports none of the faces above it, and only the fleet names the redis crate.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The leaf modules: what everything uses, importing nothing above.
    const LEAVES: &[&str] = &[
        "answer", "counts", "error", "fuzzing", "headers", "inflight", "key", "prefix", "prices",
        "route", "series", "sse", "throttle", "usage",
    ];

    /// The faces over the engine: it imports none of them.
    const FACES: &[&str] = &["inspect", "middleware", "page", "server", "service"];

    /// Every Rust file under `dir`.
    fn files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("src readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
        found
    }

    /// Each top-level module of the library and the top-level modules its files name
    /// (`crate::name`), itself left out. The binary's own files (`main.rs`, `report.rs`,
    /// `cli/`) are not the library's.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files(&src) {
            let relative = file.strip_prefix(&src).expect("under src");
            let first = relative
                .iter()
                .next()
                .and_then(|c| c.to_str())
                .unwrap_or("");
            let module = first.trim_end_matches(".rs").to_owned();
            if matches!(module.as_str(), "lib" | "main" | "report" | "cli") {
                continue;
            }
            let source = std::fs::read_to_string(&file).expect("readable");
            assert!(
                !source.contains("crate::{"),
                "{}: name each module (`crate::a::..`), not `crate::{{..}}`",
                relative.display()
            );
            let named = graph.entry(module.clone()).or_default();
            for (at, _) in source.match_indices("crate::") {
                let other: String = source[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !other.is_empty() && other != module {
                    named.insert(other);
                }
            }
        }
        graph
    }

    #[test]
    fn leaves_import_nothing_but_leaves() {
        for (module, named) in imports() {
            if LEAVES.contains(&module.as_str()) {
                for other in named {
                    assert!(
                        LEAVES.contains(&other.as_str()),
                        "the leaf `{module}` reaches up to `crate::{other}`"
                    );
                }
            }
        }
    }

    #[test]
    fn no_two_modules_import_each_other_round_a_circle() {
        let graph = imports();
        // Depth-first, keeping the path: a module met again on it closes a circle.
        fn visit(
            module: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if let Some(at) = path.iter().position(|m| m == module) {
                panic!("an import circle: {} -> {module}", path[at..].join(" -> "));
            }
            if !done.insert(module.to_owned()) {
                return;
            }
            path.push(module.to_owned());
            for other in graph.get(module).into_iter().flatten() {
                visit(other, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for module in graph.keys() {
            visit(module, &graph, &mut Vec::new(), &mut done);
        }
    }

    #[test]
    fn only_the_fleet_talks_to_redis() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let needle = ["redis", "::"].concat();
        for file in files(&src) {
            if file.starts_with(src.join("fleet").join("tier")) {
                continue;
            }
            let source = std::fs::read_to_string(&file).expect("readable");
            assert!(
                !source.contains(&needle),
                "{} names the redis crate: only src/fleet/tier/ talks to Redis",
                file.display()
            );
        }
    }

    #[test]
    fn the_engine_imports_no_face_above_it() {
        let graph = imports();
        for face in FACES {
            assert!(
                !graph["engine"].contains(*face),
                "the engine reaches up to `crate::{face}`"
            );
        }
    }
}
