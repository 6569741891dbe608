//! The receive path of a tunnel connection, without I/O: socket bytes in, checked packets out to a TUN.
//!
//! One [`Inbound`] per authenticated connection. [`Inbound::feed`] decodes the frames a read completes
//! ([`crate::framing`]), checks each packet's source against the sending peer's prefixes (anti-spoofing:
//! a peer may only inject packets from addresses it owns), and hands the accepted ones to a [`TunWrite`],
//! all in one call, so the binding can run it with the GIL released and no Python object per packet.
//!
//! Offload frames (a virtio_net_hdr and a super-packet) go to the TUN whole when it takes virtio headers
//! (`vnet_header`), else they are segmented here ([`crate::gso`]) into plain packets. A plain packet
//! written to a TUN that takes virtio headers gets an all-zero header (no offload asked).

use crate::framing::{FrameDecoder, FrameKind, FramingError, VNET_HDR_LEN};
use crate::gso;
use crate::prefix::{check_source, PrefixTable, SourceCheck};

/// The header of a plain packet on a TUN with `IFF_VNET_HDR`: no checksum to complete, no segmentation.
pub const PLAIN_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// What became of one TUN write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The kernel took the packet.
    Written,
    /// The device had no room (`EAGAIN`, `ENOBUFS`): dropped, as a full device queue drops.
    Dropped,
    /// The kernel refused this packet (`EINVAL`, ...): counted, the next one is tried.
    Refused,
    /// The device is gone (`EBADF`, `EIO`, ...): nothing more can be written.
    Fatal(i32),
}

/// Where accepted packets go: a TUN descriptor in the binding, a vector in tests.
pub trait TunWrite {
    /// Writes one packet, preceded by `vnet_header` when the device takes virtio headers.
    fn write_packet(&mut self, vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome;
}

/// Accepted packets collected in one buffer, for a receiver that hands them to a library sink instead of a
/// TUN: `data` holds them back to back, `lengths` their lengths. Every packet is taken.
#[derive(Debug, Default)]
pub struct PacketList {
    /// The packets, back to back.
    pub data: Vec<u8>,
    /// One length per packet.
    pub lengths: Vec<u32>,
}

impl PacketList {
    /// Forgets the packets (keeps the memory for the next read).
    pub fn clear(&mut self) {
        self.data.clear();
        self.lengths.clear();
    }

    /// The packets, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0usize;
        self.lengths.iter().map(move |&len| {
            let end = start + len as usize;
            let packet = &self.data[start..end];
            start = end;
            packet
        })
    }
}

impl TunWrite for PacketList {
    fn write_packet(&mut self, _vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
        self.data.extend_from_slice(packet);
        self.lengths.push(packet.len() as u32);
        WriteOutcome::Written
    }
}

/// Counters of one connection's receive path (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboundCounts {
    /// Packets written to the TUN (a super-packet written whole counts once).
    pub delivered: u64,
    /// Bytes of those packets (without virtio headers).
    pub delivered_bytes: u64,
    /// Packets whose source is outside the sender's prefixes.
    pub spoofed: u64,
    /// Packets without a trustworthy source address.
    pub unparsable: u64,
    /// Offload frames whose header could not be honoured (bad header, or a segmentation refused).
    pub offload_invalid: u64,
    /// Super-packets segmented in software (the TUN does not take virtio headers).
    pub segmented: u64,
    /// Packets beyond the first that segmenting made: a super-packet of `n` segments is one frame and `n`
    /// packets, `n - 1` of them counted here, so that frames + `extra_segments` = delivered + every drop.
    pub extra_segments: u64,
    /// Packets the device had no room for.
    pub write_dropped: u64,
    /// Packets the kernel refused.
    pub write_errors: u64,
    /// The errno of a write that found the device gone (0: none).
    pub fatal_errno: i32,
}

/// The receive path of one connection; see the module documentation.
#[derive(Debug)]
pub struct Inbound {
    decoder: FrameDecoder,
    vnet_header: bool,
    segments: Vec<u8>,
    segment_lengths: Vec<u32>,
    /// Cumulative counters.
    pub counts: InboundCounts,
}

