//! Whose word the app takes for the client's address.
//!
//! A request's `X-Forwarded-For` says which address a proxy received it
//! from, but any client can send the header itself. It is believed only when
//! the TCP peer is one of `limits.trusted_proxies` (addresses or CIDR blocks),
//! and only on the public listener (the admin listener is not behind the
//! proxy). The entries are read from the right, the proxies' end: each entry
//! that is itself a trusted proxy is skipped, and the first other address is
//! the client. An entry that is not an IP address ends the walk and the hop
//! that forwarded it (the peer, for the last entry) is taken instead, so a
//! made-up value never becomes a rate-limit key.

use axum::http::HeaderMap;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// An address block, `10.0.0.0/8`, `2001:db8::/32`, or one address
/// (`127.0.0.1`, a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// True when `address` lies in this block (IPv4-mapped IPv6 addresses
    /// count as their IPv4 address).
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        address.is_ipv4() == self.network.is_ipv4() && mask(address, self.prefix) == self.network
    }
}

/// `address` with all but its first `prefix` bits cleared.
fn mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(address) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(address) & mask).into())
        }
        IpAddr::V6(address) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(address) & mask).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{text}` is not an IP address or CIDR block: {why}");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| bad("expected e.g. 10.0.0.5, 10.0.0.0/24 or 2001:db8::/32"))?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= bits)
                .ok_or_else(|| bad(&format!("the prefix length must be 0-{bits}")))?,
        };
        // Host bits set (10.0.0.5/8) are a typo more often than not.
        if mask(network, prefix) != network {
            return Err(bad(&format!(
                "host bits are set; the block is {}/{prefix}",
                mask(network, prefix)
            )));
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.trim().parse().map_err(serde::de::Error::custom)
    }
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    /// True when `address` is one of the proxies.
    pub fn contains(&self, address: IpAddr) -> bool {
        self.0.iter().any(|cidr| cidr.contains(address))
    }

    /// The client's address: the TCP peer's, or, when the peer is a trusted
    /// proxy, the right-most `X-Forwarded-For` entry that is not one (see
    /// the module's documentation).
    pub fn client_address(&self, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
        let mut client = peer.ip().to_canonical();
        if !self.contains(client) {
            return client;
        }
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|value| value.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .collect();
        for entry in entries.iter().rev() {
            let Ok(address) = entry.parse::<IpAddr>() else {
                break;
            };
            client = address.to_canonical();
            if !self.contains(client) {
                break;
            }
        }
        client
    }
}

/// The key of an address's rate-limit bucket: the address itself for IPv4,
/// its /64 for IPv6 (one subscriber usually holds a whole /64, so counting
/// single IPv6 addresses would let one client pick from 2^64 buckets).
pub fn limit_key(address: IpAddr) -> String {
    match address.to_canonical() {
        IpAddr::V4(address) => address.to_string(),
        IpAddr::V6(address) => {
            format!("{}/64", mask(IpAddr::V6(address), 64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|cidr| cidr.parse().unwrap()).collect())
    }

    fn forwarded(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_static(value));
        }
        headers
    }

    fn peer(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), 40000)
    }

    fn ip(address: &str) -> IpAddr {
        address.parse().unwrap()
    }

    #[test]
    fn cidr_blocks_parse_and_match() {
        let block: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(block.contains(ip("10.1.200.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(block.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        let single: Cidr = "127.0.0.1".parse().unwrap();
        assert!(single.contains(ip("127.0.0.1")) && !single.contains(ip("127.0.0.2")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for (bad, why) in [
            ("10.0.0.0/33", "prefix length must be 0-32"),
            ("proxy.example", "not an IP address"),
            ("10.0.0.5/8", "host bits are set; the block is 10.0.0.0/8"),
            ("::1/129", "prefix length must be 0-128"),
        ] {
            let error = bad.parse::<Cidr>().unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        // The finding of issue #18: a client talking to the app directly
        // picked its own address with the header.
        let headers = forwarded(&["6.6.6.6"]);
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_address(&headers, peer("203.0.113.9")),
            ip("203.0.113.9")
        );
        let haproxy = proxies(&["10.0.0.2"]);
        assert_eq!(
            haproxy.client_address(&headers, peer("203.0.113.9")),
            ip("203.0.113.9"),
            "a peer that is not a listed proxy"
        );
        assert_eq!(
            haproxy.client_address(&headers, peer("10.0.0.2")),
            ip("6.6.6.6")
        );
    }

    #[test]
    fn the_right_most_untrusted_entry_is_the_client() {
        // Client → Cloudflare → HAProxy → app: the client may have sent its
        // own header (1.1.1.1); Cloudflare appended the client (5.5.5.5),
        // HAProxy appended Cloudflare (173.245.48.7).
        let chain = proxies(&["10.0.0.2", "173.245.48.0/20"]);
        let headers = forwarded(&["1.1.1.1, 5.5.5.5", "173.245.48.7"]);
        assert_eq!(
            chain.client_address(&headers, peer("10.0.0.2")),
            ip("5.5.5.5")
        );
        // Every entry a proxy: the left-most one is the best known.
        let headers = forwarded(&["173.245.48.9"]);
        assert_eq!(
            chain.client_address(&headers, peer("10.0.0.2")),
            ip("173.245.48.9")
        );
        // No header from a proxy: the proxy itself.
        assert_eq!(
            chain.client_address(&HeaderMap::new(), peer("10.0.0.2")),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn non_addresses_fall_back_to_the_hop_that_forwarded_them() {
        let haproxy = proxies(&["10.0.0.2", "10.0.0.3"]);
        for garbage in ["not-an-address", "unknown", "1.2.3.4:80", "", "1.2.3"] {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", HeaderValue::from_str(garbage).unwrap());
            assert_eq!(
                haproxy.client_address(&headers, peer("10.0.0.2")),
                ip("10.0.0.2"),
                "{garbage:?}"
            );
        }
        let headers = forwarded(&["6.6.6.6, garbage, 10.0.0.3"]);
        assert_eq!(
            haproxy.client_address(&headers, peer("10.0.0.2")),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        assert_eq!(limit_key(ip("192.0.2.7")), "192.0.2.7");
        assert_eq!(limit_key(ip("::ffff:192.0.2.7")), "192.0.2.7");
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1")),
            limit_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
    }
}
