//! The on-disk record of allocations, host-local style: under `<data dir>/<network>/`, one
//! file per allocated IP (named by the address, holding the container ID and interface),
//! `last_reserved_ip.0` for round robin, and a `lock` file taken with `flock` around every
//! read-modify-write, so concurrent plugin processes never hand out one address twice.
//!
//! The IP files are the truth. An index `owners/<container ID>:<interface>`, listing the
//! owner's addresses one per line, lets ADD and DEL find an owner's addresses without
//! reading every record, so their cost does not grow with the pod count. The index entry is
//! written *before* the claim, so every claim this code writes is reachable from its
//! owner's index even after a crash between the two writes; an index entry whose claim is
//! missing or belongs to someone else is ignored. DEL still scans the records when the
//! index knows nothing (stores written by older versions, hand edits).
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::{IpamError, Pool};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip.0";
const OWNERS_DIR: &str = "owners";
/// Where an index file is written before it is renamed into place. It has no `:`, so it
/// never collides with an index name.
const INDEX_SCRATCH: &str = ".writing";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid network name {0:?}: it names a directory, so no '/' and no leading '.'")]
    InvalidName(String),
    /// The container ID or interface would not survive the round trip through a record
    /// file and an index file name.
    #[error("invalid owner {container_id:?}/{ifname:?}: no '/', ':', whitespace or leading '.'")]
    InvalidOwner {
        container_id: String,
        ifname: String,
    },
    #[error("{ip} is held by container {holder}")]
    Taken { ip: Ipv4Addr, holder: String },
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Who holds an address: one attachment of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    /// The record file's content, as the reference host-local plugin lays it out.
    fn record(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    /// Tolerates `\r\n` and trailing blanks (host-local writes `\r\n`); `None` when either
    /// line is missing.
    fn parse(text: &str) -> Option<Owner> {
        let mut lines = text.lines().map(str::trim);
        let container_id = lines.next().filter(|l| !l.is_empty())?.to_string();
        let ifname = lines.next().filter(|l| !l.is_empty())?.to_string();
        Some(Owner {
            container_id,
            ifname,
        })
    }

    /// Both parts can be a line of a record and half of an index file name.
    fn is_storable(&self) -> bool {
        fn ok(part: &str) -> bool {
            !part.is_empty()
                && !part.starts_with('.')
                && !part
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        }
        ok(&self.container_id) && ok(&self.ifname)
    }

    fn check_storable(&self) -> Result<(), StoreError> {
        if self.is_storable() {
            Ok(())
        } else {
            Err(StoreError::InvalidOwner {
                container_id: self.container_id.clone(),
                ifname: self.ifname.clone(),
            })
        }
    }
}

/// One network's allocation records. Open it freely; read or change records only through
/// [`IpStore::lock`].
#[derive(Debug)]
pub struct IpStore {
    dir: PathBuf,
}

impl IpStore {
    /// `<data_dir>/<network_name>/`, created if missing. The name comes from the network
    /// config, so it must not climb out of the data dir or hide as a dot file.
    pub fn open(data_dir: &Path, network_name: &str) -> Result<IpStore, StoreError> {
        if network_name.is_empty() || network_name.contains('/') || network_name.starts_with('.') {
            return Err(StoreError::InvalidName(network_name.to_string()));
        }
        let dir = data_dir.join(network_name);
        let owners = dir.join(OWNERS_DIR);
        std::fs::create_dir_all(&owners).map_err(io_error(&owners))?;
        Ok(IpStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store's exclusive lock, waiting for it; every method that reads or writes
    /// records is on the returned guard. Each call opens its own descriptor (flock locks
    /// belong to the open file, not the process), so threads of one process exclude each
    /// other too.
    pub fn lock(&self) -> Result<StoreLock<'_>, StoreError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        loop {
            // SAFETY: flock on a descriptor that `file` owns and keeps open.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(io_error(&path)(err));
            }
        }
        Ok(StoreLock {
            store: self,
            _lock: file,
        })
    }
}

