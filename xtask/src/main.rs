//! Developer and operator tasks: `cargo xtask <command>`.
mod bench;
mod cmd;
mod demo;
mod ebpf;
mod image;
mod install;
mod kubelab;
mod leftovers;
mod setup;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Developer and operator tasks for mycni.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    arg_required_else_help = true
)]
struct Xtask {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what this machine lacks: Debian packages, bpf-linker, cnitool.
    Setup,
    /// Build the TC programs (mycni-ebpf) for bpfel-unknown-none; prints the object's path.
    BuildEbpf(ebpf::BuildOptions),
    /// Build and install mycni, mycni-agent and the CNI conflist.
    Install(install::InstallOptions),
    /// An OCI image archive of mycni-agent and mycni for deploy/mycni.yaml; import with
    /// `ctr -n k8s.io images import`.
    Image(image::ImageOptions),
    /// Build Kubernetes and its e2e.test from Debian's source (cached in /var/cache/mycni/k8s)
    /// and the lab's images, for the end-to-end and conformance tests.
    K8s,
    /// A simulated cluster in network namespaces, its connectivity, then cleanup.
    Demo,
    /// Build what the Kubernetes end-to-end test needs (not setup) and run it alone.
    E2e(test::TestArguments),
    /// Build what the Services lab test needs (not setup) and run it alone: the lab without
    /// kube-proxy, mycni balancing Services in eBPF.
    ServicesE2e(test::TestArguments),
    /// Build what the NetworkPolicy latency lab test needs (not setup) and run it alone:
    /// time from `kubectl apply` and `kubectl label` until every node enforces the change;
    /// p50/p99 in target/bench/policy-latency.json.
    PolicyLatency(test::TestArguments),
    /// Build what the Services latency lab test needs (not setup) and run it alone: time from
    /// `kubectl scale` and a pod turning unready (or ready) until every node's `SERVICES` and
    /// `BACKENDS` hold the change; p50/p99 in target/bench/services-latency.json.
    ServicesLatency(test::TestArguments),
    /// Upstream's e2e.test specs against mycni in the lab, three runs: the network specs with
    /// kube-proxy (report in target/conformance/), the Services specs without it
    /// (target/conformance-ebpf/), the NetworkPolicy specs (target/conformance-policy/); a
    /// test-name filter runs one (`cargo xtask conformance network_policy`).
    Conformance(test::TestArguments),
    /// Setup, build-ebpf, build every binary, then the whole test suite (unit and, as root,
    /// integration).
    Test(test::TestArguments),
    /// mycni against a bare veth, the reference bridge plugin and kernel VXLAN; results in
    /// target/bench/.
    Bench(bench::BenchOptions),
}

/// The workspace root: xtask lives one level below it.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() {
    let xtask = Xtask::parse();
    // Messages at info and up (RUST_LOG adjusts); what a task produces goes to stdout.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_env(env_logger::Env::default())
        .format_timestamp_secs()
        .init();
    if let Err(error) = dispatch(xtask.command) {
        // The message and its causes, without the backtrace anyhow adds under RUST_BACKTRACE.
        let causes: String = error
            .chain()
            .skip(1)
            .map(|cause| format!("\n  caused by: {cause}"))
            .collect();
        log::error!("{error}{causes}");
        std::process::exit(1);
    }
}

fn dispatch(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::BuildEbpf(options) => ebpf::build_and_print(&options),
        Task::Install(options) => install::run(&options),
        Task::Image(options) => image::run(&options),
        Task::K8s => kubelab::run(),
        Task::Demo => demo::run(),
        Task::E2e(arguments) => test::e2e(&arguments.args),
        Task::Conformance(arguments) => test::conformance(&arguments.args),
        Task::ServicesE2e(arguments) => test::services_e2e(&arguments.args),
        Task::PolicyLatency(arguments) => test::policy_latency(&arguments.args),
        Task::ServicesLatency(arguments) => test::services_latency(&arguments.args),
        Task::Test(arguments) => test::run(&arguments.args),
        Task::Bench(options) => bench::run(&options),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Xtask, clap::Error> {
        Xtask::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Xtask::command().debug_assert();
    }

    #[test]
    fn every_task_has_help() {
        for sub in Xtask::command().get_subcommands() {
            let name = sub.get_name().to_string();
            let err = parse(&[&name, "--help"]).expect_err("help exits");
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{name}");
        }
    }

    #[test]
    fn test_arguments_pass_through_hyphens_and_all() {
        let Task::Test(arguments) = parse(&["test", "isolation", "--exact", "--nocapture"])
            .unwrap()
            .command
        else {
            panic!("not test");
        };
        assert_eq!(arguments.args, ["isolation", "--exact", "--nocapture"]);
        let Task::E2e(arguments) = parse(&["e2e", "--", "--nocapture"]).unwrap().command else {
            panic!("not e2e");
        };
        assert_eq!(arguments.args, ["--nocapture"]);
    }

    #[test]
    fn bench_arguments_go_to_the_benchmark_binary() {
        let Task::Bench(options) = parse(&["bench", "--quick", "--scale-only"])
            .unwrap()
            .command
        else {
            panic!("not bench");
        };
        assert_eq!(options.args, ["--quick", "--scale-only"]);
        let Task::Test(arguments) = parse(&["test", "--exact", "x"]).unwrap().command else {
            panic!("not test");
        };
        assert_eq!(arguments.args, ["--exact", "x"]);
    }

    #[test]
    fn tasks_without_options_refuse_arguments() {
        for task in ["setup", "demo", "k8s"] {
            assert!(parse(&[task, "extra"]).is_err(), "{task}");
        }
        assert!(parse(&["frobnicate"]).is_err());
    }
}
