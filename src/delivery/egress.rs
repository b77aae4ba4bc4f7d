//! The egress guard: which addresses deliveries may reach.
//!
//! Loopback, link-local (cloud metadata), private and other special-purpose ranges are refused
//! unless an `--egress-allow-cidr` covers the address; plain http only with `--egress-allow-http`. URLs are
//! checked when a Webhook is reconciled (scheme, literal addresses), and every resolved address is
//! checked again at connect time, so DNS cannot rebind a name to a blocked address.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::LazyLock,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use url::{Host, Url};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressDenied {
    #[error("not an absolute http(s) URL: {0}")]
    InvalidUrl(String),
    #[error("plain http is not allowed (the operator runs without --egress-allow-http); use https")]
    PlainHttp,
    #[error("{ip} is a {range} address, refused unless --egress-allow-cidr covers it")]
    BlockedAddress { ip: IpAddr, range: &'static str },
}

/// A URL as it may be shown in conditions, Events and logs: credentials in the userinfo and
/// every query value are replaced by `***` (a URL with a token in it is a secret too).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        // Not parseable: keep the scheme and host part only, as text.
        let without_query = url.split(['?', '#']).next().unwrap_or_default();
        return match without_query.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{host}")
            }
            None => without_query.to_owned(),
        };
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username("***");
        let _ = parsed.set_password(None);
    }
    if parsed.query().is_some() {
        let keys: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        parsed
            .query_pairs_mut()
            .clear()
            .extend_pairs(keys.iter().map(|k| (k.as_str(), "***")));
    }
    if parsed.fragment().is_some() {
        parsed.set_fragment(None);
    }
    parsed.to_string()
}

/// Egress policy from `--egress-allow-http` and `--egress-allow-cidr`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow_http: bool,
    pub allow_cidrs: Vec<IpNet>,
}

impl EgressPolicy {
    pub fn new(allow_http: bool, allow_cidrs: Vec<IpNet>) -> Self {
        Self {
            allow_http,
            allow_cidrs,
        }
    }

    /// Checks what can be known before connecting: the scheme, and the host when it is an
    /// address (or `localhost`). Names are checked on their resolved addresses by [`Self::check_ip`].
    pub fn check_url(&self, url: &str) -> Result<Url, EgressDenied> {
        let parsed = Url::parse(url).map_err(|e| EgressDenied::InvalidUrl(e.to_string()))?;
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err(EgressDenied::PlainHttp),
            other => {
                return Err(EgressDenied::InvalidUrl(format!(
                    "scheme {other} is not http(s)"
                )));
            }
        }
        match parsed.host() {
            Some(Host::Ipv4(ip)) => self.check_ip(ip.into())?,
            Some(Host::Ipv6(ip)) => self.check_ip(ip.into())?,
            Some(Host::Domain(d)) if is_localhost(d) => {
                self.check_ip(Ipv4Addr::LOCALHOST.into())?
            }
            Some(Host::Domain(_)) => {}
            None => return Err(EgressDenied::InvalidUrl("no host".into())),
        }
        Ok(parsed)
    }

    /// The connect-time decision for an address reached through a Webhook's `serviceRef`:
    /// exactly the ClusterIP of that Service is allowed (it was named exactly, in the Webhook's
    /// own namespace); any other address is judged as [`Self::check_ip`] judges it.
    pub fn check_service_ip(&self, ip: IpAddr, cluster_ip: IpAddr) -> Result<(), EgressDenied> {
        if ip == cluster_ip {
            Ok(())
        } else {
            self.check_ip(ip)
        }
    }

    /// The connect-time decision for one resolved address.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), EgressDenied> {
        let ip = canonical(ip);
        if self.allow_cidrs.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match special_range(ip) {
            Some(range) => Err(EgressDenied::BlockedAddress { ip, range }),
            None => Ok(()),
        }
    }
}

/// `localhost` and every name under it, with or without the trailing dot of a fully qualified
/// name (RFC 6761: they are loopback whatever a resolver says).
fn is_localhost(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// IPv4-mapped and NAT64 IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

const V4_RANGES: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

const V6_RANGES: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    // Forms that carry an IPv4 address: deprecated IPv4-compatible, IPv4-translated, and the
    // local-use NAT64 prefix (RFC 8215), which can reach private IPv4 through a gateway.
    ("::/96", "IPv4-compatible"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6) SID"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated private)"),
    ("ff00::/8", "multicast"),
];