impl Inbound {
    /// A receive path refusing packet frames above `max_frame_size`; `vnet_header`: the TUN takes virtio
    /// headers (opened with `IFF_VNET_HDR`).
    pub fn new(max_frame_size: usize, vnet_header: bool) -> Self {
        Inbound {
            decoder: FrameDecoder::new(max_frame_size),
            vnet_header,
            segments: Vec::new(),
            segment_lengths: Vec::new(),
            counts: InboundCounts::default(),
        }
    }

    /// The frame decoder (frames so far: what the acknowledgements count).
    pub fn decoder(&self) -> &FrameDecoder {
        &self.decoder
    }

    /// Decodes `data`, checks every packet's source against `peer` in `table`, writes the accepted ones to
    /// `tun`. Frames completed before a framing error are still processed; the error ends the stream.
    /// After a fatal write error the remaining packets of `data` are counted as dropped.
    pub fn feed<W: TunWrite>(
        &mut self,
        data: &[u8],
        table: &PrefixTable<u32>,
        peer: u32,
        tun: &mut W,
    ) -> Result<(), FramingError> {
        let Inbound {
            decoder,
            vnet_header,
            segments,
            segment_lengths,
            counts,
        } = self;
        let mut rest = Frames {
            vnet: *vnet_header,
            segments,
            segment_lengths,
            counts,
        };
        decoder.feed_frames(data, |kind, payload| rest.take(kind, payload, table, peer, tun))
    }

    /// One frame decoded elsewhere (by [`crate::connection::Connection`], which decodes the frames of a TLS
    /// stream itself): its source checked against `peer` in `table`, and written to `tun` when accepted,
    /// counted as [`Inbound::feed`] counts. The frame decoder is not used (its counts stay 0).
    pub fn take_frame<W: TunWrite>(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        table: &PrefixTable<u32>,
        peer: u32,
        tun: &mut W,
    ) {
        let Inbound {
            vnet_header,
            segments,
            segment_lengths,
            counts,
            ..
        } = self;
        Frames {
            vnet: *vnet_header,
            segments,
            segment_lengths,
            counts,
        }
        .take(kind, payload, table, peer, tun);
    }
}

/// The parts of an [`Inbound`] one frame needs (the decoder is borrowed apart while it hands out frames).
struct Frames<'a> {
    vnet: bool,
    segments: &'a mut Vec<u8>,
    segment_lengths: &'a mut Vec<u32>,
    counts: &'a mut InboundCounts,
}

impl Frames<'_> {
    fn take<W: TunWrite>(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        table: &PrefixTable<u32>,
        peer: u32,
        tun: &mut W,
    ) {
        let Frames {
            vnet,
            segments,
            segment_lengths,
            counts,
        } = self;
        let vnet = *vnet;
        let (header, packet) = match kind {
            FrameKind::Packet => (None, payload),
            FrameKind::Offload => {
                let (header, packet) = payload.split_at(VNET_HDR_LEN);
                (Some(header), packet)
            }
        };
        match check_source(table, packet, peer) {
            SourceCheck::Accepted => {}
            SourceCheck::Spoofed => {
                counts.spoofed += 1;
                return;
            }
            SourceCheck::Unparsable => {
                counts.unparsable += 1;
                return;
            }
        }
        match header {
            None => {
                let header = vnet.then_some(&PLAIN_VNET_HDR[..]);
                write_one(tun, counts, header, packet);
            }
            Some(header) => {
                let parsed = match gso::VirtioNetHdr::parse(header) {
                    Ok(parsed) => parsed,
                    Err(_) => {
                        counts.offload_invalid += 1;
                        return;
                    }
                };
                if vnet {
                    // The header comes from a peer, not from our kernel: the same checks as for
                    // segmenting it ourselves, so the kernel is never handed a header we would refuse.
                    if gso::validate(&parsed, packet).is_err() {
                        counts.offload_invalid += 1;
                        return;
                    }
                    write_one(tun, counts, Some(header), packet);
                    return;
                }
                segments.clear();
                segment_lengths.clear();
                if gso::segment(&parsed, packet, segments, segment_lengths).is_err() {
                    counts.offload_invalid += 1;
                    return;
                }
                counts.segmented += 1;
                counts.extra_segments += segment_lengths.len().saturating_sub(1) as u64;
                let mut start = 0usize;
                for &len in segment_lengths.iter() {
                    let end = start + len as usize;
                    write_one(tun, counts, None, &segments[start..end]);
                    start = end;
                }
            }
        }
    }
}

