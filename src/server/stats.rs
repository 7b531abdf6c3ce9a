//! `/_llm-dedup/stats` of a proxy that keeps a database (the `sqlite` feature): the same
//! JSON as `llm-dedup stats --json`, read through one read-only connection kept open.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, error_response};
use crate::error::{Error, ErrorKind};
use crate::inspect::Inspector;

/// The last `/stats` answer, and the read-only connection it was read with.
#[derive(Default)]
pub(super) struct StatsCache {
    read: Option<(Instant, Bytes)>,
    inspector: Option<Inspector>,
}

/// How old the figures of `/_llm-dedup/stats` may be: counters reach the database within a
/// second anyway, and a client polling in a loop costs one read a second at most.
const STATS_MAX_AGE: Duration = Duration::from_secs(1);

/// The stats of the database at `path`, read at most once a second.
pub(super) async fn read(state: &AppState, path: PathBuf) -> Response {
    let mut cache = state.operator.stats.lock().await;
    if let Some((at, json)) = &cache.read
        && at.elapsed() < STATS_MAX_AGE
    {
        return json_bytes(json.clone());
    }
    let inspector = cache.inspector.take();
    let prices = state.engine.prices().clone();
    let live = state.engine.live().await;
    let read = tokio::task::spawn_blocking(move || {
        let inspector = match inspector {
            Some(inspector) => inspector,
            None => Inspector::open_read_only(&path)?,
        };
        let stats = inspector.stats().map(|mut stats| {
            stats.prices = prices;
            stats.live = Some(live);
            stats
        });
        Ok::<_, crate::inspect::InspectError>((inspector, stats))
    })
    .await;
    match read {
        Ok(Ok((inspector, Ok(stats)))) => {
            cache.inspector = Some(inspector);
            let json = Bytes::from(serde_json::to_vec(&stats).unwrap_or_default());
            cache.read = Some((Instant::now(), json.clone()));
            json_bytes(json)
        }
        // A connection whose read failed is opened anew next time.
        Ok(Ok((_, Err(e)))) | Ok(Err(e)) => stats_failed(e),
        Err(e) => stats_failed(e),
    }
}

fn stats_failed(e: impl std::error::Error + Send + Sync + 'static) -> Response {
    error_response(&Error::with_source(
        ErrorKind::Cache,
        "cannot read the stats",
        e,
    ))
}

fn json_bytes(json: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}
