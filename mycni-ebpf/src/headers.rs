//! Protocol numbers, flags and header offsets of the frames the programs read and write.

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_ARP: u16 = 0x0806;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const ARP_OP_REQUEST: u16 = 1;
pub(crate) const ARP_OP_REPLY: u16 = 2;
pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const ICMP_ECHO_REPLY: u8 = 0;
pub(crate) const ICMP_DEST_UNREACH: u8 = 3;
pub(crate) const ICMP_ECHO_REQUEST: u8 = 8;
pub(crate) const ICMP_TIME_EXCEEDED: u8 = 11;
pub(crate) const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag and fragment offset mask.
pub(crate) const IP_MF: u16 = 0x2000;
pub(crate) const IP_OFFSET: u16 = 0x1fff;
pub(crate) const AF_INET: u32 = 2;
pub(crate) const PACKET_HOST: u32 = 0;
// Offsets inside an Ethernet + IPv4 frame.
pub(crate) const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub(crate) const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub(crate) const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub(crate) const IP_DST_OFF: usize = ETH_HLEN + 16;
// Offsets inside an Ethernet + ARP (Ethernet/IPv4) frame.
pub(crate) const ARP_OP_OFF: usize = ETH_HLEN + 6;
pub(crate) const ARP_SHA_OFF: usize = ETH_HLEN + 8;
pub(crate) const ARP_SPA_OFF: usize = ETH_HLEN + 14;
pub(crate) const ARP_THA_OFF: usize = ETH_HLEN + 18;
pub(crate) const ARP_TPA_OFF: usize = ETH_HLEN + 24;
