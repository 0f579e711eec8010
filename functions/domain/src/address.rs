//! Which IP addresses are publicly routable: the one definition, used when a webhook URL is
//! submitted (literal addresses) and by `kiln-webhooks`' guard on every address DNS returns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` is not publicly routable, or None when it is. IPv4-mapped and NAT64 IPv6 addresses
/// are judged by the IPv4 address inside them.
pub fn refused_range(ip: IpAddr) -> Option<Range> {
    match ip {
        IpAddr::V4(v4) => refused_v4_range(v4),
        IpAddr::V6(v6) => refused_v6_range(v6),
    }
}

/// Whether `ip` is publicly routable.
pub fn is_public(ip: IpAddr) -> bool {
    refused_range(ip).is_none()
}

/// What an address that webhooks may not reach is, e.g. `127.0.0.0/8 (loopback)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub name: &'static str,
    /// Admitted where loopback is allowed (local mode).
    pub loopback: bool,
}

/// A CIDR block of one [`Range`].
struct Block<A> {
    network: A,
    prefix: u32,
    range: Range,
}

const fn block<A>(network: A, prefix: u32, name: &'static str) -> Block<A> {
    Block { network, prefix, range: Range { name, loopback: false } }
}

const fn loopback<A>(network: A, prefix: u32, name: &'static str) -> Block<A> {
    Block { network, prefix, range: Range { name, loopback: true } }
}

/// Every IPv4 range that is not publicly routable (the IANA special-purpose registry), the
/// more specific first where two nest.
const REFUSED_V4: &[Block<Ipv4Addr>] = &[
    block(Ipv4Addr::new(0, 0, 0, 0), 8, "0.0.0.0/8 (this network, unspecified)"),
    block(Ipv4Addr::new(10, 0, 0, 0), 8, "10.0.0.0/8 (private use)"),
    block(Ipv4Addr::new(100, 64, 0, 0), 10, "100.64.0.0/10 (shared address space, carrier-grade NAT)"),
    loopback(Ipv4Addr::new(127, 0, 0, 0), 8, "127.0.0.0/8 (loopback)"),
    block(Ipv4Addr::new(169, 254, 0, 0), 16, "169.254.0.0/16 (link-local, cloud metadata)"),
    block(Ipv4Addr::new(172, 16, 0, 0), 12, "172.16.0.0/12 (private use)"),
    block(Ipv4Addr::new(192, 0, 2, 0), 24, "192.0.2.0/24 (documentation)"),
    block(Ipv4Addr::new(192, 0, 0, 0), 24, "192.0.0.0/24 (IETF protocol assignments)"),
    block(Ipv4Addr::new(192, 88, 99, 0), 24, "192.88.99.0/24 (6to4 relay anycast, deprecated)"),
    block(Ipv4Addr::new(192, 168, 0, 0), 16, "192.168.0.0/16 (private use)"),
    block(Ipv4Addr::new(198, 18, 0, 0), 15, "198.18.0.0/15 (benchmarking)"),
    block(Ipv4Addr::new(198, 51, 100, 0), 24, "198.51.100.0/24 (documentation)"),
    block(Ipv4Addr::new(203, 0, 113, 0), 24, "203.0.113.0/24 (documentation)"),
    block(Ipv4Addr::new(224, 0, 0, 0), 4, "224.0.0.0/4 (multicast)"),
    block(Ipv4Addr::BROADCAST, 32, "255.255.255.255 (broadcast)"),
    block(Ipv4Addr::new(240, 0, 0, 0), 4, "240.0.0.0/4 (reserved)"),
];

/// The named IPv6 ranges that are not publicly routable. Whatever else lies outside 2000::/3
/// (global unicast) is refused too; IPv4-mapped and NAT64 addresses are judged by the IPv4
/// address inside them.
const REFUSED_V6: &[Block<Ipv6Addr>] = &[
    block(Ipv6Addr::UNSPECIFIED, 128, "::/128 (unspecified)"),
    loopback(Ipv6Addr::LOCALHOST, 128, "::1/128 (loopback)"),
    block(Ipv6Addr::UNSPECIFIED, 96, "::/96 (IPv4-compatible, deprecated)"),
    block(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, "64:ff9b:1::/48 (local-use IPv4/IPv6 translation)"),
    block(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "100::/64 (discard-only)"),
    block(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32, "2001:db8::/32 (documentation)"),
    block(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23, "2001::/23 (IETF protocol assignments, Teredo)"),
    block(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, "2002::/16 (6to4)"),
    block(Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20, "3fff::/20 (documentation)"),
    block(Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16, "5f00::/16 (segment routing SIDs)"),
    block(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "fc00::/7 (unique local)"),
    block(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "fe80::/10 (link-local)"),
    block(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "fec0::/10 (site-local, deprecated)"),
    block(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "ff00::/8 (multicast)"),
];

const GLOBAL_UNICAST: Ipv6Addr = Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0);
const NOT_GLOBAL_UNICAST: Range = Range { name: "outside 2000::/3 (not global unicast)", loopback: false };
/// The well-known NAT64 prefix: `64:ff9b::a.b.c.d` reaches the IPv4 address a.b.c.d, so an
/// AWS DNS64 answer can lead to 169.254.169.254 as well as to a public host.
const NAT64: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

fn refused_v4_range(ip: Ipv4Addr) -> Option<Range> {
    let bits = u128::from(u32::from(ip));
    REFUSED_V4
        .iter()
        .find(|block| in_block(bits, u128::from(u32::from(block.network)), block.prefix, 32))
        .map(|block| block.range)
}

fn refused_v6_range(ip: Ipv6Addr) -> Option<Range> {
    let bits = u128::from(ip);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4_range(v4);
    }
    if in_block(bits, u128::from(NAT64), 96, 128) {
        // The low 32 bits are the IPv4 address: the truncation is the point.
        return refused_v4_range(Ipv4Addr::from(bits as u32));
    }
    let named = REFUSED_V6.iter().find(|block| in_block(bits, u128::from(block.network), block.prefix, 128));
    match named {
        Some(block) => Some(block.range),
        None if !in_block(bits, u128::from(GLOBAL_UNICAST), 3, 128) => Some(NOT_GLOBAL_UNICAST),
        None => None,
    }
}

/// Whether `address` lies in `network`/`prefix`, for addresses `width` bits wide.
fn in_block(address: u128, network: u128, prefix: u32, width: u32) -> bool {
    let mask = u128::MAX.checked_shl(width - prefix).unwrap_or(0);
    address & mask == network & mask
}
