//! Kubernetes' own conformance specs for network plugins against mycni: upstream's `e2e.test`
//! (1.20.2, built from the same Debian source as the lab) runs the specs of a
//! `mycni_tests::conformance::Suite` against the lab of tests/src/kubelab.rs with mycni
//! installed from deploy/mycni.yaml, in three runs:
//! - `KUBE_PROXY`: kube-proxy (iptables) on every node, the network plugin's specs and the
//!   DNS specs (the lab's cluster DNS), shared by [`KUBE_PROXY_SHARDS`] e2e.test processes;
//! - `EBPF_SERVICES`: no kube-proxy, `service-mode: "ebpf"`, the Services specs, shared by
//!   [`SERVICES_SHARDS`] e2e.test processes at once;
//! - `NETWORK_POLICY`: kube-proxy on every node, the NetworkPolicy specs, shared by
//!   [`POLICY_SHARDS`] e2e.test processes.
//!
//! A listed spec that fails, skips itself or leaves no result fails its test.
//!
//! Writes to target/conformance/ (`$MYCNI_CONFORMANCE_DIR`; the Services run to the same
//! path with `-ebpf` appended, the NetworkPolicy run with `-policy`): `junit_01.xml`
//! (e2e.test's report), `e2e.log` (its output; per shard under `shard-<n>/` when several),
//! `summary.md` (counts, every listed spec's result, every other spec of the covered areas
//! with the reason it does not run), `dry-run/` (the dry run that lists them) and, when
//! something failed, the nodes' logs under `lab-logs/`.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mycni_tests::conformance::{self, parse_junit, Plan, Suite};
use mycni_tests::kubelab::{
    conformance_inputs, image_archive, lab_manifest_ebpf_services, KubeLab, LabOptions, GATEWAY_IP,
    OUTSIDE_IP,
};
use mycni_tests::prefix;

/// The suite's version: what the lab builds from Debian's `kubernetes` source.
const SUITE_VERSION: &str = "v1.20.2";
/// e2e.test processes sharing the network specs with kube-proxy (the DNS specs wait on
/// probe pods, so they overlap well).
const KUBE_PROXY_SHARDS: usize = 4;
/// e2e.test processes sharing the Services specs with kube-proxy absent.
const SERVICES_SHARDS: usize = 6;
/// e2e.test processes sharing the NetworkPolicy specs (they wait on client pods that try
/// for up to 45 s, so they overlap well); `POLICY_LISTED`'s order balances this many.
const POLICY_SHARDS: usize = 8;
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

