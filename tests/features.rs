//! The library builds without its default features, and then pulls in none of the crates
//! only the binary, the proxy and the tiers need: a program embedding the engine does not
//! compile clap, the inspector's tables and progress bars, a logging subscriber, axum, a
//! Redis client or SQLite. It also builds, without a warning, with each tier alone.

use std::process::Command;

/// Crates a library-only build must not depend on (hyper-util stays: reqwest's client uses it).
const NOT_IN_A_SLIM_BUILD: &[&str] = &[
    "clap",
    "comfy-table",
    "indicatif",
    "dirs",
    "tracing-subscriber",
    "anyhow",
    "axum",
    "redis",
    "rusqlite",
    "libsqlite3-sys",
];

/// Feature sets the library must build with, without a warning: none, and each tier without
/// the other (the defaults, and every feature, are what the rest of the suite builds).
const FEATURE_SETS: &[&str] = &["", "server", "server,sqlite", "server,redis,middleware"];

fn cargo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // A target directory of its own: the one `cargo test` uses is locked while it runs.
        .env(
            "CARGO_TARGET_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/no-default-features"),
        )
        .output()
        .expect("cargo runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_library_builds_without_default_features_and_without_the_binarys_crates_nor_the_tiers() {
    let (ok, tree, err) = cargo(&[
        "tree",
        "--no-default-features",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
        "--locked",
        "--offline",
    ]);
    assert!(ok, "{err}");
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        assert!(
            !NOT_IN_A_SLIM_BUILD.contains(&name),
            "a library-only build depends on {name}:\n{tree}"
        );
    }
    for features in FEATURE_SETS {
        let (ok, _, err) = cargo(&[
            "check",
            "--lib",
            "--no-default-features",
            "--features",
            features,
            "--locked",
            "--offline",
        ]);
        assert!(
            ok,
            "the library does not build with features [{features}]:\n{err}"
        );
        assert!(
            !err.contains("(lib) generated"),
            "the library builds with warnings with features [{features}]:\n{err}"
        );
    }
}
