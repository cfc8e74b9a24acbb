//! Running commands with their command line in the error.
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Variables cargo sets for the xtask process that would leak into nested builds.
const LEAKY_VARS: [&str; 8] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "RUSTUP_TOOLCHAIN",
    "CARGO_BUILD_TARGET",
    "RUSTDOC",
];

/// A command without the variables cargo set for us.
pub fn clean(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in LEAKY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs to completion with inherited output; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs and captures output; fails on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Whether `program --version`-style probing succeeds.
pub fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