/// The range tables, parsed once (an entry that does not parse is a bug: the test below
/// parses every one).
static PARSED_V4: LazyLock<Vec<(Ipv4Net, &'static str)>> = LazyLock::new(|| parse(V4_RANGES));
static PARSED_V6: LazyLock<Vec<(Ipv6Net, &'static str)>> = LazyLock::new(|| parse(V6_RANGES));

fn parse<N: std::str::FromStr>(table: &[(&str, &'static str)]) -> Vec<(N, &'static str)> {
    table
        .iter()
        .filter_map(|(net, name)| net.parse().ok().map(|n| (n, *name)))
        .collect()
}

/// The special-purpose range `ip` falls in, if any (IANA special-purpose registries).
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => PARSED_V4
            .iter()
            .find(|(net, _)| net.contains(&v4))
            .map(|(_, name)| *name),
        IpAddr::V6(v6) => PARSED_V6
            .iter()
            .find(|(net, _)| net.contains(&v6))
            .map(|(_, name)| *name)
            .or_else(|| (v6 == Ipv6Addr::UNSPECIFIED).then_some("unspecified")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_clusterip_is_allowed_only_through_its_service_ref() {
        let policy = EgressPolicy::new(true, Vec::new());
        let cluster_ip = ip("10.0.0.12");
        assert_eq!(policy.check_service_ip(cluster_ip, cluster_ip), Ok(()));
        // Every other private address stays refused, for that Service too ...
        for other in ["10.0.0.13", "169.254.169.254", "127.0.0.1"] {
            assert!(
                policy.check_service_ip(ip(other), cluster_ip).is_err(),
                "{other}"
            );
        }
        // ... and the same ClusterIP written as a url is refused.
        assert_eq!(
            policy.check_url("http://10.0.0.12:8080/h").unwrap_err(),
            EgressDenied::BlockedAddress {
                ip: cluster_ip,
                range: "private"
            }
        );
    }

    #[test]
    fn special_ranges_are_refused_and_public_addresses_allowed() {
        let policy = EgressPolicy::default();
        for (addr, range) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("100.100.1.1", "shared (carrier-grade NAT)"),
            ("0.0.0.0", "\"this network\""),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("fd00::1", "unique local (private)"),
            ("fe80::1", "link-local"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
            ("::", "unspecified"),
            ("::7f00:1", "IPv4-compatible"),
            ("::ffff:0:a00:1", "IPv4-translated"),
            ("64:ff9b:1::a00:1", "local-use NAT64"),
            ("fec0::1", "site-local (deprecated private)"),
            ("feff:ffff::1", "site-local (deprecated private)"),
            ("3fff::1", "documentation"),
            ("3fff:fff::1", "documentation"),
            ("5f00::1", "segment routing (SRv6) SID"),
        ] {
            match policy.check_ip(ip(addr)) {
                Err(EgressDenied::BlockedAddress { range: r, .. }) => {
                    assert_eq!(r, range, "{addr}")
                }
                other => panic!("{addr}: {other:?}"),
            }
        }
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "172.32.0.1",
            "11.0.0.1",
        ] {
            assert_eq!(policy.check_ip(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn every_range_of_the_tables_parses() {
        assert_eq!(PARSED_V4.len(), V4_RANGES.len());
        assert_eq!(PARSED_V6.len(), V6_RANGES.len());
        // Just outside the new IPv6 ranges is public.
        let policy = EgressPolicy::default();
        for addr in ["3fff:1000::1", "5f01::1", "ff00::1"] {
            let blocked = policy.check_ip(ip(addr)).is_err();
            assert_eq!(blocked, addr == "ff00::1", "{addr}");
        }
    }

    #[test]
    fn localhost_names_are_loopback_with_or_without_the_trailing_dot() {
        let strict = EgressPolicy::new(true, vec![]);
        for url in [
            "http://localhost./x",
            "http://LOCALHOST.:8080/x",
            "http://a.localhost./x",
            "http://a.b.localhost/x",
        ] {
            assert!(
                matches!(
                    strict.check_url(url),
                    Err(EgressDenied::BlockedAddress {
                        range: "loopback",
                        ..
                    })
                ),
                "{url}"
            );
        }
        assert!(strict.check_url("http://localhost.example.com/x").is_ok());
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("https://user:hunter2@example.com/hook?token=abc&x=1#frag"),
            "https://***@example.com/hook?token=***&x=***"
        );
        assert_eq!(
            redact_url("https://example.com/hook"),
            "https://example.com/hook"
        );
        assert_eq!(
            redact_url("https://:pw@example.com/"),
            "https://***@example.com/"
        );
        let unparsable = redact_url("https://user:pw@exa mple.com/x?t=1");
        assert!(
            !unparsable.contains("pw") && !unparsable.contains("t=1"),
            "{unparsable}"
        );
    }

    #[test]
    fn allow_cidr_opens_exactly_its_range() {
        let policy = EgressPolicy::new(
            true,
            vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
        );
        assert_eq!(policy.check_ip(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check_ip(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(policy.check_ip(ip("10.1.200.3")), Ok(()));
        assert!(policy.check_ip(ip("10.2.0.1")).is_err());
        assert!(
            policy.check_ip(ip("::1")).is_err(),
            "IPv6 loopback needs its own --egress-allow-cidr"
        );
    }

    #[test]
    fn urls_are_checked_for_scheme_and_literal_hosts() {
        let strict = EgressPolicy::default();
        assert_eq!(
            strict.check_url("http://example.com/x"),
            Err(EgressDenied::PlainHttp)
        );
        assert!(strict.check_url("https://example.com/x").is_ok());
        assert!(matches!(
            strict.check_url("https://169.254.169.254/latest"),
            Err(EgressDenied::BlockedAddress { .. })
        ));
        assert!(matches!(
            strict.check_url("https://[::1]:8443/"),
            Err(EgressDenied::BlockedAddress { .. })
        ));
        assert!(matches!(
            strict.check_url("https://localhost/"),
            Err(EgressDenied::BlockedAddress { .. })
        ));
        assert!(matches!(
            strict.check_url("ftp://example.com/"),
            Err(EgressDenied::InvalidUrl(_))
        ));
        assert!(matches!(
            strict.check_url("/relative"),
            Err(EgressDenied::InvalidUrl(_))
        ));

        let local = EgressPolicy::new(true, vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(local.check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(local.check_url("http://localhost:8080/hook").is_ok());
        assert!(matches!(
            local.check_url("http://10.0.0.1/"),
            Err(EgressDenied::BlockedAddress { .. })
        ));
    }
}

/// Every spelling of a blocked address is refused: the URL parser and [`canonical`] must agree
/// on what address a host names. Decision functions only: nothing connects.
#[cfg(test)]
mod proptests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    /// An address in one of the ranges an attacker aims at (loopback, private, link-local).
    fn blocked_v4() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            any::<u32>().prop_map(|n| Ipv4Addr::from(0x7f00_0000 | (n & 0x00ff_ffff))),
            any::<u32>().prop_map(|n| Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff))),
            any::<u32>().prop_map(|n| Ipv4Addr::from(0xac10_0000 | (n & 0x000f_ffff))),
            any::<u32>().prop_map(|n| Ipv4Addr::from(0xc0a8_0000 | (n & 0x0000_ffff))),
            any::<u32>().prop_map(|n| Ipv4Addr::from(0xa9fe_0000 | (n & 0x0000_ffff))),
            Just(Ipv4Addr::new(169, 254, 169, 254)),
            Just(Ipv4Addr::LOCALHOST),
        ]
    }

    /// The WHATWG URL host forms of an IPv4 address: each part decimal, octal (`0` prefix) or
    /// hex (`0x`), with 4, 3, 2 or 1 parts (the last part fills the remaining bytes), and an
    /// optional trailing dot.
    fn v4_host(ip: Ipv4Addr, parts: usize, radixes: [u8; 4], upper: bool, dot: bool) -> String {
        let n = u32::from(ip);
        let o = ip.octets();
        let values: Vec<u32> = match parts {
            1 => vec![n],
            2 => vec![o[0].into(), n & 0x00ff_ffff],
            3 => vec![o[0].into(), o[1].into(), n & 0xffff],
            _ => o.iter().map(|&b| b.into()).collect(),
        };
        let mut host = values
            .iter()
            .zip(radixes)
            .map(|(v, radix)| match radix % 3 {
                0 => v.to_string(),
                1 => format!("0{v:o}"),
                _ if upper => format!("0X{v:X}"),
                _ => format!("0x{v:x}"),
            })
            .collect::<Vec<_>>()
            .join(".");
        if dot {
            host.push('.');
        }
        host
    }

    /// The IPv6 forms that carry an IPv4 address, in URL host syntax.
    fn v6_hosts(ip: Ipv4Addr) -> Vec<String> {
        let [a, b, c, d] = ip.octets();
        let hi = u16::from_be_bytes([a, b]);
        let lo = u16::from_be_bytes([c, d]);
        vec![
            format!("[::ffff:{ip}]"),
            format!("[::ffff:{hi:x}:{lo:x}]"),
            format!("[0:0:0:0:0:FFFF:{ip}]"),
            format!("[::{ip}]"),
            format!("[::{hi:x}:{lo:x}]"),
            format!("[64:ff9b::{ip}]"),
            format!("[64:ff9b::{hi:x}:{lo:x}]"),
            format!("[64:ff9b:1::{ip}]"),
            format!("[::ffff:0:{ip}]"),
        ]
    }

    fn refused(policy: &EgressPolicy, url: &str) -> bool {
        matches!(
            policy.check_url(url),
            Err(EgressDenied::BlockedAddress { .. })
        )
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        #[test]
        fn every_ipv4_spelling_of_a_blocked_address_is_refused(
            ip in blocked_v4(),
            parts in 1usize..=4,
            radixes in any::<[u8; 4]>(),
            upper in any::<bool>(),
            dot in any::<bool>(),
            http in any::<bool>(),
            path in "(/[a-z0-9]{0,8}){0,2}",
        ) {
            let policy = EgressPolicy::new(true, vec![]);
            let host = v4_host(ip, parts, radixes, upper, dot);
            let scheme = if http { "http" } else { "https" };
            let url = format!("{scheme}://{host}:8443{path}");
            // The parser must read the same address the test meant, or the property is vacuous.
            let parsed = Url::parse(&url).unwrap();
            prop_assert_eq!(parsed.host(), Some(Host::Ipv4(ip)), "{}", url);
            prop_assert!(refused(&policy, &url), "{} ({}) was not refused", url, ip);
        }

        #[test]
        fn every_ipv6_form_carrying_a_blocked_ipv4_address_is_refused(ip in blocked_v4()) {
            let policy = EgressPolicy::new(false, vec![]);
            for host in v6_hosts(ip) {
                let url = format!("https://{host}/hook");
                prop_assert!(refused(&policy, &url), "{} was not refused", url);
            }
            // The same forms as resolved addresses, judged at connect time.
            let nat64 = {
                let [a, b, c, d] = ip.octets();
                Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
            };
            for v6 in [ip.to_ipv6_mapped(), ip.to_ipv6_compatible(), nat64] {
                prop_assert!(policy.check_ip(v6.into()).is_err(), "{} was not refused", v6);
            }
            prop_assert!(policy.check_ip(ip.into()).is_err());
        }

        #[test]
        fn blocked_ranges_are_refused_through_every_spelling_of_the_whole_table(
            n in any::<u32>(),
            parts in 1usize..=4,
            radixes in any::<[u8; 4]>(),
        ) {
            // Any IPv4 address at all: a spelling is refused exactly when the dotted form is.
            let ip = Ipv4Addr::from(n);
            let policy = EgressPolicy::new(false, vec![]);
            let dotted = policy.check_url(&format!("https://{ip}/")).is_err();
            prop_assert_eq!(dotted, special_range(ip.into()).is_some());
            let url = format!("https://{}/", v4_host(ip, parts, radixes, false, false));
            prop_assert_eq!(policy.check_url(&url).is_err(), dotted, "{}", url);
            // IPv4-mapped and NAT64 forms are judged as the address they carry.
            let mapped = format!("https://[::ffff:{ip}]/");
            prop_assert_eq!(policy.check_url(&mapped).is_err(), dotted, "{}", mapped);
            let nat64 = format!("https://[64:ff9b::{ip}]/");
            prop_assert_eq!(policy.check_url(&nat64).is_err(), dotted, "{}", nat64);
        }

        #[test]
        fn blocked_ipv6_ranges_are_refused_whatever_the_interface_bits(
            bits in any::<u128>(),
            range in prop::sample::select(vec![
                ("::1/128", "loopback"),
                ("fc00::/7", "unique local (private)"),
                ("fe80::/10", "link-local"),
                ("fec0::/10", "site-local (deprecated private)"),
            ]),
        ) {
            let net: Ipv6Net = range.0.parse().unwrap();
            let host_mask = !u128::from(net.netmask());
            let v6 = Ipv6Addr::from(u128::from(net.network()) | (bits & host_mask));
            let policy = EgressPolicy::new(false, vec![]);
            prop_assert_eq!(
                policy.check_ip(v6.into()),
                Err(EgressDenied::BlockedAddress { ip: v6.into(), range: range.1 })
            );
            let url = format!("https://[{v6}]/");
            prop_assert!(refused(&policy, &url), "{} was not refused", url);
        }
    }
}
