//! `cargo xtask test`: set up what is missing, build everything, run every test.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cmd, ebpf, image, kubelab, leftovers, repo_root, setup};

/// Everything the tests and the demo run: the machine's tools, the eBPF object, every binary.
pub fn prepare() -> Result<()> {
    setup::run()?;
    build()
}

/// The eBPF object and every binary (debug), the ones the tests run.
fn build() -> Result<()> {
    ebpf::build()?;
    cmd::run(
        cmd::clean("cargo")
            .current_dir(repo_root())
            .args(["build", "--workspace", "--bins"]),
    )
}

/// What the Kubernetes end-to-end test runs besides the debug binaries: the cluster's
/// binaries and images, the mycni image of the binaries under test (what deploy/mycni.yaml
/// runs) and the one the test upgrades to (a release build of the same source, under another
/// tag). Returns the two mycni image archives.
fn e2e_images() -> Result<(PathBuf, PathBuf)> {
    let root = repo_root();
    let test_image = lab_images()?;
    let upgrade_image = root.join("target/image/mycni-upgrade.oci.tar");
    let mut spec = image::mycni_spec(&image::build_release_binaries()?);
    spec.reference = format!(
        "{}:{}-upgrade",
        image::IMAGE_NAME,
        env!("CARGO_PKG_VERSION")
    );
    image::build_image(&spec, &upgrade_image)?;
    Ok((test_image, upgrade_image))
}

#[derive(Debug, clap::Args)]
pub struct TestArguments {
    /// Passed to the test binaries (filters, --exact, --nocapture ...).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEST ARGS"
    )]
    pub args: Vec<String>,
}

/// The cluster's binaries and images (the conformance suite's among them) and the mycni
/// image of the debug binaries under test; returns that image's archive.
fn lab_images() -> Result<PathBuf> {
    let root = repo_root();
    let bin = kubelab::binaries()?;
    kubelab::images(&bin)?;
    let test_image = root.join("target/image/mycni-test.oci.tar");
    image::build_image(&image::mycni_spec(&root.join("target/debug")), &test_image)?;
    Ok(test_image)
}

/// `cargo xtask conformance`: builds what the upstream conformance run needs (not the
/// machine setup) and runs `tests/tests/conformance.rs` alone (its three runs, or those whose
/// test name contains a filter given in `args`, e.g. `network_policy`), its progress on the
/// terminal; the reports land in target/conformance/, target/conformance-ebpf/ and
/// target/conformance-policy/.
pub fn conformance(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the conformance run needs root (it brings up the Kubernetes lab)");
    }
    build()?;
    let test_image = lab_images()?;
    cmd::run(&mut lab_test("conformance", args, &test_image))
}

/// `cargo xtask services-e2e`: builds what the Services lab test needs (not the machine
/// setup) and runs `tests/tests/kubernetes_services.rs` alone.
pub fn services_e2e(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the Services lab test needs root (it brings up the Kubernetes lab)");
    }
    build()?;
    let test_image = lab_images()?;
    cmd::run(&mut lab_test("kubernetes_services", args, &test_image))
}

/// `cargo xtask policy-latency`: builds what the NetworkPolicy latency lab test needs (not
/// the machine setup) and runs `tests/tests/network_policy_latency.rs` alone.
pub fn policy_latency(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the NetworkPolicy latency test needs root (it brings up the Kubernetes lab)");
    }
    build()?;
    let test_image = lab_images()?;
    cmd::run(&mut lab_test("network_policy_latency", args, &test_image))
}

/// `cargo xtask services-latency`: builds what the Services latency lab test needs (not the
/// machine setup) and runs `tests/tests/services_latency.rs` alone.
pub fn services_latency(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the Services latency test needs root (it brings up the Kubernetes lab)");
    }
    build()?;
    let test_image = lab_images()?;
    cmd::run(&mut lab_test("services_latency", args, &test_image))
}

/// `cargo xtask e2e`: builds what the Kubernetes end-to-end test needs (not the machine
/// setup) and runs that test alone, its progress on the terminal.
pub fn e2e(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the Kubernetes end-to-end test needs root");
    }
    build()?;
    let (test_image, upgrade_image) = e2e_images()?;
    cmd::run(
        lab_test("kubernetes", args, &test_image).env("MYCNI_TEST_UPGRADE_IMAGE", &upgrade_image),
    )
}

/// `cargo test` of one lab test target alone, its output on the terminal, with the debug
/// binaries and the mycni image under test.
fn lab_test(target: &str, args: &[String], test_image: &Path) -> Command {
    let root = repo_root();
    let mut command = cmd::clean("cargo");
    command
        .current_dir(&root)
        .args(["test", "-p", "mycni-tests", "--test", target])
        .args(["--", "--nocapture"])
        .args(args)
        .env("MYCNI_BIN_DIR", root.join("target/debug"))
        .env("MYCNI_CNI_PLUGIN_DIR", "/usr/lib/cni")
        .env("MYCNI_TEST_IMAGE", test_image)
        .env("RUST_BACKTRACE", "0");
    command
}

pub fn run(args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        log::warn!(
            "not running as root: the integration tests (network namespaces, bpf \
             syscalls) need root and will fail; only the unit tests can pass"
        );
    } else {
        // A reused machine: what killed runs left (lab image stores above all) goes first.
        leftovers::sweep()?;
    }
    leftovers::log_disk("before the suite");
    prepare()?;
    let root = repo_root();
    // Without root the end-to-end test cannot run (it says where its images should be).
    let (test_image, upgrade_image) = if cmd::is_root() {
        e2e_images()?
    } else {
        (
            root.join("target/image/mycni-test.oci.tar"),
            root.join("target/image/mycni-upgrade.oci.tar"),
        )
    };
    let mut child = cmd::clean("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(["--", "--test-threads=2"])
        .args(args)
        .env("MYCNI_BIN_DIR", root.join("target/debug"))
        .env("MYCNI_CNITOOL", setup::cnitool_path())
        .env("MYCNI_CNI_PLUGIN_DIR", "/usr/lib/cni")
        .env("MYCNI_TEST_IMAGE", &test_image)
        .env("MYCNI_TEST_UPGRADE_IMAGE", &upgrade_image)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .spawn()
        .context("start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        while reader.read_until(b'\n', &mut raw)? > 0 {
            let text = String::from_utf8_lossy(&raw);
            let line = text.trim_end_matches(['\n', '\r']);
            // Tee: cargo's output reaches the terminal as it comes (a closed stdout must not
            // stop the count).
            let _ = writeln!(std::io::stdout(), "{line}");
            if let Some(summary) = line.strip_prefix("test result: ") {
                passed += count(summary, " passed");
                failed += count(summary, " failed");
            }
            raw.clear();
        }
    }
    let status = child.wait()?;
    leftovers::log_disk("after the suite");
    println!("xtask test: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({failed} failed; cargo test: {status})");
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

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_from_a_summary() {
        let ok =
            "ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!((count(ok, " passed"), count(ok, " failed")), (12, 0));
        let failed = "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out";
        assert_eq!((count(failed, " passed"), count(failed, " failed")), (3, 2));
    }
}
