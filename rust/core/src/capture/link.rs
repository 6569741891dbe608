//! Link layers and encapsulations: from a captured frame to the IP packet it carries.
//!
//! [`strip_link`] removes the link-layer header of a frame of a given `LINKTYPE_*` and walks the
//! encapsulations real networks put between it and IP: stacked 802.1Q/802.1ad VLAN tags, MPLS label stacks
//! (including an Ethernet pseudowire with a control word), PPPoE sessions, 802.2 LLC/SNAP and 802.1ah
//! provider backbone bridging; on PPP links, MPLS inside PPP and Cisco HDLC framing (some captures of
//! serial links record Cisco HDLC frames under a PPP link type). It says which encapsulations it crossed ([`Encapsulations`]), so that a
//! summary can count them. The walk is a loop over a small state machine, never recursion: every step
//! consumes bytes of the frame, so it ends for any input, in time linear in the frame's length.

/// Link-layer header types (the `LINKTYPE_*` values of <https://www.tcpdump.org/linktypes.html>).
pub mod linktype {
    /// BSD loopback: a 4-byte address family in the capturing host's byte order.
    pub const NULL: u16 = 0;
    /// Ethernet II or 802.3 (possibly with 802.1Q / 802.1ad VLAN tags).
    pub const ETHERNET: u16 = 1;
    /// PPP, with or without the HDLC-like address and control bytes.
    pub const PPP: u16 = 9;
    /// Raw IP, as `DLT_RAW` is numbered on some BSDs.
    pub const DLT_RAW_12: u16 = 12;
    /// Raw IP, as `DLT_RAW` is numbered on some other BSDs.
    pub const DLT_RAW_14: u16 = 14;
    /// PPP in HDLC-like framing (RFC 1662).
    pub const PPP_HDLC: u16 = 50;
    /// PPPoE session frames without their Ethernet header (the PPPoE header first).
    pub const PPP_ETHER: u16 = 51;
    /// Raw IP (IPv4 or IPv6, from the version nibble).
    pub const RAW: u16 = 101;
    /// Cisco HDLC: address, control, then an EtherType.
    pub const C_HDLC: u16 = 104;
    /// OpenBSD loopback: a 4-byte address family in network byte order.
    pub const LOOP: u16 = 108;
    /// Linux cooked capture v1 (16-byte header).
    pub const LINUX_SLL: u16 = 113;
    /// Raw IPv4.
    pub const IPV4: u16 = 228;
    /// Raw IPv6.
    pub const IPV6: u16 = 229;
    /// Linux cooked capture v2 (20-byte header).
    pub const LINUX_SLL2: u16 = 276;

    /// The conventional name of a link type, for messages and reports.
    pub fn name(link: u16) -> Option<&'static str> {
        Some(match link {
            NULL => "NULL",
            ETHERNET => "ETHERNET",
            PPP => "PPP",
            DLT_RAW_12 | DLT_RAW_14 | RAW => "RAW",
            PPP_HDLC => "PPP_HDLC",
            PPP_ETHER => "PPP_ETHER",
            C_HDLC => "C_HDLC",
            LOOP => "LOOP",
            LINUX_SLL => "LINUX_SLL",
            IPV4 => "IPV4",
            IPV6 => "IPV6",
            LINUX_SLL2 => "LINUX_SLL2",
            _ => return None,
        })
    }

    /// True for the link types [`super::strip_link`] can strip.
    pub fn is_supported(link: u16) -> bool {
        name(link).is_some()
    }
}

/// EtherType values the walk understands.
mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q customer VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service VLAN tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88a8;
    /// Pre-standard QinQ outer tag.
    pub const QINQ_OLD: u16 = 0x9100;
    /// MPLS unicast and multicast label stacks.
    pub const MPLS: u16 = 0x8847;
    pub const MPLS_MULTICAST: u16 = 0x8848;
    /// PPPoE session stage (the discovery stage, 0x8863, carries no IP).
    pub const PPPOE_SESSION: u16 = 0x8864;
    /// 802.1ah provider backbone bridging: an I-TAG, then the customer's Ethernet header.
    pub const PBB_ITAG: u16 = 0x88e7;
    /// Type/length values up to this are an 802.3 length: an 802.2 LLC header follows.
    pub const MAX_8023_LENGTH: u16 = 1500;
}