/// Runs each command with its output in its log, all at once, killing them all after
/// `limit`; `check` runs every few seconds meanwhile (an error from it ends the run).
fn run_logged(
    cmds: Vec<(Command, PathBuf)>,
    limit: Duration,
    mut check: impl FnMut() -> Result<()>,
) -> Result<Vec<std::process::ExitStatus>> {
    let mut children = Vec::new();
    for (mut cmd, log) in cmds {
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        children.push((child, None, log));
    }
    let start = Instant::now();
    let mut last_check = Instant::now();
    loop {
        for (child, status, _) in children.iter_mut() {
            if status.is_none() {
                *status = child.try_wait()?;
            }
        }
        if children.iter().all(|(_, status, _)| status.is_some()) {
            return Ok(children.into_iter().filter_map(|(_, s, _)| s).collect());
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
            let logs: Vec<String> = children
                .iter()
                .map(|(_, _, log)| log.display().to_string())
                .collect();
            for (child, status, _) in children.iter_mut() {
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            return Err(error.context(format!("e2e.test (logs: {})", logs.join(", "))));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The dry run: which specs the covered areas hold, each run or given a reason. Needs no
/// cluster, so a spec list that does not add up fails before the lab is built.
fn dry_run(suite: &'static Suite, e2e: &Path, bin: &Path, out: &Path) -> Result<Plan> {
    let dir = out.join("dry-run");
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(e2e);
    cmd.args(e2e_flags(
        &dir.join("no-cluster.kubeconfig"),
        &bin.join("kubectl"),
        &dir,
        &suite.focus_areas(),
    ))
    .arg("--ginkgo.dryRun")
    .current_dir(&dir)
    .env("HOME", &dir);
    let statuses = run_logged(
        vec![(cmd, dir.join("e2e.log"))],
        Duration::from_secs(120),
        || Ok(()),
    )?;
    if let Some(status) = statuses.iter().find(|status| !status.success()) {
        bail!("e2e.test dry run: {status} (see {})", dir.display());
    }
    let junit = std::fs::read_to_string(dir.join("junit_01.xml"))?;
    Ok(conformance::plan(suite, &parse_junit(&junit)?)?)
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
    let health = lab.health();
    println!("{health}");
    let _ = std::fs::write(out.join("lab-logs").join("health.txt"), health);
}

/// `e2e.test` in the control-plane namespace, in a private mount namespace whose /etc/hosts
/// names the lab's outside host `google.com`, with a route to it. Why: the `Networking
/// Granular Checks: Services` specs first fetch http://google.com from e2e.test's own host
/// (networking.go:149, "Unable to connect/talk to the internet"), a precondition on the
/// test host, not on the cluster; the lab has no internet, and its outside host answers HTTP.
fn with_google_com_at_the_outside_host(lab: &KubeLab, e2e: &Path) -> Result<Command> {
    lab.control.exec(&[
        "ip",
        "route",
        "replace",
        &format!("{OUTSIDE_IP}/32"),
        "via",
        &GATEWAY_IP.to_string(),
    ])?;
    let hosts = lab.dir.join("e2e-hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{OUTSIDE_IP} google.com www.google.com\n"),
    )?;
    let mut cmd = lab.control.command("/usr/bin/unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(&hosts)
        .arg(e2e);
    Ok(cmd)
}

/// How one suite runs: the lab, mycni's manifest, where the report goes, and how many
/// e2e.test processes share the listed specs.
struct Run {
    suite: &'static Suite,
    prefix: &'static str,
    lab: LabOptions,
    ebpf_services: bool,
    out: PathBuf,
    /// e2e.test processes at once, each with every `shards`-th listed spec (upstream runs
    /// these specs in parallel; none is `[Serial]`).
    shards: usize,
}

/// The two runs share the machine's one lab slot (the lock the caller holds covers both).
static LAB_SLOT: Mutex<()> = Mutex::new(());

fn run_suite(run: Run) -> Result<()> {
    mycni_tests::require_root!();
    let _slot = LAB_SLOT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (e2e, images) = conformance_inputs()?;
    let bin = e2e
        .parent()
        .context("e2e.test has no directory")?
        .to_path_buf();
    let out = run.out;
    // Only this run's files: a stale report must never be read as this run's.
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let plan = dry_run(run.suite, &e2e, &bin, &out)?;
    println!(
        "conformance: {} listed specs to run, {} other specs of the covered areas not run (reasons in the summary)",
        run.suite.listed.len(),
        plan.not_run.len()
    );

    let mut all_images = vec![image_archive("MYCNI_TEST_IMAGE", "mycni-test.oci.tar")?];
    all_images.extend(images);
    let prefix = prefix(run.prefix);
    let mut lab = KubeLab::with_options(&prefix, &all_images, run.lab)?;
    if run.ebpf_services {
        lab.install_mycni_manifest(&lab_manifest_ebpf_services(&prefix)?)?;
    } else {
        lab.install_mycni()?;
    }

    let started = Instant::now();
    // One shard writes straight to `out`; several, each to `out/shard-<n>/`.
    let mut shards = Vec::new();
    for shard in 0..run.shards {
        let Some(focus) = run.suite.focus_shard(shard, run.shards) else {
            continue;
        };
        let dir = if run.shards == 1 {
            out.clone()
        } else {
            out.join(format!("shard-{shard}"))
        };
        std::fs::create_dir_all(&dir)?;
        let mut cmd = with_google_com_at_the_outside_host(&lab, &e2e)?;
        cmd.args(e2e_flags(
            &lab.admin_kubeconfig(),
            &bin.join("kubectl"),
            &dir,
            &focus,
        ))
        .current_dir(&dir)
        .env("HOME", &lab.dir)
        .env("KUBECONFIG", lab.admin_kubeconfig());
        shards.push((cmd, shard, dir));
    }
    let dirs: Vec<(usize, PathBuf)> = shards
        .iter()
        .map(|(_, shard, dir)| (*shard, dir.clone()))
        .collect();
    let cmds = shards
        .into_iter()
        .map(|(cmd, _, dir)| (cmd, dir.join("e2e.log")))
        .collect();
    println!(
        "conformance: running {} e2e.test, logs in {}",
        dirs.len(),
        dirs.iter()
            .map(|(_, dir)| dir.join("e2e.log").display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // A lab daemon that dies ends the run with its log, rather than failing specs later.
    let ran = run_logged(cmds, RUN_LIMIT, || lab.check_alive());
    let took = started.elapsed();
    // Each report is written when its e2e.test ends; without one, its specs have no result.
    let mut results = Vec::new();
    for (shard, dir) in &dirs {
        let junit = std::fs::read_to_string(dir.join("junit_01.xml")).unwrap_or_default();
        if !junit.is_empty() {
            let all = parse_junit(&junit)?;
            results.extend(run.suite.shard_results(*shard, run.shards, all));
        }
    }
    let report = conformance::report(run.suite, plan, &results);
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
    let statuses = ran?;
    let failed_status = statuses.iter().find(|status| !status.success());
    if !report.ok() || failed_status.is_some() {
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
            "conformance: {} (e2e.test: {:?}); see {} and the e2e.log beside it:\n{}",
            report.counts(),
            statuses,
            out.join("summary.md").display(),
            failed.join("\n")
        );
    }
    Ok(())
}

#[test]
fn upstream_network_conformance_specs_pass_against_mycni() -> Result<()> {
    run_suite(Run {
        suite: &conformance::KUBE_PROXY,
        prefix: "conform",
        lab: LabOptions::default(),
        ebpf_services: false,
        out: out_dir(),
        shards: KUBE_PROXY_SHARDS,
    })
}

/// `<out>-<suffix>`: where a run other than the first writes, beside it.
fn out_dir_beside(suffix: &str) -> Result<PathBuf> {
    let out = out_dir();
    let name = out
        .file_name()
        .context("the conformance directory has no name")?
        .to_string_lossy()
        .into_owned();
    Ok(out.with_file_name(format!("{name}-{suffix}")))
}

/// The Services specs with kube-proxy absent and mycni balancing Services at the sockets;
/// the report goes beside the other run's, in `<out>-ebpf`.
#[test]
fn upstream_services_conformance_specs_pass_with_kube_proxy_absent() -> Result<()> {
    run_suite(Run {
        suite: &conformance::EBPF_SERVICES,
        prefix: "svcconf",
        lab: LabOptions { kube_proxy: false },
        ebpf_services: true,
        out: out_dir_beside("ebpf")?,
        shards: SERVICES_SHARDS,
    })
}

/// The NetworkPolicy specs, kube-proxy on every node (the default mode); the report goes
/// in `<out>-policy`.
#[test]
fn upstream_network_policy_conformance_specs_pass_against_mycni() -> Result<()> {
    run_suite(Run {
        suite: &conformance::NETWORK_POLICY,
        prefix: "polconf",
        lab: LabOptions::default(),
        ebpf_services: false,
        out: out_dir_beside("policy")?,
        shards: POLICY_SHARDS,
    })
}
