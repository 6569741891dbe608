//! Extraction of addresses, ports and protocol from a raw IP packet (DESIGN.md section 3).
//!
//! Principle: fail only when no trustworthy addresses can be read. Past the fixed header everything is
//! best effort and a port is `None` wherever it cannot be read reliably. Header structures are read with
//! `etherparse` slices; the only bytes read by hand are the fixed IPv4 fields of a header whose options run
//! past the buffer (etherparse rejects such a header as a whole, but its addresses are intact).

use core::fmt;
use core::net::{IpAddr, Ipv4Addr};

use etherparse::{
    IpAuthHeaderSlice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice,
};

/// Length of the fixed IPv4 header (IHL 5).
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

/// IP protocol numbers this module cares about.
pub mod proto {
    pub const HOP_BY_HOP: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const DCCP: u8 = 33;
    pub const IPV6_ROUTING: u8 = 43;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AUTH: u8 = 51;
    pub const IPV6_NO_NEXT_HEADER: u8 = 59;
    pub const IPV6_DEST_OPTIONS: u8 = 60;
    pub const SCTP: u8 = 132;
    pub const UDP_LITE: u8 = 136;
}

/// True for transport protocols whose header starts with a 16-bit source and destination port.
#[inline]
pub fn protocol_has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        proto::TCP | proto::UDP | proto::DCCP | proto::SCTP | proto::UDP_LITE
    )
}

/// What `extract` reads from a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PacketSummary {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// Upper-layer protocol (for IPv6, after the extension-header walk).
    pub protocol: u8,
}

impl PacketSummary {
    /// 4 or 6.
    #[inline]
    pub fn version(&self) -> u8 {
        match self.src {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 6,
        }
    }

    /// The destination key: address and destination port, as the dispatcher routes by.
    #[inline]
    pub fn destination(&self) -> Destination {
        Destination {
            addr: self.dst,
            port: self.dst_port,
        }
    }
}

/// A destination address and optional port; `Display` gives the destination key
/// (`10.0.0.1:80`, `[2001:db8::1]:443`, or the bare address when there is no port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: Option<u16>,
}

/// Why a packet has no trustworthy addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// Zero bytes.
    Empty,
    /// The version nibble is neither 4 nor 6.
    UnsupportedVersion { version: u8, len: usize },
    /// Shorter than the fixed header of its version.
    Truncated {
        version: u8,
        len: usize,
        required: usize,
    },
    /// IPv4 IHL below 5.
    InvalidIhl { ihl: u8, len: usize },
}

impl ParseError {
    /// A short stable name, used to count drops by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Empty => "empty",
            ParseError::UnsupportedVersion { .. } => "unsupported_version",
            ParseError::Truncated { .. } => "truncated",
            ParseError::InvalidIhl { .. } => "invalid_ihl",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParseError::Empty => f.write_str("empty packet: 0 bytes (an IP packet needs at least 20)"),
            ParseError::UnsupportedVersion { version, len } => write!(
                f,
                "unsupported IP version {version} in a {len}-byte packet (expected 4 or 6)"
            ),
            ParseError::Truncated { version, len, required } => write!(
                f,
                "truncated IPv{version} packet: {len} bytes, the fixed header needs {required}"
            ),
            ParseError::InvalidIhl { ihl, len } => write!(
                f,
                "invalid IPv4 header length: IHL {ihl} ({} bytes) is below the minimum 5 (20 bytes) in a {len}-byte packet",
                usize::from(ihl) * 4
            ),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses a raw IPv4 or IPv6 packet (no link-layer header).
#[inline]
pub fn extract(packet: &[u8]) -> Result<PacketSummary, ParseError> {
    match check_fixed_header(packet)? {
        4 => extract_v4(packet),
        _ => extract_v6(packet),
    }
}

/// The source address alone, under the same rules as `extract` (for anti-spoofing checks, which need no
/// more than the fixed header).
#[inline]
pub fn source(packet: &[u8]) -> Result<IpAddr, ParseError> {
    Ok(match check_fixed_header(packet)? {
        4 => IpAddr::V4(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15])),
        _ => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&packet[8..24]);
            IpAddr::V6(octets.into())
        }
    })
}

