//! TUN offloads: the virtio-net header, checksum completion and software segmentation (issue 13).
//!
//! A TUN opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` hands the node bulk TCP (and, where the kernel has
//! USO, UDP) as *super-packets* of up to 64 KB, each preceded by a 10-byte `struct virtio_net_hdr`
//! (`include/uapi/linux/virtio_net.h`):
//!
//! ```text
//! flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16
//! ```
//!
//! The 16-bit fields are in the TUN's virtio byte order, which is the host's unless `TUNSETVNETLE`/`BE` says
//! otherwise; this module reads and writes them **little-endian** (the x86 default, and what a big-endian
//! host gets with `TUNSETVNETLE`), so the same bytes can cross the wire unchanged.
//!
//! Where the receiving side can take a super-packet, it is written to its TUN as is. Where it cannot (its TUN
//! lacks `IFF_VNET_HDR`, or its kernel lacks a feature), [`segment`] does in software what the kernel's GSO
//! would: it splits the super-packet into wire-sized packets with correct lengths, IPv4 IDs, TCP sequence
//! numbers and flags, and full checksums. [`complete_checksum`] finishes the checksum of a single packet that
//! the kernel left partial (`NEEDS_CSUM`, the `CHECKSUM_PARTIAL` of the skb).
//!
//! The model is wireguard-go's `tun/offload_linux.go` (`gsoSplit`, `gsoNoneChecksum`, `handleVirtioRead`),
//! with stricter validation, because here the header may come from a peer over the network rather than from
//! the local kernel: every offset is checked against the packet and the IP header before anything is
//! written, and every function returns a typed [`GsoError`] rather than panicking, for any input.

use core::fmt;

/// Bit values of [`VirtioNetHdr::flags`].
pub mod flags {
    /// The L4 checksum is partial: the field at `csum_start + csum_offset` holds the pseudo-header sum and
    /// the rest must be summed from `csum_start` to the end (`CHECKSUM_PARTIAL`).
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum was validated (receive side); nothing to do for us.
    pub const DATA_VALID: u8 = 2;
}

/// Values of [`VirtioNetHdr::gso_type`].
pub mod gso_type {
    /// Not a super-packet.
    pub const NONE: u8 = 0;
    /// TCP over IPv4 (TSO4).
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (UFO): deprecated, its segments are IP fragments; refused here.
    pub const UDP: u8 = 3;
    /// TCP over IPv6 (TSO6).
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload (USO): one UDP datagram per `gso_size` of payload, IPv4 or IPv6.
    pub const UDP_L4: u8 = 5;
    /// Or-ed onto a TCP type: the super-packet carries CWR, which goes on the first segment only.
    pub const ECN: u8 = 0x80;
}

/// Largest number of segments [`segment`] produces from one super-packet. Linux's smallest TCP MSS
/// (`tcp_min_snd_mss`, 48) cuts 64 KB into 1366 segments; the cap is above that and bounds the output.
pub const MAX_SEGMENTS: usize = 2048;

/// Largest header (IP with options or extension headers, plus TCP/UDP) repeated on every segment. IPv4 with
/// options and TCP with options is at most 120 bytes; the cap leaves room for IPv6 extension headers while
/// bounding the output of [`segment`] to `packet.len() + (MAX_SEGMENTS - 1) * MAX_HEADER_LEN` bytes.
pub const MAX_HEADER_LEN: usize = 256;

const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// The 10-byte `struct virtio_net_hdr` that precedes every packet on a TUN opened with `IFF_VNET_HDR`.
///
/// Fields are kept raw (as the kernel defines them) so that a header read from the TUN can be carried to the
/// peer and written to its TUN bit for bit; [`segment`] and [`complete_checksum`] interpret them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VirtioNetHdr {
    /// [`flags`] bits.
    pub flags: u8,
    /// One of [`gso_type`], possibly or-ed with [`gso_type::ECN`].
    pub gso_type: u8,
    /// Length of the headers (IP + L4) repeated on each segment. Not trusted by [`segment`]: the kernel's
    /// forward path can set it to the length of the whole first segment (see wireguard-go), so the header
    /// length is recomputed from the packet.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP, the datagram payload for USO).
    pub gso_size: u16,
    /// Offset of the L4 header: where checksumming starts.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start` (16 for TCP, 6 for UDP).
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Bytes of the header on the TUN and on the wire.
    pub const LEN: usize = 10;

    /// The header of an ordinary packet (no offload, checksum complete): what is written before each packet
    /// that goes to a TUN with `IFF_VNET_HDR` without an offload.
    pub const NONE: VirtioNetHdr = VirtioNetHdr {
        flags: 0,
        gso_type: gso_type::NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the header from the first [`Self::LEN`] bytes of `bytes` (little-endian fields).
    ///
    /// Only the length is checked here; the meaning of the fields is checked against the packet by
    /// [`segment`], [`validate`] and [`complete_checksum`], since it cannot be judged without it.
    pub fn parse(bytes: &[u8]) -> Result<VirtioNetHdr, GsoError> {
        let Some(b) = bytes.get(..Self::LEN) else {
            return Err(GsoError::ShortHeader { len: bytes.len() });
        };
        let field = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: field(2),
            gso_size: field(4),
            csum_start: field(6),
            csum_offset: field(8),
        })
    }

    /// Splits a TUN read (or a frame carrying one) into its header and the packet after it.
    pub fn split(frame: &[u8]) -> Result<(VirtioNetHdr, &[u8]), GsoError> {
        let hdr = Self::parse(frame)?;
        Ok((hdr, &frame[Self::LEN..]))
    }

    /// Writes the header in the layout [`parse`](Self::parse) reads.
    pub fn encode(&self, out: &mut [u8; Self::LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// The encoded header as an array.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        self.encode(&mut out);
        out
    }

    /// True when the L4 checksum is partial and someone (the kernel, or [`complete_checksum`]) must finish it.
    #[inline]
    pub fn needs_csum(&self) -> bool {
        self.flags & flags::NEEDS_CSUM != 0
    }

    /// True for a super-packet (any GSO type other than NONE, the ECN bit aside).
    #[inline]
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso_type::ECN != gso_type::NONE
    }
}

