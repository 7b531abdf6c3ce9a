//! The settings the property-based fuzz targets share (test builds only): a few thousand cases
//! each by default, what CI runs; `FUZZ_CASES=N` for a long run.

pub(crate) fn config() -> proptest::test_runner::Config {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    // Rejects grow with the cases (a pair of values that happen to be equal, say): proptest's
    // fixed limits would end a long run that finds nothing wrong.
    proptest::test_runner::Config {
        max_global_rejects: (cases / 10).max(1024),
        max_local_rejects: cases.saturating_mul(2).max(65_536),
        ..proptest::test_runner::Config::with_cases(cases)
    }
}
