//! The tests' and benchmarks' own reqwest clients, which talk plain HTTP to loopback.
//!
//! llm-dedup builds reqwest without a crypto provider of its own (`rustls-no-provider`: the
//! engine hands its client a rustls configuration on ring), and such a reqwest panics when
//! it builds a client with no process-wide provider installed. A program building clients of
//! its own installs one first, as this does.

/// `reqwest::Client::builder()`, once a process-wide crypto provider is installed.
pub fn client_builder() -> reqwest::ClientBuilder {
    // An error says one is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}
