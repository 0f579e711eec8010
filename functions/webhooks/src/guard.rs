//! The SSRF guard: which addresses a webhook may reach, checked on what DNS actually returned.
//!
//! A tenant chooses the URL, so without this a webhook could reach the cloud metadata service
//! (169.254.169.254), the VPC's private services or the function's own loopback. The guard
//! refuses every address that is not publicly routable, after resolution, and hands back the
//! one vetted address the caller must connect to (see `WebhookSender` for the pinning).

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
};

/// Looks host names up. [`SystemResolver`] in production; tests pass a fake.
pub trait Resolver: Send + Sync {
    /// Every address `host` resolves to (the port is the caller's; it may be ignored).
    fn lookup(&self, host: &str, port: u16) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;
}

/// A shared resolver resolves as the one it shares.
impl<R: Resolver> Resolver for std::sync::Arc<R> {
    fn lookup(&self, host: &str, port: u16) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send {
        R::lookup(self, host, port)
    }
}

/// The operating system's resolver, through `tokio::net::lookup_host`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Decides which IP addresses a webhook may connect to.
#[derive(Debug, Clone)]
pub struct AddressGuard<R = SystemResolver> {
    allow_loopback: bool,
    resolver: R,
}

/// An address the guard will not connect to, and the range that it falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is not publicly routable: {range}")]
pub struct Refused {
    ip: IpAddr,
    range: &'static str,
}

impl Refused {
    /// The refused address, as it was given (an IPv4-mapped address stays IPv6).
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The range it falls in, e.g. `169.254.0.0/16 (link-local, cloud metadata)`.
    pub fn range(&self) -> &'static str {
        self.range
    }
}

/// Why a host gave no address to connect to.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The host is, or resolves to, an address the guard refuses. If a name has several
    /// addresses and any one is refused, the name is refused: an attacker's DNS would
    /// otherwise mix a private address in and hope it gets picked.
    #[error("refused {host}: {refused}")]
    Refused {
        host: String,
        #[source]
        refused: Refused,
    },
    /// The lookup failed (which may pass: the caller retries).
    #[error("could not resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddresses { host: String },
}

impl GuardError {
    /// Whether the host itself is unacceptable, as opposed to a lookup that may succeed later.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

impl AddressGuard {
    /// A guard using the system resolver. `allow_loopback` admits 127.0.0.0/8 and ::1 (local
    /// mode only); every other non-public range is refused whatever it says.
    pub fn new(allow_loopback: bool) -> Self {
        Self::with_resolver(allow_loopback, SystemResolver)
    }
}

impl<R: Resolver> AddressGuard<R> {
    /// A guard that looks names up with `resolver`.
    pub fn with_resolver(allow_loopback: bool, resolver: R) -> Self {
        Self { allow_loopback, resolver }
    }

    /// Whether `ip` may be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let range: Option<Range> = refused_range(ip);
        match range {
            Some(range) if !(range.loopback && self.allow_loopback) => Err(Refused { ip, range: range.name }),
            _ => Ok(()),
        }
    }

    /// The one address to connect to for `host` (a name, or an IP literal with or without
    /// brackets): every address the name resolves to must pass [`check`](Self::check); an
    /// IPv4 one is preferred, since Lambda functions in a VPC often have no IPv6 route.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, GuardError> {
        let literal = host.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            self.check(ip).map_err(|refused| GuardError::Refused { host: host.to_owned(), refused })?;
            return Ok(SocketAddr::new(ip, port));
        }
        let addresses = self
            .resolver
            .lookup(host, port)
            .await
            .map_err(|source| GuardError::Lookup { host: host.to_owned(), source })?;
        for address in &addresses {
            self.check(address.ip()).map_err(|refused| GuardError::Refused { host: host.to_owned(), refused })?;
        }
        let chosen = addresses
            .iter()
            .find(|address| address.is_ipv4())
            .or_else(|| addresses.first())
            .ok_or_else(|| GuardError::NoAddresses { host: host.to_owned() })?;
        Ok(SocketAddr::new(chosen.ip(), port))
    }
}

