//! The `llm-dedup` binary's own modules: its arguments, and the proxy's wiring. No caching logic
//! lives here.

pub(crate) mod args;
pub(crate) mod serve;
