//! Kubernetes' own conformance specs for network plugins against mycni: upstream's `e2e.test`
//! (1.20.2, built from the same Debian source as the lab) runs the specs of
//! `mycni_tests::conformance::LISTED` against the lab of tests/src/kubelab.rs with mycni
//! installed from deploy/mycni.yaml and kube-proxy (iptables) on every node. A listed spec
//! that fails, skips itself or leaves no result fails this test.
//!
//! Writes to target/conformance/ (`$MYCNI_CONFORMANCE_DIR`): `junit_01.xml` (e2e.test's
//! report), `e2e.log` (its output), `summary.md` (counts, every listed spec's result, every
//! other spec of the covered areas with the reason it does not run), `dry-run/` (the dry
//! run that lists them) and, when something failed, the nodes' logs under `lab-logs/`.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mycni_tests::conformance::{self, focus_areas, focus_listed, parse_junit, Plan};
use mycni_tests::kubelab::{conformance_inputs, image_archive, KubeLab};
use mycni_tests::prefix;

/// The suite's version: what the lab builds from Debian's `kubernetes` source.
const SUITE_VERSION: &str = "v1.20.2";
/// The whole run: the seven specs take about 2.5 minutes; a hung one must not hang the suite.
const RUN_LIMIT: Duration = Duration::from_secs(30 * 60);

fn out_dir() -> PathBuf {
    std::env::var_os("MYCNI_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/conformance"))
}

/// The flags every e2e.test run gets: the lab as a provider-less cluster of two nodes
/// reached with the admin kubeconfig.
fn e2e_flags(kubeconfig: &Path, kubectl: &Path, report_dir: &Path, focus: &str) -> Vec<String> {
    vec![
        "--provider=skeleton".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--kubectl-path={}", kubectl.display()),
        "--num-nodes=2".into(),
        "--container-runtime=remote".into(),
        "--disable-log-dump".into(),
        format!("--report-dir={}", report_dir.display()),
        format!("--ginkgo.focus={focus}"),
        "--ginkgo.noColor".into(),
        "--ginkgo.v".into(),
    ]
}

/// Runs `cmd` with its output in `log`, killing it after `limit`; `check` runs every few
/// seconds meanwhile (an error from it ends the run).
fn run_logged(
    cmd: &mut Command,
    log: &Path,
    limit: Duration,
    mut check: impl FnMut() -> Result<()>,
) -> Result<std::process::ExitStatus> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let start = Instant::now();
    let mut last_check = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let stop = if start.elapsed() > limit {
            Some(anyhow::anyhow!("still running after {limit:?}"))
        } else if last_check.elapsed() > Duration::from_secs(5) {
            last_check = Instant::now();
            check().err()
        } else {
            None
        };
        if let Some(error) = stop {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error.context(format!("{cmd:?} (log: {})", log.display())));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The dry run: which specs the covered areas hold, each run or given a reason. Needs no
/// cluster, so a spec list that does not add up fails before the lab is built.
fn dry_run(e2e: &Path, bin: &Path, out: &Path) -> Result<Plan> {
    let dir = out.join("dry-run");
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(e2e);
    cmd.args(e2e_flags(
        &dir.join("no-cluster.kubeconfig"),
        &bin.join("kubectl"),
        &dir,
        &focus_areas(),
    ))
    .arg("--ginkgo.dryRun")
    .current_dir(&dir)
    .env("HOME", &dir);
    let status = run_logged(
        &mut cmd,
        &dir.join("e2e.log"),
        Duration::from_secs(120),
        || Ok(()),
    )?;
    if !status.success() {
        bail!("e2e.test dry run: {status} (see {})", dir.display());
    }
    let junit = std::fs::read_to_string(dir.join("junit_01.xml"))?;
    Ok(conformance::plan(&parse_junit(&junit)?)?)
}

/// Copies every node's daemon logs under `out/lab-logs/<node>/`.
fn keep_lab_logs(lab: &KubeLab, out: &Path) {
    for node in &lab.nodes {
        let dir = out.join("lab-logs").join(&node.name);
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        for name in ["kubelet", "containerd", "kube-proxy"] {
            let _ = std::fs::write(dir.join(format!("{name}.log")), node.log(name));
        }
    }
    if let Ok(logs) = lab.agent_logs(&["--tail=-1", "--prefix"]) {
        let _ = std::fs::write(out.join("lab-logs").join("mycni-agents.log"), logs);
    }
}

#[test]
fn upstream_network_conformance_specs_pass_against_mycni() -> Result<()> {
    mycni_tests::require_root!();
    let (e2e, images) = conformance_inputs()?;
    let bin = e2e
        .parent()
        .context("e2e.test has no directory")?
        .to_path_buf();
    let out = out_dir();
    // Only this run's files: a stale report must never be read as this run's.
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let plan = dry_run(&e2e, &bin, &out)?;
    println!(
        "conformance: {} listed specs to run, {} other specs of the covered areas not run (reasons in the summary)",
        conformance::LISTED.len(),
        plan.not_run.len()
    );

    let mut all_images = vec![image_archive("MYCNI_TEST_IMAGE", "mycni-test.oci.tar")?];
    all_images.extend(images);
    let mut lab = KubeLab::new(&prefix("conform"), &all_images)?;
    lab.install_mycni()?;

    let started = Instant::now();
    let mut cmd = lab.control.command(&e2e);
    cmd.args(e2e_flags(
        &lab.admin_kubeconfig(),
        &bin.join("kubectl"),
        &out,
        &focus_listed(),
    ))
    .current_dir(&out)
    .env("HOME", &lab.dir)
    .env("KUBECONFIG", lab.admin_kubeconfig());
    let log = out.join("e2e.log");
    println!("conformance: running e2e.test, log in {}", log.display());
    // A lab daemon that dies ends the run with its log, rather than failing specs later.
    let ran = run_logged(&mut cmd, &log, RUN_LIMIT, || lab.check_alive());
    let took = started.elapsed();
    // The report is written when the suite ends; without it, every listed spec has no result.
    let junit = std::fs::read_to_string(out.join("junit_01.xml")).unwrap_or_default();
    let results = if junit.is_empty() {
        Vec::new()
    } else {
        parse_junit(&junit)?
    };
    let report = conformance::report(plan, &results);
    std::fs::write(out.join("summary.md"), report.markdown(SUITE_VERSION, took))?;
    println!(
        "conformance: {} in {:.0?}; summary in {}",
        report.counts(),
        took,
        out.join("summary.md").display()
    );
    if !report.ok() || ran.is_err() {
        keep_lab_logs(&lab, &out);
    }
    let status = ran?;
    if !report.ok() || !status.success() {
        let failed: Vec<String> = report
            .listed
            .iter()
            .filter(|(_, verdict, _)| *verdict != conformance::Verdict::Passed)
            .map(|(spec, verdict, _)| format!("{}: {verdict:?}", spec.name))
            .chain(
                report
                    .suite_failures
                    .iter()
                    .map(|(name, message)| format!("{name}: {message}")),
            )
            .collect();
        bail!(
            "conformance: {} (e2e.test: {status}); see {} and {}:\n{}",
            report.counts(),
            out.join("summary.md").display(),
            log.display(),
            failed.join("\n")
        );
    }
    Ok(())
}