/// PPP protocol numbers that carry IP, or an MPLS label stack (RFC 3032) with IP at its bottom.
mod ppp {
    pub const IPV4: u16 = 0x0021;
    pub const IPV6: u16 = 0x0057;
    pub const MPLS: u16 = 0x0281;
    pub const MPLS_MULTICAST: u16 = 0x0283;
}

/// Cisco HDLC's address bytes (unicast, broadcast); the control byte after them is 0.
mod cisco_hdlc {
    pub const UNICAST: u8 = 0x0f;
    pub const BROADCAST: u8 = 0x8f;
}

/// Address-family values of the NULL and LOOP link types (they differ between operating systems).
mod family {
    pub const INET: u32 = 2;
    /// AF_INET6 on Linux, NetBSD/OpenBSD, FreeBSD and Darwin.
    pub const INET6: [u32; 4] = [10, 24, 28, 30];
}

/// What a link-layer frame carries, as far as IP is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPayload<'a> {
    /// An IP packet (not yet validated: the IP parser decides whether it is well formed).
    Ip(&'a [u8]),
    /// A well-formed frame of something else (ARP, LLDP, IPX, an unknown address family, ...).
    NotIp,
    /// A frame too short for its own link-layer header (or for an encapsulation header inside it).
    Short,
    /// A link type this module does not strip.
    Unsupported,
}

/// An encapsulation between the link layer and IP that [`strip_link`] crosses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Encapsulation {
    /// An 802.1Q VLAN tag (0x8100).
    Vlan,
    /// An 802.1ad service tag (0x88a8, or the older 0x9100): QinQ.
    Qinq,
    /// An MPLS label stack (0x8847, 0x8848).
    Mpls,
    /// An Ethernet pseudowire inside MPLS (a control word, then an Ethernet frame).
    MplsPwEthernet,
    /// A PPPoE session header and PPP.
    Pppoe,
    /// An 802.2 LLC/SNAP header after an 802.3 length field.
    LlcSnap,
    /// An 802.1ah I-TAG and the customer's Ethernet header.
    Pbb,
    /// Cisco HDLC framing (address, control, EtherType) on a link type that says PPP.
    CiscoHdlc,
}

impl Encapsulation {
    /// Every encapsulation, in report order.
    pub const ALL: [Encapsulation; 8] = [
        Encapsulation::Vlan,
        Encapsulation::Qinq,
        Encapsulation::Mpls,
        Encapsulation::MplsPwEthernet,
        Encapsulation::Pppoe,
        Encapsulation::LlcSnap,
        Encapsulation::Pbb,
        Encapsulation::CiscoHdlc,
    ];