/// The store with its lock held; closing the descriptor on drop releases the lock.
#[derive(Debug)]
pub struct StoreLock<'a> {
    store: &'a IpStore,
    _lock: File,
}

impl StoreLock<'_> {
    fn path_of(&self, ip: Ipv4Addr) -> PathBuf {
        self.store.dir.join(ip.to_string())
    }

    /// Whether a record file exists for `ip`. An unreadable entry counts as taken: handing
    /// out an address we cannot check is worse than skipping it.
    fn is_claimed(&self, ip: Ipv4Addr) -> bool {
        !matches!(
            std::fs::symlink_metadata(self.path_of(ip)),
            Err(e) if e.kind() == ErrorKind::NotFound
        )
    }

    /// The record's owner; `Corrupt` when the file does not hold one.
    fn holder(&self, ip: Ipv4Addr) -> Result<Option<Owner>, StoreError> {
        let path = self.path_of(ip);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        };
        match std::str::from_utf8(&bytes).ok().and_then(Owner::parse) {
            Some(owner) => Ok(Some(owner)),
            None => Err(StoreError::Corrupt {
                path,
                reason: "want container ID and interface on two lines".into(),
            }),
        }
    }

    /// Whether `owner` holds `ip`. A corrupt record is nobody's as far as lookups go: it
    /// keeps its address taken, and `list` reports it, but it must not wedge this owner's
    /// ADD or DEL.
    fn holds(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, StoreError> {
        match self.holder(ip) {
            Ok(holder) => Ok(holder.as_ref() == Some(owner)),
            Err(StoreError::Corrupt { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Addresses named by the entries of the store's directory (nothing else is a record).
    fn claimed_ips(&self) -> Result<Vec<Ipv4Addr>, StoreError> {
        let dir = &self.store.dir;
        let mut ips = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let entry = entry.map_err(io_error(dir))?;
            if let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            {
                ips.push(ip);
            }
        }
        ips.sort();
        Ok(ips)
    }

    /// Every allocation, by address. A corrupt record is an error rather than skipped: it
    /// still takes its address, and a garbage collector that silently stepped over it would
    /// leak that address forever; the error names the file for the operator to fix.
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, Owner)>, StoreError> {
        let mut found = Vec::new();
        for ip in self.claimed_ips()? {
            if let Some(owner) = self.holder(ip)? {
                found.push((ip, owner));
            }
        }
        Ok(found)
    }

    /// How long ago the claim on `ip` was written (`None` when there is none).
    pub fn age_of(&self, ip: Ipv4Addr) -> Option<std::time::Duration> {
        let modified = std::fs::metadata(self.path_of(ip)).ok()?.modified().ok()?;
        Some(modified.elapsed().unwrap_or_default())
    }

    /// `owners/<container ID>:<interface>`; `None` for an owner that cannot name a file
    /// (never one this store wrote, see [`Owner::is_storable`]).
    fn index_path(&self, owner: &Owner) -> Option<PathBuf> {
        owner.is_storable().then(|| {
            self.store
                .dir
                .join(OWNERS_DIR)
                .join(format!("{}:{}", owner.container_id, owner.ifname))
        })
    }

    /// The addresses the owner's index lists, whether or not the claims still agree.
    /// Unparsable lines are skipped: the index is only a shortcut to the records.
    fn indexed(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, StoreError> {
        let Some(path) = self.index_path(owner) else {
            return Ok(Vec::new());
        };
        match std::fs::read(&path) {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|line| line.trim().parse().ok())
                .collect()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Replaces the owner's index (removes it when `ips` is empty). Written aside and
    /// renamed so a crash never leaves half an index.
    fn write_index(&self, owner: &Owner, ips: &[Ipv4Addr]) -> Result<(), StoreError> {
        let Some(path) = self.index_path(owner) else {
            return Ok(());
        };
        if ips.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_error(&path)(e)),
                _ => Ok(()),
            };
        }
        let text: String = ips.iter().map(|ip| format!("{ip}\n")).collect();
        let scratch = self.store.dir.join(OWNERS_DIR).join(INDEX_SCRATCH);
        std::fs::write(&scratch, text).map_err(io_error(&scratch))?;
        std::fs::rename(&scratch, &path).map_err(io_error(&path))
    }

    /// The records that name `owner`, by reading them all; corrupt ones are skipped.
    fn scan_held(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, StoreError> {
        let mut held = Vec::new();
        for ip in self.claimed_ips()? {
            if self.holds(ip, owner)? {
                held.push(ip);
            }
        }
        Ok(held)
    }

    /// The addresses `owner` holds: through the index, or by scanning for an owner that
    /// cannot have one.
    fn held_by(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, StoreError> {
        if !owner.is_storable() {
            return self.scan_held(owner);
        }
        let mut held = Vec::new();
        for ip in self.indexed(owner)? {
            if !held.contains(&ip) && self.holds(ip, owner)? {
                held.push(ip);
            }
        }
        Ok(held)
    }

    /// The owner's address; the most recently claimed one if it somehow holds several.
    pub fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, StoreError> {
        Ok(self.held_by(owner)?.last().copied())
    }

    /// The owner's address: the one it holds already (a retried ADD), or the next free one
    /// after the last handed out.
    pub fn allocate(&self, pool: &Pool, owner: &Owner) -> Result<Ipv4Addr, StoreError> {
        owner.check_storable()?;
        if let Some(ip) = self.find(owner)? {
            return Ok(ip);
        }
        let last_path = self.store.dir.join(LAST_RESERVED_FILE);
        // Only a hint for where round robin resumes: missing or garbled means "from the
        // start".
        let last = std::fs::read_to_string(&last_path)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        let ip = pool.next_free(|ip| self.is_claimed(ip), last)?;
        self.write_record(ip, owner)?;
        // The claim is made and is what counts; failing the ADD over a lost hint would only
        // leave an address the runtime believes it never got.
        let _ = std::fs::write(&last_path, ip.to_string());
        Ok(ip)
    }

    /// A static address (the runtime asked for it): it must be assignable in `pool` and
    /// not held by another owner; holding it already is fine (a retried ADD).
    pub fn reserve(&self, pool: &Pool, ip: Ipv4Addr, owner: &Owner) -> Result<(), StoreError> {
        owner.check_storable()?;
        pool.check_assignable(ip)?;
        match self.holder(ip)? {
            Some(holder) if &holder == owner => {
                // A claim from before the index existed: index it so DEL finds it.
                let mut indexed = self.indexed(owner)?;
                if !indexed.contains(&ip) {
                    indexed.push(ip);
                    self.write_index(owner, &indexed)?;
                }
                Ok(())
            }
            Some(holder) => Err(StoreError::Taken {
                ip,
                holder: holder.container_id,
            }),
            None => self.write_record(ip, owner),
        }
    }

    /// The index entry, then the claim (create_new: never over another claim). A failed
    /// claim takes its index entry back out.
    fn write_record(&self, ip: Ipv4Addr, owner: &Owner) -> Result<(), StoreError> {
        let before = self.indexed(owner)?;
        let mut after = before.clone();
        if !after.contains(&ip) {
            after.push(ip);
            self.write_index(owner, &after)?;
        }
        let path = self.path_of(ip);
        let claimed = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))
            .and_then(|mut file| {
                file.write_all(owner.record().as_bytes()).map_err(|e| {
                    let _ = std::fs::remove_file(&path);
                    io_error(&path)(e)
                })
            });
        if claimed.is_err() && after != before {
            // Best effort: a stale index entry is ignored anyway.
            let _ = self.write_index(owner, &before);
        }
        claimed
    }

    /// Frees every address the owner holds and returns them; holding none is fine (DEL is
    /// idempotent). When the index knows nothing the records are scanned, so claims written
    /// before the index existed are freed too.
    pub fn release(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, StoreError> {
        let mut held = self.held_by(owner)?;
        if held.is_empty() && owner.is_storable() {
            held = self.scan_held(owner)?;
        }
        for ip in &held {
            self.release_ip(*ip)?;
        }
        self.write_index(owner, &[])?;
        held.sort();
        Ok(held)
    }

    /// Frees `ip` whoever holds it; `false` when it was free. The owner's index keeps a
    /// stale line, which lookups ignore and the owner's next release removes.
    pub fn release_ip(&self, ip: Ipv4Addr) -> Result<bool, StoreError> {
        let path = self.path_of(ip);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A scratch data dir named by process and test, removed even when the test fails.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("mycni-store-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    /// Every file under `dir` with its content, to show an operation changed nothing.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let content = std::fs::read(&path).unwrap();
                    files.push((path, content));
                }
            }
        }
        files.sort();
        files
    }

    #[test]
    fn allocates_in_order_releases_and_reuses() {
        let tmp = TempDir::new("reuse");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let names = ["a", "b", "c", "d", "e"];
        for (name, want) in names.iter().zip(2..=6) {
            let got = lock.allocate(&pool, &owner(name)).unwrap();
            assert_eq!(got, Ipv4Addr::new(10, 0, 0, want));
            assert_eq!(
                std::fs::read_to_string(store.dir().join(got.to_string())).unwrap(),
                format!("{name}\neth0\n")
            );
            assert_eq!(
                std::fs::read_to_string(store.dir().join("last_reserved_ip.0")).unwrap(),
                got.to_string()
            );
        }
        assert_eq!(lock.release(&owner("c")).unwrap(), vec![ip("10.0.0.4")]);
        assert_eq!(
            lock.release(&owner("c")).unwrap(),
            Vec::<Ipv4Addr>::new(),
            "DEL twice"
        );
        assert_eq!(lock.find(&owner("c")).unwrap(), None);
        // The freed address is the only one left, so round robin comes back to it.
        assert_eq!(lock.allocate(&pool, &owner("f")).unwrap(), ip("10.0.0.4"));
        let listed: Vec<_> = lock.list().unwrap();
        assert_eq!(listed.len(), 5);
        assert!(listed.contains(&(ip("10.0.0.4"), owner("f"))));
    }

    #[test]
    fn a_freed_address_is_not_handed_out_again_at_once() {
        let tmp = TempDir::new("roundrobin");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let a = store.lock().unwrap().allocate(&pool, &owner("a")).unwrap();
        store.lock().unwrap().release(&owner("a")).unwrap();
        // A fresh lock (another plugin process) picks up the round robin from disk.
        let b = store.lock().unwrap().allocate(&pool, &owner("b")).unwrap();
        assert_eq!((a, b), (ip("10.0.0.2"), ip("10.0.0.3")));
    }

    #[test]
    fn allocation_is_idempotent_per_owner() {
        let tmp = TempDir::new("idempotent");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let first = store.lock().unwrap().allocate(&pool, &owner("a")).unwrap();
        let lock = store.lock().unwrap();
        assert_eq!(lock.allocate(&pool, &owner("a")).unwrap(), first);
        assert_eq!(lock.find(&owner("a")).unwrap(), Some(first));
        // A second interface of the same container is another owner.
        let second_if = Owner {
            container_id: "a".into(),
            ifname: "net1".into(),
        };
        let other = lock.allocate(&pool, &second_if).unwrap();
        assert_ne!(other, first);
        assert_eq!(lock.list().unwrap().len(), 2);
        assert_eq!(lock.release(&owner("a")).unwrap(), vec![first]);
        assert_eq!(lock.find(&second_if).unwrap(), Some(other));
    }

    #[test]
    fn static_reservations_conflict_across_owners() {
        let tmp = TempDir::new("static");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let lock = store.lock().unwrap();
        let fixed = ip("10.0.0.9");
        lock.reserve(&pool, fixed, &owner("a")).unwrap();
        lock.reserve(&pool, fixed, &owner("a")).unwrap();
        match lock.reserve(&pool, fixed, &owner("b")) {
            Err(StoreError::Taken { ip, holder }) => {
                assert_eq!((ip, holder.as_str()), (fixed, "a"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            lock.reserve(&pool, ip("10.0.0.1"), &owner("b")),
            Err(StoreError::Ipam(IpamError::Reserved(_)))
        ));
        assert!(matches!(
            lock.reserve(&pool, ip("10.0.1.9"), &owner("b")),
            Err(StoreError::Ipam(IpamError::OutOfPool { .. }))
        ));
        assert_eq!(lock.find(&owner("a")).unwrap(), Some(fixed));
        assert_eq!(lock.find(&owner("b")).unwrap(), None);
        // The dynamic allocator steps around the static address until the pool is full.
        for i in 0..252 {
            assert_ne!(
                lock.allocate(&pool, &owner(&format!("d{i}"))).unwrap(),
                fixed
            );
        }
        assert!(matches!(
            lock.allocate(&pool, &owner("late")),
            Err(StoreError::Ipam(IpamError::Exhausted(_)))
        ));
    }

    #[test]
    fn release_frees_every_address_of_the_owner() {
        let tmp = TempDir::new("several");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let lock = store.lock().unwrap();
        let dynamic = lock.allocate(&pool, &owner("a")).unwrap();
        lock.reserve(&pool, ip("10.0.0.50"), &owner("a")).unwrap();
        let bystander = lock.allocate(&pool, &owner("b")).unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), Some(ip("10.0.0.50")));
        assert_eq!(
            lock.release(&owner("a")).unwrap(),
            vec![dynamic, ip("10.0.0.50")]
        );
        assert_eq!(lock.list().unwrap(), vec![(bystander, owner("b"))]);
        assert!(!store.dir().join("owners").join("a:eth0").exists());
    }

    #[test]
    fn exhaustion_leaves_no_extra_files() {
        let tmp = TempDir::new("exhaust");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        for i in 0..5 {
            lock.allocate(&pool, &owner(&format!("c{i}"))).unwrap();
        }
        let before = snapshot(store.dir());
        match lock.allocate(&pool, &owner("late")) {
            Err(StoreError::Ipam(IpamError::Exhausted(pool))) => assert_eq!(pool, "10.0.0.0/29"),
            other => panic!("{other:?}"),
        }
        assert_eq!(snapshot(store.dir()), before);
        assert_eq!(lock.list().unwrap().len(), 5);
    }

    #[test]
    fn release_ip_frees_whoever_holds_it() {
        let tmp = TempDir::new("releaseip");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let a = lock.allocate(&pool, &owner("a")).unwrap();
        assert!(lock.release_ip(a).unwrap());
        assert!(!lock.release_ip(a).unwrap());
        // The index line left behind is stale and ignored, even once another owner has it.
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        lock.reserve(&pool, a, &owner("b")).unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        assert!(lock.release(&owner("a")).unwrap().is_empty());
        assert_eq!(lock.find(&owner("b")).unwrap(), Some(a));
    }

    #[test]
    fn corrupt_records_are_reported_not_panicked_on() {
        let tmp = TempDir::new("corrupt");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        std::fs::write(store.dir().join("10.0.0.2"), "").unwrap();
        std::fs::write(store.dir().join("10.0.0.3"), [0xff, 0xfe, b'\n', 0x80]).unwrap();
        std::fs::write(store.dir().join("not-an-ip"), "ignored").unwrap();
        let lock = store.lock().unwrap();
        match lock.list() {
            Err(StoreError::Corrupt { path, .. }) => {
                assert_eq!(path, store.dir().join("10.0.0.2"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            lock.reserve(&pool, ip("10.0.0.3"), &owner("a")),
            Err(StoreError::Corrupt { .. })
        ));
        // The corrupt records keep their addresses but do not wedge anyone else.
        assert_eq!(lock.allocate(&pool, &owner("a")).unwrap(), ip("10.0.0.4"));
        assert_eq!(lock.find(&owner("a")).unwrap(), Some(ip("10.0.0.4")));
        assert_eq!(lock.release(&owner("a")).unwrap(), vec![ip("10.0.0.4")]);
        assert!(lock.release(&owner("nobody")).unwrap().is_empty());
    }

    #[test]
    fn a_garbled_index_falls_back_to_the_records() {
        let tmp = TempDir::new("garbledindex");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let a = lock.allocate(&pool, &owner("a")).unwrap();
        let index = store.dir().join("owners").join("a:eth0");
        std::fs::write(&index, [b'1', b'0', b'.', 0xff]).unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        assert_eq!(lock.release(&owner("a")).unwrap(), vec![a]);
        assert!(!index.exists());
    }

    #[test]
    fn a_claim_without_its_index_entry_is_still_released() {
        let tmp = TempDir::new("noindex");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let a = lock.allocate(&pool, &owner("a")).unwrap();
        std::fs::remove_file(store.dir().join("owners").join("a:eth0")).unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        assert_eq!(lock.release(&owner("a")).unwrap(), vec![a]);
        assert!(lock.list().unwrap().is_empty());
        // A static claim from before the index existed gets indexed when reserved again.
        lock.reserve(&pool, a, &owner("b")).unwrap();
        std::fs::remove_file(store.dir().join("owners").join("b:eth0")).unwrap();
        lock.reserve(&pool, a, &owner("b")).unwrap();
        assert_eq!(lock.find(&owner("b")).unwrap(), Some(a));
    }

    #[test]
    fn a_stale_index_entry_is_not_trusted() {
        let tmp = TempDir::new("staleindex");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let a = lock.allocate(&pool, &owner("a")).unwrap();
        // The claim now belongs to someone else (edited by hand, or a crash mid-release).
        std::fs::write(store.dir().join(a.to_string()), "b\r\neth0\r\n").unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        assert!(lock.release(&owner("a")).unwrap().is_empty());
        assert_eq!(lock.list().unwrap(), vec![(a, owner("b"))]);
        assert_eq!(lock.release(&owner("b")).unwrap(), vec![a]);
    }

    #[test]
    fn names_that_could_escape_the_store_are_refused() {
        let tmp = TempDir::new("names");
        for bad in ["", "a/b", "../x", ".hidden", ".", ".."] {
            assert!(
                matches!(IpStore::open(&tmp.0, bad), Err(StoreError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let before = snapshot(store.dir());
        for (container_id, ifname) in [
            ("../../etc", "eth0"),
            ("a:b", "eth0"),
            ("a\nb", "eth0"),
            ("", "eth0"),
            ("a", ""),
            ("a", "eth/0"),
            ("a", ".."),
        ] {
            let bad = Owner {
                container_id: container_id.into(),
                ifname: ifname.into(),
            };
            assert!(matches!(
                lock.allocate(&pool, &bad),
                Err(StoreError::InvalidOwner { .. })
            ));
            assert!(matches!(
                lock.reserve(&pool, ip("10.0.0.5"), &bad),
                Err(StoreError::InvalidOwner { .. })
            ));
            assert_eq!(lock.find(&bad).unwrap(), None);
            assert!(lock.release(&bad).unwrap().is_empty());
        }
        assert_eq!(snapshot(store.dir()), before);
    }

    #[test]
    fn the_lock_excludes_other_holders_until_dropped() {
        let tmp = TempDir::new("exclusive");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let released = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let held = store.lock().unwrap();
            let waiter = scope.spawn(|| {
                let _second = store.lock().unwrap();
                released.load(Ordering::SeqCst)
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            released.store(true, Ordering::SeqCst);
            drop(held);
            assert!(
                waiter.join().unwrap(),
                "second lock taken while the first was held"
            );
        });
    }

    #[test]
    fn thirty_two_concurrent_allocations_are_distinct() {
        let tmp = TempDir::new("concurrent");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let ips: BTreeSet<Ipv4Addr> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..32)
                .map(|i| {
                    let (store, pool) = (&store, &pool);
                    scope.spawn(move || {
                        let lock = store.lock().unwrap();
                        lock.allocate(pool, &owner(&format!("c{i}"))).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ips.len(), 32);
        assert!(ips.iter().all(|ip| pool.check_assignable(*ip).is_ok()));
        assert_eq!(store.lock().unwrap().list().unwrap().len(), 32);
    }
}
