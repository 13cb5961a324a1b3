//! A short nemesis pass (two to four minutes) against the built `optimystic` binary: five nodes, in
//! network namespaces when this runs as root (else on 127.0.0.1 with kill and pause only), every
//! fault kind, the list-append workload, and the checker. Fails when the checker finds a
//! violation (exit 1) or the harness fails (exit 2).
//!
//! `OPTIMYSTIC_BIN` names the node binary (default: `target/<profile>/optimystic`, built by
//! `cargo build --workspace --all-targets` as CI does); `NEMESIS_SEED` replaces the fixed seed;
//! `NEMESIS_SECONDS` the length of the fault phase (default 60); `NEMESIS_ALLOW` violation kinds
//! to report without failing (comma-separated, e.g. `no-final-read`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

/// The `optimystic` binary: `OPTIMYSTIC_BIN`, or `target/<profile>/optimystic` next to this test's
/// executable (`target/<profile>/deps/soak-<hash>`): cargo names binaries to the tests of their
/// own package only.
fn optimystic_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("OPTIMYSTIC_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "OPTIMYSTIC_BIN={} is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().expect("the test executable's directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("optimystic{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} does not exist: build it first (`cargo build -p optimystic-cli --bin optimystic`, or \
         `cargo build --workspace --all-targets` as CI does), or name a binary with OPTIMYSTIC_BIN",
        bin.display()
    );
    bin
}

#[test]
fn a_short_nemesis_pass_finds_no_violation() {
    let bin = optimystic_bin();
    let seed = std::env::var("NEMESIS_SEED").unwrap_or_else(|_| "20261130".into());
    let seconds = std::env::var("NEMESIS_SECONDS").unwrap_or_else(|_| "60".into());
    let out = std::env::temp_dir().join(format!("optimystic-nemesis-soak-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_optimystic-nemesis"))
        .args(["run", "--nodes", "5", "--cluster-size", "3", "--blocks", "3", "--clients", "4"])
        .args(["--seconds", &seconds, "--seed", &seed])
        .args(["--faults", "kill,pause,isolate,split,churn"])
        .args(["--gap-min-ms", "3000", "--gap-max-ms", "7000", "--settle-secs", "45", "--op-timeout-ms", "12000"])
        .arg("--bin")
        .arg(&bin)
        .arg("--out")
        .arg(&out)
        .args(std::env::var("NEMESIS_ALLOW").map(|a| vec!["--allow".to_owned(), a]).unwrap_or_default())
        .status()
        .expect("running optimystic-nemesis");
    match status.code() {
        Some(0) => {
            let _ = std::fs::remove_dir_all(&out);
        }
        Some(1) => panic!(
            "the checker found a violation (seed {seed}); history, check.txt and node logs kept in {}",
            out.display()
        ),
        other => panic!("the harness failed ({other:?}, seed {seed}); output kept in {}", out.display()),
    }
}
