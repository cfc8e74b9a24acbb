//! Thin adapter: attaches the Services programs to a cgroup v2 directory with bpf links
//! pinned beside the programs, so they stay attached while the agent is down or
//! restarting, and detaches them by removing those pins.
//!
//! Link pins: `<bpffs root>/<program>-link`. A new attachment is pinned aside and renamed
//! over the old link's pin: the old link goes only once the new one is attached (for an
//! instant both run; the second finds the backend address, which is no frontend, and
//! leaves it), so a restart never leaves a connect untranslated.
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, ProgramError};
use mycni_common::{
    PROG_SERVICE_CONNECT4, PROG_SERVICE_CONNECT6, PROG_SERVICE_GETPEERNAME4,
    PROG_SERVICE_GETPEERNAME6, PROG_SERVICE_RECVMSG4, PROG_SERVICE_RECVMSG6, PROG_SERVICE_SENDMSG4,
    SERVICE_PROGRAM_NAMES,
};

use crate::datapath::{self, DatapathError};

/// Where cgroup v2 is mounted on a unified host, and on a hybrid one.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_HYBRID_ROOT: &str = "/sys/fs/cgroup/unified";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupAttachError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("{path} is not a cgroup v2 directory (give --cgroup-path)")]
    NotCgroup2 { path: PathBuf },
    #[error("cannot open cgroup {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the link of {name} is not a bpf link (kernel before 5.7?): {source}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("cannot remove the link pin {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cgroup v2 mount: `/sys/fs/cgroup` when it is cgroup2, else the hybrid layout's
/// `/sys/fs/cgroup/unified`.
pub fn default_cgroup_path() -> PathBuf {
    if is_cgroup2(Path::new(CGROUP2_ROOT)) {
        PathBuf::from(CGROUP2_ROOT)
    } else {
        PathBuf::from(CGROUP2_HYBRID_ROOT)
    }
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we pass; the path is NUL-terminated.
    let ok = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0;
    ok && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
}

fn attach_type(name: &str) -> CgroupSockAddrAttachType {
    match name {
        PROG_SERVICE_CONNECT4 => CgroupSockAddrAttachType::Connect4,
        PROG_SERVICE_SENDMSG4 => CgroupSockAddrAttachType::UDPSendMsg4,
        PROG_SERVICE_RECVMSG4 => CgroupSockAddrAttachType::UDPRecvMsg4,
        PROG_SERVICE_GETPEERNAME4 => CgroupSockAddrAttachType::GetPeerName4,
        PROG_SERVICE_CONNECT6 => CgroupSockAddrAttachType::Connect6,
        PROG_SERVICE_RECVMSG6 => CgroupSockAddrAttachType::UDPRecvMsg6,
        PROG_SERVICE_GETPEERNAME6 => CgroupSockAddrAttachType::GetPeerName6,
        // SERVICE_PROGRAM_NAMES holds the names above and nothing else.
        _ => unreachable!("{name} is not a Services program"),
    }
}

fn link_pin_name(program: &str) -> String {
    format!("{program}-link")
}

/// Attaches (or re-attaches, replacing the old links) the pinned Services programs to
/// the cgroup at `cgroup`: every socket of a process in it or below is load-balanced.
pub fn attach_services(root: &Path, cgroup: &Path) -> Result<(), CgroupAttachError> {
    if !is_cgroup2(cgroup) {
        return Err(CgroupAttachError::NotCgroup2 {
            path: cgroup.to_path_buf(),
        });
    }
    let cgroup_dir = File::open(cgroup).map_err(|source| CgroupAttachError::Open {
        path: cgroup.to_path_buf(),
        source,
    })?;
    for name in SERVICE_PROGRAM_NAMES {
        let program_error = |source| CgroupAttachError::Program { name, source };
        let path = root.join(name);
        if !path.exists() {
            return Err(DatapathError::NotLoaded { path }.into());
        }
        let mut program =
            CgroupSockAddr::from_pin(&path, attach_type(name)).map_err(program_error)?;
        // With bpf links the kernel runs every attached program (no exclusive mode).
        let link_id = program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(program_error)?;
        let link = program.take_link(link_id).map_err(program_error)?;
        let link =
            FdLink::try_from(link).map_err(|source| CgroupAttachError::Link { name, source })?;
        // The link's fd closes with the returned PinnedLink; the pin keeps the link.
        datapath::replace_pin(root, &link_pin_name(name), |staging| {
            link.pin(staging).map(drop)
        })?;
    }
    Ok(())
}

/// Whether the Services programs are attached by links this root pins.
pub fn services_attached(root: &Path) -> bool {
    SERVICE_PROGRAM_NAMES
        .iter()
        .any(|name| root.join(link_pin_name(name)).exists())
}

/// Detaches the Services programs (back to kube-proxy mode): removing a link's only pin
/// releases the link. Links already gone are not an error.
pub fn detach_services(root: &Path) -> Result<(), CgroupAttachError> {
    for name in SERVICE_PROGRAM_NAMES {
        let path = root.join(link_pin_name(name));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CgroupAttachError::Unpin { path, source: e })
            }
            _ => {}
        }
    }
    Ok(())
}
