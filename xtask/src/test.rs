//! `cargo xtask test`: set up what is missing, build everything, run every test.
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::{cmd, ebpf, repo_root, setup};

/// Everything the tests and the demo run: the machine's tools, the eBPF object, every binary.
pub fn prepare() -> Result<()> {
    setup::run()?;
    ebpf::build()?;
    cmd::run(
        cmd::clean("cargo")
            .current_dir(repo_root())
            .args(["build", "--workspace", "--bins"]),
    )
}

pub fn run(args: &[String]) -> Result<()> {
    prepare()?;
    let root = repo_root();
    if !cmd::is_root() {
        eprintln!("warning: not root: the integration tests (namespaces, bpf) will fail");
    }
    let mut child = cmd::clean("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(["--", "--test-threads=2"])
        .args(args)
        .env("MYCNI_BIN_DIR", root.join("target/debug"))
        .env("MYCNI_CNITOOL", setup::cnitool_path())
        .env("MYCNI_CNI_PLUGIN_DIR", "/usr/lib/cni")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .spawn()
        .context("start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(summary) = line.strip_prefix("test result: ") {
                passed += count(summary, " passed");
                failed += count(summary, " failed");
            }
        }
    }
    let status = child.wait()?;
    println!("xtask test: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// The number before `label` in `ok. 3 passed; 0 failed; ...` (`label` is " passed").
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|n| n.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