/// What makes a packet's addresses trustworthy: version 4 or 6, the whole fixed header, and (IPv4) an IHL
/// of at least 5. Returns the version; the one place these rules live.
#[inline]
fn check_fixed_header(packet: &[u8]) -> Result<u8, ParseError> {
    let Some(&first) = packet.first() else {
        return Err(ParseError::Empty);
    };
    let len = packet.len();
    match first >> 4 {
        4 if len < IPV4_MIN_HEADER_LEN => Err(ParseError::Truncated {
            version: 4,
            len,
            required: IPV4_MIN_HEADER_LEN,
        }),
        4 if first & 0x0f < 5 => Err(ParseError::InvalidIhl {
            ihl: first & 0x0f,
            len,
        }),
        6 if len < IPV6_HEADER_LEN => Err(ParseError::Truncated {
            version: 6,
            len,
            required: IPV6_HEADER_LEN,
        }),
        version @ (4 | 6) => Ok(version),
        version => Err(ParseError::UnsupportedVersion { version, len }),
    }
}

/// Computes only the destination of a packet.
#[inline]
pub fn destination(packet: &[u8]) -> Result<Destination, ParseError> {
    extract(packet).map(|s| s.destination())
}

/// Reads the two ports at `offset` when all four bytes lie before `end`.
#[inline]
fn read_ports(packet: &[u8], offset: usize, end: usize, protocol: u8) -> (Option<u16>, Option<u16>) {
    if protocol_has_ports(protocol) && offset.checked_add(4).is_some_and(|e| e <= end) {
        let p = &packet[offset..offset + 4];
        (
            Some(u16::from_be_bytes([p[0], p[1]])),
            Some(u16::from_be_bytes([p[2], p[3]])),
        )
    } else {
        (None, None)
    }
}

/// IPv4 past `check_fixed_header`: 20 bytes present, IHL at least 5.
fn extract_v4(packet: &[u8]) -> Result<PacketSummary, ParseError> {
    let len = packet.len();
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    match Ipv4HeaderSlice::from_slice(packet) {
        Ok(header) => {
            let total_len = usize::from(header.total_len());
            let end = if total_len == 0 { len } else { total_len.min(len) };
            let protocol = header.protocol().0;
            let (src_port, dst_port) = if header.fragments_offset().value() == 0 {
                read_ports(packet, header_len, end, protocol)
            } else {
                (None, None)
            };
            Ok(PacketSummary {
                src: IpAddr::V4(header.source_addr()),
                dst: IpAddr::V4(header.destination_addr()),
                src_port,
                dst_port,
                protocol,
            })
        }
        // Version, IHL and the 20 fixed bytes were checked by `check_fixed_header`, so the only failure left is options
        // running past the buffer: the fixed fields stand, and there is no transport header to read.
        Err(_) => Ok(PacketSummary {
            src: IpAddr::V4(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15])),
            dst: IpAddr::V4(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19])),
            src_port: None,
            dst_port: None,
            protocol: packet[9],
        }),
    }
}

/// Where an IPv6 extension-header walk stopped.
struct WalkEnd {
    protocol: u8,
    /// Offset of the upper-layer header, when ports may be read there.
    transport_offset: Option<usize>,
}

/// IPv6 past `check_fixed_header`: 40 bytes present.
fn extract_v6(packet: &[u8]) -> Result<PacketSummary, ParseError> {
    let len = packet.len();
    let header = Ipv6HeaderSlice::from_slice(packet).map_err(|_| ParseError::Truncated {
        version: 6,
        len,
        required: IPV6_HEADER_LEN,
    })?;
    let payload_len = usize::from(header.payload_length());
    let end = if payload_len == 0 {
        len
    } else {
        (IPV6_HEADER_LEN + payload_len).min(len)
    };
    let walk = walk_extension_headers(&packet[..end], header.next_header().0);
    let (src_port, dst_port) = match walk.transport_offset {
        Some(offset) => read_ports(packet, offset, end, walk.protocol),
        None => (None, None),
    };
    Ok(PacketSummary {
        src: IpAddr::V6(header.source_addr()),
        dst: IpAddr::V6(header.destination_addr()),
        src_port,
        dst_port,
        protocol: walk.protocol,
    })
}