fn write_one<W: TunWrite>(tun: &mut W, counts: &mut InboundCounts, header: Option<&[u8]>, packet: &[u8]) {
    if counts.fatal_errno != 0 {
        counts.write_dropped += 1;
        return;
    }
    match tun.write_packet(header, packet) {
        WriteOutcome::Written => {
            counts.delivered += 1;
            counts.delivered_bytes += packet.len() as u64;
        }
        WriteOutcome::Dropped => counts.write_dropped += 1,
        WriteOutcome::Refused => counts.write_errors += 1,
        WriteOutcome::Fatal(errno) => {
            counts.fatal_errno = errno;
            counts.write_dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{encode_frames, encode_offload_frame_into, KEEPALIVE};
    use crate::prefix::parse_prefix;

    #[derive(Default)]
    struct Recorder {
        written: Vec<(Option<Vec<u8>>, Vec<u8>)>,
        fail_after: Option<usize>,
    }

    impl TunWrite for Recorder {
        fn write_packet(&mut self, vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
            if self.fail_after == Some(self.written.len()) {
                return WriteOutcome::Fatal(5);
            }
            self.written
                .push((vnet_header.map(<[u8]>::to_vec), packet.to_vec()));
            WriteOutcome::Written
        }
    }

    fn ipv4_from(src: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&[10, 9, 0, 2]);
        p
    }

    fn table() -> PrefixTable<u32> {
        let mut t = PrefixTable::new();
        let (a, l) = parse_prefix("10.9.0.0/24").unwrap();
        t.insert(a, l, 1).unwrap();
        let (a, l) = parse_prefix("10.7.0.0/24").unwrap();
        t.insert(a, l, 2).unwrap();
        t
    }

    #[test]
    fn accepted_spoofed_and_unparsable_are_told_apart() {
        let good = ipv4_from([10, 9, 0, 5]);
        let spoofed = ipv4_from([10, 7, 0, 5]);
        let nobody = ipv4_from([192, 0, 2, 1]);
        let mut wire = encode_frames([&good[..], &spoofed, b"xx", &nobody], 65535).unwrap();
        wire.extend_from_slice(&KEEPALIVE);
        let mut inbound = Inbound::new(65535, false);
        let mut tun = Recorder::default();
        for chunk in wire.chunks(5) {
            inbound.feed(chunk, &table(), 1, &mut tun).unwrap();
        }
        assert_eq!(tun.written, vec![(None, good.clone())]);
        let c = inbound.counts;
        assert_eq!((c.delivered, c.spoofed, c.unparsable), (1, 2, 1));
        assert_eq!(inbound.decoder().frames(), 4);
        assert_eq!(inbound.decoder().keepalives(), 1);
    }

    #[test]
    fn a_vnet_tun_gets_a_zero_header_and_offload_frames_whole() {
        let good = ipv4_from([10, 9, 0, 5]);
        let mut wire = encode_frames([&good[..]], 65535).unwrap();
        encode_offload_frame_into(&PLAIN_VNET_HDR, &good, &mut wire).unwrap();
        let mut inbound = Inbound::new(65535, true);
        let mut tun = Recorder::default();
        inbound.feed(&wire, &table(), 1, &mut tun).unwrap();
        assert_eq!(tun.written.len(), 2);
        assert!(tun
            .written
            .iter()
            .all(|(h, p)| h.as_deref() == Some(&PLAIN_VNET_HDR[..]) && *p == good));
    }

    /// A TCPv4 super-packet from 10.9.0.5 with `payload` bytes, as a TUN with TSO hands it out: its
    /// virtio_net_hdr and the packet.
    fn tcp4_super_packet(payload: usize, mss: u16) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
        let total = 40 + payload;
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 9, 0, 5, 10, 9, 0, 2]);
        p.extend_from_slice(&[
            0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        p.extend((0..payload).map(|i| i as u8));
        let hdr = gso::VirtioNetHdr {
            flags: gso::flags::NEEDS_CSUM,
            gso_type: gso::gso_type::TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (hdr.to_bytes(), p)
    }

    #[test]
    fn a_super_packet_is_segmented_for_a_plain_tun_and_whole_for_a_vnet_one() {
        let mut wire = Vec::new();
        let (header, packet) = tcp4_super_packet(3000, 1000);
        encode_offload_frame_into(&header, &packet, &mut wire).unwrap();
        let mut plain = Recorder::default();
        let mut inbound = Inbound::new(1500, false);
        inbound.feed(&wire, &table(), 1, &mut plain).unwrap();
        assert_eq!(plain.written.len(), 3);
        let mut payload = Vec::new();
        for (header, segment) in &plain.written {
            assert!(header.is_none());
            let parsed = etherparse::SlicedPacket::from_ip(segment).unwrap();
            payload.extend_from_slice(parsed.transport.as_ref().map(|_| &segment[40..]).unwrap());
        }
        assert_eq!(payload, (0..3000).map(|i| i as u8).collect::<Vec<_>>());
        assert_eq!((inbound.counts.segmented, inbound.counts.delivered), (1, 3));
        assert_eq!(inbound.counts.extra_segments, 2);
        let mut vnet = Recorder::default();
        let mut inbound = Inbound::new(1500, true);
        inbound.feed(&wire, &table(), 1, &mut vnet).unwrap();
        assert_eq!(vnet.written.len(), 1);
        assert_eq!(inbound.counts.delivered, 1);
        // A header the checks refuse (a segment size of 0) is counted, never handed to the kernel.
        let (mut bad, packet) = tcp4_super_packet(3000, 1000);
        bad[4..6].copy_from_slice(&0u16.to_le_bytes()); // gso_size 0
        let mut wire = Vec::new();
        encode_offload_frame_into(&bad, &packet, &mut wire).unwrap();
        let mut inbound = Inbound::new(1500, true);
        let mut tun = Recorder::default();
        inbound.feed(&wire, &table(), 1, &mut tun).unwrap();
        assert!(tun.written.is_empty());
        assert_eq!(inbound.counts.offload_invalid, 1);
    }

    #[test]
    fn after_a_fatal_write_the_rest_is_dropped_and_counted() {
        let good = ipv4_from([10, 9, 0, 5]);
        let wire = encode_frames([&good[..], &good, &good], 65535).unwrap();
        let mut inbound = Inbound::new(65535, false);
        let mut tun = Recorder {
            fail_after: Some(1),
            ..Recorder::default()
        };
        inbound.feed(&wire, &table(), 1, &mut tun).unwrap();
        let c = inbound.counts;
        assert_eq!((c.delivered, c.write_dropped, c.fatal_errno), (1, 2, 5));
    }

    /// Every drop reason and delivery of one connection, summed.
    fn accounted(c: &InboundCounts) -> u64 {
        c.delivered + c.spoofed + c.unparsable + c.offload_invalid + c.write_dropped + c.write_errors
    }

    #[test]
    fn every_frame_is_delivered_or_dropped_by_reason() {
        let good = ipv4_from([10, 9, 0, 5]);
        let spoofed = ipv4_from([10, 7, 0, 5]);
        let (header, packet) = tcp4_super_packet(3000, 1000);
        let mut bad_header = header;
        bad_header[4..6].copy_from_slice(&0u16.to_le_bytes()); // gso_size 0: refused
        let mut wire = encode_frames([&good[..], &spoofed, b"xx"], 65535).unwrap();
        encode_offload_frame_into(&header, &packet, &mut wire).unwrap();
        encode_offload_frame_into(&bad_header, &packet, &mut wire).unwrap();
        wire.extend(encode_frames([&good[..]], 65535).unwrap());
        for vnet in [false, true] {
            let mut inbound = Inbound::new(65535, vnet);
            let mut list = PacketList::default();
            inbound.feed(&wire, &table(), 1, &mut list).unwrap();
            let c = inbound.counts;
            assert_eq!(inbound.decoder().frames(), 6);
            assert_eq!(c.offload_invalid, 1, "vnet={vnet}");
            assert_eq!(
                inbound.decoder().frames() + c.extra_segments,
                accounted(&c),
                "vnet={vnet}: {c:?}"
            );
            assert_eq!(list.lengths.len() as u64, c.delivered);
            assert_eq!(list.iter().next(), Some(&good[..]));
        }
    }

    mod accounting {
        use super::*;
        use proptest::prelude::*;

        /// A frame of the generated stream: a packet from the peer, from another peer, garbage, or an
        /// offload frame with a random header around a super-packet.
        #[derive(Debug, Clone)]
        enum Frame {
            Own(u8),
            Other(u8),
            Garbage(Vec<u8>),
            /// A random header (`Some`; almost always refused) or the packet's own (`None`).
            Offload(Option<[u8; VNET_HDR_LEN]>, usize),
        }

        fn frame() -> impl Strategy<Value = Frame> {
            prop_oneof![
                any::<u8>().prop_map(Frame::Own),
                any::<u8>().prop_map(Frame::Other),
                proptest::collection::vec(any::<u8>(), 1..60).prop_map(Frame::Garbage),
                (proptest::option::of(any::<[u8; VNET_HDR_LEN]>()), 1usize..4000)
                    .prop_map(|(h, n)| Frame::Offload(h, n)),
            ]
        }

        /// A TUN that takes every `every`-th write, refuses some and has no room for others.
        struct Flaky(usize, usize);

        impl TunWrite for Flaky {
            fn write_packet(&mut self, _vnet_header: Option<&[u8]>, _packet: &[u8]) -> WriteOutcome {
                self.1 += 1;
                match self.1 % self.0.max(1) {
                    1 => WriteOutcome::Dropped,
                    2 => WriteOutcome::Refused,
                    _ => WriteOutcome::Written,
                }
            }
        }

        proptest! {
            /// Whatever the frames, the chunking and the TUN's answers: frames + extra segments =
            /// delivered + every drop.
            #[test]
            fn every_frame_is_accounted_for(
                frames in proptest::collection::vec(frame(), 0..24),
                chunk in 1usize..500,
                vnet in any::<bool>(),
                every in 0usize..6,
            ) {
                let mut wire = Vec::new();
                let mut count = 0u64;
                for frame in &frames {
                    match frame {
                        Frame::Own(i) => wire.extend(encode_frames([&ipv4_from([10, 9, 0, *i])[..]], 65535).unwrap()),
                        Frame::Other(i) => wire.extend(encode_frames([&ipv4_from([10, 7, 0, *i])[..]], 65535).unwrap()),
                        Frame::Garbage(bytes) => wire.extend(encode_frames([&bytes[..]], 65535).unwrap()),
                        Frame::Offload(header, n) => {
                            let (own, packet) = tcp4_super_packet(*n, 1000);
                            let header = header.unwrap_or(own);
                            encode_offload_frame_into(&header, &packet, &mut wire).unwrap();
                        }
                    }
                    count += 1;
                }
                let mut inbound = Inbound::new(65535, vnet);
                let mut tun = Flaky(every, 0);
                for piece in wire.chunks(chunk) {
                    inbound.feed(piece, &table(), 1, &mut tun).unwrap();
                }
                let c = inbound.counts;
                prop_assert_eq!(inbound.decoder().frames(), count);
                prop_assert_eq!(inbound.decoder().frames() + c.extra_segments, accounted(&c));
            }
        }
    }
}