use kiln_domain::address::{Range, refused_range};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A resolver answering from a fixed table, counting its lookups.
    struct Table {
        answers: Vec<SocketAddr>,
        lookups: AtomicUsize,
    }

    impl Table {
        fn new(answers: &[&str]) -> Self {
            Self { answers: answers.iter().map(|a| SocketAddr::new(ip(a), 0)).collect(), lookups: AtomicUsize::new(0) }
        }
    }

    impl Resolver for &Table {
        async fn lookup(&self, _host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok(self.answers.clone())
        }
    }

    struct Failing;

    impl Resolver for Failing {
        async fn lookup(&self, _host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
            Err(io::Error::other("no such host"))
        }
    }

    #[test]
    fn refuses_every_non_public_range() {
        let guard = AddressGuard::new(false);
        let cases = [
            ("0.0.0.0", "0.0.0.0/8"),
            ("0.1.2.3", "0.0.0.0/8"),
            ("10.0.0.1", "10.0.0.0/8"),
            ("10.255.255.255", "10.0.0.0/8"),
            ("100.64.0.1", "100.64.0.0/10"),
            ("100.127.255.254", "100.64.0.0/10"),
            ("127.0.0.1", "127.0.0.0/8"),
            ("127.255.0.9", "127.0.0.0/8"),
            ("169.254.169.254", "169.254.0.0/16"),
            ("169.254.170.2", "169.254.0.0/16"),
            ("172.16.0.1", "172.16.0.0/12"),
            ("172.31.255.255", "172.16.0.0/12"),
            ("192.0.0.8", "192.0.0.0/24"),
            ("192.0.2.10", "192.0.2.0/24"),
            ("192.88.99.1", "192.88.99.0/24"),
            ("192.168.1.1", "192.168.0.0/16"),
            ("198.18.0.1", "198.18.0.0/15"),
            ("198.19.255.255", "198.18.0.0/15"),
            ("198.51.100.7", "198.51.100.0/24"),
            ("203.0.113.99", "203.0.113.0/24"),
            ("224.0.0.251", "224.0.0.0/4"),
            ("239.255.255.250", "224.0.0.0/4"),
            ("240.0.0.1", "240.0.0.0/4"),
            ("255.255.255.255", "255.255.255.255 (broadcast)"),
            ("::", "::/128"),
            ("::1", "::1/128"),
            ("::127.0.0.1", "::/96"),
            ("::8.8.8.8", "::/96"),
            ("64:ff9b:1::a", "64:ff9b:1::/48"),
            ("100::1", "100::/64"),
            ("2001:db8::1", "2001:db8::/32"),
            ("2001::1", "2001::/23"),
            ("2002:a00:1::1", "2002::/16"),
            ("3fff::1", "3fff::/20"),
            ("5f00::1", "5f00::/16"),
            ("fc00::1", "fc00::/7"),
            ("fd00:ec2::254", "fc00::/7"),
            ("fe80::1", "fe80::/10"),
            ("febf:ffff::1", "fe80::/10"),
            ("fec0::1", "fec0::/10"),
            ("ff02::1", "ff00::/8"),
            ("4000::1", "outside 2000::/3"),
            ("::ffff:10.0.0.1", "10.0.0.0/8"),
            ("::ffff:127.0.0.1", "127.0.0.0/8"),
            ("::ffff:169.254.169.254", "169.254.0.0/16"),
            ("::ffff:0.0.0.0", "0.0.0.0/8"),
            ("64:ff9b::a9fe:a9fe", "169.254.0.0/16"),
            ("64:ff9b::7f00:1", "127.0.0.0/8"),
        ];
        for (address, range) in cases {
            let refused = guard.check(ip(address)).expect_err(address);
            assert!(refused.range().starts_with(range), "{address}: {} is not {range}", refused.range());
            assert_eq!(refused.ip(), ip(address));
        }
    }

    #[test]
    fn admits_public_addresses_including_their_mapped_and_nat64_forms() {
        let guard = AddressGuard::new(false);
        for address in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(guard.check(ip(address)), Ok(()), "{address}");
        }
    }

    #[test]
    fn loopback_is_admitted_only_when_allowed_and_nothing_else_is() {
        let local = AddressGuard::new(true);
        for address in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(local.check(ip(address)), Ok(()), "{address}");
            assert!(AddressGuard::new(false).check(ip(address)).is_err(), "{address}");
        }
        for address in ["10.0.0.1", "169.254.169.254", "0.0.0.0", "::", "fe80::1", "fd00::1"] {
            assert!(local.check(ip(address)).is_err(), "{address}");
        }
    }

    #[tokio::test]
    async fn resolves_literals_without_a_lookup() {
        let table = Table::new(&["10.0.0.1"]);
        let guard = AddressGuard::with_resolver(false, &table);
        assert_eq!(guard.resolve("8.8.8.8", 443).await.unwrap(), "8.8.8.8:443".parse().unwrap());
        assert_eq!(guard.resolve("[2606:4700::1]", 8443).await.unwrap(), "[2606:4700::1]:8443".parse().unwrap());
        let refused = guard.resolve("[::ffff:127.0.0.1]", 443).await.unwrap_err();
        assert!(refused.is_refusal(), "{refused}");
        assert_eq!(table.lookups.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn refuses_a_name_if_any_of_its_addresses_is_refused() {
        let table = Table::new(&["93.184.215.14", "10.0.0.1"]);
        let guard = AddressGuard::with_resolver(false, &table);
        match guard.resolve("mixed.example", 443).await {
            Err(GuardError::Refused { host, refused }) => {
                assert_eq!(host, "mixed.example");
                assert_eq!(refused.ip(), ip("10.0.0.1"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn prefers_an_ipv4_address_and_uses_the_callers_port() {
        let table = Table::new(&["2606:4700::1", "93.184.215.14", "93.184.215.15"]);
        let guard = AddressGuard::with_resolver(false, &table);
        assert_eq!(guard.resolve("dual.example", 8443).await.unwrap(), "93.184.215.14:8443".parse().unwrap());
        let v6_only = Table::new(&["2606:4700::1"]);
        let guard = AddressGuard::with_resolver(false, &v6_only);
        assert_eq!(guard.resolve("v6.example", 443).await.unwrap(), "[2606:4700::1]:443".parse().unwrap());
    }

    #[tokio::test]
    async fn reports_failed_and_empty_lookups_as_such() {
        let failing = AddressGuard::with_resolver(false, Failing);
        assert!(matches!(failing.resolve("gone.example", 443).await, Err(GuardError::Lookup { .. })));
        let empty = Table::new(&[]);
        let guard = AddressGuard::with_resolver(false, &empty);
        assert!(matches!(guard.resolve("empty.example", 443).await, Err(GuardError::NoAddresses { .. })));
    }

    #[tokio::test]
    async fn checks_what_the_system_resolver_returns_for_localhost() {
        let refused = AddressGuard::new(false).resolve("localhost", 80).await.unwrap_err();
        assert!(refused.is_refusal(), "{refused}");
        let local = AddressGuard::new(true).resolve("localhost", 80).await.unwrap();
        assert!(local.ip().is_loopback(), "{local}");
    }
}