    /// A short stable name: `vlan`, `qinq`, `mpls`, `mpls_pw_ethernet`, `pppoe`, `llc_snap`, `pbb`,
    /// `cisco_hdlc`.
    pub fn name(self) -> &'static str {
        match self {
            Encapsulation::Vlan => "vlan",
            Encapsulation::Qinq => "qinq",
            Encapsulation::Mpls => "mpls",
            Encapsulation::MplsPwEthernet => "mpls_pw_ethernet",
            Encapsulation::Pppoe => "pppoe",
            Encapsulation::LlcSnap => "llc_snap",
            Encapsulation::Pbb => "pbb",
            Encapsulation::CiscoHdlc => "cisco_hdlc",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The set of encapsulations one frame crossed (each at most once, however deep it was stacked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encapsulations(u8);

impl Encapsulations {
    pub fn contains(self, encapsulation: Encapsulation) -> bool {
        self.0 & encapsulation.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn insert(&mut self, encapsulation: Encapsulation) {
        self.0 |= encapsulation.bit();
    }

    /// The encapsulations in the set, in [`Encapsulation::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Encapsulation> {
        Encapsulation::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

#[inline]
pub(crate) fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    bytes
        .get(at..at.checked_add(2)?)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

#[inline]
pub(crate) fn u32_at(bytes: &[u8], at: usize, big_endian: bool) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    })
}

/// Where the walk is: what header starts at the current offset.
#[derive(Clone, Copy)]
enum Next {
    /// An Ethernet header (destination, source, type/length).
    Ethernet,
    /// The payload of a header whose type field said this (an EtherType, or an 802.3 length).
    Type(u16),
    /// An 802.2 LLC header (after an 802.3 length).
    Llc,
    /// An MPLS label stack entry.
    Mpls,
    /// A PPPoE session header.
    Pppoe,
    /// A PPP protocol field (1 or 2 bytes).
    Ppp,
}

/// Walks the headers from `next` at byte `at` of `frame` down to IP (or to something that is not IP).
fn walk<'a>(frame: &'a [u8], mut next: Next, mut at: usize, layers: &mut Encapsulations) -> LinkPayload<'a> {
    use Encapsulation as E;
    loop {
        next = match next {
            Next::Ethernet => match be16(frame, at + 12) {
                Some(kind) => {
                    at += 14;
                    Next::Type(kind)
                }
                None => return LinkPayload::Short,
            },
            Next::Type(ethertype::IPV4 | ethertype::IPV6) => {
                return frame.get(at..).map_or(LinkPayload::Short, LinkPayload::Ip)
            }
            Next::Type(kind @ (ethertype::VLAN | ethertype::QINQ | ethertype::QINQ_OLD)) => {
                // A 4-byte tag: the TCI, then the next type.
                let Some(inner) = be16(frame, at + 2) else {
                    return LinkPayload::Short;
                };
                layers.insert(if kind == ethertype::VLAN { E::Vlan } else { E::Qinq });
                at += 4;
                Next::Type(inner)
            }
            Next::Type(ethertype::MPLS | ethertype::MPLS_MULTICAST) => {
                layers.insert(E::Mpls);
                Next::Mpls
            }
            Next::Type(ethertype::PPPOE_SESSION) => Next::Pppoe,
            Next::Type(ethertype::PBB_ITAG) => {
                // The I-TAG's 4 bytes (priority, flags, the 24-bit service id), then the customer frame.
                if frame.len() < at + 4 {
                    return LinkPayload::Short;
                }
                layers.insert(E::Pbb);
                at += 4;
                Next::Ethernet
            }
            Next::Type(0..=ethertype::MAX_8023_LENGTH) => Next::Llc,
            Next::Type(_) if at <= frame.len() => return LinkPayload::NotIp,
            Next::Type(_) => return LinkPayload::Short,
            Next::Llc => {
                // DSAP 0xaa, SSAP 0xaa, control 0x03 (UI): SNAP, whose OUI 00-00-00 (RFC 1042) or 00-00-f8
                // (802.1H) says the protocol id is an EtherType. Any other LLC (STP, NetBIOS, ...) is not IP.
                let Some(llc) = frame.get(at..at + 3) else {
                    return LinkPayload::Short;
                };
                if llc != [0xaa, 0xaa, 0x03] {
                    return LinkPayload::NotIp;
                }
                let Some(snap) = frame.get(at + 3..at + 8) else {
                    return LinkPayload::Short;
                };
                if snap[..3] != [0, 0, 0] && snap[..3] != [0, 0, 0xf8] {
                    return LinkPayload::NotIp;
                }
                layers.insert(E::LlcSnap);
                at += 8;
                Next::Type(u16::from_be_bytes([snap[3], snap[4]]))
            }
            Next::Mpls => {
                // Label stack entries of 4 bytes until the one with the bottom-of-stack bit; then the payload
                // says what it is by its first nibble: IPv4, IPv6, or 0 for a pseudowire control word.
                let Some(entry) = frame.get(at..at + 4) else {
                    return LinkPayload::Short;
                };
                at += 4;
                if entry[2] & 0x01 == 0 {
                    Next::Mpls
                } else {
                    match frame.get(at).map(|b| b >> 4) {
                        Some(4 | 6) => return LinkPayload::Ip(&frame[at..]),
                        Some(0) if frame.len() >= at + 4 => {
                            layers.insert(E::MplsPwEthernet);
                            at += 4;
                            Next::Ethernet
                        }
                        Some(0) | None => return LinkPayload::Short,
                        Some(_) => return LinkPayload::NotIp,
                    }
                }
            }
            Next::Pppoe => {
                // Version 1, type 1, code 0 (session data), session id, length; then PPP.
                let Some(header) = frame.get(at..at + 6) else {
                    return LinkPayload::Short;
                };
                if header[0] != 0x11 || header[1] != 0 {
                    return LinkPayload::NotIp;
                }
                layers.insert(E::Pppoe);
                at += 6;
                Next::Ppp
            }
            Next::Ppp => {
                // A protocol field whose first byte is odd is compressed to that one byte (RFC 1661).
                let (protocol, len) = match frame.get(at) {
                    Some(&first) if first & 1 == 1 => (u16::from(first), 1),
                    Some(_) => match be16(frame, at) {
                        Some(protocol) => (protocol, 2),
                        None => return LinkPayload::Short,
                    },
                    None => return LinkPayload::Short,
                };
                at += len;
                match protocol {
                    ppp::IPV4 | ppp::IPV6 => return LinkPayload::Ip(&frame[at..]),
                    ppp::MPLS | ppp::MPLS_MULTICAST => {
                        layers.insert(E::Mpls);
                        Next::Mpls
                    }
                    _ => return LinkPayload::NotIp,
                }
            }
        };
    }
}

