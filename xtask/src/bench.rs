//! `cargo xtask bench [--quick]`: builds release binaries and runs the benchmark
//! (`tests/src/bin/mycni-bench.rs`) as root; results land in `target/bench/`.
use anyhow::{bail, Result};

use crate::{cmd, ebpf, repo_root, setup};

pub fn run(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the benchmark makes network namespaces and loads eBPF programs: run it as root");
    }
    setup::run()?;
    ebpf::build()?;
    let root = repo_root();
    // Release builds: the plugin's own speed is part of what is measured.
    cmd::run(cmd::clean("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--workspace",
        "--bins",
    ]))?;
    cmd::run(
        cmd::clean(root.join("target/release/mycni-bench"))
            .current_dir(&root)
            .args(args)
            .env("MYCNI_BIN_DIR", root.join("target/release"))
            .env("MYCNI_BENCH_OUT", root.join("target/bench"))
            .env("RUST_BACKTRACE", "0"),
    )
}