/// Why a header and packet cannot be segmented or checksummed. Nothing is written when one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoError {
    /// Fewer than [`VirtioNetHdr::LEN`] bytes for the header.
    ShortHeader { len: usize },
    /// An unknown GSO type, UFO (`gso_type::UDP`), ECN on a non-TCP type, a type that does not match the IP
    /// version (TCPV4 on IPv6 or the reverse), or a GSO type where a plain packet is required.
    BadGsoType { gso_type: u8 },
    /// The IP header is not one a super-packet can have: not version 4 or 6, truncated, length field not
    /// matching the packet, a fragment, a protocol other than the GSO type's, or an IPv6 extension header
    /// that segmentation cannot repeat (routing, fragment, anything but hop-by-hop and destination options).
    BadIpHeader { detail: &'static str },
    /// The TCP or UDP header is truncated or has a TCP data offset below 5 words.
    BadL4Header,
    /// `csum_start`/`csum_offset` point outside the packet, or (for a super-packet) not at the L4 header and
    /// its checksum field.
    BadCsumOffsets { csum_start: u16, csum_offset: u16 },
    /// A super-packet with `gso_size` 0.
    BadGsoSize { gso_size: u16 },
    /// IP and L4 headers together longer than [`MAX_HEADER_LEN`].
    HeaderTooLong { len: usize },
    /// More than [`MAX_SEGMENTS`] segments would be produced.
    TooManySegments { segments: usize },
}

impl GsoError {
    /// A short stable name, for counting drops: `short_header`, `bad_gso_type`, `bad_ip_header`,
    /// `bad_l4_header`, `bad_csum_offsets`, `bad_gso_size`, `header_too_long`, `too_many_segments`.
    pub fn reason(&self) -> &'static str {
        match self {
            GsoError::ShortHeader { .. } => "short_header",
            GsoError::BadGsoType { .. } => "bad_gso_type",
            GsoError::BadIpHeader { .. } => "bad_ip_header",
            GsoError::BadL4Header => "bad_l4_header",
            GsoError::BadCsumOffsets { .. } => "bad_csum_offsets",
            GsoError::BadGsoSize { .. } => "bad_gso_size",
            GsoError::HeaderTooLong { .. } => "header_too_long",
            GsoError::TooManySegments { .. } => "too_many_segments",
        }
    }
}

impl fmt::Display for GsoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GsoError::ShortHeader { len } => {
                write!(
                    f,
                    "virtio-net header needs {} bytes, got {len}",
                    VirtioNetHdr::LEN
                )
            }
            GsoError::BadGsoType { gso_type } => {
                write!(f, "unsupported or mismatched GSO type {gso_type:#04x}")
            }
            GsoError::BadIpHeader { detail } => write!(f, "bad IP header for offload: {detail}"),
            GsoError::BadL4Header => write!(f, "truncated or malformed TCP/UDP header"),
            GsoError::BadCsumOffsets {
                csum_start,
                csum_offset,
            } => write!(
                f,
                "checksum start {csum_start} / offset {csum_offset} do not fit the packet's headers"
            ),
            GsoError::BadGsoSize { gso_size } => write!(f, "GSO size {gso_size} is not usable"),
            GsoError::HeaderTooLong { len } => {
                write!(f, "headers of {len} bytes are longer than {MAX_HEADER_LEN}")
            }
            GsoError::TooManySegments { segments } => {
                write!(f, "{segments} segments is more than the limit of {MAX_SEGMENTS}")
            }
        }
    }
}

impl std::error::Error for GsoError {}

