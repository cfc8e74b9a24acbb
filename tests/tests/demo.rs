//! `cargo xtask demo` on a machine that never ran mycni: the demo binary, with every
//! directory it writes to pointed at a path that does not exist yet. Needs root.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Result};

/// Removes the fresh base directory however the test ends.
struct Fresh(PathBuf);

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_demo_runs_where_none_of_its_directories_exist() -> Result<()> {
    mycni_tests::require_root!();
    let base = Fresh(std::env::temp_dir().join(format!("mycni-fresh-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&base.0);
    let run_dir = base.0.join("run/mycni-tests");
    ensure!(!base.0.exists());
    let out = Command::new(mycni_tests::bin_dir().join("mycni-demo"))
        .env("MYCNI_BIN_DIR", mycni_tests::bin_dir())
        .env("MYCNI_TEST_RUN_DIR", &run_dir)
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    for row in [
        "pod11 -> pod12",
        "pod11 -> pod31",
        "pod21 -> external via SNAT",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_default();
        ensure!(
            line.split_whitespace().filter(|w| *w == "ok").count() >= 3,
            "{row}: {line:?}\n{stdout}"
        );
    }
    // It made what it needed where it was told, and took everything away again.
    ensure!(
        run_dir.is_dir(),
        "the demo never used {}",
        run_dir.display()
    );
    let left: Vec<_> = std::fs::read_dir(&run_dir)?.collect();
    ensure!(left.is_empty(), "the demo left {left:?}");
    Ok(())
}
