//! `cargo xtask bench [--quick]`: builds release binaries and runs the benchmark
//! (`tests/src/bin/mycni-bench.rs`) as root; results land in `target/bench/`.
use anyhow::{bail, Result};

use crate::{cmd, ebpf, repo_root, setup};

#[derive(Debug, clap::Args)]
pub struct BenchOptions {
    /// Passed to mycni-bench (declared there): --quick (fewer rounds, shorter runs), --scale-only
    /// (the agent at 100, 1,000 and 5,000 nodes alone), --churn-only (SNAT connection churn
    /// against kernel MASQUERADE alone, 60 s each, 10 s with --quick), --services-only (mycni's
    /// socket LB against kube-proxy's iptables at 10, 1,000 and 5,000 Services alone),
    /// --policy-only (round trip and connection rate to a pod 0, 10 and 1,000 NetworkPolicies
    /// select, same node and cross node, against no policy alone).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "BENCH ARGS"
    )]
    pub args: Vec<String>,
}

pub fn run(options: &BenchOptions) -> Result<()> {
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
            .args(&options.args)
            .env("MYCNI_BIN_DIR", root.join("target/release"))
            .env("MYCNI_BENCH_OUT", root.join("target/bench"))
            .env("RUST_BACKTRACE", "0"),
    )
}
