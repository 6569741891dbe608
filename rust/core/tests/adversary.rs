//! Bad input keeps its answer (issue 20, item 6), as properties on stable Rust: the fuzz targets' bodies
//! (`harness`, shared with `fuzz/`) on generated input, and the properties of an authenticated stream:
//! any read boundaries decode the same as the plaintext path; one corrupt TLS record ends that connection
//! there with a counted reason; a malformed offload header from an authenticated peer is counted by reason
//! and ends only that connection.

mod harness;

use harness::{expected_frames, last_ack, pieces, records, Peer, Server, Tun, MAX_FRAME, PEER_A};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use proptest::prelude::*;
use vpn_packet_core::connection::{Connection, Event, FailureTally, Stage};
use vpn_packet_core::framing::{
    encode_frames, encode_offload_frame_into, FrameKind, KEEPALIVE, VNET_HDR_LEN,
};
use vpn_packet_core::gso::{self, VirtioNetHdr};
use vpn_packet_core::handshake::{self, Parsed};
use vpn_packet_core::inbound::Inbound;
use vpn_packet_core::receive::{Read, ReceiveSession, NO_PEER};

/// `n` cases (each does a TLS handshake, so CI's run stays short), or `PROPTEST_CASES` when set, for a
/// longer run by hand.
fn cases(n: u32) -> ProptestConfig {
    let env = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok());
    ProptestConfig::with_cases(env.unwrap_or(n))
}

// --- what an authenticated peer sends ------------------------------------------------------------------

/// One unit of an authenticated stream.
#[derive(Debug, Clone)]
enum Item {
    Packet(Vec<u8>),
    Offload([u8; VNET_HDR_LEN], Vec<u8>),
    Keepalive,
}

/// An IPv4 packet of `len` bytes (20 at least) from `src`.
fn ipv4(src: [u8; 4], len: usize, fill: u8) -> Vec<u8> {
    let len = len.max(20);
    let mut p = vec![0x45, 0, (len >> 8) as u8, len as u8, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&[10, 9, 0, 2]);
    p.resize(len, fill);
    p
}

/// A TCPv4 super-packet from 10.1.0.5 with `payload` bytes in segments of `mss`, and its header.
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
    p.extend_from_slice(&[10, 1, 0, 5, 10, 9, 0, 2]);
    p.extend_from_slice(&[
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p.extend((0..payload).map(|i| i as u8));
    let hdr = VirtioNetHdr {
        flags: gso::flags::NEEDS_CSUM,
        gso_type: gso::gso_type::TCPV4,
        hdr_len: 40,
        gso_size: mss,
        csum_start: 20,
        csum_offset: 16,
    };
    (hdr.to_bytes(), p)
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        // Packets from the peer's own prefix, from another peer's, from nobody's; a few not IP at all.
        5 => (prop::sample::select(vec![[10u8, 1, 0, 7], [10, 1, 3, 4], [10, 2, 0, 1], [192, 0, 2, 1]]),
              20usize..MAX_FRAME + 1, any::<u8>())
            .prop_map(|(src, len, fill)| Item::Packet(ipv4(src, len, fill))),
        1 => prop::collection::vec(any::<u8>(), 1..60).prop_map(Item::Packet),
        // Offload frames: a plain packet with an empty header, and TCP super-packets to segment.
        1 => (20usize..3000, any::<u8>())
            .prop_map(|(len, fill)| Item::Offload([0; VNET_HDR_LEN], ipv4([10, 1, 0, 9], len, fill))),
        1 => (1usize..6000, 500u16..1500).prop_map(|(payload, mss)| {
            let (header, packet) = tcp4_super_packet(payload, mss);
            Item::Offload(header, packet)
        }),
        1 => Just(Item::Keepalive),
    ]
}

fn encode(items: &[Item]) -> Vec<u8> {
    let mut wire = Vec::new();
    for item in items {
        match item {
            Item::Packet(p) => wire.extend_from_slice(&encode_frames([&p[..]], MAX_FRAME).unwrap()),
            Item::Offload(h, p) => encode_offload_frame_into(h, p, &mut wire).unwrap(),
            Item::Keepalive => wire.extend_from_slice(&KEEPALIVE),
        }
    }
    wire
}

