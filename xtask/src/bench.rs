//! `cargo xtask bench [--quick]`: builds release binaries and runs the benchmark
//! (`tests/src/bin/mycni-bench.rs`) as root; results land in `target/bench/`.
use anyhow::{bail, Result};

use crate::{cmd, ebpf, repo_root, setup};

#[derive(Debug, clap::Args)]
pub struct BenchOptions {
    /// Under two minutes: fewer rounds, shorter runs.
    #[arg(long)]
    quick: bool,
    /// The agent at 100, 1,000 and 5,000 nodes alone.
    #[arg(long, conflicts_with = "churn_only")]
    scale_only: bool,
    /// SNAT connection churn against kernel MASQUERADE alone (60 s each, 10 s with --quick).
    #[arg(long)]
    churn_only: bool,
}

pub fn run(options: &BenchOptions) -> Result<()> {
    let flags = [
        (options.quick, "--quick"),
        (options.scale_only, "--scale-only"),
        (options.churn_only, "--churn-only"),
    ];
    let args = flags.iter().filter(|(on, _)| *on).map(|(_, flag)| *flag);
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
