//! Longest-prefix match over IPv4 and IPv6 prefixes, and the anti-spoofing source check built on it.
//!
//! [`PrefixTable`] keeps one hash map per prefix length that is in use, and looks an address up by probing
//! the lengths in use from the longest down: at most 33 probes for IPv4 and 129 for IPv6, in practice as
//! many as there are distinct lengths (a handful). Insertion is strict: a prefix with host bits set is
//! refused ([`PrefixError::HostBitsSet`]) unless it goes through [`PrefixTable::insert_masked`], which
//! clears them. IPv4 and IPv6 are separate spaces: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is looked
//! up among the IPv6 prefixes.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use foldhash::fast::RandomState;

/// A prefix that cannot be inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    /// A prefix length above 32 (IPv4) or 128 (IPv6).
    LengthTooLong { len: u8, max: u8 },
    /// Bits set after the prefix length, as in `10.0.0.1/8`.
    HostBitsSet,
    /// Text that is not `address/length` or `address`.
    Syntax(String),
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefixError::LengthTooLong { len, max } => write!(f, "prefix length {len} is above {max}"),
            PrefixError::HostBitsSet => write!(f, "prefix has host bits set"),
            PrefixError::Syntax(text) => write!(f, "not an IP prefix: {text:?}"),
        }
    }
}

impl std::error::Error for PrefixError {}

/// Parses `"10.0.0.0/8"`, `"2001:db8::/32"` or a bare address (a /32 or /128).
pub fn parse_prefix(text: &str) -> Result<(IpAddr, u8), PrefixError> {
    let syntax = || PrefixError::Syntax(text.to_owned());
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => {
            let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
            if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            (addr, len.parse::<u8>().map_err(|_| syntax())?)
        }
        None => {
            let addr: IpAddr = text.parse().map_err(|_| syntax())?;
            (addr, max_len(addr))
        }
    };
    if len > max_len(addr) {
        return Err(PrefixError::LengthTooLong {
            len,
            max: max_len(addr),
        });
    }
    Ok((addr, len))
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

#[inline]
fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

#[inline]
fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// One address family: a map per prefix length, and the lengths in use, longest first.
#[derive(Debug, Clone)]
struct Family<K, V> {
    maps: Vec<HashMap<K, V, RandomState>>,
    lengths: Vec<u8>,
}

impl<K: std::hash::Hash + Eq + Copy, V: Copy> Family<K, V> {
    fn new(max: u8) -> Self {
        Family {
            maps: (0..=max).map(|_| HashMap::default()).collect(),
            lengths: Vec::new(),
        }
    }