/// The payload after a 4-byte address family (NULL and LOOP link types).
fn after_family(frame: &[u8], family: u32) -> LinkPayload<'_> {
    match frame.get(4..) {
        Some(packet) if family == family::INET || family::INET6.contains(&family) => LinkPayload::Ip(packet),
        Some(_) => LinkPayload::NotIp,
        None => LinkPayload::Short,
    }
}

/// Strips the link-layer header of a frame of type `link` (a `LINKTYPE_*` value, see [`linktype`]) and
/// every encapsulation down to IP, recording the encapsulations crossed in `layers`.
///
/// Ethernet: stacked 0x8100/0x88a8/0x9100 tags, MPLS (any depth; IPv4 or IPv6 by the first nibble after the
/// bottom of the stack, an Ethernet pseudowire after a control word), PPPoE sessions (PPP protocol 0x0021 or
/// 0x0057), 802.3 frames with LLC/SNAP and 802.1ah I-TAGs are walked, in any nesting. NULL: the family is in
/// the capturing host's byte order, which the file does not record, so a value with its high 16 bits set is
/// taken as byte-swapped (families are small numbers). LOOP: network byte order. SLL/SLL2 and Cisco HDLC:
/// the protocol field is an EtherType. PPP: IPv4, IPv6 and MPLS (0x0281, 0x0283) protocols, and Cisco HDLC
/// frames recorded under a PPP link type.
pub fn strip_link<'a>(link: u16, frame: &'a [u8], layers: &mut Encapsulations) -> LinkPayload<'a> {
    match link {
        linktype::RAW | linktype::DLT_RAW_12 | linktype::DLT_RAW_14 | linktype::IPV4 | linktype::IPV6 => {
            LinkPayload::Ip(frame)
        }
        linktype::ETHERNET => walk(frame, Next::Ethernet, 0, layers),
        linktype::NULL => match u32_at(frame, 0, false) {
            Some(value) if value & 0xffff_0000 != 0 => after_family(frame, value.swap_bytes()),
            Some(value) => after_family(frame, value),
            None => LinkPayload::Short,
        },
        linktype::LOOP => match u32_at(frame, 0, true) {
            Some(value) => after_family(frame, value),
            None => LinkPayload::Short,
        },
        // SLL: packet type, ARPHRD type, address length, 8 address bytes, protocol; 16 bytes.
        linktype::LINUX_SLL => match be16(frame, 14) {
            Some(kind) => walk(frame, Next::Type(kind), 16, layers),
            None => LinkPayload::Short,
        },
        // SLL2: protocol, reserved, interface index, ARPHRD type, packet type, address length, 8 address
        // bytes; 20 bytes.
        linktype::LINUX_SLL2 => match (be16(frame, 0), frame.len() >= 20) {
            (Some(kind), true) => walk(frame, Next::Type(kind), 20, layers),
            _ => LinkPayload::Short,
        },
        // Cisco HDLC: address (0x0f unicast, 0x8f broadcast), control, EtherType.
        linktype::C_HDLC => match be16(frame, 2) {
            Some(kind) => walk(frame, Next::Type(kind), 4, layers),
            None => LinkPayload::Short,
        },
        // PPP: the address and control bytes 0xff 0x03 are optional (address/control field compression).
        // A frame that starts with Cisco HDLC's address (0x0f or 0x8f) and control (0) is Cisco HDLC, as
        // Wireshark reads it: routers' serial-link captures mix the two under one PPP link type, and no PPP
        // frame starts so (a compressed protocol field 0x0f or 0x8f is not an assigned protocol).
        linktype::PPP | linktype::PPP_HDLC => match frame {
            [cisco_hdlc::UNICAST | cisco_hdlc::BROADCAST, 0, ..] => match be16(frame, 2) {
                Some(kind) => {
                    layers.insert(Encapsulation::CiscoHdlc);
                    walk(frame, Next::Type(kind), 4, layers)
                }
                None => LinkPayload::Short,
            },
            _ => {
                let at = if frame.starts_with(&[0xff, 0x03]) { 2 } else { 0 };
                walk(frame, Next::Ppp, at, layers)
            }
        },
        linktype::PPP_ETHER => walk(frame, Next::Pppoe, 0, layers),
        _ => LinkPayload::Unsupported,
    }
}