fn frames_of(items: &[Item]) -> Vec<(FrameKind, Vec<u8>)> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Packet(p) => Some((FrameKind::Packet, p.clone())),
            Item::Offload(h, p) => Some((FrameKind::Offload, [&h[..], p].concat())),
            Item::Keepalive => None,
        })
        .collect()
}

/// What the plaintext receive path (no TLS, no connection: [`Inbound::feed`]) makes of `plaintext`.
fn plaintext_path(plaintext: &[u8], vnet_header: bool) -> (Inbound, Tun) {
    let mut inbound = Inbound::new(MAX_FRAME, vnet_header);
    let mut tun = Tun::default();
    let _ = inbound.feed(plaintext, harness::table(), PEER_A, &mut tun);
    (inbound, tun)
}

/// A new authenticated session on the same node takes frames: a failure ended only its own connection.
fn node_still_serves() {
    let mut server = Server::new(false, Vec::new());
    let mut peer = Peer::authenticated(&mut server);
    let packet = ipv4([10, 1, 0, 7], 60, 1);
    let stream = peer.seal(&encode(&[Item::Packet(packet.clone())]), 1 << 14);
    server.feed(&stream);
    assert_eq!(server.frames, vec![(FrameKind::Packet, packet)]);
    assert_eq!(server.tun.written.len(), 1);
}

