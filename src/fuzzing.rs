//! The settings the property-based fuzz targets share (test builds only): a few thousand cases
//! each by default, what CI runs; `FUZZ_CASES=N` for a long run.

pub(crate) fn config() -> proptest::test_runner::Config {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    proptest::test_runner::Config::with_cases(cases)
}