/// [`strip_link`] without the encapsulation record.
pub fn link_payload(link: u16, frame: &[u8]) -> LinkPayload<'_> {
    strip_link(link, frame, &mut Encapsulations::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IPV4: [u8; 20] = [0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];

    fn ipv6() -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p
    }

    const MACS: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];

    fn eth(kind: u16, rest: &[u8]) -> Vec<u8> {
        [&MACS[..], &kind.to_be_bytes(), rest].concat()
    }

    fn label(value: u32, bottom: bool) -> [u8; 4] {
        (value << 12 | u32::from(bottom) << 8 | 64).to_be_bytes()
    }

    fn mpls(depth: usize, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..depth {
            out.extend_from_slice(&label(16 + i as u32, i + 1 == depth));
        }
        out.extend_from_slice(payload);
        out
    }

    fn pppoe(protocol: &[u8], payload: &[u8]) -> Vec<u8> {
        let len = (protocol.len() + payload.len()) as u16;
        [
            &[0x11, 0x00, 0x12, 0x34][..],
            &len.to_be_bytes(),
            protocol,
            payload,
        ]
        .concat()
    }

    fn snap(oui: [u8; 3], kind: u16, payload: &[u8]) -> Vec<u8> {
        [&[0xaa, 0xaa, 0x03][..], &oui, &kind.to_be_bytes(), payload].concat()
    }

    fn strip(link: u16, frame: &[u8]) -> (LinkPayload<'_>, Vec<&'static str>) {
        let mut layers = Encapsulations::default();
        let payload = strip_link(link, frame, &mut layers);
        (payload, layers.iter().map(Encapsulation::name).collect())
    }

    #[test]
    fn mpls_any_depth_ipv4_and_ipv6_by_first_nibble() {
        let v6 = ipv6();
        for depth in [1, 2, 5, 40] {
            for (kind, payload) in [(0x8847, &IPV4[..]), (0x8848, &v6[..])] {
                let frame = eth(kind, &mpls(depth, payload));
                assert_eq!(
                    strip(1, &frame),
                    (LinkPayload::Ip(payload), vec!["mpls"]),
                    "depth {depth}"
                );
            }
        }
        // Behind VLAN tags, and in a Linux cooked capture.
        let frame = eth(
            0x8100,
            &[&[0, 5][..], &0x8847u16.to_be_bytes(), &mpls(3, &IPV4)].concat(),
        );
        assert_eq!(
            strip(1, &frame),
            (LinkPayload::Ip(&IPV4[..]), vec!["vlan", "mpls"])
        );
        let mut sll = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x88, 0x47];
        sll.extend(mpls(2, &v6));
        assert_eq!(strip(113, &sll).0, LinkPayload::Ip(&v6[..]));
        // Not IP after the stack; a stack that never ends; an empty payload.
        assert_eq!(
            strip(1, &eth(0x8847, &mpls(2, &[0x10, 0, 0, 0]))).0,
            LinkPayload::NotIp
        );
        let endless: Vec<u8> = (0..10).flat_map(|i| label(i, false)).collect();
        assert_eq!(strip(1, &eth(0x8847, &endless)).0, LinkPayload::Short);
        assert_eq!(strip(1, &eth(0x8847, &mpls(1, &[]))).0, LinkPayload::Short);
        assert_eq!(strip(1, &eth(0x8847, &label(3, true)[..3])).0, LinkPayload::Short);
    }

    #[test]
    fn mpls_ethernet_pseudowire_after_a_control_word() {
        let inner = eth(0x0800, &IPV4);
        let frame = eth(0x8847, &mpls(2, &[&[0, 0, 0, 7][..], &inner].concat()));
        assert_eq!(
            strip(1, &frame),
            (LinkPayload::Ip(&IPV4[..]), vec!["mpls", "mpls_pw_ethernet"])
        );
        let frame = eth(0x8847, &mpls(1, &[0, 0, 0, 7, 1, 2]));
        assert_eq!(strip(1, &frame).0, LinkPayload::Short);
    }

    #[test]
    fn pppoe_sessions_with_long_and_compressed_protocols() {
        let v6 = ipv6();
        for (protocol, payload) in [
            (&[0x00, 0x21][..], &IPV4[..]),
            (&[0x00, 0x57], &v6[..]),
            (&[0x21], &IPV4[..]),
        ] {
            let frame = eth(0x8864, &pppoe(protocol, payload));
            assert_eq!(strip(1, &frame), (LinkPayload::Ip(payload), vec!["pppoe"]));
        }
        // Over QinQ.
        let tags = [
            &[0x00, 0xc8][..],
            &0x8100u16.to_be_bytes(),
            &[0, 100],
            &0x8864u16.to_be_bytes(),
        ]
        .concat();
        let frame = eth(0x88a8, &[&tags[..], &pppoe(&[0, 0x21], &IPV4)].concat());
        assert_eq!(
            strip(1, &frame),
            (LinkPayload::Ip(&IPV4[..]), vec!["vlan", "qinq", "pppoe"])
        );
        // LCP, a discovery frame, a bad version, cut short.
        assert_eq!(
            strip(1, &eth(0x8864, &pppoe(&[0xc0, 0x21], &[1, 1, 0, 4]))).0,
            LinkPayload::NotIp
        );
        assert_eq!(strip(1, &eth(0x8863, &pppoe(&[], &[0; 8]))).0, LinkPayload::NotIp);
        let mut bad = pppoe(&[0, 0x21], &IPV4);
        bad[0] = 0x21;
        assert_eq!(strip(1, &eth(0x8864, &bad)).0, LinkPayload::NotIp);
        assert_eq!(strip(1, &eth(0x8864, &[0x11, 0, 0, 1, 0])).0, LinkPayload::Short);
        assert_eq!(
            strip(1, &eth(0x8864, &pppoe(&[], &[])[..6])).0,
            LinkPayload::Short
        );
        // PPPoE without Ethernet, PPP with and without the HDLC address/control bytes.
        assert_eq!(strip(51, &pppoe(&[0, 0x57], &v6)).0, LinkPayload::Ip(&v6[..]));
        assert_eq!(
            strip(9, &[&[0xff, 0x03, 0x00, 0x21][..], &IPV4].concat()).0,
            LinkPayload::Ip(&IPV4[..])
        );
        assert_eq!(
            strip(50, &[&[0x00, 0x57][..], &v6].concat()).0,
            LinkPayload::Ip(&v6[..])
        );
        assert_eq!(strip(9, &[0xff, 0x03, 0xc0, 0x21, 1]).0, LinkPayload::NotIp);
        assert_eq!(strip(9, &[0xff, 0x03]).0, LinkPayload::Short);
    }

    #[test]
    fn mpls_inside_ppp_links() {
        let v6 = ipv6();
        // Unicast and multicast MPLS, with and without the HDLC address/control bytes, on both PPP types.
        for (link, head) in [(9, &[0xff, 0x03][..]), (9, &[]), (50, &[0xff, 0x03]), (50, &[])] {
            for (protocol, depth, payload) in [(0x0281u16, 1, &IPV4[..]), (0x0283, 3, &v6[..])] {
                let frame = [head, &protocol.to_be_bytes(), &mpls(depth, payload)].concat();
                assert_eq!(
                    strip(link, &frame),
                    (LinkPayload::Ip(payload), vec!["mpls"]),
                    "link {link}"
                );
            }
        }
        // Inside a PPPoE session too.
        let frame = eth(0x8864, &pppoe(&[0x02, 0x81], &mpls(2, &IPV4)));
        assert_eq!(
            strip(1, &frame),
            (LinkPayload::Ip(&IPV4[..]), vec!["mpls", "pppoe"])
        );
        // A stack cut short, and one with no IP at its bottom.
        assert_eq!(strip(9, &[0x02, 0x81, 0, 1]).0, LinkPayload::Short);
        assert_eq!(
            strip(9, &[&[0x02, 0x81][..], &mpls(1, &[0x10, 0])].concat()).0,
            LinkPayload::NotIp
        );
    }

    #[test]
    fn cisco_hdlc_framing_on_ppp_link_types() {
        let v6 = ipv6();
        for link in [9, 50] {
            for address in [0x0f, 0x8f] {
                let frame = [&[address, 0x00][..], &0x0800u16.to_be_bytes(), &IPV4].concat();
                assert_eq!(
                    strip(link, &frame),
                    (LinkPayload::Ip(&IPV4[..]), vec!["cisco_hdlc"])
                );
            }
            // IPv6, MPLS behind it, something else (Cisco SLARP), cut short.
            let frame = [&[0x0f, 0x00][..], &0x86ddu16.to_be_bytes(), &v6].concat();
            assert_eq!(strip(link, &frame).0, LinkPayload::Ip(&v6[..]));
            let frame = [&[0x0f, 0x00][..], &0x8847u16.to_be_bytes(), &mpls(2, &IPV4)].concat();
            assert_eq!(
                strip(link, &frame),
                (LinkPayload::Ip(&IPV4[..]), vec!["mpls", "cisco_hdlc"])
            );
            assert_eq!(strip(link, &[0x8f, 0x00, 0x80, 0x35, 0, 0]).0, LinkPayload::NotIp);
            assert_eq!(strip(link, &[0x0f, 0x00, 0x08]).0, LinkPayload::Short);
        }
        // Real PPP still reads as PPP: the HDLC-like 0xff 0x03, or a protocol field first.
        assert_eq!(
            strip(9, &[&[0xff, 0x03, 0x00, 0x21][..], &IPV4].concat()),
            (LinkPayload::Ip(&IPV4[..]), vec![])
        );
        assert_eq!(
            strip(9, &[&[0x21][..], &IPV4].concat()),
            (LinkPayload::Ip(&IPV4[..]), vec![])
        );
    }

    #[test]
    fn llc_snap_after_an_8023_length() {
        let v6 = ipv6();
        let frame = [&MACS[..], &48u16.to_be_bytes(), &snap([0, 0, 0], 0x0800, &IPV4)].concat();
        assert_eq!(strip(1, &frame), (LinkPayload::Ip(&IPV4[..]), vec!["llc_snap"]));
        let frame = [&MACS[..], &60u16.to_be_bytes(), &snap([0, 0, 0xf8], 0x86dd, &v6)].concat();
        assert_eq!(strip(1, &frame).0, LinkPayload::Ip(&v6[..]));
        // Behind a VLAN tag.
        let tagged = [&[0, 7][..], &40u16.to_be_bytes(), &snap([0, 0, 0], 0x0800, &IPV4)].concat();
        assert_eq!(
            strip(1, &eth(0x8100, &tagged)),
            (LinkPayload::Ip(&IPV4[..]), vec!["vlan", "llc_snap"])
        );
        // In a Linux cooked capture (protocol 4: 802.2).
        let mut sll2 = vec![0, 4, 0, 0, 0, 0, 0, 3, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
        sll2.extend(snap([0, 0, 0], 0x0800, &IPV4));
        assert_eq!(strip(276, &sll2).0, LinkPayload::Ip(&IPV4[..]));
        // Spanning tree, a Cisco OUI, ARP in SNAP, cut short; a type between 1501 and 1535.
        let stp = [&MACS[..], &38u16.to_be_bytes(), &[0x42, 0x42, 0x03, 0, 0, 0]].concat();
        assert_eq!(strip(1, &stp).0, LinkPayload::NotIp);
        let cisco = [
            &MACS[..],
            &30u16.to_be_bytes(),
            &snap([0, 0, 0x0c], 0x2000, &[0; 10]),
        ]
        .concat();
        assert_eq!(strip(1, &cisco).0, LinkPayload::NotIp);
        let arp = [
            &MACS[..],
            &30u16.to_be_bytes(),
            &snap([0, 0, 0], 0x0806, &[0; 28]),
        ]
        .concat();
        assert_eq!(strip(1, &arp).0, LinkPayload::NotIp);
        assert_eq!(
            strip(1, &[&MACS[..], &[0, 30, 0xaa, 0xaa]].concat()).0,
            LinkPayload::Short
        );
        assert_eq!(
            strip(1, &[&MACS[..], &[0, 30, 0xaa, 0xaa, 3, 0, 0]].concat()).0,
            LinkPayload::Short
        );
        assert_eq!(strip(1, &eth(1510, &[0; 40])).0, LinkPayload::NotIp);
    }

    #[test]
    fn pbb_itag_then_the_customer_frame() {
        let customer = eth(0x0800, &IPV4);
        let frame = eth(
            0x88a8,
            &[&[0, 9][..], &0x88e7u16.to_be_bytes(), &[0, 1, 0, 2], &customer].concat(),
        );
        assert_eq!(
            strip(1, &frame),
            (LinkPayload::Ip(&IPV4[..]), vec!["qinq", "pbb"])
        );
        // The customer frame VLAN-tagged; cut inside the customer header.
        let customer = eth(0x8100, &[&[0, 3][..], &0x86ddu16.to_be_bytes(), &ipv6()].concat());
        let frame = eth(0x88e7, &[&[0, 1, 0, 2][..], &customer].concat());
        assert_eq!(strip(1, &frame).1, vec!["vlan", "pbb"]);
        assert_eq!(
            strip(1, &eth(0x88e7, &[0, 1, 0, 2, 1, 2, 3])).0,
            LinkPayload::Short
        );
        assert_eq!(strip(1, &eth(0x88e7, &[0, 1])).0, LinkPayload::Short);
    }

    #[test]
    fn cisco_hdlc() {
        assert_eq!(
            strip(104, &[&[0x0f, 0, 0x08, 0][..], &IPV4].concat()).0,
            LinkPayload::Ip(&IPV4[..])
        );
        let frame = [&[0x0f, 0, 0x88, 0x47][..], &mpls(1, &IPV4)].concat();
        assert_eq!(strip(104, &frame), (LinkPayload::Ip(&IPV4[..]), vec!["mpls"]));
        assert_eq!(strip(104, &[0x8f, 0, 0x80, 0x35, 0]).0, LinkPayload::NotIp);
        assert_eq!(strip(104, &[0x8f, 0, 0x80]).0, LinkPayload::Short);
    }

    #[test]
    fn names() {
        assert_eq!(linktype::name(104), Some("C_HDLC"));
        assert!(linktype::is_supported(51));
        assert_eq!(Encapsulation::ALL.map(Encapsulation::name).len(), 8);
        assert!(Encapsulations::default().is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any frame: the IP payload, when there is one, is a suffix of the frame.
        #[test]
        fn the_walk_is_total_and_returns_a_suffix(
            link in prop::sample::select(vec![0u16, 1, 9, 12, 50, 51, 101, 104, 108, 113, 276, 105]),
            kind in prop::sample::select(vec![0x0800u16, 0x8100, 0x88a8, 0x8847, 0x8864, 0x88e7, 40, 0x86dd]),
            body in proptest::collection::vec(
                prop::sample::select(vec![0u8, 1, 3, 0x11, 0x21, 0x45, 0x57, 0x60, 0x81, 0x88, 0x47, 0x64, 0xaa, 0xe7, 0xff]),
                0..120,
            ),
        ) {
            let frame = eth(kind, &body);
            for input in [&frame[..], &body[..]] {
                if let LinkPayload::Ip(packet) = link_payload(link, input) {
                    prop_assert!(input.ends_with(packet));
                }
            }
        }
    }
}