    fn insert(&mut self, key: K, len: u8, value: V) -> Option<V> {
        let map = &mut self.maps[usize::from(len)];
        if map.is_empty() {
            self.lengths.push(len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        map.insert(key, value)
    }

    fn remove(&mut self, key: K, len: u8) -> Option<V> {
        let map = &mut self.maps[usize::from(len)];
        let old = map.remove(&key);
        if old.is_some() && map.is_empty() {
            self.lengths.retain(|&l| l != len);
        }
        old
    }

    #[inline]
    fn lookup(&self, mask: impl Fn(u8) -> K) -> Option<(u8, V)> {
        for &len in &self.lengths {
            if let Some(v) = self.maps[usize::from(len)].get(&mask(len)) {
                return Some((len, *v));
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.maps.iter().map(HashMap::len).sum()
    }
}

/// A longest-prefix-match table from IPv4/IPv6 prefixes to values.
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    v4: Family<u32, V>,
    v6: Family<u128, V>,
}

impl<V: Copy> Default for PrefixTable<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Copy> PrefixTable<V> {
    pub fn new() -> Self {
        PrefixTable {
            v4: Family::new(32),
            v6: Family::new(128),
        }
    }

    /// Inserts `network/len -> value`, returning the value it replaces. Strict: host bits must be clear.
    pub fn insert(&mut self, network: IpAddr, len: u8, value: V) -> Result<Option<V>, PrefixError> {
        self.insert_impl(network, len, value, true)
    }

    /// Like [`PrefixTable::insert`], clearing host bits instead of refusing them (`10.0.0.1/8` is `10.0.0.0/8`).
    pub fn insert_masked(&mut self, network: IpAddr, len: u8, value: V) -> Result<Option<V>, PrefixError> {
        self.insert_impl(network, len, value, false)
    }

    fn insert_impl(
        &mut self,
        network: IpAddr,
        len: u8,
        value: V,
        strict: bool,
    ) -> Result<Option<V>, PrefixError> {
        let max = max_len(network);
        if len > max {
            return Err(PrefixError::LengthTooLong { len, max });
        }
        match network {
            IpAddr::V4(addr) => {
                let bits = u32::from(addr);
                if strict && bits & !mask4(len) != 0 {
                    return Err(PrefixError::HostBitsSet);
                }
                Ok(self.v4.insert(bits & mask4(len), len, value))
            }
            IpAddr::V6(addr) => {
                let bits = u128::from(addr);
                if strict && bits & !mask6(len) != 0 {
                    return Err(PrefixError::HostBitsSet);
                }
                Ok(self.v6.insert(bits & mask6(len), len, value))
            }
        }
    }

    /// Removes exactly `network/len` (host bits ignored), returning its value.
    pub fn remove(&mut self, network: IpAddr, len: u8) -> Option<V> {
        if len > max_len(network) {
            return None;
        }
        match network {
            IpAddr::V4(addr) => self.v4.remove(u32::from(addr) & mask4(len), len),
            IpAddr::V6(addr) => self.v6.remove(u128::from(addr) & mask6(len), len),
        }
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        self.lookup_prefix(addr).map(|(_, v)| v)
    }

    /// The length and value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup_prefix(&self, addr: IpAddr) -> Option<(u8, V)> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    #[inline]
    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<(u8, V)> {
        let bits = u32::from(addr);
        self.v4.lookup(|len| bits & mask4(len))
    }

    #[inline]
    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<(u8, V)> {
        let bits = u128::from(addr);
        self.v6.lookup(|len| bits & mask6(len))
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.lengths.is_empty() && self.v6.lengths.is_empty()
    }
}

impl<V: Copy + PartialEq> PrefixTable<V> {
    /// Whether the longest prefix containing `addr` maps to `value` (the anti-spoofing question).
    #[inline]
    pub fn routes_to(&self, addr: IpAddr, value: V) -> bool {
        self.lookup(addr) == Some(value)
    }
}

/// The source address of an IP packet, from its fixed header only (the same validity rules as
/// [`crate::extract`]: IPv4 needs 20 bytes and IHL >= 5, IPv6 needs 40 bytes). `None` when unparsable.
#[inline]
pub fn source_address(packet: &[u8]) -> Option<IpAddr> {
    crate::parse::source(packet).ok()
}

/// The outcome of checking a received packet's source against its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCheck {
    /// The longest prefix containing the source belongs to the sender.
    Accepted,
    /// The source is outside the sender's prefixes (owned by another peer, or by none).
    Spoofed,
    /// No trustworthy source address.
    Unparsable,
}

/// Whether `packet` may come from the peer whose value in `table` is `peer`.
#[inline]
pub fn check_source<V: Copy + PartialEq>(table: &PrefixTable<V>, packet: &[u8], peer: V) -> SourceCheck {
    match source_address(packet) {
        None => SourceCheck::Unparsable,
        Some(src) if table.routes_to(src, peer) => SourceCheck::Accepted,
        Some(_) => SourceCheck::Spoofed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table(entries: &[(&str, u32)]) -> PrefixTable<u32> {
        let mut t = PrefixTable::new();
        for (text, v) in entries {
            let (a, l) = parse_prefix(text).unwrap();
            t.insert(a, l, *v).unwrap();
        }
        t
    }

    #[test]
    fn longest_match_wins() {
        let t = table(&[
            ("0.0.0.0/0", 0),
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 2),
            ("10.1.2.3/32", 3),
            ("::/0", 10),
            ("2001:db8::/32", 11),
            ("2001:db8::1/128", 12),
        ]);
        assert_eq!(t.len(), 7);
        assert_eq!(t.lookup(ip("192.168.1.1")), Some(0));
        assert_eq!(t.lookup(ip("10.200.0.1")), Some(1));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(2));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(3));
        assert_eq!(t.lookup_prefix(ip("10.1.2.4")), Some((16, 2)));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(12));
        assert_eq!(t.lookup(ip("2001:db8::2")), Some(11));
        assert_eq!(t.lookup(ip("::ffff:10.1.2.3")), Some(10));
        assert!(t.routes_to(ip("10.1.2.3"), 3));
        assert!(!t.routes_to(ip("10.1.2.3"), 2));
    }

    #[test]
    fn families_are_separate_and_empty_misses() {
        let t = table(&[("10.0.0.0/8", 1)]);
        assert_eq!(t.lookup(ip("::a00:1")), None);
        assert_eq!(PrefixTable::<u32>::new().lookup(ip("1.2.3.4")), None);
    }

    #[test]
    fn strict_and_masked_insert() {
        let mut t = PrefixTable::new();
        assert_eq!(t.insert(ip("10.0.0.1"), 8, 1u32), Err(PrefixError::HostBitsSet));
        assert_eq!(t.insert_masked(ip("10.0.0.1"), 8, 1u32), Ok(None));
        assert_eq!(t.insert(ip("10.0.0.0"), 8, 2), Ok(Some(1)));
        assert_eq!(
            t.insert(ip("10.0.0.0"), 33, 2),
            Err(PrefixError::LengthTooLong { len: 33, max: 32 })
        );
        assert_eq!(t.remove(ip("10.9.9.9"), 8), Some(2));
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
    }

    #[test]
    fn parse_prefix_forms() {
        assert_eq!(parse_prefix("10.0.0.0/8"), Ok((ip("10.0.0.0"), 8)));
        assert_eq!(parse_prefix("1.2.3.4"), Ok((ip("1.2.3.4"), 32)));
        assert_eq!(parse_prefix("2001:db8::/32"), Ok((ip("2001:db8::"), 32)));
        assert_eq!(parse_prefix("::1"), Ok((ip("::1"), 128)));
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "x/1",
            "10.0.0.0/1000",
            "::/ 1",
        ] {
            assert!(matches!(parse_prefix(bad), Err(PrefixError::Syntax(_))), "{bad}");
        }
        assert!(matches!(
            parse_prefix("::/129"),
            Err(PrefixError::LengthTooLong { .. })
        ));
    }

    #[test]
    fn source_checks() {
        let t = table(&[("10.8.0.2/32", 7), ("10.8.0.0/24", 1)]);
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 8, 0, 2]);
        assert_eq!(source_address(&v4), Some(ip("10.8.0.2")));
        assert_eq!(check_source(&t, &v4, 7), SourceCheck::Accepted);
        assert_eq!(check_source(&t, &v4, 1), SourceCheck::Spoofed);
        v4[15] = 3;
        assert_eq!(check_source(&t, &v4, 1), SourceCheck::Accepted);
        assert_eq!(check_source(&t, &v4[..19], 1), SourceCheck::Unparsable);
        v4[0] = 0x44;
        assert_eq!(check_source(&t, &v4, 1), SourceCheck::Unparsable);
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&ip6_octets("2001:db8::5"));
        assert_eq!(source_address(&v6), Some(ip("2001:db8::5")));
        assert_eq!(check_source(&t, &v6, 1), SourceCheck::Spoofed);
        assert_eq!(check_source(&t, &[], 1), SourceCheck::Unparsable);
        assert_eq!(check_source(&t, &v6[..39], 1), SourceCheck::Unparsable);
    }

    fn ip6_octets(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    fn naive(entries: &[(IpAddr, u8, u32)], addr: IpAddr) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for &(net, len, v) in entries {
            let hit = match (net, addr) {
                (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(n) == u32::from(a) & mask4(len),
                (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(n) == u128::from(a) & mask6(len),
                _ => false,
            };
            // Later inserts of the same prefix replace earlier ones, hence >=.
            if hit && !matches!(best, Some((l, _)) if len < l) {
                best = Some((len, v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn arb_prefix() -> impl Strategy<Value = (IpAddr, u8)> {
        // Few distinct high bits, so that prefixes overlap and lookups hit.
        prop_oneof![
            (0u32..16, 0u8..=32).prop_map(|(hi, len)| {
                let bits = (hi << 28 | hi << 4) & mask4(len);
                (IpAddr::V4(Ipv4Addr::from(bits)), len)
            }),
            (0u128..16, 0u8..=128).prop_map(|(hi, len)| {
                let bits = (hi << 124 | hi << 4) & mask6(len);
                (IpAddr::V6(Ipv6Addr::from(bits)), len)
            }),
        ]
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..16, any::<u32>()).prop_map(|(hi, lo)| IpAddr::V4(Ipv4Addr::from(hi << 28 | (lo & 0xFF)))),
            (0u128..16, any::<u8>())
                .prop_map(|(hi, lo)| IpAddr::V6(Ipv6Addr::from(hi << 124 | u128::from(lo)))),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_linear_scan(
            prefixes in prop::collection::vec((arb_prefix(), 0u32..8), 0..60),
            addrs in prop::collection::vec(arb_addr(), 1..60),
        ) {
            let mut t = PrefixTable::new();
            let mut entries = Vec::new();
            for ((net, len), v) in prefixes {
                t.insert(net, len, v).unwrap();
                entries.push((net, len, v));
            }
            for addr in addrs {
                prop_assert_eq!(t.lookup(addr), naive(&entries, addr), "{}", addr);
            }
        }

        #[test]
        fn source_address_never_panics(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let t = table(&[("0.0.0.0/0", 1), ("::/0", 1)]);
            let _ = check_source(&t, &data, 1);
        }
    }
}
