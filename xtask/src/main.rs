//! Developer and operator tasks: `cargo xtask <command>`.
mod bench;
mod cmd;
mod demo;
mod ebpf;
mod image;
mod install;
mod kubelab;
mod setup;
mod test;

use std::path::PathBuf;

const USAGE: &str = "usage: cargo xtask <command>
  setup        install what this machine lacks: Debian packages, bpf-linker, cnitool
  build-ebpf   build the TC programs (mycni-ebpf) for bpfel-unknown-none [--debug];
               prints the object's path
  install      build and install mycni, mycni-agent and the CNI conflist
               [--destdir D] [--cni-bin-dir /opt/cni/bin] [--cni-conf-dir /etc/cni/net.d]
               [--bin-dir /usr/local/bin] --pod-cidr CIDR [--mtu 1500]
               [--data-dir /var/lib/cni/mycni] [--bpffs-root /sys/fs/bpf/mycni] [--no-build]
  image        an OCI image archive of mycni-agent and mycni for deploy/mycni.yaml
               [--out FILE] [--no-build] [--bin-dir DIR] [--tag TAG (default: the version)];
               import with `ctr -n k8s.io images import`
  k8s          build Kubernetes and its e2e.test from Debian's source (cached in
               /var/cache/mycni/k8s) and the lab's images, for the end-to-end and
               conformance tests
  demo         a simulated cluster in network namespaces, its connectivity, then cleanup
  e2e          build what the Kubernetes end-to-end test needs (not setup) and run it alone;
               extra arguments go to the test binary
  conformance  upstream's e2e.test specs for network plugins against mycni in the lab;
               report and summary in target/conformance/
  test         setup, build-ebpf, build every binary, then the whole test suite (unit and,
               as root, integration); extra arguments go to the test binaries (filters)
  bench        mycni against a bare veth, the reference bridge plugin and kernel VXLAN
               [--quick] (under two minutes) [--scale-only] (the agent at 100, 1,000 and 5,000
               nodes alone) [--churn-only] (SNAT connection churn against kernel MASQUERADE,
               60 s each, 10 s with --quick); results in target/bench/";

/// The workspace root: xtask lives one level below it.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn no_arguments(command: &str, rest: &[String]) -> anyhow::Result<()> {
    if let Some(arg) = rest.first() {
        anyhow::bail!("{command}: unexpected argument {arg:?}\n{USAGE}");
    }
    Ok(())
}

fn main() {
    if let Err(error) = dispatch() {
        // The message and its causes, without the backtrace anyhow adds under RUST_BACKTRACE.
        eprintln!("error: {error}");
        for cause in error.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn dispatch() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match command.as_str() {
        "setup" => {
            no_arguments(command, rest)?;
            setup::run()
        }
        "build-ebpf" => ebpf::parse_and_build(rest),
        "install" => install::run(rest),
        "demo" => {
            no_arguments(command, rest)?;
            demo::run()
        }
        "test" => test::run(rest),
        "e2e" => test::e2e(rest),
        "conformance" => test::conformance(rest),
        "bench" => bench::run(rest),
        "image" => image::run(rest),
        "k8s" => kubelab::run(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => anyhow::bail!("unknown command {other:?}\n{USAGE}"),
    }
}