/// Walks hop-by-hop, routing, fragment, destination-options and AH headers in any order.
///
/// Every step advances by at least 8 bytes, so the walk ends within `packet.len() / 8` steps.
fn walk_extension_headers(packet: &[u8], first: u8) -> WalkEnd {
    let mut next = first;
    let mut offset = IPV6_HEADER_LEN;
    loop {
        let rest = &packet[offset.min(packet.len())..];
        let step = match next {
            proto::HOP_BY_HOP | proto::IPV6_ROUTING | proto::IPV6_DEST_OPTIONS => {
                Ipv6RawExtHeaderSlice::from_slice(rest)
                    .ok()
                    .map(|h| (h.next_header().0, h.slice().len()))
            }
            proto::AUTH => IpAuthHeaderSlice::from_slice(rest)
                .ok()
                .map(|h| (h.next_header().0, h.slice().len())),
            proto::IPV6_FRAGMENT => match Ipv6FragmentHeaderSlice::from_slice(rest) {
                Ok(fragment) if fragment.fragment_offset().value() != 0 => {
                    // A non-first fragment: what follows is the middle of the payload, not a header.
                    return WalkEnd {
                        protocol: fragment.next_header().0,
                        transport_offset: None,
                    };
                }
                Ok(fragment) => Some((fragment.next_header().0, fragment.slice().len())),
                Err(_) => None,
            },
            protocol => {
                return WalkEnd {
                    protocol,
                    transport_offset: Some(offset),
                }
            }
        };
        match step {
            Some((following, header_len)) => {
                next = following;
                offset += header_len;
            }
            None => {
                // Cut short (or malformed): report the next header it names when that byte is readable.
                let protocol = rest.first().copied().unwrap_or(next);
                return WalkEnd {
                    protocol,
                    transport_offset: None,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv6Addr;

    fn v4(
        protocol: u8,
        options: &[u8],
        payload: &[u8],
        frag_offset_units: u16,
        more_fragments: bool,
    ) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let header_len = 20 + options.len();
        let total = header_len + payload.len();
        let flags_frag = (u16::from(more_fragments) << 13) | frag_offset_units;
        let mut p = vec![0x40 | (header_len / 4) as u8, 0];
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&flags_frag.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        p
    }

    fn v6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(payload);
        p
    }

    const PORTS: [u8; 8] = [0x30, 0x39, 0x00, 0x50, 0, 0, 0, 0];

    #[test]
    fn ipv4_udp_ports() {
        let s = extract(&v4(17, &[], &PORTS, 0, false)).unwrap();
        assert_eq!(
            (s.src_port, s.dst_port, s.protocol, s.version()),
            (Some(12345), Some(80), 17, 4)
        );
        assert_eq!(s.dst, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let s = extract(&v4(6, &[1, 1, 1, 0, 7, 7, 7, 7], &PORTS, 0, false)).unwrap();
        assert_eq!((s.src_port, s.dst_port), (Some(12345), Some(80)));
    }

    #[test]
    fn ipv4_first_fragment_has_ports_later_fragments_do_not() {
        let first = extract(&v4(6, &[], &PORTS, 0, true)).unwrap();
        assert_eq!(first.dst_port, Some(80));
        let later = extract(&v4(6, &[], &PORTS, 185, false)).unwrap();
        assert_eq!((later.src_port, later.dst_port, later.protocol), (None, None, 6));
    }

    #[test]
    fn ipv4_total_length_zero_uses_buffer_and_short_total_length_hides_ports() {
        let mut p = v4(17, &[], &PORTS, 0, false);
        p[2] = 0;
        p[3] = 0;
        assert_eq!(extract(&p).unwrap().dst_port, Some(80));
        p[3] = 22;
        assert_eq!(extract(&p).unwrap().dst_port, None);
    }

    #[test]
    fn ipv4_options_past_buffer_keep_addresses() {
        let mut p = v4(6, &[], &[], 0, false);
        p[0] = 0x4f; // IHL 15 = 60 bytes, buffer is 20
        let s = extract(&p).unwrap();
        assert_eq!((s.protocol, s.dst_port), (6, None));
        assert_eq!(s.src, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn errors() {
        assert_eq!(extract(&[]), Err(ParseError::Empty));
        assert_eq!(
            extract(&[0x45; 19]),
            Err(ParseError::Truncated {
                version: 4,
                len: 19,
                required: 20
            })
        );
        assert_eq!(
            extract(&[0x60; 39]),
            Err(ParseError::Truncated {
                version: 6,
                len: 39,
                required: 40
            })
        );
        assert_eq!(
            extract(&[0x70; 60]),
            Err(ParseError::UnsupportedVersion { version: 7, len: 60 })
        );
        assert_eq!(
            extract(&[0x44; 60]),
            Err(ParseError::InvalidIhl { ihl: 4, len: 60 })
        );
        assert!(ParseError::InvalidIhl { ihl: 4, len: 60 }
            .to_string()
            .contains("16 bytes"));
    }

    #[test]
    fn ipv6_extension_chain_in_any_order() {
        // destination options -> hop-by-hop (out of the usual order) -> AH -> TCP
        let mut payload = vec![0, 0, 1, 4, 0, 0, 0, 0]; // dest opts: next HBH, len 0
        payload.extend_from_slice(&[51, 0, 1, 4, 0, 0, 0, 0]); // HBH: next AH
        payload.extend_from_slice(&[6, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]); // AH: next TCP, 12 bytes
        payload.extend_from_slice(&PORTS);
        let s = extract(&v6(60, &payload)).unwrap();
        assert_eq!((s.protocol, s.src_port, s.dst_port), (6, Some(12345), Some(80)));
    }

    #[test]
    fn ipv6_fragments() {
        let mut first = vec![17, 0, 0, 1, 0, 0, 0, 7]; // offset 0, M=1
        first.extend_from_slice(&PORTS);
        assert_eq!(extract(&v6(44, &first)).unwrap().dst_port, Some(80));
        let mut later = vec![0, 0, 0, 1, 0, 0, 0, 7, 17, 0, 0x05, 0x68, 0, 0, 0, 7]; // HBH, then offset 173
        later.extend_from_slice(&PORTS);
        let s = extract(&v6(0, &[&[44u8, 0, 1, 4, 0, 0, 0, 0][..], &later[8..]].concat())).unwrap();
        assert_eq!((s.protocol, s.src_port, s.dst_port), (17, None, None));
    }

    #[test]
    fn ipv6_cut_short_extension_reports_named_protocol() {
        let s = extract(&v6(0, &[17, 3])).unwrap(); // HBH claims 32 bytes, 2 present
        assert_eq!((s.protocol, s.dst_port), (17, None));
        let s = extract(&v6(60, &[])).unwrap(); // nothing after the fixed header
        assert_eq!((s.protocol, s.dst_port), (60, None));
    }

    #[test]
    fn ipv6_payload_length_bounds_ports() {
        let mut p = v6(17, &PORTS);
        p[5] = 3; // payload length 3 < 4 port bytes
        assert_eq!(extract(&p).unwrap().dst_port, None);
        p[5] = 0; // 0: use the buffer (jumbogram)
        assert_eq!(extract(&p).unwrap().dst_port, Some(80));
    }

    #[test]
    fn ports_only_for_port_protocols() {
        for protocol in [6u8, 17, 33, 132, 136] {
            assert_eq!(
                extract(&v4(protocol, &[], &PORTS, 0, false)).unwrap().dst_port,
                Some(80)
            );
        }
        for protocol in [1u8, 47, 50, 58, 89] {
            assert_eq!(
                extract(&v4(protocol, &[], &PORTS, 0, false)).unwrap().dst_port,
                None
            );
        }
    }
}