/// Finishes the partial L4 checksum of a single packet (`NEEDS_CSUM` without GSO), in place.
///
/// The kernel leaves the pseudo-header sum in the checksum field; the checksum is the complement of the
/// ones'-complement sum from `csum_start` to the end of the packet, field included, stored at
/// `csum_start + csum_offset` (a result of 0 is stored as 0xFFFF, as Linux's `skb_checksum_help` does, so
/// that UDP does not read it as "no checksum"). Without `NEEDS_CSUM` this does nothing. A super-packet is
/// refused with [`GsoError::BadGsoType`]: its checksums are per segment, see [`segment`].
pub fn complete_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), GsoError> {
    if hdr.is_gso() || hdr.gso_type & gso_type::ECN != 0 {
        return Err(GsoError::BadGsoType {
            gso_type: hdr.gso_type,
        });
    }
    if !hdr.needs_csum() {
        return Ok(());
    }
    let (start, at) = partial_csum_bounds(hdr, packet.len())?;
    let sum = ones_complement_sum(&packet[start..]);
    let csum = match !sum {
        0 => 0xFFFF,
        c => c,
    };
    packet[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

/// Checks a header and packet as [`segment`] would, without writing anything, and returns the number of
/// packets [`segment`] would produce.
///
/// This is the check to run before writing a peer's super-packet to a TUN that takes offloads: the kernel
/// validates too, but a typed, counted reason here beats an `EINVAL` from `write()`.
pub fn validate(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<usize, GsoError> {
    if hdr.is_gso() {
        Ok(plan(hdr, packet)?.segments)
    } else {
        if hdr.gso_type & gso_type::ECN != 0 {
            return Err(GsoError::BadGsoType {
                gso_type: hdr.gso_type,
            });
        }
        if hdr.needs_csum() {
            partial_csum_bounds(hdr, packet.len())?;
        }
        Ok(1)
    }
}

/// Turns a packet read with a virtio-net header into ordinary packets with complete checksums, appended to
/// `out` with one entry per packet in `lengths`; returns how many were appended.
///
/// - A super-packet (TCPV4, TCPV6, UDP_L4) is split into segments of `gso_size` payload bytes, each with the
///   headers of the original and, as Linux's GSO does: IPv4 total length, ID (+1 per segment) and header
///   checksum; IPv6 payload length; TCP sequence number advanced, FIN and PSH on the last segment only, CWR
///   on the first only; UDP length; and the full TCP/UDP checksum, pseudo-header included. The L4 header is
///   located by parsing the IP header (IPv4 options and IPv6 hop-by-hop/destination options are repeated on
///   every segment); with `NEEDS_CSUM`, `csum_start` and `csum_offset` must agree with it.
/// - A plain packet with `NEEDS_CSUM` is copied with its checksum completed ([`complete_checksum`]).
/// - A plain packet without it is copied as is.
///
/// On error nothing is appended: everything is validated before the first byte is written. The output grows
/// by at most `packet.len() + (MAX_SEGMENTS - 1) * MAX_HEADER_LEN` bytes.
pub fn segment(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    out: &mut Vec<u8>,
    lengths: &mut Vec<u32>,
) -> Result<usize, GsoError> {
    if !hdr.is_gso() {
        validate(hdr, packet)?;
        let base = out.len();
        out.extend_from_slice(packet);
        if let Err(err) = complete_checksum(hdr, &mut out[base..]) {
            out.truncate(base); // unreachable after `validate`; kept so that the promise holds regardless
            return Err(err);
        }
        lengths.push(len_u32(packet.len()));
        return Ok(1);
    }
    let plan = plan(hdr, packet)?;
    emit_segments(&plan, packet, out, lengths);
    Ok(plan.segments)
}

/// Where the partial checksum starts and where its field is, checked against the packet length.
fn partial_csum_bounds(hdr: &VirtioNetHdr, len: usize) -> Result<(usize, usize), GsoError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > len {
        return Err(GsoError::BadCsumOffsets {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
        });
    }
    Ok((start, at))
}

/// What [`segment`] has learned about a valid super-packet.
#[derive(Debug, Clone, Copy)]
struct Plan {
    is_v6: bool,
    is_tcp: bool,
    /// Offset of the L4 header.
    l4: usize,
    /// Length of everything repeated on each segment (IP headers + L4 header).
    header_len: usize,
    gso_size: usize,
    segments: usize,
}

/// Validates a super-packet and works out its layout.
fn plan(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<Plan, GsoError> {
    let base_type = hdr.gso_type & !gso_type::ECN;
    let ecn = hdr.gso_type & gso_type::ECN != 0;
    let bad_type = GsoError::BadGsoType {
        gso_type: hdr.gso_type,
    };
    let is_tcp = match base_type {
        gso_type::TCPV4 | gso_type::TCPV6 => true,
        gso_type::UDP_L4 if !ecn => false,
        _ => return Err(bad_type),
    };
    if hdr.gso_size == 0 {
        return Err(GsoError::BadGsoSize {
            gso_size: hdr.gso_size,
        });
    }
    let protocol = if is_tcp { PROTO_TCP } else { PROTO_UDP };
    let Some(&first) = packet.first() else {
        return Err(GsoError::BadIpHeader {
            detail: "empty packet",
        });
    };
    let (is_v6, l4) = match first >> 4 {
        4 if base_type != gso_type::TCPV6 => (false, ipv4_l4_offset(packet, protocol)?),
        6 if base_type != gso_type::TCPV4 => (true, ipv6_l4_offset(packet, protocol)?),
        4 | 6 => return Err(bad_type),
        _ => {
            return Err(GsoError::BadIpHeader {
                detail: "IP version is neither 4 nor 6",
            })
        }
    };
    let l4_header_len = if is_tcp {
        let Some(&data_offset) = packet.get(l4 + 12) else {
            return Err(GsoError::BadL4Header);
        };
        let len = usize::from(data_offset >> 4) * 4;
        if len < TCP_MIN_HEADER_LEN {
            return Err(GsoError::BadL4Header);
        }
        len
    } else {
        UDP_HEADER_LEN
    };
    let header_len = l4 + l4_header_len;
    if header_len > packet.len() {
        return Err(GsoError::BadL4Header);
    }
    if header_len > MAX_HEADER_LEN {
        return Err(GsoError::HeaderTooLong { len: header_len });
    }
    if hdr.needs_csum() {
        let expected_offset = if is_tcp { TCP_CSUM_OFFSET } else { UDP_CSUM_OFFSET };
        if usize::from(hdr.csum_start) != l4 || hdr.csum_offset != expected_offset {
            return Err(GsoError::BadCsumOffsets {
                csum_start: hdr.csum_start,
                csum_offset: hdr.csum_offset,
            });
        }
    }
    let gso_size = usize::from(hdr.gso_size);
    let segments = (packet.len() - header_len).div_ceil(gso_size).max(1);
    if segments > MAX_SEGMENTS {
        return Err(GsoError::TooManySegments { segments });
    }
    Ok(Plan {
        is_v6,
        is_tcp,
        l4,
        header_len,
        gso_size,
        segments,
    })
}

/// Checks an IPv4 header that can start a super-packet and returns its length (the L4 offset).
fn ipv4_l4_offset(packet: &[u8], protocol: u8) -> Result<usize, GsoError> {
    if packet.len() < IPV4_MIN_HEADER_LEN {
        return Err(GsoError::BadIpHeader {
            detail: "IPv4 header truncated",
        });
    }
    let ihl = usize::from(packet[0] & 0x0F) * 4;
    if ihl < IPV4_MIN_HEADER_LEN || ihl > packet.len() {
        return Err(GsoError::BadIpHeader {
            detail: "IPv4 header length out of bounds",
        });
    }
    if usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len() {
        return Err(GsoError::BadIpHeader {
            detail: "IPv4 total length differs from the packet",
        });
    }
    // More-fragments flag or a fragment offset: a fragment cannot be segmented.
    if u16::from_be_bytes([packet[6], packet[7]]) & 0x3FFF != 0 {
        return Err(GsoError::BadIpHeader {
            detail: "IPv4 fragment",
        });
    }
    if packet[9] != protocol {
        return Err(GsoError::BadIpHeader {
            detail: "IP protocol does not match the GSO type",
        });
    }
    Ok(ihl)
}

/// Checks an IPv6 header that can start a super-packet, walks hop-by-hop and destination options, and
/// returns the L4 offset.
///
/// Routing headers are refused: with one, the pseudo-header's destination is the final hop's, not the IPv6
/// header's, and a kernel would not hand us such a super-packet anyway. Fragment headers and AH are refused
/// because their contents cannot be repeated on several segments.
fn ipv6_l4_offset(packet: &[u8], protocol: u8) -> Result<usize, GsoError> {
    const HOP_BY_HOP: u8 = 0;
    const DEST_OPTIONS: u8 = 60;
    if packet.len() < IPV6_HEADER_LEN {
        return Err(GsoError::BadIpHeader {
            detail: "IPv6 header truncated",
        });
    }
    if usize::from(u16::from_be_bytes([packet[4], packet[5]])) + IPV6_HEADER_LEN != packet.len() {
        return Err(GsoError::BadIpHeader {
            detail: "IPv6 payload length differs from the packet",
        });
    }
    let mut next = packet[6];
    let mut at = IPV6_HEADER_LEN;
    while next == HOP_BY_HOP || next == DEST_OPTIONS {
        let (Some(&following), Some(&len_units)) = (packet.get(at), packet.get(at + 1)) else {
            return Err(GsoError::BadIpHeader {
                detail: "IPv6 extension header truncated",
            });
        };
        next = following;
        at += (usize::from(len_units) + 1) * 8;
    }
    if at > packet.len() {
        return Err(GsoError::BadIpHeader {
            detail: "IPv6 extension header truncated",
        });
    }
    if next != protocol {
        return Err(GsoError::BadIpHeader {
            detail: "IPv6 next header does not match the GSO type, or cannot be segmented",
        });
    }
    Ok(at)
}

/// Writes the segments of a validated super-packet. Cannot fail: `plan` checked every offset used here.
fn emit_segments(plan: &Plan, packet: &[u8], out: &mut Vec<u8>, lengths: &mut Vec<u32>) {
    let Plan {
        is_v6,
        is_tcp,
        l4,
        header_len,
        gso_size,
        segments,
    } = *plan;
    let payload_len = packet.len() - header_len;
    out.reserve(payload_len + segments * header_len);
    lengths.reserve(segments);

    // The pseudo-header minus its length field is the same for every segment.
    let protocol = if is_tcp { PROTO_TCP } else { PROTO_UDP };
    let addresses = if is_v6 { &packet[8..40] } else { &packet[12..20] };
    let pseudo_fixed = ones_add(ones_complement_sum(addresses), u16::from(protocol));
    let csum_at = l4 + usize::from(if is_tcp { TCP_CSUM_OFFSET } else { UDP_CSUM_OFFSET });
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let first_seq = u32::from_be_bytes([packet[l4 + 4], packet[l4 + 5], packet[l4 + 6], packet[l4 + 7]]);

    for i in 0..segments {
        let data_start = header_len + i * gso_size;
        let data_end = (data_start + gso_size).min(packet.len());
        let seg_len = header_len + (data_end - data_start);
        let base = out.len();
        out.extend_from_slice(&packet[..header_len]);
        out.extend_from_slice(&packet[data_start..data_end]);
        let seg = &mut out[base..];

        if is_v6 {
            // Fits: seg_len <= packet.len(), whose payload length field held it.
            seg[4..6].copy_from_slice(&((seg_len - IPV6_HEADER_LEN) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let ip_csum = !ones_complement_sum(&seg[..l4]);
            seg[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        }

        let l4_len = seg_len - l4;
        if is_tcp {
            let seq = first_seq.wrapping_add((i * gso_size) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut clear = 0;
            if i + 1 < segments {
                clear |= TCP_FIN | TCP_PSH;
            }
            if i > 0 {
                clear |= TCP_CWR;
            }
            seg[l4 + TCP_FLAGS_OFFSET] &= !clear;
        } else {
            seg[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }

        seg[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let pseudo = ones_add(pseudo_fixed, l4_len as u16);
        // The L4 header is an even number of bytes, so header and payload sum separately; the payload is
        // summed from the input, which spares reading back bytes just stored (store-forwarding stalls).
        let l4_sum = ones_add(
            ones_complement_sum(&seg[l4..header_len]),
            ones_complement_sum(&packet[data_start..data_end]),
        );
        let mut csum = !ones_add(pseudo, l4_sum);
        if !is_tcp && csum == 0 {
            csum = 0xFFFF; // UDP: 0 means "no checksum"; its ones'-complement twin is sent instead.
        }
        seg[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
        lengths.push(len_u32(seg_len));
    }
}

/// A packet length as recorded in `lengths`. Packets here come from 64 KB TUN reads; saturating only
/// guards the conversion.
#[inline]
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Ones'-complement addition of two 16-bit values (end-around carry).
#[inline]
fn ones_add(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xFFFF) + (sum >> 16)) as u16
}

/// The 16-bit ones'-complement sum (RFC 1071) of `data` read as big-endian words, a trailing odd byte padded
/// with zero; not complemented.
///
/// Summed eight bytes at a time in native order into a 64-bit accumulator (each step adds two 32-bit halves,
/// so it cannot overflow below 16 GB), then folded and byte-swapped: the ones'-complement sum commutes with
/// byte swapping (RFC 1071, 2.B), so the native-order sum is the big-endian one with its bytes swapped.
fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_ne_bytes(word);
        acc += (w & 0xFFFF_FFFF) + (w >> 32);
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let w = u64::from_ne_bytes(tail);
    acc += (w & 0xFFFF_FFFF) + (w >> 32);
    let mut folded = (acc & 0xFFFF) + ((acc >> 16) & 0xFFFF) + ((acc >> 32) & 0xFFFF) + (acc >> 48);
    while folded > 0xFFFF {
        folded = (folded & 0xFFFF) + (folded >> 16);
    }
    u16::from_be_bytes((folded as u16).to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    const SRC4: [u8; 4] = [10, 0, 0, 1];
    const DST4: [u8; 4] = [10, 0, 0, 2];
    const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd, 0, 2];

    /// A super-packet as a TUN would hand it over: headers, payload, partial L4 checksum, virtio header.
    #[derive(Debug, Clone)]
    struct Spec {
        v6: bool,
        /// IPv4: bytes of options (multiple of 4, at most 40). IPv6: number of 8-byte extension headers
        /// (hop-by-hop first, then destination options).
        ip_extra: usize,
        tcp: bool,
        /// Bytes of TCP options (multiple of 4, at most 40).
        tcp_options: usize,
        tcp_flags: u8,
        seq: u32,
        ip_id: u16,
        payload: Vec<u8>,
        gso_size: u16,
        ecn: bool,
    }

    impl Spec {
        fn tcp4(payload_len: usize, gso_size: u16) -> Spec {
            Spec {
                v6: false,
                ip_extra: 0,
                tcp: true,
                tcp_options: 12,
                tcp_flags: 0x18, // PSH | ACK
                seq: 0xFFFF_F000,
                ip_id: 0xFFFE,
                payload: (0..payload_len).map(|i| (i * 7 + i / 251) as u8).collect(),
                gso_size,
                ecn: false,
            }
        }

        fn l4_offset(&self) -> usize {
            if self.v6 {
                IPV6_HEADER_LEN + 8 * self.ip_extra
            } else {
                IPV4_MIN_HEADER_LEN + self.ip_extra
            }
        }

        fn header_len(&self) -> usize {
            self.l4_offset() + if self.tcp { 20 + self.tcp_options } else { 8 }
        }

        fn protocol(&self) -> u8 {
            if self.tcp {
                PROTO_TCP
            } else {
                PROTO_UDP
            }
        }

        fn build(&self) -> (VirtioNetHdr, Vec<u8>) {
            let l4 = self.l4_offset();
            let total = self.header_len() + self.payload.len();
            let mut p = Vec::with_capacity(total);
            if self.v6 {
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&((total - IPV6_HEADER_LEN) as u16).to_be_bytes());
                p.push(if self.ip_extra > 0 { 0 } else { self.protocol() });
                p.push(64);
                p.extend_from_slice(&SRC6);
                p.extend_from_slice(&DST6);
                for k in 0..self.ip_extra {
                    let next = if k + 1 == self.ip_extra {
                        self.protocol()
                    } else {
                        60
                    };
                    p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // PadN over the 6 option bytes
                }
            } else {
                p.push(0x40 | ((IPV4_MIN_HEADER_LEN + self.ip_extra) / 4) as u8);
                p.push(0);
                p.extend_from_slice(&(total as u16).to_be_bytes());
                p.extend_from_slice(&self.ip_id.to_be_bytes());
                p.extend_from_slice(&[0x40, 0, 64, self.protocol(), 0, 0]); // DF
                p.extend_from_slice(&SRC4);
                p.extend_from_slice(&DST4);
                p.extend(std::iter::repeat(1u8).take(self.ip_extra)); // NOP options
                let ip_csum = !ones_complement_sum(&p);
                p[10..12].copy_from_slice(&ip_csum.to_be_bytes()); // as the kernel hands it over
            }
            assert_eq!(p.len(), l4);
            if self.tcp {
                p.extend_from_slice(&[0x9C, 0x40, 0x01, 0xBB]);
                p.extend_from_slice(&self.seq.to_be_bytes());
                p.extend_from_slice(&0x0102_0304u32.to_be_bytes());
                p.push((((20 + self.tcp_options) / 4) as u8) << 4);
                p.push(self.tcp_flags);
                p.extend_from_slice(&[0xFF, 0xFF, 0, 0, 0, 0]);
                p.extend(std::iter::repeat(1u8).take(self.tcp_options));
            } else {
                p.extend_from_slice(&[0x9C, 0x40, 0x11, 0x5C]);
                p.extend_from_slice(&((total - l4) as u16).to_be_bytes());
                p.extend_from_slice(&[0, 0]);
            }
            p.extend_from_slice(&self.payload);
            // As the kernel leaves it: the folded pseudo-header sum in the checksum field.
            let csum_offset = if self.tcp {
                TCP_CSUM_OFFSET
            } else {
                UDP_CSUM_OFFSET
            };
            let at = l4 + usize::from(csum_offset);
            let addresses = if self.v6 { &p[8..40] } else { &p[12..20] };
            let pseudo = ones_add(
                ones_add(ones_complement_sum(addresses), u16::from(self.protocol())),
                (total - l4) as u16,
            );
            p[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
            let base_type = match (self.tcp, self.v6) {
                (true, false) => gso_type::TCPV4,
                (true, true) => gso_type::TCPV6,
                (false, _) => gso_type::UDP_L4,
            };
            let hdr = VirtioNetHdr {
                flags: flags::NEEDS_CSUM,
                gso_type: base_type | if self.ecn { gso_type::ECN } else { 0 },
                hdr_len: self.header_len() as u16,
                gso_size: self.gso_size,
                csum_start: l4 as u16,
                csum_offset,
            };
            (hdr, p)
        }
    }

    fn run(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut out = vec![0xEE]; // appended to, not overwritten
        let mut lengths = vec![1];
        let n = segment(hdr, packet, &mut out, &mut lengths)?;
        assert_eq!(n + 1, lengths.len());
        assert_eq!(lengths.iter().map(|&l| l as usize).sum::<usize>(), out.len());
        let mut at = 1;
        Ok(lengths[1..]
            .iter()
            .map(|&l| {
                let seg = out[at..at + l as usize].to_vec();
                at += l as usize;
                seg
            })
            .collect())
    }

    /// Checks every segment independently with etherparse, against what the spec says it must be.
    fn check_segments(spec: &Spec, segs: &[Vec<u8>]) {
        let gso = usize::from(spec.gso_size);
        let expected = spec.payload.len().div_ceil(gso).max(1);
        assert_eq!(segs.len(), expected, "segment count");
        let mut payload = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let sliced = SlicedPacket::from_ip(seg).unwrap_or_else(|e| panic!("segment {i}: {e:?}"));
            let (src, dst): (Vec<u8>, Vec<u8>) = match sliced.net.as_ref().unwrap() {
                NetSlice::Ipv4(v4) => {
                    assert!(!spec.v6);
                    let h = v4.header();
                    assert_eq!(usize::from(h.total_len()), seg.len());
                    assert_eq!(h.identification(), spec.ip_id.wrapping_add(i as u16));
                    assert!(h.dont_fragment());
                    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
                    assert_eq!(h.options().len(), spec.ip_extra);
                    (h.source().to_vec(), h.destination().to_vec())
                }
                NetSlice::Ipv6(v6) => {
                    assert!(spec.v6);
                    let h = v6.header();
                    assert_eq!(usize::from(h.payload_length()), seg.len() - IPV6_HEADER_LEN);
                    (h.source().to_vec(), h.destination().to_vec())
                }
                NetSlice::Arp(_) => unreachable!(),
            };
            let seg_payload = match sliced.transport.as_ref().unwrap() {
                TransportSlice::Tcp(tcp) => {
                    assert!(spec.tcp);
                    let want = if spec.v6 {
                        tcp.calc_checksum_ipv6(src.try_into().unwrap(), dst.try_into().unwrap())
                    } else {
                        tcp.calc_checksum_ipv4(src.try_into().unwrap(), dst.try_into().unwrap())
                    };
                    assert_eq!(tcp.checksum(), want.unwrap(), "TCP checksum of segment {i}");
                    let seq = spec.seq.wrapping_add((i * gso) as u32);
                    assert_eq!(tcp.sequence_number(), seq);
                    assert_eq!(tcp.acknowledgment_number(), 0x0102_0304);
                    assert_eq!(usize::from(tcp.data_offset()) * 4, 20 + spec.tcp_options);
                    assert_eq!(tcp.fin(), last && spec.tcp_flags & TCP_FIN != 0);
                    assert_eq!(tcp.psh(), last && spec.tcp_flags & TCP_PSH != 0);
                    assert_eq!(tcp.cwr(), i == 0 && spec.tcp_flags & TCP_CWR != 0);
                    assert!(tcp.ack());
                    tcp.payload().to_vec()
                }
                TransportSlice::Udp(udp) => {
                    assert!(!spec.tcp);
                    let h = udp.to_header();
                    let want = if spec.v6 {
                        h.calc_checksum_ipv6_raw(
                            src.try_into().unwrap(),
                            dst.try_into().unwrap(),
                            udp.payload(),
                        )
                    } else {
                        h.calc_checksum_ipv4_raw(
                            src.try_into().unwrap(),
                            dst.try_into().unwrap(),
                            udp.payload(),
                        )
                    };
                    assert_eq!(udp.checksum(), want.unwrap(), "UDP checksum of segment {i}");
                    assert_eq!(usize::from(udp.length()), seg.len() - spec.l4_offset());
                    udp.payload().to_vec()
                }
                other => panic!("unexpected transport {other:?}"),
            };
            assert_eq!(seg.len(), spec.header_len() + seg_payload.len());
            if last {
                assert!(seg_payload.len() <= gso);
            } else {
                assert_eq!(seg_payload.len(), gso);
            }
            payload.extend_from_slice(&seg_payload);
        }
        assert_eq!(
            payload, spec.payload,
            "segments' payloads concatenate to the original"
        );
    }

    fn check(spec: &Spec) {
        let (hdr, packet) = spec.build();
        let segs = run(&hdr, &packet).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        assert_eq!(validate(&hdr, &packet), Ok(segs.len()));
        check_segments(spec, &segs);
    }

    #[test]
    fn header_round_trips_little_endian() {
        let hdr = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso_type::TCPV4 | gso_type::ECN,
            hdr_len: 0x0102,
            gso_size: 1348,
            csum_start: 20,
            csum_offset: 16,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(bytes, [1, 0x81, 0x02, 0x01, 0x44, 0x05, 20, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&bytes), Ok(hdr));
        let mut frame = bytes.to_vec();
        frame.extend_from_slice(b"packet");
        assert_eq!(VirtioNetHdr::split(&frame), Ok((hdr, &b"packet"[..])));
        assert!(hdr.is_gso() && hdr.needs_csum());
        assert!(!VirtioNetHdr::NONE.is_gso() && !VirtioNetHdr::NONE.needs_csum());
        assert_eq!(VirtioNetHdr::NONE.to_bytes(), [0; 10]);
        for len in 0..VirtioNetHdr::LEN {
            let err = VirtioNetHdr::parse(&bytes[..len]).unwrap_err();
            assert_eq!(err, GsoError::ShortHeader { len });
            assert_eq!(err.reason(), "short_header");
        }
    }

    #[test]
    fn tcpv4_super_packet_splits_into_mss_segments() {
        // 64 KB-class super-packet with PSH|FIN at the end, and one that is not a multiple of the MSS.
        let mut spec = Spec::tcp4(65_535 - 20 - 32, 1348);
        spec.tcp_flags = 0x19; // FIN | PSH | ACK
        check(&spec);
        check(&Spec::tcp4(3 * 1348, 1348));
        check(&Spec::tcp4(1, 1348));
    }

    #[test]
    fn tcpv4_with_ip_options_repeats_them() {
        for options in [4, 20, 40] {
            let mut spec = Spec::tcp4(5000, 1000);
            spec.ip_extra = options;
            spec.tcp_options = 40;
            check(&spec);
        }
    }

    #[test]
    fn cwr_goes_on_the_first_segment_only() {
        let mut spec = Spec::tcp4(4000, 1000);
        spec.tcp_flags = 0x80 | 0x10 | 0x08; // CWR | ACK | PSH
        spec.ecn = true;
        check(&spec);
    }

    #[test]
    fn tcpv6_with_and_without_extension_headers() {
        for ext in [0, 1, 3] {
            let mut spec = Spec::tcp4(10_000, 1220);
            spec.v6 = true;
            spec.ip_extra = ext;
            check(&spec);
        }
    }

    #[test]
    fn udp_l4_over_both_families() {
        for v6 in [false, true] {
            let mut spec = Spec::tcp4(7 * 1200 + 3, 1200);
            spec.tcp = false;
            spec.v6 = v6;
            check(&spec);
        }
    }

    #[test]
    fn udp_checksum_of_zero_is_sent_as_ffff() {
        // Choose the last payload word so that the datagram's sum is 0xFFFF and its checksum would be 0,
        // which UDP reads as "no checksum".
        let mut spec = Spec::tcp4(64, 1200);
        spec.tcp = false;
        spec.payload[62..64].copy_from_slice(&[0, 0]);
        let first = &run(&spec.build().0, &spec.build().1).unwrap()[0];
        let csum_at = spec.l4_offset() + usize::from(UDP_CSUM_OFFSET);
        let word = [first[csum_at], first[csum_at + 1]];
        spec.payload[62..64].copy_from_slice(&word);
        let segs = run(&spec.build().0, &spec.build().1).unwrap();
        assert_eq!(segs[0][csum_at..csum_at + 2], [0xFF, 0xFF]);
        check_segments(&spec, &segs);
    }

    #[test]
    fn header_only_super_packet_is_one_segment() {
        check(&Spec::tcp4(0, 1348));
    }

    #[test]
    fn hdr_len_is_recomputed_not_trusted() {
        let spec = Spec::tcp4(5000, 1000);
        let (mut hdr, packet) = spec.build();
        for bogus in [0, 54, 1054, u16::MAX] {
            hdr.hdr_len = bogus;
            check_segments(&spec, &run(&hdr, &packet).unwrap());
        }
    }

    #[test]
    fn super_packet_without_needs_csum_still_gets_full_checksums() {
        let spec = Spec::tcp4(3000, 1000);
        let (mut hdr, packet) = spec.build();
        hdr.flags = 0;
        hdr.csum_start = 0;
        hdr.csum_offset = 0;
        check_segments(&spec, &run(&hdr, &packet).unwrap());
    }

    /// A plain TCP or UDP packet with its checksum left partial, as a TUN reads it with `NEEDS_CSUM`.
    fn partial_packet(tcp: bool, v6: bool, payload_len: usize) -> (Spec, VirtioNetHdr, Vec<u8>) {
        let mut spec = Spec::tcp4(payload_len, 1348);
        spec.tcp = tcp;
        spec.v6 = v6;
        let (mut hdr, packet) = spec.build();
        hdr.gso_type = gso_type::NONE;
        hdr.gso_size = 0;
        (spec, hdr, packet)
    }

    #[test]
    fn complete_checksum_finishes_the_partial_sum() {
        for (tcp, v6, len) in [
            (true, false, 100),
            (true, true, 0),
            (false, false, 33),
            (false, true, 7),
        ] {
            let (spec, hdr, packet) = partial_packet(tcp, v6, len);
            let mut done = packet.clone();
            complete_checksum(&hdr, &mut done).unwrap();
            check_segments(&spec, &[done.clone()]);
            // segment() does the same into its output.
            assert_eq!(run(&hdr, &packet).unwrap(), vec![done]);
        }
    }

    #[test]
    fn plain_packet_without_flags_is_copied_unchanged() {
        let (_, mut hdr, packet) = partial_packet(true, false, 50);
        hdr.flags = 0;
        assert_eq!(run(&VirtioNetHdr::NONE, &packet).unwrap(), vec![packet.clone()]);
        let mut untouched = packet.clone();
        complete_checksum(&hdr, &mut untouched).unwrap();
        assert_eq!(untouched, packet);
        assert_eq!(validate(&hdr, &packet), Ok(1));
    }

    #[test]
    fn complete_checksum_refuses_out_of_bounds_offsets() {
        let (_, mut hdr, packet) = partial_packet(false, false, 0); // 28 bytes
        for (start, offset) in [(26, 1), (28, 0), (20, 7), (u16::MAX, u16::MAX)] {
            hdr.csum_start = start;
            hdr.csum_offset = offset;
            let mut copy = packet.clone();
            let err = complete_checksum(&hdr, &mut copy).unwrap_err();
            assert_eq!(err.reason(), "bad_csum_offsets");
            assert_eq!(copy, packet);
            assert_eq!(validate(&hdr, &packet).unwrap_err().reason(), "bad_csum_offsets");
        }
        hdr.csum_start = 20;
        hdr.csum_offset = 6;
        complete_checksum(&hdr, &mut packet.clone()).unwrap();
        // A super-packet's checksums are per segment: complete_checksum refuses it.
        hdr.gso_type = gso_type::TCPV4;
        assert_eq!(
            complete_checksum(&hdr, &mut packet.clone()).unwrap_err().reason(),
            "bad_gso_type"
        );
    }

    /// Every refusal leaves the output untouched and names its reason.
    fn refused(hdr: &VirtioNetHdr, packet: &[u8]) -> &'static str {
        let mut out = vec![9];
        let mut lengths = vec![1];
        let err = segment(hdr, packet, &mut out, &mut lengths).unwrap_err();
        assert_eq!((out, lengths), (vec![9], vec![1]));
        assert_eq!(validate(hdr, packet), Err(err));
        assert!(!err.to_string().is_empty());
        err.reason()
    }

    #[test]
    fn bad_gso_types_are_refused() {
        let (hdr, packet) = Spec::tcp4(3000, 1000).build();
        for t in [
            gso_type::UDP,
            2,
            6,
            0x7F,
            gso_type::TCPV6,
            gso_type::UDP_L4 | gso_type::ECN,
        ] {
            assert_eq!(
                refused(&VirtioNetHdr { gso_type: t, ..hdr }, &packet),
                "bad_gso_type",
                "{t}"
            );
        }
        let none_ecn = VirtioNetHdr {
            gso_type: gso_type::ECN,
            ..hdr
        };
        assert_eq!(refused(&none_ecn, &packet), "bad_gso_type");
        let mut v6 = Spec::tcp4(3000, 1000);
        v6.v6 = true;
        let (hdr6, packet6) = v6.build();
        assert_eq!(
            refused(
                &VirtioNetHdr {
                    gso_type: gso_type::TCPV4,
                    ..hdr6
                },
                &packet6
            ),
            "bad_gso_type"
        );
    }

    #[test]
    fn bad_ip_headers_are_refused() {
        let (hdr, packet) = Spec::tcp4(3000, 1000).build();
        let mutate = |at: usize, value: u8| {
            let mut p = packet.clone();
            p[at] = value;
            p
        };
        assert_eq!(refused(&hdr, &[]), "bad_ip_header");
        assert_eq!(refused(&hdr, &packet[..19]), "bad_ip_header");
        assert_eq!(refused(&hdr, &mutate(0, 0x55)), "bad_ip_header"); // version 5
        assert_eq!(refused(&hdr, &mutate(0, 0x44)), "bad_ip_header"); // IHL 4
        assert_eq!(refused(&hdr, &mutate(3, packet[3] ^ 1)), "bad_ip_header"); // total length
        assert_eq!(refused(&hdr, &packet[..packet.len() - 1]), "bad_ip_header");
        assert_eq!(refused(&hdr, &mutate(6, 0x20)), "bad_ip_header"); // more fragments
        assert_eq!(refused(&hdr, &mutate(7, 1)), "bad_ip_header"); // fragment offset
        assert_eq!(refused(&hdr, &mutate(9, PROTO_UDP)), "bad_ip_header");
        // UDP_L4 on a TCP packet.
        let udp_type = VirtioNetHdr {
            gso_type: gso_type::UDP_L4,
            csum_offset: 6,
            ..hdr
        };
        assert_eq!(refused(&udp_type, &packet), "bad_ip_header");

        let mut v6 = Spec::tcp4(3000, 1000);
        v6.v6 = true;
        v6.ip_extra = 1;
        let (hdr6, packet6) = v6.build();
        let mut routing = packet6.clone();
        routing[6] = 43; // a routing header where the hop-by-hop was
        assert_eq!(refused(&hdr6, &routing), "bad_ip_header");
        let mut small = v6.clone();
        small.payload.truncate(100);
        let (small_hdr, mut long_ext) = small.build();
        long_ext[41] = 255; // the extension header runs past the packet
        assert_eq!(refused(&small_hdr, &long_ext), "bad_ip_header");
        long_ext[40] = 60; // a chain of destination options beyond the end
        assert_eq!(refused(&small_hdr, &long_ext), "bad_ip_header");
        let mut jumbo = packet6.clone();
        jumbo[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(refused(&hdr6, &jumbo), "bad_ip_header");
        assert_eq!(refused(&hdr6, &packet6[..39]), "bad_ip_header");
    }

    #[test]
    fn bad_l4_headers_offsets_sizes_and_counts_are_refused() {
        let spec = Spec::tcp4(3000, 1000);
        let (hdr, packet) = spec.build();
        let l4 = spec.l4_offset();
        let mut doff = packet.clone();
        doff[l4 + 12] = 4 << 4;
        assert_eq!(refused(&hdr, &doff), "bad_l4_header");
        // Headers only, TCP data offset beyond them.
        let mut short = Spec::tcp4(0, 1000);
        short.tcp_options = 0;
        let (short_hdr, mut short_packet) = short.build();
        short_packet[l4 + 12] = 15 << 4;
        assert_eq!(refused(&short_hdr, &short_packet), "bad_l4_header");

        for (start, offset) in [(0, 16), (l4 as u16, 6), (l4 as u16 + 1, 16), (u16::MAX, u16::MAX)] {
            let bad = VirtioNetHdr {
                csum_start: start,
                csum_offset: offset,
                ..hdr
            };
            assert_eq!(refused(&bad, &packet), "bad_csum_offsets", "{start}/{offset}");
        }
        assert_eq!(
            refused(&VirtioNetHdr { gso_size: 0, ..hdr }, &packet),
            "bad_gso_size"
        );
        let many = Spec::tcp4(MAX_SEGMENTS + 1, 1);
        let (many_hdr, many_packet) = many.build();
        assert_eq!(refused(&many_hdr, &many_packet), "too_many_segments");
        check(&Spec::tcp4(MAX_SEGMENTS, 1));

        let mut v6 = Spec::tcp4(3000, 1000);
        v6.v6 = true;
        v6.ip_extra = 30; // 40 + 240 bytes of extension headers
        let (hdr6, packet6) = v6.build();
        assert_eq!(refused(&hdr6, &packet6), "header_too_long");
    }

    #[test]
    fn checksum_helper_matches_rfc1071_examples() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(
            ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        assert_eq!(ones_complement_sum(&[]), 0);
        assert_eq!(ones_complement_sum(&[0xAB]), 0xAB00);
        assert_eq!(ones_complement_sum(&[0xFF; 17]), 0xFF00);
    }

    /// The naive big-endian definition, to compare the fast sum against.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum as u16
    }

    fn arb_spec() -> impl Strategy<Value = Spec> {
        (
            any::<bool>(),
            0usize..=10,
            any::<bool>(),
            0usize..=10,
            any::<u8>(),
            any::<u32>(),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..4000),
            1u16..=1500,
        )
            .prop_map(|(v6, extra, tcp, opts, flags, seq, id, payload, gso_size)| Spec {
                v6,
                ip_extra: if v6 { extra % 4 } else { extra * 4 },
                tcp,
                tcp_options: opts * 4,
                tcp_flags: flags | 0x10, // ACK, as on every TSO segment
                seq,
                ip_id: id,
                payload,
                gso_size: gso_size.max(2), // 4000 bytes at 1 per segment would pass MAX_SEGMENTS
                ecn: tcp && flags & TCP_CWR != 0,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn valid_super_packets_segment_correctly(spec in arb_spec()) {
            check(&spec);
        }

        #[test]
        fn fast_sum_matches_reference(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(ones_complement_sum(&data), reference_sum(&data));
        }

        #[test]
        fn arbitrary_input_never_panics(
            header in proptest::collection::vec(any::<u8>(), 0..12),
            packet in proptest::collection::vec(any::<u8>(), 0..400),
            spec in arb_spec(),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            // Raw bytes as header and packet.
            let hdr = VirtioNetHdr::parse(&header);
            prop_assert_eq!(hdr.is_ok(), header.len() >= VirtioNetHdr::LEN);
            let hdr = hdr.unwrap_or_default();
            exercise(&hdr, &packet);
            // A valid super-packet, truncated or with one byte changed, under its own header and a raw one.
            let (good_hdr, good) = spec.build();
            let truncated = &good[..cut.index(good.len() + 1)];
            exercise(&good_hdr, truncated);
            exercise(&hdr, truncated);
            let mut mutated = good.clone();
            let at = flip.0.index(mutated.len());
            mutated[at] ^= flip.1;
            exercise(&good_hdr, &mutated);
        }
    }

    /// Runs every entry point; their answers must agree, and output must add up.
    fn exercise(hdr: &VirtioNetHdr, packet: &[u8]) {
        let mut out = Vec::new();
        let mut lengths = Vec::new();
        let result = segment(hdr, packet, &mut out, &mut lengths);
        assert_eq!(validate(hdr, packet), result);
        match result {
            Ok(n) => {
                assert_eq!(n, lengths.len());
                assert_eq!(lengths.iter().map(|&l| l as usize).sum::<usize>(), out.len());
                assert!(out.len() <= packet.len() + (MAX_SEGMENTS - 1) * MAX_HEADER_LEN);
            }
            Err(e) => {
                assert!(out.is_empty() && lengths.is_empty());
                assert!(!e.reason().is_empty());
            }
        }
        let mut copy = packet.to_vec();
        if complete_checksum(hdr, &mut copy).is_err() {
            assert_eq!(copy, packet);
        }
    }

    /// Speed of `segment` on a 64 KB TCPv4 super-packet cut at MSS 1348. Reports, never asserts:
    /// `cargo test --release -p vpn-packet-core gso::tests::segment_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn segment_speed() {
        let (hdr, packet) = Spec::tcp4(65_535 - 20 - 32, 1348).build();
        let mut out = Vec::with_capacity(128 * 1024);
        let mut lengths = Vec::with_capacity(64);
        let rounds = 20_000;
        let start = std::time::Instant::now();
        let mut segments = 0;
        for _ in 0..rounds {
            out.clear();
            lengths.clear();
            segments += segment(&hdr, std::hint::black_box(&packet), &mut out, &mut lengths).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "segment: {} super-packets of {} B -> {segments} segments in {secs:.3} s: {:.2} M segments/s, \
             {:.2} GB/s of input",
            rounds,
            packet.len(),
            segments as f64 / secs / 1e6,
            (rounds * packet.len()) as f64 / secs / 1e9,
        );
    }
}
