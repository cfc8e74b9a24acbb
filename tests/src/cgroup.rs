//! A cgroup v2 directory of a test's (or a benchmark run's) own, for the Services programs
//! to attach to, and commands started inside it. Only ever under the hybrid mount's
//! `/sys/fs/cgroup/unified/<prefix>`, never the machine's root cgroup.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::Netns;

/// A cgroup v2 directory under `/sys/fs/cgroup/unified`; removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Result<TestCgroup> {
        let path = PathBuf::from("/sys/fs/cgroup/unified").join(prefix);
        if path.exists() {
            remove_cgroup(&path);
        }
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }

    /// `program args` run in `netns`, inside this cgroup (`Some`) or outside any test cgroup:
    /// a shell writes its pid to `cgroup.procs` and then execs the program, so the program
    /// and everything it opens belong to the cgroup from its first instruction.
    pub fn command_in(cgroup: Option<&TestCgroup>, netns: &Netns, argv: &[&str]) -> Command {
        let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
        let client = format!(
            "exec /usr/bin/nsenter --net={} -- {}",
            netns.path().display(),
            quoted.join(" ")
        );
        let script = match cgroup {
            Some(cgroup) => format!("echo $$ > {}/cgroup.procs && {client}", cgroup.arg()),
            None => client,
        };
        let mut command = Command::new("sh");
        command.args(["-c", &script]);
        command
    }
}

fn remove_cgroup(path: &Path) {
    // Processes exit on their own; kill what a failed run may have left before removing.
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if std::fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}
