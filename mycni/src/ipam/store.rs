//! The on-disk record of allocations, host-local style: under `<data dir>/<network>/`, one
//! file per allocated IP (named by the address, holding the container ID and interface),
//! `last_reserved_ip.0` for round robin, and a `lock` file taken with `flock` around every
//! read-modify-write, so concurrent plugin processes never hand out one address twice.
//!
//! An index `owners/<container ID>:<interface>` holding the IP makes ADD and DEL look an
//! owner up without reading every record, so their cost does not grow with the pod count.
//! The IP file is the claim and is written first; an index entry lost to a crash between
//! the two writes is covered by DEL's fallback scan and by GC.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::{IpamError, Pool};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip.0";
const OWNERS_DIR: &str = "owners";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid network name {0:?}")]
    InvalidName(String),
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
    fn record(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut lines = text.lines().map(str::trim);
        let container_id = lines.next().filter(|l| !l.is_empty())?.to_string();
        let ifname = lines.next().filter(|l| !l.is_empty())?.to_string();
        Some(Owner {
            container_id,
            ifname,
        })
    }
}

pub struct IpStore {
    dir: PathBuf,
}

impl IpStore {
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

    /// Takes the store's exclusive lock; every method that reads or writes records is on
    /// the returned guard. Each call opens its own descriptor, so threads exclude too.
    pub fn lock(&self) -> Result<StoreLock<'_>, StoreError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_error(&path)(err));
            }
        }
        Ok(StoreLock {
            store: self,
            _lock: file,
        })
    }
}

/// The store with its lock held; the lock is released when this drops.
pub struct StoreLock<'a> {
    store: &'a IpStore,
    _lock: File,
}

