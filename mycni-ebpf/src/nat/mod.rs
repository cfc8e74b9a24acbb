//! Masquerading: SNAT of pods' traffic leaving the cluster ([`snat`], with the port search in
//! [`ports`] and the refusals when no port is free in [`refuse`]), translating the replies
//! back ([`reverse`]), and ICMP errors about translated flows in both directions
//! ([`icmp_error`]).
pub(crate) mod flow;
pub(crate) mod icmp_error;
pub(crate) mod ports;
pub(crate) mod refuse;
pub(crate) mod reverse;
pub(crate) mod snat;