proptest! {
    #![proptest_config(cases(32))]

    /// Any records and any read boundaries: the same frames as the plaintext, in order, the same packets
    /// on the TUN and the same counts as the plaintext receive path, and every frame acknowledged.
    #[test]
    fn any_chunking_of_an_authenticated_stream_decodes_identically(
        items in prop::collection::vec(item(), 0..24),
        record in 1usize..20_000,
        cuts in prop::collection::vec(1usize..3000, 0..8),
        vnet_header: bool,
    ) {
        let plaintext = encode(&items);
        let mut server = Server::new(vnet_header, Vec::new());
        let mut peer = Peer::authenticated(&mut server);
        let stream = peer.seal(&plaintext, record);
        for piece in pieces(&stream, &cuts) {
            server.feed(piece);
        }
        prop_assert_eq!(&server.frames, &frames_of(&items));
        prop_assert_eq!(server.failure(), None);
        let keepalives = items.iter().filter(|i| matches!(i, Item::Keepalive)).count();
        prop_assert_eq!(server.conn.counts().keepalives, keepalives as u64);
        let (inbound, tun) = plaintext_path(&plaintext, vnet_header);
        prop_assert_eq!(&server.tun.written, &tun.written);
        prop_assert_eq!(server.inbound.counts, inbound.counts);
        peer.read_from(&mut server);
        prop_assert_eq!(last_ack(&peer.plaintext), server.frames.len() as u64);
    }

    /// One byte of one TLS record changed: the records before it are delivered, nothing from it or after
    /// it, and the connection ends with a counted reason (or, when the changed length runs past the end of
    /// the stream, at the stream's end). The low byte of the legacy version is the one exception: RFC 8446
    /// (5.1) says to ignore the field, and the record is authenticated without it.
    #[test]
    fn one_corrupt_record_ends_the_connection_there(
        items in prop::collection::vec(item(), 1..16),
        record in 1usize..4000,
        which: prop::sample::Index,
        at: prop::sample::Index,
        mask in 1u8..=255,
        cuts in prop::collection::vec(1usize..3000, 0..8),
    ) {
        let plaintext = encode(&items);
        let mut server = Server::new(false, Vec::new());
        let mut peer = Peer::authenticated(&mut server);
        let mut stream = peer.seal(&plaintext, record);
        let lengths: Vec<usize> = records(&stream).iter().map(|r| r.len()).collect();
        let chunks = plaintext.len().div_ceil(record.min(1 << 14));
        prop_assert_eq!(lengths.len(), chunks, "one record per chunk of plaintext");
        let bad = which.index(lengths.len());
        let offset = at.index(lengths[bad]);
        let start: usize = lengths[..bad].iter().sum();
        stream[start + offset] ^= mask;
        for piece in pieces(&stream, &cuts) {
            server.feed(piece);
        }
        server.eof();
        prop_assert_eq!(server.conn.stage(), Stage::Closed);
        let before = &plaintext[..(bad * record.min(1 << 14)).min(plaintext.len())];
        if offset == 2 {
            // The low byte of the version field: ignored (rustls checks only the high byte, and
            // authenticates the record with the version TLS 1.3 fixes), everything delivered.
            prop_assert_eq!(server.failure(), None);
            prop_assert_eq!(&server.frames, &frames_of(&items));
            return Ok(());
        }
        prop_assert_eq!(&server.frames, &expected_frames(before, MAX_FRAME).0);
        let failure = server.failure();
        if (3..=4).contains(&offset) && failure.is_none() {
            // A length grown past the end of the stream: the record never completes, and the stream's end
            // closes the connection without a frame from it.
            prop_assert!(matches!(server.events.last(), Some(Event::Closed)), "{:?}", server.events);
        } else {
            let reason = failure.unwrap();
            prop_assert!(reason.starts_with("tls_"), "{}", reason);
            let mut tally = FailureTally::default();
            tally.record(server.conn.failure().unwrap());
            prop_assert_eq!(tally.get(reason), 1);
        }
        peer.read_from(&mut server);
        prop_assert_eq!(last_ack(&peer.plaintext), server.conn.counts().acked);
    }

    /// An offload frame with any header after good frames: taken when `gso::validate` accepts its header,
    /// else the frames before it are delivered and acknowledged, the connection ends as `offload_invalid`,
    /// nothing after it is taken, no packet is dropped silently on the TUN path, and the node still serves.
    #[test]
    fn malformed_offload_headers_end_the_connection_by_reason(
        before in prop::collection::vec(item(), 0..6),
        flags in prop::sample::select(vec![0u8, 1, 2, 3, 0x80]),
        gso_type in prop::sample::select(vec![0u8, 1, 3, 4, 5, 0x81, 0x85, 0x40]),
        fields in prop::array::uniform4(prop_oneof![0u16..64, 0u16..2000, any::<u16>()]),
        packet in prop_oneof![
            (20usize..3000).prop_map(|len| ipv4([10, 1, 0, 9], len, 3)),
            (1usize..4000, 200u16..1500).prop_map(|(n, mss)| tcp4_super_packet(n, mss).1),
            prop::collection::vec(any::<u8>(), 1..200),
        ],
        after in prop::collection::vec(item(), 0..6),
        cuts in prop::collection::vec(1usize..3000, 0..8),
        vnet_header: bool,
    ) {
        let header = VirtioNetHdr {
            flags,
            gso_type,
            hdr_len: fields[0],
            gso_size: fields[1],
            csum_start: fields[2],
            csum_offset: fields[3],
        };
        let mut items = before.clone();
        items.push(Item::Offload(header.to_bytes(), packet.clone()));
        items.extend(after);
        let plaintext = encode(&items);
        let mut server = Server::new(vnet_header, Vec::new());
        let mut peer = Peer::authenticated(&mut server);
        let stream = peer.seal(&plaintext, 1 << 14);
        for piece in pieces(&stream, &cuts) {
            server.feed(piece);
        }
        peer.read_from(&mut server);
        if gso::validate(&header, &packet).is_ok() {
            prop_assert_eq!(server.failure(), None);
            prop_assert_eq!(&server.frames, &frames_of(&items));
        } else {
            prop_assert_eq!(server.failure(), Some("offload_invalid"));
            prop_assert_eq!(&server.frames, &frames_of(&before));
            prop_assert_eq!(server.conn.stage(), Stage::Closed);
            let mut tally = FailureTally::default();
            tally.record(server.conn.failure().unwrap());
            prop_assert_eq!(tally.get("offload_invalid"), 1);
            prop_assert_eq!(last_ack(&peer.plaintext), server.frames.len() as u64);
            node_still_serves();
        }
        // Counted on the TUN path too: every packet delivered or dropped by a reason, none as an
        // offload frame the connection let through (Server::check).
        prop_assert_eq!(server.inbound.counts.offload_invalid, 0);
    }
}

// --- the fuzz targets' bodies, on generated input ------------------------------------------------------------

