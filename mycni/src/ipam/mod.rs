//! Address allocation from the node's pod CIDR, without I/O. The records of who holds
//! which address live in [`store`].
use std::fmt;
use std::net::Ipv4Addr;

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

/// The node's pod CIDR. Network, broadcast and the first host (the gateway) are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    network: u32,
    prefix_len: u8,
}

impl Pool {
    /// `a.b.c.d/len`; host bits are cleared.
    pub fn parse(cidr: &str) -> Result<Pool, IpamError> {
        let invalid = || IpamError::InvalidCidr(cidr.to_string());
        let (address, len) = cidr.split_once('/').ok_or_else(invalid)?;
        let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix_len: u8 = len.parse().map_err(|_| invalid())?;
        if !(8..=30).contains(&prefix_len) {
            return Err(invalid());
        }
        let mask = u32::MAX << (32 - prefix_len);
        Ok(Pool {
            network: u32::from(address) & mask,
            prefix_len,
        })
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix_len)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + self.size() - 1)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip).wrapping_sub(self.network) < self.size()
    }

    /// How many addresses pods can get.
    pub fn capacity(&self) -> u32 {
        self.size() - 3
    }

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
    /// `last_reserved`, wrapping around, so a freed address is not handed out again at once.
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
                let offset = u32::from(ip) - self.network;
                if offset >= first && offset < first + count {
                    (offset - first + 1) % count
                } else {
                    0
                }
            }
            None => 0,
        };
        (0..count)
            .map(|step| Ipv4Addr::from(self.network + first + (start + step) % count))
            .find(|ip| !is_used(*ip))
            .ok_or_else(|| IpamError::Exhausted(self.to_string()))
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix_len)
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
        for bad in [
            "10.244.1.0",
            "10.244.1.0/31",
            "10.244.1.0/7",
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
        // A stale last-reserved outside the pool restarts at the beginning.
        assert_eq!(
            pool.next_free(none, Some(ip("192.168.0.9"))),
            Ok(ip("10.0.0.2"))
        );
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