impl StoreLock<'_> {
    fn path_of(&self, ip: Ipv4Addr) -> PathBuf {
        self.store.dir.join(ip.to_string())
    }

    fn holder(&self, ip: Ipv4Addr) -> Result<Option<Owner>, StoreError> {
        let path = self.path_of(ip);
        match std::fs::read_to_string(&path) {
            Ok(text) => Owner::parse(&text).map(Some).ok_or(StoreError::Corrupt {
                path,
                reason: "want container ID and interface on two lines".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Every allocation. A corrupt record is an error, not skipped: it still holds its IP.
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, Owner)>, StoreError> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.store.dir).map_err(io_error(&self.store.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_error(&self.store.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if let Some(owner) = self.holder(ip)? {
                found.push((ip, owner));
            }
        }
        found.sort_by_key(|(ip, _)| *ip);
        Ok(found)
    }

    /// How long ago the claim on `ip` was written (`None` when there is none).
    pub fn age_of(&self, ip: Ipv4Addr) -> Option<std::time::Duration> {
        let modified = std::fs::metadata(self.path_of(ip)).ok()?.modified().ok()?;
        Some(modified.elapsed().unwrap_or_default())
    }

    /// `owners/<container ID>:<interface>`; `:` appears in neither (both are validated).
    fn index_path(&self, owner: &Owner) -> PathBuf {
        self.store
            .dir
            .join(OWNERS_DIR)
            .join(format!("{}:{}", owner.container_id, owner.ifname))
    }

    /// The owner's address, from the index.
    pub fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, StoreError> {
        let path = self.index_path(owner);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        };
        let ip: Ipv4Addr = text.trim().parse().map_err(|_| StoreError::Corrupt {
            path: path.clone(),
            reason: format!("{text:?} is not an address"),
        })?;
        // Trust the index only while the claim it points at is the owner's.
        Ok((self.holder(ip)?.as_ref() == Some(owner)).then_some(ip))
    }

    /// The owner's address: the one it holds already (a retried ADD), or the next free one.
    pub fn allocate(&self, pool: &Pool, owner: &Owner) -> Result<Ipv4Addr, StoreError> {
        if let Some(ip) = self.find(owner)? {
            return Ok(ip);
        }
        let last_path = self.store.dir.join(LAST_RESERVED_FILE);
        let last = std::fs::read_to_string(&last_path)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        let ip = pool.next_free(|ip| self.path_of(ip).exists(), last)?;
        self.write_record(ip, owner)?;
        std::fs::write(&last_path, ip.to_string()).map_err(io_error(&last_path))?;
        Ok(ip)
    }

    /// A static address: must be assignable and not held by anyone else.
    pub fn reserve(&self, pool: &Pool, ip: Ipv4Addr, owner: &Owner) -> Result<(), StoreError> {
        pool.check_assignable(ip)?;
        match self.holder(ip)? {
            Some(holder) if &holder == owner => Ok(()),
            Some(holder) => Err(StoreError::Taken {
                ip,
                holder: holder.container_id,
            }),
            None => self.write_record(ip, owner),
        }
    }

    /// The claim (create_new: two writers cannot both succeed), then the index.
    fn write_record(&self, ip: Ipv4Addr, owner: &Owner) -> Result<(), StoreError> {
        let path = self.path_of(ip);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all(owner.record().as_bytes())
            .map_err(io_error(&path))?;
        let index = self.index_path(owner);
        std::fs::write(&index, ip.to_string()).map_err(io_error(&index))
    }

    /// Frees every address the owner holds; holding none is fine (DEL is idempotent).
    /// Without an index entry it scans the records, so a claim whose index write was lost
    /// to a crash is freed too.
    pub fn release(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, StoreError> {
        let held: Vec<Ipv4Addr> = match self.find(owner)? {
            Some(ip) => vec![ip],
            None => self
                .list()?
                .into_iter()
                .filter(|(_, o)| o == owner)
                .map(|(ip, _)| ip)
                .collect(),
        };
        for ip in &held {
            self.release_ip(*ip)?;
        }
        let index = self.index_path(owner);
        match std::fs::remove_file(&index) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(&index)(e)),
            _ => {}
        }
        Ok(held)
    }

    fn release_ip(&self, ip: Ipv4Addr) -> Result<bool, StoreError> {
        let path = self.path_of(ip);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A scratch data dir, removed even when the test fails.
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

    #[test]
    fn allocates_releases_and_reuses() {
        let tmp = TempDir::new("reuse");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let a = lock.allocate(&pool, &owner("a")).unwrap();
        assert_eq!(
            lock.allocate(&pool, &owner("a")).unwrap(),
            a,
            "idempotent for one owner"
        );
        let b = lock.allocate(&pool, &owner("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(lock.find(&owner("b")).unwrap(), Some(b));
        assert_eq!(lock.release(&owner("a")).unwrap(), vec![a]);
        assert!(lock.release(&owner("a")).unwrap().is_empty());
        assert_eq!(lock.list().unwrap(), vec![(b, owner("b"))]);
    }

    #[test]
    fn static_reservations_conflict_across_owners() {
        let tmp = TempDir::new("static");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let lock = store.lock().unwrap();
        let ip: Ipv4Addr = "10.0.0.9".parse().unwrap();
        lock.reserve(&pool, ip, &owner("a")).unwrap();
        lock.reserve(&pool, ip, &owner("a")).unwrap();
        assert!(matches!(
            lock.reserve(&pool, ip, &owner("b")),
            Err(StoreError::Taken { .. })
        ));
        assert!(matches!(
            lock.reserve(&pool, "10.0.0.1".parse().unwrap(), &owner("b")),
            Err(StoreError::Ipam(IpamError::Reserved(_)))
        ));
        // The dynamic allocator steps around the static address.
        for i in 0..252 {
            assert_ne!(lock.allocate(&pool, &owner(&format!("d{i}"))).unwrap(), ip);
        }
    }

    #[test]
    fn exhaustion_leaves_no_extra_record() {
        let tmp = TempDir::new("exhaust");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        for i in 0..5 {
            lock.allocate(&pool, &owner(&format!("c{i}"))).unwrap();
        }
        assert!(matches!(
            lock.allocate(&pool, &owner("late")),
            Err(StoreError::Ipam(IpamError::Exhausted(_)))
        ));
        assert_eq!(lock.list().unwrap().len(), 5);
    }

    #[test]
    fn corrupt_records_are_reported_not_panicked_on() {
        let tmp = TempDir::new("corrupt");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        std::fs::write(store.dir().join("10.0.0.2"), "").unwrap();
        assert!(matches!(
            store.lock().unwrap().list(),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            IpStore::open(&tmp.0, "../x"),
            Err(StoreError::InvalidName(_))
        ));
    }

    #[test]
    fn a_claim_without_its_index_entry_is_still_released() {
        let tmp = TempDir::new("noindex");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let ip = lock.allocate(&pool, &owner("a")).unwrap();
        std::fs::remove_file(store.dir().join("owners").join("a:eth0")).unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        assert_eq!(lock.release(&owner("a")).unwrap(), vec![ip]);
        assert!(lock.list().unwrap().is_empty());
    }

    #[test]
    fn a_stale_index_entry_is_not_trusted() {
        let tmp = TempDir::new("staleindex");
        let store = IpStore::open(&tmp.0, "net").unwrap();
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let lock = store.lock().unwrap();
        let ip = lock.allocate(&pool, &owner("a")).unwrap();
        // The claim now belongs to someone else (edited by hand, or a crash mid-release).
        std::fs::write(store.dir().join(ip.to_string()), "b\neth0\n").unwrap();
        assert_eq!(lock.find(&owner("a")).unwrap(), None);
        assert!(lock.release(&owner("a")).unwrap().is_empty());
        assert_eq!(lock.list().unwrap(), vec![(ip, owner("b"))]);
    }

    #[test]
    fn thirty_two_concurrent_allocations_are_distinct() {
        let tmp = TempDir::new("concurrent");
        let pool = Pool::parse("10.0.0.0/24").unwrap();
        let ips: BTreeSet<Ipv4Addr> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..32)
                .map(|i| {
                    let dir = tmp.0.clone();
                    scope.spawn(move || {
                        let store = IpStore::open(&dir, "net").unwrap();
                        let lock = store.lock().unwrap();
                        lock.allocate(&pool, &owner(&format!("c{i}"))).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ips.len(), 32);
    }
}
