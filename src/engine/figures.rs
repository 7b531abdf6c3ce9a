//! What a running engine is doing now, for the operator's page and `/_llm-dedup/stats`.

use serde::{Deserialize, Serialize};

/// What a running engine is doing now, beside what its database counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveFigures {
    /// Distinct requests waiting on an upstream call.
    pub in_flight: u64,
    /// Bytes the memory tier holds, and its bound (`--memory`).
    pub memory_bytes: u64,
    /// The memory tier's bound.
    pub memory_max_bytes: u64,
    /// Entries the memory tier holds.
    pub memory_entries: u64,
    /// Requests that waited in line for upstream budget (a millisecond or more) since the
    /// engine started.
    pub budget_waits: u64,
    /// Milliseconds they waited, in all.
    pub budget_wait_ms: u64,
}
