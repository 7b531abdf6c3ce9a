//! The crate's `rust-version` is what its dependency tree really needs: at least the highest
//! `rust-version` of every package a normal build of it compiles (dev- and build-only
//! dependencies aside), as `cargo metadata` reads them from `Cargo.lock`. A dependency raising
//! its own fails this test instead of a user's build.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use serde_json::Value;

/// `1.88` or `1.89.0` as comparable numbers.
fn version(text: &str) -> Vec<u64> {
    text.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn rust_version_covers_every_normal_dependency() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--all-features",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages: HashMap<&str, &Value> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().expect("id"), p))
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["id"].as_str().expect("id"), n))
        .collect();
    let root = metadata["resolve"]["root"].as_str().expect("root");
    // Every package reached from the crate through normal dependencies.
    let (mut reached, mut next) = (HashSet::from([root]), vec![root]);
    while let Some(id) = next.pop() {
        for dep in nodes[id]["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            let pkg = dep["pkg"].as_str().expect("pkg");
            if normal && reached.insert(pkg) {
                next.push(pkg);
            }
        }
    }
    let ours = version(
        packages[root]["rust_version"]
            .as_str()
            .expect("ours is declared"),
    );
    let mut needs: Vec<(Vec<u64>, String)> = reached
        .iter()
        .filter(|id| **id != root)
        .filter_map(|id| {
            let p = packages[id];
            let needed = p["rust_version"].as_str()?;
            Some((
                version(needed),
                format!("{} {} needs {needed}", p["name"], p["version"]),
            ))
        })
        .collect();
    needs.sort();
    let (highest, who) = needs.last().expect("some dependency declares one");
    assert!(
        ours >= *highest,
        "rust-version is {ours:?}, but {who}: raise rust-version in Cargo.toml"
    );
}
