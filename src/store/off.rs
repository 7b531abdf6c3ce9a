//! The disk tier of a build without the `sqlite` feature: a [`DiskStore`] of the same shape
//! as the real one (`store/mod.rs`), which cannot be opened. The engine's disk is then
//! always `None` and answers live in memory (and the fleet's Redis) only; the compiler checks
//! the engine's disk paths against these signatures (`tests/features.rs` builds without the
//! feature), so they cannot drift from the real store unseen.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::counts::Counts;
use crate::entry::StoredAnswer;
use crate::error::{Error, ErrorKind};
use crate::key::CacheKey;

/// Why the database could not be used: never, in a build without a database.
#[derive(Debug, Clone)]
pub enum StoreError {}

impl std::fmt::Display for StoreError {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for StoreError {}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::with_source(ErrorKind::Cache, "cannot use the cache database", e)
    }
}

/// The SQLite tier, which this build cannot open.
#[derive(Clone)]
pub struct DiskStore(StoreError);

impl DiskStore {
    pub fn path(&self) -> &Path {
        match self.0 {}
    }

    pub fn queue_depth(&self) -> usize {
        match self.0 {}
    }

    pub fn write_errors(&self) -> u64 {
        match self.0 {}
    }

    pub fn salt(&self) -> &[u8; 32] {
        match self.0 {}
    }

    pub fn on_external_purge(&self, _listener: impl Fn() + Send + 'static) {
        match self.0 {}
    }

    pub async fn get_many(
        &self,
        _keys: Vec<CacheKey>,
    ) -> Result<Vec<Option<StoredAnswer>>, StoreError> {
        match self.0 {}
    }

    pub fn put(&self, _entry: Arc<StoredAnswer>) -> Result<(), StoreError> {
        match self.0 {}
    }

    pub fn remove(&self, _keys: Option<Vec<CacheKey>>, _buckets: bool) -> Result<(), StoreError> {
        match self.0 {}
    }

    pub fn record_hit(
        &self,
        _key: CacheKey,
        _route: &'static str,
        _model: &str,
        _counts: &Counts,
        _now: SystemTime,
    ) {
        match self.0 {}
    }

    pub fn record_counts(&self, _route: &str, _model: &str, _counts: &Counts) {
        match self.0 {}
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        match self.0 {}
    }

    pub async fn close(&self) -> Result<(), StoreError> {
        match self.0 {}
    }
}