/// Input for [`harness::server_session`]: its four control bytes, a TUN script, then plaintext made of
/// valid frames followed by arbitrary bytes (so the generated cases reach past the first frame).
fn session_input() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 4]>(),
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(item(), 0..6),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(control, script, items, tail)| {
            let mut data = control.to_vec();
            data[0] = (data[0] & 0x1f) | ((script.len() as u8) << 5);
            data.extend_from_slice(&script);
            data.extend_from_slice(&encode(&items));
            data.extend_from_slice(&tail);
            data
        })
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn fuzz_body_server_before_authentication(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        harness::server_preauth(&data);
    }

    #[test]
    fn fuzz_body_server_authenticated_session(data in session_input()) {
        harness::server_session(&data);
    }

    #[test]
    fn fuzz_body_plaintext_server_session(data in session_input()) {
        harness::plain_session(&data);
    }

    #[test]
    fn fuzz_body_client_and_what_a_server_sends(
        control in any::<[u8; 4]>(),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            // Ack records, some beyond what was sent or going back.
            prop::collection::vec(0u64..20, 0..8).prop_map(|counts| {
                counts.iter().flat_map(|&n| vpn_packet_core::ack::encode_ack(n)).collect()
            }),
            // An answer, any code, any text.
            (any::<u8>(), "[a-z ]{0,40}").prop_map(|(code, text)| {
                vpn_packet_core::handshake::encode_answer(code, &text)
            }),
        ],
    ) {
        let data = [&control[..], &body].concat();
        harness::client_session(&data);
    }
}

#[test]
fn the_harness_bodies_take_the_empty_input() {
    harness::server_preauth(&[]);
    harness::server_session(&[]);
    harness::plain_session(&[]);
    harness::client_session(&[]);
}

// --- the same through the production composition, over a real socket ------------------------------------

/// What [`ReceiveSession::pump`] (one call per readiness event, as the node runs it) made of what `peer`
/// sends: the handshake over a socket pair, then `plaintext` in records of `record` bytes, the socket
/// pumped until it is drained. Returns the session, the TUN and what the peer received after the answer.
fn through_a_socket(plaintext: &[u8], record: usize, vnet_header: bool) -> (ReceiveSession, Tun, Vec<u8>) {
    let (near, far) = UnixStream::pair().unwrap();
    near.set_nonblocking(true).unwrap();
    let conn = Connection::server_with_nonce(&harness::nodes().server, None, [7; 32]).unwrap();
    let mut session = ReceiveSession::new(conn, MAX_FRAME, vnet_header, 65536);
    let mut tun = Tun::default();
    let mut peer = Peer::dialling();
    let index_of = |id: &str| if id == "a" { PEER_A } else { NO_PEER };
    let mut pending = Vec::new();
    let step = |peer: &mut Peer, session: &mut ReceiveSession, tun: &mut Tun, pending: &mut Vec<u8>| {
        pending.extend_from_slice(&harness::tls_output(&mut peer.tls));
        let written = (&near).write(pending).unwrap_or(0);
        pending.drain(..written);
        loop {
            let (read, _) = session
                .pump(far.as_raw_fd(), harness::table(), index_of, tun, true)
                .unwrap();
            if read == Read::WouldBlock {
                break;
            }
        }
        let mut buf = vec![0; 1 << 16];
        while let Ok(n) = (&near).read(&mut buf) {
            if n == 0 || !harness::tls_input(&mut peer.tls, &buf[..n], &mut peer.plaintext) {
                break;
            }
        }
    };
    while handshake::parse_challenge(&peer.plaintext).map(|p| matches!(p, Parsed::NeedMore { .. }))
        == Ok(true)
    {
        step(&mut peer, &mut session, &mut tun, &mut pending);
    }
    peer.send_hello();
    while session.connection().stage() != Stage::Established || peer.plaintext.is_empty() {
        step(&mut peer, &mut session, &mut tun, &mut pending);
    }
    peer.take_answer();
    for chunk in plaintext.chunks(record) {
        peer.tls.writer().write_all(chunk).unwrap();
        step(&mut peer, &mut session, &mut tun, &mut pending);
    }
    while !pending.is_empty() {
        step(&mut peer, &mut session, &mut tun, &mut pending);
    }
    step(&mut peer, &mut session, &mut tun, &mut pending);
    (session, tun, peer.plaintext)
}

