//! What earlier test runs left on a machine that outlives them (a CI machine is reused;
//! a run killed at its time limit never cleans up), and the disk the next run needs.
//!
//! Every name a test makes starts with `mct<pid % 100000>-` (tests/src/lib.rs `prefix`).
//! A name whose number matches no live process belongs to a run that is gone: its lab
//! directories (containerd's image store, kubelet's state) are removed before the suite
//! starts, so they cannot fill the disk run after run.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Result;

/// Where tests keep state that outlives a reboot or a killed process.
const STATE_DIRS: &[&str] = &["/run/mycni-tests", "/run/netns", "/sys/fs/bpf"];
/// The cgroup trees tests make per-test cgroups in.
const CGROUP_DIRS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// The modulus of the pid in a test prefix.
const PID_MODULUS: u32 = 100_000;

/// The process number in a test-made name: `mct1234-foo` -> 1234.
pub fn prefix_number(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("mct")?;
    let digits = rest.split('-').next()?;
    if digits.is_empty() || !rest[digits.len()..].starts_with('-') {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` was made by a run none of `live_pids` can be (every pid is compared as
/// the prefix records it, modulo 100,000).
pub fn is_stale(name: &str, live_pids: &BTreeSet<u32>) -> bool {
    match prefix_number(name) {
        Some(number) => !live_pids.iter().any(|pid| pid % PID_MODULUS == number),
        None => false,
    }
}

fn live_pids() -> Result<BTreeSet<u32>> {
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc")? {
        if let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() {
            pids.insert(pid);
        }
    }
    Ok(pids)
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
fn mounts_below(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    found
}

fn remove_state(path: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mounts_below(&mountinfo, path) {
        // Lazy: a stale mount nobody uses; the directory goes next.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&point)
            .status();
    }
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => log::info!("removed {} (left by an earlier run)", path.display()),
        Err(e) => log::warn!(
            "could not remove {} left by an earlier run: {e}",
            path.display()
        ),
    }
}

/// Removes cgroups depth-first; a cgroup with a live process in it stays (and so do its
/// parents).
fn remove_cgroup(path: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&entry.path())?;
            }
        }
    }
    std::fs::remove_dir(path)
}

/// Removes what runs that are gone left: lab directories, namespaces, pins, cgroups.
pub fn sweep() -> Result<()> {
    let live = live_pids()?;
    for dir in STATE_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name, &live) {
                remove_state(&entry.path());
            }
        }
    }
    for dir in CGROUP_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name, &live) {
                let path = entry.path();
                match remove_cgroup(&path) {
                    Ok(()) => {
                        log::info!("removed cgroup {} (left by an earlier run)", path.display())
                    }
                    Err(e) => log::warn!("could not remove cgroup {}: {e}", path.display()),
                }
            }
        }
    }
    Ok(())
}

/// Logs the free space where the suite writes (the build, the lab's image stores).
pub fn log_disk(when: &str) {
    let target = crate::repo_root().join("target");
    let output = std::process::Command::new("df")
        .args(["-h", "--output=avail,size,pcent,target"])
        .arg(if target.exists() {
            &target
        } else {
            Path::new("/")
        })
        .arg("/run")
        .output();
    match output {
        Ok(out) => log::info!(
            "disk {when}:\n{}",
            String::from_utf8_lossy(&out.stdout).trim_end()
        ),
        Err(e) => log::warn!("df: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_a_test_prefix_give_their_number() {
        assert_eq!(prefix_number("mct1234-conform-k8s"), Some(1234));
        assert_eq!(prefix_number("mct7-a"), Some(7));
        assert_eq!(prefix_number("mct-a"), None);
        assert_eq!(prefix_number("mct12x-a"), None);
        assert_eq!(prefix_number("mct12"), None);
        assert_eq!(prefix_number("cni-1234"), None);
    }

    #[test]
    fn a_name_is_stale_only_when_no_live_pid_can_have_made_it() {
        let live: BTreeSet<u32> = [1, 4242, 123_456].into_iter().collect();
        assert!(!is_stale("mct4242-x", &live));
        // 123456 % 100000: a live process that may have made it.
        assert!(!is_stale("mct23456-x", &live));
        assert!(is_stale("mct999-x", &live));
        assert!(!is_stale("other", &live));
    }

    #[test]
    fn mounts_below_a_directory_come_deepest_first() {
        let info = "\
36 35 98:0 / / rw - ext4 /dev/vda rw
40 36 0:5 / /run/mycni-tests/mct1-a rw - tmpfs tmpfs rw
41 40 0:6 / /run/mycni-tests/mct1-a/n/x rw - tmpfs tmpfs rw
42 36 0:7 / /run/mycni-tests/mct2-b rw - tmpfs tmpfs rw";
        assert_eq!(
            mounts_below(info, Path::new("/run/mycni-tests/mct1-a")),
            [
                PathBuf::from("/run/mycni-tests/mct1-a/n/x"),
                PathBuf::from("/run/mycni-tests/mct1-a")
            ]
        );
    }
}
