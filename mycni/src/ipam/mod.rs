//! Address allocation from the node's pod CIDR, without I/O. The records of who holds
//! which address live in [`store`].
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub mod store;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid pod CIDR {0:?}: want a.b.c.d/len with len 8..=30")]
    InvalidCidr(String),
    #[error("{ip} is outside the pod CIDR {pool}")]
    OutOfPool { ip: Ipv4Addr, pool: String },
    #[error("{0} is reserved (network, gateway or broadcast)")]
    Reserved(Ipv4Addr),
    #[error("no free address in {0}")]
    Exhausted(String),
}

/// The node's pod CIDR as an address pool. Network, broadcast and the first host (the
/// gateway) are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// Host bits clear, prefix 8..=30.
    cidr: Ipv4Network,
}

impl Pool {
    /// A CIDR (`a.b.c.d/len`, or any form [`Ipv4Network`] reads) with len 8..=30; host
    /// bits are cleared, so `10.244.1.7/24` is `10.244.1.0/24` (operators paste a node
    /// address as often as a network). Shorter prefixes are refused as a likely typo; /31
    /// and /32 leave no room for a pod.
    pub fn parse(text: &str) -> Result<Pool, IpamError> {
        let cidr: Ipv4Network = text
            .parse()
            .map_err(|_| IpamError::InvalidCidr(text.to_string()))?;
        Pool::new(cidr).ok_or_else(|| IpamError::InvalidCidr(text.to_string()))
    }

    /// The pool of `cidr`'s network; `None` outside 8..=30.
    pub fn new(cidr: Ipv4Network) -> Option<Pool> {
        if !(8..=30).contains(&cidr.prefix()) {
            return None;
        }
        let cidr = Ipv4Network::new(cidr.network(), cidr.prefix()).ok()?;
        Some(Pool { cidr })
    }

    /// The pool's CIDR.
    pub fn cidr(&self) -> Ipv4Network {
        self.cidr
    }

    pub fn network(&self) -> Ipv4Addr {
        self.cidr.network()
    }

    pub fn prefix_len(&self) -> u8 {
        self.cidr.prefix()
    }

    /// Addresses in the subnet, reserved ones included (at most 2^24: the prefix is 8 or
    /// longer).
    fn size(&self) -> u32 {
        self.cidr.size()
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        self.cidr.broadcast()
    }