proptest! {
    #![proptest_config(cases(16))]

    /// Valid frames then arbitrary bytes through `ReceiveSession::pump`: the frames the oracle finds,
    /// its reason, every packet delivered or dropped by a reason, and the acks the peer got are the count.
    #[test]
    fn the_receive_session_over_a_socket_keeps_its_counts(
        items in prop::collection::vec(item(), 0..12),
        tail in prop::collection::vec(any::<u8>(), 0..64),
        record in 1usize..20_000,
        vnet_header: bool,
    ) {
        let plaintext = [encode(&items), tail].concat();
        let (session, tun, acks) = through_a_socket(&plaintext, record, vnet_header);
        let (frames, reason) = expected_frames(&plaintext, MAX_FRAME);
        let conn = session.connection();
        let counts = conn.counts();
        prop_assert_eq!(counts.frames, frames.len() as u64);
        prop_assert_eq!(conn.failure().map(|f| f.reason()), reason);
        let c = session.counts();
        prop_assert_eq!(
            counts.frames + c.extra_segments,
            c.delivered + c.spoofed + c.unparsable + c.offload_invalid + c.write_dropped + c.write_errors
        );
        prop_assert_eq!(c.offload_invalid, 0);
        prop_assert_eq!(c.delivered as usize, tun.written.len());
        prop_assert_eq!(counts.acked, counts.frames);
        prop_assert_eq!(last_ack(&acks), counts.frames);
    }
}

// --- regressions: what the properties found ------------------------------------------------------------

/// Found by `fuzz_body_server_authenticated_session`: frames read together with the peer's close_notify
/// were taken and delivered but never acknowledged (the ack was sent only while established).
#[test]
fn frames_read_with_the_close_notify_are_acknowledged() {
    let mut server = Server::new(false, Vec::new());
    let mut peer = Peer::authenticated(&mut server);
    let packets = [
        Item::Packet(ipv4([10, 1, 0, 7], 40, 1)),
        Item::Packet(ipv4([10, 1, 0, 7], 50, 2)),
    ];
    let mut stream = peer.seal(&encode(&packets), 1 << 14);
    peer.tls.send_close_notify();
    stream.extend_from_slice(&harness::tls_output(&mut peer.tls));
    server.feed(&stream);
    assert_eq!(server.events.last(), Some(&Event::Closed));
    assert_eq!(server.frames.len(), 2);
    assert_eq!(server.conn.counts().acked, 2);
    peer.read_from(&mut server);
    assert_eq!(last_ack(&peer.plaintext), 2);
}

/// Found by `one_corrupt_record_ends_the_connection_there`: after rustls refused a record, the frames of
/// the good records read with it were counted acknowledged, but rustls sends nothing after its alert, so
/// the peer never got that ack. `acked` now counts what was sent; frames acknowledged in earlier reads
/// stay acknowledged.
#[test]
fn a_refused_record_counts_no_ack_that_cannot_be_sent() {
    let mut server = Server::new(false, Vec::new());
    let mut peer = Peer::authenticated(&mut server);
    let first = peer.seal(&encode(&[Item::Packet(ipv4([10, 1, 0, 7], 40, 1))]), 1 << 14);
    server.feed(&first);
    let mut stream = peer.seal(&encode(&[Item::Packet(ipv4([10, 1, 0, 7], 40, 2))]), 1 << 14);
    stream.extend_from_slice(b"not a record");
    server.feed(&stream);
    assert_eq!(server.failure(), Some("tls_bad_record"));
    assert_eq!(server.frames.len(), 2, "the good record's frame is delivered");
    assert_eq!(server.conn.counts().acked, 1);
    peer.read_from(&mut server);
    assert_eq!(last_ack(&peer.plaintext), 1);
}

/// Found by the same property with longer runs: when the plaintext of the good records ended the
/// connection first (here a frame length above the maximum) and rustls refused a record later in the same
/// read, the ack of the frames before was counted but, after rustls' alert, never sent.
#[test]
fn a_failure_read_with_a_refused_record_counts_no_ack_that_cannot_be_sent() {
    let mut server = Server::new(false, Vec::new());
    let mut peer = Peer::authenticated(&mut server);
    let first = peer.seal(&encode(&[Item::Packet(ipv4([10, 1, 0, 7], 40, 1))]), 1 << 14);
    server.feed(&first);
    let mut plaintext = encode(&[Item::Packet(ipv4([10, 1, 0, 7], 40, 2))]);
    plaintext.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
    let mut stream = peer.seal(&plaintext, 1 << 14);
    stream.extend_from_slice(&[0; 8]);
    server.feed(&stream);
    assert_eq!(server.failure(), Some("too_large"));
    assert_eq!(server.frames.len(), 2);
    assert_eq!(server.conn.counts().acked, 1);
    peer.read_from(&mut server);
    assert_eq!(last_ack(&peer.plaintext), 1);
}
