//! `cargo xtask demo`: sets up what is missing, builds, and runs the cluster demo
//! (`tests/src/bin/mycni-demo.rs`) as root.
use anyhow::{bail, Result};

use crate::{cmd, repo_root};

pub fn run() -> Result<()> {
    if !cmd::is_root() {
        bail!("the demo makes network namespaces and loads eBPF programs: run it as root");
    }
    crate::test::prepare()?;
    let root = repo_root();
    cmd::run(
        cmd::clean(root.join("target/debug/mycni-demo"))
            .env("MYCNI_BIN_DIR", root.join("target/debug"))
            .env("RUST_BACKTRACE", "0"),
    )
}