    /// The first host address, never given to a pod (as host-local reserves it). Pods route
    /// via a link-local gateway, so this keeps `.1` free for the node should it want one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip)
    }

    /// How many addresses pods can get.
    pub fn capacity(&self) -> u32 {
        self.size() - 3
    }

    /// Whether a pod may be given `ip` (a static address asked for by the runtime).
    pub fn check_assignable(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !self.contains(ip) {
            return Err(IpamError::OutOfPool {
                ip,
                pool: self.to_string(),
            });
        }
        if ip == self.network() || ip == self.broadcast() || ip == self.gateway() {
            return Err(IpamError::Reserved(ip));
        }
        Ok(())
    }

    /// Round robin, as the reference host-local plugin does: the first free address after
    /// `last_reserved`, wrapping around, so a freed address is not handed out again at once
    /// (a client that still caches it would reach the wrong pod). A `last_reserved` outside
    /// the assignable range (a stale record, another pool) restarts at the first address.
    pub fn next_free(
        &self,
        is_used: impl Fn(Ipv4Addr) -> bool,
        last_reserved: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        // Offsets 2..size-1 are assignable (0 network, 1 gateway, size-1 broadcast).
        let first = 2;
        let count = self.capacity();
        let start = match last_reserved.filter(|ip| self.contains(*ip)) {
            Some(ip) => {
                let offset = u32::from(ip) - u32::from(self.network());
                if offset >= first && offset < first + count {
                    (offset - first + 1) % count
                } else {
                    0
                }
            }
            None => 0,
        };
        (0..count)
            .map(|step| Ipv4Addr::from(u32::from(self.network()) + first + (start + step) % count))
            .find(|ip| !is_used(*ip))
            .ok_or_else(|| IpamError::Exhausted(self.to_string()))
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cidr.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_and_normalizes() {
        let pool = Pool::parse("10.244.1.77/24").unwrap();
        assert_eq!(pool.to_string(), "10.244.1.0/24");
        assert_eq!(pool.gateway(), ip("10.244.1.1"));
        assert_eq!(pool.broadcast(), ip("10.244.1.255"));
        assert_eq!(pool.capacity(), 253);
        assert_eq!(pool.network(), ip("10.244.1.0"));
        assert_eq!(pool.prefix_len(), 24);
        for bad in [
            "10.244.1.0",
            "10.244.1.0/31",
            "10.244.1.0/32",
            "10.244.1.0/7",
            "10.244.1.0/33",
            "10.244.1.0/",
            "10.244.1.0/24/24",
            "10.244.1.0/255.0.255.0",
            "10.244.1.0/24 ",
            " 10.244.1.0/24",
            "10.244.1.256/24",
            "10.244.1/24",
            "x/24",
            "10.244.1.0/x",
            "",
        ] {
            assert!(
                matches!(Pool::parse(bad), Err(IpamError::InvalidCidr(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn netmask_notation_is_a_prefix_too() {
        let pool = Pool::parse("10.244.1.9/255.255.255.0").unwrap();
        assert_eq!(pool.to_string(), "10.244.1.0/24");
        assert_eq!(pool.cidr(), "10.244.1.0/24".parse::<Ipv4Network>().unwrap());
    }

    #[test]
    fn prefix_bounds_and_membership() {
        let wide = Pool::parse("10.0.0.0/8").unwrap();
        assert_eq!(wide.capacity(), (1 << 24) - 3);
        assert_eq!(wide.broadcast(), ip("10.255.255.255"));
        assert!(wide.contains(ip("10.0.0.0")) && wide.contains(ip("10.255.255.255")));
        assert!(!wide.contains(ip("9.255.255.255")) && !wide.contains(ip("11.0.0.0")));

        let narrow = Pool::parse("192.168.7.9/30").unwrap();
        assert_eq!(narrow.to_string(), "192.168.7.8/30");
        assert_eq!(narrow.capacity(), 1);
        assert_eq!(narrow.next_free(|_| false, None), Ok(ip("192.168.7.10")));
        assert_eq!(
            narrow.next_free(|a| a == ip("192.168.7.10"), None),
            Err(IpamError::Exhausted("192.168.7.8/30".into()))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let out = pool.check_assignable(ip("10.0.1.2")).unwrap_err();
        assert_eq!(
            out.to_string(),
            "10.0.1.2 is outside the pod CIDR 10.0.0.0/29"
        );
        assert_eq!(
            Pool::parse("10.0.0.0/31").unwrap_err().to_string(),
            "invalid pod CIDR \"10.0.0.0/31\": want a.b.c.d/len with len 8..=30"
        );
        assert_eq!(
            IpamError::Exhausted(pool.to_string()).to_string(),
            "no free address in 10.0.0.0/29"
        );
    }

    #[test]
    fn reserved_and_foreign_addresses_are_not_assignable() {
        let pool = Pool::parse("10.244.1.0/24").unwrap();
        for reserved in ["10.244.1.0", "10.244.1.1", "10.244.1.255"] {
            assert_eq!(
                pool.check_assignable(ip(reserved)),
                Err(IpamError::Reserved(ip(reserved)))
            );
        }
        assert!(matches!(
            pool.check_assignable(ip("10.244.2.5")),
            Err(IpamError::OutOfPool { .. })
        ));
        assert_eq!(pool.check_assignable(ip("10.244.1.2")), Ok(()));
    }

    #[test]
    fn hands_out_every_assignable_address_once_then_exhausts() {
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let mut used = BTreeSet::new();
        let mut last = None;
        for _ in 0..pool.capacity() {
            let next = pool.next_free(|ip| used.contains(&ip), last).unwrap();
            assert_eq!(pool.check_assignable(next), Ok(()));
            assert!(used.insert(next));
            last = Some(next);
        }
        assert_eq!(used.len(), 5);
        assert_eq!(
            pool.next_free(|ip| used.contains(&ip), last),
            Err(IpamError::Exhausted("10.0.0.0/29".into()))
        );
    }

    #[test]
    fn round_robin_continues_after_the_last_reserved_and_wraps() {
        let pool = Pool::parse("10.0.0.0/29").unwrap(); // .2 ..= .6
        let none = |_| false;
        assert_eq!(pool.next_free(none, None), Ok(ip("10.0.0.2")));
        assert_eq!(
            pool.next_free(none, Some(ip("10.0.0.3"))),
            Ok(ip("10.0.0.4"))
        );
        assert_eq!(
            pool.next_free(none, Some(ip("10.0.0.6"))),
            Ok(ip("10.0.0.2"))
        );
        // A stale last-reserved outside the pool, or on a reserved address, restarts at the
        // beginning.
        for stale in ["192.168.0.9", "10.0.0.0", "10.0.0.1", "10.0.0.7"] {
            assert_eq!(pool.next_free(none, Some(ip(stale))), Ok(ip("10.0.0.2")));
        }
        // Used addresses after the last reserved are stepped over, wrapping past the end.
        let used: BTreeSet<_> = ["10.0.0.6", "10.0.0.2"].map(ip).into();
        assert_eq!(
            pool.next_free(|a| used.contains(&a), Some(ip("10.0.0.5"))),
            Ok(ip("10.0.0.3"))
        );
    }

    #[test]
    fn reserved_addresses_are_never_offered() {
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let reserved = [pool.network(), pool.gateway(), pool.broadcast()];
        // Whatever is marked used and wherever the round robin starts, the allocator never
        // even asks about a reserved address, let alone returns one.
        for start in 0..=8u32 {
            let last = Some(Ipv4Addr::from(u32::from(pool.network()) + start));
            let asked = std::cell::RefCell::new(Vec::new());
            let got = pool.next_free(
                |a| {
                    asked.borrow_mut().push(a);
                    true
                },
                last,
            );
            assert_eq!(got, Err(IpamError::Exhausted(pool.to_string())));
            let asked = asked.into_inner();
            assert_eq!(asked.len(), 5, "each assignable address once");
            assert!(asked.iter().all(|a| !reserved.contains(a)), "{asked:?}");
        }
    }

    #[test]
    fn a_freed_address_is_reused_once_the_others_are_taken() {
        let pool = Pool::parse("10.0.0.0/29").unwrap();
        let used: BTreeSet<_> = ["10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6"]
            .map(ip)
            .into();
        assert_eq!(
            pool.next_free(|a| used.contains(&a), Some(ip("10.0.0.5"))),
            Ok(ip("10.0.0.4"))
        );
    }
}
